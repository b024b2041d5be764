//! Uploads: every node's zip reaches the support server, byte-identical, at
//! Couchbase's URL; retries, refusals, validation, preflight, containment.

use std::path::Path;
use std::time::Duration;

use autocollect::client::{ApiClient, RequestBody, StartOptions};
use autocollect::config::Config;
use autocollect::coordinator::task::{NodeState, NodeStatus, TaskState, TaskStatus};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::proxy_server::ProxyServer;
use crate::support::*;
use crate::upload_server::{Received, Reply, UploadServer, closed_port, sha256_file};

/// Loopback upload servers speak plain http: allow it, and keep retries
/// quick.
fn uploads_over_http(config: &mut Config) {
    config.upload.allow_http = true;
    config
        .uploader
        .options
        .insert("initial-backoff-ms".into(), 20i64.into());
}

pub fn upload_to(host: &str) -> StartOptions {
    StartOptions {
        nodes: "all".into(),
        upload_host: Some(host.into()),
        customer: Some("Example inc.".into()),
        ticket: Some("12345".into()),
        ..Default::default()
    }
}

pub async fn upload_and_wait(admin: &ApiClient, options: &StartOptions) -> TaskStatus {
    let started = admin.start_with(options).await.expect("start accepted");
    let task = wait_for_end(admin, &started.task_id).await;
    assert_ended(&task, TaskState::Completed);
    task
}

/// Each of `nodes` ended `uploaded` at Couchbase's URL under `host`, and
/// the server received its kept artifact byte for byte: each node's
/// status with what arrived, for further checks.
pub fn uploaded_byte_identical<'a>(
    task: &'a TaskStatus,
    received: &'a [Received],
    host: &str,
    nodes: &[&str],
) -> Vec<(&'a NodeStatus, &'a Received)> {
    assert_eq!(received.len(), nodes.len(), "{received:?}");
    nodes
        .iter()
        .map(|node| {
            let status = &task.per_node[*node];
            assert_eq!(status.status, NodeState::Uploaded, "{node}: {status:?}");
            let artifact = Path::new(status.path.as_deref().expect("path kept"));
            let file = artifact.file_name().unwrap().to_str().unwrap();
            let path = format!("/Example+inc./12345/{file}");
            assert_eq!(
                status.url.as_deref(),
                Some(format!("{host}{path}").as_str())
            );
            let got = received.iter().find(|r| r.path == path).expect("received");
            assert_eq!(got.sha256, sha256_file(artifact), "{node}: bytes differ");
            (status, got)
        })
        .collect()
}

pub fn output(status: &NodeStatus) -> &str {
    status.upload_output.as_deref().unwrap_or_default()
}

#[tokio::test]
async fn every_node_uploads_its_zip_byte_identical_to_couchbases_url() {
    let server = UploadServer::start().await;
    let c = cluster(&["n1", "n2", "n3"], |config| {
        uploads_over_http(config);
        set_option(config, "artifact-size", 300_000i64);
    })
    .await;
    let task = upload_and_wait(&c.admin("n2"), &upload_to(&server.host())).await;

    let received = server.received();
    for (status, got) in
        uploaded_byte_identical(&task, &received, &server.host(), &["n1", "n2", "n3"])
    {
        assert!(got.size > 300_000 - 1024, "{got:?}");
        // The last progress report is kept: every byte sent.
        let progress = status.progress.as_ref().expect("upload progress");
        assert_eq!((progress.done, progress.total), (got.size, got.size));
    }
}

#[tokio::test]
async fn a_server_error_is_retried_until_the_upload_succeeds() {
    let server = UploadServer::start().await;
    server.script([Reply::Status(503, "busy"), Reply::Status(503, "still busy")]);
    let c = cluster(&["n1"], uploads_over_http).await;
    let task = upload_and_wait(&c.admin("n1"), &upload_to(&server.host())).await;

    assert_eq!(task.per_node["n1"].status, NodeState::Uploaded);
    let received = server.received();
    assert_eq!(received.len(), 3, "two 503s, then success");
    assert!(
        received.windows(2).all(|w| w[0] == w[1]),
        "same body each time"
    );
}

#[tokio::test]
async fn a_refusal_is_reported_with_its_status_and_body_and_not_retried() {
    let server = UploadServer::start().await;
    server.script([Reply::Status(403, "ticket 12345 is closed")]);
    let c = cluster(&["n1"], uploads_over_http).await;
    let task = upload_and_wait(&c.admin("n1"), &upload_to(&server.host())).await;

    let n1 = &task.per_node["n1"];
    assert_eq!(n1.status, NodeState::FailedUpload);
    assert_eq!(n1.upload_status_code.as_deref(), Some("403"));
    assert_eq!(output(n1), "ticket 12345 is closed");
    assert!(n1.url.as_deref().unwrap().starts_with(&server.host()));
    assert_eq!(server.received().len(), 1, "4xx is not retried");
}

