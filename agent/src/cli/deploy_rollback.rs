//! `shoal deploy rollback --group G`: a rollback by hand. It undoes the group's last
//! deployment: it redeploys the revision the group ran before, to the group's targets on
//! record. Without a bundle, the hosts fetch that revision from the hosts that still hold
//! it (its release is kept, `keep_releases`). It is an ordinary deployment, signed by the
//! operator who asks, and shows up in `deploy list`.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;

use super::fleet::{Submission, ask};
use crate::api::{self, Answer, Request};
use crate::fleet::plan::{DeploymentConfig, Rollout};
use crate::fleet::wire::{DeploymentSummary, GroupView, OperatorAnswer, OperatorRequest};
use crate::lifecycle::status::DeploymentStatus;
use crate::mesh::view::MemberState;

#[derive(Args, Debug)]
pub struct RollbackArgs {
    /// The deployment group to roll back.
    #[arg(long, value_name = "NAME")]
    pub group: String,
    /// The revision to put back (an id, or a prefix of at least 8 characters). It must be
    /// one the group has deployed successfully. Default: the one before the group's last
    /// deployment. After a failure, that is the last success. After a success, it is the
    /// success before it.
    #[arg(long, value_name = "REVISION")]
    pub to: Option<String>,
    /// `AllAtOnce`, `HalfAtATime` or `OneAtATime` (default: the group's config on record).
    #[arg(long, value_name = "NAME")]
    pub config: Option<String>,
    /// Instead of --config: the fewest healthy hosts, a number or a percentage.
    #[arg(long, value_name = "N|P%", conflicts_with = "config")]
    pub min_healthy: Option<String>,
    /// Redeploy hosts that already run the revision too (default: only the others).
    #[arg(long)]
    pub all_hosts: bool,
    /// Follow it to its end; exit 0 exactly when it Succeeded.
    #[arg(long)]
    pub wait: bool,
}

/// The revision `deploy rollback` puts back, from the group's deployments (newest first).
/// Sans-IO, so tests can call it.
pub fn target(list: &[DeploymentSummary], to: Option<&str>) -> Result<String> {
    let succeeded = || {
        list.iter()
            .filter(|d| d.status == DeploymentStatus::Succeeded)
    };
    if let Some(to) = to {
        if to.chars().count() < 8 {
            bail!("--to {to:?}: give at least 8 characters of the revision id");
        }
        let mut matches: Vec<&str> = succeeded()
            .filter(|d| d.revision.starts_with(to))
            .map(|d| d.revision.as_str())
            .collect();
        matches.sort_unstable();
        matches.dedup();
        return match matches[..] {
            [one] => Ok(one.to_string()),
            [] => Err(anyhow!(
                "--to {to:?}: no successful deployment of the group has that revision \
                 (see `shoal deploy list --group`)"
            )),
            _ => Err(anyhow!(
                "--to {to:?} matches {} revisions: give more of the id",
                matches.len()
            )),
        };
    }
    // A catch-up repeats a success on hosts that joined late: what is undone is the
    // operator's last deployment.
    let Some(newest) = list.iter().find(|d| d.catch_up_of.is_none()) else {
        bail!("the group has no deployment yet: there is nothing to roll back");
    };
    if !matches!(
        newest.status,
        DeploymentStatus::Succeeded | DeploymentStatus::Failed | DeploymentStatus::Stopped
    ) {
        bail!(
            "its last deployment {} is still {}: stop it first (`shoal deploy stop {} --rollback` \
             stops it and rolls it back)",
            newest.id,
            newest.status,
            newest.id
        );
    }
    let before = if newest.status == DeploymentStatus::Succeeded {
        // Undo a success: the success before it, of another revision.
        succeeded().find(|d| d.revision != newest.revision)
    } else {
        succeeded().next()
    };
    before.map(|d| d.revision.clone()).ok_or_else(|| {
        anyhow!(
            "the group has no successful deployment of another revision before {}: there is \
             nothing to roll back to",
            newest.id
        )
    })
}

