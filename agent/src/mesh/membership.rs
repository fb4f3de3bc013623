//! Membership and failure detection: SWIM (with suspicion and indirect probes) from foca,
//! behind a sans-IO interface. Bytes and timer events go in; [`Output`]s come out: packets
//! to send, timers to schedule, members seen up, down or forgotten. The caller does all IO,
//! which is what lets `agent/tests/membership_simulation.rs` run thousands of agents
//! deterministically with simulated time and network.
//!
//! # What an insider cannot do
//!
//! SWIM believes what it is told. Every agent holds a valid certificate, so one compromised
//! agent could otherwise rewrite everyone's membership. Every packet is therefore decoded,
//! checked and re-encoded here *before* foca sees it ([`Membership::handle_data`]):
//!
//! 1. **The sender speaks only for itself.** The header's `src` must carry the name in the
//!    connection's certificate and the connection's remote address; updates about the sender
//!    must name exactly that identity. What arrives first-hand wins its address: a hearsay
//!    identity squatting it is dropped.
//! 2. **Hearsay cannot move, renew or kill.** An update about a third party cannot put a
//!    known member at a new address or give a known address to another identity. It raises
//!    a known member's bump (a restart, a rejoin) only once [`CORROBORATION`] different
//!    members relayed that same renewal: a renewal not believed is not relayed, so honest
//!    relays never make up an insider's count, and a real one spreads at gossip speed
//!    instead of waiting for the member to reach everyone first-hand. A third party's
//!    `Down` about a member held alive becomes `Suspect` (same incarnation) and starts this
//!    agent's own check: direct pings, and only if the member does not answer within
//!    [`VERIFY_DEADLINE`] does this agent declare it down, on its own evidence. Unknown
//!    members are not learnt already dead.
//! 3. **No dialing on request.** A request to send to a third party (`PingReq`,
//!    `IndirectAck`) is dropped (its updates kept) unless that identity is a member known
//!    active, exactly.
//! 4. **Introductions are bounded.** Members a sender introduced that have not yet been
//!    heard from first-hand count against it; beyond [`MAX_UNCONFIRMED_PER_SENDER`] its
//!    further introductions are dropped. All senders together may not make this agent hold
//!    more unconfirmed members than [`MAX_UNCONFIRMED`] or four times those it has heard
//!    from first-hand, whichever is more; introductions beyond that wait in a bounded queue
//!    ([`MAX_DEFERRED`]) until members confirm themselves.
//! 5. **The dead are forgotten.** Down members are removed after `forget_down_after`
//!    (default [`FORGET_DOWN_AFTER`]), or [`FORGET_UNCONFIRMED_AFTER`] if this agent never
//!    heard from them first-hand; [`Output::Forgotten`] tells the caller when a name is no
//!    longer known.
//!
//! What was dropped is counted in [`MembershipStats`]; a refused packet is a typed
//! [`PacketError`].

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::num::{NonZeroU8, NonZeroU32, NonZeroUsize};
use std::time::Duration;

use foca::{
    Codec, Config, Foca, Header, Identity, Member, Message, NoCustomBroadcast, Notification,
    PeriodicParams, PostcardCodec, Runtime, State,
};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

/// Who a member is: its name, the address of its QUIC endpoint, and a bump renewed on every
/// start, so that an agent that restarted is told apart from its previous life.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MemberId {
    pub name: String,
    pub addr: SocketAddr,
    pub bump: u16,
}

impl foca::Identity for MemberId {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(MemberId {
            bump: self.bump.wrapping_add(1),
            ..self.clone()
        })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        // A seed is first known by its address alone (an empty name): the real identity
        // at that address replaces the placeholder.
        match (self.name.is_empty(), adversary.name.is_empty()) {
            (false, true) => return true,
            (true, false) => return false,
            _ => {}
        }
        // Otherwise the newer life wins: bumps compared as a wrapping sequence.
        let ahead = self.bump.wrapping_sub(adversary.bump);
        ahead != 0 && ahead < u16::MAX / 2
    }
}

/// What the caller must do after feeding the membership.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Deliver these bytes to that member (as a datagram). `dial` is false for periodic
    /// gossip (news pushed to random members every 100 ms): worth sending over a connection
    /// that is open, not worth a handshake, so that a fleet starting at once does not
    /// handshake with every member for news that reaches everyone anyway. Everything else
    /// dials: probes and their answers, announcements, refutations, leaving.
    Send {
        to: MemberId,
        data: Vec<u8>,
        dial: bool,
    },
    /// Hand this timer back through [`Membership::handle_timer`] after the delay.
    Schedule { timer: Timer, after: Duration },
    /// A member became reachable.
    Up(MemberId),
    /// A member was declared down.
    Down(MemberId),
    /// No member of this name is known any more: the last identity carrying it was
    /// forgotten (down for `forget_down_after`) or replaced at its address by another name.
    /// The caller may drop what it keeps about the name (its host record).
    Forgotten(MemberId),
    /// The mesh had declared this agent down (a partition, a pause); it rejoined under a
    /// renewed identity, which the caller should remember for its next start.
    Rejoined(MemberId),
    /// Every member this agent knew is down or gone: the caller should join again
    /// through its seeds.
    Idle,
}

/// A timer asked for by an [`Output::Schedule`]: opaque, handed back as it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timer(TimerKind);

#[derive(Clone, Debug, PartialEq, Eq)]
enum TimerKind {
    /// One of foca's.
    Swim(foca::Timer<MemberId>),
    /// This agent's own check of a member a third party said was down: ping it again, or
    /// (at the deadline) declare it down if it never answered.
    Verify {
        addr: SocketAddr,
        generation: u64,
        deadline: bool,
    },
}

/// How long a down member is remembered (reported dead, announced to) before it is
/// forgotten, unless [`config`] is told otherwise: a day, long enough for an operator to
/// see what died, short enough that invented or long-gone members do not stay forever.
pub const FORGET_DOWN_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// The most members one sender may have introduced that this agent has not yet heard from
/// first-hand. Honest senders stay far below (members confirm themselves within seconds by
/// pinging, answering, announcing); an insider inventing members is stopped here. A slot is
/// freed when the member speaks for itself or is forgotten.
pub const MAX_UNCONFIRMED_PER_SENDER: usize = 128;

/// The most members, all senders together, that this agent holds without having heard from
/// them first-hand, in a small mesh; in a larger one, four times the members it has heard
/// from first-hand. Members relayed by honest agents count against those agents, so this is
/// what bounds the memory (and the probes) an insider's inventions can take at every agent:
/// a fixed multiple of the real mesh. A fixed number would not do: an agent joining a mesh
/// of thousands hears of all of them long before it has met them.
pub const MAX_UNCONFIRMED: usize = 512;

/// Introductions put aside while the agent holds all the unconfirmed members it may: taken
/// in, oldest first, as members confirm themselves. Without them, a member introduced
/// while the agent was full would be learnt only by chance (anti-entropy), minutes later in
/// a mesh of thousands. Beyond this many, the oldest are dropped.
pub const MAX_DEFERRED: usize = 4096;

/// A member never heard from first-hand is forgotten this long after it is declared down
/// (rather than [`FORGET_DOWN_AFTER`]): long enough for the news of its death to outrun
/// stale hearsay of it alive, short enough that invented members free their slots.
pub const FORGET_UNCONFIRMED_AFTER: Duration = Duration::from_secs(60);

/// When checking a member a third party reported down, the second direct ping goes after
/// this long.
pub const VERIFY_RETRY: Duration = Duration::from_millis(200);

/// A member a third party reported down, that has not answered this agent's own pings
/// within this long, is declared down by this agent.
pub const VERIFY_DEADLINE: Duration = Duration::from_millis(500);

/// Reports of a member's death from this many different members are believed without a
/// check of our own: one insider is one reporter, and an honest member reports a death only
/// on its own evidence, so two reporters are two first-hand observations. Later waves of a
/// real death then spread at gossip speed instead of a check per wave.
pub const CORROBORATION: usize = 2;

/// The start-up grace lasts at least this long, then ends as soon as the agent keeps time
/// (its timers fire on time for 5 s: see `core.rs`), at the latest after [`STARTUP_GRACE`].
pub const MIN_STARTUP_GRACE: Duration = Duration::from_secs(10);

/// While an agent starts (its first [`STARTUP_GRACE`] at most), its timeouts are relaxed: every
/// connection is new, handshakes with every peer happen at once, and a probe that waits
/// for one is not evidence of death. A suspect has 10 s to refute (rather than 1 s), and
/// its own check of a reported death takes 2 s (rather than 500 ms).
pub const STARTUP_GRACE: Duration = Duration::from_secs(30);
/// How far above the incarnation held for a member hearsay may take it. A member raises
/// its own incarnation by one per suspicion it refutes, so honest news is rarely more than
/// a step or two ahead; a forged incarnation near `u16::MAX` would leave the member unable
/// to refute a suspicion, forcing it to rejoin under a new identity.
pub const MAX_INCARNATION_STEP: u16 = 16;

/// The most an overloaded agent stretches its timeouts: `1 + MAX_OVERLOAD` times (see
/// [`Membership::set_overload`]).
pub const MAX_OVERLOAD: u8 = 4;
/// The round trip the probe timing is made for: half of `probe_rtt` (see [`config`]), so an
/// answer on a link this slow still comes in time.
pub const RTT_BUDGET: Duration = Duration::from_millis(50);
/// The most the links' round trip stretches the failure detection (see
/// [`Membership::set_rtts`]): probes then wait up to 1 s for an answer, and a suspect has
/// up to 10 s to refute.
pub const MAX_STRETCH: u32 = 10;
const GRACE_VERIFY_RETRY: Duration = Duration::from_millis(500);
const GRACE_VERIFY_DEADLINE: Duration = Duration::from_secs(2);

/// What the membership dropped or decided on its own, since it started. For logs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MembershipStats {
    /// Packets refused whole (see [`PacketErrorKind`]).
    pub packets_refused: u64,
    /// Updates about the sender that did not name exactly the sender's identity.
    pub updates_about_sender_refused: u64,
    /// Updates about this agent under another identity (its address or name).
    pub updates_about_us_refused: u64,
    /// Hearsay giving a known address to another identity or a known name a new address.
    pub updates_moving_members: u64,
    /// Hearsay renewing a known member (another bump at its address), not (yet) believed.
    pub updates_renewing_members: u64,
    /// Renewals believed because [`CORROBORATION`] different members relayed them.
    pub renewals_corroborated: u64,
    /// Hearsay incarnations capped (see [`MAX_INCARNATION_STEP`]), about us included.
    pub incarnations_clamped: u64,
    /// Hearsay introducing a member already down.
    pub dead_introductions: u64,
    /// Introductions dropped because the sender had [`MAX_UNCONFIRMED_PER_SENDER`] pending.
    pub introductions_over_cap: u64,
    /// Introductions put aside because this agent held as many unconfirmed members as it
    /// may (see [`MAX_UNCONFIRMED`]), and how many of those were taken in later.
    pub introductions_deferred: u64,
    pub introductions_readmitted: u64,
    /// The same address twice in one packet.
    pub duplicate_updates: u64,
    /// A third party's `Down` about a member held alive (or this agent), made `Suspect`.
    pub downs_downgraded: u64,
    /// Deaths believed because [`CORROBORATION`] different members reported them.
    pub downs_corroborated: u64,
    /// `PingReq`/`IndirectAck` for a member not known active (or for this agent), dropped.
    pub requests_to_unknown: u64,
    /// Own checks started, answered, and ended in this agent declaring the member down.
    pub verifications_started: u64,
    pub verified_alive: u64,
    pub verified_down: u64,
    /// Members removed after `forget_down_after` (or pushed out of their address by
    /// the identity that really is there).
    pub members_forgotten: u64,
    /// Errors foca reported on packets that passed the checks (logged, not refused).
    pub protocol_errors: u64,
    /// Errors foca reported on its own timers (an incomplete probe cycle: the next probe
    /// came before the indirect probes of the last one). Logged.
    pub timer_errors: u64,
}

