//! The fleet service of one agent: its copy of the deployment log, the operator's requests
//! it answers or forwards, the coordinator when it leads, and its host side.
//!
//! - **Where the log lives.** Every agent opens `data_dir/raft` and runs an openraft node,
//!   idle until the log's leader adds it (first as a learner, then as a voter when
//!   [`super::voters`] picks it). Only voters hold the log for good.
//! - **How the log starts** (decision 0012). No central server: the first operator request
//!   that needs the log (a `deploy create`), on an agent that holds no log and hears of none
//!   by gossip, founds it with that agent as its only voter. The leader then grows the
//!   voters to 3 and 5 as the fleet grows ([`super::voters`]), one change at a time.
//! - **Finding the leader.** Members of the log gossip their part in it (voter or not,
//!   the term, the leader they know) in their signed host record. An agent that does not
//!   lead forwards an operator's request, once, to the leader it knows (from its own raft
//!   node, or else from gossip, highest term first). The leader checks for itself that it
//!   leads; a forwarded request is never forwarded again.
//! - **What the leader does.** It checks the operator's signature, chooses the targets
//!   from its own view of the mesh, plans (refusing a plan that cannot hold), commits the
//!   deployment and drives it ([`super::coordinator`]). Reads are answered from the log
//!   after checking, within a bound, that a majority still follows; if not, the answer
//!   says so ("no progress possible") rather than pretend.
//! - **Bounded.** Operator requests forwarded at once, host commands served at once, and
//!   deployments driven at once each have a semaphore; every stream a deadline.

use super::now_unix;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use openraft::{Raft, ServerState};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use super::coordinator::{self, COMMIT_WITHIN, Ctx};
use super::host::HostSide;
use super::intent::{self, SignedIntent};
use super::log::{
    self, Command, Fence, NewDeployment, Node, NodeId, PlannedHost, Response, StateReader,
    TypeConfig, node_id,
};
use super::plan::Planner;
use super::targets;
use super::voters::{Liveness, Voters};
use super::wire::{
    DeploymentSummary, DeploymentView, FleetRequest, GroupView, HostAnswer, MAX_LISTED,
    OperatorAnswer, OperatorRequest,
};
use crate::identity::sign::CertVerifier;
use crate::mesh::frame::{Protocol, read_frame, write_frame};
use crate::mesh::hoststate::LogRecord;
use crate::mesh::node::{InboundStream, MeshHandle, STREAM_DEADLINE, Streams};
use crate::mesh::view::MemberState;

/// The largest command proposed to the log, encoded: a frame holds it with room to spare.
/// A deployment's creation lists its hosts (about 100 bytes each), so this bounds one
/// deployment to a few thousand hosts for now.
pub const MAX_COMMAND: usize = 512 * 1024;
/// Deployments driven at once by a coordinator.
const MAX_DRIVING: usize = 64;
/// Fleet streams (forwarded requests, host commands) served at once.
const MAX_SERVING: usize = 64;
/// How long a forwarded operator request may take, commit included.
const FORWARD_WITHIN: Duration = Duration::from_secs(20);
/// How long one forwarding of an operator's request may take before the leader is looked
/// up again (a creation forwarded twice is recorded once: it is known by its intent's id).
const FORWARD_ATTEMPT: Duration = Duration::from_secs(5);
/// How long a host keeps asking the voters to confirm a command.
pub const CONFIRM_WITHIN: Duration = Duration::from_secs(10);
/// How long one voter has to answer a confirmation.
const CONFIRM_ASK: Duration = Duration::from_secs(2);
/// How often the coordinator looks for deployments to drive and the voters are checked.
const TICK: Duration = Duration::from_millis(200);

/// One agent's fleet service.
pub struct Fleet {
    pub name: String,
    addr: SocketAddr,
    raft: Raft<TypeConfig>,
    reader: StateReader,
    mesh: MeshHandle,
    host: Arc<HostSide>,
    verifier: Mutex<CertVerifier>,
    founding: tokio::sync::Mutex<()>,
    progress: coordinator::Progress,
    /// The term in which a majority last confirmed this agent's lead ([`Self::leads`]).
    confirmed_term: std::sync::atomic::AtomicU64,
    /// Told when a deployment is created, to drive it at once.
    created: Arc<tokio::sync::Notify>,
    /// Where to send notifications while this agent coordinates.
    webhooks: Arc<Vec<crate::config::Webhook>>,
}

/// The log as `/metrics` shows it ([`Fleet::metrics`]).
pub struct LogMetrics {
    pub deployments: Vec<(String, i64)>,
    pub term: u64,
    pub leader: bool,
    pub voter: bool,
}

