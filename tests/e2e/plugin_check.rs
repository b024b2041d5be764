//! `autocollect plugin check FILE`: the real plugins built from
//! `plugins/`, files that are not components, a component built against a
//! later contract; and the daemon refusing a plugin in the wrong role with
//! the same words.

use std::path::{Path, PathBuf};

use autocollect::plugin::WIT_VERSION;
use autocollect::plugin::builtin::build_output;

use crate::support::*;

fn plugin(stem: &str) -> String {
    build_output(stem).display().to_string()
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    autocollect::hex(&sha2::Sha256::digest(bytes))
}

/// `autocollect plugin check ARGS`, with stdout and stderr together.
async fn check(args: &[&str]) -> (i32, String) {
    let run = autocollect_cli(&[&["plugin", "check"], args].concat()).await;
    (run.code, format!("{}{}", run.stdout, run.stderr))
}

#[tokio::test]
async fn plugin_check_describes_a_runnable_collector() {
    let file = plugin("mock_collector");
    let (code, out) = check(&[&file, "--option", "delay-ms=5"]).await;
    assert_eq!(code, 0, "{out}");
    let bytes = std::fs::read(&file).unwrap();
    for want in [
        format!("size:          {} bytes", bytes.len()),
        format!("sha256:        {}", sha256_hex(&bytes)),
        format!("world:         collector (exports autocollect:plugin/collect@{WIT_VERSION})"),
        format!("built against: autocollect:plugin {WIT_VERSION}"),
        format!("  autocollect:plugin/log@{WIT_VERSION}"),
        "  wasi:io/streams@".to_string(),
        format!("this daemon:   autocollect:plugin {WIT_VERSION}: runs plugins built against "),
        "runnable:      yes, as a collector".to_string(),
        "options:       valid (1 option, by its validate-options)".to_string(),
    ] {
        assert!(out.contains(&want), "{want:?} in\n{out}");
    }
}

#[tokio::test]
async fn plugin_check_describes_a_runnable_uploader() {
    let (code, out) = check(&[&plugin("http_uploader")]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("runnable:      yes, as an uploader"), "{out}");
    assert!(out.contains("  wasi:http/outgoing-handler@"), "{out}");
}

#[tokio::test]
async fn plugin_check_shows_what_validate_options_rejects() {
    let (code, out) = check(&[&plugin("mock_collector"), "--option", "bogus=1"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("runnable:      yes, as a collector"), "{out}");
    assert!(out.contains("options:       rejected (1 option)"), "{out}");
    assert!(
        out.contains("error: validate-options: invalid option \"bogus\": "),
        "{out}"
    );
}

#[tokio::test]
async fn plugin_check_names_the_role_a_plugin_has_and_the_one_it_lacks() {
    let uploader = plugin("http_uploader");
    let (code, out) = check(&[&uploader, "--role", "collector"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "error: {uploader}: this is an uploader; [collector] needs a component exporting \
             autocollect:plugin/collect"
        )),
        "{out}"
    );
    let collector = plugin("mock_collector");
    let (code, out) = check(&[&collector, "--role", "uploader"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "error: {collector}: this is a collector; [uploader] needs a component exporting \
             autocollect:plugin/upload"
        )),
        "{out}"
    );
}

#[tokio::test]
async fn plugin_check_says_what_a_file_that_is_no_component_is() {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, bytes: &[u8]| -> String {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path.display().to_string()
    };
    let random: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let cases = [
        (
            file("core.wasm", b"\0asm\x01\0\0\0"),
            "is a core WebAssembly module, not a component: build for wasm32-wasip2",
        ),
        (file("random.wasm", &random), "is not WebAssembly"),
        (
            file("empty.wasm", b""),
            "is empty: a plugin is a WebAssembly component",
        ),
        (
            // A component header, then garbage: wasmtime's own words.
            file("garbage.wasm", b"\0asm\x0d\0\x01\0\xff\xff\xff\xff"),
            "loading plugin",
        ),
    ];
    for (path, want) in cases {
        let (code, out) = check(&[&path]).await;
        assert_eq!(code, 1, "{path}: {out}");
        assert!(
            out.contains(&format!("{path} {want}")) || out.contains(want),
            "{path}: {out}"
        );
        assert!(!out.contains("panicked"), "{out}");
    }
    let missing = dir.path().join("missing.wasm").display().to_string();
    let (code, out) = check(&[&missing]).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("error: reading plugin {missing}: No such file")),
        "{out}"
    );
}

