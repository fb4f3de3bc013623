//! `shoal ca init` makes a fleet CA; `shoal ca issue` gives an agent or an operator an
//! identity signed by it.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::identity::{self, Role};

#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Create a fleet CA: DIR/ca.pem and DIR/ca.key (mode 0600).
    Init(InitArgs),
    /// Issue an identity (OUT/ca.pem, OUT/cert.pem, OUT/key.pem) for an agent or, with --operator, an operator.
    Issue(IssueArgs),
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

pub fn run(cmd: CaCommand, json: bool) -> Result<bool> {
    match cmd {
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
