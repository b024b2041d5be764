//! Cancel, exclusivity, and the link between coordinator and node jobs.

use std::time::{Duration, Instant};

use autocollect::coordinator::task::{NodeState, TaskState};
use reqwest::Method;
use serde_json::json;

use crate::support::*;

/// Long enough that finishing by itself would fail the test.
const SLOW_MS: i64 = 120_000;

fn slow(config: &mut autocollect::config::Config) {
    set_option(config, "delay-ms", SLOW_MS);
}

#[tokio::test]
async fn cancel_stops_every_node_long_before_the_collection_would_end() {
    let c = cluster(&["n1", "n2", "n3"], slow).await;
    let admin = c.admin("n1");
    let started = admin.start("all").await.unwrap();
    wait_for(&admin, |t| all_nodes(t, NodeState::Started)).await;

    let before_cancel = Instant::now();
    let task = admin.cancel().await.unwrap().expect("a task");
    let took = before_cancel.elapsed();

    // The cancel answer already holds the end state: every node confirmed.
    assert_eq!(task.task_id, started.task_id);
    assert_ended(&task, TaskState::Cancelled);
    assert!(all_nodes(&task, NodeState::Cancelled), "{task:#?}");
    assert!(took < Duration::from_secs(10), "cancel took {took:?}");

    // No job keeps running, and no partial output is left behind.
    for node in ["n1", "n2", "n3"] {
        let health = c.admin(node).wait_idle(10.0).await.unwrap();
        assert_eq!(health["session"], json!(null), "{node}: {health}");
        assert!(
            !job_dir(&c, node, &task.task_id).exists(),
            "{node} kept its job directory"
        );
    }
}

#[tokio::test]
async fn a_second_start_anywhere_in_the_cluster_is_refused_and_the_first_is_unaffected() {
    let c = cluster(&["n1", "n2", "n3"], slow).await;
    let first = c.admin("n1").start("n1,n2").await.unwrap();

    // Refused on the coordinator itself, on a node of the task, and on a
    // node the task does not use (the lock is cluster-wide).
    for node in ["n1", "n2", "n3"] {
        let (status, body) = c
            .admin(node)
            .request(
                Method::POST,
                "/collectLogs/start",
                Some(form(&[("from", "allnodes")])),
                true,
            )
            .await
            .unwrap();
        assert_eq!(status, 400, "via {node}");
        assert_eq!(
            body,
            json!({"_": "Logs collection task is already started"})
        );
    }

    let still = c.admin("n1").status().await.unwrap().unwrap();
    assert_eq!(still.task_id, first.task_id);
    assert_eq!(still.status, TaskState::Running);
    assert!(still.per_node.values().all(|n| !n.status.is_finished()));

    // Cancel through a node other than the coordinator: it is forwarded.
    let task = c.admin("n3").cancel().await.unwrap().unwrap();
    assert_eq!(task.task_id, first.task_id);
    assert_ended(&task, TaskState::Cancelled);
}

#[tokio::test]
async fn node_jobs_stop_and_clean_up_when_their_coordinator_dies() {
    let mut c = cluster(&["n1", "n2", "n3"], slow).await;
    let admin = c.admin("n1");
    let started = admin.start("all").await.unwrap();
    wait_for(&admin, |t| all_nodes(t, NodeState::Started)).await;

    c.kill("n1");

    for node in ["n2", "n3"] {
        let health = c.admin(node).wait_idle(20.0).await.unwrap();
        assert_eq!(
            health["session"],
            json!(null),
            "{node} still runs: {health}"
        );
        assert!(!job_dir(&c, node, &started.task_id).exists());
    }
    // The survivors can run a new collection between themselves.
    let again = c.admin("n2").start("n2,n3").await.expect("new start");
    let again = wait_for(&c.admin("n2"), |t| {
        t.task_id == again.task_id && all_nodes(t, NodeState::Started)
    })
    .await;
    assert_eq!(again.node, "n2");
    c.admin("n2").cancel().await.unwrap();
}

#[tokio::test]
async fn a_node_that_dies_mid_collection_is_reported_failed() {
    let mut c = cluster(&["n1", "n2"], slow).await;
    let admin = c.admin("n1");
    let started = admin.start("all").await.unwrap();
    wait_for(&admin, |t| all_nodes(t, NodeState::Started)).await;

    c.kill("n2");
    let task = wait_for(&admin, |t| t.per_node["n2"].status.is_finished()).await;
    let n2 = &task.per_node["n2"];
    assert_eq!(n2.status, NodeState::Failed);
    assert!(
        n2.collection_output
            .as_deref()
            .unwrap()
            .contains("lost contact with n2: the connection"),
        "{n2:?}"
    );
    assert_eq!(task.per_node["n1"].status, NodeState::Started);
    let task = admin.cancel().await.unwrap().unwrap();
    assert_eq!(task.task_id, started.task_id);
    assert_ended(&task, TaskState::Cancelled);
    assert_eq!(task.per_node["n2"].status, NodeState::Failed);
}

fn form(pairs: &[(&str, &str)]) -> autocollect::client::RequestBody {
    autocollect::client::RequestBody::Form(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}
