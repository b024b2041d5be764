//! A deliberately hostile collector used by autocollect's sandbox tests.
//!
//! The `mode` option picks the misbehaviour:
//!
//! | mode | what it does | what the host must do |
//! | --- | --- | --- |
//! | `noop` | returns at once with no artifact | (benchmarks: the cost of a call) |
//! | `spin` | loops forever without yielding | interrupt it at the deadline |
//! | `alloc` | grows memory without bound | stop it at the memory cap |
//! | `escape` | tries files outside its directory, env vars, sockets | deny all; it reports what it saw |
//! | `bad-artifact` | claims an artifact outside its directory | refuse the outcome |
//! | `log-flood` | logs a million lines | cap the log, stay responsive |
//! | `trap` | panics | report the trap as a failure |
//! | `symlink-upload` | writes `a.zip`, and a symlink `upload` to `target` (outside) | never follow it: stage elsewhere |
//! | `symlink-artifact` | reports `a.zip`, a symlink to `target` | refuse it: not a regular file |
//! | `linked-artifact` | reports `a.zip`, a second hard link of another file | refuse it: more than one link |
//! | `fill-disk` | writes one file without end | stop it at its byte budget |
//! | `many-files` | creates empty files without end | stop it at its file budget |
//! | `spawn-many` | starts `program` (with `args`) until refused | refuse beyond `exec_max_processes` |
//! | `grants` | lists its input grants, reads the files in `read`, lists the directories in `list`, tries to change `write` in every way; reports each attempt in its artifact `report.txt` | read what is granted, refuse every change, refuse symlinks out of a grant |
//! | `archive` | writes `archive.zip` with the host's `archive`: `gen/0.txt`..`gen/2.txt` from bytes, `files/PATH` for each of `files` and `redacted/PATH` for each of `redact` (add-file from grant `grant`), tries each of `escape`; `report.txt` (last entry) has one line per call | write the entries natively, refuse escaping paths |
//! | `scribble` | fills a 64 KiB stack array and a 2 MiB heap buffer with a pattern; its summary says how many pattern words it sees in its memory (`visible N`) | (the scanner's self-check) |
//! | `stale` | grows its memory by as much, and counts the pattern's words anywhere in it (`stale N`) | give every instance fresh memory: 0, even in a slot a `scribble` run used |
//!
//! `target` (symlink modes) is the path the link points to; `program` and
//! `args` (space-separated) are what `spawn-many` starts. `read`, `list`
//! and `write` (mode `grants`) are space-separated guest paths. Mode
//! `archive`: `files`, `redact` and `escape` are space-separated paths
//! relative to the grant named by `grant` (default `logs`); `level` the
//! deflate level (0: stored; default 6); `max-entry-bytes`, `password`
//! and `name` (default `archive.zip`) go to the archive as they are.

wit_bindgen::generate!({
    path: "../../wit",
    world: "collector",
});

use autocollect::plugin::archive::{Archive, ArchiveOptions, Compression};
use autocollect::plugin::exec::{Command, spawn};
use autocollect::plugin::inputs::grants;
use autocollect::plugin::log::{Level, log};
use autocollect::plugin::task::parameters;
use autocollect::plugin::types::{Failure, OptionError};
use exports::autocollect::plugin::collect::{
    Artifact, CollectOutcome, CollectRequest, Guest, Options, PluginError,
};

struct Misbehave;

fn option(options: &Options, key: &str) -> Result<String, PluginError> {
    match options.iter().find(|(k, _)| k == key) {
        Some((_, v)) => Ok(v.clone()),
        None => Err(PluginError::InvalidOption(OptionError {
            key: key.into(),
            message: "required".into(),
        })),
    }
}

fn mode(options: &Options) -> Result<String, PluginError> {
    option(options, "mode")
}

fn io(what: &str) -> impl Fn(std::io::Error) -> PluginError + '_ {
    move |e| PluginError::Internal(format!("{what}: {e}"))
}

/// `a.zip` (a few bytes) in the output directory, reported as the artifact.
fn zip_named(dir: &str, name: &str) -> Result<CollectOutcome, PluginError> {
    std::fs::write(format!("{dir}/{name}"), b"PK\x05\x06not much of a zip")
        .map_err(io("write a.zip"))?;
    Ok(one_artifact(name))
}

fn one_artifact(name: &str) -> CollectOutcome {
    CollectOutcome {
        artifacts: vec![Artifact {
            name: name.into(),
            size: 0,
        }],
        summary: String::new(),
    }
}

