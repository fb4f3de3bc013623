//! The connection pool: at most one connection in use per peer address, made when needed
//! and closed when idle, so an agent's idle traffic, CPU and memory do not grow with the
//! fleet. Connections carry no keep-alives: QUIC closes one that carried nothing for
//! [`transport::IDLE_TIMEOUT`], and the next send dials again.
//!
//! - **Duplicates.** When two agents dial each other at once, both end up with two
//!   connections. Within [`DUPLICATE_WINDOW`] of each other, both sides keep the one dialled
//!   by the agent whose name sorts first and close the other (after `DUPLICATE_GRACE`, so
//!   what is in flight on it arrives), so the choice agrees.
//!   Otherwise the newer connection replaces the older one: that is how a restarted peer's
//!   new connection takes over from its old life's.
//! - **Bounded.** At most [`MAX_CONNECTIONS`] connections are kept; beyond that the one used
//!   least recently is closed.
//! - **Back-off.** A dial that fails is not tried again for a while, doubling each time
//!   ([`Backoff`], sans-IO and unit-tested); after [`GIVE_UP_AFTER`] failures in a row the
//!   address is left alone for [`GIVE_UP_FOR`], so an address that never completes a fleet
//!   handshake (a member invented by an insider, a host that is gone) stops being dialled.
//!   An address that connects to us is forgiven at once.
//! - **Sends wait for their dial**, up to [`MAX_QUEUED`] per peer; what cannot wait is
//!   dropped and counted.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use super::core::LinkSample;

/// The most connections an agent keeps open.
pub const MAX_CONNECTIONS: usize = 256;
/// Two connections to one peer established this close together are simultaneous dials.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(5);
/// Sends waiting for a dial, per peer.
pub const MAX_QUEUED: usize = 64;
/// The first wait after a failed dial; it doubles with every failure in a row.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest wait between two dials of a failing address.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Failures in a row after which an address is left alone for [`GIVE_UP_FOR`].
pub const GIVE_UP_AFTER: u32 = 6;
/// How long an address that kept failing is not dialled at all.
pub const GIVE_UP_FOR: Duration = Duration::from_secs(600);
/// The wait after a peer refused a dial because it was busy with other handshakes.
pub const BUSY_RETRY: Duration = Duration::from_millis(250);
/// Addresses whose failures are remembered (the oldest are forgotten first).
const MAX_FAILING: usize = 4096;
/// Dials under way at once.
pub const MAX_DIALS: usize = 64;

/// When a failing address may be dialled again. Sans-IO.
#[derive(Default)]
pub struct Backoff {
    failing: HashMap<SocketAddr, Failing>,
}

#[derive(Clone, Copy, Debug)]
struct Failing {
    failures: u32,
    next_try: Instant,
}

impl Backoff {
    /// Whether `addr` may be dialled at `now`.
    pub fn may_dial(&self, now: Instant, addr: SocketAddr) -> bool {
        self.failing.get(&addr).is_none_or(|f| now >= f.next_try)
    }

    /// A dial of `addr` failed at `now`.
    pub fn failed(&mut self, now: Instant, addr: SocketAddr) {
        if self.failing.len() >= MAX_FAILING && !self.failing.contains_key(&addr) {
            let oldest = self
                .failing
                .iter()
                .min_by_key(|(_, f)| f.next_try)
                .map(|(a, _)| *a);
            if let Some(oldest) = oldest {
                self.failing.remove(&oldest);
            }
        }
        let f = self.failing.entry(addr).or_insert(Failing {
            failures: 0,
            next_try: now,
        });
        f.failures = f.failures.saturating_add(1);
        let wait = if f.failures >= GIVE_UP_AFTER {
            f.failures = 0;
            GIVE_UP_FOR
        } else {
            FIRST_BACKOFF
                .saturating_mul(1 << (f.failures - 1).min(16))
                .min(MAX_BACKOFF)
        };
        f.next_try = now + wait;
    }

    /// `addr` refused a dial for load at `now`: tried again after [`BUSY_RETRY`], without
    /// counting it as a failure.
    pub fn busy(&mut self, now: Instant, addr: SocketAddr) {
        if let Some(f) = self.failing.get_mut(&addr) {
            f.next_try = now + BUSY_RETRY;
        } else if self.failing.len() < MAX_FAILING {
            self.failing.insert(
                addr,
                Failing {
                    failures: 0,
                    next_try: now + BUSY_RETRY,
                },
            );
        }
    }

