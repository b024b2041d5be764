//! Per-run store state: what a plugin may touch, and how it is stopped.
//!
//! Every run gets a fresh [`RunState`]: a WASI context whose only
//! filesystem is the run's output directory and the operator's input
//! grants, read-only (collectors), or its artifact's directory, read-only
//! (uploaders), no environment, no sockets,
//! stdout/stderr captured into a bounded tail; outgoing HTTP allowed only
//! to one origin (uploaders; checked in `send_request`); a memory limiter;
//! the log and progress sinks behind the host imports; and the deadline
//! and cancel token that the epoch callback checks every
//! [`super::EPOCH_TICK`].

use std::collections::VecDeque;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::io::AsyncWrite;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, Store, UpdateDeadline};
use wasmtime_wasi::cli::{AsyncStdoutStream, IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{
    Error as HttpError, RequestOptions, WasiBody, WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks,
    WasiHttpView,
};

use super::archive::{ArchiveCtx, Redaction};
use super::exec::{ExecCtx, ExecPolicy, ProcessGroups};
pub use super::outbound::Route;
pub use crate::config::InputGrant;
use crate::upload::Origin;

/// Where the output directory appears inside the guest.
pub const GUEST_OUTPUT_DIR: &str = "/output";
/// Where an uploader finds its artifact's directory (read-only).
pub const GUEST_ARTIFACT_DIR: &str = "/artifact";
/// Refused requests remembered per run (for the failure report).
const REFUSALS_KEPT: usize = 8;
/// Bytes of stdout+stderr kept per run.
const OUTPUT_TAIL_BYTES: usize = 16 * 1024;
/// Longest log message kept, in bytes.
const LOG_MESSAGE_MAX: usize = 4096;
/// Log messages a run may emit before the rest are dropped.
const LOG_BUDGET: u32 = 10_000;
/// Longest progress message kept, in bytes.
const PROGRESS_MESSAGE_MAX: usize = 200;

/// Limits of one run, from the role's configuration.
#[derive(Debug, Clone, Copy)]
pub struct RunLimits {
    pub timeout: Duration,
    pub memory_bytes: usize,
}

/// Who a run is for: tags its log lines.
#[derive(Debug, Clone)]
pub struct RunLabels {
    pub plugin: String,
    pub task_id: String,
    pub node: String,
}

/// Sees every log line and progress report of a run as it happens (what
/// `autocollect plugin run` prints, what `testing` records). Called on
/// the run's task: keep it quick.
pub trait RunObserver: Send + Sync {
    fn log(&self, level: tracing::Level, message: &str);
    fn progress(&self, done: u64, total: u64, message: &str);
}

/// What a plugin reports while it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginEvent {
    Progress {
        done: u64,
        total: u64,
        message: String,
    },
}

/// Why the host stopped a run (raised from the epoch callback, or decided
/// by the supervisor while the guest was blocked in a host call).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Interrupted {
    #[error("cancelled")]
    Cancelled,
    #[error("deadline exceeded")]
    Deadline,
}

/// The store's data for one run.
pub struct RunState {
    /// Keeps the epoch ticker running while this store lives.
    _ticking: super::epoch::Ticking,
    wasi: WasiCtx,
    table: ResourceTable,
    pub(super) memory: MemoryCap,
    labels: RunLabels,
    log_budget: u32,
    logs_dropped: u32,
    progress: Option<watch::Sender<Option<PluginEvent>>>,
    observer: Option<Arc<dyn RunObserver>>,
    deadline: Instant,
    timeout: std::time::Duration,
    cancel: CancellationToken,
    http: WasiHttpCtx,
    outbound: OutboundPolicy,
    pub(super) exec: ExecCtx,
    pub(super) task_parameters: Vec<(String, String)>,
    /// Whether the plugin asked for them (redaction is refused otherwise).
    pub(super) parameters_read: bool,
    /// The input grants preopened for this run: (name, guest path), for
    /// `inputs.grants()`.
    pub(super) grants: Vec<(String, String)>,
    /// The job's disk budget and what it holds, for `budget` (collectors).
    pub(super) budget: Option<JobBudget>,
    /// Why the plugin said its collection is partial (`budget.partial`).
    pub(super) partial: Option<String>,
    /// What the plugin said it left out (`budget.left-out`).
    pub(super) left_out: LeftOut,
    /// The start parameters the plugin said it honours (`task.honour`).
    pub(super) honoured: std::collections::BTreeSet<String>,
    /// What the `archive` import may use: the output directory, the
    /// grants' host directories, the request's redaction.
    pub(super) archive: Arc<ArchiveCtx>,
}

