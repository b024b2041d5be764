//! Encrypted bundles: the start parameter `encryptionPassword`
//! (couchbase-cli's `--encryption-password`). Each node's zip is
//! encrypted with WinZip AES-256; the tests decrypt it with an independent
//! implementation (Python's pyzipper, `tests/unzip_aes.py`, run by
//! `/usr/bin/python3` as the stand-in is; `.ci/setup` installs it). The
//! password reaches the collector and nothing else: not the logs, the
//! audit log, the status, the saved task, or any other file on the nodes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use autocollect::client::{ApiClient, RequestBody};
use autocollect::coordinator::task::{NodeState, TaskState, TaskStatus};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sha2::Digest;

use crate::cbcollect::{INITARGS, argv, cbcollect, recorded};
use crate::support::*;

/// A password no other test uses, with a space and a non-ASCII letter.
fn password() -> String {
    format!("zip pässword {:016x}", rand::random::<u64>())
}

struct Unzipped {
    code: i32,
    stdout: String,
    stderr: String,
}

/// `tests/unzip_aes.py ZIP MEMBER`, the password on its stdin: checks
/// that every entry is AES-256 encrypted and prints MEMBER decrypted.
fn unzip_aes(zip: &Path, member: &str, password: &str) -> Unzipped {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/unzip_aes.py");
    let mut child = Command::new("/usr/bin/python3")
        .arg(script)
        .arg(zip)
        .arg(member)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("/usr/bin/python3 runs (.ci/setup installs it)");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(format!("{password}\n").as_bytes()).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let unzipped = Unzipped {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    // A test that needs pyzipper fails without it; it never skips.
    assert_ne!(unzipped.code, 3, "{}", unzipped.stderr);
    unzipped
}

/// `member` of `zip`, decrypted with `password`; and a wrong password
/// does not open it.
pub(crate) fn decrypt(zip: &Path, member: &str, password: &str) -> String {
    let right = unzip_aes(zip, member, password);
    assert_eq!(right.code, 0, "{}: {}", zip.display(), right.stderr);
    let wrong = unzip_aes(zip, member, &format!("{password}-wrong"));
    assert_eq!(
        wrong.code, 1,
        "a wrong password must fail: {}",
        wrong.stderr
    );
    assert!(wrong.stderr.contains("Bad password") || wrong.stderr.contains("HMAC"));
    right.stdout
}

/// Every file below `dir` (symlinks not followed).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                dirs.push(entry.path());
            } else if kind.is_file() {
                files.push(entry.path());
            }
        }
    }
    files
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// The password is in none of the nodes' files but their zips (`except`),
/// nor in their daemon logs (which include the plugins' log lines).
fn assert_nowhere_on_the_nodes(
    c: &TestCluster,
    coordinator: &str,
    password: &str,
    except: &[PathBuf],
) {
    let mut checked = Vec::new();
    for node in &c.nodes {
        let mut files = files_under(&node.data_dir);
        files.push(node.log_path.clone());
        for file in files.into_iter().filter(|f| !except.contains(f)) {
            let bytes = std::fs::read(&file).unwrap();
            assert!(
                !contains(&bytes, password),
                "the password is in {}",
                file.display()
            );
            checked.push(file);
        }
    }
    // Among them the coordinator's audit log and saved task.
    let data = &c.node(coordinator).data_dir;
    for file in [
        data.join("audit.log"),
        data.join("tasks").join("latest.json"),
    ] {
        assert!(checked.contains(&file), "{} in {checked:?}", file.display());
    }
}

async fn get_text(client: &ApiClient, path: &str) -> String {
    let (status, body) = client
        .request(Method::GET, path, None, true)
        .await
        .expect("the node answers");
    assert_eq!(status, StatusCode::OK, "{body}");
    body.to_string()
}

async fn start(admin: &ApiClient, params: Value) -> TaskStatus {
    let (status, body) = start_json(admin, params).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    serde_json::from_value(body).unwrap()
}

#[tokio::test]
async fn the_mock_encrypts_each_nodes_zip_and_the_password_goes_nowhere_else() {
    let c = cluster(&["n1", "n2"], |_| {}).await;
    let admin = c.admin("n1");
    let password = password();
    let started = start(
        &admin,
        json!({"nodes": "*", "encryptionPassword": password}),
    )
    .await;
    let task = wait_for_end(&admin, &started.task_id).await;
    assert_ended(&task, TaskState::Completed);

    let mut zips = Vec::new();
    for node in ["n1", "n2"] {
        let status = &task.per_node[node];
        assert_eq!(status.status, NodeState::Collected, "{node}: {status:?}");
        let zip = PathBuf::from(status.path.as_deref().unwrap());
        let output = decrypt(&zip, "output.txt", &password);
        assert_eq!(
            output,
            format!(
                "autocollect mock collection of node {node} for task {}\n",
                task.task_id
            )
        );
        let run = decrypt(&zip, "mock-run.txt", &password);
        assert!(run.starts_with(&format!("node={node}\n")), "{run}");
        // Encrypted for real: neither the text nor the password shows.
        let bytes = std::fs::read(&zip).unwrap();
        assert!(!contains(&bytes, "autocollect mock collection"));
        assert!(!contains(&bytes, &password));
        zips.push(zip);
    }

    // Not in the status (admin's or read-only's), the task list, or any
    // node's files and logs; the audit log has the name, masked.
    let reader = c.reader("n2");
    for text in [
        get_text(&admin, "/collectLogs/status").await,
        get_text(&reader, "/collectLogs/status").await,
        get_text(&reader, "/pools/default/tasks").await,
    ] {
        assert!(text.contains(&task.task_id), "{text}");
        assert!(!text.contains(&password), "{text}");
        assert!(!text.contains("encryptionPassword"), "{text}");
    }
    assert_nowhere_on_the_nodes(&c, "n1", &password, &zips);
    let audit = std::fs::read_to_string(c.node("n1").data_dir.join("audit.log")).unwrap();
    let line: Value = serde_json::from_str(audit.lines().next().unwrap()).unwrap();
    assert_eq!(line["params"]["encryptionPassword"], "*****", "{audit}");
    assert_eq!(line["result"], "accepted");
}

