//! The built-in `files` collector (`builtin:files`): granted files chosen
//! by include/exclude globs, cut to their tail past `max_file_bytes`,
//! redacted under partial redaction (`-redacted.zip`), and a valid zip
//! with what fits when the job nears any of its budgets (disk, files,
//! deadline), the left-out files named in the manifest.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use autocollect::config::{Config, InputGrant};
use autocollect::coordinator::task::{NodeState, NodeStatus};
use autocollect::redact::redact;
use serde_json::json;

use crate::support::*;

const SALT: &str = "pepper-for-the-files";

/// A tree to grant as `logs`: top-level logs, a nested directory, a
/// gzip, a file to exclude and a symlink (which must be skipped).
fn tree() -> (tempfile::TempDir, PathBuf, BTreeMap<String, Vec<u8>>) {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(logs.join("sub/deep")).unwrap();
    let mut files = BTreeMap::new();
    let mut put = |rel: &str, data: Vec<u8>| {
        std::fs::write(logs.join(rel), &data).unwrap();
        files.insert(rel.to_string(), data);
    };
    put(
        "memcached.log",
        (0..3000)
            .flat_map(|i| format!("{i} login by <ud>user-{i}</ud> ok\n").into_bytes())
            .collect(),
    );
    put("debug.log", b"debug line\n".repeat(500));
    put("sub/indexer.log", b"indexer line\n".repeat(200));
    put("sub/deep/query.log", b"query line\n".repeat(100));
    put("sub/stats.gz", vec![0x1f, 0x8b, 8, 0, 1, 2, 3]);
    put("secret.txt", b"not for the zip\n".to_vec());
    std::os::unix::fs::symlink("memcached.log", logs.join("link.log")).unwrap();
    (dir, logs, files)
}

fn grant(host: &Path) -> InputGrant {
    InputGrant {
        name: "logs".into(),
        host: host.to_path_buf(),
        guest: "/inputs/logs".into(),
    }
}

/// One collection with `builtin:files` over `logs` with `options` and the
/// start parameters `params`: the cluster (it holds the files), the
/// node's status and the zip's path.
async fn run(
    logs: &Path,
    options: &[(&str, &str)],
    params: serde_json::Value,
    customize: impl Fn(&mut Config),
) -> (TestCluster, NodeStatus, PathBuf) {
    let c = cluster(&["n1"], |config: &mut Config| {
        config.collector.plugin = "builtin:files".into();
        for (k, v) in options {
            set_option(config, k, *v);
        }
        config.collector.inputs = vec![grant(logs)];
        customize(config);
    })
    .await;
    let admin = c.admin("n1");
    let task = collect_json(&admin, params).await;
    let node = task.per_node["n1"].clone();
    assert_eq!(node.status, NodeState::Collected, "{node:?}");
    let path = PathBuf::from(node.path.as_deref().expect("the zip's path"));
    (c, node, path)
}

/// Every entry of the zip at `path`, by name.
fn entries(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut zip = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).expect("a valid zip");
    (0..zip.len())
        .map(|i| {
            let mut e = zip.by_index(i).unwrap();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            (e.name().to_string(), data)
        })
        .collect()
}

fn file_name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

