//! The peer mesh: the QUIC transport with mutual TLS against the fleet CA (`transport`),
//! tagged streams of framed, versioned messages (`frame`), the connection pool (`peers`),
//! membership with failure detection (`membership`) and gossiped host state (`hoststate`)
//! as sans-IO cores, the node's own decisions as a sans-IO core over them (`core`) with one
//! timer queue (`timers`), what operators see of it (`view`), what this host reports
//! (`local`), revocation lists passed from agent to agent (`revocation`), and the thin
//! tokio driver, router and `MeshHandle` (`node`).

pub mod core;
pub mod frame;
pub mod hoststate;
pub mod local;
pub mod membership;
pub mod node;
pub mod peers;
pub mod revocation;
pub mod timers;
pub mod transport;
pub mod view;
