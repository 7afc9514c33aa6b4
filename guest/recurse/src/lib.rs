//! Test fixture: waits for the first bytes, then recurses without bound
//! until the wasm stack limit traps it.
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
    fn handle(_conn: Connection, input: InputStream, _output: OutputStream) -> Result<(), String> {
        // The seed comes from the client so nothing is known at compile time;
        // a one-byte message recurses (practically) forever.
        let seed = sockserver_guest::read_chunk(&input)
            .ok()
            .flatten()
            .map_or(0, |b| b.len() as u64);
        Err(format!("recursion ended: {}", deeper(0, seed)))
    }
}

export_handler!(Recurse);
