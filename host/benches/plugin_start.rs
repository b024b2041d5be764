//! Plugin start cost: compiling a component cold, loading it from the
//! on-disk cache, and, with the compiled component cached in memory (the
//! daemon's steady state), a fresh sandboxed instance plus one call, with
//! instances from the pool (as the daemon runs) and on demand (its
//! fallback, and what `autocollect plugin run` uses), and where that time
//! goes: the sandbox (WASI context and store), the instantiation, the
//! call.
//! Then the mock collector writing a 64 MiB zip against `zip -0` storing
//! a 64 MiB file. Then, when `plugins/examples/build.sh` has built them
//! into `target/examples/`, the example collectors written in Python and
//! JavaScript next to the Rust mock: size, compile, and a run.
//!
//! `cargo bench -p autocollect --bench plugin_start`
//! (`PLUGIN_START_BENCH=languages` runs only the languages part,
//! `PLUGIN_START_BENCH=steady` only the instantiate + call rows,
//! `PLUGIN_START_BENCH=pooled` those without the on-demand one, for a
//! profile of the pooled path, `PLUGIN_START_OTHER=FILE` adds a compile
//! of another plugin after the languages' ones,
//! `PLUGIN_START_BENCH=file PLUGIN_START_FILE=X.wasm` the start of a
//! collector of your own,
//! `PLUGIN_START_BENCH=variants` the pool settings compared, before and
//! after and the candidates measured for issue 13, in one process.)

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use autocollect::plugin::collector::{CollectJob, CollectorPlugin};
use autocollect::plugin::exec::ExecPolicy;
use autocollect::plugin::sandbox::{RunLabels, RunSetup, new_store};
use autocollect::plugin::{PluginEvent, PluginHost, PluginSource, PoolSizing, RunLimits, builtin};
use common::*;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const CALLS: usize = 2000;
const ZIP_BYTES: u64 = 64 << 20;

fn main() -> anyhow::Result<()> {
    let rt = runtime()?;
    rt.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    println!("plugin_start on {}", machine());
    let tmp = tempfile::tempdir()?;
    match std::env::var("PLUGIN_START_BENCH").as_deref() {
        Ok("languages") => return languages(tmp.path()).await,
        Ok("steady") => return steady(&PluginHost::new(None)?, tmp.path(), true).await,
        Ok("pooled") => return steady(&PluginHost::new(None)?, tmp.path(), false).await,
        Ok("variants") => return variants(tmp.path()).await,
        Ok("file") => return one_file(tmp.path()).await,
        _ => {}
    }
    let mock = PluginSource::Builtin("mock-collector");
    let (_, mock_bytes) = builtin::lookup("mock-collector").unwrap();

    // Cold: what the first start of a daemon pays without a disk cache.
    let host = PluginHost::new(None)?;
    let cold = time_n(0, 3, || {
        host.compile_uncached(mock_bytes).unwrap();
    });
    row("compile mock-collector (cold)", &cold);

    // Disk cache: what a daemon restart pays.
    let cache = tmp.path().join("cache");
    PluginHost::new(Some(cache.clone()))?.component(&mock)?;
    let mut samples = Vec::new();
    for _ in 0..20 {
        let host = PluginHost::new(Some(cache.clone()))?;
        let t = Instant::now();
        host.component(&mock)?;
        samples.push(t.elapsed());
    }
    row(
        "load mock-collector from disk cache",
        &Samples::new(samples),
    );

    steady(&host, tmp.path(), true).await?;
    mock_zip_vs_zip(&host, tmp.path()).await?;
    languages(tmp.path()).await
}

