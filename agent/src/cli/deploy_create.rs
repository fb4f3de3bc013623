//! `shoal deploy create`: a fleet deployment, asked of any agent with an operator identity.
//!
//! `--dry-run` works today and changes nothing: it reads the bundle (its revision id, its
//! AppSpec), asks the agent at `--peer` for the hosts it sees, picks the targets by tags
//! (CodeDeploy's tag groups, [`crate::fleet::targets`]) and prints the batches CodeDeploy's
//! rules would run, in order ([`crate::fleet::plan`]). Only hosts the mesh holds alive or
//! suspect are targeted; matching hosts that are dead or left are listed apart.
//!
//! A host's health for the plan is what it gossips for the application: a service that
//! is stopped, or a deployment in progress, is unhealthy (updated first, at no cost to
//! the minimum); anything else is healthy. Its revision is the active one it gossips, or
//! unknown when it has none.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use serde::Serialize;

use crate::api::{self, Answer, Request};
use crate::bundle::{self, Limits};
use crate::fleet::plan::{DeploymentConfig, Health, HostInfo, Planner, Revision, Rollout, Rules};
use crate::fleet::targets::{self, Targets};
use crate::mesh::view::HostView;

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// The application to deploy.
    #[arg(long)]
    pub app: String,
    /// A bundle: directory or archive with appspec.yml.
    #[arg(long)]
    pub bundle: PathBuf,
    /// The deployment group (default: the application's name).
    #[arg(long, value_name = "NAME")]
    pub group: Option<String>,
    /// The hosts, by tags: `k=v[,k=v]` is one tag group whose tags are ORed; up to three
    /// groups separated by `;` are ANDed (`role=web,role=api;env=prod`).
    #[arg(long, value_name = "TAGS")]
    pub targets: Option<String>,
    /// AllAtOnce, HalfAtATime or OneAtATime (the default).
    #[arg(long, value_name = "NAME", conflicts_with = "min_healthy")]
    pub config: Option<String>,
    /// The hosts that must stay healthy, as a count (`N`) or a percentage (`P%`).
    #[arg(long, value_name = "N|P%")]
    pub min_healthy: Option<String>,
    /// A canary: P% of the hosts (at least one) first, then Baking for DURATION (seconds,
    /// or with s, m or h), then the rest by the batches. A failed canary host fails the
    /// deployment.
    #[arg(long, value_name = "P%:DURATION", conflicts_with = "linear")]
    pub canary: Option<String>,
    /// Linear: P% more of the hosts every DURATION (Baking in between).
    #[arg(long, value_name = "P%:DURATION", conflicts_with = "zones")]
    pub linear: Option<String>,
    /// Zone by zone: one zone (a value of the hosts' tag TAG) at a time, in the order of
    /// the zones' names, the minimum of healthy hosts held in each zone too. Every targeted
    /// host must carry the tag.
    #[arg(long, value_name = "TAG", conflicts_with = "canary")]
    pub zones: Option<String>,
    /// Zone by zone: Baking for DURATION after each zone but the last (default none).
    #[arg(long, value_name = "DURATION", requires = "zones")]
    pub zone_bake: Option<String>,
    /// Zone by zone: Baking for DURATION after the first zone (default: --zone-bake).
    #[arg(long, value_name = "DURATION", requires = "zones")]
    pub first_zone_bake: Option<String>,
    /// Only the targeted hosts that do not run the revision yet (CodeDeploy's "outdated
    /// instances only"); refused if there is none.
    #[arg(long)]
    pub outdated_only: bool,
    /// A failing ApplicationStop hook of the previous revision does not fail a host
    /// (CodeDeploy's --ignore-application-stop-failures).
    #[arg(long)]
    pub ignore_stop_failures: bool,
    /// Do not roll back by itself if it fails. By default the intent consents to putting
    /// the group's last successful revision back on every host that took this one.
    #[arg(long)]
    pub no_rollback: bool,
    /// Print the targets and the batches, in order, and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Wait for the deployment to end, showing progress; exit 0 exactly when it Succeeded.
    #[arg(long)]
    pub wait: bool,
}

