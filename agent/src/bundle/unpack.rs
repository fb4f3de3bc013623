//! Safe unpacking. Every format feeds its entries to one [`Extractor`], which decides what
//! may be written: that is where every rule about hostile bundles lives, once.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
// Files are opened with `create_new` (O_EXCL): an existing path, a symbolic link included,
// is never opened, so a file entry cannot be written through a link at its own name.
use std::path::{Component, Path, PathBuf};

use super::BundleError;

/// How large a bundle may expand.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Bytes of file content, in all.
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
    root: PathBuf,
    limits: &'a Limits,
    bytes: u64,
    entries: u64,
}

fn unsafe_entry(entry: &str, why: impl Into<String>) -> BundleError {
    BundleError::Unsafe {
        entry: entry.to_string(),
        why: why.into(),
    }
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

/// Whether a symbolic link at `link` (relative to the root) pointing at `target` stays inside.
fn link_stays_inside(link: &Path, target: &str) -> bool {
    if target.is_empty() || target.starts_with('/') {
        return false;
    }
    let mut depth: i64 = link.components().count() as i64 - 1;
    for component in Path::new(target).components() {
        match component {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

impl<'a> Extractor<'a> {
    pub(super) fn new(root: &Path, limits: &'a Limits) -> Result<Self, BundleError> {
        std::fs::create_dir(root).map_err(|source| BundleError::Io {
            entry: root.display().to_string(),
            source,
        })?;
        Ok(Extractor {
            root: root.to_path_buf(),
            limits,
            bytes: 0,
            entries: 0,
        })
    }

    /// Refuses a path whose parent directories include a symbolic link: writing through
    /// one could land anywhere the link points.
    fn check_parents(&self, name: &str, rel: &Path) -> Result<(), BundleError> {
        let mut at = self.root.clone();
        for component in rel.parent().into_iter().flat_map(|p| p.components()) {
            at.push(component);
            let is_link = std::fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink());
            if is_link {
                let via = at
                    .strip_prefix(&self.root)
                    .unwrap_or(&at)
                    .display()
                    .to_string();
                return Err(unsafe_entry(
                    name,
                    format!("it would be written through the symbolic link `{via}`"),
                ));
            }
        }
        Ok(())
    }

    pub(super) fn entry(
        &mut self,
        name: &str,
        kind: Kind,
        content: &mut dyn Read,
    ) -> Result<(), BundleError> {
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
        self.check_parents(name, &rel)?;
        let path = self.root.join(&rel);
        let io = |source| BundleError::Io {
            entry: name.to_string(),
            source,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        match kind {
            Kind::Refused(what) => Err(unsafe_entry(
                name,
                format!("{what}: bundles hold only files, directories and symbolic links"),
            )),
            Kind::Dir => match std::fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => Ok(()),
                Ok(_) => Err(unsafe_entry(
                    name,
                    "a directory where another entry already is",
                )),
                Err(_) => std::fs::create_dir(&path).map_err(io),
            },
            Kind::Symlink { target } => {
                if !link_stays_inside(&rel, &target) {
                    return Err(unsafe_entry(
                        name,
                        format!("symbolic link to `{target}`, outside the revision"),
                    ));
                }
                std::os::unix::fs::symlink(&target, &path).map_err(|e| {
                    if e.kind() == io::ErrorKind::AlreadyExists {
                        unsafe_entry(name, "duplicate entry")
                    } else {
                        io(e)
                    }
                })
            }
            Kind::File { executable } => {
                let mode = if executable { 0o755 } else { 0o644 };
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode)
                    .open(&path)
                    .map_err(|e| {
                        if e.kind() == io::ErrorKind::AlreadyExists {
                            unsafe_entry(name, "duplicate entry")
                        } else {
                            io(e)
                        }
                    })?;
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

/// Unpacks the bundle at `path` into `staging` (created here).
pub(super) fn unpack(path: &Path, staging: &Path, limits: &Limits) -> Result<(), BundleError> {
    let meta = std::fs::metadata(path).map_err(|source| BundleError::Io {
        entry: path.display().to_string(),
        source,
    })?;
    let mut out = Extractor::new(staging, limits)?;
    if meta.is_dir() {
        return copy_dir(path, &mut out);
    }
    let mut file = File::open(path).map_err(|source| BundleError::Io {
        entry: path.display().to_string(),
        source,
    })?;
    let mut magic = [0u8; 512];
    let n = read_up_to(&mut file, &mut magic).map_err(|source| BundleError::Io {
        entry: path.display().to_string(),
        source,
    })?;
    let magic = &magic[..n];
    let file = BufReader::new(File::open(path).map_err(|source| BundleError::Io {
        entry: path.display().to_string(),
        source,
    })?);
    if magic.starts_with(&[0x1f, 0x8b]) {
        untar(flate2::read::GzDecoder::new(file), &mut out)
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let decoder = zstd::Decoder::with_buffer(file)
            .map_err(|e| archive_error("reading the zstd stream", e))?;
        untar(decoder, &mut out)
    } else if magic.starts_with(b"PK\x03\x04") || magic.starts_with(b"PK\x05\x06") {
        unzip(path, &mut out)
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

fn untar(reader: impl Read, out: &mut Extractor) -> Result<(), BundleError> {
    let mut archive = tar::Archive::new(reader);
    for entry in archive
        .entries()
        .map_err(|e| archive_error("reading the tar archive", e))?
    {
        let mut entry = entry.map_err(|e| archive_error("reading the tar archive", e))?;
        let name = String::from_utf8(entry.path_bytes().into_owned()).map_err(|e| {
            unsafe_entry(
                &String::from_utf8_lossy(e.as_bytes()),
                "the name is not UTF-8",
            )
        })?;
        use tar::EntryType as T;
        let header = entry.header();
        let kind = match header.entry_type() {
            T::Regular | T::Continuous => Kind::File {
                executable: header.mode().unwrap_or(0) & 0o111 != 0,
            },
            T::Directory => Kind::Dir,
            T::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| String::from_utf8_lossy(&t).into_owned())
                    .unwrap_or_default();
                Kind::Symlink { target }
            }
            T::Link => Kind::Refused("a hard link"),
            T::Char | T::Block => Kind::Refused("a device file"),
            T::Fifo => Kind::Refused("a FIFO"),
            _ => Kind::Refused("an unsupported tar entry type"),
        };
        out.entry(&name, kind, &mut entry)?;
    }
    Ok(())
}

fn unzip(path: &Path, out: &mut Extractor) -> Result<(), BundleError> {
    let file = File::open(path).map_err(|source| BundleError::Io {
        entry: path.display().to_string(),
        source,
    })?;
    let mut archive = zip::ZipArchive::new(BufReader::new(file))
        .map_err(|e| archive_error("reading the zip archive", e))?;
    for i in 0..archive.len() {
        let mut entry = archive
            .by_index(i)
            .map_err(|e| archive_error("reading the zip archive", e))?;
        let name = entry
            .name()
            .map_err(|e| archive_error("reading a zip entry name", e))?
            .into_owned();
        let mode = entry.unix_mode().unwrap_or(0);
        let kind = if entry.is_dir() {
            Kind::Dir
        } else if entry.is_symlink() {
            let mut target = String::new();
            entry
                .read_to_string(&mut target)
                .map_err(|source| BundleError::Io {
                    entry: name.clone(),
                    source,
                })?;
            Kind::Symlink { target }
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

/// A directory bundle is copied under the same rules as an archive.
fn copy_dir(dir: &Path, out: &mut Extractor) -> Result<(), BundleError> {
    let walk = walkdir::WalkDir::new(dir)
        .follow_links(false)
        .sort_by_file_name()
        .min_depth(1);
    for entry in walk {
        let entry = entry.map_err(|e| BundleError::Io {
            entry: dir.display().to_string(),
            source: e.into(),
        })?;
        let rel = entry.path().strip_prefix(dir).expect("under dir");
        let name = rel
            .to_str()
            .ok_or_else(|| unsafe_entry(&rel.display().to_string(), "the name is not UTF-8"))?
            .to_string();
        let io = |source| BundleError::Io {
            entry: name.clone(),
            source,
        };
        let t = entry.file_type();
        if t.is_dir() {
            out.entry(&name, Kind::Dir, &mut io::empty())?;
        } else if t.is_symlink() {
            let target = std::fs::read_link(entry.path()).map_err(io)?;
            out.entry(
                &name,
                Kind::Symlink {
                    target: target.to_string_lossy().into_owned(),
                },
                &mut io::empty(),
            )?;
        } else if t.is_file() {
            let exec = entry
                .metadata()
                .map_err(|e| io(e.into()))?
                .permissions()
                .mode()
                & 0o111
                != 0;
            let mut f = File::open(entry.path()).map_err(io)?;
            out.entry(&name, Kind::File { executable: exec }, &mut f)?;
        } else {
            out.entry(
                &name,
                Kind::Refused("a special file (device, FIFO or socket)"),
                &mut io::empty(),
            )?;
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
    fn symlink_targets_must_stay_inside() {
        let inside = |link: &str, target: &str| link_stays_inside(Path::new(link), target);
        assert!(inside("a/current", "../b/model.bin"));
        assert!(inside("link", "dir/file"));
        assert!(!inside("link", "../outside"));
        assert!(!inside("a/link", "../../outside"));
        assert!(!inside("link", "/etc/passwd"));
        assert!(!inside("a/link", "x/../../../y"));
    }
}
