//! What the deployment log means: the commands its entries carry and the state they build.
//!
//! [`DeploymentsState::apply`] is a pure function of the state and one committed entry: no
//! clock, no randomness, no IO, ordered maps only. Every voter applies the same entries in
//! the same order and so holds the same state, byte for byte; a new leader (the next batch
//! coordinator) reads from it which hosts were started, which reported, and with what
//! fencing token each was commanded.
//!
//! The rules that make a coordinator's failover safe live here:
//! - A host is commanded only after a [`Command::StartHosts`] naming it is committed, and
//!   the command carries that entry's position as its [`Fence`]. A host refuses a fence
//!   lower than the highest it has seen, so a deposed coordinator cannot act.
//! - A host that has a result is never started again; a host started but not reported may
//!   be commanded again (with a newer fence) by a new leader that could not learn its fate.
//! - No batch starts once a deployment is stopped or has its verdict. Hosts already in
//!   flight still report.
//! - The first result of a host stands: the same result again is [`Response::Unchanged`],
//!   a different one is refused.
//!
//! Refusals are answers ([`Response::Refused`]), never panics: a command that does not fit
//! the state changes nothing, and the entry stays in the log like any other.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::fleet::plan::{DeploymentConfig, Health, HostInfo, Revision, Rollout};
use crate::lifecycle::plan::EventRecord;
use crate::lifecycle::status;

/// A fencing token: the Raft term and log index of the committed entry that authorised a
/// command. Tokens order by term, then index, so every token a newer leader issues is higher
/// than any its predecessors issued.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Fence {
    pub term: u64,
    pub index: u64,
}

impl fmt::Display for Fence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.term, self.index)
    }
}

/// A host a deployment targets, as the coordinator found it when the deployment was
/// created: enough to rebuild the same [`crate::fleet::plan::Planner`] on any voter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedHost {
    pub name: String,
    pub health: Health,
    /// What it ran when the deployment was created.
    pub revision: Revision,
    /// Its zone, for a rollout zone by zone.
    pub zone: Option<String>,
}

/// A deployment as it enters the log: the operator's signed intent and what the
/// coordinator decided from it (the hosts, their health and revisions at the time).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewDeployment {
    /// Unique among the log's deployments.
    pub id: String,
    pub app: String,
    /// The deployment group it belongs to (its targets and config are remembered there).
    pub group: String,
    /// The targets as the operator gave them (`fleet::targets::Targets`' text form).
    pub targets: String,
    /// The revision id being deployed.
    pub revision: String,
    pub config: DeploymentConfig,
    /// The waves the hosts are released in, and the bake between them.
    pub rollout: Rollout,
    /// The revision the operator consented to roll back to if this fails.
    pub rollback_to: Option<String>,
    /// When this is a rollback: the deployment it rolls back (which must have ended and
    /// have no rollback yet).
    pub rollback_of: Option<String>,
    /// The targeted hosts (at least one, names unique).
    pub hosts: Vec<PlannedHost>,
    /// The intent as the operator signed it, kept verbatim: every host checks it before it
    /// installs anything.
    pub signed_intent: Vec<u8>,
    /// When the coordinator accepted it (Unix milliseconds, its clock): for display only.
    pub created_at_ms: u64,
    /// The agent the operator uploaded the bundle to: a holder of the revision that any
    /// coordinator, after a failover too, names to the hosts.
    pub origin: Option<String>,
    /// When this is a catch-up: the deployment whose revision it brings to hosts that
    /// joined its group after it succeeded, or missed it ([`DeploymentsState::catch_up_source`]).
    pub catch_up: Option<CatchUpOf>,
}

/// The most catch-ups of one deployment that one host may be in: a host that keeps
/// losing its revision (or says it does) cannot keep its group busy, nor grow the log.
pub const MAX_CATCH_UPS_PER_HOST: usize = 2;

/// What a catch-up deployment catches up with: the deployment `of` (the group's last
/// success, whose signed intent it carries), and how many catch-ups of it came before
/// (what its id is derived from, [`crate::fleet::intent::catch_up_id`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatchUpOf {
    pub of: String,
    pub number: u32,
}

/// How a host's deployment, or a whole deployment, ended.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Verdict {
    Succeeded,
    Failed { reason: String },
}

impl Verdict {
    /// What the planner is told ([`crate::fleet::plan::Planner::host_done`]): the verdict
    /// without its reason.
    pub fn outcome(&self) -> crate::fleet::plan::Outcome {
        match self {
            Verdict::Succeeded => crate::fleet::plan::Outcome::Succeeded,
            Verdict::Failed { .. } => crate::fleet::plan::Outcome::Failed,
        }
    }
}

/// What a log entry asks for. Proposed by the coordinator (the leader), applied by every
/// voter once committed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Records a new deployment, every host Pending. The same deployment again is
    /// [`Response::Unchanged`] (a retried proposal); another with the same id is refused.
    CreateDeployment(NewDeployment),
    /// Records that these hosts are about to be commanded; the answer's fence is the token
    /// those commands carry. All or nothing.
    StartHosts {
        deployment: String,
        hosts: Vec<String>,
    },
    /// A host's result, as the host reported it.
    HostResult {
        deployment: String,
        host: String,
        verdict: Verdict,
        /// What the host said of its events (bounded by [`HostReport::bounded`]).
        report: HostReport,
    },
    /// The operator stopped it: no batch starts after this; hosts not started are Skipped.
    /// With `rollback`, it is then rolled back like a failed one.
    Stop { deployment: String, rollback: bool },
    /// The coordinator's verdict on the deployment ([`crate::fleet::plan::Planner::status`]).
    Finish {
        deployment: String,
        verdict: Verdict,
    },
    /// A wave ended and the next waits until `until_ms` (Unix milliseconds, the
    /// coordinator's clock): the deployment is Baking. The next [`Command::StartHosts`]
    /// ends the bake.
    Bake { deployment: String, until_ms: u64 },
    /// The coordinator delivered these notifications of the deployment to its webhooks
    /// (or gave up on them): no coordinator sends them again
    /// ([`crate::fleet::notify`]).
    Notified {
        deployment: String,
        keys: Vec<String>,
    },
}

/// The most notifications one deployment records: one per host failure (only the first
/// this many are sent), and a few of its own.
pub const MAX_NOTICES: usize = 4096;
/// The longest notification key.
pub const MAX_NOTICE_KEY: usize = 160;

impl Command {
    /// The deployment the command is about.
    pub fn deployment(&self) -> &str {
        match self {
            Command::CreateDeployment(new) => &new.id,
            Command::StartHosts { deployment, .. }
            | Command::HostResult { deployment, .. }
            | Command::Bake { deployment, .. }
            | Command::Notified { deployment, .. }
            | Command::Stop { deployment, .. }
            | Command::Finish { deployment, .. } => deployment,
        }
    }
}

/// The answer to an applied entry, returned to whoever proposed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The state changed. `fence` is the entry's position: for [`Command::StartHosts`], the
    /// token the hosts' commands carry.
    Applied { fence: Fence },
    /// The command repeats what the state already says; nothing changed.
    Unchanged,
    /// The command does not fit the state; nothing changed.
    Refused(Refusal),
    /// A Raft entry of its own (blank or membership), not a command.
    Internal,
}

