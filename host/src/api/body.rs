//! A request body that a route reads whole, bounded in size and in time:
//! a client that announces a body and then stalls, or sends it a byte at
//! a time, does not hold its connection and its handler for longer than
//! a slow request head could.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::Request;
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;

use super::ApiError;

/// How long a body read whole may take to arrive once its request head
/// has: the listener sets it on every request to the header timeout
/// (`server.header_timeout_secs`).
#[derive(Debug, Clone, Copy)]
pub struct BodyDeadline(pub Duration);

/// The deadline of a request that did not come through the listener (a
/// router driven directly): the header timeout's default.
const DEFAULT_DEADLINE: Duration = Duration::from_secs(15);

/// Read `request`'s body whole: at most `max` bytes, within the
/// request's [`BodyDeadline`]. Otherwise a JSON error: 413 over `max`,
/// 408 too slow (and the connection closes: a client that could not send
/// its body in time is not kept), 400 broken off.
pub async fn read_whole(request: Request, max: usize) -> Result<(Parts, Bytes), Response> {
    let (parts, body) = request.into_parts();
    let deadline = parts
        .extensions
        .get::<BodyDeadline>()
        .map_or(DEFAULT_DEADLINE, |d| d.0);
    let limited = http_body_util::Limited::new(body, max);
    match tokio::time::timeout(deadline, limited.collect()).await {
        Ok(Ok(body)) => Ok((parts, body.to_bytes())),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::general(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("The request body is over {max} bytes"),
        )
        .into_response()),
        Ok(Err(e)) => Err(ApiError::general(
            StatusCode::BAD_REQUEST,
            format!("The request body could not be read: {e}"),
        )
        .into_response()),
        Err(_) => {
            let mut response = ApiError::general(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "The request body did not arrive within {} s",
                    deadline.as_secs_f64()
                ),
            )
            .into_response();
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            Err(response)
        }
    }
}
