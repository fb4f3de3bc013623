//! The bundle store: `data_dir/bundles/<app>/<revision>.bundle`, each file whole and
//! checked, and `data_dir/bundles/.tmp/` for what is being received, checked or packed (no
//! application name starts with `.`, so it cannot be taken for one).

use std::collections::BTreeSet;
use std::fs::{DirBuilder, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWriteExt};

use super::{CopyError, MAX_BUNDLE, STALL, copy_exact, transfer_deadline};
use crate::bundle::{self, BundleError, Limits, RevisionId};
use crate::mesh::hoststate::MAX_APP_NAME;

/// Where received, unchecked and half-packed files live until they are renamed into place.
const SCRATCH: &str = ".tmp";
/// How a stored bundle's file name ends.
const SUFFIX: &str = ".bundle";

/// Why the store refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error(
        "{0:?} is not a valid application name (letters, digits, `-`, `_`, `.`, not starting \
         with `.`; at most {MAX_APP_NAME} bytes)"
    )]
    InvalidApp(String),
    #[error("{0:?} is not a revision id (64 lowercase hex digits)")]
    InvalidRevision(String),
    #[error("a bundle of {len} bytes is over the limit of {MAX_BUNDLE} bytes")]
    TooLarge { len: u64 },
    #[error("the bundle's bytes ended after {got} of {len}")]
    Truncated { len: u64, got: u64 },
    #[error("reading the bundle's bytes: {0}")]
    Read(#[source] std::io::Error),
    #[error("no byte of the bundle arrived for {STALL:?}")]
    Stalled,
    #[error("the bundle's {len} bytes did not arrive within {deadline:?}")]
    Deadline { len: u64, deadline: Duration },
    #[error("not a usable bundle: {0}")]
    NotABundle(#[source] BundleError),
    #[error("the bundle is revision {got}, not {expected} as expected")]
    WrongRevision { expected: String, got: String },
    #[error("the bundle store: {}: {reason}", path.display())]
    Unsafe { path: PathBuf, reason: String },
    #[error("the bundle store: {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl BlobError {
    /// Whether this host's own store failed (its disk, its directories), rather than the
    /// bytes or their sender: another holder would not do better.
    pub fn is_local(&self) -> bool {
        matches!(self, BlobError::Unsafe { .. } | BlobError::Io { .. })
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> BlobError + '_ {
    move |source| BlobError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// An application name as the lifecycle takes it: letters, digits, `-`, `_`, `.`, not
/// starting with `.`, and at most as long as gossip carries ([`MAX_APP_NAME`]).
pub fn valid_app(app: &str) -> Result<(), BlobError> {
    let ok = !app.is_empty()
        && app.len() <= MAX_APP_NAME
        && app
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !app.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(BlobError::InvalidApp(super::peer_text(app)))
    }
}

/// A revision id: 64 lowercase hex digits (a SHA-256, as [`RevisionId`] prints it).
pub fn valid_revision(revision: &str) -> Result<(), BlobError> {
    let ok = revision.len() == 64
        && revision
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if ok {
        Ok(())
    } else {
        Err(BlobError::InvalidRevision(super::peer_text(revision)))
    }
}

fn no_follow() -> i32 {
    nix::fcntl::OFlag::O_NOFOLLOW.bits()
}

/// Whether `path` is a directory itself, not a link to one.
fn real_dir(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir())
}

/// Creates `dir` (0700) if it is missing, then checks, without following a link, that it
/// is a directory this user owns and no one else may write into.
fn ensure_dir(dir: &Path) -> Result<(), BlobError> {
    match DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(dir)(e)),
    }
    crate::beneath::check_private_dir(dir).map_err(|e| match e {
        crate::beneath::PrivateDirError::Unsafe(reason) => BlobError::Unsafe {
            path: dir.to_path_buf(),
            reason,
        },
        crate::beneath::PrivateDirError::Io(e) => io(dir)(e),
    })
}

