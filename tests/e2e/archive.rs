//! The host's archive writer (WIT `archive`, 0.1.4): a collector adds
//! entries from bytes or by path from an input grant; the host reads,
//! redacts on request (with the task's salt), keeps the tail past the
//! entry limit, compresses in parallel and writes the zip; it never reads
//! through a symlink or out of a grant.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use autocollect::config::{Config, InputGrant};
use autocollect::coordinator::task::{NodeState, TaskStatus};
use autocollect::redact::redact;
use serde_json::json;

use crate::support::*;

const OUTSIDE_TEXT: &str = "SECRET-OUTSIDE-THE-GRANT";
const SALT: &str = "pepper-for-the-archive";
/// 2020-09-13 12:26:40 UTC.
const MTIME: u64 = 1_600_000_000;

fn grant(host: &Path) -> InputGrant {
    InputGrant {
        name: "logs".into(),
        host: host.to_path_buf(),
        guest: "/inputs/logs".into(),
    }
}

fn set_mtime(path: &Path, secs: u64) {
    let file = std::fs::File::options().write(true).open(path).unwrap();
    file.set_modified(UNIX_EPOCH + Duration::from_secs(secs))
        .unwrap();
}

/// Run mode `archive` with `options`; the cluster (keep it: it holds the
/// files), the task and the zip's path.
async fn run(
    logs: &Path,
    options: &[(&str, &str)],
    params: serde_json::Value,
) -> (TestCluster, TaskStatus, PathBuf) {
    let c = cluster(&["n1"], |config: &mut Config| {
        config.collector.plugin = misbehave_plugin();
        set_option(config, "mode", "archive");
        for (k, v) in options {
            set_option(config, k, *v);
        }
        config.collector.inputs = vec![grant(logs)];
    })
    .await;
    let admin = c.admin("n1");
    let task = collect_json(&admin, params).await;
    let node = &task.per_node["n1"];
    assert_eq!(node.status, NodeState::Collected, "{node:?}");
    let path = PathBuf::from(node.path.as_deref().expect("the zip's path"));
    (c, task, path)
}

struct Zip(zip::ZipArchive<std::fs::File>);

impl Zip {
    fn open(path: &Path) -> Zip {
        Zip(zip::ZipArchive::new(std::fs::File::open(path).unwrap()).expect("a valid zip"))
    }

    fn bytes(&mut self, name: &str) -> Vec<u8> {
        let mut entry = self
            .0
            .by_name(name)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut v = Vec::new();
        entry.read_to_end(&mut v).unwrap();
        v
    }

    fn names(&self) -> Vec<String> {
        self.0.file_names().map(String::from).collect()
    }

    /// The entry's DOS time as seconds since the epoch (UTC).
    fn mtime(&mut self, name: &str) -> u64 {
        let t = self.0.by_name(name).unwrap().last_modified().unwrap();
        let date =
            chrono::NaiveDate::from_ymd_opt(t.year().into(), t.month().into(), t.day().into())
                .unwrap()
                .and_hms_opt(t.hour().into(), t.minute().into(), t.second().into())
                .unwrap();
        date.and_utc().timestamp() as u64
    }
}

