//! Runs a deployment on this host: the driver of [`Machine`]. It first checks the bundle
//! completely, touching nothing: unpacked under the safety rules, its AppSpec free of
//! errors, every hook compiled. Only then does it write the journal and run the lifecycle,
//! keeping the journal current, so that a crash at any moment is recovered on the next
//! start by [`LocalHost::recover`]: the host ends wholly on the revision it came from.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use super::install;
use super::plan::{Action, EventRecord, Machine, Outcome, Side};
use super::service;
use super::state::{AppDir, AppState, Journal, read_json, remove, write_json};
use super::status::{DeploymentStatus, HostStatus};
use super::switched;
use crate::appspec::AppSpec;
use crate::bundle::{self, Limits, RevisionId};
use crate::hooks::{DirGrant, HookContext, HookRuntime, LifecycleEvent, Sandbox};

/// Releases kept per application, besides the active one.
pub const DEFAULT_KEEP_RELEASES: usize = 5;

/// The host side of deployments: where its state lives and where files are installed.
pub struct LocalHost {
    pub data_dir: PathBuf,
    /// Destinations in AppSpecs are rooted here (`/` in production).
    pub install_root: PathBuf,
    pub host_name: String,
    pub tags: BTreeMap<String, String>,
    pub keep_releases: usize,
    pub hooks: Arc<HookRuntime>,
}

/// The output of one lifecycle hook kept whole in its log (beyond it, its first and last
/// halves): what `shoal logs` can return of it.
pub const HOOK_LOG_LIMIT: usize = 16 << 20;

/// What to deploy, and how.
#[derive(Clone, Debug)]
pub struct DeployRequest {
    /// The deployment's id on this host, which names its record and its hook logs'
    /// directory (`deployments/<id>/`): a fleet deployment's intent id, so that its logs
    /// can be found by it. None: a fresh one. At most 64 ASCII letters, digits and `-`.
    pub id: Option<String>,
    pub app: String,
    pub bundle: PathBuf,
    pub deployment_group: String,
    pub rollback: bool,
    /// A failing ApplicationStop hook of the previous revision does not fail the host.
    pub ignore_stop_failures: bool,
    /// Overrides the service's port from the AppSpec.
    pub port: Option<u16>,
    /// Told every event's status each time one changes (the rollback's events after the
    /// deployment's), for live progress.
    pub progress: Option<tokio::sync::mpsc::UnboundedSender<Vec<EventRecord>>>,
}

/// The result of one hook run, as kept in the deployment record.
#[derive(Clone, Debug, Serialize)]
pub struct HookResult {
    pub event: LifecycleEvent,
    pub revision: RevisionId,
    pub location: String,
    pub succeeded: bool,
    pub summary: String,
    /// The whole captured log, on disk.
    pub log: PathBuf,
}

/// One host's part in a deployment: the record `deploy local` prints for its host and
/// `deploy status` for each host of a fleet deployment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub name: String,
    pub status: HostStatus,
    /// Why it failed, when it did.
    pub reason: Option<String>,
    /// In a fleet deployment, the batch it ran in: the index of the log entry that started
    /// it (hosts with the same index were one batch).
    pub batch: Option<u64>,
    pub events: Vec<EventRecord>,
    /// The last lines of its hook logs (a fleet deployment's; `hooks` has them locally).
    pub log_tail: Vec<String>,
    /// What fetching the revision moved to it (a fleet deployment's): bytes fetched, bytes
    /// it held already, and from how many peers.
    pub transfer: Option<crate::fleet::log::state::TransferReport>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RollbackRecord {
    pub revision: RevisionId,
    pub status: DeploymentStatus,
    pub events: Vec<EventRecord>,
}

/// A deployment's record: the shape `shoal deploy status --json` prints.
#[derive(Clone, Debug, Serialize)]
pub struct DeploymentRecord {
    pub id: String,
    pub app: String,
    pub revision: RevisionId,
    /// Succeeded or Failed, once it ended.
    pub status: DeploymentStatus,
    /// One line for people: "Succeeded", "Failed at ValidateService: …, rolled back to …".
    pub message: String,
    pub hosts: Vec<HostRecord>,
    pub rollback: Option<RollbackRecord>,
    pub hooks: Vec<HookResult>,
    pub started_at: u64,
    pub finished_at: u64,
}

impl DeploymentRecord {
    pub fn succeeded(&self) -> bool {
        self.status == DeploymentStatus::Succeeded
    }
}

/// Why a deployment on this host did not run (see [`LocalHost::deploy`]).
#[derive(Debug, thiserror::Error)]
#[error("{kind}")]
pub struct DeployError {
    kind: DeployErrorKind,
}

impl DeployError {
    /// What went wrong, to act on.
    pub fn kind(&self) -> &DeployErrorKind {
        &self.kind
    }

    fn host(e: impl Into<anyhow::Error>) -> DeployError {
        DeployErrorKind::Host(e.into()).into()
    }
}

impl From<DeployErrorKind> for DeployError {
    fn from(kind: DeployErrorKind) -> Self {
        DeployError { kind }
    }
}

