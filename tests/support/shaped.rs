//! Hosts on shaped links, for the swarm's test and benchmark: each agent in its own
//! network namespace, joined to the others through a bridge in a hub namespace by a veth
//! pair whose two ends are shaped by `tc` (token bucket filters: the host's upload on its
//! end, its download on the hub's), so every host has `mbit` up and `mbit` down. Then the
//! experiment both run: one revision to every host through the swarm, and (after the hosts
//! start again, empty, with `transfer.from_peers = false`) another of the same size from
//! the uploader alone, timed against S/B.
//!
//! Everything made is deleted on drop (the namespaces, and with them the links); the
//! agents run only inside the namespaces, on addresses of their own.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::fleet::{Agent, Ca, in_netns, json, tag, wait_for};

/// The namespaces of one shaped network.
pub struct ShapedNet {
    pub prefix: String,
    pub hosts: usize,
    /// The second octet of the 10.x.0.0/24 the hosts are on.
    pub net: u8,
}

fn sh(args: &[&str]) -> Result<(), String> {
    let o = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{args:?}: {e}"))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

impl ShapedNet {
    /// `hosts` namespaces `<prefix>-<i>` at 10.`net`.0.`i+1`, each link shaped to `mbit`
    /// both ways; or why it cannot be made here (not root, no `ip` or `tc`).
    pub fn create(prefix: &str, net: u8, hosts: usize, mbit: u32) -> Result<ShapedNet, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("network namespaces need root".into());
        }
        let made = ShapedNet {
            prefix: prefix.to_string(),
            hosts,
            net,
        };
        made.delete();
        let hub = made.hub();
        sh(&["ip", "netns", "add", &hub])?;
        sh(&["ip", "-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        sh(&["ip", "-n", &hub, "link", "set", "br0", "up"])?;
        let rate = format!("{mbit}mbit");
        // A burst of a few milliseconds at the rate (at least 32 KiB), and room to queue
        // 100 ms of it.
        let burst = format!("{}", (mbit as usize * 1000 / 8 * 4).max(32 * 1024));
        for i in 0..hosts {
            let ns = made.ns(i);
            let (here, there) = ("eth0".to_string(), format!("h{i}"));
            sh(&["ip", "netns", "add", &ns])?;
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
            sh(&[
                "ip", "-n", &hub, "link", "add", &there, "type", "veth", "peer", "name", &here,
                "netns", &ns,
            ])?;
            sh(&["ip", "-n", &hub, "link", "set", &there, "master", "br0"])?;
            sh(&["ip", "-n", &hub, "link", "set", &there, "up"])?;
            let addr = format!("{}/24", made.addr(i).ip());
            sh(&["ip", "-n", &ns, "addr", "add", &addr, "dev", &here])?;
            sh(&["ip", "-n", &ns, "link", "set", &here, "up"])?;
            for (space, dev) in [(&ns, &here), (&hub, &there)] {
                sh(&[
                    "ip", "netns", "exec", space, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                    "rate", &rate, "burst", &burst, "latency", "100ms",
                ])?;
            }
        }
        Ok(made)
    }

    pub fn hub(&self) -> String {
        format!("{}-hub", self.prefix)
    }

    pub fn ns(&self, i: usize) -> String {
        format!("{}-{i}", self.prefix)
    }

    pub fn addr(&self, i: usize) -> SocketAddr {
        SocketAddr::from(([10, self.net, 0, i as u8 + 1], 7400))
    }

    fn delete(&self) {
        for i in 0..self.hosts {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(i)])
                .output();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.hub()])
            .output();
    }
}

impl Drop for ShapedNet {
    fn drop(&mut self) {
        self.delete();
    }
}

/// One mode's run: seconds from the deployment's creation to each host's fetch done, the
/// bytes of chunks the uploader sent, and what every link carried over time.
#[derive(Debug, Clone)]
pub struct Run {
    pub per_host: Vec<(String, f64)>,
    pub last: f64,
    pub uploader_sent: u64,
    pub links: Vec<Sample>,
    /// Summed over every agent, the deaths it saw and its own rejoins
    /// (`shoal_mesh_member_changes_total`): every agent was up all along, so each is a
    /// failure detection fooled by the load. One false death seen by all 16 others of a
    /// 17-agent mesh, and the victim's rejoin, count 17.
    pub false_deaths_seen: u64,
}

/// What every link had carried by `at` seconds after the deployment's creation: per host
/// (the uploader last), bytes it sent and bytes it received, counted on the hub's end of
/// its link (every packet: QUIC's headers and acknowledgements, and gossip, too).
#[derive(Debug, Clone)]
pub struct Sample {
    pub at: f64,
    pub links: Vec<(u64, u64)>,
}

