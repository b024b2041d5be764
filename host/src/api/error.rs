//! API errors as field-keyed JSON (`{"field": "message"}`, `"_"` for the
//! request as a whole), the shape Couchbase's REST API uses.

use std::collections::BTreeMap;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub fields: BTreeMap<String, String>,
    /// `Retry-After`, in seconds (429 and 503).
    pub retry_after: Option<u64>,
    /// 403 only: the permissions the caller lacks, sent with ns_server's
    /// `message` beside the fields (couchbase-cli prints
    /// `MESSAGE: PERMISSIONS`).
    pub permissions: Option<Vec<String>>,
}

/// ns_server's 403 message.
pub const FORBIDDEN_MESSAGE: &str = "Forbidden. User needs the following permissions";

impl ApiError {
    pub fn fields(status: StatusCode, fields: BTreeMap<String, String>) -> ApiError {
        ApiError {
            status,
            fields,
            retry_after: None,
            permissions: None,
        }
    }

    /// 403 for a caller without `permissions`: `message` under `_`, and
    /// ns_server's `message` and `permissions`.
    pub fn forbidden(message: impl Into<String>, permissions: &[&str]) -> ApiError {
        let mut e = ApiError::general(StatusCode::FORBIDDEN, message);
        e.permissions = Some(permissions.iter().map(|p| p.to_string()).collect());
        e
    }

    pub fn retry_after(mut self, secs: u64) -> ApiError {
        self.retry_after = Some(secs.max(1));
        self
    }

    pub fn field(status: StatusCode, field: &str, message: impl Into<String>) -> ApiError {
        ApiError::fields(
            status,
            BTreeMap::from([(field.to_string(), message.into())]),
        )
    }

    /// The error as its JSON body says it (for the audit log).
    pub fn summary(&self) -> String {
        format!(
            "{} {}",
            self.status.as_u16(),
            serde_json::to_string(&self.fields).unwrap_or_default()
        )
    }

    /// An error about the request as a whole (key `_`).
    pub fn general(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError::field(status, "_", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = match self.permissions {
            None => serde_json::json!(self.fields),
            Some(permissions) => {
                let mut body = serde_json::json!(self.fields);
                body["message"] = FORBIDDEN_MESSAGE.into();
                body["permissions"] = permissions.into();
                body
            }
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"autocollect\""),
            );
        }
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
