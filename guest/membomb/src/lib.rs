//! Test fixture: echoes until a chunk contains one of its commands:
//! - `membomb`: allocates (and touches) 1 MiB after 1 MiB until the memory
//!   limit stops it;
//! - `tryhoard`: asks for 64 MiB with `try_reserve`, which a limit below
//!   that refuses, and answers `refused\n` (or `granted\n`), then goes on
//!   echoing: a guest that recovers from a refused allocation;
//! - `tryabort`: the same refusal, then an abort at once;
//! - `abort`: aborts (a trap unrelated to memory).

use sockserver_guest::{Connection, Handler, InputStream, OutputStream, export_handler};

struct MemBomb;

/// What `tryhoard` and `tryabort` ask for.
const HOARD: usize = 64 << 20;

impl Handler for MemBomb {
    fn handle(_conn: Connection, input: InputStream, output: OutputStream) -> Result<(), String> {
        while let Some(chunk) = sockserver_guest::read_chunk(&input).map_err(|e| e.to_string())? {
            let has = |word: &[u8]| chunk.windows(word.len()).any(|w| w == word);
            let reply: &[u8] = if has(b"membomb") {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![0xA5; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            } else if has(b"tryhoard") || has(b"tryabort") {
                let granted = Vec::<u8>::new().try_reserve(HOARD).is_ok();
                if has(b"tryabort") {
                    std::process::abort();
                }
                if granted { b"granted\n" } else { b"refused\n" }
            } else if has(b"abort") {
                std::process::abort();
            } else {
                &chunk
            };
            sockserver_guest::send(&output, reply).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

export_handler!(MemBomb);
