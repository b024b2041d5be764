//! One daemon: load the configured plugins (failing fast on a bad config),
//! build the node and coordinator, serve the API until SIGTERM/SIGINT,
//! then cancel whatever runs and clean up. The listener and its limits
//! are in [`listener`].

pub mod listener;
pub mod reload;
mod unread_body;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};

use crate::api::{self, AppState};
use crate::auth::Users;
use crate::config::{Config, PluginRole};
use crate::coordinator::Coordinator;
use crate::coordinator::peers::Peers;
use crate::node::storage::Storage;
use crate::node::{ActivePlugins, NodeService, PluginSet, Role, Roles};
use crate::plugin::collector::CollectorPlugin;
use crate::plugin::exec::ExecPolicy;
use crate::plugin::uploader::UploaderPlugin;
use crate::plugin::{PluginHost, PluginSource, PoolSizing, RunLimits};
use crate::tls::{NodeIdentities, TlsContext};

/// How long shutdown waits for a cancelled job to clean up.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Build the application from `config`, read from `config_path` (whose
/// directory resolves relative plugin paths, and which a reload reads
/// again). Compiles and checks both plugins.
pub async fn build(config: &Config, config_path: &Path) -> Result<(AppState, api::AppRouter)> {
    let config_dir = config_path.parent().unwrap_or(Path::new("."));
    // Read the CA file once, before the slow part of the start.
    let upload_tls = config
        .upload
        .upload_tls()
        .map_err(|e| anyhow!("upload.{e}"))?;
    let pool = PoolSizing::for_limits(
        [&config.collector, &config.uploader].map(|role| (role.memory_limit_mb as usize) << 20),
    );
    let plugins = PluginHost::pooled(config.plugin_cache_dir.clone(), pool)?;
    let collector = load_role::<CollectorPlugin>(&plugins, &config.collector, config_dir).await?;
    let uploader = load_role::<UploaderPlugin>(&plugins, &config.uploader, config_dir).await?;
    tracing::info!(
        collector = %collector.plugin.source(),
        uploader = %uploader.plugin.source(),
        allocator = %plugins.allocator(),
        "plugins loaded"
    );

    let roles = Roles {
        plugins: ActivePlugins::new(PluginSet {
            collector,
            uploader,
        }),
        upload_policy: config.upload.clone(),
        upload_tls: upload_tls.clone(),
    };
    let tls = config
        .tls_files()
        .map(|files| TlsContext::load(files).context("[tls]"))
        .transpose()?;
    let heartbeat = Duration::from_millis(config.coordinator.heartbeat_interval_ms);
    let storage = Storage::open(&config.data_dir, &config.node, config.storage.clone())
        .with_context(|| format!("opening data_dir {}", config.data_dir.display()))?;
    // Nothing runs yet: whatever a job left behind is a leftover of a
    // crash or a kill.
    storage.clean_after_restart();
    let node = NodeService::new(config.node.clone(), storage, roles, heartbeat);
    let peers = Peers::new(
        &config.nodes,
        config.secret(),
        &config.node,
        tls.clone(),
        Duration::from_millis(config.coordinator.connect_timeout_ms),
        Duration::from_millis(config.coordinator.peer_timeout_ms),
    )?;
    crate::coordinator::runtime::start_threads().context("starting the coordinator's threads")?;
    let coordinator = Coordinator::new(
        config.node.clone(),
        peers,
        config.coordinator.clone(),
        config.phase_limits(),
        config.upload.clone(),
        upload_tls,
        &config.data_dir,
    );
    let reloader = Arc::new(reload::Reloader::new(
        config_path.to_path_buf(),
        config.clone(),
        plugins.clone(),
        node.clone(),
        tls.clone(),
    ));
    let state = AppState {
        reloader,
        node,
        coordinator,
        users: Arc::new(Users::new(&config.users)),
        peer_auth: Arc::new(crate::peer_auth::PeerVerifier::new(
            config.secret(),
            config.nodes.keys().cloned(),
        )),
        node_identities: tls
            .as_ref()
            .filter(|tls| tls.mutual())
            .map(|_| Arc::new(NodeIdentities::new(&config.nodes))),
        tls,
        health_waiters: Default::default(),
        last_refusal_logged: Default::default(),
        audit: Arc::new(api::audit::AuditLog::new(
            &config.data_dir.join("audit.log"),
        )),
        settings: Arc::new(crate::settings::SettingsStore::open(&config.data_dir)),
        pool_probe: Default::default(),
    };
    Ok((state.clone(), api::router(state)))
}

