//! The operator's API: what `shoal` commands ask an agent over QUIC, and its answers. A
//! request is one frame on a bidirectional stream tagged [`Protocol::Api`]; the answer is
//! one or more frames back, ending with [`Response::End`], so an answer of any size (10,000
//! hosts) streams in frames under the limit. Only a connection whose certificate carries
//! the operator role may ask; anyone else is answered with an error saying so. The operator
//! in turn checks that what answered holds an *agent* certificate of the fleet (and the name
//! it expected, when it dialled one by name).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::identity::revocation::RevocationList;
use crate::identity::{Identity, Role};
use crate::mesh::frame::{Protocol, read_frame, write_frame, write_protocol};
use crate::mesh::node::{InboundStream, MeshHandle, STREAM_DEADLINE, Streams};
use crate::mesh::transport;
pub use crate::mesh::view::{HostView, MemberState};

/// What an operator asks.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Request {
    /// Every member of the mesh, as this agent sees it.
    Hosts,
    /// A revocation list signed by the fleet CA (DER), to enforce and spread.
    PublishRevocations(Vec<u8>),
    /// A fleet deployment request: answered by the deployment log's leader, through this
    /// agent.
    Fleet(crate::fleet::wire::OperatorRequest),
    /// A bundle of `len` bytes for `app` follows this frame on the stream, raw: this agent
    /// keeps it and serves it to the hosts that deploy it.
    Upload { app: String, len: u64 },
    /// The hook logs of a fleet deployment, from whichever hosts ran it, streamed.
    Logs(crate::logs::relay::LogsQuery),
}

/// What an agent answers: one or more parts, then `End` (or one `Error`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Response {
    /// Some of the hosts; more may follow.
    Hosts(Vec<HostView>),
    /// The revocation list now in force has this number.
    Published(u64),
    Fleet(crate::fleet::wire::OperatorAnswer),
    /// The bundle is kept here as this revision, by this agent.
    Uploaded {
        revision: String,
        holder: String,
    },
    /// A piece of `host`'s hook log; more follow.
    Log {
        host: String,
        chunk: crate::logs::LogChunk,
    },
    /// `host`'s logs could not be had, and why; the other hosts' follow.
    LogGap {
        host: String,
        reason: String,
    },
    /// The answer is complete.
    End,
    Error(String),
}

/// A whole answer, as the operator receives it.
#[derive(Clone, Debug)]
pub enum Answer {
    Hosts(Vec<HostView>),
    Published(u64),
    Fleet(crate::fleet::wire::OperatorAnswer),
    Uploaded {
        revision: String,
        holder: String,
    },
    /// Every part went to the caller's sink as it came.
    Streamed,
}

/// What the API serves besides the mesh: fleet deployments and the bundles uploaded.
#[derive(Clone)]
pub struct Services {
    pub fleet: std::sync::Arc<crate::fleet::service::Fleet>,
    pub bundles: std::sync::Arc<crate::blobs::BundleStore>,
    /// The agent's data directory: this host's own hook logs.
    pub data_dir: std::path::PathBuf,
    /// Collects the stores after an upload (an uploader that deploys nothing still keeps
    /// within its bounds).
    pub swarm: Option<crate::blobs::Swarmer>,
}

/// How long an agent has to complete the handshake.
const CONNECT_WITHIN: Duration = Duration::from_secs(5);
/// How long a whole answer may take.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);
/// The encoded size at which an answer's part is sent and a new one started.
pub const PART_BYTES: usize = 256 * 1024;
/// Requests answered at once by one agent.
const MAX_ANSWERING: usize = 16;
/// `shoal logs` streams relayed at once (they may last hours with `--follow`, so they do
/// not hold the places of other requests).
const MAX_LOG_STREAMS: usize = 4;
/// The most parts an operator accepts in one answer (1 GiB at most, in parts under the
/// frame limit).
const MAX_PARTS: usize = 1024;

/// Splits `views` into parts whose encoding stays under [`PART_BYTES`] (a part holds at
/// least one view; a single view is bounded by the host record's caps).
pub fn parts(views: Vec<HostView>) -> Vec<Vec<HostView>> {
    let mut parts = Vec::new();
    let mut part = Vec::new();
    let mut size = 0;
    for view in views {
        let len = postcard::experimental::serialized_size(&view).unwrap_or(PART_BYTES);
        if !part.is_empty() && size + len > PART_BYTES {
            parts.push(std::mem::take(&mut part));
            size = 0;
        }
        size += len;
        part.push(view);
    }
    if !part.is_empty() || parts.is_empty() {
        parts.push(part);
    }
    parts
}

