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
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use super::service::{self, Holder, ServiceError, ServiceRecord, Slot};
use super::state::AppDir;
use crate::appspec::{ServiceSpec, SwitchSpec};
use crate::bundle::RevisionId;
use crate::switch::kernel::Kernel;

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
    // The kernel rule first, whether or not a proxy answers: a proxy started from here on
    // would have no route, and the rule must not lead it.
    Kernel::of(dir)
        .clear()
        .context("clearing the switch's kernel rule")?;
    if let Some(proxy) = crate::switch::running(dir)? {
        proxy
            .hold()
            .context("holding new connections at the switch")?;
    }
    crate::faults::point("switch.blocked");
    Ok(())
}

/// AllowTraffic: new connections (and held ones) go to `revision`'s running service, the
/// proxy started first if it does not run; that service becomes the serving one. Traffic
/// goes there only once the service's own processes alone listen on its port (see
/// [`routable`]).
pub fn allow(
    dir: &AppDir,
    revision: &RevisionId,
    spec: &ServiceSpec,
    public_port: u16,
) -> Result<()> {
    let switch = declared(Some(spec))
        .ok_or_else(|| anyhow!("revision {} declares no switch", revision.short()))?;
    let (slot, record) = service::running_of(dir, revision)?
        .ok_or_else(|| anyhow!("the service of {} is not running", revision.short()))?;
    let port = record
        .port
        .ok_or_else(|| anyhow!("the service of {} has no port", revision.short()))?;
    routable(&record, port, spec)?;
    let proxy = crate::switch::ensure(dir, listen(switch, public_port))?;
    proxy
        .route(port, switch)
        .with_context(|| format!("switching traffic to 127.0.0.1:{port}"))?;
    crate::faults::point("switch.allowed");
    if slot == Slot::Standby {
        service::swap(dir)?;
    }
    Ok(())
}

