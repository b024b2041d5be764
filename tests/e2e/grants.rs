//! Read-only input grants (`[[collector.inputs]]`): a collector reads the
//! host directories the operator grants, at their guest paths, and lists
//! them through the `inputs` import; it cannot change anything in them,
//! nor read through a symlink that leaves a grant; a grant whose host
//! path is missing stops the daemon at start.

use std::path::{Path, PathBuf};

use autocollect::cluster::{LocalCluster, NodeSpec};
use autocollect::config::{Config, InputGrant};
use autocollect::coordinator::task::NodeState;

use crate::support::*;

const LOG_TEXT: &str = "hello from the granted log\n";
const VICTIM_TEXT: &str = "the operator's file, unchanged\n";
const OUTSIDE_TEXT: &str = "SECRET-OUTSIDE-THE-GRANT";

/// A host directory to grant (`logs/`), with a file, a subdirectory whose
/// file the plugin attacks, symlinks that stay inside and that leave, and
/// a file outside it (`outside/secret.txt`) the escaping links name.
struct Fixture {
    _dir: tempfile::TempDir,
    logs: PathBuf,
    outside: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(logs.join("sub")).unwrap();
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(logs.join("a.log"), LOG_TEXT).unwrap();
    std::fs::write(logs.join("sub/victim.txt"), VICTIM_TEXT).unwrap();
    std::fs::write(outside.join("secret.txt"), OUTSIDE_TEXT).unwrap();
    let link = |target: &Path, name: &str| std::os::unix::fs::symlink(target, logs.join(name));
    link(Path::new("../outside/secret.txt"), "escape-relative").unwrap();
    link(&outside.join("secret.txt"), "escape-absolute").unwrap();
    link(Path::new("../outside"), "escape-dir").unwrap();
    link(Path::new("a.log"), "inside-relative").unwrap();
    link(&logs.join("a.log"), "inside-absolute").unwrap();
    Fixture {
        _dir: dir,
        logs,
        outside,
    }
}

fn grant(name: &str, host: &Path, guest: &str) -> InputGrant {
    InputGrant {
        name: name.into(),
        host: host.to_path_buf(),
        guest: guest.into(),
    }
}

/// Run the misbehaving plugin's `grants` mode once with `inputs` and the
/// given `read`, `list`, `write` options; return its report.
async fn report(inputs: Vec<InputGrant>, read: &str, list: &str, write: &str) -> String {
    let c = cluster(&["n1"], |config: &mut Config| {
        config.collector.plugin = misbehave_plugin();
        set_option(config, "mode", "grants");
        set_option(config, "read", read);
        set_option(config, "list", list);
        set_option(config, "write", write);
        config.collector.inputs = inputs.clone();
    })
    .await;
    let task = collect_once(&c.admin("n1")).await;
    let node = &task.per_node["n1"];
    assert_eq!(node.status, NodeState::Collected, "{node:?}");
    let path = node.path.as_deref().expect("the report's path");
    let report = std::fs::read_to_string(path).expect("the report");
    eprintln!("{report}");
    // The host's manifest records what was granted.
    let manifest = std::path::Path::new(path).with_file_name("manifest.json");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest).expect("the manifest")).unwrap();
    let granted: Vec<serde_json::Value> = inputs
        .iter()
        .map(|g| serde_json::json!({"name": g.name, "host": g.host, "guest": g.guest}))
        .collect();
    assert_eq!(manifest["grants"], serde_json::json!(granted), "{manifest}");
    report
}

fn line<'a>(report: &'a str, prefix: &str) -> &'a str {
    report
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line {prefix:?} in:\n{report}"))
}

#[tokio::test]
async fn a_granted_directory_is_listed_and_readable_but_never_changed() {
    let f = fixture();
    let report = report(
        vec![grant("logs", &f.logs, "/inputs/logs")],
        "/inputs/logs/a.log /inputs/logs/sub/victim.txt /inputs/logs/../outside/secret.txt /output/../../outside/secret.txt",
        "/inputs/logs /inputs",
        "/inputs/logs/sub/victim.txt",
    )
    .await;

    // Listed by name and guest path, through the `inputs` import.
    assert_eq!(report.lines().next(), Some("grant logs /inputs/logs"));
    // Read allowed, content as on the host.
    assert!(
        line(&report, "read /inputs/logs/a.log:").contains(&format!("allowed ({LOG_TEXT:?})")),
        "{report}"
    );
    assert!(line(&report, "list /inputs/logs:").contains("allowed (a.log,"));
    // `..` does not leave the grant.
    assert!(line(&report, "read /inputs/logs/../outside/secret.txt:").contains("denied"));
    assert!(line(&report, "read /output/../../outside").contains("denied"));

    // Every change refused...
    for what in [
        "open-for-write",
        "append",
        "truncate",
        "create",
        "mkdir",
        "rename",
        "remove",
        "symlink",
        "remove-dir",
    ] {
        let l = line(&report, &format!("{what} "));
        assert!(l.contains(": denied ("), "{what} was not refused: {l}");
    }
    // ...and the host's files are as they were.
    let victim = f.logs.join("sub/victim.txt");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), VICTIM_TEXT);
    let mut names: Vec<String> = std::fs::read_dir(f.logs.join("sub"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["victim.txt"]);
    assert!(!f.logs.join("created-by-plugin").exists());
    assert_eq!(
        std::fs::read_to_string(f.logs.join("a.log")).unwrap(),
        LOG_TEXT
    );
}

