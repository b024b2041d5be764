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

use std::collections::VecDeque;
use std::time::SystemTime;

use autocollect_sdk::exec::{Command, ExitStatus, spawn};
use autocollect_sdk::task::Parameters;
use autocollect_sdk::{
    Artifact, CollectOutcome, CollectRequest, Collector, Context, Error, Options, progress,
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

impl Settings {
    fn from_options(options: &Options) -> Result<Settings, Error> {
        options.check_known_by(
            |k| {
                matches!(k, "program" | "initargs" | "extra-args")
                    || (k.starts_with("env.") && k.len() > 4)
            },
            "program, initargs, extra-args, env.NAME",
        )?;
        let program = options.get("program").ok_or_else(|| {
            Error::invalid_option("program", "is required: the path of cbcollect_info")
        })?;
        if !program.starts_with('/') {
            return Err(Error::invalid_option("program", "must be an absolute path"));
        }
        Ok(Settings {
            program: program.to_string(),
            initargs: options.get("initargs").map(String::from),
            extra_args: options
                .get("extra-args")
                .map(|v| v.split_whitespace().map(String::from).collect())
                .unwrap_or_default(),
            env: options
                .iter()
                .filter_map(|(k, v)| Some((k.strip_prefix("env.")?.to_string(), v.to_string())))
                .collect(),
        })
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
    fn from_parameters(params: &Parameters) -> Result<Request, Error> {
        let partial_salt = match params.redact() {
            true => Some(
                params
                    .redaction_salt()
                    .ok_or_else(|| Error::internal("partial redaction without a salt"))?
                    .to_string(),
            ),
            false => None,
        };
        Ok(Request {
            partial_salt,
            tmp_dir: params.tmp_dir().map(String::from),
            task_regexp: params.task_regexp().map(String::from),
            encryption_password: params.encryption_password().map(String::from),
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

impl Collector for Cbcollect {
    fn validate_options(options: &Options) -> Result<(), Error> {
        Settings::from_options(options).map(|_| ())
    }

    fn collect(request: CollectRequest) -> Result<CollectOutcome, Error> {
        let settings = Settings::from_options(&request.options())?;
        let task = Request::from_parameters(&Parameters::get())?;
        let zip = collectinfo_name::zip_name(&request.context.node, SystemTime::now());
        let process = spawn(&Command {
            program: settings.program.clone(),
            args: arguments(&settings, &task, &zip),
            env: settings.env.clone(),
        })?;
        // Never log the command line: it may hold the redaction salt.
        autocollect_sdk::info!("started {} (pid {})", settings.program, process.pid());
        if let Some(password) = &task.encryption_password {
            // One line, as `--use-stdin` reads it. Stdin stays open after
            // it: `--watch-stdin` stops the program when it closes.
            let line = format!("{password}\n");
            process
                .write_stdin(line.as_bytes())
                .context("could not give cbcollect_info its encryption password on stdin")?;
        }

        let mut tail = VecDeque::with_capacity(TAIL_LINES);
        let mut lines = 0u64;
        while let Some(line) = process.read_line() {
            lines += 1;
            progress(lines, 0, &line.text);
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line.text);
        }
        let output = || tail.iter().cloned().collect::<Vec<_>>().join("\n");
        match process.wait() {
            ExitStatus::Exited(0) => {}
            ExitStatus::Exited(code) => {
                return Err(Error::failed(code, output()));
            }
            ExitStatus::Signaled(signal) => {
                return Err(Error::failed(
                    128 + signal,
                    format!("{}\ncbcollect_info was killed by signal {signal}", output()),
                ));
            }
        }

        let name = match task.partial_salt {
            Some(_) => format!("{}-redacted.zip", zip.strip_suffix(".zip").unwrap_or(&zip)),
            None => zip,
        };
        let size = std::fs::metadata(request.output_path(&name))
            .with_context(|| format!("cbcollect_info exited 0 but {name} is missing"))?
            .len();
        Ok(CollectOutcome::new(
            Artifact {
                name: name.clone(),
                size,
            },
            format!("cbcollect_info wrote {name} ({size} bytes)"),
        ))
    }
}

autocollect_sdk::export_collector!(Cbcollect);
