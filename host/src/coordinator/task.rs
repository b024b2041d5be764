//! A collection task's status, in the shape of Couchbase's tasks API
//! (`type: clusterLogsCollection`, `perNode`, ...), and its transitions.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::protocol::NodeEvent;

pub const TASK_TYPE: &str = "clusterLogsCollection";
/// Seconds a client should wait between polls while a task runs.
pub const REFRESH_PERIOD_SECS: f64 = 2.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum TaskState {
    Running,
    Completed,
    Cancelled,
}

impl TaskState {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Running => "running",
            TaskState::Completed => "completed",
            TaskState::Cancelled => "cancelled",
        }
    }
}

/// Per-node states, named as Couchbase names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum NodeState {
    /// Waiting: for the session, or for a collection slot.
    Starting,
    /// The collector runs.
    Started,
    Collected,
    Failed,
    /// Collected; waiting for a cluster-wide upload slot.
    StartingUpload,
    /// The uploader is sending the artifact (`url` set).
    StartedUpload,
    Uploaded,
    FailedUpload,
    Cancelled,
}

impl NodeState {
    /// The state's name as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Starting => "starting",
            NodeState::Started => "started",
            NodeState::Collected => "collected",
            NodeState::Failed => "failed",
            NodeState::StartingUpload => "startingUpload",
            NodeState::StartedUpload => "startedUpload",
            NodeState::Uploaded => "uploaded",
            NodeState::FailedUpload => "failedUpload",
            NodeState::Cancelled => "cancelled",
        }
    }

    /// Counted as finished in the task's progress, as Couchbase counts:
    /// `collected`, `failed`, `uploaded`, `failedUpload` (and `cancelled`).
    /// A node waiting for or running its upload is not finished, so in a
    /// task with uploads, progress falls back as collections hand over to
    /// uploads, then rises as uploads end.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            NodeState::Collected
                | NodeState::Failed
                | NodeState::Uploaded
                | NodeState::FailedUpload
                | NodeState::Cancelled
        )
    }
}

/// The latest progress a plugin reported: `done` of `total` (0: unknown)
/// bytes or steps, and what it is doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NodeProgress {
    pub done: u64,
    pub total: u64,
    pub message: String,
}

/// One node's part of a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub status: NodeState,
    /// The artifact, on that node's filesystem.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The artifact's SHA-256, as the node's host computed it (not in
    /// Couchbase's shape). Set with `path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// The collection stopped early (near a limit) and kept what it had
    /// (not in Couchbase's shape). Set with `path`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub partial: bool,
    /// Why it is partial: what was left out, in the plugin's words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_reason: Option<String>,
    /// Start parameters this node's collector was given but does not
    /// honour (`since`, `until`): it collected without them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignored_parameters: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collection_status_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collection_output: Option<String>,
    /// Where the artifact is (being) uploaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_status_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_output: Option<String>,
    /// Latest progress the plugin reported (not in Couchbase's shape).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<NodeProgress>,
    /// The plugins that ran this node's collection and upload: role,
    /// source, SHA-256, contract version (not in Couchbase's shape).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plugins: Vec<crate::protocol::PluginRef>,
}

impl NodeStatus {
    pub fn new(status: NodeState) -> NodeStatus {
        NodeStatus {
            status,
            path: None,
            sha256: None,
            partial: false,
            partial_reason: None,
            ignored_parameters: Vec::new(),
            collection_status_code: None,
            collection_output: None,
            url: None,
            upload_status_code: None,
            upload_output: None,
            progress: None,
            plugins: Vec::new(),
        }
    }

    pub fn failed(status_code: Option<String>, output: impl Into<String>) -> NodeStatus {
        NodeStatus {
            collection_status_code: status_code,
            collection_output: Some(output.into()),
            ..NodeStatus::new(NodeState::Failed)
        }
    }
}

/// Couchbase's task document, with autocollect's `taskId`, `version` and
/// per-node details.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskStatus {
    /// Always `clusterLogsCollection`.
    #[serde(rename = "type")]
    #[schemars(extend("const" = TASK_TYPE))]
    pub kind: String,
    pub task_id: String,
    /// The coordinating node.
    pub node: String,
    pub status: TaskState,
    /// Finished nodes x 100 / chosen nodes.
    #[schemars(range(max = 100))]
    pub progress: u32,
    /// Start time, `YYYY-MM-DD HH:MM:SS` UTC.
    pub ts: String,
    pub per_node: BTreeMap<String, NodeStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recommended_refresh_period: Option<f64>,
    #[serde(rename = "cancelURI", default, skip_serializing_if = "Option::is_none")]
    pub cancel_uri: Option<String>,
    /// Increases with every change (across tasks); see `?since=` on status.
    pub version: u64,
    /// How many nodes are finished, kept up to date by each change so that
    /// a change costs the same in a task of 3 nodes or of 10,000.
    #[serde(skip)]
    finished: Tally,
}

