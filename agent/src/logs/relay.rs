//! The agent an operator asked: finds which hosts ran the deployment (the deployment log's
//! view of it), asks each for its logs (this host reads its own), and passes every chunk
//! on to the operator as it arrives, as [`Response::Log`] frames. A host that cannot
//! answer is reported as a [`Response::LogGap`] and the others still come. With `follow`,
//! it asks again every second, from the offsets already sent, until the deployment has
//! ended, then once more.
//!
//! What a host sends is checked before it is passed on: the file names must be log names,
//! each chunk must continue its file where the last one stopped, and a host's answer is
//! bounded in files and bytes like the host's own side.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use super::{HostLogsPart, HostLogsRequest, LogChunk, MAX_ANSWER_BYTES, MAX_FILES, event_of};
use crate::api::Response;
use crate::fleet::service::Fleet;
use crate::fleet::wire::{DeploymentView, OperatorAnswer, OperatorRequest};
use crate::lifecycle::status::HostStatus;
use crate::mesh::frame::{Protocol, read_frame, write_frame};
use crate::mesh::node::{MeshHandle, STREAM_DEADLINE};

/// How long `--follow` may follow: longer than the longest rollout may bake.
pub const FOLLOW_WITHIN: Duration =
    Duration::from_secs(crate::fleet::plan::MAX_ROLLOUT_SECS + 3600);
/// How long a single pass over the hosts may take.
pub const ONCE_WITHIN: Duration = Duration::from_secs(600);
/// Between two passes while following.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);

/// What the operator asked.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct LogsQuery {
    pub deployment: String,
    pub host: Option<String>,
    pub event: Option<String>,
    pub follow: bool,
}

/// Streams the logs `query` asks for to the operator on `send`, then `End`. An `Err` is
/// what to tell the operator instead (nothing may have been sent yet, or some).
pub async fn relay(
    mesh: &MeshHandle,
    fleet: &Fleet,
    data_dir: &Path,
    query: LogsQuery,
    send: &mut quinn::SendStream,
) -> Result<(), String> {
    let within = if query.follow {
        FOLLOW_WITHIN
    } else {
        ONCE_WITHIN
    };
    tokio::time::timeout(within, passes(mesh, fleet, data_dir, &query, send))
        .await
        .map_err(|_| format!("the logs took longer than {} s", within.as_secs()))??;
    say(send, &Response::End).await
}

async fn passes(
    mesh: &MeshHandle,
    fleet: &Fleet,
    data_dir: &Path,
    query: &LogsQuery,
    send: &mut quinn::SendStream,
) -> Result<(), String> {
    let mut offsets: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    // Each host's failure is told once, not on every pass of a follow.
    let mut told: std::collections::BTreeSet<(String, String)> = Default::default();
    loop {
        let view = match fleet
            .operator(
                OperatorRequest::Status {
                    id: query.deployment.clone(),
                },
                false,
            )
            .await
        {
            OperatorAnswer::Deployment(view) => *view,
            OperatorAnswer::Refused(why) => return Err(why),
            _ => return Err("the deployment log answered something else".into()),
        };
        // Read before the pass: a deployment that ends during it gets one pass more.
        let ended = view.ended();
        for host in hosts(&view, query.host.as_deref())? {
            let from = offsets.entry(host.clone()).or_default();
            let request = HostLogsRequest {
                app: view.app.clone(),
                deployment: view.id.clone(),
                event: query.event.clone(),
                from: from.iter().map(|(f, o)| (f.clone(), *o)).collect(),
            };
            let got = if host == fleet.name {
                local(data_dir, request, &host, from, send).await
            } else {
                remote(mesh, &host, request, from, send).await
            };
            if let Err(gap) = got
                && told.insert((host.clone(), gap.clone()))
            {
                say(send, &Response::LogGap { host, reason: gap }).await?;
            }
        }
        if !query.follow || ended {
            return Ok(());
        }
        tokio::time::sleep(FOLLOW_EVERY).await;
    }
}

/// The hosts of `view` that have run (or run) their part, or the one asked for.
fn hosts(view: &DeploymentView, only: Option<&str>) -> Result<Vec<String>, String> {
    if let Some(only) = only
        && !view.hosts.iter().any(|h| h.name == only)
    {
        return Err(format!(
            "{} is not a host of deployment {}",
            crate::blobs::peer_text(only),
            view.id
        ));
    }
    Ok(view
        .hosts
        .iter()
        .filter(|h| !matches!(h.status, HostStatus::Pending | HostStatus::Skipped))
        .filter(|h| only.is_none_or(|o| o == h.name))
        .map(|h| h.name.clone())
        .collect())
}

/// This host's own logs.
async fn local(
    data_dir: &Path,
    request: HostLogsRequest,
    host: &str,
    from: &mut BTreeMap<String, u64>,
    send: &mut quinn::SendStream,
) -> Result<(), String> {
    let mut parts = super::spawn_read(data_dir.to_path_buf(), request);
    let mut check = Check::default();
    while let Some(part) = parts.recv().await {
        match part {
            HostLogsPart::Chunk(chunk) => pass_on(host, chunk, from, &mut check, send).await?,
            HostLogsPart::End => return Ok(()),
            HostLogsPart::Error(e) => return Err(e),
        }
    }
    Err("the reading stopped".into())
}

