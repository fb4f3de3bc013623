//! The swarm transfer's driver (issue 13, decision 0024): fetches a revision as chunks from
//! many peers at once, the decisions taken by the sans-IO [`Swarm`], and turns the chunks
//! into the bundle the lifecycle installs.
//!
//! 1. **The manifest** comes from the chunk store if a complete one is there, else from a
//!    peer (holders and fetchers before the origin), verified against the revision id
//!    before anything else is done with it. No peer having one (agents that only keep
//!    whole bundles) is [`ChunkedErrorKind::NoManifest`]: the caller fetches the whole
//!    bundle instead.
//! 2. **The chunks** missing from the store are asked of the peers gossip names as holding
//!    or fetching the revision, and of the origin, as the [`Swarm`] decides; each chunk is
//!    checked against its name ([`ChunkStore::put`]) before it is stored, so a restarted
//!    fetch asks only for what is missing (resumption is the store's content). While it
//!    fetches, this agent says so in gossip ([`Fetching`]) and serves what it has.
//! 3. **The bundle.** The tree is assembled from the chunks (each file checked against its
//!    SHA-256 before it is put in place, the whole tree against the revision id), packed
//!    into the bundle store, and the manifest kept as complete.
//!
//! Everything is bounded: one stream per request, [`super::MAX_BATCH`] chunks a request,
//! a deadline per request and per fetch, the manifest's size before it is read.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::seq::SliceRandom;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::rate::Rate;
use super::swarm::{Action, Config, Ended, Got, Role, Swarm};
use super::{BlobAnswer, BlobRequest, BundleStore, Fetched, pack_bits, peer_text, unpack_bits};
use crate::bundle::RevisionId;
use crate::chunks::store::MAX_MANIFEST;
use crate::chunks::{AssembleError, ChunkId, ChunkStore, Manifest, StoreError};
use crate::mesh::frame::{Protocol, read_frame, write_frame};
use crate::mesh::node::{MeshHandle, STREAM_DEADLINE};
use crate::mesh::view::MemberState;

/// Rounds of asking busy peers for the manifest again (250 ms apart).
const MANIFEST_ROUNDS: usize = 40;

/// Why a peer gave no manifest.
enum Refused {
    Busy,
    Other(String),
}

impl From<String> for Refused {
    fn from(why: String) -> Refused {
        Refused::Other(why)
    }
}

/// How often the sources are read again from gossip.
const SOURCES_EVERY: Duration = Duration::from_secs(1);

/// What this agent is fetching as chunks: gossiped (`AppRecord::fetching`) and used to
/// answer `Have` and `Manifest` while the fetch goes on.
#[derive(Debug, Default)]
pub struct Fetching {
    inner: Mutex<HashMap<String, Progress>>,
}

#[derive(Debug)]
struct Progress {
    app: String,
    manifest: Arc<Vec<u8>>,
    /// One bit per chunk, packed as `Have` sends them.
    held: Vec<u8>,
    /// Fetches of this revision under way (two applications may share one).
    fetches: usize,
}

impl Fetching {
    /// Which chunks of `revision` this agent holds while it fetches it, packed.
    pub fn have(&self, revision: &str) -> Option<Vec<u8>> {
        let inner = self.inner.lock().expect("fetching lock");
        inner.get(revision).map(|p| p.held.clone())
    }

    /// The manifest of `revision` while it is being fetched, encoded.
    pub fn manifest(&self, revision: &str) -> Option<Arc<Vec<u8>>> {
        let inner = self.inner.lock().expect("fetching lock");
        inner.get(revision).map(|p| p.manifest.clone())
    }

    /// The manifests of the fetches under way, by revision.
    fn manifests(&self) -> Vec<(String, Arc<Vec<u8>>)> {
        let inner = self.inner.lock().expect("fetching lock");
        inner
            .iter()
            .map(|(rev, p)| (rev.clone(), p.manifest.clone()))
            .collect()
    }

    /// Application → the revision being fetched for it.
    pub fn apps(&self) -> BTreeMap<String, String> {
        let inner = self.inner.lock().expect("fetching lock");
        inner
            .iter()
            .map(|(rev, p)| (p.app.clone(), rev.clone()))
            .collect()
    }

