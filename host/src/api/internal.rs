//! The node-to-node API (see [`crate::protocol`]). Every request must be
//! signed by a node of the cluster ([`crate::peer_auth`]); the signature
//! is checked over the whole body before any handler runs, and everything
//! in the request is then checked like public input: task ids are the
//! coordinator's format, a session's coordinator is the node that asked.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use super::public::{StatusQuery, local_status};
use super::{ApiError, AppState};
use crate::node::{OpenError, StartJobError};
use crate::protocol::{
    CANCEL_TASK_PATH, LATEST_TASK_PATH, LowDisk, OpenSession, SESSIONS_PATH, SETTINGS_PATH,
    StartJob, StartUpload, TASK_EVENTS_PATH, TaskId,
};
use crate::settings::ClusterSettings;
use crate::upload::{Destination, Proxy};

const CANCEL_WAIT: Duration = Duration::from_secs(10);
/// Largest node-to-node request body.
const MAX_BODY: usize = 1 << 20;

pub fn router(state: AppState) -> Router<AppState> {
    Router::new()
        .route(SESSIONS_PATH, post(open_session))
        .route(&format!("{SESSIONS_PATH}/{{task}}/job"), post(start_job))
        .route(
            &format!("{SESSIONS_PATH}/{{task}}/upload"),
            post(start_upload),
        )
        .route(
            &format!("{SESSIONS_PATH}/{{task}}/cancel"),
            post(cancel_job),
        )
        .route(
            &format!("{SESSIONS_PATH}/{{task}}/close"),
            post(close_session),
        )
        .route(&format!("{SESSIONS_PATH}/{{task}}/ping"), post(ping))
        .route(LATEST_TASK_PATH, get(latest_task))
        .route(CANCEL_TASK_PATH, post(cancel_task))
        .route(SETTINGS_PATH, post(set_settings))
        .route(TASK_EVENTS_PATH, get(super::events::task_events))
        .route_layer(middleware::from_fn_with_state(state, verify_peer))
}

/// The node that signed the request (set by [`verify_peer`]).
#[derive(Debug, Clone)]
struct SignedBy(String);

/// Read the body (bounded in size and time: [`super::body::read_whole`]),
/// check the signature over it, and hand the request on with the
/// signer's name.
async fn verify_peer(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let (mut parts, body) = match super::body::read_whole(request, MAX_BODY).await {
        Ok(read) => read,
        Err(refusal) => return refusal,
    };
    let path = parts
        .uri
        .path_and_query()
        .map_or(parts.uri.path(), |p| p.as_str());
    match state
        .peer_auth
        .verify(&parts.method, path, &parts.headers, &body)
    {
        Ok(node) => {
            if let Some(identities) = &state.node_identities {
                let cert = parts
                    .extensions
                    .get::<crate::tls::ClientCertificate>()
                    .and_then(|c| c.0.clone());
                if let Err(e) = identities.check(&node, cert.as_deref()) {
                    state.log_refusal(&format!(
                        "node-to-node request to {path} signed by {node} refused: {e}"
                    ));
                    return ApiError::general(StatusCode::FORBIDDEN, e).into_response();
                }
            }
            parts.extensions.insert(SignedBy(node));
            next.run(Request::from_parts(parts, Body::from(body))).await
        }
        Err(e) => {
            state.log_refusal(&format!("node-to-node request to {path} refused: {e}"));
            ApiError::general(StatusCode::UNAUTHORIZED, e.to_string()).into_response()
        }
    }
}

/// A caller that signed its request as a node of the cluster.
pub struct Peer(pub String);

impl FromRequestParts<AppState> for Peer {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, ApiError> {
        match parts.extensions.get::<SignedBy>() {
            Some(SignedBy(node)) => Ok(Peer(node.clone())),
            None => Err(ApiError::general(
                StatusCode::UNAUTHORIZED,
                "missing node-to-node signature",
            )),
        }
    }
}

/// A task id from the path, checked before anything touches the disk.
pub struct Task(TaskId);

impl FromRequestParts<AppState> for Task {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Path(task) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::field(StatusCode::BAD_REQUEST, "taskId", e.body_text()))?;
        TaskId::parse(&task)
            .map(Task)
            .map_err(|e| ApiError::field(StatusCode::BAD_REQUEST, "taskId", e))
    }
}

/// Another node changed the cluster settings: keep our copy in step.
async fn set_settings(
    State(state): State<AppState>,
    _: Peer,
    body: bytes::Bytes,
) -> Result<StatusCode, ApiError> {
    let settings: ClusterSettings = json_body(&body)?;
    if !crate::settings::REDACTION_LEVELS.contains(&settings.log_redaction_level.as_str()) {
        return Err(ApiError::field(
            StatusCode::BAD_REQUEST,
            "logRedactionLevel",
            crate::settings::BAD_REDACTION_LEVEL,
        ));
    }
    state.settings.set(settings).map_err(|e| {
        tracing::error!("saving the settings: {e}");
        ApiError::general(
            StatusCode::INSUFFICIENT_STORAGE,
            format!("could not save the settings: {e}"),
        )
    })?;
    Ok(StatusCode::OK)
}

fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::general(StatusCode::BAD_REQUEST, format!("Malformed body: {e}")))
}

async fn open_session(
    State(state): State<AppState>,
    Peer(signer): Peer,
    body: bytes::Bytes,
) -> Response {
    let request: OpenSession = match json_body(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    // Only the node that asks may be the session's coordinator (and it is
    // a node of the cluster: its signature says so).
    if request.coordinator != signer {
        return ApiError::field(
            StatusCode::BAD_REQUEST,
            "coordinator",
            format!(
                "the session's coordinator must be the node that asks ({signer}), not {:?}",
                request.coordinator
            ),
        )
        .into_response();
    }
    match state.node.open_session(request) {
        Ok(stream) => (
            [(header::CONTENT_TYPE, "application/x-ndjson")],
            Body::from_stream(stream),
        )
            .into_response(),
        Err(OpenError::Busy(busy)) => (StatusCode::CONFLICT, Json(busy)).into_response(),
        Err(OpenError::LowDisk(message)) => {
            (StatusCode::INSUFFICIENT_STORAGE, Json(LowDisk { message })).into_response()
        }
    }
}

fn job_error(e: StartJobError) -> ApiError {
    let status = match e {
        StartJobError::NoSession(_) => StatusCode::NOT_FOUND,
        StartJobError::AlreadyStarted(_) | StartJobError::NothingToUpload(_) => {
            StatusCode::CONFLICT
        }
    };
    ApiError::general(status, e.to_string())
}

async fn start_job(
    State(state): State<AppState>,
    _: Peer,
    Task(task): Task,
    body: bytes::Bytes,
) -> Result<StatusCode, ApiError> {
    let request: StartJob = json_body(&body)?;
    // The coordinator checked these against its configuration; this node
    // checks them against its own before using them.
    let mut errors = std::collections::BTreeMap::new();
    super::public::check_collect_parameters(&state, &request.parameters, &mut errors);
    if !errors.is_empty() {
        return Err(ApiError::fields(StatusCode::BAD_REQUEST, errors));
    }
    state
        .node
        .start_job(&task, request.parameters)
        .map_err(job_error)?;
    Ok(StatusCode::ACCEPTED)
}

async fn start_upload(
    State(state): State<AppState>,
    _: Peer,
    Task(task): Task,
    body: bytes::Bytes,
) -> Result<StatusCode, ApiError> {
    let request: StartUpload = json_body(&body)?;
    let destination = Destination {
        base_url: request.base_url,
    };
    if let Err(e) = crate::upload::Origin::of(&destination.base_url) {
        return Err(ApiError::field(StatusCode::BAD_REQUEST, "baseUrl", e));
    }
    let proxy = match request.proxy.as_deref().map(Proxy::parse).transpose() {
        Ok(p) => p,
        Err(e) => return Err(ApiError::field(StatusCode::BAD_REQUEST, "proxy", e)),
    };
    state
        .node
        .start_upload(&task, destination, proxy)
        .map_err(job_error)?;
    Ok(StatusCode::ACCEPTED)
}

/// `ok` if this node held a session for `task`, else 404.
fn in_session(held: bool, task: &TaskId, ok: StatusCode) -> Result<StatusCode, ApiError> {
    if held {
        Ok(ok)
    } else {
        Err(ApiError::general(
            StatusCode::NOT_FOUND,
            format!("no session for task {task} on this node"),
        ))
    }
}

async fn cancel_job(
    State(state): State<AppState>,
    _: Peer,
    Task(task): Task,
) -> Result<StatusCode, ApiError> {
    in_session(state.node.cancel_job(&task), &task, StatusCode::ACCEPTED)
}

async fn close_session(
    State(state): State<AppState>,
    _: Peer,
    Task(task): Task,
) -> Result<StatusCode, ApiError> {
    in_session(state.node.close_session(&task), &task, StatusCode::OK)
}

async fn ping(
    State(state): State<AppState>,
    _: Peer,
    Task(task): Task,
) -> Result<StatusCode, ApiError> {
    in_session(state.node.ping(&task), &task, StatusCode::OK)
}

/// Status asked by another node on behalf of its user: never forwarded
/// again, so a request cannot loop between nodes.
async fn latest_task(
    State(state): State<AppState>,
    _: Peer,
    query: Result<Query<StatusQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(query) = query.map_err(super::public::bad_query)?;
    local_status(&state, &query).await
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CancelTask {
    task_id: TaskId,
}

async fn cancel_task(
    State(state): State<AppState>,
    _: Peer,
    body: bytes::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let request: CancelTask = json_body(&body)?;
    let task = state
        .coordinator
        .cancel_task(&request.task_id, CANCEL_WAIT)
        .await
        .ok_or_else(|| {
            ApiError::general(StatusCode::NOT_FOUND, "No logs collection task has run yet")
        })?;
    Ok(Json(super::public::task_json(&task)))
}
