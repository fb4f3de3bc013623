//! The agent's local HTTP surface: Prometheus metrics at `/metrics` when the config names a
//! `metrics` address ([`metrics`], [`server`]). Nothing here is reachable from the mesh: it
//! listens where the operator says (a loopback address, as a rule) and serves only reads.

pub mod metrics;
pub mod server;
