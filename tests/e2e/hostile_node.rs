//! A node in hostile hands (or a buggy one), as its coordinator sees it:
//! the events on its session are checked against the protocol.
//! A node cannot move its state back, report what its phase cannot have
//! done, or grow the task by repeating itself: it is failed, with the
//! reason, and told to stop. One that floods progress costs the
//! coordinator a parse per line, not a task version per line. One that
//! never ends its phase is failed at the coordinator's limit for it.
//!
//! The fake nodes here take the coordinator's sessions themselves (plain
//! HTTP/1.1 upgraded to the session protocol, as when TLS is off), and
//! answer its commands with the events each test scripts.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use autocollect::config::TlsSetting;
use autocollect::coordinator::task::{NodeState, TaskState, TaskStatus};
use autocollect::protocol::{NodeEvent, SESSION_PROTOCOL, SessionCommand};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::routing::{get, post};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::support::*;

#[derive(Clone)]
struct Fake {
    /// What the node sends once it is told to start its job.
    script: Arc<Vec<NodeEvent>>,
    /// What it sends once it is told to upload.
    upload_script: Arc<Vec<NodeEvent>>,
    /// `cancel` commands received.
    cancels: Arc<AtomicUsize>,
}

/// A fake node listening on loopback: its address and its count of
/// `cancel` commands. It lives as long as the test's runtime.
async fn fake_node(script: Vec<NodeEvent>) -> (SocketAddr, Arc<AtomicUsize>) {
    fake_uploading_node(script, Vec::new()).await
}

/// A fake node that also answers `upload` with `upload_script`.
async fn fake_uploading_node(
    script: Vec<NodeEvent>,
    upload_script: Vec<NodeEvent>,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let fake = Fake {
        script: Arc::new(script),
        upload_script: Arc::new(upload_script),
        cancels: Arc::default(),
    };
    let cancels = fake.cancels.clone();
    let app = Router::new()
        .route("/internal/v1/sessions", post(open_session))
        .route("/health", get(|| async { "{}" }))
        .with_state(fake);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, cancels)
}

/// A session's connection, as a fake node holds it once upgraded.
type SessionIo = hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>;

/// Take the session `request` asks for: answer `101`, and hand the
/// connection, once upgraded, to `serve`.
fn take_session<F, Fut>(mut request: Request, serve: F) -> axum::response::Response
where
    F: FnOnce(SessionIo) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let upgrade = request
        .extensions_mut()
        .remove::<hyper::upgrade::OnUpgrade>()
        .expect("the coordinator opens sessions over HTTP/1.1");
    tokio::spawn(async move {
        serve(hyper_util::rt::TokioIo::new(upgrade.await.unwrap())).await;
    });
    axum::response::Response::builder()
        .status(101)
        .header("connection", "upgrade")
        .header("upgrade", SESSION_PROTOCOL)
        .body(Body::empty())
        .unwrap()
}

/// The coordinator's commands on a session, read without checking their
/// signatures (`SEQ MAC JSON` lines); lines that are not one are skipped.
fn commands(
    read: tokio::io::ReadHalf<SessionIo>,
) -> impl futures::Stream<Item = SessionCommand> + Unpin {
    let parse = |line: Result<String, _>| {
        let line: String = line.ok()?;
        serde_json::from_str(line.splitn(3, ' ').nth(2)?).ok()
    };
    tokio_util::codec::FramedRead::new(read, tokio_util::codec::LinesCodec::new())
        .filter_map(move |line| futures::future::ready(parse(line)))
}

