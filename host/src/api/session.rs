//! A node's end of a session ([`crate::protocol`]): the signed request
//! that opens it, and the upgraded connection that serves it, with the
//! coordinator's commands read from it and this node's events written
//! to it.
//!
//! A command line is checked ([`crate::peer_auth::LineVerifier`]) before
//! anything reads its JSON; one that fails the check ends the session, as
//! the coordinator's connection going away does (the job is stopped and
//! its output removed). Everything in a genuine command is then checked
//! as the public API checks a start (parameters, upload URL, proxy).
//!
//! The upgraded connection has left the listener's accounting: it is
//! bounded by the session instead, of which a node holds one at a time.
//! It ends with the session: when the coordinator closes it, breaks the
//! protocol, or stops reading for a lease; or when the node lets go (the
//! coordinator fell silent), after its last events.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Json;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};

use super::internal::{Peer, json_body};
use super::{ApiError, AppState};
use crate::node::{OpenError, SessionStream, StartJobError};
use crate::peer_auth::{LineVerifier, NONCE_HEADER};
use crate::protocol::{LowDisk, NodeEvent, OpenSession, SESSION_PROTOCOL, SessionCommand, TaskId};
use crate::upload::{Destination, Proxy};

/// Longest command line a coordinator may send (a `job` with its
/// parameters is far shorter).
const MAX_COMMAND_LINE: usize = 64 * 1024;
/// What a command line buffer starts with.
const COMMAND_BUFFER: usize = 512;
/// How long the coordinator has to take the upgraded connection after
/// the `101` answer.
const UPGRADE_WAIT: Duration = Duration::from_secs(10);

/// The request's connection upgrade, if it can have one (HTTP/1.1).
pub(super) struct PendingUpgrade(Option<OnUpgrade>);

impl<S: Send + Sync> FromRequestParts<S> for PendingUpgrade {
    type Rejection = std::convert::Infallible;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(PendingUpgrade(parts.extensions.remove::<OnUpgrade>()))
    }
}

/// `POST /internal/v1/sessions`: take the session and switch the
/// connection to [`SESSION_PROTOCOL`], or say why not.
pub(super) async fn open_session(
    State(state): State<AppState>,
    Peer(signer): Peer,
    PendingUpgrade(upgrade): PendingUpgrade,
    headers: HeaderMap,
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
    let asked = headers
        .get(header::UPGRADE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    // Without a connection to upgrade (HTTP/2), whatever it named.
    let asked = asked.filter(|_| upgrade.is_some());
    let (Some(upgrade), Some(SESSION_PROTOCOL)) = (upgrade, asked.as_deref()) else {
        return other_version(&signer, asked.as_deref());
    };
    // Checked by the signature's verification, which let the request in.
    let Some(nonce) = headers.get(NONCE_HEADER).and_then(|v| v.to_str().ok()) else {
        return ApiError::general(StatusCode::UNAUTHORIZED, "missing node-to-node signature")
            .into_response();
    };
    let lines = state.peer_auth.session_lines(nonce);
    let task = request.task_id.clone();
    match state.node.open_session(request) {
        Ok(events) => {
            tokio::spawn(serve(state, task, events, upgrade, lines));
            (
                StatusCode::SWITCHING_PROTOCOLS,
                [
                    (header::CONNECTION, HeaderValue::from_static("upgrade")),
                    (header::UPGRADE, HeaderValue::from_static(SESSION_PROTOCOL)),
                ],
            )
                .into_response()
        }
        Err(OpenError::Busy(busy)) => (StatusCode::CONFLICT, Json(busy)).into_response(),
        Err(OpenError::LowDisk(message)) => {
            (StatusCode::INSUFFICIENT_STORAGE, Json(LowDisk { message })).into_response()
        }
    }
}

/// The answer to a session request that does not ask for this node's
/// session protocol: `426`, naming the one it speaks.
fn other_version(signer: &str, asked: Option<&str>) -> Response {
    let message = format!(
        "this node opens sessions over HTTP/1.1 upgraded to {SESSION_PROTOCOL}, and {signer} \
         asked for {}: run the same autocollect version on every node",
        asked.unwrap_or("none (over HTTP/2, or without an `Upgrade` header)")
    );
    let mut response = ApiError::general(StatusCode::UPGRADE_REQUIRED, message).into_response();
    response
        .headers_mut()
        .insert(header::UPGRADE, HeaderValue::from_static(SESSION_PROTOCOL));
    response
}

/// What a command line asks of the session loop.
enum Next {
    /// Nothing to write back.
    Go,
    /// Write this line back (a refusal).
    Answer(NodeEvent),
    /// The coordinator closed the session: read no more commands, send
    /// what events are left, then end.
    Close,
}

/// Serve session `task` on its upgraded connection until it ends.
/// Dropping `events` lets go of the session.
async fn serve(
    state: AppState,
    task: TaskId,
    mut events: SessionStream,
    upgrade: OnUpgrade,
    mut lines: LineVerifier,
) {
    let connection = match tokio::time::timeout(UPGRADE_WAIT, upgrade).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(e)) => {
            return tracing::debug!(%task, "the session's connection was not upgraded: {e}");
        }
        Err(_) => {
            return tracing::debug!(%task, "the session's connection was not upgraded in time");
        }
    };
    let (read, mut write) = tokio::io::split(TokioIo::new(connection));
    let mut commands = FramedRead::with_capacity(
        read,
        LinesCodec::new_with_max_length(MAX_COMMAND_LINE),
        COMMAND_BUFFER,
    );
    // A coordinator that reads nothing for a lease is as gone as one that
    // says nothing for a lease.
    let write_limit = events.lease();
    let mut closing = false;
    loop {
        let line = tokio::select! {
            event = events.next() => match event {
                Some(line) => line,
                None => break,
            },
            command = commands.next(), if !closing => match command {
                Some(Ok(line)) => match carry_out(&state, &task, &mut lines, &line) {
                    Ok(Next::Go) => continue,
                    Ok(Next::Answer(event)) => crate::node::event_line(&event),
                    Ok(Next::Close) => {
                        closing = true;
                        continue;
                    }
                    Err(why) => {
                        state.log_refusal(&format!("session of task {task} ended: {why}"));
                        break;
                    }
                },
                Some(Err(LinesCodecError::MaxLineLengthExceeded)) => {
                    state.log_refusal(&format!(
                        "session of task {task} ended: a command line over {MAX_COMMAND_LINE} bytes"
                    ));
                    break;
                }
                Some(Err(LinesCodecError::Io(e))) => {
                    tracing::debug!(%task, "reading the coordinator's commands: {e}");
                    break;
                }
                None => {
                    tracing::debug!(%task, "the coordinator closed the session's connection");
                    break;
                }
            },
        };
        match tokio::time::timeout(write_limit, write.write_all(&line)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(%task, "writing to the coordinator: {e}");
                break;
            }
            Err(_) => {
                tracing::warn!(%task, "the coordinator read nothing for {write_limit:?}: ending the session");
                break;
            }
        }
    }
    drop(events);
    let _ = tokio::time::timeout(write_limit, write.shutdown()).await;
}

