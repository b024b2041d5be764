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
//! On a node that does not coordinate the latest task, the stream relays
//! the coordinator's own events: it long-polls the coordinator's
//! `internal` events route ([`task_events`]) for the events after the
//! last one it sent, so ids, order and small `change` events are the
//! coordinator's, and `Last-Event-ID` resumes there too. When the
//! coordinator changes (this node joins another's task, or coordinates
//! one), the stream sends that source's `snapshot` (reason `coordinator`)
//! and goes on from it.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde::Deserialize;
use serde_json::json;

use super::internal::Peer;
use super::public::{Who, remote_coordinator};
use super::{ApiError, AppState};
use crate::coordinator::Coordinator;
use crate::coordinator::events::Behind;
use crate::coordinator::task::TaskStatus;
use crate::protocol::{TaskEvents, WireEvent};

/// Event streams one node serves at once; beyond them, 503.
pub const MAX_EVENT_STREAMS: usize = 64;
/// Event streams one user may hold open on a node at once; beyond them,
/// 429: one user (a leaked script, a stolen read-only password) cannot
/// take every stream from the others.
pub const MAX_EVENT_STREAMS_PER_USER: usize = 16;
/// Events read from the ring at a time by one connection.
const BATCH: usize = 32;
/// How long one long-poll of a remote coordinator waits.
const RELAY_WAIT: Duration = Duration::from_secs(10);
/// The longest wait the events route grants another node.
const MAX_RELAY_WAIT_SECS: f64 = 30.0;
/// How long to wait before asking an unreachable coordinator again.
const RETRY: Duration = Duration::from_secs(2);

/// One open stream of `user`, counted while it lasts.
struct Slot {
    coordinator: Arc<Coordinator>,
    user: String,
}

