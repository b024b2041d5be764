//! The on-disk cache of compiled plugins (`plugin_cache_dir`): one file
//! per component and engine settings, written atomically, and compiled
//! once when several daemons share the directory (the local cluster of
//! `autocollect demo`, the tests and benchmarks, several nodes on one
//! machine).
//!
//! A daemon that finds no entry takes the entry's lock file (`flock`),
//! looks again, and only then compiles: a second daemon asking for the
//! same plugin at the same time waits for the first one's file instead of
//! compiling it too. The wait is bounded ([`LOCK_WAIT`]): a holder that
//! is stuck costs a compile here, never a daemon that does not start. The
//! kernel lets go of the lock of a holder that dies.
//!
//! The directory must be writable only by the daemon: its files are
//! loaded as machine code (see the configuration's `plugin_cache_dir`).

use std::fs::File;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Result;
use rustix::fs::{FlockOperation, flock};
use wasmtime::Engine;
use wasmtime::component::Component;

use crate::hex;

/// The longest a daemon waits for another process compiling the same
/// plugin into the same directory before compiling it itself. A
/// componentize-py plugin compiles in about 10 s on two cores.
pub const LOCK_WAIT: Duration = Duration::from_secs(120);

/// A directory of compiled components.
#[derive(Debug, Clone)]
pub struct DiskCache {
    dir: PathBuf,
}

impl DiskCache {
    pub fn new(dir: PathBuf) -> DiskCache {
        DiskCache { dir }
    }

    /// The component compiled from `bytes` (whose SHA-256 is `key`): read
    /// from the cache, else compiled, by this process or (when another
    /// one holds the entry's lock) by that one, and stored.
    pub fn load_or_compile(
        &self,
        engine: &Engine,
        bytes: &[u8],
        key: &[u8; 32],
    ) -> Result<Component> {
        let stem = entry_stem(engine, key);
        let path = self.dir.join(format!("{stem}.cwasm"));
        if let Some(component) = load(engine, &path) {
            return Ok(component);
        }
        let lock = self.lock(&stem, LOCK_WAIT);
        if lock.is_some()
            && let Some(component) = load(engine, &path)
        {
            // Compiled by the process that held the lock.
            return Ok(component);
        }
        let started = Instant::now();
        let component = Component::new(engine, bytes)?;
        tracing::debug!(elapsed = ?started.elapsed(), "compiled plugin");
        if let Err(e) = store(&path, &component) {
            tracing::warn!(path = %path.display(), "could not cache compiled plugin: {e:#}");
        }
        drop(lock);
        Ok(component)
    }

    /// The entry's lock, once no other process holds it, or `None` (and a
    /// warning) when it cannot be had within `wait`: the caller compiles
    /// without it.
    fn lock(&self, stem: &str, wait: Duration) -> Option<File> {
        let path = self.dir.join(format!("{stem}.lock"));
        let file = std::fs::create_dir_all(&self.dir).and_then(|()| {
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                // The directory is the daemon's own; a link planted in it
                // all the same is refused, not followed.
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
        });
        let file = match file {
            Ok(file) => file,
            Err(e) => {
                tracing::warn!(path = %path.display(), "compiling without the cache's lock: {e}");
                return None;
            }
        };
        let deadline = Instant::now() + wait;
        let mut pause = Duration::from_millis(5);
        loop {
            match flock(&file, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => return Some(file),
                Err(rustix::io::Errno::WOULDBLOCK) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        tracing::warn!(
                            path = %path.display(),
                            "compiling without the cache's lock: another process has held it for {wait:?}"
                        );
                        return None;
                    }
                    // Another process is compiling this plugin: a compile
                    // takes from milliseconds to seconds, so look again
                    // soon at first, then less often.
                    std::thread::sleep(pause.min(left));
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), "compiling without the cache's lock: {e}");
                    return None;
                }
            }
        }
    }
}

