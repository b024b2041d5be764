//! The plugins a node runs, replaceable while it runs.
//!
//! A reload (SIGHUP, `POST /admin/reload`) loads and checks each role's
//! plugin anew and swaps in the ones that pass, one role at a time. A job
//! takes the current set when it starts ([`ActivePlugins::current`]) and
//! keeps it to its end, so a running collection or upload finishes on the
//! plugin it started with. A role whose new plugin fails keeps its
//! previous one, and the reason stays visible (`/health`) until a later
//! reload of that role succeeds.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use serde::Serialize;

use super::Role;
use crate::plugin::collector::CollectorPlugin;
use crate::plugin::uploader::UploaderPlugin;
use crate::plugin::{PluginIdentity, PluginSource};
use crate::protocol::PluginRef;

/// One role's plugin of each kind.
pub struct PluginSet {
    pub collector: Role<CollectorPlugin>,
    pub uploader: Role<UploaderPlugin>,
}

impl PluginSet {
    /// What `/health` shows: both plugins.
    pub fn refs(&self) -> Vec<PluginRef> {
        vec![self.collector_ref(), self.uploader_ref()]
    }

    pub fn collector_ref(&self) -> PluginRef {
        plugin_ref(
            "collector",
            self.collector.plugin.source(),
            self.collector.plugin.identity(),
        )
    }

    pub fn uploader_ref(&self) -> PluginRef {
        plugin_ref(
            "uploader",
            self.uploader.plugin.source(),
            self.uploader.plugin.identity(),
        )
    }
}

pub fn plugin_ref(role: &str, source: &PluginSource, identity: &PluginIdentity) -> PluginRef {
    PluginRef {
        role: role.to_string(),
        source: source.to_string(),
        sha256: identity.sha256.clone(),
        wit_version: identity.wit_version.clone(),
    }
}

/// Why a role's new plugin was not taken, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadProblem {
    pub role: String,
    /// The message the daemon would have stopped with at start.
    pub error: String,
    /// RFC 3339 UTC.
    pub at: String,
}

/// The current plugin set, and each role's last failed reload.
pub struct ActivePlugins {
    set: RwLock<Arc<PluginSet>>,
    problems: Mutex<BTreeMap<String, LoadProblem>>,
}

impl ActivePlugins {
    pub fn new(set: PluginSet) -> ActivePlugins {
        ActivePlugins {
            set: RwLock::new(Arc::new(set)),
            problems: Mutex::default(),
        }
    }

    /// The set to run a job with (kept by the job until it ends).
    pub fn current(&self) -> Arc<PluginSet> {
        self.set.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Put `collector` in place of the current one; clears its problem.
    pub fn replace_collector(&self, collector: Role<CollectorPlugin>) {
        let mut set = self.set.write().unwrap_or_else(|e| e.into_inner());
        *set = Arc::new(PluginSet {
            collector,
            uploader: set.uploader.clone(),
        });
        self.clear_problem("collector");
    }

    /// Put `uploader` in place of the current one; clears its problem.
    pub fn replace_uploader(&self, uploader: Role<UploaderPlugin>) {
        let mut set = self.set.write().unwrap_or_else(|e| e.into_inner());
        *set = Arc::new(PluginSet {
            collector: set.collector.clone(),
            uploader,
        });
        self.clear_problem("uploader");
    }

    /// `role`'s new plugin was refused: the old one stays; say why.
    pub fn set_problem(&self, role: &str, error: String) {
        let at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        self.problems.lock().unwrap().insert(
            role.to_string(),
            LoadProblem {
                role: role.to_string(),
                error,
                at,
            },
        );
    }

    pub fn clear_problem(&self, role: &str) {
        self.problems.lock().unwrap().remove(role);
    }

    /// The roles whose last reload failed (their previous plugin runs).
    pub fn problems(&self) -> Vec<LoadProblem> {
        self.problems.lock().unwrap().values().cloned().collect()
    }
}
