//! Keeps each application's service running while the agent runs. Every application is
//! supervised on its own task: it first finishes any interrupted deployment and adopts a
//! service still running from before (it outlives the agent); afterwards, a service that
//! exits is started again, with a growing delay if it keeps crashing. An application whose
//! recovery or supervision fails is retried with back-off, its problem kept in [`Problems`]
//! (gossiped in `shoal hosts` and logged in the agent's status line); it never stops the
//! supervision of the others.
//!
//! The application's lock is waited for at most [`LOCK_WAIT`] per pass (a deployment that
//! holds it keeps the app), and is held to decide and to spawn, never across the wait for a
//! service to become healthy.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::sync::watch;

use super::run::{Held, LocalHost};
use super::service;
use super::state::{AppDir, AppState, read_json};

/// How long one supervisor pass waits for an application's lock before leaving the app to
/// whoever holds it until the next pass.
pub const LOCK_WAIT: Duration = Duration::from_secs(2);

/// A lock held longer than this is reported as the application's problem.
pub const LOCK_HELD_PROBLEM: Duration = Duration::from_secs(15 * 60);

/// How often the agent logs its status line when nothing changed.
const STATUS_EVERY: Duration = Duration::from_secs(60);

/// Who found an application's problem. The supervisor's is told first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    /// Its recovery or supervision failed.
    Supervisor,
    /// A `shoal.monitor` hook failed more often in a row than it allows.
    Monitor,
}

/// What is wrong with each application, by name and by who found it: shared with what the
/// host gossips.
pub type Problems = Arc<Mutex<ProblemMap>>;

/// The problems themselves: (application, who found it) → what.
pub type ProblemMap = BTreeMap<(String, Source), String>;

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
    /// Since when a pass found the lock held.
    held_since: Option<Instant>,
    /// The active revision's service, read once per revision rather than every tick.
    spec: Option<(
        crate::bundle::RevisionId,
        Option<crate::appspec::ServiceSpec>,
    )>,
}

/// What one pass found.
#[derive(Debug, PartialEq, Eq)]
enum Pass {
    /// The service runs (or the revision has none, or nothing is deployed): nothing wrong.
    Fine,
    /// A deployment holds the application; nothing was done.
    Busy,
    /// The service is down and will be started after its back-off delay.
    Waiting,
}