/// The kinds of [`DeployError`]. Only `Host` may have touched the host; the others leave
/// it as it was.
#[derive(Debug, thiserror::Error)]
pub enum DeployErrorKind {
    /// The application's name cannot be a directory name.
    #[error("`{app}` is not a valid application name (letters, digits, `-`, `_`, `.`)")]
    InvalidApp { app: String },
    /// Another deployment of the application holds it: try again once it ended.
    #[error("another deployment of {app} is under way on this host ({detail})")]
    Busy { app: String, detail: String },
    /// The bundle cannot be deployed (unreadable, a bad AppSpec, a hook that does not
    /// load, a service that is not in it): fix the revision.
    #[error("refusing the bundle: {0:#}")]
    RefusedBundle(anyhow::Error),
    /// This agent cannot run hooks (its Wasm engine could not be made): the agent's
    /// fault, not the bundle's.
    #[error("this agent cannot run hooks (the bundle was not looked at further): {0:#}")]
    CannotRunHooks(anyhow::Error),
    /// The host failed under the deployment (its disk, its files); a journal recovers it.
    #[error("{0:#}")]
    Host(anyhow::Error),
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn new_deployment_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "d-{:012x}",
        (nanos as u64) ^ u64::from(std::process::id()).rotate_left(40)
    )
}

/// One revision, unpacked in its release directory, with its AppSpec.
struct Release {
    id: RevisionId,
    dir: PathBuf,
    spec: AppSpec,
}

impl LocalHost {
    fn app_dir(&self, app: &str) -> Result<AppDir> {
        if app.is_empty()
            || !app
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            || app.starts_with('.')
        {
            bail!("`{app}` is not a valid application name (letters, digits, `-`, `_`, `.`)");
        }
        Ok(AppDir::new(&self.data_dir, app))
    }

    fn open_release(&self, dir: &AppDir, id: &RevisionId) -> Result<Release> {
        let path = dir.release(id);
        let spec = bundle::read_appspec(&path)
            .with_context(|| format!("reading the AppSpec of release {}", id.short()))?;
        Ok(Release {
            id: id.clone(),
            dir: path,
            spec,
        })
    }

    /// Checks and unpacks a bundle into its release directory, touching nothing else.
    async fn preflight(&self, dir: &AppDir, bundle_path: &Path) -> Result<Release, DeployError> {
        let refused = |e: anyhow::Error| DeployError::from(DeployErrorKind::RefusedBundle(e));
        std::fs::create_dir_all(dir.releases()).map_err(DeployError::host)?;
        clean_staging(dir);
        let staging = tempfile::Builder::new()
            .prefix(".staging-")
            .tempdir_in(dir.releases())
            .map_err(DeployError::host)?;
        let unpacked = staging.path().join("bundle");
        let b = bundle::open(bundle_path, &unpacked, &Limits::default())
            .with_context(|| format!("{}", bundle_path.display()))
            .map_err(refused)?;
        crate::faults::point("release.unpacked");
        b.appspec
            .deployable()
            .map_err(|errors| refused(anyhow!("its AppSpec has errors:\n{errors}")))?;
        if b.appspec.hooks.values().any(|h| !h.is_empty()) || !b.appspec.monitors.is_empty() {
            // The agent's fault, not the bundle's: said so.
            self.hooks
                .ready()
                .map_err(|e| DeployError::from(DeployErrorKind::CannotRunHooks(e)))?;
        }
        for hooks in b.appspec.hooks.values() {
            for h in hooks {
                self.hooks
                    .load_in_revision(&b.root, Path::new(&h.location))
                    .await
                    .with_context(|| format!("appspec.yml line {}: hook {}", h.line, h.location))
                    .map_err(refused)?;
            }
        }
        for m in &b.appspec.monitors {
            self.hooks
                .load_in_revision(&b.root, Path::new(&m.hook.location))
                .await
                .with_context(|| {
                    format!(
                        "appspec.yml line {}: monitor {}",
                        m.hook.line, m.hook.location
                    )
                })
                .map_err(refused)?;
        }
        if let Some(svc) = &b.appspec.service
            && !Path::new(&svc.command).is_absolute()
            && bundle::open_in_revision(&b.root, Path::new(&svc.command)).is_err()
        {
            return Err(refused(anyhow!(
                "appspec.yml line {}: the service command {} is not in the revision",
                svc.line,
                svc.command
            )));
        }
        let release = dir.release(&b.id);
        if release.exists() && !release_intact(&release, &b.id) {
            // Changed on disk since it was stored: replaced by the bundle's own content.
            tracing::warn!(release = %b.id.short(), "a kept release was changed on disk: unpacking it again");
            std::fs::remove_dir_all(&release)
                .with_context(|| format!("removing the changed release {}", b.id.short()))
                .map_err(DeployError::host)?;
        }
        if !release.exists() {
            // The unpacked files and directories reach the disk before the release's name
            // says it is whole: one syncfs rather than an fsync per file (a model's
            // revision has thousands of small files; a deployment is rare).
            std::fs::File::open(&b.root)
                .and_then(|f| nix::unistd::syncfs(&f).map_err(std::io::Error::from))
                .with_context(|| format!("syncing release {}", b.id.short()))
                .map_err(DeployError::host)?;
            std::fs::rename(&b.root, &release)
                .and_then(|()| std::fs::File::open(dir.releases())?.sync_all())
                .with_context(|| format!("storing release {}", b.id.short()))
                .map_err(DeployError::host)?;
            crate::faults::point("release.renamed");
        }
        self.open_release(dir, &b.id).map_err(DeployError::host)
    }

