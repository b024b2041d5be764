//! One chosen node of a task: wait for a collection slot, start the job,
//! follow the node's events until it has collected; then, if the task
//! uploads, wait for an upload slot, start the upload and follow it.
//! Cancel is honoured in every phase.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;

use super::TaskCtx;
use super::peers::{PeerError, secs};
use super::session::{Session, SessionCommands};
use super::task::{NodeState, NodeStatus};
use crate::config::PhaseLimits;
use crate::protocol::{NodeEvent, SessionCommand};

/// How long a node has to confirm a cancel before we stop waiting. A node
/// confirms once its job has stopped, including the programs it started,
/// which get two `exec_grace_secs` (10 s each by default) before SIGKILL.
const CANCEL_CONFIRM: Duration = Duration::from_secs(30);

/// The most often a node's progress is applied to the task: half the
/// interval the node forwards it at (a correct node is never held back),
/// so that a node that floods progress costs the coordinator a parse per
/// line, not a new task version and event.
const PROGRESS_MIN: Duration = Duration::from_millis(50);

/// A phase of a node's part in the task, and the events the node may
/// send during it, in protocol order: a node (buggy, or in hostile hands)
/// can neither move its state back nor report what its phase cannot
/// have done (an upload while collecting, a second start).
#[derive(Debug, Clone, Copy)]
enum Phase {
    Collect,
    Upload,
}

impl Phase {
    /// How long the coordinator follows this phase of a node, and the
    /// setting that says so.
    fn limit(self, limits: &PhaseLimits) -> (Duration, &'static str) {
        match self {
            Phase::Collect => (limits.collect, "coordinator.max_collect_secs"),
            Phase::Upload => (limits.upload, "coordinator.max_upload_secs"),
        }
    }

    fn ends(self, event: &NodeEvent) -> bool {
        match self {
            Phase::Collect => event.ends_collection(),
            Phase::Upload => event.ends_upload(),
        }
    }

    /// May a node in `state` send `event` in this phase?
    fn allows(self, state: NodeState, event: &NodeEvent) -> bool {
        use NodeEvent as E;
        use NodeState as S;
        match (self, event) {
            (_, E::Heartbeat | E::Cancelled) => true,
            (Phase::Collect, E::Refused { command, .. }) => {
                state == S::Starting && command.as_str() == "job"
            }
            (Phase::Upload, E::Refused { command, .. }) => {
                state == S::StartingUpload && command.as_str() == "upload"
            }
            (Phase::Collect, E::Started { .. }) => state == S::Starting,
            (Phase::Collect, E::Progress { .. }) => state == S::Started,
            (Phase::Collect, E::Collected { .. } | E::Failed { .. }) => {
                matches!(state, S::Starting | S::Started)
            }
            (Phase::Upload, E::UploadStarted { .. }) => state == S::StartingUpload,
            (Phase::Upload, E::Progress { .. }) => state == S::StartedUpload,
            (Phase::Upload, E::Uploaded { .. } | E::UploadFailed { .. }) => {
                matches!(state, S::StartingUpload | S::StartedUpload)
            }
            _ => false,
        }
    }
}

/// The name of an event, as the protocol spells it.
fn event_name(event: &NodeEvent) -> String {
    serde_json::to_value(event)
        .ok()
        .and_then(|v| Some(v.get("event")?.as_str()?.to_string()))
        .unwrap_or_else(|| "?".into())
}

/// A node's driver for one task.
struct Driver {
    ctx: Arc<TaskCtx>,
    node: String,
}

/// Returns the session so the caller can hold it (the node's slot) until
/// the whole task ends.
pub(super) async fn drive(ctx: Arc<TaskCtx>, mut session: Session) -> Session {
    let driver = Driver {
        ctx,
        node: session.node().to_string(),
    };
    driver.run(&mut session).await;
    session
}

impl Driver {
    async fn run(&self, session: &mut Session) {
        let ctx = &self.ctx;
        // Shared with the pings (a `&Session` is not `Sync`: its reading
        // half is the driver's alone).
        let commands = session.commands().clone();

        let Some(permit) = self.slot(session, Phase::Collect, &ctx.collect_slots).await else {
            return;
        };
        let job = SessionCommand::Job {
            parameters: ctx.collect.clone(),
        };
        let started = commands.send(&job).await;
        if let Some(state) = self.command_failed(started, "could not start the job") {
            return self.set(NodeStatus::failed(None, state));
        }
        if self.follow(session, Phase::Collect).await != Some(NodeState::Collected) {
            return;
        }
        drop(permit);

        let Some(destination) = &ctx.upload else {
            return;
        };
        self.set_state(NodeState::StartingUpload);
        let Some(_permit) = self.slot(session, Phase::Upload, &ctx.upload_slots).await else {
            return;
        };
        let upload = SessionCommand::Upload {
            base_url: destination.base_url.clone(),
            proxy: ctx.upload_proxy.as_ref().map(|p| p.given.clone()),
        };
        let started = commands.send(&upload).await;
        if let Some(reason) = self.command_failed(started, "could not start the upload") {
            self.update(NodeEvent::UploadFailed {
                url: destination.base_url.clone(),
                status_code: None,
                output: reason,
            });
            return;
        }
        self.follow(session, Phase::Upload).await;
    }

