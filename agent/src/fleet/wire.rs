//! What agents and operators say about fleet deployments, on the wire: an operator's
//! requests (created, read and stopped from any agent, forwarded to the log's leader), the
//! coordinator's commands to hosts and their answers, and the views the CLI prints.
//!
//! Between agents these travel on [`Protocol::Fleet`](crate::mesh::frame::Protocol)
//! streams, one request and its answer per bidirectional stream; from an operator, inside
//! the API's request ([`crate::api::Request::Fleet`]). Everything is a bounded frame.

use serde::{Deserialize, Serialize};

use super::intent::{SignedIntent, SignedStop};
use super::log::{Deployment, Fence, Group, HostReport, HostState, Verdict};
use crate::lifecycle::plan::EventRecord;
use crate::lifecycle::run::HostRecord;
use crate::lifecycle::status::{DeploymentStatus, HostStatus};

/// What an operator asks of the fleet, through any agent.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum OperatorRequest {
    /// Start a deployment: the leader checks the signature and the targets, records it and
    /// drives it. `holder` is the agent the bundle was uploaded to, if any.
    Create {
        intent: SignedIntent,
        holder: Option<String>,
    },
    /// One deployment's state.
    Status { id: String },
    /// Deployments, newest first, optionally of one application or group.
    List {
        app: Option<String>,
        group: Option<String>,
    },
    /// Stop a deployment: no new batch starts.
    Stop { stop: SignedStop },
    /// The deployment groups.
    Groups,
}

/// The most deployments one list answers with (the newest).
pub const MAX_LISTED: usize = 1000;

/// The leader's answer to an [`OperatorRequest`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum OperatorAnswer {
    Deployment(Box<DeploymentView>),
    Deployments(Vec<DeploymentSummary>),
    Groups(Vec<GroupView>),
    /// Refused, with the reason for the operator.
    Refused(String),
}

/// What an agent asks another over `Protocol::Fleet`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum FleetRequest {
    /// An operator's request, forwarded to the agent believed to lead the log.
    Operator(OperatorRequest),
    /// The coordinator commands a host: run its part of a deployment, or report how it
    /// went if it already ran.
    RunHost(RunHost),
    /// A host asks a voter whether the log's applied state has it started in this
    /// deployment under this fence, for this very intent (`intent`: the SHA-256 of the
    /// signed intent as the command carries it), and whether that deployment is a catch-up
    /// (the host is about to run an intent past its age on the log's word). Answered with a
    /// [`Confirmation`] frame.
    Confirm {
        deployment: String,
        host: String,
        fence: Fence,
        intent: [u8; 32],
        catch_up: bool,
    },
}

/// A voter's answer to [`FleetRequest::Confirm`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Confirmation {
    /// The applied state has the host in progress under that fence, for that intent.
    Holds,
    /// It has applied past the fence and does not: the command is not the log's.
    Conflicts,
    /// It has not applied that far (or is not a voter): it cannot tell yet.
    Unknown,
}

/// The digest of a signed intent that [`FleetRequest::Confirm`] carries.
pub fn intent_digest(intent: &SignedIntent) -> [u8; 32] {
    use sha2::Digest;
    let bytes = serde_json::to_vec(intent).unwrap_or_default();
    sha2::Sha256::digest(&bytes).into()
}

/// A coordinator's command to one host.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunHost {
    /// The deployment (the intent's id).
    pub deployment: String,
    /// The operator's signed intent: the host checks it itself.
    pub intent: SignedIntent,
    /// The token of the log entry that started this host: the host refuses one lower than
    /// it has seen for this intent.
    pub fence: Fence,
    /// Agents the coordinator knows to hold the revision (the uploader), besides those the
    /// host learns of by gossip.
    pub holders: Vec<String>,
    /// The other hosts of the batch: they fetch the revision at the same time, so the host
    /// asks them for chunks from the start rather than once gossip says they fetch (at
    /// most [`MAX_BATCH_PEERS`] are used). (Wire version 6.)
    pub batch: Vec<String>,
    /// The command is for the rollback of the intent: the host runs
    /// [`Intent::rollback`](super::intent::Intent::rollback) of it (the revision the
    /// operator signed to roll back to), under the rollback's own id.
    pub rollback: bool,
    /// The command is for this catch-up of the intent: the host runs
    /// [`Intent::catch_up`](super::intent::Intent::catch_up) of it, under the catch-up's
    /// own id, and only once the log's voters confirm that the log made that catch-up.
    pub catch_up: Option<u32>,
}

/// Batch peers a host takes from [`RunHost::batch`].
pub const MAX_BATCH_PEERS: usize = 32;

/// Why a host will not act on a command. `passing` when asking again may succeed (the
/// voters have not confirmed yet, the host's replay store is busy or full); a coordinator
/// asks again for a while, and otherwise counts the host failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{reason}")]
pub struct Refusal {
    pub reason: String,
    pub passing: bool,
}

impl Refusal {
    /// A refusal that asking again will not change.
    pub fn lasting(reason: impl Into<String>) -> Refusal {
        Refusal {
            reason: reason.into(),
            passing: false,
        }
    }

    /// A refusal that may pass.
    pub fn passing(reason: impl Into<String>) -> Refusal {
        Refusal {
            reason: reason.into(),
            passing: true,
        }
    }
}

/// A host's answers to [`RunHost`]: `Started` at once (or `Done` if it ran already), then
/// `Progress` as its events go, and `Done` when it ended; `Refused` if it will not run it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum HostAnswer {
    Started,
    /// Every lifecycle event's status, sent each time one changes while the host runs.
    Progress(Vec<EventRecord>),
    Done {
        verdict: Verdict,
        report: HostReport,
    },
    Refused(Refusal),
}