    /// Deploys a bundle here. An `Err` means the deployment never started (a refused bundle,
    /// another deployment of the app under way) or this host failed under it (its disk):
    /// [`DeployErrorKind`] says which. A failure at a lifecycle event is not an `Err`: it is
    /// in the record, with the rollback.
    pub async fn deploy(&self, req: &DeployRequest) -> Result<DeploymentRecord, DeployError> {
        use tracing::Instrument;
        // Its logs carry the app and, once known, the deployment's id.
        let span = tracing::info_span!(
            "deploy",
            app = %req.app,
            deployment = tracing::field::Empty,
            host = %self.host_name
        );
        if let Some(id) = &req.id {
            span.record("deployment", id.as_str());
        }
        self.deploy_in_span(req).instrument(span).await
    }

    async fn deploy_in_span(&self, req: &DeployRequest) -> Result<DeploymentRecord, DeployError> {
        let dir = self.app_dir(&req.app).map_err(|_| {
            DeployError::from(DeployErrorKind::InvalidApp {
                app: req.app.clone(),
            })
        })?;
        std::fs::create_dir_all(&dir.root).map_err(DeployError::host)?;
        let _lock = lock(&dir).map_err(|e| {
            if e.is::<Held>() {
                DeployError::from(DeployErrorKind::Busy {
                    app: req.app.clone(),
                    detail: format!("{e:#}"),
                })
            } else {
                DeployError::host(e)
            }
        })?;
        self.recover_locked(&req.app, &dir)
            .await
            .map_err(DeployError::host)?;
        let started_at = now();
        let new = self.preflight(&dir, &req.bundle).await?;
        self.deploy_locked(req, &dir, new, started_at)
            .await
            .map_err(DeployError::host)
    }

    /// [`Self::deploy`] once the application is locked and the bundle accepted.
    async fn deploy_locked(
        &self,
        req: &DeployRequest,
        dir: &AppDir,
        new: Release,
        started_at: u64,
    ) -> Result<DeploymentRecord> {
        let dir = dir.clone();
        let mut state: AppState = read_json(&dir.state())?.unwrap_or_default();
        let previous = match &state.active {
            Some(id) => Some(self.open_release(&dir, id)?),
            None => None,
        };
        let id = match &req.id {
            Some(id) => {
                if id.is_empty()
                    || id.len() > 64
                    || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                {
                    bail!("deployment id {id:?} is not 1 to 64 ASCII letters, digits and `-`");
                }
                id.clone()
            }
            None => {
                let id = new_deployment_id();
                tracing::Span::current().record("deployment", id.as_str());
                id
            }
        };
        let mut journal = Journal {
            deployment_id: id.clone(),
            from: state.active.clone(),
            to: new.id.clone(),
            targets: BTreeSet::new(),
            replacing: BTreeSet::new(),
            phase: "Started".into(),
            port: state.port.or(req.port),
        };
        write_json(&dir.journal(), &journal)?;
        crate::faults::point("journal.written");

        // Switched when the new revision declares a switch and the previous one (if any)
        // ran behind it too; otherwise in place (a move to or from a switch stops first).
        let new_switch = switched::declared(new.spec.service.as_ref()).cloned();
        let switched_mode = new_switch.is_some()
            && previous
                .as_ref()
                .is_none_or(|p| switched::declared(p.spec.service.as_ref()).is_some());
        let machine = if switched_mode {
            Machine::switched(previous.is_some(), req.rollback)
        } else {
            Machine::new(previous.is_some(), req.rollback)
        };
        let mut machine = machine.ignoring_stop_failures(req.ignore_stop_failures);
        let mut hooks_run = Vec::new();
        let tell = |machine: &Machine| {
            if let Some(progress) = &req.progress {
                let mut events = machine.events.clone();
                events.extend(machine.rollback_events.iter().cloned());
                let _ = progress.send(events);
            }
        };
        loop {
            let action = machine.next_action();
            tell(&machine);
            let side_release = |side: Side| match side {
                Side::New => Some(&new),
                Side::Previous => previous.as_ref(),
            };
            // The service port a side was given (the agent's `[ports]`), if any.
            let side_port = |side: Side, journal: &Journal| match side {
                Side::New => req.port,
                Side::Previous => journal.port,
            };
            let result: Result<()> = match action {
                Action::Finished => break,
                Action::Unpack => Ok(()), // done and verified in preflight
                Action::RunHooks { event, side } => {
                    let release = side_release(side).expect("a side the machine names exists");
                    journal.phase = event.to_string();
                    write_json(&dir.journal(), &journal)?;
                    self.run_hooks(&dir, &id, req, release, event, &mut hooks_run)
                        .await
                }
                Action::StopService { side } => match &new_switch {
                    // Traffic has left it: drained, then kept warm (the previous
                    // revision) or stopped.
                    Some(switch) if switched_mode => switched::retire(
                        &dir,
                        switch.drain_timeout,
                        if side == Side::Previous {
                            switch.keep_previous
                        } else {
                            std::time::Duration::ZERO
                        },
                    ),
                    _ => switched::stop_all(&dir).inspect(|()| {
                        crate::faults::point("service.stopped");
                    }),
                },
                Action::BlockTraffic => switched::block(&dir),
                Action::AllowTraffic { side } => {
                    let release = side_release(side).expect("a side the machine names exists");
                    let port = side_port(side, &journal);
                    let service = release.spec.service.as_ref();
                    match (
                        switched::declared(service),
                        port.or(service.and_then(|s| s.port)),
                    ) {
                        (Some(_), Some(port)) => switched::allow(
                            &dir,
                            &release.id,
                            service.expect("a switch is a service's"),
                            port,
                        ),
                        _ => Err(anyhow!(
                            "revision {} declares no switched service",
                            release.id.short()
                        )),
                    }
                }
                Action::Install { side } => {
                    let release = side_release(side).expect("a side the machine names exists");
                    journal.phase = format!("Install {}", release.id.short());
                    if side == Side::Previous {
                        check_intact(release)?;
                    }
                    self.install(&dir, release, &mut state, &mut journal)
                }
                Action::StartService { side } => {
                    let release = side_release(side).expect("a side the machine names exists");
                    let port = side_port(side, &journal);
                    match release.spec.service.as_ref() {
                        Some(spec) if switched_mode => match side {
                            Side::New => {
                                switched::start_beside(&dir, &release.dir, &release.id, spec)
                            }
                            Side::Previous => {
                                switched::ensure_running(&dir, &release.dir, &release.id, spec)
                            }
                        }
                        .map(drop),
                        _ => self.start_service(&dir, release, port).inspect(|()| {
                            crate::faults::point("service.started");
                        }),
                    }
                }
                Action::Commit => {
                    state.active = Some(new.id.clone());
                    state.port = req.port.or(new.spec.service.as_ref().and_then(|s| s.port));
                    state.history.retain(|r| r != &new.id);
                    state.history.push(new.id.clone());
                    write_json(&dir.state(), &state).inspect(|()| {
                        crate::faults::point("commit.state-written");
                    })
                }
            };
            machine.done(result.map_err(|e| format!("{e:#}")));
            tell(&machine);
        }
        // The record before the journal goes: a crash between them is recovered as an
        // interrupted deployment (rolled back, its record rewritten), never a lost record.
        let record = self.record(
            &id,
            req,
            &new,
            previous.as_ref(),
            &machine,
            hooks_run,
            started_at,
        );
        write_json(&dir.deployments().join(format!("{id}.json")), &record)?;
        crate::faults::point("record.written");
        tracing::info!(status = %record.status, revision = %new.id.short(), "deployment ended here");
        remove(&dir.journal())?;
        crate::faults::point("journal.removed");
        self.prune_releases(&dir, &state);
        Ok(record)
    }

