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

use std::io::{BufWriter, IsTerminal};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};

use crate::stats::Stats;

/// Lines the queue holds before it drops. About 200 bytes each for a
/// connection's close line, so about 1.6 MB; guest lines are capped at
/// 4 KiB, which bounds the queue at about 34 MB. At 20,000 connections a
/// second, each logging its close line, it covers 0.4 s of stalled stderr.
pub const QUEUE_LINES: usize = 8192;

/// Bytes the writer thread gathers before a `write` to stderr. It writes
/// whenever the queue runs empty, so lines are not held back; under load it
/// writes many lines per system call.
const WRITE_BUFFER: usize = 64 * 1024;

/// How often dropped lines are looked for and reported.
const REPORT_EVERY: Duration = Duration::from_secs(1);

/// The writer thread's guard, dropped to flush the queue at exit. Global so
/// that [`exit`] can flush it on the way out of any code path.
static GUARD: Mutex<Option<WorkerGuard>> = Mutex::new(None);

/// Keeps the log sink alive; dropping it flushes what is queued (waiting at
/// most about a second for a stalled stderr).
pub struct Logging {
    dropped: ErrorCounter,
}

impl Drop for Logging {
    fn drop(&mut self) {
        flush();
    }
}

impl Logging {
    /// Lines dropped so far because the queue was full.
    pub fn dropped_lines(&self) -> u64 {
        self.dropped.dropped_lines() as u64
    }

    /// Count dropped lines every second, and report them in one warning
    /// once a second passes without more: a warning sent while the queue is
    /// still full would only be dropped too. If the warning is dropped all
    /// the same (stderr still stalled), it is tried again after the next
    /// quiet second, covering every line dropped since the last report.
    /// Runs until the future is dropped.
    pub fn report_drops(&self, stats: Arc<Stats>) -> impl Future<Output = ()> + Send + 'static {
        let dropped = self.dropped.clone();
        async move {
            let (mut counted, mut reported) = (0u64, 0u64);
            let mut every = tokio::time::interval(REPORT_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let now = dropped.dropped_lines() as u64;
                if now > counted {
                    stats.log_lines_dropped(now - counted);
                    counted = now;
                } else if now > reported {
                    tracing::warn!(
                        dropped = now - reported,
                        total = now,
                        "log lines dropped: stderr did not keep up"
                    );
                    // Still full (stderr stalled but nothing else logging)?
                    // Then this warning was dropped too: try again later.
                    if dropped.dropped_lines() as u64 == now {
                        reported = now;
                    }
                }
            }
        }
    }
}

/// Install the global `tracing` subscriber: `RUST_LOG` filtering (default
/// `info`), formatted lines on stderr through the queue, colours only on a
/// terminal.
pub fn init() -> Logging {
    let stderr = std::io::stderr();
    let ansi = stderr.is_terminal();
    let (writer, guard) = NonBlockingBuilder::default()
        .buffered_lines_limit(QUEUE_LINES)
        .lossy(true)
        .thread_name("log-writer")
        .finish(BufWriter::with_capacity(WRITE_BUFFER, stderr));
    let dropped = writer.error_counter();
    tracing_subscriber::fmt()
        .with_writer(writer)
        .with_ansi(ansi)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    *GUARD.lock().unwrap_or_else(|e| e.into_inner()) = Some(guard);
    Logging { dropped }
}

/// Write out what is queued, then exit with `code`. `std::process::exit`
/// runs no destructors, so without this the last lines (why it exited)
/// would be lost.
pub fn exit(code: i32) -> ! {
    flush();
    std::process::exit(code)
}

fn flush() {
    let guard = GUARD.lock().unwrap_or_else(|e| e.into_inner()).take();
    drop(guard);
}
