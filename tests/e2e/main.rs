//! End-to-end tests: real `autocollect` daemons on loopback, real plugins
//! compiled from `plugins/`, driven through the public HTTP API.

mod api_errors;
mod cancel;
mod collect;
mod sandbox;
mod support;
