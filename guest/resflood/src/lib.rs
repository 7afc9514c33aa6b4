//! Test fixture: echoes until a chunk contains `resflood`, then creates
//! pollables forever and keeps every one, until the host's table cap stops
//! it.

use sockserver_guest::{Connection, Handler, InputStream, OutputStream, export_handler};

struct ResFlood;

impl Handler for ResFlood {
    fn handle(_conn: Connection, input: InputStream, output: OutputStream) -> Result<(), String> {
        if !fixture::echo_until(&input, &output, b"resflood")? {
            return Ok(());
        }
        let mut hoard = Vec::new();
        loop {
            hoard.push(input.subscribe());
        }
    }
}

export_handler!(ResFlood);
