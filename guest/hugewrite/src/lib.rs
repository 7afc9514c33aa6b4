//! Test fixture: echoes until a chunk contains `hugewrite`, then writes
//! 64 KiB blocks forever, whether or not the client reads them.

use sockserver_guest::{Connection, Handler, InputStream, OutputStream, export_handler};

struct HugeWrite;

impl Handler for HugeWrite {
    fn handle(_conn: Connection, input: InputStream, output: OutputStream) -> Result<(), String> {
        if !fixture::echo_until(&input, &output, b"hugewrite")? {
            return Ok(());
        }
        let block = vec![b'x'; 64 * 1024];
        loop {
            sockserver_guest::write_all(&output, &block).map_err(|e| e.to_string())?;
        }
    }
}

export_handler!(HugeWrite);
