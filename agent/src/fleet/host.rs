//! A host's side of a fleet deployment: what it does with a coordinator's [`RunHost`].
//!
//! The host trusts the coordinator for nothing but the timing. Before it touches anything
//! it checks, itself: the operator's signature on the intent (fleet CA, operator role,
//! age), that the intent is for this host by the host's *own* tags, and, in its replay and
//! fencing store ([`Executed`]), that the intent has not run here already and that the
//! command's fence is not below the highest it has seen for it. Then it fetches the
//! revision from peers that hold it (DownloadBundle), checks that the bundle is the
//! revision the operator signed, and runs the lifecycle.
//!
//! A second command for an intent that is running here (a new coordinator after a
//! failover) waits for the same run: no host is deployed twice. One for an intent that
//! ended here is answered with its outcome at once.

use super::now_unix;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::intent::{self, Admission, Executed, Intent, MAX_REASON};
use super::log::{HostReport, Verdict};
use super::wire::{Refusal, RunHost};
use crate::blobs::{self, BundleStore};
use crate::hooks::LifecycleEvent;
use crate::identity::sign::CertVerifier;
use crate::lifecycle::plan::EventRecord;
use crate::lifecycle::status::EventStatus;
use crate::lifecycle::{DeployRequest, LocalHost};
use crate::mesh::node::MeshHandle;
use crate::mesh::view::MemberState;

/// How long a host waits for its application's lock, held by something else, before it
/// gives up. The supervisor holds it for an instant, or through the stop of a leftover
/// service (at most `service::TERM_GRACE + KILL_GRACE`, 15 s), so this waits longer than
/// that; a `deploy local` or a recovery that starts a service may hold it longer still.
pub const BUSY_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);
const _: () = assert!(
    BUSY_WITHIN.as_secs()
        > crate::lifecycle::service::TERM_GRACE.as_secs()
            + crate::lifecycle::service::KILL_GRACE.as_secs()
);

/// Whether the fleet vouches for a catch-up to `intent`'s revision, as `me` hears it (each
/// host's record is signed by that host): among the other alive hosts the intent targets
/// that run some revision of its app, more than half run this one. A leader that lies to
/// the log could otherwise bring an old success back, long after its intent expired, over
/// a fleet that has moved on. With no such host at all (a group that starts from nothing),
/// the log's word stands.
pub fn fleet_runs(
    intent: &Intent,
    me: &str,
    hosts: &[crate::mesh::view::HostView],
) -> Result<(), String> {
    let running: Vec<bool> = hosts
        .iter()
        .filter(|h| {
            h.name != me
                && h.state == MemberState::Alive
                && h.version > 0
                && intent.targets.matches(&h.tags)
        })
        .filter_map(|h| h.apps.get(&intent.app).cloned().flatten())
        .map(|r| r == intent.revision)
        .collect();
    let on = running.iter().filter(|on| **on).count();
    if running.is_empty() || on * 2 > running.len() {
        Ok(())
    } else {
        Err(format!(
            "a catch-up brings only the revision most of the group's hosts run, and {on} of \
             the {} targeted hosts that run {} run {}",
            running.len(),
            intent.app,
            intent.revision
        ))
    }
}

/// How long a host keeps trying to fetch a revision from its holders.
pub const FETCH_WITHIN: std::time::Duration = std::time::Duration::from_secs(120);

/// A run on this host as it goes: its events' statuses, then how it ended.
#[derive(Clone, Debug, Default)]
pub struct RunState {
    pub events: Vec<EventRecord>,
    pub done: Option<(Verdict, HostReport)>,
}

/// A run, for every command that waits on it.
pub type Running = watch::Receiver<RunState>;

