//! A fleet of real `shoal agent` processes on loopback addresses, for the mesh tests and
//! the mesh benchmarks: a fleet CA, an operator identity, one identity, config, data dir
//! and log per agent. Every agent process is killed when its handle is dropped.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub fn shoal() -> Command {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
}

fn run_ok(cmd: &mut Command) {
    let o = cmd.output().expect("running shoal");
    assert!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
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

/// One agent: its files, and its process while it runs.
pub struct Agent {
    pub name: String,
    pub addr: SocketAddr,
    pub config: PathBuf,
    pub log: PathBuf,
    pub child: Option<Child>,
    pub log_filter: String,
}

impl Agent {
    /// Writes the agent's identity, config and data dir under `root`.
    pub fn new(root: &Path, ca: &Ca, name: &str, addr: SocketAddr, seeds: &[SocketAddr]) -> Agent {
        let home = root.join(name);
        std::fs::create_dir_all(&home).unwrap();
        ca.issue(name, &home.join("identity"));
        let seeds: Vec<String> = seeds.iter().map(|s| format!("\"{s}\"")).collect();
        let config = home.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "name = \"{name}\"\nlisten = \"{addr}\"\ndata_dir = {:?}\ninstall_root = {:?}\n\
                 identity = {:?}\nseeds = [{}]\n[tags]\nrole = \"inference\"\nhost = \"{name}\"\n",
                home.join("data"),
                home.join("root"),
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
        }
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} is running already", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = shoal()
            .arg("agent")
            .arg("--config")
            .arg(&self.config)
            .env("SHOAL_LOG", &self.log_filter)
            .env("NO_COLOR", "1")
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

/// What `shoal hosts --json` said, or its stderr.
pub fn hosts(peer: SocketAddr, identity: &Path) -> Result<Vec<serde_json::Value>, String> {
    let o = shoal()
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
