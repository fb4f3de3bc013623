//! `shoal agent --config FILE`: runs the agent in the foreground. It recovers interrupted
//! deployments, adopts and supervises services, and (given an identity) joins the mesh:
//! membership, gossiped host state, operator requests, bundles served to peers, and fleet
//! deployments (its copy of the deployment log, the coordinator when it leads, its part
//! as a host). Its signal handlers are installed first, whatever the configuration: SIGHUP
//! reloads the tags (and never stops the agent, with or without a mesh); SIGTERM or SIGINT
//! leaves the mesh gracefully and stops the agent, leaving services running for the next
//! agent to adopt.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::blobs::{self, BundleStore};
use crate::config::AgentConfig;
use crate::fleet::host::HostSide;
use crate::fleet::intent::Executed;
use crate::fleet::service::Fleet;
use crate::hooks::HookRuntime;
use crate::identity::Identity;
use crate::identity::sign::CertVerifier;
use crate::lifecycle::LocalHost;
use crate::mesh::frame::Protocol;
use crate::mesh::hoststate::LogRecord;
use crate::mesh::local::{add_problems, apps_on_disk};
use crate::mesh::node::{LocalState, Mesh, NodeConfig};

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// The agent's TOML configuration (see docs/config.md).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

pub async fn run(args: AgentArgs) -> Result<bool> {
    // Before anything else: a signal that arrives while the agent starts is handled, not
    // fatal (SIGHUP's default action would end the agent).
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let hup = signal(SignalKind::hangup())?;
    let config = AgentConfig::load(&args.config)?;
    std::fs::create_dir_all(&config.data_dir)?;
    let host = Arc::new(LocalHost {
        hooks: Arc::new(HookRuntime::new(&config.data_dir.join("cache/hooks"))?),
        data_dir: config.data_dir.clone(),
        install_root: config.install_root.clone(),
        host_name: config.name.clone(),
        tags: config.tags.clone(),
        keep_releases: config.keep_releases,
    });
    // Everything runs until this flips.
    let (stopping, stopped) = watch::channel(false);
    let until_stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let problems = crate::lifecycle::supervise::Problems::default();
    let mut hup = Some(hup);
    // Bound now, so a taken address fails the start with a clear error.
    let metrics_listener = match config.metrics {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("metrics = \"{addr}\": cannot listen there"))?,
        ),
        None => None,
    };
    let mut metrics_sources = crate::http::server::Sources::default();

    let mesh = match &config.identity {
        Some(dir) => {
            let identity = Identity::load(dir)?;
            let ca = identity.ca.clone();
            let advertise = config.advertised_addr()?;
            let node_config = NodeConfig {
                name: config.name.clone(),
                listen: config.listen,
                advertise,
                identity,
                seeds: config.seeds.clone(),
                data_dir: config.data_dir.clone(),
                forget_dead_after: crate::config::parse_duration(&config.forget_dead_after)?,
            };
            let initial = LocalState {
                tags: config.tags.clone(),
                apps: apps_on_disk(&config.data_dir),
                log: None,
            };
            let fetching = Arc::new(blobs::Fetching::default());
            let (local_tx, local_rx) = watch::channel(initial.clone());
            let (log_tx, log_rx) = watch::channel(None);
            let (tags_tx, tags_rx) = watch::channel(config.tags.clone());
            tokio::spawn(report_local(
                Reporting {
                    path: args.config.clone(),
                    config: config.clone(),
                    problems: problems.clone(),
                    hup: hup.take().expect("one mesh"),
                    fetching: fetching.clone(),
                },
                local_tx,
                log_rx,
                tags_tx,
                stopped.clone(),
            ));
            let mesh = Mesh::bind(node_config, initial)?;
            let handle = mesh.handle();
            let bundles = Arc::new(BundleStore::new(&config.data_dir));
            // What a kill left half-received or half-packed.
            if let Err(e) = bundles.remove_leftovers() {
                tracing::warn!("bundle store: {e}");
            }
            let chunks = crate::chunks::ChunkStore::open(&config.data_dir)?;
            let rate = |r: &Option<String>| -> anyhow::Result<Arc<blobs::rate::Rate>> {
                let r = r.as_deref().map(crate::config::parse_size).transpose()?;
                Ok(Arc::new(blobs::rate::Rate::new(r)))
            };
            tokio::spawn(blobs::serve(
                blobs::Serving {
                    bundles: bundles.clone(),
                    data_dir: config.data_dir.clone(),
                    chunks: chunks.clone(),
                    fetching: fetching.clone(),
                    max_uploads: config.transfer.uploads_at_once(),
                    upload_rate: rate(&config.transfer.upload_rate)?,
                },
                handle.serve(Protocol::Blobs),
            ));
            let swarmer = blobs::Swarmer {
                name: config.name.clone(),
                mesh: handle.clone(),
                bundles: bundles.clone(),
                chunks,
                fetching: fetching.clone(),
                config: config.transfer.swarm_config(),
                from_peers: config.transfer.from_peers,
                download_rate: rate(&config.transfer.download_rate)?,
                data_dir: config.data_dir.clone(),
                keep_releases: config.keep_releases,
                store_limit: config
                    .transfer
                    .store_limit
                    .as_deref()
                    .map(crate::config::parse_size)
                    .transpose()?,
            };
            // What an earlier life left beyond the bounds (a limit lowered, say).
            {
                let swarmer = swarmer.clone();
                tokio::spawn(async move {
                    if let Err(e) = swarmer.collect().await {
                        tracing::warn!("collecting the stores at start: {e}");
                    }
                });
            }
            tokio::spawn(crate::logs::server::serve(
                config.data_dir.clone(),
                handle.serve(Protocol::Logs),
            ));
            let executed = {
                let dir = config.data_dir.join("executed");
                tokio::task::spawn_blocking(move || Executed::open(&dir)).await??
            };
            let side = Arc::new(
                HostSide::new(
                    config.name.clone(),
                    host.clone(),
                    handle.clone(),
                    bundles.clone(),
                    CertVerifier::new(ca.clone()),
                    executed,
                    tags_rx,
                )
                .with_ports(config.ports.clone())
                .with_swarm(swarmer.clone()),
            );
            let fleet: Arc<Fleet> = Fleet::start(
                &config.data_dir,
                advertise,
                handle.clone(),
                side,
                ca,
                log_tx,
                config.webhooks.clone(),
            )
            .await?;
            tokio::spawn(crate::api::serve(
                handle.clone(),
                handle.serve(Protocol::Api),
                crate::api::Services {
                    fleet: fleet.clone(),
                    bundles,
                    data_dir: config.data_dir.clone(),
                    swarm: Some(swarmer),
                },
            ));
            tokio::spawn(crate::mesh::revocation::serve(
                handle.clone(),
                handle.serve(Protocol::Revocations),
            ));
            metrics_sources = crate::http::server::Sources {
                mesh: Some(handle.clone()),
                fleet: Some(fleet),
            };
            let stop = until_stopped(stopped.clone());
            Some(tokio::spawn(mesh.run(local_rx, stop)))
        }
        None => {
            tracing::warn!("no `identity` in the configuration: running alone, outside any mesh");
            None
        }
    };
    if let Some(listener) = metrics_listener {
        tracing::info!(addr = ?listener.local_addr().ok(), "serving metrics at /metrics");
        tokio::spawn(crate::http::server::serve(
            listener,
            metrics_sources,
            stopped.clone(),
        ));
    }
    tracing::info!(name = %config.name, data_dir = %config.data_dir.display(), "agent started");

    if let Some(mut hup) = hup {
        // Alone, there are no tags to tell anyone: SIGHUP is acknowledged, nothing more.
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stopped.wait_for(|s| *s) => return,
                    _ = hup.recv() => tracing::info!("SIGHUP: running alone, there is nothing to reload"),
                }
            }
        });
    }
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("stopping; services keep running");
        let _ = stopping.send(true);
    });
    crate::lifecycle::supervise::supervise(host, problems, stopped.clone()).await;
    if let Some(mesh) = mesh {
        mesh.await??;
    }
    Ok(true)
}

