//! The node-to-node protocol, shared by [`crate::node`] (server side) and
//! [`crate::coordinator`] (client side).
//!
//! A coordinator opens a **session** on every node of the cluster: a
//! signed `POST /internal/v1/sessions` over HTTP/1.1 that asks to upgrade
//! the connection to [`SESSION_PROTOCOL`]. A node that takes the session
//! answers `101 Switching Protocols`, and from then on the connection is
//! the session's alone, for the whole task, and carries lines both ways:
//!
//! - node to coordinator: [`NodeEvent`]s as newline-delimited JSON, with a
//!   heartbeat every interval;
//! - coordinator to node: [`SessionCommand`]s, each signed and numbered
//!   ([`crate::peer_auth::LineSigner`]): `job` starts the collector,
//!   `upload` uploads what it collected (the coordinator sends it when a
//!   cluster-wide upload slot is free), `cancel` stops whatever runs,
//!   `ping` (every heartbeat interval) says the coordinator is still
//!   there, and `close` ends the session. A command the node cannot carry
//!   out is answered with a [`NodeEvent::Refused`] line.
//!
//! The session is at once:
//!
//! - the cluster-wide lock: a node holds one session at a time and answers
//!   `409` to a second one, so two collections can never overlap;
//! - the link: when the coordinator's connection goes away, the node
//!   cancels its job and cleans up; when the node goes away, the
//!   coordinator sees the stream end (or heartbeats stop). A node that
//!   hears nothing from its coordinator for the session's lease (three
//!   intervals) lets go of the session and stops its job, so a
//!   coordinator that hangs or is cut off never holds the cluster's lock
//!   for long;
//! - the only channel from node to coordinator: nodes never call the
//!   coordinator, so no request can wait on another in a cycle.
//!
//! A connection per node, and nothing else held for it: a coordinator of
//! 10,000 nodes holds 10,000 sockets with a line buffer each, not an
//! HTTP/2 connection's buffers and tables (`docs/DESIGN.md`, "Known
//! limits"). The protocol's name carries its version: a node that speaks
//! another answers `426` naming its own, and an older node that does not
//! upgrade at all is told apart by its answer; either way the start says
//! which node to upgrade.
//!
//! Other node-to-node requests (forwarded status, cancel and events,
//! settings) are short HTTP/2 requests.
//!
//! Every call has deadlines in both directions: the coordinator gives up
//! on a node that does not answer within `peer_timeout_ms`, and a node
//! gives up on a coordinator that stops pinging.
//!
//! Every internal request is signed with the cluster secret (see
//! [`crate::peer_auth`]): the secret itself never crosses the wire, and a
//! captured request cannot be replayed. Everything a peer sends is checked
//! like public input: task ids are the coordinator's own format
//! ([`TaskId`]), the coordinator must be a node of the cluster.

use serde::{Deserialize, Serialize};

/// Every node-to-node path starts with this.
pub const INTERNAL_PREFIX: &str = "/internal/";
pub const SESSIONS_PATH: &str = "/internal/v1/sessions";
/// The coordinator's view of its latest task (for status on other nodes).
pub const LATEST_TASK_PATH: &str = "/internal/v1/tasks/latest";
/// Ask a coordinator to cancel its task (cancel requested on another node).
pub const CANCEL_TASK_PATH: &str = "/internal/v1/tasks/cancel";
/// Replace a node's cluster settings (`settings::ClusterSettings`).
pub const SETTINGS_PATH: &str = "/internal/v1/settings";
/// The coordinator's task events after a version (`?after=V&wait=S`), for
/// the event stream of a node that does not coordinate: [`TaskEvents`].
pub const TASK_EVENTS_PATH: &str = "/internal/v1/tasks/events";

/// One event of `GET /collectLogs/events` as the coordinator sends it:
/// its name, id (the task version) and data, relayed verbatim.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireEvent {
    pub event: String,
    pub id: u64,
    pub data: String,
}

/// The answer of [`TASK_EVENTS_PATH`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum TaskEvents {
    /// The events after the version asked for, in order; none if nothing
    /// changed within the wait.
    Events { events: Vec<WireEvent> },
    /// No version was asked for, or the coordinator no longer holds every
    /// event after it: the latest task, whole (`None`: no task yet).
    Snapshot {
        task: Option<crate::coordinator::task::TaskStatus>,
    },
}

