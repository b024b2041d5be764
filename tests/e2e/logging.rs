//! The daemon's logs: `--log-format json` (one JSON object per line) and
//! the HTTP access log (method, path, status, user, client, time), with
//! requests refused at sign-in included and no query string or password
//! in it.

use autocollect::cluster::{ADMIN_USER, NodeSpec, READER_USER};
use reqwest::StatusCode;
use serde_json::Value;

use crate::support::*;

#[tokio::test]
async fn json_logs_hold_an_access_line_for_every_request_refused_or_not() {
    let spec = NodeSpec {
        daemon_args: vec!["--log-format".into(), "json".into()],
        ..NodeSpec::loopback("n1")
    };
    let c = cluster_on(&[spec], |_| {}).await;
    let url = c.node("n1").url();
    let http = c.http_client(None);
    // Signed in, refused at sign-in, and anonymous.
    let task = collect_once(&c.admin("n1")).await;
    assert!(all_nodes(
        &task,
        autocollect::coordinator::task::NodeState::Collected
    ));
    let wrong = http
        .get(format!("{url}/collectLogs/status?wait=0"))
        .basic_auth(READER_USER, Some("not-the-password"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let health = http.get(format!("{url}/health")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    wait_for_log(&c, "n1", "\"path\":\"/health\"").await;

    let log = std::fs::read_to_string(&c.node("n1").log_path).unwrap();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let access: Vec<&Value> = lines.iter().filter(|l| l["target"] == "access").collect();
    let find = |path: &str, status: u64| {
        access
            .iter()
            .find(|l| l["path"] == path && l["status"] == status)
            .unwrap_or_else(|| panic!("no access line for {path} {status}: {access:?}"))
    };
    let start = find("/collectLogs/start", 200);
    assert_eq!(start["method"], "POST");
    assert_eq!(start["user"], ADMIN_USER);
    assert!(start["ms"].as_f64().unwrap() >= 0.0);
    assert!(start["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    let refused = find("/collectLogs/status", 401);
    assert_eq!(refused["user"], "-");
    assert_eq!(find("/health", 200)["user"], "-");
    // Node-to-node requests are logged too.
    assert!(
        access
            .iter()
            .any(|l| l["path"].as_str().unwrap().starts_with("/internal/"))
    );
    // Never a query string or a password.
    assert!(!log.contains("wait=0") && !log.contains("not-the-password"));
    assert!(!log.contains(&c.admin_password));
    // Other lines are JSON with their level and message.
    assert!(
        lines
            .iter()
            .any(|l| l["level"] == "INFO" && l["message"] == "listening")
    );
}
