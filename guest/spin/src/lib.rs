//! Test fixture: echoes until a chunk contains `spin`, then spins forever
//! without calling the host. Only the CPU limit can stop it.

use sockserver_guest::{Connection, Handler, InputStream, OutputStream, export_handler};

struct Spin;

impl Handler for Spin {
    fn handle(_conn: Connection, input: InputStream, output: OutputStream) -> Result<(), String> {
        if !fixture::echo_until(&input, &output, b"spin")? {
            return Ok(());
        }
        let mut x: u64 = 0;
        loop {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
}

export_handler!(Spin);
