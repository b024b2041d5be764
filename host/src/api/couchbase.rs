//! Couchbase Server's own routes for log collection, so that operators'
//! scripts written against ns_server keep working: the same parameters,
//! answers and task document. They share their implementation with the
//! `/collectLogs/*` routes (`public`).

use std::collections::BTreeMap;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use serde_json::{Map, Value, json};

use super::audit::Entry;
use super::error::ApiError;
use super::params::{Param, ParamsBody};
use super::public::{
    Admin, Reader, StatusQuery, cancel_task, latest_task, remote_coordinator, start_task,
};
use super::{AppState, params};
use crate::coordinator::task::{NodeState, TaskState, TaskStatus};
use crate::settings::{BAD_REDACTION_LEVEL, ClusterSettings, REDACTION_LEVELS};

pub const START_LOGS_URI: &str = "/controller/startLogsCollection";
pub const CANCEL_LOGS_URI: &str = "/controller/cancelLogsCollection";
pub const TASKS_URI: &str = "/pools/default/tasks";
pub const LOG_REDACTION_URI: &str = "/settings/logRedaction";
pub const POOLS_URI: &str = "/pools";
pub const POOL_URI: &str = "/pools/default";

/// The Couchbase Server version whose log collection API these routes
/// follow; `/pools` reports it (couchbase-cli compares major.minor with
/// its own and warns on a mismatch).
const COUCHBASE_API_VERSION: &str = "8.0.0";

/// The parameters of `POST /controller/startLogsCollection`.
pub(super) const START_PARAMS: &[&str] = &[
    "nodes",
    "uploadHost",
    "customer",
    "ticket",
    "uploadProxy",
    "logDir",
    "tmpDir",
    "logRedactionLevel",
    "logRedactionSalt",
    "bypassReachabilityChecks",
    "taskRegexp",
    "encryptionPassword",
];

/// The fields of a node's entry in Couchbase's task document.
const PER_NODE_FIELDS: &[&str] = &[
    "status",
    "path",
    "url",
    "collectionStatusCode",
    "collectionOutput",
    "uploadStatusCode",
    "uploadOutput",
];

/// The fields of the log collection task in Couchbase's task list.
const TASK_FIELDS: &[&str] = &[
    "type",
    "node",
    "status",
    "progress",
    "ts",
    "perNode",
    "recommendedRefreshPeriod",
    "cancelURI",
];

pub fn router() -> Router<AppState> {
    Router::new()
        .route(START_LOGS_URI, post(start))
        .route(CANCEL_LOGS_URI, post(cancel))
        .route(TASKS_URI, get(tasks))
        .route(POOLS_URI, get(pools))
        .route(POOL_URI, get(pool))
        .route(
            LOG_REDACTION_URI,
            get(log_redaction).post(set_log_redaction),
        )
}

/// The cluster's default redaction level, as this node has it.
async fn log_redaction(State(state): State<AppState>, _: Reader) -> Json<Value> {
    Json(json!({"logRedactionLevel": state.settings.get().log_redaction_level}))
}

/// Change the default redaction level on every node. Nodes that cannot
/// be reached are named in a 502 (the others have the new level).
async fn set_log_redaction(
    State(state): State<AppState>,
    Admin(caller): Admin,
    headers: HeaderMap,
    ParamsBody(body): ParamsBody,
) -> Result<Json<Value>, ApiError> {
    let params = params::parse(&headers, &body)?;
    let result = apply_log_redaction(&state, &params).await;
    state.audit.record(Entry {
        user: &caller.user,
        action: "settings",
        route: LOG_REDACTION_URI,
        params: Some(&params),
        known: &["logRedactionLevel"],
        task_id: None,
        outcome: result.as_ref().map(drop).map_err(ApiError::summary),
    });
    result
}

