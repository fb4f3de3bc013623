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
//! - [`voters`]: which agents hold the deployment log (1, 3 or 5, replaced when dead for a
//!   while), decided by its leader.
//!
//! - [`log`]: the replicated deployment log (intents, plans and host results, kept by the
//!   voters with openraft on redb) and its transport over the mesh.
//!
//! Next comes the coordinator, the log's leader driving [`plan::Planner`] from it; the thin
//! async layer that talks to hosts stays outside the sans-IO modules.

pub mod intent;
pub mod log;
pub mod plan;
pub mod targets;
pub mod voters;
