//! The wasm side of the server: engine configuration, loading and checking
//! the handler component (at start and at each reload), the `InstancePre`
//! every connection instantiates from, and the epoch ticker thread.

use std::path::Path;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{JoinHandle, Thread};

use anyhow::{Context, Result, bail};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::bindings::SockserverPre;
use crate::connection::HostState;
use crate::limits::{self, Limits};

/// The interface every handler must export (any 0.1.x is compatible).
const HANDLER_EXPORT: &str = "sockserver:handler/handler@0.1";

/// The largest module file read. Real handlers are far smaller (the
/// Python echo, interpreter included, is about 40 MB); the bound keeps a
/// mistaken `--module /dev/zero` or a huge file from exhausting memory.
const MAX_MODULE_SIZE: u64 = 1 << 30;

/// Read a module file: only a regular file (a FIFO would hang start-up or a
/// reload, a device could be endless), and at most `limit` bytes.
fn read_module(path: &Path, limit: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    // Non-blocking, so that opening a FIFO does not wait for a writer.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        bail!("not a regular file");
    }
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        bail!("larger than {}", crate::config::format_size(limit));
    }
    Ok(bytes)
}

/// The largest file named `.wat` read: the parser's syntax tree takes
/// many times the text's size, and running out of memory there would
/// abort the server in the middle of a reload. A hand-written handler is
/// kilobytes.
const MAX_TEXT_SIZE: u64 = 16 << 20;

/// Assemble a handler written in the component model's text format (a
/// `.wat` file): the smallest components are written by hand. A mistake
/// is reported on one line, by line and column, with the parser's message
/// escaped (identifiers in it are the file's).
fn assemble(bytes: &[u8]) -> Result<Vec<u8>> {
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(error) => {
            // Everything before the first bad byte is valid UTF-8.
            let valid = std::str::from_utf8(&bytes[..error.valid_up_to()]).unwrap_or_default();
            let (line, column) = line_column(valid, valid.len());
            bail!("line {line}, column {column}: not UTF-8");
        }
    };
    let at = |error: wast::Error| {
        let (line, column) = line_column(text, error.span().offset());
        anyhow::anyhow!(
            "line {line}, column {column}: {}",
            crate::guest_log::sanitize(&error.message(), 256)
        )
    };
    let buffer = wast::parser::ParseBuffer::new(text).map_err(at)?;
    let mut wat: wast::Wat = wast::parser::parse(&buffer).map_err(at)?;
    wat.encode().map_err(at)
}

/// The 1-based line and column of byte `offset` in `text`, the column
/// counted in characters, as an editor shows it (wast's own `linecol_in`
/// counts bytes, so a name in another script before a mistake moved the
/// column to the right).
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = &text[..end];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.matches('\n').count() + 1;
    (line, before[line_start..].chars().count() + 1)
}

/// Everything needed to serve connections with one handler component:
/// compiled once, pre-instantiated once, instantiated per connection.
pub struct Runtime {
    pub(crate) engine: Engine,
    pub(crate) pre: SockserverPre<HostState>,
    pub(crate) limits: Limits,
    /// Tells the ticker that guests are running; every connection's CPU
    /// meter holds a clone.
    pub(crate) pulse: Arc<Pulse>,
    generation: u64,
    /// What the shared instance pool was sized for, per connection.
    capacity: Counts,
    /// Advances the engine's epoch every [`limits::EPOCH_TICK`] while guests
    /// run; shared by every generation of the handler and stopped and
    /// joined when the last of them is dropped.
    _ticker: Arc<Ticker>,
    /// Counts this generation as loaded while it is in memory; set by the
    /// [`crate::reload::Reloader`] that serves it.
    pub(crate) loaded: Option<crate::reload::Loaded>,
}

