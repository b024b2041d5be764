//! The plugin runtime: one wasmtime engine per daemon, compiled components
//! cached (in memory, and optionally on disk), and a fresh sandboxed store
//! for every run.
//!
//! - [`PluginHost`] owns the engine and the epoch ticker that drives
//!   deadlines and cancellation.
//! - [`source`] resolves `builtin:NAME` or a path to component bytes.
//! - [`sandbox`] is the per-run store state: WASI context confined to one
//!   directory, memory limiter, captured stdout/stderr, log/progress sinks.
//! - [`collector`] and [`uploader`] bind their worlds and run them; what
//!   they share (linker, supervision, error classification) is in `run`.
//! - [`inspect`] says what a plugin file is and why this host cannot run
//!   it (`autocollect plugin check` and the daemon's start-up alike).

pub mod archive;
pub mod builtin;
pub mod collector;
pub mod exec;
pub mod inspect;
mod outbound;
mod run;
pub mod sandbox;
pub mod uploader;

use crate::hex;
use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use wasmtime::component::Component;
use wasmtime::{Config as EngineConfig, Engine};

pub use sandbox::{PluginEvent, RunLimits};

/// How often the engine's epoch advances. Deadlines and cancellation are
/// checked (and running plugins yield to the async runtime) at this pace.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// The version of the `autocollect:plugin` WIT package this host speaks
/// (`wit/*.wit`; a unit test keeps them equal).
pub const WIT_VERSION: &str = "0.1.5";

/// What identifies a loaded component, for the host's manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginIdentity {
    /// SHA-256 of the component's bytes (the compile cache's key), hex.
    pub sha256: String,
    /// The `autocollect:plugin` version in the component's own import and
    /// export names (the highest one), if it names any.
    pub wit_version: Option<String>,
}

/// The engine, its epoch ticker and the compiled-component cache.
pub struct PluginHost {
    engine: Engine,
    compiled: std::sync::Mutex<HashMap<[u8; 32], Component>>,
    disk_cache: Option<PathBuf>,
    ticker_stop: Arc<AtomicBool>,
}

/// Where a component's bytes come from.
#[derive(Debug, Clone)]
pub enum PluginSource {
    Builtin(&'static str),
    File(PathBuf),
}

impl PluginSource {
    /// Parse `builtin:NAME` or a file path; `base` resolves relative paths.
    pub fn parse(spec: &str, base: &Path) -> Result<PluginSource> {
        match spec.strip_prefix("builtin:") {
            Some(name) => builtin::lookup(name)
                .map(|(name, _)| PluginSource::Builtin(name))
                .with_context(|| {
                    format!(
                        "unknown built-in plugin {name:?} (built-ins: {})",
                        builtin::names().join(", ")
                    )
                }),
            None => Ok(PluginSource::File(base.join(spec))),
        }
    }

    /// The component's bytes (a file is read again at each call).
    pub fn bytes(&self) -> Result<std::borrow::Cow<'static, [u8]>> {
        match self {
            PluginSource::Builtin(name) => Ok(builtin::lookup(name).unwrap().1.into()),
            PluginSource::File(path) => std::fs::read(path)
                .map(Into::into)
                .with_context(|| format!("reading plugin {}", path.display())),
        }
    }
}

impl std::fmt::Display for PluginSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PluginSource::Builtin(name) => write!(f, "builtin:{name}"),
            PluginSource::File(path) => write!(f, "{}", path.display()),
        }
    }
}

