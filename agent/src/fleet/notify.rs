//! Webhook notifications, CodeDeploy's triggers: the coordinator POSTs a JSON document to
//! each webhook of its configuration that wants the event (a deployment's start, success,
//! failure, stop and rollback, and each host failure). Deliveries are signed (an
//! HMAC-SHA256 of the body with the webhook's secret, in `X-Shoal-Signature`), retried with
//! back-off, and run on a task of their own that never holds up a deployment.
//!
//! **Once per event, across a coordinator change.** What is due is derived from the
//! deployment log, the same on every agent ([`due`]): each notice has a key
//! (`start`, `host-failure:NAME`, `success`, ...). Once every webhook that wants a notice
//! has taken it (or the retries gave up), the coordinator commits
//! [`Command::Notified`](super::log::Command::Notified) with its key, and no coordinator
//! sends it again. Repeats remain possible in one case: a coordinator that changes (or
//! fails to record) after a webhook took a notice and before it is recorded. Then the next
//! coordinator sends that notice again, to every webhook that wants it. Each repeat carries
//! the same `X-Shoal-Delivery` id, by which a receiver drops it.
//!
//! Order is kept per deployment across all webhooks: a webhook that does not answer holds
//! back the deployment's later notices, to every webhook, until its retries give up (10
//! minutes), and deliveries go one at a time.
//!
//! [`due`] and [`Backoff`] are sans-IO; [`run`] is the thin driver.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use super::log::{
    Command, Deployment, DeploymentState, HostState, Response, StateReader, TypeConfig,
};
use crate::config::Webhook;

/// What a webhook can ask to be told of (the names in the config's `events`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NoticeKind {
    Start,
    HostFailure,
    Success,
    Failure,
    Stop,
    Rollback,
}

impl NoticeKind {
    pub const ALL: [NoticeKind; 6] = [
        NoticeKind::Start,
        NoticeKind::HostFailure,
        NoticeKind::Success,
        NoticeKind::Failure,
        NoticeKind::Stop,
        NoticeKind::Rollback,
    ];

    pub fn name(self) -> &'static str {
        match self {
            NoticeKind::Start => "start",
            NoticeKind::HostFailure => "host-failure",
            NoticeKind::Success => "success",
            NoticeKind::Failure => "failure",
            NoticeKind::Stop => "stop",
            NoticeKind::Rollback => "rollback",
        }
    }

    pub fn parse(name: &str) -> Option<NoticeKind> {
        NoticeKind::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// One notification due.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    /// Unique within the deployment; what the log records once it is delivered.
    pub key: String,
    pub kind: NoticeKind,
    pub host: Option<String>,
    pub reason: Option<String>,
}

/// How long after its creation a deployment is still notified of: older ones (a webhook
/// added to the config later, say) are not.
pub const NOTIFY_WITHIN_MS: u64 = 24 * 3600 * 1000;

/// The notifications of `d` not yet recorded as delivered: its start, its hosts' failures
/// (by host name), its end, its rollback. The same on every agent for the same log.
pub fn due(d: &Deployment, now_ms: u64) -> Vec<Notice> {
    if d.created_at_ms.saturating_add(NOTIFY_WITHIN_MS) < now_ms {
        return Vec::new();
    }
    let mut all = vec![Notice {
        key: "start".into(),
        kind: NoticeKind::Start,
        host: None,
        reason: None,
    }];
    for (name, h) in &d.hosts {
        if let HostState::Failed { reason } = &h.state {
            all.push(Notice {
                key: format!("host-failure:{name}"),
                kind: NoticeKind::HostFailure,
                host: Some(name.clone()),
                reason: Some(reason.clone()),
            });
        }
    }
    let end = match &d.status {
        DeploymentState::Succeeded => Some((NoticeKind::Success, None)),
        DeploymentState::Failed { reason } => Some((NoticeKind::Failure, Some(reason.clone()))),
        DeploymentState::Stopped => Some((NoticeKind::Stop, None)),
        _ => None,
    };
    if let Some((kind, reason)) = end {
        all.push(Notice {
            key: kind.name().into(),
            kind,
            host: None,
            reason,
        });
    }
    if d.rolled_back_by.is_some() {
        all.push(Notice {
            key: "rollback".into(),
            kind: NoticeKind::Rollback,
            host: None,
            reason: None,
        });
    }
    // Past the bound, host failures are dropped, never the deployment's own notices.
    let room = super::log::state::MAX_NOTICES.saturating_sub(d.notified.len() + 4);
    let mut failures = 0;
    all.retain(|n| {
        if d.notified.contains(&n.key) {
            return false;
        }
        if n.kind == NoticeKind::HostFailure {
            failures += 1;
            return failures <= room;
        }
        true
    });
    all
}

