//! What an unauthenticated attacker costs a daemon, and what the operator
//! and the cluster see meanwhile.
//!
//! 1. Sign-in flood: 256 concurrent connections sending wrong passwords for
//!    a real user, for `FLOOD_SECS` (default 60) seconds, from one address
//!    and then from 256 addresses (127.0.1.x: the per-address throttle
//!    cannot help, the bounded verification queue must). Meanwhile an
//!    admin (already signed in) polls status back to back. Reports the
//!    daemon's peak RSS, the admin's latencies, and how the attackers were
//!    answered.
//! 2. Idle connections: 5,000 connections that never send a byte, held on
//!    one node of a 3-node cluster started with the common default soft
//!    open-file limit of 1,024: `/health` on that node and a whole
//!    collection across the cluster, timed with and without them; and the
//!    same on a node whose cap is set to 1,024 connections
//!    (`server.max_connections`).
//!
//! `cargo bench -p autocollect --bench flood` (`FLOOD_SECS=10` for a
//! quick look).

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use autocollect::cluster::{ADMIN_USER, LocalCluster};
use common::*;
use reqwest::StatusCode;

const ATTACKERS: usize = 256;
const IDLE_CONNECTIONS: usize = 5_000;

fn main() -> anyhow::Result<()> {
    let rt = runtime()?;
    let secs: u64 = std::env::var("FLOOD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    rt.block_on(async {
        println!("flood on {}", machine());
        println!("daemon: {}", daemon_exe().display());
        autocollect::server::listener::raise_open_file_limit();
        sign_in_flood(Duration::from_secs(secs), false).await?;
        sign_in_flood(Duration::from_secs(secs), true).await?;
        idle_connections(0).await?;
        idle_connections(1024).await
    })
}

async fn sign_in_flood(length: Duration, many_addresses: bool) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let cluster = LocalCluster::launch(&daemon_exe(), tmp.path(), &["n1"], |_| {}).await?;
    let node = cluster.node("n1");
    let pid = node.pid().expect("running");
    let admin = cluster.admin("n1");
    admin.status().await?; // signed in once, remembered from now on
    let idle_rss = proc_status_bytes(pid, "VmRSS").unwrap_or(0);
    let url = format!("{}/collectLogs/status", node.url());
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&cluster.ca_file)?)?;

    let attackers: Vec<_> = (0..ATTACKERS)
        .map(|i| {
            let from: IpAddr = if many_addresses {
                Ipv4Addr::new(127, 0, 1 + (i / 250) as u8, 1 + (i % 250) as u8).into()
            } else {
                Ipv4Addr::new(127, 0, 0, 1).into()
            };
            let client = reqwest::Client::builder()
                .local_address(from)
                .tls_built_in_root_certs(false)
                .add_root_certificate(ca.clone())
                .build()
                .expect("client");
            let url = url.clone();
            tokio::spawn(async move {
                let mut answers = [0u64; 5];
                let until = Instant::now() + length;
                while Instant::now() < until {
                    let r = client
                        .get(&url)
                        .basic_auth(ADMIN_USER, Some("wrong"))
                        .send()
                        .await;
                    let slot = match r.map(|r| r.status()) {
                        Ok(StatusCode::UNAUTHORIZED) => 0,
                        Ok(StatusCode::TOO_MANY_REQUESTS) => 1,
                        Ok(StatusCode::SERVICE_UNAVAILABLE) => 2,
                        Ok(_) => 3,
                        Err(_) => 4,
                    };
                    answers[slot] += 1;
                }
                answers
            })
        })
        .collect();

    let mut latencies = Vec::new();
    let until = Instant::now() + length;
    while Instant::now() < until {
        let t = Instant::now();
        admin.status().await?;
        latencies.push(t.elapsed());
    }
    let mut answers = [0u64; 5];
    for a in attackers {
        for (total, n) in answers.iter_mut().zip(a.await?) {
            *total += n;
        }
    }
    let s = Samples::new(latencies);
    let peak = proc_status_bytes(pid, "VmHWM").unwrap_or(0);
    let after = proc_status_bytes(pid, "VmRSS").unwrap_or(0);
    let total: u64 = answers.iter().sum();
    println!(
        "sign-in flood, {ATTACKERS} connections from {}, {:.0} s: daemon RSS idle {}  peak {} (target < 128 MiB: {})  after {}",
        if many_addresses {
            "256 addresses"
        } else {
            "one address"
        },
        length.as_secs_f64(),
        mib(idle_rss),
        mib(peak),
        if peak < 128 << 20 { "met" } else { "NOT met" },
        mib(after),
    );
    println!(
        "    admin status n={} median {}  p99 {} (target < 100 ms: {})  max {}",
        s.len(),
        fmt_duration(s.median()),
        fmt_duration(s.percentile(99.0)),
        if s.percentile(99.0) < Duration::from_millis(100) {
            "met"
        } else {
            "NOT met"
        },
        fmt_duration(s.percentile(100.0)),
    );
    println!(
        "    attackers: {total} answers ({:.0}/s): 401 {} (argon2 checks run: {:.1}/s), 429 {}, 503 {}, other {}, transport errors {}",
        total as f64 / length.as_secs_f64(),
        answers[0],
        answers[0] as f64 / length.as_secs_f64(),
        answers[1],
        answers[2],
        answers[3],
        answers[4],
    );
    Ok(())
}

