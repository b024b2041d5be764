//! This node's side of a collection: the session slot (the cluster-wide
//! lock, see [`crate::protocol`]) and the job that runs the collector.
//!
//! A node holds at most one session. A session runs at most one job at a
//! time: first the collector, then (when the coordinator says so) the
//! uploader on what it collected. The session ends when its stream is
//! dropped (the coordinator closed it, or its connection died) or when
//! the coordinator has not been heard from for the session's lease (it
//! hangs, or the network between us is cut); a job still running is then
//! stopped.

pub(crate) mod budget;
mod job;
pub mod plugins;
pub mod storage;
mod stream;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::plugin::RunLimits;
use crate::plugin::exec::ExecPolicy;
use crate::protocol::{
    Busy, CollectParameters, MAX_LEASE_MS, MIN_LEASE_MS, NodeEvent, OpenSession, TaskId,
};
use crate::upload::{Destination, Proxy, UploadPolicy};
use storage::{Kept, Storage};

pub use plugins::{ActivePlugins, PluginSet};
pub use stream::{SessionStream, event_line};

/// How this node runs the plugin of one role.
pub struct Role<P> {
    pub plugin: Arc<P>,
    pub options: Vec<(String, String)>,
    pub limits: RunLimits,
    /// Programs the plugin may start (collectors).
    pub exec: Arc<ExecPolicy>,
    /// Host directories the plugin may read (collectors).
    pub inputs: Vec<crate::config::InputGrant>,
}

impl<P> Clone for Role<P> {
    fn clone(&self) -> Self {
        Role {
            plugin: self.plugin.clone(),
            options: self.options.clone(),
            limits: self.limits,
            exec: self.exec.clone(),
            inputs: self.inputs.clone(),
        }
    }
}

/// The plugins this node runs, and where it lets data go.
pub struct Roles {
    /// Replaced by a reload; each job keeps the set it started with.
    pub plugins: ActivePlugins,
    pub upload_policy: UploadPolicy,
    /// What uploads' TLS trusts (built from `upload_policy`).
    pub upload_tls: Arc<crate::upload::UploadTls>,
}

/// The task this node most recently took part in, and who coordinated it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRef {
    pub task_id: TaskId,
    pub coordinator: String,
}

pub struct NodeService {
    name: String,
    storage: Arc<Storage>,
    roles: Roles,
    heartbeat: Duration,
    slot: Mutex<Option<Session>>,
    next_session_id: AtomicU64,
    /// The task this node most recently joined, watched by event streams
    /// (which follow its coordinator).
    last_task: watch::Sender<Option<TaskRef>>,
    /// `true` while no session holds the slot (for `/health?waitIdle=`).
    idle: watch::Sender<bool>,
    /// A simulated node ([`crate::simulated`]): its jobs run no plugin.
    noop_jobs: bool,
}

struct Session {
    id: u64,
    task: TaskRef,
    events: mpsc::UnboundedSender<NodeEvent>,
    job: Option<Job>,
    /// Set when the collector succeeded: what the upload sends.
    artifact: Option<Kept>,
    /// Some job ran in this session (a job may run only once per phase).
    collected_once: bool,
    /// The coordinator let go, and the job is stopping: the slot stays
    /// taken until it has (so cleanup never overlaps the next task), but
    /// the session takes no more commands.
    closing: bool,
    /// When the coordinator last spoke to us (a command or a ping).
    heard: Instant,
    lease: Duration,
}

struct Job {
    cancel: CancellationToken,
    handle: JoinHandle<()>,
    phase: Phase,
}

/// What a job is doing, to report its end in the right phase.
enum Phase {
    Collect,
    Upload { url: String },
    Cleanup,
}

/// Why a session could not open.
#[derive(Debug)]
pub enum OpenError {
    /// Another session holds the slot.
    Busy(Busy),
    /// This node is chosen but should not collect now.
    LowDisk(String),
}

