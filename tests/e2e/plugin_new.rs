//! `autocollect plugin new`: a project outside the repository, built with
//! its one command (`./build.sh`), runs with `autocollect plugin run`, in
//! Rust (collector and uploader, on the vendored SDK), Python and
//! JavaScript.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::*;
use crate::upload_server::UploadServer;

/// `plugin new ARGS` in `dir`; the project's directory.
async fn new(dir: &Path, name: &str, args: &[&str]) -> PathBuf {
    let mut all = vec!["plugin", "new", name, "--dir", dir.to_str().unwrap()];
    all.extend_from_slice(args);
    let run = autocollect_cli(&all).await;
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    dir.join(name)
}

/// Its `./build.sh`, with `env`; must succeed.
fn build(project: &Path, env: &[(&str, &Path)]) {
    let mut command = Command::new(project.join("build.sh"));
    // As a plugin author runs it: not under the lint wrapper .ci/test
    // sets for this repository's own build.
    command
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CLIPPY_ARGS");
    for (k, v) in env {
        command.env(k, v);
    }
    let out = command.output().expect("run build.sh");
    assert!(
        out.status.success(),
        "{} failed:\n{}\n{}",
        project.join("build.sh").display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn runs_and_collects(wasm: &Path) {
    assert!(wasm.exists(), "{} was not built", wasm.display());
    let run = autocollect_cli(&["plugin", "run", wasm.to_str().unwrap()]).await;
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("outcome:   collected"),
        "{}",
        run.stdout
    );
}

#[tokio::test]
async fn a_new_rust_collector_and_uploader_build_and_run_outside_the_repository() {
    let dir = tempfile::tempdir().unwrap();
    // The target directory this repository's plugins were built in (by
    // host/build.rs and .ci/test): the project's Cargo.lock pins the
    // versions they were built with, so the SDK's dependencies
    // (wit-bindgen and what it uses) are not compiled again. The project,
    // its vendored SDK and its lock are still its own, outside the
    // repository.
    let target = autocollect::plugin::builtin::plugins_target_dir();
    assert!(
        target
            .join("wasm32-wasip2/release/mock_collector.wasm")
            .exists(),
        "{} is not where the plugins were built",
        target.display()
    );
    let collector = new(dir.path(), "my-collector", &[]).await;
    assert!(
        collector
            .join("vendor/autocollect-sdk/wit/collector.wit")
            .exists()
    );
    let lock = std::fs::read_to_string(collector.join("Cargo.lock")).expect("a Cargo.lock");
    build(&collector, &[("CARGO_TARGET_DIR", target)]);
    assert_eq!(
        std::fs::read_to_string(collector.join("Cargo.lock")).unwrap(),
        lock,
        "cargo changed the Cargo.lock that plugin new wrote: it is stale or out of order"
    );
    runs_and_collects(&target.join("wasm32-wasip2/release/my_collector.wasm")).await;

    let uploader = new(dir.path(), "my-uploader", &["--uploader"]).await;
    let lock = std::fs::read_to_string(uploader.join("Cargo.lock")).expect("a Cargo.lock");
    build(&uploader, &[("CARGO_TARGET_DIR", target)]);
    assert_eq!(
        std::fs::read_to_string(uploader.join("Cargo.lock")).unwrap(),
        lock
    );
    let wasm = target.join("wasm32-wasip2/release/my_uploader.wasm");
    let server = UploadServer::start_tls().await;
    let ca = server.write_ca(dir.path());
    let file = dir.path().join("bundle.zip");
    std::fs::write(&file, vec![3u8; 4096]).unwrap();
    let run = autocollect_cli(&[
        "plugin",
        "run",
        wasm.to_str().unwrap(),
        "--artifact",
        file.to_str().unwrap(),
        "--upload-url",
        &format!("{}/Cust/9/bundle.zip", server.host()),
        "--cacert",
        ca.to_str().unwrap(),
    ])
    .await;
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert_eq!(server.received()[0].size, 4096);
}

#[tokio::test]
async fn a_new_python_collector_builds_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let project = new(dir.path(), "py-plugin", &["--lang", "python"]).await;
    build(&project, &[]);
    runs_and_collects(&project.join("py_plugin.wasm")).await;
}

#[tokio::test]
async fn a_new_javascript_collector_builds_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let project = new(dir.path(), "js-plugin", &["--lang", "js"]).await;
    build(&project, &[]);
    runs_and_collects(&project.join("js_plugin.wasm")).await;
}

#[tokio::test]
async fn plugin_new_refuses_bad_names_existing_directories_and_what_it_cannot_make() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let run = autocollect_cli(&["plugin", "new", "Bad/Name", "--dir", d]).await;
    assert_eq!(run.code, 1);
    assert!(
        run.stderr
            .contains("a plugin name is 1 to 64 lowercase letters"),
        "{}",
        run.stderr
    );
    std::fs::create_dir(dir.path().join("taken")).unwrap();
    let run = autocollect_cli(&["plugin", "new", "taken", "--dir", d]).await;
    assert!(run.stderr.contains("already exists"), "{}", run.stderr);
    let run = autocollect_cli(&[
        "plugin",
        "new",
        "up",
        "--lang",
        "js",
        "--uploader",
        "--dir",
        d,
    ])
    .await;
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("use --lang rust"), "{}", run.stderr);
}
