//! A session's events as lines ([`crate::api`] writes them to the
//! session's connection): job events as NDJSON, heartbeats in between,
//! and the node's slot released when the stream is dropped.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use tokio::sync::mpsc;
use tokio::time::{Interval, MissedTickBehavior};

use super::NodeService;
use crate::protocol::NodeEvent;

pub struct SessionStream {
    node: Arc<NodeService>,
    session_id: u64,
    events: mpsc::UnboundedReceiver<NodeEvent>,
    heartbeat: Interval,
    lease: Duration,
}

impl SessionStream {
    pub(super) fn new(
        node: Arc<NodeService>,
        session_id: u64,
        events: mpsc::UnboundedReceiver<NodeEvent>,
        every: Duration,
        lease: Duration,
    ) -> SessionStream {
        // The first tick is immediate: the coordinator sees a line at once.
        let mut heartbeat = tokio::time::interval(every);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        SessionStream {
            node,
            session_id,
            events,
            heartbeat,
            lease,
        }
    }

    /// How long the node keeps the session without hearing from its
    /// coordinator.
    pub fn lease(&self) -> Duration {
        self.lease
    }
}

/// `event` as a line of a session.
pub fn event_line(event: &NodeEvent) -> Bytes {
    let mut bytes = serde_json::to_vec(event).expect("events serialize");
    bytes.push(b'\n');
    bytes.into()
}

impl Stream for SessionStream {
    type Item = Bytes;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Poll::Ready(event) = self.events.poll_recv(cx) {
            // `None` cannot happen while the session holds the sender, but
            // if it does the session is over.
            return Poll::Ready(event.map(|e| event_line(&e)));
        }
        match self.heartbeat.poll_tick(cx) {
            Poll::Ready(_) => Poll::Ready(Some(event_line(&NodeEvent::Heartbeat))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for SessionStream {
    /// The coordinator closed the session or its connection died: the link
    /// is broken, so the node lets go of the task.
    fn drop(&mut self) {
        self.node.release(self.session_id, None);
    }
}
