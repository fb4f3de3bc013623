//! The metrics listener: `GET /metrics` over plain HTTP/1.1 on the address the config's
//! `metrics` names, one response per connection.
//!
//! Bounded like everything else the agent serves: at most [`MAX_CONNECTIONS`] at once (more
//! are closed unanswered), a request head of at most [`MAX_HEAD`] bytes read within
//! [`READ_WITHIN`], a response written within [`WRITE_WITHIN`]; it stops when the agent
//! does. Only `GET /metrics` (a query string is ignored) answers 200; any other path is 404,
//! any other method 405.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use super::metrics::{Snapshot, metrics};
use crate::fleet::service::Fleet;
use crate::mesh::node::MeshHandle;

/// Scrapes served at once.
pub const MAX_CONNECTIONS: usize = 8;
/// The longest request head read.
pub const MAX_HEAD: usize = 8 * 1024;
/// How long a client has to send its request head.
pub const READ_WITHIN: Duration = Duration::from_secs(5);
/// How long a client has to take the response.
pub const WRITE_WITHIN: Duration = Duration::from_secs(10);

/// Where a scrape's snapshot comes from: the mesh and the deployment log, when the agent
/// has joined a mesh.
#[derive(Clone, Default)]
pub struct Sources {
    pub mesh: Option<MeshHandle>,
    pub fleet: Option<Arc<Fleet>>,
}

/// Serves scrapes on `listener` until `stopped` turns true.
pub async fn serve(listener: TcpListener, sources: Sources, mut stopped: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = tokio::select! {
            _ = async { let _ = stopped.wait_for(|s| *s).await; } => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!("metrics: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue; // dropped: closed unanswered
        };
        let sources = sources.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = answer(stream, &sources).await {
                tracing::debug!("metrics: {e}");
            }
        });
    }
}

async fn answer(mut stream: TcpStream, sources: &Sources) -> std::io::Result<()> {
    let head = tokio::time::timeout(READ_WITHIN, read_head(&mut stream))
        .await
        .map_err(|_| std::io::Error::other("no request head in time"))??;
    let (status, body, kind) = match route(&head) {
        Route::Metrics => {
            // A stalled mesh or log must not hold the scrape: without them, their values
            // are left out rather than guessed.
            let snapshot = tokio::time::timeout(READ_WITHIN, snapshot(sources))
                .await
                .unwrap_or_default();
            let text = tokio::task::spawn_blocking(move || metrics().encode(&snapshot))
                .await
                .map_err(std::io::Error::other)?;
            (
                "200 OK",
                text,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
        }
        Route::NotFound => (
            "404 Not Found",
            "only /metrics is served here\n".to_owned(),
            "text/plain",
        ),
        Route::WrongMethod => (
            "405 Method Not Allowed",
            "only GET\n".to_owned(),
            "text/plain",
        ),
    };
    respond(&mut stream, status, kind, "", body.as_bytes()).await
}

/// Writes one whole response (`headers`: extra lines, each ending `\r\n`) and closes the
/// connection, within [`WRITE_WITHIN`]. Used by every HTTP server here (`shoal ui` too).
pub(crate) async fn respond(
    stream: &mut TcpStream,
    status: &str,
    kind: &str,
    headers: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let mut response = format!(
        "HTTP/1.1 {status}\r\n{headers}Content-Type: {kind}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    response.extend_from_slice(body);
    tokio::time::timeout(WRITE_WITHIN, async {
        stream.write_all(&response).await?;
        stream.shutdown().await
    })
    .await
    .map_err(|_| std::io::Error::other("the response was not taken in time"))?
}

/// Reads up to the end of the request head (`\r\n\r\n`), at most [`MAX_HEAD`] bytes. What
/// follows the head in the same reads comes back with it.
pub(crate) async fn read_head(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::Error::other(
                "closed before the request head ended",
            ));
        }
        if head.len() + n > MAX_HEAD {
            return Err(std::io::Error::other("request head too large"));
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(head);
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    NotFound,
    WrongMethod,
}

/// What a request head asks for. Pure, for tests.
fn route(head: &[u8]) -> Route {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" {
        return Route::WrongMethod;
    }
    match target.split('?').next() {
        Some("/metrics") => Route::Metrics,
        _ => Route::NotFound,
    }
}

