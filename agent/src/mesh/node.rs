//! The agent's network loop: the thin tokio layer around the sans-IO cores. One task owns
//! the membership (`membership.rs`) and the host table (`hoststate.rs`) and is fed events
//! through a channel: datagrams, gossip messages, timers, connections, operator requests.
//! Everything it must send goes out over QUIC:
//! - membership packets as unreliable datagrams (SWIM expects loss and copes with it);
//! - host-state gossip as one framed message per unidirectional stream;
//! - operator requests on bidirectional streams, answered only for the operator role.
//!
//! Connections are kept per peer address and dialled on first use; what is sent while a
//! dial is under way waits for it (up to a bound), and a peer that could not be dialled is
//! not tried again for a second. A peer whose certificate the fleet CA did not issue never
//! gets a connection, and the reason is logged.
//!
//! Across restarts the agent remembers (under `data_dir/mesh/`) its identity's bump and
//! its record's version, so its next life wins over the old one everywhere, and the
//! addresses of the members it last knew, so it can rejoin even if its seeds are down.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use super::frame::{read_frame, write_frame};
use super::hoststate::{AppRecord, GossipMsg, HostRecord, HostTable, Outgoing, first_version};
use super::membership::{self, MemberId, Membership, Output};
use super::transport;
use super::view;
use crate::api::{Request, Response};
use crate::identity::{Identity, Role};
use crate::lifecycle::state::{read_json, write_json};

/// What the agent's mesh needs to know.
pub struct NodeConfig {
    pub name: String,
    pub listen: SocketAddr,
    pub advertise: SocketAddr,
    pub identity: Identity,
    pub seeds: Vec<SocketAddr>,
    pub data_dir: PathBuf,
}

/// What the rest of the agent tells the mesh about this host as it changes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalState {
    pub tags: BTreeMap<String, String>,
    pub apps: BTreeMap<String, AppRecord>,
}

/// How often the loop polls local state, and the unit of its other periodic work.
const TICK: Duration = Duration::from_millis(500);
/// A send waiting for a dial is dropped beyond this many.
const MAX_QUEUED: usize = 256;
/// After a failed dial, the peer is not dialled again for this long.
const REDIAL_AFTER: Duration = Duration::from_secs(1);
/// How long a gossip stream may take to arrive whole.
const STREAM_DEADLINE: Duration = Duration::from_secs(5);

/// What survives a restart, in `data_dir/mesh/self.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Remembered {
    bump: u16,
    version: u64,
    peers: BTreeSet<SocketAddr>,
}

enum Event {
    /// A membership packet, and the name in its sender's certificate.
    Datagram(Arc<str>, SocketAddr, Bytes),
    Gossip {
        from: SocketAddr,
        msg: GossipMsg,
    },
    Timer(membership::Timer),
    Connected(quinn::Connection),
    DialFailed(SocketAddr),
    Closed(SocketAddr, usize),
    Request(Request, oneshot::Sender<Response>),
}

enum Peer {
    Connected(quinn::Connection),
    Dialing(Vec<Send>),
    Failed(Instant),
}

enum Send {
    Datagram(Bytes),
    Gossip(GossipMsg),
}

/// Runs this agent's side of the mesh until `stop` resolves, then leaves it gracefully:
/// peers learn the agent left, rather than failed.
pub async fn run(
    config: NodeConfig,
    mut local: watch::Receiver<LocalState>,
    stop: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let (cert_name, role) = (config.identity.name.clone(), config.identity.role);
    if role != Role::Agent {
        bail!("the identity is an operator's; an agent needs an agent identity");
    }
    if cert_name != config.name {
        bail!(
            "the configured name `{}` differs from the identity's certificate, issued to `{cert_name}`",
            config.name
        );
    }
    let endpoint = transport::endpoint(config.listen, &config.identity)?;
    let state_file = config.data_dir.join("mesh").join("self.json");
    let remembered: Remembered = read_json(&state_file)
        .unwrap_or_else(|e| {
            tracing::warn!("{e:#}; starting the mesh state afresh");
            None
        })
        .unwrap_or_else(|| Remembered {
            // Without memory of a previous life, the clock tells lives apart.
            bump: (std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
                % 65536) as u16,
            ..Remembered::default()
        });
    let me = MemberId {
        name: config.name.clone(),
        addr: config.advertise,
        bump: remembered.bump.wrapping_add(1),
    };
    let initial = local.borrow_and_update().clone();
    let own = HostRecord {
        name: config.name.clone(),
        addr: config.advertise,
        version: first_version(
            remembered.version,
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        ),
        left: false,
        tags: initial.tags,
        apps: initial.apps,
    };
    let seed = rand::random::<u64>();
    let (tx, rx) = mpsc::channel(4096);
    let mut node = Node {
        membership: Membership::new(
            me.clone(),
            membership::config(64, membership::FORGET_DOWN_AFTER),
            seed,
        ),
        table: HostTable::new(own, seed ^ 0x9e37_79b9_7f4a_7c15),
        me,
        endpoint: endpoint.clone(),
        peers: HashMap::new(),
        tx: tx.clone(),
        seeds: config.seeds.clone(),
        known: remembered.peers,
        state_file,
        saved_version: 0,
    };
    node.remember()?;
    tracing::info!(
        name = %node.me.name,
        addr = %node.me.addr,
        listen = %config.listen,
        seeds = ?config.seeds,
        "joining the mesh"
    );
    tokio::spawn(accept(endpoint.clone(), tx));
    node.join();
    node.run(rx, &mut local, stop).await;
    node.leave().await;
    endpoint.close(0u32.into(), b"agent stopped");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    Ok(())
}