/// The API service: answers each request stream, a bounded number at once, until the mesh
/// shuts down.
pub async fn serve(mesh: MeshHandle, mut streams: Streams, services: Services) {
    let answering = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_ANSWERING));
    let streaming = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_LOG_STREAMS));
    while let Some(inbound) = streams.next().await {
        let InboundStream::Bi(send, recv) = inbound.stream else {
            continue;
        };
        let Ok(permit) = answering.clone().try_acquire_owned() else {
            continue;
        };
        let mesh = mesh.clone();
        let services = services.clone();
        let streaming = streaming.clone();
        tokio::spawn(async move {
            answer(
                mesh,
                services,
                inbound.peer.name.as_ref(),
                inbound.peer.role,
                send,
                recv,
                (permit, streaming),
            )
            .await;
        });
    }
}

async fn answer(
    mesh: MeshHandle,
    services: Services,
    name: &str,
    role: Role,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    (permit, streaming): (
        tokio::sync::OwnedSemaphorePermit,
        std::sync::Arc<tokio::sync::Semaphore>,
    ),
) {
    let request = tokio::time::timeout(STREAM_DEADLINE, read_frame::<Request>(&mut recv)).await;
    // Logs stream as they come, under bounds of their own: a place among the log streams
    // instead of one among the answers, and they end when the operator goes away.
    if let Ok(Ok(Request::Logs(query))) = &request
        && role == Role::Operator
    {
        drop(permit);
        let Ok(_stream) = streaming.try_acquire_owned() else {
            let busy = Response::Error(format!(
                "busy: {MAX_LOG_STREAMS} log streams are being relayed; ask again later"
            ));
            let _ = tokio::time::timeout(STREAM_DEADLINE, write_frame(&mut send, &busy)).await;
            let _ = send.finish();
            return;
        };
        let gone = send.stopped();
        let relayed = tokio::select! {
            relayed = crate::logs::relay::relay(
                &mesh,
                &services.fleet,
                &services.data_dir,
                query.clone(),
                &mut send,
            ) => relayed,
            _ = gone => Err("the operator went away".to_string()),
        };
        if let Err(why) = relayed {
            let _ = tokio::time::timeout(
                STREAM_DEADLINE,
                write_frame(&mut send, &Response::Error(why)),
            )
            .await;
        }
        let _ = send.finish();
        return;
    }
    let _permit = permit;
    let parts = match request {
        Ok(Ok(_)) if role != Role::Operator => vec![Response::Error(format!(
            "refused: `{name}` presented an agent certificate; this request needs an operator identity (`shoal ca issue --operator`)"
        ))],
        Ok(Ok(Request::Hosts)) => match mesh.hosts().await {
            Ok(views) => parts(views)
                .into_iter()
                .map(Response::Hosts)
                .chain([Response::End])
                .collect(),
            Err(e) => vec![Response::Error(e.to_string())],
        },
        Ok(Ok(Request::PublishRevocations(der))) => match mesh.publish_revocations(der).await {
            Ok(number) => vec![Response::Published(number), Response::End],
            Err(e) => vec![Response::Error(format!("revocation list refused: {e}"))],
        },
        Ok(Ok(Request::Fleet(request))) => vec![
            Response::Fleet(services.fleet.operator(request, false).await),
            Response::End,
        ],
        Ok(Ok(Request::Logs(_))) => unreachable!("answered above"),
        Ok(Ok(Request::Upload { app, len })) => {
            match services.bundles.receive(&app, len, &mut recv, None).await {
                Ok(revision) => {
                    if let Some(swarm) = services.swarm.clone() {
                        tokio::spawn(async move {
                            if let Err(e) = swarm.collect().await {
                                tracing::warn!("collecting the stores after an upload: {e}");
                            }
                        });
                    }
                    vec![
                        Response::Uploaded {
                            revision: revision.0,
                            holder: services.fleet.name.clone(),
                        },
                        Response::End,
                    ]
                }
                Err(e) => vec![Response::Error(format!("bundle refused: {e}"))],
            }
        }
        Ok(Err(e)) => vec![Response::Error(format!("malformed request: {e}"))],
        Err(_) => vec![Response::Error(
            "the request did not arrive whole in time".into(),
        )],
    };
    let sent = tokio::time::timeout(ANSWER_WITHIN, async {
        for part in &parts {
            write_frame(&mut send, part).await?;
        }
        send.finish()?;
        anyhow::Ok(())
    })
    .await;
    if !matches!(sent, Ok(Ok(()))) {
        tracing::debug!(operator = %name, "an answer was not delivered");
    }
}

