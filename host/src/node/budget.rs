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
//! the plugin planted is followed. One thread of the process watches
//! every job ([`Watcher`]).

use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustix::event::{EventfdFlags, Timespec, epoll};
use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
use rustix::fs::{AtFlags, FileType};

use crate::plugin::archive::ArchiveHeld;
use crate::safe_dir::SafeDir;
use crate::started_once::StartedOnce;

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
    id: u64,
}

impl Drop for BudgetWatch {
    fn drop(&mut self) {
        // Answered once the watcher has let go of the job: after this, no
        // breach is reported. (It closes the job's inotify instance only
        // then, which takes the kernel milliseconds: not worth waiting for.)
        let (done, stopped) = std::sync::mpsc::sync_channel(1);
        if watcher().is_ok_and(|w| w.send(Command::Remove(self.id, done))) {
            let _ = stopped.recv();
        }
    }
}

/// Watch `dirs` (and `free_space_of` for the reserve); keep `usage` up to
/// date; call `breach` once, with the reason, when the job goes over a
/// limit. `usage` holds the first count when this returns.
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
    let watcher = watcher()?;
    let id = NEXT_JOB.fetch_add(1, Ordering::Relaxed);
    let free = free_space_of.free_bytes().ok();
    let job = Job {
        tree,
        free_space_of,
        limits,
        usage,
        breach: Some(Box::new(breach)),
        last_scan: Instant::now(),
        dirty: false,
        free,
        last_free: Instant::now(),
    };
    if !watcher.send(Command::Add(id, Box::new(job))) {
        return Err(io::Error::other("the job-budget thread has stopped"));
    }
    Ok(BudgetWatch { id })
}

/// Ids of watched jobs, in this process.
static NEXT_JOB: AtomicU64 = AtomicU64::new(0);

/// The process's one watcher thread, started with the first watch.
static WATCHER: StartedOnce<Watcher> = StartedOnce::new();

fn watcher() -> io::Result<&'static Watcher> {
    WATCHER.get_or_start(|| {
        Watcher::start()
            .map_err(|e| io::Error::other(format!("cannot start the job-budget thread: {e}")))
    })
}

/// One thread watches every job of the process (a node runs one at a
/// time; the tests' harness may run several), over an `epoll` of the
/// jobs' `inotify` instances: a job costs no thread of its own, whose
/// start and exit cost about a third of what watching a small job did.
struct Watcher {
    commands: std::sync::mpsc::Sender<Command>,
    /// Written to wake the thread when a command is sent.
    wake: OwnedFd,
}

enum Command {
    Add(u64, Box<Job>),
    /// Stop watching the job, then answer.
    Remove(u64, std::sync::mpsc::SyncSender<()>),
}

/// The `epoll` data of the wake-up eventfd (jobs' are their ids).
const WAKE: u64 = u64::MAX;

impl Watcher {
    fn start() -> io::Result<Watcher> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let wake = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        epoll::add(
            &epoll,
            &wake,
            epoll::EventData::new_u64(WAKE),
            epoll::EventFlags::IN,
        )?;
        let woken = wake.try_clone()?;
        let (commands, received) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("job-budget".into())
            .spawn(move || serve(&epoll, &woken, &received))?;
        Ok(Watcher { commands, wake })
    }

    /// Hand the thread `command`; false if it is gone.
    fn send(&self, command: Command) -> bool {
        let sent = self.commands.send(command).is_ok();
        if sent {
            let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
        }
        sent
    }
}

/// One job's watch.
struct Job {
    tree: Tree,
    free_space_of: SafeDir,
    limits: Limits,
    usage: Arc<Usage>,
    breach: Option<Box<dyn FnOnce(String) + Send>>,
    last_scan: Instant,
    /// The tree changed shape since the last walk.
    dirty: bool,
    /// `data_dir`'s free space, as last read.
    free: Option<u64>,
    last_free: Instant,
}

impl Job {
    /// How long until this job needs looking at again.
    fn next_check(&self) -> Duration {
        if self.dirty {
            RESCAN_MIN.saturating_sub(self.last_scan.elapsed())
        } else {
            POLL
        }
    }

