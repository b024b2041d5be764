//! The HTTP access log: one line per request (target `access`), with the
//! method, the path (never the query, which may hold parameters), the
//! status, the user (`-` when none signed in: refused before or by
//! authentication, `/health`, node-to-node requests), the client address
//! and the time to the response's head. Requests refused by
//! authentication (401, 429, 503) are logged like any other.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;

use super::ClientAddr;

/// Where authentication records who the request is from.
#[derive(Clone, Default)]
pub struct AccessUser(Arc<OnceLock<String>>);

impl AccessUser {
    pub fn set(&self, user: &str) {
        let _ = self.0.set(user.to_string());
    }
}

pub async fn record(mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let user = AccessUser::default();
    request.extensions_mut().insert(user.clone());
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let client = request
        .extensions()
        .get::<ClientAddr>()
        .map(|c| c.0.to_string())
        .unwrap_or_else(|| "-".into());
    let response = next.run(request).await;
    tracing::info!(
        target: "access",
        method = %method,
        path = %path,
        status = response.status().as_u16(),
        user = user.0.get().map_or("-", String::as_str),
        client = %client,
        ms = started.elapsed().as_secs_f64() * 1000.0,
        "{method} {path} {}",
        response.status().as_u16()
    );
    response
}
