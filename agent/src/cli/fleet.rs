//! Fleet deployments from the command line, through any agent with an operator identity:
//! `deploy create` (without `--dry-run`), `deploy status`, `deploy list`, `deploy stop` and
//! `group list`. The agent at `--peer` answers, or passes the request to the deployment
//! log's leader; creations and stops are signed here with the operator's key, and every
//! host checks that signature itself.

use crate::fleet::now_unix;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};

use crate::api::{self, Answer, Request};
use crate::bundle::RevisionId;
use crate::fleet::intent::{self, Intent};
use crate::fleet::plan::DeploymentConfig;
use crate::fleet::targets::Targets;
use crate::fleet::wire::{
    DeploymentSummary, DeploymentView, GroupView, OperatorAnswer, OperatorRequest,
};
use crate::identity::Identity;
use crate::lifecycle::status::{DeploymentStatus, HostStatus};

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The deployment's id.
    pub id: String,
    /// Keep showing its progress until it ends; exit 0 exactly when it Succeeded.
    #[arg(long)]
    pub watch: bool,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    #[arg(long)]
    pub app: Option<String>,
    #[arg(long, value_name = "NAME")]
    pub group: Option<String>,
}

#[derive(Args, Debug)]
pub struct StopArgs {
    /// The deployment's id.
    pub id: String,
    /// Then roll it back: once its hosts in flight have reported, put the revision its
    /// intent consented to (the group's last success) back on every host that took it.
    #[arg(long)]
    pub rollback: bool,
}

#[derive(Subcommand, Debug)]
pub enum GroupCommand {
    /// Every deployment group: its application, targets, config and last successful revision.
    List,
}

fn need_identity<'a>(identity: Option<&'a Path>, command: &str) -> Result<&'a Path> {
    identity.ok_or_else(|| {
        anyhow!("`shoal {command}` needs an operator identity: pass --identity DIR or set SHOAL_IDENTITY")
    })
}

/// Asks the agent at `peer` a fleet request; a refusal is an error.
pub async fn ask(peer: &str, identity: &Path, request: OperatorRequest) -> Result<OperatorAnswer> {
    let addr = super::hosts::resolve(peer)?;
    let expect = super::hosts::named_host(peer);
    // A creation may wait for the log to be founded and for a commit.
    let within = Duration::from_secs(30);
    let answer = api::ask_with(
        addr,
        expect,
        identity,
        None,
        &Request::Fleet(request),
        None,
        within,
    )
    .await?;
    match answer {
        Answer::Fleet(OperatorAnswer::Refused(why)) => bail!("{why}"),
        Answer::Fleet(answer) => Ok(answer),
        _ => bail!("{peer} answered something other than a fleet answer"),
    }
}

pub async fn status(peer: &str, identity: &Path, id: &str) -> Result<DeploymentView> {
    match ask(
        peer,
        identity,
        OperatorRequest::Status { id: id.to_owned() },
    )
    .await?
    {
        OperatorAnswer::Deployment(view) => Ok(*view),
        _ => bail!("{peer} answered something other than a deployment"),
    }
}

/// Uploads the bundle to the agent at `peer`, signs the intent and asks for the
/// deployment; the deployment as accepted.
pub async fn submit(
    peer: &str,
    identity: &Path,
    submission: &Submission<'_>,
) -> Result<DeploymentView> {
    let Submission {
        app,
        bundle,
        group,
        targets,
        config,
        rollout,
        zone_tag,
        rollback,
        outdated_only,
        ignore_stop_failures,
        revision,
    } = *submission;
    let operator = Identity::load(identity)?;
    if operator.role != crate::identity::Role::Operator {
        bail!(
            "{} holds the agent identity of `{}`: only an operator identity may create a \
             deployment (`shoal ca issue --operator`)",
            identity.display(),
            operator.name
        );
    }
    // The group's record: its targets if none are given, and the revision to consent to
    // roll back to (its last success) unless --no-rollback.
    let groups = if targets.is_none() || rollback {
        match ask(peer, identity, OperatorRequest::Groups).await? {
            OperatorAnswer::Groups(g) => g,
            _ => bail!("{peer} answered something other than the groups"),
        }
    } else {
        Vec::new()
    };
    let rollback_to = groups
        .iter()
        .find(|g| g.name == group && rollback)
        .and_then(|g| g.last_successful.clone());
    let targets = match targets {
        Some(t) => Targets::parse(t).context("--targets")?,
        None => {
            let Some(known) = groups.iter().find(|g| g.name == group) else {
                bail!(
                    "the deployment group {group:?} has no targets on record yet: pass --targets k=v[,k=v]"
                );
            };
            Targets::parse(&known.targets)
                .with_context(|| format!("the targets on record for group {group:?}"))?
        }
    };
    // The bundle goes to the agent first: the hosts fetch it from there and from each
    // other. Without one, from the hosts that hold the revision already.
    let holder = match bundle {
        Some(bundle) => Some(upload(peer, identity, app, bundle, revision).await?),
        None => None,
    };
    let intent = Intent::new(
        app,
        group,
        targets,
        &RevisionId(revision.to_owned()),
        config,
        &operator.name,
        now_unix(),
    )?
    .with_rollout(rollout, zone_tag)?
    .with_rollback_to(rollback_to)?
    .outdated_only(outdated_only)
    .ignoring_stop_failures(ignore_stop_failures);
    let signed = intent::sign(&intent, &operator)?;
    let view = match ask(
        peer,
        identity,
        OperatorRequest::Create {
            intent: signed,
            holder,
        },
    )
    .await?
    {
        OperatorAnswer::Deployment(view) => *view,
        _ => bail!("{peer} answered something other than the deployment"),
    };
    Ok(view)
}

