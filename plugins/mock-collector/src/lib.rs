//! The built-in mock collector: what `cbcollect_info_mock` is to Couchbase.
//!
//! It writes a real zip named like `cbcollect_info`'s output, holding the
//! configured output text and, optionally, an incompressible payload of a
//! given size, so that uploads, memory use and cancel can be exercised
//! without a Couchbase install.
//!
//! Options (all optional):
//!
//! | key | meaning | default |
//! | --- | --- | --- |
//! | `output` | text written to `output.txt` in the zip (and the failure output) | a line naming node and task |
//! | `result` | status code; non-zero makes the collection fail with it | `0` |
//! | `delay-ms` | how long to "collect" before finishing, in milliseconds | `0` |
//! | `artifact-size` | approximate size of the zip in bytes (random payload) | `0` (just the text) |
//!
//! Besides `output.txt` (and `payload.bin`), the zip holds `mock-run.txt`:
//! node, task, the redaction asked for, and when the run started and
//! finished (Unix ms), so tests can check how collections were scheduled.
//!
//! With `logRedactionLevel=partial` in the start request, the zip is named
//! `...-redacted.zip` like `cbcollect_info`'s (the mock has no user data
//! to redact).
//!
//! With `encryptionPassword` in the start request (`encryption-password`
//! in `task.parameters()`), every entry of the zip is encrypted with it,
//! WinZip AES-256 (AE-2), the format `cbcollect_info` writes with
//! pyzipper. The entry names stay readable, as in any zip. The salt of
//! each entry comes from WASI's random numbers. The password is never
//! logged.

use autocollect_sdk::task::Parameters;
use autocollect_sdk::{
    Artifact, CollectOutcome, CollectRequest, Collector, Context, Error, Options, progress,
};
use std::fs::File;
use std::io::{BufWriter, Cursor, Seek, Write};
use std::time::{Duration, Instant, SystemTime};

struct MockCollector;

/// Parsed, validated options.
struct Settings {
    output: Option<String>,
    result: i32,
    delay: Duration,
    artifact_size: u64,
}

impl Settings {
    fn from_options(options: &Options) -> Result<Self, Error> {
        options.check_known(&["output", "result", "delay-ms", "artifact-size"])?;
        Ok(Settings {
            output: options.get("output").map(String::from),
            result: options
                .parse("result", "an integer status code")?
                .unwrap_or(0),
            delay: Duration::from_millis(options.parse("delay-ms", "milliseconds")?.unwrap_or(0)),
            artifact_size: options
                .parse("artifact-size", "a size in bytes")?
                .unwrap_or(0),
        })
    }
}

impl Collector for MockCollector {
    fn validate_options(options: &Options) -> Result<(), Error> {
        Settings::from_options(options).map(|_| ())
    }

    fn collect(request: CollectRequest) -> Result<CollectOutcome, Error> {
        let settings = Settings::from_options(&request.options())?;
        let started = unix_ms(SystemTime::now());
        let ctx = &request.context;
        let output = settings.output.clone().unwrap_or_else(|| {
            format!(
                "autocollect mock collection of node {} for task {}\n",
                ctx.node, ctx.task_id
            )
        });
        autocollect_sdk::info!(
            "mock collection: delay {:?}, artifact {} bytes",
            settings.delay,
            settings.artifact_size
        );

        pretend_to_work(settings.delay);

        if settings.result != 0 {
            return Err(Error::failed(settings.result, output));
        }

        // The mock holds no user data, so "partial redaction" changes only
        // the name, as cbcollect_info names its redacted zip.
        let parameters = Parameters::get();
        let partial = parameters.redact();
        let password = parameters.encryption_password();
        let name = collectinfo_name::zip_name(&ctx.node, SystemTime::now());
        let name = match partial {
            true => format!("{}-redacted.zip", name.trim_end_matches(".zip")),
            false => name,
        };
        let path = request.output_path(&name);
        let run = format!(
            "node={}\ntask={}\nredaction={}\nstarted_unix_ms={started}\nfinished_unix_ms={}\n",
            ctx.node,
            ctx.task_id,
            if partial { "partial" } else { "none" },
            unix_ms(SystemTime::now())
        );
        let size = write_zip(&path, &output, &run, settings.artifact_size, password)
            .with_context(|| format!("writing {name}"))?;
        if password.is_some() {
            autocollect_sdk::info!("{name} is encrypted (AES-256)");
        }
        Ok(CollectOutcome::new(
            Artifact {
                name: name.clone(),
                size,
            },
            format!("wrote {name} ({size} bytes)"),
        ))
    }
}