    fn install(
        &self,
        dir: &AppDir,
        release: &Release,
        state: &mut AppState,
        journal: &mut Journal,
    ) -> Result<()> {
        self.install_files(dir, release, state, journal)?;
        install::apply_permissions(&release.spec, &self.install_root)?;
        crate::faults::point("install.permissions");
        Ok(())
    }

    /// Install's files, journaled first, and the state that names them; not permissions.
    fn install_files(
        &self,
        dir: &AppDir,
        release: &Release,
        state: &mut AppState,
        journal: &mut Journal,
    ) -> Result<()> {
        let plan = install::plan(&release.dir, &release.spec, &self.install_root)?;
        let ours = self.ours(dir, state, journal)?;
        plan.check_conflicts(&ours)?;
        // Journal every path this install will write before writing any, and apart, the
        // host's own files among them: those stay the host's until kept.
        let replacing = plan.replacing(&ours)?;
        journal.targets.extend(plan.writes(&ours)?);
        journal.replacing.extend(replacing);
        write_json(&dir.journal(), journal)?;
        crate::faults::point("install.journaled");
        state.installed = install::install(&plan, &ours, &dir.replaced())?;
        crate::faults::point("install.files-done");
        write_json(&dir.state(), state)?;
        install::prune_kept(&dir.replaced(), &state.installed)?;
        crate::faults::point("install.state-written");
        Ok(())
    }

    /// [`Self::install`] for a forced recovery: permissions that cannot be applied (the
    /// application's user made them unsafe: a hard link, a link swapped in, a tree too deep
    /// or too wide) do not keep the host off the revision it came from; what went wrong is
    /// returned for the message. The files must install.
    fn install_forced(
        &self,
        dir: &AppDir,
        release: &Release,
        state: &mut AppState,
        journal: &mut Journal,
    ) -> Result<Option<String>> {
        self.install_files(dir, release, state, journal)?;
        match install::apply_permissions(&release.spec, &self.install_root) {
            Ok(()) => Ok(None),
            Err(e) => {
                tracing::warn!(error = %e, "forced recovery: permissions not applied");
                Ok(Some(format!("; its permissions were not all applied: {e}")))
            }
        }
    }

