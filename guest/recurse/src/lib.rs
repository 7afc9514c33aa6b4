//! Test fixture: echoes until a chunk contains `recurse`, then recurses
//! without bound until the wasm stack limit traps it.
//!
//! The recursion keeps its state in wasm locals (no address-taken locals,
//! so nothing lands on the shadow stack in linear memory) and combines
//! results with a non-associative step, so the compiler can turn it neither
//! into a loop nor into a memory access.

use sockserver_guest::{Connection, Handler, InputStream, OutputStream, export_handler};

struct Recurse;

#[inline(never)]
fn deeper(n: u64, seed: u64) -> u64 {
    if n == u64::MAX - seed {
        return seed;
    }
    deeper(n + 1, seed).rotate_left((n & 31) as u32) ^ n.wrapping_mul(seed)
}

impl Handler for Recurse {
    fn handle(conn: Connection, input: InputStream, output: OutputStream) -> Result<(), String> {
        if !fixture::echo_until(&input, &output, b"recurse")? {
            return Ok(());
        }
        // The seed is only known at run time, so nothing can be folded.
        Err(format!("recursion ended: {}", deeper(0, conn.id())))
    }
}

export_handler!(Recurse);
