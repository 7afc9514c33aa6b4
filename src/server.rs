//! The listener side: `bind`, and the acceptor loop that takes a connection
//! permit, accepts, spawns one task per connection, backs off on resource
//! exhaustion and drains on shutdown.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::reload::Reloader;
use crate::runtime::Runtime;
use crate::stats::Stats;

/// The kernel backlog requested for the listening socket. At
/// `--max-connections` the acceptor stops accepting and new clients queue
/// here, so it must be large; the kernel caps it at `net.core.somaxconn`.
pub const BACKLOG: u32 = 65_535;

/// How long the acceptor sleeps after an accept error that means a resource
/// (descriptors, buffers, memory) ran out. Retrying at once would spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Transient accept errors (see [`is_transient`]) in a row that are retried
/// at once. One more, with no connection accepted in between, means the
/// error may not be about one connection (a seccomp filter or a security
/// module refusing every `accept` with EPERM, say): it is backed off and
/// warned about like any other, or the acceptor would spin on it; then the
/// count starts again.
const TRANSIENT_STREAK: u32 = 16;

/// At most one accept-error warning per this interval; the rest are counted
/// and reported with the next warning.
const ACCEPT_WARN_INTERVAL: Duration = Duration::from_secs(1);

/// Bind a listening TCP socket with a large backlog and `SO_REUSEADDR`.
///
/// Used by the binary and by tests and embedders alike; must be called from
/// within a tokio runtime.
pub fn bind(addr: SocketAddr) -> Result<TcpListener> {
    listen(addr, false)
}

/// [`bind`], plus `SO_REUSEPORT`: several processes (or several listeners in
/// one process) can then listen on the same address, and the kernel spreads
/// new connections among them by a hash of the client's address and port.
/// That is how one machine runs a server per core with its own accept queue,
/// as nginx's `reuseport` does, and how a new build starts next to an old one
/// before the old one is stopped. Every listener on the address must set it,
/// and all must belong to the same user.
pub fn bind_reuse_port(addr: SocketAddr) -> Result<TcpListener> {
    listen(addr, true)
}

fn listen(addr: SocketAddr, reuse_port: bool) -> Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .with_context(|| format!("cannot create a socket for {addr}"))?;
    socket
        .set_reuseaddr(true)
        .with_context(|| format!("cannot set SO_REUSEADDR for {addr}"))?;
    if reuse_port {
        socket
            .set_reuseport(true)
            .with_context(|| format!("cannot set SO_REUSEPORT for {addr}"))?;
    }
    socket
        .bind(addr)
        .with_context(|| format!("cannot listen on {addr}"))?;
    socket
        .listen(BACKLOG)
        .with_context(|| format!("cannot listen on {addr}"))
}

/// A loaded handler plus the server-wide settings: everything needed to
/// serve a listener.
pub struct Server {
    handler: Reloader,
    stats: Arc<Stats>,
    max_connections: usize,
    shutdown_timeout: Duration,
}

impl Server {
    /// Validate `config` and load its handler component. Fails, with a
    /// one-line reason, on any problem with the options or the module.
    pub fn new(config: &Config) -> Result<Server> {
        config.validate()?;
        let max_connections = config.max_connections as usize;
        let limits = config.limits();
        let runtime = match config.cache_dir() {
            Some(dir) => Runtime::load_cached(&config.module, &limits, max_connections, &dir)?,
            None => Runtime::load(&config.module, &limits, max_connections)?,
        };
        let stats = Arc::new(Stats::default());
        Ok(Server {
            handler: Reloader::new(
                runtime,
                config.module.clone(),
                config.cache_dir(),
                stats.clone(),
            ),
            stats,
            max_connections,
            shutdown_timeout: config.shutdown_timeout,
        })
    }

    /// The handle that reloads the handler component for new connections
    /// (the binary calls it on SIGHUP). Take it before [`Server::run`],
    /// which consumes the server; it keeps working while the server runs.
    pub fn reloader(&self) -> Reloader {
        self.handler.clone()
    }

    /// The server's live counters, shared with its connection tasks.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Accept and serve connections on `listener` until `shutdown`
    /// resolves; then stop accepting, let live connections finish for up to
    /// `--shutdown-timeout`, cut off the rest, and return.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<()> {
        let local = listener
            .local_addr()
            .context("cannot read the listener's address")?;
        tracing::info!(%local, max_connections = self.max_connections, "server started");
        let connections = TaskTracker::new();
        let cut_off = CancellationToken::new();

