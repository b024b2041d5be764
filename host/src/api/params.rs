//! Request parameters from a form-encoded or JSON body, as one flat map,
//! so each route checks its parameters once whatever the encoding.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;

use super::ApiError;

/// The largest parameters body a route reads (axum's default, stated):
/// far above any start request, a list of 10,000 node names included.
pub const MAX_PARAMS_BODY: usize = 2 << 20;

/// A route's parameters body, read whole (at most [`MAX_PARAMS_BODY`],
/// within the request's [`super::body::BodyDeadline`]): too large, too
/// slow or broken off, it is a JSON error like any other, not axum's
/// plain-text rejection.
pub struct ParamsBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for ParamsBody {
    type Rejection = Response;

    async fn from_request(request: Request, _: &S) -> Result<ParamsBody, Response> {
        let (_, body) = super::body::read_whole(request, MAX_PARAMS_BODY).await?;
        Ok(ParamsBody(body))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Param {
    Text(String),
    /// A JSON array of strings (e.g. `"nodes": ["n1", "n2"]`).
    List(Vec<String>),
}

impl Param {
    /// The values of a list, or of a comma-separated text.
    pub fn items(&self) -> Vec<String> {
        match self {
            Param::Text(s) => s
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
            Param::List(items) => items.iter().map(|s| s.trim().to_string()).collect(),
        }
    }
}

pub type Params = BTreeMap<String, Param>;

/// Parse `body` according to its `Content-Type`: form-encoded (also when
/// the type is missing) or JSON (an object of strings, numbers, booleans
/// or arrays of strings).
pub fn parse(headers: &HeaderMap, body: &[u8]) -> Result<Params, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/x-www-form-urlencoded");
    let mime = content_type.split(';').next().unwrap_or("").trim();
    match mime {
        "application/x-www-form-urlencoded" => parse_form(body),
        "application/json" => parse_json(body),
        other => Err(ApiError::general(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "Unsupported content type {other:?}: send application/x-www-form-urlencoded or application/json"
            ),
        )),
    }
}

fn parse_form(body: &[u8]) -> Result<Params, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(body).map_err(|e| {
        ApiError::general(StatusCode::BAD_REQUEST, format!("Malformed form body: {e}"))
    })?;
    let mut params = Params::new();
    for (key, value) in pairs {
        if params.insert(key.clone(), Param::Text(value)).is_some() {
            return Err(ApiError::field(
                StatusCode::BAD_REQUEST,
                &key,
                "Given more than once",
            ));
        }
    }
    Ok(params)
}

fn parse_json(body: &[u8]) -> Result<Params, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Params::new());
    }
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::general(StatusCode::BAD_REQUEST, format!("Malformed JSON body: {e}"))
    })?;
    let serde_json::Value::Object(object) = value else {
        return Err(ApiError::general(
            StatusCode::BAD_REQUEST,
            "The JSON body must be an object",
        ));
    };
    let mut params = Params::new();
    let mut errors = BTreeMap::new();
    for (key, value) in object {
        use serde_json::Value as V;
        let param = match value {
            V::String(s) => Param::Text(s),
            V::Bool(b) => Param::Text(b.to_string()),
            V::Number(n) => Param::Text(n.to_string()),
            V::Array(items) => {
                let strings: Option<Vec<String>> = items
                    .into_iter()
                    .map(|i| match i {
                        V::String(s) => Some(s),
                        _ => None,
                    })
                    .collect();
                match strings {
                    Some(s) => Param::List(s),
                    None => {
                        errors.insert(key, "Must be an array of strings".to_string());
                        continue;
                    }
                }
            }
            _ => {
                errors.insert(
                    key,
                    "Must be a string, number, boolean or array".to_string(),
                );
                continue;
            }
        };
        params.insert(key, param);
    }
    if errors.is_empty() {
        Ok(params)
    } else {
        Err(ApiError::fields(StatusCode::BAD_REQUEST, errors))
    }
}

/// Refuse parameters a route does not know (typos surface instead of
/// being silently ignored).
pub fn reject_unknown(params: &Params, known: &[&str]) -> Result<(), ApiError> {
    let unknown: BTreeMap<String, String> = params
        .keys()
        .filter(|k| !known.contains(&k.as_str()))
        .map(|k| {
            (
                k.clone(),
                format!("Unknown parameter (known: {})", known.join(", ")),
            )
        })
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(ApiError::fields(StatusCode::BAD_REQUEST, unknown))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(content_type: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_str(content_type).unwrap(),
        );
        h
    }

    #[test]
    fn form_and_json_give_the_same_params() {
        let form = parse(
            &headers("application/x-www-form-urlencoded; charset=utf-8"),
            b"from=n1%2Cn2&x=1",
        )
        .unwrap();
        let json = parse(
            &headers("application/json"),
            br#"{"from": "n1,n2", "x": 1}"#,
        )
        .unwrap();
        assert_eq!(form, json);
        assert_eq!(form["from"].items(), vec!["n1", "n2"]);
    }

    #[test]
    fn lists_trim_and_skip_empty_items() {
        assert_eq!(Param::Text(" a, ,b ,".into()).items(), vec!["a", "b"]);
        assert_eq!(Param::List(vec![" a ".into()]).items(), vec!["a"]);
    }

    #[test]
    fn a_repeated_form_field_is_an_error() {
        let e = parse(&HeaderMap::new(), b"from=a&from=b").unwrap_err();
        assert_eq!(e.fields["from"], "Given more than once");
    }

    #[test]
    fn json_must_be_an_object_of_scalars_or_string_arrays() {
        let e = parse(&headers("application/json"), b"[1]").unwrap_err();
        assert_eq!(e.fields["_"], "The JSON body must be an object");
        let e = parse(&headers("application/json"), br#"{"a": {"b": 1}}"#).unwrap_err();
        assert_eq!(e.fields["a"], "Must be a string, number, boolean or array");
    }
}
