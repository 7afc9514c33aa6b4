//! Per-connection limits: the values (`Limits`), the memory limiter that
//! records a refused growth, and the CPU meter that charges only time spent
//! running wasm.

use std::fmt;
use std::time::{Duration, Instant};

use wasmtime::{CallHook, ResourceLimiter, StoreLimits, StoreLimitsBuilder};

/// How often the epoch ticker advances the engine's epoch.
///
/// Every tick a running guest checks in: it yields to the tokio scheduler
/// (so a spinning guest delays another connection on the same worker by at
/// most about one tick) and its CPU use is compared with `--max-cpu` (so the
/// CPU limit is enforced to within about one tick). 10 ms keeps both
/// latencies small while the check-in costs well under 1% of a core.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

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

/// `StoreLimits` plus a record of whether it refused anything, so the
/// connection can be reported as ended by the `memory` limit rather than by
/// whatever trap the guest hit after its allocation failed.
pub struct Limiter {
    inner: StoreLimits,
    pub refused_memory: bool,
}

impl Limiter {
    pub fn new(limits: &Limits) -> Self {
        let inner = StoreLimitsBuilder::new()
            .memory_size(limits.max_memory)
            .table_elements(MAX_TABLE_ELEMENTS)
            .instances(MAX_INSTANCES)
            .memories(MAX_MEMORIES)
            .tables(MAX_TABLES)
            .build();
        Limiter {
            inner,
            refused_memory: false,
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
        if !allowed {
            self.refused_memory = true;
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

/// Measures how long a connection's guest has been running wasm.
///
/// Epoch ticks are wall-clock ticks, so counting ticks would charge a guest
/// for time it spends blocked in a host call (waiting for the client). The
/// store's call hook instead marks every switch between wasm and host: time
/// from entering wasm (or returning from the host) to leaving it (or calling
/// the host) is execution time. The epoch callback itself runs inside such a
/// host call, so time a guest spends parked in an epoch yield, waiting for
/// other connections' turns, is not charged either.
pub struct CpuMeter {
    budget: Duration,
    used: Duration,
    running_since: Option<Instant>,
}

impl CpuMeter {
    pub fn new(budget: Duration) -> Self {
        CpuMeter {
            budget,
            used: Duration::ZERO,
            running_since: None,
        }
    }

    /// Record a switch between wasm and host.
    pub fn on_call_hook(&mut self, hook: CallHook) {
        if hook.entering_host() {
            if let Some(since) = self.running_since.take() {
                self.used += since.elapsed();
            }
        } else {
            self.running_since = Some(Instant::now());
        }
    }

    /// Wasm execution time so far.
    pub fn used(&self) -> Duration {
        self.used
            + self
                .running_since
                .map_or(Duration::ZERO, |since| since.elapsed())
    }

    pub fn exhausted(&self) -> bool {
        self.used() >= self.budget
    }
}