    /// Walk the tree if it is due, read the free space if it is due,
    /// publish the usage, and report a breach (once).
    fn check(&mut self) {
        let since = self.last_scan.elapsed();
        if (self.dirty && since >= RESCAN_MIN) || since >= RESCAN_EVERY {
            self.tree.rescan();
            self.dirty = self.tree.drain();
            self.last_scan = Instant::now();
        }
        if self.last_free.elapsed() >= POLL {
            self.free = self.free_space_of.free_bytes().ok();
            self.last_free = Instant::now();
        }
        self.tree.publish(&self.usage);
        if let Some(reason) = over(&self.tree, &self.usage, self.free, &self.limits)
            && let Some(breach) = self.breach.take()
        {
            tracing::warn!(
                bytes = self.tree.bytes,
                files = self.tree.entries,
                "{reason}"
            );
            breach(reason);
        }
    }
}

/// The watcher thread: take commands, wait for the jobs' events or their
/// next check, drain and check them; for as long as the process lives.
fn serve(epoll: &OwnedFd, wake: &OwnedFd, commands: &std::sync::mpsc::Receiver<Command>) {
    let mut jobs: HashMap<u64, Box<Job>> = HashMap::new();
    let mut events = [std::mem::MaybeUninit::<epoll::Event>::uninit(); 16];
    loop {
        while let Ok(command) = commands.try_recv() {
            match command {
                Command::Add(id, job) => {
                    if let Err(e) = epoll::add(
                        epoll,
                        &job.tree.inotify,
                        epoll::EventData::new_u64(id),
                        epoll::EventFlags::IN,
                    ) {
                        // Still walked every RESCAN_EVERY.
                        tracing::debug!("cannot wait on the job's inotify instance: {e}");
                    }
                    jobs.insert(id, job);
                }
                Command::Remove(id, done) => {
                    let job = jobs.remove(&id);
                    let _ = done.send(());
                    // Closing the inotify instance takes it off the epoll.
                    drop(job);
                }
            }
        }
        let timeout = jobs
            .values()
            .map(|j| j.next_check())
            .min()
            .map(|d| Timespec {
                tv_sec: d.as_secs() as _,
                tv_nsec: d.subsec_nanos() as _,
            });
        let ready = match epoll::wait(epoll, &mut events, timeout.as_ref()) {
            Ok((ready, _)) => ready.iter().map(|e| e.data.u64()).collect::<Vec<u64>>(),
            Err(rustix::io::Errno::INTR) => Vec::new(),
            Err(e) => {
                tracing::error!("the job-budget thread cannot wait: {e}");
                std::thread::sleep(POLL);
                Vec::new()
            }
        };
        for id in ready {
            if id == WAKE {
                let mut count = [0u8; 8];
                let _ = rustix::io::read(wake, &mut count);
            } else if let Some(job) = jobs.get_mut(&id) {
                job.dirty |= job.tree.drain();
            }
        }
        for job in jobs.values_mut() {
            job.check();
        }
    }
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
        // One `stat` per file, however many writes it had queued.
        writes.sort_unstable();
        writes.dedup();
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
        let root = SafeDir::open_root(dir).unwrap();
        let free = SafeDir::open_root(dir).unwrap();
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

    /// Threads of this process named `name`.
    fn threads_named(name: &str) -> usize {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|comm| comm.trim_end() == name)
            .count()
    }

    #[test]
    fn one_thread_watches_jobs_side_by_side_and_lets_go_of_a_dropped_one() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (_wa, ra) = watched(a.path(), limits(1 << 30, 5));
        let (wb, rb) = watched(b.path(), limits(1 << 30, 5));
        assert_eq!(threads_named("job-budget"), 1);
        for i in 0..20 {
            std::fs::write(a.path().join(format!("f{i}")), b"x").unwrap();
        }
        let reason = ra.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(reason.contains("storage.job_max_files"), "{reason}");
        // b's watch is dropped before it goes over: its breach is never
        // called, and is let go (the channel's sender goes with it).
        drop(wb);
        for i in 0..20 {
            std::fs::write(b.path().join(format!("f{i}")), b"x").unwrap();
        }
        assert_eq!(
            rb.recv_timeout(Duration::from_secs(5)),
            Err(mpsc::RecvTimeoutError::Disconnected)
        );
    }

    #[test]
    fn links_out_of_the_tree_are_not_counted() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("huge"), vec![0u8; 1 << 20]).unwrap();
        std::os::unix::fs::symlink(outside.path(), tmp.path().join("out")).unwrap();
        let root = SafeDir::open_root(tmp.path()).unwrap();
        let free = SafeDir::open_root(tmp.path()).unwrap();
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