/// A task's identifier: 32 lowercase hex digits, as the coordinator
/// makes them. A node uses it as a directory name, so nothing else is ever
/// accepted (no `/`, no `..`, no absolute path), wherever it comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TaskId(String);

/// What a bad task id gets told.
pub const BAD_TASK_ID: &str = "a task id is 32 lowercase hexadecimal digits";

impl TaskId {
    /// A fresh random id.
    pub fn random() -> TaskId {
        TaskId(format!("{:032x}", rand::random::<u128>()))
    }

    pub fn parse(text: &str) -> Result<TaskId, &'static str> {
        let valid =
            text.len() == 32 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if valid {
            Ok(TaskId(text.to_string()))
        } else {
            Err(BAD_TASK_ID)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TaskId {
    type Error = &'static str;
    fn try_from(text: String) -> Result<TaskId, &'static str> {
        TaskId::parse(&text)
    }
}

impl From<TaskId> for String {
    fn from(id: TaskId) -> String {
        id.0
    }
}

impl std::ops::Deref for TaskId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for TaskId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Body of `POST /internal/v1/sessions`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OpenSession {
    pub task_id: TaskId,
    /// Name of the coordinating node: a node of `[nodes]`, and the one
    /// that signed the request.
    pub coordinator: String,
    /// How long the node keeps the session without hearing from the
    /// coordinator (a command or a `ping`), in ms. The node bounds it
    /// ([`MIN_LEASE_MS`]..=[`MAX_LEASE_MS`]); absent: three of its own
    /// heartbeat intervals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ms: Option<u64>,
    /// Whether this node is asked to collect (a node that is not only
    /// holds the lock). A chosen node refuses the session when its disk
    /// is below the reserve, so the start is refused with the reason.
    #[serde(default)]
    pub collects: bool,
}

/// Shortest and longest lease a node accepts.
pub const MIN_LEASE_MS: u64 = 500;
pub const MAX_LEASE_MS: u64 = 60_000;

/// Answer of a chosen node that cannot collect right now (HTTP 507): its
/// data directory has less free space than the operator's reserve.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LowDisk {
    pub message: String,
}

/// Field-keyed errors (`{"field": "why"}`, `_` for the whole request) as
/// one line: `why; field: why`. How a node's refusal reads to its
/// coordinator, whether it came as an HTTP error body or a `refused`
/// event, and how the CLI shows an API error.
pub fn field_errors_message(errors: &std::collections::BTreeMap<String, String>) -> String {
    errors
        .iter()
        .map(|(k, v)| {
            if k == "_" {
                v.clone()
            } else {
                format!("{k}: {v}")
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The protocol a session connection is upgraded to (`Upgrade:` header).
pub const SESSION_PROTOCOL: &str = "autocollect-session/1";

/// A coordinator's command on a session connection (one signed line).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "camelCase", deny_unknown_fields)]
pub enum SessionCommand {
    /// Start the collector.
    Job {
        #[serde(default)]
        parameters: CollectParameters,
    },
    /// Upload what was collected.
    #[serde(rename_all = "camelCase")]
    Upload {
        /// `https://HOST/CUSTOMER/[TICKET/]`; the node appends the file
        /// name.
        base_url: String,
        /// The start request's `uploadProxy`
        /// (`http://[user:pass@]host:port`); without it the node uses its
        /// own `[upload] proxy`, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        proxy: Option<String>,
    },
    /// Stop whatever runs, and remove what it made.
    Cancel,
    /// The coordinator is still there (renews the session's lease).
    Ping,
    /// The task is over: let go of the session.
    Close,
}

impl SessionCommand {
    /// The command's name, as the protocol spells it.
    pub fn name(&self) -> &'static str {
        match self {
            SessionCommand::Job { .. } => "job",
            SessionCommand::Upload { .. } => "upload",
            SessionCommand::Cancel => "cancel",
            SessionCommand::Ping => "ping",
            SessionCommand::Close => "close",
        }
    }
}

/// What the start request asks of every node's collection (Couchbase's
/// options). The coordinator fills in the salt, so it is the same on
/// every node. It travels only in the `job` command: the coordinator
/// keeps it in memory for the task, never in the saved task or its
/// status, and its `Debug` masks the salt and the encryption password.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CollectParameters {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_redaction_level: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_redaction_salt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tmp_dir: Option<String>,
    /// Where each node keeps its zip (instead of `data_dir/jobs/TASK/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_regexp: Option<String>,
    /// ns_server's `encryptionPassword`: the collector encrypts the
    /// (unredacted) zip with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption_password: Option<Secret>,
    /// The request's time window, RFC 3339 UTC (made absolute by the
    /// node that took the request, so every node has the same one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
}

/// What a masked secret reads as (audit log, manifest, status).
pub const MASK: &str = "*****";

/// Whether a parameter or option name looks like it holds a secret (it
/// holds, in any case, one of these words): its value is masked wherever
/// it is recorded.
pub fn is_secret_name(name: &str) -> bool {
    const SECRET_WORDS: &[&str] = &[
        "password",
        "passwd",
        "secret",
        "salt",
        "token",
        "key",
        "credential",
        "auth",
        "cookie",
    ];
    let name = name.to_ascii_lowercase();
    SECRET_WORDS.iter().any(|w| name.contains(w))
}

/// A secret start parameter (the zip encryption password). Its `Debug`
/// prints `<secret>` and it has no `Display`, so it cannot slip into a
/// log line or an error message by accident; [`Secret::expose`] is the
/// one way to the text. It serializes as a plain string, for the
/// node-to-node `job` command only.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(text: impl Into<String>) -> Secret {
        Secret(text.into())
    }

    /// The secret itself: for checking it and for handing it to the
    /// collector, nothing else.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<secret>")
    }
}

