//! Test fixture: echoes each chunk after a 200 ms pause, spending the wait
//! blocked in the host (no CPU).

use sockserver_guest::bindings::wasi::clocks::monotonic_clock;
use sockserver_guest::{Connection, Handler, InputStream, OutputStream, export_handler};

struct SlowEcho;

impl Handler for SlowEcho {
    fn handle(_conn: Connection, input: InputStream, output: OutputStream) -> Result<(), String> {
        while let Some(chunk) = sockserver_guest::read_chunk(&input).map_err(|e| e.to_string())? {
            monotonic_clock::subscribe_duration(200_000_000).block();
            sockserver_guest::write_all(&output, &chunk).map_err(|e| e.to_string())?;
            output
                .blocking_flush()
                .map_err(|e| format!("flush failed: {e:?}"))?;
        }
        Ok(())
    }
}

export_handler!(SlowEcho);
