//! The fetcher's side: gets a revision's bundle from one of the peers that hold it.

use std::path::PathBuf;
use std::time::Instant;

use rand::seq::SliceRandom;

use super::{
    BlobAnswer, BlobError, BlobRequest, BundleStore, MAX_ATTEMPTS, PACK_DEADLINE, peer_text,
    valid_app, valid_revision,
};
use crate::mesh::frame::{Protocol, read_frame, write_frame};
use crate::mesh::node::{MeshHandle, STREAM_DEADLINE};

/// A bundle fetched (or found in the store).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetched {
    /// The stored bundle, its revision id checked.
    pub path: PathBuf,
    /// The holder it came from; empty when the store held it already.
    pub from: String,
    /// Bytes received (0 when the store held it already).
    pub bytes: u64,
    /// Bytes of the revision this host held already (chunks of earlier revisions).
    pub reused: u64,
    /// Bytes received from each peer (a swarm fetch's sources).
    pub sources: std::collections::BTreeMap<String, u64>,
}

/// A fetch failed; [`FetchErrorKind`] says why.
#[derive(Debug, thiserror::Error)]
#[error("fetching revision {revision} of `{app}`: {kind}")]
pub struct FetchError {
    pub app: String,
    pub revision: String,
    pub kind: FetchErrorKind,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchErrorKind {
    /// The application name or the revision id is not valid.
    #[error("{0}")]
    Invalid(BlobError),
    /// No holder was named.
    #[error("no peer is known to hold it")]
    NoHolders,
    /// Every holder tried failed: each one's name and why.
    /// `retry` when some holder failed for a reason that may pass (busy, not holding it
    /// yet, unreachable), rather than by serving bytes that are not the revision.
    #[error("every holder tried failed: {}", attempts_text(.attempts))]
    AllFailed {
        attempts: Vec<(String, String)>,
        retry: bool,
    },
    /// Fetching it as chunks failed.
    #[error("{0}")]
    Chunks(super::chunked::ChunkedErrorKind),
    /// This host's own store failed (while receiving from `holder`); another holder would
    /// not do better.
    #[error("receiving from `{holder}`: {error}")]
    Store { holder: String, error: BlobError },
}

pub(super) fn attempts_text(attempts: &[(String, String)]) -> String {
    attempts
        .iter()
        .map(|(holder, why)| format!("`{holder}`: {why}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Fetches the bundle of `revision` of `app` from one of `holders` (agent names) into
/// `store`, and returns where it is. A revision already stored is returned at once.
/// Otherwise the holders are tried in a random order (at most [`MAX_ATTEMPTS`] of them),
/// each over its own [`Protocol::Blobs`] stream, until one sends a bundle whose revision id
/// is `revision`; any failure moves on to the next. See the module documentation.
pub async fn fetch(
    mesh: &MeshHandle,
    store: &BundleStore,
    holders: &[String],
    app: &str,
    revision: &str,
) -> Result<Fetched, FetchError> {
    let fail = |kind| FetchError {
        app: peer_text(app),
        revision: peer_text(revision),
        kind,
    };
    valid_app(app)
        .and_then(|()| valid_revision(revision))
        .map_err(|e| fail(FetchErrorKind::Invalid(e)))?;
    if let Some(path) = store.path(app, revision) {
        return Ok(Fetched {
            path,
            from: String::new(),
            bytes: 0,
            reused: 0,
            sources: Default::default(),
        });
    }
    let mut order: Vec<&String> = holders.iter().filter(|h| !h.is_empty()).collect();
    order.sort();
    order.dedup();
    if order.is_empty() {
        return Err(fail(FetchErrorKind::NoHolders));
    }
    // A random order spreads fetchers over the holders: no holder serves everyone.
    order.shuffle(&mut rand::rng());
    order.truncate(MAX_ATTEMPTS);
    let mut attempts = Vec::new();
    let mut retry = false;
    for holder in order {
        match fetch_from(mesh, store, holder, app, revision).await {
            Ok(bytes) => match store.path(app, revision) {
                Some(path) => {
                    tracing::debug!(app, revision, %holder, bytes, "fetched a bundle");
                    crate::http::metrics::Metrics::count_direction(
                        &crate::http::metrics::metrics().bundle_bytes,
                        "received",
                        bytes,
                    );
                    return Ok(Fetched {
                        path,
                        from: holder.clone(),
                        bytes,
                        reused: 0,
                        sources: [(holder.clone(), bytes)].into(),
                    });
                }
                None => {
                    retry = true;
                    attempts.push((holder.clone(), "the bundle vanished once stored".into()))
                }
            },
            Err(Attempt::Local(error)) => {
                return Err(fail(FetchErrorKind::Store {
                    holder: holder.clone(),
                    error,
                }));
            }
            Err(Attempt::Bad(why)) => {
                tracing::warn!(app, revision, %holder, "a holder served something else: {why}");
                attempts.push((holder.clone(), why));
            }
            Err(Attempt::Failed { why, expected }) => {
                retry = true;
                if expected {
                    tracing::debug!(app, revision, %holder, "no bundle from this holder: {why}");
                } else {
                    tracing::warn!(app, revision, %holder, "fetching a bundle failed: {why}");
                }
                attempts.push((holder.clone(), why));
            }
        }
    }
    Err(fail(FetchErrorKind::AllFailed { attempts, retry }))
}

/// Why one holder gave nothing.
enum Attempt {
    /// This host's store failed.
    Local(BlobError),
    /// The holder failed or refused; `expected` for the ordinary refusals (busy, missing).
    Failed { why: String, expected: bool },
    /// The holder served bytes that are not the revision asked for (or not a bundle).
    Bad(String),
}

fn failed(why: impl Into<String>) -> Attempt {
    Attempt::Failed {
        why: why.into(),
        expected: false,
    }
}

/// Fetches from one holder; the bytes received.
async fn fetch_from(
    mesh: &MeshHandle,
    store: &BundleStore,
    holder: &str,
    app: &str,
    revision: &str,
) -> Result<u64, Attempt> {
    // `open_bi` has deadlines of its own (the dial's, the stream's); this one bounds both.
    let open = tokio::time::timeout(2 * STREAM_DEADLINE, mesh.open_bi(holder, Protocol::Blobs));
    let (mut send, mut recv) = open
        .await
        .map_err(|_| failed(format!("no stream within {:?}", 2 * STREAM_DEADLINE)))?
        .map_err(|e| failed(e.to_string()))?;
    let request = BlobRequest::Fetch {
        app: app.to_string(),
        revision: revision.to_string(),
    };
    tokio::time::timeout(STREAM_DEADLINE, write_frame(&mut send, &request))
        .await
        .map_err(|_| failed(format!("the request not taken within {STREAM_DEADLINE:?}")))?
        .map_err(|e| failed(format!("sending the request: {e}")))?;
    let _ = send.finish();
    let asked = Instant::now();
    let len = loop {
        let answer = tokio::time::timeout(STREAM_DEADLINE, read_frame::<BlobAnswer>(&mut recv))
            .await
            .map_err(|_| failed(format!("no answer within {STREAM_DEADLINE:?}")))?
            .map_err(|e| failed(format!("reading the answer: {e}")))?;
        match answer {
            BlobAnswer::Sending { len } => break len,
            BlobAnswer::Packing if asked.elapsed() <= PACK_DEADLINE + STREAM_DEADLINE => {}
            BlobAnswer::Packing => {
                return Err(failed(format!("still packing after {PACK_DEADLINE:?}")));
            }
            BlobAnswer::Missing => {
                return Err(Attempt::Failed {
                    why: "does not hold it".into(),
                    expected: true,
                });
            }
            BlobAnswer::Busy => {
                return Err(Attempt::Failed {
                    why: "busy sending to others".into(),
                    expected: true,
                });
            }
            BlobAnswer::Error(why) => return Err(failed(format!("refused: {}", peer_text(&why)))),
            other => {
                return Err(Attempt::Bad(format!(
                    "an answer to another request: {other:?}"
                )));
            }
        }
    };
    match store.receive(app, len, &mut recv, Some(revision)).await {
        Ok(_) => {}
        Err(e) if e.is_local() => return Err(Attempt::Local(e)),
        Err(e @ (BlobError::WrongRevision { .. } | BlobError::NotABundle(_))) => {
            return Err(Attempt::Bad(e.to_string()));
        }
        Err(e) => return Err(failed(e.to_string())),
    }
    // Nothing follows the bytes: read the end of the stream, so it closes cleanly.
    let mut rest = [0u8; 1];
    let _ = tokio::time::timeout(STREAM_DEADLINE, recv.read(&mut rest)).await;
    Ok(len)
}
