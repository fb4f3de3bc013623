//! Bundle transfer between agents over real QUIC meshes, in one process: agents on
//! 127.77.1.x (ports 7611-7613 and 7621-7623; mutual TLS, the pool, the router), each
//! with a bundle store and the `blobs` protocol served on its mesh.
//!
//! - A fetcher gets a revision from a holder that has the uploaded bundle and from one that
//!   has only the release directory (packed on demand, then kept); the bundle arrives
//!   checked, and repeated fetches spread over both holders (counted by the bytes each
//!   holder sent).
//! - A holder whose stored file is another revision's bytes is passed over: the fetcher
//!   keeps nothing from it and gets the bundle from the good holder.
//! - An operator's certificate is refused with an error answer.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_agent::blobs::{self, BlobAnswer, BlobRequest, BundleStore, FetchErrorKind};
use shoal_agent::bundle::{self, Limits, RevisionId};
use shoal_agent::identity::{self, Identity, Role};
use shoal_agent::lifecycle::state::AppDir;
use shoal_agent::mesh::frame::{Protocol, read_frame, write_frame, write_protocol};
use shoal_agent::mesh::local::apps_on_disk;
use shoal_agent::mesh::node::{LocalState, Mesh, MeshHandle, NodeConfig};
use shoal_agent::mesh::transport;
use tokio::sync::watch;

const LONG: Duration = Duration::from_secs(60);
const APP: &str = "model";

struct Agent {
    name: String,
    mesh: MeshHandle,
    store: Arc<BundleStore>,
    data: PathBuf,
    stop: watch::Sender<bool>,
    _local: watch::Sender<LocalState>,
}

