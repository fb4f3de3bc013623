//! Directory handles that never follow a symbolic link.
//!
//! The agent runs as root and writes where the application's user may plant links: an
//! install destination, a permission object, the app's work directory. Every such step
//! goes through a [`Dir`]: an open directory, below which paths are resolved by the kernel
//! with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, so a path that is, or passes
//! through, a symbolic link fails with [`is_link_refusal`] instead of being followed, and
//! nothing resolves above the handle. Files are created with unpredictable names,
//! `O_EXCL | O_NOFOLLOW`, fsynced, renamed into place with `renameat`, and the directory is
//! fsynced after; modes and owners are set on open descriptors.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};

/// The most names [`Dir::entries`] reads from one directory.
pub const MAX_ENTRIES: usize = 1 << 18;

/// How long a `.shoal-tmp-*` must have been left unchanged before
/// [`Dir::clean_temporaries`] takes it for the leftover of an interrupted write.
pub const TEMPORARY_GRACE: std::time::Duration = std::time::Duration::from_secs(120);

/// Why a directory the agent keeps private state in is not safe to use.
#[derive(Debug, thiserror::Error)]
pub enum PrivateDirError {
    /// A link, not a directory, or a directory someone else could write into.
    #[error("{0}")]
    Unsafe(String),
    #[error(transparent)]
    Io(io::Error),
}

/// Checks, without following a link, that `path` is a directory this user owns and no one
/// else may write into, so no one else can plant or swap the files the agent keeps there.
pub fn check_private_dir(path: &Path) -> Result<(), PrivateDirError> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let handle = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_DIRECTORY).bits())
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(code) if code == Errno::ELOOP as i32 || code == Errno::ENOTDIR as i32 => {
                PrivateDirError::Unsafe(
                    "a symbolic link or not a directory; the agent does not follow it".into(),
                )
            }
            _ => PrivateDirError::Io(e),
        })?;
    let meta = handle.metadata().map_err(PrivateDirError::Io)?;
    if meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(PrivateDirError::Unsafe(format!(
            "owned by uid {}, not this agent's",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(PrivateDirError::Unsafe(format!(
            "others may write into it (mode {:o}); make it 0700",
            meta.mode() & 0o777
        )));
    }
    Ok(())
}

/// An open directory; `path` is kept for messages only and never used to reach it.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

/// What a name below a [`Dir`] is, read without following it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Link,
    /// A FIFO, socket or device: never read, written or changed by the agent.
    Other,
}

fn kind_of(st: &FileStat) -> Kind {
    match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
        SFlag::S_IFREG => Kind::File,
        SFlag::S_IFDIR => Kind::Dir,
        SFlag::S_IFLNK => Kind::Link,
        _ => Kind::Other,
    }
}

fn how(flags: OFlag) -> OpenHow {
    OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS)
}

fn errno(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// True if `e` is the kernel refusing a path that is, or passes through, a symbolic link
/// (or a non-directory where a directory was needed).
pub fn is_link_refusal(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(code) if code == Errno::ELOOP as i32 || code == Errno::ENOTDIR as i32 || code == Errno::EXDEV as i32
    )
}

/// `rel` as a relative path of normal components, or `None` if it holds `..`, a root or
/// a prefix.
pub fn relative(rel: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in rel.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(out)
}

fn random_name(prefix: &str) -> OsString {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 12];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system's random source");
    OsString::from(format!("{prefix}{}", hex::encode(bytes)))
}

