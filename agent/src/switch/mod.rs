//! The traffic switch of a switched service (`shoal.service.switch`, decision 0022): one
//! small proxy process per application holds the public port while revisions change, and
//! forwards each new TCP connection to the serving revision's own port on 127.0.0.1.
//!
//! - [`proxy`] is the process (`shoal switch-proxy`): the listener, the control socket,
//!   the forwarding. It outlives the agent: the agent starts it in a session of its own
//!   and records it in `apps/<app>/switch.json` (pid and start time, as services are), so
//!   the next agent adopts it and never signals a recycled pid.
//! - This module is the agent's side: [`ensure`] (adopt or start), [`running`] (adopt
//!   only) and [`Proxy`], whose calls are control requests over `apps/<app>/switch.sock`:
//!   one JSON line each way, bounded in size and time.
//!
//! - [`kernel`] is the fast path (decision 0026): a connect-time redirect (the eBPF
//!   program of [`bpf`]) that sends connections made on this host straight to the serving
//!   revision, kept where the proxy routes by [`Proxy::route`], [`Proxy::hold`],
//!   [`Proxy::unroute`] and [`Proxy::stop`].
//!
//! A route applies to connections accepted after it: open ones keep their backend.
//! [`drain`] waits until neither the proxy ([`Status::open`]) nor the kernel (the
//! connections on the old port, however they came) counts one open to the old revision.

pub mod bpf;
pub mod kernel;
pub mod proxy;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::lifecycle::state::{AppDir, read_json, remove, write_json};

/// How long a hold lasts at most: past it the proxy hands out connections to its backend
/// (the old revision, still running) again by itself, so neither slow hooks between
/// BlockTraffic and AllowTraffic nor an agent that dies there keep a client waiting longer
/// than this.
pub const HOLD_LIMIT: Duration = Duration::from_secs(3);
/// How long a control request may take, connect to answer.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a started proxy has to answer its first `status`.
const START_WITHIN: Duration = Duration::from_secs(5);
/// How long a recorded proxy that runs may fail to answer before it is given up on (and
/// [`ensure`] kills it): a proxy busy for a moment is not a dead one.
const ADOPT_PATIENCE: Duration = Duration::from_secs(2);
/// How often a drain asks how many connections are still open.
const DRAIN_POLL: Duration = Duration::from_millis(25);
/// A control line's largest size, either way.
pub(crate) const MAX_LINE: usize = 1024;

/// Why the switch could not be used, where a caller must tell the cases apart.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    /// The public address could not be bound (another process holds it, say). `reason` is
    /// the proxy's own word for it (`Address already in use (os error 98)`).
    #[error("the switch cannot listen: binding {addr}: {reason}")]
    Bind { addr: SocketAddr, reason: String },
    /// The proxy process exited before it answered, for another reason than its address
    /// (its control socket, its privileges): `log` is the tail of `switch.log`.
    #[error("the switch exited at its start ({status}): {log}")]
    Exited { status: String, log: String },
    /// The proxy process did not answer on its control socket.
    #[error("the switch (pid {pid}) does not answer on {}: {reason}", socket.display())]
    NotAnswering {
        pid: i32,
        socket: PathBuf,
        reason: String,
    },
    /// The proxy answered, and refused the request.
    #[error("the switch refused `{op}`: {reason}")]
    Refused { op: String, reason: String },
}

/// The proxy of one application, as recorded in `switch.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SwitchRecord {
    pub pid: i32,
    /// The process's start time in clock ticks since boot (`/proc/<pid>/stat`, field 22).
    pub start_ticks: u64,
    pub listen: SocketAddr,
}

/// What the proxy says of itself.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Status {
    /// Where new connections go, if anywhere yet.
    pub backend: Option<u16>,
    /// Whether they get a PROXY protocol v2 header first.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// New connections are held: not accepted, waiting in the listen backlog.
    pub held: bool,
    /// Open (proxied) connections per backend port.
    pub open: BTreeMap<u16, u32>,
    /// Connections accepted since the proxy started, those that reached no backend, and
    /// those closed at once for their source's cap (`proxy::MAX_PER_SOURCE`).
    pub accepted: u64,
    pub failed: u64,
    #[serde(default)]
    pub refused: u64,
}

/// A control request.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "lowercase")]
pub(crate) enum Request {
    Route {
        port: u16,
        #[serde(default)]
        proxy_protocol: bool,
    },
    /// No backend: new connections wait in the listen backlog until the next route.
    Unroute,
    /// Held for `for_ms` at most ([`HOLD_LIMIT`] when not given, and never longer).
    Hold {
        #[serde(default = "hold_limit_ms")]
        for_ms: u64,
    },
    Status,
    Stop,
}