/// Uploads `bundle` (a directory is packed first) to the agent at `peer`, which keeps it
/// as revision `revision`; the name of the agent that holds it.
async fn upload(
    peer: &str,
    identity: &Path,
    app: &str,
    bundle: &Path,
    revision: &str,
) -> Result<String> {
    let packed;
    let file = if bundle.is_dir() {
        packed = tempfile::tempdir().context("making a scratch directory")?;
        let out = packed.path().join("bundle.tar.zst");
        crate::bundle::create(bundle, &out)
            .with_context(|| format!("packing {}", bundle.display()))?;
        out
    } else {
        bundle.to_path_buf()
    };
    let len = std::fs::metadata(&file)
        .with_context(|| format!("reading {}", file.display()))?
        .len();
    let addr = super::hosts::resolve(peer)?;
    let expect = super::hosts::named_host(peer);
    let uploading = super::spinner(&format!(
        "uploading {} ({len} bytes) to {peer}",
        bundle.display()
    ));
    let within = Duration::from_secs(60 + len / (1 << 20));
    let uploaded = api::ask_with(
        addr,
        expect,
        identity,
        None,
        &Request::Upload {
            app: app.to_owned(),
            len,
        },
        Some(&file),
        within,
    )
    .await;
    uploading.finish_and_clear();
    match uploaded? {
        Answer::Uploaded {
            revision: kept,
            holder,
        } => {
            if kept != revision {
                bail!(
                    "{peer} kept the bundle as revision {kept}, not {revision}: it changed while uploading?"
                );
            }
            Ok(holder)
        }
        _ => bail!("{peer} answered something other than an upload"),
    }
}

/// What `deploy create` asks for (besides where and as whom).
pub struct Submission<'a> {
    pub app: &'a str,
    /// A bundle: a directory (packed here) or an archive. None: the hosts fetch the
    /// revision from those that hold it already.
    pub bundle: Option<&'a Path>,
    pub group: &'a str,
    /// `k=v[,k=v]`; none: the group's targets on record.
    pub targets: Option<&'a str>,
    pub config: DeploymentConfig,
    pub rollout: crate::fleet::plan::Rollout,
    /// Zone by zone: the tag whose values are the zones.
    pub zone_tag: Option<&'a str>,
    /// Consent to roll back to the group's last success if it fails.
    pub rollback: bool,
    pub outdated_only: bool,
    pub ignore_stop_failures: bool,
    /// The bundle's revision id, as checked before.
    pub revision: &'a str,
}

/// `deploy create` for real: uploads the bundle to the agent at `peer`, signs the intent,
/// asks for the deployment, and with `wait` follows it to its end.
pub async fn create(
    peer: &str,
    identity: &Path,
    submission: &Submission<'_>,
    wait: bool,
    json: bool,
) -> Result<bool> {
    let view = submit(peer, identity, submission).await?;
    after_submit(peer, identity, view, wait, json).await
}

/// What `deploy create` and `deploy rollback` print of a deployment just accepted, or, with
/// `wait`, how it follows it to its end.
pub async fn after_submit(
    peer: &str,
    identity: &Path,
    view: DeploymentView,
    wait: bool,
    json: bool,
) -> Result<bool> {
    if !wait {
        if json {
            super::print_json(&view)?;
        } else {
            println!(
                "deployment {} created: {} revision {} to {} host(s) ({}), coordinator {}",
                view.id,
                view.app,
                super::short(&view.revision),
                view.hosts.len(),
                view.config,
                view.coordinator.as_deref().unwrap_or("?")
            );
            match &view.rollback_to {
                Some(r) => println!(
                    "if it fails it rolls back to revision {} (the group's last success; --no-rollback to not)",
                    super::short(r)
                ),
                None => println!(
                    "if it fails nothing is rolled back (--no-rollback, or the group has no success yet)"
                ),
            }
            println!("follow it with: shoal deploy status {} --watch", view.id);
        }
        return Ok(true);
    }
    follow(peer, identity, &view.id, json).await
}

