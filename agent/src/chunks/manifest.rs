//! A revision's manifest: its canonical listing (directories, links, files with their
//! executable bit, length and SHA-256, as `bundle::id` hashes them into the revision id),
//! each file's content cut by FastCDC into chunks named by their SHA-256.
//!
//! The content is chunked, not the archive: compression would turn a small change into a
//! different archive from there on. A manifest that came from anywhere is trusted only
//! after [`Manifest::verify`] against the revision id the operator deployed; each chunk is
//! checked against its name where it is stored ([`super::ChunkStore::put`]) and read, and
//! a tree assembled from chunks ([`Manifest::assemble`]) is checked whole against the
//! revision id before it is handed on.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::store::{ChunkStore, StoreError};
use super::{AVG_CHUNK, MAX_CHUNK, MIN_CHUNK};

/// The longest path or link target a manifest may name (Linux's PATH_MAX).
const MAX_NAME: u64 = 4096;
use crate::bundle::id::{Entry, listing_id, open_seen, walk};
use crate::bundle::{BundleError, RevisionId, tree_id};

/// A chunk's name: the SHA-256 of its bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    pub fn of(bytes: &[u8]) -> ChunkId {
        ChunkId(Sha256::digest(bytes).into())
    }

    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The id a stored chunk's file name spells, if it spells one.
    pub fn from_hex(name: &str) -> Option<ChunkId> {
        let mut id = [0u8; 32];
        hex::decode_to_slice(name, &mut id).ok()?;
        Some(ChunkId(id))
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", &self.hex()[..12])
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

/// One chunk of a file, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub id: ChunkId,
    pub len: u32,
}

/// A revision as chunks: its listing, sorted by path, each file with its chunks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub revision: RevisionId,
    pub entries: Vec<(String, Entry<Vec<ChunkRef>>)>,
}

/// What a manifest is wrong about, named.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Its listing hashes to another revision: it is not the deployed revision's.
    #[error("the manifest describes revision {found}, not {expected}")]
    WrongRevision {
        expected: RevisionId,
        found: RevisionId,
    },
    /// A file's chunks do not add up to its length.
    #[error("{path}: its chunks add up to {chunks} bytes, but the file has {len}")]
    Lengths { path: String, chunks: u64, len: u64 },
    /// A chunk larger than any FastCDC cuts, empty, or smaller than it cuts any chunk but
    /// a file's last.
    #[error(
        "{path}: chunk {index} is {len} bytes, outside {MIN_CHUNK}..={MAX_CHUNK} (only a \
         file's last chunk may be smaller)"
    )]
    ChunkSize {
        path: String,
        index: usize,
        len: u32,
    },
    /// Entries out of order, repeated, or with a path that leaves the tree.
    #[error("{path}: not a path in order below the revision's root")]
    Path { path: String },
    /// A chunk named with two different lengths.
    #[error("{path}: chunk {id} is given two different lengths in the manifest")]
    TwoLengths { path: String, id: ChunkId },
    /// A link the unpacking rules refuse (leaving the tree, through another link).
    #[error("{path}: the link to {target}: {why}")]
    Link {
        path: String,
        target: String,
        why: String,
    },
    /// Its bytes are not a manifest's encoding.
    #[error("not a manifest's encoding: {0}")]
    Encoding(String),
    /// Larger than a bundle may expand to (`bundle::Limits`, the unpacking rules'):
    /// entries, bytes, or one name.
    #[error("the manifest has {found} {what}, more than the {max} a revision may have")]
    TooLarge {
        what: &'static str,
        found: u64,
        max: u64,
    },
}

/// How much of a revision is to fetch, given what is held.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Delta {
    /// Distinct chunks, and their bytes.
    pub chunks: u64,
    pub bytes: u64,
    /// Of them, those not held: what a transfer moves.
    pub fetch_chunks: u64,
    pub fetch_bytes: u64,
    /// Those held already (by an earlier revision, say).
    pub reused_bytes: u64,
}