/// The entry's file name without extension: the component's hash and a
/// hash of the engine's settings, so a wasmtime upgrade or a change of
/// settings never loads stale code.
fn entry_stem(engine: &Engine, key: &[u8; 32]) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    format!("{}-{:016x}", hex(key), h.finish())
}

/// The entry at `path`, if there is one this engine can load; a bad one
/// is logged and ignored (it is compiled again and replaced).
fn load(engine: &Engine, path: &Path) -> Option<Component> {
    if !path.is_file() {
        return None;
    }
    // SAFETY: the cache directory is the daemon's own (see the module's
    // docs), its files are written whole by `store` (renamed into
    // place), and wasmtime checks the engine compatibility header.
    match unsafe { Component::deserialize_file(engine, path) } {
        Ok(component) => Some(component),
        Err(e) => {
            tracing::warn!(path = %path.display(), "ignoring bad cache entry: {e:#}");
            None
        }
    }
}

fn store(path: &Path, component: &Component) -> Result<()> {
    crate::files::write_atomically(path, &component.serialize()?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::os::unix::fs::MetadataExt;

    /// The smallest component: its header alone.
    const EMPTY_COMPONENT: &[u8] = b"\0asm\x0d\0\x01\0";

    /// How many of this process's file descriptors are open on `path`.
    fn opened(path: &Path) -> usize {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
            .filter(|target| target == path)
            .count()
    }

    /// Which file is at `path` (a store renames a new one into place).
    fn inode(path: &Path) -> u64 {
        std::fs::metadata(path).unwrap().ino()
    }

    fn engine() -> Engine {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        Engine::new(&config).unwrap()
    }

    #[test]
    fn a_second_load_reads_the_entry_the_first_one_stored() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::new(dir.path().join("cache"));
        let engine = engine();
        let key = [7u8; 32];
        cache
            .load_or_compile(&engine, EMPTY_COMPONENT, &key)
            .unwrap();
        let entry = dir
            .path()
            .join("cache")
            .join(format!("{}.cwasm", entry_stem(&engine, &key)));
        let stored = inode(&entry);
        // Not compiled again: the entry is read, not replaced.
        cache
            .load_or_compile(&engine, EMPTY_COMPONENT, &key)
            .unwrap();
        assert_eq!(inode(&entry), stored);
    }

    #[test]
    fn a_waiter_loads_what_the_lock_holder_compiled_and_gives_up_in_time() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::new(dir.path().to_path_buf());
        let engine = engine();
        let key = [9u8; 32];
        let stem = entry_stem(&engine, &key);

        // Another process's compile, in progress: its lock is held (a
        // second open file description, as another process has).
        let held = cache.lock(&stem, Duration::ZERO).expect("the lock");
        assert!(
            cache.lock(&stem, Duration::from_millis(30)).is_none(),
            "a held lock is not taken, and the wait ends"
        );

        // The holder finishes: a waiter loads its entry and compiles nothing.
        let waiter = {
            let (cache, engine) = (cache.clone(), engine.clone());
            std::thread::spawn(move || cache.load_or_compile(&engine, EMPTY_COMPONENT, &key))
        };
        // Once the waiter has the lock file open, it has looked for the
        // entry (and found none): it is waiting for the lock.
        let lock_file = dir.path().join(format!("{stem}.lock"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while opened(&lock_file) < 2 {
            assert!(
                Instant::now() < deadline,
                "the waiter never asked for the lock"
            );
            std::thread::yield_now();
        }
        assert!(
            !waiter.is_finished(),
            "the waiter waits while the lock is held"
        );
        let compiled = Component::new(&engine, EMPTY_COMPONENT).unwrap();
        let entry = dir.path().join(format!("{stem}.cwasm"));
        store(&entry, &compiled).unwrap();
        let stored = inode(&entry);
        drop(held);
        waiter.join().unwrap().unwrap();
        assert_eq!(
            inode(&entry),
            stored,
            "the waiter did not compile and store it again"
        );
    }
}