#[tokio::test]
async fn files_collector_takes_what_the_globs_select_byte_for_byte() {
    let (_dir, logs, files) = tree();
    let (_c, node, path) = run(
        &logs,
        &[
            ("include", "logs/*.log, logs/**/*.gz logs/sub/**/*.log"),
            ("exclude", "logs/debug.log"),
        ],
        json!({"nodes": "*"}),
        |_| {},
    )
    .await;
    let name = file_name(&path);
    assert!(
        name.starts_with("collectinfo-") && name.ends_with("-n1.zip"),
        "{name}"
    );
    let mut got = entries(&path);
    let listing =
        String::from_utf8(got.remove("files-collector.txt").expect("the listing")).unwrap();
    eprintln!("{listing}");
    let want: BTreeMap<String, Vec<u8>> = [
        "memcached.log",
        "sub/indexer.log",
        "sub/deep/query.log",
        "sub/stats.gz",
    ]
    .iter()
    .map(|rel| (format!("logs/{rel}"), files[*rel].clone()))
    .collect();
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    assert!(got == want, "contents differ");
    assert!(listing.contains("1 symlinks skipped"), "{listing}");
    assert!(!node.partial, "{node:?}");
    // The host's manifest says what it added from the grant.
    let manifest = path.with_file_name("manifest.json");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(manifest).unwrap()).unwrap();
    let bytes: usize = want.values().map(Vec::len).sum();
    assert_eq!(manifest["grants"][0]["filesAdded"], 4, "{manifest}");
    assert_eq!(manifest["grants"][0]["bytesAdded"], bytes, "{manifest}");
}

#[tokio::test]
async fn files_collector_takes_every_file_by_default_and_keeps_the_tail_past_max_file_bytes() {
    let (_dir, logs, files) = tree();
    let max = 1000usize;
    let (_c, _node, path) = run(
        &logs,
        &[("max_file_bytes", "1000"), ("compression", "stored")],
        json!({"nodes": "*"}),
        |_| {},
    )
    .await;
    let mut got = entries(&path);
    let listing = String::from_utf8(got.remove("files-collector.txt").unwrap()).unwrap();
    eprintln!("{listing}");
    assert_eq!(got.len(), files.len(), "{:?}", got.keys());
    for (rel, data) in &files {
        let tail = &data[data.len().saturating_sub(max)..];
        assert_eq!(got[&format!("logs/{rel}")], tail, "{rel}");
    }
    assert!(
        listing.contains("truncated logs/memcached.log (1000 of "),
        "{listing}"
    );
    assert!(!got.contains_key("logs/link.log"));
}

#[tokio::test]
async fn files_collector_under_partial_redaction_writes_a_redacted_zip() {
    let (_dir, logs, files) = tree();
    let (_c, _node, path) = run(
        &logs,
        &[("include", "logs/memcached.log logs/sub/**")],
        json!({"nodes": "*", "logRedactionLevel": "partial", "logRedactionSalt": SALT}),
        |_| {},
    )
    .await;
    let name = file_name(&path);
    assert!(name.ends_with("-n1-redacted.zip"), "{name}");
    let got = entries(&path);
    let redacted = &got["logs/memcached.log"];
    assert_eq!(
        redacted,
        &redact(SALT, &files["memcached.log"]),
        "redacted with the task's salt"
    );
    assert!(!String::from_utf8_lossy(redacted).contains("<ud>user-1</ud>"));
    assert_eq!(got["logs/sub/indexer.log"], files["sub/indexer.log"]);
}

#[tokio::test]
async fn files_collector_near_its_disk_budget_keeps_a_valid_partial_zip() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    // 40 x 100 KiB of incompressible bytes (xorshift), against 2 MiB.
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for i in 0..40 {
        let data: Vec<u8> = (0..100 * 1024)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::fs::write(logs.join(format!("part-{i:02}.log")), data).unwrap();
    }
    let (_c, node, path) = run(&logs, &[], json!({"nodes": "*"}), |config| {
        config.storage.job_max_mb = 2
    })
    .await;
    assert_partial(&node, &path, 40, "disk budget");
}

#[tokio::test]
async fn files_collector_near_its_file_budget_keeps_a_valid_partial_zip() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    for i in 0..60 {
        std::fs::write(logs.join(format!("part-{i:02}.log")), format!("line {i}\n")).unwrap();
    }
    // Entries in the host's zip count as files: 60 cannot fit in 30.
    let (_c, node, path) = run(&logs, &[], json!({"nodes": "*"}), |config| {
        config.storage.job_max_files = 30
    })
    .await;
    let kept = assert_partial(&node, &path, 60, "file budget");
    assert!(kept <= 27, "{kept} files kept against a budget of 30");
}

