//! HTTP: the public REST API ([`public`]) and the node-to-node API
//! ([`internal`]), on one listener. Handlers parse and check requests and
//! call into [`crate::coordinator`] and [`crate::node`]; they hold no
//! collection logic of their own.

mod access_log;
pub mod audit;
mod body;
mod couchbase;
mod error;
pub mod events;
mod internal;
mod openapi;
mod params;
mod public;
mod session;
mod ui;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use axum::Router;

use crate::auth::Users;
use crate::coordinator::Coordinator;
use crate::node::NodeService;
use crate::peer_auth::PeerVerifier;

pub use body::BodyDeadline;
pub use error::ApiError;
pub use params::MAX_PARAMS_BODY;

pub const START_URI: &str = "/collectLogs/start";
pub const STATUS_URI: &str = "/collectLogs/status";
/// Server-Sent Events with every change of the latest task.
pub const EVENTS_URI: &str = "/collectLogs/events";
pub const CANCEL_URI: &str = "/collectLogs/cancel";
pub const HEALTH_URI: &str = "/health";
/// Prometheus metrics (any user).
pub const METRICS_URI: &str = "/metrics";
/// The OpenAPI 3.1 document of the public and Couchbase routes (no auth).
pub const OPENAPI_URI: &str = "/openapi.json";
/// Reload the configuration (admins), as SIGHUP does.
pub const RELOAD_URI: &str = "/admin/reload";

/// The address a request came from (set by the server on every request).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// What every handler may reach.
#[derive(Clone)]
pub struct AppState {
    /// Reloads the configuration (SIGHUP, `POST /admin/reload`).
    pub reloader: Arc<crate::server::reload::Reloader>,
    pub node: Arc<NodeService>,
    pub coordinator: Arc<Coordinator>,
    pub users: Arc<Users>,
    /// Checks node-to-node signatures.
    pub peer_auth: Arc<PeerVerifier>,
    /// This node's TLS configuration (`None`: plain HTTP).
    pub tls: Option<Arc<crate::tls::TlsContext>>,
    /// With mutual TLS: whose certificate each node must present.
    pub node_identities: Option<Arc<crate::tls::NodeIdentities>>,
    /// Unauthenticated `/health?waitIdle=` requests waiting right now.
    pub health_waiters: Arc<AtomicUsize>,
    /// When a refused request was last logged (unix seconds), so a flood
    /// of them cannot flood the log.
    pub last_refusal_logged: Arc<AtomicU64>,
    /// Who started or cancelled what (`data_dir/audit.log`).
    pub audit: Arc<audit::AuditLog>,
    /// This node's copy of the cluster settings.
    pub settings: Arc<crate::settings::SettingsStore>,
    /// `/pools/default`'s probes of the nodes, shared by concurrent
    /// requests.
    pub pool_probe: Arc<couchbase::PoolProbe>,
}

impl AppState {
    /// Log a refused request, at most one line a second.
    pub fn log_refusal(&self, message: &str) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if self.last_refusal_logged.swap(now, Ordering::Relaxed) != now {
            tracing::warn!("{message}");
        }
    }
}

pub type AppRouter = Router;

pub fn router(state: AppState) -> AppRouter {
    public::router(state.clone())
        .merge(couchbase::router())
        .merge(ui::router())
        .merge(internal::router(state.clone()))
        .route(OPENAPI_URI, axum::routing::get(openapi::serve))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(access_log::record))
        .with_state(state)
}

/// Only the node-to-node API (signature checked), on `state`: what the
/// simulated-node harness ([`crate::simulated`]) serves for each node.
pub fn node_to_node_router(state: AppState) -> AppRouter {
    internal::router(state.clone()).with_state(state)
}

/// Unknown routes get a JSON error like every other one.
async fn not_found(method: axum::http::Method, uri: axum::http::Uri) -> error::ApiError {
    error::ApiError::general(
        axum::http::StatusCode::NOT_FOUND,
        format!("Not found: {method} {}", uri.path()),
    )
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> error::ApiError {
    error::ApiError::general(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        format!("Method {method} is not allowed on {}", uri.path()),
    )
}
