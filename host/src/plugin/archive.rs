//! The `archive` capability (WIT 0.1.4): a zip the host writes for a
//! collector, in its output directory.
//!
//! - [`ArchiveCtx`]: one run's view: the output directory, the input
//!   grants (host paths) and the redaction the request asks for.
//! - [`Archive`]: one zip being written. Entries (bytes from the guest, or
//!   a granted file the host opens with `RESOLVE_BENEATH |
//!   RESOLVE_NO_SYMLINKS`) are compressed on the process's small pool of
//!   threads (shared by its archives), each into a one-entry zip of its
//!   own (in memory, or an unnamed temporary file in the output directory
//!   for large ones), and copied raw into the final zip in the order they
//!   were added. At most the pool's size × 2 entries of an archive are in
//!   flight.
//! - [`ArchiveHandle`]: the host side of the WIT `archive` resource.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{self, Cursor, Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{SystemTime, UNIX_EPOCH};

use chrono::{Datelike, Timelike};
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipArchive, ZipWriter};

use crate::config::InputGrant;
use crate::redact::Redactor;
use crate::safe_dir::{SafeDir, is_plain_name};
use crate::started_once::StartedOnce;

/// Longest entry name accepted, in bytes.
const ENTRY_NAME_MAX: usize = 4096;
/// Entries whose source is at least this large compress into a temporary
/// file rather than memory.
const SPOOL_IN_MEMORY_MAX: u64 = 8 << 20;
/// Most compressing threads (the process's, shared by its archives).
const WORKERS_MAX: usize = 8;
/// Read size.
const CHUNK: usize = 256 * 1024;
/// Sources from this size on are written as zip64 entries (redaction can
/// make the output a little larger than the input).
const LARGE_ENTRY: u64 = 1 << 31;

/// How entries are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Stored,
    /// Level 1 to 9.
    Deflate(u8),
}

#[derive(Clone)]
pub struct ArchiveOptions {
    pub compression: Compression,
    /// A secret: `Debug` masks it.
    pub password: Option<String>,
    pub max_entry_bytes: Option<u64>,
}

impl std::fmt::Debug for ArchiveOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArchiveOptions")
            .field("compression", &self.compression)
            .field("password", &self.password.as_ref().map(|_| "<secret>"))
            .field("max_entry_bytes", &self.max_entry_bytes)
            .finish()
    }
}

/// What `add-file` queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryInfo {
    pub size: u64,
    pub truncated: bool,
    pub redacted: bool,
}

/// Why an archive call failed (the WIT `archive-error`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArchiveError {
    #[error("invalid name: {0}")]
    InvalidName(String),
    #[error("denied: {0}")]
    Denied(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("failed: {0}")]
    Failed(String),
}

/// The redaction the request asks for.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum Redaction {
    #[default]
    None,
    /// With the salt (a secret: `Debug` masks it).
    Partial(String),
    /// `log-redaction-level=partial` without a salt.
    MissingSalt,
}

impl std::fmt::Debug for Redaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Redaction::None => f.write_str("None"),
            Redaction::Partial(_) => f.write_str("Partial(<secret>)"),
            Redaction::MissingSalt => f.write_str("MissingSalt"),
        }
    }
}

impl Redaction {
    /// From the start request's parameters (the WIT `task` keys).
    pub fn of_parameters(parameters: &[(String, String)]) -> Redaction {
        let get = |key: &str| parameters.iter().find(|(k, _)| k == key).map(|(_, v)| v);
        match get("log-redaction-level").map(String::as_str) {
            Some("partial") => match get("log-redaction-salt") {
                Some(salt) if !salt.is_empty() => Redaction::Partial(salt.clone()),
                _ => Redaction::MissingSalt,
            },
            _ => Redaction::None,
        }
    }
}

/// One run's archive context.
#[derive(Debug, Default)]
pub struct ArchiveCtx {
    /// Host output directory (none: no archive can be created).
    pub output_dir: Option<PathBuf>,
    pub grants: Vec<InputGrant>,
    pub redaction: Redaction,
    /// What the host read from each grant for the run's archives: files
    /// added and their bytes, by grant name (for the manifest).
    pub used: Mutex<BTreeMap<String, GrantUse>>,
    /// What the run's archives hold that a walk of the output directory
    /// cannot see, for the job's budget.
    pub held: Arc<ArchiveHeld>,
}

/// What a run's archives hold beyond what is visible in the output
/// directory: the bytes of the unnamed temporary files entries compress
/// into, and the entries inside the zips. The job's budget counts them
/// with the directories' bytes and files, so an archive is held to the
/// same `job_max_mb` and `job_max_files` as files written by hand.
#[derive(Debug, Default)]
pub struct ArchiveHeld {
    spool_bytes: AtomicU64,
    entries: AtomicU64,
}

