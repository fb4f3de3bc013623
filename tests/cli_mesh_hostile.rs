//! The mesh against the people it must keep out, with real `shoal agent` processes on
//! 127.77.x addresses: a certificate revoked while the fleet runs is cut off everywhere
//! within seconds and cannot come back; a revoked operator can ask nothing; a stranger's
//! 2,000 handshakes and an insider's gossip burst (oversized frames included) kill no
//! member and slow no answer; an operator trusts only an agent's certificate.

#[path = "support/fleet.rs"]
mod fleet;

use std::path::Path;
use std::time::{Duration, Instant};

use fleet::{Ca, agents, hosts, shoal, state_of, wait_for};

const LONG: Duration = Duration::from_secs(30);

fn run(cmd: &mut std::process::Command) -> std::process::Output {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// Revokes `name` with the fleet CA and publishes the list through `peer`.
fn revoke_and_publish(ca: &Ca, name: &str, peer: std::net::SocketAddr) -> Instant {
    run(shoal()
        .args(["ca", "revoke", "--name", name, "--dir"])
        .arg(&ca.dir));
    let published = Instant::now();
    let o = run(shoal()
        .args([
            "ca",
            "publish-revocations",
            "--json",
            "--peer",
            &peer.to_string(),
        ])
        .arg(ca.dir.join("revocations.crl"))
        .arg("--identity")
        .arg(&ca.operator));
    let answer: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(answer["number"].as_u64().unwrap() >= 1, "{answer}");
    published
}

/// `n` agents on `prefix`.x, started and seeing each other alive.
fn running_fleet(root: &Path, ca: &Ca, prefix: [u8; 3], n: usize) -> Vec<fleet::Agent> {
    let mut fleet = agents(root, ca, prefix, n);
    for a in fleet.iter_mut() {
        a.start();
    }
    wait_for("the agents to see each other alive", LONG, || {
        fleet.iter().all(|a| {
            hosts(a.addr, &ca.operator)
                .is_ok_and(|l| l.len() == n && l.iter().all(|h| h["state"] == "alive"))
        })
    });
    fleet
}

fn state_at(peer: std::net::SocketAddr, operator: &Path, name: &str) -> Option<String> {
    hosts(peer, operator)
        .ok()
        .and_then(|list| state_of(&list, name))
}

#[test]
fn a_revoked_agent_is_cut_off_everywhere_and_a_revoked_operator_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new(tmp.path(), "fleet");
    let mut fleet = running_fleet(tmp.path(), &ca, [127, 77, 3], 4);

    // agent-4's certificate is revoked; the list goes to agent-1 alone.
    let victim = fleet[3].name.clone();
    let published = revoke_and_publish(&ca, &victim, fleet[0].addr);
    let cut_off = wait_for("every member to cut the revoked agent off", LONG, || {
        fleet[..3]
            .iter()
            .all(|a| state_at(a.addr, &ca.operator, &victim).as_deref() == Some("dead"))
    });
    let took = published.elapsed();
    eprintln!(
        "the revoked agent was dead to every member {took:?} after publishing ({cut_off:?} of polling)"
    );
    assert!(took <= Duration::from_secs(5), "cut off after {took:?}");
    for a in &fleet[..3] {
        assert!(
            a.log_text().contains("a new revocation list is in force"),
            "{} enforces the list:\n{}",
            a.name,
            a.log_text()
        );
    }

    // Restarted, it still cannot rejoin: every handshake it tries is refused.
    fleet[3].kill();
    let log_before = fleet[3].log_text().len();
    fleet[3].start();
    wait_for("the restarted agent to be refused", LONG, || {
        fleet[3].log_text()[log_before..].contains("refused to join a peer")
    });
    for a in &fleet[..3] {
        assert_eq!(
            state_at(a.addr, &ca.operator, &victim).as_deref(),
            Some("dead"),
            "{} keeps it out",
            a.name
        );
    }
    // The list survives a restart of a member.
    fleet[1].kill();
    let member_log = fleet[1].log_text().len();
    fleet[1].start();
    wait_for("the restarted member to load the list", LONG, || {
        fleet[1].log_text()[member_log..].contains("revocation list in force")
    });
    wait_for("the restarted member to come back", LONG, || {
        state_at(fleet[0].addr, &ca.operator, &fleet[1].name).as_deref() == Some("alive")
    });
    assert_ne!(
        state_at(fleet[1].addr, &ca.operator, &victim).as_deref(),
        Some("alive"),
        "a restarted member keeps the revoked agent out (dead, or not listed at all)"
    );

    // A second operator is revoked: its questions are refused, with the reason.
    let mallory = tmp.path().join("mallory");
    run(shoal()
        .args(["ca", "issue", "--operator", "--name", "mallory", "--dir"])
        .arg(&ca.dir)
        .arg("--out")
        .arg(&mallory));
    assert!(hosts(fleet[2].addr, &mallory).is_ok(), "before revocation");
    revoke_and_publish(&ca, "mallory", fleet[1].addr);
    wait_for("the revoked operator to be refused", LONG, || {
        hosts(fleet[2].addr, &mallory).is_err_and(|e| e.contains("revoked"))
    });
    let err = hosts(fleet[0].addr, &mallory).unwrap_err();
    assert!(err.contains("has been revoked by the fleet CA"), "{err}");

    // A list not signed by the fleet CA is refused.
    let other = Ca::new(tmp.path(), "other");
    run(shoal()
        .args(["ca", "issue", "--name", "x", "--dir"])
        .arg(&other.dir)
        .arg("--out")
        .arg(tmp.path().join("x")));
    run(shoal()
        .args(["ca", "revoke", "--name", "x", "--dir"])
        .arg(&other.dir));
    let o = shoal()
        .args([
            "ca",
            "publish-revocations",
            "--peer",
            &fleet[0].addr.to_string(),
        ])
        .arg(other.dir.join("revocations.crl"))
        .arg("--identity")
        .arg(&ca.operator)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not signed by this fleet's CA"), "{err}");
}

