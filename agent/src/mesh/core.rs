//! The node's own decisions, sans-IO, in the shape of quinn-proto's `Connection`: events go
//! in through `handle_*(now, ..)`, and what to do comes out through `poll_transmit` (bytes
//! and messages to send), `poll_event` (what happened, what to persist) and `poll_timeout`
//! (when to call `handle_timeout` next). It owns the membership core, the host table and
//! the node's one [`TimerQueue`]; it decides the tick schedule (anti-entropy, rejoining
//! while alone, remembering peers, fitting dissemination to the mesh's size), routes each
//! message to the core that owns it, and decides what follows a member coming up, going
//! down or this agent rejoining. `node.rs` is the thin tokio layer that does the IO.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::hoststate::{GossipMsg, HostTable, Outgoing};
use super::membership::{self, MemberId, Membership, Output};
use super::timers::TimerQueue;
use super::view::{self, HostView};
use crate::identity::revocation::RevocationList;
use crate::mesh::node::LocalState;

/// How often a digest goes to one random peer (anti-entropy).
pub const ANTI_ENTROPY_EVERY: Duration = Duration::from_secs(1);
/// How often an agent with no live member announces itself to its seeds again.
pub const REJOIN_EVERY: Duration = Duration::from_secs(2);
/// How often the driver hands in the connections' round trips ([`Core::handle_rtts`]).
pub const RTTS_EVERY: Duration = Duration::from_millis(500);
/// How long a connection's round trip still counts once this agent has sent on it and no
/// acknowledgement came back ([`Core::handle_rtts`]): QUIC keeps the last estimate of a
/// peer that went silent, and a member killed while its link was loaded must not be given
/// up as slowly as that link was. Three times the longest round trip that stretches
/// ([`membership::MAX_STRETCH`] × [`membership::RTT_BUDGET`]), and shorter than the probe
/// cycle at the larger stretches, so that a member killed under load is suspected with its
/// round trip no longer counted. A slower link gets four of its round trips (a lost packet
/// is sent again after about two), up to [`RTT_FRESH_MAX`].
pub const RTT_FRESH: Duration = Duration::from_millis(1500);
/// The most time a connection's acknowledgement is waited for ([`RTT_FRESH`]): with the
/// sampling's 500 ms, still within the probe cycle at the largest stretch (3 s).
pub const RTT_FRESH_MAX: Duration = Duration::from_millis(2500);

/// How often the members' addresses are remembered and dissemination refitted.
pub const REMEMBER_EVERY: Duration = Duration::from_secs(10);

/// One open connection as the driver samples it for [`Core::handle_rtts`] (quinn's
/// connection statistics).
#[derive(Clone, Copy, Debug)]
pub struct LinkSample {
    /// The connection's `stable_id`: a connection replaced starts afresh.
    pub conn: usize,
    /// QUIC's smoothed round trip.
    pub rtt: Duration,
    /// ACK frames received so far (counted once decrypted: a stranger cannot move it).
    pub acked: u64,
    /// Frames sent so far that the peer must acknowledge (stream, datagram, ping).
    pub asked: u64,
}

/// What [`Core::handle_rtts`] keeps of one connection between two samples.
#[derive(Clone, Copy, Debug)]
struct Heard {
    conn: usize,
    acked: u64,
    asked: u64,
    /// Since when this agent has sent on it with no acknowledgement back.
    unanswered_since: Option<Instant>,
}

/// What survives a restart, in `data_dir/mesh/self.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remembered {
    pub bump: u16,
    pub version: u64,
    pub peers: BTreeSet<SocketAddr>,
}

/// Something for the network layer to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transmit {
    /// A membership packet, as a datagram; dialling the member first only if `dial` (see
    /// [`Output::Send`]).
    Datagram {
        to: SocketAddr,
        data: Vec<u8>,
        dial: bool,
    },
    /// A host-state message, on a stream of its own.
    Gossip { to: SocketAddr, msg: GossipMsg },
}

