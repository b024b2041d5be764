//! The jobs of a session: run the collector into a fresh output
//! directory under its disk budget, keep what it produced out of its
//! reach, later upload it; report what happened as [`NodeEvent`]s. What
//! a failed or cancelled job wrote is removed (unless `keep_failed`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::budget::{self, BudgetWatch, Limits};
use super::storage::{JobDirs, Kept};
use super::{NodeService, Role};
use crate::manifest::{self, Manifest};
use crate::metrics::{RunOutcome, RunRole};
use crate::plugin::collector::{CollectJob, Collected, CollectorPlugin, RunError};
use crate::plugin::sandbox::{JobBudget, Route, RunLabels};
use crate::plugin::uploader::{Receipt, UploadFailure, UploadJob, UploaderPlugin};
use crate::plugin::{PluginEvent, PluginSource};
use crate::protocol::{CollectParameters, NodeEvent, TaskId};
use crate::safe_dir::SafeDir;
use crate::upload::{Destination, Proxy};

/// Progress is forwarded at most this often.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);
/// Output kept in a failure report (the tail: that is where errors are).
pub const OUTPUT_TAIL: usize = 4096;

/// Why the host stopped a job itself (its budget), when it did.
#[derive(Clone, Default)]
struct Breach(Arc<Mutex<Option<String>>>);

impl Breach {
    fn reason(&self) -> Option<String> {
        self.0.lock().unwrap().clone()
    }
}

