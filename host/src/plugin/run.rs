//! What every plugin run shares, whatever its world: the linker of host
//! imports, the supervisor that enforces cancel and deadline, and the
//! classification of how a run ended ([`RunError`]).

use std::future::Future;
use std::time::Duration;

use anyhow::Result;
use tokio_util::sync::CancellationToken;
use wasmtime::Store;
use wasmtime::component::{HasSelf, Linker};

use anyhow::anyhow;
use wasmtime::component::InstancePre;

use super::collector::bindings::autocollect::plugin::{
    archive, budget, exec, inputs, log, progress, task, types,
};
use super::inspect::{self, Role};
use super::sandbox::{
    Interrupted, OutputTail, RunLabels, RunLimits, RunSetup, RunState, new_store,
};
use super::{PluginHost, PluginSource};

/// The imports a plugin may use: WASI preview 2 (confined by the run's
/// `WasiCtx`), our `log` and `progress`, and its world's capability.
pub(super) fn linker(engine: &wasmtime::Engine, role: Role) -> Result<Linker<RunState>> {
    let mut linker = Linker::<RunState>::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    match role {
        Role::Collector => {
            exec::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
            task::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
            inputs::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
            budget::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
            archive::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
        }
        Role::Uploader => wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?,
    }
    types::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
    log::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
    progress::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
    Ok(linker)
}

/// Compile (or fetch from cache) `source` and link it against the
/// sandbox's imports for `role`, failing with the [`inspect`] diagnosis
/// (wrong role, another contract version, a missing import).
pub(super) fn link(
    host: &PluginHost,
    source: &PluginSource,
    role: Role,
) -> Result<InstancePre<RunState>> {
    let component = host.component(source)?;
    let inspection = inspect::Inspection::of(host.engine(), &component);
    inspect::diagnose(&inspection, role).map_err(|why| anyhow!("{source}: {why}"))?;
    linker(host.engine(), role)?
        .instantiate_pre(&component)
        .map_err(|e| anyhow!("{source}: {}", inspect::link_failure(&inspection, &e)))
}

/// Limits of a `validate-options` call.
pub(super) const VALIDATION_LIMITS: RunLimits = RunLimits {
    timeout: Duration::from_secs(10),
    memory_bytes: 64 << 20,
};

/// A store for a `validate-options` call: no filesystem, no network, the
/// [`VALIDATION_LIMITS`], and its cancel token.
pub(super) fn validation_store(
    host: &PluginHost,
    source: &PluginSource,
) -> Result<(Store<RunState>, OutputTail, CancellationToken), RunError> {
    let cancel = CancellationToken::new();
    let (store, tail) = new_run_store(
        host,
        RunSetup {
            budget: None,
            labels: RunLabels {
                plugin: source.to_string(),
                task_id: "-".into(),
                node: "-".into(),
            },
            output_dir: None,
            artifact_dir: None,
            http_origin: None,
            http_route: None,
            http_tls: None,
            exec: None,
            task_parameters: Vec::new(),
            inputs: &[],
            limits: VALIDATION_LIMITS,
            progress: None,
            observer: None,
            cancel: cancel.clone(),
        },
    )?;
    Ok((store, tail, cancel))
}

/// Why a plugin run did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunError {
    #[error("invalid option {key:?}: {message}")]
    InvalidOption { key: String, message: String },
    /// The collection ran and failed with a status code (Couchbase's
    /// `collectionStatusCode` / `collectionOutput`).
    #[error("collection failed with status {status_code}")]
    Failed { status_code: i32, output: String },
    #[error("plugin error: {0}")]
    Plugin(String),
    #[error("cancelled")]
    Cancelled,
    #[error("plugin exceeded its deadline of {0:?}")]
    Deadline(Duration),
    #[error("plugin exceeded its memory limit of {0} MiB")]
    MemoryLimit(u64),
    #[error("plugin trapped: {0}")]
    Trap(String),
    /// The host could not set the run up (e.g. output directory missing).
    #[error("{0}")]
    Host(String),
}

impl From<types::PluginError> for RunError {
    fn from(e: types::PluginError) -> Self {
        match e {
            types::PluginError::InvalidOption(o) => RunError::InvalidOption {
                key: o.key,
                message: o.message,
            },
            types::PluginError::Failed(f) => RunError::Failed {
                status_code: f.status_code,
                output: f.output,
            },
            types::PluginError::Internal(m) => RunError::Plugin(m),
        }
    }
}

/// A fresh store for one run, set up as `setup` says.
pub(super) fn new_run_store(
    host: &PluginHost,
    setup: RunSetup<'_>,
) -> Result<(Store<RunState>, OutputTail), RunError> {
    new_store(host.engine(), setup)
        .map_err(|e| RunError::Host(format!("setting up the sandbox: {e:#}")))
}

/// Deadline of a store created now with `limits` (the supervisor's copy of
/// the one the epoch callback enforces).
pub(super) fn store_deadline(limits: RunLimits) -> tokio::time::Instant {
    tokio::time::Instant::now() + limits.timeout
}

/// What happened to a guest call.
pub(super) enum Supervised<T> {
    Returned(wasmtime::Result<T>),
    Stopped(Interrupted),
}

/// Drive a guest call, but stop waiting for it on cancel or deadline even
/// while it is blocked in a host call (e.g. a WASI sleep) where the epoch
/// callback cannot run. Dropping the call's future abandons the instance.
pub(super) async fn supervise<T>(
    call: impl Future<Output = wasmtime::Result<T>>,
    cancel: &CancellationToken,
    deadline: tokio::time::Instant,
) -> Supervised<T> {
    tokio::select! {
        r = call => Supervised::Returned(r),
        _ = cancel.cancelled() => Supervised::Stopped(Interrupted::Cancelled),
        _ = tokio::time::sleep_until(deadline) => Supervised::Stopped(Interrupted::Deadline),
    }
}

/// Turn a supervised call into the plugin's own result, or a [`RunError`]
/// explaining why there is none.
pub(super) fn finish<T>(
    store: &Store<RunState>,
    tail: &OutputTail,
    limits: RunLimits,
    result: Supervised<T>,
) -> Result<T, RunError> {
    store.data().finish_logging();
    match result {
        Supervised::Returned(Ok(value)) => Ok(value),
        Supervised::Returned(Err(e)) => Err(classify(store, tail, limits, e)),
        Supervised::Stopped(why) => Err(interrupted(why, limits)),
    }
}

fn interrupted(why: Interrupted, limits: RunLimits) -> RunError {
    match why {
        Interrupted::Cancelled => RunError::Cancelled,
        Interrupted::Deadline => RunError::Deadline(limits.timeout),
    }
}

/// Explain a trap: our own interruption, the memory cap, or the guest's
/// fault (with the tail of its stderr, where a Rust panic message lands).
pub(super) fn classify(
    store: &Store<RunState>,
    tail: &OutputTail,
    limits: RunLimits,
    e: wasmtime::Error,
) -> RunError {
    if let Some(why) = e.downcast_ref::<Interrupted>() {
        return interrupted(*why, limits);
    }
    if store.data().memory_cap_hit() {
        return RunError::MemoryLimit((limits.memory_bytes >> 20) as u64);
    }
    let output = tail.contents();
    let output = output.trim();
    if output.is_empty() {
        RunError::Trap(format!("{e:#}"))
    } else {
        RunError::Trap(format!("{e:#}; plugin output: {output}"))
    }
}
