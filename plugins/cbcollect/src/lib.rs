//! autocollect's `cbcollect` collector: runs Couchbase's `cbcollect_info`
//! through the host's `exec` capability with the command line ns_server
//! builds, forwards its output as progress, and reports its zip.
//!
//! The host must allow the program for this plugin (`exec_allow`), runs it
//! in the job's output directory (so the zip is named relatively), and
//! stops its whole process group when the run ends or is cancelled
//! (`--watch-stdin` lets `cbcollect_info` clean up first when its stdin
//! closes).
//!
//! Options (from the node's `[collector.options]`):
//!
//! | key | meaning | default |
//! | --- | --- | --- |
//! | `program` | absolute path of `cbcollect_info` | required |
//! | `initargs` | `--initargs=PATH` (the node's `initargs` file) | none |
//! | `extra-args` | more arguments, separated by spaces, appended last | none |
//! | `env.NAME` | environment variable `NAME` for the program (the operator must also list `NAME` in `exec_env_allow`; to give the program a variable without it, use `exec_env`) | none |
//!
//! From the start request (`task.parameters()`): `log-redaction-level`,
//! `log-redaction-salt`, `tmp-dir`, `task-regexp`, `encryption-password`.
//!
//! Command line, in ns_server's order: `--watch-stdin`;
//! `--log-redaction-level=partial --log-redaction-salt=SALT` when partial;
//! `--encrypt-unredacted --use-stdin` with an encryption password;
//! `--tmp-dir=DIR`; `--initargs=PATH`; the zip
//! `collectinfo-<YYYY-MM-DDTHHMMSS UTC>-<node>.zip`; `--task-regexp=R`;
//! extra arguments. With partial redaction the artifact is the
//! `-redacted.zip`.
//!
//! The encryption password never goes on the command line or in the
//! environment (other users of the machine can read both): as ns_server
//! does, the plugin writes it as one line on `cbcollect_info`'s stdin
//! (`--use-stdin`), which then encrypts the unredacted zip with it
//! (WinZip AES-256). Stdin then stays open for `--watch-stdin`. With
//! partial redaction the reported `-redacted.zip` is not encrypted, as
//! with ns_server: `--encrypt-unredacted` protects the zip that holds
//! user data.

wit_bindgen::generate!({
    path: "../../wit",
    world: "collector",
    generate_all,
});

use std::collections::VecDeque;
use std::time::SystemTime;

use autocollect::plugin::exec::{Command, ExecError, ExitStatus, spawn};
use autocollect::plugin::log::{Level, log};
use autocollect::plugin::progress::report;
use autocollect::plugin::task::parameters;
use autocollect::plugin::types::{Failure, OptionError};
use exports::autocollect::plugin::collect::{
    Artifact, CollectOutcome, CollectRequest, Guest, Options, PluginError,
};

/// Output lines kept for a failure report (the host keeps the last 4 KiB).
const TAIL_LINES: usize = 100;

struct Cbcollect;

struct Settings {
    program: String,
    initargs: Option<String>,
    extra_args: Vec<String>,
    env: Vec<(String, String)>,
}

fn invalid(key: &str, message: &str) -> PluginError {
    PluginError::InvalidOption(OptionError {
        key: key.to_string(),
        message: message.to_string(),
    })
}

impl Settings {
    fn from_options(options: &Options) -> Result<Settings, PluginError> {
        let mut program = None;
        let mut s = Settings {
            program: String::new(),
            initargs: None,
            extra_args: Vec::new(),
            env: Vec::new(),
        };
        for (key, value) in options {
            match key.as_str() {
                "program" if value.starts_with('/') => program = Some(value.clone()),
                "program" => return Err(invalid(key, "must be an absolute path")),
                "initargs" => s.initargs = Some(value.clone()),
                "extra-args" => s.extra_args = value.split_whitespace().map(String::from).collect(),
                k if k.starts_with("env.") && k.len() > 4 => {
                    s.env.push((k[4..].to_string(), value.clone()))
                }
                other => {
                    return Err(invalid(
                        other,
                        "unknown option (known: program, initargs, extra-args, env.NAME)",
                    ));
                }
            }
        }
        s.program =
            program.ok_or_else(|| invalid("program", "is required: the path of cbcollect_info"))?;
        Ok(s)
    }
}

/// The start request's parameters that shape the command line.
#[derive(Default)]
struct Request {
    partial_salt: Option<String>,
    tmp_dir: Option<String>,
    task_regexp: Option<String>,
    /// A secret: it goes only to the program's stdin.
    encryption_password: Option<String>,
}