impl Runtime {
    /// Load the component at `path` for a server that holds at most
    /// `max_connections` connections at once, compiling it from scratch.
    ///
    /// Every problem with the file (missing, not wasm, a core module, the
    /// wrong exports, an import the host lacks, memory beyond the limit) is
    /// an error with a one-line explanation, before anything is bound.
    pub fn load(path: &Path, limits: &Limits, max_connections: usize) -> Result<Runtime> {
        Runtime::load_inner(path, limits, max_connections, None)
    }

    /// Like [`Runtime::load`], but keep compiled code in `cache_dir` and
    /// reuse it when the same component is loaded again by the same build
    /// of the server with the same settings. A large JavaScript or Python
    /// component takes seconds to compile and milliseconds to load.
    ///
    /// The cache holds native code that is loaded without validation, so
    /// `cache_dir` must be as trusted as the server binary; it is created
    /// readable by its owner only.
    pub fn load_cached(
        path: &Path,
        limits: &Limits,
        max_connections: usize,
        cache_dir: &Path,
    ) -> Result<Runtime> {
        Runtime::load_inner(path, limits, max_connections, Some(cache_dir))
    }

    fn load_inner(
        path: &Path,
        limits: &Limits,
        max_connections: usize,
        cache_dir: Option<&Path>,
    ) -> Result<Runtime> {
        let checked = Checked::read(path, limits, cache_dir)?;
        let mut config = engine_config(limits);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool_config(
            limits,
            max_connections,
            &checked.counts,
        )));
        let engine =
            anyhow(Engine::new(&config)).context("failed to create the pooling wasm engine")?;
        let pre = checked.pre_instantiate(&engine)?;
        let pulse = Arc::new(Pulse::default());
        let ticker = Ticker::start(engine.clone(), pulse.clone())?;
        Ok(Runtime {
            engine,
            pre,
            limits: limits.clone(),
            pulse,
            generation: 1,
            capacity: checked.counts,
            _ticker: Arc::new(ticker),
            loaded: None,
        })
    }

    /// Load the component at `path` again (a new build of the handler) into
    /// this runtime's engine and pool, for new connections; this runtime
    /// stays valid for the connections that already use it.
    ///
    /// The new component is checked exactly as at start. It must also fit
    /// the instance pool, whose memory and table slots were sized from the
    /// first component's counts when the server started: a component that
    /// needs more memories or tables per connection is refused, and only a
    /// restart can load it. Sharing the pool is what keeps a reload cheap:
    /// no second pool's address space and memory mappings; and since live
    /// connections never exceed `--max-connections`, whatever mix of old
    /// and new components they run, the pool never needs more slots.
    pub fn reload(&self, path: &Path, cache_dir: Option<&Path>) -> Result<Runtime> {
        let checked = Checked::read(path, &self.limits, cache_dir)?;
        self.capacity.fits(&checked.counts, &checked.shown)?;
        Ok(Runtime {
            engine: self.engine.clone(),
            pre: checked.pre_instantiate(&self.engine)?,
            limits: self.limits.clone(),
            pulse: self.pulse.clone(),
            generation: self.generation + 1,
            capacity: self.capacity,
            _ticker: self._ticker.clone(),
            loaded: None,
        })
    }

    /// Which load of the handler this is: 1 at start, one more at each
    /// successful [`Runtime::reload`]. Logged with every connection.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// How many times a running guest has stopped at an epoch tick to
    /// check in (CPU budget, yield), over all connections so far. Each
    /// costs a call out of wasm; a guest that waits between requests should
    /// almost never need one.
    pub fn epoch_checkins(&self) -> u64 {
        self.pulse.checkins.load(Ordering::Relaxed)
    }

    /// The limits every connection runs under.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }
}

/// wasmtime 48 has its own error type; move it into anyhow so `.context`
/// and `{:#}` work as everywhere else.
fn anyhow<T>(result: wasmtime::Result<T>) -> Result<T> {
    result.map_err(anyhow::Error::from)
}