impl std::fmt::Debug for CollectParameters {
    /// Never prints the salt or the encryption password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CollectParameters")
            .field("log_redaction_level", &self.log_redaction_level)
            .field(
                "log_redaction_salt",
                &self.log_redaction_salt.as_ref().map(|_| "<secret>"),
            )
            .field("tmp_dir", &self.tmp_dir)
            .field("log_dir", &self.log_dir)
            .field("task_regexp", &self.task_regexp)
            .field("encryption_password", &self.encryption_password)
            .field("since", &self.since)
            .field("until", &self.until)
            .finish()
    }
}

impl CollectParameters {
    /// As the collector's `task.parameters()` (WIT keys). `log_dir` is
    /// the node's business, not the plugin's.
    pub fn plugin_parameters(&self) -> Vec<(String, String)> {
        let password = self
            .encryption_password
            .as_ref()
            .map(|s| s.expose().to_string());
        [
            ("log-redaction-level", &self.log_redaction_level),
            ("log-redaction-salt", &self.log_redaction_salt),
            ("tmp-dir", &self.tmp_dir),
            ("task-regexp", &self.task_regexp),
            ("encryption-password", &password),
            ("since", &self.since),
            ("until", &self.until),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| (k.to_string(), v.clone())))
        .collect()
    }
}

/// Answer of a node that already holds a session (HTTP 409).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Busy {
    pub task_id: String,
    pub coordinator: String,
}

/// A plugin a node runs, as `/health` and a node's status name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PluginRef {
    /// `collector` or `uploader`.
    pub role: String,
    /// `builtin:NAME` or the component's path.
    pub source: String,
    /// SHA-256 of the component's bytes, lowercase hex.
    pub sha256: String,
    /// The `autocollect:plugin` version it was built against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wit_version: Option<String>,
}