async fn apply_log_redaction(
    state: &AppState,
    params: &params::Params,
) -> Result<Json<Value>, ApiError> {
    params::reject_unknown(params, &["logRedactionLevel"])?;
    let level = match params.get("logRedactionLevel") {
        Some(Param::Text(t)) if REDACTION_LEVELS.contains(&t.as_str()) => t.clone(),
        None => {
            return Err(ApiError::field(
                StatusCode::BAD_REQUEST,
                "logRedactionLevel",
                "The value must be supplied",
            ));
        }
        Some(_) => {
            return Err(ApiError::field(
                StatusCode::BAD_REQUEST,
                "logRedactionLevel",
                BAD_REDACTION_LEVEL,
            ));
        }
    };
    let settings = ClusterSettings {
        log_redaction_level: level.clone(),
    };
    state.settings.set(settings.clone()).map_err(|e| {
        ApiError::general(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("saving the settings: {e}"),
        )
    })?;
    let peers = state.coordinator.peers();
    let others: Vec<&String> = peers.names().filter(|n| *n != state.node.name()).collect();
    let pushes = others.iter().map(|n| peers.push_settings(n, &settings));
    let failed: Vec<String> = futures::future::join_all(pushes)
        .await
        .into_iter()
        .zip(&others)
        .filter_map(|(r, n)| r.err().map(|e| format!("{n}: {e}")))
        .collect();
    if !failed.is_empty() {
        return Err(ApiError::general(
            StatusCode::BAD_GATEWAY,
            format!(
                "Saved, but these nodes were not updated: {}",
                failed.join("; ")
            ),
        ));
    }
    Ok(Json(json!({"logRedactionLevel": level})))
}

/// What couchbase-cli reads before its commands: a non-empty pool list
/// (the cluster is initialised) and a version.
async fn pools(_: Reader) -> Json<Value> {
    Json(json!({
        "pools": [{"name": "default", "uri": POOL_URI}],
        "implementationVersion": format!(
            "{COUCHBASE_API_VERSION}-autocollect-{}",
            env!("CARGO_PKG_VERSION")
        ),
        "isEnterprise": true,
    }))
}

/// How long `/pools/default` waits for each node's `/health`.
const REACHABLE_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);
/// Nodes probed at once.
const PROBES_AT_ONCE: usize = 64;

type Reachability = std::collections::HashMap<String, bool>;

/// The node's last probe of every node, and when it ended: requests that
/// arrive while a probe runs wait for it and share its answer, so however
/// many clients ask, one round of probes is in flight at a time.
#[derive(Default)]
pub struct PoolProbe(
    tokio::sync::Mutex<Option<(std::time::Instant, std::sync::Arc<Reachability>)>>,
);

/// Which nodes answer their `/health` (this one always does).
async fn reachability(state: &AppState) -> std::sync::Arc<Reachability> {
    use futures::StreamExt;
    let asked = std::time::Instant::now();
    let mut last = state.pool_probe.0.lock().await;
    if let Some((ended, health)) = &*last
        && *ended >= asked
    {
        return health.clone();
    }
    let peers = state.coordinator.peers();
    let me = state.node.name();
    let health: Reachability = futures::stream::iter(peers.names().cloned())
        .map(|name| async move {
            let up = name == me || peers.reachable(&name, REACHABLE_WITHIN).await;
            (name, up)
        })
        .buffer_unordered(PROBES_AT_ONCE)
        .collect()
        .await;
    let health = std::sync::Arc::new(health);
    *last = Some((std::time::Instant::now(), health.clone()));
    health
}

/// The cluster's nodes, for couchbase-cli's `--nodes HOST:PORT`,
/// `server-list` and `host-list`: each with its Couchbase-style name
/// (`otpNode`), API address (`hostname`, `configuredHostname`), `status`
/// (`healthy` if its `/health` answered within 2 s, else `unhealthy`; this
/// node is always `healthy`) and `clusterMembership` (`active`).
/// Concurrent requests share one round of probes.
async fn pool(State(state): State<AppState>, _: Reader) -> Json<Value> {
    let peers = state.coordinator.peers();
    let names: Vec<String> = peers.names().cloned().collect();
    let health = reachability(&state).await;
    let nodes: Vec<Value> = names
        .iter()
        .map(|name| {
            let hostname = peers.address(name).unwrap_or_default();
            let status = if health.get(name) == Some(&true) {
                "healthy"
            } else {
                "unhealthy"
            };
            json!({
                "otpNode": otp_name(name, hostname),
                "hostname": hostname,
                "configuredHostname": hostname,
                "status": status,
                "clusterMembership": "active",
                "thisNode": name == state.node.name(),
                "ports": {},
            })
        })
        .collect();
    Json(json!({"name": "default", "nodes": nodes}))
}

