//! `autocollect plugin run`: one collection (or one upload) with a plugin
//! file, locally, with no cluster and no configuration file, in the
//! daemon's sandbox and limits ([`crate::testing`]). The plugin's log
//! lines and progress stream to stderr as they happen; then the outcome,
//! the artifacts and the run receipt (the manifest a node would write)
//! go to stdout. `--watch` runs it again whenever the file changes.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::plugin::collector::RunError;
use crate::plugin::inspect::{Inspection, Role};
use crate::testing::{Collection, RunObserver, Upload};

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// The component (.wasm), or `builtin:NAME`.
    pub file: String,
    /// An option, as in `[collector.options]` (repeat it).
    #[arg(long = "option", value_name = "KEY=VALUE", value_parser = parse_pair)]
    pub options: Vec<(String, String)>,
    /// Grant HOST_PATH read-only as /inputs/NAME (repeat it).
    #[arg(long = "input", value_name = "NAME=HOST_PATH", value_parser = parse_pair)]
    pub inputs: Vec<(String, String)>,
    /// A program the plugin may start (absolute path; repeat it).
    #[arg(long = "exec-allow", value_name = "PATH")]
    pub exec_allow: Vec<String>,
    /// An environment variable every started program gets (repeat it);
    /// nothing is inherited.
    #[arg(long = "exec-env", value_name = "NAME=VALUE", value_parser = parse_pair)]
    pub exec_env: Vec<(String, String)>,
    /// A start parameter: log-redaction-level, log-redaction-salt,
    /// task-regexp, encryption-password, since, until (repeat it).
    #[arg(long = "param", value_name = "KEY=VALUE", value_parser = parse_pair)]
    pub params: Vec<(String, String)>,
    /// Keep the output here (created; must be empty). Default: a
    /// temporary directory, removed at the end.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Then upload the artifact (a collector) or --artifact (an uploader)
    /// to this URL.
    #[arg(long = "upload-url", value_name = "URL")]
    pub upload_url: Option<String>,
    /// For an uploader: the file to send.
    #[arg(long, value_name = "FILE")]
    pub artifact: Option<PathBuf>,
    /// The uploader for a collector's --upload-url.
    #[arg(long, default_value = "builtin:http-uploader")]
    pub uploader: String,
    /// Trust this PEM CA file for https:// uploads (as [upload] ca_file).
    #[arg(long, value_name = "FILE")]
    pub cacert: Option<PathBuf>,
    /// Wall-clock limit, in seconds (the daemon's default: 3600 to
    /// collect, 14400 to upload).
    #[arg(long)]
    pub timeout_secs: Option<f64>,
    /// Linear-memory cap, in MiB (default 512 to collect, 128 to upload).
    #[arg(long)]
    pub memory_mb: Option<u64>,
    /// Run again each time the file changes (it is not rebuilt); stop
    /// with Ctrl-C.
    #[arg(long)]
    pub watch: bool,
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?}: expected KEY=VALUE")),
    }
}

/// Prints the plugin's log lines and progress to stderr as they come.
struct Terminal;

impl RunObserver for Terminal {
    fn log(&self, level: tracing::Level, message: &str) {
        eprintln!("[plugin {:5}] {message}", level.as_str().to_lowercase());
    }

    fn progress(&self, done: u64, total: u64, message: &str) {
        if total > 0 {
            eprintln!("[progress] {done}/{total} {message}");
        } else {
            eprintln!("[progress] {done} {message}");
        }
    }
}

pub async fn run(args: RunArgs) -> Result<ExitCode> {
    if !args.watch {
        return once(&args).await;
    }
    let path = PathBuf::from(&args.file);
    let mut seen = stamp(&path);
    loop {
        match once(&args).await {
            Ok(code) => println!(
                "run finished ({code:?}); watching {} for changes",
                args.file
            ),
            Err(e) => {
                eprintln!("error: {e:#}");
                println!("run failed to start; watching {} for changes", args.file);
            }
        }
        seen = wait_for_change(&path, seen).await;
        // The new build compiles from the functions kept in memory; the
        // old one's component is let go.
        crate::testing::plugin_host()?.forget_compiled();
        println!("{} changed: running again", args.file);
    }
}

/// What identifies a version of the file: its size and modification time
/// (none while it is missing, e.g. mid-rebuild).
fn stamp(path: &Path) -> Option<(u64, std::time::SystemTime)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.len(), meta.modified().ok()?))
}

/// Wait until the file differs from `seen` and has stayed the same for a
/// moment (a build writing it is done); its new stamp.
async fn wait_for_change(
    path: &Path,
    seen: Option<(u64, std::time::SystemTime)>,
) -> Option<(u64, std::time::SystemTime)> {
    const POLL: Duration = Duration::from_millis(200);
    loop {
        tokio::time::sleep(POLL).await;
        let now = stamp(path);
        if now.is_some() && now != seen {
            tokio::time::sleep(POLL).await;
            if stamp(path) == now {
                return now;
            }
        }
    }
}

