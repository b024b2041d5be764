//! The real collector: the built-in `cbcollect` plugin drives a stand-in
//! for `cbcollect_info` (`tests/cbcollect_info_standin.py`) through the
//! host's `exec` capability, with ns_server's command line, and the host
//! stops every process it started.

use std::path::{Path, PathBuf};

use autocollect::client::{ApiClient, RequestBody};
use autocollect::config::Config;
use autocollect::coordinator::task::{NodeState, TaskState, TaskStatus};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::*;
use crate::upload_server::UploadServer;

pub(crate) const INITARGS: &str = "/opt/couchbase/var/lib/couchbase/initargs";

pub(crate) fn standin() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/cbcollect_info_standin.py")
        .canonicalize()
        .expect("the stand-in exists")
        .display()
        .to_string()
}

/// Where node `node`'s stand-in records its runs (one JSON line each).
pub(crate) fn record_of(dir: &Path, node: &str) -> PathBuf {
    dir.join(format!("standin-{node}.jsonl"))
}

/// Configure the cbcollect collector on the stand-in; `env` goes to the
/// stand-in (STANDIN_FAIL, STANDIN_HANG...).
pub(crate) fn cbcollect(config: &mut Config, records: &Path, env: &[(&str, &str)]) {
    let program = standin();
    let c = &mut config.collector;
    c.plugin = "builtin:cbcollect".into();
    c.options.clear();
    c.options.insert("program".into(), program.as_str().into());
    c.options.insert("initargs".into(), INITARGS.into());
    c.exec_allow = vec![program];
    c.exec_grace_secs = 1.0;
    c.exec_env.insert(
        "STANDIN_RECORD".into(),
        record_of(records, &config.node).display().to_string(),
    );
    c.exec_env.insert("STANDIN_STEP_MS".into(), "0".into());
    for (k, v) in env {
        c.exec_env.insert(k.to_string(), v.to_string());
    }
    // The tests' tmpDir and logDir are temporary directories.
    config.storage.allowed_tmp_dirs = vec![std::env::temp_dir()];
    config.storage.allowed_log_dirs = vec![std::env::temp_dir()];
}

/// The JSON lines a node's stand-in recorded.
pub(crate) fn recorded(dir: &Path, node: &str) -> Vec<Value> {
    std::fs::read_to_string(record_of(dir, node))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

pub(crate) fn argv(record: &Value) -> Vec<String> {
    serde_json::from_value(record["argv"].clone()).unwrap()
}

async fn start(admin: &ApiClient, params: Value) -> TaskStatus {
    let (status, body) = start_json(admin, params).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    serde_json::from_value(body).unwrap()
}

/// Is process `pid` gone (or only a zombie waiting to be reaped)?
fn gone(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat[stat.rfind(')').unwrap() + 2..].starts_with('Z'),
    }
}

#[tokio::test]
async fn three_nodes_collect_with_cbcollect_info_and_ns_servers_command_line() {
    let records = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let c = cluster(&["n1", "n2", "n3"], |config| {
        cbcollect(config, records.path(), &[])
    })
    .await;
    let admin = c.admin("n1");
    let tmp_dir = tmp.path().display().to_string();
    let log_dir = logs.path().display().to_string();
    let started = start(
        &admin,
        json!({"nodes": "*", "tmpDir": tmp_dir, "logDir": log_dir, "taskRegexp": "^ns_server"}),
    )
    .await;
    let task = wait_for_end(&admin, &started.task_id).await;
    assert_ended(&task, TaskState::Completed);

    for node in ["n1", "n2", "n3"] {
        let status = &task.per_node[node];
        assert_eq!(status.status, NodeState::Collected, "{node}: {status:?}");
        let path = PathBuf::from(status.path.as_deref().unwrap());
        // Kept in logDir, as asked.
        assert_eq!(path.parent().unwrap(), logs.path());
        let zip = path.file_name().unwrap().to_str().unwrap().to_string();
        assert!(
            zip.starts_with("collectinfo-") && zip.ends_with(&format!("-{node}.zip")),
            "{zip}"
        );
        let runs = recorded(records.path(), node);
        assert_eq!(runs.len(), 1, "{runs:?}");
        assert_eq!(
            argv(&runs[0]),
            [
                "--watch-stdin".to_string(),
                // The job's own directory in tmpDir, removed after.
                format!("--tmp-dir={tmp_dir}/autocollect-{}-{node}", task.task_id),
                format!("--initargs={INITARGS}"),
                zip.clone(),
                "--task-regexp=^ns_server".to_string(),
            ]
        );
        // Nothing inherited: only what the config grants.
        let env = runs[0]["env"].as_object().unwrap();
        let mut keys: Vec<&str> = env.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(keys, ["STANDIN_RECORD", "STANDIN_STEP_MS"]);
        // A real zip, holding the stand-in's log.
        let archive = zip::ZipArchive::new(std::fs::File::open(&path).unwrap()).unwrap();
        assert!(archive.file_names().any(|n| n == "cbcollect_info.log"));
    }
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "temp files left: {left:?}");
}

