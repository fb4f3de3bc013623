//! Host-state gossip at scale, deterministically, with simulated time and network, every
//! message encoded with postcard as on the wire, checked against the frame limit and decoded
//! at its receiver. Size from `SHOAL_SIM_HOSTS` (default 1,000). Records are signed with
//! `SimAuthority` (a keyed hash per host name) so thousands of agents stay fast while
//! forgeries are still refused. Same seeds, same run, every time.
//!
//! Scenarios: a change reaching every agent, with one cut off while it spread catching up;
//! a new agent with an empty table catching up on every record; a partition into two halves
//! healing; a forged record refused everywhere. Where every live agent must hold every
//! record (new agent, partition), `LIVE` agents hold the records of all N hosts: N agents
//! holding N records each would be N² records in one process.

use std::collections::HashMap;
use std::net::SocketAddr;

use shoal_agent::mesh::frame::MAX_FRAME;
use shoal_agent::mesh::hoststate::{
    Authority, GossipMsg, HostRecord, HostTable, MAX_MESSAGE, Outgoing, SignedRecord, SimAuthority,
};

#[path = "sim/clock.rs"]
mod clock;
use clock::Clock;

const SECRET: &[u8] = b"simulated fleet";
/// The simulation's epoch, as wall-clock ms: versions are checked against it.
const EPOCH_MS: u64 = 1_700_000_000_000;
const AE_MS: u64 = 1000;
/// How many agents hold all N records where every agent must.
const LIVE: usize = 300;

fn hosts() -> usize {
    std::env::var("SHOAL_SIM_HOSTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000)
}

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 7400))
}

fn record(name: &str, i: usize, version: u64) -> HostRecord {
    HostRecord {
        name: name.into(),
        addr: addr(i),
        version,
        left: false,
        tags: [("rack".to_string(), format!("r{}", i % 40))].into(),
        apps: Default::default(),
        log: None,
    }
}

fn signed(r: HostRecord) -> SignedRecord {
    SimAuthority::new(&r.name, SECRET).sign(&r).unwrap()
}

enum Ev {
    Msg {
        to: usize,
        from: usize,
        bytes: Vec<u8>,
    },
    Tick(usize),
}

/// Agents `0..tables.len()` at `addr(i)`, exchanging encoded messages.
struct Net {
    tables: Vec<HostTable>,
    addrs: Vec<SocketAddr>,
    index: HashMap<SocketAddr, usize>,
    clock: Clock<Ev>,
    bytes: u64,
    messages: u64,
    largest: usize,
}

impl Net {
    fn new(tables: Vec<HostTable>, seed: u64) -> Net {
        let addrs: Vec<SocketAddr> = (0..tables.len()).map(addr).collect();
        let index = addrs.iter().enumerate().map(|(i, a)| (*a, i)).collect();
        let mut clock = Clock::new(seed);
        for i in 0..tables.len() {
            clock.at((i as u64 * 7919) % AE_MS, Ev::Tick(i));
        }
        Net {
            tables,
            addrs,
            index,
            clock,
            bytes: 0,
            messages: 0,
            largest: 0,
        }
    }

    fn now(&self) -> u64 {
        EPOCH_MS + self.clock.now_ms
    }

    /// Encodes `out` as on the wire and queues it.
    fn send(&mut self, from: usize, out: Vec<Outgoing>) {
        for o in out {
            let bytes = postcard::to_stdvec(&o.msg).unwrap();
            assert!(bytes.len() < MAX_MESSAGE, "{} bytes", bytes.len());
            assert!(bytes.len() < MAX_FRAME as usize);
            self.largest = self.largest.max(bytes.len());
            self.bytes += bytes.len() as u64;
            self.messages += 1;
            let to = self.index[&o.to];
            self.clock.deliver(Ev::Msg { to, from, bytes });
        }
    }

    /// Runs until `done` holds (checked every 10 ms simulated) or `limit_ms` passes;
    /// `link(from, to, now_ms)` says whether a message gets through, `up(i, now_ms)` whether
    /// an agent runs its anti-entropy. Returns when `done` first held.
    fn run(
        &mut self,
        limit_ms: u64,
        link: impl Fn(usize, usize, u64) -> bool,
        up: impl Fn(usize, u64) -> bool,
        mut done: impl FnMut(&Net) -> bool,
    ) -> Option<u64> {
        let mut checked = 0;
        while let Some(ev) = self.clock.next(limit_ms) {
            let now = self.clock.now_ms;
            match ev {
                Ev::Msg { to, from, bytes } => {
                    if link(from, to, now) {
                        let msg: GossipMsg = postcard::from_bytes(&bytes).unwrap();
                        let t = self.now();
                        let (out, _) =
                            self.tables[to].handle(self.addrs[from], msg, &self.addrs, t);
                        self.send(to, out);
                    }
                }
                Ev::Tick(i) => {
                    self.clock.at(now + AE_MS, Ev::Tick(i));
                    if up(i, now) {
                        let out = self.tables[i].anti_entropy(&self.addrs);
                        self.send(i, out);
                    }
                }
            }
            if now >= checked + 10 {
                checked = now;
                if done(self) {
                    return Some(now);
                }
            }
        }
        None
    }

