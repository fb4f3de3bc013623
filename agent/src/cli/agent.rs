//! `shoal agent --config FILE`: runs the agent in the foreground. It recovers interrupted
//! deployments, adopts and supervises services, and (given an identity) joins the mesh:
//! membership, gossiped host state, operator requests. SIGHUP reloads the tags; SIGTERM
//! or Ctrl-C leaves the mesh gracefully and stops the agent, leaving services running for
//! the next agent to adopt.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::config::AgentConfig;
use crate::hooks::HookRuntime;
use crate::identity::Identity;
use crate::lifecycle::LocalHost;
use crate::mesh::local::apps_on_disk;
use crate::mesh::node::{self, LocalState, NodeConfig};

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// The agent's TOML configuration (see docs/config.md).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

pub async fn run(args: AgentArgs) -> Result<bool> {
    let config = AgentConfig::load(&args.config)?;
    std::fs::create_dir_all(&config.data_dir)?;
    let host = LocalHost {
        hooks: Arc::new(HookRuntime::new(&config.data_dir.join("cache/hooks"))?),
        data_dir: config.data_dir.clone(),
        install_root: config.install_root.clone(),
        host_name: config.name.clone(),
        tags: config.tags.clone(),
        keep_releases: config.keep_releases,
    };
    // Everything runs until this flips.
    let (stopping, stopped) = watch::channel(false);
    let until_stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let mesh = match &config.identity {
        Some(dir) => {
            let node_config = NodeConfig {
                name: config.name.clone(),
                listen: config.listen,
                advertise: config.advertised_addr()?,
                identity: Identity::load(dir)?,
                seeds: config.seeds.clone(),
                data_dir: config.data_dir.clone(),
                forget_dead_after: crate::config::parse_duration(&config.forget_dead_after)?,
            };
            let (local_tx, local_rx) = watch::channel(LocalState {
                tags: config.tags.clone(),
                apps: apps_on_disk(&config.data_dir),
            });
            tokio::spawn(report_local(
                args.config.clone(),
                config.clone(),
                local_tx,
                stopped.clone(),
            ));
            let stop = until_stopped(stopped.clone());
            Some(tokio::spawn(node::run(node_config, local_rx, stop)))
        }
        None => {
            tracing::warn!("no `identity` in the configuration: running alone, outside any mesh");
            None
        }
    };
    tracing::info!(name = %config.name, data_dir = %config.data_dir.display(), "agent started");

    tokio::spawn(async move {
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("stopping; services keep running");
        let _ = stopping.send(true);
    });
    let supervised =
        crate::lifecycle::supervise::supervise(&host, until_stopped(stopped.clone())).await;
    if let Some(mesh) = mesh {
        mesh.await??;
    }
    supervised?;
    Ok(true)
}

/// Tells the mesh what this host runs (polling the lifecycle's state on disk) and its tags
/// (reloaded from the configuration on SIGHUP).
async fn report_local(
    path: PathBuf,
    mut config: AgentConfig,
    tx: watch::Sender<LocalState>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => return,
            _ = hup.recv() => match AgentConfig::load(&path) {
                Ok(new) => {
                    let mut applied = config.clone();
                    applied.tags = new.tags.clone();
                    if applied != new {
                        tracing::warn!("SIGHUP reloads `tags` only; other changes take effect at the next start");
                    }
                    tracing::info!(tags = ?applied.tags, "configuration reloaded");
                    config = applied;
                }
                Err(e) => tracing::warn!("configuration not reloaded: {e:#}"),
            },
            _ = tick.tick() => {}
        }
        let state = LocalState {
            tags: config.tags.clone(),
            apps: apps_on_disk(&config.data_dir),
        };
        tx.send_if_modified(|current| {
            let changed = *current != state;
            *current = state;
            changed
        });
    }
}