impl Slot {
    fn enter(coordinator: &Arc<Coordinator>, user: &str) -> Result<Slot, ApiError> {
        let mut open = coordinator.event_streams.lock().unwrap();
        if open.values().sum::<usize>() >= MAX_EVENT_STREAMS {
            return Err(ApiError::general(
                StatusCode::SERVICE_UNAVAILABLE,
                "Too many event streams are open on this node",
            )
            .retry_after(5));
        }
        let mine = open.entry(user.to_string()).or_default();
        if *mine >= MAX_EVENT_STREAMS_PER_USER {
            return Err(ApiError::general(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "{user} has {MAX_EVENT_STREAMS_PER_USER} event streams open on this node, the most one user may"
                ),
            )
            .retry_after(5));
        }
        *mine += 1;
        Ok(Slot {
            coordinator: coordinator.clone(),
            user: user.to_string(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.coordinator.event_streams.lock().unwrap();
        if let Some(mine) = open.get_mut(&self.user) {
            *mine -= 1;
            if *mine == 0 {
                open.remove(&self.user);
            }
        }
    }
}

pub async fn events(
    State(state): State<AppState>,
    Who(caller): Who,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let slot = Slot::enter(&state.coordinator, &caller.user)?;
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let keep_alive = KeepAlive::new().interval(Duration::from_secs(15));
    Ok(Sse::new(Follow::new(state, slot, last).into_stream())
        .keep_alive(keep_alive)
        .into_response())
}

/// Where the latest task's events come from: this node's own coordinator,
/// or the node that coordinates the task this node takes part in.
#[derive(Debug, Clone, PartialEq)]
enum Source {
    Local,
    Remote(String),
}

impl Source {
    fn of(state: &AppState) -> Source {
        remote_coordinator(state).map_or(Source::Local, Source::Remote)
    }
}

/// One connection's place in the events of its source.
struct Follow {
    state: AppState,
    source: Source,
    /// This node's coordinator's latest task.
    rx: tokio::sync::watch::Receiver<Option<TaskStatus>>,
    /// The task this node last joined: when it changes, so may the source.
    joined: tokio::sync::watch::Receiver<Option<crate::node::TaskRef>>,
    /// The version last sent (or resumed from); `None`: a snapshot is due.
    last: Option<u64>,
    /// Why the next snapshot is sent.
    reason: &'static str,
    /// The task this node joined that the remote source has not shown
    /// yet (a node joins before its coordinator publishes the task):
    /// nothing of that source is sent until it does.
    awaiting: Option<String>,
    pending: VecDeque<WireEvent>,
    _slot: Slot,
}

impl Follow {
    fn new(state: AppState, slot: Slot, resume: Option<u64>) -> Follow {
        Follow {
            source: Source::of(&state),
            rx: state.coordinator.subscribe(),
            joined: state.node.follow_last_task(),
            // A resumed version the source no longer has (or never gave)
            // turns into a snapshot, reason `behind`.
            last: resume,
            reason: if resume.is_some() {
                "behind"
            } else {
                "connected"
            },
            pending: VecDeque::new(),
            awaiting: None,
            state,
            _slot: slot,
        }
    }

    fn into_stream(self) -> impl Stream<Item = Result<Event, Infallible>> {
        futures::stream::unfold(self, |mut f| async move {
            let event = f.next().await?;
            Some((Ok(sse(event)), f))
        })
    }

    /// The next event for this connection; `None` when the node stops.
    async fn next(&mut self) -> Option<WireEvent> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            self.joined.borrow_and_update();
            let source = Source::of(&self.state);
            if source != self.source {
                // Another node coordinates now (or this one): its versions
                // count from elsewhere, so start over from its snapshot.
                self.awaiting = match source {
                    Source::Remote(_) => self.state.node.last_task().map(|t| t.task_id.to_string()),
                    Source::Local => None,
                };
                self.source = source;
                self.last = None;
                self.reason = "coordinator";
            }
            match (self.source.clone(), self.last) {
                (Source::Local, None) => {
                    let task = self.rx.borrow_and_update().clone();
                    return Some(self.snapshot(task));
                }
                (Source::Local, Some(last)) => {
                    self.rx.borrow_and_update();
                    match coordinator_events(&self.state.coordinator, last, BATCH) {
                        Err(Behind) => {
                            self.last = None;
                            self.reason = "behind";
                        }
                        Ok(events) if events.is_empty() => {
                            // A change here, or this node joined a task
                            // (perhaps another node's).
                            tokio::select! {
                                changed = self.rx.changed() => changed.ok()?,
                                joined = self.joined.changed() => joined.ok()?,
                            }
                        }
                        Ok(events) => self.queue(events),
                    }
                }
                (Source::Remote(node), last) => {
                    // Given up if this node joins another task meanwhile.
                    let mut joined = self.joined.clone();
                    tokio::select! {
                        relayed = self.relay(&node, last) => relayed,
                        joined = joined.changed() => joined.ok()?,
                    }
                }
            }
        }
    }

    /// One long-poll of the coordinator `node` for what follows `last`.
    async fn relay(&mut self, node: &str, last: Option<u64>) {
        let peers = self.state.coordinator.peers();
        let wait = if last.is_some() {
            RELAY_WAIT
        } else {
            Duration::ZERO
        };
        match peers.task_events(node, last, wait).await {
            Ok(TaskEvents::Events { events }) => match relayable(events, last) {
                Ok(events) => {
                    let events = self.past_awaited(events);
                    self.queue(events);
                }
                Err(why) => {
                    tracing::warn!(%node, "not relaying the coordinator's events: {why}");
                    tokio::time::sleep(RETRY).await;
                }
            },
            Ok(TaskEvents::Snapshot { task }) => {
                let shows = |id: &String| task.as_ref().is_some_and(|t| t.task_id == *id);
                if self.awaiting.as_ref().is_some_and(|id| !shows(id)) {
                    // Not published there yet: follow on from here, quietly.
                    self.last = Some(task.as_ref().map_or(0, |t| t.version));
                } else {
                    self.awaiting = None;
                    let event = self.snapshot(task);
                    self.pending.push_back(event);
                }
            }
            Err(e) if e.status() == Some(StatusCode::NOT_FOUND) => {
                // A coordinator without the events route (an older
                // version): its status, whole, when it changes.
                let query = [
                    ("since".to_string(), last.unwrap_or(0).to_string()),
                    ("wait".to_string(), RELAY_WAIT.as_secs_f64().to_string()),
                ];
                let query = if last.is_some() { &query[..] } else { &[] };
                let wait = if last.is_some() {
                    RELAY_WAIT
                } else {
                    Duration::ZERO
                };
                match peers.latest_task(node, query, wait).await {
                    Ok(value) => {
                        let task: Option<TaskStatus> = serde_json::from_value(value).ok();
                        if last.is_none() || task.as_ref().map(|t| t.version) > last {
                            self.reason = "polled";
                            let event = self.snapshot(task);
                            self.pending.push_back(event);
                        }
                    }
                    Err(_) => tokio::time::sleep(RETRY).await,
                }
            }
            // Unreachable for now: the stream stays open (keep-alives
            // flow) and asks again.
            Err(_) => tokio::time::sleep(RETRY).await,
        }
    }

