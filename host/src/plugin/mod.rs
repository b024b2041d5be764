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
mod disk_cache;
mod epoch;
pub mod exec;
pub mod function_cache;
pub mod inspect;
mod outbound;
mod run;
pub mod sandbox;
pub mod uploader;

use crate::hex;
use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use wasmtime::component::Component;
use wasmtime::{
    Config as EngineConfig, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig,
};

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

/// How a host's engine allocates instances: from a pool reserved at
/// start, or on demand at each instantiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allocator {
    /// wasmtime's pooling allocator, sized by [`PoolSizing`].
    Pooling(PoolSizing),
    /// An mmap per memory, table and stack at each instantiation: what a
    /// one-shot command uses, and the fallback when the pool cannot be
    /// reserved (`reason`).
    OnDemand { reason: Option<String> },
}

impl std::fmt::Display for Allocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Allocator::Pooling(p) => write!(
                f,
                "pooling ({} instances, {} memories of at most {} MiB, {} GiB of address space reserved)",
                p.instances,
                p.memories(),
                p.max_memory_bytes >> 20,
                p.reserved_bytes() >> 30
            ),
            Allocator::OnDemand { reason: None } => write!(f, "on-demand"),
            Allocator::OnDemand { reason: Some(why) } => {
                write!(f, "on-demand (the pool could not be reserved: {why})")
            }
        }
    }
}

/// The pool's size: how many plugin instances may live at once, and the
/// largest linear memory one may have (the largest memory limit among
/// the roles, so no limit is ever below what the pool allows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSizing {
    /// Component instances alive at once. A node runs one job at a time:
    /// a collector run, its uploads, and the `validate-options` calls of a
    /// start or a reload fit many times over.
    pub instances: u32,
    /// Largest linear memory, in bytes (at most 4 GiB, wasm32's maximum).
    pub max_memory_bytes: usize,
}

impl PoolSizing {
    /// Default component instances alive at once.
    pub const INSTANCES: u32 = 16;
    /// Linear memories per component instance the pool holds on average
    /// (the Rust plugins have one; componentize-py's a few).
    const MEMORIES_PER_INSTANCE: u32 = 4;
    /// Core instances per component instance on average (a Rust plugin
    /// has a handful; an interpreter linked from shared libraries, tens).
    const CORE_INSTANCES_PER_INSTANCE: u32 = 32;
    /// Largest table (function references): the interpreters' tables
    /// hold tens of thousands of functions.
    const TABLE_ELEMENTS: usize = 200_000;
    /// Virtual address space each memory slot takes: wasmtime's default
    /// reservation (4 GiB, which spares the compiled code bounds checks)
    /// plus its default 32 MiB guard.
    const SLOT_BYTES: u64 = (4 << 30) + (32 << 20);
    /// Written pages of a released linear memory put back in place rather
    /// than decommitted (with PAGEMAP_SCAN only; see `config`): at most
    /// this much stays resident per slot between instances (16 MiB if all
    /// 64 slots were warm). A no-op run writes 12 KiB; 64 KiB and 1 MiB
    /// measured alike for it.
    const KEEP_RESIDENT_MEMORY: usize = 256 << 10;
    /// The same for a released table.
    const KEEP_RESIDENT_TABLE: usize = 64 << 10;
    /// Without PAGEMAP_SCAN: the first bytes of a released memory or
    /// table reset with `memset` (and kept resident), the rest `madvise`d.
    const KEEP_RESIDENT_MEMSET: usize = 64 << 10;

    /// A pool for roles whose memory limits are `limits` (bytes): the
    /// largest one (and the `validate-options` calls' own) is the largest
    /// memory a slot holds.
    pub fn for_limits(limits: impl IntoIterator<Item = usize>) -> PoolSizing {
        let page = 64 << 10;
        let largest = limits
            .into_iter()
            .chain([run::VALIDATION_LIMITS.memory_bytes])
            .max()
            .unwrap_or(0);
        PoolSizing {
            instances: Self::INSTANCES,
            max_memory_bytes: largest.div_ceil(page).saturating_mul(page).min(4 << 30),
        }
    }

    fn memories(&self) -> u32 {
        self.instances * Self::MEMORIES_PER_INSTANCE
    }

    /// Address space the memory pool reserves (not memory used: the
    /// slots are `PROT_NONE` until an instance uses them).
    pub fn reserved_bytes(&self) -> u64 {
        u64::from(self.memories()) * Self::SLOT_BYTES
    }

