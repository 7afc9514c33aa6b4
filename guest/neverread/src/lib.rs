//! Test fixture: echoes until a chunk contains `neverread`, then never
//! reads again: it blocks on a one-hour clock pollable while the client
//! pushes bytes at it.

use sockserver_guest::bindings::wasi::clocks::monotonic_clock;
use sockserver_guest::{Connection, Handler, InputStream, OutputStream, export_handler};

struct NeverRead;

impl Handler for NeverRead {
    fn handle(_conn: Connection, input: InputStream, output: OutputStream) -> Result<(), String> {
        if fixture::echo_until(&input, &output, b"neverread")? {
            monotonic_clock::subscribe_duration(3600 * 1_000_000_000).block();
        }
        Ok(())
    }
}

export_handler!(NeverRead);
