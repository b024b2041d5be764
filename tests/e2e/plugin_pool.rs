//! Plugin instances come from wasmtime's pooling allocator (copy-on-write
//! memory images, slots reserved at start): the daemon says so at start,
//! and where the pool's address space cannot be reserved (`ulimit -v`) it
//! falls back to allocating on demand, says why, and still collects.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use autocollect::cluster::{ADMIN_USER, LocalCluster, NodeSpec};
use autocollect::coordinator::task::{NodeState, TaskState};

use crate::support::*;

#[tokio::test]
async fn the_daemon_runs_plugins_from_the_instance_pool() {
    let c = cluster(&["n1"], |_| {}).await;
    wait_for_log(&c, "n1", "allocator=pooling").await;
    let log = std::fs::read_to_string(&c.node("n1").log_path).unwrap();
    assert!(
        !log.contains("pool not available"),
        "the pool should fit here:\n{log}"
    );
    let task = collect_once(&c.admin("n1")).await;
    assert_ended(&task, TaskState::Completed);
    assert!(all_nodes(&task, NodeState::Collected), "{task:?}");
}

#[tokio::test]
async fn a_reload_cannot_raise_a_memory_limit_above_the_pool_sized_at_start() {
    // The pool's slots hold the largest limit configured at start (the
    // uploader's 128 MiB here): a larger one needs a restart.
    let c = cluster(&["n1"], |config| config.collector.memory_limit_mb = 64).await;
    let path = c.node("n1").config_path.clone();
    let mut config: autocollect::config::Config =
        toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config.collector.memory_limit_mb = 1024;
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    let response = c
        .http_client(None)
        .post(format!("{}/admin/reload", c.node("n1").url()))
        .basic_auth(ADMIN_USER, Some(&c.admin_password))
        .send()
        .await
        .expect("reload answers");
    let report: serde_json::Value = response.json().await.expect("a JSON report");
    assert_eq!(report["roles"][0]["outcome"], "failed", "{report}");
    let error = report["roles"][0]["error"].as_str().unwrap();
    assert!(
        error.contains("memory_limit_mb = 1024 is above the 128 MiB")
            && error.contains("restart the daemon"),
        "{report}"
    );
    // The collector configured at start runs on.
    let task = collect_once(&c.admin("n1")).await;
    assert!(all_nodes(&task, NodeState::Collected), "{task:?}");
}

/// Address space for the daemon under `ulimit -v`: enough for the
/// runtime and instances allocated on demand (a few 4 GiB reservations),
/// far below the pool's (64 memory slots of 4 GiB).
const ADDRESS_SPACE_KIB: u64 = 48 << 20;

#[tokio::test]
async fn without_address_space_for_the_pool_the_daemon_falls_back_says_why_and_collects() {
    let dir = tempfile::tempdir().unwrap();
    let wrapper = limited_exe(dir.path(), ADDRESS_SPACE_KIB);
    let root = dir.path().join("cluster");
    std::fs::create_dir(&root).unwrap();
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("plugin-cache");
    let c = LocalCluster::launch_on(&wrapper, &root, &[NodeSpec::loopback("n1")], |config| {
        config.plugin_cache_dir = Some(cache.clone());
        config.coordinator.heartbeat_interval_ms = 500;
    })
    .await
    .expect("the daemon starts under ulimit -v");

    wait_for_log(
        &c,
        "n1",
        "allocator=on-demand (the pool could not be reserved",
    )
    .await;
    let log = std::fs::read_to_string(&c.node("n1").log_path).unwrap();
    let warning = log
        .lines()
        .find(|l| l.contains("WARN") && l.contains("plugin instance pool not available"))
        .unwrap_or_else(|| panic!("no warning naming the fallback:\n{log}"));
    assert!(
        warning.contains("GiB of address space"),
        "the warning says what the pool needs: {warning}"
    );

    let task = collect_once(&c.admin("n1")).await;
    assert_ended(&task, TaskState::Completed);
    assert!(all_nodes(&task, NodeState::Collected), "{task:?}");
}

