//! Collections that run to completion.

use std::path::Path;

use autocollect::coordinator::task::{NodeState, TaskState};

use crate::support::*;

#[tokio::test]
async fn every_node_collects_and_any_node_can_coordinate() {
    let c = cluster(&["n1", "n2", "n3"], |config| {
        let output = format!("diagnostics of {}", config.node);
        set_option(config, "output", output.as_str());
    })
    .await;

    // n2 coordinates; the seed's form: from=allnodes.
    let admin = c.admin("n2");
    let started = admin.start("all").await.expect("start accepted");
    assert_eq!(started.node, "n2");
    assert_eq!(started.status, TaskState::Running);
    assert_eq!(started.kind, "clusterLogsCollection");
    assert_eq!(started.per_node.len(), 3);

    let task = wait_for_end(&admin, &started.task_id).await;
    assert_ended(&task, TaskState::Completed);
    for node in ["n1", "n2", "n3"] {
        let status = &task.per_node[node];
        assert_eq!(status.status, NodeState::Collected, "{node}: {status:?}");
        // The artifact is on that node, in its job directory, and holds
        // the mock collector's output.
        let path = Path::new(status.path.as_deref().expect("path reported"));
        assert!(
            path.starts_with(job_dir(&c, node, &task.task_id)),
            "{path:?}"
        );
        let name = path.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with("collectinfo-") && name.ends_with(&format!("-{node}.zip")));
        assert_eq!(
            zip_member(path, "output.txt"),
            format!("diagnostics of {node}")
        );
    }

    // Any node answers status for the latest task (forwarded to n2), and a
    // read-only user may read it.
    let seen_from_n3 = c.reader("n3").status().await.unwrap().expect("a task");
    assert_eq!(seen_from_n3, task);

    // The cluster lock is released: a new collection can start at once.
    let again = c.admin("n1").start("n1,n3").await.expect("second start");
    let again = wait_for_end(&c.admin("n1"), &again.task_id).await;
    assert_ended(&again, TaskState::Completed);
    assert_eq!(
        again.per_node.keys().collect::<Vec<_>>(),
        vec!["n1", "n3"],
        "only the chosen nodes"
    );
}

#[tokio::test]
async fn a_failing_node_reports_its_code_and_output_and_the_others_proceed() {
    let c = cluster(&["n1", "n2", "n3"], |config| {
        if config.node == "n2" {
            set_option(config, "result", 1i64);
            set_option(config, "output", "cbcollect_info: disk on fire");
        }
    })
    .await;

    let admin = c.admin("n1");
    let started = admin.start("all").await.unwrap();
    let task = wait_for_end(&admin, &started.task_id).await;

    assert_ended(&task, TaskState::Completed);
    let n2 = &task.per_node["n2"];
    assert_eq!(n2.status, NodeState::Failed);
    assert_eq!(n2.collection_status_code.as_deref(), Some("1"));
    assert_eq!(
        n2.collection_output.as_deref(),
        Some("cbcollect_info: disk on fire")
    );
    assert_eq!(task.per_node["n1"].status, NodeState::Collected);
    assert_eq!(task.per_node["n3"].status, NodeState::Collected);
}

#[tokio::test]
async fn an_unreachable_node_fails_and_the_others_proceed() {
    let mut c = cluster(&["n1", "n2", "n3"], |_| {}).await;
    c.kill("n3");

    let admin = c.admin("n1");
    let started = admin.start("all").await.expect("start despite n3");
    let n3 = &started.per_node["n3"];
    assert_eq!(n3.status, NodeState::Failed);
    assert!(
        n3.collection_output
            .as_deref()
            .unwrap()
            .contains("node unreachable"),
        "{n3:?}"
    );

    let task = wait_for_end(&admin, &started.task_id).await;
    assert_ended(&task, TaskState::Completed);
    assert_eq!(task.per_node["n1"].status, NodeState::Collected);
    assert_eq!(task.per_node["n2"].status, NodeState::Collected);
    assert_eq!(task.per_node["n3"].status, NodeState::Failed);
}