/// A handler component that passed every check at load, compiled and ready
/// to be loaded into the pooling engine.
struct Checked {
    shown: String,
    compiled: crate::cache::Compiled,
    counts: Counts,
}

impl Checked {
    /// Read and check the component at `path`, and compile it (or take its
    /// compiled code from `cache_dir`).
    ///
    /// Every problem with the file (missing, not wasm, a core module, the
    /// wrong exports, memory beyond the limit) is an error with a one-line
    /// explanation.
    fn read(path: &Path, limits: &Limits, cache_dir: Option<&Path>) -> Result<Checked> {
        let shown = path.display().to_string();
        // Text is recognised by its name, so that any other file that is
        // not a binary keeps the plain "not a WebAssembly binary" error.
        let named_text = path
            .extension()
            .is_some_and(|ext| ext.eq_ignore_ascii_case("wat"));
        let limit = if named_text {
            MAX_TEXT_SIZE
        } else {
            MAX_MODULE_SIZE
        };
        let mut bytes =
            read_module(path, limit).with_context(|| format!("cannot read module {shown}"))?;
        let text = named_text && !bytes.starts_with(b"\0asm");
        if text {
            bytes =
                assemble(&bytes).with_context(|| format!("{shown} is not valid component text"))?;
        }
        if !wasmparser::Parser::is_component(&bytes) {
            if text {
                bail!("{shown} holds a core module, not a `(component ...)`");
            }
            if wasmparser::Parser::is_core_wasm(&bytes) {
                bail!(
                    "{shown} is a core wasm module, not a component: build the handler for \
                     wasm32-wasip2 (cargo build --target wasm32-wasip2) or wrap it with \
                     `wasm-tools component new`"
                );
            }
            bail!("{shown} is not a WebAssembly binary");
        }

        // The pool must be sized from the component's own counts of core
        // instances, memories and tables, which are only known once it is
        // compiled. Compile with an engine that is identical except for its
        // allocation strategy, then load the compiled code into the pooling
        // engine.
        let probe = anyhow(Engine::new(&engine_config(limits)))
            .context("failed to create the wasm engine")?;
        let compiled = crate::cache::compile(&probe, &bytes, cache_dir)
            .with_context(|| format!("{shown} is not a valid component"))?;
        check_exports(&probe, &compiled.component, &shown)?;
        let counts = Counts::of(&compiled.component, &bytes, limits, &shown)?;
        Ok(Checked {
            shown,
            compiled,
            counts,
        })
    }

    /// Load the compiled code into the pooling `engine` and link it against
    /// the host: the `InstancePre` every connection instantiates from.
    fn pre_instantiate(&self, engine: &Engine) -> Result<SockserverPre<HostState>> {
        let shown = &self.shown;
        // SAFETY: the artifact comes from `precompile_component` of an engine
        // with the same settings (the cache key includes them), and the
        // pooling engine differs from the probe only in its allocation
        // strategy, which compiled code does not depend on.
        let component = anyhow(unsafe { Component::deserialize(engine, &self.compiled.artifact) })
            .context("failed to load the compiled component into the pooling engine")?;
        // Create the copy-on-write memory images (one memfd per module) now,
        // not lazily at the first connection: then a first connection that
        // arrives while file descriptors are exhausted cannot fail, and it
        // does not pay for building the images either.
        anyhow(component.initialize_copy_on_write_image())
            .context("failed to prepare the component's memory images")?;

        let mut linker = Linker::<HostState>::new(engine);
        anyhow(wasmtime_wasi::p2::add_to_linker_async(&mut linker))
            .context("failed to add WASI to the linker")?;
        crate::hostcalls::add_to_linker(&mut linker)?;
        anyhow(
            crate::bindings::sockserver::handler::types::add_to_linker::<
                HostState,
                HasSelf<HostState>,
            >(&mut linker, |state| state),
        )
        .context("failed to add the sockserver interfaces to the linker")?;
        let instance_pre = anyhow(linker.instantiate_pre(&component))
            .with_context(|| format!("{shown} needs an import the host does not provide"))?;
        let pre = anyhow(SockserverPre::new(instance_pre))
            .with_context(|| format!("{shown} does not match the sockserver world"))?;
        // A usable handler: now the cache may speak and keep its code.
        self.compiled.commit();
        Ok(pre)
    }
}