fn session_of<'a>(
    slot: &'a mut Option<Session>,
    task_id: &TaskId,
) -> Result<&'a mut Session, StartJobError> {
    match slot.as_mut() {
        Some(s) if s.task.task_id == *task_id && !s.closing => {
            s.heard = Instant::now();
            Ok(s)
        }
        _ => Err(StartJobError::NoSession(task_id.to_string())),
    }
}

/// Why a job could not start.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StartJobError {
    #[error("no session for task {0} on this node")]
    NoSession(String),
    #[error("the job of task {0} has already started")]
    AlreadyStarted(String),
    #[error("task {0} has nothing collected to upload")]
    NothingToUpload(String),
}

impl NodeService {
    /// The uploads' TLS configuration (reloaded on SIGHUP).
    pub fn upload_tls(&self) -> &Arc<crate::upload::UploadTls> {
        &self.roles.upload_tls
    }

    /// The plugins this node runs (replaced by a reload).
    pub fn plugins(&self) -> &ActivePlugins {
        &self.roles.plugins
    }

    pub fn new(
        name: String,
        storage: Storage,
        roles: Roles,
        heartbeat: Duration,
    ) -> Arc<NodeService> {
        NodeService::build(name, Arc::new(storage), roles, heartbeat, false)
    }

    /// A node whose collection job runs no plugin and writes nothing: it
    /// reports `started`, then `collected` with a made-up artifact. Only
    /// for the simulated-node harness ([`crate::simulated`]), which serves
    /// many of these (sharing one `storage`) behind the real node-to-node
    /// handlers; no configuration makes one. It cannot upload.
    pub fn simulated(
        name: String,
        storage: Arc<Storage>,
        roles: Roles,
        heartbeat: Duration,
    ) -> Arc<NodeService> {
        NodeService::build(name, storage, roles, heartbeat, true)
    }

