//! Hostile plugins against the host's filesystem: symlinks planted in the
//! output directory are never followed, an artifact must be a plain file
//! of the plugin's own, an uploader sees only its artifact, and a job's
//! disk use and programs are bounded.

use std::path::Path;

use autocollect::client::StartOptions;
use autocollect::config::Config;
use autocollect::coordinator::task::{NodeState, NodeStatus, TaskState};

use crate::support::*;
use crate::upload_server::UploadServer;

fn misbehaving(config: &mut Config, mode: &str) {
    config.collector.plugin = misbehave_plugin();
    config.collector.options.clear();
    set_option(config, "mode", mode);
}

fn output(status: &NodeStatus) -> &str {
    status.collection_output.as_deref().unwrap_or_default()
}

/// `path` as a relative link target that climbs out of any directory: the
/// sandbox refuses absolute link targets, not relative ones.
fn climbing_to(path: &Path) -> String {
    format!(
        "{}{}",
        "../".repeat(24),
        path.display().to_string().trim_start_matches('/')
    )
}

/// Everything below `dir`, as paths relative to it.
fn tree(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            found.push(path.strip_prefix(dir).unwrap().display().to_string());
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
            }
        }
    }
    found.sort();
    found
}

/// Finding 1 of the containment review: a collector plants `upload ->
/// ../../../../outside` in its output directory; with `logDir` and an
/// upload, the host used to stage through that link (hard-linking into
/// the outside directory and showing the uploader all of it).
#[tokio::test]
async fn a_planted_upload_symlink_steers_nothing_and_the_uploader_sees_only_its_zip() {
    let server = UploadServer::start().await;
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("private.key"), "not for upload").unwrap();
    let logs = tempfile::tempdir().unwrap();
    let target = climbing_to(outside.path());
    let c = cluster(&["n1"], |config| {
        misbehaving(config, "symlink-upload");
        set_option(config, "target", target.as_str());
        config.storage.allowed_log_dirs = vec![logs.path().to_path_buf()];
        config.upload.allow_http = true;
        // This uploader sends what it can see beside its artifact.
        config.uploader.plugin = hostile_uploader_plugin();
        config.uploader.options.clear();
        config.uploader.options.insert("mode".into(), "list".into());
    })
    .await;
    let admin = c.admin("n1");
    let (status, body) = start_json(
        &admin,
        serde_json::json!({
            "nodes": "*", "uploadHost": server.host(), "customer": "acme",
            "logDir": logs.path().display().to_string(),
        }),
    )
    .await;
    assert_eq!(status, reqwest::StatusCode::OK, "{body}");
    let task_id = body["taskId"].as_str().unwrap().to_string();
    let task = wait_for_end(&admin, &task_id).await;

    let n1 = &task.per_node["n1"];
    assert_eq!(n1.status, NodeState::Uploaded, "{n1:?}");
    // Nothing was written through the link, nothing outside was read.
    assert_eq!(tree(outside.path()), ["private.key"]);
    let received = server.received();
    assert_eq!(received.len(), 1);
    let seen = String::from_utf8_lossy(&received[0].head).into_owned();
    assert_eq!(
        seen.trim(),
        "entry /artifact/a.zip",
        "the uploader saw: {seen}"
    );
    // Its manifest's run saw the manifest alone.
    let all = server.received_with_manifests();
    assert_eq!(all.len(), 2);
    let seen = String::from_utf8_lossy(&all[1].head).into_owned();
    assert_eq!(seen.trim(), "entry /artifact/a.zip.manifest.json", "{seen}");
    // The zip and the host's manifest are in logDir, and no job, staging
    // or temporary directory is left on the node.
    assert_eq!(tree(logs.path()), ["a.zip", "a.zip.manifest.json"]);
    let data = &c.node("n1").data_dir;
    for area in ["jobs", "staging", "tmp"] {
        assert_eq!(tree(&data.join(area)), Vec::<String>::new(), "{area}");
    }
}

#[tokio::test]
async fn an_uploader_that_sends_less_than_the_artifact_has_not_uploaded_it() {
    let server = UploadServer::start().await;
    let c = cluster(&["n1"], |config| {
        config.upload.allow_http = true;
        // Sends a listing of its directory, not the zip, and says so.
        config.uploader.plugin = hostile_uploader_plugin();
        config.uploader.options.clear();
        config.uploader.options.insert("mode".into(), "list".into());
        config
            .uploader
            .options
            .insert("receipt".into(), "short".into());
    })
    .await;
    let admin = c.admin("n1");
    let (status, body) = start_json(
        &admin,
        serde_json::json!({"nodes": "*", "uploadHost": server.host(), "customer": "acme"}),
    )
    .await;
    assert_eq!(status, reqwest::StatusCode::OK, "{body}");
    let task = wait_for_end(&admin, body["taskId"].as_str().unwrap()).await;
    let n1 = &task.per_node["n1"];
    assert_eq!(n1.status, NodeState::FailedUpload, "{n1:?}");
    let output = n1.upload_output.as_deref().unwrap_or_default();
    assert!(
        output.contains("the uploader reported HTTP 200 after sending")
            && output.contains("of the artifact's"),
        "{output}"
    );
}

