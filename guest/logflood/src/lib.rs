//! Test fixture: floods the host's guest log on request. Each chunk the
//! client sends is a command, answered `done\n`:
//! - `lines`: prints 1500 lines (`flood line 0` ...) to stdout;
//! - `handles`: takes 900 handles on stdout and writes 4095 bytes, no
//!   newline, to each, keeping every handle open.
//!
//! Anything else is echoed.

use sockserver_guest::bindings::wasi::cli::stdout::get_stdout;
use sockserver_guest::{Connection, Handler, InputStream, OutputStream, export_handler};

struct LogFlood;

impl Handler for LogFlood {
    fn handle(_conn: Connection, input: InputStream, output: OutputStream) -> Result<(), String> {
        let mut handles = Vec::new();
        while let Some(chunk) = sockserver_guest::read_chunk(&input).map_err(|e| e.to_string())? {
            let reply: &[u8] = if chunk.starts_with(b"lines") {
                for i in 0..1500 {
                    println!("flood line {i}");
                }
                b"done\n"
            } else if chunk.starts_with(b"handles") {
                let text = vec![b'h'; 4095];
                for _ in 0..900 {
                    let stdout = get_stdout();
                    stdout.write(&text).map_err(|e| format!("{e:?}"))?;
                    handles.push(stdout);
                }
                b"done\n"
            } else {
                &chunk
            };
            sockserver_guest::send(&output, reply).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

export_handler!(LogFlood);
