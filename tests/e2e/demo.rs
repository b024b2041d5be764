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
