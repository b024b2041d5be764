//! `GET /openapi.json`: the OpenAPI 3.1 document a live daemon serves is
//! valid (`openapi-spec-validator`), and the daemon keeps to it when
//! `schemathesis` fuzzes every operation (no 5xx, no status, content type,
//! header or body the document does not allow). Both tools come from pip
//! (.ci/setup); a missing one fails the test.

use reqwest::StatusCode;
use serde_json::Value;

use crate::support::*;

async fn fetch_document(c: &TestCluster) -> Value {
    let url = format!("{}/openapi.json", c.node("n1").url());
    // No credentials: the document is public.
    let response = c.http_client(None).get(&url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.expect("JSON")
}

async fn python(args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new("/usr/bin/python3")
        .args(args)
        .output()
        .await
        .expect("/usr/bin/python3");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn the_openapi_document_is_valid_and_covers_every_public_route() {
    let c = cluster(&["n1"], |_| {}).await;
    let doc = fetch_document(&c).await;
    assert_eq!(doc["openapi"], "3.1.0");
    for path in [
        "/collectLogs/start",
        "/collectLogs/status",
        "/collectLogs/cancel",
        "/collectLogs/events",
        "/whoami",
        "/health",
        "/metrics",
        "/admin/reload",
        "/openapi.json",
        "/controller/startLogsCollection",
        "/controller/cancelLogsCollection",
        "/pools",
        "/pools/default",
        "/pools/default/tasks",
        "/settings/logRedaction",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} is not described");
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, doc.to_string()).unwrap();
    let (ok, output) = python(&[
        "-c",
        "import json, sys\n\
         from openapi_spec_validator import validate\n\
         from openapi_spec_validator.validation.validators import OpenAPIV31SpecValidator\n\
         validate(json.load(open(sys.argv[1])), cls=OpenAPIV31SpecValidator)\n\
         print('valid')",
        &file.display().to_string(),
    ])
    .await;
    assert!(
        ok,
        "openapi-spec-validator (pip; .ci/setup installs it):\n{output}"
    );
}

/// What schemathesis checks: no 5xx, no status, content type, header or
/// body that the document does not allow, and 405 for methods a route
/// does not have. Not `negative_data_rejection`: the fuzzed copy's
/// `maximum: 1` on the waits is the test's, not the API's (which accepts
/// up to 60 and caps larger ones), so the API rightly accepts what that
/// copy calls invalid. Not `ignored_auth`: it wants
/// 401 or 403 for every request with wrong credentials, but after five
/// failures from one address the sign-in throttle answers 429 (as
/// documented, and as intended: see SECURITY.md); that routes refuse
/// requests without credentials is tested in `api_errors` and
/// `hostile_client`.
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
                      response_headers_conformance,response_schema_conformance,unsupported_method";

/// Schemathesis's boundary and negative cases (its `examples` and
/// `coverage` phases).
#[tokio::test]
async fn schemathesis_coverage_finds_no_server_error_and_no_answer_off_the_document() {
    schemathesis("examples,coverage").await;
}

/// Schemathesis's generated cases (its `fuzzing` phase). A test of its
/// own so that both halves run side by side.
#[tokio::test]
async fn schemathesis_fuzzing_finds_no_server_error_and_no_answer_off_the_document() {
    schemathesis("fuzzing").await;
}

/// Run schemathesis's `phases` against a fresh daemon.
async fn schemathesis(phases: &str) {
    // The mock collector finishes at once, so a start that the fuzzer
    // gets right costs little.
    let c = cluster(&["n1"], |_| {}).await;
    let mut doc = fetch_document(&c).await;
    // The long-polls (`status?since=&wait=`, `health?waitIdle=`) may wait
    // up to 60 s each by design; the fuzzed copy bounds their waits to
    // 1 s so that 20 examples per operation stay quick, and requires
    // `wait`, so that a generated status request with `since` does not
    // take the default 30 s (the coverage phase still sends one without
    // it, as a negative case, which does). Nothing else is changed, and
    // only the event stream is left out: it never ends (its own tests are
    // in `events`).
    doc["paths"]
        .as_object_mut()
        .unwrap()
        .remove("/collectLogs/events");
    for (path, name) in [("/collectLogs/status", "wait"), ("/health", "waitIdle")] {
        for p in doc["paths"][path]["get"]["parameters"]
            .as_array_mut()
            .unwrap()
        {
            if p["name"] == name {
                p["schema"]["maximum"] = 1.into();
                if name == "wait" {
                    p["required"] = true.into();
                }
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, doc.to_string()).unwrap();
    let base = c.node("n1").url();
    let auth = format!("admin:{}", c.admin_password);
    let out = tokio::process::Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import sys; from schemathesis.cli import schemathesis; sys.argv[0] = 'st'; sys.exit(schemathesis())",
            "run",
            &file.display().to_string(),
            "--url",
            &base,
            "--auth",
            &auth,
            "--tls-verify",
            &c.ca_file.display().to_string(),
            "--checks",
            CHECKS,
            "--max-examples",
            "20",
            "--phases",
            phases,
            "--workers",
            "1",
            "--seed",
            "1",
            "--no-color",
            // Above the daemon's longest long-poll (60 s): a status
            // request with `since` and no `wait` waits the default 30 s,
            // and a 30 s timeout raced it (a loaded machine can lose).
            "--request-timeout",
            "75",
        ])
        .current_dir(dir.path())
        .output()
        .await
        .expect("/usr/bin/python3");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "schemathesis (pip; .ci/setup installs it) found problems:\n{report}"
    );
    // And the daemon is still alive.
    let health = c.admin("n1").health().await.expect("the daemon answers");
    assert_eq!(health["status"], "ok");
}