#[tokio::test]
async fn cbcollect_info_gets_the_password_on_stdin_never_in_its_argv_or_environment() {
    let records = tempfile::tempdir().unwrap();
    let c = cluster(&["n1"], |config| cbcollect(config, records.path(), &[])).await;
    let admin = c.admin("n1");
    let password = password();
    let started = start(
        &admin,
        json!({"nodes": "*", "encryptionPassword": password}),
    )
    .await;
    let task = wait_for_end(&admin, &started.task_id).await;
    let n1 = &task.per_node["n1"];
    assert_eq!(n1.status, NodeState::Collected, "{n1:?}");
    let zip = PathBuf::from(n1.path.as_deref().unwrap());
    let name = zip.file_name().unwrap().to_str().unwrap().to_string();

    let runs = recorded(records.path(), "n1");
    assert_eq!(
        runs.len(),
        2,
        "the run, then the password it read: {runs:?}"
    );
    let args = argv(&runs[0]);
    let tmp_dir = format!("/tmp/{}", task.task_id);
    assert!(
        args[3].starts_with("--tmp-dir=/") && args[3].ends_with(&tmp_dir),
        "{args:?}"
    );
    assert_eq!(
        args,
        [
            "--watch-stdin".to_string(),
            "--encrypt-unredacted".to_string(),
            "--use-stdin".to_string(),
            args[3].clone(),
            format!("--initargs={INITARGS}"),
            name.clone(),
        ]
    );
    let env = runs[0]["env"].as_object().unwrap();
    let mut keys: Vec<&str> = env.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, ["STANDIN_RECORD", "STANDIN_STEP_MS"]);
    // It read exactly the password, as one line on stdin...
    let digest = format!("{:x}", sha2::Sha256::digest(password.as_bytes()));
    assert_eq!(
        runs[1]["stdin_password"],
        json!({"length": password.len(), "sha256": digest})
    );
    // ...and nowhere else: the record holds its argv and environment.
    let record =
        std::fs::read_to_string(crate::cbcollect::record_of(records.path(), "n1")).unwrap();
    assert!(!record.contains(&password), "{record}");

    // The unredacted zip, encrypted with it; the stand-in's own log inside
    // shows its arguments, without the password.
    let couchbase = decrypt(&zip, "couchbase.log", &password);
    assert!(couchbase.contains("<ud>Administrator</ud>"), "{couchbase}");
    let log = decrypt(&zip, "cbcollect_info.log", &password);
    assert!(log.contains("--encrypt-unredacted"), "{log}");
    assert!(!log.contains(&password), "{log}");
    assert_nowhere_on_the_nodes(&c, "n1", &password, &[zip]);

    // With partial redaction the reported zip is the redacted one, which
    // --encrypt-unredacted leaves in clear (as with ns_server); the
    // encrypted unredacted zip goes with the job directory.
    let started = start(
        &admin,
        json!({"nodes": "*", "encryptionPassword": password, "logRedactionLevel": "partial"}),
    )
    .await;
    let task = wait_for_end(&admin, &started.task_id).await;
    let n1 = &task.per_node["n1"];
    assert_eq!(n1.status, NodeState::Collected, "{n1:?}");
    let redacted = PathBuf::from(n1.path.as_deref().unwrap());
    assert!(redacted.to_str().unwrap().ends_with("-n1-redacted.zip"));
    let argv = argv(&recorded(records.path(), "n1")[2]);
    assert!(
        argv.contains(&"--encrypt-unredacted".to_string()),
        "{argv:?}"
    );
    let not_encrypted = unzip_aes(&redacted, "couchbase.log", &password);
    assert_eq!(not_encrypted.code, 2, "{}", not_encrypted.stderr);
    let redacted_log = zip_member(&redacted, "couchbase.log");
    assert!(
        !redacted_log.contains("<ud>Administrator</ud>"),
        "{redacted_log}"
    );
    assert_nowhere_on_the_nodes(&c, "n1", &password, &[redacted]);
}

