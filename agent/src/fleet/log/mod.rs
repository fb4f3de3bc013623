//! The deployment log: deployments, their plans and every host's result, replicated with
//! Raft (openraft 0.9) among a few voter agents. Its leader is the batch coordinator; a new
//! leader continues a deployment from what the log says.
//!
//! This module is the storage half: what the log means and where it lives.
//!
//! - [`state`]: the commands entries carry ([`Command`]) and the state they build
//!   ([`DeploymentsState`]), applied deterministically, sans-IO. The failover rules (fences,
//!   no host started twice, first result stands) are there.
//! - [`store`]: openraft's [`RaftLogStorage`](openraft::storage::RaftLogStorage) and
//!   [`RaftStateMachine`](openraft::storage::RaftStateMachine) on one redb file,
//!   `DIR/log.redb` (decision 0009). Votes, appends, truncations and snapshots are
//!   committed with an fsync before openraft is told they are done; a kill at any moment
//!   leaves the last committed transaction. The state machine lives in memory and is
//!   rebuilt at start from the last snapshot plus the committed entries after it, so it is
//!   a function of the log.
//!
//! - [`network`]: openraft's RPCs over the mesh (`Protocol::Raft`), a member speaking
//!   only for itself.
//!
//! Identity: a voter's Raft id is [`node_id`] of its agent name (the name in its
//! certificate), and its [`Node`] is the name and mesh address. Networking (the `raft`
//! protocol on the mesh) and the coordinator come next and plug in here: they build
//! `openraft::Raft::<TypeConfig>::new(node_id(name), config, network, log, state_machine)`
//! from [`open`], propose [`Command`]s with `client_write`, and read the applied state
//! through a [`StateReader`].

pub mod network;
pub mod state;
pub mod store;

use std::fmt;
use std::io::Cursor;
use std::net::{Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use state::{
    CatchUpOf, Command, Deployment, DeploymentHost, DeploymentState, DeploymentsState, Fence,
    Group, HostReport, HostState, NewDeployment, PlannedHost, Refusal, Response, Verdict,
};
pub use store::{LogStore, StateMachineStore, StateReader, open};

/// A voter's Raft id: [`node_id`] of its agent name.
pub type NodeId = u64;

/// What the log records of a member: who it is and where the mesh reaches it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// The agent's name, as in its certificate: what the mesh dials by.
    pub name: String,
    /// Its mesh address when it joined.
    pub addr: SocketAddr,
}

impl Default for Node {
    fn default() -> Self {
        Node {
            name: String::new(),
            addr: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        }
    }
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.addr)
    }
}

/// The Raft id of the agent named `name`: the first 8 bytes (big-endian) of a SHA-256 over
/// a fixed context and the name. Names are unique in the fleet (the CA issues one per
/// name), so ids are too, short of a 64-bit collision; the same agent keeps its id across
/// restarts and addresses.
pub fn node_id(name: &str) -> NodeId {
    let digest = Sha256::new()
        .chain_update(b"shoal raft node id\0")
        .chain_update(name.as_bytes())
        .finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

openraft::declare_raft_types!(
    /// Shoal's types for openraft: [`Command`] in, [`Response`] out, snapshots as bytes.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = NodeId,
        Node = Node,
        SnapshotData = Cursor<Vec<u8>>,
);

/// openraft's configuration for the deployment log: at most 16 entries per append and
/// snapshots in 256 KiB chunks, so a call fits the mesh's 1 MiB frame as long as each
/// command stays under 64 KiB (to be checked before a command is proposed); heartbeats
/// every 250 ms, elections after 1 to 2 s of silence.
pub fn raft_config() -> openraft::Config {
    openraft::Config {
        cluster_name: "shoal".into(),
        heartbeat_interval: 250,
        election_timeout_min: 1_000,
        election_timeout_max: 2_000,
        max_payload_entries: 16,
        snapshot_max_chunk_size: 256 * 1024,
        ..Default::default()
    }
}

/// A log entry of Shoal's deployment log.
pub type Entry = openraft::Entry<TypeConfig>;
/// A position in the log.
pub type LogId = openraft::LogId<NodeId>;
/// The error every storage call returns.
pub type StorageError = openraft::StorageError<NodeId>;

impl From<LogId> for Fence {
    fn from(log_id: LogId) -> Fence {
        Fence {
            term: log_id.leader_id.term,
            index: log_id.index,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_stable_and_differ_by_name() {
        assert_eq!(node_id("edge-1"), node_id("edge-1"));
        assert_ne!(node_id("edge-1"), node_id("edge-2"));
    }

    #[test]
    fn a_fence_is_the_term_and_index_of_its_entry() {
        let log_id = LogId::new(openraft::CommittedLeaderId::new(4, node_id("a")), 17);
        assert_eq!(Fence::from(log_id), Fence { term: 4, index: 17 });
        assert!(Fence { term: 5, index: 1 } > Fence { term: 4, index: 17 });
    }
}
