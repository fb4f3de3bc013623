//! The peer mesh: the QUIC transport with mutual TLS against the fleet CA (`transport`),
//! the framed, versioned messages agents exchange (`frame`), membership with failure
//! detection (`membership`) and gossiped host state (`hoststate`) as sans-IO cores, what
//! operators see of it (`view`), what this host reports (`local`), and the agent's network
//! loop that drives it all (`node`).

pub mod frame;
pub mod hoststate;
pub mod local;
pub mod membership;
pub mod node;
pub mod transport;
pub mod view;
