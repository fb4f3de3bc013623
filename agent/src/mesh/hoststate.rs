//! Gossiped host state, sans-IO. Every agent owns one versioned [`HostRecord`] (its tags,
//! and per application the active revision, its health and the revisions it holds) and
//! keeps the newest version it has seen of everyone else's. The newest version wins.
//!
//! Spreading: the owner pushes a new version to every peer at once while the fleet is small
//! (one hop, no relays); in a larger fleet it pushes to a few random peers and whoever
//! learns something new relays it the same way (rumor mongering). Repairing: every tick an
//! agent sends a digest (name and version of each record) to one random peer, which answers
//! with what is newer on its side and asks for what is newer on ours (anti-entropy). That
//! brings a restarted or partitioned agent up to date, and lets a restarted agent find its
//! own record from a previous life and publish above it.
//!
//! Messages and peer lists go in; messages to send and what was learned come out. The
//! agent's network loop (`node.rs`) and the simulation tests drive the same code.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use serde::{Deserialize, Serialize};

/// How an application's service is doing on its host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// The service is running.
    Running,
    /// The AppSpec declares a service and it is not running.
    Stopped,
    /// A deployment holds the application right now.
    Deploying,
    /// The revision declares no service.
    None,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Running => "running",
            Health::Stopped => "stopped",
            Health::Deploying => "deploying",
            Health::None => "none",
        }
    }
}

/// One application on one host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppRecord {
    /// The active revision's id, if a deployment has succeeded.
    pub revision: Option<String>,
    pub health: Health,
    /// The revisions whose releases this host keeps (and could serve to peers).
    pub held: BTreeSet<String>,
}

/// What one host says about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub name: String,
    pub addr: SocketAddr,
    /// Raised by the owner on every change; the newest version wins.
    pub version: u64,
    /// The host left the mesh on purpose (its agent was stopped).
    pub left: bool,
    pub tags: BTreeMap<String, String>,
    pub apps: BTreeMap<String, AppRecord>,
}

/// What agents send each other about host state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GossipMsg {
    /// Records new to the receiver. `relay`: pass on what is new to you.
    Push {
        records: Vec<HostRecord>,
        relay: bool,
    },
    /// Anti-entropy: the version of every record the sender has.
    Digest(Vec<(String, u64)>),
    /// Anti-entropy: the records the sender wants, newer on the receiver's side.
    Want(Vec<String>),
}

/// A message for the network loop to deliver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub to: SocketAddr,
    pub msg: GossipMsg,
}

/// Up to this many peers, the owner of a record pushes it to all of them.
pub const DIRECT_LIMIT: usize = 128;

/// How many peers a push goes to among `peers`: all of them in a small fleet, otherwise
/// enough that a relayed rumor misses a host with a probability of about e^-(ln n + 3).
pub fn fanout(peers: usize) -> usize {
    if peers <= DIRECT_LIMIT {
        peers
    } else {
        ((peers as f64).ln().ceil() as usize + 3).min(peers)
    }
}

/// The version an agent's record starts a life at: above the last one it remembers
/// publishing and, should it have lost that memory, above what a previous life could
/// have reached (milliseconds since the epoch, one per change at most).
pub fn first_version(remembered: u64, now_ms: u64) -> u64 {
    (remembered + 1).max(now_ms)
}

/// One agent's table of host records, its own included.
pub struct HostTable {
    me: String,
    records: BTreeMap<String, HostRecord>,
    rng: StdRng,
}

