//! Test fixture: drops the connection's input stream, takes
//! `wasi:cli/stdin` instead (its handle may land in the host table slot the
//! input had) and reads from it, then reports what that read returned:
//! `stdin closed`, or how many bytes it gave. The host must serve stdin
//! (empty), never the socket, whatever slot it lands in.

use sockserver_guest::bindings::wasi::cli::stdin::get_stdin;
use sockserver_guest::{
    Connection, Handler, InputStream, OutputStream, StreamError, export_handler,
};

struct StdinSwap;

impl Handler for StdinSwap {
    fn handle(_conn: Connection, input: InputStream, output: OutputStream) -> Result<(), String> {
        drop(input);
        let stdin = get_stdin();
        let report = match stdin.blocking_read(64) {
            Ok(bytes) => format!("stdin gave {} bytes\n", bytes.len()),
            Err(StreamError::Closed) => "stdin closed\n".to_string(),
            Err(StreamError::LastOperationFailed(e)) => {
                format!("stdin failed: {}\n", e.to_debug_string())
            }
        };
        sockserver_guest::send(&output, report.as_bytes()).map_err(|e| e.to_string())
    }
}

export_handler!(StdinSwap);
