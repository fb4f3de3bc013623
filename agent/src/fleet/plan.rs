//! How a fleet deployment proceeds: CodeDeploy's batching, as a sans-IO state machine.
//!
//! The coordinator builds a [`Planner`] from the deployment configuration, the targeted
//! hosts (with their health and revision) and the revision being deployed, then loops:
//! [`Planner::next_batch`] says which hosts to start now, [`Planner::host_done`] is told how
//! each one went, [`Planner::stop`] stops it, and [`Planner::status`] gives the verdict. It
//! performs no IO and keeps counters rather than rescanning the fleet, so the work per batch
//! is proportional to the batch, and every rule below is unit-tested deterministically.
//! [`Planner::batches_preview`] is what `--dry-run` prints.
//!
//! # The rules, and where they come from
//!
//! From the AWS CodeDeploy User Guide, "CodeDeploy instance health" (section "Minimum
//! healthy instances and deployments") and "Working with deployment configurations"
//! (EC2/On-Premises), and the API Reference, "MinimumHealthyHosts":
//!
//! - **Minimum healthy hosts.** A count, or a percentage of all the deployment's hosts
//!   that is converted to a count at the start, rounding up ("converts the percentage to the
//!   equivalent number of instances, rounding up any fractional instances").
//! - **Batches.** "A deployment must never cause the number of healthy instances to fall
//!   below the minimum", and CodeDeploy "deploys the application revision to as many
//!   instances as it can without any risk" of that. So a batch may take `healthy − minimum`
//!   healthy hosts offline ("HOST_COUNT of six [of nine]: deploy to up to three instances
//!   at a time"; "FLEET_PERCENT of 40: up to five"). An unhealthy host costs nothing: it
//!   is not counted healthy, and a success makes it healthy.
//! - **Order.** "Unhealthy instance health, unknown revision health, old revision health,
//!   current revision health." Here "current" means already on the revision being
//!   deployed, and ties go by name so the plan is deterministic.
//! - **Failing at once.** "Make sure the minimum number of healthy instances you specify is
//!   less than the total number of instances ... Otherwise ... CodeDeploy will immediately
//!   fail the overall deployment" (10 instances at 95%: 10, fails without deploying). A
//!   group that starts below the minimum is the documented exception: its unhealthy hosts
//!   are deployed first, since that "does not reduce the number of healthy instances".
//!   [`Planner::new`] refuses exactly the plans that could not finish even if every host
//!   succeeded ([`PlanError::MinimumCannotHold`], [`PlanError::CannotSucceed`]).
//! - **Stopping on failures.** "If the number of healthy instances falls to the specified
//!   minimum number at any point ... CodeDeploy stops the deployment." Here: as soon as a
//!   failure means the healthy hosts still to update can never be taken offline without
//!   going below the minimum, or the required successes can no longer be reached, the
//!   deployment is [`Status::Failed`]; no batch starts after that.
//! - **Success.** "Deployment succeeds if the application revision was successfully
//!   deployed to at least the minimum number of healthy instances", and always "deployment
//!   to at least one instance must succeed". So the deployment succeeds when every host was
//!   tried and at least `max(minimum, 1)` succeeded ([`Rules::required`]). The documented
//!   examples follow: with 10 hosts and a minimum of 9 (one at a time), any failure ends it,
//!   "the exception to this rule is that if the last instance fails, the deployment still
//!   succeeds"; with a minimum of 8 (two at a time) a second failure ends it unless it is
//!   the last host.
//! - **Predefined configurations.** `AllAtOnce`: minimum 0, one batch, succeeds when any
//!   host succeeds. `HalfAtATime`: "deploys to up to half of the instances at a time (with
//!   fractions rounded down)" (at least one), and "succeeds if the application revision is
//!   deployed to at least half of the instances (with fractions rounded up)" (nine hosts:
//!   batches of four, five must succeed). `OneAtATime`: "all instances but one are kept in
//!   a healthy state" (one at a time), "if the deployment to the last instance fails, the
//!   overall deployment is still successful", and a single host must succeed. It is
//!   CodeDeploy's default, and ours.
//!
//! # Choices made here
//!
//! - Batches run one after the other: the next starts when every host of the one in flight
//!   has reported. The verdict ([`Status`]) is given as soon as it is certain; hosts still
//!   in flight may report after it (their statuses are kept) but cannot change it.
//! - A stopped or failed deployment's hosts that never started are [`HostStatus::Skipped`].
//! - The planner never says [`HostStatus::Unknown`]; see its documentation.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::targets::quote;

/// The prefix CodeDeploy gives its predefined configurations, accepted by
/// [`DeploymentConfig::parse_name`].
pub const CODEDEPLOY_PREFIX: &str = "CodeDeployDefault.";

/// A percentage from 0 to 100.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct Percent(u8);

impl Percent {
    /// `percent`, if it is at most 100.
    pub fn new(percent: u8) -> Option<Percent> {
        (percent <= 100).then_some(Percent(percent))
    }

    /// The number, 0 to 100.
    pub fn get(self) -> u8 {
        self.0
    }

    /// This share of `total`, rounded up (CodeDeploy's rule for a minimum).
    pub fn of_rounded_up(self, total: usize) -> usize {
        let share = (total as u128 * u128::from(self.0)).div_ceil(100);
        // At most `total`, since the percentage is at most 100.
        usize::try_from(share).unwrap_or(total)
    }
}

impl TryFrom<u8> for Percent {
    type Error = ConfigError;

    fn try_from(percent: u8) -> Result<Self, Self::Error> {
        Percent::new(percent).ok_or_else(|| {
            ConfigErrorKind::PercentOutOfRange {
                percent: u64::from(percent),
            }
            .into()
        })
    }
}

impl From<Percent> for u8 {
    fn from(percent: Percent) -> u8 {
        percent.0
    }
}

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", self.0)
    }
}

/// CodeDeploy's minimum healthy hosts: how many hosts must stay healthy throughout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MinHealthy {
    /// A number of hosts (CodeDeploy's HOST_COUNT).
    Count(u32),
    /// A share of the deployment's hosts, rounded up (CodeDeploy's FLEET_PERCENT).
    Percent(Percent),
}

impl MinHealthy {
    /// The minimum as a number of hosts, for a deployment to `hosts` hosts.
    pub fn hosts(self, hosts: usize) -> usize {
        match self {
            MinHealthy::Count(n) => usize::try_from(n).unwrap_or(usize::MAX),
            MinHealthy::Percent(p) => p.of_rounded_up(hosts),
        }
    }
}

impl FromStr for MinHealthy {
    type Err = ConfigError;

    /// `--min-healthy`: `N` (hosts) or `P%` (percent, 0 to 100).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let trimmed = text.trim();
        let bad = || ConfigErrorKind::BadMinHealthy { text: quote(text) };
        if let Some(number) = trimmed.strip_suffix('%') {
            let percent: u64 = number.trim().parse().map_err(|_| bad())?;
            let percent = u8::try_from(percent)
                .ok()
                .and_then(Percent::new)
                .ok_or(ConfigErrorKind::PercentOutOfRange { percent })?;
            Ok(MinHealthy::Percent(percent))
        } else {
            trimmed
                .parse()
                .map(MinHealthy::Count)
                .map_err(|_| bad().into())
        }
    }
}

impl fmt::Display for MinHealthy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MinHealthy::Count(n) => write!(f, "{n}"),
            MinHealthy::Percent(p) => write!(f, "{p}"),
        }
    }
}

/// How many hosts may be updated at once: CodeDeploy's deployment configurations for an
/// EC2/On-Premises compute platform (in-place).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DeploymentConfig {
    /// Every host at once; succeeds when any host succeeds.
    AllAtOnce,
    /// Up to half the hosts (rounded down, at least one) at a time; succeeds when at least
    /// half (rounded up) succeed.
    HalfAtATime,
    /// One host at a time; any failure but the last host's fails the deployment.
    #[default]
    OneAtATime,
    /// A minimum of healthy hosts; batches are as large as the minimum allows.
    Custom {
        /// The hosts that must stay healthy.
        min_healthy: MinHealthy,
    },
}

impl DeploymentConfig {
    /// `--config`: `AllAtOnce`, `HalfAtATime` or `OneAtATime`, with or without
    /// CodeDeploy's `CodeDeployDefault.` prefix. Names are case-sensitive, as CodeDeploy's.
    pub fn parse_name(name: &str) -> Result<DeploymentConfig, ConfigError> {
        let bare = name.trim();
        let bare = bare.strip_prefix(CODEDEPLOY_PREFIX).unwrap_or(bare);
        match bare {
            "AllAtOnce" => Ok(DeploymentConfig::AllAtOnce),
            "HalfAtATime" => Ok(DeploymentConfig::HalfAtATime),
            "OneAtATime" => Ok(DeploymentConfig::OneAtATime),
            _ => Err(ConfigErrorKind::UnknownConfig { name: quote(name) }.into()),
        }
    }

    /// The configuration the command line asks for: `--config NAME` or `--min-healthy
    /// N|P%` (not both), or, with neither, `OneAtATime` (CodeDeploy's default).
    pub fn from_options(
        config: Option<&str>,
        min_healthy: Option<&str>,
    ) -> Result<DeploymentConfig, ConfigError> {
        match (config, min_healthy) {
            (Some(_), Some(_)) => Err(ConfigErrorKind::ConfigAndMinHealthy.into()),
            (Some(name), None) => DeploymentConfig::parse_name(name),
            (None, Some(text)) => Ok(DeploymentConfig::Custom {
                min_healthy: text.parse()?,
            }),
            (None, None) => Ok(DeploymentConfig::default()),
        }
    }

    /// What this configuration means for a deployment to `hosts` hosts (at least one).
    pub fn rules(self, hosts: usize) -> Rules {
        let hosts = hosts.max(1);
        match self {
            DeploymentConfig::AllAtOnce => Rules {
                minimum: 0,
                required: 1,
                max_batch: hosts,
            },
            DeploymentConfig::HalfAtATime => {
                let max_batch = (hosts / 2).max(1);
                Rules {
                    minimum: hosts - max_batch,
                    required: hosts.div_ceil(2),
                    max_batch,
                }
            }
            DeploymentConfig::OneAtATime => Rules {
                minimum: hosts - 1,
                required: (hosts - 1).max(1),
                max_batch: 1,
            },
            DeploymentConfig::Custom { min_healthy } => {
                let minimum = min_healthy.hosts(hosts);
                Rules {
                    minimum,
                    required: minimum.max(1),
                    max_batch: hosts.saturating_sub(minimum).max(1),
                }
            }
        }
    }
}

impl fmt::Display for DeploymentConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeploymentConfig::AllAtOnce => f.write_str("AllAtOnce"),
            DeploymentConfig::HalfAtATime => f.write_str("HalfAtATime"),
            DeploymentConfig::OneAtATime => f.write_str("OneAtATime"),
            DeploymentConfig::Custom { min_healthy } => write!(f, "min-healthy {min_healthy}"),
        }
    }
}