fn sync_dir(dir: &Path) -> Result<(), BlobError> {
    OpenOptions::new()
        .read(true)
        .custom_flags(no_follow() | nix::fcntl::OFlag::O_DIRECTORY.bits())
        .open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

/// The bundles this host keeps, under `data_dir/bundles/`. Every method takes untrusted
/// names (checked) and none follows a link it did not make.
#[derive(Debug)]
pub struct BundleStore {
    root: PathBuf,
    served: AtomicU64,
}

impl BundleStore {
    /// The store of the agent whose data directory is `data_dir`. Touches nothing on disk
    /// until something is stored.
    pub fn new(data_dir: &Path) -> BundleStore {
        BundleStore {
            root: data_dir.join("bundles"),
            served: AtomicU64::new(0),
        }
    }

    /// Receives a bundle of application `app`: exactly `len` bytes read from `from`.
    ///
    /// Refused before a byte is read when `len` is over [`MAX_BUNDLE`] or a name is
    /// invalid. The bytes go to a new temporary file in the store (`O_EXCL`, 0600) within
    /// [`transfer_deadline`]`(len)` and with no pause longer than [`STALL`], are fsynced,
    /// then unpacked under the hostile-bundle rules into a scratch directory (removed
    /// after) to learn their revision id. If `expect` is given, any other id is refused
    /// ([`BlobError::WrongRevision`]) and nothing is kept. Then the file is renamed to
    /// `<app>/<id>.bundle`. Returns the id.
    pub async fn receive(
        &self,
        app: &str,
        len: u64,
        from: &mut (impl AsyncRead + Unpin),
        expect: Option<&str>,
    ) -> Result<RevisionId, BlobError> {
        valid_app(app)?;
        if let Some(expected) = expect {
            valid_revision(expected)?;
        }
        if len > MAX_BUNDLE {
            return Err(BlobError::TooLarge { len });
        }
        let scratch = self.scratch()?;
        let dir = self.app_dir(app)?;
        let tmp = tempfile::Builder::new()
            .prefix("incoming-")
            .suffix(".part")
            .tempfile_in(&scratch)
            .map_err(io(&scratch))?;
        let tmp_path = tmp.path().to_path_buf();
        let mut file = tokio::fs::File::from_std(tmp.as_file().try_clone().map_err(io(&tmp_path))?);
        let deadline = transfer_deadline(len);
        match tokio::time::timeout(deadline, copy_exact(from, &mut file, len, |_| {})).await {
            Err(_) => return Err(BlobError::Deadline { len, deadline }),
            Ok(Err(CopyError::Read(e))) => return Err(BlobError::Read(e)),
            Ok(Err(CopyError::Write(e))) => return Err(io(&tmp_path)(e)),
            Ok(Err(CopyError::Truncated { got })) => return Err(BlobError::Truncated { len, got }),
            Ok(Err(CopyError::Stalled { reading: true })) => return Err(BlobError::Stalled),
            Ok(Err(CopyError::Stalled { reading: false })) => {
                return Err(io(&tmp_path)(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("writing made no progress for {STALL:?}"),
                )));
            }
            Ok(Ok(())) => {}
        }
        file.flush().await.map_err(io(&tmp_path))?;
        file.sync_all().await.map_err(io(&tmp_path))?;
        drop(file);
        let expect = expect.map(str::to_owned);
        // If this future is dropped, the blocking work still ends by removing what it made.
        tokio::task::spawn_blocking(move || keep_if_valid(tmp, &scratch, &dir, expect))
            .await
            .map_err(|e| io(&tmp_path)(std::io::Error::other(e.to_string())))?
    }

    /// Packs the release directory `release` of `app` into the store as revision
    /// `revision` (a deterministic `.tar.zst`), refusing it if its content is another
    /// revision. Blocking: call it from `spawn_blocking`. Returns the stored file.
    pub fn pack_release(
        &self,
        app: &str,
        revision: &str,
        release: &Path,
    ) -> Result<PathBuf, BlobError> {
        valid_app(app)?;
        valid_revision(revision)?;
        if !real_dir(release) {
            return Err(BlobError::Unsafe {
                path: release.to_path_buf(),
                reason: "not a directory (or a symbolic link to one)".into(),
            });
        }
        let scratch = self.scratch()?;
        let dir = self.app_dir(app)?;
        let work = tempfile::Builder::new()
            .prefix("pack-")
            .tempdir_in(&scratch)
            .map_err(io(&scratch))?;
        // `bundle::create` picks the format from the name.
        let out = work.path().join("bundle.tar.zst");
        let id = bundle::create(release, &out).map_err(BlobError::NotABundle)?;
        if id.0 != revision {
            return Err(BlobError::WrongRevision {
                expected: revision.to_string(),
                got: id.0,
            });
        }
        let dest = self.file(app, revision);
        std::fs::rename(&out, &dest).map_err(io(&dest))?;
        sync_dir(&dir)?;
        Ok(dest)
    }

    /// A new private scratch directory in the store (removed when dropped; what a kill
    /// leaves is removed by [`BundleStore::remove_leftovers`]).
    pub fn scratch_dir(&self, prefix: &str) -> Result<tempfile::TempDir, BlobError> {
        let scratch = self.scratch()?;
        tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(&scratch)
            .map_err(io(&scratch))
    }

    /// The stored bundle of `revision` of `app`, if there is one (a file, not a link).
    pub fn path(&self, app: &str, revision: &str) -> Option<PathBuf> {
        valid_app(app).ok()?;
        valid_revision(revision).ok()?;
        if !real_dir(&self.root) || !real_dir(&self.root.join(app)) {
            return None;
        }
        let path = self.file(app, revision);
        std::fs::symlink_metadata(&path)
            .is_ok_and(|m| m.is_file())
            .then_some(path)
    }

    /// The revisions of `app` stored here.
    pub fn held(&self, app: &str) -> BTreeSet<String> {
        let dir = self.root.join(app);
        if valid_app(app).is_err() || !real_dir(&self.root) || !real_dir(&dir) {
            return BTreeSet::new();
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return BTreeSet::new();
        };
        entries
            .flatten()
            // The entry's own type: a link is not followed.
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let revision = name.strip_suffix(SUFFIX)?;
                valid_revision(revision).ok()?;
                Some(revision.to_string())
            })
            .collect()
    }

    /// Keeps of `app`'s bundles those of the revisions in `keep` and the newest `newest`
    /// of all (by modification time); removes the rest. Returns the revisions removed.
    pub fn prune(
        &self,
        app: &str,
        keep: &BTreeSet<String>,
        newest: usize,
    ) -> Result<Vec<String>, BlobError> {
        let dir = self.root.join(app);
        if valid_app(app).is_err() || !real_dir(&self.root) || !real_dir(&dir) {
            return Ok(Vec::new());
        }
        let mut all: Vec<(std::time::SystemTime, String)> = Vec::new();
        for revision in self.held(app) {
            let path = self.file(app, &revision);
            let mtime = std::fs::symlink_metadata(&path)
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            all.push((mtime, revision));
        }
        all.sort_by(|a, b| b.cmp(a));
        let mut removed = Vec::new();
        for (_, revision) in all.into_iter().skip(newest) {
            if keep.contains(&revision) {
                continue;
            }
            // `held` listed regular files only; unlinking a name does not follow a link.
            let path = self.file(app, &revision);
            match std::fs::remove_file(&path) {
                Ok(()) => removed.push(revision),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&path)(e)),
            }
        }
        if !removed.is_empty() {
            sync_dir(&dir)?;
        }
        Ok(removed)
    }

    /// The applications with a directory in the store, sorted (some may hold nothing).
    pub fn apps(&self) -> Vec<String> {
        if !real_dir(&self.root) {
            return Vec::new();
        }
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut apps: Vec<String> = entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|name| valid_app(name).is_ok())
            .collect();
        apps.sort();
        apps
    }

    /// Bytes this agent has sent to peers from the store, in all.
    pub fn served_bytes(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Removes what an earlier life of the agent left half-received, unchecked or
    /// half-packed. Call it at start, before the store is used: it removes what a receive
    /// or a pack under way would need.
    pub fn remove_leftovers(&self) -> Result<(), BlobError> {
        let scratch = self.root.join(SCRATCH);
        match std::fs::symlink_metadata(&scratch) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&scratch)(e)),
            // `remove_dir_all` does not follow links inside.
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&scratch).map_err(io(&scratch)),
            Ok(_) => std::fs::remove_file(&scratch).map_err(io(&scratch)),
        }
    }

    pub(super) fn count_served(&self, bytes: u64) {
        self.served.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Where the bundle of `revision` of `app` is (or would be) stored; names checked.
    fn file(&self, app: &str, revision: &str) -> PathBuf {
        self.root.join(app).join(format!("{revision}{SUFFIX}"))
    }

    /// The scratch directory, made and checked.
    fn scratch(&self) -> Result<PathBuf, BlobError> {
        if let Some(parent) = self.root.parent() {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(io(parent))?;
        }
        ensure_dir(&self.root)?;
        let scratch = self.root.join(SCRATCH);
        ensure_dir(&scratch)?;
        Ok(scratch)
    }

    /// The directory of `app` (name checked), made and checked.
    fn app_dir(&self, app: &str) -> Result<PathBuf, BlobError> {
        valid_app(app)?;
        ensure_dir(&self.root)?;
        let dir = self.root.join(app);
        ensure_dir(&dir)?;
        Ok(dir)
    }
}