pub(super) async fn collect(
    node: Arc<NodeService>,
    task_id: TaskId,
    parameters: CollectParameters,
    events: mpsc::UnboundedSender<NodeEvent>,
    cancel: CancellationToken,
) {
    let storage = node.storage.clone();
    let (task, tmp) = (task_id.clone(), parameters.tmp_dir.clone());
    let prepared = tokio::task::spawn_blocking(move || {
        if let Some(low) = storage.low_disk() {
            return Err(low);
        }
        storage.prepare_job(&task, tmp.as_deref())
    })
    .await
    .unwrap_or_else(|e| Err(format!("preparing the job: {e}")));
    let dirs = match prepared {
        Ok(dirs) => dirs,
        Err(output) => {
            tracing::warn!(task = %task_id, state = "failed", %output, "collection failed");
            let _ = events.send(NodeEvent::Failed {
                status_code: None,
                output,
            });
            return;
        }
    };
    // This job runs on the plugins current now, whatever a reload brings.
    let plugins = node.plugins().current();
    let breach = Breach::default();
    let urgent = Arc::new(AtomicBool::new(false));
    let usage = Arc::new(budget::Usage::default());
    // No collector runs without its disk budget watched: its limits on
    // bytes and files are enforced by that watch alone.
    let watch = start_budget(&node, &dirs, &breach, &urgent, &cancel, &usage);
    let started = std::time::Instant::now();
    let result = match &watch {
        Ok(_) => {
            tracing::info!(task = %task_id, state = "started", "collector started");
            let _ = events.send(NodeEvent::Started {
                plugin: Some(plugins.collector_ref()),
            });
            let settings = node.storage.settings();
            let controls = RunControls {
                cancel,
                urgent,
                budget: Some(JobBudget {
                    max_bytes: settings.job_max_mb << 20,
                    max_files: settings.job_max_files,
                    archives: usage.archives.clone(),
                    usage: Arc::new(move || (usage.bytes(), usage.entries())),
                }),
                role: &plugins.collector,
            };
            run_collector(&node, &task_id, &dirs, &parameters, &events, controls).await
        }
        Err(why) => Err(NodeEvent::Failed {
            status_code: None,
            output: why.clone(),
        }),
    };
    let wall_time = started.elapsed();
    crate::metrics::global()
        .collection_seconds
        .observe(wall_time);

    let storage = node.storage.clone();
    let task = task_id.clone();
    let log_dir = parameters.log_dir.clone();
    let manifest_node = node.clone();
    // One event per job: its size does not matter.
    #[allow(clippy::result_large_err)]
    let event = tokio::task::spawn_blocking(move || {
        // Ending the watch waits for the watcher thread to let go of the
        // job, which may be in the middle of walking a large tree: off
        // the runtime's threads. A breach is reported before this returns
        // or never, so it is read after.
        drop(watch);
        let breached = breach.reason();
        storage.remove_tmp(&task, &dirs);
        let outcome = match (result, breached) {
            (_, Some(reason)) => Err(NodeEvent::Failed {
                status_code: None,
                output: reason,
            }),
            (Ok(collected), None) => {
                let names: Vec<String> =
                    collected.artifacts.iter().map(|a| a.name.clone()).collect();
                match storage.keep(&task, &dirs, &names, log_dir.as_deref()) {
                    Ok(mut kept) => {
                        let manifest = manifest_of(
                            &manifest_node,
                            &plugins.collector,
                            &task,
                            &kept,
                            &parameters,
                            &collected,
                            wall_time,
                        );
                        match storage.write_manifest(&task, &mut kept, &manifest.to_json()) {
                            Ok(()) => Ok((
                                kept,
                                collected.summary,
                                collected.partial,
                                collected.ignored,
                            )),
                            Err(output) => {
                                // Kept in logDir: not left there without its manifest.
                                storage.discard(&task, Some(&kept));
                                Err(NodeEvent::Failed {
                                    status_code: None,
                                    output,
                                })
                            }
                        }
                    }
                    Err(output) => Err(NodeEvent::Failed {
                        status_code: None,
                        output,
                    }),
                }
            }
            (Err(event), None) => Err(event),
        };
        drop(dirs);
        match outcome {
            Ok(kept) => {
                storage.remove_output(&task);
                storage.apply_retention(Some(&task));
                Ok(kept)
            }
            Err(event) => {
                storage.discard(&task, None);
                Err(event)
            }
        }
    })
    .await
    .unwrap_or_else(|e| {
        Err(NodeEvent::Failed {
            status_code: None,
            output: format!("finishing the job: {e}"),
        })
    });

    let event = match event {
        Ok((kept, summary, partial, ignored)) => {
            if let Some(why) = &partial {
                tracing::info!(task = %task_id, partial = %why, "the collection is partial");
            }
            let event = NodeEvent::Collected {
                path: kept.path.display().to_string(),
                size: kept.size,
                summary,
                sha256: Some(kept.sha256.clone()),
                partial,
                ignored,
            };
            tracing::info!(task = %task_id, state = "collected", path = %kept.path.display(), "collection finished");
            crate::metrics::global().collected_bytes.add(kept.size);
            node.record_artifact(&task_id, kept);
            event
        }
        Err(event @ NodeEvent::Failed { .. }) => {
            if let NodeEvent::Failed {
                status_code,
                output,
            } = &event
            {
                tracing::warn!(task = %task_id, state = "failed", status_code = ?status_code, %output, "collection failed");
            }
            event
        }
        Err(event) => {
            tracing::info!(task = %task_id, state = "cancelled", "collection cancelled");
            event
        }
    };
    let _ = events.send(event);
}

/// A simulated node's job ([`NodeService::simulated`]): the events of a
/// collection that ran no plugin and kept nothing.
pub(super) async fn noop(node: Arc<NodeService>, events: mpsc::UnboundedSender<NodeEvent>) {
    let _ = events.send(NodeEvent::Started {
        plugin: Some(node.plugins().current().collector_ref()),
    });
    let _ = events.send(NodeEvent::Collected {
        path: format!("/simulated/{}.zip", node.name()),
        size: 0,
        summary: String::new(),
        sha256: Some("0".repeat(64)),
        partial: None,
        ignored: Vec::new(),
    });
}

