//! The `collector` world: load a component that exports `collect`, check
//! its options, and run it in a sandbox under a deadline and cancel token.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::archive::{self as host_archive, Archive, ArchiveError, ArchiveHandle};
use super::exec::{ExecPolicy, ExecRun, Exit, Process, SpawnError, Stream};
use super::inspect::Role;
use super::run::{
    VALIDATION_LIMITS, classify, finish, link, new_run_store, store_deadline, supervise,
    validation_store,
};
use super::sandbox::{
    GUEST_OUTPUT_DIR, InputGrant, JobBudget, LeftOut, PluginEvent, RunLabels, RunLimits,
    RunObserver, RunSetup, RunState, truncate_utf8,
};
use super::{PluginHost, PluginIdentity, PluginSource};
use wasmtime::component::Resource;

pub use super::run::RunError;

pub(super) mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "collector",
        imports: {
            "autocollect:plugin/exec": async | trappable,
            "autocollect:plugin/archive": async | trappable,
        },
        exports: { default: async },
        with: {
            "autocollect:plugin/exec.process": crate::plugin::exec::Process,
            "autocollect:plugin/archive.archive": crate::plugin::archive::ArchiveHandle,
        },
    });
}

use bindings::CollectorPre;
use bindings::autocollect::plugin::{archive, budget, exec, inputs, log, progress, task, types};
use bindings::exports::autocollect::plugin::collect::CollectRequest;

impl types::Host for RunState {}

impl log::Host for RunState {
    fn log(&mut self, level: log::Level, message: String) {
        let level = match level {
            log::Level::Trace => tracing::Level::TRACE,
            log::Level::Debug => tracing::Level::DEBUG,
            log::Level::Info => tracing::Level::INFO,
            log::Level::Warn => tracing::Level::WARN,
            log::Level::Error => tracing::Level::ERROR,
        };
        RunState::log(self, level, &message);
    }
}

impl progress::Host for RunState {
    fn report(&mut self, done: u64, total: u64, message: String) {
        self.progress(done, total, &message);
    }
}

impl task::Host for RunState {
    fn parameters(&mut self) -> Vec<(String, String)> {
        self.parameters_read = true;
        self.task_parameters.clone()
    }

    fn honour(&mut self, key: String) {
        if HONOURABLE.contains(&key.as_str()) {
            self.honoured.insert(key);
        }
    }
}

/// Start parameters a collector says it honours (`task.honour`); a node
/// whose collector was given one and did not reports it as ignored.
const HONOURABLE: &[&str] = &["since", "until"];

impl inputs::Host for RunState {
    fn grants(&mut self) -> Vec<inputs::Grant> {
        self.grants
            .iter()
            .map(|(name, guest_path)| inputs::Grant {
                name: name.clone(),
                guest_path: guest_path.clone(),
            })
            .collect()
    }
}

impl budget::Host for RunState {
    fn limits(&mut self) -> budget::JobLimits {
        let left = self
            .deadline()
            .saturating_duration_since(std::time::Instant::now());
        let (max_bytes, max_files) = self
            .budget
            .as_ref()
            .map_or((u64::MAX, u64::MAX), |b| (b.max_bytes, b.max_files));
        budget::JobLimits {
            deadline_ms: left.as_millis() as u64,
            max_bytes,
            max_files,
        }
    }

    fn wrap_up(&mut self) -> Option<String> {
        RunState::wrap_up(self)
    }

    fn partial(&mut self, reason: String) {
        self.partial = Some(truncate_utf8(reason, MAX_PARTIAL_REASON));
    }

    fn left_out(&mut self, item: String, bytes: u64) {
        self.left_out.add(item, bytes);
    }
}

/// Longest `budget.partial` reason kept.
const MAX_PARTIAL_REASON: usize = 1000;

impl exec::Host for RunState {
    async fn spawn(
        &mut self,
        command: exec::Command,
    ) -> wasmtime::Result<Result<Resource<Process>, exec::ExecError>> {
        let plugin = self.labels().plugin.clone();
        let spawned = self
            .exec
            .spawn(&command.program, &command.args, &command.env, &plugin);
        Ok(match spawned {
            Ok(process) => Ok(self.table().push(process)?),
            Err(SpawnError::Denied(m)) => Err(exec::ExecError::Denied(m)),
            Err(SpawnError::Failed(m)) => Err(exec::ExecError::Failed(m)),
        })
    }
}

impl exec::HostProcess for RunState {
    async fn pid(&mut self, process: Resource<Process>) -> wasmtime::Result<u32> {
        Ok(self.table().get(&process)?.pid())
    }