impl Request {
    fn from_parameters(params: Vec<(String, String)>) -> Result<Request, PluginError> {
        let get = |k: &str| {
            params
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        let partial_salt =
            match get("log-redaction-level").as_deref() {
                Some("partial") => Some(get("log-redaction-salt").ok_or_else(|| {
                    PluginError::Internal("partial redaction without a salt".into())
                })?),
                _ => None,
            };
        Ok(Request {
            partial_salt,
            tmp_dir: get("tmp-dir"),
            task_regexp: get("task-regexp"),
            encryption_password: get("encryption-password"),
        })
    }
}

/// ns_server's command line for `zip`.
fn arguments(settings: &Settings, request: &Request, zip: &str) -> Vec<String> {
    let mut args = vec!["--watch-stdin".to_string()];
    if let Some(salt) = &request.partial_salt {
        args.push("--log-redaction-level=partial".into());
        args.push(format!("--log-redaction-salt={salt}"));
    }
    if request.encryption_password.is_some() {
        // The password itself follows on stdin.
        args.push("--encrypt-unredacted".into());
        args.push("--use-stdin".into());
    }
    if let Some(dir) = &request.tmp_dir {
        args.push(format!("--tmp-dir={dir}"));
    }
    if let Some(path) = &settings.initargs {
        args.push(format!("--initargs={path}"));
    }
    args.push(zip.to_string());
    if let Some(regexp) = &request.task_regexp {
        args.push(format!("--task-regexp={regexp}"));
    }
    args.extend(settings.extra_args.iter().cloned());
    args
}

impl Guest for Cbcollect {
    fn validate_options(options: Options) -> Result<(), PluginError> {
        Settings::from_options(&options).map(|_| ())
    }

    fn collect(request: CollectRequest) -> Result<CollectOutcome, PluginError> {
        let settings = Settings::from_options(&request.options)?;
        let task = Request::from_parameters(parameters())?;
        let zip = collectinfo_name::zip_name(&request.context.node, SystemTime::now());
        let process = spawn(&Command {
            program: settings.program.clone(),
            args: arguments(&settings, &task, &zip),
            env: settings.env.clone(),
        })
        .map_err(|e| match e {
            ExecError::Denied(m) => PluginError::Internal(format!("exec denied: {m}")),
            ExecError::Failed(m) => PluginError::Internal(m),
        })?;
        // Never log the command line: it may hold the redaction salt.
        log(
            Level::Info,
            &format!("started {} (pid {})", settings.program, process.pid()),
        );
        if let Some(password) = &task.encryption_password {
            // One line, as `--use-stdin` reads it. Stdin stays open after
            // it: `--watch-stdin` stops the program when it closes.
            let line = format!("{password}\n");
            process.write_stdin(line.as_bytes()).map_err(|e| {
                PluginError::Internal(format!(
                    "could not give cbcollect_info its encryption password on stdin: {e}"
                ))
            })?;
        }

        let mut tail = VecDeque::with_capacity(TAIL_LINES);
        let mut lines = 0u64;
        while let Some(line) = process.read_line() {
            lines += 1;
            report(lines, 0, &line.text);
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line.text);
        }
        let output = || tail.iter().cloned().collect::<Vec<_>>().join("\n");
        match process.wait() {
            ExitStatus::Exited(0) => {}
            ExitStatus::Exited(code) => {
                return Err(PluginError::Failed(Failure {
                    status_code: code,
                    output: output(),
                }));
            }
            ExitStatus::Signaled(signal) => {
                return Err(PluginError::Failed(Failure {
                    status_code: 128 + signal,
                    output: format!("{}\ncbcollect_info was killed by signal {signal}", output()),
                }));
            }
        }

        let name = match task.partial_salt {
            Some(_) => format!("{}-redacted.zip", zip.strip_suffix(".zip").unwrap_or(&zip)),
            None => zip,
        };
        let path = format!("{}/{name}", request.output_dir.trim_end_matches('/'));
        let size = std::fs::metadata(&path)
            .map_err(|e| {
                PluginError::Internal(format!(
                    "cbcollect_info exited 0 but {name} is missing: {e}"
                ))
            })?
            .len();
        Ok(CollectOutcome {
            artifacts: vec![Artifact {
                name: name.clone(),
                size,
            }],
            summary: format!("cbcollect_info wrote {name} ({size} bytes)"),
        })
    }
}

export!(Cbcollect);
