//! Safe unpacking. Every format feeds its entries to one [`Extractor`], which decides what
//! may be written: that is where every rule about hostile bundles lives, once.
//!
//! - Everything is written through directory handles: each parent is opened with
//!   `O_NOFOLLOW | O_DIRECTORY` from the staging root down, files are created
//!   `O_CREAT | O_EXCL | O_NOFOLLOW`, so nothing is ever written through a symbolic link.
//! - A symbolic link's target is resolved against the links already extracted: it must stay
//!   inside the revision and pass through no link on the way (only its last component may
//!   be one: a chain such as `libx.so -> libx.so.1 -> libx.so.1.2`). A link is also refused
//!   where an earlier link's resolution went through it, so the order of entries changes
//!   nothing.
//! - The decompressed stream is bounded, and so is everything read into memory: GNU long
//!   names and long links, PAX headers and zip link targets are checked against their own
//!   caps and counted against [`Limits::max_bytes`] before a byte of them is allocated.
//! - A directory bundle is read through handles too: each entry is opened relative to its
//!   directory's handle with `O_NOFOLLOW`, and judged by what was opened, not by a path.

use std::cell::Cell;
use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::File;
use std::hash::{BuildHasher, RandomState};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat, mkdirat};

use super::BundleError;

/// How large a bundle may expand.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Bytes of file content, names and link targets from extended headers, in all.
    pub max_bytes: u64,
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        // Revisions carry model weights: generous, but finite.
        Limits {
            max_bytes: 64 << 30,
            max_entries: 1_000_000,
        }
    }
}

/// The longest entry name or link target read from an extended header (Linux's PATH_MAX:
/// nothing longer could be created anyway).
pub(super) const MAX_NAME: u64 = 4096;
/// The largest PAX header (local or global) read.
pub(super) const MAX_PAX: u64 = 64 * 1024;
/// The most components a link target may have.
const MAX_TARGET_COMPONENTS: usize = 256;
/// The most paths links and their targets' intermediate components may name, in all: what
/// the link checks keep in memory (32 bytes or so each).
const MAX_LINK_PATHS: usize = 1 << 18;
/// Bytes of the raw (decompressed) stream allowed per entry beyond its content: the header
/// block and padding.
const STREAM_PER_ENTRY: u64 = 1024;

/// What an archive entry is.
pub(super) enum Kind {
    Dir,
    File {
        executable: bool,
    },
    Symlink {
        target: String,
    },
    /// Anything else, named for the error: "a device file", "a hard link", ...
    Refused(&'static str),
}

/// Writes entries under `root`, refusing anything unsafe.
pub(super) struct Extractor<'a> {
    root: OwnedFd,
    limits: &'a Limits,
    bytes: u64,
    entries: u64,
    /// The symbolic links extracted so far, by the key of their path relative to the root.
    links: HashSet<u128>,
    /// Every path an extracted link's target went through before its last component: no
    /// link may be created at one of these (or above one) later.
    traversed: HashSet<u128>,
    /// Keys paths: 128 bits of two randomly keyed SipHashes, so a bundle cannot aim at a
    /// collision, and memory per path is fixed whatever its length.
    keys: (RandomState, RandomState),
    /// The last entry named, for errors found between entries.
    last: String,
}

fn unsafe_entry(entry: &str, why: impl Into<String>) -> BundleError {
    BundleError::Unsafe {
        entry: entry.to_string(),
        why: why.into(),
    }
}

