//! What the chunk store and the bundle store keep once a deployment is over (issue 13):
//! the revisions this host still holds, within the store's bound.
//!
//! - **Which revisions.** A revision is held while the lifecycle keeps its release
//!   (`keep_releases` and the active one) or the bundle store keeps its bundle; a bundle
//!   is kept while its release is, and otherwise only among the newest `keep_releases + 1`
//!   of its application (an uploader that deploys nothing keeps its latest uploads).
//! - **Within the bound** (`transfer.store_limit`). The chunks of active revisions and of
//!   fetches under way are always kept; then the other held revisions, newest first, as
//!   long as their chunks fit. A revision left out loses its manifest (it is no longer
//!   served as chunks, and can still be served whole).
//!
//! [`plan`] decides, without I/O; [`Swarmer::collect`](super::Swarmer::collect) reads
//! the disk, calls it, and removes.

use std::collections::{BTreeSet, HashSet};

use crate::chunks::ChunkId;

/// One revision whose manifest is stored, as [`plan`] weighs it.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub revision: String,
    /// Active for some application, or being fetched: always kept.
    pub pinned: bool,
    /// Held (a release or a bundle kept): kept if it fits.
    pub held: bool,
    /// Newer revisions are kept first (a modification time, say).
    pub newness: u64,
    /// Its distinct chunks.
    pub chunks: Vec<(ChunkId, u32)>,
}

/// What to keep: the revisions whose manifests stay, and the chunks they name.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub revisions: BTreeSet<String>,
    pub chunks: HashSet<ChunkId>,
    /// Every chunk some candidate names: one of these not in `chunks` goes now. A chunk
    /// no manifest names (what an interrupted fetch stored) is kept for a while instead,
    /// for the fetch to resume from.
    pub known: HashSet<ChunkId>,
    /// Bytes of the chunks kept.
    pub bytes: u64,
}

/// Decides what stays: pinned revisions whatever their size, then held ones newest first
/// while the chunks kept stay within `limit` bytes (no limit: every held one).
pub fn plan(candidates: &[Candidate], limit: Option<u64>) -> Plan {
    let mut order: Vec<&Candidate> = candidates.iter().filter(|c| c.pinned || c.held).collect();
    // Pinned first, then newest first; the revision id breaks ties.
    order.sort_by(|a, b| {
        (b.pinned, b.newness, &b.revision).cmp(&(a.pinned, a.newness, &a.revision))
    });
    let mut kept = Plan {
        known: candidates
            .iter()
            .flat_map(|c| c.chunks.iter().map(|(id, _)| *id))
            .collect(),
        ..Plan::default()
    };
    for c in order {
        let added: u64 = c
            .chunks
            .iter()
            .filter(|(id, _)| !kept.chunks.contains(id))
            .map(|(_, len)| u64::from(*len))
            .sum();
        if !c.pinned && limit.is_some_and(|l| kept.bytes.saturating_add(added) > l) {
            continue;
        }
        kept.bytes += added;
        kept.chunks.extend(c.chunks.iter().map(|(id, _)| *id));
        kept.revisions.insert(c.revision.clone());
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ChunkId {
        ChunkId([n; 32])
    }

    fn candidate(rev: &str, pinned: bool, newness: u64, chunks: &[u8]) -> Candidate {
        Candidate {
            revision: rev.into(),
            pinned,
            held: true,
            newness,
            chunks: chunks.iter().map(|n| (id(*n), 100)).collect(),
        }
    }

    #[test]
    fn without_a_bound_every_held_revision_stays_and_the_rest_goes() {
        let mut gone = candidate("gone", false, 9, &[9]);
        gone.held = false;
        let p = plan(
            &[
                candidate("a", true, 1, &[1, 2]),
                candidate("b", false, 2, &[2, 3]),
                gone,
            ],
            None,
        );
        assert_eq!(p.revisions, ["a", "b"].map(String::from).into());
        assert_eq!(p.chunks, [id(1), id(2), id(3)].into());
        assert_eq!(p.known, [id(1), id(2), id(3), id(9)].into());
        assert_eq!(p.bytes, 300, "a shared chunk counts once");
    }

    #[test]
    fn within_a_bound_the_newest_held_revisions_stay_and_pinned_ones_always() {
        let all = [
            candidate("active", true, 1, &[1, 2, 3]),
            candidate("old", false, 2, &[4, 5]),
            candidate("newer", false, 3, &[3, 6]),
            candidate("newest", false, 4, &[7, 8, 9]),
        ];
        // 300 for the active one; "newest" would make 600, over 500: left out; "newer"
        // adds one chunk (3 is shared): 400; "old" would make 600: left out.
        let p = plan(&all, Some(500));
        assert_eq!(p.revisions, ["active", "newer"].map(String::from).into());
        assert_eq!(p.bytes, 400);
        // A bound below the pinned revision keeps it anyway, and nothing else.
        let p = plan(&all, Some(100));
        assert_eq!(p.revisions, ["active"].map(String::from).into());
        assert_eq!(p.bytes, 300);
    }
}