/// The most all the bakes of one rollout may last together: 12 hours, so that the
/// operator's intent (valid 24 hours, `intent::MAX_AGE_SECS`) still verifies on the hosts
/// of the last wave and for a rollback.
pub const MAX_ROLLOUT_SECS: u64 = 12 * 3600;

/// The most one bake may last.
pub const MAX_BAKE_SECS: u64 = MAX_ROLLOUT_SECS;

/// How the hosts are released in waves, on top of the [`DeploymentConfig`]'s batches: all
/// at once (the default, CodeDeploy's in-place behaviour), a canary wave then the rest, or
/// equal waves. Between two waves the deployment is `Baking` for the bake time: the hosts
/// updated so far keep serving the new revision before any other host takes it. Within a
/// wave, batches follow the configuration's minimum of healthy hosts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Rollout {
    /// One wave: every host, by the configuration's batches.
    #[default]
    Waveless,
    /// `percent` of the hosts (rounded up, at least one) first, then a bake of
    /// `bake_secs`, then the rest. A canary host that fails fails the deployment, whatever
    /// the minimum of healthy hosts.
    Canary { percent: Percent, bake_secs: u64 },
    /// Waves of `percent` of the hosts (rounded up, at least one), with a bake of
    /// `bake_secs` after each but the last.
    Linear { percent: Percent, bake_secs: u64 },
    /// One wave per zone (a value of the zone tag the intent names; zones in the order of
    /// their names), as CodeDeploy's zonal configuration: a bake of `first_bake_secs`
    /// after the first zone and of `bake_secs` after each other but the last. The
    /// configuration's minimum of healthy hosts holds in each zone too, counted on the
    /// zone's hosts.
    Zones {
        first_bake_secs: u64,
        bake_secs: u64,
    },
}

impl Rollout {
    /// `--canary P%:DURATION` or `--linear P%:DURATION` (not both), or neither. A duration
    /// is seconds, or a number with `s`, `m` or `h`.
    pub fn from_options(
        canary: Option<&str>,
        linear: Option<&str>,
    ) -> Result<Rollout, ConfigError> {
        match (canary, linear) {
            (Some(_), Some(_)) => Err(ConfigErrorKind::CanaryAndLinear.into()),
            (Some(text), None) => {
                let (percent, bake_secs) = parse_wave(text)?;
                Ok(Rollout::Canary { percent, bake_secs })
            }
            (None, Some(text)) => {
                let (percent, bake_secs) = parse_wave(text)?;
                let rollout = Rollout::Linear { percent, bake_secs };
                let secs = rollout.longest_bakes();
                if secs > MAX_ROLLOUT_SECS {
                    return Err(ConfigErrorKind::BakeTooLong { secs }.into());
                }
                Ok(rollout)
            }
            (None, None) => Ok(Rollout::Waveless),
        }
    }

    /// `--zones TAG [--zone-bake DURATION] [--first-zone-bake DURATION]`: zone by zone,
    /// with no bake unless told, and after the first zone the zone bake unless told.
    pub fn zones(
        zone_bake: Option<&str>,
        first_zone_bake: Option<&str>,
    ) -> Result<Rollout, ConfigError> {
        let bake_secs = zone_bake.map(parse_bake).transpose()?.unwrap_or(0);
        let first_bake_secs = first_zone_bake
            .map(parse_bake)
            .transpose()?
            .unwrap_or(bake_secs);
        Ok(Rollout::Zones {
            first_bake_secs,
            bake_secs,
        })
    }

    /// How long the bake after wave `wave` (0 for the first) lasts; zero without waves.
    pub fn bake_after(self, wave: usize) -> std::time::Duration {
        std::time::Duration::from_secs(match self {
            Rollout::Waveless => 0,
            Rollout::Canary { bake_secs, .. } | Rollout::Linear { bake_secs, .. } => bake_secs,
            Rollout::Zones {
                first_bake_secs, ..
            } if wave == 0 => first_bake_secs,
            Rollout::Zones { bake_secs, .. } => bake_secs,
        })
    }

    /// The most time all bakes may take together, for any number of hosts: linear waves of
    /// P% are at most ⌈100 / P⌉, with a bake between each two. Zones depend on how many
    /// there are: here the least (two zones), and [`Planner::with_rollout`] checks the
    /// rest.
    pub fn longest_bakes(self) -> u64 {
        match self {
            Rollout::Waveless => 0,
            Rollout::Canary { bake_secs, .. } => bake_secs,
            Rollout::Zones {
                first_bake_secs, ..
            } => first_bake_secs,
            Rollout::Linear { percent, bake_secs } => {
                let waves = 100u64.div_ceil(u64::from(percent.get().max(1)));
                waves.saturating_sub(1).saturating_mul(bake_secs)
            }
        }
    }

    /// Where each wave ends, as a count of hosts in deployment order, for `hosts` hosts:
    /// the last is always `hosts`. Zones are cut by [`Planner::with_rollout`], which knows
    /// them: here they are one wave.
    pub fn waves(self, hosts: usize) -> Vec<usize> {
        let step = |percent: Percent| percent.of_rounded_up(hosts).clamp(1, hosts.max(1));
        match self {
            Rollout::Waveless | Rollout::Zones { .. } => vec![hosts],
            Rollout::Canary { percent, .. } => {
                let canary = step(percent);
                if canary >= hosts {
                    vec![hosts]
                } else {
                    vec![canary, hosts]
                }
            }
            Rollout::Linear { percent, .. } => {
                let step = step(percent);
                let mut ends: Vec<usize> =
                    (1..).map(|k| k * step).take_while(|&e| e < hosts).collect();
                ends.push(hosts);
                ends
            }
        }
    }
}

/// `P%:DURATION`: a percentage from 1 to 100 and a bake time of at most [`MAX_BAKE_SECS`].
fn parse_wave(text: &str) -> Result<(Percent, u64), ConfigError> {
    let bad = || ConfigErrorKind::BadWave { text: quote(text) };
    let (percent, duration) = text.trim().split_once(':').ok_or_else(bad)?;
    let percent: u64 = percent
        .trim()
        .strip_suffix('%')
        .ok_or_else(bad)?
        .trim()
        .parse()
        .map_err(|_| bad())?;
    let percent = u8::try_from(percent)
        .ok()
        .filter(|&p| p > 0)
        .and_then(Percent::new)
        .ok_or(ConfigErrorKind::WavePercentOutOfRange { percent })?;
    let secs = parse_bake(duration).map_err(|e| match e.kind {
        ConfigErrorKind::BadBake { .. } => bad().into(),
        _ => e,
    })?;
    Ok((percent, secs))
}

/// A bake time: seconds, or a number with `s`, `m` or `h`, at most [`MAX_BAKE_SECS`].
fn parse_bake(text: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigErrorKind::BadBake { text: quote(text) };
    let duration = text.trim();
    let (number, unit) = match duration.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => duration.split_at(at),
        None => (duration, "s"),
    };
    let scale = match unit.trim() {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(bad().into()),
    };
    let secs = number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(bad)?;
    if secs > MAX_BAKE_SECS {
        return Err(ConfigErrorKind::BakeTooLong { secs }.into());
    }
    Ok(secs)
}

impl fmt::Display for Rollout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rollout::Waveless => f.write_str("no waves"),
            Rollout::Canary { percent, bake_secs } => {
                write!(f, "canary {percent}, bake {bake_secs}s")
            }
            Rollout::Linear { percent, bake_secs } => {
                write!(f, "linear {percent} per wave, bake {bake_secs}s")
            }
            Rollout::Zones {
                first_bake_secs,
                bake_secs,
            } => write!(
                f,
                "zone by zone, bake {bake_secs}s (after the first zone {first_bake_secs}s)"
            ),
        }
    }
}

/// The numbers a [`DeploymentConfig`] means for a given number of hosts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Rules {
    /// Healthy hosts that must remain: a batch takes at most `healthy − minimum` healthy
    /// hosts offline.
    pub minimum: usize,
    /// Hosts that must succeed for the deployment to succeed (at least one).
    pub required: usize,
    /// The most hosts in one batch.
    pub max_batch: usize,
}

/// A host's instance health as the deployment starts (CodeDeploy's: healthy when its last
/// deployment succeeded).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Health {
    /// Counted among the healthy hosts; taking it offline spends the batch budget.
    Healthy,
    /// Not counted healthy; updated first, at no cost to the minimum.
    Unhealthy,
}

/// Which revision of the application a host runs, as far as the coordinator knows.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Revision {
    /// Nothing known to be installed.
    Unknown,
    /// This revision id is installed (the one being deployed, or an older one).
    Known(String),
}

/// A targeted host, as the planner needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostInfo {
    /// The host's name (unique within a deployment).
    pub name: String,
    /// Its instance health.
    pub health: Health,
    /// What it runs now.
    pub revision: Revision,
    /// Its zone (the value of the zone tag) for a rollout zone by zone.
    pub zone: Option<String>,
}

/// How one host's deployment ended, as reported to [`Planner::host_done`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The host runs the new revision and it validated.
    Succeeded,
    /// It does not (including a host that could not be reached).
    Failed,
}

pub use crate::lifecycle::status::HostStatus;

/// The deployment's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Status {
    /// Hosts remain to update or to report.
    InProgress,
    /// Every host was tried and enough succeeded ([`Rules::required`]).
    Succeeded,
    /// It cannot succeed; no batch starts any more.
    Failed {
        /// Why.
        reason: FailReason,
    },
    /// [`Planner::stop`] was called; no batch starts any more.
    Stopped,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Status::InProgress => f.write_str("InProgress"),
            Status::Succeeded => f.write_str("Succeeded"),
            Status::Failed { reason } => write!(f, "Failed: {reason}"),
            Status::Stopped => f.write_str("Stopped"),
        }
    }
}

/// Why a deployment failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
pub enum FailReason {
    /// After `failed` failures at most `healthy` hosts can be healthy, and a host still to
    /// update could only be taken offline by going below the minimum.
    #[error(
        "{failed} host(s) failed: at most {healthy} hosts can be healthy, and updating the \
         rest would leave fewer than the minimum of {minimum}"
    )]
    MinimumHealthy {
        failed: usize,
        healthy: usize,
        minimum: usize,
    },
    /// Zone by zone: failures in `zone` leave at most `healthy` of its hosts healthy, and
    /// a host of it still to update could only go offline below the zone's minimum.
    #[error(
        "{failed} host(s) of zone {zone} failed: at most {healthy} of its hosts can be \
         healthy, and updating the rest would leave fewer than its minimum of {minimum}"
    )]
    ZoneMinimumHealthy {
        zone: String,
        failed: usize,
        healthy: usize,
        minimum: usize,
    },
    /// A host of the canary wave failed.
    #[error("canary host {host} failed")]
    CanaryFailed { host: String },
    /// Only `possible` hosts succeeded or still can, fewer than `required`.
    #[error("only {possible} host(s) succeeded or still can, fewer than the {required} required")]
    TooFewSucceeded { possible: usize, required: usize },
}

