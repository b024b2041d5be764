//! Running one plugin outside a cluster: the test harness for plugin
//! authors, and what `autocollect plugin run` uses.
//!
//! A [`Collection`] runs a collector exactly as a node does (the same
//! [`CollectorPlugin::collect`]: the same sandbox, memory and time limits,
//! `validate-options` first, and a disk budget watched on the output and
//! temporary directories), but with what a test gives it: options, start
//! parameters, input grants, and programs answered by a script instead of
//! started ([`ExecScript`]). Its [`CollectionReport`] holds the outcome,
//! the artifacts, every log line and progress report, the scripted
//! programs' calls (with what the plugin wrote to their stdin), and the
//! run receipt: the manifest a node would write.
//!
//! An [`Upload`] sends a file with an uploader to a URL, as a node does,
//! with the sandbox's outbound policy (only the URL's origin).
//!
//! ```no_run
//! # async fn t() -> anyhow::Result<()> {
//! use autocollect::testing::{Collection, ScriptedRun};
//! let report = Collection::new("my-collector.wasm")
//!     .option("program", "/opt/tool")
//!     .exec_allow("/opt/tool")
//!     .script(|call| ScriptedRun::ok(["collecting", "done"]))
//!     .run()
//!     .await?;
//! assert!(report.outcome.is_ok(), "{:?}", report.outcome);
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::InputGrant;
use crate::manifest::{self, Manifest};
pub use crate::plugin::RunLimits;
use crate::plugin::collector::{CollectJob, Collected, CollectorPlugin, RunError};
use crate::plugin::exec::ExecPolicy;
pub use crate::plugin::exec::{ExecCall, ExecScript, Exit, ScriptedCall, ScriptedRun};
pub use crate::plugin::sandbox::RunObserver;
use crate::plugin::sandbox::{JobBudget, Route, RunLabels};
use crate::plugin::uploader::{Receipt, UploadFailure, UploadJob, UploaderPlugin};
use crate::plugin::{PluginHost, PluginSource};
pub use crate::protocol::{CollectParameters, PluginRef, Secret};
use crate::safe_dir::SafeDir;

/// The labels a local run's log lines carry.
const LOCAL: &str = "local";

impl ScriptedRun {
    /// Exit 0 after printing `stdout`.
    pub fn ok<S: Into<String>>(stdout: impl IntoIterator<Item = S>) -> ScriptedRun {
        ScriptedRun {
            stdout: stdout.into_iter().map(Into::into).collect(),
            stderr: Vec::new(),
            exit: Exit::Code(0),
        }
    }

    /// Exit `code` after printing `stderr`.
    pub fn fails<S: Into<String>>(code: i32, stderr: impl IntoIterator<Item = S>) -> ScriptedRun {
        ScriptedRun {
            stdout: Vec::new(),
            stderr: stderr.into_iter().map(Into::into).collect(),
            exit: Exit::Code(code),
        }
    }
}

/// One log line of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub level: tracing::Level,
    pub message: String,
}

/// One progress report of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
    pub message: String,
}

/// Records everything, and passes it on to another observer if given.
#[derive(Default)]
struct Recorder {
    logs: Mutex<Vec<LogLine>>,
    progress: Mutex<Vec<Progress>>,
    also: Option<Arc<dyn RunObserver>>,
}

impl RunObserver for Recorder {
    fn log(&self, level: tracing::Level, message: &str) {
        self.logs.lock().unwrap().push(LogLine {
            level,
            message: message.to_string(),
        });
        if let Some(also) = &self.also {
            also.log(level, message);
        }
    }

    fn progress(&self, done: u64, total: u64, message: &str) {
        self.progress.lock().unwrap().push(Progress {
            done,
            total,
            message: message.to_string(),
        });
        if let Some(also) = &self.also {
            also.progress(done, total, message);
        }
    }
}

