//! The mesh with real `shoal agent` processes on 127.0.0.x: eight agents see each other
//! and what each runs, report a killed one dead and welcome it back alive after a restart,
//! report a stopped one as left; an agent from another CA never joins; garbage datagrams,
//! frames and requests leave every agent serving. In a network namespace of its own, a
//! fleet is cut in two by blackhole routes, each side reports the other dead, and after
//! the cut heals everyone is alive and up to date again.

#[path = "support/fleet.rs"]
mod fleet;

use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use fleet::{Agent, Ca, Netns, agents, deploy_tiny, hosts, hosts_in, state_of, wait_for};

const LONG: Duration = Duration::from_secs(30);
/// How long a death may take to be reported: the fleets here may still be in their start-up
/// grace (10 to 30 s), when a suspect has 10 s to refute, longer on a machine so loaded that
/// the agents run late (`membership::STARTUP_GRACE`, `core::Health`).
const DETECTION: Duration = Duration::from_secs(60);

/// Whether every running agent lists exactly `expected` (name → state).
fn all_agree(agents: &[Agent], operator: &std::path::Path, expected: &[(&str, &str)]) -> bool {
    agents
        .iter()
        .filter(|a| a.child.is_some())
        .all(|a| lists(a, operator, expected))
}

/// Whether `agent` lists exactly `expected` (name → state).
fn lists<N: AsRef<str>>(agent: &Agent, operator: &std::path::Path, expected: &[(N, &str)]) -> bool {
    hosts_in(agent.netns.as_deref(), agent.addr, operator).is_ok_and(|list| {
        list.len() == expected.len()
            && expected
                .iter()
                .all(|(name, state)| state_of(&list, name.as_ref()).as_deref() == Some(*state))
    })
}

#[test]
fn eight_agents_see_all_detect_a_kill_and_welcome_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new(tmp.path(), "fleet");
    let mut fleet = agents(tmp.path(), &ca, [127, 77, 1], 8);
    for a in fleet.iter_mut() {
        a.start();
    }
    let names: Vec<String> = fleet.iter().map(|a| a.name.clone()).collect();
    let everyone = |state: &'static str| -> Vec<(&str, &str)> {
        names.iter().map(|n| (n.as_str(), state)).collect()
    };

    let took = wait_for("all eight agents to see all eight alive", LONG, || {
        all_agree(&fleet, &ca.operator, &everyone("alive"))
    });
    eprintln!("eight agents converged {took:?} after starting");
    // Gossiped state: every agent knows every other's tags.
    let list = hosts(fleet[3].addr, &ca.operator).unwrap();
    for (h, a) in list.iter().zip(&fleet) {
        assert_eq!(h["name"], a.name.as_str());
        assert_eq!(h["addr"], a.addr.to_string());
        assert_eq!(h["tags"]["host"], a.name.as_str(), "{h}");
        assert_eq!(h["tags"]["role"], "inference");
        assert!(h["apps"].as_object().unwrap().is_empty());
    }
    let version_before = list[4]["version"].as_u64().unwrap();

    // What a host runs is gossiped: a deployment on agent-3 shows everywhere.
    let rev = deploy_tiny(&fleet[2], "tiny", "v1");
    wait_for("every agent to list agent-3's new revision", LONG, || {
        fleet.iter().all(|a| {
            hosts(a.addr, &ca.operator).is_ok_and(|l| {
                l[2]["apps"]["tiny"] == rev.as_str()
                    && l[2]["details"]["tiny"]["health"] == "none"
                    && l[2]["details"]["tiny"]["held"][0] == rev.as_str()
            })
        })
    });

    // kill -9 one: every other reports it dead.
    fleet[4].kill();
    let mut expected = everyone("alive");
    expected[4].1 = "dead";
    let took = wait_for("the seven others to report agent-5 dead", DETECTION, || {
        all_agree(&fleet, &ca.operator, &expected)
    });
    eprintln!("agent-5 reported dead by all seven {took:?} after kill -9");
    assert!(
        fleet[0]
            .log_text()
            .contains("member is dead member=agent-5"),
        "agent-1 logs the death"
    );

    // Restart it: alive again everywhere, itself included, and its record is newer.
    fleet[4].start();
    wait_for("agent-5 to be alive again for all eight", LONG, || {
        all_agree(&fleet, &ca.operator, &everyone("alive"))
    });
    let list = hosts(fleet[0].addr, &ca.operator).unwrap();
    assert!(list[4]["version"].as_u64().unwrap() > version_before);

    // SIGTERM another: it leaves gracefully, and the others say so.
    let status = fleet[7].terminate();
    assert!(status.success(), "SIGTERM ends the agent cleanly: {status}");
    assert!(fleet[7].log_text().contains("left the mesh"));
    let mut expected = everyone("alive");
    expected[7].1 = "left";
    wait_for("the others to report agent-8 left", LONG, || {
        all_agree(&fleet, &ca.operator, &expected)
    });
}

