//! The README's "run" command: `autocollect demo` collects on a local
//! cluster and uploads every zip to its local upload host.

use std::path::Path;
use std::process::Command;

use crate::upload_server::sha256_file;

#[test]
fn the_demo_collects_and_uploads_every_nodes_zip() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_autocollect"))
        .args([
            "demo",
            "--nodes",
            "2",
            "--delay-ms",
            "0",
            "--artifact-size",
            "100000",
        ])
        .arg("--dir")
        .arg(dir.path())
        .output()
        .expect("run the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let stored = dir.path().join("upload-host/Demo+Customer/1234");
    for node in ["n1", "n2"] {
        let line = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{node} ")) && l.contains("uploaded"))
            .unwrap_or_else(|| panic!("no result line for {node}:\n{stdout}"));
        let file = line.rsplit('/').next().unwrap();
        let artifact = find(&dir.path().join(node).join("data/results"), file)
            .unwrap_or_else(|| panic!("{node}'s artifact {file} is kept"));
        assert_eq!(sha256_file(&stored.join(file)), sha256_file(&artifact));
    }
}

/// The file named `name` somewhere under `dir`.
fn find(dir: &Path, name: &str) -> Option<std::path::PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = find(&path, name) {
                return Some(found);
            }
        } else if path.file_name().is_some_and(|n| n == name) {
            return Some(path);
        }
    }
    None
}

/// The systemd unit's command line is one the daemon takes: it gets as
/// far as reading the (missing) configuration.
#[tokio::test]
async fn the_systemd_units_command_line_is_accepted() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/autocollect.service"
    ))
    .unwrap();
    let exec_start = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("an ExecStart line");
    let mut words = exec_start.split_whitespace();
    assert_eq!(words.next(), Some("/usr/local/bin/autocollect"));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("autocollect.toml");
    let args: Vec<String> = words
        .map(|w| {
            if w == "/etc/autocollect/autocollect.toml" {
                config.display().to_string()
            } else {
                w.to_string()
            }
        })
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = crate::support::autocollect_cli(&args).await;
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr
            .contains(&format!("reading config {}", config.display())),
        "{}",
        run.stderr
    );
}

/// The install guide's configuration has only keys the daemon knows.
#[test]
fn the_install_guides_configuration_parses() {
    let guide = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/install.md"))
        .unwrap();
    let block = guide
        .split("```toml\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a TOML block");
    let block = block.replace("password_hash = \"...\"", "password_hash = \"x\"");
    let config: autocollect::config::Config = toml::from_str(&block).expect("it parses");
    assert_eq!(config.collector.plugin, "builtin:cbcollect");
    assert_eq!(config.nodes.len(), 3);
}
