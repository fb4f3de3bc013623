//! A fleet of real `shoal agent` processes on loopback addresses, for the mesh tests and
//! the mesh benchmarks: a fleet CA, an operator identity, one identity, config, data dir
//! and log per agent. Every agent process is killed when its handle is dropped.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub fn shoal() -> Command {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
}

fn run_ok(cmd: &mut Command) {
    if let Err(e) = command_ok(cmd) {
        panic!("{e}");
    }
}

/// A CA with an operator, in its own temporary directory.
pub struct Ca {
    pub dir: PathBuf,
    pub operator: PathBuf,
}

impl Ca {
    pub fn new(root: &Path, label: &str) -> Ca {
        let dir = root.join(format!("{label}-ca"));
        run_ok(shoal().args(["ca", "init", "--dir"]).arg(&dir));
        let operator = root.join(format!("{label}-operator"));
        run_ok(
            shoal()
                .args(["ca", "issue", "--operator", "--name", "operator", "--dir"])
                .arg(&dir)
                .arg("--out")
                .arg(&operator),
        );
        Ca { dir, operator }
    }

    pub fn issue(&self, name: &str, out: &Path) {
        run_ok(
            shoal()
                .args(["ca", "issue", "--name", name, "--dir"])
                .arg(&self.dir)
                .arg("--out")
                .arg(out),
        );
    }
}

/// One agent: its files (under one directory: `agent.toml`, `agent.log`, `identity/`,
/// `data/`, and `root/` for the install root), and its process while it runs.
pub struct Agent {
    pub name: String,
    pub addr: SocketAddr,
    pub config: PathBuf,
    pub log: PathBuf,
    pub child: Option<Child>,
    pub log_filter: String,
    /// The network namespace the agent runs in, if not the test's own.
    pub netns: Option<String>,
    pub data_dir: PathBuf,
    pub install_root: PathBuf,
    /// Environment variables of its next start (a crash point to arm, say).
    pub env: Vec<(String, String)>,
}

impl Agent {
    /// Writes the agent's identity, config and data dir under `root`.
    pub fn new(root: &Path, ca: &Ca, name: &str, addr: SocketAddr, seeds: &[SocketAddr]) -> Agent {
        let home = root.join(name);
        let (data_dir, install_root) = (home.join("data"), home.join("root"));
        std::fs::create_dir_all(&home).unwrap();
        ca.issue(name, &home.join("identity"));
        let seeds: Vec<String> = seeds.iter().map(|s| format!("\"{s}\"")).collect();
        let config = home.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "name = \"{name}\"\nlisten = \"{addr}\"\ndata_dir = {:?}\ninstall_root = {:?}\n\
                 identity = {:?}\nseeds = [{}]\n[tags]\nrole = \"inference\"\nhost = \"{name}\"\n",
                data_dir,
                install_root,
                home.join("identity"),
                seeds.join(", ")
            ),
        )
        .unwrap();
        Agent {
            name: name.to_string(),
            addr,
            config,
            log: home.join("agent.log"),
            child: None,
            log_filter: "info".into(),
            netns: None,
            data_dir,
            install_root,
            env: Vec::new(),
        }
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} is running already", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = in_netns(self.netns.as_deref())
            .arg("agent")
            .arg("--config")
            .arg(&self.config)
            .env("SHOAL_LOG", &self.log_filter)
            .env("NO_COLOR", "1")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// `kill -9`: no goodbye.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and waits for the process to exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > until {
                let _ = child.kill();
                panic!("{} did not stop within 10 s of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `shoal`, run inside the network namespace `netns` if there is one.
pub fn in_netns(netns: Option<&str>) -> Command {
    match netns {
        None => shoal(),
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_shoal")]);
            c
        }
    }
}

/// What `shoal hosts --json` said, or its stderr.
pub fn hosts(peer: SocketAddr, identity: &Path) -> Result<Vec<serde_json::Value>, String> {
    hosts_in(None, peer, identity)
}

/// `hosts`, asked from inside a network namespace.
pub fn hosts_in(
    netns: Option<&str>,
    peer: SocketAddr,
    identity: &Path,
) -> Result<Vec<serde_json::Value>, String> {
    let o = in_netns(netns)
        .args(["hosts", "--json", "--peer", &peer.to_string(), "--identity"])
        .arg(identity)
        .output()
        .unwrap();
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr).into_owned());
    }
    serde_json::from_slice(&o.stdout).map_err(|e| e.to_string())
}

/// The state `shoal hosts` at `peer` gives `name`, if it lists it.
pub fn state_of(list: &[serde_json::Value], name: &str) -> Option<String> {
    list.iter()
        .find(|h| h["name"] == name)
        .and_then(|h| h["state"].as_str().map(String::from))
}

/// Polls `ok` every 100 ms until it holds; panics with `what` after `limit`.
pub fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !ok() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    start.elapsed()
}