/// What happened, for the driver to log or act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Up(MemberId),
    /// A member was declared down; `left` when its last record says it left on purpose.
    Down {
        id: MemberId,
        left: bool,
    },
    /// The mesh had declared this agent down; it rejoined under a renewed identity.
    Rejoined(MemberId),
    /// No member is reachable; the agent is joining again through its seeds.
    Alone,
    /// A member down for longer than the configured time was forgotten, record and all.
    Forgotten(MemberId),
    /// Write this to `data_dir/mesh/self.json` (off the event loop; only the latest
    /// matters).
    Persist(Remembered),
}

#[derive(Debug)]
enum Timer {
    Swim(membership::Timer),
    AntiEntropy,
    Rejoin,
    Remember,
    GraceEnds,
}

/// One agent's side of the mesh, without IO.
pub struct Core {
    membership: Membership,
    table: HostTable,
    timers: TimerQueue<Timer>,
    seeds: Vec<SocketAddr>,
    /// Members' addresses as last remembered.
    known: BTreeSet<SocketAddr>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    /// What was last handed out to persist.
    persisted: Option<Remembered>,
    /// The wall clock at `started` (ms since the epoch): record versions are checked
    /// against the wall clock, which the core derives from `now`.
    wall_ms_at_start: u64,
    started: Instant,
    health: Health,
    /// The links' round trip stretches the failure detection (said once per change).
    slow_links: bool,
    /// Per open connection, what its last sample said (see [`Self::handle_rtts`]).
    heard: HashMap<SocketAddr, Heard>,
}

/// This agent's own health, after Lifeguard's "local health multiplier" (memberlist): an
/// agent whose event loop runs late (a fleet starting at once on few cores, a noisy
/// neighbour) would miss answers that did arrive and suspect members that are fine. Each
/// time timers fire more than [`LATE`] behind, the level rises by one (up to
/// [`membership::MAX_OVERLOAD`]); after [`CALM_FOR`] on time, it falls by one. The
/// membership stretches suspicion and its own checks by the level (foca fixes the probe
/// timing).
#[derive(Debug)]
struct Health {
    level: u8,
    calm_since: Instant,
}

/// Timers firing later than this mean the agent is overloaded.
pub const LATE: Duration = Duration::from_millis(100);
/// How long timers must fire on time before the overload level falls by one.
pub const CALM_FOR: Duration = Duration::from_secs(5);

impl Health {
    /// Takes how late timers fired at `now`; returns the new level when it changed.
    fn observe(&mut self, now: Instant, late: Duration) -> Option<u8> {
        if late > LATE {
            self.calm_since = now;
            if self.level < membership::MAX_OVERLOAD {
                self.level += 1;
                return Some(self.level);
            }
        } else if self.level > 0 && now.saturating_duration_since(self.calm_since) >= CALM_FOR {
            self.calm_since = now;
            self.level -= 1;
            return Some(self.level);
        }
        None
    }
}

impl Core {
    /// A node about to join: `membership` and `table` made for this agent, `seeds` and
    /// `known` (the peers remembered from a previous life) to announce itself to.
    pub fn new(
        now: Instant,
        wall_ms: u64,
        membership: Membership,
        table: HostTable,
        seeds: Vec<SocketAddr>,
        known: BTreeSet<SocketAddr>,
    ) -> Core {
        let mut core = Core {
            wall_ms_at_start: wall_ms,
            started: now,
            membership,
            table,
            timers: TimerQueue::default(),
            seeds,
            known,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            persisted: None,
            health: Health {
                level: 0,
                calm_since: now,
            },
            slow_links: false,
            heard: HashMap::new(),
        };
        core.timers
            .push(now + ANTI_ENTROPY_EVERY, Timer::AntiEntropy);
        core.timers.push(now + REJOIN_EVERY, Timer::Rejoin);
        core.timers.push(now + REMEMBER_EVERY, Timer::Remember);
        core.membership.set_grace(true);
        core.timers
            .push(now + membership::MIN_STARTUP_GRACE, Timer::GraceEnds);
        core.persist();
        core.join(now);
        core
    }

    pub fn me(&self) -> &MemberId {
        self.membership.id()
    }

    pub fn table(&self) -> &HostTable {
        &self.table
    }

    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// What `shoal hosts` shows.
    pub fn hosts(&self) -> Vec<HostView> {
        view::views(self.me(), &self.table, self.membership.states())
    }

