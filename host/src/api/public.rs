//! The public REST API (HTTP Basic auth, roles):
//!
//! - `POST /collectLogs/start` (admin): `from=allnodes|n1,n2` or `nodes`;
//!   to upload: `upload=true`, `upload_host` (or `uploadHost`), `customer`,
//!   `ticket`, `bypassReachabilityChecks`
//! - `GET  /collectLogs/status` (any user): the latest task; `?since=V`
//!   waits (up to `wait` seconds, default 30, at most 60) until its
//!   version exceeds `V`
//! - `GET  /collectLogs/events` (any user): Server-Sent Events (see
//!   [`super::events`])
//! - `POST /collectLogs/cancel` (admin)
//! - `GET  /metrics` (any user): Prometheus metrics
//! - `GET  /health` (no auth); `?waitIdle=S` first waits up to S seconds
//!   for the node to hold no session
//!
//! Any node answers: status and cancel are forwarded to the node that
//! coordinates the latest task when that is another node.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::{FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::audit::Entry;
use super::params::{self, Param, ParamsBody};
use super::{
    AppState, CANCEL_URI, ClientAddr, EVENTS_URI, HEALTH_URI, METRICS_URI, RELOAD_URI, START_URI,
    STATUS_URI,
};
use crate::auth::{AuthError, Caller};
use crate::config::Role;
use crate::coordinator::task::TaskStatus;
use crate::coordinator::{NodeSelection, StartError, StartRequest};
use crate::node::storage::RequestedDir;
use crate::protocol::{CollectParameters, Secret};
use crate::settings::BAD_REDACTION_LEVEL;
use crate::upload::Destination;
use std::collections::BTreeMap;

use super::ApiError;

/// How long a cancel request waits for every node to confirm.
const CANCEL_WAIT: Duration = Duration::from_secs(10);
const MAX_LONG_POLL: Duration = Duration::from_secs(60);
const DEFAULT_LONG_POLL: Duration = Duration::from_secs(30);
/// Unauthenticated `/health?waitIdle=` requests that may wait at once;
/// beyond them, health answers at once.
const MAX_HEALTH_WAITERS: usize = 32;
/// Longest `taskRegexp` accepted.
const MAX_TASK_REGEXP: usize = 1024;
/// Longest salt accepted.
const MAX_SALT: usize = 1024;
/// Longest `encryptionPassword` accepted, in bytes.
const MAX_ENCRYPTION_PASSWORD: usize = 256;

pub fn router(_state: AppState) -> Router<AppState> {
    Router::new()
        .route(START_URI, post(start))
        .route(STATUS_URI, get(status))
        .route(EVENTS_URI, get(super::events::events))
        .route(CANCEL_URI, post(cancel))
        .route(HEALTH_URI, get(health))
        .route(RELOAD_URI, post(reload))
        .route(METRICS_URI, get(metrics))
}

/// This node's metrics in Prometheus' text format (any user).
async fn metrics(_: Reader) -> impl axum::response::IntoResponse {
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        crate::metrics::global().render(),
    )
}

/// Reload the configuration as SIGHUP does; the report. Audited.
async fn reload(State(state): State<AppState>, Admin(caller): Admin) -> Json<Value> {
    let report = state
        .reloader
        .reload(&format!("POST {RELOAD_URI} by {}", caller.user))
        .await;
    state.audit.record(Entry {
        user: &caller.user,
        action: "reload",
        route: RELOAD_URI,
        params: None,
        known: &[],
        task_id: None,
        outcome: if report.ok {
            Ok(())
        } else {
            Err("not everything was applied".into())
        },
    });
    Json(serde_json::to_value(report).unwrap_or_default())
}

/// What ns_server asks of a user who starts or stops log collection, as
/// a 403 names it; here, the `admin` role.
pub const ADMIN_PERMISSION: &str = "cluster.admin.diag!write";

/// Any authenticated user.
pub struct Reader;
/// A user with the `admin` role.
pub struct Admin(pub Caller);

