//! Bad requests get field-keyed JSON errors with the right status code.

use autocollect::client::{ApiClient, RequestBody};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::*;

fn form(pairs: &[(&str, &str)]) -> Option<RequestBody> {
    Some(RequestBody::Form(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    ))
}

async fn post(client: &ApiClient, path: &str, body: Option<RequestBody>) -> (StatusCode, Value) {
    client
        .request(Method::POST, path, body, true)
        .await
        .unwrap()
}

#[tokio::test]
async fn start_requests_are_validated_with_couchbase_messages() {
    let c = cluster(&["n1", "n2"], |_| {}).await;
    let admin = c.admin("n1");
    let start = "/collectLogs/start";

    let cases: Vec<(Option<RequestBody>, StatusCode, Value)> = vec![
        (
            form(&[("from", "n1,nope,ghost")]),
            StatusCode::BAD_REQUEST,
            json!({"nodes": "Unknown nodes: [\"ghost\",\"nope\"]"}),
        ),
        (
            form(&[("from", "")]),
            StatusCode::BAD_REQUEST,
            json!({"nodes": "Please select at least one node."}),
        ),
        (
            None,
            StatusCode::BAD_REQUEST,
            json!({"nodes": "Please select at least one node."}),
        ),
        (
            Some(RequestBody::Json(json!({"nodes": []}))),
            StatusCode::BAD_REQUEST,
            json!({"nodes": "Please select at least one node."}),
        ),
        (
            form(&[("from", "allnodes"), ("nodes", "n1")]),
            StatusCode::BAD_REQUEST,
            json!({"from": "Give either from or nodes, not both"}),
        ),
        (
            form(&[("from", "allnodes"), ("tikcet", "1")]),
            StatusCode::BAD_REQUEST,
            json!({"tikcet": "Unknown parameter (known: from, nodes, upload, upload_host, uploadHost, customer, ticket, bypassReachabilityChecks, logRedactionLevel, logRedactionSalt, tmpDir, logDir, taskRegexp, encryptionPassword, since, until)"}),
        ),
        (
            Some(RequestBody::Json(json!({"nodes": [1, 2]}))),
            StatusCode::BAD_REQUEST,
            json!({"nodes": "Must be an array of strings"}),
        ),
    ];
    for (body, want_status, want_body) in cases {
        let (status, body) = post(&admin, start, body).await;
        assert_eq!((status, body), (want_status, want_body));
    }

    // Malformed JSON and an unsupported content type.
    let raw = c.http_client(None);
    let url = format!("{}{start}", c.node("n1").url());
    for (content_type, payload, want) in [
        ("application/json", "{\"nodes\": ", StatusCode::BAD_REQUEST),
        (
            "text/plain",
            "from=allnodes",
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
    ] {
        let response = raw
            .post(&url)
            .basic_auth("admin", Some(&c.admin_password))
            .header("content-type", content_type)
            .body(payload)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), want);
        let body: Value = response.json().await.unwrap();
        assert!(body["_"].as_str().is_some(), "{body}");
    }

    // Nothing was started by any of that.
    assert_eq!(admin.status().await.unwrap(), None);

    // JSON with a node list works.
    let (status, body) = post(
        &admin,
        start,
        Some(RequestBody::Json(json!({"nodes": ["n2"]}))),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["perNode"].as_object().unwrap().len(), 1);
    wait_for_end(&admin, body["taskId"].as_str().unwrap()).await;
}