    fn start(&self, app: &str, revision: &str, manifest: Arc<Vec<u8>>, chunks: usize) {
        let mut inner = self.inner.lock().expect("fetching lock");
        inner
            .entry(revision.to_string())
            .or_insert_with(|| Progress {
                app: app.to_string(),
                manifest,
                held: pack_bits(&vec![false; chunks]),
                fetches: 0,
            })
            .fetches += 1;
    }

    fn mark(&self, revision: &str, index: usize) {
        let mut inner = self.inner.lock().expect("fetching lock");
        if let Some(p) = inner.get_mut(revision)
            && let Some(byte) = p.held.get_mut(index / 8)
        {
            *byte |= 1 << (index % 8);
        }
    }

    fn end(&self, revision: &str) {
        let mut inner = self.inner.lock().expect("fetching lock");
        if let Some(p) = inner.get_mut(revision) {
            p.fetches = p.fetches.saturating_sub(1);
            if p.fetches == 0 {
                inner.remove(revision);
            }
        }
    }
}

/// Removes the fetch from [`Fetching`] however it ends.
struct Announced<'a> {
    fetching: &'a Fetching,
    revision: String,
}

impl Drop for Announced<'_> {
    fn drop(&mut self) {
        self.fetching.end(&self.revision);
    }
}

/// Why a chunked fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum ChunkedErrorKind {
    /// No peer has a manifest of the revision (they keep whole bundles only): fetch the
    /// bundle instead.
    #[error("no peer has its manifest: {}", super::client::attempts_text(.0))]
    NoManifest(Vec<(String, String)>),
    /// This host's chunk store failed.
    #[error("the chunk store: {0}")]
    Store(#[from] StoreError),
    /// The chunks did not make the revision (assembling or packing it failed).
    #[error("assembling the revision: {0}")]
    Assemble(#[from] AssembleError),
    /// Packing the assembled tree into the bundle store failed.
    #[error("keeping the revision's bundle: {0}")]
    Bundle(#[from] super::BlobError),
    /// This host's chunk store failed while a chunk was being stored.
    #[error("storing a chunk: {0}")]
    Local(StoreError),
    /// Every source was dropped (liars, failures) and none is left to ask.
    #[error("no source left to ask{}", dropped_text(.dropped))]
    Stuck { dropped: Vec<(String, String)> },
    /// No chunk was stored for the fetch's patience (none came from any source); what is
    /// missing, and the peers avoided, and why.
    #[error(
        "{missing} bytes still missing, none stored for {after:?} (from {sources} sources){}",
        dropped_text(.dropped)
    )]
    Deadline {
        missing: u64,
        after: Duration,
        sources: usize,
        dropped: Vec<(String, String)>,
    },
}

impl ChunkedErrorKind {
    /// Whether this host's own stores failed (its disk): fetching the bundle whole would
    /// not do better.
    pub fn is_local(&self) -> bool {
        match self {
            ChunkedErrorKind::Store(_) | ChunkedErrorKind::Local(_) => true,
            ChunkedErrorKind::Bundle(e) => e.is_local(),
            _ => false,
        }
    }
}

fn dropped_text(dropped: &[(String, String)]) -> String {
    if dropped.is_empty() {
        return String::new();
    }
    let list: Vec<String> = dropped
        .iter()
        .map(|(p, why)| format!("`{p}`: {why}"))
        .collect();
    format!("; avoided: {}", list.join("; "))
}

/// The swarm's part of an agent: see the module documentation.
#[derive(Clone)]
pub struct Swarmer {
    pub name: String,
    pub mesh: MeshHandle,
    pub bundles: Arc<BundleStore>,
    pub chunks: ChunkStore,
    pub fetching: Arc<Fetching>,
    pub config: Config,
    /// Ask peers (`true`), or the origins only (`transfer.from_peers`).
    pub from_peers: bool,
    pub download_rate: Arc<Rate>,
    /// The agent's data directory (releases, stores), and how many releases the lifecycle
    /// keeps besides the active one: what [`Swarmer::collect`] keeps.
    pub data_dir: std::path::PathBuf,
    pub keep_releases: usize,
    /// The chunk store's bound in bytes (`transfer.store_limit`).
    pub store_limit: Option<u64>,
}

/// What a collection removed.
#[derive(Debug, Default)]
pub struct Collection {
    pub bundles: usize,
    pub manifests: usize,
    pub chunks: crate::chunks::Collected,
}

