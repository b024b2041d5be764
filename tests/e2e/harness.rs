//! The plugin authors' test harness (`autocollect::testing`) on the
//! built-in plugins: `cbcollect` against a scripted `cbcollect_info`
//! (arguments, the password on stdin, a failure's status and output), the
//! `files` collector over input grants, and `http-uploader` to a real
//! HTTPS server; each run's logs, progress and receipt.

use std::io::Write;

use autocollect::plugin::collector::RunError;
use autocollect::testing::{Collection, Exit, ScriptedRun, Upload};

use crate::upload_server::UploadServer;

const CBCOLLECT_INFO: &str = "/opt/couchbase/bin/cbcollect_info";

/// What `cbcollect_info` would do: write the zip it was named (the
/// argument ending in `.zip`) into its working directory.
fn fake_cbcollect_info(call: &autocollect::testing::ExecCall) -> ScriptedRun {
    let zip = call.args.iter().find(|a| a.ends_with(".zip")).unwrap();
    let file = std::fs::File::create(call.cwd.join(zip)).unwrap();
    let mut writer = zip::ZipWriter::new(file);
    writer
        .start_file("couchbase.log", zip::write::SimpleFileOptions::default())
        .unwrap();
    writer.write_all(b"all good\n").unwrap();
    writer.finish().unwrap();
    ScriptedRun::ok(["Checking for running processes", "Zipping up the files"])
}

#[tokio::test]
async fn cbcollect_runs_against_a_scripted_cbcollect_info() {
    let report = Collection::new("builtin:cbcollect")
        .option("program", CBCOLLECT_INFO)
        .exec_allow(CBCOLLECT_INFO)
        .parameter("encryption-password", "s3cret-zip")
        .unwrap()
        .script(fake_cbcollect_info)
        .run()
        .await
        .unwrap();
    let collected = report.outcome.as_ref().expect("collected");
    assert_eq!(report.artifacts.len(), 1);
    assert!(report.artifacts[0].exists());
    assert_eq!(
        crate::support::zip_member(&report.artifacts[0], "couchbase.log"),
        "all good\n"
    );

    // The program was started as ns_server starts it, the password on
    // its stdin only.
    let call = &report.exec_calls[0];
    assert_eq!(call.call.program, CBCOLLECT_INFO);
    assert!(call.call.args.contains(&"--watch-stdin".to_string()));
    assert!(call.call.args.contains(&"--encrypt-unredacted".to_string()));
    assert!(!call.call.args.iter().any(|a| a.contains("s3cret-zip")));
    assert_eq!(*call.stdin.lock().unwrap(), b"s3cret-zip\n");

    // Progress counted its output lines; the receipt records the program.
    assert_eq!(
        report.progress.last().unwrap().message,
        "Zipping up the files"
    );
    let receipt = report.receipt.as_ref().unwrap();
    assert_eq!(receipt.exec[0].program, CBCOLLECT_INFO);
    assert_eq!(receipt.parameters["encryptionPassword"], "*****");
    assert_eq!(receipt.plugin.source, "builtin:cbcollect");
    assert_eq!(collected.exec_runs[0].exit, Some(Exit::Code(0)));
    assert_eq!(report.plugin.role, "collector");
}

#[tokio::test]
async fn cbcollect_reports_a_failing_cbcollect_info_with_its_status_and_output() {
    let report = Collection::new("builtin:cbcollect")
        .option("program", CBCOLLECT_INFO)
        .exec_allow(CBCOLLECT_INFO)
        .script(|_| ScriptedRun::fails(2, ["Error: no initargs"]))
        .run()
        .await
        .unwrap();
    match &report.outcome {
        Err(RunError::Failed {
            status_code,
            output,
        }) => {
            assert_eq!(*status_code, 2);
            assert!(output.contains("Error: no initargs"), "{output}");
        }
        other => panic!("{other:?}"),
    }
    assert!(report.receipt.is_none());

    // Not allow-listed: nothing starts, and the plugin says why.
    let report = Collection::new("builtin:cbcollect")
        .option("program", CBCOLLECT_INFO)
        .script(fake_cbcollect_info)
        .run()
        .await
        .unwrap();
    assert!(report.exec_calls.is_empty());
    let error = format!("{:?}", report.outcome.err().unwrap());
    assert!(error.contains("exec_allow"), "{error}");
}

