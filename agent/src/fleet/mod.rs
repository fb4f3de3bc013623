//! Fleet deployments: one revision rolled out across many hosts, batch by batch.
//!
//! Today this folder holds the sans-IO decisions a fleet deployment is made of, with no
//! networking, no async and no IO, so every rule is unit-tested deterministically:
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
//! Next come the replicated deployment log (intents, plans and results, kept by a few voter
//! agents) and the coordinator that drives [`plan::Planner`] from it; the thin async layer
//! that talks to hosts stays outside these modules.

pub mod intent;
pub mod log;
pub mod plan;
pub mod targets;