/// What one request brought back to the driver.
enum Event {
    Have {
        peer: String,
        result: Result<Held, String>,
    },
    Chunk {
        batch: u64,
        index: usize,
        got: Got,
    },
    BatchEnd {
        batch: u64,
        ended: Ended,
    },
    /// This host's store failed: the fetch ends.
    Local(StoreError),
}

impl Swarmer {
    /// Fetches `revision` of `app` as chunks, from the peers gossip names, from `batch`
    /// (hosts fetching it at the same time: asked what they hold from the start) and from
    /// `origins` (asked last), until no chunk has been stored for `within` (a large
    /// revision on a slow link takes as long as it needs while it moves). Returns the
    /// stored bundle.
    pub async fn fetch(
        &self,
        app: &str,
        revision: &str,
        origins: &[String],
        batch: &[String],
        within: Duration,
    ) -> Result<Fetched, ChunkedErrorKind> {
        let started = Instant::now();
        let mut deadline = started + within;
        let id = RevisionId(revision.to_string());
        let (mut holders, mut fetchers) = self.sources(app, revision).await;
        let batch: Vec<String> = if self.from_peers {
            batch.iter().filter(|b| **b != self.name).cloned().collect()
        } else {
            Vec::new()
        };
        let origins: Vec<String> = origins
            .iter()
            .filter(|o| **o != self.name)
            .cloned()
            .collect();
        let (manifest, encoded) = match self.chunks.manifest(&id)? {
            Some(m) => {
                let bytes = postcard::to_stdvec(&m).expect("a manifest encodes");
                (m, bytes)
            }
            None => {
                // The origin last, here too.
                let mut order: Vec<String> = holders
                    .iter()
                    .chain(&fetchers)
                    .filter(|p| !origins.contains(p))
                    .cloned()
                    .collect();
                order.shuffle(&mut rand::rng());
                order.extend(origins.iter().cloned());
                self.manifest_from(&order, &id).await?
            }
        };
        let chunks = manifest.sorted_distinct();
        let index: HashMap<ChunkId, usize> = chunks
            .iter()
            .enumerate()
            .map(|(i, (c, _))| (*c, i))
            .collect();
        // Known before anything is read from the store: a collection from here on keeps
        // this revision's chunks.
        self.fetching
            .start(app, revision, Arc::new(encoded), chunks.len());
        let _announced = Announced {
            fetching: &self.fetching,
            revision: revision.to_string(),
        };
        let stored = {
            let (store, ids) = (self.chunks.clone(), chunks.clone());
            tokio::task::spawn_blocking(move || store.has_all(&ids))
                .await
                .unwrap_or_default()
        };
        let mut swarm = Swarm::new(
            &self.name,
            chunks.clone(),
            |c| stored.get(index[c]).copied().unwrap_or(false),
            self.config.clone(),
        );
        for (i, held) in swarm.held().iter().enumerate() {
            if *held {
                self.fetching.mark(revision, i);
            }
        }
        let reused = chunks
            .iter()
            .zip(swarm.held())
            .filter(|(_, h)| **h)
            .map(|((_, len), _)| u64::from(*len))
            .sum::<u64>();
        let now = std::time::Instant::now();
        for o in &origins {
            swarm.add_peer(now, o, Role::Origin);
        }
        for b in &batch {
            swarm.add_peer(now, b, Role::Fetcher);
        }
        let mut turns: Vec<String> = batch.clone();
        let mut stuck = 0;
        let mut refresh = tokio::time::interval(SOURCES_EVERY);
        refresh.tick().await;
        let (tx, mut rx) = mpsc::channel::<Event>(1024);
        let mut tasks = JoinSet::new();
        loop {
            let now = std::time::Instant::now();
            for h in &holders {
                swarm.add_peer(now, h, Role::Holder);
            }
            for f in &fetchers {
                swarm.add_peer(now, f, Role::Fetcher);
                if !turns.contains(f) {
                    turns.push(f.clone());
                }
            }
            swarm.set_fetchers(&turns);
            holders.clear();
            fetchers.clear();
            if swarm.is_done() {
                break;
            }
            while let Some(action) = swarm.poll_action(now) {
                self.start(&mut tasks, tx.clone(), action, revision, &chunks, &index);
            }
            let wake = swarm
                .poll_timeout()
                .map(Instant::from_std)
                .unwrap_or(deadline)
                .min(deadline);
            tokio::select! {
                event = rx.recv() => {
                    let Some(event) = event else { continue };
                    let now = std::time::Instant::now();
                    match event {
                        Event::Have { peer, result } => match result {
                            Ok(Held::All) => swarm.handle_have(now, &peer, Some(vec![true; chunks.len()])),
                            // Bits of another length: the swarm drops the peer.
                            Ok(Held::Some(bits)) => swarm.handle_have(
                                now,
                                &peer,
                                Some(unpack_bits(&bits, chunks.len()).unwrap_or_default()),
                            ),
                            Ok(Held::None) => swarm.handle_have(now, &peer, None),
                            Err(why) => swarm.handle_have_failed(now, &peer, &why),
                        },
                        Event::Chunk { batch, index, got } => {
                            if got == Got::Stored {
                                self.fetching.mark(revision, index);
                                deadline = Instant::now() + within;
                            }
                            swarm.handle_chunk(now, batch, &chunks[index].0, got);
                        }
                        Event::BatchEnd { batch, ended } => swarm.handle_batch_end(now, batch, ended),
                        Event::Local(why) => return Err(ChunkedErrorKind::Local(why)),
                    }
                }
                _ = tokio::time::sleep_until(wake) => {
                    let now = std::time::Instant::now();
                    swarm.handle_timeout(now);
                    if Instant::now() >= deadline {
                        let (_, missing) = swarm.progress();
                        let mut sources: std::collections::BTreeSet<String> =
                            swarm.bytes_from().into_keys().collect();
                        sources.extend(origins.iter().cloned());
                        return Err(ChunkedErrorKind::Deadline {
                            missing,
                            after: within,
                            sources: sources.len(),
                            dropped: swarm.dropped(),
                        });
                    }
                }
                // Finished requests are reaped as they end.
                Some(_) = tasks.join_next() => {}
                _ = refresh.tick() => {
                    // No source left for three rounds of gossip: no use waiting longer.
                    stuck = if swarm.is_stuck() { stuck + 1 } else { 0 };
                    if stuck >= 3 {
                        return Err(ChunkedErrorKind::Stuck {
                            dropped: swarm.dropped(),
                        });
                    }
                    (holders, fetchers) = self.sources(app, revision).await;
                }
            }
        }
        tasks.abort_all();
        let (fetched, _) = swarm.progress();
        let from = swarm.bytes_from();
        tracing::info!(
            app,
            revision,
            fetched,
            reused,
            ?from,
            "fetched a revision as chunks"
        );
        crate::http::metrics::Metrics::count_direction(
            &crate::http::metrics::metrics().bundle_bytes,
            "received",
            fetched,
        );
        let path = self.keep(app, &id, manifest).await?;
        Ok(Fetched {
            path,
            from: from
                .iter()
                .max_by_key(|(_, b)| **b)
                .map(|(p, _)| p.clone())
                .unwrap_or_default(),
            bytes: fetched,
            reused,
            sources: from,
        })
    }

