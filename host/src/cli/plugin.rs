//! `autocollect plugin check`: what a plugin file is and whether this
//! daemon runs it, with the daemon's own loading and diagnosis
//! ([`crate::plugin::inspect`]).

use std::path::Path;
use std::process::ExitCode;

use sha2::{Digest, Sha256};

use crate::plugin::collector::CollectorPlugin;
use crate::plugin::inspect::{self, Inspection, Role};
use crate::plugin::uploader::UploaderPlugin;
use crate::plugin::{PluginHost, PluginSource};

/// `--option K=V`.
pub fn parse_option(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?}: expected KEY=VALUE")),
    }
}

/// Facts on stdout, the reason it cannot run on stderr; exit 0 only when
/// it loads as `role` (or the role it exports) and accepts `options`.
pub async fn check(file: &Path, role: Option<Role>, options: &[(String, String)]) -> ExitCode {
    let fail = |why: &dyn std::fmt::Display| {
        eprintln!("error: {why}");
        ExitCode::FAILURE
    };
    let source = PluginSource::File(file.to_path_buf());
    let bytes = match source.bytes() {
        Ok(b) => b,
        Err(e) => return fail(&format_args!("{e:#}")),
    };
    println!("file:          {}", file.display());
    println!("size:          {} bytes", bytes.len());
    println!("sha256:        {}", crate::hex(&Sha256::digest(&bytes)));
    println!("this daemon:   {}", inspect::support_note());
    let host = match PluginHost::new(None) {
        Ok(h) => h,
        Err(e) => return fail(&format_args!("{e:#}")),
    };
    let component = match host.component(&source) {
        Ok(c) => c,
        Err(e) => {
            println!("runnable:      no");
            return fail(&format_args!("{e:#}"));
        }
    };
    let inspection = Inspection::of(host.engine(), &component);
    print_inspection(&inspection);

    let Some(role) = role.or(inspection.role) else {
        println!("runnable:      no");
        let why = inspect::diagnose(&inspection, Role::Collector).err();
        let why = why.unwrap_or_else(|| "exports no autocollect role".into());
        return fail(&format_args!("{source}: {why}"));
    };
    let validated = match role {
        Role::Collector => match CollectorPlugin::load(&host, source.clone()) {
            Ok(p) => Ok(p.validate_options(options).await),
            Err(e) => Err(e),
        },
        Role::Uploader => match UploaderPlugin::load(&host, source.clone()) {
            Ok(p) => Ok(p.validate_options(options).await),
            Err(e) => Err(e),
        },
    };
    match validated {
        Err(e) => {
            println!("runnable:      no, not as {}", role.with_article());
            fail(&format_args!("{e:#}"))
        }
        Ok(result) => {
            println!("runnable:      yes, as {}", role.with_article());
            let given = match options.len() {
                1 => "1 option".to_string(),
                n => format!("{n} options"),
            };
            match result {
                Ok(()) => {
                    println!("options:       valid ({given}, by its validate-options)");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    println!("options:       rejected ({given})");
                    fail(&format_args!("validate-options: {e}"))
                }
            }
        }
    }
}

fn print_inspection(inspection: &Inspection) {
    match inspection.role {
        Some(role) => {
            let export = inspection
                .exports
                .iter()
                .find(|e| {
                    e.strip_prefix(inspect::PACKAGE)
                        .and_then(|r| r.strip_prefix('/'))
                        .is_some_and(|r| r.split('@').next() == Some(role.export()))
                })
                .map(String::as_str)
                .unwrap_or_default();
            println!("world:         {role} (exports {export})");
        }
        None => println!(
            "world:         none of autocollect's (exports {})",
            match inspection.exports.is_empty() {
                true => "nothing".to_string(),
                false => inspection.exports.join(", "),
            }
        ),
    }
    println!(
        "built against: {}",
        match &inspection.wit_version {
            Some(v) => format!("{} {v}", inspect::PACKAGE),
            None => format!("no {} version in its names", inspect::PACKAGE),
        }
    );
    println!("imports:       {}", inspection.imports.len());
    for import in &inspection.imports {
        println!("  {import}");
    }
}
