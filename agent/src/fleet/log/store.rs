//! Where the deployment log lives: openraft's log storage and state machine on one redb
//! file, `DIR/log.redb` (decision 0009).
//!
//! Tables: `log` (index to a postcard-encoded [`Entry`]), `meta` (the vote, the committed
//! and last purged log ids, the format version, the snapshot counter) and `snapshot` (the
//! current snapshot: its metadata and the encoded state machine).
//!
//! Durability, write by write. Every write is one redb transaction, so it is all there
//! after a crash or not at all (redb checksums each commit and falls back to the previous
//! one when a commit was torn). Writes that Raft's safety rests on are committed with
//! [`Durability::Immediate`] (an fsync before the commit returns): the vote, appended
//! entries (openraft is told they are flushed only after that), truncations, built and
//! installed snapshots. The committed log id and purges are committed without an fsync:
//! losing them loses nothing (the committed id is learnt again from the leader, a purge is
//! redone) and the next durable commit carries them to disk anyway.
//!
//! The state machine ([`DeploymentsState`] and the last applied id and membership) is held
//! in memory and is a function of the log: at [`open`] it is loaded from the last snapshot,
//! and openraft re-applies the committed entries after it when the Raft node starts (it
//! reads the committed id saved here). Snapshots are built and installed whole.
//!
//! redb is synchronous, and a durable commit waits for the disk: writes run on tokio's
//! blocking pool so the Raft task never stalls a worker thread. Reads stay inline (they hit
//! redb's cache). The file is locked while open, so two agents cannot share a data dir.

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};

use anyhow::{Context, bail};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader,
    RaftSnapshotBuilder, SnapshotMeta, StorageIOError, StoredMembership, Vote,
};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::TypeConfig;
use super::{DeploymentsState, Entry, Fence, LogId, Node, NodeId, Response, StorageError};

/// The file under the caller's directory.
pub const FILE: &str = "log.redb";

/// The layout and encoding version this code writes and reads (3: a planned host's zone;
/// 4: catch-up deployments; 5: a host report says what fetching the revision moved).
const FORMAT: u32 = 5;

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");

const FORMAT_KEY: &str = "format";
const VOTE_KEY: &str = "vote";
const COMMITTED_KEY: &str = "committed";
const PURGED_KEY: &str = "last_purged";
const SNAPSHOT_SEQ_KEY: &str = "snapshot_seq";
const CURRENT_KEY: &str = "current";

/// Opens (or creates) the deployment log in `dir`, usually `data_dir/raft`. Blocking: a
/// log left by a crash is checked and repaired first (redb walks its trees, in time
/// proportional to the file). From async code, call it through `spawn_blocking`.
pub fn open(dir: &Path) -> anyhow::Result<(LogStore, StateMachineStore)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(FILE);
    let created = !path.exists();
    let db = Database::create(&path)
        .with_context(|| format!("opening the deployment log {}", path.display()))?;
    if created {
        // The file's name must survive a power cut as surely as its first fsynced vote.
        sync_dir(dir)?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
    }
    prepare(&db).with_context(|| format!("opening the deployment log {}", path.display()))?;
    // The state machine starts from the last snapshot; openraft re-applies what follows.
    let applied = read_snapshot(&db)
        .and_then(|stored| match stored {
            Some(stored) => decode::<Applied>(&stored.data, "the snapshot's state"),
            None => Ok(Applied::default()),
        })
        .with_context(|| format!("reading the snapshot in {}", path.display()))?;
    let db = Arc::new(db);
    Ok((
        LogStore { db: db.clone() },
        StateMachineStore {
            db,
            applied: Arc::new(RwLock::new(applied)),
        },
    ))
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

/// Creates the tables and checks the format version.
fn prepare(db: &Database) -> anyhow::Result<()> {
    let txn = db.begin_write()?;
    {
        txn.open_table(LOG)?;
        txn.open_table(SNAPSHOT)?;
        let mut meta = txn.open_table(META)?;
        let found = match meta.get(FORMAT_KEY)? {
            Some(bytes) => Some(decode::<u32>(bytes.value(), "the format version")?),
            None => None,
        };
        match found {
            Some(FORMAT) => {}
            Some(other) => bail!("it has format {other}; this agent reads format {FORMAT}"),
            None => {
                meta.insert(
                    FORMAT_KEY,
                    encode(&FORMAT, "the format version")?.as_slice(),
                )?;
            }
        }
    }
    txn.commit()?;
    Ok(())
}

/// Why a storage call failed, before openraft's error type says what it was doing.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Db(#[from] redb::Error),
    #[error("decoding {what}: {source}")]
    Decode {
        what: &'static str,
        source: postcard::Error,
    },
    #[error("encoding {what}: {source}")]
    Encode {
        what: &'static str,
        source: postcard::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("the storage task ended: {0}")]
    Task(String),
}

