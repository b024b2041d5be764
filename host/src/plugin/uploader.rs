//! The `uploader` world: load a component that exports `upload` and run it
//! with the artifact's directory read-only and outgoing HTTP confined to
//! the destination's origin.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::inspect::Role;
use super::run::{
    RunError, VALIDATION_LIMITS, classify, finish, link, new_run_store, store_deadline, supervise,
    validation_store,
};
use super::sandbox::{GUEST_ARTIFACT_DIR, PluginEvent, Route, RunLabels, RunLimits, RunSetup};
use super::{PluginHost, PluginSource};
use crate::upload::Origin;

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "uploader",
        exports: { default: async },
        with: {
            "autocollect:plugin/types": crate::plugin::collector::bindings::autocollect::plugin::types,
            "autocollect:plugin/log": crate::plugin::collector::bindings::autocollect::plugin::log,
            "autocollect:plugin/progress": crate::plugin::collector::bindings::autocollect::plugin::progress,
            "wasi:http": wasmtime_wasi_http::p2::bindings::http,
            "wasi:io": wasmtime_wasi::p2::bindings::io,
            "wasi:clocks": wasmtime_wasi::p2::bindings::clocks,
        },
    });
}

use bindings::UploaderPre;
use bindings::exports::autocollect::plugin::upload::UploadRequest;

/// What the plugin reports of a successful upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub url: String,
    pub status: u16,
    pub bytes_sent: u64,
    pub attempts: u32,
}

/// One upload to run.
pub struct UploadJob<'a> {
    pub labels: RunLabels,
    pub options: &'a [(String, String)],
    /// The artifact on the host; its directory is shown read-only.
    pub artifact: &'a Path,
    pub artifact_size: u64,
    /// The destination URL; its origin is the only one allowed.
    pub url: &'a str,
    pub origin: Origin,
    /// How allowed requests reach the destination: its checked
    /// addresses, or the proxy.
    pub route: Route,
    /// What TLS to the destination trusts.
    pub tls: Arc<rustls::ClientConfig>,
    pub limits: RunLimits,
    pub progress: watch::Sender<Option<PluginEvent>>,
    /// Sees every log line and progress report (local runs, tests).
    pub observer: Option<Arc<dyn super::sandbox::RunObserver>>,
    pub cancel: CancellationToken,
}

/// How an upload ended badly, with the requests the host refused (if the
/// plugin tried to reach anything but the destination).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadFailure {
    pub error: RunError,
    pub refused: Vec<String>,
}

/// A compiled uploader, ready to be instantiated for each run.
pub struct UploaderPlugin {
    host: Arc<PluginHost>,
    source: PluginSource,
    identity: super::PluginIdentity,
    pre: UploaderPre<super::sandbox::RunState>,
}

impl UploaderPlugin {
    pub fn load(host: &Arc<PluginHost>, source: PluginSource) -> Result<UploaderPlugin> {
        let pre = link(host, &source, Role::Uploader)?;
        let identity = host.identity(pre.component());
        let pre = UploaderPre::new(pre)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("plugin {source} does not export the uploader world"))?;
        Ok(UploaderPlugin {
            host: host.clone(),
            source,
            identity,
            pre,
        })
    }

    pub fn source(&self) -> &PluginSource {
        &self.source
    }

    /// The component's SHA-256 and the WIT version it was built against.
    pub fn identity(&self) -> &super::PluginIdentity {
        &self.identity
    }

    /// Ask the plugin whether `options` are acceptable (no filesystem, no
    /// network).
    pub async fn validate_options(&self, options: &[(String, String)]) -> Result<(), RunError> {
        let limits = VALIDATION_LIMITS;
        let (mut store, tail, cancel) = validation_store(&self.host, &self.source)?;
        let instance = self.pre.instantiate_async(&mut store).await;
        let instance = instance.map_err(|e| classify(&store, &tail, limits, e))?;
        let options = options.to_vec();
        let call = instance
            .autocollect_plugin_upload()
            .call_validate_options(&mut store, &options);
        let result = supervise(call, &cancel, store_deadline(limits)).await;
        finish(&store, &tail, limits, result)?.map_err(RunError::from)
    }

    /// Upload one artifact.
    pub async fn upload(&self, job: UploadJob<'_>) -> Result<Receipt, UploadFailure> {
        let no_refusals = |error| UploadFailure {
            error,
            refused: vec![],
        };
        let (dir, file) = match (job.artifact.parent(), job.artifact.file_name()) {
            (Some(d), Some(f)) => (d, f.to_string_lossy().into_owned()),
            _ => {
                return Err(no_refusals(RunError::Host(format!(
                    "not a file path: {}",
                    job.artifact.display()
                ))));
            }
        };
        let limits = job.limits;
        let (mut store, tail) = new_run_store(
            &self.host,
            RunSetup {
                budget: None,
                labels: job.labels,
                output_dir: None,
                artifact_dir: Some(dir),
                http_origin: Some(job.origin),
                http_route: Some(job.route),
                http_tls: Some(job.tls),
                exec: None,
                task_parameters: Vec::new(),
                inputs: &[],
                limits,
                progress: Some(job.progress),
                observer: job.observer,
                cancel: job.cancel.clone(),
            },
        )
        .map_err(no_refusals)?;
        let request = UploadRequest {
            context: super::collector::bindings::autocollect::plugin::types::JobContext {
                task_id: store.data().labels().task_id.clone(),
                node: store.data().labels().node.clone(),
            },
            options: job.options.to_vec(),
            artifact_path: format!("{GUEST_ARTIFACT_DIR}/{file}"),
            artifact_size: job.artifact_size,
            url: job.url.to_string(),
        };
        let instance = self.pre.instantiate_async(&mut store).await;
        let instance = instance
            .map_err(|e| classify(&store, &tail, limits, e))
            .map_err(no_refusals)?;
        let call = instance
            .autocollect_plugin_upload()
            .call_upload(&mut store, &request);
        let result = supervise(call, &job.cancel, store_deadline(limits)).await;
        let outcome = finish(&store, &tail, limits, result).and_then(|r| r.map_err(RunError::from));
        let refused = store.data().refused_requests().to_vec();
        match outcome {
            // An upload is done only when the whole artifact went out: an
            // uploader's receipt for less (a bug, or a plugin not to be
            // trusted) is a failed upload, never a silently short one.
            Ok(r) if r.bytes_sent != job.artifact_size => Err(UploadFailure {
                error: RunError::Plugin(format!(
                    "the uploader reported HTTP {} after sending {} of the artifact's {} bytes",
                    r.status, r.bytes_sent, job.artifact_size
                )),
                refused,
            }),
            Ok(r) => Ok(Receipt {
                url: r.url,
                status: r.status,
                bytes_sent: r.bytes_sent,
                attempts: r.attempts,
            }),
            Err(error) => Err(UploadFailure { error, refused }),
        }
    }
}