async fn authenticate(parts: &Parts, state: &AppState) -> Result<Caller, ApiError> {
    let header = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let client = parts
        .extensions
        .get::<ClientAddr>()
        .map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |c| c.0.ip());
    state
        .users
        .authenticate(header, client)
        .await
        .inspect(|caller| {
            if let Some(user) = parts.extensions.get::<super::access_log::AccessUser>() {
                user.set(&caller.user);
            }
        })
        .map_err(|e: AuthError| {
            let message = e.to_string();
            match e {
                AuthError::Missing | AuthError::Invalid => {
                    if e == AuthError::Invalid {
                        crate::metrics::global().auth_failures.inc();
                        state.log_refusal(&format!("failed sign-in from {client}"));
                    }
                    ApiError::general(StatusCode::UNAUTHORIZED, message)
                }
                AuthError::Throttled { retry_after } => {
                    crate::metrics::global().throttled(crate::metrics::Throttle::SignIn);
                    state.log_refusal(&format!("sign-ins from {client} throttled"));
                    ApiError::general(StatusCode::TOO_MANY_REQUESTS, message)
                        .retry_after(retry_after.as_secs_f64().ceil() as u64)
                }
                AuthError::Busy => {
                    crate::metrics::global().throttled(crate::metrics::Throttle::Verification);
                    state.log_refusal("sign-in refused: the verification queue is full");
                    ApiError::general(StatusCode::SERVICE_UNAVAILABLE, message).retry_after(1)
                }
            }
        })
}

impl FromRequestParts<AppState> for Reader {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        authenticate(parts, state).await.map(|_| Reader)
    }
}

/// Any authenticated user, who they are.
pub struct Who(pub Caller);

impl FromRequestParts<AppState> for Who {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        authenticate(parts, state).await.map(Who)
    }
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let caller = authenticate(parts, state).await?;
        if caller.role != Role::Admin {
            return Err(ApiError::forbidden(
                format!(
                    "Forbidden: user {:?} has the read-only role; starting or cancelling a collection, changing settings and reloading need admin",
                    caller.user
                ),
                &[ADMIN_PERMISSION],
            ));
        }
        Ok(Admin(caller))
    }
}

pub(super) const START_PARAMS: &[&str] = &[
    "from",
    "nodes",
    "upload",
    "upload_host",
    "uploadHost",
    "customer",
    "ticket",
    "bypassReachabilityChecks",
    "logRedactionLevel",
    "logRedactionSalt",
    "tmpDir",
    "logDir",
    "taskRegexp",
    "encryptionPassword",
    "since",
    "until",
];

/// A time of the request's window: RFC 3339 (`2026-11-29T10:00:00Z`,
/// any offset), or a duration before `now` (`90s`, `30m`, `2h`, `7d`).
fn parse_time(
    value: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<chrono::DateTime<chrono::Utc>, String> {
    const EXPECTED: &str = "Must be an RFC 3339 time such as 2026-11-29T10:00:00Z, or a \
                            duration before now such as 90s, 30m, 2h or 7d";
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(value) {
        return Ok(t.with_timezone(&chrono::Utc));
    }
    let unit = value.chars().last().ok_or(EXPECTED)?;
    let seconds = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(EXPECTED.into()),
    };
    // At most ten years back, whatever the unit (a larger one would take
    // the date out of chrono's range, which panics).
    let total = value[..value.len() - 1]
        .parse::<i64>()
        .ok()
        .and_then(|count| count.checked_mul(seconds))
        .filter(|total| (0..=MAX_WINDOW_SECS).contains(total))
        .ok_or(EXPECTED)?;
    now.checked_sub_signed(chrono::Duration::seconds(total))
        .ok_or_else(|| EXPECTED.into())
}

/// The longest a relative `since`/`until` may reach back: ten years.
const MAX_WINDOW_SECS: i64 = 3650 * 86_400;

fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Check a start request; every problem is reported at once, keyed by
/// field, as ns_server does.
fn start_request(
    state: &AppState,
    params: &params::Params,
    known: &[&str],
) -> Result<StartRequest, ApiError> {
    params::reject_unknown(params, known)?;
    let selection = selection(params)?;
    let mut errors = BTreeMap::new();
    if let Err(StartError::Invalid(fields)) = state.coordinator.resolve(&selection) {
        errors.extend(fields);
    }
    let mut text = |key: &str| match params.get(key) {
        None => None,
        Some(Param::Text(t)) => Some(t.clone()),
        Some(Param::List(_)) => {
            errors.insert(key.to_string(), "Must be a string".to_string());
            None
        }
    };
    let upload = text("upload");
    let bypass = text("bypassReachabilityChecks");
    let customer = text("customer");
    let ticket = text("ticket");
    let proxy = text("uploadProxy");
    let collect = CollectParameters {
        // Unsaid: the cluster's default (`/settings/logRedaction`).
        log_redaction_level: text("logRedactionLevel")
            .or_else(|| Some(state.settings.get().log_redaction_level)),
        log_redaction_salt: text("logRedactionSalt"),
        tmp_dir: text("tmpDir"),
        log_dir: text("logDir"),
        task_regexp: text("taskRegexp"),
        encryption_password: text("encryptionPassword").map(Secret::new),
        since: None,
        until: None,
    };
    // Made absolute here, so every node gets the same window.
    let now = chrono::Utc::now();
    let mut window_errors = Vec::new();
    let mut window = |key: &str, value: Option<String>| {
        parse_time(&value?, now)
            .map_err(|message| window_errors.push((key.to_string(), message)))
            .ok()
    };
    let (since, until) = (
        window("since", text("since")),
        window("until", text("until")),
    );
    if let (Some(a), Some(b)) = (since, until)
        && a >= b
    {
        window_errors.push(("until".into(), "Must be later than since".into()));
    }
    let collect = CollectParameters {
        since: since.map(rfc3339),
        until: until.map(rfc3339),
        ..collect
    };
    let host = match (text("upload_host"), text("uploadHost")) {
        (Some(_), Some(_)) => {
            errors.insert(
                "uploadHost".into(),
                "Give either upload_host or uploadHost, not both".into(),
            );
            None
        }
        (a, b) => a.or(b),
    };
    let mut flag = |key: &str, value: Option<String>| match value.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => {
            errors.insert(key.to_string(), "must be true or false".to_string());
            false
        }
    };
    let upload_flag = upload.is_some().then(|| flag("upload", upload.clone()));
    let bypass_reachability_checks = flag("bypassReachabilityChecks", bypass);
    let destination =
        match Destination::from_request(host.as_deref(), customer.as_deref(), ticket.as_deref()) {
            Ok(d) => d,
            Err(fields) => {
                // A field already wrong in form (a list, given twice)
                // keeps that message: it is the one to fix first.
                for (key, message) in fields {
                    errors.entry(key).or_insert(message);
                }
                None
            }
        };
    match (upload_flag, &destination) {
        (Some(true), None) if !errors.contains_key("uploadHost") => {
            errors.insert(
                "uploadHost".into(),
                "upload host must be given if upload is true".into(),
            );
        }
        (Some(false), Some(_)) => {
            errors.insert(
                "upload".into(),
                "is false, but an upload host was given".into(),
            );
        }
        _ => {}
    }
    if let Some(d) = &destination
        && let Err(StartError::Invalid(fields)) = state.coordinator.check_destination(d)
    {
        errors.extend(fields);
    }
    check_collect_parameters(state, &collect, &mut errors);
    let upload_proxy = match proxy.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(p) => match crate::upload::Proxy::parse(&crate::upload::proxy_url(p)) {
            Ok(proxy) => {
                if let Err(StartError::Invalid(fields)) = state.coordinator.check_proxy(&proxy) {
                    errors.extend(fields);
                }
                Some(proxy)
            }
            Err(e) => {
                errors.insert("uploadProxy".into(), format!("The proxy {e}"));
                None
            }
        },
    };
    if upload_proxy.is_some() && destination.is_none() && !errors.contains_key("uploadHost") {
        errors.insert(
            "uploadProxy".into(),
            "uploadProxy is only used with uploadHost".into(),
        );
    }
    for (key, message) in window_errors {
        errors.entry(key).or_insert(message);
    }
    if !errors.is_empty() {
        return Err(ApiError::fields(StatusCode::BAD_REQUEST, errors));
    }
    Ok(StartRequest {
        selection,
        upload: destination,
        upload_proxy,
        bypass_reachability_checks,
        collect,
    })
}