/// The process's plugin host (one engine, its compiled components and
/// functions cached: [`PluginHost::for_authoring`]).
pub(crate) fn plugin_host() -> Result<Arc<PluginHost>> {
    // One engine per process (compiled components are cached in it).
    static HOST: std::sync::OnceLock<Arc<PluginHost>> = std::sync::OnceLock::new();
    if let Some(host) = HOST.get() {
        return Ok(host.clone());
    }
    let host = PluginHost::for_authoring()?;
    Ok(HOST.get_or_init(|| host).clone())
}

/// A collection to run: built up, then [`Collection::run`].
pub struct Collection {
    plugin: String,
    options: Vec<(String, String)>,
    parameters: CollectParameters,
    inputs: Vec<InputGrant>,
    exec_allow: Vec<String>,
    exec_env: Vec<(String, String)>,
    exec_env_allow: Vec<String>,
    script: Option<ExecScript>,
    limits: RunLimits,
    max_bytes: u64,
    max_files: u64,
    out_dir: Option<PathBuf>,
    observer: Option<Arc<dyn RunObserver>>,
}

impl Collection {
    /// `plugin`: `builtin:NAME` or a component's path. The daemon's
    /// defaults apply: 3600 s, 512 MiB, 8 GiB and 20,000 files on disk.
    pub fn new(plugin: impl Into<String>) -> Collection {
        let defaults = crate::config::PluginRole::default();
        let storage = crate::config::StorageSettings::default();
        Collection {
            plugin: plugin.into(),
            options: Vec::new(),
            parameters: CollectParameters::default(),
            inputs: Vec::new(),
            exec_allow: Vec::new(),
            exec_env: Vec::new(),
            exec_env_allow: Vec::new(),
            script: None,
            limits: RunLimits {
                timeout: Duration::from_secs_f64(defaults.timeout_secs),
                memory_bytes: (defaults.memory_limit_mb as usize) << 20,
            },
            max_bytes: storage.job_max_mb << 20,
            max_files: storage.job_max_files,
            out_dir: None,
            observer: None,
        }
    }

    pub fn option(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.options.push((key.into(), value.into()));
        self
    }

    /// The start parameters (`task.parameters()`), as a start request
    /// would give them; `tmp_dir` is the run's own.
    pub fn parameters(mut self, parameters: CollectParameters) -> Self {
        self.parameters = parameters;
        self
    }

    /// One start parameter by its WIT key (`log-redaction-level`,
    /// `log-redaction-salt`, `task-regexp`, `encryption-password`,
    /// `since`, `until`) or its API name (`logRedactionLevel`, ...).
    pub fn parameter(mut self, key: &str, value: impl Into<String>) -> Result<Self, String> {
        let value = Some(value.into());
        let p = &mut self.parameters;
        match key {
            "log-redaction-level" | "logRedactionLevel" => p.log_redaction_level = value,
            "log-redaction-salt" | "logRedactionSalt" => p.log_redaction_salt = value,
            "task-regexp" | "taskRegexp" => p.task_regexp = value,
            "encryption-password" | "encryptionPassword" => {
                p.encryption_password = value.map(Secret::new)
            }
            "since" => p.since = value,
            "until" => p.until = value,
            other => {
                return Err(format!(
                    "unknown start parameter {other:?} (known: log-redaction-level, \
                     log-redaction-salt, task-regexp, encryption-password, since, until)"
                ));
            }
        }
        Ok(self)
    }

    /// Grant `host` read-only as `/inputs/NAME`.
    pub fn input(mut self, name: impl Into<String>, host: impl Into<PathBuf>) -> Self {
        let name = name.into();
        self.inputs.push(InputGrant {
            guest: format!("/inputs/{name}"),
            name,
            host: host.into(),
        });
        self
    }

    /// Let the plugin start `program` (an absolute path).
    pub fn exec_allow(mut self, program: impl Into<String>) -> Self {
        self.exec_allow.push(program.into());
        self
    }

