use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

use super::*;
use crate::bundle::{self, RevisionId};

/// A small bundle (a `.tar.zst`) whose data file holds `content`: its bytes and id.
fn bundle_bytes(dir: &Path, content: &str) -> (Vec<u8>, RevisionId) {
    let src = dir.join(format!("src-{content}"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("appspec.yml"), "version: 0.0\nos: linux\n").unwrap();
    std::fs::write(src.join("data.txt"), content).unwrap();
    let out = dir.join(format!("{content}.tar.zst"));
    let id = bundle::create(&src, &out).unwrap();
    (std::fs::read(&out).unwrap(), id)
}

/// What is left in the store's scratch directory.
fn scratch_left(data: &Path) -> Vec<String> {
    std::fs::read_dir(data.join("bundles/.tmp"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A reader that records whether it was ever read.
struct Untouched(Arc<AtomicBool>);

impl AsyncRead for Untouched {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.0.store(true, Ordering::SeqCst);
        Poll::Ready(Ok(()))
    }
}

#[test]
fn names_and_ids_are_checked() {
    for good in ["web", "feature-api", "a.b_c-1", "X9"] {
        assert!(valid_app(good).is_ok(), "{good}");
    }
    let long = "a".repeat(crate::mesh::hoststate::MAX_APP_NAME + 1);
    for bad in [
        "", ".", "..", ".hidden", "a/b", "../x", "a b", "é", "a\0b", ".tmp", &long,
    ] {
        assert!(
            matches!(valid_app(bad), Err(BlobError::InvalidApp(_))),
            "{bad:?}"
        );
    }
    assert!(valid_revision(&"0123456789abcdef".repeat(4)).is_ok());
    for bad in [
        String::new(),
        "ab".repeat(31),
        "ab".repeat(33),
        "AB".repeat(32),
        "g".repeat(64),
        format!("{}/", "a".repeat(63)),
        format!("../{}", "a".repeat(61)),
    ] {
        assert!(
            matches!(valid_revision(&bad), Err(BlobError::InvalidRevision(_))),
            "{bad:?}"
        );
    }
}

#[test]
fn deadlines_scale_with_size_and_peer_text_is_cut() {
    assert_eq!(transfer_deadline(0), BASE_DEADLINE);
    assert_eq!(
        transfer_deadline(100 * MIN_RATE),
        BASE_DEADLINE + std::time::Duration::from_secs(100)
    );
    assert!(transfer_deadline(MAX_BUNDLE) < std::time::Duration::from_secs(5 * 3600));
    let text = peer_text(&format!("a\u{1b}[31m{}", "x".repeat(1000)));
    assert!(text.len() < MAX_PEER_TEXT + 8, "{}", text.len());
    assert!(!text.contains('\u{1b}'));
}

#[tokio::test]
async fn an_oversized_bundle_is_refused_before_a_byte_is_read() {
    let tmp = tempfile::tempdir().unwrap();
    let store = BundleStore::new(tmp.path());
    let touched = Arc::new(AtomicBool::new(false));
    let mut reader = Untouched(touched.clone());
    let err = store
        .receive("web", MAX_BUNDLE + 1, &mut reader, None)
        .await
        .unwrap_err();
    assert!(matches!(err, BlobError::TooLarge { .. }), "{err}");
    assert!(!touched.load(Ordering::SeqCst), "the stream was read");
    // Invalid names are refused before reading, too.
    let err = store
        .receive("../etc", 10, &mut reader, None)
        .await
        .unwrap_err();
    assert!(matches!(err, BlobError::InvalidApp(_)), "{err}");
    let err = store
        .receive("web", 10, &mut reader, Some("not-an-id"))
        .await
        .unwrap_err();
    assert!(matches!(err, BlobError::InvalidRevision(_)), "{err}");
    assert!(!touched.load(Ordering::SeqCst), "the stream was read");
    assert!(store.apps().is_empty());
}

#[tokio::test]
async fn a_bundle_is_received_checked_and_listed() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let store = BundleStore::new(&data);
    let (bytes, id) = bundle_bytes(tmp.path(), "one");
    let got = store
        .receive("web", bytes.len() as u64, &mut &bytes[..], Some(&id.0))
        .await
        .unwrap();
    assert_eq!(got, id);
    let path = store.path("web", &id.0).expect("stored");
    assert_eq!(path, data.join(format!("bundles/web/{id}.bundle")));
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    assert_eq!(store.held("web"), [id.0.clone()].into());
    assert!(store.held("other").is_empty());
    assert_eq!(store.apps(), vec!["web".to_string()]);
    for dir in ["bundles", "bundles/web", "bundles/.tmp"] {
        let mode = std::fs::metadata(data.join(dir))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700, "{dir}");
    }
    assert!(scratch_left(&data).is_empty(), "{:?}", scratch_left(&data));

    // Without an expected id, the id is learnt from the content. Extra bytes beyond `len`
    // are not read.
    let (bytes2, id2) = bundle_bytes(tmp.path(), "two");
    let mut longer = bytes2.clone();
    longer.extend_from_slice(b"trailing");
    let got = store
        .receive("web", bytes2.len() as u64, &mut &longer[..], None)
        .await
        .unwrap();
    assert_eq!(got, id2);
    assert_eq!(store.held("web"), [id.0.clone(), id2.0.clone()].into());
    assert_eq!(store.path("web", &"0".repeat(64)), None);
    assert_eq!(store.path("../web", &id.0), None);
}

#[tokio::test]
async fn a_wrong_revision_short_bytes_or_garbage_leave_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let store = BundleStore::new(&data);
    let (bytes, id) = bundle_bytes(tmp.path(), "one");
    let (_, other) = bundle_bytes(tmp.path(), "other");

    let err = store
        .receive("web", bytes.len() as u64, &mut &bytes[..], Some(&other.0))
        .await
        .unwrap_err();
    match &err {
        BlobError::WrongRevision { expected, got } => {
            assert_eq!((expected, got), (&other.0, &id.0));
            let text = err.to_string();
            assert!(text.contains(&other.0) && text.contains(&id.0), "{text}");
        }
        e => panic!("{e}"),
    }
    assert!(!err.is_local());

    let err = store
        .receive("web", bytes.len() as u64 + 10, &mut &bytes[..], None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, BlobError::Truncated { got, .. } if got == bytes.len() as u64),
        "{err}"
    );

    let garbage = vec![7u8; 4096];
    let err = store
        .receive("web", garbage.len() as u64, &mut &garbage[..], None)
        .await
        .unwrap_err();
    assert!(matches!(err, BlobError::NotABundle(_)), "{err}");

    assert!(store.held("web").is_empty());
    assert_eq!(store.path("web", &id.0), None);
    assert!(scratch_left(&data).is_empty(), "{:?}", scratch_left(&data));
}

