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

/// The id of the revision whose root is `root`. Refuses what a bundle may not hold.
pub fn tree_id(root: &Path) -> Result<RevisionId, BundleError> {
    let mut listing = Sha256::new();
    let walk = walkdir::WalkDir::new(root)
        .follow_links(false)
        .sort_by(|a, b| a.file_name().cmp(b.file_name()));
    let mut records: Vec<(String, Vec<u8>)> = Vec::new();
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
            format!("d\0{name}\0").into_bytes()
        } else if kind.is_symlink() {
            let target = std::fs::read_link(entry.path()).map_err(io)?;
            format!("l\0{name}\0{}\0", target.display()).into_bytes()
        } else if kind.is_file() {
            let meta = entry.metadata().map_err(|e| io(e.into()))?;
            let exec = if meta.permissions().mode() & 0o111 != 0 {
                "x"
            } else {
                "-"
            };
            let (len, sum) = hash_file(entry.path()).map_err(io)?;
            format!("f\0{name}\0{exec}\0{len}\0{sum}\0").into_bytes()
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
    for (_, record) in &records {
        listing.update(record);
    }
    Ok(RevisionId(hex::encode(listing.finalize())))
}

fn hash_file(path: &Path) -> std::io::Result<(u64, String)> {
    // Never through a link: the walk saw a file, and a file is what is read.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)?;
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
