//! autocollect: a cluster-wide diagnostics collector whose collection and
//! upload steps are sandboxed WebAssembly components.
//!
//! Layers, from the wire inwards (each module knows only the ones below):
//!
//! - [`cli`]: the `autocollect` command (a thin layer over the rest).
//! - [`server`]: wires configuration, plugins, node and coordinator into
//!   one daemon and serves [`api`].
//! - [`api`]: axum routers: the public REST API and the node-to-node API.
//! - [`coordinator`]: one collection task across nodes: sessions, fan-out,
//!   per-node state, aggregation, cancel, persistence.
//! - [`node`]: this node's side of a task: the session slot and the job
//!   that runs the collector plugin.
//! - [`plugin`]: wasmtime engine, compiled-component cache, sandbox.
//! - [`protocol`]: the node-to-node wire types; [`peer_auth`]: their
//!   signatures.
//! - [`manifest`]: the host's manifest of each node's artifact, and
//!   `verify`.
//! - [`safe_dir`]: directory handles that never follow a symlink (every
//!   host operation on a directory a plugin can write).
//! - [`upload`]: upload destinations: validation, policy, preflight.
//! - [`simulated`]: many simulated nodes in one process (scale bench and
//!   test).
//! - [`started_once`]: a process-wide service (a thread, a pool) started
//!   on first use, tried again after a failed start.
//! - [`client`], [`cluster`]: API client and a local-cluster launcher
//!   (used by the CLI's `demo`, the tests and the benchmarks);
//!   [`local_tls`]: a throwaway CA and a TLS listener for the tests' and
//!   benchmarks' stand-in upload hosts.

pub mod api;
pub mod auth;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod config;
pub mod coordinator;
pub mod files;
pub mod local_tls;
pub mod manifest;
pub mod metrics;
pub mod node;
pub mod peer_auth;
pub mod plugin;
pub mod protocol;
pub mod redact;
pub mod safe_dir;
pub mod server;
pub mod settings;
pub mod simulated;
pub mod started_once;
pub mod testing;
pub mod tls;
pub mod upload;
pub mod upload_sink;

/// Lowercase hex of `bytes` (digests, keys).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(2 * bytes.len());
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
    out
}
