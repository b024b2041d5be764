//! The coordinator's own threads.
//!
//! A task's work on the coordinating node grows with the cluster: a
//! session opened, a job started and a stream of events followed per
//! node, all at once. On the threads that serve the API, 10,000 nodes'
//! worth of that queued every status request behind it: single answers
//! took up to half a second while the jobs started (`BENCHMARKS.md`,
//! "The coordinator on its own thread"). So a start, and everything it
//! spawns (the sessions, pings, drivers, and the HTTP/2 connections to
//! the nodes), runs here instead, and the API's threads stay free to
//! answer.
//!
//! Half the cores, at least one: the rest serve the API and run this
//! node's own job. One runtime per process, built at the first start
//! (a daemon that never coordinates starts no thread for it) and never
//! shut down: its tasks end with the task they belong to, and with the
//! process.

use std::future::Future;
use std::sync::OnceLock;

use tokio::runtime::Runtime;

fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads((cores / 2).max(1))
            .thread_name("coordinator")
            .enable_all()
            .build()
            .expect("the coordinator's runtime (as the daemon's own was built)")
    })
}

/// Run `work` on the coordinator's threads and wait for its result. A
/// panic in `work` is resumed in the caller, as if it had run there.
pub(super) async fn run<F>(work: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    match runtime().spawn(work).await {
        Ok(output) => output,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            // Never aborted, and the runtime is never shut down.
            Err(e) => unreachable!("the coordinator's runtime dropped a start: {e}"),
        },
    }
}
