//! Uploads over real TLS: a local upload server whose certificate a test
//! CA signed, trusted through `[upload] ca_file`, directly and inside a
//! proxy's `CONNECT` tunnel; an upload host the node does not trust is
//! refused in words, by the preflight and by the node; a bad CA file stops
//! the daemon at start.

use std::path::{Path, PathBuf};

use autocollect::config::Config;
use autocollect::coordinator::task::NodeState;
use autocollect::local_tls::LocalCa;
use reqwest::StatusCode;
use serde_json::json;

use crate::proxy_server::ProxyServer;
use crate::support::*;
use crate::upload::{output, upload_and_wait, upload_to, uploaded_byte_identical};
use crate::upload_server::{UploadServer, sha256_file};

/// What the node says when the upload host's certificate is signed by a
/// CA it does not trust.
const UNTRUSTED: &str = "the upload host's certificate is not trusted: it is not signed by a \
                         certificate authority this node trusts (set [upload] ca_file?)";

/// Write `pem` to `dir/name`.
fn pem_file(dir: &Path, name: &str, pem: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pem).unwrap();
    path
}

/// Trust `ca_file` for uploads; one quick attempt per upload.
fn trusting(config: &mut Config, ca_file: Option<&Path>, ca_only: bool) {
    config.upload.ca_file = ca_file.map(Path::to_path_buf);
    config.upload.ca_only = ca_only;
    config
        .uploader
        .options
        .insert("attempts".into(), 1i64.into());
    set_option(config, "artifact-size", 300_000i64);
}

#[tokio::test]
async fn https_uploads_trusting_the_ca_file_arrive_byte_identical() {
    let server = UploadServer::start_tls().await;
    let certs = tempfile::tempdir().unwrap();
    let ca = pem_file(certs.path(), "ca.pem", server.ca_pem());
    let c = cluster(&["n1", "n2"], |config| trusting(config, Some(&ca), false)).await;
    // By name: the certificate is checked for `localhost`. The preflight
    // runs (and passes: it trusts the CA file too).
    let host = server.host_named("localhost");
    let task = upload_and_wait(&c.admin("n1"), &upload_to(&host)).await;

    uploaded_byte_identical(&task, &server.received(), &host, &["n1", "n2"]);
}

#[tokio::test]
async fn https_uploads_through_the_proxy_run_tls_inside_the_tunnel() {
    let server = UploadServer::start_tls().await;
    let proxy = ProxyServer::start().await;
    let certs = tempfile::tempdir().unwrap();
    let ca = pem_file(certs.path(), "ca.pem", server.ca_pem());
    let c = cluster(&["n1"], |config| {
        trusting(config, Some(&ca), false);
        config.upload.proxy = Some(proxy.url());
    })
    .await;
    let task = upload_and_wait(&c.admin("n1"), &upload_to(&server.host())).await;

    let n1 = &task.per_node["n1"];
    assert_eq!(n1.status, NodeState::Uploaded, "{n1:?}");
    let artifact = Path::new(n1.path.as_deref().unwrap());
    let received = server.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].sha256, sha256_file(artifact), "bytes differ");

    // The preflight, the upload and the manifest's upload each asked for
    // a tunnel, and nothing else: no request in the clear.
    let tunnel = format!("CONNECT {}", server.addr);
    assert_eq!(proxy.requests(), [tunnel.clone(), tunnel.clone(), tunnel]);
    // Inside, TLS from the first byte (a handshake record), and none of
    // the request or the artifact in the clear.
    let sample = &received[0].head[4096..4096 + 64];
    let clear = |bytes: &[u8], needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    for (i, bytes) in proxy.tunneled().iter().enumerate() {
        assert_eq!(bytes.get(..2), Some(&[0x16, 0x03][..]), "tunnel {i}");
        assert!(
            !clear(bytes, b"Example+inc."),
            "tunnel {i}: the URL in clear"
        );
        assert!(!clear(bytes, sample), "tunnel {i}: the artifact in clear");
    }
    let upload = &proxy.tunneled()[1];
    assert!(
        upload.len() as u64 > received[0].size,
        "the body went through it"
    );
}

