//! A job's disk budget: what its output and temporary directories hold,
//! watched while the collector runs, and a stop the moment it is over.
//!
//! `inotify` reports each write as it happens; a write to a file is
//! accounted by a `stat` of that file alone, so a file growing without end
//! is seen within milliseconds, whatever else the tree holds. Creations,
//! removals and renames mark the tree for a full walk (at most every
//! [`RESCAN_MIN`]), which also re-syncs the watches; a walk runs every
//! [`RESCAN_EVERY`] anyway, and whenever the kernel's event queue
//! overflowed. Every walk and `stat` goes through [`SafeDir`]: nothing
//! the plugin planted is followed.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
use rustix::fs::{AtFlags, FileType};

use crate::plugin::archive::ArchiveHeld;
use crate::safe_dir::SafeDir;

/// Shortest time between two full walks triggered by events.
const RESCAN_MIN: Duration = Duration::from_millis(20);
/// A full walk at least this often.
const RESCAN_EVERY: Duration = Duration::from_secs(1);
/// How long the watcher waits for events before its periodic checks.
const POLL: Duration = Duration::from_millis(100);

/// What a job may hold on disk.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_bytes: u64,
    pub max_entries: u64,
    /// Free space `data_dir` must keep.
    pub min_free_bytes: u64,
}

/// What the job holds right now: the directories as the watcher last
/// counted them, and what the run's archives hold that no walk sees
/// (spool files, zip entries). Read by the collector's `budget.wrap-up`
/// to tell the plugin when to finish.
#[derive(Debug, Default)]
pub struct Usage {
    pub bytes: std::sync::atomic::AtomicU64,
    pub entries: std::sync::atomic::AtomicU64,
    pub archives: Arc<ArchiveHeld>,
}

impl Usage {
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed) + self.archives.spool_bytes()
    }

    pub fn entries(&self) -> u64 {
        self.entries.load(Ordering::Relaxed) + self.archives.entries()
    }
}

/// Watches until dropped.
pub struct BudgetWatch {
    stop: Arc<AtomicBool>,
    /// Written to wake the watcher at once when it should stop.
    wake: Arc<OwnedFd>,
    /// Answered when the watcher has stopped watching (it may still be
    /// closing its inotify instance, which takes the kernel milliseconds:
    /// not worth waiting for).
    stopped: std::sync::mpsc::Receiver<()>,
}

impl Drop for BudgetWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let one = 1u64.to_ne_bytes();
        // SAFETY: an 8-byte write to our own eventfd.
        unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        // After this, no breach is reported.
        let _ = self.stopped.recv();
    }
}

/// Watch `dirs` (and `free_space_of` for the reserve); keep `usage` up to
/// date; call `breach` once, with the reason, when the job goes over a
/// limit.
pub fn watch(
    dirs: Vec<SafeDir>,
    free_space_of: SafeDir,
    limits: Limits,
    usage: Arc<Usage>,
    breach: impl FnOnce(String) + Send + 'static,
) -> io::Result<BudgetWatch> {
    let inotify = inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK)?;
    let mut tree = Tree {
        inotify,
        roots: dirs,
        dirs: HashMap::new(),
        sizes: HashMap::new(),
        bytes: 0,
        entries: 0,
    };
    tree.rescan();
    tree.publish(&usage);
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = stop.clone();
    // SAFETY: eventfd returns a new descriptor we own, or -1.
    let wake = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if wake < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `wake` is a fresh descriptor nobody else owns.
    let wake = Arc::new(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(wake) });
    let woken = wake.clone();
    let (stopped_tx, stopped) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("job-budget".into())
        .spawn(move || {
            let mut tree = tree;
            run(
                &mut tree,
                free_space_of,
                limits,
                &usage,
                stopping,
                &woken,
                breach,
            );
            let _ = stopped_tx.send(());
            drop(tree);
        })?;
    Ok(BudgetWatch {
        stop,
        wake,
        stopped,
    })
}

struct Tree {
    inotify: OwnedFd,
    roots: Vec<SafeDir>,
    /// Watched directories by watch descriptor.
    dirs: HashMap<i32, SafeDir>,
    /// Size of each non-directory entry, by (directory, name).
    sizes: HashMap<(i32, OsString), u64>,
    bytes: u64,
    entries: u64,
}

const MASK: WatchFlags = WatchFlags::MODIFY
    .union(WatchFlags::CLOSE_WRITE)
    .union(WatchFlags::CREATE)
    .union(WatchFlags::DELETE)
    .union(WatchFlags::MOVED_FROM)
    .union(WatchFlags::MOVED_TO)
    .union(WatchFlags::ONLYDIR);

impl Tree {
    fn publish(&self, usage: &Usage) {
        usage.bytes.store(self.bytes, Ordering::Relaxed);
        usage.entries.store(self.entries, Ordering::Relaxed);
    }

