//! Test fixture: echoes until a chunk contains `stucksend` or `stuckerr`,
//! then, with the client not reading, fills the socket and leaves the
//! host's output buffer all but full (100 bytes of room). Then:
//! - `stucksend`: calls `blocking-write-and-flush` with 4 KiB, a write that
//!   fits only once the client reads;
//! - `stuckerr`: returns `err` without dropping its output handle, leaving
//!   the host a reply it cannot deliver.

use sockserver_guest::{Connection, Handler, InputStream, OutputStream, export_handler};

struct StuckSend;

impl Handler for StuckSend {
    fn handle(_conn: Connection, input: InputStream, output: OutputStream) -> Result<(), String> {
        while let Some(chunk) = sockserver_guest::read_chunk(&input).map_err(|e| e.to_string())? {
            let has = |word: &[u8]| chunk.windows(word.len()).any(|w| w == word);
            if has(b"stuckerr") {
                let result = stuck(&output, true);
                // Keep the output handle past the return, as a guest whose
                // garbage collector has not run yet (JavaScript) does: a
                // dropped handle would make the host deliver its bytes
                // first, inside the guest's call.
                std::mem::forget(output);
                return result;
            }
            if has(b"stucksend") {
                return stuck(&output, false);
            }
            sockserver_guest::send(&output, &chunk).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

fn stuck(output: &OutputStream, give_up: bool) -> Result<(), String> {
    let err = |e| format!("{e:?}");
    let chunk = vec![b'x'; 4096];
    // While nothing is pending in the host, each write goes straight to
    // the kernel; the first that leaves bytes behind means it is full.
    while output.check_write().map_err(err)? == 64 * 1024 {
        output.write(&chunk).map_err(err)?;
    }
    let permit = output.check_write().map_err(err)? as usize;
    output.write(&vec![b'y'; permit - 100]).map_err(err)?;
    eprintln!("stucksend: host buffer full");
    if give_up {
        return Err("gave up on a client that does not read".into());
    }
    output.blocking_write_and_flush(&chunk).map_err(err)?;
    Ok(())
}

export_handler!(StuckSend);