impl ShapedNet {
    /// Every host's link's bytes (sent, received) so far, or `None` if `ip` did not say.
    pub fn link_bytes(&self) -> Option<Vec<(u64, u64)>> {
        let o = Command::new("ip")
            .args(["-n", &self.hub(), "-s", "-j", "link", "show"])
            .output()
            .ok()?;
        let list: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
        let mut out = vec![(0, 0); self.hosts];
        for link in list.as_array()? {
            let Some(i) = link["ifname"]
                .as_str()
                .and_then(|n| n.strip_prefix('h'))
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|i| *i < self.hosts)
            else {
                continue;
            };
            // The hub's end: what it receives is what the host sent.
            let stats = &link["stats64"];
            out[i] = (
                stats["rx"]["bytes"].as_u64()?,
                stats["tx"]["bytes"].as_u64()?,
            );
        }
        Some(out)
    }
}

/// One second of a run's links, in Mbit/s: see [`timeline`].
#[derive(Debug, Clone, Copy)]
pub struct Second {
    /// Seconds after the deployment's creation, at its end.
    pub at: f64,
    /// What the uploader sent.
    pub up: f64,
    /// What the hosts not yet done received: their mean, and the lowest.
    pub mean: f64,
    pub low: f64,
    /// Hosts done by then.
    pub done: usize,
}

/// Per second from the first sample: the uploader's sending rate and the receiving rates
/// of the hosts not yet done (mean and lowest), in Mbit/s, and how many hosts were done by
/// then.
pub fn timeline(run: &Run) -> Vec<Second> {
    let mut rows = Vec::new();
    let mut prev: Option<&Sample> = None;
    for s in &run.links {
        let Some(p) = prev else {
            prev = Some(s);
            continue;
        };
        if s.at - p.at < 0.999 {
            continue;
        }
        let secs = s.at - p.at;
        let mbit = |a: u64, b: u64| (b.saturating_sub(a)) as f64 * 8.0 / secs / 1e6;
        let n = s.links.len() - 1;
        let up = mbit(p.links[n].0, s.links[n].0);
        let down: Vec<f64> = (0..n)
            .filter(|i| run.per_host[*i].1 > p.at)
            .map(|i| mbit(p.links[i].1, s.links[i].1))
            .collect();
        let mean = down.iter().sum::<f64>() / down.len().max(1) as f64;
        let low = if down.is_empty() {
            0.0
        } else {
            down.iter().copied().fold(f64::INFINITY, f64::min)
        };
        let done = run.per_host.iter().filter(|(_, t)| *t <= s.at).count();
        rows.push(Second {
            at: s.at,
            up,
            mean,
            low,
            done,
        });
        prev = Some(s);
    }
    rows
}

/// The experiment's result.
#[derive(Debug, Clone)]
pub struct Report {
    pub hosts: usize,
    pub bytes: u64,
    pub mbit: u32,
    /// S/B: the revision's bytes at one host's download rate, in seconds.
    pub limit: f64,
    pub swarm: Run,
    pub origin_only: Run,
}

