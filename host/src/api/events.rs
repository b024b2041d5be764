//! `GET /collectLogs/events` (any user): Server-Sent Events with every
//! change of the latest task.
//!
//! - `snapshot` (first, and whenever the reader cannot be given what it
//!   missed): `{"reason": "connected"|"behind"|"polled", "task": {...}|null}`
//! - `started`: a new task, whole: `{"kind": "started", "task": {...}}`
//! - `change`: `{"kind": "changed", "version", "taskId", "status",
//!   "progress", "nodes": {node: NodeStatus}}`, only the nodes that changed
//!
//! Every event's `id` is the task's version. A client reconnecting with
//! `Last-Event-ID` gets the events after it from the coordinator's ring
//! ([`crate::coordinator::events`]), or a `snapshot` with reason `behind`
//! when the ring no longer has them all. A connection holds no queue of
//! its own: the body is pulled by the client, so a slow client only
//! falls behind (and gets a snapshot); it never makes the server buffer.
//!
//! On a node that does not coordinate the latest task, the stream follows
//! the coordinator's status by long-polls (as `GET /collectLogs/status`
//! does) and sends a `snapshot` (reason `polled`) per change.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;

use super::public::{Reader, StatusQuery, latest_task, remote_coordinator};
use super::{ApiError, AppState};
use crate::coordinator::Coordinator;
use crate::coordinator::task::TaskStatus;

/// Event streams one node serves at once; beyond them, 503.
pub const MAX_EVENT_STREAMS: usize = 64;
/// Events read from the ring at a time by one connection.
const BATCH: usize = 32;
/// How long one long-poll of a remote coordinator waits.
const POLL_WAIT_SECS: f64 = 30.0;

/// One open stream, counted while it lasts.
struct Slot(Arc<Coordinator>);

impl Slot {
    fn enter(coordinator: &Arc<Coordinator>) -> Option<Slot> {
        let count = &coordinator.event_streams;
        if count.fetch_add(1, Ordering::SeqCst) >= MAX_EVENT_STREAMS {
            count.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Slot(coordinator.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.event_streams.fetch_sub(1, Ordering::SeqCst);
    }
}

pub async fn events(
    State(state): State<AppState>,
    _: Reader,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let slot = Slot::enter(&state.coordinator).ok_or_else(|| {
        ApiError::general(
            StatusCode::SERVICE_UNAVAILABLE,
            "Too many event streams are open on this node",
        )
        .retry_after(5)
    })?;
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let keep_alive = KeepAlive::new().interval(Duration::from_secs(15));
    if remote_coordinator(&state).is_some() {
        Ok(Sse::new(polled(state, slot, last))
            .keep_alive(keep_alive)
            .into_response())
    } else {
        Ok(Sse::new(local(state.coordinator.clone(), slot, last))
            .keep_alive(keep_alive)
            .into_response())
    }
}

/// A snapshot's data, serialised straight from the task (not through a
/// `serde_json::Value` tree: a task of 10,000 nodes is a few MB).
#[derive(serde::Serialize)]
struct Snapshot<'a> {
    reason: &'a str,
    task: Option<&'a TaskStatus>,
}

fn snapshot(reason: &str, task: Option<&TaskStatus>) -> Event {
    let data = serde_json::to_string(&Snapshot { reason, task }).unwrap_or_default();
    let event = Event::default().event("snapshot").data(data);
    match task {
        Some(t) => event.id(t.version.to_string()),
        None => event,
    }
}

struct Local {
    coordinator: Arc<Coordinator>,
    rx: tokio::sync::watch::Receiver<Option<TaskStatus>>,
    /// The version last sent (or resumed from); `None` before the first.
    last: Option<u64>,
    pending: VecDeque<Event>,
    _slot: Slot,
}

impl Local {
    fn snapshot(&mut self, reason: &str) -> Event {
        let task = self.rx.borrow_and_update().clone();
        self.last = Some(task.as_ref().map_or(0, |t| t.version));
        snapshot(reason, task.as_ref())
    }
}

/// The coordinator's own events, from its ring.
fn local(
    coordinator: Arc<Coordinator>,
    slot: Slot,
    resume: Option<u64>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let rx = coordinator.subscribe();
    let mut s = Local {
        coordinator,
        rx,
        last: None,
        pending: VecDeque::new(),
        _slot: slot,
    };
    let mut reason = "connected";
    if let Some(l) = resume {
        match s.coordinator.events_after(l, 0) {
            Ok(_) => s.last = Some(l),
            Err(_) => reason = "behind",
        }
    }
    futures::stream::unfold(s, move |mut s| async move {
        let Some(last) = s.last else {
            let event = s.snapshot(reason);
            return Some((Ok(event), s));
        };
        loop {
            if let Some(event) = s.pending.pop_front() {
                return Some((Ok(event), s));
            }
            s.rx.borrow_and_update();
            match s.coordinator.events_after(last, BATCH) {
                Err(_) => {
                    let event = s.snapshot("behind");
                    return Some((Ok(event), s));
                }
                Ok(batch) if batch.is_empty() => {
                    if s.rx.changed().await.is_err() {
                        return None;
                    }
                }
                Ok(batch) => {
                    for e in batch {
                        s.last = Some(e.version());
                        let data = serde_json::to_string(&*e).unwrap_or_default();
                        s.pending.push_back(
                            Event::default()
                                .event(e.name())
                                .id(e.version().to_string())
                                .data(data),
                        );
                    }
                }
            }
        }
    })
}

/// Another node coordinates: a snapshot per change of its status.
fn polled(
    state: AppState,
    slot: Slot,
    resume: Option<u64>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    futures::stream::unfold(
        (state, slot, resume, true),
        |(state, slot, last, first)| async move {
            loop {
                let query =
                    StatusQuery::new(if first { None } else { last.or(Some(0)) }, POLL_WAIT_SECS);
                match latest_task(&state, &query).await {
                    Ok(axum::Json(value)) => {
                        let task: Option<TaskStatus> = serde_json::from_value(value).ok();
                        let version = task.as_ref().map(|t| t.version);
                        if first || version > last {
                            let event = snapshot("polled", task.as_ref());
                            let last = version.or(last);
                            return Some((Ok(event), (state, slot, last, false)));
                        }
                    }
                    Err(e) if e.status == StatusCode::NOT_FOUND && first => {
                        return Some((Ok(snapshot("polled", None)), (state, slot, last, false)));
                    }
                    Err(_) => tokio::time::sleep(Duration::from_secs(2)).await,
                }
            }
        },
    )
}