fn errno_io(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// The relative path an entry name stands for, or why it is refused. `None` for the root.
fn relative_path(name: &str) -> Result<Option<PathBuf>, String> {
    if name.contains('\0') {
        return Err("the name contains a NUL byte".into());
    }
    if name.contains('\\') {
        return Err("the name contains a backslash".into());
    }
    if name.starts_with('/') {
        return Err("absolute path".into());
    }
    let mut out = PathBuf::new();
    for component in Path::new(name).components() {
        match component {
            Component::Normal(c) => out.push(c),
            Component::CurDir => {}
            Component::ParentDir => return Err("the path contains `..`".into()),
            Component::RootDir | Component::Prefix(_) => return Err("absolute path".into()),
        }
    }
    Ok(if out.as_os_str().is_empty() {
        None
    } else {
        Some(out)
    })
}

/// Where a link at `link` pointing at `target` leads, resolved against the links extracted
/// (`is_link`), and the paths it passes through on the way; or why it is refused.
pub(crate) fn resolve_link(
    is_link: &dyn Fn(&Path) -> bool,
    link: &Path,
    target: &str,
) -> Result<(PathBuf, Vec<PathBuf>), String> {
    let outside = || format!("symbolic link to `{target}`, outside the revision");
    if target.is_empty() {
        return Err("symbolic link with an empty target".into());
    }
    if target.contains('\0') {
        return Err("the link target contains a NUL byte".into());
    }
    if target.starts_with('/') {
        return Err(outside());
    }
    let mut at = link.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut through = Vec::new();
    let components: Vec<_> = Path::new(target).components().collect();
    if components.len() > MAX_TARGET_COMPONENTS {
        return Err(format!(
            "the link target has more than {MAX_TARGET_COMPONENTS} components"
        ));
    }
    for (i, component) in components.iter().enumerate() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                if !at.pop() {
                    return Err(outside());
                }
            }
            Component::Normal(c) => {
                at.push(c);
                let last = i + 1 == components.len();
                if !last {
                    if is_link(&at) || at == link {
                        return Err(format!(
                            "symbolic link to `{target}` passes through the symbolic link `{}`",
                            at.display()
                        ));
                    }
                    through.push(at.clone());
                }
            }
            Component::RootDir | Component::Prefix(_) => return Err(outside()),
        }
    }
    Ok((at, through))
}

/// Opens the directory `name` under `dir`, never following a link.
fn open_dir_at(dir: BorrowedFd<'_>, name: &OsStr) -> Result<OwnedFd, Errno> {
    openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

fn stat_at(dir: BorrowedFd<'_>, name: &OsStr) -> Result<FileStat, Errno> {
    fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)
}

