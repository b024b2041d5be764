//! This node's disk: where jobs write, where results are kept, and the
//! rules on both (`[storage]`).
//!
//! Layout under `data_dir`:
//!
//! | directory | who writes | what |
//! | --- | --- | --- |
//! | `jobs/TASK/` | the collector (and its programs) | its output directory |
//! | `tmp/TASK/` | the collector's programs | its temporary directory (unless `tmpDir`) |
//! | `results/TASK/` | the host | a successful collection's artifacts |
//! | `staging/TASK/` | the host | the one file an uploader sees |
//! | `state/tmpdirs/TASK` | the host | where a job's `tmpDir` subdirectory is, for cleanup after a crash |
//!
//! Host-owned directories are never inside a plugin-writable one, and
//! every operation on a plugin-writable one goes through [`SafeDir`], so a
//! symlink a plugin planted is never followed. An artifact must be a
//! regular file, with no other link to it, directly in the output
//! directory; it is moved (never copied through a link) into
//! `results/TASK/` or into the request's `logDir`.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use crate::config::StorageSettings;
use crate::protocol::TaskId;
use crate::safe_dir::{SafeDir, is_plain_name, normalize};

const JOBS: &str = "jobs";
const TMP: &str = "tmp";
const RESULTS: &str = "results";
const STAGING: &str = "staging";
const TMP_RECORDS: &str = "state/tmpdirs";

/// A directory a start request may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestedDir {
    /// `logDir`: where the zip is kept.
    Log,
    /// `tmpDir`: where the job's temporary directory goes.
    Tmp,
}

impl RequestedDir {
    fn key(self) -> &'static str {
        match self {
            RequestedDir::Log => "allowed_log_dirs",
            RequestedDir::Tmp => "allowed_tmp_dirs",
        }
    }
}

/// The directories of one running job.
pub struct JobDirs {
    /// The collector's output directory (`jobs/TASK/`).
    pub output: SafeDir,
    /// Its temporary directory.
    pub tmp: SafeDir,
    tmp_parent: SafeDir,
    tmp_name: String,
    /// Recorded for cleanup after a crash (a `tmpDir` subdirectory).
    tmp_recorded: bool,
}

impl JobDirs {
    pub fn output_path(&self) -> &Path {
        self.output.path()
    }

    pub fn tmp_path(&self) -> &Path {
        self.tmp.path()
    }
}

/// Where a kept artifact is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeptIn {
    Results,
    /// The request's `logDir`, as given.
    LogDir(String),
}

/// A successful collection's artifact, out of the plugin's reach.
#[derive(Debug, Clone)]
pub struct Kept {
    pub path: PathBuf,
    pub size: u64,
    pub file: String,
    pub dir: KeptIn,
    /// SHA-256 of the kept file (lowercase hex), computed by the host
    /// after the move, from the file itself.
    pub sha256: String,
    /// The bytes of every artifact kept (this one and the others).
    pub bytes_kept: u64,
    /// The host's manifest beside it, once written: its file name.
    pub manifest: Option<String>,
}

pub struct Storage {
    data_dir: PathBuf,
    /// `data_dir`, opened once.
    root: SafeDir,
    node: String,
    settings: StorageSettings,
    /// What `results/` holds: task → (when kept, bytes). Only the host
    /// writes there, so this stays true; it is read from disk at start.
    results: Mutex<BTreeMap<String, (SystemTime, u64)>>,
}

impl Storage {
    /// The storage in `data_dir` (made, mode 0700, if it is not there). Refused
    /// unless it belongs to the daemon's user (or root) and no one else
    /// may write it: the daemon removes the directories its records name
    /// and uploads what `results/` holds.
    pub fn open(data_dir: &Path, node: &str, settings: StorageSettings) -> io::Result<Storage> {
        let root = SafeDir::open_private(
            data_dir,
            "data_dir",
            "it holds the daemon's jobs, results and records",
        )?;
        Ok(Storage {
            data_dir: data_dir.to_path_buf(),
            root,
            node: node.to_string(),
            settings,
            results: Mutex::default(),
        })
    }

    pub fn settings(&self) -> &StorageSettings {
        &self.settings
    }

    fn area(&self, name: &str) -> io::Result<SafeDir> {
        self.root.create_dirs(Path::new(name))
    }