struct Node {
    me: MemberId,
    membership: Membership,
    table: HostTable,
    endpoint: quinn::Endpoint,
    peers: HashMap<SocketAddr, Peer>,
    tx: mpsc::Sender<Event>,
    seeds: Vec<SocketAddr>,
    /// Members' addresses as last remembered on disk.
    known: BTreeSet<SocketAddr>,
    state_file: PathBuf,
    /// The version of our record last written to `state_file`.
    saved_version: u64,
}

impl Node {
    async fn run(
        &mut self,
        mut rx: mpsc::Receiver<Event>,
        local: &mut watch::Receiver<LocalState>,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks: u64 = 0;
        loop {
            tokio::select! {
                _ = &mut stop => return,
                Some(event) = rx.recv() => self.handle(event),
                Ok(()) = local.changed() => {
                    let state = local.borrow_and_update().clone();
                    self.publish(state);
                }
                _ = tick.tick() => {
                    ticks += 1;
                    if ticks.is_multiple_of(2) {
                        let peers = self.alive_addrs();
                        let out = self.table.anti_entropy(&peers);
                        self.gossip(out);
                    }
                    if ticks.is_multiple_of(4) && self.membership.alive().next().is_none() {
                        self.join();
                    }
                    if ticks.is_multiple_of(20) {
                        self.membership.fit_size();
                        let alive: BTreeSet<SocketAddr> = self.alive_addrs().into_iter().collect();
                        if !alive.is_empty() && alive != self.known {
                            self.known = alive;
                            if let Err(e) = self.remember() {
                                tracing::warn!("remembering the mesh: {e:#}");
                            }
                        }
                    }
                }
            }
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Datagram(from, remote, data) => {
                match self.membership.handle_data(&from, remote, &data) {
                    Ok(out) => self.apply(out),
                    Err(e) => tracing::debug!(peer = %from, "dropped a datagram: {e}"),
                }
            }
            Event::Gossip { from, msg } => {
                let peers = self.alive_addrs();
                let (out, learned) = self.table.handle(from, msg, &peers);
                for record in learned {
                    tracing::debug!(
                        host = %record.name,
                        version = record.version,
                        left = record.left,
                        "learned a host record"
                    );
                }
                self.gossip(out);
                if self.table.own().version != self.saved_version {
                    self.remember_or_warn();
                }
            }
            Event::Timer(timer) => {
                let out = self.membership.handle_timer(timer);
                self.apply(out);
            }
            Event::Connected(conn) => {
                let addr = conn.remote_address();
                let queued = match self.peers.insert(addr, Peer::Connected(conn.clone())) {
                    Some(Peer::Dialing(queue)) => queue,
                    _ => Vec::new(),
                };
                for item in queued {
                    transmit(&conn, item);
                }
            }
            Event::DialFailed(addr) => {
                self.peers.insert(addr, Peer::Failed(Instant::now()));
            }
            Event::Closed(addr, id) => {
                if matches!(self.peers.get(&addr), Some(Peer::Connected(c)) if c.stable_id() == id)
                {
                    self.peers.remove(&addr);
                }
            }
            Event::Request(request, reply) => {
                let response = match request {
                    Request::Hosts => Response::Hosts(view::views(
                        &self.me,
                        &self.table,
                        self.membership.states(),
                    )),
                };
                let _ = reply.send(response);
            }
        }
    }