/// What start-up and a reload need of a role's plugin type.
pub(crate) trait RolePlugin: Sized + Send + Sync + 'static {
    /// `collector` or `uploader`: the config section and the log's word.
    const ROLE: &'static str;
    fn load(host: &Arc<PluginHost>, source: PluginSource) -> Result<Self>;
    fn source(&self) -> &PluginSource;
    fn identity(&self) -> &crate::plugin::PluginIdentity;
    fn validate_options(
        &self,
        options: &[(String, String)],
    ) -> impl std::future::Future<Output = Result<(), crate::plugin::collector::RunError>> + Send;
    /// This role's plugin in a set.
    fn of(set: &PluginSet) -> &Role<Self>;
    /// Put `role` in place of the running one.
    fn replace(active: &ActivePlugins, role: Role<Self>);
}

impl RolePlugin for CollectorPlugin {
    const ROLE: &'static str = "collector";
    fn load(host: &Arc<PluginHost>, source: PluginSource) -> Result<Self> {
        CollectorPlugin::load(host, source)
    }
    fn source(&self) -> &PluginSource {
        CollectorPlugin::source(self)
    }
    fn identity(&self) -> &crate::plugin::PluginIdentity {
        CollectorPlugin::identity(self)
    }
    async fn validate_options(
        &self,
        options: &[(String, String)],
    ) -> Result<(), crate::plugin::collector::RunError> {
        CollectorPlugin::validate_options(self, options).await
    }
    fn of(set: &PluginSet) -> &Role<Self> {
        &set.collector
    }
    fn replace(active: &ActivePlugins, role: Role<Self>) {
        active.replace_collector(role)
    }
}

impl RolePlugin for UploaderPlugin {
    const ROLE: &'static str = "uploader";
    fn load(host: &Arc<PluginHost>, source: PluginSource) -> Result<Self> {
        UploaderPlugin::load(host, source)
    }
    fn source(&self) -> &PluginSource {
        UploaderPlugin::source(self)
    }
    fn identity(&self) -> &crate::plugin::PluginIdentity {
        UploaderPlugin::identity(self)
    }
    async fn validate_options(
        &self,
        options: &[(String, String)],
    ) -> Result<(), crate::plugin::collector::RunError> {
        UploaderPlugin::validate_options(self, options).await
    }
    fn of(set: &PluginSet) -> &Role<Self> {
        &set.uploader
    }
    fn replace(active: &ActivePlugins, role: Role<Self>) {
        active.replace_uploader(role)
    }
}

/// Compile (off the async runtime), pin-check, configure and check
/// (`validate-options`) one role's plugin, as start-up and a reload do.
pub(crate) async fn load_role<P: RolePlugin>(
    plugins: &Arc<PluginHost>,
    config: &PluginRole,
    config_dir: &Path,
) -> Result<Role<P>> {
    let role = P::ROLE;
    let source = PluginSource::parse(&config.plugin, config_dir)
        .with_context(|| format!("[{role}] plugin"))?;
    plugins
        .check_memory_limit((config.memory_limit_mb as usize) << 20)
        .with_context(|| format!("[{role}]"))?;
    let plugins = plugins.clone();
    let plugin = tokio::task::spawn_blocking(move || P::load(&plugins, source))
        .await?
        .with_context(|| format!("[{role}] plugin"))?;
    if let Some(pin) = &config.sha256 {
        let actual = &plugin.identity().sha256;
        if !actual.eq_ignore_ascii_case(pin) {
            anyhow::bail!(
                "[{role}] plugin {}: its SHA-256 is {actual}, but [{role}] sha256 pins {}: \
                 refusing to load it (a different build, or a tampered file)",
                config.plugin,
                pin.to_ascii_lowercase()
            );
        }
    }
    let loaded = Role {
        plugin: Arc::new(plugin),
        options: config.option_pairs(),
        limits: RunLimits {
            timeout: Duration::from_secs_f64(config.timeout_secs),
            memory_bytes: (config.memory_limit_mb as usize) << 20,
        },
        exec: Arc::new(ExecPolicy {
            allowed: config.exec_allow.clone(),
            env: config
                .exec_env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            env_allowed: config.exec_env_allow.clone(),
            grace: Duration::from_secs_f64(config.exec_grace_secs),
            max_processes: config.exec_max_processes,
            script: None,
        }),
        inputs: config.inputs.clone(),
    };
    loaded
        .plugin
        .validate_options(&loaded.options)
        .await
        .map_err(|e| anyhow!("{role} plugin {}: {e}", loaded.plugin.source()))?;
    Ok(loaded)
}