/// Asks the agent at `peer` one question as the operator `identity`. `expect` is the agent
/// name the operator meant, when it named one (a host name rather than an address). An
/// agent whose certificate `revoked` lists is refused at the handshake.
pub async fn ask(
    peer: SocketAddr,
    expect: Option<&str>,
    identity: &Path,
    revoked: Option<&RevocationList>,
    request: &Request,
) -> Result<Answer> {
    ask_with(
        peer,
        expect,
        identity,
        revoked,
        request,
        None,
        ANSWER_WITHIN,
    )
    .await
}

/// [`ask`], with a file sent raw after the request (an upload) and the time the whole
/// exchange may take.
pub async fn ask_with(
    peer: SocketAddr,
    expect: Option<&str>,
    identity: &Path,
    revoked: Option<&RevocationList>,
    request: &Request,
    body: Option<&Path>,
    within: Duration,
) -> Result<Answer> {
    ask_inner(peer, expect, identity, revoked, request, body, within, None).await
}

/// A part of a streamed answer, for the caller as it arrives.
pub type Sink<'a> = &'a mut (dyn FnMut(Response) -> Result<()> + Send);

/// [`ask`] for an answer that streams (logs): each of its parts goes to `sink` as it
/// arrives, for as long as `within` allows; an `Err` from the sink ends the exchange.
pub async fn ask_streaming(
    peer: SocketAddr,
    expect: Option<&str>,
    identity: &Path,
    request: &Request,
    within: Duration,
    sink: Sink<'_>,
) -> Result<()> {
    ask_inner(
        peer,
        expect,
        identity,
        None,
        request,
        None,
        within,
        Some(sink),
    )
    .await
    .map(|_| ())
}

#[allow(clippy::too_many_arguments)]
async fn ask_inner(
    peer: SocketAddr,
    expect: Option<&str>,
    identity: &Path,
    revoked: Option<&RevocationList>,
    request: &Request,
    body: Option<&Path>,
    within: Duration,
    sink: Option<Sink<'_>>,
) -> Result<Answer> {
    let id = Identity::load(identity)?;
    let bind: SocketAddr = if peer.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let mut endpoint = quinn::Endpoint::client(bind).context("opening a UDP socket")?;
    endpoint.set_default_client_config(transport::client_config(&id, revoked)?);
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
            })?
            .map_err(|e| {
                match e
                    .downcast_ref::<quinn::ConnectionError>()
                    .and_then(transport::refusal)
                {
                    Some(why) => anyhow!("{peer} refused this operator: its certificate {why}"),
                    None => e,
                }
            })?;
        exchange(&conn, peer, expect, request, body, sink)
            .await
            .map_err(
                |e| match conn.close_reason().as_ref().and_then(transport::refusal) {
                    Some(why) => anyhow!("{peer} refused this operator: its certificate {why}"),
                    None => e,
                },
            )
    };
    let answer = tokio::time::timeout(within, answer)
        .await
        .map_err(|_| anyhow!("{peer} did not answer within {} s", within.as_secs()))??;
    endpoint.wait_idle().await;
    Ok(answer)
}

