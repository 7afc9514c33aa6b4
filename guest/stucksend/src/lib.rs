//! Test fixture: echoes until a chunk contains `stucksend`, then, with the
//! client not reading, fills the socket, leaves the host's output buffer all
//! but full (100 bytes of room) and calls `blocking-write-and-flush` with
//! 4 KiB: a write that fits only once the client reads.

use sockserver_guest::{Connection, Handler, InputStream, OutputStream, export_handler};

struct StuckSend;

impl Handler for StuckSend {
    fn handle(_conn: Connection, input: InputStream, output: OutputStream) -> Result<(), String> {
        if !fixture::echo_until(&input, &output, b"stucksend")? {
            return Ok(());
        }
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
        output.blocking_write_and_flush(&chunk).map_err(err)?;
        Ok(())
    }
}

export_handler!(StuckSend);
