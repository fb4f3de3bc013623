//! Hook logs from any peer (`shoal logs ID`). A host keeps each hook's whole log (up to
//! [`HOOK_LOG_LIMIT`](crate::lifecycle::run::HOOK_LOG_LIMIT)) under
//! `apps/<app>/deployments/<id>/`, where a fleet deployment's id is its intent's. An
//! operator asks any agent; that agent ([`relay`]) asks each host of the deployment over
//! a [`Protocol::Logs`](crate::mesh::frame::Protocol::Logs) stream ([`server`]) and
//! passes the chunks on as they come, so a log of any size streams in bounded frames.
//!
//! Bounds: a request names at most [`MAX_FILES`] offsets; a host answers with at most
//! [`MAX_FILES`] files and [`MAX_ANSWER_BYTES`] bytes per request, in chunks of at most
//! [`MAX_CHUNK`] bytes, serving [`MAX_SERVING`] requests at once. Files are read through
//! directory handles that never follow a link.

pub mod relay;
pub mod server;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::beneath::{Dir, Kind};

/// The most bytes of one chunk.
pub const MAX_CHUNK: usize = 64 * 1024;
/// The most log files one host answers with for one deployment (and offsets one request
/// may name).
pub const MAX_FILES: usize = 256;
/// The most log bytes one host sends for one request: more than a deployment's hooks can
/// write (13 events, each hook's log at most 16 MiB, a few hooks each).
pub const MAX_ANSWER_BYTES: u64 = 1 << 30;
/// Log requests a host answers at once.
pub const MAX_SERVING: usize = 4;

/// What one agent asks a host: the logs of `deployment` of `app`, of one event or all,
/// from the offsets already received (files not named: from the start).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostLogsRequest {
    pub app: String,
    pub deployment: String,
    pub event: Option<String>,
    pub from: Vec<(String, u64)>,
}

/// A piece of a host's hook log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogChunk {
    /// The log file's name (`<revision>-<Event>-<n>.log`).
    pub file: String,
    /// The lifecycle event its hook ran at.
    pub event: String,
    /// Where in the file `bytes` start.
    pub offset: u64,
    pub bytes: Vec<u8>,
}

/// A host's answer: chunks, then `End` (or an `Error`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum HostLogsPart {
    Chunk(LogChunk),
    End,
    Error(String),
}

/// Why a host's logs cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum LogsError {
    #[error("application name {0:?} is not 1 to 64 letters, digits, `-`, `_` or `.`")]
    InvalidApp(String),
    #[error("deployment id {0:?} is not 1 to 64 ASCII letters, digits and `-`")]
    InvalidDeployment(String),
    #[error("a request names {0} files, more than {MAX_FILES}")]
    TooManyOffsets(usize),
    #[error("the deployment has more than {MAX_FILES} log files here")]
    TooManyFiles,
    #[error("the logs are longer than {MAX_ANSWER_BYTES} bytes: the rest is not sent")]
    TooLarge,
    #[error("reading the logs: {0}")]
    Io(#[from] std::io::Error),
    /// The one reading them went away.
    #[error("the reader went away")]
    Gone,
}

/// The event a log file's name says its hook ran at: `<revision>-<Event>-<n>.log`.
fn event_of(name: &str) -> Option<&str> {
    let stem = name.strip_suffix(".log")?;
    let (rest, n) = stem.rsplit_once('-')?;
    n.parse::<usize>().ok()?;
    let (_, event) = rest.split_once('-')?;
    Some(event)
}

/// Checks a request from the network before anything is opened.
fn check(request: &HostLogsRequest) -> Result<(), LogsError> {
    crate::blobs::valid_app(&request.app)
        .map_err(|_| LogsError::InvalidApp(crate::blobs::peer_text(&request.app)))?;
    let id = &request.deployment;
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(LogsError::InvalidDeployment(crate::blobs::peer_text(id)));
    }
    if request.from.len() > MAX_FILES {
        return Err(LogsError::TooManyOffsets(request.from.len()));
    }
    Ok(())
}

