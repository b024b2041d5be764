//! Directory handles that never follow a symlink.
//!
//! Every host operation on a directory a plugin (or a program it started)
//! can write goes through a [`SafeDir`]: an open directory file descriptor
//! and paths relative to it, resolved by the kernel with
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS` (`openat2`), or one plain name
//! at a time with `O_NOFOLLOW` (`*at` calls). A symlink a plugin planted
//! is never followed, so the host can never be steered out of the
//! directory: it fails with `ELOOP`/`EXDEV` instead.
//!
//! Only the roots (`data_dir` and the operator's `logDir`/`tmpDir`
//! prefixes) are opened by path, with [`SafeDir::open_root`].

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags, ResolveFlags};

/// An open directory; operations below it never follow symlinks.
#[derive(Debug)]
pub struct SafeDir {
    fd: OwnedFd,
    /// Where it was opened, for messages and for handing to wasmtime.
    path: PathBuf,
}

/// What a regular file looks like on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub links: u64,
}

/// Bytes and entries (files, directories, links) under a directory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub bytes: u64,
    pub entries: u64,
}

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

fn resolve_flags() -> ResolveFlags {
    ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS
}

/// A single plain component: not empty, not `.` or `..`, no `/`, no NUL.
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0')
        && !name.contains('\\')
}

fn plain(name: &str) -> io::Result<&str> {
    if is_plain_name(name) {
        Ok(name)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a plain file name"),
        ))
    }
}

impl SafeDir {
    /// Open a root the operator chose. Its own path is trusted; nothing
    /// below it is. (A root the daemon makes for itself:
    /// [`SafeDir::open_private`].)
    pub fn open_root(path: &Path) -> io::Result<SafeDir> {
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(SafeDir {
            fd,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory at `rel` below this one (several components allowed,
    /// no `..`, no symlink anywhere on the way).
    pub fn open_dir(&self, rel: &Path) -> io::Result<SafeDir> {
        let fd = open_beneath(&self.fd, rel, DIR_FLAGS, Mode::empty())?;
        Ok(SafeDir {
            fd,
            path: self.path.join(rel),
        })
    }

    /// Create `rel` below this directory, each missing component in turn
    /// (mode 0700 for new ones), and open it. Existing components must be
    /// real directories.
    pub fn create_dirs(&self, rel: &Path) -> io::Result<SafeDir> {
        let mut dir = self.try_clone()?;
        for component in rel.components() {
            let Component::Normal(name) = component else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{} is not a plain relative path", rel.display()),
                ));
            };
            match rustix::fs::mkdirat(&dir.fd, name, Mode::from_raw_mode(0o700)) {
                Ok(()) => {}
                Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(e.into()),
            }
            dir = dir.open_dir(Path::new(name))?;
        }
        Ok(dir)
    }

    /// Create `name` (which must not exist yet) and open it.
    pub fn create_new_dir(&self, name: &str) -> io::Result<SafeDir> {
        rustix::fs::mkdirat(&self.fd, plain(name)?, Mode::from_raw_mode(0o700))?;
        self.open_dir(Path::new(name))
    }

    pub fn try_clone(&self) -> io::Result<SafeDir> {
        Ok(SafeDir {
            fd: self.fd.try_clone()?,
            path: self.path.clone(),
        })
    }

    /// `name`, if it is a regular file directly in this directory (never
    /// through a symlink), opened for reading.
    pub fn open_file(&self, name: &str) -> io::Result<(File, FileId)> {
        let fd = rustix::fs::openat(&self.fd, plain(name)?, OPEN_TO_READ, Mode::empty())?;
        let (file, stat) = regular_file(fd, || format!("{name:?}"))?;
        Ok((file, file_id(&stat)))
    }

    /// The regular file at `rel` below this directory (several components
    /// allowed; no `..`, no symlink anywhere on the way, not even the last
    /// component), opened for reading, with its metadata.
    pub fn open_file_beneath(&self, rel: &Path) -> io::Result<(File, std::fs::Metadata)> {
        let fd = open_beneath(&self.fd, rel, OPEN_TO_READ, Mode::empty())?;
        let (file, _) = regular_file(fd, || rel.display().to_string())?;
        let meta = file.metadata()?;
        Ok((file, meta))
    }

    /// Create `name` (a plain name that must not exist yet, mode 0600)
    /// and open it for reading and writing, never through a link.
    pub fn create_new_file(&self, name: &str) -> io::Result<File> {
        let fd = rustix::fs::openat(
            &self.fd,
            plain(name)?,
            OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?;
        Ok(File::from(fd))
    }

    /// An unnamed temporary file in this directory (`O_TMPFILE`), gone
    /// when closed.
    pub fn temp_file(&self) -> io::Result<File> {
        let fd = rustix::fs::openat(
            &self.fd,
            ".",
            OFlags::RDWR | OFlags::TMPFILE | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?;
        Ok(File::from(fd))
    }

    /// The identity of regular file `name` (not following links), or an
    /// error if it is anything else.
    pub fn regular_file(&self, name: &str) -> io::Result<FileId> {
        let stat = rustix::fs::statat(&self.fd, plain(name)?, AtFlags::SYMLINK_NOFOLLOW)?;
        if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name:?} is not a regular file"),
            ));
        }
        Ok(file_id(&stat))
    }

    /// Move `name` into `to` as `to_name`, never replacing what is there
    /// (and never following a link: a link would move as a link).
    pub fn rename_to(&self, name: &str, to: &SafeDir, to_name: &str) -> io::Result<()> {
        rustix::fs::renameat_with(
            &self.fd,
            plain(name)?,
            &to.fd,
            plain(to_name)?,
            RenameFlags::NOREPLACE,
        )?;
        Ok(())
    }

    /// Hard-link `name` into `to` as `to_name` (a link is linked as a
    /// link, never followed).
    pub fn link_to(&self, name: &str, to: &SafeDir, to_name: &str) -> io::Result<()> {
        rustix::fs::linkat(
            &self.fd,
            plain(name)?,
            &to.fd,
            plain(to_name)?,
            AtFlags::empty(),
        )?;
        Ok(())
    }

    /// Copy regular file `name` into `to` as a new file `to_name`.
    pub fn copy_to(&self, name: &str, to: &SafeDir, to_name: &str) -> io::Result<u64> {
        let (mut from, _) = self.open_file(name)?;
        let fd = rustix::fs::openat(
            &to.fd,
            plain(to_name)?,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?;
        let mut dest = File::from(fd);
        let copied = io::copy(&mut from, &mut dest);
        if copied.is_err() {
            let _ = to.remove_file(to_name);
        }
        copied
    }

    /// Write `bytes` as a new file `name` (mode 0600), atomically: it
    /// appears whole or not at all, and never replaces an existing file.
    pub fn write_new(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let name = plain(name)?;
        let tmp = format!(
            ".{name}.tmp-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        );
        let fd = rustix::fs::openat(
            &self.fd,
            tmp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?;
        let mut file = File::from(fd);
        let written = io::Write::write_all(&mut file, bytes)
            .and_then(|()| file.sync_all())
            .and_then(|()| self.rename_to(&tmp, self, name));
        if written.is_err() {
            let _ = self.remove_file(&tmp);
        }
        written
    }

    pub fn remove_file(&self, name: &str) -> io::Result<()> {
        rustix::fs::unlinkat(&self.fd, plain(name)?, AtFlags::empty())?;
        Ok(())
    }

    /// Remove `name` and everything below it. Links are removed, never
    /// followed. Missing is fine.
    pub fn remove_all(&self, name: &str) -> io::Result<()> {
        let name = plain(name)?;
        match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Err(rustix::io::Errno::NOENT) => return Ok(()),
            Err(e) => return Err(e.into()),
            Ok(stat) if FileType::from_raw_mode(stat.st_mode) != FileType::Directory => {
                return self.remove_file(name);
            }
            Ok(_) => {}
        }
        let dir = self.open_dir(Path::new(name))?;
        for (entry, kind) in dir.entries()? {
            let entry = entry.to_string_lossy().into_owned();
            if kind == FileType::Directory {
                dir.remove_all(&entry)?;
            } else {
                match rustix::fs::unlinkat(&dir.fd, entry.as_str(), AtFlags::empty()) {
                    Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        drop(dir);
        match rustix::fs::unlinkat(&self.fd, name, AtFlags::REMOVEDIR) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The names in this directory and their types (not following links).
    /// Names that are not valid UTF-8 are kept as they are.
    pub fn entries(&self) -> io::Result<Vec<(OsString, FileType)>> {
        let mut out = Vec::new();
        for entry in rustix::fs::Dir::read_from(&self.fd)? {
            let entry = entry?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            if name == "." || name == ".." {
                continue;
            }
            let mut kind = entry.file_type();
            if kind == FileType::Unknown {
                kind = rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW)
                    .map(|s| FileType::from_raw_mode(s.st_mode))
                    .unwrap_or(FileType::Unknown);
            }
            out.push((name.to_os_string(), kind));
        }
        Ok(out)
    }

    /// Bytes (file sizes) and entries below this directory, never
    /// following links. Entries that vanish meanwhile are skipped.
    pub fn usage(&self) -> io::Result<Usage> {
        let mut usage = Usage::default();
        self.add_usage(&mut usage, 0)?;
        Ok(usage)
    }

    fn add_usage(&self, usage: &mut Usage, depth: usize) -> io::Result<()> {
        if depth > 256 {
            return Err(io::Error::other("directories nested too deep"));
        }
        for (name, kind) in self.entries()? {
            usage.entries += 1;
            let Ok(stat) =
                rustix::fs::statat(&self.fd, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW)
            else {
                continue;
            };
            if kind == FileType::Directory {
                if let Ok(sub) = self.open_dir(Path::new(&name)) {
                    sub.add_usage(usage, depth + 1)?;
                }
            } else {
                usage.bytes += stat.st_size as u64;
            }
        }
        Ok(())
    }

    /// Free space for an unprivileged writer, in bytes.
    pub fn free_bytes(&self) -> io::Result<u64> {
        let s = rustix::fs::fstatvfs(&self.fd)?;
        Ok(s.f_bavail.saturating_mul(s.f_frsize))
    }

    /// The raw descriptor (for `inotify_add_watch` through `/proc`).
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// A directory the daemon keeps for itself, given in its config as
    /// `key` (`data_dir`, `plugin_cache_dir`), which `holds` what it
    /// holds (for the message). Made if it is not there, mode 0700 for it
    /// and any missing parent, whatever the umask: under a umask of 0002
    /// (a user's default on many distributions) a directory made with the
    /// default mode is group-writable, and the check below would refuse
    /// what the daemon itself had just made. Refused (`PermissionDenied`)
    /// unless it is [`private`].
    pub fn open_private(path: &Path, key: &str, holds: &str) -> io::Result<SafeDir> {
        use std::os::unix::fs::DirBuilderExt;
        let open = || -> io::Result<(SafeDir, rustix::fs::Stat)> {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(path)?;
            let dir = SafeDir::open_root(path)?;
            let stat = rustix::fs::fstat(&dir.fd)?;
            Ok((dir, stat))
        };
        let (dir, stat) = open()
            .map_err(|e| io::Error::new(e.kind(), format!("{key} {}: {e}", path.display())))?;
        private(&stat).map_err(|why| {
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{key} {}: {holds}, so it must belong to the daemon's user (or root) and no \
                     one else may write it: it is {why}",
                    path.display()
                ),
            )
        })?;
        Ok(dir)
    }
}

/// Why a file or directory is not private to this process's user, if it
/// is not: owned by another user than it and root, or writable by its
/// group or by anyone. What only the daemon's user (or root) can have
/// written is what the daemon may trust: machine code to load, records
/// of directories to remove.
pub fn private(stat: &rustix::fs::Stat) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if stat.st_uid != me && stat.st_uid != 0 {
        return Err(format!(
            "owned by uid {}, neither the daemon's user (uid {me}) nor root",
            stat.st_uid
        ));
    }
    let mode = stat.st_mode & 0o7777;
    if mode & 0o022 != 0 {
        return Err(format!("writable by others (mode {mode:04o})"));
    }
    Ok(())
}

/// Make `path` belong to another user (uid 65534), for the tests of what
/// [`private`] refuses: they run as root, as `.ci/test` does.
#[cfg(test)]
pub(crate) fn give_away(path: &Path) {
    std::os::unix::fs::chown(path, Some(65534), None).expect("chown (the tests run as root)");
}

fn file_id(stat: &rustix::fs::Stat) -> FileId {
    FileId {
        dev: stat.st_dev,
        ino: stat.st_ino,
        size: stat.st_size as u64,
        links: stat.st_nlink,
    }
}

/// `openat2` below `dir` with no symlinks and no `..` escapes; where the
/// kernel has no `openat2` (before 5.6), one plain component at a time
/// with `O_NOFOLLOW`, which refuses the same paths.
/// How a file is opened for reading: never through a final symlink, and
/// without blocking on a FIFO (checked to be a regular file at once).
const OPEN_TO_READ: OFlags = OFlags::RDONLY
    .union(OFlags::NOFOLLOW)
    .union(OFlags::NONBLOCK)
    .union(OFlags::CLOEXEC)
    .union(OFlags::NOCTTY);

/// `fd` as a file, if it is a regular one (`what` names it in the
/// error); reads block normally from here on.
fn regular_file(fd: OwnedFd, what: impl Fn() -> String) -> io::Result<(File, rustix::fs::Stat)> {
    let stat = rustix::fs::fstat(&fd)?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", what()),
        ));
    }
    rustix::fs::fcntl_setfl(&fd, OFlags::RDONLY)?;
    Ok((File::from(fd), stat))
}

fn open_beneath(dir: &OwnedFd, rel: &Path, flags: OFlags, mode: Mode) -> io::Result<OwnedFd> {
    match rustix::fs::openat2(dir, rel, flags, mode, resolve_flags()) {
        Err(rustix::io::Errno::NOSYS) => {}
        other => return other.map_err(Into::into),
    }
    let mut current = dir.try_clone()?;
    let components: Vec<Component> = rel.components().collect();
    for (i, component) in components.iter().enumerate() {
        let Component::Normal(name) = component else {
            return Err(io::Error::from_raw_os_error(libc::EXDEV));
        };
        let last = i + 1 == components.len();
        let step = if last {
            flags | OFlags::NOFOLLOW
        } else {
            DIR_FLAGS
        };
        current = rustix::fs::openat(&current, *name, step, mode)?;
    }
    Ok(current)
}

/// `path` with `.` and `..` resolved lexically (no filesystem access), for
/// comparing a requested directory with the operator's prefixes.
pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn setup() -> (tempfile::TempDir, SafeDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let inside = tmp.path().join("inside");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(&inside).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), b"secret").unwrap();
        let dir = SafeDir::open_root(&inside).unwrap();
        (tmp, dir, outside)
    }

    #[test]
    fn symlinks_are_never_followed() {
        let (_tmp, dir, outside) = setup();
        let root = dir.path().to_path_buf();
        symlink(&outside, root.join("upload")).unwrap();
        symlink(outside.join("secret"), root.join("link.zip")).unwrap();
        symlink("../outside", root.join("rel")).unwrap();

        assert!(dir.open_dir(Path::new("upload")).is_err());
        assert!(dir.open_dir(Path::new("rel")).is_err());
        assert!(dir.create_dirs(Path::new("upload/x")).is_err());
        assert!(dir.open_dir(Path::new("../outside")).is_err());
        assert!(dir.open_file("link.zip").is_err());
        assert!(dir.regular_file("link.zip").is_err());
        assert!(dir.open_file("../outside/secret").is_err());

        // Removing the tree removes the links, not what they point to.
        let parent = SafeDir::open_root(root.parent().unwrap()).unwrap();
        parent.remove_all("inside").unwrap();
        assert!(!root.exists());
        assert_eq!(std::fs::read(outside.join("secret")).unwrap(), b"secret");
    }

    #[test]
    fn files_move_link_and_copy_between_directories() {
        let (_tmp, dir, _) = setup();
        std::fs::write(dir.path().join("a.zip"), b"zip").unwrap();
        let (_, id) = dir.open_file("a.zip").unwrap();
        assert_eq!((id.size, id.links), (3, 1));
        let to = dir.create_dirs(Path::new("x/y")).unwrap();
        dir.link_to("a.zip", &to, "b.zip").unwrap();
        assert_eq!(dir.regular_file("a.zip").unwrap().links, 2);
        dir.copy_to("a.zip", &to, "c.zip").unwrap();
        assert!(
            dir.copy_to("a.zip", &to, "c.zip").is_err(),
            "never overwrites"
        );
        dir.rename_to("a.zip", &to, "d.zip").unwrap();
        assert!(
            to.rename_to("d.zip", &to, "b.zip").is_err(),
            "never replaces"
        );
        let usage = dir.usage().unwrap();
        assert_eq!(
            usage,
            Usage {
                bytes: 9,
                entries: 5
            }
        );
    }

    #[test]
    fn paths_normalize_lexically() {
        assert_eq!(normalize(Path::new("/a/b/../c/./d")), Path::new("/a/c/d"));
        assert_eq!(normalize(Path::new("/a/../../etc")), Path::new("/etc"));
    }
}
