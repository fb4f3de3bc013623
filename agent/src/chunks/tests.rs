//! The manifest and the store, on real files: a manifest is its revision and refuses to be
//! another, a revision goes through the store and comes back whole, a corrupt or missing
//! chunk is named, collection keeps what kept releases name, and the delta of a tenth
//! changed stays under the 15 %.

use std::collections::HashSet;
use std::path::Path;

use super::manifest::{AssembleError, Manifest, ManifestError};
use super::{ChunkStore, StoreError, sample};
use crate::bundle::id::{Entry, listing_id};
use crate::bundle::tree_id;

fn tree(root: &Path, seed: u64) {
    std::fs::create_dir_all(root.join("model/empty")).unwrap();
    std::fs::write(root.join("model/weights.bin"), sample::bytes(seed, 1 << 20)).unwrap();
    std::fs::write(root.join("appspec.yml"), "version: 0.0\nos: linux\n").unwrap();
    std::fs::write(root.join("run.sh"), "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(
        root.join("run.sh"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink("weights.bin", root.join("model/current")).unwrap();
}

#[test]
fn a_manifest_is_its_revision_and_refuses_to_be_another() {
    let tmp = tempfile::tempdir().unwrap();
    tree(tmp.path(), 1);
    let id = tree_id(tmp.path()).unwrap();
    let m = Manifest::of_tree(tmp.path()).unwrap();
    assert_eq!(m.revision, id);
    m.verify(&id).unwrap();
    let weights = m
        .entries
        .iter()
        .find_map(|(p, e)| match e {
            Entry::File { content, .. } if p == "model/weights.bin" => Some(content.clone()),
            _ => None,
        })
        .unwrap();
    assert!(weights.len() > 4, "1 MiB cut in {} chunks", weights.len());

    // Another revision's id.
    let other = crate::bundle::RevisionId("0".repeat(64));
    assert!(matches!(
        m.verify(&other),
        Err(ManifestError::WrongRevision { .. })
    ));
    // A changed listing (the executable bit) is another revision.
    let mut changed = m.clone();
    if let Some((_, Entry::File { exec, .. })) =
        changed.entries.iter_mut().find(|(p, _)| p == "run.sh")
    {
        *exec = false;
    }
    assert!(matches!(
        changed.verify(&id),
        Err(ManifestError::WrongRevision { .. })
    ));
    // Chunks that do not add up, even under a listing that hashes right.
    let mut short = m.clone();
    for (p, e) in short.entries.iter_mut() {
        if let (true, Entry::File { content, .. }) = (p == "model/weights.bin", e) {
            content.pop();
        }
    }
    assert!(matches!(
        short.verify(&id),
        Err(ManifestError::Lengths { .. })
    ));
    // Larger than a revision may be: a file of more bytes than a bundle may expand to,
    // or a name longer than a path can be, each with an id made to match.
    let mut huge = m.clone();
    let big = crate::bundle::Limits::default().max_bytes + 1;
    let chunks = vec![
        super::ChunkRef {
            id: super::ChunkId([0; 32]),
            len: super::MAX_CHUNK,
        };
        (big / u64::from(super::MAX_CHUNK) + 1) as usize
    ];
    let len = chunks.iter().map(|c| u64::from(c.len)).sum();
    huge.entries.push((
        "zz".into(),
        Entry::File {
            exec: false,
            len,
            sha256: "0".repeat(64),
            content: chunks,
        },
    ));
    huge.revision = listing_id(&huge.entries);
    let e = huge.verify(&huge.revision).unwrap_err();
    assert!(
        matches!(
            e,
            ManifestError::TooLarge {
                what: "bytes of content",
                ..
            }
        ),
        "{e}"
    );
    let mut long = m.clone();
    long.entries.push(("z".repeat(5000), Entry::Dir));
    long.revision = listing_id(&long.entries);
    let e = long.verify(&long.revision).unwrap_err();
    assert!(matches!(e, ManifestError::TooLarge { .. }), "{e}");
    // Records read another way: a hash that carries the next record, a NUL in a name.
    let mut regrouped = m.clone();
    if let Some((_, Entry::File { sha256, .. })) = regrouped
        .entries
        .first_mut()
        .filter(|(_, e)| matches!(e, Entry::File { .. }))
    {
        sha256.push_str("\0f\0x\0-\0\x31\0");
    }
    regrouped.entries.push(("zz\0y".into(), Entry::Dir));
    regrouped.revision = listing_id(&regrouped.entries);
    let e = regrouped.verify(&regrouped.revision).unwrap_err();
    assert!(matches!(e, ManifestError::Path { .. }), "{e}");
    // A path out of the tree, or a link that leaves it, with an id made to match.
    for (path, entry, bad) in [
        ("../escape", Entry::Dir, "path"),
        (
            "zz",
            Entry::Link {
                target: "../../etc/shadow".into(),
            },
            "link",
        ),
        (
            "zz",
            Entry::Link {
                target: "/etc/shadow".into(),
            },
            "link",
        ),
    ] {
        let mut evil = m.clone();
        evil.entries.push((path.to_string(), entry));
        // In the listing's order: what is refused is the path or the link, not the order.
        evil.entries
            .sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        evil.revision = listing_id(&evil.entries);
        let e = evil.verify(&evil.revision).unwrap_err();
        match bad {
            "path" => assert!(matches!(e, ManifestError::Path { .. }), "{e}"),
            _ => assert!(matches!(e, ManifestError::Link { .. }), "{e}"),
        }
    }
    // A chain of links: `d -> .` stays inside, but `esc -> d/d/../..` goes through `d`,
    // which text alone would count as inside.
    let mut chain = m.clone();
    for (path, target) in [("d", "."), ("esc", "d/d/../..")] {
        chain.entries.push((
            path.into(),
            Entry::Link {
                target: target.into(),
            },
        ));
    }
    chain
        .entries
        .sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    chain.revision = listing_id(&chain.entries);
    let e = chain.verify(&chain.revision).unwrap_err();
    assert!(
        matches!(&e, ManifestError::Link { path, .. } if path == "esc"),
        "{e}"
    );
    // A chunk smaller than FastCDC cuts any but a file's last, and one chunk given two
    // lengths: the listing (and so the id) is unchanged, the chunk lists are not.
    let with_weights = |f: &dyn Fn(&mut Vec<super::ChunkRef>)| {
        let mut changed = m.clone();
        for (p, e) in changed.entries.iter_mut() {
            if let (true, Entry::File { content, .. }) = (p == "model/weights.bin", e) {
                f(content);
            }
        }
        changed.verify(&id).unwrap_err()
    };
    let e = with_weights(&|c| {
        let moved = c[0].len - 100;
        c[0].len = 100;
        c[1].len += moved;
    });
    assert!(
        matches!(e, ManifestError::ChunkSize { index: 0, .. }),
        "{e}"
    );
    let e = with_weights(&|c| {
        let (first, second) = (c[0], c[1]);
        if first.len != second.len {
            c[1].id = first.id;
        } else {
            c[1].id = first.id;
            c[1].len -= 1;
            c[2].len += 1;
        }
    });
    assert!(matches!(e, ManifestError::TwoLengths { .. }), "{e}");
}

const PINNED_ID: &str = "8c99f50eac844de5317d00345c91b39ca979d531ea037b0ef8697994b9d90070";

#[test]
fn a_known_tree_keeps_its_revision_id() {
    // The id of `tree(.., 1)`, pinned: the listing the manifest shares with the revision
    // id must never change, or every revision already deployed would get another id.
    let tmp = tempfile::tempdir().unwrap();
    tree(tmp.path(), 1);
    assert_eq!(tree_id(tmp.path()).unwrap().0, PINNED_ID);
    assert_eq!(Manifest::of_tree(tmp.path()).unwrap().revision.0, PINNED_ID);
}

#[test]
fn a_revision_goes_through_the_store_and_comes_back_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    tree(&src, 2);
    let store = ChunkStore::open(&tmp.path().join("data")).unwrap();
    let m = Manifest::store_tree(&src, &store).unwrap();
    let (count, bytes) = store.usage().unwrap();
    assert_eq!(count, m.distinct().len() as u64);
    assert_eq!(bytes, m.delta(|_| false).bytes);
    // Stored again: nothing new.
    Manifest::store_tree(&src, &store).unwrap();
    assert_eq!(store.usage().unwrap(), (count, bytes));

    let dest = tmp.path().join("dest");
    std::fs::create_dir(&dest).unwrap();
    // Asked for another revision, it writes nothing.
    let other = crate::bundle::RevisionId("0".repeat(64));
    let e = m.assemble(&other, &store, &dest).unwrap_err();
    assert!(
        matches!(
            e,
            AssembleError::Manifest(ManifestError::WrongRevision { .. })
        ),
        "{e}"
    );
    assert_eq!(std::fs::read_dir(&dest).unwrap().count(), 0);
    m.assemble(&m.revision, &store, &dest).unwrap();
    assert_eq!(tree_id(&dest).unwrap(), m.revision);
    assert_eq!(
        std::fs::read_link(dest.join("model/current")).unwrap(),
        Path::new("weights.bin")
    );

    // Bytes that are not the chunk they claim to be are refused.
    let first = *m.chunks().next().unwrap();
    let e = store.put(&first.id, b"not that chunk").unwrap_err();
    assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
    // A chunk the disk changed is found out, removed, and the assembly fails naming it.
    let stored = tmp
        .path()
        .join("data/chunks")
        .join(&first.id.hex()[..2])
        .join(first.id.hex());
    let mut changed = std::fs::read(&stored).unwrap();
    changed[0] ^= 1;
    std::fs::write(&stored, changed).unwrap();
    let again = tmp.path().join("again");
    std::fs::create_dir(&again).unwrap();
    let e = m.assemble(&m.revision, &store, &again).unwrap_err();
    assert!(
        matches!(e, AssembleError::Store(StoreError::Corrupt { .. })),
        "{e}"
    );
    assert!(!store.has(&first.id), "a corrupt chunk was kept");
    let again = tmp.path().join("again2");
    std::fs::create_dir(&again).unwrap();
    let e = m.assemble(&m.revision, &store, &again).unwrap_err();
    assert!(
        matches!(&e, AssembleError::Missing { id, .. } if *id == first.id),
        "{e}"
    );
    // Put back from the source, it assembles.
    store
        .put(&first.id, &chunk_bytes(&src, &m, first.id))
        .unwrap();
    let third = tmp.path().join("third");
    std::fs::create_dir(&third).unwrap();
    m.assemble(&m.revision, &store, &third).unwrap();
}

/// The bytes of chunk `id` of the tree at `root`, cut again.
fn chunk_bytes(root: &Path, m: &Manifest, id: super::ChunkId) -> Vec<u8> {
    for (path, e) in &m.entries {
        if let Entry::File { content, .. } = e {
            let data = std::fs::read(root.join(path)).unwrap();
            let mut at = 0usize;
            for c in content {
                if c.id == id {
                    return data[at..at + c.len as usize].to_vec();
                }
                at += c.len as usize;
            }
        }
    }
    panic!("no chunk {id}");
}

#[test]
fn collection_keeps_only_what_the_kept_releases_name() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    for (dir, seed) in [(&a, 3), (&b, 4)] {
        std::fs::create_dir(dir).unwrap();
        tree(dir, seed);
    }
    let store = ChunkStore::open(&tmp.path().join("data")).unwrap();
    let ma = Manifest::store_tree(&a, &store).unwrap();
    let mb = Manifest::store_tree(&b, &store).unwrap();
    let before = store.usage().unwrap();
    let keep: HashSet<_> = mb.distinct().into_keys().collect();
    // Every chunk here is named by a manifest: what is not kept goes now.
    let known: HashSet<_> = ma
        .distinct()
        .into_keys()
        .chain(mb.distinct().into_keys())
        .collect();
    let c = store.collect(|| Ok((keep.clone(), known))).unwrap();
    assert_eq!(c.kept, keep.len() as u64);
    assert_eq!(store.usage().unwrap(), (c.kept, c.kept_bytes));
    assert_eq!(before.1, c.kept_bytes + c.freed_bytes);
    assert!(c.removed > 0);
    // B is whole; A's own chunks are gone.
    let dest = tmp.path().join("dest");
    std::fs::create_dir(&dest).unwrap();
    mb.assemble(&mb.revision, &store, &dest).unwrap();
    assert!(ma.distinct().keys().any(|id| !store.has(id)));
    // A chunk no manifest names (an interrupted fetch's) stays, young as it is, for the
    // fetch to resume from; once a manifest names it and does not keep it, it goes.
    let orphan = b"stored by a fetch that was killed".to_vec();
    let orphan_id = super::ChunkId::of(&orphan);
    store.put(&orphan_id, &orphan).unwrap();
    store
        .collect(|| Ok((keep.clone(), HashSet::new())))
        .unwrap();
    assert!(store.has(&orphan_id));
    store
        .collect(|| Ok((keep.clone(), [orphan_id].into())))
        .unwrap();
    assert!(!store.has(&orphan_id));
}