/// Hosts counted by status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HostCounts {
    pub pending: usize,
    pub in_progress: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub skipped: usize,
}

/// Why a deployment cannot be planned; nothing has started.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// No host to deploy to.
    #[error("the deployment has no host")]
    NoHosts,
    /// The same host twice.
    #[error("host {name:?} is listed twice")]
    DuplicateHost { name: String },
    /// Zone by zone, and a host has no zone.
    #[error("host {host:?} has no zone: zone by zone, every host must carry the zone tag")]
    NoZone { host: String },
    /// In a zone, the minimum leaves no healthy host to update.
    #[error(
        "zone {zone:?}: a minimum of {minimum} healthy hosts out of its {hosts} leaves no \
         healthy host to update"
    )]
    ZoneMinimumCannotHold {
        zone: String,
        minimum: usize,
        hosts: usize,
    },
    /// Zone by zone, the fleet's minimum leaves no healthy host of this zone to update
    /// (unhealthy hosts of later zones are not updated first, so they make no room).
    #[error(
        "zone {zone:?} could not start: the fleet's minimum of {minimum} healthy hosts leaves \
         none of its healthy hosts to update (zone by zone, unhealthy hosts of later zones \
         are not updated first); lower the minimum, or deploy to the unhealthy hosts first"
    )]
    ZoneStalls { zone: String, minimum: usize },
    /// The bakes between these zones are longer than a rollout may bake.
    #[error(
        "the bakes between {zones} zones last {secs} s in all, longer than the \
         {MAX_ROLLOUT_SECS} s a rollout may bake"
    )]
    BakesTooLong { zones: usize, secs: u64 },
    /// The minimum leaves no healthy host to update, even if every host succeeded.
    #[error(
        "a minimum of {minimum} healthy hosts out of {hosts} leaves no healthy host to \
         update; it must be less than {hosts}"
    )]
    MinimumCannotHold { minimum: usize, hosts: usize },
    /// More successes are required than there are hosts.
    #[error("{required} hosts must succeed but the deployment has only {hosts}")]
    CannotSucceed { required: usize, hosts: usize },
}

/// A result the planner cannot take; nothing changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    /// Not a host of this deployment.
    #[error("host {name:?} is not part of this deployment")]
    UnknownHost { name: String },
    /// A host that was never started.
    #[error("host {name:?} was not started")]
    NotStarted { name: String },
    /// A host that already reported.
    #[error("host {name:?} already reported ({status})")]
    AlreadyReported { name: String, status: HostStatus },
}

/// Parsing `--config` or `--min-healthy` failed. [`ConfigError::kind`] says how.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("deployment config: {kind}")]
pub struct ConfigError {
    kind: ConfigErrorKind,
}

impl ConfigError {
    /// What was wrong.
    pub fn kind(&self) -> &ConfigErrorKind {
        &self.kind
    }
}

impl From<ConfigErrorKind> for ConfigError {
    fn from(kind: ConfigErrorKind) -> Self {
        ConfigError { kind }
    }
}

/// What was wrong with a deployment configuration (quoted parts are cut to 64 bytes).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigErrorKind {
    /// Not one of the predefined names.
    #[error(
        "unknown configuration {name:?}; expected AllAtOnce, HalfAtATime or OneAtATime \
         (optionally prefixed with CodeDeployDefault.)"
    )]
    UnknownConfig { name: String },
    /// Neither a count nor a percentage.
    #[error(
        "minimum healthy hosts {text:?} is neither a number of hosts (N) nor a percentage (P%)"
    )]
    BadMinHealthy { text: String },
    /// A percentage over 100.
    #[error("minimum healthy hosts {percent}% is more than 100%")]
    PercentOutOfRange { percent: u64 },
    /// Both `--config` and `--min-healthy`.
    #[error("give either a configuration name or a minimum of healthy hosts, not both")]
    ConfigAndMinHealthy,
    /// Both `--canary` and `--linear`.
    #[error("give either --canary or --linear, not both")]
    CanaryAndLinear,
    /// Not `P%:DURATION`.
    #[error(
        "wave {text:?} is not P%:DURATION (a percentage, then seconds or a number with s, m \
         or h: `25%:10m`)"
    )]
    BadWave { text: String },
    /// Not a duration.
    #[error("bake time {text:?} is not seconds or a number with s, m or h (`90s`, `10m`)")]
    BadBake { text: String },
    /// A wave of 0% or more than 100%.
    #[error("a wave of {percent}% is not between 1% and 100%")]
    WavePercentOutOfRange { percent: u64 },
    /// Bakes longer than [`MAX_ROLLOUT_SECS`] in all.
    #[error(
        "bakes of {secs} s in all are longer than the {MAX_ROLLOUT_SECS} s a rollout may bake \
         (the operator's intent must still be valid when it ends)"
    )]
    BakeTooLong { secs: u64 },
}

/// A host's state inside the planner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Pending,
    InProgress,
    Succeeded,
    Failed,
}

#[derive(Debug)]
struct Host {
    name: String,
    healthy: bool,
    state: State,
    zone: Option<String>,
}

/// One deployment's batches, sans-IO. See the module documentation for the rules.
#[derive(Debug)]
pub struct Planner {
    config: DeploymentConfig,
    rules: Rules,
    /// Every host, in deployment order.
    hosts: Vec<Host>,
    /// Host name to its place in `hosts`.
    index: HashMap<String, usize>,
    /// Hosts not started, in order (places in `hosts`).
    pending: VecDeque<usize>,
    /// Healthy hosts among `pending`.
    pending_healthy: usize,
    /// Hosts healthy now: healthy at the start and not started, or succeeded.
    healthy_now: usize,
    in_flight: usize,
    succeeded: usize,
    failed: usize,
    status: Status,
    rollout: Rollout,
    /// Where each wave ends ([`Rollout::waves`]), and the wave under way.
    waves: Vec<usize>,
    wave: usize,
    /// Per wave: the healthy hosts it must keep (a zone's minimum; 0 for other waves),
    /// its hosts healthy now, and its zone's name (zone by zone).
    wave_minimum: Vec<usize>,
    wave_healthy: Vec<usize>,
    wave_zone: Vec<String>,
    /// While baking after a wave: until when (Unix milliseconds, as the log recorded it).
    baking: Option<u64>,
}

impl Planner {
    /// Plans a deployment of `target_revision` to `hosts` under `config`. Refuses a plan that
    /// could not finish even if every host succeeded (see the module documentation).
    pub fn new(
        config: DeploymentConfig,
        mut hosts: Vec<HostInfo>,
        target_revision: &str,
    ) -> Result<Planner, PlanError> {
        if hosts.is_empty() {
            return Err(PlanError::NoHosts);
        }
        let total = hosts.len();
        let rules = config.rules(total);
        hosts.sort_unstable_by(|a, b| {
            order_key(a, target_revision).cmp(&order_key(b, target_revision))
        });
        let mut index = HashMap::with_capacity(total);
        for (i, host) in hosts.iter().enumerate() {
            if index.insert(host.name.clone(), i).is_some() {
                return Err(PlanError::DuplicateHost {
                    name: quote(&host.name),
                });
            }
        }
        let healthy = hosts.iter().filter(|h| h.health == Health::Healthy).count();
        if healthy > 0 && rules.minimum >= total {
            return Err(PlanError::MinimumCannotHold {
                minimum: rules.minimum,
                hosts: total,
            });
        }
        if rules.required > total {
            return Err(PlanError::CannotSucceed {
                required: rules.required,
                hosts: total,
            });
        }
        let hosts: Vec<Host> = hosts
            .into_iter()
            .map(|h| Host {
                healthy: h.health == Health::Healthy,
                name: h.name,
                state: State::Pending,
                zone: h.zone,
            })
            .collect();
        Ok(Planner {
            config,
            rules,
            pending: (0..total).collect(),
            pending_healthy: healthy,
            healthy_now: healthy,
            hosts,
            index,
            in_flight: 0,
            succeeded: 0,
            failed: 0,
            status: Status::InProgress,
            rollout: Rollout::Waveless,
            waves: vec![total],
            wave: 0,
            wave_minimum: vec![0],
            wave_healthy: vec![healthy],
            wave_zone: vec![String::new()],
            baking: None,
        })
    }

    /// The same plan released in the waves of `rollout`, with bakes between them; call it
    /// before any batch starts. Zone by zone, the hosts are reordered zone after zone
    /// (keeping the deployment order within each), and refused if a host has no zone, if a
    /// zone's minimum leaves none of its healthy hosts to update, or if the bakes between
    /// the zones last longer than [`MAX_ROLLOUT_SECS`].
    pub fn with_rollout(mut self, rollout: Rollout) -> Result<Planner, PlanError> {
        debug_assert_eq!(self.started(), 0, "a rollout is chosen before any batch");
        self.rollout = rollout;
        self.waves = rollout.waves(self.hosts.len());
        self.wave_minimum = vec![0; self.waves.len()];
        self.wave_zone = vec![String::new(); self.waves.len()];
        if let Rollout::Zones {
            first_bake_secs,
            bake_secs,
        } = rollout
        {
            if let Some(h) = self.hosts.iter().find(|h| h.zone.is_none()) {
                return Err(PlanError::NoZone {
                    host: quote(&h.name),
                });
            }
            // Stable: the deployment order holds within a zone.
            self.hosts.sort_by(|a, b| a.zone.cmp(&b.zone));
            self.index = self
                .hosts
                .iter()
                .enumerate()
                .map(|(i, h)| (h.name.clone(), i))
                .collect();
            self.pending = (0..self.hosts.len()).collect();
            self.waves.clear();
            self.wave_zone.clear();
            self.wave_minimum.clear();
            let mut start = 0;
            while start < self.hosts.len() {
                let zone = self.hosts[start].zone.clone().unwrap_or_default();
                let len = self.hosts[start..]
                    .iter()
                    .take_while(|h| h.zone.as_deref() == Some(zone.as_str()))
                    .count();
                let minimum = self.config.rules(len).minimum;
                let healthy = self.hosts[start..start + len].iter().any(|h| h.healthy);
                if healthy && minimum >= len {
                    return Err(PlanError::ZoneMinimumCannotHold {
                        zone: quote(&zone),
                        minimum,
                        hosts: len,
                    });
                }
                start += len;
                self.waves.push(start);
                self.wave_zone.push(zone);
                self.wave_minimum.push(minimum);
            }
            let zones = self.waves.len();
            let secs = if zones < 2 {
                0
            } else {
                first_bake_secs.saturating_add(bake_secs.saturating_mul(zones as u64 - 2))
            };
            if secs > MAX_ROLLOUT_SECS {
                return Err(PlanError::BakesTooLong { zones, secs });
            }
        }
        let mut start = 0;
        self.wave_healthy = self
            .waves
            .iter()
            .map(|&end| {
                let healthy = self.hosts[start..end].iter().filter(|h| h.healthy).count();
                start = end;
                healthy
            })
            .collect();
        // Zone by zone, an unhealthy host of a later zone is not updated first, so it does
        // not make room under the fleet's minimum: a plan that could not reach every host
        // even if all succeeded is refused, naming the zone it would stall in.
        if matches!(rollout, Rollout::Zones { .. }) {
            let planned: usize = self.batches_preview().iter().map(Vec::len).sum();
            if planned < self.hosts.len() {
                let wave = self.wave_of(planned);
                return Err(PlanError::ZoneStalls {
                    zone: quote(&self.wave_zone[wave]),
                    minimum: self.rules.minimum,
                });
            }
        }
        Ok(self)
    }

