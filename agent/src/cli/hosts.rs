//! `shoal hosts`: every member of the mesh as the agent at `--peer` sees it: name, address,
//! state (alive, suspect, dead, left), tags and applications (with the problem its
//! supervisor reports for one, if any). Needs an operator identity.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};

use crate::api::{self, Answer, HostView, Request};

pub async fn run(peer: &str, identity: Option<&Path>, json: bool) -> Result<bool> {
    let identity = identity.ok_or_else(|| {
        anyhow!(
            "`shoal hosts` needs an operator identity: pass --identity DIR or set SHOAL_IDENTITY"
        )
    })?;
    let addr = resolve(peer)?;
    let expect = named_host(peer);
    let Answer::Hosts(hosts) = api::ask(addr, expect, identity, None, &Request::Hosts).await?
    else {
        bail!("{peer} answered something other than the hosts");
    };
    if json {
        super::print_json(&hosts)?;
    } else {
        print!("{}", table(&hosts));
    }
    Ok(true)
}

/// The host part of `HOST:PORT` when it is a name, not an address: the agent the operator
/// means, whose certificate must carry that name.
pub fn named_host(peer: &str) -> Option<&str> {
    let (host, _) = peer.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (host.parse::<std::net::IpAddr>().is_err() && host != "localhost").then_some(host)
}

/// `HOST:PORT`, with a name resolved, or an address.
pub fn resolve(peer: &str) -> Result<SocketAddr> {
    peer.to_socket_addrs()
        .with_context(|| format!("`{peer}` is not HOST:PORT"))?
        .next()
        .ok_or_else(|| anyhow!("`{peer}` resolves to no address"))
}

fn table(hosts: &[HostView]) -> String {
    let rows: Vec<[String; 5]> = hosts
        .iter()
        .map(|h| {
            let tags = h
                .tags
                .iter()
                .map(|(k, v)| format!("{}={}", super::printable(k), super::printable(v)))
                .collect::<Vec<_>>()
                .join(",");
            let apps = h
                .details
                .iter()
                .map(|(app, a)| {
                    let rev = a.revision.as_deref().map_or("-".to_string(), super::short);
                    match &a.problem {
                        None => {
                            format!("{}@{rev} ({})", super::printable(app), a.health.as_str())
                        }
                        Some(p) => format!(
                            "{}@{rev} ({}; problem: {})",
                            super::printable(app),
                            a.health.as_str(),
                            super::printable(p)
                        ),
                    }
                })
                .collect::<Vec<_>>()
                .join(", ");
            [
                super::printable(&h.name),
                h.addr.to_string(),
                h.state.as_str().to_string(),
                if tags.is_empty() { "-".into() } else { tags },
                if apps.is_empty() { "-".into() } else { apps },
            ]
        })
        .collect();
    let header = ["NAME", "ADDRESS", "STATE", "TAGS", "APPS"].map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(rows.iter()) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::hoststate::{AppRecord, Health};
    use crate::mesh::view::MemberState;

    #[test]
    fn an_application_problem_is_shown_escaped() {
        let app = |problem: Option<&str>| AppRecord {
            revision: Some("ab".repeat(32)),
            health: Health::Stopped,
            held: Default::default(),
            problem: problem.map(String::from),
            restarts: 0,
            fetching: None,
        };
        let host = HostView {
            name: "edge-1".into(),
            addr: "10.0.0.5:7400".parse().unwrap(),
            state: MemberState::Alive,
            tags: Default::default(),
            apps: Default::default(),
            details: [
                ("a".to_string(), app(Some("recovering: \u{1b}[31mno"))),
                ("b".to_string(), app(None)),
            ]
            .into(),
            log: None,
            version: 1,
        };
        let text = table(&[host]);
        assert!(
            text.contains("(stopped; problem: recovering: \\u{1b}[31mno)"),
            "{text}"
        );
        assert!(text.contains("(stopped)"), "{text}");
        assert!(!text.contains('\u{1b}'));
    }
}
