//! The application's process. Hooks cannot spawn processes, so the agent runs the service
//! declared under `shoal.service`:
//! - started in its own process group (so it outlives the agent and is not hit by signals
//!   meant for it), as `shoal.service.user` when given (groups, gid, then uid dropped before
//!   exec), with an explicit environment: [`ENV_ALLOWED`] from the agent's, a fixed `PATH`,
//!   the user's `HOME`/`USER`/`LOGNAME`, the AppSpec's `env`, then `PORT`. Nothing else of
//!   the agent's environment reaches it.
//! - its output appended to `service.log`, which is rotated by size ([`rotate_log`]: copied
//!   to `service.log.1`, then truncated in place, since the service holds it open).
//! - waited on until its health check answers: `GET <health_path>` of `127.0.0.1:$PORT`,
//!   accepted only when the socket listening on `$PORT` belongs to a process of the
//!   service's own tree (its group, or its descendants), so a stale listener left by
//!   something else never makes a new start look healthy.
//! - stopped as a whole process group, and confirmed gone (every member, even when the
//!   leader died first) before the stop returns.
//!
//! What is running is recorded in `service.json` with the leader's start time, so a later
//! agent (or a later `deploy local`) recognises it, and never signals a recycled pid.
//! Where a cgroup v2 hierarchy is mounted and writable, each service also gets a cgroup of
//! its own (beside the agent's, `shoal-<app>-<n>`, recorded in `service.json`): the service
//! is moved into it before exec, so a process that leaves the group (`setsid`) is still
//! counted in its tree, signalled and killed (`cgroup.kill`). Elsewhere the process group
//! is all there is, and such a process escapes the stop (decision 0015).

use std::collections::{BTreeSet, HashSet};
use std::io::{Read, Seek};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Gid, Pid, Uid};
use serde::{Deserialize, Serialize};

use super::state::{AppDir, read_json, remove, write_json};
use crate::appspec::ServiceSpec;
use crate::bundle::RevisionId;

/// Variables the service receives from the agent's own environment, when set there.
pub const ENV_ALLOWED: &[&str] = &["LANG", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "TZ"];

/// The service's `PATH` unless its AppSpec `env` sets one.
pub const SERVICE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `service.log` is rotated once it is larger than this.
pub const MAX_LOG_BYTES: u64 = 16 * 1024 * 1024;

/// How long the group has after SIGTERM before SIGKILL, and after SIGKILL before the stop
/// is reported as failed.
pub(crate) const TERM_GRACE: Duration = Duration::from_secs(10);
pub(crate) const KILL_GRACE: Duration = Duration::from_secs(5);

/// Why a service could not be started or stopped, where a caller must tell them apart.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Processes of the service's group were still there after SIGKILL.
    #[error("processes {pids:?} of the service's group {group} survived SIGKILL")]
    Survived { group: i32, pids: Vec<i32> },
    /// `shoal.service.user` names no user of this host.
    #[error("the service user `{0}` does not exist on this host")]
    NoSuchUser(String),
    /// Something listens on `$PORT`, but no process of the service's own tree does.
    #[error("port {port} answers, but its listener is not the service's (a stale process?)")]
    ForeignListener { port: u16 },
}

/// A service the agent started.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceRecord {
    pub revision: RevisionId,
    pub pid: i32,
    /// The process's start time in clock ticks since boot (`/proc/<pid>/stat`, field 22).
    pub start_ticks: u64,
    pub port: Option<u16>,
    /// The service's own cgroup (v2), when the host has one to give.
    #[serde(default)]
    pub cgroup: Option<std::path::PathBuf>,
    /// How many times the supervisor started this revision's service again after it
    /// exited (0 for the start a deployment made): gossiped, so a rollout's health gate sees
    /// a service that does not stay up.
    #[serde(default)]
    pub restarts: u32,
    /// A switched service's previous revision kept running after the switch: until when
    /// (milliseconds since the epoch) it is kept for a switch back. Standby only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_until_ms: Option<u64>,
}

/// Which of an application's service records: the one the supervisor keeps running
/// (`service.json`), or a switched service's other process (`standby.json`): the new
/// revision's while it is started and validated, the previous one's while it drains or
/// is kept warm after the switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    Serving,
    Standby,
}

impl Slot {
    fn path(self, dir: &AppDir) -> std::path::PathBuf {
        match self {
            Slot::Serving => dir.service(),
            Slot::Standby => dir.standby(),
        }
    }
}

/// Where this agent makes services' cgroups: children of its own cgroup in the cgroup v2
/// hierarchy (`/proc/self/mountinfo`, `/proc/self/cgroup`), if there is one.
fn cgroup_parent() -> Option<std::path::PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mount = mounts.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (right.split(' ').next()? == "cgroup2").then(|| left.split(' ').nth(4).map(String::from))?
    })?;
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let own = own.lines().find_map(|l| l.strip_prefix("0::"))?.trim();
    let mut parent = std::path::PathBuf::from(mount);
    parent.push(own.trim_start_matches('/'));
    parent.is_dir().then_some(parent)
}

