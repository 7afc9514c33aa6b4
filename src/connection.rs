//! One connection: a fresh Store, the socket wrapped as `wasi:io` streams,
//! the `handle` call raced against the idle, lifetime and shutdown clocks,
//! and one log line with the outcome.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use wasmtime::component::{Resource, ResourceTable, ResourceTableError};
use wasmtime::{Store, Trap, UpdateDeadline};
use wasmtime_wasi::p2::{DynInputStream, DynOutputStream};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::guest_log::GuestLog;
use crate::hostcalls::SocketStreams;
use crate::limits::{self, CpuMeter, LimitKind, Limiter, Limits};
use crate::runtime::{Pulse, Runtime};
use crate::stats::{OutcomeKind, Stats};
use crate::streams::{Socket, SocketInput, SocketOutput};

/// What a handler learns about its connection through the `connection`
/// resource.
pub struct ConnectionInfo {
    pub id: u64,
    pub peer: SocketAddr,
    pub local: LocalAddr,
}

/// The connection's local address, as the guest's `local-address` sees it.
pub enum LocalAddr {
    Known(SocketAddr),
    /// Asked of the socket only when the guest wants it: most handlers
    /// never do, and it costs a `getsockname` per connection.
    Socket(Arc<Socket>),
}

impl LocalAddr {
    fn get(&self) -> SocketAddr {
        match self {
            LocalAddr::Known(addr) => *addr,
            LocalAddr::Socket(socket) => socket
                .local_addr()
                .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
        }
    }
}

/// The data of one connection's Store.
pub struct HostState {
    wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    /// The connection's socket and which table slots hold its streams, for
    /// the direct stream calls ([`crate::hostcalls`]); `None` when the
    /// handler runs on other streams.
    pub(crate) socket: Option<SocketStreams>,
    limiter: Limiter,
    pub(crate) cpu: CpuMeter,
    /// Set when the CPU budget ran out, so the resulting interrupt is
    /// reported as the `cpu` limit.
    cpu_exhausted: bool,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl crate::bindings::TypesHost for HostState {}

impl crate::bindings::HostConnection for HostState {
    fn id(&mut self, conn: Resource<ConnectionInfo>) -> wasmtime::Result<u64> {
        Ok(self.table.get(&conn)?.id)
    }

    fn peer_address(&mut self, conn: Resource<ConnectionInfo>) -> wasmtime::Result<String> {
        Ok(self.table.get(&conn)?.peer.to_string())
    }

    fn local_address(&mut self, conn: Resource<ConnectionInfo>) -> wasmtime::Result<String> {
        Ok(self.table.get(&conn)?.local.get().to_string())
    }

    fn drop(&mut self, conn: Resource<ConnectionInfo>) -> wasmtime::Result<()> {
        self.table.delete(conn)?;
        Ok(())
    }
}

/// How a connection ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `handle` returned `ok`.
    Ok,
    /// `handle` returned `err(msg)`.
    Err(String),
    /// The guest trapped; the first line of the trap message.
    Trap(String),
    /// A limit ended the connection.
    Limit(LimitKind),
    /// The client reset the connection.
    ClientReset,
    /// Server shutdown cut the connection off.
    Cancelled,
    /// The host could not set the connection up.
    Failed(String),
}

impl Outcome {
    pub fn kind(&self) -> OutcomeKind {
        match self {
            Outcome::Ok => OutcomeKind::Ok,
            Outcome::Err(_) => OutcomeKind::Err,
            Outcome::Trap(_) => OutcomeKind::Trap,
            Outcome::Limit(_) => OutcomeKind::Limit,
            Outcome::ClientReset => OutcomeKind::ClientReset,
            Outcome::Cancelled => OutcomeKind::Cancelled,
            Outcome::Failed(_) => OutcomeKind::Failed,
        }
    }

    /// Whether the handler finished on its own terms, so what it wrote is
    /// delivered before the socket closes.
    fn finished(&self) -> bool {
        matches!(self, Outcome::Ok | Outcome::Err(_))
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind().name())
    }
}