/// The host's manifest of a kept collection.
fn manifest_of(
    node: &NodeService,
    role: &Role<CollectorPlugin>,
    task: &TaskId,
    kept: &Kept,
    parameters: &CollectParameters,
    collected: &Collected,
    wall_time: Duration,
) -> Manifest {
    Manifest::new(manifest::Inputs {
        task_id: task.as_str(),
        node: &node.name,
        artifact: manifest::ArtifactInfo {
            name: kept.file.clone(),
            size: kept.size,
            sha256: kept.sha256.clone(),
        },
        plugin_source: role.plugin.source().to_string(),
        plugin: role.plugin.identity(),
        options: &role.options,
        parameters,
        grants: &role.inputs,
        collected,
        wall_time,
        bytes_written: kept.bytes_kept,
    })
}

/// Watch the job's directories; on a breach, stop the run at once (its
/// programs get no grace) and remember why. An error says why the watch
/// could not be set up (no inotify instance or watch left, say).
fn start_budget(
    node: &NodeService,
    dirs: &JobDirs,
    breach: &Breach,
    urgent: &Arc<AtomicBool>,
    cancel: &CancellationToken,
    usage: &Arc<budget::Usage>,
) -> Result<BudgetWatch, String> {
    let settings = node.storage.settings();
    let limits = Limits {
        max_bytes: settings.job_max_mb << 20,
        max_entries: settings.job_max_files,
        min_free_bytes: settings.min_free_mb << 20,
    };
    let roots = [&dirs.output, &dirs.tmp]
        .into_iter()
        .map(SafeDir::try_clone)
        .collect::<std::io::Result<Vec<_>>>();
    // The output directory is in `data_dir`: its filesystem's free space.
    let free_space_of = dirs.output.try_clone();
    let (breach, urgent, cancel) = (breach.clone(), urgent.clone(), cancel.clone());
    let started = roots.and_then(|roots| {
        budget::watch(
            roots,
            free_space_of?,
            limits,
            usage.clone(),
            move |reason| {
                *breach.0.lock().unwrap() = Some(reason);
                urgent.store(true, Ordering::Relaxed);
                cancel.cancel();
            },
        )
    });
    started.map_err(|e| {
        let why = format!(
            "the collector was not run: its disk use cannot be watched ({e}), and that \
             watch is what holds it to the job's limits on bytes and files"
        );
        tracing::error!("{why}");
        why
    })
}

/// What to upload where.
pub(super) struct UploadOrder {
    pub task_id: TaskId,
    pub artifact: Kept,
    /// Where the artifact goes (the destination and its file name).
    pub url: String,
    pub destination: Destination,
    /// The request's proxy; else this node's `[upload] proxy`.
    pub proxy: Option<Proxy>,
}

