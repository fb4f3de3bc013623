//! The mesh cores at scale, deterministically, with simulated time and network.
//! - Membership: 500 agents' membership cores (foca's SWIM) exchange packets. Every agent
//!   must come to see every other, and a killed agent must be declared down by every
//!   survivor, within bounds of simulated time.
//! - Host state: 1,000 agents' host tables. A change must reach every agent, and one cut
//!   off while it spread must catch up by anti-entropy.
//!
//! Same seeds, same run, every time.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::SocketAddr;

use shoal_agent::mesh::membership::{self, MemberId, Membership, Output};

enum Event {
    /// A packet, and the name of its sender (what its certificate would say).
    Data(String, Vec<u8>),
    Timer(foca::Timer<MemberId>),
}

/// Simulated time, shared by both simulations: events come out in order of time, then of
/// scheduling; a message takes 1 to 20 ms, drawn from a seeded generator.
struct Clock<E> {
    now_ms: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: HashMap<u64, E>,
    lcg: u64,
}

impl<E> Clock<E> {
    fn new(seed: u64) -> Self {
        Clock {
            now_ms: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            lcg: seed,
        }
    }

    fn at(&mut self, at_ms: u64, event: E) {
        self.seq += 1;
        self.queue.push(Reverse((at_ms, self.seq)));
        self.events.insert(self.seq, event);
    }

    /// A message's delivery, after 1 to 20 ms of latency.
    fn deliver(&mut self, event: E) {
        self.lcg = self
            .lcg
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let at = self.now_ms + 1 + (self.lcg >> 33) % 20;
        self.at(at, event);
    }

    /// The next event due by `limit_ms`, with the clock moved to its time.
    fn next(&mut self, limit_ms: u64) -> Option<E> {
        let &Reverse((at, seq)) = self.queue.peek()?;
        if at > limit_ms {
            return None;
        }
        self.queue.pop();
        self.now_ms = at;
        self.events.remove(&seq)
    }
}

struct Sim {
    clock: Clock<(usize, Event)>,
    nodes: Vec<Membership>,
    by_addr: HashMap<SocketAddr, usize>,
    dead: HashSet<usize>,
    /// Per observer, the names it has been told are down.
    down: Vec<HashSet<String>>,
    packets: u64,
}

impl Sim {
    fn new(n: usize) -> Sim {
        let config = membership::config(n as u32);
        let mut by_addr = HashMap::new();
        let nodes = (0..n)
            .map(|i| {
                // Labels only: the simulation sends nothing anywhere.
                let addr: SocketAddr = format!("127.1.{}.{}:7400", i / 250, i % 250 + 1)
                    .parse()
                    .unwrap();
                by_addr.insert(addr, i);
                Membership::new(
                    MemberId {
                        name: format!("sim-{i}"),
                        addr,
                        bump: 0,
                    },
                    config.clone(),
                    i as u64 + 1,
                )
            })
            .collect();
        Sim {
            clock: Clock::new(0x5eed),
            nodes,
            by_addr,
            dead: HashSet::new(),
            down: vec![HashSet::new(); n],
            packets: 0,
        }
    }

    fn apply(&mut self, node: usize, outputs: Vec<Output>) {
        for o in outputs {
            match o {
                Output::Send { to, data } => {
                    if let Some(&j) = self.by_addr.get(&to.addr) {
                        let from = self.nodes[node].id().name.clone();
                        self.clock.deliver((j, Event::Data(from, data)));
                    }
                }
                Output::Schedule { timer, after } => {
                    let at = self.clock.now_ms + after.as_millis() as u64;
                    self.clock.at(at, (node, Event::Timer(timer)));
                }
                Output::Down(id) => {
                    self.down[node].insert(id.name);
                }
                Output::Up(id) => {
                    self.down[node].remove(&id.name);
                }
                Output::Rejoined(_) | Output::Idle => {}
            }
        }
    }

    /// Runs until `done` holds (checked every 100 ms of simulated time) or `limit_ms`.
    fn run_until(&mut self, limit_ms: u64, done: impl Fn(&Sim) -> bool) -> Option<u64> {
        let mut next_check = self.clock.now_ms;
        while let Some((node, ev)) = self.clock.next(limit_ms) {
            if self.dead.contains(&node) {
                continue;
            }
            let out = match ev {
                Event::Data(from, data) => {
                    self.packets += 1;
                    self.nodes[node]
                        .handle_data(&from, &data)
                        .expect("simulated packets are well-formed")
                }
                Event::Timer(t) => self.nodes[node].handle_timer(t),
            };
            self.apply(node, out);
            if self.clock.now_ms >= next_check {
                next_check = self.clock.now_ms + 100;
                if done(self) {
                    return Some(self.clock.now_ms);
                }
            }
        }
        done(self).then_some(self.clock.now_ms)
    }

    fn living(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nodes.len()).filter(|i| !self.dead.contains(i))
    }
}

