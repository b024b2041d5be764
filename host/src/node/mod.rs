//! This node's side of a collection: the session slot (the cluster-wide
//! lock, see [`crate::protocol`]) and the job that runs the collector.
//!
//! A node holds at most one session. A session may carry one job. The
//! session ends when its stream is dropped — the coordinator closed it,
//! or its connection died — and a job still running is then cancelled.

mod job;
mod stream;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::plugin::RunLimits;
use crate::plugin::collector::CollectorPlugin;
use crate::protocol::{Busy, NodeEvent, OpenSession};

pub use stream::SessionStream;

/// How this node runs its collector.
pub struct CollectorRole {
    pub plugin: Arc<CollectorPlugin>,
    pub options: Vec<(String, String)>,
    pub limits: RunLimits,
}

/// The task this node most recently took part in, and who coordinated it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRef {
    pub task_id: String,
    pub coordinator: String,
}

pub struct NodeService {
    name: String,
    jobs_dir: PathBuf,
    collector: CollectorRole,
    heartbeat: Duration,
    slot: Mutex<Option<Session>>,
    next_session_id: AtomicU64,
    last_task: Mutex<Option<TaskRef>>,
    /// `true` while no session holds the slot (for `/health?waitIdle=`).
    idle: watch::Sender<bool>,
}

struct Session {
    id: u64,
    task: TaskRef,
    events: mpsc::UnboundedSender<NodeEvent>,
    job: Option<Job>,
}

struct Job {
    cancel: CancellationToken,
    handle: JoinHandle<()>,
}

/// Why a job could not start.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StartJobError {
    #[error("no session for task {0} on this node")]
    NoSession(String),
    #[error("the job of task {0} has already started")]
    AlreadyStarted(String),
}

impl NodeService {
    pub fn new(
        name: String,
        data_dir: PathBuf,
        collector: CollectorRole,
        heartbeat: Duration,
    ) -> Arc<NodeService> {
        Arc::new(NodeService {
            name,
            jobs_dir: data_dir.join("jobs"),
            collector,
            heartbeat,
            slot: Mutex::new(None),
            next_session_id: AtomicU64::new(1),
            last_task: Mutex::new(None),
            idle: watch::Sender::new(true),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Take the session slot for `req`, or say who holds it.
    pub fn open_session(self: &Arc<Self>, req: OpenSession) -> Result<SessionStream, Busy> {
        let mut slot = self.slot.lock().unwrap();
        if let Some(s) = slot.as_ref() {
            return Err(Busy {
                task_id: s.task.task_id.clone(),
                coordinator: s.task.coordinator.clone(),
            });
        }
        let id = self.next_session_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let task = TaskRef {
            task_id: req.task_id,
            coordinator: req.coordinator,
        };
        tracing::info!(task = %task.task_id, coordinator = %task.coordinator, "session opened");
        *self.last_task.lock().unwrap() = Some(task.clone());
        *slot = Some(Session {
            id,
            task,
            events: tx,
            job: None,
        });
        self.idle.send_replace(false);
        Ok(SessionStream::new(self.clone(), id, rx, self.heartbeat))
    }

    /// Start the collector for the session of `task_id`.
    pub fn start_job(self: &Arc<Self>, task_id: &str) -> Result<(), StartJobError> {
        let mut slot = self.slot.lock().unwrap();
        let session = match slot.as_mut() {
            Some(s) if s.task.task_id == task_id => s,
            _ => return Err(StartJobError::NoSession(task_id.to_string())),
        };
        if session.job.is_some() {
            return Err(StartJobError::AlreadyStarted(task_id.to_string()));
        }
        let cancel = CancellationToken::new();
        let handle = tokio::spawn(job::run(
            self.clone(),
            task_id.to_string(),
            session.events.clone(),
            cancel.clone(),
        ));
        session.job = Some(Job { cancel, handle });
        Ok(())
    }

    /// Cancel the job of `task_id`, if this node runs it. Returns whether
    /// there was a session for that task.
    pub fn cancel_job(&self, task_id: &str) -> bool {
        let slot = self.slot.lock().unwrap();
        match slot.as_ref() {
            Some(s) if s.task.task_id == task_id => {
                if let Some(job) = &s.job {
                    job.cancel.cancel();
                } else {
                    // Nothing running yet: confirm at once.
                    let _ = s.events.send(NodeEvent::Cancelled);
                }
                true
            }
            _ => false,
        }
    }

    /// End the session of `task_id` (the coordinator is done with it).
    pub fn close_session(&self, task_id: &str) -> bool {
        let id = match self.slot.lock().unwrap().as_ref() {
            Some(s) if s.task.task_id == task_id => s.id,
            _ => return false,
        };
        self.release(id);
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
        self.last_task.lock().unwrap().clone()
    }

    /// Release the slot if session `id` still holds it; cancel its job.
    fn release(&self, id: u64) {
        let mut slot = self.slot.lock().unwrap();
        if slot.as_ref().is_some_and(|s| s.id == id) {
            let session = slot.take().unwrap();
            if let Some(job) = session.job {
                job.cancel.cancel();
            }
            self.idle.send_replace(true);
            tracing::info!(task = %session.task.task_id, "session closed");
        }
    }

    /// Daemon shutdown: cancel any job and wait (bounded) for its cleanup.
    pub async fn shutdown(&self, grace: Duration) {
        let job = self
            .slot
            .lock()
            .unwrap()
            .as_mut()
            .and_then(|s| s.job.take());
        if let Some(job) = job {
            job.cancel.cancel();
            let _ = tokio::time::timeout(grace, job.handle).await;
        }
    }
}
