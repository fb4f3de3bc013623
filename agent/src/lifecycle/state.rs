//! What a host remembers about each application, on disk under `data_dir/apps/<app>/`:
//!
//! - `state.json`: the active (last successful) revision and the files its install wrote;
//! - `journal.json`: present only while a deployment is under way: where it came from,
//!   where it was going, and every file it may have written. Finding one on start means a
//!   deployment was interrupted, and recovery puts the host back on the `from` revision;
//! - `service.json`: the application process the agent started (see `service.rs`);
//! - `releases/<revision>/`: each revision's files, immutable once unpacked;
//! - `deployments/<id>.json` and `deployments/<id>/`: each deployment's record and hook logs;
//! - `work/`: the application's work directory, read-write for hooks.
//!
//! Every file is written whole: to a temporary file, synced, then renamed into place.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::bundle::RevisionId;

/// The layout of one application's directory.
#[derive(Clone, Debug)]
pub struct AppDir {
    pub root: PathBuf,
}

impl AppDir {
    pub fn new(data_dir: &Path, app: &str) -> Self {
        AppDir {
            root: data_dir.join("apps").join(app),
        }
    }
    pub fn state(&self) -> PathBuf {
        self.root.join("state.json")
    }
    pub fn journal(&self) -> PathBuf {
        self.root.join("journal.json")
    }
    pub fn service(&self) -> PathBuf {
        self.root.join("service.json")
    }
    /// A switched service's other process: the new revision's before the switch, the
    /// previous one's (draining, or kept warm) after it (`service::Slot`).
    pub fn standby(&self) -> PathBuf {
        self.root.join("standby.json")
    }
    /// Where `service.json` waits while the two records change places (`service::swap`).
    pub fn swapping(&self) -> PathBuf {
        self.root.join("swapping.json")
    }
    pub fn service_log(&self) -> PathBuf {
        self.root.join("service.log")
    }
    pub fn releases(&self) -> PathBuf {
        self.root.join("releases")
    }
    pub fn release(&self, id: &RevisionId) -> PathBuf {
        self.releases().join(&id.0)
    }
    /// Files of the host's own that OVERWRITE replaced, kept until no revision installs
    /// their path (see `install.rs`).
    pub fn replaced(&self) -> PathBuf {
        self.root.join("replaced")
    }
    pub fn work(&self) -> PathBuf {
        self.root.join("work")
    }
    pub fn deployments(&self) -> PathBuf {
        self.root.join("deployments")
    }
    pub fn lock(&self) -> PathBuf {
        self.root.join("lock")
    }
}

/// An application's settled state on this host.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AppState {
    /// The last revision that deployed successfully, and is installed now.
    pub active: Option<RevisionId>,
    /// The files the installs of this application wrote and that are in place now.
    pub installed: BTreeSet<PathBuf>,
    /// Revisions that deployed successfully, oldest first (for pruning releases).
    #[serde(default)]
    pub history: Vec<RevisionId>,
    /// The port the active revision's service was given.
    #[serde(default)]
    pub port: Option<u16>,
}

/// A deployment under way.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Journal {
    pub deployment_id: String,
    pub from: Option<RevisionId>,
    pub to: RevisionId,
    /// Every file the new revision's Install may write (known before it writes any).
    #[serde(default)]
    pub targets: BTreeSet<PathBuf>,
    /// Of `targets`, the host's own files that OVERWRITE replaces: ours only once kept in
    /// `replaced/` (see [`super::install::interrupted`]).
    #[serde(default)]
    pub replacing: BTreeSet<PathBuf>,
    /// The event under way, for the record.
    pub phase: String,
    /// The port the service of the revision being left ran on, to restart it with.
    #[serde(default)]
    pub port: Option<u16>,
}

/// Reads a JSON file; `None` if it does not exist.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> anyhow::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(
            serde_json::from_slice(&bytes)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::anyhow!("reading {}: {e}", path.display())),
    }
}

/// Writes a JSON file whole (see [`crate::durable`]).
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    crate::durable::write_whole(path, &serde_json::to_vec_pretty(value)?)
}

/// Removes a state file (absent is fine), then fsyncs its directory, so a removed journal
/// cannot come back after a power cut.
pub fn remove(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => path
            .parent()
            .map_or(Ok(()), |dir| std::fs::File::open(dir)?.sync_all())
            .map_err(|e| anyhow::anyhow!("syncing after removing {}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(anyhow::anyhow!("removing {}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_a_missing_file_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/state.json");
        assert_eq!(read_json::<AppState>(&path).unwrap(), None);
        let state = AppState {
            active: Some(RevisionId("ab".repeat(32))),
            installed: [PathBuf::from("/srv/x")].into(),
            history: vec![],
            port: Some(8080),
        };
        write_json(&path, &state).unwrap();
        assert_eq!(read_json::<AppState>(&path).unwrap(), Some(state));
        std::fs::write(&path, b"{ torn").unwrap();
        assert!(
            read_json::<AppState>(&path)
                .unwrap_err()
                .to_string()
                .contains("state.json")
        );
    }
}
