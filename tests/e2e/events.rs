//! `GET /collectLogs/events`: every change of a real collection with
//! uploads, in order; a reconnect with `Last-Event-ID` loses nothing;
//! sign-in required.

use std::collections::BTreeMap;

use autocollect::client::{ApiClient, SseEvent};
use autocollect::cluster::READER_USER;
use autocollect::coordinator::task::{NodeState, TaskState, TaskStatus};
use reqwest::StatusCode;

use crate::support::*;
use crate::upload::upload_to;
use crate::upload_server::UploadServer;

fn uploads_over_http(config: &mut autocollect::config::Config) {
    config.upload.allow_http = true;
    set_option(config, "artifact-size", 300_000i64);
}

/// Every event, until the task `task_id` ends.
async fn read_until_end(
    stream: &mut autocollect::client::EventStream,
    task: &mut Option<TaskStatus>,
    events: &mut Vec<SseEvent>,
    stop_after: Option<usize>,
) {
    loop {
        let event = next_event(stream).await;
        event.apply(task).expect("a change of the task we hold");
        events.push(event);
        if task
            .as_ref()
            .is_some_and(|t| t.status != TaskState::Running)
        {
            return;
        }
        if stop_after.is_some_and(|n| events.len() >= n) {
            return;
        }
    }
}

/// Node states in the order the events gave them (repeats collapsed).
fn node_histories(events: &[SseEvent]) -> BTreeMap<String, Vec<String>> {
    let mut histories: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for e in events {
        let data = e.json();
        let nodes = match e.event.as_str() {
            "change" => data["nodes"].clone(),
            _ => data["task"]["perNode"].clone(),
        };
        for (node, status) in nodes.as_object().into_iter().flatten() {
            let state = status["status"].as_str().unwrap().to_string();
            let h = histories.entry(node.clone()).or_default();
            if h.last() != Some(&state) {
                h.push(state);
            }
        }
    }
    histories
}

#[tokio::test]
async fn events_follow_a_three_node_upload_in_order() {
    let server = UploadServer::start().await;
    let c = cluster(&["n1", "n2", "n3"], uploads_over_http).await;
    let reader = c.reader("n2");
    let mut stream = reader.events(None).await.expect("events open");
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.event, "snapshot");
    assert_eq!(first.json()["reason"], "connected");
    assert!(first.json()["task"].is_null(), "{}", first.data);

    let started = c
        .admin("n2")
        .start_with(&upload_to(&server.host()))
        .await
        .unwrap();
    let mut task = None;
    let mut events = Vec::new();
    read_until_end(&mut stream, &mut task, &mut events, None).await;

    assert_eq!(events[0].event, "started");
    let ids: Vec<u64> = events.iter().map(|e| e.id.expect("an id")).collect();
    assert_eq!(ids[0], started.version);
    for pair in ids.windows(2) {
        assert_eq!(pair[1], pair[0] + 1, "consecutive ids: {ids:?}");
    }
    // Small payloads: a change names only the nodes that changed.
    for e in &events[1..] {
        assert_eq!(e.event, "change", "{}", e.data);
        let nodes = e.json()["nodes"].as_object().unwrap().len();
        assert!(nodes <= 1, "{}", e.data);
    }
    let histories = node_histories(&events);
    for node in ["n1", "n2", "n3"] {
        let h: Vec<&str> = histories[node].iter().map(String::as_str).collect();
        let mut at = 0;
        for state in &h {
            let i = crate::couchbase::ORDER
                .iter()
                .position(|w| w == state)
                .expect("a known state");
            assert!(i >= at, "{node}: out of order: {h:?}");
            at = i;
        }
        assert_eq!(h.last(), Some(&"uploaded"), "{node}: {h:?}");
    }
    // Byte progress arrived during uploads.
    assert!(
        events.iter().any(|e| {
            e.json()["nodes"]
                .as_object()
                .into_iter()
                .flatten()
                .any(|(_, s)| s["status"] == "startedUpload" && s["progress"]["done"].is_u64())
        }),
        "no upload progress event"
    );
    // The task the events built is the task the status shows.
    let task = task.unwrap();
    let status = c.admin("n1").status().await.unwrap().unwrap();
    assert_eq!(task, status);
    assert!(all_nodes(&task, NodeState::Uploaded));
    assert_eq!(server.received().len(), 3);
}