#[tokio::test]
async fn an_unreachable_server_fails_the_upload_with_the_reason() {
    let host = format!("http://127.0.0.1:{}", closed_port());
    let c = cluster(&["n1"], |config| {
        uploads_over_http(config);
        config
            .uploader
            .options
            .insert("attempts".into(), 2i64.into());
    })
    .await;
    let options = StartOptions {
        bypass_reachability_checks: true,
        ..upload_to(&host)
    };
    let task = upload_and_wait(&c.admin("n1"), &options).await;

    let n1 = &task.per_node["n1"];
    assert_eq!(n1.status, NodeState::FailedUpload);
    assert_eq!(n1.upload_status_code, None);
    assert!(output(n1).contains("after 2 attempts"), "{n1:?}");
    assert!(output(n1).to_lowercase().contains("connection"), "{n1:?}");
}

/// The template uploader (plugins/template-uploader, built on the SDK):
/// one PUT, byte-identical; a refusal comes back with its status and body.
#[tokio::test]
async fn the_template_uploader_uploads_and_reports_a_refusal() {
    let server = UploadServer::start().await;
    let c = cluster(&["n1", "n2"], |config| {
        uploads_over_http(config);
        set_option(config, "artifact-size", 200_000i64);
        config.uploader.plugin = autocollect::plugin::builtin::build_output("template_uploader")
            .display()
            .to_string();
        config.uploader.options.clear();
    })
    .await;
    let task = upload_and_wait(&c.admin("n1"), &upload_to(&server.host())).await;
    let received = server.received();
    for node in ["n1", "n2"] {
        let status = &task.per_node[node];
        assert_eq!(status.status, NodeState::Uploaded, "{node}: {status:?}");
        let artifact = Path::new(status.path.as_deref().expect("path kept"));
        let file = artifact.file_name().unwrap().to_str().unwrap();
        let path = format!("/Example+inc./12345/{file}");
        let got = received.iter().find(|r| r.path == path).expect("received");
        assert_eq!(got.sha256, sha256_file(artifact), "{node}: bytes differ");
        let progress = status.progress.as_ref().expect("upload progress");
        assert_eq!((progress.done, progress.total), (got.size, got.size));
    }

    server.script([Reply::Status(403, "ticket 12345 is closed")]);
    let options = StartOptions {
        nodes: "n1".into(),
        ..upload_to(&server.host())
    };
    let task = upload_and_wait(&c.admin("n1"), &options).await;
    let n1 = &task.per_node["n1"];
    assert_eq!(n1.status, NodeState::FailedUpload, "{n1:?}");
    assert_eq!(n1.upload_status_code.as_deref(), Some("403"));
    assert_eq!(output(n1), "ticket 12345 is closed");
}

#[tokio::test]
async fn the_host_refuses_a_plugin_that_sends_data_elsewhere() {
    let server = UploadServer::start().await;
    let elsewhere = UploadServer::start().await;
    let target = format!("{}/steal", elsewhere.host());
    let c = cluster(&["n1"], |config| {
        uploads_over_http(config);
        config.uploader.plugin =
            autocollect::plugin::builtin::build_output("test_hostile_uploader")
                .display()
                .to_string();
        config.uploader.options.clear();
        config
            .uploader
            .options
            .insert("target".into(), target.as_str().into());
    })
    .await;
    let task = upload_and_wait(&c.admin("n1"), &upload_to(&server.host())).await;

    let n1 = &task.per_node["n1"];
    assert_eq!(n1.status, NodeState::FailedUpload);
    assert!(
        output(n1).contains(&format!(
            "the host refused requests outside the upload destination: PUT {target}"
        )),
        "{n1:?}"
    );
    assert!(
        elsewhere.received().is_empty(),
        "data reached the other host"
    );
    assert!(server.received().is_empty());
}

#[tokio::test]
async fn nodes_upload_one_at_a_time_by_default() {
    let server = UploadServer::start().await;
    // Each upload takes a while: uploads that overlapped would show it.
    server.script([Reply::Slow(Duration::from_millis(200)); 3]);
    let c = cluster(&["n1", "n2", "n3"], uploads_over_http).await;
    let task = upload_and_wait(&c.admin("n1"), &upload_to(&server.host())).await;

    assert!(
        task.per_node
            .values()
            .all(|n| n.status == NodeState::Uploaded),
        "{task:?}"
    );
    let mut intervals = server.intervals();
    assert_eq!(intervals.len(), 6, "a zip and its manifest per node");
    intervals.sort();
    for pair in intervals.windows(2) {
        assert!(pair[0].1 <= pair[1].0, "uploads overlapped: {intervals:?}");
    }
}