/// The resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// How many times a member was declared dead, in every log of the fleet.
fn deaths(fleet: &[fleet::Agent]) -> usize {
    fleet
        .iter()
        .map(|a| a.log_text().matches("member is dead").count())
        .sum()
}

/// A client with no certificate at all, that accepts any server: a stranger on the network.
fn stranger_config() -> quinn::ClientConfig {
    #[derive(Debug)]
    struct AnyServer(std::sync::Arc<rustls::crypto::CryptoProvider>);
    impl rustls::client::danger::ServerCertVerifier for AnyServer {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(AnyServer(provider)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"shoal/1".to_vec()];
    quinn::ClientConfig::new(std::sync::Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ))
}

#[test]
fn a_stranger_opening_two_thousand_handshakes_changes_nothing() {
    const HANDSHAKES: usize = 2000;
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new(tmp.path(), "fleet");
    let fleet = running_fleet(tmp.path(), &ca, [127, 77, 4], 4);
    let target = fleet[0].addr;
    let pid = fleet[0].pid();
    // Settle: the member's memory before, once it stopped growing from start-up.
    let mut before = rss_kib(pid);
    wait_for("the target's memory to settle", LONG, || {
        std::thread::sleep(Duration::from_millis(500));
        let now = rss_kib(pid);
        let settled = now <= before + 256;
        before = before.max(now);
        settled
    });

    let flood = std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let mut endpoint = quinn::Endpoint::client("127.77.4.200:0".parse().unwrap()).unwrap();
            endpoint.set_default_client_config(stranger_config());
            let started = Instant::now();
            let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(256));
            let mut tasks = Vec::new();
            let connected = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            for _ in 0..HANDSHAKES {
                let permit = sem.clone().acquire_owned().await.unwrap();
                let (endpoint, connected) = (endpoint.clone(), connected.clone());
                tasks.push(tokio::spawn(async move {
                    let _permit = permit;
                    let attempt = async {
                        let conn = endpoint.connect(target, "shoal.fleet").ok()?.await.ok()?;
                        // Its side of the handshake may complete; the agent's refusal follows.
                        let mut s = conn.open_uni().await.ok()?;
                        let _ = s.write_all(&[2, 0, 0, 0, 1]).await;
                        Some(conn)
                    };
                    let conn = tokio::time::timeout(Duration::from_secs(10), attempt)
                        .await
                        .ok()
                        .flatten();
                    // Admitted: still open 3 s after its handshake.
                    if let Some(conn) = conn
                        && tokio::time::timeout(Duration::from_secs(3), conn.closed())
                            .await
                            .is_err()
                    {
                        connected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
            endpoint.close(0u32.into(), b"");
            (
                started.elapsed(),
                connected.load(std::sync::atomic::Ordering::Relaxed),
            )
        })
    });

    // Throughout: `shoal hosts` answers within a second, every member stays alive.
    let mut slowest = Duration::ZERO;
    let mut asked = 0;
    while !flood.is_finished() {
        let t = Instant::now();
        let list = hosts(target, &ca.operator).expect("the member answers during the flood");
        slowest = slowest.max(t.elapsed());
        asked += 1;
        assert!(
            list.iter().all(|h| h["state"] == "alive"),
            "a member was lost during the flood: {list:?}"
        );
    }
    let (took, connected) = flood.join().unwrap();
    eprintln!(
        "{HANDSHAKES} stranger handshakes took {took:?}; {connected} were admitted; \
         `shoal hosts` asked {asked} times, slowest {slowest:?}"
    );
    assert_eq!(connected, 0, "no stranger was admitted");
    assert!(
        slowest < Duration::from_secs(1),
        "hosts answered within {slowest:?}"
    );
    assert_eq!(deaths(&fleet), 0, "no member was declared dead");
    assert!(
        took < Duration::from_secs(120),
        "the flood was bounded in time: {took:?}"
    );
    // The refusals are logged, not once per stranger.
    let refusals = fleet[0].log_text().matches("refused a connection").count();
    assert!(refusals < 20, "{refusals} refusal lines");
    // Memory comes back to where it was.
    let peak = rss_kib(pid);
    wait_for("the target's memory to come back", LONG, || {
        rss_kib(pid) <= before + 2048
    });
    eprintln!(
        "target RSS: {before} KiB before, {peak} KiB after the flood, {} KiB settled",
        rss_kib(pid)
    );
}

