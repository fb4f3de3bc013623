//! `shoal deploy local`: the whole lifecycle on this host, without a mesh, like
//! `codedeploy-local`. `shoal deploy recover` finishes what an interrupted deployment left
//! (a deploy does that first anyway; `--force` even when the old service will not start). `shoal deploy create` is a fleet deployment
//! (`deploy_create.rs`).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::hooks::HookRuntime;
use crate::lifecycle::run::DEFAULT_KEEP_RELEASES;
use crate::lifecycle::{DeployRequest, DeploymentRecord, LocalHost};

#[derive(Subcommand, Debug)]
pub enum DeployCommand {
    /// Deploy a bundle on this host and wait for the result; exits 0 exactly when it Succeeded.
    Local(LocalArgs),
    /// Put an application back on one revision after an interrupted deployment.
    Recover(RecoverArgs),
    /// A fleet deployment by tags, asked of any agent; `--wait` follows it to its end.
    Create(super::deploy_create::CreateArgs),
    /// A fleet deployment's status: each host's and each event's, with hook log tails.
    Status(super::fleet::StatusArgs),
    /// Fleet deployments, newest first.
    List(super::fleet::ListArgs),
    /// Stop a fleet deployment: no new batch starts; hosts in flight finish.
    Stop(super::fleet::StopArgs),
    /// Roll a deployment group back by hand: redeploy the revision it ran before its last
    /// deployment, from the hosts that keep it.
    Rollback(super::deploy_rollback::RollbackArgs),
}

#[derive(Args, Debug)]
pub struct HostArgs {
    /// Where the host keeps releases, state and logs (default: $SHOAL_DATA_DIR or ~/.local/share/shoal).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Root the AppSpec's file destinations here (default /); lets several agents share a machine.
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub install_root: PathBuf,
    /// Successful releases kept per application besides the active one.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_KEEP_RELEASES)]
    pub keep_releases: usize,
}

#[derive(Args, Debug)]
pub struct LocalArgs {
    #[arg(long)]
    pub app: String,
    /// A bundle: directory or archive with appspec.yml.
    #[arg(long)]
    pub bundle: PathBuf,
    #[command(flatten)]
    pub host: HostArgs,
    /// Serve the application on this port instead of the AppSpec's (`$PORT` for the service).
    #[arg(long)]
    pub port: Option<u16>,
    /// On failure, leave the host as it is instead of rolling back.
    #[arg(long)]
    pub no_rollback: bool,
    /// A failing ApplicationStop hook of the previous revision is recorded, and the
    /// deployment goes on (CodeDeploy's --ignore-application-stop-failures).
    #[arg(long)]
    pub ignore_stop_failures: bool,
}

#[derive(Args, Debug)]
pub struct RecoverArgs {
    #[arg(long)]
    pub app: String,
    /// Put the host back on the revision it came from even if that revision's service will
    /// not start (the recovery otherwise fails and keeps its journal, and the app cannot be
    /// deployed). Waits up to a minute for a deployment or the agent's supervisor to let go
    /// of the application.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub host: HostArgs,
}

fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SHOAL_DATA_DIR") {
        return PathBuf::from(dir);
    }
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".local/share/shoal"))
        .unwrap_or_else(|| PathBuf::from("/var/lib/shoal"))
}

fn local_host(args: &HostArgs) -> Result<LocalHost> {
    let data_dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
    let hooks = HookRuntime::new(&data_dir.join("cache/hooks"))?;
    Ok(LocalHost {
        host_name: crate::hooks::HookContext::adhoc(crate::hooks::LifecycleEvent::Install)
            .host_name,
        data_dir,
        install_root: args.install_root.clone(),
        tags: Default::default(),
        keep_releases: args.keep_releases,
        hooks: Arc::new(hooks),
    })
}

pub async fn run(
    cmd: DeployCommand,
    peer: &str,
    identity: Option<&std::path::Path>,
    json: bool,
) -> Result<bool> {
    match cmd {
        DeployCommand::Create(args) => super::deploy_create::run(args, peer, identity, json).await,
        DeployCommand::Status(args) => super::fleet::run_status(args, peer, identity, json).await,
        DeployCommand::List(args) => super::fleet::run_list(args, peer, identity, json).await,
        DeployCommand::Stop(args) => super::fleet::run_stop(args, peer, identity, json).await,
        DeployCommand::Rollback(args) => {
            super::deploy_rollback::run(args, peer, identity, json).await
        }
        DeployCommand::Local(args) => {
            let host = local_host(&args.host)?;
            let request = DeployRequest {
                id: None,
                app: args.app.clone(),
                bundle: args.bundle.clone(),
                deployment_group: "local".into(),
                rollback: !args.no_rollback,
                ignore_stop_failures: args.ignore_stop_failures,
                port: args.port,
                progress: None,
            };
            let progress = super::spinner(&format!(
                "deploying {} to {}",
                args.bundle.display(),
                args.app
            ));
            let record = host.deploy(&request).await;
            progress.finish_and_clear();
            let record = record?;
            if json {
                super::print_json(&record)?;
            } else {
                print_record(&record);
            }
            if !record.succeeded() {
                eprintln!("error: deployment {} {}", record.id, record.message);
            }
            Ok(record.succeeded())
        }
        DeployCommand::Recover(args) => {
            let host = local_host(&args.host)?;
            let recovered = if args.force {
                host.recover_forced(&args.app, std::time::Duration::from_secs(60))
                    .await?
            } else {
                host.recover(&args.app).await?
            };
            let message = recovered
                .clone()
                .unwrap_or_else(|| "nothing to recover".into());
            if json {
                super::print_json(
                    &serde_json::json!({ "app": args.app, "recovered": recovered.is_some(), "message": message }),
                )?;
            } else {
                println!("{}: {message}", args.app);
            }
            Ok(true)
        }
    }
}

fn print_record(r: &DeploymentRecord) {
    println!(
        "deployment {} of {} revision {}",
        r.id,
        r.app,
        r.revision.short()
    );
    for host in &r.hosts {
        for e in &host.events {
            println!("  {:<18} {:?}", e.name.to_string(), e.status);
        }
    }
    for h in &r.hooks {
        let mark = if h.succeeded { "ok  " } else { "FAIL" };
        println!(
            "  {mark} {} {} [{}]: {}",
            h.event,
            h.location,
            h.revision.short(),
            h.summary
        );
    }
    if let Some(rb) = &r.rollback {
        println!("  rollback to {}: {}", rb.revision.short(), rb.status);
    }
    println!("{}", r.message);
}