/// The engine settings shared by the probe engine and the pooling engine.
/// Anything that affects generated code must be set here, so that code
/// compiled by one loads into the other.
fn engine_config(limits: &Limits) -> Config {
    let mut config = Config::new();
    config.epoch_interruption(true);
    config.max_wasm_stack(limits::MAX_WASM_STACK);
    config.async_stack_size(limits::ASYNC_STACK);
    // Reserve exactly the memory limit for each linear memory (rounded up to
    // a 64 KiB page) instead of 4 GiB: the pool then needs max-connections ×
    // limit of address space rather than × 4 GiB. Bounds checks become
    // explicit, which costs little.
    config.memory_reservation(memory_reservation(limits));
    config.memory_reservation_for_growth(0);
    config.memory_guard_size(2 << 20);
    config.memory_may_move(false);
    config
}

fn memory_reservation(limits: &Limits) -> u64 {
    (limits.max_memory as u64).div_ceil(65536).max(1) * 65536
}

/// The pool slots one instance of the component takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Counts {
    memories: u32,
    tables: u32,
}

impl Counts {
    /// What `next` needs per connection beyond what a pool sized for
    /// `self` holds, described for an error message; `None` if it fits.
    fn excess(&self, next: &Counts) -> Option<String> {
        let mut over = Vec::new();
        // Core instances are not compared: the pool admits as many per
        // connection as one Store may create (see `pool_config`).
        for (what, has, needs) in [
            ("memories", self.memories.max(1), next.memories),
            ("tables", self.tables.max(1), next.tables),
        ] {
            if needs > has {
                over.push(format!("{needs} {what} (the pool has room for {has})"));
            }
        }
        (!over.is_empty()).then(|| over.join(", "))
    }

    /// Refuse a reload of a component that needs more per connection than
    /// a pool sized for `self` holds.
    fn fits(&self, next: &Counts, shown: &str) -> Result<()> {
        if let Some(excess) = self.excess(next) {
            bail!(
                "{shown} needs {excess} per connection, more than the running server's instance \
                 pool was sized for from the component it started with: restart the server to \
                 load it"
            );
        }
        Ok(())
    }

    fn of(component: &Component, bytes: &[u8], limits: &Limits, shown: &str) -> Result<Counts> {
        let required = component
            .resources_required()
            .context("component requires resources that cannot be measured")?;
        // wasmtime counts the initial size in 64 KiB wasm pages.
        if let Some(initial) = required
            .max_initial_memory_size
            .map(|p| p.saturating_mul(65536))
            && initial > limits.max_memory as u64
        {
            bail!(
                "{shown} needs {} of initial linear memory, more than --max-memory ({})",
                crate::config::format_size(initial),
                crate::config::format_size(limits.max_memory as u64)
            );
        }
        if let Some(initial) = required.max_initial_table_size
            && initial > limits::MAX_TABLE_ELEMENTS as u64
        {
            bail!(
                "{shown} needs a table of {initial} elements, more than the limit of {}",
                limits::MAX_TABLE_ELEMENTS
            );
        }
        if required.num_memories as usize > limits::MAX_MEMORIES
            || required.num_tables as usize > limits::MAX_TABLES
        {
            bail!(
                "{shown} needs {} memories and {} tables per instance, more than the limits of {} and {}",
                required.num_memories,
                required.num_tables,
                limits::MAX_MEMORIES,
                limits::MAX_TABLES
            );
        }
        let core_instances = count_core_instances(bytes)?;
        if core_instances as usize > limits::MAX_INSTANCES {
            bail!(
                "{shown} instantiates {core_instances} core modules, more than the limit of {}",
                limits::MAX_INSTANCES
            );
        }
        tracing::debug!(
            core_instances,
            memories = required.num_memories,
            tables = required.num_tables,
            "component resources per instance"
        );
        Ok(Counts {
            memories: required.num_memories,
            tables: required.num_tables,
        })
    }
}

