//! The swarm's decisions, sans I/O: which chunk of a revision to ask which peer for, when
//! to ask a peer again what it holds, and what to make of each answer. The driver
//! (`blobs::chunked`) does the asking and feeds the answers back, in quinn-proto's manner:
//! `handle_*(now, ..)` in, [`Swarm::poll_action`] and [`Swarm::poll_timeout`] out.
//!
//! - **Sources.** A peer is a *holder* (it holds the whole revision), a *fetcher* (it is
//!   fetching it too: what it holds is asked with `Have` every [`Config::have_every`]), or
//!   an *origin* (the uploader the coordinator named). Origins are asked only for chunks no
//!   other peer holds, and with a shorter pipeline, so that the uploader is one source among
//!   others and not the server of everyone.
//! - **Rarest first.** Among the chunks a peer can give, those the fewest peers hold come
//!   first. Ties are broken by a rotation that differs per fetcher (the fetchers' sorted
//!   names give each an index; a chunk's first 8 bytes pick its turn), so fetchers that start
//!   together take different parts from the origin and then trade them. While patient, a
//!   fetcher whose own part is all asked helps the next one with its part, from the
//!   origin, starting at the other end of it, so that the origin's link stays busy. It
//!   leaves the part's first two shares of the origin (see below) not yet held to
//!   their owner (what the owner may have asked and not yet said it holds, its `Have`
//!   being asked every [`Config::have_every`]), so that the two seldom ask the origin for
//!   one chunk.
//! - **Pipelining.** Each peer has up to [`Config::pipeline`] batches of up to
//!   [`Config::batch`] chunks in flight. The origin has [`Config::origin_window`] chunks
//!   in flight to all fetchers together, each taking its share, so that what waits in the
//!   origin's queue, which nobody else can share yet, stays short. A batch is
//!   asked of a peer only while what is asked of peers and not yet come is below this
//!   fetch's recent rate: the bytes it stored in the last [`Config::in_flight_time`], or
//!   [`Config::min_in_flight_bytes`]. Neither the origin's few requests nor the end game's
//!   are held back by it.
//! - **Re-asking.** A batch past its deadline (counted from its start, and again from each
//!   chunk it brings: a peer that many share is slow, not late, while its chunks come; but
//!   never past [`Config::stretch`] times the first) is given up (its chunks go back to be
//!   asked elsewhere) and counts against the peer: after [`Config::strikes`] failures in a
//!   row the peer is dropped, but for an origin, which is left alone for
//!   [`Config::origin_rest`] instead (it may be the only source, slow because every host
//!   asks it at once; a fetch it cannot serve ends by the driver's deadline). Once every
//!   missing chunk is asked of someone (the end game), a peer with nothing in flight is
//!   asked for chunks in flight elsewhere, so one slow peer does not hold up the end. Not
//!   before: a chunk asked twice crosses this host's link twice.
//! - **Answers that are not failures.** A busy peer rests for [`Config::busy_rest`]; a
//!   peer taken to hold everything that lacks a chunk is not asked for it again (whatever
//!   gossip says next), and the origin gives it.
//! - **Bounds.** At most [`Config::max_peers`] sources besides the origin, at most
//!   [`Config::max_in_flight`] batches in flight in all.
//! - **Avoiding liars.** A peer that sends a chunk whose bytes do not match its name is
//!   dropped at once, its answers in flight ignored: the chunks come from others.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crate::chunks::ChunkId;
use crate::mesh::timers::TimerQueue;