    async fn write_stdin(
        &mut self,
        process: Resource<Process>,
        data: Vec<u8>,
    ) -> wasmtime::Result<Result<(), String>> {
        Ok(self.table().get_mut(&process)?.write_stdin(&data).await)
    }

    async fn close_stdin(&mut self, process: Resource<Process>) -> wasmtime::Result<()> {
        self.table().get_mut(&process)?.close_stdin();
        Ok(())
    }

    async fn read_line(
        &mut self,
        process: Resource<Process>,
    ) -> wasmtime::Result<Option<exec::OutputLine>> {
        let line = self.table().get_mut(&process)?.read_line().await;
        Ok(line.map(|l| exec::OutputLine {
            stream: match l.stream {
                Stream::Stdout => exec::OutputStream::Stdout,
                Stream::Stderr => exec::OutputStream::Stderr,
            },
            text: l.text,
        }))
    }

    async fn wait(&mut self, process: Resource<Process>) -> wasmtime::Result<exec::ExitStatus> {
        let exit = self.table().get_mut(&process)?.wait().await;
        Ok(match exit.map_err(wasmtime::Error::msg)? {
            Exit::Code(code) => exec::ExitStatus::Exited(code),
            Exit::Signal(signal) => exec::ExitStatus::Signaled(signal),
        })
    }

    async fn kill(&mut self, process: Resource<Process>) -> wasmtime::Result<()> {
        self.table().get_mut(&process)?.kill();
        Ok(())
    }

    async fn drop(&mut self, process: Resource<Process>) -> wasmtime::Result<()> {
        // Closes its stdin; the group is stopped when the run ends.
        self.table().delete(process)?;
        Ok(())
    }
}

impl archive::Host for RunState {}

fn wit_error(e: ArchiveError) -> archive::ArchiveError {
    match e {
        ArchiveError::InvalidName(m) => archive::ArchiveError::InvalidName(m),
        ArchiveError::Denied(m) => archive::ArchiveError::Denied(m),
        ArchiveError::Unsupported(m) => archive::ArchiveError::Unsupported(m),
        ArchiveError::Failed(m) => archive::ArchiveError::Failed(m),
    }
}

impl archive::HostArchive for RunState {
    async fn create(
        &mut self,
        name: String,
        options: archive::ArchiveOptions,
    ) -> wasmtime::Result<Result<Resource<ArchiveHandle>, archive::ArchiveError>> {
        let options = host_archive::ArchiveOptions {
            compression: match options.compression {
                archive::Compression::Stored => host_archive::Compression::Stored,
                archive::Compression::Deflate(level) => host_archive::Compression::Deflate(level),
            },
            password: options.password,
            max_entry_bytes: options.max_entry_bytes,
        };
        let ctx = self.archive.clone();
        let created = tokio::task::spawn_blocking(move || Archive::create(ctx, &name, options))
            .await
            .unwrap_or_else(|e| Err(ArchiveError::Failed(format!("creating the archive: {e}"))));
        Ok(match created {
            Ok(archive) => Ok(self
                .table()
                .push(ArchiveHandle(Arc::new(std::sync::Mutex::new(archive))))?),
            Err(e) => Err(wit_error(e)),
        })
    }

    async fn add_bytes(
        &mut self,
        handle: Resource<ArchiveHandle>,
        entry: String,
        data: Vec<u8>,
        mtime: Option<u64>,
    ) -> wasmtime::Result<Result<(), archive::ArchiveError>> {
        let archive = self.table().get(&handle)?.clone();
        let added = archive
            .with(move |a| a.add_bytes(&entry, data, mtime))
            .await;
        Ok(added.map_err(wit_error))
    }

    async fn add_file(
        &mut self,
        handle: Resource<ArchiveHandle>,
        grant: String,
        path: String,
        entry: String,
        redact: bool,
    ) -> wasmtime::Result<Result<archive::EntryInfo, archive::ArchiveError>> {
        let archive = self.table().get(&handle)?.clone();
        let added = archive
            .with(move |a| a.add_file(&grant, &path, &entry, redact))
            .await;
        Ok(added
            .map(|i| archive::EntryInfo {
                size: i.size,
                truncated: i.truncated,
                redacted: i.redacted,
            })
            .map_err(wit_error))
    }

    async fn finish(
        &mut self,
        handle: Resource<ArchiveHandle>,
    ) -> wasmtime::Result<Result<types::Artifact, archive::ArchiveError>> {
        let archive = self.table().get(&handle)?.clone();
        let finished = archive.with(|a| a.finish()).await;
        Ok(finished
            .map(|(name, size)| types::Artifact { name, size })
            .map_err(wit_error))
    }

