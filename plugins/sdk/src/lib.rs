//! The guest-side SDK for autocollect plugins: a collector or an uploader
//! is a `cdylib` that depends on this crate and builds for
//! `wasm32-wasip2`. `README.md` (next to this crate's `Cargo.toml`) is the
//! guide's first page; `plugins/README.md` the full contract.
//!
//! What it gives:
//!
//! - the generated bindings of each world of the WIT package
//!   `autocollect:plugin@0.1.5` ([`collector`], [`uploader`]), so a plugin
//!   needs no copy of `wit/`; their raw `Guest` traits and `export!`
//!   macros stay usable (`autocollect_sdk::collector::export!(MyType)`);
//! - a trait and an export macro per role: [`Collector`] with
//!   [`export_collector!`], [`Uploader`] with [`export_uploader!`];
//! - typed options ([`Options`]): strings, integers (with a range),
//!   booleans, durations (`30s`), sizes (`64KiB`), compression, and the
//!   unknown-key check, all failing with the contract's
//!   `plugin-error::invalid-option`;
//! - one error type, [`Error`] (the contract's `plugin-error`), with
//!   constructors and `From` impls for `std::io::Error`, archive and exec
//!   errors, so `?` works, and [`Context`] to say what failed;
//! - helpers over the host's imports: [`log`] (and the [`info!`]-style
//!   macros), [`progress`] (and a throttled [`Progress`]), [`archive`],
//!   [`budget`], [`exec`], [`inputs`], and the start request's
//!   parameters, typed ([`task::Parameters`]).
//!
//! A collector:
//!
//! ```ignore
//! use autocollect_sdk::{Collector, CollectOutcome, CollectRequest, Error, Options};
//!
//! struct Hello;
//!
//! impl Collector for Hello {
//!     fn validate_options(options: &Options) -> Result<(), Error> {
//!         options.check_known(&["greeting"])
//!     }
//!
//!     fn collect(request: CollectRequest) -> Result<CollectOutcome, Error> {
//!         let greeting = request.options().get("greeting").unwrap_or("hello");
//!         let artifact = request.write_file("hello.txt", greeting.as_bytes())?;
//!         Ok(CollectOutcome::new(artifact, "wrote hello.txt"))
//!     }
//! }
//!
//! autocollect_sdk::export_collector!(Hello);
//! ```

mod error;
pub mod log;
mod options;
pub mod progress;
pub mod rfc3339;
pub mod task;
pub mod units;

/// The bindings of the `collector` world: the host's imports
/// (`autocollect::plugin::{types, log, progress, exec, task, inputs,
/// budget, archive}`), the `collect` export's `Guest` trait
/// (`exports::autocollect::plugin::collect::Guest`) and its `export!`
/// macro, for a plugin that implements `Guest` itself.
pub mod collector {
    wit_bindgen::generate!({
        path: "wit",
        world: "collector",
        pub_export_macro: true,
        default_bindings_module: "autocollect_sdk::collector",
        additional_derives: [PartialEq],
    });
}

/// The bindings of the `uploader` world: `autocollect::plugin::{log,
/// progress}` (the same types as [`collector`]'s), `wasi:http` and what it
/// uses (`wasi::http::{types, outgoing_handler}`, `wasi::io`, ...), the
/// `upload` export's `Guest` trait
/// (`exports::autocollect::plugin::upload::Guest`) and its `export!` macro.
pub mod uploader {
    wit_bindgen::generate!({
        path: "wit",
        world: "uploader",
        pub_export_macro: true,
        default_bindings_module: "autocollect_sdk::uploader",
        generate_all,
        with: {
            "autocollect:plugin/types@0.1.5": crate::collector::autocollect::plugin::types,
            "autocollect:plugin/log@0.1.5": crate::collector::autocollect::plugin::log,
            "autocollect:plugin/progress@0.1.5": crate::collector::autocollect::plugin::progress,
        },
    });
}

pub use collector::autocollect::plugin::types::{Artifact, Failure, JobContext, OptionError};
pub use collector::exports::autocollect::plugin::collect::{CollectOutcome, CollectRequest};
pub use error::{Context, Error};
pub use options::Options;
pub use progress::{Progress, progress};
pub use uploader::exports::autocollect::plugin::upload::{UploadReceipt, UploadRequest};

/// `archive` (collectors, WIT 0.1.4): a zip the host writes in the output
/// directory, from bytes or from granted files. `Archive::create(name,
/// &options)`, `add_bytes`, `add_file`, `finish() -> Artifact`; every error
/// converts into [`Error`] with `?`.
pub mod archive {
    pub use crate::collector::autocollect::plugin::archive::{
        Archive, ArchiveError, ArchiveOptions, Compression, EntryInfo,
    };

    impl ArchiveOptions {
        /// Compressed with `compression`, no password, whole entries.
        pub fn new(compression: Compression) -> ArchiveOptions {
            ArchiveOptions {
                compression,
                password: None,
                max_entry_bytes: None,
            }
        }

        /// Encrypt every entry with `password` (WinZip AES-256) when one is
        /// given: pass the task's `encryption-password`.
        pub fn password(mut self, password: Option<&str>) -> ArchiveOptions {
            self.password = password.map(str::to_string);
            self
        }

        /// Keep only the last `bytes` of a larger entry.
        pub fn max_entry_bytes(mut self, bytes: Option<u64>) -> ArchiveOptions {
            self.max_entry_bytes = bytes;
            self
        }
    }

    impl Default for ArchiveOptions {
        /// Deflate level 6, no password, whole entries.
        fn default() -> ArchiveOptions {
            ArchiveOptions::new(Compression::Deflate(6))
        }
    }
}