/// Write 256 KiB parts (every `sleep-ms`, or only wait when
/// `write = false`) until the host says to wrap up; then keep a summary
/// as the artifact and mark the collection partial with the host's
/// reason.
fn wrap_up_when_told(request: &CollectRequest) -> Result<CollectOutcome, PluginError> {
    use autocollect::plugin::budget;
    let sleep = option(&request.options, "sleep-ms")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20u64);
    let write = option(&request.options, "write").map_or(true, |v| v != "false");
    let limits = budget::limits();
    let chunk = vec![0x5au8; 256 * 1024];
    let mut parts = 0u64;
    let reason = loop {
        if let Some(why) = budget::wrap_up() {
            break why;
        }
        if write {
            std::fs::write(format!("{}/part-{parts}", request.output_dir), &chunk)
                .map_err(io("write a part"))?;
            parts += 1;
        }
        std::thread::sleep(std::time::Duration::from_millis(sleep));
    };
    let summary = format!(
        "{parts} parts written; limits: {} ms left at the start, {} bytes, {} files\n",
        limits.deadline_ms, limits.max_bytes, limits.max_files
    );
    std::fs::write(format!("{}/summary.txt", request.output_dir), &summary)
        .map_err(io("write the summary"))?;
    // `leak = salt`: a hostile plugin that tries to carry the redaction
    // salt out in its words.
    let leak = match option(&request.options, "leak").as_deref() {
        Ok("salt") => autocollect::plugin::task::parameters()
            .into_iter()
            .find(|(k, _)| k == "log-redaction-salt")
            .map(|(_, salt)| format!("; the salt is {salt}"))
            .unwrap_or_default(),
        _ => String::new(),
    };
    budget::partial(&format!("{reason}; kept {parts} parts{leak}"));
    Ok(one_artifact("summary.txt"))
}

impl Guest for Misbehave {
    fn validate_options(options: Options) -> Result<(), PluginError> {
        mode(&options).map(|_| ())
    }