    fn report(&self, what: &str, agents: usize) {
        let secs = self.clock.now_ms.max(1) as f64 / 1000.0;
        eprintln!(
            "{what}: {} messages, {:.0} bytes per agent per second over {secs:.1} s, largest \
             message {} bytes",
            self.messages,
            self.bytes as f64 / agents as f64 / secs,
            self.largest
        );
    }
}

fn agent(i: usize) -> HostTable {
    let name = format!("sim-{i}");
    HostTable::new(
        record(&name, i, 1),
        Box::new(SimAuthority::new(&name, SECRET)),
        i as u64 + 7,
    )
    .unwrap()
}

/// `n` hosts' records (signed by each) given to `table`.
fn fill(table: &mut HostTable, records: &[SignedRecord]) {
    for chunk in records.chunks(1000) {
        let (_, learned) = table.handle(addr(0), GossipMsg::Push(chunk.to_vec()), &[], EPOCH_MS);
        assert!(learned.len() <= chunk.len());
    }
}

/// A change at one agent reaches all the others, by direct push or relayed rumor with
/// anti-entropy behind it; an agent cut off while the news spread catches up by
/// anti-entropy once it is back.
#[test]
fn a_state_change_reaches_every_agent() {
    let n = hosts();
    let mut net = Net::new((0..n).map(agent).collect(), 0xfeed);
    let cut_off = n - 1;
    let cut_until = std::cell::Cell::new(u64::MAX);
    let first = net.tables[0]
        .publish(
            |r| drop(r.tags.insert("model".into(), "v2".into())),
            &net.addrs.clone(),
            EPOCH_MS,
        )
        .unwrap();
    net.send(0, first);
    let knows = |t: &HostTable| t.get("sim-0").is_some_and(|r| r.version == 2);
    let link = |_: usize, to: usize, now: u64| to != cut_off || now >= cut_until.get();
    let up = |i: usize, now: u64| i != cut_off || now >= cut_until.get();
    let reached = net
        .run(60_000, link, up, |net| {
            (0..n - 1).all(|i| knows(&net.tables[i]))
        })
        .expect("the change reached everyone within 60 s simulated");
    assert!(
        !knows(&net.tables[cut_off]),
        "the cut-off agent heard nothing"
    );
    cut_until.set(reached);
    let caught = net
        .run(reached + 60_000, link, up, |net| {
            knows(&net.tables[cut_off])
        })
        .expect("the cut-off agent caught up");
    net.report(&format!("change at {n} agents"), n);
    eprintln!(
        "a change reached {} agents after {reached} ms simulated; the cut-off agent caught up \
         {} ms after it was back",
        n - 2,
        caught - reached
    );
    assert!(reached <= 2_000, "spreading took {reached} ms");
    assert!(
        caught - reached <= 5_000,
        "catching up took {} ms",
        caught - reached
    );
}

/// A new agent, its table empty, catches up on the records of all N hosts held by the
/// `LIVE` agents it gossips with.
#[test]
fn a_new_agent_catches_up_on_every_record() {
    let n = hosts();
    let live = LIVE.min(n);
    let all: Vec<SignedRecord> = (0..n)
        .map(|i| signed(record(&format!("sim-{i}"), i, 1)))
        .collect();
    let mut tables: Vec<HostTable> = (0..live)
        .map(|i| {
            let mut t = agent(i);
            fill(&mut t, &all);
            assert_eq!(t.len(), n);
            t
        })
        .collect();
    let newcomer = live;
    tables.push(
        HostTable::new(
            record("new", newcomer, EPOCH_MS),
            Box::new(SimAuthority::new("new", SECRET)),
            99,
        )
        .unwrap(),
    );
    let mut net = Net::new(tables, 0xbeef);
    // It came up: it and its seed trade digests, as the loop does on a member's Up.
    let hello = net.tables[newcomer].digest_to(addr(0));
    net.send(newcomer, vec![hello]);
    let caught = net
        .run(
            120_000,
            |_, _, _| true,
            |_, _| true,
            |net| net.tables[newcomer].len() == n + 1,
        )
        .expect("the new agent caught up within 120 s simulated");
    let known = net
        .run(
            caught + 60_000,
            |_, _, _| true,
            |_, _| true,
            |net| (0..live).all(|i| net.tables[i].get("new").is_some()),
        )
        .expect("everyone learned of the new agent");
    net.report(
        &format!("new agent, {n} records, {live} live agents"),
        live + 1,
    );
    eprintln!(
        "a new agent caught up on {n} records in {caught} ms simulated; all {live} live agents \
         knew it after {known} ms"
    );
    assert!(caught <= 30_000, "catching up took {caught} ms");
}

