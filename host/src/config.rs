//! The daemon's TOML configuration: who this node is, the cluster, users,
//! and which plugin plays each role. See the README's "Configuration".

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::tls::{TlsFiles, TlsSetting};
pub use crate::upload::UploadPolicy;

/// One node's configuration file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node's name; must be a key of `nodes`.
    pub node: String,
    /// Address the HTTP API listens on (ignored with `serve --listen-fd`).
    pub listen: SocketAddr,
    /// Where job output directories and task records live.
    pub data_dir: PathBuf,
    /// TLS on the API (public and node-to-node): a `[tls]` table of PEM
    /// files (`autocollect certs init` makes them), or `tls = "off"` for
    /// plain HTTP. Required: there is no silent default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSetting>,
    /// With `tls = "off"`, serve plain HTTP on an address other than
    /// loopback (credentials then cross the network in clear).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_plaintext: bool,
    /// Shared secret for the node-to-node API (at least 16 characters).
    /// Prefer `cluster_secret_file` in production.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_secret: Option<String>,
    /// File holding the cluster secret (first line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_secret_file: Option<PathBuf>,
    /// Every node of the cluster: name -> `host:port` of its API.
    pub nodes: BTreeMap<String, String>,
    /// Users of the public API.
    #[serde(default)]
    pub users: Vec<User>,
    /// The collector role: which plugin, its options and limits.
    #[serde(default)]
    pub collector: PluginRole,
    /// The uploader role (default `builtin:http-uploader`).
    #[serde(
        default = "PluginRole::uploader",
        deserialize_with = "uploader_section"
    )]
    pub uploader: PluginRole,
    /// Where uploads may go.
    #[serde(default)]
    pub upload: UploadPolicy,
    #[serde(default)]
    pub coordinator: CoordinatorSettings,
    /// What jobs may write on this node, and how long results are kept.
    #[serde(default)]
    pub storage: StorageSettings,
    /// Limits of the HTTP listener.
    #[serde(default)]
    pub server: ServerSettings,
    /// Directory for compiled plugins, so restarts skip compilation.
    /// Must be writable only by the daemon: its files are loaded as code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin_cache_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    /// Argon2 PHC string, as printed by `autocollect hash-password`.
    pub password_hash: String,
    pub role: Role,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// May start and cancel collections, and read status.
    Admin,
    /// May only read status.
    ReadOnly,
}

/// Which plugin serves a role, with its options and sandbox limits.
/// In TOML, a role's section must name its `plugin` if it is present.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginRole {
    /// `builtin:NAME` or a path to a `.wasm` component.
    pub plugin: String,
    /// Options handed to the plugin (strings; numbers and booleans are
    /// converted to their text).
    #[serde(default)]
    pub options: BTreeMap<String, OptionValue>,
    /// Wall-clock limit of one run, in seconds.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: f64,
    /// Linear-memory cap of one run, in MiB.
    #[serde(default = "default_memory_limit_mb")]
    pub memory_limit_mb: u64,
    /// Programs (absolute paths) the plugin may start through `exec`
    /// (collectors only). Empty: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exec_allow: Vec<String>,
    /// Environment every started program gets (nothing else is inherited).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub exec_env: BTreeMap<String, String>,
    /// Names of environment variables the plugin itself may set for the
    /// programs it starts. Empty: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exec_env_allow: Vec<String>,
    /// After a run, how long its programs get to exit once their stdin is
    /// closed, and again after SIGTERM, before SIGKILL. In seconds.
    #[serde(
        default = "default_exec_grace_secs",
        skip_serializing_if = "is_default_exec_grace"
    )]
    pub exec_grace_secs: f64,
    /// How many programs the plugin may have running at once; a start
    /// beyond it is denied.
    #[serde(
        default = "default_exec_max_processes",
        skip_serializing_if = "is_default_exec_max_processes"
    )]
    pub exec_max_processes: usize,
    /// Host directories the plugin may read (collectors only), each
    /// preopened read-only at its guest path. Empty: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<InputGrant>,
    /// The SHA-256 (hex) the plugin's component must have: a file with
    /// other bytes is refused, at start and on reload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// One `[[collector.inputs]]` entry: a host directory the collector may
/// read, preopened read-only at `guest`, listed to the plugin as `name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputGrant {
    /// The operator's name for it (unique): what the plugin sees.
    pub name: String,
    /// An existing host directory, absolute.
    pub host: PathBuf,
    /// Where the plugin finds it: an absolute guest path, outside
    /// `/output` and any other grant.
    pub guest: String,
}

impl Default for PluginRole {
    /// The collector role's defaults.
    fn default() -> Self {
        PluginRole {
            plugin: "builtin:mock-collector".into(),
            options: BTreeMap::new(),
            timeout_secs: default_timeout_secs(),
            memory_limit_mb: default_memory_limit_mb(),
            exec_allow: Vec::new(),
            exec_env: BTreeMap::new(),
            exec_env_allow: Vec::new(),
            exec_grace_secs: default_exec_grace_secs(),
            exec_max_processes: default_exec_max_processes(),
            inputs: Vec::new(),
            sha256: None,
        }
    }
}