    /// While awaiting a task, only `events` from its `started` on.
    fn past_awaited(&mut self, events: Vec<WireEvent>) -> Vec<WireEvent> {
        let Some(id) = self.awaiting.clone() else {
            return events;
        };
        let read = events.last().map(|e| e.id);
        match from_started(events, &id, self.reason) {
            Some(events) => {
                self.awaiting = None;
                events
            }
            None => {
                // Their versions still count as read.
                self.last = read.or(self.last);
                Vec::new()
            }
        }
    }

    fn queue(&mut self, events: Vec<WireEvent>) {
        if let Some(e) = events.last() {
            self.last = Some(e.id);
        }
        self.pending.extend(events);
    }

    fn snapshot(&mut self, task: Option<TaskStatus>) -> WireEvent {
        let version = task.as_ref().map_or(0, |t| t.version);
        self.last = Some(version);
        let data = Snapshot {
            reason: self.reason,
            task: task.as_ref(),
        };
        WireEvent {
            event: "snapshot".into(),
            id: version,
            data: serde_json::to_string(&data).unwrap_or_default(),
        }
    }
}

/// `events` from the `started` of task `id` on, that one turned into the
/// snapshot (with `reason`) a change of source owes the client; `None`
/// if the task does not start among them.
fn from_started(mut events: Vec<WireEvent>, id: &str, reason: &str) -> Option<Vec<WireEvent>> {
    let started = |e: &WireEvent| {
        (e.event == "started")
            .then(|| serde_json::from_str::<serde_json::Value>(&e.data).ok())
            .flatten()
            .map(|d| d["task"].clone())
            .filter(|task| task["taskId"] == id)
    };
    let (at, task) = events
        .iter()
        .enumerate()
        .find_map(|(i, e)| started(e).map(|task| (i, task)))?;
    let mut rest = events.split_off(at);
    rest[0] = WireEvent {
        event: "snapshot".into(),
        id: rest[0].id,
        data: json!({ "reason": reason, "task": task }).to_string(),
    };
    Some(rest)
}

/// Events from another node that this node may send on: only the
/// stream's own event names, ids after `last` and rising, data one line
/// of JSON (so no byte of it can break the SSE framing), relayed as the
/// coordinator wrote them.
fn relayable(events: Vec<WireEvent>, last: Option<u64>) -> Result<Vec<WireEvent>, String> {
    let mut previous = last;
    events
        .into_iter()
        .map(|e| {
            if !matches!(e.event.as_str(), "started" | "change") {
                return Err(format!(
                    "an event named {:?}",
                    e.event.escape_debug().to_string()
                ));
            }
            if previous.is_some_and(|p| e.id <= p) {
                return Err(format!("event {} after {previous:?}", e.id));
            }
            previous = Some(e.id);
            if e.data.contains(['\r', '\n']) {
                return Err(format!("event {}: data of more than one line", e.id));
            }
            serde_json::from_str::<serde::de::IgnoredAny>(&e.data)
                .map_err(|err| format!("event {}: {err}", e.id))?;
            Ok(e)
        })
        .collect()
}

/// A snapshot's data, serialised straight from the task (not through a
/// `serde_json::Value` tree: a task of 10,000 nodes is a few MB).
#[derive(serde::Serialize)]
struct Snapshot<'a> {
    reason: &'a str,
    task: Option<&'a TaskStatus>,
}

/// An event as Server-Sent Events carry it (a snapshot of no task has no
/// id: there is no version to resume from).
fn sse(e: WireEvent) -> Event {
    let event = Event::default().event(&e.event).data(e.data);
    if e.event == "snapshot" && e.id == 0 {
        event
    } else {
        event.id(e.id.to_string())
    }
}