/// ns_server's checks of the collection options, and this node's limits
/// on them (`logDir` and `tmpDir` below the operator's directories).
pub(super) fn check_collect_parameters(
    state: &AppState,
    p: &CollectParameters,
    errors: &mut BTreeMap<String, String>,
) {
    let mut error = |key: &str, message: &str| {
        errors
            .entry(key.to_string())
            .or_insert_with(|| message.to_string());
    };
    match p.log_redaction_level.as_deref() {
        None | Some("none") | Some("partial") => {}
        Some(_) => error("logRedactionLevel", BAD_REDACTION_LEVEL),
    }
    if p.log_redaction_salt.is_some() && p.log_redaction_level.as_deref() != Some("partial") {
        error(
            "logRedactionSalt",
            "logRedactionSalt is only used with logRedactionLevel=partial",
        );
    }
    if p.log_redaction_salt.as_deref() == Some("") {
        error("logRedactionSalt", "cannot be empty");
    }
    if p.log_redaction_salt
        .as_ref()
        .is_some_and(|s| s.len() > MAX_SALT)
    {
        error(
            "logRedactionSalt",
            &format!("must be at most {MAX_SALT} characters"),
        );
    }
    let storage = state.node.storage();
    for (key, kind, value) in [
        ("tmpDir", RequestedDir::Tmp, &p.tmp_dir),
        ("logDir", RequestedDir::Log, &p.log_dir),
    ] {
        if let Some(Err(e)) = value.as_deref().map(|v| storage.allowed(kind, v)) {
            error(key, &e);
        }
    }
    match p.task_regexp.as_deref() {
        Some("") => error("taskRegexp", "cannot be empty"),
        Some(r) if r.len() > MAX_TASK_REGEXP => error(
            "taskRegexp",
            &format!("must be at most {MAX_TASK_REGEXP} characters"),
        ),
        _ => {}
    }
    // The messages never quote the password.
    match p.encryption_password.as_ref().map(Secret::expose) {
        Some("") => error("encryptionPassword", "cannot be empty"),
        Some(pw) if pw.len() > MAX_ENCRYPTION_PASSWORD => error(
            "encryptionPassword",
            &format!("must be at most {MAX_ENCRYPTION_PASSWORD} bytes"),
        ),
        Some(pw) if pw.contains(['\n', '\r', '\0']) => error(
            "encryptionPassword",
            "must not contain line breaks or NUL characters (cbcollect_info reads it as one line)",
        ),
        _ => {}
    }
}

/// The node selection of a start request: `from` (the seed's form:
/// `allnodes` or a comma list) or `nodes` (`*`, a comma list or an array).
fn selection(params: &params::Params) -> Result<NodeSelection, ApiError> {
    let (key, value) = match (params.get("from"), params.get("nodes")) {
        (Some(_), Some(_)) => {
            return Err(ApiError::field(
                StatusCode::BAD_REQUEST,
                "from",
                "Give either from or nodes, not both",
            ));
        }
        (Some(v), None) => ("from", v),
        (None, Some(v)) => ("nodes", v),
        (None, None) => return Ok(NodeSelection::Named(vec![])),
    };
    let all = match (key, value) {
        ("from", Param::Text(t)) => t.trim() == "allnodes",
        ("nodes", Param::Text(t)) => t.trim() == "*",
        _ => false,
    };
    Ok(if all {
        NodeSelection::All
    } else {
        NodeSelection::Named(value.items())
    })
}

async fn start(
    State(state): State<AppState>,
    Admin(caller): Admin,
    headers: HeaderMap,
    ParamsBody(body): ParamsBody,
) -> Result<Json<Value>, ApiError> {
    let params = params::parse(&headers, &body)?;
    let task = start_task(&state, &caller, START_URI, &params, START_PARAMS).await?;
    Ok(Json(task_json(&task)))
}

/// A task as JSON (our own type: it always serializes).
pub(super) fn task_json(task: &TaskStatus) -> Value {
    serde_json::to_value(task).unwrap_or(Value::Null)
}

/// Check `params` (the route's `known` ones) and start the collection.
/// The start and its audit record run to their end even if the client
/// hangs up meanwhile: a collection never starts unrecorded.
pub(super) async fn start_task(
    state: &AppState,
    caller: &Caller,
    route: &'static str,
    params: &params::Params,
    known: &'static [&'static str],
) -> Result<TaskStatus, ApiError> {
    let (state, caller, params) = (state.clone(), caller.clone(), params.clone());
    let started =
        tokio::spawn(async move { start_and_record(&state, &caller, route, &params, known).await });
    match started.await {
        Ok(started) => started,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(ApiError::general(
            StatusCode::SERVICE_UNAVAILABLE,
            "the daemon is shutting down",
        )),
    }
}

