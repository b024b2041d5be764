//! Where uploads may go, enforced at the socket: the preflight follows no
//! redirect, a request's proxy must be the operator's, link-local and
//! cloud metadata addresses are refused, credentials never enter a URL.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use autocollect::client::RequestBody;
use autocollect::coordinator::task::NodeState;
use axum::Router;
use axum::http::{StatusCode as AxumStatus, header};
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::support::*;

/// A host that answers everything with a redirect to `to`.
async fn redirecting_to(to: String) -> (String, tokio::task::JoinHandle<()>) {
    let app = Router::new().fallback(move || {
        let to = to.clone();
        async move { (AxumStatus::FOUND, [(header::LOCATION, to)]) }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (host, task)
}

/// A host that counts the requests it gets.
async fn counting() -> (String, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let app = Router::new().fallback(move || {
        counter.fetch_add(1, Ordering::SeqCst);
        async { "ok" }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (host, hits, task)
}

/// Finding 7: an allowed host answering 302 made the coordinator send a
/// request to a host that is not allowed.
#[tokio::test]
async fn the_preflight_never_follows_a_redirect() {
    let (elsewhere, hits, _e) = counting().await;
    let (allowed, _a) = redirecting_to(format!("{elsewhere}/collect")).await;
    let allowed_host = allowed.trim_start_matches("http://").to_string();
    let c = cluster(&["n1"], |config| {
        config.upload.allow_http = true;
        config.upload.allowed_hosts = vec![allowed_host.clone()];
    })
    .await;
    let admin = c.admin("n1");
    let (status, body) = start_json(
        &admin,
        json!({"nodes": "*", "uploadHost": allowed, "customer": "acme"}),
    )
    .await;
    // Any HTTP answer passes the preflight; nothing goes elsewhere.
    assert_eq!(status, StatusCode::OK, "{body}");
    admin.cancel().await.unwrap();
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the redirect was followed");
}

/// Finding 7: a request's `uploadProxy` could be any address (a way to
/// probe internal ports).
#[tokio::test]
async fn a_request_may_only_name_a_proxy_the_operator_allowed() {
    let c = cluster(&["n1"], |config| {
        config.upload.allow_http = true;
        config.upload.allowed_proxies = vec!["proxy.corp:3128".into()];
    })
    .await;
    // Couchbase's route takes `uploadProxy`.
    let (status, body) = c
        .admin("n1")
        .request(
            Method::POST,
            "/controller/startLogsCollection",
            Some(RequestBody::Form(
                [
                    ("nodes", "*"),
                    ("uploadHost", "http://127.0.0.1:9"),
                    ("customer", "acme"),
                    ("bypassReachabilityChecks", "true"),
                    ("uploadProxy", "127.0.0.1:22"),
                ]
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .to_vec(),
            )),
            true,
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body,
        json!({"uploadProxy": "proxy 127.0.0.1:22 is not allowed by this cluster's configuration (allowed_proxies)"})
    );
}

#[tokio::test]
async fn link_local_and_metadata_addresses_are_refused_by_the_coordinator_and_every_node() {
    let c = cluster(&["n1"], |config| config.upload.allow_http = true).await;
    let admin = c.admin("n1");
    let metadata = "http://169.254.169.254";
    let refusal = "upload host 169.254.169.254 is refused: 169.254.169.254 is a link-local or cloud metadata address (allow_link_local)";
    let (status, body) = start_json(
        &admin,
        json!({"nodes": "*", "uploadHost": metadata, "customer": "acme"}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body,
        json!({"_": format!("Unable to access '{metadata}/acme/' : {refusal}")})
    );
    // Without the preflight, the node refuses it before any connection.
    let (status, body) = start_json(
        &admin,
        json!({"nodes": "*", "uploadHost": metadata, "customer": "acme",
               "bypassReachabilityChecks": "true"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let task_id = body["taskId"].as_str().unwrap();
    let task = wait_for_end(&admin, task_id).await;
    let n1 = &task.per_node["n1"];
    assert_eq!(n1.status, NodeState::FailedUpload, "{n1:?}");
    assert_eq!(
        n1.upload_output.as_deref(),
        Some(format!("refused by node n1: {refusal}").as_str())
    );
}

/// Finding 7: credentials in `uploadHost` showed in status (to read-only
/// users) and in the daemon log.
#[tokio::test]
async fn credentials_in_the_upload_host_are_refused_and_never_recorded() {
    let c = cluster(&["n1"], |config| config.upload.allow_http = true).await;
    let (status, body) = start_json(
        &c.admin("n1"),
        json!({"nodes": "*", "uploadHost": "https://support:hunter2@uploads.example.com",
               "customer": "acme"}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body,
        json!({"uploadHost": "must not contain credentials (user:password@): they would show in status and logs"})
    );
    let audit = std::fs::read_to_string(c.node("n1").data_dir.join("audit.log")).unwrap();
    assert!(!audit.contains("hunter2"), "{audit}");
    assert!(!c.logs().contains("hunter2"));
}
