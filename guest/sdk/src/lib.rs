//! The Rust SDK for wasm-sockserver handlers: the generated bindings for the
//! `sockserver` world, `std::io` adapters over the connection's streams, and
//! the `export_handler!` macro.
//!
//! A handler is a type that implements [`Handler`]:
//!
//! ```ignore
//! use sockserver_guest::{export_handler, Connection, Handler, InputStream, OutputStream};
//!
//! struct Hello;
//!
//! impl Handler for Hello {
//!     fn handle(conn: Connection, _input: InputStream, output: OutputStream) -> Result<(), String> {
//!         let mut out = sockserver_guest::Writer::new(output);
//!         writeln!(out, "hello {}", conn.peer_address()).map_err(|e| e.to_string())
//!     }
//! }
//!
//! export_handler!(Hello);
//! ```

use std::io;

/// Bindings generated from the repository's `wit/` directory.
///
/// Everything in the world is generated (`generate_all`) so handlers can use
/// the WASI clocks, random and poll interfaces without another crate.
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "sockserver:handler/sockserver",
        generate_all,
        pub_export_macro: true,
        default_bindings_module: "sockserver_guest::bindings",
    });
}

pub use bindings::exports::sockserver::handler::handler::Guest as Handler;
pub use bindings::sockserver::handler::types::Connection;
pub use bindings::wasi::io::streams::{InputStream, OutputStream, StreamError};

/// The largest read the SDK asks the host for: the host buffers at most this
/// much per direction, so asking for more would only allocate more.
pub const MAX_READ: u64 = 64 * 1024;

/// Export `$ty` (a type implementing [`Handler`]) as the component's handler.
#[macro_export]
macro_rules! export_handler {
    ($ty:ident) => {
        $crate::bindings::export!($ty with_types_in $crate::bindings);
    };
}

/// Turn a WASI stream error into an `io::Error`, keeping the host's message.
fn stream_error(err: StreamError) -> io::Error {
    match err {
        StreamError::Closed => io::Error::from(io::ErrorKind::BrokenPipe),
        StreamError::LastOperationFailed(e) => io::Error::other(e.to_debug_string()),
    }
}

/// Read the next chunk the client sent, up to [`MAX_READ`] bytes, waiting for
/// at least one byte. `Ok(None)` means the client half-closed its side.
pub fn read_chunk(input: &InputStream) -> io::Result<Option<Vec<u8>>> {
    match input.blocking_read(MAX_READ) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(StreamError::Closed) => Ok(None),
        Err(e) => Err(stream_error(e)),
    }
}

/// Write all of `bytes` with `check-write` + `write`, waiting for the host's
/// buffer to drain when it is full. Unlike `blocking-write-and-flush` this is
/// not limited to 4096 bytes per call, so bulk data needs fewer host calls.
pub fn write_all(output: &OutputStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        let permit = output.check_write().map_err(stream_error)?;
        if permit == 0 {
            output.subscribe().block();
            continue;
        }
        let n = bytes
            .len()
            .min(usize::try_from(permit).unwrap_or(usize::MAX));
        output.write(&bytes[..n]).map_err(stream_error)?;
        bytes = &bytes[n..];
    }
    Ok(())
}

/// The most `blocking-write-and-flush` takes in one call (wasi:io's limit).
pub const SMALL_WRITE: usize = 4096;

/// Write all of `bytes` and wait until the host has handed them to the
/// socket, in as few host calls as possible: one `blocking-write-and-flush`
/// for up to [`SMALL_WRITE`] bytes, otherwise [`write_all`] then one
/// `blocking-flush`. This is what a request/response handler wants after
/// each response.
pub fn send(output: &OutputStream, bytes: &[u8]) -> io::Result<()> {
    if bytes.len() <= SMALL_WRITE {
        return output.blocking_write_and_flush(bytes).map_err(stream_error);
    }
    write_all(output, bytes)?;
    output.blocking_flush().map_err(stream_error)
}

/// `std::io::Read` over the connection's input stream, so existing protocol
/// code (a `BufReader` line loop, say) works unchanged. End of stream (the
/// client's FIN) reads as `Ok(0)`.
pub struct Reader {
    stream: InputStream,
    /// Bytes the host returned that did not fit the caller's buffer.
    pending: Vec<u8>,
    /// How far into `pending` the caller has read.
    offset: usize,
}

impl Reader {
    pub fn new(stream: InputStream) -> Self {
        Self {
            stream,
            pending: Vec::new(),
            offset: 0,
        }
    }

    /// The underlying stream, to subscribe to it or read from it directly.
    pub fn stream(&self) -> &InputStream {
        &self.stream
    }
}

impl io::Read for Reader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.offset == self.pending.len() {
            match read_chunk(&self.stream)? {
                Some(bytes) => {
                    self.pending = bytes;
                    self.offset = 0;
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.pending.len() - self.offset);
        buf[..n].copy_from_slice(&self.pending[self.offset..self.offset + n]);
        self.offset += n;
        Ok(n)
    }
}

/// `std::io::Write` over the connection's output stream. Writes go out as
/// soon as the host can take them; `flush` waits until the host has handed
/// every byte to the socket.
pub struct Writer {
    stream: OutputStream,
}

impl Writer {
    pub fn new(stream: OutputStream) -> Self {
        Self { stream }
    }

    /// The underlying stream.
    pub fn stream(&self) -> &OutputStream {
        &self.stream
    }
}

impl io::Write for Writer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            let permit = self.stream.check_write().map_err(stream_error)?;
            if permit == 0 {
                self.stream.subscribe().block();
                continue;
            }
            let n = buf.len().min(usize::try_from(permit).unwrap_or(usize::MAX));
            self.stream.write(&buf[..n]).map_err(stream_error)?;
            return Ok(n);
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        write_all(&self.stream, buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.blocking_flush().map_err(stream_error)
    }
}
