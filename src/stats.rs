//! In-process counters and gauges: connections open, live Stores, outcomes,
//! limit breaches and reloads. Embedders and tests read them through [`Stats`];
//! `changed()` lets a test wait for an event instead of sleeping.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Notify;

use crate::limits::LimitKind;

/// How a connection ended, as counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OutcomeKind {
    /// `handle` returned `ok`.
    Ok,
    /// `handle` returned `err(msg)`.
    Err,
    /// The guest trapped (panic, unreachable, stack overflow, ...).
    Trap,
    /// A limit ended it; which one is counted in [`Stats::limit_hits`].
    Limit,
    /// The client reset the connection while the handler was using it.
    ClientReset,
    /// The server was shutting down and the drain deadline passed.
    Cancelled,
    /// The host could not set the connection up (for example the instance
    /// pool was exhausted).
    Failed,
}

impl OutcomeKind {
    pub const ALL: [OutcomeKind; 7] = [
        OutcomeKind::Ok,
        OutcomeKind::Err,
        OutcomeKind::Trap,
        OutcomeKind::Limit,
        OutcomeKind::ClientReset,
        OutcomeKind::Cancelled,
        OutcomeKind::Failed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            OutcomeKind::Ok => "ok",
            OutcomeKind::Err => "err",
            OutcomeKind::Trap => "trap",
            OutcomeKind::Limit => "limit",
            OutcomeKind::ClientReset => "client_reset",
            OutcomeKind::Cancelled => "cancelled",
            OutcomeKind::Failed => "failed",
        }
    }

    fn index(self) -> usize {
        OutcomeKind::ALL
            .iter()
            .position(|k| *k == self)
            .unwrap_or(0)
    }
}

/// Live counters for one server. Shared by the acceptor and every
/// connection task; cheap relaxed atomics on the hot path.
#[derive(Default)]
pub struct Stats {
    accepted: AtomicU64,
    open: AtomicU64,
    peak_open: AtomicU64,
    /// The most connections open at once since the heap was last trimmed
    /// (see [`crate::trim`]).
    high_water: AtomicU64,
    live_stores: AtomicU64,
    accept_errors: AtomicU64,
    reloads: AtomicU64,
    failed_reloads: AtomicU64,
    loaded_generations: AtomicU64,
    outcomes: [AtomicU64; OutcomeKind::ALL.len()],
    limits: [AtomicU64; LimitKind::ALL.len()],
    changed: Notify,
}