/// A malformed, foreign or lying packet; the membership is unchanged.
#[derive(Debug, thiserror::Error)]
#[error("membership packet refused: {kind}")]
pub struct PacketError {
    kind: PacketErrorKind,
}

impl PacketError {
    pub fn kind(&self) -> &PacketErrorKind {
        &self.kind
    }
}

/// Why a packet was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PacketErrorKind {
    #[error("{len} bytes, over the {max}-byte limit")]
    TooBig { len: usize, max: usize },
    #[error("malformed {part}: {reason}")]
    Malformed { part: &'static str, reason: String },
    #[error("{len} bytes follow the updates")]
    TrailingBytes { len: usize },
    #[error("it claims to come from `{claimed}` but arrived from `{sender}`")]
    ImpersonatesSender { claimed: String, sender: String },
    #[error("it claims the address {claimed} but arrived from {remote}")]
    AddressMismatch {
        claimed: SocketAddr,
        remote: SocketAddr,
    },
    #[error("it claims to come from this agent's own name or address (`{claimed}`)")]
    FromOurselves { claimed: String },
}

/// Collects what foca asks of its runtime, and the membership changes it reports.
#[derive(Default)]
struct Collect {
    out: Vec<Output>,
    changes: Vec<Change>,
    /// This agent's incarnation, as its last packet out said.
    incarnation: Option<u16>,
    /// Collecting what foca's periodic gossip timer sends: news pushed to random members,
    /// not worth a handshake.
    periodic: bool,
}

enum Change {
    Up(MemberId),
    Down(MemberId),
    Rename(MemberId),
}

impl Runtime<MemberId> for Collect {
    fn notify(&mut self, notification: Notification<'_, MemberId>) {
        match notification {
            Notification::MemberUp(id) => {
                self.out.push(Output::Up(id.clone()));
                self.changes.push(Change::Up(id.clone()));
            }
            Notification::MemberDown(id) => {
                self.out.push(Output::Down(id.clone()));
                self.changes.push(Change::Down(id.clone()));
            }
            Notification::Rename(_, new) => self.changes.push(Change::Rename(new.clone())),
            Notification::Rejoin(id) => self.out.push(Output::Rejoined(id.clone())),
            Notification::Idle => self.out.push(Output::Idle),
            _ => {}
        }
    }

    fn send_to(&mut self, to: MemberId, data: &[u8]) {
        let header = Codec::<MemberId>::decode_header(&mut PostcardCodec, data).ok();
        let gossip = self.periodic
            && header
                .as_ref()
                .is_some_and(|h| h.message == Message::Gossip);
        if let Some(h) = header {
            self.incarnation = Some(h.src_incarnation);
        }
        self.out.push(Output::Send {
            to,
            data: data.to_vec(),
            dial: !gossip,
        });
    }

    fn submit_after(&mut self, timer: foca::Timer<MemberId>, after: Duration) {
        self.out.push(Output::Schedule {
            timer: Timer(TimerKind::Swim(timer)),
            after,
        });
    }
}

/// A membership packet as foca reads it: the header, then (when there are any) a big-endian
/// count of updates and the updates. How the screen re-encodes what it kept, and how tests
/// speak SWIM as an insider would.
pub fn encode_packet(header: &Header<MemberId>, updates: &[Member<MemberId>]) -> Vec<u8> {
    let mut out = Vec::new();
    PostcardCodec
        .encode_header(header, &mut out)
        .expect("encoding into a Vec");
    if !updates.is_empty() {
        let count = u16::try_from(updates.len()).expect("a packet holds fewer than 65,536 updates");
        out.extend_from_slice(&count.to_be_bytes());
        for member in updates {
            PostcardCodec
                .encode_member(member, &mut out)
                .expect("encoding into a Vec");
        }
    }
    out
}

/// Takes one off `key`'s count, forgetting the key at zero.
fn uncount(counts: &mut HashMap<String, usize>, key: &str) {
    if let Some(n) = counts.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            counts.remove(key);
        }
    }
}

/// How the mesh behaves. Tuned for a LAN of agents:
/// - failure detection: a probe every 300 ms (an answer expected within 100 ms, else
///   indirect probes through others), and a suspect declared down after 1 s (over three
///   probe periods to refute a false suspicion); all stretched on slower links (see
///   [`Membership::set_rtts`]);
/// - dissemination: every update is piggybacked twice as often as foca's default, since a
///   member that misses all its copies otherwise learns of it only by chance;
/// - fast news: pending updates (a suspicion, a death) are also gossiped to 3 members every
///   100 ms, on top of riding on probes; an idle mesh sends nothing for it, and since each
///   update is sent a fixed number of times, gossiping more often spreads it sooner
///   without sending more;
/// - anti-entropy: every 2 s an agent announces itself to 2 random members, whose answers
///   carry the members they know, so whatever gossip missed is repaired;
/// - down members are remembered (reported dead) for `forget_down_after` (usually
///   [`FORGET_DOWN_AFTER`], a day), then forgotten; meanwhile they are told that they are
///   down so they rejoin, and 2 of them are sent an announce every 5 s so a partition heals
///   by itself;
/// - packets fit a QUIC datagram.
pub fn config(cluster_size: u32, forget_down_after: Duration) -> Config {
    let mut c = Config::new_lan(NonZeroU32::new(cluster_size.max(1)).expect("non-zero"));
    c.probe_period = PROBE_PERIOD;
    c.probe_rtt = PROBE_RTT;
    c.suspect_to_down_after = SUSPICION;
    c.max_transmissions = c
        .max_transmissions
        .saturating_mul(NonZeroU8::new(2).expect("non-zero"));
    c.periodic_announce = Some(PeriodicParams {
        frequency: Duration::from_secs(2),
        num_members: NonZeroUsize::new(2).expect("non-zero"),
    });
    c.periodic_gossip = Some(PeriodicParams {
        frequency: Duration::from_millis(100),
        num_members: NonZeroUsize::new(3).expect("non-zero"),
    });
    c.remove_down_after = Some(forget_down_after);
    c.notify_down_members = true;
    c.periodic_announce_to_down_members = Some(PeriodicParams {
        frequency: Duration::from_secs(5),
        num_members: NonZeroUsize::new(2).expect("non-zero"),
    });
    c.max_packet_size = NonZeroUsize::new(MAX_PACKET).expect("non-zero");
    c
}

/// [`config`] with the longer suspicion of [`STARTUP_GRACE`]. The probe period and
/// timeout stay as they are: foca refuses to change them once running (a first version
/// changed them, foca refused the whole configuration, and the grace silently never
/// applied).
pub fn startup_config(cluster_size: u32, forget_down_after: Duration) -> Config {
    let mut c = config(cluster_size, forget_down_after);
    c.suspect_to_down_after = Duration::from_secs(10);
    c
}

/// How long a suspect has to refute, on links within [`RTT_BUDGET`] and an agent on time.
const SUSPICION: Duration = Duration::from_millis(1000);
/// How often a member is probed, on links within [`RTT_BUDGET`].
const PROBE_PERIOD: Duration = Duration::from_millis(300);
/// How long a probed member's direct answer is waited for before others are asked to
/// probe it, on links within [`RTT_BUDGET`].
const PROBE_RTT: Duration = Duration::from_millis(100);

/// The largest membership packet, chosen to fit a QUIC datagram on a 1200-byte path.
pub const MAX_PACKET: usize = 1150;

/// The smallest cluster size the configuration is made for.
const MIN_SIZE: u32 = 64;

/// The identities foca holds, by address, with whether each is active; kept in step with
/// foca's notifications (foca has no lookup but a scan).
#[derive(Default)]
struct Index {
    by_addr: HashMap<SocketAddr, (MemberId, bool)>,
    /// How many identities carry each name.
    names: HashMap<String, usize>,
}

impl Index {
    fn active_exactly(&self, id: &MemberId) -> bool {
        matches!(self.by_addr.get(&id.addr), Some((k, true)) if k == id)
    }

    /// Puts `id` at its address (replacing whoever was there), and sets its activity if
    /// given. A name no identity carries any more is pushed onto `gone`.
    fn set(&mut self, id: &MemberId, active: Option<bool>, gone: &mut Vec<MemberId>) {
        let replaced = match self.by_addr.entry(id.addr) {
            Entry::Occupied(mut e) => {
                let (known, was) = e.get_mut();
                if let Some(a) = active {
                    *was = a;
                }
                (known != id).then(|| std::mem::replace(known, id.clone()))
            }
            Entry::Vacant(e) => {
                e.insert((id.clone(), active.unwrap_or(true)));
                *self.names.entry(id.name.clone()).or_default() += 1;
                None
            }
        };
        if let Some(old) = replaced {
            *self.names.entry(id.name.clone()).or_default() += 1;
            self.drop_name(old, gone);
        }
    }

    fn remove(&mut self, addr: &SocketAddr, gone: &mut Vec<MemberId>) {
        if let Some((old, _)) = self.by_addr.remove(addr) {
            self.drop_name(old, gone);
        }
    }

    fn drop_name(&mut self, old: MemberId, gone: &mut Vec<MemberId>) {
        if let Entry::Occupied(mut e) = self.names.entry(old.name.clone()) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
                gone.push(old);
            }
        }
    }
}

/// A packet that passed the checks, rewritten for foca.
struct Screened {
    src: MemberId,
    data: Vec<u8>,
    /// Members it introduces (counted against the sender once foca has taken them).
    introductions: Vec<MemberId>,
    /// Members a third party said were down: to check ourselves.
    to_verify: Vec<MemberId>,
    /// The sender's incarnation, in its own words.
    src_incarnation: u16,
    /// Introductions that found this agent full: queued once foca took the packet.
    to_defer: Vec<Member<MemberId>>,
}

/// A member's incarnation, as far as this agent knows it.
#[derive(Clone, Copy, Debug)]
struct Incarnations {
    bump: u16,
    /// The highest it gave itself, first-hand.
    said: u16,
    /// The highest hearsay of it alive that was taken in (at most `said` + the step).
    admitted: u16,
}

/// This agent's own check of a member reported down.
struct Verification {
    id: MemberId,
    generation: u64,
}