    /// Where each wave ends, as a count of hosts in deployment order.
    pub fn wave_ends(&self) -> &[usize] {
        &self.waves
    }

    /// Zone by zone: the zone of each wave, in order (empty otherwise).
    pub fn zones(&self) -> Vec<String> {
        match self.rollout {
            Rollout::Zones { .. } => self.wave_zone.clone(),
            _ => Vec::new(),
        }
    }

    /// The wave host `i` (a place in `hosts`) belongs to.
    fn wave_of(&self, i: usize) -> usize {
        self.waves.partition_point(|&end| end <= i)
    }

    /// The bake to start now, if the wave under way has ended and another follows: the
    /// caller records when it ends and calls [`Planner::baking`].
    pub fn bake_due(&self) -> Option<std::time::Duration> {
        (self.status == Status::InProgress
            && self.in_flight == 0
            && self.baking.is_none()
            && self.started() == self.waves[self.wave]
            && self.wave + 1 < self.waves.len())
        .then(|| self.rollout.bake_after(self.wave))
    }

    /// A bake until `until_ms` (Unix milliseconds) has begun: no batch starts before
    /// [`Planner::bake_over`]. Ignored unless [`Planner::bake_due`].
    pub fn baking(&mut self, until_ms: u64) {
        if self.bake_due().is_some() {
            self.baking = Some(until_ms);
        }
    }

    /// Until when the deployment bakes, while it does.
    pub fn baking_until(&self) -> Option<u64> {
        self.baking.filter(|_| self.status == Status::InProgress)
    }

    /// The bake is over: the next wave's batches may start.
    pub fn bake_over(&mut self) {
        if self.baking.take().is_some() {
            self.wave += 1;
        }
    }

    /// Hosts started so far (in flight or reported).
    fn started(&self) -> usize {
        self.hosts.len() - self.pending.len()
    }

    /// The numbers the configuration means for this deployment.
    pub fn rules(&self) -> Rules {
        self.rules
    }

    /// The batches still to start, assuming every host in flight and to come succeeds:
    /// after [`Planner::new`], the whole plan (what `--dry-run` prints). Empty once the
    /// deployment has ended.
    pub fn batches_preview(&self) -> Vec<Vec<String>> {
        let mut batches = Vec::new();
        if self.status != Status::InProgress {
            return batches;
        }
        // Hosts in flight come back healthy; every batch's hosts do too.
        let mut healthy = self.healthy_now + self.in_flight;
        let mut wave_healthy = self.wave_healthy.clone();
        if self.in_flight > 0 {
            wave_healthy[self.wave] += self.in_flight;
        }
        let mut start = 0;
        let started = self.started();
        while start < self.pending.len() {
            // A batch never crosses the end of its wave.
            let wave = self.wave_of(started + start);
            let wave_end = self.waves.get(wave).copied().unwrap_or(self.hosts.len());
            let room = wave_end - (started + start);
            let wave_budget = wave_healthy[wave].saturating_sub(self.wave_minimum[wave]);
            let (len, taken_healthy) = self.batch_len(healthy, wave_budget, start, room);
            if len == 0 {
                break;
            }
            wave_healthy[wave] += len - taken_healthy;
            let batch = self
                .pending
                .range(start..start + len)
                .map(|&i| self.hosts[i].name.clone())
                .collect();
            batches.push(batch);
            healthy += len - taken_healthy;
            start += len;
        }
        batches
    }

    /// The hosts to start now, in order; `None` while a batch is in flight, and once the
    /// deployment has ended. Each returned host is InProgress until reported.
    pub fn next_batch(&mut self) -> Option<Vec<String>> {
        if self.status != Status::InProgress
            || self.in_flight > 0
            || self.pending.is_empty()
            || self.baking.is_some()
        {
            return None;
        }
        // The wave's hosts have all started: a bake comes first (`bake_due`).
        let room = self.waves[self.wave].saturating_sub(self.started());
        if room == 0 {
            return None;
        }
        let wave_budget = self.wave_healthy[self.wave].saturating_sub(self.wave_minimum[self.wave]);
        let (len, _) = self.batch_len(self.healthy_now, wave_budget, 0, room);
        if len == 0 {
            // Unreachable by the checks in `new` and `decide`; kept so a bug cannot stall.
            self.status = Status::Failed {
                reason: FailReason::MinimumHealthy {
                    failed: self.failed,
                    healthy: self.healthy_now,
                    minimum: self.rules.minimum,
                },
            };
            return None;
        }
        let mut batch = Vec::with_capacity(len);
        for i in self.pending.drain(..len) {
            let host = &mut self.hosts[i];
            host.state = State::InProgress;
            if host.healthy {
                self.healthy_now -= 1;
                self.pending_healthy -= 1;
                self.wave_healthy[self.wave] -= 1;
            }
            batch.push(host.name.clone());
        }
        self.in_flight = len;
        Some(batch)
    }

    /// Records how host `name` ended. A host must have been started and may report once.
    /// Results of hosts in flight are taken after the deployment ended (their statuses
    /// change, the deployment's does not).
    pub fn host_done(&mut self, name: &str, outcome: Outcome) -> Result<(), ReportError> {
        let Some(&i) = self.index.get(name) else {
            return Err(ReportError::UnknownHost { name: quote(name) });
        };
        let host = &mut self.hosts[i];
        match host.state {
            State::InProgress => {}
            State::Pending => return Err(ReportError::NotStarted { name: quote(name) }),
            State::Succeeded | State::Failed => {
                return Err(ReportError::AlreadyReported {
                    name: quote(name),
                    status: status_of(host.state),
                });
            }
        }
        self.in_flight -= 1;
        match outcome {
            Outcome::Succeeded => {
                host.state = State::Succeeded;
                self.succeeded += 1;
                self.healthy_now += 1;
                let wave = self.wave_of(i);
                self.wave_healthy[wave] += 1;
            }
            Outcome::Failed => {
                host.state = State::Failed;
                self.failed += 1;
                if self.status == Status::InProgress
                    && self.wave == 0
                    && matches!(self.rollout, Rollout::Canary { .. })
                    && self.waves.len() > 1
                {
                    self.status = Status::Failed {
                        reason: FailReason::CanaryFailed { host: quote(name) },
                    };
                }
            }
        }
        if self.status == Status::InProgress {
            self.decide();
        }
        if self.status == Status::InProgress && outcome == Outcome::Failed {
            self.decide_zone(self.wave_of(i));
        }
        Ok(())
    }

    /// Zone by zone, after a failure in wave `wave`: whether its zone can still keep its
    /// minimum while its healthy hosts still to update go offline.
    fn decide_zone(&mut self, wave: usize) {
        if !matches!(self.rollout, Rollout::Zones { .. }) {
            return;
        }
        let start = wave.checked_sub(1).map_or(0, |w| self.waves[w]);
        let hosts = &self.hosts[start..self.waves[wave]];
        let failed = hosts.iter().filter(|h| h.state == State::Failed).count();
        let pending_healthy = hosts.iter().any(|h| h.healthy && h.state == State::Pending);
        let possible = hosts.len() - failed;
        let minimum = self.wave_minimum[wave];
        if pending_healthy && possible <= minimum {
            self.status = Status::Failed {
                reason: FailReason::ZoneMinimumHealthy {
                    zone: quote(&self.wave_zone[wave]),
                    failed,
                    healthy: possible,
                    minimum,
                },
            };
        }
    }

    /// Stops the deployment: no batch starts after this; hosts in flight still report.
    /// Hosts not started become Skipped. Does nothing once the deployment has ended.
    pub fn stop(&mut self) {
        if self.status == Status::InProgress {
            self.status = Status::Stopped;
        }
    }

    /// The deployment's state.
    pub fn status(&self) -> &Status {
        &self.status
    }

    /// Host `name`'s status, or `None` if it is not part of this deployment.
    pub fn host_status(&self, name: &str) -> Option<HostStatus> {
        let &i = self.index.get(name)?;
        Some(self.status_at(i))
    }

    /// Every host and its status, in deployment order.
    pub fn hosts(&self) -> impl Iterator<Item = (&str, HostStatus)> + '_ {
        self.hosts
            .iter()
            .enumerate()
            .map(|(i, h)| (h.name.as_str(), self.status_at(i)))
    }

    /// How many hosts have each status.
    pub fn counts(&self) -> HostCounts {
        let not_started = self.pending.len();
        let ended = self.status != Status::InProgress;
        HostCounts {
            pending: if ended { 0 } else { not_started },
            in_progress: self.in_flight,
            succeeded: self.succeeded,
            failed: self.failed,
            skipped: if ended { not_started } else { 0 },
        }
    }

    /// How many hosts of the deployment there are.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// Always false: a planner has at least one host.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// The length of the next batch from `pending[start..]` with `healthy` hosts healthy,
    /// at most `wave_budget` healthy hosts the wave may take offline (its zone's minimum)
    /// and at most `room` hosts left in the wave, and how many of its hosts are healthy
    /// ones (which spend the budget).
    fn batch_len(
        &self,
        healthy: usize,
        wave_budget: usize,
        start: usize,
        room: usize,
    ) -> (usize, usize) {
        let mut budget = healthy.saturating_sub(self.rules.minimum).min(wave_budget);
        let mut len = 0;
        let mut taken_healthy = 0;
        for &i in self
            .pending
            .range(start..)
            .take(self.rules.max_batch.min(room))
        {
            if self.hosts[i].healthy {
                if budget == 0 {
                    break;
                }
                budget -= 1;
                taken_healthy += 1;
            }
            len += 1;
        }
        (len, taken_healthy)
    }

    /// After a result: the verdict, if it is now certain.
    fn decide(&mut self) {
        // Hosts that are healthy or may still be: all but the failed ones.
        let possible = self.hosts.len() - self.failed;
        if possible < self.rules.required {
            self.status = Status::Failed {
                reason: FailReason::TooFewSucceeded {
                    possible,
                    required: self.rules.required,
                },
            };
        } else if self.pending_healthy > 0 && possible <= self.rules.minimum {
            // The last healthy host to update can only go offline with `possible - 1`
            // healthy hosts left, below the minimum.
            self.status = Status::Failed {
                reason: FailReason::MinimumHealthy {
                    failed: self.failed,
                    healthy: possible,
                    minimum: self.rules.minimum,
                },
            };
        } else if self.pending.is_empty() && self.in_flight == 0 {
            // Every host reported and `possible` (now `succeeded`) is enough.
            self.status = Status::Succeeded;
        }
    }

    fn status_at(&self, i: usize) -> HostStatus {
        match self.hosts[i].state {
            State::Pending if self.status != Status::InProgress => HostStatus::Skipped,
            state => status_of(state),
        }
    }
}

