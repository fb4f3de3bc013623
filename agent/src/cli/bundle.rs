//! `shoal bundle create` packs a revision and prints its id; `shoal bundle check` unpacks one
//! under the deployment rules and reports its AppSpec's problems without deploying. Both
//! report the revision's content-defined chunks (decision 0023) and, with `--against`, how
//! much of it an earlier revision holds already: what a host that has it would not move.

use std::path::{Path, PathBuf};

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
    /// An earlier revision (directory or archive): report how much of this one it holds.
    #[arg(long, value_name = "BUNDLE")]
    pub against: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The bundle: a directory or an archive.
    pub bundle: PathBuf,
    /// An earlier revision (directory or archive): report how much of this one it holds.
    #[arg(long, value_name = "BUNDLE")]
    pub against: Option<PathBuf>,
}

#[derive(Serialize)]
struct Created<'a> {
    id: &'a str,
    path: &'a std::path::Path,
    chunks: &'a Chunks,
}

/// A revision's chunks, and what an earlier revision holds of them.
#[derive(Serialize)]
struct Chunks {
    /// Chunks in file order, distinct ones, and the bytes of the distinct ones.
    count: usize,
    distinct: usize,
    bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    against: Option<Against>,
    /// The revision the chunks make (checked against the packed id).
    #[serde(skip)]
    revision: bundle::RevisionId,
}

#[derive(Serialize)]
struct Against {
    revision: String,
    /// Bytes of this revision's chunks the earlier one holds, and those it lacks.
    reused_bytes: u64,
    fetch_bytes: u64,
    fetch_chunks: u64,
}

/// The chunk report of the revision unpacked at `root`, against the bundle `against`.
fn chunks(root: &Path, against: Option<&Path>) -> Result<Chunks> {
    let manifest = crate::chunks::Manifest::of_tree(root)
        .with_context(|| format!("cutting {} into chunks", root.display()))?;
    let delta = manifest.delta(|_| false);
    let against = match against {
        None => None,
        Some(path) => {
            let scratch = tempfile::tempdir().context("creating a scratch directory")?;
            let earlier = bundle::open(path, &scratch.path().join("revision"), &Limits::default())
                .with_context(|| format!("reading the earlier bundle {}", path.display()))?;
            let held = crate::chunks::Manifest::of_tree(&scratch.path().join("revision"))
                .with_context(|| format!("cutting {} into chunks", path.display()))?;
            let d = manifest.delta_from(&held);
            Some(Against {
                revision: earlier.id.0,
                reused_bytes: d.reused_bytes,
                fetch_bytes: d.fetch_bytes,
                fetch_chunks: d.fetch_chunks,
            })
        }
    };
    Ok(Chunks {
        count: manifest.chunks().count(),
        distinct: delta.chunks as usize,
        bytes: delta.bytes,
        against,
        revision: manifest.revision,
    })
}

/// The chunk report for people, on `out` (stdout for `check`; stderr for `create`, whose
/// stdout is the revision id alone, for scripts).
fn print_chunks(c: &Chunks, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    writeln!(
        out,
        "{} chunk(s), {} distinct, {:.1} MiB",
        c.count,
        c.distinct,
        mib(c.bytes)
    )?;
    if let Some(a) = &c.against {
        let share = if c.bytes == 0 {
            100.0
        } else {
            a.reused_bytes as f64 * 100.0 / c.bytes as f64
        };
        writeln!(
            out,
            "against {}: {:.1} MiB ({share:.0} %) held already, {:.1} MiB in {} chunk(s) to move",
            &a.revision[..a.revision.len().min(12)],
            mib(a.reused_bytes),
            mib(a.fetch_bytes),
            a.fetch_chunks
        )?;
    }
    Ok(())
}

pub fn run(cmd: BundleCommand, json: bool) -> Result<bool> {
    match cmd {
        BundleCommand::Create(args) => {
            // The chunks first: a bad `--against` is refused before anything is written.
            let progress = super::spinner("cutting the revision into chunks");
            let report = chunks(&args.dir, args.against.as_deref());
            progress.finish_and_clear();
            let report = report?;
            let progress = super::spinner(&format!("packing {}", args.dir.display()));
            let id = bundle::create(&args.dir, &args.output);
            progress.finish_and_clear();
            let id = id.with_context(|| format!("packing {}", args.dir.display()))?;
            if id != report.revision {
                let _ = std::fs::remove_file(&args.output);
                anyhow::bail!(
                    "{} changed while it was read (its chunks make revision {}, the archive \
                     {}): nothing was written; pack it again once it is still",
                    args.dir.display(),
                    report.revision,
                    id
                );
            }
            if json {
                super::print_json(&Created {
                    id: &id.0,
                    path: &args.output,
                    chunks: &report,
                })?;
            } else {
                println!("{id}");
                print_chunks(&report, &mut std::io::stderr())?;
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
            let progress = super::spinner("cutting the revision into chunks");
            let report = chunks(&scratch.path().join("revision"), args.against.as_deref());
            progress.finish_and_clear();
            let report = report?;
            if json {
                super::print_json(&serde_json::json!({
                    "id": b.id,
                    "deployable": deployable,
                    "appspec": b.appspec,
                    "chunks": report,
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
                print_chunks(&report, &mut std::io::stdout())?;
            }
            if !deployable {
                let n = b.appspec.errors().count();
                eprintln!("error: the AppSpec has {n} error(s): Shoal will not deploy this bundle");
            }
            Ok(deployable)
        }
    }
}
