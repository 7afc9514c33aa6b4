//! Test fixture: waits for the first bytes, then spins forever without
//! calling the host. Only the CPU limit can stop it.

use sockserver_guest::{Connection, Handler, InputStream, OutputStream, export_handler};

struct Spin;

impl Handler for Spin {
    fn handle(_conn: Connection, input: InputStream, _output: OutputStream) -> Result<(), String> {
        let _ = sockserver_guest::read_chunk(&input);
        let mut x: u64 = 0;
        loop {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
}

export_handler!(Spin);