#[tokio::test]
async fn uploads_and_the_preflight_go_through_the_configured_proxy() {
    let server = UploadServer::start().await;
    let proxy = ProxyServer::start().await;
    let c = cluster(&["n1", "n2"], |config| {
        uploads_over_http(config);
        config.upload.proxy = Some(proxy.url());
    })
    .await;
    let task = upload_and_wait(&c.admin("n1"), &upload_to(&server.host())).await;

    for node in ["n1", "n2"] {
        assert_eq!(task.per_node[node].status, NodeState::Uploaded, "{task:?}");
    }
    assert_eq!(server.received().len(), 2);
    let requests = proxy.requests();
    let preflight = format!("HEAD {}/Example+inc./12345/", server.host());
    let tunnel = format!("CONNECT {}", server.addr);
    assert_eq!(requests[0], preflight, "{requests:?}");
    // One tunnel per uploader run: each node's zip, then its manifest.
    assert_eq!(
        requests[1..],
        [tunnel.clone(), tunnel.clone(), tunnel.clone(), tunnel],
        "{requests:?}"
    );
}

#[tokio::test]
async fn a_proxy_that_refuses_the_tunnel_fails_the_upload_with_its_answer() {
    let server = UploadServer::start().await;
    let proxy = ProxyServer::refusing_tunnels().await;
    let c = cluster(&["n1"], |config| {
        uploads_over_http(config);
        config.upload.proxy = Some(proxy.url());
        config
            .uploader
            .options
            .insert("attempts".into(), 1i64.into());
    })
    .await;
    let task = upload_and_wait(&c.admin("n1"), &upload_to(&server.host())).await;

    let n1 = &task.per_node["n1"];
    assert_eq!(n1.status, NodeState::FailedUpload);
    let want = format!(
        "upload proxy {} refused a tunnel to {}: HTTP/1.1 403 Forbidden",
        proxy.url(),
        server.addr
    );
    assert!(output(n1).contains(&want), "{n1:?}");
    assert!(server.received().is_empty(), "nothing bypassed the proxy");
}

#[tokio::test]
async fn cancel_during_an_upload_stops_it() {
    let server = UploadServer::start().await;
    server.script([Reply::Hang]);
    let c = cluster(&["n1"], uploads_over_http).await;
    let admin = c.admin("n1");
    let started = admin.start_with(&upload_to(&server.host())).await.unwrap();
    // The body has arrived and the server sits on it: the upload runs.
    server.wait_received(1).await;
    wait_for(&admin, |t| {
        t.per_node["n1"].status == NodeState::StartedUpload
    })
    .await;

    let task = admin.cancel().await.unwrap().unwrap();
    assert_eq!(task.task_id, started.task_id);
    assert_ended(&task, TaskState::Cancelled);
    assert_eq!(task.per_node["n1"].status, NodeState::Cancelled);
    let health = admin.wait_idle(10.0).await.unwrap();
    assert_eq!(health["session"], json!(null));
    assert!(!job_dir(&c, "n1", &task.task_id).exists());
}

async fn start_form(admin: &ApiClient, pairs: &[(&str, &str)]) -> (StatusCode, Value) {
    let form = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    admin
        .request(
            Method::POST,
            "/collectLogs/start",
            Some(RequestBody::Form(form)),
            true,
        )
        .await
        .unwrap()
}

