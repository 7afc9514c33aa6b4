//! The log sink: log lines go to stderr from a thread of their own, through
//! a bounded queue, so a slow or stalled reader of stderr never stalls the
//! threads that serve connections.
//!
//! Writing each line to stderr from the thread that logged it, as the plain
//! `fmt` subscriber does, makes every connection wait on whoever reads
//! stderr: once a pipe's 64 KiB fill up (a stuck log shipper, a terminal
//! paused with Ctrl-S, `| less`), the next log line blocks its tokio worker,
//! and with it every connection that worker serves. Here a full queue drops
//! lines instead, and counts them; Erlang's logger sheds load the same way.

use std::fs::File;
use std::io::{IsTerminal, Write};
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use tracing_subscriber::fmt::MakeWriter;

/// Lines the queue holds before it drops. About 200 bytes each for a
/// connection's close line, so about 1.6 MB; guest lines are capped at
/// 4 KiB and [`GUEST_QUEUE_LINES`] of them, about 25 MB. At 20,000 connections a
/// second, each logging its close line, it covers 0.4 s of stalled stderr.
pub const QUEUE_LINES: usize = 8192;

/// Lines of guest output (target `guest`) the queue takes before it drops
/// them: three quarters of it. The last quarter is kept for the host's own
/// lines (close lines, limit warnings, errors), so that guests printing
/// while stderr lags cannot crowd out the lines that say what happened to
/// them.
pub const GUEST_QUEUE_LINES: usize = QUEUE_LINES / 4 * 3;

/// Bytes the writer thread gathers into one `write` to stderr. It writes
/// whenever the queue runs empty, so lines are not held back; under load it
/// writes many lines per system call.
const BATCH: usize = 64 * 1024;

/// After each write, the writer thread sleeps this long before it looks at
/// the queue again, so that under load it wakes about a thousand times a
/// second and writes what gathered, instead of being woken (and taking the
/// CPU from a serving thread) for every line. An idle server's writer
/// sleeps in the queue and costs nothing.
const LINGER: Duration = Duration::from_millis(1);

/// How long a flush at exit waits for a stalled stderr before giving up.
const FLUSH_WAIT: Duration = Duration::from_secs(1);

/// The writer thread's name.
const WRITER: &str = "log-writer";

/// How often dropped lines are looked for and reported.
const REPORT_EVERY: Duration = Duration::from_secs(1);

enum Msg {
    Line(Vec<u8>),
    /// Write out everything queued before this, then answer.
    Flush(SyncSender<()>),
}

/// The process's one log queue: [`init`] creates it.
static QUEUE: OnceLock<Queue> = OnceLock::new();

/// Whether the writer thread runs (a flush has nobody to answer it
/// otherwise).
static WRITING: AtomicBool = AtomicBool::new(false);

/// Lines dropped: the queue was full, or stderr refused them.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// The sending side, handed to the `fmt` subscriber as its writer.
struct Queue {
    tx: SyncSender<Msg>,
    /// Lines queued and not yet taken by the writer thread.
    queued: AtomicUsize,
}

/// One event's writer: `fmt` formats an event, then writes it with one
/// `write_all`, which becomes one queued line, unless the queue already
/// holds `limit` lines.
struct LineWriter {
    queue: &'static Queue,
    limit: usize,
}

impl Write for LineWriter {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let queue = self.queue;
        // Counted before the send, so the writer never takes a line the
        // count does not hold yet.
        let ahead = queue.queued.fetch_add(1, Ordering::Relaxed);
        if ahead >= self.limit || queue.tx.try_send(Msg::Line(line.to_vec())).is_err() {
            queue.queued.fetch_sub(1, Ordering::Relaxed);
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The `MakeWriter` for the global queue.
struct ToQueue(&'static Queue);

impl<'a> MakeWriter<'a> for ToQueue {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> LineWriter {
        LineWriter {
            queue: self.0,
            limit: QUEUE_LINES,
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> LineWriter {
        let guest_output =
            meta.target() == crate::guest_log::TARGET && *meta.level() == tracing::Level::INFO;
        let limit = if guest_output {
            GUEST_QUEUE_LINES
        } else {
            QUEUE_LINES
        };
        LineWriter {
            queue: self.0,
            limit,
        }
    }
}

/// Install the global `tracing` subscriber: `RUST_LOG` filtering (default
/// `info`), formatted lines on stderr through the queue, colours only on a
/// terminal; and a panic hook that logs through it too (the default hook
/// writes to stderr from the panicking thread). Call once, before anything
/// logs. Returns `false` if it was called before, or if another global
/// subscriber (or a `log` logger) is installed: that one stays in charge.
pub fn init() -> bool {
    let ansi = std::io::stderr().is_terminal();
    let mut receiver = None;
    let queue = QUEUE.get_or_init(|| {
        let (tx, rx) = sync_channel(QUEUE_LINES);
        receiver = Some(rx);
        Queue {
            tx,
            queued: AtomicUsize::new(0),
        }
    });
    let Some(rx) = receiver else {
        return false;
    };
    let spawned = std::thread::Builder::new()
        .name(WRITER.into())
        .spawn(move || write_lines(rx, queue));
    let installed = if spawned.is_ok() {
        tracing_subscriber::fmt()
            .with_writer(ToQueue(queue))
            .with_ansi(ansi)
            .with_env_filter(filter())
            .try_init()
    } else {
        // No thread to drain a queue: write from the logging threads.
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .with_env_filter(filter())
            .try_init()
    };
    if installed.is_err() {
        return false;
    }
    WRITING.store(spawned.is_ok(), Ordering::Relaxed);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !tracing::enabled!(tracing::Level::ERROR) {
            return previous(info);
        }
        tracing::error!("panic: {}", info.to_string().replace('\n', " "));
        // The process may be about to end: write the line out now (unless
        // the writer itself panicked).
        if std::thread::current().name() != Some(WRITER) {
            flush();
        }
    }));
    true
}

fn filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into())
}