/// The swarm's tuning.
#[derive(Clone, Debug)]
pub struct Config {
    /// Chunks per request.
    pub batch: usize,
    /// Requests in flight per peer.
    pub pipeline: usize,
    /// Requests in flight per origin, and chunks per request to it (small: what is in
    /// flight from the origin is not yet anyone's to share), at most: see
    /// [`Config::origin_window`].
    pub origin_pipeline: usize,
    pub origin_batch: usize,
    /// The chunks in flight from the origin to all fetchers together, which each fetcher
    /// takes its share of (at least 2 chunks, at most `origin_batch × origin_pipeline`;
    /// the fetchers counted are those still fetching and not dropped; the most once
    /// impatient):
    /// enough to keep the origin's link full, and no more, since each chunk waiting in
    /// its queue is one the other fetchers get that much later. On the bench (16 hosts on
    /// 10 Mbit/s links) 8 chunks per fetcher, 4 MiB in all, made every chunk wait about
    /// 3 s at the origin before the swarm could share it.
    pub origin_window: usize,
    /// How long without a chunk stored before the origin is asked for any chunk outside
    /// this fetcher's turn and the next one's (another fetcher's part that is slow to
    /// come).
    pub patience: Duration,
    /// How often a fetcher is asked what it holds.
    pub have_every: Duration,
    /// How long a batch may take: this, plus its bytes at [`Config::min_rate`], counted
    /// again from each chunk that comes for the bytes left (a slow peer is not late while
    /// it moves), but never more than [`Config::stretch`] times its first deadline.
    pub batch_base: Duration,
    /// The rate a batch's deadline reckons with, in bytes per second: the bytes still to
    /// come, at this rate, on top of [`Config::batch_base`].
    pub min_rate: u64,
    /// How many times its first deadline a batch may take in all, however its chunks
    /// trickle in: a peer that sends a chunk now and then does not keep them from others.
    pub stretch: u32,
    /// Deadlines missed (or requests failed) in a row before a peer is dropped.
    pub strikes: u32,
    /// Batches in flight from all peers together (the driver lowers it to what a
    /// download rate moves in a few seconds, so that no batch misses its deadline waiting
    /// on this host's own limit).
    pub max_in_flight: usize,
    /// Peers kept as sources (the origin aside): enough to spread the load, few enough
    /// that asking each what it holds stays cheap in a large fleet.
    pub max_peers: usize,
    /// How long a peer that answered busy is left alone.
    pub busy_rest: Duration,
    /// How long the origin is left alone after [`Config::strikes`] failures in a row (and
    /// after each one more): it is not dropped.
    pub origin_rest: Duration,
    /// Bytes asked of peers (the origin aside) and not yet come: a batch is asked only
    /// while they are fewer than what this fetch stored in the last
    /// [`Config::in_flight_time`], or than this (at least 1).
    pub min_in_flight_bytes: u64,
    /// How much of this fetch's recent rate may be asked ahead (see
    /// [`Config::min_in_flight_bytes`]): enough to cover the time a request takes, little
    /// enough that the end game re-asks little and that what is asked reflects who holds
    /// what now.
    pub in_flight_time: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            batch: 16,
            pipeline: 4,
            origin_pipeline: 2,
            origin_batch: 4,
            origin_window: 32,
            patience: Duration::from_secs(1),
            have_every: Duration::from_millis(250),
            batch_base: Duration::from_secs(5),
            min_rate: 256 * 1024,
            stretch: 3,
            strikes: 3,
            max_in_flight: 64,
            max_peers: 40,
            busy_rest: Duration::from_millis(250),
            origin_rest: Duration::from_secs(1),
            min_in_flight_bytes: 2 << 20,
            in_flight_time: Duration::from_secs(2),
        }
    }
}

/// What a peer is to this fetch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Holds the whole revision.
    Holder,
    /// Fetching it too: holds what its last `Have` said.
    Fetcher,
    /// The uploader: holds it all, asked last.
    Origin,
}

/// What the driver is to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Ask `peer` which chunks of the revision it holds; answer with
    /// [`Swarm::handle_have`] or [`Swarm::handle_have_failed`].
    AskHave { peer: String },
    /// Ask `peer` for these chunks; answer each with [`Swarm::handle_chunk`], then
    /// [`Swarm::handle_batch_end`].
    Fetch {
        batch: u64,
        peer: String,
        chunks: Vec<(ChunkId, u32)>,
    },
}

/// What became of one chunk asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Got {
    /// Its bytes matched its name and are stored.
    Stored,
    /// The peer said it does not hold it.
    Missing,
    /// Its bytes did not match its name: the peer is dropped.
    Corrupt,
}

/// How a batch ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Every chunk was answered.
    Done,
    /// The peer was answering all it may: left alone for a moment, not held against it.
    Busy,
    /// The request failed (the stream, a deadline, a refusal), and why.
    Failed(String),
}

/// What a peer holds, as far as known.
#[derive(Clone, Debug)]
enum Holds {
    All,
    Some(Vec<bool>),
    Unknown,
}

#[derive(Debug)]
struct PeerState {
    role: Role,
    holds: Holds,
    in_flight: usize,
    strikes: u32,
    /// Why it was dropped, if it was.
    dropped: Option<String>,
    asking_have: bool,
    have_due: bool,
    /// Bytes of chunks it gave that were stored.
    bytes: u64,
    /// Chunks it said it lacks although it was taken to hold them all: not asked of it
    /// again during this fetch (whatever gossip says).
    lacks: std::collections::HashSet<usize>,
    /// Left alone until then (it answered busy).
    resting_until: Option<Instant>,
}