async fn once(args: &RunArgs) -> Result<ExitCode> {
    match role_of(&args.file)? {
        Role::Collector => collect(args).await,
        Role::Uploader => {
            let (Some(url), Some(file)) = (&args.upload_url, &args.artifact) else {
                bail!(
                    "{} is an uploader: give the file to send (--artifact FILE) and where \
                     (--upload-url URL)",
                    args.file
                );
            };
            upload(args, &args.file, file, url).await
        }
    }
}

/// Which role the component's exports say it has (the daemon's own
/// inspection: `plugin check` says the same).
fn role_of(file: &str) -> Result<Role> {
    let source = crate::plugin::PluginSource::parse(file, Path::new("."))?;
    let host = crate::testing::plugin_host()?;
    let component = host.component(&source)?;
    let inspection = Inspection::of(host.engine(), &component);
    match inspection.role {
        Some(role) => Ok(role),
        None => {
            let why = crate::plugin::inspect::diagnose(&inspection, Role::Collector)
                .err()
                .unwrap_or_default();
            bail!("{file}: {why}; check it with `autocollect plugin check {file}`")
        }
    }
}

async fn collect(args: &RunArgs) -> Result<ExitCode> {
    let mut c = Collection::new(&args.file).observe(Arc::new(Terminal));
    for (k, v) in &args.options {
        c = c.option(k, v);
    }
    for (name, host) in &args.inputs {
        c = c.input(name, host);
    }
    for program in &args.exec_allow {
        c = c.exec_allow(program);
    }
    for (k, v) in &args.exec_env {
        c = c.exec_env(k, v);
    }
    for (k, v) in &args.params {
        c = c.parameter(k, v).map_err(anyhow::Error::msg)?;
    }
    if let Some(secs) = args.timeout_secs {
        c = c.timeout(Duration::try_from_secs_f64(secs).context("--timeout-secs")?);
    }
    if let Some(mb) = args.memory_mb {
        c = c.memory_mb(mb);
    }
    if let Some(out) = &args.out {
        c = c.out_dir(out);
    }
    let report = c.run().await?;
    let plugin = &report.plugin;
    println!(
        "plugin:    {} ({}, sha256 {}, contract {})",
        plugin.source,
        plugin.role,
        plugin.sha256,
        plugin.wit_version.as_deref().unwrap_or("unknown")
    );
    let collected = match &report.outcome {
        Ok(collected) => collected,
        Err(e) => {
            println!("outcome:   failed");
            print_failure(e);
            return Ok(ExitCode::FAILURE);
        }
    };
    println!(
        "outcome:   {}",
        if collected.partial.is_some() {
            "collected (partial)"
        } else {
            "collected"
        }
    );
    println!("summary:   {}", collected.summary);
    if let Some(why) = &collected.partial {
        println!("partial:   {why}");
    }
    if !collected.ignored.is_empty() {
        println!("ignored:   {}", collected.ignored.join(", "));
    }
    for (path, artifact) in report.artifacts.iter().zip(&collected.artifacts) {
        println!("artifact:  {} ({} bytes)", path.display(), artifact.size);
    }
    if args.out.is_none() {
        println!("(the output is removed on exit; keep it with --out DIR)");
    }
    if let Some(receipt) = &report.receipt {
        println!("receipt:");
        println!("{}", String::from_utf8_lossy(&receipt.to_json()).trim_end());
    }
    let Some(url) = &args.upload_url else {
        return Ok(ExitCode::SUCCESS);
    };
    let Some(artifact) = report.artifacts.first() else {
        bail!("the collector returned no artifact to upload");
    };
    upload(args, &args.uploader, artifact, url).await
}

async fn upload(args: &RunArgs, uploader: &str, file: &Path, url: &str) -> Result<ExitCode> {
    let mut u = Upload::new(uploader).observe(Arc::new(Terminal));
    // The options are the uploader's when it is the plugin run.
    if uploader == args.file {
        for (k, v) in &args.options {
            u = u.option(k, v);
        }
        if let Some(secs) = args.timeout_secs {
            u = u.timeout(Duration::try_from_secs_f64(secs).context("--timeout-secs")?);
        }
        if let Some(mb) = args.memory_mb {
            u = u.memory_mb(mb);
        }
    }
    if let Some(ca) = &args.cacert {
        u = u.ca_file(ca);
    }
    let report = u.run(file, url).await?;
    println!(
        "uploader:  {} (sha256 {})",
        report.plugin.source, report.plugin.sha256
    );
    match report.outcome {
        Ok(receipt) => {
            println!(
                "uploaded:  {} ({} bytes, HTTP {}, {} attempt{})",
                receipt.url,
                receipt.bytes_sent,
                receipt.status,
                receipt.attempts,
                if receipt.attempts == 1 { "" } else { "s" }
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(failure) => {
            println!("upload:    failed");
            print_failure(&failure.error);
            for refused in &failure.refused {
                println!("refused:   {refused}");
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

fn print_failure(e: &RunError) {
    match e {
        RunError::InvalidOption { key, message } => {
            println!("error:     option {key}: {message}")
        }
        RunError::Failed {
            status_code,
            output,
        } => {
            println!("status:    {status_code}");
            println!("output:    {output}");
        }
        other => println!("error:     {other}"),
    }
}
