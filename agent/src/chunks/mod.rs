//! A revision as content-defined chunks (issue 13, decision 0023): the groundwork of the
//! swarm transfer and of deltas between revisions.
//!
//! - [`manifest`]: a revision's [`Manifest`]: its canonical listing (the one the revision
//!   id hashes, `bundle::id`), each file cut into FastCDC chunks named by their SHA-256.
//!   A manifest proves itself: [`Manifest::verify`] recomputes the revision id from it, so
//!   a manifest from anywhere is checked against the id the operator deployed, and each
//!   chunk against its name, before anything is used.
//! - [`store`]: the [`ChunkStore`] in `data_dir/chunks`, shared by every revision and
//!   application: deduplicated, a chunk visible only once written whole and verified,
//!   collected down to what the kept releases name.
//!
//! Chunk sizes ([`MIN_CHUNK`], [`AVG_CHUNK`], [`MAX_CHUNK`]) are decision 0023's.

pub mod manifest;
pub mod sample;
pub mod store;

pub use manifest::AssembleError;
pub use manifest::{ChunkId, ChunkRef, Delta, Manifest, ManifestError};
pub use store::{ChunkStore, Collected, StoreError};

/// FastCDC's bounds: no chunk is smaller (but a file's last), and none larger.
pub const MIN_CHUNK: u32 = 8 * 1024;
/// The size chunks come out at on average.
pub const AVG_CHUNK: u32 = 32 * 1024;
pub const MAX_CHUNK: u32 = 128 * 1024;

#[cfg(test)]
mod tests;
