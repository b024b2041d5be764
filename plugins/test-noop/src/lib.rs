//! The smallest collector a plugin author can write on the SDK: it knows
//! no option, and its `collect` returns at once with no artifact.
//!
//! `host/benches/plugin_start.rs` measures a plugin's start with it (a
//! fresh sandbox, an instance and one call), so that the figure is the
//! host's cost and the SDK's, not that of imports a plugin of its own
//! brings: wasmtime's instantiation does work for every imported
//! function, and `test-misbehave`, the other no-op measured there,
//! imports seven times as many (every WASI interface, for its escape
//! tests).

use autocollect_sdk::{CollectOutcome, CollectRequest, Collector, Error, Options};

struct Noop;

impl Collector for Noop {
    fn validate_options(options: &Options) -> Result<(), Error> {
        options.check_known(&[])
    }

    fn collect(_request: CollectRequest) -> Result<CollectOutcome, Error> {
        Ok(CollectOutcome {
            artifacts: vec![],
            summary: String::new(),
        })
    }
}

autocollect_sdk::export_collector!(Noop);