/// The data of connection `id`'s Store: a WASI context that grants nothing
/// (no preopens, environment, arguments or sockets; stdout and stderr go to
/// the log), the per-connection limits and the CPU meter.
fn host_state(limits: &Limits, pulse: Arc<Pulse>, id: u64) -> HostState {
    let (stdout, stderr) = GuestLog::pair(id, limits::GUEST_LOG_LINES);
    let wasi = WasiCtxBuilder::new()
        .stdout(stdout)
        .stderr(stderr)
        .max_random_size(limits::MAX_RANDOM_BYTES)
        .build();
    let mut table = ResourceTable::new();
    table.set_max_capacity(limits::MAX_TABLE_ENTRIES);
    let cpu = CpuMeter::new(limits.max_cpu, pulse);
    HostState {
        wasi,
        table,
        socket: None,
        limiter: Limiter::new(limits, &cpu),
        cpu,
        cpu_exhausted: false,
    }
}

/// Build the Store for one connection: its [`HostState`], the limiter, the
/// host-call fuel and handle caps, and the epoch callback that charges and
/// yields.
fn new_store(runtime: &Runtime, id: u64) -> Store<HostState> {
    let state = host_state(runtime.limits(), runtime.pulse.clone(), id);
    let mut store = Store::new(&runtime.engine, state);
    store.limiter(|state| &mut state.limiter);
    store.set_hostcall_fuel(limits::HOSTCALL_FUEL);
    store.set_max_component_handles(limits::MAX_TABLE_ENTRIES);
    store.epoch_deadline_callback(|mut cx| {
        let state = cx.data_mut();
        state.cpu.check_in();
        if state.cpu.exhausted() {
            state.cpu_exhausted = true;
            return Err(Trap::Interrupt.into());
        }
        if state.cpu.running_for() < limits::YIELD_AFTER {
            return Ok(UpdateDeadline::Continue(1));
        }
        state.cpu.yielding();
        Ok(UpdateDeadline::YieldCustom(
            1,
            Box::pin(tokio::task::yield_now()),
        ))
    });
    // Must be set before instantiating, or start functions trap at once.
    store.set_epoch_deadline(1);
    store
}

/// Instantiate the handler and run `handle` on the connection's socket to
/// completion, classifying how it ended. Dropping this future (idle,
/// lifetime, shutdown) drops the Store and with it the guest.
async fn call_handler(
    runtime: &Runtime,
    stats: &Stats,
    socket: &Arc<Socket>,
    info: ConnectionInfo,
) -> Outcome {
    let input = Box::new(SocketInput::new(socket.clone()));
    let output = Box::new(SocketOutput::new(socket.clone()));
    let outcome = run(runtime, stats, info, input, output, Some(socket.clone())).await;
    match outcome {
        // A handler that gave up because the client reset the connection
        // did nothing wrong. (Only the handler's own streams set the reset
        // flag, so a failure before `handle` never needs remapping.)
        Outcome::Err(_) | Outcome::Trap(_) if socket.was_reset() => Outcome::ClientReset,
        outcome => outcome,
    }
}

/// Instantiate the handler in a fresh Store and run `handle` on any pair of
/// `wasi:io` streams, with the runtime's memory, CPU and table limits. For
/// embedders that carry connections over something other than a plain
/// `TcpStream`, and for the micro benchmark, which measures the sandbox
/// alone with in-memory streams.
///
/// Unlike [`serve_stream`] it runs no idle or lifetime clock (drop the
/// future to cut the guest off), records no outcome in `stats` (it only
/// keeps the live-Store gauge), and cannot tell a client reset from a
/// handler error: that needs the socket, so only `serve_stream` reports
/// [`Outcome::ClientReset`].
pub async fn run_handler(
    runtime: &Runtime,
    stats: &Stats,
    info: ConnectionInfo,
    input: DynInputStream,
    output: DynOutputStream,
) -> Outcome {
    run(runtime, stats, info, input, output, None).await
}

