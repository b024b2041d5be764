//! End-to-end tests: real `autocollect` daemons on loopback, real plugins
//! compiled from `plugins/`, driven through the public HTTP API; uploads
//! go to a real HTTP server in the test process (plain, or over TLS with
//! a test CA), directly or through a real proxy.

mod api_errors;
mod archive;
mod browser;
mod budget;
mod cancel;
mod cbcollect;
mod collect;
mod couchbase;
mod couchbase_cli;
mod demo;
mod disk;
mod doc_commands;
mod docs;
mod encryption;
mod events;
mod files_collector;
mod grants;
mod harness;
mod hostile_client;
mod hostile_node;
mod hostile_peer;
mod hostile_plugin;
mod http2;
mod lang_plugins;
mod logging;
mod manifest;
mod metrics;
mod netns;
mod network_policy;
mod openapi;
mod plugin_check;
mod plugin_new;
mod plugin_pool;
mod plugin_run;
mod proxy_server;
mod redaction;
mod reload;
mod sandbox;
mod scale;
mod support;
mod time_window;
mod tls;
mod upload;
mod upload_server;
mod upload_tls;
