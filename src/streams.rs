//! The connection's socket as `wasi:io` streams: `input-stream` and
//! `output-stream` implemented directly on the tokio `TcpStream` with
//! readiness plus `try_read`/`try_write`. No task per stream, no pipe, and at
//! most [`BUFFER_LIMIT`] bytes held by the host per direction.

use std::cell::RefCell;
use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::Interest;
use tokio::net::TcpStream;
use wasmtime_wasi::p2::{InputStream, OutputStream, Pollable, StreamError, StreamResult};

/// The most the host holds for one connection in each direction: the largest
/// read it hands the guest, and the most unsent output it keeps. A guest that
/// writes to a client that never reads is told to wait (`check-write` = 0)
/// once this much is pending.
pub const BUFFER_LIMIT: usize = 64 * 1024;

/// A read that returned more than this is taken as bulk traffic: the next
/// read goes straight into a fresh buffer. Smaller ones go through
/// [`SCRATCH`].
const SMALL_READ: usize = 4096;

thread_local! {
    /// Where a connection that has been reading small messages reads next;
    /// the bytes are then copied out at their exact size. Reading a 64 B
    /// request straight into a fresh [`BUFFER_LIMIT`] buffer cost a 64 KiB
    /// `malloc` and `free` per read (glibc serves that size from the heap
    /// top and consolidates its fastbins first), about 2% of the
    /// instructions of a 64 B round trip. Bulk reads skip it: for them the
    /// copy would cost more than the allocation.
    static SCRATCH: RefCell<Box<[u8]>> =
        RefCell::new(vec![0u8; BUFFER_LIMIT].into_boxed_slice());
}

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
    /// The client sent FIN or the read side failed: every later read is
    /// `closed`.
    input_closed: AtomicBool,
    /// The last read was bulk (over [`SMALL_READ`]), so the next one reads
    /// into a fresh buffer rather than through [`SCRATCH`].
    input_bulk: AtomicBool,
    /// The guest's input and output streams have been dropped (their
    /// resource-table slots may now hold other streams).
    input_gone: AtomicBool,
    output_gone: AtomicBool,
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
    /// [`coarse_clock`] when the connection began.
    start_coarse: u64,
    /// Nanoseconds after `start_coarse` at which a byte last moved, rounded
    /// up by one tick of the coarse clock.
    last_nanos: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

/// A monotonic clock in nanoseconds at the kernel tick's resolution, and
/// that resolution. Every read and write stamps the idle clock, and
/// `CLOCK_MONOTONIC_COARSE` is a plain load from the vDSO where
/// `CLOCK_MONOTONIC` (`Instant`) also reads and scales the TSC; an idle
/// timeout measured in seconds needs no better than a few milliseconds.
#[cfg(target_os = "linux")]
fn coarse_clock() -> (u64, u64) {
    fn read(
        clock: libc::clockid_t,
        get: unsafe extern "C" fn(libc::clockid_t, *mut libc::timespec) -> libc::c_int,
    ) -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec to write; a clock that cannot be
        // read leaves it at zero.
        unsafe { get(clock, &mut ts) };
        (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
    }
    static RESOLUTION: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let resolution =
        *RESOLUTION.get_or_init(|| read(libc::CLOCK_MONOTONIC_COARSE, libc::clock_getres));
    (
        read(libc::CLOCK_MONOTONIC_COARSE, libc::clock_gettime),
        resolution,
    )
}

