//! Compiled-code cache: precompiled components on disk, keyed by the
//! component's SHA-256 and the engine's compatibility hash, so restarting
//! the server (or loading a large JavaScript or Python handler again) skips
//! Cranelift.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

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

/// Compile `bytes` with `engine`, reusing compiled code from `dir` when a
/// matching entry exists and storing new code there. Returns the component
/// and its serialized artifact (for loading into a second engine with the
/// same settings). Cache problems (unreadable, unwritable, corrupt entries)
/// are logged and never fatal: the component is then simply compiled.
pub fn compile(engine: &Engine, bytes: &[u8], dir: Option<&Path>) -> Result<(Component, Vec<u8>)> {
    let path = dir.map(|dir| dir.join(format!("{}.cwasm", key(engine, bytes))));
    if let Some(path) = &path {
        match std::fs::read(path) {
            Ok(artifact) => {
                // SAFETY: the entry was written by `precompile_component` of
                // an engine with the same compatibility hash (it is in the
                // key) into a directory the operator trusts like the binary
                // itself; wasmtime still checks its header and settings.
                match unsafe { Component::deserialize(engine, &artifact) } {
                    Ok(component) => {
                        tracing::debug!(path = %path.display(), "loaded compiled component from cache");
                        return Ok((component, artifact));
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "ignoring unusable cache entry")
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot read cache entry"),
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
    if let Some(path) = &path
        && let Err(e) = store(path, &artifact)
    {
        tracing::warn!(path = %path.display(), error = format!("{e:#}"), "cannot write cache entry");
    }
    Ok((component, artifact))
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
    let mut file =
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    file.write_all(artifact)
        .context("cannot write the cache entry")?;
    std::fs::rename(&tmp, path).context("cannot move the cache entry into place")?;
    Ok(())
}
