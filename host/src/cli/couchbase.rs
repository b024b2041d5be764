//! `collect-logs-start`, `collect-logs-status` and `collect-logs-stop`:
//! couchbase-cli's commands, with its options, its `SUCCESS:`/`ERROR:`
//! lines and exit codes, against Couchbase's routes. `--wait` adds what
//! couchbase-cli lacks: a live progress line per node until the task
//! ends, then a summary table.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use reqwest::Method;
use serde_json::Value;

use super::print_task;
use crate::client::{ApiClient, ClientError, RequestBody};
use crate::coordinator::task::{NodeState, NodeStatus, TaskState, TaskStatus};

/// How to reach the cluster, as couchbase-cli takes it.
#[derive(Args)]
pub struct Connection {
    /// Any node: `HOST:PORT` or a URL.
    #[arg(long = "cluster", short = 'c', env = "AUTOCOLLECT_URL")]
    cluster: String,
    #[arg(long = "username", short = 'u', env = "AUTOCOLLECT_USER")]
    username: String,
    #[arg(
        long = "password",
        short = 'p',
        env = "AUTOCOLLECT_PASSWORD",
        hide_env_values = true
    )]
    password: String,
    #[command(flatten)]
    tls: super::TlsArgs,
}

impl Connection {
    /// A client of `-c`: `https://` or `http://` URLs as given,
    /// `couchbases://HOST:PORT` as https, and a bare `HOST:PORT` as https
    /// (autocollect serves TLS unless configured not to).
    fn client(&self) -> Result<ApiClient, String> {
        let url = match self.cluster.split_once("://") {
            Some(("couchbases", rest)) => format!("https://{rest}"),
            Some(_) => self.cluster.clone(),
            None => format!("https://{}", self.cluster),
        };
        ApiClient::with_tls(
            url.trim_end_matches('/'),
            &self.username,
            &self.password,
            &self.tls.tls(),
        )
        .map_err(|e| format!("{e:#}"))
    }
}

#[derive(Args)]
pub struct StartArgs {
    #[command(flatten)]
    connection: Connection,
    /// Collect from every node.
    #[arg(long)]
    all_nodes: bool,
    /// Collect from these nodes (comma-separated names).
    #[arg(long)]
    nodes: Option<String>,
    /// Upload the zips to the support host.
    #[arg(long)]
    upload: bool,
    #[arg(long)]
    upload_host: Option<String>,
    #[arg(long)]
    customer: Option<String>,
    #[arg(long)]
    ticket: Option<String>,
    /// Proxy for the uploads (`HOST:PORT` or `http://...`).
    #[arg(long)]
    upload_proxy: Option<String>,
    /// `none` or `partial`.
    #[arg(long)]
    redaction_level: Option<String>,
    /// Salt for partial redaction.
    #[arg(long)]
    salt: Option<String>,
    /// Where each node keeps its zip (absolute path).
    #[arg(long)]
    output_directory: Option<String>,
    /// Where cbcollect_info puts temporary files (absolute path).
    #[arg(long)]
    temporary_directory: Option<String>,
    /// Encrypt each node's (unredacted) zip with this password (AES-256).
    #[arg(long)]
    encryption_password: Option<String>,
    /// Only run the collector tasks whose names match this regular
    /// expression.
    #[arg(long)]
    task_regexp: Option<String>,
    /// Follow the collection with a progress line per node until it ends.
    #[arg(long)]
    wait: bool,
}

fn success(message: &str) -> ExitCode {
    println!("SUCCESS: {message}");
    ExitCode::SUCCESS
}

fn error(message: &str) -> ExitCode {
    println!("ERROR: {message}");
    ExitCode::FAILURE
}

/// An API error as couchbase-cli prints it: one `ERROR:` line per field.
fn api_error(e: ClientError) -> ExitCode {
    match e {
        ClientError::Api { body, .. } => match body.as_object() {
            Some(fields) => {
                for (key, message) in fields {
                    let message = message.as_str().unwrap_or_default();
                    match key.as_str() {
                        "_" => println!("ERROR: {message}"),
                        _ => println!("ERROR: {key} - {message}"),
                    }
                }
                ExitCode::FAILURE
            }
            None => error(&body.to_string()),
        },
        other => error(&other.to_string()),
    }
}