/// Makes a cgroup for one start of `app`'s service; `None` (said in the log) where the
/// host has no cgroup v2 to give.
fn new_cgroup(app: &str) -> Option<std::path::PathBuf> {
    let parent = cgroup_parent()?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir = parent.join(format!("shoal-{app}-{nanos:x}"));
    match std::fs::create_dir(&dir) {
        Ok(()) => Some(dir),
        Err(e) => {
            tracing::warn!(
                app,
                "no cgroup for the service ({}: {e}); its process group alone contains it",
                dir.display()
            );
            None
        }
    }
}

/// The live processes of a cgroup.
fn cgroup_members(cgroup: &Path) -> Vec<i32> {
    std::fs::read_to_string(cgroup.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .filter(|pid| proc_stat(*pid).is_some_and(|p| !p.zombie))
        .collect()
}

/// One process, as `/proc/<pid>/stat` says.
#[derive(Clone, Copy, Debug)]
struct Proc {
    pid: i32,
    ppid: i32,
    pgrp: i32,
    zombie: bool,
    start_ticks: u64,
}

fn proc_stat(pid: i32) -> Option<Proc> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields resume after the last ')'.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split(' ').collect();
    Some(Proc {
        pid,
        zombie: matches!(*fields.first()?, "Z" | "X"),
        ppid: fields.get(1)?.parse().ok()?,
        pgrp: fields.get(2)?.parse().ok()?,
        start_ticks: fields.get(19)?.parse().ok()?,
    })
}

/// Every live (not zombie) process of the host.
fn processes() -> Vec<Proc> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(proc_stat)
        .filter(|p| !p.zombie)
        .collect()
}

fn start_ticks(pid: i32) -> Option<u64> {
    proc_stat(pid).filter(|p| !p.zombie).map(|p| p.start_ticks)
}

impl ServiceRecord {
    /// Whether the recorded process is still the one we started.
    pub fn is_running(&self) -> bool {
        start_ticks(self.pid) == Some(self.start_ticks)
    }

    /// Whether the process group named by `pid` is still this service's. The group's id
    /// cannot be handed to another process while any member lives, so a group whose leader
    /// died is still ours; a leader with another start time means the pid was reused after
    /// our whole group was gone.
    fn owns_group(&self) -> bool {
        match start_ticks(self.pid) {
            Some(ticks) => ticks == self.start_ticks,
            None => true,
        }
    }

    /// The live members of the service's process group (the leader included, if alive)
    /// and of its cgroup.
    fn group(&self) -> Vec<i32> {
        let mut members: BTreeSet<i32> = self
            .cgroup
            .as_deref()
            .map(cgroup_members)
            .unwrap_or_default()
            .into_iter()
            .collect();
        if self.owns_group() {
            members.extend(
                processes()
                    .into_iter()
                    .filter(|p| p.pgrp == self.pid)
                    .map(|p| p.pid),
            );
        }
        members.into_iter().collect()
    }

    /// The descriptors of the service's tree that are sockets, as their links read
    /// (`socket:[INODE]`).
    fn sockets(&self) -> HashSet<String> {
        let mut sockets = HashSet::new();
        for pid in self.tree() {
            let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
                continue;
            };
            for fd in fds.flatten() {
                if let Ok(target) = std::fs::read_link(fd.path()) {
                    let target = target.to_string_lossy();
                    if target.starts_with("socket:[") {
                        sockets.insert(target.into_owned());
                    }
                }
            }
        }
        sockets
    }

    /// The service's tree: its group and every descendant of it (a child that made a group
    /// of its own included).
    fn tree(&self) -> BTreeSet<i32> {
        let all = processes();
        let mut tree: BTreeSet<i32> = self.group().into_iter().collect();
        loop {
            let before = tree.len();
            for p in &all {
                if tree.contains(&p.ppid) {
                    tree.insert(p.pid);
                }
            }
            if tree.len() == before {
                return tree;
            }
        }
    }
}

/// The service recorded for this application, if any.
pub fn current(dir: &AppDir) -> Result<Option<ServiceRecord>> {
    read_json(&dir.service())
}

/// The service recorded in `slot`, if any.
pub fn current_in(dir: &AppDir, slot: Slot) -> Result<Option<ServiceRecord>> {
    read_json(&slot.path(dir))
}

/// The running service of `revision`, in whichever slot it is.
pub fn running_of(dir: &AppDir, revision: &RevisionId) -> Result<Option<(Slot, ServiceRecord)>> {
    for slot in [Slot::Serving, Slot::Standby] {
        if let Some(r) = current_in(dir, slot)?
            && &r.revision == revision
            && r.is_running()
        {
            return Ok(Some((slot, r)));
        }
    }
    Ok(None)
}

