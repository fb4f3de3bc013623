//! The holder's side: answers [`Protocol::Blobs`](crate::mesh::frame::Protocol::Blobs)
//! streams from other agents with the bundle they ask for.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::rate::Rate;
use super::{
    BlobAnswer, BlobRequest, BundleStore, CopyError, Fetching, KEEPALIVE, MAX_BATCH, MAX_BUNDLE,
    MAX_SENDING, PACK_DEADLINE, copy_exact, peer_text, transfer_deadline, valid_app,
    valid_revision,
};
use crate::bundle::RevisionId;
use crate::chunks::{ChunkId, ChunkStore, StoreError};
use crate::identity::Role;
use crate::lifecycle::state::AppDir;
use crate::mesh::frame::{read_frame, write_frame};
use crate::mesh::node::{InboundStream, PeerInfo, STREAM_DEADLINE, Streams};

/// One (application, revision) being packed, and the lock later requests for it wait on.
type PackLocks = Mutex<HashMap<(String, String), Arc<tokio::sync::Mutex<()>>>>;

struct Holder {
    store: Arc<BundleStore>,
    data_dir: PathBuf,
    sending: Arc<Semaphore>,
    packing: PackLocks,
    chunks: ChunkStore,
    fetching: Arc<Fetching>,
    /// Chunk requests answered at once.
    uploads: Arc<Semaphore>,
    upload_rate: Arc<Rate>,
}

/// What a holder serves from, and its bounds.
pub struct Serving {
    /// Whole bundles, and where the lifecycle's release directories are (`data_dir`).
    pub bundles: Arc<BundleStore>,
    pub data_dir: PathBuf,
    /// Manifests and chunks, and the fetches under way (served while they go on).
    pub chunks: ChunkStore,
    pub fetching: Arc<Fetching>,
    /// Chunk requests answered at once (`transfer.max_uploads`).
    pub max_uploads: usize,
    /// Bytes per second of chunks sent (`transfer.upload_rate`).
    pub upload_rate: Arc<Rate>,
}

impl Serving {
    /// Serving from the stores under `data_dir`, with the default bounds and no rate.
    pub fn new(bundles: Arc<BundleStore>, data_dir: &Path) -> Result<Serving, StoreError> {
        Ok(Serving {
            bundles,
            data_dir: data_dir.to_path_buf(),
            chunks: ChunkStore::open(data_dir)?,
            fetching: Arc::default(),
            max_uploads: crate::config::Transfer::default().max_uploads,
            upload_rate: Arc::new(Rate::new(None)),
        })
    }
}

/// Answers other agents' requests until the mesh shuts down: bundles from the bundle
/// store or the release directories (packed on demand), manifests and chunks from the
/// chunk store and the fetches under way. See the module documentation for the protocol
/// and its bounds.
pub async fn serve(serving: Serving, mut streams: Streams) {
    let holder = Arc::new(Holder {
        store: serving.bundles,
        data_dir: serving.data_dir,
        sending: Arc::new(Semaphore::new(MAX_SENDING)),
        packing: Mutex::new(HashMap::new()),
        chunks: serving.chunks,
        fetching: serving.fetching,
        uploads: Arc::new(Semaphore::new(serving.max_uploads.max(1))),
        upload_rate: serving.upload_rate,
    });
    while let Some(inbound) = streams.next().await {
        let (send, recv) = match inbound.stream {
            InboundStream::Bi(send, recv) => (send, recv),
            InboundStream::Uni(mut recv) => {
                let _ = recv.stop(1u32.into());
                continue;
            }
        };
        let holder = holder.clone();
        tokio::spawn(async move {
            holder.answer(inbound.peer, send, recv, inbound.share).await;
        });
    }
}

/// Writes one answer frame within the stream deadline.
async fn say(send: &mut quinn::SendStream, answer: &BlobAnswer) -> Result<(), String> {
    match tokio::time::timeout(STREAM_DEADLINE, write_frame(send, answer)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("the fetcher went away: {e}")),
        Err(_) => Err(format!("an answer not taken within {STREAM_DEADLINE:?}")),
    }
}

/// What became of one request.
enum Outcome {
    Sent(u64),
    /// Answered without bytes (missing, busy, refused); the answer says why.
    Answered(BlobAnswer),
    /// Failed after the bytes began (the stream is reset), or the fetcher went away.
    Broken(String),
}

