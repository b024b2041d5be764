//! The host's manifest of a node's artifact: written by the host (never
//! the plugin) beside the kept artifact, uploaded after it as
//! `<zip name>.manifest.json`, and checked by `autocollect verify`.
//!
//! It says what the artifact is (name, size, SHA-256 the host computed
//! from the kept file), what made it (the plugin's source, its
//! component's SHA-256, the WIT version it was built against, its
//! options), with which start parameters (secrets masked: the salt and
//! the encryption password are never written, nor any option whose name
//! looks secret, nor any program argument holding one of them), the
//! programs it ran through `exec` (arguments, exit status, duration), the
//! run's wall time, peak linear memory and bytes kept, and the redaction
//! level with Couchbase's `HashOfSalt` when partial.
//!
//! Optional fields: `grants` (the input grants, and what the host's
//! archive writer read from each; what the plugin read itself through
//! WASI is not counted), `partial` (why the collection stopped early) and
//! `leftOut` (what the plugin says it did not collect, WIT 0.1.5
//! `budget.left-out`).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::hex;
use crate::plugin::exec::Exit;
use crate::protocol::CollectParameters;
pub use crate::redact::hash_of_salt;

/// The manifest's format; bumped when a field changes meaning.
pub const FORMAT_VERSION: u32 = 1;
/// What a masked value reads as.
pub use crate::protocol::MASK;
/// The manifest's name beside the artifact in `results/TASK/`.
pub const RESULTS_NAME: &str = "manifest.json";
/// The manifest's name in a shared `logDir`, and when uploaded.
pub fn name_for(artifact: &str) -> String {
    format!("{artifact}.manifest.json")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub format_version: u32,
    pub task_id: String,
    pub node: String,
    /// When the host wrote it, RFC 3339 UTC.
    pub created: String,
    pub artifact: ArtifactInfo,
    pub plugin: PluginInfo,
    /// The start parameters this node's collection got, secrets masked.
    pub parameters: BTreeMap<String, String>,
    pub redaction: Redaction,
    /// The read-only input grants the plugin was given
    /// (`[[collector.inputs]]`); absent when none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grants: Vec<GrantRecord>,
    /// Every program the plugin started through `exec`, in order.
    pub exec: Vec<ExecRecord>,
    pub run: RunInfo,
    /// Present when the collection stopped early and kept what it had
    /// (the plugin wrapped up near a limit): why, in its words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial: Option<PartialRecord>,
    /// What the plugin said it did not collect (`budget.left-out`): when
    /// it wrapped up early, and anything it skipped; absent when none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub left_out: Option<LeftOutRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartialRecord {
    pub reason: String,
}