impl PluginRole {
    /// The uploader role's defaults: uploads of many GiB take hours on a
    /// slow link; memory stays small because the body streams.
    pub fn uploader() -> Self {
        PluginRole {
            plugin: "builtin:http-uploader".into(),
            options: BTreeMap::new(),
            timeout_secs: 4.0 * 3600.0,
            memory_limit_mb: 128,
            exec_allow: Vec::new(),
            exec_env: BTreeMap::new(),
            exec_env_allow: Vec::new(),
            exec_grace_secs: default_exec_grace_secs(),
            exec_max_processes: default_exec_max_processes(),
            inputs: Vec::new(),
            sha256: None,
        }
    }

    /// Options as the string pairs the WIT contract carries.
    pub fn option_pairs(&self) -> Vec<(String, String)> {
        self.options
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect()
    }
}

/// An `[uploader]` section: limits it leaves out take the uploader's
/// defaults ([`PluginRole::uploader`]), not the collector's.
fn uploader_section<'de, D: serde::Deserializer<'de>>(d: D) -> Result<PluginRole, D::Error> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Section {
        plugin: String,
        #[serde(default)]
        options: BTreeMap<String, OptionValue>,
        timeout_secs: Option<f64>,
        memory_limit_mb: Option<u64>,
        /// Only to refuse it in words: grants are for collectors.
        inputs: Option<toml::Value>,
    }
    let section = Section::deserialize(d)?;
    if section.inputs.is_some() {
        return Err(serde::de::Error::custom(
            "uploader.inputs: input grants are for collectors only ([[collector.inputs]]); \
             an uploader reads only its artifact",
        ));
    }
    let defaults = PluginRole::uploader();
    Ok(PluginRole {
        plugin: section.plugin,
        options: section.options,
        timeout_secs: section.timeout_secs.unwrap_or(defaults.timeout_secs),
        memory_limit_mb: section.memory_limit_mb.unwrap_or(defaults.memory_limit_mb),
        ..defaults
    })
}

/// A plugin option value as written in TOML.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum OptionValue {
    Text(String),
    Integer(i64),
    Float(f64),
    Bool(bool),
}

impl std::fmt::Display for OptionValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OptionValue::Text(s) => f.write_str(s),
            OptionValue::Integer(i) => write!(f, "{i}"),
            OptionValue::Float(x) => write!(f, "{x}"),
            OptionValue::Bool(b) => write!(f, "{b}"),
        }
    }
}

impl From<&str> for OptionValue {
    fn from(s: &str) -> Self {
        OptionValue::Text(s.to_string())
    }
}

