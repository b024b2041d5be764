//! Couchbase Server's own routes for log collection, so that operators'
//! scripts written against ns_server keep working: the same parameters,
//! answers and task document. They share their implementation with the
//! `/collectLogs/*` routes (`public`).

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use serde_json::{Map, Value, json};

use super::error::ApiError;
use super::public::{Admin, Reader, StatusQuery, cancel_task, latest_task, start_task};
use super::{AppState, params};

pub const START_LOGS_URI: &str = "/controller/startLogsCollection";
pub const CANCEL_LOGS_URI: &str = "/controller/cancelLogsCollection";
pub const TASKS_URI: &str = "/pools/default/tasks";

/// The parameters of `POST /controller/startLogsCollection`.
const START_PARAMS: &[&str] = &[
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
}

/// `200 []` once the collection has started, as ns_server answers.
async fn start(
    State(state): State<AppState>,
    Admin(caller): Admin,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let params = params::parse(&headers, &body)?;
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
async fn tasks(State(state): State<AppState>, _: Reader) -> Result<Json<Value>, ApiError> {
    match latest_task(&state, &StatusQuery::default()).await {
        Ok(Json(task)) => Ok(Json(json!([couchbase_task(&task)]))),
        Err(e) if e.status == StatusCode::NOT_FOUND => Ok(Json(json!([]))),
        Err(e) => Err(e),
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
