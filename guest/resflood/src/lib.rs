//! Test fixture: waits for the first bytes, then creates pollables forever
//! and keeps every one, until the host's resource-table cap stops it.

use sockserver_guest::{Connection, Handler, InputStream, OutputStream, export_handler};

struct ResFlood;

impl Handler for ResFlood {
    fn handle(_conn: Connection, input: InputStream, _output: OutputStream) -> Result<(), String> {
        let _ = sockserver_guest::read_chunk(&input);
        let mut hoard = Vec::new();
        loop {
            hoard.push(input.subscribe());
        }
    }
}

export_handler!(ResFlood);
