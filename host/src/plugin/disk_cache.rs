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
//! Its files are loaded as machine code, so whoever can write one runs
//! code in the daemon. The directory is refused unless it belongs to the
//! daemon's user (or root) and no one else may write it, and an entry is
//! loaded only if the same holds for it (it is compiled again otherwise).
//! Every file is opened through the directory opened and checked at
//! start, never through a link: a writable parent cannot swap either.

use std::fs::File;
use std::hash::{Hash, Hasher};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use rustix::fs::{FlockOperation, Mode, OFlags, flock};
use wasmtime::Engine;
use wasmtime::component::Component;

use crate::hex;
use crate::safe_dir::{SafeDir, private};

/// The longest a daemon waits for another process compiling the same
/// plugin into the same directory before compiling it itself. A
/// componentize-py plugin compiles in about 10 s on two cores.
pub const LOCK_WAIT: Duration = Duration::from_secs(120);

/// A directory of compiled components.
#[derive(Debug, Clone)]
pub struct DiskCache {
    dir: Arc<SafeDir>,
}

impl DiskCache {
    /// The cache in `dir`, made (mode 0700) if it is not there. Refused
    /// unless it belongs to this process's user (or root) and no one else
    /// may write it.
    pub fn open(dir: &Path) -> Result<DiskCache> {
        let opened = SafeDir::open_private(
            dir,
            "plugin_cache_dir",
            "its files are loaded as machine code",
        )?;
        Ok(DiskCache {
            dir: Arc::new(opened),
        })
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
        let entry = format!("{stem}.cwasm");
        if let Some(component) = self.load(engine, &entry) {
            return Ok(component);
        }
        let lock = self.lock(&stem, LOCK_WAIT);
        if lock.is_some()
            && let Some(component) = self.load(engine, &entry)
        {
            // Compiled by the process that held the lock.
            return Ok(component);
        }
        let started = Instant::now();
        let component = Component::new(engine, bytes)?;
        tracing::debug!(elapsed = ?started.elapsed(), "compiled plugin");
        if let Err(e) = self.store(&entry, &component) {
            tracing::warn!(path = %self.path(&entry), "could not cache compiled plugin: {e:#}");
        }
        drop(lock);
        Ok(component)
    }

    /// The entry's lock, once no other process holds it, or `None` (and a
    /// warning) when it cannot be had within `wait`: the caller compiles
    /// without it.
    fn lock(&self, stem: &str, wait: Duration) -> Option<File> {
        let name = format!("{stem}.lock");
        let path = self.path(&name);
        // A link planted in the directory all the same is refused, not
        // followed.
        let file = rustix::fs::openat(
            self.dir.as_fd(),
            name.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map(File::from);
        let file = match file {
            Ok(file) => file,
            Err(e) => {
                tracing::warn!(%path, "compiling without the cache's lock: {e}");
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
                            %path,
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
                    tracing::warn!(%path, "compiling without the cache's lock: {e}");
                    return None;
                }
            }
        }
    }

    /// The entry `name`, if there is one this engine can load and only
    /// this daemon's user could have written; another is logged and
    /// ignored (it is compiled again and replaced).
    fn load(&self, engine: &Engine, name: &str) -> Option<Component> {
        let ignored = |why: &dyn std::fmt::Display| {
            tracing::warn!(path = %self.path(name), "ignoring cache entry: {why}");
            None
        };
        let file = match self.dir.open_file(name) {
            Ok((file, _)) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(e) => return ignored(&e),
        };
        match rustix::fs::fstat(&file).map_err(io::Error::from) {
            Ok(stat) => {
                if let Err(why) = private(&stat) {
                    return ignored(&format!("it is {why}: it was not written by this daemon"));
                }
            }
            Err(e) => return ignored(&e),
        }
        // SAFETY: the file is the one opened and checked above (its
        // descriptor's own link, not its name again): written whole by
        // `store` (renamed into place), in a directory and by a user that
        // no one else writes as, and wasmtime checks the engine
        // compatibility header.
        let opened = format!("/proc/self/fd/{}", file.as_raw_fd());
        match unsafe { Component::deserialize_file(engine, opened) } {
            Ok(component) => Some(component),
            Err(e) => ignored(&format!("{e:#}")),
        }
    }

    fn store(&self, name: &str, component: &Component) -> Result<()> {
        let bytes = component.serialize()?;
        // A bad entry (or whatever else has its name) goes first: a new
        // one is written whole beside it and renamed into place.
        match self.dir.remove_file(name) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        self.dir.write_new(name, &bytes)?;
        Ok(())
    }

    /// `name`'s path, for messages.
    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::safe_dir::give_away;

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
        let cache = DiskCache::open(&dir.path().join("cache")).unwrap();
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
        let cache = DiskCache::open(dir.path()).unwrap();
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
        cache.store(&format!("{stem}.cwasm"), &compiled).unwrap();
        let stored = inode(&entry);
        drop(held);
        waiter.join().unwrap().unwrap();
        assert_eq!(
            inode(&entry),
            stored,
            "the waiter did not compile and store it again"
        );
    }

    #[test]
    fn a_directory_others_could_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let e = format!("{:#}", DiskCache::open(&shared).unwrap_err());
        assert!(e.ends_with("it is writable by others (mode 1777)"), "{e}");
        assert!(e.contains("must belong to the daemon's user"), "{e}");

        let theirs = dir.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        give_away(&theirs);
        let e = format!("{:#}", DiskCache::open(&theirs).unwrap_err());
        assert!(
            e.contains("it is owned by uid 65534, neither the daemon's user"),
            "{e}"
        );

        // Made when missing: the daemon's user's alone.
        let made = dir.path().join("made/cache");
        DiskCache::open(&made).unwrap();
        let mode = std::fs::metadata(&made).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn an_entry_someone_else_could_have_written_is_compiled_again_not_loaded() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path()).unwrap();
        let engine = engine();
        let key = [5u8; 32];
        let entry = dir
            .path()
            .join(format!("{}.cwasm", entry_stem(&engine, &key)));
        let tampered: [&dyn Fn(&Path); 3] = [
            &|path| std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).unwrap(),
            &|path| give_away(path),
            // A link to a good entry elsewhere is not followed either.
            &|path| {
                let elsewhere = path.with_extension("elsewhere");
                std::fs::rename(path, &elsewhere).unwrap();
                std::os::unix::fs::symlink(&elsewhere, path).unwrap();
            },
        ];
        for tamper in tampered {
            cache
                .load_or_compile(&engine, EMPTY_COMPONENT, &key)
                .unwrap();
            tamper(&entry);
            cache
                .load_or_compile(&engine, EMPTY_COMPONENT, &key)
                .unwrap();
            // Replaced by a fresh compile (a loaded entry stays as it is):
            // the daemon's own file again, its alone.
            let now = std::fs::symlink_metadata(&entry).unwrap();
            assert!(now.file_type().is_file());
            // SAFETY: geteuid has no preconditions.
            assert_eq!(now.uid(), unsafe { libc::geteuid() });
            assert_eq!(now.permissions().mode() & 0o777, 0o600);
        }
    }
}
