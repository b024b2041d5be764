//! Reloading a running daemon (SIGHUP, `POST /admin/reload`).
//!
//! The configuration file is read again. Each role's plugin (`[collector]`,
//! `[uploader]`: the file, its options, limits, `exec_*`, inputs and
//! `sha256` pin) is loaded and checked exactly as at start; one that
//! passes replaces the running one, one that fails leaves it in place and
//! its reason in the log and in `/health`. Jobs already running finish on
//! the plugin they started with. The `[tls]` files and `[upload] ca_file`
//! are read again too. Anything else that changed is reported as needing
//! a restart. A reload never stops the daemon.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use super::{RolePlugin, load_role};
use crate::config::{Config, PluginRole};
use crate::node::{NodeService, PluginSet};
use crate::plugin::PluginHost;
use crate::plugin::collector::CollectorPlugin;
use crate::plugin::uploader::UploaderPlugin;
use crate::protocol::PluginRef;
use crate::tls::TlsContext;

/// What a reload did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReloadReport {
    /// Every part was read and applied.
    pub ok: bool,
    /// The file could not be read or checked: nothing was applied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_error: Option<String>,
    pub roles: Vec<RoleReload>,
    /// `[tls]` and `[upload] ca_file`: `reloaded`, or why not.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<String>,
    /// Settings that changed in the file but only take effect at the
    /// next start.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub restart_needed: Vec<String>,
}

/// One role's outcome.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RoleReload {
    pub role: String,
    /// `reloaded` (a new plugin or new settings run from now on),
    /// `unchanged`, or `failed` (the previous one still runs).
    pub outcome: &'static str,
    /// The plugin that runs for this role now.
    pub plugin: PluginRef,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub struct Reloader {
    config_path: PathBuf,
    plugins: Arc<PluginHost>,
    node: Arc<NodeService>,
    tls: Option<Arc<TlsContext>>,
    /// The configuration as it was at start (what a restart would change).
    at_start: Config,
    /// The role settings now in force.
    roles_now: std::sync::Mutex<(crate::config::PluginRole, crate::config::PluginRole)>,
    /// One reload at a time.
    running: tokio::sync::Mutex<()>,
}

impl Reloader {
    pub fn new(
        config_path: PathBuf,
        at_start: Config,
        plugins: Arc<PluginHost>,
        node: Arc<NodeService>,
        tls: Option<Arc<TlsContext>>,
    ) -> Reloader {
        let roles_now = (at_start.collector.clone(), at_start.uploader.clone());
        Reloader {
            config_path,
            plugins,
            node,
            tls,
            at_start,
            roles_now: std::sync::Mutex::new(roles_now),
            running: Default::default(),
        }
    }

    /// Reload; `why` names the trigger in the log (`SIGHUP`, `POST
    /// /admin/reload by NAME`).
    pub async fn reload(&self, why: &str) -> ReloadReport {
        let _one = self.running.lock().await;
        let mut report = ReloadReport {
            ok: true,
            config_error: None,
            roles: Vec::new(),
            files: Vec::new(),
            restart_needed: Vec::new(),
        };
        let config = match Config::load(&self.config_path) {
            Ok(config) => config,
            Err(e) => {
                let error = format!("{e:#}");
                tracing::error!(
                    trigger = why,
                    "reload: the configuration was not applied: {error}"
                );
                report.ok = false;
                self.node.plugins().set_problem("config", error.clone());
                report.config_error = Some(error);
                let current = self.node.plugins().current();
                for plugin in current.refs() {
                    report.roles.push(RoleReload {
                        role: plugin.role.clone(),
                        outcome: "unchanged",
                        plugin,
                        error: None,
                    });
                }
                return report;
            }
        };
        let dir = self
            .config_path
            .parent()
            .unwrap_or(std::path::Path::new("."));
        let (collector_now, uploader_now) = self.roles_now.lock().unwrap().clone();
        let active = self.node.plugins();
        active.clear_problem("config");

        // The reasons go to the log, the report and `/health` (which
        // anyone may read): nothing secret in them.
        let secrets = [&self.at_start, &config];
        let outcome = self
            .reload_role::<CollectorPlugin>(&config.collector, &collector_now, dir)
            .await
            .map_err(|e| scrub(&e, &secrets));
        report.push_role::<CollectorPlugin>(outcome, active, why);
        let outcome = self
            .reload_role::<UploaderPlugin>(&config.uploader, &uploader_now, dir)
            .await
            .map_err(|e| scrub(&e, &secrets));
        report.push_role::<UploaderPlugin>(outcome, active, why);

        // Certificates and the uploads' CA file.
        if let Some(tls) = &self.tls {
            match tls.reload() {
                Ok(()) => {
                    tracing::info!(trigger = why, cert_file = %tls.files().cert_file.display(),
                        "reload: TLS certificates reloaded; new connections use them");
                    report.files.push("[tls]: reloaded".into());
                }
                Err(e) => {
                    tracing::error!(
                        trigger = why,
                        "reload: TLS certificates not reloaded, the previous ones stay in use: {e:#}"
                    );
                    report.ok = false;
                    report.files.push(format!("[tls]: not reloaded: {e:#}"));
                }
            }
        }
        let upload_tls = self.node.upload_tls();
        if let Some(ca_file) = upload_tls.ca_file() {
            match upload_tls.reload() {
                Ok(()) => {
                    tracing::info!(trigger = why, ca_file = %ca_file.display(),
                        "reload: [upload] ca_file reloaded; new uploads use it");
                    report
                        .files
                        .push(format!("[upload] ca_file {}: reloaded", ca_file.display()));
                }
                Err(e) => {
                    tracing::error!(
                        trigger = why,
                        "reload: [upload] ca_file not reloaded, the previous one stays in use: {e}"
                    );
                    report.ok = false;
                    report
                        .files
                        .push(format!("[upload] ca_file: not reloaded: {e}"));
                }
            }
        }
        report.restart_needed = needs_restart(&self.at_start, &config);
        if !report.restart_needed.is_empty() {
            tracing::warn!(trigger = why, changed = ?report.restart_needed,
                "reload: these settings changed and take effect at the next start");
        }
        report
    }
}

