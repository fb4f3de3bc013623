//! The chunk store: `data_dir/chunks/<first two hex digits>/<sha256 hex>`, one file per
//! chunk, shared by every revision of every application (a chunk two revisions hold is
//! stored once).
//!
//! A chunk is visible only once whole and verified: [`ChunkStore::put`] checks the bytes
//! against the name, writes them under an unpredictable temporary name, fsyncs and renames
//! into place (`beneath::Dir::write_atomic`), so a crash leaves either no chunk or the
//! whole one, and a leftover temporary that [`ChunkStore::collect`] removes. Reads are
//! checked again ([`ChunkStore::get`]): a chunk the disk changed is removed and reported,
//! never used. Every step goes through directory handles that never follow a link.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::MAX_CHUNK;
use super::manifest::{ChunkId, Manifest};
use crate::beneath::{Dir, Kind};
use crate::bundle::RevisionId;

/// How long a chunk that no manifest names is kept: what an interrupted fetch stored,
/// for it to resume from.
pub const ORPHAN_GRACE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Where manifests are kept, beside the shards.
const MANIFESTS: &str = "manifests";
/// The largest encoded manifest kept, sent or read (a 16 GiB revision of 32 KiB chunks
/// needs about 24 MiB).
pub const MAX_MANIFEST: u64 = 64 << 20;

/// Why a chunk could not be stored or read.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The bytes are not the chunk they were said to be (a peer that lies, a disk that
    /// changed them). Nothing was stored; a stored copy found so is removed.
    #[error("chunk {id} does not match its name (its bytes hash to {got})")]
    Corrupt { id: ChunkId, got: ChunkId },
    /// Larger than any chunk may be.
    #[error("chunk {id} is {len} bytes, more than the largest chunk ({MAX_CHUNK})")]
    TooLarge { id: ChunkId, len: u64 },
    #[error("the chunk store at {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What a collection removed, and what is left.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Collected {
    pub removed: u64,
    pub freed_bytes: u64,
    pub kept: u64,
    pub kept_bytes: u64,
}

/// The store under a data dir.
#[derive(Clone, Debug)]
pub struct ChunkStore {
    root: PathBuf,
    /// Puts share it, a collection takes it alone: a chunk put while a collection decides
    /// what to keep is not removed by it (see [`ChunkStore::collect`]).
    gate: std::sync::Arc<std::sync::RwLock<()>>,
}

