//! Coordinator overhead: a minimal collection (the built-in mock writing a
//! few-hundred-byte zip) on local clusters of real daemons, timed from the
//! start request to the task's end with every node `collected`. Also the
//! daemons' memory at idle and at peak. Clusters run over TLS (mutual
//! between nodes) as in production; 3 nodes are also timed over plain
//! HTTP, and on their first collection after start, when every
//! connection (client to coordinator, coordinator to each node) is new
//! and pays its TLS handshake.
//!
//! `cargo bench -p autocollect --bench cluster`; `CLUSTER_BENCH=large`
//! runs only the 32-, 64- and 128-node rows (`CLUSTER_BENCH=small` only
//! the 3-node ones, `CLUSTER_BENCH=N` only an N-node row, as for a
//! profile); `CLUSTER_BENCH_RUNS` sets the number of timed collections of
//! the large rows; `CLUSTER_BENCH_CPU=1` adds the daemons' CPU time
//! during the timed collections, by thread; `CLUSTER_BENCH_PERF_CTL`
//! lets `perf record` sample only those (see [`Profiler`]).

mod common;

use std::time::Duration;

use autocollect::cluster::{LocalCluster, NodeSpec};
use autocollect::config::TlsSetting;
use common::*;

fn main() -> anyhow::Result<()> {
    let rt = runtime()?;
    // 128 daemons, each with its listener, connections and log.
    let fds = autocollect::server::listener::raise_open_file_limit();
    let which = std::env::var("CLUSTER_BENCH").unwrap_or_default();
    rt.block_on(async {
        println!("cluster on {} (open-file limit {fds})", machine());
        println!("daemon: {}", daemon_exe().display());
        let one_size = which.parse::<usize>().ok();
        if which != "large" && one_size.is_none() {
            small().await?;
        }
        let runs = |default: usize| {
            std::env::var("CLUSTER_BENCH_RUNS")
                .ok()
                .and_then(|r| r.parse().ok())
                .unwrap_or(default)
        };
        if let Some(size) = one_size {
            bench(size, runs(10), Duration::from_millis(150), true).await?;
        } else if which != "small" {
            bench(32, runs(20), Duration::from_millis(200), true).await?;
            bench(64, runs(10), Duration::from_millis(150), true).await?;
            bench(128, runs(10), Duration::from_millis(150), true).await?;
        }
        Ok(())
    })
}

/// The 3-node rows: steady over TLS and plain HTTP, and first collections.
async fn small() -> anyhow::Result<()> {
    bench(3, 50, Duration::from_millis(50), true).await?;
    bench(3, 50, Duration::from_millis(50), false).await?;
    let tls = first_collection(3, 15, true).await?;
    let plain = first_collection(3, 15, false).await?;
    println!(
        " 3 nodes, first collection after start (new connections): TLS median {}, plain HTTP median {}: the handshakes cost {}",
        fmt_duration(tls.median()),
        fmt_duration(plain.median()),
        fmt_duration(tls.median().saturating_sub(plain.median())),
    );
    Ok(())
}

/// A cluster of `size` nodes, over TLS or plain HTTP, each node on an
/// address of its own (127.0.0.1, 127.0.0.2, ...), as each node of a real
/// cluster is on a host of its own. (A client keeps TLS session tickets
/// by host name, so nodes sharing one address would be offered each
/// other's tickets, and a coordinator's session would never resume.)
/// Every cluster of the run shares one compiled-plugin cache, so that
/// only the first compiles the plugins (each daemon would otherwise
/// compile them at its start, before the timed collections but on the
/// same cores).
async fn launch(tmp: &std::path::Path, size: usize, tls: bool) -> anyhow::Result<LocalCluster> {
    let specs: Vec<NodeSpec> = (1..=size)
        .map(|i| {
            let mut spec = NodeSpec::loopback(&format!("n{i}"));
            spec.ip = std::net::Ipv4Addr::new(127, 0, (i / 250) as u8, (i % 250) as u8).into();
            spec
        })
        .collect();
    let cache = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-plugin-cache");
    LocalCluster::launch_on(&daemon_exe(), tmp, &specs, |config| {
        config.plugin_cache_dir = Some(cache.clone());
        if !tls {
            config.tls = Some(TlsSetting::Off);
        }
    })
    .await
}

/// The first collection of `runs` fresh clusters.
async fn first_collection(size: usize, runs: usize, tls: bool) -> anyhow::Result<Samples> {
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let tmp = tempfile::tempdir()?;
        let cluster = launch(tmp.path(), size, tls).await?;
        samples.push(timed_collection(&cluster.admin("n1")).await?);
    }
    Ok(Samples::new(samples))
}

