//! `shoal logs ID [--host NAME] [--event EVENT] [--follow]`: a fleet deployment's whole
//! hook logs, from whichever hosts ran them, through the agent at `--peer`. They stream
//! as they arrive (a log may be large), each file under a `==> host event (file) <==`
//! header; `--follow` goes on until the deployment has ended.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, anyhow};
use clap::Args;
use serde::Serialize;

use crate::api::{self, Request, Response};
use crate::hooks::LifecycleEvent;
use crate::logs::relay::{FOLLOW_WITHIN, LogsQuery, ONCE_WITHIN};

#[derive(Args, Debug)]
pub struct LogsArgs {
    /// The deployment's id.
    pub id: String,
    /// Only this host's logs.
    #[arg(long, value_name = "NAME")]
    pub host: Option<String>,
    /// Only the hooks of this lifecycle event (`ValidateService`, ...).
    #[arg(long, value_name = "EVENT")]
    pub event: Option<String>,
    /// Keep going as hooks run, until the deployment has ended.
    #[arg(long)]
    pub follow: bool,
}

/// One log file, as `--json` prints it.
#[derive(Serialize)]
struct LogFile {
    host: String,
    event: String,
    file: String,
    /// Its text (invalid UTF-8 replaced).
    text: String,
}

pub async fn run(args: LogsArgs, peer: &str, identity: Option<&Path>, json: bool) -> Result<bool> {
    let identity = identity.ok_or_else(|| {
        anyhow!(
            "`shoal logs` needs an operator identity: pass --identity DIR or set SHOAL_IDENTITY"
        )
    })?;
    // Hosts compare the event's own spelling: send that, whatever case was typed.
    let event = match &args.event {
        Some(event) => Some(
            event
                .parse::<LifecycleEvent>()
                .map_err(|e| anyhow!("--event {event:?}: {e}"))?
                .to_string(),
        ),
        None => None,
    };
    let addr = super::hosts::resolve(peer)?;
    let query = LogsQuery {
        deployment: args.id.clone(),
        host: args.host.clone(),
        event,
        follow: args.follow,
    };
    let within = if args.follow {
        FOLLOW_WITHIN
    } else {
        ONCE_WITHIN
    };
    let mut gaps: Vec<(String, String)> = Vec::new();
    let mut files: BTreeMap<(String, String), LogFile> = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    let stdout = std::io::stdout();
    let mut sink = |part: Response| -> Result<()> {
        match part {
            Response::Log { host, chunk } => {
                let key = (host.clone(), chunk.file.clone());
                if json {
                    files
                        .entry(key)
                        .or_insert_with(|| LogFile {
                            host,
                            event: chunk.event.clone(),
                            file: chunk.file.clone(),
                            text: String::new(),
                        })
                        .text
                        .push_str(&String::from_utf8_lossy(&chunk.bytes));
                    return Ok(());
                }
                let mut out = stdout.lock();
                if current.as_ref() != Some(&key) {
                    writeln!(
                        out,
                        "==> {} {} ({}) <==",
                        super::printable(&host),
                        super::printable(&chunk.event),
                        super::printable(&chunk.file)
                    )?;
                    current = Some(key);
                }
                out.write_all(&chunk.bytes)?;
                out.flush()?;
            }
            Response::LogGap { host, reason } => {
                eprintln!(
                    "warning: no logs from {}: {}",
                    super::printable(&host),
                    super::printable(&reason)
                );
                gaps.push((host, reason));
            }
            _ => {}
        }
        Ok(())
    };
    api::ask_streaming(
        addr,
        super::hosts::named_host(peer),
        identity,
        &Request::Logs(query),
        within,
        &mut sink,
    )
    .await
    .with_context(|| format!("the logs of deployment {}", args.id))?;
    if json {
        super::print_json(&serde_json::json!({
            "files": files.into_values().collect::<Vec<_>>(),
            "gaps": gaps
                .iter()
                .map(|(host, reason)| serde_json::json!({ "host": host, "reason": reason }))
                .collect::<Vec<_>>(),
        }))?;
    }
    Ok(gaps.is_empty())
}
