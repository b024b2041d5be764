//! `autocollect plugin run`: one collection or upload with a plugin file,
//! no cluster, no configuration: streamed log lines and progress, the
//! outcome, the artifacts, the receipt, exit 0/1; `--watch` runs it again
//! when the file changes.

use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support::*;
use crate::upload_server::UploadServer;

/// The receipt printed after `receipt:`.
fn receipt(stdout: &str) -> serde_json::Value {
    let json = stdout.split("receipt:\n").nth(1).expect("a receipt");
    let end = json.find("\n}").expect("the receipt's end") + 2;
    serde_json::from_str(&json[..end]).expect("the receipt is JSON")
}

#[tokio::test]
async fn plugin_run_collects_locally_and_prints_logs_progress_and_the_receipt() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    std::fs::write(logs.join("a.log"), "login by <ud>bob</ud>\n").unwrap();
    let out = dir.path().join("out");
    let run = autocollect_cli(&[
        "plugin",
        "run",
        "builtin:files",
        "--input",
        &format!("logs={}", logs.display()),
        "--param",
        "log-redaction-level=partial",
        "--param",
        "log-redaction-salt=pepper",
        "--out",
        out.to_str().unwrap(),
    ])
    .await;
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("outcome:   collected\n"),
        "{}",
        run.stdout
    );
    assert!(
        run.stderr
            .contains("[plugin info ] files: 1 files selected"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("[progress] 22/22 1 of 1 files"),
        "{}",
        run.stderr
    );
    let receipt = receipt(&run.stdout);
    let name = receipt["artifact"]["name"].as_str().unwrap();
    assert!(name.ends_with("-local-redacted.zip"), "{name}");
    let zip = out.join(name);
    let (sha256, _) = autocollect::manifest::sha256_of(std::fs::File::open(&zip).unwrap()).unwrap();
    assert_eq!(receipt["artifact"]["sha256"], sha256);
    assert_eq!(receipt["parameters"]["logRedactionSalt"], "*****");
    assert!(!run.stdout.contains("pepper"));
    assert!(!zip_member(&zip, "logs/a.log").contains("bob"));
}

#[tokio::test]
async fn plugin_run_fails_clearly_on_a_bad_option_or_a_missing_upload_target() {
    let run = autocollect_cli(&["plugin", "run", "builtin:files", "--option", "nope=1"]).await;
    assert_eq!(run.code, 1);
    assert!(
        run.stdout.contains(
            "error:     option nope: unknown option (known: include, exclude, max_file_bytes, compression)"
        ),
        "{}",
        run.stdout
    );
    let run = autocollect_cli(&["plugin", "run", "builtin:http-uploader"]).await;
    assert_eq!(run.code, 1);
    assert!(
        run.stderr
            .contains("is an uploader: give the file to send (--artifact FILE)"),
        "{}",
        run.stderr
    );
    // The limits apply to an uploader too.
    let file = tempfile::NamedTempFile::new().unwrap();
    let run = autocollect_cli(&[
        "plugin",
        "run",
        "builtin:http-uploader",
        "--artifact",
        file.path().to_str().unwrap(),
        "--upload-url",
        "https://127.0.0.1:1/x",
        "--memory-mb",
        "1",
    ])
    .await;
    assert_eq!(run.code, 1);
    assert!(
        run.stdout.contains("memory limit of 1 MiB"),
        "{}",
        run.stdout
    );
    let run = autocollect_cli(&["plugin", "run", "builtin:files", "--param", "colour=blue"]).await;
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("unknown start parameter \"colour\""),
        "{}",
        run.stderr
    );
}

#[tokio::test]
async fn plugin_run_uploads_what_it_collected_and_runs_an_uploader_alone() {
    let server = UploadServer::start_tls().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = server.write_ca(dir.path());
    let run = autocollect_cli(&[
        "plugin",
        "run",
        "builtin:mock-collector",
        "--option",
        "artifact-size=5000",
        "--upload-url",
        &format!("{}/Cust/1/mock.zip", server.host()),
        "--cacert",
        ca.to_str().unwrap(),
    ])
    .await;
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("uploaded:  "), "{}", run.stdout);
    let size = receipt(&run.stdout)["artifact"]["size"].as_u64().unwrap();
    assert_eq!(server.received()[0].size, size);

    let file = dir.path().join("bundle.bin");
    std::fs::write(&file, vec![1u8; 12_345]).unwrap();
    let run = autocollect_cli(&[
        "plugin",
        "run",
        "builtin:http-uploader",
        "--artifact",
        file.to_str().unwrap(),
        "--upload-url",
        &format!("{}/Cust/2/bundle.bin", server.host()),
        "--cacert",
        ca.to_str().unwrap(),
    ])
    .await;
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("(12345 bytes, HTTP 200, 1 attempt)"),
        "{}",
        run.stdout
    );
    assert_eq!(server.received()[1].path, "/Cust/2/bundle.bin");
}

#[tokio::test]
async fn plugin_run_watch_runs_again_when_the_file_changes() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("collector.wasm");
    let (_, mock) = autocollect::plugin::builtin::lookup("mock-collector").unwrap();
    let (_, files) = autocollect::plugin::builtin::lookup("files").unwrap();
    std::fs::write(&plugin, mock).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_autocollect"))
        .args(["plugin", "run", "--watch", plugin.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next_run = async || {
        let mut plugin_line = String::new();
        loop {
            let line = tokio::time::timeout(PATIENCE, lines.next_line())
                .await
                .expect("plugin run --watch goes on")
                .unwrap()
                .expect("plugin run --watch still runs");
            if line.starts_with("plugin:") {
                plugin_line = line;
            } else if line.contains("watching") {
                return plugin_line;
            }
        }
    };
    let first = next_run().await;
    assert!(first.contains(&sha(mock)), "{first}");
    // A new build lands in place (written aside, then renamed, as cargo does).
    let fresh = dir.path().join("collector.wasm.new");
    std::fs::write(&fresh, files).unwrap();
    std::fs::rename(&fresh, &plugin).unwrap();
    let second = next_run().await;
    assert!(second.contains(&sha(files)), "{second}");
    child.kill().await.unwrap();
}

fn sha(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
