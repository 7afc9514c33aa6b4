//! Test fixture: echoes like `echo`, but traps (panics, which aborts the
//! instance) as soon as a chunk contains the bytes `crash`.

use sockserver_guest::{Connection, Handler, InputStream, OutputStream, export_handler};

struct Crash;

impl Handler for Crash {
    fn handle(_conn: Connection, input: InputStream, output: OutputStream) -> Result<(), String> {
        while let Some(chunk) = sockserver_guest::read_chunk(&input).map_err(|e| e.to_string())? {
            if chunk.windows(5).any(|w| w == b"crash") {
                panic!("crash requested by client");
            }
            sockserver_guest::write_all(&output, &chunk).map_err(|e| e.to_string())?;
            output
                .blocking_flush()
                .map_err(|e| format!("flush failed: {e:?}"))?;
        }
        Ok(())
    }
}

export_handler!(Crash);