/// Steady state: instantiate + one no-op collect per run, on demand
/// then from the pool; and where the time goes. Two no-op collectors:
/// `test_noop`, the smallest on the SDK, and `test_misbehave` in its
/// `noop` mode, which imports every WASI interface for its escape tests
/// (wasmtime's instantiation does work for each imported function, so
/// the two rows tell the host's cost from the imports').
/// `on_demand: false` leaves out the on-demand rows (for a profile of
/// the pooled path alone).
async fn steady(host: &Arc<PluginHost>, tmp: &Path, on_demand: bool) -> anyhow::Result<()> {
    let calls = calls();
    let pooled = pooled_host()?;
    println!("  pool: {}", pooled.allocator());
    // (file, what it is, its options for a no-op collect)
    type Noop<'a> = (&'a str, &'a str, &'a [(String, String)]);
    let noops: [Noop; 2] = [
        ("test_noop", "the SDK's smallest collector", &[]),
        (
            "test_misbehave",
            "mode=noop, every WASI interface imported",
            &[("mode".to_string(), "noop".to_string())],
        ),
    ];
    for (file, what, options) in noops {
        let source = PluginSource::File(builtin::build_output(file));
        let lowered = lowered_imports(&pooled, &source)?;
        println!("{file} ({what}; {lowered} imported functions):");
        let out = tmp.join("noop");
        std::fs::create_dir_all(&out)?;
        if on_demand {
            let noop = CollectorPlugin::load(host, source.clone())?;
            let on_demand = collect_n(&noop, options, &out, calls + 100, 100).await;
            row(
                "  instantiate + no-op collect (cached, on-demand)",
                &on_demand,
            );
        }
        let noop = CollectorPlugin::load(&pooled, source)?;
        let per_call = collect_n(&noop, options, &out, calls + 100, 100).await;
        row("  instantiate + no-op collect (cached, pooling)", &per_call);
        println!(
            "    target: median <= 20 µs -> {}",
            if per_call.median() <= Duration::from_micros(20) {
                "met"
            } else {
                "NOT met"
            }
        );
        let sandbox = time_n(100, calls, || {
            let (tx, _rx) = watch::channel(None);
            let setup = collect_setup(&out, tx);
            drop(new_store(pooled.engine(), setup).unwrap());
        });
        row("    of which: sandbox (WasiCtx + store)", &sandbox);
        let mut samples = Vec::with_capacity(calls);
        for i in 0..calls + 100 {
            let t = Instant::now();
            noop.instantiate_only().await.expect("instantiate");
            if i >= 100 {
                samples.push(t.elapsed());
            }
        }
        row(
            "    bare store + instantiate (pooling)",
            &Samples::new(samples),
        );
        row(
            "    bare store + instantiate + validate-options",
            &validate_n(&noop, options, calls, 100).await,
        );
    }
    Ok(())
}