    async fn drop(&mut self, handle: Resource<ArchiveHandle>) -> wasmtime::Result<()> {
        let archive = self.table().delete(handle)?;
        // The last reference may remove an unfinished zip: off the runtime.
        tokio::task::spawn_blocking(move || drop(archive));
        Ok(())
    }
}

/// A file a collector produced, as the plugin described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    pub name: String,
    pub size: u64,
}

/// A successful collection, as the plugin described it.
#[derive(Debug, Clone)]
pub struct Collected {
    pub artifacts: Vec<Artifact>,
    pub summary: String,
    /// The programs the run started (for the host's manifest).
    pub exec_runs: Vec<ExecRun>,
    /// The largest linear memory of the run, in bytes.
    pub memory_peak: u64,
    /// Why the plugin said the collection is partial (`budget.partial`).
    pub partial: Option<String>,
    /// What it said it left out (`budget.left-out`), secrets masked.
    pub left_out: LeftOut,
    /// Start parameters it was given but did not honour (`since`, `until`).
    pub ignored: Vec<String>,
    /// What the host read from each grant for the run's archives.
    pub grants_used: std::collections::BTreeMap<String, super::archive::GrantUse>,
}

/// One collection to run.
pub struct CollectJob<'a> {
    pub labels: RunLabels,
    /// From the node's configuration.
    pub options: &'a [(String, String)],
    /// Host directory for the output (must exist); also where programs
    /// the plugin starts run.
    pub output_dir: &'a Path,
    pub limits: RunLimits,
    /// Programs the plugin may start.
    pub exec: Arc<ExecPolicy>,
    /// The start request's parameters (`task.parameters()`).
    pub parameters: Vec<(String, String)>,
    /// Host directories the plugin may read (`[[collector.inputs]]`).
    pub inputs: &'a [InputGrant],
    /// The job's disk budget, for `budget.limits` and `budget.wrap-up`.
    pub budget: Option<JobBudget>,
    pub progress: watch::Sender<Option<PluginEvent>>,
    /// Sees every log line and progress report (local runs, tests).
    pub observer: Option<Arc<dyn RunObserver>>,
    /// Stops the run at once.
    pub cancel: CancellationToken,
    /// Set (before `cancel`) when the run must end without the programs'
    /// grace periods: they are killed at once (a job over its budget).
    pub urgent: Arc<AtomicBool>,
}

/// A compiled collector, ready to be instantiated for each run.
pub struct CollectorPlugin {
    host: Arc<PluginHost>,
    source: PluginSource,
    identity: PluginIdentity,
    pre: CollectorPre<RunState>,
}