/// Whether traffic may go to `record`'s `port`: the service's own processes, and no other,
/// listen on it (waited for up to its `start_timeout`: without a health path, "started"
/// is only "still up after a second"), and it answers its health path if it has one (asked
/// again until the same deadline). A listener on an address past loopback is allowed and
/// warned of: clients can reach the service there without the switch.
fn routable(record: &ServiceRecord, port: u16, spec: &ServiceSpec) -> Result<()> {
    let rev = record.revision.short();
    let deadline = Instant::now() + spec.start_timeout;
    loop {
        match service::holder(record, port) {
            Holder::Foreign => {
                return Err(anyhow::Error::new(ServiceError::ForeignListener { port })
                    .context(format!("traffic not switched to the service of {rev}")));
            }
            Holder::Service { wide } => {
                if let Some(addr) = wide {
                    tracing::warn!(
                        revision = %rev,
                        port,
                        %addr,
                        "the switched service listens on {addr}:{port}, where clients reach it past the switch: listen on 127.0.0.1:$PORT"
                    );
                }
                break;
            }
            Holder::Nobody if Instant::now() >= deadline => bail!(
                "nothing listens on 127.0.0.1:{port}, the port of the service of {rev}, \
                 after {}s: traffic not switched",
                spec.start_timeout.as_secs()
            ),
            Holder::Nobody => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    if let Some(path) = &spec.health_path {
        while !service::http_ok(port, path) {
            if Instant::now() >= deadline {
                bail!(
                    "the service of {rev} fails its health check (GET {path} on \
                     127.0.0.1:{port}): traffic not switched"
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
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
        && let Some(port) = record.port
    {
        // Connections the kernel rule sent do not depend on the proxy: the drain counts
        // them whether or not one runs. A switch that stops answering while it drains
        // does not fail the deployment: traffic has moved already; the old service gets
        // the rest of its time.
        let proxy = crate::switch::running(dir)?;
        match crate::switch::drain(proxy.as_ref(), port, drain_timeout) {
            Ok(0) => {}
            Ok(left) => tracing::warn!(
                revision = %record.revision.short(),
                left,
                "connections still open after the drain timeout ({}s): they are cut",
                drain_timeout.as_secs()
            ),
            Err(e) => tracing::warn!(
                revision = %record.revision.short(),
                "the open connections could not be counted at the end of the drain ({e:#}): the old service is let go"
            ),
        }
    }
    crate::faults::point("switch.drained");
    if !keep.is_zero() && record.is_running() {
        service::keep_warm(dir, now_ms() + keep.as_millis() as u64)
    } else {
        service::stop_in(dir, Slot::Standby)
    }
}

/// The supervisor's pass over a switched service whose serving process does not run: new
/// connections wait at the proxy until it is back and [`upkeep`] routes to it again, so
/// that no other process that takes its port in the meantime gets them.
/// Never an error: the restart must not wait on the switch. A proxy that refuses
/// `unroute` (one started by an older agent) is stopped; the next pass starts one that
/// speaks the current requests once the service is back.
pub fn serving_down(dir: &AppDir) {
    // The kernel rule first, whatever the proxy's state (dead, or restarted with no
    // route): it must not send connections to the dead service's port, which another
    // process may take.
    if let Err(e) = Kernel::of(dir).clear() {
        tracing::warn!(
            "the serving service is down, and the switch's kernel rule could not be cleared: {e:#}"
        );
    }
    let proxy = match crate::switch::running(dir) {
        Ok(Some(proxy)) if proxy.seen().backend.is_some() => proxy,
        Ok(_) => return,
        Err(e) => {
            tracing::warn!("the serving service is down, and the switch cannot be read: {e:#}");
            return;
        }
    };
    tracing::warn!(
        "the serving service is down: new connections wait at the switch until it is back"
    );
    if let Err(e) = proxy.unroute() {
        tracing::warn!("the switch did not unroute ({e:#}): it is stopped");
        if let Err(e) = proxy.stop() {
            tracing::warn!("stopping the switch: {e:#}");
        }
    }
}

/// Stops everything of a switched service: both processes and the proxy (an in-place
/// deployment's ApplicationStop, a first install undone).
/// The kernel's redirect is cleared first: no new connection goes to a service about to
/// stop, whether or not the proxy can be reached.
pub fn stop_all(dir: &AppDir) -> Result<()> {
    Kernel::of(dir).clear()?;
    service::stop(dir)?;
    service::stop_in(dir, Slot::Standby)?;
    crate::switch::stop_recorded(dir)?;
    Ok(())
}

/// The supervisor's pass over a switched service whose serving process runs: the proxy
/// runs (started again if it died) and routes to it once the port is the service's alone
/// and healthy (a restarted service, a restarted proxy), the kernel rule goes where the
/// proxy routes, and a standby past its warm time (or left by a crash, or dead) is
/// stopped.
pub fn upkeep(
    dir: &AppDir,
    serving: &ServiceRecord,
    spec: &ServiceSpec,
    public_port: u16,
) -> Result<()> {
    let Some(switch) = declared(Some(spec)) else {
        return Ok(());
    };
    if let Some(port) = serving.port {
        let proxy = crate::switch::ensure(dir, listen(switch, public_port))?;
        let seen = proxy.seen().clone();
        // Where the proxy sends new connections once this pass is done, for the kernel
        // rule to follow (it never leads: a proxy started again has no route yet).
        let mut routed = seen.clone();
        if seen.backend != Some(port) || seen.proxy_protocol != switch.proxy_protocol {
            let holder = service::holder(serving, port);
            let healthy = || {
                spec.health_path
                    .as_deref()
                    .is_none_or(|path| service::http_ok(port, path))
            };
            match holder {
                Holder::Service { .. } if healthy() => {
                    tracing::warn!(
                        port,
                        "the switch did not route to the serving service: routed"
                    );
                    match proxy.route(port, switch) {
                        Ok(status) => routed = status,
                        // The proxy routed and its kernel rule could not even be cleared;
                        // `follow` below tries again. The pass goes on.
                        Err(e) => tracing::warn!("routing the switch: {e:#}"),
                    }
                }
                // Died since this pass began: its listener may not be closed yet, and is
                // not another's. The next pass starts it again.
                Holder::Foreign if !serving.is_running() => {
                    tracing::debug!(port, "the serving service died during the pass");
                }
                Holder::Foreign => {
                    // Its port is shared with another process: nothing goes there any
                    // more (the kernel rule and the proxy), and the service starts again
                    // on another port (the supervisor's restart path picks a free one).
                    tracing::warn!(
                        port,
                        "another process listens on the serving service's port: the service is stopped, to start again on another port"
                    );
                    if let Err(e) = proxy.unroute() {
                        // A proxy that refuses `unroute` (an older agent's) is stopped, as
                        // in `serving_down`: its `stop` clears the rule first.
                        tracing::warn!("the switch did not unroute ({e:#}): it is stopped");
                        crate::switch::stop_recorded(dir)?;
                    }
                    service::stop(dir)?;
                    return Ok(());
                }
                holder => tracing::debug!(
                    port,
                    ?holder,
                    "the serving service is not ready to route to"
                ),
            }
        }
        // This agent's first pass, a hold that ran out while no agent was there to end
        // it, a proxy started again: the rule goes where the proxy routes, or goes. A
        // failure does not end the pass (the standby below is still let go); `follow`
        // warns of it, and the proxy carries the connections meanwhile.
        if let Err(e) = proxy.follow(switch, &routed) {
            tracing::warn!("{e:#}");
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