    /// The environment every started program gets.
    pub fn exec_env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.exec_env.push((name.into(), value.into()));
        self
    }

    /// Answer every program start with `respond` instead of starting it
    /// (after the same checks: `exec_allow`, the environment).
    pub fn script(
        mut self,
        respond: impl Fn(&ExecCall) -> ScriptedRun + Send + Sync + 'static,
    ) -> Self {
        self.script = Some(ExecScript::new(respond));
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.limits.timeout = timeout;
        self
    }

    pub fn memory_mb(mut self, mb: u64) -> Self {
        self.limits.memory_bytes = (mb as usize) << 20;
        self
    }

    /// The disk budget (`[storage] job_max_mb`, `job_max_files`).
    pub fn disk_budget(mut self, max_mb: u64, max_files: u64) -> Self {
        self.max_bytes = max_mb << 20;
        self.max_files = max_files;
        self
    }

    /// Where the output directory is made (it must not exist, or be
    /// empty); default: a temporary directory the report owns.
    pub fn out_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.out_dir = Some(dir.into());
        self
    }

    /// Also tell `observer` every log line and progress report, as they
    /// happen.
    pub fn observe(mut self, observer: Arc<dyn RunObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Load the plugin and check its options, then collect. An error is a
    /// plugin that does not load or a directory that cannot be made;
    /// everything the plugin does is in the report.
    pub async fn run(self) -> Result<CollectionReport> {
        let host = plugin_host()?;
        let source = PluginSource::parse(&self.plugin, Path::new("."))?;
        let plugin = {
            let host = host.clone();
            tokio::task::spawn_blocking(move || CollectorPlugin::load(&host, source)).await??
        };
        crate::config::check_inputs(&self.inputs, &[])?;

        let (temp, out_dir) = match &self.out_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                if std::fs::read_dir(dir)?.next().is_some() {
                    anyhow::bail!("{} is not empty", dir.display());
                }
                (None, dir.clone())
            }
            None => {
                let temp = tempfile::tempdir()?;
                let dir = temp.path().join("output");
                std::fs::create_dir(&dir)?;
                (Some(temp), dir)
            }
        };
        let tmp = tempfile::tempdir()?;
        let parameters = CollectParameters {
            tmp_dir: Some(tmp.path().display().to_string()),
            ..self.parameters.clone()
        };
        let recorder = Arc::new(Recorder {
            also: self.observer.clone(),
            ..Default::default()
        });
        let exec = Arc::new(ExecPolicy {
            allowed: self.exec_allow.clone(),
            env: self.exec_env.clone(),
            env_allowed: self.exec_env_allow.clone(),
            grace: Duration::from_secs(2),
            max_processes: 16,
            script: self.script.clone(),
        });

        let validated = plugin.validate_options(&self.options).await;
        let started = Instant::now();
        let outcome = match validated {
            Err(e) => Err(e),
            Ok(()) => {
                let cancel = CancellationToken::new();
                let urgent = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let breach: Arc<Mutex<Option<String>>> = Default::default();
                let usage = Arc::new(crate::node::budget::Usage::default());
                let watch = {
                    let (breach, cancel, urgent) = (breach.clone(), cancel.clone(), urgent.clone());
                    let roots = vec![
                        SafeDir::open_root(&out_dir)?,
                        SafeDir::open_root(tmp.path())?,
                    ];
                    crate::node::budget::watch(
                        roots,
                        SafeDir::open_root(&out_dir)?,
                        crate::node::budget::Limits {
                            max_bytes: self.max_bytes,
                            max_entries: self.max_files,
                            min_free_bytes: 0,
                        },
                        usage.clone(),
                        move |reason| {
                            *breach.lock().unwrap() = Some(reason);
                            urgent.store(true, std::sync::atomic::Ordering::Relaxed);
                            cancel.cancel();
                        },
                    )?
                };
                let (progress, _keep) = watch::channel(None);
                let result = plugin
                    .collect(CollectJob {
                        labels: RunLabels {
                            plugin: self.plugin.clone(),
                            task_id: LOCAL.into(),
                            node: LOCAL.into(),
                        },
                        options: &self.options,
                        output_dir: &out_dir,
                        limits: self.limits,
                        exec: exec.clone(),
                        parameters: parameters.plugin_parameters(),
                        inputs: &self.inputs,
                        budget: Some(JobBudget {
                            max_bytes: self.max_bytes,
                            max_files: self.max_files,
                            archives: usage.archives.clone(),
                            usage: {
                                let usage = usage.clone();
                                Arc::new(move || (usage.bytes(), usage.entries()))
                            },
                        }),
                        progress,
                        observer: Some(recorder.clone()),
                        cancel,
                        urgent,
                    })
                    .await;
                drop(watch);
                let breached = breach.lock().unwrap().take();
                match breached {
                    Some(reason) => Err(RunError::Host(reason)),
                    None => result,
                }
            }
        };
        let wall_time = started.elapsed();

        let artifacts: Vec<PathBuf> = match &outcome {
            Ok(c) => c.artifacts.iter().map(|a| out_dir.join(&a.name)).collect(),
            Err(_) => Vec::new(),
        };
        let receipt = match (&outcome, artifacts.first()) {
            (Ok(collected), Some(first)) => Some(receipt(
                first,
                &self.plugin,
                &plugin,
                &self.options,
                &parameters,
                &self.inputs,
                collected,
                wall_time,
            )?),
            _ => None,
        };
        let identity =
            crate::node::plugins::plugin_ref("collector", plugin.source(), plugin.identity());
        let logs = recorder.logs.lock().unwrap().clone();
        let progress = recorder.progress.lock().unwrap().clone();
        Ok(CollectionReport {
            outcome,
            out_dir,
            artifacts,
            logs,
            progress,
            exec_calls: self.script.map(|s| s.calls()).unwrap_or_default(),
            receipt,
            plugin: identity,
            _temp: temp,
        })
    }
}