    /// Removes what no kept revision needs (see `blobs::collect`): bundles beyond those of
    /// kept releases and the newest `keep_releases + 1`, then manifests and chunks of
    /// revisions no longer held or beyond the store's bound.
    pub async fn collect(&self) -> Result<Collection, ChunkedErrorKind> {
        let this = self.clone();
        blocking(move || this.collect_now()).await
    }

    fn collect_now(&self) -> Result<Collection, ChunkedErrorKind> {
        use crate::lifecycle::state::AppDir;
        use std::collections::BTreeSet;
        let mut done = Collection::default();
        for app in self.bundles.apps() {
            let record = crate::mesh::local::app_record(&AppDir::new(&self.data_dir, &app));
            let mut keep: BTreeSet<String> = record.held;
            keep.extend(record.revision);
            done.bundles += self
                .bundles
                .prune(&app, &keep, self.keep_releases + 1)?
                .len();
        }
        let records = crate::mesh::local::apps_on_disk(&self.data_dir);
        let active: BTreeSet<String> = records
            .values()
            .filter_map(|r| r.revision.clone())
            .collect();
        let held: BTreeSet<String> = records
            .values()
            .flat_map(|r| r.held.iter().cloned())
            .collect();
        let mut manifests = 0;
        done.chunks = self.chunks.collect(|| {
            // Under the store's gate: the fetches known now are every fetch that has put
            // a chunk.
            let mut candidates = Vec::new();
            for (revision, mtime) in self.chunks.manifests()? {
                // One that cannot be read does not stop the collection of the others.
                let manifest = match self.chunks.manifest(&revision) {
                    Ok(Some(m)) => m,
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!(revision = %revision.0, "a manifest left out of the collection: {e}");
                        continue;
                    }
                };
                candidates.push(super::collect::Candidate {
                    pinned: active.contains(&revision.0),
                    held: held.contains(&revision.0),
                    newness: mtime,
                    chunks: manifest.sorted_distinct(),
                    revision: revision.0,
                });
            }
            for (revision, encoded) in self.fetching.manifests() {
                if let Ok(m) = Manifest::decode(&encoded, &RevisionId(revision.clone())) {
                    candidates.push(super::collect::Candidate {
                        revision,
                        pinned: true,
                        held: true,
                        newness: u64::MAX,
                        chunks: m.sorted_distinct(),
                    });
                }
            }
            let plan = super::collect::plan(&candidates, self.store_limit);
            for c in &candidates {
                if !plan.revisions.contains(&c.revision) {
                    self.chunks
                        .remove_manifest(&RevisionId(c.revision.clone()))?;
                    manifests += 1;
                }
            }
            Ok((plan.chunks, plan.known))
        })?;
        done.manifests = manifests;
        Ok(done)
    }

    /// The agents gossip says hold `revision` of `app` (whole), and those fetching it.
    async fn sources(&self, app: &str, revision: &str) -> (Vec<String>, Vec<String>) {
        let (mut holders, mut fetchers) = (Vec::new(), Vec::new());
        if !self.from_peers {
            return (holders, fetchers);
        }
        if let Ok(hosts) = self.mesh.hosts().await {
            for h in hosts {
                if h.name == self.name
                    || !matches!(h.state, MemberState::Alive | MemberState::Suspect)
                {
                    continue;
                }
                let Some(record) = h.details.get(app) else {
                    continue;
                };
                if record.held.contains(revision) {
                    holders.push(h.name);
                } else if record.fetching.as_deref() == Some(revision) {
                    fetchers.push(h.name);
                }
            }
        }
        (holders, fetchers)
    }

    /// The revision's manifest from the first of `peers` that has one that verifies.
    async fn manifest_from(
        &self,
        peers: &[String],
        id: &RevisionId,
    ) -> Result<(Manifest, Vec<u8>), ChunkedErrorKind> {
        // Peers that were busy are asked again, a little later, for a while.
        let mut ask: Vec<String> = peers.to_vec();
        let mut attempts = Vec::new();
        for round in 0..MANIFEST_ROUNDS {
            let mut busy = Vec::new();
            for peer in ask {
                match self.manifest_of(&peer, id).await {
                    Ok(found) => return Ok(found),
                    Err(Refused::Busy) => busy.push(peer),
                    Err(Refused::Other(why)) => {
                        tracing::debug!(%peer, revision = %id.0, "no manifest from this peer: {why}");
                        attempts.push((peer, why));
                    }
                }
            }
            if busy.is_empty() {
                break;
            }
            if round + 1 == MANIFEST_ROUNDS {
                attempts.extend(busy.into_iter().map(|p| (p, "busy".to_string())));
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
            ask = busy;
        }
        Err(ChunkedErrorKind::NoManifest(attempts))
    }

    async fn manifest_of(
        &self,
        peer: &str,
        id: &RevisionId,
    ) -> Result<(Manifest, Vec<u8>), Refused> {
        let request = BlobRequest::Manifest {
            revision: id.0.clone(),
        };
        let (_send, mut recv) = ask(&self.mesh, peer, &request).await?;
        let len = match answer(&mut recv).await? {
            BlobAnswer::Sending { len } if len <= MAX_MANIFEST => len,
            BlobAnswer::Sending { len } => {
                return Err(Refused::Other(format!(
                    "a manifest of {len} bytes, over {MAX_MANIFEST}"
                )));
            }
            BlobAnswer::Busy => return Err(Refused::Busy),
            other => return Err(Refused::Other(unexpected(other))),
        };
        // Grown as the bytes come (the length is only the peer's word).
        let mut bytes = Vec::new();
        let mut limited = tokio::io::AsyncReadExt::take(&mut recv, len);
        let read = tokio::io::AsyncReadExt::read_to_end(&mut limited, &mut bytes);
        tokio::time::timeout(super::transfer_deadline(len), read)
            .await
            .map_err(|_| "the manifest did not arrive in time".to_string())?
            .map_err(|e| format!("reading the manifest: {e}"))?;
        let manifest = Manifest::decode(&bytes, id).map_err(|e| {
            tracing::warn!(%peer, "a peer sent a manifest that is not the revision's: {e}");
            format!("its manifest is not the revision's: {e}")
        })?;
        Ok((manifest, bytes))
    }

    /// Starts the request `action` names; its events come back on `tx`.
    fn start(
        &self,
        tasks: &mut JoinSet<()>,
        tx: mpsc::Sender<Event>,
        action: Action,
        revision: &str,
        chunks: &[(ChunkId, u32)],
        index: &HashMap<ChunkId, usize>,
    ) {
        let mesh = self.mesh.clone();
        match action {
            Action::AskHave { peer } => {
                let request = BlobRequest::Have {
                    revision: revision.to_string(),
                };
                tasks.spawn(async move {
                    let result = have(&mesh, &peer, &request).await;
                    let _ = tx.send(Event::Have { peer, result }).await;
                });
            }
            Action::Fetch {
                batch,
                peer,
                chunks: asked,
            } => {
                let store = self.chunks.clone();
                let rate = self.download_rate.clone();
                let asked: Vec<(usize, ChunkId, u32)> =
                    asked.iter().map(|(c, len)| (index[c], *c, *len)).collect();
                debug_assert!(asked.iter().all(|(i, _, _)| *i < chunks.len()));
                tasks.spawn(async move {
                    let result = fetch_batch(&mesh, &store, &rate, &peer, batch, &asked, &tx).await;
                    let ended = match result {
                        Ok(()) => Ended::Done,
                        Err(Failure::Busy) => Ended::Busy,
                        Err(Failure::Other(why)) => Ended::Failed(why),
                    };
                    let _ = tx.send(Event::BatchEnd { batch, ended }).await;
                });
            }
        }
    }

    /// Assembles the revision from the store into a scratch directory, packs it into the
    /// bundle store and keeps the manifest as complete.
    async fn keep(
        &self,
        app: &str,
        id: &RevisionId,
        manifest: Manifest,
    ) -> Result<std::path::PathBuf, ChunkedErrorKind> {
        let (bundles, chunks, app, id) = (
            self.bundles.clone(),
            self.chunks.clone(),
            app.to_string(),
            id.clone(),
        );
        blocking(move || {
            let work = bundles.scratch_dir("assemble-")?;
            let tree = work.path().join("tree");
            std::fs::create_dir(&tree).map_err(|e| AssembleError::Io {
                path: ".".into(),
                source: e,
            })?;
            manifest.assemble(&id, &chunks, &tree)?;
            let path = bundles.pack_release(&app, &id.0, &tree)?;
            chunks.put_manifest(&manifest)?;
            Ok(path)
        })
        .await
    }
}