#[tokio::test]
async fn a_reconnect_with_last_event_id_loses_nothing() {
    let server = UploadServer::start().await;
    let c = cluster(&["n1", "n2", "n3"], uploads_over_http).await;
    let reader = c.reader("n1");

    // The whole run, on one connection: the reference.
    let mut whole = reader.events(None).await.unwrap();
    whole.next().await.unwrap().unwrap(); // snapshot
    let whole = tokio::spawn(async move {
        let mut task = None;
        let mut events = Vec::new();
        read_until_end(&mut whole, &mut task, &mut events, None).await;
        (task, events)
    });
    // A second connection that goes away after a few events.
    let mut part = reader.events(None).await.unwrap();
    part.next().await.unwrap().unwrap();

    c.admin("n1")
        .start_with(&upload_to(&server.host()))
        .await
        .unwrap();
    let mut task = None;
    let mut first_part = Vec::new();
    read_until_end(&mut part, &mut task, &mut first_part, Some(3)).await;
    let last_id = first_part.last().unwrap().id;
    drop(part);
    // Let the task move on while nobody listens on that connection.
    wait_for(&c.admin("n1"), |t| {
        t.per_node
            .values()
            .any(|n| n.status != NodeState::Starting && n.status != NodeState::Started)
    })
    .await;
    let mut resumed = reader.events(last_id).await.unwrap();
    let mut rest = Vec::new();
    read_until_end(&mut resumed, &mut task, &mut rest, None).await;
    assert_ne!(
        rest[0].event, "snapshot",
        "resumed, not resent: {}",
        rest[0].data
    );

    let (reference_task, reference) = whole.await.unwrap();
    let ids = |events: &[SseEvent]| events.iter().map(|e| e.id).collect::<Vec<_>>();
    let mut joined = first_part.clone();
    joined.extend(rest);
    assert_eq!(ids(&joined), ids(&reference));
    let data = |events: &[SseEvent]| events.iter().map(|e| e.data.clone()).collect::<Vec<_>>();
    assert_eq!(data(&joined), data(&reference));
    assert_eq!(task, reference_task);

    // An id the ring does not hold (here: one from the future, as after
    // the daemon restarted): a snapshot says the client must start over.
    let current = reference_task.as_ref().unwrap().version;
    let mut stale = reader.events(Some(current + 1000)).await.unwrap();
    let e = stale.next().await.unwrap().unwrap();
    assert_eq!(e.event, "snapshot");
    assert_eq!(e.json()["reason"], "behind");
    assert_eq!(e.id, reference_task.as_ref().map(|t| t.version));
}

