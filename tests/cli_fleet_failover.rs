//! Fleet deployments through a coordinator's failure, with real `shoal agent` processes on
//! 127.81.x.y:
//! - the coordinator (the deployment log's leader) is killed with `kill -9` in the middle
//!   of a OneAtATime deployment, twice: another agent takes over from the log, the
//!   deployment ends Succeeded, and every target host ran its lifecycle exactly once (its
//!   deployment records on disk are counted, not what the log says);
//! - in a network namespace of the test's own, the coordinator and one other agent are
//!   cut off from the three targets: the minority side says it has no majority and its
//!   view stops changing, the majority elects a new coordinator that finishes the
//!   deployment, and after the cut heals the minority shows the same end.
//!
//! The revision's ValidateService hook is the sandbox-probe guest, which sleeps
//! `probe-sleep` seconds on a host with that tag, so each host's run lasts long enough to
//! be interrupted.

#[path = "support/fleet.rs"]
mod fleet;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fleet::{
    Agent, Ca, Netns, agents, create, hosts_in, in_netns, installed, json, revision, status, tag,
    wait_for,
};

const LONG: Duration = Duration::from_secs(60);
/// How long the watchers wait for one answer before they ask again.
const ASK_WITHIN: Duration = Duration::from_secs(4);

/// `status`, given up after `limit` (the CLI is killed): an agent asked just after the
/// coordinator died may wait on the dead one for a long while before it answers.
fn status_within(
    peer: &Agent,
    operator: &Path,
    id: &str,
    limit: Duration,
) -> Result<serde_json::Value, String> {
    let mut child = in_netns(peer.netns.as_deref())
        .args(["deploy", "status", id, "--json", "--peer"])
        .arg(peer.addr.to_string())
        .arg("--identity")
        .arg(operator)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let until = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("no answer within {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = child.wait_with_output().unwrap();
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr).into_owned());
    }
    serde_json::from_slice(&o.stdout).map_err(|e| e.to_string())
}

