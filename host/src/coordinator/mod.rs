//! One collection task across the cluster, coordinated by the node that
//! received the start request.
//!
//! Start: validate the node selection, then open a session on **every**
//! node of the cluster (not only the chosen ones): the sessions are the
//! cluster-wide lock. If any node already holds one, every session just
//! opened is dropped and the start is refused; nothing waits on anything,
//! so two coordinators starting at once cannot deadlock (at worst both are
//! refused). Chosen nodes that cannot be reached are marked `failed`; the
//! others proceed. Then a [`driver`] per chosen node starts its job (at
//! most `collection_concurrency` at a time) and follows its events; when
//! the task uploads, each collected node then waits for one of
//! `upload_concurrency` cluster-wide upload slots and uploads.
//!
//! An upload destination is checked against this node's policy and, unless
//! `bypassReachabilityChecks`, reached with a `HEAD` before anything starts.
//!
//! Cancel: every driver asks its node to cancel and waits (bounded) for
//! the node to confirm. The task ends when every driver has.

mod driver;
pub mod events;
pub mod peers;
pub mod runtime;
pub mod session;
mod store;
pub mod task;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{CoordinatorSettings, PhaseLimits};
use crate::protocol::{CollectParameters, OpenSession, TaskId};
use crate::upload::{self, Destination, Proxy, UploadPolicy};
use peers::{PeerError, Peers};
use session::{Session, SessionCommands};
use store::TaskStore;
use task::{NodeState, NodeStatus, TaskState, TaskStatus};

/// Most session closes in flight at once at a task's end.
const CLOSES_IN_FLIGHT: usize = 512;
/// Most session opens in flight at once at a task's start. An open holds
/// an HTTP client connection's buffers and channels (about 21 KiB) until
/// its node answers: ten thousand at once were two thirds of a
/// coordinator's peak memory, with no start the faster for it. A node
/// that does not answer holds its place for the peer timeout, so more
/// than this many hung nodes make a start take a peer timeout more per
/// this many.
const OPENS_IN_FLIGHT: usize = 1024;

/// Which nodes to collect from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeSelection {
    All,
    Named(Vec<String>),
}

/// A validated request to start a collection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartRequest {
    pub selection: NodeSelection,
    /// Where to upload each node's artifact, if anywhere.
    pub upload: Option<Destination>,
    /// The proxy this request asks uploads to use (else `[upload] proxy`).
    pub upload_proxy: Option<Proxy>,
    /// Skip the upload host preflight.
    pub bypass_reachability_checks: bool,
    /// What every node's collector is asked for (redaction, directories).
    pub collect: CollectParameters,
}

/// `parameters` with a salt for partial redaction: the one asked for, or
/// a random one for this task, the same on every node (as ns_server does).
fn with_salt(parameters: &CollectParameters) -> CollectParameters {
    let mut p = parameters.clone();
    if p.log_redaction_level.as_deref() == Some("partial") && p.log_redaction_salt.is_none() {
        p.log_redaction_salt = Some(format!("{:032x}", rand::random::<u128>()));
    }
    p
}

/// Why a start was refused. Field errors are keyed like Couchbase's
/// (`nodes`, `uploadHost`, `_` for the request as a whole).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartError {
    #[error("invalid request: {0:?}")]
    Invalid(BTreeMap<String, String>),
    /// The upload host did not answer the preflight (ns_server's message).
    #[error("{0}")]
    Unreachable(String),
    #[error("Logs collection task is already started")]
    AlreadyRunning,
    /// A chosen node cannot collect now (its disk is below the reserve).
    #[error("{0}")]
    CannotCollect(String),
}

struct RunningTask {
    task_id: String,
    cancel: CancellationToken,
    ended: watch::Receiver<bool>,
}