#[tokio::test]
async fn events_need_a_signed_in_user() {
    let c = cluster(&["n1"], |_| {}).await;
    let url = format!("{}/collectLogs/events", c.node("n1").url());
    let http = c.http_client(None);
    let response = http.get(&url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let response = http
        .get(&url)
        .basic_auth("admin", Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let mut stream = c.reader("n1").events(None).await.unwrap();
    assert_eq!(stream.next().await.unwrap().unwrap().event, "snapshot");
}

#[tokio::test]
async fn one_user_cannot_take_every_event_stream_of_a_node() {
    use autocollect::api::events::{MAX_EVENT_STREAMS, MAX_EVENT_STREAMS_PER_USER};
    const { assert!(MAX_EVENT_STREAMS_PER_USER < MAX_EVENT_STREAMS) };
    let c = cluster(&["n1"], |_| {}).await;
    let reader = c.reader("n1");
    let mut held = Vec::new();
    for _ in 0..MAX_EVENT_STREAMS_PER_USER {
        let mut stream = reader.events(None).await.unwrap();
        // Open for real: the snapshot came.
        assert_eq!(stream.next().await.unwrap().unwrap().event, "snapshot");
        held.push(stream);
    }
    let url = format!("{}/collectLogs/events", c.node("n1").url());
    let refused = c
        .http_client(None)
        .get(&url)
        .basic_auth(READER_USER, Some(&c.reader_password))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(refused.headers().contains_key("retry-after"));
    let body: serde_json::Value = refused.json().await.unwrap();
    assert!(
        body["_"]
            .as_str()
            .unwrap()
            .contains("the most one user may"),
        "{body}"
    );
    // Another user still gets one; and a stream given back is free again.
    let mut admin = c.admin("n1").events(None).await.unwrap();
    assert_eq!(admin.next().await.unwrap().unwrap().event, "snapshot");
    drop(held.pop());
    let mut again = wait_for_stream(&reader).await;
    assert_eq!(again.next().await.unwrap().unwrap().event, "snapshot");
}

/// A stream for `client` once the server has counted a closed one out
/// (it learns of the close when it next writes or reads the socket).
async fn wait_for_stream(client: &ApiClient) -> autocollect::client::EventStream {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        match client.events(None).await {
            Ok(stream) => return stream,
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "never freed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test]
async fn a_node_that_does_not_coordinate_relays_the_coordinators_events() {
    let c = cluster(&["n1", "n2", "n3"], |config| {
        set_option(config, "delay-ms", 1500i64);
    })
    .await;
    // The reference: n1's own stream, from before the start.
    let mut reference = c.reader("n1").events(None).await.unwrap();
    reference.next().await.unwrap().unwrap();
    let reference = tokio::spawn(async move {
        let (mut task, mut events) = (None, Vec::new());
        read_until_end(&mut reference, &mut task, &mut events, None).await;
        events
    });
    let started = c.admin("n1").start("all").await.unwrap();
    // n2 takes part: its stream follows n1's task.
    let n2 = c.reader("n2");
    wait_for(&n2, |t| t.task_id == started.task_id).await;
    let mut stream = n2.events(None).await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.event, "snapshot");
    assert_eq!(first.json()["reason"], "connected");
    let mut task = None;
    first.apply(&mut task).unwrap();
    assert_eq!(task.as_ref().unwrap().task_id, started.task_id);

    // Then n1's own small events, not snapshots: a few, a reconnect with
    // the last id, the rest.
    let mut relayed = Vec::new();
    read_until_end(&mut stream, &mut task, &mut relayed, Some(2)).await;
    drop(stream);
    let mut resumed = n2.events(relayed.last().unwrap().id).await.unwrap();
    read_until_end(&mut resumed, &mut task, &mut relayed, None).await;
    let reference = reference.await.unwrap();
    let after_snapshot: Vec<&SseEvent> = reference.iter().filter(|e| e.id > first.id).collect();
    assert_eq!(
        relayed
            .iter()
            .map(|e| (&e.event, e.id, &e.data))
            .collect::<Vec<_>>(),
        after_snapshot
            .iter()
            .map(|e| (&e.event, e.id, &e.data))
            .collect::<Vec<_>>(),
        "n2 relays exactly n1's events"
    );
    assert!(relayed.iter().all(|e| e.event == "change"));
    let status = c.reader("n1").status().await.unwrap().unwrap();
    assert_eq!(task.as_ref(), Some(&status));
    assert!(all_nodes(&status, NodeState::Collected), "{status:#?}");
}

#[tokio::test]
async fn a_stream_open_on_an_idle_node_follows_a_task_another_node_starts() {
    let c = cluster(&["n1", "n2"], |_| {}).await;
    // n2's console is open before anything runs.
    let mut stream = c.reader("n2").events(None).await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.json()["reason"], "connected");
    assert!(first.json()["task"].is_null());
    // n1 starts a collection on both: n2's stream switches to n1's events.
    let started = c.admin("n1").start("all").await.unwrap();
    let switched = next_event(&mut stream).await;
    assert_eq!(switched.event, "snapshot", "{}", switched.data);
    assert_eq!(switched.json()["reason"], "coordinator");
    let mut task = None;
    switched.apply(&mut task).unwrap();
    assert_eq!(task.as_ref().unwrap().task_id, started.task_id);
    let mut events = Vec::new();
    read_until_end(&mut stream, &mut task, &mut events, None).await;
    let status = c.reader("n1").status().await.unwrap().unwrap();
    assert_eq!(task, Some(status));
}

#[tokio::test]
async fn the_console_is_served_from_the_binary_with_a_strict_csp() {
    let c = cluster(&["n1"], |_| {}).await;
    let http = c.http_client(None);
    let base = c.node("n1").url();
    for (path, kind) in [
        ("/ui/", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/style.css", "text/css"),
    ] {
        let r = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        let header = |name: &str| {
            r.headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default()
        };
        assert!(header("content-type").starts_with(kind), "{path}");
        let csp = header("content-security-policy");
        assert!(csp.contains("default-src 'none'"), "{csp}");
        assert!(csp.contains("script-src 'self'"), "{csp}");
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        assert_eq!(header("x-content-type-options"), "nosniff");
    }
    let r = http.get(format!("{base}/ui")).send().await.unwrap();
    assert_eq!(r.url().path(), "/ui/");
    // Nothing from elsewhere: no absolute URL in the page or its script.
    let page = http.get(format!("{base}/ui/")).send().await.unwrap();
    let page = page.text().await.unwrap();
    for link in ["src=\"http", "href=\"http", "src=\"//", "href=\"//"] {
        assert!(!page.contains(link), "{link}");
    }
    // Who am I: the role the console shows its actions by.
    let (status, who) = c
        .reader("n1")
        .request(reqwest::Method::GET, "/whoami", None, true)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(who["roles"][0]["role"], "ro_admin");
    let r = http.get(format!("{base}/whoami")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}
