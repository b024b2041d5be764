//! Disk, bounded: a start needs free space on every chosen node, results
//! are kept within the operator's retention, and what a crash left behind
//! is removed when the node starts again. A daemon refuses to start on
//! directories others could write, or on a duration (such as a
//! retention) past what its clock can hold.

use autocollect::coordinator::task::NodeState;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::*;

#[tokio::test]
async fn a_start_is_refused_when_a_chosen_node_is_low_on_disk() {
    let c = cluster(&["n1", "n2"], |config| {
        if config.node == "n2" {
            config.storage.min_free_mb = 1 << 40; // more than any disk
        }
    })
    .await;
    let admin = c.admin("n1");
    let (status, body) = start_json(&admin, json!({"nodes": "*"})).await;
    assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE, "{body}");
    let message = body["_"].as_str().unwrap();
    assert!(
        message.starts_with("n2 cannot collect: free space in data_dir")
            && message.ends_with("(storage.min_free_mb)"),
        "{message}"
    );
    // No lock was kept anywhere, and n1 alone can still collect.
    for node in ["n1", "n2"] {
        assert_eq!(
            c.admin(node).health().await.unwrap()["session"],
            Value::Null
        );
    }
    let started = admin.start("n1").await.unwrap();
    let task = wait_for_end(&admin, &started.task_id).await;
    assert_eq!(task.per_node["n1"].status, NodeState::Collected);
}

#[tokio::test]
async fn results_are_kept_within_the_retention_count() {
    let c = cluster(&["n1"], |config| config.storage.keep_results = 2).await;
    let admin = c.admin("n1");
    let mut tasks = Vec::new();
    for _ in 0..3 {
        tasks.push(collect_once(&admin).await.task_id);
    }
    // Each collection applies the rules once its result is kept.
    let results = c.node("n1").data_dir.join("results");
    let mut kept: Vec<String> = std::fs::read_dir(results)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    kept.sort();
    let mut newest = tasks[1..].to_vec();
    newest.sort();
    assert_eq!(kept, newest);
}

#[tokio::test]
async fn what_a_killed_node_left_behind_is_removed_when_it_starts_again() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cluster(&["n1", "n2"], |config| {
        set_option(config, "delay-ms", 120_000i64);
        config.storage.allowed_tmp_dirs = vec![std::env::temp_dir()];
    })
    .await;
    let admin = c.admin("n1");
    let (status, body) = start_json(
        &admin,
        json!({"nodes": "*", "tmpDir": tmp.path().display().to_string()}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let task_id = body["taskId"].as_str().unwrap().to_string();
    wait_for(&admin, |t| all_nodes(t, NodeState::Started)).await;
    let leftovers = [
        job_dir(&c, "n2", &task_id),
        c.node("n2").data_dir.join("tmp"),
        tmp.path().join(format!("autocollect-{task_id}-n2")),
    ];
    assert!(leftovers[0].exists() && leftovers[2].exists());

    c.kill("n2");
    assert!(leftovers[0].exists(), "a killed node cleans nothing");
    c.restart("n2").await.unwrap();
    assert!(!leftovers[0].exists(), "job directory left");
    assert!(!leftovers[2].exists(), "tmpDir subdirectory left");
    assert_eq!(std::fs::read_dir(&leftovers[1]).unwrap().count(), 0);
    admin.cancel().await.unwrap();
}

/// What a daemon whose config is `customize`d says when it refuses to
/// start (it must).
async fn refusal(customize: impl FnMut(&mut autocollect::config::Config)) -> String {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_autocollect"));
    let node = [autocollect::cluster::NodeSpec::loopback("n1")];
    let refused = autocollect::cluster::LocalCluster::launch_on(exe, dir.path(), &node, customize)
        .await
        .err()
        .expect("the daemon refuses to start");
    format!("{refused:#}")
}

/// What the daemon trusts on disk must be its own: the compiled-plugin
/// cache (machine code it runs) and `data_dir` (records of directories
/// it removes, results it uploads). A daemon given either where another
/// local user could write refuses to start, and says why.
#[tokio::test]
async fn a_cache_or_data_dir_others_could_write_stops_the_daemon_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let shared = |name: &str| {
        let shared = dir.path().join(name);
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
        shared
    };

    let cache = shared("cache");
    let message = refusal(|c| c.plugin_cache_dir = Some(cache.clone())).await;
    assert!(
        message.contains(&format!(
            "plugin_cache_dir {}: its files are loaded as machine code, so it must belong to the \
             daemon's user (or root) and no one else may write it: it is writable by others (mode 1777)",
            cache.display()
        )),
        "{message}"
    );

    let data = shared("data");
    let message = refusal(|c| c.data_dir = data.clone()).await;
    assert!(
        message.contains(&format!(
            "data_dir {}: it holds the daemon's jobs, results and records",
            data.display()
        )),
        "{message}"
    );
    assert!(
        message.contains("it is writable by others (mode 1777)"),
        "{message}"
    );
}

/// A duration too large for the daemon's clock arithmetic is refused
/// when the config is read, with the key: the daemon used to panic on
/// `collector.timeout_secs = 1e300` as it started.
#[tokio::test]
async fn a_duration_past_a_year_is_refused_at_start_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let printed = serve_stops_with(
        dir.path(),
        "[collector]\nplugin = \"builtin:mock-collector\"\ntimeout_secs = 1e300",
    )
    .await;
    assert!(
        printed.contains("collector.timeout_secs and exec_grace_secs must be at most"),
        "{printed}"
    );
    assert!(!printed.contains("panicked"), "{printed}");
}

/// Under a umask of 0002 (a user's default on many distributions) the
/// directories the daemon makes for itself are still its own (0700), so
/// it starts and collects: it used to make `data_dir` group-writable
/// with the default mode, then refuse to start on it.
#[tokio::test]
async fn a_daemon_started_under_a_group_writable_umask_makes_its_directories_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("fresh/plugin-cache");
    let node = autocollect::cluster::NodeSpec {
        launcher: ["sh", "-c", "umask 0002 && exec \"$@\"", "sh"]
            .map(String::from)
            .to_vec(),
        ..autocollect::cluster::NodeSpec::loopback("n1")
    };
    let c = cluster_on(&[node], |config| {
        config.plugin_cache_dir = Some(cache.clone())
    })
    .await;
    let task = collect_once(&c.admin("n1")).await;
    let n1 = &task.per_node["n1"];
    assert_eq!(n1.status, NodeState::Collected, "{n1:?}");
    for made in [&c.node("n1").data_dir, &cache] {
        let mode = std::fs::metadata(made).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{}", made.display());
    }
}
