//! Crash points: named places where a deployment writes to disk, at which a crash test can
//! make the agent die as `kill -9` would.
//!
//! `SHOAL_FAULT_POINT=NAME` kills the process with SIGKILL the first time it reaches the
//! point `NAME`; `NAME:N` the N-th time (points inside loops, such as one per installed
//! file). Unset (as in production), a point costs one check of a value read once. Every
//! point of a deployment on a host is listed in [`POINTS`], so a test can walk them all and
//! fail on one that is never reached; the coordinator's are in [`COORDINATOR_POINTS`].

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// Every crash point, in the order a deployment reaches them.
pub const POINTS: &[&str] = &[
    "release.unpacked",
    "release.renamed",
    "journal.written",
    "install.journaled",
    "install.kept",
    "install.file",
    "install.files-done",
    "install.state-written",
    "install.permissions",
    "service.stopped",
    "service.started",
    "commit.state-written",
    "journal.removed",
    "record.written",
];

/// Crash points of a switched deployment (`lifecycle/switched.rs`, `switch/mod.rs`), in
/// the order it reaches them: new connections held, the proxy routed to the new service
/// with the kernel rule not yet moved, both routed, the service records half swapped, the
/// old service drained.
pub const SWITCH_POINTS: &[&str] = &[
    "switch.blocked",
    "switch.proxy-routed",
    "switch.allowed",
    "switch.swap-half",
    "switch.drained",
];

/// Crash points of the fleet's coordinator: a failover test makes the leader die there.
pub const COORDINATOR_POINTS: &[&str] = &[
    // The verdict Failed is committed; the rollback is not created yet.
    "coordinator.failed-finished",
];

struct Armed {
    name: String,
    nth: u64,
    seen: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let value = std::env::var("SHOAL_FAULT_POINT").ok()?;
            let (name, nth) = match value.split_once(':') {
                Some((name, n)) => (name.to_owned(), n.parse().ok()?),
                None => (value, 1),
            };
            Some(Armed {
                name,
                nth,
                seen: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// The crash point `name` (one of [`POINTS`], [`SWITCH_POINTS`] or [`COORDINATOR_POINTS`]):
/// dies here if a test armed it.
pub fn point(name: &'static str) {
    debug_assert!(
        POINTS.contains(&name)
            || SWITCH_POINTS.contains(&name)
            || COORDINATOR_POINTS.contains(&name),
        "crash point {name} is not listed"
    );
    let Some(armed) = armed() else { return };
    if armed.name == name && armed.seen.fetch_add(1, Ordering::SeqCst) + 1 == armed.nth {
        tracing::warn!(point = name, "crash point armed: dying as kill -9 would");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

/// For the swarm's hostile-peer test: with `SHOAL_FAULT_CORRUPT_CHUNKS=1` this agent
/// flips a byte of every chunk it sends, as a peer that lies would. Unset (as in
/// production), one check of a value read once.
pub fn corrupt_chunk(bytes: &mut [u8]) {
    static CORRUPT: OnceLock<bool> = OnceLock::new();
    let on = *CORRUPT
        .get_or_init(|| std::env::var("SHOAL_FAULT_CORRUPT_CHUNKS").is_ok_and(|v| v == "1"));
    if on && let Some(b) = bytes.first_mut() {
        *b ^= 0xff;
    }
}