    fn collect(request: CollectRequest) -> Result<CollectOutcome, PluginError> {
        match mode(&request.options)?.as_str() {
            "noop" => Ok(CollectOutcome {
                artifacts: vec![],
                summary: String::new(),
            }),
            "spin" => {
                let mut x: u64 = 1;
                loop {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            }
            "alloc" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "escape" => Err(PluginError::Failed(Failure {
                status_code: 99,
                output: try_to_escape(&request.output_dir),
            })),
            "bad-artifact" => Ok(CollectOutcome {
                artifacts: vec![Artifact {
                    name: "../../../etc/passwd".into(),
                    size: 1,
                }],
                summary: "look over there".into(),
            }),
            "log-flood" => {
                for i in 0..1_000_000u32 {
                    log(Level::Info, &format!("flood {i}"));
                }
                Err(PluginError::Internal("flooded".into()))
            }
            "trap" => panic!("misbehave plugin: deliberate trap"),
            "scribble" => Ok(CollectOutcome {
                artifacts: vec![],
                summary: format!("visible {}", scribble()),
            }),
            "stale" => Ok(CollectOutcome {
                artifacts: vec![],
                summary: format!("stale {}", stale()),
            }),
            "symlink-upload" => {
                let dir = &request.output_dir;
                #[allow(deprecated)] // the one portable way on wasm32-wasip2
                std::fs::soft_link(option(&request.options, "target")?, format!("{dir}/upload"))
                    .map_err(io("symlink upload"))?;
                zip_named(dir, "a.zip")
            }
            "symlink-artifact" => {
                let dir = &request.output_dir;
                #[allow(deprecated)]
                std::fs::soft_link(option(&request.options, "target")?, format!("{dir}/a.zip"))
                    .map_err(io("symlink a.zip"))?;
                Ok(one_artifact("a.zip"))
            }
            "linked-artifact" => {
                let dir = &request.output_dir;
                zip_named(dir, "elsewhere.zip")?;
                std::fs::hard_link(format!("{dir}/elsewhere.zip"), format!("{dir}/a.zip"))
                    .map_err(io("link a.zip"))?;
                Ok(one_artifact("a.zip"))
            }
            "fill-disk" => {
                use std::io::Write;
                let path = format!("{}/fill", request.output_dir);
                let mut file = std::fs::File::create(&path).map_err(io("create"))?;
                let chunk = vec![0x5au8; 256 * 1024];
                loop {
                    file.write_all(&chunk).map_err(io("write"))?;
                }
            }
            "wrap-up" => wrap_up_when_told(&request),
            "many-files" => {
                for i in 0u64.. {
                    std::fs::write(format!("{}/f{i}", request.output_dir), b"")
                        .map_err(io("create"))?;
                }
                unreachable!()
            }
            "spawn-many" => {
                let program = option(&request.options, "program")?;
                let args: Vec<String> = option(&request.options, "args")
                    .unwrap_or_default()
                    .split_whitespace()
                    .map(String::from)
                    .collect();
                let mut started = Vec::new();
                loop {
                    let command = Command {
                        program: program.clone(),
                        args: args.clone(),
                        env: vec![],
                    };
                    match spawn(&command) {
                        Ok(process) => started.push(process),
                        Err(e) => {
                            return Err(PluginError::Failed(Failure {
                                status_code: started.len() as i32,
                                output: format!("started {}, then: {e:?}", started.len()),
                            }));
                        }
                    }
                    if started.len() > 1000 {
                        return Err(PluginError::Internal("never refused".into()));
                    }
                }
            }
            "grants" => {
                let report = try_grants(&request.options);
                std::fs::write(format!("{}/report.txt", request.output_dir), report)
                    .map_err(io("write report.txt"))?;
                Ok(one_artifact("report.txt"))
            }
            "archive" => try_archive(&request.options),
            other => Err(PluginError::InvalidOption(OptionError {
                key: "mode".into(),
                message: format!("unknown mode {other:?}"),
            })),
        }
    }
}

/// Mode `archive`: a zip written by the host; see the module's table.
fn try_archive(options: &Options) -> Result<CollectOutcome, PluginError> {
    let _ = parameters(); // the host redacts by the request's level
    let list = |key: &str| -> Vec<String> {
        option(options, key)
            .unwrap_or_default()
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    let grant = option(options, "grant").unwrap_or_else(|_| "logs".into());
    let level: u8 = option(options, "level")
        .ok()
        .and_then(|l| l.parse().ok())
        .unwrap_or(6);
    let archive_options = ArchiveOptions {
        compression: if level == 0 {
            Compression::Stored
        } else {
            Compression::Deflate(level)
        },
        password: option(options, "password").ok(),
        max_entry_bytes: option(options, "max-entry-bytes")
            .ok()
            .and_then(|m| m.parse().ok()),
    };
    let name = option(options, "name").unwrap_or_else(|_| "archive.zip".into());
    let archive = Archive::create(&name, &archive_options).map_err(|e| {
        PluginError::Failed(Failure {
            status_code: 3,
            output: format!("create {name}: {e:?}"),
        })
    })?;
    let mut report = Vec::new();
    for i in 0..3u64 {
        let data = format!("generated entry {i}\n").repeat(1000 * (i as usize + 1));
        let mtime = (i == 0).then_some(1_700_000_000);
        let added = archive.add_bytes(&format!("gen/{i}.txt"), data.as_bytes(), mtime);
        report.push(format!("add-bytes gen/{i}.txt: {added:?}"));
    }
    for (key, prefix, redact) in [("files", "files", false), ("redact", "redacted", true)] {
        for path in list(key) {
            let added = archive.add_file(&grant, &path, &format!("{prefix}/{path}"), redact);
            report.push(format!("add-file {prefix} {path}: {added:?}"));
        }
    }
    for (i, path) in list("escape").into_iter().enumerate() {
        let added = archive.add_file(&grant, &path, &format!("escape/{i}"), false);
        report.push(format!("escape {path}: {added:?}"));
    }
    let bad = archive.add_bytes("../outside.txt", b"x", None);
    report.push(format!("bad-entry ../outside.txt: {bad:?}"));
    let text = report.join("\n") + "\n";
    archive
        .add_bytes("report.txt", text.as_bytes(), None)
        .map_err(|e| PluginError::Internal(format!("report.txt: {e:?}")))?;
    let artifact = archive
        .finish()
        .map_err(|e| PluginError::Internal(format!("finish: {e:?}")))?;
    Ok(CollectOutcome {
        artifacts: vec![artifact],
        summary: text,
    })
}

/// Mode `grants`: one line per grant (`grant NAME GUEST`), then one per
/// attempt, `what PATH: allowed|denied (detail)`; what a read returned is
/// the detail, escaped on one line.
fn try_grants(options: &Options) -> String {
    let paths = |key: &str| -> Vec<String> {
        option(options, key)
            .unwrap_or_default()
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    let mut report: Vec<String> = grants()
        .into_iter()
        .map(|g| format!("grant {} {}", g.name, g.guest_path))
        .collect();
    let mut attempt = |what: &str, path: &str, result: std::io::Result<String>| {
        report.push(match result {
            Ok(detail) => format!("{what} {path}: allowed ({detail})"),
            Err(e) => format!("{what} {path}: denied ({e})"),
        });
    };
    for path in paths("read") {
        // To the end, not by the size stat gives: /proc files say 0.
        let read = std::fs::read(&path)
            .map(|b| format!("{:?}", String::from_utf8_lossy(&b[..b.len().min(400)])));
        attempt("read", &path, read);
    }
    for path in paths("list") {
        let list = std::fs::read_dir(&path).and_then(|d| {
            let mut names = d
                .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<std::io::Result<Vec<_>>>()?;
            names.sort();
            Ok(names.join(","))
        });
        attempt("list", &path, list);
    }
    for path in paths("write") {
        use std::io::Write;
        let done = |r: std::io::Result<()>| r.map(|()| "done".to_string());
        let dir = path.rsplit_once('/').map_or("", |(d, _)| d).to_string();
        attempt(
            "open-for-write",
            &path,
            done(
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|mut f| f.write_all(b"overwritten")),
            ),
        );
        attempt(
            "append",
            &path,
            done(
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(&path)
                    .and_then(|mut f| f.write_all(b"appended")),
            ),
        );
        attempt("truncate", &path, done(std::fs::write(&path, b"")));
        let new = format!("{dir}/created-by-plugin");
        attempt("create", &new, done(std::fs::write(&new, b"new")));
        attempt("mkdir", &new, done(std::fs::create_dir(&new)));
        attempt(
            "rename",
            &path,
            done(std::fs::rename(&path, format!("{dir}/renamed-by-plugin"))),
        );
        attempt("remove", &path, done(std::fs::remove_file(&path)));
        #[allow(deprecated)]
        let link = std::fs::soft_link(&path, format!("{dir}/linked-by-plugin"));
        attempt("symlink", &path, done(link));
        attempt("remove-dir", &dir, done(std::fs::remove_dir_all(&dir)));
    }
    report.join("\n") + "\n"
}

/// Try every way out we can think of; report one line per attempt as
/// `what: allowed|denied (detail)`.
fn try_to_escape(output_dir: &str) -> String {
    let mut report = Vec::new();
    let mut attempt = |what: &str, result: Result<String, String>| {
        report.push(match result {
            Ok(detail) => format!("{what}: allowed ({detail})"),
            Err(detail) => format!("{what}: denied ({detail})"),
        });
    };
    let read = |p: &str| {
        std::fs::read(p)
            .map(|b| format!("{} bytes", b.len()))
            .map_err(|e| e.to_string())
    };
    attempt("read /etc/passwd", read("/etc/passwd"));
    attempt(
        "read ../ of output",
        std::fs::read_dir(format!("{output_dir}/.."))
            .map(|d| format!("{} entries", d.count()))
            .map_err(|e| e.to_string()),
    );
    attempt(
        "list /",
        std::fs::read_dir("/")
            .map(|d| format!("{} entries", d.count()))
            .map_err(|e| e.to_string()),
    );
    let env: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
    attempt(
        "environment",
        if env.is_empty() {
            Err("no variables".into())
        } else {
            Ok(env.join(","))
        },
    );
    attempt(
        "tcp connect 127.0.0.1:22",
        std::net::TcpStream::connect("127.0.0.1:22")
            .map(|_| "connected".into())
            .map_err(|e| e.to_string()),
    );
    attempt(
        "write output dir",
        std::fs::write(format!("{output_dir}/probe.txt"), b"ok")
            .map(|_| "written".into())
            .map_err(|e| e.to_string()),
    );
    report.join("\n")
}

export!(Misbehave);

/// The high half of every word `scribble` writes: a constant of the code
/// (outside linear memory), so memory holds the pattern only where a run
/// wrote it.
const PATTERN: u64 = 0xA5C3_5A3C;
/// Heap words `scribble` writes (2 MiB) and `stale` reserves.
const HEAP_WORDS: usize = 1 << 18;

/// Count the pattern's words in this instance's whole linear memory.
fn pattern_words() -> usize {
    let end = core::arch::wasm32::memory_size::<0>() * 65536;
    (8..end)
        .step_by(8)
        // SAFETY: every address below memory.size is readable in wasm32;
        // this plugin reads its own memory on purpose.
        .filter(|&addr| unsafe { core::ptr::read_volatile(addr as *const u64) } >> 32 == PATTERN)
        .count()
}

fn scribble() -> usize {
    let mut stack = [0u64; 8192];
    for (i, word) in stack.iter_mut().enumerate() {
        *word = PATTERN << 32 | i as u64;
    }
    std::hint::black_box(&mut stack);
    let heap: Vec<u64> = (0..HEAP_WORDS as u64).map(|i| PATTERN << 32 | i).collect();
    std::hint::black_box(&heap);
    pattern_words()
}

fn stale() -> usize {
    // Memory as large as a `scribble` run's: its heap pages must be fresh
    // too once grown again (nothing is written to them here).
    let reserved: Vec<u64> = Vec::with_capacity(HEAP_WORDS + 8192);
    std::hint::black_box(&reserved);
    pattern_words()
}
