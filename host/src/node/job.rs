//! The jobs of a session: run the collector into a fresh output
//! directory, later upload what it produced; report what happened as
//! [`NodeEvent`]s. A cancelled job's directory is removed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::NodeService;
use crate::plugin::collector::{CollectJob, Collected, RunError};
use crate::plugin::sandbox::RunLabels;
use crate::plugin::uploader::{Receipt, UploadFailure, UploadJob};
use crate::plugin::{PluginEvent, PluginSource};
use crate::protocol::{CollectParameters, NodeEvent};
use crate::upload::{Destination, Proxy};

/// Progress is forwarded at most this often.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);
/// Output kept in a failure report (the tail: that is where errors are).
pub const OUTPUT_TAIL: usize = 4096;

pub(super) async fn collect(
    node: Arc<NodeService>,
    task_id: String,
    parameters: CollectParameters,
    events: mpsc::UnboundedSender<NodeEvent>,
    cancel: CancellationToken,
) {
    let dir = node.jobs_dir.join(&task_id);
    let event = match prepare_dir(&dir).await {
        Ok(()) => {
            tracing::info!(task = %task_id, state = "started", "collector started");
            let _ = events.send(NodeEvent::Started);
            let event = run_collector(&node, &task_id, &dir, &parameters, &events, cancel).await;
            match (event, &parameters.log_dir) {
                (
                    NodeEvent::Collected {
                        path,
                        size,
                        summary,
                    },
                    Some(log_dir),
                ) => match move_into(Path::new(&path), Path::new(log_dir)).await {
                    Ok(path) => NodeEvent::Collected {
                        path,
                        size,
                        summary,
                    },
                    Err(e) => NodeEvent::Failed {
                        status_code: None,
                        output: format!("could not move {path} into logDir {log_dir}: {e}"),
                    },
                },
                (event, _) => event,
            }
        }
        Err(e) => NodeEvent::Failed {
            status_code: None,
            output: format!("could not create job directory {}: {e}", dir.display()),
        },
    };
    match &event {
        NodeEvent::Collected { path, size, .. } => {
            tracing::info!(task = %task_id, state = "collected", %path, "collection finished");
            node.record_artifact(&task_id, path.into(), *size);
        }
        NodeEvent::Failed {
            status_code,
            output,
        } => {
            tracing::warn!(task = %task_id, state = "failed", status_code = ?status_code, %output, "collection failed")
        }
        _ => {
            remove_dir(&dir).await;
            tracing::info!(task = %task_id, state = "cancelled", "collection cancelled");
        }
    }
    let _ = events.send(event);
}

/// What to upload where.
pub(super) struct UploadOrder {
    pub task_id: String,
    pub artifact: PathBuf,
    pub size: u64,
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
    let file = order
        .artifact
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let url = order.destination.url_for(&file);
    let _ = events.send(NodeEvent::UploadStarted { url: url.clone() });
    tracing::info!(task = %task_id, state = "startedUpload", %url, "upload started");

    // This node's own policy applies too, whoever coordinates.
    let event = match order.destination.check(&node.roles.upload_policy) {
        Err(reason) => NodeEvent::UploadFailed {
            url: url.clone(),
            status_code: None,
            output: format!("refused by node {}: {reason}", node.name),
        },
        Ok(origin) => {
            // The uploader sees its artifact's directory: if the zip was
            // moved into a shared logDir, show it a directory of its own.
            let staged = stage(&order.artifact, &node.jobs_dir.join(task_id)).await;
            let role = &node.roles.uploader;
            let (forwarder, progress_tx) = ProgressForwarder::start(&events);
            let result = role
                .plugin
                .upload(UploadJob {
                    labels: labels(&node, role.plugin.source(), task_id),
                    options: &role.options,
                    artifact: staged.path(),
                    artifact_size: order.size,
                    url: &url,
                    origin,
                    proxy: node.roles.upload_policy.proxy_for(order.proxy.as_ref()),
                    limits: role.limits,
                    progress: progress_tx,
                    cancel,
                })
                .await;
            forwarder.finish().await;
            staged.remove().await;
            upload_event(url.clone(), result)
        }
    };
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
        _ => {
            remove_dir(&node.jobs_dir.join(task_id)).await;
            tracing::info!(task = %task_id, state = "cancelled", "upload cancelled");
        }
    }
    let _ = events.send(event);
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

/// Remove a job directory (cancelled work), logging what goes wrong.
pub(super) async fn remove_dir(dir: &Path) {
    match tokio::fs::remove_dir_all(dir).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            tracing::warn!("removing {}: {e}", dir.display())
        }
        _ => {}
    }
}