impl From<i64> for OptionValue {
    fn from(i: i64) -> Self {
        OptionValue::Integer(i)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorSettings {
    /// How many nodes collect at once: 0 means all chosen nodes in
    /// parallel (the default, as Couchbase), 1 means one node at a time.
    #[serde(default)]
    pub collection_concurrency: usize,
    /// How many nodes upload at once across the cluster (default 1, as
    /// Couchbase: uploads share the customer's uplink); 0 means no limit.
    #[serde(default = "default_upload_concurrency")]
    pub upload_concurrency: usize,
    /// How often a node sends a heartbeat on its job stream, in ms. The
    /// coordinator gives up on a node after three missed heartbeats.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_interval_ms: u64,
    /// How long to wait for a TCP connection to another node, in ms.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// How long another node has to answer a node-to-node request (open a
    /// session, a command, forwarded status or cancel), in ms. A node that
    /// does not is reported as not answering, never waited on for longer.
    #[serde(default = "default_peer_timeout_ms")]
    pub peer_timeout_ms: u64,
    /// The longest the coordinator follows a node's collection, from the
    /// start of its job, in seconds: past it the node is failed and told
    /// to stop. A node holds its collector to its own deadline; this
    /// bounds one that does not (buggy, or in hostile hands) and would
    /// otherwise hold the task, and with it the cluster's one collection,
    /// until an admin cancelled. Default ([`Config::phase_limits`]): this
    /// node's `collector.timeout_secs` and twice its `exec_grace_secs`,
    /// plus a minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_collect_secs: Option<f64>,
    /// The same for a node's upload (default: `uploader.timeout_secs`
    /// and twice its `exec_grace_secs`, plus a minute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_upload_secs: Option<f64>,
}

impl Default for CoordinatorSettings {
    fn default() -> Self {
        CoordinatorSettings {
            collection_concurrency: 0,
            upload_concurrency: default_upload_concurrency(),
            heartbeat_interval_ms: default_heartbeat_ms(),
            connect_timeout_ms: default_connect_timeout_ms(),
            peer_timeout_ms: default_peer_timeout_ms(),
            max_collect_secs: None,
            max_upload_secs: None,
        }
    }
}

/// What the coordinator allows past a node's own deadline by default.
pub const PHASE_MARGIN: Duration = Duration::from_secs(60);
/// The longest any duration in the config may be: a year. Past that,
/// a number of seconds is a mistake, and one large enough would overflow
/// the daemon's clock arithmetic.
const MAX_SECS: f64 = 365.0 * 24.0 * 3600.0;

/// Whether `secs` is a duration the config may hold: a number, positive
/// (or zero where `zero_allowed`), and at most a year.
fn duration_ok(secs: f64, zero_allowed: bool) -> bool {
    secs.is_finite() && (secs > 0.0 || (zero_allowed && secs == 0.0)) && secs <= MAX_SECS
}

/// How long the coordinator follows a node's collection and its upload
/// before failing it ([`CoordinatorSettings::max_collect_secs`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PhaseLimits {
    pub collect: Duration,
    pub upload: Duration,
}

/// `[storage]`: what a job may write on this node, and what is kept.
/// Jobs write into `data_dir/jobs/TASK/` (the collector's output
/// directory) and a temporary directory of their own; a successful
/// collection's artifact moves to `data_dir/results/TASK/` (or `logDir`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSettings {
    /// Most a job may have on disk at once (its output and temporary
    /// directories), in MiB. A job over it is stopped and fails.
    #[serde(default = "default_job_max_mb")]
    pub job_max_mb: u64,
    /// Most files (and directories) a job may have at once.
    #[serde(default = "default_job_max_files")]
    pub job_max_files: u64,
    /// Free space `data_dir` must keep, in MiB: a start is refused when a
    /// chosen node has less, and a job fails if it drops below it.
    #[serde(default = "default_min_free_mb")]
    pub min_free_mb: u64,
    /// Keep the output of failed and cancelled collections (for
    /// debugging a plugin). Off: it is removed when the job ends.
    #[serde(default)]
    pub keep_failed: bool,
    /// Results kept in `data_dir/results` (the newest); 0: no limit.
    #[serde(default = "default_keep_results")]
    pub keep_results: usize,
    /// Results older than this are removed, in hours; 0: no limit.
    #[serde(default = "default_keep_results_hours")]
    pub keep_results_hours: f64,
    /// Results beyond this total are removed, oldest first, in MiB; 0: no
    /// limit.
    #[serde(default = "default_keep_results_mb")]
    pub keep_results_mb: u64,
    /// Directories a start request's `logDir` may name (it must be one of
    /// them or below one). Empty: `logDir` is refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_log_dirs: Vec<PathBuf>,
    /// Directories a start request's `tmpDir` may name. Empty: `tmpDir` is
    /// refused (jobs use `data_dir/tmp`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_tmp_dirs: Vec<PathBuf>,
}

impl Default for StorageSettings {
    fn default() -> Self {
        StorageSettings {
            job_max_mb: default_job_max_mb(),
            job_max_files: default_job_max_files(),
            min_free_mb: default_min_free_mb(),
            keep_failed: false,
            keep_results: default_keep_results(),
            keep_results_hours: default_keep_results_hours(),
            keep_results_mb: default_keep_results_mb(),
            allowed_log_dirs: Vec::new(),
            allowed_tmp_dirs: Vec::new(),
        }
    }
}

/// `[server]`: limits of the HTTP listener (public and node-to-node API).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// Connections served at once; 0: derived from the open-file limit
    /// (raised to its hard limit at start). At the cap, the connection
    /// idle the longest is closed to make room; if none is idle, the new
    /// one is.
    #[serde(default)]
    pub max_connections: usize,
    /// Connections kept for node-to-node requests: public requests are
    /// answered 503 once the other connections are busy. 0: 8 per node of
    /// the cluster, plus 16.
    #[serde(default)]
    pub peer_reserved_connections: usize,
    /// A connection must send a complete request head within this many
    /// seconds of opening or of its previous answer, else it is closed;
    /// a body the API reads whole must arrive within it of its head.
    #[serde(default = "default_header_timeout_secs")]
    pub header_timeout_secs: f64,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            max_connections: 0,
            peer_reserved_connections: 0,
            header_timeout_secs: default_header_timeout_secs(),
        }
    }
}

fn default_peer_timeout_ms() -> u64 {
    5000
}
fn default_exec_max_processes() -> usize {
    16
}
fn is_default_exec_max_processes(n: &usize) -> bool {
    *n == default_exec_max_processes()
}
fn default_job_max_mb() -> u64 {
    8192
}
fn default_job_max_files() -> u64 {
    20_000
}
fn default_min_free_mb() -> u64 {
    1024
}
fn default_keep_results() -> usize {
    10
}
fn default_keep_results_hours() -> f64 {
    168.0
}
fn default_keep_results_mb() -> u64 {
    20 * 1024
}
fn default_header_timeout_secs() -> f64 {
    15.0
}

