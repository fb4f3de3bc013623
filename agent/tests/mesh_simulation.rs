//! Membership at scale, deterministically: 500 agents' membership cores (foca's SWIM)
//! exchanging packets over a simulated network with simulated time. Every agent must come
//! to see every other, and a killed agent must be declared down by every survivor, within
//! bounds of simulated time. Same seeds, same run, every time.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::SocketAddr;

use shoal_agent::mesh::membership::{self, MemberId, Membership, Output};

enum Event {
    Data(Vec<u8>),
    Timer(foca::Timer<MemberId>),
}

struct Sim {
    now_ms: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: HashMap<u64, (usize, Event)>,
    nodes: Vec<Membership>,
    by_addr: HashMap<SocketAddr, usize>,
    dead: HashSet<usize>,
    /// Per observer, the names it has been told are down.
    down: Vec<HashSet<String>>,
    lcg: u64,
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
            now_ms: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            nodes,
            by_addr,
            dead: HashSet::new(),
            down: vec![HashSet::new(); n],
            lcg: 0x5eed,
            packets: 0,
        }
    }

    fn push(&mut self, at_ms: u64, node: usize, ev: Event) {
        self.seq += 1;
        self.queue.push(Reverse((at_ms, self.seq)));
        self.events.insert(self.seq, (node, ev));
    }

    /// 1 to 20 ms of latency, deterministically.
    fn latency(&mut self) -> u64 {
        self.lcg = self
            .lcg
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        1 + (self.lcg >> 33) % 20
    }

    fn apply(&mut self, node: usize, outputs: Vec<Output>) {
        for o in outputs {
            match o {
                Output::Send { to, data } => {
                    if let Some(&j) = self.by_addr.get(&to.addr) {
                        let at = self.now_ms + self.latency();
                        self.push(at, j, Event::Data(data));
                    }
                }
                Output::Schedule { timer, after } => {
                    let at = self.now_ms + after.as_millis() as u64;
                    self.push(at, node, Event::Timer(timer));
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
        let mut next_check = self.now_ms;
        while let Some(Reverse((at, seq))) = self.queue.pop() {
            if at > limit_ms {
                self.queue.push(Reverse((at, seq)));
                break;
            }
            self.now_ms = at;
            let (node, ev) = self.events.remove(&seq).expect("queued event");
            if self.dead.contains(&node) {
                continue;
            }
            let out = match ev {
                Event::Data(data) => {
                    self.packets += 1;
                    self.nodes[node]
                        .handle_data(&data)
                        .expect("simulated packets are well-formed")
                }
                Event::Timer(t) => self.nodes[node].handle_timer(t),
            };
            self.apply(node, out);
            if self.now_ms >= next_check {
                next_check = self.now_ms + 100;
                if done(self) {
                    return Some(self.now_ms);
                }
            }
        }
        done(self).then_some(self.now_ms)
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
        sim.now_ms = i as u64 * 2; // joins spread over a second
        sim.apply(i, out);
    }
    sim.now_ms = 0;

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
            sim.now_ms,
            N - 1
        );
    };
    eprintln!(
        "{N} agents converged after {converged} ms simulated ({} packets)",
        sim.packets
    );

    let victim = 250;
    sim.dead.insert(victim);
    let killed_at = sim.now_ms;
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
    // Deterministic (6.3 s and 3.0 s when written): the bounds catch regressions.
    assert!(converged <= 15_000, "convergence took {converged} ms");
    assert!(took <= 5_000, "detection took {took} ms");
}