/// One agent's view of the mesh.
pub struct Membership {
    foca: Foca<MemberId, PostcardCodec, StdRng, NoCustomBroadcast>,
    /// The measured round trip to each member (see [`Self::set_rtts`]), and its median.
    rtts: HashMap<SocketAddr, Duration>,
    rtt_median: Duration,
    /// The cluster size the current configuration was made for (see [`Self::fit_size`]).
    sized_for: u32,
    forget_down_after: Duration,
    index: Index,
    /// Members introduced by hearsay and not yet heard from first-hand, with who
    /// introduced them.
    unconfirmed: HashMap<SocketAddr, String>,
    /// Per sender, how many of `unconfirmed` it introduced.
    unconfirmed_by: HashMap<String, usize>,
    /// Introductions that found the agent full, with who made them (see [`MAX_DEFERRED`]).
    deferred: VecDeque<(Member<MemberId>, String)>,
    /// The addresses in `deferred` still to take in (one entry per address; news of one's
    /// death cancels it).
    deferred_addrs: HashSet<SocketAddr>,
    /// Per introducer, its entries in `deferred` (at most [`MAX_UNCONFIRMED_PER_SENDER`]:
    /// one insider cannot crowd out everyone else's).
    deferred_by: HashMap<String, usize>,
    verifying: HashMap<SocketAddr, Verification>,
    /// Per member held active, who reported its death (at most [`CORROBORATION`]).
    down_reports: HashMap<SocketAddr, Vec<String>>,
    /// Per member known at an address, the renewed identities hearsay reports there (at
    /// most [`CORROBORATION`] + 1, the oldest dropped: a bogus one cannot reset the count
    /// of the real one) and who reported each (at most [`CORROBORATION`]).
    renewal_reports: HashMap<SocketAddr, Vec<(MemberId, Vec<String>)>>,
    /// Per member that spoke to us first-hand, what we know of its incarnation (the anchor
    /// for capping hearsay: [`MAX_INCARNATION_STEP`]).
    first_hand: HashMap<SocketAddr, Incarnations>,
    /// This agent's own incarnation, as its last packet out said.
    own_incarnation: u16,
    /// Relaxed timeouts while the agent starts ([`STARTUP_GRACE`]).
    grace: bool,
    /// How overloaded the agent is ([`Self::set_overload`]).
    overload: u8,
    /// foca's `suspect_to_down_after`, as last configured.
    suspicion: Duration,
    generation: u64,
    probe_number: u8,
    stats: MembershipStats,
}

impl Membership {
    /// `seed` makes every random choice reproducible (tests); agents pass a random one.
    /// `config` is usually [`config`]`(n, forget_down_after)` for the size `n` expected;
    /// [`Self::fit_size`] adjusts it as the membership grows.
    pub fn new(id: MemberId, config: Config, seed: u64) -> Self {
        let forget_down_after = config.remove_down_after.unwrap_or(FORGET_DOWN_AFTER);
        let suspicion = config.suspect_to_down_after;
        Membership {
            foca: Foca::new(id, config, StdRng::seed_from_u64(seed), PostcardCodec),
            rtts: HashMap::new(),
            rtt_median: Duration::ZERO,
            sized_for: 0,
            forget_down_after,
            index: Index::default(),
            unconfirmed: HashMap::new(),
            unconfirmed_by: HashMap::new(),
            deferred: VecDeque::new(),
            deferred_addrs: HashSet::new(),
            deferred_by: HashMap::new(),
            verifying: HashMap::new(),
            down_reports: HashMap::new(),
            renewal_reports: HashMap::new(),
            first_hand: HashMap::new(),
            own_incarnation: 0,
            grace: false,
            overload: 0,
            suspicion,
            generation: 0,
            probe_number: 0,
            stats: MembershipStats::default(),
        }
    }

    /// Fits dissemination to the membership's size: each update is passed on a number of
    /// times that grows with the log of the members, so a large mesh needs more copies
    /// than the 64-member default. Sizes go by powers of two, so the configuration
    /// changes only when the mesh doubles. Down members count (they are kept until
    /// forgotten, see [`config`]). Returns the size now configured.
    pub fn fit_size(&mut self) -> u32 {
        let members = self.foca.iter_membership_state().len() as u32 + 1;
        let size = members.next_power_of_two().max(MIN_SIZE);
        if size != self.sized_for {
            self.reconfigure(size);
        }
        self.sized_for
    }

    /// Applies the configuration for `size`, the grace and the overload level. foca refuses
    /// a new probe period or probe timeout once running, so only suspicion and
    /// dissemination change here (see [`startup_config`]).
    fn reconfigure(&mut self, size: u32) {
        let mut c = if self.grace {
            startup_config(size, self.forget_down_after)
        } else {
            config(size, self.forget_down_after)
        };
        c.suspect_to_down_after *= 1 + u32::from(self.overload);
        let suspicion = c.suspect_to_down_after;
        match self.foca.set_config(c) {
            Ok(()) => (self.sized_for, self.suspicion) = (size, suspicion),
            Err(e) => {
                debug_assert!(false, "foca refused the membership configuration: {e}");
                tracing::error!("foca refused the membership configuration: {e}");
            }
        }
    }

    /// How overloaded this agent is (0 to [`MAX_OVERLOAD`]): suspicion and its own checks
    /// of reported deaths take `1 + level` times as long, since an agent that runs late
    /// misses answers that did arrive (the
    /// caller measures it: see `core.rs`).
    pub fn set_overload(&mut self, level: u8) {
        let level = level.min(MAX_OVERLOAD);
        if level == self.overload {
            return;
        }
        self.overload = level;
        self.reconfigure(self.sized_for.max(MIN_SIZE));
    }

    pub fn overload(&self) -> u8 {
        self.overload
    }

    /// Declares down, at once and on this agent's own authority, every active member named
    /// `name` (its certificate was revoked: no probe need confirm it). Not relayed as news:
    /// every agent enforces the signed revocation list itself.
    pub fn expel(&mut self, name: &str) -> Vec<Output> {
        let ids: Vec<MemberId> = self
            .index
            .by_addr
            .values()
            .filter(|(id, active)| *active && id.name == name)
            .map(|(id, _)| id.clone())
            .collect();
        let mut c = Collect::default();
        for id in ids {
            if let Err(e) = self
                .foca
                .apply_many(std::iter::once(Member::down(id)), false, &mut c)
            {
                tracing::debug!(member = name, "expelling a member: {e}");
            }
        }
        self.absorb(c)
    }

    /// How long a suspect has to refute before it is declared down, as configured now.
    pub fn suspicion(&self) -> Duration {
        self.suspicion
    }

    /// Takes the round trip measured to each member: QUIC's smoothed RTT of its connection,
    /// which counts the time packets wait in the queues of loaded links. foca's probe
    /// timing is made for a round trip within [`RTT_BUDGET`]; a slower link (a full
    /// uplink while a large revision moves, a link across the world) would fail probes of
    /// members that are fine, and suspicion would outrun refutation. So the timing
    /// stretches by the round trip over the budget, at most [`MAX_STRETCH`] times, by the
    /// median round trip (the links in general) and the member's own:
    /// - the probe cycle (the wait for a direct answer, then indirect probes through
    ///   others, which cross the same links) by the larger of the two for the member
    ///   probed;
    /// - a suspect's time to refute, and this agent's own check of a reported death, by
    ///   the larger of the two.
    ///
    /// A member that slows its own answers (say, by holding back its acknowledgements)
    /// delays this agent's probes of the others by at most 2.7 s each time it is probed
    /// (once per round of every member), and otherwise stretches only the detection of
    /// itself. The median is the lower one over every active member, a member with no
    /// open connection counting as fast: it moves only when more than half of the
    /// members' links are slow. Addresses are taken in their canonical form (a dual-stack
    /// socket reports IPv4 peers IPv6-mapped); those that are not members are ignored.
    /// QUIC's estimate is smoothed (an eighth of each sample), so the stretch lags a
    /// sudden load by a few round trips; the caller leaves out the round trip of a
    /// connection sent on and not acknowledged for a while, such as a killed member's
    /// ([`super::core::Core::handle_rtts`]).
    pub fn set_rtts(&mut self, rtts: impl IntoIterator<Item = (SocketAddr, Duration)>) {
        let index = &self.index.by_addr;
        self.rtts = rtts
            .into_iter()
            .map(|(addr, rtt)| (SocketAddr::new(addr.ip().to_canonical(), addr.port()), rtt))
            .filter(|(addr, _)| index.get(addr).is_some_and(|(_, active)| *active))
            .collect();
        let mut all: Vec<Duration> = index
            .iter()
            .filter(|(_, (_, active))| *active)
            .map(|(addr, _)| self.rtts.get(addr).copied().unwrap_or_default())
            .collect();
        self.rtt_median = if all.is_empty() {
            Duration::ZERO
        } else {
            let lower = (all.len() - 1) / 2;
            *all.select_nth_unstable(lower).1
        };
    }

    /// The lower median of the members' round trips (see [`Self::set_rtts`]).
    pub fn median_rtt(&self) -> Duration {
        self.rtt_median
    }

    /// How many times the failure detection's timing stretches for the links' round trip:
    /// by the median, and about `member` by its own too (see [`Self::set_rtts`]).
    pub fn stretch(&self, member: Option<SocketAddr>) -> u32 {
        let own = member
            .and_then(|a| self.rtts.get(&a).copied())
            .unwrap_or_default();
        let rtt = self.rtt_median.max(own);
        let times = rtt.as_nanos().div_ceil(RTT_BUDGET.as_nanos());
        u32::try_from(times)
            .unwrap_or(u32::MAX)
            .clamp(1, MAX_STRETCH)
    }

    /// Stretches foca's probe and suspicion timers in `out` by the links' round trip (see
    /// [`Self::set_rtts`]); foca refuses new probe timings once running, so they are
    /// stretched here, as they are scheduled. The next probe is stretched as the current
    /// one's wait for a direct answer, so indirect probes (which cross the same slow
    /// links) keep their share of the period, and always fire before it (foca counts an
    /// incomplete probe cycle otherwise).
    fn stretch_timers(&self, out: &mut [Output]) {
        let probed = out.iter().find_map(|o| match o {
            Output::Schedule {
                timer: Timer(TimerKind::Swim(foca::Timer::SendIndirectProbe { probed_id, .. })),
                ..
            } => Some(probed_id.addr),
            _ => None,
        });
        for o in out {
            let Output::Schedule {
                timer: Timer(TimerKind::Swim(t)),
                after,
            } = o
            else {
                continue;
            };
            match t {
                foca::Timer::ProbeRandomMember(_) => *after *= self.stretch(probed),
                foca::Timer::SendIndirectProbe { probed_id, .. } => {
                    *after *= self.stretch(Some(probed_id.addr))
                }
                // The longest any reason asks for: this agent's overload or the start-up
                // grace (already in `after`), or the links.
                foca::Timer::ChangeSuspectToDown { member_id, .. } => {
                    *after = (*after).max(SUSPICION * self.stretch(Some(member_id.addr)))
                }
                _ => {}
            }
        }
    }

    /// Turns the start-up grace on or off (see [`STARTUP_GRACE`]).
    pub fn set_grace(&mut self, on: bool) {
        if self.grace == on {
            return;
        }
        self.grace = on;
        self.reconfigure(self.sized_for.max(MIN_SIZE));
    }

    pub fn id(&self) -> &MemberId {
        self.foca.identity()
    }

    /// What was dropped or decided so far.
    pub fn stats(&self) -> &MembershipStats {
        &self.stats
    }

    /// Asks the member at `addr` to let us in. Its name need not be known.
    pub fn join(&mut self, addr: SocketAddr) -> Vec<Output> {
        let mut out = Collect::default();
        let seed = MemberId {
            name: String::new(),
            addr,
            bump: 0,
        };
        if let Err(e) = self.foca.announce(seed, &mut out) {
            tracing::warn!(%addr, "announcing to the seed: {e}");
        }
        self.absorb(out)
    }