#[tokio::test]
async fn an_upload_host_the_node_does_not_trust_is_refused_in_words() {
    let server = UploadServer::start_tls().await;
    let certs = tempfile::tempdir().unwrap();
    let other = LocalCa::new("a CA that did not sign the server").unwrap();
    let other = pem_file(certs.path(), "other.pem", &other.pem());
    // n1 trusts the public roots only; n2 only a CA that did not sign the
    // server's certificate.
    let c = cluster(&["n1", "n2"], |config| match config.node.as_str() {
        "n1" => trusting(config, None, false),
        _ => trusting(config, Some(&other), true),
    })
    .await;
    let host = server.host_named("localhost");
    for node in ["n1", "n2"] {
        let admin = c.admin(node);
        let start = json!({"nodes": [node], "uploadHost": host, "customer": "Example inc.",
                           "ticket": "12345"});
        // The coordinator's preflight does not trust the host either.
        let (status, body) = start_json(&admin, start.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{node}: {body}");
        assert_eq!(
            body,
            json!({"_": format!("Unable to access '{host}/Example+inc./12345/' : {UNTRUSTED}")}),
            "{node}"
        );
        // Past the preflight, the node refuses it, and says why.
        let mut bypassed = start;
        bypassed["bypassReachabilityChecks"] = json!(true);
        let (status, body) = start_json(&admin, bypassed).await;
        assert_eq!(status, StatusCode::OK, "{node}: {body}");
        let task = wait_for_end(&admin, body["taskId"].as_str().unwrap()).await;
        let status = &task.per_node[node];
        assert_eq!(status.status, NodeState::FailedUpload, "{node}: {status:?}");
        assert_eq!(status.upload_status_code, None, "{node}");
        assert!(output(status).contains(UNTRUSTED), "{node}: {status:?}");
    }
    assert!(server.received().is_empty(), "nothing was sent");
}

#[tokio::test]
async fn the_upload_ca_file_is_reloaded_on_sighup() {
    let server = UploadServer::start_tls().await;
    let certs = tempfile::tempdir().unwrap();
    let other = LocalCa::new("a CA that did not sign the server").unwrap();
    // At first the node trusts only a CA that did not sign the server.
    let ca = pem_file(certs.path(), "ca.pem", &other.pem());
    let c = cluster(&["n1"], |config| trusting(config, Some(&ca), true)).await;
    let admin = c.admin("n1");
    let start = upload_to(&server.host_named("localhost"));
    // (Past the preflight, which refuses it too.)
    let bypassed = autocollect::client::StartOptions {
        bypass_reachability_checks: true,
        ..start.clone()
    };
    let refused = upload_and_wait(&admin, &bypassed).await;
    assert!(
        output(&refused.per_node["n1"]).contains(UNTRUSTED),
        "{refused:?}"
    );

    // The operator puts the right CA in the file and sends SIGHUP.
    std::fs::write(&ca, server.ca_pem()).unwrap();
    c.signal("n1", libc::SIGHUP);
    wait_for_log(&c, "n1", "[upload] ca_file reloaded").await;
    let task = upload_and_wait(&admin, &start).await;
    assert_eq!(task.per_node["n1"].status, NodeState::Uploaded, "{task:?}");
    assert_eq!(server.received().len(), 1);
}

#[tokio::test]
async fn a_bad_ca_file_stops_the_daemon_at_start_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    pem_file(dir.path(), "key.pem", "not a certificate\n");
    // Relative to the config file's directory.
    let (missing, key) = (dir.path().join("missing.pem"), dir.path().join("key.pem"));
    let cases = [
        (
            "ca_file = \"missing.pem\"",
            format!("upload.ca_file {}: cannot be read: ", missing.display()),
        ),
        (
            "ca_file = \"key.pem\"\nca_only = true",
            format!("upload.ca_file {}: holds no certificate", key.display()),
        ),
        (
            "ca_only = true",
            "upload.ca_only = true needs ca_file".to_string(),
        ),
    ];
    for (upload, want) in cases {
        let printed = serve_stops_with(dir.path(), &format!("[upload]\n{upload}")).await;
        assert!(printed.contains(&want), "{upload}: {printed}");
    }
}