#[test]
fn a_foreign_agent_never_joins_and_garbage_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new(tmp.path(), "fleet");
    let mut fleet = agents(tmp.path(), &ca, [127, 77, 2], 3);
    for a in fleet.iter_mut() {
        a.start();
    }
    // An agent with a certificate from another CA, seeded with a fleet member.
    let other = Ca::new(tmp.path(), "other");
    let foreign_addr: SocketAddr = "127.77.2.9:7400".parse().unwrap();
    let mut foreign = Agent::new(
        tmp.path(),
        &other,
        "intruder",
        foreign_addr,
        &[fleet[0].addr],
    );
    foreign.start();

    let fleet_names = [
        ("agent-1", "alive"),
        ("agent-2", "alive"),
        ("agent-3", "alive"),
    ];
    wait_for("the three fleet agents to see each other", LONG, || {
        all_agree(&fleet, &ca.operator, &fleet_names)
    });

    // Garbage of every kind at agent-1.
    let target = fleet[0].addr;
    garbage_datagrams(target);
    let insider = tmp.path().join("insider");
    ca.issue("insider", &insider);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(garbage_on_a_fleet_connection(target, &insider));

    // Give the intruder time to try (it announces to its seed every 2 s); meanwhile, an
    // operator who names an address where no agent runs is told so, after 5 s.
    let started = std::time::Instant::now();
    let err = hosts("127.77.2.99:7400".parse().unwrap(), &ca.operator).unwrap_err();
    assert!(
        err.contains("no agent answered at 127.77.2.99:7400 within 5 s"),
        "{err}"
    );
    assert!(started.elapsed() >= Duration::from_secs(4));
    for a in &fleet {
        let list = hosts(a.addr, &ca.operator).unwrap();
        let names: BTreeSet<&str> = list.iter().map(|h| h["name"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            BTreeSet::from(["agent-1", "agent-2", "agent-3"]),
            "{} lists only the fleet",
            a.name
        );
        assert!(list.iter().all(|h| h["state"] == "alive"), "{list:?}");
    }
    // The intruder's operator (same foreign CA) sees it alone.
    let list = hosts(foreign_addr, &other.operator).unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["name"], "intruder");
    // And the fleet's agent says why it refused the intruder.
    let log = fleet[0].log_text();
    let refusal = log
        .lines()
        .find(|l| l.contains("refused a connection") && l.contains("127.77.2.9:7400"))
        .unwrap_or_else(|| panic!("agent-1 logs the refusal:\n{log}"));
    assert!(refusal.contains("certificate"), "{refusal}");
    assert!(
        foreign.log_text().contains("refused to join a peer"),
        "the intruder logs its refusal too:\n{}",
        foreign.log_text()
    );

    // An operator of another CA is refused; an agent's identity may not ask.
    let err = hosts(target, &other.operator).unwrap_err();
    assert!(err.contains("error:"), "{err}");
    let err = hosts(target, &insider).unwrap_err();
    assert!(err.contains("needs an operator identity"), "{err}");

    // Still serving, still one fleet, all processes running.
    for a in fleet.iter_mut() {
        assert!(
            a.child.as_mut().unwrap().try_wait().unwrap().is_none(),
            "{} still runs",
            a.name
        );
    }
    assert!(all_agree(&fleet, &ca.operator, &fleet_names));
}

