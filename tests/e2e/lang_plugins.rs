//! Collectors written in other languages (`plugins/examples/`): Python
//! built with componentize-py and JavaScript built with componentize-js,
//! each configured as `[collector] plugin = "/path/to.wasm"` on a real
//! two-node cluster: a collection in which one node collects and the
//! other fails as configured, then an encrypted one. Each test builds its plugin first with
//! `plugins/examples/build.sh` (the tools come from `.ci/setup`); a
//! missing tool fails the test, it never skips.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use autocollect::coordinator::task::{NodeState, TaskState, TaskStatus};
use serde_json::{Value, json};

use crate::support::*;

/// Build one example (`python` or `js`) into `target/examples/`; its
/// component's path.
fn example(lang: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = root.join("target").join("examples");
    let built = Command::new(root.join("plugins/examples/build.sh"))
        .arg(&out)
        .arg(lang)
        .output()
        .expect("run plugins/examples/build.sh");
    assert!(
        built.status.success(),
        "building the {lang} example failed ({}):\n{}\n{}",
        built.status,
        String::from_utf8_lossy(&built.stdout),
        String::from_utf8_lossy(&built.stderr)
    );
    out.join(format!("{lang}_collector.wasm"))
}

/// Every entry of the zip at `path`, by name, as text.
fn entries(path: &Path) -> BTreeMap<String, String> {
    let mut zip = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).expect("a valid zip");
    (0..zip.len())
        .map(|i| {
            let mut e = zip.by_index(i).unwrap();
            let mut text = String::new();
            e.read_to_string(&mut text).unwrap();
            (e.name().to_string(), text)
        })
        .collect()
}

/// A two-node cluster running the `lang` example: n1 collects (with a
/// `note`), n2 is configured to fail with status 3.
async fn lang_cluster(lang: &str) -> TestCluster {
    let plugin = example(lang).display().to_string();
    cluster(&["n1", "n2"], |config| {
        config.collector.plugin = plugin.clone();
        set_option(
            config,
            "note",
            format!("{lang} on {}", config.node).as_str(),
        );
        if config.node == "n2" {
            set_option(config, "fail-with", 3i64);
        }
    })
    .await
}

/// Collect from both nodes: n1's zip holds the example's report of its
/// own run (context, options, parameters), n2 fails with its status and
/// output, and the plugin's `log` lines reach the daemon's log. Then an
/// encrypted collection on n1.
async fn collects_through_the_daemon(lang: &str, language: &str) {
    let c = lang_cluster(lang).await;
    let admin = c.admin("n1");
    let (status, body) = start_json(
        &admin,
        json!({"nodes": "*", "logRedactionLevel": "partial", "logRedactionSalt": "salt-not-to-show"}),
    )
    .await;
    assert_eq!(status, reqwest::StatusCode::OK, "{body}");
    let started: TaskStatus = serde_json::from_value(body).unwrap();
    let task = wait_for_end(&admin, &started.task_id).await;
    assert_ended(&task, TaskState::Completed);

    let n1 = &task.per_node["n1"];
    assert_eq!(n1.status, NodeState::Collected, "{n1:?}");
    let path = PathBuf::from(n1.path.as_deref().expect("the zip's path"));
    assert!(
        path.starts_with(result_dir(&c, "n1", &task.task_id)),
        "{path:?}"
    );
    let name = path.file_name().unwrap().to_str().unwrap();
    assert!(
        name.starts_with("collectinfo-") && name.ends_with("-n1-redacted.zip"),
        "{name}"
    );
    let progress = n1.progress.as_ref().expect("progress reported");
    assert_eq!((progress.done, progress.total), (3, 3), "{progress:?}");

    let files = entries(&path);
    assert_eq!(
        files.keys().collect::<Vec<_>>(),
        ["context.json", "report.txt", "runtime.txt"],
        "{files:?}"
    );
    let context: Value = serde_json::from_str(&files["context.json"]).unwrap();
    assert_eq!(context["language"], language);
    assert_eq!(context["node"], "n1");
    assert_eq!(context["task_id"], task.task_id.as_str());
    assert_eq!(context["output_dir"], "/output");
    assert_eq!(context["note"], format!("{lang} on n1"));
    assert_eq!(
        context["options"],
        json!([["note", format!("{lang} on n1")]])
    );
    let params = context["parameters"].as_array().unwrap();
    assert!(
        params.contains(&json!(["log-redaction-level", "partial"])),
        "{params:?}"
    );
    assert!(
        params.contains(&json!(["log-redaction-salt", "***"])),
        "{params:?}"
    );
    assert!(context["limits"]["deadline_ms"].as_u64().unwrap() > 0);
    let report = &files["report.txt"];
    assert!(report.contains("node: n1") && report.contains(&format!("note: {lang} on n1")));
    assert!(!report.contains("salt-not-to-show"), "{report}");
    assert!(!files["runtime.txt"].is_empty());

    let n2 = &task.per_node["n2"];
    assert_eq!(n2.status, NodeState::Failed, "{n2:?}");
    assert_eq!(n2.collection_status_code.as_deref(), Some("3"), "{n2:?}");
    assert_eq!(
        n2.collection_output.as_deref(),
        Some(format!("{lang} collector: failing with status 3 as configured\n").as_str())
    );

    wait_for_log(&c, "n1", &format!("{lang} collector: wrote {name}")).await;

    // An `encryptionPassword` reaches the example, which has the host write
    // the zip AES-256 encrypted (the `archive` import).
    let password = format!("lang pässword {:016x}", rand::random::<u64>());
    let (status, body) = start_json(
        &admin,
        json!({"nodes": "n1", "encryptionPassword": password}),
    )
    .await;
    assert_eq!(status, reqwest::StatusCode::OK, "{body}");
    let started: TaskStatus = serde_json::from_value(body).unwrap();
    let task = wait_for_end(&admin, &started.task_id).await;
    let n1 = &task.per_node["n1"];
    assert_eq!(n1.status, NodeState::Collected, "{n1:?}");
    let zip = Path::new(n1.path.as_deref().unwrap());
    let context = crate::encryption::decrypt(zip, "context.json", &password);
    let context: Value = serde_json::from_str(&context).unwrap();
    assert_eq!(context["node"], "n1");
    assert!(
        context["parameters"]
            .as_array()
            .unwrap()
            .contains(&json!(["encryption-password", "***"])),
        "{context}"
    );
}

#[tokio::test]
async fn python_collects_through_the_daemon() {
    collects_through_the_daemon("python", "python").await;
}

#[tokio::test]
async fn js_collects_through_the_daemon() {
    collects_through_the_daemon("js", "javascript").await;
}
