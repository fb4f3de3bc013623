//! Host-state gossip at scale, deterministically, with simulated time and network: 1,000
//! agents' host tables. A change must reach every agent, and one cut off while it spread must
//! catch up by anti-entropy. Same seeds, same run, every time.

use std::collections::HashMap;
use std::net::SocketAddr;

#[path = "sim/clock.rs"]
mod clock;
use clock::Clock;

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
