//! Bundles between agents: a host that is to deploy a revision fetches its bundle from a
//! peer that holds it (gossip says who: `AppRecord::held`), and checks the revision id of
//! what arrived before keeping it. Whole-bundle transfer today; chunked, many-peer transfer
//! (design.md, "Bundles travel peer to peer") is to grow here as new request kinds on the
//! same protocol and a chunk store beside [`BundleStore`]. See decision 0011.
//!
//! - **The store** ([`BundleStore`]) keeps bundles as `data_dir/bundles/<app>/<revision>.bundle`,
//!   each written whole (a temporary file in `bundles/.tmp/`, fsynced, checked, renamed).
//!   [`BundleStore::receive`] is the one way in: it refuses a length over [`MAX_BUNDLE`]
//!   before reading a byte, reads exactly that many bytes within [`transfer_deadline`] (and
//!   [`STALL`] without progress), unpacks them under the hostile-bundle rules of
//!   [`crate::bundle::open`] into a scratch directory to learn their revision id, refuses
//!   an id other than the one expected, and only then renames the file into place. Names are
//!   checked (an application name as the lifecycle's, a revision as 64 lowercase hex
//!   digits), directories are created 0700 and opened without following links, and files
//!   are opened with `O_NOFOLLOW`.
//! - **The protocol** ([`Protocol::Blobs`](crate::mesh::frame::Protocol::Blobs)), one
//!   bidirectional stream per transfer. The fetcher sends one [`BlobRequest`] frame and
//!   finishes its side. The holder answers with [`BlobAnswer`] frames: `Packing` every
//!   [`KEEPALIVE`] while it packs a release directory, then `Sending { len }` followed by
//!   exactly `len` raw bytes (not frames: frames are bounded to 1 MiB) and the end of the
//!   stream; or `Missing`, `Busy` or `Error(why)`.
//! - **The holder** ([`serve`]) answers agents only (an operator or anything else gets an
//!   `Error`), reads the request within
//!   [`STREAM_DEADLINE`](crate::mesh::node::STREAM_DEADLINE), and sends the stored bundle,
//!   or packs the release directory the lifecycle keeps (`apps/<app>/releases/<id>/`) into
//!   the store first (once per revision; later requests find it stored). At most
//!   [`MAX_SENDING`] sends (packing included) run at once; beyond that the answer is `Busy`
//!   at once, so the fetcher goes to another holder. A send must end within
//!   [`transfer_deadline`] of its length, a pack within [`PACK_DEADLINE`].
//! - **The fetcher** ([`fetch`]) asks the holders in a random order (so that many fetchers
//!   spread over them), at most [`MAX_ATTEMPTS`] of them, and goes to the next on any
//!   failure: refusal, `Busy`, `Missing`, bytes of another revision, a deadline, a broken
//!   stream. A revision already in the store is returned without a byte sent. A failure of
//!   its own store (disk full, an unsafe directory) ends the fetch at once: another holder
//!   would not fix it.
//!
//! A holder cannot make a fetcher keep anything but the revision it asked for: the id is
//! computed from the unpacked content, by the fetcher.

pub mod chunked;
mod client;
pub mod collect;
pub mod rate;
mod server;
mod store;
pub mod swarm;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub use chunked::{Fetching, Swarmer};
pub use client::{FetchError, FetchErrorKind, Fetched, fetch};
pub use server::{Serving, serve};
pub use store::{BlobError, BundleStore, valid_app, valid_revision};

/// The largest bundle a store takes in or a holder sends, in bytes (16 GiB: model weights
/// fit; a length beyond it is refused before a byte is read).
pub const MAX_BUNDLE: u64 = 16 << 30;
/// Sends (and packs) a holder runs at once; more requests are answered `Busy`.
pub const MAX_SENDING: usize = 4;
/// Holders one fetch tries at most before it gives up.
pub const MAX_ATTEMPTS: usize = 8;
/// The slowest transfer rate a deadline allows, in bytes per second (1 MiB/s).
pub const MIN_RATE: u64 = 1 << 20;
/// What every transfer's deadline allows on top of its length at [`MIN_RATE`].
pub const BASE_DEADLINE: Duration = Duration::from_secs(30);
/// How long a transfer may go without a byte moving, whatever its deadline (the mesh's
/// idle timeout closes a silent connection after as long).
pub const STALL: Duration = Duration::from_secs(30);
/// How long a holder may take to pack a release directory before it gives up.
pub const PACK_DEADLINE: Duration = Duration::from_secs(30 * 60);
/// How often a holder that is packing says so (well within the mesh's
/// [`STREAM_DEADLINE`](crate::mesh::node::STREAM_DEADLINE), so the
/// fetcher tells a slow pack from a dead holder).
pub const KEEPALIVE: Duration = Duration::from_secs(2);
/// Bytes of a peer's error text that are kept (in logs and in [`FetchErrorKind`]).
const MAX_PEER_TEXT: usize = 200;
/// Bytes moved per read and write.
const COPY_BUFFER: usize = 256 * 1024;

