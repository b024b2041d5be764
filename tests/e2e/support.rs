//! Shared set-up: a cluster of real `autocollect` daemons on loopback, each
//! in its own temp dir with pre-bound ephemeral ports, killed when the test
//! ends (pass or fail; on failure their logs are printed, then the failure
//! again, so that a CI excerpt showing only the end of the output shows
//! why the test failed).

use std::path::{Path, PathBuf};
use std::time::Duration;

use autocollect::client::{ApiClient, RequestBody};
use autocollect::cluster::{LocalCluster, NodeSpec};
use autocollect::config::{Config, OptionValue};
use autocollect::coordinator::task::{NodeState, TaskState, TaskStatus};
use reqwest::{Method, StatusCode};

/// Upper bound for any wait in a test: a hang fails instead of blocking CI.
pub const PATIENCE: Duration = Duration::from_secs(60);

pub struct TestCluster {
    /// `None` only while the test cluster is dropped.
    cluster: Option<LocalCluster>,
    // Dropped after `cluster`: daemons die first.
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for TestCluster {
    type Target = LocalCluster;
    fn deref(&self) -> &LocalCluster {
        self.cluster
            .as_ref()
            .expect("the cluster runs until dropped")
    }
}

impl std::ops::DerefMut for TestCluster {
    fn deref_mut(&mut self) -> &mut LocalCluster {
        self.cluster
            .as_mut()
            .expect("the cluster runs until dropped")
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        // The daemons die and, if the test is failing, print their logs
        // (`LocalCluster`'s drop)...
        drop(self.cluster.take());
        // ...then the failure once more, after those logs.
        if std::thread::panicking()
            && let Some(failure) = LAST_PANIC.with(|p| p.borrow_mut().take())
        {
            eprintln!("--- the test failed (repeated after the daemons' logs) ---\n{failure}");
        }
    }
}

thread_local! {
    /// The last panic on this thread: the failure of the test it runs.
    static LAST_PANIC: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Keep each panic's message for [`TestCluster`]'s drop (installed once,
/// in front of the hook that prints it as usual).
fn remember_panics() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            LAST_PANIC.with(|p| *p.borrow_mut() = Some(info.to_string()));
            previous(info);
        }));
    });
}

/// Start daemons named `names`; `customize` edits each node's config.
pub async fn cluster(names: &[&str], customize: impl FnMut(&mut Config)) -> TestCluster {
    let specs: Vec<NodeSpec> = names.iter().map(|n| NodeSpec::loopback(n)).collect();
    cluster_on(&specs, customize).await
}

/// Start daemons as `specs` say (addresses, network namespaces).
pub async fn cluster_on(specs: &[NodeSpec], mut customize: impl FnMut(&mut Config)) -> TestCluster {
    remember_panics();
    let dir = tempfile::tempdir().expect("temp dir");
    let exe = Path::new(env!("CARGO_BIN_EXE_autocollect"));
    // One compiled-plugin cache for the whole test run: only the first
    // daemon to load a plugin compiles it.
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("plugin-cache");
    let cluster = LocalCluster::launch_on(exe, dir.path(), specs, |config| {
        config.plugin_cache_dir = Some(cache.clone());
        config.coordinator.heartbeat_interval_ms = 500;
        customize(config)
    })
    .await
    .expect("cluster starts");
    TestCluster {
        cluster: Some(cluster),
        _dir: dir,
    }
}