async fn start_and_record(
    state: &AppState,
    caller: &Caller,
    route: &str,
    params: &params::Params,
    known: &[&str],
) -> Result<TaskStatus, ApiError> {
    let started = async {
        let request = start_request(state, params, known)?;
        match state.coordinator.start(&request).await {
            Ok(task) => Ok(task),
            Err(StartError::Invalid(fields)) => {
                Err(ApiError::fields(StatusCode::BAD_REQUEST, fields))
            }
            Err(e @ (StartError::AlreadyRunning | StartError::Unreachable(_))) => {
                Err(ApiError::general(StatusCode::BAD_REQUEST, e.to_string()))
            }
            Err(e @ StartError::CannotCollect(_)) => Err(ApiError::general(
                StatusCode::INSUFFICIENT_STORAGE,
                e.to_string(),
            )),
        }
    }
    .await;
    state.audit.record(Entry {
        user: &caller.user,
        action: "start",
        route,
        params: Some(params),
        known,
        task_id: started.as_ref().ok().map(|t| t.task_id.as_str()),
        outcome: started.as_ref().map(drop).map_err(ApiError::summary),
    });
    if let Ok(task) = &started {
        tracing::info!(user = %caller.user, task = %task.task_id, "collection requested");
    }
    started
}

#[derive(Debug, Default, Deserialize)]
pub struct StatusQuery {
    since: Option<u64>,
    wait: Option<f64>,
}

impl StatusQuery {
    fn wait(&self) -> Duration {
        clamp_wait(self.wait)
    }
}

/// The coordinator of the latest task this node took part in, when that
/// is another node.
pub(super) fn remote_coordinator(state: &AppState) -> Option<String> {
    state
        .node
        .last_task()
        .map(|t| t.coordinator)
        .filter(|c| c != state.node.name())
}

pub(super) fn no_task() -> ApiError {
    ApiError::general(StatusCode::NOT_FOUND, "No logs collection task has run yet")
}

fn coordinator_unreachable(node: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::general(
        StatusCode::BAD_GATEWAY,
        format!("Cannot reach the coordinating node {node}: {e}"),
    )
}

async fn status(
    State(state): State<AppState>,
    _: Reader,
    query: Result<Query<StatusQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let Query(query) = query.map_err(bad_query)?;
    check_wait("wait", query.wait)?;
    if query.since.is_none() && remote_coordinator(&state).is_none() {
        // The task serialised as it is, not through a `Value` tree: a
        // task of 10,000 nodes is a few MB.
        let task = state.coordinator.latest().ok_or_else(no_task)?;
        return Ok(Json(task).into_response());
    }
    Ok(latest_task(&state, &query).await?.into_response())
}

/// The latest task, from its coordinator wherever that is (long-polled
/// if `query.since` is given).
pub(super) async fn latest_task(
    state: &AppState,
    query: &StatusQuery,
) -> Result<Json<Value>, ApiError> {
    if let Some(node) = remote_coordinator(state) {
        let mut forwarded = Vec::new();
        let mut wait = Duration::ZERO;
        if let Some(since) = query.since {
            wait = query.wait();
            forwarded.push(("since".to_string(), since.to_string()));
            forwarded.push(("wait".to_string(), wait.as_secs_f64().to_string()));
        }
        return match state
            .coordinator
            .peers()
            .latest_task(&node, &forwarded, wait)
            .await
        {
            Ok(task) => Ok(Json(task)),
            Err(e) if e.status() == Some(StatusCode::NOT_FOUND) => Err(no_task()),
            Err(e) => Err(coordinator_unreachable(&node, e)),
        };
    }
    local_status(state, query).await
}

/// The latest task coordinated here (long-polled if `since` is given).
pub(super) async fn local_status(
    state: &AppState,
    query: &StatusQuery,
) -> Result<Json<Value>, ApiError> {
    let task = match query.since {
        Some(since) => state.coordinator.wait_for_change(since, query.wait()).await,
        None => state.coordinator.latest(),
    };
    task.map(|t| Json(task_json(&t))).ok_or_else(no_task)
}

async fn cancel(
    State(state): State<AppState>,
    Admin(caller): Admin,
) -> Result<Json<Value>, ApiError> {
    cancel_task(&state, &caller, CANCEL_URI).await
}

/// Cancel the running collection, wherever it is coordinated; the latest
/// task as the coordinator reports it. Audited.
pub(super) async fn cancel_task(
    state: &AppState,
    caller: &Caller,
    route: &str,
) -> Result<Json<Value>, ApiError> {
    tracing::info!(user = %caller.user, "cancel requested");
    let cancelled = cancel_anywhere(state).await;
    let task_id = cancelled
        .as_ref()
        .ok()
        .and_then(|Json(t)| t.get("taskId")?.as_str().map(String::from));
    state.audit.record(Entry {
        user: &caller.user,
        action: "cancel",
        route,
        params: None,
        known: &[],
        task_id: task_id.as_deref(),
        outcome: cancelled.as_ref().map(drop).map_err(ApiError::summary),
    });
    cancelled
}

