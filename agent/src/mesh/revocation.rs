//! Revocation lists in the mesh: the service for `Protocol::Revocations` streams, and the
//! list's place on disk (`data_dir/mesh/revocations.crl`).
//!
//! A list arrives from an operator (`shoal ca publish-revocations`, through the API) or from
//! a peer (one frame on a stream of this protocol). Either way it goes to the driver
//! ([`MeshHandle::publish_revocations`]), which adopts it only if the fleet CA signed it and
//! it is newer than the one in force: rustls then checks it at every handshake, live
//! connections of revoked certificates are closed, and the list is passed on to peers (all
//! of them in a small fleet, a few who pass it on in a large one) and to every member that
//! comes up, so the whole mesh enforces it within seconds and a restarted agent keeps it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::Semaphore;

use super::frame::read_frame;
use super::node::{InboundStream, MeshHandle, STREAM_DEADLINE, Streams};
use crate::identity::revocation::{MAX_LIST_BYTES, RevocationList};
use crate::identity::{Identity, Role};

/// Lists read at once from peers.
const MAX_READING: usize = 4;

/// Where the list in force is kept, beside the mesh's `self.json`.
pub fn file(state_file: &Path) -> PathBuf {
    state_file.with_file_name("revocations.crl")
}

/// The list kept on disk, if there is one the fleet CA signed.
pub fn load(state_file: &Path, identity: &Identity) -> Option<RevocationList> {
    let path = file(state_file);
    let der = match std::fs::read(&path) {
        Ok(der) => der,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(
                "reading {}: {e}; no revocation list in force",
                path.display()
            );
            return None;
        }
    };
    match RevocationList::verify(&der, &identity.ca) {
        Ok(list) => {
            tracing::info!(
                number = list.number,
                revoked = list.serials.len(),
                "revocation list in force"
            );
            Some(list)
        }
        Err(e) => {
            tracing::warn!("{}: {e}; no revocation list in force", path.display());
            None
        }
    }
}

/// Writes the list in force, whole, off the event loop. Writes take turns, and one never
/// replaces a newer list with an older one, so the newest adopted is what a restart finds.
pub fn store(path: &Path, list: &RevocationList) {
    static WRITTEN: std::sync::Mutex<u64> = std::sync::Mutex::new(0);
    let (path, der, number) = (path.to_path_buf(), list.der.clone(), list.number);
    tokio::task::spawn_blocking(move || {
        let mut written = WRITTEN.lock().unwrap_or_else(|e| e.into_inner());
        if number <= *written {
            return;
        }
        match crate::durable::write_whole(&path, &der) {
            Ok(()) => *written = number,
            Err(e) => tracing::warn!("keeping the revocation list in {}: {e:#}", path.display()),
        }
    });
}

/// The service: reads lists that agents pass on and hands them to the mesh.
pub async fn serve(mesh: MeshHandle, mut streams: Streams) {
    let reading = Arc::new(Semaphore::new(MAX_READING));
    while let Some(inbound) = streams.next().await {
        let (InboundStream::Uni(mut recv), Role::Agent) = (inbound.stream, inbound.peer.role)
        else {
            continue;
        };
        let Ok(permit) = reading.clone().try_acquire_owned() else {
            let _ = recv.stop(1u32.into());
            continue;
        };
        let mesh = mesh.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(STREAM_DEADLINE, read_frame::<Vec<u8>>(&mut recv)).await {
                Ok(Ok(der)) if der.len() <= MAX_LIST_BYTES => mesh.offer_revocations(der),
                _ => {
                    tracing::debug!(peer = %inbound.peer.name, "dropped a revocation stream");
                    let _ = recv.stop(1u32.into());
                }
            }
        });
    }
}