/// The host side of fleet deployments.
pub struct HostSide {
    pub name: String,
    pub host: Arc<LocalHost>,
    pub mesh: MeshHandle,
    pub bundles: Arc<BundleStore>,
    pub verifier: Mutex<CertVerifier>,
    pub executed: Arc<Mutex<Executed>>,
    /// This host's tags, as its configuration says now.
    pub tags: watch::Receiver<BTreeMap<String, String>>,
    /// Application → the port this host serves it on instead of its AppSpec's.
    pub ports: BTreeMap<String, u16>,
    /// Fetches revisions as chunks from the swarm; whole bundles from one holder without.
    pub swarm: Option<blobs::Swarmer>,
    /// Intents running here, by id.
    running: Mutex<HashMap<String, Running>>,
    /// Held while a command is admitted.
    admitting: tokio::sync::Mutex<()>,
}

impl HostSide {
    pub fn new(
        name: String,
        host: Arc<LocalHost>,
        mesh: MeshHandle,
        bundles: Arc<BundleStore>,
        verifier: CertVerifier,
        executed: Executed,
        tags: watch::Receiver<BTreeMap<String, String>>,
    ) -> HostSide {
        HostSide {
            name,
            host,
            mesh,
            bundles,
            verifier: Mutex::new(verifier),
            executed: Arc::new(Mutex::new(executed)),
            tags,
            ports: BTreeMap::new(),
            swarm: None,
            running: Mutex::new(HashMap::new()),
            admitting: tokio::sync::Mutex::new(()),
        }
    }

    /// Serves the applications named in `ports` on those ports instead of their
    /// AppSpecs' (the config's `[ports]`).
    pub fn with_ports(mut self, ports: BTreeMap<String, u16>) -> HostSide {
        self.ports = ports;
        self
    }

    /// Fetches revisions as chunks through `swarm` (whole bundles when no peer has chunks).
    pub fn with_swarm(mut self, swarm: blobs::Swarmer) -> HostSide {
        self.swarm = Some(swarm);
        self
    }

