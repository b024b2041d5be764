//! Couchbase's own routes: `/controller/startLogsCollection`,
//! `/controller/cancelLogsCollection` and the task list
//! `/pools/default/tasks`, answered as ns_server answers them.

use autocollect::client::{ApiClient, RequestBody};
use autocollect::coordinator::task::{NodeState, TaskState};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::proxy_server::ProxyServer;
use crate::support::*;
use crate::upload_server::UploadServer;

async fn post_form(admin: &ApiClient, path: &str, pairs: &[(&str, &str)]) -> (StatusCode, Value) {
    let form = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    admin
        .request(Method::POST, path, Some(RequestBody::Form(form)), true)
        .await
        .unwrap()
}

async fn start(admin: &ApiClient, pairs: &[(&str, &str)]) -> (StatusCode, Value) {
    post_form(admin, "/controller/startLogsCollection", pairs).await
}

async fn tasks(client: &ApiClient) -> Value {
    let (status, body) = client
        .request(Method::GET, "/pools/default/tasks", None, true)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

#[tokio::test]
async fn a_collection_started_by_the_controller_route_shows_in_the_task_list() {
    let server = UploadServer::start().await;
    let c = cluster(&["n1", "n2"], |config| {
        config.upload.allow_http = true;
    })
    .await;
    let admin = c.admin("n1");
    assert_eq!(tasks(&c.reader("n1")).await, json!([]), "no task yet");

    let host = server.host();
    let (status, body) = start(
        &admin,
        &[
            ("nodes", "*"),
            ("uploadHost", &host),
            ("customer", "Example inc."),
            ("ticket", "12345"),
        ],
    )
    .await;
    assert_eq!((status, body), (StatusCode::OK, json!([])));
    let task = wait_for(&admin, |t| t.status != TaskState::Running).await;
    assert_ended(&task, TaskState::Completed);

    // Any node answers, with Couchbase's fields only.
    let list = tasks(&c.reader("n2")).await;
    let mut per_node = serde_json::Map::new();
    for node in ["n1", "n2"] {
        let status = &task.per_node[node];
        assert_eq!(status.status, NodeState::Uploaded);
        per_node.insert(
            node.into(),
            json!({"status": "uploaded", "path": status.path, "url": status.url}),
        );
    }
    assert_eq!(
        list,
        json!([{
            "type": "clusterLogsCollection",
            "node": "n1",
            "status": "completed",
            "progress": 100,
            "ts": task.ts,
            "perNode": per_node,
        }])
    );
}

#[tokio::test]
async fn a_running_collection_is_listed_with_the_controller_cancel_route_and_cancelled_by_it() {
    let c = cluster(&["n1", "n2"], |config| {
        set_option(config, "delay-ms", 60_000i64);
    })
    .await;
    let admin = c.admin("n2");
    let (status, _) = start(&admin, &[("nodes", "n1")]).await;
    assert_eq!(status, StatusCode::OK);
    wait_for(&admin, |t| all_nodes(t, NodeState::Started)).await;

    let list = tasks(&c.reader("n1")).await;
    assert_eq!(
        list[0]["cancelURI"],
        json!("/controller/cancelLogsCollection")
    );
    assert_eq!(list[0]["status"], json!("running"));
    assert_eq!(list[0]["perNode"], json!({"n1": {"status": "started"}}));
    assert!(list[0]["recommendedRefreshPeriod"].is_number(), "{list}");

    let (status, body) = post_form(&c.admin("n1"), "/controller/cancelLogsCollection", &[]).await;
    assert_eq!((status, body), (StatusCode::OK, json!([])));
    let list = tasks(&c.reader("n1")).await;
    assert_eq!(list[0]["status"], json!("cancelled"), "{list}");
    assert_eq!(list[0].get("cancelURI"), None);
    // Nothing running: still 200 [].
    let (status, body) = post_form(&admin, "/controller/cancelLogsCollection", &[]).await;
    assert_eq!((status, body), (StatusCode::OK, json!([])));
}

#[tokio::test]
async fn the_controller_route_takes_an_upload_proxy_per_request() {
    let server = UploadServer::start().await;
    let proxy = ProxyServer::start().await;
    let proxy_address = proxy.addr.to_string();
    let c = cluster(&["n1"], |config| {
        config.upload.allow_http = true;
        config.upload.allowed_proxies = vec![proxy_address.clone()];
    })
    .await;
    let admin = c.admin("n1");
    let host = server.host();
    let (status, body) = start(
        &admin,
        &[
            ("nodes", "*"),
            ("uploadHost", &host),
            ("customer", "acme"),
            ("uploadProxy", &proxy_address),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let task = wait_for(&admin, |t| t.status != TaskState::Running).await;
    assert_eq!(task.per_node["n1"].status, NodeState::Uploaded);
    let requests = proxy.requests();
    assert_eq!(requests[0], format!("HEAD {host}/acme/"), "{requests:?}");
    assert_eq!(
        requests[1],
        format!("CONNECT {}", server.addr),
        "{requests:?}"
    );
    assert_eq!(server.received().len(), 1);
}

#[tokio::test]
async fn the_controller_route_answers_errors_as_ns_server_does() {
    let c = cluster(&["n1"], |config| {
        set_option(config, "delay-ms", 60_000i64);
    })
    .await;
    let admin = c.admin("n1");
    let cases: Vec<(Vec<(&str, &str)>, Value)> = vec![
        (
            vec![("nodes", "ghost")],
            json!({"nodes": "Unknown nodes: [\"ghost\"]"}),
        ),
        (vec![], json!({"nodes": "Please select at least one node."})),
        (
            vec![("nodes", "*"), ("bypassReachabilityChecks", "maybe")],
            json!({"bypassReachabilityChecks": "must be true or false"}),
        ),
        (
            vec![("nodes", "*"), ("uploadProxy", "proxy:3128")],
            json!({"uploadProxy": "uploadProxy is only used with uploadHost"}),
        ),
        (
            vec![
                ("nodes", "*"),
                ("uploadHost", "uploads.example.com"),
                ("customer", "a"),
                ("uploadProxy", "socks5://proxy:1080"),
                ("bypassReachabilityChecks", "true"),
            ],
            json!({"uploadProxy": "The proxy must be an http:// URL (http://[user:password@]host:port)"}),
        ),
        (
            vec![
                ("nodes", "*"),
                ("uploadHost", "h"),
                ("customer", "bad/name"),
            ],
            json!({"customer": "must contain only [A-Za-z0-9._ -] and be no longer than 50 characters"}),
        ),
        (
            vec![
                ("nodes", "*"),
                ("uploadHost", "h"),
                ("customer", "a"),
                ("ticket", "12a"),
            ],
            json!({"ticket": "must contain only [0-9] and be no longer than 7 characters"}),
        ),
        (
            vec![("nodes", "*"), ("uploadHost", "h")],
            json!({"customer": "customer must be given if upload host or ticket is given"}),
        ),
        (
            vec![("nodes", "*"), ("customer", "a")],
            json!({"uploadHost": "upload host must be given if customer or ticket is given"}),
        ),
        (
            vec![("nodes", "*"), ("uploadHost", " "), ("customer", "a")],
            json!({"uploadHost": "cannot be empty"}),
        ),
        (
            vec![("nodes", "*"), ("logRedactionLevel", "full")],
            json!({"logRedactionLevel": "The value must be one of the following: [none,partial]"}),
        ),
        (
            vec![("nodes", "*"), ("logRedactionSalt", "pepper")],
            json!({"logRedactionSalt": "logRedactionSalt is only used with logRedactionLevel=partial"}),
        ),
        (
            vec![("nodes", "*"), ("tmpDir", "tmp")],
            json!({"tmpDir": "Must be an absolute path"}),
        ),
        (
            vec![("nodes", "*"), ("logDir", "logs")],
            json!({"logDir": "Must be an absolute path"}),
        ),
        (
            vec![("from", "allnodes")],
            json!({"from": "Unknown parameter (known: nodes, uploadHost, customer, ticket, uploadProxy, logDir, tmpDir, logRedactionLevel, logRedactionSalt, bypassReachabilityChecks, taskRegexp, encryptionPassword)"}),
        ),
    ];
    for (pairs, want) in cases {
        let (status, body) = start(&admin, &pairs).await;
        assert_eq!(
            (status, &body),
            (StatusCode::BAD_REQUEST, &want),
            "{pairs:?}"
        );
    }

    let (status, _) = start(&admin, &[("nodes", "*")]).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = start(&admin, &[("nodes", "*")]).await;
    assert_eq!(
        (status, body),
        (
            StatusCode::BAD_REQUEST,
            json!({"_": "Logs collection task is already started"})
        )
    );
    // A read-only user may list tasks but not start.
    let (status, _) = start(&c.reader("n1"), &[("nodes", "*")]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    admin.cancel().await.unwrap();
}

#[tokio::test]
async fn starts_and_cancels_are_audited_without_their_secrets() {
    let c = cluster(&["n1"], |config| {
        set_option(config, "delay-ms", 60_000i64);
    })
    .await;
    let admin = c.admin("n1");
    let (status, _) = start(
        &admin,
        &[
            ("nodes", "*"),
            ("uploadProxy", "http://ops:s3cret@proxy:3128"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // couchbase-cli's --encryption-password (a known secret) beside a
    // misspelled salt (unknown: the start is refused): both recorded by
    // name only.
    let (status, _) = start(
        &admin,
        &[
            ("nodes", "*"),
            ("encryptionPassword", "hunter2"),
            ("logredactionsalt", "cayenne"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = start(
        &admin,
        &[
            ("nodes", "*"),
            ("logRedactionLevel", "partial"),
            ("logRedactionSalt", "pepper"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let task = admin.cancel().await.unwrap().unwrap();

    let log = std::fs::read_to_string(c.node("n1").data_dir.join("audit.log")).unwrap();
    for secret in ["s3cret", "pepper", "hunter2", "cayenne"] {
        assert!(!log.contains(secret), "{secret} in {log}");
    }
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "{log}");
    let pick = |l: &Value| {
        json!({"user": l["user"], "action": l["action"], "route": l["route"],
               "result": l["result"], "params": l["params"], "taskId": l["taskId"]})
    };
    assert_eq!(
        lines.iter().map(pick).collect::<Vec<_>>(),
        [
            json!({"user": "admin", "action": "start",
                   "route": "/controller/startLogsCollection", "result": "refused",
                   "params": {"nodes": "*", "uploadProxy": "http://*****@proxy:3128"},
                   "taskId": null}),
            json!({"user": "admin", "action": "start",
                   "route": "/controller/startLogsCollection", "result": "refused",
                   "params": {"nodes": "*", "encryptionPassword": "*****",
                              "logredactionsalt": "*****"},
                   "taskId": null}),
            json!({"user": "admin", "action": "start",
                   "route": "/controller/startLogsCollection", "result": "accepted",
                   "params": {"nodes": "*", "logRedactionLevel": "partial",
                              "logRedactionSalt": "*****"},
                   "taskId": task.task_id}),
            json!({"user": "admin", "action": "cancel", "route": "/collectLogs/cancel",
                   "result": "accepted", "params": null, "taskId": task.task_id}),
        ]
    );
    assert!(
        lines[0]["error"].as_str().unwrap().starts_with("400 "),
        "{log}"
    );
}

#[tokio::test]
async fn the_default_redaction_level_is_set_once_for_the_whole_cluster() {
    let c = cluster(&["n1", "n2"], |_| {}).await;
    let get = |node: &str| {
        let reader = c.reader(node);
        async move {
            reader
                .request(Method::GET, "/settings/logRedaction", None, true)
                .await
                .unwrap()
        }
    };
    assert_eq!(
        get("n1").await,
        (StatusCode::OK, json!({"logRedactionLevel": "none"}))
    );
    let set = |client: ApiClient, level: &'static str| async move {
        post_form(
            &client,
            "/settings/logRedaction",
            &[("logRedactionLevel", level)],
        )
        .await
    };
    assert_eq!(
        set(c.admin("n2"), "secret").await,
        (
            StatusCode::BAD_REQUEST,
            json!({"logRedactionLevel": "The value must be one of the following: [none,partial]"})
        )
    );
    assert_eq!(
        set(c.reader("n2"), "partial").await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        set(c.admin("n2"), "partial").await,
        (StatusCode::OK, json!({"logRedactionLevel": "partial"}))
    );
    // Every node has it, and a start that does not say uses it.
    assert_eq!(
        get("n1").await,
        (StatusCode::OK, json!({"logRedactionLevel": "partial"}))
    );
    let admin = c.admin("n1");
    let (status, _) = start(&admin, &[("nodes", "*")]).await;
    assert_eq!(status, StatusCode::OK);
    let task = wait_for(&admin, |t| t.status != TaskState::Running).await;
    for node in ["n1", "n2"] {
        let path = task.per_node[node].path.as_deref().unwrap();
        assert!(path.ends_with("-redacted.zip"), "{node}: {path}");
    }
}

#[tokio::test]
async fn pools_answer_what_couchbase_cli_reads_and_its_node_names_are_accepted() {
    let c = cluster(&["n1", "n2"], |_| {}).await;
    let reader = c.reader("n2");
    let (status, pools) = reader
        .request(Method::GET, "/pools", None, true)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        pools["pools"],
        json!([{"name": "default", "uri": "/pools/default"}])
    );
    let version = pools["implementationVersion"].as_str().unwrap();
    assert!(version.starts_with("8.0.0-autocollect-"), "{version}");
    assert_eq!(pools["isEnterprise"], json!(true));

    let (_, pool) = reader
        .request(Method::GET, "/pools/default", None, true)
        .await
        .unwrap();
    // What couchbase-cli's server-list and host-list read, too.
    let expected: Vec<Value> = ["n1", "n2"]
        .iter()
        .map(|n| {
            let address = c.node(n).addr.to_string();
            json!({"otpNode": format!("{n}@127.0.0.1"),
                   "hostname": address, "configuredHostname": address,
                   "status": "healthy", "clusterMembership": "active",
                   "thisNode": *n == "n2", "ports": {}})
        })
        .collect();
    assert_eq!(pool["nodes"], json!(expected));

    // couchbase-cli sends the otpNode names it found there.
    let admin = c.admin("n1");
    let (status, body) = start(&admin, &[("nodes", "n2@127.0.0.1")]).await;
    assert_eq!((status, body), (StatusCode::OK, json!([])));
    let task = wait_for(&admin, |t| t.status != TaskState::Running).await;
    assert_eq!(task.per_node.keys().collect::<Vec<_>>(), ["n2"]);

    // A node that does not answer is listed, unhealthy.
    let mut c = c;
    c.kill("n1");
    let (_, pool) = reader
        .request(Method::GET, "/pools/default", None, true)
        .await
        .unwrap();
    assert_eq!(pool["nodes"][0]["status"], "unhealthy", "{pool}");
    assert_eq!(pool["nodes"][1]["status"], "healthy", "{pool}");
}

#[tokio::test]
async fn concurrent_pool_requests_share_one_round_of_probes() {
    // n1 does not answer: at its address, a listener that takes
    // connections and says nothing, so each probe of n1 waits out its 2 s.
    // (Bound before the cluster starts: a dead daemon's port, bound again
    // later, can meanwhile be taken by any other test's socket.)
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let n1 = silent.local_addr().unwrap();
    let c = cluster(&["n2"], |config| {
        config.nodes.insert("n1".into(), n1.to_string());
    })
    .await;
    let probes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = probes.clone();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(socket);
        }
    });
    let reader = c.reader("n2");
    // Signed in once, so the 40 requests below do not queue on argon2.
    reader
        .request(Method::GET, "/pools", None, true)
        .await
        .unwrap();
    let asks = (0..40).map(|_| reader.request(Method::GET, "/pools/default", None, true));
    for answer in futures::future::join_all(asks).await {
        let (status, pool) = answer.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(pool["nodes"][0]["status"], "unhealthy", "{pool}");
        assert_eq!(pool["nodes"][1]["status"], "healthy", "{pool}");
    }
    // Without sharing, 40 probes; requests that arrived while a round ran
    // take its answer (allow a round for stragglers).
    let rounds = probes.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (1..=2).contains(&rounds),
        "{rounds} probes of n1 for 40 requests"
    );
    hold.abort();
}

/// Couchbase's order of a node's states in a collection with upload.
pub(crate) const ORDER: [&str; 6] = [
    "starting",
    "started",
    "collected",
    "startingUpload",
    "startedUpload",
    "uploaded",
];

#[tokio::test]
async fn the_task_list_follows_every_node_through_its_states_in_order() {
    let server = UploadServer::start().await;
    // Each upload takes a while, one node uploads at a time: the second
    // node visibly waits (startingUpload) while the first uploads.
    server.script([crate::upload_server::Reply::Slow(std::time::Duration::from_millis(300)); 2]);
    let c = cluster(&["n1", "n2"], |config| {
        config.upload.allow_http = true;
        set_option(config, "delay-ms", 300i64);
    })
    .await;
    let admin = c.admin("n1");
    let host = server.host();
    let (status, _) = start(
        &admin,
        &[("nodes", "*"), ("uploadHost", &host), ("customer", "acme")],
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    // At every change of the task, read the task list as a Couchbase
    // client would, and record each node's state when it changes.
    let mut seen: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let mut version = 0;
    loop {
        let path = format!("/collectLogs/status?since={version}&wait=30");
        let (_, task) = admin.request(Method::GET, &path, None, true).await.unwrap();
        version = task["version"].as_u64().unwrap();
        let list = tasks(&admin).await;
        for (node, status) in list[0]["perNode"].as_object().unwrap() {
            let state = status["status"].as_str().unwrap().to_string();
            let states = seen.entry(node.clone()).or_default();
            if states.last() != Some(&state) {
                states.push(state);
            }
        }
        if list[0]["status"] != "running" {
            assert_eq!(list[0]["status"], "completed", "{list}");
            break;
        }
    }
    let mut waited_for_a_slot = false;
    for (node, states) in &seen {
        // In Couchbase's order, never backwards, ending uploaded.
        let positions: Vec<usize> = states
            .iter()
            .map(|s| ORDER.iter().position(|o| o == s).expect("a known state"))
            .collect();
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]),
            "{node}: {states:?}"
        );
        for must in ["started", "startedUpload", "uploaded"] {
            assert!(states.iter().any(|s| s == must), "{node}: {states:?}");
        }
        waited_for_a_slot |= states.iter().any(|s| s == "startingUpload");
    }
    assert!(
        waited_for_a_slot,
        "one node waited for the upload slot: {seen:?}"
    );
}