impl ArchiveHeld {
    /// Bytes in temporary spool files right now.
    pub fn spool_bytes(&self) -> u64 {
        self.spool_bytes.load(Ordering::Relaxed)
    }

    /// Entries in the run's zips (queued or written; a zip removed
    /// unfinished gives its entries back).
    pub fn entries(&self) -> u64 {
        self.entries.load(Ordering::Relaxed)
    }
}

/// A spool in an unnamed temporary file: its bytes are counted in
/// [`ArchiveHeld`] while it exists.
struct SpoolFile {
    file: File,
    written: u64,
    held: Arc<ArchiveHeld>,
}

impl Write for SpoolFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        // Past the end only: the zip writer seeks back to patch headers.
        let end = self.file.stream_position()?;
        if end > self.written {
            self.held
                .spool_bytes
                .fetch_add(end - self.written, Ordering::Relaxed);
            self.written = end;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl Read for SpoolFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
}

impl Seek for SpoolFile {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.file.seek(pos)
    }
}

impl Drop for SpoolFile {
    fn drop(&mut self) {
        self.held
            .spool_bytes
            .fetch_sub(self.written, Ordering::Relaxed);
    }
}

/// Files added from one grant by the archive writer, and their bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GrantUse {
    pub files: u64,
    pub bytes: u64,
}

/// A plain file name for the zip itself.
pub fn check_archive_name(name: &str) -> Result<(), ArchiveError> {
    if is_plain_name(name) {
        Ok(())
    } else {
        Err(ArchiveError::InvalidName(format!(
            "{name:?}: the zip's name must be a plain file name in the output directory (no '/', not '..')"
        )))
    }
}

/// A relative entry name: no leading `/`, no empty, `.` or `..`
/// component, no `\` or NUL.
pub fn check_entry_name(entry: &str) -> Result<(), ArchiveError> {
    let bad = |why: &str| Err(ArchiveError::InvalidName(format!("entry {entry:?}: {why}")));
    if entry.is_empty() {
        return bad("empty");
    }
    if entry.len() > ENTRY_NAME_MAX {
        return bad("longer than 4096 bytes");
    }
    if entry.starts_with('/') {
        return bad("absolute (it must be relative)");
    }
    if entry.contains('\\') || entry.contains('\0') {
        return bad("contains '\\' or NUL");
    }
    if entry
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return bad("has an empty, '.' or '..' component");
    }
    Ok(())
}

/// A path below a grant: relative, no `..` (symlinks are refused when it
/// is opened).
pub fn check_grant_path(path: &str) -> Result<PathBuf, ArchiveError> {
    let denied = |why: &str| Err(ArchiveError::Denied(format!("path {path:?}: {why}")));
    if path.is_empty() {
        return denied("empty");
    }
    if path.contains('\0') {
        return denied("contains NUL");
    }
    let p = Path::new(path);
    let mut out = PathBuf::new();
    for component in p.components() {
        match component {
            Component::Normal(c) => out.push(c),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return denied("absolute (give it relative to the grant)");
            }
            Component::ParentDir => return denied("'..' would leave the grant"),
        }
    }
    if out.as_os_str().is_empty() {
        return denied("names the grant itself, not a file");
    }
    Ok(out)
}

/// A zip's DOS time (UTC) for `secs` since the Unix epoch; 1980-01-01 for
/// times a zip cannot hold.
pub fn dos_time(secs: u64) -> zip::DateTime {
    i64::try_from(secs)
        .ok()
        .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
        .and_then(|t| {
            zip::DateTime::from_date_and_time(
                u16::try_from(t.year()).ok()?,
                t.month() as u8,
                t.day() as u8,
                t.hour() as u8,
                t.minute() as u8,
                t.second() as u8,
            )
            .ok()
        })
        .unwrap_or_default()
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Where an entry is compressed before it is copied into the zip.
trait SpoolIo: Read + Write + Seek + Send {}
impl<T: Read + Write + Seek + Send> SpoolIo for T {}
type Spool = Box<dyn SpoolIo>;

/// What an entry is made of.
enum Source {
    Bytes(Vec<u8>),
    File(File),
}

/// One entry for a worker.
struct EntryJob {
    entry: String,
    source: Source,
    /// The source's size when queued (0 for virtual files).
    size: u64,
    mtime: zip::DateTime,
    salt: Option<String>,
    max: Option<u64>,
    compression: Compression,
    /// WinZip AES-256 with this password.
    password: Option<Arc<str>>,
}

type Done = Result<Spool, String>;

struct Pending {
    entry: String,
    done: mpsc::Receiver<Done>,
}

/// A few threads compressing entries: the process's, shared by every
/// archive (a node writes one at a time), started with the first one, so
/// an archive costs no thread start and exit.
struct Pool {
    jobs: mpsc::Sender<Box<dyn FnOnce() + Send>>,
    size: usize,
}

/// The process's compression threads.
static POOL: StartedOnce<Pool> = StartedOnce::new();

impl Pool {
    /// The process's pool, started on first use.
    fn get() -> Result<&'static Pool, ArchiveError> {
        POOL.get_or_start(|| {
            Pool::start()
                .map_err(|e| ArchiveError::Failed(format!("starting the compression threads: {e}")))
        })
    }

    fn start() -> io::Result<Pool> {
        let size = std::thread::available_parallelism()
            .map_or(1, usize::from)
            .clamp(1, WORKERS_MAX);
        let (tx, rx) = mpsc::channel::<Box<dyn FnOnce() + Send>>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..size {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("archive-{i}"))
                .spawn(move || {
                    loop {
                        let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        match job {
                            Ok(job) => job(),
                            Err(_) => break,
                        }
                    }
                })?;
        }
        Ok(Pool { jobs: tx, size })
    }

    fn submit(&self, job: Box<dyn FnOnce() + Send>) -> Result<(), ArchiveError> {
        self.jobs
            .send(job)
            .map_err(|_| ArchiveError::Failed("the compression threads are gone".into()))
    }
}

