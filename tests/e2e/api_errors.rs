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
async fn a_negative_or_infinite_wait_is_refused_at_once() {
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
}