    /// What this host's deployments installed: the installed revision's paths, and what an
    /// interrupted install may have written (never a host file it had not kept yet).
    fn ours(&self, dir: &AppDir, state: &AppState, journal: &Journal) -> Result<BTreeSet<PathBuf>> {
        let interrupted =
            install::interrupted(&journal.targets, &journal.replacing, &dir.replaced())?;
        Ok(state.installed.union(&interrupted).cloned().collect())
    }

    /// Starts a release's service in place, the previous one stopped first. A switched one
    /// listens on a port of its own, and its proxy (started if need be) routes to it.
    fn start_service(&self, dir: &AppDir, release: &Release, port: Option<u16>) -> Result<()> {
        let Some(spec) = &release.spec.service else {
            return Ok(());
        };
        service::stop(dir)?;
        match (switched::declared(Some(spec)), port.or(spec.port)) {
            (Some(_), Some(public)) => {
                let own = service::free_port()?;
                service::start(dir, &release.dir, &release.id, spec, Some(own))?;
                switched::allow(dir, &release.id, spec, public)
            }
            (_, port) => service::start(dir, &release.dir, &release.id, spec, port).map(drop),
        }
    }

    async fn run_hooks(
        &self,
        dir: &AppDir,
        deployment: &str,
        req: &DeployRequest,
        release: &Release,
        event: LifecycleEvent,
        results: &mut Vec<HookResult>,
    ) -> Result<()> {
        let public = req
            .port
            .or(release.spec.service.as_ref().and_then(|s| s.port));
        // A switched revision's hooks reach its own service, wherever traffic goes now.
        let port = match switched::declared(release.spec.service.as_ref()) {
            Some(_) => service::running_of(dir, &release.id)?
                .and_then(|(_, r)| r.port)
                .or(public),
            None => public,
        };
        std::fs::create_dir_all(dir.work())?;
        // Through directory handles: the paths are predictable (a fleet deployment's id is
        // its intent's), so nothing planted there is followed.
        let (logs, _) = crate::beneath::Dir::open_trusted(&dir.root)?
            .create_dirs(&Path::new("deployments").join(deployment))?;
        for (n, spec) in release.spec.hooks_for(event).iter().enumerate() {
            let hook = self
                .hooks
                .load_in_revision(&release.dir, Path::new(&spec.location))
                .await?;
            let (ctx, sandbox) = self.hook_setting(
                dir,
                &release.dir,
                &release.id,
                event,
                deployment,
                &req.app,
                &req.deployment_group,
                port,
                spec.timeout,
            );
            let metrics = crate::http::metrics::metrics();
            metrics.hook_loaded(hook.cache.as_str());
            let began = std::time::Instant::now();
            let outcome = {
                use tracing::Instrument;
                self.hooks
                    .run(&hook, &ctx, &sandbox)
                    .instrument(tracing::info_span!("hook", %event, location = %spec.location))
                    .await
            };
            metrics.hook_ran(
                &event.to_string(),
                outcome.succeeded(),
                began.elapsed().as_secs_f64(),
            );
            let name = format!("{}-{}-{n}.log", release.id.short(), event);
            logs.write_atomic(
                std::ffi::OsStr::new(&name),
                &mut outcome.log.text.as_bytes(),
                0o644,
                None,
            )?;
            let log = logs.path().join(&name);
            let summary = outcome.summary();
            results.push(HookResult {
                event,
                revision: release.id.clone(),
                location: spec.location.clone(),
                succeeded: outcome.succeeded(),
                summary: summary.clone(),
                log,
            });
            if !outcome.succeeded() {
                bail!(
                    "{event} hook {} (appspec.yml line {}): {summary}",
                    spec.location,
                    spec.line
                );
            }
        }
        Ok(())
    }

    /// What a hook of `revision` (unpacked at `release`) is told and may reach: the
    /// revision read-only at `/revision`, the app's work directory at `/work`, the
    /// service's port on 127.0.0.1 (also as the parameter `port`).
    #[allow(clippy::too_many_arguments)]
    fn hook_setting(
        &self,
        dir: &AppDir,
        release: &Path,
        revision: &RevisionId,
        event: LifecycleEvent,
        deployment: &str,
        app: &str,
        group: &str,
        port: Option<u16>,
        timeout: std::time::Duration,
    ) -> (HookContext, Sandbox) {
        let mut ctx = HookContext {
            event,
            deployment_id: deployment.to_string(),
            application: app.to_string(),
            deployment_group: group.to_string(),
            revision: revision.0.clone(),
            host_name: self.host_name.clone(),
            host_tags: self.tags.clone(),
            params: BTreeMap::new(),
        };
        if let Some(port) = port {
            ctx.params.insert("port".into(), port.to_string());
        }
        let sandbox = Sandbox {
            dirs: vec![
                DirGrant {
                    host: release.to_path_buf(),
                    guest: "/revision".into(),
                    writable: false,
                },
                DirGrant {
                    host: dir.work(),
                    guest: "/work".into(),
                    writable: true,
                },
            ],
            http_allow: port
                .map(|p| vec![format!("127.0.0.1:{p}").parse().expect("a valid address")])
                .unwrap_or_default(),
            timeout,
            output_limit: HOOK_LOG_LIMIT,
            ..Sandbox::default()
        };
        (ctx, sandbox)
    }

