//! The mesh against the people it must keep out, with real `shoal agent` processes on
//! 127.77.x addresses: a certificate revoked while the fleet runs is cut off everywhere
//! within seconds and cannot come back; a revoked operator can ask nothing; a stranger's
//! 2,000 handshakes and an insider's gossip burst (oversized frames included) kill no
//! member and slow no answer; an operator trusts only an agent's certificate; an insider
//! speaking SWIM itself cannot move, renew or kill members, nor make the fleet keep
//! dialling the members it invents.

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

    // The same question without a flood, in this run: what "answers promptly" means on
    // this machine now (a CLI process, an mTLS handshake, one request).
    let mut calm = Duration::ZERO;
    for _ in 0..5 {
        let t = Instant::now();
        hosts(target, &ca.operator).expect("the member answers");
        calm = calm.max(t.elapsed());
    }

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

    // Throughout: `shoal hosts` answers, about as fast as without the flood, and every
    // member stays alive.
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
         `shoal hosts` asked {asked} times, slowest {slowest:?} (without the flood {calm:?})"
    );
    assert_eq!(connected, 0, "no stranger was admitted");
    // A starved member would take its handshake timeouts (seconds) or never answer; a
    // loaded 2-core box makes one answer a few times slower than the calm ones.
    let bound = (calm * 4).max(Duration::from_secs(2));
    assert!(
        slowest < bound,
        "hosts answered within {slowest:?}, over {bound:?} (without the flood {calm:?})"
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
            log: None,
        });
        // 2. Its own record at version u64::MAX, properly signed.
        let absurd = insider.sign(HostRecord {
            name: "insider".into(),
            addr: "127.77.7.200:7400".parse().unwrap(),
            version: u64::MAX,
            left: false,
            tags: BTreeMap::new(),
            apps: BTreeMap::new(),
            log: None,
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

/// A membership packet as the agents write it: foca's header, then (if any) a big-endian
/// u16 count and the updates, each in `PostcardCodec` (as in
/// `agent/tests/membership_simulation.rs`).
fn swim_packet(
    src: &shoal_agent::mesh::membership::MemberId,
    src_incarnation: u16,
    dst: &shoal_agent::mesh::membership::MemberId,
    message: foca::Message<shoal_agent::mesh::membership::MemberId>,
    updates: &[foca::Member<shoal_agent::mesh::membership::MemberId>],
) -> Vec<u8> {
    let header = foca::Header {
        src: src.clone(),
        src_incarnation,
        dst: dst.clone(),
        message,
    };
    let data = shoal_agent::mesh::membership::encode_packet(&header, updates);
    assert!(data.len() <= shoal_agent::mesh::membership::MAX_PACKET);
    data
}

/// What the SWIM insider's tasks share.
struct SwimShared {
    me: shoal_agent::mesh::membership::MemberId,
    /// The connections to the agents (dialled or accepted), by the agent's address, newest
    /// last: of two made at once, an agent keeps one and closes the other.
    conns:
        std::sync::Mutex<std::collections::HashMap<std::net::SocketAddr, Vec<quinn::Connection>>>,
    /// Each agent's identity and incarnation, as the headers of its own packets give them.
    peers: std::sync::Mutex<
        std::collections::HashMap<
            std::net::SocketAddr,
            (shoal_agent::mesh::membership::MemberId, u16),
        >,
    >,
    /// The insider's incarnation (raised to refute a suspicion, as a member does).
    incarnation: std::sync::atomic::AtomicU16,
    /// Acks received, by (agent, probe number).
    acks: std::sync::Mutex<std::collections::HashSet<(std::net::SocketAddr, u8)>>,
    /// `TurnUndead` received: some agent holds the insider down.
    turned_undead: std::sync::atomic::AtomicUsize,
}

/// The insider as a SWIM member: a valid agent certificate, an endpoint at a fixed address,
/// and just enough of the protocol, written by hand, to stay a live member (it answers
/// pings, direct and indirect, and refutes suspicions of itself). It says nothing else
/// unless the test makes it (`say`); it never dials anything but the agents.
struct SwimInsider {
    shared: std::sync::Arc<SwimShared>,
    endpoint: quinn::Endpoint,
    probe: std::sync::atomic::AtomicU8,
}

impl SwimInsider {
    /// Starts it (inside `rt`) at `addr`, named `name`.
    fn start(
        rt: &tokio::runtime::Runtime,
        ca: &Ca,
        dir: &Path,
        name: &str,
        addr: std::net::SocketAddr,
    ) -> SwimInsider {
        use shoal_agent::mesh::membership::MemberId;
        ca.issue(name, dir);
        let id = shoal_agent::identity::Identity::load(dir).unwrap();
        let _entered = rt.enter();
        let endpoint = shoal_agent::mesh::transport::endpoint(addr, &id, None).unwrap();
        let shared = std::sync::Arc::new(SwimShared {
            me: MemberId {
                name: name.to_string(),
                addr,
                bump: 0,
            },
            conns: Default::default(),
            peers: Default::default(),
            incarnation: Default::default(),
            acks: Default::default(),
            turned_undead: Default::default(),
        });
        let (accepting, sh) = (endpoint.clone(), shared.clone());
        rt.spawn(async move {
            while let Some(incoming) = accepting.accept().await {
                let sh = sh.clone();
                tokio::spawn(async move {
                    if let Ok(conn) = incoming.await {
                        Self::adopt(&sh, conn);
                    }
                });
            }
        });
        SwimInsider {
            shared,
            endpoint,
            probe: std::sync::atomic::AtomicU8::new(0),
        }
    }

    fn me(&self) -> shoal_agent::mesh::membership::MemberId {
        self.shared.me.clone()
    }

    fn incarnation(&self) -> u16 {
        self.shared
            .incarnation
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Reads what an agent sends on `conn`: its datagrams, answered as a member would, and
    /// its gossip streams, drained unread.
    fn adopt(sh: &std::sync::Arc<SwimShared>, conn: quinn::Connection) {
        let remote = conn.remote_address();
        sh.conns
            .lock()
            .unwrap()
            .entry(remote)
            .or_default()
            .push(conn.clone());
        let (c, s) = (conn.clone(), sh.clone());
        tokio::spawn(async move {
            while let Ok(data) = c.read_datagram().await {
                Self::on_datagram(&s, remote, &data);
            }
        });
        tokio::spawn(async move {
            while let Ok(mut stream) = conn.accept_uni().await {
                tokio::spawn(async move {
                    let _ = stream.read_to_end(2 << 20).await;
                });
            }
        });
    }

    /// Sends on the newest open connection to `to`, if there is one.
    fn send_on(sh: &SwimShared, to: std::net::SocketAddr, data: Vec<u8>) -> bool {
        let conn = {
            let mut conns = sh.conns.lock().unwrap();
            let open = conns.entry(to).or_default();
            open.retain(|c| c.close_reason().is_none());
            open.last().cloned()
        };
        conn.is_some_and(|c| c.send_datagram(bytes::Bytes::from(data)).is_ok())
    }

    fn on_datagram(sh: &SwimShared, remote: std::net::SocketAddr, data: &[u8]) {
        use foca::{Codec, Header, Member, Message, PostcardCodec, State};
        use shoal_agent::mesh::membership::MemberId;
        use std::sync::atomic::Ordering::SeqCst;
        let mut rest = data;
        let Ok(header) = PostcardCodec.decode_header(&mut rest) else {
            return;
        };
        let header: Header<MemberId> = header;
        if header.src.addr == remote {
            sh.peers
                .lock()
                .unwrap()
                .insert(remote, (header.src.clone(), header.src_incarnation));
        }
        let mut updates: Vec<Member<MemberId>> = Vec::new();
        if rest.len() >= 2 && !matches!(header.message, Message::Announce | Message::TurnUndead) {
            let n = u16::from_be_bytes([rest[0], rest[1]]);
            rest = &rest[2..];
            for _ in 0..n {
                match PostcardCodec.decode_member(&mut rest) {
                    Ok(m) => updates.push(m),
                    Err(_) => break,
                }
            }
        }
        // Suspected (or declared down) at our incarnation or above: refute, to everyone.
        let mine = sh.incarnation.load(SeqCst);
        let doubt = updates
            .iter()
            .filter(|u| *u.id() == sh.me && u.state() != State::Alive)
            .map(|u| u.incarnation())
            .max();
        if let Some(i) = doubt.filter(|i| *i >= mine && *i < u16::MAX) {
            sh.incarnation.fetch_max(i + 1, SeqCst);
            let peers: Vec<MemberId> = sh
                .peers
                .lock()
                .unwrap()
                .values()
                .map(|(p, _)| p.clone())
                .collect();
            for p in peers {
                let data = swim_packet(&sh.me, i + 1, &p, Message::Gossip, &[]);
                Self::send_on(sh, p.addr, data);
            }
        }
        let inc = sh.incarnation.load(SeqCst);
        let src = header.src;
        let reply = |to: &MemberId, message| {
            Self::send_on(sh, to.addr, swim_packet(&sh.me, inc, to, message, &[]));
        };
        match header.message {
            Message::Ping(n) => reply(&src, Message::Ack(n)),
            Message::Ack(n) => {
                sh.acks.lock().unwrap().insert((remote, n));
            }
            Message::Announce => reply(&src, Message::Feed),
            Message::PingReq {
                target,
                probe_number,
            } => reply(
                &target,
                Message::IndirectPing {
                    origin: src,
                    probe_number,
                },
            ),
            Message::IndirectPing {
                origin,
                probe_number,
            } => reply(
                &src,
                Message::IndirectAck {
                    target: origin,
                    probe_number,
                },
            ),
            Message::IndirectAck {
                target,
                probe_number,
            } => reply(
                &target,
                Message::ForwardedAck {
                    origin: src,
                    probe_number,
                },
            ),
            Message::TurnUndead => {
                sh.turned_undead.fetch_add(1, SeqCst);
            }
            _ => {}
        }
    }

    async fn dial(&self, agent: std::net::SocketAddr) {
        let conn = shoal_agent::mesh::transport::connect(&self.endpoint, agent)
            .await
            .unwrap();
        Self::adopt(&self.shared, conn);
    }

    /// Announces itself to `agent`, first-hand (to its address: its identity is not known
    /// yet). The agent answers with a `Feed`, which names it.
    fn announce(&self, agent: std::net::SocketAddr) {
        let seed = shoal_agent::mesh::membership::MemberId {
            name: String::new(),
            addr: agent,
            bump: 0,
        };
        let data = swim_packet(&self.me(), 0, &seed, foca::Message::Announce, &[]);
        self.send(agent, data);
    }

    /// The identity of the agent at `addr` and its incarnation, once it has sent us a packet.
    fn peer(
        &self,
        addr: std::net::SocketAddr,
    ) -> Option<(shoal_agent::mesh::membership::MemberId, u16)> {
        self.shared.peers.lock().unwrap().get(&addr).cloned()
    }

    fn send(&self, to: std::net::SocketAddr, data: Vec<u8>) -> bool {
        Self::send_on(&self.shared, to, data)
    }

    /// A packet from the insider to the agent at `to` (addressed to its exact identity, or
    /// foca drops its updates), carrying `message` and `updates`; on a new connection if
    /// none is open.
    async fn say(
        &self,
        to: std::net::SocketAddr,
        message: foca::Message<shoal_agent::mesh::membership::MemberId>,
        updates: &[foca::Member<shoal_agent::mesh::membership::MemberId>],
    ) {
        let (dst, _) = self.peer(to).expect("the agent's identity is known");
        let data = swim_packet(&self.me(), self.incarnation(), &dst, message, updates);
        if !self.send(to, data.clone()) {
            self.dial(to).await;
            assert!(
                self.send(to, data),
                "the insider's connection to {to} is open"
            );
        }
    }

    /// Returns once every agent in `agents` has answered a ping sent now: whatever the
    /// insider sent each before (on the same connection, to the same single reader) has
    /// been handled.
    async fn barrier(&self, agents: &[std::net::SocketAddr]) {
        for &a in agents {
            let n = self.probe.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if self.shared.acks.lock().unwrap().remove(&(a, n)) {
                    break;
                }
                assert!(Instant::now() < deadline, "{a} never answered a ping");
                self.say(a, foca::Message::Ping(n), &[]).await;
                let until = Instant::now() + Duration::from_millis(300);
                while Instant::now() < until && !self.shared.acks.lock().unwrap().contains(&(a, n))
                {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    }

    fn turned_undead(&self) -> usize {
        self.shared
            .turned_undead
            .load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A packet that arrived at one of the test's silent UDP sockets.
#[derive(Clone)]
struct Hit {
    at: Instant,
    to: std::net::SocketAddr,
    from: std::net::SocketAddr,
    /// The destination connection ID of a QUIC long-header packet: a client picks a new
    /// one for every dial, and keeps it while nothing answers.
    dcid: Vec<u8>,
}

/// Silent UDP sockets on addresses the test owns, counting what arrives: an agent that
/// dials one of them sends QUIC Initial packets there, and never hears back.
struct Watch {
    hits: std::sync::Arc<std::sync::Mutex<Vec<Hit>>>,
}

impl Watch {
    fn bind(rt: &tokio::runtime::Runtime, addrs: &[std::net::SocketAddr]) -> Watch {
        let hits: std::sync::Arc<std::sync::Mutex<Vec<Hit>>> = Default::default();
        let _entered = rt.enter();
        for &addr in addrs {
            let sock = std::net::UdpSocket::bind(addr).unwrap();
            sock.set_nonblocking(true).unwrap();
            let sock = tokio::net::UdpSocket::from_std(sock).unwrap();
            let hits = hits.clone();
            rt.spawn(async move {
                let mut buf = vec![0u8; 2048];
                while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                    let b = &buf[..n];
                    let dcid = if n > 6 && b[0] & 0x80 != 0 {
                        b.get(6..6 + b[5] as usize)
                            .map(<[u8]>::to_vec)
                            .unwrap_or_default()
                    } else {
                        Vec::new()
                    };
                    hits.lock().unwrap().push(Hit {
                        at: Instant::now(),
                        to: addr,
                        from,
                        dcid,
                    });
                }
            });
        }
        Watch { hits }
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    /// The dials among the hits: the first packet of each (sender, address, connection ID).
    fn dials(&self) -> Vec<Hit> {
        let mut seen = std::collections::HashSet::new();
        self.hits()
            .into_iter()
            .filter(|h| seen.insert((h.from, h.to, h.dcid.clone())))
            .collect()
    }
}

/// Log lines of the fleet that report `what` about a member whose name starts `agent-`.
fn about_honest(fleet: &[fleet::Agent], what: &str) -> Vec<String> {
    fleet
        .iter()
        .flat_map(|a| {
            a.log_text()
                .lines()
                .filter(|l| l.contains(what) && l.contains("member=agent-"))
                .map(|l| format!("{}: {l}", a.name))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// What one agent lists: every honest member at its true address, alive or at worst
/// suspect (not dead, not left), and the insider alive, or why not; and the invented
/// members (`ghost-…`) it lists, with their states.
fn membership_at(
    at: std::net::SocketAddr,
    operator: &Path,
    honest: &[shoal_agent::mesh::membership::MemberId],
) -> Result<Vec<(String, String)>, String> {
    let list = hosts(at, operator)?;
    for v in honest {
        let h = list
            .iter()
            .find(|h| h["name"] == v.name.as_str())
            .ok_or_else(|| format!("{at} does not list {}: {list:?}", v.name))?;
        let state = h["state"].as_str().unwrap_or("");
        if h["addr"] != v.addr.to_string() || !["alive", "suspect"].contains(&state) {
            return Err(format!("{at} lists {h}"));
        }
    }
    if state_of(&list, "insider").as_deref() != Some("alive") {
        return Err(format!("{at} does not hold the insider alive: {list:?}"));
    }
    Ok(list
        .iter()
        .filter_map(|h| {
            let name = h["name"].as_str()?;
            name.starts_with("ghost-").then(|| {
                (
                    name.to_string(),
                    h["state"].as_str().unwrap_or("").to_string(),
                )
            })
        })
        .collect())
}

/// An insider speaking SWIM itself, over the QUIC datagrams of its own connections, as a
/// live member of a fleet of three:
/// 1. it cannot move an honest member (to its own address or another), renew it, or give
///    its address to another name;
/// 2. its flood of invented members stops at the per-sender cap, and once they are found
///    dead the fleet dials them only as SWIM announces to the dead (a stated bound), each
///    address backed off as `peers::Backoff` says;
/// 3. its forged deaths kill no one, and its requests make no agent send to a stranger:
///    (a) at incarnations near the victim's own and far above it, then (b) at the last
///    incarnation, `u16::MAX`, which no member could refute if it were believed (hearsay
///    incarnations are capped: `membership::MAX_INCARNATION_STEP`).
///
/// Addresses: agents at 127.77.8.1-3, the insider at .200; at .201 (where it moves
/// members) and .250 (its stranger), and at the invented members' addresses in
/// 127.77.9.0/24, only the test's own silent sockets, which count what arrives.
#[test]
fn an_insider_cannot_bend_membership() {
    use foca::{Member, Message, State};
    use shoal_agent::mesh::membership::{self, MAX_UNCONFIRMED_PER_SENDER, MemberId};
    use shoal_agent::mesh::node::HANDSHAKE_DEADLINE;
    use shoal_agent::mesh::peers::{FIRST_BACKOFF, GIVE_UP_AFTER};
    use std::collections::{BTreeMap, BTreeSet, HashMap};
    use std::net::SocketAddr;

    /// How long the dials to the invented members are counted, early and late.
    const WINDOW: Duration = Duration::from_secs(10);
    const INVENTED: usize = 500;
    let test_started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new(tmp.path(), "fleet");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let addr = |s: &str| -> SocketAddr { s.parse().unwrap() };
    let insider_addr = addr("127.77.8.200:7400");
    let elsewhere = addr("127.77.8.201:7400");
    let stranger = MemberId {
        name: "stranger".into(),
        addr: addr("127.77.8.250:7400"),
        bump: 0,
    };
    let ghost = |i: usize| MemberId {
        name: format!("ghost-{i}"),
        addr: SocketAddr::from(([127, 77, 9, (i % 250) as u8 + 1], 7400 + (i / 250) as u16)),
        bump: 0,
    };
    let ghosts: HashMap<SocketAddr, String> = (0..INVENTED)
        .map(|i| (ghost(i).addr, ghost(i).name))
        .collect();
    // Watched from before the fleet starts.
    let mut watched: Vec<SocketAddr> = ghosts.keys().copied().collect();
    watched.extend([elsewhere, stranger.addr]);
    let watch = Watch::bind(&rt, &watched);
    let hits_at = |to: SocketAddr| watch.hits().iter().filter(|h| h.to == to).count();

    let fleet = running_fleet(tmp.path(), &ca, [127, 77, 8], 3);
    let agents: Vec<SocketAddr> = fleet.iter().map(|a| a.addr).collect();
    let insider = SwimInsider::start(
        &rt,
        &ca,
        &tmp.path().join("insider"),
        "insider",
        insider_addr,
    );
    rt.block_on(async {
        for &a in &agents {
            insider.dial(a).await;
        }
    });
    wait_for("every agent to hold the insider alive", LONG, || {
        agents.iter().all(|&a| {
            if insider.peer(a).is_none() {
                insider.announce(a);
                return false;
            }
            state_at(a, &ca.operator, "insider").as_deref() == Some("alive")
        })
    });
    // The honest members' identities (with their bumps), from their own packets.
    let honest: Vec<MemberId> = agents.iter().map(|&a| insider.peer(a).unwrap().0).collect();
    for (v, a) in honest.iter().zip(&fleet) {
        assert_eq!((v.name.as_str(), v.addr), (a.name.as_str(), a.addr));
    }
    // What every agent lists (see `membership_at`; it panics if an honest member is dead,
    // left or elsewhere, or the insider is not alive): the invented members.
    let check = || -> Vec<Vec<(String, String)>> {
        agents
            .iter()
            .map(|&a| membership_at(a, &ca.operator, &honest).unwrap())
            .collect()
    };
    check();
    let joined = test_started.elapsed();

    // 1. Address take-over. Each honest member at the insider's address, moved elsewhere
    //    (in this life or its next), renewed in place, or its address given to "eve"; one
    //    lie a packet, five times over, to every agent.
    let ups_before = about_honest(&fleet, "member is alive").len();
    let lies = |v: &MemberId| {
        let next = v.bump.wrapping_add(1);
        [
            MemberId {
                addr: insider_addr,
                ..v.clone()
            },
            MemberId {
                addr: elsewhere,
                ..v.clone()
            },
            MemberId {
                addr: elsewhere,
                bump: next,
                ..v.clone()
            },
            MemberId {
                bump: next,
                ..v.clone()
            },
            MemberId {
                name: "eve".into(),
                bump: next,
                ..v.clone()
            },
        ]
        .map(Member::alive)
    };
    rt.block_on(async {
        for _ in 0..5 {
            for &a in &agents {
                for v in &honest {
                    for lie in lies(v) {
                        insider.say(a, Message::Gossip, &[lie]).await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        insider.barrier(&agents).await;
    });
    // Every honest member at its own address everywhere and not dead (`check`); nothing
    // at the other addresses, no "eve"; no honest member introduced anew (a move or a
    // renewal accepted would be a new identity, logged alive).
    check();
    for &a in &agents {
        let list = hosts(a, &ca.operator).unwrap();
        assert!(
            list.iter().all(|h| h["name"] != "eve"
                && h["addr"] != elsewhere.to_string()
                && (h["addr"] != insider_addr.to_string() || h["name"] == "insider")),
            "{a}: {list:?}"
        );
    }
    assert_eq!(
        about_honest(&fleet, "member is alive").len(),
        ups_before,
        "an honest member was introduced anew: {:#?}",
        about_honest(&fleet, "member is alive")
    );

    // 2. A flood of invented members at agent-1: 500 of them, ten a packet, four times over
    //    in 4 s. All enter the fleet through agent-1's cap on the insider, so no agent can
    //    list more than that cap of them (the others learn them only from agent-1).
    let flood_started = Instant::now();
    rt.block_on(async {
        let all: Vec<usize> = (0..INVENTED).collect();
        for _ in 0..4 {
            for chunk in all.chunks(10) {
                let updates: Vec<_> = chunk.iter().map(|&i| Member::alive(ghost(i))).collect();
                insider.say(agents[0], Message::Gossip, &updates).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        insider.barrier(&agents[..1]).await;
    });
    // Until every agent holds every invented member it lists dead (each is probed in
    // turn, fails, and is declared dead everywhere), `check` each agent.
    let mut held_max = [0usize; 3];
    let mut listed: BTreeSet<String> = BTreeSet::new();
    let mut timeline = Vec::new();
    wait_for(
        "every agent to hold every invented member dead",
        Duration::from_secs(120),
        || {
            let members = check();
            let mut living = [0usize; 3];
            for (k, invented) in members.iter().enumerate() {
                held_max[k] = held_max[k].max(invented.len());
                listed.extend(invented.iter().map(|(n, _)| n.clone()));
                living[k] = invented.iter().filter(|(_, s)| s != "dead").count();
            }
            timeline.push((flood_started.elapsed().as_secs(), living));
            std::thread::sleep(Duration::from_millis(500));
            living.iter().all(|n| *n == 0)
        },
    );
    let dead_at = Instant::now();
    // The late window opens a handshake deadline later: a dial asked for before may still
    // wait for one of an agent's dial slots.
    let late = (
        dead_at + HANDSHAKE_DEADLINE,
        dead_at + HANDSHAKE_DEADLINE + WINDOW,
    );

    // 3a. Meanwhile (3 s), forged deaths of every honest member, to every other agent, at
    //     the victim's incarnation, one and ten above it, and 1000; and requests to ping a
    //     stranger (`PingReq`) and to pass it an ack (`IndirectAck`).
    let mut forged = 0;
    rt.block_on(async {
        let mut round = 0usize;
        while dead_at.elapsed() < Duration::from_secs(3) {
            for &a in &agents {
                for v in honest.iter().filter(|v| v.addr != a) {
                    let (_, now) = insider.peer(v.addr).unwrap();
                    let incarnation =
                        [now, now.saturating_add(1), now.saturating_add(10), 1000][round % 4];
                    let death = Member::new(v.clone(), incarnation, State::Down);
                    insider.say(a, Message::Gossip, &[death]).await;
                    forged += 1;
                }
                let probe_number = round as u8;
                for message in [
                    Message::PingReq {
                        target: stranger.clone(),
                        probe_number,
                    },
                    Message::IndirectAck {
                        target: stranger.clone(),
                        probe_number,
                    },
                ] {
                    insider.say(a, message, &[]).await;
                }
            }
            round += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        insider.barrier(&agents).await;
    });
    // Watched until the late window closes (about 12 s more; an agent's own check of a
    // reported death takes 0.5 s, a suspicion 1 s).
    while Instant::now() < late.1 {
        check();
        std::thread::sleep(Duration::from_millis(200));
    }

    let dials: Vec<Hit> = watch
        .dials()
        .into_iter()
        .filter(|d| ghosts.contains_key(&d.to) && agents.contains(&d.from))
        .collect();
    let packets = watch
        .hits()
        .iter()
        .filter(|h| ghosts.contains_key(&h.to))
        .count();
    let between =
        |from: Instant, to: Instant| dials.iter().filter(|d| d.at >= from && d.at < to).count();
    let early = between(flood_started, flood_started + WINDOW);
    let late_dials = between(late.0, late.1);
    // After their death, the only sends to invented members are SWIM's announces to the
    // dead: each agent, to `num_members` of them every `frequency`; at most one round more
    // than fit in the window (its timers drift), each send at most one dial.
    let announce = membership::config(64, membership::FORGET_DOWN_AFTER)
        .periodic_announce_to_down_members
        .unwrap();
    let rounds = (WINDOW.as_secs_f64() / announce.frequency.as_secs_f64()) as usize + 1;
    let late_bound = agents.len() * announce.num_members.get() * rounds;
    let mut by_5s: BTreeMap<u64, usize> = BTreeMap::new();
    for d in &dials {
        *by_5s
            .entry(d.at.saturating_duration_since(flood_started).as_secs() / 5 * 5)
            .or_default() += 1;
    }
    let mut per_pair: BTreeMap<(SocketAddr, SocketAddr), Vec<Instant>> = BTreeMap::new();
    for d in &dials {
        per_pair.entry((d.from, d.to)).or_default().push(d.at);
    }
    // The k-th failure in a row of a dial (after its handshake deadline) waits
    // FIRST_BACKOFF * 2^(k-1) before the next; 0.5 s for the test's own timing.
    let slack = Duration::from_millis(500);
    let mut tightest = Duration::MAX;
    for ((from, to), times) in &per_pair {
        assert!(
            times.len() <= GIVE_UP_AFTER as usize,
            "{from} dialled {to} {} times",
            times.len()
        );
        for (k, w) in times.windows(2).enumerate() {
            let least = HANDSHAKE_DEADLINE + FIRST_BACKOFF * 2u32.pow(k as u32);
            let gap = w[1] - w[0];
            tightest = tightest.min(gap.saturating_sub(least));
            assert!(
                gap + slack >= least,
                "{from} dialled {to} again {gap:?} after its failure #{} (at least {least:?})",
                k + 1
            );
        }
    }
    eprintln!(
        "joined after {joined:?}; invented members listed at most {held_max:?} (agent-1, 2, \
         3), {} different in all; still alive somewhere, by seconds after the flood began: \
         {timeline:?}; all dead {:?} after it began",
        listed.len(),
        dead_at - flood_started,
    );
    eprintln!(
        "dials to invented members: {} ({packets} packets) in all, from {} (agent, address) \
         pairs, at most {} a pair, gaps at least {tightest:?} beyond the back-off; {early} in \
         the first {WINDOW:?} of the flood, {late_dials} in {WINDOW:?} from {:?} after all \
         were dead (bound {late_bound}); by 5 s since the flood began: {by_5s:?}",
        dials.len(),
        per_pair.len(),
        per_pair.values().map(Vec::len).max().unwrap_or(0),
        HANDSHAKE_DEADLINE,
    );
    assert_eq!(
        held_max[0], MAX_UNCONFIRMED_PER_SENDER,
        "the flooded agent took the insider's invented members up to the cap"
    );
    assert!(
        held_max.iter().all(|&n| n <= MAX_UNCONFIRMED_PER_SENDER)
            && listed.len() <= MAX_UNCONFIRMED_PER_SENDER,
        "invented members listed: at most {held_max:?} by one agent, {} in all",
        listed.len()
    );
    let unlisted: Vec<_> = watch
        .hits()
        .into_iter()
        .filter(|h| ghosts.get(&h.to).is_some_and(|name| !listed.contains(name)))
        .map(|h| h.to)
        .collect();
    assert!(
        unlisted.is_empty(),
        "invented members over the cap were sent to: {unlisted:?}"
    );
    for name in &listed {
        assert!(
            dials.iter().any(|d| ghosts[&d.to] == *name),
            "{name} was listed and never dialled: is the watch deaf?"
        );
    }
    assert!(
        late_dials <= late_bound,
        "{late_dials} dials to dead invented members in {WINDOW:?} (bound {late_bound}), \
         {early} in the first {WINDOW:?}"
    );
    // 3a (and all before): no honest member died or was made to rejoin; nothing went to
    // the stranger (nor to where the take-over would have moved members).
    eprintln!("forged {forged} deaths at ordinary incarnations");
    // An agent told it is dead (by the agent that declared it so) renews itself and says
    // so: `rejoined`, logged a moment before the death may be.
    let rejoins = |fleet: &[fleet::Agent]| -> Vec<String> {
        fleet
            .iter()
            .flat_map(|a| {
                a.log_text()
                    .lines()
                    .filter(|l| l.contains("rejoined"))
                    .map(|l| format!("{}: {l}", a.name))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let (dead, rejoined) = (about_honest(&fleet, "member is dead"), rejoins(&fleet));
    assert!(
        dead.is_empty() && rejoined.is_empty(),
        "honest members declared dead: {dead:#?}; agents made to rejoin: {rejoined:#?}"
    );
    assert_eq!(hits_at(stranger.addr), 0, "packets to the stranger");
    assert_eq!(hits_at(elsewhere), 0, "packets to {elsewhere}");
    assert_eq!(insider.turned_undead(), 0, "the insider stayed a member");

    // 3b. Forged deaths at the last incarnation, ten rounds in 1 s; watched 5 s more, and
    //     if an agent lists an honest member otherwise than alive or suspect at its
    //     address, until none does (30 s at most), to tell how long that lasts.
    rt.block_on(async {
        for _ in 0..10 {
            for &a in &agents {
                for v in honest.iter().filter(|v| v.addr != a) {
                    let death = Member::new(v.clone(), u16::MAX, State::Down);
                    insider.say(a, Message::Gossip, &[death]).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        insider.barrier(&agents).await;
    });
    let last_forged = Instant::now();
    let mut listed_dead = Vec::new();
    let (mut polls, mut last_wrong) = (0, None);
    loop {
        let mut wrong = false;
        for &a in &agents {
            polls += 1;
            if let Err(e) = membership_at(a, &ca.operator, &honest) {
                listed_dead.push(format!("{:?}: {e}", last_forged.elapsed()));
                wrong = true;
            }
        }
        if wrong {
            last_wrong = Some(last_forged.elapsed());
        }
        let elapsed = last_forged.elapsed();
        if elapsed >= Duration::from_secs(30) || (elapsed >= Duration::from_secs(5) && !wrong) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let (dead, rejoined) = (about_honest(&fleet, "member is dead"), rejoins(&fleet));
    eprintln!("test took {:?}", test_started.elapsed());
    assert!(
        listed_dead.is_empty() && dead.is_empty() && rejoined.is_empty(),
        "forged deaths at incarnation {}: {} of {polls} answers of `shoal hosts` listed an \
         honest member otherwise than alive or suspect at its address, the last {:?} after \
         the last forgery (watched {:?}), first {:#?}; deaths logged: {dead:#?}; agents made \
         to rejoin: {rejoined:#?}",
        u16::MAX,
        listed_dead.len(),
        last_wrong,
        last_forged.elapsed(),
        listed_dead.first(),
    );
}