/// Datagrams that are not QUIC, or look like the start of it, to `target`'s UDP port.
fn garbage_datagrams(target: SocketAddr) {
    let sock = UdpSocket::bind("127.77.2.100:0").unwrap();
    let mut x: u32 = 0x1234_5678;
    for i in 0..300usize {
        let len = [1, 20, 1200, 1500][i % 4];
        let mut packet: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        if i % 3 == 0 && len >= 5 {
            // A long header, version 1: the shape of a QUIC Initial.
            packet[0] = 0xc0;
            packet[1..5].copy_from_slice(&1u32.to_be_bytes());
        }
        sock.send_to(&packet, target).unwrap();
    }
}

/// Over a connection with a valid fleet certificate: garbage membership datagrams, one
/// that speaks for another member, malformed gossip frames, and garbage requests.
async fn garbage_on_a_fleet_connection(target: SocketAddr, identity: &std::path::Path) {
    use shoal_agent::identity::Identity;
    use shoal_agent::mesh::frame::Protocol;
    use shoal_agent::mesh::membership::{self, MemberId, Membership, Output};
    use shoal_agent::mesh::transport;

    let id = Identity::load(identity).unwrap();
    let endpoint = transport::endpoint("127.77.2.101:0".parse().unwrap(), &id, None).unwrap();
    let conn = transport::connect(&endpoint, target).await.unwrap();
    for junk in [&b""[..], b"\xff\xff\xff\xff", &[7u8; 1000]] {
        let _ = conn.send_datagram(bytes::Bytes::copy_from_slice(junk));
    }
    // A well-formed membership packet from this "insider" that claims to be a member
    // called `ghost`: refused, so `ghost` never appears in the membership.
    let ghost = MemberId {
        name: "ghost".into(),
        addr: "127.77.2.102:7400".parse().unwrap(),
        bump: 0,
    };
    let forged = Membership::new(
        ghost,
        membership::config(8, membership::FORGET_DOWN_AFTER),
        7,
    )
    .join(target)
    .into_iter()
    .find_map(|o| match o {
        Output::Send { data, .. } => Some(data),
        _ => None,
    })
    .expect("an announce");
    conn.send_datagram(forged.into()).unwrap();
    // A stream of a protocol nobody serves is stopped.
    let mut s = conn.open_uni().await.unwrap();
    s.write_all(&[0xee, 1, 2, 3]).await.unwrap();
    let _ = s.finish();
    // Gossip streams: too large, wrong version, not decodable, cut short.
    let frames: [&[u8]; 4] = [
        &u32::MAX.to_be_bytes(),
        &[0, 0, 0, 3, 9, 0xff, 0xff],
        &[0, 0, 0, 4, 1, 0x7f, 0xff, 0xff],
        &[0, 0, 0, 10, 1],
    ];
    for frame in frames {
        let mut s = conn.open_uni().await.unwrap();
        s.write_all(&[Protocol::Gossip as u8]).await.unwrap();
        s.write_all(frame).await.unwrap();
        let _ = s.finish();
    }
    // A request stream with garbage gets an error frame back, not a dead agent.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&[Protocol::Api as u8]).await.unwrap();
    send.write_all(&[0, 0, 0, 2, 1, 0x63]).await.unwrap();
    send.finish().unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(1 << 16)).await;
    let answer = answer.ok().and_then(|r| r.ok()).unwrap_or_default();
    assert!(answer.len() > 4, "an error answer comes back");
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
}

