//! TCP ports a test owns for as long as it needs them.
//!
//! Binding port 0 and dropping the listener hands the test a port the kernel may give to
//! anyone else the next instant (an outgoing connection, another test's port 0). A
//! [`PortLease`] instead takes a port below the kernel's ephemeral range (so the kernel
//! never hands it out by itself) and holds an exclusive lock on a file named after it, so
//! no other test process of this suite takes it while the lease lives. The port is also
//! checked to be free to bind at the moment it is leased.

#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::net::TcpListener;
use std::path::PathBuf;

/// A port held by this test until the lease is dropped.
pub struct PortLease {
    port: u16,
    _lock: File,
}

impl PortLease {
    pub fn port(&self) -> u16 {
        self.port
    }
}

/// The first port the kernel hands out by itself: leases stay below it.
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

/// Leases a free TCP port on 127.0.0.1. Panics if none is free in the whole range.
pub fn lease() -> PortLease {
    let dir: PathBuf = std::env::temp_dir().join("shoal-test-ports");
    std::fs::create_dir_all(&dir).expect("the port lock directory");
    let high = ephemeral_start().max(12_000);
    let low = 10_000u16;
    let span = u32::from(high - low);
    // Start somewhere that differs between test processes, then walk the range once.
    let seed = std::process::id().wrapping_mul(2_654_435_761)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
    for step in 0..span {
        let port = low + ((seed.wrapping_add(step)) % span) as u16;
        let Ok(file) = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(format!("{port}.lock")))
        else {
            continue;
        };
        if file.try_lock().is_err() {
            continue; // another test process holds it
        }
        if TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue; // something outside the suite uses it
        }
        return PortLease { port, _lock: file };
    }
    panic!("no free TCP port between {low} and {high}");
}
