//! A minimal autocollect collector plugin. Copy this crate to start a new
//! one; `plugins/sdk/README.md` is the quick start, `plugins/README.md`
//! explains the contract and the sandbox.
//!
//! It writes one text file, `template-<node>.txt`, into the run's output
//! directory. Options (all optional):
//!
//! | key | meaning | default |
//! | --- | --- | --- |
//! | `greeting` | text written on every line (1 to 200 bytes) | `hello` |
//! | `lines` | how many lines to write (1 to 1000000) | `3` |
//! | `fail-with` | a non-zero status code: fail as a wrapped tool would | unset |

// The SDK (`plugins/sdk`) holds the bindings of the WIT contract and the
// helpers: `Collector` is the trait to implement, `Error` the contract's
// `plugin-error`, `Options` typed access to the options, `Context` adds
// what failed to an I/O error. The generated bindings are under
// `autocollect_sdk::collector` should you need them.
use autocollect_sdk::{
    Artifact, CollectOutcome, CollectRequest, Collector, Context, Error, Options, progress,
};
use std::fs::File;
use std::io::{BufWriter, Write};

/// The options this plugin knows.
const KNOWN_OPTIONS: &[&str] = &["greeting", "lines", "fail-with"];

/// The options, parsed and checked.
struct Settings {
    greeting: String,
    lines: u64,
    fail_with: Option<i32>,
}

impl Settings {
    /// Parse every option; reject unknown keys, so that a typo in the
    /// daemon's configuration is found when it starts. Each error is the
    /// contract's `invalid-option`, naming the key: the host refuses to
    /// start the daemon if `validate-options` returns one.
    fn from_options(options: &Options) -> Result<Settings, Error> {
        // Options arrive as (key, value) strings: the host converts TOML
        // numbers and booleans to text; `Options` parses them back.
        options.check_known(KNOWN_OPTIONS)?;
        let greeting = options.get("greeting").unwrap_or("hello");
        if greeting.is_empty() || greeting.len() > 200 || greeting.contains('\n') {
            return Err(Error::invalid_option(
                "greeting",
                "must be 1 to 200 bytes on one line",
            ));
        }
        let fail_with = options.map(
            "fail-with",
            |v| v.parse::<i32>().ok().filter(|code| *code != 0),
            || "must be a non-zero integer".to_string(),
        )?;
        Ok(Settings {
            greeting: greeting.to_string(),
            lines: options.integer_in("lines", 1..=1_000_000)?.unwrap_or(3),
            fail_with,
        })
    }
}

struct TemplateCollector;

impl Collector for TemplateCollector {
    /// Called once when the daemon starts. No filesystem is available
    /// here: only check the options.
    fn validate_options(options: &Options) -> Result<(), Error> {
        Settings::from_options(options).map(|_| ())
    }

    /// Called once per collection, in a fresh instance: nothing survives
    /// from an earlier run, so parse the options again.
    fn collect(request: CollectRequest) -> Result<CollectOutcome, Error> {
        let settings = Settings::from_options(&request.options())?;
        let ctx = &request.context;
        // Goes to the daemon's log, tagged with the plugin, task and node.
        autocollect_sdk::info!(
            "template collector: {} lines for task {}",
            settings.lines,
            ctx.task_id
        );

        // A tool that ran and failed: its status code and output become
        // `collectionStatusCode` and `collectionOutput` in the task status.
        if let Some(code) = settings.fail_with {
            return Err(Error::failed(
                code,
                format!("template collector: failing with status {code} as configured\n"),
            ));
        }

        // The output directory is the only directory this plugin can see.
        // Artifact names must be plain file names inside it.
        let name = format!("template-{}.txt", file_name_safe(&ctx.node));
        let partial = request.output_path(&format!(".{name}.partial"));

        // Anything unexpected is `internal`, with a message for the
        // operator: `.context(what)` makes one of an I/O error.
        // Write under a temporary name and rename when complete: the run can
        // be stopped at any instruction (cancel, deadline, memory cap).
        let file = File::create(&partial).context("creating the file")?;
        let mut out = BufWriter::new(file);
        writeln!(out, "# autocollect template collector")
            .and_then(|_| writeln!(out, "# node {} task {}", ctx.node, ctx.task_id))
            .context("writing the header")?;
        for line in 1..=settings.lines {
            writeln!(out, "{line} {}", settings.greeting).context("writing a line")?;
            // Progress is cheap, but a few hundred reports are plenty.
            if line % 1000 == 0 || line == settings.lines {
                progress(line, settings.lines, "writing lines");
            }
        }
        let file = out
            .into_inner()
            .map_err(|e| e.into_error())
            .context("flushing the file")?;
        file.sync_all().context("syncing the file")?;
        drop(file);
        std::fs::rename(&partial, request.output_path(&name)).context("renaming the file")?;
        let size = std::fs::metadata(request.output_path(&name))
            .context("reading the file size")?
            .len();

        // The first artifact is the one reported to the operator. The host
        // checks that it is a regular file in the output directory.
        Ok(CollectOutcome::new(
            Artifact {
                name: name.clone(),
                size,
            },
            format!("wrote {name} ({size} bytes)"),
        ))
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
autocollect_sdk::export_collector!(TemplateCollector);