/// Shows a deployment's progress until it ends, then its final state; true exactly when
/// it Succeeded.
async fn follow(peer: &str, identity: &Path, id: &str, json: bool) -> Result<bool> {
    let progress = Progress::new();
    let mut failures = 0;
    let view = loop {
        match status(peer, identity, id).await {
            Ok(view) => {
                failures = 0;
                progress.show(&view);
                if view.ended() {
                    break view;
                }
            }
            // The agent asked may be restarting, or the log electing: keep asking a while.
            Err(e) => {
                failures += 1;
                if failures >= 20 {
                    return Err(e.context("the deployment's status could not be read"));
                }
                progress.note(&format!("{e:#}"));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    progress.finish();
    print_view(&view, json)?;
    if view.status != DeploymentStatus::Succeeded {
        eprintln!(
            "error: deployment {} {}{}",
            view.id,
            view.status,
            view.reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        );
    }
    Ok(view.status == DeploymentStatus::Succeeded)
}

/// Per-host lines on a terminal (bars that update in place), nothing otherwise.
pub struct Progress {
    multi: indicatif::MultiProgress,
    header: indicatif::ProgressBar,
    hosts: std::cell::RefCell<BTreeMap<String, indicatif::ProgressBar>>,
}

impl Progress {
    pub fn new() -> Progress {
        let multi = indicatif::MultiProgress::with_draw_target(super::progress_target());
        let header = multi.add(indicatif::ProgressBar::new(0));
        header.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} hosts")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Progress {
            multi,
            header,
            hosts: Default::default(),
        }
    }

    pub fn show(&self, view: &DeploymentView) {
        let done = view
            .hosts
            .iter()
            .filter(|h| !matches!(h.status, HostStatus::Pending | HostStatus::InProgress))
            .count();
        self.header.set_length(view.hosts.len() as u64);
        self.header.set_position(done as u64);
        self.header.set_message(format!(
            "{} {} ({}, coordinator {})",
            view.id.chars().take(8).collect::<String>(),
            view.status,
            view.config,
            view.coordinator.as_deref().unwrap_or("?")
        ));
        let mut hosts = self.hosts.borrow_mut();
        for h in &view.hosts {
            let bar = hosts.entry(h.name.clone()).or_insert_with(|| {
                let bar = self.multi.add(indicatif::ProgressBar::new_spinner());
                bar.set_style(
                    indicatif::ProgressStyle::with_template("  {spinner} {msg}")
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
                );
                bar
            });
            let event = h
                .events
                .iter()
                .rev()
                .find(|e| e.status != crate::lifecycle::status::EventStatus::Pending)
                .map(|e| format!(" {} {}", e.name, e.status))
                .unwrap_or_default();
            bar.set_message(format!(
                "{:<20} {}{event}",
                super::printable(&h.name),
                h.status
            ));
            if h.status == HostStatus::InProgress {
                bar.tick();
            }
        }
    }

    pub fn note(&self, message: &str) {
        self.header.set_message(format!("waiting: {message}"));
    }

    pub fn finish(&self) {
        for bar in self.hosts.borrow().values() {
            bar.finish_and_clear();
        }
        self.header.finish_and_clear();
        let _ = self.multi.clear();
    }
}

fn print_view(view: &DeploymentView, json: bool) -> Result<()> {
    if json {
        return super::print_json(view);
    }
    println!(
        "deployment {}: {} revision {} to group {} ({}, targets {})",
        view.id,
        view.app,
        super::short(&view.revision),
        view.group,
        view.config,
        view.targets
    );
    print!("status {}", view.status);
    if let Some(reason) = &view.reason {
        print!(": {reason}");
    }
    if let Some(until) = view.baking_until_ms {
        let left = until.saturating_sub(now_unix() * 1000) / 1000;
        print!(" ({}; about {left} s left)", view.rollout);
    }
    println!(
        "; coordinator {}",
        view.coordinator.as_deref().unwrap_or("unknown")
    );
    if let Some(of) = &view.rollback_of {
        println!("the rollback of deployment {of}");
    }
    if let Some(of) = &view.catch_up_of {
        println!(
            "a catch-up of deployment {of}: its revision, to hosts that joined the group after \
             it succeeded or missed it"
        );
    }
    if let Some(rb) = &view.rollback {
        println!(
            "rolled back by deployment {} to revision {}: {}",
            rb.id,
            super::short(&rb.revision),
            rb.status
        );
    }
    if let Some(warning) = &view.warning {
        println!("warning: {warning}");
    }
    for h in &view.hosts {
        let events: Vec<String> = h
            .events
            .iter()
            .map(|e| format!("{} {}", e.name, e.status))
            .collect();
        println!(
            "  {:<20} {:<10} {}",
            super::printable(&h.name),
            h.status.to_string(),
            events.join(", ")
        );
        if let Some(reason) = &h.reason {
            println!("      {}", super::printable(reason));
        }
        if let Some(t) = &h.transfer {
            let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
            println!(
                "      fetched {:.1} MiB from {} peer{}, {:.1} MiB held already",
                mib(t.fetched_bytes),
                t.sources,
                if t.sources == 1 { "" } else { "s" },
                mib(t.reused_bytes)
            );
        }
        if h.status == HostStatus::Failed {
            for line in &h.log_tail {
                println!("      | {}", super::printable(line));
            }
        }
    }
    Ok(())
}

/// `shoal deploy status ID [--watch]`.
pub async fn run_status(
    args: StatusArgs,
    peer: &str,
    identity: Option<&Path>,
    json: bool,
) -> Result<bool> {
    let identity = need_identity(identity, "deploy status")?;
    if args.watch {
        return follow(peer, identity, &args.id, json).await;
    }
    let view = status(peer, identity, &args.id).await?;
    print_view(&view, json)?;
    Ok(true)
}

/// `shoal deploy list [--app APP] [--group NAME]`.
pub async fn run_list(
    args: ListArgs,
    peer: &str,
    identity: Option<&Path>,
    json: bool,
) -> Result<bool> {
    let identity = need_identity(identity, "deploy list")?;
    let list: Vec<DeploymentSummary> = match ask(
        peer,
        identity,
        OperatorRequest::List {
            app: args.app,
            group: args.group,
        },
    )
    .await?
    {
        OperatorAnswer::Deployments(list) => list,
        _ => bail!("{peer} answered something other than deployments"),
    };
    if json {
        super::print_json(&list)?;
        return Ok(true);
    }
    if list.is_empty() {
        println!("no deployments");
    }
    for d in &list {
        println!(
            "{}  {:<10} {:<16} {:<16} {}  {}/{} succeeded, {} failed{}",
            d.id,
            d.status.to_string(),
            super::printable(&d.app),
            super::printable(&d.group),
            super::short(&d.revision),
            d.succeeded,
            d.hosts,
            d.failed,
            d.catch_up_of
                .as_ref()
                .map(|of| format!(" (catch-up of {of})"))
                .unwrap_or_default()
        );
    }
    Ok(true)
}

/// `shoal deploy stop ID`: signed here, so no agent can stop a deployment on its own.
pub async fn run_stop(
    args: StopArgs,
    peer: &str,
    identity: Option<&Path>,
    json: bool,
) -> Result<bool> {
    let identity_dir = need_identity(identity, "deploy stop")?;
    let operator = Identity::load(identity_dir)?;
    let stop = intent::sign_stop(&args.id, args.rollback, &operator, now_unix())?;
    let view = match ask(peer, identity_dir, OperatorRequest::Stop { stop }).await? {
        OperatorAnswer::Deployment(view) => *view,
        _ => bail!("{peer} answered something other than the deployment"),
    };
    if json {
        super::print_json(&view)?;
    } else {
        println!(
            "deployment {} is {}: no new batch starts; hosts in flight finish{}",
            view.id,
            view.status,
            if args.rollback {
                ", then it is rolled back (follow it with deploy status)"
            } else {
                ""
            }
        );
    }
    Ok(true)
}

/// `shoal group list`.
pub async fn run_group(
    cmd: GroupCommand,
    peer: &str,
    identity: Option<&Path>,
    json: bool,
) -> Result<bool> {
    let GroupCommand::List = cmd;
    let identity = need_identity(identity, "group list")?;
    let groups: Vec<GroupView> = match ask(peer, identity, OperatorRequest::Groups).await? {
        OperatorAnswer::Groups(g) => g,
        _ => bail!("{peer} answered something other than the groups"),
    };
    if json {
        super::print_json(&groups)?;
        return Ok(true);
    }
    if groups.is_empty() {
        println!("no deployment groups");
    }
    for g in &groups {
        println!(
            "{:<16} app {:<16} targets {:<24} {:<12} last successful {}  ({} deployments)",
            super::printable(&g.name),
            super::printable(&g.app),
            super::printable(&g.targets),
            g.config,
            g.last_successful
                .as_deref()
                .map_or("none".into(), super::short),
            g.deployments
        );
    }
    Ok(true)
}
