//! Bundles and revisions. A bundle is a directory or an archive (tar, tar.gz/tgz, tar.zst,
//! zip) with `appspec.yml` at its root, or inside a single top-level directory. A revision
//! is a bundle's content, identified by the SHA-256 of that content in a canonical form
//! ([`RevisionId`]): the same whether packed or not, and whatever the archive format.
//!
//! [`open`] unpacks (or copies) a bundle into a staging directory under rules that make a
//! hostile bundle harmless: no absolute paths, no `..`, no symbolic link pointing outside the
//! revision, no write through a symbolic link, no device files, FIFOs or hard links, and
//! limits on size and entry count; no link may pass through another link (see `unpack`).
//! Every refusal names the entry. Nothing is ever written outside the staging directory,
//! and `appspec.yml` is read through directory handles that follow no link. Since every
//! link of an unpacked revision resolves inside it without passing through another link,
//! following links within a revision cannot leave it.

pub mod id;
mod pack;
pub(crate) mod unpack;

use std::fs::File;
use std::io::Read;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;

pub use id::{RevisionId, tree_id};
pub use pack::create;
pub use unpack::Limits;

use crate::appspec::{self, AppSpec};

/// Why a bundle was refused.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{path}: not a bundle: expected a directory or a tar, tar.gz, tar.zst or zip archive")]
    UnknownFormat { path: PathBuf },
    #[error("{path}: the output name must end in .tar, .tar.gz, .tgz, .tar.zst, .tzst or .zip")]
    OutputName { path: PathBuf },
    #[error("entry `{entry}`: {why}")]
    Unsafe { entry: String, why: String },
    #[error("entry `{entry}`: the bundle expands past the limit of {limit} bytes")]
    TooLarge { entry: String, limit: u64 },
    #[error("the bundle has more than {limit} entries")]
    TooManyEntries { limit: u64 },
    #[error("no appspec.yml at the bundle's root (or inside a single top-level directory)")]
    NoAppSpec,
    #[error("{0}")]
    AppSpec(#[from] appspec::ParseError),
    #[error("entry `{entry}`: {source}")]
    Io {
        entry: String,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Archive {
        what: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A bundle unpacked and read: where its revision root is, its id and its AppSpec.
#[derive(Debug)]
pub struct Bundle {
    /// The revision root: the directory holding `appspec.yml`.
    pub root: PathBuf,
    pub id: RevisionId,
    pub appspec: AppSpec,
}

/// Unpacks (or, for a directory, copies) the bundle at `path` into `staging`, which must not
/// exist yet, and reads it. On error `staging` may hold a partial unpack; remove it.
pub fn open(path: &Path, staging: &Path, limits: &Limits) -> Result<Bundle, BundleError> {
    unpack::unpack(path, staging, limits)?;
    let root = revision_root(staging)?;
    let appspec = read_appspec(&root)?;
    let id = tree_id(&root)?;
    Ok(Bundle { root, id, appspec })
}

/// Reads and parses the `appspec.yml` of the revision (or release) at `root`, through
/// [`read_in_revision`]: bounded, and never by a link that leaves the revision.
pub fn read_appspec(root: &Path) -> Result<AppSpec, BundleError> {
    let text = read_in_revision(
        root,
        Path::new("appspec.yml"),
        appspec::MAX_APPSPEC_BYTES as u64,
    )?;
    let text = String::from_utf8(text).map_err(|_| BundleError::Unsafe {
        entry: "appspec.yml".into(),
        why: "not UTF-8 text".into(),
    })?;
    Ok(appspec::parse(&text)?)
}

/// Opens the file `rel` of the revision whose root is `root`, for reading, resolved beneath
/// the root by the kernel (`openat2` with `RESOLVE_BENEATH`): a symbolic link inside the
/// revision is followed only while it stays inside, so a link (or a tampered release) can
/// never lead the agent to a host file. Where `openat2` is not available, every component
/// is opened `O_NOFOLLOW` instead, and a link anywhere on the way is refused.
pub fn open_in_revision(root: &Path, rel: &Path) -> Result<File, BundleError> {
    let entry = rel.display().to_string();
    let fail = |e: Errno| match e {
        Errno::EXDEV => BundleError::Unsafe {
            entry: entry.clone(),
            why: "it leads outside the revision".into(),
        },
        Errno::ELOOP => BundleError::Unsafe {
            entry: entry.clone(),
            why: "it is reached through a symbolic link".into(),
        },
        e => BundleError::Io {
            entry: entry.clone(),
            source: std::io::Error::from_raw_os_error(e as i32),
        },
    };
    if rel.is_absolute() || rel.as_os_str().is_empty() {
        return Err(fail(Errno::EXDEV));
    }
    let dir = File::open(root).map_err(|source| BundleError::Io {
        entry: root.display().to_string(),
        source,
    })?;
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd = match nix::fcntl::openat2(dir.as_fd(), rel, how) {
        Err(Errno::ENOSYS) => open_no_follow(dir, rel).map_err(fail)?,
        other => other.map_err(fail)?,
    };
    let file = File::from(fd);
    let meta = file.metadata().map_err(|source| BundleError::Io {
        entry: entry.clone(),
        source,
    })?;
    if !meta.is_file() {
        return Err(BundleError::Unsafe {
            entry,
            why: "not a regular file".into(),
        });
    }
    Ok(file)
}

/// Opens `rel` under `dir` one component at a time, none of them a symbolic link.
fn open_no_follow(dir: File, rel: &Path) -> Result<std::os::fd::OwnedFd, Errno> {
    use std::path::Component;
    let mut at: std::os::fd::OwnedFd = dir.into();
    let parts: Vec<_> = rel.components().collect();
    for (i, part) in parts.iter().enumerate() {
        let Component::Normal(name) = part else {
            return Err(Errno::EXDEV);
        };
        let last = i + 1 == parts.len();
        let flags = OFlag::O_RDONLY
            | OFlag::O_NOFOLLOW
            | OFlag::O_CLOEXEC
            | if last {
                OFlag::O_NONBLOCK
            } else {
                OFlag::O_DIRECTORY
            };
        at = nix::fcntl::openat(at.as_fd(), *name, flags, Mode::empty())?;
    }
    Ok(at)
}

/// Reads the file `rel` of the revision at `root` (see [`open_in_revision`]), refusing one
/// larger than `max` bytes before reading more than that.
pub fn read_in_revision(root: &Path, rel: &Path, max: u64) -> Result<Vec<u8>, BundleError> {
    let file = open_in_revision(root, rel)?;
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| BundleError::Io {
            entry: rel.display().to_string(),
            source,
        })?;
    if bytes.len() as u64 > max {
        return Err(BundleError::TooLarge {
            entry: rel.display().to_string(),
            limit: max,
        });
    }
    Ok(bytes)
}

/// Whether `path` is a regular file itself (not a symbolic link to one).
fn is_plain_file(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file())
}

/// The directory holding `appspec.yml`: the root, or its single top-level directory.
fn revision_root(dir: &Path) -> Result<PathBuf, BundleError> {
    if is_plain_file(&dir.join("appspec.yml")) {
        return Ok(dir.to_path_buf());
    }
    let entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|source| BundleError::Io {
            entry: ".".into(),
            source,
        })?
        .collect::<Result<_, _>>()
        .map_err(|source| BundleError::Io {
            entry: ".".into(),
            source,
        })?;
    match entries.as_slice() {
        [only]
            if only.file_type().is_ok_and(|t| t.is_dir())
                && is_plain_file(&only.path().join("appspec.yml")) =>
        {
            Ok(only.path())
        }
        _ => Err(BundleError::NoAppSpec),
    }
}
