//! Issue 13's delta and chunking numbers, side by side in one run (docs/benchmarks.md):
//! - the bytes moved to a host that holds a model when a tenth of it changed in scattered
//!   places (half the edits insertions): content-defined chunks at several average sizes
//!   (Shoal's is decision 0023's), fixed-size blocks of the same sizes, the whole file;
//! - how many chunks a revision of that size has at each size (the manifest's length);
//! - chunking throughput: `Manifest::of_tree` (FastCDC and SHA-256 of every chunk and of the
//!   whole file) against `tree_id` (SHA-256 of the file only), MiB/s and their ratio.
//!
//! Run: `bash bench/chunk-delta.sh` (`SHOAL_BENCH_MIB`, default 256: the model's size).

use std::collections::HashSet;
use std::time::Instant;

use shoal_agent::chunks::{AVG_CHUNK, Manifest, sample};

fn cdc_fetch(old: &[u8], new: &[u8], avg: u32) -> (u64, usize) {
    use sha2::{Digest, Sha256};
    let cut = |data: &[u8]| -> Vec<([u8; 32], usize)> {
        fastcdc::v2020::FastCDC::new(data, avg / 4, avg, avg * 4)
            .map(|c| {
                let bytes = &data[c.offset..c.offset + c.length];
                (Sha256::digest(bytes).into(), c.length)
            })
            .collect()
    };
    let held: HashSet<[u8; 32]> = cut(old).into_iter().map(|(h, _)| h).collect();
    let new_chunks = cut(new);
    let mut seen = HashSet::new();
    let fetch = new_chunks
        .iter()
        .filter(|(h, _)| !held.contains(h) && seen.insert(*h))
        .map(|(_, l)| *l as u64)
        .sum();
    (fetch, new_chunks.len())
}

fn main() {
    let mib: usize = std::env::var("SHOAL_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let old = sample::bytes(42, mib << 20);
    println!("model: {mib} MiB of pseudo-random bytes; a tenth changed (half insertions)");
    println!();
    println!(
        "| places | unit | content-defined chunks: moved, chunks | fixed blocks: moved | whole file |"
    );
    println!("|---|---|---|---|---|");
    for places in [16usize, 64] {
        let new = sample::edited(&old, 0.10, places);
        let size = new.len() as f64;
        for avg_kib in [8u32, 16, 32, 64, 128] {
            let avg = avg_kib * 1024;
            let (cdc, count) = cdc_fetch(&old, &new, avg);
            let fixed = sample::fixed_block_fetch(&old, &new, avg as usize);
            let mark = if avg == AVG_CHUNK { " (Shoal's)" } else { "" };
            println!(
                "| {places} | {avg_kib} KiB{mark} | {:.1} %, {count} | {:.1} % | 100 % |",
                cdc as f64 / size * 100.0,
                fixed as f64 / size * 100.0,
            );
        }
    }

    let tmp = tempfile::tempdir().expect("a temporary directory");
    std::fs::write(tmp.path().join("model.bin"), &old).expect("writing the model");
    drop(old);
    let rounds = 3;
    let mut manifest_s = f64::MAX;
    let mut id_s = f64::MAX;
    for _ in 0..rounds {
        let t = Instant::now();
        let m = Manifest::of_tree(tmp.path()).expect("a manifest");
        manifest_s = manifest_s.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let id = shoal_agent::bundle::tree_id(tmp.path()).expect("an id");
        id_s = id_s.min(t.elapsed().as_secs_f64());
        assert_eq!(m.revision, id);
    }
    println!();
    println!(
        "chunking (best of {rounds}): manifest {:.0} MiB/s, revision id alone {:.0} MiB/s, ratio {:.2}",
        mib as f64 / manifest_s,
        mib as f64 / id_s,
        id_s / manifest_s
    );
}