pub(super) async fn upload(
    node: Arc<NodeService>,
    order: UploadOrder,
    events: mpsc::UnboundedSender<NodeEvent>,
    cancel: CancellationToken,
) {
    let task_id = &order.task_id;
    let url = order.url.clone();
    // This upload (artifact and manifest) runs on the uploader current now.
    let plugins = node.plugins().current();
    let role = &plugins.uploader;
    let _ = events.send(NodeEvent::UploadStarted {
        url: url.clone(),
        plugin: Some(plugins.uploader_ref()),
    });
    tracing::info!(task = %task_id, state = "startedUpload", %url, "upload started");
    let started = std::time::Instant::now();

    let event = match prepare_upload(&node, &order).await {
        Err(reason) => NodeEvent::UploadFailed {
            url: url.clone(),
            status_code: None,
            output: format!("refused by node {}: {reason}", node.name),
        },
        Ok((origin, route)) => match stage(&node, &order).await {
            Err(output) => NodeEvent::UploadFailed {
                url: url.clone(),
                status_code: None,
                output,
            },
            Ok(staged) => {
                let (forwarder, progress_tx) = ProgressForwarder::start(&events);
                let result = run_uploader(
                    &node,
                    role,
                    &order,
                    &staged,
                    order.artifact.size,
                    &url,
                    (origin.clone(), route.clone()),
                    progress_tx,
                    cancel.clone(),
                )
                .await;
                forwarder.finish().await;
                match upload_event(url.clone(), result) {
                    NodeEvent::Uploaded { url, bytes_sent } => {
                        match upload_manifest(&node, role, &order, origin, route, cancel).await {
                            Ok(()) => NodeEvent::Uploaded { url, bytes_sent },
                            Err(event) => event,
                        }
                    }
                    other => other,
                }
            }
        },
    };
    let storage = node.storage.clone();
    let (task, kept, cancelled) = (
        task_id.clone(),
        order.artifact.clone(),
        event == NodeEvent::Cancelled,
    );
    let _ = tokio::task::spawn_blocking(move || {
        storage.unstage(&task);
        if cancelled {
            storage.discard(&task, Some(&kept));
        }
    })
    .await;
    crate::metrics::global()
        .upload_seconds
        .observe(started.elapsed());
    match &event {
        NodeEvent::Uploaded { bytes_sent, .. } => {
            tracing::info!(task = %task_id, state = "uploaded", %url, bytes_sent, "upload finished")
        }
        NodeEvent::UploadFailed {
            status_code,
            output,
            ..
        } => {
            tracing::warn!(task = %task_id, state = "failedUpload", %url, status_code = ?status_code, %output, "upload failed")
        }
        _ => tracing::info!(task = %task_id, state = "cancelled", "upload cancelled"),
    }
    let _ = events.send(event);
}

/// This node's own policy applies too, whoever coordinates: the
/// destination, the proxy, and (without a proxy) the addresses the host
/// resolves to, which are then the only ones the upload may connect to.
async fn prepare_upload(
    node: &NodeService,
    order: &UploadOrder,
) -> Result<(crate::upload::Origin, Route), String> {
    let policy = &node.roles.upload_policy;
    let origin = order.destination.check(policy)?;
    if let Some(proxy) = &order.proxy {
        policy.check_proxy(proxy)?;
    }
    match policy.proxy_for(order.proxy.as_ref()) {
        Some(proxy) => Ok((origin, Route::Proxy(proxy))),
        None => {
            let addrs = policy.resolve(&origin).await?;
            Ok((origin, Route::Direct(addrs)))
        }
    }
}

/// Run the uploader on one staged file.
#[allow(clippy::too_many_arguments)]
async fn run_uploader(
    node: &NodeService,
    role: &Role<UploaderPlugin>,
    order: &UploadOrder,
    staged: &std::path::Path,
    size: u64,
    url: &str,
    (origin, route): (crate::upload::Origin, Route),
    progress: watch::Sender<Option<PluginEvent>>,
    cancel: CancellationToken,
) -> Result<Receipt, UploadFailure> {
    let result = role
        .plugin
        .upload(UploadJob {
            labels: labels(node, role.plugin.source(), &order.task_id),
            options: &role.options,
            artifact: staged,
            artifact_size: size,
            url,
            origin,
            route,
            tls: node.roles.upload_tls.current(),
            limits: role.limits,
            progress,
            observer: None,
            cancel,
        })
        .await;
    let metrics = crate::metrics::global();
    match &result {
        Ok(receipt) => {
            metrics.uploaded_bytes.add(receipt.bytes_sent);
            metrics.plugin_run(RunRole::Uploader, RunOutcome::Ok);
        }
        Err(failure) => metrics.plugin_run(RunRole::Uploader, run_outcome(&failure.error)),
    }
    result
}

/// How a run that returned `error` ended, for the metrics.
fn run_outcome(error: &RunError) -> RunOutcome {
    match error {
        RunError::InvalidOption { .. } | RunError::Failed { .. } | RunError::Plugin(_) => {
            RunOutcome::Failed
        }
        RunError::Cancelled => RunOutcome::Cancelled,
        RunError::Deadline(_) => RunOutcome::Deadline,
        RunError::MemoryLimit(_) => RunOutcome::Memory,
        RunError::Trap(_) => RunOutcome::Trap,
        RunError::Host(_) => RunOutcome::Host,
    }
}