impl HostTable {
    /// `own` is this agent's record (its version above any it published before: see
    /// [`first_version`]);
    /// `seed` makes the random choices reproducible.
    pub fn new(own: HostRecord, seed: u64) -> Self {
        let me = own.name.clone();
        let mut records = BTreeMap::new();
        records.insert(me.clone(), own);
        HostTable {
            me,
            records,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    pub fn own(&self) -> &HostRecord {
        &self.records[&self.me]
    }

    pub fn get(&self, name: &str) -> Option<&HostRecord> {
        self.records.get(name)
    }

    pub fn records(&self) -> impl Iterator<Item = &HostRecord> {
        self.records.values()
    }

    /// Applies a change to this agent's own record. If it changed anything, the record is
    /// given a new version and pushed to `peers`.
    pub fn publish(
        &mut self,
        change: impl FnOnce(&mut HostRecord),
        peers: &[SocketAddr],
    ) -> Vec<Outgoing> {
        let own = self.records.get_mut(&self.me).expect("own record");
        let before = own.clone();
        change(own);
        own.name = before.name.clone();
        own.version = before.version;
        if *own == before {
            return Vec::new();
        }
        own.version += 1;
        let record = own.clone();
        self.push(vec![record], peers, None)
    }

    /// Handles a message from the agent at `from`. Returns what to send, and the records
    /// that were new here (for the caller to report).
    pub fn handle(
        &mut self,
        from: SocketAddr,
        msg: GossipMsg,
        peers: &[SocketAddr],
    ) -> (Vec<Outgoing>, Vec<HostRecord>) {
        match msg {
            GossipMsg::Push { records, relay } => {
                let (learned, mut out) = self.merge(records, peers);
                if relay && !learned.is_empty() {
                    out.extend(self.push(learned.clone(), peers, Some(from)));
                }
                (out, learned)
            }
            GossipMsg::Digest(theirs) => {
                let theirs: BTreeMap<String, u64> = theirs.into_iter().collect();
                let mut out = Vec::new();
                // Our own record from a previous life, newer than the one we hold.
                if theirs
                    .get(&self.me)
                    .is_some_and(|&v| v > self.own().version)
                {
                    out.extend(self.outlive(theirs[&self.me], peers));
                }
                let newer_here: Vec<HostRecord> = self
                    .records
                    .values()
                    .filter(|r| theirs.get(&r.name).is_none_or(|&v| v < r.version))
                    .cloned()
                    .collect();
                if !newer_here.is_empty() {
                    out.push(Outgoing {
                        to: from,
                        msg: GossipMsg::Push {
                            records: newer_here,
                            relay: false,
                        },
                    });
                }
                let wanted: Vec<String> = theirs
                    .iter()
                    .filter(|(name, v)| {
                        **name != self.me && self.records.get(*name).is_none_or(|r| r.version < **v)
                    })
                    .map(|(name, _)| name.clone())
                    .collect();
                if !wanted.is_empty() {
                    out.push(Outgoing {
                        to: from,
                        msg: GossipMsg::Want(wanted),
                    });
                }
                (out, Vec::new())
            }
            GossipMsg::Want(names) => {
                let records: Vec<HostRecord> = names
                    .iter()
                    .filter_map(|n| self.records.get(n).cloned())
                    .collect();
                let out = if records.is_empty() {
                    Vec::new()
                } else {
                    vec![Outgoing {
                        to: from,
                        msg: GossipMsg::Push {
                            records,
                            relay: false,
                        },
                    }]
                };
                (out, Vec::new())
            }
        }
    }

    /// One anti-entropy round: a digest to one random peer.
    pub fn anti_entropy(&mut self, peers: &[SocketAddr]) -> Vec<Outgoing> {
        match peers.choose(&mut self.rng) {
            Some(&to) => vec![self.digest_to(to)],
            None => Vec::new(),
        }
    }

    /// A digest for a member that just came up, so both sides trade what they miss.
    pub fn digest_to(&self, to: SocketAddr) -> Outgoing {
        Outgoing {
            to,
            msg: GossipMsg::Digest(
                self.records
                    .values()
                    .map(|r| (r.name.clone(), r.version))
                    .collect(),
            ),
        }
    }

    /// Keeps the records newer than ours. Returns them, and what to send if one of them is
    /// our own from a previous life.
    fn merge(
        &mut self,
        records: Vec<HostRecord>,
        peers: &[SocketAddr],
    ) -> (Vec<HostRecord>, Vec<Outgoing>) {
        let mut learned = Vec::new();
        let mut out = Vec::new();
        for record in records {
            if record.name == self.me {
                if record.version > self.own().version {
                    out.extend(self.outlive(record.version, peers));
                }
                continue;
            }
            let newer = self
                .records
                .get(&record.name)
                .is_none_or(|r| r.version < record.version);
            if newer {
                self.records.insert(record.name.clone(), record.clone());
                learned.push(record);
            }
        }
        (learned, out)
    }

    /// Peers hold a version of our record at least as new as ours (from before a restart
    /// that lost it): publish ours above it.
    fn outlive(&mut self, theirs: u64, peers: &[SocketAddr]) -> Vec<Outgoing> {
        let own = self.records.get_mut(&self.me).expect("own record");
        own.version = theirs + 1;
        let record = own.clone();
        self.push(vec![record], peers, None)
    }

    fn push(
        &mut self,
        records: Vec<HostRecord>,
        peers: &[SocketAddr],
        except: Option<SocketAddr>,
    ) -> Vec<Outgoing> {
        let candidates: Vec<SocketAddr> = peers
            .iter()
            .copied()
            .filter(|p| Some(*p) != except)
            .collect();
        let n = fanout(peers.len()).min(candidates.len());
        let relay = n < peers.len();
        candidates
            .sample(&mut self.rng, n)
            .map(|&to| Outgoing {
                to,
                msg: GossipMsg::Push {
                    records: records.clone(),
                    relay,
                },
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, i], 7400))
    }

    fn record(name: &str, i: u8, version: u64) -> HostRecord {
        HostRecord {
            name: name.into(),
            addr: addr(i),
            version,
            left: false,
            tags: BTreeMap::new(),
            apps: BTreeMap::new(),
        }
    }

    #[test]
    fn a_change_is_versioned_and_pushed_to_every_peer_of_a_small_fleet() {
        let mut a = HostTable::new(record("a", 1, 1), 7);
        let peers = [addr(2), addr(3)];
        assert!(
            a.publish(|_| {}, &peers).is_empty(),
            "no change, no version"
        );
        let out = a.publish(
            |r| {
                r.tags.insert("role".into(), "inference".into());
            },
            &peers,
        );
        assert_eq!(a.own().version, 2);
        let mut to: Vec<_> = out.iter().map(|o| o.to).collect();
        to.sort();
        assert_eq!(to, peers);
        assert!(
            matches!(&out[0].msg, GossipMsg::Push { relay: false, records } if records[0].version == 2)
        );
    }

    #[test]
    fn the_newest_version_wins_and_old_ones_are_ignored() {
        let mut b = HostTable::new(record("b", 2, 1), 7);
        let mut v3 = record("a", 1, 3);
        v3.left = true;
        let (_, learned) = b.handle(
            addr(1),
            GossipMsg::Push {
                records: vec![v3.clone()],
                relay: false,
            },
            &[addr(1)],
        );
        assert_eq!(learned, vec![v3.clone()]);
        let (out, learned) = b.handle(
            addr(1),
            GossipMsg::Push {
                records: vec![record("a", 1, 2)],
                relay: true,
            },
            &[addr(1), addr(3)],
        );
        assert!(learned.is_empty() && out.is_empty());
        assert_eq!(b.get("a"), Some(&v3));
    }

    #[test]
    fn anti_entropy_trades_what_each_side_misses() {
        let mut a = HostTable::new(record("a", 1, 1), 1);
        let mut b = HostTable::new(record("b", 2, 4), 2);
        b.handle(
            addr(3),
            GossipMsg::Push {
                records: vec![record("c", 3, 9)],
                relay: false,
            },
            &[],
        );
        // a → b: digest; b answers with its newer records and asks for a's.
        let digest = a.anti_entropy(&[addr(2)]).remove(0);
        let (replies, _) = b.handle(addr(1), digest.msg, &[addr(1)]);
        assert_eq!(replies.len(), 2, "{replies:?}");
        for reply in replies {
            assert_eq!(reply.to, addr(1));
            let (back, _) = a.handle(addr(2), reply.msg, &[addr(2)]);
            for m in back {
                b.handle(addr(1), m.msg, &[addr(1)]);
            }
        }
        assert_eq!(a.get("b").map(|r| r.version), Some(4));
        assert_eq!(a.get("c").map(|r| r.version), Some(9));
        assert_eq!(b.get("a").map(|r| r.version), Some(1));
    }

    #[test]
    fn a_restarted_agent_publishes_above_its_previous_life() {
        // It lost its state and starts again at version 1; peers hold version 5.
        let mut a = HostTable::new(record("a", 1, 1), 1);
        let (out, _) = a.handle(
            addr(2),
            GossipMsg::Digest(vec![("a".into(), 5), ("b".into(), 1)]),
            &[addr(2)],
        );
        assert_eq!(a.own().version, 6);
        assert!(out.iter().any(|o| matches!(&o.msg,
            GossipMsg::Push { records, .. } if records.iter().any(|r| r.name == "a" && r.version == 6))));
    }

    #[test]
    fn its_own_current_record_coming_back_changes_nothing() {
        let mut a = HostTable::new(record("a", 1, 4), 1);
        let own = a.own().clone();
        let (out, _) = a.handle(
            addr(2),
            GossipMsg::Digest(vec![("a".into(), 4)]),
            &[addr(2)],
        );
        assert!(out.is_empty(), "{out:?}");
        let push = GossipMsg::Push {
            records: vec![own],
            relay: true,
        };
        let (out, learned) = a.handle(addr(2), push, &[addr(2)]);
        assert!(out.is_empty() && learned.is_empty());
        assert_eq!(a.own().version, 4);
        assert_eq!(first_version(4, 0), 5);
        assert_eq!(first_version(0, 1_700_000_000_000), 1_700_000_000_000);
    }

    #[test]
    fn large_fleets_relay_rumors_to_a_few_peers_each() {
        let peers: Vec<SocketAddr> = (0..1000u32)
            .map(|i| SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 7400)))
            .collect();
        assert_eq!(fanout(50), 50);
        assert_eq!(fanout(1000), 10);
        let mut a = HostTable::new(record("a", 1, 1), 3);
        let out = a.publish(|r| r.left = true, &peers);
        assert_eq!(out.len(), 10);
        assert!(
            out.iter()
                .all(|o| matches!(o.msg, GossipMsg::Push { relay: true, .. }))
        );
        // A relay passes on what is new to it, never back to the sender.
        let mut b = HostTable::new(record("b", 2, 1), 4);
        let (relayed, learned) = b.handle(peers[0], out[0].msg.clone(), &peers);
        assert_eq!(learned.len(), 1);
        assert_eq!(relayed.len(), 10);
        assert!(relayed.iter().all(|o| o.to != peers[0]));
        // The same rumor again is not relayed.
        let (again, _) = b.handle(peers[1], out[0].msg.clone(), &peers);
        assert!(again.is_empty());
    }
}