/// `PLUGIN_START_CALLS=N` (default 2000): timed calls per row, more for
/// a profile.
fn calls() -> usize {
    std::env::var("PLUGIN_START_CALLS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(CALLS)
}

/// `calls` timed runs of instantiate + `validate-options`, after
/// `warmup` untimed ones.
async fn validate_n(
    plugin: &CollectorPlugin,
    options: &[(String, String)],
    calls: usize,
    warmup: usize,
) -> Samples {
    let mut samples = Vec::with_capacity(calls);
    for i in 0..calls + warmup {
        let t = Instant::now();
        plugin
            .validate_options(options)
            .await
            .expect("validate-options");
        if i >= warmup {
            samples.push(t.elapsed());
        }
    }
    Samples::new(samples)
}

/// How many functions `source` imports: what wasmtime's instantiation
/// does work for, each time.
fn lowered_imports(host: &PluginHost, source: &PluginSource) -> anyhow::Result<usize> {
    use wasmtime::component::types::ComponentItem;
    let component = host.component(source)?;
    let engine = host.engine();
    let functions = |item: &ComponentItem| match item {
        ComponentItem::ComponentFunc(_) => 1,
        ComponentItem::ComponentInstance(instance) => instance
            .exports(engine)
            .filter(|(_, item)| matches!(item.ty, ComponentItem::ComponentFunc(_)))
            .count(),
        _ => 0,
    };
    Ok(component
        .component_type()
        .imports(engine)
        .map(|(_, item)| functions(&item.ty))
        .sum())
}

/// `PLUGIN_START_BENCH=file PLUGIN_START_FILE=X.wasm`: a collector of
/// your own, started as the daemon starts it (pooling, compiled once):
/// instantiate + `validate-options` with no option, `PLUGIN_START_CALLS`
/// times (default 2000), and its imported functions.
async fn one_file(tmp: &Path) -> anyhow::Result<()> {
    let file = std::env::var_os("PLUGIN_START_FILE")
        .ok_or_else(|| anyhow::anyhow!("PLUGIN_START_FILE=X.wasm names the collector"))?;
    let host = pooled_host_cached(Some(tmp.join("cache")))?;
    let source = PluginSource::File(PathBuf::from(&file));
    let plugin = CollectorPlugin::load(&host, source.clone())?;
    println!(
        "{} ({} imported functions):",
        Path::new(&file).display(),
        lowered_imports(&host, &source)?
    );
    row(
        "  instantiate + validate-options (pooling)",
        &validate_n(&plugin, &[], calls(), 20).await,
    );
    Ok(())
}

/// Engine and pool settings, each on its own pooled host, measured in
/// one process with their runs interleaved (rounds of 100 per setting),
/// so that the load of a shared machine falls on all alike.
async fn variants(tmp: &Path) -> anyhow::Result<()> {
    use autocollect::plugin::sandbox::BENCH_SPAWNED_STDIO as SPAWNED_STDIO;
    use std::sync::atomic::Ordering;
    use wasmtime::{Config, Enabled, PoolingAllocationConfig as Pool};
    type Tune = fn(&mut Config, &mut Pool);
    let sizing = PoolSizing::for_limits([limits().memory_bytes]);
    // `tune` runs after the daemon's settings (`PoolSizing::config`);
    // `true`: stdout/stderr as before, a spawned writer task per stream.
    let before: Tune = |_, p| {
        p.pagemap_scan(Enabled::No)
            .linear_memory_keep_resident(0)
            .table_keep_resident(0);
    };
    let list: Vec<(&str, bool, Tune)> = vec![
        ("before (madvise reset, spawned stdio)", true, before),
        ("madvise reset, direct stdio", false, before),
        ("after (the daemon's settings)", false, |_, _| {}),
        ("after, keep_resident 64 KiB", false, |_, p| {
            p.linear_memory_keep_resident(64 << 10);
        }),
        ("after, keep_resident 1 MiB", false, |_, p| {
            p.linear_memory_keep_resident(1 << 20);
        }),
        ("after + decommit_batch_size(8)", false, |_, p| {
            p.decommit_batch_size(8);
        }),
        ("after + reservation 256M, guard 64K", false, |c, _| {
            c.memory_reservation(256 << 20)
                .memory_guard_size(64 << 10)
                .guard_before_linear_memory(false);
        }),
        ("after + no signals-based traps", false, |c, _| {
            c.signals_based_traps(false).memory_guard_size(0);
        }),
        ("no PAGEMAP_SCAN (fallback: memset 64K)", false, |_, p| {
            p.pagemap_scan(Enabled::No)
                .linear_memory_keep_resident(64 << 10)
                .table_keep_resident(64 << 10);
        }),
    ];
    let noop_source = PluginSource::File(builtin::build_output("test_misbehave"));
    let options = [("mode".to_string(), "noop".to_string())];
    let out = tmp.join("noop");
    std::fs::create_dir_all(&out)?;
    struct Variant {
        label: &'static str,
        spawned_stdio: bool,
        plugin: CollectorPlugin,
        engine: wasmtime::Engine,
        collect: Vec<Duration>,
        instantiate: Vec<Duration>,
        validate: Vec<Duration>,
        runs: usize,
        switches: u64,
    }
    // `PLUGIN_START_ONLY=TEXT`: only the settings whose label has TEXT.
    let only = std::env::var("PLUGIN_START_ONLY").unwrap_or_default();
    let mut variants = Vec::new();
    for (label, spawned_stdio, tune) in list {
        if label.contains(only.as_str()) {
            let host = PluginHost::pooled_tuned(None, sizing, tune)?;
            anyhow::ensure!(
                matches!(host.allocator(), autocollect::plugin::Allocator::Pooling(_)),
                "{label}: no pool: {}",
                host.allocator()
            );
            variants.push(Variant {
                label,
                spawned_stdio,
                plugin: CollectorPlugin::load(&host, noop_source.clone())?,
                engine: host.engine().clone(),
                collect: Vec::new(),
                instantiate: Vec::new(),
                validate: Vec::new(),
                runs: 0,
                switches: 0,
            });
        }
    }
    // `PLUGIN_START_ROUNDS=N` (default 20), after one unrecorded round.
    let rounds: usize = std::env::var("PLUGIN_START_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(20);
    const PER_ROUND: usize = 100;
    for round in 0..=rounds {
        for v in &mut variants {
            SPAWNED_STDIO.store(v.spawned_stdio, Ordering::Relaxed);
            let switches = context_switches();
            let collect = collect_n(&v.plugin, &options, &out, PER_ROUND, 0).await;
            let switches = context_switches() - switches;
            let mut instantiate = Vec::with_capacity(PER_ROUND);
            let mut validate = Vec::with_capacity(PER_ROUND);
            for _ in 0..PER_ROUND {
                let t = Instant::now();
                v.plugin.instantiate_only().await.expect("instantiate");
                instantiate.push(t.elapsed());
                let t = Instant::now();
                v.plugin
                    .validate_options(&options)
                    .await
                    .expect("validate-options");
                validate.push(t.elapsed());
            }
            if round > 0 {
                v.collect.extend(collect.0);
                v.instantiate.extend(instantiate);
                v.validate.extend(validate);
                v.runs += PER_ROUND;
                v.switches += switches;
            }
        }
    }
    SPAWNED_STDIO.store(false, Ordering::Relaxed);
    let mut base = None;
    for v in variants {
        let collect = Samples::new(v.collect);
        let base = *base.get_or_insert(collect.median());
        row(v.label, &collect);
        println!(
            "  median / first row: {:.2}; context switches per collect (all threads): {:.2}",
            collect.median().as_secs_f64() / base.as_secs_f64(),
            v.switches as f64 / v.runs as f64
        );
        row("  bare store + instantiate", &Samples::new(v.instantiate));
        row(
            "  bare store + instantiate + validate-options",
            &Samples::new(v.validate),
        );
        if let Some(m) = v.engine.pooling_allocator_metrics() {
            println!(
                "  kept resident in released slots: {} KiB of memory ({} warm slots), {} KiB of tables",
                m.unused_memory_bytes_resident() >> 10,
                m.unused_warm_memories(),
                m.unused_table_bytes_resident() >> 10
            );
        }
    }
    Ok(())
}

/// Context switches of all this process's threads so far (voluntary and
/// not), from /proc.
fn context_switches() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// The example collectors in other languages (`plugins/examples/`), next
/// to the Rust mock, each as a file the daemon would load: its size, a
/// cold compile, a load from the disk cache, then with the compiled
/// component cached, instantiate + `validate-options` (a no-op call) and
/// instantiate + one `collect` (each writes a small zip of its own: the
/// mock its default few hundred bytes, the examples their three-entry
/// report). Each run gets a fresh output directory (made and removed
/// outside the timing).
async fn languages(tmp: &Path) -> anyhow::Result<()> {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/examples");
    let mock = tmp.join("mock_collector.wasm");
    std::fs::write(&mock, builtin::lookup("mock-collector").unwrap().1)?;
    let mut plugins: Vec<(&str, PathBuf)> = vec![("rust (mock-collector)", mock)];
    for (label, file) in [
        ("python (componentize-py)", "python_collector.wasm"),
        ("javascript (componentize-js)", "js_collector.wasm"),
    ] {
        let path = examples.join(file);
        if path.exists() {
            plugins.push((label, path));
        } else {
            println!(
                "{label}: {} is not built (plugins/examples/build.sh): skipped",
                path.display()
            );
        }
    }
    let cache = tmp.join("languages-cache");
    // `PLUGIN_START_OTHER=FILE`: a different plugin in one of these
    // languages (e.g. the `plugin new --lang python` template, built),
    // compiled cold and after all of the above, as `plugin run` would in a
    // session that ran them first.
    if let Some(other) = std::env::var_os("PLUGIN_START_OTHER") {
        let other = std::fs::read(&other)?;
        let cold_host = PluginHost::new(None)?;
        let cold = time_n(0, 3, || {
            cold_host.compile_uncached(&other).unwrap();
        });
        // Its first compile in each session (a second would find all of
        // its own functions).
        let mut samples = Vec::new();
        for _ in 0..3 {
            let authoring = PluginHost::for_authoring()?;
            for (_, path) in &plugins {
                authoring.compile_uncached(&std::fs::read(path)?)?;
            }
            let t = Instant::now();
            authoring.compile_uncached(&other)?;
            samples.push(t.elapsed());
        }
        let warm = Samples::new(samples);
        println!("PLUGIN_START_OTHER ({} bytes):", other.len());
        row("  compile (cold)", &cold);
        row("  compile after the plugins above (plugin run)", &warm);
    }
    for (label, path) in plugins {
        let bytes = std::fs::read(&path)?;
        println!(
            "{label}: {} ({} bytes)",
            mib(bytes.len() as u64),
            bytes.len()
        );
        let host = PluginHost::new(None)?;
        let cold = time_n(0, 3, || {
            host.compile_uncached(&bytes).unwrap();
        });
        row("  compile (cold)", &cold);

        // `plugin run --watch` after a rebuild that left the code alone
        // (an edited app.py changes the memory snapshot, not the code).
        let authoring = PluginHost::for_authoring()?;
        authoring.compile_uncached(&bytes)?;
        let warm = time_n(0, 3, || {
            authoring.compile_uncached(&bytes).unwrap();
        });
        row("  compile again, its functions kept (plugin run)", &warm);

        let source = PluginSource::File(path.clone());
        PluginHost::new(Some(cache.clone()))?.component(&source)?;
        let mut samples = Vec::new();
        for _ in 0..10 {
            let host = PluginHost::new(Some(cache.clone()))?;
            let t = Instant::now();
            host.component(&source)?;
            samples.push(t.elapsed());
        }
        row("  load from disk cache", &Samples::new(samples));

        for (allocator, host) in [
            ("on-demand", PluginHost::new(Some(cache.clone()))?),
            ("pooling", pooled_host_cached(Some(cache.clone()))?),
        ] {
            let plugin = CollectorPlugin::load(&host, source.clone())?;
            row(
                &format!("  instantiate + validate-options ({allocator})"),
                &validate_n(&plugin, &[], 200, 20).await,
            );

            let mut samples = Vec::new();
            for i in 0..220 {
                let out = tmp.join("languages-out");
                std::fs::create_dir_all(&out)?;
                let (tx, _rx) = watch::channel(None);
                let t = Instant::now();
                plugin.collect(job(&[], &out, tx)).await.expect("collect");
                if i >= 20 {
                    samples.push(t.elapsed());
                }
                std::fs::remove_dir_all(&out)?;
            }
            row(
                &format!("  instantiate + one small collect ({allocator})"),
                &Samples::new(samples),
            );
        }
    }
    Ok(())
}

/// A host as the daemon makes one: instances from a pool sized for the
/// bench's memory limit.
fn pooled_host() -> anyhow::Result<Arc<PluginHost>> {
    pooled_host_cached(None)
}

fn pooled_host_cached(cache: Option<PathBuf>) -> anyhow::Result<Arc<PluginHost>> {
    let host = PluginHost::pooled(cache, PoolSizing::for_limits([limits().memory_bytes]))?;
    anyhow::ensure!(
        matches!(host.allocator(), autocollect::plugin::Allocator::Pooling(_)),
        "no pool: {}",
        host.allocator()
    );
    Ok(host)
}

/// The sandbox of a collect run as [`CollectorPlugin::collect`] sets it
/// up: the output directory preopened, the exec policy, progress.
fn collect_setup<'a>(out: &'a Path, progress: watch::Sender<Option<PluginEvent>>) -> RunSetup<'a> {
    RunSetup {
        labels: labels(),
        output_dir: Some(out),
        artifact_dir: None,
        http_origin: None,
        http_route: None,
        http_tls: None,
        exec: Some(Arc::new(ExecPolicy::default())),
        task_parameters: Vec::new(),
        inputs: &[],
        budget: None,
        limits: limits(),
        progress: Some(progress),
        observer: None,
        cancel: CancellationToken::new(),
    }
}