/// One zip being written in the output directory.
pub struct Archive {
    name: String,
    dir: Arc<SafeDir>,
    zip: Option<ZipWriter<File>>,
    options: ArchiveOptions,
    ctx: Arc<ArchiveCtx>,
    opened_grants: HashMap<String, Arc<SafeDir>>,
    names: HashSet<String>,
    pending: VecDeque<Pending>,
    pool: &'static Pool,
    /// Set when the archive is dropped: queued entries stop early.
    abandoned: Arc<AtomicBool>,
    /// The first failure: every later call reports it.
    failure: Option<ArchiveError>,
    finished: bool,
    /// Every entry is encrypted with it (WinZip AES-256).
    password: Option<Arc<str>>,
    /// Entries queued, counted in the run's [`ArchiveHeld`].
    entries: u64,
}

impl Archive {
    /// Create `name` in the run's output directory.
    pub fn create(
        ctx: Arc<ArchiveCtx>,
        name: &str,
        options: ArchiveOptions,
    ) -> Result<Archive, ArchiveError> {
        check_archive_name(name)?;
        if options.password.as_deref() == Some("") {
            return Err(ArchiveError::Unsupported(
                "password: an empty password encrypts nothing".into(),
            ));
        }
        if let Compression::Deflate(level) = options.compression
            && !(1..=9).contains(&level)
        {
            return Err(ArchiveError::Unsupported(format!(
                "deflate level {level}: use 1 (fastest) to 9 (smallest)"
            )));
        }
        let Some(output) = ctx.output_dir.as_deref() else {
            return Err(ArchiveError::Failed(
                "no output directory in this run".into(),
            ));
        };
        let failed = |what: &str, e: io::Error| ArchiveError::Failed(format!("{what}: {e}"));
        let dir =
            SafeDir::open_root(output).map_err(|e| failed("opening the output directory", e))?;
        let file = dir.create_new_file(name).map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                ArchiveError::InvalidName(format!("{name:?} already exists"))
            } else {
                failed(&format!("creating {name:?}"), e)
            }
        })?;
        let pool = Pool::get()?;
        Ok(Archive {
            name: name.to_string(),
            dir: Arc::new(dir),
            zip: Some(ZipWriter::new(file)),
            password: options.password.as_deref().map(Arc::from),
            options,
            ctx,
            opened_grants: HashMap::new(),
            names: HashSet::new(),
            pending: VecDeque::new(),
            pool,
            abandoned: Arc::new(AtomicBool::new(false)),
            failure: None,
            finished: false,
            entries: 0,
        })
    }

    fn usable(&mut self) -> Result<(), ArchiveError> {
        if self.finished {
            return Err(ArchiveError::Failed(format!(
                "{} is already finished",
                self.name
            )));
        }
        match &self.failure {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    fn fail(&mut self, e: ArchiveError) -> ArchiveError {
        self.failure.get_or_insert(e).clone()
    }

    fn claim_name(&mut self, entry: &str) -> Result<(), ArchiveError> {
        check_entry_name(entry)?;
        if !self.names.insert(entry.to_string()) {
            return Err(ArchiveError::InvalidName(format!(
                "entry {entry:?} is already in {}",
                self.name
            )));
        }
        Ok(())
    }

    /// Add `data` as `entry`, modified at `mtime` (now when none).
    pub fn add_bytes(
        &mut self,
        entry: &str,
        data: Vec<u8>,
        mtime: Option<u64>,
    ) -> Result<(), ArchiveError> {
        self.usable()?;
        self.claim_name(entry)?;
        let size = data.len() as u64;
        self.queue(EntryJob {
            entry: entry.to_string(),
            source: Source::Bytes(data),
            size,
            mtime: dos_time(mtime.unwrap_or_else(now_secs)),
            salt: None,
            max: self.options.max_entry_bytes,
            compression: self.options.compression,
            password: self.password.clone(),
        })
    }

    /// Add file `path` of grant `grant` as `entry` (redacted if asked and
    /// the request asks for partial redaction).
    pub fn add_file(
        &mut self,
        grant: &str,
        path: &str,
        entry: &str,
        redact: bool,
    ) -> Result<EntryInfo, ArchiveError> {
        self.usable()?;
        check_entry_name(entry)?;
        let rel = check_grant_path(path)?;
        let salt = match (&self.ctx.redaction, redact) {
            (_, false) | (Redaction::None, true) => None,
            (Redaction::Partial(salt), true) => Some(salt.clone()),
            (Redaction::MissingSalt, true) => {
                return Err(ArchiveError::Failed(
                    "redaction asked, but the request's log-redaction-level is partial \
                     without a log-redaction-salt"
                        .into(),
                ));
            }
        };
        let dir = self.grant_dir(grant)?;
        let (file, meta) = dir.open_file_beneath(&rel).map_err(|e| {
            let leaves = matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::EXDEV));
            if leaves {
                ArchiveError::Denied(format!(
                    "{grant}/{path}: a symlink on the way (symlinks in grants are never followed \
                     by the host) or a path out of the grant"
                ))
            } else {
                ArchiveError::Failed(format!("{grant}/{path}: {e}"))
            }
        })?;
        self.claim_name(entry)?;
        let size = meta.len();
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        let max = self.options.max_entry_bytes;
        let info = EntryInfo {
            size,
            truncated: max.is_some_and(|m| size > m),
            redacted: salt.is_some(),
        };
        self.queue(EntryJob {
            entry: entry.to_string(),
            source: Source::File(file),
            size,
            mtime: dos_time(mtime),
            salt,
            max,
            compression: self.options.compression,
            password: self.password.clone(),
        })?;
        let mut used = self.ctx.used.lock().unwrap();
        let grant_use = used.entry(grant.to_string()).or_default();
        grant_use.files += 1;
        grant_use.bytes += size;
        Ok(info)
    }

    fn grant_dir(&mut self, grant: &str) -> Result<Arc<SafeDir>, ArchiveError> {
        if let Some(dir) = self.opened_grants.get(grant) {
            return Ok(dir.clone());
        }
        let Some(g) = self.ctx.grants.iter().find(|g| g.name == grant) else {
            let names: Vec<&str> = self.ctx.grants.iter().map(|g| g.name.as_str()).collect();
            return Err(ArchiveError::Denied(format!(
                "no input grant named {grant:?} (grants: {})",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            )));
        };
        let dir = SafeDir::open_root(&g.host)
            .map_err(|e| ArchiveError::Failed(format!("opening grant {grant:?}: {e}")))?;
        let dir = Arc::new(dir);
        self.opened_grants.insert(grant.to_string(), dir.clone());
        Ok(dir)
    }

    fn queue(&mut self, job: EntryJob) -> Result<(), ArchiveError> {
        // Bound the entries in flight (and their spools): wait for the
        // oldest first.
        self.append_ready(self.pool.size * 2)?;
        let (tx, rx) = mpsc::channel();
        let entry = job.entry.clone();
        let dir = self.dir.clone();
        let abandoned = self.abandoned.clone();
        let held = self.ctx.held.clone();
        self.pool.submit(Box::new(move || {
            let name = job.entry.clone();
            let done =
                compress(job, &dir, &held, &abandoned).map_err(|e| format!("entry {name:?}: {e}"));
            let _ = tx.send(done);
        }))?;
        self.pending.push_back(Pending { entry, done: rx });
        self.entries += 1;
        self.ctx.held.entries.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Copy finished entries into the zip, in order, waiting until at most
    /// `keep` are still in flight.
    fn append_ready(&mut self, keep: usize) -> Result<(), ArchiveError> {
        while let Some(front) = self.pending.front() {
            let done = if self.pending.len() > keep {
                front.done.recv().ok()
            } else {
                match front.done.try_recv() {
                    Ok(done) => Some(done),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => None,
                }
            };
            let Some(pending) = self.pending.pop_front() else {
                break;
            };
            let result = match done {
                None => Err(format!("entry {:?}: its thread stopped", pending.entry)),
                Some(Err(e)) => Err(e),
                Some(Ok(spool)) => self.append(spool, &pending.entry),
            };
            if let Err(e) = result {
                return Err(self.fail(ArchiveError::Failed(e)));
            }
        }
        Ok(())
    }

    fn append(&mut self, spool: Spool, entry: &str) -> Result<(), String> {
        let Some(zip) = self.zip.as_mut() else {
            return Err("the zip is closed".into());
        };
        // `merge_archive` copies the entry's bytes and its headers as
        // they are (`raw_copy_file` would drop an AES entry's
        // encryption fields and leave its bytes unreadable).
        let copy = || -> zip::result::ZipResult<()> { zip.merge_archive(ZipArchive::new(spool)?) };
        copy().map_err(|e| format!("entry {entry:?}: writing it into {}: {e}", self.name))
    }

    /// Wait for every entry, write the central directory, close the zip;
    /// its name and size.
    pub fn finish(&mut self) -> Result<(String, u64), ArchiveError> {
        self.usable()?;
        self.append_ready(0)?;
        let Some(zip) = self.zip.take() else {
            return Err(ArchiveError::Failed(format!("{} is closed", self.name)));
        };
        let file = zip.finish().map_err(|e| {
            self.fail(ArchiveError::Failed(format!(
                "writing the central directory of {}: {e}",
                self.name
            )))
        })?;
        let size = file
            .sync_all()
            .and_then(|()| file.metadata())
            .map_err(|e| self.fail(ArchiveError::Failed(format!("{}: {e}", self.name))))?
            .len();
        self.finished = true;
        Ok((self.name.clone(), size))
    }
}

