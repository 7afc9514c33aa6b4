//! Test fixture: echoes until a chunk contains `membomb`, then allocates
//! (and touches) 1 MiB after 1 MiB until the memory limit stops it.

use sockserver_guest::{Connection, Handler, InputStream, OutputStream, export_handler};

struct MemBomb;

impl Handler for MemBomb {
    fn handle(_conn: Connection, input: InputStream, output: OutputStream) -> Result<(), String> {
        if !fixture::echo_until(&input, &output, b"membomb")? {
            return Ok(());
        }
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            hoard.push(vec![0xA5; 1 << 20]);
            std::hint::black_box(&hoard);
        }
    }
}

export_handler!(MemBomb);
