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
        // The artifact is on that node, kept with its results (out of the
        // collector's reach), and holds the mock collector's output.
        let path = Path::new(status.path.as_deref().expect("path reported"));
        assert!(
            path.starts_with(result_dir(&c, node, &task.task_id)),
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
    // Its port is still its own: no other socket can take it meanwhile,
    // so whatever answers there later is n3 again.
    let n3_addr = c.node("n3").addr;
    let taken = std::net::TcpListener::bind(n3_addr).map(|_| ());
    assert_eq!(
        taken.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::AddrInUse)
    );

    let admin = c.admin("n1");
    let started = admin.start("all").await.expect("start despite n3");
    let n3 = &started.per_node["n3"];
    assert_eq!(n3.status, NodeState::Failed);
    assert!(
        n3.collection_output
            .as_deref()
            .unwrap()
            .contains("cannot connect to n3 at 127.0.0.1:"),
        "{n3:?}"
    );

    let task = wait_for_end(&admin, &started.task_id).await;
    assert_ended(&task, TaskState::Completed);
    assert_eq!(task.per_node["n1"].status, NodeState::Collected);
    assert_eq!(task.per_node["n2"].status, NodeState::Collected);
    assert_eq!(task.per_node["n3"].status, NodeState::Failed);

    // Back at its address, it collects with the others.
    c.restart("n3").await.unwrap();
    let task = collect_once(&admin).await;
    assert_ended(&task, TaskState::Completed);
    for node in ["n1", "n2", "n3"] {
        assert_eq!(task.per_node[node].status, NodeState::Collected, "{node}");
    }
}

/// When each node's mock collection ran: (started, finished) in Unix ms.
fn run_interval(path: &str) -> (u128, u128) {
    let run = zip_member(Path::new(path), "mock-run.txt");
    let field = |key: &str| -> u128 {
        run.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.strip_prefix('='))
            .expect("field present")
            .parse()
            .unwrap()
    };
    (field("started_unix_ms"), field("finished_unix_ms"))
}

async fn collection_intervals(concurrency: usize) -> Vec<(u128, u128)> {
    let c = cluster(&["n1", "n2", "n3"], |config| {
        config.coordinator.collection_concurrency = concurrency;
        set_option(config, "delay-ms", 300i64);
    })
    .await;
    let admin = c.admin("n1");
    let started = admin.start("all").await.unwrap();
    let task = wait_for_end(&admin, &started.task_id).await;
    assert!(all_nodes(&task, NodeState::Collected), "{task:#?}");
    let mut intervals: Vec<(u128, u128)> = task
        .per_node
        .values()
        .map(|n| run_interval(n.path.as_deref().unwrap()))
        .collect();
    intervals.sort();
    intervals
}

#[tokio::test]
async fn nodes_collect_in_parallel_by_default() {
    let intervals = collection_intervals(0).await;
    // Every collection started before any finished.
    let last_start = intervals.iter().map(|i| i.0).max().unwrap();
    let first_end = intervals.iter().map(|i| i.1).min().unwrap();
    assert!(last_start < first_end, "{intervals:?}");
}

#[tokio::test]
async fn collection_concurrency_one_collects_one_node_at_a_time() {
    let intervals = collection_intervals(1).await;
    for pair in intervals.windows(2) {
        assert!(pair[0].1 <= pair[1].0, "overlap: {intervals:?}");
    }
}