impl CollectorPlugin {
    /// Compile (or fetch from cache) and link a collector. Fails with a
    /// clear message if the component imports something the sandbox does
    /// not offer or does not export the `collector` world.
    pub fn load(host: &Arc<PluginHost>, source: PluginSource) -> Result<CollectorPlugin> {
        let pre = link(host, &source, Role::Collector)?;
        let identity = host.identity(pre.component());
        let pre = CollectorPre::new(pre)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("plugin {source} does not export the collector world"))?;
        Ok(CollectorPlugin {
            host: host.clone(),
            source,
            identity,
            pre,
        })
    }

    pub fn source(&self) -> &PluginSource {
        &self.source
    }

    /// The component's SHA-256 and the WIT version it was built against.
    pub fn identity(&self) -> &PluginIdentity {
        &self.identity
    }

    /// Ask the plugin whether `options` are acceptable (no filesystem).
    pub async fn validate_options(&self, options: &[(String, String)]) -> Result<(), RunError> {
        let limits = VALIDATION_LIMITS;
        let (mut store, tail, cancel) = validation_store(&self.host, &self.source)?;
        let instance = self.pre.instantiate_async(&mut store).await;
        let instance = instance.map_err(|e| classify(&store, &tail, limits, e))?;
        let options = options.to_vec();
        let call = instance
            .autocollect_plugin_collect()
            .call_validate_options(&mut store, &options);
        let result = supervise(call, &cancel, store_deadline(limits)).await;
        finish(&store, &tail, limits, result)?.map_err(RunError::from)
    }

    /// Instantiate the plugin in a store like `validate_options`'s and
    /// call nothing: the start cost without a call (benchmarks).
    #[doc(hidden)]
    pub async fn instantiate_only(&self) -> Result<(), RunError> {
        let (mut store, tail, _cancel) = validation_store(&self.host, &self.source)?;
        let instance = self.pre.instantiate_async(&mut store).await;
        instance
            .map(drop)
            .map_err(|e| classify(&store, &tail, VALIDATION_LIMITS, e))
    }

    /// Run one collection into `output_dir` (host path, which must exist).
    /// Progress goes to `progress`; `cancel` stops the run at once.
    pub async fn collect(&self, job: CollectJob<'_>) -> Result<Collected, RunError> {
        let CollectJob {
            labels,
            options,
            output_dir,
            limits,
            exec,
            parameters,
            inputs,
            budget,
            progress,
            observer,
            cancel,
            urgent,
        } = job;
        let request = CollectRequest {
            context: types::JobContext {
                task_id: labels.task_id.clone(),
                node: labels.node.clone(),
            },
            options: options.to_vec(),
            output_dir: GUEST_OUTPUT_DIR.to_string(),
        };
        let plugin = labels.plugin.clone();
        let grace = exec.grace;
        let redaction_asked = parameters
            .iter()
            .any(|(k, v)| k == "log-redaction-level" && v == "partial");
        let encryption_asked = parameters.iter().any(|(k, _)| k == "encryption-password");
        let given: Vec<String> = parameters.iter().map(|(k, _)| k.clone()).collect();
        let secrets: Vec<String> = parameters
            .iter()
            .filter(|(k, v)| {
                !v.is_empty() && (k == "log-redaction-salt" || k == "encryption-password")
            })
            .map(|(_, v)| v.clone())
            .collect();
        let (mut store, tail) = new_run_store(
            &self.host,
            RunSetup {
                labels,
                output_dir: Some(output_dir),
                artifact_dir: None,
                http_origin: None,
                http_route: None,
                http_tls: None,
                exec: Some(exec),
                task_parameters: parameters,
                inputs,
                budget,
                limits,
                progress: Some(progress),
                observer,
                cancel: cancel.clone(),
            },
        )?;
        let groups = store.data().exec.groups.clone();
        let outcome = async {
            let instance = self.pre.instantiate_async(&mut store).await;
            let instance = instance.map_err(|e| classify(&store, &tail, limits, e))?;
            let call = instance
                .autocollect_plugin_collect()
                .call_collect(&mut store, &request);
            let result = supervise(call, &cancel, store_deadline(limits)).await;
            finish(&store, &tail, limits, result)?.map_err(RunError::from)
        }
        .await;
        let parameters_read = store.data().parameters_read;
        let exec_runs = store.data().exec.runs.snapshot();
        let memory_peak = store.data().memory_peak();
        let grants_used = store.data().archive.used.lock().unwrap().clone();
        let ignored: Vec<String> = HONOURABLE
            .iter()
            .filter(|key| given.iter().any(|g| g == *key))
            .filter(|key| !store.data().honoured.contains(**key))
            .map(|key| key.to_string())
            .collect();
        // The plugin holds the salt and the password: its words never
        // carry them into status or the manifest.
        let mask = |text: String| {
            secrets.iter().fold(text, |t, secret| {
                t.replace(secret.as_str(), crate::protocol::MASK)
            })
        };
        let partial = store.data().partial.clone().map(mask);
        let mut left_out = store.data().left_out.clone();
        for (item, _) in &mut left_out.items {
            *item = mask(std::mem::take(item));
        }
        // However the run ended: the store (and every child's stdin) goes,
        // then whatever the plugin started is stopped before we return.
        drop(store);
        let grace = if urgent.load(Ordering::Relaxed) {
            std::time::Duration::ZERO
        } else {
            grace
        };
        groups.terminate(grace, &plugin).await;
        let outcome = outcome?;
        if redaction_asked && !parameters_read {
            return Err(RunError::Host(
                "the collector ignored logRedactionLevel=partial (it never read the \
                 request's parameters): its output may hold unredacted data"
                    .into(),
            ));
        }
        if encryption_asked && !parameters_read {
            return Err(RunError::Host(
                "the collector ignored encryptionPassword (it never read the \
                 request's parameters): its output is not encrypted"
                    .into(),
            ));
        }
        Ok(Collected {
            artifacts: outcome
                .artifacts
                .into_iter()
                .map(|a| Artifact {
                    name: a.name,
                    size: a.size,
                })
                .collect(),
            summary: outcome.summary,
            exec_runs,
            memory_peak,
            partial,
            left_out,
            ignored,
            grants_used,
        })
    }
}
