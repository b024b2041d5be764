//! The `collector` world: load a component that exports `collect`, check
//! its options, and run it in a sandbox under a deadline and cancel token.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use wasmtime::Store;
use wasmtime::component::{HasSelf, Linker};

use super::sandbox::{
    GUEST_OUTPUT_DIR, Interrupted, OutputTail, PluginEvent, RunLabels, RunLimits, RunSetup,
    RunState, new_store,
};
use super::{PluginHost, PluginSource};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "collector",
        exports: { default: async },
    });
}

use bindings::autocollect::plugin::{log, progress, types};
use bindings::exports::autocollect::plugin::collect::CollectRequest;
use bindings::{Collector, CollectorPre};

impl types::Host for RunState {}

impl log::Host for RunState {
    fn log(&mut self, level: log::Level, message: String) {
        let level = match level {
            log::Level::Trace => tracing::Level::TRACE,
            log::Level::Debug => tracing::Level::DEBUG,
            log::Level::Info => tracing::Level::INFO,
            log::Level::Warn => tracing::Level::WARN,
            log::Level::Error => tracing::Level::ERROR,
        };
        RunState::log(self, level, &message);
    }
}

impl progress::Host for RunState {
    fn report(&mut self, done: u64, total: u64, message: String) {
        self.progress(done, total, &message);
    }
}

/// A file a collector produced, as the plugin described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    pub name: String,
    pub size: u64,
}

/// A successful collection, as the plugin described it.
#[derive(Debug, Clone)]
pub struct Collected {
    pub artifacts: Vec<Artifact>,
    pub summary: String,
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

/// A compiled collector, ready to be instantiated for each run.
pub struct CollectorPlugin {
    host: Arc<PluginHost>,
    source: PluginSource,
    pre: CollectorPre<RunState>,
}

impl CollectorPlugin {
    /// Compile (or fetch from cache) and link a collector. Fails with a
    /// clear message if the component imports something the sandbox does
    /// not offer or does not export the `collector` world.
    pub fn load(host: &Arc<PluginHost>, source: PluginSource) -> Result<CollectorPlugin> {
        let component = host.component(&source)?;
        let mut linker = Linker::<RunState>::new(host.engine());
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        Collector::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
        let pre = linker
            .instantiate_pre(&component)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("plugin {source} needs imports the sandbox does not offer"))?;
        let pre = CollectorPre::new(pre)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("plugin {source} does not export the collector world"))?;
        Ok(CollectorPlugin {
            host: host.clone(),
            source,
            pre,
        })
    }

    pub fn source(&self) -> &PluginSource {
        &self.source
    }

    /// Ask the plugin whether `options` are acceptable (no filesystem).
    pub async fn validate_options(&self, options: &[(String, String)]) -> Result<(), RunError> {
        let labels = RunLabels {
            plugin: self.source.to_string(),
            task_id: "-".into(),
            node: "-".into(),
        };
        let limits = RunLimits {
            timeout: Duration::from_secs(10),
            memory_bytes: 64 << 20,
        };
        let cancel = CancellationToken::new();
        let (mut store, tail) = self.store(labels, None, limits, None, cancel.clone())?;
        let instance = self.instantiate(&mut store, &tail, limits).await?;
        let options = options.to_vec();
        let call = instance
            .autocollect_plugin_collect()
            .call_validate_options(&mut store, &options);
        let result = supervise(call, &cancel, store_deadline(limits)).await;
        finish(&store, &tail, limits, result)?.map_err(RunError::from)
    }

    /// Run one collection into `output_dir` (host path, which must exist).
    /// Progress goes to `progress`; `cancel` stops the run at once.
    pub async fn collect(
        &self,
        labels: RunLabels,
        options: &[(String, String)],
        output_dir: &Path,
        limits: RunLimits,
        progress: watch::Sender<Option<PluginEvent>>,
        cancel: CancellationToken,
    ) -> Result<Collected, RunError> {
        let request = CollectRequest {
            context: types::JobContext {
                task_id: labels.task_id.clone(),
                node: labels.node.clone(),
            },
            options: options.to_vec(),
            output_dir: GUEST_OUTPUT_DIR.to_string(),
        };
        let (mut store, tail) = self.store(
            labels,
            Some(output_dir),
            limits,
            Some(progress),
            cancel.clone(),
        )?;
        let instance = self.instantiate(&mut store, &tail, limits).await?;
        let call = instance
            .autocollect_plugin_collect()
            .call_collect(&mut store, &request);
        let result = supervise(call, &cancel, store_deadline(limits)).await;
        let outcome = finish(&store, &tail, limits, result)?.map_err(RunError::from)?;
        Ok(Collected {
            artifacts: outcome
                .artifacts
                .into_iter()
                .map(|a| Artifact {
                    name: a.name,
                    size: a.size,
                })
                .collect(),
            summary: outcome.summary,
        })
    }

    fn store(
        &self,
        labels: RunLabels,
        output_dir: Option<&Path>,
        limits: RunLimits,
        progress: Option<watch::Sender<Option<PluginEvent>>>,
        cancel: CancellationToken,
    ) -> Result<(Store<RunState>, OutputTail), RunError> {
        new_store(
            self.host.engine(),
            RunSetup {
                labels,
                output_dir,
                limits,
                progress,
                cancel,
            },
        )
        .map_err(|e| RunError::Host(format!("setting up the sandbox: {e:#}")))
    }

    async fn instantiate(
        &self,
        store: &mut Store<RunState>,
        tail: &OutputTail,
        limits: RunLimits,
    ) -> Result<Collector, RunError> {
        let result = self.pre.instantiate_async(&mut *store).await;
        match result {
            Ok(instance) => Ok(instance),
            Err(e) => Err(classify(store, tail, limits, e)),
        }
    }
}

/// Deadline of a store created now with `limits` (the supervisor's copy of
/// the one the epoch callback enforces).
fn store_deadline(limits: RunLimits) -> tokio::time::Instant {
    tokio::time::Instant::now() + limits.timeout
}

/// What happened to a guest call.
enum Supervised<T> {
    Returned(wasmtime::Result<T>),
    Stopped(Interrupted),
}

/// Drive a guest call, but stop waiting for it on cancel or deadline even
/// while it is blocked in a host call (e.g. a WASI sleep) where the epoch
/// callback cannot run. Dropping the call's future abandons the instance.
async fn supervise<T>(
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
fn finish<T>(
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
fn classify(
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