#[tokio::test]
async fn the_files_collector_reads_its_grants_and_reports_each_step() {
    let logs = tempfile::tempdir().unwrap();
    std::fs::write(logs.path().join("a.log"), "a\n").unwrap();
    std::fs::write(logs.path().join("b.txt"), "b\n").unwrap();
    let report = Collection::new("builtin:files")
        .input("logs", logs.path())
        .option("include", "logs/*.log")
        .run()
        .await
        .unwrap();
    assert!(report.outcome.is_ok(), "{:?}", report.outcome);
    let zip = &report.artifacts[0];
    assert_eq!(crate::support::zip_member(zip, "logs/a.log"), "a\n");
    assert!(report.logged("1 files selected"), "{:?}", report.logs);
    assert_eq!(report.progress.last().unwrap().message, "1 of 1 files");
    let receipt = report.receipt.unwrap();
    assert_eq!(receipt.grants[0].files_added, Some(1));

    // A bad option is the plugin's own field error, before any run.
    let report = Collection::new("builtin:files")
        .option("compression", "zstd")
        .run()
        .await
        .unwrap();
    assert!(
        matches!(&report.outcome, Err(RunError::InvalidOption { key, .. }) if key == "compression"),
        "{:?}",
        report.outcome
    );
    // An unknown start parameter is refused by the harness itself.
    assert!(
        Collection::new("builtin:files")
            .parameter("nope", "1")
            .is_err()
    );
}

#[tokio::test]
async fn the_http_uploader_sends_a_file_to_a_real_https_server() {
    let server = UploadServer::start_tls().await;
    let ca = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca.path(), server.ca_pem()).unwrap();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), vec![7u8; 300_000]).unwrap();
    let url = format!("{}/Cust/1/bundle.zip", server.host());
    let report = Upload::new("builtin:http-uploader")
        .ca_file(ca.path())
        .run(file.path(), &url)
        .await
        .unwrap();
    let receipt = report.outcome.expect("uploaded");
    assert_eq!((receipt.status, receipt.bytes_sent), (200, 300_000));
    assert_eq!(server.received()[0].size, 300_000);
    assert_eq!(report.progress.last().unwrap().done, 300_000);
    assert_eq!(report.plugin.role, "uploader");
}

/// The mock's zip, small (put together in memory, one write) and large
/// (streamed in 64 KiB chunks): either way a valid zip of the size the
/// plugin reported, holding its entries whole.
#[tokio::test]
async fn the_mock_writes_a_whole_zip_in_memory_or_streamed() {
    for size in [0u64, 3 << 20] {
        let report = Collection::new("builtin:mock-collector")
            .option("output", "hello from the mock\n")
            .option("artifact-size", size.to_string())
            .run()
            .await
            .unwrap();
        let collected = report.outcome.as_ref().expect("collected");
        let path = &report.artifacts[0];
        let on_disk = std::fs::metadata(path).unwrap().len();
        assert_eq!(collected.artifacts[0].size, on_disk, "size {size}");
        assert_eq!(
            crate::support::zip_member(path, "output.txt"),
            "hello from the mock\n"
        );
        assert!(crate::support::zip_member(path, "mock-run.txt").contains("node="));
        let mut zip = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
        let payload = zip.by_name("payload.bin").map(|e| e.size()).ok();
        match size {
            0 => assert_eq!(payload, None),
            _ => {
                let payload = payload.expect("a payload entry");
                assert!(on_disk.abs_diff(size) < 1024, "{on_disk} for {size}");
                assert!(payload > size - 1024, "{payload} for {size}");
            }
        }
    }
}
