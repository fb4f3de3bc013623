//! `shoal agent --config FILE`: runs the agent in the foreground. Today that is this host's
//! side of deployments: interrupted deployments are recovered on start, running services
//! adopted, and crashed ones restarted. SIGTERM or Ctrl-C stops the agent and leaves the
//! services running; the next agent adopts them. The mesh (listen, identity, seeds) joins
//! it with the mesh issue.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use clap::Args;

use crate::config::AgentConfig;
use crate::hooks::HookRuntime;
use crate::lifecycle::LocalHost;

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
    tracing::info!(name = %config.name, data_dir = %config.data_dir.display(), "agent started");
    let stop = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("stopping; services keep running");
    };
    crate::lifecycle::supervise::supervise(&host, stop).await?;
    Ok(true)
}