#[tokio::test]
async fn an_artifact_that_is_a_symlink_or_a_second_link_is_refused() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("shadow"), "root:secret").unwrap();
    let target = climbing_to(&outside.path().join("shadow"));
    for (mode, expected) in [
        (
            "symlink-artifact",
            "is not a regular file in the output directory",
        ),
        ("linked-artifact", "has 2 links"),
    ] {
        let c = cluster(&["n1"], |config| {
            misbehaving(config, mode);
            set_option(config, "target", target.as_str());
        })
        .await;
        let task = collect_once(&c.admin("n1")).await;
        let n1 = &task.per_node["n1"];
        assert_eq!(n1.status, NodeState::Failed, "{mode}: {n1:?}");
        assert!(output(n1).contains(expected), "{mode}: {n1:?}");
        assert_eq!(n1.path, None);
        // Failed: its output is gone, the file it pointed at is not.
        assert!(!job_dir(&c, "n1", &task.task_id).exists());
        assert!(!result_dir(&c, "n1", &task.task_id).exists());
        assert_eq!(
            std::fs::read_to_string(outside.path().join("shadow")).unwrap(),
            "root:secret"
        );
    }
}

/// The number in "the job wrote N MiB".
fn mib_written(output: &str) -> u64 {
    let after = output.split("wrote ").nth(1).expect("says how much");
    after.split(' ').next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_collector_that_writes_without_end_is_stopped_at_its_budget() {
    let c = cluster(&["n1"], |config| {
        misbehaving(config, "fill-disk");
        config.storage.job_max_mb = 32;
    })
    .await;
    let task = collect_once(&c.admin("n1")).await;
    assert_ended(&task, TaskState::Completed);
    let n1 = &task.per_node["n1"];
    assert_eq!(n1.status, NodeState::Failed, "{n1:?}");
    let out = output(n1);
    assert!(
        out.contains("over its budget of 32 MiB (storage.job_max_mb)"),
        "{out}"
    );
    // Stopped within 64 MiB of its budget, and what it wrote is gone.
    assert!(mib_written(out) <= 32 + 64, "{out}");
    assert!(!job_dir(&c, "n1", &task.task_id).exists());
}

#[tokio::test]
async fn a_collector_that_creates_files_without_end_is_stopped_at_its_budget() {
    let c = cluster(&["n1"], |config| {
        misbehaving(config, "many-files");
        config.storage.job_max_files = 500;
    })
    .await;
    let task = collect_once(&c.admin("n1")).await;
    let n1 = &task.per_node["n1"];
    assert_eq!(n1.status, NodeState::Failed, "{n1:?}");
    assert!(
        output(n1).contains("over its budget of 500 (storage.job_max_files)"),
        "{n1:?}"
    );
    assert!(!job_dir(&c, "n1", &task.task_id).exists());
}

#[tokio::test]
async fn a_failed_job_keeps_its_output_only_when_asked() {
    for keep in [false, true] {
        let c = cluster(&["n1"], |config| {
            misbehaving(config, "escape"); // writes probe.txt, then fails
            config.storage.keep_failed = keep;
        })
        .await;
        let task = collect_once(&c.admin("n1")).await;
        assert_eq!(task.per_node["n1"].status, NodeState::Failed);
        let probe = job_dir(&c, "n1", &task.task_id).join("probe.txt");
        assert_eq!(probe.exists(), keep, "keep_failed = {keep}");
    }
}

#[tokio::test]
async fn a_plugin_may_run_only_so_many_programs_at_once() {
    let c = cluster(&["n1"], |config| {
        misbehaving(config, "spawn-many");
        set_option(config, "program", "/usr/bin/sleep");
        set_option(config, "args", "30");
        config.collector.exec_allow = vec!["/usr/bin/sleep".into()];
        config.collector.exec_max_processes = 3;
        config.collector.exec_grace_secs = 0.1;
    })
    .await;
    let task = collect_once(&c.admin("n1")).await;
    let n1 = &task.per_node["n1"];
    assert_eq!(n1.status, NodeState::Failed, "{n1:?}");
    assert_eq!(n1.collection_status_code.as_deref(), Some("3"), "{n1:?}");
    assert!(output(n1).contains("exec_max_processes"), "{n1:?}");
}

#[tokio::test]
async fn an_upload_stages_from_the_kept_result_and_leaves_nothing_behind() {
    // A plain run: the staging directory exists only during the upload,
    // and is not inside the collector's output directory.
    let server = UploadServer::start().await;
    let c = cluster(&["n1"], |config| {
        config.upload.allow_http = true;
        set_option(config, "artifact-size", 10_000i64);
    })
    .await;
    let admin = c.admin("n1");
    let started = admin
        .start_with(&StartOptions {
            nodes: "all".into(),
            upload_host: Some(server.host()),
            customer: Some("acme".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let task = wait_for_end(&admin, &started.task_id).await;
    assert_eq!(task.per_node["n1"].status, NodeState::Uploaded);
    let path = Path::new(task.per_node["n1"].path.as_deref().unwrap());
    assert!(path.starts_with(result_dir(&c, "n1", &task.task_id)));
    assert!(!job_dir(&c, "n1", &task.task_id).exists());
    assert!(
        !c.node("n1")
            .data_dir
            .join("staging")
            .join(&task.task_id)
            .exists()
    );
    assert_eq!(
        server.received()[0].sha256,
        crate::upload_server::sha256_file(path)
    );
}