/// `n` agents at `prefix.1` … `prefix.n` port 7400, all seeded with the first.
pub fn agents(root: &Path, ca: &Ca, prefix: [u8; 3], n: usize) -> Vec<Agent> {
    let addr = |i: usize| SocketAddr::from(([prefix[0], prefix[1], prefix[2], i as u8 + 1], 7400));
    (0..n)
        .map(|i| Agent::new(root, ca, &format!("agent-{}", i + 1), addr(i), &[addr(0)]))
        .collect()
}

/// Deploys a tiny revision of application `app` (one file, no hooks, no service) on
/// `agent`'s host with `shoal deploy local`, into the agent's data dir and install root.
/// Returns the revision id.
pub fn deploy_tiny(agent: &Agent, app: &str, content: &str) -> String {
    // Beside the agent's data dir, in its own directory.
    let rev = agent
        .data_dir
        .with_file_name(format!("rev-{app}-{content}"));
    std::fs::create_dir_all(&rev).unwrap();
    std::fs::write(
        rev.join("appspec.yml"),
        format!("version: 0.0\nos: linux\nfiles:\n  - source: payload.txt\n    destination: /srv/{app}\n"),
    )
    .unwrap();
    std::fs::write(rev.join("payload.txt"), content).unwrap();
    let o = shoal()
        .args(["deploy", "local", "--json", "--app", app, "--bundle"])
        .arg(&rev)
        .arg("--data-dir")
        .arg(&agent.data_dir)
        .arg("--install-root")
        .arg(&agent.install_root)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "deploying {app} on {}: {}",
        agent.name,
        String::from_utf8_lossy(&o.stderr)
    );
    let record: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(record["status"], "Succeeded", "{record}");
    record["revision"].as_str().unwrap().to_string()
}

/// A network namespace of the test's own, deleted on drop. It does not stop what runs in
/// it: drop the agents first (declare the namespace before them).
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates it with loopback up, or says why it cannot.
    pub fn create(name: &str) -> Result<Netns, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("network namespaces need root".into());
        }
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        let ns = Netns {
            name: name.to_string(),
        };
        command_ok(Command::new("ip").args(["netns", "add", name]))?;
        ns.run("ip link set lo up")?;
        Ok(ns)
    }

    /// Runs a shell command inside the namespace.
    pub fn run(&self, script: &str) -> Result<(), String> {
        command_ok(Command::new("ip").args(["netns", "exec", &self.name, "sh", "-c", script]))
    }
}

/// Runs `cmd`; its stderr is the error if it fails.
fn command_ok(cmd: &mut Command) -> Result<(), String> {
    let o = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

// Fleet deployments: what the `deploy create` tests share.

/// Gives `agent` these tags (and only these) in its config.
pub fn tag(agent: &Agent, tags: &[(&str, &str)]) {
    let text = std::fs::read_to_string(&agent.config).unwrap();
    let head = text.split("[tags]").next().unwrap().to_string();
    let tags: String = tags
        .iter()
        .map(|(k, v)| format!("{k} = \"{v}\"\n"))
        .collect();
    std::fs::write(&agent.config, format!("{head}[tags]\n{tags}")).unwrap();
}

/// A revision of `tiny`: one file with `payload`, and a ValidateService hook (the probe).
pub fn revision(root: &Path, payload: &str) -> PathBuf {
    let dir = root.join(format!("rev-{payload}"));
    std::fs::create_dir_all(dir.join("hooks")).unwrap();
    std::fs::write(
        dir.join("appspec.yml"),
        "version: 0.0\nos: linux\nfiles:\n  - source: payload.txt\n    destination: /srv/tiny\n\
         hooks:\n  ValidateService:\n    - location: hooks/probe.wasm\n      timeout: 30\n",
    )
    .unwrap();
    std::fs::write(dir.join("payload.txt"), payload).unwrap();
    std::fs::copy(
        shoal_examples::SANDBOX_PROBE.path,
        dir.join("hooks/probe.wasm"),
    )
    .unwrap();
    dir
}

/// `shoal deploy create` of `bundle` asked of `peer` (from inside its namespace).
pub fn create(peer: &Agent, operator: &Path, bundle: &Path, extra: &[&str]) -> Output {
    in_netns(peer.netns.as_deref())
        .args(["deploy", "create", "--app", "tiny", "--json", "--peer"])
        .arg(peer.addr.to_string())
        .arg("--identity")
        .arg(operator)
        .arg("--bundle")
        .arg(bundle)
        .args(extra)
        .output()
        .unwrap()
}

pub fn json(o: &Output, what: &str) -> serde_json::Value {
    assert!(
        o.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// `shoal deploy status ID --json` asked of `peer`: the view, or the CLI's stderr.
pub fn status(peer: &Agent, operator: &Path, id: &str) -> Result<serde_json::Value, String> {
    let o = in_netns(peer.netns.as_deref())
        .args(["deploy", "status", id, "--json", "--peer"])
        .arg(peer.addr.to_string())
        .arg("--identity")
        .arg(operator)
        .output()
        .unwrap();
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr).into_owned());
    }
    serde_json::from_slice(&o.stdout).map_err(|e| e.to_string())
}

pub fn installed(agent: &Agent) -> Option<String> {
    std::fs::read_to_string(agent.install_root.join("srv/tiny/payload.txt")).ok()
}