/// Another host's logs, over a [`Protocol::Logs`] stream.
async fn remote(
    mesh: &MeshHandle,
    host: &str,
    request: HostLogsRequest,
    from: &mut BTreeMap<String, u64>,
    send: &mut quinn::SendStream,
) -> Result<(), String> {
    let (mut out, mut recv) =
        tokio::time::timeout(2 * STREAM_DEADLINE, mesh.open_bi(host, Protocol::Logs))
            .await
            .map_err(|_| format!("no stream to {host} within {:?}", 2 * STREAM_DEADLINE))?
            .map_err(|e| format!("cannot reach it: {e}"))?;
    tokio::time::timeout(STREAM_DEADLINE, write_frame(&mut out, &request))
        .await
        .map_err(|_| "the request was not taken in time".to_string())?
        .map_err(|e| format!("sending the request: {e}"))?;
    let _ = out.finish();
    let mut check = Check::default();
    loop {
        let part = tokio::time::timeout(STREAM_DEADLINE, read_frame::<HostLogsPart>(&mut recv))
            .await
            .map_err(|_| format!("no answer within {STREAM_DEADLINE:?}"))?
            .map_err(|e| format!("reading its answer: {e}"))?;
        match part {
            HostLogsPart::Chunk(chunk) => pass_on(host, chunk, from, &mut check, send).await?,
            HostLogsPart::End => return Ok(()),
            HostLogsPart::Error(e) => return Err(crate::blobs::peer_text(&e)),
        }
    }
}

/// What one host sent so far in one answer.
#[derive(Default)]
struct Check {
    bytes: u64,
}

/// Checks a chunk from a host and passes it on to the operator.
async fn pass_on(
    host: &str,
    chunk: LogChunk,
    from: &mut BTreeMap<String, u64>,
    check: &mut Check,
    send: &mut quinn::SendStream,
) -> Result<(), String> {
    accept(&chunk, from, check)?;
    from.insert(chunk.file.clone(), chunk.offset + chunk.bytes.len() as u64);
    say(
        send,
        &Response::Log {
            host: host.to_string(),
            chunk,
        },
    )
    .await
}

/// Whether a host's `chunk` may be passed on: a hook log's name, continuing its file where
/// the last chunk stopped (`from`), within the bounds of one answer.
fn accept(chunk: &LogChunk, from: &BTreeMap<String, u64>, check: &mut Check) -> Result<(), String> {
    if event_of(&chunk.file) != Some(chunk.event.as_str())
        || chunk.file.contains('/')
        || chunk.file.len() > 255
    {
        return Err(format!(
            "it sent a chunk of {:?}, which is not a hook log's name",
            crate::blobs::peer_text(&chunk.file)
        ));
    }
    let at = from.get(&chunk.file).copied();
    if at.is_none() && from.len() >= MAX_FILES {
        return Err(format!("it sent more than {MAX_FILES} log files"));
    }
    if chunk.offset != at.unwrap_or(0) {
        return Err(format!(
            "it sent {} from byte {} where byte {} was next",
            crate::blobs::peer_text(&chunk.file),
            chunk.offset,
            at.unwrap_or(0)
        ));
    }
    check.bytes += chunk.bytes.len() as u64;
    if check.bytes > MAX_ANSWER_BYTES {
        return Err(format!("it sent more than {MAX_ANSWER_BYTES} bytes"));
    }
    Ok(())
}

/// Writes one frame to the operator within the stream deadline.
async fn say(send: &mut quinn::SendStream, part: &Response) -> Result<(), String> {
    match tokio::time::timeout(STREAM_DEADLINE, write_frame(send, part)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("the operator went away: {e}")),
        Err(_) => Err(format!("a frame not taken within {STREAM_DEADLINE:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(file: &str, event: &str, offset: u64, len: usize) -> LogChunk {
        LogChunk {
            file: file.into(),
            event: event.into(),
            offset,
            bytes: vec![b'x'; len],
        }
    }

    #[test]
    fn a_lying_host_is_cut_off_with_the_reason() {
        let mut from = BTreeMap::new();
        let mut check = Check::default();
        let ok = chunk("r-Install-0.log", "Install", 0, 10);
        assert!(accept(&ok, &from, &mut check).is_ok());
        from.insert(ok.file.clone(), 10);
        // A gap or an overlap in the file, a name that is not a log's, an event that does
        // not match its name.
        for (bad, why) in [
            (chunk("r-Install-0.log", "Install", 20, 1), "where byte 10"),
            (chunk("r-Install-0.log", "Install", 5, 1), "where byte 10"),
            (chunk("../../etc/passwd", "Install", 0, 1), "not a hook log"),
            (
                chunk("r-Install-0.log", "ValidateService", 10, 1),
                "not a hook log",
            ),
        ] {
            let err = accept(&bad, &from, &mut check).unwrap_err();
            assert!(err.contains(why), "{err}");
        }
        // Too many files, too many bytes.
        let many: BTreeMap<String, u64> = (0..MAX_FILES)
            .map(|i| (format!("r-Install-{i}.log"), 1))
            .collect();
        let err = accept(
            &chunk("r-Install-999.log", "Install", 0, 1),
            &many,
            &mut check,
        )
        .unwrap_err();
        assert!(err.contains("log files"), "{err}");
        let mut full = Check {
            bytes: MAX_ANSWER_BYTES,
        };
        let err = accept(
            &chunk("r-Install-0.log", "Install", 10, 1),
            &from,
            &mut full,
        )
        .unwrap_err();
        assert!(err.contains("bytes"), "{err}");
    }
}