/// A job's disk budget as a collector sees it: the limits, and what the
/// job holds now (bytes, files), as whoever watches it counts.
#[derive(Clone)]
pub struct JobBudget {
    pub max_bytes: u64,
    pub max_files: u64,
    /// Bytes and files (archive spools and entries included).
    pub usage: Arc<dyn Fn() -> (u64, u64) + Send + Sync>,
    /// Where the run's archives count what they hold, for `usage` and
    /// whoever enforces the hard limits.
    pub archives: Arc<super::archive::ArchiveHeld>,
}

/// What a collector said it left out (`budget.left-out`): the first
/// [`LeftOut::ITEMS_MAX`] items, and the count and bytes of all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeftOut {
    pub items: Vec<(String, u64)>,
    pub count: u64,
    pub bytes: u64,
}

impl LeftOut {
    /// Items listed; the rest are only counted.
    pub const ITEMS_MAX: usize = 10_000;
    /// Longest item name kept, in bytes.
    pub const NAME_MAX: usize = 4096;

    pub fn add(&mut self, item: String, bytes: u64) {
        self.count += 1;
        self.bytes = self.bytes.saturating_add(bytes);
        if self.items.len() < Self::ITEMS_MAX {
            self.items
                .push((truncate_utf8(item, Self::NAME_MAX), bytes));
        }
    }
}

/// `text` cut to at most `max` bytes, on a character boundary.
pub fn truncate_utf8(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// The share of a limit past which `budget.wrap-up` answers.
const SOFT_SHARE: f64 = 0.9;

impl RunState {
    /// Why to wrap up now, if a soft limit (90 % of the deadline or of
    /// the disk budget) is passed.
    pub(super) fn wrap_up(&self) -> Option<String> {
        let total = self.timeout.as_secs_f64();
        let left = self
            .deadline
            .saturating_duration_since(Instant::now())
            .as_secs_f64();
        let used = total - left;
        if used >= SOFT_SHARE * total {
            return Some(format!(
                "the job is near its deadline: {used:.1} of {total:.1} s used"
            ));
        }
        let budget = self.budget.as_ref()?;
        let (bytes, files) = (budget.usage)();
        if bytes as f64 >= SOFT_SHARE * budget.max_bytes as f64 {
            return Some(format!(
                "the job is near its disk budget: {} of {} MiB used",
                bytes >> 20,
                budget.max_bytes >> 20
            ));
        }
        if files as f64 >= SOFT_SHARE * budget.max_files as f64 {
            return Some(format!(
                "the job is near its file budget: {files} of {} files and archive entries",
                budget.max_files
            ));
        }
        None
    }
}

impl WasiHttpView for RunState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.outbound,
        }
    }
}

impl WasiView for RunState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Everything needed to set up one run's store.
pub struct RunSetup<'a> {
    pub labels: RunLabels,
    /// Host directory preopened read-write as [`GUEST_OUTPUT_DIR`].
    pub output_dir: Option<&'a Path>,
    /// Host directory preopened read-only as [`GUEST_ARTIFACT_DIR`].
    pub artifact_dir: Option<&'a Path>,
    /// The only origin outgoing HTTP requests may go to (none: no HTTP).
    pub http_origin: Option<Origin>,
    /// How allowed requests get there: the checked addresses, or the
    /// operator's proxy.
    pub http_route: Option<Route>,
    /// What TLS to the origin trusts (`[upload]`'s CA file and roots).
    pub http_tls: Option<Arc<rustls::ClientConfig>>,
    /// Programs the run may start (collectors); they run in `output_dir`.
    pub exec: Option<Arc<ExecPolicy>>,
    /// The start request's parameters (collectors' `task.parameters()`).
    pub task_parameters: Vec<(String, String)>,
    /// Host directories preopened read-only at their guest paths
    /// (collectors' `[[collector.inputs]]`).
    pub inputs: &'a [InputGrant],
    /// The job's disk budget (collectors).
    pub budget: Option<JobBudget>,
    pub limits: RunLimits,
    pub progress: Option<watch::Sender<Option<PluginEvent>>>,
    /// Sees every log line and progress report.
    pub observer: Option<Arc<dyn RunObserver>>,
    pub cancel: CancellationToken,
}