/// Items left out, in the plugin's words (secrets masked).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeftOutRecord {
    /// How many items, all told.
    pub count: u64,
    /// Their bytes, as the plugin gave them.
    pub bytes: u64,
    /// The first 10,000 of them.
    pub items: Vec<LeftOutItem>,
    /// `count` minus the items listed.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub not_listed: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeftOutItem {
    pub item: String,
    pub bytes: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One input grant, as the operator configured it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GrantRecord {
    pub name: String,
    /// The host directory.
    pub host: String,
    /// Where the plugin saw it.
    pub guest: String,
    /// Files the host added from it to the plugin's archives (`archive.add-file`),
    /// and their bytes as read; absent when none (what the plugin read
    /// itself through WASI is not counted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_added: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_added: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ArtifactInfo {
    pub name: String,
    pub size: u64,
    /// Lowercase hex, computed by the host from the kept file.
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginInfo {
    /// `builtin:NAME` or the component's path.
    pub source: String,
    /// SHA-256 of the component's bytes, lowercase hex.
    pub sha256: String,
    /// The `autocollect:plugin` version the component was built against,
    /// from its import and export names (absent if it names none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wit_version: Option<String>,
    /// The version this host speaks.
    pub host_wit_version: String,
    /// As configured (`[collector] options`), secret-looking names masked.
    pub options: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Redaction {
    /// `none` or `partial`.
    pub level: String,
    /// Couchbase's `HashOfSalt`: hex SHA-1 of the salt twice; with
    /// `partial` only.
    #[serde(
        rename = "HashOfSalt",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub hash_of_salt: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecRecord {
    pub program: String,
    /// Any argument holding the salt or the password is masked.
    pub args: Vec<String>,
    /// `{"code": N}` or `{"signal": N}`; absent if the plugin never waited
    /// for the program (it was stopped when the run ended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<ExitRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ExitRecord {
    Code(i32),
    Signal(i32),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunInfo {
    /// From the collector's start to its end, in ms.
    pub wall_time_ms: u64,
    /// The largest linear memory the plugin grew to, in bytes.
    pub peak_memory_bytes: u64,
    /// The bytes of every artifact the run left and the host kept
    /// (temporary files and the rest of the output directory not counted).
    pub bytes_written: u64,
}

/// What the host knows of a finished, kept collection.
pub struct Inputs<'a> {
    pub task_id: &'a str,
    pub node: &'a str,
    pub artifact: ArtifactInfo,
    pub plugin_source: String,
    pub plugin: &'a crate::plugin::PluginIdentity,
    pub options: &'a [(String, String)],
    pub parameters: &'a CollectParameters,
    pub grants: &'a [crate::config::InputGrant],
    /// What the run recorded: what it read from each grant, the programs
    /// it started, its peak memory, and (secrets already masked by the
    /// collector's host) why it is partial and what it left out.
    pub collected: &'a crate::plugin::collector::Collected,
    pub wall_time: Duration,
    pub bytes_written: u64,
}

impl Manifest {
    pub fn new(i: Inputs<'_>) -> Manifest {
        let secrets = secrets_of(i.parameters);
        let run = i.collected;
        let partial = i.parameters.log_redaction_level.as_deref() == Some("partial");
        Manifest {
            format_version: FORMAT_VERSION,
            task_id: i.task_id.to_string(),
            node: i.node.to_string(),
            created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            artifact: i.artifact,
            plugin: PluginInfo {
                source: i.plugin_source,
                sha256: i.plugin.sha256.clone(),
                wit_version: i.plugin.wit_version.clone(),
                host_wit_version: crate::plugin::WIT_VERSION.to_string(),
                options: mask_options(i.options),
            },
            parameters: mask_parameters(i.parameters),
            redaction: Redaction {
                level: if partial { "partial" } else { "none" }.into(),
                hash_of_salt: i
                    .parameters
                    .log_redaction_salt
                    .as_deref()
                    .filter(|_| partial)
                    .map(hash_of_salt),
            },
            grants: i
                .grants
                .iter()
                .map(|g| {
                    let used = run.grants_used.get(&g.name);
                    GrantRecord {
                        name: g.name.clone(),
                        host: g.host.display().to_string(),
                        guest: g.guest.clone(),
                        files_added: used.map(|u| u.files),
                        bytes_added: used.map(|u| u.bytes),
                    }
                })
                .collect(),
            exec: run
                .exec_runs
                .iter()
                .map(|run| ExecRecord {
                    program: run.program.clone(),
                    args: mask_args(&run.args, &secrets),
                    exit: run.exit.map(|e| match e {
                        Exit::Code(c) => ExitRecord::Code(c),
                        Exit::Signal(s) => ExitRecord::Signal(s),
                    }),
                    duration_ms: run.duration.map(|d| d.as_millis() as u64),
                })
                .collect(),
            // Masked already by the collector's host, for status too.
            partial: run.partial.as_ref().map(|reason| PartialRecord {
                reason: reason.clone(),
            }),
            left_out: (run.left_out.count > 0).then(|| LeftOutRecord {
                count: run.left_out.count,
                bytes: run.left_out.bytes,
                items: run
                    .left_out
                    .items
                    .iter()
                    .map(|(item, bytes)| LeftOutItem {
                        item: item.clone(),
                        bytes: *bytes,
                    })
                    .collect(),
                not_listed: run.left_out.count - run.left_out.items.len() as u64,
            }),
            run: RunInfo {
                wall_time_ms: i.wall_time.as_millis() as u64,
                peak_memory_bytes: run.memory_peak,
                bytes_written: i.bytes_written,
            },
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("a manifest serializes");
        bytes.push(b'\n');
        bytes
    }
}

/// The secret values of the start parameters (non-empty ones).
fn secrets_of(p: &CollectParameters) -> Vec<String> {
    [
        p.log_redaction_salt.clone(),
        p.encryption_password
            .as_ref()
            .map(|s| s.expose().to_string()),
    ]
    .into_iter()
    .flatten()
    .filter(|s| !s.is_empty())
    .collect()
}

/// The start parameters, the salt and the password as [`MASK`] (their
/// presence only).
pub fn mask_parameters(p: &CollectParameters) -> BTreeMap<String, String> {
    let masked = |v: &Option<String>| v.as_ref().map(|_| MASK.to_string());
    [
        ("logRedactionLevel", p.log_redaction_level.clone()),
        ("logRedactionSalt", masked(&p.log_redaction_salt)),
        ("tmpDir", p.tmp_dir.clone()),
        ("logDir", p.log_dir.clone()),
        ("taskRegexp", p.task_regexp.clone()),
        (
            "encryptionPassword",
            p.encryption_password.as_ref().map(|_| MASK.to_string()),
        ),
        ("since", p.since.clone()),
        ("until", p.until.clone()),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.map(|v| (k.to_string(), v)))
    .collect()
}

/// Options as configured; a secret-looking name's value masked.
pub fn mask_options(options: &[(String, String)]) -> BTreeMap<String, String> {
    options
        .iter()
        .map(|(k, v)| {
            let secret = crate::protocol::is_secret_name(k);
            (k.clone(), if secret { MASK.into() } else { v.clone() })
        })
        .collect()
}

/// Program arguments with any that holds a secret masked: `--name=*****`
/// when the secret is after the first `=`, else the whole argument.
pub fn mask_args(args: &[String], secrets: &[String]) -> Vec<String> {
    args.iter()
        .map(|arg| {
            if !secrets.iter().any(|s| arg.contains(s.as_str())) {
                return arg.clone();
            }
            match arg.split_once('=') {
                Some((name, _)) if !secrets.iter().any(|s| name.contains(s.as_str())) => {
                    format!("{name}={MASK}")
                }
                _ => MASK.to_string(),
            }
        })
        .collect()
}

/// SHA-256 (lowercase hex) and size of everything `reader` yields.
pub fn sha256_of(mut reader: impl Read) -> std::io::Result<(String, u64)> {
    // Reads of 256 KiB, straight into the buffer's spare capacity
    // (`io::copy` into a `BufWriter`): never cleared first, and only the
    // pages a small file fills are touched.
    let mut hasher = std::io::BufWriter::with_capacity(256 * 1024, Sha256::new());
    let size = std::io::copy(&mut reader, &mut hasher)?;
    let hasher = hasher.into_inner().map_err(|e| e.into_error())?;
    Ok((hex(&hasher.finalize()), size))
}

/// What `verify` needs of a manifest (other fields are not checked).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestHead {
    format_version: u32,
    artifact: ArtifactInfo,
}

/// The outcome of checking a bundle: each line says what matched or
/// what differs.
#[derive(Debug, Default)]
pub struct Report {
    pub manifest: PathBuf,
    pub matches: Vec<String>,
    pub differs: Vec<String>,
    /// Entries that are encrypted (not checked without the password).
    pub notes: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.differs.is_empty()
    }
}

/// The manifest of `zip`: `ZIP.manifest.json`, else `manifest.json`
/// beside it.
pub fn default_manifest(zip: &Path) -> Result<PathBuf, String> {
    let name = zip
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| format!("{} is not a file name", zip.display()))?;
    let beside = zip.with_file_name(name_for(name));
    if beside.exists() {
        return Ok(beside);
    }
    let results = zip.with_file_name(RESULTS_NAME);
    if results.exists() {
        return Ok(results);
    }
    Err(format!(
        "no manifest for {}: neither {} nor {} exists (give its path as the second argument)",
        zip.display(),
        beside.display(),
        results.display()
    ))
}

/// Check `zip` against its manifest: name, size, SHA-256, and that the
/// zip opens and each entry reads back with its CRC. `Err` only when there
/// is nothing to check against (a missing or unreadable manifest, a
/// missing zip).
pub fn verify(zip: &Path, manifest: Option<&Path>) -> Result<Report, String> {
    let manifest_path = match manifest {
        Some(p) => p.to_path_buf(),
        None => default_manifest(zip)?,
    };
    let text = std::fs::read(&manifest_path)
        .map_err(|e| format!("cannot read manifest {}: {e}", manifest_path.display()))?;
    let head: ManifestHead = serde_json::from_slice(&text).map_err(|e| {
        format!(
            "{} is not an autocollect manifest: {e}",
            manifest_path.display()
        )
    })?;
    let mut report = Report {
        manifest: manifest_path.clone(),
        ..Default::default()
    };
    if head.format_version != FORMAT_VERSION {
        report.notes.push(format!(
            "manifest format version {} (this autocollect writes {FORMAT_VERSION})",
            head.format_version
        ));
    }
    let expected = head.artifact;
    let file =
        std::fs::File::open(zip).map_err(|e| format!("cannot open {}: {e}", zip.display()))?;

    let name = zip.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    if name == expected.name {
        report.matches.push(format!("name {name}"));
    } else {
        report.differs.push(format!(
            "name: the manifest says {:?}, the file is {name:?}",
            expected.name
        ));
    }
    let (sha256, size) =
        sha256_of(&file).map_err(|e| format!("cannot read {}: {e}", zip.display()))?;
    if size == expected.size {
        report.matches.push(format!("size {size} bytes"));
    } else {
        report.differs.push(format!(
            "size: the manifest says {} bytes, the file has {size}",
            expected.size
        ));
    }
    if sha256 == expected.sha256.to_ascii_lowercase() {
        report.matches.push(format!("sha256 {sha256}"));
    } else {
        report.differs.push(format!(
            "sha256: the manifest says {}, the file's is {sha256}",
            expected.sha256
        ));
    }
    check_entries(file, &mut report);
    Ok(report)
}

/// Open the zip and read every entry (the reader checks each CRC at its
/// end). Encrypted entries cannot be read without the password: noted,
/// not counted as damage.
fn check_entries(file: std::fs::File, report: &mut Report) {
    let mut archive = match zip::ZipArchive::new(std::io::BufReader::new(file)) {
        Ok(a) => a,
        Err(e) => {
            report.differs.push(format!("the zip does not open: {e}"));
            return;
        }
    };
    let (mut read, mut encrypted) = (0usize, Vec::new());
    for i in 0..archive.len() {
        let (name, is_encrypted) = match archive.by_index_raw(i) {
            Ok(entry) => (entry.name().to_string(), entry.encrypted()),
            Err(e) => {
                report.differs.push(format!("entry #{i}: {e}"));
                continue;
            }
        };
        if is_encrypted {
            encrypted.push(name);
            continue;
        }
        let result = archive
            .by_index(i)
            .map_err(|e| e.to_string())
            .and_then(|mut entry| {
                std::io::copy(&mut entry, &mut std::io::sink()).map_err(|e| e.to_string())
            });
        match result {
            Ok(_) => read += 1,
            Err(e) => report
                .differs
                .push(format!("entry {name:?} does not read back: {e}")),
        }
    }
    if read > 0 || encrypted.is_empty() {
        report.matches.push(format!(
            "{read} of {} entries read back with their CRC",
            archive.len()
        ));
    }
    if !encrypted.is_empty() {
        report.notes.push(format!(
            "{} encrypted entries not checked (they need the password): {}",
            encrypted.len(),
            encrypted.join(", ")
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::exec::ExecRun;

    fn secret_parameters() -> CollectParameters {
        CollectParameters {
            tmp_dir: Some("/tmp/x".into()),
            ..crate::protocol::tests::secret_parameters()
        }
    }

    #[test]
    fn hash_of_salt_is_sha1_of_the_salt_twice() {
        // printf 'abcabc' | sha1sum
        assert_eq!(
            hash_of_salt("abc"),
            "f8c1d87006fbf7e5cc4b026c3138bc046883dc71"
        );
        assert_eq!(hash_of_salt(""), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
    }

    #[test]
    fn parameters_keep_only_the_presence_of_secrets() {
        let m = mask_parameters(&secret_parameters());
        assert_eq!(m["logRedactionSalt"], MASK);
        assert_eq!(m["encryptionPassword"], MASK);
        assert_eq!(m["logRedactionLevel"], "partial");
        assert_eq!(m["tmpDir"], "/tmp/x");
        assert!(!m.contains_key("logDir"));
        let text = format!("{m:?}");
        assert!(!text.contains("pepper-salt") && !text.contains("hunter2-zip"));
    }

    #[test]
    fn arguments_holding_a_secret_are_masked() {
        let secrets = secrets_of(&secret_parameters());
        let args: Vec<String> = [
            "--watch-stdin",
            "--log-redaction-salt=pepper-salt",
            "pepper-salt",
            "--x=a-hunter2-zip-b",
            "--pepper-salt=1",
            "out.zip",
        ]
        .map(String::from)
        .into();
        assert_eq!(
            mask_args(&args, &secrets),
            [
                "--watch-stdin",
                "--log-redaction-salt=*****",
                "*****",
                "--x=*****",
                "*****",
                "out.zip"
            ]
        );
        assert_eq!(mask_args(&args, &[]), args, "no secrets: unchanged");
    }

    #[test]
    fn secret_looking_options_are_masked() {
        let options = vec![
            ("program".to_string(), "/opt/cb".to_string()),
            ("env.API_TOKEN".to_string(), "t0k".to_string()),
        ];
        let m = mask_options(&options);
        assert_eq!(m["program"], "/opt/cb");
        assert_eq!(m["env.API_TOKEN"], MASK);
    }

    #[test]
    fn the_manifest_never_holds_a_secret_and_has_hash_of_salt() {
        let parameters = secret_parameters();
        let identity = crate::plugin::PluginIdentity {
            sha256: "ab".repeat(32),
            wit_version: Some("0.1.2".into()),
        };
        let runs = vec![ExecRun {
            program: "/bin/cb".into(),
            args: vec!["--log-redaction-salt=pepper-salt".into()],
            exit: Some(Exit::Code(0)),
            duration: Some(Duration::from_millis(12)),
        }];
        let m = Manifest::new(Inputs {
            task_id: "t",
            node: "n1",
            artifact: ArtifactInfo {
                name: "a.zip".into(),
                size: 3,
                sha256: "cd".repeat(32),
            },
            plugin_source: "builtin:cbcollect".into(),
            plugin: &identity,
            options: &[],
            parameters: &parameters,
            grants: &[crate::config::InputGrant {
                name: "logs".into(),
                host: "/var/log/app".into(),
                guest: "/inputs/logs".into(),
            }],
            collected: &crate::plugin::collector::Collected {
                artifacts: Vec::new(),
                summary: String::new(),
                exec_runs: runs,
                memory_peak: 1 << 20,
                partial: None,
                left_out: crate::plugin::sandbox::LeftOut {
                    items: vec![("logs/old.log".into(), 10)],
                    count: 3,
                    bytes: 30,
                },
                ignored: Vec::new(),
                grants_used: BTreeMap::new(),
            },
            wall_time: Duration::from_millis(50),
            bytes_written: 3,
        });
        let json = String::from_utf8(m.to_json()).unwrap();
        assert!(
            !json.contains("pepper-salt") && !json.contains("hunter2-zip"),
            "{json}"
        );
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["redaction"]["HashOfSalt"], hash_of_salt("pepper-salt"));
        assert_eq!(
            v["grants"],
            serde_json::json!([{"name": "logs", "host": "/var/log/app", "guest": "/inputs/logs"}])
        );
        assert_eq!(v["exec"][0]["exit"]["code"], 0);
        assert_eq!(
            v["leftOut"],
            serde_json::json!({"count": 3, "bytes": 30, "notListed": 2,
                "items": [{"item": "logs/old.log", "bytes": 10}]})
        );
        assert_eq!(v["exec"][0]["durationMs"], 12);
        assert_eq!(v["exec"][0]["args"][0], "--log-redaction-salt=*****");
        let back: Manifest = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
    }
}
