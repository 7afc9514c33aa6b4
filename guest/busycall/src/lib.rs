//! Test fixture: echoes until a chunk contains `busycall`, then calls
//! `blocking-flush` forever with nothing to flush, so that every call
//! returns at once: a guest that spends nearly all its time inside host
//! calls that never wait, 64 of them between loop back-edges (where wasm
//! checks the epoch).

use sockserver_guest::{Connection, Handler, InputStream, OutputStream, export_handler};

struct BusyCall;

macro_rules! eight {
    ($e:expr) => {{
        $e;
        $e;
        $e;
        $e;
        $e;
        $e;
        $e;
        $e;
    }};
}

impl Handler for BusyCall {
    fn handle(_conn: Connection, input: InputStream, output: OutputStream) -> Result<(), String> {
        if !fixture::echo_until(&input, &output, b"busycall")? {
            return Ok(());
        }
        loop {
            eight!(eight!(
                output.blocking_flush().map_err(|e| format!("{e:?}"))?
            ));
        }
    }
}

export_handler!(BusyCall);
