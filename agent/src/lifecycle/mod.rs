//! The lifecycle of a deployment on one host: the order of events and rollback (`plan`, a
//! sans-IO state machine), and the steps that touch the host.

pub mod install;
pub mod plan;
