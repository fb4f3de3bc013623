//! Membership and failure detection: SWIM (with suspicion and indirect probes) from foca,
//! behind a sans-IO interface. Bytes and timer events go in; [`Output`]s come out: packets
//! to send, timers to schedule, members seen up or down. The caller does all IO, which is
//! what lets `agent/tests/membership_simulation.rs` run hundreds of agents deterministically with
//! simulated time and network.

use std::net::SocketAddr;
use std::num::{NonZeroU8, NonZeroU32, NonZeroUsize};
use std::time::Duration;

use foca::{
    Codec, Config, Foca, NoCustomBroadcast, Notification, PeriodicParams, PostcardCodec, Runtime,
    Timer,
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
    /// Deliver these bytes to that member (as a datagram).
    Send { to: MemberId, data: Vec<u8> },
    /// Hand this timer back through [`Membership::handle_timer`] after the delay.
    Schedule {
        timer: Timer<MemberId>,
        after: Duration,
    },
    /// A member became reachable.
    Up(MemberId),
    /// A member was declared down.
    Down(MemberId),
    /// The mesh had declared this agent down (a partition, a pause); it rejoined under a
    /// renewed identity, which the caller should remember for its next start.
    Rejoined(MemberId),
    /// Every member this agent knew is down or gone: the caller should join again
    /// through its seeds.
    Idle,
}

/// Collects what foca asks of its runtime.
#[derive(Default)]
struct Collect(Vec<Output>);

impl Runtime<MemberId> for Collect {
    fn notify(&mut self, notification: Notification<'_, MemberId>) {
        match notification {
            Notification::MemberUp(id) => self.0.push(Output::Up(id.clone())),
            Notification::MemberDown(id) => self.0.push(Output::Down(id.clone())),
            Notification::Rejoin(id) => self.0.push(Output::Rejoined(id.clone())),
            Notification::Idle => self.0.push(Output::Idle),
            _ => {}
        }
    }

    fn send_to(&mut self, to: MemberId, data: &[u8]) {
        self.0.push(Output::Send {
            to,
            data: data.to_vec(),
        });
    }

    fn submit_after(&mut self, timer: Timer<MemberId>, after: Duration) {
        self.0.push(Output::Schedule { timer, after });
    }
}

/// How the mesh behaves. Tuned for a LAN of agents:
/// - failure detection: a probe every 300 ms (an answer expected within 100 ms, else
///   indirect probes through others), and a suspect declared down after 1 s (over three
///   probe periods to refute a false suspicion);
/// - dissemination: every update is piggybacked twice as often as foca's default, since a
///   member that misses all its copies otherwise learns of it only by chance;
/// - fast news: pending updates (a suspicion, a death) are also gossiped to 3 members every
///   200 ms, on top of riding on probes; an idle mesh sends nothing for it;
/// - anti-entropy: every 2 s an agent announces itself to 2 random members, whose answers
///   carry the members they know, so whatever gossip missed is repaired;
/// - down members are remembered (reported dead, not dropped), told that they are down so
///   they rejoin, and sent an announce every 5 s so a partition heals by itself;
/// - packets fit a QUIC datagram.
pub fn config(cluster_size: u32) -> Config {
    let mut c = Config::new_lan(NonZeroU32::new(cluster_size.max(1)).expect("non-zero"));
    c.probe_period = Duration::from_millis(300);
    c.probe_rtt = Duration::from_millis(100);
    c.suspect_to_down_after = Duration::from_millis(1000);
    c.max_transmissions = c
        .max_transmissions
        .saturating_mul(NonZeroU8::new(2).expect("non-zero"));
    c.periodic_announce = Some(PeriodicParams {
        frequency: Duration::from_secs(2),
        num_members: NonZeroUsize::new(2).expect("non-zero"),
    });
    c.periodic_gossip = Some(PeriodicParams {
        frequency: Duration::from_millis(200),
        num_members: NonZeroUsize::new(3).expect("non-zero"),
    });
    c.remove_down_after = None;
    c.notify_down_members = true;
    c.periodic_announce_to_down_members = Some(PeriodicParams {
        frequency: Duration::from_secs(5),
        num_members: NonZeroUsize::new(2).expect("non-zero"),
    });
    c.max_packet_size = NonZeroUsize::new(MAX_PACKET).expect("non-zero");
    c
}

/// The largest membership packet, chosen to fit a QUIC datagram on a 1200-byte path.
pub const MAX_PACKET: usize = 1150;

/// One agent's view of the mesh.
pub struct Membership {
    foca: Foca<MemberId, PostcardCodec, StdRng, NoCustomBroadcast>,
    /// The cluster size the current configuration was made for (see [`Self::fit_size`]).
    sized_for: u32,
}

/// The smallest cluster size the configuration is made for.
const MIN_SIZE: u32 = 64;

/// A malformed or foreign packet; the membership is unchanged.
#[derive(Debug, thiserror::Error)]
#[error("membership packet refused: {0}")]
pub struct PacketError(String);