/// What `--dry-run` prints (with `--json`, this object).
#[derive(Debug, Serialize)]
pub struct DryRun {
    pub app: String,
    pub group: String,
    pub revision: String,
    pub config: String,
    /// The waves and bake (`no waves`, `canary 25%, bake 600s`, ...).
    pub rollout: String,
    /// Zone by zone: the tag whose values are the zones, and the zones in order.
    pub zone_tag: Option<String>,
    pub zones: Vec<String>,
    pub targets: String,
    /// The plan's numbers: the minimum of healthy hosts, the successes required and the
    /// largest batch.
    pub rules: Rules,
    /// The targeted hosts, in the order CodeDeploy's rules update them.
    pub hosts: Vec<PlannedHost>,
    /// The batches, in order (assuming every host succeeds).
    pub batches: Vec<Vec<String>>,
    /// After which batches (counted from 1) the deployment bakes before the next wave.
    pub bakes_after: Vec<usize>,
    /// Hosts whose tags match but that the mesh holds dead or left: not targeted.
    pub unreachable: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct PlannedHost {
    pub name: String,
    pub healthy: bool,
    /// Its zone, zone by zone.
    pub zone: Option<String>,
    /// The revision it runs now, if any.
    pub revision: Option<String>,
}

pub async fn run(
    args: CreateArgs,
    peer: &str,
    identity: Option<&Path>,
    json: bool,
) -> Result<bool> {
    let identity = identity.ok_or_else(|| {
        anyhow!(
            "`shoal deploy create` needs an operator identity: pass --identity DIR or set SHOAL_IDENTITY"
        )
    })?;
    let config =
        DeploymentConfig::from_options(args.config.as_deref(), args.min_healthy.as_deref())
            .context("--config / --min-healthy")?;
    let rollout = match &args.zones {
        Some(_) => Rollout::zones(args.zone_bake.as_deref(), args.first_zone_bake.as_deref())
            .context("--zone-bake / --first-zone-bake")?,
        None => Rollout::from_options(args.canary.as_deref(), args.linear.as_deref())
            .context("--canary / --linear")?,
    };
    let zone_tag = args.zones.as_deref();
    let group = args.group.clone().unwrap_or_else(|| args.app.clone());
    if !args.dry_run {
        let revision = revision_of(&args.bundle)?;
        return super::fleet::create(
            peer,
            identity,
            &super::fleet::Submission {
                app: &args.app,
                bundle: Some(&args.bundle),
                group: &group,
                targets: args.targets.as_deref(),
                config,
                rollout,
                zone_tag,
                rollback: !args.no_rollback,
                outdated_only: args.outdated_only,
                ignore_stop_failures: args.ignore_stop_failures,
                revision: &revision,
            },
            args.wait,
            json,
        )
        .await;
    }
    let targets = match &args.targets {
        Some(t) => Targets::parse(t).context("--targets")?,
        None => bail!(
            "the deployment group {group:?} has no targets on record yet: pass --targets k=v[,k=v]"
        ),
    };
    let revision = revision_of(&args.bundle)?;

    let addr = super::hosts::resolve(peer)?;
    let expect = super::hosts::named_host(peer);
    let Answer::Hosts(hosts) = api::ask(addr, expect, identity, None, &Request::Hosts).await?
    else {
        bail!("{peer} answered something other than the hosts");
    };
    let hosts: Vec<HostView> = if args.outdated_only {
        hosts
            .into_iter()
            .filter(|h| h.apps.get(&args.app).cloned().flatten().as_deref() != Some(&revision))
            .collect()
    } else {
        hosts
    };
    let plan = dry_run(
        &args.app, &group, &revision, config, rollout, zone_tag, &targets, &hosts,
    )?;
    if json {
        super::print_json(&plan)?;
    } else {
        print!("{}", text(&plan));
    }
    Ok(true)
}

/// The bundle's revision id, after checking that it opens and its AppSpec can deploy.
fn revision_of(path: &Path) -> Result<String> {
    let staging = tempfile::tempdir().context("making a scratch directory")?;
    let b = bundle::open(path, &staging.path().join("bundle"), &Limits::default())
        .with_context(|| format!("refusing the bundle {}", path.display()))?;
    b.appspec
        .deployable()
        .map_err(|errors| anyhow!("refusing the bundle: its AppSpec has errors:\n{errors}"))?;
    // What every host would refuse, refused here before anything is uploaded.
    for hooks in b.appspec.hooks.values() {
        for h in hooks {
            if !b.root.join(&h.location).is_file() {
                bail!(
                    "refusing the bundle: appspec.yml line {}: hook {} is not a file in the bundle",
                    h.line,
                    h.location
                );
            }
        }
    }
    Ok(b.id.0)
}

/// The plan for `hosts` (as an agent lists them). Sans-IO, so tests can call it.
#[allow(clippy::too_many_arguments)]
pub fn dry_run(
    app: &str,
    group: &str,
    revision: &str,
    config: DeploymentConfig,
    rollout: Rollout,
    zone_tag: Option<&str>,
    targets: &Targets,
    hosts: &[HostView],
) -> Result<DryRun> {
    let chosen = targets::choose(targets, app, zone_tag, hosts)?;
    let (infos, unreachable) = (chosen.hosts, chosen.unreachable);
    let names: Vec<&str> = infos.iter().map(|h| h.name.as_str()).collect();
    let planner = Planner::new(config, infos.clone(), revision)
        .and_then(|p| p.with_rollout(rollout))
        .with_context(|| format!("cannot plan {config} over {} hosts", names.len()))?;
    let batches = planner.batches_preview();
    let waves = planner.wave_ends();
    let bakes_after = batches
        .iter()
        .scan(0, |done, b| {
            *done += b.len();
            Some(*done)
        })
        .enumerate()
        .filter(|&(_, done)| done < infos.len() && waves.contains(&done))
        .map(|(i, _)| i + 1)
        .collect();
    let order: Vec<String> = batches.concat();
    let info: BTreeMap<&str, &HostInfo> = infos.iter().map(|h| (h.name.as_str(), h)).collect();
    Ok(DryRun {
        app: app.to_string(),
        group: group.to_string(),
        revision: revision.to_string(),
        config: config.to_string(),
        rollout: rollout.to_string(),
        zone_tag: zone_tag.map(String::from),
        zones: planner.zones(),
        targets: targets.to_string(),
        rules: planner.rules(),
        hosts: order
            .iter()
            .map(|n| {
                let h = info[n.as_str()];
                PlannedHost {
                    name: n.clone(),
                    healthy: h.health == Health::Healthy,
                    zone: h.zone.clone(),
                    revision: match &h.revision {
                        Revision::Known(r) => Some(r.clone()),
                        Revision::Unknown => None,
                    },
                }
            })
            .collect(),
        batches,
        bakes_after,
        unreachable,
    })
}

fn text(plan: &DryRun) -> String {
    let short = super::short;
    let printable = super::printable;
    let mut out = format!(
        "dry run: {} revision {} to group {} ({}, {}), targets {}\n{} hosts; at least {} stay healthy, {} must succeed, at most {} at a time\n",
        plan.app,
        short(&plan.revision),
        plan.group,
        plan.config,
        plan.rollout,
        match &plan.zone_tag {
            Some(tag) => format!("{}, zones by tag {}", plan.targets, printable(tag)),
            None => plan.targets.clone(),
        },
        plan.hosts.len(),
        plan.rules.minimum,
        plan.rules.required,
        plan.rules.max_batch,
    );
    let state: BTreeMap<&str, &PlannedHost> =
        plan.hosts.iter().map(|h| (h.name.as_str(), h)).collect();
    for (i, batch) in plan.batches.iter().enumerate() {
        let hosts: Vec<String> = batch
            .iter()
            .map(|n| {
                let h = state[n.as_str()];
                let rev = h
                    .revision
                    .as_deref()
                    .map_or("no revision".to_string(), short);
                let health = if h.healthy { "" } else { ", unhealthy" };
                format!("{} ({rev}{health})", printable(n))
            })
            .collect();
        let zone = batch
            .first()
            .and_then(|n| state[n.as_str()].zone.as_deref())
            .map(|z| format!(" (zone {})", printable(z)))
            .unwrap_or_default();
        out.push_str(&format!("batch {}{zone}: {}\n", i + 1, hosts.join(", ")));
        if plan.bakes_after.contains(&(i + 1)) {
            out.push_str("then Baking before the next wave\n");
        }
    }
    if !plan.unreachable.is_empty() {
        out.push_str(&format!(
            "not targeted (dead or left): {}\n",
            plan.unreachable
                .iter()
                .map(|n| printable(n))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    out.push_str("nothing was changed (--dry-run)\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::hoststate::{self, AppRecord};
    use crate::mesh::view::MemberState;

    fn host(
        name: &str,
        state: MemberState,
        tags: &[(&str, &str)],
        app: Option<(&str, hoststate::Health)>,
    ) -> HostView {
        HostView {
            name: name.into(),
            addr: "127.0.0.1:7400".parse().unwrap(),
            state,
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            apps: BTreeMap::new(),
            details: app
                .map(|(rev, health)| {
                    (
                        "web".to_string(),
                        AppRecord {
                            revision: Some(rev.to_string()),
                            health,
                            held: Default::default(),
                            problem: None,
                            restarts: 0,
                            fetching: None,
                        },
                    )
                })
                .into_iter()
                .collect(),
            log: None,
            version: 1,
        }
    }

    #[test]
    fn plans_over_matching_live_hosts_in_codedeploy_order() {
        use hoststate::Health::{Running, Stopped};
        let hosts = vec![
            host(
                "a",
                MemberState::Alive,
                &[("role", "web")],
                Some(("new", Running)),
            ),
            host(
                "b",
                MemberState::Alive,
                &[("role", "web")],
                Some(("old", Running)),
            ),
            host("c", MemberState::Alive, &[("role", "web")], None),
            host(
                "d",
                MemberState::Suspect,
                &[("role", "web")],
                Some(("old", Stopped)),
            ),
            host("e", MemberState::Dead, &[("role", "web")], None),
            host("f", MemberState::Alive, &[("role", "db")], None),
        ];
        let targets = Targets::parse("role=web").unwrap();
        let plan = dry_run(
            "web",
            "web",
            "new",
            DeploymentConfig::OneAtATime,
            Rollout::Waveless,
            None,
            &targets,
            &hosts,
        )
        .unwrap();
        // Unhealthy first, then unknown revision, then old, then current.
        assert_eq!(
            plan.batches,
            vec![vec!["d"], vec!["c"], vec!["b"], vec!["a"]]
        );
        assert_eq!(plan.unreachable, vec!["e"]);
        assert!(!plan.hosts[0].healthy);
        let half = dry_run(
            "web",
            "web",
            "new",
            DeploymentConfig::HalfAtATime,
            Rollout::Waveless,
            None,
            &targets,
            &hosts,
        )
        .unwrap();
        assert_eq!(half.rules.max_batch, 2);
    }

    #[test]
    fn gossiped_names_and_revisions_are_printed_safely() {
        let hosts = vec![host(
            "a\u{1b}[2J",
            MemberState::Alive,
            &[("role", "web")],
            Some(("ééééééééééééééé", hoststate::Health::Running)),
        )];
        let targets = Targets::parse("role=web").unwrap();
        let plan = dry_run(
            "web",
            "web",
            "new",
            DeploymentConfig::AllAtOnce,
            Rollout::Waveless,
            None,
            &targets,
            &hosts,
        )
        .unwrap();
        let out = text(&plan);
        assert!(out.contains("a\\u{1b}[2J (éééééééééééé)"), "{out}");
        assert!(!out.contains('\u{1b}'));
    }

    #[test]
    fn no_matching_live_host_is_an_error_that_says_why() {
        let hosts = vec![host("e", MemberState::Dead, &[("role", "web")], None)];
        let targets = Targets::parse("role=web").unwrap();
        let err = dry_run(
            "web",
            "web",
            "new",
            DeploymentConfig::AllAtOnce,
            Rollout::Waveless,
            None,
            &targets,
            &hosts,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("dead or left"), "{err}");
    }
}