async fn bench(size: usize, runs: usize, target: Duration, tls: bool) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let cluster = launch(tmp.path(), size, tls).await?;
    let admin = cluster.admin("n1");
    let pids: Vec<u32> = cluster.nodes.iter().filter_map(|n| n.pid()).collect();
    let rss = |field| {
        pids.iter()
            .map(|&p| proc_status_bytes(p, field).unwrap_or(0))
            .collect::<Vec<_>>()
    };
    let idle = rss("VmRSS");
    let handshakes_before = handshakes(&cluster).await?;

    let mut samples = Vec::with_capacity(runs);
    let mut cpu = CpuByThread::default();
    let account = std::env::var_os("CLUSTER_BENCH_CPU").is_some();
    let mut profiler = Profiler::from_env()?;
    for run in 0..runs + 2 {
        let before = (account && run >= 2).then(|| CpuByThread::read(&pids));
        if run >= 2 {
            profiler.set(true)?;
        }
        let elapsed = timed_collection(&admin).await?;
        profiler.set(false)?;
        if let Some(before) = before {
            cpu.add_since(&before, &CpuByThread::read(&pids), pids[0]);
        }
        if run >= 2 {
            samples.push(elapsed);
        }
        // Not timed: every node lets go of the cluster lock before the next.
        for node in &cluster.nodes {
            cluster.admin(&node.name).wait_idle(10.0).await?;
        }
    }
    let s = Samples::new(samples);
    if account {
        cpu.print(size, runs);
        let after = handshakes(&cluster).await?;
        let per = ((runs + 2) * (size - 1).max(1)) as f64;
        println!(
            "          TLS handshakes on the other nodes, per node per collection (timed or not): {:.2} full, {:.2} resumed",
            (after.0 - handshakes_before.0) as f64 / per,
            (after.1 - handshakes_before.1) as f64 / per,
        );
    }
    let peak = rss("VmHWM");
    println!(
        "{size:>3} nodes, {}: start -> all collected  n={} median {}  p90 {}  min {}  (target < {}: {})",
        if tls { "TLS" } else { "plain HTTP" },
        s.len(),
        fmt_duration(s.median()),
        fmt_duration(s.percentile(90.0)),
        fmt_duration(s.min()),
        fmt_duration(target),
        if s.median() < target {
            "met"
        } else {
            "NOT met"
        }
    );
    println!(
        "          RSS coordinator idle {}  peak {}{};  other nodes idle max {}  peak max {};  all {} daemons at peak {}",
        mib(idle[0]),
        mib(peak[0]),
        if size == 128 {
            format!(
                " (target < 96 MiB: {})",
                if peak[0] < 96 << 20 { "met" } else { "NOT met" }
            )
        } else {
            String::new()
        },
        mib(idle[1..].iter().copied().max().unwrap_or(0)),
        mib(peak[1..].iter().copied().max().unwrap_or(0)),
        size,
        mib(peak.iter().sum()),
    );
    Ok(())
}

