//! The batch coordinator: on the agent that leads the deployment log, one task per
//! deployment that has not ended, driving [`Planner`] from the log.
//!
//! A driver first replays the log into a fresh planner (the batches are a function of the
//! hosts and their results, so a new leader rebuilds the same plan), then repeats:
//! 1. the batch to run: the hosts a previous leader started and that have not reported, or
//!    else the planner's next batch;
//! 2. commit [`Command::StartHosts`] for it: the entry's position is the fence every
//!    command of this batch carries;
//! 3. command every host of the batch at once and wait for each one's result, taken from
//!    the host itself, never from gossip;
//! 4. commit each result ([`Command::HostResult`]) and tell the planner;
//!
//! until the planner has its verdict, committed as [`Command::Finish`]. A stop committed
//! by an operator ends the loop before the next batch. If this agent stops leading, a
//! commit fails and the driver ends; the next leader's driver takes over from the log, and
//! hosts that are still running answer its command by joining the run under way
//! (`fleet::host`), so no host runs twice and none is skipped.

use super::now_ms;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::Raft;

use super::log::{
    Command, Deployment, DeploymentState, Fence, HostReport, HostState, Response, TypeConfig,
    Verdict,
};
use rand::seq::SliceRandom;

use super::plan::{Planner, Status};
use super::wire::{FleetRequest, HostAnswer, RunHost};
use crate::lifecycle::plan::EventRecord;
use crate::mesh::frame::{Protocol, read_frame, write_frame};
use crate::mesh::node::MeshHandle;

/// How long a host may stay unreachable before it counts as failed.
pub const UNREACHABLE_AFTER: Duration = Duration::from_secs(30);
/// How long one host's run may take, all events together.
pub const HOST_RUN_LIMIT: Duration = Duration::from_secs(2 * 3600);
/// How long a commit may take before this agent says the log has no majority.
pub const COMMIT_WITHIN: Duration = Duration::from_secs(10);

/// Why a driver stopped before the deployment ended.
#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    #[error("this agent no longer leads the deployment log ({0})")]
    NotLeader(String),
    #[error("no majority of the deployment log answered within {COMMIT_WITHIN:?}")]
    NoMajority,
    #[error("the log refused {what}: {why}")]
    Refused { what: &'static str, why: String },
}

/// What a driver needs: the log, the mesh, who this agent is.
#[derive(Clone)]
pub struct Ctx {
    pub raft: Raft<TypeConfig>,
    pub reader: super::log::StateReader,
    pub mesh: MeshHandle,
    /// This agent's own host side: the coordinator commands itself without the network.
    pub me: Arc<super::host::HostSide>,
    /// The events of hosts running now, as they report them: (deployment, host) → events.
    pub progress: Progress,
}

/// Hosts' live events, by (deployment, host): what `deploy status` shows of a host that
/// has not reported yet. In memory only; a new leader learns them from the hosts again.
pub type Progress = Arc<std::sync::Mutex<BTreeMap<(String, String), Vec<EventRecord>>>>;

fn note(progress: &Progress, deployment: &str, host: &str, events: Vec<EventRecord>) {
    progress
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert((deployment.to_owned(), host.to_owned()), events);
}

/// Proposes `command` and waits for it to be applied here.
pub async fn commit(raft: &Raft<TypeConfig>, command: Command) -> Result<Response, DriveError> {
    match tokio::time::timeout(COMMIT_WITHIN, raft.client_write(command)).await {
        Err(_) => Err(DriveError::NoMajority),
        Ok(Err(e)) => Err(DriveError::NotLeader(e.to_string())),
        Ok(Ok(written)) => Ok(written.data),
    }
}

/// Drives deployment `id` until it ends or this agent stops leading.
pub async fn drive(ctx: Ctx, id: String) -> Result<(), DriveError> {
    use tracing::Instrument;
    let span = tracing::info_span!("coordinate", deployment = %id);
    drive_in_span(ctx, id).instrument(span).await
}

