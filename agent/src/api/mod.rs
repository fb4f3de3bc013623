//! The operator's API: what `shoal` commands ask an agent over QUIC, and its answers. A
//! request is one frame on a bidirectional stream and the answer one frame back. Only a
//! connection whose certificate carries the operator role may ask; an agent's answer to
//! anyone else is an error saying so.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use serde::{Deserialize, Serialize};

use crate::identity::Identity;
use crate::mesh::frame::{read_frame, write_frame};
use crate::mesh::transport;
pub use crate::mesh::view::{HostView, MemberState};

/// What an operator asks.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Request {
    /// Every member of the mesh, as this agent sees it.
    Hosts,
}

/// What an agent answers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Response {
    Hosts(Vec<HostView>),
    Error(String),
}

/// How long an agent has to complete the handshake.
const CONNECT_WITHIN: Duration = Duration::from_secs(5);

/// Asks the agent at `peer` one question as the operator `identity`.
pub async fn ask(peer: SocketAddr, identity: &Path, request: &Request) -> Result<Response> {
    let id = Identity::load(identity)?;
    let bind: SocketAddr = if peer.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let mut endpoint = quinn::Endpoint::client(bind).context("opening a UDP socket")?;
    endpoint.set_default_client_config(transport::client_config(&id)?);
    let answer = async {
        let conn = tokio::time::timeout(CONNECT_WITHIN, transport::connect(&endpoint, peer))
            .await
            .map_err(|_| {
                anyhow!(
                    "no agent answered at {peer} within {} s: is `shoal agent` running there, \
                     listening on that address, with UDP port {} reachable?",
                    CONNECT_WITHIN.as_secs(),
                    peer.port()
                )
            })??;
        let (mut send, mut recv) = conn.open_bi().await?;
        write_frame(&mut send, request).await?;
        send.finish()?;
        let response: Response = read_frame(&mut recv)
            .await
            .with_context(|| format!("reading the answer of {peer}"))?;
        conn.close(0u32.into(), b"done");
        anyhow::Ok(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .map_err(|_| anyhow!("{peer} did not answer within 10 s"))??;
    endpoint.wait_idle().await;
    Ok(response)
}