/// Why a tree could not be assembled from the store.
#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("chunk {id} of {path} is not in the store")]
    Missing { path: String, id: ChunkId },
    /// A stored chunk's length is not the one the manifest gives it.
    #[error("chunk {id} of {path} is {found} bytes, not {expected} as the manifest says")]
    ChunkLength {
        path: String,
        id: ChunkId,
        expected: u32,
        found: u64,
    },
    /// The file's chunks are not its content (its SHA-256 differs): a manifest whose chunk
    /// lists lie. Nothing was put in its place.
    #[error("{path}: its chunks do not make the file the revision names")]
    Content { path: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("writing {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// The tree written hashes to another revision (a bug, or a disk that lies).
    #[error("the assembled tree is revision {found}, not {expected}")]
    Result {
        expected: RevisionId,
        found: RevisionId,
    },
    #[error(transparent)]
    Bundle(#[from] BundleError),
}

impl Manifest {
    /// The manifest of the tree at `root` (which must hold only what a bundle may).
    pub fn of_tree(root: &Path) -> Result<Manifest, BundleError> {
        Self::chunked(root, &mut |_, _| Ok(()))
    }

    /// [`Self::of_tree`], each chunk put in `store` as it is cut.
    pub fn store_tree(root: &Path, store: &ChunkStore) -> Result<Manifest, BundleError> {
        Self::chunked(root, &mut |id, bytes| {
            store
                .put(id, bytes)
                .map(drop)
                .map_err(|e| std::io::Error::other(e.to_string()))
        })
    }

    fn chunked(
        root: &Path,
        each: &mut dyn FnMut(&ChunkId, &[u8]) -> std::io::Result<()>,
    ) -> Result<Manifest, BundleError> {
        let entries = walk(root, |path| chunk_file(path, each))?;
        Ok(Manifest {
            revision: listing_id(&entries),
            entries,
        })
    }

    /// Checks that this manifest is `expected`'s: its listing hashes to that id, paths are
    /// in order and stay below the root, links stay inside, and each file's chunks are
    /// sized as FastCDC cuts them and add up to its length.
    pub fn verify(&self, expected: &RevisionId) -> Result<(), ManifestError> {
        let found = listing_id(&self.entries);
        if &found != expected || &self.revision != expected {
            return Err(ManifestError::WrongRevision {
                expected: expected.clone(),
                found,
            });
        }
        let limits = crate::bundle::Limits::default();
        let too_large = |what, found: u64, max: u64| {
            (found > max).then_some(ManifestError::TooLarge { what, found, max })
        };
        if let Some(e) = too_large("entries", self.entries.len() as u64, limits.max_entries) {
            return Err(e);
        }
        let mut total = 0u64;
        let mut before: Option<&str> = None;
        let links: HashSet<&Path> = self
            .entries
            .iter()
            .filter(|(_, e)| matches!(e, Entry::Link { .. }))
            .map(|(p, _)| Path::new(p.as_str()))
            .collect();
        let mut lengths: HashMap<ChunkId, u32> = HashMap::new();
        for (path, entry) in &self.entries {
            let name_len = match entry {
                Entry::Link { target } => path.len().max(target.len()),
                _ => path.len(),
            };
            if let Some(e) = too_large("bytes in one name", name_len as u64, MAX_NAME) {
                return Err(e);
            }
            let bad_path = || ManifestError::Path { path: path.clone() };
            // One reading of each record: no NUL (the records' separator) in a name or a
            // target, no empty path, a hash that is a hash.
            let unambiguous = match entry {
                Entry::Link { target } => !target.contains('\0'),
                Entry::File { sha256, .. } => {
                    sha256.len() == 64
                        && sha256
                            .bytes()
                            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
                }
                Entry::Dir => true,
            };
            if path.is_empty() || path.contains('\0') || !unambiguous {
                return Err(bad_path());
            }
            if before.is_some_and(|b| b.as_bytes() >= path.as_bytes())
                || crate::beneath::relative(Path::new(path))
                    .is_none_or(|p| p.as_os_str() != OsStr::new(path))
            {
                return Err(bad_path());
            }
            before = Some(path);
            match entry {
                Entry::Dir => {}
                Entry::Link { target } => {
                    // The unpacking rules': inside, and through no other link.
                    let is_link = |p: &Path| links.contains(p);
                    if let Err(why) =
                        crate::bundle::unpack::resolve_link(&is_link, Path::new(path), target)
                    {
                        return Err(ManifestError::Link {
                            path: path.clone(),
                            target: target.clone(),
                            why,
                        });
                    }
                }
                Entry::File { len, content, .. } => {
                    let mut sum = 0u64;
                    for (index, chunk) in content.iter().enumerate() {
                        // FastCDC cuts nothing smaller than MIN_CHUNK but a file's last.
                        let last = index + 1 == content.len();
                        if chunk.len == 0
                            || chunk.len > MAX_CHUNK
                            || (!last && chunk.len < MIN_CHUNK)
                        {
                            return Err(ManifestError::ChunkSize {
                                path: path.clone(),
                                index,
                                len: chunk.len,
                            });
                        }
                        if *lengths.entry(chunk.id).or_insert(chunk.len) != chunk.len {
                            return Err(ManifestError::TwoLengths {
                                path: path.clone(),
                                id: chunk.id,
                            });
                        }
                        sum = sum.checked_add(u64::from(chunk.len)).ok_or(
                            ManifestError::Lengths {
                                path: path.clone(),
                                chunks: u64::MAX,
                                len: *len,
                            },
                        )?;
                    }
                    if sum != *len {
                        return Err(ManifestError::Lengths {
                            path: path.clone(),
                            chunks: sum,
                            len: *len,
                        });
                    }
                    total = total.saturating_add(*len);
                    if let Some(e) = too_large("bytes of content", total, limits.max_bytes) {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    /// Every chunk of every file, in order (a chunk may come more than once).
    pub fn chunks(&self) -> impl Iterator<Item = &ChunkRef> {
        self.entries.iter().flat_map(|(_, e)| match e {
            Entry::File { content, .. } => content.as_slice(),
            _ => &[],
        })
    }

    /// The distinct chunks, with their lengths.
    pub fn distinct(&self) -> HashMap<ChunkId, u32> {
        self.chunks().map(|c| (c.id, c.len)).collect()
    }

    /// What fetching this revision moves when the chunks `held` says are there already.
    pub fn delta(&self, held: impl Fn(&ChunkId) -> bool) -> Delta {
        let mut d = Delta::default();
        for (id, len) in self.distinct() {
            let len = u64::from(len);
            d.chunks += 1;
            d.bytes += len;
            if held(&id) {
                d.reused_bytes += len;
            } else {
                d.fetch_chunks += 1;
                d.fetch_bytes += len;
            }
        }
        d
    }

    /// [`Self::delta`] against the chunks of an earlier revision's manifest.
    pub fn delta_from(&self, earlier: &Manifest) -> Delta {
        let held: HashSet<ChunkId> = earlier.chunks().map(|c| c.id).collect();
        self.delta(|id| held.contains(id))
    }

    /// A manifest from its encoding (at most
    /// [`MAX_MANIFEST`](super::store::MAX_MANIFEST) bytes), verified against `expected`.
    pub fn decode(bytes: &[u8], expected: &RevisionId) -> Result<Manifest, ManifestError> {
        let max = super::store::MAX_MANIFEST;
        if bytes.len() as u64 > max {
            return Err(ManifestError::TooLarge {
                what: "bytes of encoding",
                found: bytes.len() as u64,
                max,
            });
        }
        let manifest: Manifest =
            postcard::from_bytes(bytes).map_err(|e| ManifestError::Encoding(e.to_string()))?;
        manifest.verify(expected)?;
        Ok(manifest)
    }

    /// The distinct chunks, sorted by id: the order `Have` answers follow.
    pub fn sorted_distinct(&self) -> Vec<(ChunkId, u32)> {
        let mut all: Vec<(ChunkId, u32)> = self.distinct().into_iter().collect();
        all.sort_unstable();
        all
    }

    /// The manifest's own name: the SHA-256 of its encoding.
    pub fn id(&self) -> String {
        let bytes = postcard::to_stdvec(self).expect("a manifest encodes");
        hex::encode(Sha256::digest(bytes))
    }

    /// Writes the revision into `dest` (a new, empty directory the agent made) from the
    /// chunks in `store`, through directory handles that never follow a link, then checks
    /// the whole tree against `expected`, the id asked for. The manifest is verified
    /// against it first. The chunk lists are not covered by the id: a file whose chunks
    /// are not its content is found by that last check (the tree is then not to be used).
    pub fn assemble(
        &self,
        expected: &RevisionId,
        store: &ChunkStore,
        dest: &Path,
    ) -> Result<(), AssembleError> {
        use crate::beneath::Dir;
        self.verify(expected)?;
        let io = |path: &str| {
            let path = path.to_string();
            move |source| AssembleError::Io { path, source }
        };
        let root = Dir::open_trusted(dest).map_err(io("."))?;
        for (path, entry) in &self.entries {
            let rel = Path::new(path);
            let (parent, name) = match (rel.parent(), rel.file_name()) {
                (Some(p), Some(n)) => (p, n),
                _ => return Err(ManifestError::Path { path: path.clone() }.into()),
            };
            let dir = if parent.as_os_str().is_empty() {
                Dir::open_trusted(dest).map_err(io(path))?
            } else {
                root.create_dirs(parent).map_err(io(path))?.0
            };
            match entry {
                Entry::Dir => {
                    root.create_dirs(rel).map_err(io(path))?;
                }
                Entry::Link { target } => {
                    dir.symlink_atomic(name, Path::new(target))
                        .map_err(io(path))?;
                }
                Entry::File {
                    exec,
                    content,
                    sha256,
                    ..
                } => {
                    let mut reader = ChunkReader {
                        store,
                        path,
                        chunks: content.iter(),
                        current: std::io::Cursor::new(Vec::new()),
                        whole: Sha256::new(),
                        sha256,
                        failed: None,
                    };
                    let mode = if *exec { 0o755 } else { 0o644 };
                    let written = dir.write_atomic(name, &mut reader, mode, None);
                    if let Some(e) = reader.failed.take() {
                        return Err(e);
                    }
                    written.map_err(io(path))?;
                }
            }
        }
        let found = tree_id(dest)?;
        if found != self.revision {
            return Err(AssembleError::Result {
                expected: self.revision.clone(),
                found,
            });
        }
        Ok(())
    }
}

/// A file's bytes from its chunks, each read (and verified) from the store in turn.
struct ChunkReader<'a, I: Iterator<Item = &'a ChunkRef>> {
    store: &'a ChunkStore,
    path: &'a str,
    chunks: I,
    current: std::io::Cursor<Vec<u8>>,
    /// The file's bytes so far, to be its `sha256` at the end (the chunk lists are not
    /// covered by the revision id: a wrong one must fail before the file is put in place).
    whole: Sha256,
    sha256: &'a str,
    /// Why the read stopped, told apart from an I/O error of the write.
    failed: Option<AssembleError>,
}

impl<'a, I: Iterator<Item = &'a ChunkRef>> std::io::Read for ChunkReader<'a, I> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let n = self.current.read(buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            let Some(chunk) = self.chunks.next() else {
                let got = hex::encode(std::mem::take(&mut self.whole).finalize());
                if got != self.sha256 {
                    self.failed = Some(AssembleError::Content {
                        path: self.path.to_string(),
                    });
                    return Err(std::io::Error::other("the file's content is not its own"));
                }
                return Ok(0);
            };
            let bytes = match self.store.get(&chunk.id) {
                Ok(Some(bytes)) if bytes.len() == chunk.len as usize => bytes,
                Ok(Some(bytes)) => {
                    self.failed = Some(AssembleError::ChunkLength {
                        path: self.path.to_string(),
                        id: chunk.id,
                        expected: chunk.len,
                        found: bytes.len() as u64,
                    });
                    return Err(std::io::Error::other("a chunk has another length"));
                }
                Ok(None) => {
                    self.failed = Some(AssembleError::Missing {
                        path: self.path.to_string(),
                        id: chunk.id,
                    });
                    return Err(std::io::Error::other("a chunk is missing"));
                }
                Err(e) => {
                    let message = e.to_string();
                    self.failed = Some(e.into());
                    return Err(std::io::Error::other(message));
                }
            };
            self.whole.update(&bytes);
            self.current = std::io::Cursor::new(bytes);
        }
    }
}

/// Cuts the file at `path` into chunks, giving each to `each`: its length, SHA-256 and
/// chunks, in one read.
fn chunk_file(
    path: &Path,
    each: &mut dyn FnMut(&ChunkId, &[u8]) -> std::io::Result<()>,
) -> std::io::Result<(u64, String, Vec<ChunkRef>)> {
    let file = open_seen(path)?;
    let mut whole = Sha256::new();
    let mut len = 0u64;
    let mut chunks = Vec::new();
    for chunk in fastcdc::v2020::StreamCDC::new(file, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK) {
        let chunk = chunk.map_err(|e| match e {
            fastcdc::v2020::Error::IoError(e) => e,
            other => std::io::Error::other(other.to_string()),
        })?;
        whole.update(&chunk.data);
        len += chunk.length as u64;
        let id = ChunkId::of(&chunk.data);
        each(&id, &chunk.data)?;
        chunks.push(ChunkRef {
            id,
            len: chunk.length as u32,
        });
    }
    Ok((len, hex::encode(whole.finalize()), chunks))
}