/// [`run_handler`], plus the socket behind `input` and `output` when they
/// are a connection's, so the guest's calls on them can skip the resource
/// table.
async fn run(
    runtime: &Runtime,
    stats: &Stats,
    info: ConnectionInfo,
    input: DynInputStream,
    output: DynOutputStream,
    socket: Option<Arc<Socket>>,
) -> Outcome {
    // The gauge is created first so it is dropped after the Store.
    let _store_gauge = stats.store_created();
    let mut store = new_store(runtime, info.id);
    let table = &mut store.data_mut().table;
    let handles = (|| -> Result<_, ResourceTableError> {
        Ok((table.push(info)?, table.push(input)?, table.push(output)?))
    })();
    let Ok((conn, input, output)) = handles else {
        return Outcome::Failed("resource table full before the call".into());
    };
    store.data_mut().socket = socket.map(|socket| SocketStreams {
        socket,
        input: input.rep(),
        output: output.rep(),
    });
    // Start functions and `handle` both run guest code: charge both, in one
    // measured future, so that the yield decision's "running without
    // waiting" clock does not restart between them.
    let meter = store.data().cpu.clone();
    let run = async {
        let instance = runtime
            .pre
            .instantiate_async(&mut store)
            .await
            .map_err(|e| (e, Phase::Instantiate))?;
        instance
            .sockserver_handler_handler()
            .call_handle(&mut store, conn, input, output)
            .await
            .map_err(|e| (e, Phase::Handle))
    };
    match meter.measure(run).await {
        Ok(Ok(())) => Outcome::Ok,
        Ok(Err(msg)) => Outcome::Err(crate::guest_log::sanitize(&msg, 256)),
        Err((e, phase)) => classify(store.data(), e, phase),
    }
}

/// Where the guest was when its run ended in an error.
#[derive(Clone, Copy, Debug)]
enum Phase {
    /// Instantiating: start functions run guest code, and the pool and
    /// the limits can refuse an instance.
    Instantiate,
    /// Inside `handle`.
    Handle,
}

/// Turn an error from instantiating or calling the guest into an outcome:
/// which limit caused it, a trap with its message, or a host failure.
fn classify(state: &HostState, error: wasmtime::Error, phase: Phase) -> Outcome {
    if state.cpu_exhausted {
        return Outcome::Limit(LimitKind::Cpu);
    }
    if state.limiter.out_of_memory() {
        return Outcome::Limit(LimitKind::Memory);
    }
    // The host's resource table and the component's handle table are both
    // capped at MAX_TABLE_ENTRIES; wasmtime reports the latter only as text,
    // in the root cause (the chain also holds the wasm backtrace, whose
    // function names the guest chose). The table's other errors (a
    // resource dropped while it has children, a handle of the wrong type)
    // are the guest's bugs: traps.
    let handle_limit = error
        .root_cause()
        .to_string()
        .contains("store handle limit exceeded");
    let table_full = matches!(
        error.downcast_ref::<ResourceTableError>(),
        Some(ResourceTableError::Full)
    );
    if handle_limit || table_full {
        return Outcome::Limit(LimitKind::Table);
    }
    // The full chain includes the wasm backtrace, whose function names the
    // guest chose: escaped like any guest text.
    tracing::debug!(
        error = %crate::guest_log::sanitize(&format!("{error:?}"), 64 * 1024),
        ?phase,
        "guest error details"
    );
    let trap = error.downcast_ref::<Trap>();
    let message = match trap {
        Some(trap) => trap.to_string(),
        None => error.root_cause().to_string(),
    };
    let first = crate::guest_log::sanitize(message.lines().next().unwrap_or(""), 256);
    match phase {
        Phase::Handle => Outcome::Trap(first),
        Phase::Instantiate if host_failure(&error) => {
            Outcome::Failed(format!("failed to instantiate the handler: {first}"))
        }
        // Start functions run guest code: their traps and their misuse of
        // a handle are the guest's fault, as they would be in `handle`.
        Phase::Instantiate => Outcome::Trap(format!("while instantiating: {first}")),
    }
}

/// Whether an instantiation failed for the host's reasons: a pool slot
/// not to be had, the host out of memory, or the kernel refusing a
/// mapping (wasmtime passes some of its `mmap` and `mprotect` errors on as
/// rustix's `Errno`, others as `io::Error`). Everything else that goes wrong while
/// instantiating comes from a start function (the `InstancePre` has
/// already checked the imports, and the limiter has spoken for
/// `--max-memory`).
fn host_failure(error: &wasmtime::Error) -> bool {
    error.is::<wasmtime::PoolConcurrencyLimitError>()
        || error.is::<wasmtime::OutOfMemory>()
        || error.is::<std::io::Error>()
        || error.is::<rustix::io::Errno>()
}