fn db_err(e: impl Into<redb::Error>) -> Failure {
    Failure::Db(e.into())
}

fn encode<T: Serialize>(value: &T, what: &'static str) -> Result<Vec<u8>, Failure> {
    postcard::to_allocvec(value).map_err(|source| Failure::Encode { what, source })
}

fn decode<T: DeserializeOwned>(bytes: &[u8], what: &'static str) -> Result<T, Failure> {
    postcard::from_bytes(bytes).map_err(|source| Failure::Decode { what, source })
}

/// Turns a [`Failure`] into openraft's error, saying what was being done.
fn fail(subject: ErrorSubject<NodeId>, verb: ErrorVerb) -> impl FnOnce(Failure) -> StorageError {
    move |e| StorageIOError::new(subject, verb, AnyError::new(&e)).into()
}

/// Runs `f` in one write transaction on the blocking pool and commits it with `durability`.
/// If `f` fails the transaction is dropped, which aborts it.
async fn write<T, F>(db: &Arc<Database>, durability: Durability, f: F) -> Result<T, Failure>
where
    T: Send + 'static,
    F: FnOnce(&redb::WriteTransaction) -> Result<T, Failure> + Send + 'static,
{
    let db = db.clone();
    tokio::task::spawn_blocking(move || {
        let mut txn = db.begin_write().map_err(db_err)?;
        txn.set_durability(durability).map_err(db_err)?;
        let out = f(&txn)?;
        txn.commit().map_err(db_err)?;
        Ok(out)
    })
    .await
    .map_err(|e| Failure::Task(e.to_string()))?
}

fn read_meta<T: DeserializeOwned>(
    db: &Database,
    key: &str,
    what: &'static str,
) -> Result<Option<T>, Failure> {
    let txn = db.begin_read().map_err(db_err)?;
    let table = txn.open_table(META).map_err(db_err)?;
    let value = table.get(key).map_err(db_err)?;
    value.map(|v| decode(v.value(), what)).transpose()
}

fn write_meta<T: Serialize>(
    txn: &redb::WriteTransaction,
    key: &str,
    value: &T,
    what: &'static str,
) -> Result<(), Failure> {
    let bytes = encode(value, what)?;
    let mut table = txn.open_table(META).map_err(db_err)?;
    table.insert(key, bytes.as_slice()).map_err(db_err)?;
    Ok(())
}