async fn cancel_anywhere(state: &AppState) -> Result<Json<Value>, ApiError> {
    if let Some(task) = state.node.last_task()
        && task.coordinator != state.node.name()
    {
        let node = task.coordinator;
        let peers = state.coordinator.peers();
        return match peers.cancel_task(&node, &task.task_id, CANCEL_WAIT).await {
            Ok(task) => Ok(Json(task)),
            Err(e) => {
                // Best effort: at least stop our own part of the task.
                state.node.cancel_job(&task.task_id);
                Err(coordinator_unreachable(&node, e))
            }
        };
    }
    state
        .coordinator
        .cancel(CANCEL_WAIT)
        .await
        .map(|t| Json(task_json(&t)))
        .ok_or_else(no_task)
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct HealthQuery {
    /// Wait up to this many seconds for the node to hold no session.
    wait_idle: Option<f64>,
}

/// One `waitIdle` request, counted while it lasts: also when its client
/// hangs up and the request is dropped mid-wait.
struct HealthWaiter<'a> {
    count: &'a AtomicUsize,
    admitted: bool,
}

impl<'a> HealthWaiter<'a> {
    fn enter(count: &'a AtomicUsize) -> HealthWaiter<'a> {
        let before = count.fetch_add(1, Ordering::Relaxed);
        HealthWaiter {
            count,
            admitted: before < MAX_HEALTH_WAITERS,
        }
    }
}

impl Drop for HealthWaiter<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn health(
    State(state): State<AppState>,
    query: Result<Query<HealthQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(bad_query)?;
    check_wait("waitIdle", query.wait_idle)?;
    if let Some(wait) = query.wait_idle {
        // Anyone may ask, so only a few wait at once; the rest are
        // answered as things are.
        let waiting = HealthWaiter::enter(&state.health_waiters);
        if waiting.admitted {
            state.node.wait_idle(clamp_wait(Some(wait))).await;
        }
    }
    let plugins = state.node.plugins();
    let mut health = json!({
        "node": state.node.name(),
        "status": "ok",
        "session": state.node.current_task().map(|t| t.task_id),
        "coordinating": state.coordinator.is_running(),
        "plugins": plugins.current().refs(),
    });
    let problems = plugins.problems();
    if !problems.is_empty() {
        health["reloadErrors"] = json!(problems);
    }
    Ok(Json(health))
}

pub(super) fn bad_query(e: axum::extract::rejection::QueryRejection) -> ApiError {
    ApiError::general(
        StatusCode::BAD_REQUEST,
        format!("Bad query: {}", e.body_text()),
    )
}

/// A client's wait must be a number of seconds, 0 or more (a negative or
/// non-finite one used to mean the default 30 s, silently).
pub(super) fn check_wait(key: &str, wait: Option<f64>) -> Result<(), ApiError> {
    match wait {
        Some(w) if !w.is_finite() || w < 0.0 => Err(ApiError::field(
            StatusCode::BAD_REQUEST,
            key,
            "Must be a number of seconds, 0 or more",
        )),
        _ => Ok(()),
    }
}

/// A client-given wait, bounded; the default when absent or invalid.
/// Bounded before it becomes a `Duration`: a finite wait of `1e300`
/// seconds is more than a `Duration` holds (and panicked here).
fn clamp_wait(wait: Option<f64>) -> Duration {
    match wait {
        Some(w) if w.is_finite() && w >= 0.0 => {
            Duration::from_secs_f64(w.min(MAX_LONG_POLL.as_secs_f64()))
        }
        _ => DEFAULT_LONG_POLL,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_times_are_rfc3339_or_a_bounded_duration_before_now() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-29T12:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let at = |v: &str| parse_time(v, now).map(rfc3339);
        assert_eq!(at("2h").unwrap(), "2026-11-29T10:00:00Z");
        assert_eq!(at("90s").unwrap(), "2026-11-29T11:58:30Z");
        assert_eq!(
            at("2026-11-29T13:00:00+01:00").unwrap(),
            "2026-11-29T12:00:00Z"
        );
        assert_eq!(at("3650d").unwrap(), "2016-12-01T12:00:00Z");
        // Past ten years, in any unit, and sizes that would overflow.
        for bad in [
            "3651d",
            "315360000d",
            "9223372036854775807s",
            "-1h",
            "2w",
            "é",
            "",
        ] {
            assert!(at(bad).is_err(), "{bad}");
        }
    }
}