    /// Feeds a packet received from the network over a connection whose certificate names
    /// `sender` and whose remote address is `remote`. The packet is checked and rewritten
    /// first (see the module's documentation); a packet that lies about who sent it, or
    /// cannot be read, is refused whole and changes nothing.
    pub fn handle_data(
        &mut self,
        sender: &str,
        remote: SocketAddr,
        data: &[u8],
    ) -> Result<Vec<Output>, PacketError> {
        let screened = match self.screen(sender, remote, data) {
            Ok(s) => s,
            Err(kind) => {
                self.stats.packets_refused += 1;
                return Err(PacketError { kind });
            }
        };
        let Screened {
            src,
            data,
            introductions,
            to_verify,
            src_incarnation,
            to_defer,
        } = screened;
        let mut c = Collect::default();
        // First-hand, over a connection from that very address: whoever hearsay put there
        // is not there.
        let squatter = match self.index.by_addr.get(&src.addr) {
            Some((known, _)) if *known != src && known.win_addr_conflict(&src) => {
                Some(known.clone())
            }
            _ => None,
        };
        let mut out = Vec::new();
        if let Some(squatter) = squatter {
            out.extend(self.evict(squatter));
        }
        if let Err(e) = self.foca.handle_data(&data, &mut c) {
            // Past the checks, foca's errors come after what it did: keep its outputs.
            self.stats.protocol_errors += 1;
            tracing::debug!(peer = sender, "membership packet: {e}");
        }
        out.extend(self.absorb(c));

        // Its own word on its incarnation, kept while it is a member (after foca took the
        // packet: a refused one changes nothing).
        if matches!(self.index.by_addr.get(&src.addr), Some((k, _)) if *k == src) {
            let fresh = Incarnations {
                bump: src.bump,
                said: src_incarnation,
                admitted: src_incarnation,
            };
            let entry = self.first_hand.entry(src.addr).or_insert(fresh);
            if entry.bump != src.bump {
                *entry = fresh;
            }
            entry.said = entry.said.max(src_incarnation);
            entry.admitted = entry.admitted.max(entry.said);
        }
        // The sender spoke for itself: it is confirmed, and answers any check of it.
        if let Some(introducer) = self.unconfirmed.remove(&src.addr) {
            self.release(&introducer);
        }
        if self.verifying.remove(&src.addr).is_some() {
            self.stats.verified_alive += 1;
        }
        self.down_reports.remove(&src.addr);
        self.renewal_reports.remove(&src.addr);
        for id in introductions {
            let taken = matches!(self.index.by_addr.get(&id.addr), Some((k, _)) if *k == id);
            if taken && !self.unconfirmed.contains_key(&id.addr) {
                self.unconfirmed.insert(id.addr, sender.to_owned());
                *self.unconfirmed_by.entry(sender.to_owned()).or_default() += 1;
            }
        }
        for id in to_verify {
            self.verify(id, &mut out);
        }
        // Queued only from a sender foca holds active (it ignores the payload of others).
        if self.index.active_exactly(&src) {
            for update in to_defer {
                self.defer(update, sender);
            }
        }
        self.readmit(&mut out);
        Ok(out)
    }

    /// Caps a hearsay update's incarnation against the one the member last gave first-hand
    /// (0 if it never spoke to us): news of it alive may run [`MAX_INCARNATION_STEP`] ahead
    /// (its refutations of suspicions we missed), a suspicion or a death no further than
    /// news of it alive that we took in. Anchored first-hand, so repeated hearsay cannot
    /// ratchet it up; and the member takes a suspicion of itself up to its own incarnation
    /// plus the step, so its refutation outbids any suspicion an agent may hold.
    fn clamp_hearsay(&mut self, update: Member<MemberId>) -> Member<MemberId> {
        let id = update.id();
        let known = self
            .first_hand
            .get_mut(&id.addr)
            .filter(|k| k.bump == id.bump);
        let (said, admitted) = known.as_ref().map_or((0, 0), |k| (k.said, k.admitted));
        let cap = match update.state() {
            State::Alive => said.saturating_add(MAX_INCARNATION_STEP),
            _ => admitted.max(said),
        };
        if update.state() == State::Alive
            && let Some(k) = known
        {
            k.admitted = k.admitted.max(update.incarnation().min(cap));
        }
        if update.incarnation() <= cap {
            return update;
        }
        self.stats.incarnations_clamped += 1;
        let state = update.state();
        Member::new(update.id().clone(), cap, state)
    }

    /// Counts `sender` as a reporter of the renewed identity `id`; true once
    /// [`CORROBORATION`] different members reported that very identity.
    fn renewal_corroborated(&mut self, id: &MemberId, sender: &str) -> bool {
        let candidates = self.renewal_reports.entry(id.addr).or_default();
        let at = match candidates.iter().position(|(c, _)| c == id) {
            Some(at) => at,
            None => {
                if candidates.len() > CORROBORATION {
                    candidates.remove(0);
                }
                candidates.push((id.clone(), Vec::new()));
                candidates.len() - 1
            }
        };
        let reporters = &mut candidates[at].1;
        if !reporters.iter().any(|r| r == sender) && reporters.len() < CORROBORATION {
            reporters.push(sender.to_owned());
        }
        reporters.len() >= CORROBORATION
    }

    /// Queues an introduction that found this agent full (see [`MAX_DEFERRED`]).
    fn defer(&mut self, update: Member<MemberId>, introducer: &str) {
        if !self.deferred_addrs.insert(update.id().addr) {
            return;
        }
        self.stats.introductions_deferred += 1;
        if self.deferred.len() >= MAX_DEFERRED
            && let Some((old, by)) = self.deferred.pop_front()
        {
            self.deferred_addrs.remove(&old.id().addr);
            uncount(&mut self.deferred_by, &by);
        }
        *self.deferred_by.entry(introducer.to_owned()).or_default() += 1;
        self.deferred.push_back((update, introducer.to_owned()));
    }

    /// Takes in deferred introductions, oldest first, while there is room for them; those
    /// that became known meanwhile, or whose introducer is at its own cap, are dropped.
    fn readmit(&mut self, out: &mut Vec<Output>) {
        while self.unconfirmed.len() < self.unconfirmed_cap()
            && let Some((update, introducer)) = self.deferred.pop_front()
        {
            let id = update.id().clone();
            uncount(&mut self.deferred_by, &introducer);
            let pending = self.unconfirmed_by.get(&introducer).copied().unwrap_or(0);
            if !self.deferred_addrs.remove(&id.addr)
                || self.index.by_addr.contains_key(&id.addr)
                || self.index.names.contains_key(&id.name)
                || pending >= MAX_UNCONFIRMED_PER_SENDER
            {
                continue;
            }
            let mut c = Collect::default();
            if let Err(e) = self.foca.apply_many(std::iter::once(update), true, &mut c) {
                tracing::debug!(member = %id.name, "taking in a deferred member: {e}");
            }
            out.extend(self.absorb(c));
            if matches!(self.index.by_addr.get(&id.addr), Some((k, _)) if *k == id) {
                self.stats.introductions_readmitted += 1;
                self.unconfirmed.insert(id.addr, introducer.clone());
                *self.unconfirmed_by.entry(introducer).or_default() += 1;
            }
        }
    }

    /// Feeds a timer scheduled by an earlier [`Output::Schedule`].
    pub fn handle_timer(&mut self, timer: Timer) -> Vec<Output> {
        match timer.0 {
            TimerKind::Swim(foca::Timer::RemoveDown(id)) => self.forget(id),
            TimerKind::Swim(t) => {
                let mut c = Collect {
                    periodic: matches!(t, foca::Timer::PeriodicGossip(_)),
                    ..Collect::default()
                };
                if let Err(e) = self.foca.handle_timer(t, &mut c) {
                    self.stats.timer_errors += 1;
                    tracing::debug!("membership timer: {e}");
                }
                self.absorb(c)
            }
            TimerKind::Verify {
                addr,
                generation,
                deadline,
            } => self.verify_timer(addr, generation, deadline),
        }
    }

    /// Leaves the mesh gracefully: members learn this one left rather than failed.
    pub fn leave(&mut self) -> Vec<Output> {
        let mut c = Collect::default();
        let _ = self.foca.leave_cluster(&mut c);
        self.absorb(c)
    }

    /// The members this agent considers alive (itself excluded).
    pub fn alive(&self) -> impl Iterator<Item = &MemberId> {
        self.foca.iter_members().map(|m| m.id())
    }

    /// Every member it knows of, with its state (alive, suspect or down).
    pub fn states(&self) -> impl Iterator<Item = (&MemberId, foca::State)> {
        self.foca
            .iter_membership_state()
            .map(|m| (m.id(), m.state()))
    }

    /// How many members heard of only by hearsay this agent holds at most: [`MAX_UNCONFIRMED`],
    /// or four times as many as it has heard from first-hand when that is more. A large mesh
    /// needs room for the members it has not met yet; an insider's inventions (which never
    /// speak first-hand) stay within a fixed multiple of the real mesh.
    fn unconfirmed_cap(&self) -> usize {
        let confirmed = self
            .index
            .by_addr
            .len()
            .saturating_sub(self.unconfirmed.len());
        MAX_UNCONFIRMED.max(confirmed.saturating_mul(4))
    }