/// A node's name as Couchbase shows it, `NAME@HOST`: the configured name
/// when it already has that form, else the name at its address's host.
fn otp_name(name: &str, address: &str) -> String {
    if name.contains('@') {
        return name.to_string();
    }
    let host = address
        .rsplit_once(':')
        .map_or(address, |(h, _)| h)
        .trim_matches(['[', ']']);
    format!("{name}@{host}")
}

/// The request's `nodes` with Couchbase-style names (`NAME@HOST`, as
/// `/pools/default` shows them) turned back into configured names.
fn configured_names(state: &AppState, params: &mut params::Params) {
    let Some(Param::Text(nodes)) = params.get("nodes") else {
        return;
    };
    let peers = state.coordinator.peers();
    let names: Vec<String> = nodes
        .split(',')
        .map(|n| {
            let n = n.trim();
            peers
                .names()
                .find(|name| otp_name(name, peers.address(name).unwrap_or_default()) == n)
                .cloned()
                .unwrap_or_else(|| n.to_string())
        })
        .collect();
    params.insert("nodes".into(), Param::Text(names.join(",")));
}

/// `200 []` once the collection has started, as ns_server answers.
async fn start(
    State(state): State<AppState>,
    Admin(caller): Admin,
    headers: HeaderMap,
    ParamsBody(body): ParamsBody,
) -> Result<Json<Value>, ApiError> {
    let mut params = params::parse(&headers, &body)?;
    configured_names(&state, &mut params);
    start_task(&state, &caller, START_LOGS_URI, &params, START_PARAMS).await?;
    Ok(Json(json!([])))
}

/// `200 []`, also when nothing runs. A coordinator that cannot be reached
/// is still an error (this node has cancelled its own part).
async fn cancel(
    State(state): State<AppState>,
    Admin(caller): Admin,
) -> Result<Json<Value>, ApiError> {
    match cancel_task(&state, &caller, CANCEL_LOGS_URI).await {
        Ok(_) => Ok(Json(json!([]))),
        Err(e) if e.status == StatusCode::NOT_FOUND => Ok(Json(json!([]))),
        Err(e) => Err(e),
    }
}

/// The task list: the latest log collection, in Couchbase's shape, or
/// nothing before the first one.
async fn tasks(
    State(state): State<AppState>,
    _: Reader,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    if remote_coordinator(&state).is_none() {
        // Serialised straight from the task (no `Value` tree in between).
        let task = state.coordinator.latest();
        return Ok(Json(task.as_ref().map(CouchbaseTask::of).as_slice()).into_response());
    }
    match latest_task(&state, &StatusQuery::default()).await {
        Ok(Json(task)) => Ok(Json(json!([couchbase_task(&task)])).into_response()),
        Err(e) if e.status == StatusCode::NOT_FOUND => Ok(Json(json!([])).into_response()),
        Err(e) => Err(e),
    }
}

/// A task of this node as Couchbase's task list shows it, borrowed:
/// what [`couchbase_task`] makes of its JSON, field for field.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct CouchbaseTask<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    node: &'a str,
    status: TaskState,
    progress: u32,
    ts: &'a str,
    per_node: BTreeMap<&'a str, CouchbaseNode<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    recommended_refresh_period: Option<f64>,
    #[serde(rename = "cancelURI", skip_serializing_if = "Option::is_none")]
    cancel_uri: Option<&'static str>,
}

/// A node's entry: [`PER_NODE_FIELDS`] only.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct CouchbaseNode<'a> {
    status: NodeState,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    url: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    collection_status_code: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    collection_output: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upload_status_code: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upload_output: Option<&'a str>,
}

