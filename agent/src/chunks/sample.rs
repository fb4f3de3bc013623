//! The data the delta test and its benchmark share (`chunks::tests`, `benches/chunk_delta.rs`):
//! a model-like file of pseudo-random bytes and a copy of it with a tenth of its bytes
//! changed in scattered places, half of the edits insertions that shift every later byte.
//! Deterministic (xorshift64*), so a run is repeatable.

/// `len` pseudo-random bytes from `seed`.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.max(1);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// `old` with `fraction` of its length changed at `places` evenly spread points: each
/// place gets new bytes, written over the old ones at even places and inserted (shifting
/// what follows) at odd ones.
pub fn edited(old: &[u8], fraction: f64, places: usize) -> Vec<u8> {
    let per = ((old.len() as f64 * fraction) / places as f64) as usize;
    let stride = old.len() / places;
    let mut new = Vec::with_capacity(old.len() + per * places);
    let mut from = 0;
    for place in 0..places {
        // Somewhere inside the stride, not on a round boundary.
        let at = place * stride + (stride / 3) + place * 7919 % (stride / 3).max(1);
        let at = at.min(old.len());
        new.extend_from_slice(&old[from..at]);
        let fresh = bytes(0x5eed + place as u64, per);
        new.extend_from_slice(&fresh);
        from = if place % 2 == 0 {
            (at + per).min(old.len())
        } else {
            at
        };
    }
    new.extend_from_slice(&old[from..]);
    new
}

/// The bytes of `new` a fixed-block transfer (blocks of `block` bytes, named by their
/// hash) fetches when the holder has `old`: the contrast to content-defined chunks.
pub fn fixed_block_fetch(old: &[u8], new: &[u8], block: usize) -> u64 {
    use sha2::{Digest, Sha256};
    let held: std::collections::HashSet<[u8; 32]> = old
        .chunks(block)
        .map(|b| Sha256::digest(b).into())
        .collect();
    new.chunks(block)
        .filter(|b| !held.contains(&<[u8; 32]>::from(Sha256::digest(b))))
        .map(|b| b.len() as u64)
        .sum()
}
