//! The peer mesh: the QUIC transport with mutual TLS against the fleet CA (`transport`),
//! the framed, versioned messages agents exchange (`frame`), and membership with failure
//! detection as a sans-IO core (`membership`). The agent's network loop that ties them
//! together, and gossiped host state, come next.

pub mod frame;
pub mod membership;
pub mod transport;