fn default_upload_concurrency() -> usize {
    1
}
fn default_exec_grace_secs() -> f64 {
    10.0
}
fn is_default_exec_grace(secs: &f64) -> bool {
    *secs == default_exec_grace_secs()
}
fn default_timeout_secs() -> f64 {
    3600.0
}
fn default_memory_limit_mb() -> u64 {
    512
}
fn default_heartbeat_ms() -> u64 {
    2000
}
fn default_connect_timeout_ms() -> u64 {
    5000
}

/// A parse error without the file's text: toml's own message quotes the
/// offending line, which can be the `cluster_secret` line, and the error
/// goes to the log (and, after a reload, to `/health`).
fn parse_error(path: &Path, text: &str, e: &toml::de::Error) -> anyhow::Error {
    let at = e.span().map(|span| {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        format!(" at line {line}, column {column}")
    });
    anyhow::anyhow!(
        "parsing config {}: TOML parse error{}: {}",
        path.display(),
        at.unwrap_or_default(),
        e.message()
    )
}

impl Config {
    /// Read, parse and check a config file.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        let mut config: Config = toml::from_str(&text).map_err(|e| parse_error(path, &text, &e))?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_secret(base)?;
        if let Some(TlsSetting::On(files)) = &config.tls {
            config.tls = Some(TlsSetting::On(files.resolved(base)));
        }
        if let Some(file) = &config.upload.ca_file {
            config.upload.ca_file = Some(base.join(file));
        }
        config.check()?;
        Ok(config)
    }

    /// How long the coordinator follows a node's collection and upload:
    /// `coordinator.max_collect_secs` and `max_upload_secs`, or by
    /// default this node's role deadline and twice its grace for the
    /// programs it started, plus [`PHASE_MARGIN`] (the node's own
    /// deadline comes first, with room for its cleanup and its report).
    pub fn phase_limits(&self) -> PhaseLimits {
        let default = |role: &PluginRole| {
            Duration::from_secs_f64(role.timeout_secs + 2.0 * role.exec_grace_secs) + PHASE_MARGIN
        };
        let limit = |set: Option<f64>, role: &PluginRole| {
            set.map_or_else(|| default(role), Duration::from_secs_f64)
        };
        PhaseLimits {
            collect: limit(self.coordinator.max_collect_secs, &self.collector),
            upload: limit(self.coordinator.max_upload_secs, &self.uploader),
        }
    }

    fn resolve_secret(&mut self, base: &Path) -> Result<()> {
        if let Some(file) = &self.cluster_secret_file {
            if self.cluster_secret.is_some() {
                bail!("set one of cluster_secret and cluster_secret_file, not both");
            }
            let file = base.join(file);
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading cluster_secret_file {}", file.display()))?;
            self.cluster_secret = Some(text.lines().next().unwrap_or("").trim().to_string());
            self.cluster_secret_file = Some(file);
        }
        Ok(())
    }

    /// Consistency checks that do not need the plugin loaded.
    pub fn check(&self) -> Result<()> {
        if !self.nodes.contains_key(&self.node) {
            bail!(
                "node {:?} is not listed in [nodes] ({})",
                self.node,
                self.nodes.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        }
        for (name, addr) in &self.nodes {
            if name.is_empty() || name.contains(',') || name.trim() != name {
                bail!("node name {name:?}: must be non-empty, without commas or outer spaces");
            }
            if addr.contains("://") || !addr.contains(':') {
                bail!("node {name}: address {addr:?} must be host:port");
            }
        }
        match &self.tls {
            None => bail!(
                "tls is required: a [tls] table with cert_file and key_file (make them with \
                 `autocollect certs init`), or tls = \"off\" for plain HTTP on loopback"
            ),
            Some(TlsSetting::Off) => {
                if !self.allow_plaintext && !self.listen.ip().is_loopback() {
                    bail!(
                        "tls = \"off\" serves plain HTTP, which is allowed on a loopback address \
                         only: listen is {}; configure [tls], or set allow_plaintext = true",
                        self.listen
                    );
                }
            }
            Some(TlsSetting::On(_)) => {}
        }
        match &self.cluster_secret {
            None => bail!("cluster_secret (or cluster_secret_file) is required"),
            Some(s) if s.len() < 16 => bail!("cluster_secret must be at least 16 characters"),
            Some(_) => {}
        }
        let mut seen = std::collections::HashSet::new();
        for user in &self.users {
            if !seen.insert(&user.name) {
                bail!("user {:?} is listed twice", user.name);
            }
            crate::auth::check_hash(&user.password_hash).map_err(|e| {
                anyhow::anyhow!(
                    "user {:?}: password_hash is {e}; make one with `autocollect hash-password`",
                    user.name
                )
            })?;
        }
        for (name, role) in [("collector", &self.collector), ("uploader", &self.uploader)] {
            if !role.timeout_secs.is_finite() || role.timeout_secs <= 0.0 {
                bail!("{name}.timeout_secs must be positive");
            }
            if role.timeout_secs > MAX_SECS || role.exec_grace_secs > MAX_SECS {
                bail!(
                    "{name}.timeout_secs and exec_grace_secs must be at most {MAX_SECS} (a year)"
                );
            }
            if role.memory_limit_mb == 0 {
                bail!("{name}.memory_limit_mb must be positive");
            }
            if let Some(p) = role.exec_allow.iter().find(|p| !Path::new(p).is_absolute()) {
                bail!("{name}.exec_allow: {p:?} must be an absolute path");
            }
            if !role.exec_grace_secs.is_finite() || role.exec_grace_secs < 0.0 {
                bail!("{name}.exec_grace_secs must be zero or positive");
            }
            if let Some(pin) = &role.sha256
                && (pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                bail!("{name}.sha256: {pin:?} must be 64 hex digits (`sha256sum PLUGIN.wasm`)");
            }
        }
        if self.coordinator.heartbeat_interval_ms == 0 {
            bail!("coordinator.heartbeat_interval_ms must be positive");
        }
        if self.coordinator.peer_timeout_ms == 0 || self.coordinator.connect_timeout_ms == 0 {
            bail!("coordinator.peer_timeout_ms and connect_timeout_ms must be positive");
        }
        let coordinator = &self.coordinator;
        if [
            coordinator.heartbeat_interval_ms,
            coordinator.peer_timeout_ms,
            coordinator.connect_timeout_ms,
        ]
        .into_iter()
        .any(|ms| ms as f64 / 1000.0 > MAX_SECS)
        {
            bail!(
                "coordinator.heartbeat_interval_ms, peer_timeout_ms and connect_timeout_ms must be \
                 at most a year"
            );
        }
        for (key, value) in [
            ("max_collect_secs", self.coordinator.max_collect_secs),
            ("max_upload_secs", self.coordinator.max_upload_secs),
        ] {
            if let Some(secs) = value
                && !duration_ok(secs, false)
            {
                bail!("coordinator.{key} must be positive, and at most {MAX_SECS} (a year)");
            }
        }
        check_inputs(&self.collector.inputs, &self.own_secrets())?;
        if self.collector.exec_max_processes == 0 && !self.collector.exec_allow.is_empty() {
            bail!("collector.exec_max_processes must be positive when exec_allow lists programs");
        }
        let storage = &self.storage;
        if storage.job_max_mb == 0 || storage.job_max_files == 0 {
            bail!("storage.job_max_mb and storage.job_max_files must be positive");
        }
        if !duration_ok(storage.keep_results_hours * 3600.0, true) {
            bail!("storage.keep_results_hours must be zero or positive, and at most a year");
        }
        for (key, dirs) in [
            ("allowed_log_dirs", &storage.allowed_log_dirs),
            ("allowed_tmp_dirs", &storage.allowed_tmp_dirs),
        ] {
            if let Some(d) = dirs.iter().find(|d| !d.is_absolute()) {
                bail!("storage.{key}: {} must be an absolute path", d.display());
            }
        }
        if !duration_ok(self.server.header_timeout_secs, false) {
            bail!("server.header_timeout_secs must be positive, and at most a year");
        }
        if let Err(e) = self.upload.check() {
            bail!("upload.{e}");
        }
        Ok(())
    }

    /// What a plugin must never be granted: this daemon's secrets and the
    /// directories it keeps its state and compiled code in.
    fn own_secrets(&self) -> Vec<(&'static str, PathBuf)> {
        let mut paths = vec![("data_dir", self.data_dir.clone())];
        if let Some(file) = &self.cluster_secret_file {
            paths.push(("cluster_secret_file", file.clone()));
        }
        if let Some(files) = self.tls_files() {
            paths.push(("tls.key_file", files.key_file.clone()));
        }
        if let Some(dir) = &self.plugin_cache_dir {
            paths.push(("plugin_cache_dir", dir.clone()));
        }
        paths
    }

    /// The `[tls]` files, if TLS is on.
    pub fn tls_files(&self) -> Option<&TlsFiles> {
        match &self.tls {
            Some(TlsSetting::On(files)) => Some(files),
            _ => None,
        }
    }

    pub fn secret(&self) -> &str {
        self.cluster_secret.as_deref().unwrap_or_default()
    }
}