#[tokio::test]
async fn a_symlink_out_of_a_grant_is_not_followed() {
    let f = fixture();
    let report = report(
        vec![grant("logs", &f.logs, "/inputs/logs")],
        "/inputs/logs/escape-relative /inputs/logs/escape-absolute \
         /inputs/logs/escape-dir/secret.txt \
         /inputs/logs/inside-relative /inputs/logs/inside-absolute",
        "/inputs/logs/escape-dir",
        "",
    )
    .await;
    for escaping in [
        "read /inputs/logs/escape-relative:",
        "read /inputs/logs/escape-absolute:",
        "read /inputs/logs/escape-dir/secret.txt:",
        "list /inputs/logs/escape-dir:",
    ] {
        assert!(line(&report, escaping).contains(": denied ("), "{report}");
    }
    assert!(!report.contains(OUTSIDE_TEXT), "{report}");
    assert!(f.outside.join("secret.txt").exists());
    // A relative symlink that stays inside the grant is followed (cap-std
    // resolves it within the directory); an absolute one is not, even
    // when it names a file inside: absolute targets always leave.
    assert!(
        line(&report, "read /inputs/logs/inside-relative:")
            .contains(&format!("allowed ({LOG_TEXT:?})")),
        "{report}"
    );
    assert!(
        line(&report, "read /inputs/logs/inside-absolute:").contains(": denied ("),
        "{report}"
    );
}

#[tokio::test]
async fn proc_files_are_readable_when_granted() {
    let report = report(
        vec![
            grant("kernel", Path::new("/proc/sys/kernel"), "/inputs/kernel"),
            // A symlink to the daemon's /proc/PID/net: allowed, unlike
            // /proc or a process's directory (see the start test below).
            grant("net", Path::new("/proc/net"), "/inputs/net"),
        ],
        "/inputs/kernel/ostype /inputs/net/dev /inputs/net/../environ",
        "",
        "/inputs/kernel/hostname",
    )
    .await;
    assert_eq!(
        report.lines().take(2).collect::<Vec<_>>(),
        ["grant kernel /inputs/kernel", "grant net /inputs/net"]
    );
    // Virtual files stat as 0 bytes, yet read whole.
    assert!(
        line(&report, "read /inputs/kernel/ostype:").contains("allowed (\"Linux\\n\")"),
        "{report}"
    );
    assert!(
        line(&report, "read /inputs/net/dev:").contains("allowed (\"Inter-|"),
        "{report}"
    );
    // The process directory around the grant stays out of reach.
    assert!(line(&report, "read /inputs/net/../environ:").contains(": denied ("));
    // Writable /proc files stay unwritten.
    for what in ["open-for-write", "append", "truncate"] {
        let l = line(&report, &format!("{what} /inputs/kernel/hostname:"));
        assert!(l.contains(": denied ("), "{l}");
    }
}

#[tokio::test]
async fn a_missing_grant_or_proc_itself_stops_the_daemon_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir");
    let exe = Path::new(env!("CARGO_BIN_EXE_autocollect"));
    let refused = LocalCluster::launch_on(exe, dir.path(), &[NodeSpec::loopback("n1")], |c| {
        c.collector.inputs = vec![grant("logs", &missing, "/inputs/logs")];
    })
    .await
    .err()
    .expect("the daemon refuses to start");
    let message = format!("{refused:#}");
    let expected = format!(
        "collector.inputs \"logs\": host {} cannot be opened: No such file or directory",
        missing.display()
    );
    assert!(message.contains(&expected), "{message}");

    // /proc itself would hand the plugin the daemon's own memory.
    let dir = tempfile::tempdir().unwrap();
    let refused = LocalCluster::launch_on(exe, dir.path(), &[NodeSpec::loopback("n1")], |c| {
        c.collector.inputs = vec![grant("proc", Path::new("/proc"), "/proc")];
    })
    .await
    .err()
    .expect("the daemon refuses to start");
    let message = format!("{refused:#}");
    assert!(
        message
            .contains("collector.inputs \"proc\": host /proc is /proc: it holds processes' memory"),
        "{message}"
    );
}
