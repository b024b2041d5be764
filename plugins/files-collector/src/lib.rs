//! The built-in `files` collector (`builtin:files`): the operator's
//! granted directories (`[[collector.inputs]]`), filtered by glob and by
//! the request's time window, zipped by the host's `archive` writer.
//! Pure WASI: it runs no program.
//!
//! Options (all optional):
//!
//! | key | meaning | default |
//! | --- | --- | --- |
//! | `include` | globs (comma- or space-separated) of the files to take, on `GRANT/relative/path` | `**` (every file of every grant) |
//! | `exclude` | globs of the files to leave out, same form | none |
//! | `max_file_bytes` | keep only the last this many bytes of a larger file (its tail, where logs are newest) | whole files |
//! | `compression` | `stored` or `deflate:1`..`deflate:9` | `deflate:6` |
//!
//! Globs: `*` is any run of characters within one path component, `?`
//! one character, `**` (a whole component) any number of components,
//! zero included. So `logs/*.log` takes the `.log` files at the top of
//! grant `logs`, `logs/**/*.log` those at any depth, `**/*.gz` every
//! gzip of every grant.
//!
//! It walks each grant in name order without following symlinks (they
//! are skipped and counted), keeps the regular files that match, and
//! with `since`/`until` in the start request (RFC 3339 UTC) only those
//! modified in that window (it honours both). It adds each file as
//! `GRANT/relative/path` with `add-file`; under partial redaction it
//! asks the host to redact every file and names the zip
//! `collectinfo-<UTC>-<node>-redacted.zip`, like `cbcollect_info`.
//! Progress is reported in bytes, with the file count in the message.
//! Before each file it asks `budget.wrap-up`: when the job nears a limit
//! it finishes the zip with what it has and marks the collection
//! partial, naming how many files it left out; it names each file it
//! left out (or that vanished) with `budget.left-out`, for the host's
//! manifest. The zip's last entry,
//! `files-collector.txt`, lists every file selected and what became of
//! it (added, truncated, left out, vanished).

mod glob;

use autocollect_sdk::archive::{Archive, ArchiveError, ArchiveOptions, Compression};
use autocollect_sdk::inputs::grants;
use autocollect_sdk::task::{Parameters, TimeWindow};
use autocollect_sdk::{CollectOutcome, CollectRequest, Collector, Context, Error, Options};
use autocollect_sdk::{budget, progress};
use std::time::{SystemTime, UNIX_EPOCH};

struct FilesCollector;

const KNOWN: &[&str] = &["include", "exclude", "max_file_bytes", "compression"];

/// Parsed, validated options.
struct Settings {
    include: Vec<glob::Pattern>,
    exclude: Vec<glob::Pattern>,
    max_file_bytes: Option<u64>,
    compression: Compression,
}

fn patterns(key: &str, value: &str) -> Result<Vec<glob::Pattern>, Error> {
    value
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|p| !p.is_empty())
        .map(|p| {
            glob::Pattern::new(p).map_err(|e| Error::invalid_option(key, format!("{p:?}: {e}")))
        })
        .collect()
}

impl Settings {
    fn from_options(options: &Options) -> Result<Self, Error> {
        options.check_known(KNOWN)?;
        let include = match options.get("include") {
            Some(value) => patterns("include", value)?,
            None => vec![glob::Pattern::new("**").expect("a valid glob")],
        };
        if include.is_empty() {
            return Err(Error::invalid_option(
                "include",
                "no glob given (leave it out for every file)",
            ));
        }
        Ok(Settings {
            include,
            exclude: match options.get("exclude") {
                Some(value) => patterns("exclude", value)?,
                None => Vec::new(),
            },
            max_file_bytes: options.map(
                "max_file_bytes",
                |v| v.parse::<u64>().ok().filter(|n| *n > 0),
                || "must be a positive number of bytes".to_string(),
            )?,
            compression: options
                .compression("compression")?
                .unwrap_or(Compression::Deflate(6)),
        })
    }

    fn selects(&self, entry: &str) -> bool {
        self.include.iter().any(|p| p.matches(entry))
            && !self.exclude.iter().any(|p| p.matches(entry))
    }
}

/// A file the walk selected.
struct Selected {
    grant: String,
    /// Relative to the grant, `/`-separated.
    path: String,
    size: u64,
}

impl Selected {
    fn entry(&self) -> String {
        format!("{}/{}", self.grant, self.path)
    }
}

/// What the walk found besides the selected files.
#[derive(Default)]
struct Walk {
    files: Vec<Selected>,
    symlinks: u64,
    outside_window: u64,
    unreadable: Vec<String>,
}

fn mtime_secs(meta: &std::fs::Metadata) -> i64 {
    match meta.modified() {
        Ok(t) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_secs() as i64,
            Err(e) => -(e.duration().as_secs() as i64),
        },
        Err(_) => 0,
    }
}