/// One request and its answer on an established connection.
async fn exchange(
    conn: &quinn::Connection,
    peer: SocketAddr,
    expect: Option<&str>,
    request: &Request,
    body: Option<&Path>,
    mut sink: Option<Sink<'_>>,
) -> Result<Answer> {
    {
        let (name, role) = transport::peer_identity(conn)?;
        if role != Role::Agent {
            conn.close(1u32.into(), b"not an agent");
            bail!(
                "{peer} answered with `{name}`'s operator certificate, not an agent's: refusing to trust its answer"
            );
        }
        if let Some(expected) = expect
            && !names_match(expected, &name)
        {
            conn.close(1u32.into(), b"not the agent asked for");
            bail!("{peer} is the agent `{name}`, not `{expected}`: refusing to trust its answer");
        }
        let (mut send, mut recv) = conn.open_bi().await?;
        write_protocol(&mut send, Protocol::Api).await?;
        write_frame(&mut send, request).await?;
        if let Some(path) = body {
            let mut file = tokio::fs::File::open(path)
                .await
                .with_context(|| format!("opening {}", path.display()))?;
            if let Err(e) = tokio::io::copy(&mut file, &mut send).await {
                // The agent may have refused the request before reading what follows it:
                // its answer says why.
                let answer = tokio::time::timeout(STREAM_DEADLINE, read_frame(&mut recv)).await;
                if let Ok(Ok(Response::Error(why))) = answer {
                    bail!("{peer}: {why}");
                }
                return Err(e).with_context(|| format!("sending {} to {peer}", path.display()));
            }
        }
        send.finish()?;
        let mut hosts = Vec::new();
        let mut published = None;
        let mut other = None;
        let mut parts = 0;
        loop {
            let response: Response = read_frame(&mut recv)
                .await
                .with_context(|| format!("reading the answer of {peer}"))?;
            // A streamed answer is bounded by its time, not its parts.
            if matches!(response, Response::Log { .. } | Response::LogGap { .. }) {
                match sink.as_mut() {
                    Some(sink) => sink(response)?,
                    None => bail!("{peer} streamed an answer to a question that has none"),
                }
                continue;
            }
            parts += 1;
            if parts > MAX_PARTS {
                bail!("{peer} sent more than {MAX_PARTS} parts of one answer");
            }
            match response {
                Response::Log { .. } | Response::LogGap { .. } => unreachable!("streamed above"),
                Response::Hosts(part) => hosts.extend(part),
                Response::Published(number) => published = Some(number),
                Response::Fleet(answer) => other = Some(Answer::Fleet(answer)),
                Response::Uploaded { revision, holder } => {
                    other = Some(Answer::Uploaded { revision, holder })
                }
                Response::End if sink.is_some() => {
                    conn.close(0u32.into(), b"done");
                    return Ok(Answer::Streamed);
                }
                Response::End => {
                    conn.close(0u32.into(), b"done");
                    return Ok(match (other, published) {
                        (Some(answer), _) => answer,
                        (None, Some(number)) => Answer::Published(number),
                        (None, None) => Answer::Hosts(hosts),
                    });
                }
                Response::Error(e) => bail!("{peer}: {e}"),
            }
        }
    }
}

/// Whether the certificate name `actual` is the agent the operator named: the same, or
/// the first label of a host name (`edge-1` for `edge-1.internal`).
fn names_match(expected: &str, actual: &str) -> bool {
    expected == actual
        || expected
            .strip_prefix(actual)
            .is_some_and(|rest| rest.starts_with('.'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::view::MemberState;
    use std::collections::BTreeMap;

    #[test]
    fn ten_thousand_hosts_go_in_parts_under_the_frame_limit() {
        let views: Vec<HostView> = (0..10_000)
            .map(|i| HostView {
                name: format!("host-{i:05}"),
                addr: SocketAddr::from(([10, 0, (i / 256) as u8, (i % 256) as u8], 7400)),
                state: MemberState::Alive,
                tags: (0..8)
                    .map(|t| (format!("tag{t}"), "x".repeat(40)))
                    .collect(),
                apps: BTreeMap::new(),
                details: BTreeMap::new(),
                log: None,
                version: 1,
            })
            .collect();
        let parts = parts(views);
        assert!(parts.len() > 1);
        assert_eq!(parts.iter().map(Vec::len).sum::<usize>(), 10_000);
        for part in parts {
            let frame = crate::mesh::frame::encode_frame(&Response::Hosts(part)).unwrap();
            assert!(frame.len() <= PART_BYTES + 64, "{}", frame.len());
        }
    }

    #[test]
    fn an_expected_name_matches_the_certificate_or_its_first_label() {
        assert!(names_match("edge-1", "edge-1"));
        assert!(names_match("edge-1.internal", "edge-1"));
        assert!(!names_match("edge-10", "edge-1"));
        assert!(!names_match("edge-1", "edge-2"));
    }
}
