//! TLS on the daemon's API: node identity by certificate, certificate
//! reload on SIGHUP, plain HTTP only where allowed, and the clients'
//! `--cacert` / `--no-ssl-verify`.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use autocollect::cluster::{LocalCluster, NodeSpec};
use autocollect::config::TlsSetting;
use autocollect::coordinator::task::{NodeState, TaskState};
use autocollect::peer_auth;
use autocollect::tls::certs::{self, NodeHost};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::*;

const A_TASK: &str = "0123456789abcdef0123456789abcdef";

fn on(name: &str, last: u8) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        ip: IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)),
        netns: None,
        daemon_args: Vec::new(),
        launcher: Vec::new(),
    }
}

/// A node-to-node request to `node`, signed as `signer` with the cluster
/// secret, over a connection presenting `client` (a reqwest client with
/// or without a certificate).
async fn signed_as(
    c: &TestCluster,
    client: &reqwest::Client,
    node: &str,
    signer: &str,
) -> Result<(StatusCode, Value), reqwest::Error> {
    let path = "/internal/v1/tasks/cancel";
    let body = serde_json::to_vec(&json!({ "taskId": A_TASK })).unwrap();
    let headers = peer_auth::sign(&c.secret, signer, &Method::POST, path, &body);
    let mut request = client
        .post(format!("{}{path}", c.node(node).url()))
        .header("content-type", "application/json")
        .body(body);
    for (k, v) in headers {
        request = request.header(k, v);
    }
    let response = request.send().await?;
    let status = response.status();
    Ok((status, response.json().await.unwrap_or(Value::Null)))
}

#[tokio::test]
async fn a_node_is_its_certificate_and_cannot_speak_for_another() {
    // Each node on its own address, so each certificate names one node.
    let c = cluster_on(&[on("n1", 1), on("n2", 2), on("n3", 3)], |_| {}).await;

    // n1 signing as n1 with its own certificate: accepted (n2 has no such
    // task, which is the answer to a genuine request).
    let as_n1 = c.http_client(Some("n1"));
    let (status, _) = signed_as(&c, &as_n1, "n2", "n1").await.unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);

    // n3 holds the cluster secret, but its certificate is its own.
    let as_n3 = c.http_client(Some("n3"));
    let (status, body) = signed_as(&c, &as_n3, "n2", "n1").await.unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        body,
        json!({"_": "the client certificate is not n1's: it is not valid for 127.0.0.1, the host of n1's [nodes] entry"})
    );

    // No certificate at all.
    let (status, body) = signed_as(&c, &c.http_client(None), "n2", "n1")
        .await
        .unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        body["_"]
            .as_str()
            .unwrap()
            .starts_with("node-to-node requests must present the node's TLS client certificate"),
        "{body}"
    );

    // A certificate for the right address from another CA fails the
    // handshake itself.
    let other = tempfile::tempdir().unwrap();
    let foreign = certs::init(
        other.path(),
        &[NodeHost {
            name: "n1".into(),
            host: "127.0.0.1".into(),
        }],
    )
    .unwrap();
    let mut pem = std::fs::read(&foreign.nodes[0].cert_file).unwrap();
    pem.extend(std::fs::read(&foreign.nodes[0].key_file).unwrap());
    let ca = std::fs::read(&c.ca_file).unwrap();
    let impostor = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .identity(reqwest::Identity::from_pem(&pem).unwrap())
        .build()
        .unwrap();
    assert!(signed_as(&c, &impostor, "n2", "n1").await.is_err());

    // The cluster itself works across the three identities.
    let task = collect_once(&c.admin("n2")).await;
    assert!(all_nodes(&task, NodeState::Collected), "{task:?}");
}

