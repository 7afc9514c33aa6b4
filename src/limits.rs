//! Per-connection limits: the values (`Limits`), the memory limiter that
//! records a refused growth, and the CPU meter that charges only time spent
//! running wasm.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use wasmtime::{ResourceLimiter, StoreLimits, StoreLimitsBuilder};

use crate::runtime::Pulse;

/// How often the epoch ticker advances the engine's epoch while guests run.
///
/// Every tick a running guest checks in: it yields to the tokio scheduler
/// (so a spinning guest delays another connection on the same worker by at
/// most about `YIELD_AFTER` plus one tick) and its CPU use is compared with
/// `--max-cpu` (so the CPU limit is enforced to within about one tick).
/// With 10ms, four spinning guests on one worker held every other
/// connection's request for 40ms; with 1ms, for 4ms. The check-in stays
/// rare because a guest's deadline is re-armed whenever it waits
/// (`hostcalls::rearm`): a guest takes the callback only when a tick lands
/// while it runs.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// How long the ticker sleeps when a whole tick passed with no guest
/// running (the old fixed tick, so an idle server wakes no more often than
/// it did). The next poll of any guest wakes it at once.
pub const IDLE_TICK: Duration = Duration::from_millis(10);

/// A guest that a tick finds running yields only if it has been running
/// this long without waiting. A guest the tick catches mid-request (a few
/// microseconds into its poll) carries on: yielding it would send it to the
/// back of the run queue behind every other ready connection, which added
/// a scheduling round to about one request in ten and showed up as a long
/// p99 under load. A busy guest still yields at the first tick after this,
/// so it runs at most about `EPOCH_TICK + YIELD_AFTER` at a time.
pub const YIELD_AFTER: Duration = Duration::from_millis(1);

/// Resource-table entries (streams, pollables, connection handles) one
/// connection may hold. A handler needs a handful; 1024 leaves room for
/// multiplexing while a guest that creates pollables in a loop is stopped
/// long before it costs the host real memory.
pub const MAX_TABLE_ENTRIES: usize = 1024;

/// The most bytes one host call may copy out of the guest (for example one
/// `output.write`). Set just above the stream permit so a huge `write` is
/// refused before it is copied into a host buffer, not after.
pub const HOSTCALL_FUEL: usize = crate::streams::BUFFER_LIMIT + 16 * 1024;

/// Core instances, memories and tables one Store may create. A component
/// instantiates its core modules inside one Store; these bound a component
/// that tries to make many.
pub const MAX_INSTANCES: usize = 64;
pub const MAX_MEMORIES: usize = 16;
pub const MAX_TABLES: usize = 64;

/// Elements per table. Ordinary components need a few thousand; 100 000
/// elements is 800 KB per table at most.
pub const MAX_TABLE_ELEMENTS: usize = 100_000;

/// The wasm stack each connection may use. It must stay well below the
/// async (fiber) stack so host functions called from wasm keep headroom.
pub const MAX_WASM_STACK: usize = 512 * 1024;

/// The fiber stack each running connection gets from the pool.
pub const ASYNC_STACK: usize = 2 * 1024 * 1024;

/// The most bytes one `get-random-bytes` call may ask for. wasmtime-wasi's
/// default (64 MiB) would let a guest make the host build a 64 MiB buffer
/// per call; real uses (seeds, keys, nonces) need a few dozen bytes.
pub const MAX_RANDOM_BYTES: u64 = 64 * 1024;

/// Lines of guest stdout/stderr logged per connection before the rest is
/// dropped.
pub const GUEST_LOG_LINES: u32 = 1000;

/// The limits applied to every connection; each is a command-line flag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Linear memory per memory of an instance, in bytes.
    pub max_memory: usize,
    /// Wasm execution time per connection (not time spent waiting).
    pub max_cpu: Duration,
    /// How long a connection may go with no byte moving either way.
    pub idle_timeout: Duration,
    /// Wall-clock cap on a whole connection.
    pub max_lifetime: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_memory: 64 << 20,
            max_cpu: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_lifetime: None,
        }
    }
}

/// Which limit ended a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LimitKind {
    Memory,
    Cpu,
    Idle,
    Lifetime,
    /// Resource-table or handle capacity.
    Table,
}

impl LimitKind {
    pub const ALL: [LimitKind; 5] = [
        LimitKind::Memory,
        LimitKind::Cpu,
        LimitKind::Idle,
        LimitKind::Lifetime,
        LimitKind::Table,
    ];

    pub fn name(self) -> &'static str {
        match self {
            LimitKind::Memory => "memory",
            LimitKind::Cpu => "cpu",
            LimitKind::Idle => "idle",
            LimitKind::Lifetime => "lifetime",
            LimitKind::Table => "table",
        }
    }
}