/// How long moving `len` bytes may take: [`BASE_DEADLINE`] plus `len` at [`MIN_RATE`]
/// (a 16 GiB bundle: about 4 h 33 min).
pub fn transfer_deadline(len: u64) -> Duration {
    BASE_DEADLINE + Duration::from_secs(len / MIN_RATE)
}

/// What a fetcher asks a holder (the first frame of a [`Protocol::Blobs`] stream). New
/// kinds (chunk lists, chunks) are added at the end.
///
/// [`Protocol::Blobs`]: crate::mesh::frame::Protocol::Blobs
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlobRequest {
    /// The whole bundle of revision `revision` (64 hex digits) of application `app`.
    Fetch { app: String, revision: String },
    /// The revision's manifest (`chunks::Manifest`): answered `Sending { len }` and its
    /// encoding (at most [`MAX_MANIFEST`](crate::chunks::store::MAX_MANIFEST) bytes), or
    /// `Missing`.
    Manifest { revision: String },
    /// Which chunks of the revision the holder has: answered [`BlobAnswer::Have`] or
    /// `Missing`.
    Have { revision: String },
    /// These chunks (at most [`MAX_BATCH`]), answered in order: each [`BlobAnswer::Chunk`]
    /// and its bytes, or [`BlobAnswer::NoChunk`]; `Busy` at once when the holder uploads
    /// all it may.
    Chunks { ids: Vec<crate::chunks::ChunkId> },
}

/// A holder's answer frames.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlobAnswer {
    /// Exactly `len` raw bytes of the bundle follow, then the end of the stream.
    Sending { len: u64 },
    /// The holder is packing the revision's release directory; more frames follow.
    Packing,
    /// The holder has neither the bundle nor the release.
    Missing,
    /// The holder is sending all it may at once: ask another.
    Busy,
    /// Refused or failed, and why.
    Error(String),
    /// The chunks held of a revision, a bit per chunk of the manifest's
    /// `sorted_distinct` order (least significant bit first); `None` for all of them.
    Have(Option<Vec<u8>>),
    /// Exactly `len` raw bytes of the next chunk asked for follow.
    Chunk { len: u32 },
    /// The next chunk asked for is not held.
    NoChunk,
}

/// Chunks one [`BlobRequest::Chunks`] may ask for.
pub const MAX_BATCH: usize = 64;

/// Packs one bit per chunk, least significant first.
pub fn pack_bits(bits: &[bool]) -> Vec<u8> {
    let mut out = vec![0u8; bits.len().div_ceil(8)];
    for (i, b) in bits.iter().enumerate() {
        if *b {
            out[i / 8] |= 1 << (i % 8);
        }
    }
    out
}

/// [`pack_bits`]' inverse for `n` chunks; `None` when the bytes are not `n` bits' worth.
pub fn unpack_bits(bytes: &[u8], n: usize) -> Option<Vec<bool>> {
    (bytes.len() == n.div_ceil(8))
        .then(|| (0..n).map(|i| bytes[i / 8] & (1 << (i % 8)) != 0).collect())
}

/// Why copying a known number of bytes stopped.
#[derive(Debug)]
enum CopyError {
    /// Reading failed.
    Read(std::io::Error),
    /// Writing failed.
    Write(std::io::Error),
    /// The source ended after `got` bytes.
    Truncated { got: u64 },
    /// No byte moved for [`STALL`]; `reading` says which side stalled.
    Stalled { reading: bool },
}

/// Copies exactly `len` bytes from `r` to `w`, failing if either side makes no progress for
/// [`STALL`]; `moved` is told of every write. Does not flush.
async fn copy_exact<R, W>(
    r: &mut R,
    w: &mut W,
    len: u64,
    mut moved: impl FnMut(u64),
) -> Result<(), CopyError>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut buf = vec![
        0u8;
        usize::try_from(len)
            .unwrap_or(usize::MAX)
            .clamp(1, COPY_BUFFER)
    ];
    let mut left = len;
    while left > 0 {
        let want = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        let n = match tokio::time::timeout(STALL, r.read(&mut buf[..want])).await {
            Err(_) => return Err(CopyError::Stalled { reading: true }),
            Ok(Err(e)) => return Err(CopyError::Read(e)),
            Ok(Ok(0)) => return Err(CopyError::Truncated { got: len - left }),
            Ok(Ok(n)) => n,
        };
        match tokio::time::timeout(STALL, w.write_all(&buf[..n])).await {
            Err(_) => return Err(CopyError::Stalled { reading: false }),
            Ok(Err(e)) => return Err(CopyError::Write(e)),
            Ok(Ok(())) => {}
        }
        left -= n as u64;
        moved(n as u64);
    }
    Ok(())
}

/// A peer's text, cut to [`MAX_PEER_TEXT`] bytes and with control characters escaped, for
/// logs and errors.
pub(crate) fn peer_text(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if out.len() >= MAX_PEER_TEXT {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests;
