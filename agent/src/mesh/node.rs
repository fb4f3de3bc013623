//! The agent's side of the mesh at runtime: the thin tokio layer around the sans-IO
//! [`Core`](super::core::Core), the connection pool (`peers.rs`) and the router.
//!
//! - **One router, many services.** Every stream opens with a [`Protocol`] tag; the router
//!   hands it to the service that registered that protocol through [`MeshHandle::serve`]
//!   (gossip and the operator API today, raft and blobs next). Membership packets are QUIC
//!   datagrams. A stream of a protocol nobody serves is stopped.
//! - **[`MeshHandle`]**, clonable, is how services use the mesh: open a stream to a peer
//!   by name, serve a protocol, learn membership changes, obey the shutdown signal.
//! - **One driver task** owns the core and the pool. It takes, in this order of priority:
//!   membership packets, pool events, due timers, gossip, local changes. SWIM and gossip have
//!   queues of their own, so a gossip burst cannot starve failure detection.
//! - **Bounded.** Handshakes in flight, dials, streams read and written at once, queued
//!   sends and every channel have a bound; every open, read and write a deadline. What is
//!   dropped is counted and reported at warn, at most once per [`REPORT_EVERY`].
//! - **Strangers** must prove their address (QUIC retry) before a handshake, and only
//!   [`MAX_HANDSHAKES`] handshakes run at once; refusals are counted, not logged one by one.
//!
//! Across restarts the agent remembers (under `data_dir/mesh/`) its identity's bump and
//! its record's version, so its next life wins over the old one everywhere, and the
//! addresses of the members it last knew, so it can rejoin even if its seeds are down. That
//! file is written off the event loop.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use bytes::Bytes;
use rustls_pki_types::CertificateDer;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

use super::core::{Core, Event, Remembered, Transmit};
use super::frame::{Protocol, encode_frame, read_frame, read_protocol, write_protocol};
use super::hoststate::{
    AppRecord, FleetAuthority, GossipMsg, HostRecord, HostTable, LogRecord, first_version,
};
use super::membership::{self, MemberId, Membership};
use super::peers::{Live, MAX_QUEUED, Pending, Pool, Slot};
use super::transport;
use super::view::HostView;
use crate::identity::revocation::RevocationList;
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
    /// How long a dead member stays listed before it is forgotten.
    pub forget_dead_after: Duration,
}

/// What the rest of the agent tells the mesh about this host as it changes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalState {
    pub tags: BTreeMap<String, String>,
    pub apps: BTreeMap<String, AppRecord>,
    /// Its part in the deployment log.
    pub log: Option<LogRecord>,
}

/// How long opening a stream, writing it or reading it whole may take.
pub const STREAM_DEADLINE: Duration = Duration::from_secs(5);
/// How long a connection the pool stopped using (a duplicate, or one over the bound) stays
/// open before it is closed, so that what is in flight on it arrives.
pub const DUPLICATE_GRACE: Duration = Duration::from_secs(2);
/// How long a dial or an incoming handshake may take.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);
/// Incoming handshakes in flight at once; more are refused.
pub const MAX_HANDSHAKES: usize = 64;
/// Incoming handshakes in flight at once from one IP address; more are refused, so one
/// source cannot take every handshake slot.
pub const MAX_HANDSHAKES_PER_SOURCE: usize = 4;
/// Streams read at once from one connection; the rest of its streams wait their turn (or
/// are stopped), so one peer cannot take every reader.
pub const MAX_READING_PER_PEER: usize = 8;
/// Membership datagrams taken from one connection per second; SWIM sends a few. More are
/// dropped, so one peer cannot fill the failure detector's queue.
pub const MAX_DATAGRAMS_PER_PEER_PER_SECOND: u32 = 200;
/// Operator connections open at once.
pub const MAX_OPERATOR_CONNECTIONS: usize = 32;
/// Streams this agent writes at once (gossip); more are dropped.
pub const MAX_WRITING: usize = 128;
/// Incoming streams read at once, all peers together; more are stopped.
pub const MAX_READING: usize = 128;
/// Queued membership packets (the failure detector's own queue).
const SWIM_QUEUE: usize = 2048;
/// Queued gossip messages, read whole, waiting for the core.
const GOSSIP_QUEUE: usize = 256;
/// Queued streams per registered service.
const SERVICE_QUEUE: usize = 64;
/// How often dropped work is reported.
pub const REPORT_EVERY: Duration = Duration::from_secs(10);

/// Who is at the other end of a connection, from its certificate.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub name: Arc<str>,
    pub role: Role,
    pub addr: SocketAddr,
}

/// A stream a peer opened, for the service that serves its protocol (the tag already read).
pub struct Inbound {
    pub peer: PeerInfo,
    pub stream: InboundStream,
    /// The stream's place in its connection's share of readers: keep it while reading.
    pub share: tokio::sync::OwnedSemaphorePermit,
}

pub enum InboundStream {
    Uni(quinn::RecvStream),
    Bi(quinn::SendStream, quinn::RecvStream),
}

/// The streams of one protocol, for the service that serves it: ends when the mesh shuts
/// down.
pub struct Streams {
    rx: mpsc::Receiver<Inbound>,
    shutdown: watch::Receiver<bool>,
}

impl Streams {
    /// The next stream, or `None` once the mesh shuts down.
    pub async fn next(&mut self) -> Option<Inbound> {
        tokio::select! {
            _ = self.shutdown.wait_for(|s| *s) => None,
            next = self.rx.recv() => next,
        }
    }
}

/// Why the mesh could not do what a service asked.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("`{0}` is not an alive member of the mesh")]
    UnknownPeer(String),
    #[error("could not connect to {addr}: {reason}")]
    Unreachable { addr: SocketAddr, reason: String },
    #[error("opening or writing a stream to {addr} failed: {reason}")]
    Stream { addr: SocketAddr, reason: String },
    #[error("the agent at {addr} is `{found}`, not `{expected}`")]
    WrongPeer {
        addr: SocketAddr,
        expected: String,
        found: String,
    },
    #[error("the mesh is shutting down")]
    ShuttingDown,
}

