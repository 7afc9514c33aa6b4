//! Compiled-code cache: precompiled components on disk, keyed by the
//! component's SHA-256 and the engine's compatibility hash, so restarting
//! the server (or loading a large JavaScript or Python handler again) skips
//! Cranelift.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// The default cache directory: `$XDG_CACHE_HOME/wasm-sockserver`, else
/// `$HOME/.cache/wasm-sockserver`; `None` when neither is set.
pub fn default_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    Some(base.join("wasm-sockserver"))
}

/// A compiled component, and what its trip through the cache left to do.
pub struct Compiled {
    pub component: Component,
    /// The serialized code, for loading into a second engine with the same
    /// settings.
    pub artifact: Vec<u8>,
    pending: Pending,
}

/// Cache work held back until the component has passed every check: the
/// warnings about the cache met on the way, and the entry to write. A
/// module that turns out to be bad then gets its one-line error alone, and
/// leaves no entry behind.
#[derive(Default)]
struct Pending {
    /// (path, error, what went wrong)
    warnings: Vec<(PathBuf, String, &'static str)>,
    /// Where to store the artifact: set when it was compiled afresh.
    store: Option<PathBuf>,
}

impl Compiled {
    /// Log the cache warnings and write the new cache entry: call once the
    /// component is known to be a usable handler.
    pub fn commit(&self) {
        for (path, error, what) in &self.pending.warnings {
            tracing::warn!(path = %path.display(), %error, "{what}");
        }
        if let Some(path) = &self.pending.store
            && let Err(e) = store(path, &self.artifact)
        {
            tracing::warn!(path = %path.display(), error = format!("{e:#}"), "cannot write cache entry");
        }
    }
}

/// Compile `bytes` with `engine`, reusing compiled code from `dir` when a
/// matching entry exists; a new entry is written by [`Compiled::commit`].
/// Cache problems (unreadable, unwritable, corrupt entries) are never
/// fatal: the component is then simply compiled.
pub fn compile(engine: &Engine, bytes: &[u8], dir: Option<&Path>) -> Result<Compiled> {
    let mut pending = Pending::default();
    let dir = dir.filter(|dir| match unsafe_to_trust(dir) {
        Some(why) => {
            let warning = (dir.to_path_buf(), why, "cache directory not used");
            pending.warnings.push(warning);
            false
        }
        None => true,
    });
    let path = dir.map(|dir| dir.join(format!("{}.cwasm", key(engine, bytes))));
    if let Some(path) = &path {
        match read_private(path) {
            Ok(artifact) => {
                // SAFETY: the entry was written by `precompile_component` of
                // an engine with the same compatibility hash (it is in the
                // key) into a directory the operator trusts like the binary
                // itself; wasmtime still checks its header and settings.
                match unsafe { Component::deserialize(engine, &artifact) } {
                    Ok(component) => {
                        tracing::debug!(path = %path.display(), "loaded compiled component from cache");
                        return Ok(Compiled {
                            component,
                            artifact,
                            pending,
                        });
                    }
                    Err(e) => {
                        let warning =
                            (path.clone(), e.to_string(), "ignoring unusable cache entry");
                        pending.warnings.push(warning);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                let warning = (path.clone(), e.to_string(), "cannot read cache entry");
                pending.warnings.push(warning);
            }
        }
    }
    let start = Instant::now();
    let artifact = engine
        .precompile_component(bytes)
        .map_err(anyhow::Error::from)?;
    // SAFETY: produced a moment ago by this engine.
    let component =
        unsafe { Component::deserialize(engine, &artifact) }.map_err(anyhow::Error::from)?;
    tracing::debug!(
        ms = start.elapsed().as_millis() as u64,
        bytes = bytes.len(),
        "compiled component"
    );
    pending.store = path;
    Ok(Compiled {
        component,
        artifact,
        pending,
    })
}

/// Why code in `dir` must not be loaded, if it must not: the directory
/// exists but belongs to another user, or others may write to it (as ssh
/// refuses keys in such places). Anyone who can write there could plant
/// native code this server would run. A directory that does not exist yet
/// is created private by the first write.
fn unsafe_to_trust(dir: &Path) -> Option<String> {
    let meta = std::fs::metadata(dir).ok()?;
    not_private(&meta).map(|why| format!("{why}; make it private with chmod 700"))
}

/// Why a file or directory with `meta` is not this user's alone, if it is
/// not: another owner, or write access for group or others.
fn not_private(meta: &std::fs::Metadata) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Some(format!(
            "owned by uid {}, not by this server's uid {me}",
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Some(format!(
            "writable by group or others (mode {:o})",
            meta.mode() & 0o7777
        ));
    }
    None
}

/// Read a cache entry, which must be a regular file of this user's that
/// no one else may write, reached without following a symbolic link: the
/// checks are made on the open file, so the name cannot be swapped between
/// check and read.
fn read_private(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    if let Some(why) = not_private(&meta) {
        return Err(std::io::Error::other(why));
    }
    let mut artifact = Vec::with_capacity(meta.len() as usize);
    file.read_to_end(&mut artifact)?;
    Ok(artifact)
}

/// The cache key: the component's SHA-256 plus everything about the engine
/// that compiled code depends on, plus this server's version.
fn key(engine: &Engine, bytes: &[u8]) -> String {
    let mut hasher = DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    env!("CARGO_PKG_VERSION").hash(&mut hasher);
    let digest = Sha256::digest(bytes);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{hex}-{:016x}", hasher.finish())
}

/// Write atomically (temporary file, then rename) so a concurrent reader
/// never sees half an entry; the directory is private to its owner.
fn store(path: &Path, artifact: &[u8]) -> Result<()> {
    let dir = path.parent().context("cache path has no directory")?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    // Unique per process and per call: two servers in one process (tests,
    // embedders) may store the same entry at once.
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".tmp-{}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        path.file_name().unwrap_or_default().display()
    ));
    sweep(dir);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    let written = file
        .write_all(artifact)
        .context("cannot write the cache entry")
        .and_then(|()| {
            std::fs::rename(&tmp, path).context("cannot move the cache entry into place")
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// A temporary file older than this was left by a process that died or
/// was stopped mid-write (a reload abandoned at shutdown): writing one takes
/// milliseconds.
const STALE: Duration = Duration::from_secs(600);

/// Remove the stale temporary files in `dir`, so that writes cut short do
/// not pile up for ever. Done before each write, which is rare (a compile).
fn sweep(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let stale = entry
            .metadata()
            .and_then(|meta| meta.modified())
            .is_ok_and(|modified| modified.elapsed().is_ok_and(|age| age > STALE));
        if stale && entry.file_name().as_encoded_bytes().starts_with(b".tmp-") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}