/// `[[collector.inputs]]`: unique names and guest paths; absolute host
/// paths that exist and are directories; absolute, normal guest paths
/// outside the output directory and not nested in one another.
pub fn check_inputs(inputs: &[InputGrant], own_secrets: &[(&str, PathBuf)]) -> Result<()> {
    let output = Path::new(crate::plugin::sandbox::GUEST_OUTPUT_DIR);
    for (i, grant) in inputs.iter().enumerate() {
        let name = &grant.name;
        let what = format!("collector.inputs {name:?}");
        if name.is_empty() || name.trim() != name || name.chars().any(char::is_control) {
            bail!(
                "collector.inputs: name {name:?} must be non-empty, without outer spaces or control characters"
            );
        }
        if inputs[..i].iter().any(|g| g.name == *name) {
            bail!("collector.inputs: the name {name:?} is used twice");
        }
        let host = &grant.host;
        if !host.is_absolute() {
            bail!("{what}: host {} must be an absolute path", host.display());
        }
        match std::fs::metadata(host) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => bail!(
                "{what}: host {} is not a directory (grant the directory that holds the file)",
                host.display()
            ),
            Err(e) => bail!("{what}: host {} cannot be opened: {e}", host.display()),
        }
        let real = std::fs::canonicalize(host).unwrap_or_else(|_| host.clone());
        if Path::new("/proc").starts_with(&real) && real != Path::new("/proc") {
            bail!(
                "{what}: host {} holds /proc, and with it processes' memory (the daemon's \
                 own, with its keys): grant the directories the plugin needs instead",
                host.display()
            );
        }
        for (key, secret) in own_secrets {
            let secret = std::fs::canonicalize(secret).unwrap_or_else(|_| absolute(secret));
            if secret.starts_with(&real) {
                bail!(
                    "{what}: host {} holds this daemon's {key} ({}): a plugin must never be \
                     able to read it",
                    host.display(),
                    secret.display()
                );
            }
        }
        if exposes_processes(&real) {
            bail!(
                "{what}: host {} is {}: it holds processes' memory and environment \
                 (the daemon's own, with its keys, included); grant a directory below it \
                 such as /proc/sys/kernel or /proc/pressure, not /proc or a process's directory",
                host.display(),
                real.display()
            );
        }
        let guest = Path::new(&grant.guest);
        let normal = grant.guest.strip_prefix('/').is_some_and(|rest| {
            rest.split('/')
                .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
        });
        if !normal {
            bail!(
                "{what}: guest {:?} must be an absolute path such as \"/inputs/{name}\", \
                 without \".\", \"..\", \"//\" or a trailing \"/\"",
                grant.guest
            );
        }
        if guest.starts_with(output) || output.starts_with(guest) {
            bail!(
                "{what}: guest {:?} overlaps the output directory {}",
                grant.guest,
                output.display()
            );
        }
        if let Some(other) = inputs[..i].iter().find(|g| {
            let g = Path::new(&g.guest);
            g.starts_with(guest) || guest.starts_with(g)
        }) {
            bail!(
                "{what}: guest {:?} is the same as, or nested with, {:?}'s guest {:?}",
                grant.guest,
                other.name,
                other.guest
            );
        }
    }
    Ok(())
}