/// Runs `work` on a blocking thread; a panic there is the chunk store's failure.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ChunkedErrorKind> + Send + 'static,
) -> Result<T, ChunkedErrorKind> {
    tokio::task::spawn_blocking(work).await.map_err(|e| {
        ChunkedErrorKind::Store(StoreError::Io {
            path: "chunks".into(),
            source: std::io::Error::other(e.to_string()),
        })
    })?
}

/// A peer's answer to `Have`.
enum Held {
    All,
    /// Packed bits, one per chunk.
    Some(Vec<u8>),
    None,
}

fn unexpected(answer: BlobAnswer) -> String {
    match answer {
        BlobAnswer::Missing => "does not hold it".into(),
        BlobAnswer::Busy => "busy".into(),
        BlobAnswer::Error(why) => format!("refused: {}", peer_text(&why)),
        other => format!("an unexpected answer: {other:?}"),
    }
}

/// Opens a stream to `peer` and sends `request`.
async fn ask(
    mesh: &MeshHandle,
    peer: &str,
    request: &BlobRequest,
) -> Result<(quinn::SendStream, quinn::RecvStream), String> {
    let open = tokio::time::timeout(2 * STREAM_DEADLINE, mesh.open_bi(peer, Protocol::Blobs));
    let (mut send, recv) = open
        .await
        .map_err(|_| format!("no stream within {:?}", 2 * STREAM_DEADLINE))?
        .map_err(|e| e.to_string())?;
    tokio::time::timeout(STREAM_DEADLINE, write_frame(&mut send, request))
        .await
        .map_err(|_| format!("the request not taken within {STREAM_DEADLINE:?}"))?
        .map_err(|e| format!("sending the request: {e}"))?;
    let _ = send.finish();
    Ok((send, recv))
}