/// Up to `max` of this node's coordinator's events after version `last`,
/// as the stream sends them.
fn coordinator_events(
    coordinator: &Coordinator,
    last: u64,
    max: usize,
) -> Result<Vec<WireEvent>, Behind> {
    Ok(coordinator
        .events_after(last, max)?
        .iter()
        .map(|e| WireEvent {
            event: e.name().to_string(),
            id: e.version(),
            data: serde_json::to_string(&**e).unwrap_or_default(),
        })
        .collect())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TaskEventsQuery {
    after: Option<u64>,
    wait: Option<f64>,
}

/// `GET /internal/v1/tasks/events` (signed, another node's stream): this
/// coordinator's events after `after`, waiting up to `wait` seconds (at
/// most 30) for one; the latest task whole if `after` is missing or too
/// old. Never forwarded to another node.
pub(super) async fn task_events(
    State(state): State<AppState>,
    _: Peer,
    query: Result<Query<TaskEventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<TaskEvents>, ApiError> {
    let Query(query) = query.map_err(super::public::bad_query)?;
    // Checked before use: a NaN or negative wait from a peer would panic
    // `Duration::from_secs_f64`.
    super::public::check_wait("wait", query.wait)?;
    let coordinator = &state.coordinator;
    let snapshot = || TaskEvents::Snapshot {
        task: coordinator.latest(),
    };
    let Some(after) = query.after else {
        return Ok(Json(snapshot()));
    };
    let wait = Duration::from_secs_f64(query.wait.unwrap_or(0.0).clamp(0.0, MAX_RELAY_WAIT_SECS));
    let mut rx = coordinator.subscribe();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        rx.borrow_and_update();
        match coordinator_events(coordinator, after, BATCH) {
            Err(Behind) => return Ok(Json(snapshot())),
            Ok(events) if !events.is_empty() => return Ok(Json(TaskEvents::Events { events })),
            Ok(_) => match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => {
                    return Ok(Json(TaskEvents::Events { events: Vec::new() }));
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(event: &str, id: u64, data: &str) -> WireEvent {
        WireEvent {
            event: event.into(),
            id,
            data: data.into(),
        }
    }

    #[test]
    fn a_task_this_node_joined_is_followed_from_its_start() {
        let started = |id: u64, task: &str| {
            wire(
                "started",
                id,
                &json!({"kind": "started", "task": {"taskId": task, "version": id}}).to_string(),
            )
        };
        let change = |id: u64| wire("change", id, "{}");
        // Not among them: nothing to send.
        assert_eq!(
            from_started(vec![change(4), started(5, "old")], "new", "coordinator"),
            None
        );
        // From its start on, the start sent as the snapshot.
        let got = from_started(
            vec![change(4), started(5, "new"), change(6)],
            "new",
            "coordinator",
        )
        .unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].event.as_str(), got[0].id), ("snapshot", 5));
        let data: serde_json::Value = serde_json::from_str(&got[0].data).unwrap();
        assert_eq!(data["reason"], "coordinator");
        assert_eq!(data["task"]["taskId"], "new");
        assert_eq!(got[1], change(6));
    }

    #[test]
    fn a_peers_events_are_relayed_only_when_they_cannot_break_the_stream() {
        let ok = vec![
            wire("change", 5, r#"{"b":1,"a":2}"#),
            wire("started", 6, "{}"),
        ];
        assert_eq!(relayable(ok.clone(), Some(4)).unwrap(), ok, "verbatim");
        for (events, last) in [
            (vec![wire("change", 5, "{\"a\":\r\n 1}")], Some(4)),
            (vec![wire("snapshot\nevent: x", 5, "{}")], Some(4)),
            (vec![wire("change", 4, "{}")], Some(4)),
            (
                vec![wire("change", 6, "{}"), wire("change", 6, "{}")],
                Some(4),
            ),
            (vec![wire("change", 5, "not json\rdata: x")], Some(4)),
        ] {
            assert!(relayable(events.clone(), last).is_err(), "{events:?}");
        }
    }
}
