//! Shared by the bundle targets: writes the candidate bundle to a scratch file on tmpfs and
//! opens it with small limits, so a bomb shows as a refusal (or an out-of-memory crash).

#![allow(dead_code)] // Each target uses only part of this module.

use std::path::PathBuf;
use std::sync::OnceLock;

use shoal_agent::bundle::{self, Limits};

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("shoal-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch directory");
        dir
    })
}

pub fn limits() -> Limits {
    Limits {
        max_bytes: 1 << 20,
        max_entries: 256,
    }
}

/// Opens `bytes` as a bundle file named `name`.
pub fn open_file(name: &str, bytes: &[u8]) {
    let dir = scratch();
    let input = dir.join(name);
    let staging = dir.join("staging");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::write(&input, bytes).expect("write the input");
    check(bundle::open(&input, &staging, &limits()), &staging);
}

/// What every bundle run must hold: nothing escapes the staging directory.
pub fn check(result: Result<bundle::Bundle, bundle::BundleError>, staging: &std::path::Path) {
    if let Ok(b) = &result {
        assert!(b.root.starts_with(staging));
    }
    let _ = std::fs::remove_dir_all(staging);
}

pub fn scratch_dir() -> &'static PathBuf {
    scratch()
}