/// Core instances a component creates when instantiated: every
/// `instantiate` in its core-instance sections, nested components included.
/// Instances made from a bag of exports take no pool slot.
fn count_core_instances(bytes: &[u8]) -> Result<u32> {
    let mut count = 0u32;
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        if let wasmparser::Payload::InstanceSection(reader) =
            payload.context("failed to parse component")?
        {
            for instance in reader {
                let instance = instance.context("failed to parse component")?;
                if matches!(instance, wasmparser::Instance::Instantiate { .. }) {
                    count += 1;
                }
            }
        }
    }
    Ok(count)
}

/// Bytes of dirty linear memory and table per slot that are reset with
/// `memset` (found with the `PAGEMAP_SCAN` ioctl on Linux 6.7+) instead of
/// `madvise`, so a reused slot does not page-fault its working set back in.
/// A small handler dirties a handful of pages; more than this falls back to
/// `madvise`.
const KEEP_RESIDENT: usize = 256 * 1024;

/// Size the pooling allocator for `max_connections` live instances.
///
/// Every `total_*` defaults to 1000, which would fail connection 1001, so
/// each is derived from the connection limit. Memories and tables are slots
/// with reserved address space, so they follow the component's own counts.
/// Core instances are only a counter in wasmtime's pool (their metadata is
/// allocated per instance), so they are sized for as many per connection as
/// a Store may create, [`limits::MAX_INSTANCES`]: then neither the modules
/// wasmtime adds itself (fused adapters between nested components) nor a
/// reloaded handler built by another toolchain (a Python component has 14
/// core instances, a Rust one 3) can run the pool out of them.
fn pool_config(
    limits: &Limits,
    max_connections: usize,
    counts: &Counts,
) -> PoolingAllocationConfig {
    let n = u32::try_from(max_connections).unwrap_or(u32::MAX);
    let times = |per: u32| n.saturating_mul(per.max(1));
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(n)
        .total_stacks(n)
        .total_core_instances(times(limits::MAX_INSTANCES as u32))
        .total_memories(times(counts.memories))
        .total_tables(times(counts.tables))
        .max_memory_size(memory_reservation(limits) as usize)
        .table_elements(limits::MAX_TABLE_ELEMENTS)
        .linear_memory_keep_resident(KEEP_RESIDENT)
        .table_keep_resident(KEEP_RESIDENT)
        .pagemap_scan(wasmtime::Enabled::Auto);
    pool
}

/// Check the component exports the handler interface, naming what it does
/// export when it does not.
fn check_exports(engine: &Engine, component: &Component, shown: &str) -> Result<()> {
    let ty = component.component_type();
    let mut names = Vec::new();
    for (name, _) in ty.exports(engine) {
        if name.starts_with(HANDLER_EXPORT) {
            return Ok(());
        }
        names.push(name.to_string());
    }
    let found = if names.is_empty() {
        "nothing".to_string()
    } else {
        names.join(", ")
    };
    bail!("{shown} does not export sockserver:handler/handler@0.1.0 (it exports {found})")
}

