//! The coordinator's own threads.
//!
//! A task's work on the coordinating node grows with the cluster: a
//! session opened, a job started and a stream of events followed per
//! node, all at once. On the threads that serve the API, 10,000 nodes'
//! worth of that queued every status request behind it: single answers
//! took up to half a second while the jobs started (`BENCHMARKS.md`,
//! "The coordinator on its own threads"). So a start, and everything it
//! spawns (the sessions and their connections, pings and drivers), runs
//! here instead, and the API's threads stay free to
//! answer.
//!
//! Half the cores, at least one: the rest serve the API and run this
//! node's own job. One runtime per process, started with the daemon
//! ([`start_threads`], so that a failure to start them fails the
//! daemon's start, in words) and never shut down: its tasks end with the
//! task they belong to, and with the process.

use std::future::Future;
use std::sync::{Mutex, OnceLock};

use tokio::runtime::Runtime;

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

/// Start the coordinator's threads, once per process (later calls do
/// nothing).
pub fn start_threads() -> std::io::Result<()> {
    // One builder at a time: a runtime built and then not kept would be
    // dropped here, which tokio forbids in an async context.
    static BUILDING: Mutex<()> = Mutex::new(());
    let _one = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    if RUNTIME.get().is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads((cores / 2).max(1))
            .thread_name("coordinator")
            .enable_all()
            .build()?;
        let _ = RUNTIME.set(runtime);
    }
    Ok(())
}

/// Run `work` on the coordinator's threads and wait for its result (on
/// the caller's own runtime if [`start_threads`] was never called). A
/// panic in `work` is resumed in the caller, as if it had run there.
pub(super) async fn run<F>(work: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let Some(runtime) = RUNTIME.get() else {
        return work.await;
    };
    match runtime.spawn(work).await {
        Ok(output) => output,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            // Never aborted, and the runtime is never shut down.
            Err(e) => unreachable!("the coordinator's runtime dropped a start: {e}"),
        },
    }
}
