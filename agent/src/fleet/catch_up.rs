//! Late joiners and hosts that missed a deployment: they get their group's last good
//! revision by themselves, as CodeDeploy does for an Auto Scaling launch, with no central
//! service.
//!
//! The leader of the deployment log watches gossip. A host that is alive, whose record has
//! arrived, that a group's last success targets (by the tags it gossips) and that does not
//! run that success's revision is *due*. Once it has been due for [`SETTLE`], the leader
//! creates a catch-up deployment for it (and whoever else is due in the group): the last
//! success's revision and the operator's own signed intent, in one wave, to those hosts.
//! The log's state machine accepts it only as the group's current last success
//! ([`DeploymentsState::catch_up_source`]), and a host in at most two catch-ups of one
//! success. A host runs it past the intent's age only when a majority of the voters confirm
//! that the log made it a catch-up, and most of the other hosts it targets run that
//! revision by their own records ([`crate::fleet::host::fleet_runs`]). It shows in the
//! group's history like any deployment, and it is driven, stopped and reported like one.
//!
//! [`due`] and [`deployment`] are pure; [`run`] is the leader's thin loop around them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::intent::catch_up_id;
use super::log::{
    CatchUpOf, Command, Deployment, DeploymentsState, HostState, NewDeployment, PlannedHost,
    Response, StateReader, TypeConfig, state::MAX_CATCH_UPS_PER_HOST,
};
use super::plan::{DeploymentConfig, HostInfo, Rollout};
use super::targets::{self, Targets};
use crate::mesh::hoststate::Health as Reported;
use crate::mesh::node::MeshHandle;
use crate::mesh::view::{HostView, MemberState};

/// How long a host must stay due before it is caught up: a host that just joined, or just
/// restarted, first tells the mesh what it runs.
pub const SETTLE: Duration = Duration::from_secs(5);
/// How often the leader looks for hosts that are due.
pub const EVERY: Duration = Duration::from_secs(1);
/// The most hosts one catch-up takes; the rest wait for the next.
pub const MAX_HOSTS: usize = 256;

/// A group's hosts that are due for a catch-up of the deployment `source`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Due {
    pub group: String,
    pub source: String,
    /// By name, as the planner takes them.
    pub hosts: Vec<HostInfo>,
}

/// The groups that have hosts due for a catch-up, given what the mesh says of every host.
///
/// A host is due in a group that has a catch-up source when it is alive, its record has
/// arrived, the source's targets match its tags, it does not run the source's revision and
/// is not deploying that application now. A host that took the revision (the log says so)
/// is due only if it runs no revision at all (it was replaced): one that says it runs
/// another is taken for a record that lags, or an operator's own choice.
///
/// Left out: a group with an active deployment (it catches up after), a host another
/// deployment of the application has Pending or InProgress, a host in
/// [`MAX_CATCH_UPS_PER_HOST`] catch-ups of this source already (one retry after a failure,
/// then an operator deploys), and a host that the catch-ups of two groups of one
/// application both want (which one is not ours to choose).
pub fn due(state: &DeploymentsState, hosts: &[HostView]) -> Vec<Due> {
    // Group → (source, its candidate hosts), and how many groups want each (app, host).
    let mut wanted: BTreeMap<&str, (&Deployment, Targets, Vec<&HostView>)> = BTreeMap::new();
    let mut claims: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for group in state.groups() {
        let Some(source) = state.catch_up_source(&group.name) else {
            continue;
        };
        let Ok(targets) = Targets::parse(&source.targets) else {
            continue;
        };
        // What the log knows of each host and this revision: it took it (in the source or
        // a catch-up of it); and the hosts of the app's deployments that have not ended.
        let mut took_it = BTreeSet::new();
        let mut busy = BTreeSet::new();
        for d in state.iter() {
            if d.id == source.id || d.catch_up.as_ref().is_some_and(|c| c.of == source.id) {
                took_it.extend(
                    d.hosts
                        .iter()
                        .filter(|(_, h)| h.state == HostState::Succeeded)
                        .map(|(name, _)| name.as_str()),
                );
            }
            if d.app == source.app && !d.status.is_ended() {
                busy.extend(
                    d.hosts
                        .iter()
                        .filter(|(_, h)| {
                            matches!(h.state, HostState::Pending | HostState::InProgress { .. })
                        })
                        .map(|(name, _)| name.as_str()),
                );
            }
        }
        let candidates: Vec<&HostView> = hosts
            .iter()
            .filter(|h| {
                let runs = h.apps.get(&source.app).cloned().flatten();
                h.state == MemberState::Alive
                    && h.version > 0
                    && targets.matches(&h.tags)
                    // A host that took it and says it runs another revision is most likely
                    // a record that has not caught up yet (or an operator's choice); one
                    // that runs none was replaced.
                    && match runs {
                        Some(r) => r != source.revision && !took_it.contains(h.name.as_str()),
                        None => true,
                    }
                    && h.details
                        .get(&source.app)
                        .is_none_or(|d| d.health != Reported::Deploying)
                    && !busy.contains(h.name.as_str())
                    && state.catch_ups_of_host(&source.id, &h.name) < MAX_CATCH_UPS_PER_HOST
            })
            .collect();
        for h in &candidates {
            *claims.entry((&source.app, &h.name)).or_default() += 1;
        }
        if state.active_in(group, None).is_none() && !candidates.is_empty() {
            wanted.insert(&group.name, (source, targets, candidates));
        }
    }
    wanted
        .into_iter()
        .filter_map(|(group, (source, targets, candidates))| {
            let app = source.app.as_str();
            let mine: Vec<HostView> = candidates
                .into_iter()
                .filter(|h| claims.get(&(app, h.name.as_str())) == Some(&1))
                .take(MAX_HOSTS)
                .cloned()
                .collect();
            let chosen = targets::choose(&targets, app, None, &mine).ok()?;
            Some(Due {
                group: group.to_owned(),
                source: source.id.clone(),
                hosts: chosen.hosts,
            })
        })
        .collect()
}