    /// Checks a command and starts (or joins) its run. `Err` is a refusal: nothing ran.
    /// `Ok(Ok(..))` is an outcome known at once; `Ok(Err(rx))` a run to wait for.
    pub async fn accept(
        self: &Arc<Self>,
        cmd: RunHost,
    ) -> Result<Result<(Verdict, HostReport), Running>, Refusal> {
        let now = now_unix();
        let intent = self.check(&cmd, now).map_err(Refusal::lasting)?;
        if cmd.catch_up.is_some() {
            // Not on the log's word alone: the fleet must run it too.
            let hosts = self
                .mesh
                .hosts()
                .await
                .map_err(|e| Refusal::passing(e.to_string()))?;
            fleet_runs(&intent, &self.name, &hosts).map_err(Refusal::passing)?;
        }
        // One command at a time from here to the run's registration: two coordinators'
        // commands for one intent (a failover) must not both start it.
        let _admitting = self.admitting.lock().await;
        let running = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&intent.id)
            .cloned();
        let executed = self.executed.clone();
        let (id, fence) = (intent.id.clone(), cmd.fence);
        let admission = tokio::task::spawn_blocking(move || {
            let mut executed = executed.lock().unwrap_or_else(|p| p.into_inner());
            executed.admit(&intent, fence, now).map(|a| (a, intent))
        })
        .await
        .map_err(|e| Refusal::passing(format!("the replay store failed: {e}")))?;
        let (admission, intent) = match admission {
            Ok(x) => x,
            // The same fence again while the run goes on: the coordinator reconnected.
            Err(e)
                if matches!(e.kind(), intent::IntentErrorKind::Replayed { .. })
                    && running.is_some() =>
            {
                return Ok(Err(running.expect("checked")));
            }
            // The store's own trouble may pass; the rest is about the command.
            Err(e) => {
                return Err(match e.kind() {
                    intent::IntentErrorKind::StoreInUse { .. }
                    | intent::IntentErrorKind::StoreIo { .. }
                    | intent::IntentErrorKind::ReplayStoreFull { .. } => {
                        Refusal::passing(e.to_string())
                    }
                    _ => Refusal::lasting(e.to_string()),
                });
            }
        };
        match admission {
            Admission::Done(verdict) => Ok(Ok((verdict, HostReport::default()))),
            Admission::Resume if running.is_some() => Ok(Err(running.expect("checked"))),
            Admission::Run | Admission::Resume => {
                let (tx, rx) = watch::channel(RunState::default());
                self.running
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id.clone(), rx.clone());
                let this = self.clone();
                tokio::spawn(async move {
                    let span =
                        tracing::info_span!("host_run", deployment = %intent.id, app = %intent.app);
                    let (verdict, report) = {
                        use tracing::Instrument;
                        let batch: Vec<String> = cmd
                            .batch
                            .iter()
                            .take(super::wire::MAX_BATCH_PEERS)
                            .cloned()
                            .collect();
                        this.run(&intent, &cmd.holders, &batch, &tx)
                            .instrument(span)
                            .await
                    };
                    if let Some(swarm) = &this.swarm {
                        match swarm.collect().await {
                            Ok(c) => tracing::debug!(
                                bundles = c.bundles,
                                manifests = c.manifests,
                                chunks = c.chunks.removed,
                                freed = c.chunks.freed_bytes,
                                "stores collected"
                            ),
                            Err(e) => tracing::warn!("collecting the stores: {e}"),
                        }
                    }
                    let executed = this.executed.clone();
                    let (id, kept) = (intent.id.clone(), verdict.clone());
                    let finished = tokio::task::spawn_blocking(move || {
                        executed
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .finish(&id, kept)
                    })
                    .await;
                    if !matches!(finished, Ok(Ok(()))) {
                        tracing::error!(intent = %intent.id, "the outcome could not be recorded: {finished:?}");
                    }
                    tx.send_modify(|r| r.done = Some((verdict, report)));
                    this.running
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&intent.id);
                });
                Ok(Err(rx))
            }
        }
    }

    /// What a host checks of a command before anything else: the operator's signature
    /// (fleet CA, role, age), that the command names the intent it carries, and that this
    /// host is among the signed targets by its own tags. Returns the intent.
    ///
    /// A catch-up's intent may be older than an intent may be: the caller runs it only once
    /// the log's voters confirm that the log made that catch-up.
    pub fn check(&self, cmd: &RunHost, now: u64) -> Result<Intent, String> {
        let intent = {
            let mut verifier = self.verifier.lock().unwrap_or_else(|p| p.into_inner());
            verifier.honour(self.mesh.revoked().as_deref());
            match cmd.catch_up {
                Some(_) => intent::verify_any_age(&cmd.intent, &mut verifier, now),
                None => intent::verify(&cmd.intent, &mut verifier, now),
            }
            .map_err(|e| e.to_string())?
        };
        let intent = match (cmd.rollback, cmd.catch_up) {
            (true, Some(_)) => {
                return Err("a command is a rollback or a catch-up, not both".into());
            }
            (true, None) => intent.rollback().map_err(|e| e.to_string())?,
            (false, Some(number)) => intent.catch_up(number, now).map_err(|e| e.to_string())?,
            (false, None) => intent,
        };
        if intent.id != cmd.deployment {
            return Err(format!(
                "the command is for deployment {} but carries intent {}",
                crate::fleet::targets::quote(&cmd.deployment),
                intent.id
            ));
        }
        if cmd.rollback {
            // The consent names the group's last success as the agent the operator asked
            // said it was: this host puts back only a revision it ran successfully itself,
            // never one it first hears of in a rollback.
            let dir = crate::lifecycle::state::AppDir::new(&self.host.data_dir, &intent.app);
            let state: crate::lifecycle::state::AppState =
                crate::lifecycle::state::read_json(&dir.state())
                    .ok()
                    .flatten()
                    .unwrap_or_default();
            let ran = |r: &crate::bundle::RevisionId| r.0 == intent.revision;
            if !(state.history.iter().any(ran) || state.active.as_ref().is_some_and(ran)) {
                return Err(format!(
                    "a rollback puts back only a revision this host ran successfully before, \
                     and {} is not one",
                    intent.revision
                ));
            }
        }
        let tags = self.tags.borrow().clone();
        intent::check_host(&intent, &self.name, &tags).map_err(|e| e.to_string())?;
        Ok(intent)
    }

    /// Whether the intent `id` ended on this host (its outcome is recorded).
    pub fn ended(&self, id: &str) -> bool {
        self.executed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .outcome(id)
            .is_some()
    }

    /// DownloadBundle, then the lifecycle.
    async fn run(
        &self,
        intent: &Intent,
        hinted: &[String],
        batch: &[String],
        state: &watch::Sender<RunState>,
    ) -> (Verdict, HostReport) {
        let mut report = HostReport::default();
        let failed = |mut report: HostReport, reason: String| {
            let mut reason = reason;
            if reason.len() > MAX_REASON {
                let mut end = MAX_REASON;
                while !reason.is_char_boundary(end) {
                    end -= 1;
                }
                reason.truncate(end);
            }
            report.tail.push(reason.clone());
            (Verdict::Failed { reason }, report)
        };
        let release = crate::lifecycle::state::AppDir::new(&self.host.data_dir, &intent.app)
            .release(&crate::bundle::RevisionId(intent.revision.clone()));
        let fetched = if release.is_dir() {
            // Held already (a redeployment, or a rollback's revision): the lifecycle checks
            // its content against the signed id as it copies it.
            Ok(blobs::Fetched {
                path: release,
                from: self.name.clone(),
                bytes: 0,
                reused: 0,
                sources: BTreeMap::new(),
            })
        } else {
            self.fetch(intent, hinted, batch).await
        };
        let fetched = match fetched {
            Ok(f) => f,
            Err(e) => {
                report.events.push(EventRecord {
                    name: LifecycleEvent::DownloadBundle,
                    status: EventStatus::Failed,
                });
                return failed(report, format!("DownloadBundle: {e}"));
            }
        };
        report
            .tail
            .push(if fetched.sources.len() > 1 || fetched.reused > 0 {
                format!(
                    "DownloadBundle: {} bytes from {} peers, {} bytes held already",
                    fetched.bytes,
                    fetched.sources.len(),
                    fetched.reused
                )
            } else {
                format!(
                    "DownloadBundle: {} bytes from {}",
                    fetched.bytes, fetched.from
                )
            });
        report.transfer = Some(crate::fleet::log::state::TransferReport {
            fetched_bytes: fetched.bytes,
            reused_bytes: fetched.reused,
            sources: fetched.sources.len() as u32,
        });
        let (progress, mut events) = tokio::sync::mpsc::unbounded_channel::<Vec<EventRecord>>();
        let relay = {
            let state = state.clone();
            tokio::spawn(async move {
                while let Some(list) = events.recv().await {
                    state.send_modify(|r| r.events = list);
                }
            })
        };
        let request = DeployRequest {
            // Its hook logs are found by the intent's id (`shoal logs`).
            id: Some(intent.id.clone()),
            app: intent.app.clone(),
            bundle: fetched.path.clone(),
            deployment_group: if intent.group.is_empty() {
                intent.app.clone()
            } else {
                intent.group.clone()
            },
            rollback: true,
            ignore_stop_failures: intent.ignore_stop_failures,
            port: self.ports.get(&intent.app).copied(),
            progress: Some(progress),
        };
        // On a thread of its own: a hook that blocks its thread (a WASI sleep does) must not
        // hold up one of the agent's few runtime workers, nor the relay of its progress.
        // The agent's own supervisor takes the application's lock for an instant every
        // 250 ms: a deployment that finds it held asks again for a while.
        let (host, runtime) = (self.host.clone(), tokio::runtime::Handle::current());
        let deployed = tokio::task::spawn_blocking(move || {
            runtime.block_on(async move {
                let until = tokio::time::Instant::now() + BUSY_WITHIN;
                loop {
                    match host.deploy(&request).await {
                        Err(e)
                            if matches!(
                                e.kind(),
                                crate::lifecycle::run::DeployErrorKind::Busy { .. }
                            ) && tokio::time::Instant::now() < until =>
                        {
                            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
                        }
                        done => return done,
                    }
                }
            })
        })
        .await
        .unwrap_or_else(|e| {
            Err(
                crate::lifecycle::run::DeployErrorKind::Host(anyhow::anyhow!(
                    "the deployment's thread failed: {e}"
                ))
                .into(),
            )
        });
        let _ = relay.await;
        match deployed {
            Ok(record) => {
                if record.revision.0 != intent.revision {
                    // The store verified the id; this would be a bug, and is said so.
                    return failed(
                        report,
                        format!(
                            "the installed revision {} is not the signed {}",
                            record.revision.0, intent.revision
                        ),
                    );
                }
                // The lifecycle's own DownloadBundle stands for the fetch done above.
                for host in &record.hosts {
                    for event in &host.events {
                        let mut event = event.clone();
                        if event.name == LifecycleEvent::DownloadBundle {
                            event.status = EventStatus::Succeeded;
                        }
                        report.events.push(event);
                    }
                }
                for hook in &record.hooks {
                    report
                        .tail
                        .push(format!("{}: {}", hook.event, hook.summary));
                }
                if record.succeeded() {
                    (Verdict::Succeeded, report)
                } else {
                    failed(report, record.message.clone())
                }
            }
            Err(e) => failed(report, e.to_string()),
        }
    }

    /// Fetches the revision from its holders. Holders that are busy serving others, that
    /// do not hold it yet or that cannot be reached are asked again after a pause, the
    /// list of holders read again from gossip each time (hosts that fetched it serve it
    /// too), for at most [`FETCH_WITHIN`]; holders that all served something other than
    /// the revision, an invalid request or this host's own store failing end it at once.
    async fn fetch(
        &self,
        intent: &Intent,
        hinted: &[String],
        batch: &[String],
    ) -> Result<blobs::Fetched, blobs::FetchError> {
        let deadline = tokio::time::Instant::now() + FETCH_WITHIN;
        if let Some(swarm) = &self.swarm {
            match swarm
                .fetch(&intent.app, &intent.revision, hinted, batch, FETCH_WITHIN)
                .await
            {
                Ok(fetched) => return Ok(fetched),
                // Peers that keep whole bundles only, or a swarm that failed: the bundle
                // whole, below, from whoever holds it (the uploader does).
                Err(e @ blobs::chunked::ChunkedErrorKind::NoManifest(_)) => {
                    tracing::info!(
                        revision = %intent.revision,
                        "fetching the bundle whole: {e}"
                    );
                }
                Err(e) if !e.is_local() => {
                    tracing::warn!(
                        revision = %intent.revision,
                        "the revision did not come as chunks, fetching its bundle whole: {e}"
                    );
                }
                Err(e) => {
                    return Err(blobs::FetchError {
                        app: intent.app.clone(),
                        revision: intent.revision.clone(),
                        kind: blobs::FetchErrorKind::Chunks(e),
                    });
                }
            }
        }
        loop {
            // Peers that fetched the revision first, the uploader after: the agent an
            // operator uploaded to serves the first hosts, not every host.
            let (peers, origins) = self.holders(intent, hinted).await;
            let fetch = |holders: Vec<String>| async move {
                blobs::fetch(
                    &self.mesh,
                    &self.bundles,
                    &holders,
                    &intent.app,
                    &intent.revision,
                )
                .await
            };
            let mut tried = fetch(peers).await;
            if let Err(e) = &tried
                && matches!(
                    e.kind,
                    blobs::FetchErrorKind::NoHolders | blobs::FetchErrorKind::AllFailed { .. }
                )
                && !origins.is_empty()
            {
                tried = fetch(origins).await;
            }
            match tried {
                Ok(f) => return Ok(f),
                Err(e)
                    if matches!(
                        e.kind,
                        blobs::FetchErrorKind::NoHolders
                            | blobs::FetchErrorKind::AllFailed { retry: true, .. }
                    ) && tokio::time::Instant::now() < deadline =>
                {
                    tracing::debug!(revision = %intent.revision, "fetch again soon: {e}");
                    let pause = 50 + rand::random::<u64>() % 250;
                    tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Where to fetch the revision, never from this host: the agents gossip says hold it
    /// and are up, and apart, the origins (those the coordinator named: the uploader).
    async fn holders(&self, intent: &Intent, hinted: &[String]) -> (Vec<String>, Vec<String>) {
        let mut holders: BTreeSet<String> = BTreeSet::new();
        if let Ok(hosts) = self.mesh.hosts().await {
            for h in hosts {
                if matches!(h.state, MemberState::Alive | MemberState::Suspect)
                    && h.details
                        .get(&intent.app)
                        .is_some_and(|a| a.held.contains(&intent.revision))
                {
                    holders.insert(h.name);
                }
            }
        }
        holders.remove(&self.name);
        let origins: Vec<String> = hinted
            .iter()
            .filter(|h| **h != self.name)
            .cloned()
            .collect();
        for origin in &origins {
            holders.remove(origin);
        }
        (holders.into_iter().collect(), origins)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::view::HostView;

    const NEW: &str = "1111111111111111111111111111111111111111111111111111111111111111";
    const OLD: &str = "2222222222222222222222222222222222222222222222222222222222222222";

    fn host(name: &str, role: &str, runs: Option<&str>) -> HostView {
        HostView {
            name: name.into(),
            addr: "127.0.0.1:7400".parse().unwrap(),
            state: MemberState::Alive,
            tags: [("role".to_string(), role.to_string())].into(),
            apps: runs
                .map(|r| [("app".to_string(), Some(r.to_string()))].into())
                .unwrap_or_default(),
            details: BTreeMap::new(),
            log: None,
            version: 1,
        }
    }

    fn intent(revision: &str) -> Intent {
        Intent::new(
            "app",
            "app",
            crate::fleet::targets::Targets::parse("role=web").unwrap(),
            &crate::bundle::RevisionId(revision.into()),
            crate::fleet::plan::DeploymentConfig::AllAtOnce,
            "alice",
            1,
        )
        .unwrap()
    }

    #[test]
    fn a_catch_up_needs_most_of_the_targeted_hosts_that_run_the_app_to_run_its_revision() {
        let fleet = [
            host("a", "web", Some(NEW)),
            host("b", "web", Some(NEW)),
            host("c", "web", Some(OLD)),
            host("new", "web", None),
            // Not targeted: what they run does not count.
            host("d1", "db", Some(OLD)),
            host("d2", "db", Some(OLD)),
        ];
        assert_eq!(fleet_runs(&intent(NEW), "new", &fleet), Ok(()));
        // An old success brought back by a lying leader: the fleet moved on.
        let refused = fleet_runs(&intent(OLD), "new", &fleet).unwrap_err();
        assert!(refused.contains("1 of the 3 targeted hosts"), "{refused}");
        // Half is not most.
        let even = [host("a", "web", Some(NEW)), host("b", "web", Some(OLD))];
        assert!(fleet_runs(&intent(NEW), "new", &even).is_err());
        // Its own record does not vote; dead hosts and hosts not heard from do not either.
        let mut dead = host("x", "web", Some(OLD));
        dead.state = MemberState::Dead;
        let mut quiet = host("y", "web", Some(OLD));
        quiet.version = 0;
        let alone = [
            host("new", "web", Some(OLD)),
            dead,
            quiet,
            host("a", "web", Some(NEW)),
        ];
        assert_eq!(fleet_runs(&intent(NEW), "new", &alone), Ok(()));
        // A group that starts from nothing: the log's word stands.
        assert_eq!(
            fleet_runs(&intent(OLD), "new", &[host("z", "web", None)]),
            Ok(())
        );
    }
}