/// Set this process's soft open-file limit (children inherit it).
fn set_soft_open_files(n: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = n.min(limit.rlim_max);
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
}

async fn idle_connections(max_connections: usize) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    // The daemons start as a service often does: soft limit 1,024.
    set_soft_open_files(1024);
    let cluster = LocalCluster::launch(&daemon_exe(), tmp.path(), &["n1", "n2", "n3"], |c| {
        if c.node == "n1" {
            c.server.max_connections = max_connections;
        }
    })
    .await;
    autocollect::server::listener::raise_open_file_limit();
    let cluster = cluster?;
    let n1 = cluster.node("n1");
    let pid = n1.pid().expect("running");
    let admin = cluster.admin("n2");

    let measure = |label: &'static str| {
        let health = cluster.admin("n1");
        let admin = admin.clone();
        async move {
            let health_times: Vec<Duration> = {
                let mut v = Vec::new();
                for _ in 0..20 {
                    let t = Instant::now();
                    health.health().await?;
                    v.push(t.elapsed());
                }
                v
            };
            let mut collect_times = Vec::new();
            for _ in 0..5 {
                collect_times.push(timed_collection(&admin).await?);
            }
            let h = Samples::new(health_times);
            let c = Samples::new(collect_times);
            println!(
                "    {label:<28} /health on n1 median {}  max {};  3-node collection median {}  max {}",
                fmt_duration(h.median()),
                fmt_duration(h.percentile(100.0)),
                fmt_duration(c.median()),
                fmt_duration(c.percentile(100.0)),
            );
            anyhow::Ok(())
        }
    };
    println!(
        "idle connections on n1 ({}):",
        match max_connections {
            0 => "connection cap from the raised open-file limit".to_string(),
            n => format!("server.max_connections = {n}"),
        }
    );
    measure("no idle connections").await?;
    let before = proc_status_bytes(pid, "VmRSS").unwrap_or(0);
    let t = Instant::now();
    let mut idle = Vec::with_capacity(IDLE_CONNECTIONS);
    for _ in 0..IDLE_CONNECTIONS {
        idle.push(tokio::net::TcpStream::connect(n1.addr).await?);
    }
    let opened = t.elapsed();
    // Let the daemon accept them all (a /health answer comes after them).
    cluster.admin("n1").health().await?;
    let with = proc_status_bytes(pid, "VmRSS").unwrap_or(0);
    measure("with 5,000 idle connections").await?;
    // How many of them the daemon closed to make room (they read EOF).
    let mut closed = 0;
    for conn in &idle {
        let mut byte = [0u8; 1];
        if let Ok(0) = conn.try_read(&mut byte) {
            closed += 1;
        }
    }
    println!(
        "    5,000 idle connections opened in {}; n1 RSS {} -> {}; closed by n1 to make room: {closed}",
        fmt_duration(opened),
        mib(before),
        mib(with),
    );
    Ok(())
}