/// The writer thread: wait for a line, gather what is queued into a batch,
/// write it to stderr, linger, repeat. Writes go to file descriptor 2
/// directly, not through `std::io::stderr()`, whose lock a stalled write
/// would hold against everyone else printing to stderr.
fn write_lines(rx: Receiver<Msg>, queue: &Queue) {
    // SAFETY: descriptor 2 stays open for the life of the process; the
    // ManuallyDrop keeps this File from closing it.
    let mut stderr = ManuallyDrop::new(unsafe { File::from_raw_fd(2) });
    let mut batch = Vec::with_capacity(BATCH);
    let mut lines = 0u64;
    let mut write_out = |batch: &mut Vec<u8>, lines: &mut u64| {
        let lost = write_batch(&mut stderr, batch);
        DROPPED.fetch_add(lost.min(*lines), Ordering::Relaxed);
        batch.clear();
        *lines = 0;
    };
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(msg) = next {
            match msg {
                Msg::Line(line) => {
                    queue.queued.fetch_sub(1, Ordering::Relaxed);
                    batch.extend_from_slice(&line);
                    lines += 1;
                    if batch.len() >= BATCH {
                        write_out(&mut batch, &mut lines);
                    }
                }
                Msg::Flush(done) => {
                    write_out(&mut batch, &mut lines);
                    let _ = done.try_send(());
                }
            }
            next = rx.try_recv().ok();
        }
        write_out(&mut batch, &mut lines);
        std::thread::sleep(LINGER);
    }
}

/// Write `batch` to stderr; returns how many of its lines were not
/// written. Stderr may have been left non-blocking by whoever started us:
/// then wait until it takes more, as a blocking write would.
fn write_batch(stderr: &mut File, batch: &[u8]) -> u64 {
    let mut rest = batch;
    while !rest.is_empty() {
        match stderr.write(rest) {
            Ok(0) => break,
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let mut fd = libc::pollfd {
                    fd: 2,
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: poll reads and writes only the one pollfd given.
                unsafe { libc::poll(&mut fd, 1, -1) };
            }
            Err(_) => break,
        }
    }
    if rest.is_empty() {
        return 0;
    }
    // Lines not written at all, plus the one cut short.
    rest.iter().filter(|b| **b == b'\n').count().max(1) as u64
}

/// Lines this process has dropped so far because the queue was full or
/// stderr refused them.
pub fn dropped_lines() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Report dropped lines in one warning once a second passes without more
/// and the queue has room again: a warning sent while it is still full
/// would only be dropped too. Runs until the future is dropped.
pub async fn report_drops() {
    let (mut seen, mut reported) = (0u64, 0u64);
    let mut every = tokio::time::interval(REPORT_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let now = dropped_lines();
        let full = QUEUE
            .get()
            .is_some_and(|q| q.queued.load(Ordering::Relaxed) >= QUEUE_LINES);
        if now != seen || full {
            seen = now;
            continue;
        }
        if now > reported {
            tracing::warn!(
                dropped = now - reported,
                total = now,
                "log lines dropped: stderr did not keep up"
            );
            reported = now;
        }
    }
}

/// Write out what is queued, waiting at most a second for a stalled
/// stderr. Nothing is printed if it gives up.
pub fn flush() {
    let Some(queue) = QUEUE.get().filter(|_| WRITING.load(Ordering::Relaxed)) else {
        return;
    };
    let deadline = Instant::now() + FLUSH_WAIT;
    let (done, wait) = sync_channel(1);
    let mut msg = Msg::Flush(done);
    loop {
        match queue.tx.try_send(msg) {
            Ok(()) => break,
            Err(TrySendError::Full(back)) if Instant::now() < deadline => {
                msg = back;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return,
        }
    }
    let _ = wait.recv_timeout(deadline.saturating_duration_since(Instant::now()));
}

/// Write out what is queued (see [`flush`]), then exit with `code`.
/// `std::process::exit` runs no destructors, so without this the last
/// lines (why it exited) would be lost.
pub fn exit(code: i32) -> ! {
    flush();
    std::process::exit(code)
}
