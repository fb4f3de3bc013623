//! A switched service's moves (`shoal.service.switch`, decision 0022): the public port is
//! held by the application's proxy (`crate::switch`), each revision's service listens on a
//! port of its own on 127.0.0.1, and traffic moves between them without a refused
//! connection. The two processes are the serving one (`service.json`, the one the
//! supervisor keeps running and the proxy routes to) and the standby (`standby.json`: the
//! new revision's before the switch, the previous one's after it, draining or kept warm).
//!
//! Each step here is one action of the lifecycle (`plan.rs`), driven by `run.rs`, and is
//! safe to repeat: a recovery after a crash, a rollback, and the supervisor call them again.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};

use super::service::{self, ServiceRecord, Slot};
use super::state::AppDir;
use crate::appspec::{ServiceSpec, SwitchSpec};
use crate::bundle::RevisionId;

/// The switch of a service spec, if it declares one.
pub fn declared(spec: Option<&ServiceSpec>) -> Option<&SwitchSpec> {
    spec.and_then(|s| s.switch.as_ref())
}

/// Where the proxy of a switched service listens.
pub fn listen(switch: &SwitchSpec, public_port: u16) -> SocketAddr {
    SocketAddr::new(switch.address, public_port)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Starts `revision`'s service beside the serving one, on a free port of its own, as the
/// standby, and waits until it is healthy. A healthy service of the same revision that
/// still runs is used as it is, with no restart: the previous revision kept warm, when a
/// rollback brings it back, or the serving one, when a host is given the revision it
/// serves.
pub fn start_beside(
    dir: &AppDir,
    release: &Path,
    revision: &RevisionId,
    spec: &ServiceSpec,
) -> Result<ServiceRecord> {
    if let Some((slot, mut running)) = service::running_of(dir, revision)? {
        let healthy = match (running.port, &spec.health_path) {
            (Some(port), Some(path)) => service::healthy_in(dir, slot, port, path),
            _ => true,
        };
        if healthy {
            tracing::info!(revision = %revision.short(), pid = running.pid, ?slot, "the revision's service runs already: used as it is");
            if slot == Slot::Standby {
                running.warm_until_ms = None;
                super::state::write_json(&dir.standby(), &running)?;
            }
            return Ok(running);
        }
    }
    service::stop_in(dir, Slot::Standby)?;
    let port = service::free_port()?;
    service::spawn_in(Slot::Standby, dir, release, revision, spec, Some(port), 0)?.wait()
}

/// The previous revision's service for a switch back: running already (serving, or kept
/// warm as the standby), or started again in the slot the new revision's service does not
/// hold.
pub fn ensure_running(
    dir: &AppDir,
    release: &Path,
    revision: &RevisionId,
    spec: &ServiceSpec,
) -> Result<ServiceRecord> {
    if let Some((_, record)) = service::running_of(dir, revision)? {
        return Ok(record);
    }
    let serving_other = service::current(dir)?.is_some_and(|r| r.is_running());
    let slot = if serving_other {
        Slot::Standby
    } else {
        Slot::Serving
    };
    service::stop_in(dir, slot)?;
    let port = service::free_port()?;
    service::spawn_in(slot, dir, release, revision, spec, Some(port), 0)?.wait()
}

/// BlockTraffic: the proxy stops handing out new connections; they wait in its listen
/// backlog until [`allow`]. Nothing to do when no proxy runs (nothing is served yet).
pub fn block(dir: &AppDir) -> Result<()> {
    if let Some(proxy) = crate::switch::running(dir)? {
        proxy
            .hold()
            .context("holding new connections at the switch")?;
    }
    crate::faults::point("switch.blocked");
    Ok(())
}

/// AllowTraffic: new connections (and held ones) go to `revision`'s running service, the
/// proxy started first if it does not run; that service becomes the serving one.
pub fn allow(
    dir: &AppDir,
    revision: &RevisionId,
    switch: &SwitchSpec,
    public_port: u16,
) -> Result<()> {
    let (slot, record) = service::running_of(dir, revision)?
        .ok_or_else(|| anyhow!("the service of {} is not running", revision.short()))?;
    let port = record
        .port
        .ok_or_else(|| anyhow!("the service of {} has no port", revision.short()))?;
    let proxy = crate::switch::ensure(dir, listen(switch, public_port))?;
    proxy
        .route(port)
        .with_context(|| format!("switching traffic to 127.0.0.1:{port}"))?;
    crate::faults::point("switch.allowed");
    if slot == Slot::Standby {
        service::swap(dir)?;
    }
    Ok(())
}

/// After a switch: the standby (the revision traffic left) gets `drain_timeout` for its
/// open connections, then is kept warm for `keep` (when not zero) or stopped.
pub fn retire(dir: &AppDir, drain_timeout: Duration, keep: Duration) -> Result<()> {
    let Some(record) = service::current_in(dir, Slot::Standby)? else {
        return Ok(());
    };
    if record.is_running()
        && let (Some(port), Some(proxy)) = (record.port, crate::switch::running(dir)?)
    {
        let left = proxy.drain(port, drain_timeout)?;
        if left > 0 {
            tracing::warn!(
                revision = %record.revision.short(),
                left,
                "connections still open after the drain timeout ({}s): they are cut",
                drain_timeout.as_secs()
            );
        }
    }
    crate::faults::point("switch.drained");
    if !keep.is_zero() && record.is_running() {
        service::keep_warm(dir, now_ms() + keep.as_millis() as u64)
    } else {
        service::stop_in(dir, Slot::Standby)
    }
}

/// Stops everything of a switched service: both processes and the proxy (an in-place
/// deployment's ApplicationStop, a first install undone).
pub fn stop_all(dir: &AppDir) -> Result<()> {
    service::stop(dir)?;
    service::stop_in(dir, Slot::Standby)?;
    if let Some(proxy) = crate::switch::running(dir)? {
        proxy.stop()?;
    }
    Ok(())
}

/// The supervisor's pass over a switched service whose serving process runs: the proxy
/// runs and routes to it (started again if it died), and a standby past its warm time (or
/// left by a crash, or dead) is stopped.
pub fn upkeep(
    dir: &AppDir,
    serving: &ServiceRecord,
    switch: &SwitchSpec,
    public_port: u16,
) -> Result<()> {
    if let Some(port) = serving.port {
        let proxy = crate::switch::ensure(dir, listen(switch, public_port))?;
        if proxy.seen().backend != Some(port) {
            tracing::warn!(
                port,
                "the switch did not route to the serving service: routed"
            );
            proxy.route(port)?;
        }
    }
    if let Some(standby) = service::current_in(dir, Slot::Standby)?
        && (!standby.is_running() || standby.warm_until_ms.is_none_or(|t| now_ms() >= t))
    {
        tracing::info!(revision = %standby.revision.short(), "the previous revision's service is no longer kept warm: stopped");
        service::stop_in(dir, Slot::Standby)?;
    }
    Ok(())
}
