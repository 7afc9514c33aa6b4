//! The `wasm-sockserver` binary: parse the command line, set up logging,
//! load the handler, bind, print the address, and serve until a signal
//! (SIGINT or SIGTERM stop it, SIGHUP reloads the handler).

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use clap::error::ErrorKind;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;
use wasm_sockserver::{Config, Server};

/// Keep glibc from giving its heap top back to the kernel after every large
/// free. Its default trim threshold (128 KiB) made each 64 KiB read buffer
/// shrink the heap on free and page-fault it back on the next read: 0.6
/// faults per 16 KiB round trip. Above 4 MiB of free space at the top of an
/// arena the heap is still trimmed; free memory below the top goes back
/// after a burst of connections through `wasm_sockserver::trim`.
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: called before any other thread exists; mallopt only sets a
    // tunable.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 4 << 20);
    }
}

/// Raise the soft open-file limit to the hard one, as Go's runtime does at
/// start and nginx's `worker_rlimit_nofile` allows: every connection holds
/// a descriptor, and the usual soft default of 1024 would stop the server
/// far below the default `--max-connections` of 10000. Returns the soft
/// limit in effect.
fn raise_open_file_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit.rlim_cur = limit.rlim_max;
        }
    }
    Some(limit.rlim_cur)
}

/// Descriptors the process needs besides one per connection: the listener,
/// epoll, the compiled-code cache, stdio and some slack.
const SPARE_DESCRIPTORS: u64 = 64;

fn main() -> ExitCode {
    // Routine connection errors (a client reset) must not capture a host
    // backtrace even when RUST_BACKTRACE=1 is set: it halves the connection
    // rate. Set before any thread starts, since the variable is read lazily.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    }
    tune_malloc();

    let config = match Config::try_parse() {
        Ok(config) => config,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            report(&one_line(&e.render().to_string()));
            return ExitCode::from(2);
        }
    };

    wasm_sockserver::logging::init();

    let result = serve(config);
    // Write out the queued log lines first, so they come before the error.
    wasm_sockserver::logging::flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(&format!("error: {}", one_line(&format!("{e:#}"))));
            ExitCode::FAILURE
        }
    }
}

/// Print the one line that says why the server exits. Unlike `eprintln!`,
/// which panics when stderr is a closed pipe (and turns exit code 2 or 1
/// into a panic's 101), a failed write is ignored: the exit code still
/// tells.
fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// tokio's multi-thread runtime, or a current-thread one when the process
/// may use only one CPU (pinned with `taskset`, or a one-CPU container
/// quota). With one CPU the multi-thread runtime still runs the acceptor on
/// the main thread and the connections on a lone worker, so every accept
/// hands work from one thread to the other; on one thread it does not.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Runtime::new()
    }
}

fn serve(config: Config) -> Result<()> {
    let runtime = runtime().context("failed to start the tokio runtime")?;
    let result = runtime.block_on(async {
        let server = Server::new(&config)?;
        tokio::spawn(wasm_sockserver::logging::report_drops());
        let listener = if config.reuse_port {
            wasm_sockserver::bind_reuse_port(config.listen)?
        } else {
            wasm_sockserver::bind(config.listen)?
        };
        // Install the signal handlers before announcing the address: a
        // signal that arrives after `listening on` must mean "shut down" or
        // "reload", never the default action of killing the process.
        let signals = Signals::install()?;
        if let Some(addr) = config.metrics {
            let metrics = wasm_sockserver::bind(addr).context("cannot serve metrics")?;
            let bound = metrics
                .local_addr()
                .context("cannot read the metrics listener's address")?;
            tracing::info!(addr = %bound, "metrics at http://{bound}/metrics");
            tokio::spawn(wasm_sockserver::metrics::serve(
                metrics,
                server.stats(),
                server.reloader(),
            ));
        }
        let mut hangup = signal(SignalKind::hangup()).context("cannot install a SIGHUP handler")?;
        let reloader = server.reloader();
        let stopping = CancellationToken::new();
        let no_more_reloads = stopping.clone();
        tokio::spawn(async move {
            // Each SIGHUP reloads once; signals that arrive during a reload
            // are merged into one more reload after it, which reads the
            // newest file. The outcome is logged either way. Reloads end
            // when shutdown begins: a compile then would only delay the exit.
            loop {
                tokio::select! {
                    () = no_more_reloads.cancelled() => return,
                    got = hangup.recv() => if got.is_none() { return },
                }
                tokio::select! {
                    () = no_more_reloads.cancelled() => return,
                    _ = reloader.reload() => {}
                }
            }
        });
        let addr = listener
            .local_addr()
            .context("cannot read the listener's address")?;
        // Only once every input has been accepted, so that bad input gets
        // its error line alone, not after a warning about the environment.
        check_open_file_limit(&config);
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "listening on {addr}").context("cannot write to stdout")?;
        stdout.flush().context("cannot write to stdout")?;
        drop(stdout);
        let shutdown = async move {
            signals.shutdown().await;
            stopping.cancel();
        };
        server.run(listener, shutdown).await
    });
    // A reload cut off by shutdown may still be compiling on a blocking
    // thread: exit without waiting for it.
    runtime.shutdown_timeout(Duration::ZERO);
    result
}

/// Raise the soft open-file limit, and warn when even the hard one is
/// below what `--max-connections` needs.
fn check_open_file_limit(config: &Config) {
    if let Some(limit) = raise_open_file_limit() {
        let needed = u64::from(config.max_connections) + SPARE_DESCRIPTORS;
        if limit < needed {
            tracing::warn!(
                limit,
                needed,
                "the open-file limit is below --max-connections: accepts beyond it back off \
                 until connections close (raise it with `ulimit -n`, or lower --max-connections)"
            );
        }
    }
}

/// SIGINT (Ctrl-C) and SIGTERM, registered up front.
struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    fn install() -> Result<Signals> {
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt())
                .context("cannot install a SIGINT handler")?,
            terminate: signal(SignalKind::terminate())
                .context("cannot install a SIGTERM handler")?,
        })
    }

    async fn next(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }

    /// Resolves on the first signal. A second one exits at once, without
    /// waiting for connections to drain.
    async fn shutdown(mut self) {
        self.next().await;
        tracing::info!("signal received: stopping (send another to exit at once)");
        tokio::spawn(async move {
            self.next().await;
            tracing::warn!("second signal: exiting without draining");
            wasm_sockserver::logging::exit(130);
        });
    }
}

/// Fold a multi-line message (clap's usage block, an error chain with
/// embedded newlines) into the one line a user reads, escaped as guest text
/// is: a validator's message can quote names from the module (an export
/// named with a terminal escape, say).
fn one_line(message: &str) -> String {
    let joined = message
        .lines()
        .map(str::trim)
        .filter(|line| {
            !line.is_empty()
                && !line.starts_with("Usage:")
                && !line.starts_with("For more information")
        })
        .collect::<Vec<_>>()
        .join(" ");
    wasm_sockserver::guest_log::sanitize(&joined, usize::MAX)
}
