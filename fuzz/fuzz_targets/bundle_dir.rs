//! A directory bundle: the input is a tar stream laid out on disk as is (with the `tar`
//! crate, links and all, inside a scratch directory), then that directory is opened as a
//! bundle. Explores the directory walk with trees the archive rules would have refused.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let dir = common::scratch_dir().join("tree");
    let staging = common::scratch_dir().join("staging-dir");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&dir).unwrap();
    let mut archive = tar::Archive::new(data);
    // `unpack_in` keeps every entry inside `dir` (it refuses `..` and absolute paths);
    // links may point anywhere, which is what the bundle reader must withstand.
    if let Ok(entries) = archive.entries() {
        for (i, entry) in entries.enumerate() {
            let Ok(mut entry) = entry else { break };
            if i > 64 || entry.size() > 1 << 16 {
                break;
            }
            let _ = entry.unpack_in(&dir);
        }
    }
    common::check(
        shoal_agent::bundle::open(&dir, &staging, &common::limits()),
        &staging,
    );
    let _ = std::fs::remove_dir_all(&dir);
});
