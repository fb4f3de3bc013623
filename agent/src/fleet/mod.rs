//! Fleet deployments: one revision rolled out across many hosts, batch by batch.
//!
//! The decisions a fleet deployment is made of are sans-IO (no networking, no async), so
//! every rule is unit-tested deterministically; the log's storage and transport are the
//! parts that touch the disk and the mesh:
//!
//! - [`targets`]: which hosts a deployment is for, chosen by tags the way CodeDeploy's tag
//!   groups choose instances (filters ORed within a group, up to three groups ANDed).
//! - [`plan`]: how the chosen hosts are updated, batch by batch, under a deployment
//!   configuration (AllAtOnce, HalfAtATime, OneAtATime or a minimum of healthy hosts), as a
//!   state machine the coordinator feeds with host results.
//! - [`intent`]: the deployment intent an operator signs and every host verifies (operator
//!   role, fleet CA, revision, age) and admits once, before it installs anything; its replay
//!   store, [`intent::Executed`], is the one part here that touches the disk.
//!
//! - [`catch_up`]: which hosts joined a group late, or missed its last success, and the
//!   catch-up deployment that brings them to it.
//!
//! - [`voters`]: which agents hold the deployment log (1, 3 or 5, replaced when dead for a
//!   while), decided by its leader.
//!
//! - [`log`]: the replicated deployment log (intents, plans and host results, kept by the
//!   voters with openraft on redb) and its transport over the mesh.
//!
//! The thin async layer around them:
//!
//! - [`service`]: one agent's fleet service: its raft node, the log's founding, operator
//!   requests answered by the leader or forwarded to it, the voter upkeep.
//! - [`coordinator`]: the leader's drivers, one per deployment, [`plan::Planner`] fed
//!   from the log, fenced commands to hosts, results committed.
//! - [`host`]: what a host does with a command: checks the intent itself, fetches the
//!   revision from peers, runs the lifecycle, once.
//! - [`wire`]: what they say to each other and to operators.

pub mod catch_up;
pub mod coordinator;
pub mod host;
pub mod intent;
pub mod log;
pub mod notify;
pub mod plan;
pub mod service;
pub mod targets;
pub mod voters;
pub mod wire;

/// The time now, in seconds since the Unix epoch (this agent's clock; 0 before 1970).
pub fn now_unix() -> u64 {
    now_ms() / 1000
}

/// The time now, in milliseconds since the Unix epoch (this agent's clock).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
