//! The revision id: SHA-256 over a canonical listing of a revision's tree, so a directory
//! and any archive of it have the same id. The listing has one record per entry, sorted by
//! path: directories by path, files by path, executable bit, size and content hash,
//! symbolic links by path and target. Timestamps, owners and other mode bits are not part
//! of a revision.

use std::fmt;
use std::io::Read;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::BundleError;

/// A revision's id: the hex SHA-256 of its canonical content.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RevisionId(pub String);

impl RevisionId {
    /// The first 12 hex digits, for people.
    pub fn short(&self) -> &str {
        &self.0[..self.0.len().min(12)]
    }
}

impl fmt::Display for RevisionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One entry of a revision's tree, as its canonical listing names it; a file carries
/// what `file` (given to [`walk`]) made of its content besides its length and hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entry<F> {
    Dir,
    Link {
        target: String,
    },
    File {
        exec: bool,
        len: u64,
        sha256: String,
        content: F,
    },
}

/// The canonical record of the entry at `name`: what the revision id hashes.
pub fn record<F>(name: &str, entry: &Entry<F>) -> Vec<u8> {
    match entry {
        Entry::Dir => format!("d\0{name}\0").into_bytes(),
        Entry::Link { target } => format!("l\0{name}\0{target}\0").into_bytes(),
        Entry::File {
            exec, len, sha256, ..
        } => {
            let exec = if *exec { "x" } else { "-" };
            format!("f\0{name}\0{exec}\0{len}\0{sha256}\0").into_bytes()
        }
    }
}

/// The revision id of a listing sorted by path ([`walk`]'s order).
pub fn listing_id<'a, F: 'a>(
    entries: impl IntoIterator<Item = &'a (String, Entry<F>)>,
) -> RevisionId {
    let mut listing = Sha256::new();
    for (name, entry) in entries {
        listing.update(record(name, entry));
    }
    RevisionId(hex::encode(listing.finalize()))
}

/// The id of the revision whose root is `root`. Refuses what a bundle may not hold.
pub fn tree_id(root: &Path) -> Result<RevisionId, BundleError> {
    let entries = walk(root, |path| {
        let (len, sha256) = hash_file(path)?;
        Ok((len, sha256, ()))
    })?;
    Ok(listing_id(&entries))
}

/// The entries of the tree at `root`, sorted by path (bytewise), never through a link;
/// each regular file read once by `file`, which gives its length, its SHA-256 and
/// whatever else the caller makes of it. Refuses what a bundle may not hold.
pub fn walk<F>(
    root: &Path,
    mut file: impl FnMut(&Path) -> std::io::Result<(u64, String, F)>,
) -> Result<Vec<(String, Entry<F>)>, BundleError> {
    let walk = walkdir::WalkDir::new(root)
        .follow_links(false)
        .sort_by(|a, b| a.file_name().cmp(b.file_name()));
    let mut records: Vec<(String, Entry<F>)> = Vec::new();
    for entry in walk.min_depth(1) {
        let entry = entry.map_err(|e| BundleError::Io {
            entry: e
                .path()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            source: e.into(),
        })?;
        let rel = entry.path().strip_prefix(root).expect("under root");
        let name = rel
            .to_str()
            .ok_or_else(|| BundleError::Unsafe {
                entry: rel.display().to_string(),
                why: "the name is not UTF-8".into(),
            })?
            .to_string();
        let io = |source| BundleError::Io {
            entry: name.clone(),
            source,
        };
        let kind = entry.file_type();
        let record = if kind.is_dir() {
            Entry::Dir
        } else if kind.is_symlink() {
            let target = std::fs::read_link(entry.path()).map_err(io)?;
            Entry::Link {
                target: target.display().to_string(),
            }
        } else if kind.is_file() {
            let meta = entry.metadata().map_err(|e| io(e.into()))?;
            let (len, sha256, content) = file(entry.path()).map_err(io)?;
            Entry::File {
                exec: meta.permissions().mode() & 0o111 != 0,
                len,
                sha256,
                content,
            }
        } else {
            return Err(BundleError::Unsafe {
                entry: name,
                why: "not a file, directory or symbolic link".into(),
            });
        };
        records.push((name, record));
    }
    // walkdir sorts siblings; sort whole paths so the order is the same however it walks.
    records.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    Ok(records)
}

/// Opens a file the walk saw, never through a link: a file is what is read.
pub fn open_seen(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)
}

fn hash_file(path: &Path) -> std::io::Result<(u64, String)> {
    let mut file = open_seen(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut len = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        len += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((len, hex::encode(hasher.finalize())))
}