/// Serve on `listener` until a termination signal.
pub async fn serve(
    config: Config,
    config_path: &Path,
    listener: std::net::TcpListener,
) -> Result<()> {
    // `data_dir` is made by `Storage::open` (in `build`), the daemon's
    // own from the start: mode 0700, whatever the umask.
    return_large_allocations_to_the_system();
    let limits = listener::Limits::resolve(&config.server, config.nodes.len());
    let (state, app) = build(&config, config_path).await?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let addr = listener.local_addr()?;
    if state.tls.is_none() {
        // `listen` was checked with the config; a socket handed over with
        // --listen-fd is checked here.
        if !config.allow_plaintext && !addr.ip().is_loopback() {
            anyhow::bail!(
                "tls = \"off\" serves plain HTTP, which is allowed on a loopback address only: \
                 the socket is bound to {addr}; configure [tls], or set allow_plaintext = true"
            );
        }
        tracing::warn!(%addr, "serving plain HTTP (tls = \"off\"): passwords, signatures \
            and redaction salts cross the network in clear");
    }
    tracing::info!(node = %config.node, %addr, tls = state.tls.is_some(),
        mutual_tls = state.node_identities.is_some(),
        max_connections = limits.max_connections, peer_reserved = limits.peer_reserved,
        header_timeout = ?limits.header_timeout, "listening");

    // The accept loop runs on the runtime's threads, not on this one (the
    // process's main thread, outside the runtime): a connection it
    // accepts then starts on the thread that accepted it, instead of each
    // waking a runtime thread from outside.
    let serving = tokio::spawn(listener::serve(
        listener,
        app,
        limits,
        state.tls.clone(),
        std::future::pending(),
    ));
    let mut serving = tokio_util::task::AbortOnDropHandle::new(serving);
    // Not a graceful shutdown: sessions never end by themselves,
    // so we stop serving, then cancel and clean up. The accept loop ends
    // only by failing (a panic): the daemon then cleans up as for a
    // signal, and exits with the failure, not with success.
    let mut failed = None;
    tokio::select! {
        ended = &mut serving => {
            let why = match ended {
                Err(e) => format!("the listener failed: {e}"),
                Ok(()) => "the listener stopped".to_string(),
            };
            tracing::error!("{why}: shutting down");
            failed = Some(why);
        }
        _ = reload_on_hangup(state.reloader.clone()) => {}
        signal = termination() => tracing::info!("{signal}: shutting down"),
    }
    drop(serving);
    state.coordinator.shutdown(SHUTDOWN_GRACE).await;
    // The job's programs get their two grace periods (stdin closed, then
    // SIGTERM) before SIGKILL: never exit in the middle of that.
    let exec_stop = Duration::from_secs_f64(2.0 * config.collector.exec_grace_secs + 5.0);
    state.node.shutdown(SHUTDOWN_GRACE.max(exec_stop)).await;
    tracing::info!("stopped");
    match failed {
        Some(why) => Err(anyhow::anyhow!(why)),
        None => Ok(()),
    }
}

/// Allocations of 1 MiB or more (argon2's 19 MiB work areas) get their
/// own mappings, returned to the system when freed: glibc's default
/// raises that threshold after the first such free, and then keeps the
/// memory in its arenas for good.
///
/// Setting it also freezes the trim threshold at its 128 KiB default
/// (glibc no longer raises it either), and then every free of an upload's
/// 256 KiB body chunks gave the heap top back and the next chunk faulted
/// it in again: uploads ran at 1.3 GiB/s instead of 2.1. Up to 16 MiB of
/// free heap is kept instead.
fn return_large_allocations_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 16 << 20);
    }
}

/// On each SIGHUP, reload (see [`reload`]); never stop.
async fn reload_on_hangup(reloader: Arc<reload::Reloader>) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    while hangup.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading the configuration");
        let report = reloader.reload("SIGHUP").await;
        tracing::info!(ok = report.ok, "SIGHUP: reload done");
    }
}

async fn termination() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}