/// Reads this host's logs of `request` under `data_dir`, in the order the hooks wrote them,
/// from the offsets asked, and gives them to `emit` in chunks of at most [`MAX_CHUNK`]
/// bytes (at most [`MAX_ANSWER_BYTES`] in all). A deployment with no logs here gives
/// nothing. Blocking: call it off the async runtime.
pub fn read(
    data_dir: &Path,
    request: &HostLogsRequest,
    mut emit: impl FnMut(LogChunk) -> Result<(), LogsError>,
) -> Result<(), LogsError> {
    check(request)?;
    let from: BTreeMap<&str, u64> = request.from.iter().map(|(f, o)| (f.as_str(), *o)).collect();
    let root = Dir::open_trusted(data_dir)?;
    let rel = Path::new("apps")
        .join(&request.app)
        .join("deployments")
        .join(&request.deployment);
    let dir = match root.open_dir(&rel) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let mut files = Vec::new();
    for (name, kind) in dir.entries()? {
        let Some(name) = name.to_str().map(String::from) else {
            continue;
        };
        let Some(event) = event_of(&name).map(String::from) else {
            continue;
        };
        if kind != Kind::File || request.event.as_ref().is_some_and(|e| *e != event) {
            continue;
        }
        if files.len() == MAX_FILES {
            return Err(LogsError::TooManyFiles);
        }
        let Some((_, stat)) = dir.stat(OsStr::new(&name))? else {
            continue;
        };
        files.push((
            (stat.st_mtime, stat.st_mtime_nsec, name.clone()),
            name,
            event,
        ));
    }
    // The order they were written in: each hook's log is written when it ends.
    files.sort();
    let mut budget = MAX_ANSWER_BYTES;
    let mut buf = vec![0u8; MAX_CHUNK];
    for (_, name, event) in files {
        let mut file = dir.open_file(Path::new(&name))?;
        let mut offset = from.get(name.as_str()).copied().unwrap_or(0);
        file.seek(SeekFrom::Start(offset))?;
        loop {
            let want = buf.len().min(usize::try_from(budget).unwrap_or(usize::MAX));
            if want == 0 {
                return Err(LogsError::TooLarge);
            }
            let n = file.read(&mut buf[..want])?;
            if n == 0 {
                break;
            }
            emit(LogChunk {
                file: name.clone(),
                event: event.clone(),
                offset,
                bytes: buf[..n].to_vec(),
            })?;
            offset += n as u64;
            budget -= n as u64;
        }
    }
    Ok(())
}

