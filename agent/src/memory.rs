//! Handing freed memory back to the system. glibc's allocator keeps the pages of freed
//! blocks in its arenas for reuse; after a burst (a fleet's start-up: handshakes with every
//! peer, catch-up of every host record) an idle agent would keep them for good. Measured
//! with 100 agents: see docs/benchmarks.md. Other allocators return memory themselves.

use std::time::Duration;

use tokio::sync::watch;

/// How often the agent hands freed memory back.
pub const TRIM_EVERY: Duration = Duration::from_secs(10);

/// Hands freed memory back every [`TRIM_EVERY`] until `stopped` says so.
pub async fn trim_periodically(mut stopped: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(TRIM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => return,
            _ = tick.tick() => trim(),
        }
    }
}

/// Bytes the allocator has handed out and not taken back (glibc's `mallinfo2`), for the
/// agent's status line: set beside the process's RSS, it tells live memory from pages
/// the allocator keeps. `None` where the allocator is not glibc's.
pub fn heap_in_use() -> Option<usize> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's counters.
        let info = unsafe { libc::mallinfo2() };
        Some(info.uordblks + info.hblkhd)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

/// Returns the free pages of the allocator's arenas to the system (a no-op where the
/// allocator is not glibc's).
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory the allocator holds free; it takes the
    // arenas' locks itself and may be called from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}