impl Holder {
    async fn answer(
        &self,
        peer: PeerInfo,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        share: OwnedSemaphorePermit,
    ) {
        if peer.role != Role::Agent {
            drop(share);
            let _ = recv.stop(1u32.into());
            let why = format!(
                "refused: `{}` is not an agent; bundles are sent to agents only",
                peer_text(&peer.name)
            );
            tracing::debug!(peer = %peer.name, "{why}");
            let _ = say(&mut send, &BlobAnswer::Error(why)).await;
            let _ = send.finish();
            return;
        }
        let request =
            tokio::time::timeout(STREAM_DEADLINE, read_frame::<BlobRequest>(&mut recv)).await;
        // The request is read: the connection's share of readers goes back (a send may
        // last hours; the sending permits bound it instead).
        drop(share);
        let outcome = match request {
            Ok(Ok(BlobRequest::Fetch { app, revision })) => {
                self.send_bundle(&app, &revision, &mut send).await
            }
            Ok(Ok(BlobRequest::Manifest { revision })) => {
                self.send_manifest(&revision, &mut send).await
            }
            Ok(Ok(BlobRequest::Have { revision })) => Outcome::Answered(self.have(&revision).await),
            Ok(Ok(BlobRequest::Chunks { ids })) => self.send_chunks(&ids, &mut send).await,
            Ok(Err(e)) => Outcome::Answered(BlobAnswer::Error(format!("malformed request: {e}"))),
            Err(_) => Outcome::Answered(BlobAnswer::Error(format!(
                "the request did not arrive whole within {STREAM_DEADLINE:?}"
            ))),
        };
        match outcome {
            Outcome::Sent(bytes) => {
                tracing::debug!(peer = %peer.name, bytes, "sent a bundle");
                crate::http::metrics::Metrics::count_direction(
                    &crate::http::metrics::metrics().bundle_bytes,
                    "sent",
                    bytes,
                );
            }
            Outcome::Answered(answer) => {
                tracing::debug!(peer = %peer.name, ?answer, "answered a bundle request");
                let _ = say(&mut send, &answer).await;
                let _ = send.finish();
            }
            Outcome::Broken(why) => {
                tracing::warn!(peer = %peer.name, "sending a bundle failed: {why}");
                let _ = send.reset(1u32.into());
            }
        }
    }

    /// What `Have` is answered: the bits of a fetch under way, all for a revision whose
    /// manifest is kept complete (a look at the file, off the runtime's threads), or
    /// `Missing`.
    async fn have(&self, revision: &str) -> BlobAnswer {
        if valid_revision(revision).is_err() {
            return BlobAnswer::Error("not a revision id".into());
        }
        if let Some(bits) = self.fetching.have(revision) {
            return BlobAnswer::Have(Some(bits));
        }
        let (chunks, revision) = (self.chunks.clone(), RevisionId(revision.to_string()));
        match tokio::task::spawn_blocking(move || chunks.has_manifest(&revision)).await {
            Ok(true) => BlobAnswer::Have(None),
            _ => BlobAnswer::Missing,
        }
    }

    /// Sends a manifest, as one of the [`MAX_SENDING`] sends at once (`Busy` beyond: it
    /// may be 64 MiB), read off the runtime's threads.
    async fn send_manifest(&self, revision: &str, send: &mut quinn::SendStream) -> Outcome {
        if valid_revision(revision).is_err() {
            return Outcome::Answered(BlobAnswer::Error("not a revision id".into()));
        }
        let Ok(_permit) = self.sending.clone().try_acquire_owned() else {
            return Outcome::Answered(BlobAnswer::Busy);
        };
        let bytes = match self.fetching.manifest(revision) {
            Some(bytes) => bytes,
            None => {
                let (chunks, rev) = (self.chunks.clone(), RevisionId(revision.to_string()));
                match tokio::task::spawn_blocking(move || chunks.manifest_bytes(&rev)).await {
                    Ok(Ok(Some(bytes))) => Arc::new(bytes),
                    Ok(Ok(None)) => return Outcome::Answered(BlobAnswer::Missing),
                    Ok(Err(e)) => {
                        tracing::warn!("reading a manifest to send it: {e}");
                        return Outcome::Answered(BlobAnswer::Missing);
                    }
                    Err(e) => return Outcome::Broken(e.to_string()),
                }
            }
        };
        let len = bytes.len() as u64;
        if let Err(why) = say(send, &BlobAnswer::Sending { len }).await {
            return Outcome::Broken(why);
        }
        let deadline = transfer_deadline(len);
        match tokio::time::timeout(deadline, send.write_all(&bytes)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Outcome::Broken(format!("the fetcher went away: {e}")),
            Err(_) => return Outcome::Broken(format!("not sent within {deadline:?}")),
        }
        let _ = send.finish();
        Outcome::Sent(0)
    }