/// Makes the standby service the serving one and the serving one the standby, by three
/// renames through `swapping.json`; [`settle_swap`] finishes one a crash interrupted.
pub fn swap(dir: &AppDir) -> Result<()> {
    let rename = |from: &Path, to: &Path| -> Result<()> {
        match std::fs::rename(from, to) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("renaming {}", from.display())),
        }
    };
    rename(&dir.service(), &dir.swapping())?;
    crate::faults::point("switch.swap-half");
    rename(&dir.standby(), &dir.service())?;
    rename(&dir.swapping(), &dir.standby())?;
    crate::durable::sync_dir(&dir.root)
}

/// Finishes a [`swap`] that a crash interrupted (under the application's lock): the
/// records end in their new places, none lost.
pub fn settle_swap(dir: &AppDir) -> Result<()> {
    if !dir.swapping().exists() {
        return Ok(());
    }
    if !dir.service().exists() && dir.standby().exists() {
        std::fs::rename(dir.standby(), dir.service())?;
    }
    std::fs::rename(dir.swapping(), dir.standby())?;
    crate::durable::sync_dir(&dir.root)
}

/// Stops the service recorded in `slot`, if it is still the one we started, and forgets it.
pub fn stop_in(dir: &AppDir, slot: Slot) -> Result<()> {
    if let Some(record) = current_in(dir, slot)? {
        stop_record(&record)?;
    }
    remove(&slot.path(dir))
}

/// Records how long the standby service is kept warm.
pub fn keep_warm(dir: &AppDir, until_ms: u64) -> Result<()> {
    if let Some(mut record) = current_in(dir, Slot::Standby)? {
        record.warm_until_ms = Some(until_ms);
        write_json(&dir.standby(), &record)?;
    }
    Ok(())
}

/// A TCP port of 127.0.0.1 that was free a moment ago, for a switched service's `$PORT`.
/// Its start is checked to hold it (the listener must be the service's own).
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// Starts `spec` from the release at `release`, waits until it is healthy, and records it.
pub fn start(
    dir: &AppDir,
    release: &Path,
    revision: &RevisionId,
    spec: &ServiceSpec,
    port: Option<u16>,
) -> Result<ServiceRecord> {
    spawn(dir, release, revision, spec, port, 0)?.wait()
}

/// A service spawned and recorded, not yet healthy: [`Starting::wait`] decides. The
/// supervisor spawns under the application's lock and waits without it.
pub struct Starting {
    slot: Slot,
    dir: AppDir,
    child: Child,
    record: ServiceRecord,
    spec: ServiceSpec,
    log_start: u64,
    started: Instant,
}

/// Who the service runs as.
struct RunAs {
    uid: Uid,
    gid: Gid,
    groups: Vec<Gid>,
    name: String,
    home: std::path::PathBuf,
}

fn run_as(name: &str) -> Result<RunAs> {
    let user = nix::unistd::User::from_name(name)
        .with_context(|| format!("looking up the service user `{name}`"))?
        .ok_or_else(|| ServiceError::NoSuchUser(name.to_string()))?;
    let cname = std::ffi::CString::new(name).context("a user name with a NUL")?;
    let groups = nix::unistd::getgrouplist(&cname, user.gid)
        .with_context(|| format!("reading the groups of `{name}`"))?;
    Ok(RunAs {
        uid: user.uid,
        gid: user.gid,
        groups,
        name: user.name,
        home: user.dir,
    })
}

/// The service's whole environment (see the module's doc).
fn environment(
    spec: &ServiceSpec,
    port: Option<u16>,
    user: Option<&RunAs>,
) -> Vec<(String, String)> {
    let mut env: std::collections::BTreeMap<String, String> = ENV_ALLOWED
        .iter()
        .filter_map(|k| Some((k.to_string(), std::env::var(k).ok()?)))
        .collect();
    env.insert("PATH".into(), SERVICE_PATH.into());
    if let Some(u) = user {
        env.insert("HOME".into(), u.home.to_string_lossy().into_owned());
        env.insert("USER".into(), u.name.clone());
        env.insert("LOGNAME".into(), u.name.clone());
    }
    env.extend(spec.env.clone());
    if let Some(port) = port {
        env.insert("PORT".into(), port.to_string());
    }
    env.into_iter().collect()
}

/// The application's writable directory (`apps/<app>/work`, shared with its hooks as
/// `/work`), owned by the service's user when it has one. The release the service runs in
/// is the revision as deployed: a change there is caught before the release is used again
/// (`run.rs`), so what the app writes belongs here. Opened without following a link and
/// changed through the open descriptor.
fn work_dir(dir: &AppDir, user: Option<&RunAs>) -> Result<std::path::PathBuf> {
    let work = dir.work();
    match std::fs::DirBuilder::new().mode(0o750).create(&work) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("creating {}", work.display())),
    }
    let fd = nix::fcntl::open(
        &work,
        nix::fcntl::OFlag::O_RDONLY
            | nix::fcntl::OFlag::O_DIRECTORY
            | nix::fcntl::OFlag::O_NOFOLLOW
            | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .with_context(|| {
        format!(
            "opening {} (it must be a directory, not a link)",
            work.display()
        )
    })?;
    if let Some(u) = user {
        nix::unistd::fchown(&fd, Some(u.uid), Some(u.gid))
            .with_context(|| format!("giving {} to {}", work.display(), u.name))?;
    }
    Ok(work)
}