/// `DeploymentConfig`'s display (`OneAtATime`, `min-healthy 2`, `min-healthy 50%`) read back.
fn config_on_record(shown: &str) -> Result<DeploymentConfig> {
    match shown.strip_prefix("min-healthy ") {
        Some(min) => DeploymentConfig::from_options(None, Some(min)),
        None => DeploymentConfig::from_options(Some(shown), None),
    }
    .with_context(|| format!("the group's config on record, {shown:?}"))
}

pub async fn run(
    args: RollbackArgs,
    peer: &str,
    identity: Option<&Path>,
    json: bool,
) -> Result<bool> {
    let identity = identity.ok_or_else(|| {
        anyhow!(
            "`shoal deploy rollback` needs an operator identity: pass --identity DIR or set SHOAL_IDENTITY"
        )
    })?;
    let view = request(&args, peer, identity, |line| {
        if !json {
            println!("{line}");
        }
    })
    .await?;
    super::fleet::after_submit(peer, identity, view, args.wait, json).await
}

/// Works out the rollback `args` ask for and submits it: the deployment as accepted.
/// `say` is told what is rolled back, to what, before it is submitted. Also what the
/// dashboard's rollback button does (`cli::ui`).
pub async fn request(
    args: &RollbackArgs,
    peer: &str,
    identity: &Path,
    say: impl FnOnce(String),
) -> Result<crate::fleet::wire::DeploymentView> {
    let groups: Vec<GroupView> = match ask(peer, identity, OperatorRequest::Groups).await? {
        OperatorAnswer::Groups(g) => g,
        _ => bail!("{peer} answered something other than the groups"),
    };
    let Some(group) = groups.into_iter().find(|g| g.name == args.group) else {
        bail!(
            "there is no deployment group {:?} (see `shoal group list`)",
            args.group
        );
    };
    let list = match ask(
        peer,
        identity,
        OperatorRequest::List {
            app: None,
            group: Some(group.name.clone()),
        },
    )
    .await?
    {
        OperatorAnswer::Deployments(list) => list,
        _ => bail!("{peer} answered something other than the deployments"),
    };
    let revision = target(&list, args.to.as_deref())
        .with_context(|| format!("rolling back group {:?}", group.name))?;
    let config = match (&args.config, &args.min_healthy) {
        (None, None) => config_on_record(&group.config)?,
        (c, m) => DeploymentConfig::from_options(c.as_deref(), m.as_deref())
            .context("--config / --min-healthy")?,
    };
    // Without a bundle the hosts fetch the revision from those that keep its release.
    let addr = super::hosts::resolve(peer)?;
    let Answer::Hosts(hosts) = api::ask(
        addr,
        super::hosts::named_host(peer),
        identity,
        None,
        &Request::Hosts,
    )
    .await?
    else {
        bail!("{peer} answered something other than the hosts");
    };
    let held = hosts.iter().any(|h| {
        matches!(h.state, MemberState::Alive)
            && h.details
                .get(&group.app)
                .is_some_and(|a| a.held.contains(&revision))
    });
    if !held {
        bail!(
            "no live host keeps revision {revision} of {} any more: deploy its bundle with \
             `shoal deploy create --group {}`",
            group.app,
            group.name
        );
    }
    say(format!(
        "rolling group {} back to revision {} ({}, to {})",
        group.name,
        super::short(&revision),
        config,
        group.targets
    ));
    super::fleet::submit(
        peer,
        identity,
        &Submission {
            app: &group.app,
            bundle: None,
            group: &group.name,
            targets: Some(&group.targets),
            config,
            rollout: Rollout::Waveless,
            zone_tag: None,
            // A rollback that fails is not rolled back in turn.
            rollback: false,
            outdated_only: !args.all_hosts,
            ignore_stop_failures: false,
            revision: &revision,
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(id: &str, revision: &str, status: DeploymentStatus) -> DeploymentSummary {
        DeploymentSummary {
            id: id.into(),
            app: "app".into(),
            group: "g".into(),
            revision: revision.into(),
            status,
            hosts: 3,
            succeeded: 0,
            failed: 0,
            created_at_ms: 0,
            catch_up_of: None,
        }
    }

    use DeploymentStatus::*;

    #[test]
    fn a_catch_up_is_not_what_a_rollback_undoes() {
        let mut caught_up = d("c1", "rev-good-000", Failed);
        caught_up.catch_up_of = Some("d2".into());
        let list = [
            caught_up,
            d("d2", "rev-good-000", Succeeded),
            d("d1", "rev-old-0000", Succeeded),
        ];
        assert_eq!(target(&list, None).unwrap(), "rev-old-0000");
    }

    #[test]
    fn after_a_failure_the_last_success_comes_back() {
        let list = [
            d("d3", "rev-bad-0000", Failed),
            d("d2", "rev-good-000", Succeeded),
            d("d1", "rev-old-0000", Succeeded),
        ];
        assert_eq!(target(&list, None).unwrap(), "rev-good-000");
    }

    #[test]
    fn after_a_success_the_success_before_it_comes_back() {
        let list = [
            d("d4", "rev-new-0000", Succeeded),
            d("d3", "rev-new-0000", Succeeded),
            d("d2", "rev-bad-0000", Failed),
            d("d1", "rev-old-0000", Succeeded),
        ];
        assert_eq!(target(&list, None).unwrap(), "rev-old-0000");
    }

    #[test]
    fn nothing_to_go_back_to_or_still_running_is_an_error_that_says_so() {
        let err = target(&[], None).unwrap_err().to_string();
        assert!(err.contains("no deployment yet"), "{err}");
        let list = [d("d1", "rev-only-000", Succeeded)];
        let err = target(&list, None).unwrap_err().to_string();
        assert!(err.contains("nothing to roll back to"), "{err}");
        let list = [
            d("d2", "rev-new-0000", InProgress),
            d("d1", "rev-old-0000", Succeeded),
        ];
        let err = target(&list, None).unwrap_err().to_string();
        assert!(
            err.contains("still InProgress") && err.contains("deploy stop d2"),
            "{err}"
        );
    }

    #[test]
    fn to_names_a_successful_revision_by_a_unique_prefix() {
        let list = [
            d("d3", "aaaaaaaa11", Failed),
            d("d2", "aaaaaaaa22", Succeeded),
            d("d1", "aaaaaaaa23", Succeeded),
        ];
        assert_eq!(target(&list, Some("aaaaaaaa22")).unwrap(), "aaaaaaaa22");
        let err = target(&list, Some("aaaaaaaa2")).unwrap_err().to_string();
        assert!(err.contains("matches 2 revisions"), "{err}");
        let err = target(&list, Some("aaaaaaaa11")).unwrap_err().to_string();
        assert!(err.contains("no successful deployment"), "{err}");
        let err = target(&list, Some("aaaa")).unwrap_err().to_string();
        assert!(err.contains("at least 8"), "{err}");
    }

    #[test]
    fn the_config_on_record_reads_back() {
        for c in [
            DeploymentConfig::AllAtOnce,
            DeploymentConfig::HalfAtATime,
            DeploymentConfig::OneAtATime,
        ] {
            assert_eq!(config_on_record(&c.to_string()).unwrap(), c);
        }
        let custom = DeploymentConfig::from_options(None, Some("50%")).unwrap();
        assert_eq!(config_on_record(&custom.to_string()).unwrap(), custom);
        let custom = DeploymentConfig::from_options(None, Some("2")).unwrap();
        assert_eq!(config_on_record(&custom.to_string()).unwrap(), custom);
    }
}