    fn config(&self) -> PoolingAllocationConfig {
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(self.instances)
            .total_core_instances(self.instances * Self::CORE_INSTANCES_PER_INSTANCE)
            .total_memories(self.memories())
            .total_tables(self.instances * Self::CORE_INSTANCES_PER_INSTANCE)
            .table_elements(Self::TABLE_ELEMENTS)
            .total_stacks(self.instances)
            .max_memory_size(self.max_memory_bytes)
            // A componentize-py module defines more than one memory.
            .max_memories_per_module(4)
            .max_tables_per_module(4);
        // How a released slot is reset (BENCHMARKS.md, "Plugin start from
        // the pool"). wasmtime's default `madvise(DONTNEED)`s the slot's
        // whole accessible memory, the pages the instance only read as
        // well as those it wrote: a TLB flush at each release, and the
        // next instance faults every page it uses in again (zero-filled
        // or from the image). Where the kernel has the PAGEMAP_SCAN ioctl
        // (Linux 6.7+), wasmtime asks it which pages were written and
        // puts back only those, copying the image's bytes (or zeros) over
        // them, up to the `keep_resident` amounts; they and the pages only
        // read stay mapped for the next instance, and only what lies past
        // that many written pages is `madvise`d. Contents after a reset
        // are the same either way (the image, zeros elsewhere, the slot's
        // protections as before): no instance sees another's data.
        // Without the ioctl, `keep_resident` is a `memset` of the slot's
        // first bytes, written or not, then `madvise` for the rest: 64 KiB
        // of it measured a little faster than none, a whole MiB slower.
        if PoolingAllocationConfig::is_pagemap_scan_available() {
            pool.pagemap_scan(Enabled::Yes)
                .linear_memory_keep_resident(Self::KEEP_RESIDENT_MEMORY)
                .table_keep_resident(Self::KEEP_RESIDENT_TABLE);
        } else {
            pool.linear_memory_keep_resident(Self::KEEP_RESIDENT_MEMSET)
                .table_keep_resident(Self::KEEP_RESIDENT_MEMSET);
        }
        // Not set, measured without gain in the same run (BENCHMARKS.md):
        // `decommit_batch_size` (released slots wait in its queue), a
        // smaller `memory_reservation` and guard, and
        // `signals_based_traps(false)` (bounds checks in every plugin's
        // code). `async_stack_keep_resident` only matters with
        // `async_stack_zeroing`, which is off (wasmtime's default); memory
        // protection keys need a CPU with `pku` (the bench machine's EPYC
        // VM has none).
        pool
    }
}

/// The engine, its epoch ticker and the compiled-component cache.
pub struct PluginHost {
    engine: Engine,
    allocator: Allocator,
    compiled: std::sync::Mutex<HashMap<[u8; 32], Component>>,
    disk_cache: Option<disk_cache::DiskCache>,
    /// Advances the engine's epoch while plugins run (stopped on drop).
    _ticker: epoch::Ticker,
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
    /// A host allocating instances on demand (a one-shot command), with
    /// an in-memory cache, plus an on-disk one if `disk_cache` is given
    /// (the directory must be writable only by this daemon).
    pub fn new(disk_cache: Option<PathBuf>) -> Result<Arc<PluginHost>> {
        let engine = Engine::new(&engine_config())?;
        PluginHost::with_engine(engine, Allocator::OnDemand { reason: None }, disk_cache)
    }

    /// A host for the plugin author's loop (`plugin run`, and the
    /// library's `testing` API): on demand, and keeping every compiled
    /// function in memory ([`function_cache`]), so that a rebuilt plugin
    /// compiles only what changed.
    pub fn for_authoring() -> Result<Arc<PluginHost>> {
        let mut config = engine_config();
        config.enable_incremental_compilation(Arc::new(function_cache::FunctionCache::new(
            function_cache::FunctionCache::CAPACITY,
        )))?;
        let engine = Engine::new(&config)?;
        PluginHost::with_engine(engine, Allocator::OnDemand { reason: None }, None)
    }

    /// A host whose instances come from a pool sized by `pool` (what the
    /// daemon runs), with copy-on-write memory images: an instance maps
    /// its plugin's initial memory instead of copying it. Where the pool's
    /// address space cannot be reserved (e.g. under `ulimit -v`), falls
    /// back to on-demand allocation and logs why.
    pub fn pooled(disk_cache: Option<PathBuf>, pool: PoolSizing) -> Result<Arc<PluginHost>> {
        PluginHost::pooled_tuned(disk_cache, pool, |_, _| {})
    }