pub struct Coordinator {
    me: String,
    peers: Peers,
    settings: CoordinatorSettings,
    /// How long a node's collection, and its upload, is followed before
    /// the node is failed and told to stop.
    phase_limits: PhaseLimits,
    upload_policy: UploadPolicy,
    /// What the preflight's TLS trusts (built from `upload_policy`).
    upload_tls: Arc<crate::upload::UploadTls>,
    /// Held by the start in progress on this node (the sessions serialise
    /// the cluster); another start is refused while it is.
    start_lock: tokio::sync::Mutex<()>,
    running: Mutex<Option<RunningTask>>,
    /// The latest task (running or finished), for status and long-polls.
    latest: watch::Sender<Option<TaskStatus>>,
    /// One event per version of `latest`, for `GET /collectLogs/events`
    /// (written under `latest`'s lock, so in version order).
    events: Mutex<events::EventRing>,
    /// Event streams open right now, per user (bounded by the API).
    pub event_streams: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    store: TaskStore,
}

/// Everything a task's drivers share.
struct TaskCtx {
    coordinator: Arc<Coordinator>,
    task_id: TaskId,
    cancel: CancellationToken,
    upload: Option<Destination>,
    upload_proxy: Option<Proxy>,
    /// With the salt filled in when redaction is partial.
    collect: CollectParameters,
    collect_slots: Semaphore,
    upload_slots: Semaphore,
}

impl Coordinator {
    pub fn new(
        me: String,
        peers: Peers,
        settings: CoordinatorSettings,
        phase_limits: PhaseLimits,
        upload_policy: UploadPolicy,
        upload_tls: Arc<crate::upload::UploadTls>,
        data_dir: &std::path::Path,
    ) -> Arc<Coordinator> {
        let store = TaskStore::new(data_dir);
        let latest = store.load();
        Arc::new(Coordinator {
            me,
            peers,
            settings,
            phase_limits,
            upload_policy,
            upload_tls,
            start_lock: Default::default(),
            running: Mutex::new(None),
            latest: watch::Sender::new(latest),
            events: Default::default(),
            event_streams: Default::default(),
            store,
        })
    }

    pub fn peers(&self) -> &Peers {
        &self.peers
    }

    fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.settings.heartbeat_interval_ms)
    }

    /// Check a selection against the cluster: Couchbase's messages.
    pub fn resolve(&self, selection: &NodeSelection) -> Result<Vec<String>, StartError> {
        let nodes: Vec<String> = match selection {
            NodeSelection::All => self.peers.names().cloned().collect(),
            NodeSelection::Named(names) => {
                let unique: BTreeSet<&String> = names.iter().collect();
                unique.into_iter().cloned().collect()
            }
        };
        let field =
            |message: String| StartError::Invalid(BTreeMap::from([("nodes".to_string(), message)]));
        if nodes.is_empty() {
            return Err(field("Please select at least one node.".into()));
        }
        let unknown: Vec<&String> = nodes.iter().filter(|n| !self.peers.contains(n)).collect();
        if !unknown.is_empty() {
            return Err(field(format!(
                "Unknown nodes: {}",
                serde_json::to_string(&unknown).unwrap()
            )));
        }
        Ok(nodes)
    }

    /// Check an upload destination against this cluster's policy.
    pub fn check_destination(&self, destination: &Destination) -> Result<(), StartError> {
        destination
            .check(&self.upload_policy)
            .map(drop)
            .map_err(|e| StartError::Invalid(BTreeMap::from([("uploadHost".to_string(), e)])))
    }

    /// Check a request's own upload proxy against this cluster's policy.
    pub fn check_proxy(&self, proxy: &Proxy) -> Result<(), StartError> {
        self.upload_policy
            .check_proxy(proxy)
            .map_err(|e| StartError::Invalid(BTreeMap::from([("uploadProxy".to_string(), e)])))
    }

    /// How long a node keeps a session without hearing from us: three
    /// heartbeat intervals (we ping every interval), plus a second for a
    /// busy moment.
    pub(super) fn lease(&self) -> Duration {
        self.heartbeat() * 3 + Duration::from_secs(1)
    }

    /// Close task `task_id`'s `sessions`: a node hears at once that the
    /// task ended, releases its slot, then closes the connection. At most
    /// [`CLOSES_IN_FLIGHT`] at a time (ten thousand at once were 50 MiB of
    /// a coordinator's peak memory), and all within one peer timeout, as
    /// when they all went at once: a session not closed by then is
    /// dropped, its connection closed, which a node takes as the end of
    /// its session too.
    async fn close_sessions(&self, task_id: &TaskId, sessions: Vec<Session>) {
        use futures::StreamExt;
        let closes = futures::stream::iter(sessions)
            .map(|session| async move {
                let node = session.node().to_string();
                if let Err(e) = session.close().await {
                    tracing::debug!(%node, "closing session: {e}");
                }
            })
            .buffer_unordered(CLOSES_IN_FLIGHT)
            .collect::<()>();
        if tokio::time::timeout(self.peers.timeout(), closes)
            .await
            .is_err()
        {
            tracing::warn!(task = %task_id,
                "not every node's session was closed within {}: the rest end with their streams",
                peers::secs(self.peers.timeout()));
        }
    }

    /// Start a collection; returns the new task's status. The start and
    /// everything it spawns run on the coordinator's own threads
    /// ([`runtime`]), and the start runs to its end even if the caller
    /// stops waiting for it (a client that hangs up finds the task in
    /// the status).
    pub async fn start(self: &Arc<Self>, request: &StartRequest) -> Result<TaskStatus, StartError> {
        let (this, request) = (self.clone(), request.clone());
        runtime::run(async move { this.start_here(&request).await }).await
    }

    async fn start_here(
        self: &Arc<Self>,
        request: &StartRequest,
    ) -> Result<TaskStatus, StartError> {
        let chosen = self.resolve(&request.selection)?;
        if let Some(proxy) = &request.upload_proxy {
            self.check_proxy(proxy)?;
        }
        if let Some(destination) = &request.upload {
            self.check_destination(destination)?;
        }
        // One start at a time on this node, and a second one refused at
        // once, not queued: a start runs to its end even when its client
        // hangs up, so queued ones would pile up, each with its preflight
        // to the upload host.
        let Ok(_serialised) = self.start_lock.try_lock() else {
            return Err(StartError::AlreadyRunning);
        };
        if self.running.lock().unwrap().is_some() {
            return Err(StartError::AlreadyRunning);
        }
        if let Some(destination) = &request.upload
            && !request.bypass_reachability_checks
        {
            let proxy = self.upload_policy.proxy_for(request.upload_proxy.as_ref());
            upload::preflight(
                destination,
                &self.upload_policy,
                &self.upload_tls.current(),
                proxy.as_ref(),
            )
            .await
            .map_err(StartError::Unreachable)?;
        }

        let task_id = TaskId::random();
        // Every node answers within the peer timeout, or is reported as
        // not answering: a hung node holds up the start no longer than
        // that ([`OPENS_IN_FLIGHT`] aside). Each node hears from us every
        // heartbeat interval from the moment its session opens (its lease
        // runs from then), until the task ends.
        let pings = CancellationToken::new();
        let refused = pings.clone().drop_guard();
        let collects: BTreeSet<&String> = chosen.iter().collect();
        // Owned names: with closures over `&String`, the future is not
        // general enough over lifetimes to be spawned.
        let nodes: Vec<(String, bool)> = self
            .peers
            .names()
            .map(|node| (node.clone(), collects.contains(node)))
            .collect();
        use futures::StreamExt;
        let opened: Vec<_> = futures::stream::iter(nodes)
            .map(|(node, collects)| {
                let open = OpenSession {
                    task_id: task_id.clone(),
                    coordinator: self.me.clone(),
                    lease_ms: Some(self.lease().as_millis() as u64),
                    collects,
                };
                let pings = pings.clone();
                async move {
                    let opened = self.peers.open_session(&node, &open).await;
                    if let Ok(session) = &opened {
                        tokio::spawn(ping_until(
                            session.commands().clone(),
                            self.heartbeat(),
                            pings,
                        ));
                    }
                    (node, opened)
                }
            })
            .buffer_unordered(OPENS_IN_FLIGHT)
            .collect()
            .await;

        let mut sessions: BTreeMap<String, Session> = BTreeMap::new();
        let mut unreachable: BTreeMap<String, String> = BTreeMap::new();
        let mut cannot_collect = Vec::new();
        let mut busy = false;
        for (node, result) in opened {
            match result {
                Ok(s) => {
                    sessions.insert(node, s);
                }
                Err(PeerError::Busy { busy: b, .. }) => {
                    tracing::info!(%node, busy_with = %b.task_id, coordinator = %b.coordinator,
                        "start refused: a collection is already running");
                    busy = true;
                }
                Err(e @ PeerError::LowDisk { .. }) => cannot_collect.push(e.to_string()),
                Err(e) => {
                    tracing::warn!(%node, "cannot open a session: {e}");
                    unreachable.insert(node, e.to_string());
                }
            }
        }
        if busy || !cannot_collect.is_empty() {
            // Refused: every session opened is closed before the answer,
            // so no node still holds this start when its caller hears
            // (dropping a session releases it too, but only once the node
            // notices the closed connection).
            self.close_sessions(&task_id, sessions.into_values().collect())
                .await;
            if busy {
                return Err(StartError::AlreadyRunning);
            }
            tracing::warn!("start refused: {}", cannot_collect.join("; "));
            return Err(StartError::CannotCollect(cannot_collect.join("; ")));
        }

        let per_node = chosen
            .iter()
            .map(|node| {
                let status = match unreachable.get(node) {
                    Some(reason) => NodeStatus::failed(None, reason.clone()),
                    None => NodeStatus::new(NodeState::Starting),
                };
                (node.clone(), status)
            })
            .collect();
        let cancel = CancellationToken::new();
        let (ended_tx, ended_rx) = watch::channel(false);
        *self.running.lock().unwrap() = Some(RunningTask {
            task_id: task_id.to_string(),
            cancel: cancel.clone(),
            ended: ended_rx,
        });
        let status = self.publish_new(TaskStatus::new(
            task_id.to_string(),
            self.me.clone(),
            per_node,
        ));
        self.store.save(&status);
        tracing::info!(task = %task_id, nodes = ?chosen,
            upload = request.upload.as_ref().map(|d| d.base_url.as_str()), "collection started");

        let slots = |limit: usize| Semaphore::new(if limit == 0 { chosen.len() } else { limit });
        let ctx = Arc::new(TaskCtx {
            coordinator: self.clone(),
            task_id,
            cancel,
            upload: request.upload.clone(),
            upload_proxy: request.upload_proxy.clone(),
            collect: with_salt(&request.collect),
            collect_slots: slots(self.settings.collection_concurrency),
            upload_slots: slots(self.settings.upload_concurrency),
        });
        refused.disarm();
        crate::metrics::global().tasks_started.inc();
        tokio::spawn(run_task(ctx, chosen, sessions, ended_tx, pings));
        Ok(status)
    }

    /// Cancel the running task, if any, and wait (up to `wait`) for every
    /// node to confirm. Returns the latest task.
    pub async fn cancel(&self, wait: Duration) -> Option<TaskStatus> {
        let running = self
            .running
            .lock()
            .unwrap()
            .as_ref()
            .map(|r| (r.task_id.clone(), r.cancel.clone(), r.ended.clone()));
        if let Some((task_id, cancel, mut ended)) = running {
            tracing::info!(task = %task_id, "cancelling collection");
            cancel.cancel();
            let _ = tokio::time::timeout(wait, ended.wait_for(|e| *e)).await;
        }
        self.latest()
    }

    /// Cancel only if `task_id` is the running task (forwarded cancels).
    pub async fn cancel_task(&self, task_id: &str, wait: Duration) -> Option<TaskStatus> {
        let matches = self
            .running
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|r| r.task_id == task_id);
        if matches {
            self.cancel(wait).await
        } else {
            self.latest()
        }
    }

    pub fn latest(&self) -> Option<TaskStatus> {
        self.latest.borrow().clone()
    }

    /// The latest task once its version exceeds `since`, or as it is after
    /// `wait` (long-poll; returns at once if it already changed).
    pub async fn wait_for_change(&self, since: u64, wait: Duration) -> Option<TaskStatus> {
        let mut rx = self.latest.subscribe();
        let changed = |t: &Option<TaskStatus>| t.as_ref().is_some_and(|t| t.version > since);
        let _ = tokio::time::timeout(wait, rx.wait_for(changed)).await;
        self.latest()
    }

    /// Follow changes of the latest task (see [`Coordinator::events_after`]).
    pub fn subscribe(&self) -> watch::Receiver<Option<TaskStatus>> {
        self.latest.subscribe()
    }

    /// Up to `max` events after version `last`, in order; `Behind` if the
    /// ring no longer holds all of them (the reader needs a snapshot).
    pub fn events_after(
        &self,
        last: u64,
        max: usize,
    ) -> Result<Vec<Arc<events::TaskEvent>>, events::Behind> {
        let latest = self.latest.borrow();
        let current = latest.as_ref().map_or(0, |t| t.version);
        self.events.lock().unwrap().after(last, current, max)
    }

    pub fn is_running(&self) -> bool {
        self.running.lock().unwrap().is_some()
    }

    /// Install a new task as the latest, versioned after the previous one.
    fn publish_new(&self, mut task: TaskStatus) -> TaskStatus {
        self.latest.send_modify(|latest| {
            task.version = latest.as_ref().map_or(0, |t| t.version) + 1;
            *latest = Some(task.clone());
            self.events
                .lock()
                .unwrap()
                .push(events::TaskEvent::Started { task: task.clone() });
        });
        task
    }

    /// The state of `node` in task `task_id`, if that is the latest.
    fn node_state(&self, task_id: &str, node: &str) -> Option<NodeState> {
        let latest = self.latest.borrow();
        let task = latest.as_ref().filter(|t| t.task_id == task_id)?;
        task.per_node.get(node).map(|n| n.status)
    }

    /// Change node `node` of the latest task (if it is `task_id`) and bump
    /// the version; returns the node's state after. Nothing but that node
    /// is looked at or copied: the event lists it alone (if its status
    /// changed), so a change costs the same in a task of 10,000 nodes.
    fn update_node(
        &self,
        task_id: &str,
        node: &str,
        change: impl FnOnce(&mut TaskStatus),
    ) -> Option<NodeState> {
        let mut result = None;
        self.latest.send_if_modified(|latest| match latest {
            Some(t) if t.task_id == task_id => {
                let before = t.per_node.get(node).cloned();
                change(t);
                t.version += 1;
                self.events
                    .lock()
                    .unwrap()
                    .push(events::TaskEvent::node_changed(t, node, before.as_ref()));
                result = t.per_node.get(node).map(|n| n.status);
                true
            }
            _ => false,
        });
        result
    }

    /// Change the latest task (if it is `task_id`) as a whole, and bump
    /// its version; returns it. Compares and copies every node: for the
    /// end of a task, not for each node's change ([`Self::update_node`]).
    fn update(&self, task_id: &str, change: impl FnOnce(&mut TaskStatus)) -> Option<TaskStatus> {
        let mut result = None;
        self.latest.send_if_modified(|latest| match latest {
            Some(t) if t.task_id == task_id => {
                let before = t.per_node.clone();
                change(t);
                t.version += 1;
                self.events
                    .lock()
                    .unwrap()
                    .push(events::TaskEvent::changed(&before, t));
                result = Some(t.clone());
                true
            }
            _ => false,
        });
        result
    }

    /// Daemon shutdown: cancel a running task and wait (bounded).
    pub async fn shutdown(&self, grace: Duration) {
        self.cancel(grace).await;
    }
}