/// Supervises every application under the host's data dir until `stop` turns true.
pub async fn supervise(host: Arc<LocalHost>, problems: Problems, stop: watch::Receiver<bool>) {
    let mut tasks: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut stop_rx = stop.clone();
    let mut last_status: Option<(Instant, ProblemMap)> = None;
    loop {
        let on_disk = apps(&host.data_dir);
        // An application whose directory is gone is no longer supervised, nor a problem.
        tasks.retain(|app, task| {
            let keep = on_disk.contains(app);
            if !keep {
                task.abort();
                clear_problem(&problems, app, Source::Supervisor);
                clear_problem(&problems, app, Source::Monitor);
            }
            keep
        });
        for app in on_disk {
            let ended = tasks.get(&app).is_none_or(|t| t.is_finished());
            if ended && !*stop.borrow() {
                if tasks.contains_key(&app) {
                    // Only a panic ends an app's task before the stop: said, and restarted.
                    set_problem(
                        &problems,
                        &app,
                        Source::Supervisor,
                        "its supervisor task ended; restarted",
                    );
                }
                let task = watch_app(host.clone(), app.clone(), problems.clone(), stop.clone());
                tasks.insert(app, tokio::spawn(task));
            }
        }
        status_line(&problems, tasks.len(), &mut last_status);
        tokio::select! {
            _ = stop_rx.wait_for(|s| *s) => break,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    for (_, task) in tasks {
        let _ = task.await;
    }
}

/// The agent's status line: at once when an application's problem changes, else every
/// [`STATUS_EVERY`].
fn status_line(problems: &Problems, apps: usize, last: &mut Option<(Instant, ProblemMap)>) {
    let now_problems = problems.lock().expect("problems lock").clone();
    let due = match last {
        None => true,
        Some((at, seen)) => *seen != now_problems || at.elapsed() >= STATUS_EVERY,
    };
    if !due {
        return;
    }
    if now_problems.is_empty() {
        tracing::info!(
            apps,
            "status: {apps} applications supervised, none with a problem"
        );
    } else {
        let list: Vec<String> = now_problems
            .iter()
            .map(|((app, _), p)| format!("{app}: {p}"))
            .collect();
        tracing::warn!(
            apps,
            with_problems = now_problems.len(),
            "status: {apps} applications supervised, {} with a problem: {}",
            now_problems.len(),
            list.join("; ")
        );
    }
    *last = Some((Instant::now(), now_problems));
}

fn set_problem(problems: &Problems, app: &str, source: Source, problem: &str) {
    let mut map = problems.lock().expect("problems lock");
    let key = (app.to_string(), source);
    if map.get(&key).map(String::as_str) != Some(problem) {
        tracing::warn!(app, ?source, "problem: {problem}");
        map.insert(key, problem.to_string());
    }
}

fn clear_problem(problems: &Problems, app: &str, source: Source) {
    if problems
        .lock()
        .expect("problems lock")
        .remove(&(app.to_string(), source))
        .is_some()
    {
        tracing::info!(app, ?source, "problem resolved");
    }
}

/// One application's supervisor, until `stop`: recovery first (retried with back-off
/// until it succeeds), then a pass every 250 ms.
async fn watch_app(
    host: Arc<LocalHost>,
    app: String,
    problems: Problems,
    mut stop: watch::Receiver<bool>,
) {
    let mut recovered = false;
    let mut watch = Watch::default();
    let mut errors = RestartPolicy {
        base: Duration::from_secs(1),
        max: Duration::from_secs(60),
        window: Duration::from_secs(300),
        ..RestartPolicy::default()
    };
    let runtime = tokio::runtime::Handle::current();
    let mut monitoring = Monitoring::default();
    while !*stop.borrow() {
        if recovered {
            monitoring.step(&host, &app, &problems).await;
        }
        let (h, a) = (host.clone(), app.clone());
        let result: Result<Pass> = if recovered {
            let mut w = std::mem::take(&mut watch);
            let stopping = stop.clone();
            let (result, w) = tokio::task::spawn_blocking(move || {
                let result = tick(&h, &a, &mut w, &|| *stopping.borrow());
                (result, w)
            })
            .await
            .unwrap_or_else(|e| {
                (
                    Err(anyhow::anyhow!("the pass panicked: {e}")),
                    Watch::default(),
                )
            });
            watch = w;
            result
        } else {
            let rt = runtime.clone();
            tokio::task::spawn_blocking(move || rt.block_on(h.recover(&a)))
                .await
                .unwrap_or_else(|e| Err(anyhow::anyhow!("the recovery panicked: {e}")))
                .map(|message| {
                    if let Some(message) = message {
                        tracing::warn!(app, "recovered an interrupted deployment: {message}");
                    }
                    recovered = true;
                    Pass::Fine
                })
        };
        let delay = match result {
            Ok(pass) => {
                match pass {
                    Pass::Fine => clear_problem(&problems, &app, Source::Supervisor),
                    Pass::Busy => {
                        // A deployment holds the application: its switch's redirect is
                        // kept from expiring all the same (a long drain or hook).
                        let dir = AppDir::new(&host.data_dir, &app);
                        let refreshed = tokio::task::spawn_blocking(move || {
                            crate::switch::kernel::Kernel::of(&dir).refresh()
                        })
                        .await;
                        if let Ok(Err(e)) = refreshed {
                            tracing::warn!(app, "refreshing the switch's connect redirect: {e}");
                        }
                        let since = *watch.held_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= LOCK_HELD_PROBLEM {
                            let held = since.elapsed().as_secs();
                            set_problem(
                                &problems,
                                &app,
                                Source::Supervisor,
                                &format!("its lock is held for {held}s"),
                            );
                        }
                    }
                    Pass::Waiting => {}
                }
                if pass != Pass::Busy {
                    watch.held_since = None;
                }
                Duration::from_millis(250)
            }
            // A recovery that waits for a deployment is not a problem.
            Err(e) if !recovered && e.is::<Held>() => Duration::from_millis(250),
            Err(e) => {
                let what = if recovered {
                    "supervising"
                } else {
                    "recovering"
                };
                let mut problem = format!("{what}: {e:#}");
                truncate(&mut problem, crate::mesh::hoststate::MAX_PROBLEM);
                set_problem(&problems, &app, Source::Supervisor, &problem);
                errors.exited(Instant::now()).max(Duration::from_secs(1))
            }
        };
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    if let Some((_, run)) = monitoring.running.take() {
        run.abort();
    }
}

/// The `shoal.monitor` hooks of an application's active revision, as its supervisor task
/// runs them: one at a time, on a task of their own.
#[derive(Default)]
struct Monitoring {
    schedule: Option<super::monitor::Schedule>,
    /// The monitor running now, and its run.
    running: Option<(usize, tokio::task::JoinHandle<(bool, String)>)>,
}

impl Monitoring {
    /// Follows the active revision (a new one starts a new schedule), collects a finished
    /// run, starts a due one, and reports the problem, if any. While a deployment holds the
    /// application, nothing runs and the monitors' problem is cleared.
    async fn step(&mut self, host: &Arc<LocalHost>, app: &str, problems: &Problems) {
        let dir = AppDir::new(&host.data_dir, app);
        if dir.journal().exists() {
            // A deployment holds the app: what the monitors said of the revision it replaces
            // must not stand for the new one.
            if let Some((_, run)) = self.running.take() {
                run.abort();
            }
            self.schedule = None;
            clear_problem(problems, app, Source::Monitor);
            return;
        }
        let active = read_json::<AppState>(&dir.state())
            .ok()
            .flatten()
            .and_then(|s| s.active);
        let current = self.schedule.as_ref().map(|s| s.revision().clone());
        if active != current {
            if let Some((_, run)) = self.running.take() {
                run.abort();
            }
            clear_problem(problems, app, Source::Monitor);
            self.schedule = active.and_then(|revision| {
                use super::monitor::Check;
                let spec = crate::bundle::read_appspec(&dir.release(&revision)).ok()?;
                let state: AppState = read_json(&dir.state()).ok().flatten()?;
                let port = match super::switched::declared(spec.service.as_ref()) {
                    // A switched service is checked on its own port, not through the proxy.
                    Some(_) => service::current(&dir).ok().flatten().and_then(|r| r.port),
                    None => state.port.or(spec.service.as_ref().and_then(|s| s.port)),
                };
                let mut checks: Vec<Check> = spec.monitors.into_iter().map(Check::Hook).collect();
                if let (Some(port), Some(path)) = (
                    port,
                    spec.service.as_ref().and_then(|s| s.health_path.clone()),
                ) {
                    checks.push(Check::Health { port, path });
                }
                (!checks.is_empty())
                    .then(|| super::monitor::Schedule::new(revision, checks, port, Instant::now()))
            });
        }
        let Some(schedule) = &mut self.schedule else {
            return;
        };
        if self
            .running
            .as_ref()
            .is_some_and(|(_, run)| run.is_finished())
        {
            let (i, run) = self.running.take().expect("checked");
            // Finished: awaiting it does not wait.
            let (ok, summary) = run
                .await
                .unwrap_or_else(|e| (false, format!("the monitor's task failed: {e}")));
            if !ok {
                tracing::warn!(app, monitor = i, "monitor failed: {summary}");
            }
            schedule.done(i, ok, &summary);
            match schedule.problem() {
                Some(mut problem) => {
                    truncate(&mut problem, crate::mesh::hoststate::MAX_PROBLEM);
                    set_problem(problems, app, Source::Monitor, &problem);
                }
                None => clear_problem(problems, app, Source::Monitor),
            }
        }
        if self.running.is_none()
            && let Some(i) = schedule.due(Instant::now())
        {
            let (check, run) = schedule.start(i, Instant::now());
            let (host, app, revision, port) = (
                host.clone(),
                app.to_string(),
                schedule.revision().clone(),
                schedule.port(),
            );
            let task = match check {
                super::monitor::Check::Hook(spec) => tokio::spawn(async move {
                    let began = std::time::Instant::now();
                    let (ok, why) = host
                        .monitor(&app, &revision, i, &spec, port, run)
                        .await
                        .unwrap_or_else(|e| (false, format!("{e:#}")));
                    crate::http::metrics::metrics().hook_ran(
                        "monitor",
                        ok,
                        began.elapsed().as_secs_f64(),
                    );
                    (ok, why)
                }),
                super::monitor::Check::Health { port, path } => {
                    tokio::task::spawn_blocking(move || {
                        let ok = service::healthy(&dir, port, &path);
                        (
                            ok,
                            if ok {
                                "2xx"
                            } else {
                                "no 2xx answer from the service"
                            }
                            .into(),
                        )
                    })
                }
            };
            self.running = Some((i, task));
        }
    }
}

/// Cuts `s` to at most `max` bytes, on a character boundary.
fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max.saturating_sub(3);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
}

/// The applications this host has a directory for, sorted: directories (not links) with a
/// valid application name; anything else under `apps/` is ignored.
pub fn apps(data_dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(data_dir.join("apps")) else {
        return Vec::new();
    };
    let mut apps: Vec<String> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| crate::blobs::valid_app(name).is_ok())
        .collect();
    apps.sort();
    apps
}

/// Takes the application's lock, waiting up to `wait` for a holder to let go; `None` if it
/// is still held then.
fn lock_within(dir: &AppDir, wait: Duration) -> Result<Option<nix::fcntl::Flock<std::fs::File>>> {
    let deadline = Instant::now() + wait;
    loop {
        match super::run::lock(dir) {
            Ok(lock) => return Ok(Some(lock)),
            Err(e) if e.is::<Held>() => {
                if Instant::now() >= deadline {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    }
}

/// One pass over one application. The lock is held to decide and to spawn; the wait for
/// the new service to become healthy runs without it, and ends early when `stopping` says
/// the agent is shutting down (the service is left starting, for the next agent).
fn tick(
    host: &LocalHost,
    app: &str,
    watch: &mut Watch,
    stopping: &dyn Fn() -> bool,
) -> Result<Pass> {
    let dir = AppDir::new(&host.data_dir, app);
    let Some(lock) = lock_within(&dir, LOCK_WAIT)? else {
        return Ok(Pass::Busy);
    };
    service::settle_swap(&dir)?;
    let state: AppState = read_json(&dir.state())?.unwrap_or_default();
    let Some(active) = state.active else {
        return Ok(Pass::Fine);
    };
    let release = dir.release(&active);
    if watch.spec.as_ref().is_none_or(|(rev, _)| rev != &active) {
        let spec = crate::bundle::read_appspec(&release)?;
        watch.spec = Some((active.clone(), spec.service));
    }
    let Some((_, Some(spec))) = watch.spec.clone() else {
        return Ok(Pass::Fine);
    };
    service::rotate_log(&dir, service::MAX_LOG_BYTES)?;
    let switch = super::switched::declared(Some(&spec));
    let public = state.port.or(spec.port);

    if let Some(record) = service::current(&dir)?
        && record.revision == active
        && record.is_running()
    {
        if let (Some(_), Some(public)) = (switch, public) {
            super::switched::upkeep(&dir, &record, &spec, public)?;
        }
        if !watch.adopted_logged {
            tracing::info!(app, pid = record.pid, revision = %active.short(), "service running");
            watch.adopted_logged = true;
        }
        return Ok(Pass::Fine);
    }
    watch.adopted_logged = false;
    if switch.is_some() {
        super::switched::serving_down(&dir);
    }
    let now = Instant::now();
    match watch.restart_at {
        None => {
            let delay = watch.policy.exited(now);
            tracing::warn!(app, revision = %active.short(), "service is not running; starting it in {delay:?}");
            watch.restart_at = Some(now + delay);
            Ok(Pass::Waiting)
        }
        Some(at) if now >= at => {
            watch.restart_at = None;
            // The count goes on for the same revision (the gate of a rollout reads it).
            let before = service::current(&dir)?.filter(|r| r.revision == active);
            let restarts = before.as_ref().map_or(0, |r| r.restarts).saturating_add(1);
            // A switched service starts again on its own port (a new one when it had none,
            // or when another process took it meanwhile); the next passes route to it once
            // it is healthy.
            let port = match switch {
                Some(_) => match before.as_ref().and_then(|r| Some((r, r.port?))) {
                    Some((r, port)) if service::holder(r, port) == service::Holder::Nobody => {
                        Some(port)
                    }
                    _ => Some(service::free_port()?),
                },
                None => public,
            };
            // Whatever is left of the one before (a group whose leader died) goes first.
            service::stop(&dir)?;
            let starting = service::spawn(&dir, &release, &active, &spec, port, restarts)?;
            drop(lock);
            let pid = starting.pid();
            crate::http::metrics::metrics()
                .service_restarts
                .get_or_create(&crate::http::metrics::App {
                    app: app.to_owned(),
                })
                .inc();
            if starting.wait_unless(stopping)?.is_some() {
                tracing::info!(app, pid, "service started");
            } else {
                tracing::info!(app, pid, "shutting down: the service is left starting");
            }
            Ok(Pass::Fine)
        }
        Some(_) => Ok(Pass::Waiting),
    }
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

    #[test]
    fn the_lock_is_free_while_a_started_service_becomes_healthy() {
        let tmp = tempfile::tempdir().unwrap();
        let host = LocalHost {
            data_dir: tmp.path().join("data"),
            install_root: tmp.path().join("root"),
            host_name: "h".into(),
            tags: Default::default(),
            keep_releases: 1,
            hooks: Arc::new(crate::hooks::HookRuntime::new(&tmp.path().join("cache")).unwrap()),
        };
        let dir = AppDir::new(&host.data_dir, "web");
        let rev = crate::bundle::RevisionId("c".repeat(64));
        std::fs::create_dir_all(dir.release(&rev)).unwrap();
        // A service that never answers its health check (nothing listens on the port).
        std::fs::write(
            dir.release(&rev).join("appspec.yml"),
            "version: 0.0\nos: linux\nshoal:\n  service:\n    command: /bin/sleep\n    args: [\"600\"]\n    port: 1\n    health_path: /h\n    start_timeout: 3\n",
        )
        .unwrap();
        let state = AppState {
            active: Some(rev.clone()),
            ..AppState::default()
        };
        super::super::state::write_json(&dir.state(), &state).unwrap();

        let mut watch = Watch::default();
        assert_eq!(
            tick(&host, "web", &mut watch, &|| false).unwrap(),
            Pass::Waiting
        );
        let started = std::thread::scope(|s| {
            let pass = s.spawn(|| tick(&host, "web", &mut watch, &|| false));
            let deadline = Instant::now() + Duration::from_secs(10);
            while service::current(&dir).unwrap().is_none() {
                assert!(Instant::now() < deadline, "the service was never spawned");
                std::thread::sleep(Duration::from_millis(10));
            }
            // Spawned, not healthy yet: a deployment can take the application meanwhile.
            let mut free = false;
            while !pass.is_finished() {
                if let Ok(lock) = super::super::run::lock(&dir) {
                    free = service::current(&dir).unwrap().is_some();
                    drop(lock);
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (free, pass.join().unwrap())
        });
        assert!(started.0, "the lock was held across the wait for health");
        assert!(started.1.is_err(), "the service never became healthy");
        assert!(service::current(&dir).unwrap().is_none());

        // The agent shutting down mid-wait: the pass ends as soon as it is told, without
        // waiting out the start timeout, and leaves the service starting, recorded.
        let mut watch = Watch::default();
        assert_eq!(
            tick(&host, "web", &mut watch, &|| false).unwrap(),
            Pass::Waiting
        );
        let stopping = std::sync::atomic::AtomicBool::new(false);
        let pass = std::thread::scope(|s| {
            let pass = s.spawn(|| {
                tick(&host, "web", &mut watch, &|| {
                    stopping.load(std::sync::atomic::Ordering::SeqCst)
                })
            });
            let deadline = Instant::now() + Duration::from_secs(10);
            while service::current(&dir).unwrap().is_none() {
                assert!(Instant::now() < deadline, "the service was never spawned");
                std::thread::sleep(Duration::from_millis(10));
            }
            stopping.store(true, std::sync::atomic::Ordering::SeqCst);
            pass.join().unwrap()
        });
        assert_eq!(pass.unwrap(), Pass::Fine);
        let left = service::current(&dir)
            .unwrap()
            .expect("left starting, recorded");
        assert!(left.is_running());
        service::stop(&dir).unwrap();
    }

    #[test]
    fn problems_are_cut_to_the_gossip_cap() {
        let mut s = "é".repeat(400);
        truncate(&mut s, 101);
        assert!(s.len() <= 101 && s.ends_with("..."));
    }
}
