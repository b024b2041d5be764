//! The daemon's Prometheus metrics: one process-wide registry of counters,
//! gauges and histograms (plain atomics, no dependency), and its text
//! exposition (format 0.0.4) for `GET /metrics`. Other modules only call
//! the recording methods of [`global()`]; what they mean for the cluster
//! is theirs.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

/// The exposition's content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A monotonic counter.
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Durations, in seconds.
pub struct Histogram {
    bounds: &'static [f64],
    inner: Mutex<HistogramData>,
}

#[derive(Default)]
struct HistogramData {
    /// Per bucket (not cumulative), plus one for `+Inf`.
    counts: Vec<u64>,
    sum: f64,
}

/// Buckets of a job's duration: a tenth of a second to an hour.
const JOB_SECONDS: &[f64] = &[
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            inner: Mutex::new(HistogramData {
                counts: vec![0; bounds.len() + 1],
                sum: 0.0,
            }),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let bucket = self
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.bounds.len());
        let mut data = self.inner.lock().unwrap();
        data.counts[bucket] += 1;
        data.sum += secs;
    }

    /// How many durations were observed.
    pub fn count(&self) -> u64 {
        self.inner.lock().unwrap().counts.iter().sum()
    }
}

/// How a plugin run ended, for `autocollect_plugin_runs_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    Ok,
    /// The plugin reported a failure (a status code, an option, an error).
    Failed,
    Cancelled,
    Trap,
    Deadline,
    Memory,
    /// The host could not set the run up.
    Host,
}

const OUTCOMES: [RunOutcome; 7] = [
    RunOutcome::Ok,
    RunOutcome::Failed,
    RunOutcome::Cancelled,
    RunOutcome::Trap,
    RunOutcome::Deadline,
    RunOutcome::Memory,
    RunOutcome::Host,
];

impl RunOutcome {
    fn as_str(self) -> &'static str {
        match self {
            RunOutcome::Ok => "ok",
            RunOutcome::Failed => "failed",
            RunOutcome::Cancelled => "cancelled",
            RunOutcome::Trap => "trap",
            RunOutcome::Deadline => "deadline",
            RunOutcome::Memory => "memory",
            RunOutcome::Host => "host",
        }
    }
}

/// A plugin role, for the `role` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunRole {
    Collector,
    Uploader,
}

/// How a coordinated task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskOutcome {
    /// Every chosen node collected (and uploaded, if asked).
    Completed,
    /// Ran to its end, but at least one node failed.
    Failed,
    Cancelled,
}

/// Why a request was turned away before it was served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttle {
    /// Too many failed sign-ins from the client's address (429).
    SignIn,
    /// The password verification queue was full (503).
    Verification,
    /// Public requests filled the connections not kept for nodes (503).
    Connections,
}

pub struct Metrics {
    pub tasks_started: Counter,
    tasks_ended: [Counter; 3],
    pub collection_seconds: Histogram,
    pub upload_seconds: Histogram,
    pub collected_bytes: Counter,
    pub uploaded_bytes: Counter,
    /// `[role][outcome]`.
    plugin_runs: [[Counter; OUTCOMES.len()]; 2],
    pub programs_started: Counter,
    pub programs_killed: Counter,
    pub auth_failures: Counter,
    throttled: [Counter; 3],
    pub connections_open: Gauge,
    /// `[full, resumed]`.
    tls_handshakes: [Counter; 2],
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    tasks_started: Counter::default(),
    tasks_ended: Default::default(),
    collection_seconds: Histogram::new(JOB_SECONDS),
    upload_seconds: Histogram::new(JOB_SECONDS),
    collected_bytes: Counter::default(),
    uploaded_bytes: Counter::default(),
    plugin_runs: Default::default(),
    programs_started: Counter::default(),
    programs_killed: Counter::default(),
    auth_failures: Counter::default(),
    throttled: Default::default(),
    connections_open: Gauge::default(),
    tls_handshakes: Default::default(),
});