/// Why a command was refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    #[error("no deployment {id:?} in the log")]
    UnknownDeployment { id: String },
    #[error("deployment {id:?}: notifications past the bound, or an empty or overlong key")]
    TooManyNotices { id: String },
    #[error("deployment {id:?} already exists with other contents")]
    DeploymentExists { id: String },
    #[error("deployment {id:?} has no hosts")]
    NoHosts { id: String },
    #[error("host {host:?} is named twice")]
    DuplicateHost { host: String },
    #[error("host {host:?} is not part of deployment {deployment:?}")]
    UnknownHost { deployment: String, host: String },
    #[error("host {host:?} has not been started")]
    HostNotStarted { host: String },
    #[error("host {host:?} already reported {recorded:?}")]
    HostFinished { host: String, recorded: HostState },
    #[error(
        "deployment {id:?} cannot be rolled back ({status:?}, rolled back by \
         {rolled_back_by:?}): a rollback is not rolled back, and one whose intent names no \
         revision to roll back to (made with --no-rollback, or the first of its group) cannot \
         be; deploy the revision you want instead"
    )]
    NoRollback {
        id: String,
        status: DeploymentState,
        rolled_back_by: Option<String>,
    },
    #[error(
        "a catch-up of deployment {of:?} does not fit: only the group's last success (its \
         newest deployment succeeded), with its revision, targets and signed intent, in one \
         wave, under the next catch-up number's id, to hosts in fewer than \
         {MAX_CATCH_UPS_PER_HOST} catch-ups of it"
    )]
    NoCatchUp { of: String },
    #[error("deployment {id:?} cannot bake now ({status:?}): only between two waves")]
    NotBakeable { id: String, status: DeploymentState },
    #[error("deployment {id:?} has ended ({status:?})")]
    DeploymentEnded { id: String, status: DeploymentState },
    #[error("{count} host(s) have not reported, so deployment {id:?} cannot have succeeded")]
    HostsUnfinished { id: String, count: usize },
    #[error("deployment group {group:?} belongs to application {app:?}")]
    GroupOfAnotherApp { group: String, app: String },
    #[error(
        "deployment {deployment} of group {group:?} is still active (running, or stopped with \
         hosts that have not reported): wait for it to end, or stop it if it runs \
         (`shoal deploy stop {deployment}`)"
    )]
    GroupBusy { group: String, deployment: String },
}

/// Where a deployment is, as far as the log knows it: CodeDeploy's status
/// ([`Self::status`]) with what goes with it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DeploymentState {
    /// Recorded; no host started yet.
    Created,
    InProgress,
    Succeeded,
    Failed {
        reason: String,
    },
    Stopped,
    /// Between two waves, until `until_ms` (Unix milliseconds).
    Baking {
        until_ms: u64,
    },
}

impl DeploymentState {
    /// The status word, as `--json` shows it.
    pub fn status(&self) -> status::DeploymentStatus {
        match self {
            DeploymentState::Created => status::DeploymentStatus::Created,
            DeploymentState::InProgress => status::DeploymentStatus::InProgress,
            DeploymentState::Baking { .. } => status::DeploymentStatus::Baking,
            DeploymentState::Succeeded => status::DeploymentStatus::Succeeded,
            DeploymentState::Failed { .. } => status::DeploymentStatus::Failed,
            DeploymentState::Stopped => status::DeploymentStatus::Stopped,
        }
    }

    /// Whether the deployment has ended (no batch may start).
    pub fn is_ended(&self) -> bool {
        matches!(
            self,
            DeploymentState::Succeeded | DeploymentState::Failed { .. } | DeploymentState::Stopped
        )
    }
}

/// One host's progress in a deployment.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HostState {
    Pending,
    /// Commanded with this token (the newest, if it was commanded again).
    InProgress {
        fence: Fence,
    },
    Succeeded,
    Failed {
        reason: String,
    },
    /// Never started: the deployment stopped or ended first.
    Skipped,
}

impl HostState {
    /// The status word, as `--json` shows it.
    pub fn status(&self) -> status::HostStatus {
        match self {
            HostState::Pending => status::HostStatus::Pending,
            HostState::InProgress { .. } => status::HostStatus::InProgress,
            HostState::Succeeded => status::HostStatus::Succeeded,
            HostState::Failed { .. } => status::HostStatus::Failed,
            HostState::Skipped => status::HostStatus::Skipped,
        }
    }
}

/// A host of a deployment: how it was planned and where it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentHost {
    pub health: Health,
    pub revision: Revision,
    pub zone: Option<String>,
    pub state: HostState,
    /// The fence of the entry that first started it: hosts started by the same entry were
    /// one batch.
    pub started: Option<Fence>,
    /// Its events and the last lines of its hook logs, once it reported.
    pub report: HostReport,
}

/// The latest a bake may end, after its deployment was created: the operator's intent must
/// still verify on hosts (and for its rollback) when the rollout ends.
pub const MAX_ROLLOUT_MS: u64 = crate::fleet::plan::MAX_ROLLOUT_SECS * 1000;

/// The most events a host report keeps (CodeDeploy's in-place lifecycle has 9, a rollback
/// as many again, the traffic events 6 more).
pub const MAX_REPORT_EVENTS: usize = 24;
/// The most log lines a host report keeps, and their longest length in bytes.
pub const MAX_REPORT_LINES: usize = 10;
pub const MAX_REPORT_LINE: usize = 200;

/// What a host says of its part in a deployment: each lifecycle event's status and the
/// last lines of its hook logs. Bounded before it is proposed ([`HostReport::bounded`]), so
/// one host cannot swell the log.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostReport {
    /// Lifecycle events in the order they ran, with their status.
    pub events: Vec<EventRecord>,
    /// The last lines of the hook logs (a failed hook's reason last).
    pub tail: Vec<String>,
    /// What fetching the revision moved, when it was fetched. (Log format 5.)
    pub transfer: Option<TransferReport>,
}

/// Bytes a host fetched for a revision, and bytes it held already (earlier revisions'
/// chunks), from how many peers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferReport {
    pub fetched_bytes: u64,
    pub reused_bytes: u64,
    pub sources: u32,
}

impl HostReport {
    /// The report cut to [`MAX_REPORT_EVENTS`] events and the last
    /// [`MAX_REPORT_LINES`] lines of at most [`MAX_REPORT_LINE`] bytes each.
    pub fn bounded(mut self) -> HostReport {
        self.events.truncate(MAX_REPORT_EVENTS);
        let skip = self.tail.len().saturating_sub(MAX_REPORT_LINES);
        self.tail.drain(..skip);
        for line in &mut self.tail {
            cut(line, MAX_REPORT_LINE);
        }
        self
    }
}

/// Cuts `s` to at most `max` bytes, on a character boundary.
fn cut(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// A deployment group, as CodeDeploy has them: the targets and config its deployments
/// used last, and the last revision that succeeded in it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub name: String,
    pub app: String,
    pub targets: String,
    pub config: DeploymentConfig,
    pub rollout: Rollout,
    /// The revision of the newest deployment that Succeeded.
    pub last_successful: Option<String>,
    /// Its deployments, oldest first.
    pub deployments: Vec<String>,
}

/// A deployment as the log knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    pub id: String,
    pub app: String,
    pub group: String,
    pub targets: String,
    pub revision: String,
    pub config: DeploymentConfig,
    pub rollout: Rollout,
    /// See [`NewDeployment::rollback_to`].
    pub rollback_to: Option<String>,
    /// See [`NewDeployment::rollback_of`].
    pub rollback_of: Option<String>,
    /// The deployment that rolls this one back, once created.
    pub rolled_back_by: Option<String>,
    /// An operator stopped it and asked for its rollback.
    pub rollback_requested: bool,
    /// When each bake so far ends (Unix milliseconds), in order: what a new coordinator
    /// replays.
    pub bakes: Vec<u64>,
    /// The notifications delivered to webhooks (or given up on), by key.
    pub notified: BTreeSet<String>,
    pub signed_intent: Vec<u8>,
    pub created_at_ms: u64,
    /// See [`NewDeployment::origin`].
    pub origin: Option<String>,
    /// See [`NewDeployment::catch_up`].
    pub catch_up: Option<CatchUpOf>,
    /// The position of the entry that created it.
    pub created_at: Fence,
    pub status: DeploymentState,
    /// Every targeted host by name.
    pub hosts: BTreeMap<String, DeploymentHost>,
}

impl Deployment {
    /// How many waves its rollout releases its hosts in: zone by zone, one per zone.
    pub fn waves(&self) -> usize {
        match self.rollout {
            Rollout::Zones { .. } => self
                .hosts
                .values()
                .map(|h| h.zone.as_deref())
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            rollout => rollout.waves(self.hosts.len()).len(),
        }
    }

    /// The hosts as the planner takes them, to rebuild its plan on a new leader.
    pub fn host_infos(&self) -> Vec<HostInfo> {
        self.hosts
            .iter()
            .map(|(name, h)| HostInfo {
                name: name.clone(),
                health: h.health,
                revision: h.revision.clone(),
                zone: h.zone.clone(),
            })
            .collect()
    }

