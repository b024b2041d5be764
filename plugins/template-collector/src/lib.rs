//! A minimal autocollect collector plugin. Copy this crate to start a new
//! one; `plugins/README.md` explains the contract and the sandbox.
//!
//! It writes one text file, `template-<node>.txt`, into the run's output
//! directory. Options (all optional):
//!
//! | key | meaning | default |
//! | --- | --- | --- |
//! | `greeting` | text written on every line (1 to 200 bytes) | `hello` |
//! | `lines` | how many lines to write (1 to 1000000) | `3` |
//! | `fail-with` | a non-zero status code: fail as a wrapped tool would | unset |

// Generate the Rust bindings for the `collector` world of the WIT package
// in `wit/` at the top of the repository. This creates:
// - `autocollect::plugin::{types, log, progress}`: the host's imports;
// - `exports::autocollect::plugin::collect::Guest`: the trait to implement;
// - the `export!` macro that registers the implementation (at the end).
wit_bindgen::generate!({
    path: "../../wit",
    world: "collector",
});

use autocollect::plugin::log::{Level, log};
use autocollect::plugin::progress::report;
use autocollect::plugin::types::{Failure, OptionError};
use exports::autocollect::plugin::collect::{
    Artifact, CollectOutcome, CollectRequest, Guest, Options, PluginError,
};
use std::fs::File;
use std::io::{BufWriter, Write};

/// The options this plugin knows, for error messages.
const KNOWN_OPTIONS: &str = "greeting, lines, fail-with";

/// The options, parsed and checked.
struct Settings {
    greeting: String,
    lines: u64,
    fail_with: Option<i32>,
}

/// An error about one option. The host reports it with the option's key,
/// and refuses to start the daemon if `validate-options` returns it.
fn invalid(key: &str, message: impl Into<String>) -> PluginError {
    PluginError::InvalidOption(OptionError {
        key: key.to_string(),
        message: message.into(),
    })
}

impl Settings {
    /// Parse every option; reject unknown keys, so that a typo in the
    /// daemon's configuration is found when it starts.
    fn from_options(options: &Options) -> Result<Settings, PluginError> {
        let mut settings = Settings {
            greeting: "hello".to_string(),
            lines: 3,
            fail_with: None,
        };
        // Options arrive as (key, value) strings: the host converts TOML
        // numbers and booleans to text.
        for (key, value) in options {
            match key.as_str() {
                "greeting" => {
                    if value.is_empty() || value.len() > 200 || value.contains('\n') {
                        return Err(invalid(key, "must be 1 to 200 bytes on one line"));
                    }
                    settings.greeting = value.clone();
                }
                "lines" => {
                    settings.lines = match value.trim().parse::<u64>() {
                        Ok(n) if (1..=1_000_000).contains(&n) => n,
                        _ => {
                            return Err(invalid(
                                key,
                                format!("must be an integer from 1 to 1000000, got {value:?}"),
                            ));
                        }
                    };
                }
                "fail-with" => {
                    settings.fail_with = match value.trim().parse::<i32>() {
                        Ok(code) if code != 0 => Some(code),
                        _ => {
                            return Err(invalid(
                                key,
                                format!("must be a non-zero integer, got {value:?}"),
                            ));
                        }
                    };
                }
                other => {
                    return Err(invalid(
                        other,
                        format!("unknown option (known: {KNOWN_OPTIONS})"),
                    ));
                }
            }
        }
        Ok(settings)
    }
}

struct TemplateCollector;

impl Guest for TemplateCollector {
    /// Called once when the daemon starts. No filesystem is available
    /// here: only check the options.
    fn validate_options(options: Options) -> Result<(), PluginError> {
        Settings::from_options(&options).map(|_| ())
    }

    /// Called once per collection, in a fresh instance: nothing survives
    /// from an earlier run, so parse the options again.
    fn collect(request: CollectRequest) -> Result<CollectOutcome, PluginError> {
        let settings = Settings::from_options(&request.options)?;
        let ctx = &request.context;
        // Goes to the daemon's log, tagged with the plugin, task and node.
        log(
            Level::Info,
            &format!(
                "template collector: {} lines for task {}",
                settings.lines, ctx.task_id
            ),
        );

        // A tool that ran and failed: its status code and output become
        // `collectionStatusCode` and `collectionOutput` in the task status.
        if let Some(code) = settings.fail_with {
            return Err(PluginError::Failed(Failure {
                status_code: code,
                output: format!("template collector: failing with status {code} as configured\n"),
            }));
        }

        // The output directory is the only directory this plugin can see.
        // Artifact names must be plain file names inside it.
        let dir = request.output_dir.trim_end_matches('/');
        let name = format!("template-{}.txt", file_name_safe(&ctx.node));
        let partial = format!("{dir}/.{name}.partial");
        let path = format!("{dir}/{name}");

        // Anything unexpected is `internal`, with a message for the operator.
        let internal =
            |what: &str, e: std::io::Error| PluginError::Internal(format!("{what}: {e}"));

        // Write under a temporary name and rename when complete: the run can
        // be stopped at any instruction (cancel, deadline, memory cap).
        let file = File::create(&partial).map_err(|e| internal("creating the file", e))?;
        let mut out = BufWriter::new(file);
        writeln!(out, "# autocollect template collector")
            .and_then(|_| writeln!(out, "# node {} task {}", ctx.node, ctx.task_id))
            .map_err(|e| internal("writing the header", e))?;
        for line in 1..=settings.lines {
            writeln!(out, "{line} {}", settings.greeting)
                .map_err(|e| internal("writing a line", e))?;
            // Progress is cheap, but a few hundred reports are plenty.
            if line % 1000 == 0 || line == settings.lines {
                report(line, settings.lines, "writing lines");
            }
        }
        let file = out
            .into_inner()
            .map_err(|e| internal("flushing the file", e.into_error()))?;
        file.sync_all()
            .map_err(|e| internal("syncing the file", e))?;
        drop(file);
        std::fs::rename(&partial, &path).map_err(|e| internal("renaming the file", e))?;
        let size = std::fs::metadata(&path)
            .map_err(|e| internal("reading the file size", e))?
            .len();

        // The first artifact is the one reported to the operator. The host
        // checks that it is a regular file in the output directory.
        Ok(CollectOutcome {
            artifacts: vec![Artifact {
                name: name.clone(),
                size,
            }],
            summary: format!("wrote {name} ({size} bytes)"),
        })
    }
}

/// A node name as a file-name fragment: letters, digits, `-`, `_`, `.`.
fn file_name_safe(node: &str) -> String {
    node.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect()
}

// Register `TemplateCollector` as the implementation of the `collect` export.
export!(TemplateCollector);