impl Stats {
    /// Connections accepted since start.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Connections open right now (accepted and not yet closed).
    pub fn open_connections(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    /// The most connections that were ever open at once: never above
    /// `--max-connections`.
    pub fn peak_open_connections(&self) -> u64 {
        self.peak_open.load(Ordering::Relaxed)
    }

    /// The most connections open at once since [`Stats::reset_high_water`].
    pub fn high_water_since_trim(&self) -> u64 {
        self.high_water.load(Ordering::Relaxed)
    }

    /// Start a new high-water mark at `open`, after a trim.
    pub(crate) fn reset_high_water(&self, open: u64) {
        self.high_water.store(open, Ordering::Relaxed);
    }

    /// Wasm Stores alive right now. Returns to 0 when no connection is being
    /// served; anything else is a leak.
    pub fn live_stores(&self) -> u64 {
        self.live_stores.load(Ordering::Relaxed)
    }

    /// Accept calls that failed (each is retried or backed off).
    pub fn accept_errors(&self) -> u64 {
        self.accept_errors.load(Ordering::Relaxed)
    }

    /// Reloads of the handler that put a new component in service.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    /// Reloads that were refused, leaving the previous component in service.
    pub fn failed_reloads(&self) -> u64 {
        self.failed_reloads.load(Ordering::Relaxed)
    }

    /// Generations of the handler in memory: the one new connections get,
    /// plus each earlier one that a connection still runs. An earlier
    /// generation's compiled code stays loaded until its last connection
    /// ends, as Erlang keeps old code while a process runs it.
    pub fn loaded_generations(&self) -> u64 {
        self.loaded_generations.load(Ordering::Relaxed)
    }

    /// Log lines the process dropped because stderr did not keep up (see
    /// [`crate::logging`]). Process-wide, like the log sink itself; always
    /// 0 for an embedder that logs its own way.
    pub fn dropped_log_lines(&self) -> u64 {
        crate::logging::dropped_lines()
    }

    /// Connections that ended with `kind`.
    pub fn outcomes(&self, kind: OutcomeKind) -> u64 {
        self.outcomes[kind.index()].load(Ordering::Relaxed)
    }

    /// Connections that `limit` ended.
    pub fn limit_hits(&self, limit: LimitKind) -> u64 {
        let index = LimitKind::ALL.iter().position(|k| *k == limit).unwrap_or(0);
        self.limits[index].load(Ordering::Relaxed)
    }

    /// Connections closed since start, whatever their outcome.
    pub fn closed(&self) -> u64 {
        OutcomeKind::ALL.iter().map(|k| self.outcomes(*k)).sum()
    }

    /// Wait until `condition` holds. Re-checked after every change to these
    /// counters, so a caller never needs to poll or sleep.
    pub async fn wait_for(&self, mut condition: impl FnMut(&Stats) -> bool) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if condition(self) {
                return;
            }
            changed.await;
        }
    }

    fn bump(&self, counter: &AtomicU64, delta: i64) {
        if delta >= 0 {
            counter.fetch_add(delta as u64, Ordering::Relaxed);
        } else {
            counter.fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
        }
        self.changed.notify_waiters();
    }

    /// A one-line summary for the shutdown log.
    pub fn summary(&self) -> String {
        let mut text = format!(
            "accepted={} open={} peak_open={} live_stores={} accept_errors={} reloads={} \
             failed_reloads={} log_lines_dropped={}",
            self.accepted(),
            self.open_connections(),
            self.peak_open_connections(),
            self.live_stores(),
            self.accept_errors(),
            self.reloads(),
            self.failed_reloads(),
            self.dropped_log_lines()
        );
        for kind in OutcomeKind::ALL {
            text.push_str(&format!(" {}={}", kind.name(), self.outcomes(kind)));
        }
        for limit in LimitKind::ALL {
            text.push_str(&format!(
                " limit_{}={}",
                limit.name(),
                self.limit_hits(limit)
            ));
        }
        text
    }

    pub(crate) fn accept_error(&self) {
        self.bump(&self.accept_errors, 1);
    }

    pub(crate) fn reloaded(&self, ok: bool) {
        self.bump(
            if ok {
                &self.reloads
            } else {
                &self.failed_reloads
            },
            1,
        );
    }

    /// Count a generation of the handler as loaded, until its
    /// [`Stats::generation_unloaded`] (both called by `reload::Loaded`).
    pub(crate) fn generation_loaded(&self) {
        self.bump(&self.loaded_generations, 1);
    }

    pub(crate) fn generation_unloaded(&self) {
        self.bump(&self.loaded_generations, -1);
    }

    /// Count an accepted connection; the guard counts it closed when dropped.
    pub(crate) fn connection_opened(&self) -> Gauge<'_> {
        self.bump(&self.accepted, 1);
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak_open.fetch_max(open, Ordering::Relaxed);
        self.high_water.fetch_max(open, Ordering::Relaxed);
        self.changed.notify_waiters();
        Gauge {
            stats: self,
            counter: &self.open,
        }
    }

    /// Count a live Store; the guard counts it gone when dropped.
    pub(crate) fn store_created(&self) -> Gauge<'_> {
        self.bump(&self.live_stores, 1);
        Gauge {
            stats: self,
            counter: &self.live_stores,
        }
    }

    pub(crate) fn record(&self, outcome: OutcomeKind, limit: Option<LimitKind>) {
        if let Some(limit) = limit {
            let index = LimitKind::ALL.iter().position(|k| *k == limit).unwrap_or(0);
            self.limits[index].fetch_add(1, Ordering::Relaxed);
        }
        self.bump(&self.outcomes[outcome.index()], 1);
    }
}

/// Decrements a gauge when dropped, however the owner ends.
pub(crate) struct Gauge<'a> {
    stats: &'a Stats,
    counter: &'a AtomicU64,
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.stats.bump(self.counter, -1);
    }
}