    /// [`PluginHost::pooled`] with its engine and pool settings changed by
    /// `tune` after ours are applied (benchmarks compare settings in one
    /// process with it).
    #[doc(hidden)]
    pub fn pooled_tuned(
        disk_cache: Option<PathBuf>,
        pool: PoolSizing,
        tune: impl FnOnce(&mut EngineConfig, &mut PoolingAllocationConfig),
    ) -> Result<Arc<PluginHost>> {
        let mut config = engine_config();
        let mut pooling = pool.config();
        tune(&mut config, &mut pooling);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
        let (engine, allocator) = match Engine::new(&config) {
            Ok(engine) => (engine, Allocator::Pooling(pool)),
            Err(e) => {
                let reason = format!(
                    "{e:#} (it needs {} GiB of address space)",
                    pool.reserved_bytes() >> 30
                );
                tracing::warn!(
                    "plugin instance pool not available, allocating instances on demand \
                     (slower plugin starts): {reason}"
                );
                let engine = Engine::new(&engine_config())?;
                (
                    engine,
                    Allocator::OnDemand {
                        reason: Some(reason),
                    },
                )
            }
        };
        PluginHost::with_engine(engine, allocator, disk_cache)
    }

    fn with_engine(
        engine: Engine,
        allocator: Allocator,
        disk_cache: Option<PathBuf>,
    ) -> Result<Arc<PluginHost>> {
        let ticker = epoch::Ticker::start(&engine)?;

        Ok(Arc::new(PluginHost {
            engine,
            allocator,
            compiled: Default::default(),
            disk_cache: disk_cache
                .as_deref()
                .map(disk_cache::DiskCache::open)
                .transpose()?,
            _ticker: ticker,
        }))
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Let go of every compiled component this host keeps (those in use
    /// stay alive where they are used): `plugin run --watch`, once the
    /// file changed, so that a long session does not keep every build.
    pub fn forget_compiled(&self) {
        self.compiled.lock().unwrap().clear();
    }

    /// How this host's instances are allocated.
    pub fn allocator(&self) -> &Allocator {
        &self.allocator
    }

    /// Refuse a role's memory limit the pool cannot honour: one above its
    /// slots' size (set at start from the configured limits; a reload
    /// cannot grow them).
    pub fn check_memory_limit(&self, bytes: usize) -> Result<()> {
        if let Allocator::Pooling(pool) = &self.allocator
            && bytes > pool.max_memory_bytes
        {
            anyhow::bail!(
                "memory_limit_mb = {} is above the {} MiB the plugin instance pool was sized \
                 for at start: restart the daemon to raise it",
                bytes >> 20,
                pool.max_memory_bytes >> 20
            );
        }
        Ok(())
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
        match &self.disk_cache {
            Some(cache) => cache.load_or_compile(&self.engine, bytes, key),
            None => Ok(Component::new(&self.engine, bytes)?),
        }
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

/// The engine settings every host shares, whatever its allocator.
fn engine_config() -> EngineConfig {
    let mut config = EngineConfig::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    // Map a plugin's initial memory copy-on-write from its compiled image
    // (wasmtime's default, stated: the pool's fast starts rely on it).
    config.memory_init_cow(true);
    config
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
    fn the_pool_holds_the_largest_role_limit_in_whole_pages_up_to_4_gib() {
        let mib = |n: usize| n << 20;
        let sizing = PoolSizing::for_limits([mib(32), mib(512), mib(128)]);
        assert_eq!(sizing.max_memory_bytes, mib(512));
        assert_eq!(sizing.instances, PoolSizing::INSTANCES);
        // validate-options runs with 64 MiB whatever the roles say.
        assert_eq!(PoolSizing::for_limits([mib(1)]).max_memory_bytes, mib(64));
        assert_eq!(
            PoolSizing::for_limits([mib(100) + 1]).max_memory_bytes,
            mib(100) + (64 << 10)
        );
        assert_eq!(
            PoolSizing::for_limits([mib(8192)]).max_memory_bytes,
            4 << 30
        );
    }

    #[test]
    fn a_pooled_host_refuses_a_limit_above_its_slots_and_an_on_demand_one_none() {
        let sizing = PoolSizing {
            instances: 1,
            max_memory_bytes: 64 << 20,
        };
        let host = PluginHost::pooled(None, sizing).unwrap();
        assert_eq!(host.allocator(), &Allocator::Pooling(sizing));
        assert!(host.check_memory_limit(64 << 20).is_ok());
        let refused = host.check_memory_limit(65 << 20).unwrap_err().to_string();
        assert!(refused.contains("restart the daemon"), "{refused}");
        let on_demand = PluginHost::new(None).unwrap();
        assert!(on_demand.check_memory_limit(4 << 30).is_ok());
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