impl PluginHost {
    /// A host with an in-memory cache, plus an on-disk one if `disk_cache`
    /// is given (the directory must be writable only by this daemon).
    pub fn new(disk_cache: Option<PathBuf>) -> Result<Arc<PluginHost>> {
        let mut config = EngineConfig::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        let engine = Engine::new(&config)?;

        let ticker_stop = Arc::new(AtomicBool::new(false));
        let (weak, stop) = (engine.weak(), ticker_stop.clone());
        std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    match weak.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => break,
                    }
                }
            })?;

        Ok(Arc::new(PluginHost {
            engine,
            compiled: Default::default(),
            disk_cache,
            ticker_stop,
        }))
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The compiled component for `source`: from memory, else from the disk
    /// cache, else compiled now (and stored in both).
    pub fn component(&self, source: &PluginSource) -> Result<Component> {
        let bytes = source.bytes()?;
        let key: [u8; 32] = Sha256::digest(&bytes).into();
        if let Some(c) = self.compiled.lock().unwrap().get(&key) {
            return Ok(c.clone());
        }
        inspect::check_encoding(&bytes).map_err(|why| anyhow::anyhow!("{source} {why}"))?;
        let component = self
            .load_or_compile(&bytes, &key)
            .with_context(|| format!("loading plugin {source}"))?;
        self.compiled.lock().unwrap().insert(key, component.clone());
        Ok(component)
    }

    /// The identity of a component this host compiled: its cache key (the
    /// SHA-256 of the bytes it was compiled from) and its WIT version.
    pub fn identity(&self, component: &Component) -> PluginIdentity {
        let key = self
            .compiled
            .lock()
            .unwrap()
            .iter()
            .find(|(_, c)| c.image_range() == component.image_range())
            .map(|(key, _)| *key);
        let ty = component.component_type();
        let names = ty
            .imports(&self.engine)
            .map(|(name, _)| name)
            .chain(ty.exports(&self.engine).map(|(name, _)| name));
        PluginIdentity {
            sha256: key.map(|k| hex(&k)).unwrap_or_default(),
            wit_version: wit_version(names),
        }
    }

    /// Compile `bytes` without consulting or filling any cache (benchmarks).
    pub fn compile_uncached(&self, bytes: &[u8]) -> Result<Component> {
        Ok(Component::new(&self.engine, bytes)?)
    }

    fn load_or_compile(&self, bytes: &[u8], key: &[u8; 32]) -> Result<Component> {
        let Some(dir) = &self.disk_cache else {
            return Ok(Component::new(&self.engine, bytes)?);
        };
        let path = dir.join(format!("{}.cwasm", self.cache_file_stem(key)));
        if path.is_file() {
            // SAFETY: the cache directory is the daemon's own (see config
            // docs) and files are written atomically by `store_in_cache`
            // below; wasmtime checks the engine compatibility header.
            match unsafe { Component::deserialize_file(&self.engine, &path) } {
                Ok(c) => return Ok(c),
                Err(e) => tracing::warn!(path = %path.display(), "ignoring bad cache entry: {e:#}"),
            }
        }
        let started = Instant::now();
        let component = Component::new(&self.engine, bytes)?;
        tracing::debug!(elapsed = ?started.elapsed(), "compiled plugin");
        if let Err(e) = store_in_cache(&path, &component) {
            tracing::warn!(path = %path.display(), "could not cache compiled plugin: {e:#}");
        }
        Ok(component)
    }

    /// File name: hash of the component bytes and of the engine settings,
    /// so a wasmtime upgrade or config change never loads stale code.
    fn cache_file_stem(&self, key: &[u8; 32]) -> String {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut h);
        format!("{}-{:016x}", hex(key), h.finish())
    }
}

/// The highest `autocollect:plugin@VERSION` among interface names.
fn wit_version<'a>(names: impl Iterator<Item = &'a str>) -> Option<String> {
    let parse = |v: &str| -> Option<Vec<u64>> { v.split('.').map(|p| p.parse().ok()).collect() };
    names
        .filter_map(|name| name.strip_prefix("autocollect:plugin/"))
        .filter_map(|rest| rest.split_once('@').map(|(_, v)| v))
        .filter_map(|v| parse(v).map(|key| (key, v.to_string())))
        .max()
        .map(|(_, v)| v)
}

fn store_in_cache(path: &Path, component: &Component) -> Result<()> {
    crate::files::write_atomically(path, &component.serialize()?)?;
    Ok(())
}

impl Drop for PluginHost {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_wit_version_is_the_one_in_wit() {
        let types = include_str!("../../../wit/types.wit");
        assert!(
            types.contains(&format!("package autocollect:plugin@{WIT_VERSION};")),
            "update WIT_VERSION"
        );
    }

    #[test]
    fn the_highest_package_version_in_the_names_wins() {
        let names = [
            "wasi:io/streams@0.2.6",
            "autocollect:plugin/log@0.1.0",
            "autocollect:plugin/collect@0.1.10",
            "autocollect:plugin/exec@0.1.2",
        ];
        assert_eq!(wit_version(names.into_iter()).as_deref(), Some("0.1.10"));
        assert_eq!(wit_version(["wasi:cli/env@0.2.0"].into_iter()), None);
    }
}