    /// A new, empty `area/TASK/` (a leftover of the same task, from a
    /// crash, is removed first).
    fn fresh(&self, area: &str, task: &TaskId) -> io::Result<SafeDir> {
        let area = self.area(area)?;
        area.remove_all(task)?;
        area.create_new_dir(task)
    }

    /// Why this node should not start a collection now, if it should not:
    /// less free space in `data_dir` than the reserve.
    pub fn low_disk(&self) -> Option<String> {
        let free = self.root.free_bytes();
        match free {
            Ok(free) if free < self.settings.min_free_mb << 20 => Some(format!(
                "free space in data_dir {} is {} MiB, below the reserve of {} MiB (storage.min_free_mb)",
                self.data_dir.display(),
                free >> 20,
                self.settings.min_free_mb
            )),
            Ok(_) => None,
            Err(e) => Some(format!(
                "cannot check free space in data_dir {}: {e}",
                self.data_dir.display()
            )),
        }
    }

    /// Is `requested` one of the operator's directories for `kind`, or
    /// below one (compared after resolving `.` and `..`)? The prefix and
    /// the rest of the path.
    pub fn allowed(
        &self,
        kind: RequestedDir,
        requested: &str,
    ) -> Result<(PathBuf, PathBuf), String> {
        let path = Path::new(requested);
        if !path.is_absolute() {
            return Err("Must be an absolute path".into());
        }
        if requested.len() > 4096 || requested.contains('\0') {
            return Err("is not a valid path".into());
        }
        let wanted = normalize(path);
        let prefixes = match kind {
            RequestedDir::Log => &self.settings.allowed_log_dirs,
            RequestedDir::Tmp => &self.settings.allowed_tmp_dirs,
        };
        for prefix in prefixes {
            let prefix = normalize(prefix);
            if let Ok(rest) = wanted.strip_prefix(&prefix) {
                return Ok((prefix, rest.to_path_buf()));
            }
        }
        Err(if prefixes.is_empty() {
            format!(
                "is not allowed: this node's configuration lists no directories for it ({})",
                kind.key()
            )
        } else {
            format!(
                "{} is not in a directory this node's configuration allows ({}: {})",
                wanted.display(),
                kind.key(),
                prefixes
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
    }

    /// Open (creating what is missing) a requested directory: below its
    /// prefix, no symlink is followed.
    fn open_requested(&self, kind: RequestedDir, requested: &str) -> Result<SafeDir, String> {
        let (prefix, rest) = self.allowed(kind, requested)?;
        let root = SafeDir::open_root(&prefix)
            .map_err(|e| format!("cannot open {}: {e}", prefix.display()))?;
        if rest.as_os_str().is_empty() {
            return Ok(root);
        }
        root.create_dirs(&rest)
            .map_err(|e| format!("cannot use {requested}: {e} (symlinks are not followed)"))
    }

    /// Fresh output and temporary directories for `task`. A leftover of
    /// the same task (a crash) is removed first.
    pub fn prepare_job(&self, task: &TaskId, tmp_dir: Option<&str>) -> Result<JobDirs, String> {
        let fail = |what: &str, e: io::Error| format!("could not create the job's {what}: {e}");
        let output = self
            .fresh(JOBS, task)
            .map_err(|e| fail("output directory", e))?;
        let (tmp_parent, tmp_name, tmp_recorded) = match tmp_dir {
            None => {
                let tmp = self.area(TMP).map_err(|e| fail("temporary directory", e))?;
                tmp.remove_all(task)
                    .map_err(|e| fail("temporary directory", e))?;
                (tmp, task.to_string(), false)
            }
            Some(requested) => {
                let parent = self.open_requested(RequestedDir::Tmp, requested)?;
                let name = format!("autocollect-{task}-{}", file_safe(&self.node));
                self.record_tmp(task, &parent.path().join(&name))
                    .map_err(|e| fail("temporary directory", e))?;
                (parent, name, true)
            }
        };
        let tmp = tmp_parent
            .create_new_dir(&tmp_name)
            .map_err(|e| fail("temporary directory", e))?;
        Ok(JobDirs {
            output,
            tmp,
            tmp_parent,
            tmp_name,
            tmp_recorded,
        })
    }

    fn record_tmp(&self, task: &TaskId, path: &Path) -> io::Result<()> {
        let records = self.data_dir.join(TMP_RECORDS);
        crate::files::write_atomically(
            &records.join(task.as_str()),
            path.as_os_str().as_encoded_bytes(),
        )
    }

    /// The job ran: remove its temporary directory.
    pub fn remove_tmp(&self, task: &TaskId, dirs: &JobDirs) {
        log_err(
            "removing the job's temporary directory",
            dirs.tmp_parent.remove_all(&dirs.tmp_name),
        );
        if dirs.tmp_recorded {
            let _ = std::fs::remove_file(self.data_dir.join(TMP_RECORDS).join(task.as_str()));
        }
    }

    /// Take the collector's artifacts out of its reach: each must be a
    /// regular file, with no other link, directly in the output directory.
    /// The first (the one reported and uploaded) goes into `logDir` if the
    /// request gave one, the others (and it, otherwise) into
    /// `results/TASK/`. Then the rest of the output directory is removed.
    pub fn keep(
        &self,
        task: &TaskId,
        dirs: &JobDirs,
        artifacts: &[String],
        log_dir: Option<&str>,
    ) -> Result<Kept, String> {
        let Some(first) = artifacts.first() else {
            return Err("the collector reported no artifact".into());
        };
        for name in artifacts {
            if !is_plain_name(name) {
                return Err(format!(
                    "the collector reported an artifact outside its output directory: {name:?}"
                ));
            }
            let id = dirs.output.regular_file(name).map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => format!("artifact {name:?} is missing"),
                _ => format!("artifact {name:?} is not a regular file in the output directory"),
            })?;
            if id.links != 1 {
                return Err(format!(
                    "artifact {name:?} has {} links: it may be another file's contents",
                    id.links
                ));
            }
        }
        let results = self
            .fresh(RESULTS, task)
            .map_err(|e| format!("could not create the results directory: {e}"))?;
        for name in &artifacts[1..] {
            move_checked(&dirs.output, name, &results)?;
        }
        let (target, dir) = match log_dir {
            Some(requested) => (
                self.open_requested(RequestedDir::Log, requested)
                    .map_err(|e| format!("logDir {requested} {e}"))?,
                KeptIn::LogDir(requested.to_string()),
            ),
            None => (results, KeptIn::Results),
        };
        let size = move_checked(&dirs.output, first, &target)?;
        let sha256 = hash_kept(&target, first, size)?;
        let others = artifacts[1..]
            .iter()
            .filter_map(|name| results_dir_size(&self.root, task, name))
            .sum::<u64>();
        let in_results = match dir {
            KeptIn::Results => size,
            KeptIn::LogDir(_) => 0,
        } + others;
        self.results
            .lock()
            .unwrap()
            .insert(task.to_string(), (SystemTime::now(), in_results));
        Ok(Kept {
            path: target.path().join(first),
            size,
            file: first.clone(),
            dir,
            sha256,
            bytes_kept: size + others,
            manifest: None,
        })
    }

    /// Write the host's manifest beside a kept artifact (atomically, never
    /// replacing a file): `manifest.json` in `results/TASK/`, or
    /// `<artifact>.manifest.json` in a `logDir` (shared by tasks). Records
    /// its name in `kept`.
    pub fn write_manifest(
        &self,
        task: &TaskId,
        kept: &mut Kept,
        bytes: &[u8],
    ) -> Result<(), String> {
        let dir = self.kept_dir(task, kept)?;
        let name = match kept.dir {
            KeptIn::Results => crate::manifest::RESULTS_NAME.to_string(),
            KeptIn::LogDir(_) => crate::manifest::name_for(&kept.file),
        };
        dir.write_new(&name, bytes).map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => format!(
                "could not write the manifest: {} already has a file named {name}",
                dir.path().display()
            ),
            _ => format!(
                "could not write the manifest {}: {e}",
                dir.path().join(&name).display()
            ),
        })?;
        kept.manifest = Some(name);
        Ok(())
    }

    /// Open the directory of a kept artifact.
    fn kept_dir(&self, task: &TaskId, kept: &Kept) -> Result<SafeDir, String> {
        match &kept.dir {
            KeptIn::Results => self
                .root
                .open_dir(&Path::new(RESULTS).join(task.as_str()))
                .map_err(|e| format!("cannot open the results of task {task}: {e}")),
            KeptIn::LogDir(requested) => self.open_requested(RequestedDir::Log, requested),
        }
    }

    /// Show `kept` to an uploader: hard-linked (or, from another
    /// filesystem, copied) alone into `staging/TASK/`; its path there.
    pub fn stage(&self, task: &TaskId, kept: &Kept) -> Result<PathBuf, String> {
        self.stage_file(task, kept, &kept.file, &kept.file)
    }

    /// Show `kept`'s manifest to an uploader, alone in `staging/TASK/`,
    /// under its upload name `<artifact>.manifest.json`; its path there.
    pub fn stage_manifest(&self, task: &TaskId, kept: &Kept) -> Result<PathBuf, String> {
        let Some(name) = &kept.manifest else {
            return Err(format!("{} has no manifest", kept.file));
        };
        self.stage_file(task, kept, name, &crate::manifest::name_for(&kept.file))
    }

    fn stage_file(
        &self,
        task: &TaskId,
        kept: &Kept,
        name: &str,
        as_name: &str,
    ) -> Result<PathBuf, String> {
        let from = self.kept_dir(task, kept)?;
        let staging = self
            .fresh(STAGING, task)
            .map_err(|e| format!("could not create the upload staging directory: {e}"))?;
        let staged = match from.link_to(name, &staging, as_name) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                from.copy_to(name, &staging, as_name).map(drop)
            }
            Err(e) => Err(e),
        };
        staged.map_err(|e| format!("could not stage {name} for the upload: {e}"))?;
        staging
            .regular_file(as_name)
            .map_err(|e| format!("staged file {as_name}: {e}"))?;
        Ok(staging.path().join(as_name))
    }

    pub fn unstage(&self, task: &TaskId) {
        if let Ok(staging) = self.area(STAGING) {
            log_err(
                "removing the upload staging directory",
                staging.remove_all(task),
            );
        }
    }

    /// A job failed or was cancelled: remove what it wrote (unless
    /// `keep_failed`), and what it had kept.
    pub fn discard(&self, task: &TaskId, kept: Option<&Kept>) {
        if self.settings.keep_failed {
            tracing::info!(task = %task, "keeping the job's output (storage.keep_failed)");
            return;
        }
        for area in [JOBS, RESULTS] {
            if let Ok(dir) = self.area(area) {
                log_err("removing the job's files", dir.remove_all(task));
            }
        }
        self.results.lock().unwrap().remove(task.as_str());
        if let Some(kept) = kept.filter(|k| matches!(k.dir, KeptIn::LogDir(_)))
            && let Ok(dir) = self.kept_dir(task, kept)
        {
            log_err("removing the job's artifact", dir.remove_all(&kept.file));
            if let Some(manifest) = &kept.manifest {
                log_err("removing the job's manifest", dir.remove_all(manifest));
            }
        }
        self.unstage(task);
    }

    /// A collection succeeded and its artifacts are kept: the rest of its
    /// output directory goes.
    pub fn remove_output(&self, task: &TaskId) {
        if let Ok(jobs) = self.area(JOBS) {
            log_err("removing the job's output", jobs.remove_all(task));
        }
    }

    /// After a crash or a kill: no job runs yet, so every job, temporary
    /// and staging directory is a leftover.
    pub fn clean_after_restart(&self) {
        for area in [JOBS, TMP, STAGING] {
            let Ok(dir) = self.area(area) else { continue };
            for (name, _) in dir.entries().unwrap_or_default() {
                let name = name.to_string_lossy().into_owned();
                tracing::info!(dir = %dir.path().join(&name).display(), "removing a leftover of an earlier run");
                log_err("removing a leftover", dir.remove_all(&name));
            }
        }
        let records = self.data_dir.join(TMP_RECORDS);
        for entry in std::fs::read_dir(&records).into_iter().flatten().flatten() {
            if let Ok(bytes) = std::fs::read(entry.path()) {
                let path = PathBuf::from(String::from_utf8_lossy(&bytes).into_owned());
                self.remove_recorded_tmp(&path);
            }
            let _ = std::fs::remove_file(entry.path());
        }
        self.index_results();
        self.apply_retention(None);
    }

    fn remove_recorded_tmp(&self, path: &Path) {
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return;
        };
        let Some(parent) = parent.to_str() else {
            return;
        };
        // Only where a tmpDir may be, and only our own names.
        let name = name.to_string_lossy();
        if !name.starts_with("autocollect-") {
            return;
        }
        if let Ok(dir) = self.open_requested(RequestedDir::Tmp, parent) {
            tracing::info!(dir = %path.display(), "removing a leftover temporary directory");
            log_err("removing a leftover", dir.remove_all(&name));
        }
    }

    /// Read what `results/` holds (at start: the index is kept from then
    /// on).
    fn index_results(&self) {
        let Ok(results) = self.area(RESULTS) else {
            return;
        };
        let mut index = BTreeMap::new();
        for (name, _) in results.entries().unwrap_or_default() {
            let name = name.to_string_lossy().into_owned();
            let Ok(dir) = results.open_dir(Path::new(&name)) else {
                // Not a directory of ours: remove it.
                log_err("removing a stray result", results.remove_all(&name));
                continue;
            };
            let bytes = dir.usage().map(|u| u.bytes).unwrap_or(0);
            let modified = std::fs::symlink_metadata(dir.path())
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            index.insert(name, (modified, bytes));
        }
        *self.results.lock().unwrap() = index;
    }

    /// Remove results beyond `keep_results`, older than
    /// `keep_results_hours`, or beyond `keep_results_mb` in all (newest
    /// kept first). `current` (the task running now) counts, but is never
    /// removed.
    pub fn apply_retention(&self, current: Option<&TaskId>) {
        let is_current = |name: &str| current.is_some_and(|c| c.as_str() == name);
        let mut found: Vec<(SystemTime, String, u64)> = self
            .results
            .lock()
            .unwrap()
            .iter()
            .map(|(name, (kept, bytes))| (*kept, name.clone(), *bytes))
            .collect();
        // Newest first; the current task first of all.
        found.sort_by_key(|f| (!is_current(&f.1), std::cmp::Reverse(f.0)));
        let s = &self.settings;
        let max_age = Duration::from_secs_f64(s.keep_results_hours * 3600.0);
        let mut total = 0u64;
        let mut doomed = Vec::new();
        for (i, (kept, name, bytes)) in found.into_iter().enumerate() {
            total += bytes;
            let age = SystemTime::now().duration_since(kept).unwrap_or_default();
            let why = if s.keep_results > 0 && i >= s.keep_results {
                format!(
                    "more than {} results (storage.keep_results)",
                    s.keep_results
                )
            } else if s.keep_results_hours > 0.0 && age > max_age {
                format!(
                    "older than {} hours (storage.keep_results_hours)",
                    s.keep_results_hours
                )
            } else if s.keep_results_mb > 0 && total > s.keep_results_mb << 20 {
                format!(
                    "results over {} MiB in all (storage.keep_results_mb)",
                    s.keep_results_mb
                )
            } else {
                continue;
            };
            if !is_current(&name) {
                doomed.push((name, why));
            }
        }
        if doomed.is_empty() {
            return;
        }
        let Ok(results) = self.area(RESULTS) else {
            return;
        };
        for (name, why) in doomed {
            tracing::info!(task = %name, "removing a kept result: {why}");
            log_err("removing a kept result", results.remove_all(&name));
            self.results.lock().unwrap().remove(&name);
        }
    }
}