async fn drive_in_span(ctx: Ctx, id: String) -> Result<(), DriveError> {
    let Some(d) = ctx.reader.read(|s| s.get(&id).cloned()) else {
        return Ok(());
    };
    if d.status.is_ended() {
        // Stopped or ended while hosts ran, and the leader changed since: their results
        // are still the log's to collect, under the fences they were started with.
        let in_flight: Vec<(String, Fence)> =
            d.in_flight().map(|(h, f)| (h.to_owned(), f)).collect();
        if !in_flight.is_empty() {
            run_batch(&ctx, &d, in_flight).await?;
        }
        return roll_back(&ctx, &id).await;
    }
    let mut planner = match Planner::new(d.config, d.host_infos(), &d.revision)
        .and_then(|p| p.with_rollout(d.rollout))
    {
        Ok(p) => p,
        Err(e) => {
            let verdict = Verdict::Failed {
                reason: e.to_string(),
            };
            finish(&ctx, &id, verdict).await?;
            return Ok(());
        }
    };
    let mut open = replay(&mut planner, &d);
    loop {
        if open.is_empty() {
            let ended = ctx
                .reader
                .read(|s| s.get(&id).map(|d| d.status.is_ended()))
                .unwrap_or(true);
            if ended {
                return Ok(());
            }
            if let Some(until_ms) = planner.baking_until() {
                match bake(&ctx, &id, until_ms).await {
                    Baked::Over => planner.bake_over(),
                    Baked::Stopped => return Ok(()),
                    Baked::Tripped(why) => {
                        tracing::warn!(deployment = %id, "a health gate tripped while baking: {why}");
                        let verdict = Verdict::Failed {
                            reason: format!("a health gate tripped while baking: {why}"),
                        };
                        finish(&ctx, &id, verdict).await?;
                        return roll_back(&ctx, &id).await;
                    }
                }
                continue;
            }
            if let Some(duration) = planner.bake_due() {
                let until_ms = now_ms() + duration.as_millis() as u64;
                match commit(
                    &ctx.raft,
                    Command::Bake {
                        deployment: id.clone(),
                        until_ms,
                    },
                )
                .await?
                {
                    Response::Applied { .. } | Response::Unchanged => {}
                    Response::Refused(super::log::Refusal::DeploymentEnded { .. }) => {
                        return Ok(());
                    }
                    other => {
                        return Err(DriveError::Refused {
                            what: "a bake",
                            why: format!("{other:?}"),
                        });
                    }
                }
                tracing::info!(deployment = %id, until_ms, "wave done: baking");
                planner.baking(until_ms);
                continue;
            }
            match planner.next_batch() {
                Some(batch) => open = batch,
                None => {
                    let verdict = match planner.status() {
                        Status::Succeeded => Verdict::Succeeded,
                        Status::Failed { reason } => Verdict::Failed {
                            reason: reason.to_string(),
                        },
                        Status::Stopped | Status::InProgress => return Ok(()),
                    };
                    finish(&ctx, &id, verdict).await?;
                    return roll_back(&ctx, &id).await;
                }
            }
        }
        let fence = match commit(
            &ctx.raft,
            Command::StartHosts {
                deployment: id.clone(),
                hosts: open.clone(),
            },
        )
        .await?
        {
            Response::Applied { fence } => fence,
            Response::Refused(super::log::Refusal::DeploymentEnded { .. }) => return Ok(()),
            other => {
                return Err(DriveError::Refused {
                    what: "starting a batch",
                    why: format!("{other:?}"),
                });
            }
        };
        tracing::info!(deployment = %id, hosts = ?open, %fence, "batch started");
        let batch: Vec<(String, Fence)> = open.iter().map(|h| (h.clone(), fence)).collect();
        for (host, verdict) in run_batch(&ctx, &d, batch).await? {
            let _ = planner.host_done(&host, verdict.outcome());
        }
        open.clear();
    }
}