impl Drop for Archive {
    fn drop(&mut self) {
        self.abandoned.store(true, Ordering::Relaxed);
        if !self.finished {
            // Unfinished (dropped, or failed): no half-written zip stays.
            drop(self.zip.take());
            let _ = self.dir.remove_file(&self.name);
            self.ctx
                .held
                .entries
                .fetch_sub(self.entries, Ordering::Relaxed);
        }
    }
}

/// Compress one entry into a one-entry zip of its own.
fn compress(
    job: EntryJob,
    dir: &SafeDir,
    held: &Arc<ArchiveHeld>,
    abandoned: &AtomicBool,
) -> io::Result<Spool> {
    let spool: Spool = if job.size >= SPOOL_IN_MEMORY_MAX {
        match dir.temp_file() {
            Ok(file) => Box::new(SpoolFile {
                file,
                written: 0,
                held: held.clone(),
            }),
            Err(_) => Box::new(Cursor::new(Vec::new())),
        }
    } else {
        Box::new(Cursor::new(Vec::new()))
    };
    let mut zip = ZipWriter::new(spool);
    let (method, level) = match job.compression {
        Compression::Stored => (CompressionMethod::Stored, None),
        Compression::Deflate(level) => (CompressionMethod::Deflated, Some(i64::from(level))),
    };
    let options = SimpleFileOptions::default()
        .compression_method(method)
        .compression_level(level)
        .last_modified_time(job.mtime)
        .unix_permissions(0o644)
        .large_file(job.size >= LARGE_ENTRY);
    let options = match job.password.as_deref() {
        Some(password) => options.with_aes_encryption(zip::AesMode::Aes256, password),
        None => options,
    };
    zip.start_file(job.entry.as_str(), options)
        .map_err(io::Error::other)?;
    let salt = job.salt.as_deref();
    match job.source {
        Source::Bytes(data) => write_entry(
            (data.len() as u64, Cursor::new(data)),
            job.size,
            job.max,
            salt,
            &mut zip,
            abandoned,
        )?,
        Source::File(file) => write_entry(
            (job.size, file),
            job.size,
            job.max,
            salt,
            &mut zip,
            abandoned,
        )?,
    }
    let mut spool = zip.finish().map_err(io::Error::other)?;
    spool.seek(SeekFrom::Start(0))?;
    Ok(spool)
}

