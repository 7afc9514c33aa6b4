//! The connection's socket as `wasi:io` streams: `input-stream` and
//! `output-stream` implemented directly on the tokio `TcpStream` with
//! readiness plus `try_read`/`try_write`. No task per stream, no pipe, and at
//! most [`BUFFER_LIMIT`] bytes held by the host per direction.

use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::Interest;
use tokio::net::TcpStream;
use wasmtime_wasi::p2::{InputStream, OutputStream, Pollable, StreamError, StreamResult};

/// The most the host holds for one connection in each direction: the largest
/// read it hands the guest, and the most unsent output it keeps. A guest that
/// writes to a client that never reads is told to wait (`check-write` = 0)
/// once this much is pending.
pub const BUFFER_LIMIT: usize = 64 * 1024;

/// An accepted TCP connection shared by the guest's input stream, its
/// output stream and the connection task.
///
/// The connection task keeps its own `Arc` because the guest may still own
/// `output` when `handle` returns; the task then flushes and closes.
pub struct Socket {
    tcp: TcpStream,
    /// Output the socket has not yet taken.
    out: Mutex<Outbound>,
    /// Traffic counters and the idle clock.
    activity: Activity,
    /// Set when the peer reset the connection (or a read/write failed), so
    /// the outcome is reported as a client reset rather than a handler error.
    reset: AtomicBool,
    /// Set when a read saw the client's FIN: nothing more can arrive, so
    /// the lingering close has nothing to drain.
    read_eof: AtomicBool,
}

#[derive(Default)]
struct Outbound {
    buf: Vec<u8>,
    /// How much of `buf` has been sent.
    sent: usize,
    /// The guest asked to flush and `buf` still holds bytes: `check-write`
    /// reports 0 until they are gone, as `wasi:io` requires.
    flushing: bool,
    /// The write side is shut down: the guest dropped `output`.
    shut: bool,
    /// A failed write, reported once as `last-operation-failed`; afterwards
    /// the stream reports `closed`.
    failed: Option<Failure>,
}

#[derive(Clone, Copy, PartialEq)]
enum Failure {
    Pending(io::ErrorKind),
    Reported,
}

impl Outbound {
    fn pending(&self) -> usize {
        self.buf.len() - self.sent
    }
}

/// Bytes moved and when the last one moved, read by the idle watchdog.
pub struct Activity {
    start: Instant,
    last_nanos: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_nanos: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let nanos = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_nanos.store(nanos, Ordering::Relaxed);
    }

    /// When a byte last moved in either direction (or the connection began).
    pub fn last(&self) -> Instant {
        self.start + Duration::from_nanos(self.last_nanos.load(Ordering::Relaxed))
    }

    pub fn bytes_in(&self) -> u64 {
        self.bytes_in.load(Ordering::Relaxed)
    }

    pub fn bytes_out(&self) -> u64 {
        self.bytes_out.load(Ordering::Relaxed)
    }
}

/// The text a guest sees for a failed socket operation: the error kind
/// only, never a host backtrace or internal detail.
fn failure(kind: io::ErrorKind) -> StreamError {
    StreamError::LastOperationFailed(wasmtime::format_err!("{}", io::Error::from(kind)))
}