/// Every host's status in a view, by name.
fn host_statuses(view: &serde_json::Value) -> BTreeMap<String, String> {
    view["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["name"].as_str().unwrap().to_string(),
                h["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn count(view: &serde_json::Value, status: &str) -> usize {
    host_statuses(view)
        .values()
        .filter(|s| *s == status)
        .count()
}

/// The deployment records the lifecycle wrote on `agent`'s host for `tiny`: one
/// `<id>.json` per run of the lifecycle (`lifecycle::state::AppDir::deployments`; the hook
/// logs of a run are a directory beside it, not counted).
fn records(agent: &Agent) -> usize {
    let dir = agent.data_dir.join("apps/tiny/deployments");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .count()
}

/// Whether `peer` lists `n` hosts, all alive, `voters` of which say they are voters of the
/// deployment log.
fn settled(peer: &Agent, operator: &Path, n: usize, voters: usize) -> bool {
    hosts_in(peer.netns.as_deref(), peer.addr, operator).is_ok_and(|l| {
        l.len() == n
            && l.iter().all(|h| h["state"] == "alive")
            && l.iter().filter(|h| h["log"]["voter"] == true).count() == voters
    })
}

/// The `--targets` that picks exactly these hosts by their `host` tag.
fn by_host(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("host={n}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn a_killed_coordinator_is_replaced_and_every_host_is_deployed_exactly_once() {
    let began = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new(tmp.path(), "fleet");
    let mut fleet = agents(tmp.path(), &ca, [127, 81, 1], 6);
    for (i, a) in fleet.iter_mut().enumerate() {
        let name = a.name.clone();
        let role = if i < 2 { "db" } else { "web" };
        tag(a, &[("role", role), ("host", &name), ("probe-sleep", "1")]);
        a.start();
    }
    wait_for("agent-6 to see all six alive", LONG, || {
        settled(&fleet[5], &ca.operator, 6, 0)
    });
    // Runs of the lifecycle each host should have had, kept as the test goes.
    let mut expected: BTreeMap<String, usize> = fleet.iter().map(|a| (a.name.clone(), 0)).collect();

    // The first deployment founds the log at agent-1, which leads it; the db hosts take it.
    let v0 = revision(tmp.path(), "v0");
    let founded = json(
        &create(
            &fleet[0],
            &ca.operator,
            &v0,
            &["--targets", "role=db", "--config", "AllAtOnce", "--wait"],
        ),
        "the founding deployment",
    );
    assert_eq!(founded["status"], "Succeeded", "{founded}");
    assert_eq!(founded["coordinator"], "agent-1", "{founded}");
    for name in ["agent-1", "agent-2"] {
        *expected.get_mut(name).unwrap() += 1;
    }
    let mut last_id = founded["id"].as_str().unwrap().to_string();
    // Five voters, so that the log keeps a majority when one dies.
    let took = wait_for("the log to have five voters", LONG, || {
        settled(&fleet[5], &ca.operator, 6, 5)
    });
    eprintln!("five voters {took:?} after the founding deployment ended");

    // Agents killed and started again: they may still be rejoining, so they are neither
    // asked nor targeted afterwards (only killed again if they come to lead).
    let mut restarted: BTreeSet<usize> = BTreeSet::new();
    for round in 1..=2 {
        // Who coordinates now: the leader, as any agent's answer names it.
        let asked = (0..fleet.len())
            .find(|i| !restarted.contains(i))
            .expect("agents run");
        let leader = status(&fleet[asked], &ca.operator, &last_id).unwrap()["coordinator"]
            .as_str()
            .unwrap()
            .to_string();
        let leader_at = fleet.iter().position(|a| a.name == leader).unwrap();
        // Round 1: the web hosts (agent-1, a db host, leads). Round 2: the four hosts that
        // neither lead nor were restarted, named one by one. Either way the coordinator is
        // not a target, so killing it interrupts no host's run; a target that becomes
        // coordinator after the kill commands itself.
        let (targets, names): (String, Vec<String>) = if round == 1 {
            assert_eq!(leader, "agent-1", "the founder still leads");
            (
                "role=web".into(),
                fleet[2..].iter().map(|a| a.name.clone()).collect(),
            )
        } else {
            let names: Vec<String> = (0..fleet.len())
                .filter(|i| *i != leader_at && !restarted.contains(i))
                .map(|i| fleet[i].name.clone())
                .collect();
            (by_host(&names), names)
        };
        assert_eq!(names.len(), 4, "{names:?}");
        let targeted: BTreeSet<&str> = names.iter().map(|n| n.as_str()).collect();
        // Asked of an agent that neither leads nor is a target if there is one, else of a
        // target; watched from another agent that does not lead.
        let candidates = || (0..fleet.len()).filter(|i| *i != leader_at && !restarted.contains(i));
        let via = candidates()
            .find(|&i| !targeted.contains(fleet[i].name.as_str()))
            .unwrap_or_else(|| candidates().next().unwrap());
        let watcher = candidates().find(|&i| i != via).unwrap();
        let payload = format!("v{round}");
        let bundle = revision(tmp.path(), &payload);
        let accepted = json(
            &create(
                &fleet[via],
                &ca.operator,
                &bundle,
                &["--targets", &targets, "--config", "OneAtATime"],
            ),
            "deploy create",
        );
        let id = accepted["id"].as_str().unwrap().to_string();
        let hosts: BTreeSet<String> = host_statuses(&accepted).into_keys().collect();
        assert_eq!(
            hosts,
            names.iter().cloned().collect::<BTreeSet<_>>(),
            "round {round}: {accepted}"
        );

        // Once a host has succeeded, the coordinator dies without a word.
        let mut seen = serde_json::Value::Null;
        wait_for("the first host to succeed", LONG, || {
            status(&fleet[watcher], &ca.operator, &id).is_ok_and(|v| {
                let done = count(&v, "Succeeded") >= 1;
                seen = v;
                done
            })
        });
        let victim = seen["coordinator"].as_str().unwrap().to_string();
        assert!(
            !targeted.contains(victim.as_str()),
            "round {round}: the coordinator {victim} became a target"
        );
        let victim_at = fleet.iter().position(|a| a.name == victim).unwrap();
        assert_ne!(victim_at, watcher);
        let before = host_statuses(&seen);
        let killed = Instant::now();
        fleet[victim_at].kill();
        eprintln!(
            "round {round}: killed the coordinator {victim} with hosts {before:?}, {:?} into \
             the test",
            began.elapsed()
        );

        // Watched from a survivor until it ends.
        let mut coordinators = BTreeSet::new();
        let mut progress: Option<Duration> = None;
        let mut errors = Vec::new();
        let mut last = serde_json::Value::Null;
        wait_for(
            "the deployment to end after the failover",
            LONG,
            || match status_within(&fleet[watcher], &ca.operator, &id, ASK_WITHIN) {
                Ok(v) => {
                    if let Some(c) = v["coordinator"].as_str() {
                        coordinators.insert(c.to_string());
                    }
                    if progress.is_none() && host_statuses(&v) != before {
                        progress = Some(killed.elapsed());
                    }
                    let ended = !matches!(v["status"].as_str(), Some("InProgress" | "Created"));
                    last = v;
                    ended
                }
                Err(e) => {
                    errors.push(e);
                    false
                }
            },
        );
        eprintln!(
            "round {round}: ended {:?} after the kill (first progress seen after {progress:?}), \
             coordinators {coordinators:?}, {} status errors meanwhile: {errors:?}",
            killed.elapsed(),
            errors.len()
        );
        assert_eq!(last["status"], "Succeeded", "round {round}: {last}");
        let coordinator = last["coordinator"].as_str().unwrap();
        assert_ne!(coordinator, victim, "round {round}: {last}");
        assert!(
            !coordinators.contains(&victim),
            "round {round}: the dead {victim} was named coordinator after its death: {coordinators:?}"
        );
        for (name, status) in host_statuses(&last) {
            assert_eq!(status, "Succeeded", "round {round}: {name}: {last}");
        }

        // Exactly once: each target ran the lifecycle once more, and nobody else did.
        for name in &names {
            *expected.get_mut(name).unwrap() += 1;
        }
        for a in &fleet {
            assert_eq!(
                records(a),
                expected[&a.name],
                "round {round}: deployment records on {} (expected {expected:?})",
                a.name
            );
            if targeted.contains(a.name.as_str()) {
                assert_eq!(
                    installed(a).as_deref(),
                    Some(payload.as_str()),
                    "{}",
                    a.name
                );
            }
        }

        // The dead agent comes back (as itself: same data, same place in the log) while the
        // next round goes on.
        fleet[victim_at].start();
        restarted.insert(victim_at);
        last_id = id;
    }
    for &i in &restarted {
        assert!(
            fleet[i]
                .child
                .as_mut()
                .unwrap()
                .try_wait()
                .unwrap()
                .is_none(),
            "{} exited after its restart",
            fleet[i].name
        );
    }
    eprintln!("the test took {:?}", began.elapsed());
}

/// A cut inside a network namespace of the test's own: every agent on 127.81.2.x, the
/// sides chosen by blackhole rules once the leader is known.
#[test]
fn a_minority_coordinator_makes_no_progress_and_the_majority_finishes() {
    let ns_name = format!("shoal-failover-{}", std::process::id());
    let setup = || -> Result<Netns, String> {
        if Command::new("ip").arg("-V").output().is_err() {
            return Err("`ip` (iproute2) is not installed".into());
        }
        let ns = Netns::create(&ns_name)?;
        // Let rules placed before the local table decide what reaches local addresses.
        ns.run("ip rule del pref 0 && ip rule add pref 100 lookup local")?;
        Ok(ns)
    };
    let ns = match setup() {
        Ok(ns) => ns,
        Err(why) => {
            eprintln!(
                "SKIPPED a_minority_coordinator_makes_no_progress_and_the_majority_finishes: \
                 cannot make a network namespace: {why}"
            );
            return;
        }
    };
    let began = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new(tmp.path(), "fleet");
    let mut fleet = agents(tmp.path(), &ca, [127, 81, 2], 5);
    for a in fleet.iter_mut() {
        let name = a.name.clone();
        tag(a, &[("host", &name), ("probe-sleep", "2")]);
        a.netns = Some(ns_name.clone());
        a.start();
    }
    wait_for("all five to see all five alive", LONG, || {
        fleet.iter().all(|a| settled(a, &ca.operator, 5, 0))
    });
    // Found the log (at agent-1) with a first deployment, to agent-1 alone; wait for five
    // voters.
    let v0 = revision(tmp.path(), "v0");
    let founded = json(
        &create(
            &fleet[0],
            &ca.operator,
            &v0,
            &[
                "--targets",
                "host=agent-1",
                "--config",
                "AllAtOnce",
                "--wait",
            ],
        ),
        "the founding deployment",
    );
    assert_eq!(founded["status"], "Succeeded", "{founded}");
    wait_for("the log to have five voters", LONG, || {
        settled(&fleet[4], &ca.operator, 5, 5)
    });
    let founding = founded["id"].as_str().unwrap();
    let leader = status(&fleet[4], &ca.operator, founding).unwrap()["coordinator"]
        .as_str()
        .unwrap()
        .to_string();

    // The sides: the leader and one other (the minority), and the three targets.
    let leader_at = fleet.iter().position(|a| a.name == leader).unwrap();
    let mut minority = vec![leader_at];
    minority.push((0..5).find(|&i| i != leader_at).unwrap());
    let majority: Vec<usize> = (0..5).filter(|i| !minority.contains(i)).collect();
    let targets: Vec<String> = majority.iter().map(|&i| fleet[i].name.clone()).collect();
    let (far, near) = (minority[1], majority[0]);
    eprintln!(
        "minority: {leader} (coordinator) and {}; majority and targets: {targets:?}",
        fleet[far].name
    );

    // Created through a target, so the bundle is held on the majority's side.
    let bundle = revision(tmp.path(), "v1");
    let accepted = json(
        &create(
            &fleet[majority[2]],
            &ca.operator,
            &bundle,
            &["--targets", &by_host(&targets), "--config", "OneAtATime"],
        ),
        "deploy create",
    );
    let id = accepted["id"].as_str().unwrap().to_string();
    assert_eq!(accepted["coordinator"], leader.as_str(), "{accepted}");
    wait_for("a host to be deploying", LONG, || {
        status(&fleet[far], &ca.operator, &id).is_ok_and(|v| count(&v, "InProgress") == 1)
    });

    // The cut: nothing passes between the sides.
    let addr = |i: usize| -> SocketAddr { fleet[i].addr };
    let mut rules = Vec::new();
    let mut pref = 10;
    for &a in &minority {
        for &b in &majority {
            rules.push(format!(
                "ip rule add pref {pref} from {} to {} blackhole && \
                 ip rule add pref {} from {} to {} blackhole",
                addr(a).ip(),
                addr(b).ip(),
                pref + 1,
                addr(b).ip(),
                addr(a).ip()
            ));
            pref += 2;
        }
    }
    ns.run(&rules.join(" && ")).unwrap();
    let cut = Instant::now();
    eprintln!("cut {:?} into the test", began.elapsed());

    // The minority knows it has no majority, says so, and its view stops.
    let mut frozen: Option<serde_json::Value> = None;
    let took = wait_for("the minority to warn that it has no majority", LONG, || {
        status(&fleet[far], &ca.operator, &id).is_ok_and(|v| {
            let warned = v["warning"]
                .as_str()
                .is_some_and(|w| w.contains("majority"));
            if warned {
                frozen = Some(v);
            }
            warned
        })
    });
    let frozen = frozen.unwrap();
    eprintln!(
        "the minority warned {took:?} after the cut: {}",
        frozen["warning"]
    );
    assert_eq!(frozen["status"], "InProgress", "{frozen}");

    // The majority elects another coordinator, which finishes the deployment.
    let mut last = serde_json::Value::Null;
    let mut errors = 0;
    let took = wait_for(
        "the majority to finish the deployment",
        LONG,
        || match status_within(&fleet[near], &ca.operator, &id, ASK_WITHIN) {
            Ok(v) => {
                let ended = !matches!(v["status"].as_str(), Some("InProgress" | "Created"));
                last = v;
                ended
            }
            Err(_) => {
                errors += 1;
                false
            }
        },
    );
    eprintln!("the majority finished {took:?} after the cut ({errors} status errors meanwhile)");
    assert_eq!(last["status"], "Succeeded", "{last}");
    assert!(last["warning"].is_null(), "{last}");
    let coordinator = last["coordinator"].as_str().unwrap().to_string();
    assert!(
        targets.contains(&coordinator),
        "the new coordinator {coordinator} is on the majority's side: {last}"
    );
    for (name, status) in host_statuses(&last) {
        assert_eq!(status, "Succeeded", "{name}: {last}");
    }

    // Still cut off, the minority has seen none of it: still warning, same hosts.
    let view = status(&fleet[far], &ca.operator, &id).unwrap();
    assert!(view["warning"].is_string(), "{view}");
    assert_eq!(view["status"], "InProgress", "{view}");
    assert_eq!(
        host_statuses(&view),
        host_statuses(&frozen),
        "the minority's view moved while it had no majority"
    );
    let view = status(&fleet[leader_at], &ca.operator, &id).unwrap();
    assert!(view["warning"].is_string(), "{view}");
    assert_eq!(
        host_statuses(&view),
        host_statuses(&frozen),
        "the old coordinator's view moved"
    );

    // Healed: the minority comes to the same end, from either of its agents.
    let mut heal = Vec::new();
    for p in 10..pref {
        heal.push(format!("ip rule del pref {p}"));
    }
    ns.run(&heal.join(" && ")).unwrap();
    let healed = Instant::now();
    for &i in &minority {
        let mut seen = serde_json::Value::Null;
        let took = wait_for("the minority to catch up", LONG, || {
            status_within(&fleet[i], &ca.operator, &id, 2 * ASK_WITHIN).is_ok_and(|v| {
                let done = v["status"] == "Succeeded" && v["warning"].is_null();
                seen = v;
                done
            })
        });
        eprintln!(
            "{} caught up {took:?} ({:?} after the heal)",
            fleet[i].name,
            healed.elapsed()
        );
        assert_eq!(host_statuses(&seen), host_statuses(&last));
        assert_eq!(seen["coordinator"], last["coordinator"], "{seen}");
    }
    // Each target ran this deployment once; the minority's agents ran nothing new.
    for (i, a) in fleet.iter().enumerate() {
        let runs = usize::from(a.name == "agent-1") + usize::from(majority.contains(&i));
        assert_eq!(records(a), runs, "deployment records on {}", a.name);
    }
    eprintln!(
        "the cut lasted {:?}; the test took {:?}",
        healed.duration_since(cut),
        began.elapsed()
    );
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

/// One request a webhook receiver took: its headers (lower-cased names) and body.
#[derive(Clone, Debug)]
struct Delivery {
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

/// A webhook receiver on 127.0.0.1 that answers 200 to everything and keeps what came.
struct Receiver {
    port: u16,
    got: std::sync::Arc<std::sync::Mutex<Vec<Delivery>>>,
}

impl Receiver {
    fn start() -> Receiver {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let keep = got.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let mut headers = BTreeMap::new();
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                        break;
                    }
                    if let Some((k, v)) = h.split_once(':') {
                        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                    }
                }
                let len: usize = headers
                    .get("content-length")
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(0);
                let mut body = vec![0; len.min(1 << 20)];
                if reader.read_exact(&mut body).is_err() {
                    continue;
                }
                keep.lock().unwrap().push(Delivery { headers, body });
                let mut s = stream;
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
            }
        });
        Receiver { port, got }
    }

    /// The deliveries of deployment `id`, by their event.
    fn of(&self, id: &str) -> Vec<(String, Delivery)> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter_map(|d| {
                let v: serde_json::Value = serde_json::from_slice(&d.body).ok()?;
                (v["deployment"] == id)
                    .then(|| (v["event"].as_str().unwrap().to_string(), d.clone()))
            })
            .collect()
    }
}