/// Counters of dropped or refused work, reported at warn (rate-limited).
#[derive(Default)]
pub struct Drops {
    pub swim_queue_full: AtomicU64,
    pub gossip_queue_full: AtomicU64,
    pub service_queue_full: AtomicU64,
    pub sends_waiting_for_dial: AtomicU64,
    pub writers_busy: AtomicU64,
    pub readers_busy: AtomicU64,
    pub bad_streams: AtomicU64,
    pub bad_datagrams: AtomicU64,
    pub handshakes_refused: AtomicU64,
    pub handshakes_failed: AtomicU64,
    pub unknown_protocol: AtomicU64,
    pub datagrams_over_rate: AtomicU64,
    pub operators_over_cap: AtomicU64,
}

impl Drops {
    /// Every counter once: its short name (what `/metrics` shows as `kind`), what the log
    /// calls it, and its count.
    pub fn counts(&self) -> [(&'static str, &'static str, u64); 13] {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        [
            (
                "swim_queue_full",
                "membership packets (queue full)",
                g(&self.swim_queue_full),
            ),
            (
                "gossip_queue_full",
                "gossip messages (queue full)",
                g(&self.gossip_queue_full),
            ),
            (
                "service_queue_full",
                "service streams (queue full)",
                g(&self.service_queue_full),
            ),
            (
                "sends_waiting_for_dial",
                "sends waiting for a dial",
                g(&self.sends_waiting_for_dial),
            ),
            (
                "writers_busy",
                "gossip sends (writers busy)",
                g(&self.writers_busy),
            ),
            (
                "readers_busy",
                "incoming streams (readers busy)",
                g(&self.readers_busy),
            ),
            (
                "bad_streams",
                "malformed or late streams",
                g(&self.bad_streams),
            ),
            (
                "bad_datagrams",
                "refused membership packets",
                g(&self.bad_datagrams),
            ),
            (
                "handshakes_refused",
                "handshakes refused (too many at once)",
                g(&self.handshakes_refused),
            ),
            (
                "handshakes_failed",
                "handshakes failed",
                g(&self.handshakes_failed),
            ),
            (
                "unknown_protocol",
                "streams of an unknown protocol",
                g(&self.unknown_protocol),
            ),
            (
                "datagrams_over_rate",
                "membership packets over a peer's rate",
                g(&self.datagrams_over_rate),
            ),
            (
                "operators_over_cap",
                "operator connections over the cap",
                g(&self.operators_over_cap),
            ),
        ]
    }
}

fn count(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

/// Lets one log line through per [`REPORT_EVERY`]: refusals are logged with their reason,
/// but a stranger cannot fill the log. Time is the monotonic clock's, from the first use.
#[derive(Default)]
pub struct RateLimit {
    last_ms: AtomicU64,
}

impl RateLimit {
    pub fn allow(&self) -> bool {
        static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        let epoch = *EPOCH.get_or_init(Instant::now);
        // Offset by one period, so that the first line always passes.
        let now = epoch.elapsed().as_millis() as u64 + REPORT_EVERY.as_millis() as u64;
        let last = self.last_ms.load(Ordering::Relaxed);
        now.saturating_sub(last) >= REPORT_EVERY.as_millis() as u64
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// The services that serve each protocol.
#[derive(Default)]
struct Router {
    services: RwLock<HashMap<Protocol, mpsc::Sender<Inbound>>>,
}

impl Router {
    fn register(&self, protocol: Protocol) -> mpsc::Receiver<Inbound> {
        let (tx, rx) = mpsc::channel(SERVICE_QUEUE);
        self.services
            .write()
            .expect("router lock")
            .insert(protocol, tx);
        rx
    }

    fn route(&self, protocol: Protocol, inbound: Inbound, drops: &Drops) {
        let tx = self
            .services
            .read()
            .expect("router lock")
            .get(&protocol)
            .cloned();
        let Some(tx) = tx else {
            count(&drops.unknown_protocol);
            refuse(inbound.stream);
            return;
        };
        if let Err(e) = tx.try_send(inbound) {
            count(&drops.service_queue_full);
            let inbound = match e {
                mpsc::error::TrySendError::Full(i) | mpsc::error::TrySendError::Closed(i) => i,
            };
            refuse(inbound.stream);
        }
    }
}

fn refuse(stream: InboundStream) {
    match stream {
        InboundStream::Uni(mut r) => {
            let _ = r.stop(1u32.into());
        }
        InboundStream::Bi(mut s, mut r) => {
            let _ = r.stop(1u32.into());
            let _ = s.reset(1u32.into());
        }
    }
}

enum Command {
    Established(Live),
    /// A dial failed; `busy` when the peer refused it for load (too many handshakes at
    /// once), which says nothing about whether it is alive.
    DialFailed {
        addr: SocketAddr,
        busy: bool,
    },
    Closed(SocketAddr, usize),
    /// A service wants a connection to a member, by name.
    Connect {
        peer: String,
        reply: oneshot::Sender<Result<quinn::Connection, MeshError>>,
    },
    Hosts(oneshot::Sender<Vec<HostView>>),
    /// A revocation list from an operator or a peer: adopted if the fleet CA signed it and
    /// it is newer than ours. The answer is the number of the list now in force.
    Revocations {
        der: Vec<u8>,
        reply: Option<oneshot::Sender<Result<u64, String>>>,
    },
}

/// How services use the mesh. Cheap to clone.
#[derive(Clone)]
pub struct MeshHandle {
    commands: mpsc::Sender<Command>,
    router: Arc<Router>,
    members: watch::Receiver<Arc<Vec<MemberId>>>,
    shutdown: watch::Receiver<bool>,
    drops: Arc<Drops>,
    /// The revocation list in force (shared with the handshakes' checks).
    revoked: Arc<RwLock<Option<Arc<RevocationList>>>>,
}

impl MeshHandle {
    /// The revocation list this agent enforces now, if any: what checks of signatures
    /// (an operator's intent, a stop) must honour too.
    pub fn revoked(&self) -> Option<Arc<RevocationList>> {
        self.revoked
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Registers the service for `protocol`: every stream a peer opens with that tag
    /// arrives on the returned channel (bounded; when it is full, streams are refused).
    pub fn serve(&self, protocol: Protocol) -> Streams {
        Streams {
            rx: self.router.register(protocol),
            shutdown: self.shutdown(),
        }
    }

    /// The members alive now, and their changes.
    pub fn members(&self) -> watch::Receiver<Arc<Vec<MemberId>>> {
        self.members.clone()
    }

    /// Turns true when the mesh stops; every service's task should end then.
    pub fn shutdown(&self) -> watch::Receiver<bool> {
        self.shutdown.clone()
    }

    /// The connection to the member named `peer`, dialled if need be.
    pub async fn connection(&self, peer: &str) -> Result<quinn::Connection, MeshError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Connect {
                peer: peer.to_string(),
                reply,
            })
            .await
            .map_err(|_| MeshError::ShuttingDown)?;
        answer.await.map_err(|_| MeshError::ShuttingDown)?
    }

    /// A unidirectional stream of `protocol` to the member named `peer`.
    pub async fn open_uni(
        &self,
        peer: &str,
        protocol: Protocol,
    ) -> Result<quinn::SendStream, MeshError> {
        let conn = self.connection(peer).await?;
        let addr = conn.remote_address();
        let stream_error = |reason: String| MeshError::Stream { addr, reason };
        tokio::time::timeout(STREAM_DEADLINE, async {
            let mut s = conn.open_uni().await.map_err(|e| e.to_string())?;
            write_protocol(&mut s, protocol)
                .await
                .map_err(|e| e.to_string())?;
            Ok(s)
        })
        .await
        .map_err(|_| stream_error(format!("not open within {STREAM_DEADLINE:?}")))?
        .map_err(stream_error)
    }

    /// A bidirectional stream of `protocol` to the member named `peer`.
    pub async fn open_bi(
        &self,
        peer: &str,
        protocol: Protocol,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), MeshError> {
        let conn = self.connection(peer).await?;
        let addr = conn.remote_address();
        let stream_error = |reason: String| MeshError::Stream { addr, reason };
        tokio::time::timeout(STREAM_DEADLINE, async {
            let (mut s, r) = conn.open_bi().await.map_err(|e| e.to_string())?;
            write_protocol(&mut s, protocol)
                .await
                .map_err(|e| e.to_string())?;
            Ok((s, r))
        })
        .await
        .map_err(|_| stream_error(format!("not open within {STREAM_DEADLINE:?}")))?
        .map_err(stream_error)
    }

    /// Every host as this agent sees it (what `shoal hosts` shows).
    pub async fn hosts(&self) -> Result<Vec<HostView>, MeshError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Hosts(reply))
            .await
            .map_err(|_| MeshError::ShuttingDown)?;
        answer.await.map_err(|_| MeshError::ShuttingDown)
    }

    /// Hands the mesh a revocation list (DER). It is adopted, enforced and spread if the
    /// fleet CA signed it and it is newer than the one in force; the answer is the number of
    /// the list in force, or why it was refused.
    pub async fn publish_revocations(&self, der: Vec<u8>) -> Result<u64, String> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Revocations {
                der,
                reply: Some(reply),
            })
            .await
            .map_err(|_| MeshError::ShuttingDown.to_string())?;
        answer
            .await
            .map_err(|_| MeshError::ShuttingDown.to_string())?
    }

    /// Passes on a revocation list received from a peer (no answer needed).
    pub fn offer_revocations(&self, der: Vec<u8>) {
        let _ = self
            .commands
            .try_send(Command::Revocations { der, reply: None });
    }

    /// Counters of dropped work.
    pub fn drops(&self) -> &Drops {
        &self.drops
    }
}