/// A count derived from `per_node` (`None`: not counted yet, as in a task
/// read from JSON). Not part of a task's value: tasks compare equal
/// whether or not they have counted.
#[derive(Debug, Clone, Copy, Default)]
struct Tally(Option<usize>);

impl PartialEq for Tally {
    fn eq(&self, _: &Tally) -> bool {
        true
    }
}

impl TaskStatus {
    pub fn new(
        task_id: String,
        coordinator: String,
        per_node: BTreeMap<String, NodeStatus>,
    ) -> Self {
        let mut task = TaskStatus {
            kind: TASK_TYPE.into(),
            task_id,
            node: coordinator,
            status: TaskState::Running,
            progress: 0,
            ts: chrono::Utc::now().format("%Y-%m-%d %H:%M:%S").to_string(),
            per_node,
            recommended_refresh_period: Some(REFRESH_PERIOD_SECS),
            cancel_uri: Some(crate::api::CANCEL_URI.into()),
            version: 0,
            finished: Tally(None),
        };
        task.update_progress();
        task
    }

    /// Count the finished nodes again, and set the progress.
    pub fn update_progress(&mut self) {
        let done = self
            .per_node
            .values()
            .filter(|n| n.status.is_finished())
            .count();
        self.finished = Tally(Some(done));
        self.set_progress(done);
    }

    fn set_progress(&mut self, done: usize) {
        let total = self.per_node.len() as u64;
        self.progress = (done as u64 * 100).checked_div(total).unwrap_or(100) as u32;
    }

    /// One node went from `before` to `after`: the progress follows,
    /// without counting every node again.
    fn node_changed(&mut self, before: Option<NodeState>, after: NodeState) {
        let Tally(Some(done)) = self.finished else {
            return self.update_progress();
        };
        let was = before.is_some_and(NodeState::is_finished);
        let done = match (was, after.is_finished()) {
            (false, true) => done + 1,
            (true, false) => done.saturating_sub(1),
            _ => done,
        };
        self.finished = Tally(Some(done));
        self.set_progress(done);
    }

    /// The task ended: no more refresh hints, every node in a final state.
    pub fn finish(&mut self, state: TaskState, unfinished_reason: &str) {
        self.status = state;
        self.recommended_refresh_period = None;
        self.cancel_uri = None;
        for node in self.per_node.values_mut() {
            if !node.status.is_finished() {
                *node = match state {
                    TaskState::Cancelled => NodeStatus::new(NodeState::Cancelled),
                    _ => NodeStatus::failed(None, unfinished_reason),
                };
            }
        }
        self.update_progress();
    }

    /// Apply a node's event; returns the node's new state if it changed.
    pub fn apply(&mut self, node: &str, event: &NodeEvent) -> Option<NodeState> {
        let entry = self.per_node.get_mut(node)?;
        let before = entry.status;
        match event {
            // Handled by the driver, which says what was refused.
            NodeEvent::Heartbeat | NodeEvent::Refused { .. } => {}
            NodeEvent::Started { plugin } => {
                entry.status = NodeState::Started;
                entry.plugins.extend(plugin.clone());
            }
            NodeEvent::Progress {
                done,
                total,
                message,
            } => {
                entry.progress = Some(NodeProgress {
                    done: *done,
                    total: *total,
                    message: message.clone(),
                })
            }
            NodeEvent::Collected {
                path,
                sha256,
                partial,
                ignored,
                ..
            } => {
                entry.ignored_parameters = ignored.clone();
                entry.status = NodeState::Collected;
                entry.path = Some(path.clone());
                entry.sha256 = sha256.clone();
                entry.partial = partial.is_some();
                entry.partial_reason = partial.clone();
            }
            NodeEvent::Failed {
                status_code,
                output,
            } => {
                let plugins = std::mem::take(&mut entry.plugins);
                *entry = NodeStatus::failed(status_code.clone(), output.clone());
                entry.plugins = plugins;
            }
            NodeEvent::UploadStarted { url, plugin } => {
                entry.plugins.extend(plugin.clone());
                entry.status = NodeState::StartedUpload;
                entry.url = Some(url.clone());
                entry.progress = None;
            }
            NodeEvent::Uploaded { url, .. } => {
                entry.status = NodeState::Uploaded;
                entry.url = Some(url.clone());
            }
            NodeEvent::UploadFailed {
                url,
                status_code,
                output,
            } => {
                entry.status = NodeState::FailedUpload;
                entry.url = Some(url.clone());
                entry.upload_status_code = status_code.clone();
                entry.upload_output = Some(output.clone());
            }
            NodeEvent::Cancelled => {
                // A cancelled job's directory is removed: no artifact left.
                entry.status = NodeState::Cancelled;
                entry.path = None;
                entry.sha256 = None;
            }
        }
        let after = entry.status;
        self.node_changed(Some(before), after);
        (after != before).then_some(after)
    }