/// Commands every host of a batch at once, each with its fence, and commits each result
/// as it comes; returns the results.
async fn run_batch(
    ctx: &Ctx,
    d: &Deployment,
    batch: Vec<(String, Fence)>,
) -> Result<Vec<(String, Verdict)>, DriveError> {
    let id = &d.id;
    let intent: super::intent::SignedIntent =
        serde_json::from_slice(&d.signed_intent).map_err(|e| DriveError::Refused {
            what: "the recorded intent",
            why: e.to_string(),
        })?;
    let holders: Vec<String> = d.origin.iter().cloned().collect();
    // Dropped with the driver (this agent stopped leading): the commands stop, the
    // hosts' runs do not.
    let mut runs = tokio::task::JoinSet::new();
    let names: Vec<String> = batch.iter().map(|(h, _)| h.clone()).collect();
    for (host, fence) in batch {
        // The host's batch peers: a sample when the batch is large.
        let mut peers: Vec<String> = names.iter().filter(|n| **n != host).cloned().collect();
        peers.shuffle(&mut rand::rng());
        peers.truncate(super::wire::MAX_BATCH_PEERS);
        let cmd = RunHost {
            deployment: id.clone(),
            intent: intent.clone(),
            fence,
            holders: holders.clone(),
            batch: peers,
            rollback: d.rollback_of.is_some(),
            catch_up: d.catch_up.as_ref().map(|c| c.number),
        };
        let mesh = ctx.mesh.clone();
        let me = ctx.me.clone();
        let progress = ctx.progress.clone();
        runs.spawn(async move {
            let (verdict, report) = if host == me.name {
                command_self(&me, cmd, &progress).await
            } else {
                command_host(&mesh, &host, &cmd, &progress).await
            };
            (host, verdict, report)
        });
    }
    let mut results = Vec::new();
    while let Some(joined) = runs.join_next().await {
        let Ok((host, verdict, report)) = joined else {
            continue;
        };
        tracing::info!(deployment = %id, %host, ?verdict, "host reported");
        let committed = commit(
            &ctx.raft,
            Command::HostResult {
                deployment: id.clone(),
                host: host.clone(),
                verdict: verdict.clone(),
                report,
            },
        )
        .await;
        ctx.progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(id.clone(), host.clone()));
        match committed? {
            Response::Applied { .. } | Response::Unchanged => {}
            other => {
                return Err(DriveError::Refused {
                    what: "a host's result",
                    why: format!("{other:?}"),
                });
            }
        }
        results.push((host, verdict));
    }
    Ok(results)
}

/// Creates the rollback of deployment `id` if it needs one ([`Deployment::needs_rollback`]):
/// a deployment of the revision the operator consented to, to every host that took the
/// failed one, linked both ways. Idempotent: a new leader that finds a failed deployment
/// without its rollback creates it (the id is derived, so a retry is the same entry).
async fn roll_back(ctx: &Ctx, id: &str) -> Result<(), DriveError> {
    let Some(new) = ctx.reader.read(|s| {
        let d = s.get(id)?;
        if !d.needs_rollback() {
            return None;
        }
        // The holders of the old revision: the uploader of the deployment that put it.
        let origin = s
            .iter()
            .filter(|o| {
                o.group == d.group
                    && Some(&o.revision) == d.rollback_to.as_ref()
                    && o.status == DeploymentState::Succeeded
            })
            .find_map(|o| o.origin.clone());
        rollback_deployment(d, origin, now_ms())
    }) else {
        return Ok(());
    };
    tracing::warn!(deployment = %id, rollback = %new.id, revision = %new.revision, "rolling back");
    match commit(&ctx.raft, Command::CreateDeployment(new)).await? {
        Response::Applied { .. } | Response::Unchanged => Ok(()),
        // Made meanwhile by another leader, or the original changed: nothing to do.
        Response::Refused(
            super::log::Refusal::NoRollback { .. } | super::log::Refusal::DeploymentExists { .. },
        ) => Ok(()),
        other => Err(DriveError::Refused {
            what: "a rollback",
            why: format!("{other:?}"),
        }),
    }
}