impl Dir {
    /// Opens a directory the agent trusts by path (its install root, its data dir).
    pub fn open_trusted(path: &Path) -> io::Result<Dir> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno)?;
        Ok(Dir {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// The path this handle was opened at (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Opens the directory `rel` below this one, refusing links on the way.
    pub fn open_dir(&self, rel: &Path) -> io::Result<Dir> {
        let fd = self.open_beneath(rel, OFlag::O_RDONLY | OFlag::O_DIRECTORY)?;
        Ok(Dir {
            fd,
            path: self.path.join(rel),
        })
    }

    fn open_beneath(&self, rel: &Path, flags: OFlag) -> io::Result<OwnedFd> {
        let rel = relative(rel).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "`..` or an absolute path")
        })?;
        let rel = if rel.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            rel
        };
        nix::fcntl::openat2(self.fd.as_fd(), &rel, how(flags)).map_err(errno)
    }

    /// Opens the directory `rel` below this one, creating each missing component (mode
    /// 0755). Returns it and the directories it created, outermost first.
    pub fn create_dirs(&self, rel: &Path) -> io::Result<(Dir, Vec<PathBuf>)> {
        let rel = relative(rel).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "`..` or an absolute path")
        })?;
        let mut created = Vec::new();
        let mut dir = self.open_dir(Path::new("."))?;
        let mut at = PathBuf::new();
        for name in rel.iter() {
            at.push(name);
            match nix::sys::stat::mkdirat(dir.fd.as_fd(), name, Mode::from_bits_truncate(0o755)) {
                Ok(()) => {
                    dir.sync()?;
                    created.push(at.clone());
                }
                Err(Errno::EEXIST) => {}
                Err(e) => return Err(errno(e)),
            }
            dir = dir.open_dir(Path::new(name))?;
        }
        Ok((dir, created))
    }

    /// Opens the regular file `rel` below this one for reading.
    pub fn open_file(&self, rel: &Path) -> io::Result<File> {
        let fd = self.open_beneath(rel, OFlag::O_RDONLY | OFlag::O_NONBLOCK)?;
        let file = File::from(fd);
        if !file.metadata()?.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        Ok(file)
    }

    /// What `name` (one component) is, without following it; `None` if absent.
    pub fn stat(&self, name: &OsStr) -> io::Result<Option<(Kind, FileStat)>> {
        match nix::sys::stat::fstatat(self.fd.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some((kind_of(&st), st))),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(errno(e)),
        }
    }

    /// The target of the link `name`, read without following it.
    pub fn read_link(&self, name: &OsStr) -> io::Result<PathBuf> {
        nix::fcntl::readlinkat(self.fd.as_fd(), name)
            .map(PathBuf::from)
            .map_err(errno)
    }

    /// The names in this directory, sorted, with what each is. A directory of more than
    /// [`MAX_ENTRIES`] names (one the application's user filled, say) is refused rather
    /// than read into memory.
    pub fn entries(&self) -> io::Result<Vec<(OsString, Kind)>> {
        let fd = self.open_beneath(Path::new("."), OFlag::O_RDONLY | OFlag::O_DIRECTORY)?;
        let mut d = nix::dir::Dir::from_fd(fd).map_err(errno)?;
        let mut names = Vec::new();
        for entry in d.iter() {
            let entry = entry.map_err(errno)?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            if name == "." || name == ".." {
                continue;
            }
            if names.len() == MAX_ENTRIES {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} holds more than {MAX_ENTRIES} entries: refused",
                        self.path.display()
                    ),
                ));
            }
            names.push(name.to_os_string());
        }
        names.sort();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            if let Some((kind, _)) = self.stat(&name)? {
                out.push((name, kind));
            }
        }
        Ok(out)
    }

    /// Writes `name` whole from `from`: a new file with an unpredictable name, `mode`, and
    /// owner `owner` if given, fsynced, renamed over `name`, then the directory fsynced.
    pub fn write_atomic(
        &self,
        name: &OsStr,
        from: &mut dyn Read,
        mode: u32,
        owner: Option<(u32, u32)>,
    ) -> io::Result<()> {
        self.write_new(name, from, mode, owner, true)
    }

    /// [`Dir::write_atomic`] without its fsyncs: the file still appears only whole to
    /// every process (the rename is atomic; a kill leaves a temporary), but a power loss
    /// may leave it short. For content checked each time it is read (the chunk store).
    pub fn write_atomic_unsynced(&self, name: &OsStr, from: &mut dyn Read) -> io::Result<()> {
        self.write_new(name, from, 0o600, None, false)
    }

    fn write_new(
        &self,
        name: &OsStr,
        from: &mut dyn Read,
        mode: u32,
        owner: Option<(u32, u32)>,
        durable: bool,
    ) -> io::Result<()> {
        let tmp = random_name(".shoal-tmp-");
        let fd = nix::fcntl::openat(
            self.fd.as_fd(),
            tmp.as_os_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(errno)?;
        let mut file = File::from(fd);
        // Held until the file is renamed or removed: `clean_temporaries` (of another
        // application installing into the same directory) leaves a locked one alone.
        file.lock()?;
        let written = (|| {
            io::copy(from, &mut file)?;
            if let Some((uid, gid)) = owner {
                nix::unistd::fchown(
                    file.as_fd(),
                    Some(nix::unistd::Uid::from_raw(uid)),
                    Some(nix::unistd::Gid::from_raw(gid)),
                )
                .map_err(errno)?;
            }
            nix::sys::stat::fchmod(file.as_fd(), Mode::from_bits_truncate(mode & 0o7777))
                .map_err(errno)?;
            file.flush()?;
            if durable { file.sync_all() } else { Ok(()) }
        })();
        self.put_in_place(&tmp, name, written, durable)
    }

    /// Makes `name` a symbolic link to `target`, atomically, then fsyncs the directory.
    pub fn symlink_atomic(&self, name: &OsStr, target: &Path) -> io::Result<()> {
        let tmp = random_name(".shoal-tmp-");
        nix::unistd::symlinkat(target, self.fd.as_fd(), tmp.as_os_str()).map_err(errno)?;
        self.put_in_place(&tmp, name, Ok(()), true)
    }

    /// Renames the temporary `tmp`, `written` whole, over `name` and fsyncs the directory;
    /// removes `tmp` instead if it was not written whole or cannot be renamed.
    fn put_in_place(
        &self,
        tmp: &OsStr,
        name: &OsStr,
        written: io::Result<()>,
        durable: bool,
    ) -> io::Result<()> {
        let renamed = written.and_then(|()| {
            nix::fcntl::renameat(self.fd.as_fd(), tmp, self.fd.as_fd(), name).map_err(errno)
        });
        if let Err(e) = renamed {
            let _ = nix::unistd::unlinkat(
                self.fd.as_fd(),
                tmp,
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            );
            return Err(e);
        }
        if durable { self.sync() } else { Ok(()) }
    }

    /// Removes the file or link `name` (absent is fine), then fsyncs the directory.
    pub fn remove_file(&self, name: &OsStr) -> io::Result<()> {
        match nix::unistd::unlinkat(
            self.fd.as_fd(),
            name,
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        ) {
            Ok(()) => self.sync(),
            Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(errno(e)),
        }
    }

    /// Removes the directory `name` if it is empty; `Ok(false)` if it is not (or absent).
    pub fn remove_empty_dir(&self, name: &OsStr) -> io::Result<bool> {
        match nix::unistd::unlinkat(self.fd.as_fd(), name, nix::unistd::UnlinkatFlags::RemoveDir) {
            Ok(()) => self.sync().map(|()| true),
            Err(Errno::ENOENT | Errno::ENOTEMPTY | Errno::EEXIST) => Ok(false),
            Err(e) => Err(errno(e)),
        }
    }

    /// Removes the leftovers of interrupted writes (`.shoal-tmp-*`) in this directory.
    /// A temporary still being written (another application may install into the same
    /// directory, under its own lock) is left alone: a file that is locked, or anything
    /// changed in the last [`TEMPORARY_GRACE`].
    pub fn clean_temporaries(&self) -> io::Result<usize> {
        let mut removed = 0;
        for (name, kind) in self.entries()? {
            if !name.as_bytes().starts_with(b".shoal-tmp-") {
                continue;
            }
            let Some((_, st)) = self.stat(&name)? else {
                continue;
            };
            let changed =
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(st.st_mtime.max(0) as u64);
            if changed.elapsed().unwrap_or_default() < TEMPORARY_GRACE {
                continue;
            }
            let abandoned = match kind {
                Kind::Link => true,
                Kind::File => match self.open_file(Path::new(&name)) {
                    Ok(f) => f.try_lock().is_ok(),
                    // Gone, or swapped for something else meanwhile: left alone.
                    Err(_) => false,
                },
                Kind::Dir | Kind::Other => false,
            };
            if abandoned {
                self.remove_file(&name)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// fsyncs the directory itself (its entries' names).
    pub fn sync(&self) -> io::Result<()> {
        nix::unistd::fsync(self.fd.as_fd()).map_err(errno)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_refused_on_the_way_and_at_the_end() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("real")).unwrap();
        std::os::unix::fs::symlink(outside.path(), tmp.path().join("link")).unwrap();
        std::os::unix::fs::symlink("real", tmp.path().join("inner")).unwrap();
        std::fs::write(outside.path().join("secret"), "s").unwrap();
        let root = Dir::open_trusted(tmp.path()).unwrap();
        for rel in ["link", "inner", "link/x", "inner/y"] {
            let e = root.create_dirs(Path::new(rel)).unwrap_err();
            assert!(is_link_refusal(&e), "{rel}: {e}");
        }
        let e = root.open_file(Path::new("link/secret")).unwrap_err();
        assert!(is_link_refusal(&e), "{e}");
        assert!(root.open_dir(Path::new("../x")).is_err());
        assert!(
            std::fs::read_dir(outside.path()).unwrap().count() == 1,
            "nothing was made outside"
        );
    }

    #[test]
    fn only_abandoned_temporaries_are_cleaned() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open_trusted(tmp.path()).unwrap();
        let long_ago = nix::sys::time::TimeSpec::new(1_000_000_000, 0);
        let age = |name: &str| {
            nix::sys::stat::utimensat(
                nix::fcntl::AT_FDCWD,
                &tmp.path().join(name),
                &long_ago,
                &long_ago,
                nix::sys::stat::UtimensatFlags::NoFollowSymlink,
            )
            .unwrap()
        };
        // Old and unlocked: the leftover of a killed write.
        std::fs::write(tmp.path().join(".shoal-tmp-old"), "x").unwrap();
        age(".shoal-tmp-old");
        std::os::unix::fs::symlink("/etc/shadow", tmp.path().join(".shoal-tmp-link")).unwrap();
        age(".shoal-tmp-link");
        // Old but locked: another application's write still under way.
        std::fs::write(tmp.path().join(".shoal-tmp-locked"), "x").unwrap();
        age(".shoal-tmp-locked");
        let held = File::open(tmp.path().join(".shoal-tmp-locked")).unwrap();
        held.lock().unwrap();
        // Fresh: just created, perhaps not locked yet.
        std::fs::write(tmp.path().join(".shoal-tmp-fresh"), "x").unwrap();
        // Not ours at all.
        std::fs::write(tmp.path().join("data"), "x").unwrap();
        age("data");

        assert_eq!(dir.clean_temporaries().unwrap(), 2);
        let mut left: Vec<String> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, [".shoal-tmp-fresh", ".shoal-tmp-locked", "data"]);
        drop(held);
        assert_eq!(dir.clean_temporaries().unwrap(), 1, "unlocked now");
    }

    #[test]
    fn writes_are_whole_and_leave_no_temporary() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Dir::open_trusted(tmp.path()).unwrap();
        let (dir, created) = root.create_dirs(Path::new("a/b")).unwrap();
        assert_eq!(created, [PathBuf::from("a"), PathBuf::from("a/b")]);
        dir.write_atomic(OsStr::new("f"), &mut &b"one"[..], 0o640, None)
            .unwrap();
        dir.write_atomic(OsStr::new("f"), &mut &b"two"[..], 0o640, None)
            .unwrap();
        assert_eq!(std::fs::read(tmp.path().join("a/b/f")).unwrap(), b"two");
        let names: Vec<_> = dir.entries().unwrap();
        assert_eq!(names, [(OsString::from("f"), Kind::File)]);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(tmp.path().join("a/b/f"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640);
    }
}
