//! `GET /metrics`: Prometheus' text format, for API users only, checked
//! by `promtool check metrics` on a real scrape after a collection.

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::support::*;

/// The value of the sample `series` (name and labels exactly as written).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn metrics_are_valid_prometheus_text_and_count_what_happened() {
    let c = cluster(&["n1"], |_| {}).await;
    let admin = c.admin("n1");

    // Anonymous scrapes are refused; a wrong password is counted.
    let url = format!("{}/metrics", c.node("n1").url());
    let anonymous = c.http_client(None).get(&url).send().await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let wrong = c
        .http_client(None)
        .get(&url)
        .basic_auth("admin", Some("not the password"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);

    let task = collect_once(&admin).await;
    assert!(all_nodes(
        &task,
        autocollect::coordinator::task::NodeState::Collected
    ));

    // Any user may scrape.
    let (status, body) = c
        .reader("n1")
        .request(Method::GET, "/metrics", None, true)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let Value::String(text) = body else {
        panic!("not text: {body}")
    };
    assert_eq!(sample(&text, "autocollect_tasks_started_total"), 1.0);
    assert_eq!(
        sample(
            &text,
            "autocollect_tasks_ended_total{outcome=\"completed\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(&text, "autocollect_collection_duration_seconds_count"),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            "autocollect_plugin_runs_total{role=\"collector\",outcome=\"ok\"}"
        ),
        1.0
    );
    assert!(sample(&text, "autocollect_collected_bytes_total") > 0.0);
    assert_eq!(sample(&text, "autocollect_auth_failures_total"), 1.0);
    assert!(sample(&text, "autocollect_connections_open") >= 1.0);

    // promtool must be there (Debian's `prometheus`, from .ci/setup): a
    // missing tool fails the test rather than skipping the check.
    let mut promtool = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; .ci/setup installs it)");
    use tokio::io::AsyncWriteExt;
    let mut stdin = promtool.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).await.unwrap();
    drop(stdin);
    let out = promtool.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