fn file_type(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

/// Why `at` (`c` under `dir`), a parent of entry `name`, could not be opened as a directory.
fn not_a_dir(dir: BorrowedFd<'_>, c: &OsStr, name: &str, at: &Path, e: Errno) -> BundleError {
    match e {
        Errno::ELOOP | Errno::ENOTDIR => {
            let is_link = stat_at(dir, c).is_ok_and(|st| file_type(&st) == SFlag::S_IFLNK);
            let why = if is_link {
                format!(
                    "it would be written through the symbolic link `{}`",
                    at.display()
                )
            } else {
                format!("its parent `{}` is not a directory", at.display())
            };
            unsafe_entry(name, why)
        }
        e => BundleError::Io {
            entry: name.to_string(),
            source: errno_io(e),
        },
    }
}

impl<'a> Extractor<'a> {
    pub(super) fn new(root: &Path, limits: &'a Limits) -> Result<Self, BundleError> {
        let io = |source| BundleError::Io {
            entry: root.display().to_string(),
            source,
        };
        std::fs::create_dir(root).map_err(io)?;
        let root = File::open(root).map_err(io)?;
        Ok(Extractor {
            root: root.into(),
            limits,
            bytes: 0,
            entries: 0,
            links: HashSet::new(),
            traversed: HashSet::new(),
            keys: (RandomState::new(), RandomState::new()),
            last: String::new(),
        })
    }

    fn key(&self, path: &Path) -> u128 {
        let a = self.keys.0.hash_one(path);
        let b = self.keys.1.hash_one(path);
        (u128::from(a) << 64) | u128::from(b)
    }

    /// Counts `len` bytes read into memory (a long name, a PAX header, a link target)
    /// against the limit, before they are read.
    pub(super) fn count_meta(&mut self, entry: &str, len: u64) -> Result<(), BundleError> {
        if len > self.limits.max_bytes - self.bytes {
            return Err(BundleError::TooLarge {
                entry: entry.to_string(),
                limit: self.limits.max_bytes,
            });
        }
        self.bytes += len;
        Ok(())
    }

    /// The limit the raw stream of an archive is held to.
    fn stream_limit(&self) -> u64 {
        self.limits.max_bytes.saturating_add(
            self.limits
                .max_entries
                .saturating_add(2)
                .saturating_mul(STREAM_PER_ENTRY),
        )
    }

    /// Opens (creating as needed) the parent directories of `rel`, refusing to pass
    /// through anything but a directory.
    fn open_parent(&self, name: &str, rel: &Path) -> Result<OwnedFd, BundleError> {
        let io = |e: Errno| BundleError::Io {
            entry: name.to_string(),
            source: errno_io(e),
        };
        let mut dir = self.root.try_clone().map_err(|source| BundleError::Io {
            entry: name.to_string(),
            source,
        })?;
        let mut at = PathBuf::new();
        for component in rel.parent().into_iter().flat_map(|p| p.components()) {
            let c = component.as_os_str();
            at.push(c);
            let next = match open_dir_at(dir.as_fd(), c) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) => {
                    match mkdirat(dir.as_fd(), c, Mode::from_bits_truncate(0o755)) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(io(e)),
                    }
                    open_dir_at(dir.as_fd(), c)
                        .map_err(|e| not_a_dir(dir.as_fd(), c, name, &at, e))?
                }
                Err(e) => return Err(not_a_dir(dir.as_fd(), c, name, &at, e)),
            };
            dir = next;
        }
        Ok(dir)
    }

    pub(super) fn entry(
        &mut self,
        name: &str,
        kind: Kind,
        content: &mut dyn Read,
    ) -> Result<(), BundleError> {
        name.clone_into(&mut self.last);
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(BundleError::TooManyEntries {
                limit: self.limits.max_entries,
            });
        }
        let rel = match relative_path(name).map_err(|why| unsafe_entry(name, why))? {
            Some(rel) => rel,
            None if matches!(kind, Kind::Dir) => return Ok(()),
            None => return Err(unsafe_entry(name, "empty path")),
        };
        if let Kind::Refused(what) = kind {
            return Err(unsafe_entry(
                name,
                format!("{what}: bundles hold only files, directories and symbolic links"),
            ));
        }
        let parent = self.open_parent(name, &rel)?;
        let base = rel.file_name().expect("a normal last component");
        let errno = |e: Errno| {
            if e == Errno::EEXIST {
                unsafe_entry(name, "duplicate entry")
            } else {
                BundleError::Io {
                    entry: name.to_string(),
                    source: errno_io(e),
                }
            }
        };
        match kind {
            Kind::Refused(_) => unreachable!("refused above"),
            Kind::Dir => match mkdirat(parent.as_fd(), base, Mode::from_bits_truncate(0o755)) {
                Ok(()) => Ok(()),
                Err(Errno::EEXIST) => match stat_at(parent.as_fd(), base) {
                    Ok(st) if file_type(&st) == SFlag::S_IFDIR => Ok(()),
                    _ => Err(unsafe_entry(
                        name,
                        "a directory where another entry already is",
                    )),
                },
                Err(e) => Err(errno(e)),
            },
            Kind::Symlink { target } => {
                let (_, through) =
                    resolve_link(&|p: &Path| self.links.contains(&self.key(p)), &rel, &target)
                        .map_err(|why| unsafe_entry(name, why))?;
                // Every ancestor of a traversed path is traversed too, or an existing
                // directory: a link at none of them is beneath none of them.
                if self.traversed.contains(&self.key(&rel)) {
                    return Err(unsafe_entry(
                        name,
                        "a symbolic link where an earlier link's target passes",
                    ));
                }
                if self.links.len() + self.traversed.len() + through.len() > MAX_LINK_PATHS {
                    return Err(unsafe_entry(
                        name,
                        format!(
                            "the bundle's symbolic links pass through more than {MAX_LINK_PATHS} paths"
                        ),
                    ));
                }
                nix::unistd::symlinkat(target.as_str(), parent.as_fd(), base).map_err(errno)?;
                let key = self.key(&rel);
                self.links.insert(key);
                for p in through {
                    let key = self.key(&p);
                    self.traversed.insert(key);
                }
                Ok(())
            }
            Kind::File { executable } => {
                let mode = if executable { 0o755 } else { 0o644 };
                let fd = openat(
                    parent.as_fd(),
                    base,
                    OFlag::O_WRONLY
                        | OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(mode),
                )
                .map_err(errno)?;
                let mut file = File::from(fd);
                let io = |source| BundleError::Io {
                    entry: name.to_string(),
                    source,
                };
                let room = self.limits.max_bytes - self.bytes;
                let written = io::copy(&mut content.take(room + 1), &mut file).map_err(io)?;
                if written > room {
                    return Err(BundleError::TooLarge {
                        entry: name.to_string(),
                        limit: self.limits.max_bytes,
                    });
                }
                self.bytes += written;
                file.set_permissions(std::fs::Permissions::from_mode(mode))
                    .map_err(io)?;
                file.flush().map_err(io)
            }
        }
    }
}