    /// Runs monitor `n` of `app`'s active `revision` (its `run`-th run): a ValidateService
    /// hook run again, with the parameter `shoal.monitor` set to `run`. Its log replaces
    /// the previous run's in `apps/<app>/monitor-<n>.log`. Returns whether it succeeded and
    /// its summary; an `Err` is a hook that could not be loaded.
    pub async fn monitor(
        &self,
        app: &str,
        revision: &RevisionId,
        n: usize,
        monitor: &crate::appspec::MonitorSpec,
        port: Option<u16>,
        run: u64,
    ) -> Result<(bool, String)> {
        let dir = self.app_dir(app)?;
        let release = dir.release(revision);
        let hook = self
            .hooks
            .load_in_revision(&release, Path::new(&monitor.hook.location))
            .await?;
        std::fs::create_dir_all(dir.work())?;
        let (mut ctx, sandbox) = self.hook_setting(
            &dir,
            &release,
            revision,
            LifecycleEvent::ValidateService,
            "monitor",
            app,
            app,
            port,
            monitor.hook.timeout,
        );
        ctx.params.insert("shoal.monitor".into(), run.to_string());
        let outcome = self.hooks.run(&hook, &ctx, &sandbox).await;
        crate::beneath::Dir::open_trusted(&dir.root)?.write_atomic(
            std::ffi::OsStr::new(&format!("monitor-{n}.log")),
            &mut outcome.log.text.as_bytes(),
            0o644,
            None,
        )?;
        Ok((outcome.succeeded(), outcome.summary()))
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        id: &str,
        req: &DeployRequest,
        new: &Release,
        previous: Option<&Release>,
        machine: &Machine,
        hooks: Vec<HookResult>,
        started_at: u64,
    ) -> DeploymentRecord {
        let outcome = machine.outcome().cloned().unwrap_or(Outcome::Succeeded);
        crate::http::metrics::metrics()
            .host_deployments
            .get_or_create(&crate::http::metrics::Outcome {
                outcome: match outcome {
                    Outcome::Succeeded => "succeeded",
                    Outcome::Failed { .. } => "failed",
                }
                .to_owned(),
            })
            .inc();
        let (status, message) = match &outcome {
            Outcome::Succeeded => (
                DeploymentStatus::Succeeded,
                format!("Succeeded: {} is active", new.id.short()),
            ),
            Outcome::Failed {
                event,
                reason,
                rolled_back,
                rollback_error,
            } => {
                let tail = match (rolled_back, rollback_error, previous) {
                    (true, _, Some(p)) => format!(", rolled back to {}", p.id),
                    (false, Some(e), Some(p)) => {
                        format!("; rolling back to {} failed too: {e}", p.id)
                    }
                    _ => String::new(),
                };
                (
                    DeploymentStatus::Failed,
                    format!("Failed at {event}: {reason}{tail}"),
                )
            }
        };
        let rollback = previous
            .filter(|_| !machine.rollback_events.is_empty())
            .map(|p| RollbackRecord {
                revision: p.id.clone(),
                status: match &outcome {
                    Outcome::Failed {
                        rolled_back: true, ..
                    } => DeploymentStatus::Succeeded,
                    _ => DeploymentStatus::Failed,
                },
                events: machine.rollback_events.clone(),
            });
        DeploymentRecord {
            id: id.to_string(),
            app: req.app.clone(),
            revision: new.id.clone(),
            status,
            hosts: vec![HostRecord {
                name: self.host_name.clone(),
                status: match status {
                    DeploymentStatus::Succeeded => HostStatus::Succeeded,
                    _ => HostStatus::Failed,
                },
                reason: (status != DeploymentStatus::Succeeded).then(|| message.clone()),
                batch: None,
                events: machine.events.clone(),
                log_tail: Vec::new(),
                transfer: None,
            }],
            message,
            rollback,
            hooks,
            started_at,
            finished_at: now(),
        }
    }

    /// Finishes what an interrupted deployment left: puts the host wholly back on the
    /// revision it came from (or on nothing, for an interrupted first install).
    pub async fn recover(&self, app: &str) -> Result<Option<String>> {
        let dir = self.app_dir(app)?;
        if !dir.root.exists() {
            return Ok(None);
        }
        let _lock = lock(&dir)?;
        self.recover_locked(app, &dir).await
    }

    async fn recover_locked(&self, app: &str, dir: &AppDir) -> Result<Option<String>> {
        self.recover_locked_with(app, dir, false).await
    }

    /// [`Self::recover`] for an operator who wants the host back on the revision it came
    /// from even when that revision's service will not start (`deploy recover --force`):
    /// the files and state are put back and the journal is removed; the service's failure
    /// is in the message (the supervisor keeps trying to start it). Waits up to `wait` for
    /// the application's lock.
    pub async fn recover_forced(
        &self,
        app: &str,
        wait: std::time::Duration,
    ) -> Result<Option<String>> {
        let dir = self.app_dir(app)?;
        if !dir.root.exists() {
            return Ok(None);
        }
        let deadline = std::time::Instant::now() + wait;
        let _lock = loop {
            match lock(&dir) {
                Err(e) if e.is::<Held>() && std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                other => break other?,
            }
        };
        self.recover_locked_with(app, &dir, true).await
    }