/// What a scrape reads from the mesh and the log.
async fn snapshot(sources: &Sources) -> Snapshot {
    let mut snapshot = Snapshot::default();
    if let Some(mesh) = &sources.mesh {
        use crate::mesh::view::MemberState;
        if let Ok(hosts) = mesh.hosts().await {
            snapshot.members = [
                MemberState::Alive,
                MemberState::Suspect,
                MemberState::Dead,
                MemberState::Left,
            ]
            .into_iter()
            .map(|s| {
                (
                    s.as_str(),
                    hosts.iter().filter(|h| h.state == s).count() as i64,
                )
            })
            .collect();
        }
        snapshot.dropped = mesh
            .drops()
            .counts()
            .iter()
            .map(|(kind, _, n)| (*kind, *n))
            .collect();
    }
    if let Some(fleet) = &sources.fleet {
        let log = fleet.metrics();
        snapshot.deployments = log.deployments;
        snapshot.raft_term = log.term;
        snapshot.leader = log.leader;
        snapshot.voter = log.voter;
    }
    snapshot
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_get_metrics_is_served() {
        assert_eq!(route(b"GET /metrics HTTP/1.1\r\n\r\n"), Route::Metrics);
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Route::Metrics);
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(
            route(b"GET /metrics/../x HTTP/1.1\r\n\r\n"),
            Route::NotFound
        );
        assert_eq!(route(b"POST /metrics HTTP/1.1\r\n\r\n"), Route::WrongMethod);
        assert_eq!(route(b"\xff\xfe\r\n\r\n"), Route::WrongMethod);
    }

    #[test]
    fn a_scrape_reads_as_prometheus_text_with_the_snapshot_in_it() {
        metrics().hook_ran("ValidateService", true, 0.02);
        let text = metrics().encode(&Snapshot {
            members: vec![("alive", 3), ("dead", 1)],
            deployments: vec![("Succeeded".into(), 2), ("Failed".into(), 0)],
            raft_term: 7,
            leader: true,
            voter: true,
            dropped: vec![("bad_streams", 5)],
        });
        let lines: Vec<String> = text.lines().map(String::from).collect();
        let parsed = prometheus_parse::Scrape::parse(lines.into_iter().map(Ok)).unwrap();
        let value = |name: &str, label: Option<(&str, &str)>| {
            parsed
                .samples
                .iter()
                .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
                .map(|s| match s.value {
                    prometheus_parse::Value::Counter(v)
                    | prometheus_parse::Value::Gauge(v)
                    | prometheus_parse::Value::Untyped(v) => v,
                    _ => f64::NAN,
                })
        };
        assert_eq!(
            value("shoal_mesh_members", Some(("state", "alive"))),
            Some(3.0)
        );
        assert_eq!(
            value("shoal_deployments", Some(("status", "Succeeded"))),
            Some(2.0)
        );
        assert_eq!(value("shoal_raft_term", None), Some(7.0));
        assert_eq!(value("shoal_raft_leader", None), Some(1.0));
        assert_eq!(
            value("shoal_mesh_dropped_total", Some(("kind", "bad_streams"))),
            Some(5.0)
        );
        assert!(
            text.contains(
                "shoal_hook_duration_seconds_count{event=\"ValidateService\",outcome=\"succeeded\"}"
            ),
            "{text}"
        );
        // A running total read again counts nothing twice.
        let again = metrics().encode(&Snapshot {
            dropped: vec![("bad_streams", 5)],
            ..Snapshot::default()
        });
        assert!(
            again.contains("shoal_mesh_dropped_total{kind=\"bad_streams\"} 5"),
            "{again}"
        );
    }
}
