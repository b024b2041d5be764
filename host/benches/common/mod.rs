//! What the benchmarks share: timing summaries, memory readings from
//! /proc, and a line describing the machine. No framework: each bench is a
//! plain `main` (harness = false) that prints a table to paste into
//! BENCHMARKS.md.

#![allow(dead_code)] // each bench uses a different subset

use std::time::{Duration, Instant};

/// Sorted samples of one measurement.
pub struct Samples(pub Vec<Duration>);

impl Samples {
    pub fn new(mut v: Vec<Duration>) -> Samples {
        v.sort();
        Samples(v)
    }

    pub fn median(&self) -> Duration {
        self.0[self.0.len() / 2]
    }

    /// The `p`-th percentile (nearest rank).
    pub fn percentile(&self, p: f64) -> Duration {
        let rank = ((p / 100.0) * self.0.len() as f64).ceil() as usize;
        self.0[rank.clamp(1, self.0.len()) - 1]
    }

    pub fn min(&self) -> Duration {
        self.0[0]
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// How many samples took longer than `limit`.
    pub fn over(&self, limit: Duration) -> usize {
        self.0.iter().filter(|d| **d > limit).count()
    }
}

/// Run `f` `n` times (after `warmup` unrecorded runs), timing each.
pub fn time_n(warmup: usize, n: usize, mut f: impl FnMut()) -> Samples {
    for _ in 0..warmup {
        f();
    }
    Samples::new(
        (0..n)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed()
            })
            .collect(),
    )
}

/// `1.23 ms`, `456 µs`, `2.50 s`.
pub fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 1e-3 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{:.1} µs", s * 1e6)
    }
}

pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// A `/proc/PID/status` field in bytes (`VmRSS`, `VmHWM`), if readable.
pub fn proc_status_bytes(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The multi-threaded runtime every bench runs in.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// CPU model, core count and memory, for the results header.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(str::trim)
        .unwrap_or("unknown CPU")
        .to_string();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<u64>().ok())
        })
        .map_or("?".into(), |kib| {
            format!("{:.0} GiB", kib as f64 / 1048576.0)
        });
    format!("{model}, {cores} cores, {mem} RAM")
}

/// Collect from every node of the cluster `admin` talks to; how long it
/// took from the start request to the end, checking that every node
/// collected.
pub async fn timed_collection(admin: &autocollect::client::ApiClient) -> anyhow::Result<Duration> {
    use autocollect::coordinator::task::{NodeState, TaskState};
    let t = Instant::now();
    let started = admin.start("all").await?;
    let task = admin
        .wait_for_end(&started.task_id, Duration::from_secs(60))
        .await?;
    let elapsed = t.elapsed();
    anyhow::ensure!(task.status == TaskState::Completed, "{task:?}");
    anyhow::ensure!(
        task.per_node
            .values()
            .all(|n| n.status == NodeState::Collected),
        "{task:?}"
    );
    Ok(elapsed)
}

/// The `autocollect` binary cargo built for this bench, or the one
/// `AUTOCOLLECT_BENCH_DAEMON` names: to compare two builds in one sitting
/// (this machine's speed drifts by a fifth over an hour), alternating.
pub fn daemon_exe() -> std::path::PathBuf {
    std::env::var_os("AUTOCOLLECT_BENCH_DAEMON")
        .map(Into::into)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_autocollect").into())
}