    /// Decodes, checks and rewrites a packet (rules 1 to 4 of the module's documentation).
    fn screen(
        &mut self,
        sender: &str,
        remote: SocketAddr,
        data: &[u8],
    ) -> Result<Screened, PacketErrorKind> {
        if data.len() > MAX_PACKET {
            return Err(PacketErrorKind::TooBig {
                len: data.len(),
                max: MAX_PACKET,
            });
        }
        let mut rest = data;
        let header: Header<MemberId> =
            PostcardCodec
                .decode_header(&mut rest)
                .map_err(|e| PacketErrorKind::Malformed {
                    part: "header",
                    reason: e.to_string(),
                })?;
        let src = header.src.clone();
        if src.name != sender {
            return Err(PacketErrorKind::ImpersonatesSender {
                claimed: src.name,
                sender: sender.to_owned(),
            });
        }
        if !same_endpoint(src.addr, remote) {
            return Err(PacketErrorKind::AddressMismatch {
                claimed: src.addr,
                remote,
            });
        }
        let me = self.foca.identity().clone();
        if src.name == me.name || src.addr == me.addr {
            return Err(PacketErrorKind::FromOurselves { claimed: src.name });
        }
        // Messages that carry no updates (we use no custom broadcasts): nothing may follow.
        let bare = matches!(
            header.message,
            Message::Announce | Message::Broadcast | Message::TurnUndead
        );
        let mut updates = Vec::new();
        if !bare && rest.len() == 1 {
            return Err(PacketErrorKind::Malformed {
                part: "update count",
                reason: "a single byte".into(),
            });
        }
        if !bare && rest.len() >= 2 {
            let count = u16::from_be_bytes([rest[0], rest[1]]);
            rest = &rest[2..];
            for _ in 0..count {
                // Each update takes bytes: the count cannot make us allocate more than
                // the packet holds.
                let member: Member<MemberId> =
                    PostcardCodec.decode_member(&mut rest).map_err(|e| {
                        PacketErrorKind::Malformed {
                            part: "update",
                            reason: e.to_string(),
                        }
                    })?;
                updates.push(member);
            }
        }
        if !rest.is_empty() {
            return Err(PacketErrorKind::TrailingBytes { len: rest.len() });
        }

        // Rule 3: no sending to a third party we do not know active.
        let message = match header.message {
            Message::PingReq { ref target, .. } | Message::IndirectAck { ref target, .. }
                if !self.index.active_exactly(target) =>
            {
                self.stats.requests_to_unknown += 1;
                Message::Gossip
            }
            Message::IndirectPing { ref origin, .. } | Message::ForwardedAck { ref origin, .. }
                if *origin == me =>
            {
                self.stats.requests_to_unknown += 1;
                Message::Gossip
            }
            m => m,
        };

        // Rules 1, 2 and 4, update by update.
        let mut kept = Vec::with_capacity(updates.len());
        let mut seen_addrs = HashSet::new();
        let mut new_names = HashSet::new();
        let mut introductions = Vec::new();
        let mut to_verify = Vec::new();
        let mut to_defer = Vec::new();
        let pending = self.unconfirmed_by.get(sender).copied().unwrap_or(0);
        let unconfirmed_cap = self.unconfirmed_cap();
        for update in updates {
            let id = update.id();
            if !seen_addrs.insert(id.addr) {
                self.stats.duplicate_updates += 1;
                continue;
            }
            if id.name == src.name || id.addr == src.addr {
                if *id != src {
                    self.stats.updates_about_sender_refused += 1;
                    continue;
                }
                kept.push(update);
                continue;
            }
            if id.name == me.name || id.addr == me.addr {
                if *id != me {
                    self.stats.updates_about_us_refused += 1;
                    continue;
                }
                // Only we raise our incarnation: a suspicion far above it (u16::MAX would
                // force a rejoin, since it cannot be refuted) is taken at the most another
                // agent may hold of us (our incarnation given first-hand, plus the step
                // hearsay may add), which our refutation then outbids.
                let incarnation = update
                    .incarnation()
                    .min(self.own_incarnation.saturating_add(MAX_INCARNATION_STEP));
                if incarnation < update.incarnation() {
                    self.stats.incarnations_clamped += 1;
                }
                let state = match update.state() {
                    State::Down => {
                        // We know we are alive: refute it as a suspicion.
                        self.stats.downs_downgraded += 1;
                        State::Suspect
                    }
                    s => s,
                };
                kept.push(Member::new(me.clone(), incarnation, state));
                continue;
            }
            // Hearsay about a third party: its incarnation may not run ahead of what we
            // hold (a forged suspicion at u16::MAX could never be refuted).
            let update = self.clamp_hearsay(update);
            let id = update.id();
            match self.index.by_addr.get(&id.addr) {
                Some((known, active)) => {
                    if known != id {
                        if known.name == id.name {
                            // A renewal (the member restarted, or rejoined after being
                            // declared down) is believed from hearsay only when
                            // CORROBORATION different members relay it: one insider cannot
                            // renew anyone, and since an update not believed is not relayed,
                            // honest relays cannot make up the count for it.
                            let newer = id.win_addr_conflict(known);
                            if newer
                                && update.state() != State::Down
                                && self.renewal_corroborated(id, sender)
                            {
                                self.stats.renewals_corroborated += 1;
                                kept.push(update);
                                continue;
                            }
                            self.stats.updates_renewing_members += 1;
                        } else {
                            self.stats.updates_moving_members += 1;
                        }
                        continue;
                    }
                    if update.state() == State::Down && *active {
                        let reporters = self.down_reports.entry(id.addr).or_default();
                        if !reporters.iter().any(|r| r == sender) && reporters.len() < CORROBORATION
                        {
                            reporters.push(sender.to_owned());
                        }
                        if reporters.len() >= CORROBORATION {
                            // Two first-hand observations: believed.
                            self.stats.downs_corroborated += 1;
                            kept.push(update);
                            continue;
                        }
                        self.stats.downs_downgraded += 1;
                        to_verify.push(id.clone());
                        let (incarnation, id) = (update.incarnation(), id.clone());
                        kept.push(Member::new(id, incarnation, State::Suspect));
                    } else {
                        kept.push(update);
                    }
                }
                None => {
                    if self.index.names.contains_key(&id.name) || !new_names.insert(id.name.clone())
                    {
                        self.stats.updates_moving_members += 1;
                        continue;
                    }
                    if update.state() == State::Down {
                        self.stats.dead_introductions += 1;
                        // Not to be taken in later as alive either.
                        self.deferred_addrs.remove(&id.addr);
                        continue;
                    }
                    if pending + introductions.len() >= MAX_UNCONFIRMED_PER_SENDER {
                        self.stats.introductions_over_cap += 1;
                        continue;
                    }
                    if self.unconfirmed.len() + introductions.len() >= unconfirmed_cap {
                        let queued = self.deferred_by.get(sender).copied().unwrap_or(0);
                        if queued + to_defer.len() >= MAX_UNCONFIRMED_PER_SENDER {
                            self.stats.introductions_over_cap += 1;
                        } else if !self.deferred_addrs.contains(&id.addr) {
                            to_defer.push(update);
                        }
                        continue;
                    }
                    introductions.push(id.clone());
                    kept.push(update);
                }
            }
        }

        let header = Header {
            src: header.src,
            src_incarnation: header.src_incarnation,
            dst: header.dst,
            message,
        };
        let out = encode_packet(&header, if bare { &[] } else { &kept });
        Ok(Screened {
            src,
            data: out,
            introductions,
            to_verify,
            src_incarnation: header.src_incarnation,
            to_defer,
        })
    }

    /// Starts this agent's own check of a member a third party said was down.
    fn verify(&mut self, id: MemberId, out: &mut Vec<Output>) {
        if self.verifying.contains_key(&id.addr) || !self.index.active_exactly(&id) {
            return;
        }
        self.generation += 1;
        let generation = self.generation;
        self.stats.verifications_started += 1;
        out.push(self.ping(&id));
        let (retry, limit) = if self.grace {
            (GRACE_VERIFY_RETRY, GRACE_VERIFY_DEADLINE)
        } else {
            (VERIFY_RETRY, VERIFY_DEADLINE)
        };
        let stretch = (1 + u32::from(self.overload)).max(self.stretch(Some(id.addr)));
        let (retry, limit) = (retry * stretch, limit * stretch);
        for (after, deadline) in [(retry, false), (limit, true)] {
            out.push(Output::Schedule {
                timer: Timer(TimerKind::Verify {
                    addr: id.addr,
                    generation,
                    deadline,
                }),
                after,
            });
        }
        self.verifying
            .insert(id.addr, Verification { id, generation });
    }

    fn verify_timer(&mut self, addr: SocketAddr, generation: u64, deadline: bool) -> Vec<Output> {
        let Some(v) = self
            .verifying
            .get(&addr)
            .filter(|v| v.generation == generation)
        else {
            return Vec::new();
        };
        if !deadline {
            let id = v.id.clone();
            return vec![self.ping(&id)];
        }
        let Some(Verification { id, .. }) = self.verifying.remove(&addr) else {
            return Vec::new();
        };
        self.down_reports.remove(&addr);
        if !self.index.active_exactly(&id) {
            return Vec::new();
        }
        // It did not answer us: our own evidence, as strong as a failed probe and its
        // suspicion timeout.
        let incarnation = self
            .foca
            .iter_membership_state()
            .find(|m| *m.id() == id)
            .map_or(0, |m| m.incarnation());
        self.stats.verified_down += 1;
        let mut c = Collect::default();
        if let Err(e) = self.foca.apply_many(
            std::iter::once(Member::new(id, incarnation, State::Down)),
            true,
            &mut c,
        ) {
            tracing::debug!("declaring a member down: {e}");
        }
        self.absorb(c)
    }

    /// A bare ping from this agent (its answer is the proof of life).
    fn ping(&mut self, to: &MemberId) -> Output {
        self.probe_number = self.probe_number.wrapping_add(1);
        let header = Header {
            src: self.foca.identity().clone(),
            // Older than or equal to what members know of us: it changes nothing.
            src_incarnation: self.own_incarnation,
            dst: to.clone(),
            message: Message::Ping(self.probe_number),
        };
        let mut data = Vec::new();
        PostcardCodec
            .encode_header(&header, &mut data)
            .expect("encoding into a Vec");
        Output::Send {
            to: to.clone(),
            data,
            dial: true,
        }
    }

    /// Removes a member hearsay put at an address where another identity has just spoken
    /// first-hand.
    fn evict(&mut self, squatter: MemberId) -> Vec<Output> {
        let mut c = Collect::default();
        if let Err(e) = self.foca.apply_many(
            std::iter::once(Member::down(squatter.clone())),
            false,
            &mut c,
        ) {
            tracing::debug!("evicting a member: {e}");
        }
        let mut out = self.absorb(c);
        out.extend(self.forget(squatter));
        out
    }

    /// Handles foca's `RemoveDown`: the member goes if it is still down, and with it all we
    /// kept about it.
    fn forget(&mut self, id: MemberId) -> Vec<Output> {
        let goes = matches!(self.index.by_addr.get(&id.addr), Some((k, false)) if *k == id);
        let mut c = Collect::default();
        if let Err(e) = self
            .foca
            .handle_timer(foca::Timer::RemoveDown(id.clone()), &mut c)
        {
            tracing::debug!("membership timer: {e}");
        }
        let mut gone = Vec::new();
        if goes {
            self.stats.members_forgotten += 1;
            self.index.remove(&id.addr, &mut gone);
            if let Some(introducer) = self.unconfirmed.remove(&id.addr) {
                self.release(&introducer);
            }
            self.verifying.remove(&id.addr);
            self.down_reports.remove(&id.addr);
            self.renewal_reports.remove(&id.addr);
            self.first_hand.remove(&id.addr);
        }
        let mut out = self.absorb(c);
        out.extend(gone.into_iter().map(Output::Forgotten));
        out
    }

    fn release(&mut self, introducer: &str) {
        uncount(&mut self.unconfirmed_by, introducer);
    }

    /// Brings the index in step with what foca reported, and returns the outputs.
    fn absorb(&mut self, c: Collect) -> Vec<Output> {
        let Collect {
            mut out,
            changes,
            incarnation,
            ..
        } = c;
        if let Some(i) = incarnation {
            self.own_incarnation = i;
        }
        let mut gone = Vec::new();
        let mut never_heard = Vec::new();
        for change in changes {
            match change {
                Change::Up(id) => self.index.set(&id, Some(true), &mut gone),
                Change::Down(id) => {
                    if self.unconfirmed.contains_key(&id.addr) {
                        never_heard.push(id.clone());
                    }
                    self.index.set(&id, Some(false), &mut gone)
                }
                Change::Rename(id) => self.index.set(&id, None, &mut gone),
            }
        }
        if self.index.by_addr.len() != self.foca.iter_membership_state().len() {
            debug_assert!(false, "the membership index fell out of step with foca");
            tracing::warn!("the membership index fell out of step with foca; rebuilt");
            self.rebuild_index(&mut gone);
        }
        self.stretch_timers(&mut out);
        out.extend(gone.into_iter().map(Output::Forgotten));
        // Down and never heard from first-hand: most likely invented; forgotten soon.
        out.extend(never_heard.into_iter().map(|id| Output::Schedule {
            timer: Timer(TimerKind::Swim(foca::Timer::RemoveDown(id))),
            after: FORGET_UNCONFIRMED_AFTER,
        }));
        out
    }

