//! Cluster settings an admin changes at run time (Couchbase's
//! `/settings/...`): today the default log redaction level. Each node
//! keeps its copy in `data_dir/settings.json`; a change made on one node
//! is sent to every other node.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// The levels `logRedactionLevel` may take.
pub const REDACTION_LEVELS: &[&str] = &["none", "partial"];
/// ns_server's message for any other value.
pub const BAD_REDACTION_LEVEL: &str = "The value must be one of the following: [none,partial]";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSettings {
    /// Redaction used when a start request does not say.
    pub log_redaction_level: String,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings {
            log_redaction_level: "none".into(),
        }
    }
}

/// This node's copy of the settings, saved on every change.
pub struct SettingsStore {
    path: PathBuf,
    current: Mutex<ClusterSettings>,
}

impl SettingsStore {
    /// Load `data_dir/settings.json`, or the defaults when it is missing
    /// or unreadable (logged).
    pub fn open(data_dir: &Path) -> SettingsStore {
        let path = data_dir.join("settings.json");
        let current = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), "ignoring unreadable settings: {e}");
                ClusterSettings::default()
            }),
            Err(_) => ClusterSettings::default(),
        };
        SettingsStore {
            path,
            current: Mutex::new(current),
        }
    }

    pub fn get(&self) -> ClusterSettings {
        self.current.lock().unwrap().clone()
    }

    /// Replace the settings and save them (atomically).
    pub fn set(&self, settings: ClusterSettings) -> std::io::Result<()> {
        let mut current = self.current.lock().unwrap();
        crate::files::write_atomically(&self.path, &serde_json::to_vec_pretty(&settings)?)?;
        *current = settings;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = SettingsStore::open(dir.path());
        assert_eq!(store.get().log_redaction_level, "none");
        store
            .set(ClusterSettings {
                log_redaction_level: "partial".into(),
            })
            .unwrap();
        assert_eq!(
            SettingsStore::open(dir.path()).get().log_redaction_level,
            "partial"
        );
    }
}