/// Deterministic bytes that do not compress.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// `hosts` targets and one uploader on `net`, a revision of `bytes` of noise through the
/// swarm, then another through the uploader alone; see the module documentation.
pub fn swarm_against_origin(root: &Path, net: &ShapedNet, bytes: usize, mbit: u32) -> Report {
    let hosts = net.hosts - 1;
    let ca = Ca::new(root, "shaped");
    let seed = net.addr(hosts);
    let mut fleet: Vec<Agent> = (0..=hosts)
        .map(|i| {
            let name = if i == hosts {
                "uploader".to_string()
            } else {
                format!("host-{}", i + 1)
            };
            let mut a = Agent::new(root, &ca, &name, net.addr(i), &[seed]);
            a.netns = Some(net.ns(i));
            tag(&a, &[("role", if i == hosts { "uploader" } else { "web" })]);
            a
        })
        .collect();
    let metrics = |a: &Agent| SocketAddr::new(a.addr.ip(), 9464);
    for a in &fleet {
        let text = std::fs::read_to_string(&a.config).unwrap();
        let (head, tags) = text.split_once("[tags]").unwrap();
        std::fs::write(
            &a.config,
            format!("{head}metrics = \"{}\"\n[tags]{tags}", metrics(a)),
        )
        .unwrap();
    }
    let mut runs = Vec::new();
    for (mode, from_peers) in [("swarm", true), ("origin-only", false)] {
        // All stopped before any starts again: a restarted agent must not get the other
        // run's deployment log back from one still running.
        for a in fleet.iter_mut() {
            a.kill();
        }
        for a in fleet.iter_mut() {
            // Empty stores: nothing of the other run is held.
            let _ = std::fs::remove_dir_all(&a.data_dir);
            let _ = std::fs::remove_dir_all(&a.install_root);
            let text = std::fs::read_to_string(&a.config).unwrap();
            let text = text.split("[transfer]").next().unwrap().to_string();
            std::fs::write(
                &a.config,
                format!("{text}[transfer]\nfrom_peers = {from_peers}\n"),
            )
            .unwrap();
            let _ = std::fs::write(&a.log, "");
            a.start();
        }
        let viewer = &fleet[hosts];
        wait_for("every agent alive", Duration::from_secs(120), || {
            crate::fleet::hosts_in(viewer.netns.as_deref(), viewer.addr, &ca.operator)
                .is_ok_and(|l| l.len() == hosts + 1 && l.iter().all(|h| h["state"] == "alive"))
        });
        let dir = revision_with(root, mode, &noise(bytes, 1 + from_peers as u64));
        // Uploaded to the uploader from its own namespace (not over a shaped link); timed
        // from the deployment's creation (`created_at_ms`, this machine's clock).
        let created = in_netns(viewer.netns.as_deref())
            .args(["deploy", "create", "--app", "tiny", "--json", "--peer"])
            .arg(viewer.addr.to_string())
            .arg("--identity")
            .arg(&ca.operator)
            .arg("--bundle")
            .arg(&dir)
            .args(["--targets", "role=web", "--config", "AllAtOnce"])
            .output()
            .unwrap();
        let view = json(&created, "deploy create");
        let created_ms = view["created_at_ms"].as_u64().expect("created_at_ms");
        let since_created = || {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64;
            now.saturating_sub(created_ms) as f64 / 1000.0
        };
        let mut done: Vec<Option<f64>> = vec![None; hosts];
        let mut links: Vec<Sample> = Vec::new();
        wait_for(
            &format!("every host to fetch the revision ({mode})"),
            Duration::from_secs(1800),
            || {
                let at = since_created();
                if links.last().is_none_or(|l| at - l.at >= 0.5)
                    && let Some(bytes) = net.link_bytes()
                {
                    links.push(Sample { at, links: bytes });
                }
                for (i, a) in fleet[..hosts].iter().enumerate() {
                    if done[i].is_some() {
                        continue;
                    }
                    let log = a.log_text();
                    if log.contains("fetched a revision as chunks") {
                        done[i] = Some(since_created());
                    }
                    // Said at once, not waited out: the swarm is what is measured.
                    assert!(
                        !log.contains("did not come as chunks"),
                        "{} fell back to the whole bundle ({mode}):\n{}",
                        a.name,
                        log.lines()
                            .filter(|l| l.contains("WARN"))
                            .collect::<Vec<_>>()
                            .join("\n")
                    );
                }
                done.iter().all(Option::is_some)
            },
        );
        let per_host: Vec<(String, f64)> = fleet[..hosts]
            .iter()
            .zip(&done)
            .map(|(a, t)| (a.name.clone(), t.unwrap()))
            .collect();
        let last = per_host.iter().map(|(_, t)| *t).fold(0.0, f64::max);
        let uploader_sent = metric(
            viewer,
            metrics(viewer),
            "shoal_bundle_bytes_total{direction=\"sent\"}",
        )
        .unwrap_or(0);
        let false_deaths_seen = fleet
            .iter()
            .map(|a| {
                ["dead", "rejoined"]
                    .iter()
                    .map(|kind| {
                        let name = format!("shoal_mesh_member_changes_total{{kind=\"{kind}\"}}");
                        metric(a, metrics(a), &name)
                            .unwrap_or_else(|| panic!("{} does not show {name}", a.name))
                    })
                    .sum::<u64>()
            })
            .sum();
        if let Some(bytes) = net.link_bytes() {
            links.push(Sample {
                at: since_created(),
                links: bytes,
            });
        }
        runs.push(Run {
            per_host,
            last,
            uploader_sent,
            links,
            false_deaths_seen,
        });
    }
    let origin_only = runs.pop().unwrap();
    let swarm = runs.pop().unwrap();
    Report {
        hosts,
        bytes: bytes as u64,
        mbit,
        limit: bytes as f64 * 8.0 / (f64::from(mbit) * 1e6),
        swarm,
        origin_only,
    }
}

/// A revision of `tiny` (the fleet tests' app) carrying `model`.
fn revision_with(root: &Path, name: &str, model: &[u8]) -> PathBuf {
    let dir = crate::fleet::revision(root, name);
    std::fs::write(dir.join("model.bin"), model).unwrap();
    dir
}

/// The value of the metric `name` (with its labels) of `agent`, read from inside its
/// namespace; `None` if the agent does not show it. A scrape that fails is a panic.
fn metric(agent: &Agent, metrics: SocketAddr, name: &str) -> Option<u64> {
    let o = Command::new("ip")
        .args([
            "netns",
            "exec",
            agent.netns.as_deref().unwrap(),
            "curl",
            "-sf",
        ])
        .arg(format!("http://{metrics}/metrics"))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "scraping {}'s metrics: {}",
        agent.name,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .find(|l| l.split_once(' ').is_some_and(|(n, _)| n == name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
}