/// One line of a session's events (node to coordinator).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "camelCase")]
pub enum NodeEvent {
    /// Sent every heartbeat interval so both ends notice a dead peer.
    Heartbeat,
    /// The collector plugin is running. `plugin`: which one (absent from
    /// nodes that predate it).
    Started {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        plugin: Option<PluginRef>,
    },
    /// The plugin reported progress.
    Progress {
        done: u64,
        total: u64,
        message: String,
    },
    /// The collector finished; `path` is the artifact on the node.
    #[serde(rename_all = "camelCase")]
    Collected {
        path: String,
        size: u64,
        summary: String,
        /// The artifact's SHA-256 (lowercase hex), computed by the host.
        /// Absent from nodes that predate it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sha256: Option<String>,
        /// Why the collection is partial (the plugin wrapped up early,
        /// `budget.partial`); absent when it is whole.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        partial: Option<String>,
        /// Start parameters (`since`, `until`) the collector was given
        /// but did not honour.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        ignored: Vec<String>,
    },
    /// The collector failed. `status_code` is the tool's own status, when
    /// it got as far as having one; `output` explains.
    #[serde(rename_all = "camelCase")]
    Failed {
        status_code: Option<String>,
        output: String,
    },
    /// The uploader started sending the artifact to `url`; `plugin`: which
    /// uploader (absent from nodes that predate it).
    UploadStarted {
        url: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        plugin: Option<PluginRef>,
    },
    /// The artifact is stored at `url`.
    #[serde(rename_all = "camelCase")]
    Uploaded { url: String, bytes_sent: u64 },
    /// The upload failed: `status_code` is the HTTP status when the server
    /// answered, `output` its answer or the reason.
    #[serde(rename_all = "camelCase")]
    UploadFailed {
        url: String,
        status_code: Option<String>,
        output: String,
    },
    /// The job was cancelled and its output removed.
    Cancelled,
    /// The node did not carry out the coordinator's `command` (`job`,
    /// `upload`), and says why.
    Refused { command: String, message: String },
}

impl NodeEvent {
    /// Does this event end the collection phase?
    pub fn ends_collection(&self) -> bool {
        matches!(
            self,
            NodeEvent::Collected { .. } | NodeEvent::Failed { .. } | NodeEvent::Cancelled
        )
    }

    /// Does this event end the upload phase?
    pub fn ends_upload(&self) -> bool {
        matches!(
            self,
            NodeEvent::Uploaded { .. } | NodeEvent::UploadFailed { .. } | NodeEvent::Cancelled
        )
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Parameters with every secret set (salt and password), for the
    /// tests that check none of them leaks.
    pub(crate) fn secret_parameters() -> CollectParameters {
        CollectParameters {
            log_redaction_level: Some("partial".into()),
            log_redaction_salt: Some("pepper-salt".into()),
            encryption_password: Some(Secret::new("hunter2-zip")),
            ..Default::default()
        }
    }

    #[test]
    fn debug_never_prints_the_salt_or_the_password() {
        let p = secret_parameters();
        for text in [
            format!("{p:?}"),
            format!("{p:#?}"),
            format!(
                "{:?}",
                SessionCommand::Job {
                    parameters: p.clone()
                }
            ),
        ] {
            assert!(!text.contains("pepper-salt"), "{text}");
            assert!(!text.contains("hunter2-zip"), "{text}");
            assert!(text.contains("<secret>"), "{text}");
        }
    }

    #[test]
    fn the_password_travels_in_the_job_command_and_reaches_the_collector() {
        let p = secret_parameters();
        let wire = serde_json::to_value(SessionCommand::Job {
            parameters: p.clone(),
        })
        .unwrap();
        assert_eq!(wire["command"], "job");
        assert_eq!(wire["parameters"]["encryptionPassword"], "hunter2-zip");
        let SessionCommand::Job { parameters: back } = serde_json::from_value(wire).unwrap() else {
            panic!("a job command");
        };
        assert_eq!(back, p);
        assert!(
            p.plugin_parameters()
                .contains(&("encryption-password".to_string(), "hunter2-zip".to_string()))
        );
        let none = CollectParameters::default();
        assert_eq!(serde_json::to_value(&none).unwrap(), serde_json::json!({}));
        assert!(none.plugin_parameters().is_empty());
    }

    #[test]
    fn started_events_name_their_plugin_and_older_ones_still_parse() {
        let old: NodeEvent = serde_json::from_str(r#"{"event":"started"}"#).unwrap();
        assert_eq!(old, NodeEvent::Started { plugin: None });
        let old: NodeEvent =
            serde_json::from_str(r#"{"event":"uploadStarted","url":"https://h/c/f.zip"}"#).unwrap();
        assert!(matches!(old, NodeEvent::UploadStarted { plugin: None, .. }));
        let event = NodeEvent::Started {
            plugin: Some(PluginRef {
                role: "collector".into(),
                source: "builtin:files".into(),
                sha256: "ab".repeat(32),
                wit_version: Some("0.1.5".into()),
            }),
        };
        let line = serde_json::to_string(&event).unwrap();
        assert!(line.contains(r#""witVersion":"0.1.5""#), "{line}");
        assert_eq!(serde_json::from_str::<NodeEvent>(&line).unwrap(), event);
    }
}