    /// Hosts started and not reported, with the fence they were last commanded with: what
    /// a new coordinator must ask about before it starts anything else.
    pub fn in_flight(&self) -> impl Iterator<Item = (&str, Fence)> + '_ {
        self.hosts.iter().filter_map(|(name, h)| match h.state {
            HostState::InProgress { fence } => Some((name.as_str(), fence)),
            _ => None,
        })
    }

    /// Whether this deployment failed and must now be rolled back: the operator consented
    /// (a revision to roll back to, not the one that failed), it is not itself a rollback,
    /// no rollback exists yet, some host took the revision, and none is still running.
    pub fn needs_rollback(&self) -> bool {
        (matches!(self.status, DeploymentState::Failed { .. })
            || (self.status == DeploymentState::Stopped && self.rollback_requested))
            && self
                .rollback_to
                .as_ref()
                .is_some_and(|r| *r != self.revision)
            && self.rollback_of.is_none()
            && self.rolled_back_by.is_none()
            && self.in_flight().next().is_none()
            && self.hosts.values().any(|h| h.started.is_some())
    }

    fn skip_pending(&mut self) {
        for host in self.hosts.values_mut() {
            if host.state == HostState::Pending {
                host.state = HostState::Skipped;
            }
        }
    }
}

/// Every deployment in the log, by id. Built only by [`DeploymentsState::apply`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentsState {
    deployments: BTreeMap<String, Deployment>,
    groups: BTreeMap<String, Group>,
}

impl DeploymentsState {
    /// The deployment with this id.
    pub fn get(&self, id: &str) -> Option<&Deployment> {
        self.deployments.get(id)
    }