/// The manifest a node would write for `artifact`.
#[allow(clippy::too_many_arguments)]
fn receipt(
    artifact: &Path,
    source: &str,
    plugin: &CollectorPlugin,
    options: &[(String, String)],
    parameters: &CollectParameters,
    inputs: &[InputGrant],
    collected: &Collected,
    wall_time: Duration,
) -> Result<Manifest> {
    let file = std::fs::File::open(artifact)
        .with_context(|| format!("the artifact {}", artifact.display()))?;
    let (sha256, size) = manifest::sha256_of(file)?;
    Ok(Manifest::new(manifest::Inputs {
        task_id: LOCAL,
        node: LOCAL,
        artifact: manifest::ArtifactInfo {
            name: artifact
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            size,
            sha256,
        },
        plugin_source: source.to_string(),
        plugin: plugin.identity(),
        options,
        parameters,
        grants: inputs,
        collected,
        wall_time,
        bytes_written: size,
    }))
}

/// What a [`Collection`] did.
pub struct CollectionReport {
    /// `Ok`: the plugin's artifacts and summary (and what the host
    /// recorded); `Err`: how it failed (an invalid option, a failure the
    /// plugin reported, a trap, a limit, ...).
    pub outcome: Result<Collected, RunError>,
    /// The output directory (removed with the report unless given with
    /// [`Collection::out_dir`]).
    pub out_dir: PathBuf,
    /// The artifacts' paths, the first one being what a node keeps.
    pub artifacts: Vec<PathBuf>,
    pub logs: Vec<LogLine>,
    pub progress: Vec<Progress>,
    /// Every scripted program start, with what was written to its stdin.
    pub exec_calls: Vec<ScriptedCall>,
    /// The manifest a node would write for the first artifact.
    pub receipt: Option<Manifest>,
    /// Which plugin ran.
    pub plugin: PluginRef,
    _temp: Option<tempfile::TempDir>,
}