impl<'a> CouchbaseTask<'a> {
    fn of(task: &'a TaskStatus) -> CouchbaseTask<'a> {
        CouchbaseTask {
            kind: &task.kind,
            node: &task.node,
            status: task.status,
            progress: task.progress,
            ts: &task.ts,
            per_node: task
                .per_node
                .iter()
                .map(|(name, n)| {
                    let node = CouchbaseNode {
                        status: n.status,
                        path: n.path.as_deref(),
                        url: n.url.as_deref(),
                        collection_status_code: n.collection_status_code.as_deref(),
                        collection_output: n.collection_output.as_deref(),
                        upload_status_code: n.upload_status_code.as_deref(),
                        upload_output: n.upload_output.as_deref(),
                    };
                    (name.as_str(), node)
                })
                .collect(),
            recommended_refresh_period: task.recommended_refresh_period,
            cancel_uri: task.cancel_uri.as_ref().map(|_| CANCEL_LOGS_URI),
        }
    }
}

/// Our task status as Couchbase shows it: only its fields, and the
/// `/controller` route to cancel.
fn couchbase_task(task: &Value) -> Value {
    let mut entry = pick(task, TASK_FIELDS);
    if let Some(nodes) = task.get("perNode").and_then(Value::as_object) {
        let per_node: Map<String, Value> = nodes
            .iter()
            .map(|(name, status)| (name.clone(), Value::Object(pick(status, PER_NODE_FIELDS))))
            .collect();
        entry.insert("perNode".into(), Value::Object(per_node));
    }
    if entry.contains_key("cancelURI") {
        entry.insert("cancelURI".into(), CANCEL_LOGS_URI.into());
    }
    Value::Object(entry)
}

fn pick(value: &Value, fields: &[&str]) -> Map<String, Value> {
    fields
        .iter()
        .filter_map(|f| Some((f.to_string(), value.get(*f)?.clone())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_get_couchbase_style_names() {
        assert_eq!(otp_name("n1", "10.0.0.1:9101"), "n1@10.0.0.1");
        assert_eq!(otp_name("ns_1@10.0.0.1", "10.0.0.1:9101"), "ns_1@10.0.0.1");
        assert_eq!(otp_name("n1", "[::1]:9101"), "n1@::1");
    }

    #[test]
    fn a_local_task_is_shown_as_its_json_would_be() {
        use crate::coordinator::task::NodeStatus;
        let mut task = TaskStatus::new(
            "abc".into(),
            "n1".into(),
            [
                ("n1".to_string(), NodeStatus::new(NodeState::Started)),
                (
                    "n2".to_string(),
                    NodeStatus::failed(Some("2".into()), "boom"),
                ),
            ]
            .into(),
        );
        task.per_node.get_mut("n1").unwrap().path = Some("/p.zip".into());
        task.per_node.get_mut("n1").unwrap().sha256 = Some("00".repeat(32));
        let direct = |t: &TaskStatus| serde_json::to_value(CouchbaseTask::of(t)).unwrap();
        let via_json = |t: &TaskStatus| couchbase_task(&serde_json::to_value(t).unwrap());
        assert_eq!(direct(&task), via_json(&task));
        task.finish(TaskState::Completed, "lost");
        assert_eq!(direct(&task), via_json(&task));
    }

    #[test]
    fn a_task_keeps_only_couchbases_fields() {
        let ours = json!({
            "type": "clusterLogsCollection", "node": "n1", "status": "running",
            "progress": 50, "ts": "2026-11-25 17:00:00", "taskId": "abc", "version": 7,
            "recommendedRefreshPeriod": 2.0, "cancelURI": "/collectLogs/cancel",
            "perNode": {
                "n1": {"status": "collected", "path": "/p.zip",
                       "progress": {"done": 1, "total": 1, "message": "m"}},
                "n2": {"status": "failedUpload", "url": "https://h/c/f.zip",
                       "uploadStatusCode": "403", "uploadOutput": "no"}
            }
        });
        assert_eq!(
            couchbase_task(&ours),
            json!({
                "type": "clusterLogsCollection", "node": "n1", "status": "running",
                "progress": 50, "ts": "2026-11-25 17:00:00",
                "recommendedRefreshPeriod": 2.0,
                "cancelURI": "/controller/cancelLogsCollection",
                "perNode": {
                    "n1": {"status": "collected", "path": "/p.zip"},
                    "n2": {"status": "failedUpload", "url": "https://h/c/f.zip",
                           "uploadStatusCode": "403", "uploadOutput": "no"}
                }
            })
        );
    }
}