/// Time `n` collect runs of `plugin` (the first `warmup` not recorded).
async fn collect_n(
    plugin: &CollectorPlugin,
    options: &[(String, String)],
    out: &Path,
    n: usize,
    warmup: usize,
) -> Samples {
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let (tx, _rx) = watch::channel(None);
        let t = Instant::now();
        plugin
            .collect(job(options, out, tx))
            .await
            .expect("collect");
        if i >= warmup {
            samples.push(t.elapsed());
        }
    }
    Samples::new(samples)
}

/// The mock's 64 MiB stored zip (it also generates the bytes) against
/// `zip -0` storing an existing 64 MiB file: what a user would otherwise run.
async fn mock_zip_vs_zip(host: &Arc<PluginHost>, tmp: &Path) -> anyhow::Result<()> {
    let mock = CollectorPlugin::load(host, PluginSource::Builtin("mock-collector"))?;
    let options = [("artifact-size".to_string(), ZIP_BYTES.to_string())];
    let mut samples = Vec::new();
    for _ in 0..5 {
        let out = tmp.join("mock-zip");
        std::fs::create_dir_all(&out)?;
        let (tx, _rx) = watch::channel(None);
        let t = Instant::now();
        mock.collect(job(&options, &out, tx))
            .await
            .expect("mock collect");
        samples.push(t.elapsed());
        std::fs::remove_dir_all(&out)?;
    }
    let mock_zip = Samples::new(samples);

    let dir = tmp.join("zip-input");
    std::fs::create_dir_all(&dir)?;
    let payload = dir.join("payload.bin");
    let mut bytes = vec![0u8; ZIP_BYTES as usize];
    rand::fill(&mut bytes[..]);
    std::fs::write(&payload, &bytes)?;
    drop(bytes);
    let archive = tmp.join("zip-output.zip");
    let zip = time_n(1, 5, || {
        let _ = std::fs::remove_file(&archive);
        let status = Command::new("zip")
            .args(["-0", "-q"])
            .arg(&archive)
            .arg("payload.bin")
            .current_dir(&dir)
            .status()
            .expect("run zip (installed by .ci/setup)");
        assert!(status.success());
    });
    row("mock-collector: 64 MiB zip (generate + store)", &mock_zip);
    row("zip -0: store a 64 MiB file", &zip);
    println!(
        "  ratio mock/zip (median): {:.2}x",
        mock_zip.median().as_secs_f64() / zip.median().as_secs_f64()
    );
    Ok(())
}

fn row(what: &str, s: &Samples) {
    println!(
        "{what:<48} n={:<5} median {:>10}  p90 {:>10}  p99 {:>10}  min {:>10}",
        s.len(),
        fmt_duration(s.median()),
        fmt_duration(s.percentile(90.0)),
        fmt_duration(s.percentile(99.0)),
        fmt_duration(s.min()),
    );
}

/// A collection run as a node runs one, with no programs to start.
fn job<'a>(
    options: &'a [(String, String)],
    out: &'a Path,
    progress: watch::Sender<Option<PluginEvent>>,
) -> CollectJob<'a> {
    CollectJob {
        labels: labels(),
        options,
        output_dir: out,
        limits: limits(),
        exec: Arc::new(ExecPolicy::default()),
        inputs: &[],
        budget: None,
        parameters: Vec::new(),
        progress,
        observer: None,
        cancel: CancellationToken::new(),
        urgent: Default::default(),
    }
}

fn labels() -> RunLabels {
    RunLabels {
        plugin: "bench".into(),
        task_id: "bench".into(),
        node: "bench".into(),
    }
}

fn limits() -> RunLimits {
    RunLimits {
        timeout: Duration::from_secs(120),
        memory_bytes: 256 << 20,
    }
}