    fn apply(&mut self, outputs: Vec<Output>) {
        for output in outputs {
            match output {
                Output::Send { to, data } => self.send(to.addr, Send::Datagram(Bytes::from(data))),
                Output::Schedule { timer, after } => {
                    let tx = self.tx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(after).await;
                        let _ = tx.send(Event::Timer(timer)).await;
                    });
                }
                Output::Up(id) => {
                    tracing::info!(member = %id.name, addr = %id.addr, "member is alive");
                    let digest = self.table.digest_to(id.addr);
                    self.gossip(vec![digest]);
                }
                Output::Down(id) => {
                    let left = self.table.get(&id.name).is_some_and(|r| r.left);
                    if left {
                        tracing::info!(member = %id.name, addr = %id.addr, "member left");
                    } else {
                        tracing::warn!(member = %id.name, addr = %id.addr, "member is dead");
                    }
                }
                Output::Rejoined(id) => {
                    tracing::warn!(
                        bump = id.bump,
                        "the mesh had declared this agent down; rejoined"
                    );
                    self.me = id;
                    self.remember_or_warn();
                }
                Output::Forgotten(id) => {
                    tracing::info!(member = %id.name, "member forgotten");
                }
                Output::Idle => {
                    tracing::warn!(
                        "no member of the mesh is reachable; joining again through the seeds"
                    );
                    self.join();
                }
            }
        }
    }

    /// Announces this agent to its seeds and to the members it last knew.
    fn join(&mut self) {
        let targets: BTreeSet<SocketAddr> = self
            .seeds
            .iter()
            .chain(self.known.iter())
            .copied()
            .filter(|a| *a != self.me.addr)
            .collect();
        for addr in targets {
            let out = self.membership.join(addr);
            self.apply(out);
        }
    }

    fn publish(&mut self, state: LocalState) {
        let peers = self.alive_addrs();
        let out = self.table.publish(
            |r| {
                r.tags = state.tags;
                r.apps = state.apps;
            },
            &peers,
        );
        if !out.is_empty() || peers.is_empty() {
            tracing::debug!(
                version = self.table.own().version,
                "published this host's record"
            );
            self.remember_or_warn();
        }
        self.gossip(out);
    }

    /// Leaves: first the record that says so, then SWIM's leave, then a moment for both to
    /// go out.
    async fn leave(mut self) {
        let peers = self.alive_addrs();
        if !peers.is_empty() {
            self.known = peers.iter().copied().collect();
        }
        let out = self.table.publish(|r| r.left = true, &peers);
        self.gossip(out);
        self.remember_or_warn();
        let out = self.membership.leave();
        self.apply(out);
        tracing::info!("left the mesh");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    fn gossip(&mut self, out: Vec<Outgoing>) {
        for Outgoing { to, msg } in out {
            self.send(to, Send::Gossip(msg));
        }
    }

    fn send(&mut self, to: SocketAddr, item: Send) {
        if to == self.me.addr {
            return;
        }
        match self.peers.get_mut(&to) {
            Some(Peer::Connected(conn)) if conn.close_reason().is_none() => {
                transmit(conn, item);
                return;
            }
            Some(Peer::Dialing(queue)) => {
                if queue.len() < MAX_QUEUED {
                    queue.push(item);
                }
                return;
            }
            Some(Peer::Failed(at)) if at.elapsed() < REDIAL_AFTER => return,
            _ => {}
        }
        self.peers.insert(to, Peer::Dialing(vec![item]));
        tokio::spawn(dial(self.endpoint.clone(), to, self.tx.clone()));
    }

    fn alive_addrs(&self) -> Vec<SocketAddr> {
        self.membership.alive().map(|m| m.addr).collect()
    }

    fn remember(&mut self) -> Result<()> {
        if let Some(dir) = self.state_file.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        write_json(
            &self.state_file,
            &Remembered {
                bump: self.me.bump,
                version: self.table.own().version,
                peers: self.known.clone(),
            },
        )?;
        self.saved_version = self.table.own().version;
        Ok(())
    }

    fn remember_or_warn(&mut self) {
        if let Err(e) = self.remember() {
            tracing::warn!("remembering the mesh state: {e:#}");
        }
    }
}

/// Sends on an established connection. Datagrams that cannot go are dropped (SWIM copes);
/// each gossip message gets a stream of its own.
fn transmit(conn: &quinn::Connection, item: Send) {
    match item {
        Send::Datagram(data) => {
            if let Err(e) = conn.send_datagram(data) {
                tracing::debug!(peer = %conn.remote_address(), "datagram not sent: {e}");
            }
        }
        Send::Gossip(msg) => {
            let conn = conn.clone();
            tokio::spawn(async move {
                let sent = async {
                    let mut stream = conn.open_uni().await?;
                    write_frame(&mut stream, &msg).await?;
                    stream.finish()?;
                    anyhow::Ok(())
                };
                if let Err(e) = sent.await {
                    tracing::debug!(peer = %conn.remote_address(), "gossip not sent: {e:#}");
                }
            });
        }
    }
}