/// A store ready to instantiate a plugin in, and the tail of its output.
pub fn new_store(
    engine: &wasmtime::Engine,
    setup: RunSetup<'_>,
) -> Result<(Store<RunState>, OutputTail)> {
    let tail = OutputTail::default();
    let mut wasi = WasiCtxBuilder::new();
    if BENCH_SPAWNED_STDIO.load(std::sync::atomic::Ordering::Relaxed) {
        wasi.stdout(AsyncStdoutStream::new(4096, tail.clone()))
            .stderr(AsyncStdoutStream::new(4096, tail.clone()));
    } else {
        wasi.stdout(tail.clone()).stderr(tail.clone());
    }
    wasi.allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .socket_addr_check(|_, _| Box::pin(async { false }));
    if let Some(dir) = setup.output_dir {
        wasi.preopened_dir(dir, GUEST_OUTPUT_DIR, FsPerms::ReadWrite)?;
    }
    // Read-only: wasmtime-wasi refuses every mutation (create, write,
    // rename, remove, set times) with `not-permitted`, and cap-std opens
    // within the directory, refusing a path or symlink that leaves it.
    for grant in setup.inputs {
        wasi.preopened_dir(&grant.host, &grant.guest, FsPerms::ReadOnly)
            .map_err(|e| {
                anyhow::anyhow!(
                    "input {:?}: opening {}: {e:#}",
                    grant.name,
                    grant.host.display()
                )
            })?;
    }
    if let Some(dir) = setup.artifact_dir {
        wasi.preopened_dir(dir, GUEST_ARTIFACT_DIR, FsPerms::ReadOnly)?;
        // Reads of the artifact (64 KiB at most each, from the page cache
        // as a rule) run inline instead of each going through the blocking
        // pool: that handoff halved upload throughput (BENCHMARKS.md, "An
        // upload's reads, inline"). wasmtime-wasi reads this setting at
        // two moments: when a directory is preopened, for that
        // directory's own operations (this one was preopened before the
        // setting, so they go through the pool), and when the plugin
        // opens a file, for that file. So it applies to the uploader's
        // files: its artifact, a regular file the host staged alone in a
        // directory of its own. A collector, whose directories hold what
        // its programs made, never gets it.
        wasi.allow_blocking_current_thread(true);
    }
    let outbound = OutboundPolicy {
        allowed: setup.http_origin,
        route: setup.http_route,
        tls: setup.http_tls,
        refused: Vec::new(),
        plugin: setup.labels.plugin.clone(),
    };
    let exec = ExecCtx {
        policy: setup.exec.unwrap_or_default(),
        cwd: setup.output_dir.map(Path::to_path_buf),
        groups: ProcessGroups::default(),
        runs: Default::default(),
    };
    let archive = Arc::new(ArchiveCtx {
        used: Default::default(),
        held: setup
            .budget
            .as_ref()
            .map(|b| b.archives.clone())
            .unwrap_or_default(),
        output_dir: setup.output_dir.map(Path::to_path_buf),
        grants: setup.inputs.to_vec(),
        redaction: Redaction::of_parameters(&setup.task_parameters),
    });
    let state = RunState {
        wasi: wasi.build(),
        table: ResourceTable::new(),
        memory: MemoryCap {
            limit: setup.limits.memory_bytes,
            exceeded: false,
            peak: 0,
        },
        labels: setup.labels,
        log_budget: LOG_BUDGET,
        logs_dropped: 0,
        progress: setup.progress,
        observer: setup.observer,
        deadline: Instant::now() + setup.limits.timeout,
        timeout: setup.limits.timeout,
        cancel: setup.cancel,
        http: WasiHttpCtx::new(),
        outbound,
        exec,
        task_parameters: setup.task_parameters,
        parameters_read: false,
        grants: setup
            .inputs
            .iter()
            .map(|g| (g.name.clone(), g.guest.clone()))
            .collect(),
        budget: setup.budget,
        partial: None,
        left_out: LeftOut::default(),
        honoured: Default::default(),
        archive,
        _ticking: super::epoch::Ticking::new(),
    };
    let mut store = Store::new(engine, state);
    store.limiter(|s| &mut s.memory);
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(|ctx| {
        let state = ctx.data();
        if state.cancel.is_cancelled() {
            return Err(Interrupted::Cancelled.into());
        }
        if Instant::now() >= state.deadline {
            return Err(Interrupted::Deadline.into());
        }
        // Let other tasks run, then check again at the next tick.
        Ok(UpdateDeadline::Yield(1))
    });
    Ok((store, tail))
}

