//! The deployment log over real QUIC meshes, in one process: three agents' meshes on
//! 127.78.1.x (mutual TLS, the pool, the router), each with an openraft node on its own
//! redb log and the `raft` protocol served on its mesh. The three elect a leader, and what
//! it commits is applied by all three; when the leader's agent stops, the other two elect
//! another and go on. An agent that is not a voter cannot lead, and a voter cannot
//! campaign as another: both are refused, and the term of the voter called does not move.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::Raft;
use openraft::Vote;
use openraft::raft::{AppendEntriesRequest, VoteRequest};
use shoal_agent::fleet::log::network::{self, Answer, Call, Network};
use shoal_agent::fleet::log::{Command, Node, NodeId, StateReader, TypeConfig, node_id, open};
use shoal_agent::identity::{self, Identity, Role};
use shoal_agent::mesh::frame::{Protocol, read_frame, write_frame};
use shoal_agent::mesh::node::{LocalState, Mesh, NodeConfig};
use tokio::sync::watch;

const LONG: Duration = Duration::from_secs(60);

struct Agent {
    name: String,
    mesh: shoal_agent::mesh::node::MeshHandle,
    raft: Raft<TypeConfig>,
    reader: StateReader,
    stop: watch::Sender<bool>,
    _local: watch::Sender<LocalState>,
}