/// After the artifact: its manifest, as `<artifact>.manifest.json` at the
/// same base URL, through the same uploader and staging. A failure fails
/// the node's upload (`failedUpload`), saying the artifact itself arrived.
async fn upload_manifest(
    node: &NodeService,
    role: &Role<UploaderPlugin>,
    order: &UploadOrder,
    origin: crate::upload::Origin,
    route: Route,
    cancel: CancellationToken,
) -> Result<(), NodeEvent> {
    let artifact_url = order.url.clone();
    let name = manifest::name_for(&order.artifact.file);
    let url = order.destination.url_for(&name);
    let failed = |status_code, output: String| NodeEvent::UploadFailed {
        url: artifact_url.clone(),
        status_code,
        output: tail(
            &format!("the artifact was uploaded, but its manifest was not ({url}): {output}"),
            OUTPUT_TAIL,
        ),
    };
    let storage = node.storage.clone();
    let (task, kept) = (order.task_id.clone(), order.artifact.clone());
    let staged = tokio::task::spawn_blocking(move || storage.stage_manifest(&task, &kept))
        .await
        .map_err(|e| format!("staging the manifest: {e}"))
        .and_then(|r| r)
        .map_err(|output| failed(None, output))?;
    let size = std::fs::metadata(&staged)
        .map(|m| m.len())
        .map_err(|e| failed(None, format!("staged manifest: {e}")))?;
    // Progress stays the artifact's: the manifest's is not forwarded.
    let (progress, _) = watch::channel(None);
    let result = run_uploader(
        node,
        role,
        order,
        &staged,
        size,
        &url,
        (origin, route),
        progress,
        cancel,
    )
    .await;
    match upload_event(url.clone(), result) {
        NodeEvent::Uploaded { .. } => {
            tracing::info!(task = %order.task_id, %url, "manifest uploaded");
            Ok(())
        }
        NodeEvent::UploadFailed {
            status_code,
            output,
            ..
        } => Err(failed(status_code, output)),
        other => Err(other),
    }
}

/// The artifact alone in a host-owned directory, for the uploader.
async fn stage(node: &NodeService, order: &UploadOrder) -> Result<std::path::PathBuf, String> {
    let storage = node.storage.clone();
    let (task, kept) = (order.task_id.clone(), order.artifact.clone());
    tokio::task::spawn_blocking(move || storage.stage(&task, &kept))
        .await
        .map_err(|e| format!("staging the artifact: {e}"))?
}

fn upload_event(url: String, result: Result<Receipt, UploadFailure>) -> NodeEvent {
    let failure = match result {
        Ok(receipt) => {
            return NodeEvent::Uploaded {
                url,
                bytes_sent: receipt.bytes_sent,
            };
        }
        Err(UploadFailure {
            error: RunError::Cancelled,
            ..
        }) => return NodeEvent::Cancelled,
        Err(failure) => failure,
    };
    let (status_code, mut output) = match failure.error {
        RunError::Failed {
            status_code,
            output,
        } => (Some(status_code.to_string()), output),
        other => (None, other.to_string()),
    };
    if !failure.refused.is_empty() {
        output = format!(
            "{output}\nthe host refused requests outside the upload destination: {}",
            failure.refused.join(", ")
        );
    }
    NodeEvent::UploadFailed {
        url,
        status_code,
        output: tail(&output, OUTPUT_TAIL),
    }
}

fn labels(node: &NodeService, plugin: &PluginSource, task_id: &TaskId) -> RunLabels {
    RunLabels {
        plugin: plugin.to_string(),
        task_id: task_id.to_string(),
        node: node.name.clone(),
    }
}

/// How a collector run is stopped, what it may hold, and which collector.
struct RunControls<'a> {
    cancel: CancellationToken,
    /// Set (before `cancel`) when the run must stop without grace.
    urgent: Arc<AtomicBool>,
    /// The job's disk budget, for `budget.wrap-up`.
    budget: Option<JobBudget>,
    /// The collector, as the job started.
    role: &'a Role<CollectorPlugin>,
}

