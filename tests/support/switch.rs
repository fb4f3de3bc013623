//! Three agents with the example inference app behind each host's switch, for the switch
//! tests and the switch benchmark: their config (a public port each), the revisions
//! (switched or in place, with a `record` hook at every event), the deployments, what each
//! host serves and recorded, and the clean-up of what outlives the agents.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::fleet::{Agent, Ca, agents, hosts, json, shoal, status, wait_for};
use crate::load;
use crate::ports::{PortLease, lease};

pub const APP: &str = "inference";
pub const LONG: Duration = Duration::from_secs(180);

/// The events a switched deployment over a previous revision runs hooks at, in the order
/// docs/appspec.md gives (BlockTraffic and AllowTraffic are the agent's own).
pub const HOOKED: [&str; 9] = [
    "BeforeInstall",
    "AfterInstall",
    "ApplicationStart",
    "ValidateService",
    "BeforeBlockTraffic",
    "AfterBlockTraffic",
    "BeforeAllowTraffic",
    "AfterAllowTraffic",
    "ApplicationStop",
];

/// The hooks of the test's revisions: `record` (the plain WASI command, which appends its
/// event to `/work/deployments.log`) at every event a switched deployment runs, and the
/// golden-prediction check after traffic is allowed (so v3-broken fails after the switch).
pub fn appspec(switch: Option<u32>) -> String {
    let record = "    - location: hooks/record.wasm\n      timeout: 60\n";
    let mut hooks = String::new();
    for event in HOOKED {
        hooks.push_str(&format!("  {event}:\n{record}"));
        if event == "AfterAllowTraffic" {
            hooks.push_str("    - location: hooks/validate_inference.wasm\n      timeout: 60\n");
        }
    }
    format!(
        "version: 0.0\nos: linux\nfiles:\n  - source: /\n    destination: /srv/inference\n\
         file_exists_behavior: OVERWRITE\nhooks:\n{hooks}shoal:\n  service:\n\
         \x20   command: bin/inference-app\n    args: [--model, model/model.json]\n\
         \x20   port: 8080\n    health_path: /health\n{}",
        switch
            .map(|keep| format!(
                "    switch:\n      drain_timeout: 10\n      keep_previous: {keep}\n"
            ))
            .unwrap_or_default()
    )
}

/// Example revision `name`, switched (keeping the previous process for 120 s), with the
/// test's hooks.
pub fn switched_revision(root: &Path, name: &str) -> PathBuf {
    example_revision(root, name, Some(120))
}

/// Example revision `name`, switched (keeping the previous process for `switch` seconds)
/// or in place (`None`), with the test's hooks.
pub fn example_revision(root: &Path, name: &str, switch: Option<u32>) -> PathBuf {
    revision_with(root, name, switch, None)
}

/// Example revision `name`, switched with every connection through the proxy
/// (`forward: proxy`), keeping the previous process for 120 s.
pub fn proxied_revision(root: &Path, name: &str) -> PathBuf {
    revision_with(root, name, Some(120), Some("proxy"))
}

/// Example revision `name` with the test's hooks: switched (keeping the previous process
/// for `switch` seconds, with `forward` when given) or in place (`None`).
pub fn revision_with(
    root: &Path,
    name: &str,
    switch: Option<u32>,
    forward: Option<&str>,
) -> PathBuf {
    let dir = root.join(format!(
        "rev-{name}-{}{}",
        if switch.is_some() {
            "switched"
        } else {
            "in-place"
        },
        forward.map(|f| format!("-{f}")).unwrap_or_default()
    ));
    shoal_examples::write_revision(name, &dir).unwrap();
    std::fs::copy(
        shoal_examples::PLAIN_COMMAND.path,
        dir.join("hooks/record.wasm"),
    )
    .unwrap();
    let mut spec = appspec(switch);
    if let Some(forward) = forward {
        spec.push_str(&format!("      forward: {forward}\n"));
    }
    std::fs::write(dir.join("appspec.yml"), spec).unwrap();
    dir
}