/// Size of `results/TASK/NAME`, if it is there.
fn results_dir_size(root: &SafeDir, task: &TaskId, name: &str) -> Option<u64> {
    let dir = root
        .open_dir(&Path::new(RESULTS).join(task.as_str()))
        .ok()?;
    dir.regular_file(name).ok().map(|id| id.size)
}

/// Move regular file `name` from `from` to `to` (never replacing), across
/// filesystems by copying; its size. The file must be the same one after
/// the move (a file swapped for a link in between is refused).
fn move_checked(from: &SafeDir, name: &str, to: &SafeDir) -> Result<u64, String> {
    let before = from
        .regular_file(name)
        .map_err(|e| format!("artifact {name:?}: {e}"))?;
    match from.rename_to(name, to, name) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            from.copy_to(name, to, name)
                .map_err(|e| format!("could not copy {name} into {}: {e}", to.path().display()))?;
            let _ = from.remove_file(name);
            return to
                .regular_file(name)
                .map(|id| id.size)
                .map_err(|e| format!("artifact {name:?}: {e}"));
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(format!(
                "{} already has a file named {name}",
                to.path().display()
            ));
        }
        Err(e) => {
            return Err(format!(
                "could not move {name} into {}: {e}",
                to.path().display()
            ));
        }
    }
    match to.regular_file(name) {
        Ok(after) if (after.dev, after.ino) == (before.dev, before.ino) => Ok(after.size),
        _ => {
            let _ = to.remove_file(name);
            Err(format!("artifact {name:?} changed while it was being kept"))
        }
    }
}

