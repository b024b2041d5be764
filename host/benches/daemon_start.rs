//! Daemon start: from exec to the first `/health` answer, with the plugin
//! cache warm (a restart: both plugins deserialised from
//! `plugin_cache_dir`) and cold (an empty cache: both compiled), and the
//! daemon's memory once idle: resident (RSS) and virtual (the plugin
//! instance pool reserves address space, not memory).
//!
//! One node (over TLS, as in production) with the default plugins
//! (`builtin:mock-collector`, `builtin:http-uploader`); each start is
//! `LocalCluster::restart` (bind, spawn, one `/health` request answered),
//! the previous daemon killed outside the timing.
//!
//! `cargo bench -p autocollect --bench daemon_start`
//! (`DAEMON_START_RUNS=N` sets the warm runs, default 20;
//! `DAEMON_START_EXE=PATH` times another `autocollect` binary, e.g. one
//! built from an earlier commit, for a before/after.)

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use autocollect::cluster::LocalCluster;
use common::*;

fn main() -> anyhow::Result<()> {
    let rt = runtime()?;
    rt.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    println!("daemon_start on {}", machine());
    let runs: usize = std::env::var("DAEMON_START_RUNS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(20);
    let tmp = tempfile::tempdir()?;
    let cache = tmp.path().join("plugin-cache");
    let exe = std::env::var_os("DAEMON_START_EXE").map_or_else(daemon_exe, Into::into);
    println!("daemon: {}", exe.display());
    let mut cluster = LocalCluster::launch(&exe, tmp.path(), &["n1"], |config| {
        config.plugin_cache_dir = Some(cache.clone());
    })
    .await?;

    // Cold: an empty cache, both plugins compiled at start.
    let cold = timed_starts(&mut cluster, 5, || {
        let _ = std::fs::remove_dir_all(&cache);
    })
    .await?;
    row("exec to /health, plugin cache cold", &cold);

    // Warm: what a restart pays.
    let warm = timed_starts(&mut cluster, runs, || {}).await?;
    row("exec to /health, plugin cache warm", &warm);
    println!(
        "  target: warm median < 100 ms -> {}",
        if warm.median() < Duration::from_millis(100) {
            "met"
        } else {
            "NOT met"
        }
    );

    // Idle memory: after a start, once the start-up work has settled.
    let mut rss = Vec::new();
    let mut vm = Vec::new();
    for _ in 0..5 {
        cluster.kill("n1");
        cluster.restart("n1").await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let pid = cluster.node("n1").pid().expect("running");
        rss.push(proc_status_bytes(pid, "VmRSS").unwrap_or(0));
        vm.push(proc_status_bytes(pid, "VmSize").unwrap_or(0));
    }
    rss.sort();
    vm.sort();
    println!(
        "idle RSS (n=5, median) {}  virtual size {:.1} GiB  (log: {})",
        mib(rss[rss.len() / 2]),
        vm[vm.len() / 2] as f64 / (1u64 << 30) as f64,
        allocator_line(&cluster.node("n1").log_path),
    );
    println!(
        "  target: idle RSS <= 30 MiB -> {}",
        if rss[rss.len() / 2] <= 30 << 20 {
            "met"
        } else {
            "NOT met"
        }
    );
    Ok(())
}

/// `n` starts of the node, each after `before` (outside the timing).
async fn timed_starts(
    cluster: &mut LocalCluster,
    n: usize,
    mut before: impl FnMut(),
) -> anyhow::Result<Samples> {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        cluster.kill("n1");
        before();
        let t = Instant::now();
        cluster.restart("n1").await?;
        samples.push(t.elapsed());
    }
    Ok(Samples::new(samples))
}

/// The allocator the daemon's start-up log names (its last start).
fn allocator_line(log: &Path) -> String {
    let log = std::fs::read_to_string(log).unwrap_or_default();
    log.lines()
        .rev()
        .find_map(|l| l.split("allocator=").nth(1))
        .map(|rest| rest.split(" collector=").next().unwrap_or(rest).to_string())
        .unwrap_or_else(|| "no allocator logged".into())
}

fn row(what: &str, s: &Samples) {
    println!(
        "{what:<40} n={:<4} median {:>10}  p90 {:>10}  min {:>10}  max {:>10}",
        s.len(),
        fmt_duration(s.median()),
        fmt_duration(s.percentile(90.0)),
        fmt_duration(s.min()),
        fmt_duration(s.percentile(100.0)),
    );
}
