//! Coordination at scale: one real coordinator daemon and N simulated
//! nodes served by this process ([`autocollect::simulated`]: the real
//! node-to-node handlers and node service on a loopback address each,
//! with a job that runs no plugin). Timed from the start request to the
//! task's end with every node `collected` (the client follows the event
//! stream, as `collect` does); the coordinator's peak RSS; and, in one
//! more run, `GET /collectLogs/status` and `/pools/default/tasks` timed
//! while the events stream in, each answer checked (every node listed,
//! no node going back), then again on the finished task. The client
//! timing them during the run has a thread of its own, as a client on
//! another machine would: on this process's runtime, it waited its turn
//! behind the simulated nodes' work and counted that wait as the
//! coordinator's.
//!
//! `cargo bench -p autocollect --bench scale` (`SCALE_NODES=1000,5000`
//! chooses the sizes, 100 to 10,000 nodes by default; `SCALE_RUNS` the
//! timed runs per size). The coordinator keeps one connection per node
//! (HTTP/2), and so does this process: 10,000 nodes fit in an open-file
//! limit of 20,000.
//!
//! The cluster runs over plain HTTP (`tls = "off"`): thousands of TLS
//! handshakes would measure ECDSA, not coordination (the `cluster` bench
//! prices TLS). The coordinator also collects from itself, with the mock.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use autocollect::cluster::LocalCluster;
use autocollect::config::TlsSetting;
use autocollect::simulated::{ClusterOf, SimulatedNodes};
use common::*;
use serde_json::Value;

const COORDINATOR: &str = "c1";

fn main() -> anyhow::Result<()> {
    let fds = autocollect::server::listener::raise_open_file_limit();
    let sizes: Vec<usize> = std::env::var("SCALE_NODES")
        .unwrap_or_else(|_| "100,1000,5000,10000".into())
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()?;
    let runs: usize = std::env::var("SCALE_RUNS")
        .ok()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(3);
    let rt = runtime()?;
    rt.block_on(async {
        println!("scale on {} (open-file limit {fds})", machine());
        println!("daemon: {}", daemon_exe().display());
        println!(
            "{:>6} | {:>9} {:>9} {:>9} | {:>10} | {:>10} | {:>22} | {:>22} | {:>18}",
            "nodes",
            "first",
            "median",
            "min",
            "per node",
            "coord. RSS",
            "status during (med/max)",
            "tasks during (med/max)",
            "status/tasks after"
        );
        for n in sizes {
            if let Err(e) = row(n, runs).await {
                println!("{n:>6} | failed: {e:#}");
            }
        }
        Ok(())
    })
}

/// The heartbeat interval, the coordinator's (pings) and the nodes'
/// (heartbeat lines): `SCALE_HEARTBEAT_MS`, else the default 2 s.
fn heartbeat_ms() -> u64 {
    std::env::var("SCALE_HEARTBEAT_MS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000)
}

async fn row(n: usize, runs: usize) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let secret = format!("{:032x}", rand::random::<u128>());
    std::fs::create_dir_all(tmp.path().join("sims"))?;
    std::fs::create_dir_all(tmp.path().join("cluster"))?;
    let of = ClusterOf {
        coordinator: COORDINATOR.into(),
        secret: secret.clone(),
        heartbeat: Duration::from_millis(heartbeat_ms()),
        plugin_cache_dir: Some(tmp.path().join("cluster/plugin-cache")),
    };
    let sims = SimulatedNodes::start(n, &of, &tmp.path().join("sims")).await?;
    let addresses = sims.addresses.clone();
    let cluster = LocalCluster::launch(
        &daemon_exe(),
        &tmp.path().join("cluster"),
        &[COORDINATOR],
        |config| {
            config.tls = Some(TlsSetting::Off);
            config.coordinator.heartbeat_interval_ms = heartbeat_ms();
            config.cluster_secret = Some(secret.clone());
            config.nodes.extend(addresses.clone());
        },
    )
    .await?;
    let admin = cluster.admin(COORDINATOR);
    let pid = cluster.node(COORDINATOR).pid().unwrap_or(0);
    let settle = async || -> anyhow::Result<()> {
        anyhow::ensure!(
            sims.wait_idle(Duration::from_secs(60)).await,
            "a node kept its session"
        );
        admin.wait_idle(60.0).await?;
        Ok(())
    };

    let mut samples = Vec::new();
    for _ in 0..runs {
        samples.push(collection(&admin).await?);
        settle().await?;
    }
    let first = samples[0];
    let s = Samples::new(samples);
    // The peak of the timed runs alone: the probed run adds the answers'
    // own memory (each a copy of the task and its JSON).
    let peak_timed = proc_status_bytes(pid, "VmHWM").unwrap_or(0);

    // One more run, with status and tasks asked for all along.
    let stop = Arc::new(AtomicBool::new(false));
    let url = admin.base().to_string();
    let password = cluster.admin_password.clone();
    let previous = admin.status().await?.map(|t| t.task_id);
    // The prober is a client elsewhere: its own thread and runtime, so
    // that the simulated nodes' work in this process does not delay it.
    let prober = {
        let (url, password, stop) = (url.clone(), password.clone(), stop.clone());
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(probe(url, password, n + 1, previous, stop))
        })
    };
    collection(&admin).await?;
    stop.store(true, Ordering::SeqCst);
    let (status_during, tasks_during) = tokio::task::spawn_blocking(move || prober.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the prober panicked"))??;
    settle().await?;
    let stop = Arc::new(AtomicBool::new(true));
    let (status_after, tasks_after) = probe(url, password, n + 1, None, stop).await?;
    let peak = proc_status_bytes(pid, "VmHWM").unwrap_or(0);
    let after = proc_status_bytes(pid, "VmRSS").unwrap_or(0);

    let total = n + 1;
    println!(
        "{total:>6} | {:>9} {:>9} {:>9} | {:>10} | {:>10} | {:>22} | {:>22} | {:>18}",
        fmt_duration(first),
        fmt_duration(s.median()),
        fmt_duration(s.min()),
        fmt_duration(s.median() / total as u32),
        mib(peak),
        format!(
            "{} / {}",
            fmt_duration(status_during.median()),
            fmt_duration(status_during.percentile(100.0))
        ),
        format!(
            "{} / {}",
            fmt_duration(tasks_during.median()),
            fmt_duration(tasks_during.percentile(100.0))
        ),
        format!(
            "{} / {}",
            fmt_duration(status_after.median()),
            fmt_duration(tasks_after.median())
        ),
    );
    println!(
        "         ({} status and {} tasks answers during the run, {} and {} of them over 50 ms, each listing all {total} nodes, none going back; coordinator peak RSS before the probed run {}, RSS after the runs {})",
        status_during.len(),
        tasks_during.len(),
        status_during.over(Duration::from_millis(50)),
        tasks_during.over(Duration::from_millis(50)),
        mib(peak_timed),
        mib(after),
    );
    Ok(())
}