    /// Sends the chunks asked for, in order, each checked against its name as it is read;
    /// `Busy` at once when the uploads allowed are all under way.
    async fn send_chunks(&self, ids: &[ChunkId], send: &mut quinn::SendStream) -> Outcome {
        if ids.is_empty() || ids.len() > MAX_BATCH {
            return Outcome::Answered(BlobAnswer::Error(format!(
                "{} chunks asked for; 1 to {MAX_BATCH} a request",
                ids.len()
            )));
        }
        let Ok(_permit) = self.uploads.clone().try_acquire_owned() else {
            return Outcome::Answered(BlobAnswer::Busy);
        };
        let mut sent = 0u64;
        for id in ids {
            let (chunks, id) = (self.chunks.clone(), *id);
            let read = tokio::task::spawn_blocking(move || chunks.get(&id)).await;
            let bytes = match read {
                Ok(Ok(Some(bytes))) => bytes,
                Ok(Ok(None)) => {
                    if let Err(why) = say(send, &BlobAnswer::NoChunk).await {
                        return Outcome::Broken(why);
                    }
                    continue;
                }
                Ok(Err(e)) => {
                    tracing::warn!("reading a chunk to send it: {e}");
                    if let Err(why) = say(send, &BlobAnswer::NoChunk).await {
                        return Outcome::Broken(why);
                    }
                    continue;
                }
                Err(e) => return Outcome::Broken(e.to_string()),
            };
            let mut bytes = bytes;
            crate::faults::corrupt_chunk(&mut bytes);
            let len = bytes.len() as u32;
            self.upload_rate.take(u64::from(len)).await;
            if let Err(why) = say(send, &BlobAnswer::Chunk { len }).await {
                return Outcome::Broken(why);
            }
            match tokio::time::timeout(STREAM_DEADLINE, send.write_all(&bytes)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Outcome::Broken(format!("the fetcher went away: {e}")),
                Err(_) => {
                    return Outcome::Broken(format!(
                        "a chunk not taken within {STREAM_DEADLINE:?}"
                    ));
                }
            }
            sent += u64::from(len);
            self.store.count_served(u64::from(len));
            // Counted as each goes: a fetcher may break off after any chunk.
            crate::http::metrics::Metrics::count_direction(
                &crate::http::metrics::metrics().bundle_bytes,
                "sent",
                u64::from(len),
            );
        }
        let _ = send.finish();
        tracing::debug!(chunks = ids.len(), bytes = sent, "sent chunks");
        Outcome::Sent(0)
    }