#[tokio::test]
async fn bad_encryption_passwords_get_field_keyed_errors_and_start_nothing() {
    let c = cluster(&["n1"], |_| {}).await;
    let admin = c.admin("n1");
    let long = "p".repeat(257);
    let cases = [
        (json!(""), "cannot be empty"),
        (json!(long), "must be at most 256 bytes"),
        (
            json!("two\nlines"),
            "must not contain line breaks or NUL characters (cbcollect_info reads it as one line)",
        ),
        (
            json!("cr\rhere"),
            "must not contain line breaks or NUL characters (cbcollect_info reads it as one line)",
        ),
        (json!(["a", "list"]), "Must be a string"),
    ];
    for (value, message) in &cases {
        let (status, body) =
            start_json(&admin, json!({"nodes": "*", "encryptionPassword": value})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{value}: {body}");
        assert_eq!(body, json!({"encryptionPassword": message}), "{value}");
    }
    // Couchbase's route, form-encoded, with every problem at once.
    let form = |pairs: &[(&str, &str)]| {
        RequestBody::Form(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    };
    let (status, body) = admin
        .request(
            Method::POST,
            "/controller/startLogsCollection",
            Some(form(&[
                ("nodes", "ghost"),
                ("encryptionPassword", &"q".repeat(300)),
            ])),
            true,
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body,
        json!({"nodes": "Unknown nodes: [\"ghost\"]",
               "encryptionPassword": "must be at most 256 bytes"})
    );
    // 256 bytes is fine; so is any other text on one line.
    let (status, body) = start_json(
        &admin,
        json!({"nodes": "*", "encryptionPassword": "é".repeat(128)}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    wait_for_end(&admin, body["taskId"].as_str().unwrap()).await;

    // Refused starts are audited, the password masked.
    let audit = std::fs::read_to_string(c.node("n1").data_dir.join("audit.log")).unwrap();
    assert_eq!(audit.lines().count(), cases.len() + 2, "{audit}");
    for line in audit.lines() {
        let line: Value = serde_json::from_str(line).unwrap();
        assert_eq!(line["params"]["encryptionPassword"], "*****", "{line}");
    }
    for secret in ["two\\nlines", "cr\\rhere", &long[..100], "éééé"] {
        assert!(!audit.contains(secret), "{secret} in {audit}");
    }
}

#[tokio::test]
async fn collect_logs_start_takes_an_encryption_password() {
    let c = cluster(&["n1", "n2"], |_| {}).await;
    let password = password();
    let run = couchbase_cli(
        &c,
        "n2",
        &[
            "collect-logs-start",
            "--all-nodes",
            "--wait",
            "--encryption-password",
            &password,
        ],
    )
    .await;
    let stdout = run.stdout;
    assert_eq!(run.code, 0, "{stdout}");
    assert!(
        stdout.ends_with("SUCCESS: Log collection completed\n"),
        "{stdout}"
    );
    assert!(!stdout.contains(&password), "{stdout}");

    let task = c.admin("n1").status().await.unwrap().unwrap();
    let mut zips = Vec::new();
    for node in ["n1", "n2"] {
        let zip = PathBuf::from(task.per_node[node].path.as_deref().unwrap());
        let output = decrypt(&zip, "output.txt", &password);
        assert!(output.contains(&format!("node {node}")), "{output}");
        zips.push(zip);
    }
    assert_nowhere_on_the_nodes(&c, "n2", &password, &zips);

    // couchbase-cli's own refusal, through the same command.
    let run = couchbase_cli(
        &c,
        "n1",
        &[
            "collect-logs-start",
            "--all-nodes",
            "--encryption-password",
            "",
        ],
    )
    .await;
    assert_eq!(run.code, 1);
    assert_eq!(run.stdout, "ERROR: encryptionPassword - cannot be empty\n");
}

#[tokio::test]
async fn a_collector_that_ignores_the_encryption_password_fails_instead_of_leaking() {
    let c = cluster(&["n1", "n2"], |config| {
        if config.node == "n2" {
            // Returns at once without reading the request's parameters.
            config.collector.plugin = misbehave_plugin();
            config.collector.options.clear();
            config
                .collector
                .options
                .insert("mode".into(), "noop".into());
        }
    })
    .await;
    let admin = c.admin("n1");
    let password = password();
    let started = start(
        &admin,
        json!({"nodes": "*", "encryptionPassword": password}),
    )
    .await;
    let task = wait_for_end(&admin, &started.task_id).await;
    let n1 = &task.per_node["n1"];
    assert_eq!(n1.status, NodeState::Collected, "{n1:?}");
    let n2 = &task.per_node["n2"];
    assert_eq!(n2.status, NodeState::Failed, "{n2:?}");
    let output = n2.collection_output.as_deref().unwrap();
    assert!(output.contains("ignored encryptionPassword"), "{output}");
    assert!(!output.contains(&password), "{output}");
    // Its output is gone with the failed job.
    assert!(!job_dir(&c, "n2", &task.task_id).exists());
    assert!(!result_dir(&c, "n2", &task.task_id).exists());
}