/// The fleet's side of a cut: `a-*` agents on 10.201.1.x, `b-*` on 10.201.2.x, all inside
/// one network namespace the test creates (and deletes), so no traffic leaves it.
#[test]
fn a_partition_heals_and_the_cut_off_side_catches_up() {
    let ns_name = format!("shoal-cut-{}", std::process::id());
    let side_a: Vec<SocketAddr> = (1..=4).map(|i| ([10, 201, 1, i], 7400).into()).collect();
    let side_b: Vec<SocketAddr> = (1..=2).map(|i| ([10, 201, 2, i], 7400).into()).collect();
    let setup = || -> Result<Netns, String> {
        let ns = Netns::create(&ns_name)?;
        for addr in side_a.iter().chain(&side_b) {
            ns.run(&format!("ip addr add {}/32 dev lo", addr.ip()))?;
        }
        // Let rules placed before the local table decide what reaches local addresses.
        ns.run("ip rule del pref 0 && ip rule add pref 100 lookup local")?;
        Ok(ns)
    };
    let ns = match setup() {
        Ok(ns) => ns,
        Err(why) => {
            eprintln!("SKIPPED a_partition_heals_and_the_cut_off_side_catches_up: {why}");
            return;
        }
    };

    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new(tmp.path(), "fleet");
    let seeds = [side_a[0], side_b[0]];
    let named = side_a
        .iter()
        .enumerate()
        .map(|(i, addr)| (format!("a-{}", i + 1), *addr))
        .chain(
            side_b
                .iter()
                .enumerate()
                .map(|(i, addr)| (format!("b-{}", i + 1), *addr)),
        );
    let mut fleet: Vec<Agent> = named
        .map(|(name, addr)| {
            let mut agent = Agent::new(tmp.path(), &ca, &name, addr, &seeds);
            agent.netns = Some(ns_name.clone());
            agent
        })
        .collect();
    for a in fleet.iter_mut() {
        a.start();
    }
    let names: Vec<String> = fleet.iter().map(|a| a.name.clone()).collect();
    // What `viewer` should list: its own side alive, the other side `far`.
    let expect = |viewer: &str, far: &'static str| -> Vec<(String, &'static str)> {
        names
            .iter()
            .map(|n| (n.clone(), if n[..1] == viewer[..1] { "alive" } else { far }))
            .collect()
    };
    let sees = |agent: &Agent, expected: &[(String, &str)]| lists(agent, &ca.operator, expected);
    wait_for("all six to see all six alive", LONG, || {
        fleet.iter().all(|a| sees(a, &expect(&a.name, "alive")))
    });

    // The cut: nothing passes between 10.201.1.x and 10.201.2.x.
    ns.run(
        "ip rule add pref 10 from 10.201.1.0/24 to 10.201.2.0/24 blackhole && \
         ip rule add pref 11 from 10.201.2.0/24 to 10.201.1.0/24 blackhole",
    )
    .unwrap();
    let took = wait_for("each side to report the other dead", DETECTION, || {
        fleet.iter().all(|a| sees(a, &expect(&a.name, "dead")))
    });
    eprintln!("each side reported the other dead {took:?} after the cut");

    // While cut off, side B deploys; only side B can know.
    let rev = deploy_tiny(&fleet[4], "tiny", "during the cut");
    let knows = |agent: &Agent| {
        hosts_in(Some(&ns_name), agent.addr, &ca.operator)
            .is_ok_and(|l| l[4]["name"] == "b-1" && l[4]["apps"]["tiny"] == rev.as_str())
    };
    wait_for("b-2 to learn of b-1's deployment", LONG, || {
        knows(&fleet[5])
    });
    assert!(
        fleet[..4].iter().all(|a| !knows(a)),
        "side A heard of the deployment through the cut"
    );

    // Healed: everyone alive everywhere, and side A catches up on b-1's record.
    ns.run("ip rule del pref 10 && ip rule del pref 11")
        .unwrap();
    let took = wait_for(
        "all six alive again, and side A to know of b-1's deployment",
        Duration::from_secs(60),
        || {
            fleet
                .iter()
                .all(|a| sees(a, &expect(&a.name, "alive")) && knows(a))
        },
    );
    eprintln!("healed and caught up {took:?} after the cut was lifted");
    for a in fleet.iter_mut() {
        assert!(
            a.child.as_mut().unwrap().try_wait().unwrap().is_none(),
            "{} kept running through the cut",
            a.name
        );
    }
    drop(fleet);
    drop(ns);
}
