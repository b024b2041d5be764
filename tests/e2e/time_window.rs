//! The start request's time window (`since`, `until`): checked with
//! field-keyed errors, made absolute once by the node that took the
//! request (so every node gets the same window), handed to collectors,
//! and reported per node when a collector does not honour it.

use autocollect::coordinator::task::NodeState;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::*;

#[tokio::test]
async fn a_window_no_collector_honours_is_reported_per_node_and_is_the_same_everywhere() {
    let c = cluster(&["n1", "n2"], |_| {}).await;
    let admin = c.admin("n1");
    let (status, body) = start_json(
        &admin,
        json!({"nodes": ["n1", "n2"], "since": "2h", "until": "2030-01-01T00:00:00+01:00"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let task = wait_for_end(&admin, body["taskId"].as_str().unwrap()).await;
    let mut windows = Vec::new();
    for node in ["n1", "n2"] {
        let n = &task.per_node[node];
        assert_eq!(n.status, NodeState::Collected, "{n:?}");
        // The mock collector does not honour a time window: it says so.
        assert_eq!(n.ignored_parameters, ["since", "until"], "{n:?}");
        let manifest =
            std::path::Path::new(n.path.as_deref().unwrap()).with_file_name("manifest.json");
        let manifest: Value = serde_json::from_slice(&std::fs::read(manifest).unwrap()).unwrap();
        windows.push((
            manifest["parameters"]["since"].clone(),
            manifest["parameters"]["until"].clone(),
        ));
    }
    assert_eq!(windows[0], windows[1], "one window for the whole task");
    assert_eq!(windows[0].1, "2029-12-31T23:00:00Z", "UTC");
    let since = windows[0].0.as_str().unwrap();
    let since = chrono::DateTime::parse_from_rfc3339(since).unwrap();
    let ago = chrono::Utc::now().signed_duration_since(since);
    assert!(
        (7190..=7300).contains(&ago.num_seconds()),
        "since is two hours before the start: {ago:?}"
    );

    // Without a window nothing is reported ignored.
    let task = collect_once(&admin).await;
    assert!(task.per_node["n1"].ignored_parameters.is_empty());
}

#[tokio::test]
async fn a_bad_window_gets_field_keyed_errors() {
    let c = cluster(&["n1"], |_| {}).await;
    let admin = c.admin("n1");
    let expected = "Must be an RFC 3339 time such as 2026-11-29T10:00:00Z, or a duration before now such as 90s, 30m, 2h or 7d";
    for (params, want) in [
        (json!({"since": "yesterday"}), json!({"since": expected})),
        (
            json!({"since": "2h", "until": "5w"}),
            json!({"until": expected}),
        ),
        (json!({"since": "-3h"}), json!({"since": expected})),
        // Far past what a date can hold: an error, not a panic.
        (json!({"since": "315360000d"}), json!({"since": expected})),
        (
            json!({"since": "2026-11-29T10:00:00Z", "until": "2026-11-29T09:00:00Z"}),
            json!({"until": "Must be later than since"}),
        ),
    ] {
        let mut params = params;
        params["nodes"] = json!(["n1"]);
        let (status, body) = start_json(&admin, params.clone()).await;
        assert_eq!((status, body), (StatusCode::BAD_REQUEST, want), "{params}");
    }
    assert_eq!(admin.status().await.unwrap(), None, "nothing started");
}

#[tokio::test]
async fn the_cli_takes_a_window_and_shows_who_ignored_it() {
    let c = cluster(&["n1"], |_| {}).await;
    let run = autocollect_cli_on(&c, "n1", &["start", "--since", "30m", "--wait"]).await;
    let stdout = run.stdout;
    assert_eq!(run.code, 0, "{stdout}");
    assert!(
        stdout.contains(".zip (ignored by its collector: since)"),
        "{stdout}"
    );
}
