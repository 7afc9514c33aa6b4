//! Hot reload: swapping the handler component that new connections get,
//! while every open connection finishes on the one it started with.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use anyhow::{Context, Result};

use crate::runtime::Runtime;
use crate::stats::Stats;

/// The handler in service, and the means to replace it. Cheap to clone.
///
/// This is nginx's reload and Erlang's code swap at the granularity this
/// server already isolates: a connection's instance is never touched once
/// it runs, so an old connection keeps its old code and state until it
/// ends, and the old compiled code is freed with its last connection. A
/// reload that fails for any reason (the file is missing, half-written,
/// not a handler, needs more than the pool has) changes nothing: the
/// server keeps serving the last component that loaded.
#[derive(Clone)]
pub struct Reloader {
    shared: Arc<Shared>,
}

struct Shared {
    current: RwLock<Arc<Runtime>>,
    module: PathBuf,
    cache_dir: Option<PathBuf>,
    stats: Arc<Stats>,
    /// One reload at a time: two racing reloads could otherwise install
    /// the older file last.
    busy: tokio::sync::Mutex<()>,
}

impl Reloader {
    /// Serve `runtime` until the first reload, which reads `module` (with
    /// compiled code cached in `cache_dir`).
    pub(crate) fn new(
        mut runtime: Runtime,
        module: PathBuf,
        cache_dir: Option<PathBuf>,
        stats: Arc<Stats>,
    ) -> Reloader {
        runtime.loaded = Some(Loaded::new(&stats, runtime.generation()));
        Reloader {
            shared: Arc::new(Shared {
                current: RwLock::new(Arc::new(runtime)),
                module,
                cache_dir,
                stats,
                busy: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// The handler new connections get right now.
    pub fn current(&self) -> Arc<Runtime> {
        // A poisoned lock only means a panic elsewhere while swapping an
        // `Arc`, which leaves the value whole.
        self.shared
            .current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Read the module file again, check and compile it off the async
    /// threads (a large JavaScript component takes seconds), and give it to
    /// every connection accepted from then on. Returns the new generation.
    ///
    /// Logs `reloading module` at once and one line with the outcome. On
    /// error the previous component stays in service.
    pub async fn reload(&self) -> Result<u64> {
        let _one_at_a_time = self.shared.busy.lock().await;
        let started = Instant::now();
        let current = self.current();
        let shared = self.shared.clone();
        let module = shared.module.display().to_string();
        // A large JavaScript or Python handler compiles for seconds: say so
        // at once.
        tracing::info!(%module, "reloading module");
        let loaded = tokio::task::spawn_blocking(move || {
            current.reload(&shared.module, shared.cache_dir.as_deref())
        })
        .await
        .context("the reload task failed")
        .and_then(|loaded| loaded);
        let ms = started.elapsed().as_millis() as u64;
        match loaded {
            Ok(mut next) => {
                let generation = next.generation();
                next.loaded = Some(Loaded::new(&self.shared.stats, generation));
                let previous = std::mem::replace(
                    &mut *self
                        .shared
                        .current
                        .write()
                        .unwrap_or_else(|poisoned| poisoned.into_inner()),
                    Arc::new(next),
                );
                if let Some(loaded) = &previous.loaded {
                    loaded.replaced.store(true, Ordering::Relaxed);
                }
                self.shared.stats.reloaded(true);
                tracing::info!(%module, generation, ms, "module reloaded: new connections use it");
                // If no connection still runs the previous generation, this
                // is its last reference, and dropping it resets every pool
                // slot that held its memory image: do that off the async
                // threads (and, above, outside the lock accepts take).
                // After the line above, so that its "unloaded" line follows.
                tokio::task::spawn_blocking(move || drop(previous));
                Ok(generation)
            }
            Err(e) => {
                self.shared.stats.reloaded(false);
                tracing::warn!(
                    %module,
                    generation = self.current().generation(),
                    error = format!("{e:#}"),
                    "reload failed: still serving the previous module"
                );
                Err(e)
            }
        }
    }
}

/// Counts a generation of the handler in [`Stats::loaded_generations`]
/// while its `Runtime` lives, and says when a replaced generation leaves
/// memory: the moment its last connection has ended, after which a reload
/// has fully taken effect.
pub(crate) struct Loaded {
    stats: Arc<Stats>,
    generation: u64,
    /// Set when a reload put another generation in service.
    replaced: AtomicBool,
}

impl Loaded {
    fn new(stats: &Arc<Stats>, generation: u64) -> Loaded {
        stats.generation_loaded();
        Loaded {
            stats: stats.clone(),
            generation,
            replaced: AtomicBool::new(false),
        }
    }
}

impl Drop for Loaded {
    fn drop(&mut self) {
        // Counted first, so that whoever reads the line sees the count.
        self.stats.generation_unloaded();
        if self.replaced.load(Ordering::Relaxed) {
            tracing::info!(
                generation = self.generation,
                "previous module unloaded: no connection runs it any more"
            );
        }
    }
}
