//! `shoal demo`: a fleet of five real agents on loopback, from start to rollback.
//!
//! 1. A fresh fleet CA, an operator identity and five agent identities; five `shoal agent`
//!    processes (this binary) on `127.A.B.1`..`.5`, each with its own data directory,
//!    install root and service port (`[ports]` in its config), tagged `role=inference`.
//! 2. `examples/inference-app` v1 to every host at once.
//! 3. A load generator ([`super::load`]) sends predictions to every host from then on.
//! 4. v2 with a canary: one host, a bake, then the rest one at a time.
//! 5. v3-broken with a canary: its model answers wrong, so the canary host fails its
//!    golden-prediction check at ValidateService, the deployment fails and is rolled back by
//!    itself; the other hosts never see v3-broken.
//!    The example revisions are switched (`shoal.service.switch`): no request may fail,
//!    during the rollouts either.
//! 6. A summary: requests served and failed per phase (the load generator's own counts),
//!    the revision each host runs (as the mesh says) and the model it answers with (as the
//!    host's service says), and each deployment's outcome.
//!
//! Everything it starts is stopped when it ends, on an error and on Ctrl-C ([`Fleet`]'s
//! drop), unless `--keep DIR`: then the fleet keeps running with everything in DIR, and
//! `shoal demo --stop DIR` stops it.

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;

use super::load::{Load, PhaseCount};
use crate::api::{self, Answer, HostView, Request};
use crate::cli::fleet::{Progress, Submission, status, submit};
use crate::fleet::plan::{DeploymentConfig, Rollout};
use crate::fleet::wire::DeploymentView;
use crate::identity::{self, Role};
use crate::lifecycle::state::AppDir;
use crate::lifecycle::status::DeploymentStatus;
use crate::mesh::hoststate::Health;
use crate::mesh::view::MemberState;

/// Agents in the demo fleet.
const AGENTS: usize = 5;
/// The application and its deployment group.
const APP: &str = "inference";
/// How long the fleet may take to form, and a deployment to end.
const FORM_WITHIN: Duration = Duration::from_secs(90);
const DEPLOY_WITHIN: Duration = Duration::from_secs(300);
/// How long the load runs against a steady fleet, before and after the rollouts.
const STEADY: Duration = Duration::from_secs(3);
/// The canary of both rollouts: one host of five, then a bake.
const CANARY: &str = "20%:5s";

/// The agents a demo started, stopped (with their services) when dropped unless kept.
pub struct Fleet {
    pub dir: PathBuf,
    agents: Vec<Child>,
    pub peers: Vec<SocketAddr>,
    pub ports: Vec<u16>,
    keep: bool,
}

impl Fleet {
    fn agent_dir(dir: &Path, i: usize) -> PathBuf {
        dir.join(format!("agent-{}", i + 1))
    }

    /// Makes the CA and identities in `dir`, writes five agent configs and starts the
    /// agents.
    fn start(dir: &Path, keep: bool) -> Result<Fleet> {
        identity::init_ca(&dir.join("ca"))?;
        identity::issue(
            &dir.join("ca"),
            "operator",
            Role::Operator,
            &dir.join("operator"),
        )?;
        let peers = free_addresses()?;
        let ports = free_ports(AGENTS)?;
        let exe = std::env::current_exe().context("finding the shoal binary")?;
        let mut fleet = Fleet {
            dir: dir.to_path_buf(),
            agents: Vec::new(),
            peers: peers.clone(),
            ports: ports.clone(),
            keep,
        };
        for i in 0..AGENTS {
            let name = format!("agent-{}", i + 1);
            let home = Self::agent_dir(dir, i);
            std::fs::create_dir_all(&home)
                .with_context(|| format!("creating {}", home.display()))?;
            identity::issue(&dir.join("ca"), &name, Role::Agent, &home.join("identity"))?;
            let config = format!(
                "name = \"{name}\"\ndata_dir = \"data\"\ninstall_root = \"root\"\n\
                 identity = \"identity\"\nlisten = \"{}\"\nseeds = [\"{}\"]\n\
                 [tags]\nrole = \"{APP}\"\n[ports]\n{APP} = {}\n",
                peers[i], peers[0], ports[i]
            );
            std::fs::write(home.join("agent.toml"), config)?;
            let log = std::fs::File::create(home.join("agent.log"))?;
            let child = Command::new(&exe)
                .arg("agent")
                .arg("--config")
                .arg(home.join("agent.toml"))
                .env("SHOAL_LOG", "info,openraft=error")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                // Its own process group: a Ctrl-C on the terminal reaches the demo, which
                // stops the agents in order, not the agents behind its back.
                .process_group(0)
                .spawn()
                .with_context(|| format!("starting {name} ({})", exe.display()))?;
            std::fs::write(home.join("agent.pid"), child.id().to_string())?;
            fleet.agents.push(child);
        }
        Ok(fleet)
    }

