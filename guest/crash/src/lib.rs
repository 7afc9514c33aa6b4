//! Test fixture: echoes until a chunk contains `crash`, then panics, which
//! traps the instance.

use sockserver_guest::{Connection, Handler, InputStream, OutputStream, export_handler};

struct Crash;

impl Handler for Crash {
    fn handle(_conn: Connection, input: InputStream, output: OutputStream) -> Result<(), String> {
        if fixture::echo_until(&input, &output, b"crash")? {
            panic!("crash requested by client");
        }
        Ok(())
    }
}

export_handler!(Crash);
