//! One chosen node of a task: wait for a collection slot, start the job,
//! follow the node's events to a final state, cancel when asked.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::TaskCtx;
use super::peers::SessionEvents;
use super::task::{NodeState, NodeStatus};
use crate::protocol::NodeEvent;

/// How long a node has to confirm a cancel before we stop waiting.
const CANCEL_CONFIRM: Duration = Duration::from_secs(5);

/// Returns the session stream so the caller can hold it (the node's slot)
/// until the whole task ends.
pub(super) async fn drive(
    ctx: Arc<TaskCtx>,
    node: String,
    mut session: SessionEvents,
) -> SessionEvents {
    let coordinator = &ctx.coordinator;
    let set = |status: NodeStatus| {
        let state = status.status;
        coordinator.update(&ctx.task_id, |t| t.set_node(&node, status));
        tracing::info!(task = %ctx.task_id, %node, state = state.as_str(), "node state");
    };

    let _permit = tokio::select! {
        permit = ctx.slots.acquire() => permit.expect("semaphore never closed"),
        _ = ctx.cancel.cancelled() => {
            set(NodeStatus::new(NodeState::Cancelled));
            return session;
        }
    };
    if ctx.cancel.is_cancelled() {
        set(NodeStatus::new(NodeState::Cancelled));
        return session;
    }
    if let Err(e) = coordinator.peers.start_job(&node, &ctx.task_id).await {
        set(NodeStatus::failed(
            None,
            format!("could not start the job: {e}"),
        ));
        return session;
    }

    // A live node sends a heartbeat every interval; three missed is dead.
    let liveness = coordinator.heartbeat() * 3;
    let mut cancel_deadline: Option<Instant> = None;
    loop {
        let wait = match cancel_deadline {
            Some(d) => d.saturating_duration_since(Instant::now()),
            None => liveness,
        };
        let next = tokio::select! {
            next = tokio::time::timeout(wait, session.next()) => next,
            _ = ctx.cancel.cancelled(), if cancel_deadline.is_none() => {
                if let Err(e) = coordinator.peers.cancel_job(&node, &ctx.task_id).await {
                    tracing::warn!(task = %ctx.task_id, %node, "cancel request failed: {e}");
                }
                cancel_deadline = Some(Instant::now() + CANCEL_CONFIRM);
                continue;
            }
        };
        let lost = |why: String| match cancel_deadline {
            // We were cancelling anyway: the node is gone or slow, and its
            // job dies with the session when we drop it.
            Some(_) => NodeStatus::new(NodeState::Cancelled),
            None => NodeStatus::failed(None, why),
        };
        match next {
            Err(_) if cancel_deadline.is_some() => {
                tracing::warn!(task = %ctx.task_id, %node, "node did not confirm the cancel in time");
                set(lost(String::new()));
                break;
            }
            Err(_) => {
                set(lost(format!(
                    "lost contact with the node: no heartbeat for {liveness:?}"
                )));
                break;
            }
            Ok(None) => {
                set(lost(
                    "lost contact with the node: the connection closed".into(),
                ));
                break;
            }
            Ok(Some(Err(e))) => {
                set(lost(format!("lost contact with the node: {e}")));
                break;
            }
            Ok(Some(Ok(NodeEvent::Heartbeat))) => {}
            Ok(Some(Ok(event))) => {
                let mut changed = None;
                coordinator.update(&ctx.task_id, |t| changed = t.apply(&node, &event));
                if let Some(state) = changed {
                    tracing::info!(task = %ctx.task_id, %node, state = state.as_str(), "node state");
                }
                if event.is_final() {
                    break;
                }
            }
        }
    }
    session
}