fn labels(node: &NodeService, plugin: &PluginSource, task_id: &str) -> RunLabels {
    RunLabels {
        plugin: plugin.to_string(),
        task_id: task_id.to_string(),
        node: node.name.clone(),
    }
}
async fn prepare_dir(dir: &Path) -> std::io::Result<()> {
    match tokio::fs::remove_dir_all(dir).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    tokio::fs::create_dir_all(dir).await
}

/// The artifact as the uploader will see it.
enum Staged {
    /// Already alone in the job's directory.
    InPlace(PathBuf),
    /// Hard-linked into `job_dir/upload/` for the upload.
    Linked(PathBuf),
}

impl Staged {
    fn path(&self) -> &Path {
        match self {
            Staged::InPlace(p) | Staged::Linked(p) => p,
        }
    }

    async fn remove(self) {
        if let Staged::Linked(path) = self
            && let Some(dir) = path.parent()
        {
            remove_dir(dir).await;
        }
    }
}

/// Stage `artifact` for an upload from `job_dir`: as is when it lives
/// there, else hard-linked into `job_dir/upload/` (no copy). If the link
/// fails (another filesystem), the uploader sees the artifact's own
/// directory, which the log says.
async fn stage(artifact: &Path, job_dir: &Path) -> Staged {
    if artifact.parent() == Some(job_dir) {
        return Staged::InPlace(artifact.to_path_buf());
    }
    let dir = job_dir.join("upload");
    let linked = dir.join(artifact.file_name().unwrap_or_default());
    let link = async {
        tokio::fs::create_dir_all(&dir).await?;
        tokio::fs::hard_link(artifact, &linked).await
    };
    match link.await {
        Ok(()) => Staged::Linked(linked),
        Err(e) => {
            tracing::warn!(artifact = %artifact.display(),
                "could not link the artifact into the job directory ({e}): the uploader sees its whole directory");
            Staged::InPlace(artifact.to_path_buf())
        }
    }
}

/// Move `file` into `dir` (created if missing), across filesystems too;
/// the new path.
async fn move_into(file: &Path, dir: &Path) -> std::io::Result<String> {
    tokio::fs::create_dir_all(dir).await?;
    let to = dir.join(file.file_name().unwrap_or_default());
    if tokio::fs::rename(file, &to).await.is_err() {
        tokio::fs::copy(file, &to).await?;
        tokio::fs::remove_file(file).await?;
    }
    Ok(to.display().to_string())
}

async fn run_collector(
    node: &NodeService,
    task_id: &str,
    dir: &Path,
    parameters: &CollectParameters,
    events: &mpsc::UnboundedSender<NodeEvent>,
    cancel: CancellationToken,
) -> NodeEvent {
    let role = &node.roles.collector;
    let (forwarder, progress_tx) = ProgressForwarder::start(events);
    let labels = labels(node, role.plugin.source(), task_id);
    let result = role
        .plugin
        .collect(CollectJob {
            labels,
            options: &role.options,
            output_dir: dir,
            limits: role.limits,
            exec: role.exec.clone(),
            parameters: parameters.plugin_parameters(),
            progress: progress_tx,
            cancel,
        })
        .await;
    forwarder.finish().await;
    match result {
        Ok(collected) => match check_artifacts(dir, &collected) {
            Ok((path, size)) => NodeEvent::Collected {
                path,
                size,
                summary: collected.summary,
            },
            Err(output) => NodeEvent::Failed {
                status_code: None,
                output,
            },
        },
        Err(RunError::Cancelled) => NodeEvent::Cancelled,
        Err(RunError::Failed {
            status_code,
            output,
        }) => NodeEvent::Failed {
            status_code: Some(status_code.to_string()),
            output: tail(&output, OUTPUT_TAIL),
        },
        Err(e) => NodeEvent::Failed {
            status_code: None,
            output: tail(&e.to_string(), OUTPUT_TAIL),
        },
    }
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

/// The plugin says what it wrote; believe only what is on disk: a plain
/// file name, a regular file (not a link) inside the output directory.
fn check_artifacts(dir: &Path, collected: &Collected) -> Result<(String, u64), String> {
    let Some(first) = collected.artifacts.first() else {
        return Err("the collector reported no artifact".into());
    };
    for artifact in &collected.artifacts {
        let name = &artifact.name;
        let plain = !name.is_empty()
            && name != "."
            && name != ".."
            && !name.contains('/')
            && !name.contains('\\');
        if !plain {
            return Err(format!(
                "the collector reported an artifact outside its output directory: {name:?}"
            ));
        }
        match std::fs::symlink_metadata(dir.join(name)) {
            Ok(m) if m.file_type().is_file() => {}
            Ok(_) => return Err(format!("artifact {name:?} is not a regular file")),
            Err(e) => return Err(format!("artifact {name:?} is missing: {e}")),
        }
    }
    let path = dir.join(&first.name);
    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    Ok((path.display().to_string(), size))
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