impl CollectionReport {
    /// Whether some log line contains `text`.
    pub fn logged(&self, text: &str) -> bool {
        self.logs.iter().any(|l| l.message.contains(text))
    }
}

/// An upload to run: a file, to a URL, with an uploader.
pub struct Upload {
    plugin: String,
    options: Vec<(String, String)>,
    ca_file: Option<PathBuf>,
    limits: RunLimits,
    observer: Option<Arc<dyn RunObserver>>,
}

impl Upload {
    /// `plugin`: `builtin:NAME` or a component's path.
    pub fn new(plugin: impl Into<String>) -> Upload {
        let defaults = crate::config::PluginRole::uploader();
        Upload {
            plugin: plugin.into(),
            options: Vec::new(),
            ca_file: None,
            limits: RunLimits {
                timeout: Duration::from_secs_f64(defaults.timeout_secs),
                memory_bytes: (defaults.memory_limit_mb as usize) << 20,
            },
            observer: None,
        }
    }

    pub fn option(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.options.push((key.into(), value.into()));
        self
    }

    /// Trust this PEM CA file for `https://` (as `[upload] ca_file`).
    pub fn ca_file(mut self, file: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(file.into());
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.limits.timeout = timeout;
        self
    }

    pub fn memory_mb(mut self, mb: u64) -> Self {
        self.limits.memory_bytes = (mb as usize) << 20;
        self
    }

    pub fn observe(mut self, observer: Arc<dyn RunObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Send `file` to `url` (the URL's origin is the only one the plugin
    /// may reach; its host is resolved once, here).
    pub async fn run(self, file: &Path, url: &str) -> Result<UploadReport> {
        let host = plugin_host()?;
        let source = PluginSource::parse(&self.plugin, Path::new("."))?;
        let plugin = {
            let host = host.clone();
            tokio::task::spawn_blocking(move || UploaderPlugin::load(&host, source)).await??
        };
        let origin =
            crate::upload::Origin::of(url).map_err(|e| anyhow::anyhow!("URL {url}: {e}"))?;
        let addresses: Vec<std::net::SocketAddr> = tokio::net::lookup_host(origin.authority())
            .await
            .with_context(|| format!("resolving {}", origin.host))?
            .collect();
        let policy = crate::upload::UploadPolicy {
            ca_file: self.ca_file.clone(),
            ..Default::default()
        };
        let tls = policy.tls_config().map_err(anyhow::Error::msg)?;
        let size = std::fs::metadata(file)
            .with_context(|| format!("{}", file.display()))?
            .len();
        let recorder = Arc::new(Recorder {
            also: self.observer.clone(),
            ..Default::default()
        });
        let validated = plugin.validate_options(&self.options).await;
        let outcome = match validated {
            Err(error) => Err(UploadFailure {
                error,
                refused: Vec::new(),
            }),
            Ok(()) => {
                let (progress, _keep) = watch::channel(None);
                plugin
                    .upload(UploadJob {
                        labels: RunLabels {
                            plugin: self.plugin.clone(),
                            task_id: LOCAL.into(),
                            node: LOCAL.into(),
                        },
                        options: &self.options,
                        artifact: file,
                        artifact_size: size,
                        url,
                        origin,
                        route: Route::Direct(addresses),
                        tls,
                        limits: self.limits,
                        progress,
                        observer: Some(recorder.clone()),
                        cancel: CancellationToken::new(),
                    })
                    .await
            }
        };
        let logs = recorder.logs.lock().unwrap().clone();
        let progress = recorder.progress.lock().unwrap().clone();
        Ok(UploadReport {
            outcome,
            logs,
            progress,
            plugin: crate::node::plugins::plugin_ref(
                "uploader",
                plugin.source(),
                plugin.identity(),
            ),
        })
    }
}

/// What an [`Upload`] did.
pub struct UploadReport {
    pub outcome: Result<Receipt, UploadFailure>,
    pub logs: Vec<LogLine>,
    pub progress: Vec<Progress>,
    pub plugin: PluginRef,
}