#[tokio::test]
async fn links_in_the_store_are_not_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir_all(data.join("bundles")).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    let store = BundleStore::new(&data);
    let (bytes, id) = bundle_bytes(tmp.path(), "one");

    // An application directory that is a link: nothing is written through it.
    std::os::unix::fs::symlink(&elsewhere, data.join("bundles/web")).unwrap();
    let err = store
        .receive("web", bytes.len() as u64, &mut &bytes[..], None)
        .await
        .unwrap_err();
    assert!(matches!(err, BlobError::Unsafe { .. }), "{err}");
    assert!(err.is_local());
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    std::fs::write(elsewhere.join(format!("{id}.bundle")), &bytes).unwrap();
    assert!(store.held("web").is_empty());
    assert_eq!(store.path("web", &id.0), None);
    assert!(store.apps().is_empty());

    // A stored bundle that is a link is neither listed nor served.
    std::fs::create_dir(data.join("bundles/api")).unwrap();
    std::os::unix::fs::symlink(
        elsewhere.join(format!("{id}.bundle")),
        data.join(format!("bundles/api/{id}.bundle")),
    )
    .unwrap();
    assert!(store.held("api").is_empty());
    assert_eq!(store.path("api", &id.0), None);
}

#[test]
fn a_release_is_packed_into_the_store_only_as_its_own_revision() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let store = BundleStore::new(&data);
    let (bytes, id) = bundle_bytes(tmp.path(), "one");
    let archive = tmp.path().join("one.bundle");
    std::fs::write(&archive, &bytes).unwrap();
    let release = tmp.path().join("release");
    bundle::open(&archive, &release, &bundle::Limits::default()).unwrap();

    let (_, other) = bundle_bytes(tmp.path(), "other");
    let err = store.pack_release("web", &other.0, &release).unwrap_err();
    assert!(matches!(err, BlobError::WrongRevision { .. }), "{err}");
    assert!(store.held("web").is_empty());

    let path = store.pack_release("web", &id.0, &release).unwrap();
    assert_eq!(store.path("web", &id.0), Some(path.clone()));
    // What was packed unpacks to the same revision.
    let check = tmp.path().join("check");
    let opened = bundle::open(&path, &check, &bundle::Limits::default()).unwrap();
    assert_eq!(opened.id, id);
    assert!(scratch_left(&data).is_empty(), "{:?}", scratch_left(&data));
}

#[test]
fn leftovers_of_an_earlier_life_are_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let store = BundleStore::new(tmp.path());
    store.remove_leftovers().unwrap();
    std::fs::create_dir_all(tmp.path().join("bundles/.tmp/staging-x/revision")).unwrap();
    std::fs::write(tmp.path().join("bundles/.tmp/incoming-y.part"), b"half").unwrap();
    store.remove_leftovers().unwrap();
    assert!(!tmp.path().join("bundles/.tmp").exists());
}
