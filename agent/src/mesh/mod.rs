//! The peer mesh: the QUIC transport with mutual TLS against the fleet CA (`transport`)
//! and the framed, versioned messages agents exchange (`frame`). Membership and gossip
//! build on these.

pub mod frame;
pub mod transport;