/// A deployment as `shoal deploy status` shows it (and `create --wait`, and `create`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeploymentView {
    pub id: String,
    pub app: String,
    pub group: String,
    pub revision: String,
    pub status: DeploymentStatus,
    /// Why it failed, when it did.
    pub reason: Option<String>,
    /// The agent driving it now (the log's leader).
    pub coordinator: Option<String>,
    pub config: String,
    /// The waves and bake time (`no waves`, `canary 25%, bake 600s`, ...).
    pub rollout: String,
    /// While Baking: until when (Unix milliseconds, the coordinator's clock).
    pub baking_until_ms: Option<u64>,
    pub targets: String,
    pub created_at_ms: u64,
    /// Every host, with the same record `deploy local` prints for its host.
    pub hosts: Vec<HostRecord>,
    /// The deployment that rolls this one back, once it exists, and how it goes.
    pub rollback: Option<RollbackView>,
    /// When this one is a rollback: the deployment it rolls back.
    pub rollback_of: Option<String>,
    /// When this one is a catch-up: the deployment whose revision it brings to hosts that
    /// joined its group late, or missed it.
    pub catch_up_of: Option<String>,
    /// The revision the operator consented to roll back to if it fails (none: no
    /// automatic rollback).
    pub rollback_to: Option<String>,
    /// The notifications delivered to the coordinator's webhooks (or given up on), by
    /// key: `start`, `host-failure:NAME`, `success`, `failure`, `stop`, `rollback`.
    pub notified: Vec<String>,
    /// Set when the agent that answered cannot reach a majority of the log: what it shows
    /// may be out of date and nothing progresses.
    pub warning: Option<String>,
}

/// A deployment's rollback, as its view shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RollbackView {
    pub id: String,
    pub revision: String,
    pub status: DeploymentStatus,
}

/// A line of `shoal deploy list`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeploymentSummary {
    pub id: String,
    pub app: String,
    pub group: String,
    pub revision: String,
    pub status: DeploymentStatus,
    pub hosts: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub created_at_ms: u64,
    /// When it is a catch-up: the deployment whose revision it brought to hosts that
    /// joined late or missed it.
    #[serde(default)]
    pub catch_up_of: Option<String>,
}

/// A line of `shoal group list`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GroupView {
    pub name: String,
    pub app: String,
    pub targets: String,
    pub config: String,
    /// The waves of its last deployment (`no waves`, `canary 25%, bake 600s`, ...).
    pub rollout: String,
    pub last_successful: Option<String>,
    pub deployments: usize,
    pub last_deployment: Option<String>,
}

impl DeploymentView {
    /// The view of a deployment as the log holds it.
    pub fn of(d: &Deployment, coordinator: Option<String>) -> DeploymentView {
        DeploymentView {
            id: d.id.clone(),
            app: d.app.clone(),
            group: d.group.clone(),
            revision: d.revision.clone(),
            status: d.status.status(),
            reason: match &d.status {
                super::log::DeploymentState::Failed { reason } => Some(reason.clone()),
                _ => None,
            },
            coordinator,
            config: d.config.to_string(),
            rollout: d.rollout.to_string(),
            baking_until_ms: match d.status {
                super::log::DeploymentState::Baking { until_ms } => Some(until_ms),
                _ => None,
            },
            targets: d.targets.clone(),
            created_at_ms: d.created_at_ms,
            hosts: d
                .hosts
                .iter()
                .map(|(name, h)| HostRecord {
                    name: name.clone(),
                    status: h.state.status(),
                    reason: match &h.state {
                        HostState::Failed { reason } => Some(reason.clone()),
                        _ => None,
                    },
                    batch: h.started.map(|f| f.index),
                    events: h.report.events.clone(),
                    log_tail: h.report.tail.clone(),
                    transfer: h.report.transfer,
                })
                .collect(),
            rollback: None,
            rollback_of: d.rollback_of.clone(),
            catch_up_of: d.catch_up.as_ref().map(|c| c.of.clone()),
            rollback_to: d.rollback_to.clone(),
            notified: d.notified.iter().cloned().collect(),
            warning: None,
        }
    }

    /// Whether it has ended.
    pub fn ended(&self) -> bool {
        matches!(
            self.status,
            DeploymentStatus::Succeeded | DeploymentStatus::Failed | DeploymentStatus::Stopped
        )
    }
}

impl DeploymentSummary {
    pub fn of(d: &Deployment) -> DeploymentSummary {
        let count = |want: HostStatus| {
            d.hosts
                .values()
                .filter(|h| h.state.status() == want)
                .count()
        };
        DeploymentSummary {
            id: d.id.clone(),
            app: d.app.clone(),
            group: d.group.clone(),
            revision: d.revision.clone(),
            status: d.status.status(),
            hosts: d.hosts.len(),
            succeeded: count(HostStatus::Succeeded),
            failed: count(HostStatus::Failed),
            created_at_ms: d.created_at_ms,
            catch_up_of: d.catch_up.as_ref().map(|c| c.of.clone()),
        }
    }
}

impl GroupView {
    pub fn of(g: &Group) -> GroupView {
        GroupView {
            name: g.name.clone(),
            app: g.app.clone(),
            targets: g.targets.clone(),
            config: g.config.to_string(),
            rollout: g.rollout.to_string(),
            last_successful: g.last_successful.clone(),
            deployments: g.deployments.len(),
            last_deployment: g.deployments.last().cloned(),
        }
    }
}
