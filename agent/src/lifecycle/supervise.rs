//! Keeps each application's service running while the agent runs. On start the agent
//! finishes any interrupted deployment and adopts a service that is still running from
//! before (it outlives the agent); afterwards, a service that exits is started again, with
//! a growing delay if it keeps crashing. Apps that a deployment holds (their lock is taken)
//! are left alone until it ends.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::run::LocalHost;
use super::service;
use super::state::{AppDir, AppState, read_json};

/// When to restart a service that keeps exiting: at once the first time, then after a delay
/// that doubles with each exit within `window`, up to `max`. Pure, so it is tested directly.
#[derive(Debug, Clone)]
pub struct RestartPolicy {
    exits: Vec<Instant>,
    pub window: Duration,
    pub base: Duration,
    pub max: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            exits: Vec::new(),
            window: Duration::from_secs(60),
            base: Duration::from_millis(500),
            max: Duration::from_secs(30),
        }
    }
}

impl RestartPolicy {
    /// Records an exit at `now`; returns how long to wait before starting again.
    pub fn exited(&mut self, now: Instant) -> Duration {
        self.exits.retain(|t| now.duration_since(*t) < self.window);
        self.exits.push(now);
        match self.exits.len() {
            1 => Duration::ZERO,
            n => (self.base * 2u32.saturating_pow((n - 2) as u32)).min(self.max),
        }
    }
}

/// Per-application supervision state.
#[derive(Default)]
struct Watch {
    policy: RestartPolicy,
    restart_at: Option<Instant>,
    adopted_logged: bool,
    /// The active revision's service, read once per revision rather than every tick.
    spec: Option<(
        crate::bundle::RevisionId,
        Option<crate::appspec::ServiceSpec>,
    )>,
}

/// Supervises every application under the host's data dir until `stop` resolves.
pub async fn supervise(
    host: &LocalHost,
    stop: impl std::future::Future<Output = ()>,
) -> Result<()> {
    for app in apps(&host.data_dir) {
        if let Some(message) = host.recover(&app).await? {
            tracing::warn!(app, "recovered an interrupted deployment: {message}");
        }
    }
    let mut watches: HashMap<String, Watch> = HashMap::new();
    tokio::pin!(stop);
    loop {
        for app in apps(&host.data_dir) {
            let watch = watches.entry(app.clone()).or_default();
            if let Err(e) = tick(host, &app, watch) {
                tracing::warn!(app, "supervising: {e:#}");
            }
        }
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

/// The applications this host has a directory for, sorted.
pub fn apps(data_dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(data_dir.join("apps")) else {
        return Vec::new();
    };
    let mut apps: Vec<String> = entries
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    apps.sort();
    apps
}

fn tick(host: &LocalHost, app: &str, watch: &mut Watch) -> Result<()> {
    let dir = AppDir::new(&host.data_dir, app);
    // A deployment holds the lock: leave the app to it.
    let Ok(_lock) = super::run::lock(&dir) else {
        return Ok(());
    };
    let state: AppState = read_json(&dir.state())?.unwrap_or_default();
    let Some(active) = state.active else {
        return Ok(());
    };
    let release = dir.release(&active);
    if watch.spec.as_ref().is_none_or(|(rev, _)| rev != &active) {
        let text = std::fs::read_to_string(release.join("appspec.yml"))?;
        watch.spec = Some((active.clone(), crate::appspec::parse(&text)?.service));
    }
    let Some((_, Some(spec))) = watch.spec.clone() else {
        return Ok(());
    };

    if let Some(record) = service::current(&dir)?
        && record.revision == active
        && record.is_running()
    {
        if !watch.adopted_logged {
            tracing::info!(app, pid = record.pid, revision = %active.short(), "service running");
            watch.adopted_logged = true;
        }
        return Ok(());
    }
    let now = Instant::now();
    match watch.restart_at {
        None => {
            let delay = watch.policy.exited(now);
            tracing::warn!(app, revision = %active.short(), "service is not running; starting it in {delay:?}");
            watch.restart_at = Some(now + delay);
        }
        Some(at) if now >= at => {
            watch.restart_at = None;
            if let Some(record) = service::current(&dir)? {
                service::reap(record.pid);
            }
            let started = service::start(&dir, &release, &active, &spec, state.port.or(spec.port))?;
            tracing::info!(app, pid = started.pid, "service started");
        }
        Some(_) => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_while_crashing_and_forgive_after_the_window() {
        let mut p = RestartPolicy::default();
        let t0 = Instant::now();
        let delays: Vec<Duration> = (0..8)
            .map(|i| p.exited(t0 + Duration::from_secs(i)))
            .collect();
        assert_eq!(delays[0], Duration::ZERO);
        assert_eq!(delays[1], Duration::from_millis(500));
        assert_eq!(delays[2], Duration::from_secs(1));
        assert_eq!(delays[3], Duration::from_secs(2));
        assert_eq!(delays[7], Duration::from_secs(30), "capped");
        // A crash long after the others starts over.
        assert_eq!(p.exited(t0 + Duration::from_secs(600)), Duration::ZERO);
    }
}