/// Run the collector; its result, or the event that says why there is
/// none.
async fn run_collector(
    node: &NodeService,
    task_id: &TaskId,
    dirs: &JobDirs,
    parameters: &CollectParameters,
    events: &mpsc::UnboundedSender<NodeEvent>,
    controls: RunControls<'_>,
) -> Result<Collected, NodeEvent> {
    let RunControls {
        cancel,
        urgent,
        budget,
        role,
    } = controls;
    let (forwarder, progress_tx) = ProgressForwarder::start(events);
    let labels = labels(node, role.plugin.source(), task_id);
    // Programs get the job's own temporary directory, whatever was asked.
    let parameters = CollectParameters {
        tmp_dir: Some(dirs.tmp_path().display().to_string()),
        ..parameters.clone()
    };
    let result = role
        .plugin
        .collect(CollectJob {
            labels,
            options: &role.options,
            output_dir: dirs.output_path(),
            limits: role.limits,
            exec: role.exec.clone(),
            parameters: parameters.plugin_parameters(),
            inputs: &role.inputs,
            budget,
            progress: progress_tx,
            observer: None,
            cancel,
            urgent,
        })
        .await;
    forwarder.finish().await;
    crate::metrics::global().plugin_run(
        RunRole::Collector,
        result.as_ref().err().map_or(RunOutcome::Ok, run_outcome),
    );
    result.map_err(|e| match e {
        RunError::Cancelled => NodeEvent::Cancelled,
        RunError::Failed {
            status_code,
            output,
        } => NodeEvent::Failed {
            status_code: Some(status_code.to_string()),
            output: tail(&output, OUTPUT_TAIL),
        },
        e => NodeEvent::Failed {
            status_code: None,
            output: tail(&e.to_string(), OUTPUT_TAIL),
        },
    })
}

/// Forwards a run's progress to the session, at most every
/// [`PROGRESS_INTERVAL`], and the last report when the run ends, so the
/// final state (e.g. every byte sent) is never lost to the throttle.
struct ProgressForwarder {
    task: tokio::task::JoinHandle<()>,
    latest: watch::Receiver<Option<PluginEvent>>,
    events: mpsc::UnboundedSender<NodeEvent>,
}

impl ProgressForwarder {
    /// The forwarder, and the sender the plugin run reports into.
    fn start(
        events: &mpsc::UnboundedSender<NodeEvent>,
    ) -> (ProgressForwarder, watch::Sender<Option<PluginEvent>>) {
        let (tx, rx) = watch::channel(None);
        let task = tokio::spawn(forward_progress(rx.clone(), events.clone()));
        let forwarder = ProgressForwarder {
            task,
            latest: rx,
            events: events.clone(),
        };
        (forwarder, tx)
    }

    /// The run is over: stop throttling and send its last report.
    async fn finish(self) {
        self.task.abort();
        let _ = self.task.await;
        if let Some(event) = progress_event(self.latest.borrow().clone()) {
            let _ = self.events.send(event);
        }
    }
}

fn progress_event(event: Option<PluginEvent>) -> Option<NodeEvent> {
    match event? {
        PluginEvent::Progress {
            done,
            total,
            message,
        } => Some(NodeEvent::Progress {
            done,
            total,
            message,
        }),
    }
}

async fn forward_progress(
    mut rx: watch::Receiver<Option<PluginEvent>>,
    events: mpsc::UnboundedSender<NodeEvent>,
) {
    while rx.changed().await.is_ok() {
        if let Some(event) = progress_event(rx.borrow_and_update().clone()) {
            let _ = events.send(event);
        }
        tokio::time::sleep(PROGRESS_INTERVAL).await;
    }
}

/// The last `max` bytes of `s` (on a character boundary).
pub fn tail(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].to_string()
}