/// Deployment order: unhealthy first, then unknown revision, old revision, the target
/// revision; then by name.
fn order_key<'a>(host: &'a HostInfo, target_revision: &str) -> (u8, u8, &'a str) {
    let health = match host.health {
        Health::Unhealthy => 0,
        Health::Healthy => 1,
    };
    let revision = match &host.revision {
        Revision::Unknown => 0,
        Revision::Known(r) if r != target_revision => 1,
        Revision::Known(_) => 2,
    };
    (health, revision, host.name.as_str())
}

fn status_of(state: State) -> HostStatus {
    match state {
        State::Pending => HostStatus::Pending,
        State::InProgress => HostStatus::InProgress,
        State::Succeeded => HostStatus::Succeeded,
        State::Failed => HostStatus::Failed,
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    const TARGET: &str = "rev-new";

    fn healthy(names: impl IntoIterator<Item = String>) -> Vec<HostInfo> {
        names
            .into_iter()
            .map(|name| HostInfo {
                name,
                health: Health::Healthy,
                revision: Revision::Known("rev-old".into()),
                zone: None,
            })
            .collect()
    }

    /// `n` healthy hosts on an old revision, named h00, h01, ...
    fn fleet(n: usize) -> Vec<HostInfo> {
        healthy((0..n).map(|i| format!("h{i:02}")))
    }

    fn planner(config: DeploymentConfig, n: usize) -> Planner {
        match Planner::new(config, fleet(n), TARGET) {
            Ok(p) => p,
            Err(e) => panic!("{config} on {n} hosts should plan: {e}"),
        }
    }

    fn count(n: u32) -> DeploymentConfig {
        DeploymentConfig::Custom {
            min_healthy: MinHealthy::Count(n),
        }
    }

    fn percent(p: u8) -> DeploymentConfig {
        let p = Percent::new(p).unwrap_or_else(|| panic!("{p}% is a percentage"));
        DeploymentConfig::Custom {
            min_healthy: MinHealthy::Percent(p),
        }
    }

    fn report(p: &mut Planner, name: &str, outcome: Outcome) {
        assert_eq!(p.host_done(name, outcome), Ok(()), "{name}");
    }

    /// Runs `p` to the end, failing the hosts `fails` names; returns the batch sizes.
    fn run(p: &mut Planner, fails: impl Fn(&str) -> bool) -> Vec<usize> {
        let mut sizes = Vec::new();
        while let Some(batch) = p.next_batch() {
            sizes.push(batch.len());
            for name in batch {
                let outcome = if fails(&name) {
                    Outcome::Failed
                } else {
                    Outcome::Succeeded
                };
                report(p, &name, outcome);
            }
        }
        sizes
    }

    /// Runs a rolled-out `p` to the end, ending each bake at once; returns the batch sizes
    /// with a 0 where a bake came.
    fn run_waves(p: &mut Planner, fails: impl Fn(&str) -> bool) -> Vec<usize> {
        let mut sizes = Vec::new();
        loop {
            sizes.extend(run(p, &fails));
            match p.bake_due() {
                Some(_) => {
                    p.baking(1_000);
                    assert_eq!(p.next_batch(), None, "no batch while baking");
                    assert_eq!(p.baking_until(), Some(1_000));
                    p.bake_over();
                    sizes.push(0);
                }
                None => return sizes,
            }
        }
    }

    fn canary(percent: u8, bake_secs: u64) -> Rollout {
        Rollout::Canary {
            percent: Percent::new(percent).unwrap(),
            bake_secs,
        }
    }

    fn linear(percent: u8, bake_secs: u64) -> Rollout {
        Rollout::Linear {
            percent: Percent::new(percent).unwrap(),
            bake_secs,
        }
    }

    #[test]
    fn a_canary_wave_bakes_before_the_rest_follows_the_batches() {
        let mut p = planner(DeploymentConfig::OneAtATime, 8)
            .with_rollout(canary(25, 600))
            .unwrap();
        assert_eq!(sizes(&p.batches_preview()), [1, 1, 1, 1, 1, 1, 1, 1]);
        // The canary wave: 25% of 8, one at a time.
        assert_eq!(run(&mut p, |_| false), [1, 1]);
        assert_eq!(p.bake_due(), Some(std::time::Duration::from_secs(600)));
        assert_eq!(*p.status(), Status::InProgress);
        p.baking(5_000);
        assert_eq!(p.next_batch(), None);
        assert_eq!(p.bake_due(), None, "one bake per wave");
        assert_eq!(p.counts(), counts(6, 0, 2, 0, 0));
        p.bake_over();
        assert_eq!(run(&mut p, |_| false), [1, 1, 1, 1, 1, 1]);
        assert_eq!(p.bake_due(), None, "no bake after the last wave");
        assert_eq!(*p.status(), Status::Succeeded);

        // AllAtOnce: the canary in one batch, the rest in another.
        let mut p = planner(DeploymentConfig::AllAtOnce, 8)
            .with_rollout(canary(25, 60))
            .unwrap();
        assert_eq!(sizes(&p.batches_preview()), [2, 6]);
        assert_eq!(run_waves(&mut p, |_| false), [2, 0, 6]);
        assert_eq!(*p.status(), Status::Succeeded);
        // At least one host, even for 1% of 3; a canary of every host needs no bake.
        let mut p = planner(DeploymentConfig::AllAtOnce, 3)
            .with_rollout(canary(1, 60))
            .unwrap();
        assert_eq!(run_waves(&mut p, |_| false), [1, 0, 2]);
        let mut p = planner(DeploymentConfig::AllAtOnce, 3)
            .with_rollout(canary(100, 60))
            .unwrap();
        assert_eq!(run_waves(&mut p, |_| false), [3]);
    }

    #[test]
    fn a_failed_canary_host_fails_the_deployment_whatever_the_minimum() {
        let mut p = planner(DeploymentConfig::AllAtOnce, 8)
            .with_rollout(canary(25, 60))
            .unwrap();
        assert_eq!(run_waves(&mut p, |h| h == "h01"), [2]);
        assert_eq!(
            *p.status(),
            Status::Failed {
                reason: FailReason::CanaryFailed { host: "h01".into() }
            }
        );
        assert_eq!(p.bake_due(), None);
        assert_eq!(p.counts(), counts(0, 0, 1, 1, 6));
        // After the canary, the configuration's rules again: AllAtOnce takes a failure.
        let mut p = planner(DeploymentConfig::AllAtOnce, 8)
            .with_rollout(canary(25, 60))
            .unwrap();
        assert_eq!(run_waves(&mut p, |h| h == "h05"), [2, 0, 6]);
        assert_eq!(*p.status(), Status::Succeeded);
    }

    #[test]
    fn linear_waves_are_equal_shares_with_a_bake_between_each() {
        let mut p = planner(DeploymentConfig::AllAtOnce, 10)
            .with_rollout(linear(30, 60))
            .unwrap();
        assert_eq!(sizes(&p.batches_preview()), [3, 3, 3, 1]);
        assert_eq!(run_waves(&mut p, |_| false), [3, 0, 3, 0, 3, 0, 1]);
        assert_eq!(*p.status(), Status::Succeeded);
        // Inside a wave the minimum still holds: HalfAtATime on 10 is 5 at a time.
        let mut p = planner(DeploymentConfig::HalfAtATime, 10)
            .with_rollout(linear(70, 60))
            .unwrap();
        assert_eq!(run_waves(&mut p, |_| false), [5, 2, 0, 3]);
        // A failure in a wave counts against the minimum as without waves.
        let mut p = planner(DeploymentConfig::OneAtATime, 4)
            .with_rollout(linear(50, 60))
            .unwrap();
        assert_eq!(run_waves(&mut p, |h| h == "h00"), [1]);
        assert!(is_failed(&p));
    }

    /// Hosts `<zone><n>` in the zones given as (zone, hosts), in that order.
    fn zoned(zones: &[(&str, usize)]) -> Vec<HostInfo> {
        zones
            .iter()
            .flat_map(|&(zone, n)| {
                (0..n).map(move |i| HostInfo {
                    name: format!("{zone}{i}"),
                    health: Health::Healthy,
                    revision: Revision::Known("rev-old".into()),
                    zone: Some(zone.to_string()),
                })
            })
            .collect()
    }

    fn zones(first: u64, then: u64) -> Rollout {
        Rollout::Zones {
            first_bake_secs: first,
            bake_secs: then,
        }
    }

    fn zone_planner(config: DeploymentConfig, hosts: &[(&str, usize)]) -> Planner {
        Planner::new(config, zoned(hosts), TARGET)
            .unwrap()
            .with_rollout(zones(120, 60))
            .unwrap()
    }

    #[test]
    fn zone_by_zone_one_zone_at_a_time_in_the_order_of_their_names() {
        let mut p = zone_planner(DeploymentConfig::AllAtOnce, &[("b", 3), ("a", 2), ("c", 1)]);
        assert_eq!(p.zones(), ["a", "b", "c"]);
        let preview = p.batches_preview();
        assert_eq!(
            preview,
            [vec!["a0", "a1"], vec!["b0", "b1", "b2"], vec!["c0"]]
        );
        // Every batch within one zone, and a bake between zones: the first one longer.
        assert_eq!(run(&mut p, |_| false), [2]);
        assert_eq!(p.bake_due(), Some(std::time::Duration::from_secs(120)));
        p.baking(1);
        p.bake_over();
        assert_eq!(p.next_batch().unwrap(), ["b0", "b1", "b2"]);
        for h in ["b0", "b1", "b2"] {
            report(&mut p, h, Outcome::Succeeded);
        }
        assert_eq!(p.bake_due(), Some(std::time::Duration::from_secs(60)));
        p.baking(2);
        p.bake_over();
        assert_eq!(run(&mut p, |_| false), [1]);
        assert_eq!(p.bake_due(), None, "no bake after the last zone");
        assert_eq!(*p.status(), Status::Succeeded);
    }

    #[test]
    fn the_minimum_holds_in_each_zone_too() {
        // HalfAtATime on 4 hosts alone would take 2 at a time; each zone of 2 keeps 1.
        let mut p = zone_planner(DeploymentConfig::HalfAtATime, &[("a", 2), ("b", 2)]);
        assert_eq!(sizes(&p.batches_preview()), [1, 1, 1, 1]);
        assert_eq!(run_waves(&mut p, |_| false), [1, 1, 0, 1, 1]);
        assert_eq!(*p.status(), Status::Succeeded);
        // Half of 6 may fail overall, but zone a (minimum 2 of 4) cannot lose two.
        let half = DeploymentConfig::from_options(None, Some("50%")).unwrap();
        let mut p = zone_planner(half, &[("a", 4), ("b", 2)]);
        assert_eq!(run_waves(&mut p, |h| h == "a0" || h == "a1"), [2]);
        assert_eq!(
            *p.status(),
            Status::Failed {
                reason: FailReason::ZoneMinimumHealthy {
                    zone: "a".into(),
                    failed: 2,
                    healthy: 2,
                    minimum: 2,
                }
            }
        );
        assert_eq!(p.counts(), counts(0, 0, 0, 2, 4));
        // One failure in zone a leaves it at its minimum with hosts to go: it goes on.
        let mut p = zone_planner(half, &[("a", 4), ("b", 2)]);
        assert_eq!(run_waves(&mut p, |h| h == "a0"), [2, 1, 1, 0, 1, 1]);
        assert_eq!(*p.status(), Status::Succeeded);
    }

    #[test]
    fn zones_that_cannot_be_planned_are_refused_with_the_reason() {
        let mut hosts = zoned(&[("a", 2)]);
        hosts.push(HostInfo {
            zone: None,
            ..fleet(1).remove(0)
        });
        let refused = |config, hosts, rollout| {
            Planner::new(config, hosts, TARGET)
                .unwrap()
                .with_rollout(rollout)
                .unwrap_err()
        };
        assert_eq!(
            refused(DeploymentConfig::AllAtOnce, hosts, zones(0, 0)),
            PlanError::NoZone { host: "h00".into() }
        );
        // Two healthy hosts must stay in a zone of two: none could be updated.
        assert_eq!(
            refused(count(2), zoned(&[("a", 2), ("b", 4)]), zones(0, 0)),
            PlanError::ZoneMinimumCannotHold {
                zone: "a".into(),
                minimum: 2,
                hosts: 2
            }
        );
        // OneAtATime over four hosts keeps three healthy: zone a's two healthy hosts could
        // go only if zone b's unhealthy host were updated first, which zone by zone is not.
        let mut hosts = zoned(&[("a", 2), ("b", 2)]);
        hosts[2].health = Health::Unhealthy;
        assert_eq!(
            refused(DeploymentConfig::OneAtATime, hosts, zones(0, 0)),
            PlanError::ZoneStalls {
                zone: "a".into(),
                minimum: 3
            }
        );
        // Three zones: a first bake of 12 h and one of 1 h is past the bound.
        assert_eq!(
            refused(
                DeploymentConfig::AllAtOnce,
                zoned(&[("a", 1), ("b", 1), ("c", 1)]),
                zones(12 * 3600, 3600)
            ),
            PlanError::BakesTooLong {
                zones: 3,
                secs: 13 * 3600
            }
        );
    }

    #[test]
    fn zone_bakes_parse_with_defaults() {
        assert_eq!(Rollout::zones(None, None).unwrap(), zones(0, 0));
        assert_eq!(Rollout::zones(Some("1m"), None).unwrap(), zones(60, 60));
        assert_eq!(
            Rollout::zones(Some("1m"), Some("2h")).unwrap(),
            zones(7200, 60)
        );
        assert!(matches!(
            Rollout::zones(Some("soon"), None).unwrap_err().kind(),
            ConfigErrorKind::BadBake { .. }
        ));
        assert!(matches!(
            Rollout::zones(None, Some("13h")).unwrap_err().kind(),
            ConfigErrorKind::BakeTooLong { .. }
        ));
    }

    #[test]
    fn a_stop_while_baking_ends_the_bake_and_skips_the_rest() {
        let mut p = planner(DeploymentConfig::AllAtOnce, 4)
            .with_rollout(canary(25, 60))
            .unwrap();
        assert_eq!(run(&mut p, |_| false), [1]);
        p.baking(9_000);
        p.stop();
        assert_eq!(p.baking_until(), None);
        assert_eq!(p.bake_due(), None);
        p.bake_over();
        assert_eq!(p.next_batch(), None);
        assert_eq!(*p.status(), Status::Stopped);
        assert_eq!(p.counts(), counts(0, 0, 1, 0, 3));
    }

    #[test]
    fn waves_parse_from_the_command_line_with_errors_that_say_what_is_wrong() {
        let ok = |c: Option<&str>, l: Option<&str>| Rollout::from_options(c, l).unwrap();
        assert_eq!(ok(None, None), Rollout::Waveless);
        assert_eq!(ok(Some("25%:10m"), None), canary(25, 600));
        assert_eq!(ok(Some(" 10% : 90 "), None), canary(10, 90));
        assert_eq!(ok(None, Some("20%:1h")), linear(20, 3600));
        assert_eq!(ok(None, Some("100%:0s")), linear(100, 0));
        let err = |c: Option<&str>, l: Option<&str>| Rollout::from_options(c, l).unwrap_err();
        assert_eq!(
            *err(Some("25%:1m"), Some("25%:1m")).kind(),
            ConfigErrorKind::CanaryAndLinear
        );
        for bad in ["25%", "25:10m", "x%:1m", "25%:10d", "25%:m", "25%:-1"] {
            assert!(
                matches!(err(Some(bad), None).kind(), ConfigErrorKind::BadWave { .. }),
                "{bad}"
            );
        }
        assert_eq!(
            *err(None, Some("0%:1m")).kind(),
            ConfigErrorKind::WavePercentOutOfRange { percent: 0 }
        );
        assert_eq!(
            *err(None, Some("101%:1m")).kind(),
            ConfigErrorKind::WavePercentOutOfRange { percent: 101 }
        );
        assert_eq!(
            *err(Some("5%:25h"), None).kind(),
            ConfigErrorKind::BakeTooLong { secs: 90_000 }
        );
        assert!(
            err(Some("5%:25h"), None)
                .to_string()
                .contains("longer than")
        );
    }

    fn sizes(batches: &[Vec<String>]) -> Vec<usize> {
        batches.iter().map(Vec::len).collect()
    }

    fn is_failed(p: &Planner) -> bool {
        matches!(p.status(), Status::Failed { .. })
    }

    fn counts(
        pending: usize,
        in_progress: usize,
        succeeded: usize,
        failed: usize,
        skipped: usize,
    ) -> HostCounts {
        HostCounts {
            pending,
            in_progress,
            succeeded,
            failed,
            skipped,
        }
    }

    // Configurations and their rules.

    #[test]
    fn config_names_and_min_healthy_parse() {
        use DeploymentConfig::*;
        for (text, want) in [
            ("AllAtOnce", AllAtOnce),
            ("HalfAtATime", HalfAtATime),
            ("OneAtATime", OneAtATime),
            ("CodeDeployDefault.AllAtOnce", AllAtOnce),
            ("CodeDeployDefault.HalfAtATime", HalfAtATime),
            ("CodeDeployDefault.OneAtATime", OneAtATime),
        ] {
            assert_eq!(DeploymentConfig::parse_name(text), Ok(want), "{text}");
        }
        for bad in [
            "allatonce",
            "",
            "CodeDeployDefault.",
            "Custom",
            "CodeDeployDefault.Foo",
        ] {
            assert!(
                matches!(
                    DeploymentConfig::parse_name(bad).map_err(|e| e.kind().clone()),
                    Err(ConfigErrorKind::UnknownConfig { .. })
                ),
                "{bad}"
            );
        }
        assert_eq!("6".parse::<MinHealthy>(), Ok(MinHealthy::Count(6)));
        assert_eq!(" 0 ".parse::<MinHealthy>(), Ok(MinHealthy::Count(0)));
        assert_eq!(
            "40%".parse::<MinHealthy>(),
            Ok(MinHealthy::Percent(Percent(40)))
        );
        assert_eq!(
            "100%".parse::<MinHealthy>(),
            Ok(MinHealthy::Percent(Percent(100)))
        );
        assert_eq!(
            "300%".parse::<MinHealthy>().map_err(|e| e.kind().clone()),
            Err(ConfigErrorKind::PercentOutOfRange { percent: 300 })
        );
        assert_eq!(
            "101%".parse::<MinHealthy>().map_err(|e| e.kind().clone()),
            Err(ConfigErrorKind::PercentOutOfRange { percent: 101 })
        );
        for bad in ["", "%", "-1", "1.5", "x%", "5 hosts", "99999999999"] {
            assert!(
                matches!(
                    bad.parse::<MinHealthy>().map_err(|e| e.kind().clone()),
                    Err(ConfigErrorKind::BadMinHealthy { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn command_line_options_choose_one_config() {
        assert_eq!(
            DeploymentConfig::from_options(None, None),
            Ok(DeploymentConfig::OneAtATime)
        );
        assert_eq!(
            DeploymentConfig::from_options(Some("HalfAtATime"), None),
            Ok(DeploymentConfig::HalfAtATime)
        );
        assert_eq!(
            DeploymentConfig::from_options(None, Some("6")),
            Ok(count(6))
        );
        assert_eq!(
            DeploymentConfig::from_options(Some("AllAtOnce"), Some("6"))
                .map_err(|e| e.kind().clone()),
            Err(ConfigErrorKind::ConfigAndMinHealthy)
        );
        let e = DeploymentConfig::from_options(Some("Fast"), None).err();
        assert_eq!(
            e.map(|e| e.to_string()).as_deref(),
            Some(
                "deployment config: unknown configuration \"Fast\"; expected AllAtOnce, \
                 HalfAtATime or OneAtATime (optionally prefixed with CodeDeployDefault.)"
            )
        );
    }

    #[test]
    fn configs_display_and_serialize() {
        assert_eq!(count(6).to_string(), "min-healthy 6");
        assert_eq!(percent(40).to_string(), "min-healthy 40%");
        assert_eq!(DeploymentConfig::HalfAtATime.to_string(), "HalfAtATime");
        for config in [DeploymentConfig::AllAtOnce, count(6), percent(40)] {
            let json = serde_json::to_string(&config).unwrap_or_default();
            let back: Result<DeploymentConfig, _> = serde_json::from_str(&json);
            assert_eq!(back.ok(), Some(config), "{json}");
        }
        let over = r#"{"Custom":{"min_healthy":{"Percent":101}}}"#;
        assert!(serde_json::from_str::<DeploymentConfig>(over).is_err());
    }

    #[test]
    fn predefined_rules_follow_codedeploy() {
        let rules = |c: DeploymentConfig, n| {
            let r = c.rules(n);
            (r.minimum, r.required, r.max_batch)
        };
        // Nine instances: AllAtOnce all nine, one success suffices.
        assert_eq!(rules(DeploymentConfig::AllAtOnce, 9), (0, 1, 9));
        // HalfAtATime: four at a time, five must succeed.
        assert_eq!(rules(DeploymentConfig::HalfAtATime, 9), (5, 5, 4));
        assert_eq!(rules(DeploymentConfig::HalfAtATime, 10), (5, 5, 5));
        assert_eq!(rules(DeploymentConfig::HalfAtATime, 1), (0, 1, 1));
        // OneAtATime: all but one stay healthy; the last may fail; a single host must not.
        assert_eq!(rules(DeploymentConfig::OneAtATime, 9), (8, 8, 1));
        assert_eq!(rules(DeploymentConfig::OneAtATime, 1), (0, 1, 1));
        // MinimumHealthyHosts: HOST_COUNT 6 of 9 (three at a time, six must succeed),
        // FLEET_PERCENT 40 of 9 (five at a time, four must succeed).
        assert_eq!(rules(count(6), 9), (6, 6, 3));
        assert_eq!(rules(percent(40), 9), (4, 4, 5));
        assert_eq!(rules(count(0), 9), (0, 1, 9));
    }

    #[test]
    fn min_healthy_percent_rounds_up() {
        assert_eq!(Percent(40).of_rounded_up(9), 4); // 3.6
        assert_eq!(Percent(95).of_rounded_up(10), 10); // 9.5
        assert_eq!(Percent(85).of_rounded_up(10), 9); // 8.5
        assert_eq!(Percent(50).of_rounded_up(9), 5); // 4.5
        assert_eq!(Percent(1).of_rounded_up(1), 1);
        assert_eq!(Percent(0).of_rounded_up(1000), 0);
        assert_eq!(Percent(100).of_rounded_up(usize::MAX), usize::MAX);
        let mut p = planner(percent(40), 9);
        assert_eq!(sizes(&p.batches_preview()), [5, 4]);
        assert_eq!(run(&mut p, |_| false), [5, 4]);
        assert_eq!(p.status(), &Status::Succeeded);
    }

    // Planning.

    #[test]
    fn half_at_a_time_nine_hosts_goes_four_four_one() {
        let mut p = planner(DeploymentConfig::HalfAtATime, 9);
        assert_eq!(sizes(&p.batches_preview()), [4, 4, 1]);
        assert_eq!(run(&mut p, |_| false), [4, 4, 1]);
        assert_eq!(p.status(), &Status::Succeeded);
        assert_eq!(p.counts(), counts(0, 0, 9, 0, 0));
    }

    #[test]
    fn half_at_a_time_stops_when_half_can_no_longer_stay_healthy() {
        // Nine hosts, five must stay healthy: four failures end it.
        let mut p = planner(DeploymentConfig::HalfAtATime, 9);
        let batch = p.next_batch().unwrap_or_default();
        for name in &batch {
            report(&mut p, name, Outcome::Failed);
        }
        // Four failed: 5 healthy at most, the minimum; the rest cannot be updated.
        assert!(matches!(
            p.status(),
            Status::Failed {
                reason: FailReason::MinimumHealthy {
                    failed: 4,
                    healthy: 5,
                    minimum: 5
                }
            }
        ));
        assert_eq!(p.next_batch(), None);
        assert_eq!(p.counts(), counts(0, 0, 0, 4, 5));
    }

    #[test]
    fn half_at_a_time_single_host_is_deployed() {
        let mut p = planner(DeploymentConfig::HalfAtATime, 1);
        assert_eq!(run(&mut p, |_| false), [1]);
        assert_eq!(p.status(), &Status::Succeeded);
        let mut p = planner(DeploymentConfig::HalfAtATime, 1);
        run(&mut p, |_| true);
        assert!(is_failed(&p));
    }

    #[test]
    fn min_healthy_six_of_nine_goes_three_at_a_time() {
        let mut p = planner(count(6), 9);
        assert_eq!(sizes(&p.batches_preview()), [3, 3, 3]);
        assert_eq!(run(&mut p, |_| false), [3, 3, 3]);
        assert_eq!(p.status(), &Status::Succeeded);
    }

    #[test]
    fn min_healthy_equal_to_host_count_fails_at_once() {
        assert_eq!(
            Planner::new(count(9), fleet(9), TARGET).err(),
            Some(PlanError::MinimumCannotHold {
                minimum: 9,
                hosts: 9
            })
        );
        assert_eq!(
            Planner::new(count(12), fleet(9), TARGET).err(),
            Some(PlanError::MinimumCannotHold {
                minimum: 12,
                hosts: 9
            })
        );
        // CodeDeploy's example: ten instances at 95% round up to ten.
        assert_eq!(
            Planner::new(percent(95), fleet(10), TARGET).err(),
            Some(PlanError::MinimumCannotHold {
                minimum: 10,
                hosts: 10
            })
        );
        let e = Planner::new(count(9), fleet(9), TARGET).err();
        assert_eq!(
            e.map(|e| e.to_string()).as_deref(),
            Some(
                "a minimum of 9 healthy hosts out of 9 leaves no healthy host to update; \
                 it must be less than 9"
            )
        );
    }

    #[test]
    fn new_refuses_no_hosts_and_duplicates() {
        assert_eq!(
            Planner::new(DeploymentConfig::AllAtOnce, Vec::new(), TARGET).err(),
            Some(PlanError::NoHosts)
        );
        let mut hosts = fleet(3);
        hosts.push(HostInfo {
            name: "h01".into(),
            health: Health::Unhealthy,
            revision: Revision::Unknown,
            zone: None,
        });
        assert_eq!(
            Planner::new(DeploymentConfig::AllAtOnce, hosts, TARGET).err(),
            Some(PlanError::DuplicateHost { name: "h01".into() })
        );
    }

    #[test]
    fn ten_hosts_min_nine_one_at_a_time_and_min_zero_all_at_once() {
        let p = planner(count(9), 10);
        assert_eq!(sizes(&p.batches_preview()), [1; 10]);
        let p = planner(count(0), 10);
        assert_eq!(sizes(&p.batches_preview()), [10]);
    }

    #[test]
    fn one_at_a_time_succeeds_when_only_the_last_host_fails() {
        let mut p = planner(DeploymentConfig::OneAtATime, 10);
        assert_eq!(run(&mut p, |name| name == "h09"), [1; 10]);
        assert_eq!(p.status(), &Status::Succeeded);
        assert_eq!(p.host_status("h09"), Some(HostStatus::Failed));
        assert_eq!(p.counts(), counts(0, 0, 9, 1, 0));
    }

    #[test]
    fn one_at_a_time_fails_as_soon_as_another_host_fails() {
        let mut p = planner(DeploymentConfig::OneAtATime, 10);
        assert_eq!(run(&mut p, |name| name == "h03"), [1; 4]);
        assert!(matches!(
            p.status(),
            Status::Failed {
                reason: FailReason::MinimumHealthy { failed: 1, .. }
            }
        ));
        assert_eq!(p.counts(), counts(0, 0, 3, 1, 6));
        assert_eq!(p.host_status("h02"), Some(HostStatus::Succeeded));
        assert_eq!(p.host_status("h03"), Some(HostStatus::Failed));
        assert_eq!(p.host_status("h04"), Some(HostStatus::Skipped));
        // The first host failing ends it too, and so does the only host.
        let mut p = planner(DeploymentConfig::OneAtATime, 2);
        assert_eq!(run(&mut p, |name| name == "h00"), [1]);
        assert!(is_failed(&p));
        let mut p = planner(DeploymentConfig::OneAtATime, 1);
        assert_eq!(run(&mut p, |_| true), [1]);
        assert!(matches!(
            p.status(),
            Status::Failed {
                reason: FailReason::TooFewSucceeded {
                    possible: 0,
                    required: 1
                }
            }
        ));
    }

    #[test]
    fn all_at_once_one_success_suffices() {
        let mut p = planner(DeploymentConfig::AllAtOnce, 9);
        assert_eq!(run(&mut p, |name| name != "h04"), [9]);
        assert_eq!(p.status(), &Status::Succeeded);
        assert_eq!(p.counts(), counts(0, 0, 1, 8, 0));

        let mut p = planner(DeploymentConfig::AllAtOnce, 9);
        assert_eq!(run(&mut p, |_| true), [9]);
        assert!(matches!(
            p.status(),
            Status::Failed {
                reason: FailReason::TooFewSucceeded {
                    possible: 0,
                    required: 1
                }
            }
        ));
    }

    /// CodeDeploy's example: ten instances, minimum 8, two at a time. A second failure
    /// fails the deployment, unless the last instance is the second to fail.
    #[test]
    fn ten_hosts_min_eight_second_failure_ends_it_unless_last() {
        let mut p = planner(count(8), 10);
        assert_eq!(sizes(&p.batches_preview()), [2; 5]);
        let sizes = run(&mut p, |name| name == "h00" || name == "h05");
        // After the first failure only one host may go offline at a time.
        assert_eq!(sizes, [2, 1, 1, 1, 1]);
        assert!(matches!(
            p.status(),
            Status::Failed {
                reason: FailReason::MinimumHealthy {
                    failed: 2,
                    healthy: 8,
                    minimum: 8
                }
            }
        ));
        assert_eq!(p.counts(), counts(0, 0, 4, 2, 4));

        let mut p = planner(count(8), 10);
        run(&mut p, |name| name == "h00" || name == "h09");
        assert_eq!(p.status(), &Status::Succeeded);
        assert_eq!(p.counts(), counts(0, 0, 8, 2, 0));
    }

    /// CodeDeploy's example: ten instances, 85% must stay healthy (rounded up to nine): a
    /// single failure fails the deployment.
    #[test]
    fn eighty_five_percent_of_ten_fails_on_one_failure() {
        let mut p = planner(percent(85), 10);
        assert_eq!(run(&mut p, |name| name == "h02"), [1, 1, 1]);
        assert!(is_failed(&p));
        assert_eq!(p.counts(), counts(0, 0, 2, 1, 7));
    }

    #[test]
    fn a_failure_that_breaks_the_minimum_stops_further_batches() {
        // Six of nine must stay healthy: three at a time. Three failures in the first batch
        // leave six at most; the next batch could only go below the minimum.
        let mut p = planner(count(6), 9);
        let batch = p.next_batch().unwrap_or_default();
        assert_eq!(batch, ["h00", "h01", "h02"]);
        report(&mut p, "h00", Outcome::Failed);
        report(&mut p, "h01", Outcome::Failed);
        assert_eq!(p.status(), &Status::InProgress);
        assert_eq!(p.next_batch(), None, "a batch is in flight");
        report(&mut p, "h02", Outcome::Failed);
        assert!(matches!(
            p.status(),
            Status::Failed {
                reason: FailReason::MinimumHealthy {
                    failed: 3,
                    healthy: 6,
                    minimum: 6
                }
            }
        ));
        assert_eq!(p.next_batch(), None);
        assert!(p.batches_preview().is_empty());
        assert_eq!(p.counts(), counts(0, 0, 0, 3, 6));
    }

    #[test]
    fn the_verdict_comes_before_the_batch_ends() {
        // Three of five must stay healthy: batches of two. The second failure decides,
        // before anything else reports.
        let mut p = planner(count(3), 5);
        let batch = p.next_batch().unwrap_or_default();
        assert_eq!(batch.len(), 2);
        report(&mut p, &batch[0], Outcome::Failed);
        report(&mut p, &batch[1], Outcome::Failed);
        assert!(is_failed(&p));

        let mut p = planner(count(4), 6);
        let batch = p.next_batch().unwrap_or_default();
        assert_eq!(batch.len(), 2);
        report(&mut p, &batch[0], Outcome::Failed);
        // 5 hosts can still be healthy, above 4: not decided yet.
        assert_eq!(p.status(), &Status::InProgress);
        report(&mut p, &batch[1], Outcome::Failed);
        assert!(is_failed(&p));

        // AllAtOnce: failed as soon as no host can succeed, with nothing pending.
        let mut p = planner(DeploymentConfig::AllAtOnce, 3);
        let batch = p.next_batch().unwrap_or_default();
        report(&mut p, &batch[0], Outcome::Failed);
        report(&mut p, &batch[1], Outcome::Failed);
        assert_eq!(p.status(), &Status::InProgress);
        report(&mut p, &batch[2], Outcome::Failed);
        assert!(is_failed(&p));
    }

    #[test]
    fn hosts_in_flight_report_after_the_verdict() {
        let mut p = planner(count(3), 5);
        let batch = p.next_batch().unwrap_or_default();
        assert_eq!(batch, ["h00", "h01"]);
        report(&mut p, "h00", Outcome::Failed);
        // 4 can be healthy; minimum 3: go on.
        assert_eq!(p.status(), &Status::InProgress);
        p.stop();
        report(&mut p, "h01", Outcome::Succeeded);
        assert_eq!(p.status(), &Status::Stopped);
        assert_eq!(p.host_status("h01"), Some(HostStatus::Succeeded));
        assert_eq!(p.counts(), counts(0, 0, 1, 1, 3));
    }

    #[test]
    fn a_failure_shrinks_the_next_batch() {
        // HalfAtATime on nine: one failure in the first batch leaves eight healthy, so the
        // next batch takes three, keeping five.
        let mut p = planner(DeploymentConfig::HalfAtATime, 9);
        assert_eq!(run(&mut p, |name| name == "h01"), [4, 3, 2]);
        assert_eq!(p.status(), &Status::Succeeded);
        assert_eq!(p.counts(), counts(0, 0, 8, 1, 0));
    }

    #[test]
    fn stop_between_batches_ends_stopped_with_the_rest_skipped() {
        let mut p = planner(DeploymentConfig::HalfAtATime, 9);
        let batch = p.next_batch().unwrap_or_default();
        for name in &batch {
            report(&mut p, name, Outcome::Succeeded);
        }
        p.stop();
        assert_eq!(p.status(), &Status::Stopped);
        assert_eq!(p.next_batch(), None);
        assert!(p.batches_preview().is_empty());
        assert_eq!(p.counts(), counts(0, 0, 4, 0, 5));
        assert_eq!(p.host_status("h00"), Some(HostStatus::Succeeded));
        assert_eq!(p.host_status("h08"), Some(HostStatus::Skipped));
        let skipped = p.hosts().filter(|(_, s)| *s == HostStatus::Skipped).count();
        assert_eq!(skipped, 5);
        // Stopping again, or reporting, changes nothing.
        p.stop();
        assert_eq!(p.status(), &Status::Stopped);
    }

    #[test]
    fn stop_before_anything_skips_everything_and_ends_nothing_twice() {
        let mut p = planner(DeploymentConfig::AllAtOnce, 3);
        p.stop();
        assert_eq!(p.next_batch(), None);
        assert_eq!(p.counts(), counts(0, 0, 0, 0, 3));
        // Stop after success keeps Succeeded.
        let mut p = planner(DeploymentConfig::AllAtOnce, 3);
        run(&mut p, |_| false);
        p.stop();
        assert_eq!(p.status(), &Status::Succeeded);
    }

    #[test]
    fn order_is_unhealthy_unknown_old_current_then_name() {
        let host = |name: &str, health, revision: Option<&str>| HostInfo {
            name: name.into(),
            health,
            revision: revision.map_or(Revision::Unknown, |r| Revision::Known(r.into())),
            zone: None,
        };
        use Health::*;
        let hosts = vec![
            host("a-current", Healthy, Some(TARGET)),
            host("b-old", Healthy, Some("rev-old")),
            host("c-unknown", Healthy, None),
            host("d-sick-current", Unhealthy, Some(TARGET)),
            host("e-sick-unknown", Unhealthy, None),
            host("a-old", Healthy, Some("rev-older")),
            host("f-unknown", Healthy, None),
        ];
        let p = Planner::new(DeploymentConfig::OneAtATime, hosts, TARGET);
        let order: Vec<String> = p
            .map(|p| p.hosts().map(|(n, _)| n.to_owned()).collect())
            .unwrap_or_default();
        assert_eq!(
            order,
            [
                "e-sick-unknown",
                "d-sick-current",
                "c-unknown",
                "f-unknown",
                "a-old",
                "b-old",
                "a-current"
            ]
        );
    }

    /// CodeDeploy's exception: a group that starts with fewer healthy hosts than the
    /// minimum deploys to its unhealthy hosts first, which does not reduce the healthy
    /// count, and goes on once enough are healthy.
    #[test]
    fn unhealthy_hosts_go_first_at_no_cost_to_the_minimum() {
        let mut hosts = fleet(7);
        for i in 0..3 {
            hosts.push(HostInfo {
                name: format!("sick{i}"),
                health: Health::Unhealthy,
                revision: Revision::Known("rev-old".into()),
                zone: None,
            });
        }
        // Ten hosts, seven healthy, minimum eight: below the minimum from the start.
        let mut p = match Planner::new(count(8), hosts.clone(), TARGET) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        let preview = p.batches_preview();
        assert_eq!(preview[0], ["sick0", "sick1"]);
        // Then the last unhealthy host with the first healthy one (nine healthy, one may
        // go offline), then two at a time.
        assert_eq!(preview[1], ["sick2", "h00"]);
        assert_eq!(sizes(&preview), [2, 2, 2, 2, 2]);
        assert_eq!(run(&mut p, |_| false), [2, 2, 2, 2, 2]);
        assert_eq!(p.status(), &Status::Succeeded);

        // HalfAtATime (five at a time, five stay healthy): the unhealthy hosts and the two
        // healthy ones the minimum allows.
        let p = Planner::new(DeploymentConfig::HalfAtATime, hosts.clone(), TARGET);
        let preview = p.map(|p| p.batches_preview()).unwrap_or_default();
        assert_eq!(preview[0], ["sick0", "sick1", "sick2", "h00", "h01"]);

        // A failed unhealthy host under OneAtATime ends it like any other.
        let mut p = match Planner::new(DeploymentConfig::OneAtATime, hosts, TARGET) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(run(&mut p, |name| name == "sick0"), [1]);
        assert!(is_failed(&p));
        assert_eq!(p.counts(), counts(0, 0, 0, 1, 9));
    }

    #[test]
    fn an_all_unhealthy_fleet_is_never_refused_for_its_minimum() {
        let hosts: Vec<HostInfo> = (0..4)
            .map(|i| HostInfo {
                name: format!("h{i}"),
                health: Health::Unhealthy,
                revision: Revision::Unknown,
                zone: None,
            })
            .collect();
        // Minimum 4 of 4: nothing healthy to protect, all four must succeed.
        let mut p = match Planner::new(count(4), hosts.clone(), TARGET) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(run(&mut p, |_| false), [1, 1, 1, 1]);
        assert_eq!(p.status(), &Status::Succeeded);
        // But five successes out of four cannot happen.
        assert_eq!(
            Planner::new(count(5), hosts, TARGET).err(),
            Some(PlanError::CannotSucceed {
                required: 5,
                hosts: 4
            })
        );
    }

    #[test]
    fn reports_are_checked() {
        let mut p = planner(DeploymentConfig::OneAtATime, 3);
        let batch = p.next_batch().unwrap_or_default();
        assert_eq!(batch, ["h00"]);
        assert_eq!(
            p.host_done("nope", Outcome::Succeeded),
            Err(ReportError::UnknownHost {
                name: "nope".into()
            })
        );
        assert_eq!(
            p.host_done("h01", Outcome::Succeeded),
            Err(ReportError::NotStarted { name: "h01".into() })
        );
        report(&mut p, "h00", Outcome::Succeeded);
        assert_eq!(
            p.host_done("h00", Outcome::Failed),
            Err(ReportError::AlreadyReported {
                name: "h00".into(),
                status: HostStatus::Succeeded
            })
        );
        assert_eq!(p.host_status("h00"), Some(HostStatus::Succeeded));
        assert_eq!(p.host_status("h01"), Some(HostStatus::Pending));
        assert_eq!(p.host_status("nope"), None);
        assert_eq!(p.counts(), counts(2, 0, 1, 0, 0));
        let batch = p.next_batch().unwrap_or_default();
        assert_eq!(batch, ["h01"]);
        assert_eq!(p.host_status("h01"), Some(HostStatus::InProgress));
        assert_eq!(p.counts(), counts(1, 1, 1, 0, 0));
    }

    #[test]
    fn preview_from_the_middle_assumes_hosts_in_flight_succeed() {
        let mut p = planner(DeploymentConfig::HalfAtATime, 9);
        assert_eq!(p.len(), 9);
        assert!(!p.is_empty());
        let _ = p.next_batch();
        let preview = p.batches_preview();
        assert_eq!(sizes(&preview), [4, 1]);
        assert_eq!(preview[1], ["h08"]);
    }

    // Scale: a 10,000-host fleet through the state machine.

    fn big_fleet(n: usize) -> Vec<HostInfo> {
        healthy((0..n).map(|i| format!("host-{i:05}")))
    }

    #[test]
    fn ten_thousand_hosts_run_through_the_planner() {
        const N: usize = 10_000;

        // HalfAtATime, all succeed: two batches of 5,000.
        let mut p = Planner::new(DeploymentConfig::HalfAtATime, big_fleet(N), TARGET)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(sizes(&p.batches_preview()), [N / 2, N / 2]);
        assert_eq!(run(&mut p, |_| false), [N / 2, N / 2]);
        assert_eq!(p.status(), &Status::Succeeded);
        assert_eq!(p.counts(), counts(0, 0, N, 0, 0));

        // 90% must stay healthy: batches of 1,000, and one host in 1,000 fails. Each
        // failure shrinks later batches by one; the deployment still succeeds.
        let mut p =
            Planner::new(percent(90), big_fleet(N), TARGET).unwrap_or_else(|e| panic!("{e}"));
        let fails = |name: &str| name.ends_with("007");
        let expected_failures = N / 1_000;
        let batch_sizes = run(&mut p, fails);
        assert_eq!(batch_sizes.iter().sum::<usize>(), N);
        assert_eq!(batch_sizes[0], 1_000);
        assert_eq!(p.status(), &Status::Succeeded);
        assert_eq!(
            p.counts(),
            counts(0, 0, N - expected_failures, expected_failures, 0)
        );

        // OneAtATime: 10,000 batches; host 5,000 fails, the other 4,999 are skipped.
        let mut p = Planner::new(DeploymentConfig::OneAtATime, big_fleet(N), TARGET)
            .unwrap_or_else(|e| panic!("{e}"));
        let batch_sizes = run(&mut p, |name| name == "host-05000");
        assert_eq!(batch_sizes.len(), 5_001);
        assert!(is_failed(&p));
        assert_eq!(p.counts(), counts(0, 0, 5_000, 1, 4_999));
    }
}