/// A client's TLS configuration that trusts the cluster CA and presents
/// no certificate.
pub fn ca_trusting_tls(c: &TestCluster) -> rustls::ClientConfig {
    let roots = autocollect::tls::read_roots(&c.ca_file).expect("the cluster CA");
    rustls::ClientConfig::builder_with_provider(autocollect::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// A TLS connection to `node` (trusting the cluster CA) that has sent
/// nothing yet: for tests that write raw HTTP.
pub async fn tls_connect(
    c: &TestCluster,
    node: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    tls_connect_with(c, node, std::sync::Arc::new(ca_trusting_tls(c))).await
}

/// A TLS connection to `node` made with `config`, that has sent nothing
/// yet.
pub async fn tls_connect_with(
    c: &TestCluster,
    node: &str,
    config: std::sync::Arc<rustls::ClientConfig>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let addr = c.node(node).addr;
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tokio_rustls::TlsConnector::from(config)
        .connect(addr.ip().into(), tcp)
        .await
        .expect("TLS handshake")
}

/// Wait until `node`'s log has a line containing `text`.
pub async fn wait_for_log(c: &LocalCluster, node: &str, text: &str) {
    wait_for_file(
        &c.node(node).log_path,
        &format!("{node}'s log (waiting for {text:?})"),
        |log| log.contains(text),
    )
    .await;
}

/// Read `path`, a file another process appends to, again until `done`
/// holds for its text (no event to await across processes), within
/// [`PATIENCE`]; returns that text. `what` names the file in the failure.
pub async fn wait_for_file(path: &Path, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if done(&text) {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} never had what the test waits for: {text:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// What a run of the `autocollect` command printed, and its exit code.
pub struct CliRun {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Run `autocollect ARGS`, with none of the CLI's environment variables
/// of the machine running the tests.
pub async fn autocollect_cli(args: &[&str]) -> CliRun {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_autocollect"))
        .args(args)
        .env_remove("AUTOCOLLECT_URL")
        .env_remove("AUTOCOLLECT_CACERT")
        .env_remove("AUTOCOLLECT_USER")
        .env_remove("AUTOCOLLECT_PASSWORD")
        .output()
        .await
        .expect("run the CLI");
    CliRun {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Run couchbase-cli's form against `node`: `autocollect ARGS -c NODE -u
/// admin -p PASSWORD --cacert CA`.
pub async fn couchbase_cli(c: &LocalCluster, node: &str, args: &[&str]) -> CliRun {
    let addr = c.node(node).addr.to_string();
    let ca = c.ca_file.display().to_string();
    let connection = [
        "-c",
        &addr,
        "-u",
        "admin",
        "-p",
        &c.admin_password,
        "--cacert",
        &ca,
    ];
    autocollect_cli(&[args, &connection[..]].concat()).await
}

/// Run `autocollect ARGS --url NODE -p ADMIN_PASSWORD --cacert CA`
/// against `node` of `c`.
pub async fn autocollect_cli_on(c: &LocalCluster, node: &str, args: &[&str]) -> CliRun {
    let url = c.node(node).url();
    let ca = c.ca_file.display().to_string();
    let connection = ["--url", &url, "-p", &c.admin_password, "--cacert", &ca];
    autocollect_cli(&[args, &connection[..]].concat()).await
}

/// The deliberately hostile test plugin, built from plugins/test-misbehave.
pub fn misbehave_plugin() -> String {
    autocollect::plugin::builtin::build_output("test_misbehave")
        .display()
        .to_string()
}

/// The hostile uploader, built from plugins/test-hostile-uploader.
pub fn hostile_uploader_plugin() -> String {
    autocollect::plugin::builtin::build_output("test_hostile_uploader")
        .display()
        .to_string()
}

pub fn set_option(config: &mut Config, key: &str, value: impl Into<OptionValue>) {
    config.collector.options.insert(key.into(), value.into());
}

/// The next event of `stream`, within [`PATIENCE`].
pub async fn next_event(
    stream: &mut autocollect::client::EventStream,
) -> autocollect::client::SseEvent {
    tokio::time::timeout(PATIENCE, stream.next())
        .await
        .expect("an event in time")
        .expect("the stream goes on")
        .expect("a readable event")
}

/// Follow the latest task on `client` until `done` holds for it.
pub async fn wait_for(client: &ApiClient, done: impl Fn(&TaskStatus) -> bool) -> TaskStatus {
    client
        .wait_until(PATIENCE, |_| {}, done)
        .await
        .expect("task reaches the expected state")
}

/// `POST /collectLogs/start` with a JSON body: status and answer.
pub async fn start_json(
    admin: &ApiClient,
    params: serde_json::Value,
) -> (StatusCode, serde_json::Value) {
    admin
        .request(
            Method::POST,
            "/collectLogs/start",
            Some(RequestBody::Json(params)),
            true,
        )
        .await
        .expect("the node answers")
}

/// Start with a JSON body (it must be accepted) and wait for the task to
/// end.
pub async fn collect_json(admin: &ApiClient, params: serde_json::Value) -> TaskStatus {
    let (status, body) = start_json(admin, params).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let started: TaskStatus = serde_json::from_value(body).expect("a task");
    wait_for_end(admin, &started.task_id).await
}

/// Collect from every node and wait for the task to end.
pub async fn collect_once(admin: &ApiClient) -> TaskStatus {
    let started = admin.start("all").await.expect("start accepted");
    wait_for_end(admin, &started.task_id).await
}

pub async fn wait_for_end(client: &ApiClient, task_id: &str) -> TaskStatus {
    client
        .wait_for_end(task_id, PATIENCE)
        .await
        .expect("task ends")
}

/// Every chosen node is in `state`.
pub fn all_nodes(task: &TaskStatus, state: NodeState) -> bool {
    task.per_node.values().all(|n| n.status == state)
}

pub fn assert_ended(task: &TaskStatus, state: TaskState) {
    assert_eq!(task.status, state, "task: {task:#?}");
    assert_eq!(task.progress, 100);
    assert!(task.recommended_refresh_period.is_none());
    assert!(task.cancel_uri.is_none());
}

/// The job (output) directory of `task_id` on a node.
pub fn job_dir(cluster: &LocalCluster, node: &str, task_id: &str) -> PathBuf {
    cluster.node(node).data_dir.join("jobs").join(task_id)
}

/// Where a node keeps `task_id`'s artifacts after a successful collection.
pub fn result_dir(cluster: &LocalCluster, node: &str, task_id: &str) -> PathBuf {
    cluster.node(node).data_dir.join("results").join(task_id)
}

/// Read one member of a zip file.
pub fn zip_member(path: &Path, member: &str) -> String {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut archive = zip::ZipArchive::new(file).expect("a valid zip");
    let mut entry = archive.by_name(member).expect("member present");
    let mut text = String::new();
    std::io::Read::read_to_string(&mut entry, &mut text).unwrap();
    text
}

/// `autocollect serve` in `dir` with a minimal one-node config (plain HTTP
/// on loopback) plus `extra` (TOML tables): what it printed when it
/// stopped, which it must, within [`PATIENCE`].
pub async fn serve_stops_with(dir: &Path, extra: &str) -> String {
    let config = dir.join("n1.toml");
    let text = format!(
        "node = \"n1\"\nlisten = \"127.0.0.1:0\"\ndata_dir = \"data\"\ntls = \"off\"\n\
         cluster_secret = \"0123456789abcdef\"\n[nodes]\nn1 = \"127.0.0.1:9\"\n{extra}\n"
    );
    std::fs::write(&config, text).unwrap();
    let daemon = tokio::process::Command::new(env!("CARGO_BIN_EXE_autocollect"))
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(PATIENCE, daemon.wait_with_output())
        .await
        .expect("the daemon stops")
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Peak resident memory of a process, in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}