/// How long a finished connection keeps reading (and discarding) what the
/// client still sends before closing; see [`Socket::linger`].
const LINGER: Duration = Duration::from_secs(2);

/// Resolves when the connection has been idle (no byte either way) for
/// `idle`, or has lived for `lifetime`.
async fn watchdog(
    socket: &Socket,
    started: Instant,
    idle: Duration,
    lifetime: Option<Duration>,
) -> LimitKind {
    // A deadline too far away to represent is no deadline.
    let end_of_life = lifetime.and_then(|life| started.checked_add(life));
    loop {
        let idle_deadline = socket.activity().last().checked_add(idle);
        let now = Instant::now();
        if idle_deadline.is_some_and(|deadline| now >= deadline) {
            return LimitKind::Idle;
        }
        if end_of_life.is_some_and(|end| now >= end) {
            return LimitKind::Lifetime;
        }
        let next = match (idle_deadline, end_of_life) {
            (Some(idle), Some(end)) => idle.min(end),
            (Some(deadline), None) | (None, Some(deadline)) => deadline,
            (None, None) => return std::future::pending().await,
        };
        tokio::time::sleep_until(next.into()).await;
    }
}

/// How a connection ended, with its totals: what [`serve_stream`] returns.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Served {
    pub outcome: Outcome,
    /// The handler's own `err` message when it returned one but a limit
    /// (idle, lifetime) or shutdown then cut off the delivery of its reply:
    /// `outcome` says what ended the connection, this what the handler
    /// reported.
    pub handler_error: Option<String>,
    pub duration: Duration,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// Serve one TCP connection with `runtime` until it ends, count it in
/// `stats`, and report how it ended. Never fails: whatever the guest or the
/// client does becomes an [`Outcome`].
///
/// The acceptor calls this for every connection; an embedder that accepts
/// connections itself (and the benchmarks) can call it directly. `peer` is
/// the address `accept` returned (asking the socket again would cost a
/// system call per connection). `cancel` cuts the connection off (server
/// shutdown after the drain deadline).
pub async fn serve_stream(
    runtime: &Runtime,
    stats: &Stats,
    tcp: TcpStream,
    peer: SocketAddr,
    id: u64,
    cancel: &CancellationToken,
) -> Served {
    let started = Instant::now();
    let _open = stats.connection_opened();
    let socket = Socket::new(tcp);
    let limits = runtime.limits();
    let info = ConnectionInfo {
        id,
        peer,
        local: LocalAddr::Socket(socket.clone()),
    };

    let mut outcome = tokio::select! {
        outcome = call_handler(runtime, stats, &socket, info) => outcome,
        limit = watchdog(&socket, started, limits.idle_timeout, limits.max_lifetime) => Outcome::Limit(limit),
        () = cancel.cancelled() => Outcome::Cancelled,
    };

    let mut handler_error = None;
    if outcome.finished() {
        // Deliver what the handler wrote, still under the same clocks.
        let cut_off = tokio::select! {
            () = socket.flush() => {
                socket.shutdown_write();
                None
            }
            limit = watchdog(&socket, started, limits.idle_timeout, limits.max_lifetime) => {
                Some(Outcome::Limit(limit))
            }
            () = cancel.cancelled() => Some(Outcome::Cancelled),
        };
        if let Some(cut_off) = cut_off
            && let Outcome::Err(msg) = std::mem::replace(&mut outcome, cut_off)
        {
            handler_error = Some(msg);
        }
    }
    if outcome.finished() {
        tokio::select! {
            () = socket.linger(LINGER) => {}
            () = cancel.cancelled() => {}
        }
    } else {
        // A trap, a limit or shutdown cut the handler off: drop what it did
        // not get delivered and reset, so the client can tell this from a
        // finished exchange.
        socket.discard_output();
        socket.set_linger_zero();
    }

    let limit = match outcome {
        Outcome::Limit(limit) => Some(limit),
        _ => None,
    };
    stats.record(outcome.kind(), limit);
    Served {
        outcome,
        handler_error,
        duration: started.elapsed(),
        bytes_in: socket.activity().bytes_in(),
        bytes_out: socket.activity().bytes_out(),
    }
}