/// Walk `dir` (guest path) of grant `grant`, `rel` below its root, in name
/// order, never following a symlink.
fn walk(
    settings: &Settings,
    window: &TimeWindow,
    grant: &str,
    dir: &str,
    rel: &str,
    found: &mut Walk,
) {
    let shown = if rel.is_empty() {
        grant.to_string()
    } else {
        format!("{grant}/{rel}")
    };
    let mut entries: Vec<(String, std::fs::Metadata)> = match std::fs::read_dir(dir) {
        Ok(list) => list
            .filter_map(|e| {
                let e = e.ok()?;
                let name = e.file_name().into_string().ok()?;
                let meta = std::fs::symlink_metadata(format!("{dir}/{name}")).ok()?;
                Some((name, meta))
            })
            .collect(),
        Err(e) => {
            autocollect_sdk::warn!("cannot list {shown}: {e}");
            found.unreadable.push(shown);
            return;
        }
    };
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, meta) in entries {
        let path = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        let kind = meta.file_type();
        if kind.is_symlink() {
            found.symlinks += 1;
        } else if kind.is_dir() {
            walk(
                settings,
                window,
                grant,
                &format!("{dir}/{name}"),
                &path,
                found,
            );
        } else if kind.is_file() && settings.selects(&format!("{grant}/{path}")) {
            if window.contains(mtime_secs(&meta)) {
                found.files.push(Selected {
                    grant: grant.to_string(),
                    path,
                    size: meta.len(),
                });
            } else {
                found.outside_window += 1;
            }
        }
    }
}

/// The host appends queued entries to the zip in the background, up to
/// [`IN_FLIGHT`] at a time: by the time `budget.wrap-up` answers, those
/// may still take the job past its disk budget. So before each file, also
/// estimate what the zip will hold once everything queued and that file
/// are in: its size now, plus the entries possibly still in flight and
/// the next file, at the compression ratio seen so far (1 until it is
/// known), and wrap up past [`GUARD_SHARE`] of the budget.
struct DiskGuard {
    max_bytes: u64,
    /// Bytes (as read, after `max_file_bytes`) of every queued entry.
    queued: Vec<u64>,
}

/// Entries the host may hold in flight (twice its 8 compression threads).
const IN_FLIGHT: usize = 16;
const GUARD_SHARE: f64 = 0.85;

impl DiskGuard {
    fn new(max_bytes: u64) -> Self {
        DiskGuard {
            max_bytes,
            queued: Vec::new(),
        }
    }

    fn queued(&mut self, bytes: u64) {
        self.queued.push(bytes);
    }