    /// `addr` connected (either way): it is forgiven.
    pub fn succeeded(&mut self, addr: SocketAddr) {
        self.failing.remove(&addr);
    }

    /// Whether `addr` is being backed off from.
    pub fn is_failing(&self, addr: SocketAddr) -> bool {
        self.failing.contains_key(&addr)
    }
}

/// Whether a new connection should replace the one in use, for the pair (`me`, `peer`):
/// simultaneous dials keep the one dialled by the name that sorts first, otherwise the
/// newer one wins. `new_dialled_by_me`: whether this agent dialled the new connection.
pub fn replaces(
    me: &str,
    peer: &str,
    existing_age: Duration,
    existing_dialled_by_me: bool,
    new_dialled_by_me: bool,
) -> bool {
    if existing_age >= DUPLICATE_WINDOW || existing_dialled_by_me == new_dialled_by_me {
        return true;
    }
    let i_dial = me < peer;
    new_dialled_by_me == i_dial
}

/// One peer's slot in the pool.
pub enum Slot {
    Connected(Live),
    Dialing(Vec<Pending>),
}

/// A connection in use.
pub struct Live {
    pub conn: quinn::Connection,
    pub name: Arc<str>,
    pub dialled_by_me: bool,
    pub since: Instant,
    pub last_used: Instant,
}

impl Live {
    /// A connection just established (`dialled_by_me`: this agent dialled it).
    pub fn new(conn: quinn::Connection, name: Arc<str>, dialled_by_me: bool, now: Instant) -> Live {
        Live {
            conn,
            name,
            dialled_by_me,
            since: now,
            last_used: now,
        }
    }
}

/// What waits for a dial.
pub enum Pending {
    Datagram(bytes::Bytes),
    /// Any other use of the connection: the requester gets it (or an error).
    Want(tokio::sync::oneshot::Sender<Result<quinn::Connection, String>>),
}

/// The pool's state; the driver (`node.rs`) does the dials and applies the results.
pub struct Pool {
    pub slots: HashMap<SocketAddr, Slot>,
    pub backoff: Backoff,
    /// Dials under way, bounded.
    pub dials: Arc<Semaphore>,
}

impl Default for Pool {
    fn default() -> Self {
        Pool {
            slots: HashMap::new(),
            backoff: Backoff::default(),
            dials: Arc::new(Semaphore::new(MAX_DIALS)),
        }
    }
}

impl Pool {
    /// The connection to `addr` in use, if it is open.
    pub fn live(&mut self, now: Instant, addr: SocketAddr) -> Option<&quinn::Connection> {
        match self.slots.get_mut(&addr) {
            Some(Slot::Connected(live)) if live.conn.close_reason().is_none() => {
                live.last_used = now;
                Some(&live.conn)
            }
            _ => None,
        }
    }

    /// Adopts an established connection. Returns what waited for it, and the connections
    /// to close (a losing duplicate, or the least recently used beyond the bound).
    pub fn established(
        &mut self,
        now: Instant,
        me: &str,
        new: Live,
    ) -> (Vec<Pending>, Vec<quinn::Connection>) {
        let addr = new.conn.remote_address();
        self.backoff.succeeded(addr);
        let mut close = Vec::new();
        let queued = match self.slots.remove(&addr) {
            Some(Slot::Connected(old)) if old.conn.close_reason().is_none() => {
                let keep_new = old.name.as_ref() != new.name.as_ref()
                    || replaces(
                        me,
                        &new.name,
                        now.saturating_duration_since(old.since),
                        old.dialled_by_me,
                        new.dialled_by_me,
                    );
                if keep_new {
                    close.push(old.conn);
                } else {
                    close.push(new.conn);
                    self.slots.insert(addr, Slot::Connected(old));
                    return (Vec::new(), close);
                }
                Vec::new()
            }
            Some(Slot::Dialing(queue)) => queue,
            _ => Vec::new(),
        };
        self.slots.insert(addr, Slot::Connected(new));
        close.extend(self.over_bound());
        (queued, close)
    }