/// [`read`] on a blocking thread: its chunks, then `End` or an `Error`, through a channel
/// of a few parts (the memory held is bounded whatever the logs' size). Dropping the
/// receiver stops the reading.
pub fn spawn_read(
    data_dir: std::path::PathBuf,
    request: HostLogsRequest,
) -> tokio::sync::mpsc::Receiver<HostLogsPart> {
    let (tx, rx) = tokio::sync::mpsc::channel::<HostLogsPart>(4);
    tokio::task::spawn_blocking(move || {
        let result = read(&data_dir, &request, |chunk| {
            tx.blocking_send(HostLogsPart::Chunk(chunk))
                .map_err(|_| LogsError::Gone)
        });
        let last = match result {
            Ok(()) => HostLogsPart::End,
            Err(LogsError::Gone) => return,
            Err(e) => HostLogsPart::Error(e.to_string()),
        };
        let _ = tx.blocking_send(last);
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(from: Vec<(String, u64)>, event: Option<&str>) -> HostLogsRequest {
        HostLogsRequest {
            app: "web".into(),
            deployment: "0123abcd".into(),
            event: event.map(String::from),
            from,
        }
    }

    fn all(data: &Path, req: &HostLogsRequest) -> Result<Vec<LogChunk>, LogsError> {
        let mut out = Vec::new();
        read(data, req, |c| {
            out.push(c);
            Ok(())
        })?;
        Ok(out)
    }

    #[test]
    fn logs_come_whole_in_chunks_in_the_order_written_and_resume_from_an_offset() {
        let data = tempfile::tempdir().unwrap();
        let dir = data.path().join("apps/web/deployments/0123abcd");
        std::fs::create_dir_all(&dir).unwrap();
        let big: Vec<u8> = (0..(MAX_CHUNK * 2 + 10)).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.join("aaaa-BeforeInstall-0.log"), b"before\n").unwrap();
        // Written later: comes second whatever its name.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(dir.join("0000-ValidateService-0.log"), &big).unwrap();
        std::fs::write(dir.join("notes.txt"), b"not a log").unwrap();
        let chunks = all(data.path(), &request(vec![], None)).unwrap();
        assert_eq!(chunks[0].event, "BeforeInstall");
        assert_eq!(chunks[0].bytes, b"before\n");
        let validate: Vec<u8> = chunks[1..].iter().flat_map(|c| c.bytes.clone()).collect();
        assert_eq!(validate, big);
        assert!(chunks.iter().all(|c| c.bytes.len() <= MAX_CHUNK));
        assert_eq!(chunks.len(), 4);

        // From an offset, one event only.
        let from = vec![("0000-ValidateService-0.log".to_string(), 100u64)];
        let chunks = all(data.path(), &request(from, Some("ValidateService"))).unwrap();
        assert_eq!(chunks[0].offset, 100);
        let rest: Vec<u8> = chunks.iter().flat_map(|c| c.bytes.clone()).collect();
        assert_eq!(rest, big[100..]);

        // A deployment with no logs here: nothing, no error.
        let none = HostLogsRequest {
            deployment: "ffff".into(),
            ..request(vec![], None)
        };
        assert!(all(data.path(), &none).unwrap().is_empty());
    }

    #[test]
    fn a_hostile_request_or_a_planted_link_is_refused() {
        let data = tempfile::tempdir().unwrap();
        let dir = data.path().join("apps/web/deployments/0123abcd");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(data.path().join("secret"), b"root only").unwrap();
        std::os::unix::fs::symlink(data.path().join("secret"), dir.join("x-Install-0.log"))
            .unwrap();
        // A link named like a log is not followed (not a file), and is not sent.
        assert!(all(data.path(), &request(vec![], None)).unwrap().is_empty());
        // A link in place of the deployment's directory is refused.
        std::fs::create_dir_all(data.path().join("apps/web/deployments")).unwrap();
        std::os::unix::fs::symlink("/etc", data.path().join("apps/web/deployments/etc-link"))
            .unwrap();
        let linked = HostLogsRequest {
            deployment: "etc-link".into(),
            ..request(vec![], None)
        };
        assert!(matches!(all(data.path(), &linked), Err(LogsError::Io(_))));
        for (app, deployment) in [("../etc", "0123abcd"), ("web", "../../x"), ("web", "")] {
            let bad = HostLogsRequest {
                app: app.into(),
                deployment: deployment.into(),
                ..request(vec![], None)
            };
            assert!(
                matches!(
                    all(data.path(), &bad),
                    Err(LogsError::InvalidApp(_) | LogsError::InvalidDeployment(_))
                ),
                "{app} {deployment}"
            );
        }
        let many = (0..=MAX_FILES).map(|i| (format!("f{i}"), 0)).collect();
        assert!(matches!(
            all(data.path(), &request(many, None)),
            Err(LogsError::TooManyOffsets(_))
        ));
    }

    #[test]
    fn the_event_is_read_from_the_file_name() {
        assert_eq!(
            event_of("abc123-ValidateService-0.log"),
            Some("ValidateService")
        );
        assert_eq!(event_of("abc-AfterInstall-12.log"), Some("AfterInstall"));
        assert_eq!(event_of("abc-AfterInstall.log"), None);
        assert_eq!(event_of("monitor-0.log"), None);
    }
}