    /// The addresses of the members alive now.
    pub fn alive_addrs(&self) -> Vec<SocketAddr> {
        self.membership.alive().map(|m| m.addr).collect()
    }

    /// A membership packet from the member whose certificate names `sender`, over a
    /// connection from `remote`.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        sender: &str,
        remote: SocketAddr,
        data: &[u8],
    ) -> Result<(), membership::PacketError> {
        let out = self.membership.handle_data(sender, remote, data)?;
        self.apply(now, out);
        Ok(())
    }

    /// The wall clock at `now`, in ms since the epoch.
    fn wall_ms(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.started).as_millis();
        self.wall_ms_at_start
            .saturating_add(u64::try_from(since).unwrap_or(u64::MAX))
    }

    /// Stops trusting records signed by certificates the fleet CA revoked: new ones are
    /// refused, those held are dropped, and the members they name are declared down at
    /// once (no probe need confirm it), as are `also` (the names on the revoked
    /// certificates of connections the driver cut, whose records may not be held).
    pub fn revoke(&mut self, now: Instant, list: &RevocationList, also: &[String]) {
        self.table
            .authority_mut()
            .set_revoked(list.serials.iter().cloned().collect());
        let mut revoked: Vec<String> = self
            .table
            .records()
            .map(|r| r.name.clone())
            .filter(|name| {
                self.table
                    .signed(name)
                    .is_some_and(|s| list.is_revoked(&s.cert))
            })
            .collect();
        for name in also {
            if !revoked.contains(name) {
                revoked.push(name.clone());
            }
        }
        for name in revoked {
            let out = self.membership.expel(&name);
            self.apply(now, out);
            self.table.forget(&name);
        }
    }

    /// The round trip measured on each open connection (QUIC's smoothed RTT), every
    /// [`RTTS_EVERY`]: the failure detection waits longer on slow or loaded links (see
    /// [`Membership::set_rtts`]). A connection's round trip stops counting once this agent
    /// has sent on it and no acknowledgement came back for [`RTT_FRESH`] (four of its
    /// round trips on a slower link, at most [`RTT_FRESH_MAX`]): QUIC keeps the
    /// last estimate of a peer that went silent, such as a member killed while its link
    /// was loaded. A loaded link that answers is acknowledged all the time; an idle one
    /// keeps its estimate (nothing says it changed).
    pub fn handle_rtts(
        &mut self,
        now: Instant,
        links: impl IntoIterator<Item = (SocketAddr, LinkSample)>,
    ) {
        let mut heard = HashMap::new();
        let mut fresh = Vec::new();
        for (addr, link) in links {
            // quinn's `stable_id` is an address, which a later connection may reuse: a
            // count that went back is another connection too.
            let before = self
                .heard
                .get(&addr)
                .filter(|h| h.conn == link.conn && h.acked <= link.acked && h.asked <= link.asked);
            let unanswered_since = match before {
                None => None,
                Some(h) if h.acked != link.acked => None,
                Some(h) if h.asked != link.asked => h.unanswered_since.or(Some(now)),
                Some(h) => h.unanswered_since,
            };
            heard.insert(
                addr,
                Heard {
                    conn: link.conn,
                    acked: link.acked,
                    asked: link.asked,
                    unanswered_since,
                },
            );
            let wait = (link.rtt * 4).clamp(RTT_FRESH, RTT_FRESH_MAX);
            if unanswered_since.is_none_or(|t| now.saturating_duration_since(t) < wait) {
                fresh.push((addr, link.rtt));
            }
        }
        self.heard = heard;
        let before = self.membership.stretch(None);
        self.membership.set_rtts(fresh);
        let after = self.membership.stretch(None);
        let median = self.membership.median_rtt();
        // Said when the links turn slow, and when they are fast again with room to spare:
        // a round trip near 50 ms would otherwise log it twice a second. The steps
        // between, at debug.
        if !self.slow_links && after >= 2 {
            self.slow_links = true;
            tracing::info!(
                stretch = after,
                median_rtt_ms = median.as_millis() as u64,
                "the links' round trip changed: the failure detection waits {after} times \
                 as long as on a fast link"
            );
        } else if self.slow_links && median < membership::RTT_BUDGET * 4 / 5 {
            self.slow_links = false;
            tracing::info!(
                median_rtt_ms = median.as_millis() as u64,
                "the links' round trip changed: the failure detection is as on a fast link"
            );
        } else if after != before {
            tracing::debug!(stretch = after, "the links' round trip changed");
        }
    }

    /// A host-state message from the agent at `from`.
    pub fn handle_gossip(&mut self, now: Instant, from: SocketAddr, msg: GossipMsg) {
        let peers = self.alive_addrs();
        let now_ms = self.wall_ms(now);
        let (out, learned) = self.table.handle(from, msg, &peers, now_ms);
        for record in learned {
            tracing::debug!(host = %record.name, version = record.version, left = record.left, "learned a host record");
        }
        self.gossip(out);
        self.persist();
    }

    /// What this host runs and its tags, as they change. A state over the record's caps is
    /// refused with a warning naming the cap; the record published before stays.
    pub fn handle_local(&mut self, now: Instant, state: LocalState) {
        let peers = self.alive_addrs();
        let before = self.table.own().version;
        let now_ms = self.wall_ms(now);
        let out = match self.table.publish(
            |r| {
                r.tags = state.tags;
                r.apps = state.apps;
                r.log = state.log;
            },
            &peers,
            now_ms,
        ) {
            Ok(out) => out,
            Err(e) => {
                tracing::warn!("this host's new state was not published: {e}");
                Vec::new()
            }
        };
        if self.table.own().version != before {
            tracing::debug!(
                version = self.table.own().version,
                "published this host's record"
            );
        }
        self.gossip(out);
        self.persist();
    }

    /// Fires every timer due by `now`. Timers that fire late mean this agent is too busy
    /// to trust its own probes (see [`Health`]).
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut late = Duration::ZERO;
        while let Some((due, timer)) = self.timers.pop_due(now) {
            late = late.max(now.saturating_duration_since(due));
            match timer {
                Timer::Swim(t) => {
                    let out = self.membership.handle_timer(t);
                    self.apply(now, out);
                }
                Timer::AntiEntropy => {
                    let peers = self.alive_addrs();
                    let out = self.table.anti_entropy(&peers);
                    self.gossip(out);
                    self.timers
                        .push(now + ANTI_ENTROPY_EVERY, Timer::AntiEntropy);
                }
                Timer::Rejoin => {
                    if self.membership.alive().next().is_none() {
                        self.join(now);
                    }
                    self.timers.push(now + REJOIN_EVERY, Timer::Rejoin);
                }
                Timer::GraceEnds => {
                    // Over once the agent keeps time (or at the latest STARTUP_GRACE): a
                    // calm start does not leave deaths undetected for long.
                    let calm = self.health.level == 0
                        && now.saturating_duration_since(self.health.calm_since) >= CALM_FOR;
                    if calm
                        || now.saturating_duration_since(self.started) >= membership::STARTUP_GRACE
                    {
                        self.membership.set_grace(false);
                    } else {
                        self.timers
                            .push(now + Duration::from_secs(1), Timer::GraceEnds);
                    }
                }
                Timer::Remember => {
                    self.membership.fit_size();
                    let alive: BTreeSet<SocketAddr> = self.alive_addrs().into_iter().collect();
                    if !alive.is_empty() {
                        self.known = alive;
                    }
                    self.persist();
                    self.timers.push(now + REMEMBER_EVERY, Timer::Remember);
                }
            }
        }
        if let Some(level) = self.health.observe(now, late) {
            if late > LATE {
                tracing::info!(
                    late_ms = late.as_millis() as u64,
                    level,
                    "this agent is late on its timers: its failure detection waits longer"
                );
            } else {
                tracing::info!(
                    level,
                    "this agent keeps time again: its failure detection waits less"
                );
            }
            self.membership.set_overload(level);
        }
    }

    /// Leaves: first the record that says so, then SWIM's leave.
    pub fn leave(&mut self, now: Instant) {
        let peers = self.alive_addrs();
        if !peers.is_empty() {
            self.known = peers.iter().copied().collect();
        }
        let now_ms = self.wall_ms(now);
        match self.table.publish(|r| r.left = true, &peers, now_ms) {
            Ok(out) => self.gossip(out),
            Err(e) => tracing::warn!("the record saying this host left was not published: {e}"),
        }
        let out = self.membership.leave();
        self.apply(now, out);
        self.persist();
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When `handle_timeout` must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next_deadline()
    }

    /// Announces this agent to its seeds and to the members it last knew.
    fn join(&mut self, now: Instant) {
        let me = self.me().addr;
        let targets: BTreeSet<SocketAddr> = self
            .seeds
            .iter()
            .chain(self.known.iter())
            .copied()
            .filter(|a| *a != me)
            .collect();
        for addr in targets {
            let out = self.membership.join(addr);
            self.apply(now, out);
        }
    }

    fn apply(&mut self, now: Instant, outputs: Vec<Output>) {
        for output in outputs {
            match output {
                Output::Send { to, data, dial } => {
                    if to.addr != self.me().addr {
                        self.transmits.push_back(Transmit::Datagram {
                            to: to.addr,
                            data,
                            dial,
                        });
                    }
                }
                Output::Schedule { timer, after } => {
                    self.timers.push(now + after, Timer::Swim(timer));
                }
                Output::Up(id) => {
                    let digest = self.table.digest_to(id.addr);
                    self.gossip(vec![digest]);
                    // An agent that remembers no one but itself (a first start whose only
                    // seed is itself) remembers its first peer at once, not at the next
                    // `REMEMBER_EVERY`: killed before then, it could not rejoin.
                    let me = self.me().addr;
                    if self.known.iter().all(|a| *a == me) && id.addr != me {
                        self.known.insert(id.addr);
                        self.persist();
                    }
                    self.events.push_back(Event::Up(id));
                }
                Output::Down(id) => {
                    let left = self.table.get(&id.name).is_some_and(|r| r.left);
                    self.events.push_back(Event::Down { id, left });
                }
                Output::Rejoined(id) => {
                    self.events.push_back(Event::Rejoined(id));
                    self.persist();
                }
                Output::Idle => {
                    self.events.push_back(Event::Alone);
                    self.join(now);
                }
                Output::Forgotten(id) => {
                    // Long dead (or replaced at its address): its record goes too, with a
                    // tombstone so gossip does not bring the same record back.
                    self.table.forget(&id.name);
                    self.events.push_back(Event::Forgotten(id));
                }
            }
        }
    }

    fn gossip(&mut self, out: Vec<Outgoing>) {
        let me = self.me().addr;
        for Outgoing { to, msg } in out {
            if to != me {
                self.transmits.push_back(Transmit::Gossip { to, msg });
            }
        }
    }

    /// Hands out what to remember, when it changed.
    fn persist(&mut self) {
        let now = Remembered {
            bump: self.me().bump,
            version: self.table.own().version,
            peers: self.known.clone(),
        };
        if self.persisted.as_ref() != Some(&now) {
            self.persisted = Some(now.clone());
            self.events.push_back(Event::Persist(now));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::hoststate::{HostRecord, SimAuthority};
    use std::collections::BTreeMap;

    const WALL: u64 = 1_800_000_000_000;

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([127, 9, 0, i], 7400))
    }

    fn core(i: u8, seeds: Vec<SocketAddr>, now: Instant) -> Core {
        let id = MemberId {
            name: format!("n{i}"),
            addr: addr(i),
            bump: 1,
        };
        let record = HostRecord {
            name: id.name.clone(),
            addr: id.addr,
            version: 1,
            left: false,
            tags: BTreeMap::new(),
            apps: BTreeMap::new(),
            log: None,
        };
        let authority = Box::new(SimAuthority::new(&id.name, b"fleet"));
        Core::new(
            now,
            WALL,
            Membership::new(
                id,
                membership::config(8, membership::FORGET_DOWN_AFTER),
                u64::from(i),
            ),
            HostTable::new(record, authority, u64::from(i)).unwrap(),
            seeds,
            BTreeSet::new(),
        )
    }

    fn drain(c: &mut Core) -> (Vec<Transmit>, Vec<Event>) {
        let t = std::iter::from_fn(|| c.poll_transmit()).collect();
        let e = std::iter::from_fn(|| c.poll_event()).collect();
        (t, e)
    }

    /// Delivers every transmit among `cores` until none is left (or `rounds` pass), firing
    /// timers up to `until`.
    fn run(cores: &mut [Core], now: &mut Instant, until: Instant) -> Vec<(usize, Event)> {
        let mut events = Vec::new();
        while *now <= until {
            let mut moved = true;
            while moved {
                moved = false;
                for i in 0..cores.len() {
                    let (ts, es) = drain(&mut cores[i]);
                    events.extend(es.into_iter().map(|e| (i, e)));
                    for t in ts {
                        moved = true;
                        let from = cores[i].me().clone();
                        match t {
                            Transmit::Datagram { to, data, .. } => {
                                if let Some(j) = cores.iter().position(|c| c.me().addr == to) {
                                    let _ = cores[j]
                                        .handle_datagram(*now, &from.name, from.addr, &data);
                                }
                            }
                            Transmit::Gossip { to, msg } => {
                                if let Some(j) = cores.iter().position(|c| c.me().addr == to) {
                                    cores[j].handle_gossip(*now, from.addr, msg);
                                }
                            }
                        }
                    }
                }
            }
            *now += Duration::from_millis(50);
            for c in cores.iter_mut() {
                c.handle_timeout(*now);
            }
        }
        events
    }

    #[test]
    fn a_round_trip_stops_counting_when_what_was_sent_is_not_acknowledged() {
        let mut now = Instant::now();
        let mut cores = vec![core(1, vec![], now), core(2, vec![addr(1)], now)];
        let until = now + Duration::from_secs(2);
        run(&mut cores, &mut now, until);
        let c = &mut cores[0];
        let stretch = |c: &Core| c.membership().stretch(Some(addr(2)));
        let link = |conn, acked, asked| LinkSample {
            conn,
            rtt: Duration::from_millis(300),
            acked,
            asked,
        };
        let mut at = |c: &mut Core, after: Duration, sample: LinkSample| {
            now += after;
            c.handle_rtts(now, [(addr(2), sample)]);
            stretch(c)
        };
        assert_eq!(at(c, RTTS_EVERY, link(1, 10, 10)), 6, "a loaded link");
        assert_eq!(at(c, RTTS_EVERY, link(1, 20, 20)), 6, "that answers");
        // Idle: nothing sent, nothing back, for long: its estimate stays.
        assert_eq!(at(c, RTT_FRESH * 10, link(1, 20, 20)), 6, "an idle link");
        // Sent to, and no acknowledgement: it counts a while, then no more (as if killed).
        assert_eq!(at(c, RTTS_EVERY, link(1, 20, 21)), 6);
        assert_eq!(at(c, RTT_FRESH - RTTS_EVERY, link(1, 20, 25)), 6);
        assert_eq!(
            at(c, RTTS_EVERY, link(1, 20, 25)),
            1,
            "unanswered for RTT_FRESH"
        );
        assert_eq!(at(c, RTT_FRESH, link(1, 20, 25)), 1, "nor once idle again");
        // An acknowledgement: it counts again.
        assert_eq!(at(c, RTTS_EVERY, link(1, 21, 25)), 6);
        // A connection replaced starts afresh, whatever its counts.
        at(c, RTTS_EVERY, link(1, 21, 26));
        assert_eq!(at(c, RTT_FRESH, link(1, 21, 27)), 1);
        assert_eq!(at(c, RTTS_EVERY, link(2, 21, 27)), 6, "a new connection");
        // A slower link waits four of its round trips (a lost packet sent again): 600 ms
        // answered after 1.8 s still counts; at most RTT_FRESH_MAX.
        let slow = |acked, asked| LinkSample {
            rtt: Duration::from_millis(600),
            ..link(3, acked, asked)
        };
        assert_eq!(at(c, RTTS_EVERY, slow(1, 1)), 10);
        assert_eq!(at(c, RTTS_EVERY, slow(1, 2)), 10);
        assert_eq!(
            at(c, Duration::from_millis(1800), slow(1, 2)),
            10,
            "lost, sent again"
        );
        let ms = Duration::from_millis;
        assert_eq!(at(c, ms(600), slow(1, 3)), 1, "four round trips, 2.4 s");
        assert_eq!(at(c, RTTS_EVERY, slow(2, 3)), 10);
        let slowest = |acked, asked| LinkSample {
            rtt: Duration::from_secs(5),
            ..link(3, acked, asked)
        };
        at(c, RTTS_EVERY, slowest(2, 4));
        assert_eq!(at(c, RTT_FRESH_MAX, slowest(2, 4)), 1, "capped");
        // Counts that went back: another connection that reused the id.
        assert_eq!(at(c, RTTS_EVERY, slow(0, 0)), 10);
        // A connection closed and gone: no round trip at all.
        assert_eq!(
            {
                now += RTTS_EVERY;
                c.handle_rtts(now, []);
                stretch(c)
            },
            1
        );
    }

    #[test]
    fn a_new_node_announces_to_its_seeds_and_asks_to_persist() {
        let now = Instant::now();
        let mut c = core(2, vec![addr(1), addr(2)], now);
        let (ts, es) = drain(&mut c);
        assert!(
            ts.iter()
                .all(|t| matches!(t, Transmit::Datagram { to, .. } if *to == addr(1))),
            "announces to the seed, never to itself: {ts:?}"
        );
        assert!(!ts.is_empty());
        assert!(matches!(&es[..], [Event::Persist(r)] if r.version == 1));
        assert_eq!(c.poll_timeout(), Some(now + ANTI_ENTROPY_EVERY));
    }

    #[test]
    fn members_come_up_trade_records_and_a_change_reaches_the_other() {
        let mut now = Instant::now();
        let mut cores = vec![core(1, vec![], now), core(2, vec![addr(1)], now)];
        let events = run(
            &mut cores,
            &mut now,
            Instant::now() + Duration::from_secs(2),
        );
        assert!(
            events
                .iter()
                .any(|(i, e)| *i == 0 && matches!(e, Event::Up(id) if id.name == "n2")),
            "{events:?}"
        );
        assert_eq!(cores[0].table().get("n2").map(|r| r.version), Some(1));
        let mut tags = BTreeMap::new();
        tags.insert("role".to_string(), "inference".to_string());
        cores[1].handle_local(
            now,
            LocalState {
                tags,
                apps: BTreeMap::new(),
                log: None,
            },
        );
        let until = now + Duration::from_millis(100);
        run(&mut cores, &mut now, until);
        let seen = cores[0].table().get("n2").unwrap();
        assert_eq!(seen.tags.get("role").map(String::as_str), Some("inference"));
        assert!(cores[0].hosts().iter().any(|h| h.name == "n2"));
    }

    #[test]
    fn a_node_with_no_one_to_remember_remembers_its_first_peer_at_once() {
        let mut now = Instant::now();
        let mut cores = vec![core(1, vec![], now), core(2, vec![addr(1)], now)];
        let until = now + Duration::from_secs(2);
        let events = run(&mut cores, &mut now, until);
        assert!(
            Duration::from_secs(2) < REMEMBER_EVERY,
            "well before the periodic save"
        );
        assert!(
            events
                .iter()
                .any(|(i, e)| *i == 0
                    && matches!(e, Event::Persist(r) if r.peers.contains(&addr(2)))),
            "n1 saved n2's address as soon as it came up: {events:?}"
        );
    }

    #[test]
    fn a_lone_node_rejoins_through_its_seeds_on_its_schedule() {
        let now = Instant::now();
        let mut c = core(2, vec![addr(1)], now);
        drain(&mut c);
        c.handle_timeout(now + REJOIN_EVERY - Duration::from_millis(1));
        assert!(
            !std::iter::from_fn(|| c.poll_transmit())
                .any(|t| matches!(t, Transmit::Datagram { to, .. } if to == addr(1))),
            "not before its time"
        );
        c.handle_timeout(now + REJOIN_EVERY);
        let ts: Vec<_> = std::iter::from_fn(|| c.poll_transmit()).collect();
        assert!(
            ts.iter()
                .any(|t| matches!(t, Transmit::Datagram { to, .. } if *to == addr(1))),
            "{ts:?}"
        );
    }

    #[test]
    fn an_agent_late_on_its_timers_waits_longer_before_suspecting() {
        let start = Instant::now();
        let mut c = core(2, vec![addr(1)], start);
        drain(&mut c);
        // On time: nothing changes.
        let mut now = start;
        while now < start + Duration::from_secs(2) {
            now = c.poll_timeout().unwrap();
            c.handle_timeout(now);
        }
        assert_eq!(c.membership.overload(), 0);
        // Twice 300 ms late: two levels.
        for _ in 0..2 {
            now = c.poll_timeout().unwrap() + Duration::from_millis(300);
            c.handle_timeout(now);
        }
        assert_eq!(c.membership.overload(), 2);
        // Still in its start-up grace: 10 s of suspicion, three times over.
        assert_eq!(c.membership.suspicion(), Duration::from_secs(30));
        // Late without end: capped.
        for _ in 0..10 {
            now = c.poll_timeout().unwrap() + Duration::from_millis(300);
            c.handle_timeout(now);
        }
        assert_eq!(c.membership.overload(), membership::MAX_OVERLOAD);
        // On time again: one level less per CALM_FOR.
        let calm_from = now;
        while now < calm_from + CALM_FOR * 2 + Duration::from_millis(10) {
            now = c.poll_timeout().unwrap();
            c.handle_timeout(now);
        }
        assert_eq!(c.membership.overload(), membership::MAX_OVERLOAD - 2);
    }

    #[test]
    fn the_start_up_grace_ends_early_only_for_an_agent_that_keeps_time() {
        let start = Instant::now();
        let mut calm = core(2, vec![addr(1)], start);
        let mut busy = core(3, vec![addr(1)], start);
        drain(&mut calm);
        drain(&mut busy);
        let until = start + membership::MIN_STARTUP_GRACE + Duration::from_millis(100);
        let mut now = start;
        while now < until {
            now = calm.poll_timeout().unwrap();
            calm.handle_timeout(now);
        }
        assert_eq!(calm.membership.suspicion(), Duration::from_secs(1));
        let mut now = start;
        while now < until {
            // Every round 200 ms late.
            now = busy.poll_timeout().unwrap() + Duration::from_millis(200);
            busy.handle_timeout(now);
        }
        assert!(busy.membership.suspicion() >= Duration::from_secs(10));
        // At the latest after STARTUP_GRACE, and then only the overload stretches it.
        while now < start + membership::STARTUP_GRACE + Duration::from_secs(2) {
            now = busy.poll_timeout().unwrap() + Duration::from_millis(200);
            busy.handle_timeout(now);
        }
        assert_eq!(
            busy.membership.suspicion(),
            Duration::from_secs(1) * (1 + u32::from(busy.membership.overload()))
        );
    }

    #[test]
    fn a_dead_member_is_reported_and_leaving_is_told() {
        let mut now = Instant::now();
        let mut cores = vec![
            core(1, vec![], now),
            core(2, vec![addr(1)], now),
            core(3, vec![addr(1)], now),
        ];
        run(
            &mut cores,
            &mut now,
            Instant::now() + Duration::from_secs(3),
        );
        assert_eq!(cores[0].alive_addrs().len(), 2);
        // n3 leaves gracefully: the others see it down, and left.
        cores[2].leave(now);
        let until = now + Duration::from_secs(2);
        let events = run(&mut cores[..], &mut now, until);
        assert!(
            events
                .iter()
                .any(|(i, e)| *i == 0
                    && matches!(e, Event::Down { id, left: true } if id.name == "n3")),
            "{events:?}"
        );
        // n2 dies silently: n1 declares it down, not left (still in its start-up grace,
        // when a suspect has 10 s to refute).
        let mut survivors: Vec<Core> = cores.drain(..1).collect();
        let until = now + Duration::from_secs(13);
        let events = run(&mut survivors, &mut now, until);
        assert!(
            events
                .iter()
                .any(|(_, e)| matches!(e, Event::Down { id, left: false } if id.name == "n2")),
            "{events:?}"
        );
    }
}