/// A reader that refuses to yield more than its budget, and says so.
struct Bounded<R> {
    inner: R,
    left: u64,
    hit: Rc<Cell<bool>>,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            if buf.is_empty() {
                return Ok(0);
            }
            // One byte more than allowed tells a stream that ends here from one that goes on.
            let mut probe = [0u8; 1];
            if self.inner.read(&mut probe)? == 0 {
                return Ok(0);
            }
            self.hit.set(true);
            return Err(io::Error::other(
                "the decompressed stream exceeds its limit",
            ));
        }
        let max = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..max])?;
        self.left -= n as u64;
        Ok(n)
    }
}

/// Unpacks the bundle at `path` into `staging` (created here).
pub(super) fn unpack(path: &Path, staging: &Path, limits: &Limits) -> Result<(), BundleError> {
    let io = |source| BundleError::Io {
        entry: path.display().to_string(),
        source,
    };
    // The bundle path itself is the operator's: it is followed. Everything inside is not.
    let file = File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    let mut out = Extractor::new(staging, limits)?;
    if meta.is_dir() {
        return copy_dir(file.into(), &mut out);
    }
    let mut file = file;
    let mut head = [0u8; 512];
    let n = read_up_to(&mut file, &mut head).map_err(io)?;
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    let magic = &head[..n];
    let file = BufReader::new(file);
    if magic.starts_with(&[0x1f, 0x8b]) {
        untar(flate2::read::GzDecoder::new(file), &mut out)
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let decoder = zstd::Decoder::with_buffer(file)
            .map_err(|e| archive_error("reading the zstd stream", e))?;
        untar(decoder, &mut out)
    } else if magic.starts_with(b"PK\x03\x04") || magic.starts_with(b"PK\x05\x06") {
        unzip(file, &mut out)
    } else if is_tar_header(magic) {
        untar(file, &mut out)
    } else {
        Err(BundleError::UnknownFormat {
            path: path.to_path_buf(),
        })
    }
}

/// Whether `block` is a tar header: its checksum field matches its bytes. This recognises
/// old (v7) archives, which carry no `ustar` magic, as well as ustar and GNU ones.
fn is_tar_header(block: &[u8]) -> bool {
    if block.len() < 512 {
        return false;
    }
    let field = String::from_utf8_lossy(&block[148..156]);
    let Ok(stored) = u32::from_str_radix(field.trim_matches(|c: char| c == '\0' || c == ' '), 8)
    else {
        return false;
    };
    let sum: u32 = block[..512]
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u32::from(*b)
            }
        })
        .sum();
    stored == sum
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

