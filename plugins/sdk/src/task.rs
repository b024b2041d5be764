//! The start request's parameters (collectors, WIT 0.1.2), typed: see the
//! key table of `task` in `wit/types.wit`. Keys this SDK does not know
//! are kept ([`Parameters::get`]) and otherwise ignored, as the contract
//! asks.

use std::fmt;

use crate::Error;

/// `honour(key)`: this collector honours the start parameter `since` or
/// `until` (else the operator is told it was ignored).
pub use crate::collector::autocollect::plugin::task::honour;

/// The start request's parameters. Read them in every collection (call
/// [`Parameters::get`]): when the request asks for partial redaction or
/// encryption, the host fails a collector that never read them.
///
/// Its `Debug` output masks the salt and the password.
#[derive(Clone, Default)]
pub struct Parameters {
    pairs: Vec<(String, String)>,
}

impl Parameters {
    /// This run's parameters, from the host (`task.parameters()`).
    pub fn get() -> Parameters {
        Parameters::from_pairs(crate::collector::autocollect::plugin::task::parameters())
    }

    /// Parameters from key/value pairs (for tests).
    pub fn from_pairs(pairs: Vec<(String, String)>) -> Parameters {
        Parameters { pairs }
    }

    /// The value of any key, as given.
    pub fn value(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `log-redaction-level` is `partial`: redact what you collect (and
    /// name the zip `...-redacted.zip`, as `cbcollect_info` does).
    pub fn redact(&self) -> bool {
        self.value("log-redaction-level") == Some("partial")
    }

    /// `log-redaction-salt`: the salt for partial redaction, the same on
    /// every node. A secret: never log it.
    pub fn redaction_salt(&self) -> Option<&str> {
        self.value("log-redaction-salt")
    }

    /// `tmp-dir`: the host path of the job's temporary directory, for the
    /// programs the collector starts (the plugin cannot open it).
    pub fn tmp_dir(&self) -> Option<&str> {
        self.value("tmp-dir")
    }

    /// `task-regexp`: only collect the tasks whose names match.
    pub fn task_regexp(&self) -> Option<&str> {
        self.value("task-regexp")
    }

    /// `encryption-password`: encrypt the zip with it (WinZip AES-256;
    /// give it to [`ArchiveOptions::password`](crate::archive::ArchiveOptions::password)).
    /// A secret: never log it, nor put it on a command line.
    pub fn encryption_password(&self) -> Option<&str> {
        self.value("encryption-password")
    }

    /// `since`, as given (RFC 3339 UTC).
    pub fn since(&self) -> Option<&str> {
        self.value("since")
    }

    /// `until`, as given (RFC 3339 UTC).
    pub fn until(&self) -> Option<&str> {
        self.value("until")
    }

    /// The time window (`since`, `until`), parsed, each one declared
    /// honoured (`task.honour`) once parsed. Honour it: collect only what
    /// was written in it ([`TimeWindow::contains`]). A value that does not
    /// parse fails the collection: `failed` with status 2 and `the start
    /// parameter since ("..."): not an RFC 3339 time ...`.
    pub fn time_window(&self) -> Result<TimeWindow, Error> {
        self.window(honour)
    }

    /// [`time_window`](Parameters::time_window) without telling the host.
    pub fn parse_time_window(&self) -> Result<TimeWindow, Error> {
        self.window(|_| {})
    }

    fn window(&self, mut honour: impl FnMut(&str)) -> Result<TimeWindow, Error> {
        let mut window = TimeWindow::default();
        for (key, value) in &self.pairs {
            let slot = match key.as_str() {
                "since" => &mut window.since,
                "until" => &mut window.until,
                _ => continue,
            };
            let secs = crate::rfc3339::parse(value).map_err(|e| {
                Error::failed(2, format!("the start parameter {key} ({value:?}): {e}"))
            })?;
            *slot = Some(secs);
            honour(key);
        }
        Ok(window)
    }
}

impl fmt::Debug for Parameters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut map = f.debug_map();
        for (key, value) in &self.pairs {
            match key.as_str() {
                "log-redaction-salt" | "encryption-password" => map.entry(key, &"***"),
                _ => map.entry(key, value),
            };
        }
        map.finish()
    }
}

/// The request's time window, in seconds since the Unix epoch (either
/// end may be open).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimeWindow {
    pub since: Option<i64>,
    pub until: Option<i64>,
}

impl TimeWindow {
    /// `secs` (e.g. a file's modification time) is in the window, ends
    /// included.
    pub fn contains(&self, secs: i64) -> bool {
        self.since.is_none_or(|s| secs >= s) && self.until.is_none_or(|u| secs <= u)
    }

    /// Neither end is given.
    pub fn is_open(&self) -> bool {
        self.since.is_none() && self.until.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(list: &[(&str, &str)]) -> Parameters {
        Parameters::from_pairs(
            list.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn typed_keys() {
        let p = params(&[
            ("log-redaction-level", "partial"),
            ("log-redaction-salt", "s3cret"),
            ("encryption-password", "pw"),
            ("tmp-dir", "/tmp/job"),
            ("something-new", "x"),
        ]);
        assert!(p.redact());
        assert_eq!(p.redaction_salt(), Some("s3cret"));
        assert_eq!(p.encryption_password(), Some("pw"));
        assert_eq!(p.tmp_dir(), Some("/tmp/job"));
        assert_eq!(p.task_regexp(), None);
        assert_eq!(p.value("something-new"), Some("x"));
        let shown = format!("{p:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("\"pw\""),
            "{shown}"
        );
        assert!(!params(&[("log-redaction-level", "none")]).redact());
    }

    #[test]
    fn time_windows() {
        let p = params(&[("since", "1970-01-01T00:01:00Z")]);
        let w = p.parse_time_window().unwrap();
        assert_eq!(
            w,
            TimeWindow {
                since: Some(60),
                until: None
            }
        );
        assert!(w.contains(60) && w.contains(1 << 40) && !w.contains(59));
        assert!(TimeWindow::default().is_open());
        let bad = params(&[("until", "yesterday")]);
        assert_eq!(
            bad.parse_time_window(),
            Err(Error::failed(
                2,
                "the start parameter until (\"yesterday\"): not an RFC 3339 time such as \
                 2026-11-29T10:00:00Z: \"yesterday\""
            ))
        );
    }
}