/// A burst of gossip streams (oversized frames among them) and of membership datagrams
/// from one insider.
#[test]
fn a_gossip_burst_from_one_member_kills_no_one() {
    use shoal_agent::identity::Identity;
    use shoal_agent::mesh::frame::{Protocol, encode_frame};
    use shoal_agent::mesh::hoststate::GossipMsg;
    use shoal_agent::mesh::transport;

    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new(tmp.path(), "fleet");
    let fleet = running_fleet(tmp.path(), &ca, [127, 77, 5], 4);
    // The insider: a valid agent certificate, speaking the wire protocol directly.
    let insider = tmp.path().join("insider");
    ca.issue("insider", &insider);
    let id = Identity::load(&insider).unwrap();
    let targets: Vec<std::net::SocketAddr> = fleet.iter().map(|a| a.addr).collect();
    let digest = GossipMsg::Digest {
        after: None,
        through: None,
        versions: (0..10_000).map(|i| (format!("ghost-{i}"), 1)).collect(),
    };
    let frame = encode_frame(&digest).unwrap();
    let oversized = {
        let mut f = (shoal_agent::mesh::frame::MAX_FRAME + 1)
            .to_be_bytes()
            .to_vec();
        f.extend(std::iter::repeat_n(0u8, 64 * 1024));
        f
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sent = rt.block_on(async {
        let endpoint = transport::endpoint("127.77.5.200:0".parse().unwrap(), &id, None).unwrap();
        let mut sent = 0usize;
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(8) {
            for &t in &targets {
                let Ok(Ok(conn)) =
                    tokio::time::timeout(Duration::from_secs(2), transport::connect(&endpoint, t))
                        .await
                else {
                    continue;
                };
                // Membership datagrams too, far past any peer's rate.
                for i in 0..2000u32 {
                    let _ = conn.send_datagram(bytes::Bytes::from(i.to_be_bytes().repeat(64)));
                }
                let mut writes = Vec::new();
                for i in 0..64 {
                    let conn = conn.clone();
                    let bytes = if i == 0 {
                        oversized.clone()
                    } else {
                        frame.clone()
                    };
                    writes.push(tokio::spawn(async move {
                        let mut s = conn.open_uni().await.ok()?;
                        s.write_all(&[Protocol::Gossip as u8]).await.ok()?;
                        s.write_all(&bytes).await.ok()?;
                        s.finish().ok()
                    }));
                }
                for w in writes {
                    if tokio::time::timeout(Duration::from_secs(5), w)
                        .await
                        .is_ok_and(|r| r.ok().flatten().is_some())
                    {
                        sent += 1;
                    }
                }
            }
        }
        endpoint.close(0u32.into(), b"");
        sent
    });
    eprintln!(
        "the insider sent {sent} gossip streams of {} KiB each",
        frame.len() / 1024
    );
    assert!(sent > 100, "the burst happened ({sent} streams)");
    // Every member is still alive to every other, and none was declared dead meanwhile.
    for a in &fleet {
        let list = hosts(a.addr, &ca.operator).unwrap();
        let fleet_only: Vec<_> = list.iter().filter(|h| h["name"] != "insider").collect();
        assert!(
            fleet_only.iter().all(|h| h["state"] == "alive"),
            "{}: {list:?}",
            a.name
        );
    }
    assert_eq!(deaths(&fleet), 0, "no member was declared dead");
    // The oversized frame is refused and reported at warn (within the report period).
    wait_for("the drops to be reported", LONG, || {
        fleet
            .iter()
            .all(|a| a.log_text().contains("malformed or late streams"))
    });
}

#[test]
fn an_operator_trusts_only_an_agent_certificate() {
    use shoal_agent::identity::Identity;
    use shoal_agent::mesh::transport;

    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new(tmp.path(), "fleet");
    // Something on the path that holds the fleet's *operator* certificate poses as an agent.
    let impostor = Identity::load(&ca.operator).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let addr: std::net::SocketAddr = "127.77.6.1:7400".parse().unwrap();
    let endpoint = rt.block_on(async { transport::endpoint(addr, &impostor, None).unwrap() });
    let server = endpoint.clone();
    rt.spawn(async move {
        while let Some(incoming) = server.accept().await {
            if let Ok(conn) = incoming.await {
                // Would answer anything; the operator must not get that far.
                let _ = conn.accept_bi().await;
            }
        }
    });
    let err = hosts(addr, &ca.operator).unwrap_err();
    assert!(
        err.contains("operator certificate, not an agent's"),
        "{err}"
    );

    drop(endpoint);
}

/// The insider's side: a valid agent certificate speaking the wire protocol directly.
struct Insider {
    endpoint: quinn::Endpoint,
    id: shoal_agent::identity::Identity,
}

impl Insider {
    fn new(ca: &Ca, dir: &Path, name: &str, bind: &str) -> Insider {
        ca.issue(name, dir);
        let id = shoal_agent::identity::Identity::load(dir).unwrap();
        let endpoint =
            shoal_agent::mesh::transport::endpoint(bind.parse().unwrap(), &id, None).unwrap();
        Insider { endpoint, id }
    }

    /// A record saying `record`, signed with the insider's own key.
    fn sign(
        &self,
        record: shoal_agent::mesh::hoststate::HostRecord,
    ) -> shoal_agent::mesh::hoststate::SignedRecord {
        use shoal_agent::mesh::hoststate::SignedRecord;
        let signer = shoal_agent::identity::sign::Signer::new(&self.id).unwrap();
        let sig = signer.sign(&SignedRecord::signed_bytes(&record)).unwrap();
        SignedRecord {
            record,
            cert: self.id.cert.to_vec(),
            sig,
        }
    }

    /// Sends each message on a gossip stream of its own, at most 8 in flight (a
    /// connection's share of the agent's readers), and waits until the agent has them all
    /// (acknowledged, or stopped). Returns how many the agent stopped.
    async fn gossip(
        &self,
        conn: &quinn::Connection,
        msgs: &[shoal_agent::mesh::hoststate::GossipMsg],
    ) -> usize {
        use shoal_agent::mesh::frame::{Protocol, encode_frame};
        let mut stopped = 0;
        for batch in msgs.chunks(8) {
            let mut streams = Vec::new();
            for msg in batch {
                let frame = encode_frame(msg).unwrap();
                let mut s = conn.open_uni().await.unwrap();
                let sent = async {
                    s.write_all(&[Protocol::Gossip as u8]).await?;
                    s.write_all(&frame).await?;
                    s.finish()?;
                    anyhow::Ok(())
                };
                if sent.await.is_err() {
                    stopped += 1;
                }
                streams.push(s);
            }
            for s in streams {
                if let Ok(Ok(Some(_))) =
                    tokio::time::timeout(Duration::from_secs(5), s.stopped()).await
                {
                    stopped += 1;
                }
            }
        }
        stopped
    }
}

#[test]
fn an_insider_cannot_rewrite_another_host_or_make_it_work() {
    use shoal_agent::mesh::hoststate::{GossipMsg, HostRecord};
    use std::collections::BTreeMap;

    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new(tmp.path(), "fleet");
    let mut fleet = running_fleet(tmp.path(), &ca, [127, 77, 7], 3);
    let version_of = |at: std::net::SocketAddr, name: &str| -> u64 {
        let list = hosts(at, &ca.operator).unwrap();
        list.iter().find(|h| h["name"] == name).unwrap()["version"]
            .as_u64()
            .unwrap()
    };
    let victim = fleet[1].name.clone();
    let victim_version = version_of(fleet[1].addr, &victim);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let insider = {
        let _runtime = rt.enter();
        Insider::new(
            &ca,
            &tmp.path().join("insider"),
            "insider",
            "127.77.7.200:0",
        )
    };
    let answers = rt.block_on(async {
        use shoal_agent::mesh::transport;
        // 1. A record of agent-2 that says it left and is evil, signed by the insider.
        let forged = insider.sign(HostRecord {
            name: victim.clone(),
            addr: "127.77.7.200:7400".parse().unwrap(),
            version: victim_version + 1000,
            left: true,
            tags: BTreeMap::from([("role".to_string(), "evil".to_string())]),
            apps: BTreeMap::new(),
        });
        // 2. Its own record at version u64::MAX, properly signed.
        let absurd = insider.sign(HostRecord {
            name: "insider".into(),
            addr: "127.77.7.200:7400".parse().unwrap(),
            version: u64::MAX,
            left: false,
            tags: BTreeMap::new(),
            apps: BTreeMap::new(),
        });
        let mut conns = Vec::new();
        for a in &fleet {
            let conn = transport::connect(&insider.endpoint, a.addr).await.unwrap();
            conns.push(conn.clone());
            insider
                .gossip(
                    &conn,
                    &[
                        GossipMsg::Push(vec![forged.clone()]),
                        GossipMsg::Push(vec![absurd.clone()]),
                    ],
                )
                .await;
        }
        // 3. A digest flood at the victim: its own record "newer" by far, thousands of times.
        let conn = transport::connect(&insider.endpoint, fleet[1].addr)
            .await
            .unwrap();
        let answers = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counting = {
            let (conn, answers) = (conn.clone(), answers.clone());
            tokio::spawn(async move {
                while let Ok(_stream) = conn.accept_uni().await {
                    answers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            })
        };
        let digest = GossipMsg::Digest {
            after: None,
            through: None,
            versions: vec![(victim.clone(), u64::MAX - 1), ("agent-1".into(), u64::MAX)],
        };
        let flood_started = Instant::now();
        for _ in 0..100 {
            insider.gossip(&conn, &vec![digest.clone(); 20]).await;
        }
        let flood = flood_started.elapsed();
        // The victim has handled the flood once it reports what it left unanswered; every
        // answer it sent went out before that.
        let victim_log = fleet[1].log.clone();
        let reported = async {
            loop {
                let log = std::fs::read_to_string(&victim_log).unwrap_or_default();
                if log.contains("digests left unanswered") {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::time::timeout(LONG, reported)
            .await
            .expect("the victim reports the digests it left unanswered");
        counting.abort();
        drop(conns);
        let n = answers.load(std::sync::atomic::Ordering::Relaxed);
        eprintln!("2,000 digests over {flood:?} drew {n} streams back");
        // The stated bound: one answer (and one want) per sender per second, over the
        // flood and the time it took the victim to report it.
        let seconds = flood_started.elapsed().as_secs() + 1;
        assert!(
            n as u64 <= 2 * seconds + 2,
            "{n} streams answered 2,000 digests in {flood:?}"
        );
        n
    });
    let _ = answers;

    // Every agent still shows the true record of agent-2; the absurd one was adopted by none.
    for a in &fleet {
        let list = hosts(a.addr, &ca.operator).unwrap();
        let v = list.iter().find(|h| h["name"] == victim.as_str()).unwrap();
        assert_eq!(v["state"], "alive", "{}: {v}", a.name);
        assert_eq!(v["tags"]["role"], "inference", "{}: {v}", a.name);
        assert_eq!(v["addr"], fleet[1].addr.to_string(), "{}: {v}", a.name);
        if let Some(i) = list.iter().find(|h| h["name"] == "insider") {
            assert_ne!(i["version"].as_u64(), Some(u64::MAX), "{}: {i}", a.name);
        }
    }
    // The refusals are reported at warn, counted.
    wait_for("the forgeries to be reported", LONG, || {
        fleet.iter().all(|a| {
            a.log_text()
                .lines()
                .any(|l| l.contains("WARN") && l.contains("host records with a forged signature"))
        })
    });
    // The victim did no work of its own: its record's version did not move.
    assert_eq!(version_of(fleet[1].addr, &victim), victim_version);
    for a in fleet.iter_mut() {
        assert!(
            a.child.as_mut().unwrap().try_wait().unwrap().is_none(),
            "{} runs",
            a.name
        );
    }

    // 4. A SIGHUP with 10,000 tags is refused at the owner, with a warning; the old record
    //    stays.
    let owner = &fleet[2];
    let mut config = std::fs::read_to_string(&owner.config).unwrap();
    for i in 0..10_000 {
        config.push_str(&format!("t{i} = \"x\"\n"));
    }
    std::fs::write(&owner.config, config).unwrap();
    let before = version_of(owner.addr, &owner.name);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(owner.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    wait_for("the oversized state to be refused", LONG, || {
        owner.log_text().contains("was not published")
    });
    let line = owner
        .log_text()
        .lines()
        .find(|l| l.contains("was not published"))
        .unwrap()
        .to_string();
    assert!(line.contains("WARN") && line.contains("tags"), "{line}");
    assert_eq!(version_of(fleet[0].addr, &owner.name), before);
    let list = hosts(fleet[0].addr, &ca.operator).unwrap();
    let o = list
        .iter()
        .find(|h| h["name"] == owner.name.as_str())
        .unwrap();
    assert_eq!(o["tags"].as_object().unwrap().len(), 2, "{o}");
}
