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

wit_bindgen::generate!({
    path: "../../wit",
    world: "collector",
});

use autocollect::plugin::log::{Level, log};
use autocollect::plugin::types::{Failure, OptionError};
use exports::autocollect::plugin::collect::{
    Artifact, CollectOutcome, CollectRequest, Guest, Options, PluginError,
};

struct Misbehave;

fn mode(options: &Options) -> Result<String, PluginError> {
    match options.iter().find(|(k, _)| k == "mode") {
        Some((_, v)) => Ok(v.clone()),
        None => Err(PluginError::InvalidOption(OptionError {
            key: "mode".into(),
            message: "required".into(),
        })),
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