/// The log's storage: entries, the vote, the committed and purged ids. Cheap to clone (it
/// is also its own reader).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    fn entries(&self, start: Bound<u64>, end: Bound<u64>) -> Result<Vec<Entry>, Failure> {
        let low = match start {
            Bound::Included(i) => i,
            Bound::Excluded(i) => match i.checked_add(1) {
                Some(i) => i,
                None => return Ok(Vec::new()),
            },
            Bound::Unbounded => 0,
        };
        let high = match end {
            Bound::Included(i) => i.checked_add(1).map_or(Bound::Unbounded, Bound::Excluded),
            Bound::Excluded(i) => Bound::Excluded(i),
            Bound::Unbounded => Bound::Unbounded,
        };
        if let Bound::Excluded(high) = high
            && high <= low
        {
            return Ok(Vec::new());
        }
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(LOG).map_err(db_err)?;
        let mut entries = Vec::new();
        for item in table
            .range::<u64>((Bound::Included(low), high))
            .map_err(db_err)?
        {
            let (index, bytes) = item.map_err(db_err)?;
            let entry: Entry = decode(bytes.value(), "a log entry")?;
            if entry.log_id.index != index.value() {
                return Err(Failure::Invalid(format!(
                    "the entry stored at index {} says it is {}",
                    index.value(),
                    entry.log_id
                )));
            }
            entries.push(entry);
        }
        Ok(entries)
    }

    fn log_state(&self) -> Result<LogState<TypeConfig>, Failure> {
        let last = {
            let txn = self.db.begin_read().map_err(db_err)?;
            let table = txn.open_table(LOG).map_err(db_err)?;
            match table.last().map_err(db_err)? {
                Some((_, bytes)) => Some(decode::<Entry>(bytes.value(), "a log entry")?.log_id),
                None => None,
            }
        };
        let last_purged_log_id: Option<LogId> =
            read_meta(&self.db, PURGED_KEY, "the last purged log id")?;
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last.or(last_purged_log_id),
        })
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        self.entries(range.start_bound().cloned(), range.end_bound().cloned())
            .map_err(fail(ErrorSubject::Logs, ErrorVerb::Read))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        self.log_state()
            .map_err(fail(ErrorSubject::Logs, ErrorVerb::Read))
    }

    async fn get_log_reader(&mut self) -> LogStore {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        let vote = *vote;
        write(&self.db, Durability::Immediate, move |txn| {
            write_meta(txn, VOTE_KEY, &vote, "the vote")
        })
        .await
        .map_err(fail(ErrorSubject::Vote, ErrorVerb::Write))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        read_meta(&self.db, VOTE_KEY, "the vote").map_err(fail(ErrorSubject::Vote, ErrorVerb::Read))
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        write(&self.db, Durability::None, move |txn| {
            write_meta(txn, COMMITTED_KEY, &committed, "the committed log id")
        })
        .await
        .map_err(fail(ErrorSubject::Store, ErrorVerb::Write))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        read_meta::<Option<LogId>>(&self.db, COMMITTED_KEY, "the committed log id")
            .map(Option::flatten)
            .map_err(fail(ErrorSubject::Store, ErrorVerb::Read))
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let encoded = entries
            .into_iter()
            .map(|entry| Ok((entry.log_id.index, encode(&entry, "a log entry")?)))
            .collect::<Result<Vec<_>, Failure>>()
            .map_err(fail(ErrorSubject::Logs, ErrorVerb::Write))?;
        write(&self.db, Durability::Immediate, move |txn| {
            let mut table = txn.open_table(LOG).map_err(db_err)?;
            for (index, bytes) in &encoded {
                table.insert(index, bytes.as_slice()).map_err(db_err)?;
            }
            Ok(())
        })
        .await
        .map_err(fail(ErrorSubject::Logs, ErrorVerb::Write))?;
        // Committed with an fsync: the entries are on disk.
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        write(&self.db, Durability::Immediate, move |txn| {
            let mut table = txn.open_table(LOG).map_err(db_err)?;
            table
                .retain_in::<u64, _>(log_id.index.., |_, _| false)
                .map_err(db_err)
        })
        .await
        .map_err(fail(ErrorSubject::Logs, ErrorVerb::Delete))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        write(&self.db, Durability::None, move |txn| {
            let purged = {
                let meta = txn.open_table(META).map_err(db_err)?;
                let value = meta.get(PURGED_KEY).map_err(db_err)?;
                value
                    .map(|v| decode::<LogId>(v.value(), "the last purged log id"))
                    .transpose()?
            };
            // The purged id and the entries go together: a crash leaves both or neither.
            if purged.is_none_or(|p| p < log_id) {
                write_meta(txn, PURGED_KEY, &log_id, "the last purged log id")?;
            }
            let mut table = txn.open_table(LOG).map_err(db_err)?;
            table
                .retain_in::<u64, _>(..=log_id.index, |_, _| false)
                .map_err(db_err)
        })
        .await
        .map_err(fail(ErrorSubject::Logs, ErrorVerb::Delete))
    }
}

/// What the state machine holds; also what a snapshot contains.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Applied {
    last_applied: Option<LogId>,
    last_membership: StoredMembership<NodeId, Node>,
    deployments: DeploymentsState,
}

impl Applied {
    fn apply(&mut self, entry: Entry) -> Response {
        self.last_applied = Some(entry.log_id);
        match entry.payload {
            EntryPayload::Blank => Response::Internal,
            EntryPayload::Normal(command) => {
                self.deployments.apply(Fence::from(entry.log_id), command)
            }
            EntryPayload::Membership(membership) => {
                self.last_membership = StoredMembership::new(Some(entry.log_id), membership);
                Response::Internal
            }
        }
    }
}

/// A snapshot as stored: openraft's metadata and the encoded [`Applied`].
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Node>,
    data: Vec<u8>,
}

fn read_snapshot(db: &Database) -> Result<Option<StoredSnapshot>, Failure> {
    let txn = db.begin_read().map_err(db_err)?;
    let table = txn.open_table(SNAPSHOT).map_err(db_err)?;
    let value = table.get(CURRENT_KEY).map_err(db_err)?;
    value.map(|v| decode(v.value(), "the snapshot")).transpose()
}

fn write_snapshot(txn: &redb::WriteTransaction, stored: &StoredSnapshot) -> Result<(), Failure> {
    let bytes = encode(stored, "the snapshot")?;
    let mut table = txn.open_table(SNAPSHOT).map_err(db_err)?;
    table
        .insert(CURRENT_KEY, bytes.as_slice())
        .map_err(db_err)?;
    Ok(())
}

fn to_snapshot(stored: StoredSnapshot) -> Snapshot<TypeConfig> {
    Snapshot {
        meta: stored.meta,
        snapshot: Box::new(Cursor::new(stored.data)),
    }
}