/// What the connections tell the epoch ticker: that a guest ran.
///
/// The ticker ticks every [`limits::EPOCH_TICK`] only while guests run. A
/// tick that saw no guest polled and no guest checking in at the epoch
/// callback puts it to sleep for up to [`limits::IDLE_TICK`], and the next
/// poll of any guest wakes it at once. So an idle server wakes no more
/// often than with the old 10ms tick, while a busy one gets a 1ms tick.
#[derive(Default)]
pub struct Pulse {
    /// A guest was polled or checked in since the ticker last looked.
    active: AtomicBool,
    /// The ticker is asleep (or about to be) and wants an unpark.
    asleep: AtomicBool,
    ticker: OnceLock<Thread>,
    /// Epoch check-ins so far (see [`Runtime::epoch_checkins`]).
    checkins: AtomicU64,
}

impl Pulse {
    /// Record that a guest is running. Called at every poll of a guest and
    /// at every epoch check-in, so it reads before it writes: the flag is
    /// nearly always set already, and a plain load keeps the cache line
    /// shared between worker threads.
    pub fn beat(&self) {
        if !self.active.load(Ordering::Relaxed) {
            self.active.store(true, Ordering::SeqCst);
        }
        if self.asleep.load(Ordering::SeqCst)
            && self.asleep.swap(false, Ordering::SeqCst)
            && let Some(ticker) = self.ticker.get()
        {
            ticker.unpark();
        }
    }

    /// A running guest reached its epoch deadline: count it, and beat.
    pub fn check_in(&self) {
        self.checkins.fetch_add(1, Ordering::Relaxed);
        self.beat();
    }
}

/// The thread that drives epoch interruption for one engine.
struct Ticker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Ticker {
    fn start(engine: Engine, pulse: Arc<Pulse>) -> Result<Ticker> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let beats = pulse.clone();
        let thread = std::thread::Builder::new()
            .name("epoch-ticker".into())
            .spawn(move || {
                let mut quiet = false;
                while !flag.load(Ordering::Relaxed) {
                    if quiet {
                        // Announce the sleep, then look once more: a beat
                        // between the two either sees `asleep` and unparks
                        // us, or is seen here.
                        beats.asleep.store(true, Ordering::SeqCst);
                        if !beats.active.load(Ordering::SeqCst) {
                            std::thread::park_timeout(limits::IDLE_TICK);
                        }
                        beats.asleep.store(false, Ordering::SeqCst);
                    } else {
                        std::thread::sleep(limits::EPOCH_TICK);
                    }
                    engine.increment_epoch();
                    quiet = !beats.active.swap(false, Ordering::SeqCst);
                }
            })
            .context("failed to start the epoch ticker thread")?;
        let _ = pulse.ticker.set(thread.thread().clone());
        Ok(Ticker {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Counts, line_column};

    /// Ensure positions are counted in characters from 1, and an offset past
    /// the end or inside a character (never seen from wast, but cheap to
    /// guard) neither panics nor points past the text.
    #[test]
    fn line_column_counts_characters() {
        let text = "ab\néé x";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 3), (2, 1));
        // "éé " is 5 bytes and 3 characters.
        assert_eq!(line_column(text, 8), (2, 4));
        assert_eq!(line_column(text, 4), (2, 1));
        assert_eq!(line_column(text, 100), (2, 5));
    }

    /// Ensure a reload is refused exactly when the new component needs
    /// more memories or tables per connection than the pool was sized for,
    /// naming each shortfall.
    #[test]
    fn a_reload_must_fit_the_pool() {
        let counts = |memories, tables| Counts { memories, tables };
        let pool = counts(1, 2);
        assert_eq!(pool.excess(&pool), None);
        assert_eq!(pool.excess(&counts(0, 0)), None);
        // A pool sized for a component without tables still has one per
        // connection.
        assert_eq!(counts(1, 0).excess(&counts(1, 1)), None);
        assert_eq!(
            pool.excess(&counts(2, 3)).as_deref(),
            Some("2 memories (the pool has room for 1), 3 tables (the pool has room for 2)")
        );
        assert_eq!(
            pool.excess(&counts(1, 3)).as_deref(),
            Some("3 tables (the pool has room for 2)")
        );
    }
}
