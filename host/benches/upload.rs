//! Upload throughput: a node's artifact PUT by the built-in `http-uploader`
//! plugin (inside a real daemon, through the host's `wasi:http`) against
//! `curl --upload-file` of the same file to the same local server, in the
//! same run. Throughput is measured by the server, from the request's
//! arrival to its last body byte, the same way for both. Plain HTTP for a
//! 64 MiB and a 1 GiB artifact, then 1 GiB over TLS (the server's
//! certificate from a local CA: `[upload] ca_file` for the daemon,
//! `--cacert` for curl). Also the daemon's peak RSS: it must not grow with
//! size.
//!
//! `cargo bench -p autocollect --bench upload` (needs ~2.5 GiB of disk in
//! the temp dir); `UPLOAD_BENCH=tls` runs the TLS row alone.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use autocollect::client::StartOptions;
use autocollect::cluster::LocalCluster;
use autocollect::coordinator::task::NodeState;
use autocollect::local_tls::{LocalCa, serve_tls};
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use common::*;
use futures::StreamExt;

/// Runs of each, interleaved (plugin, curl, plugin, curl...) so both see
/// the same machine state.
const RUNS: usize = 5;

/// One PUT as the server saw it.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    bytes: u64,
    /// From the handler's start (headers read) to the body's last byte.
    duration: Duration,
}

type Log = Arc<Mutex<Vec<Received>>>;

async fn receive(State(log): State<Log>, request: Request) -> StatusCode {
    if request.method() != Method::PUT {
        return StatusCode::OK; // the coordinator's HEAD preflight
    }
    let path = request.uri().path().to_string();
    let started = Instant::now();
    let mut body = request.into_body().into_data_stream();
    let mut bytes = 0u64;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(c) => bytes += c.len() as u64,
            Err(_) => return StatusCode::BAD_REQUEST,
        }
    }
    log.lock().unwrap().push(Received {
        path,
        bytes,
        duration: started.elapsed(),
    });
    StatusCode::OK
}

/// Where the server listens: plain HTTP, and HTTPS with a certificate for
/// 127.0.0.1 signed by a CA made for the run (its PEM in a file).
struct Server {
    http: SocketAddr,
    https: SocketAddr,
    ca_file: PathBuf,
    log: Log,
}

async fn serve(dir: &Path) -> anyhow::Result<Server> {
    let log = Log::default();
    let app = axum::Router::new()
        .fallback(receive)
        .with_state(log.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let http = listener.local_addr()?;
    let plain = app.clone();
    tokio::spawn(async move { axum::serve(listener, plain).await });

    let ca = LocalCa::new("autocollect upload bench CA")?;
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca.pem())?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let https = listener.local_addr()?;
    tokio::spawn(serve_tls(listener, ca.server_config(&["127.0.0.1"])?, app));
    Ok(Server {
        http,
        https,
        ca_file,
        log,
    })
}

fn main() -> anyhow::Result<()> {
    let rt = runtime()?;
    rt.block_on(async {
        println!("upload on {}", machine());
        println!("daemon: {}", daemon_exe().display());
        let dir = tempfile::tempdir()?;
        let server = serve(dir.path()).await?;
        if std::env::var("UPLOAD_BENCH").as_deref() != Ok("tls") {
            for size in [64u64 << 20, 1 << 30] {
                bench(size, false, &server).await?;
            }
        }
        bench(1 << 30, true, &server).await?;
        Ok(())
    })
}

fn gib_per_s(r: &Received) -> f64 {
    r.bytes as f64 / (1u64 << 30) as f64 / r.duration.as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn bench(size: u64, tls: bool, server: &Server) -> anyhow::Result<()> {
    let log = &server.log;
    let (scheme, addr, target) = match tls {
        false => ("http", server.http, 0.8),
        true => ("https", server.https, 0.9),
    };
    let tmp = tempfile::tempdir()?;
    let cluster = LocalCluster::launch(&daemon_exe(), tmp.path(), &["n1"], |config| {
        config.upload.allow_http = true;
        config.upload.ca_file = Some(server.ca_file.clone());
        config
            .collector
            .options
            .insert("artifact-size".into(), (size as i64).into());
    })
    .await?;
    let admin = cluster.admin("n1");
    let pid = cluster.node("n1").pid().expect("running");
    let idle = proc_status_bytes(pid, "VmRSS").unwrap_or(0);
    let options = StartOptions {
        nodes: "all".into(),
        upload_host: Some(format!("{scheme}://{addr}")),
        customer: Some("bench".into()),
        ticket: Some("1".into()),
        ..Default::default()
    };

    let mut plugin = Vec::new();
    let mut curl = Vec::new();
    let mut curl_wall = Vec::new();
    for i in 0..RUNS {
        log.lock().unwrap().clear();
        let started = admin.start_with(&options).await?;
        let task = admin
            .wait_for_end(&started.task_id, Duration::from_secs(600))
            .await?;
        let n1 = &task.per_node["n1"];
        anyhow::ensure!(n1.status == NodeState::Uploaded, "{n1:?}");
        let got = log.lock().unwrap()[0].clone();
        anyhow::ensure!(got.path.starts_with("/bench/1/"), "wrong URL: {got:?}");
        anyhow::ensure!(got.bytes >= size - 4096, "short upload: {got:?}");
        plugin.push(got);
        admin.wait_idle(30.0).await?;

        // The same file, by curl, to the same server.
        let artifact = n1.path.clone().expect("artifact path");
        log.lock().unwrap().clear();
        let t = Instant::now();
        let out = Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(&server.ca_file)
            .arg("--upload-file")
            .arg(&artifact)
            .arg(format!("{scheme}://{addr}/curl/{i}/artifact.zip"))
            .output()?;
        curl_wall.push(t.elapsed());
        anyhow::ensure!(out.stdout == b"200", "curl: {out:?}");
        curl.push(log.lock().unwrap()[0].clone());
        std::fs::remove_file(&artifact)?;
    }
    let peak = proc_status_bytes(pid, "VmHWM").unwrap_or(0);

    let p = median(plugin.iter().map(gib_per_s).collect());
    let c = median(curl.iter().map(gib_per_s).collect());
    println!(
        "{} over {}: http-uploader {:.2} GiB/s, curl {:.2} GiB/s (median of {RUNS}; curl wall {}) -> ratio {:.2}x curl (target >= {target}x: {})",
        mib(size),
        if tls { "TLS" } else { "HTTP" },
        p,
        c,
        fmt_duration(Samples::new(curl_wall).median()),
        p / c,
        if p / c >= target { "met" } else { "NOT met" }
    );
    println!(
        "          daemon RSS idle {}, peak over {RUNS} collect+upload runs {}",
        mib(idle),
        mib(peak)
    );
    Ok(())
}