    /// Walk everything again, from the roots.
    fn rescan(&mut self) {
        self.dirs.clear();
        self.sizes.clear();
        self.bytes = 0;
        self.entries = 0;
        let roots: Vec<SafeDir> = self
            .roots
            .iter()
            .filter_map(|r| r.try_clone().ok())
            .collect();
        for root in roots {
            self.add_tree(root, 0);
        }
    }

    fn add_tree(&mut self, dir: SafeDir, depth: usize) {
        // The watch is on the directory we hold open (the magic link in
        // /proc leads to exactly that inode), not on a path a plugin could
        // swap. Without a watch it is still counted, at each walk.
        let proc_path = format!("/proc/self/fd/{}", dir.as_fd().as_raw_fd());
        let wd = inotify::add_watch(&self.inotify, proc_path.as_str(), MASK).unwrap_or_else(|e| {
            tracing::debug!(dir = %dir.path().display(), "cannot watch: {e}");
            -1 - self.dirs.len() as i32
        });
        let entries = dir.entries().unwrap_or_default();
        let mut subdirs = Vec::new();
        for (name, kind) in entries {
            self.entries += 1;
            if kind == FileType::Directory {
                if depth < 256
                    && let Ok(sub) = dir.open_dir(Path::new(&name))
                {
                    subdirs.push(sub);
                }
            } else {
                let size = size_of(&dir, &name);
                self.bytes += size;
                self.sizes.insert((wd, name), size);
            }
        }
        self.dirs.insert(wd, dir);
        for sub in subdirs {
            self.add_tree(sub, depth + 1);
        }
    }

    /// A file in watched directory `wd` was written: account its size now.
    fn touched(&mut self, wd: i32, name: OsString) {
        let Some(dir) = self.dirs.get(&wd) else {
            return;
        };
        let size = size_of(dir, &name);
        match self.sizes.insert((wd, name), size) {
            Some(old) => self.bytes = self.bytes - old.min(self.bytes) + size,
            None => {
                self.entries += 1;
                self.bytes += size;
            }
        }
    }

    /// Read what the kernel queued; whether the tree needs a full walk.
    fn drain(&mut self) -> bool {
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 16 * 1024];
        let mut reader = inotify::Reader::new(self.inotify.as_fd(), &mut buf);
        let mut dirty = false;
        let mut writes = Vec::new();
        let mut new_dirs = Vec::new();
        // An error is EAGAIN: nothing more for now.
        while let Ok(event) = reader.next() {
            let flags = event.events();
            if flags.contains(ReadFlags::QUEUE_OVERFLOW) {
                dirty = true;
                continue;
            }
            if flags.intersects(
                ReadFlags::CREATE
                    | ReadFlags::DELETE
                    | ReadFlags::MOVED_FROM
                    | ReadFlags::MOVED_TO
                    | ReadFlags::IGNORED,
            ) {
                dirty = true;
            }
            let Some(name) = event.file_name() else {
                continue;
            };
            let name = OsString::from(std::ffi::OsStr::from_bytes(name.to_bytes()));
            if flags.contains(ReadFlags::ISDIR) {
                if flags.intersects(ReadFlags::CREATE | ReadFlags::MOVED_TO) {
                    new_dirs.push((event.wd(), name));
                }
            } else if flags
                .intersects(ReadFlags::MODIFY | ReadFlags::CLOSE_WRITE | ReadFlags::CREATE)
            {
                writes.push((event.wd(), name));
            }
        }
        // A new directory is watched at once, so writes into it are seen
        // as they happen (the next walk counts it exactly).
        for (wd, name) in new_dirs {
            let sub = self
                .dirs
                .get(&wd)
                .and_then(|d| d.open_dir(Path::new(&name)).ok());
            if let Some(sub) = sub {
                self.add_tree(sub, 1);
            }
        }
        for (wd, name) in writes {
            self.touched(wd, name);
        }
        dirty
    }
}

use std::os::unix::ffi::OsStrExt;

fn size_of(dir: &SafeDir, name: &std::ffi::OsStr) -> u64 {
    rustix::fs::statat(dir.as_fd(), name, AtFlags::SYMLINK_NOFOLLOW)
        .map(|s| s.st_size as u64)
        .unwrap_or(0)
}

