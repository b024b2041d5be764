//! The task's change log, for `GET /collectLogs/events`: one event per
//! version of the latest task, kept in a bounded ring so that a client
//! reconnecting with `Last-Event-ID` gets what it missed. Readers hold no
//! queue of their own: each one remembers the last version it sent and
//! reads on from the ring; one that fell out of the ring (too slow, or
//! away too long) is sent a fresh snapshot instead.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde::Serialize;

use super::task::{NodeStatus, TaskState, TaskStatus};

/// Events kept for readers that are behind or reconnecting.
pub const RING_CAPACITY: usize = 1024;

/// What changed at one version of the latest task.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum TaskEvent {
    /// A new task: the whole of it.
    Started { task: TaskStatus },
    /// The task changed: its state and progress, and only the nodes
    /// whose status changed, each with its new status.
    #[serde(rename_all = "camelCase")]
    Changed {
        version: u64,
        task_id: String,
        status: TaskState,
        progress: u32,
        nodes: BTreeMap<String, NodeStatus>,
    },
}

impl TaskEvent {
    pub fn version(&self) -> u64 {
        match self {
            TaskEvent::Started { task } => task.version,
            TaskEvent::Changed { version, .. } => *version,
        }
    }

    /// The event's SSE name.
    pub fn name(&self) -> &'static str {
        match self {
            TaskEvent::Started { .. } => "started",
            TaskEvent::Changed { .. } => "change",
        }
    }

    /// The change of one node, `node`, from `before` to its status in
    /// `after`: only that node is looked at and copied.
    pub fn node_changed(after: &TaskStatus, node: &str, before: Option<&NodeStatus>) -> TaskEvent {
        let nodes = after
            .per_node
            .get_key_value(node)
            .filter(|(_, status)| before != Some(*status))
            .map(|(node, status)| (node.clone(), status.clone()))
            .into_iter()
            .collect();
        TaskEvent::change(after, nodes)
    }

    /// The change from `before` to `after` (same task), any nodes.
    pub fn changed(before: &BTreeMap<String, NodeStatus>, after: &TaskStatus) -> TaskEvent {
        let nodes = after
            .per_node
            .iter()
            .filter(|(node, status)| before.get(*node) != Some(*status))
            .map(|(node, status)| (node.clone(), status.clone()))
            .collect();
        TaskEvent::change(after, nodes)
    }

    /// `after`'s state and progress with `nodes`, the ones that changed.
    fn change(after: &TaskStatus, nodes: BTreeMap<String, NodeStatus>) -> TaskEvent {
        TaskEvent::Changed {
            version: after.version,
            task_id: after.task_id.clone(),
            status: after.status,
            progress: after.progress,
            nodes,
        }
    }
}

/// Why a reader cannot go on from where it is: it needs a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Behind;

/// The most recent events, by consecutive versions.
#[derive(Debug, Default)]
pub struct EventRing {
    events: VecDeque<Arc<TaskEvent>>,
}

impl EventRing {
    pub fn push(&mut self, event: TaskEvent) {
        if let Some(last) = self.events.back()
            && last.version() + 1 != event.version()
        {
            // Versions must be consecutive for `after` to know nothing is
            // missing; a jump starts the ring over.
            self.events.clear();
        }
        if self.events.len() == RING_CAPACITY {
            self.events.pop_front();
        }
        self.events.push_back(Arc::new(event));
    }

    /// Up to `max` events after version `last`, given that the latest
    /// version is `current`; `Behind` if some of them are gone.
    pub fn after(
        &self,
        last: u64,
        current: u64,
        max: usize,
    ) -> Result<Vec<Arc<TaskEvent>>, Behind> {
        if last == current {
            return Ok(Vec::new());
        }
        let Some(oldest) = self.events.front().map(|e| e.version()) else {
            return Err(Behind);
        };
        if last > current || oldest > last + 1 {
            return Err(Behind);
        }
        let skip = (last + 1 - oldest) as usize;
        Ok(self.events.iter().skip(skip).take(max).cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(version: u64) -> TaskEvent {
        TaskEvent::Changed {
            version,
            task_id: "t".into(),
            status: TaskState::Running,
            progress: 0,
            nodes: BTreeMap::new(),
        }
    }

    #[test]
    fn readers_resume_from_the_ring_or_are_told_they_are_behind() {
        let mut ring = EventRing::default();
        assert_eq!(ring.after(0, 0, 10).unwrap().len(), 0);
        assert_eq!(ring.after(0, 3, 10).unwrap_err(), Behind);
        for v in 1..=(RING_CAPACITY as u64 + 5) {
            ring.push(change(v));
        }
        let current = RING_CAPACITY as u64 + 5;
        let got = ring.after(current - 3, current, 10).unwrap();
        assert_eq!(
            got.iter().map(|e| e.version()).collect::<Vec<_>>(),
            [current - 2, current - 1, current]
        );
        assert_eq!(ring.after(current - 100, current, 2).unwrap().len(), 2);
        assert_eq!(ring.after(1, current, 10).unwrap_err(), Behind);
        assert_eq!(ring.after(current + 1, current, 10).unwrap_err(), Behind);
        ring.push(change(current + 10));
        assert_eq!(ring.after(current, current + 10, 10).unwrap_err(), Behind);
        assert_eq!(ring.after(current + 9, current + 10, 10).unwrap().len(), 1);
    }
}