/// Where a new connection made on this host to the public port of the app under `data`
/// lands, when its connect redirect (the kernel rule) is attached: `None` when none is.
/// `Err` where the programs cannot be listed (not root, no cgroup v2; `SHOAL_CI=1`,
/// where both hold, makes that a failure).
pub fn kernel_rule(data: &Path) -> Result<Option<u16>, String> {
    if !kernel_program_attached(data)? {
        return Ok(None);
    }
    let record = std::fs::read(data.join("apps").join(APP).join("switch.json"))
        .expect("a connect redirect is attached with no proxy recorded");
    let record: serde_json::Value = serde_json::from_slice(&record).unwrap();
    let listen: std::net::SocketAddr = record["listen"].as_str().unwrap().parse().unwrap();
    let to = if listen.ip().is_unspecified() {
        std::net::SocketAddr::from(([127, 0, 0, 1], listen.port()))
    } else {
        listen
    };
    let peer = std::net::TcpStream::connect_timeout(&to, std::time::Duration::from_secs(5))
        .and_then(|c| c.peer_addr())
        .unwrap_or_else(|e| panic!("connecting to {to} with the redirect attached: {e}"));
    Ok(Some(peer.port()))
}

/// Whether the app under `data` has a connect redirect attached (`Err` as for
/// [`kernel_rule`]).
pub fn kernel_program_attached(data: &Path) -> Result<bool, String> {
    match kernel(data).attached() {
        Ok(ids) => {
            assert!(ids.len() <= 1, "two connect programs for one app: {ids:?}");
            Ok(!ids.is_empty())
        }
        Err(e) => {
            assert!(
                std::env::var_os("SHOAL_CI").is_none(),
                "the connect redirect cannot be listed ({e}), and CI can"
            );
            Err(format!("the connect redirect is not checked: {e}"))
        }
    }
}

fn kernel(data: &Path) -> shoal_agent::switch::kernel::Kernel {
    shoal_agent::switch::kernel::Kernel::of(&shoal_agent::lifecycle::state::AppDir::new(data, APP))
}

/// Three agents tagged `role=inference`, each with its own public port for the app.
/// Dropped: the agents first (so that none starts a proxy or sets a rule again), then the
/// proxies, services and kernel rules they left, then the files.
pub struct Three {
    pub _services: Services,
    /// The public ports, below the ephemeral range: a switched service's own port is an
    /// ephemeral one, so it can never take another host's public port.
    pub _ports: Vec<PortLease>,
    pub agents: Vec<Agent>,
    pub ports: Vec<u16>,
    pub ca: Ca,
    pub tmp: tempfile::TempDir,
}

pub fn three(prefix: [u8; 3], faults: [Option<&str>; 3]) -> Three {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new(tmp.path(), "fleet");
    let mut agents = agents(tmp.path(), &ca, prefix, 3);
    let services = Services(agents.iter().map(|a| a.data_dir.clone()).collect());
    let leases: Vec<PortLease> = (0..3).map(|_| lease()).collect();
    let ports: Vec<u16> = leases.iter().map(PortLease::port).collect();
    for (i, a) in agents.iter_mut().enumerate() {
        let text = std::fs::read_to_string(&a.config).unwrap();
        let head = text.split("[tags]").next().unwrap();
        std::fs::write(
            &a.config,
            format!(
                "{head}[ports]\n{APP} = {}\n[tags]\nrole = \"{APP}\"\n",
                ports[i]
            ),
        )
        .unwrap();
        if let Some(point) = faults[i] {
            a.env = vec![("SHOAL_FAULT_POINT".into(), point.into())];
        }
        a.start();
    }
    wait_for("agent-1 to see all three alive", LONG, || {
        hosts(agents[0].addr, &ca.operator)
            .is_ok_and(|l| l.len() == 3 && l.iter().all(|h| h["state"] == "alive"))
    });
    Three {
        _services: services,
        _ports: leases,
        agents,
        ports,
        ca,
        tmp,
    }
}

impl Drop for Three {
    fn drop(&mut self) {
        for agent in &mut self.agents {
            agent.kill();
        }
    }
}

impl Three {
    pub fn public(&self) -> Vec<SocketAddr> {
        self.ports
            .iter()
            .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
            .collect()
    }

