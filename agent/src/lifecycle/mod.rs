//! The lifecycle of a deployment on one host: the order of events and rollback (`plan`, a
//! sans-IO state machine), the Install step (`install`), the application's process
//! (`service`), what the host remembers (`state`), and the driver that ties them together
//! with a journal for crash safety (`run`), and the agent's supervision of services
//! (`supervise`). CodeDeploy's status words are types in `status`, shared with fleet
//! deployments.

pub mod install;
pub mod monitor;
pub mod plan;
pub mod run;
pub mod service;
pub mod state;
pub mod status;
pub mod supervise;
pub mod switched;

pub use run::{DeployRequest, DeploymentRecord, LocalHost};
