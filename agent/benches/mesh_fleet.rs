//! Mesh benchmarks with real `shoal agent` processes on loopback (release build):
//! - propagation: a tag change at one agent (config rewritten, SIGHUP) until every other
//!   agent has logged the new version of its record;
//! - detection: `kill -9` of an agent until every other has logged it dead;
//! - idle cost: RSS, private memory (RSS less the binary's pages, which every `shoal`
//!   process shares) and CPU of each agent in the converged, idle mesh, against one agent
//!   run without the mesh (no identity) in the same run; packets each agent sends per
//!   second, counted outside it by nftables (skipped, with a note, where `nft` is missing);
//!   open connections per agent, from its own status line;
//! - the start-up storm: every agent is started at once, and members declared dead before
//!   the mesh converged are counted.
//!
//! `cargo bench -p shoal-agent --bench mesh_fleet` runs a 10-, a 50- and a 100-agent fleet;
//! `SHOAL_BENCH_FLEETS=8,20` picks other sizes. Results are printed as markdown, for
//! docs/benchmarks.md.

#[path = "../../tests/support/fleet.rs"]
mod fleet;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use fleet::{Agent, Ca, agents, hosts, wait_for};

const DEBUG_LOG: &str = "info,shoal_agent::mesh::node=debug,shoal_agent::mesh::core=debug";

fn main() {
    let sizes: Vec<usize> = std::env::var("SHOAL_BENCH_FLEETS")
        .unwrap_or_else(|_| "10,50,100".into())
        .split(',')
        .map(|s| s.trim().parse().expect("fleet sizes are numbers"))
        .collect();
    if std::env::args().any(|a| a == "--list") {
        return; // cargo test --benches asks for a listing: nothing to list
    }
    println!(
        "| agents | propagation: median / max (ms) | detection: median / max (ms) | idle RSS per agent: median / max (MiB) | RSS vs agent without mesh | private memory per agent: median / max (MiB) | idle CPU per agent (%) | idle packets/s per agent: median / max | open connections per agent: median / max | false deaths at start-up / while idle |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (k, n) in sizes.into_iter().enumerate() {
        run_fleet(n, 10 + k as u8);
    }
}

