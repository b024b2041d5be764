//! The Rust project `plugin new --lang rust` writes: the template
//! collector (or uploader) as its own crate, depending on a vendored copy
//! of the SDK (`plugins/sdk`, embedded here; its WIT, under
//! `vendor/autocollect-sdk/wit/`, is written by the caller).

/// The SDK crate's files, as `vendor/autocollect-sdk/...`.
const SDK: &[(&str, &str)] = &[
    (
        "Cargo.toml",
        include_str!("../../../plugins/sdk/Cargo.toml"),
    ),
    ("README.md", include_str!("../../../plugins/sdk/README.md")),
    (
        "src/lib.rs",
        include_str!("../../../plugins/sdk/src/lib.rs"),
    ),
    (
        "src/error.rs",
        include_str!("../../../plugins/sdk/src/error.rs"),
    ),
    (
        "src/log.rs",
        include_str!("../../../plugins/sdk/src/log.rs"),
    ),
    (
        "src/options.rs",
        include_str!("../../../plugins/sdk/src/options.rs"),
    ),
    (
        "src/progress.rs",
        include_str!("../../../plugins/sdk/src/progress.rs"),
    ),
    (
        "src/rfc3339.rs",
        include_str!("../../../plugins/sdk/src/rfc3339.rs"),
    ),
    (
        "src/task.rs",
        include_str!("../../../plugins/sdk/src/task.rs"),
    ),
    (
        "src/units.rs",
        include_str!("../../../plugins/sdk/src/units.rs"),
    ),
];

const COLLECTOR: &str = include_str!("../../../plugins/template-collector/src/lib.rs");
const UPLOADER: &str = include_str!("../../../plugins/template-uploader/src/lib.rs");

/// Files relative to the project's root (the WIT aside).
pub fn files(name: &str, uploader: bool) -> Vec<(String, String)> {
    let krate = name.replace('-', "_");
    let wasm = format!("target/wasm32-wasip2/release/{krate}.wasm");
    let mut files: Vec<(String, String)> = SDK
        .iter()
        .map(|(rel, text)| (format!("vendor/autocollect-sdk/{rel}"), text.to_string()))
        .collect();
    let role = if uploader { "uploader" } else { "collector" };
    files.push((
        "Cargo.toml".into(),
        format!(
            "[package]\n\
             name = \"{name}\"\n\
             version = \"0.1.0\"\n\
             edition = \"2024\"\n\
             publish = false\n\n\
             # A WASI preview 2 component is built from a cdylib.\n\
             [lib]\n\
             crate-type = [\"cdylib\"]\n\n\
             [dependencies]\n\
             # The plugin contract's bindings, the export macro, typed options\n\
             # and helpers: the SDK, vendored by `autocollect plugin new`.\n\
             autocollect-sdk = {{ path = \"vendor/autocollect-sdk\" }}\n\n\
             [profile.release]\n\
             opt-level = \"s\"\n\
             lto = true\n\
             codegen-units = 1\n\
             strip = true\n\
             panic = \"abort\"\n\n\
             [workspace]\n"
        ),
    ));
    files.push((
        "src/lib.rs".into(),
        if uploader { UPLOADER } else { COLLECTOR }.to_string(),
    ));
    files.push((
        "build.sh".into(),
        format!(
            "#!/usr/bin/env bash\n\
             # Build {wasm} (needs: rustup target add wasm32-wasip2).\n\
             set -euo pipefail\n\
             cd \"$(dirname \"$0\")\"\n\
             cargo build --release --target wasm32-wasip2\n\
             echo \"built $(pwd)/{wasm}\"\n"
        ),
    ));
    files.push((
        "README.md".into(),
        format!(
            "# {name}\n\n\
             An autocollect {role} in Rust, made by `autocollect plugin new {name}`.\n\
             `src/lib.rs` is a working {role} to change; `vendor/autocollect-sdk`\n\
             is the SDK (its guide: `vendor/autocollect-sdk/README.md`), and\n\
             `vendor/autocollect-sdk/wit` the contract it builds against.\n\n\
             ```sh\n\
             rustup target add wasm32-wasip2              # once\n\
             ./build.sh                                   # -> {wasm}\n\
             autocollect plugin run {wasm}{run_args}\n\
             autocollect plugin check {wasm}\n\
             ```\n",
            run_args = if uploader {
                " --artifact FILE --upload-url https://HOST/PATH"
            } else {
                ""
            }
        ),
    ));
    files
}