/// Whom to ask.
enum Leader {
    Me,
    Other(String),
    /// A log exists (someone gossips it) but no leader is known now.
    Unknown,
    /// No agent this one hears of holds a log.
    NoLog,
}

impl Fleet {
    /// Opens the log under `data_dir/raft`, starts the raft node and serves `raft` and
    /// `fleet` streams; runs the coordinator, the voter upkeep and the gossip of this
    /// agent's part in the log until the mesh shuts down. `log_record` receives what this
    /// agent gossips about the log.
    pub async fn start(
        data_dir: &Path,
        addr: SocketAddr,
        mesh: MeshHandle,
        host: Arc<HostSide>,
        ca: rustls_pki_types::CertificateDer<'static>,
        log_record: watch::Sender<Option<LogRecord>>,
        webhooks: Vec<crate::config::Webhook>,
    ) -> Result<Arc<Fleet>> {
        let dir = data_dir.join("raft");
        let (log_store, sm) = tokio::task::spawn_blocking(move || log::open(&dir))
            .await
            .context("opening the deployment log")??;
        let reader = sm.reader();
        let config = Arc::new(
            log::raft_config()
                .validate()
                .context("the deployment log's configuration")?,
        );
        let name = host.name.clone();
        let raft = Raft::new(
            node_id(&name),
            config,
            log::network::Network::new(mesh.clone()),
            log_store,
            sm,
        )
        .await
        .context("starting the deployment log")?;
        let fleet = Arc::new(Fleet {
            name,
            addr,
            raft: raft.clone(),
            reader,
            mesh: mesh.clone(),
            host,
            verifier: Mutex::new(CertVerifier::new(ca)),
            founding: tokio::sync::Mutex::new(()),
            progress: Default::default(),
            confirmed_term: std::sync::atomic::AtomicU64::new(0),
            created: Arc::new(tokio::sync::Notify::new()),
            webhooks: Arc::new(webhooks),
        });
        tokio::spawn(log::network::serve(
            raft.clone(),
            mesh.serve(Protocol::Raft),
        ));
        tokio::spawn(serve(fleet.clone(), mesh.serve(Protocol::Fleet)));
        tokio::spawn(fleet.clone().upkeep(log_record));
        Ok(fleet)
    }

    /// What the raft node says of the leader.
    fn leader_here(&self) -> (Option<NodeId>, Option<String>, ServerState) {
        let m = self.raft.metrics().borrow().clone();
        let name = m.current_leader.and_then(|id| {
            m.membership_config
                .membership()
                .get_node(&id)
                .map(|n| n.name.clone())
        });
        (m.current_leader, name, m.state)
    }

    async fn leader(&self) -> Leader {
        if self.leads().await {
            return Leader::Me;
        }
        let (_, name, _) = self.leader_here();
        if let Some(name) = name
            && name != self.name
        {
            return Leader::Other(name);
        }
        // Gossip is a hint, and a member speaks only for itself: a leader is believed when a
        // majority of the agents that say they are voters name it in the same term, so one
        // agent claiming to lead (or to vote) cannot draw the fleet's requests to itself.
        let hosts = self.mesh.hosts().await.unwrap_or_default();
        let mut exists = self.raft.is_initialized().await.unwrap_or(false);
        let mut voters = 0usize;
        let mut named: BTreeMap<(u64, String), usize> = BTreeMap::new();
        for h in hosts {
            let Some(record) = &h.log else { continue };
            exists = true;
            if !record.voter || !matches!(h.state, MemberState::Alive | MemberState::Suspect) {
                continue;
            }
            voters += 1;
            if let Some(leader) = &record.leader {
                *named.entry((record.term, leader.clone())).or_default() += 1;
            }
        }
        let agreed = named
            .into_iter()
            .find(|((_, leader), n)| n * 2 > voters && *leader != self.name);
        match (agreed, exists) {
            (Some(((_, leader), _)), _) => Leader::Other(leader),
            (None, true) => Leader::Unknown,
            (None, false) => Leader::NoLog,
        }
    }

