//! Progress of the run, shown to the operator (`perNode.NODE.progress`).
//! The host forwards at most one report every 100 ms and keeps 200 bytes
//! of the message; collectors count in any unit, uploaders in bytes.

use std::time::{Duration, Instant};

/// `done` units out of `total` (0 when unknown), with a short message.
pub fn progress(done: u64, total: u64, message: &str) {
    crate::collector::autocollect::plugin::progress::report(done, total, message);
}

/// A reporter that calls the host at most once per interval (100 ms by
/// default, what the host forwards anyway), always for the first report
/// and when `done` reaches `total`. For loops over many small units.
///
/// ```ignore
/// let mut progress = Progress::new(files.len() as u64);
/// for (i, file) in files.iter().enumerate() {
///     progress.report(i as u64 + 1, || format!("{} of {} files", i + 1, files.len()));
/// }
/// ```
pub struct Progress {
    total: u64,
    every: Duration,
    last: Option<Instant>,
}

impl Progress {
    pub fn new(total: u64) -> Progress {
        Progress {
            total,
            every: Duration::from_millis(100),
            last: None,
        }
    }

    /// Report at most once per `every`.
    pub fn every(mut self, every: Duration) -> Progress {
        self.every = every;
        self
    }

    /// Change the total (0: unknown).
    pub fn set_total(&mut self, total: u64) {
        self.total = total;
    }

    /// Report `done` if the interval has passed (or it is the first
    /// report, or the last unit); the message is made only then.
    pub fn report(&mut self, done: u64, message: impl FnOnce() -> String) {
        let now = Instant::now();
        let due = self.last.is_none_or(|last| now - last >= self.every)
            || (self.total > 0 && done >= self.total);
        if due {
            self.last = Some(now);
            progress(done, self.total, &message());
        }
    }
}