    /// A dial of `addr` failed (`busy`: refused for load): what waited for it is given up.
    pub fn dial_failed(&mut self, now: Instant, addr: SocketAddr, busy: bool) -> Vec<Pending> {
        if busy {
            self.backoff.busy(now, addr);
        } else {
            self.backoff.failed(now, addr);
        }
        match self.slots.remove(&addr) {
            Some(Slot::Dialing(queue)) => queue,
            Some(other) => {
                self.slots.insert(addr, other);
                Vec::new()
            }
            None => Vec::new(),
        }
    }

    /// A connection closed: its slot is freed if it was the one in use.
    pub fn closed(&mut self, addr: SocketAddr, stable_id: usize) {
        if matches!(self.slots.get(&addr), Some(Slot::Connected(l)) if l.conn.stable_id() == stable_id)
        {
            self.slots.remove(&addr);
        }
    }

    /// Open connections beyond [`MAX_CONNECTIONS`], least recently used first, taken out.
    fn over_bound(&mut self) -> Vec<quinn::Connection> {
        let mut connected: Vec<(Instant, SocketAddr)> = self
            .slots
            .iter()
            .filter_map(|(a, s)| match s {
                Slot::Connected(l) => Some((l.last_used, *a)),
                Slot::Dialing(_) => None,
            })
            .collect();
        if connected.len() <= MAX_CONNECTIONS {
            return Vec::new();
        }
        connected.sort();
        let excess = connected.len() - MAX_CONNECTIONS;
        connected[..excess]
            .iter()
            .filter_map(|(_, a)| match self.slots.remove(a) {
                Some(Slot::Connected(l)) => Some(l.conn),
                _ => None,
            })
            .collect()
    }

    /// The smoothed round trip of each open connection, and what was sent on it and
    /// acknowledged, by peer address.
    pub fn rtts(&self) -> impl Iterator<Item = (SocketAddr, LinkSample)> + '_ {
        self.slots.iter().filter_map(|(addr, s)| match s {
            Slot::Connected(l) if l.conn.close_reason().is_none() => {
                Some((*addr, link_sample(&l.conn)))
            }
            _ => None,
        })
    }

    /// Open connections.
    pub fn open(&self) -> usize {
        self.slots
            .values()
            .filter(|s| matches!(s, Slot::Connected(l) if l.conn.close_reason().is_none()))
            .count()
    }
}

