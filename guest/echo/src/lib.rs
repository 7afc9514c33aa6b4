//! The echo handler: every byte the client sends comes back, until the
//! client half-closes; then the handler returns and the host closes.

use sockserver_guest::{Connection, Handler, InputStream, OutputStream, export_handler};

struct Echo;

impl Handler for Echo {
    fn handle(_conn: Connection, input: InputStream, output: OutputStream) -> Result<(), String> {
        // Read whatever arrived (up to 64 KiB) and send it back: one
        // `blocking-write-and-flush` for small chunks, check-write/write and
        // one flush for large ones, so the client sees the echo before we
        // block on the next read.
        while let Some(chunk) = sockserver_guest::read_chunk(&input).map_err(|e| e.to_string())? {
            sockserver_guest::send(&output, &chunk).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

export_handler!(Echo);