/// Starts `spec` and records it in `service.json`; does not wait for it to be healthy.
pub fn spawn(
    dir: &AppDir,
    release: &Path,
    revision: &RevisionId,
    spec: &ServiceSpec,
    port: Option<u16>,
    restarts: u32,
) -> Result<Starting> {
    spawn_in(Slot::Serving, dir, release, revision, spec, port, restarts)
}

/// [`spawn`], recorded in `slot`.
pub fn spawn_in(
    slot: Slot,
    dir: &AppDir,
    release: &Path,
    revision: &RevisionId,
    spec: &ServiceSpec,
    port: Option<u16>,
    restarts: u32,
) -> Result<Starting> {
    use std::os::unix::process::CommandExt;
    let program = if Path::new(&spec.command).is_absolute() {
        spec.command.clone().into()
    } else {
        release.join(&spec.command)
    };
    let user = spec.user.as_deref().map(run_as).transpose()?;
    let app = dir
        .root
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let cgroup = new_cgroup(&app);
    // Opened before the fork: the child only writes to it.
    let cgroup_procs = match &cgroup {
        Some(cg) => Some(
            std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(nix::libc::O_CLOEXEC)
                .open(cg.join("cgroup.procs"))
                .with_context(|| format!("opening {}/cgroup.procs", cg.display()))?,
        ),
        None => None,
    };
    rotate_log(dir, MAX_LOG_BYTES)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(dir.service_log())
        .with_context(|| format!("opening {}", dir.service_log().display()))?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let work = work_dir(dir, user.as_ref())?;
    let mut cmd = Command::new(&program);
    cmd.args(&spec.args)
        .current_dir(release)
        .env_clear()
        .envs(environment(spec, port, user.as_ref()))
        .env("SHOAL_RELEASE_DIR", release)
        .env("SHOAL_WORK_DIR", &work)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0);
    if cgroup_procs.is_some() || user.is_some() {
        // SAFETY: between fork and exec only async-signal-safe system calls run here
        // (write to a descriptor opened before the fork; setgroups, setgid, setuid on
        // values computed before it); no allocation.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(procs) = &cgroup_procs {
                    // "0": the writing process itself, into the service's cgroup.
                    nix::unistd::write(procs, b"0")?;
                }
                if let Some(u) = &user {
                    nix::unistd::setgroups(&u.groups)?;
                    nix::unistd::setgid(u.gid)?;
                    nix::unistd::setuid(u.uid)?;
                }
                Ok(())
            });
        }
    }
    let child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            if let Some(cg) = &cgroup {
                let _ = std::fs::remove_dir(cg);
            }
            return Err(e).with_context(|| format!("starting the service {}", program.display()));
        }
    };
    let pid = child.id() as i32;
    let record = ServiceRecord {
        revision: revision.clone(),
        pid,
        // A zombie too: a service that exits at once is reported by `Starting::wait` with
        // its output, not as a start time that could not be read.
        start_ticks: proc_stat(pid)
            .map(|p| p.start_ticks)
            .context("reading the service's start time")?,
        port,
        cgroup,
        restarts,
        warm_until_ms: None,
    };
    write_json(&slot.path(dir), &record)?;
    Ok(Starting {
        slot,
        dir: dir.clone(),
        child,
        record,
        spec: spec.clone(),
        log_start,
        started: Instant::now(),
    })
}

impl Starting {
    pub fn pid(&self) -> i32 {
        self.record.pid
    }

    /// Waits until the service is healthy (its record then stays), or stops it and says
    /// why not: it exited, or did not become healthy within its `start_timeout`.
    pub fn wait(self) -> Result<ServiceRecord> {
        self.wait_unless(|| false)
            .map(|r| r.expect("never given up"))
    }