impl ChunkStore {
    /// The store at `data_dir/chunks`, made (0700) if missing.
    pub fn open(data_dir: &Path) -> Result<ChunkStore, StoreError> {
        use std::os::unix::fs::DirBuilderExt;
        let root = data_dir.join("chunks");
        match std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)
        {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(StoreError::Io { path: root, source }),
        }
        Ok(ChunkStore {
            root,
            gate: Default::default(),
        })
    }

    fn io(&self, source: std::io::Error) -> StoreError {
        StoreError::Io {
            path: self.root.clone(),
            source,
        }
    }

    fn top(&self) -> Result<Dir, StoreError> {
        Dir::open_trusted(&self.root).map_err(|e| self.io(e))
    }

    fn shard_name(id: &ChunkId) -> String {
        id.hex()[..2].to_string()
    }

    /// Stores `bytes` as chunk `id` after checking they are it: `true` if it was new.
    pub fn put(&self, id: &ChunkId, bytes: &[u8]) -> Result<bool, StoreError> {
        if bytes.len() as u64 > u64::from(MAX_CHUNK) {
            return Err(StoreError::TooLarge {
                id: *id,
                len: bytes.len() as u64,
            });
        }
        let got = ChunkId::of(bytes);
        if &got != id {
            return Err(StoreError::Corrupt { id: *id, got });
        }
        let _gate = self.gate.read().unwrap_or_else(|p| p.into_inner());
        // One of the right size is this chunk (a short one, what a power cut may leave of
        // an unsynced write, is written again).
        if self.stored_len(id) == Some(bytes.len() as u64) {
            return Ok(false);
        }
        let (shard, _) = self
            .top()?
            .create_dirs(Path::new(&Self::shard_name(id)))
            .map_err(|e| self.io(e))?;
        shard
            .write_atomic_unsynced(OsStr::new(&id.hex()), &mut &bytes[..])
            .map_err(|e| self.io(e))?;
        Ok(true)
    }

    /// Keeps `manifest` as the manifest of a revision whose chunks are all stored
    /// (`chunks/manifests/<revision>`): what makes this host answer `Have` with "all".
    /// Call it only once every chunk is in: the chunks (written without fsync) are made
    /// durable first, so a power cut never leaves a complete manifest over short chunks.
    pub fn put_manifest(&self, manifest: &Manifest) -> Result<(), StoreError> {
        let bytes = postcard::to_stdvec(manifest).expect("a manifest encodes");
        nix::unistd::syncfs(self.top()?.fd())
            .map_err(|e| self.io(std::io::Error::from_raw_os_error(e as i32)))?;
        let (dir, _) = self
            .top()?
            .create_dirs(Path::new(MANIFESTS))
            .map_err(|e| self.io(e))?;
        dir.write_atomic(
            OsStr::new(&manifest.revision.0),
            &mut &bytes[..],
            0o600,
            None,
        )
        .map_err(|e| self.io(e))
    }

    /// The stored manifest of `revision`, its encoding as stored (at most
    /// [`MAX_MANIFEST`] bytes); `None` if there is none. Not verified: the reader does.
    pub fn manifest_bytes(&self, revision: &RevisionId) -> Result<Option<Vec<u8>>, StoreError> {
        if crate::blobs::valid_revision(&revision.0).is_err() {
            return Ok(None);
        }
        let rel = Path::new(MANIFESTS).join(&revision.0);
        let file = match self.top()?.open_file(&rel) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io(e)),
        };
        let mut bytes = Vec::new();
        file.take(MAX_MANIFEST + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| self.io(e))?;
        if bytes.len() as u64 > MAX_MANIFEST {
            return Ok(None);
        }
        Ok(Some(bytes))
    }

    /// The stored manifest of `revision`, decoded and verified against it; `None` if there
    /// is none or it is not that revision's (it is then removed).
    pub fn manifest(&self, revision: &RevisionId) -> Result<Option<Manifest>, StoreError> {
        let Some(bytes) = self.manifest_bytes(revision)? else {
            return Ok(None);
        };
        match Manifest::decode(&bytes, revision) {
            Ok(m) => Ok(Some(m)),
            Err(e) => {
                tracing::warn!(revision = %revision.0, "a stored manifest is not usable, removed: {e}");
                if let Ok(dir) = self.top()?.open_dir(Path::new(MANIFESTS)) {
                    let _ = dir.remove_file(OsStr::new(&revision.0));
                }
                Ok(None)
            }
        }
    }

    /// The revisions whose manifests are stored, with each file's modification time
    /// (seconds since the epoch; newer manifests are kept first when space is short).
    pub fn manifests(&self) -> Result<Vec<(RevisionId, u64)>, StoreError> {
        let dir = match self.top()?.open_dir(Path::new(MANIFESTS)) {
            Ok(dir) => dir,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io(e)),
        };
        let mut out = Vec::new();
        for (name, kind) in dir.entries().map_err(|e| self.io(e))? {
            let Some(name) = name.to_str() else { continue };
            if kind != Kind::File || crate::blobs::valid_revision(name).is_err() {
                continue;
            }
            let mtime = match dir.stat(OsStr::new(name)).map_err(|e| self.io(e))? {
                Some((_, st)) => st.st_mtime.max(0) as u64,
                None => continue,
            };
            out.push((RevisionId(name.to_string()), mtime));
        }
        Ok(out)
    }

    /// Removes the stored manifest of `revision` (it is then no longer served as chunks).
    pub fn remove_manifest(&self, revision: &RevisionId) -> Result<(), StoreError> {
        if crate::blobs::valid_revision(&revision.0).is_err() {
            return Ok(());
        }
        match self.top()?.open_dir(Path::new(MANIFESTS)) {
            Ok(dir) => dir
                .remove_file(OsStr::new(&revision.0))
                .map_err(|e| self.io(e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io(e)),
        }
    }

    /// Which of `ids` are stored, read after any collection under way has ended (so a
    /// fetch known to it before this call sees what it kept).
    /// A chunk counts only at its length (`ids` with their lengths): a short one is
    /// fetched again.
    pub fn has_all(&self, ids: &[(ChunkId, u32)]) -> Vec<bool> {
        let _gate = self.gate.read().unwrap_or_else(|p| p.into_inner());
        ids.iter()
            .map(|(id, len)| self.stored_len(id) == Some(u64::from(*len)))
            .collect()
    }

    /// Whether a complete manifest of `revision` is kept (without reading it).
    pub fn has_manifest(&self, revision: &RevisionId) -> bool {
        crate::blobs::valid_revision(&revision.0).is_ok()
            && self.top().is_ok_and(|top| {
                top.open_dir(Path::new(MANIFESTS)).is_ok_and(|dir| {
                    matches!(dir.stat(OsStr::new(&revision.0)), Ok(Some((Kind::File, _))))
                })
            })
    }

    /// The length of stored chunk `id`, if it is stored (as a regular file).
    fn stored_len(&self, id: &ChunkId) -> Option<u64> {
        let top = self.top().ok()?;
        let shard = top.open_dir(Path::new(&Self::shard_name(id))).ok()?;
        match shard.stat(OsStr::new(&id.hex())) {
            Ok(Some((Kind::File, st))) => Some(st.st_size as u64),
            _ => None,
        }
    }

    /// Whether chunk `id` is stored (as a regular file).
    pub fn has(&self, id: &ChunkId) -> bool {
        let Ok(top) = self.top() else { return false };
        let Ok(shard) = top.open_dir(Path::new(&Self::shard_name(id))) else {
            return false;
        };
        matches!(shard.stat(OsStr::new(&id.hex())), Ok(Some((Kind::File, _))))
    }

    /// Chunk `id`'s bytes, checked against its name; `None` if it is not stored. One that
    /// does not match is removed and reported as [`StoreError::Corrupt`].
    pub fn get(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, StoreError> {
        let rel = Path::new(&Self::shard_name(id)).join(id.hex());
        let file = match self.top()?.open_file(&rel) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io(e)),
        };
        let mut bytes = Vec::new();
        file.take(u64::from(MAX_CHUNK) + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| self.io(e))?;
        let got = ChunkId::of(&bytes);
        if &got != id || bytes.len() as u64 > u64::from(MAX_CHUNK) {
            tracing::warn!(chunk = %id, "a stored chunk does not match its name: removed");
            if let Ok(shard) = self.top()?.open_dir(Path::new(&Self::shard_name(id))) {
                let _ = shard.remove_file(OsStr::new(&id.hex()));
            }
            return Err(StoreError::Corrupt { id: *id, got });
        }
        Ok(Some(bytes))
    }

    /// Removes every chunk not in the set `keep` gives (the chunks of the revisions kept),
    /// and the leftovers of interrupted writes: what was removed and what is left. `keep`
    /// is called once no put is under way, and no put starts until the collection ends: a
    /// fetch that makes itself known before its first put is always in what `keep` sees.
    ///
    /// `keep` also gives the chunks that are known (named by some manifest): one known and
    /// not kept goes now; one no manifest names (what an interrupted fetch stored) stays
    /// until it is [`ORPHAN_GRACE`] old, for that fetch to resume from.
    pub fn collect(
        &self,
        keep: impl FnOnce() -> Result<(HashSet<ChunkId>, HashSet<ChunkId>), StoreError>,
    ) -> Result<Collected, StoreError> {
        let _gate = self.gate.write().unwrap_or_else(|p| p.into_inner());
        let (keep, known) = &keep()?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let mut c = Collected::default();
        let top = self.top()?;
        for (shard_name, shard) in self.shards(&top)? {
            shard.clean_temporaries().map_err(|e| self.io(e))?;
            for (name, kind) in shard.entries().map_err(|e| self.io(e))? {
                let Some(id) = name.to_str().and_then(ChunkId::from_hex) else {
                    continue;
                };
                let (size, mtime) = match shard.stat(&name).map_err(|e| self.io(e))? {
                    Some((Kind::File, st)) => (st.st_size as u64, st.st_mtime),
                    _ => (0, 0),
                };
                let young = now.saturating_sub(mtime) < ORPHAN_GRACE.as_secs() as i64;
                if kind == Kind::Dir {
                    // Not the store's (it makes none there): left alone, and said.
                    tracing::warn!(
                        "the chunk store has a directory named like a chunk, left alone: {}/{}",
                        shard_name.to_string_lossy(),
                        name.to_string_lossy()
                    );
                    continue;
                }
                if kind == Kind::File && (keep.contains(&id) || (!known.contains(&id) && young)) {
                    c.kept += 1;
                    c.kept_bytes += size;
                    continue;
                }
                // One that cannot be removed does not stop the others'.
                match shard.remove_file(&name) {
                    Ok(()) => {
                        c.removed += 1;
                        c.freed_bytes += size;
                    }
                    Err(e) => tracing::warn!("removing chunk {}: {e}", name.to_string_lossy()),
                }
            }
            let _ = top.remove_empty_dir(&shard_name);
        }
        Ok(c)
    }

    /// The shard directories below `top` (two lowercase hex digits: nothing else, such as
    /// the manifests' directory, is taken for one), opened, with their names.
    fn shards(&self, top: &Dir) -> Result<Vec<(std::ffi::OsString, Dir)>, StoreError> {
        let mut shards = Vec::new();
        for (name, kind) in top.entries().map_err(|e| self.io(e))? {
            let shard_like = name.len() == 2
                && name
                    .as_encoded_bytes()
                    .iter()
                    .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
            if kind == Kind::Dir && shard_like {
                let shard = top.open_dir(Path::new(&name)).map_err(|e| self.io(e))?;
                shards.push((name, shard));
            }
        }
        Ok(shards)
    }

    /// How many chunks are stored, and their bytes.
    pub fn usage(&self) -> Result<(u64, u64), StoreError> {
        let mut all = HashSet::new();
        let top = self.top()?;
        let mut bytes = 0;
        for (_, shard) in self.shards(&top)? {
            for (name, _) in shard.entries().map_err(|e| self.io(e))? {
                if let (Some(id), Ok(Some((Kind::File, st)))) =
                    (name.to_str().and_then(ChunkId::from_hex), shard.stat(&name))
                {
                    all.insert(id);
                    bytes += st.st_size as u64;
                }
            }
        }
        Ok((all.len() as u64, bytes))
    }
}
