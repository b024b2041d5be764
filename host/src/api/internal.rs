//! The node-to-node API (see [`crate::protocol`]). Every request must be
//! signed by a node of the cluster ([`crate::peer_auth`]); the signature
//! is checked over the whole body before any handler runs, and everything
//! in the request is then checked like public input: task ids are the
//! coordinator's format, a session's coordinator is the node that asked.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRequestParts, Query, Request, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use super::public::{StatusQuery, local_status};
use super::{ApiError, AppState};
use crate::protocol::{
    CANCEL_TASK_PATH, LATEST_TASK_PATH, SESSIONS_PATH, SETTINGS_PATH, TASK_EVENTS_PATH, TaskId,
};
use crate::settings::ClusterSettings;

const CANCEL_WAIT: Duration = Duration::from_secs(10);
/// Largest node-to-node request body.
const MAX_BODY: usize = 1 << 20;

pub fn router(state: AppState) -> Router<AppState> {
    Router::new()
        .route(SESSIONS_PATH, post(super::session::open_session))
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

pub(super) fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::general(StatusCode::BAD_REQUEST, format!("Malformed body: {e}")))
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
