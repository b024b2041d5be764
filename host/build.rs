//! Builds the plugin workspace (`plugins/`) for `wasm32-wasip2` and copies
//! the components into `OUT_DIR`, where `src/plugin/builtin.rs` embeds them.
//!
//! The nested cargo uses its own target directory (`target/wasm-plugins`),
//! so it never waits on the lock the outer build holds, and an environment
//! scrubbed of the outer build's settings (flags, wrappers such as
//! clippy-driver, target overrides).

use std::env;
use std::path::PathBuf;
use std::process::Command;

/// Components copied to OUT_DIR. `cbcollect`, `files_collector`,
/// `http_uploader` and `mock_collector` are embedded in the binary;
/// `template_uploader` and the `test_*` ones are only exposed to tests and
/// benchmarks by path.
const PLUGINS: &[&str] = &[
    "cbcollect",
    "files_collector",
    "http_uploader",
    "mock_collector",
    "template_uploader",
    "test_hostile_uploader",
    "test_misbehave",
    "test_noop",
];

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap().to_path_buf();
    let plugins = root.join("plugins");
    let target_dir = root.join("target").join("wasm-plugins");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap());

    println!(
        "cargo:rerun-if-changed={}",
        plugins.join("Cargo.toml").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        plugins.join("Cargo.lock").display()
    );
    println!("cargo:rerun-if-changed={}", root.join("wit").display());
    for entry in std::fs::read_dir(&plugins).expect("read plugins/") {
        let path = entry.unwrap().path();
        // plugins/examples/ holds plugins in other languages (and their
        // node_modules), built by plugins/examples/build.sh, not by cargo.
        if path.is_dir() && !path.ends_with("examples") {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&plugins)
        .args(["build", "--release", "--target", "wasm32-wasip2"])
        .arg("--target-dir")
        .arg(&target_dir);
    if env::var_os("CARGO_NET_OFFLINE").is_some() {
        cmd.arg("--offline");
    }
    for var in [
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "CARGO_MAKEFLAGS",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_PROFILE_RELEASE_DEBUG",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("spawn cargo for plugins/");
    if !status.success() {
        panic!(
            "building plugins/ for wasm32-wasip2 failed ({status}). \
             Is the target installed? Run: rustup target add wasm32-wasip2"
        );
    }

    let built = target_dir.join("wasm32-wasip2").join("release");
    for name in PLUGINS {
        let from = built.join(format!("{name}.wasm"));
        let to = out_dir.join(format!("{name}.wasm"));
        std::fs::copy(&from, &to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
    }
    println!(
        "cargo:rustc-env=AUTOCOLLECT_PLUGIN_DIR={}",
        out_dir.display()
    );
    println!(
        "cargo:rustc-env=AUTOCOLLECT_PLUGIN_TARGET_DIR={}",
        target_dir.display()
    );
}