#[tokio::test]
async fn upload_parameters_are_validated_with_couchbases_rules() {
    let server = UploadServer::start().await;
    let c = cluster(&["n1"], |config| {
        uploads_over_http(config);
        config.upload.allowed_hosts = vec![server.addr.to_string()];
    })
    .await;
    let admin = c.admin("n1");
    let host = server.host();
    let h = host.as_str();
    let long_customer = "x".repeat(51);
    let cases: Vec<(Vec<(&str, &str)>, Value)> = vec![
        (
            vec![("upload_host", h), ("customer", "bad/customer")],
            json!({"customer": "must contain only [A-Za-z0-9._ -] and be no longer than 50 characters"}),
        ),
        (
            vec![("upload_host", h), ("customer", &long_customer)],
            json!({"customer": "must contain only [A-Za-z0-9._ -] and be no longer than 50 characters"}),
        ),
        (
            vec![
                ("upload_host", h),
                ("customer", "a"),
                ("ticket", "12345678"),
            ],
            json!({"ticket": "must contain only [0-9] and be no longer than 7 characters"}),
        ),
        (
            vec![("upload_host", h), ("customer", "a"), ("ticket", "12a")],
            json!({"ticket": "must contain only [0-9] and be no longer than 7 characters"}),
        ),
        (
            vec![("upload_host", h)],
            json!({"customer": "customer must be given if upload host or ticket is given"}),
        ),
        (
            vec![("ticket", "1")],
            json!({
                "customer": "customer must be given if upload host or ticket is given",
                "uploadHost": "upload host must be given if customer or ticket is given"
            }),
        ),
        (
            vec![("customer", "a")],
            json!({"uploadHost": "upload host must be given if customer or ticket is given"}),
        ),
        (
            vec![("upload_host", " "), ("customer", "a")],
            json!({"uploadHost": "cannot be empty"}),
        ),
        (
            vec![("upload_host", h), ("customer", "")],
            json!({"customer": "cannot be empty"}),
        ),
        (
            vec![("upload", "true")],
            json!({"uploadHost": "upload host must be given if upload is true"}),
        ),
        (
            vec![("upload", "yes")],
            json!({"upload": "must be true or false"}),
        ),
        (
            vec![
                ("upload_host", h),
                ("customer", "a"),
                ("bypassReachabilityChecks", "maybe"),
            ],
            json!({"bypassReachabilityChecks": "must be true or false"}),
        ),
        (
            vec![("upload_host", "uploads.example.com"), ("customer", "a")],
            json!({"uploadHost": "upload host uploads.example.com:443 is not allowed by this cluster's configuration (allowed_hosts)"}),
        ),
        (
            vec![("upload_host", h), ("uploadHost", h), ("customer", "a")],
            json!({"uploadHost": "Give either upload_host or uploadHost, not both"}),
        ),
        // Several problems at once are reported together.
        (
            vec![
                ("from", "ghost"),
                ("upload_host", h),
                ("customer", "a/b"),
                ("ticket", "x"),
            ],
            json!({
                "nodes": "Unknown nodes: [\"ghost\"]",
                "customer": "must contain only [A-Za-z0-9._ -] and be no longer than 50 characters",
                "ticket": "must contain only [0-9] and be no longer than 7 characters"
            }),
        ),
    ];
    for (mut pairs, want) in cases {
        if !pairs.iter().any(|(k, _)| *k == "from") {
            pairs.push(("from", "allnodes"));
        }
        let (status, body) = start_form(&admin, &pairs).await;
        assert_eq!(
            (status, &body),
            (StatusCode::BAD_REQUEST, &want),
            "{pairs:?}"
        );
    }
    // JSON: a field of the wrong type says so, whatever else it implies.
    let (status, body) = admin
        .request(
            Method::POST,
            "/collectLogs/start",
            Some(RequestBody::Json(
                json!({"nodes": "*", "uploadHost": h, "customer": ["a", "b"]}),
            )),
            true,
        )
        .await
        .unwrap();
    assert_eq!(
        (status, body),
        (
            StatusCode::BAD_REQUEST,
            json!({"customer": "Must be a string"})
        )
    );
    assert!(server.received().is_empty());
    assert_eq!(admin.status().await.unwrap(), None, "nothing started");
}

#[tokio::test]
async fn plain_http_upload_hosts_are_refused_unless_configured() {
    let c = cluster(&["n1"], |_| {}).await;
    let (status, body) = start_form(
        &c.admin("n1"),
        &[
            ("from", "allnodes"),
            ("upload_host", "http://127.0.0.1:9"),
            ("customer", "a"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body,
        json!({"uploadHost": "http:// upload hosts are refused by this cluster's configuration (allow_http)"})
    );
}

#[tokio::test]
async fn the_preflight_refuses_an_unreachable_host_unless_bypassed() {
    let port = closed_port();
    let c = cluster(&["n1"], |config| {
        uploads_over_http(config);
        config
            .uploader
            .options
            .insert("attempts".into(), 1i64.into());
    })
    .await;
    let admin = c.admin("n1");
    let host = format!("127.0.0.1:{port}");
    let pairs = [
        ("from", "allnodes"),
        ("upload_host", host.as_str()),
        ("customer", "acme"),
    ];
    // No scheme given: https is assumed, as Couchbase does.
    let (status, body) = start_form(&admin, &pairs).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let message = body["_"].as_str().unwrap();
    let prefix = format!("Unable to access 'https://127.0.0.1:{port}/acme/' : ");
    assert!(message.starts_with(&prefix), "{body}");
    assert_eq!(body.as_object().unwrap().len(), 1);

    let mut bypassed = pairs.to_vec();
    bypassed.push(("bypassReachabilityChecks", "true"));
    let (status, body) = start_form(&admin, &bypassed).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let task = wait_for_end(&admin, body["taskId"].as_str().unwrap()).await;
    assert_eq!(task.per_node["n1"].status, NodeState::FailedUpload);
}
