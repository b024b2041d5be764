//! The web console at `/ui/`: three static files embedded in the binary
//! (no build step, nothing fetched from elsewhere), served to anyone (they
//! hold no secret), with a strict Content-Security-Policy. The console
//! signs in with the API's users and calls the public API from the
//! operator's browser; see `ui/app.js`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use super::AppState;
use super::public::Who;

pub const UI_URI: &str = "/ui/";
pub const WHOAMI_URI: &str = "/whoami";

const INDEX: &str = include_str!("ui/index.html");
const APP: &str = include_str!("ui/app.js");
const STYLE: &str = include_str!("ui/style.css");

/// Only this node's own files and API; no inline script or style, no
/// framing, no form posts elsewhere.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; \
frame-ancestors 'none'";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent(UI_URI) }))
        .route(
            UI_URI,
            get(|| async { asset("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/ui/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP) }),
        )
        .route(
            "/ui/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
        .route(WHOAMI_URI, get(whoami))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// Who the caller is, as ns_server's `/whoami` says it (`admin` or
/// `ro_admin`): the console shows admins the actions.
async fn whoami(Who(caller): Who) -> Json<Value> {
    let role = match caller.role {
        crate::config::Role::Admin => "admin",
        crate::config::Role::ReadOnly => "ro_admin",
    };
    Json(json!({"id": caller.user, "domain": "local", "roles": [{"role": role}]}))
}