/// A component for the `collector` world of `wit/` re-versioned to
/// `version`, plus an interface `x` it imports: every function a trap.
fn later_collector(dir: &Path, version: &str) -> PathBuf {
    let wit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../wit");
    let copy = dir.join("wit");
    std::fs::create_dir_all(copy.join("deps")).unwrap();
    for entry in std::fs::read_dir(wit.join("deps")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy.join("deps").join(entry.file_name())).unwrap();
    }
    for entry in std::fs::read_dir(&wit).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "wit") {
            let text = std::fs::read_to_string(&path).unwrap().replace(
                &format!("autocollect:plugin@{WIT_VERSION}"),
                &format!("autocollect:plugin@{version}"),
            );
            std::fs::write(copy.join(path.file_name().unwrap()), text).unwrap();
        }
    }
    std::fs::write(
        copy.join("x.wit"),
        format!(
            "package autocollect:plugin@{version};\ninterface x {{ hello: func(); }}\n\
             world collector-x {{ include collector; import x; }}\n"
        ),
    )
    .unwrap();
    let mut resolve = wit_parser::Resolve::default();
    let (pkg, _) = resolve.push_dir(&copy).unwrap();
    let world = resolve.select_world(&[pkg], Some("collector-x")).unwrap();
    let mut module =
        wit_component::dummy_module(&resolve, world, wit_parser::ManglingAndAbi::Standard32);
    wit_component::embed_component_metadata(
        &mut module,
        &resolve,
        world,
        wit_component::StringEncoding::UTF8,
    )
    .unwrap();
    let bytes = wit_component::ComponentEncoder::default()
        .module(&module)
        .unwrap()
        .validate(true)
        .encode()
        .unwrap();
    let path = dir.join(format!("later-{version}.wasm"));
    std::fs::write(&path, bytes).unwrap();
    path
}

#[tokio::test]
async fn plugin_check_names_what_a_later_contract_added() {
    let dir = tempfile::tempdir().unwrap();
    let file = later_collector(dir.path(), "0.1.99").display().to_string();
    let (code, out) = check(&[&file]).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("built against: autocollect:plugin 0.1.99"),
        "{out}"
    );
    assert!(out.contains("  autocollect:plugin/x@0.1.99"), "{out}");
    assert!(
        out.contains(&format!(
            "error: {file}: built against 0.1.99 and uses autocollect:plugin/x, which this \
             daemon ({WIT_VERSION}) lacks"
        )),
        "{out}"
    );

    let file = later_collector(dir.path(), "0.2.0").display().to_string();
    let (code, out) = check(&[&file]).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "error: {file}: built against autocollect:plugin 0.2.0, which this daemon \
             ({WIT_VERSION}) cannot run: it runs plugins built against {} (for 0.x versions \
             the minor version is the breaking one)",
            autocollect::plugin::inspect::supported_range()
        )),
        "{out}"
    );
}

#[tokio::test]
async fn plugin_check_and_the_daemon_refuse_a_wrong_role_plugin_alike() {
    let dir = tempfile::tempdir().unwrap();
    let uploader = plugin("http_uploader");
    let printed =
        serve_stops_with(dir.path(), &format!("[collector]\nplugin = {uploader:?}")).await;
    let (_, checked) = check(&[&uploader, "--role", "collector"]).await;
    let why = format!(
        "{uploader}: this is an uploader; [collector] needs a component exporting \
         autocollect:plugin/collect"
    );
    assert!(
        printed.contains(&format!("error: [collector] plugin: {why}")),
        "{printed}"
    );
    assert!(checked.contains(&why), "{checked}");

    let collector = plugin("mock_collector");
    let printed =
        serve_stops_with(dir.path(), &format!("[uploader]\nplugin = {collector:?}")).await;
    assert!(
        printed.contains(&format!(
            "error: [uploader] plugin: {collector}: this is a collector; [uploader] needs a \
             component exporting autocollect:plugin/upload"
        )),
        "{printed}"
    );
    assert!(!printed.contains("matching implementation"), "{printed}");
}
