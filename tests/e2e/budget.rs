//! Budgets with partial results: past 90 % of its deadline or disk budget
//! a collector is told to wrap up (`budget.wrap-up`); one that does keeps
//! what it has, and the node reports `collected` with `partial: true`
//! and the reason, in status and in the manifest.

use autocollect::coordinator::task::NodeState;
use serde_json::Value;

use crate::support::*;

async fn collect_wrap_up(
    customize: impl Fn(&mut autocollect::config::Config),
) -> (TestCluster, autocollect::coordinator::task::NodeStatus) {
    let c = cluster(&["n1"], |config| {
        config.collector.plugin = misbehave_plugin();
        set_option(config, "mode", "wrap-up");
        customize(config);
    })
    .await;
    let task = collect_once(&c.admin("n1")).await;
    let n1 = task.per_node["n1"].clone();
    (c, n1)
}

fn manifest_of(status: &autocollect::coordinator::task::NodeStatus) -> Value {
    let path =
        std::path::Path::new(status.path.as_deref().unwrap()).with_file_name("manifest.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[tokio::test]
async fn near_its_disk_budget_a_collector_wraps_up_and_keeps_a_partial_result() {
    let (_c, n1) = collect_wrap_up(|config| config.storage.job_max_mb = 4).await;
    assert_eq!(n1.status, NodeState::Collected, "{n1:?}");
    assert!(n1.partial, "{n1:?}");
    let reason = n1.partial_reason.clone().unwrap();
    assert!(
        reason.starts_with("the job is near its disk budget: 3 of 4 MiB used; kept "),
        "{reason}"
    );
    let summary = std::fs::read_to_string(n1.path.as_deref().unwrap()).unwrap();
    assert!(summary.contains("4194304 bytes, 20000 files"), "{summary}");
    assert_eq!(manifest_of(&n1)["partial"]["reason"], reason.as_str());
}

#[tokio::test]
async fn near_its_deadline_a_collector_wraps_up_in_time() {
    let (_c, n1) = collect_wrap_up(|config| {
        config.collector.timeout_secs = 2.0;
        set_option(config, "write", "false");
    })
    .await;
    assert_eq!(n1.status, NodeState::Collected, "{n1:?}");
    let reason = n1.partial_reason.clone().unwrap();
    assert!(
        reason.starts_with("the job is near its deadline: 1.8"),
        "{reason}"
    );
    assert!(reason.ends_with(" of 2.0 s used; kept 0 parts"), "{reason}");
    assert_eq!(manifest_of(&n1)["partial"]["reason"], reason.as_str());
}

#[tokio::test]
async fn a_whole_collection_is_not_partial() {
    let c = cluster(&["n1"], |_| {}).await;
    let task = collect_once(&c.admin("n1")).await;
    let n1 = &task.per_node["n1"];
    assert!(!n1.partial && n1.partial_reason.is_none(), "{n1:?}");
    let status = serde_json::to_value(n1).unwrap();
    assert!(status.get("partial").is_none(), "{status}");
    assert!(manifest_of(n1).get("partial").is_none());
}

#[tokio::test]
async fn a_partial_reason_never_carries_the_salt_out() {
    let c = cluster(&["n1"], |config| {
        config.collector.plugin = misbehave_plugin();
        set_option(config, "mode", "wrap-up");
        set_option(config, "write", "false");
        set_option(config, "leak", "salt");
        config.collector.timeout_secs = 1.0;
    })
    .await;
    let admin = c.admin("n1");
    let salt = "pepper-7f3a9c";
    let (status, body) = start_json(
        &admin,
        serde_json::json!({"nodes": ["n1"], "logRedactionLevel": "partial", "logRedactionSalt": salt}),
    )
    .await;
    assert_eq!(status, reqwest::StatusCode::OK, "{body}");
    let task = wait_for_end(&admin, body["taskId"].as_str().unwrap()).await;
    let n1 = &task.per_node["n1"];
    let reason = n1.partial_reason.as_deref().unwrap();
    assert!(reason.ends_with("; the salt is *****"), "{reason}");
    let status = serde_json::to_string(&task).unwrap();
    assert!(!status.contains(salt), "{status}");
    assert!(!manifest_of(n1).to_string().contains(salt));
}

/// The disk budget is enforced by a watch on the job's directories (an
/// inotify instance). A node that cannot set one up (here a daemon in a
/// user namespace of its own whose inotify instances are capped at 0, as
/// a machine whose `fs.inotify.max_user_instances` is used up would be)
/// does not run the collector unwatched: the job fails, saying why, and
/// nothing is left of it.
#[tokio::test]
async fn a_collector_whose_disk_budget_cannot_be_watched_is_not_run() {
    let no_inotify = autocollect::cluster::NodeSpec {
        launcher: [
            "unshare",
            "--user",
            "--map-root-user",
            "sh",
            "-c",
            "echo 0 > /proc/sys/user/max_inotify_instances && exec \"$@\"",
            "sh",
        ]
        .map(String::from)
        .to_vec(),
        ..autocollect::cluster::NodeSpec::loopback("n1")
    };
    // The mock collector, which collects at once when it is run.
    let c = cluster_on(&[no_inotify], |_| {}).await;
    let task = collect_once(&c.admin("n1")).await;
    let n1 = &task.per_node["n1"];
    assert_eq!(n1.status, NodeState::Failed, "{n1:?}");
    let output = n1.collection_output.as_deref().unwrap_or_default();
    assert!(
        output.starts_with("the collector was not run: its disk use cannot be watched ("),
        "{output}"
    );
    assert!(n1.plugins.is_empty(), "no plugin started: {n1:?}");
    let data = std::fs::read_dir(c.node("n1").data_dir.join("jobs"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(data, 0, "nothing is left of the job");
}