async fn dial(endpoint: quinn::Endpoint, addr: SocketAddr, tx: mpsc::Sender<Event>) {
    let dialled = async {
        let conn =
            tokio::time::timeout(Duration::from_secs(3), transport::connect(&endpoint, addr))
                .await
                .map_err(|_| anyhow::anyhow!("no answer within 3 s"))??;
        let (name, role) = transport::peer_identity(&conn)?;
        if role != Role::Agent {
            conn.close(1u32.into(), b"not an agent");
            bail!("its certificate ({name}) is not an agent's");
        }
        anyhow::Ok((conn, name))
    };
    match dialled.await {
        Ok((conn, name)) => {
            tracing::debug!(peer = %addr, %name, "connected");
            serve(conn.clone(), name, Role::Agent, tx.clone());
            let _ = tx.send(Event::Connected(conn)).await;
        }
        Err(e) => {
            let text = format!("{e:#}");
            if text.contains("certificate") || text.contains("handshake") || text.contains("agent")
            {
                tracing::warn!(peer = %addr, "refused to join a peer: {text}");
            } else {
                tracing::debug!(peer = %addr, "could not reach the peer: {text}");
            }
            let _ = tx.send(Event::DialFailed(addr)).await;
        }
    }
}

/// Accepts connections until the endpoint closes. Agents' connections are kept for
/// sending too; operators' serve requests only.
async fn accept(endpoint: quinn::Endpoint, tx: mpsc::Sender<Event>) {
    while let Some(incoming) = endpoint.accept().await {
        let tx = tx.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(peer = %remote, "refused a connection: {e}");
                    return;
                }
            };
            let (name, role) = match transport::peer_identity(&conn) {
                Ok(who) => who,
                Err(e) => {
                    tracing::warn!(peer = %remote, "refused a connection: {e:#}");
                    conn.close(1u32.into(), b"unreadable certificate");
                    return;
                }
            };
            tracing::debug!(peer = %remote, %name, ?role, "accepted a connection");
            serve(conn.clone(), name, role, tx.clone());
            if role == Role::Agent {
                let _ = tx.send(Event::Connected(conn)).await;
            }
        });
    }
}

/// Reads what a peer sends on `conn`: datagrams and gossip streams from agents, requests
/// on bidirectional streams from anyone (answered only for operators).
fn serve(conn: quinn::Connection, name: String, role: Role, tx: mpsc::Sender<Event>) {
    let remote = conn.remote_address();
    if role == Role::Agent {
        let (c, t, n) = (conn.clone(), tx.clone(), Arc::<str>::from(name.as_str()));
        tokio::spawn(async move {
            while let Ok(data) = c.read_datagram().await {
                // A full queue drops the datagram: SWIM tolerates loss, the agent
                // stays responsive.
                let _ = t.try_send(Event::Datagram(n.clone(), remote, data));
            }
            let _ = t.send(Event::Closed(remote, c.stable_id())).await;
        });
        let (c, tx, name) = (conn.clone(), tx.clone(), name.clone());
        tokio::spawn(async move {
            while let Ok(mut stream) = c.accept_uni().await {
                let (tx, name) = (tx.clone(), name.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(
                        STREAM_DEADLINE,
                        read_frame::<GossipMsg>(&mut stream),
                    )
                    .await
                    {
                        Ok(Ok(msg)) => {
                            let _ = tx.send(Event::Gossip { from: remote, msg }).await;
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(peer = %remote, %name, "dropped a gossip stream: {e}");
                            let _ = stream.stop(1u32.into());
                        }
                        Err(_) => {
                            tracing::warn!(peer = %remote, %name, "dropped a gossip stream: not whole within {STREAM_DEADLINE:?}");
                            let _ = stream.stop(1u32.into());
                        }
                    }
                });
            }
        });
    }
    tokio::spawn(async move {
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            let (tx, name) = (tx.clone(), name.clone());
            tokio::spawn(async move {
                let response = match tokio::time::timeout(
                    STREAM_DEADLINE,
                    read_frame::<Request>(&mut recv),
                )
                .await
                {
                    Ok(Ok(request)) if role == Role::Operator => {
                        tracing::debug!(peer = %remote, %name, ?request, "operator request");
                        let (reply, answer) = oneshot::channel();
                        if tx.send(Event::Request(request, reply)).await.is_err() {
                            return;
                        }
                        match answer.await {
                            Ok(response) => response,
                            Err(_) => return,
                        }
                    }
                    Ok(Ok(_)) => Response::Error(format!(
                        "refused: `{name}` presented an agent certificate; this request needs an operator identity (`shoal ca issue --operator`)"
                    )),
                    Ok(Err(e)) => {
                        tracing::warn!(peer = %remote, %name, "dropped a request stream: {e}");
                        Response::Error(format!("malformed request: {e}"))
                    }
                    Err(_) => Response::Error("the request did not arrive whole in time".into()),
                };
                if write_frame(&mut send, &response).await.is_ok() {
                    let _ = send.finish();
                }
            });
        }
    });
}