/// Sleep for `delay` in small steps, reporting progress as we go. Each
/// sleep is a WASI poll, so the host can cancel us between (or during) them.
fn pretend_to_work(delay: Duration) {
    if delay.is_zero() {
        return;
    }
    let start = Instant::now();
    let total_ms = delay.as_millis() as u64;
    loop {
        let elapsed = start.elapsed();
        if elapsed >= delay {
            break;
        }
        let done_ms = elapsed.as_millis() as u64;
        progress(done_ms, total_ms, "collecting (mock)");
        std::thread::sleep((delay - elapsed).min(Duration::from_millis(100)));
    }
    progress(total_ms, total_ms, "collected (mock)");
}

/// Write a zip holding `output.txt` and, if `artifact_size` asks for more,
/// `payload.bin` of incompressible bytes, streamed in 64 KiB chunks. With
/// a `password`, every entry is AES-256 encrypted.
///
/// A zip of up to [`IN_MEMORY`] bytes is put together in memory and
/// written with one call: the zip writer seeks back to fill in each
/// entry's sizes, and through a file every seek is a flush, so a
/// few-hundred-byte zip would otherwise take eight writes, each several
/// host calls.
fn write_zip(
    path: &str,
    output: &str,
    run: &str,
    artifact_size: u64,
    password: Option<&str>,
) -> std::io::Result<u64> {
    let mut file = File::create(path)?;
    if artifact_size <= IN_MEMORY {
        let zip = Cursor::new(Vec::new());
        let bytes = write_entries(zip, output, run, artifact_size, password)?.into_inner();
        file.write_all(&bytes)?;
        return Ok(bytes.len() as u64);
    }
    let mut inner = write_entries(
        BufWriter::with_capacity(1 << 16, file),
        output,
        run,
        artifact_size,
        password,
    )?;
    inner.flush()?;
    let file = inner.into_inner().map_err(|e| e.into_error())?;
    Ok(file.metadata()?.len())
}

/// Zips of at most this size are assembled in memory.
const IN_MEMORY: u64 = 1 << 20;

/// The zip's entries, written to `out`; `out` back when the zip is
/// complete.
fn write_entries<W: Write + Seek>(
    out: W,
    output: &str,
    run: &str,
    artifact_size: u64,
    password: Option<&str>,
) -> std::io::Result<W> {
    use zip::write::SimpleFileOptions;
    let mut zip = zip::ZipWriter::new(out);
    let stored = SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(artifact_size >= u32::MAX as u64);
    let stored = match password {
        Some(password) => stored.with_aes_encryption(zip::AesMode::Aes256, password),
        None => stored,
    };
    zip.start_file("output.txt", stored).map_err(zip_err)?;
    zip.write_all(output.as_bytes())?;
    zip.start_file("mock-run.txt", stored).map_err(zip_err)?;
    zip.write_all(run.as_bytes())?;

    // Headers, data descriptors and central directory cost ~100 bytes a file.
    let payload = artifact_size.saturating_sub((output.len() + run.len()) as u64 + 384);
    if payload > 0 {
        zip.start_file("payload.bin", stored).map_err(zip_err)?;
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let mut chunk = vec![0u8; 1 << 16];
        let mut left = payload;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            rng.fill(&mut chunk[..n]);
            zip.write_all(&chunk[..n])?;
            left -= n as u64;
        }
    }
    zip.finish().map_err(zip_err)
}

fn zip_err(e: zip::result::ZipError) -> std::io::Error {
    std::io::Error::other(e)
}

/// Fast non-cryptographic bytes: the payload only has to not compress.
struct XorShift(u64);

impl XorShift {
    fn fill(&mut self, buf: &mut [u8]) {
        for word in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            word.copy_from_slice(&self.0.to_le_bytes()[..word.len()]);
        }
    }
}

fn unix_ms(t: SystemTime) -> u128 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

autocollect_sdk::export_collector!(MockCollector);