/// Both ends of a bounded queue.
type Queue<T> = (mpsc::Sender<T>, mpsc::Receiver<T>);

/// A bound mesh endpoint, ready to run.
pub struct Mesh {
    me: MemberId,
    listen: SocketAddr,
    endpoint: quinn::Endpoint,
    core: Core,
    handle: MeshHandle,
    commands: mpsc::Receiver<Command>,
    commands_tx: mpsc::Sender<Command>,
    swim: Queue<(Arc<str>, SocketAddr, Bytes)>,
    gossip: Queue<(SocketAddr, GossipMsg)>,
    members: watch::Sender<Arc<Vec<MemberId>>>,
    shutdown: watch::Sender<bool>,
    state_file: PathBuf,
    seeds: Vec<SocketAddr>,
    identity: Identity,
    revoked: Option<RevocationList>,
}

impl Mesh {
    /// Checks the identity, binds the endpoint and prepares the core; nothing is sent yet.
    pub fn bind(config: NodeConfig, initial: LocalState) -> Result<Mesh> {
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
        let state_file = config.data_dir.join("mesh").join("self.json");
        let revoked = super::revocation::load(&state_file, &config.identity);
        let endpoint = transport::endpoint(config.listen, &config.identity, revoked.as_ref())?;
        let remembered: Remembered = read_json(&state_file)
            .unwrap_or_else(|e| {
                tracing::warn!("{e:#}; starting the mesh state afresh");
                None
            })
            .unwrap_or_else(|| Remembered {
                // Without memory of a previous life, the clock tells lives apart.
                bump: (wall_ms() / 1000 % 65536) as u16,
                ..Remembered::default()
            });
        let me = MemberId {
            name: config.name.clone(),
            addr: config.advertise,
            bump: remembered.bump.wrapping_add(1),
        };
        let own = HostRecord {
            name: config.name.clone(),
            addr: config.advertise,
            version: first_version(remembered.version, wall_ms()),
            left: false,
            tags: initial.tags,
            apps: initial.apps,
            log: initial.log,
        };
        let seed = rand::random::<u64>();
        let mut authority = FleetAuthority::new(&config.identity).map_err(|e| {
            anyhow::anyhow!("the agent's identity cannot sign its host record: {e}")
        })?;
        if let Some(list) = &revoked {
            use super::hoststate::Authority;
            authority.set_revoked(list.serials.iter().cloned().collect());
        }
        let table = HostTable::new(own, Box::new(authority), seed ^ 0x9e37_79b9_7f4a_7c15)
            .map_err(|e| anyhow::anyhow!("this host's state cannot be published: {e}"))?;
        let core = Core::new(
            Instant::now(),
            wall_ms(),
            Membership::new(
                me.clone(),
                membership::config(64, config.forget_dead_after),
                seed,
            ),
            table,
            config.seeds.clone(),
            remembered.peers,
        );
        let (commands_tx, commands) = mpsc::channel(1024);
        let (members, members_rx) = watch::channel(Arc::new(Vec::new()));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let handle = MeshHandle {
            commands: commands_tx.clone(),
            router: Arc::new(Router::default()),
            members: members_rx,
            shutdown: shutdown_rx,
            drops: Arc::new(Drops::default()),
            revoked: Arc::new(RwLock::new(revoked.clone().map(Arc::new))),
        };
        Ok(Mesh {
            me,
            listen: config.listen,
            endpoint,
            core,
            handle,
            commands,
            commands_tx,
            swim: mpsc::channel(SWIM_QUEUE),
            gossip: mpsc::channel(GOSSIP_QUEUE),
            members,
            shutdown,
            state_file,
            seeds: config.seeds,
            identity: config.identity,
            revoked,
        })
    }