    /// Every deployment, by id.
    pub fn iter(&self) -> impl Iterator<Item = &Deployment> + '_ {
        self.deployments.values()
    }

    /// Every deployment group, by name.
    pub fn groups(&self) -> impl Iterator<Item = &Group> + '_ {
        self.groups.values()
    }

    /// The deployment group named `name`.
    pub fn group(&self, name: &str) -> Option<&Group> {
        self.groups.get(name)
    }

    pub fn len(&self) -> usize {
        self.deployments.len()
    }

    /// The deployment of `group` that keeps it from taking a new one, if any. As
    /// CodeDeploy: one active deployment per deployment group; a stopped one is active
    /// while its hosts in flight have not reported, a failed one until its rollback is made
    /// (unless `rollback_of` names it: the new one is that rollback).
    pub fn active_in<'a>(&'a self, group: &'a Group, rollback_of: Option<&str>) -> Option<&'a str> {
        group
            .deployments
            .iter()
            .rev()
            .find(|id| {
                self.deployments.get(*id).is_some_and(|d| {
                    !d.status.is_ended()
                        || d.in_flight().next().is_some()
                        || (d.needs_rollback() && rollback_of != Some(d.id.as_str()))
                })
            })
            .map(String::as_str)
    }

    /// What a host that joins `group` late, or missed its deployments, is brought to: the
    /// newest deployment that succeeded as the operator signed it (not a rollback, not a
    /// catch-up) with the revision of the group's newest deployment, and only when that
    /// newest deployment (catch-ups aside) succeeded. After a failure without rollback, or
    /// a stop, the hosts are as the operator left them: nothing is caught up.
    pub fn catch_up_source(&self, group: &str) -> Option<&Deployment> {
        let group = self.groups.get(group)?;
        let mut newest_first = group
            .deployments
            .iter()
            .rev()
            .filter_map(|id| self.deployments.get(id))
            .filter(|d| d.catch_up.is_none());
        // An operator stopped the newest catch-up: none until the next deployment.
        if group
            .deployments
            .last()
            .and_then(|id| self.deployments.get(id))
            .is_some_and(|d| d.catch_up.is_some() && d.status == DeploymentState::Stopped)
        {
            return None;
        }
        let latest = newest_first.next()?;
        if latest.status != DeploymentState::Succeeded {
            return None;
        }
        std::iter::once(latest).chain(newest_first).find(|d| {
            d.status == DeploymentState::Succeeded
                && d.rollback_of.is_none()
                && d.revision == latest.revision
        })
    }

    /// Whether this state has `host` of `deployment` started under `fence`, for the intent
    /// whose SHA-256 is `intent`, and the deployment a catch-up exactly when `catch_up`
    /// says so (a catch-up's intent runs past its age: only one the log made as such).
    /// What a voter answers a host that asks before it acts.
    pub fn confirms(
        &self,
        deployment: &str,
        host: &str,
        fence: Fence,
        intent: &[u8; 32],
        catch_up: bool,
    ) -> bool {
        use sha2::Digest;
        self.get(deployment).is_some_and(|d| {
            d.catch_up.is_some() == catch_up
                && d.hosts
                    .get(host)
                    .is_some_and(|h| h.state == HostState::InProgress { fence })
                && <[u8; 32]>::from(sha2::Sha256::digest(&d.signed_intent)) == *intent
        })
    }

    /// How many catch-ups of deployment `of` name `host`.
    pub fn catch_ups_of_host(&self, of: &str, host: &str) -> usize {
        self.deployments
            .values()
            .filter(|d| {
                d.catch_up.as_ref().is_some_and(|c| c.of == of) && d.hosts.contains_key(host)
            })
            .count()
    }

    /// How many catch-ups of deployment `of` the log holds.
    pub fn catch_ups_of(&self, of: &str) -> u32 {
        self.deployments
            .values()
            .filter(|d| d.catch_up.as_ref().is_some_and(|c| c.of == of))
            .count() as u32
    }

    pub fn is_empty(&self) -> bool {
        self.deployments.is_empty()
    }

    /// Applies the committed entry at `at`. Deterministic; a refused command changes
    /// nothing.
    pub fn apply(&mut self, at: Fence, command: Command) -> Response {
        let outcome = match command {
            Command::CreateDeployment(new) => self.create(at, new),
            Command::StartHosts { deployment, hosts } => self.start(at, &deployment, hosts),
            Command::HostResult {
                deployment,
                host,
                verdict,
                report,
            } => self.host_result(&deployment, &host, verdict, report),
            Command::Bake {
                deployment,
                until_ms,
            } => self.bake(&deployment, until_ms),
            Command::Stop {
                deployment,
                rollback,
            } => self.stop(&deployment, rollback),
            Command::Finish {
                deployment,
                verdict,
            } => self.finish(&deployment, verdict),
            Command::Notified { deployment, keys } => self.notified(&deployment, keys),
        };
        match outcome {
            Ok(Change::Applied) => Response::Applied { fence: at },
            Ok(Change::Unchanged) => Response::Unchanged,
            Err(refusal) => Response::Refused(refusal),
        }
    }

    fn create(&mut self, at: Fence, new: NewDeployment) -> Result<Change, Refusal> {
        if let Some(existing) = self.deployments.get(&new.id) {
            return if same_creation(existing, &new) {
                Ok(Change::Unchanged)
            } else {
                Err(Refusal::DeploymentExists { id: new.id })
            };
        }
        if let Some(group) = self.groups.get(&new.group) {
            if group.app != new.app {
                return Err(Refusal::GroupOfAnotherApp {
                    group: new.group,
                    app: group.app.clone(),
                });
            }
            if let Some(active) = self.active_in(group, new.rollback_of.as_deref()) {
                return Err(Refusal::GroupBusy {
                    group: new.group,
                    deployment: active.to_owned(),
                });
            }
        }
        if new.hosts.is_empty() {
            return Err(Refusal::NoHosts { id: new.id });
        }
        if let Some(of) = &new.rollback_of {
            let Some(original) = self.deployments.get(of) else {
                return Err(Refusal::UnknownDeployment { id: of.clone() });
            };
            // Only the rollback the operator consented to, of a deployment that needs it,
            // to hosts that took it, under the same signed intent: not whatever a leader
            // writes.
            let latest = self
                .groups
                .get(&original.group)
                .and_then(|g| g.deployments.last())
                == Some(of);
            let fits = original.needs_rollback()
                && latest
                && new.group == original.group
                && new.app == original.app
                && Some(&new.revision) == original.rollback_to.as_ref()
                && new.signed_intent == original.signed_intent
                && new.hosts.iter().all(|h| {
                    original
                        .hosts
                        .get(&h.name)
                        .is_some_and(|o| o.started.is_some())
                });
            if !fits {
                return Err(Refusal::NoRollback {
                    id: of.clone(),
                    status: original.status.clone(),
                    rolled_back_by: original.rolled_back_by.clone(),
                });
            }
        }
        if let Some(catch_up) = &new.catch_up {
            // Only what an honest leader makes: the group's last success, verbatim, to
            // hosts the catch-up's own id keeps apart from every earlier one. The voters
            // confirm a catch-up to a host only because this rule holds.
            let fits = new.rollback_of.is_none()
                && self.catch_up_source(&new.group).is_some_and(|source| {
                    source.id == catch_up.of
                        && source.app == new.app
                        && source.revision == new.revision
                        && source.targets == new.targets
                        && source.signed_intent == new.signed_intent
                })
                && new.rollout == Rollout::Waveless
                && new.rollback_to.is_none()
                && catch_up.number == self.catch_ups_of(&catch_up.of)
                && new.id == crate::fleet::intent::catch_up_id(&catch_up.of, catch_up.number)
                && new.hosts.iter().all(|h| {
                    self.catch_ups_of_host(&catch_up.of, &h.name) < MAX_CATCH_UPS_PER_HOST
                });
            if !fits {
                return Err(Refusal::NoCatchUp {
                    of: catch_up.of.clone(),
                });
            }
        }
        let mut hosts = BTreeMap::new();
        for planned in new.hosts {
            let record = DeploymentHost {
                health: planned.health,
                revision: planned.revision,
                zone: planned.zone,
                state: HostState::Pending,
                started: None,
                report: HostReport::default(),
            };
            if hosts.insert(planned.name.clone(), record).is_some() {
                return Err(Refusal::DuplicateHost { host: planned.name });
            }
        }
        let group = self
            .groups
            .entry(new.group.clone())
            .or_insert_with(|| Group {
                name: new.group.clone(),
                app: new.app.clone(),
                targets: String::new(),
                config: new.config,
                rollout: new.rollout,
                last_successful: None,
                deployments: Vec::new(),
            });
        if new.rollback_of.is_none() && new.catch_up.is_none() {
            // A rollback or a catch-up keeps the group's settings: they are the operator's.
            group.targets = new.targets.clone();
            group.config = new.config;
            group.rollout = new.rollout;
        }
        group.deployments.push(new.id.clone());
        let deployment = Deployment {
            id: new.id.clone(),
            app: new.app,
            group: new.group,
            targets: new.targets,
            revision: new.revision,
            config: new.config,
            rollout: new.rollout,
            rollback_to: new.rollback_to,
            rollback_of: new.rollback_of.clone(),
            rolled_back_by: None,
            rollback_requested: false,
            bakes: Vec::new(),
            notified: BTreeSet::new(),
            signed_intent: new.signed_intent,
            created_at_ms: new.created_at_ms,
            origin: new.origin,
            catch_up: new.catch_up,
            created_at: at,
            status: DeploymentState::Created,
            hosts,
        };
        if let Some(original) = new
            .rollback_of
            .as_ref()
            .and_then(|of| self.deployments.get_mut(of))
        {
            original.rolled_back_by = Some(new.id.clone());
        }
        self.deployments.insert(new.id, deployment);
        Ok(Change::Applied)
    }

    fn start(&mut self, at: Fence, id: &str, names: Vec<String>) -> Result<Change, Refusal> {
        let deployment = self.deployment_mut(id)?;
        if deployment.status.is_ended() {
            return Err(ended(deployment));
        }
        if names.is_empty() {
            return Err(Refusal::NoHosts { id: id.to_owned() });
        }
        // Check every host before changing any: all or nothing.
        let mut seen = std::collections::BTreeSet::new();
        for name in &names {
            if !seen.insert(name.as_str()) {
                return Err(Refusal::DuplicateHost { host: name.clone() });
            }
            let Some(host) = deployment.hosts.get(name) else {
                return Err(Refusal::UnknownHost {
                    deployment: id.to_owned(),
                    host: name.clone(),
                });
            };
            match &host.state {
                HostState::Pending | HostState::InProgress { .. } => {}
                recorded => {
                    return Err(Refusal::HostFinished {
                        host: name.clone(),
                        recorded: recorded.clone(),
                    });
                }
            }
        }
        for name in &names {
            if let Some(host) = deployment.hosts.get_mut(name) {
                host.state = HostState::InProgress { fence: at };
                host.started.get_or_insert(at);
            }
        }
        deployment.status = DeploymentState::InProgress;
        Ok(Change::Applied)
    }

    fn host_result(
        &mut self,
        id: &str,
        name: &str,
        verdict: Verdict,
        report: HostReport,
    ) -> Result<Change, Refusal> {
        let deployment = self.deployment_mut(id)?;
        let Some(host) = deployment.hosts.get_mut(name) else {
            return Err(Refusal::UnknownHost {
                deployment: id.to_owned(),
                host: name.to_owned(),
            });
        };
        let reported = match verdict {
            Verdict::Succeeded => HostState::Succeeded,
            Verdict::Failed { reason } => HostState::Failed { reason },
        };
        match &host.state {
            HostState::InProgress { .. } => {
                host.state = reported;
                host.report = report.bounded();
                Ok(Change::Applied)
            }
            HostState::Pending | HostState::Skipped => Err(Refusal::HostNotStarted {
                host: name.to_owned(),
            }),
            recorded if *recorded == reported => Ok(Change::Unchanged),
            recorded => Err(Refusal::HostFinished {
                host: name.to_owned(),
                recorded: recorded.clone(),
            }),
        }
    }

    fn notified(&mut self, id: &str, keys: Vec<String>) -> Result<Change, Refusal> {
        let deployment = self.deployment_mut(id)?;
        let new: Vec<String> = keys
            .into_iter()
            .filter(|k| !deployment.notified.contains(k))
            .collect();
        if new.is_empty() {
            return Ok(Change::Unchanged);
        }
        if new.iter().any(|k| k.is_empty() || k.len() > MAX_NOTICE_KEY)
            || deployment.notified.len() + new.len() > MAX_NOTICES
        {
            return Err(Refusal::TooManyNotices { id: id.to_owned() });
        }
        deployment.notified.extend(new);
        Ok(Change::Applied)
    }

    fn bake(&mut self, id: &str, until_ms: u64) -> Result<Change, Refusal> {
        let deployment = self.deployment_mut(id)?;
        match deployment.status {
            DeploymentState::Baking { until_ms: now } if now == until_ms => Ok(Change::Unchanged),
            DeploymentState::InProgress
                if deployment.rollout == Rollout::Waveless
                    || deployment.bakes.len() + 1 >= deployment.waves()
                    || until_ms > deployment.created_at_ms.saturating_add(MAX_ROLLOUT_MS) =>
            {
                Err(Refusal::NotBakeable {
                    id: id.to_owned(),
                    status: deployment.status.clone(),
                })
            }
            DeploymentState::InProgress => {
                let count = deployment.in_flight().count();
                if count > 0 {
                    return Err(Refusal::HostsUnfinished {
                        id: id.to_owned(),
                        count,
                    });
                }
                deployment.status = DeploymentState::Baking { until_ms };
                deployment.bakes.push(until_ms);
                Ok(Change::Applied)
            }
            _ => Err(Refusal::NotBakeable {
                id: id.to_owned(),
                status: deployment.status.clone(),
            }),
        }
    }

    fn stop(&mut self, id: &str, rollback: bool) -> Result<Change, Refusal> {
        let latest = self
            .deployments
            .get(id)
            .and_then(|d| self.groups.get(&d.group))
            .and_then(|g| g.deployments.last())
            .is_some_and(|last| last == id);
        let deployment = self.deployment_mut(id)?;
        // A rollback puts back the group's last success: never over a newer deployment.
        if rollback
            && (deployment.rollback_to.is_none() || deployment.rollback_of.is_some() || !latest)
        {
            return Err(Refusal::NoRollback {
                id: id.to_owned(),
                status: deployment.status.clone(),
                rolled_back_by: deployment.rolled_back_by.clone(),
            });
        }
        match deployment.status {
            DeploymentState::Stopped if rollback && !deployment.rollback_requested => {
                deployment.rollback_requested = true;
                Ok(Change::Applied)
            }
            DeploymentState::Stopped => Ok(Change::Unchanged),
            DeploymentState::Succeeded | DeploymentState::Failed { .. } => Err(ended(deployment)),
            DeploymentState::Created
            | DeploymentState::InProgress
            | DeploymentState::Baking { .. } => {
                deployment.status = DeploymentState::Stopped;
                deployment.rollback_requested = rollback;
                deployment.skip_pending();
                Ok(Change::Applied)
            }
        }
    }

    fn finish(&mut self, id: &str, verdict: Verdict) -> Result<Change, Refusal> {
        let deployment = self.deployment_mut(id)?;
        let status = match verdict {
            Verdict::Succeeded => DeploymentState::Succeeded,
            Verdict::Failed { reason } => DeploymentState::Failed { reason },
        };
        if deployment.status == status {
            return Ok(Change::Unchanged);
        }
        if deployment.status.is_ended() {
            return Err(ended(deployment));
        }
        if status == DeploymentState::Succeeded {
            let count = deployment
                .hosts
                .values()
                .filter(|h| matches!(h.state, HostState::Pending | HostState::InProgress { .. }))
                .count();
            if count > 0 {
                return Err(Refusal::HostsUnfinished {
                    id: id.to_owned(),
                    count,
                });
            }
        }
        let succeeded = status == DeploymentState::Succeeded;
        deployment.status = status;
        deployment.skip_pending();
        if succeeded {
            let (group, revision) = (deployment.group.clone(), deployment.revision.clone());
            if let Some(group) = self.groups.get_mut(&group) {
                group.last_successful = Some(revision);
            }
        }
        Ok(Change::Applied)
    }

    fn deployment_mut(&mut self, id: &str) -> Result<&mut Deployment, Refusal> {
        self.deployments
            .get_mut(id)
            .ok_or_else(|| Refusal::UnknownDeployment { id: id.to_owned() })
    }
}

