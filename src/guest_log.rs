//! Guest stdout and stderr: each line the guest writes becomes one host log
//! line tagged with the connection id, so guest output is never interleaved
//! raw on the terminal and cannot grow host memory without bound.

use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// The longest line kept before it is logged in pieces. A guest that never
/// writes a newline cannot make the host buffer more than this per stream,
/// however many handles on the stream it takes.
const MAX_LINE: usize = 4096;

/// The log target of guest output. Guest lines are logged at `info`; the
/// host's warning that a guest reached its limit shares the target but not
/// the level, which is how the log queue tells them apart.
pub const TARGET: &str = "guest";

/// How much a guest may hand over in one `write`: generous for log lines,
/// small enough that a single call cannot make the host copy much.
const WRITE_PERMIT: usize = 64 * 1024;

/// Where one connection's guest stdout or stderr goes.
///
/// One per stream, set in the WASI context; every handle the guest takes
/// on the stream is a clone, sharing the stream's one partial line (one
/// buffer per handle would let a guest holding a thousand handles make the
/// host keep a thousand partial lines). The line budget is shared by stdout
/// and stderr, so a guest printing in a loop costs the log at most `lines`
/// lines per connection (the CPU limit ends the loop itself).
#[derive(Clone)]
pub struct GuestLog(Arc<Stream>);

struct Stream {
    conn: u64,
    name: &'static str,
    lines_left: Arc<AtomicU32>,
    /// The line being collected; logged when it ends or reaches
    /// [`MAX_LINE`], and what is left of it when the connection ends.
    line: Mutex<Vec<u8>>,
}

impl GuestLog {
    /// A stdout/stderr pair for connection `conn` sharing a budget of
    /// `lines` lines.
    pub fn pair(conn: u64, lines: u32) -> (GuestLog, GuestLog) {
        // One more than the budget: the line after the last one logged is
        // the one replaced by the warning that more were dropped.
        let lines_left = Arc::new(AtomicU32::new(lines.saturating_add(1)));
        let stream = |name| {
            GuestLog(Arc::new(Stream {
                conn,
                name,
                lines_left: lines_left.clone(),
                line: Mutex::new(Vec::new()),
            }))
        };
        (stream("stdout"), stream("stderr"))
    }

    /// Add `bytes` to the stream, logging each line they complete.
    fn push(&self, mut bytes: &[u8]) {
        let mut line = self.0.line.lock().unwrap_or_else(|e| e.into_inner());
        while !bytes.is_empty() {
            let (part, rest, newline) = match bytes.iter().position(|&b| b == b'\n') {
                Some(i) => (&bytes[..i], &bytes[i + 1..], true),
                None => (bytes, &[][..], false),
            };
            let room = MAX_LINE - line.len();
            line.extend_from_slice(&part[..part.len().min(room)]);
            if newline || line.len() == MAX_LINE {
                self.0.emit(&line);
                line.clear();
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

impl Stream {
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
                target: TARGET,
                conn = self.conn,
                stream = self.name,
                "guest output limit reached; further lines from this connection are dropped"
            ),
            Ok(_) => tracing::info!(
                target: TARGET,
                conn = self.conn,
                stream = self.name,
                "{}",
                sanitize(String::from_utf8_lossy(line).trim_end_matches('\r'), MAX_LINE)
            ),
            Err(_) => {}
        }
    }
}

impl Drop for Stream {
    /// The connection is over: log the unfinished line.
    fn drop(&mut self) {
        let line = std::mem::take(self.line.get_mut().unwrap_or_else(|e| e.into_inner()));
        if !line.is_empty() {
            self.emit(&line);
        }
    }
}

/// Guest text made safe for a log line: cut at a character boundary once
/// it reaches `max` bytes (marked with `…`; the last escape may take it a
/// few bytes over), and every character `escaped` shown as its escape, so
/// a guest, or a client whose input the guest echoes into an error, cannot
/// forge or split log lines, drive the operator's terminal, or reorder how
/// a line displays.
pub fn sanitize(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max) + 3);
    for c in text.chars() {
        if out.len() >= max {
            out.push('…');
            break;
        }
        if escaped(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Characters a log line shows escaped: control characters (newlines,
/// carriage returns, terminal escapes); the Unicode line and paragraph
/// separators, which some log viewers and JSON-lines readers break lines
/// at; and the bidirectional formatting characters, which reorder how the
/// rest of a line is displayed (a guest could make `outcome=trap` appear
/// as something else).
fn escaped(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}'
                | '\u{2029}'
                | '\u{061c}'
                | '\u{200e}'
                | '\u{200f}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
        )
}

impl IsTerminal for GuestLog {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestLog {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for GuestLog {
    async fn ready(&mut self) {}
}

/// A handle on the stream: writing never blocks.
#[wasmtime_wasi::async_trait]
impl OutputStream for GuestLog {
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

impl tokio::io::AsyncWrite for GuestLog {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(buf);
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

    #[test]
    fn sanitize_escapes_line_separators_and_bidi_controls() {
        assert_eq!(
            sanitize("a\u{2028}b\u{2029}c", 100),
            "a\\u{2028}b\\u{2029}c"
        );
        // A right-to-left override, then an isolate, then the Arabic mark.
        assert_eq!(
            sanitize("ok\u{202e}part\u{2067}x\u{2069}\u{61c}", 100),
            "ok\\u{202e}part\\u{2067}x\\u{2069}\\u{61c}"
        );
        // Letters of right-to-left scripts are text, not controls.
        assert_eq!(sanitize("שלום", 100), "שלום");
    }
}