impl fmt::Display for LimitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `StoreLimits` plus a record of its last memory refusal, so the
/// connection can be reported as ended by the `memory` limit rather than by
/// whatever trap the guest hit after its allocation failed.
pub struct Limiter {
    inner: StoreLimits,
    /// The guest's CPU clock, which counts its waits.
    clock: Arc<CpuClock>,
    /// How many times the guest had waited when memory was last refused.
    refused_after: Option<u64>,
    /// `--max-memory`: only a refusal to grow past it is the server's limit.
    max_memory: usize,
}

impl Limiter {
    /// Whether the guest is still in the run in which its memory was
    /// refused: it has not waited since (for the client, a clock or
    /// anything else), so a trap now is the refusal's consequence, as when
    /// Rust or C abort on a failed allocation. A guest that recovered and
    /// went back to waiting is judged afresh by its next trap.
    pub fn out_of_memory(&self) -> bool {
        self.refused_after == Some(self.clock.waits.load(Ordering::Relaxed))
    }

    pub fn new(limits: &Limits, meter: &CpuMeter) -> Self {
        let inner = StoreLimitsBuilder::new()
            .memory_size(limits.max_memory)
            .table_elements(MAX_TABLE_ELEMENTS)
            .instances(MAX_INSTANCES)
            .memories(MAX_MEMORIES)
            .tables(MAX_TABLES)
            .build();
        Limiter {
            inner,
            clock: meter.clock.clone(),
            refused_after: None,
            max_memory: limits.max_memory,
        }
    }
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = self.inner.memory_growing(current, desired, maximum)?;
        // `StoreLimits` also refuses growth past the memory's own declared
        // maximum: that is the module's limit, and the guest's failure.
        let past_own_maximum = maximum.is_some_and(|max| desired > max);
        if !allowed && desired > self.max_memory && !past_own_maximum {
            self.refused_after = Some(self.clock.waits.load(Ordering::Relaxed));
        }
        Ok(allowed)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.inner.table_growing(current, desired, maximum)
    }

    fn instances(&self) -> usize {
        self.inner.instances()
    }

    fn tables(&self) -> usize {
        self.inner.tables()
    }

    fn memories(&self) -> usize {
        self.inner.memories()
    }
}

/// Measures the CPU a connection's guest costs: the time spent inside
/// `poll` of its instantiate and `handle` futures.
///
/// The guest runs on a fiber inside those polls, so this counts its wasm
/// and every host call that completes without waiting (a `check-write`, a
/// non-blocking `read`, `get-random-bytes`), and it excludes every
/// suspension: time blocked waiting for the client or a clock, and time
/// parked in an epoch yield while other connections run. A guest cannot
/// hide work in busy host calls, and other connections' guests, which run
/// between its polls, do not make it run out of budget sooner. It is wall
/// time inside the polls: the thread's own CPU clock would cost a system
/// call at each end of every poll, so time the operating system gives
/// another thread (another process, or this one's log writer or blocking
/// threads) in the middle of a poll is charged too. The epoch callback
/// reads it every tick.
#[derive(Clone)]
pub struct CpuMeter {
    budget: Duration,
    clock: Arc<CpuClock>,
    pulse: Arc<Pulse>,
}

/// Shared between the measuring future and the epoch callback (which runs
/// inside a poll, so it must see the poll in progress).
pub struct CpuClock {
    base: Instant,
    /// Nanoseconds spent in completed polls.
    used: AtomicU64,
    /// When the poll in progress started (nanoseconds after `base`, plus
    /// one so that 0 means "not polling").
    polling_since: AtomicU64,
    /// Polls that left the guest suspended other than for an epoch yield:
    /// times it waited for the client, a clock or another event.
    waits: AtomicU64,
    /// Set by [`CpuMeter::yielding`]: the poll in progress is suspending
    /// the guest to let others run, not to wait.
    yielding: AtomicBool,
}

impl CpuClock {
    fn now(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX) + 1
    }
}

impl CpuMeter {
    pub fn new(budget: Duration, pulse: Arc<Pulse>) -> Self {
        let clock = CpuClock {
            base: Instant::now(),
            used: AtomicU64::new(0),
            polling_since: AtomicU64::new(0),
            waits: AtomicU64::new(0),
            yielding: AtomicBool::new(false),
        };
        CpuMeter {
            budget,
            clock: Arc::new(clock),
            pulse,
        }
    }

    /// CPU time used so far, including the poll in progress.
    pub fn used(&self) -> Duration {
        Duration::from_nanos(self.clock.used.load(Ordering::Relaxed)) + self.running_for()
    }