    /// [`Self::wait`], but gives up waiting (`Ok(None)`) as soon as `give_up` says so, an
    /// agent shutting down, say: the service is left starting, recorded, for the next
    /// agent to adopt or restart, and the caller is not held for up to `start_timeout`.
    pub fn wait_unless(mut self, give_up: impl Fn() -> bool) -> Result<Option<ServiceRecord>> {
        let deadline = self.started + self.spec.start_timeout;
        let mut foreign = false;
        loop {
            if give_up() {
                std::mem::forget(self.child);
                return Ok(None);
            }
            if let Some(status) = self.child.try_wait()? {
                let _ = stop_record(&self.record);
                remove_if_ours(&self.dir, self.slot, &self.record);
                bail!(
                    "the service exited with {status} while starting; its output: {}",
                    log_tail(&self.dir, self.log_start)
                );
            }
            let healthy = match (self.record.port, &self.spec.health_path) {
                (Some(port), Some(path)) => match listener_is_ours(&self.record, port) {
                    Some(true) => http_ok(port, path),
                    Some(false) => {
                        foreign |= http_ok(port, path);
                        false
                    }
                    None => false,
                },
                // Without a health check, a service that stays up for a second counts as started.
                _ => self.started.elapsed() >= Duration::from_secs(1),
            };
            if healthy {
                // The child is not waited for: it belongs to the host now, not to this process.
                std::mem::forget(self.child);
                return Ok(Some(self.record));
            }
            if Instant::now() >= deadline {
                let _ = stop_record(&self.record);
                remove_if_ours(&self.dir, self.slot, &self.record);
                let why = anyhow!(
                    "the service did not become healthy within {}s; its output: {}",
                    self.spec.start_timeout.as_secs(),
                    log_tail(&self.dir, self.log_start)
                );
                return Err(match (foreign, self.record.port) {
                    (true, Some(port)) => why.context(ServiceError::ForeignListener { port }),
                    _ => why,
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Removes `slot`'s record if it still names `record` (a deployment may have replaced it).
fn remove_if_ours(dir: &AppDir, slot: Slot, record: &ServiceRecord) {
    if current_in(dir, slot).ok().flatten().as_ref() == Some(record) {
        let _ = remove(&slot.path(dir));
    }
}

/// A TCP socket listening on a port: its inode and its local address.
struct Listener {
    inode: u64,
    addr: std::net::IpAddr,
}

/// An address as `/proc/net/tcp{,6}` writes it: 32-bit words in hex, each in host order.
fn proc_addr(hex: &str) -> Option<std::net::IpAddr> {
    let word = |i: usize| -> Option<[u8; 4]> {
        Some(
            u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16)
                .ok()?
                .to_ne_bytes(),
        )
    };
    match hex.len() {
        8 => Some(std::net::Ipv4Addr::from(word(0)?).into()),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Some(std::net::Ipv6Addr::from(bytes).into())
        }
        _ => None,
    }
}

/// Inodes of the TCP sockets listening on `port` (IPv4 and IPv6).
fn listening_inodes(port: u16) -> HashSet<u64> {
    listeners(port).into_iter().map(|l| l.inode).collect()
}

/// The TCP sockets listening on `port` (IPv4 and IPv6).
fn listeners(port: u16) -> Vec<Listener> {
    let mut found = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
                continue;
            };
            let Some((addr, local_port)) = local.rsplit_once(':') else {
                continue;
            };
            if *state == "0A"
                && u16::from_str_radix(local_port, 16).ok() == Some(port)
                && let (Ok(inode), Some(addr)) = (inode.parse(), proc_addr(addr))
            {
                found.push(Listener { inode, addr });
            }
        }
    }
    found
}

/// Who listens on a port the proxy would route to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// Nothing listens.
    Nobody,
    /// Only the service's own processes do. `wide` is an address other than loopback
    /// they listen on too (`0.0.0.0`, say), where clients reach the service past the
    /// switch.
    Service { wide: Option<std::net::IpAddr> },
    /// Another process does (as well): traffic must not go there.
    Foreign,
}

/// Who gets the proxy's connections to 127.0.0.1:`port`: the listeners on 127.0.0.1,
/// 0.0.0.0 or `::` (one on `::1` or 127.0.0.2 never does). [`Holder::Service`] only when
/// every one of them is a socket of the service's own tree; `wide` is then any address
/// of the service's, past loopback, that it listens on.
pub fn holder(record: &ServiceRecord, port: u16) -> Holder {
    let found = listeners(port);
    let receives = |a: std::net::IpAddr| {
        let a = a.to_canonical();
        a == std::net::Ipv4Addr::LOCALHOST || a.is_unspecified()
    };
    let receiving: Vec<&Listener> = found.iter().filter(|l| receives(l.addr)).collect();
    if receiving.is_empty() {
        return Holder::Nobody;
    }
    let ours = record.sockets();
    let is_ours = |l: &Listener| ours.contains(&format!("socket:[{}]", l.inode));
    if receiving.iter().any(|l| !is_ours(l)) {
        return Holder::Foreign;
    }
    Holder::Service {
        wide: found
            .iter()
            .filter(|l| is_ours(l))
            .map(|l| l.addr)
            .find(|a| !a.to_canonical().is_loopback()),
    }
}

/// Whether the socket listening on `port` belongs to the service's tree: `None` when
/// nothing listens, `Some(false)` when only other processes do.
fn listener_is_ours(record: &ServiceRecord, port: u16) -> Option<bool> {
    let inodes = listening_inodes(port);
    if inodes.is_empty() {
        return None;
    }
    let ours = record.sockets();
    Some(
        inodes
            .iter()
            .any(|i| ours.contains(&format!("socket:[{i}]"))),
    )
}

/// Whether the app's running service answers `GET path` on `127.0.0.1:port` with 2xx
/// while its own processes hold the port (the check of its start, asked again).
pub fn healthy(dir: &AppDir, port: u16, path: &str) -> bool {
    healthy_in(dir, Slot::Serving, port, path)
}

