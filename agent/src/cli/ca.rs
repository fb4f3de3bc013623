//! `shoal ca init` makes a fleet CA; `shoal ca issue` gives an agent or an operator an
//! identity signed by it; `shoal ca revoke` writes a revocation list signed by it, and
//! `shoal ca publish-revocations` hands that list to an agent, which spreads it.

use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow, bail};
use clap::{Args, Subcommand};

use crate::api::{self, Answer, Request};
use crate::identity::revocation::{self, Target};
use crate::identity::{self, Role};

#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Create a fleet CA: DIR/ca.pem and DIR/ca.key (mode 0600).
    Init(InitArgs),
    /// Issue an identity (OUT/ca.pem, OUT/cert.pem, OUT/key.pem) for an agent or, with --operator, an operator.
    Issue(IssueArgs),
    /// Revoke a name's certificates (or one by serial): writes DIR/revocations.crl, signed by the CA.
    Revoke(RevokeArgs),
    /// Hand a revocation list to the agent at --peer (operator identity); the mesh spreads it.
    PublishRevocations(PublishArgs),
}

#[derive(Args, Debug)]
#[group(required = true, multiple = false, id = "what")]
pub struct RevokeTarget {
    /// Every certificate this CA issued to the name.
    #[arg(long, group = "what")]
    pub name: Option<String>,
    /// One certificate, by its serial number in hex.
    #[arg(long, group = "what")]
    pub serial: Option<String>,
}

#[derive(Args, Debug)]
pub struct RevokeArgs {
    /// The fleet CA's directory.
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    #[command(flatten)]
    pub target: RevokeTarget,
}

#[derive(Args, Debug)]
pub struct PublishArgs {
    /// The list `shoal ca revoke` wrote (DIR/revocations.crl).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

#[derive(Args, Debug)]
pub struct InitArgs {
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct IssueArgs {
    /// The fleet CA's directory.
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// The agent's (host's) or operator's name.
    #[arg(long)]
    pub name: String,
    /// Issue an operator identity instead of an agent's.
    #[arg(long)]
    pub operator: bool,
    #[arg(long, value_name = "OUT")]
    pub out: PathBuf,
}

pub async fn run(cmd: CaCommand, peer: &str, operator: Option<&Path>, json: bool) -> Result<bool> {
    match cmd {
        CaCommand::Revoke(args) => {
            let target = match (&args.target.name, &args.target.serial) {
                (Some(name), _) => Target::Name(name),
                (None, Some(serial)) => Target::Serial(serial),
                (None, None) => bail!("say what to revoke: --name NAME or --serial HEX"),
            };
            let (path, number, added) = revocation::revoke(&args.dir, target)?;
            if json {
                super::print_json(
                    &serde_json::json!({ "list": path, "number": number, "revoked": added }),
                )?;
            } else {
                println!(
                    "revocation list {number} written to {} ({} certificate(s) newly revoked); \
                     hand it to the fleet with `shoal ca publish-revocations {}`",
                    path.display(),
                    added.len(),
                    path.display()
                );
            }
        }
        CaCommand::PublishRevocations(args) => {
            let operator = operator.ok_or_else(|| {
                anyhow!("publishing needs an operator identity: pass --identity DIR or set SHOAL_IDENTITY")
            })?;
            let der = revocation::read_list_file(&args.file)?;
            // The list itself decides who may take it: an agent it revokes is refused.
            let ca = identity::Identity::load(operator)?.ca;
            let list = revocation::RevocationList::verify(&der, &ca)
                .map_err(|e| anyhow!("{}: {e}", args.file.display()))?;
            let addr = super::hosts::resolve(peer)?;
            let expect = super::hosts::named_host(peer);
            let request = Request::PublishRevocations(der);
            let Answer::Published(number) =
                api::ask(addr, expect, operator, Some(&list), &request).await?
            else {
                bail!("{peer} answered something other than the list's number");
            };
            if json {
                super::print_json(&serde_json::json!({ "peer": peer, "number": number }))?;
            } else {
                println!("revocation list {number} is in force at {peer}; the mesh passes it on");
            }
        }
        CaCommand::Init(args) => {
            let cert = identity::init_ca(&args.dir)?;
            if json {
                super::print_json(
                    &serde_json::json!({ "ca": cert, "key": args.dir.join("ca.key") }),
                )?;
            } else {
                println!(
                    "fleet CA written to {} (keep {} secret)",
                    cert.display(),
                    args.dir.join("ca.key").display()
                );
            }
        }
        CaCommand::Issue(args) => {
            let role = if args.operator {
                Role::Operator
            } else {
                Role::Agent
            };
            identity::issue(&args.dir, &args.name, role, &args.out)?;
            if json {
                super::print_json(
                    &serde_json::json!({ "name": args.name, "role": role, "out": args.out }),
                )?;
            } else {
                println!(
                    "{role:?} identity for {} written to {}",
                    args.name,
                    args.out.display()
                );
            }
        }
    }
    Ok(true)
}