    async fn recover_locked_with(
        &self,
        app: &str,
        dir: &AppDir,
        force: bool,
    ) -> Result<Option<String>> {
        clean_staging(dir);
        let Some(mut journal) = read_json::<Journal>(&dir.journal())? else {
            return Ok(None);
        };
        tracing::warn!(app, deployment = %journal.deployment_id, phase = %journal.phase, "recovering an interrupted deployment");
        let mut state: AppState = read_json(&dir.state())?.unwrap_or_default();
        service::settle_swap(dir)?;
        let from = match &journal.from {
            Some(from) => Some(self.open_release(dir, from)?),
            None => None,
        };
        // A switched revision to go back to is switched back to (its service may well still
        // serve); anything else is stopped whole first, as an in-place deployment does.
        let from_switch = from
            .as_ref()
            .and_then(|r| switched::declared(r.spec.service.as_ref()))
            .cloned();
        if from_switch.is_none() {
            switched::stop_all(dir)?;
        }
        let message = match from {
            Some(release) => {
                let from = release.id.clone();
                check_intact(&release)?;
                let mut unstarted = if force {
                    self.install_forced(dir, &release, &mut state, &mut journal)?
                        .unwrap_or_default()
                } else {
                    self.install(dir, &release, &mut state, &mut journal)?;
                    String::new()
                };
                state.active = Some(from.clone());
                write_json(&dir.state(), &state)?;
                let back = |spec: &crate::appspec::ServiceSpec| -> Result<()> {
                    let public = journal.port.or(state.port).or(spec.port);
                    match (&from_switch, public) {
                        (Some(switch), Some(public)) => {
                            if crate::switch::running(dir)?.is_none() {
                                // No proxy: whatever serves holds the public port itself.
                                // The kernel rule goes first: it must not point at the
                                // port of a service being stopped.
                                crate::switch::kernel::Kernel::of(dir).clear()?;
                                service::stop(dir)?;
                            }
                            switched::ensure_running(dir, &release.dir, &release.id, spec)?;
                            switched::allow(dir, &release.id, spec, public)?;
                            switched::retire(dir, switch.drain_timeout, std::time::Duration::ZERO)
                        }
                        _ => service::start(dir, &release.dir, &release.id, spec, public).map(drop),
                    }
                };
                if let Some(spec) = &release.spec.service
                    && let Err(e) = back(spec)
                {
                    if !force {
                        return Err(e);
                    }
                    unstarted.push_str(&format!("; its service did not start: {e:#}"));
                }
                format!(
                    "interrupted during {}; rolled back to {from}{unstarted}",
                    journal.phase
                )
            }
            None => {
                let ours = self.ours(dir, &state, &journal)?;
                let nothing = install::plan_nothing(&self.install_root);
                install::install(&nothing, &ours, &dir.replaced())?;
                state = AppState::default();
                write_json(&dir.state(), &state)?;
                install::prune_kept(&dir.replaced(), &state.installed)?;
                format!(
                    "interrupted during {}; the first install was removed",
                    journal.phase
                )
            }
        };
        let finished_at = now();
        let record = DeploymentRecord {
            id: journal.deployment_id.clone(),
            app: app.to_string(),
            revision: journal.to.clone(),
            status: DeploymentStatus::Failed,
            message: format!("Failed: {message}"),
            hosts: vec![HostRecord {
                name: self.host_name.clone(),
                status: HostStatus::Failed,
                reason: Some(message.to_string()),
                batch: None,
                events: Vec::new(),
                log_tail: Vec::new(),
                transfer: None,
            }],
            rollback: None,
            hooks: Vec::new(),
            started_at: finished_at,
            finished_at,
        };
        write_json(
            &dir.deployments()
                .join(format!("{}.json", journal.deployment_id)),
            &record,
        )?;
        remove(&dir.journal())?;
        Ok(Some(message))
    }

    /// Keeps the newest `keep_releases` successful releases and the active one.
    fn prune_releases(&self, dir: &AppDir, state: &AppState) {
        let keep: BTreeSet<&RevisionId> = state
            .history
            .iter()
            .rev()
            .take(self.keep_releases)
            .chain(state.active.as_ref())
            .collect();
        let Ok(entries) = std::fs::read_dir(dir.releases()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || keep.iter().any(|k| k.0 == name) {
                continue;
            }
            if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                tracing::warn!(release = %name, "cannot prune release: {e}");
            }
        }
    }
}

/// True if the release directory's content still has the revision id it is stored under.
fn release_intact(release: &Path, id: &RevisionId) -> bool {
    bundle::tree_id(release).is_ok_and(|found| &found == id)
}

/// Refuses to put a release back in place whose content changed since it was stored.
fn check_intact(release: &Release) -> Result<()> {
    if !release_intact(&release.dir, &release.id) {
        bail!(
            "release {} was changed on disk since it was stored: refusing to install it (deploy its bundle again)",
            release.id
        );
    }
    Ok(())
}