/// The DER of the certificate `node` serves on a new connection.
async fn served_certificate(c: &TestCluster, node: &str) -> Vec<u8> {
    let stream = tls_connect(c, node).await;
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn first_cert_der(path: &Path) -> Vec<u8> {
    autocollect::tls::read_certs(path).unwrap()[0].to_vec()
}

#[tokio::test]
async fn certificates_are_reloaded_on_sighup_without_dropping_a_running_collection() {
    let c = cluster(&["n1", "n2"], |config| {
        set_option(config, "delay-ms", 4_000i64)
    })
    .await;
    let certs_dir = c.ca_file.parent().unwrap().to_path_buf();
    let n2_cert = certs_dir.join("n2.pem");
    let before = first_cert_der(&n2_cert);
    assert_eq!(served_certificate(&c, "n2").await, before);

    let admin = c.admin("n1");
    let started = admin.start("all").await.unwrap();
    wait_for(&admin, |t| all_nodes(t, NodeState::Started)).await;

    // A broken file is refused: the node keeps serving what it had.
    let saved = std::fs::read(&n2_cert).unwrap();
    std::fs::write(&n2_cert, "not a certificate").unwrap();
    c.signal("n2", libc::SIGHUP);
    wait_for_log(&c, "n2", "TLS certificates not reloaded").await;
    assert_eq!(served_certificate(&c, "n2").await, before);
    std::fs::write(&n2_cert, saved).unwrap();

    // Rotate n2's certificate (same CA), then SIGHUP.
    certs::init(
        &certs_dir,
        &[NodeHost {
            name: "n2".into(),
            host: "127.0.0.1".into(),
        }],
    )
    .unwrap();
    let after = first_cert_der(&n2_cert);
    assert_ne!(after, before);
    c.signal("n2", libc::SIGHUP);
    wait_for_log(&c, "n2", "TLS certificates reloaded").await;
    assert_eq!(served_certificate(&c, "n2").await, after);
    let running = admin.status().await.unwrap().unwrap();
    assert_eq!(
        (running.task_id.as_str(), running.status),
        (started.task_id.as_str(), TaskState::Running),
        "the reload happened while the collection ran"
    );

    // The collection that ran through the reload ends well, and the next
    // one reaches n2 on its new certificate.
    let task = wait_for_end(&admin, &started.task_id).await;
    assert_ended(&task, TaskState::Completed);
    assert!(all_nodes(&task, NodeState::Collected), "{task:?}");
    let next = collect_once(&admin).await;
    assert!(all_nodes(&next, NodeState::Collected), "{next:?}");
}

#[tokio::test]
async fn plain_http_is_refused_off_loopback_unless_explicitly_allowed() {
    let exe = Path::new(env!("CARGO_BIN_EXE_autocollect"));
    let anywhere = NodeSpec {
        name: "n1".into(),
        ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        netns: None,
        daemon_args: Vec::new(),
        launcher: Vec::new(),
    };
    let dir = tempfile::tempdir().unwrap();
    let refused = LocalCluster::launch_on(exe, dir.path(), std::slice::from_ref(&anywhere), |c| {
        c.tls = Some(TlsSetting::Off)
    })
    .await
    .err()
    .expect("the daemon refuses to start");
    let message = format!("{refused:#}");
    assert!(
        message.contains(
            "tls = \"off\" serves plain HTTP, which is allowed on a loopback address only"
        ),
        "{message}"
    );

    let dir = tempfile::tempdir().unwrap();
    let allowed = LocalCluster::launch_on(exe, dir.path(), &[anywhere], |c| {
        c.tls = Some(TlsSetting::Off);
        c.allow_plaintext = true;
    })
    .await
    .expect("allowed explicitly");
    assert!(allowed.node("n1").url().starts_with("http://"));
    let log = std::fs::read_to_string(&allowed.node("n1").log_path).unwrap();
    assert!(log.contains("serving plain HTTP"), "{log}");
}

#[tokio::test]
async fn a_plaintext_cluster_on_loopback_collects_and_says_it_is_plaintext() {
    let c = cluster(&["n1", "n2"], |config| config.tls = Some(TlsSetting::Off)).await;
    assert!(c.node("n1").url().starts_with("http://"));
    let task = collect_once(&c.admin("n2")).await;
    assert!(all_nodes(&task, NodeState::Collected), "{task:?}");
    let log = std::fs::read_to_string(&c.node("n1").log_path).unwrap();
    assert!(
        log.contains("WARN") && log.contains("serving plain HTTP"),
        "{log}"
    );
}

#[tokio::test]
async fn a_node_whose_certificate_is_not_trusted_is_reported_in_words() {
    let other = tempfile::tempdir().unwrap();
    let foreign = certs::init(other.path(), &[]).unwrap();
    let c = cluster(&["n1", "n2"], |config| {
        // n1 trusts another CA for the nodes it calls.
        if config.node == "n1"
            && let Some(TlsSetting::On(files)) = &mut config.tls
        {
            files.ca_file = Some(foreign.ca_file.clone());
        }
    })
    .await;
    let admin = c.admin("n1");
    let started = admin.start("n2").await.unwrap();
    let task = wait_for_end(&admin, &started.task_id).await;
    let output = task.per_node["n2"].collection_output.clone().unwrap();
    assert!(
        output.contains("its TLS certificate is not accepted (is it signed by the CA of [tls] ca_file, and valid for 127.0.0.1?)"),
        "{output}"
    );
}

#[tokio::test]
async fn the_cli_checks_the_certificate_with_cacert_or_not_at_all_when_told() {
    let c = cluster(&["n1"], |_| {}).await;
    let url = c.node("n1").url();
    let ca = c.ca_file.display().to_string();
    let base = ["status", "--url", &url, "-p", &c.admin_password];

    let run = autocollect_cli(&[&base[..], &["--cacert", &ca]].concat()).await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("no collection has run yet"),
        "{}",
        run.stdout
    );

    // The public roots do not know the cluster CA.
    let run = autocollect_cli(&base).await;
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("certificate"), "{}", run.stderr);

    let run = autocollect_cli(&[&base[..], &["--no-ssl-verify"]].concat()).await;
    assert_eq!(run.code, 0, "{}", run.stderr);

    // couchbase-cli's form: -c HOST:PORT (https assumed) with --cacert.
    let addr = c.node("n1").addr.to_string();
    let password = c.admin_password.clone();
    let cb = [
        "collect-logs-status",
        "-c",
        &addr,
        "-u",
        "admin",
        "-p",
        &password,
    ];
    let run = autocollect_cli(&[&cb[..], &["--cacert", &ca]].concat()).await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert_eq!(run.stdout, "No log collection tasks were found\n");
    let https = format!("https://{addr}");
    let cb = [
        "collect-logs-status",
        "-c",
        &https,
        "-u",
        "admin",
        "-p",
        &password,
    ];
    let run = autocollect_cli(&[&cb[..], &["--no-ssl-verify"]].concat()).await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);

    // A --cacert that is no certificate is said so.
    let run = autocollect_cli(&[&base[..], &["--cacert", "/etc/hostname"]].concat()).await;
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("no PEM certificate"), "{}", run.stderr);
}