fn archive_error(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> BundleError {
    BundleError::Archive {
        what: what.to_string(),
        source: Box::new(e),
    }
}

/// Reads the content of an extended header of `size` bytes, capped at `cap` and counted
/// against the limit before it is read.
fn read_extension(
    out: &mut Extractor,
    what: &str,
    size: u64,
    cap: u64,
    content: &mut dyn Read,
) -> Result<Vec<u8>, BundleError> {
    let entry = format!("{what} after `{}`", out.last);
    if size > cap {
        return Err(unsafe_entry(
            &entry,
            format!("an extended header of {size} bytes, over the cap of {cap}"),
        ));
    }
    out.count_meta(&entry, size)?;
    let mut bytes = Vec::with_capacity(size as usize);
    content
        .take(size)
        .read_to_end(&mut bytes)
        .map_err(|source| BundleError::Io { entry, source })?;
    Ok(bytes)
}

fn untar(reader: impl Read, out: &mut Extractor) -> Result<(), BundleError> {
    let hit = Rc::new(Cell::new(false));
    let bounded = Bounded {
        inner: reader,
        left: out.stream_limit(),
        hit: hit.clone(),
    };
    let result = untar_entries(bounded, out);
    if hit.get() {
        return Err(BundleError::TooLarge {
            entry: out.last.clone(),
            limit: out.limits.max_bytes,
        });
    }
    result
}

fn untar_entries(reader: impl Read, out: &mut Extractor) -> Result<(), BundleError> {
    use tar::EntryType as T;
    let mut archive = tar::Archive::new(reader);
    let entries = archive
        .entries()
        .map_err(|e| archive_error("reading the tar archive", e))?
        // Raw: GNU long names and PAX headers come to us, to be read under our bounds,
        // rather than read whole by the tar crate.
        .raw(true);
    let mut long_name: Option<Vec<u8>> = None;
    let mut long_link: Option<Vec<u8>> = None;
    let mut pax: Option<Vec<u8>> = None;
    for entry in entries {
        let mut entry = entry.map_err(|e| archive_error("reading the tar archive", e))?;
        let header = entry.header().clone();
        let size = header
            .entry_size()
            .map_err(|e| archive_error("reading a tar header", e))?;
        let kind = header.entry_type();
        if kind.is_gnu_longname() {
            let mut bytes = read_extension(out, "a GNU long name", size, MAX_NAME, &mut entry)?;
            trim_nuls(&mut bytes);
            long_name = Some(bytes);
            continue;
        }
        if kind.is_gnu_longlink() {
            let mut bytes = read_extension(out, "a GNU long link", size, MAX_NAME, &mut entry)?;
            trim_nuls(&mut bytes);
            long_link = Some(bytes);
            continue;
        }
        if kind.is_pax_global_extensions() {
            // Global records (git archive's commit comment) change nothing we keep.
            read_extension(out, "a PAX global header", size, MAX_PAX, &mut entry)?;
            continue;
        }
        if kind.is_pax_local_extensions() {
            pax = Some(read_extension(
                out,
                "a PAX header",
                size,
                MAX_PAX,
                &mut entry,
            )?);
            continue;
        }
        let mut name = long_name
            .take()
            .unwrap_or_else(|| entry.path_bytes().into_owned());
        let mut link = long_link
            .take()
            .or_else(|| entry.link_name_bytes().map(|l| l.into_owned()));
        if let Some(records) = pax.take() {
            for record in tar::PaxExtensions::new(&records) {
                let record = record.map_err(|e| archive_error("reading a PAX header", e))?;
                match record.key_bytes() {
                    b"path" => name = record.value_bytes().to_vec(),
                    b"linkpath" => link = Some(record.value_bytes().to_vec()),
                    b"size" if record.value_bytes() != size.to_string().as_bytes() => {
                        return Err(unsafe_entry(
                            &String::from_utf8_lossy(&name),
                            "its PAX size differs from its header's",
                        ));
                    }
                    _ => {}
                }
            }
        }
        let name = String::from_utf8(name).map_err(|e| {
            unsafe_entry(
                &String::from_utf8_lossy(e.as_bytes()),
                "the name is not UTF-8",
            )
        })?;
        let kind = match kind {
            T::Regular | T::Continuous => Kind::File {
                executable: header.mode().unwrap_or(0) & 0o111 != 0,
            },
            T::Directory => Kind::Dir,
            T::Symlink => {
                let target = link.unwrap_or_default();
                if target.len() as u64 > MAX_NAME {
                    return Err(unsafe_entry(&name, "the link target is too long"));
                }
                Kind::Symlink {
                    target: String::from_utf8(target)
                        .map_err(|_| unsafe_entry(&name, "the link target is not UTF-8"))?,
                }
            }
            T::Link => Kind::Refused("a hard link"),
            T::Char | T::Block => Kind::Refused("a device file"),
            T::Fifo => Kind::Refused("a FIFO"),
            _ => Kind::Refused("an unsupported tar entry type"),
        };
        out.entry(&name, kind, &mut entry)?;
    }
    if long_name.is_some() || long_link.is_some() || pax.is_some() {
        return Err(unsafe_entry(
            &format!("the end, after `{}`", out.last),
            "an extended header with no entry after it",
        ));
    }
    Ok(())
}

fn trim_nuls(bytes: &mut Vec<u8>) {
    while bytes.last() == Some(&0) {
        bytes.pop();
    }
}

fn unzip(file: BufReader<File>, out: &mut Extractor) -> Result<(), BundleError> {
    let mut archive =
        zip::ZipArchive::new(file).map_err(|e| archive_error("reading the zip archive", e))?;
    if archive.len() as u64 > out.limits.max_entries {
        return Err(BundleError::TooManyEntries {
            limit: out.limits.max_entries,
        });
    }
    for i in 0..archive.len() {
        let mut entry = archive
            .by_index(i)
            .map_err(|e| archive_error("reading the zip archive", e))?;
        let name = entry
            .name()
            .map_err(|e| archive_error("reading a zip entry name", e))?
            .into_owned();
        name.clone_into(&mut out.last);
        let mode = entry.unix_mode().unwrap_or(0);
        let kind = if entry.is_dir() {
            Kind::Dir
        } else if entry.is_symlink() {
            // The target is the entry's content: read at most PATH_MAX of it, counted.
            out.count_meta(&name, entry.size().min(MAX_NAME + 1))?;
            let mut target = Vec::new();
            (&mut entry)
                .take(MAX_NAME + 1)
                .read_to_end(&mut target)
                .map_err(|source| BundleError::Io {
                    entry: name.clone(),
                    source,
                })?;
            if target.len() as u64 > MAX_NAME {
                return Err(unsafe_entry(&name, "the link target is too long"));
            }
            Kind::Symlink {
                target: String::from_utf8(target)
                    .map_err(|_| unsafe_entry(&name, "the link target is not UTF-8"))?,
            }
        } else if mode & 0o170000 != 0 && mode & 0o170000 != 0o100000 {
            Kind::Refused("a special file")
        } else {
            Kind::File {
                executable: mode & 0o111 != 0,
            }
        };
        out.entry(&name, kind, &mut entry)?;
    }
    Ok(())
}

/// A directory bundle is copied under the same rules as an archive, read through handles:
/// each entry is opened relative to its directory with `O_NOFOLLOW` and judged by what
/// was opened, so an entry swapped between listing and reading is never followed.
fn copy_dir(root: OwnedFd, out: &mut Extractor) -> Result<(), BundleError> {
    copy_dir_at(root, &PathBuf::new(), out)
}

fn copy_dir_at(dir: OwnedFd, rel: &Path, out: &mut Extractor) -> Result<(), BundleError> {
    let here = if rel.as_os_str().is_empty() {
        ".".to_string()
    } else {
        rel.display().to_string()
    };
    let io_here = |e: Errno| BundleError::Io {
        entry: here.clone(),
        source: errno_io(e),
    };
    let listing = dir.try_clone().map_err(|source| BundleError::Io {
        entry: here.clone(),
        source,
    })?;
    let mut names: Vec<Vec<u8>> = Vec::new();
    for entry in nix::dir::Dir::from_fd(listing).map_err(io_here)?.iter() {
        let entry = entry.map_err(io_here)?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(name.to_vec());
        }
    }
    names.sort();
    for base in names {
        let base = OsStr::from_bytes(&base);
        let rel = rel.join(base);
        let name = rel
            .to_str()
            .ok_or_else(|| unsafe_entry(&rel.display().to_string(), "the name is not UTF-8"))?
            .to_string();
        let errno = |e: Errno| BundleError::Io {
            entry: name.clone(),
            source: errno_io(e),
        };
        let st = stat_at(dir.as_fd(), base).map_err(errno)?;
        let swapped = || unsafe_entry(&name, "it changed while the bundle was being read");
        match file_type(&st) {
            SFlag::S_IFDIR => {
                let sub = open_dir_at(dir.as_fd(), base).map_err(|e| match e {
                    Errno::ELOOP | Errno::ENOTDIR => swapped(),
                    e => errno(e),
                })?;
                out.entry(&name, Kind::Dir, &mut io::empty())?;
                copy_dir_at(sub, &rel, out)?;
            }
            SFlag::S_IFLNK => {
                let target = nix::fcntl::readlinkat(dir.as_fd(), base).map_err(|e| match e {
                    Errno::EINVAL => swapped(),
                    e => errno(e),
                })?;
                let target = target
                    .into_string()
                    .map_err(|_| unsafe_entry(&name, "the link target is not UTF-8"))?;
                out.entry(&name, Kind::Symlink { target }, &mut io::empty())?;
            }
            SFlag::S_IFREG => {
                let fd = openat(
                    dir.as_fd(),
                    base,
                    OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| match e {
                    Errno::ELOOP => swapped(),
                    e => errno(e),
                })?;
                let opened = fstat(fd.as_fd()).map_err(errno)?;
                if file_type(&opened) != SFlag::S_IFREG {
                    return Err(swapped());
                }
                let mut f = File::from(fd);
                let exec = opened.st_mode & 0o111 != 0;
                out.entry(&name, Kind::File { executable: exec }, &mut f)?;
            }
            _ => out.entry(
                &name,
                Kind::Refused("a special file (device, FIFO or socket)"),
                &mut io::empty(),
            )?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names_are_judged() {
        assert_eq!(relative_path("./a/b").unwrap(), Some(PathBuf::from("a/b")));
        assert_eq!(relative_path("./").unwrap(), None);
        assert!(
            relative_path("/etc/passwd")
                .unwrap_err()
                .contains("absolute")
        );
        assert!(relative_path("a/../../x").unwrap_err().contains(".."));
        assert!(relative_path("a\\..\\x").unwrap_err().contains("backslash"));
    }

    #[test]
    fn symlink_targets_must_stay_inside_and_pass_through_no_link() {
        let mut links = std::collections::BTreeSet::new();
        let inside = |links: &std::collections::BTreeSet<PathBuf>, link: &str, target: &str| {
            resolve_link(&|p: &Path| links.contains(p), Path::new(link), target)
        };
        assert_eq!(
            inside(&links, "a/current", "../b/model.bin").unwrap().0,
            Path::new("b/model.bin")
        );
        assert!(inside(&links, "link", "dir/file").is_ok());
        assert!(inside(&links, "link", "../outside").is_err());
        assert!(inside(&links, "a/link", "../../outside").is_err());
        assert!(inside(&links, "link", "/etc/passwd").is_err());
        assert!(inside(&links, "a/link", "x/../../../y").is_err());
        assert!(inside(&links, "link", "").is_err());
        // `d -> .` is inside; `esc -> d/d/../..` then goes through `d` and is refused.
        assert_eq!(inside(&links, "d", ".").unwrap().0, Path::new(""));
        links.insert(PathBuf::from("d"));
        let err = inside(&links, "esc", "d/d/../..").unwrap_err();
        assert!(
            err.contains("passes through the symbolic link `d`"),
            "{err}"
        );
        // A link to a link (its last component) is a chain, allowed.
        assert!(inside(&links, "again", "d").is_ok());
        // A link through itself.
        assert!(inside(&links, "self", "self/x").is_err());
        // A target deeper than the cap.
        let deep = format!("{}x", "a/".repeat(MAX_TARGET_COMPONENTS));
        assert!(
            inside(&links, "deep", &deep)
                .unwrap_err()
                .contains("components")
        );
    }

    #[test]
    fn a_bounded_reader_says_when_its_budget_is_exceeded() {
        let hit = Rc::new(Cell::new(false));
        let mut exact = Bounded {
            inner: &b"abcd"[..],
            left: 4,
            hit: hit.clone(),
        };
        let mut all = Vec::new();
        exact.read_to_end(&mut all).unwrap();
        assert_eq!(all, b"abcd");
        assert!(!hit.get());
        let mut over = Bounded {
            inner: &b"abcde"[..],
            left: 4,
            hit: hit.clone(),
        };
        assert!(over.read_to_end(&mut Vec::new()).is_err());
        assert!(hit.get());
    }
}
