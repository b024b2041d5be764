//! Peers that lie, replay or hang: node-to-node input is checked like
//! public input, requests are signed and cannot be replayed, and no node
//! waits on a hung one for long (hangs are real: `SIGSTOP`).

use std::path::Path;
use std::time::{Duration, Instant};

use autocollect::coordinator::task::{NodeState, TaskState};
use autocollect::peer_auth;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::*;

/// A request to `node` signed as `signer` with the cluster's secret.
async fn signed(
    c: &TestCluster,
    node: &str,
    signer: &str,
    method: Method,
    path: &str,
    body: &Value,
) -> (StatusCode, Value) {
    let body = serde_json::to_vec(body).unwrap();
    let headers = peer_auth::sign(&c.secret, signer, &method, path, &body);
    let from = c.nodes.iter().any(|n| n.name == signer).then_some(signer);
    send(c, node, from, method, path, headers, body).await
}

/// Send a request to `node`, presenting the certificate of node `from`.
async fn send(
    c: &TestCluster,
    node: &str,
    from: Option<&str>,
    method: Method,
    path: &str,
    headers: Vec<(http::HeaderName, http::HeaderValue)>,
    body: Vec<u8>,
) -> (StatusCode, Value) {
    let mut request = c
        .http_client(from)
        .request(method, format!("{}{path}", c.node(node).url()))
        .header("content-type", "application/json")
        .body(body);
    for (k, v) in headers {
        request = request.header(k, v);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

const A_TASK: &str = "0123456789abcdef0123456789abcdef";

/// A session request from n1 to n2, signed, for `task` with
/// `coordinator` as its coordinator, as a plain request (no upgrade).
async fn n1_asks_n2_for_a_session(
    c: &TestCluster,
    task: &str,
    coordinator: &str,
) -> (StatusCode, Value) {
    let body = json!({"taskId": task, "coordinator": coordinator});
    signed(c, "n2", "n1", Method::POST, "/internal/v1/sessions", &body).await
}

/// The latest task `node` coordinated itself (the node-to-node view,
/// never forwarded), once `done` holds for it; long-polled.
async fn own_task_of(
    c: &TestCluster,
    node: &str,
    done: impl Fn(&autocollect::coordinator::task::TaskStatus) -> bool,
) -> autocollect::coordinator::task::TaskStatus {
    let deadline = Instant::now() + PATIENCE;
    let mut since = 0;
    loop {
        let path = format!("/internal/v1/tasks/latest?since={since}&wait=10");
        let (status, body) = signed(c, node, "n2", Method::GET, &path, &Value::Null).await;
        if status == StatusCode::OK {
            let task: autocollect::coordinator::task::TaskStatus =
                serde_json::from_value(body).expect("a task");
            if done(&task) {
                return task;
            }
            since = task.version;
        }
        assert!(Instant::now() < deadline, "{node}'s task never got there");
    }
}

/// Finding 3: a task id was used as a path (`remove_dir_all` on it, then
/// the collector's output written there).
#[tokio::test]
async fn a_task_id_from_a_peer_is_never_used_as_a_path() {
    let c = cluster(&["n1", "n2"], |_| {}).await;
    let victim = tempfile::tempdir().unwrap();
    std::fs::write(victim.path().join("keep.me"), "precious").unwrap();
    let victim_path = victim.path().display().to_string();
    let up = format!("../../../../../..{victim_path}");
    for bad in [
        victim_path.as_str(),
        up.as_str(),
        "t1",
        "0123456789ABCDEF0123456789ABCDEF",
    ] {
        let (status, body) = n1_asks_n2_for_a_session(&c, bad, "n1").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        let message = body["_"].as_str().unwrap();
        assert!(
            message.contains("a task id is 32 lowercase hexadecimal digits"),
            "{message}"
        );
    }
    for bad in ["../../victim", "/tmp/victim", "abc"] {
        let (status, body) = signed(
            &c,
            "n2",
            "n1",
            Method::POST,
            "/internal/v1/tasks/cancel",
            &json!({"taskId": bad}),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        let message = body["_"].as_str().unwrap();
        assert!(
            message.contains("a task id is 32 lowercase hexadecimal digits"),
            "{message}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(victim.path().join("keep.me")).unwrap(),
        "precious"
    );
    assert_eq!(std::fs::read_dir(victim.path()).unwrap().count(), 1);
    let health = c.admin("n2").health().await.unwrap();
    assert_eq!(health["session"], Value::Null);
}

/// Finding 6: a session naming an unknown coordinator was accepted, and
/// status and cancel on that node then panicked.
#[tokio::test]
async fn a_peers_wait_on_the_events_route_is_checked_before_use() {
    let c = cluster(&["n1", "n2"], |_| {}).await;
    for wait in ["NaN", "-1", "inf"] {
        let path = format!("/internal/v1/tasks/events?after=0&wait={wait}");
        let (status, body) = signed(&c, "n1", "n2", Method::GET, &path, &Value::Null).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{wait}: {body}");
        assert_eq!(body["wait"], "Must be a number of seconds, 0 or more");
    }
    // A wait in range still answers (nothing happened: no events).
    let path = "/internal/v1/tasks/events?after=0&wait=0.1";
    let (status, body) = signed(&c, "n1", "n2", Method::GET, path, &Value::Null).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, serde_json::json!({"kind": "events", "events": []}));
}

#[tokio::test]
async fn a_session_must_be_asked_for_by_its_own_coordinator() {
    let c = cluster(&["n1", "n2"], |_| {}).await;
    for coordinator in ["evil", "n2"] {
        let (status, body) = n1_asks_n2_for_a_session(&c, A_TASK, coordinator).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(body["coordinator"].is_string(), "{body}");
    }
    let (status, body) = signed(
        &c,
        "n2",
        "evil",
        Method::POST,
        "/internal/v1/sessions",
        &json!({"taskId": A_TASK, "coordinator": "evil"}),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        body,
        json!({"_": "node \"evil\" is not a node of this cluster"})
    );
    // Nothing was opened, and status and cancel answer normally.
    let admin = c.admin("n2");
    assert_eq!(admin.health().await.unwrap()["session"], Value::Null);
    assert_eq!(admin.status().await.unwrap(), None);
    let (status, _) = admin
        .request(Method::POST, "/collectLogs/cancel", None, true)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_captured_request_cannot_be_replayed_altered_or_sent_late() {
    let c = cluster(&["n1", "n2"], |_| {}).await;
    let path = "/internal/v1/tasks/cancel".to_string();
    let body = serde_json::to_vec(&json!({"taskId": A_TASK})).unwrap();
    let now = peer_auth::unix_now();
    let nonce = "00112233445566778899aabbccddeeff";
    let captured = peer_auth::sign_at(&c.secret, "n1", &Method::POST, &path, &body, now, nonce);
    // The genuine request: no such task, but it passes the checks.
    let (status, _) = send(
        &c,
        "n2",
        Some("n1"),
        Method::POST,
        &path,
        captured.clone(),
        body.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, answer) = send(
        &c,
        "n2",
        Some("n1"),
        Method::POST,
        &path,
        captured.clone(),
        body.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        answer,
        json!({"_": "replayed request (its nonce was already used)"})
    );
    // The same signature on another path, or with another body, is
    // refused.
    let (status, _) = send(
        &c,
        "n2",
        Some("n1"),
        Method::POST,
        "/internal/v1/settings",
        captured.clone(),
        body.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let other = serde_json::to_vec(&json!({"taskId": "ffffffffffffffffffffffffffffffff"})).unwrap();
    let (status, _) = send(&c, "n2", Some("n1"), Method::POST, &path, captured, other).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // A request signed two minutes ago is too old, whatever its nonce.
    let late = peer_auth::sign_at(
        &c.secret,
        "n1",
        &Method::POST,
        &path,
        &body,
        now - 120,
        "ffeeddccbbaa99887766554433221100",
    );
    let (status, answer) = send(&c, "n2", Some("n1"), Method::POST, &path, late, body).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        answer["_"]
            .as_str()
            .unwrap()
            .contains("off this node's clock"),
        "{answer}"
    );
}

/// Finding 5: with one node stopped, a start never returned.
#[tokio::test]
async fn a_start_with_a_hung_node_answers_in_time_and_the_others_collect() {
    let c = cluster(&["n1", "n2", "n3"], |_| {}).await;
    c.signal("n3", libc::SIGSTOP);
    let admin = c.admin("n1");
    let asked = Instant::now();
    let started = admin.start("all").await.expect("start answers");
    let took = asked.elapsed();
    assert!(took < Duration::from_secs(10), "start took {took:?}");
    let n3 = &started.per_node["n3"];
    assert_eq!(n3.status, NodeState::Failed);
    // Stopped, n3's kernel still accepts TCP, but nothing answers the
    // TLS handshake that connecting includes.
    let output = n3.collection_output.as_deref().unwrap_or_default();
    assert!(
        output.starts_with("cannot connect to n3 at ")
            && output.ends_with(": no TLS connection within 5 s (nothing accepted it, or the TLS handshake got no answer)"),
        "{output}"
    );
    let task = wait_for_end(&admin, &started.task_id).await;
    assert_eq!(task.per_node["n1"].status, NodeState::Collected);
    assert_eq!(task.per_node["n2"].status, NodeState::Collected);

    // Resumed, n3 holds no stale lock: the next collection takes all.
    c.signal("n3", libc::SIGCONT);
    assert_eq!(
        c.admin("n3").wait_idle(10.0).await.unwrap()["session"],
        Value::Null
    );
    let again = admin.start("all").await.unwrap();
    let again = wait_for_end(&admin, &again.task_id).await;
    assert!(all_nodes(&again, NodeState::Collected), "{again:?}");
}

/// Finding 5: with the coordinator stopped mid-collection, the other
/// nodes held their lock and their jobs for good.
#[tokio::test]
async fn nodes_let_go_of_a_hung_coordinator_and_the_cluster_moves_on() {
    let c = cluster(&["n1", "n2", "n3"], |config| {
        set_option(config, "delay-ms", 120_000i64);
    })
    .await;
    let admin = c.admin("n1");
    let started = admin.start("all").await.unwrap();
    wait_for(&admin, |t| all_nodes(t, NodeState::Started)).await;
    c.signal("n1", libc::SIGSTOP);

    // Within 15 s, n2 and n3 stop their jobs and release their locks.
    let hung = Instant::now();
    for node in ["n2", "n3"] {
        let health = c.admin(node).wait_idle(15.0).await.unwrap();
        assert_eq!(
            health["session"],
            Value::Null,
            "{node} still holds its lock"
        );
        assert!(!job_dir(&c, node, &started.task_id).exists());
    }
    assert!(
        hung.elapsed() < Duration::from_secs(15),
        "{:?}",
        hung.elapsed()
    );

    // Status on n2 says where the trouble is, in time.
    let asked = Instant::now();
    let (status, body) = c
        .admin("n2")
        .request(Method::GET, "/collectLogs/status", None, true)
        .await
        .unwrap();
    assert!(asked.elapsed() < Duration::from_secs(10));
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        body,
        json!({"_": "Cannot reach the coordinating node n1: n1 did not answer within 5 s"})
    );
    // A new collection can start from n2 without the hung node.
    let asked = Instant::now();
    let second = c
        .admin("n2")
        .start("n2,n3")
        .await
        .expect("n2 can coordinate");
    assert!(asked.elapsed() < Duration::from_secs(10));
    wait_for(&c.admin("n2"), |t| {
        t.task_id == second.task_id && all_nodes(t, NodeState::Started)
    })
    .await;
    c.admin("n2").cancel().await.unwrap();

    // Resumed, n1 reports why its nodes stopped (its own job still runs).
    // Public status on n1 may now show n2's newer task (n1 may still have
    // taken n2's session request, stale as it was, and let it go): ask n1
    // for the task it coordinates itself.
    c.signal("n1", libc::SIGCONT);
    let task = own_task_of(&c, "n1", |t| {
        t.task_id == started.task_id
            && ["n2", "n3"]
                .iter()
                .all(|n| t.per_node[*n].status.is_finished())
    })
    .await;
    for node in ["n2", "n3"] {
        let status = &task.per_node[node];
        assert_eq!(status.status, NodeState::Failed, "{node}: {status:?}");
        let output = status.collection_output.as_deref().unwrap();
        assert!(
            output.starts_with(&format!(
                "{node} stopped its job: no word from coordinator n1 for"
            )),
            "{output}"
        );
    }
}

/// Finding 5: results complete before a coordinator stall were reported
/// as heartbeat failures once it resumed.
#[tokio::test]
async fn a_node_that_finished_before_a_coordinator_stall_is_reported_as_it_finished() {
    let c = cluster(&["n1", "n2"], |config| {
        set_option(config, "delay-ms", 1_000i64);
    })
    .await;
    let admin = c.admin("n1");
    let started = admin.start("n2").await.unwrap();
    // n2 has its job (a second's work) before n1 stops.
    wait_for(&admin, |t| t.per_node["n2"].status == NodeState::Started).await;
    c.signal("n1", libc::SIGSTOP);
    // n2 finishes while n1 sleeps, then lets go of the session.
    let health = c.admin("n2").wait_idle(20.0).await.unwrap();
    assert_eq!(health["session"], Value::Null);
    c.signal("n1", libc::SIGCONT);

    let task = wait_for_end(&admin, &started.task_id).await;
    assert_ended(&task, TaskState::Completed);
    let n2 = &task.per_node["n2"];
    assert_eq!(n2.status, NodeState::Collected, "{n2:?}");
    assert!(Path::new(n2.path.as_deref().unwrap()).is_file());
}

/// An HTTPS GET over std sockets and rustls, trusting the cluster CA
/// (for use inside a network namespace, where the async runtime's
/// sockets are not).
fn blocking_get(c: &TestCluster, addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let roots = autocollect::tls::read_roots(&c.ca_file).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(autocollect::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tls = rustls::ClientConnection::new(std::sync::Arc::new(config), addr.ip().into())
        .expect("a TLS client");
    let tcp = std::net::TcpStream::connect(addr).expect("connect");
    let mut stream = rustls::StreamOwned::new(tls, tcp);
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: n\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = Vec::new();
    // The server may close without a TLS close_notify after its answer.
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// Finding 5: a node cut off from its coordinator kept its lock for the
/// whole partition. A real one here: the node runs in its own network
/// namespace, and the link to it is cut (packets dropped, no reset).
#[tokio::test]
async fn a_node_cut_off_from_its_coordinator_lets_go_of_its_lock() {
    // .ci/setup installs iproute2; CI runs as root. A machine that cannot
    // make a namespace fails this test rather than skipping it.
    let ns = crate::netns::Netns::create()
        .unwrap_or_else(|why| panic!("this test needs a network namespace: {why}"));
    let specs = [
        autocollect::cluster::NodeSpec {
            name: "n1".into(),
            ip: ns.host_ip,
            netns: None,
            daemon_args: Vec::new(),
            launcher: Vec::new(),
        },
        autocollect::cluster::NodeSpec {
            name: "n2".into(),
            ip: ns.ns_ip,
            netns: Some(ns.path()),
            daemon_args: Vec::new(),
            launcher: Vec::new(),
        },
    ];
    let c = cluster_on(&specs, |config| set_option(config, "delay-ms", 120_000i64)).await;
    let admin = c.admin("n1");
    let started = admin.start("all").await.unwrap();
    wait_for(&admin, |t| all_nodes(t, NodeState::Started)).await;

    ns.partition();
    let cut = Instant::now();
    // Seen from inside its namespace, n2 stops its job and lets go.
    let n2 = c.node("n2").addr;
    let health = ns.run_in(|| blocking_get(&c, n2, "/health?waitIdle=20"));
    assert!(health.contains("\"session\":null"), "{health}");
    assert!(
        cut.elapsed() < Duration::from_secs(15),
        "{:?}",
        cut.elapsed()
    );
    assert!(!job_dir(&c, "n2", &started.task_id).exists());

    // The coordinator reports it lost, and goes on.
    let task = wait_for(&admin, |t| t.per_node["n2"].status.is_finished()).await;
    let n2 = &task.per_node["n2"];
    assert_eq!(n2.status, NodeState::Failed);
    assert!(
        n2.collection_output
            .as_deref()
            .unwrap()
            .starts_with("lost contact with n2"),
        "{n2:?}"
    );
    admin.cancel().await.unwrap();
}

/// Open a session on `node` as coordinator `n1` by hand (plain HTTP/1.1,
/// upgraded): the connection, and the opening request's nonce that its
/// command lines are bound to.
async fn session_by_hand(
    c: &TestCluster,
    node: &str,
    task: &str,
) -> (tokio::net::TcpStream, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let path = "/internal/v1/sessions";
    let body = serde_json::to_vec(&json!({"taskId": task, "coordinator": "n1"})).unwrap();
    let signed = peer_auth::sign(&c.secret, "n1", &Method::POST, path, &body);
    let nonce = peer_auth::nonce_of(&signed).to_string();
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nhost: {node}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: upgrade\r\nupgrade: {}\r\n",
        body.len(),
        autocollect::protocol::SESSION_PROTOCOL
    );
    for (name, value) in signed {
        head.push_str(&format!("{name}: {}\r\n", value.to_str().unwrap()));
    }
    head.push_str("\r\n");
    let mut stream = tokio::net::TcpStream::connect(c.node(node).addr)
        .await
        .unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body).await.unwrap();
    // The answer's head, byte by byte so that no event line is taken.
    let mut answer = Vec::new();
    while !answer.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(stream.read(&mut byte).await.unwrap(), 1, "{answer:?}");
        answer.push(byte[0]);
    }
    let answer = String::from_utf8(answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 101 "), "{answer}");
    (stream, nonce)
}

/// Read `stream` to its end (the node closed the session), within the
/// test's patience; returns what came.
async fn until_closed(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut all = Vec::new();
    // Closed with our line unread, the connection may end in a reset.
    let _ = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut all))
        .await
        .expect("the node closes the session");
    String::from_utf8_lossy(&all).into_owned()
}

/// A session's commands are lines on its own connection, each signed and
/// numbered: one that is forged, replayed or out of order ends the
/// session there (the node lets go of it, and runs nothing it asked).
#[tokio::test]
async fn a_forged_or_replayed_session_command_ends_the_session() {
    use tokio::io::AsyncWriteExt;
    let c = cluster(&["n1", "n2"], |config| {
        config.tls = Some(autocollect::config::TlsSetting::Off);
    })
    .await;
    let n2 = c.admin("n2");
    let ping = r#"{"command":"ping"}"#;
    let job = r#"{"command":"job","parameters":{}}"#;

    // A genuine ping passes; the same line again is a replay.
    let (mut stream, nonce) = session_by_hand(&c, "n2", A_TASK).await;
    assert_eq!(n2.health().await.unwrap()["session"], A_TASK);
    let mut signer = peer_auth::LineSigner::new(&c.secret, &nonce);
    let line = signer.line(ping);
    stream.write_all(line.as_bytes()).await.unwrap();
    stream.write_all(line.as_bytes()).await.unwrap();
    let said = until_closed(&mut stream).await;
    assert!(said.contains(r#"{"event":"heartbeat"}"#), "{said}");
    assert_eq!(n2.wait_idle(10.0).await.unwrap()["session"], Value::Null);

    // A job signed with another secret, or with another session's nonce,
    // or unsigned, or a line too long to be a command: the session ends,
    // and no job ever starts.
    let forgeries = [
        peer_auth::LineSigner::new("not the cluster secret", &nonce).line(job),
        peer_auth::LineSigner::new(&c.secret, "00112233445566778899aabbccddeeff").line(job),
        format!("{job}\n"),
        // Over the 64 KiB a command line may take.
        format!("{}\n", "x".repeat(100 << 10)),
    ];
    for forged in forgeries {
        let task = format!("{:032x}", rand::random::<u128>());
        let (mut stream, _) = session_by_hand(&c, "n2", &task).await;
        // The node may close before it has read it all (the long line).
        let _ = stream.write_all(forged.as_bytes()).await;
        let said = until_closed(&mut stream).await;
        assert!(!said.contains("started"), "{forged}: {said}");
        assert_eq!(n2.wait_idle(10.0).await.unwrap()["session"], Value::Null);
        assert!(!job_dir(&c, "n2", &task).exists(), "{forged}");
    }
}

/// A session request that does not ask for this version's session
/// protocol (an older or newer coordinator) is refused, naming the one
/// this node speaks; nothing is held.
#[tokio::test]
async fn a_session_in_another_protocol_is_refused_with_the_one_this_node_speaks() {
    let c = cluster(&["n1", "n2"], |_| {}).await;
    let (status, body) = n1_asks_n2_for_a_session(&c, A_TASK, "n1").await;
    assert_eq!(status, StatusCode::UPGRADE_REQUIRED, "{body}");
    let message = body["_"].as_str().unwrap();
    assert!(
        message.contains("autocollect-session/1")
            && message.contains("run the same autocollect version on every node"),
        "{message}"
    );
    assert_eq!(
        c.admin("n2").health().await.unwrap()["session"],
        Value::Null
    );
}