/// `budget` (collectors, WIT 0.1.4/0.1.5): `limits()`, `wrap_up()` (why to
/// finish now, if so), `partial(reason)`, `left_out(item, bytes)`.
pub mod budget {
    pub use crate::collector::autocollect::plugin::budget::*;
}

/// `exec` (collectors, WIT 0.1.2): start the programs the operator
/// allow-listed. `spawn(&Command { .. })` gives a `Process`; an
/// `ExecError` converts into [`Error`](crate::Error) with `?`.
pub mod exec {
    pub use crate::collector::autocollect::plugin::exec::*;
}

/// `inputs` (collectors, WIT 0.1.3): `grants()`, the read-only host
/// directories the operator lets this collector read.
pub mod inputs {
    pub use crate::collector::autocollect::plugin::inputs::*;
}

/// `wasi:http` for uploaders (`types`, `outgoing_handler`), and `wasi:io`
/// (`streams`, `poll`) that it uses.
pub mod http {
    pub use crate::uploader::wasi::http::{outgoing_handler, types};
    pub use crate::uploader::wasi::io::{poll, streams};
}

/// A collector, the friendly way: implement this and register it with
/// [`export_collector!`]. (A plugin may instead implement
/// `collector::exports::autocollect::plugin::collect::Guest` and call
/// `autocollect_sdk::collector::export!`.)
pub trait Collector {
    /// Check the options without doing any work: called once when the
    /// daemon starts, with no filesystem. Reject unknown keys
    /// ([`Options::check_known`]) so that typos surface then.
    fn validate_options(options: &Options) -> Result<(), Error>;

    /// Run one collection, in a fresh instance: parse the options again
    /// (`request.options()`).
    fn collect(request: CollectRequest) -> Result<CollectOutcome, Error>;
}

/// An uploader, the friendly way: implement this and register it with
/// [`export_uploader!`].
pub trait Uploader {
    /// Check the options without doing any work (called at daemon start).
    fn validate_options(options: &Options) -> Result<(), Error>;

    /// Send the artifact at `request.artifact_path` to `request.url`,
    /// reporting progress in bytes.
    fn upload(request: UploadRequest) -> Result<UploadReceipt, Error>;
}

/// Register a type that implements [`Collector`] as this component's
/// `collect` export. Use it once, at the crate's top level:
/// `autocollect_sdk::export_collector!(MyCollector);`
#[macro_export]
macro_rules! export_collector {
    ($ty:ident) => {
        const _: () = {
            impl $crate::collector::exports::autocollect::plugin::collect::Guest for $ty {
                fn validate_options(
                    options: ::std::vec::Vec<(::std::string::String, ::std::string::String)>,
                ) -> ::core::result::Result<(), $crate::Error> {
                    <$ty as $crate::Collector>::validate_options(&$crate::Options::new(&options))
                }

                fn collect(
                    request: $crate::CollectRequest,
                ) -> ::core::result::Result<$crate::CollectOutcome, $crate::Error> {
                    <$ty as $crate::Collector>::collect(request)
                }
            }
        };
        $crate::collector::export!($ty with_types_in $crate::collector);
    };
}

/// Register a type that implements [`Uploader`] as this component's
/// `upload` export: `autocollect_sdk::export_uploader!(MyUploader);`
#[macro_export]
macro_rules! export_uploader {
    ($ty:ident) => {
        const _: () = {
            impl $crate::uploader::exports::autocollect::plugin::upload::Guest for $ty {
                fn validate_options(
                    options: ::std::vec::Vec<(::std::string::String, ::std::string::String)>,
                ) -> ::core::result::Result<(), $crate::Error> {
                    <$ty as $crate::Uploader>::validate_options(&$crate::Options::new(&options))
                }

                fn upload(
                    request: $crate::UploadRequest,
                ) -> ::core::result::Result<$crate::UploadReceipt, $crate::Error> {
                    <$ty as $crate::Uploader>::upload(request)
                }
            }
        };
        $crate::uploader::export!($ty with_types_in $crate::uploader);
    };
}

impl CollectRequest {
    /// The options, typed ([`Options`]).
    pub fn options(&self) -> Options<'_> {
        Options::new(&self.options)
    }

    /// The guest path of `name` in the output directory.
    pub fn output_path(&self, name: &str) -> String {
        format!("{}/{name}", self.output_dir.trim_end_matches('/'))
    }

    /// The artifact `name` (a file the plugin wrote in the output
    /// directory), with its size read from disk.
    pub fn artifact(&self, name: &str) -> Result<Artifact, Error> {
        let size = std::fs::metadata(self.output_path(name))
            .with_context(|| format!("reading the size of {name}"))?
            .len();
        Ok(Artifact {
            name: name.to_string(),
            size,
        })
    }

    /// Write `data` to `name` in the output directory (under a temporary
    /// name first, renamed when complete) and return it as an artifact.
    pub fn write_file(&self, name: &str, data: &[u8]) -> Result<Artifact, Error> {
        let partial = self.output_path(&format!(".{name}.partial"));
        std::fs::write(&partial, data).with_context(|| format!("writing {name}"))?;
        std::fs::rename(&partial, self.output_path(name))
            .with_context(|| format!("renaming {name}"))?;
        self.artifact(name)
    }
}

impl CollectOutcome {
    /// One artifact and the summary line.
    pub fn new(artifact: Artifact, summary: impl Into<String>) -> CollectOutcome {
        CollectOutcome {
            artifacts: vec![artifact],
            summary: summary.into(),
        }
    }
}

impl UploadRequest {
    /// The options, typed ([`Options`]).
    pub fn options(&self) -> Options<'_> {
        Options::new(&self.options)
    }
}
