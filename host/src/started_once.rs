//! A process-wide service started on first use (a thread, a pool of
//! them), whose failed start is not remembered: the next use tries again.
//! `OnceLock<Result<..>>` would keep the first error for the life of the
//! process, so one start that failed for a moment (no thread could be
//! spawned, no descriptor was left) would fail every later job until a
//! restart.

use std::sync::{Mutex, OnceLock};

pub struct StartedOnce<T> {
    value: OnceLock<T>,
    /// Held while starting: one start at a time.
    starting: Mutex<()>,
}

impl<T> StartedOnce<T> {
    pub const fn new() -> Self {
        StartedOnce {
            value: OnceLock::new(),
            starting: Mutex::new(()),
        }
    }

    /// The service, started with `start` if it has not been yet (or every
    /// start so far failed).
    pub fn get_or_start<E>(&self, start: impl FnOnce() -> Result<T, E>) -> Result<&T, E> {
        if let Some(value) = self.value.get() {
            return Ok(value);
        }
        let _one = self.starting.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(value) = self.value.get() {
            return Ok(value);
        }
        let started = start()?;
        Ok(self.value.get_or_init(|| started))
    }
}

impl<T> Default for StartedOnce<T> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_start_is_tried_again_and_a_success_kept() {
        let service = StartedOnce::<u32>::new();
        assert_eq!(
            service.get_or_start(|| Err("no threads")),
            Err("no threads")
        );
        assert_eq!(service.get_or_start(|| Ok::<_, &str>(7)), Ok(&7));
        assert_eq!(service.get_or_start(|| Err("not asked")), Ok(&7));
    }
}