async fn start(dir: &Path, ca_dir: &Path, name: &str, addr: SocketAddr, seed: SocketAddr) -> Agent {
    let id_dir = dir.join(format!("{name}-identity"));
    identity::issue(ca_dir, name, Role::Agent, &id_dir).unwrap();
    let config = NodeConfig {
        name: name.to_string(),
        listen: addr,
        advertise: addr,
        identity: Identity::load(&id_dir).unwrap(),
        seeds: vec![seed],
        data_dir: dir.join(name),
        forget_dead_after: Duration::from_secs(86_400),
    };
    let (local, local_rx) = watch::channel(LocalState::default());
    let mesh = Mesh::bind(config, LocalState::default()).unwrap();
    let handle = mesh.handle();
    let calls = handle.serve(Protocol::Raft);
    let (stop, mut stopped) = watch::channel(false);
    tokio::spawn(async move {
        let _ = mesh
            .run(local_rx, async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await;
    });
    let raft_dir = dir.join(name).join("raft");
    let (log, sm) = tokio::task::spawn_blocking(move || open(&raft_dir))
        .await
        .unwrap()
        .unwrap();
    let reader = sm.reader();
    let config = shoal_agent::fleet::log::raft_config();
    let raft = Raft::new(
        node_id(name),
        Arc::new(config.validate().unwrap()),
        Network::new(handle.clone()),
        log,
        sm,
    )
    .await
    .unwrap();
    tokio::spawn(network::serve(raft.clone(), calls));
    Agent {
        name: name.to_string(),
        mesh: handle,
        raft,
        reader,
        stop,
        _local: local,
    }
}

/// The leader every agent in `agents` agrees on, once they do.
async fn leader(agents: &[&Agent]) -> NodeId {
    let start = Instant::now();
    loop {
        let seen: Vec<Option<NodeId>> = agents
            .iter()
            .map(|a| a.raft.metrics().borrow().current_leader)
            .collect();
        if let Some(Some(l)) = seen.first()
            && seen.iter().all(|s| *s == Some(*l))
            && agents.iter().any(|a| node_id(&a.name) == *l)
        {
            return *l;
        }
        assert!(start.elapsed() < LONG, "no agreed leader: {seen:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Commits a command through the leader among `agents` and waits until all applied it.
async fn commit_everywhere(agents: &[&Agent], deployment: &str) {
    let l = leader(agents).await;
    let leader = agents.iter().find(|a| node_id(&a.name) == l).unwrap();
    let written = leader
        .raft
        .client_write(Command::Stop {
            deployment: deployment.into(),
            rollback: false,
        })
        .await
        .unwrap();
    let start = Instant::now();
    while !agents
        .iter()
        .all(|a| a.reader.last_applied().is_some_and(|x| x >= written.log_id))
    {
        assert!(start.elapsed() < LONG, "not applied everywhere");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_voters_over_the_mesh_elect_commit_and_survive_their_leader() {
    let tmp = tempfile::tempdir().unwrap();
    let ca_dir = tmp.path().join("ca");
    identity::init_ca(&ca_dir).unwrap();
    let addr = |i: u8| SocketAddr::from(([127, 78, 1, i], 7400));
    let mut agents = Vec::new();
    for (i, name) in ["log-1", "log-2", "log-3"].iter().enumerate() {
        agents.push(start(tmp.path(), &ca_dir, name, addr(i as u8 + 1), addr(1)).await);
    }
    let members: BTreeMap<NodeId, Node> = agents
        .iter()
        .enumerate()
        .map(|(i, a)| {
            (
                node_id(&a.name),
                Node {
                    name: a.name.clone(),
                    addr: addr(i as u8 + 1),
                },
            )
        })
        .collect();
    agents[0].raft.initialize(members).await.unwrap();

    let all: Vec<&Agent> = agents.iter().collect();
    commit_everywhere(&all, "first").await;

    // The leader's agent goes away: the other two elect another and go on.
    let old = leader(&all).await;
    let gone = agents.iter().position(|a| node_id(&a.name) == old).unwrap();
    agents[gone].raft.shutdown().await.unwrap();
    agents[gone].stop.send(true).unwrap();
    let rest: Vec<&Agent> = agents
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != gone)
        .map(|(_, a)| a)
        .collect();
    let new = leader(&rest).await;
    assert_ne!(new, old);
    commit_everywhere(&rest, "second").await;

    // An agent of the fleet that is not a voter leads as itself, at a higher term: refused,
    // and the voter's term and leader do not move (openraft alone would follow it).
    let voter = rest[0];
    let at = agents.iter().position(|a| a.name == voter.name).unwrap();
    let outsider = start(tmp.path(), &ca_dir, "outsider", addr(9), addr(at as u8 + 1)).await;
    let (term, led_by) = {
        let m = voter.raft.metrics().borrow().clone();
        (m.current_term, m.current_leader)
    };
    let start_at = Instant::now();
    let (mut send, mut recv) = loop {
        // The outsider's mesh learns of the voter through the seed first.
        match outsider.mesh.open_bi(&voter.name, Protocol::Raft).await {
            Ok(s) => break s,
            Err(e) => assert!(start_at.elapsed() < LONG, "never reached the voter: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let forged = Call::Append(AppendEntriesRequest {
        vote: Vote::new_committed(term + 100, node_id("outsider")),
        prev_log_id: None,
        entries: Vec::new(),
        leader_commit: None,
    });
    // The voter may refuse before reading (it knows who calls): the write may find the
    // stream stopped, the answer still comes.
    let _ = write_frame(&mut send, &forged).await;
    let _ = send.finish();
    match read_frame::<Answer>(&mut recv).await.unwrap() {
        Answer::Refused(why) => assert!(why.contains("not a voter"), "{why}"),
        other => panic!("an outsider's append was answered: {other:?}"),
    }
    let m = voter.raft.metrics().borrow().clone();
    assert_eq!((m.current_term, m.current_leader), (term, led_by));

    // A voter campaigns as another member: refused, and the callee's term does not move.
    let (caller, callee) = (rest[0], rest[1]);
    let term = callee.raft.metrics().borrow().current_term;
    let (mut send, mut recv) = caller
        .mesh
        .open_bi(&callee.name, Protocol::Raft)
        .await
        .unwrap();
    let forged = Call::Vote(VoteRequest {
        vote: Vote::new(term + 100, node_id(&agents[gone].name)),
        last_log_id: None,
    });
    write_frame(&mut send, &forged).await.unwrap();
    let _ = send.finish();
    match read_frame::<Answer>(&mut recv).await.unwrap() {
        Answer::Refused(why) => assert!(why.contains("spoke for another member"), "{why}"),
        other => panic!("a forged vote request was answered: {other:?}"),
    }
    assert_eq!(callee.raft.metrics().borrow().current_term, term);
    commit_everywhere(&rest, "third").await;

    let _ = outsider.raft.shutdown().await;
    let _ = outsider.stop.send(true);
    for a in agents.iter().filter(|a| node_id(&a.name) != old) {
        let _ = a.raft.shutdown().await;
        let _ = a.stop.send(true);
    }
}