#[tokio::test]
async fn files_collector_near_its_deadline_keeps_a_valid_partial_zip() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    // Sparse files: free to make, 8 MiB each to read and compress, far
    // more than 4 s of work on any machine.
    for i in 0..2000 {
        let file = std::fs::File::create(logs.join(format!("part-{i:04}.log"))).unwrap();
        file.set_len(8 << 20).unwrap();
    }
    let (_c, node, path) = run(&logs, &[], json!({"nodes": "*"}), |config| {
        config.collector.timeout_secs = 4.0
    })
    .await;
    assert_partial(&node, &path, 2000, "deadline");
}

/// `node` is collected and partial for `why`; the zip at `path` is valid,
/// holds some but not all of the `total` files, and its listing and the
/// manifest's `leftOut` name exactly the others. Returns how many it kept.
fn assert_partial(node: &NodeStatus, path: &Path, total: usize, why: &str) -> usize {
    assert!(node.partial, "{node:?}");
    let reason = node.partial_reason.clone().unwrap();
    assert!(reason.contains(why), "{reason}");
    assert!(
        reason.contains(&format!(" of {total} files (first: logs/part-")),
        "{reason}"
    );
    let got = entries(path);
    let kept: Vec<&String> = got.keys().filter(|k| k.starts_with("logs/")).collect();
    eprintln!("{reason}; {} kept", kept.len());
    assert!(
        (1..total).contains(&kept.len()),
        "{} files kept",
        kept.len()
    );
    let listing = String::from_utf8(got["files-collector.txt"].clone()).unwrap();
    assert_eq!(
        listing
            .lines()
            .filter(|l| l.starts_with("left out "))
            .count(),
        total - kept.len(),
        "{listing}"
    );
    let manifest = path.with_file_name("manifest.json");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(manifest).unwrap()).unwrap();
    assert_eq!(manifest["partial"]["reason"], reason.as_str());
    let left_out = &manifest["leftOut"];
    assert_eq!(left_out["count"], (total - kept.len()) as u64, "{left_out}");
    let named: Vec<&str> = left_out["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["item"].as_str().unwrap())
        .collect();
    assert_eq!(named.len(), total - kept.len());
    for name in named {
        assert!(name.starts_with("logs/part-"), "{name}");
        assert!(
            !got.contains_key(name),
            "{name} is both in the zip and left out"
        );
    }
    kept.len()
}