    fn wrap_up(&self, zip_path: &str, next: u64) -> Option<String> {
        let zip = std::fs::metadata(zip_path).map_or(0, |m| m.len());
        let split = self.queued.len().saturating_sub(IN_FLIGHT);
        let settled: u64 = self.queued[..split].iter().sum();
        let in_flight: u64 = self.queued[split..].iter().sum();
        let ratio = if settled > 0 {
            (zip as f64 / settled as f64).min(1.0)
        } else {
            1.0
        };
        let estimate = zip as f64 + ratio * (in_flight + next) as f64;
        (estimate > GUARD_SHARE * self.max_bytes as f64).then(|| {
            format!(
                "the zip would near the job's disk budget: about {} of {} with the next file",
                mib(estimate as u64),
                mib(self.max_bytes)
            )
        })
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

impl Collector for FilesCollector {
    fn validate_options(options: &Options) -> Result<(), Error> {
        Settings::from_options(options).map(|_| ())
    }

    fn collect(request: CollectRequest) -> Result<CollectOutcome, Error> {
        let settings = Settings::from_options(&request.options())?;
        let params = Parameters::get();
        let window = params.time_window()?;
        let redact = params.redact();
        // `encryptionPassword`: the host encrypts every entry (WinZip
        // AES-256). A secret: it goes to the host's archive and nowhere else.
        let password = params.encryption_password();

        let mut found = Walk::default();
        for grant in grants() {
            walk(
                &settings,
                &window,
                &grant.name,
                grant.guest_path.trim_end_matches('/'),
                "",
                &mut found,
            );
        }
        let max = settings.max_file_bytes;
        let total_files = found.files.len();
        let total_bytes: u64 = found
            .files
            .iter()
            .map(|f| max.map_or(f.size, |m| f.size.min(m)))
            .sum();
        autocollect_sdk::info!(
            "files: {total_files} files selected ({}), {} symlinks skipped, {} outside the time window",
            mib(total_bytes),
            found.symlinks,
            found.outside_window
        );

        let name = collectinfo_name::zip_name(&request.context.node, SystemTime::now());
        let name = if redact {
            format!("{}-redacted.zip", name.trim_end_matches(".zip"))
        } else {
            name
        };
        let archive = Archive::create(
            &name,
            &ArchiveOptions::new(settings.compression)
                .password(password)
                .max_entry_bytes(max),
        )
        .with_context(|| format!("create {name}"))?;

        let mut listing = Vec::with_capacity(total_files + 1);
        let mut added = 0u64;
        let mut added_bytes = 0u64;
        let mut truncated: Vec<String> = Vec::new();
        let mut vanished: Vec<String> = Vec::new();
        let mut wrapped_up = None;
        progress(0, total_bytes, &format!("0 of {total_files} files"));
        let zip_path = request.output_path(&name);
        let mut guard = DiskGuard::new(budget::limits().max_bytes);
        for (i, file) in found.files.iter().enumerate() {
            let next = max.map_or(file.size, |m| file.size.min(m));
            let why = budget::wrap_up().or_else(|| guard.wrap_up(&zip_path, next));
            if let Some(why) = why {
                wrapped_up = Some((why, i));
                break;
            }
            let entry = file.entry();
            match archive.add_file(&file.grant, &file.path, &entry, redact) {
                Ok(info) => {
                    added += 1;
                    let kept = max.map_or(info.size, |m| info.size.min(m));
                    guard.queued(kept);
                    added_bytes += kept;
                    if info.truncated {
                        truncated.push(entry.clone());
                        listing.push(format!(
                            "truncated {entry} ({} of {} bytes, its tail)",
                            kept, info.size
                        ));
                    } else {
                        listing.push(format!("added {entry} ({} bytes)", info.size));
                    }
                }
                // The file changed since the walk (removed, replaced by a
                // symlink): leave it out; anything else breaks the zip.
                Err(ArchiveError::Denied(why)) => {
                    budget::left_out(&entry, file.size);
                    vanished.push(entry.clone());
                    listing.push(format!("skipped {entry}: {why}"));
                }
                Err(ArchiveError::Failed(why)) if why.starts_with(&format!("{entry}:")) => {
                    budget::left_out(&entry, file.size);
                    vanished.push(entry.clone());
                    listing.push(format!("skipped {entry}: {why}"));
                }
                Err(e) => return Err(e).context(format!("adding {entry}")),
            }
            progress(
                added_bytes.min(total_bytes),
                total_bytes,
                &format!("{} of {total_files} files", i + 1),
            );
        }

        let mut partial = None;
        if let Some((why, next)) = &wrapped_up {
            let left = &found.files[*next..];
            for f in left {
                let entry = f.entry();
                budget::left_out(&entry, f.size);
                listing.push(format!("left out {entry} ({} bytes)", f.size));
            }
            let reason = format!(
                "{why}; left out {} of {total_files} files (first: {})",
                left.len(),
                left.first().map(Selected::entry).unwrap_or_default()
            );
            autocollect_sdk::log::warn(&reason);
            partial = Some(reason);
        }
        if !found.unreadable.is_empty() {
            listing.push(format!(
                "unreadable directories: {}",
                found.unreadable.join(", ")
            ));
        }
        listing.push(format!(
            "{} symlinks skipped (never followed); {} files outside the time window",
            found.symlinks, found.outside_window
        ));
        let text = listing.join("\n") + "\n";
        archive
            .add_bytes("files-collector.txt", text.as_bytes(), None)
            .context("files-collector.txt")?;
        let artifact = archive.finish().with_context(|| format!("finish {name}"))?;
        progress(
            total_bytes,
            total_bytes,
            &format!("{added} of {total_files} files"),
        );

        let mut summary = format!(
            "added {added} files, {} ({} truncated, {} symlinks skipped)",
            mib(added_bytes),
            truncated.len(),
            found.symlinks
        );
        if !truncated.is_empty() {
            let first: Vec<&str> = truncated.iter().take(5).map(String::as_str).collect();
            summary.push_str(&format!(
                "; truncated to their last {} bytes: {}{}",
                max.unwrap_or_default(),
                first.join(", "),
                if truncated.len() > 5 { ", ..." } else { "" }
            ));
        }
        if !vanished.is_empty() {
            summary.push_str(&format!(
                "; {} changed during the walk and were skipped",
                vanished.len()
            ));
        }
        if found.outside_window > 0 {
            summary.push_str(&format!(
                "; {} outside the time window",
                found.outside_window
            ));
        }
        if let Some(reason) = partial {
            budget::partial(&reason);
            summary.push_str(&format!("; partial: {reason}"));
        }
        Ok(CollectOutcome {
            artifacts: vec![artifact],
            summary,
        })
    }
}

autocollect_sdk::export_collector!(FilesCollector);