/// The document a webhook receives.
#[derive(Debug, Serialize)]
pub struct Payload<'a> {
    /// `<deployment>/<key>`: the same for every delivery of one notice, so a receiver can
    /// drop a repeat.
    pub delivery: String,
    pub event: NoticeKind,
    pub deployment: &'a str,
    pub app: &'a str,
    pub group: &'a str,
    pub revision: &'a str,
    pub status: crate::lifecycle::status::DeploymentStatus,
    pub host: Option<&'a str>,
    pub reason: Option<&'a str>,
    pub rollback: Option<&'a str>,
    pub rollback_of: Option<&'a str>,
    /// When it is a catch-up of hosts that joined late: the deployment it catches up with.
    pub catch_up_of: Option<&'a str>,
    pub created_at_ms: u64,
}

impl<'a> Payload<'a> {
    pub fn of(d: &'a Deployment, notice: &'a Notice) -> Payload<'a> {
        Payload {
            delivery: format!("{}/{}", d.id, notice.key),
            event: notice.kind,
            deployment: &d.id,
            app: &d.app,
            group: &d.group,
            revision: &d.revision,
            status: d.status.status(),
            host: notice.host.as_deref(),
            reason: notice.reason.as_deref(),
            rollback: d.rolled_back_by.as_deref(),
            rollback_of: d.rollback_of.as_deref(),
            catch_up_of: d.catch_up.as_ref().map(|c| c.of.as_str()),
            created_at_ms: d.created_at_ms,
        }
    }
}

/// `sha256=<hex>`: the HMAC-SHA256 of `body` under `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    format!(
        "sha256={}",
        hex::encode(ring::hmac::sign(&key, body).as_ref())
    )
}

/// Retries of one notice to one webhook: 1 s, 2 s, 4 s ... at most 32 s apart, given up
/// after [`GIVE_UP_AFTER`].
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    first: Instant,
    next: Instant,
    attempts: u32,
}

/// How long a notice is retried to a webhook that does not take it.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(600);

impl Backoff {
    pub fn new(now: Instant) -> Backoff {
        Backoff {
            first: now,
            next: now,
            attempts: 0,
        }
    }

    /// Whether an attempt is due at `now`.
    pub fn due(&self, now: Instant) -> bool {
        now >= self.next
    }

    /// An attempt failed at `now`: the next one's time, or `None` to give up.
    pub fn failed(&mut self, now: Instant) -> Option<Instant> {
        self.attempts += 1;
        if now.duration_since(self.first) >= GIVE_UP_AFTER {
            return None;
        }
        let wait = Duration::from_secs(1u64 << (self.attempts.min(6) - 1));
        self.next = now + wait;
        Some(self.next)
    }
}

/// How long one delivery may take.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the driver looks for notices due.
const TICK: Duration = Duration::from_millis(250);

/// The HTTP client every delivery of one notifier shares (its connection pool too).
fn client() -> ureq::Agent {
    ureq::Agent::config_builder()
        .proxy(None)
        .http_status_as_error(false)
        .timeout_global(Some(DELIVERY_TIMEOUT))
        .build()
        .into()
}

/// POSTs `body` to `hook`; `Err` says why it was not taken (anything but a 2xx).
fn deliver(
    agent: &ureq::Agent,
    hook: &Webhook,
    body: &[u8],
    delivery: &str,
    event: NoticeKind,
) -> Result<(), String> {
    let response = agent
        .post(&hook.url)
        .header("content-type", "application/json")
        .header("user-agent", concat!("shoal/", env!("CARGO_PKG_VERSION")))
        .header("x-shoal-event", event.name())
        .header("x-shoal-delivery", delivery)
        .header("x-shoal-signature", &signature(&hook.key, body))
        .send(body)
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(format!("answered {status}"))
    }
}