/// Removes what interrupted unpacks left in the releases directory (`.staging-*`). Called
/// under the application's lock, so no unpack is under way.
fn clean_staging(dir: &AppDir) {
    let Ok(entries) = std::fs::read_dir(dir.releases()) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(".staging-")
            && let Err(e) = std::fs::remove_dir_all(entry.path())
        {
            tracing::warn!(path = %entry.path().display(), "cannot remove an interrupted unpack: {e}");
        }
    }
}

/// Takes the application's lock, or fails at once if it is held: one deployment (or
/// supervisor pass) of an application at a time.
pub fn lock(dir: &AppDir) -> Result<nix::fcntl::Flock<std::fs::File>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.lock())?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        if e == nix::errno::Errno::EWOULDBLOCK {
            anyhow::Error::new(Held).context(
                "another deployment of this application is under way on this host".to_string(),
            )
        } else {
            anyhow!("locking {}: {e}", dir.lock().display())
        }
    })
}

/// The lock is held by another deployment (the one error of [`lock`] worth a retry).
#[derive(Debug, thiserror::Error)]
#[error("the application's lock is held")]
pub struct Held;

#[cfg(test)]
mod tests {
    use super::*;

    fn host(root: &Path) -> LocalHost {
        LocalHost {
            data_dir: root.join("data"),
            install_root: root.join("root"),
            host_name: "h".into(),
            tags: BTreeMap::new(),
            keep_releases: DEFAULT_KEEP_RELEASES,
            hooks: Arc::new(HookRuntime::new(&root.join("cache")).unwrap()),
        }
    }

    fn request(app: &str, bundle: &Path) -> DeployRequest {
        DeployRequest {
            id: None,
            app: app.into(),
            bundle: bundle.into(),
            deployment_group: "local".into(),
            rollback: true,
            ignore_stop_failures: false,
            port: None,
            progress: None,
        }
    }

    #[tokio::test]
    async fn hook_logs_never_go_through_a_planted_link_and_an_id_is_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let h = host(tmp.path());
        let bundle = tmp.path().join("rev");
        std::fs::create_dir_all(bundle.join("hooks")).unwrap();
        std::fs::write(
            bundle.join("appspec.yml"),
            "version: 0.0\nos: linux\nhooks:\n  ValidateService:\n    - location: hooks/probe.wasm\n",
        )
        .unwrap();
        std::fs::write(
            bundle.join("hooks/probe.wasm"),
            shoal_examples::SANDBOX_PROBE.bytes,
        )
        .unwrap();
        // The id is known in advance (a fleet intent's): a link waits at its log directory.
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        let deployments = tmp.path().join("data/apps/web/deployments");
        std::fs::create_dir_all(&deployments).unwrap();
        std::os::unix::fs::symlink(&outside, deployments.join("0123abcd")).unwrap();
        let planted = DeployRequest {
            id: Some("0123abcd".into()),
            ..request("web", &bundle)
        };
        let result = h.deploy(&planted).await;
        assert!(
            result.as_ref().map_or(true, |r| !r.succeeded()),
            "a deployment whose logs could not be kept succeeded: {result:?}"
        );
        assert_eq!(
            std::fs::read_dir(&outside).unwrap().count(),
            0,
            "written through the link"
        );
        // The same revision under a fresh id deploys, its log where it belongs.
        let fresh = DeployRequest {
            id: Some("4567ef".into()),
            ..request("web", &bundle)
        };
        let record = h.deploy(&fresh).await.unwrap();
        assert!(record.succeeded(), "{}", record.message);
        assert!(record.hooks[0].log.starts_with(deployments.join("4567ef")));
        assert!(record.hooks[0].log.is_file());
        let bad = DeployRequest {
            id: Some("../x".into()),
            ..request("web", &bundle)
        };
        assert!(h.deploy(&bad).await.is_err());
    }

    #[tokio::test]
    async fn why_a_deployment_did_not_run_is_a_kind() {
        let tmp = tempfile::tempdir().unwrap();
        let h = host(tmp.path());
        let bundle = tmp.path().join("rev");
        std::fs::create_dir_all(&bundle).unwrap();
        std::fs::write(bundle.join("appspec.yml"), "version: 0.0\nos: linux\n").unwrap();

        let err = h.deploy(&request("../etc", &bundle)).await.unwrap_err();
        assert!(
            matches!(err.kind(), DeployErrorKind::InvalidApp { .. }),
            "{err}"
        );

        let broken = tmp.path().join("broken");
        std::fs::create_dir_all(&broken).unwrap();
        std::fs::write(broken.join("appspec.yml"), "version: 0.0\nos: [\n").unwrap();
        let err = h.deploy(&request("web", &broken)).await.unwrap_err();
        assert!(
            matches!(err.kind(), DeployErrorKind::RefusedBundle(_)),
            "{err}"
        );
        assert!(err.to_string().starts_with("refusing the bundle"), "{err}");

        let held = lock(&h.app_dir("web").unwrap()).unwrap();
        let err = h.deploy(&request("web", &bundle)).await.unwrap_err();
        assert!(matches!(err.kind(), DeployErrorKind::Busy { .. }), "{err}");
        drop(held);
        let record = h.deploy(&request("web", &bundle)).await.unwrap();
        assert_eq!(record.status, DeploymentStatus::Succeeded);
        assert_eq!(record.hosts[0].status, HostStatus::Succeeded);
    }
}