/// Drive every chosen node to a final state, then end the task and release
/// every session (the cluster lock).
async fn run_task(
    ctx: Arc<TaskCtx>,
    chosen: Vec<String>,
    mut sessions: BTreeMap<String, Session>,
    ended: watch::Sender<bool>,
    pings: CancellationToken,
) {
    use futures::StreamExt;
    let mut drivers = futures::stream::FuturesUnordered::new();
    for node in &chosen {
        if let Some(session) = sessions.remove(node) {
            drivers.push(tokio::spawn(driver::drive(ctx.clone(), session)));
        }
    }
    // A session with nothing more to do in the task (its node was not
    // chosen, or its driver is done) is still read until the task ends:
    // its node's heartbeats must never back up in the connection, or the
    // node, unable to write for a lease, would let go of its lock.
    let done = CancellationToken::new();
    let mut holders: Vec<_> = sessions
        .into_values()
        .map(|session| tokio::spawn(hold(session, done.clone())))
        .collect();
    while let Some(driven) = drivers.next().await {
        match driven {
            Ok(session) => holders.push(tokio::spawn(hold(session, done.clone()))),
            Err(e) => tracing::error!(task = %ctx.task_id, "node driver failed: {e}"),
        }
    }
    done.cancel();
    let mut ended_sessions = Vec::new();
    for holder in holders {
        match holder.await {
            Ok(session) => ended_sessions.push(session),
            Err(e) => tracing::error!(task = %ctx.task_id, "session holder failed: {e}"),
        }
    }

    // Release every node's slot before reporting the end, so that a start
    // following our "completed" is never refused by a node still holding
    // this task.
    let coordinator = &ctx.coordinator;
    pings.cancel();
    coordinator
        .close_sessions(&ctx.task_id, ended_sessions)
        .await;

    let state = if ctx.cancel.is_cancelled() {
        TaskState::Cancelled
    } else {
        TaskState::Completed
    };
    *coordinator.running.lock().unwrap() = None;
    if let Some(task) = coordinator.update(&ctx.task_id, |t| {
        t.finish(state, "the coordinator lost track of this node")
    }) {
        coordinator.store.save(&task);
        let failed = task
            .per_node
            .values()
            .any(|n| matches!(n.status, NodeState::Failed | NodeState::FailedUpload));
        crate::metrics::global().task_ended(match state {
            TaskState::Cancelled => crate::metrics::TaskOutcome::Cancelled,
            _ if failed => crate::metrics::TaskOutcome::Failed,
            _ => crate::metrics::TaskOutcome::Completed,
        });
    }
    let _ = ended.send(true);
    tracing::info!(task = %ctx.task_id, status = state.as_str(), "collection ended");
}

/// Read `session`'s lines (and drop them) until `done`, then give it
/// back to be closed.
async fn hold(mut session: Session, done: CancellationToken) -> Session {
    tokio::select! {
        _ = done.cancelled() => {}
        _ = async { while let Some(Ok(_)) = session.next().await {} } => {
            tracing::debug!(node = %session.node(), "a session ended before its task");
        }
    }
    session
}

/// Ping a session's node every heartbeat interval until `done`: one
/// ping at a time, each bounded by the peer timeout.
async fn ping_until(commands: SessionCommands, every: Duration, done: CancellationToken) {
    let mut every = tokio::time::interval(every);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await; // the first tick is now: the session just opened
    loop {
        tokio::select! {
            _ = done.cancelled() => return,
            _ = every.tick() => {}
        }
        tokio::select! {
            _ = done.cancelled() => return,
            result = commands.send(&crate::protocol::SessionCommand::Ping) => {
                if let Err(e) = result {
                    tracing::debug!("ping: {e}");
                    return;
                }
            }
        }
    }
}