/// Delivers what is due, for as long as this agent leads (the caller aborts the task when
/// it stops leading; a failed record ends it). One delivery at a time, on a blocking
/// thread.
pub async fn run(raft: openraft::Raft<TypeConfig>, reader: StateReader, hooks: Arc<Vec<Webhook>>) {
    // (deployment, key) -> the hooks that still want it, each with its back-off.
    let mut pending: BTreeMap<(String, String), BTreeMap<usize, Backoff>> = BTreeMap::new();
    let agent = client();
    loop {
        tokio::time::sleep(TICK).await;
        let now_ms = super::now_ms();
        let work: Vec<(Arc<Deployment>, Vec<Notice>)> = reader.read(|s| {
            s.iter()
                .filter_map(|d| {
                    let due = due(d, now_ms);
                    (!due.is_empty()).then(|| (Arc::new(d.clone()), due))
                })
                .collect()
        });
        let live: BTreeSet<(String, String)> = work
            .iter()
            .flat_map(|(d, notices)| notices.iter().map(|n| (d.id.clone(), n.key.clone())))
            .collect();
        pending.retain(|k, _| live.contains(k));
        for (d, notices) in work {
            // In order: a notice waits for the one before it.
            for notice in notices {
                let key = (d.id.clone(), notice.key.clone());
                let wanting = pending.entry(key.clone()).or_insert_with(|| {
                    hooks
                        .iter()
                        .enumerate()
                        .filter(|(_, h)| h.wants(notice.kind))
                        .map(|(i, _)| (i, Backoff::new(Instant::now())))
                        .collect()
                });
                let payload = Payload::of(&d, &notice);
                let body = serde_json::to_vec(&payload).unwrap_or_default();
                let delivery = payload.delivery;
                let mut done = Vec::new();
                for (&i, backoff) in wanting.iter_mut() {
                    if !backoff.due(Instant::now()) {
                        continue;
                    }
                    let (agent, hook) = (agent.clone(), hooks[i].clone());
                    let (body, id) = (body.clone(), delivery.clone());
                    let kind = notice.kind;
                    let sent = tokio::task::spawn_blocking(move || {
                        deliver(&agent, &hook, &body, &id, kind)
                    })
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()));
                    match sent {
                        Ok(()) => done.push(i),
                        Err(why) => {
                            if backoff.failed(Instant::now()).is_none() {
                                tracing::warn!(
                                    webhook = %hooks[i].url, %delivery,
                                    "gave up a notification after {GIVE_UP_AFTER:?}: {why}"
                                );
                                done.push(i);
                            } else {
                                tracing::debug!(webhook = %hooks[i].url, %delivery, "not delivered yet: {why}");
                            }
                        }
                    }
                }
                for i in done {
                    wanting.remove(&i);
                }
                if !wanting.is_empty() {
                    break;
                }
                let recorded = super::coordinator::commit(
                    &raft,
                    Command::Notified {
                        deployment: d.id.clone(),
                        keys: vec![notice.key.clone()],
                    },
                )
                .await;
                match recorded {
                    Ok(Response::Applied { .. } | Response::Unchanged) => {
                        pending.remove(&key);
                    }
                    Ok(other) => {
                        tracing::warn!(%delivery, "recording a notification: {other:?}");
                        break;
                    }
                    // Not leading any more, or no majority: the next coordinator sends it.
                    Err(e) => {
                        tracing::debug!(%delivery, "recording a notification: {e}");
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::log::{DeploymentsState, Fence, NewDeployment, PlannedHost, Verdict};
    use crate::fleet::plan::{DeploymentConfig, Health, Revision, Rollout};

    fn fence(index: u64) -> Fence {
        Fence { term: 1, index }
    }

    fn created(now_ms: u64) -> DeploymentsState {
        let mut state = DeploymentsState::default();
        state.apply(
            fence(1),
            Command::CreateDeployment(NewDeployment {
                id: "d1".into(),
                app: "web".into(),
                group: "web".into(),
                targets: "role=web".into(),
                revision: "new".into(),
                config: DeploymentConfig::AllAtOnce,
                rollout: Rollout::Waveless,
                rollback_to: None,
                rollback_of: None,
                hosts: ["a", "b"]
                    .iter()
                    .map(|h| PlannedHost {
                        name: h.to_string(),
                        health: Health::Healthy,
                        revision: Revision::Known("old".into()),
                        zone: None,
                    })
                    .collect(),
                signed_intent: Vec::new(),
                created_at_ms: now_ms,
                origin: None,
                catch_up: None,
            }),
        );
        state
    }

    fn keys(state: &DeploymentsState, now_ms: u64) -> Vec<String> {
        due(state.get("d1").unwrap(), now_ms)
            .into_iter()
            .map(|n| n.key)
            .collect()
    }

    #[test]
    fn what_is_due_follows_the_log_and_is_sent_once() {
        let now = 1_000_000;
        let mut state = created(now);
        assert_eq!(keys(&state, now), ["start"]);
        state.apply(
            fence(2),
            Command::Notified {
                deployment: "d1".into(),
                keys: vec!["start".into()],
            },
        );
        assert!(keys(&state, now).is_empty(), "recorded: not due again");
        state.apply(
            fence(3),
            Command::StartHosts {
                deployment: "d1".into(),
                hosts: vec!["a".into(), "b".into()],
            },
        );
        for (i, (host, verdict)) in [
            ("a", Verdict::Succeeded),
            (
                "b",
                Verdict::Failed {
                    reason: "ValidateService failed".into(),
                },
            ),
        ]
        .into_iter()
        .enumerate()
        {
            state.apply(
                fence(4 + i as u64),
                Command::HostResult {
                    deployment: "d1".into(),
                    host: host.into(),
                    verdict,
                    report: Default::default(),
                },
            );
        }
        assert_eq!(keys(&state, now), ["host-failure:b"]);
        state.apply(
            fence(6),
            Command::Finish {
                deployment: "d1".into(),
                verdict: Verdict::Succeeded,
            },
        );
        let due_now = due(state.get("d1").unwrap(), now);
        assert_eq!(
            due_now.iter().map(|n| n.key.as_str()).collect::<Vec<_>>(),
            ["host-failure:b", "success"]
        );
        assert_eq!(due_now[0].reason.as_deref(), Some("ValidateService failed"));
        // A repeat of a record changes nothing; an overlong key is refused.
        let again = Command::Notified {
            deployment: "d1".into(),
            keys: vec!["start".into()],
        };
        assert_eq!(state.apply(fence(7), again), Response::Unchanged);
        let long = Command::Notified {
            deployment: "d1".into(),
            keys: vec!["x".repeat(crate::fleet::log::state::MAX_NOTICE_KEY + 1)],
        };
        assert!(matches!(state.apply(fence(8), long), Response::Refused(_)));
        // Too old a deployment is not notified of.
        assert!(keys(&state, now + NOTIFY_WITHIN_MS + 1).is_empty());
    }

    #[test]
    fn the_signature_is_the_bodys_hmac_and_back_off_doubles_then_gives_up() {
        // RFC 4231, test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let t0 = Instant::now();
        let mut b = Backoff::new(t0);
        assert!(b.due(t0));
        let waits: Vec<u64> = (0..8)
            .map(|_| {
                let now = b.next;
                b.failed(now).unwrap().duration_since(now).as_secs()
            })
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 32, 32]);
        assert!(!b.due(t0));
        assert_eq!(b.failed(t0 + GIVE_UP_AFTER), None);
    }

    #[test]
    fn event_names_read_back() {
        for k in NoticeKind::ALL {
            assert_eq!(NoticeKind::parse(k.name()), Some(k));
            assert_eq!(serde_json::to_value(k).unwrap(), k.name());
        }
        assert_eq!(NoticeKind::parse("deploy"), None);
    }
}