/// The acceptor's task for one connection: serve it, log the one line that
/// says how it ended, and release the connection permit.
pub(crate) async fn serve(
    runtime: Arc<Runtime>,
    stats: Arc<Stats>,
    tcp: TcpStream,
    id: u64,
    peer: SocketAddr,
    cancel: CancellationToken,
    _permit: tokio::sync::OwnedSemaphorePermit,
) {
    tracing::debug!(conn = id, %peer, "connection accepted");
    let Served {
        outcome,
        handler_error,
        duration,
        bytes_in,
        bytes_out,
    } = serve_stream(&runtime, &stats, tcp, peer, id, &cancel).await;
    let duration_ms = duration.as_secs_f64() * 1000.0;
    let generation = runtime.generation();
    // `limit` and `error` are recorded only when present. A handler's `err`
    // survives a limit or shutdown that cut its reply off.
    let (limit, error) = match &outcome {
        Outcome::Limit(limit) => (Some(*limit), handler_error.as_deref()),
        Outcome::Err(msg) | Outcome::Trap(msg) | Outcome::Failed(msg) => (None, Some(msg.as_str())),
        Outcome::Ok | Outcome::ClientReset | Outcome::Cancelled => (None, handler_error.as_deref()),
    };
    // Only a connection that ended without a limit or an error is `info`.
    let quiet = limit.is_none() && error.is_none();
    let (limit, error) = (
        limit.map(tracing::field::display),
        error.map(tracing::field::display),
    );
    if quiet {
        tracing::info!(conn = id, %peer, %outcome, duration_ms, bytes_in, bytes_out, generation, "connection closed")
    } else {
        tracing::warn!(conn = id, %peer, %outcome, limit, error, duration_ms, bytes_in, bytes_out, generation, "connection closed")
    }
    // After a reload, the last connection on the previous generation holds
    // its last reference. Dropping it resets every pool slot that held that
    // component's memory image (a system call each, up to
    // --max-connections), which must not stall this worker's other
    // connections.
    if let Some(last) = Arc::into_inner(runtime) {
        tokio::task::spawn_blocking(move || drop(last));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> HostState {
        host_state(&Limits::default(), Arc::default(), 1)
    }

    /// A start function that traps is the guest's fault: a trap, not the
    /// host's `failed`, which stays for the host's own reasons. (A start
    /// function that misuses a handle is tested end to end in
    /// `tests/all/start.rs`.)
    #[test]
    fn a_trap_while_instantiating_is_a_trap() {
        let trap = wasmtime::Error::from(Trap::UnreachableCodeReached);
        let outcome = classify(&state(), trap, Phase::Instantiate);
        assert!(
            matches!(&outcome, Outcome::Trap(m) if m.starts_with("while instantiating: ")
                && m.contains("unreachable")),
            "{outcome:?}"
        );
        let host_failures = [
            wasmtime::Error::from(std::io::Error::from_raw_os_error(libc::ENOMEM)),
            wasmtime::Error::from(rustix::io::Errno::NOMEM),
            wasmtime::Error::from(wasmtime::OutOfMemory::new(4096)),
        ];
        for error in host_failures {
            let error = error.context("failed to map the instance's memory");
            let outcome = classify(&state(), error, Phase::Instantiate);
            assert!(matches!(outcome, Outcome::Failed(_)), "{outcome:?}");
        }
    }

    /// Only a full table is the table limit; its other errors are traps.
    #[test]
    fn only_a_full_table_is_the_table_limit() {
        let full = wasmtime::Error::from(ResourceTableError::Full);
        assert_eq!(
            classify(&state(), full, Phase::Handle),
            Outcome::Limit(LimitKind::Table)
        );
        let children = wasmtime::Error::from(ResourceTableError::HasChildren);
        let outcome = classify(&state(), children, Phase::Handle);
        assert!(matches!(outcome, Outcome::Trap(_)), "{outcome:?}");
    }

    /// Text in an error that the guest may have chosen reaches the close
    /// line escaped.
    #[test]
    fn error_text_is_escaped() {
        let forged = wasmtime::Error::msg("boom\x1b[2J FAKE outcome=ok\nsecond line");
        let outcome = classify(&state(), forged, Phase::Handle);
        assert_eq!(
            outcome,
            Outcome::Trap("boom\\u{1b}[2J FAKE outcome=ok".into()),
            "{outcome:?}"
        );
    }
}