impl PeerState {
    fn holds(&self, i: usize) -> bool {
        match &self.holds {
            Holds::All => !self.lacks.contains(&i),
            Holds::Some(bits) => bits[i],
            Holds::Unknown => false,
        }
    }
}

struct Batch {
    peer: String,
    chunks: Vec<usize>,
    /// Chunks of the batch not answered yet, and their bytes.
    open: usize,
    open_bytes: u64,
    /// When it is given up: see [`Swarm::due`]; and the latest that may ever be.
    deadline: Instant,
    latest: Instant,
}

enum Timer {
    Batch(u64),
    Have(String),
    /// A peer's rest after a busy answer is over.
    Rest,
    /// The patience may be over (nothing stored since `progress_at`): a moment to decide
    /// again. One at most is queued ([`Swarm::patience_armed`]).
    Patience,
}

/// One revision's fetch: see the module documentation.
pub struct Swarm {
    config: Config,
    me: String,
    chunks: Vec<(ChunkId, u32)>,
    index: HashMap<ChunkId, usize>,
    held: Vec<bool>,
    missing: usize,
    /// Requests in flight per chunk.
    asked: Vec<u8>,
    peers: BTreeMap<String, PeerState>,
    batches: HashMap<u64, Batch>,
    next_batch: u64,
    timers: TimerQueue<Timer>,
    /// This fetcher's index among the fetchers known, and their number.
    turn: (usize, usize),
    /// Orders this fetcher's chunks among equals: fetchers that do not know of each other
    /// yet still start at different chunks.
    salt: u64,
    fetched_bytes: u64,
    /// When a chunk was last stored (or the fetch began).
    progress_at: Option<Instant>,
    /// A [`Timer::Patience`] is queued.
    patience_armed: bool,
    /// Batches given up (late, or their peer dropped) whose answers may still come, and
    /// from whom: a corrupt chunk among them still drops its sender.
    given_up: HashMap<u64, String>,
    /// Bytes stored lately, and when, and their sum: this fetch's recent rate.
    recent: std::collections::VecDeque<(Instant, u64)>,
    recent_bytes: u64,
}

impl Swarm {
    /// A fetch by `me` of the distinct `chunks` (sorted, each once), of which `held` says
    /// which are stored already.
    pub fn new(
        me: &str,
        chunks: Vec<(ChunkId, u32)>,
        held: impl Fn(&ChunkId) -> bool,
        config: Config,
    ) -> Swarm {
        let held: Vec<bool> = chunks.iter().map(|(id, _)| held(id)).collect();
        let missing = held.iter().filter(|h| !**h).count();
        Swarm {
            config,
            me: me.to_string(),
            index: chunks
                .iter()
                .enumerate()
                .map(|(i, (id, _))| (*id, i))
                .collect(),
            asked: vec![0; chunks.len()],
            chunks,
            held,
            missing,
            peers: BTreeMap::new(),
            batches: HashMap::new(),
            next_batch: 0,
            timers: TimerQueue::default(),
            turn: (0, 1),
            salt: {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                me.hash(&mut h);
                h.finish()
            },
            fetched_bytes: 0,
            progress_at: None,
            patience_armed: false,
            given_up: HashMap::new(),
            recent: Default::default(),
            recent_bytes: 0,
        }
    }

    /// Adds a source, or updates its role (a fetcher that finished becomes a holder). A
    /// dropped peer stays dropped.
    pub fn add_peer(&mut self, now: Instant, peer: &str, role: Role) {
        if peer == self.me {
            return;
        }
        let _ = now;
        let others = self
            .peers
            .values()
            .filter(|s| s.role != Role::Origin)
            .count();
        if !self.peers.contains_key(peer) && role != Role::Origin && others >= self.config.max_peers
        {
            return;
        }
        let state = self
            .peers
            .entry(peer.to_string())
            .or_insert_with(|| PeerState {
                role,
                holds: if role == Role::Fetcher {
                    Holds::Unknown
                } else {
                    Holds::All
                },
                in_flight: 0,
                strikes: 0,
                dropped: None,
                asking_have: false,
                have_due: role == Role::Fetcher,
                bytes: 0,
                lacks: Default::default(),
                resting_until: None,
            });
        // Only a fetcher that finished becomes a holder: what a peer was found to lack
        // stays known, whatever gossip says on its next round.
        if state.role == Role::Fetcher && role == Role::Holder {
            state.role = Role::Holder;
            state.holds = Holds::All;
        }
    }