    pub fn handle(&self) -> MeshHandle {
        self.handle.clone()
    }

    /// Runs until `stop` resolves, then leaves gracefully.
    pub async fn run(
        self,
        mut local: watch::Receiver<LocalState>,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<()> {
        let Mesh {
            me,
            listen,
            endpoint,
            mut core,
            handle,
            mut commands,
            commands_tx,
            swim: (swim_tx, mut swim_rx),
            gossip: (gossip_tx, mut gossip_rx),
            members,
            shutdown,
            state_file,
            seeds,
            identity,
            revoked,
        } = self;
        tracing::info!(name = %me.name, addr = %me.addr, %listen, ?seeds, "joining the mesh");
        let inbound = Arc::new(InboundCtx {
            swim: swim_tx,
            router: handle.router.clone(),
            drops: handle.drops.clone(),
            commands: commands_tx,
            readers: Arc::new(Semaphore::new(MAX_READING)),
            refusals: RateLimit::default(),
            connections: Mutex::new(HashMap::new()),
            revoked: handle.revoked.clone(),
            operators: Arc::new(Semaphore::new(MAX_OPERATOR_CONNECTIONS)),
        });
        // The gossip service reads whole messages and queues them for the core.
        let gossip_streams = handle.serve(Protocol::Gossip);
        tokio::spawn(read_gossip(gossip_streams, gossip_tx, inbound.clone()));
        tokio::spawn(accept(endpoint.clone(), inbound.clone()));
        let (persist_tx, persist_rx) = watch::channel(None);
        let persister = tokio::spawn(persist(state_file.clone(), persist_rx));

        let mut driver = Driver {
            me: me.clone(),
            endpoint: endpoint.clone(),
            pool: Pool::default(),
            writers: Arc::new(Semaphore::new(MAX_WRITING)),
            inbound: inbound.clone(),
            persist: persist_tx,
            members,
            last_members: Vec::new(),
            identity,
            revoked,
            lists_file: super::revocation::file(&state_file),
        };
        driver.flush(&mut core);
        tokio::pin!(stop);
        let mut report = tokio::time::interval(REPORT_EVERY);
        report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reported = dropped(&handle.drops, &core);
        let mut rtts = tokio::time::interval(super::core::RTTS_EVERY);
        rtts.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut local_open = true;
        loop {
            let deadline = core
                .poll_timeout()
                .map(tokio::time::Instant::from_std)
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                biased;
                _ = &mut stop => break,
                Some((from, remote, data)) = swim_rx.recv() => {
                    crate::http::metrics::Metrics::count_direction(
                        &crate::http::metrics::metrics().swim_packets,
                        "received",
                        1,
                    );
                    if let Err(e) = core.handle_datagram(Instant::now(), &from, remote, &data) {
                        count(&handle.drops.bad_datagrams);
                        tracing::debug!(peer = %from, "dropped a membership packet: {e}");
                    }
                }
                Some(command) = commands.recv() => driver.command(&mut core, command),
                _ = tokio::time::sleep_until(deadline) => core.handle_timeout(Instant::now()),
                Some((from, msg)) = gossip_rx.recv() => {
                    crate::http::metrics::Metrics::count_direction(
                        &crate::http::metrics::metrics().gossip_messages,
                        "received",
                        1,
                    );
                    core.handle_gossip(Instant::now(), from, msg)
                }
                changed = local.changed(), if local_open => match changed {
                    Ok(()) => {
                        let state = local.borrow_and_update().clone();
                        core.handle_local(Instant::now(), state);
                    }
                    Err(_) => local_open = false,
                },
                _ = rtts.tick() => core.handle_rtts(Instant::now(), driver.pool.rtts()),
                _ = report.tick() => {
                    tracing::debug!(
                        open_connections = driver.pool.open(),
                        members = core.alive_addrs().len(),
                        "mesh status"
                    );
                    let now = dropped(&handle.drops, &core);
                    let news: Vec<String> = now
                        .iter()
                        .zip(reported.iter())
                        .filter(|((_, n), (_, o))| n > o)
                        .map(|((what, n), (_, o))| format!("{} {what}", n - o))
                        .collect();
                    if !news.is_empty() {
                        tracing::warn!(
                            open_connections = driver.pool.open(),
                            "dropped in the last {REPORT_EVERY:?}: {}",
                            news.join(", ")
                        );
                    }
                    reported = now;
                }
            }
            driver.flush(&mut core);
            crate::http::metrics::metrics()
                .mesh_connections
                .set(driver.pool.open() as i64);
        }

        // Leave: the record that says so and SWIM's leave, then a moment for both to go out.
        core.leave(Instant::now());
        driver.flush(&mut core);
        let _ = shutdown.send(true);
        tracing::info!("left the mesh");
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(driver);
        let _ = persister.await;
        endpoint.close(0u32.into(), b"agent stopped");
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        Ok(())
    }
}

