//! The application's process. Hooks cannot spawn processes, so the agent runs the service
//! declared under `shoal.service`: started in its own process group (so it outlives the
//! agent and is not hit by signals meant for it), with `$PORT` set, output appended to
//! `service.log`, and waited on until its health check answers. What is running is
//! recorded in `service.json` with the process's start time, so a later agent (or a later
//! `deploy local`) recognises it, and never signals a recycled pid.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::state::{AppDir, read_json, remove, write_json};
use crate::appspec::ServiceSpec;
use crate::bundle::RevisionId;

/// A service the agent started.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceRecord {
    pub revision: RevisionId,
    pub pid: i32,
    /// The process's start time in clock ticks since boot (`/proc/<pid>/stat`, field 22).
    pub start_ticks: u64,
    pub port: Option<u16>,
}

fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let state = rest.split(' ').next()?;
    if state == "Z" || state == "X" {
        return None; // a zombie is not running
    }
    rest.split(' ').nth(19)?.parse().ok()
}

impl ServiceRecord {
    /// Whether the recorded process is still the one we started.
    pub fn is_running(&self) -> bool {
        start_ticks(self.pid) == Some(self.start_ticks)
    }
}

/// The service recorded for this application, if any.
pub fn current(dir: &AppDir) -> Result<Option<ServiceRecord>> {
    read_json(&dir.service())
}

/// Starts `spec` from the release at `release`, waits until it is healthy, and records it.
pub fn start(
    dir: &AppDir,
    release: &Path,
    revision: &RevisionId,
    spec: &ServiceSpec,
    port: Option<u16>,
) -> Result<ServiceRecord> {
    use std::os::unix::process::CommandExt;
    let program = if Path::new(&spec.command).is_absolute() {
        spec.command.clone().into()
    } else {
        release.join(&spec.command)
    };
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.service_log())
        .with_context(|| format!("opening {}", dir.service_log().display()))?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let mut cmd = Command::new(&program);
    cmd.args(&spec.args)
        .current_dir(release)
        .envs(&spec.env)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0);
    if let Some(port) = port {
        cmd.env("PORT", port.to_string());
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting the service {}", program.display()))?;
    let pid = child.id() as i32;
    let record = ServiceRecord {
        revision: revision.clone(),
        pid,
        start_ticks: start_ticks(pid).context("reading the service's start time")?,
        port,
    };
    write_json(&dir.service(), &record)?;

    let started = Instant::now();
    let deadline = started + spec.start_timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            let _ = remove(&dir.service());
            bail!(
                "the service exited with {status} while starting; its output: {}",
                log_tail(dir, log_start)
            );
        }
        let healthy = match (port, &spec.health_path) {
            (Some(port), Some(path)) => http_ok(port, path),
            // Without a health check, a service that stays up for a second counts as started.
            _ => started.elapsed() >= Duration::from_secs(1),
        };
        if healthy {
            // The child is not waited for: it belongs to the host now, not to this process.
            std::mem::forget(child);
            return Ok(record);
        }
        if Instant::now() >= deadline {
            let _ = stop_record(&record);
            let _ = remove(&dir.service());
            bail!(
                "the service did not become healthy within {}s; its output: {}",
                spec.start_timeout.as_secs(),
                log_tail(dir, log_start)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn http_ok(port: u16, path: &str) -> bool {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .proxy(None)
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(1)))
        .build()
        .into();
    agent
        .get(&format!("http://127.0.0.1:{port}{path}"))
        .call()
        .is_ok_and(|r| r.status().is_success())
}

fn log_tail(dir: &AppDir, from: u64) -> String {
    let text = std::fs::read(dir.service_log()).unwrap_or_default();
    let new = &text[(from as usize).min(text.len())..];
    let tail = &new[new.len().saturating_sub(600)..];
    let tail = String::from_utf8_lossy(tail).trim().replace('\n', " | ");
    if tail.is_empty() {
        "(none)".into()
    } else {
        tail
    }
}

/// Stops the recorded service, if it is still the one we started: SIGTERM to its process
/// group, then SIGKILL after `grace`.
pub fn stop(dir: &AppDir) -> Result<()> {
    if let Some(record) = current(dir)? {
        stop_record(&record)?;
    }
    remove(&dir.service())
}

fn stop_record(record: &ServiceRecord) -> Result<()> {
    if !record.is_running() {
        return Ok(());
    }
    let group = Pid::from_raw(record.pid);
    let _ = killpg(group, Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while record.is_running() {
        if Instant::now() >= deadline {
            let _ = killpg(group, Signal::SIGKILL);
            std::thread::sleep(Duration::from_millis(100));
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    reap(record.pid);
    Ok(())
}

/// Collects the exit status of a child of this process, so it does not linger as a zombie.
pub fn reap(pid: i32) {
    let _ = nix::sys::wait::waitpid(
        Pid::from_raw(pid),
        Some(nix::sys::wait::WaitPidFlag::WNOHANG),
    );
}