    /// Answers an operator's request: here if this agent leads the log, else through the
    /// leader. `forwarded` requests came from another agent and are never passed on.
    pub async fn operator(&self, request: OperatorRequest, forwarded: bool) -> OperatorAnswer {
        let deadline = Instant::now() + FORWARD_WITHIN;
        let mut last = String::from("no leader of the deployment log is known");
        loop {
            match self.leader().await {
                Leader::Me => return self.lead(request).await,
                Leader::Other(name) if !forwarded => {
                    // One attempt at most FORWARD_ATTEMPT: a leader that just died keeps
                    // its connection open a while, and the next one is elected meanwhile.
                    let left = deadline
                        .saturating_duration_since(Instant::now())
                        .min(FORWARD_ATTEMPT);
                    match forward(&self.mesh, &name, &request, left).await {
                        Ok(answer) => return answer,
                        Err(e) => last = format!("the log's leader {name} did not answer: {e:#}"),
                    }
                }
                Leader::Other(name) => {
                    return OperatorAnswer::Refused(format!(
                        "{} does not lead the deployment log ({name} does); ask again",
                        self.name
                    ));
                }
                // Only the agent the operator asked founds a log, never one a request was
                // forwarded to.
                Leader::NoLog
                    if !forwarded && matches!(request, OperatorRequest::Create { .. }) =>
                {
                    if let Err(e) = self.found().await {
                        return OperatorAnswer::Refused(format!(
                            "founding the deployment log: {e:#}"
                        ));
                    }
                    continue;
                }
                Leader::NoLog => {
                    return match request {
                        OperatorRequest::List { .. } => OperatorAnswer::Deployments(Vec::new()),
                        OperatorRequest::Groups => OperatorAnswer::Groups(Vec::new()),
                        _ => OperatorAnswer::Refused(
                            "no deployment log exists yet: no fleet deployment was ever created \
                             in this fleet"
                                .into(),
                        ),
                    };
                }
                Leader::Unknown => {}
            }
            if Instant::now() >= deadline {
                return OperatorAnswer::Refused(format!(
                    "{last}; no leader of the deployment log answered {} within {} s (a \
                     majority of its voters may be unreachable from it): nothing can progress \
                     until one does",
                    self.name,
                    FORWARD_WITHIN.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// What `/metrics` shows of the log: its deployments by status (every status), the
    /// current term, and whether this agent leads it and votes in it.
    pub fn metrics(&self) -> LogMetrics {
        use crate::lifecycle::status::DeploymentStatus as S;
        let m = self.raft.metrics().borrow().clone();
        let me = node_id(&self.name);
        let statuses = self.reader.read(|s| {
            let mut by: BTreeMap<String, i64> = [
                S::Created,
                S::InProgress,
                S::Baking,
                S::Succeeded,
                S::Failed,
                S::Stopped,
            ]
            .into_iter()
            .map(|s| (s.to_string(), 0))
            .collect();
            for d in s.iter() {
                *by.entry(d.status.status().to_string()).or_default() += 1;
            }
            by.into_iter().collect()
        });
        LogMetrics {
            deployments: statuses,
            term: m.current_term,
            leader: m.current_leader == Some(me),
            voter: m
                .membership_config
                .membership()
                .voter_ids()
                .any(|v| v == me),
        }
    }

    /// Whether this agent leads the log, confirmed by a majority in the current term. A
    /// leader that restarts comes back believing it still leads its old term (openraft
    /// restores it so); until a majority has answered it, it neither answers operators nor
    /// coordinates.
    async fn leads(&self) -> bool {
        let m = self.raft.metrics().borrow().clone();
        if m.state != ServerState::Leader || m.current_leader != Some(node_id(&self.name)) {
            return false;
        }
        if self
            .confirmed_term
            .load(std::sync::atomic::Ordering::Relaxed)
            == m.current_term
        {
            return true;
        }
        let confirmed = matches!(
            tokio::time::timeout(Duration::from_secs(2), self.raft.ensure_linearizable()).await,
            Ok(Ok(_))
        );
        if confirmed {
            self.confirmed_term
                .store(m.current_term, std::sync::atomic::Ordering::Relaxed);
        }
        confirmed
    }

    /// Founds the log with this agent as its only voter, unless it was founded meanwhile.
    async fn found(&self) -> Result<()> {
        let _one = self.founding.lock().await;
        if self.raft.is_initialized().await? {
            return Ok(());
        }
        let me = node_id(&self.name);
        tracing::info!(name = %self.name, "founding the deployment log, as its first voter");
        let members = BTreeMap::from([(
            me,
            Node {
                name: self.name.clone(),
                addr: self.addr,
            },
        )]);
        self.raft.initialize(members).await?;
        let mut metrics = self.raft.metrics();
        tokio::time::timeout(
            COMMIT_WITHIN,
            metrics.wait_for(|m| m.current_leader == Some(me) && m.state == ServerState::Leader),
        )
        .await
        .context("the new log did not elect this agent")??;
        Ok(())
    }

    /// Checks, within a bound, that a majority still follows this leader: `None` when it
    /// does, else a warning for the operator.
    async fn majority(&self) -> Option<String> {
        match tokio::time::timeout(Duration::from_secs(3), self.raft.ensure_linearizable()).await {
            Ok(Ok(_)) => None,
            _ => Some(format!(
                "{} cannot reach a majority of the deployment log's voters: this may be out of \
                 date, and no deployment progresses until a majority is reachable",
                self.name
            )),
        }
    }

    /// A deployment as the log has it, with the live events of hosts still running.
    fn view(&self, id: &str) -> Option<DeploymentView> {
        let mut view = self.reader.read(|s| {
            let d = s.get(id)?;
            let mut view = DeploymentView::of(d, Some(self.name.clone()));
            view.rollback = d.rolled_back_by.as_ref().and_then(|r| s.get(r)).map(|r| {
                super::wire::RollbackView {
                    id: r.id.clone(),
                    revision: r.revision.clone(),
                    status: r.status.status(),
                }
            });
            Some(view)
        })?;
        let progress = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        for host in &mut view.hosts {
            if host.status == crate::lifecycle::status::HostStatus::InProgress
                && let Some(events) = progress.get(&(view.id.clone(), host.name.clone()))
            {
                host.events = events.clone();
            }
        }
        Some(view)
    }

    /// The leader's answer.
    async fn lead(&self, request: OperatorRequest) -> OperatorAnswer {
        match request {
            OperatorRequest::Create { intent, holder } => self.create(intent, holder).await,
            OperatorRequest::Status { id } => {
                let warning = self.majority().await;
                match self.view(&id) {
                    Some(mut view) => {
                        view.warning = warning;
                        OperatorAnswer::Deployment(Box::new(view))
                    }
                    None => OperatorAnswer::Refused(format!(
                        "no deployment {} in the log",
                        targets::quote(&id)
                    )),
                }
            }
            OperatorRequest::List { app, group } => {
                let mut list: Vec<DeploymentSummary> = self.reader.read(|s| {
                    s.iter()
                        .filter(|d| app.as_ref().is_none_or(|a| *a == d.app))
                        .filter(|d| group.as_ref().is_none_or(|g| *g == d.group))
                        .map(DeploymentSummary::of)
                        .collect()
                });
                list.sort_by_key(|d| std::cmp::Reverse(d.created_at_ms));
                list.truncate(MAX_LISTED);
                OperatorAnswer::Deployments(list)
            }
            OperatorRequest::Groups => OperatorAnswer::Groups(
                self.reader
                    .read(|s| s.groups().map(GroupView::of).collect()),
            ),
            OperatorRequest::Stop { stop } => {
                let checked = {
                    let mut verifier = self.verifier.lock().unwrap_or_else(|p| p.into_inner());
                    verifier.honour(self.mesh.revoked().as_deref());
                    intent::verify_stop(&stop, &mut verifier, now_unix())
                };
                let stop = match checked {
                    Ok(s) => s,
                    Err(e) => return OperatorAnswer::Refused(format!("stop refused: {e}")),
                };
                match coordinator::commit(
                    &self.raft,
                    Command::Stop {
                        deployment: stop.deployment.clone(),
                        rollback: stop.rollback,
                    },
                )
                .await
                {
                    Ok(Response::Applied { .. } | Response::Unchanged) => {
                        tracing::info!(deployment = %stop.deployment, operator = %stop.operator, "deployment stopped");
                        match self.view(&stop.deployment) {
                            Some(v) => OperatorAnswer::Deployment(Box::new(v)),
                            None => OperatorAnswer::Refused("the deployment vanished".into()),
                        }
                    }
                    Ok(Response::Refused(r)) => OperatorAnswer::Refused(r.to_string()),
                    Ok(Response::Internal) => OperatorAnswer::Refused("unexpected answer".into()),
                    Err(e) => OperatorAnswer::Refused(e.to_string()),
                }
            }
        }
    }

    async fn create(&self, signed: SignedIntent, holder: Option<String>) -> OperatorAnswer {
        let checked = {
            let mut verifier = self.verifier.lock().unwrap_or_else(|p| p.into_inner());
            verifier.honour(self.mesh.revoked().as_deref());
            intent::verify(&signed, &mut verifier, now_unix())
        };
        let intent = match checked {
            Ok(i) => i,
            Err(e) => return OperatorAnswer::Refused(format!("intent refused: {e}")),
        };
        if let Some(existing) = self.view(&intent.id) {
            return OperatorAnswer::Deployment(Box::new(existing));
        }
        let group = if intent.group.is_empty() {
            intent.app.clone()
        } else {
            intent.group.clone()
        };
        let hosts = match self.mesh.hosts().await {
            Ok(h) => h,
            Err(e) => return OperatorAnswer::Refused(format!("the mesh is down here: {e}")),
        };
        let mut chosen = match targets::choose(
            &intent.targets,
            &intent.app,
            intent.zone_tag.as_deref(),
            &hosts,
        ) {
            Ok(c) => c,
            Err(e) => return OperatorAnswer::Refused(format!("--targets: {e}")),
        };
        if intent.outdated_only {
            // CodeDeploy's "outdated instances only": hosts already on it are left out.
            let current = crate::fleet::plan::Revision::Known(intent.revision.clone());
            chosen.hosts.retain(|h| h.revision != current);
            if chosen.hosts.is_empty() {
                return OperatorAnswer::Refused(format!(
                    "--outdated-only: every targeted host already runs revision {}",
                    intent.revision
                ));
            }
        }
        if let Err(e) = Planner::new(intent.config, chosen.hosts.clone(), &intent.revision)
            .and_then(|p| p.with_rollout(intent.rollout))
        {
            return OperatorAnswer::Refused(format!(
                "cannot plan {} over {} hosts: {e}",
                intent.config,
                chosen.hosts.len()
            ));
        }
        let signed_intent = match serde_json::to_vec(&signed) {
            Ok(b) => b,
            Err(e) => return OperatorAnswer::Refused(e.to_string()),
        };
        let signed_bytes = signed_intent.clone();
        let command = Command::CreateDeployment(NewDeployment {
            id: intent.id.clone(),
            app: intent.app.clone(),
            group,
            targets: intent.targets.to_string(),
            revision: intent.revision.clone(),
            config: intent.config,
            rollout: intent.rollout,
            rollback_to: intent.rollback_to.clone(),
            rollback_of: None,
            hosts: chosen
                .hosts
                .iter()
                .map(|h| PlannedHost {
                    name: h.name.clone(),
                    health: h.health,
                    revision: h.revision.clone(),
                    zone: h.zone.clone(),
                })
                .collect(),
            signed_intent,
            origin: holder,
            catch_up: None,
            created_at_ms: super::now_ms(),
        });
        let size = postcard::experimental::serialized_size(&command).unwrap_or(usize::MAX);
        if size > MAX_COMMAND {
            return OperatorAnswer::Refused(format!(
                "a deployment to {} hosts does not fit one log entry ({size} bytes, at most \
                 {MAX_COMMAND}); target fewer hosts per deployment",
                chosen.hosts.len()
            ));
        }
        match coordinator::commit(&self.raft, command).await {
            Ok(Response::Applied { .. } | Response::Unchanged) => {
                tracing::info!(deployment = %intent.id, app = %intent.app, operator = %intent.operator, hosts = chosen.hosts.len(), "deployment created");
                self.created.notify_one();
                match self.view(&intent.id) {
                    Some(v) => OperatorAnswer::Deployment(Box::new(v)),
                    None => OperatorAnswer::Refused("the deployment vanished".into()),
                }
            }
            Ok(Response::Refused(r)) => {
                // The same creation, forwarded twice (a slow leader, a retried forward):
                // the deployment the first made is the answer.
                let same = self.reader.read(|s| {
                    s.get(&intent.id)
                        .is_some_and(|d| d.signed_intent == signed_bytes)
                });
                match self.view(&intent.id) {
                    Some(v) if same => OperatorAnswer::Deployment(Box::new(v)),
                    _ => OperatorAnswer::Refused(r.to_string()),
                }
            }
            Ok(Response::Internal) => OperatorAnswer::Refused("unexpected answer".into()),
            Err(e) => OperatorAnswer::Refused(e.to_string()),
        }
    }

    /// Until the mesh shuts down: drives deployments while leading, keeps the voters, and
    /// tells the mesh this agent's part in the log.
    async fn upkeep(self: Arc<Self>, log_record: watch::Sender<Option<LogRecord>>) {
        let mut shutdown = self.mesh.shutdown();
        let mut driving: HashMap<String, JoinHandle<()>> = HashMap::new();
        let limit = Arc::new(Semaphore::new(MAX_DRIVING));
        // The voters' upkeep runs beside this loop (a change waits for a learner to catch
        // up), one at a time: the loop keeps driving, and noticing a lost lead, meanwhile.
        let voters = Arc::new(tokio::sync::Mutex::new(Voters::default()));
        let mut upkeep: Option<JoinHandle<()>> = None;
        // Notifications, while leading and if any webhook is configured.
        let mut notifier: Option<JoinHandle<()>> = None;
        // Catch-ups of late joiners, while leading.
        let mut catching_up: Option<JoinHandle<()>> = None;
        let mut next_voters = Instant::now();
        let me = node_id(&self.name);
        loop {
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => break,
                _ = tokio::time::sleep(TICK) => {}
                // A deployment was just created here: drive it now, not at the next tick.
                _ = self.created.notified() => {}
            }
            let m = self.raft.metrics().borrow().clone();
            let membership = m.membership_config.membership().clone();
            let member = membership.get_node(&me).is_some();
            let record = member.then(|| LogRecord {
                voter: membership.voter_ids().any(|v| v == me),
                term: m.current_term,
                leader: m
                    .current_leader
                    .and_then(|id| membership.get_node(&id))
                    .map(|n| n.name.clone()),
            });
            log_record.send_if_modified(|current| {
                let changed = *current != record;
                *current = record;
                changed
            });
            let leading = self.leads().await;
            driving.retain(|_, task| !task.is_finished());
            if !leading {
                for (_, task) in driving.drain() {
                    task.abort();
                }
                for task in [notifier.take(), catching_up.take()].into_iter().flatten() {
                    task.abort();
                }
                continue;
            }
            // Wait until this leader has applied what its predecessors committed.
            if m.last_applied.map(|l| l.leader_id.term) != Some(m.current_term) {
                continue;
            }
            if !self.webhooks.is_empty() && notifier.as_ref().is_none_or(|t| t.is_finished()) {
                notifier = Some(tokio::spawn(super::notify::run(
                    self.raft.clone(),
                    self.reader.clone(),
                    self.webhooks.clone(),
                )));
            }
            if catching_up.as_ref().is_none_or(|t| t.is_finished()) {
                catching_up = Some(tokio::spawn(super::catch_up::run(
                    self.raft.clone(),
                    self.reader.clone(),
                    self.mesh.clone(),
                    self.created.clone(),
                )));
            }
            let open: Vec<String> = self.reader.read(|s| {
                s.iter()
                    .filter(|d| {
                        !d.status.is_ended() || d.in_flight().next().is_some() || d.needs_rollback()
                    })
                    .map(|d| d.id.clone())
                    .collect()
            });
            for id in open {
                if driving.contains_key(&id) {
                    continue;
                }
                let Ok(permit) = limit.clone().try_acquire_owned() else {
                    break;
                };
                let ctx = Ctx {
                    raft: self.raft.clone(),
                    reader: self.reader.clone(),
                    mesh: self.mesh.clone(),
                    me: self.host.clone(),
                    progress: self.progress.clone(),
                };
                let deployment = id.clone();
                driving.insert(
                    id,
                    tokio::spawn(async move {
                        let _permit = permit;
                        if let Err(e) = coordinator::drive(ctx, deployment.clone()).await {
                            tracing::warn!(%deployment, "coordinating paused: {e}");
                        }
                    }),
                );
            }
            if Instant::now() >= next_voters && upkeep.as_ref().is_none_or(|t| t.is_finished()) {
                next_voters = Instant::now() + Duration::from_secs(1);
                let (this, voters) = (self.clone(), voters.clone());
                upkeep = Some(tokio::spawn(async move {
                    let mut voters = voters.lock().await;
                    this.keep_voters(&mut voters, &membership).await;
                }));
            }
        }
        if let Some(task) = upkeep {
            task.abort();
        }
        for task in [notifier, catching_up].into_iter().flatten() {
            task.abort();
        }
        for (_, task) in driving.drain() {
            task.abort();
        }
    }

    /// One step of the voter upkeep ([`Voters::decide`]): adds the new voters as learners,
    /// then changes the membership, with bounds on both.
    async fn keep_voters(
        &self,
        voters: &mut Voters,
        membership: &openraft::Membership<NodeId, Node>,
    ) {
        let Ok(hosts) = self.mesh.hosts().await else {
            return;
        };
        let mut members: BTreeMap<String, Liveness> = BTreeMap::new();
        let mut addrs: BTreeMap<String, SocketAddr> = BTreeMap::new();
        for h in &hosts {
            let up = matches!(h.state, MemberState::Alive | MemberState::Suspect);
            members.insert(
                h.name.clone(),
                if up { Liveness::Up } else { Liveness::Down },
            );
            addrs.insert(h.name.clone(), h.addr);
        }
        members.insert(self.name.clone(), Liveness::Up);
        let current: BTreeSet<String> = membership
            .voter_ids()
            .filter_map(|id| membership.get_node(&id).map(|n| n.name.clone()))
            .collect();
        let Some(wanted) = voters.decide(Instant::now(), &current, &members, &self.name) else {
            return;
        };
        tracing::info!(?current, ?wanted, "changing the deployment log's voters");
        for name in wanted.difference(&current) {
            let Some(addr) = addrs.get(name) else { return };
            let node = Node {
                name: name.clone(),
                addr: *addr,
            };
            match tokio::time::timeout(
                COMMIT_WITHIN,
                self.raft.add_learner(node_id(name), node, true),
            )
            .await
            {
                Ok(Ok(_)) => {}
                other => {
                    tracing::warn!(%name, "could not add a voter to the deployment log: {other:?}");
                    return;
                }
            }
        }
        let ids: BTreeSet<NodeId> = wanted.iter().map(|n| node_id(n)).collect();
        match tokio::time::timeout(COMMIT_WITHIN, self.raft.change_membership(ids, false)).await {
            Ok(Ok(_)) => tracing::info!(voters = ?wanted, "the deployment log's voters changed"),
            other => tracing::warn!("the voters did not change: {other:?}"),
        }
    }

    /// What this agent's applied state says of a command to `host` in `deployment` under
    /// `fence` carrying the intent whose digest is `intent` ([`Confirmation`]). Only the
    /// applied state counts: a `StartHosts` the state machine refused (the deployment was
    /// stopped first) leaves an entry in the log but starts nobody.
    fn confirmation(
        &self,
        deployment: &str,
        host: &str,
        fence: Fence,
        intent: &[u8; 32],
        catch_up: bool,
    ) -> super::wire::Confirmation {
        use super::wire::Confirmation;
        if self
            .reader
            .last_applied()
            .is_none_or(|applied| applied.index < fence.index)
        {
            return Confirmation::Unknown;
        }
        self.reader.read(|s| {
            let holds = s.confirms(deployment, host, fence, intent, catch_up);
            if holds {
                Confirmation::Holds
            } else {
                Confirmation::Conflicts
            }
        })
    }

    /// Checks with the log's voters that a command to this host is the log's: a majority of
    /// the voters this agent hears of (alive, each speaking for itself in gossip) must have
    /// applied the entry that started this host under the command's fence, for the very
    /// intent the command carries. An agent that is not the coordinator, a coordinator
    /// deposed before its entry committed, or one that reuses a fence for another intent,
    /// cannot get a host to act. A majority that says the state conflicts is final; voters
    /// that lag or do not answer are asked again for [`CONFIRM_WITHIN`].
    async fn confirm(&self, cmd: &super::wire::RunHost) -> Result<(), super::wire::Refusal> {
        use super::wire::Confirmation;
        let deadline = Instant::now() + CONFIRM_WITHIN;
        let digest = super::wire::intent_digest(&cmd.intent);
        loop {
            let mut voters: BTreeSet<String> = self
                .mesh
                .hosts()
                .await
                .unwrap_or_default()
                .into_iter()
                .filter(|h| {
                    h.log.as_ref().is_some_and(|l| l.voter)
                        && matches!(h.state, MemberState::Alive | MemberState::Suspect)
                })
                .map(|h| h.name)
                .collect();
            let m = self.raft.metrics().borrow().clone();
            let me = node_id(&self.name);
            if m.membership_config
                .membership()
                .voter_ids()
                .any(|v| v == me)
            {
                voters.insert(self.name.clone());
            }
            let n = voters.len();
            let mut asked = tokio::task::JoinSet::new();
            for voter in &voters {
                let (voter, mesh) = (voter.clone(), self.mesh.clone());
                let (deployment, host, fence) =
                    (cmd.deployment.clone(), self.name.clone(), cmd.fence);
                let catch_up = cmd.catch_up.is_some();
                if voter == self.name {
                    let answer = self.confirmation(&deployment, &host, fence, &digest, catch_up);
                    asked.spawn(async move { answer });
                    continue;
                }
                asked.spawn(async move {
                    let ask = async {
                        let (mut send, mut recv) = mesh.open_bi(&voter, Protocol::Fleet).await?;
                        write_frame(
                            &mut send,
                            &FleetRequest::Confirm {
                                deployment,
                                host,
                                fence,
                                intent: digest,
                                catch_up,
                            },
                        )
                        .await?;
                        send.finish()?;
                        anyhow::Ok(read_frame::<Confirmation>(&mut recv).await?)
                    };
                    match tokio::time::timeout(CONFIRM_ASK, ask).await {
                        Ok(Ok(answer)) => answer,
                        _ => Confirmation::Unknown,
                    }
                });
            }
            // Decided as soon as a majority agrees; the slow voters are not waited for.
            let (mut holds, mut conflicts) = (0, 0);
            while let Some(answer) = asked.join_next().await {
                match answer {
                    Ok(Confirmation::Holds) => holds += 1,
                    Ok(Confirmation::Conflicts) => conflicts += 1,
                    _ => {}
                }
                if holds * 2 > n || conflicts * 2 > n {
                    break;
                }
            }
            asked.abort_all();
            if n > 0 && holds * 2 > n {
                return Ok(());
            }
            let final_ = n > 0 && conflicts * 2 > n;
            if Instant::now() >= deadline || final_ {
                let reason = format!(
                    "the deployment log did not confirm this command: {holds} of the {n} voters \
                     this host hears of have it started under {} for this intent ({conflicts} \
                     say otherwise); it comes from an agent that does not coordinate the \
                     deployment, or from a deposed coordinator",
                    cmd.fence
                );
                return Err(if final_ {
                    super::wire::Refusal::lasting(reason)
                } else {
                    super::wire::Refusal::passing(reason)
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Asks the agent `leader` to answer `request` (once: it will not pass it on).
async fn forward(
    mesh: &MeshHandle,
    leader: &str,
    request: &OperatorRequest,
    within: Duration,
) -> Result<OperatorAnswer> {
    tokio::time::timeout(within, async {
        let (mut send, mut recv) = mesh.open_bi(leader, Protocol::Fleet).await?;
        write_frame(&mut send, &FleetRequest::Operator(request.clone())).await?;
        send.finish()?;
        Ok(read_frame::<OperatorAnswer>(&mut recv).await?)
    })
    .await
    .context("no answer in time")?
}

/// Serves `fleet` streams from other agents: forwarded operator requests (answered only
/// by the leader) and coordinators' commands to this host.
async fn serve(fleet: Arc<Fleet>, mut streams: Streams) {
    let serving = Arc::new(Semaphore::new(MAX_SERVING));
    while let Some(inbound) = streams.next().await {
        let InboundStream::Bi(mut send, mut recv) = inbound.stream else {
            continue;
        };
        if inbound.peer.role != crate::identity::Role::Agent {
            let _ = send.reset(1u32.into());
            continue;
        }
        let Ok(permit) = serving.clone().try_acquire_owned() else {
            let _ = send.reset(2u32.into());
            continue;
        };
        let fleet = fleet.clone();
        let from = inbound.peer.name.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let share = inbound.share;
            let request =
                match tokio::time::timeout(STREAM_DEADLINE, read_frame::<FleetRequest>(&mut recv))
                    .await
                {
                    Ok(Ok(r)) => r,
                    _ => return,
                };
            // The request is read: the connection's share of readers goes back, so a long
            // host run does not hold it (raft calls from the same peer need it).
            drop(share);
            match request {
                FleetRequest::Operator(request) => {
                    let answer = fleet.operator(request, true).await;
                    let _ = tokio::time::timeout(STREAM_DEADLINE, write_frame(&mut send, &answer))
                        .await;
                    let _ = send.finish();
                }
                FleetRequest::Confirm {
                    deployment,
                    host,
                    fence,
                    intent,
                    catch_up,
                } => {
                    let answer = fleet.confirmation(&deployment, &host, fence, &intent, catch_up);
                    let _ = tokio::time::timeout(STREAM_DEADLINE, write_frame(&mut send, &answer))
                        .await;
                    let _ = send.finish();
                }
                FleetRequest::RunHost(cmd) => {
                    tracing::debug!(coordinator = %from, deployment = %cmd.deployment, fence = %cmd.fence, "host command");
                    let host = fleet.host.clone();
                    // The operator's signature and this host's tags first, then the log.
                    // An intent that ended here is reported again without asking the log
                    // (nothing runs); anything else must be the log's.
                    let checked = match host.check(&cmd, super::now_unix()) {
                        Ok(_) if host.ended(&cmd.deployment) => Ok(()),
                        Ok(_) => fleet.confirm(&cmd).await,
                        Err(why) => Err(super::wire::Refusal::lasting(why)),
                    };
                    let accepted = match checked {
                        Ok(()) => host.accept(cmd).await,
                        Err(why) => Err(why),
                    };
                    let answer = match accepted {
                        Err(why) => {
                            tracing::warn!(coordinator = %from, "command refused: {why}");
                            HostAnswer::Refused(why)
                        }
                        Ok(Ok((verdict, report))) => HostAnswer::Done { verdict, report },
                        Ok(Err(mut running)) => {
                            if tokio::time::timeout(
                                STREAM_DEADLINE,
                                write_frame(&mut send, &HostAnswer::Started),
                            )
                            .await
                            .is_err()
                            {
                                return;
                            }
                            // Each change of the run's events, then its end.
                            loop {
                                let state = running.borrow_and_update().clone();
                                if let Some((verdict, report)) = state.done {
                                    break HostAnswer::Done { verdict, report };
                                }
                                let told = tokio::time::timeout(
                                    STREAM_DEADLINE,
                                    write_frame(&mut send, &HostAnswer::Progress(state.events)),
                                )
                                .await;
                                if !matches!(told, Ok(Ok(()))) || running.changed().await.is_err() {
                                    return;
                                }
                            }
                        }
                    };
                    let _ = tokio::time::timeout(STREAM_DEADLINE, write_frame(&mut send, &answer))
                        .await;
                    let _ = send.finish();
                }
            }
        });
    }
}