#[tokio::test]
async fn a_plain_http_request_to_a_tls_node_is_told_to_use_https() {
    let c = cluster(&["n1"], |_| {}).await;
    let url = format!("http://{}/collectLogs/status", c.node("n1").addr);
    let response = reqwest::get(&url).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"_": "This node serves HTTPS: use an https:// URL (with --cacert for a private CA)"})
    );
    // And the CLI given http:// shows that message.
    let run = autocollect_cli(&[
        "status",
        "--url",
        &format!("http://{}", c.node("n1").addr),
        "-p",
        "x",
    ])
    .await;
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("This node serves HTTPS"),
        "{}",
        run.stderr
    );
}

#[tokio::test]
async fn certs_init_makes_a_ca_and_node_certificates_with_private_keys_kept_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let certs_arg = certs.display().to_string();
    let run = autocollect_cli(&[
        "certs",
        "init",
        "--nodes",
        "n1=10.0.0.1:9101,n2=db2.example.com",
        "--dir",
        &certs_arg,
    ])
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("# made a cluster CA"), "{}", run.stdout);
    let n1 = certs.join("n1.pem");
    assert!(
        run.stdout.contains(&format!(
            "# n1's config\n[tls]\ncert_file = {:?}\n",
            n1.display().to_string()
        )),
        "{}",
        run.stdout
    );
    let mode = |name: &str| {
        std::fs::metadata(certs.join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("ca-key.pem"), 0o600);
    assert_eq!(mode("n1-key.pem"), 0o600);
    assert_eq!(mode("n2-key.pem"), 0o600);
    assert_eq!(mode("n1.pem"), 0o644);
    let n1 = &autocollect::tls::read_certs(&n1).unwrap()[0];
    assert!(autocollect::tls::cert_is_valid_for(n1, "10.0.0.1"));

    let run = autocollect_cli(&["certs", "init", "--nodes", "n3", "--dir", &certs_arg]).await;
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("expected NAME=HOST"), "{}", run.stderr);
}

/// A coordinator opens a connection to every node per task (the task's
/// session). From its second task on, the TLS handshakes resume from
/// session tickets instead of verifying and signing with certificates
/// again: each node counts them in its metrics.
#[tokio::test]
async fn a_coordinators_next_task_resumes_its_tls_sessions_with_every_node() {
    let c = cluster_on(&[on("n1", 1), on("n2", 2), on("n3", 3)], |_| {}).await;
    let admin = c.admin("n1");
    for _ in 0..2 {
        let task = collect_once(&admin).await;
        assert!(all_nodes(&task, NodeState::Collected), "{task:?}");
    }
    for node in ["n2", "n3"] {
        let (status, body) = c
            .reader(node)
            .request(Method::GET, "/metrics", None, true)
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK);
        let text = body.as_str().unwrap();
        let resumed = text
            .lines()
            .find_map(|l| l.strip_prefix("autocollect_tls_handshakes_total{kind=\"resumed\"} "))
            .unwrap_or_else(|| panic!("{node}: no resumed handshakes counted in\n{text}"));
        assert!(
            resumed.parse::<u64>().unwrap() >= 1,
            "{node}: the second task's session did not resume:\n{text}"
        );
    }
}
