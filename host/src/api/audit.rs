//! The audit log: one JSON line per start, cancel or reload request, on the node
//! that received it, saying who asked for what and what came of it.
//! Secrets never reach it: a parameter whose name looks secret (password,
//! secret, salt, token, key...) is masked, and so is any parameter the
//! route does not know (a misspelled secret is still a secret); only its
//! name is kept. Credentials in a URL are masked too.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::{Map, Value, json};

use super::params::{Param, Params};
use crate::protocol::{MASK, is_secret_name};

/// Parameters that may hold `user:password@` in a URL.
const URL_PARAMS: &[&str] = &["uploadProxy", "uploadHost", "upload_host"];

pub struct AuditLog {
    path: PathBuf,
    file: Mutex<Option<std::fs::File>>,
}

/// One audited request.
pub struct Entry<'a> {
    pub user: &'a str,
    /// `start`, `cancel` or `reload`.
    pub action: &'a str,
    pub route: &'a str,
    pub params: Option<&'a Params>,
    /// The parameters the route knows; any other is recorded masked.
    pub known: &'a [&'a str],
    /// The task it started or cancelled, if any.
    pub task_id: Option<&'a str>,
    /// `Ok(())`, or the error the caller got.
    pub outcome: Result<(), String>,
}

impl AuditLog {
    /// Appends to `path` (created with its directory on first use).
    pub fn new(path: &Path) -> AuditLog {
        AuditLog {
            path: path.to_path_buf(),
            file: Mutex::new(None),
        }
    }

    /// Record `entry`; a failure to write is logged, never fatal.
    pub fn record(&self, entry: Entry<'_>) {
        let mut line = json!({
            "ts": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "user": entry.user,
            "action": entry.action,
            "route": entry.route,
            "result": if entry.outcome.is_ok() { "accepted" } else { "refused" },
        });
        if let Some(params) = entry.params {
            line["params"] = Value::Object(masked(params, entry.known));
        }
        if let Some(id) = entry.task_id {
            line["taskId"] = id.into();
        }
        if let Err(e) = &entry.outcome {
            line["error"] = e.as_str().into();
        }
        if let Err(e) = self.append(&line) {
            tracing::error!(path = %self.path.display(), "could not write the audit log: {e}");
        }
    }

    fn append(&self, line: &Value) -> std::io::Result<()> {
        let mut file = self.file.lock().unwrap();
        if file.is_none() {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            *file = Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)?,
            );
        }
        let mut bytes = serde_json::to_vec(line)?;
        bytes.push(b'\n');
        let f = file.as_mut().expect("opened above");
        f.write_all(&bytes)?;
        f.flush()
    }
}

/// The request's parameters with secrets (and unknown parameters) masked.
fn masked(params: &Params, known: &[&str]) -> Map<String, Value> {
    params
        .iter()
        .map(|(key, value)| {
            let value = if !known.contains(&key.as_str()) || is_secret_name(key) {
                Value::from(MASK)
            } else {
                match value {
                    Param::Text(t) => Value::from(mask(key, t)),
                    Param::List(items) => items.iter().map(|i| mask(key, i)).collect(),
                }
            };
            (key.clone(), value)
        })
        .collect()
}

fn mask(key: &str, value: &str) -> String {
    if is_secret_name(key) {
        return MASK.into();
    }
    if URL_PARAMS.contains(&key)
        && let Some((scheme_and_userinfo, rest)) = value.rsplit_once('@')
    {
        let scheme = scheme_and_userinfo
            .split_once("://")
            .map(|(s, _)| format!("{s}://"))
            .unwrap_or_default();
        return format!("{scheme}{MASK}@{rest}");
    }
    value.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_secret_looking_parameters_are_masked_by_name() {
        let params: Params = [
            ("encryptionPassword", "X"),
            ("logredactionsalt", "pepper"),
            ("apiToken", "t"),
            ("customer", "Example"),
            ("tikcet", "123"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), Param::Text(v.to_string())))
        .collect();
        let m = masked(&params, &["customer", "logRedactionSalt"]);
        assert_eq!(m["customer"], "Example");
        for key in [
            "encryptionPassword",
            "logredactionsalt",
            "apiToken",
            "tikcet",
        ] {
            assert_eq!(m[key], MASK, "{key}");
        }
    }

    #[test]
    fn a_known_encryption_password_is_masked_and_only_its_presence_kept() {
        let params: Params = [
            ("encryptionPassword", "zip-pass"),
            ("logRedactionSalt", "pepper"),
            ("nodes", "*"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), Param::Text(v.to_string())))
        .collect();
        let known = ["nodes", "logRedactionSalt", "encryptionPassword"];
        let m = masked(&params, &known);
        assert_eq!(m["encryptionPassword"], MASK);
        assert_eq!(m["logRedactionSalt"], MASK);
        assert_eq!(m["nodes"], "*");
        let list = Param::List(vec!["zip-pass".into()]);
        let listed: Params = [("encryptionPassword".to_string(), list)].into();
        assert_eq!(masked(&listed, &known)["encryptionPassword"], MASK);
        let text = serde_json::to_string(&m).unwrap();
        assert!(
            !text.contains("zip-pass") && !text.contains("pepper"),
            "{text}"
        );
    }

    #[test]
    fn secrets_are_masked() {
        assert_eq!(mask("logRedactionSalt", "pepper"), MASK);
        assert_eq!(
            mask("uploadProxy", "http://user:pw@proxy:3128"),
            "http://*****@proxy:3128"
        );
        assert_eq!(mask("uploadProxy", "u:p@proxy:3128"), "*****@proxy:3128");
        assert_eq!(mask("uploadProxy", "proxy:3128"), "proxy:3128");
        assert_eq!(mask("customer", "a@b"), "a@b");
    }
}