pub async fn start(args: StartArgs) -> ExitCode {
    // couchbase-cli's checks, in its order and words.
    let nodes = match (args.all_nodes, &args.nodes) {
        (true, None) => "*".to_string(),
        (false, Some(n)) => n.clone(),
        (false, None) => return error("Must specify either --all-nodes or --nodes"),
        (true, Some(_)) => return error("Cannot specify both --all-nodes and --nodes"),
    };
    if args.salt.is_some() && args.redaction_level.as_deref() != Some("partial") {
        return error("--redaction-level has to be set to 'partial' when --salt is specified");
    }
    if args.upload && args.upload_host.is_none() {
        return error("--upload-host is required when --upload is specified");
    }
    if args.upload && args.customer.is_none() {
        return error("--upload-customer is required when --upload is specified");
    }
    let upload = |value: &Option<String>| value.clone().filter(|_| args.upload);
    if !args.upload {
        for (given, option) in [
            (&args.upload_host, "--upload-host"),
            (&args.customer, "--upload-customer"),
            (&args.ticket, "--upload_ticket"),
            (&args.upload_proxy, "--upload_proxy"),
        ] {
            if given.is_some() {
                println!("WARNING: {option} has no effect with specifying --upload");
            }
        }
    }
    let mut form = vec![("nodes".to_string(), nodes)];
    let optional = [
        ("uploadHost", &upload(&args.upload_host)),
        ("customer", &upload(&args.customer)),
        ("ticket", &upload(&args.ticket)),
        ("uploadProxy", &upload(&args.upload_proxy)),
        ("logRedactionLevel", &args.redaction_level),
        ("logRedactionSalt", &args.salt),
        ("logDir", &args.output_directory),
        ("tmpDir", &args.temporary_directory),
        ("encryptionPassword", &args.encryption_password),
        ("taskRegexp", &args.task_regexp),
    ];
    for (key, value) in optional {
        if let Some(v) = value {
            form.push((key.to_string(), v.clone()));
        }
    }
    let client = match args.connection.client() {
        Ok(client) => client,
        Err(e) => return error(&e),
    };
    let started = client
        .request(
            Method::POST,
            "/controller/startLogsCollection",
            Some(RequestBody::Form(form)),
            true,
        )
        .await;
    match started {
        Ok((status, _)) if status.is_success() => {}
        Ok((status, body)) => return api_error(ClientError::Api { status, body }),
        Err(e) => return api_error(e),
    }
    if !args.wait {
        return success("Log collection started");
    }
    println!("Log collection started; following it (Ctrl-C stops watching, not the collection)");
    match watch(&client).await {
        Ok(task) => {
            print_task(&task);
            let all_done = task
                .per_node
                .values()
                .all(|n| matches!(n.status, NodeState::Collected | NodeState::Uploaded));
            if task.status == TaskState::Completed && all_done {
                success("Log collection completed")
            } else {
                error(&format!(
                    "Log collection {}: not every node succeeded",
                    task.status.as_str()
                ))
            }
        }
        Err(e) => api_error(e),
    }
}

/// Follow the running task, redrawing a progress line per node (on a
/// terminal), or printing a line per change (otherwise).
async fn watch(client: &ApiClient) -> Result<TaskStatus, ClientError> {
    let tty = std::io::stdout().is_terminal();
    let mut drawn = 0usize;
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    let started = client.status().await?;
    let task_id = started.map(|t| t.task_id).unwrap_or_default();
    client
        .wait_until(
            Duration::from_secs(24 * 3600),
            |task| {
                let lines: Vec<(String, String)> = task
                    .per_node
                    .iter()
                    .map(|(node, status)| (node.clone(), progress_line(status)))
                    .collect();
                let mut out = std::io::stdout().lock();
                if tty {
                    if drawn > 0 {
                        let _ = write!(out, "\x1b[{drawn}A");
                    }
                    for (node, line) in &lines {
                        let _ = writeln!(out, "\x1b[2K  {node:8} {line}");
                    }
                    drawn = lines.len();
                } else {
                    for (node, line) in lines {
                        if last.get(&node) != Some(&line) {
                            let _ = writeln!(out, "  {node:8} {line}");
                            last.insert(node, line);
                        }
                    }
                }
                let _ = out.flush();
            },
            |t| t.task_id == task_id && t.status != TaskState::Running,
        )
        .await
}