#[test]
fn a_tenth_changed_in_scattered_places_moves_under_fifteen_percent() {
    let tmp = tempfile::tempdir().unwrap();
    let (old_dir, new_dir) = (tmp.path().join("old"), tmp.path().join("new"));
    let old = sample::bytes(42, 32 << 20);
    let new = sample::edited(&old, 0.10, 16);
    for (dir, data) in [(&old_dir, &old), (&new_dir, &new)] {
        std::fs::create_dir(dir).unwrap();
        std::fs::write(dir.join("model.bin"), data).unwrap();
    }
    let (mo, mn) = (
        Manifest::of_tree(&old_dir).unwrap(),
        Manifest::of_tree(&new_dir).unwrap(),
    );
    let d = mn.delta_from(&mo);
    let size = new.len() as f64;
    let cdc = d.fetch_bytes as f64 / size;
    let fixed = sample::fixed_block_fetch(&old, &new, super::AVG_CHUNK as usize) as f64 / size;
    assert!(
        cdc <= 0.15,
        "content-defined chunks fetch {:.1} %",
        cdc * 100.0
    );
    // At least the new bytes (a tenth of the old size, in a longer file).
    let new_bytes = old.len() as f64 * 0.10 / size;
    assert!(
        cdc >= new_bytes * 0.99,
        "less than what changed: {:.1} %",
        cdc * 100.0
    );
    // Insertions shift every later byte: fixed blocks lose nearly everything after the first.
    assert!(
        fixed > 0.5,
        "fixed blocks fetch only {:.1} %",
        fixed * 100.0
    );
    assert_eq!(d.reused_bytes + d.fetch_bytes, d.bytes);
}