/// HMAC-SHA256, written out from RFC 2104 on `sha2`, to check the agent's signatures
/// with code that is not the agent's.
fn hmac_sha256(key: &[u8], message: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    let outer = Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize();
    format!("sha256={}", hex::encode(outer))
}

#[test]
fn webhooks_get_each_event_once_signed_also_when_the_coordinator_is_killed_between_two() {
    const SECRET: &str = "a-webhook-secret-of-the-test";
    let receiver = Receiver::start();
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new(tmp.path(), "fleet");
    let mut fleet = agents(tmp.path(), &ca, [127, 81, 3], 3);
    for a in fleet.iter_mut() {
        let name = a.name.clone();
        tag(a, &[("role", "web"), ("host", &name)]);
        // Every agent may come to coordinate: each names the same webhook.
        let mut config = std::fs::read_to_string(&a.config).unwrap();
        config.push_str(&format!(
            "\n[[webhooks]]\nurl = \"http://127.0.0.1:{}/hooks/shoal\"\nsecret = \"{SECRET}\"\n",
            receiver.port
        ));
        std::fs::write(&a.config, config).unwrap();
        a.start();
    }
    wait_for("three agents alive", LONG, || {
        settled(&fleet[2], &ca.operator, 3, 0)
    });
    let targets = ["--targets", "role=web", "--config", "AllAtOnce"];
    let v1 = revision(tmp.path(), "v1");
    let first = json(
        &create(
            &fleet[0],
            &ca.operator,
            &v1,
            &[&targets[..], &["--wait"]].concat(),
        ),
        "v1",
    );
    let d1 = first["id"].as_str().unwrap().to_string();
    wait_for("v1's start and success delivered", LONG, || {
        receiver.of(&d1).len() >= 2
    });
    wait_for("the log to have three voters", LONG, || {
        settled(&fleet[2], &ca.operator, 3, 3)
    });

    // v2: a canary of one host, then a bake; the coordinator is killed while it bakes,
    // after `start` was delivered and recorded, before `success`. The coordinator (the
    // log's leader, agent-1 unless an election came between) is not a target: a canary
    // host that dies while it bakes trips the deployment's health gate (rightly: it fails
    // and rolls back), and whether the mesh declared it dead before the bake's end would
    // be a race. Uploaded to a target, so that the revision outlives the coordinator.
    let mut leader = String::new();
    wait_for("the log's leader to be known", LONG, || {
        status(&fleet[1], &ca.operator, &d1).is_ok_and(|v| {
            leader = v["coordinator"].as_str().unwrap_or("").to_string();
            !leader.is_empty()
        })
    });
    let others: Vec<String> = fleet
        .iter()
        .map(|a| a.name.clone())
        .filter(|n| *n != leader)
        .collect();
    let via = fleet.iter().position(|a| a.name == others[0]).unwrap();
    let v2 = revision(tmp.path(), "v2");
    let accepted = json(
        &create(
            &fleet[via],
            &ca.operator,
            &v2,
            &["--targets", &by_host(&others), "--canary", "50%:6s"],
        ),
        "v2",
    );
    let d2 = accepted["id"].as_str().unwrap().to_string();
    let mut coordinator = String::new();
    wait_for("v2 to bake with its start recorded", LONG, || {
        status(&fleet[via], &ca.operator, &d2).is_ok_and(|v| {
            coordinator = v["coordinator"].as_str().unwrap_or("").to_string();
            v["status"] == "Baking" && v["notified"] == serde_json::json!(["start"])
        })
    });
    assert!(
        !others.contains(&coordinator),
        "an election made {coordinator}, a target of v2, its coordinator: killing it \
         would test the health gate, not the hand-over"
    );
    let killed = fleet.iter().position(|a| a.name == coordinator).unwrap();
    fleet[killed].kill();
    let peer = (killed + 1) % 3;
    let mut done = serde_json::Value::Null;
    wait_for(
        "v2 to succeed under a new coordinator",
        Duration::from_secs(120),
        || {
            let r = status_within(&fleet[peer], &ca.operator, &d2, ASK_WITHIN);
            r.is_ok_and(|v| {
                assert!(
                    !["Failed", "Stopped"].contains(&v["status"].as_str().unwrap_or("")),
                    "v2 ended without success: {v}"
                );
                let ok = v["status"] == "Succeeded"
                    && v["notified"] == serde_json::json!(["start", "success"]);
                done = v;
                ok
            })
        },
    );
    assert_ne!(done["coordinator"], coordinator.as_str(), "{done}");

    // Each event once, in order, signed with the secret over the exact body.
    for (id, events) in [(&d1, ["start", "success"]), (&d2, ["start", "success"])] {
        let got = receiver.of(id);
        let names: Vec<&str> = got.iter().map(|(e, _)| e.as_str()).collect();
        assert_eq!(names, events, "deployment {id}");
        for (event, d) in &got {
            assert_eq!(d.headers["x-shoal-event"], *event);
            assert_eq!(d.headers["x-shoal-delivery"], format!("{id}/{event}"));
            assert_eq!(d.headers["content-type"], "application/json");
            assert_eq!(
                d.headers["x-shoal-signature"],
                hmac_sha256(SECRET.as_bytes(), &d.body),
                "{event} of {id}"
            );
            let body: serde_json::Value = serde_json::from_slice(&d.body).unwrap();
            assert_eq!(body["app"], "tiny");
        }
    }
    let total = receiver.got.lock().unwrap().len();
    assert_eq!(total, 4, "nothing else was sent");
}