fn hold_limit_ms() -> u64 {
    HOLD_LIMIT.as_millis() as u64
}

/// A control answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Answer {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn record_path(dir: &AppDir) -> PathBuf {
    dir.root.join("switch.json")
}

/// The control socket of the app's proxy.
pub fn socket_path(dir: &AppDir) -> PathBuf {
    dir.root.join("switch.sock")
}

fn log_path(dir: &AppDir) -> PathBuf {
    dir.root.join("switch.log")
}

/// A process's start time, if it runs (a zombie does not).
fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split(' ').collect();
    if matches!(*fields.first()?, "Z" | "X") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// The agent's handle on a running proxy.
#[derive(Debug)]
pub struct Proxy {
    record: SwitchRecord,
    socket: PathBuf,
    dir: AppDir,
    /// What it answered when it was adopted or started.
    seen: Status,
    kernel: kernel::Kernel,
}

/// The proxy recorded for this app, if it is still the process that was started (pid and
/// start time) and answers on its control socket (asked again for [`ADOPT_PATIENCE`]).
pub fn running(dir: &AppDir) -> Result<Option<Proxy>> {
    let Some(record) = read_json::<SwitchRecord>(&record_path(dir))? else {
        return Ok(None);
    };
    if start_ticks(record.pid) != Some(record.start_ticks) {
        // A proxy this process started and that died is its zombie until collected.
        crate::lifecycle::service::reap(record.pid);
        return Ok(None);
    }
    let mut proxy = Proxy {
        record,
        socket: socket_path(dir),
        dir: dir.clone(),
        seen: Status::default(),
        kernel: kernel::Kernel::of(dir),
    };
    let since = Instant::now();
    loop {
        match proxy.status() {
            Ok(status) => {
                proxy.seen = status;
                return Ok(Some(proxy));
            }
            Err(e) if since.elapsed() >= ADOPT_PATIENCE => {
                tracing::warn!(
                    "the recorded switch does not answer for {}s: {e:#}",
                    ADOPT_PATIENCE.as_secs()
                );
                return Ok(None);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// The app's proxy on `listen`: the running one, or a new one started (and recorded) once
/// it answers. A proxy on another address is stopped first; one that runs and does not
/// answer is killed, so that its address is free.
pub fn ensure(dir: &AppDir, listen: SocketAddr) -> Result<Proxy> {
    if let Some(proxy) = running(dir)? {
        if proxy.record.listen == listen {
            return Ok(proxy);
        }
        tracing::info!(from = %proxy.record.listen, to = %listen, "the switch moves to another address");
        proxy.stop()?;
    } else if let Some(record) = read_json::<SwitchRecord>(&record_path(dir))?
        && start_ticks(record.pid) == Some(record.start_ticks)
    {
        kill_and_wait(&record);
    }
    start(dir, listen)
}

fn kill_and_wait(record: &SwitchRecord) {
    use nix::sys::signal::{Signal, kill};
    let pid = nix::unistd::Pid::from_raw(record.pid);
    let gone = || {
        crate::lifecycle::service::reap(record.pid);
        start_ticks(record.pid) != Some(record.start_ticks)
    };
    for (signal, grace) in [
        (Signal::SIGTERM, proxy::STOP_GRACE + Duration::from_secs(2)),
        (Signal::SIGKILL, Duration::from_secs(5)),
    ] {
        // Checked before each signal: a pid that is no longer the proxy is never signalled.
        if gone() {
            return;
        }
        let _ = kill(pid, signal);
        let until = Instant::now() + grace;
        while Instant::now() < until {
            if gone() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn start(dir: &AppDir, listen: SocketAddr) -> Result<Proxy> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::process::CommandExt;
    std::fs::create_dir_all(&dir.root)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(log_path(dir))
        .with_context(|| format!("opening {}", log_path(dir).display()))?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let exe = std::env::current_exe().context("finding the agent's own binary")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("switch-proxy")
        .arg("--dir")
        .arg(&dir.root)
        .arg("--listen")
        .arg(listen.to_string())
        .env_clear()
        .env("SHOAL_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe and allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()?;
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the switch")?;
    let pid = child.id() as i32;
    // Recorded at once (the start time is the fork's, which exec keeps): an agent killed
    // from here on leaves a proxy the next one finds, and stops or adopts, rather than one
    // that holds the port unknown.
    let give_up = |child: &mut std::process::Child| {
        let _ = child.kill();
        let _ = child.wait();
        let _ = remove(&record_path(dir));
    };
    let Some(ticks) = start_ticks(pid) else {
        give_up(&mut child);
        let status = child.try_wait().ok().flatten();
        return Err(exited(listen, status, &log_tail(dir, log_start)).into());
    };
    let mut proxy = Proxy {
        record: SwitchRecord {
            pid,
            start_ticks: ticks,
            listen,
        },
        socket: socket_path(dir),
        dir: dir.clone(),
        seen: Status::default(),
        kernel: kernel::Kernel::of(dir),
    };
    if let Err(e) = write_json(&record_path(dir), &proxy.record) {
        give_up(&mut child);
        return Err(e.context("recording the switch"));
    }
    let deadline = Instant::now() + START_WITHIN;
    loop {
        if let Some(status) = child.try_wait()? {
            let _ = remove(&record_path(dir));
            return Err(exited(listen, Some(status), &log_tail(dir, log_start)).into());
        }
        if let Ok(status) = proxy.status() {
            proxy.seen = status;
            // It belongs to the host now, not to this process.
            std::mem::forget(child);
            tracing::info!(pid, %listen, "switch started");
            return Ok(proxy);
        }
        if Instant::now() >= deadline {
            give_up(&mut child);
            let socket = proxy.socket.clone();
            return Err(SwitchError::NotAnswering {
                pid,
                socket,
                reason: format!(
                    "no answer within {}s; its log: {}",
                    START_WITHIN.as_secs(),
                    log_tail(dir, log_start)
                ),
            }
            .into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Why a proxy that exited at its start did: its exit code says whether it was its address
/// ([`proxy::EXIT_BIND`]); the log says why (`binding ADDR: REASON`, what `proxy::main`
/// writes then, else the log's tail as it is).
fn exited(listen: SocketAddr, status: Option<std::process::ExitStatus>, tail: &str) -> SwitchError {
    if status.and_then(|s| s.code()) == Some(proxy::EXIT_BIND) {
        let said = format!("binding {listen}: ");
        // `log_tail` joins the log's lines with ` | `.
        let reason = tail
            .lines()
            .rev()
            .flat_map(|l| l.rsplit(" | "))
            .find_map(|l| l.split_once(said.as_str()).map(|(_, r)| r.trim()))
            .unwrap_or(tail.trim());
        return SwitchError::Bind {
            addr: listen,
            reason: reason.to_string(),
        };
    }
    SwitchError::Exited {
        status: status.map_or_else(|| "gone".to_string(), |s| s.to_string()),
        log: tail.to_string(),
    }
}

fn log_tail(dir: &AppDir, from: u64) -> String {
    crate::lifecycle::service::tail_of(&log_path(dir), from)
}

impl Proxy {
    pub fn record(&self) -> &SwitchRecord {
        &self.record
    }

    /// What the proxy answered when it was adopted or started ([`running`], [`ensure`]),
    /// so that a caller that only looks need not ask again.
    pub fn seen(&self) -> &Status {
        &self.seen
    }

    fn ask(&self, request: &Request) -> Result<Status> {
        let op = serde_json::to_value(request)
            .ok()
            .and_then(|v| v["op"].as_str().map(String::from))
            .unwrap_or_default();
        let not_answering = |reason: String| SwitchError::NotAnswering {
            pid: self.record.pid,
            socket: self.socket.clone(),
            reason,
        };
        let mut stream =
            UnixStream::connect(&self.socket).map_err(|e| not_answering(e.to_string()))?;
        stream
            .set_read_timeout(Some(CONTROL_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(CONTROL_TIMEOUT)))
            .map_err(|e| not_answering(e.to_string()))?;
        let mut line = serde_json::to_vec(request)?;
        line.push(b'\n');
        stream
            .write_all(&line)
            .map_err(|e| not_answering(e.to_string()))?;
        let mut answer = String::new();
        BufReader::new(stream.take(MAX_LINE as u64 * 4))
            .read_line(&mut answer)
            .map_err(|e| not_answering(e.to_string()))?;
        let answer: Answer = serde_json::from_str(&answer)
            .map_err(|e| not_answering(format!("an answer that is not one: {e}")))?;
        match answer {
            Answer {
                ok: true,
                status: Some(status),
                ..
            } => Ok(status),
            Answer { error, .. } => Err(SwitchError::Refused {
                op,
                reason: error.unwrap_or_else(|| "no reason given".into()),
            }
            .into()),
        }
    }

    /// New connections (and held ones) go to 127.0.0.1:`port` from now on, each after a
    /// PROXY protocol v2 header when `switch` asks for one; then the kernel rule sends
    /// those made on this host there too, where `switch` allows it ([`kernel`]).
    pub fn route(&self, port: u16, switch: &crate::appspec::SwitchSpec) -> Result<Status> {
        let status = self.ask(&Request::Route {
            port,
            proxy_protocol: switch.proxy_protocol,
        })?;
        crate::faults::point("switch.proxy-routed");
        self.follow(switch, &status)?;
        Ok(status)
    }

    /// Keeps the kernel rule where the proxy sends new connections, as `status` says (the
    /// supervisor's pass, after an agent restart or a hold that ran out).
    pub fn follow(&self, switch: &crate::appspec::SwitchSpec, status: &Status) -> Result<()> {
        let backend = status.backend.filter(|_| !status.held);
        self.kernel
            .follow(switch, self.record.listen, backend)
            .context("moving the switch's kernel rule")
    }

    /// New connections wait (in the listen backlog, not refused) until the next route, or
    /// [`HOLD_LIMIT`]. Open ones go on. The kernel rule goes first, so that new
    /// connections reach the proxy to wait there.
    pub fn hold(&self) -> Result<Status> {
        self.kernel.clear()?;
        self.ask(&Request::Hold {
            for_ms: HOLD_LIMIT.as_millis() as u64,
        })
    }

    /// New connections wait (in the listen backlog) until the next [`Self::route`]: the
    /// serving process died, and its port is nobody's until it is back. The kernel rule
    /// goes first.
    pub fn unroute(&self) -> Result<Status> {
        self.kernel.clear()?;
        self.ask(&Request::Unroute)
    }

    pub fn status(&self) -> Result<Status> {
        self.ask(&Request::Status)
    }

    /// Stops the proxy (asked, then signalled if it does not go), confirmed gone, and
    /// forgets it.
    pub fn stop(self) -> Result<()> {
        // First: no new connection may be sent past a proxy that is going.
        self.kernel.clear()?;
        let _ = self.ask(&Request::Stop);
        kill_and_wait(&self.record);
        if start_ticks(self.record.pid) == Some(self.record.start_ticks) {
            anyhow::bail!("the switch (pid {}) survived SIGKILL", self.record.pid);
        }
        remove(&record_path(&self.dir))?;
        let _ = std::fs::remove_file(&self.socket);
        tracing::info!(pid = self.record.pid, "switch stopped");
        Ok(())
    }
}

/// Stops the app's proxy if one is recorded, whether it answers or not: the one that
/// answers is asked (`Proxy::stop`), one that runs and does not answer is killed, and a
/// record of one that is gone is forgotten. Nothing recorded, nothing done.
pub fn stop_recorded(dir: &AppDir) -> Result<()> {
    if let Some(proxy) = running(dir)? {
        return proxy.stop();
    }
    if let Some(record) = read_json::<SwitchRecord>(&record_path(dir))? {
        kill_and_wait(&record);
        if start_ticks(record.pid) == Some(record.start_ticks) {
            anyhow::bail!("the switch (pid {}) survived SIGKILL", record.pid);
        }
        remove(&record_path(dir))?;
        let _ = std::fs::remove_file(socket_path(dir));
    }
    Ok(())
}

/// Waits until no connection is open to `port`, or `timeout`: how many still are. Both
/// counts are asked: the proxy's, when one runs (`proxy`), and the kernel's (connections
/// the kernel rule sent, or made to the port directly), whichever is more. A count that
/// cannot be read keeps the drain waiting; the error is returned only when the last read
/// at the timeout failed too. A proxy that is gone counts nothing.
pub fn drain(proxy: Option<&Proxy>, port: u16, timeout: Duration) -> Result<u32> {
    let deadline = Instant::now() + timeout;
    loop {
        let in_kernel = kernel::open_on(port)
            .with_context(|| format!("counting the connections open on port {port}"));
        let in_proxy = match proxy {
            None => Ok(0),
            Some(p) => match p.status() {
                Ok(status) => Ok(status.open.get(&port).copied().unwrap_or(0)),
                Err(_) if start_ticks(p.record.pid) != Some(p.record.start_ticks) => Ok(0),
                Err(e) => Err(e),
            },
        };
        let open = in_kernel.and_then(|k| in_proxy.map(|p| k.max(p)));
        match open {
            Ok(0) => return Ok(0),
            last if Instant::now() >= deadline => return last,
            _ => std::thread::sleep(DRAIN_POLL),
        }
    }
}
