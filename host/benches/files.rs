//! The built-in `files` collector against `zip -r -q -6` of the same
//! tree, in the same run: about 1 GiB of log-like text in 320 files,
//! granted read-only to a 1-node cluster's collector, which has the host
//! read, (redact,) compress in parallel and zip it. Timed from the start
//! request to `collected`; `zip` timed as a process. Also with partial
//! redaction (which `zip` does not do), and the daemon's peak RSS.
//!
//! `cargo bench -p autocollect --bench files` (`FILES_BENCH_MIB=256` for
//! a quicker look).

mod common;

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use autocollect::cluster::LocalCluster;
use autocollect::config::{InputGrant, OptionValue};
use autocollect::coordinator::task::{NodeState, TaskState};
use common::*;
use serde_json::json;

const FILES: usize = 320;

fn main() -> anyhow::Result<()> {
    let rt = runtime()?;
    let total_mib: u64 = std::env::var("FILES_BENCH_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024);
    rt.block_on(async {
        println!("files on {}", machine());
        println!("daemon: {}", daemon_exe().display());
        let tmp = tempfile::tempdir()?;
        let tree = tmp.path().join("logs");
        let bytes = generate(&tree, total_mib << 20)?;
        println!("tree: {FILES} files, {} of log-like text", mib(bytes));

        let cluster = LocalCluster::launch(&daemon_exe(), &tmp.path().join("cluster"), &["n1"], |config| {
            config.collector.plugin = "builtin:files".into();
            config
                .collector
                .options
                .insert("compression".into(), OptionValue::from("deflate:6"));
            config.collector.inputs = vec![InputGrant {
                name: "logs".into(),
                host: tree.clone(),
                guest: "/inputs/logs".into(),
            }];
        })
        .await?;
        let pid = cluster.node("n1").pid().expect("running");
        let admin = cluster.admin("n1");

        let zip_out = tmp.path().join("zip-out.zip");
        let (zip_time, zip_size) = run_zip(&tree, &zip_out)?;
        let (plain, plain_size) = collect(&admin, json!({"nodes": ["n1"]})).await?;
        let (redacted, redacted_size) = collect(
            &admin,
            json!({"nodes": ["n1"], "logRedactionLevel": "partial", "logRedactionSalt": "bench-salt"}),
        )
        .await?;
        let peak = proc_status_bytes(pid, "VmHWM").unwrap_or(0);
        let ratio = |d: Duration| zip_time.as_secs_f64() / d.as_secs_f64();
        println!(
            "zip -r -q -6: {} -> {}",
            fmt_duration(zip_time),
            mib(zip_size)
        );
        println!(
            "files collector: {} -> {}: {:.2}x zip's speed (target >= 1.5x: {}), size {:+.1}% of zip's (target within 5%: {})",
            fmt_duration(plain),
            mib(plain_size),
            ratio(plain),
            if ratio(plain) >= 1.5 { "met" } else { "NOT met" },
            100.0 * (plain_size as f64 / zip_size as f64 - 1.0),
            if (plain_size as f64 / zip_size as f64 - 1.0).abs() <= 0.05 { "met" } else { "NOT met" },
        );
        println!(
            "files collector, partial redaction: {} -> {}: {:.2}x zip's speed (zip without redaction)",
            fmt_duration(redacted),
            mib(redacted_size),
            ratio(redacted),
        );
        println!(
            "daemon peak RSS {} (target < 128 MiB: {})",
            mib(peak),
            if peak < 128 << 20 { "met" } else { "NOT met" }
        );
        Ok(())
    })
}

/// Write `FILES` files of log-like text summing to about `total` bytes,
/// with a `<ud>` tag on every line (so redaction has work).
fn generate(dir: &Path, total: u64) -> anyhow::Result<u64> {
    std::fs::create_dir_all(dir)?;
    let per_file = total / FILES as u64;
    let mut written = 0;
    let mut seq = 0u64;
    for f in 0..FILES {
        let sub = dir.join(format!("svc{}", f % 8));
        std::fs::create_dir_all(&sub)?;
        let mut out =
            std::io::BufWriter::new(std::fs::File::create(sub.join(format!("f{f}.log")))?);
        let mut n = 0;
        while n < per_file {
            seq = seq
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let line = format!(
                "2026-11-29T10:{:02}:{:02}.{:03}Z [{}] conn {} from <ud>user-{}</ud> bucket b{} took {} us, {} items\n",
                (seq >> 8) % 60,
                (seq >> 16) % 60,
                (seq >> 24) % 1000,
                ["info", "debug", "warn", "error"][((seq >> 32) % 4) as usize],
                (seq >> 36) % 100_000,
                (seq >> 40) % 5_000,
                (seq >> 48) % 20,
                (seq >> 20) % 1_000_000,
                (seq >> 12) % 10_000,
            );
            out.write_all(line.as_bytes())?;
            n += line.len() as u64;
        }
        out.flush()?;
        written += n;
    }
    Ok(written)
}

fn run_zip(tree: &Path, out: &Path) -> anyhow::Result<(Duration, u64)> {
    let t = Instant::now();
    let status = std::process::Command::new("zip")
        .args(["-r", "-q", "-6"])
        .arg(out)
        .arg(".")
        .current_dir(tree)
        .status()?;
    let elapsed = t.elapsed();
    anyhow::ensure!(status.success(), "zip failed");
    Ok((elapsed, std::fs::metadata(out)?.len()))
}

async fn collect(
    admin: &autocollect::client::ApiClient,
    params: serde_json::Value,
) -> anyhow::Result<(Duration, u64)> {
    let t = Instant::now();
    let (status, body) = admin
        .request(
            reqwest::Method::POST,
            "/collectLogs/start",
            Some(autocollect::client::RequestBody::Json(params)),
            true,
        )
        .await?;
    anyhow::ensure!(status.is_success(), "{body}");
    let id = body["taskId"].as_str().unwrap_or_default().to_string();
    let task = admin.wait_for_end(&id, Duration::from_secs(3600)).await?;
    let elapsed = t.elapsed();
    anyhow::ensure!(task.status == TaskState::Completed, "{task:?}");
    let n1 = &task.per_node["n1"];
    anyhow::ensure!(n1.status == NodeState::Collected && !n1.partial, "{n1:?}");
    let size = std::fs::metadata(n1.path.as_deref().unwrap_or_default())?.len();
    Ok((elapsed, size))
}