#[tokio::test]
async fn files_collector_refuses_bad_options_by_key() {
    use autocollect::plugin::collector::{CollectorPlugin, RunError};
    use autocollect::plugin::{PluginHost, PluginSource};
    let host = PluginHost::new(None).unwrap();
    let plugin = CollectorPlugin::load(&host, PluginSource::Builtin("files")).unwrap();
    let ok = [
        ("include", "logs/*.log, logs/**/*.gz"),
        ("exclude", "logs/secret*"),
        ("max_file_bytes", "1000000"),
        ("compression", "deflate:9"),
    ];
    let ok: Vec<(String, String)> = ok
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    plugin.validate_options(&ok).await.unwrap();
    for (key, value) in [
        ("include", "/abs/*.log"),
        ("include", ","),
        ("exclude", "logs/../x"),
        ("max_file_bytes", "lots"),
        ("max_file_bytes", "0"),
        ("compression", "deflate:12"),
        ("compression", "zstd"),
        ("colour", "blue"),
    ] {
        let err = plugin
            .validate_options(&[(key.to_string(), value.to_string())])
            .await
            .unwrap_err();
        match err {
            RunError::InvalidOption { key: k, .. } => assert_eq!(k, key, "{value}"),
            other => panic!("{key}={value}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn files_collector_takes_only_what_was_written_in_the_time_window() {
    let (_dir, logs, files) = tree();
    // Everything was written three days ago, but for two files: one an
    // hour ago, one in the future (past `until`).
    let at = |rel: &str, t: std::time::SystemTime| {
        std::fs::File::options()
            .write(true)
            .open(logs.join(rel))
            .unwrap()
            .set_modified(t)
            .unwrap();
    };
    let now = std::time::SystemTime::now();
    let hour = std::time::Duration::from_secs(3600);
    for rel in files.keys() {
        at(rel, now - 72 * hour);
    }
    at("debug.log", now - hour);
    at("sub/indexer.log", now + 48 * hour);
    let until = chrono::Utc::now() + chrono::Duration::hours(24);
    let (_c, node, zip) = run(
        &logs,
        &[],
        json!({"nodes": ["n1"], "since": "2h", "until": until.to_rfc3339()}),
        |_| {},
    )
    .await;
    assert!(node.ignored_parameters.is_empty(), "{node:?}");
    let got = entries(&zip);
    let taken: Vec<&str> = got
        .keys()
        .map(String::as_str)
        .filter(|n| *n != "files-collector.txt")
        .collect();
    assert_eq!(taken, ["logs/debug.log"], "{got:?}");
    assert_eq!(got["logs/debug.log"], files["debug.log"]);
}

#[tokio::test]
async fn files_collector_encrypts_its_zip_with_the_encryption_password() {
    let (_dir, logs, files) = tree();
    let password = "zip-pass-9c2e";
    let (c, _node, zip) = run(
        &logs,
        &[("include", "logs/debug.log")],
        json!({"nodes": ["n1"], "encryptionPassword": password}),
        |_| {},
    )
    .await;
    // pyzipper: every entry AES-256, the right password opens it, a wrong
    // one does not.
    let text = crate::encryption::decrypt(&zip, "logs/debug.log", password);
    assert_eq!(text.as_bytes(), files["debug.log"].as_slice());
    let log = std::fs::read_to_string(&c.node("n1").log_path).unwrap();
    assert!(!log.contains(password));
}

/// The operator guide's example configuration for a Couchbase node's logs
/// directory, as printed, over a directory laid out like one: the logs
/// it names are collected, the access logs are not.
#[tokio::test]
async fn the_operator_guides_couchbase_logs_example_collects_a_couchbase_logs_directory() {
    let readme = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/operator-guide.md"
    ))
    .expect("docs/operator-guide.md");
    let after = readme
        .split("Example: a Couchbase node's logs directory")
        .nth(1)
        .expect("the README's files collector example");
    let block = after
        .split("```toml\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("its TOML block");
    const DOCUMENTED: &str = "/opt/couchbase/var/lib/couchbase/logs";
    assert!(block.contains(DOCUMENTED), "{block}");

    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    let kept = [
        "memcached.log.000000.txt",
        "memcached.log.000001.txt",
        "debug.log",
        "info.log",
        "error.log",
        "babysitter.log",
        "couchdb.log",
        "stats.log",
        "reports.log",
        "analytics_info.log.gz",
    ];
    let left = ["http_access.log", "http_access_internal.log", "debug.log.1"];
    for name in kept.iter().chain(&left) {
        std::fs::write(logs.join(name), format!("[ns_server:info] {name}\n")).unwrap();
    }
    let block = block.replace(DOCUMENTED, logs.to_str().unwrap());
    #[derive(serde::Deserialize)]
    struct Example {
        collector: autocollect::config::PluginRole,
    }
    let example: Example = toml::from_str(&block).expect("the example parses");
    let c = cluster(&["n1"], move |config: &mut Config| {
        config.collector = example.collector.clone();
    })
    .await;
    let admin = c.admin("n1");
    let task = collect_once(&admin).await;
    let node = &task.per_node["n1"];
    assert_eq!(node.status, NodeState::Collected, "{node:?}");
    let got = entries(Path::new(node.path.as_deref().unwrap()));
    let mut want: Vec<String> = kept.iter().map(|n| format!("logs/{n}")).collect();
    want.push("files-collector.txt".into());
    want.sort();
    assert_eq!(got.keys().cloned().collect::<Vec<_>>(), want);
}