/// The state machine: [`DeploymentsState`] in memory, its snapshots in the file.
pub struct StateMachineStore {
    db: Arc<Database>,
    applied: Arc<RwLock<Applied>>,
}

impl StateMachineStore {
    /// A handle that reads the applied state (for the coordinator and status requests).
    pub fn reader(&self) -> StateReader {
        StateReader {
            applied: self.applied.clone(),
        }
    }
}

/// Reads the state machine while the Raft node owns it. Cheap to clone.
#[derive(Clone)]
pub struct StateReader {
    applied: Arc<RwLock<Applied>>,
}

impl StateReader {
    /// Calls `f` with the deployments as applied so far. Keep `f` short: applying waits.
    pub fn read<R>(&self, f: impl FnOnce(&DeploymentsState) -> R) -> R {
        f(&self
            .applied
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .deployments)
    }

    /// The last entry applied, if any.
    pub fn last_applied(&self) -> Option<LogId> {
        self.applied
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .last_applied
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership<NodeId, Node>), StorageError> {
        let applied = self.applied.read().unwrap_or_else(PoisonError::into_inner);
        Ok((applied.last_applied, applied.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut applied = self.applied.write().unwrap_or_else(PoisonError::into_inner);
        Ok(entries
            .into_iter()
            .map(|entry| applied.apply(entry))
            .collect())
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        SnapshotBuilder {
            db: self.db.clone(),
            applied: self
                .applied
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let signature = meta.signature();
        let data = snapshot.into_inner();
        let applied = decode::<Applied>(&data, "the snapshot's state")
            .and_then(|applied| {
                if applied.last_applied == meta.last_log_id
                    && applied.last_membership == meta.last_membership
                {
                    Ok(applied)
                } else {
                    Err(Failure::Invalid(format!(
                        "the snapshot's state is at {:?}, its metadata says {:?}",
                        applied.last_applied, meta.last_log_id
                    )))
                }
            })
            .map_err(fail(
                ErrorSubject::Snapshot(Some(signature.clone())),
                ErrorVerb::Read,
            ))?;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        // On disk first: if this fails, the state machine is left as it was.
        write(&self.db, Durability::Immediate, move |txn| {
            write_snapshot(txn, &stored)
        })
        .await
        .map_err(fail(
            ErrorSubject::Snapshot(Some(signature)),
            ErrorVerb::Write,
        ))?;
        *self.applied.write().unwrap_or_else(PoisonError::into_inner) = applied;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        read_snapshot(&self.db)
            .map(|s| s.map(to_snapshot))
            .map_err(fail(ErrorSubject::Snapshot(None), ErrorVerb::Read))
    }
}

/// Builds a snapshot of the state machine as it was when the builder was made.
pub struct SnapshotBuilder {
    db: Arc<Database>,
    applied: Applied,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let data = encode(&self.applied, "the snapshot's state")
            .map_err(fail(ErrorSubject::Snapshot(None), ErrorVerb::Write))?;
        let last_log_id = self.applied.last_applied;
        let last_membership = self.applied.last_membership.clone();
        let stored = write(&self.db, Durability::Immediate, move |txn| {
            // A snapshot installed meanwhile may be newer than this one: it stays current.
            let current = {
                let table = txn.open_table(SNAPSHOT).map_err(db_err)?;
                let value = table.get(CURRENT_KEY).map_err(db_err)?;
                value
                    .map(|v| decode::<StoredSnapshot>(v.value(), "the snapshot"))
                    .transpose()?
            };
            if let Some(current) = current
                && current.meta.last_log_id > last_log_id
            {
                return Ok(current);
            }
            let seq = {
                let meta = txn.open_table(META).map_err(db_err)?;
                let value = meta.get(SNAPSHOT_SEQ_KEY).map_err(db_err)?;
                value
                    .map(|v| decode::<u64>(v.value(), "the snapshot counter"))
                    .transpose()?
                    .unwrap_or(0)
                    + 1
            };
            write_meta(txn, SNAPSHOT_SEQ_KEY, &seq, "the snapshot counter")?;
            let fence = last_log_id
                .map(Fence::from)
                .unwrap_or(Fence { term: 0, index: 0 });
            let stored = StoredSnapshot {
                meta: SnapshotMeta {
                    last_log_id,
                    last_membership,
                    snapshot_id: format!("{}-{}-{seq}", fence.term, fence.index),
                },
                data,
            };
            write_snapshot(txn, &stored)?;
            Ok(stored)
        })
        .await
        .map_err(fail(ErrorSubject::Snapshot(None), ErrorVerb::Write))?;
        Ok(to_snapshot(stored))
    }
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
