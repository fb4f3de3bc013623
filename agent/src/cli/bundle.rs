//! `shoal bundle create` packs a revision and prints its id; `shoal bundle check` unpacks one
//! under the deployment rules and reports its AppSpec's problems without deploying.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde::Serialize;

use crate::bundle::{self, Limits};

#[derive(Subcommand, Debug)]
pub enum BundleCommand {
    /// Pack DIR into an archive (format from the name: .tar, .tar.gz, .tgz, .tar.zst, .zip) and print the revision id.
    Create(CreateArgs),
    /// Read a bundle (directory or archive) as a deployment would, and list its AppSpec's problems.
    Check(CheckArgs),
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// The revision directory (with appspec.yml at its root).
    pub dir: PathBuf,
    /// The archive to write.
    #[arg(short, long)]
    pub output: PathBuf,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The bundle: a directory or an archive.
    pub bundle: PathBuf,
}

#[derive(Serialize)]
struct Created<'a> {
    id: &'a str,
    path: &'a std::path::Path,
}

pub fn run(cmd: BundleCommand, json: bool) -> Result<bool> {
    match cmd {
        BundleCommand::Create(args) => {
            let progress = super::spinner(&format!("packing {}", args.dir.display()));
            let id = bundle::create(&args.dir, &args.output);
            progress.finish_and_clear();
            let id = id.with_context(|| format!("packing {}", args.dir.display()))?;
            if json {
                super::print_json(&Created {
                    id: &id.0,
                    path: &args.output,
                })?;
            } else {
                println!("{id}");
            }
            Ok(true)
        }
        BundleCommand::Check(args) => {
            let scratch = tempfile::tempdir().context("creating a scratch directory")?;
            let progress = super::spinner(&format!("reading {}", args.bundle.display()));
            let opened = bundle::open(
                &args.bundle,
                &scratch.path().join("revision"),
                &Limits::default(),
            );
            progress.finish_and_clear();
            let b =
                opened.with_context(|| format!("reading the bundle {}", args.bundle.display()))?;
            let deployable = b.appspec.deployable().is_ok();
            if json {
                super::print_json(&serde_json::json!({
                    "id": b.id,
                    "deployable": deployable,
                    "appspec": b.appspec,
                }))?;
            } else {
                println!("revision {}", b.id);
                for p in &b.appspec.problems {
                    println!("{p}");
                }
                let hooks: usize = b.appspec.hooks.values().map(Vec::len).sum();
                println!(
                    "{} file mapping(s), {} permission rule(s), {hooks} hook(s)",
                    b.appspec.files.len(),
                    b.appspec.permissions.len()
                );
            }
            if !deployable {
                let n = b.appspec.errors().count();
                eprintln!("error: the AppSpec has {n} error(s): Shoal will not deploy this bundle");
            }
            Ok(deployable)
        }
    }
}