/// A read buffer for a source of about `hint` bytes (0: unknown): no
/// larger than needed to read it in one go (and see its end), at most
/// [`CHUNK`].
fn read_size(hint: u64) -> usize {
    match usize::try_from(hint) {
        Ok(0) | Err(_) => CHUNK,
        Ok(n) => n.saturating_add(1).min(CHUNK),
    }
}

/// The last `max` bytes of what is pushed (for sources of unknown size).
struct Tail {
    buf: Vec<u8>,
    max: usize,
}

impl Tail {
    fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() > self.max.saturating_mul(2).max(CHUNK) {
            let excess = self.buf.len() - self.max;
            self.buf.drain(..excess);
        }
    }

    fn contents(&self) -> &[u8] {
        &self.buf[self.buf.len().saturating_sub(self.max)..]
    }
}

/// Stream `src` (`size` bytes when queued; 0: unknown, read to the end;
/// `hint`: about how many bytes it holds, 0 if unknown) into `out`: of a
/// source over `max`, its tail; redacted with `salt`
/// (the whole source goes through the redactor, so a tag cut by the
/// limit is still redacted: what is kept is a suffix of the redacted
/// whole).
fn write_entry(
    (hint, mut src): (u64, impl Read + Seek),
    size: u64,
    max: Option<u64>,
    salt: Option<&str>,
    out: &mut dyn Write,
    abandoned: &AtomicBool,
) -> io::Result<()> {
    let mut tail = match max {
        Some(m) if size == 0 => Some(Tail {
            buf: Vec::new(),
            max: usize::try_from(m).unwrap_or(usize::MAX),
        }),
        _ => None,
    };
    // Input bytes before the kept tail.
    let skip = match max {
        Some(m) if size > m => size - m,
        _ => 0,
    };
    let mut pos = 0u64;
    if salt.is_none() && skip > 0 {
        src.seek(SeekFrom::Start(skip))?;
        pos = skip;
    }
    // A known size is read, not what a growing file adds meanwhile.
    let limit = if max.is_some() && size > 0 {
        size - pos
    } else {
        u64::MAX
    };
    let mut src = src.take(limit);
    let mut redactor = salt.map(Redactor::new);
    // Zeroed once per entry: no larger than what there is to read (a
    // small entry does not pay for clearing, and faulting in, 256 KiB).
    let mut buf = vec![0u8; read_size(hint)];
    let mut redacted = Vec::new();
    let mut emit = |bytes: &[u8], tail: &mut Option<Tail>| -> io::Result<()> {
        match tail {
            Some(t) => {
                t.push(bytes);
                Ok(())
            }
            None => out.write_all(bytes),
        }
    };
    loop {
        if abandoned.load(Ordering::Relaxed) {
            return Err(io::Error::other("the archive was dropped"));
        }
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let chunk = &buf[..n];
        match &mut redactor {
            None => emit(chunk, &mut tail)?,
            Some(r) => {
                let cut = usize::try_from(skip.saturating_sub(pos))
                    .unwrap_or(usize::MAX)
                    .min(n);
                if cut > 0 {
                    // Redacted, then dropped: before the kept tail.
                    redacted.clear();
                    r.push(&chunk[..cut], &mut redacted);
                }
                redacted.clear();
                r.push(&chunk[cut..], &mut redacted);
                emit(&redacted, &mut tail)?;
            }
        }
        pos += n as u64;
    }
    if let Some(r) = &mut redactor {
        redacted.clear();
        r.finish(&mut redacted);
        emit(&redacted, &mut tail)?;
    }
    if let Some(t) = &tail {
        out.write_all(t.contents())?;
    }
    Ok(())
}