fn run_fleet(n: usize, net: u8) {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new(tmp.path(), "fleet");
    let mut fleet = agents(tmp.path(), &ca, [127, 88, net], n);
    for a in fleet.iter_mut() {
        a.log_filter = DEBUG_LOG.into();
        a.start();
    }
    // The alternative: an agent that runs alone (no identity, so no mesh).
    let mut alone = Agent::new(
        tmp.path(),
        &ca,
        "alone",
        SocketAddr::from(([127, 88, net, 250], 7400)),
        &[],
    );
    let text = std::fs::read_to_string(&alone.config).unwrap();
    let text: String = text
        .lines()
        .filter(|l| !l.starts_with("identity") && !l.starts_with("seeds"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&alone.config, text).unwrap();
    alone.start();

    let took = wait_for("the fleet to converge", Duration::from_secs(180), || {
        fleet.iter().all(|a| {
            hosts(a.addr, &ca.operator)
                .is_ok_and(|l| l.len() == n && l.iter().all(|h| h["state"] == "alive"))
        })
    });
    eprintln!("{n} agents converged; checked {took:?} after start");

    // Idle: once no agent has logged a member alive, dead or a rejoin for 10 s (a fleet
    // started at once keeps renaming members for a while after it converged), 10 s of CPU
    // and packets, and the RSS at the end.
    let settled = wait_for("the fleet to settle", Duration::from_secs(120), || {
        let quiet_since = SystemTime::now() - Duration::from_secs(10);
        fleet.iter().all(|a| {
            let log = a.log_text();
            ["member is alive", "member is dead", "rejoined"]
                .iter()
                .all(|n| last_time_of(&log, n).is_none_or(|t| t < quiet_since))
        })
    });
    eprintln!("settled {settled:?} after converging");
    let deaths_before = deaths(&fleet);
    let counters = Counters::install(&fleet);
    let cpu0: Vec<u64> = fleet.iter().map(|a| cpu_ticks(a.pid())).collect();
    let alone0 = cpu_ticks(alone.pid());
    let window = Duration::from_secs(10);
    std::thread::sleep(window);
    let mut packets: Vec<f64> = match &counters {
        Some(c) => c
            .read()
            .iter()
            .map(|p| *p as f64 / window.as_secs_f64())
            .collect(),
        None => Vec::new(),
    };
    drop(counters);
    let mut connections: Vec<f64> = fleet
        .iter()
        .filter_map(|a| open_connections(&a.log_text()))
        .map(|c| c as f64)
        .collect();
    let ticks_per_s = 100.0; // USER_HZ on Linux
    let mut cpu: Vec<f64> = fleet
        .iter()
        .zip(&cpu0)
        .map(|(a, c0)| {
            (cpu_ticks(a.pid()) - c0) as f64 / ticks_per_s / window.as_secs_f64() * 100.0
        })
        .collect();
    let alone_cpu =
        (cpu_ticks(alone.pid()) - alone0) as f64 / ticks_per_s / window.as_secs_f64() * 100.0;
    let mut rss: Vec<f64> = fleet.iter().map(|a| rss_mib(a.pid())).collect();
    let alone_rss = rss_mib(alone.pid());
    let mut private: Vec<f64> = fleet.iter().map(|a| private_mib(a.pid())).collect();
    let alone_private = private_mib(alone.pid());
    let false_deaths = deaths(&fleet) - deaths_before;

    // Propagation: five tag changes at different agents.
    let mut propagation = Vec::new();
    for round in 0..5 {
        let k = (round * 7 + 1) % n;
        propagation.push(propagate(&fleet, k, round));
    }

    // Detection: kill -9 five agents, one after the other.
    let mut detection = Vec::new();
    for victim in [n / 2, n / 3, n - 1, n / 4, 2 * n / 3] {
        let t0 = SystemTime::now();
        fleet[victim].kill();
        let name = fleet[victim].name.clone();
        let needle = format!("member is dead member={name} ");
        let mut last = t0;
        wait_for(
            &format!("{name} to be reported dead"),
            Duration::from_secs(60),
            || {
                let mut latest = t0;
                for a in fleet.iter().filter(|a| a.child.is_some()) {
                    match log_time_of(&a.log_text(), &needle) {
                        Some(t) => latest = latest.max(t),
                        None => return false,
                    }
                }
                last = latest;
                true
            },
        );
        detection.push(last.duration_since(t0).unwrap().as_secs_f64() * 1000.0);
    }

    cpu.sort_by(f64::total_cmp);
    rss.sort_by(f64::total_cmp);
    private.sort_by(f64::total_cmp);
    let (pm, px) = median_max(&mut propagation);
    let (dm, dx) = median_max(&mut detection);
    let mean_cpu = cpu.iter().sum::<f64>() / cpu.len() as f64;
    let packets = if packets.is_empty() {
        "not counted (no nft)".to_string()
    } else {
        let (m, x) = median_max(&mut packets);
        format!("{m:.1} / {x:.1}")
    };
    let connections = if connections.is_empty() {
        "-".to_string()
    } else {
        let (m, x) = median_max(&mut connections);
        format!("{m:.0} / {x:.0}")
    };
    println!(
        "| {n} | {pm:.0} / {px:.0} | {dm:.0} / {dx:.0} | {:.1} / {:.1} | {:.2} ({:.1} vs {alone_rss:.1} MiB) | {:.1} / {:.1} (alone: {alone_private:.1}) | {mean_cpu:.2} (alone: {alone_cpu:.2}) | {packets} | {connections} | {deaths_before} / {false_deaths} |",
        rss[rss.len() / 2],
        rss[rss.len() - 1],
        rss[rss.len() / 2] / alone_rss,
        rss[rss.len() / 2],
        private[private.len() / 2],
        private[private.len() - 1],
    );
    eprintln!("propagation ms: {propagation:?}; detection ms: {detection:?}");
}

/// Rewrites agent `k`'s tags and sends SIGHUP; returns the milliseconds from its publishing
/// the new version to the last agent logging it.
fn propagate(fleet: &[Agent], k: usize, round: usize) -> f64 {
    let agent = &fleet[k];
    let text = std::fs::read_to_string(&agent.config).unwrap();
    let mut text: String = text
        .lines()
        .filter(|l| !l.starts_with("round"))
        .map(|l| format!("{l}\n"))
        .collect();
    text.push_str(&format!("round = \"{round}\"\n"));
    std::fs::write(&agent.config, text).unwrap();
    let published_before = agent
        .log_text()
        .matches("published this host's record")
        .count();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let mut published: Option<(SystemTime, String)> = None;
    wait_for(
        "the change to be published",
        Duration::from_secs(10),
        || {
            let log = agent.log_text();
            let Some(line) = log
                .lines()
                .filter(|l| l.contains("published this host's record"))
                .nth(published_before)
            else {
                return false;
            };
            let version = line
                .split("version=")
                .nth(1)
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap();
            published = Some((parse_time(line), version.to_string()));
            true
        },
    );
    let (t0, version) = published.unwrap();
    let needle = format!("host={} version={version} ", agent.name);
    let mut last = t0;
    wait_for(
        "the change to reach everyone",
        Duration::from_secs(30),
        || {
            let mut latest = t0;
            for (i, a) in fleet.iter().enumerate() {
                if i == k || a.child.is_none() {
                    continue;
                }
                match log_time_of(&a.log_text(), &needle) {
                    Some(t) => latest = latest.max(t),
                    None => return false,
                }
            }
            last = latest;
            true
        },
    );
    last.duration_since(t0).unwrap_or_default().as_secs_f64() * 1000.0
}

/// The last number of open connections an agent reported in its status line.
fn open_connections(log: &str) -> Option<usize> {
    log.lines()
        .rev()
        .find(|l| l.contains("mesh status"))
        .and_then(|l| l.split("open_connections=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// nftables counters of the UDP packets each agent sends, in a table of the benchmark's
/// own (deleted on drop).
struct Counters {
    addrs: Vec<SocketAddr>,
}

const NFT_TABLE: &str = "shoal_bench";

impl Counters {
    fn install(fleet: &[Agent]) -> Option<Counters> {
        let nft = |script: &str| {
            std::process::Command::new("nft")
                .arg(script)
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        };
        let _ = nft(&format!("delete table inet {NFT_TABLE}"));
        let mut script = format!(
            "add table inet {NFT_TABLE}\nadd chain inet {NFT_TABLE} out {{ type filter hook output priority 0; }}\n"
        );
        for a in fleet {
            script.push_str(&format!(
                "add rule inet {NFT_TABLE} out ip saddr {} udp sport {} counter\n",
                a.addr.ip(),
                a.addr.port()
            ));
        }
        let path = std::env::temp_dir().join(format!("shoal-bench-{}.nft", std::process::id()));
        std::fs::write(&path, script).ok()?;
        let ok = std::process::Command::new("nft")
            .arg("-f")
            .arg(&path)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        let _ = std::fs::remove_file(&path);
        if !ok {
            eprintln!(
                "nftables is not usable here (`nft` missing or not root): packets not counted"
            );
            return None;
        }
        Some(Counters {
            addrs: fleet.iter().map(|a| a.addr).collect(),
        })
    }

    /// Packets counted per agent, in fleet order.
    fn read(&self) -> Vec<u64> {
        let out = std::process::Command::new("nft")
            .args(["list", "chain", "inet", NFT_TABLE, "out"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        self.addrs
            .iter()
            .map(|a| {
                let needle = format!(
                    "ip saddr {} udp sport {} counter packets ",
                    a.ip(),
                    a.port()
                );
                text.lines()
                    .find_map(|l| l.trim().strip_prefix(&needle))
                    .and_then(|rest| rest.split_whitespace().next())
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(0)
            })
            .collect()
    }
}

impl Drop for Counters {
    fn drop(&mut self) {
        let _ = std::process::Command::new("nft")
            .args(["delete", "table", "inet", NFT_TABLE])
            .output();
    }
}

fn deaths(fleet: &[Agent]) -> usize {
    fleet
        .iter()
        .map(|a| a.log_text().matches("member is dead").count())
        .sum()
}

fn median_max(v: &mut [f64]) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[v.len() - 1])
}

fn log_time_of(log: &str, needle: &str) -> Option<SystemTime> {
    log.lines().find(|l| l.contains(needle)).map(parse_time)
}

fn last_time_of(log: &str, needle: &str) -> Option<SystemTime> {
    log.lines()
        .rev()
        .find(|l| l.contains(needle))
        .map(parse_time)
}

/// The timestamp tracing puts first on a line: `2026-11-26T23:17:19.110401Z`.
fn parse_time(line: &str) -> SystemTime {
    let stamp = line.split_whitespace().next().expect("a timestamp");
    time::OffsetDateTime::parse(stamp, &time::format_description::well_known::Rfc3339)
        .expect("an RFC 3339 timestamp")
        .into()
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) are 11 and 12 after the command name.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Resident memory, as the kernel sums it over the process's mappings.
fn rss_mib(pid: u32) -> f64 {
    smaps_mib(pid, &["Rss:"])
}

/// Memory that is the process's own (heap, stacks, written data), without the pages of
/// the binary that every `shoal` process on the machine shares.
fn private_mib(pid: u32) -> f64 {
    smaps_mib(pid, &["Private_Clean:", "Private_Dirty:"])
}

/// The sum of `fields` (in kB) of `/proc/PID/smaps_rollup`, in MiB.
fn smaps_mib(pid: u32, fields: &[&str]) -> f64 {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    let kb: f64 = rollup
        .lines()
        .filter(|l| fields.iter().any(|f| l.starts_with(f)))
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|v| v.parse::<f64>().ok())
        .sum();
    kb / 1024.0
}