    /// `deploy create` of `bundle` for the app, one host at a time, not waiting: its id.
    pub fn create(&self, bundle: &Path, config: &str) -> String {
        let o = shoal()
            .args(["deploy", "create", "--app", APP, "--json", "--peer"])
            .arg(self.agents[0].addr.to_string())
            .arg("--identity")
            .arg(&self.ca.operator)
            .arg("--bundle")
            .arg(bundle)
            .args(["--targets", "role=inference", "--config", config])
            .output()
            .unwrap();
        json(&o, "deploy create")["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Deploys `bundle` with `config` and waits: it must succeed.
    pub fn succeeds(&self, bundle: &Path, config: &str) {
        let view = self.ended(&self.create(bundle, config));
        assert_eq!(view["status"], "Succeeded", "{view}");
    }

    /// Waits until deployment `id` has ended (and its automatic rollback, if any): its view.
    pub fn ended(&self, id: &str) -> serde_json::Value {
        let mut view = serde_json::Value::Null;
        wait_for(&format!("deployment {id} to end"), LONG, || {
            match status(&self.agents[0], &self.ca.operator, id) {
                Ok(v) => {
                    let done = matches!(
                        v["status"].as_str(),
                        Some("Succeeded" | "Failed" | "Stopped")
                    );
                    let rollback_done = v["rollback"].is_null()
                        || matches!(
                            v["rollback"]["status"].as_str(),
                            Some("Succeeded" | "Failed" | "Stopped")
                        );
                    view = v;
                    done && rollback_done
                }
                Err(_) => false,
            }
        });
        view
    }

    /// The models the three public ports answer with now.
    pub fn serving(&self) -> Vec<String> {
        self.public()
            .iter()
            .map(|a| load::predict(*a).unwrap_or_else(|e| format!("failed: {e}")))
            .collect()
    }

    /// Asserts that each host's kernel rule sends new connections to its serving
    /// service's own port (`forward: kernel`), or that there is none (`forward: proxy`).
    /// Returns false, having said why, where the redirect cannot be listed.
    pub fn kernel_rules_follow(&self, kernel: bool) -> bool {
        for (i, agent) in self.agents.iter().enumerate() {
            let port = self.service_json(i, "service.json").unwrap()["port"]
                .as_u64()
                .map(|p| p as u16);
            match kernel_rule(&agent.data_dir) {
                Ok(rule) => {
                    let want = if kernel { port } else { None };
                    assert_eq!(rule, want, "host {i}: the kernel rule");
                }
                Err(skip) => {
                    println!("{skip}");
                    return false;
                }
            }
        }
        true
    }

    /// The connections each host's proxy accepted since it started.
    pub fn proxy_accepted(&self) -> Vec<u64> {
        self.agents
            .iter()
            .map(|a| {
                let dir = shoal_agent::lifecycle::state::AppDir::new(&a.data_dir, APP);
                shoal_agent::switch::running(&dir)
                    .unwrap()
                    .expect("the proxy runs")
                    .seen()
                    .accepted
            })
            .collect()
    }

    pub fn service_json(&self, i: usize, file: &str) -> Option<serde_json::Value> {
        let path = self.agents[i].data_dir.join("apps").join(APP).join(file);
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }

    /// The events the `record` hook saw on host `i`, in order, since line `from`.
    pub fn recorded(&self, i: usize, from: usize) -> Vec<String> {
        let path = self.agents[i]
            .data_dir
            .join("apps")
            .join(APP)
            .join("work/deployments.log");
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .skip(from)
            .map(|l| l.split(' ').next().unwrap().to_string())
            .collect()
    }
}

/// Kills, when dropped, the proxies and services the agents under these data dirs
/// started, and removes their kernel rules: they outlive their agents on purpose.
pub struct Services(pub Vec<PathBuf>);

impl Drop for Services {
    fn drop(&mut self) {
        for data in &self.0 {
            for file in ["switch.json", "service.json", "standby.json"] {
                let pid = std::fs::read(data.join("apps").join(APP).join(file))
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .and_then(|v| v["pid"].as_i64());
                if let Some(pid) = pid {
                    let pid = nix::unistd::Pid::from_raw(pid as i32);
                    let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
                    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                }
            }
            let _ = kernel(data).clear();
        }
    }
}