/// What [`crate::mesh::core::Core::handle_rtts`] takes of a connection, from quinn's
/// statistics.
fn link_sample(conn: &quinn::Connection) -> LinkSample {
    let stats = conn.stats();
    let sent = stats.frame_tx;
    LinkSample {
        conn: conn.stable_id(),
        rtt: conn.rtt(),
        acked: stats.frame_rx.acks,
        // Path MTU probes are pings that may go unanswered by design.
        asked: (sent.stream + sent.datagram + sent.ping)
            .saturating_sub(stats.path.sent_plpmtud_probes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(i: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, i], 7400))
    }

    #[test]
    fn a_failing_address_is_backed_off_then_left_alone() {
        let t0 = Instant::now();
        let mut b = Backoff::default();
        assert!(b.may_dial(t0, a(1)));
        b.failed(t0, a(1));
        assert!(!b.may_dial(t0 + Duration::from_millis(999), a(1)));
        assert!(b.may_dial(t0 + FIRST_BACKOFF, a(1)));
        // Doubling waits: 1, 2, 4, 8, 16 s, then it is given up on for GIVE_UP_FOR.
        let mut now = t0;
        let mut dials = 1;
        let end = t0 + GIVE_UP_FOR;
        while now < end {
            if b.may_dial(now, a(1)) {
                dials += 1;
                b.failed(now, a(1));
            }
            now += Duration::from_millis(100);
        }
        assert_eq!(
            dials, GIVE_UP_AFTER,
            "dialled {GIVE_UP_AFTER} times, then left alone"
        );
        assert!(
            b.may_dial(now + GIVE_UP_FOR, a(1)),
            "tried again much later"
        );
        assert!(b.may_dial(t0, a(2)), "other addresses are not affected");
        // A busy peer is tried again soon, however often it was busy.
        for i in 0..20 {
            let at = t0 + BUSY_RETRY * i;
            assert!(b.may_dial(at, a(3)));
            b.busy(at, a(3));
            assert!(!b.may_dial(at, a(3)));
        }
        b.succeeded(a(1));
        assert!(b.may_dial(now, a(1)) && !b.is_failing(a(1)));
    }

    /// Two real endpoints of a test fleet on loopback: what `link_sample` reads moves as
    /// `Core::handle_rtts` expects, while the peer answers and once it is gone silent.
    #[tokio::test]
    async fn a_link_sample_counts_what_was_sent_and_what_came_back_acknowledged() {
        use crate::identity::{self, Identity, Role};
        use crate::mesh::transport;
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        identity::init_ca(&ca).unwrap();
        for n in ["a", "b"] {
            identity::issue(&ca, n, Role::Agent, &dir.path().join(n)).unwrap();
        }
        let id = |n: &str| Identity::load(&dir.path().join(n)).unwrap();
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        let a = transport::endpoint(loopback, &id("a"), None).unwrap();
        // The peer runs on a runtime of its own, shut down later without a word: as a
        // killed agent, it sends no close.
        let peer_rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let b_id = id("b");
        let (tx, rx) = tokio::sync::oneshot::channel();
        peer_rt.spawn(async move {
            let b = transport::endpoint(loopback, &b_id, None).unwrap();
            tx.send(b.local_addr().unwrap()).unwrap();
            let conn = b.accept().await.unwrap().await.unwrap();
            while let Ok(mut s) = conn.accept_uni().await {
                let _ = s.read_to_end(1 << 20).await;
            }
        });
        let b_addr = rx.await.unwrap();
        let conn = transport::connect(&a, b_addr).await.unwrap();
        let send = |conn: &quinn::Connection| {
            let conn = conn.clone();
            async move {
                let mut s = conn.open_uni().await.unwrap();
                s.write_all(b"hello").await.unwrap();
                s.finish().unwrap();
            }
        };
        // Answered: what is sent moves, and acknowledgements come back.
        let before = link_sample(&conn);
        assert_eq!(before.conn, conn.stable_id());
        send(&conn).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut answered = link_sample(&conn);
        while answered.acked == before.acked || answered.asked == before.asked {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no acknowledgement: {before:?} {answered:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
            answered = link_sample(&conn);
        }
        // Gone silent: what is sent still moves, acknowledgements do not.
        peer_rt.shutdown_background();
        // What it acknowledged before it stopped has come (loopback).
        tokio::time::sleep(Duration::from_millis(200)).await;
        let silent = link_sample(&conn);
        send(&conn).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut later = link_sample(&conn);
        while later.asked == silent.asked {
            assert!(tokio::time::Instant::now() < deadline, "nothing sent");
            tokio::time::sleep(Duration::from_millis(10)).await;
            later = link_sample(&conn);
        }
        // QUIC probes again after a while: still nothing back.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let last = link_sample(&conn);
        assert!(last.asked > silent.asked, "{silent:?} {last:?}");
        assert_eq!(last.acked, silent.acked, "acknowledged by no one: {last:?}");
    }

    #[test]
    fn the_failing_set_is_bounded() {
        let t0 = Instant::now();
        let mut b = Backoff::default();
        for i in 0..(MAX_FAILING as u32 + 100) {
            let addr = SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 1));
            b.failed(t0 + Duration::from_millis(u64::from(i)), addr);
        }
        assert_eq!(b.failing.len(), MAX_FAILING);
    }

    #[test]
    fn simultaneous_dials_keep_the_same_connection_on_both_sides() {
        let young = Duration::from_millis(10);
        // "a" < "b": the connection a dialled wins, on both sides.
        // At a: existing = the one b dialled (accepted), new = the one a dialled.
        assert!(replaces("a", "b", young, false, true));
        // At a, the other order: existing = a's own, new = b's: keep a's.
        assert!(!replaces("a", "b", young, true, false));
        // At b: existing = a's (accepted), new = b's own: keep a's.
        assert!(!replaces("b", "a", young, false, true));
        assert!(replaces("b", "a", young, true, false));
        // Later, or from the same side (a restarted peer dials again): the newer wins.
        assert!(replaces("a", "b", DUPLICATE_WINDOW, true, false));
        assert!(replaces("a", "b", young, false, false));
    }
}