/// Reads one answer frame within the stream deadline.
async fn answer(recv: &mut quinn::RecvStream) -> Result<BlobAnswer, String> {
    tokio::time::timeout(STREAM_DEADLINE, read_frame::<BlobAnswer>(recv))
        .await
        .map_err(|_| format!("no answer within {STREAM_DEADLINE:?}"))?
        .map_err(|e| format!("reading the answer: {e}"))
}

/// Asks `peer` which chunks it holds.
async fn have(mesh: &MeshHandle, peer: &str, request: &BlobRequest) -> Result<Held, String> {
    let (_send, mut recv) = ask(mesh, peer, request).await?;
    match answer(&mut recv).await? {
        BlobAnswer::Have(None) => Ok(Held::All),
        BlobAnswer::Have(Some(bits)) => Ok(Held::Some(bits)),
        BlobAnswer::Missing => Ok(Held::None),
        other => Err(unexpected(other)),
    }
}

/// Asks `peer` for the chunks `asked` (the `indices`-th of the revision), checks each
/// against its name and stores it, telling the driver of each.
/// Why a batch broke off.
enum Failure {
    /// The peer is answering all it may.
    Busy,
    Other(String),
}

impl From<String> for Failure {
    fn from(why: String) -> Failure {
        Failure::Other(why)
    }
}