/// The catch-up deployment of `due` (its hosts narrowed to `hosts`), as the log's state
/// machine accepts it: the next catch-up number of the source, its revision, targets and
/// signed intent, in one wave, no rollback. Its batches are the source's config when that
/// plans over these hosts (hosts that run an older revision keep serving meanwhile), else
/// OneAtATime, which always does. `None` if the source is gone.
pub fn deployment(
    state: &DeploymentsState,
    due: &Due,
    hosts: &[HostInfo],
    now_ms: u64,
) -> Option<NewDeployment> {
    let source = state.get(&due.source)?;
    let number = state.catch_ups_of(&source.id);
    Some(NewDeployment {
        id: catch_up_id(&source.id, number),
        app: source.app.clone(),
        group: source.group.clone(),
        targets: source.targets.clone(),
        revision: source.revision.clone(),
        config: if super::plan::Planner::new(source.config, hosts.to_vec(), &source.revision)
            .is_ok()
        {
            source.config
        } else {
            DeploymentConfig::OneAtATime
        },
        rollout: Rollout::Waveless,
        rollback_to: None,
        rollback_of: None,
        hosts: hosts
            .iter()
            .map(|h| PlannedHost {
                name: h.name.clone(),
                health: h.health,
                revision: h.revision.clone(),
                zone: None,
            })
            .collect(),
        signed_intent: source.signed_intent.clone(),
        created_at_ms: now_ms,
        origin: source.origin.clone(),
        catch_up: Some(CatchUpOf {
            of: source.id.clone(),
            number,
        }),
    })
}

