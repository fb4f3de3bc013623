//! The deployment log's transport: openraft's three RPCs (append entries, vote, install a
//! snapshot chunk) over the mesh, one bidirectional stream tagged [`Protocol::Raft`] per
//! call, a request frame out and an answer frame back.
//!
//! - **Client** ([`Network`], [`Peer`]): dials the voter by its agent name through the
//!   [`MeshHandle`] (so mutual TLS against the fleet CA and the pool's back-off apply),
//!   within the call's hard deadline. A peer that cannot be reached is `Unreachable` (openraft
//!   backs off), a stream that breaks mid-call a `NetworkError` (it retries), a deadline a
//!   `Timeout`.
//! - **Server** ([`serve`]): answers agents only, at most [`MAX_SERVING`] calls at once,
//!   each within [`CALL_DEADLINE`], with frames bounded by the mesh's frame limit and
//!   snapshot chunks by [`MAX_SNAPSHOT`]. A call is answered only when the leader or
//!   candidate it names is the Raft id of the certificate that sent it ([`super::node_id`]
//!   of its name) and that id is a voter in this agent's membership: openraft itself
//!   believes any caller with a higher term, so without this an agent that is not a voter
//!   could campaign, lead and commit entries. An agent whose log is not initialized yet
//!   answers any agent (that is how it joins); it holds nothing until then.
//!
//! Raft does not defend against a lying voter: a compromised voter can forge the log. What
//! keeps a host safe from that is the operator's signature on every intent
//! ([`crate::fleet::intent`]), checked by the host itself.

use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{Raft, Vote};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use super::{Node, NodeId, TypeConfig, node_id};
use crate::identity::Role;
use crate::mesh::frame::{Protocol, read_frame, write_frame};
use crate::mesh::node::{InboundStream, MeshHandle, Streams};

/// Calls served at once; more are refused (the caller retries).
pub const MAX_SERVING: usize = 64;
/// How long a call may take to arrive whole and be answered, on the server.
pub const CALL_DEADLINE: Duration = Duration::from_secs(10);
/// The largest snapshot a voter takes in (the end of any chunk): a chunk's offset is a seek
/// in the snapshot being received, and an unbounded one would grow it without limit.
pub const MAX_SNAPSHOT: u64 = 64 << 20;

/// One call, as it travels (public for tests that play a hostile member).
#[derive(Debug, Serialize, Deserialize)]
pub enum Call {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    Snapshot(InstallSnapshotRequest<TypeConfig>),
}

