//! What the agent counts, in Prometheus' terms (`prometheus-client`), and how a scrape sees
//! it (decision 0021).
//!
//! Two kinds of numbers:
//! - **Counted where they happen**, through [`metrics()`], the one process-wide set: hook
//!   runs and their durations, hook loads by cache level, deployments on this host by
//!   outcome, service restarts, membership packets, members declared dead and rejoins,
//!   bundle bytes, open mesh connections.
//!   Counting is an atomic add; nothing is kept per deployment or per peer, so the label
//!   sets are small and bounded (events, outcomes, directions, and the host's own apps).
//! - **Read at scrape time** ([`Snapshot`], filled by the server from the mesh and the
//!   deployment log just before it encodes): members by state, deployments in the log by
//!   status, the Raft term, whether this agent leads or votes, dropped work by kind.
//!
//! Names follow Prometheus' conventions: a `shoal_` prefix, base units (`_seconds`,
//! `_bytes`), `_total` on counters (added by the encoder).

use std::sync::{Mutex, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// The labels of a hook run.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HookLabels {
    /// The lifecycle event (`ValidateService`, ...), or `monitor`.
    pub event: String,
    /// `succeeded` or `failed`.
    pub outcome: String,
}

/// A label with one value, named by the family (`kind`, `state`, `status`, `app`, ...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    pub kind: String,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct State {
    pub state: String,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Status {
    pub status: String,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct App {
    pub app: String,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Direction {
    pub direction: String,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: String,
}

/// A change of membership worth counting ([`Metrics::member_changes`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberChange {
    /// A member declared down without leaving.
    Dead,
    /// This agent had been declared down, and rejoined.
    Rejoined,
}

impl MemberChange {
    const ALL: [MemberChange; 2] = [MemberChange::Dead, MemberChange::Rejoined];

    fn label(self) -> &'static str {
        match self {
            MemberChange::Dead => "dead",
            MemberChange::Rejoined => "rejoined",
        }
    }
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric of the agent. Get it with [`metrics()`].
pub struct Metrics {
    registry: Registry,
    /// Lifecycle and monitor hook runs, by event and outcome.
    pub hook_seconds: Histograms<HookLabels>,
    /// Hooks loaded, by where the compiled code came from (`memory`, `disk`, `compiled`).
    pub hook_loads: Family<Kind, Counter>,
    /// Deployments run on this host (local or a fleet's part), by outcome.
    pub host_deployments: Family<Outcome, Counter>,
    /// Times the supervisor started an application's service again.
    pub service_restarts: Family<App, Counter>,
    /// Membership (SWIM) packets, `received` or `sent`.
    pub swim_packets: Family<Direction, Counter>,
    /// Host-state gossip messages (records, digests), `received` or `sent`.
    pub gossip_messages: Family<Direction, Counter>,
    /// Bundle bytes between agents, `received` or `sent`.
    pub bundle_bytes: Family<Direction, Counter>,
    /// Mesh connections open now.
    pub mesh_connections: Gauge,
    /// Changes of membership this agent saw, by kind: `dead` (a member declared down
    /// without leaving), `rejoined` (this agent had been declared down). On a healthy mesh
    /// both stay at 0; a rising `dead` with every host up means the failure detection is
    /// fooled (see `mesh/core.rs`, `Health` and the links' round trip).
    pub member_changes: Family<Kind, Counter>,
    // Read at scrape time.
    members: Family<State, Gauge>,
    deployments: Family<Status, Gauge>,
    raft_term: Gauge,
    raft_leader: Gauge,
    raft_voter: Gauge,
    dropped: Family<Kind, Counter>,
    /// Serializes scrapes: a snapshot is applied and encoded as one.
    scraping: Mutex<()>,
}

/// What a scrape reads from the mesh and the log (see the module doc).
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Members by state (`alive`, `suspect`, `dead`, `left`), this agent included.
    pub members: Vec<(&'static str, i64)>,
    /// Deployments in this agent's copy of the log, by status: every status, those with
    /// none at 0 (a gauge keeps its last value otherwise).
    pub deployments: Vec<(String, i64)>,
    pub raft_term: u64,
    pub leader: bool,
    pub voter: bool,
    /// Dropped or refused work by kind: running totals.
    pub dropped: Vec<(&'static str, u64)>,
}

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("shoal");
        let hook_seconds: Histograms<HookLabels> = Family::new_with_constructor(|| {
            // 5 ms to about 80 s.
            Histogram::new(exponential_buckets(0.005, 2.0, 15))
        });
        registry.register_with_unit(
            "hook_duration",
            "Lifecycle and monitor hook runs, by event and outcome",
            Unit::Seconds,
            hook_seconds.clone(),
        );
        let m = Metrics {
            hook_seconds,
            hook_loads: Family::default(),
            host_deployments: Family::default(),
            service_restarts: Family::default(),
            swim_packets: Family::default(),
            gossip_messages: Family::default(),
            bundle_bytes: Family::default(),
            mesh_connections: Gauge::default(),
            member_changes: Family::default(),
            members: Family::default(),
            deployments: Family::default(),
            raft_term: Gauge::default(),
            raft_leader: Gauge::default(),
            raft_voter: Gauge::default(),
            dropped: Family::default(),
            scraping: Mutex::new(()),
            registry: Registry::default(),
        };
        registry.register(
            "hook_loads",
            "Hooks loaded, by where their compiled code came from (memory, disk, compiled)",
            m.hook_loads.clone(),
        );
        registry.register(
            "host_deployments",
            "Deployments run on this host, by outcome",
            m.host_deployments.clone(),
        );
        registry.register(
            "service_restarts",
            "Times the supervisor started an application's service again",
            m.service_restarts.clone(),
        );
        registry.register(
            "swim_packets",
            "Membership (SWIM) packets, received or sent",
            m.swim_packets.clone(),
        );
        registry.register(
            "gossip_messages",
            "Host-state gossip messages (records, digests), received or sent",
            m.gossip_messages.clone(),
        );
        registry.register_with_unit(
            "bundle",
            "Bytes of bundles transferred whole between agents, received or sent",
            Unit::Bytes,
            m.bundle_bytes.clone(),
        );
        registry.register(
            "mesh_connections",
            "Mesh connections open now",
            m.mesh_connections.clone(),
        );
        registry.register(
            "mesh_member_changes",
            "Members declared dead (not left), and times this agent was declared down and rejoined",
            m.member_changes.clone(),
        );
        registry.register(
            "mesh_members",
            "Members of the mesh by state, as this agent sees them",
            m.members.clone(),
        );
        registry.register(
            "deployments",
            "Fleet deployments in this agent's copy of the log, by status",
            m.deployments.clone(),
        );
        registry.register(
            "raft_term",
            "The deployment log's current Raft term",
            m.raft_term.clone(),
        );
        registry.register(
            "raft_leader",
            "1 when this agent leads the deployment log",
            m.raft_leader.clone(),
        );
        registry.register(
            "raft_voter",
            "1 when this agent is a voter of the deployment log",
            m.raft_voter.clone(),
        );
        registry.register(
            "mesh_dropped",
            "Work the mesh dropped or refused, by kind",
            m.dropped.clone(),
        );
        // Shown at 0 from the start: a scrape tells "none" from "not counted".
        for change in MemberChange::ALL {
            let _zero = m.member_changes.get_or_create(&Kind {
                kind: change.label().to_owned(),
            });
        }
        Metrics { registry, ..m }
    }

    /// Counts a hook run of `event` that took `seconds`.
    pub fn hook_ran(&self, event: &str, succeeded: bool, seconds: f64) {
        self.hook_seconds
            .get_or_create(&HookLabels {
                event: event.to_owned(),
                outcome: if succeeded { "succeeded" } else { "failed" }.to_owned(),
            })
            .observe(seconds);
    }

    /// Counts a hook load from `kind` (`memory`, `disk`, `compiled`).
    pub fn hook_loaded(&self, kind: &str) {
        self.hook_loads
            .get_or_create(&Kind {
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// Counts a change of membership.
    pub fn member_changed(&self, change: MemberChange) {
        self.member_changes
            .get_or_create(&Kind {
                kind: change.label().to_owned(),
            })
            .inc();
    }

    /// Counts one of `family`'s `direction` (`received` or `sent`) by `n`.
    pub fn count_direction(family: &Family<Direction, Counter>, direction: &str, n: u64) {
        family
            .get_or_create(&Direction {
                direction: direction.to_owned(),
            })
            .inc_by(n);
    }

    /// The text a scrape returns, with `snapshot` as the scrape-time values.
    pub fn encode(&self, snapshot: &Snapshot) -> String {
        let _one = self.scraping.lock().unwrap_or_else(|p| p.into_inner());
        for (state, n) in &snapshot.members {
            self.members
                .get_or_create(&State {
                    state: (*state).to_owned(),
                })
                .set(*n);
        }
        for (status, n) in &snapshot.deployments {
            self.deployments
                .get_or_create(&Status {
                    status: status.clone(),
                })
                .set(*n);
        }
        self.raft_term.set(snapshot.raft_term as i64);
        self.raft_leader.set(snapshot.leader as i64);
        self.raft_voter.set(snapshot.voter as i64);
        for (kind, total) in &snapshot.dropped {
            let counter = self.dropped.get_or_create(&Kind {
                kind: (*kind).to_owned(),
            });
            counter.inc_by(total.saturating_sub(counter.get()));
        }
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}
