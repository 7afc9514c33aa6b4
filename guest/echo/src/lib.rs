//! The echo handler: every byte the client sends comes back, until the
//! client half-closes; then the handler returns and the host closes.

use sockserver_guest::{Connection, Handler, InputStream, OutputStream, export_handler};

struct Echo;

impl Handler for Echo {
    fn handle(_conn: Connection, input: InputStream, output: OutputStream) -> Result<(), String> {
        // Read whatever arrived (up to 64 KiB), write it back with
        // check-write/write, and flush so the client sees it before we block
        // on the next read.
        while let Some(chunk) = sockserver_guest::read_chunk(&input).map_err(|e| e.to_string())? {
            sockserver_guest::write_all(&output, &chunk).map_err(|e| e.to_string())?;
            output
                .blocking_flush()
                .map_err(|e| format!("flush failed: {e:?}"))?;
        }
        Ok(())
    }
}

export_handler!(Echo);