/// While this agent leads (the caller aborts it when it stops leading): every [`EVERY`],
/// creates the catch-up of each group whose hosts have been due for [`SETTLE`].
/// `created` is told of each, so it is driven at once.
pub async fn run(
    raft: openraft::Raft<TypeConfig>,
    reader: StateReader,
    mesh: MeshHandle,
    created: std::sync::Arc<tokio::sync::Notify>,
) {
    // (group, host) → since when it has been due.
    let mut since: BTreeMap<(String, String), Instant> = BTreeMap::new();
    loop {
        tokio::time::sleep(EVERY).await;
        let Ok(hosts) = mesh.hosts().await else {
            continue;
        };
        let dues = reader.read(|s| due(s, &hosts));
        let now = Instant::now();
        let live: BTreeSet<(String, String)> = dues
            .iter()
            .flat_map(|d| d.hosts.iter().map(|h| (d.group.clone(), h.name.clone())))
            .collect();
        since.retain(|k, _| live.contains(k));
        for key in live {
            since.entry(key).or_insert(now);
        }
        for d in dues {
            let settled: Vec<HostInfo> = d
                .hosts
                .iter()
                .filter(|h| {
                    since
                        .get(&(d.group.clone(), h.name.clone()))
                        .is_some_and(|t| now.duration_since(*t) >= SETTLE)
                })
                .cloned()
                .collect();
            if settled.is_empty() {
                continue;
            }
            let Some(new) = reader.read(|s| deployment(s, &d, &settled, super::now_ms())) else {
                continue;
            };
            let size = postcard::experimental::serialized_size(&new).unwrap_or(usize::MAX);
            if size > super::service::MAX_COMMAND {
                tracing::warn!(group = %d.group, size, "a catch-up does not fit one log entry");
                continue;
            }
            let (id, names): (String, Vec<String>) = (
                new.id.clone(),
                settled.iter().map(|h| h.name.clone()).collect(),
            );
            match super::coordinator::commit(&raft, Command::CreateDeployment(new)).await {
                Ok(Response::Applied { .. }) => {
                    tracing::info!(group = %d.group, deployment = %id, of = %d.source, hosts = ?names, "catching up hosts with the group's last success");
                    created.notify_one();
                }
                Ok(other) => {
                    tracing::debug!(group = %d.group, "no catch-up now: {other:?}")
                }
                // No longer leading, or no majority: the caller notices.
                Err(e) => tracing::debug!(group = %d.group, "no catch-up now: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::log::{Fence, Verdict};
    use crate::fleet::plan::Revision;
    use crate::mesh::hoststate::AppRecord;

    const SIGNED: &[u8] = b"the operator's signed intent";

    fn host(name: &str, role: &str, runs: Option<&str>) -> HostView {
        let mut tags = BTreeMap::new();
        tags.insert("role".to_owned(), role.to_owned());
        let mut apps = BTreeMap::new();
        let mut details = BTreeMap::new();
        if let Some(r) = runs {
            apps.insert("inference".to_owned(), Some(r.to_owned()));
            details.insert(
                "inference".to_owned(),
                AppRecord {
                    revision: Some(r.to_owned()),
                    health: Reported::Running,
                    held: BTreeSet::new(),
                    problem: None,
                    restarts: 0,
                    fetching: None,
                },
            );
        }
        HostView {
            name: name.to_owned(),
            addr: "127.0.0.1:7000".parse().unwrap(),
            state: MemberState::Alive,
            tags,
            apps,
            details,
            log: None,
            version: 3,
        }
    }

    fn new(id: &str, group: &str, targets: &str, hosts: &[&str]) -> NewDeployment {
        NewDeployment {
            id: id.to_owned(),
            app: "inference".to_owned(),
            group: group.to_owned(),
            targets: targets.to_owned(),
            revision: "v2".to_owned(),
            config: DeploymentConfig::AllAtOnce,
            rollout: Rollout::Waveless,
            rollback_to: None,
            rollback_of: None,
            hosts: hosts
                .iter()
                .map(|h| PlannedHost {
                    name: (*h).to_owned(),
                    health: crate::fleet::plan::Health::Healthy,
                    revision: Revision::Known("v1".into()),
                    zone: None,
                })
                .collect(),
            signed_intent: SIGNED.to_vec(),
            created_at_ms: 1,
            origin: Some("a".into()),
            catch_up: None,
        }
    }

    /// Applies `command` at the next index; it must apply.
    fn apply(state: &mut DeploymentsState, index: &mut u64, command: Command) {
        *index += 1;
        let r = state.apply(
            Fence {
                term: 1,
                index: *index,
            },
            command,
        );
        assert!(matches!(r, Response::Applied { .. }), "{r:?}");
    }

    /// Creates `d` and runs it to `verdict` on every host.
    fn run(state: &mut DeploymentsState, index: &mut u64, d: NewDeployment, verdict: Verdict) {
        let (id, hosts): (String, Vec<String>) = (
            d.id.clone(),
            d.hosts.iter().map(|h| h.name.clone()).collect(),
        );
        apply(state, index, Command::CreateDeployment(d));
        apply(
            state,
            index,
            Command::StartHosts {
                deployment: id.clone(),
                hosts: hosts.clone(),
            },
        );
        for host in hosts {
            apply(
                state,
                index,
                Command::HostResult {
                    deployment: id.clone(),
                    host,
                    verdict: verdict.clone(),
                    report: Default::default(),
                },
            );
        }
        apply(
            state,
            index,
            Command::Finish {
                deployment: id,
                verdict,
            },
        );
    }

    fn names(due: &Due) -> Vec<&str> {
        due.hosts.iter().map(|h| h.name.as_str()).collect()
    }

    #[test]
    fn a_host_that_joined_late_or_missed_the_last_success_is_due_and_no_other() {
        let mut state = DeploymentsState::default();
        let mut i = 0;
        let mut fleet = vec![
            host("a", "web", Some("v2")),
            host("b", "web", Some("v2")),
            host("new", "web", None),
            host("missed", "web", Some("v1")),
            host("db", "db", None),
        ];
        assert!(due(&state, &fleet).is_empty(), "no group, no catch-up");
        run(
            &mut state,
            &mut i,
            new("d1", "web", "role=web", &["a", "b"]),
            Verdict::Succeeded,
        );
        // Not yet told what it runs, or not alive: not due.
        let mut quiet = host("quiet", "web", None);
        quiet.version = 0;
        let mut suspect = host("suspect", "web", None);
        suspect.state = MemberState::Suspect;
        let mut deploying = host("deploying", "web", Some("v1"));
        deploying.details.get_mut("inference").unwrap().health = Reported::Deploying;
        // It took v2 (the log says so) and its record still says v1: a record that lags.
        let lagging = host("a", "web", Some("v1"));
        fleet[0] = lagging;
        fleet.extend([quiet, suspect, deploying]);
        let found = due(&state, &fleet);
        assert_eq!(found.len(), 1);
        assert_eq!(
            (found[0].group.as_str(), found[0].source.as_str()),
            ("web", "d1")
        );
        assert_eq!(names(&found[0]), ["missed", "new"]);
        let missed = &found[0].hosts[0];
        assert_eq!(missed.revision, Revision::Known("v1".into()));

        // The deployment the log accepts, for the settled hosts only.
        let made = deployment(&state, &found[0], &found[0].hosts[..1], 9).unwrap();
        assert_eq!(made.id, catch_up_id("d1", 0));
        assert_eq!(
            (&made.revision, &made.targets, made.signed_intent.as_slice()),
            (&"v2".to_string(), &"role=web".to_string(), SIGNED)
        );
        assert_eq!(made.hosts.len(), 1);
        apply(&mut state, &mut i, Command::CreateDeployment(made.clone()));
        // While it runs, the group waits.
        assert!(due(&state, &fleet).is_empty());
        apply(
            &mut state,
            &mut i,
            Command::StartHosts {
                deployment: made.id.clone(),
                hosts: vec!["missed".into()],
            },
        );
        apply(
            &mut state,
            &mut i,
            Command::HostResult {
                deployment: made.id.clone(),
                host: "missed".into(),
                verdict: Verdict::Failed {
                    reason: "boom".into(),
                },
                report: Default::default(),
            },
        );
        apply(
            &mut state,
            &mut i,
            Command::Finish {
                deployment: made.id.clone(),
                verdict: Verdict::Failed {
                    reason: "boom".into(),
                },
            },
        );
        // A host that failed a catch-up gets one more (it may have been away); one that
        // took it and now runs nothing was replaced, and is due too.
        fleet[1] = host("b", "web", None);
        let found = due(&state, &fleet);
        assert_eq!(names(&found[0]), ["b", "missed", "new"]);
        let retry = deployment(&state, &found[0], &found[0].hosts[1..2], 10).unwrap();
        assert_eq!(retry.id, catch_up_id("d1", 1));
        run(
            &mut state,
            &mut i,
            retry,
            Verdict::Failed {
                reason: "boom".into(),
            },
        );
        // Two catch-ups of it are a host's most: then an operator deploys.
        let found = due(&state, &fleet);
        assert_eq!(names(&found[0]), ["b", "new"]);
        let next = deployment(&state, &found[0], &found[0].hosts, 10).unwrap();
        assert_eq!(next.id, catch_up_id("d1", 2));
        // Its batches are the source's (AllAtOnce here).
        assert_eq!(next.config, DeploymentConfig::AllAtOnce);
        // A host another deployment of the app has not finished with is left to it.
        let mut other = new("o1", "other", "role=db", &["new"]);
        other.revision = "v9".into();
        apply(&mut state, &mut i, Command::CreateDeployment(other));
        let found = due(&state, &fleet);
        assert_eq!(names(&found[0]), ["b"]);
    }

    #[test]
    fn nothing_is_caught_up_after_a_failure_or_where_two_groups_want_one_host() {
        let mut state = DeploymentsState::default();
        let mut i = 0;
        let fleet = vec![
            host("a", "web", Some("v2")),
            host("both", "web", None),
            host("db", "db", None),
        ];
        run(
            &mut state,
            &mut i,
            new("d1", "web", "role=web", &["a"]),
            Verdict::Succeeded,
        );
        run(
            &mut state,
            &mut i,
            new("e1", "everyone", "role=web,role=db", &["a"]),
            Verdict::Succeeded,
        );
        // "both" matches the two groups of one application: neither takes it. "db" only
        // the second.
        let found = due(&state, &fleet);
        assert_eq!(found.len(), 1);
        assert_eq!(
            (found[0].group.as_str(), names(&found[0])),
            ("everyone", vec!["db"])
        );
        // A newer deployment of "web" failed (no rollback): the hosts stay as they are.
        run(
            &mut state,
            &mut i,
            new("d2", "web", "role=web", &["a"]),
            Verdict::Failed {
                reason: "boom".into(),
            },
        );
        let found = due(&state, &fleet);
        assert_eq!(found.len(), 1);
        assert_eq!(
            (found[0].group.as_str(), names(&found[0])),
            ("everyone", vec!["both", "db"])
        );
    }
}