/// The rollback of `d` (which [`Deployment::needs_rollback`]): the hosts that took its
/// revision (those that failed are unhealthy, so they go first), its config if that plans
/// over them, else OneAtATime (which always does), one wave.
pub fn rollback_deployment(
    d: &Deployment,
    origin: Option<String>,
    now_ms: u64,
) -> Option<super::log::NewDeployment> {
    use super::plan::{DeploymentConfig, Health, Revision, Rollout};
    let revision = d.rollback_to.clone()?;
    let hosts: Vec<super::log::PlannedHost> = d
        .hosts
        .iter()
        .filter(|(_, h)| h.started.is_some())
        .map(|(name, h)| super::log::PlannedHost {
            name: name.clone(),
            health: if h.state == HostState::Succeeded {
                Health::Healthy
            } else {
                Health::Unhealthy
            },
            revision: if h.state == HostState::Succeeded {
                Revision::Known(d.revision.clone())
            } else {
                Revision::Unknown
            },
            zone: h.zone.clone(),
        })
        .collect();
    let infos: Vec<super::plan::HostInfo> = hosts
        .iter()
        .map(|h| super::plan::HostInfo {
            name: h.name.clone(),
            health: h.health,
            revision: h.revision.clone(),
            zone: h.zone.clone(),
        })
        .collect();
    let config = if Planner::new(d.config, infos, &revision).is_ok() {
        d.config
    } else {
        DeploymentConfig::OneAtATime
    };
    Some(super::log::NewDeployment {
        id: super::intent::rollback_id(&d.id),
        app: d.app.clone(),
        group: d.group.clone(),
        targets: d.targets.clone(),
        revision,
        config,
        rollout: Rollout::Waveless,
        rollback_to: None,
        rollback_of: Some(d.id.clone()),
        hosts,
        signed_intent: d.signed_intent.clone(),
        created_at_ms: now_ms,
        origin,
        catch_up: None,
    })
}

/// How a bake ended.
enum Baked {
    /// Its time is up: the next wave may start.
    Over,
    /// The deployment ended meanwhile (an operator stopped it).
    Stopped,
    /// A host that took the revision failed its health gate: why.
    Tripped(String),
}

/// Waits out a bake until `until_ms`, checking the health gate of every host that took
/// the revision ([`gate`]) and watching for a stop, four times a second.
async fn bake(ctx: &Ctx, id: &str, until_ms: u64) -> Baked {
    let mut seen = std::collections::BTreeSet::new();
    loop {
        let Some((app, revision, hosts)) = ctx.reader.read(|s| {
            let d = s.get(id).filter(|d| !d.status.is_ended())?;
            let took: Vec<String> = d
                .hosts
                .iter()
                .filter(|(_, h)| h.state == HostState::Succeeded)
                .map(|(name, _)| name.clone())
                .collect();
            Some((d.app.clone(), d.revision.clone(), took))
        }) else {
            return Baked::Stopped;
        };
        if let Ok(views) = ctx.mesh.hosts().await
            && let Some(why) = gate(&views, &app, &revision, &hosts, &mut seen)
        {
            return Baked::Tripped(why);
        }
        let left = until_ms.saturating_sub(now_ms());
        if left == 0 {
            return Baked::Over;
        }
        tokio::time::sleep(Duration::from_millis(left.min(250))).await;
    }
}

/// The health gate of a bake, over what the hosts that took `revision` of `app` gossip of
/// themselves (each signs its own record, so a host can only trip the gate for itself):
/// the host is down, its service stopped or was restarted by its supervisor, its
/// supervisor has a problem with the app, or (once it was seen on the revision) it runs
/// another one. A host whose gossip has not shown the revision yet is not judged: gossip
/// may lag the log. `seen` keeps the hosts seen on the revision. Pure, for tests.
pub fn gate(
    views: &[crate::mesh::view::HostView],
    app: &str,
    revision: &str,
    hosts: &[String],
    seen: &mut std::collections::BTreeSet<String>,
) -> Option<String> {
    use crate::mesh::hoststate::Health;
    use crate::mesh::view::MemberState;
    for name in hosts {
        let Some(view) = views.iter().find(|v| &v.name == name) else {
            continue;
        };
        if view.state == MemberState::Dead {
            return Some(format!("{name} is down"));
        }
        let Some(record) = view.details.get(app) else {
            continue;
        };
        if record.revision.as_deref() != Some(revision) {
            if seen.contains(name) {
                return Some(format!(
                    "{name} no longer runs the revision (it runs {})",
                    record.revision.as_deref().unwrap_or("none")
                ));
            }
            continue;
        }
        seen.insert(name.clone());
        if record.restarts > 0 {
            return Some(format!(
                "{name}'s service was restarted {} time(s) since it took the revision",
                record.restarts
            ));
        }
        if record.health == Health::Stopped {
            return Some(format!("{name}'s service is not running"));
        }
        if let Some(problem) = &record.problem {
            return Some(format!("{name}: {problem}"));
        }
    }
    None
}