#[tokio::test]
async fn partial_redaction_uploads_the_redacted_zip_with_one_secret_salt() {
    let records = tempfile::tempdir().unwrap();
    let server = UploadServer::start().await;
    let c = cluster(&["n1", "n2"], |config| {
        cbcollect(config, records.path(), &[]);
        config.upload.allow_http = true;
    })
    .await;
    let admin = c.admin("n2");
    // The zips are kept in a shared logDir, which holds other files too.
    let logs = tempfile::tempdir().unwrap();
    std::fs::write(logs.path().join("unrelated.log"), "not for upload").unwrap();
    let params = json!({"nodes": "*", "logRedactionLevel": "partial",
        "uploadHost": server.host(), "customer": "acme",
        "logDir": logs.path().display().to_string()});
    let started = start(&admin, params).await;
    let task = wait_for_end(&admin, &started.task_id).await;

    let received = server.received();
    let mut salts = Vec::new();
    for node in ["n1", "n2"] {
        let status = &task.per_node[node];
        assert_eq!(status.status, NodeState::Uploaded, "{status:?}");
        let path = Path::new(status.path.as_deref().unwrap());
        assert!(path.to_str().unwrap().ends_with("-redacted.zip"));
        assert_eq!(path.parent().unwrap(), logs.path());
        // Uploaded from a link of its own, removed afterwards.
        let staging = c.node(node).data_dir.join("staging").join(&task.task_id);
        assert!(!staging.exists(), "{staging:?}");
        let url = status.url.as_deref().unwrap();
        assert!(url.ends_with(&format!("-{node}-redacted.zip")), "{url}");
        assert!(
            received.iter().any(|r| url.ends_with(&r.path)),
            "{received:?}"
        );
        let args = argv(&recorded(records.path(), node)[0]);
        assert_eq!(args[1], "--log-redaction-level=partial");
        let salt = args[2].strip_prefix("--log-redaction-salt=").unwrap();
        assert!(salt.len() >= 16, "{salt}");
        salts.push(salt.to_string());
    }
    assert_eq!(salts[0], salts[1], "the same salt on every node");
    let salt = &salts[0];
    let status = serde_json::to_string(&task).unwrap();
    assert!(!status.contains(salt.as_str()), "salt in status");
    assert!(!c.logs().contains(salt.as_str()), "salt in a daemon log");
}

#[tokio::test]
async fn a_failing_cbcollect_info_fails_the_node_with_its_status_and_output() {
    let records = tempfile::tempdir().unwrap();
    let c = cluster(&["n1"], |config| {
        cbcollect(config, records.path(), &[("STANDIN_FAIL", "3")])
    })
    .await;
    let task = collect_once(&c.admin("n1")).await;

    let n1 = &task.per_node["n1"];
    assert_eq!(n1.status, NodeState::Failed);
    assert_eq!(n1.collection_status_code.as_deref(), Some("3"));
    let output = n1.collection_output.as_deref().unwrap();
    assert!(
        output.contains("failing as asked with status 3"),
        "{output}"
    );
    assert!(output.ends_with("error detail line 3"), "{output}");
}

#[tokio::test]
async fn cancel_kills_the_whole_process_tree_and_leaves_no_temp_file() {
    let records = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let c = cluster(&["n1", "n2"], |config| {
        cbcollect(
            config,
            records.path(),
            &[("STANDIN_HANG", "1"), ("STANDIN_GRANDCHILD", "1")],
        )
    })
    .await;
    let admin = c.admin("n1");
    let tmp_dir = tmp.path().display().to_string();
    start(&admin, json!({"nodes": "*", "tmpDir": tmp_dir})).await;
    // The first progress line comes after the grandchild is forked.
    wait_for(&admin, |t| {
        t.per_node.values().all(|n| {
            n.progress
                .as_ref()
                .is_some_and(|p| p.message.starts_with("[1/5]"))
        })
    })
    .await;
    let mut pids = Vec::new();
    for node in ["n1", "n2"] {
        for record in recorded(records.path(), node) {
            pids.extend(record["pid"].as_u64());
            pids.extend(record["grandchild"].as_u64());
        }
    }
    assert_eq!(pids.len(), 4, "two processes per node: {pids:?}");
    assert!(
        pids.iter().all(|&p| !gone(p)),
        "all running before the cancel"
    );

    let task = admin.cancel().await.unwrap().unwrap();
    assert_ended(&task, TaskState::Cancelled);
    assert!(
        task.per_node
            .values()
            .all(|n| n.status == NodeState::Cancelled),
        "{task:?}"
    );
    // A node confirms only once its processes are gone.
    let alive: Vec<_> = pids.iter().filter(|&&p| !gone(p)).collect();
    assert!(alive.is_empty(), "still running: {alive:?}");
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "temp files left: {left:?}");
}