/// This process's metrics.
pub fn global() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    pub fn task_ended(&self, outcome: TaskOutcome) {
        self.tasks_ended[outcome as usize].inc();
    }

    pub fn tasks_ended(&self, outcome: TaskOutcome) -> u64 {
        self.tasks_ended[outcome as usize].get()
    }

    pub fn plugin_run(&self, role: RunRole, outcome: RunOutcome) {
        let i = OUTCOMES.iter().position(|o| *o == outcome).unwrap_or(0);
        self.plugin_runs[role as usize][i].inc();
    }

    pub fn plugin_runs(&self, role: RunRole, outcome: RunOutcome) -> u64 {
        let i = OUTCOMES.iter().position(|o| *o == outcome).unwrap_or(0);
        self.plugin_runs[role as usize][i].get()
    }

    pub fn throttled(&self, why: Throttle) {
        self.throttled[why as usize].inc();
    }

    /// A TLS handshake the listener completed: a full one, or one that
    /// resumed an earlier session (a ticket).
    pub fn tls_handshake(&self, resumed: bool) {
        self.tls_handshakes[usize::from(resumed)].inc();
    }

    /// Every metric in Prometheus' text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, values: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (labels, v) in values {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        counter(
            "autocollect_tasks_started_total",
            "Collection tasks this node started as their coordinator.",
            &[("", self.tasks_started.get())],
        );
        let ended: Vec<(String, u64)> = [
            ("completed", TaskOutcome::Completed),
            ("failed", TaskOutcome::Failed),
            ("cancelled", TaskOutcome::Cancelled),
        ]
        .iter()
        .map(|(name, o)| (format!("{{outcome=\"{name}\"}}"), self.tasks_ended(*o)))
        .collect();
        counter(
            "autocollect_tasks_ended_total",
            "Collection tasks coordinated here that ended, by outcome (failed: at least one node failed).",
            &labelled(&ended),
        );
        counter(
            "autocollect_collected_bytes_total",
            "Bytes of the artifacts this node's collections kept.",
            &[("", self.collected_bytes.get())],
        );
        counter(
            "autocollect_uploaded_bytes_total",
            "Bytes this node's uploads sent.",
            &[("", self.uploaded_bytes.get())],
        );
        let mut runs = Vec::new();
        for (role, role_name) in [
            (RunRole::Collector, "collector"),
            (RunRole::Uploader, "uploader"),
        ] {
            for outcome in OUTCOMES {
                runs.push((
                    format!("{{role=\"{role_name}\",outcome=\"{}\"}}", outcome.as_str()),
                    self.plugin_runs(role, outcome),
                ));
            }
        }
        counter(
            "autocollect_plugin_runs_total",
            "Plugin runs on this node, by role and outcome.",
            &labelled(&runs),
        );
        let outcome =
            |o| self.plugin_runs(RunRole::Collector, o) + self.plugin_runs(RunRole::Uploader, o);
        counter(
            "autocollect_plugin_traps_total",
            "Plugin runs that ended in a WebAssembly trap.",
            &[("", outcome(RunOutcome::Trap))],
        );
        counter(
            "autocollect_plugin_deadline_stops_total",
            "Plugin runs stopped at their deadline.",
            &[("", outcome(RunOutcome::Deadline))],
        );
        counter(
            "autocollect_plugin_memory_stops_total",
            "Plugin runs stopped at their memory limit.",
            &[("", outcome(RunOutcome::Memory))],
        );
        counter(
            "autocollect_programs_started_total",
            "Programs collectors started (exec).",
            &[("", self.programs_started.get())],
        );
        counter(
            "autocollect_programs_killed_total",
            "Programs (process groups) killed or signalled to stop by the host or their plugin.",
            &[("", self.programs_killed.get())],
        );
        counter(
            "autocollect_auth_failures_total",
            "Refused sign-ins: a wrong user name or password, or a malformed Authorization header.",
            &[("", self.auth_failures.get())],
        );
        let throttled: Vec<(String, u64)> = [
            ("sign_in", Throttle::SignIn),
            ("verification_queue", Throttle::Verification),
            ("connections", Throttle::Connections),
        ]
        .iter()
        .map(|(name, t)| {
            (
                format!("{{reason=\"{name}\"}}"),
                self.throttled[*t as usize].get(),
            )
        })
        .collect();
        counter(
            "autocollect_throttled_requests_total",
            "Requests refused with 429 or 503 before they were served, by reason.",
            &labelled(&throttled),
        );
        counter(
            "autocollect_tls_handshakes_total",
            "TLS handshakes the listener completed, full or resumed from a session ticket.",
            &labelled(&[
                ("{kind=\"full\"}".to_string(), self.tls_handshakes[0].get()),
                (
                    "{kind=\"resumed\"}".to_string(),
                    self.tls_handshakes[1].get(),
                ),
            ]),
        );
        let _ = writeln!(
            out,
            "# HELP autocollect_connections_open Client and node connections open on the listener.\n\
             # TYPE autocollect_connections_open gauge\n\
             autocollect_connections_open {}",
            self.connections_open.get()
        );
        histogram(
            &mut out,
            "autocollect_collection_duration_seconds",
            "Duration of this node's collections (the collector's run).",
            &self.collection_seconds,
        );
        histogram(
            &mut out,
            "autocollect_upload_duration_seconds",
            "Duration of this node's uploads (artifact and manifest).",
            &self.upload_seconds,
        );
        out
    }
}

fn labelled(values: &[(String, u64)]) -> Vec<(&str, u64)> {
    values.iter().map(|(l, v)| (l.as_str(), *v)).collect()
}

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram) {
    let data = h.inner.lock().unwrap();
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    let mut cumulative = 0;
    for (bound, count) in h.bounds.iter().zip(&data.counts) {
        cumulative += count;
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
    }
    cumulative += data.counts[h.bounds.len()];
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
    let _ = writeln!(out, "{name}_sum {}", data.sum);
    let _ = writeln!(out, "{name}_count {cumulative}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_counted() {
        let h = Histogram::new(&[1.0, 10.0]);
        h.observe(Duration::from_millis(500));
        h.observe(Duration::from_secs(5));
        h.observe(Duration::from_secs(50));
        let mut out = String::new();
        histogram(&mut out, "x_seconds", "X.", &h);
        assert_eq!(
            out,
            "# HELP x_seconds X.\n# TYPE x_seconds histogram\n\
             x_seconds_bucket{le=\"1\"} 1\nx_seconds_bucket{le=\"10\"} 2\n\
             x_seconds_bucket{le=\"+Inf\"} 3\nx_seconds_sum 55.5\nx_seconds_count 3\n"
        );
    }

    #[test]
    fn every_metric_has_help_and_type() {
        let text = global().render();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|f| text.contains(&format!("# TYPE {f} histogram")))
                .unwrap_or(name);
            assert!(text.contains(&format!("# TYPE {family} ")), "{line}");
            assert!(text.contains(&format!("# HELP {family} ")), "{line}");
        }
    }
}
