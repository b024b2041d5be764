//! The `autocollect` command: a thin layer over the library.

mod couchbase;
mod plugin;
mod plugin_new;
mod plugin_new_rust;
mod plugin_run;

use std::io::Write as _;
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::client::{ApiClient, ClientError, StartOptions};
use crate::cluster::LocalCluster;
use crate::config::{Config, OptionValue};
use crate::coordinator::task::{NodeState, NodeStatus, TaskState, TaskStatus};
use crate::upload_sink::UploadSink;

#[derive(Parser)]
#[command(
    name = "autocollect",
    version,
    about = "Collect diagnostics from every node of a cluster"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Serve {
        /// The node's TOML configuration.
        #[arg(long, short)]
        config: PathBuf,
        /// Serve on this already-listening socket instead of `listen`.
        #[arg(long)]
        listen_fd: Option<i32>,
        /// `text` (default) or `json`: one JSON object per line, with the
        /// level, target, message and fields (for log shippers).
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Start a collection.
    Start {
        #[command(flatten)]
        api: ApiArgs,
        /// `all`, or a comma-separated list of node names.
        #[arg(long, default_value = "all")]
        nodes: String,
        /// Upload each node's zip to this host (`https://` is assumed).
        #[arg(long)]
        upload_host: Option<String>,
        /// Customer name (required with --upload-host).
        #[arg(long)]
        customer: Option<String>,
        /// Ticket number.
        #[arg(long)]
        ticket: Option<String>,
        /// Skip checking that the upload host answers before starting.
        #[arg(long)]
        bypass_reachability_checks: bool,
        /// Collect what was written since then: RFC 3339
        /// (2026-11-29T10:00:00Z) or a duration before now (30m, 2h, 7d).
        /// Collectors that cannot honour it say so in status.
        #[arg(long)]
        since: Option<String>,
        /// Collect what was written until then (same forms as --since).
        #[arg(long)]
        until: Option<String>,
        /// Only run the collector tasks whose names match this regular
        /// expression (`taskRegexp`; cbcollect_info's --task-regexp).
        #[arg(long)]
        task_regexp: Option<String>,
        /// Follow the task until it ends; exit 1 unless every node collected
        /// (and uploaded, when uploading).
        #[arg(long)]
        wait: bool,
    },
    /// Show the latest collection.
    Status {
        #[command(flatten)]
        api: ApiArgs,
        /// Follow the task until it ends.
        #[arg(long)]
        wait: bool,
    },
    /// Cancel the running collection.
    Cancel {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// couchbase-cli's `collect-logs-start`, against Couchbase's routes.
    CollectLogsStart(couchbase::StartArgs),
    /// couchbase-cli's `collect-logs-status`.
    CollectLogsStatus(couchbase::Connection),
    /// couchbase-cli's `collect-logs-stop`.
    CollectLogsStop(couchbase::Connection),
    /// Hash a password (read from stdin) for a `[[users]]` entry.
    HashPassword,
    /// Check a received zip against its host-made manifest (name, size,
    /// SHA-256, every entry's CRC). Exit 0 if all match, 1 otherwise.
    Verify {
        /// The zip.
        zip: PathBuf,
        /// Its manifest (default: ZIP.manifest.json, then manifest.json
        /// beside the zip).
        manifest: Option<PathBuf>,
    },
    /// TLS certificates for a cluster.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Tools for plugin authors.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Start a local cluster, collect with the mock plugin, print results.
    Demo {
        /// How many nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// How long each mock collection takes, in ms.
        #[arg(long, default_value_t = 1500)]
        delay_ms: u64,
        /// Size of each mock zip, in bytes.
        #[arg(long, default_value_t = 1 << 20)]
        artifact_size: u64,
        /// Where to put the cluster (configs, logs, artifacts).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Only collect: do not upload to the demo's local upload host.
        #[arg(long)]
        no_upload: bool,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Run one collection (or, for an uploader, one upload) with a plugin
    /// file, locally: no cluster, no configuration file, the daemon's
    /// sandbox and limits. Streams the plugin's log lines and progress,
    /// then prints the outcome, the artifacts and the run receipt. Exit 0
    /// if it succeeded.
    Run(Box<plugin_run::RunArgs>),
    /// Inspect a plugin file: its world and role, the contract version it
    /// was built against, its imports, size and SHA-256, whether this
    /// daemon can run it (loaded and linked as the daemon does), and what
    /// its validate-options says of the --option values. Exit 0 if it can
    /// run with them, 1 otherwise.
    Check {
        /// The component (.wasm).
        file: PathBuf,
        /// Check it as this role (default: the role its exports say).
        #[arg(long)]
        role: Option<RoleArg>,
        /// An option for validate-options, as in `[collector.options]`
        /// (repeat it).
        #[arg(long = "option", value_name = "KEY=VALUE", value_parser = plugin::parse_option)]
        options: Vec<(String, String)>,
    },
    /// Make a plugin project (outside this repository) that builds with
    /// `./build.sh`: the template collector (or uploader) in Rust on the
    /// SDK, or the example collector in Python or JavaScript, with the
    /// contract's WIT.
    New {
        /// The project's name (lowercase letters, digits, '-').
        name: String,
        /// An uploader instead of a collector (Rust only).
        #[arg(long)]
        uploader: bool,
        #[arg(long, value_enum, default_value_t = plugin_new::Lang::Rust)]
        lang: plugin_new::Lang,
        /// Where to make it.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Make a private cluster CA (or reuse the one in --dir) and a
    /// certificate for each node; print each node's `[tls]` lines.
    /// Running it again for a node replaces that node's certificate
    /// (then send its daemon SIGHUP).
    Init {
        /// The nodes: `NAME=HOST,...`, HOST being the host of the node's
        /// `[nodes]` entry (a DNS name or an IP address).
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<String>,
        /// Where the CA and the certificates are written.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum RoleArg {
    Collector,
    Uploader,
}

impl From<RoleArg> for crate::plugin::inspect::Role {
    fn from(r: RoleArg) -> Self {
        match r {
            RoleArg::Collector => Self::Collector,
            RoleArg::Uploader => Self::Uploader,
        }
    }
}

#[derive(Args)]
struct ApiArgs {
    /// Any node's API.
    #[arg(
        long,
        env = "AUTOCOLLECT_URL",
        default_value = "https://127.0.0.1:9101"
    )]
    url: String,
    #[arg(long, short, env = "AUTOCOLLECT_USER", default_value = "admin")]
    user: String,
    #[arg(long, short, env = "AUTOCOLLECT_PASSWORD", hide_env_values = true)]
    password: String,
    #[command(flatten)]
    tls: TlsArgs,
}

impl ApiArgs {
    fn client(&self) -> Result<ApiClient> {
        ApiClient::with_tls(&self.url, &self.user, &self.password, &self.tls.tls())
    }
}

/// How the CLI checks a node's certificate (as couchbase-cli and curl).
#[derive(Args)]
struct TlsArgs {
    /// Trust only the CA certificates in this PEM file (the cluster CA of
    /// `autocollect certs init`: its `ca.pem`).
    #[arg(long, env = "AUTOCOLLECT_CACERT", value_name = "FILE")]
    cacert: Option<PathBuf>,
    /// Do not check the node's certificate (encrypted, but anyone in the
    /// middle can read it).
    #[arg(long, conflicts_with = "cacert")]
    no_ssl_verify: bool,
}

impl TlsArgs {
    fn tls(&self) -> crate::client::ClientTls {
        crate::client::ClientTls {
            ca_file: self.cacert.clone(),
            no_verify: self.no_ssl_verify,
        }
    }
}

/// `autocollect verify`: what matches on stdout, what differs on stderr.
fn verify(zip: &Path, manifest: Option<&Path>) -> ExitCode {
    match crate::manifest::verify(zip, manifest) {
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
        Ok(report) => {
            println!("manifest: {}", report.manifest.display());
            for line in &report.matches {
                println!("ok: {line}");
            }
            for line in &report.notes {
                println!("note: {line}");
            }
            for line in &report.differs {
                eprintln!("DIFFERS: {line}");
            }
            if report.ok() {
                println!("{}: matches its manifest", zip.display());
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "{}: does not match its manifest ({} differences)",
                    zip.display(),
                    report.differs.len()
                );
                ExitCode::FAILURE
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Command::Serve { log_format, .. } => init_tracing(true, *log_format),
        _ => init_tracing(false, LogFormat::Text),
    }
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(daemon: bool, format: LogFormat) {
    let default = if daemon { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal;
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
}

async fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Serve {
            config, listen_fd, ..
        } => serve(&config, listen_fd).await,
        Command::Start {
            api,
            nodes,
            upload_host,
            customer,
            ticket,
            bypass_reachability_checks,
            since,
            until,
            task_regexp,
            wait,
        } => {
            let client = api.client()?;
            let options = StartOptions {
                nodes,
                upload_host,
                customer,
                ticket,
                bypass_reachability_checks,
                encryption_password: None,
                since,
                until,
                task_regexp,
            };
            let task = client.start_with(&options).await.map_err(explain)?;
            println!("started task {} on {}", task.task_id, client.base());
            if wait {
                follow(&client, &task.task_id).await
            } else {
                print_task(&task);
                Ok(ExitCode::SUCCESS)
            }
        }
        Command::Status { api, wait } => {
            let client = api.client()?;
            match client.status().await.map_err(explain)? {
                None => {
                    println!("no collection has run yet");
                    Ok(ExitCode::SUCCESS)
                }
                Some(task) if wait && task.status == TaskState::Running => {
                    follow(&client, &task.task_id).await
                }
                Some(task) => {
                    print_task(&task);
                    Ok(ExitCode::SUCCESS)
                }
            }
        }
        Command::Cancel { api } => {
            match api.client()?.cancel().await.map_err(explain)? {
                Some(task) => print_task(&task),
                None => println!("no collection has run yet"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::CollectLogsStart(args) => Ok(couchbase::start(args).await),
        Command::CollectLogsStatus(c) => Ok(couchbase::status(c).await),
        Command::CollectLogsStop(c) => Ok(couchbase::stop(c).await),
        Command::Verify { zip, manifest } => Ok(verify(&zip, manifest.as_deref())),
        Command::HashPassword => {
            let mut password = String::new();
            std::io::stdin().read_line(&mut password)?;
            let password = password.trim_end_matches(['\r', '\n']);
            anyhow::ensure!(!password.is_empty(), "empty password");
            println!("{}", crate::auth::hash_password(password));
            Ok(ExitCode::SUCCESS)
        }
        Command::Plugin(PluginCommand::Run(args)) => plugin_run::run(*args).await,
        Command::Plugin(PluginCommand::New {
            name,
            uploader,
            lang,
            dir,
        }) => {
            let root = plugin_new::scaffold(&name, &dir, lang, uploader)?;
            println!("made {}", root.display());
            println!("build it:  {}/build.sh", root.display());
            println!("run it:    see {}/README.md", root.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Certs(CertsCommand::Init { nodes, dir }) => {
            let nodes = nodes
                .iter()
                .map(|n| crate::tls::certs::NodeHost::parse(n))
                .collect::<Result<Vec<_>>>()?;
            let issued = crate::tls::certs::init(&dir, &nodes)?;
            let ca = issued.ca_file.display();
            if issued.new_ca {
                println!("# made a cluster CA: {ca} (its key beside it: keep it offline)");
            } else {
                println!("# used the cluster CA in {ca}");
            }
            print!("{}", issued.config_lines());
            println!("# clients: --cacert {ca}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Plugin(PluginCommand::Check {
            file,
            role,
            options,
        }) => Ok(plugin::check(&file, role.map(Into::into), &options).await),
        Command::Demo {
            nodes,
            delay_ms,
            artifact_size,
            dir,
            no_upload,
        } => demo(nodes, delay_ms, artifact_size, dir, !no_upload).await,
    }
}

async fn serve(config_path: &Path, listen_fd: Option<i32>) -> Result<ExitCode> {
    let config = Config::load(config_path)?;
    let listener = match listen_fd {
        // SAFETY: the caller promises this fd is a listening TCP socket
        // handed to us (see cluster.rs); we take ownership of it.
        Some(fd) => unsafe { std::net::TcpListener::from_raw_fd(fd) },
        None => crate::server::listener::bind(config.listen)
            .with_context(|| format!("listening on {}", config.listen))?,
    };
    crate::server::serve(config, config_path, listener).await?;
    Ok(ExitCode::SUCCESS)
}

/// Follow a task, printing each node's state change, until it ends.
async fn follow(client: &ApiClient, task_id: &str) -> Result<ExitCode> {
    let mut seen: std::collections::BTreeMap<String, NodeState> = Default::default();
    let task = client
        .wait_until(
            Duration::from_secs(24 * 3600),
            |task| {
                for (node, status) in &task.per_node {
                    if seen.insert(node.clone(), status.status) != Some(status.status) {
                        println!("  {node}: {}", status.status.as_str());
                    }
                }
            },
            |t| t.task_id == task_id && t.status != TaskState::Running,
        )
        .await
        .map_err(explain)?;
    print_task(&task);
    let all_done = task
        .per_node
        .values()
        .all(|n| matches!(n.status, NodeState::Collected | NodeState::Uploaded));
    Ok(if task.status == TaskState::Completed && all_done {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn detail(status: &NodeStatus) -> String {
    let mut notes = Vec::new();
    if let Some(why) = &status.partial_reason {
        notes.push(format!("partial: {why}"));
    }
    if !status.ignored_parameters.is_empty() {
        notes.push(format!(
            "ignored by its collector: {}",
            status.ignored_parameters.join(", ")
        ));
    }
    let notes = match notes.is_empty() {
        true => String::new(),
        false => format!(" ({})", notes.join("; ")),
    };
    match status.status {
        NodeState::Collected => status.path.clone().unwrap_or_default() + &notes,
        NodeState::Uploaded => status.url.clone().unwrap_or_default() + &notes,
        NodeState::FailedUpload => {
            let output = status.upload_output.as_deref().unwrap_or("").trim();
            let output = output.lines().last().unwrap_or("");
            let url = status.url.as_deref().unwrap_or("");
            match &status.upload_status_code {
                Some(code) => format!("{url}: HTTP {code}: {output}"),
                None => format!("{url}: {output}"),
            }
        }
        NodeState::Failed => {
            let output = status.collection_output.as_deref().unwrap_or("").trim();
            let output = output.lines().last().unwrap_or("");
            match &status.collection_status_code {
                Some(code) => format!("status {code}: {output}"),
                None => output.to_string(),
            }
        }
        _ => status
            .progress
            .as_ref()
            .map(|p| format!("{} ({}/{})", p.message, p.done, p.total))
            .unwrap_or_default(),
    }
}

pub(super) fn print_task(task: &TaskStatus) {
    println!(
        "task {} coordinated by {}, started {} UTC: {} ({}%)",
        task.task_id,
        task.node,
        task.ts,
        task.status.as_str(),
        task.progress
    );
    let width = task
        .per_node
        .keys()
        .map(String::len)
        .max()
        .unwrap_or(4)
        .max(4);
    println!("  {:width$}  {:10} DETAIL", "NODE", "STATUS");
    for (node, status) in &task.per_node {
        println!(
            "  {node:width$}  {:10} {}",
            status.status.as_str(),
            detail(status)
        );
    }
    let _ = std::io::stdout().flush();
}

/// Turn an API error body into a readable message.
fn explain(e: ClientError) -> anyhow::Error {
    match e {
        ClientError::Api { status, body } => {
            let fields = body
                .as_object()
                .map(|o| {
                    let errors = o
                        .iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                        .collect();
                    crate::protocol::field_errors_message(&errors)
                })
                .unwrap_or_else(|| body.to_string());
            anyhow::anyhow!("{fields} (HTTP {status})")
        }
        other => other.into(),
    }
}

async fn demo(
    nodes: usize,
    delay_ms: u64,
    artifact_size: u64,
    dir: Option<PathBuf>,
    upload: bool,
) -> Result<ExitCode> {
    anyhow::ensure!(
        (1..=64).contains(&nodes),
        "--nodes must be between 1 and 64"
    );
    let root = match dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!(
            "autocollect-demo-{}",
            chrono::Utc::now().format("%Y%m%dT%H%M%S")
        )),
    };
    std::fs::create_dir_all(&root)?;
    let names: Vec<String> = (1..=nodes).map(|i| format!("n{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    println!("starting {nodes} daemons under {}", root.display());
    let exe = std::env::current_exe()?;
    // A local support upload host over HTTPS, with a CA of its own that
    // the demo's nodes trust (`[upload] ca_file`).
    let sink = match upload {
        true => Some(UploadSink::start(&root.join("upload-host")).await?),
        false => None,
    };
    let upload_ca = sink.as_ref().map(|s| s.ca_file.clone());
    let cluster = LocalCluster::launch(&exe, &root, &names, |config| {
        config.upload.ca_file = upload_ca.clone();
        let options = &mut config.collector.options;
        options.insert("delay-ms".into(), OptionValue::Integer(delay_ms as i64));
        options.insert(
            "artifact-size".into(),
            OptionValue::Integer(artifact_size as i64),
        );
    })
    .await?;
    for node in &cluster.nodes {
        println!("  {} listening on {}", node.name, node.url());
    }
    println!(
        "  over TLS, mutual between nodes; the cluster CA is {} (curl --cacert)",
        cluster.ca_file.display()
    );
    let client = cluster.admin(names[0]);
    let options = StartOptions {
        nodes: "all".into(),
        upload_host: sink.as_ref().map(UploadSink::host),
        customer: sink.as_ref().map(|_| "Demo Customer".into()),
        ticket: sink.as_ref().map(|_| "1234".into()),
        bypass_reachability_checks: false,
        ..Default::default()
    };
    if let Some(sink) = &sink {
        println!("  upload host listening on {}", sink.host());
    }
    let task = client.start_with(&options).await.map_err(explain)?;
    println!("collection {} started via {}", task.task_id, names[0]);
    let code = follow(&client, &task.task_id).await?;
    if let Some(sink) = &sink {
        println!(
            "\nthe upload host stored the zips under {}",
            sink.dir.display()
        );
    }
    println!(
        "configs, logs and artifacts are kept under {}",
        root.display()
    );
    drop(cluster);
    Ok(code)
}