impl Reloader {
    /// Load and check `P`'s role from `config` as at start; put it in
    /// place if it passes. Whether nothing changed (same component, same
    /// settings as `now`), or why it was refused.
    async fn reload_role<P: RolePlugin>(
        &self,
        config: &PluginRole,
        now: &PluginRole,
        dir: &std::path::Path,
    ) -> Result<bool, String> {
        let active = self.node.plugins();
        let before = role_ref::<P>(&active.current());
        let role = load_role::<P>(&self.plugins, config, dir)
            .await
            .map_err(|e| format!("{e:#}"))?;
        P::replace(active, role);
        let same = role_ref::<P>(&active.current()) == before && same_settings(config, now);
        let mut roles_now = self.roles_now.lock().unwrap();
        match P::ROLE {
            "collector" => roles_now.0 = config.clone(),
            _ => roles_now.1 = config.clone(),
        }
        Ok(same)
    }
}

/// What runs for `P`'s role in `set`.
fn role_ref<P: RolePlugin>(set: &PluginSet) -> PluginRef {
    let plugin = &P::of(set).plugin;
    crate::node::plugins::plugin_ref(P::ROLE, plugin.source(), plugin.identity())
}

impl ReloadReport {
    fn push_role<P: RolePlugin>(
        &mut self,
        outcome: Result<bool, String>,
        active: &crate::node::ActivePlugins,
        why: &str,
    ) {
        let role = P::ROLE;
        let plugin = role_ref::<P>(&active.current());
        let (outcome, error) = match outcome {
            Ok(true) => ("unchanged", None),
            Ok(false) => {
                tracing::info!(trigger = why, role, plugin = %plugin.source,
                    sha256 = %plugin.sha256, "reload: new jobs use this plugin");
                ("reloaded", None)
            }
            Err(e) => {
                tracing::error!(trigger = why, role, running = %plugin.source,
                    "reload: the {role} plugin was not replaced, the previous one keeps running: {e}");
                active.set_problem(role, e.clone());
                self.ok = false;
                ("failed", Some(e))
            }
        };
        self.roles.push(RoleReload {
            role: role.to_string(),
            outcome,
            plugin,
            error,
        });
    }
}

/// `text` with the values of each config's cluster secret and
/// secret-looking options (`env.API_TOKEN`, ...) masked, should a
/// plugin's message repeat one. (Parse errors never quote the file:
/// `Config::load`.)
fn scrub(text: &str, configs: &[&Config]) -> String {
    let mut text = text.to_string();
    for config in configs {
        let options = [&config.collector, &config.uploader]
            .into_iter()
            .flat_map(|role| role.option_pairs())
            .filter(|(k, _)| crate::protocol::is_secret_name(k))
            .map(|(_, v)| v);
        for secret in config.cluster_secret.iter().cloned().chain(options) {
            if !secret.is_empty() {
                text = text.replace(&secret, crate::protocol::MASK);
            }
        }
    }
    text
}

fn same_settings(a: &crate::config::PluginRole, b: &crate::config::PluginRole) -> bool {
    serde_json::to_value(a).ok() == serde_json::to_value(b).ok()
}

/// The top-level settings that differ between `old` and `new`, other
/// than the roles (which a reload applies).
fn needs_restart(old: &Config, new: &Config) -> Vec<String> {
    let (Ok(serde_json::Value::Object(old)), Ok(serde_json::Value::Object(new))) =
        (serde_json::to_value(old), serde_json::to_value(new))
    else {
        return Vec::new();
    };
    let mut keys: Vec<&String> = old.keys().chain(new.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| !matches!(k.as_str(), "collector" | "uploader"))
        .filter(|k| old.get(*k) != new.get(*k))
        .map(|k| k.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_settings_outside_the_roles_need_a_restart() {
        let text = r#"
            node = "n1"
            listen = "127.0.0.1:9000"
            data_dir = "/tmp/d"
            tls = "off"
            cluster_secret = "0123456789abcdef"
            [nodes]
            n1 = "127.0.0.1:9000"
        "#;
        let old: Config = toml::from_str(text).unwrap();
        let mut new = old.clone();
        new.collector.timeout_secs = 5.0;
        new.uploader.plugin = "/x.wasm".into();
        assert!(needs_restart(&old, &new).is_empty());
        new.listen = "127.0.0.1:9001".parse().unwrap();
        new.storage.job_max_files = 7;
        assert_eq!(needs_restart(&old, &new), ["listen", "storage"]);
        assert!(same_settings(&old.collector, &old.collector.clone()));

        // What a reload reports never carries a secret.
        let mut secret = old.clone();
        secret
            .collector
            .options
            .insert("env.API_TOKEN".into(), "t0ken-value".into());
        let plugin_error = "collector plugin x: invalid option: t0ken-value and 0123456789abcdef";
        assert_eq!(
            scrub(plugin_error, &[&secret]),
            "collector plugin x: invalid option: ***** and *****"
        );
        assert!(!same_settings(&old.collector, &new.collector));
    }
}