/// [`healthy`] for the service recorded in `slot`.
pub fn healthy_in(dir: &AppDir, slot: Slot, port: u16, path: &str) -> bool {
    match current_in(dir, slot) {
        Ok(Some(record)) if record.is_running() => {
            listener_is_ours(&record, port) == Some(true) && http_ok(port, path)
        }
        _ => false,
    }
}

/// Whether `GET path` of `127.0.0.1:port` answers 2xx within a second: the host is fixed
/// whatever `path` holds (which the AppSpec parser already checked to be a path).
pub fn http_ok(port: u16, path: &str) -> bool {
    if crate::appspec::health_path(path).is_err() {
        return false;
    }
    let Ok(uri) = format!("http://127.0.0.1:{port}{path}").parse::<ureq::http::Uri>() else {
        return false;
    };
    if uri.host() != Some("127.0.0.1") || uri.port_u16() != Some(port) {
        return false;
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .proxy(None)
        .max_redirects(0)
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(1)))
        .build()
        .into();
    agent.get(uri).call().is_ok_and(|r| r.status().is_success())
}

fn log_tail(dir: &AppDir, from: u64) -> String {
    tail_of(&dir.service_log(), from)
}

/// The last 600 bytes of the log at `path` written from offset `from` on, its lines joined
/// by ` | ` (`(none)` when there are none); the log is opened without following a link.
pub(crate) fn tail_of(path: &Path, from: u64) -> String {
    let Ok(mut file) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
    else {
        return "(none)".into();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let from = from.max(len.saturating_sub(600)).min(len);
    let mut tail = Vec::new();
    let _ = file
        .seek(std::io::SeekFrom::Start(from))
        .and_then(|_| file.take(600).read_to_end(&mut tail));
    let tail = String::from_utf8_lossy(&tail).trim().replace('\n', " | ");
    if tail.is_empty() {
        "(none)".into()
    } else {
        tail
    }
}

/// Rotates `service.log` once it is larger than `max`: its content is copied to
/// `service.log.1` (replacing the one before), then the log is truncated in place, so the
/// running service, which appends to the same open file, keeps logging. Lines written
/// between the copy and the truncation are lost. Returns whether it rotated.
pub fn rotate_log(dir: &AppDir, max: u64) -> Result<bool> {
    let path = dir.service_log();
    let mut log = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    let len = log.metadata()?.len();
    if len <= max {
        return Ok(false);
    }
    let old = path.with_extension("log.1");
    let tmp = path.with_extension("log.1.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut copy = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    std::io::copy(&mut (&mut log).take(len), &mut copy)?;
    copy.sync_all()?;
    std::fs::rename(&tmp, &old)?;
    log.set_len(0)?;
    Ok(true)
}

/// Stops the recorded service, if it is still the one we started, and forgets it.
pub fn stop(dir: &AppDir) -> Result<()> {
    if let Some(record) = current(dir)? {
        stop_record(&record)?;
    }
    remove(&dir.service())
}

/// SIGTERM to the service's whole process group, SIGKILL to what is left after
/// [`TERM_GRACE`], and waits until no member is left (the leader may have died first).
fn stop_record(record: &ServiceRecord) -> Result<(), ServiceError> {
    let group = Pid::from_raw(record.pid);
    let gone_within = |grace: Duration| {
        let deadline = Instant::now() + grace;
        loop {
            reap(record.pid);
            let left = record.group();
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(left);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let signal_all = |signal: Signal| {
        if record.owns_group() {
            let _ = killpg(group, signal);
        }
        if let Some(cg) = &record.cgroup {
            for pid in cgroup_members(cg) {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), signal);
            }
        }
    };
    let result = if record.group().is_empty() {
        reap(record.pid);
        Ok(())
    } else {
        signal_all(Signal::SIGTERM);
        match gone_within(TERM_GRACE) {
            Ok(()) => Ok(()),
            Err(_) => {
                if let Some(cg) = &record.cgroup {
                    let _ = std::fs::write(cg.join("cgroup.kill"), b"1");
                }
                signal_all(Signal::SIGKILL);
                gone_within(KILL_GRACE).map_err(|pids| ServiceError::Survived {
                    group: record.pid,
                    pids,
                })
            }
        }
    };
    if result.is_ok()
        && let Some(cg) = &record.cgroup
    {
        // Empty now: removing it cannot fail for its content.
        let _ = std::fs::remove_dir(cg);
    }
    result
}

/// Collects the exit status of a child of this process, so it does not linger as a zombie.
pub fn reap(pid: i32) {
    let _ = nix::sys::wait::waitpid(
        Pid::from_raw(pid),
        Some(nix::sys::wait::WaitPidFlag::WNOHANG),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::io::Write;

    fn spec(command: &str, args: &[&str]) -> ServiceSpec {
        ServiceSpec {
            command: command.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: BTreeMap::new(),
            port: None,
            health_path: None,
            start_timeout: Duration::from_secs(5),
            user: None,
            switch: None,
            line: 1,
        }
    }

    fn app(tmp: &Path) -> (AppDir, std::path::PathBuf) {
        let dir = AppDir::new(tmp, "web");
        std::fs::create_dir_all(&dir.root).unwrap();
        let release = tmp.join("release");
        std::fs::create_dir_all(&release).unwrap();
        (dir, release)
    }

    fn rev() -> RevisionId {
        RevisionId("a".repeat(64))
    }

    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn the_whole_group_is_stopped_even_when_its_leader_died_first() {
        let tmp = tempfile::tempdir().unwrap();
        // The leader starts a child that ignores SIGTERM, prints its pid, then exits.
        let script = "trap '' TERM; sh -c 'trap \"\" TERM; echo child $$; exec sleep 600' & sleep 1.5; exit 0";
        let (dir, record, child) = start_and_read_pid(tmp.path(), script, "child ");
        wait_for("the leader to die", || {
            reap(record.pid);
            !record.is_running()
        });
        assert!(proc_stat(child).is_some_and(|p| p.pgrp == record.pid && !p.zombie));
        stop(&dir).unwrap();
        assert!(
            proc_stat(child).is_none_or(|p| p.zombie),
            "the member ignoring SIGTERM survived the stop"
        );
        assert!(current(&dir).unwrap().is_none());
    }

    /// Starts `/bin/sh -c script` as a service, then waits for the pid it prints on a line
    /// `{tag} PID` to its log.
    fn start_and_read_pid(tmp: &Path, script: &str, tag: &str) -> (AppDir, ServiceRecord, i32) {
        let (dir, release) = app(tmp);
        let record = start(
            &dir,
            &release,
            &rev(),
            &spec("/bin/sh", &["-c", script]),
            None,
        )
        .unwrap();
        let printed = || {
            std::fs::read_to_string(dir.service_log())
                .unwrap()
                .lines()
                .find_map(|l| l.strip_prefix(tag)?.trim().parse::<i32>().ok())
        };
        wait_for(&format!("the {tag} pid"), || printed().is_some());
        let pid = printed().unwrap();
        (dir, record, pid)
    }

    /// A test-owned listener on a port the test bound itself: answers 200 to anything.
    fn stale_listener() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut s = stream;
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                );
            }
        });
        port
    }

    #[test]
    fn a_process_that_leaves_the_group_is_stopped_where_cgroups_exist() {
        let tmp = tempfile::tempdir().unwrap();
        let script = "setsid sh -c 'echo escaped $$; exec sleep 600' & exec sleep 600";
        let (dir, record, escaped) = start_and_read_pid(tmp.path(), script, "escaped ");
        assert!(
            proc_stat(escaped).is_some_and(|p| p.pgrp != record.pid),
            "it left the group"
        );
        stop(&dir).unwrap();
        let alive = proc_stat(escaped).is_some_and(|p| !p.zombie);
        match cgroup_parent() {
            Some(_) => {
                let cg = record
                    .cgroup
                    .as_ref()
                    .expect("a cgroup where the host has one");
                assert!(!alive, "the cgroup's member survived the stop");
                assert!(!cg.exists(), "the service's cgroup is removed");
            }
            // No cgroup v2 here: the process group is all there is, and the escapee lives.
            None => {
                assert!(alive);
                let _ = nix::sys::signal::kill(Pid::from_raw(escaped), Signal::SIGKILL);
            }
        }
    }

    #[test]
    fn a_listener_outside_the_service_tree_is_not_health() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, release) = app(tmp.path());
        let port = stale_listener();
        let mut s = spec("/bin/sleep", &["600"]);
        s.health_path = Some("/health".into());
        s.start_timeout = Duration::from_secs(2);
        let err = start(&dir, &release, &rev(), &s, Some(port)).unwrap_err();
        assert!(
            matches!(
                err.downcast_ref::<ServiceError>(),
                Some(ServiceError::ForeignListener { port: p }) if *p == port
            ),
            "{err:#}"
        );
        assert!(
            current(&dir).unwrap().is_none(),
            "a failed start is not recorded"
        );
        // The same check accepts a listener the service's own tree holds.
        let own = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let own_port = own.local_addr().unwrap().port();
        let me = ServiceRecord {
            revision: rev(),
            pid: nix::unistd::getpgrp().as_raw(),
            start_ticks: start_ticks(nix::unistd::getpgrp().as_raw()).unwrap_or(0),
            port: Some(own_port),
            cgroup: None,
            restarts: 0,
            warm_until_ms: None,
        };
        if me.owns_group() {
            assert_eq!(listener_is_ours(&me, own_port), Some(true));
            // The switch's check: the service's alone, on loopback.
            assert_eq!(holder(&me, own_port), Holder::Service { wide: None });
            // Another process listening too is foreign (the stale listener is this
            // process's, so a record of another tree sees it as foreign).
            let other = ServiceRecord {
                pid: i32::MAX - 1,
                start_ticks: 1,
                ..me.clone()
            };
            assert_eq!(holder(&other, port), Holder::Foreign);
            // Past loopback: still the service's, and said so.
            let wide = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
            let wide_port = wide.local_addr().unwrap().port();
            assert_eq!(
                holder(&me, wide_port),
                Holder::Service {
                    wide: Some("0.0.0.0".parse().unwrap())
                }
            );
        }
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let free_port = free.local_addr().unwrap().port();
        drop(free);
        assert_eq!(holder(&me, free_port), Holder::Nobody);
    }

    #[test]
    fn proc_net_addresses_are_read_in_host_order() {
        assert_eq!(proc_addr("0100007F"), Some("127.0.0.1".parse().unwrap()));
        assert_eq!(proc_addr("00000000"), Some("0.0.0.0".parse().unwrap()));
        assert_eq!(
            proc_addr("00000000000000000000000001000000"),
            Some("::1".parse().unwrap())
        );
        assert_eq!(proc_addr("0100007"), None);
        assert_eq!(proc_addr("zz00007F"), None);
    }

    #[test]
    fn the_service_environment_is_explicit() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, release) = app(tmp.path());
        let mut s = spec("/bin/sh", &["-c", "env; exec sleep 600"]);
        s.env.insert("GREETING".into(), "hello".into());
        start(&dir, &release, &rev(), &s, Some(4321)).unwrap();
        let log = std::fs::read_to_string(dir.service_log()).unwrap();
        stop(&dir).unwrap();
        let names: BTreeSet<&str> = log
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, _)| k)
            .collect();
        assert!(
            log.contains("GREETING=hello") && log.contains("PORT=4321"),
            "{log}"
        );
        assert!(log.contains(&format!("PATH={SERVICE_PATH}")), "{log}");
        assert!(
            log.contains(&format!("SHOAL_WORK_DIR={}", dir.work().display())),
            "{log}"
        );
        let inherited: Vec<String> = std::env::vars()
            .map(|(k, _)| k)
            .filter(|k| !ENV_ALLOWED.contains(&k.as_str()) && k != "PATH")
            .collect();
        assert!(
            !inherited.is_empty(),
            "the test runs with variables of its own"
        );
        for k in &inherited {
            // `sh` itself sets a few (PWD, SHLVL); nothing of the agent's comes through.
            if !["PWD", "SHLVL", "_", "OLDPWD"].contains(&k.as_str()) {
                assert!(!names.contains(k.as_str()), "{k} was inherited: {log}");
            }
        }
    }

    #[test]
    fn the_log_is_rotated_by_size_while_the_service_keeps_it_open() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, release) = app(tmp.path());
        let script = "head -c 5000 /dev/zero | tr '\\0' x; echo; echo mark-1; exec sleep 600";
        start(
            &dir,
            &release,
            &rev(),
            &spec("/bin/sh", &["-c", script]),
            None,
        )
        .unwrap();
        wait_for("the first output", || {
            std::fs::read_to_string(dir.service_log()).is_ok_and(|l| l.contains("mark-1"))
        });
        assert!(!rotate_log(&dir, 1_000_000).unwrap(), "small logs stay");
        assert!(rotate_log(&dir, 1000).unwrap());
        let old = std::fs::read_to_string(dir.service_log().with_extension("log.1")).unwrap();
        assert!(old.contains("mark-1") && old.len() > 5000);
        assert_eq!(std::fs::metadata(dir.service_log()).unwrap().len(), 0);
        stop(&dir).unwrap();
    }

    #[test]
    fn the_service_runs_as_its_user() {
        let Ok(Some(nobody)) = nix::unistd::User::from_name("nobody") else {
            panic!("the test host has a `nobody` user");
        };
        assert!(Uid::effective().is_root(), "tests run as root");
        let tmp = tempfile::tempdir().unwrap();
        let (dir, release) = app(tmp.path());
        use std::os::unix::fs::PermissionsExt;
        for d in [tmp.path(), release.as_path()] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let mut s = spec(
            "/bin/sh",
            &[
                "-c",
                "echo uid=$(id -u) gid=$(id -g) user=$USER; \
                 echo w > \"$SHOAL_WORK_DIR/w\" && echo wrote-work; \
                 (echo x > ./planted) 2>/dev/null && echo wrote-release || echo release-kept; \
                 exec sleep 600",
            ],
        );
        s.user = Some("nobody".into());
        start(&dir, &release, &rev(), &s, None).unwrap();
        let log = std::fs::read_to_string(dir.service_log()).unwrap();
        stop(&dir).unwrap();
        assert!(
            log.contains(&format!(
                "uid={} gid={} user=nobody",
                nobody.uid, nobody.gid
            )),
            "{log}"
        );
        assert!(
            log.contains("wrote-work") && log.contains("release-kept"),
            "its work directory is its own, the release is not: {log}"
        );
        s.user = Some("no-such-user-here".into());
        let err = start(&dir, &release, &rev(), &s, None).unwrap_err();
        assert!(
            matches!(
                err.downcast_ref::<ServiceError>(),
                Some(ServiceError::NoSuchUser(_))
            ),
            "{err:#}"
        );
    }
}
