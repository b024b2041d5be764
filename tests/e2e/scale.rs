//! Correctness at scale (performance is the `scale` bench's): a real
//! coordinator daemon and 300 simulated nodes ([`SimulatedNodes`]: the
//! real node-to-node handlers and node service, with a job that runs no
//! plugin). Every node reaches `collected`; status and the Couchbase task
//! list name them all, while the events stream in and at the end; each
//! change event carries only the node that changed, not the task; and
//! the cluster lock is released for the next collection.

use std::path::Path;
use std::time::Duration;

use autocollect::config::TlsSetting;
use autocollect::coordinator::task::{NodeState, TaskState, TaskStatus};
use autocollect::simulated::{ClusterOf, SimulatedNodes};
use reqwest::Method;

use crate::support::*;

const SIMULATED: usize = 300;

/// Every node of `task_json` (status or a Couchbase task), with its state.
fn states(task_json: &serde_json::Value) -> Vec<(String, String)> {
    task_json["perNode"]
        .as_object()
        .expect("perNode")
        .iter()
        .map(|(n, s)| (n.clone(), s["status"].as_str().unwrap_or("").to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_one_of_300_simulated_nodes_collects_and_is_listed() {
    let dir = tempfile::tempdir().unwrap();
    let secret = format!("{:032x}", rand::random::<u128>());
    let of = ClusterOf {
        coordinator: "c1".into(),
        secret: secret.clone(),
        heartbeat: Duration::from_millis(500), // as `cluster` configures
        plugin_cache_dir: Some(Path::new(env!("CARGO_TARGET_TMPDIR")).join("plugin-cache")),
    };
    let sims = SimulatedNodes::start(SIMULATED, &of, dir.path())
        .await
        .expect("simulated nodes start");
    let c = cluster(&["c1"], |config| {
        config.tls = Some(TlsSetting::Off);
        config.cluster_secret = Some(secret.clone());
        config.nodes.extend(sims.addresses.clone());
    })
    .await;
    let admin = c.admin("c1");
    let nodes = SIMULATED + 1; // and the coordinator itself

    for round in 0..2 {
        let mut stream = admin.events(None).await.expect("the event stream");
        let started = admin.start("all").await.expect("start accepted");
        assert_eq!(started.per_node.len(), nodes);

        // Status and the task list while the events stream in: always
        // every node, in a state of a collection.
        let mut task: Option<TaskStatus> = None;
        let mut changes = 0;
        loop {
            let event = next_event(&mut stream).await;
            if event.event == "change" {
                let data = event.json();
                if data["taskId"] != started.task_id.as_str() {
                    continue;
                }
                let changed = data["nodes"].as_object().map_or(0, |n| n.len());
                assert!(changed <= 1, "a change event lists {changed} nodes");
                changes += 1;
                if changes % 100 == 0 {
                    let (_, status) = admin
                        .request(Method::GET, "/collectLogs/status", None, true)
                        .await
                        .unwrap();
                    let (_, tasks) = admin
                        .request(Method::GET, "/pools/default/tasks", None, true)
                        .await
                        .unwrap();
                    for listed in [states(&status), states(&tasks[0])] {
                        assert_eq!(listed.len(), nodes);
                        assert!(
                            listed
                                .iter()
                                .all(|(_, s)| ["starting", "started", "collected"]
                                    .contains(&s.as_str())),
                            "{listed:?}"
                        );
                    }
                }
            }
            if event.apply(&mut task).is_err() {
                continue; // the previous task's snapshot, then ours
            }
            if task
                .as_ref()
                .is_some_and(|t| t.task_id == started.task_id && t.status != TaskState::Running)
            {
                break;
            }
        }
        let followed = task.unwrap();
        assert_eq!(followed.status, TaskState::Completed);
        assert_eq!(followed.per_node.len(), nodes);
        assert!(all_nodes(&followed, NodeState::Collected), "{followed:?}");
        // Each node: started and collected, one change event each (and
        // the end); none for nothing.
        assert!(changes >= 2 * nodes, "{changes} change events");

        let status = admin.status().await.unwrap().expect("a task");
        assert_ended(&status, TaskState::Completed);
        assert_eq!(status.per_node.len(), nodes);
        assert!(all_nodes(&status, NodeState::Collected), "{status:?}");
        let (_, tasks) = admin
            .request(Method::GET, "/pools/default/tasks", None, true)
            .await
            .unwrap();
        let listed = states(&tasks[0]);
        assert_eq!(listed.len(), nodes);
        assert!(listed.iter().all(|(_, s)| s == "collected"), "{listed:?}");

        // The lock is released everywhere before the next round.
        assert!(
            sims.wait_idle(PATIENCE).await,
            "round {round}: a node is busy"
        );
    }
}
