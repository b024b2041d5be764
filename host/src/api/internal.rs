//! The node-to-node API (see [`crate::protocol`]); every request must
//! carry the cluster secret.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use super::public::{StatusQuery, local_status};
use super::{ApiError, AppState};
use crate::auth::has_cluster_secret;
use crate::node::StartJobError;
use crate::protocol::{
    CANCEL_TASK_PATH, LATEST_TASK_PATH, OpenSession, SESSIONS_PATH, SETTINGS_PATH, StartJob,
    StartUpload,
};
use crate::settings::ClusterSettings;
use crate::upload::{Destination, Proxy};

const CANCEL_WAIT: Duration = Duration::from_secs(10);

pub fn router(_state: AppState) -> Router<AppState> {
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
        .route(LATEST_TASK_PATH, get(latest_task))
        .route(CANCEL_TASK_PATH, post(cancel_task))
        .route(SETTINGS_PATH, post(set_settings))
}

/// Another node changed the cluster settings: keep our copy in step.
async fn set_settings(
    State(state): State<AppState>,
    _: Peer,
    body: bytes::Bytes,
) -> Result<StatusCode, ApiError> {
    let settings: ClusterSettings = json_body(&body)?;
    state.settings.set(settings).map_err(|e| {
        ApiError::general(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("saving the settings: {e}"),
        )
    })?;
    Ok(StatusCode::OK)
}

/// A caller that proved it knows the cluster secret.
pub struct Peer;

impl FromRequestParts<AppState> for Peer {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if has_cluster_secret(header, &state.secret) {
            Ok(Peer)
        } else {
            tracing::warn!(uri = %parts.uri, "node-to-node request with a missing or wrong cluster secret");
            Err(ApiError::general(
                StatusCode::UNAUTHORIZED,
                "Missing or wrong cluster secret",
            ))
        }
    }
}

fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::general(StatusCode::BAD_REQUEST, format!("Malformed body: {e}")))
}

async fn open_session(State(state): State<AppState>, _: Peer, body: bytes::Bytes) -> Response {
    let request: OpenSession = match json_body(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    match state.node.open_session(request) {
        Ok(stream) => (
            [(header::CONTENT_TYPE, "application/x-ndjson")],
            Body::from_stream(stream),
        )
            .into_response(),
        Err(busy) => (StatusCode::CONFLICT, Json(busy)).into_response(),
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
    Path(task): Path<String>,
    body: bytes::Bytes,
) -> Result<StatusCode, ApiError> {
    let request: StartJob = json_body(&body)?;
    state
        .node
        .start_job(&task, request.parameters)
        .map_err(job_error)?;
    Ok(StatusCode::ACCEPTED)
}

async fn start_upload(
    State(state): State<AppState>,
    _: Peer,
    Path(task): Path<String>,
    body: bytes::Bytes,
) -> Result<StatusCode, ApiError> {
    let request: StartUpload = json_body(&body)?;
    let destination = Destination {
        base_url: request.base_url,
    };
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

fn no_session(task: &str) -> ApiError {
    ApiError::general(
        StatusCode::NOT_FOUND,
        format!("no session for task {task} on this node"),
    )
}

async fn cancel_job(
    State(state): State<AppState>,
    _: Peer,
    Path(task): Path<String>,
) -> Result<StatusCode, ApiError> {
    if state.node.cancel_job(&task) {
        Ok(StatusCode::ACCEPTED)
    } else {
        Err(no_session(&task))
    }
}

async fn close_session(
    State(state): State<AppState>,
    _: Peer,
    Path(task): Path<String>,
) -> Result<StatusCode, ApiError> {
    if state.node.close_session(&task) {
        Ok(StatusCode::OK)
    } else {
        Err(no_session(&task))
    }
}

/// Status asked by another node on behalf of its user: never forwarded
/// again, so a request cannot loop between nodes.
async fn latest_task(
    State(state): State<AppState>,
    _: Peer,
    Query(query): Query<StatusQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    local_status(&state, &query).await
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CancelTask {
    task_id: String,
}

async fn cancel_task(
    State(state): State<AppState>,
    _: Peer,
    body: bytes::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let request: CancelTask = json_body(&body)?;
    state
        .coordinator
        .cancel_task(&request.task_id, CANCEL_WAIT)
        .await
        .map(|t| Json(serde_json::to_value(t).unwrap()))
        .ok_or_else(|| {
            ApiError::general(StatusCode::NOT_FOUND, "No logs collection task has run yet")
        })
}