async fn fetch_batch(
    mesh: &MeshHandle,
    store: &ChunkStore,
    rate: &Rate,
    peer: &str,
    batch: u64,
    asked: &[(usize, ChunkId, u32)],
    tx: &mpsc::Sender<Event>,
) -> Result<(), Failure> {
    let request = BlobRequest::Chunks {
        ids: asked.iter().map(|(_, c, _)| *c).collect(),
    };
    let (_send, mut recv) = ask(mesh, peer, &request).await?;
    for &(index, ref id, ref len) in asked {
        let got = match answer(&mut recv).await? {
            BlobAnswer::Chunk { len: sent } if sent == *len => {
                rate.take(u64::from(sent)).await;
                let mut bytes = vec![0u8; sent as usize];
                tokio::time::timeout(STREAM_DEADLINE, recv.read_exact(&mut bytes))
                    .await
                    .map_err(|_| format!("chunk {id} did not arrive within {STREAM_DEADLINE:?}"))?
                    .map_err(|e| format!("reading chunk {id}: {e}"))?;
                let (store, id) = (store.clone(), *id);
                let put = tokio::task::spawn_blocking(move || store.put(&id, &bytes))
                    .await
                    .map_err(|e| e.to_string())?;
                match put {
                    Ok(_) => Got::Stored,
                    Err(StoreError::Corrupt { .. } | StoreError::TooLarge { .. }) => Got::Corrupt,
                    Err(e) => {
                        let _ = tx.send(Event::Local(e)).await;
                        return Err(Failure::Other(format!("storing chunk {id} failed here")));
                    }
                }
            }
            // A chunk of another length than its name's is not that chunk.
            BlobAnswer::Chunk { .. } => Got::Corrupt,
            BlobAnswer::NoChunk => Got::Missing,
            BlobAnswer::Busy => return Err(Failure::Busy),
            other => return Err(Failure::Other(unexpected(other))),
        };
        let corrupt = got == Got::Corrupt;
        let _ = tx.send(Event::Chunk { batch, index, got }).await;
        if corrupt {
            return Err(Failure::Other(
                "it sent a chunk that is not the one asked for".into(),
            ));
        }
    }
    Ok(())
}