impl RunState {
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    pub(super) fn table(&mut self) -> &mut ResourceTable {
        &mut self.table
    }

    pub fn labels(&self) -> &RunLabels {
        &self.labels
    }

    pub fn memory_cap_hit(&self) -> bool {
        self.memory.exceeded
    }

    /// The largest size a linear memory of this run grew to, in bytes.
    pub fn memory_peak(&self) -> u64 {
        self.memory.peak as u64
    }

    /// Outgoing requests the host refused during this run.
    pub fn refused_requests(&self) -> &[String] {
        &self.outbound.refused
    }

    pub(super) fn log(&mut self, level: tracing::Level, message: &str) {
        if self.log_budget == 0 {
            self.logs_dropped += 1;
            return;
        }
        self.log_budget -= 1;
        let message = truncate(message, LOG_MESSAGE_MAX);
        if let Some(observer) = &self.observer {
            observer.log(level, message);
        }
        let l = &self.labels;
        macro_rules! emit {
            ($lvl:expr) => {
                tracing::event!(target: "plugin", $lvl, plugin = %l.plugin, task = %l.task_id, node = %l.node, "{message}")
            };
        }
        match level {
            tracing::Level::ERROR => emit!(tracing::Level::ERROR),
            tracing::Level::WARN => emit!(tracing::Level::WARN),
            tracing::Level::INFO => emit!(tracing::Level::INFO),
            tracing::Level::DEBUG => emit!(tracing::Level::DEBUG),
            tracing::Level::TRACE => emit!(tracing::Level::TRACE),
        }
    }

    pub(super) fn progress(&mut self, done: u64, total: u64, message: &str) {
        if let Some(observer) = &self.observer {
            observer.progress(done, total, truncate(message, PROGRESS_MESSAGE_MAX));
        }
        if let Some(tx) = &self.progress {
            tx.send_replace(Some(PluginEvent::Progress {
                done,
                total,
                message: truncate(message, PROGRESS_MESSAGE_MAX).to_string(),
            }));
        }
    }