/// SHA-256 of a kept file, read back from where it now is, out of the
/// plugin's reach (never the plugin's word); its size must be the one
/// the move saw.
fn hash_kept(dir: &SafeDir, name: &str, size: u64) -> Result<String, String> {
    let (file, _) = dir
        .open_file(name)
        .map_err(|e| format!("artifact {name:?}: cannot read it back: {e}"))?;
    let (sha256, read) = crate::manifest::sha256_of(file)
        .map_err(|e| format!("artifact {name:?}: cannot read it back: {e}"))?;
    if read != size {
        return Err(format!(
            "artifact {name:?} changed while it was being kept ({size} bytes, then {read})"
        ));
    }
    Ok(sha256)
}

/// A node name as a file-name fragment.
fn file_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn log_err(what: &str, result: io::Result<()>) {
    if let Err(e) = result {
        tracing::warn!("{what}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storage(dir: &Path, settings: StorageSettings) -> Storage {
        Storage::open(&dir.join("data"), "n1", settings).unwrap()
    }

    fn task() -> TaskId {
        TaskId::parse("0123456789abcdef0123456789abcdef").unwrap()
    }

    #[test]
    fn a_data_dir_others_could_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = Storage::open(&data, "n1", StorageSettings::default())
            .err()
            .expect("refused");
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert!(
            e.to_string()
                .ends_with("no one else may write it: it is writable by others (mode 0777)"),
            "{e}"
        );
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o750)).unwrap();
        Storage::open(&data, "n1", StorageSettings::default()).unwrap();
        crate::safe_dir::give_away(&data);
        let e = Storage::open(&data, "n1", StorageSettings::default())
            .err()
            .expect("refused");
        assert!(e.to_string().contains("it is owned by uid 65534"), "{e}");
    }

    #[test]
    fn requested_dirs_must_be_below_an_allowed_prefix() {
        let tmp = tempfile::tempdir().unwrap();
        let s = storage(
            tmp.path(),
            StorageSettings {
                allowed_log_dirs: vec!["/var/log/cb".into()],
                ..Default::default()
            },
        );
        assert!(s.allowed(RequestedDir::Log, "/var/log/cb").is_ok());
        assert!(s.allowed(RequestedDir::Log, "/var/log/cb/x/y").is_ok());
        for bad in ["/var/log/cb/../../../etc", "/var/log/cbx", "/etc", "rel"] {
            assert!(s.allowed(RequestedDir::Log, bad).is_err(), "{bad}");
        }
        let e = s.allowed(RequestedDir::Tmp, "/tmp").unwrap_err();
        assert!(e.contains("allowed_tmp_dirs"), "{e}");
    }

    #[test]
    fn an_upload_symlink_in_the_output_cannot_steer_staging() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("private"), b"do not send").unwrap();
        let s = storage(tmp.path(), StorageSettings::default());
        let dirs = s.prepare_job(&task(), None).unwrap();
        let out = dirs.output_path().to_path_buf();
        std::fs::write(out.join("a.zip"), b"zip").unwrap();
        std::os::unix::fs::symlink(&outside, out.join("upload")).unwrap();
        std::os::unix::fs::symlink(outside.join("private"), out.join("b.zip")).unwrap();
        std::fs::write(outside.join("c.zip"), b"c").unwrap();
        std::fs::hard_link(outside.join("c.zip"), out.join("c.zip")).unwrap();

        // A link, or a file linked from elsewhere, is no artifact.
        assert!(s.keep(&task(), &dirs, &["b.zip".into()], None).is_err());
        assert!(s.keep(&task(), &dirs, &["c.zip".into()], None).is_err());
        assert!(s.keep(&task(), &dirs, &["../x".into()], None).is_err());
        let kept = s.keep(&task(), &dirs, &["a.zip".into()], None).unwrap();
        assert_eq!(kept.size, 3);
        assert!(kept.path.starts_with(tmp.path().join("data/results")));
        let staged = s.stage(&task(), &kept).unwrap();
        let seen: Vec<_> = std::fs::read_dir(staged.parent().unwrap())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(seen, ["a.zip"]);
        assert_eq!(
            std::fs::read_dir(&outside).unwrap().count(),
            2,
            "nothing written outside"
        );
        s.unstage(&task());
        s.discard(&task(), Some(&kept));
        assert!(!kept.path.exists());
        assert!(outside.join("private").exists());
    }
}