/// Its answer.
#[derive(Debug, Serialize, Deserialize)]
pub enum Answer {
    Append(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    Snapshot(Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>),
    /// Not answered: the reason (the caller is not who the call names, the server is busy).
    Refused(String),
}

/// Makes a [`Peer`] per voter; openraft holds one per replication stream.
#[derive(Clone)]
pub struct Network {
    mesh: MeshHandle,
}

impl Network {
    pub fn new(mesh: MeshHandle) -> Network {
        Network { mesh }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> Peer {
        Peer {
            mesh: self.mesh.clone(),
            target,
            node: node.clone(),
        }
    }
}

/// Calls to one voter.
pub struct Peer {
    mesh: MeshHandle,
    target: NodeId,
    node: Node,
}

/// Why a call did not get an answer, before it is cast into openraft's error for the RPC.
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("{0}")]
    Unreachable(String),
    #[error("{0}")]
    Broken(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl Peer {
    async fn call(&self, call: Call, ttl: Duration) -> Result<Answer, CallError> {
        let name = self.node.name.clone();
        let exchange = async {
            let (mut send, mut recv) = self
                .mesh
                .open_bi(&name, Protocol::Raft)
                .await
                .map_err(|e| CallError::Unreachable(e.to_string()))?;
            write_frame(&mut send, &call)
                .await
                .map_err(|e| CallError::Broken(format!("sending to {name}: {e}")))?;
            let _ = send.finish();
            read_frame::<Answer>(&mut recv)
                .await
                .map_err(|e| CallError::Broken(format!("reading {name}'s answer: {e}")))
        };
        match tokio::time::timeout(ttl, exchange).await {
            Ok(answer) => answer,
            Err(_) => Err(CallError::Timeout(ttl)),
        }
    }

    fn error<E: std::error::Error>(
        &self,
        action: RPCTypes,
        e: CallError,
    ) -> RPCError<NodeId, Node, E> {
        match e {
            CallError::Unreachable(_) => RPCError::Unreachable(Unreachable::new(&e)),
            CallError::Broken(_) => RPCError::Network(NetworkError::new(&e)),
            CallError::Timeout(timeout) => RPCError::Timeout(Timeout {
                action,
                id: 0,
                target: self.target,
                timeout,
            }),
        }
    }

    fn remote<E: std::error::Error>(&self, e: E) -> RPCError<NodeId, Node, E> {
        RPCError::RemoteError(RemoteError::new_with_node(
            self.target,
            self.node.clone(),
            e,
        ))
    }

    fn refused<E: std::error::Error>(&self, why: String) -> RPCError<NodeId, Node, E> {
        RPCError::Network(NetworkError::new(&CallError::Broken(format!(
            "{} refused the call: {why}",
            self.node.name
        ))))
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        // An append that would not fit a frame sends the prefix of entries that does, and
        // says so (openraft sends the rest next).
        let mut rpc = rpc;
        let entries = std::mem::take(&mut rpc.entries);
        let header = postcard::experimental::serialized_size(&rpc).unwrap_or(usize::MAX);
        let sizes: Vec<usize> = entries
            .iter()
            .map(|e| postcard::experimental::serialized_size(e).unwrap_or(usize::MAX))
            .collect();
        let fits = prefix_that_fits(header, &sizes, FRAME_BUDGET);
        if fits == 0 && !entries.is_empty() {
            let e = CallError::Unreachable(format!(
                "one entry of {} bytes does not fit a frame of {FRAME_BUDGET}",
                sizes[0]
            ));
            return Err(RPCError::Unreachable(Unreachable::new(&e)));
        }
        let partial = (fits < entries.len()).then(|| entries[fits - 1].log_id);
        rpc.entries = entries;
        rpc.entries.truncate(fits);
        match self.call(Call::Append(rpc), option.hard_ttl()).await {
            Ok(Answer::Append(Ok(AppendEntriesResponse::Success))) if partial.is_some() => {
                Ok(AppendEntriesResponse::PartialSuccess(partial))
            }
            Ok(Answer::Append(Ok(r))) => Ok(r),
            Ok(Answer::Append(Err(e))) => Err(self.remote(e)),
            Ok(Answer::Refused(why)) => Err(self.refused(why)),
            Ok(_) => Err(self.refused("an answer to another call".into())),
            Err(e) => Err(self.error(RPCTypes::AppendEntries, e)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>,
    > {
        match self.call(Call::Snapshot(rpc), option.hard_ttl()).await {
            Ok(Answer::Snapshot(Ok(r))) => Ok(r),
            Ok(Answer::Snapshot(Err(e))) => Err(self.remote(e)),
            Ok(Answer::Refused(why)) => Err(self.refused(why)),
            Ok(_) => Err(self.refused("an answer to another call".into())),
            Err(e) => Err(self.error(RPCTypes::InstallSnapshot, e)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        match self.call(Call::Vote(rpc), option.hard_ttl()).await {
            Ok(Answer::Vote(Ok(r))) => Ok(r),
            Ok(Answer::Vote(Err(e))) => Err(self.remote(e)),
            Ok(Answer::Refused(why)) => Err(self.refused(why)),
            Ok(_) => Err(self.refused("an answer to another call".into())),
            Err(e) => Err(self.error(RPCTypes::Vote, e)),
        }
    }
}

/// What one call may take, under the mesh's frame limit (with room for the framing).
pub const FRAME_BUDGET: usize = crate::mesh::frame::MAX_FRAME as usize - 16 * 1024;

/// How many of the entries (of these encoded sizes, after a header of `header` bytes) fit
/// in `budget` bytes, counting generously for the enum tag and the length prefix.
fn prefix_that_fits(header: usize, sizes: &[usize], budget: usize) -> usize {
    let mut used = header.saturating_add(16);
    for (n, size) in sizes.iter().enumerate() {
        used = used.saturating_add(*size);
        if used > budget {
            return n;
        }
    }
    sizes.len()
}

/// The member a call speaks for: the leader of an append or a snapshot chunk, the
/// candidate of a vote request.
fn speaks_for(call: &Call) -> Option<NodeId> {
    let vote: &Vote<NodeId> = match call {
        Call::Append(r) => &r.vote,
        Call::Vote(r) => &r.vote,
        Call::Snapshot(r) => &r.vote,
    };
    vote.leader_id().voted_for()
}

/// Why `sender`'s call is not answered, if it is not (see the module documentation).
fn refusal(raft: &Raft<TypeConfig>, sender: &str, call: &Call) -> Option<String> {
    let Some(id) = speaks_for(call) else {
        return Some(format!("`{sender}` named no leader or candidate"));
    };
    if id != node_id(sender) {
        return Some(format!(
            "`{sender}` spoke for another member (Raft id {id})"
        ));
    }
    if let Call::Snapshot(r) = call
        && r.offset.saturating_add(r.data.len() as u64) > MAX_SNAPSHOT
    {
        return Some(format!(
            "a snapshot chunk ending past {MAX_SNAPSHOT} bytes (offset {})",
            r.offset
        ));
    }
    not_a_voter(raft, sender)
}

/// Why `sender` may not call at all: this agent's log is initialized and `sender` is not
/// one of its voters.
fn not_a_voter(raft: &Raft<TypeConfig>, sender: &str) -> Option<String> {
    let membership = raft.metrics().borrow().membership_config.clone();
    let initialized = membership.nodes().next().is_some();
    let id = node_id(sender);
    (initialized && !membership.voter_ids().any(|v| v == id))
        .then(|| format!("`{sender}` is not a voter of the deployment log"))
}

/// Answers the deployment log's calls from other agents until the mesh shuts down.
pub async fn serve(raft: Raft<TypeConfig>, mut streams: Streams) {
    let serving = Arc::new(Semaphore::new(MAX_SERVING));
    while let Some(inbound) = streams.next().await {
        let InboundStream::Bi(mut send, mut recv) = inbound.stream else {
            continue;
        };
        if inbound.peer.role != Role::Agent {
            let _ = recv.stop(1u32.into());
            let _ = send.reset(1u32.into());
            continue;
        }
        let (raft, sender) = (raft.clone(), inbound.peer.name.clone());
        // Who may call is known before a byte of the call is read: an agent that is not a
        // voter is answered at once and its frame never read, so non-voters cannot take the
        // serving slots the voters' heartbeats need.
        let outsider = not_a_voter(&raft, &sender);
        let permit = serving.clone().try_acquire_owned();
        tokio::spawn(async move {
            let _share = inbound.share;
            let answered = tokio::time::timeout(CALL_DEADLINE, async {
                if let Some(why) = outsider {
                    let _ = recv.stop(1u32.into());
                    write_frame(&mut send, &Answer::Refused(why)).await?;
                    let _ = send.finish();
                    return anyhow::Ok(());
                }
                let call = read_frame::<Call>(&mut recv).await?;
                let answer = match (permit, refusal(&raft, &sender, &call)) {
                    (Err(_), _) => Answer::Refused("too many calls at once".into()),
                    (Ok(_), Some(why)) => Answer::Refused(why),
                    (Ok(_permit), None) => match call {
                        Call::Append(r) => Answer::Append(raft.append_entries(r).await),
                        Call::Vote(r) => Answer::Vote(raft.vote(r).await),
                        Call::Snapshot(r) => Answer::Snapshot(raft.install_snapshot(r).await),
                    },
                };
                write_frame(&mut send, &answer).await?;
                let _ = send.finish();
                anyhow::Ok(())
            })
            .await;
            match answered {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(peer = %sender, "a raft call failed: {e:#}"),
                Err(_) => {
                    tracing::debug!(peer = %sender, "a raft call was not answered in time");
                    let _ = send.reset(2u32.into());
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_append_too_big_for_a_frame_is_cut_to_what_fits() {
        assert_eq!(prefix_that_fits(100, &[10, 10, 10], 1_000), 3);
        assert_eq!(prefix_that_fits(100, &[400, 400, 400], 1_000), 2);
        assert_eq!(prefix_that_fits(100, &[2_000], 1_000), 0);
        assert_eq!(prefix_that_fits(100, &[], 1_000), 0);
        assert_eq!(prefix_that_fits(usize::MAX, &[1], 1_000), 0);
    }
}