    fn build(
        name: String,
        storage: Arc<Storage>,
        roles: Roles,
        heartbeat: Duration,
        noop_jobs: bool,
    ) -> Arc<NodeService> {
        Arc::new(NodeService {
            name,
            storage,
            roles,
            heartbeat,
            slot: Mutex::new(None),
            next_session_id: AtomicU64::new(1),
            last_task: watch::Sender::new(None),
            idle: watch::Sender::new(true),
            noop_jobs,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// Take the session slot for `req`, or say why not. The caller has
    /// checked that `req.coordinator` is a node of the cluster and the one
    /// that asked.
    pub fn open_session(self: &Arc<Self>, req: OpenSession) -> Result<SessionStream, OpenError> {
        let mut slot = self.slot.lock().unwrap();
        if let Some(s) = slot.as_ref() {
            return Err(OpenError::Busy(Busy {
                task_id: s.task.task_id.to_string(),
                coordinator: s.task.coordinator.clone(),
            }));
        }
        if req.collects
            && let Some(low) = self.storage.low_disk()
        {
            tracing::warn!(task = %req.task_id, "refusing to collect: {low}");
            return Err(OpenError::LowDisk(low));
        }
        let id = self.next_session_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let task = TaskRef {
            task_id: req.task_id,
            coordinator: req.coordinator,
        };
        let lease = Duration::from_millis(
            req.lease_ms
                .unwrap_or(3 * self.heartbeat.as_millis() as u64)
                .clamp(MIN_LEASE_MS, MAX_LEASE_MS),
        );
        tracing::info!(task = %task.task_id, coordinator = %task.coordinator, ?lease, "session opened");
        self.last_task.send_replace(Some(task.clone()));
        *slot = Some(Session {
            id,
            task,
            events: tx,
            job: None,
            artifact: None,
            collected_once: false,
            closing: false,
            heard: Instant::now(),
            lease,
        });
        self.idle.send_replace(false);
        tokio::spawn(self.clone().watch_lease(id));
        Ok(SessionStream::new(
            self.clone(),
            id,
            rx,
            self.heartbeat,
            lease,
        ))
    }

    /// End session `id` when its coordinator falls silent for its lease.
    async fn watch_lease(self: Arc<Self>, id: u64) {
        loop {
            let (due, lease, coordinator) = match self.slot.lock().unwrap().as_ref() {
                Some(s) if s.id == id && !s.closing => {
                    (s.heard + s.lease, s.lease, s.task.coordinator.clone())
                }
                _ => return,
            };
            if Instant::now() < due {
                tokio::time::sleep_until(due).await;
                continue;
            }
            let reason = format!(
                "{} stopped its job: no word from coordinator {coordinator} for {}",
                self.name,
                crate::coordinator::peers::secs(lease)
            );
            tracing::warn!("{reason}");
            self.release(id, Some(reason));
            return;
        }
    }

    /// The coordinator is still there (renews the lease).
    pub fn ping(&self, task_id: &TaskId) -> bool {
        session_of(&mut self.slot.lock().unwrap(), task_id).is_ok()
    }

    /// Start the collector for the session of `task_id`.
    pub fn start_job(
        self: &Arc<Self>,
        task_id: &TaskId,
        parameters: CollectParameters,
    ) -> Result<(), StartJobError> {
        let mut slot = self.slot.lock().unwrap();
        let session = session_of(&mut slot, task_id)?;
        if session.collected_once {
            return Err(StartJobError::AlreadyStarted(task_id.to_string()));
        }
        session.collected_once = true;
        let cancel = CancellationToken::new();
        let handle = if self.noop_jobs {
            tokio::spawn(job::noop(self.clone(), session.events.clone()))
        } else {
            tokio::spawn(job::collect(
                self.clone(),
                task_id.clone(),
                parameters,
                session.events.clone(),
                cancel.clone(),
            ))
        };
        session.job = Some(Job {
            cancel,
            handle,
            phase: Phase::Collect,
        });
        Ok(())
    }

    /// Upload what the session of `task_id` collected to `destination`.
    pub fn start_upload(
        self: &Arc<Self>,
        task_id: &TaskId,
        destination: Destination,
        proxy: Option<Proxy>,
    ) -> Result<(), StartJobError> {
        let mut slot = self.slot.lock().unwrap();
        let session = session_of(&mut slot, task_id)?;
        // The artifact is recorded just before the collector's job sends
        // `collected` and ends: once it is here, that job is finishing.
        let Some(artifact) = session.artifact.take() else {
            return Err(StartJobError::NothingToUpload(task_id.to_string()));
        };
        let collector = session.job.take().map(|j| j.handle);
        let cancel = CancellationToken::new();
        let url = destination.url_for(&artifact.file);
        let upload = job::upload(
            self.clone(),
            job::UploadOrder {
                task_id: task_id.clone(),
                artifact,
                url: url.clone(),
                destination,
                proxy,
            },
            session.events.clone(),
            cancel.clone(),
        );
        let handle = tokio::spawn(async move {
            if let Some(collector) = collector {
                let _ = collector.await;
            }
            upload.await
        });
        session.job = Some(Job {
            cancel,
            handle,
            phase: Phase::Upload { url },
        });
        Ok(())
    }

    /// The collector of `task_id` kept `artifact`: keep it for the upload.
    fn record_artifact(&self, task_id: &TaskId, artifact: Kept) {
        if let Some(s) = self.slot.lock().unwrap().as_mut()
            && s.task.task_id == *task_id
        {
            s.artifact = Some(artifact);
        }
    }

    /// Cancel the job of `task_id`, if this node runs it. Returns whether
    /// there was a session for that task.
    pub fn cancel_job(self: &Arc<Self>, task_id: &TaskId) -> bool {
        let mut slot = self.slot.lock().unwrap();
        let Ok(s) = session_of(&mut slot, task_id) else {
            return false;
        };
        match &s.job {
            Some(job) if !job.handle.is_finished() => job.cancel.cancel(),
            // Nothing running (not started yet, or collected and waiting
            // to upload): remove what there is, confirm. This cleanup is
            // the session's job now, so closing waits for it.
            _ => {
                let orphan = (task_id.clone(), s.artifact.take());
                let events = s.events.clone();
                let storage = self.storage.clone();
                let handle = tokio::spawn(async move {
                    let (task, kept) = orphan;
                    let _ =
                        tokio::task::spawn_blocking(move || storage.discard(&task, kept.as_ref()))
                            .await;
                    let _ = events.send(NodeEvent::Cancelled);
                });
                s.job = Some(Job {
                    cancel: CancellationToken::new(),
                    handle,
                    phase: Phase::Cleanup,
                });
            }
        }
        true
    }

    /// End the session of `task_id` (the coordinator is done with it).
    pub fn close_session(self: &Arc<Self>, task_id: &TaskId) -> bool {
        let id = match self.slot.lock().unwrap().as_ref() {
            Some(s) if s.task.task_id == *task_id && !s.closing => s.id,
            _ => return false,
        };
        self.release(id, None);
        true
    }

    /// The task this node holds a session for right now, if any.
    pub fn current_task(&self) -> Option<TaskRef> {
        self.slot.lock().unwrap().as_ref().map(|s| s.task.clone())
    }

    /// Wait (up to `wait`) until no session holds this node; returns
    /// whether it is idle.
    pub async fn wait_idle(&self, wait: Duration) -> bool {
        let mut rx = self.idle.subscribe();
        let _ = tokio::time::timeout(wait, rx.wait_for(|idle| *idle)).await;
        *self.idle.borrow()
    }

    /// The task this node most recently joined (running or not).
    pub fn last_task(&self) -> Option<TaskRef> {
        self.last_task.borrow().clone()
    }

    /// Changes of [`NodeService::last_task`].
    pub fn follow_last_task(&self) -> watch::Receiver<Option<TaskRef>> {
        self.last_task.subscribe()
    }

    /// End session `id` if it still holds the slot. A job still running
    /// is stopped (after a failure event saying `reason`, if the node gave
    /// up on its coordinator), and the slot is freed once the job has
    /// stopped and cleaned up, not before.
    fn release(self: &Arc<Self>, id: u64, reason: Option<String>) {
        let mut slot = self.slot.lock().unwrap();
        let Some(session) = slot.as_mut().filter(|s| s.id == id && !s.closing) else {
            return;
        };
        // A collected artifact stays where it was kept (status shows its
        // path), under the retention rules.
        match session.job.take() {
            Some(job) if !job.handle.is_finished() => {
                session.closing = true;
                if let Some(reason) = reason {
                    let event = match job.phase {
                        Phase::Collect => Some(NodeEvent::Failed {
                            status_code: None,
                            output: reason,
                        }),
                        Phase::Upload { url } => Some(NodeEvent::UploadFailed {
                            url,
                            status_code: None,
                            output: reason,
                        }),
                        Phase::Cleanup => None,
                    };
                    if let Some(event) = event {
                        let _ = session.events.send(event);
                    }
                }
                job.cancel.cancel();
                let node = self.clone();
                tokio::spawn(async move {
                    let _ = job.handle.await;
                    node.free_slot(id);
                });
            }
            _ => {
                drop(slot);
                self.free_slot(id);
            }
        }
    }

    fn free_slot(&self, id: u64) {
        let mut slot = self.slot.lock().unwrap();
        if slot.as_ref().is_some_and(|s| s.id == id) {
            let session = slot.take().expect("checked above");
            self.idle.send_replace(true);
            tracing::info!(task = %session.task.task_id, "session closed");
        }
    }

    /// Daemon shutdown: cancel any job and wait (bounded) for its cleanup.
    pub async fn shutdown(&self, grace: Duration) {
        if let Some(session) = self.slot.lock().unwrap().as_ref()
            && let Some(job) = &session.job
        {
            job.cancel.cancel();
        }
        // A session gives up the slot only once its job has stopped and
        // cleaned up (including one already closing), so idle means done.
        self.wait_idle(grace).await;
    }
}