    fn rebuild_index(&mut self, gone: &mut Vec<MemberId>) {
        let old_names: Vec<MemberId> = self
            .index
            .by_addr
            .values()
            .map(|(k, _)| k.clone())
            .collect();
        self.index = Index::default();
        let members: Vec<(MemberId, bool)> = self
            .foca
            .iter_membership_state()
            .map(|m| (m.id().clone(), m.state() != State::Down))
            .collect();
        for (id, active) in members {
            self.index.set(&id, Some(active), gone);
        }
        for old in old_names {
            if !self.index.names.contains_key(&old.name) && !gone.iter().any(|g| g.name == old.name)
            {
                gone.push(old);
            }
        }
        let index = &self.index;
        let dropped: Vec<String> = self
            .unconfirmed
            .iter()
            .filter(|(addr, _)| !index.by_addr.contains_key(addr))
            .map(|(_, by)| by.clone())
            .collect();
        self.unconfirmed
            .retain(|addr, _| index.by_addr.contains_key(addr));
        self.verifying
            .retain(|addr, _| index.by_addr.contains_key(addr));
        for by in dropped {
            self.release(&by);
        }
    }
}

/// Whether two addresses name the same endpoint (an IPv4 address and its IPv6-mapped form,
/// as a dual-stack socket reports it, are the same).
fn same_endpoint(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && a.ip().to_canonical() == b.ip().to_canonical()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn id(name: &str, port: u16) -> MemberId {
        MemberId {
            name: name.into(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            bump: 0,
        }
    }

    enum Ev {
        Data(String, SocketAddr, Vec<u8>),
        Timer(Timer),
    }

    /// A few real membership cores on simulated time: packets take 5 ms, timers fire when
    /// due, a muted node neither sends nor receives.
    struct Mesh {
        nodes: Vec<Membership>,
        queue: BTreeMap<(u64, u64), (usize, Ev)>,
        now: u64,
        seq: u64,
        muted: HashSet<usize>,
        /// Every non-send output, per node, in order.
        seen: Vec<(usize, Output)>,
        /// Every address sent to, per node.
        sent_to: Vec<(usize, SocketAddr)>,
        /// How long a packet takes, in ms (5 unless a test says otherwise).
        latency: u64,
        /// One packet in this many is lost (none if 0): the queue of a full link
        /// overflowing. Which ones is deterministic.
        lose_every: u64,
        sent: u64,
    }

    impl Mesh {
        fn new(names: &[&str], forget_down_after: Duration) -> Mesh {
            let nodes = names
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    Membership::new(
                        id(n, 7000 + i as u16),
                        config(8, forget_down_after),
                        i as u64 + 1,
                    )
                })
                .collect();
            let mut mesh = Mesh {
                nodes,
                queue: BTreeMap::new(),
                now: 0,
                seq: 0,
                muted: HashSet::new(),
                seen: Vec::new(),
                sent_to: Vec::new(),
                latency: 5,
                lose_every: 0,
                sent: 0,
            };
            for i in 1..names.len() {
                let out = mesh.nodes[i].join(id(names[0], 7000).addr);
                mesh.apply(i, out);
            }
            mesh.run(5_000);
            for i in 0..names.len() {
                assert_eq!(mesh.nodes[i].alive().count(), names.len() - 1, "joined");
            }
            mesh
        }

        fn at(&mut self, t: u64, node: usize, ev: Ev) {
            self.seq += 1;
            self.queue.insert((t, self.seq), (node, ev));
        }

        fn apply(&mut self, node: usize, out: Vec<Output>) {
            for o in out {
                match o {
                    Output::Send { to, data, .. } => {
                        self.sent_to.push((node, to.addr));
                        let from = self.nodes[node].id().clone();
                        if let Some(j) = self.nodes.iter().position(|n| n.id().addr == to.addr) {
                            self.sent += 1;
                            let lost = self.lose_every > 0
                                && self
                                    .sent
                                    .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                                    .is_multiple_of(self.lose_every);
                            if !lost {
                                let at = self.now + self.latency;
                                self.at(at, j, Ev::Data(from.name, from.addr, data));
                            }
                        }
                    }
                    Output::Schedule { timer, after } => {
                        self.at(self.now + after.as_millis() as u64, node, Ev::Timer(timer))
                    }
                    other => self.seen.push((node, other)),
                }
            }
        }

        fn run(&mut self, for_ms: u64) {
            let until = self.now + for_ms;
            while let Some(entry) = self.queue.first_entry() {
                if entry.key().0 > until {
                    break;
                }
                let ((t, _), (node, ev)) = entry.remove_entry();
                self.now = t;
                if self.muted.contains(&node) {
                    continue;
                }
                let out = match ev {
                    Ev::Data(from, remote, data) => self.nodes[node]
                        .handle_data(&from, remote, &data)
                        .expect("honest packets pass"),
                    Ev::Timer(timer) => self.nodes[node].handle_timer(timer),
                };
                self.apply(node, out);
            }
            self.now = until;
        }

        /// Feeds `node` a packet as if `from` had sent it, and applies what it does.
        fn forge(&mut self, node: usize, from: usize, packet: Vec<u8>) -> Result<(), PacketError> {
            let from = self.nodes[from].id().clone();
            let out = self.nodes[node].handle_data(&from.name, from.addr, &packet)?;
            self.apply(node, out);
            Ok(())
        }

        /// The members' identities, in order.
        fn ids<const N: usize>(&self) -> [MemberId; N] {
            std::array::from_fn(|i| self.nodes[i].id().clone())
        }

        fn view(&self, node: usize) -> Vec<(MemberId, State)> {
            let mut v: Vec<(MemberId, State)> = self.nodes[node]
                .states()
                .map(|(m, s)| (m.clone(), s))
                .collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        }

        fn downs(&self, node: usize, name: &str) -> usize {
            self.seen
                .iter()
                .filter(|(n, o)| *n == node && matches!(o, Output::Down(m) if m.name == name))
                .count()
        }
    }

    /// A packet from `src` to `dst`, as foca would encode it.
    fn packet(
        src: &MemberId,
        dst: &MemberId,
        message: Message<MemberId>,
        updates: &[Member<MemberId>],
    ) -> Vec<u8> {
        let header = Header {
            src: src.clone(),
            src_incarnation: 0,
            dst: dst.clone(),
            message,
        };
        let mut data = encode_packet(&header, updates);
        if updates.is_empty() && header.message != Message::Announce {
            // As foca writes it: a count of none (the garbage tests build on it).
            data.extend(0u16.to_be_bytes());
        }
        assert!(data.len() <= MAX_PACKET);
        data
    }

    /// Four members on loaded links: a round trip of 400 ms (four times the probes' wait)
    /// and one packet in ten lost, the round trip told to each member or not; the deaths
    /// they saw in a minute.
    fn deaths_on_slow_links(told: bool) -> (Mesh, usize) {
        let names = ["a", "b", "c", "d"];
        let mut mesh = Mesh::new(&names, FORGET_DOWN_AFTER);
        mesh.latency = 200;
        mesh.lose_every = 10;
        let addrs: Vec<SocketAddr> = mesh.nodes.iter().map(|n| n.id().addr).collect();
        if told {
            for node in &mut mesh.nodes {
                let own = node.id().addr;
                node.set_rtts(
                    addrs
                        .iter()
                        .filter(|a| **a != own)
                        .map(|a| (*a, Duration::from_millis(400))),
                );
            }
        }
        mesh.run(60_000);
        let deaths = (0..names.len())
            .map(|n| names.iter().map(|m| mesh.downs(n, m)).sum::<usize>())
            .sum();
        (mesh, deaths)
    }

    #[test]
    fn on_slow_links_members_that_are_fine_are_not_declared_down() {
        // Without the round trip, probes time out and suspicions outrun refutations: the
        // check that this setting does fool the fixed timing.
        let (_, fooled) = deaths_on_slow_links(false);
        assert!(
            fooled > 0,
            "no false death without the round trip: the test shows nothing"
        );
        let (mut mesh, deaths) = deaths_on_slow_links(true);
        assert_eq!(deaths, 0, "members that are fine were declared down");
        for node in &mesh.nodes {
            assert_eq!(
                node.stats().timer_errors,
                0,
                "a probe cycle broken by the stretch"
            );
        }
        assert_eq!(mesh.nodes[0].stretch(None), 8);
        // A member that really stops is still declared down by every other, within the
        // stretched probe cycle and suspicion (8 × 300 ms, 8 × 1 s, and gossip's way).
        mesh.muted.insert(3);
        mesh.run(20_000);
        for n in 0..3 {
            assert_eq!(mesh.downs(n, "d"), 1, "member {n} saw d die");
        }
    }

    #[test]
    fn a_slow_member_stretches_the_detection_of_itself_and_not_the_median() {
        let mut mesh = Mesh::new(&["a", "p1", "p2", "p3", "p4"], FORGET_DOWN_AFTER);
        let peers: Vec<MemberId> = mesh.nodes[1..].iter().map(|n| n.id().clone()).collect();
        let m = &mut mesh.nodes[0];
        let ms = Duration::from_millis;
        // p1 answers in 5 s (or says so by holding back its acknowledgements); the others
        // in 1 ms; an address that is no member is ignored.
        m.set_rtts(
            peers
                .iter()
                .map(|p| (p.addr, ms(if p.name == "p1" { 5000 } else { 1 })))
                .chain([(id("stranger", 9999).addr, ms(5000))]),
        );
        assert_eq!(m.stretch(None), 1);
        assert_eq!(m.stretch(Some(peers[1].addr)), 1);
        assert_eq!(m.stretch(Some(peers[0].addr)), MAX_STRETCH, "capped");
        assert_eq!(m.stretch(Some(id("stranger", 9999).addr)), 1);
        // Probing p1 waits longer, for its direct answer and its indirect probes: the
        // cycle is stretched whole. Its suspicion has the longest time.
        let swim = |t: foca::Timer<MemberId>, after: Duration| Output::Schedule {
            timer: Timer(TimerKind::Swim(t)),
            after,
        };
        let after = |o: &Output| match o {
            Output::Schedule { after, .. } => *after,
            other => panic!("{other:?}"),
        };
        let mut out = vec![
            swim(foca::Timer::ProbeRandomMember(0), PROBE_PERIOD),
            swim(
                foca::Timer::SendIndirectProbe {
                    probed_id: peers[0].clone(),
                    token: 0,
                },
                PROBE_RTT,
            ),
            swim(
                foca::Timer::ChangeSuspectToDown {
                    member_id: peers[0].clone(),
                    incarnation: 0,
                    token: 0,
                },
                SUSPICION,
            ),
        ];
        m.stretch_timers(&mut out);
        assert_eq!(after(&out[0]), PROBE_PERIOD * MAX_STRETCH);
        assert_eq!(after(&out[1]), ms(1000));
        assert_eq!(after(&out[2]), SUSPICION * MAX_STRETCH);
        // Two of four slow: not the median (nor one insider among two open connections,
        // the others counting as fast).
        m.set_rtts(peers[..2].iter().map(|p| (p.addr, ms(400))));
        assert_eq!(m.stretch(None), 1);
        assert_eq!(m.stretch(Some(peers[2].addr)), 1);
        m.set_rtts([(peers[0].addr, ms(400)), (peers[1].addr, ms(1))]);
        assert_eq!(m.stretch(None), 1);
        // As a dual-stack socket reports an IPv4 peer: the same member.
        let mapped = |a: SocketAddr| match a.ip() {
            std::net::IpAddr::V4(v4) => SocketAddr::new(v4.to_ipv6_mapped().into(), a.port()),
            std::net::IpAddr::V6(_) => a,
        };
        m.set_rtts([(mapped(peers[0].addr), ms(400))]);
        assert_eq!(m.stretch(Some(peers[0].addr)), 8);
        // Most links slow: every detection waits longer, by the median.
        m.set_rtts(peers[..3].iter().map(|p| (p.addr, ms(120))));
        assert_eq!(m.stretch(None), 3);
        assert_eq!(m.stretch(Some(peers[3].addr)), 3);
        let mut out = vec![swim(foca::Timer::ProbeRandomMember(0), PROBE_PERIOD)];
        m.stretch_timers(&mut out);
        assert_eq!(after(&out[0]), PROBE_PERIOD * 3);
    }

    #[test]
    fn a_restarted_agent_wins_over_its_previous_life() {
        let old = id("a", 7400);
        let old = MemberId { bump: 7, ..old };
        let new = old.renew().unwrap();
        assert!(new.win_addr_conflict(&old));
        assert!(!old.win_addr_conflict(&new));
        let placeholder = MemberId {
            name: String::new(),
            bump: 0,
            ..old.clone()
        };
        assert!(old.win_addr_conflict(&placeholder) && !placeholder.win_addr_conflict(&old));
        let wrapped = MemberId {
            bump: u16::MAX,
            ..old.clone()
        }
        .renew()
        .unwrap();
        assert_eq!(wrapped.bump, 0);
        assert!(wrapped.win_addr_conflict(&MemberId {
            bump: u16::MAX,
            ..old
        }));
    }

    #[test]
    fn garbage_packets_are_refused_and_change_nothing() {
        let mut mesh = Mesh::new(&["a", "b"], FORGET_DOWN_AFTER);
        let before = mesh.view(0);
        let remote = mesh.nodes[1].id().addr;
        let (a, b) = (mesh.nodes[0].id().clone(), mesh.nodes[1].id().clone());
        let kinds: Vec<PacketErrorKind> = [&b""[..], b"\xff\xff\xff\xff", &[7u8; 2000]]
            .into_iter()
            .map(|junk| {
                mesh.nodes[0]
                    .handle_data("b", remote, junk)
                    .unwrap_err()
                    .kind
            })
            .collect();
        assert!(matches!(
            kinds[0],
            PacketErrorKind::Malformed { part: "header", .. }
        ));
        assert!(matches!(kinds[1], PacketErrorKind::Malformed { .. }));
        assert_eq!(
            kinds[2],
            PacketErrorKind::TooBig {
                len: 2000,
                max: MAX_PACKET
            }
        );

        let mut trailing = packet(&b, &a, Message::Gossip, &[]);
        trailing.push(0);
        let err = mesh.nodes[0]
            .handle_data("b", remote, &trailing)
            .unwrap_err();
        assert_eq!(*err.kind(), PacketErrorKind::TrailingBytes { len: 1 });
        let mut announce = packet(&b, &a, Message::Announce, &[]);
        announce.extend([0, 0]);
        let err = mesh.nodes[0]
            .handle_data("b", remote, &announce)
            .unwrap_err();
        assert_eq!(*err.kind(), PacketErrorKind::TrailingBytes { len: 2 });
        // A count of updates the packet does not hold.
        let mut short = packet(&b, &a, Message::Gossip, &[]);
        let n = short.len();
        short[n - 2..].copy_from_slice(&500u16.to_be_bytes());
        assert!(matches!(
            mesh.nodes[0]
                .handle_data("b", remote, &short)
                .unwrap_err()
                .kind,
            PacketErrorKind::Malformed { part: "update", .. }
        ));
        assert_eq!(mesh.view(0), before);
        assert_eq!(mesh.nodes[0].stats().packets_refused, 6);
    }

    #[test]
    fn dissemination_grows_with_the_mesh() {
        let id = |i: u32| MemberId {
            name: format!("m{i}"),
            addr: SocketAddr::from(([127, 3, (i / 250) as u8, (i % 250) as u8 + 1], 7400)),
            bump: 0,
        };
        let mut m = Membership::new(id(0), config(64, FORGET_DOWN_AFTER), 1);
        assert_eq!(m.fit_size(), 64);
        for i in 1..=200 {
            let mut other = Membership::new(id(i), config(64, FORGET_DOWN_AFTER), u64::from(i));
            for o in other.join(id(0).addr) {
                if let Output::Send { data, .. } = o {
                    m.handle_data(&format!("m{i}"), id(i).addr, &data).unwrap();
                }
            }
        }
        assert_eq!(m.fit_size(), 256, "201 members");
        assert!(
            config(256, FORGET_DOWN_AFTER).max_transmissions
                > config(64, FORGET_DOWN_AFTER).max_transmissions
        );
    }

    #[test]
    fn a_packet_must_come_from_the_member_it_names() {
        let mut a = Membership::new(id("a", 1), config(8, FORGET_DOWN_AFTER), 1);
        let mut b = Membership::new(id("b", 2), config(8, FORGET_DOWN_AFTER), 2);
        let announce = a.join(id("b", 2).addr);
        let Some(Output::Send { data, .. }) = announce
            .into_iter()
            .find(|o| matches!(o, Output::Send { .. }))
        else {
            panic!("joining sends an announce");
        };
        let err = b
            .handle_data("mallory", id("a", 1).addr, &data)
            .unwrap_err();
        assert_eq!(
            *err.kind(),
            PacketErrorKind::ImpersonatesSender {
                claimed: "a".into(),
                sender: "mallory".into()
            }
        );
        assert!(
            err.to_string()
                .contains("claims to come from `a` but arrived from `mallory`"),
            "{err}"
        );
        // The right name from another address: someone else's connection.
        let elsewhere = SocketAddr::from(([10, 0, 0, 9], 1));
        let err = b.handle_data("a", elsewhere, &data).unwrap_err();
        assert_eq!(
            *err.kind(),
            PacketErrorKind::AddressMismatch {
                claimed: id("a", 1).addr,
                remote: elsewhere
            }
        );
        assert!(err.to_string().contains("10.0.0.9:1"), "{err}");
        assert_eq!(b.alive().count(), 0, "the forged packets changed nothing");
        // A dual-stack socket reports the same endpoint IPv6-mapped.
        let mapped = SocketAddr::from((std::net::Ipv4Addr::new(127, 0, 0, 1).to_ipv6_mapped(), 1));
        b.handle_data("a", mapped, &data).unwrap();
        assert_eq!(
            b.alive().map(|m| m.name.as_str()).collect::<Vec<_>>(),
            ["a"]
        );
    }

    #[test]
    fn hearsay_cannot_take_over_an_address_or_renew_a_member() {
        let mut mesh = Mesh::new(&["a", "b", "mallory"], FORGET_DOWN_AFTER);
        let [a, b, m] = mesh.ids();
        let before = mesh.view(0);
        let lies = [
            // b's next life, at b's address (a resurrection by bump + 1)
            Member::alive(MemberId {
                bump: b.bump + 1,
                ..b.clone()
            }),
            // another name at b's address
            Member::alive(MemberId {
                name: "eve".into(),
                bump: 9,
                ..b.clone()
            }),
            // b moved to mallory's choice of address
            Member::alive(MemberId {
                addr: "10.6.6.6:7400".parse().unwrap(),
                ..b.clone()
            }),
            // a about itself elsewhere
            Member::alive(MemberId {
                addr: "10.6.6.7:7400".parse().unwrap(),
                ..a.clone()
            }),
            // mallory speaking of its own other life: it must use its own identity
            Member::alive(MemberId {
                bump: 3,
                ..m.clone()
            }),
        ];
        // One packet each: two updates about one address in a packet are dropped anyway.
        for lie in lies {
            mesh.forge(0, 2, packet(&m, &a, Message::Gossip, &[lie]))
                .unwrap();
        }
        mesh.run(3_000);
        assert_eq!(mesh.view(0), before, "a's membership is unchanged");
        let st = mesh.nodes[0].stats();
        assert_eq!(st.updates_renewing_members, 1);
        assert_eq!(st.updates_moving_members, 2);
        assert_eq!(st.updates_about_us_refused, 1);
        assert_eq!(st.updates_about_sender_refused, 1);
        assert!(
            !mesh
                .sent_to
                .iter()
                .any(|(n, to)| *n == 0 && to.ip().to_string().starts_with("10."))
        );
    }

    #[test]
    fn a_flood_of_invented_members_stops_at_the_cap() {
        let mut mesh = Mesh::new(&["a", "b", "mallory"], FORGET_DOWN_AFTER);
        let (a, m) = (mesh.nodes[0].id().clone(), mesh.nodes[2].id().clone());
        let invented: Vec<Member<MemberId>> = (0..1000u32)
            .map(|i| {
                Member::alive(MemberId {
                    name: format!("x{i}"),
                    addr: SocketAddr::from(([10, 1, (i / 250) as u8, (i % 250) as u8], 7400)),
                    bump: 0,
                })
            })
            .collect();
        for chunk in invented.chunks(40) {
            mesh.forge(0, 2, packet(&m, &a, Message::Gossip, chunk))
                .unwrap();
        }
        let known = mesh.nodes[0].states().count();
        assert_eq!(
            known,
            2 + MAX_UNCONFIRMED_PER_SENDER,
            "b, mallory and the cap"
        );
        assert_eq!(
            mesh.nodes[0].stats().introductions_over_cap,
            1000 - MAX_UNCONFIRMED_PER_SENDER as u64
        );
        // The invented members never answer: a declares them down on its own probes and,
        // never having heard from them first-hand, forgets them a minute later.
        mesh.run(60_000 + FORGET_UNCONFIRMED_AFTER.as_millis() as u64);
        assert_eq!(mesh.nodes[0].alive().count(), 2, "only b and mallory alive");
        assert_eq!(
            mesh.nodes[0].states().count(),
            2,
            "the inventions are forgotten soon after they are found dead"
        );
        assert!(mesh.nodes[0].stats().members_forgotten >= MAX_UNCONFIRMED_PER_SENDER as u64);
        // Their slots are free again; the cap still holds for the next flood.
        for chunk in invented.chunks(40) {
            mesh.forge(0, 2, packet(&m, &a, Message::Gossip, chunk))
                .unwrap();
        }
        assert_eq!(
            mesh.nodes[0].states().count(),
            2 + MAX_UNCONFIRMED_PER_SENDER
        );
        // Invented members introduced already dead are not learnt at all.
        let dead = Member::down(MemberId {
            name: "ghost".into(),
            ..invented[999].id().clone()
        });
        let mut mesh = Mesh::new(&["a", "b", "mallory"], FORGET_DOWN_AFTER);
        let (a, m) = (mesh.nodes[0].id().clone(), mesh.nodes[2].id().clone());
        mesh.forge(0, 2, packet(&m, &a, Message::Gossip, &[dead]))
            .unwrap();
        assert_eq!(mesh.nodes[0].states().count(), 2);
        assert_eq!(mesh.nodes[0].stats().dead_introductions, 1);
    }

    #[test]
    fn a_death_two_members_report_is_believed_at_once() {
        let mut mesh = Mesh::new(&["a", "b", "c", "d"], FORGET_DOWN_AFTER);
        let [a, b, c, d] = mesh.ids();
        let state_of_d = |mesh: &Mesh| mesh.nodes[0].states().find(|(x, _)| **x == d).unwrap().1;
        // One reporter, twice: a check of our own, not belief.
        for _ in 0..2 {
            mesh.forge(
                0,
                1,
                packet(&b, &a, Message::Gossip, &[Member::down(d.clone())]),
            )
            .unwrap();
        }
        assert_ne!(state_of_d(&mesh), State::Down);
        // A second reporter: believed without waiting for the check.
        mesh.forge(
            0,
            2,
            packet(&c, &a, Message::Gossip, &[Member::down(d.clone())]),
        )
        .unwrap();
        assert_eq!(state_of_d(&mesh), State::Down);
        assert_eq!(mesh.nodes[0].stats().downs_corroborated, 1);
    }

    #[test]
    fn a_renewal_two_members_relay_is_believed() {
        let mut mesh = Mesh::new(&["a", "b", "c", "d"], FORGET_DOWN_AFTER);
        let [a, b, c, d] = mesh.ids();
        let renewed = d.renew().unwrap();
        let held = |mesh: &Mesh| {
            mesh.nodes[0]
                .states()
                .find(|(x, _)| x.addr == d.addr)
                .map(|(x, _)| x.clone())
        };
        // One relay, twice: not believed (it could be an insider's).
        for _ in 0..2 {
            mesh.forge(
                0,
                1,
                packet(&b, &a, Message::Gossip, &[Member::alive(renewed.clone())]),
            )
            .unwrap();
        }
        assert_eq!(held(&mesh), Some(d.clone()));
        // A different renewal from a second relay does not make up the count either.
        let other = renewed.renew().unwrap();
        mesh.forge(
            0,
            2,
            packet(&c, &a, Message::Gossip, &[Member::alive(other)]),
        )
        .unwrap();
        assert_eq!(held(&mesh), Some(d.clone()));
        // The same renewal from a second relay, after b relays it again: believed.
        for (from, src) in [(1, &b), (2, &c)] {
            mesh.forge(
                0,
                from,
                packet(src, &a, Message::Gossip, &[Member::alive(renewed.clone())]),
            )
            .unwrap();
        }
        assert_eq!(held(&mesh), Some(renewed));
        assert_eq!(mesh.nodes[0].stats().renewals_corroborated, 1);
    }

    #[test]
    fn a_suspicion_at_the_last_incarnation_is_taken_as_one_of_the_current() {
        let mut mesh = Mesh::new(&["a", "b", "mallory"], FORGET_DOWN_AFTER);
        let [a, b, m] = mesh.ids();
        mesh.run(2_000);
        // At a: b suspected, and a itself, at u16::MAX.
        for victim in [&b, &a] {
            mesh.forge(
                0,
                2,
                packet(
                    &m,
                    &a,
                    Message::Gossip,
                    &[Member::new(victim.clone(), u16::MAX, State::Suspect)],
                ),
            )
            .unwrap();
        }
        mesh.run(5_000);
        assert_eq!(mesh.nodes[0].id(), &a, "a was not made to rejoin");
        assert!(
            mesh.view(0).contains(&(b.clone(), State::Alive)),
            "b refuted the suspicion: {:?}",
            mesh.view(0)
        );
        assert_eq!(mesh.downs(0, "b"), 0);
        assert_eq!(mesh.nodes[0].stats().incarnations_clamped, 2);
    }

    #[test]
    fn hearsay_cannot_ratchet_an_incarnation_to_make_a_suspicion_stick() {
        let mut mesh = Mesh::new(&["a", "b", "mallory"], FORGET_DOWN_AFTER);
        let [a, b, m] = mesh.ids();
        mesh.run(2_000);
        // b "alive" ever higher, then suspected at the top: b could never refute that.
        for k in 1..=50u16 {
            mesh.forge(
                0,
                2,
                packet(
                    &m,
                    &a,
                    Message::Gossip,
                    &[Member::new(b.clone(), 16 * k, State::Alive)],
                ),
            )
            .unwrap();
        }
        mesh.forge(
            0,
            2,
            packet(
                &m,
                &a,
                Message::Gossip,
                &[Member::new(b.clone(), 800, State::Suspect)],
            ),
        )
        .unwrap();
        mesh.run(5_000);
        assert_eq!(mesh.downs(0, "b"), 0, "{:?}", mesh.view(0));
        assert_eq!(mesh.nodes[1].id(), &b, "b was not made to rejoin");
        assert!(mesh.view(0).contains(&(b.clone(), State::Alive)));
    }

    #[test]
    fn the_grace_and_overload_stretch_suspicion() {
        let mut m = Membership::new(id("a", 7400), config(8, FORGET_DOWN_AFTER), 1);
        assert_eq!(m.suspicion(), Duration::from_secs(1));
        m.set_grace(true);
        assert_eq!(m.suspicion(), Duration::from_secs(10));
        m.set_overload(2);
        assert_eq!(m.suspicion(), Duration::from_secs(30));
        m.fit_size();
        assert_eq!(m.suspicion(), Duration::from_secs(30));
        m.set_grace(false);
        assert_eq!(m.suspicion(), Duration::from_secs(3));
        m.set_overload(0);
        assert_eq!(m.suspicion(), Duration::from_secs(1));
    }

    #[test]
    fn a_forged_death_of_a_live_member_kills_no_one() {
        let mut mesh = Mesh::new(&["a", "b", "mallory"], FORGET_DOWN_AFTER);
        let [a, b, m] = mesh.ids();
        for incarnation in [0, 5, 0] {
            mesh.forge(
                0,
                2,
                packet(
                    &m,
                    &a,
                    Message::Gossip,
                    &[Member::new(b.clone(), incarnation, State::Down)],
                ),
            )
            .unwrap();
            let state = mesh.nodes[0].states().find(|(x, _)| **x == b).unwrap().1;
            assert_ne!(state, State::Down, "suspect at worst");
            mesh.run(3_000);
        }
        // And about a itself: refuted, not a rejoin.
        mesh.forge(
            0,
            2,
            packet(&m, &a, Message::Gossip, &[Member::down(a.clone())]),
        )
        .unwrap();
        mesh.run(3_000);
        assert_eq!(
            mesh.downs(0, "b") + mesh.downs(1, "b") + mesh.downs(2, "b"),
            0
        );
        assert!(
            !mesh
                .seen
                .iter()
                .any(|(_, o)| matches!(o, Output::Rejoined(_)))
        );
        assert_eq!(mesh.nodes[0].id(), &a);
        for i in 0..3 {
            assert!(
                mesh.view(i).iter().all(|(_, s)| *s == State::Alive),
                "{:?}",
                mesh.view(i)
            );
        }
        let st = mesh.nodes[0].stats();
        assert_eq!(st.downs_downgraded, 4);
        assert!(st.verified_alive >= 1 && st.verified_down == 0, "{st:?}");
    }

    #[test]
    fn a_death_reported_and_confirmed_by_our_own_check_stands() {
        let mut mesh = Mesh::new(&["a", "b", "c"], FORGET_DOWN_AFTER);
        let [a, b, c] = mesh.ids();
        mesh.muted.insert(1);
        mesh.forge(
            0,
            2,
            packet(&c, &a, Message::Gossip, &[Member::down(b.clone())]),
        )
        .unwrap();
        mesh.run(VERIFY_DEADLINE.as_millis() as u64 + 10);
        assert_eq!(mesh.downs(0, "b"), 1, "b never answered a's own pings");
        assert_eq!(mesh.nodes[0].stats().verified_down, 1);
    }

    #[test]
    fn no_request_makes_us_send_to_a_stranger() {
        let mut mesh = Mesh::new(&["a", "b", "mallory"], FORGET_DOWN_AFTER);
        let [a, b, m] = mesh.ids();
        let stranger = id("stranger", 9999);
        mesh.sent_to.clear();
        for message in [
            Message::PingReq {
                target: stranger.clone(),
                probe_number: 1,
            },
            Message::IndirectAck {
                target: stranger.clone(),
                probe_number: 1,
            },
            // b, but not b's life we know
            Message::PingReq {
                target: MemberId {
                    bump: 1,
                    ..b.clone()
                },
                probe_number: 1,
            },
            Message::PingReq {
                target: a.clone(),
                probe_number: 1,
            },
        ] {
            mesh.forge(0, 2, packet(&m, &a, message, &[])).unwrap();
        }
        assert!(mesh.sent_to.is_empty(), "{:?}", mesh.sent_to);
        assert_eq!(mesh.nodes[0].stats().requests_to_unknown, 4);
        // A known, active target is pinged on mallory's behalf as SWIM wants.
        mesh.forge(
            0,
            2,
            packet(
                &m,
                &a,
                Message::PingReq {
                    target: b.clone(),
                    probe_number: 1,
                },
                &[],
            ),
        )
        .unwrap();
        assert_eq!(mesh.sent_to, [(0, b.addr)]);
    }

    #[test]
    fn down_members_are_forgotten() {
        let forget = Duration::from_secs(30);
        let mut mesh = Mesh::new(&["a", "b", "c"], forget);
        mesh.muted.insert(2);
        mesh.run(5_000);
        assert_eq!(mesh.downs(0, "c"), 1);
        assert!(
            mesh.nodes[0]
                .states()
                .any(|(m, s)| m.name == "c" && s == State::Down)
        );
        assert!(
            !mesh
                .seen
                .iter()
                .any(|(_, o)| matches!(o, Output::Forgotten(_)))
        );
        mesh.run(forget.as_millis() as u64);
        assert!(
            mesh.nodes[0].states().all(|(m, _)| m.name != "c"),
            "{:?}",
            mesh.view(0)
        );
        assert!(mesh.nodes[1].states().all(|(m, _)| m.name != "c"));
        let mut forgotten: Vec<_> = mesh
            .seen
            .iter()
            .filter_map(|(n, o)| match o {
                Output::Forgotten(m) => Some((*n, m.name.as_str())),
                _ => None,
            })
            .collect();
        forgotten.sort();
        assert_eq!(forgotten, [(0, "c"), (1, "c")]);
        assert_eq!(mesh.nodes[0].stats().members_forgotten, 1);
    }

    #[test]
    fn what_speaks_first_hand_wins_its_address_over_hearsay() {
        // mallory introduces "squatter" at the address where d will come from, with a
        // bump far ahead: d's own packets still get in.
        let mut mesh = Mesh::new(&["a", "b", "mallory"], FORGET_DOWN_AFTER);
        let (a, m) = (mesh.nodes[0].id().clone(), mesh.nodes[2].id().clone());
        let d = id("d", 7100);
        let squatter = MemberId {
            name: "squatter".into(),
            bump: 1000,
            ..d.clone()
        };
        mesh.forge(
            0,
            2,
            packet(&m, &a, Message::Gossip, &[Member::alive(squatter)]),
        )
        .unwrap();
        let out = mesh.nodes[0]
            .handle_data("d", d.addr, &packet(&d, &a, Message::Announce, &[]))
            .unwrap();
        assert!(out.contains(&Output::Forgotten(MemberId {
            name: "squatter".into(),
            bump: 1000,
            ..d.clone()
        })));
        assert!(mesh.nodes[0].alive().any(|x| *x == d));
        assert!(mesh.nodes[0].states().all(|(x, _)| x.name != "squatter"));
    }
}
