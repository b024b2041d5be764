//! Every shell command in the documentation runs in CI, so the docs
//! cannot go stale.
//!
//! A command in a Markdown file is a fenced block marked `sh`. Each one is
//! either run here, as printed, by one of the tests below (against real
//! daemons, a real upload server, the real binary), or named in
//! [`COVERAGE`] with the test or the CI script that runs it. A new `sh`
//! block that nothing runs fails
//! `every_shell_command_in_the_docs_is_run_in_ci`, and so does an
//! indented code block (Markdown's other kind, which cannot say what it
//! holds): commands go in `sh` blocks, everything else in `text`, `json`,
//! `toml` and so on.
//!
//! Running "as printed" allows only the [`Sub`]stitutions each test
//! declares, with the reason for each: the docs name real hosts
//! (`10.0.0.11`, `uploads.example.com`), placeholders (`PASSWORD`) and a
//! release build; a test runs on loopback with its own passwords and the
//! dev build. Every substitution must still match the docs, so a reworded
//! command cannot slip past its test.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use autocollect::client::{ApiClient, ClientTls};
use autocollect::config::{Config, TlsSetting};
use autocollect::coordinator::task::{NodeState, TaskState, TaskStatus};
use pulldown_cmark::{CodeBlockKind, Event, Parser, Tag, TagEnd};

use crate::docs::markdown_files;
use crate::support::*;
use crate::upload_server::UploadServer;

/// A code block of a Markdown file.
#[derive(Clone, Debug)]
pub struct Block {
    /// Relative to the repository root.
    pub file: String,
    /// The heading the block is under.
    pub section: String,
    pub line: usize,
    /// The fence's language (`sh`, `toml`, ...); `indented` for an
    /// indented block.
    pub lang: String,
    pub text: String,
}

impl std::fmt::Display for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let first = self.text.lines().next().unwrap_or_default();
        write!(f, "{}:{} ({}) {first}", self.file, self.line, self.lang)
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The code blocks of every Markdown file of the repository.
fn all_blocks() -> Vec<Block> {
    let root = repo_root();
    let mut files = Vec::new();
    markdown_files(&root, &mut files);
    files.sort();
    files
        .iter()
        .flat_map(|file| {
            let relative = file.strip_prefix(&root).unwrap().display().to_string();
            code_blocks(&relative, &std::fs::read_to_string(file).unwrap())
        })
        .collect()
}

fn code_blocks(file: &str, text: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut section = String::new();
    let mut heading: Option<String> = None;
    let mut block: Option<Block> = None;
    for (event, range) in Parser::new(text).into_offset_iter() {
        match event {
            Event::Start(Tag::Heading { .. }) => heading = Some(String::new()),
            Event::End(TagEnd::Heading(_)) => section = heading.take().unwrap_or_default(),
            Event::Start(Tag::CodeBlock(kind)) => {
                let lang = match kind {
                    CodeBlockKind::Indented => "indented".to_string(),
                    CodeBlockKind::Fenced(info) => {
                        info.split_whitespace().next().unwrap_or("").to_string()
                    }
                };
                block = Some(Block {
                    file: file.to_string(),
                    section: section.clone(),
                    line: text[..range.start].matches('\n').count() + 1,
                    lang,
                    text: String::new(),
                });
            }
            Event::End(TagEnd::CodeBlock) => blocks.extend(block.take()),
            Event::Text(t) | Event::Code(t) => {
                if let Some(b) = block.as_mut() {
                    b.text.push_str(&t);
                } else if let Some(h) = heading.as_mut() {
                    h.push_str(&t);
                }
            }
            _ => {}
        }
    }
    blocks
}