async fn finish(ctx: &Ctx, id: &str, verdict: Verdict) -> Result<(), DriveError> {
    tracing::info!(deployment = %id, ?verdict, "deployment ended");
    let failed = matches!(verdict, Verdict::Failed { .. });
    match commit(
        &ctx.raft,
        Command::Finish {
            deployment: id.to_owned(),
            verdict,
        },
    )
    .await?
    {
        Response::Applied { .. } => {
            if failed {
                crate::faults::point("coordinator.failed-finished");
            }
            Ok(())
        }
        Response::Unchanged => Ok(()),
        // Stopped meanwhile: the stop stands.
        Response::Refused(super::log::Refusal::DeploymentEnded { .. }) => Ok(()),
        other => Err(DriveError::Refused {
            what: "the deployment's verdict",
            why: format!("{other:?}"),
        }),
    }
}

/// Feeds the planner the results the log holds, batch by batch, and returns the hosts of
/// the batch under way (started and not reported, or planned and not started yet when
/// the previous leader died between planning and starting it). Empty when no batch is
/// under way.
pub fn replay(planner: &mut Planner, d: &Deployment) -> Vec<String> {
    if d.status.is_ended() {
        planner.stop();
        return Vec::new();
    }
    let mut bakes = d.bakes.iter();
    loop {
        if planner.bake_due().is_some() {
            // A bake the log recorded: over if a later entry started hosts again.
            let Some(&until_ms) = bakes.next() else {
                return Vec::new(); // not recorded yet: the driver starts it
            };
            planner.baking(until_ms);
            if matches!(d.status, DeploymentState::Baking { .. }) && bakes.len() == 0 {
                return Vec::new(); // under way: the driver waits it out
            }
            planner.bake_over();
        }
        let Some(batch) = planner.next_batch() else {
            break;
        };
        let mut open = Vec::new();
        for host in batch {
            match d.hosts.get(&host).map(|h| &h.state) {
                Some(HostState::Succeeded) => {
                    let _ = planner.host_done(&host, super::plan::Outcome::Succeeded);
                }
                Some(HostState::Failed { .. }) | Some(HostState::Skipped) | None => {
                    let _ = planner.host_done(&host, super::plan::Outcome::Failed);
                }
                Some(HostState::InProgress { .. }) | Some(HostState::Pending) => open.push(host),
            }
        }
        if !open.is_empty() {
            return open;
        }
    }
    Vec::new()
}

/// Commands this agent's own host side and waits for its result.
async fn command_self(
    me: &Arc<super::host::HostSide>,
    cmd: RunHost,
    progress: &Progress,
) -> (Verdict, HostReport) {
    let deployment = cmd.deployment.clone();
    let since = Instant::now();
    let accepted = loop {
        match me.accept(cmd.clone()).await {
            Err(why) if why.passing && since.elapsed() < UNREACHABLE_AFTER => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            other => break other,
        }
    };
    match accepted {
        Err(why) => (
            Verdict::Failed {
                reason: format!("{} refused the command: {why}", me.name),
            },
            HostReport {
                events: Vec::new(),
                tail: vec![why.reason],
                transfer: None,
            },
        ),
        Ok(Ok(done)) => done,
        Ok(Err(mut running)) => loop {
            let state = running.borrow_and_update().clone();
            if let Some(done) = state.done {
                break done;
            }
            note(progress, &deployment, &me.name, state.events);
            if running.changed().await.is_err() {
                break (
                    Verdict::Failed {
                        reason: "the run ended without an outcome".into(),
                    },
                    HostReport::default(),
                );
            }
        },
    }
}

