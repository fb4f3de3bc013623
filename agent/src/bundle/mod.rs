//! Bundles and revisions. A bundle is a directory or an archive (tar, tar.gz/tgz, tar.zst,
//! zip) with `appspec.yml` at its root, or inside a single top-level directory. A revision
//! is a bundle's content, identified by the SHA-256 of that content in a canonical form
//! ([`RevisionId`]): the same whether packed or not, and whatever the archive format.
//!
//! [`open`] unpacks (or copies) a bundle into a staging directory under rules that make a
//! hostile bundle harmless: no absolute paths, no `..`, no symbolic link pointing outside the
//! revision, no write through a symbolic link, no device files, FIFOs or hard links, and
//! limits on size and entry count. Every refusal names the entry. Nothing is ever written
//! outside the staging directory.

mod id;
mod pack;
mod unpack;

use std::path::{Path, PathBuf};

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
    let text = std::fs::read(root.join("appspec.yml")).map_err(|source| BundleError::Io {
        entry: "appspec.yml".into(),
        source,
    })?;
    let text = String::from_utf8(text).map_err(|_| BundleError::Unsafe {
        entry: "appspec.yml".into(),
        why: "not UTF-8 text".into(),
    })?;
    let appspec = appspec::parse(&text)?;
    let id = tree_id(&root)?;
    Ok(Bundle { root, id, appspec })
}

/// The directory holding `appspec.yml`: the root, or its single top-level directory.
fn revision_root(dir: &Path) -> Result<PathBuf, BundleError> {
    if dir.join("appspec.yml").is_file() {
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
                && only.path().join("appspec.yml").is_file() =>
        {
            Ok(only.path())
        }
        _ => Err(BundleError::NoAppSpec),
    }
}