/// The session: the connection upgraded, a heartbeat every 100 ms (so
/// the node is never lost for silence), and a script when a command asks
/// for one. Command lines are read without checking their signatures.
async fn open_session(State(fake): State<Fake>, request: Request) -> axum::response::Response {
    take_session(request, |connection| async move {
        let (read, mut write) = tokio::io::split(connection);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let beat = tx.clone();
        tokio::spawn(async move {
            while beat.send(NodeEvent::Heartbeat).is_ok() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let writer = tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                let line = serde_json::to_string(&event).unwrap() + "\n";
                if write.write_all(line.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
        // Whatever ends the session (`close`, the coordinator gone), the
        // connection closes with both its halves.
        let _writer = AbortOnDrop(writer);
        let mut commands = commands(read);
        while let Some(command) = commands.next().await {
            let script = match command {
                SessionCommand::Job { .. } => &fake.script,
                SessionCommand::Upload { .. } => &fake.upload_script,
                SessionCommand::Cancel => {
                    fake.cancels.fetch_add(1, Ordering::SeqCst);
                    continue;
                }
                SessionCommand::Close => return,
                SessionCommand::Ping => continue,
            };
            for event in script.iter() {
                let _ = tx.send(event.clone());
            }
        }
    })
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn started() -> NodeEvent {
    NodeEvent::Started { plugin: None }
}

fn collected() -> NodeEvent {
    NodeEvent::Collected {
        path: "/var/lib/autocollect/results/x.zip".into(),
        size: 1,
        summary: "done".into(),
        sha256: None,
        partial: None,
        ignored: Vec::new(),
    }
}

fn upload_started() -> NodeEvent {
    NodeEvent::UploadStarted {
        url: "http://127.0.0.1:9/Example+inc./12345/x.zip".into(),
        plugin: None,
    }
}

/// Collect from `nodes` (comma-separated) with an upload to a host no
/// fake reaches (they only say what they do), and wait for the end.
async fn collect_and_upload(c: &TestCluster, nodes: &str) -> TaskStatus {
    let admin = c.admin("n1");
    let started = admin
        .start_with(&autocollect::client::StartOptions {
            nodes: nodes.into(),
            upload_host: Some("http://127.0.0.1:9".into()),
            customer: Some("Example inc.".into()),
            ticket: Some("12345".into()),
            bypass_reachability_checks: true,
            ..Default::default()
        })
        .await
        .unwrap();
    wait_for_end(&admin, &started.task_id).await
}

/// A cluster of `n1` (a real daemon, coordinating) and the fake `nodes`.
async fn with_fakes(nodes: &[(&str, SocketAddr)]) -> TestCluster {
    cluster(&["n1"], |config| {
        config.tls = Some(TlsSetting::Off);
        for (name, addr) in nodes {
            config.nodes.insert(name.to_string(), addr.to_string());
        }
    })
    .await
}

#[tokio::test]
async fn a_node_that_breaks_the_protocol_is_failed_told_to_stop_and_cannot_grow_the_task() {
    // Starts again and again (each start used to add to its plugin list,
    // without end); reports an upload while it collects; collects, then
    // claims to have started again.
    let mut restarts = vec![started(); 10_000];
    restarts.push(collected());
    let uploads = vec![
        started(),
        NodeEvent::Uploaded {
            url: "https://uploads.example.com/x.zip".into(),
            bytes_sent: 1,
        },
    ];
    let (restarting, restarting_cancels) = fake_node(restarts).await;
    let (uploading, uploading_cancels) = fake_node(uploads).await;
    let c = with_fakes(&[("restarts", restarting), ("uploads", uploading)]).await;
    let admin = c.admin("n1");

    let task = collect_once(&admin).await;
    assert_eq!(task.status, TaskState::Completed);
    assert_eq!(task.per_node["n1"].status, NodeState::Collected);
    for (node, sent, state) in [
        ("restarts", "started", "started"),
        ("uploads", "uploaded", "started"),
    ] {
        let status = &task.per_node[node];
        assert_eq!(status.status, NodeState::Failed, "{node}: {status:?}");
        assert_eq!(
            status.collection_output.as_deref(),
            Some(
                format!("{node} broke the node-to-node protocol: it sent `{sent}` while `{state}`")
                    .as_str()
            ),
        );
        assert!(status.plugins.len() <= 1, "{node}: {:?}", status.plugins);
        assert_eq!(status.url, None, "{node}: nothing was uploaded");
    }
    // Both were told to stop whatever they run.
    assert_eq!(restarting_cancels.load(Ordering::SeqCst), 1);
    assert_eq!(uploading_cancels.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_node_that_breaks_the_protocol_while_uploading_fails_its_upload() {
    let (liar, cancels) = fake_uploading_node(
        vec![started(), collected()],
        // A collect phase's event, in the upload phase.
        vec![upload_started(), started()],
    )
    .await;
    let c = cluster(&["n1"], |config| {
        config.tls = Some(TlsSetting::Off);
        config.upload.allow_http = true;
        config.nodes.insert("liar".into(), liar.to_string());
    })
    .await;
    let task = collect_and_upload(&c, "liar").await;
    let status = &task.per_node["liar"];
    assert_eq!(status.status, NodeState::FailedUpload, "{status:?}");
    assert_eq!(
        status.upload_output.as_deref(),
        Some("liar broke the node-to-node protocol: it sent `started` while `startedUpload`")
    );
    assert_eq!(cancels.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_node_that_floods_progress_costs_a_parse_per_line_and_its_last_report_stands() {
    const REPORTS: u64 = 20_000;
    let mut script = vec![started()];
    script.extend((1..=REPORTS).map(|done| NodeEvent::Progress {
        done,
        total: REPORTS,
        message: format!("item {done}"),
    }));
    script.push(collected());
    let (flooding, _) = fake_node(script).await;
    let c = with_fakes(&[("floods", flooding)]).await;
    let admin = c.admin("n1");

    let started = admin.start("all").await.unwrap();
    let task = wait_for_end(&admin, &started.task_id).await;
    assert_eq!(task.status, TaskState::Completed);
    let node = &task.per_node["floods"];
    assert_eq!(node.status, NodeState::Collected);
    // The last report is applied before the state it precedes.
    let progress = node.progress.as_ref().expect("its progress");
    assert_eq!((progress.done, progress.total), (REPORTS, REPORTS));
    assert_eq!(progress.message, format!("item {REPORTS}"));
    // Every applied change is a new version of the task (and an event to
    // every console): a few per node, not one per line.
    let changes = task.version - started.version;
    assert!(
        changes < 1_000,
        "{changes} versions of the task for {REPORTS} progress lines"
    );
}

#[tokio::test]
async fn a_nodes_answer_is_read_only_up_to_its_bound() {
    // Refuses the session (busy) with a reason of 1 GiB.
    let app = Router::new().route(
        "/internal/v1/sessions",
        post(|| async {
            let chunk = Bytes::from(vec![b' '; 1 << 20]);
            let body =
                futures::stream::iter(std::iter::repeat_n(chunk, 1024).map(Ok::<_, Infallible>));
            axum::response::Response::builder()
                .status(409)
                .header("content-type", "application/json")
                .body(Body::from_stream(body))
                .unwrap()
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let c = with_fakes(&[("verbose", addr)]).await;
    let admin = c.admin("n1");

    let task = collect_once(&admin).await;
    assert_eq!(task.per_node["n1"].status, NodeState::Collected);
    let verbose = &task.per_node["verbose"];
    assert_eq!(verbose.status, NodeState::Failed);
    assert_eq!(
        verbose.collection_output.as_deref(),
        Some("verbose sent an answer over 65536 bytes")
    );
    let pid = c.node("n1").pid().expect("the coordinator runs");
    let peak = peak_rss_kib(pid) >> 10;
    assert!(peak < 256, "the coordinator's peak RSS: {peak} MiB");
}

/// A node that keeps its session alive (heartbeats) but never ends its
/// collection, or its upload, does not hold the task, and with it the
/// cluster's one collection, until an admin cancels: past the
/// coordinator's limit for the phase it is failed, with the reason, and
/// told to stop, and the task ends.
#[tokio::test]
async fn a_node_that_never_ends_its_phase_is_failed_at_the_coordinators_limit() {
    let (endless, endless_cancels) = fake_node(vec![started()]).await;
    let (stuck, stuck_cancels) =
        fake_uploading_node(vec![started(), collected()], vec![upload_started()]).await;
    let c = cluster(&["n1"], |config| {
        config.tls = Some(TlsSetting::Off);
        config.upload.allow_http = true;
        config.coordinator.max_collect_secs = Some(1.0);
        config.coordinator.max_upload_secs = Some(1.5);
        config.nodes.insert("endless".into(), endless.to_string());
        config.nodes.insert("stuck".into(), stuck.to_string());
    })
    .await;
    let task = collect_and_upload(&c, "endless,stuck").await;
    assert_eq!(task.status, TaskState::Completed, "{task:?}");

    let endless = &task.per_node["endless"];
    assert_eq!(endless.status, NodeState::Failed, "{endless:?}");
    assert_eq!(
        endless.collection_output.as_deref(),
        Some(
            "endless did not end its collection within 1 s (coordinator.max_collect_secs), \
             and was told to stop"
        )
    );
    assert_eq!(endless_cancels.load(Ordering::SeqCst), 1);

    let stuck = &task.per_node["stuck"];
    assert_eq!(stuck.status, NodeState::FailedUpload, "{stuck:?}");
    assert_eq!(
        stuck.upload_output.as_deref(),
        Some(
            "stuck did not end its upload within 1.5 s (coordinator.max_upload_secs), \
             and was told to stop"
        )
    );
    assert_eq!(stuck_cancels.load(Ordering::SeqCst), 1);
}

/// A node that does not carry out a command says why on its session,
/// and the coordinator fails it with that reason. A node of an older
/// version, which answers a session with its event stream instead of
/// switching protocols, is failed with what to do about it.
#[tokio::test]
async fn a_refused_job_and_an_older_node_fail_with_the_reason() {
    let refusal = NodeEvent::Refused {
        command: "job".into(),
        message: "logDir: not an allowed directory on this node".into(),
    };
    let (refusing, cancels) = fake_node(vec![refusal]).await;
    let app = Router::new().route(
        "/internal/v1/sessions",
        post(|| async {
            let line = Bytes::from_static(b"{\"event\":\"heartbeat\"}\n");
            axum::response::Response::builder()
                .header("content-type", "application/x-ndjson")
                .body(Body::from_stream(futures::stream::iter([Ok::<
                    _,
                    Infallible,
                >(
                    line
                )])))
                .unwrap()
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let older = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let c = with_fakes(&[("refusing", refusing), ("older", older)]).await;

    let task = collect_once(&c.admin("n1")).await;
    assert_eq!(task.per_node["n1"].status, NodeState::Collected);
    let refusing = &task.per_node["refusing"];
    assert_eq!(refusing.status, NodeState::Failed, "{refusing:?}");
    assert_eq!(
        refusing.collection_output.as_deref(),
        Some(
            "could not start the job: refusing refused `job`: \
             logDir: not an allowed directory on this node"
        )
    );
    assert_eq!(cancels.load(Ordering::SeqCst), 0);
    let older = &task.per_node["older"];
    assert_eq!(older.status, NodeState::Failed, "{older:?}");
    assert_eq!(
        older.collection_output.as_deref(),
        Some(
            "older does not speak this node's session protocol (autocollect-session/1): \
             it answered 200 OK without switching protocols (an older version?); \
             run the same autocollect version on every node"
        )
    );
}

/// How much a chatty node sent, and whether a write of it ever waited a
/// second (its coordinator was not reading).
struct Chatter {
    sent: Arc<AtomicUsize>,
    blocked: Arc<std::sync::atomic::AtomicBool>,
}

/// A node that sends a 32 KiB heartbeat line every millisecond from the
/// moment its session opens until it closes, and collects at once when
/// told to. Its coordinator must read all of it: what it leaves unread
/// backs up in the connection within a second, and a real node that
/// cannot write for a lease lets go of its lock.
async fn chatty_node() -> (SocketAddr, Chatter) {
    let chatter = Chatter {
        sent: Arc::default(),
        blocked: Arc::default(),
    };
    let (sent, blocked) = (chatter.sent.clone(), chatter.blocked.clone());
    let app = Router::new().route(
        "/internal/v1/sessions",
        post(move |request: Request| {
            let (sent, blocked) = (sent.clone(), blocked.clone());
            async move {
                take_session(request, |connection| async move {
                    let (read, mut write) = tokio::io::split(connection);
                    let (tx, mut rx) = mpsc::unbounded_channel::<NodeEvent>();
                    let padding = "x".repeat(32 << 10);
                    let chatter = tokio::spawn(async move {
                        loop {
                            let mut lines = String::new();
                            while let Ok(event) = rx.try_recv() {
                                lines += &(serde_json::to_string(&event).unwrap() + "\n");
                            }
                            lines +=
                                &format!("{{\"event\":\"heartbeat\",\"padding\":\"{padding}\"}}\n");
                            let write = write.write_all(lines.as_bytes());
                            match tokio::time::timeout(Duration::from_secs(1), write).await {
                                Ok(Ok(())) => sent.fetch_add(lines.len(), Ordering::SeqCst),
                                Ok(Err(_)) => return,
                                Err(_) => return blocked.store(true, Ordering::SeqCst),
                            };
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    });
                    let _chatter = AbortOnDrop(chatter);
                    let mut commands = commands(read);
                    while let Some(command) = commands.next().await {
                        match command {
                            SessionCommand::Job { .. } => {
                                let _ = tx.send(started());
                                let _ = tx.send(collected());
                            }
                            SessionCommand::Close => return,
                            _ => {}
                        }
                    }
                })
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, chatter)
}

/// A session is read for the whole task: while its node waits for a
/// collection slot (one at a time here, behind a real node's 3 s
/// collection), and once its node is done while another still collects.
/// Unread, the chatty node's lines fill the connection within a second.
#[tokio::test]
async fn a_session_is_read_while_its_node_waits_for_a_slot_and_once_it_is_done() {
    let (chatty, chatter) = chatty_node().await;
    let c = cluster(&["n1"], |config| {
        config.tls = Some(TlsSetting::Off);
        config.coordinator.collection_concurrency = 1;
        set_option(config, "delay-ms", 3_000i64);
        config.nodes.insert("chatty".into(), chatty.to_string());
    })
    .await;
    let task = collect_once(&c.admin("n1")).await;
    assert_eq!(task.status, TaskState::Completed, "{task:?}");
    assert!(all_nodes(&task, NodeState::Collected), "{task:?}");
    assert!(
        !chatter.blocked.load(Ordering::SeqCst),
        "the coordinator stopped reading the chatty node's session"
    );
    let sent = chatter.sent.load(Ordering::SeqCst);
    assert!(
        sent > 16 << 20,
        "only {sent} bytes sent: the test proved nothing"
    );
}