/// What [`report_local`] reads: the configuration file (reloaded on `hup`) and the
/// supervisor's problems.
struct Reporting {
    path: PathBuf,
    config: AgentConfig,
    problems: crate::lifecycle::supervise::Problems,
    hup: tokio::signal::unix::Signal,
    /// Revisions being fetched as chunks, told in gossip.
    fetching: Arc<blobs::Fetching>,
}

/// Tells the mesh what this host runs (polling the lifecycle's state on disk, with the
/// supervisor's problems), its tags (reloaded from the configuration on SIGHUP; also told
/// to the fleet's host side) and its part in the deployment log.
async fn report_local(
    Reporting {
        path,
        mut config,
        problems,
        mut hup,
        fetching,
    }: Reporting,
    tx: watch::Sender<LocalState>,
    log: watch::Receiver<Option<LogRecord>>,
    tags: watch::Sender<std::collections::BTreeMap<String, String>>,
    mut stopped: watch::Receiver<bool>,
) {
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
        tags.send_if_modified(|current| {
            let changed = *current != config.tags;
            current.clone_from(&config.tags);
            changed
        });
        let mut apps = apps_on_disk(&config.data_dir);
        add_problems(&mut apps, &problems.lock().expect("problems lock"));
        crate::mesh::local::add_fetching(&mut apps, &fetching.apps());
        let state = LocalState {
            tags: config.tags.clone(),
            apps,
            log: log.borrow().clone(),
        };
        tx.send_if_modified(|current| {
            let changed = *current != state;
            *current = state;
            changed
        });
    }
}