#[cfg(not(target_os = "linux"))]
fn coarse_clock() -> (u64, u64) {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let since = BASE.get_or_init(Instant::now).elapsed().as_nanos();
    (u64::try_from(since).unwrap_or(u64::MAX), 0)
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            start_coarse: coarse_clock().0,
            last_nanos: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
        }
    }

    fn received(&self, n: usize) {
        self.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
        self.touch();
    }

    fn sent(&self, n: usize) {
        self.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
        self.touch();
    }

    /// A byte moved now. The coarse clock lags the real time by up to one
    /// tick, so the stamp adds a tick: [`Activity::last`] is then never
    /// earlier than the real moment (the idle timeout never fires early)
    /// and at most two ticks later.
    fn touch(&self) {
        let (now, tick) = coarse_clock();
        let nanos = (now + tick).saturating_sub(self.start_coarse);
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
            input_closed: AtomicBool::new(false),
            input_bulk: AtomicBool::new(false),
            input_gone: AtomicBool::new(false),
            output_gone: AtomicBool::new(false),
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
                    self.activity.sent(n);
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
                // A client that keeps the socket full would otherwise keep
                // this loop from ever returning `Pending`: the timeout
                // below, the shutdown cut-off and every other connection on
                // this thread would wait for it. Yield once tokio's budget
                // for this task is spent.
                tokio::task::consume_budget().await;
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

impl Socket {
    /// Whether the guest still holds the input stream made for this socket.
    pub fn input_live(&self) -> bool {
        !self.input_gone.load(Ordering::Relaxed)
    }

    /// Whether the guest still holds the output stream made for this socket.
    pub fn output_live(&self) -> bool {
        !self.output_gone.load(Ordering::Relaxed)
    }

    /// `input-stream.read`: what has arrived, at most `size` bytes (and at
    /// most [`BUFFER_LIMIT`]), possibly none; `closed` after the client's
    /// FIN.
    pub fn read(&self, size: usize) -> StreamResult<Vec<u8>> {
        if self.input_closed.load(Ordering::Relaxed) {
            return Err(StreamError::Closed);
        }
        if size == 0 {
            return Ok(Vec::new());
        }
        // The guest chooses `size` (a u64); never allocate more than the
        // bound whatever it asks for. `try_io` returns at once, allocating
        // nothing, while tokio knows the socket is not readable.
        //
        // A short read of a small message (a request) drained the socket:
        // it also clears tokio's readiness, as tokio's own `poll_read` does,
        // so the guest's next read waits for epoll instead of paying a
        // `recvfrom` that can only say EAGAIN (64 B ping-pong: 11% less
        // server CPU per round trip). The closure reports it as `WouldBlock`
        // so that tokio clears only the readiness it saw before the read;
        // an event that arrived since has a newer tick and survives.
        //
        // A short bulk read keeps the readiness, and the next read looks
        // again. A streaming client's next bytes arrive while the guest
        // echoes the last ones, but while other guests keep this thread
        // busy tokio asks epoll only every 61 polls, which can be 40 ms
        // when guests use their whole slice. Clearing here left such a
        // connection reading one TCP receive window per 40 ms, so TCP never
        // grew that window: in `bulk_streams_progress_fairly` up to 6 of 10
        // connections settled at 93 KiB per epoll round while the others
        // moved 500 MB.
        let tcp = &self.tcp;
        let want = size.min(BUFFER_LIMIT);
        let bulk = self.input_bulk.load(Ordering::Relaxed);
        let mut drained = None;
        let read = tcp.try_io(Interest::READABLE, || {
            let buf = if bulk {
                // `try_read_buf` reads into the spare capacity, so the
                // buffer is not zeroed first.
                let mut buf = Vec::with_capacity(want);
                tcp.try_read_buf(&mut buf)?;
                buf
            } else {
                SCRATCH.with_borrow_mut(|scratch| {
                    let n = tcp.try_read(&mut scratch[..want])?;
                    io::Result::Ok(scratch[..n].to_vec())
                })?
            };
            if !buf.is_empty() && buf.len() < want && buf.len() <= SMALL_READ {
                drained = Some(buf);
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(buf)
        });
        let read = drained.map_or(read, Ok);
        match read {
            Ok(buf) if buf.is_empty() => {
                self.input_closed.store(true, Ordering::Relaxed);
                self.read_eof.store(true, Ordering::Relaxed);
                Err(StreamError::Closed)
            }
            Ok(buf) => {
                self.input_bulk
                    .store(buf.len() > SMALL_READ, Ordering::Relaxed);
                self.activity.received(buf.len());
                Ok(buf)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Vec::new()),
            Err(e) => {
                self.input_closed.store(true, Ordering::Relaxed);
                self.note_error(e.kind());
                Err(failure(e.kind()))
            }
        }
    }

    /// Ready when input arrived (or the client closed). While it waits, the
    /// guest's unsent output keeps going to the socket as the client makes
    /// room, as a kernel send buffer would: a handler that wrote without
    /// flushing and now waits for the client's next request must not leave
    /// its last response stuck in our buffer.
    pub async fn input_ready(&self) {
        if self.input_closed.load(Ordering::Relaxed) {
            return;
        }
        loop {
            let unsent = {
                let mut out = self.outbound();
                self.push(&mut out);
                out.pending() > 0 && out.failed.is_none()
            };
            let waited = if unsent {
                tokio::select! {
                    ready = self.tcp.readable() => ready,
                    ready = self.tcp.writable() => match ready {
                        Ok(()) => continue,
                        Err(e) => Err(e),
                    },
                }
            } else {
                self.tcp.readable().await
            };
            if waited.is_err() {
                // The reactor that drives this socket is gone: nothing
                // will ever be read, so end the stream rather than let a
                // reader loop on a readiness that fails at once.
                self.input_closed.store(true, Ordering::Relaxed);
            }
            return;
        }
    }

    /// `input-stream.blocking-read`: wait for data without the default's
    /// cap on empty wake-ups: readiness can be spurious, and a guest waiting
    /// for a quiet client must simply keep waiting (the idle timeout ends
    /// it, not a trap).
    ///
    /// Reads first and waits only if nothing was there: `try_read` costs no
    /// system call while tokio knows the socket is not readable, and data
    /// that is already waiting (pipelined requests, bulk transfers) then
    /// needs no readiness future at all.
    pub async fn blocking_read(&self, size: usize) -> StreamResult<Vec<u8>> {
        if size == 0 {
            return self.await_input().await;
        }
        loop {
            let bytes = self.read(size)?;
            if !bytes.is_empty() {
                return Ok(bytes);
            }
            self.input_ready().await;
        }
    }

    /// `blocking-read` of nothing: wait until a read would find a byte (or
    /// the end), consuming nothing, as wasmtime-wasi's does. A guest may use
    /// it to wait for input; returning at once would make that a busy loop.
    /// Readiness alone is not enough (tokio reports a new socket readable
    /// before anything arrived), so a peek confirms it.
    async fn await_input(&self) -> StreamResult<Vec<u8>> {
        loop {
            if self.input_closed.load(Ordering::Relaxed) {
                return Err(StreamError::Closed);
            }
            self.input_ready().await;
            let mut byte = [std::mem::MaybeUninit::uninit()];
            let peeked = self.tcp.try_io(Interest::READABLE, || {
                socket2::SockRef::from(&self.tcp).peek(&mut byte)
            });
            match peeked {
                Ok(0) => {
                    self.input_closed.store(true, Ordering::Relaxed);
                    self.read_eof.store(true, Ordering::Relaxed);
                    return Err(StreamError::Closed);
                }
                Ok(_) => return Ok(Vec::new()),
                // `try_io` cleared the stale readiness: wait again.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    self.input_closed.store(true, Ordering::Relaxed);
                    self.note_error(e.kind());
                    return Err(failure(e.kind()));
                }
            }
        }
    }

    /// What `check-write` grants while `out` is locked.
    fn permit(out: &Outbound) -> usize {
        if out.flushing {
            0
        } else {
            BUFFER_LIMIT - out.pending()
        }
    }

    /// `output-stream.write`: hand `bytes` to the socket, keeping what it
    /// does not take yet (within the `check-write` permit).
    pub fn write(&self, bytes: &[u8]) -> StreamResult<()> {
        let mut out = self.outbound();
        Socket::check_failed(&mut out)?;
        if bytes.len() > Socket::permit(&out) {
            return Err(StreamError::trap(
                "write exceeds the permit granted by check-write",
            ));
        }
        let mut rest = bytes;
        if out.pending() == 0 {
            // Common case: the socket takes it all straight from the guest's
            // bytes, with no copy into our buffer.
            while !rest.is_empty() {
                match self.tcp.try_write(rest) {
                    Ok(n) => {
                        rest = &rest[n..];
                        self.activity.sent(n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        self.note_error(e.kind());
                        out.failed = Some(Failure::Reported);
                        return Err(failure(e.kind()));
                    }
                }
            }
        }
        out.buf.extend_from_slice(rest);
        Ok(())
    }

    /// `output-stream.flush`: start sending everything written; until it is
    /// all with the kernel, `check-write` grants nothing.
    pub fn start_flush(&self) -> StreamResult<()> {
        let mut out = self.outbound();
        Socket::check_failed(&mut out)?;
        self.push(&mut out);
        if out.pending() > 0 {
            out.flushing = true;
        }
        Ok(())
    }

    /// `output-stream.check-write`.
    pub fn check_write(&self) -> StreamResult<usize> {
        let mut out = self.outbound();
        Socket::check_failed(&mut out)?;
        if out.pending() > 0 {
            self.push(&mut out);
            Socket::check_failed(&mut out)?;
        }
        Ok(Socket::permit(&out))
    }

    /// Ready when `check-write` would grant something (or report an
    /// error). Pushes pending bytes itself: nothing else drives the socket
    /// while the guest waits.
    pub async fn output_ready(&self) {
        self.output_room(1).await
    }

    /// Ready when `check-write` would grant at least `need` bytes (at most
    /// [`BUFFER_LIMIT`]), or report an error.
    ///
    /// Waiting for the room the caller needs, not for any room at all, is
    /// what keeps a full buffer from busy-looping: with 62 KiB pending and
    /// 4 KiB to write, "any room" is true at once, the write still does not
    /// fit, and a caller that looped on it would never yield its worker.
    async fn output_room(&self, need: usize) {
        let need = need.clamp(1, BUFFER_LIMIT);
        loop {
            {
                let mut out = self.outbound();
                self.push(&mut out);
                if out.failed.is_some() || out.shut || Socket::permit(&out) >= need {
                    return;
                }
            }
            if let Err(e) = self.tcp.writable().await {
                // The reactor is gone: fail the stream rather than let the
                // caller loop on a readiness that fails at once.
                let mut out = self.outbound();
                if out.failed.is_none() {
                    out.failed = Some(Failure::Pending(e.kind()));
                }
                return;
            }
        }
    }

    /// Wait until `check-write` grants at least `len` bytes.
    pub async fn wait_for_permit(&self, len: usize) -> StreamResult<()> {
        // More than the buffer could never be granted.
        if len > BUFFER_LIMIT {
            return Err(StreamError::trap("blocking-write-and-flush too large"));
        }
        while self.check_write()? < len {
            self.output_room(len).await;
        }
        Ok(())
    }

    /// Wait until `check-write` grants something, without the default's
    /// cap on empty wake-ups: a client that reads slowly is not an error
    /// (the idle timeout deals with one that never reads).
    pub async fn write_ready(&self) -> StreamResult<usize> {
        loop {
            self.output_ready().await;
            let n = self.check_write()?;
            if n > 0 {
                return Ok(n);
            }
        }
    }

    /// `output-stream.blocking-flush`, as wasmtime-wasi defines it: flush,
    /// then wait until the stream can take more.
    pub async fn blocking_flush(&self) -> StreamResult<()> {
        self.start_flush()?;
        self.write_ready().await?;
        Ok(())
    }

    /// The end of `blocking-write-and-flush` (after [`Socket::write`]):
    /// flush and wait until every byte is with the kernel. A stream that
    /// has become closed is not an error here, as in wasmtime-wasi.
    pub async fn finish_write_and_flush(&self) -> StreamResult<()> {
        match self.start_flush() {
            Ok(()) | Err(StreamError::Closed) => {}
            Err(e) => return Err(e),
        }
        match self.write_ready().await {
            Ok(_) | Err(StreamError::Closed) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// The guest's `input-stream`: bytes from the client. The state lives in
/// the [`Socket`], which the host's direct stream calls use too.
pub struct SocketInput {
    socket: Arc<Socket>,
}

impl SocketInput {
    pub fn new(socket: Arc<Socket>) -> Self {
        SocketInput { socket }
    }
}

impl Drop for SocketInput {
    fn drop(&mut self) {
        self.socket.input_gone.store(true, Ordering::Relaxed);
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for SocketInput {
    async fn ready(&mut self) {
        self.socket.input_ready().await
    }
}

#[wasmtime_wasi::async_trait]
impl InputStream for SocketInput {
    fn read(&mut self, size: usize) -> StreamResult<Bytes> {
        self.socket.read(size).map(Bytes::from)
    }

    async fn blocking_read(&mut self, size: usize) -> StreamResult<Bytes> {
        self.socket.blocking_read(size).await.map(Bytes::from)
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

impl Drop for SocketOutput {
    fn drop(&mut self) {
        self.socket.output_gone.store(true, Ordering::Relaxed);
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for SocketOutput {
    async fn ready(&mut self) {
        self.socket.output_ready().await
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for SocketOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.socket.write(&bytes)
    }

    fn flush(&mut self) -> StreamResult<()> {
        self.socket.start_flush()
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        self.socket.check_write()
    }

    /// The request/response path in one pass: the default goes through
    /// `write_ready` twice, and each `async` trait call allocates a future.
    async fn blocking_write_and_flush(&mut self, bytes: Bytes) -> StreamResult<()> {
        // wasmtime-wasi refuses more than 4096 bytes before calling us.
        self.socket.wait_for_permit(bytes.len()).await?;
        self.socket.write(&bytes)?;
        self.socket.finish_write_and_flush().await
    }

    async fn write_ready(&mut self) -> StreamResult<usize> {
        self.socket.write_ready().await
    }

    /// The guest dropped `output`: deliver what it wrote, then half-close so
    /// the client sees end of stream.
    async fn cancel(&mut self) {
        self.socket.flush().await;
        self.socket.shutdown_write();
    }
}
