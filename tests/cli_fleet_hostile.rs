//! A compromised agent against a real host: an in-process agent with a valid agent
//! certificate of the fleet (the insider) joins a mesh of real `shoal agent` processes on
//! 127.83.1.x and commands a host directly, as a rogue coordinator would. The host checks
//! everything itself and refuses, with a reason: an intent signed by an agent, an unsigned
//! one, a forged one, one from a revoked operator, one from another fleet's operator, one
//! for hosts it is not, and a
//! genuine operator intent that the deployment log never started on this host (no
//! majority of the voters holds the entry its fence names). During a real deployment the
//! insider gossips that it holds the revision and serves another bundle's bytes: the host
//! refuses them, fetches from the uploader and installs the signed revision, once; the
//! deployment's own intent replayed with its real fence is answered with its outcome and
//! runs nothing, and with a fence the log never gave is refused. An agent's identity can
//! neither create a deployment through the CLI nor upload a bundle.

#[path = "support/fleet.rs"]
mod fleet;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fleet::{Ca, agents, hosts, shoal, wait_for};
use shoal_agent::blobs::{self, BundleStore};
use shoal_agent::bundle::RevisionId;
use shoal_agent::fleet::intent::{self, INTENT_CONTEXT, Intent, SignedIntent};
use shoal_agent::fleet::log::{Fence, Verdict};
use shoal_agent::fleet::plan::DeploymentConfig;
use shoal_agent::fleet::targets::Targets;
use shoal_agent::fleet::wire::{FleetRequest, HostAnswer, OperatorRequest, RunHost};
use shoal_agent::identity::sign::Signer;
use shoal_agent::identity::{Identity, Role};
use shoal_agent::mesh::frame::{Protocol, read_frame, write_frame};
use shoal_agent::mesh::node::{LocalState, Mesh, MeshHandle, NodeConfig};
use tokio::sync::watch;