/// Who runs the `sh` blocks of a part of the docs.
enum Runs {
    /// A test of this file, by name: it runs them in order.
    Here(&'static str),
    /// Another test (`fn NAME` must exist under `tests/`).
    Test(&'static str),
    /// A CI script: each command line of the block is a line of the
    /// script (the script may add options, such as `--locked`).
    Script(&'static str),
    /// Not run in CI, and why (only what would change the machine).
    NotInCi(&'static str),
}

struct Coverage {
    file: &'static str,
    /// `None`: every section of the file.
    section: Option<&'static str>,
    /// `None`: every `sh` block of the section; else the block whose
    /// first line starts with this.
    first_line: Option<&'static str>,
    runs: Runs,
}

const fn covered(
    file: &'static str,
    section: Option<&'static str>,
    first_line: Option<&'static str>,
    runs: Runs,
) -> Coverage {
    Coverage {
        file,
        section,
        first_line,
        runs,
    }
}

/// The first entry that matches a block says who runs it.
const COVERAGE: &[Coverage] = &[
    covered(
        "README.md",
        Some("The two commands"),
        Some(".ci/setup && cargo run --release -- demo"),
        Runs::Test("the_demo_collects_and_uploads_every_nodes_zip"),
    ),
    covered(
        "README.md",
        Some("The two commands"),
        Some(".ci/test"),
        Runs::Script(".ci/run"),
    ),
    covered(
        "README.md",
        Some("Quick start: a 3-node cluster by hand"),
        None,
        Runs::Here("the_readmes_quick_start_runs_as_printed"),
    ),
    covered(
        "docs/operator-guide.md",
        Some("Running a cluster by hand"),
        None,
        Runs::Here("the_operator_guides_cluster_by_hand_runs_as_printed"),
    ),
    covered(
        "docs/api.md",
        None,
        None,
        Runs::Here("the_api_references_curl_examples_run_as_printed"),
    ),
    covered(
        "docs/cli.md",
        None,
        None,
        Runs::Here("the_cli_references_examples_run_as_printed"),
    ),
    covered(
        "docs/install.md",
        None,
        Some("cargo build --profile production --locked"),
        Runs::NotInCi(
            "a 10-minute whole-program build (.ci/bench makes it too), and installs into \
             /usr/local/bin of the machine running the tests",
        ),
    ),
    covered(
        "docs/install.md",
        None,
        Some("useradd"),
        Runs::NotInCi("adds a system user and /etc/autocollect to the machine running the tests"),
    ),
    covered(
        "docs/install.md",
        None,
        Some("autocollect certs init"),
        Runs::Here("the_operator_guides_cluster_by_hand_runs_as_printed"),
    ),
    covered(
        "docs/install.md",
        None,
        Some("chown"),
        Runs::NotInCi("changes the ownership of /etc/autocollect on the machine running the tests"),
    ),
    covered(
        "docs/install.md",
        None,
        Some("install -m 0644 docs/autocollect.service"),
        Runs::NotInCi(
            "needs systemd as PID 1; the_systemd_units_command_line_is_accepted runs the unit's ExecStart",
        ),
    ),
    covered(
        "docs/install.md",
        None,
        Some("curl --cacert certs/ca.pem https://10.0.0.11:9101/health"),
        Runs::Here("the_operator_guides_cluster_by_hand_runs_as_printed"),
    ),
    covered(
        "plugins/README.md",
        None,
        Some("rustup target add wasm32-wasip2"),
        Runs::Script(".ci/setup"),
    ),
    covered(
        "plugins/README.md",
        Some("Build and check"),
        Some("cargo build --release --target wasm32-wasip2"),
        Runs::Script(".ci/test"),
    ),
    covered(
        "plugins/README.md",
        Some("Build and check"),
        Some("cargo test --release -p autocollect-sdk"),
        Runs::Script(".ci/test"),
    ),
    covered(
        "plugins/README.md",
        Some("Build and check"),
        Some("autocollect plugin check"),
        Runs::Test("plugin_check_shows_what_validate_options_rejects"),
    ),
    covered(
        "plugins/README.md",
        Some("Run it: autocollect plugin run"),
        None,
        Runs::Here("the_plugin_guides_plugin_run_runs_as_printed"),
    ),
    // The examples' tests run build.sh one language at a time, into the
    // same target/examples/ (`build.sh DIR python`, `build.sh DIR js`);
    // without arguments it runs both in turn.
    covered(
        "plugins/examples/README.md",
        None,
        Some("plugins/examples/build.sh"),
        Runs::Test("python_collects_through_the_daemon"),
    ),
    // build.sh runs these builds (into target/examples/) and lists the
    // imports with `jco wit`; the tests run build.sh, then the components.
    covered(
        "plugins/examples/python-collector/README.md",
        None,
        Some("componentize-py --wit-path ../../../wit --world collector componentize"),
        Runs::Test("python_collects_through_the_daemon"),
    ),
    covered(
        "plugins/examples/python-collector/README.md",
        None,
        Some("componentize-py --wit-path ../../../wit --world collector bindings"),
        Runs::Here("the_python_examples_bindings_command_runs_as_printed"),
    ),
    covered(
        "plugins/examples/js-collector/README.md",
        None,
        None,
        Runs::Test("js_collects_through_the_daemon"),
    ),
    // `plugin new`'s build.sh runs this build in a fresh project.
    covered(
        "plugins/sdk/README.md",
        None,
        Some("cargo build --release --target wasm32-wasip2"),
        Runs::Test("a_new_rust_collector_and_uploader_build_and_run_outside_the_repository"),
    ),
    covered(
        "plugins/sdk/README.md",
        None,
        Some("cargo test --release -p autocollect-sdk"),
        Runs::Script(".ci/test"),
    ),
    covered(
        "BENCHMARKS.md",
        None,
        None,
        Runs::NotInCi(
            "benchmarks: minutes of release builds and runs, recorded by hand (CI compiles them: clippy --all-targets)",
        ),
    ),
];

fn coverage_of(block: &Block) -> Option<&'static Coverage> {
    COVERAGE.iter().find(|c| {
        c.file == block.file
            && c.section.is_none_or(|s| s == block.section)
            && c.first_line
                .is_none_or(|f| block.text.trim_start().starts_with(f))
    })
}

/// The `sh` blocks the test `name` of this file runs, in order.
fn blocks_run_by(name: &str) -> Vec<Block> {
    let blocks: Vec<Block> = all_blocks()
        .into_iter()
        .filter(|b| b.lang == "sh")
        .filter(
            |b| matches!(coverage_of(b), Some(Coverage { runs: Runs::Here(n), .. }) if *n == name),
        )
        .collect();
    assert!(!blocks.is_empty(), "{name} runs no block of the docs");
    blocks
}

/// A block's commands, one per line: `\` continuations joined, comments
/// (whole lines, and ` # ...` after a command) and blank lines dropped.
fn command_lines(text: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if current.is_empty() && (line.is_empty() || line.starts_with('#')) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(start) => {
                current.push_str(start);
                current.push(' ');
            }
            None => {
                current.push_str(line.split(" #").next().unwrap());
                lines.push(current.split_whitespace().collect::<Vec<_>>().join(" "));
                current.clear();
            }
        }
    }
    lines
}

/// `script` has a line (after `(cd DIR && `) with `command`'s words in
/// order, others allowed between them.
fn script_runs(script: &str, command: &str) -> bool {
    let wanted: Vec<&str> = command.split_whitespace().collect();
    command_lines(script).iter().any(|line| {
        let mut words = line.split_whitespace().map(|w| w.trim_end_matches(')'));
        wanted.iter().all(|w| words.any(|have| have == *w))
    })
}

#[test]
fn every_shell_command_in_the_docs_is_run_in_ci() {
    let blocks = all_blocks();
    let root = repo_root();
    let tests: String = std::fs::read_dir(root.join("tests/e2e"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    for block in &blocks {
        if block.lang == "indented" {
            problems.push(format!(
                "{block}: an indented code block; fence it as ```sh if it holds commands \
                 (and make sure something runs them), else as ```text"
            ));
        }
        if block.lang != "sh" {
            continue;
        }
        let Some(coverage) = coverage_of(block) else {
            problems.push(format!(
                "{block}: no test runs this command; add it to COVERAGE in tests/e2e/doc_commands.rs"
            ));
            continue;
        };
        used.insert(coverage as *const Coverage);
        match coverage.runs {
            Runs::Here(name) | Runs::Test(name) => {
                if !tests.contains(&format!("fn {name}(")) {
                    problems.push(format!("{block}: COVERAGE names {name}, no such test"));
                }
            }
            Runs::Script(script) => {
                let script_text = std::fs::read_to_string(root.join(script)).unwrap();
                for command in command_lines(&block.text) {
                    if !script_runs(&script_text, &command) {
                        problems.push(format!("{block}: {script} does not run `{command}`"));
                    }
                }
            }
            Runs::NotInCi(why) => eprintln!("not run in CI: {block}: {why}"),
        }
    }
    for coverage in COVERAGE {
        if !used.contains(&(coverage as *const Coverage)) {
            problems.push(format!(
                "COVERAGE entry {} {:?} {:?} matches no sh block: the docs changed",
                coverage.file, coverage.section, coverage.first_line
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(blocks.iter().filter(|b| b.lang == "sh").count() > 20);
}

/// One declared difference between the docs and what a test runs: the
/// docs' text, what runs instead, and why.
pub struct Sub {
    from: &'static str,
    to: String,
    why: &'static str,
}

fn sub(from: &'static str, to: impl Into<String>, why: &'static str) -> Sub {
    Sub {
        from,
        to: to.into(),
        why,
    }
}

/// A shell for the docs' blocks: bash in a temp dir (`target/release/
/// autocollect` there and `autocollect` on PATH are this build's binary),
/// each block in its own process group, every group killed at the end,
/// pass or fail (daemons a block started with `&` included).
struct DocShell {
    dir: tempfile::TempDir,
    subs: Vec<Sub>,
    used: Vec<bool>,
    groups: Vec<i32>,
    /// What every block reads on stdin (passwords for `read`).
    pub stdin: String,
    path: String,
    env: Vec<(String, String)>,
    runs: usize,
}

struct Ran {
    stdout: String,
    stderr: String,
}

impl DocShell {
    fn new(subs: Vec<Sub>) -> DocShell {
        let dir = tempfile::tempdir().unwrap();
        let exe = Path::new(env!("CARGO_BIN_EXE_autocollect"));
        let release = dir.path().join("target/release");
        std::fs::create_dir_all(&release).unwrap();
        std::os::unix::fs::symlink(exe, release.join("autocollect")).unwrap();
        let path = format!(
            "{}:{}",
            release.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let used = vec![false; subs.len()];
        DocShell {
            dir,
            subs,
            used,
            groups: Vec::new(),
            stdin: String::new(),
            path,
            env: Vec::new(),
            runs: 0,
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The block's text with the substitutions applied.
    fn script(&mut self, text: &str) -> String {
        let mut script = text.to_string();
        for (i, s) in self.subs.iter().enumerate() {
            if script.contains(s.from) {
                self.used[i] = true;
                script = script.replace(s.from, &s.to);
            }
        }
        script
    }

    /// Run `block` in the shell's directory; it must succeed.
    async fn run(&mut self, block: &Block) -> Ran {
        let script = self.script(&block.text);
        self.run_script(&block.to_string(), &script, None).await
    }

    /// Run `script` (from `what`) in `cwd` or the shell's directory.
    async fn run_script(&mut self, what: &str, script: &str, cwd: Option<&Path>) -> Ran {
        self.runs += 1;
        let files = |name: &str| self.dir.path().join(format!(".block{}.{name}", self.runs));
        std::fs::write(files("stdin"), &self.stdin).unwrap();
        let mut command = tokio::process::Command::new("bash");
        command
            .args(["-e", "-o", "pipefail", "-c", script])
            .current_dir(cwd.unwrap_or(self.dir.path()))
            .env("PATH", &self.path)
            .env_remove("AUTOCOLLECT_URL")
            .env_remove("AUTOCOLLECT_CACERT")
            .env_remove("AUTOCOLLECT_USER")
            .env_remove("AUTOCOLLECT_PASSWORD")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(std::fs::File::open(files("stdin")).unwrap())
            // Files, not pipes: a daemon a block leaves running keeps its
            // stdout open, and waiting for a pipe's end would hang.
            .stdout(Stdio::from(std::fs::File::create(files("out")).unwrap()))
            .stderr(Stdio::from(std::fs::File::create(files("err")).unwrap()))
            .process_group(0);
        let mut child = command.spawn().expect("bash");
        self.groups.push(child.id().unwrap() as i32);
        let status = tokio::time::timeout(PATIENCE, child.wait())
            .await
            .unwrap_or_else(|_| panic!("{what} did not finish in {PATIENCE:?}"))
            .unwrap();
        let ran = Ran {
            stdout: std::fs::read_to_string(files("out")).unwrap(),
            stderr: std::fs::read_to_string(files("err")).unwrap(),
        };
        assert!(
            status.success(),
            "{what} failed ({status}):\n--- ran\n{script}\n--- stdout\n{}\n--- stderr\n{}{}",
            ran.stdout,
            ran.stderr,
            self.logs()
        );
        ran
    }

    /// The `*.log` files the blocks left (daemons' stderr), for a failure.
    fn logs(&self) -> String {
        let mut logs = String::new();
        for entry in std::fs::read_dir(self.dir.path()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                logs += &format!("\n--- {}\n{text}", path.display());
            }
        }
        logs
    }

    /// Every substitution matched the docs somewhere.
    fn assert_subs_used(&self) {
        let stale: Vec<String> = self
            .subs
            .iter()
            .zip(&self.used)
            .filter(|(_, used)| !**used)
            .map(|(s, _)| format!("{:?} ({})", s.from, s.why))
            .collect();
        assert!(
            stale.is_empty(),
            "these substitutions no longer match the docs (update the test): {stale:?}"
        );
    }
}

impl Drop for DocShell {
    fn drop(&mut self) {
        for group in &self.groups {
            // SAFETY: kill(2) with a negative pid signals a process group
            // this shell made; it touches no memory.
            unsafe {
                libc::kill(-group, libc::SIGKILL);
            }
        }
    }
}

/// Wait until a daemon a block started answers `/health`. It is no child
/// of the test and says nothing the test can await: ask again until then.
async fn wait_healthy(client: &ApiClient) {
    let deadline = std::time::Instant::now() + PATIENCE;
    while client.health().await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "{} never answered",
            client.base()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The latest task once it is not running.
async fn settled(client: &ApiClient) -> TaskStatus {
    wait_for(client, |t| t.status != TaskState::Running).await
}

/// The latest task completed, every chosen node in `state`.
fn assert_completed_with(task: &TaskStatus, state: NodeState) {
    assert_eq!(task.status, TaskState::Completed, "{task:#?}");
    assert!(all_nodes(task, state), "{task:#?}");
}

fn curl_fails_loudly() -> Sub {
    sub(
        "curl ",
        "curl --fail-with-body --silent --show-error ",
        "a refused request must fail the block",
    )
}

#[tokio::test]
async fn the_readmes_quick_start_runs_as_printed() {
    let blocks = blocks_run_by("the_readmes_quick_start_runs_as_printed");
    let mut sh = DocShell::new(vec![
        sub(
            "cargo build --release",
            "true",
            "CI tests the dev build of the same sources",
        ),
        curl_fails_loudly(),
    ]);
    let mut stdout = String::new();
    for block in &blocks {
        stdout += &sh.run(block).await.stdout;
    }
    sh.assert_subs_used();
    // `start --wait` exited 0: the task completed with every node
    // collected. Its table and the status the README's curl printed say so.
    for node in ["n1", "n2", "n3"] {
        assert!(stdout.contains(node), "{stdout}");
    }
    let status: serde_json::Value = serde_json::from_str(
        stdout
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .expect("curl printed the status"),
    )
    .unwrap();
    assert_eq!(status["status"], "completed", "{status}");
    for node in ["n1", "n2", "n3"] {
        assert_eq!(status["perNode"][node]["status"], "collected", "{status}");
    }
}

#[tokio::test]
async fn the_operator_guides_cluster_by_hand_runs_as_printed() {
    let guide = std::fs::read_to_string(repo_root().join("docs/operator-guide.md")).unwrap();
    // The guide's blocks in order; install.md's health check (also run
    // here) at the end.
    let (blocks, install): (Vec<Block>, Vec<Block>) =
        blocks_run_by("the_operator_guides_cluster_by_hand_runs_as_printed")
            .into_iter()
            .partition(|b| b.file == "docs/operator-guide.md");
    let config = code_blocks("docs/operator-guide.md", &guide)
        .into_iter()
        .find(|b| b.section == "Running a cluster by hand" && b.lang == "toml")
        .expect("the guide's n1.toml");
    let server = UploadServer::start_tls().await;
    let upload_host = server.host_named("localhost");
    let upload_host = upload_host.trim_start_matches("https://").to_string();
    let (admin_password, ops_password) = ("guide admin password", "guide ops password");
    let mut sh = DocShell::new(vec![
        sub(
            "cargo build --release",
            "true",
            "CI tests the dev build of the same sources",
        ),
        // 127.0.0.11, .12, .13: three loopback addresses, so three
        // daemons on one machine keep the guide's port and certificates.
        sub("10.0.0.1", "127.0.0.1", "the guide's nodes, on loopback"),
        sub(
            "uploads.example.com",
            upload_host.clone(),
            "the test's upload server",
        ),
        sub(
            "admin:PASSWORD",
            format!("'admin:{admin_password}'"),
            "the password hashed above",
        ),
        curl_fails_loudly(),
    ]);
    std::fs::write(sh.path().join("support-ca.pem"), server.ca_pem()).unwrap();
    let mut hashes = Vec::new();
    let mut started = 0;
    for block in &blocks {
        if block.text.contains("hash-password") {
            // Once per user of the guide's config, as it says.
            for password in [admin_password, ops_password] {
                sh.stdin = format!("{password}\n");
                hashes.push(sh.run(block).await.stdout.trim().to_string());
            }
            continue;
        }
        if block.text.contains(" serve --config n1.toml") {
            write_guide_configs(&mut sh, &config.text, &hashes);
            for n in 1..=3 {
                let script = sh
                    .script(&block.text)
                    .replace("n1.toml", &format!("n{n}.toml"));
                let script = format!("{} > n{n}.log 2>&1 &", script.trim());
                sh.run_script(&block.to_string(), &script, None).await;
            }
            for n in 1..=3 {
                wait_healthy(&guide_client(&sh, n, "admin", admin_password)).await;
            }
            continue;
        }
        sh.run(block).await;
        if block.text.contains("/collectLogs/start") {
            started += 1;
            let task = settled(&guide_client(&sh, 1, "admin", admin_password)).await;
            if block.text.contains("upload_host") {
                assert_completed_with(&task, NodeState::Uploaded);
                assert_eq!(server.received().len(), 3);
            } else {
                assert_completed_with(&task, NodeState::Collected);
            }
        }
    }
    assert_eq!(
        started, 2,
        "the guide starts a collection, then one with upload"
    );
    // The read-only user of the guide's config signs in and cannot start.
    let ops = guide_client(&sh, 2, "ops", ops_password);
    let task = ops.status().await.unwrap().expect("a task");
    assert_eq!(task.status, TaskState::Completed);
    assert!(ops.start("all").await.is_err());

    // install.md's certificates and health check, against the guide's
    // cluster.
    for block in &install {
        let out = sh.run(block).await.stdout;
        if block.text.contains("/health") {
            assert!(out.contains("\"status\":\"ok\""), "{out}");
        }
    }
    sh.assert_subs_used();
}

/// A client of the guide's node `n` (on 127.0.0.1n:9101), trusting the
/// CA its `certs init` made.
fn guide_client(sh: &DocShell, n: u8, user: &str, password: &str) -> ApiClient {
    let tls = ClientTls {
        ca_file: Some(sh.path().join("certs/ca.pem")),
        no_verify: false,
    };
    ApiClient::with_tls(&format!("https://127.0.0.1{n}:9101"), user, password, &tls).unwrap()
}

/// The guide's `n1.toml`, and `n2.toml` and `n3.toml` made from it as the
/// guide says ("differ only in node, and in listen and data_dir if the
/// nodes share a machine"), with the hashes made by its hash-password
/// step and the upload server's CA uncommented.
fn write_guide_configs(sh: &mut DocShell, config: &str, hashes: &[String]) {
    let config = sh.script(config);
    let mut hash = hashes.iter();
    let config: String = config
        .lines()
        .map(|line| {
            if line.starts_with("password_hash = ") {
                format!(
                    "password_hash = \"{}\"",
                    hash.next().expect("a hash per user")
                )
            } else if line.starts_with("# ca_file = \"support-ca.pem\"") {
                line.trim_start_matches("# ").to_string()
            } else {
                line.to_string()
            }
        })
        .map(|line| line + "\n")
        .collect();
    assert!(hash.next().is_none(), "a user for every hash");
    assert!(
        config.contains("\nca_file = \"support-ca.pem\""),
        "{config}"
    );
    for n in 1..=3 {
        let node = config
            .replace("node = \"n1\"", &format!("node = \"n{n}\""))
            .replace(
                "listen = \"0.0.0.0:9101\"",
                &format!("listen = \"127.0.0.1{n}:9101\""),
            )
            .replace(
                "data_dir = \"/var/lib/autocollect\"",
                &format!("data_dir = \"data-n{n}\""),
            )
            .replace("certs/n1", &format!("certs/n{n}"))
            // Quick collections: the guide's mock takes 3 s.
            .replace("delay-ms = 3000", "delay-ms = 100");
        assert_ne!(node, config, "the guide's config changed");
        std::fs::write(sh.path().join(format!("n{n}.toml")), node).unwrap();
    }
}

#[tokio::test]
async fn the_api_references_curl_examples_run_as_printed() {
    let server = UploadServer::start_tls().await;
    let certs = tempfile::tempdir().unwrap();
    let ca = server.write_ca(certs.path());
    let log_dir = certs.path().join("collected");
    std::fs::create_dir(&log_dir).unwrap();
    // Plain HTTP, as the examples address it (`http://127.0.0.1:9101`).
    let upload_ca = ca.clone();
    let allowed_log_dir = log_dir.clone();
    let c = cluster(&["n1", "n2", "n3"], move |config: &mut Config| {
        config.tls = Some(TlsSetting::Off);
        config.upload.ca_file = Some(upload_ca.clone());
        config.storage.allowed_log_dirs = vec![allowed_log_dir.clone()];
        config.storage.allowed_tmp_dirs = vec!["/var/tmp".into()];
    })
    .await;
    let admin = c.admin("n1");
    let upload_host = server.host_named("localhost");
    let mut sh = DocShell::new(vec![
        sub(
            "http://127.0.0.1:9101",
            c.node("n1").url(),
            "the test cluster's n1",
        ),
        sub(
            "admin:PASSWORD",
            format!("admin:{}", c.admin_password),
            "the test's passwords",
        ),
        sub(
            "ops:PASSWORD",
            format!(
                "{}:{}",
                autocollect::cluster::READER_USER,
                c.reader_password
            ),
            "the test cluster's read-only user",
        ),
        sub(
            "uploads.example.com",
            upload_host.trim_start_matches("https://").to_string(),
            "the test's upload server",
        ),
        sub(
            "/var/lib/autocollect/collected",
            log_dir.display().to_string(),
            "a logDir the test can look into",
        ),
        sub(
            "/collectLogs/events",
            "/collectLogs/events --max-time 2 || test $? = 28",
            "the stream never ends by itself: read it for 2 s",
        ),
        curl_fails_loudly(),
    ]);
    sh.stdin = "zip password\n".into();
    let mut uploads = 0;
    // Line by line: the examples start one collection after another, and
    // a start while one runs is refused (409).
    for block in blocks_run_by("the_api_references_curl_examples_run_as_printed") {
        for command in command_lines(&block.text) {
            let script = sh.script(&command);
            let ran = sh.run_script(&block.to_string(), &script, None).await;
            let task = settled(&admin).await;
            if command.contains("/collectLogs/events") {
                assert!(ran.stdout.contains("event: snapshot"), "{}", ran.stdout);
            } else if command.contains("/health") {
                assert!(ran.stdout.contains("\"status\":\"ok\""), "{}", ran.stdout);
            } else if command.contains("pload") {
                uploads += 3;
                assert_completed_with(&task, NodeState::Uploaded);
                assert_eq!(server.received().len(), uploads, "{command}");
            } else if command.contains("/start") || command.contains("/startLogs") {
                assert_completed_with(&task, NodeState::Collected);
            }
            if command.contains("logDir") {
                let zips = std::fs::read_dir(&log_dir)
                    .unwrap()
                    .filter(|e| {
                        e.as_ref()
                            .unwrap()
                            .path()
                            .extension()
                            .is_some_and(|x| x == "zip")
                    })
                    .count();
                assert_eq!(zips, 3, "{command}");
            }
        }
    }
    sh.assert_subs_used();
}

#[tokio::test]
async fn the_cli_references_examples_run_as_printed() {
    let server = UploadServer::start_tls().await;
    let certs = tempfile::tempdir().unwrap();
    let ca = server.write_ca(certs.path());
    let upload_ca = ca.clone();
    let c = cluster(&["n1", "n2", "n3"], move |config| {
        config.upload.ca_file = Some(upload_ca.clone());
    })
    .await;
    let upload_host = server.host_named("localhost");
    let mut sh = DocShell::new(vec![
        sub(
            "https://10.0.0.11:9101",
            c.node("n1").url(),
            "the test cluster's n1",
        ),
        sub(
            "certs/ca.pem",
            c.ca_file.display().to_string(),
            "the test cluster's CA",
        ),
        sub(
            "AUTOCOLLECT_PASSWORD=...",
            format!("AUTOCOLLECT_PASSWORD='{}'", c.admin_password),
            "the test's password",
        ),
        sub(
            "uploads.example.com",
            upload_host.trim_start_matches("https://").to_string(),
            "the test's upload server",
        ),
    ]);
    for block in blocks_run_by("the_cli_references_examples_run_as_printed") {
        // `--wait` exits 0 only when every chosen node collected or
        // uploaded.
        let ran = sh.run(&block).await;
        assert!(ran.stdout.contains("uploaded"), "{}", ran.stdout);
    }
    let task = c.admin("n2").status().await.unwrap().expect("a task");
    assert_completed_with(&task, NodeState::Uploaded);
    assert_eq!(server.received().len(), 3);
    sh.assert_subs_used();
}

#[tokio::test]
async fn the_plugin_guides_plugin_run_runs_as_printed() {
    let out = tempfile::tempdir().unwrap();
    let mut sh = DocShell::new(vec![
        sub(
            "(cd plugins && cargo build --release --target wasm32-wasip2 --target-dir ../target/wasm-plugins)",
            "true",
            "host/build.rs ran this very build before any test",
        ),
        sub(
            "cargo run --release --",
            "autocollect",
            "CI tests the dev build of the same sources",
        ),
        sub(
            "/tmp/try-plugin",
            out.path().join("try-plugin").display().to_string(),
            "a directory of the test's own",
        ),
    ]);
    let root = repo_root();
    for block in blocks_run_by("the_plugin_guides_plugin_run_runs_as_printed") {
        let script = sh.script(&block.text);
        let ran = sh
            .run_script(&block.to_string(), &script, Some(&root))
            .await;
        assert!(ran.stdout.contains("collected"), "{}", ran.stdout);
    }
    assert!(out.path().join("try-plugin").read_dir().unwrap().count() > 0);
    sh.assert_subs_used();
}

#[tokio::test]
async fn the_python_examples_bindings_command_runs_as_printed() {
    let out = tempfile::tempdir().unwrap();
    let mut sh = DocShell::new(vec![sub(
        "/tmp/bindings",
        out.path().join("bindings").display().to_string(),
        "a directory of the test's own",
    )]);
    let dir = repo_root().join("plugins/examples/python-collector");
    for block in blocks_run_by("the_python_examples_bindings_command_runs_as_printed") {
        let script = sh.script(&block.text);
        sh.run_script(&block.to_string(), &script, Some(&dir)).await;
    }
    // The generated package the README points at.
    assert!(out.path().join("bindings/wit_world").is_dir());
    sh.assert_subs_used();
}