    /// How long the poll in progress has been running (zero outside one):
    /// how long the guest has run without waiting.
    pub fn running_for(&self) -> Duration {
        let since = self.clock.polling_since.load(Ordering::Relaxed);
        if since == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.clock.now().saturating_sub(since))
    }

    /// Identifies the poll in progress (its start), so that a host call can
    /// tell whether it waited: a call that suspended the guest ends in a
    /// later poll.
    pub fn poll_id(&self) -> u64 {
        self.clock.polling_since.load(Ordering::Relaxed)
    }

    /// Record an epoch check-in, which also tells the ticker that this
    /// guest is running (a guest in one long poll reaches one every tick).
    pub fn check_in(&self) {
        self.pulse.check_in();
    }

    /// Record that the epoch callback is suspending the guest to let
    /// others run, so the suspension is not counted as a wait.
    pub fn yielding(&self) {
        self.clock.yielding.store(true, Ordering::Relaxed);
    }

    pub fn exhausted(&self) -> bool {
        self.used() >= self.budget
    }

    /// Wrap a future that runs the guest so its polls are charged.
    pub fn measure<F: Future>(&self, future: F) -> impl Future<Output = F::Output> {
        let clock = self.clock.clone();
        let pulse = self.pulse.clone();
        let mut future = Box::pin(future);
        std::future::poll_fn(move |cx| {
            pulse.beat();
            let start = clock.now();
            clock.polling_since.store(start, Ordering::Relaxed);
            let result = future.as_mut().poll(cx);
            clock.polling_since.store(0, Ordering::Relaxed);
            clock
                .used
                .fetch_add(clock.now().saturating_sub(start), Ordering::Relaxed);
            // Only this poll's thread writes these: plain loads and stores,
            // no locked read-modify-write on every poll.
            let yielded = clock.yielding.load(Ordering::Relaxed);
            if yielded {
                clock.yielding.store(false, Ordering::Relaxed);
            } else if result.is_pending() {
                let waits = clock.waits.load(Ordering::Relaxed);
                clock.waits.store(waits + 1, Ordering::Relaxed);
            }
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    }

    /// Busy work for `time`, inside whatever poll is running.
    fn spin(time: Duration) {
        let start = Instant::now();
        while start.elapsed() < time {
            std::hint::spin_loop();
        }
    }

    #[test]
    fn charges_polls_not_waits() {
        let meter = CpuMeter::new(Duration::from_millis(50), Arc::default());
        let runtime = runtime();
        runtime.block_on(meter.measure(async {
            // Waiting is free...
            tokio::time::sleep(Duration::from_millis(100)).await;
            // ...busy work inside a poll is charged.
            spin(Duration::from_millis(30));
        }));
        let used = meter.used();
        assert!(
            used >= Duration::from_millis(30) && used < Duration::from_millis(80),
            "{used:?}"
        );
        assert!(!meter.exhausted());
    }

    /// A suspension counts as a wait unless the epoch callback announced it
    /// as a yield: the memory limit's blame ends at the guest's next wait.
    #[test]
    fn counts_waits_not_yields() {
        let meter = CpuMeter::new(Duration::from_secs(10), Arc::default());
        let runtime = runtime();
        let inside = meter.clone();
        runtime.block_on(meter.measure(async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            inside.yielding();
            tokio::task::yield_now().await;
        }));
        assert_eq!(meter.clock.waits.load(Ordering::Relaxed), 1);
    }

    /// Only growth past `--max-memory` is blamed on the server's limit; a
    /// memory that runs into its own declared maximum is the module's.
    #[test]
    fn blames_only_the_server_limit() {
        let limits = Limits {
            max_memory: 64 << 20,
            ..Limits::default()
        };
        let meter = CpuMeter::new(limits.max_cpu, Arc::default());
        let mut limiter = Limiter::new(&limits, &meter);
        let own_max = Some(4 << 20);
        assert!(!limiter.memory_growing(1 << 20, 8 << 20, own_max).unwrap());
        assert!(!limiter.out_of_memory());
        // Past both: the module's own maximum would have refused it anyway.
        assert!(!limiter.memory_growing(1 << 20, 65 << 20, own_max).unwrap());
        assert!(!limiter.out_of_memory());
        assert!(!limiter.memory_growing(1 << 20, 65 << 20, None).unwrap());
        assert!(limiter.out_of_memory());
    }

    /// `running_for` is what the epoch callback uses to decide whether to
    /// yield: the time since the current poll began, restarted by every
    /// wait, and zero between polls.
    #[test]
    fn running_for_restarts_at_each_wait() {
        let meter = CpuMeter::new(Duration::from_secs(10), Arc::default());
        let runtime = runtime();
        let inside = meter.clone();
        let (busy, after_wait) = runtime.block_on(meter.measure(async move {
            spin(Duration::from_millis(5));
            let busy = inside.running_for();
            tokio::time::sleep(Duration::from_millis(20)).await;
            (busy, inside.running_for())
        }));
        assert!(busy >= Duration::from_millis(5), "{busy:?}");
        assert!(after_wait < Duration::from_millis(5), "{after_wait:?}");
        assert_eq!(meter.running_for(), Duration::ZERO);
    }
}
