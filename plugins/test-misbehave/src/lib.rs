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
//!
//! `target` (symlink modes) is the path the link points to; `program` and
//! `args` (space-separated) are what `spawn-many` starts.

wit_bindgen::generate!({
    path: "../../wit",
    world: "collector",
});

use autocollect::plugin::exec::{Command, spawn};
use autocollect::plugin::log::{Level, log};
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
            other => Err(PluginError::InvalidOption(OptionError {
                key: "mode".into(),
                message: format!("unknown mode {other:?}"),
            })),
        }
    }
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