fn mib(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

fn over(tree: &Tree, usage: &Usage, free: Option<u64>, limits: &Limits) -> Option<String> {
    let bytes = tree.bytes + usage.archives.spool_bytes();
    if bytes > limits.max_bytes {
        return Some(format!(
            "the job wrote {} MiB, over its budget of {} MiB (storage.job_max_mb): stopped",
            mib(bytes),
            mib(limits.max_bytes)
        ));
    }
    let entries = tree.entries + usage.archives.entries();
    if entries > limits.max_entries {
        return Some(format!(
            "the job created {entries} files and archive entries, over its budget of {} \
             (storage.job_max_files): stopped",
            limits.max_entries
        ));
    }
    match free {
        Some(free) if free < limits.min_free_bytes => Some(format!(
            "free space in data_dir fell to {} MiB, below the reserve of {} MiB (storage.min_free_mb): stopped",
            free >> 20,
            limits.min_free_bytes >> 20
        )),
        _ => None,
    }
}

/// Watch until `stop`; then return (the caller drops `tree`, closing the
/// inotify instance, only after telling the job it has stopped).
fn run(
    tree: &mut Tree,
    free_space_of: SafeDir,
    limits: Limits,
    usage: &Usage,
    stop: Arc<AtomicBool>,
    wake: &OwnedFd,
    breach: impl FnOnce(String),
) {
    let mut breach = Some(breach);
    let mut last_scan = Instant::now();
    let mut dirty = false;
    let mut free = free_space_of.free_bytes().ok();
    let mut last_free = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let mut pollfds = [
            libc::pollfd {
                fd: tree.inotify.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let wait = if dirty {
            RESCAN_MIN.saturating_sub(last_scan.elapsed())
        } else {
            POLL
        };
        // SAFETY: two valid pollfds, for the duration of the call.
        unsafe { libc::poll(pollfds.as_mut_ptr(), 2, wait.as_millis() as i32) };
        if stop.load(Ordering::Relaxed) {
            return;
        }
        dirty |= tree.drain();
        let since = last_scan.elapsed();
        if (dirty && since >= RESCAN_MIN) || since >= RESCAN_EVERY {
            tree.rescan();
            dirty = tree.drain();
            last_scan = Instant::now();
        }
        if last_free.elapsed() >= POLL {
            free = free_space_of.free_bytes().ok();
            last_free = Instant::now();
        }
        tree.publish(usage);
        if let Some(reason) = over(tree, usage, free, &limits)
            && let Some(breach) = breach.take()
        {
            tracing::warn!(bytes = tree.bytes, files = tree.entries, "{reason}");
            breach(reason);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn limits(max_bytes: u64, max_entries: u64) -> Limits {
        Limits {
            max_bytes,
            max_entries,
            min_free_bytes: 0,
        }
    }

    fn watched(dir: &Path, limits: Limits) -> (BudgetWatch, mpsc::Receiver<String>) {
        let (tx, rx) = mpsc::channel();
        let root = SafeDir::open_root(dir, false).unwrap();
        let free = SafeDir::open_root(dir, false).unwrap();
        let w = watch(vec![root], free, limits, Default::default(), move |r| {
            tx.send(r).unwrap()
        })
        .unwrap();
        (w, rx)
    }

    #[test]
    fn a_growing_file_is_caught_within_its_budget_plus_a_little() {
        let tmp = tempfile::tempdir().unwrap();
        let (_w, rx) = watched(tmp.path(), limits(8 << 20, 1000));
        std::fs::create_dir(tmp.path().join("deep")).unwrap();
        let mut f = std::fs::File::create(tmp.path().join("deep/big")).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        let mut written = 0u64;
        let reason = loop {
            if let Ok(reason) = rx.try_recv() {
                break reason;
            }
            std::io::Write::write_all(&mut f, &chunk).unwrap();
            written += chunk.len() as u64;
            assert!(written < 512 << 20, "no breach after {written} bytes");
        };
        assert!(reason.contains("storage.job_max_mb"), "{reason}");
        assert!(written < (8 << 20) + (64 << 20), "caught late: {written}");
    }

    #[test]
    fn too_many_files_are_caught() {
        let tmp = tempfile::tempdir().unwrap();
        let (_w, rx) = watched(tmp.path(), limits(1 << 30, 50));
        for i in 0..200 {
            std::fs::write(tmp.path().join(format!("f{i}")), b"x").unwrap();
        }
        let reason = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(reason.contains("storage.job_max_files"), "{reason}");
    }

    #[test]
    fn links_out_of_the_tree_are_not_counted() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("huge"), vec![0u8; 1 << 20]).unwrap();
        std::os::unix::fs::symlink(outside.path(), tmp.path().join("out")).unwrap();
        let root = SafeDir::open_root(tmp.path(), false).unwrap();
        let free = SafeDir::open_root(tmp.path(), false).unwrap();
        let (tx, rx) = mpsc::channel();
        let _w = watch(
            vec![root],
            free,
            limits(1000, 10),
            Default::default(),
            move |r| tx.send(r).unwrap(),
        )
        .unwrap();
        assert!(rx.recv_timeout(Duration::from_millis(1500)).is_err());
    }
}