/// `startedUpload  [#######.............]  35%  12.0/34.3 MiB`
fn progress_line(status: &NodeStatus) -> String {
    let state = status.status.as_str();
    let Some(p) = status.progress.as_ref().filter(|p| p.total > 0) else {
        return state.to_string();
    };
    let ratio = (p.done as f64 / p.total as f64).clamp(0.0, 1.0);
    let filled = (ratio * 20.0).round() as usize;
    let amount = match status.status {
        NodeState::StartedUpload | NodeState::Uploaded => format!(
            "{:.1}/{:.1} MiB",
            p.done as f64 / 1048576.0,
            p.total as f64 / 1048576.0
        ),
        _ => format!("{}/{}", p.done, p.total),
    };
    format!(
        "{state:14} [{}{}] {:3.0}%  {amount}",
        "#".repeat(filled),
        ".".repeat(20 - filled),
        ratio * 100.0
    )
}

/// A node's fields in the order they are printed.
const NODE_FIELDS: &[&str] = &[
    "path",
    "collectionStatusCode",
    "collectionOutput",
    "url",
    "uploadStatusCode",
    "uploadOutput",
];

/// couchbase-cli's `collect-logs-status`, with collection failures too.
pub async fn status(connection: Connection) -> ExitCode {
    let client = match connection.client() {
        Ok(client) => client,
        Err(e) => return error(&e),
    };
    let list = match client
        .request(Method::GET, "/pools/default/tasks", None, true)
        .await
    {
        Ok((s, body)) if s.is_success() => body,
        Ok((status, body)) => return api_error(ClientError::Api { status, body }),
        Err(e) => return api_error(e),
    };
    let Some(task) = list
        .as_array()
        .and_then(|l| l.iter().find(|t| t["type"] == "clusterLogsCollection"))
    else {
        println!("No log collection tasks were found");
        return ExitCode::SUCCESS;
    };
    let text = |v: &Value| {
        v.as_str()
            .map(String::from)
            .unwrap_or_else(|| v.to_string())
    };
    // couchbase-cli's layout, with the collection failure fields added.
    println!("Status: {}", text(&task["status"]));
    if let Some(nodes) = task["perNode"].as_object() {
        println!("Details:");
        for (node, status) in nodes {
            println!("\tNode: {node}");
            println!("\tStatus: {}", text(&status["status"]));
            for key in NODE_FIELDS {
                if let Some(value) = status.get(*key) {
                    println!("\t {key} : {}", text(value));
                }
            }
        }
        println!();
    }
    ExitCode::SUCCESS
}

/// couchbase-cli's `collect-logs-stop`.
pub async fn stop(connection: Connection) -> ExitCode {
    let client = match connection.client() {
        Ok(client) => client,
        Err(e) => return error(&e),
    };
    match client
        .request(Method::POST, "/controller/cancelLogsCollection", None, true)
        .await
    {
        Ok((s, _)) if s.is_success() => success("Log collection stopped"),
        Ok((status, body)) => api_error(ClientError::Api { status, body }),
        Err(e) => api_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::task::NodeProgress;

    #[test]
    fn upload_progress_is_a_bar_in_mib() {
        let mut status = NodeStatus::new(NodeState::StartedUpload);
        assert_eq!(progress_line(&status), "startedUpload");
        status.progress = Some(NodeProgress {
            done: 12 << 20,
            total: 48 << 20,
            message: "uploading".into(),
        });
        assert_eq!(
            progress_line(&status),
            "startedUpload  [#####...............]  25%  12.0/48.0 MiB"
        );
    }
}