    pub fn set_node(&mut self, node: &str, status: NodeStatus) {
        let after = status.status;
        let before = self.per_node.insert(node.to_string(), status);
        self.node_changed(before.map(|b| b.status), after);
    }

    /// Change only a node's state, keeping what it reported so far.
    pub fn set_state(&mut self, node: &str, state: NodeState) {
        if let Some(entry) = self.per_node.get_mut(node) {
            let before = entry.status;
            entry.status = state;
            if state == NodeState::Cancelled {
                entry.path = None; // the node removes a cancelled job's files
                entry.sha256 = None;
            }
            self.node_changed(Some(before), state);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(nodes: &[&str]) -> TaskStatus {
        let per_node = nodes
            .iter()
            .map(|n| (n.to_string(), NodeStatus::new(NodeState::Starting)))
            .collect();
        TaskStatus::new("t".into(), "n1".into(), per_node)
    }

    #[test]
    fn progress_counts_finished_nodes() {
        let mut t = task(&["a", "b", "c"]);
        assert_eq!(t.progress, 0);
        assert_eq!(
            t.apply("a", &NodeEvent::Started { plugin: None }),
            Some(NodeState::Started)
        );
        assert_eq!(t.apply("a", &NodeEvent::Heartbeat), None);
        let collected = NodeEvent::Collected {
            path: "/p".into(),
            size: 1,
            summary: String::new(),
            sha256: Some("ab".repeat(32)),
            partial: None,
            ignored: vec![],
        };
        assert_eq!(t.apply("a", &collected), Some(NodeState::Collected));
        assert_eq!(t.per_node["a"].sha256, Some("ab".repeat(32)));
        let v = serde_json::to_value(&t).unwrap();
        assert_eq!(v["perNode"]["a"]["sha256"], "ab".repeat(32));
        assert_eq!(t.progress, 33);
        let failed = NodeEvent::Failed {
            status_code: Some("2".into()),
            output: "boom".into(),
        };
        t.apply("b", &failed);
        assert_eq!(t.progress, 66);
        assert_eq!(t.per_node["b"].collection_status_code.as_deref(), Some("2"));
        assert_eq!(t.apply("ghost", &NodeEvent::Started { plugin: None }), None);
    }

    #[test]
    fn progress_kept_per_change_matches_a_recount() {
        let mut t = task(&["a", "b", "c", "d"]);
        t.set_state("a", NodeState::Collected);
        t.set_node("b", NodeStatus::failed(None, "x"));
        t.set_state("c", NodeState::StartingUpload); // collected, then not finished
        t.set_node("a", NodeStatus::new(NodeState::StartingUpload));
        let kept = t.progress;
        t.update_progress();
        assert_eq!((kept, t.progress), (25, 25));
        // A task read from JSON counts on its first change.
        let mut read: TaskStatus =
            serde_json::from_value(serde_json::to_value(&t).unwrap()).unwrap();
        read.set_state("d", NodeState::Collected);
        assert_eq!(read.progress, 50);
        assert_eq!(read, {
            t.set_state("d", NodeState::Collected);
            t
        });
    }

    #[test]
    fn finishing_settles_every_unfinished_node() {
        let mut t = task(&["a", "b"]);
        let collected = NodeEvent::Collected {
            path: "/p".into(),
            size: 1,
            summary: String::new(),
            sha256: None,
            partial: Some("near the deadline".into()),
            ignored: vec!["since".into()],
        };
        t.apply("a", &collected);
        t.apply("a", &NodeEvent::Cancelled);
        assert_eq!(t.per_node["a"].path, None, "its artifact was removed");
        t.apply("b", &collected);
        t.set_state("b", NodeState::Cancelled);
        assert_eq!(t.per_node["b"].path, None, "its artifact was removed");
        t.finish(TaskState::Cancelled, "unused");
        assert!(
            t.per_node
                .values()
                .all(|n| n.status == NodeState::Cancelled)
        );
        assert_eq!((t.progress, t.cancel_uri.clone()), (100, None));

        let mut t = task(&["a"]);
        t.finish(TaskState::Completed, "lost");
        assert_eq!(t.per_node["a"], NodeStatus::failed(None, "lost"));
    }

    #[test]
    fn the_json_has_couchbase_field_names() {
        let mut t = task(&["a"]);
        t.apply(
            "a",
            &NodeEvent::Failed {
                status_code: Some("1".into()),
                output: "x".into(),
            },
        );
        let v = serde_json::to_value(&t).unwrap();
        assert_eq!(v["type"], "clusterLogsCollection");
        assert_eq!(v["status"], "running");
        assert_eq!(v["perNode"]["a"]["status"], "failed");
        assert_eq!(v["perNode"]["a"]["collectionStatusCode"], "1");
        assert_eq!(v["perNode"]["a"]["collectionOutput"], "x");
        assert_eq!(v["recommendedRefreshPeriod"], 2.0);
        assert_eq!(v["cancelURI"], "/collectLogs/cancel");
    }
}