/// Unpacks the received file into a scratch directory to learn its revision id, and keeps
/// it as `<dir>/<id>.bundle` if it is the revision expected. Blocking.
fn keep_if_valid(
    tmp: tempfile::NamedTempFile,
    scratch: &Path,
    dir: &Path,
    expect: Option<String>,
) -> Result<RevisionId, BlobError> {
    let staging = tempfile::Builder::new()
        .prefix("staging-")
        .tempdir_in(scratch)
        .map_err(io(scratch))?;
    let opened = bundle::open(
        tmp.path(),
        &staging.path().join("revision"),
        &Limits::default(),
    );
    let staging_path = staging.path().to_path_buf();
    // The content as chunks too, so that peers can fetch it from here as a swarm. A
    // failure leaves the bundle usable (peers then fetch it whole).
    if let (Ok(opened), Some(data_dir)) = (&opened, scratch.parent().and_then(Path::parent)) {
        let kept = crate::chunks::ChunkStore::open(data_dir)
            .map_err(|e| e.to_string())
            .and_then(|chunks| {
                let manifest =
                    crate::chunks::Manifest::store_tree(&staging.path().join("revision"), &chunks)
                        .map_err(|e| e.to_string())?;
                if manifest.revision != opened.id {
                    return Err(format!(
                        "its chunks make revision {}, not {}",
                        manifest.revision.0, opened.id.0
                    ));
                }
                chunks.put_manifest(&manifest).map_err(|e| e.to_string())
            });
        if let Err(e) = kept {
            tracing::warn!(revision = %opened.id.0, "the revision is not kept as chunks: {e}");
        }
    }
    if let Err(e) = staging.close() {
        tracing::warn!(
            "could not remove the scratch directory {}: {e}",
            staging_path.display()
        );
    }
    let id = opened.map_err(BlobError::NotABundle)?.id;
    if let Some(expected) = expect
        && expected != id.0
    {
        return Err(BlobError::WrongRevision {
            expected,
            got: id.0,
        });
    }
    let dest = dir.join(format!("{}{SUFFIX}", id.0));
    tmp.persist(&dest).map_err(|e| io(&dest)(e.error))?;
    sync_dir(dir)?;
    Ok(id)
}