/// Check and carry out one command line of session `task`. An error ends
/// the session.
fn carry_out(
    state: &AppState,
    task: &TaskId,
    lines: &mut LineVerifier,
    line: &str,
) -> Result<Next, String> {
    let json = lines
        .verify(line)
        .map_err(|e| format!("a command line was refused: {e}"))?;
    let command: SessionCommand = serde_json::from_str(json)
        .map_err(|e| format!("a command this node does not understand: {e}"))?;
    let node = &state.node;
    // Any genuine command says the coordinator is there.
    node.ping(task);
    let name = command.name();
    let refused = |message: String| {
        Ok(Next::Answer(NodeEvent::Refused {
            command: name.to_string(),
            message,
        }))
    };
    match command {
        SessionCommand::Ping => Ok(Next::Go),
        SessionCommand::Cancel => {
            node.cancel_job(task);
            Ok(Next::Go)
        }
        SessionCommand::Close => {
            node.close_session(task);
            Ok(Next::Close)
        }
        SessionCommand::Job { parameters } => {
            // The coordinator checked these against its configuration;
            // this node checks them against its own before using them.
            let mut errors = BTreeMap::new();
            super::public::check_collect_parameters(state, &parameters, &mut errors);
            if !errors.is_empty() {
                return refused(crate::protocol::field_errors_message(&errors));
            }
            match node.start_job(task, parameters) {
                Ok(()) => Ok(Next::Go),
                Err(e) => refused_by(e, refused),
            }
        }
        SessionCommand::Upload { base_url, proxy } => {
            let destination = Destination { base_url };
            if let Err(e) = crate::upload::Origin::of(&destination.base_url) {
                return refused(format!("baseUrl: {e}"));
            }
            let proxy = match proxy.as_deref().map(Proxy::parse).transpose() {
                Ok(p) => p,
                Err(e) => return refused(format!("proxy: {e}")),
            };
            match node.start_upload(task, destination, proxy) {
                Ok(()) => Ok(Next::Go),
                Err(e) => refused_by(e, refused),
            }
        }
    }
}

/// A job or upload that could not start: refused, unless the session is
/// gone (the node let go of it), which ends it.
fn refused_by(
    e: StartJobError,
    refused: impl FnOnce(String) -> Result<Next, String>,
) -> Result<Next, String> {
    match e {
        StartJobError::NoSession(_) => Err(e.to_string()),
        StartJobError::AlreadyStarted(_) | StartJobError::NothingToUpload(_) => {
            refused(e.to_string())
        }
    }
}