    /// Report (once, at the end of a run) how many log lines were dropped.
    pub fn finish_logging(&self) {
        if self.logs_dropped > 0 {
            let l = &self.labels;
            tracing::warn!(target: "plugin", plugin = %l.plugin, task = %l.task_id, node = %l.node,
                "plugin exceeded its log budget of {LOG_BUDGET} lines; {} dropped", self.logs_dropped);
        }
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The host's side of `wasi:http/outgoing-handler`: a request goes out
/// only if its scheme, host and port are the allowed origin. Everything
/// else is refused with `HTTP-request-denied`, logged and remembered.
/// Allowed requests go by the run's [`Route`]: to the addresses the host
/// checked (never resolved again), or through the operator's proxy.
pub struct OutboundPolicy {
    allowed: Option<Origin>,
    route: Option<Route>,
    tls: Option<Arc<rustls::ClientConfig>>,
    refused: Vec<String>,
    plugin: String,
}

type ResponseFuture = Box<
    dyn Future<
            Output = wasmtime_wasi_http::Result<(
                http::Response<WasiBody>,
                Box<dyn Future<Output = Result<(), HttpError>> + Send>,
            )>,
        > + Send,
>;

/// Body chunks (each one guest write, at most 1 MiB) buffered between the
/// plugin and the connection, so that reading the next chunk from disk
/// overlaps sending the previous ones. Bounds an upload's buffer memory.
const OUTGOING_BODY_BUFFER_CHUNKS: usize = 4;

impl WasiHttpHooks for OutboundPolicy {
    fn p2_outgoing_body_buffer_chunks(&mut self) -> usize {
        OUTGOING_BODY_BUFFER_CHUNKS
    }

    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> ResponseFuture {
        let origin = Origin::of_uri(request.uri());
        let permitted = matches!((&self.allowed, &origin), (Some(a), Ok(o)) if a == o);
        let way = self.route.clone().zip(self.tls.clone());
        let Some((route, tls)) = way.filter(|_| permitted) else {
            let target = format!("{} {}", request.method(), request.uri());
            tracing::warn!(plugin = %self.plugin, %target, allowed = ?self.allowed.as_ref().map(|o| o.to_string()),
                "refused an outgoing request: not the upload destination");
            if self.refused.len() < REFUSALS_KEPT {
                self.refused.push(target);
            }
            return Box::new(async { Err(HttpError::HttpRequestDenied) });
        };
        Box::new(async move { super::outbound::send(&route, &tls, request, options).await })
    }
}

/// Caps a run's linear memories (and tables) and remembers whether the cap
/// was what stopped it, so the failure can say so instead of "unreachable".
pub struct MemoryCap {
    limit: usize,
    exceeded: bool,
    /// The largest size granted to a linear memory (for the manifest).
    peak: usize,
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let ok = desired <= self.limit;
        self.exceeded |= !ok;
        if ok {
            self.peak = self.peak.max(desired);
        }
        Ok(ok)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

/// The last [`OUTPUT_TAIL_BYTES`] a plugin wrote to stdout/stderr. Writes
/// never fail or block, so a chatty plugin cannot stall on its output.
#[derive(Clone, Default)]
pub struct OutputTail(Arc<Mutex<VecDeque<u8>>>);

impl OutputTail {
    pub fn contents(&self) -> String {
        let buf = self.0.lock().unwrap();
        let (a, b) = buf.as_slices();
        let mut bytes = a.to_vec();
        bytes.extend_from_slice(b);
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// Benchmarks only: give stores wasmtime-wasi's `AsyncStdoutStream` (a
/// spawned writer task per stream, what every run had before) instead of
/// [`OutputTail`] itself, to compare the two in one process.
#[doc(hidden)]
pub static BENCH_SPAWNED_STDIO: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Most bytes a guest may write to stdout or stderr in one `write` (its
/// `check-write` permit); any amount is accepted, only the tail is kept.
const OUTPUT_WRITE_PERMIT: usize = 4096;

impl OutputTail {
    fn append(&self, data: &[u8]) {
        let mut buf = self.0.lock().unwrap();
        let keep = &data[data.len().saturating_sub(OUTPUT_TAIL_BYTES)..];
        buf.extend(keep);
        let excess = buf.len().saturating_sub(OUTPUT_TAIL_BYTES);
        buf.drain(..excess);
    }
}

/// The guest's stdout and stderr: written straight into the tail, in the
/// guest's call. (wasmtime-wasi's `AsyncStdoutStream` spawns a writer task
/// per stream at every store's creation, which woke another runtime
/// thread at each plugin start.)
impl StdoutStream for OutputTail {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

impl IsTerminal for OutputTail {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl OutputStream for OutputTail {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.append(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(OUTPUT_WRITE_PERMIT)
    }
}

/// Always ready: a write never waits.
impl Pollable for OutputTail {
    // `#[async_trait]`'s form of `async fn ready(&mut self) {}`.
    fn ready<'a, 'b>(&'a mut self) -> Pin<Box<dyn Future<Output = ()> + Send + 'b>>
    where
        'a: 'b,
        Self: 'b,
    {
        Box::pin(std::future::ready(()))
    }
}

impl AsyncWrite for OutputTail {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.append(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_stdout_goes_straight_into_the_tail_which_keeps_its_end() {
        let tail = OutputTail::default();
        let mut stream = StdoutStream::p2_stream(&tail);
        assert_eq!(stream.check_write().unwrap(), OUTPUT_WRITE_PERMIT);
        for _ in 0..(OUTPUT_TAIL_BYTES / OUTPUT_WRITE_PERMIT + 2) {
            stream
                .write(bytes::Bytes::from(vec![b'a'; OUTPUT_WRITE_PERMIT]))
                .unwrap();
        }
        stream.write(bytes::Bytes::from_static(b"end")).unwrap();
        stream.flush().unwrap();
        let kept = tail.contents();
        assert_eq!(kept.len(), OUTPUT_TAIL_BYTES);
        assert!(kept.ends_with("aaend"), "{kept}");
    }
}