fn is_reset(kind: io::ErrorKind) -> bool {
    matches!(
        kind,
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

impl Socket {
    pub fn new(tcp: TcpStream) -> Arc<Socket> {
        Arc::new(Socket {
            tcp,
            out: Mutex::default(),
            activity: Activity::new(),
            reset: AtomicBool::new(false),
            read_eof: AtomicBool::new(false),
        })
    }

    pub fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.tcp.local_addr()
    }

    pub fn activity(&self) -> &Activity {
        &self.activity
    }

    /// Whether the peer reset the connection or a socket operation failed.
    pub fn was_reset(&self) -> bool {
        self.reset.load(Ordering::Relaxed)
    }

    fn note_error(&self, kind: io::ErrorKind) {
        if is_reset(kind) {
            self.reset.store(true, Ordering::Relaxed);
        }
    }

    fn outbound(&self) -> MutexGuard<'_, Outbound> {
        // Nothing panics while holding this lock, but a poisoned lock must
        // not take the host down either.
        self.out.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hand as much pending output to the kernel as it takes without
    /// blocking.
    fn push(&self, out: &mut Outbound) {
        while out.pending() > 0 && out.failed.is_none() {
            match self.tcp.try_write(&out.buf[out.sent..]) {
                Ok(n) => {
                    out.sent += n;
                    self.activity
                        .bytes_out
                        .fetch_add(n as u64, Ordering::Relaxed);
                    self.activity.touch();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    self.note_error(e.kind());
                    out.failed = Some(Failure::Pending(e.kind()));
                }
            }
        }
        if out.pending() == 0 || out.failed.is_some() {
            out.sent = 0;
            out.flushing = false;
            // Don't let one burst pin 64 KiB to an idle connection.
            if out.buf.capacity() > 4096 {
                out.buf = Vec::new();
            } else {
                out.buf.clear();
            }
        }
    }

    /// Report a failed write once, then `closed`, as `wasi:io` specifies.
    fn check_failed(out: &mut Outbound) -> StreamResult<()> {
        match out.failed {
            None if out.shut => Err(StreamError::Closed),
            None => Ok(()),
            Some(Failure::Pending(kind)) => {
                out.failed = Some(Failure::Reported);
                Err(failure(kind))
            }
            Some(Failure::Reported) => Err(StreamError::Closed),
        }
    }

    /// Wait until every byte of pending output is with the kernel (or the
    /// socket failed).
    pub async fn flush(&self) {
        loop {
            {
                let mut out = self.outbound();
                self.push(&mut out);
                if out.pending() == 0 {
                    return;
                }
            }
            if self.tcp.writable().await.is_err() {
                return;
            }
        }
    }

    /// Send FIN: the client sees end of stream, our read side stays open.
    pub fn shutdown_write(&self) {
        let mut out = self.outbound();
        if !out.shut {
            out.shut = true;
            let _ = socket2::SockRef::from(&self.tcp).shutdown(Shutdown::Write);
        }
    }

    /// Read and discard what the client still sends until it closes its
    /// side or `max` passes. Closing a socket with unread input makes the
    /// kernel send RST, which can destroy the response still in flight to
    /// the client; draining first (nginx's "lingering close") lets a
    /// finished handler's last bytes arrive.
    pub async fn linger(&self, max: Duration) {
        if self.read_eof.load(Ordering::Relaxed) {
            return;
        }
        let drain = async {
            // On the heap: an array here would be part of every
            // connection task's state for its whole life, idle or not.
            let mut scratch = vec![0u8; 4096];
            loop {
                if self.tcp.readable().await.is_err() {
                    return;
                }
                match self.tcp.try_read(&mut scratch) {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
            }
        };
        let _ = tokio::time::timeout(max, drain).await;
    }

    /// Throw away output the guest has not had flushed, after a trap or a
    /// limit breach.
    pub fn discard_output(&self) {
        let mut out = self.outbound();
        out.buf = Vec::new();
        out.sent = 0;
    }

    /// Make the kernel reset the connection on close instead of sending FIN,
    /// used when a connection is cut off rather than finished.
    pub fn set_linger_zero(&self) {
        let _ = socket2::SockRef::from(&self.tcp).set_linger(Some(Duration::ZERO));
    }
}

/// The guest's `input-stream`: bytes from the client.
pub struct SocketInput {
    socket: Arc<Socket>,
    /// The client sent FIN (or the read side failed): every later read is
    /// `closed`.
    eof: bool,
}

impl SocketInput {
    pub fn new(socket: Arc<Socket>) -> Self {
        SocketInput { socket, eof: false }
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for SocketInput {
    /// Ready when input arrived (or the client closed). While it waits, the
    /// guest's unsent output keeps going to the socket as the client makes
    /// room, as a kernel send buffer would: a handler that wrote without
    /// flushing and now waits for the client's next request must not leave
    /// its last response stuck in our buffer.
    async fn ready(&mut self) {
        if self.eof {
            return;
        }
        let socket = &self.socket;
        loop {
            let unsent = {
                let mut out = socket.outbound();
                socket.push(&mut out);
                out.pending() > 0 && out.failed.is_none()
            };
            if !unsent {
                let _ = socket.tcp.readable().await;
                return;
            }
            tokio::select! {
                _ = socket.tcp.readable() => return,
                _ = socket.tcp.writable() => {}
            }
        }
    }
}

#[wasmtime_wasi::async_trait]
impl InputStream for SocketInput {
    fn read(&mut self, size: usize) -> StreamResult<Bytes> {
        if self.eof {
            return Err(StreamError::Closed);
        }
        if size == 0 {
            return Ok(Bytes::new());
        }
        // The guest chooses `size` (a u64); never allocate more than the
        // bound whatever it asks for. The outer `try_io` returns at once,
        // allocating nothing, while tokio knows the socket is not readable.
        //
        // A short read drained the socket, so it also clears tokio's
        // readiness (as tokio's own `AsyncRead` does): the guest's next read
        // then waits for epoll instead of paying a `recvfrom` that can only
        // say EAGAIN. The closure reports it as `WouldBlock` so that tokio
        // clears the readiness it saw *before* the read; an event that
        // arrives meanwhile has a newer tick and survives, and the closed
        // state is never cleared, so no wake-up is lost.
        let tcp = &self.socket.tcp;
        let want = size.min(BUFFER_LIMIT);
        let mut drained = None;
        let read = tcp.try_io(Interest::READABLE, || {
            let mut buf = BytesMut::with_capacity(want);
            let n = tcp.try_read_buf(&mut buf)?;
            if n > 0 && n < want {
                drained = Some(buf);
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(buf)
        });
        let read = drained.map_or(read, Ok);
        match read {
            Ok(buf) if buf.is_empty() => {
                self.eof = true;
                self.socket.read_eof.store(true, Ordering::Relaxed);
                Err(StreamError::Closed)
            }
            Ok(buf) => {
                let activity = &self.socket.activity;
                activity
                    .bytes_in
                    .fetch_add(buf.len() as u64, Ordering::Relaxed);
                activity.touch();
                Ok(buf.freeze())
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Bytes::new()),
            Err(e) => {
                self.eof = true;
                self.socket.note_error(e.kind());
                Err(failure(e.kind()))
            }
        }
    }

    /// Wait for data without the default's cap on empty wake-ups: readiness
    /// can be spurious, and a guest waiting for a quiet client must simply
    /// keep waiting (the idle timeout ends it, not a trap).
    ///
    /// Reads first and waits only if nothing was there: `try_read` costs no
    /// system call while tokio knows the socket is not readable, and data
    /// that is already waiting (pipelined requests, bulk transfers) then
    /// needs no readiness future at all.
    async fn blocking_read(&mut self, size: usize) -> StreamResult<Bytes> {
        loop {
            let bytes = self.read(size)?;
            if !bytes.is_empty() || size == 0 {
                return Ok(bytes);
            }
            self.ready().await;
        }
    }
}

/// The guest's `output-stream`: bytes to the client.
pub struct SocketOutput {
    socket: Arc<Socket>,
}

impl SocketOutput {
    pub fn new(socket: Arc<Socket>) -> Self {
        SocketOutput { socket }
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for SocketOutput {
    /// Ready when `check-write` would grant something (or report an
    /// error). Pushes pending bytes itself: nothing else drives the socket
    /// while the guest waits.
    async fn ready(&mut self) {
        let socket = &self.socket;
        loop {
            {
                let mut out = socket.outbound();
                socket.push(&mut out);
                let blocked = out.flushing || out.pending() >= BUFFER_LIMIT;
                if out.failed.is_some() || out.shut || !blocked {
                    return;
                }
            }
            if socket.tcp.writable().await.is_err() {
                return;
            }
        }
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for SocketOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        let socket = &self.socket;
        let mut out = socket.outbound();
        Socket::check_failed(&mut out)?;
        let permitted = if out.flushing {
            0
        } else {
            BUFFER_LIMIT - out.pending()
        };
        if bytes.len() > permitted {
            return Err(StreamError::trap(
                "write exceeds the permit granted by check-write",
            ));
        }
        let mut rest = &bytes[..];
        if out.pending() == 0 {
            // Common case: the socket takes it all straight from the guest's
            // bytes, with no copy into our buffer.
            while !rest.is_empty() {
                match socket.tcp.try_write(rest) {
                    Ok(n) => {
                        rest = &rest[n..];
                        socket
                            .activity
                            .bytes_out
                            .fetch_add(n as u64, Ordering::Relaxed);
                        socket.activity.touch();
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        socket.note_error(e.kind());
                        out.failed = Some(Failure::Reported);
                        return Err(failure(e.kind()));
                    }
                }
            }
        }
        out.buf.extend_from_slice(rest);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        let socket = &self.socket;
        let mut out = socket.outbound();
        Socket::check_failed(&mut out)?;
        socket.push(&mut out);
        if out.pending() > 0 {
            out.flushing = true;
        }
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        let socket = &self.socket;
        let mut out = socket.outbound();
        Socket::check_failed(&mut out)?;
        if out.pending() > 0 {
            socket.push(&mut out);
            Socket::check_failed(&mut out)?;
        }
        Ok(if out.flushing {
            0
        } else {
            BUFFER_LIMIT - out.pending()
        })
    }

    /// The request/response path (the SDK's `send()` for small replies) in
    /// one pass: the default goes through `write_ready` twice, and each
    /// `async` trait call allocates a future, even when the socket takes the
    /// bytes at once, which is nearly always.
    async fn blocking_write_and_flush(&mut self, bytes: Bytes) -> StreamResult<()> {
        // wasmtime-wasi refuses more than 4096 bytes before calling us;
        // anything above the buffer could never get a big enough permit.
        if bytes.len() > BUFFER_LIMIT {
            return Err(StreamError::trap("blocking-write-and-flush too large"));
        }
        while self.check_write()? < bytes.len() {
            self.ready().await;
        }
        self.write(bytes)?;
        match self.flush() {
            Ok(()) | Err(StreamError::Closed) => {}
            Err(e) => return Err(e),
        }
        // `check-write` reports 0 until the flush is complete.
        loop {
            match self.check_write() {
                Ok(0) => self.ready().await,
                Ok(_) | Err(StreamError::Closed) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Like the default but without its cap on empty wake-ups: a client that
    /// reads slowly is not an error (the idle timeout deals with one that
    /// never reads).
    async fn write_ready(&mut self) -> StreamResult<usize> {
        loop {
            self.ready().await;
            let n = self.check_write()?;
            if n > 0 {
                return Ok(n);
            }
        }
    }

    /// The guest dropped `output`: deliver what it wrote, then half-close so
    /// the client sees end of stream.
    async fn cancel(&mut self) {
        self.socket.flush().await;
        self.socket.shutdown_write();
    }
}