    /// The fetchers of this revision known (from gossip), this one among them: they give
    /// each fetcher its turn (see the module documentation).
    pub fn set_fetchers(&mut self, fetchers: &[String]) {
        let mut all: Vec<&str> = fetchers.iter().map(String::as_str).collect();
        all.push(&self.me);
        all.sort_unstable();
        all.dedup();
        let me = all.iter().position(|f| *f == self.me).unwrap_or(0);
        self.turn = (me, all.len());
    }

    /// `peer` answered `Have`: `bits[i]` for the i-th chunk, or `None` when it holds none of
    /// the revision (or no longer fetches it).
    pub fn handle_have(&mut self, now: Instant, peer: &str, bits: Option<Vec<bool>>) {
        let every = self.config.have_every;
        let n = self.chunks.len();
        let Some(state) = self.peers.get_mut(peer) else {
            return;
        };
        state.asking_have = false;
        if state.dropped.is_some() {
            return;
        }
        match bits {
            Some(bits) if bits.len() == n => {
                if bits.iter().all(|b| *b) {
                    state.holds = Holds::All;
                    return;
                }
                state.holds = Holds::Some(bits);
            }
            Some(_) => {
                // Through `drop_peer`: what it was asked for goes back at once.
                self.drop_peer(peer, "its list of chunks held is not this revision's");
                return;
            }
            None => state.holds = Holds::Some(vec![false; n]),
        }
        if state.role == Role::Fetcher {
            self.timers.push(now + every, Timer::Have(peer.to_string()));
        }
    }

    /// Asking `peer` what it holds failed.
    pub fn handle_have_failed(&mut self, now: Instant, peer: &str, why: &str) {
        let every = self.config.have_every;
        if self.strike(now, peer, why) {
            if let Some(state) = self.peers.get_mut(peer) {
                state.asking_have = false;
                // Taken as holding nothing until it answers, so the origin is not held
                // back waiting for it.
                if matches!(state.holds, Holds::Unknown) {
                    state.holds = Holds::Some(vec![false; self.chunks.len()]);
                }
            }
            self.timers.push(now + every, Timer::Have(peer.to_string()));
        }
    }

    /// One chunk of batch `batch` was answered.
    pub fn handle_chunk(&mut self, now: Instant, batch: u64, id: &ChunkId, got: Got) {
        let Some(&i) = self.index.get(id) else {
            return;
        };
        if got == Got::Stored {
            self.progress_at = Some(now);
            self.arm_patience(now);
        }
        let Some(b) = self.batches.get_mut(&batch) else {
            // A batch given up (late, or from a dropped peer): what it stored still counts,
            // and a lie still drops its sender.
            if got == Got::Stored {
                self.mark_stored(now, i);
            }
            if got == Got::Corrupt
                && let Some(peer) = self.given_up.get(&batch).cloned()
            {
                self.drop_peer(&peer, "it sent a chunk whose bytes do not match its name");
            }
            return;
        };
        if !b.chunks.contains(&i) {
            return;
        }
        b.open = b.open.saturating_sub(1);
        b.open_bytes = b.open_bytes.saturating_sub(u64::from(self.chunks[i].1));
        // A batch that moves is not late: its rest is due from now (its timer, when it
        // fires, finds the new deadline).
        if b.open > 0 {
            b.deadline = b
                .deadline
                .max(now + Self::due(&self.config, b.open_bytes))
                .min(b.latest);
        }
        let peer = b.peer.clone();
        match got {
            Got::Stored => {
                if let Some(len) = self.mark_stored(now, i)
                    && let Some(state) = self.peers.get_mut(&peer)
                {
                    state.bytes += len;
                }
            }
            Got::Missing => {
                if let Some(state) = self.peers.get_mut(&peer) {
                    match &mut state.holds {
                        Holds::Some(bits) => bits[i] = false,
                        // A holder without a chunk of what it holds (its manifest dropped,
                        // an older agent, a short chunk found on read): not asked for it
                        // again; others, or the origin, are.
                        Holds::All | Holds::Unknown => {
                            state.lacks.insert(i);
                        }
                    }
                }
            }
            Got::Corrupt => {
                self.drop_peer(&peer, "it sent a chunk whose bytes do not match its name");
            }
        }
    }

