//! The host's side: answers [`Protocol::Logs`](crate::mesh::frame::Protocol::Logs)
//! streams from other agents (an agent relaying an operator's `shoal logs`) with this
//! host's hook logs of one deployment. Operators ask through the API, never here: a
//! stream from anything but an agent of the fleet is refused. At most [`MAX_SERVING`]
//! answers at once (more are told the host is busy); each frame must be taken within the
//! stream deadline, and the whole answer within [`ANSWER_WITHIN`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use super::{HostLogsPart, HostLogsRequest, MAX_SERVING, spawn_read};
use crate::identity::Role;
use crate::mesh::frame::{read_frame, write_frame};
use crate::mesh::node::{InboundStream, STREAM_DEADLINE, Streams};

/// How long one answer may take: 1 GiB at a slow 4 MiB/s.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(300);

/// Serves log requests until the mesh shuts down.
pub async fn serve(data_dir: PathBuf, mut streams: Streams) {
    let serving = Arc::new(Semaphore::new(MAX_SERVING));
    while let Some(inbound) = streams.next().await {
        let (mut send, mut recv) = match inbound.stream {
            InboundStream::Bi(send, recv) => (send, recv),
            InboundStream::Uni(mut recv) => {
                let _ = recv.stop(1u32.into());
                continue;
            }
        };
        let (data_dir, serving) = (data_dir.clone(), serving.clone());
        tokio::spawn(async move {
            let _share = inbound.share;
            let peer = inbound.peer;
            let request =
                tokio::time::timeout(STREAM_DEADLINE, read_frame::<HostLogsRequest>(&mut recv))
                    .await;
            let refusal = match (&request, peer.role) {
                (_, role) if role != Role::Agent => {
                    Some("refused: only agents ask for logs here; operators ask `shoal logs` of any agent".to_string())
                }
                (Ok(Ok(_)), _) => None,
                (Ok(Err(e)), _) => Some(format!("malformed request: {e}")),
                (Err(_), _) => Some("the request did not arrive whole in time".into()),
            };
            let permit = serving.try_acquire_owned();
            let refusal = refusal.or_else(|| {
                permit
                    .is_err()
                    .then(|| format!("busy: {MAX_SERVING} log requests are being answered"))
            });
            let answered = match (refusal, request) {
                (Some(why), _) => say(&mut send, &HostLogsPart::Error(why)).await,
                (None, Ok(Ok(request))) => {
                    tokio::time::timeout(ANSWER_WITHIN, answer(data_dir, request, &mut send))
                        .await
                        .unwrap_or_else(|_| Err("the answer took too long".into()))
                }
                (None, _) => unreachable!("a refusal is set for every bad request"),
            };
            match answered {
                Ok(()) => {
                    let _ = send.finish();
                }
                Err(e) => {
                    tracing::debug!(peer = %peer.name, "a log answer was cut: {e}");
                    let _ = send.reset(1u32.into());
                }
            }
        });
    }
}

/// Sends the logs as they are read.
async fn answer(
    data_dir: PathBuf,
    request: HostLogsRequest,
    send: &mut quinn::SendStream,
) -> Result<(), String> {
    let mut parts = spawn_read(data_dir, request);
    while let Some(part) = parts.recv().await {
        say(send, &part).await?;
        if !matches!(part, HostLogsPart::Chunk(_)) {
            break;
        }
    }
    Ok(())
}

/// Writes one frame within the stream deadline.
async fn say(send: &mut quinn::SendStream, part: &HostLogsPart) -> Result<(), String> {
    match tokio::time::timeout(STREAM_DEADLINE, write_frame(send, part)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("the asker went away: {e}")),
        Err(_) => Err(format!("a frame not taken within {STREAM_DEADLINE:?}")),
    }
}