/// Two halves of the fleet, each holding the records of its own half and a change made
/// while cut apart, heal: every agent ends with every record.
#[test]
fn a_partition_heals() {
    let n = hosts();
    let live = LIVE.min(n);
    let half_of = |host: usize| host * 2 / n.max(1);
    let side = |agent: usize| agent * 2 / live;
    let records: Vec<SignedRecord> = (0..n)
        .map(|i| signed(record(&format!("sim-{i}"), i, 1)))
        .collect();
    let tables: Vec<HostTable> = (0..live)
        .map(|i| {
            let mut t = agent(i);
            let mine: Vec<SignedRecord> = records
                .iter()
                .filter(|r| {
                    let host: usize = r.record.name[4..].parse().unwrap();
                    half_of(host) == side(i)
                })
                .cloned()
                .collect();
            fill(&mut t, &mine);
            t
        })
        .collect();
    let mut net = Net::new(tables, 0xcafe);
    let (a, b) = (0, live - 1);
    assert_ne!(side(a), side(b));
    for i in [a, b] {
        let out = net.tables[i]
            .publish(|r| r.left = true, &net.addrs.clone(), EPOCH_MS)
            .unwrap();
        net.send(i, out);
    }
    // Cut apart for 5 s.
    let healed_at = 5_000;
    let link = |from: usize, to: usize, now: u64| now >= healed_at || side(from) == side(to);
    net.run(healed_at, link, |_, _| true, |_| false);
    let left = |t: &HostTable, i: usize| t.get(&format!("sim-{i}")).is_some_and(|r| r.left);
    for i in 0..live {
        assert_eq!(
            left(&net.tables[i], b),
            side(i) == side(b),
            "agent {i} before healing"
        );
    }
    let healed = net
        .run(
            healed_at + 120_000,
            link,
            |_, _| true,
            |net| {
                net.tables
                    .iter()
                    .all(|t| t.len() >= n && left(t, a) && left(t, b))
            },
        )
        .expect("healed within 120 s simulated");
    net.report(&format!("partition of {live} agents, {n} records"), live);
    eprintln!(
        "two halves ({n} records, {live} live agents) healed {} ms after the cut ended",
        healed - healed_at
    );
    assert!(
        healed - healed_at <= 30_000,
        "healing took {} ms",
        healed - healed_at
    );
}

/// A member forges another host's record (a newer version saying it left, at its own
/// address) and pushes it to many peers: nobody adopts it, and the genuine record stays.
#[test]
fn a_forged_record_is_refused_everywhere() {
    let n = hosts().min(2000);
    let mut net = Net::new((0..n).map(agent).collect(), 0xdead);
    let mut forged = record("sim-0", 1, 1000);
    forged.left = true;
    // Signed by the wrong owner: mallory's key, or another fleet's.
    let mut by_mallory = SimAuthority::new("sim-1", SECRET)
        .sign(&record("sim-1", 1, 1000))
        .unwrap();
    by_mallory.record = forged.clone();
    let other_fleet = SimAuthority::new("sim-0", b"another fleet")
        .sign(&forged)
        .unwrap();
    let out: Vec<Outgoing> = net
        .addrs
        .iter()
        .skip(2)
        .flat_map(|&to| {
            [by_mallory.clone(), other_fleet.clone()].map(|r| Outgoing {
                to,
                msg: GossipMsg::Push(vec![r]),
            })
        })
        .collect();
    net.send(1, out);
    net.run(10_000, |_, _, _| true, |_, _| true, |_| false);
    let refused: u64 = net.tables.iter().map(|t| t.stats().refused_forged).sum();
    assert!(refused >= 2 * (n as u64 - 2), "{refused}");
    for (i, t) in net.tables.iter().enumerate().skip(1) {
        let r = t.get("sim-0");
        assert!(
            r.is_none_or(|r| !r.left && r.version == 1),
            "agent {i}: {r:?}"
        );
    }
    assert_eq!(net.tables[0].own().version, 1, "the victim did no work");
    net.report(&format!("forgery among {n} agents"), n);
}