enum Change {
    Applied,
    Unchanged,
}

fn ended(deployment: &Deployment) -> Refusal {
    Refusal::DeploymentEnded {
        id: deployment.id.clone(),
        status: deployment.status.clone(),
    }
}

/// Whether `new` is the proposal that created `existing` (a retry), whatever happened since.
fn same_creation(existing: &Deployment, new: &NewDeployment) -> bool {
    existing.app == new.app
        && existing.group == new.group
        && existing.targets == new.targets
        && existing.revision == new.revision
        && existing.config == new.config
        && existing.rollout == new.rollout
        && existing.rollback_to == new.rollback_to
        && existing.rollback_of == new.rollback_of
        && existing.signed_intent == new.signed_intent
        && existing.created_at_ms == new.created_at_ms
        && existing.origin == new.origin
        && existing.catch_up == new.catch_up
        && existing.hosts.len() == new.hosts.len()
        && new.hosts.iter().all(|p| {
            existing
                .hosts
                .get(&p.name)
                .is_some_and(|h| h.health == p.health && h.revision == p.revision)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fence(index: u64) -> Fence {
        Fence { term: 1, index }
    }

    fn planned(name: &str) -> PlannedHost {
        PlannedHost {
            name: name.to_owned(),
            health: Health::Healthy,
            revision: Revision::Known("old".to_owned()),
            zone: None,
        }
    }

    fn new_deployment(id: &str, hosts: &[&str]) -> NewDeployment {
        NewDeployment {
            id: id.to_owned(),
            app: "inference".to_owned(),
            group: "inference".to_owned(),
            targets: "role=inference".to_owned(),
            revision: "new".to_owned(),
            config: DeploymentConfig::default(),
            rollout: Rollout::default(),
            rollback_to: None,
            rollback_of: None,
            hosts: hosts.iter().map(|h| planned(h)).collect(),
            signed_intent: b"signed".to_vec(),
            created_at_ms: 1_700_000_000_000,
            origin: None,
            catch_up: None,
        }
    }

    fn start(deployment: &str, hosts: &[&str]) -> Command {
        Command::StartHosts {
            deployment: deployment.to_owned(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
        }
    }

    fn result(deployment: &str, host: &str, verdict: Verdict) -> Command {
        Command::HostResult {
            deployment: deployment.to_owned(),
            host: host.to_owned(),
            verdict,
            report: HostReport::default(),
        }
    }

    fn failed(reason: &str) -> Verdict {
        Verdict::Failed {
            reason: reason.to_owned(),
        }
    }

    fn host_state(state: &DeploymentsState, id: &str, host: &str) -> HostState {
        state.get(id).unwrap().hosts[host].state.clone()
    }

    /// A state with deployment "d1" of hosts a, b, c created at index 1.
    fn created() -> DeploymentsState {
        let mut state = DeploymentsState::default();
        let r = state.apply(
            fence(1),
            Command::CreateDeployment(new_deployment("d1", &["a", "b", "c"])),
        );
        assert_eq!(r, Response::Applied { fence: fence(1) });
        state
    }

    /// Runs `id` (created already) to `verdict` on `hosts`, each host ending the same.
    fn run_to(state: &mut DeploymentsState, at: u64, id: &str, hosts: &[&str], verdict: Verdict) {
        assert!(matches!(
            state.apply(fence(at), start(id, hosts)),
            Response::Applied { .. }
        ));
        for h in hosts {
            state.apply(fence(at), result(id, h, verdict.clone()));
        }
        assert!(matches!(
            state.apply(
                fence(at),
                Command::Finish {
                    deployment: id.into(),
                    verdict,
                },
            ),
            Response::Applied { .. }
        ));
    }

    fn catch_up(of: &str, number: u32, hosts: &[&str]) -> NewDeployment {
        NewDeployment {
            catch_up: Some(CatchUpOf {
                of: of.into(),
                number,
            }),
            ..new_deployment(&crate::fleet::intent::catch_up_id(of, number), hosts)
        }
    }

    #[test]
    fn a_catch_up_brings_only_the_group_s_last_success_as_the_operator_signed_it() {
        let mut state = DeploymentsState::default();
        assert_eq!(state.catch_up_source("inference"), None, "no group yet");
        state.apply(
            fence(1),
            Command::CreateDeployment(new_deployment("d1", &["a", "b"])),
        );
        assert_eq!(state.catch_up_source("inference"), None, "running");
        run_to(&mut state, 2, "d1", &["a", "b"], Verdict::Succeeded);
        assert_eq!(state.catch_up_source("inference").unwrap().id, "d1");

        // Not whatever a leader writes: each of these is refused, and changes nothing.
        let refused = |state: &mut DeploymentsState, new: NewDeployment| {
            let before = state.clone();
            assert_eq!(
                state.apply(fence(3), Command::CreateDeployment(new)),
                Response::Refused(Refusal::NoCatchUp { of: "d1".into() })
            );
            assert_eq!(*state, before);
        };
        refused(&mut state, catch_up("d1", 1, &["c"])); // not the next number
        let mut other_id = catch_up("d1", 0, &["c"]);
        other_id.id = "made-up".into();
        refused(&mut state, other_id);
        let mut other_revision = catch_up("d1", 0, &["c"]);
        other_revision.revision = "elsewhere".into();
        refused(&mut state, other_revision);
        let mut other_intent = catch_up("d1", 0, &["c"]);
        other_intent.signed_intent = b"an old intent".to_vec();
        refused(&mut state, other_intent);
        let mut other_targets = catch_up("d1", 0, &["c"]);
        other_targets.targets = "role=db".into();
        refused(&mut state, other_targets);
        let mut with_waves = catch_up("d1", 0, &["c"]);
        with_waves.rollout = Rollout::Canary {
            percent: crate::fleet::plan::Percent::new(10).unwrap(),
            bake_secs: 60,
        };
        refused(&mut state, with_waves);
        let mut rolling_back = catch_up("d1", 0, &["c"]);
        rolling_back.rollback_to = Some("old".into());
        refused(&mut state, rolling_back);
        let mut of_another = catch_up("nope", 0, &["c"]);
        of_another.catch_up = Some(CatchUpOf {
            of: "nope".into(),
            number: 0,
        });
        assert!(matches!(
            state.apply(fence(3), Command::CreateDeployment(of_another)),
            Response::Refused(Refusal::NoCatchUp { .. })
        ));

        // The one that fits: in the group's history, the group's settings unchanged, and
        // the group busy while it runs.
        let first = catch_up("d1", 0, &["c"]);
        assert_eq!(
            state.apply(fence(4), Command::CreateDeployment(first.clone())),
            Response::Applied { fence: fence(4) }
        );
        let group = state.group("inference").unwrap();
        assert_eq!(group.deployments, ["d1".to_string(), first.id.clone()]);
        assert_eq!(group.targets, "role=inference");
        assert!(matches!(
            state.apply(
                fence(5),
                Command::CreateDeployment(new_deployment("d2", &["a"]))
            ),
            Response::Refused(Refusal::GroupBusy { .. })
        ));
        assert_eq!(state.catch_up_source("inference").unwrap().id, "d1");
        // It failed: no rollback, and the next catch-up of d1 has the next number.
        run_to(&mut state, 6, &first.id, &["c"], failed("boom"));
        assert!(!state.get(&first.id).unwrap().needs_rollback());
        assert_eq!(state.catch_ups_of("d1"), 1);
        assert_eq!(state.catch_up_source("inference").unwrap().id, "d1");
        let second = catch_up("d1", 1, &["c", "e"]);
        assert!(matches!(
            state.apply(fence(7), Command::CreateDeployment(second.clone())),
            Response::Applied { .. }
        ));
        // What a voter confirms: the host started under that fence, that intent, and a
        // catch-up only as one; a plain deployment is not confirmed as a catch-up either.
        assert!(matches!(
            state.apply(fence(8), start(&second.id, &["c"])),
            Response::Applied { .. }
        ));
        let digest: [u8; 32] = {
            use sha2::Digest;
            sha2::Sha256::digest(b"signed").into()
        };
        assert!(state.confirms(&second.id, "c", fence(8), &digest, true));
        assert!(!state.confirms(&second.id, "c", fence(8), &digest, false));
        assert!(!state.confirms(&second.id, "c", fence(7), &digest, true));
        assert!(!state.confirms(&second.id, "e", fence(8), &digest, true));
        assert!(!state.confirms(&second.id, "c", fence(8), &[0; 32], true));
        assert!(!state.confirms("d1", "a", fence(2), &digest, true));
        run_to(&mut state, 8, &second.id, &["c", "e"], Verdict::Succeeded);
        // A host in two catch-ups of d1 already is in no third.
        assert_eq!(state.catch_ups_of_host("d1", "c"), 2);
        refused(&mut state, catch_up("d1", 2, &["c"]));
        // An operator stops a catch-up: none after it until the group's next deployment.
        let third = catch_up("d1", 2, &["f"]);
        assert!(matches!(
            state.apply(fence(9), Command::CreateDeployment(third.clone())),
            Response::Applied { .. }
        ));
        assert!(matches!(
            state.apply(
                fence(9),
                Command::Stop {
                    deployment: third.id.clone(),
                    rollback: false
                }
            ),
            Response::Applied { .. }
        ));
        assert_eq!(state.catch_up_source("inference"), None);

        // After a failure without consent to roll back, hosts stay as the operator left
        // them: nothing to catch up with.
        state.apply(
            fence(9),
            Command::CreateDeployment(new_deployment("d2", &["a"])),
        );
        run_to(&mut state, 10, "d2", &["a"], failed("boom"));
        assert_eq!(state.catch_up_source("inference"), None);
        // After a failure rolled back to d1's revision: d1 again (its intent installs that
        // revision; the rollback's puts it back only where it ran).
        let mut d3 = new_deployment("d3", &["a"]);
        d3.revision = "newer".into();
        d3.rollback_to = Some("new".into());
        state.apply(fence(11), Command::CreateDeployment(d3));
        run_to(&mut state, 12, "d3", &["a"], failed("boom"));
        assert_eq!(
            state.catch_up_source("inference"),
            None,
            "not rolled back yet"
        );
        let mut rollback = new_deployment("r3", &["a"]);
        rollback.rollback_of = Some("d3".into());
        assert!(matches!(
            state.apply(fence(13), Command::CreateDeployment(rollback)),
            Response::Applied { .. }
        ));
        run_to(&mut state, 14, "r3", &["a"], Verdict::Succeeded);
        assert_eq!(state.catch_up_source("inference").unwrap().id, "d1");
    }

    #[test]
    fn a_failed_deployment_with_consent_needs_one_rollback_linked_both_ways() {
        let mut state = DeploymentsState::default();
        let mut new = new_deployment("d1", &["a", "b"]);
        new.rollback_to = Some("old".into());
        state.apply(fence(1), Command::CreateDeployment(new));
        assert!(!state.get("d1").unwrap().needs_rollback(), "not failed");
        state.apply(fence(2), start("d1", &["a"]));
        state.apply(fence(3), result("d1", "a", failed("boom")));
        state.apply(
            fence(4),
            Command::Finish {
                deployment: "d1".into(),
                verdict: failed("a failed"),
            },
        );
        assert!(state.get("d1").unwrap().needs_rollback());
        // Until its rollback is made, the group takes no other deployment.
        assert!(matches!(
            state.apply(
                fence(5),
                Command::CreateDeployment(new_deployment("d9", &["a"]))
            ),
            Response::Refused(Refusal::GroupBusy { .. })
        ));
        // Not whatever a leader writes: another revision, or a host that never took it.
        let mut wrong = new_deployment("r1", &["a"]);
        wrong.revision = "elsewhere".into();
        wrong.rollback_of = Some("d1".into());
        assert!(matches!(
            state.apply(fence(5), Command::CreateDeployment(wrong)),
            Response::Refused(Refusal::NoRollback { .. })
        ));
        let mut wider = new_deployment("r1", &["a", "b"]);
        wider.revision = "old".into();
        wider.rollback_of = Some("d1".into());
        assert!(matches!(
            state.apply(fence(5), Command::CreateDeployment(wider)),
            Response::Refused(Refusal::NoRollback { .. })
        ));
        let mut rollback = new_deployment("r1", &["a"]);
        rollback.revision = "old".into();
        rollback.rollback_of = Some("d1".into());
        assert_eq!(
            state.apply(fence(5), Command::CreateDeployment(rollback.clone())),
            Response::Applied { fence: fence(5) }
        );
        let d1 = state.get("d1").unwrap();
        assert_eq!(d1.rolled_back_by.as_deref(), Some("r1"));
        assert!(!d1.needs_rollback(), "rolled back once");
        assert_eq!(state.get("r1").unwrap().rollback_of.as_deref(), Some("d1"));
        // A second rollback of it is refused; a retry of the same entry is unchanged.
        assert_eq!(
            state.apply(fence(6), Command::CreateDeployment(rollback)),
            Response::Unchanged
        );
        state.apply(
            fence(7),
            Command::Finish {
                deployment: "r1".into(),
                verdict: failed("stopped short"),
            },
        );
        assert!(
            !state.get("r1").unwrap().needs_rollback(),
            "a rollback is not rolled back"
        );
        let mut again = new_deployment("r2", &["a"]);
        again.rollback_of = Some("d1".into());
        assert!(matches!(
            state.apply(fence(8), Command::CreateDeployment(again)),
            Response::Refused(Refusal::NoRollback { .. })
        ));
        // A stop with rollback asks for one like a failure; without consent it is refused.
        let mut state = DeploymentsState::default();
        let mut new = new_deployment("d3", &["a", "b"]);
        new.rollback_to = Some("old".into());
        state.apply(fence(1), Command::CreateDeployment(new));
        state.apply(fence(2), start("d3", &["a"]));
        state.apply(
            fence(3),
            Command::Stop {
                deployment: "d3".into(),
                rollback: true,
            },
        );
        assert!(!state.get("d3").unwrap().needs_rollback(), "a is in flight");
        state.apply(fence(4), result("d3", "a", Verdict::Succeeded));
        assert!(state.get("d3").unwrap().needs_rollback());
        let mut plain = DeploymentsState::default();
        plain.apply(
            fence(1),
            Command::CreateDeployment(new_deployment("d4", &["a"])),
        );
        assert!(matches!(
            plain.apply(
                fence(2),
                Command::Stop {
                    deployment: "d4".into(),
                    rollback: true,
                },
            ),
            Response::Refused(Refusal::NoRollback { .. })
        ));
        assert_eq!(plain.get("d4").unwrap().status, DeploymentState::Created);
        // Without consent, or if no host started, no rollback is due.
        let mut state = DeploymentsState::default();
        state.apply(
            fence(1),
            Command::CreateDeployment(new_deployment("d2", &["a"])),
        );
        state.apply(
            fence(2),
            Command::Finish {
                deployment: "d2".into(),
                verdict: failed("cannot plan"),
            },
        );
        assert!(!state.get("d2").unwrap().needs_rollback());
    }

    #[test]
    fn zone_by_zone_a_bake_comes_between_zones_only() {
        // Three hosts in two zones: one bake, not a second.
        let mut state = DeploymentsState::default();
        let mut new = new_deployment("d1", &["a", "b", "c"]);
        new.rollout = Rollout::Zones {
            first_bake_secs: 60,
            bake_secs: 60,
        };
        for (h, zone) in new.hosts.iter_mut().zip(["z1", "z1", "z2"]) {
            h.zone = Some(zone.into());
        }
        state.apply(fence(1), Command::CreateDeployment(new));
        assert_eq!(state.get("d1").unwrap().waves(), 2);
        let bake = |until_ms| Command::Bake {
            deployment: "d1".into(),
            until_ms,
        };
        state.apply(fence(2), start("d1", &["a", "b"]));
        state.apply(fence(3), result("d1", "a", Verdict::Succeeded));
        state.apply(fence(4), result("d1", "b", Verdict::Succeeded));
        assert_eq!(
            state.apply(fence(5), bake(10)),
            Response::Applied { fence: fence(5) }
        );
        state.apply(fence(6), start("d1", &["c"]));
        state.apply(fence(7), result("d1", "c", Verdict::Succeeded));
        assert!(matches!(
            state.apply(fence(8), bake(20)),
            Response::Refused(Refusal::NotBakeable { .. })
        ));
    }

    #[test]
    fn a_bake_comes_only_between_waves_and_the_next_batch_ends_it() {
        // Without waves, never.
        let mut plain = created();
        plain.apply(fence(2), start("d1", &["a"]));
        plain.apply(fence(3), result("d1", "a", Verdict::Succeeded));
        assert!(matches!(
            plain.apply(
                fence(4),
                Command::Bake {
                    deployment: "d1".into(),
                    until_ms: 10
                }
            ),
            Response::Refused(Refusal::NotBakeable { .. })
        ));
        // Linear waves of one host over three: two bakes at most.
        let mut state = DeploymentsState::default();
        let mut new = new_deployment("d1", &["a", "b", "c"]);
        new.rollout = Rollout::Linear {
            percent: crate::fleet::plan::Percent::new(1).unwrap(),
            bake_secs: 60,
        };
        state.apply(fence(1), Command::CreateDeployment(new));
        let bake = |until_ms| Command::Bake {
            deployment: "d1".into(),
            until_ms,
        };
        // Not before any host started, nor while one runs.
        assert!(matches!(
            state.apply(fence(2), bake(10)),
            Response::Refused(Refusal::NotBakeable { .. })
        ));
        state.apply(fence(3), start("d1", &["a"]));
        assert!(matches!(
            state.apply(fence(4), bake(10)),
            Response::Refused(Refusal::HostsUnfinished { count: 1, .. })
        ));
        state.apply(fence(5), result("d1", "a", Verdict::Succeeded));
        assert_eq!(
            state.apply(fence(6), bake(10)),
            Response::Applied { fence: fence(6) }
        );
        assert_eq!(
            state.apply(fence(7), bake(10)),
            Response::Unchanged,
            "a retry"
        );
        let d = state.get("d1").unwrap();
        assert_eq!(d.status, DeploymentState::Baking { until_ms: 10 });
        assert_eq!(d.status.status(), status::DeploymentStatus::Baking);
        assert!(!d.status.is_ended());
        assert_eq!(d.bakes, [10]);
        // The next wave's batch ends the bake; a stop while baking stops it.
        state.apply(fence(8), start("d1", &["b"]));
        assert_eq!(state.get("d1").unwrap().status, DeploymentState::InProgress);
        state.apply(fence(9), result("d1", "b", Verdict::Succeeded));
        state.apply(fence(10), bake(20));
        assert_eq!(state.get("d1").unwrap().bakes, [10, 20]);
        // A third bake, or one past what the intent allows, is refused.
        let mut more = state.clone();
        more.apply(fence(11), start("d1", &["c"]));
        more.apply(fence(12), result("d1", "c", Verdict::Succeeded));
        assert!(matches!(
            more.apply(fence(13), bake(30)),
            Response::Refused(Refusal::NotBakeable { .. })
        ));
        state.apply(
            fence(11),
            Command::Stop {
                deployment: "d1".into(),
                rollback: false,
            },
        );
        assert_eq!(state.get("d1").unwrap().status, DeploymentState::Stopped);
        assert_eq!(host_state(&state, "d1", "c"), HostState::Skipped);
        assert!(matches!(
            state.apply(fence(12), bake(30)),
            Response::Refused(Refusal::NotBakeable { .. })
        ));
    }

    #[test]
    fn a_group_has_one_active_deployment_and_remembers_its_last_success() {
        let mut state = created();
        let mut other = new_deployment("d2", &["a"]);
        let refused = state.apply(fence(2), Command::CreateDeployment(other.clone()));
        assert!(
            matches!(&refused, Response::Refused(Refusal::GroupBusy { deployment, .. }) if deployment == "d1"),
            "{refused:?}"
        );
        let mut foreign = new_deployment("d3", &["a"]);
        foreign.app = "other".into();
        assert!(matches!(
            state.apply(fence(3), Command::CreateDeployment(foreign)),
            Response::Refused(Refusal::GroupOfAnotherApp { .. })
        ));
        state.apply(fence(4), start("d1", &["a", "b", "c"]));
        for h in ["a", "b", "c"] {
            state.apply(fence(5), result("d1", h, Verdict::Succeeded));
        }
        state.apply(
            fence(6),
            Command::Finish {
                deployment: "d1".into(),
                verdict: Verdict::Succeeded,
            },
        );
        let group = state.group("inference").unwrap();
        assert_eq!(group.last_successful.as_deref(), Some("new"));
        other.targets = "role=web".into();
        assert_eq!(
            state.apply(fence(7), Command::CreateDeployment(other)),
            Response::Applied { fence: fence(7) }
        );
        let group = state.group("inference").unwrap();
        assert_eq!(group.targets, "role=web");
        assert_eq!(group.deployments, ["d1", "d2"]);
        assert_eq!(
            group.last_successful.as_deref(),
            Some("new"),
            "until d2 succeeds"
        );
    }

    #[test]
    fn a_deployment_is_created_with_every_host_pending() {
        let state = created();
        let d = state.get("d1").unwrap();
        assert_eq!(d.status, DeploymentState::Created);
        assert_eq!(d.created_at, fence(1));
        assert!(d.hosts.values().all(|h| h.state == HostState::Pending));
        assert_eq!(d.host_infos().len(), 3);
    }

    #[test]
    fn a_retried_creation_is_unchanged_and_a_different_one_is_refused() {
        let mut state = created();
        state.apply(fence(2), start("d1", &["a"]));
        let again = Command::CreateDeployment(new_deployment("d1", &["a", "b", "c"]));
        assert_eq!(state.apply(fence(3), again), Response::Unchanged);
        assert_eq!(
            host_state(&state, "d1", "a"),
            HostState::InProgress { fence: fence(2) },
            "a retried creation resets nothing"
        );
        let other = Command::CreateDeployment(new_deployment("d1", &["a"]));
        assert_eq!(
            state.apply(fence(4), other),
            Response::Refused(Refusal::DeploymentExists { id: "d1".into() })
        );
    }

    #[test]
    fn creations_without_hosts_or_with_a_host_twice_are_refused() {
        let mut state = DeploymentsState::default();
        let none = Command::CreateDeployment(new_deployment("d1", &[]));
        assert!(matches!(
            state.apply(fence(1), none),
            Response::Refused(Refusal::NoHosts { .. })
        ));
        let twice = Command::CreateDeployment(new_deployment("d1", &["a", "a"]));
        assert!(matches!(
            state.apply(fence(2), twice),
            Response::Refused(Refusal::DuplicateHost { .. })
        ));
        assert!(state.is_empty());
    }

    #[test]
    fn started_hosts_carry_the_fence_of_their_entry() {
        let mut state = created();
        let r = state.apply(Fence { term: 3, index: 7 }, start("d1", &["a", "b"]));
        let f = Fence { term: 3, index: 7 };
        assert_eq!(r, Response::Applied { fence: f });
        assert_eq!(state.get("d1").unwrap().status, DeploymentState::InProgress);
        let in_flight: Vec<_> = state.get("d1").unwrap().in_flight().collect();
        assert_eq!(in_flight, vec![("a", f), ("b", f)]);
        assert_eq!(host_state(&state, "d1", "c"), HostState::Pending);
    }

    #[test]
    fn a_host_in_flight_may_be_commanded_again_with_a_newer_fence() {
        let mut state = created();
        state.apply(fence(2), start("d1", &["a"]));
        let newer = Fence { term: 2, index: 3 };
        assert_eq!(
            state.apply(newer, start("d1", &["a"])),
            Response::Applied { fence: newer }
        );
        assert_eq!(
            host_state(&state, "d1", "a"),
            HostState::InProgress { fence: newer }
        );
    }

    #[test]
    fn a_host_with_a_result_is_never_started_again() {
        let mut state = created();
        state.apply(fence(2), start("d1", &["a"]));
        state.apply(fence(3), result("d1", "a", Verdict::Succeeded));
        let r = state.apply(fence(4), start("d1", &["b", "a"]));
        assert_eq!(
            r,
            Response::Refused(Refusal::HostFinished {
                host: "a".into(),
                recorded: HostState::Succeeded
            })
        );
        assert_eq!(
            host_state(&state, "d1", "b"),
            HostState::Pending,
            "all or nothing: b was not started either"
        );
    }

    #[test]
    fn starting_unknown_or_repeated_hosts_is_refused() {
        let mut state = created();
        assert!(matches!(
            state.apply(fence(2), start("d1", &["a", "zz"])),
            Response::Refused(Refusal::UnknownHost { .. })
        ));
        assert!(matches!(
            state.apply(fence(3), start("d1", &["a", "a"])),
            Response::Refused(Refusal::DuplicateHost { .. })
        ));
        assert!(matches!(
            state.apply(fence(4), start("d1", &[])),
            Response::Refused(Refusal::NoHosts { .. })
        ));
        assert!(matches!(
            state.apply(fence(5), start("nope", &["a"])),
            Response::Refused(Refusal::UnknownDeployment { .. })
        ));
        assert_eq!(host_state(&state, "d1", "a"), HostState::Pending);
        assert_eq!(state.get("d1").unwrap().status, DeploymentState::Created);
    }

    #[test]
    fn a_duplicate_result_is_unchanged_and_a_contrary_one_refused() {
        let mut state = created();
        state.apply(fence(2), start("d1", &["a"]));
        assert_eq!(
            state.apply(fence(3), result("d1", "a", failed("hook"))),
            Response::Applied { fence: fence(3) }
        );
        assert_eq!(
            state.apply(fence(4), result("d1", "a", failed("hook"))),
            Response::Unchanged
        );
        assert_eq!(
            state.apply(fence(5), result("d1", "a", Verdict::Succeeded)),
            Response::Refused(Refusal::HostFinished {
                host: "a".into(),
                recorded: HostState::Failed {
                    reason: "hook".into()
                }
            })
        );
        assert_eq!(
            host_state(&state, "d1", "a"),
            HostState::Failed {
                reason: "hook".into()
            }
        );
    }

    #[test]
    fn a_result_for_an_unknown_deployment_or_host_is_an_error_response() {
        let mut state = created();
        assert_eq!(
            state.apply(fence(2), result("d9", "a", Verdict::Succeeded)),
            Response::Refused(Refusal::UnknownDeployment { id: "d9".into() })
        );
        assert!(matches!(
            state.apply(fence(3), result("d1", "zz", Verdict::Succeeded)),
            Response::Refused(Refusal::UnknownHost { .. })
        ));
        assert!(matches!(
            state.apply(fence(4), result("d1", "a", Verdict::Succeeded)),
            Response::Refused(Refusal::HostNotStarted { .. })
        ));
        assert_eq!(state, created());
    }

    #[test]
    fn stop_skips_what_has_not_started_and_lets_hosts_in_flight_report() {
        let mut state = created();
        state.apply(fence(2), start("d1", &["a"]));
        let stop = Command::Stop {
            deployment: "d1".into(),
            rollback: false,
        };
        assert_eq!(
            state.apply(fence(3), stop.clone()),
            Response::Applied { fence: fence(3) }
        );
        assert_eq!(state.apply(fence(4), stop), Response::Unchanged);
        assert_eq!(host_state(&state, "d1", "b"), HostState::Skipped);
        assert!(matches!(
            state.apply(fence(5), start("d1", &["b"])),
            Response::Refused(Refusal::DeploymentEnded { .. })
        ));
        assert_eq!(
            state.apply(fence(6), result("d1", "a", Verdict::Succeeded)),
            Response::Applied { fence: fence(6) }
        );
        assert_eq!(state.get("d1").unwrap().status, DeploymentState::Stopped);
    }

    #[test]
    fn success_needs_every_host_reported_and_a_verdict_stands() {
        let mut state = created();
        state.apply(fence(2), start("d1", &["a", "b", "c"]));
        state.apply(fence(3), result("d1", "a", Verdict::Succeeded));
        let finish = |verdict| Command::Finish {
            deployment: "d1".into(),
            verdict,
        };
        assert_eq!(
            state.apply(fence(4), finish(Verdict::Succeeded)),
            Response::Refused(Refusal::HostsUnfinished {
                id: "d1".into(),
                count: 2
            })
        );
        state.apply(fence(5), result("d1", "b", Verdict::Succeeded));
        state.apply(fence(6), result("d1", "c", failed("validate")));
        assert_eq!(
            state.apply(fence(7), finish(Verdict::Succeeded)),
            Response::Applied { fence: fence(7) }
        );
        assert_eq!(
            state.apply(fence(8), finish(Verdict::Succeeded)),
            Response::Unchanged
        );
        assert!(matches!(
            state.apply(fence(9), finish(failed("late"))),
            Response::Refused(Refusal::DeploymentEnded { .. })
        ));
        assert!(matches!(
            state.apply(
                fence(10),
                Command::Stop {
                    deployment: "d1".into(),
                    rollback: false,
                }
            ),
            Response::Refused(Refusal::DeploymentEnded { .. })
        ));
        assert_eq!(state.get("d1").unwrap().status, DeploymentState::Succeeded);
    }

    #[test]
    fn a_failure_verdict_skips_hosts_not_started() {
        let mut state = created();
        state.apply(fence(2), start("d1", &["a"]));
        state.apply(
            fence(3),
            Command::Finish {
                deployment: "d1".into(),
                verdict: failed("too few"),
            },
        );
        assert_eq!(host_state(&state, "d1", "b"), HostState::Skipped);
        assert_eq!(
            host_state(&state, "d1", "a"),
            HostState::InProgress { fence: fence(2) }
        );
    }

    #[test]
    fn applying_the_same_entries_gives_the_same_bytes() {
        let entries = vec![
            Command::CreateDeployment(new_deployment("d2", &["z", "y"])),
            Command::CreateDeployment(new_deployment("d1", &["c", "a", "b"])),
            start("d1", &["b", "a"]),
            result("d1", "a", Verdict::Succeeded),
            result("d9", "a", Verdict::Succeeded),
            start("d2", &["y"]),
            Command::Stop {
                deployment: "d2".into(),
                rollback: false,
            },
            result("d1", "b", failed("x")),
            result("d1", "b", failed("x")),
        ];
        let run = || {
            let mut state = DeploymentsState::default();
            let responses: Vec<_> = entries
                .iter()
                .enumerate()
                .map(|(i, c)| state.apply(fence(i as u64 + 1), c.clone()))
                .collect();
            (postcard::to_allocvec(&state).unwrap(), responses)
        };
        assert_eq!(run(), run());
    }
}