impl Membership {
    /// `seed` makes every random choice reproducible (tests); agents pass a random one.
    /// `config` is usually [`config`]`(n)` for the size `n` expected; [`Self::fit_size`]
    /// adjusts it as the membership grows.
    pub fn new(id: MemberId, config: Config, seed: u64) -> Self {
        Membership {
            foca: Foca::new(id, config, StdRng::seed_from_u64(seed), PostcardCodec),
            sized_for: 0,
        }
    }

    /// Fits dissemination to the membership's size: each update is passed on a number of
    /// times that grows with the log of the members, so a large mesh needs more copies
    /// than the 64-member default. Sizes go by powers of two, so the configuration
    /// changes only when the mesh doubles. Down members count (they are kept, see
    /// [`config`]), so the size does not shrink. Returns the size now configured.
    pub fn fit_size(&mut self) -> u32 {
        let members = self.foca.iter_membership_state().len() as u32 + 1;
        let size = members.next_power_of_two().max(MIN_SIZE);
        if size != self.sized_for && self.foca.set_config(config(size)).is_ok() {
            self.sized_for = size;
        }
        self.sized_for
    }

    pub fn id(&self) -> &MemberId {
        self.foca.identity()
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
        out.0
    }

    /// Feeds a packet received from the network over a connection whose certificate names
    /// `sender`. A packet that claims to come from another member is refused: a fleet
    /// member cannot speak for another in the membership (refute its death, say it left).
    pub fn handle_data(&mut self, sender: &str, data: &[u8]) -> Result<Vec<Output>, PacketError> {
        let header: foca::Header<MemberId> = PostcardCodec
            .decode_header(data)
            .map_err(|e| PacketError(e.to_string()))?;
        if header.src.name != sender {
            return Err(PacketError(format!(
                "it claims to come from `{}` but arrived from `{sender}`",
                header.src.name
            )));
        }
        let mut out = Collect::default();
        self.foca
            .handle_data(data, &mut out)
            .map_err(|e| PacketError(e.to_string()))?;
        Ok(out.0)
    }

    /// Feeds a timer scheduled by an earlier [`Output::Schedule`].
    pub fn handle_timer(&mut self, timer: Timer<MemberId>) -> Vec<Output> {
        let mut out = Collect::default();
        if let Err(e) = self.foca.handle_timer(timer, &mut out) {
            tracing::debug!("membership timer: {e}");
        }
        out.0
    }

    /// Leaves the mesh gracefully: members learn this one left rather than failed.
    pub fn leave(&mut self) -> Vec<Output> {
        let mut out = Collect::default();
        let _ = self.foca.leave_cluster(&mut out);
        out.0
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use foca::Identity;

    #[test]
    fn a_restarted_agent_wins_over_its_previous_life() {
        let old = MemberId {
            name: "a".into(),
            addr: "127.0.0.1:7400".parse().unwrap(),
            bump: 7,
        };
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
        let id = MemberId {
            name: "a".into(),
            addr: "127.0.0.1:7400".parse().unwrap(),
            bump: 0,
        };
        let mut m = Membership::new(id, config(8), 1);
        for junk in [&b""[..], b"\xff\xff\xff\xff", &[7u8; 2000]] {
            assert!(m.handle_data("b", junk).is_err());
        }
        assert_eq!(m.alive().count(), 0);
    }

    #[test]
    fn dissemination_grows_with_the_mesh() {
        let id = |i: u32| MemberId {
            name: format!("m{i}"),
            addr: SocketAddr::from(([127, 3, (i / 250) as u8, (i % 250) as u8 + 1], 7400)),
            bump: 0,
        };
        let mut m = Membership::new(id(0), config(64), 1);
        assert_eq!(m.fit_size(), 64);
        for i in 1..=200 {
            let mut other = Membership::new(id(i), config(64), u64::from(i));
            for o in other.join(id(0).addr) {
                if let Output::Send { data, .. } = o {
                    m.handle_data(&format!("m{i}"), &data).unwrap();
                }
            }
        }
        assert_eq!(m.fit_size(), 256, "201 members");
        assert!(config(256).max_transmissions > config(64).max_transmissions);
    }

    #[test]
    fn a_packet_must_come_from_the_member_it_names() {
        let id = |name: &str, port: u16| MemberId {
            name: name.into(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            bump: 0,
        };
        let mut a = Membership::new(id("a", 1), config(8), 1);
        let mut b = Membership::new(id("b", 2), config(8), 2);
        let announce = a.join(id("b", 2).addr);
        let Some(Output::Send { data, .. }) = announce
            .into_iter()
            .find(|o| matches!(o, Output::Send { .. }))
        else {
            panic!("joining sends an announce");
        };
        let err = b.handle_data("mallory", &data).unwrap_err().to_string();
        assert!(
            err.contains("claims to come from `a` but arrived from `mallory`"),
            "{err}"
        );
        assert_eq!(b.alive().count(), 0, "the forged packet changed nothing");
        b.handle_data("a", &data).unwrap();
        assert_eq!(
            b.alive().map(|m| m.name.as_str()).collect::<Vec<_>>(),
            ["a"]
        );
    }
}