    /// Wait for a slot of `slots`, unless the task is cancelled first:
    /// then the node drops what it holds (a collected artifact waiting for
    /// its upload), is marked cancelled, and `None` is returned. The
    /// session is read meanwhile (a wait can last hours with
    /// `collection_concurrency`): the node's heartbeats must never back
    /// up in the connection, or the node, unable to write for a lease,
    /// would let go of its lock. A node lost meanwhile is failed, and
    /// `None` is returned.
    async fn slot<'a>(
        &self,
        session: &mut Session,
        phase: Phase,
        slots: &'a Semaphore,
    ) -> Option<SemaphorePermit<'a>> {
        let ctx = &self.ctx;
        let commands = session.commands().clone();
        let acquire = slots.acquire();
        tokio::pin!(acquire);
        let permit = loop {
            tokio::select! {
                permit = &mut acquire => break permit.ok(),
                _ = ctx.cancel.cancelled() => break None,
                line = session.next() => {
                    let lost = match line {
                        Some(Ok(NodeEvent::Heartbeat)) => continue,
                        Some(Ok(event)) => {
                            let state = ctx.coordinator.node_state(&ctx.task_id, &self.node)?;
                            self.broke_protocol(&commands, phase, state, &event).await;
                            return None;
                        }
                        Some(Err(e)) => format!("lost contact with {}: {e}", self.node),
                        None => format!("lost contact with {}: the connection closed", self.node),
                    };
                    self.lost(lost, false);
                    return None;
                }
            }
        };
        if permit.is_none() || ctx.cancel.is_cancelled() {
            self.send_cancel(&commands).await;
            self.set_state(NodeState::Cancelled);
            return None;
        }
        permit
    }

    /// A command's error as a reason, or `None` if it went out. (Whether
    /// the node carries it out, it says on the session: the command's
    /// first event, or a `refused`.)
    fn command_failed(&self, result: Result<(), PeerError>, what: &str) -> Option<String> {
        result.err().map(|e| format!("{what}: {e}"))
    }

    /// Apply the node's events until one ends `phase` (or contact is
    /// lost, or a cancel is confirmed, or the node breaks the protocol,
    /// or the phase outlasts its limit). Returns the node's state after
    /// the phase.
    async fn follow(&self, session: &mut Session, phase: Phase) -> Option<NodeState> {
        let ctx = &self.ctx;
        let commands = session.commands().clone();
        let (limit, setting) = phase.limit(&ctx.coordinator.phase_limits);
        let phase_deadline = Instant::now() + limit;
        // A live node sends a heartbeat every interval; three missed is dead.
        let liveness = ctx.coordinator.heartbeat() * 3;
        let mut cancel_deadline: Option<Instant> = None;
        let mut state = ctx.coordinator.node_state(&ctx.task_id, &self.node)?;
        // Progress that came sooner than PROGRESS_MIN after the last one
        // applied: applied with the next line that comes later, and
        // always before an event that changes the state.
        let mut progress: Option<NodeEvent> = None;
        let mut progress_applied: Option<Instant> = None;
        loop {
            let wait = match cancel_deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => liveness,
            };
            let next = tokio::select! {
                next = tokio::time::timeout(wait, session.next()) => next,
                _ = ctx.cancel.cancelled(), if cancel_deadline.is_none() => {
                    self.send_cancel(&commands).await;
                    cancel_deadline = Some(Instant::now() + CANCEL_CONFIRM);
                    continue;
                }
                _ = tokio::time::sleep_until(phase_deadline), if cancel_deadline.is_none() => {
                    let why = format!(
                        "{} did not end its {} within {} ({setting}), and was told to stop",
                        self.node,
                        match phase {
                            Phase::Collect => "collection",
                            Phase::Upload => "upload",
                        },
                        secs(limit)
                    );
                    tracing::warn!(task = %ctx.task_id, node = %self.node, "{why}");
                    self.send_cancel(&commands).await;
                    return Some(self.fail(matches!(phase, Phase::Upload), why));
                }
            };
            // Silence may be ours: if this process was stopped (SIGSTOP, a
            // long pause), the node's lines wait unread in the socket while
            // our timer runs out. Give them one more interval to arrive
            // before calling the node lost.
            let next = match next {
                Err(_) if cancel_deadline.is_none() => {
                    tokio::time::timeout(ctx.coordinator.heartbeat(), session.next()).await
                }
                other => other,
            };
            let lost = match next {
                Ok(Some(Ok(event))) if !phase.allows(state, &event) => {
                    return Some(self.broke_protocol(&commands, phase, state, &event).await);
                }
                Ok(Some(Ok(NodeEvent::Refused { command, message }))) => {
                    let what = match phase {
                        Phase::Collect => "could not start the job",
                        Phase::Upload => "could not start the upload",
                    };
                    let why = format!("{what}: {} refused `{command}`: {message}", self.node);
                    return Some(self.fail(matches!(phase, Phase::Upload), why));
                }
                Ok(Some(Ok(event))) => {
                    let due = progress_applied.is_none_or(|t| t.elapsed() >= PROGRESS_MIN);
                    if let NodeEvent::Progress { .. } = event {
                        // A later report supersedes one held back.
                        if due {
                            progress = None;
                            self.update(event);
                            progress_applied = Some(Instant::now());
                        } else {
                            progress = Some(event);
                        }
                        continue;
                    }
                    let heartbeat = matches!(event, NodeEvent::Heartbeat);
                    if let Some(held) = progress.take() {
                        if due || !heartbeat {
                            self.update(held);
                            progress_applied = Some(Instant::now());
                        } else {
                            progress = Some(held);
                        }
                    }
                    if heartbeat {
                        continue;
                    }
                    let ends = phase.ends(&event);
                    let after = self.update(event);
                    if ends {
                        return after;
                    }
                    state = after.unwrap_or(state);
                    continue;
                }
                Err(_) if cancel_deadline.is_some() => {
                    tracing::warn!(task = %ctx.task_id, node = %self.node, "node did not confirm the cancel in time");
                    String::new()
                }
                Err(_) => format!(
                    "lost contact with {}: no heartbeat for {}",
                    self.node,
                    secs(liveness + ctx.coordinator.heartbeat())
                ),
                Ok(None) => format!("lost contact with {}: the connection closed", self.node),
                Ok(Some(Err(e))) => format!("lost contact with {}: {e}", self.node),
            };
            return Some(self.lost(lost, cancel_deadline.is_some()));
        }
    }

    /// The node sent `event`, which its `state` in `phase` does not allow:
    /// it fails (its upload, in the upload phase) with the reason, and is
    /// told to stop what it runs. Nothing of the event is applied.
    async fn broke_protocol(
        &self,
        commands: &SessionCommands,
        phase: Phase,
        state: NodeState,
        event: &NodeEvent,
    ) -> NodeState {
        let ctx = &self.ctx;
        let why = format!(
            "{} broke the node-to-node protocol: it sent `{}` while `{}`",
            self.node,
            event_name(event),
            state.as_str()
        );
        tracing::warn!(task = %ctx.task_id, node = %self.node, "{why}");
        self.send_cancel(commands).await;
        self.fail(matches!(phase, Phase::Upload), why)
    }

    /// Ask the node to stop whatever it runs (a failure is logged: the
    /// job dies with the session anyway).
    async fn send_cancel(&self, commands: &SessionCommands) {
        if let Err(e) = commands.send(&SessionCommand::Cancel).await {
            tracing::warn!(task = %self.ctx.task_id, node = %self.node, "cancel request failed: {e}");
        }
    }

    /// Mark the node failed with `why`: its upload (`failedUpload`) if it
    /// was uploading, else its collection.
    fn fail(&self, uploading: bool, why: String) -> NodeState {
        if uploading {
            let url = self.ctx.upload.as_ref().map(|d| d.base_url.clone());
            self.update(NodeEvent::UploadFailed {
                url: url.unwrap_or_default(),
                status_code: None,
                output: why,
            });
            NodeState::FailedUpload
        } else {
            self.set(NodeStatus::failed(None, why));
            NodeState::Failed
        }
    }

    /// The node is gone. If we were cancelling anyway, its job dies with
    /// the session when we drop it: it counts as cancelled.
    fn lost(&self, why: String, cancelling: bool) -> NodeState {
        if cancelling {
            self.set_state(NodeState::Cancelled);
            return NodeState::Cancelled;
        }
        let uploading = self
            .ctx
            .coordinator
            .node_state(&self.ctx.task_id, &self.node)
            .is_some_and(|s| matches!(s, NodeState::StartingUpload | NodeState::StartedUpload));
        self.fail(uploading, why)
    }

    /// Apply an event to the task; log and return the node's new state.
    fn update(&self, event: NodeEvent) -> Option<NodeState> {
        let mut changed = None;
        let state = self
            .ctx
            .coordinator
            .update_node(&self.ctx.task_id, &self.node, |t| {
                changed = t.apply(&self.node, &event)
            });
        if let Some(state) = changed {
            self.log(state);
        }
        state
    }

    fn set(&self, status: NodeStatus) {
        let state = status.status;
        self.ctx
            .coordinator
            .update_node(&self.ctx.task_id, &self.node, |t| {
                t.set_node(&self.node, status)
            });
        self.log(state);
    }

    fn set_state(&self, state: NodeState) {
        self.ctx
            .coordinator
            .update_node(&self.ctx.task_id, &self.node, |t| {
                t.set_state(&self.node, state)
            });
        self.log(state);
    }

    fn log(&self, state: NodeState) {
        tracing::info!(task = %self.ctx.task_id, node = %self.node, state = state.as_str(), "node state");
    }
}