/// Full and resumed TLS handshakes so far, summed over every node but
/// the coordinating one (`autocollect_tls_handshakes_total`).
async fn handshakes(cluster: &LocalCluster) -> anyhow::Result<(u64, u64)> {
    let mut sum = (0, 0);
    for node in &cluster.nodes[1..] {
        let (_, body) = cluster
            .reader(&node.name)
            .request(reqwest::Method::GET, "/metrics", None, true)
            .await?;
        let text = body.as_str().unwrap_or_default();
        let count = |kind: &str| {
            let prefix = format!("autocollect_tls_handshakes_total{{kind=\"{kind}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(&prefix)?.parse::<u64>().ok())
                .unwrap_or(0)
        };
        sum.0 += count("full");
        sum.1 += count("resumed");
    }
    Ok(sum)
}

/// CPU time of the daemons by thread name (digits dropped), summed over
/// timed collections only (`CLUSTER_BENCH_CPU=1`): where a collection's
/// CPU goes. Live threads from `schedstat` (nanoseconds); threads that
/// ended meanwhile (a job's budget watcher, idle blocking-pool threads)
/// only show in the process's total (`stat`, in clock ticks), so they
/// are the difference, reported as "ended threads".
#[derive(Default, Clone)]
struct CpuByThread {
    /// (pid, thread name) -> ns, for live threads.
    threads: std::collections::HashMap<(u32, String), u64>,
    /// pid -> ns, the whole process (ended threads included).
    processes: std::collections::HashMap<u32, u64>,
    /// Accumulated deltas: thread name -> ns.
    by_name: std::collections::BTreeMap<String, u64>,
    /// Accumulated: the first daemon's (the coordinator's) whole process.
    coordinator: u64,
}

impl CpuByThread {
    fn read(pids: &[u32]) -> CpuByThread {
        // SAFETY: sysconf has no preconditions.
        let tick_ns = 1_000_000_000 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        let mut snapshot = CpuByThread::default();
        for &pid in pids {
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                let fields: Vec<&str> = stat
                    .rsplit(')')
                    .next()
                    .unwrap_or("")
                    .split_whitespace()
                    .collect();
                let ticks: u64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0)
                    + fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0);
                snapshot.processes.insert(pid, ticks * tick_ns);
            }
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                continue;
            };
            for task in tasks.flatten() {
                let dir = task.path();
                let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
                let name: String = name
                    .trim()
                    .trim_end_matches(|c: char| c.is_ascii_digit() || c == '-')
                    .to_string();
                let ns = std::fs::read_to_string(dir.join("schedstat"))
                    .ok()
                    .and_then(|s| s.split_whitespace().next()?.parse().ok())
                    .unwrap_or(0);
                let tid = task
                    .file_name()
                    .to_string_lossy()
                    .parse::<u32>()
                    .unwrap_or(0);
                snapshot.threads.insert((tid, name), ns);
            }
        }
        snapshot
    }

    /// Add what ran between `before` and `after`; the coordinator is
    /// `coordinator`'s process.
    fn add_since(&mut self, before: &CpuByThread, after: &CpuByThread, coordinator: u32) {
        let process = |pid| {
            let at = |s: &CpuByThread| s.processes.get(&pid).copied().unwrap_or(0);
            at(after).saturating_sub(at(before))
        };
        self.coordinator += process(coordinator);
        let mut live = 0u64;
        for (key, &ns) in &after.threads {
            let delta = ns.saturating_sub(before.threads.get(key).copied().unwrap_or(0));
            live += delta;
            *self.by_name.entry(key.1.clone()).or_default() += delta;
        }
        let total: u64 = after.processes.keys().map(|&pid| process(pid)).sum();
        *self
            .by_name
            .entry("(ended threads, by ticks)".into())
            .or_default() += total.saturating_sub(live);
    }

    fn print(&self, size: usize, runs: usize) {
        let all: u64 = self.by_name.values().sum();
        println!(
            "          daemons' CPU per collection: {} ({} per node), by thread:",
            fmt_duration(Duration::from_nanos(all / runs as u64)),
            fmt_duration(Duration::from_nanos(all / runs as u64 / size as u64)),
        );
        println!(
            "            (of which the coordinating daemon, all its threads: {} per collection, {:.1} %)",
            fmt_duration(Duration::from_nanos(self.coordinator / runs as u64)),
            100.0 * self.coordinator as f64 / all.max(1) as f64
        );
        let mut names: Vec<_> = self.by_name.iter().collect();
        names.sort_by_key(|(_, ns)| std::cmp::Reverse(**ns));
        for (name, ns) in names.into_iter().filter(|(_, ns)| **ns > 0) {
            println!(
                "            {name:<28} {:>10} per collection  {:>5.1} %",
                fmt_duration(Duration::from_nanos(ns / runs as u64)),
                100.0 * *ns as f64 / all.max(1) as f64
            );
        }
    }
}

/// `perf record --control fifo:CTL,ACK -D -1 ...` with
/// `CLUSTER_BENCH_PERF_CTL=CTL,ACK`: perf samples the timed collections
/// only, not the launches, the idle waits or this bench's reading of
/// `/proc` between them.
struct Profiler(Option<(std::fs::File, std::io::BufReader<std::fs::File>)>);

impl Profiler {
    fn from_env() -> anyhow::Result<Profiler> {
        let Ok(fifos) = std::env::var("CLUSTER_BENCH_PERF_CTL") else {
            return Ok(Profiler(None));
        };
        let (ctl, ack) = fifos
            .split_once(',')
            .ok_or_else(|| anyhow::anyhow!("CLUSTER_BENCH_PERF_CTL: expected CTL,ACK"))?;
        let ctl = std::fs::OpenOptions::new().write(true).open(ctl)?;
        let ack = std::io::BufReader::new(std::fs::File::open(ack)?);
        Ok(Profiler(Some((ctl, ack))))
    }

    /// Enable or disable perf's events, once perf has acknowledged.
    fn set(&mut self, on: bool) -> anyhow::Result<()> {
        use std::io::{BufRead, Write};
        let Some((ctl, ack)) = &mut self.0 else {
            return Ok(());
        };
        ctl.write_all(if on { b"enable\n" } else { b"disable\n" })?;
        let mut line = String::new();
        ack.read_line(&mut line)?;
        Ok(())
    }
}