const LONG: Duration = Duration::from_secs(60);

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A bundle of `tiny` with `payload`, packed: its path and revision.
fn bundle(root: &Path, payload: &str) -> (PathBuf, RevisionId) {
    let dir = root.join(format!("src-{payload}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("appspec.yml"),
        "version: 0.0\nos: linux\nfiles:\n  - source: payload.txt\n    destination: /srv/tiny\n",
    )
    .unwrap();
    std::fs::write(dir.join("payload.txt"), payload).unwrap();
    let out = root.join(format!("{payload}.tar.zst"));
    let id = shoal_agent::bundle::create(&dir, &out).unwrap();
    (out, id)
}

fn operator_intent(operator: &Identity, targets: &str, revision: &RevisionId) -> SignedIntent {
    let intent = Intent::new(
        "tiny",
        "tiny",
        Targets::parse(targets).unwrap(),
        revision,
        DeploymentConfig::AllAtOnce,
        &operator.name,
        now(),
    )
    .unwrap();
    intent::sign(&intent, operator).unwrap()
}

/// An operator's intent for `revision` on role=inference that consents to a rollback to
/// `rollback_to`.
fn consenting_intent(
    operator: &Identity,
    revision: &RevisionId,
    rollback_to: &RevisionId,
) -> SignedIntent {
    let intent = Intent::new(
        "tiny",
        "tiny",
        Targets::parse("role=inference").unwrap(),
        revision,
        DeploymentConfig::AllAtOnce,
        &operator.name,
        now(),
    )
    .unwrap()
    .with_rollback_to(Some(rollback_to.0.clone()))
    .unwrap();
    intent::sign(&intent, operator).unwrap()
}

/// Signs `intent` with any identity, bypassing `intent::sign`'s refusal of agents.
fn signed_by(identity: &Identity, intent: &Intent) -> SignedIntent {
    let body = serde_json::to_vec(intent).unwrap();
    let mut msg = INTENT_CONTEXT.to_vec();
    msg.extend_from_slice(&body);
    SignedIntent {
        signature: Signer::new(identity).unwrap().sign(&msg).unwrap(),
        cert: identity.cert.to_vec(),
        body,
    }
}

/// The insider: a real agent certificate of this fleet (issued under `dir`), its own mesh
/// node at `ip`:7400 seeded with `seed`, bound and not yet run.
fn insider_mesh(ca: &Ca, dir: &Path, ip: [u8; 4], seed: SocketAddr) -> Mesh {
    ca.issue("insider", &dir.join("identity"));
    let identity = Identity::load(&dir.join("identity")).unwrap();
    assert_eq!(identity.role, Role::Agent);
    let addr = SocketAddr::from((ip, 7400));
    Mesh::bind(
        NodeConfig {
            name: "insider".into(),
            listen: addr,
            advertise: addr,
            identity,
            seeds: vec![seed],
            data_dir: dir.join("data"),
            forget_dead_after: Duration::from_secs(3600),
        },
        LocalState::default(),
    )
    .unwrap()
}

/// The insider commands `host` and returns the host's last answer.
async fn command(
    insider: &MeshHandle,
    host: &str,
    intent: &SignedIntent,
    fence: Fence,
) -> HostAnswer {
    let id: Intent = serde_json::from_slice(&intent.body).unwrap();
    command_as(insider, host, intent, &id.id, fence, false).await
}

/// The insider commands `host` with `intent` under deployment id `deployment`, as its
/// rollback or not, and returns the host's last answer.
async fn command_as(
    insider: &MeshHandle,
    host: &str,
    intent: &SignedIntent,
    deployment: &str,
    fence: Fence,
    rollback: bool,
) -> HostAnswer {
    let cmd = RunHost {
        deployment: deployment.to_string(),
        intent: intent.clone(),
        fence,
        holders: Vec::new(),
        batch: Vec::new(),
        rollback,
        catch_up: None,
    };
    send_command(insider, host, cmd).await
}

/// The insider sends `cmd` to `host` and returns the host's last answer.
async fn send_command(insider: &MeshHandle, host: &str, cmd: RunHost) -> HostAnswer {
    let (mut send, mut recv) = insider.open_bi(host, Protocol::Fleet).await.unwrap();
    write_frame(&mut send, &FleetRequest::RunHost(cmd))
        .await
        .unwrap();
    send.finish().unwrap();
    // Started and the events as they go, then how it ended.
    loop {
        let answer: HostAnswer = tokio::time::timeout(LONG, read_frame(&mut recv))
            .await
            .unwrap()
            .unwrap();
        if !matches!(answer, HostAnswer::Started | HostAnswer::Progress(_)) {
            return answer;
        }
    }
}

fn refused(answer: &HostAnswer, why: &str) {
    match answer {
        HostAnswer::Refused(refusal) => {
            assert!(refusal.reason.contains(why), "refused, but: {refusal}")
        }
        other => panic!("not refused ({why}): {other:?}"),
    }
}

fn records(data_dir: &Path) -> usize {
    std::fs::read_dir(data_dir.join("apps/tiny/deployments"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rogue_coordinator_cannot_make_a_host_run_what_no_operator_signed() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new(tmp.path(), "fleet");
    let other_ca = Ca::new(tmp.path(), "other");
    let mut fleet = agents(tmp.path(), &ca, [127, 83, 1], 2);
    for a in fleet.iter_mut() {
        a.start();
    }
    let operator = Identity::load(&ca.operator).unwrap();
    let stranger = Identity::load(&other_ca.operator).unwrap();

    // The insider: a real agent certificate of this fleet, its own mesh and bundle store.
    let insider_dir = tmp.path().join("insider");
    let mesh = insider_mesh(&ca, &insider_dir, [127, 83, 1, 200], fleet[0].addr);
    let insider_identity = Identity::load(&insider_dir.join("identity")).unwrap();
    let insider = mesh.handle();
    let store = Arc::new(BundleStore::new(&insider_dir.join("data")));
    tokio::spawn(blobs::serve(
        blobs::Serving::new(store.clone(), &insider_dir.join("data")).unwrap(),
        insider.serve(Protocol::Blobs),
    ));
    let (local, local_rx) = watch::channel(LocalState::default());
    let (stop, mut stopped) = watch::channel(false);
    tokio::spawn(mesh.run(local_rx, async move {
        let _ = stopped.wait_for(|s| *s).await;
    }));
    let (peer, op) = (fleet[1].addr, ca.operator.clone());
    tokio::task::spawn_blocking(move || {
        wait_for("the insider to be seen", LONG, || {
            hosts(peer, &op).is_ok_and(|l| l.len() == 3 && l.iter().all(|h| h["state"] == "alive"))
        })
    })
    .await
    .unwrap();

    // The insider holds v1 honestly, and v2's bytes filed under v3's revision id.
    let (v1, r1) = bundle(tmp.path(), "v1");
    let (v2, r2) = bundle(tmp.path(), "v2");
    let (_, r3) = bundle(tmp.path(), "v3");
    for path in [&v1, &v2] {
        let len = std::fs::metadata(path).unwrap().len();
        let mut f = tokio::fs::File::open(path).await.unwrap();
        store.receive("tiny", len, &mut f, None).await.unwrap();
    }
    let stored = insider_dir.join("data/bundles/tiny");
    std::fs::rename(
        stored.join(format!("{}.bundle", r2.0)),
        stored.join(format!("{}.bundle", r3.0)),
    )
    .unwrap();

    let host = fleet[0].name.as_str();
    let fence = |index| Fence { term: 1, index };

    // Signed by an agent (the insider itself).
    let intent = Intent::new(
        "tiny",
        "tiny",
        Targets::parse("role=inference").unwrap(),
        &r1,
        DeploymentConfig::AllAtOnce,
        "insider",
        now(),
    )
    .unwrap();
    refused(
        &command(
            &insider,
            host,
            &signed_by(&insider_identity, &intent),
            fence(1),
        )
        .await,
        "is not an operator",
    );
    // Unsigned.
    let mut unsigned = operator_intent(&operator, "role=inference", &r1);
    unsigned.signature.clear();
    refused(
        &command(&insider, host, &unsigned, fence(1)).await,
        "not signed",
    );
    // Forged: an operator's intent for v1, its revision changed to v3 after signing.
    let mut forged = operator_intent(&operator, "role=inference", &r1);
    forged.body = String::from_utf8(forged.body)
        .unwrap()
        .replace(&r1.0, &r3.0)
        .into_bytes();
    refused(
        &command(&insider, host, &forged, fence(1)).await,
        "signature does not match",
    );
    // A rollback the operator never consented to (no revision to roll back to), under the
    // rollback's own id or the original's.
    let plain = operator_intent(&operator, "role=inference", &r1);
    let plain_id = serde_json::from_slice::<Intent>(&plain.body).unwrap().id;
    refused(
        &command_as(
            &insider,
            host,
            &plain,
            &intent::rollback_id(&plain_id),
            fence(1),
            true,
        )
        .await,
        "signed no revision to roll back to",
    );
    // A consented rollback commanded under the original deployment's id: the ids differ,
    // so the host's replay record of one can never stand for the other.
    let consenting = consenting_intent(&operator, &r2, &r1);
    let consenting_id = serde_json::from_slice::<Intent>(&consenting.body)
        .unwrap()
        .id;
    refused(
        &command_as(&insider, host, &consenting, &consenting_id, fence(1), true).await,
        "carries intent",
    );
    // A consented rollback to a revision this host never ran (the peer the operator asked
    // could have named any): refused by the host itself.
    let to_unknown = consenting_intent(&operator, &r2, &r3);
    let to_unknown_id = serde_json::from_slice::<Intent>(&to_unknown.body)
        .unwrap()
        .id;
    refused(
        &command_as(
            &insider,
            host,
            &to_unknown,
            &intent::rollback_id(&to_unknown_id),
            fence(1),
            true,
        )
        .await,
        "ran successfully before",
    );
    // Signed by an operator of this fleet whose certificate was revoked since.
    let mallory_dir = tmp.path().join("mallory");
    let o = shoal()
        .args(["ca", "issue", "--operator", "--name", "mallory", "--dir"])
        .arg(&ca.dir)
        .arg("--out")
        .arg(&mallory_dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mallory = Identity::load(&mallory_dir).unwrap();
    let o = shoal()
        .args(["ca", "revoke", "--name", "mallory", "--dir"])
        .arg(&ca.dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = shoal()
        .args(["ca", "publish-revocations"])
        .arg(ca.dir.join("revocations.crl"))
        .arg("--peer")
        .arg(fleet[0].addr.to_string())
        .arg("--identity")
        .arg(&ca.operator)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    refused(
        &command(
            &insider,
            host,
            &operator_intent(&mallory, "role=inference", &r1),
            fence(1),
        )
        .await,
        "revoked",
    );
    // Signed by another fleet's operator.
    refused(
        &command(
            &insider,
            host,
            &operator_intent(&stranger, "role=inference", &r1),
            fence(1),
        )
        .await,
        "not from this fleet's CA",
    );
    // For other hosts: this host's own tags decide.
    refused(
        &command(
            &insider,
            host,
            &operator_intent(&operator, "role=db", &r1),
            fence(1),
        )
        .await,
        "not among the targets",
    );
    assert_eq!(records(&fleet[0].data_dir), 0, "nothing ran so far");

    // An operator's intent, genuine, for this host: without the log behind the command
    // (no entry started this host with this fence), the host does nothing.
    let genuine = operator_intent(&operator, "role=inference", &r1);
    refused(
        &command(&insider, host, &genuine, fence(10)).await,
        "did not confirm this command",
    );
    // A genuine intent two days old: expired as itself, and as a catch-up (which runs past
    // the age limit) not without the log's voters saying the log made that catch-up.
    let old = Intent::new(
        "tiny",
        "tiny",
        Targets::parse("role=inference").unwrap(),
        &r1,
        DeploymentConfig::AllAtOnce,
        &operator.name,
        now() - 2 * 24 * 3600,
    )
    .unwrap();
    let old_signed = intent::sign(&old, &operator).unwrap();
    refused(
        &command(&insider, host, &old_signed, fence(10)).await,
        &format!("more than {} s", intent::MAX_AGE_SECS),
    );
    let as_catch_up = |deployment: &str, rollback: bool| RunHost {
        deployment: deployment.to_string(),
        intent: old_signed.clone(),
        fence: fence(10),
        holders: Vec::new(),
        batch: Vec::new(),
        rollback,
        catch_up: Some(0),
    };
    refused(
        &send_command(
            &insider,
            host,
            as_catch_up(&intent::catch_up_id(&old.id, 0), false),
        )
        .await,
        "did not confirm this command",
    );
    refused(
        &send_command(&insider, host, as_catch_up(&old.id, false)).await,
        "carries intent",
    );
    refused(
        &send_command(
            &insider,
            host,
            as_catch_up(&intent::catch_up_id(&old.id, 0), true),
        )
        .await,
        "not both",
    );
    assert_eq!(records(&fleet[0].data_dir), 0, "nothing ran so far");

    // A real deployment of v1 to agent-1, uploaded to agent-2, while the insider gossips
    // that it holds v1 and serves another revision's manifest (and bundle) under that id:
    // the host refuses it (wrong revision), gets the manifest from the uploader, and the
    // chunks (each checked against its name), and installs v1, once.
    let mut apps = std::collections::BTreeMap::new();
    let mut held = std::collections::BTreeSet::new();
    held.insert(r1.0.clone());
    apps.insert(
        "tiny".to_string(),
        shoal_agent::mesh::hoststate::AppRecord {
            revision: None,
            health: shoal_agent::mesh::hoststate::Health::None,
            held,
            problem: None,
            restarts: 0,
            fetching: None,
        },
    );
    std::fs::rename(
        stored.join(format!("{}.bundle", r1.0)),
        stored.join("v1.kept"),
    )
    .unwrap();
    std::fs::copy(
        stored.join(format!("{}.bundle", r3.0)),
        stored.join(format!("{}.bundle", r1.0)),
    )
    .unwrap();
    let manifests = insider_dir.join("data/chunks/manifests");
    std::fs::copy(manifests.join(&r2.0), manifests.join(&r1.0)).unwrap();
    local
        .send(LocalState {
            apps,
            ..LocalState::default()
        })
        .unwrap();
    let (peer, op, first) = (fleet[1].addr, ca.operator.clone(), fleet[0].addr);
    tokio::task::spawn_blocking(move || {
        wait_for("agent-1 to hear the insider holds v1", LONG, || {
            hosts(first, &op).is_ok_and(|l| {
                l.iter().any(|h| {
                    h["name"] == "insider"
                        && h["apps"]["tiny"].is_null()
                        && h["details"]["tiny"]["held"]
                            .as_array()
                            .is_some_and(|a| !a.is_empty())
                })
            })
        });
        let _ = peer;
    })
    .await
    .unwrap();
    // As `deploy create` does it: upload to agent-2, sign, create; then wait for the end.
    let uploaded = shoal_agent::api::ask_with(
        fleet[1].addr,
        None,
        &ca.operator,
        None,
        &shoal_agent::api::Request::Upload {
            app: "tiny".into(),
            len: std::fs::metadata(&v1).unwrap().len(),
        },
        Some(&v1),
        LONG,
    )
    .await
    .unwrap();
    let shoal_agent::api::Answer::Uploaded { holder, .. } = uploaded else {
        panic!("not uploaded: {uploaded:?}");
    };
    let signed = operator_intent(&operator, "host=agent-1", &r1);
    let id: Intent = serde_json::from_slice(&signed.body).unwrap();
    let id = id.id;
    shoal_agent::api::ask_with(
        fleet[1].addr,
        None,
        &ca.operator,
        None,
        &shoal_agent::api::Request::Fleet(OperatorRequest::Create {
            intent: signed.clone(),
            holder: Some(holder),
        }),
        None,
        LONG,
    )
    .await
    .unwrap();
    let (peer, op, wanted) = (fleet[1].addr.to_string(), ca.operator.clone(), id.clone());
    let view = tokio::task::spawn_blocking(move || {
        let o = shoal()
            .args([
                "deploy", "status", &wanted, "--watch", "--json", "--peer", &peer,
            ])
            .arg("--identity")
            .arg(&op)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    })
    .await
    .unwrap();
    assert_eq!(view["status"], "Succeeded", "{view}");
    assert_eq!(records(&fleet[0].data_dir), 1);
    assert_eq!(
        std::fs::read_to_string(fleet[0].install_root.join("srv/tiny/payload.txt")).unwrap(),
        "v1"
    );
    let log = std::fs::read_to_string(&fleet[0].log).unwrap();
    assert!(
        log.contains("a peer sent a manifest that is not the revision's")
            && log.contains("insider"),
        "the insider's manifest was refused, and said so: {log}"
    );

    // The deployment's own intent, replayed with the fence the log gave it: reported
    // again, nothing run again. With a fence the log never gave: refused.
    let index = view["hosts"][0]["batch"].as_u64().unwrap();
    let list =
        std::fs::read_to_string(fleet[0].data_dir.join("executed/executed-intents.json")).unwrap();
    assert!(list.contains(&id), "the host remembers the intent it ran");
    {
        match command(&insider, host, &signed, Fence { term: 1, index }).await {
            HostAnswer::Done {
                verdict: Verdict::Succeeded,
                ..
            } => {}
            other => panic!("a replay was not answered with the outcome: {other:?}"),
        }
    }
    assert_eq!(records(&fleet[0].data_dir), 1, "a replay ran nothing");
    // The intent ended here: a newer fence is answered with its outcome (nothing runs), an
    // older one is a deposed coordinator's, refused for good.
    match command(&insider, host, &signed, Fence { term: 9, index }).await {
        HostAnswer::Done {
            verdict: Verdict::Succeeded,
            ..
        } => {}
        other => panic!("an ended intent was not answered with its outcome: {other:?}"),
    }
    let answer = command(
        &insider,
        host,
        &signed,
        Fence {
            term: 1,
            index: index - 1,
        },
    )
    .await;
    refused(&answer, "deposed coordinator");
    assert!(matches!(&answer, HostAnswer::Refused(r) if !r.passing));
    assert_eq!(records(&fleet[0].data_dir), 1, "nothing ran again");

    // A genuine operator intent for this host, the fence of an entry that exists but
    // started another intent: the voters have applied past it and say it conflicts.
    let other = operator_intent(&operator, "role=inference", &r1);
    let answer = command(&insider, host, &other, Fence { term: 1, index }).await;
    refused(&answer, "did not confirm this command");
    assert!(
        matches!(&answer, HostAnswer::Refused(r) if !r.passing),
        "the voters said it conflicts: final"
    );
    assert_eq!(records(&fleet[0].data_dir), 1);

    // Through the CLI, an agent's identity cannot create a deployment.
    let agent_identity = insider_dir.join("identity");
    let peer = fleet[1].addr.to_string();
    let o = tokio::task::spawn_blocking(move || {
        shoal()
            .args([
                "deploy",
                "create",
                "--app",
                "tiny",
                "--targets",
                "role=inference",
                "--peer",
            ])
            .arg(&peer)
            .arg("--identity")
            .arg(&agent_identity)
            .arg("--bundle")
            .arg(&v1)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("only an operator identity"), "{err}");

    // And an agent's certificate asking the API to take a bundle is refused before a byte
    // of it is kept, with the reason.
    let (v1_path, peer) = (tmp.path().join("v1.tar.zst"), fleet[1].addr);
    let asked = shoal_agent::api::ask_with(
        peer,
        None,
        &insider_dir.join("identity"),
        None,
        &shoal_agent::api::Request::Upload {
            app: "other".into(),
            len: std::fs::metadata(&v1_path).unwrap().len(),
        },
        Some(&v1_path),
        LONG,
    )
    .await;
    let err = format!("{:#}", asked.expect_err("an agent's upload was taken"));
    assert!(err.contains("operator"), "{err}");
    assert!(
        !fleet[1].data_dir.join("bundles/other").exists(),
        "nothing was kept"
    );
    let _ = stop.send(true);
}

/// Asks `host`'s logs protocol directly, as the insider; the parts until End or Error.
async fn ask_logs(
    insider: &MeshHandle,
    host: &str,
    request: &shoal_agent::logs::HostLogsRequest,
) -> Vec<shoal_agent::logs::HostLogsPart> {
    use shoal_agent::logs::HostLogsPart;
    let (mut send, mut recv) = insider.open_bi(host, Protocol::Logs).await.unwrap();
    write_frame(&mut send, request).await.unwrap();
    send.finish().unwrap();
    let mut parts = Vec::new();
    loop {
        let part: HostLogsPart = tokio::time::timeout(LONG, read_frame(&mut recv))
            .await
            .unwrap()
            .unwrap();
        let last = !matches!(part, HostLogsPart::Chunk(_));
        parts.push(part);
        if last {
            return parts;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_served_only_by_checked_names_and_never_through_a_link() {
    use shoal_agent::logs::{HostLogsPart, HostLogsRequest};
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new(tmp.path(), "fleet");
    let mut fleet = agents(tmp.path(), &ca, [127, 83, 2], 1);
    // A hook log, a link planted beside it toward a file only root reads, and a link in
    // place of a deployment's directory.
    let logs = fleet[0].data_dir.join("apps/tiny/deployments/0123abcd");
    std::fs::create_dir_all(&logs).unwrap();
    std::fs::write(logs.join("aaaa-Install-0.log"), "installed\n").unwrap();
    let secret = tmp.path().join("secret");
    std::fs::write(&secret, "root's secret").unwrap();
    std::os::unix::fs::symlink(&secret, logs.join("aaaa-ValidateService-0.log")).unwrap();
    std::os::unix::fs::symlink(
        tmp.path(),
        fleet[0].data_dir.join("apps/tiny/deployments/up"),
    )
    .unwrap();
    fleet[0].start();

    let insider_dir = tmp.path().join("insider");
    let mesh = insider_mesh(&ca, &insider_dir, [127, 83, 2, 200], fleet[0].addr);
    let insider = mesh.handle();
    let (_local, local_rx) = watch::channel(LocalState::default());
    let (stop, mut stopped) = watch::channel(false);
    tokio::spawn(mesh.run(local_rx, async move {
        let _ = stopped.wait_for(|s| *s).await;
    }));
    let (peer, op) = (fleet[0].addr, ca.operator.clone());
    tokio::task::spawn_blocking(move || {
        wait_for("the insider to be seen", LONG, || {
            hosts(peer, &op).is_ok_and(|l| l.len() == 2 && l.iter().all(|h| h["state"] == "alive"))
        })
    })
    .await
    .unwrap();

    let ask = |app: &str, deployment: &str| HostLogsRequest {
        app: app.into(),
        deployment: deployment.into(),
        event: None,
        from: Vec::new(),
    };
    // The log comes; the link beside it does not.
    let parts = ask_logs(&insider, "agent-1", &ask("tiny", "0123abcd")).await;
    let chunks: Vec<_> = parts
        .iter()
        .filter_map(|p| match p {
            HostLogsPart::Chunk(c) => Some(c),
            _ => None,
        })
        .collect();
    assert_eq!(chunks.len(), 1, "{parts:?}");
    assert_eq!(chunks[0].file, "aaaa-Install-0.log");
    assert_eq!(chunks[0].bytes, b"installed\n");
    assert!(matches!(parts.last(), Some(HostLogsPart::End)));
    // Names that climb out, and a linked directory, are refused with the reason.
    for (app, deployment, why) in [
        ("../..", "0123abcd", "application name"),
        ("tiny", "../../..", "deployment id"),
        ("tiny", "up", "reading the logs"),
    ] {
        let parts = ask_logs(&insider, "agent-1", &ask(app, deployment)).await;
        match parts.as_slice() {
            [HostLogsPart::Error(e)] => assert!(e.contains(why), "{app} {deployment}: {e}"),
            other => panic!("{app} {deployment}: not refused: {other:?}"),
        }
    }
    let _ = stop.send(true);
}