    fn operator(&self) -> PathBuf {
        self.dir.join("operator")
    }

    fn peer(&self) -> String {
        self.peers[0].to_string()
    }

    /// Every member as the first agent sees it.
    async fn hosts(&self) -> Result<Vec<HostView>> {
        match api::ask(self.peers[0], None, &self.operator(), None, &Request::Hosts).await? {
            Answer::Hosts(h) => Ok(h),
            _ => bail!("agent-1 answered something other than the hosts"),
        }
    }

    /// Waits until agent-1 sees all five alive and each says `app` runs `revision` (none:
    /// whatever it runs) with no deployment holding it.
    async fn settled(&self, revision: Option<&str>, what: &str) -> Result<Vec<HostView>> {
        let bar = crate::cli::spinner(what);
        let until = Instant::now() + FORM_WITHIN;
        let mut last: String;
        let result = loop {
            match self.hosts().await {
                Ok(hosts) => {
                    let ready = hosts.len() == AGENTS
                        && hosts.iter().all(|h| {
                            let app = h.details.get(APP);
                            h.state == MemberState::Alive
                                && app.is_none_or(|a| a.health != Health::Deploying)
                                && revision.is_none_or(|r| {
                                    app.and_then(|a| a.revision.as_deref()) == Some(r)
                                })
                        });
                    if ready {
                        break Ok(hosts);
                    }
                    last = format!("{} of {AGENTS} hosts listed", hosts.len());
                }
                Err(e) => last = format!("{e:#}"),
            }
            if Instant::now() > until {
                break Err(anyhow!(
                    "{what}: not after {}s ({last}); the agents' logs are in {}/agent-*/agent.log",
                    FORM_WITHIN.as_secs(),
                    self.dir.display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        bar.finish_and_clear();
        result
    }

    /// Deploys `bundle` to every host and follows it, and its rollback if it gets one,
    /// to the end; the deployment's last view.
    async fn deploy(
        &self,
        bundle: &Path,
        revision: &str,
        config: DeploymentConfig,
        rollout: Rollout,
    ) -> Result<DeploymentView> {
        let operator = self.operator();
        let view = submit(
            &self.peer(),
            &operator,
            &Submission {
                app: APP,
                bundle: Some(bundle),
                group: APP,
                targets: Some("role=inference"),
                config,
                rollout,
                zone_tag: None,
                rollback: true,
                outdated_only: false,
                ignore_stop_failures: false,
                revision,
            },
        )
        .await?;
        let progress = Progress::new();
        let until = Instant::now() + DEPLOY_WITHIN;
        let mut last = view;
        loop {
            match status(&self.peer(), &operator, &last.id).await {
                Ok(v) => {
                    progress.show(&v);
                    last = v;
                    let rolled = last.rollback.as_ref().is_none_or(|r| {
                        matches!(
                            r.status,
                            DeploymentStatus::Succeeded
                                | DeploymentStatus::Failed
                                | DeploymentStatus::Stopped
                        )
                    });
                    // A failed deployment is followed until its rollback has ended too.
                    let awaits_rollback = last.status == DeploymentStatus::Failed
                        && last.rollback_to.is_some()
                        && last.rollback.is_none();
                    if last.ended() && rolled && !awaits_rollback {
                        break;
                    }
                }
                Err(e) => progress.note(&format!("{e:#}")),
            }
            if Instant::now() > until {
                progress.finish();
                bail!(
                    "deployment {} did not end within {}s (last seen {})",
                    last.id,
                    DEPLOY_WITHIN.as_secs(),
                    last.status
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        progress.finish();
        Ok(last)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        stop_agents(&mut self.agents);
        for i in 0..AGENTS {
            let _ = crate::lifecycle::switched::stop_all(&AppDir::new(
                &Self::agent_dir(&self.dir, i).join("data"),
                APP,
            ));
        }
    }
}

/// SIGTERM (the agents leave the mesh), then SIGKILL what is left after 10 s.
fn stop_agents(agents: &mut [Child]) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    for a in agents.iter() {
        let _ = kill(Pid::from_raw(a.id() as i32), Signal::SIGTERM);
    }
    let until = Instant::now() + Duration::from_secs(10);
    for a in agents.iter_mut() {
        while matches!(a.try_wait(), Ok(None)) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = a.kill();
        let _ = a.wait();
    }
}

/// Five UDP addresses `127.A.B.1`..`.5` on port 7400 that nothing holds: the first block
/// (from one picked by the process id) where all five bind.
fn free_addresses() -> Result<Vec<SocketAddr>> {
    let pid = std::process::id();
    for attempt in 0..64u32 {
        let n = pid.wrapping_add(attempt.wrapping_mul(7919));
        let (a, b) = (100 + (n % 100) as u8, 1 + ((n / 100) % 250) as u8);
        let addrs: Vec<SocketAddr> = (1..=AGENTS as u8)
            .map(|i| SocketAddr::from(([127, a, b, i], crate::config::DEFAULT_PORT)))
            .collect();
        if addrs.iter().all(|addr| UdpSocket::bind(addr).is_ok()) {
            return Ok(addrs);
        }
    }
    bail!("found no free block of five loopback addresses (127.x.y.1-5, UDP port 7400)")
}

/// `n` TCP ports free a moment ago on every address, below the ephemeral range: the
/// switched services' own ports are ephemeral ones, so none can take a public port before
/// its switch binds it.
pub(super) fn free_ports(n: usize) -> Result<Vec<u16>> {
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768)
        .max(12_000);
    let span = u32::from(ephemeral - 10_000);
    let seed = std::process::id().wrapping_mul(2_654_435_761)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
    let mut ports = Vec::new();
    for step in 0..span {
        let port = 10_000 + (seed.wrapping_add(step) % span) as u16;
        if std::net::TcpListener::bind(("0.0.0.0", port)).is_ok() {
            ports.push(port);
            if ports.len() == n {
                return Ok(ports);
            }
        }
    }
    bail!("finding free ports for the services: fewer than {n} free between 10000 and {ephemeral}")
}

/// One deployment, as the summary shows it.
#[derive(Debug, Serialize)]
pub struct DeploymentReport {
    pub revision: String,
    pub id: String,
    pub rollout: String,
    pub status: DeploymentStatus,
    pub expected: DeploymentStatus,
    pub reason: Option<String>,
    pub hosts: usize,
    /// Its rollback, when it got one: its id and how it ended.
    pub rollback: Option<(String, DeploymentStatus)>,
}

/// One host at the end.
#[derive(Debug, Serialize)]
pub struct HostReport {
    pub name: String,
    pub addr: SocketAddr,
    pub port: u16,
    /// The revision the mesh says it runs (by its example name when it is one).
    pub revision: Option<String>,
    /// The model its service answers with now.
    pub serving: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Summary {
    /// Where its files are (removed at the end unless kept).
    pub dir: PathBuf,
    pub kept: bool,
    pub phases: Vec<PhaseCount>,
    pub deployments: Vec<DeploymentReport>,
    pub hosts: Vec<HostReport>,
    /// Every deployment ended as expected, every host runs and serves v2, and the load
    /// was served in every phase and never failed, rollouts included.
    pub as_planned: bool,
}

/// Runs the fleet demo in `dir` (kept running afterwards when `keep`).
pub async fn run(dir: &Path, keep: bool, json: bool) -> Result<bool> {
    let say = |line: &str| {
        if !json {
            println!("{line}");
        }
    };
    say(&format!(
        "Starting a fleet of {AGENTS} agents on loopback (files in {})",
        dir.display()
    ));
    let fleet = Fleet::start(dir, keep)?;
    let hosts = fleet
        .settled(None, "waiting for the five agents to see each other")
        .await?;
    say(&format!(
        "  {} agents alive: {}",
        hosts.len(),
        fleet
            .peers
            .iter()
            .zip(&fleet.ports)
            .enumerate()
            .map(|(i, (p, port))| format!("agent-{} at {p} (service port {port})", i + 1))
            .collect::<Vec<_>>()
            .join(", ")
    ));

    // The example revisions, packed as bundles an operator could deploy by hand.
    let mut bundles = BTreeMap::new();
    let mut names = BTreeMap::new();
    for name in shoal_examples::REVISIONS {
        let source = dir.join("revisions").join(name);
        shoal_examples::write_revision(name, &source)?;
        std::fs::create_dir_all(dir.join("bundles"))?;
        let bundle = dir.join("bundles").join(format!("{name}.tar.zst"));
        let id = crate::bundle::create(&source, &bundle)
            .with_context(|| format!("packing the example revision {name}"))?;
        names.insert(id.0.clone(), name.to_string());
        bundles.insert(name, (bundle, id.0));
    }
    let named = |id: &str| {
        names
            .get(id)
            .cloned()
            .unwrap_or_else(|| crate::cli::short(id))
    };

    let plan: [(&str, &str, DeploymentConfig, &str, DeploymentStatus); 3] = [
        (
            "v1",
            "deploying v1 (a linear model) to all five at once",
            DeploymentConfig::AllAtOnce,
            "",
            DeploymentStatus::Succeeded,
        ),
        (
            "v2",
            "rolling out v2 (an MLP): a canary of one host, a 5 s bake, then one at a time",
            DeploymentConfig::OneAtATime,
            CANARY,
            DeploymentStatus::Succeeded,
        ),
        (
            "v3-broken",
            "rolling out v3-broken (answers wrong) with the same canary: it must fail and roll back",
            DeploymentConfig::OneAtATime,
            CANARY,
            DeploymentStatus::Failed,
        ),
    ];
    let mut load: Option<Load> = None;
    let mut deployments = Vec::new();
    for (name, title, config, canary, expected) in plan {
        let (bundle, id) = &bundles[name];
        say(&format!("\n{title}"));
        if let Some(load) = &load {
            load.phase(&format!("{name} rollout"));
        }
        let rollout = Rollout::from_options((!canary.is_empty()).then_some(canary), None)?;
        let view = fleet.deploy(bundle, id, config, rollout).await?;
        say(&format!(
            "  {} {}{}",
            view.id,
            view.status,
            view.reason
                .as_deref()
                .map(|r| format!(": {}", crate::cli::printable(r)))
                .unwrap_or_default()
        ));
        if let Some(r) = &view.rollback {
            say(&format!(
                "  rolled back by {} to {}: {}",
                r.id,
                named(&r.revision),
                r.status
            ));
        }
        deployments.push(DeploymentReport {
            revision: name.to_string(),
            id: view.id.clone(),
            rollout: view.rollout.clone(),
            status: view.status,
            expected,
            reason: view.reason.clone(),
            hosts: view.hosts.len(),
            rollback: view.rollback.as_ref().map(|r| (r.id.clone(), r.status)),
        });
        // The next step starts from a fleet that says it is done.
        let serving = if view.status == DeploymentStatus::Succeeded {
            id.as_str()
        } else {
            bundles["v2"].1.as_str()
        };
        fleet
            .settled(
                Some(serving),
                "waiting for every host to report its revision",
            )
            .await?;
        match &load {
            Some(load) => load.phase(&format!("steady after {name}")),
            None => {
                say("\nsending predictions to every host from now on");
                load = Some(Load::start(&fleet.ports, "steady after v1"));
            }
        }
        tokio::time::sleep(STEADY).await;
    }
    let phases = load.map(Load::finish).unwrap_or_default();

    let hosts = fleet.hosts().await?;
    let host_reports: Vec<HostReport> = hosts
        .iter()
        .map(|h| {
            let i = fleet.peers.iter().position(|p| *p == h.addr);
            let port = i.map(|i| fleet.ports[i]).unwrap_or(0);
            HostReport {
                name: h.name.clone(),
                addr: h.addr,
                port,
                revision: h
                    .details
                    .get(APP)
                    .and_then(|a| a.revision.as_deref())
                    .map(named),
                serving: super::local::serving(port),
            }
        })
        .collect();
    let as_planned = deployments.iter().all(|d| {
        d.status == d.expected
            && (d.status == DeploymentStatus::Succeeded
                || d.rollback.as_ref().map(|r| r.1) == Some(DeploymentStatus::Succeeded))
    }) && host_reports.len() == AGENTS
        && host_reports
            .iter()
            .all(|h| h.revision.as_deref() == Some("v2") && h.serving.as_deref() == Some("v2"))
        && !phases.is_empty()
        && phases.iter().all(|p| p.served > 0)
        && phases.iter().all(|p| p.failed == 0);
    let summary = Summary {
        dir: dir.to_path_buf(),
        kept: keep,
        phases,
        deployments,
        hosts: host_reports,
        as_planned,
    };
    if json {
        crate::cli::print_json(&summary)?;
    } else {
        print!("\n{}", text(&summary));
        if keep {
            print!("{}", next_steps(&fleet));
        }
    }
    if !as_planned {
        eprintln!("error: the demo did not go as planned (see the summary)");
    }
    Ok(as_planned)
}

/// The summary as tables.
fn text(s: &Summary) -> String {
    use std::fmt::Write;
    let mut out =
        String::from("Requests to the five hosts, by phase (the load generator's counts):\n");
    let _ = writeln!(
        out,
        "  {:<22} {:>8} {:>8} {:>7}  answered by / failures",
        "phase", "requests", "served", "failed"
    );
    for p in &s.phases {
        let models = p
            .by_model
            .iter()
            .map(|(m, n)| format!("{m}: {n}"))
            .chain(p.failures.iter().map(|(k, n)| format!("{k}: {n}")))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            out,
            "  {:<22} {:>8} {:>8} {:>7}  {models}",
            p.phase, p.requests, p.served, p.failed
        );
    }
    out.push_str("\nDeployments:\n");
    for d in &s.deployments {
        let rollback = d
            .rollback
            .as_ref()
            .map(|(id, st)| format!(", rolled back by {id}: {st}"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  {:<10} {} {} ({}, {} hosts){rollback}",
            d.revision, d.id, d.status, d.rollout, d.hosts
        );
    }
    out.push_str("\nHosts:\n");
    for h in &s.hosts {
        let _ = writeln!(
            out,
            "  {:<8} {:<17} runs {:<10} its service (127.0.0.1:{}) answers with model {}",
            crate::cli::printable(&h.name),
            h.addr,
            h.revision.as_deref().unwrap_or("-"),
            h.port,
            h.serving.as_deref().unwrap_or("(none)")
        );
    }
    out.push('\n');
    out.push_str(if s.as_planned {
        "Everything went as planned: v2 rolled out behind a canary, v3-broken failed on its \
         canary and was rolled back by itself, every host serves v2, and not one request \
         failed.\n"
    } else {
        "Something did not go as planned: see above.\n"
    });
    out
}

/// What to type next with a kept fleet.
fn next_steps(fleet: &Fleet) -> String {
    let dir = fleet.dir.display();
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "shoal".into());
    format!(
        "\nThe fleet keeps running. Carry on by hand (`shoal` is {exe}):\n\
         \n  export SHOAL_IDENTITY={dir}/operator SHOAL_PEER={peer}\n\
         \x20 shoal hosts\n\
         \x20 shoal deploy list\n\
         \x20 shoal deploy create --app {APP} --bundle {dir}/bundles/v1.tar.zst --canary 20%:10s --wait\n\
         \x20 curl -s -d '{{\"input\": [1, 2, 3]}}' http://127.0.0.1:{port}/predict\n\
         \x20 shoal demo --stop {dir}     # stops the agents and their services\n\
         \nThe revisions' sources are in {dir}/revisions, the agents' configs and logs in \
         {dir}/agent-N.\n",
        peer = fleet.peer(),
        port = fleet.ports[0],
    )
}

/// `shoal demo --stop DIR`: stops the agents a kept demo left running in DIR, then their
/// services. An agent is signalled only if its process still runs this demo's config.
pub fn stop(dir: &Path, json: bool) -> Result<bool> {
    // The agents run with the absolute path of their config, as `--keep` made it.
    let dir = &std::path::absolute(dir)?;
    let mut stopped = Vec::new();
    for i in 0..AGENTS {
        let home = Fleet::agent_dir(dir, i);
        let config = home.join("agent.toml");
        let Ok(pid) = std::fs::read_to_string(home.join("agent.pid")) else {
            continue;
        };
        let pid: i32 = pid
            .trim()
            .parse()
            .with_context(|| format!("{}: not a process id", home.join("agent.pid").display()))?;
        // The pid may have been reused since: only a process running this config is ours.
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let ours = cmdline
            .split(|b| *b == 0)
            .any(|arg| Path::new(std::ffi::OsStr::from_bytes(arg)) == config);
        if !ours && Path::new(&format!("/proc/{pid}")).exists() && !cmdline.is_empty() {
            // Another process has that pid now, or the agent runs another config: leave it,
            // and its record, alone.
            continue;
        }
        if ours {
            let target = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGTERM);
            let until = Instant::now() + Duration::from_secs(10);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGKILL);
            stopped.push(format!("agent-{}", i + 1));
        }
        crate::lifecycle::switched::stop_all(&AppDir::new(&home.join("data"), APP))
            .with_context(|| format!("stopping agent-{}'s service and switch", i + 1))?;
        let _ = std::fs::remove_file(home.join("agent.pid"));
    }
    if json {
        crate::cli::print_json(&serde_json::json!({ "stopped": stopped }))?;
    } else if stopped.is_empty() {
        println!("no agent of {} was running", dir.display());
    } else {
        println!("stopped {} and their services", stopped.join(", "));
    }
    Ok(true)
}