#[test]
fn five_hundred_agents_converge_and_detect_a_failure() {
    const N: usize = 500;
    let mut sim = Sim::new(N);
    let seed = sim.nodes[0].id().addr;
    for i in 1..N {
        let out = sim.nodes[i].join(seed);
        sim.clock.now_ms = i as u64 * 2; // joins spread over a second
        sim.apply(i, out);
    }
    sim.clock.now_ms = 0;

    let converged = sim.run_until(60_000, |s| {
        s.living().all(|i| s.nodes[i].alive().count() == N - 1)
    });
    let Some(converged) = converged else {
        let short: Vec<(usize, usize)> = sim
            .living()
            .map(|i| (i, sim.nodes[i].alive().count()))
            .filter(|(_, n)| *n < N - 1)
            .collect();
        panic!(
            "not converged after {} ms simulated: (agent, members seen) short of {}: {short:?}",
            sim.clock.now_ms,
            N - 1
        );
    };
    eprintln!(
        "{N} agents converged after {converged} ms simulated ({} packets)",
        sim.packets
    );

    let victim = 250;
    sim.dead.insert(victim);
    let killed_at = sim.clock.now_ms;
    let name = format!("sim-{victim}");
    let detected = sim
        .run_until(killed_at + 60_000, |s| {
            s.living()
                .all(|i| s.down[i].contains(&name) && s.nodes[i].alive().all(|m| m.name != name))
        })
        .expect("every survivor declares the killed agent down within 60 s");
    let took = detected - killed_at;
    eprintln!(
        "the killed agent was declared down by all {} survivors after {took} ms simulated",
        N - 1
    );
    // Deterministic (5.1 s and 2.4 s with the current config): the bounds catch regressions.
    assert!(converged <= 15_000, "convergence took {converged} ms");
    assert!(took <= 5_000, "detection took {took} ms");
}

/// Host-state gossip at scale, deterministically: 1,000 agents' host tables (membership
/// assumed converged), 1 to 20 ms of latency per message. A change at one agent must reach
/// all the others, by relayed rumor with anti-entropy behind it; an agent cut off while
/// the news spread must catch up by anti-entropy once it is back.
#[test]
fn a_state_change_reaches_a_thousand_agents() {
    use shoal_agent::mesh::hoststate::{GossipMsg, HostRecord, HostTable, Outgoing};
    use std::collections::BTreeMap;

    const N: usize = 1000;
    const AE_MS: u64 = 1000;
    let addr = |i: usize| -> SocketAddr {
        format!("127.2.{}.{}:7400", i / 250, i % 250 + 1)
            .parse()
            .unwrap()
    };
    let addrs: Vec<SocketAddr> = (0..N).map(addr).collect();
    let index: HashMap<SocketAddr, usize> =
        addrs.iter().enumerate().map(|(i, a)| (*a, i)).collect();
    let mut tables: Vec<HostTable> = (0..N)
        .map(|i| {
            HostTable::new(
                HostRecord {
                    name: format!("sim-{i}"),
                    addr: addrs[i],
                    version: 1,
                    left: false,
                    tags: BTreeMap::new(),
                    apps: BTreeMap::new(),
                },
                i as u64 + 7,
            )
        })
        .collect();
    let peers_of = |i: usize| -> Vec<SocketAddr> {
        addrs.iter().copied().filter(|a| *a != addrs[i]).collect()
    };
    // Events: a message's delivery or an anti-entropy tick.
    enum Ev {
        Msg {
            to: usize,
            from: SocketAddr,
            msg: GossipMsg,
        },
        Tick(usize),
    }
    let mut clock: Clock<Ev> = Clock::new(0xfeed);
    let send = |clock: &mut Clock<Ev>, from: usize, out: Vec<Outgoing>| {
        for o in out {
            clock.deliver(Ev::Msg {
                to: index[&o.to],
                from: addrs[from],
                msg: o.msg,
            });
        }
    };
    for i in 0..N {
        clock.at((i as u64 * 7919) % AE_MS, Ev::Tick(i));
    }
    let cut_off = N - 1;
    let mut cut_until = u64::MAX;
    let mut messages = 0u64;

    let first = tables[0].publish(
        |r| {
            r.tags.insert("model".into(), "v2".into());
        },
        &peers_of(0),
    );
    send(&mut clock, 0, first);
    let knows = |t: &HostTable| t.get("sim-0").is_some_and(|r| r.version == 2);
    let mut reached_at = None;
    while let Some(ev) = clock.next(u64::MAX) {
        let now = clock.now_ms;
        match ev {
            Ev::Msg { to, from, msg } => {
                if to == cut_off && now < cut_until {
                    continue; // lost while cut off
                }
                messages += 1;
                let (out, _) = tables[to].handle(from, msg, &peers_of(to));
                send(&mut clock, to, out);
            }
            Ev::Tick(i) => {
                let out = if i == cut_off && now < cut_until {
                    Vec::new()
                } else {
                    tables[i].anti_entropy(&peers_of(i))
                };
                clock.at(now + AE_MS, Ev::Tick(i));
                send(&mut clock, i, out);
            }
        }
        if reached_at.is_none() && (1..N - 1).all(|i| knows(&tables[i])) {
            reached_at = Some(now);
            assert!(!knows(&tables[cut_off]), "the cut-off agent heard nothing");
            cut_until = now;
        }
        if reached_at.is_some() && knows(&tables[cut_off]) {
            break;
        }
        assert!(now < 60_000, "not spread after 60 s simulated");
    }
    let reached = reached_at.unwrap();
    let caught_up = clock.now_ms - cut_until;
    eprintln!(
        "a change reached {} agents after {reached} ms simulated ({messages} messages); \
         the cut-off agent caught up {caught_up} ms after it was back",
        N - 2
    );
    assert!(reached <= 1_000, "spreading took {reached} ms");
    assert!(caught_up <= 5_000, "catching up took {caught_up} ms");
}