#[tokio::test]
async fn only_authenticated_admins_may_start_or_cancel() {
    let c = cluster(&["n1"], |_| {}).await;
    let url = c.node("n1").url();
    let anonymous = ApiClient::with_tls(&url, "", "", &c.client_tls()).unwrap();
    let wrong = ApiClient::with_tls(&url, "admin", "not-the-password", &c.client_tls()).unwrap();
    let nobody = ApiClient::with_tls(&url, "mallory", &c.admin_password, &c.client_tls()).unwrap();
    let reader = c.reader("n1");

    for path in ["/collectLogs/start", "/collectLogs/cancel"] {
        let (status, body) = anonymous
            .request(Method::POST, path, form(&[("from", "allnodes")]), false)
            .await
            .unwrap();
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body, json!({"_": "Authentication required"}));

        for client in [&wrong, &nobody] {
            let (status, body) = post(client, path, form(&[("from", "allnodes")])).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED);
            assert_eq!(body, json!({"_": "Invalid username or password"}));
        }

        let (status, body) = post(&reader, path, form(&[("from", "allnodes")])).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}");
        assert!(body["_"].as_str().unwrap().contains("read-only"), "{body}");
        // ns_server's shape, which couchbase-cli prints as one line.
        assert_eq!(
            body["message"],
            "Forbidden. User needs the following permissions"
        );
        assert_eq!(body["permissions"], json!(["cluster.admin.diag!write"]));
    }

    // Status: any authenticated user; nobody else.
    let (status, _) = anonymous
        .request(Method::GET, "/collectLogs/status", None, false)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = reader
        .request(Method::GET, "/collectLogs/status", None, true)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body, json!({"_": "No logs collection task has run yet"}));

    // The 401 asks for Basic credentials.
    let response = c
        .http_client(None)
        .get(format!("{url}/collectLogs/status"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["www-authenticate"],
        "Basic realm=\"autocollect\""
    );
}

#[tokio::test]
async fn the_node_to_node_api_refuses_unsigned_requests_even_with_the_secret() {
    let c = cluster(&["n1"], |_| {}).await;
    let url = format!("{}/internal/v1/sessions", c.node("n1").url());
    let body = json!({"taskId": "t1", "coordinator": "evil"});
    let raw = c.http_client(None);
    // The secret itself never crosses the wire: not even it is accepted
    // as a bearer token.
    for auth in [
        None,
        Some("wrong-secret-wrong-secret"),
        Some(c.admin_password.as_str()),
        Some(c.secret.as_str()),
    ] {
        let mut request = raw.post(&url).json(&body);
        if let Some(token) = auth {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body, json!({"_": "missing node-to-node signature"}));
    }
    // The node took no session from any of those.
    let health = c.admin("n1").health().await.unwrap();
    assert_eq!(health["session"], json!(null));
}

#[tokio::test]
async fn unknown_routes_and_methods_get_json_errors() {
    let c = cluster(&["n1"], |_| {}).await;
    let admin = c.admin("n1");
    let (status, body) = admin
        .request(Method::GET, "/collectLogs/nope", None, true)
        .await
        .unwrap();
    assert_eq!(
        (status, body),
        (
            StatusCode::NOT_FOUND,
            json!({"_": "Not found: GET /collectLogs/nope"})
        )
    );
    let (status, body) = admin
        .request(Method::DELETE, "/collectLogs/status", None, true)
        .await
        .unwrap();
    assert_eq!(
        (status, body),
        (
            StatusCode::METHOD_NOT_ALLOWED,
            json!({"_": "Method DELETE is not allowed on /collectLogs/status"})
        )
    );
}

