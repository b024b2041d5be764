//! The couchbase-cli style commands of the `autocollect` binary, run as a
//! user runs them against a live cluster: output and exit codes.

use crate::support::*;
use crate::upload_server::UploadServer;

#[tokio::test]
async fn start_with_wait_follows_the_collection_to_its_end_then_status_shows_it() {
    let server = UploadServer::start().await;
    let c = cluster(&["n1", "n2"], |config| config.upload.allow_http = true).await;
    let host = server.host();
    let run = couchbase_cli(
        &c,
        "n1",
        &[
            "collect-logs-start",
            "--all-nodes",
            "--upload",
            "--upload-host",
            &host,
            "--customer",
            "acme",
            "--ticket",
            "42",
            "--wait",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stdout);
    assert!(
        run.stdout.ends_with("SUCCESS: Log collection completed\n"),
        "{}",
        run.stdout
    );
    for node in ["n1", "n2"] {
        let row = format!("  {node}    uploaded   {host}/acme/42/collectinfo-");
        assert!(run.stdout.contains(&row), "{row:?} in\n{}", run.stdout);
    }
    assert_eq!(server.received().len(), 2);

    let run = couchbase_cli(&c, "n2", &["collect-logs-status"]).await;
    assert_eq!(run.code, 0);
    assert!(
        run.stdout.starts_with("Status: completed\nDetails:\n"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("\tNode: n1\n\tStatus: uploaded\n\t path : "),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains(&format!("\t url : {host}/acme/42/collectinfo-")),
        "{}",
        run.stdout
    );
}

#[tokio::test]
async fn start_status_and_stop_print_success_and_errors_like_couchbase_cli() {
    let c = cluster(&["n1"], |config| {
        set_option(config, "delay-ms", 60_000i64);
    })
    .await;
    let run = couchbase_cli(&c, "n1", &["collect-logs-status"]).await;
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (0, "No log collection tasks were found\n")
    );
    let run = couchbase_cli(&c, "n1", &["collect-logs-start"]).await;
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (1, "ERROR: Must specify either --all-nodes or --nodes\n")
    );
    let run = couchbase_cli(&c, "n1", &["collect-logs-start", "--nodes", "ghost"]).await;
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (1, "ERROR: nodes - Unknown nodes: [\"ghost\"]\n")
    );
    let run = couchbase_cli(&c, "n1", &["collect-logs-start", "--all-nodes", "--upload"]).await;
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (
            1,
            "ERROR: --upload-host is required when --upload is specified\n"
        )
    );

    let run = couchbase_cli(&c, "n1", &["collect-logs-start", "--nodes", "n1"]).await;
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (0, "SUCCESS: Log collection started\n")
    );
    let run = couchbase_cli(&c, "n1", &["collect-logs-start", "--all-nodes"]).await;
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (1, "ERROR: Logs collection task is already started\n")
    );
    let run = couchbase_cli(&c, "n1", &["collect-logs-status"]).await;
    assert!(
        run.stdout.starts_with("Status: running\n"),
        "{}",
        run.stdout
    );
    let run = couchbase_cli(&c, "n1", &["collect-logs-stop"]).await;
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (0, "SUCCESS: Log collection stopped\n")
    );
    let run = couchbase_cli(&c, "n1", &["collect-logs-status"]).await;
    assert!(
        run.stdout.starts_with("Status: cancelled\n"),
        "{}",
        run.stdout
    );
}

#[tokio::test]
async fn status_shows_a_failed_collection_with_its_code_and_output() {
    let c = cluster(&["n1"], |config| {
        set_option(config, "result", 3i64);
        set_option(config, "output", "disk on fire");
    })
    .await;
    let started = c.admin("n1").start("all").await.unwrap();
    wait_for_end(&c.admin("n1"), &started.task_id).await;
    let run = couchbase_cli(&c, "n1", &["collect-logs-status"]).await;
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (
            0,
            "Status: completed\nDetails:\n\tNode: n1\n\tStatus: failed\n\
             \t collectionStatusCode : 3\n\t collectionOutput : disk on fire\n\n"
        )
    );
}