/// `path` made absolute against the working directory (lexically).
fn absolute(path: &Path) -> PathBuf {
    std::env::current_dir()
        .map(|cwd| cwd.join(path))
        .unwrap_or_else(|_| path.to_path_buf())
}

/// `/proc` itself, or a process's directory in it (`/proc/PID`,
/// `/proc/PID/task`, `/proc/PID/task/TID`; `/proc/self` resolves to one):
/// each holds `mem` and `environ`, which read the daemon's secrets when
/// the process is the daemon.
fn exposes_processes(real: &Path) -> bool {
    let Ok(rest) = real.strip_prefix("/proc") else {
        return false;
    };
    let parts: Vec<String> = rest
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let numeric = |s: &String| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    match parts.as_slice() {
        [] => true,
        [pid] => numeric(pid),
        [pid, task] => numeric(pid) && task == "task",
        [pid, task, tid] => numeric(pid) && task == "task" && numeric(tid),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parse_error_says_where_but_never_quotes_the_file() {
        let text = "node = \"n1\"\ncluster_secret = \"0123456789abcdef\" oops\n";
        let e = toml::from_str::<Config>(text).unwrap_err();
        let message = format!("{:#}", parse_error(Path::new("/etc/a.toml"), text, &e));
        assert!(
            message.starts_with("parsing config /etc/a.toml: TOML parse error at line 2, column "),
            "{message}"
        );
        assert!(!message.contains("0123456789abcdef"), "{message}");
    }

    const BASE: &str = r#"
        node = "n1"
        listen = "127.0.0.1:9101"
        data_dir = "/tmp/autocollect-test"
        tls = "off"
        cluster_secret = "0123456789abcdef"
        [nodes]
        n1 = "127.0.0.1:9101"
    "#;

    fn parse(extra: &str) -> Config {
        toml::from_str(&format!("{BASE}\n{extra}")).expect("parses")
    }

    #[test]
    fn each_role_section_falls_back_to_its_own_defaults() {
        let c = parse(
            r#"
            [collector]
            plugin = "collector.wasm"
            [uploader]
            plugin = "uploader.wasm"
            [uploader.options]
            attempts = 5
            "#,
        );
        assert_eq!(
            (c.collector.timeout_secs, c.collector.memory_limit_mb),
            (3600.0, 512)
        );
        let uploader = PluginRole::uploader();
        assert_eq!(c.uploader.plugin, "uploader.wasm");
        assert_eq!(
            (c.uploader.timeout_secs, c.uploader.memory_limit_mb),
            (uploader.timeout_secs, uploader.memory_limit_mb)
        );
        assert_eq!(c.uploader.option_pairs(), [("attempts".into(), "5".into())]);

        let c = parse("[uploader]\nplugin = \"u.wasm\"\ntimeout_secs = 60\n");
        assert_eq!(c.uploader.timeout_secs, 60.0);
        assert!(
            toml::from_str::<Config>(&format!("{BASE}\n[uploader]\nplugin = \"u\"\nbogus = 1"))
                .is_err()
        );
    }

    #[test]
    fn a_nodes_phases_are_followed_past_its_own_deadlines_and_no_longer() {
        let c = parse("[collector]\nplugin = \"c.wasm\"\nexec_grace_secs = 5\n");
        assert_eq!(
            c.phase_limits(),
            PhaseLimits {
                collect: Duration::from_secs(3600 + 10 + 60),
                upload: Duration::from_secs(4 * 3600 + 20 + 60),
            }
        );
        let mut c = parse("[coordinator]\nmax_collect_secs = 90\nmax_upload_secs = 0.5\n");
        c.check().unwrap();
        assert_eq!(
            c.phase_limits(),
            PhaseLimits {
                collect: Duration::from_secs(90),
                upload: Duration::from_millis(500),
            }
        );
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 400.0 * 24.0 * 3600.0] {
            c.coordinator.max_upload_secs = Some(bad);
            let e = c.check().unwrap_err().to_string();
            assert!(
                e.starts_with("coordinator.max_upload_secs must be positive"),
                "{e}"
            );
        }
    }

    /// Durations too large for the daemon's clock arithmetic (which would
    /// panic at start) are refused when the config is read.
    #[test]
    fn no_duration_in_the_config_may_pass_a_year() {
        for (section, key, message) in [
            (
                "collector",
                "timeout_secs",
                "collector.timeout_secs and exec_grace_secs",
            ),
            (
                "uploader",
                "timeout_secs",
                "uploader.timeout_secs and exec_grace_secs",
            ),
            (
                "collector",
                "exec_grace_secs",
                "collector.timeout_secs and exec_grace_secs",
            ),
            (
                "storage",
                "keep_results_hours",
                "storage.keep_results_hours",
            ),
            (
                "server",
                "header_timeout_secs",
                "server.header_timeout_secs",
            ),
        ] {
            let plugin = match section {
                "collector" | "uploader" => "plugin = \"p.wasm\"\n",
                _ => "",
            };
            let c = parse(&format!("[{section}]\n{plugin}{key} = 1e300\n"));
            let e = c.check().unwrap_err().to_string();
            assert!(e.starts_with(message) && e.contains("a year"), "{e}");
        }
        let c = parse("[coordinator]\nheartbeat_interval_ms = 9223372036854775807\n");
        let e = c.check().unwrap_err().to_string();
        assert!(
            e.starts_with("coordinator.heartbeat_interval_ms, peer_timeout_ms"),
            "{e}"
        );
    }

    #[test]
    fn plain_http_must_be_asked_for_and_stays_on_loopback_unless_allowed() {
        let mut c = parse("");
        c.check().unwrap();
        c.listen = "10.1.2.3:9101".parse().unwrap();
        let e = c.check().unwrap_err().to_string();
        assert!(e.contains("allowed on a loopback address only"), "{e}");
        c.allow_plaintext = true;
        c.check().unwrap();
        c.tls = None;
        let e = c.check().unwrap_err().to_string();
        assert!(e.starts_with("tls is required"), "{e}");
    }

    #[test]
    fn a_bad_upload_proxy_is_refused_at_load() {
        let c = parse("[upload]\nproxy = \"socks5://proxy:1080\"\n");
        let e = c.check().unwrap_err().to_string();
        assert!(e.starts_with("upload.proxy must be an http:// URL"), "{e}");
        parse("[upload]\nproxy = \"http://proxy:3128\"\n")
            .check()
            .unwrap();
    }

    #[test]
    fn the_upload_ca_file_is_relative_to_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n1.toml");
        std::fs::write(
            &path,
            format!("{BASE}\n[upload]\nca_file = \"certs/ca.pem\"\n"),
        )
        .unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(c.upload.ca_file, Some(dir.path().join("certs/ca.pem")));

        std::fs::write(&path, format!("{BASE}\n[upload]\nca_only = true\n")).unwrap();
        let e = format!("{:#}", Config::load(&path).unwrap_err());
        assert!(e.contains("upload.ca_only = true needs ca_file"), "{e}");
    }

    #[test]
    fn input_grants_are_checked_with_clear_messages() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().display().to_string();
        std::fs::write(dir.path().join("f"), b"x").unwrap();
        let parse = |grants: &str| parse(&format!("[collector]\nplugin = \"c.wasm\"\n{grants}"));
        let grant = |name: &str, host: &str, guest: &str| {
            format!(
                "[[collector.inputs]]\nname = \"{name}\"\nhost = \"{host}\"\nguest = \"{guest}\"\n"
            )
        };
        let ok = parse(
            &(grant("logs", &host, "/inputs/logs")
                + &grant("kernel", "/proc/sys/kernel", "/proc/sys/kernel")
                + &grant("net", "/proc/self/net", "/inputs/net")),
        );
        ok.check().unwrap();
        assert_eq!(ok.collector.inputs[1].guest, "/proc/sys/kernel");
        for proc in [
            "/proc",
            "/proc/self",
            "/proc/1",
            "/proc/thread-self",
            "/proc/self/task",
        ] {
            let e = parse(&grant("p", proc, "/inputs/p"))
                .check()
                .unwrap_err()
                .to_string();
            assert!(e.contains("holds processes' memory"), "{proc}: {e}");
        }

        // Nothing that holds /proc or the daemon's own secrets.
        let e = parse(&grant("root", "/", "/inputs/root"))
            .check()
            .unwrap_err()
            .to_string();
        assert!(e.contains("holds /proc"), "{e}");
        let mut own = parse(&grant("logs", &host, "/inputs/logs"));
        own.data_dir = dir.path().join("data");
        let e = own.check().unwrap_err().to_string();
        assert!(e.contains("holds this daemon's data_dir"), "{e}");
        let mut own = parse(&grant("logs", &host, "/inputs/logs"));
        own.tls = Some(TlsSetting::On(TlsFiles {
            cert_file: dir.path().join("n1.pem"),
            key_file: dir.path().join("n1-key.pem"),
            ca_file: None,
            client_ca_file: None,
        }));
        let e = own.check().unwrap_err().to_string();
        assert!(e.contains("holds this daemon's tls.key_file"), "{e}");

        let missing = format!("{host}/gone");
        let file = format!("{host}/f");
        for (toml, expected) in [
            (
                grant("logs", &missing, "/inputs/logs"),
                "collector.inputs \"logs\": host ",
            ),
            (grant("logs", &file, "/inputs/logs"), "is not a directory"),
            (
                grant("logs", "relative", "/inputs/logs"),
                "must be an absolute path",
            ),
            (
                grant("logs", &host, "inputs/logs"),
                "must be an absolute path such as",
            ),
            (
                grant("logs", &host, "/inputs/../etc"),
                "must be an absolute path such as",
            ),
            (
                grant("logs", &host, "/inputs/./logs"),
                "must be an absolute path such as",
            ),
            (
                grant("logs", &host, "/inputs/"),
                "must be an absolute path such as",
            ),
            (
                grant("logs", &host, "/"),
                "must be an absolute path such as",
            ),
            (
                grant("logs", &host, "/output"),
                "overlaps the output directory",
            ),
            (
                grant("logs", &host, "/output/logs"),
                "overlaps the output directory",
            ),
            (grant("", &host, "/inputs/logs"), "must be non-empty"),
            (
                grant("a", &host, "/inputs/a") + &grant("a", &host, "/inputs/b"),
                "the name \"a\" is used twice",
            ),
            (
                grant("a", &host, "/inputs") + &grant("b", &host, "/inputs/b"),
                "nested with",
            ),
            (
                grant("a", &host, "/inputs/x") + &grant("b", &host, "/inputs/x"),
                "nested with",
            ),
        ] {
            let e = parse(&toml).check().unwrap_err().to_string();
            assert!(e.contains(expected), "{toml}: {e}");
        }
        let e = parse(&grant("logs", &missing, "/inputs/logs"))
            .check()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&missing) && e.contains("cannot be opened"),
            "{e}"
        );

        let uploader = format!(
            "{BASE}\n[uploader]\nplugin = \"u\"\n[[uploader.inputs]]\nname = \"a\"\nhost = \"/\"\nguest = \"/a\"\n"
        );
        let e = toml::from_str::<Config>(&uploader).unwrap_err().to_string();
        assert!(e.contains("input grants are for collectors only"), "{e}");
        let unknown = format!("{}key = 1\n", grant("logs", &host, "/inputs/logs"));
        let unknown = format!("{BASE}\n[collector]\nplugin = \"c\"\n{unknown}");
        assert!(toml::from_str::<Config>(&unknown).is_err());
    }
}
