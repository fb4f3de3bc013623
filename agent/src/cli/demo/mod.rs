//! `shoal demo`: built-in demonstrations that need no configuration and no files; what
//! they use is embedded in the binary.
//!
//! - [`fleet`] (the default): five agents on loopback, the example inference app rolled
//!   out with canaries under load, and a bad revision rolled back by itself.
//! - [`local`] (`--local`): one host, and the hook sandbox.

mod fleet;
mod load;
mod local;

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// The single-host tour instead: deployments with `deploy local`, then the hook
    /// sandbox.
    #[arg(long, conflicts_with_all = ["keep", "stop"])]
    pub local: bool,
    /// Leave the fleet running afterwards, with its CA, operator identity, agent configs
    /// and the example revisions as bundles in DIR (new or empty), and print the commands
    /// to carry on by hand.
    #[arg(long, value_name = "DIR")]
    pub keep: Option<PathBuf>,
    /// Stop a fleet that `--keep DIR` left running: its agents, then their services.
    #[arg(long, value_name = "DIR", conflicts_with = "keep")]
    pub stop: Option<PathBuf>,
}

pub async fn run(args: DemoArgs, json: bool) -> Result<bool> {
    if args.local {
        return local::run(json).await;
    }
    if let Some(dir) = &args.stop {
        return fleet::stop(dir, json);
    }
    let scratch;
    let (dir, keep) = match &args.keep {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            if std::fs::read_dir(dir)?.next().is_some() {
                bail!(
                    "{} is not empty: --keep needs a new or empty directory (a kept fleet \
                     there is stopped with `shoal demo --stop {}`)",
                    dir.display(),
                    dir.display()
                );
            }
            (std::path::absolute(dir)?, true)
        }
        None => {
            scratch = tempfile::Builder::new()
                .prefix("shoal-demo-")
                .tempdir()
                .context("creating the demo's scratch directory")?;
            (scratch.path().to_path_buf(), false)
        }
    };
    // Ctrl-C drops the demo, and with it the fleet: its agents and services are stopped
    // (unless kept) before the scratch directory goes.
    tokio::select! {
        done = fleet::run(&dir, keep, json) => done,
        _ = tokio::signal::ctrl_c() => {
            bail!("interrupted{}", if keep {
                format!(": the fleet keeps running; stop it with `shoal demo --stop {}`", dir.display())
            } else {
                ": everything the demo started is stopped".to_string()
            })
        }
    }
}