/// Every counter of dropped or refused work: the driver's and the cores'.
fn dropped(drops: &Drops, core: &Core) -> Vec<(&'static str, u64)> {
    let t = core.table().stats();
    let mut all: Vec<(&'static str, u64)> = drops
        .counts()
        .iter()
        .map(|(_, what, n)| (*what, *n))
        .collect();
    all.extend([
        ("host records with a forged signature", t.refused_forged),
        ("host records with an absurd version", t.refused_absurd),
        ("host records or entries over a cap", t.refused_oversized),
        ("records of forgotten hosts", t.refused_forgotten),
        (
            "digests left unanswered (rate limit)",
            t.answers_rate_limited,
        ),
    ]);
    all
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Writes the latest state to remember, off the event loop; the last one is written
/// before the task ends.
async fn persist(path: PathBuf, mut rx: watch::Receiver<Option<Remembered>>) {
    let write = |state: Remembered, path: PathBuf| async move {
        let result = tokio::task::spawn_blocking(move || {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            write_json(&path, &state)
        })
        .await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("remembering the mesh state: {e:#}"),
            Err(e) => tracing::warn!("remembering the mesh state: {e}"),
        }
    };
    loop {
        let changed = rx.changed().await;
        let state = rx.borrow_and_update().clone();
        if let Some(state) = state {
            write(state, path.clone()).await;
        }
        if changed.is_err() {
            return;
        }
    }
}

/// What the accept loop and every connection's readers share.
struct InboundCtx {
    swim: mpsc::Sender<(Arc<str>, SocketAddr, Bytes)>,
    router: Arc<Router>,
    drops: Arc<Drops>,
    commands: mpsc::Sender<Command>,
    readers: Arc<Semaphore>,
    /// Logs of refused handshakes, either way.
    refusals: RateLimit,
    /// Every open connection (agents' and operators'), with the peer's certificate, so that
    /// a revocation can close those it names.
    connections: Mutex<HashMap<usize, (quinn::Connection, CertificateDer<'static>)>>,
    /// The revocation list in force, for connections that complete after it was adopted.
    revoked: Arc<RwLock<Option<Arc<RevocationList>>>>,
    /// Operator connections open, bounded.
    operators: Arc<Semaphore>,
}

/// The driver's IO state: the pool, and where things go.
struct Driver {
    me: MemberId,
    endpoint: quinn::Endpoint,
    pool: Pool,
    writers: Arc<Semaphore>,
    inbound: Arc<InboundCtx>,
    persist: watch::Sender<Option<Remembered>>,
    members: watch::Sender<Arc<Vec<MemberId>>>,
    last_members: Vec<MemberId>,
    identity: Identity,
    /// The revocation list in force.
    revoked: Option<RevocationList>,
    lists_file: PathBuf,
}

impl Driver {
    /// Carries out what the core asks for.
    fn flush(&mut self, core: &mut Core) {
        let now = Instant::now();
        while let Some(t) = core.poll_transmit() {
            match t {
                Transmit::Datagram { to, data, dial } => {
                    self.send_datagram(now, to, Bytes::from(data), dial)
                }
                Transmit::Gossip { to, msg } => self.send_gossip(now, to, msg),
            }
        }
        let mut membership_changed = false;
        while let Some(event) = core.poll_event() {
            match event {
                Event::Up(id) => {
                    membership_changed = true;
                    tracing::info!(member = %id.name, addr = %id.addr, "member is alive");
                    if let Some(list) = &self.revoked {
                        let frame = self.revocations_frame(list);
                        if let Some(frame) = frame {
                            self.send_frame(now, id.addr, Protocol::Revocations, frame);
                        }
                    }
                }
                Event::Down { id, left } => {
                    membership_changed = true;
                    if left {
                        tracing::info!(member = %id.name, addr = %id.addr, "member left");
                    } else {
                        tracing::warn!(member = %id.name, addr = %id.addr, "member is dead");
                        crate::http::metrics::metrics()
                            .member_changed(crate::http::metrics::MemberChange::Dead);
                    }
                }
                Event::Rejoined(id) => {
                    crate::http::metrics::metrics()
                        .member_changed(crate::http::metrics::MemberChange::Rejoined);
                    tracing::warn!(
                        bump = id.bump,
                        "the mesh had declared this agent down; rejoined"
                    );
                }
                Event::Alone => tracing::warn!(
                    "no member of the mesh is reachable; joining again through the seeds"
                ),
                Event::Forgotten(id) => {
                    membership_changed = true;
                    tracing::info!(member = %id.name, addr = %id.addr, "forgot a member long dead");
                }
                Event::Persist(state) => {
                    let _ = self.persist.send(Some(state));
                }
            }
        }
        if membership_changed {
            let alive: Vec<MemberId> = core.membership().alive().cloned().collect();
            if alive != self.last_members {
                self.last_members = alive.clone();
                let _ = self.members.send(Arc::new(alive));
            }
        }
    }

    fn command(&mut self, core: &mut Core, command: Command) {
        let now = Instant::now();
        match command {
            Command::Established(live) => {
                let addr = live.conn.remote_address();
                let (queued, close) = self.pool.established(now, &self.me.name, live);
                // Not at once: the peer may still be finishing its side of the handshake or
                // have packets in flight on it. Nothing new is sent on it meanwhile.
                for conn in close {
                    tokio::spawn(async move {
                        tokio::time::sleep(DUPLICATE_GRACE).await;
                        conn.close(2u32.into(), b"duplicate or over the connection bound");
                    });
                }
                if let Some(conn) = self.pool.live(now, addr).cloned() {
                    for p in queued {
                        deliver(&conn, p);
                    }
                }
            }
            Command::DialFailed { addr, busy } => {
                for p in self.pool.dial_failed(now, addr, busy) {
                    if let Pending::Want(reply) = p {
                        let _ = reply
                            .send(Err(format!("no fleet handshake with {addr} (backing off)")));
                    }
                }
            }
            Command::Closed(addr, id) => self.pool.closed(addr, id),
            Command::Connect { peer, reply } => {
                let Some(addr) = core
                    .membership()
                    .alive()
                    .find(|m| m.name == peer)
                    .map(|m| m.addr)
                else {
                    let _ = reply.send(Err(MeshError::UnknownPeer(peer)));
                    return;
                };
                let (tx, rx) = oneshot::channel();
                self.want(now, addr, Pending::Want(tx));
                tokio::spawn(async move {
                    let result = match tokio::time::timeout(HANDSHAKE_DEADLINE * 2, rx).await {
                        // Whatever answers at the address must be the member asked for.
                        Ok(Ok(Ok(conn))) => match transport::peer_identity(&conn) {
                            Ok((name, Role::Agent)) if name == peer => Ok(conn),
                            Ok((name, _)) => Err(MeshError::WrongPeer {
                                addr,
                                expected: peer,
                                found: name,
                            }),
                            Err(e) => Err(MeshError::Unreachable {
                                addr,
                                reason: format!("{e:#}"),
                            }),
                        },
                        Ok(Ok(Err(reason))) => Err(MeshError::Unreachable { addr, reason }),
                        Ok(Err(_)) => Err(MeshError::ShuttingDown),
                        Err(_) => Err(MeshError::Unreachable {
                            addr,
                            reason: "no connection within the deadline".into(),
                        }),
                    };
                    let _ = reply.send(result);
                });
            }
            Command::Hosts(reply) => {
                let _ = reply.send(core.hosts());
            }
            Command::Revocations { der, reply } => {
                let result = self.adopt(now, core, der);
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
        }
    }

    /// Adopts a revocation list if the fleet CA signed it and it is newer: enforced at every
    /// handshake from now on, live connections of revoked certificates closed, written to
    /// disk, and passed on to peers.
    fn adopt(&mut self, now: Instant, core: &mut Core, der: Vec<u8>) -> Result<u64, String> {
        // The list in force again (peers pass it on): nothing to check.
        if let Some(current) = self.revoked.as_ref().filter(|l| l.der == der) {
            return Ok(current.number);
        }
        let list = RevocationList::verify(&der, &self.identity.ca).map_err(|e| e.to_string())?;
        let current = self.revoked.as_ref().map_or(0, |l| l.number);
        if list.number <= current {
            return Ok(current);
        }
        let server =
            transport::server_config(&self.identity, Some(&list)).map_err(|e| format!("{e:#}"))?;
        let client =
            transport::client_config(&self.identity, Some(&list)).map_err(|e| format!("{e:#}"))?;
        self.endpoint.set_server_config(Some(server));
        self.endpoint.set_default_client_config(client);
        // Connections that complete from now on check this list as they register.
        *self.inbound.revoked.write().expect("revocation lock") = Some(Arc::new(list.clone()));
        let cut: Vec<(quinn::Connection, Option<String>)> = self
            .inbound
            .connections
            .lock()
            .expect("connections lock")
            .values()
            .filter(|(_, cert)| list.is_revoked(cert))
            .map(|(c, cert)| {
                (
                    c.clone(),
                    crate::identity::name_and_role(cert.as_ref())
                        .ok()
                        .map(|(n, _)| n),
                )
            })
            .collect();
        for (conn, _) in &cut {
            conn.close(3u32.into(), b"certificate revoked");
        }
        let names: Vec<String> = cut.iter().filter_map(|(_, n)| n.clone()).collect();
        tracing::warn!(
            number = list.number,
            revoked = list.serials.len(),
            closed = cut.len(),
            "a new revocation list is in force"
        );
        super::revocation::store(&self.lists_file, &list);
        core.revoke(Instant::now(), &list, &names);
        if let Some(frame) = self.revocations_frame(&list) {
            let peers = core.alive_addrs();
            let n = super::hoststate::fanout(peers.len());
            use rand::seq::IndexedRandom;
            for &to in peers.sample(&mut rand::rng(), n) {
                self.send_frame(now, to, Protocol::Revocations, frame.clone());
            }
        }
        let number = list.number;
        self.revoked = Some(list);
        Ok(number)
    }

    fn revocations_frame(&self, list: &RevocationList) -> Option<Arc<[u8]>> {
        encode_frame(&list.der).ok().map(Arc::from)
    }

    /// Sends a membership packet over the connection to `to`; without one, dials it only
    /// if `dial` (periodic gossip is not worth a handshake).
    fn send_datagram(&mut self, now: Instant, to: SocketAddr, data: Bytes, dial: bool) {
        if let Some(conn) = self.pool.live(now, to) {
            match conn.send_datagram(data) {
                Ok(()) => crate::http::metrics::Metrics::count_direction(
                    &crate::http::metrics::metrics().swim_packets,
                    "sent",
                    1,
                ),
                Err(e) => tracing::debug!(peer = %to, "datagram not sent: {e}"),
            }
            return;
        }
        if dial {
            self.want(now, to, Pending::Datagram(data));
        }
    }

    fn send_gossip(&mut self, now: Instant, to: SocketAddr, msg: GossipMsg) {
        match encode_frame(&msg) {
            Ok(frame) => {
                crate::http::metrics::Metrics::count_direction(
                    &crate::http::metrics::metrics().gossip_messages,
                    "sent",
                    1,
                );
                self.send_frame(now, to, Protocol::Gossip, Arc::from(frame))
            }
            Err(e) => {
                count(&self.inbound.drops.bad_streams);
                tracing::warn!(peer = %to, "a gossip message was not sent: {e}");
            }
        }
    }

    /// Sends one encoded frame on a new stream of `protocol` to `to` (one of a bounded number
    /// of writers, within the deadline).
    fn send_frame(&mut self, now: Instant, to: SocketAddr, protocol: Protocol, frame: Arc<[u8]>) {
        let Ok(permit) = self.writers.clone().try_acquire_owned() else {
            count(&self.inbound.drops.writers_busy);
            return;
        };
        let (tx, rx) = oneshot::channel();
        if let Some(conn) = self.pool.live(now, to) {
            let _ = tx.send(Ok(conn.clone()));
        } else {
            self.want(now, to, Pending::Want(tx));
        }
        tokio::spawn(async move {
            let _permit = permit;
            let Ok(Ok(conn)) = rx.await else { return };
            let sent = tokio::time::timeout(STREAM_DEADLINE, async {
                let mut stream = conn.open_uni().await?;
                write_protocol(&mut stream, protocol).await?;
                stream.write_all(&frame).await?;
                stream.finish()?;
                anyhow::Ok(())
            })
            .await;
            match sent {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(peer = %to, ?protocol, "not sent: {e:#}"),
                Err(_) => {
                    tracing::debug!(peer = %to, ?protocol, "not sent within {STREAM_DEADLINE:?}")
                }
            }
        });
    }

    /// Queues `item` for the connection to `to`, dialling it if no dial is under way and
    /// the back-off allows.
    fn want(&mut self, now: Instant, to: SocketAddr, item: Pending) {
        if to == self.me.addr {
            return;
        }
        match self.pool.slots.get_mut(&to) {
            Some(Slot::Connected(live)) if live.conn.close_reason().is_none() => {
                live.last_used = now;
                deliver(&live.conn.clone(), item);
                return;
            }
            Some(Slot::Dialing(queue)) => {
                if queue.len() < MAX_QUEUED {
                    queue.push(item);
                } else {
                    count(&self.inbound.drops.sends_waiting_for_dial);
                }
                return;
            }
            _ => {}
        }
        if !self.pool.backoff.may_dial(now, to) {
            if let Pending::Want(reply) = item {
                let _ = reply.send(Err(format!("{to} failed to connect recently; backing off")));
            }
            return;
        }
        self.pool.slots.insert(to, Slot::Dialing(vec![item]));
        tokio::spawn(dial(
            self.endpoint.clone(),
            to,
            self.pool.dials.clone(),
            self.inbound.clone(),
        ));
    }
}

/// Hands a connection to what waited for it.
fn deliver(conn: &quinn::Connection, item: Pending) {
    match item {
        Pending::Datagram(data) => {
            if let Err(e) = conn.send_datagram(data) {
                tracing::debug!(peer = %conn.remote_address(), "datagram not sent: {e}");
            }
        }
        Pending::Want(reply) => {
            let _ = reply.send(Ok(conn.clone()));
        }
    }
}

async fn dial(
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    dials: Arc<Semaphore>,
    ctx: Arc<InboundCtx>,
) {
    let Ok(_permit) = dials.acquire_owned().await else {
        return;
    };
    let dialled = async {
        let conn = tokio::time::timeout(HANDSHAKE_DEADLINE, transport::connect(&endpoint, addr))
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {HANDSHAKE_DEADLINE:?}"))??;
        let (name, role) = transport::peer_identity(&conn)?;
        if role != Role::Agent {
            conn.close(1u32.into(), b"not an agent");
            tracing::warn!(peer = %addr, "refused to join a peer: its certificate ({name}) is not an agent's");
            bail!("its certificate ({name}) is not an agent's");
        }
        anyhow::Ok((conn, name))
    };
    match dialled.await {
        Ok((conn, name)) => {
            tracing::debug!(peer = %addr, %name, "connected");
            let peer = PeerInfo {
                name: Arc::from(name.as_str()),
                role: Role::Agent,
                addr,
            };
            serve(conn.clone(), peer.clone(), ctx.clone());
            let live = Live::new(conn, peer.name, true, Instant::now());
            let _ = ctx.commands.send(Command::Established(live)).await;
        }
        Err(e) => {
            let error = e.downcast_ref::<quinn::ConnectionError>();
            // The peer is busy with other handshakes (a fleet starting at once): try again
            // soon, and do not count it against the peer.
            let busy = error.is_some_and(|c| {
                matches!(c, quinn::ConnectionError::ConnectionClosed(close)
                    if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED)
            });
            // The peer answered and the handshake failed (its certificate, or ours, was
            // refused): worth a warning. No answer at all is ordinary for a dead member.
            let refused = !busy
                && error.is_some_and(|c| {
                    matches!(
                        c,
                        quinn::ConnectionError::TransportError(_)
                            | quinn::ConnectionError::ConnectionClosed(_)
                    )
                });
            if refused && ctx.refusals.allow() {
                tracing::warn!(peer = %addr, "refused to join a peer: {e:#}");
            } else {
                tracing::debug!(peer = %addr, "could not connect: {e:#}");
            }
            count(&ctx.drops.handshakes_failed);
            let _ = ctx.commands.send(Command::DialFailed { addr, busy }).await;
        }
    }
}

/// Accepts connections until the endpoint closes. A source that has not proved its
/// address is asked to (retry); at most [`MAX_HANDSHAKES`] run at once, each within
/// [`HANDSHAKE_DEADLINE`]. Agents' connections join the pool; operators' serve requests.
async fn accept(endpoint: quinn::Endpoint, ctx: Arc<InboundCtx>) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let per_source: Arc<Mutex<HashMap<std::net::IpAddr, usize>>> = Arc::default();
    while let Some(incoming) = endpoint.accept().await {
        if !incoming.remote_address_validated() {
            let _ = incoming.retry();
            continue;
        }
        let source = incoming.remote_address().ip();
        let Some(slot) = SourceSlot::take(&per_source, source) else {
            count(&ctx.drops.handshakes_refused);
            incoming.refuse();
            continue;
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            count(&ctx.drops.handshakes_refused);
            incoming.refuse();
            continue;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _slot = slot;
            let remote = incoming.remote_address();
            let conn =
                match tokio::time::timeout(HANDSHAKE_DEADLINE, async { incoming.await }).await {
                    Ok(Ok(conn)) => conn,
                    Ok(Err(e)) => {
                        count(&ctx.drops.handshakes_failed);
                        if ctx.refusals.allow() {
                            tracing::warn!(peer = %remote, "refused a connection: {e}");
                        } else {
                            tracing::debug!(peer = %remote, "refused a connection: {e}");
                        }
                        return;
                    }
                    Err(_) => {
                        count(&ctx.drops.handshakes_failed);
                        return;
                    }
                };
            let (name, role) = match transport::peer_identity(&conn) {
                Ok(who) => who,
                Err(e) => {
                    count(&ctx.drops.handshakes_failed);
                    tracing::debug!(peer = %remote, "refused a connection: {e:#}");
                    conn.close(1u32.into(), b"unreadable certificate");
                    return;
                }
            };
            tracing::debug!(peer = %remote, %name, ?role, "accepted a connection");
            let peer = PeerInfo {
                name: Arc::from(name.as_str()),
                role,
                addr: remote,
            };
            if role == Role::Operator {
                let Ok(permit) = ctx.operators.clone().try_acquire_owned() else {
                    count(&ctx.drops.operators_over_cap);
                    conn.close(4u32.into(), b"too many operator connections; try again");
                    return;
                };
                let c = conn.clone();
                tokio::spawn(async move {
                    c.closed().await;
                    drop(permit);
                });
            }
            serve(conn.clone(), peer.clone(), ctx.clone());
            if role == Role::Agent {
                let live = Live::new(conn, peer.name, false, Instant::now());
                let _ = ctx.commands.send(Command::Established(live)).await;
            }
        });
    }
}

/// One of a source address's handshake slots, given back when dropped.
struct SourceSlot {
    map: Arc<Mutex<HashMap<std::net::IpAddr, usize>>>,
    ip: std::net::IpAddr,
}

impl SourceSlot {
    fn take(
        map: &Arc<Mutex<HashMap<std::net::IpAddr, usize>>>,
        ip: std::net::IpAddr,
    ) -> Option<Self> {
        let mut m = map.lock().expect("handshake slots lock");
        let n = m.entry(ip).or_insert(0);
        if *n >= MAX_HANDSHAKES_PER_SOURCE {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            map: map.clone(),
            ip,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut m = self.map.lock().expect("handshake slots lock");
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// Reads what a peer sends on `conn`: membership datagrams (agents only) for the core,
/// and streams for the router, each opened with its protocol tag.
fn serve(conn: quinn::Connection, peer: PeerInfo, ctx: Arc<InboundCtx>) {
    if let Ok(cert) = transport::peer_cert(&conn) {
        let id = conn.stable_id();
        ctx.connections
            .lock()
            .expect("connections lock")
            .insert(id, (conn.clone(), cert.clone()));
        // A handshake that completed under the previous list, after the new one was
        // enforced on the connections then open.
        let revoked = ctx.revoked.read().expect("revocation lock").clone();
        if revoked.is_some_and(|l| l.is_revoked(&cert)) {
            conn.close(3u32.into(), b"certificate revoked");
        }
        let (c, rctx) = (conn.clone(), ctx.clone());
        tokio::spawn(async move {
            c.closed().await;
            rctx.connections
                .lock()
                .expect("connections lock")
                .remove(&id);
        });
    }
    if peer.role == Role::Agent {
        let (c, dctx, name) = (conn.clone(), ctx.clone(), peer.name.clone());
        tokio::spawn(async move {
            let mut window = (Instant::now(), 0u32);
            while let Ok(data) = c.read_datagram().await {
                if window.0.elapsed() >= Duration::from_secs(1) {
                    window = (Instant::now(), 0);
                }
                window.1 += 1;
                if window.1 > MAX_DATAGRAMS_PER_PEER_PER_SECOND {
                    count(&dctx.drops.datagrams_over_rate);
                    continue;
                }
                // A full queue drops the packet: SWIM tolerates loss, the agent stays
                // responsive.
                if dctx
                    .swim
                    .try_send((name.clone(), c.remote_address(), data))
                    .is_err()
                {
                    count(&dctx.drops.swim_queue_full);
                }
            }
            // The peer's TLS may refuse us after our side of the handshake completed (our
            // certificate revoked, say): that is worth a warning, once in a while.
            if let Some(why) = c.close_reason().as_ref().and_then(transport::refusal)
                && dctx.refusals.allow()
            {
                tracing::warn!(peer = %c.remote_address(), "refused to join a peer: it says our certificate {why}");
            }
            let _ = dctx
                .commands
                .send(Command::Closed(c.remote_address(), c.stable_id()))
                .await;
        });
    }
    let share = Arc::new(Semaphore::new(MAX_READING_PER_PEER));
    if peer.role == Role::Agent {
        let (c, uctx, peer, share) = (conn.clone(), ctx.clone(), peer.clone(), share.clone());
        tokio::spawn(async move {
            while let Ok(stream) = c.accept_uni().await {
                route(
                    InboundStream::Uni(stream),
                    peer.clone(),
                    &share,
                    uctx.clone(),
                );
            }
        });
    }
    tokio::spawn(async move {
        while let Ok((send, recv)) = conn.accept_bi().await {
            route(
                InboundStream::Bi(send, recv),
                peer.clone(),
                &share,
                ctx.clone(),
            );
        }
    });
}

/// Reads a stream's protocol tag (within the deadline, as one of a bounded number of
/// readers) and hands the stream to the service that serves it.
fn route(stream: InboundStream, peer: PeerInfo, share: &Arc<Semaphore>, ctx: Arc<InboundCtx>) {
    let Ok(share) = share.clone().try_acquire_owned() else {
        count(&ctx.drops.readers_busy);
        refuse(stream);
        return;
    };
    let Ok(permit) = ctx.readers.clone().try_acquire_owned() else {
        count(&ctx.drops.readers_busy);
        refuse(stream);
        return;
    };
    tokio::spawn(async move {
        let _permit = permit;
        let mut stream = stream;
        let recv = match &mut stream {
            InboundStream::Uni(r) => r,
            InboundStream::Bi(_, r) => r,
        };
        match tokio::time::timeout(STREAM_DEADLINE, read_protocol(recv)).await {
            Ok(Ok(protocol)) => ctx.router.route(
                protocol,
                Inbound {
                    peer,
                    stream,
                    share,
                },
                &ctx.drops,
            ),
            Ok(Err(e)) => {
                count(&ctx.drops.bad_streams);
                tracing::debug!(peer = %peer.addr, name = %peer.name, "dropped a stream: {e}");
                refuse(stream);
            }
            Err(_) => {
                count(&ctx.drops.bad_streams);
                refuse(stream);
            }
        }
    });
}

/// The gossip service: reads each stream's one message whole (within the deadline, as one
/// of a bounded number of readers) and queues it for the core. Only agents gossip.
async fn read_gossip(
    mut streams: Streams,
    to_core: mpsc::Sender<(SocketAddr, GossipMsg)>,
    ctx: Arc<InboundCtx>,
) {
    while let Some(inbound) = streams.next().await {
        let share = inbound.share;
        let InboundStream::Uni(mut recv) = inbound.stream else {
            refuse(inbound.stream);
            continue;
        };
        if inbound.peer.role != Role::Agent {
            let _ = recv.stop(1u32.into());
            continue;
        }
        let Ok(permit) = ctx.readers.clone().try_acquire_owned() else {
            count(&ctx.drops.readers_busy);
            let _ = recv.stop(1u32.into());
            continue;
        };
        let (to_core, ctx, peer) = (to_core.clone(), ctx.clone(), inbound.peer);
        tokio::spawn(async move {
            let (_permit, _share) = (permit, share);
            match tokio::time::timeout(STREAM_DEADLINE, read_frame::<GossipMsg>(&mut recv)).await {
                Ok(Ok(msg)) => {
                    if to_core.try_send((peer.addr, msg)).is_err() {
                        count(&ctx.drops.gossip_queue_full);
                    }
                }
                Ok(Err(e)) => {
                    count(&ctx.drops.bad_streams);
                    tracing::debug!(peer = %peer.addr, name = %peer.name, "dropped a gossip stream: {e}");
                    let _ = recv.stop(1u32.into());
                }
                Err(_) => {
                    count(&ctx.drops.bad_streams);
                    let _ = recv.stop(1u32.into());
                }
            }
        });
    }
}