        tokio::select! {
            () = shutdown => {}
            () = self.accept_loop(&listener, &connections, &cut_off) => {}
            () = crate::trim::after_bursts(self.stats.clone(), self.max_connections) => {}
        }

        // Stop accepting at once: closing the listener makes new clients be
        // refused instead of waiting in a backlog nobody will read.
        drop(listener);
        connections.close();
        let live = connections.len();
        tracing::info!(live, timeout = ?self.shutdown_timeout, "shutting down: draining connections");
        if tokio::time::timeout(self.shutdown_timeout, connections.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                live = connections.len(),
                "shutdown timeout passed: cutting off connections"
            );
            cut_off.cancel();
            connections.wait().await;
        }
        // Let a slow stderr catch up first (at most a second), so that the
        // summary is not dropped from a full log queue.
        let _ = tokio::task::spawn_blocking(crate::logging::flush).await;
        tracing::info!(stats = %self.stats.summary(), "shutdown complete");
        Ok(())
    }

    /// Take a permit, then accept; never returns.
    async fn accept_loop(
        &self,
        listener: &TcpListener,
        connections: &TaskTracker,
        cut_off: &CancellationToken,
    ) {
        let permits = Arc::new(Semaphore::new(self.max_connections));
        let mut warnings = AcceptWarnings::default();
        let mut next_id: u64 = 1;
        let mut transient_streak = 0;
        loop {
            // The permit comes first: at the limit we stop calling accept and
            // the kernel's backlog holds new clients (backpressure, as in
            // ranch), rather than accepting and then refusing them.
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return; // The semaphore is never closed.
            };
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    self.stats.accept_error();
                    let transient = is_transient(&e);
                    transient_streak += u32::from(transient);
                    if transient && transient_streak <= TRANSIENT_STREAK {
                        tracing::debug!(error = %e, "accept failed; retrying");
                    } else {
                        warnings.warn(&e);
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        // A burst of real per-connection errors then gets
                        // its immediate retries again.
                        transient_streak = 0;
                    }
                    continue;
                }
            };
            transient_streak = 0;
            let _ = tcp.set_nodelay(true);
            let id = next_id;
            next_id += 1;
            // The permit moves into the task and is released when it ends,
            // whatever the handler did. The handler in service at accept
            // time serves the connection to its end, whatever reloads
            // happen meanwhile.
            connections.spawn(crate::connection::serve(
                self.handler.current(),
                self.stats.clone(),
                tcp,
                id,
                peer,
                cut_off.clone(),
                permit,
            ));
        }
    }
}

/// Accept errors that concern one half-open connection (it was aborted or
/// reset before we got to it, or a signal interrupted the call): retry at
/// once. Everything else, resource exhaustion first of all (EMFILE, ENFILE,
/// ENOBUFS, ENOMEM), is backed off.
fn is_transient(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::ECONNRESET
                | libc::EINTR
                | libc::EAGAIN
                | libc::EPROTO
                | libc::EPERM
                | libc::ENETDOWN
                | libc::ENETUNREACH
                | libc::EHOSTDOWN
                | libc::EHOSTUNREACH
                | libc::ENONET
                | libc::ENOPROTOOPT
                | libc::EOPNOTSUPP
                | libc::ETIMEDOUT
        )
    )
}

/// Rate-limits accept-error warnings: the first is logged at once, then at
/// most one per [`ACCEPT_WARN_INTERVAL`] with a count of those suppressed.
#[derive(Default)]
struct AcceptWarnings {
    last: Option<Instant>,
    suppressed: u64,
}

impl AcceptWarnings {
    fn warn(&mut self, error: &io::Error) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < ACCEPT_WARN_INTERVAL)
        {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(
            error = %error,
            backoff_ms = ACCEPT_BACKOFF.as_millis() as u64,
            suppressed = self.suppressed,
            "accept failed; backing off"
        );
        self.last = Some(now);
        self.suppressed = 0;
    }
}

/// Serve `listener` with the handler and options in `config` until
/// `shutdown` resolves. The caller binds (see [`bind`]), so tests can listen
/// on port 0.
pub async fn run(
    listener: TcpListener,
    config: &Config,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    Server::new(config)?.run(listener, shutdown).await
}

/// The address `listener` is bound to, for the `listening on` line.
pub fn local_addr(listener: &TcpListener) -> Result<SocketAddr> {
    listener
        .local_addr()
        .context("cannot read the listener's address")
}