/// Commands `host` and waits for its result. A host that cannot be reached, or refuses for
/// a reason that may pass, for [`UNREACHABLE_AFTER`] fails; one that refuses for good fails
/// with its reason.
async fn command_host(
    mesh: &MeshHandle,
    host: &str,
    cmd: &RunHost,
    progress: &Progress,
) -> (Verdict, HostReport) {
    let mut unreachable_since: Option<Instant> = None;
    loop {
        match try_command(mesh, host, cmd, progress).await {
            Ok(HostAnswer::Done { verdict, report }) => return (verdict, report),
            Ok(HostAnswer::Refused(why)) if !why.passing => {
                return (
                    Verdict::Failed {
                        reason: format!("{host} refused the command: {why}"),
                    },
                    HostReport {
                        events: Vec::new(),
                        tail: vec![why.reason],
                        transfer: None,
                    },
                );
            }
            Ok(HostAnswer::Started | HostAnswer::Progress(_)) => unreachable_since = None,
            // Unreachable, or a refusal that may pass: asked again for a while.
            failed => {
                let e = match failed {
                    Ok(HostAnswer::Refused(why)) => format!("it refused for now: {why}"),
                    Err(e) => format!("{e:#}"),
                    Ok(_) => String::new(),
                };
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= UNREACHABLE_AFTER {
                    return (
                        Verdict::Failed {
                            reason: format!(
                                "{host} could not be reached for {} s: {e}",
                                UNREACHABLE_AFTER.as_secs()
                            ),
                        },
                        HostReport::default(),
                    );
                }
                tracing::debug!(%host, "command not delivered, retrying: {e}");
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One command on one stream: the host's last answer (`Done` or `Refused`), or `Started`
/// if the stream broke after the host started.
async fn try_command(
    mesh: &MeshHandle,
    host: &str,
    cmd: &RunHost,
    progress: &Progress,
) -> anyhow::Result<HostAnswer> {
    let (mut send, mut recv) = mesh.open_bi(host, Protocol::Fleet).await?;
    tokio::time::timeout(
        crate::mesh::node::STREAM_DEADLINE,
        write_frame(&mut send, &FleetRequest::RunHost(cmd.clone())),
    )
    .await??;
    send.finish()?;
    // The host asks the voters before it answers.
    let first: HostAnswer = tokio::time::timeout(
        super::service::CONFIRM_WITHIN + crate::mesh::node::STREAM_DEADLINE,
        read_frame(&mut recv),
    )
    .await??;
    if !matches!(first, HostAnswer::Started) {
        return Ok(first);
    }
    let deadline = tokio::time::Instant::now() + HOST_RUN_LIMIT;
    loop {
        match tokio::time::timeout_at(deadline, read_frame::<HostAnswer>(&mut recv)).await {
            Ok(Ok(HostAnswer::Progress(events))) => {
                note(progress, &cmd.deployment, host, bounded(events));
            }
            Ok(Ok(answer)) => return Ok(answer),
            Ok(Err(e)) => {
                tracing::debug!(%host, "the host's stream broke while it ran: {e}");
                return Ok(HostAnswer::Started);
            }
            Err(_) => {
                return Ok(HostAnswer::Done {
                    verdict: Verdict::Failed {
                        reason: format!(
                            "{host} did not finish within {} s",
                            HOST_RUN_LIMIT.as_secs()
                        ),
                    },
                    report: HostReport::default(),
                });
            }
        }
    }
}

/// A host's progress as the coordinator keeps it: at most as many events as a report.
fn bounded(events: Vec<EventRecord>) -> Vec<EventRecord> {
    HostReport {
        events,
        ..HostReport::default()
    }
    .bounded()
    .events
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::log::{DeploymentsState, NewDeployment, PlannedHost};
    use crate::fleet::plan::{DeploymentConfig, Health, Percent, Revision, Rollout};

    fn fence(index: u64) -> Fence {
        Fence { term: 1, index }
    }

    /// Deployment "d" of hosts h0..h3, a canary of 25% baking 60 s, after `commands`.
    fn logged(commands: Vec<Command>) -> Deployment {
        let mut state = DeploymentsState::default();
        let new = NewDeployment {
            id: "d".into(),
            app: "app".into(),
            group: "app".into(),
            targets: "role=web".into(),
            revision: "new".into(),
            config: DeploymentConfig::AllAtOnce,
            rollout: Rollout::Canary {
                percent: Percent::new(25).unwrap(),
                bake_secs: 60,
            },
            rollback_to: None,
            rollback_of: None,
            hosts: (0..4)
                .map(|i| PlannedHost {
                    name: format!("h{i}"),
                    health: Health::Healthy,
                    revision: Revision::Known("old".into()),
                    zone: None,
                })
                .collect(),
            signed_intent: Vec::new(),
            created_at_ms: 0,
            origin: None,
            catch_up: None,
        };
        state.apply(fence(1), Command::CreateDeployment(new));
        for (i, c) in commands.into_iter().enumerate() {
            let r = state.apply(fence(2 + i as u64), c);
            assert!(matches!(r, Response::Applied { .. }), "{r:?}");
        }
        state.get("d").unwrap().clone()
    }

    fn planner(d: &Deployment) -> Planner {
        Planner::new(d.config, d.host_infos(), &d.revision)
            .unwrap()
            .with_rollout(d.rollout)
            .unwrap()
    }

    fn start(hosts: &[&str]) -> Command {
        Command::StartHosts {
            deployment: "d".into(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
        }
    }

    fn done(host: &str) -> Command {
        Command::HostResult {
            deployment: "d".into(),
            host: host.into(),
            verdict: Verdict::Succeeded,
            report: HostReport::default(),
        }
    }

    fn bake(until_ms: u64) -> Command {
        Command::Bake {
            deployment: "d".into(),
            until_ms,
        }
    }

    fn view(
        name: &str,
        state: crate::mesh::view::MemberState,
        revision: &str,
        health: crate::mesh::hoststate::Health,
        restarts: u32,
        problem: Option<&str>,
    ) -> crate::mesh::view::HostView {
        let record = crate::mesh::hoststate::AppRecord {
            revision: Some(revision.into()),
            health,
            held: Default::default(),
            problem: problem.map(String::from),
            restarts,
            fetching: None,
        };
        crate::mesh::view::HostView {
            name: name.into(),
            addr: "127.0.0.1:7400".parse().unwrap(),
            state,
            tags: Default::default(),
            apps: [("app".to_string(), Some(revision.to_string()))].into(),
            details: [("app".to_string(), record)].into(),
            log: None,
            version: 1,
        }
    }

    #[test]
    fn the_health_gate_judges_only_hosts_that_took_the_revision_by_their_own_word() {
        use crate::mesh::hoststate::Health::{Running, Stopped};
        use crate::mesh::view::MemberState::{Alive, Dead};
        let took = vec!["a".to_string()];
        let mut seen = Default::default();
        let fine = [view("a", Alive, "new", Running, 0, None)];
        assert_eq!(gate(&fine, "app", "new", &took, &mut seen), None);
        // Gossip that lags (still the old revision) is not judged, until the host was
        // seen on the new one.
        let lagging = [view("a", Alive, "old", Running, 3, None)];
        let mut fresh = Default::default();
        assert_eq!(gate(&lagging, "app", "new", &took, &mut fresh), None);
        assert!(
            gate(&lagging, "app", "new", &took, &mut seen)
                .unwrap()
                .contains("no longer runs")
        );
        for (bad, words) in [
            (
                view("a", Alive, "new", Running, 1, None),
                "restarted 1 time",
            ),
            (view("a", Alive, "new", Stopped, 0, None), "not running"),
            (
                view("a", Alive, "new", Running, 0, Some("monitor failed")),
                "monitor failed",
            ),
            (view("a", Dead, "new", Running, 0, None), "is down"),
        ] {
            let why = gate(&[bad], "app", "new", &took, &mut Default::default()).unwrap();
            assert!(why.contains(words), "{why}");
        }
        // Hosts that did not take the revision are not judged.
        let other = [view("b", Dead, "new", Stopped, 9, None)];
        assert_eq!(
            gate(&other, "app", "new", &took, &mut Default::default()),
            None
        );
    }

    #[test]
    fn a_new_leader_resumes_a_rollout_at_its_bake() {
        // The canary reported, no bake recorded yet: the driver must record one.
        let d = logged(vec![start(&["h0"]), done("h0")]);
        let mut p = planner(&d);
        assert!(replay(&mut p, &d).is_empty());
        assert!(p.bake_due().is_some());

        // Baking: the driver waits out the recorded end, then the rest goes.
        let d = logged(vec![start(&["h0"]), done("h0"), bake(5_000)]);
        let mut p = planner(&d);
        assert!(replay(&mut p, &d).is_empty());
        assert_eq!(p.baking_until(), Some(5_000));
        p.bake_over();
        assert_eq!(p.next_batch().unwrap(), ["h1", "h2", "h3"]);

        // Past the bake, the second wave under way: its hosts are the open batch.
        let d = logged(vec![
            start(&["h0"]),
            done("h0"),
            bake(5_000),
            start(&["h1", "h2", "h3"]),
            done("h2"),
        ]);
        let mut p = planner(&d);
        assert_eq!(replay(&mut p, &d), ["h1", "h3"]);
        assert_eq!(p.baking_until(), None);
    }
}