#[tokio::test]
async fn a_program_that_is_not_allow_listed_is_denied_and_never_started() {
    let records = tempfile::tempdir().unwrap();
    let c = cluster(&["n1"], |config| {
        cbcollect(config, records.path(), &[]);
        config.collector.exec_allow.clear();
    })
    .await;
    let task = collect_once(&c.admin("n1")).await;

    let n1 = &task.per_node["n1"];
    assert_eq!(n1.status, NodeState::Failed);
    let output = n1.collection_output.as_deref().unwrap();
    assert!(output.contains("exec denied"), "{output}");
    assert!(output.contains("is not allowed"), "{output}");
    assert!(recorded(records.path(), "n1").is_empty(), "nothing started");
}

#[tokio::test]
async fn collection_options_are_validated_with_couchbases_messages() {
    let c = cluster(&["n1"], |_| {}).await;
    let admin = c.admin("n1");
    let cases = [
        (
            json!({"logRedactionLevel": "full"}),
            json!({"logRedactionLevel": "The value must be one of the following: [none,partial]"}),
        ),
        (
            json!({"logRedactionSalt": "pepper"}),
            json!({"logRedactionSalt": "logRedactionSalt is only used with logRedactionLevel=partial"}),
        ),
        (
            json!({"tmpDir": "relative/tmp"}),
            json!({"tmpDir": "Must be an absolute path"}),
        ),
        (
            json!({"logDir": "logs"}),
            json!({"logDir": "Must be an absolute path"}),
        ),
        // Only where the operator allows (here: nowhere).
        (
            json!({"logDir": "/etc/cron.d"}),
            json!({"logDir": "is not allowed: this node's configuration lists no directories for it (allowed_log_dirs)"}),
        ),
        (
            json!({"tmpDir": "/tmp", "taskRegexp": "x".repeat(1025)}),
            json!({"tmpDir": "is not allowed: this node's configuration lists no directories for it (allowed_tmp_dirs)",
                   "taskRegexp": "must be at most 1024 characters"}),
        ),
    ];
    for (extra, want) in cases {
        let mut params = json!({"nodes": "*"});
        params
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let (status, body) = admin
            .request(
                Method::POST,
                "/collectLogs/start",
                Some(RequestBody::Json(params.clone())),
                true,
            )
            .await
            .unwrap();
        assert_eq!(
            (status, &body),
            (StatusCode::BAD_REQUEST, &want),
            "{params}"
        );
    }
    assert_eq!(admin.status().await.unwrap(), None, "nothing started");
}

#[tokio::test]
async fn a_collector_that_ignores_the_redaction_request_fails_instead_of_leaking() {
    let c = cluster(&["n1", "n2"], |config| {
        if config.node == "n2" {
            // Returns at once without reading the request's parameters.
            config.collector.plugin = autocollect::plugin::builtin::build_output("test_misbehave")
                .display()
                .to_string();
            config.collector.options.clear();
            config
                .collector
                .options
                .insert("mode".into(), "noop".into());
        }
    })
    .await;
    let admin = c.admin("n1");
    let started = start(
        &admin,
        json!({"nodes": "*", "logRedactionLevel": "partial"}),
    )
    .await;
    let task = wait_for_end(&admin, &started.task_id).await;

    // The mock reads the parameters and names its zip as redacted.
    let n1 = &task.per_node["n1"];
    assert_eq!(n1.status, NodeState::Collected, "{n1:?}");
    assert!(n1.path.as_deref().unwrap().ends_with("-n1-redacted.zip"));
    let n2 = &task.per_node["n2"];
    assert_eq!(n2.status, NodeState::Failed);
    let output = n2.collection_output.as_deref().unwrap();
    assert!(
        output.contains("ignored logRedactionLevel=partial"),
        "{output}"
    );
}

/// `--task-regexp` on both CLIs reaches `cbcollect_info` as ns_server
/// passes it.
#[tokio::test]
async fn both_clis_pass_a_task_regexp_to_cbcollect_info() {
    let records = tempfile::tempdir().unwrap();
    let c = cluster(&["n1"], |config| cbcollect(config, records.path(), &[])).await;
    let run = autocollect_cli_on(
        &c,
        "n1",
        &["start", "--task-regexp", "^ns_server", "--wait"],
    )
    .await;
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let run = couchbase_cli(
        &c,
        "n1",
        &[
            "collect-logs-start",
            "--all-nodes",
            "--task-regexp",
            "^memcached",
            "--wait",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let runs = recorded(records.path(), "n1");
    let regexps: Vec<String> = runs
        .iter()
        .map(|r| argv(r).last().cloned().unwrap_or_default())
        .collect();
    assert_eq!(
        regexps,
        ["--task-regexp=^ns_server", "--task-regexp=^memcached"]
    );
}