/// The host side of the WIT `archive` resource: host calls run on the
/// blocking pool, each holding the lock.
#[derive(Clone)]
pub struct ArchiveHandle(pub Arc<Mutex<Archive>>);

impl ArchiveHandle {
    /// Run `f` on the archive off the async runtime.
    pub async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Archive) -> Result<T, ArchiveError> + Send + 'static,
    ) -> Result<T, ArchiveError> {
        let inner = self.0.clone();
        tokio::task::spawn_blocking(move || {
            let mut archive = inner.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut archive)
        })
        .await
        .unwrap_or_else(|e| Err(ArchiveError::Failed(format!("archive call ended: {e}"))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_names_are_plain() {
        assert!(check_archive_name("a.zip").is_ok());
        for bad in ["", ".", "..", "a/b.zip", "../a.zip", "/a.zip", "a\\b"] {
            assert!(
                matches!(check_archive_name(bad), Err(ArchiveError::InvalidName(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn entry_names_are_relative_without_dots() {
        for good in ["a.txt", "logs/a.log", "x/y/z", "..a", "a..b/c"] {
            assert!(check_entry_name(good).is_ok(), "{good:?}");
        }
        for bad in [
            "", "/a", "../a", "a/../b", "a/..", "./a", "a//b", "a/", "a\\b", "a\0b",
        ] {
            assert!(
                matches!(check_entry_name(bad), Err(ArchiveError::InvalidName(_))),
                "{bad:?}"
            );
        }
        assert!(check_entry_name(&"a".repeat(5000)).is_err());
    }

    #[test]
    fn grant_paths_stay_relative_and_below() {
        assert_eq!(check_grant_path("a/b.log").unwrap(), Path::new("a/b.log"));
        assert_eq!(check_grant_path("./a.log").unwrap(), Path::new("a.log"));
        for bad in ["", ".", "/etc/passwd", "../x", "a/../../x", "a/../b", "a\0"] {
            assert!(
                matches!(check_grant_path(bad), Err(ArchiveError::Denied(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn redaction_follows_the_parameters() {
        let p = |kv: &[(&str, &str)]| -> Vec<(String, String)> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(Redaction::of_parameters(&[]), Redaction::None);
        assert_eq!(
            Redaction::of_parameters(&p(&[("log-redaction-level", "none")])),
            Redaction::None
        );
        assert_eq!(
            Redaction::of_parameters(&p(&[("log-redaction-level", "partial")])),
            Redaction::MissingSalt
        );
        assert_eq!(
            Redaction::of_parameters(&p(&[
                ("log-redaction-level", "partial"),
                ("log-redaction-salt", "s")
            ])),
            Redaction::Partial("s".into())
        );
    }

    #[test]
    fn dos_times_round_to_two_seconds_and_clamp() {
        let t = dos_time(1_700_000_001); // 2023-11-14 22:13:21 UTC
        assert_eq!(
            (t.year(), t.month(), t.day(), t.hour(), t.minute()),
            (2023, 11, 14, 22, 13)
        );
        assert!(t.second() == 20 || t.second() == 21);
        assert_eq!(dos_time(0), zip::DateTime::default());
        assert_eq!(dos_time(u64::MAX), zip::DateTime::default());
    }

    fn ctx(dir: &Path, grants: Vec<InputGrant>, redaction: Redaction) -> Arc<ArchiveCtx> {
        Arc::new(ArchiveCtx {
            used: Default::default(),
            held: Default::default(),
            output_dir: Some(dir.to_path_buf()),
            grants,
            redaction,
        })
    }

    #[test]
    fn entries_round_trip_with_tails_redaction_and_refusals() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let logs = tmp.path().join("logs");
        std::fs::create_dir_all(&out).unwrap();
        std::fs::create_dir_all(&logs).unwrap();
        std::fs::write(tmp.path().join("secret"), b"secret").unwrap();
        let text: Vec<u8> = (0..50_000)
            .flat_map(|i| format!("line {i} <ud>user{i}</ud>\n").into_bytes())
            .collect();
        std::fs::write(logs.join("a.log"), &text).unwrap();
        std::os::unix::fs::symlink("../secret", logs.join("link")).unwrap();
        std::os::unix::fs::symlink("a.log", logs.join("inside")).unwrap();
        let grant = InputGrant {
            name: "logs".into(),
            host: logs.clone(),
            guest: "/inputs/logs".into(),
        };
        let options = ArchiveOptions {
            compression: Compression::Deflate(6),
            password: None,
            max_entry_bytes: Some(100_000),
        };
        let ctx = ctx(&out, vec![grant], Redaction::Partial("salt".into()));
        let mut a = Archive::create(ctx, "a.zip", options).unwrap();
        a.add_bytes("gen/one.txt", b"one".to_vec(), Some(1_700_000_000))
            .unwrap();
        let info = a.add_file("logs", "a.log", "plain.log", false).unwrap();
        assert_eq!(
            info,
            EntryInfo {
                size: text.len() as u64,
                truncated: true,
                redacted: false
            }
        );
        assert!(
            a.add_file("logs", "a.log", "red.log", true)
                .unwrap()
                .redacted
        );
        for (path, why) in [
            ("link", "symlink"),
            ("inside", "symlink"),
            ("../secret", "'..'"),
            ("/etc/passwd", "absolute"),
        ] {
            let e = a.add_file("logs", path, "x", false).unwrap_err();
            assert!(
                matches!(&e, ArchiveError::Denied(m) if m.contains(why)),
                "{path}: {e}"
            );
        }
        assert!(matches!(
            a.add_file("nope", "a.log", "y", false),
            Err(ArchiveError::Denied(_))
        ));
        assert!(matches!(
            a.add_bytes("gen/one.txt", vec![], None),
            Err(ArchiveError::InvalidName(_))
        ));
        let (name, size) = a.finish().unwrap();
        assert_eq!(name, "a.zip");
        assert_eq!(size, std::fs::metadata(out.join("a.zip")).unwrap().len());
        drop(a);

        let mut zip = ZipArchive::new(File::open(out.join("a.zip")).unwrap()).unwrap();
        let mut read = |n: &str| {
            let mut v = Vec::new();
            zip.by_name(n).unwrap().read_to_end(&mut v).unwrap();
            v
        };
        assert_eq!(read("gen/one.txt"), b"one");
        assert_eq!(read("plain.log"), &text[text.len() - 100_000..]);
        let red = read("red.log");
        let whole = crate::redact::redact("salt", &text);
        assert!(whole.ends_with(&red) && red.len() > 90_000, "a suffix");
        assert!(!red.windows(6).any(|w| w == b"user49"));
        assert_eq!(zip.len(), 3);
    }

    #[test]
    fn debug_output_never_holds_the_password_or_the_salt() {
        let options = ArchiveOptions {
            compression: Compression::Stored,
            password: Some("hunter2-zip".into()),
            max_entry_bytes: None,
        };
        let redaction = Redaction::Partial("pepper-salt".into());
        let ctx = ArchiveCtx {
            redaction: redaction.clone(),
            ..Default::default()
        };
        for text in [
            format!("{options:?}"),
            format!("{redaction:?}"),
            format!("{ctx:?}"),
        ] {
            assert!(
                !text.contains("hunter2-zip") && !text.contains("pepper-salt"),
                "{text}"
            );
        }
    }

    #[test]
    fn a_dropped_archive_leaves_no_zip_and_an_empty_password_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let ctx = ctx(tmp.path(), vec![], Redaction::MissingSalt);
        let options = ArchiveOptions {
            compression: Compression::Stored,
            password: None,
            max_entry_bytes: None,
        };
        let mut a = Archive::create(ctx.clone(), "a.zip", options.clone()).unwrap();
        a.add_bytes("x", vec![1; 10], None).unwrap();
        assert!(matches!(
            Archive::create(ctx.clone(), "a.zip", options.clone()),
            Err(ArchiveError::InvalidName(_))
        ));
        drop(a);
        assert!(!tmp.path().join("a.zip").exists());
        let empty = ArchiveOptions {
            password: Some(String::new()),
            ..options.clone()
        };
        assert!(matches!(
            Archive::create(ctx.clone(), "b.zip", empty),
            Err(ArchiveError::Unsupported(_))
        ));
        // With a password, entries are AES-encrypted: readable with it only.
        let secret = ArchiveOptions {
            password: Some("p4ss".into()),
            ..options
        };
        let mut a = Archive::create(ctx, "c.zip", secret).unwrap();
        a.add_bytes("x", b"secret bytes".to_vec(), None).unwrap();
        a.finish().unwrap();
        let mut zip =
            ZipArchive::new(std::fs::File::open(tmp.path().join("c.zip")).unwrap()).unwrap();
        assert!(
            zip.by_index(0).is_err(),
            "not readable without the password"
        );
        let mut entry = zip.by_index_decrypt(0, b"p4ss").unwrap();
        let mut text = String::new();
        entry.read_to_string(&mut text).unwrap();
        assert_eq!(text, "secret bytes");
    }

    #[test]
    fn a_small_source_gets_a_small_read_buffer() {
        assert_eq!(read_size(0), CHUNK, "unknown size");
        assert_eq!(read_size(10), 11, "its size and one byte to see the end");
        assert_eq!(read_size(CHUNK as u64), CHUNK);
        assert_eq!(read_size(u64::MAX), CHUNK);
    }

    #[test]
    fn entries_and_spools_are_held_against_the_budget_until_given_back() {
        let tmp = tempfile::tempdir().unwrap();
        let grant_dir = tmp.path().join("g");
        std::fs::create_dir(&grant_dir).unwrap();
        // Spooled to a temporary file (at least SPOOL_IN_MEMORY_MAX).
        let big = grant_dir.join("big");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(SPOOL_IN_MEMORY_MAX)
            .unwrap();
        let out = tmp.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let grants = vec![InputGrant {
            name: "g".into(),
            host: grant_dir,
            guest: "/inputs/g".into(),
        }];
        let ctx = ctx(&out, grants, Redaction::None);
        let options = ArchiveOptions {
            compression: Compression::Stored,
            password: None,
            max_entry_bytes: None,
        };
        let mut a = Archive::create(ctx.clone(), "a.zip", options.clone()).unwrap();
        a.add_bytes("x", vec![1; 10], None).unwrap();
        a.add_file("g", "big", "big", false).unwrap();
        assert_eq!(ctx.held.entries(), 2);
        // A stored 8 MiB entry's spool, while it waits to be copied in.
        let pending = a.pending.pop_back().unwrap();
        let spool = pending.done.recv().unwrap().unwrap();
        assert!(ctx.held.spool_bytes() >= SPOOL_IN_MEMORY_MAX);
        drop(spool);
        assert_eq!(ctx.held.spool_bytes(), 0);
        let mut b = Archive::create(ctx.clone(), "b.zip", options).unwrap();
        b.add_bytes("y", vec![2; 10], None).unwrap();
        assert_eq!(ctx.held.entries(), 3);
        b.finish().unwrap();
        // An unfinished zip is removed, and its entries with it.
        drop(a);
        assert_eq!(ctx.held.entries(), 1);
    }
}