/// Collect from every node: the time from the start request to the end,
/// or what went wrong (how many nodes ended in which state, and one
/// reason of a failed node).
async fn collection(admin: &autocollect::client::ApiClient) -> anyhow::Result<Duration> {
    use autocollect::coordinator::task::{NodeState, TaskState};
    let t = Instant::now();
    let started = admin.start("all").await?;
    let task = admin
        .wait_for_end(&started.task_id, Duration::from_secs(120))
        .await?;
    let elapsed = t.elapsed();
    let ok = task.status == TaskState::Completed
        && task
            .per_node
            .values()
            .all(|n| n.status == NodeState::Collected);
    if !ok {
        let mut states: BTreeMap<&str, usize> = BTreeMap::new();
        for n in task.per_node.values() {
            *states.entry(n.status.as_str()).or_default() += 1;
        }
        let reason = task
            .per_node
            .iter()
            .find_map(|(name, n)| Some(format!("{name}: {}", n.collection_output.as_ref()?)));
        anyhow::bail!(
            "task {} after {}: {states:?}; {}",
            task.status.as_str(),
            fmt_duration(elapsed),
            reason.unwrap_or_default()
        );
    }
    Ok(elapsed)
}

/// Time `GET /collectLogs/status` and `GET /pools/default/tasks` in turn
/// (the whole body received) until `stop` (at least 10 of each), checking
/// each answer: all `nodes` listed, and no node's state going back.
/// Answers while the status still shows task `previous` are not counted.
async fn probe(
    base: String,
    password: String,
    nodes: usize,
    previous: Option<String>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<(Samples, Samples)> {
    let http = reqwest::Client::new();
    let mut status = Vec::new();
    let mut tasks = Vec::new();
    let mut seen: BTreeMap<String, u8> = BTreeMap::new();
    while !stop.load(Ordering::SeqCst) || status.len() < 10 {
        for (path, times) in [
            ("/collectLogs/status", &mut status),
            ("/pools/default/tasks", &mut tasks),
        ] {
            let t = Instant::now();
            let body = http
                .get(format!("{base}{path}"))
                .basic_auth("admin", Some(&password))
                .send()
                .await?
                .error_for_status()?
                .bytes()
                .await?;
            times.push(t.elapsed());
            let v: Value = serde_json::from_slice(&body)?;
            let task = if v.is_array() { &v[0] } else { &v };
            if let Some(p) = &previous
                && task["taskId"].as_str() == Some(p.as_str())
            {
                times.pop(); // the new task has not started yet
                break;
            }
            let per_node = task["perNode"]
                .as_object()
                .ok_or_else(|| anyhow::anyhow!("{path}: no perNode"))?;
            anyhow::ensure!(
                per_node.len() == nodes,
                "{path} lists {} nodes, not {nodes}",
                per_node.len()
            );
            for (node, s) in per_node {
                let rank = match s["status"].as_str() {
                    Some("starting") => 0,
                    Some("started") => 1,
                    Some("collected") => 2,
                    other => anyhow::bail!("{path}: {node} is {other:?}"),
                };
                let before = seen.insert(node.clone(), rank).unwrap_or(0);
                anyhow::ensure!(rank >= before, "{path}: {node} went back to {rank}");
            }
        }
    }
    Ok((Samples::new(status), Samples::new(tasks)))
}