    async fn send_bundle(
        &self,
        app: &str,
        revision: &str,
        send: &mut quinn::SendStream,
    ) -> Outcome {
        if let Err(e) = valid_app(app).and_then(|()| valid_revision(revision)) {
            return Outcome::Answered(BlobAnswer::Error(e.to_string()));
        }
        let stored = self.store.path(app, revision);
        let release = match &stored {
            Some(_) => None,
            None => match release_dir(&self.data_dir, app, revision) {
                Some(dir) => Some(dir),
                None => return Outcome::Answered(BlobAnswer::Missing),
            },
        };
        let Ok(_permit) = self.sending.clone().try_acquire_owned() else {
            return Outcome::Answered(BlobAnswer::Busy);
        };
        let path = match (stored, release) {
            (Some(path), _) => path,
            (None, Some(release)) => match self.pack(app, revision, release, send).await {
                Ok(path) => path,
                Err(Ok(why)) => return Outcome::Answered(BlobAnswer::Error(why)),
                Err(Err(broken)) => return Outcome::Broken(broken),
            },
            (None, None) => unreachable!("answered Missing above"),
        };
        let mut file = match tokio::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(&path)
            .await
        {
            Ok(file) => file,
            Err(e) => {
                tracing::warn!("opening the stored bundle {}: {e}", path.display());
                return Outcome::Answered(BlobAnswer::Error(
                    "the stored bundle cannot be read".into(),
                ));
            }
        };
        let len = match file.metadata().await {
            Ok(m) if m.is_file() && m.len() <= MAX_BUNDLE => m.len(),
            Ok(m) => {
                tracing::warn!(
                    "the stored bundle {} is not a file of at most {MAX_BUNDLE} bytes ({} bytes)",
                    path.display(),
                    m.len()
                );
                return Outcome::Answered(BlobAnswer::Error(
                    "the stored bundle cannot be sent".into(),
                ));
            }
            Err(e) => {
                tracing::warn!("reading the stored bundle {}: {e}", path.display());
                return Outcome::Answered(BlobAnswer::Error(
                    "the stored bundle cannot be read".into(),
                ));
            }
        };
        if let Err(why) = say(send, &BlobAnswer::Sending { len }).await {
            return Outcome::Broken(why);
        }
        let deadline = transfer_deadline(len);
        let copied = tokio::time::timeout(
            deadline,
            copy_exact(&mut file, send, len, |n| self.store.count_served(n)),
        )
        .await;
        let why = match copied {
            Ok(Ok(())) => None,
            Err(_) => Some(format!("not sent within {deadline:?}")),
            Ok(Err(CopyError::Read(e))) => Some(format!("reading {}: {e}", path.display())),
            Ok(Err(CopyError::Truncated { got })) => Some(format!(
                "{} ended after {got} of {len} bytes",
                path.display()
            )),
            Ok(Err(CopyError::Write(e))) => Some(format!("the fetcher went away: {e}")),
            Ok(Err(CopyError::Stalled { reading })) => Some(if reading {
                format!("reading {} stalled", path.display())
            } else {
                "the fetcher stopped taking bytes".into()
            }),
        };
        if let Some(why) = why {
            return Outcome::Broken(why);
        }
        let _ = send.finish();
        // Hold the sending permit until the fetcher has the bytes (or a deadline).
        let _ = tokio::time::timeout(STREAM_DEADLINE, send.stopped()).await;
        Outcome::Sent(len)
    }

    /// Packs the release into the store, saying `Packing` every [`KEEPALIVE`] meanwhile.
    /// One pack per revision at a time; a request that finds one under way waits for it.
    /// `Err(Ok(why))` is to be answered, `Err(Err(why))` means the stream is broken.
    async fn pack(
        &self,
        app: &str,
        revision: &str,
        release: PathBuf,
        send: &mut quinn::SendStream,
    ) -> Result<PathBuf, Result<String, String>> {
        let key = (app.to_string(), revision.to_string());
        let lock = self
            .packing
            .lock()
            .expect("pack locks")
            .entry(key.clone())
            .or_default()
            .clone();
        let work = async {
            let _turn = lock.lock().await;
            if let Some(path) = self.store.path(app, revision) {
                return Ok(path);
            }
            let (store, app, revision) =
                (self.store.clone(), app.to_string(), revision.to_string());
            tokio::task::spawn_blocking(move || store.pack_release(&app, &revision, &release))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| {
                    tracing::warn!("packing a release to send it: {e}");
                    format!("the release could not be packed: {e}")
                })
        };
        tokio::pin!(work);
        let deadline = tokio::time::sleep(PACK_DEADLINE);
        tokio::pin!(deadline);
        let mut keepalive = tokio::time::interval(KEEPALIVE);
        let outcome = loop {
            tokio::select! {
                done = &mut work => break done.map_err(Ok),
                _ = &mut deadline => {
                    break Err(Ok(format!("packing the release took longer than {PACK_DEADLINE:?}")));
                }
                _ = keepalive.tick() => {
                    if let Err(why) = say(send, &BlobAnswer::Packing).await {
                        break Err(Err(why));
                    }
                }
            }
        };
        let mut locks = self.packing.lock().expect("pack locks");
        if locks.get(&key).is_some_and(|l| Arc::ptr_eq(l, &lock)) {
            locks.remove(&key);
        }
        outcome
    }
}

/// The lifecycle's release directory of `revision` of `app`, if it is there: directories
/// all the way, no link followed.
fn release_dir(data_dir: &Path, app: &str, revision: &str) -> Option<PathBuf> {
    let app_dir = AppDir::new(data_dir, app);
    let release = app_dir.release(&RevisionId(revision.to_string()));
    let real = |p: &Path| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir());
    (real(&app_dir.root) && real(&app_dir.releases()) && real(&release)).then_some(release)
}
