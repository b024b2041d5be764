//! The host's manifest of each node's artifact: written beside it with
//! the SHA-256 the host computed, secrets masked, shown in status,
//! uploaded after the zip, and checked by `autocollect verify`.

use std::path::{Path, PathBuf};
use std::process::Output;

use autocollect::coordinator::task::{NodeState, TaskState};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha1::Digest as _;

use crate::cbcollect::{cbcollect, standin};
use crate::support::*;
use crate::upload::{upload_and_wait, upload_to};
use crate::upload_server::{Reply, UploadServer, sha256_file};

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn verify(args: &[&Path]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_autocollect"))
        .arg("verify")
        .args(args)
        .output()
        .expect("autocollect runs")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn cbcollect_writes_a_manifest_with_the_sha256_and_no_secret() {
    let records = tempfile::tempdir().unwrap();
    let c = cluster(&["n1"], |config| cbcollect(config, records.path(), &[])).await;
    let admin = c.admin("n1");
    let (salt, password) = ("manifest-salt-4711", "manifest-pass-0815");
    let (status, body) = start_json(
        &admin,
        json!({"nodes": "*", "logRedactionLevel": "partial", "logRedactionSalt": salt,
               "encryptionPassword": password, "taskRegexp": "^ns"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let task = wait_for_end(&admin, body["taskId"].as_str().unwrap()).await;
    assert_ended(&task, TaskState::Completed);
    let n1 = &task.per_node["n1"];
    assert_eq!(n1.status, NodeState::Collected, "{n1:?}");
    let zip = PathBuf::from(n1.path.as_deref().unwrap());

    // Beside the artifact, in results/TASK/, out of the plugin's reach.
    let path = result_dir(&c, "n1", &task.task_id).join("manifest.json");
    let raw = std::fs::read_to_string(&path).unwrap();
    assert!(!raw.contains(salt), "salt in the manifest: {raw}");
    assert!(!raw.contains(password), "password in the manifest: {raw}");
    let m: Value = serde_json::from_str(&raw).unwrap();
    let sha256 = sha256_file(&zip);
    assert_eq!(m["formatVersion"], 1);
    assert_eq!(m["taskId"], task.task_id.as_str());
    assert_eq!(m["node"], "n1");
    assert_eq!(
        m["artifact"],
        json!({"name": zip.file_name().unwrap().to_str().unwrap(),
               "size": std::fs::metadata(&zip).unwrap().len(), "sha256": sha256})
    );
    // Status shows the same SHA-256.
    assert_eq!(n1.sha256.as_deref(), Some(sha256.as_str()));

    assert_eq!(m["plugin"]["source"], "builtin:cbcollect");
    assert_eq!(m["plugin"]["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(m["plugin"]["witVersion"], autocollect::plugin::WIT_VERSION);
    assert_eq!(
        m["plugin"]["hostWitVersion"],
        autocollect::plugin::WIT_VERSION
    );
    assert_eq!(m["plugin"]["options"]["program"], standin());
    assert_eq!(
        m["parameters"],
        json!({"logRedactionLevel": "partial", "logRedactionSalt": "*****",
               "encryptionPassword": "*****", "taskRegexp": "^ns"})
    );
    let twice = format!("{salt}{salt}");
    let hash_of_salt: String = sha1::Sha1::digest(twice.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        m["redaction"],
        json!({"level": "partial", "HashOfSalt": hash_of_salt})
    );

    // The one program it ran, its salt masked, with how it ended.
    let exec = m["exec"].as_array().unwrap();
    assert_eq!(exec.len(), 1, "{exec:?}");
    assert_eq!(exec[0]["program"], standin());
    let args: Vec<&str> = exec[0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(args.contains(&"--log-redaction-salt=*****"), "{args:?}");
    assert!(args.contains(&"--log-redaction-level=partial"), "{args:?}");
    assert_eq!(exec[0]["exit"], json!({"code": 0}));
    assert!(exec[0]["durationMs"].as_u64().is_some(), "{exec:?}");
    assert!(m["run"]["wallTimeMs"].as_u64().unwrap() >= exec[0]["durationMs"].as_u64().unwrap());
    assert!(m["run"]["peakMemoryBytes"].as_u64().unwrap() > 0);
    assert!(m["run"]["bytesWritten"].as_u64().unwrap() >= m["artifact"]["size"].as_u64().unwrap());

    // The received bundle checks out (the manifest named as results/ has it).
    let out = verify(&[&zip]);
    assert!(out.status.success(), "{}", text(&out));

    // Encrypted (no redaction): verify says which entries it cannot read,
    // and still succeeds.
    let (_, body) = start_json(
        &admin,
        json!({"nodes": "*", "encryptionPassword": password}),
    )
    .await;
    let task = wait_for_end(&admin, body["taskId"].as_str().unwrap()).await;
    let zip = PathBuf::from(task.per_node["n1"].path.as_deref().unwrap());
    let out = verify(&[&zip]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("encrypted entries not checked"),
        "{}",
        text(&out)
    );
    let raw = std::fs::read_to_string(zip.with_file_name("manifest.json")).unwrap();
    assert!(!raw.contains(password), "{raw}");
    assert_eq!(
        read_json(&zip.with_file_name("manifest.json"))["redaction"],
        json!({"level": "none"})
    );
}

#[tokio::test]
async fn in_a_log_dir_the_manifest_is_named_after_the_zip() {
    let logs = tempfile::tempdir().unwrap();
    let c = cluster(&["n1"], |config| {
        config.storage.allowed_log_dirs = vec![std::env::temp_dir()];
    })
    .await;
    let admin = c.admin("n1");
    let (status, body) = start_json(
        &admin,
        json!({"nodes": "*", "logDir": logs.path().display().to_string()}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let task = wait_for_end(&admin, body["taskId"].as_str().unwrap()).await;
    let zip = PathBuf::from(task.per_node["n1"].path.as_deref().unwrap());
    let name = zip.file_name().unwrap().to_str().unwrap();
    let m = read_json(&logs.path().join(format!("{name}.manifest.json")));
    assert_eq!(m["artifact"]["sha256"], sha256_file(&zip));
    assert_eq!(m["parameters"]["logDir"], logs.path().display().to_string());
    assert_eq!(m["exec"], json!([]));
    let out = verify(&[&zip]);
    assert!(out.status.success(), "{}", text(&out));
}

#[tokio::test]
async fn the_manifest_is_uploaded_after_the_zip_and_describes_the_bytes_received() {
    let server = UploadServer::start().await;
    let c = cluster(&["n1", "n2"], |config| {
        config.upload.allow_http = true;
        set_option(config, "artifact-size", 200_000i64);
    })
    .await;
    let task = upload_and_wait(&c.admin("n1"), &upload_to(&server.host())).await;

    let received = server.received_with_manifests();
    assert_eq!(received.len(), 4, "a zip and a manifest each: {received:?}");
    for node in ["n1", "n2"] {
        let status = &task.per_node[node];
        assert_eq!(status.status, NodeState::Uploaded, "{status:?}");
        let file = Path::new(status.path.as_deref().unwrap())
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let zip_path = format!("/Example+inc./12345/{file}");
        let zip_at = received
            .iter()
            .position(|r| r.path == zip_path)
            .expect("zip");
        let manifest_at = received
            .iter()
            .position(|r| r.path == format!("{zip_path}.manifest.json"))
            .expect("manifest");
        assert!(zip_at < manifest_at, "the zip first: {received:?}");
        let manifest: Value = serde_json::from_slice(&received[manifest_at].head).unwrap();
        assert_eq!(
            manifest["artifact"]["sha256"],
            received[zip_at].sha256.as_str()
        );
        assert_eq!(manifest["artifact"]["size"], received[zip_at].size);
        assert_eq!(manifest["artifact"]["name"], file.as_str());
        assert_eq!(
            status.sha256.as_deref(),
            Some(received[zip_at].sha256.as_str())
        );
        // The status URL and progress stay the zip's.
        assert!(status.url.as_deref().unwrap().ends_with(&file));
        let progress = status.progress.as_ref().unwrap();
        assert_eq!(progress.done, received[zip_at].size);
    }
}

#[tokio::test]
async fn a_manifest_the_server_refuses_fails_the_upload_and_says_so() {
    let server = UploadServer::start().await;
    server.script([
        Reply::Status(200, "ok"),
        Reply::Status(403, "no manifests here"),
    ]);
    let c = cluster(&["n1"], |config| config.upload.allow_http = true).await;
    let task = upload_and_wait(&c.admin("n1"), &upload_to(&server.host())).await;

    let n1 = &task.per_node["n1"];
    assert_eq!(n1.status, NodeState::FailedUpload, "{n1:?}");
    assert_eq!(n1.upload_status_code.as_deref(), Some("403"));
    let output = n1.upload_output.as_deref().unwrap();
    assert!(
        output.contains("the artifact was uploaded, but its manifest was not")
            && output.contains(".manifest.json")
            && output.contains("no manifests here"),
        "{output}"
    );
    assert_eq!(server.received_with_manifests().len(), 2);
}

#[tokio::test]
async fn verify_passes_a_good_bundle_and_says_what_differs_in_a_bad_one() {
    let c = cluster(&["n1"], |config| {
        set_option(config, "artifact-size", 100_000i64);
    })
    .await;
    let task = collect_once(&c.admin("n1")).await;
    let kept = PathBuf::from(task.per_node["n1"].path.as_deref().unwrap());
    let name = kept.file_name().unwrap().to_str().unwrap();

    // As a support engineer receives it: the zip and `<zip>.manifest.json`.
    let dir = tempfile::tempdir().unwrap();
    let zip = dir.path().join(name);
    let manifest = dir.path().join(format!("{name}.manifest.json"));
    std::fs::copy(&kept, &zip).unwrap();
    std::fs::copy(kept.with_file_name("manifest.json"), &manifest).unwrap();

    let out = verify(&[&zip]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("matches its manifest"),
        "{}",
        text(&out)
    );
    let out = verify(&[&zip, &manifest]);
    assert!(out.status.success(), "{}", text(&out));

    // One byte flipped in the middle (inside compressed data).
    let good = std::fs::read(&zip).unwrap();
    let mut bad = good.clone();
    bad[good.len() / 2] ^= 0x01;
    std::fs::write(&zip, &bad).unwrap();
    let out = verify(&[&zip]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("DIFFERS: sha256"), "{}", text(&out));
    assert!(text(&out).contains("ok: size"), "{}", text(&out));

    // Truncated.
    std::fs::write(&zip, &good[..good.len() - 100]).unwrap();
    let out = verify(&[&zip]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("DIFFERS: size"), "{}", text(&out));
    assert!(
        text(&out).contains("the zip does not open"),
        "{}",
        text(&out)
    );

    // Renamed.
    std::fs::write(&zip, &good).unwrap();
    let renamed = dir.path().join("other.zip");
    std::fs::copy(&zip, &renamed).unwrap();
    let out = verify(&[&renamed, &manifest]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("DIFFERS: name"), "{}", text(&out));

    // No manifest, or not one.
    let out = verify(&[&renamed]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("no manifest for"), "{}", text(&out));
    std::fs::write(&manifest, "{\"not\": \"a manifest\"}").unwrap();
    let out = verify(&[&zip]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("is not an autocollect manifest"),
        "{}",
        text(&out)
    );
}
