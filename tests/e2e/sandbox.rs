//! Hostile plugins are contained: stopped at their deadline and memory cap,
//! denied everything outside their output directory, their claims checked.

use autocollect::config::Config;
use autocollect::coordinator::task::{NodeState, NodeStatus, TaskState};

use crate::support::*;

/// One node running the misbehaving plugin in `mode`; collect once and
/// return that node's final status. The daemon must stay healthy.
async fn run_misbehaving(mode: &str, limits: impl Fn(&mut Config)) -> NodeStatus {
    let c = cluster(&["n1"], |config| {
        config.collector.plugin = misbehave_plugin();
        set_option(config, "mode", mode);
        limits(config);
    })
    .await;
    let admin = c.admin("n1");
    let started = admin.start("all").await.expect("start");
    let task = wait_for_end(&admin, &started.task_id).await;
    assert_ended(&task, TaskState::Completed);

    // Still healthy, lock released: another collection starts at once.
    let health = c.admin("n1").wait_idle(10.0).await.unwrap();
    assert_eq!(health["status"], "ok");
    let again = admin.start("all").await.expect("daemon still serves");
    wait_for_end(&admin, &again.task_id).await;

    task.per_node["n1"].clone()
}

fn output(status: &NodeStatus) -> &str {
    status.collection_output.as_deref().unwrap_or_default()
}

#[tokio::test]
async fn a_plugin_that_loops_forever_is_interrupted_at_its_deadline() {
    let status = run_misbehaving("spin", |c| c.collector.timeout_secs = 1.0).await;
    assert_eq!(status.status, NodeState::Failed);
    assert_eq!(status.collection_status_code, None);
    assert_eq!(output(&status), "plugin exceeded its deadline of 1s");
}

#[tokio::test]
async fn a_plugin_that_hoards_memory_is_stopped_at_its_cap() {
    let status = run_misbehaving("alloc", |c| c.collector.memory_limit_mb = 32).await;
    assert_eq!(status.status, NodeState::Failed);
    assert_eq!(
        output(&status),
        "plugin exceeded its memory limit of 32 MiB"
    );
}

#[tokio::test]
async fn a_plugin_sees_no_files_environment_or_network_beyond_its_output_dir() {
    let status = run_misbehaving("escape", |_| {}).await;
    // The plugin reports what it could do as a failure with status 99.
    assert_eq!(status.collection_status_code.as_deref(), Some("99"));
    let report = output(&status);
    for attempt in [
        "read /etc/passwd: denied",
        "read ../ of output: denied",
        "list /: denied",
        "environment: denied",
        "tcp connect 127.0.0.1:22: denied",
        // ...while its own directory works.
        "write output dir: allowed",
    ] {
        assert!(
            report.lines().any(|l| l.starts_with(attempt)),
            "expected {attempt:?} in:\n{report}"
        );
    }
}

#[tokio::test]
async fn a_plugin_cannot_claim_a_file_outside_its_output_dir() {
    let status = run_misbehaving("bad-artifact", |_| {}).await;
    assert_eq!(status.status, NodeState::Failed);
    assert_eq!(status.path, None);
    assert!(
        output(&status).contains("outside its output directory"),
        "{status:?}"
    );
}

#[tokio::test]
async fn a_panicking_plugin_is_reported_with_its_message() {
    let status = run_misbehaving("trap", |_| {}).await;
    assert_eq!(status.status, NodeState::Failed);
    assert!(output(&status).starts_with("plugin trapped"), "{status:?}");
    assert!(
        output(&status).contains("misbehave plugin: deliberate trap"),
        "{status:?}"
    );
}

#[tokio::test]
async fn a_plugin_flooding_the_log_is_capped_and_the_daemon_stays_responsive() {
    let status = run_misbehaving("log-flood", |_| {}).await;
    assert_eq!(status.status, NodeState::Failed);
    assert_eq!(output(&status), "plugin error: flooded");
}