#[tokio::test]
async fn granted_files_are_archived_by_the_host_redacted_and_cut_to_their_tail() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(logs.join("sub")).unwrap();
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("secret.txt"), OUTSIDE_TEXT).unwrap();
    let a_log: Vec<u8> = (0..2000)
        .flat_map(|i| format!("{i} login by <ud>user-{i}</ud> ok\n").into_bytes())
        .collect();
    let c_log = b"a small one\n".repeat(10);
    let big: Vec<u8> = (0..40_000u32)
        .flat_map(|i| format!("big line {i:08}\n").into_bytes())
        .collect();
    std::fs::write(logs.join("a.log"), &a_log).unwrap();
    std::fs::write(logs.join("sub/c.log"), &c_log).unwrap();
    std::fs::write(logs.join("big.log"), &big).unwrap();
    set_mtime(&logs.join("a.log"), MTIME);
    set_mtime(&logs.join("big.log"), MTIME + 1001);
    std::os::unix::fs::symlink("../outside/secret.txt", logs.join("escape-link")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret.txt"), logs.join("escape-abs")).unwrap();
    std::os::unix::fs::symlink("a.log", logs.join("inside-link")).unwrap();
    std::os::unix::fs::symlink("../outside", logs.join("escape-dir")).unwrap();
    let max = 100_000;
    let (_c, task, path) = run(
        &logs,
        &[
            ("files", "a.log sub/c.log big.log"),
            ("redact", "a.log"),
            (
                "escape",
                "../outside/secret.txt /etc/passwd escape-link escape-abs inside-link \
                 escape-dir/secret.txt missing.log",
            ),
            ("max-entry-bytes", "100000"),
        ],
        json!({"nodes": "*", "logRedactionLevel": "partial", "logRedactionSalt": SALT}),
    )
    .await;
    assert!(path.ends_with("archive.zip"), "{path:?}");
    let mut zip = Zip::open(&path);
    let report = String::from_utf8(zip.bytes("report.txt")).unwrap();
    eprintln!("{report}");

    // Generated entries, the first with its given time.
    for i in 0..3 {
        let want = format!("generated entry {i}\n").repeat(1000 * (i + 1));
        assert_eq!(zip.bytes(&format!("gen/{i}.txt")), want.as_bytes());
    }
    assert_eq!(zip.mtime("gen/0.txt"), 1_700_000_000);
    // Granted files, as on disk, with their mtimes (DOS: 2 s resolution).
    assert_eq!(zip.bytes("files/a.log"), a_log);
    assert_eq!(zip.bytes("files/sub/c.log"), c_log);
    assert!(zip.mtime("files/a.log").abs_diff(MTIME) <= 2);
    assert!(zip.mtime("files/big.log").abs_diff(MTIME + 1001) <= 2);
    // Over the limit: the tail, reported truncated.
    assert_eq!(zip.bytes("files/big.log"), &big[big.len() - max..]);
    assert!(
        report.contains(&format!(
            "add-file files big.log: Ok(EntryInfo {{ size: {}, truncated: true, redacted: false }})",
            big.len()
        )),
        "{report}"
    );
    // Redacted with the task's salt, as cbcollect_info would.
    let redacted = zip.bytes("redacted/a.log");
    assert_eq!(redacted, redact(SALT, &a_log));
    assert!(!String::from_utf8_lossy(&redacted).contains("user-1"));
    assert!(report.contains("add-file redacted a.log: Ok(EntryInfo { size: "));
    assert!(report.contains("truncated: false, redacted: true })"));

    // Every escape refused in words, nothing of it in the zip.
    for (path, why) in [
        (
            "../outside/secret.txt",
            "Denied(\"path \\\"../outside/secret.txt\\\": '..' would leave the grant\")",
        ),
        ("/etc/passwd", "Denied(\"path \\\"/etc/passwd\\\": absolute"),
        (
            "escape-link",
            "Denied(\"logs/escape-link: a symlink on the way",
        ),
        (
            "escape-abs",
            "Denied(\"logs/escape-abs: a symlink on the way",
        ),
        (
            "inside-link",
            "Denied(\"logs/inside-link: a symlink on the way",
        ),
        (
            "escape-dir/secret.txt",
            "Denied(\"logs/escape-dir/secret.txt: a symlink on the way",
        ),
        (
            "missing.log",
            "Failed(\"logs/missing.log: No such file or directory",
        ),
    ] {
        let line = report
            .lines()
            .find(|l| l.starts_with(&format!("escape {path}:")))
            .unwrap_or_else(|| panic!("no line for {path} in:\n{report}"));
        assert!(line.contains(why), "{line}");
    }
    assert!(
        report.contains("bad-entry ../outside.txt: Err(ArchiveError::InvalidName(\"entry \\\"../outside.txt\\\": has an empty, '.' or '..' component\"))"),
        "{report}"
    );
    let names = zip.names();
    assert!(!names.iter().any(|n| n.starts_with("escape")), "{names:?}");
    assert_eq!(names.len(), 3 + 3 + 1 + 1, "{names:?}");
    let raw = std::fs::read(&path).unwrap();
    assert!(
        !raw.windows(OUTSIDE_TEXT.len())
            .any(|w| w == OUTSIDE_TEXT.as_bytes())
    );
    assert_eq!(
        std::fs::read_to_string(outside.join("secret.txt")).unwrap(),
        OUTSIDE_TEXT
    );
    // The salt is nowhere in the status.
    assert!(!serde_json::to_string(&task).unwrap().contains(SALT));
}

#[tokio::test]
async fn fifty_files_of_a_mebibyte_compress_in_parallel() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().to_path_buf();
    let mut names = Vec::new();
    let mut contents = Vec::new();
    for i in 0..50u32 {
        // Compressible, and different in every file.
        let mut state = u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15) + 1;
        let data: Vec<u8> = (0..(1 << 20))
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                b"abcdefgh<>/ \n"[(state % 13) as usize]
            })
            .collect();
        let name = format!("f{i:02}.log");
        std::fs::write(logs.join(&name), &data).unwrap();
        names.push(name);
        contents.push(data);
    }
    let files = names.join(" ");
    // Redaction asked, but the request does not ask for it: stored as is.
    let (_c, _, path) = run(
        &logs,
        &[
            ("files", files.as_str()),
            ("redact", "f00.log"),
            ("level", "1"),
        ],
        json!({"nodes": "*"}),
    )
    .await;
    let mut zip = Zip::open(&path);
    for (name, data) in names.iter().zip(&contents) {
        assert!(zip.bytes(&format!("files/{name}")) == *data, "{name}");
    }
    assert!(zip.bytes("redacted/f00.log") == contents[0]);
    let report = String::from_utf8(zip.bytes("report.txt")).unwrap();
    assert!(
        report.contains("add-file redacted f00.log: Ok(EntryInfo { size: 1048576, truncated: false, redacted: false })"),
        "{report}"
    );
    assert_eq!(zip.names().len(), 3 + 50 + 1 + 1);
    let size = std::fs::metadata(&path).unwrap().len();
    assert!(size < 45 << 20, "compressed: {size}");
}

#[tokio::test]
async fn a_password_encrypts_every_entry_with_aes_256() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(&["n1"], |config: &mut Config| {
        config.collector.plugin = misbehave_plugin();
        set_option(config, "mode", "archive");
        set_option(config, "password", "hunter2");
        config.collector.inputs = vec![grant(dir.path())];
    })
    .await;
    let task = collect_once(&c.admin("n1")).await;
    let node = &task.per_node["n1"];
    assert_eq!(node.status, NodeState::Collected, "{node:?}");
    // pyzipper, an independent implementation, checks that every entry is
    // AES-256, decrypts with the password and fails with a wrong one.
    let zip = std::path::Path::new(node.path.as_deref().unwrap());
    let report = crate::encryption::decrypt(zip, "report.txt", "hunter2");
    assert!(!report.is_empty());
}