    /// Batch `batch` ended: `Ok` when every chunk was answered, or why it broke off. Chunks
    /// it did not give go back to be asked again.
    pub fn handle_batch_end(&mut self, now: Instant, batch: u64, ended: Ended) {
        let Some(b) = self.batches.remove(&batch) else {
            // The driver's word that a given-up batch's request is over.
            self.given_up.remove(&batch);
            return;
        };
        for &i in &b.chunks {
            self.asked[i] = self.asked[i].saturating_sub(1);
        }
        if let Some(state) = self.peers.get_mut(&b.peer) {
            state.in_flight = state.in_flight.saturating_sub(1);
        }
        match ended {
            Ended::Done if b.open == 0 => {
                // Strikes count failures in a row.
                if let Some(state) = self.peers.get_mut(&b.peer) {
                    state.strikes = 0;
                }
            }
            Ended::Done => {
                self.strike(
                    now,
                    &b.peer,
                    "it ended a batch without answering every chunk",
                );
            }
            Ended::Busy => {
                let until = now + self.config.busy_rest;
                if let Some(state) = self.peers.get_mut(&b.peer) {
                    state.resting_until = Some(until);
                }
                self.timers.push(until, Timer::Rest);
            }
            Ended::Failed(why) => {
                self.strike(now, &b.peer, &why);
            }
        }
    }

    /// Gives up batch `batch` (late): its chunks go back, its peer gets a strike, and its
    /// answers, if they still come, are taken for what they are.
    fn give_up(&mut self, now: Instant, batch: u64) {
        if let Some(b) = self.batches.get(&batch) {
            self.given_up.insert(batch, b.peer.clone());
            self.handle_batch_end(
                now,
                batch,
                Ended::Failed("a request missed its deadline".into()),
            );
        }
    }