async fn start(dir: &Path, ca_dir: &Path, name: &str, addr: SocketAddr, seed: SocketAddr) -> Agent {
    let id_dir = dir.join(format!("{name}-identity"));
    identity::issue(ca_dir, name, Role::Agent, &id_dir).unwrap();
    let data = dir.join(name);
    let config = NodeConfig {
        name: name.to_string(),
        listen: addr,
        advertise: addr,
        identity: Identity::load(&id_dir).unwrap(),
        seeds: vec![seed],
        data_dir: data.clone(),
        forget_dead_after: Duration::from_secs(86_400),
    };
    let (local, local_rx) = watch::channel(LocalState::default());
    let mesh = Mesh::bind(config, LocalState::default()).unwrap();
    let handle = mesh.handle();
    let store = Arc::new(BundleStore::new(&data));
    tokio::spawn(blobs::serve(
        blobs::Serving::new(store.clone(), &data).unwrap(),
        handle.serve(Protocol::Blobs),
    ));
    let (stop, mut stopped) = watch::channel(false);
    tokio::spawn(async move {
        let _ = mesh
            .run(local_rx, async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await;
    });
    Agent {
        name: name.to_string(),
        mesh: handle,
        store,
        data,
        stop,
        _local: local,
    }
}

/// Waits until every agent sees every other one alive.
async fn converged(agents: &[&Agent]) {
    let start = Instant::now();
    loop {
        let missing: Vec<(String, String)> = agents
            .iter()
            .flat_map(|a| {
                let seen = a.mesh.members().borrow().clone();
                agents
                    .iter()
                    .filter(|b| b.name != a.name && !seen.iter().any(|m| m.name == b.name))
                    .map(|b| (a.name.clone(), b.name.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < LONG,
            "not converged: (who, misses): {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A bundle packed from a directory holding `appspec.yml` and `size` pseudo-random bytes
/// (incompressible, so the transfer is about that big); its file and revision id.
fn make_bundle(dir: &Path, label: &str, size: usize) -> (PathBuf, RevisionId) {
    let src = dir.join(format!("src-{label}"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("appspec.yml"), "version: 0.0\nos: linux\n").unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ label.len() as u64;
    for b in label.bytes() {
        x = x.rotate_left(7) ^ u64::from(b);
    }
    let weights: Vec<u8> = (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(src.join("weights.bin"), weights).unwrap();
    std::fs::write(src.join("label.txt"), label).unwrap();
    let out = dir.join(format!("{label}.tar.zst"));
    let id = bundle::create(&src, &out).unwrap();
    (out, id)
}

/// Stores the bundle at `path` in `agent`'s store, as an operator's upload would.
async fn upload(agent: &Agent, path: &Path) -> RevisionId {
    let len = std::fs::metadata(path).unwrap().len();
    let mut file = tokio::fs::File::open(path).await.unwrap();
    agent
        .store
        .receive(APP, len, &mut file, None)
        .await
        .unwrap()
}

fn scratch_left(agent: &Agent) -> usize {
    std::fs::read_dir(agent.data.join("bundles/.tmp"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bundles_come_from_uploads_and_releases_checked_and_spread_over_holders() {
    let tmp = tempfile::tempdir().unwrap();
    let ca_dir = tmp.path().join("ca");
    identity::init_ca(&ca_dir).unwrap();
    let addr = |i: u8| SocketAddr::from(([127, 77, 1, i], 7610 + u16::from(i)));
    let uploaded = start(tmp.path(), &ca_dir, "holder-uploaded", addr(1), addr(1)).await;
    let released = start(tmp.path(), &ca_dir, "holder-released", addr(2), addr(1)).await;
    let fetcher = start(tmp.path(), &ca_dir, "fetcher", addr(3), addr(1)).await;

    // 3 MiB: more than a stream's flow-control window, so the bytes take several rounds.
    let (bundle_file, id) = make_bundle(tmp.path(), "v1", 3 << 20);
    assert_eq!(upload(&uploaded, &bundle_file).await, id);
    let release = AppDir::new(&released.data, APP).release(&id);
    std::fs::create_dir_all(release.parent().unwrap()).unwrap();
    bundle::open(&bundle_file, &release, &Limits::default()).unwrap();

    // Both say they hold it; the one with only an upload reports no revision deployed.
    let up = apps_on_disk(&uploaded.data);
    assert_eq!(up[APP].revision, None);
    assert!(up[APP].held.contains(&id.0), "{up:?}");
    assert!(apps_on_disk(&released.data)[APP].held.contains(&id.0));
    assert!(released.store.path(APP, &id.0).is_none());

    converged(&[&uploaded, &released, &fetcher]).await;
    let holders = vec![uploaded.name.clone(), released.name.clone()];

    let first = blobs::fetch(&fetcher.mesh, &fetcher.store, &holders, APP, &id.0)
        .await
        .unwrap();
    assert!(holders.contains(&first.from), "{first:?}");
    assert!(first.bytes > 3 << 20, "{first:?}");
    assert_eq!(first.path, fetcher.store.path(APP, &id.0).unwrap());
    let check = tmp.path().join("check");
    assert_eq!(
        bundle::open(&first.path, &check, &Limits::default())
            .unwrap()
            .id,
        id
    );
    // Already stored: no transfer.
    let again = blobs::fetch(&fetcher.mesh, &fetcher.store, &holders, APP, &id.0)
        .await
        .unwrap();
    assert_eq!((again.from.as_str(), again.bytes), ("", 0));
    assert_eq!(again.path, first.path);

    // Fetched over and over (the copy removed each time), the fetches spread over both.
    let mut received = first.bytes;
    let mut rounds = 1;
    while (uploaded.store.served_bytes() == 0 || released.store.served_bytes() == 0) && rounds < 40
    {
        std::fs::remove_file(fetcher.store.path(APP, &id.0).unwrap()).unwrap();
        let got = blobs::fetch(&fetcher.mesh, &fetcher.store, &holders, APP, &id.0)
            .await
            .unwrap();
        assert!(holders.contains(&got.from), "{got:?}");
        received += got.bytes;
        rounds += 1;
    }
    let (a, b) = (uploaded.store.served_bytes(), released.store.served_bytes());
    assert!(
        a > 0 && b > 0,
        "after {rounds} fetches one holder served everything: {a} and {b} bytes"
    );
    assert_eq!(a + b, received, "bytes sent and bytes received differ");
    // The release was packed once and kept: it is now a stored bundle there.
    assert!(released.store.path(APP, &id.0).is_some());
    for agent in [&uploaded, &released, &fetcher] {
        assert_eq!(scratch_left(agent), 0, "{}", agent.name);
    }

    // A revision nobody holds: every holder says so.
    let absent = "0".repeat(64);
    let err = blobs::fetch(&fetcher.mesh, &fetcher.store, &holders, APP, &absent)
        .await
        .unwrap_err();
    match &err.kind {
        FetchErrorKind::AllFailed { attempts, retry } => {
            assert!(*retry, "a holder may get it later: {err}");
            assert_eq!(attempts.len(), 2, "{err}");
            assert!(
                attempts
                    .iter()
                    .all(|(_, why)| why.contains("does not hold")),
                "{err}"
            );
        }
        other => panic!("{other}"),
    }
    let err = blobs::fetch(&fetcher.mesh, &fetcher.store, &[], APP, &absent)
        .await
        .unwrap_err();
    assert!(matches!(err.kind, FetchErrorKind::NoHolders), "{err}");
    let err = blobs::fetch(&fetcher.mesh, &fetcher.store, &holders, "../x", &absent)
        .await
        .unwrap_err();
    assert!(matches!(err.kind, FetchErrorKind::Invalid(_)), "{err}");

    for agent in [&uploaded, &released, &fetcher] {
        let _ = agent.stop.send(true);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_holder_with_the_wrong_bytes_is_passed_over_and_operators_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ca_dir = tmp.path().join("ca");
    identity::init_ca(&ca_dir).unwrap();
    let addr = |i: u8| SocketAddr::from(([127, 77, 1, i], 7620 + u16::from(i)));
    let good = start(tmp.path(), &ca_dir, "holder-good", addr(1), addr(1)).await;
    let bad = start(tmp.path(), &ca_dir, "holder-bad", addr(2), addr(1)).await;
    let fetcher = start(tmp.path(), &ca_dir, "fetcher", addr(3), addr(1)).await;

    let (wanted_file, wanted) = make_bundle(tmp.path(), "wanted", 256 << 10);
    let (other_file, other) = make_bundle(tmp.path(), "other", 256 << 10);
    assert_eq!(upload(&good, &wanted_file).await, wanted);
    // The bad holder's file for `wanted` holds `other`'s bytes.
    assert_eq!(upload(&bad, &other_file).await, other);
    let stored_other = bad.store.path(APP, &other.0).unwrap();
    std::fs::rename(
        &stored_other,
        stored_other.with_file_name(format!("{wanted}.bundle")),
    )
    .unwrap();
    assert!(bad.store.held(APP).contains(&wanted.0));

    converged(&[&good, &bad, &fetcher]).await;

    // From the bad holder alone: refused, and nothing kept.
    let err = blobs::fetch(
        &fetcher.mesh,
        &fetcher.store,
        std::slice::from_ref(&bad.name),
        APP,
        &wanted.0,
    )
    .await
    .unwrap_err();
    match &err.kind {
        FetchErrorKind::AllFailed { attempts, retry } => {
            assert!(!*retry, "wrong bytes are not worth asking for again: {err}");
            assert_eq!(attempts.len(), 1, "{err}");
            assert_eq!(attempts[0].0, bad.name);
            assert!(
                attempts[0].1.contains(&other.0) && attempts[0].1.contains(&wanted.0),
                "{err}"
            );
        }
        other => panic!("{other}"),
    }
    assert!(fetcher.store.held(APP).is_empty());
    assert_eq!(scratch_left(&fetcher), 0);
    let after_refusal = bad.store.served_bytes();
    assert!(after_refusal > 0);

    // From both: every fetch ends with the good holder's bundle, including those that
    // asked the bad one first.
    let holders = vec![bad.name.clone(), good.name.clone()];
    let mut rounds = 0;
    while bad.store.served_bytes() == after_refusal && rounds < 40 {
        let got = blobs::fetch(&fetcher.mesh, &fetcher.store, &holders, APP, &wanted.0)
            .await
            .unwrap();
        assert_eq!(got.from, good.name);
        assert_eq!(fetcher.store.held(APP), [wanted.0.clone()].into());
        std::fs::remove_file(&got.path).unwrap();
        rounds += 1;
    }
    assert!(
        bad.store.served_bytes() > after_refusal,
        "the bad holder was never asked first in {rounds} fetches"
    );
    assert_eq!(scratch_left(&fetcher), 0);

    // An operator asking for a bundle gets an error answer, not bytes.
    let op_dir = tmp.path().join("operator-identity");
    identity::issue(&ca_dir, "ops", Role::Operator, &op_dir).unwrap();
    let op = Identity::load(&op_dir).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.77.1.30:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(transport::client_config(&op, None).unwrap());
    let conn = transport::connect(&endpoint, addr(1)).await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    write_protocol(&mut send, Protocol::Blobs).await.unwrap();
    let request = BlobRequest::Fetch {
        app: APP.into(),
        revision: wanted.0.clone(),
    };
    // The holder may refuse before reading: the write may find the stream stopped.
    let _ = write_frame(&mut send, &request).await;
    let _ = send.finish();
    match tokio::time::timeout(LONG, read_frame::<BlobAnswer>(&mut recv))
        .await
        .unwrap()
        .unwrap()
    {
        BlobAnswer::Error(why) => assert!(why.contains("not an agent"), "{why}"),
        other => panic!("an operator was answered {other:?}"),
    }
    conn.close(0u32.into(), b"done");

    for agent in [&good, &bad, &fetcher] {
        let _ = agent.stop.send(true);
    }
}