/// A script that runs the daemon with its address space limited to `kib`.
fn limited_exe(dir: &Path, kib: u64) -> PathBuf {
    let path = dir.join("autocollect-ulimit");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\nulimit -v {kib} || exit 97\nexec '{}' \"$@\"\n",
            env!("CARGO_BIN_EXE_autocollect")
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// One run of the `test-misbehave` collector in `mode` on `plugin`: its
/// summary.
async fn misbehave_summary(
    plugin: &autocollect::plugin::collector::CollectorPlugin,
    mode: &str,
    out: &Path,
) -> String {
    use autocollect::plugin::collector::CollectJob;
    use autocollect::plugin::sandbox::RunLabels;
    let options = [("mode".to_string(), mode.to_string())];
    let (progress, _) = tokio::sync::watch::channel(None);
    let job = CollectJob {
        labels: RunLabels {
            plugin: "test-misbehave".into(),
            task_id: "pool".into(),
            node: "n1".into(),
        },
        options: &options,
        output_dir: out,
        limits: autocollect::plugin::RunLimits {
            timeout: std::time::Duration::from_secs(60),
            memory_bytes: 64 << 20,
        },
        exec: std::sync::Arc::new(autocollect::plugin::exec::ExecPolicy::default()),
        inputs: &[],
        budget: None,
        parameters: Vec::new(),
        progress,
        observer: None,
        cancel: Default::default(),
        urgent: Default::default(),
    };
    plugin.collect(job).await.expect("the run succeeds").summary
}

/// A slot of the pool is reused once its instance is gone, and its pages
/// are reset in place where the kernel allows (only those written,
/// `PAGEMAP_SCAN`): an instance must never see what the previous one in
/// its slot wrote, be it on its stack, in its heap or in pages it grows.
#[tokio::test]
async fn a_pooled_instance_never_sees_what_the_previous_one_wrote() {
    use autocollect::plugin::collector::CollectorPlugin;
    use autocollect::plugin::{PluginHost, PluginSource, PoolSizing, builtin};
    let host = PluginHost::pooled(None, PoolSizing::for_limits([64 << 20])).unwrap();
    assert!(
        matches!(host.allocator(), autocollect::plugin::Allocator::Pooling(_)),
        "{}",
        host.allocator()
    );
    let plugin = CollectorPlugin::load(
        &host,
        PluginSource::File(builtin::build_output("test_misbehave")),
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    for round in 0..20 {
        // The scan finds the pattern where it was written: it would find
        // it left over too.
        let visible = misbehave_summary(&plugin, "scribble", out.path()).await;
        let count: usize = visible.strip_prefix("visible ").unwrap().parse().unwrap();
        assert!(count >= 8192 + (1 << 18), "round {round}: {visible}");
        assert_eq!(
            misbehave_summary(&plugin, "stale", out.path()).await,
            "stale 0",
            "round {round}: a fresh instance saw the previous one's memory"
        );
    }
    // The runs went through warm slots: ones an earlier instance used.
    let metrics = host.engine().pooling_allocator_metrics().unwrap();
    assert!(metrics.unused_warm_memories() >= 1);
}

/// Times the thread named `name` of process `pid` has slept and woken.
fn wakeups(pid: u32, name: &str) -> u64 {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        if std::fs::read_to_string(dir.join("comm"))
            .unwrap_or_default()
            .trim()
            == name
        {
            let status = std::fs::read_to_string(dir.join("status")).unwrap();
            let line = status
                .lines()
                .find(|l| l.starts_with("voluntary_ctxt_switches:"))
                .unwrap();
            return line.split_whitespace().nth(1).unwrap().parse().unwrap();
        }
    }
    panic!("no thread {name} in process {pid}")
}

/// The epoch ticker (which lets a running plugin's deadline and cancel
/// be checked every 10 ms) runs while a plugin runs, and sleeps while
/// none does: an idle daemon does not wake 100 times a second.
#[tokio::test]
async fn the_epoch_ticker_runs_only_while_a_plugin_runs() {
    let c = cluster(&["n1"], |config| set_option(config, "delay-ms", 3000)).await;
    let pid = c.node("n1").pid().unwrap();
    // A window of time is what is measured here (wakeups in it), not
    // something to wait for.
    let window = std::time::Duration::from_millis(500);
    let idle = wakeups(pid, "wasm-epoch");
    tokio::time::sleep(window).await;
    let idle = wakeups(pid, "wasm-epoch") - idle;
    assert!(
        idle <= 2,
        "{idle} wakeups in {window:?} with no plugin running"
    );

    let admin = c.admin("n1");
    admin.start("all").await.unwrap();
    wait_for(&admin, |t| all_nodes(t, NodeState::Started)).await;
    let busy = wakeups(pid, "wasm-epoch");
    tokio::time::sleep(window).await;
    let busy = wakeups(pid, "wasm-epoch") - busy;
    assert!(
        busy >= 20,
        "{busy} wakeups in {window:?} while the collector runs"
    );
    admin.cancel().await.unwrap();
}
