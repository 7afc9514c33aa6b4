//! Guest stdout and stderr: each line the guest writes becomes one host log
//! line tagged with the connection id, so guest output is never interleaved
//! raw on the terminal and cannot grow host memory without bound.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// The longest line kept before it is logged in pieces. A guest that never
/// writes a newline cannot make the host buffer more than this per stream.
const MAX_LINE: usize = 4096;

/// How much a guest may hand over in one `write`: generous for log lines,
/// small enough that a single call cannot make the host copy much.
const WRITE_PERMIT: usize = 64 * 1024;

/// Where one connection's guest stdout or stderr goes.
///
/// Cloned into the WASI context as both stdout and stderr. The line budget
/// is shared by the two, so a guest printing in a loop costs the log at most
/// `lines` lines per connection (the CPU limit ends the loop itself).
#[derive(Clone)]
pub struct GuestLog {
    conn: u64,
    stream: &'static str,
    lines_left: Arc<AtomicU32>,
}

impl GuestLog {
    /// A stdout/stderr pair for connection `conn` sharing one line budget.
    pub fn pair(conn: u64, lines: u32) -> (GuestLog, GuestLog) {
        let lines_left = Arc::new(AtomicU32::new(lines));
        let out = GuestLog {
            conn,
            stream: "stdout",
            lines_left: lines_left.clone(),
        };
        let err = GuestLog {
            conn,
            stream: "stderr",
            lines_left,
        };
        (out, err)
    }

    fn stream(&self) -> LogStream {
        LogStream {
            log: self.clone(),
            line: Vec::new(),
        }
    }

    fn emit(&self, line: &[u8]) {
        // Blank lines (Rust's panic message starts with one) carry nothing.
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        let left = self
            .lines_left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        match left {
            Ok(1) => tracing::warn!(
                target: "guest",
                conn = self.conn,
                stream = self.stream,
                "guest output limit reached; further lines from this connection are dropped"
            ),
            Ok(_) => tracing::info!(
                target: "guest",
                conn = self.conn,
                stream = self.stream,
                "{}",
                sanitize(String::from_utf8_lossy(line).trim_end_matches('\r'), MAX_LINE)
            ),
            Err(_) => {}
        }
    }
}

/// Guest text made safe for a log line: at most `max` bytes (cut at a
/// character boundary, marked with `…`), control characters (newlines,
/// carriage returns, terminal escapes) shown escaped, so a guest, or a
/// client whose input the guest echoes into an error, cannot forge or split
/// log lines or drive the operator's terminal.
pub fn sanitize(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max) + 3);
    for c in text.chars() {
        if out.len() >= max {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

impl IsTerminal for GuestLog {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestLog {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.stream())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.stream())
    }
}

/// One open handle on a guest's stdout or stderr: collects bytes into
/// lines and logs each complete line. Writing never blocks.
struct LogStream {
    log: GuestLog,
    line: Vec<u8>,
}

impl LogStream {
    fn push(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let (part, rest, newline) = match bytes.iter().position(|&b| b == b'\n') {
                Some(i) => (&bytes[..i], &bytes[i + 1..], true),
                None => (bytes, &[][..], false),
            };
            let room = MAX_LINE - self.line.len();
            self.line.extend_from_slice(&part[..part.len().min(room)]);
            if newline || self.line.len() == MAX_LINE {
                self.log.emit(&self.line);
                self.line.clear();
            }
            // Whatever did not fit the line continues as the next line.
            bytes = if part.len() > room {
                &bytes[room..]
            } else {
                rest
            };
        }
    }
}

impl Drop for LogStream {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            self.log.emit(&self.line);
        }
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LogStream {
    async fn ready(&mut self) {}
}

#[wasmtime_wasi::async_trait]
impl OutputStream for LogStream {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(WRITE_PERMIT)
    }
}

impl tokio::io::AsyncWrite for LogStream {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.get_mut().push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::sanitize;

    #[test]
    fn sanitize_escapes_and_truncates() {
        assert_eq!(sanitize("plain text", 100), "plain text");
        assert_eq!(
            sanitize("two\nlines\r\x1b[31m", 100),
            "two\\nlines\\r\\u{1b}[31m"
        );
        assert_eq!(sanitize("ééééé", 4), "éé…");
    }
}
