//! The `collector` world: load a component that exports `collect`, check
//! its options, and run it in a sandbox under a deadline and cancel token.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::run::{
    VALIDATION_LIMITS, classify, finish, link, new_run_store, store_deadline, supervise,
    validation_store,
};
use super::sandbox::{GUEST_OUTPUT_DIR, PluginEvent, RunLabels, RunLimits, RunSetup, RunState};
use super::{PluginHost, PluginSource};

pub use super::run::RunError;

pub(super) mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "collector",
        exports: { default: async },
    });
}

use bindings::CollectorPre;
use bindings::autocollect::plugin::{log, progress, types};
use bindings::exports::autocollect::plugin::collect::CollectRequest;

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
        let pre = CollectorPre::new(link(host, &source, false)?)
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
        let limits = VALIDATION_LIMITS;
        let (mut store, tail, cancel) = validation_store(&self.host, &self.source)?;
        let instance = self.pre.instantiate_async(&mut store).await;
        let instance = instance.map_err(|e| classify(&store, &tail, limits, e))?;
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
        let (mut store, tail) = new_run_store(
            &self.host,
            RunSetup {
                labels,
                output_dir: Some(output_dir),
                artifact_dir: None,
                http_origin: None,
                http_proxy: None,
                limits,
                progress: Some(progress),
                cancel: cancel.clone(),
            },
        )?;
        let instance = self.pre.instantiate_async(&mut store).await;
        let instance = instance.map_err(|e| classify(&store, &tail, limits, e))?;
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
}