    /// Deals with what is due at `now`: batches past their deadline are given up (a strike
    /// for their peer), fetchers are due a new `Have`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some((_, timer)) = self.timers.pop_due(now) {
            match timer {
                // Its deadline may have moved since (its chunks came): wait for that one.
                Timer::Batch(batch) => match self.batches.get(&batch) {
                    Some(b) if b.deadline <= now => self.give_up(now, batch),
                    Some(b) => self.timers.push(b.deadline, Timer::Batch(batch)),
                    None => {}
                },
                Timer::Rest => {}
                // Progress since may have moved its end: wait for that one. Once over, the
                // patience wakes nothing until the next chunk is stored.
                Timer::Patience => {
                    self.patience_armed = false;
                    self.arm_patience(now);
                }
                Timer::Have(peer) => {
                    if let Some(state) = self.peers.get_mut(&peer)
                        && state.role == Role::Fetcher
                    {
                        state.have_due = true;
                    }
                }
            }
        }
    }

    /// When [`Swarm::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next_deadline()
    }

    /// Queues the end of the patience, a moment to decide again (the origin may be asked
    /// for anything then), unless one is queued already or it is over by `now`.
    fn arm_patience(&mut self, now: Instant) {
        if let Some(at) = self.progress_at
            && !self.patience_armed
            && self.missing > 0
            && at + self.config.patience > now
        {
            self.patience_armed = true;
            self.timers.push(at + self.config.patience, Timer::Patience);
        }
    }

    /// The next thing to ask, if any.
    pub fn poll_action(&mut self, now: Instant) -> Option<Action> {
        if self.missing == 0 {
            return None;
        }
        // `Have` first: what peers hold decides what to ask them for.
        let due = self.peers.iter().find(|(_, s)| {
            s.dropped.is_none() && !s.asking_have && s.have_due && !matches!(s.holds, Holds::All)
        });
        if let Some((peer, _)) = due {
            let peer = peer.clone();
            let state = self.peers.get_mut(&peer).expect("found above");
            state.asking_have = true;
            state.have_due = false;
            return Some(Action::AskHave { peer });
        }
        // The origin waits until what every other peer holds is known: what they hold
        // is not asked of it.
        // Nothing stored for a while: the origin may be asked for any chunk, in the end
        // game too, and without waiting for peers that have not said what they hold.
        let since = *self.progress_at.get_or_insert(now);
        self.arm_patience(now);
        let patient = now.saturating_duration_since(since) < self.config.patience;
        if self.batches.len() >= self.config.max_in_flight {
            return None;
        }
        let unknown = self
            .peers
            .values()
            .any(|s| s.dropped.is_none() && matches!(s.holds, Holds::Unknown));
        // The least busy peer with room, non-origins before origins.
        let mut order: Vec<(&String, &PeerState)> = self
            .peers
            .iter()
            .filter(|(_, s)| {
                s.dropped.is_none()
                    && !matches!(s.holds, Holds::Unknown)
                    && !(unknown && patient && s.role == Role::Origin)
                    && s.resting_until.is_none_or(|t| t <= now)
                    && s.in_flight
                        < if s.role == Role::Origin {
                            self.origin_share(patient).1
                        } else {
                            self.config.pipeline
                        }
            })
            .collect();
        order.sort_by_key(|(_, s)| (s.role == Role::Origin, s.in_flight));
        let order: Vec<String> = order.into_iter().map(|(p, _)| p.clone()).collect();
        // The end game: every chunk missing is asked of someone.
        let end_game = self
            .held
            .iter()
            .zip(&self.asked)
            .all(|(held, asked)| *held || *asked > 0);
        let room = self.asked_of_peers() < self.in_flight_allowed(now);
        for peer in order {
            let (origin, idle) = {
                let state = &self.peers[&peer];
                (state.role == Role::Origin, state.in_flight == 0)
            };
            // Of peers, what the recent rate covers; the origin's few requests are not held
            // back by theirs (what only it holds must come first), nor is the end game's
            // one request of an idle peer (what is in flight may be stuck at a slow one).
            let held_back = !(origin || room || (end_game && idle));
            if held_back {
                continue;
            }
            let mut picked = self.pick(&peer, false, patient);
            // A chunk in flight is asked again only in the end game, and only of a peer with
            // nothing else in flight: what is asked twice is bytes that one host's link
            // carries twice.
            if picked.is_empty() && end_game && idle && !(origin && patient) {
                picked = self.pick(&peer, true, patient);
            }
            if picked.is_empty() {
                continue;
            }
            return Some(self.start_batch(now, peer, picked));
        }
        None
    }

    /// Bytes asked of peers other than the origin and not yet come.
    fn asked_of_peers(&self) -> u64 {
        self.batches
            .values()
            .filter(|b| {
                self.peers
                    .get(&b.peer)
                    .is_some_and(|s| s.role != Role::Origin)
            })
            .map(|b| b.open_bytes)
            .sum()
    }

    /// How many bytes may be asked of peers at once: what this fetch stored in the last
    /// [`Config::in_flight_time`], at least [`Config::min_in_flight_bytes`]. It grows with
    /// the rate it allows (a request's time to come is less than that time), and keeps
    /// what is asked ahead to about that time's worth.
    fn in_flight_allowed(&mut self, now: Instant) -> u64 {
        self.forget_before(now);
        self.recent_bytes
            .max(self.config.min_in_flight_bytes)
            .max(1)
    }

    /// Forgets what was stored more than [`Config::in_flight_time`] before `now`.
    fn forget_before(&mut self, now: Instant) {
        let window = self.config.in_flight_time;
        while let Some(&(at, len)) = self.recent.front()
            && now.saturating_duration_since(at) > window
        {
            self.recent.pop_front();
            self.recent_bytes -= len;
        }
    }

    /// The i-th chunk is stored: its length, unless it was already.
    fn mark_stored(&mut self, now: Instant, i: usize) -> Option<u64> {
        if self.held[i] {
            return None;
        }
        self.held[i] = true;
        self.missing -= 1;
        let len = u64::from(self.chunks[i].1);
        self.fetched_bytes += len;
        self.forget_before(now);
        self.recent.push_back((now, len));
        self.recent_bytes += len;
        Some(len)
    }

    /// Whether every chunk is stored.
    pub fn is_done(&self) -> bool {
        self.missing == 0
    }

    /// Whether nothing is in flight and no peer is left to ask: every source is dropped,
    /// or none was added. New peers may still come.
    pub fn is_stuck(&self) -> bool {
        self.missing > 0
            && self.batches.is_empty()
            && self.peers.values().all(|s| s.dropped.is_some())
    }

    /// Bytes stored by this fetch, and bytes still missing.
    pub fn progress(&self) -> (u64, u64) {
        let missing = self
            .chunks
            .iter()
            .zip(&self.held)
            .filter(|(_, h)| !**h)
            .map(|((_, len), _)| u64::from(*len))
            .sum();
        (self.fetched_bytes, missing)
    }

    /// Whether the i-th chunk is stored (for answering `Have` while fetching).
    pub fn held(&self) -> &[bool] {
        &self.held
    }

    /// Peers dropped, and why.
    pub fn dropped(&self) -> Vec<(String, String)> {
        self.peers
            .iter()
            .filter_map(|(p, s)| s.dropped.clone().map(|why| (p.clone(), why)))
            .collect()
    }

    /// Bytes each peer gave.
    pub fn bytes_from(&self) -> BTreeMap<String, u64> {
        self.peers
            .iter()
            .filter(|(_, s)| s.bytes > 0)
            .map(|(p, s)| (p.clone(), s.bytes))
            .collect()
    }

    /// This fetcher's share of the origin ([`Config::origin_window`]): chunks per request
    /// and requests in flight, for the fetchers still fetching that it knows as peers and
    /// has not dropped (itself among them). Once impatient (nothing stored for
    /// [`Config::patience`]: nobody else is bringing anything), the most.
    fn origin_share(&self, patient: bool) -> (usize, usize) {
        let c = &self.config;
        let most = c.origin_batch * c.origin_pipeline;
        let fetchers = 1 + self
            .peers
            .values()
            .filter(|s| s.role == Role::Fetcher && s.dropped.is_none())
            .count();
        let share = (c.origin_window / fetchers).clamp(2.min(most), most);
        if !patient || share >= most {
            return (c.origin_batch, c.origin_pipeline);
        }
        // Two requests once a share allows two chunks each; one below.
        let pipeline = if share >= 4 {
            2.min(c.origin_pipeline)
        } else {
            1
        };
        ((share / pipeline).min(c.origin_batch), pipeline)
    }

    /// Up to a batch of chunks to ask `peer` for: missing, held by it, not asked of anyone
    /// yet (or, in the end game, asked once of someone else), rarest first. Of an origin,
    /// only chunks no other peer holds, and while `patient` only those of this fetcher's
    /// turn, then (its turn all asked) those of the next fetcher's, from the other end,
    /// leaving the first two of its shares of the origin to their owner.
    fn pick(&self, peer: &str, end_game: bool, patient: bool) -> Vec<usize> {
        let state = &self.peers[peer];
        let in_this_peer: std::collections::HashSet<usize> = self
            .batches
            .values()
            .filter(|b| b.peer == peer)
            .flat_map(|b| b.chunks.iter().copied())
            .collect();
        let others: Vec<&PeerState> = self
            .peers
            .iter()
            .filter(|(p, s)| p.as_str() != peer && s.dropped.is_none())
            .map(|(_, s)| s)
            .collect();
        let (me, fetchers) = self.turn;
        let mut candidates: Vec<(usize, u64, u64, usize)> = Vec::new();
        for i in 0..self.chunks.len() {
            if self.held[i] || !state.holds(i) {
                continue;
            }
            let fresh = self.asked[i] == 0;
            if !(fresh || (end_game && self.asked[i] == 1 && !in_this_peer.contains(&i))) {
                continue;
            }
            let id = &self.chunks[i].0.0;
            let rotation = (u64::from_le_bytes(id[..8].try_into().expect("8 bytes"))
                % fetchers as u64
                + fetchers as u64
                - me as u64)
                % fetchers as u64;
            // Of an origin, while patient: this fetcher's turn, and once that is all asked,
            // the next fetcher's (which it may be slow to bring, its link shared with the
            // swarm's traffic).
            if state.role == Role::Origin && patient && rotation > 1 {
                continue;
            }
            let (mut rarity, mut elsewhere) = (1, false);
            for s in &others {
                if s.holds(i) {
                    rarity += 1;
                    elsewhere |= s.role != Role::Origin;
                }
            }
            // An origin gives only what no other peer holds.
            if state.role == Role::Origin && elsewhere {
                continue;
            }
            let raw = u64::from_le_bytes(id[8..16].try_into().expect("8 bytes"));
            let mixed = match (state.role, rotation) {
                // From the origin, a turn's owner takes its chunks from the front and a
                // helper from the back, so that the two ask for one chunk only where they
                // meet. A fetcher that knows of no other keeps its salt: fetchers that do not
                // know of each other yet still start at different chunks.
                (Role::Origin, 0) if self.turn.1 > 1 => raw,
                (Role::Origin, 0) => raw ^ self.salt,
                (Role::Origin, _) => !raw,
                _ => raw ^ self.salt,
            };
            candidates.push((rarity, rotation, mixed, i));
        }
        if state.role == Role::Origin && patient && candidates.iter().any(|c| c.1 == 0) {
            candidates.retain(|c| c.1 == 0);
        }
        // A helper leaves the front of the next fetcher's part to its owner: the chunks
        // it may have asked already and not yet said it holds.
        if state.role == Role::Origin && patient {
            let (batch, pipeline) = self.origin_share(patient);
            let margin = (2 * batch * pipeline).max(1);
            let mut helped: Vec<u64> = candidates
                .iter()
                .filter(|c| c.1 == 1)
                .map(|c| c.2)
                .collect();
            if helped.len() <= margin {
                candidates.retain(|c| c.1 != 1);
            } else {
                // The part's front has the highest `!raw`.
                helped.sort_unstable_by(|a, b| b.cmp(a));
                let edge = helped[margin - 1];
                candidates.retain(|c| c.1 != 1 || c.2 < edge);
            }
        }
        candidates.sort_unstable();
        let batch = if state.role == Role::Origin {
            self.origin_share(patient).0
        } else {
            self.config.batch
        };
        candidates
            .into_iter()
            .take(batch)
            .map(|(_, _, _, i)| i)
            .collect()
    }

    fn start_batch(&mut self, now: Instant, peer: String, picked: Vec<usize>) -> Action {
        let batch = self.next_batch;
        self.next_batch += 1;
        let bytes: u64 = picked.iter().map(|&i| u64::from(self.chunks[i].1)).sum();
        let due = Self::due(&self.config, bytes);
        let (deadline, latest) = (now + due, now + due * self.config.stretch.max(1));
        for &i in &picked {
            self.asked[i] = self.asked[i].saturating_add(1);
        }
        self.peers.get_mut(&peer).expect("a known peer").in_flight += 1;
        self.timers.push(deadline, Timer::Batch(batch));
        let chunks = picked.iter().map(|&i| self.chunks[i]).collect();
        self.batches.insert(
            batch,
            Batch {
                peer: peer.clone(),
                open: picked.len(),
                chunks: picked,
                open_bytes: bytes,
                deadline,
                latest,
            },
        );
        Action::Fetch {
            batch,
            peer,
            chunks,
        }
    }

    /// How long a batch may take to bring `bytes`, from its start or its last chunk:
    /// [`Config::batch_base`] and the bytes at [`Config::min_rate`]. A peer shared by many
    /// (the origin at the start) is slow but not late while its chunks keep coming, up to
    /// [`Config::stretch`] times the first deadline.
    pub(crate) fn due(config: &Config, bytes: u64) -> Duration {
        config.batch_base + Duration::from_secs_f64(bytes as f64 / config.min_rate.max(1) as f64)
    }

    /// Counts a failure against `peer`, dropping it after [`Config::strikes`]; whether it
    /// is still in. An origin is not dropped (what only it holds comes from nowhere else,
    /// and many hosts asking it at once make it slow): it is left alone for
    /// [`Config::origin_rest`] instead; a fetch it cannot serve ends by the driver's own
    /// deadline.
    fn strike(&mut self, now: Instant, peer: &str, why: &str) -> bool {
        let limit = self.config.strikes;
        let rest = self.config.origin_rest;
        let Some(state) = self.peers.get_mut(peer) else {
            return false;
        };
        if state.dropped.is_some() {
            return false;
        }
        state.strikes += 1;
        tracing::debug!(%peer, strikes = state.strikes, "a chunk source failed: {why}");
        if state.strikes >= limit && state.role == Role::Origin {
            state.resting_until = Some(now + rest);
            self.timers.push(now + rest, Timer::Rest);
            return true;
        }
        if state.strikes >= limit {
            self.drop_peer(peer, &format!("{limit} failures, the last: {why}"));
            return false;
        }
        true
    }

    /// Drops `peer`: its batches are given up, their chunks go back.
    fn drop_peer(&mut self, peer: &str, why: &str) {
        let Some(state) = self.peers.get_mut(peer) else {
            return;
        };
        if state.dropped.is_some() {
            return;
        }
        tracing::warn!(%peer, "a chunk source is avoided from now on: {why}");
        state.dropped = Some(why.to_string());
        let theirs: Vec<u64> = self
            .batches
            .iter()
            .filter(|(_, b)| b.peer == peer)
            .map(|(id, _)| *id)
            .collect();
        for batch in theirs {
            if let Some(b) = self.batches.remove(&batch) {
                for &i in &b.chunks {
                    self.asked[i] = self.asked[i].saturating_sub(1);
                }
            }
        }
        if let Some(state) = self.peers.get_mut(peer) {
            state.in_flight = 0;
        }
    }
}

#[cfg(test)]
mod tests;