/// Found by schemathesis: a negative (or not finite) wait used to mean
/// the default 30 s, so `status?since=0&wait=-1` hung half a minute
/// before any task existed. It is a 400 now, at once.
#[tokio::test]
async fn a_negative_or_infinite_wait_is_refused_at_once_and_a_huge_one_bounded() {
    let c = cluster(&["n1"], |_| {}).await;
    let reader = c.reader("n1");
    for (path, key) in [
        ("/collectLogs/status?since=0&wait=-1", "wait"),
        ("/collectLogs/status?since=0&wait=inf", "wait"),
        ("/collectLogs/status?since=0&wait=NaN", "wait"),
        ("/health?waitIdle=-0.5", "waitIdle"),
    ] {
        let started = std::time::Instant::now();
        let (status, body) = reader.request(Method::GET, path, None, true).await.unwrap();
        assert_eq!(
            (status, body),
            (
                StatusCode::BAD_REQUEST,
                json!({key: "Must be a number of seconds, 0 or more"})
            ),
            "{path}"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{path}"
        );
    }
    // Zero is a valid wait: no task yet, so 404 at once.
    let (status, _) = reader
        .request(
            Method::GET,
            "/collectLogs/status?since=0&wait=0",
            None,
            true,
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
    // So is a finite wait too large for a duration: it is bounded (it
    // panicked the request, anonymous ones on /health too). Both answer
    // at once here: the node is idle, and the task is past version 0.
    collect_once(&c.admin("n1")).await;
    for path in [
        "/health?waitIdle=1e300",
        "/collectLogs/status?since=0&wait=1e300",
    ] {
        let (status, body) = reader.request(Method::GET, path, None, true).await.unwrap();
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
    }
    let log = std::fs::read_to_string(&c.node("n1").log_path).unwrap();
    assert!(!log.contains("panicked"), "{log}");
}

/// One HTTP/1.1 response read off `conn`: its head (lowercase) and body
/// (`content-length` long), or `None` if the connection ended first.
async fn read_response<S: tokio::io::AsyncRead + Unpin>(conn: &mut S) -> Option<(String, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut bytes = Vec::new();
    let head_end = loop {
        if let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let mut chunk = [0u8; 4096];
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&bytes[..head_end]).to_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = bytes[head_end..].to_vec();
    while body.len() < length {
        let mut chunk = [0u8; 4096];
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    Some((head, body))
}

/// Found by schemathesis on a loaded CI machine: a client sends a request
/// head, is descheduled, and the daemon refuses the request (here: no
/// credentials) before its body arrives. The daemon used to answer
/// keep-alive and then close the connection anyway, so the client's body,
/// or its next request, met a closed connection ("EOF occurred in
/// violation of protocol"). Now the rest of a small body is read and
/// discarded, and the connection serves the next request.
#[tokio::test]
async fn a_refused_request_whose_body_comes_late_keeps_its_connection() {
    use tokio::io::AsyncWriteExt;
    let c = cluster(&["n1"], |_| {}).await;
    let mut conn = tls_connect(&c, "n1").await;
    let body = br#"{"nodes":"n1"}"#;
    let head = format!(
        "POST /collectLogs/start HTTP/1.1\r\nHost: n1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.flush().await.unwrap();
    // The refusal comes before the body is sent: the late body is the
    // point of the test.
    let (head, _) = read_response(&mut conn).await.expect("a refusal");
    assert!(head.starts_with("http/1.1 401"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    conn.write_all(body).await.unwrap();
    conn.write_all(b"GET /health HTTP/1.1\r\nHost: n1\r\n\r\n")
        .await
        .unwrap();
    conn.flush().await.unwrap();
    let (head, body) = tokio::time::timeout(PATIENCE, read_response(&mut conn))
        .await
        .expect("an answer in time")
        .expect("the connection still serves requests");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let health: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(health["status"], "ok");
}

/// A body too large to read and discard, of unknown length, or that the
/// client sends only after `100 Continue` (which a refusal does not ask
/// for) is not waited for: the refusal says `connection: close`, so the
/// client knows not to send another request on the connection, which
/// then ends.
#[tokio::test]
async fn a_refused_request_with_a_body_not_worth_waiting_for_is_told_the_connection_closes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let c = cluster(&["n1"], |config| config.server.header_timeout_secs = 1.0).await;
    for framing in [
        "Content-Length: 104857600",
        "Transfer-Encoding: chunked",
        "Content-Length: 14\r\nExpect: 100-continue",
    ] {
        let mut conn = tls_connect(&c, "n1").await;
        let head = format!(
            "POST /collectLogs/start HTTP/1.1\r\nHost: n1\r\nContent-Type: application/json\r\n\
             {framing}\r\n\r\n"
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        conn.flush().await.unwrap();
        let (head, _) = read_response(&mut conn).await.expect("a refusal");
        assert!(head.starts_with("http/1.1 401"), "{head}");
        assert!(head.contains("connection: close"), "{framing}: {head}");
        let mut rest = Vec::new();
        // Closed, with or without a TLS close_notify.
        let _ = tokio::time::timeout(PATIENCE, conn.read_to_end(&mut rest))
            .await
            .expect("the connection ends");
    }
}

/// A parameters body over the limit is a JSON error like any other (it
/// was axum's plain-text rejection), on every route that takes one; and
/// so is a node-to-node body over its own.
#[tokio::test]
async fn an_oversized_body_gets_a_json_413() {
    let c = cluster(&["n1"], |_| {}).await;
    let limit = autocollect::api::MAX_PARAMS_BODY;
    let http = c.http_client(None);
    for path in [
        "/collectLogs/start",
        "/controller/startLogsCollection",
        "/settings/logRedaction",
    ] {
        let response = http
            .post(format!("{}{path}", c.node("n1").url()))
            .basic_auth(autocollect::cluster::ADMIN_USER, Some(&c.admin_password))
            .header("content-type", "application/json")
            .body(vec![b' '; limit + 1])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE, "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            body,
            json!({"_": format!("The request body is over {limit} bytes")}),
            "{path}"
        );
    }
    // The node-to-node API reads its body before it can check the
    // signature over it: at most 1 MiB, whoever sends it.
    let response = http
        .post(format!("{}/internal/v1/sessions", c.node("n1").url()))
        .header("content-type", "application/json")
        .body(vec![b' '; (1 << 20) + 1])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body, json!({"_": "The request body is over 1048576 bytes"}));
    // Nothing started.
    assert_eq!(c.admin("n1").status().await.unwrap(), None);
}

/// A client that announces a body and then stalls holds neither its
/// connection nor a handler past the header timeout: the body a route
/// reads whole must arrive within it, else a JSON 408 that closes the
/// connection. On a public route (after sign-in) and on the node-to-node
/// API (whose body is read before its signature can be checked).
#[tokio::test]
async fn a_body_that_stalls_gets_a_json_408_and_its_connection_closes() {
    use base64::Engine as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let c = cluster(&["n1"], |config| config.server.header_timeout_secs = 1.0).await;
    let credentials = base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        autocollect::cluster::ADMIN_USER,
        c.admin_password
    ));
    for (path, auth) in [
        (
            "/collectLogs/start",
            format!("Authorization: Basic {credentials}\r\n"),
        ),
        (
            "/settings/logRedaction",
            format!("Authorization: Basic {credentials}\r\n"),
        ),
        ("/internal/v1/sessions", String::new()),
    ] {
        let mut conn = tls_connect(&c, "n1").await;
        // Half of the announced body, then nothing.
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: n1\r\nContent-Type: application/json\r\n{auth}\
             Content-Length: 40\r\n\r\n{{\"nodes\": \"n1\",   "
        );
        conn.write_all(request.as_bytes()).await.unwrap();
        conn.flush().await.unwrap();
        let (head, body) = tokio::time::timeout(PATIENCE, read_response(&mut conn))
            .await
            .unwrap_or_else(|_| panic!("{path}: no answer while the body stalls"))
            .expect("an answer");
        assert!(head.starts_with("http/1.1 408"), "{path}: {head}");
        assert!(head.contains("connection: close"), "{path}: {head}");
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            body,
            json!({"_": "The request body did not arrive within 1 s"}),
            "{path}"
        );
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(PATIENCE, conn.read_to_end(&mut rest))
            .await
            .unwrap_or_else(|_| panic!("{path}: the connection ends"));
    }
    // Nothing started, and the node holds no session.
    assert_eq!(c.admin("n1").status().await.unwrap(), None);
    let health = c.admin("n1").health().await.unwrap();
    assert_eq!(health["session"], json!(null));
}
