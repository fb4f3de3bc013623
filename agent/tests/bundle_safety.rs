//! Bundles: the revision id is the same packed or not, in every format; hostile bundles are
//! refused with an error naming the entry, and nothing is written outside staging.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use shoal_agent::bundle::{self, BundleError, Limits};

const APPSPEC: &str = "version: 0.0\nos: linux\nfiles:\n  - source: /\n    destination: /srv/app\nhooks:\n  ValidateService:\n    - location: hooks/check.wasm\n";

fn sample_revision(dir: &Path) {
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::create_dir_all(dir.join("model")).unwrap();
    std::fs::create_dir_all(dir.join("empty")).unwrap();
    std::fs::write(dir.join("appspec.yml"), APPSPEC).unwrap();
    std::fs::write(dir.join("model/weights.json"), b"[1, 2, 3]").unwrap();
    std::fs::write(dir.join("bin/serve"), b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(
        dir.join("bin/serve"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink("model/weights.json", dir.join("current-model")).unwrap();
}

/// A scratch area whose only child after `open` may be `staging`.
struct Area {
    _tmp: tempfile::TempDir,
    parent: PathBuf,
}

impl Area {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let parent = tmp.path().join("area");
        std::fs::create_dir(&parent).unwrap();
        Area { _tmp: tmp, parent }
    }

    fn staging(&self) -> PathBuf {
        self.parent.join("staging")
    }

    fn open(&self, bundle: &Path, limits: &Limits) -> Result<bundle::Bundle, BundleError> {
        bundle::open(bundle, &self.staging(), limits)
    }

    /// Nothing but `staging` was created next to it, nor anywhere above.
    fn assert_contained(&self) {
        let names: Vec<String> = std::fs::read_dir(&self.parent)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into())
            .collect();
        assert!(
            names.iter().all(|n| n == "staging"),
            "written outside staging: {names:?}"
        );
        let above: Vec<String> = std::fs::read_dir(self.parent.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into())
            .collect();
        assert_eq!(above, ["area"], "written above the area");
    }
}

#[test]
fn the_revision_id_is_the_same_packed_or_not_in_every_format() {
    let src = tempfile::tempdir().unwrap();
    sample_revision(src.path());
    let from_dir = Area::new().open(src.path(), &Limits::default()).unwrap();
    assert_eq!(from_dir.id, bundle::tree_id(src.path()).unwrap());
    assert_eq!(from_dir.id.0.len(), 64);

    let out = tempfile::tempdir().unwrap();
    for name in ["r.tar", "r.tar.gz", "r.tgz", "r.tar.zst", "r.zip"] {
        let archive = out.path().join(name);
        let id = bundle::create(src.path(), &archive).unwrap();
        assert_eq!(id, from_dir.id, "{name}: create's id");
        let area = Area::new();
        let opened = area.open(&archive, &Limits::default()).unwrap();
        assert_eq!(opened.id, from_dir.id, "{name}: unpacked id");
        assert_eq!(
            std::fs::read(opened.root.join("model/weights.json")).unwrap(),
            b"[1, 2, 3]"
        );
        let mode = std::fs::metadata(opened.root.join("bin/serve"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755, "{name}: executable bit kept");
        assert_eq!(
            std::fs::read_link(opened.root.join("current-model")).unwrap(),
            Path::new("model/weights.json")
        );
        assert!(
            opened.root.join("empty").is_dir(),
            "{name}: empty directory kept"
        );
        assert_eq!(opened.appspec.hooks.len(), 1);
    }
    // Packing is deterministic.
    bundle::create(src.path(), &out.path().join("again.tar.gz")).unwrap();
    assert_eq!(
        std::fs::read(out.path().join("r.tar.gz")).unwrap(),
        std::fs::read(out.path().join("again.tar.gz")).unwrap()
    );

    // A change of content, or of the executable bit, changes the id.
    std::fs::write(src.path().join("model/weights.json"), b"[1, 2, 4]").unwrap();
    let changed = bundle::tree_id(src.path()).unwrap();
    assert_ne!(changed, from_dir.id);
    std::fs::set_permissions(
        src.path().join("bin/serve"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    assert_ne!(bundle::tree_id(src.path()).unwrap(), changed);
}

#[test]
fn appspec_inside_a_single_top_level_directory_is_found() {
    let src = tempfile::tempdir().unwrap();
    sample_revision(&src.path().join("app-1.2"));
    let expected = bundle::tree_id(&src.path().join("app-1.2")).unwrap();
    let opened = Area::new().open(src.path(), &Limits::default()).unwrap();
    assert!(opened.root.ends_with("app-1.2"));
    assert_eq!(opened.id, expected);
}

/// A tar written header by header, so that hostile names and types survive.
struct RawTar(tar::Builder<Vec<u8>>);

impl RawTar {
    fn new() -> Self {
        let mut t = RawTar(tar::Builder::new(Vec::new()));
        t.file("appspec.yml", APPSPEC.as_bytes());
        t
    }

    fn entry(
        &mut self,
        name: &str,
        kind: tar::EntryType,
        link: Option<&str>,
        data: &[u8],
    ) -> &mut Self {
        let mut h = tar::Header::new_old();
        let raw = h.as_old_mut();
        raw.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(link) = link {
            raw.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }

    fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        self.entry(name, tar::EntryType::Regular, None, data)
    }

    fn write(&mut self, dir: &Path) -> PathBuf {
        let bytes = std::mem::replace(&mut self.0, tar::Builder::new(Vec::new()))
            .into_inner()
            .unwrap();
        let path = dir.join("bundle.tar");
        std::fs::write(&path, bytes).unwrap();
        path
    }
}

fn refused(bundle: &Path, limits: &Limits) -> String {
    let area = Area::new();
    let err = area
        .open(bundle, limits)
        .expect_err("the bundle must be refused");
    area.assert_contained();
    err.to_string()
}

#[test]
fn hostile_tar_entries_are_refused_naming_the_entry() {
    use tar::EntryType as T;
    let dir = tempfile::tempdir().unwrap();
    type Case = (&'static str, Box<dyn Fn(&mut RawTar)>, &'static str);
    let cases: Vec<Case> = vec![
        (
            "traversal",
            Box::new(|t| {
                t.file("../evil", b"x");
            }),
            "entry `../evil`: the path contains `..`",
        ),
        (
            "deep traversal",
            Box::new(|t| {
                t.file("a/../../evil", b"x");
            }),
            "entry `a/../../evil`: the path contains `..`",
        ),
        (
            "absolute path",
            Box::new(|t| {
                t.file("/tmp/shoal-evil", b"x");
            }),
            "entry `/tmp/shoal-evil`: absolute path",
        ),
        (
            "escaping symlink",
            Box::new(|t| {
                t.entry("etc", T::Symlink, Some("../../../etc"), b"");
            }),
            "entry `etc`: symbolic link to `../../../etc`, outside the revision",
        ),
        (
            "absolute symlink",
            Box::new(|t| {
                t.entry("passwd", T::Symlink, Some("/etc/passwd"), b"");
            }),
            "entry `passwd`: symbolic link to `/etc/passwd`",
        ),
        (
            "write through a symlink",
            Box::new(|t| {
                t.entry("sub", T::Directory, None, b"")
                    .entry("link", T::Symlink, Some("sub"), b"")
                    .file("link/x", b"x");
            }),
            "entry `link/x`: it would be written through the symbolic link `link`",
        ),
        (
            "device file",
            Box::new(|t| {
                t.entry("dev/sda", T::Char, None, b"");
            }),
            "entry `dev/sda`: a device file",
        ),
        (
            "block device",
            Box::new(|t| {
                t.entry("disk", T::Block, None, b"");
            }),
            "entry `disk`: a device file",
        ),
        (
            "fifo",
            Box::new(|t| {
                t.entry("pipe", T::Fifo, None, b"");
            }),
            "entry `pipe`: a FIFO",
        ),
        (
            "hard link",
            Box::new(|t| {
                t.entry("hl", T::Link, Some("/etc/shadow"), b"");
            }),
            "entry `hl`: a hard link",
        ),
        (
            "duplicate file",
            Box::new(|t| {
                t.file("appspec.yml", b"version: 0.0");
            }),
            "entry `appspec.yml`: duplicate entry",
        ),
    ];
    for (what, build, expected) in cases {
        let mut t = RawTar::new();
        build(&mut t);
        let err = refused(&t.write(dir.path()), &Limits::default());
        assert!(err.contains(expected), "{what}: {err}");
    }
    assert!(!Path::new("/tmp/shoal-evil").exists());
}

#[test]
fn an_archive_bomb_is_stopped_at_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bomb.tar.gz");
    let gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&path).unwrap(),
        flate2::Compression::best(),
    );
    let mut tar = tar::Builder::new(gz);
    let mut h = tar::Header::new_gnu();
    h.set_size(APPSPEC.len() as u64);
    h.set_mode(0o644);
    tar.append_data(&mut h, "appspec.yml", APPSPEC.as_bytes())
        .unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_size(64 << 20);
    h.set_mode(0o644);
    tar.append_data(
        &mut h,
        "model/zeros.bin",
        std::io::repeat(0).take_bytes(64 << 20),
    )
    .unwrap();
    tar.into_inner().unwrap().finish().unwrap().flush().unwrap();
    assert!(
        std::fs::metadata(&path).unwrap().len() < 1 << 20,
        "the bomb should be small"
    );

    let limits = Limits {
        max_bytes: 8 << 20,
        ..Limits::default()
    };
    let err = refused(&path, &limits);
    assert!(
        err.contains("entry `model/zeros.bin`: the bundle expands past the limit of 8388608 bytes"),
        "{err}"
    );

    let mut many = RawTar::new();
    for i in 0..20 {
        many.file(&format!("f{i}"), b"");
    }
    let err = refused(
        &many.write(dir.path()),
        &Limits {
            max_entries: 10,
            ..Limits::default()
        },
    );
    assert!(err.contains("more than 10 entries"), "{err}");
}

trait TakeBytes: std::io::Read + Sized {
    fn take_bytes(self, n: u64) -> std::io::Take<Self> {
        self.take(n)
    }
}
impl<R: std::io::Read> TakeBytes for R {}

#[test]
fn hostile_zip_entries_are_refused() {
    use zip::write::SimpleFileOptions;
    let dir = tempfile::tempdir().unwrap();
    for (name, expected) in [
        ("../evil", "entry `../evil`: the path contains `..`"),
        ("/abs", "entry `/abs`: absolute path"),
    ] {
        let path = dir.path().join("b.zip");
        let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        zip.start_file("appspec.yml", SimpleFileOptions::default())
            .unwrap();
        zip.write_all(APPSPEC.as_bytes()).unwrap();
        zip.start_file(name, SimpleFileOptions::default()).unwrap();
        zip.write_all(b"x").unwrap();
        zip.finish().unwrap();
        let err = refused(&path, &Limits::default());
        assert!(err.contains(expected), "{name}: {err}");
    }
}

#[test]
fn a_directory_bundle_is_held_to_the_same_rules() {
    let src = tempfile::tempdir().unwrap();
    sample_revision(src.path());
    std::os::unix::fs::symlink("/etc/passwd", src.path().join("passwd")).unwrap();
    let err = refused(src.path(), &Limits::default());
    assert!(
        err.contains("entry `passwd`: symbolic link to `/etc/passwd`"),
        "{err}"
    );
    let out = tempfile::tempdir().unwrap();
    let err = bundle::create(src.path(), &out.path().join("r.tar.gz"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("entry `passwd`"), "{err}");
    assert!(!out.path().join("r.tar.gz").exists());
}

#[test]
fn not_a_bundle_no_appspec_and_a_malformed_appspec() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.bin");
    std::fs::write(&garbage, b"this is not an archive at all").unwrap();
    assert!(refused(&garbage, &Limits::default()).contains("not a bundle"));

    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    std::fs::write(empty.join("README"), b"hi").unwrap();
    assert!(refused(&empty, &Limits::default()).contains("no appspec.yml"));

    let bad = dir.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    std::fs::write(
        bad.join("appspec.yml"),
        "version: 0.0\nos: linux\nos: windows\n",
    )
    .unwrap();
    let err = refused(&bad, &Limits::default());
    assert!(
        err.starts_with("appspec.yml line 3: duplicate mapping key: os"),
        "{err}"
    );

    // Truncated archives are errors, not panics.
    let src = tempfile::tempdir().unwrap();
    sample_revision(src.path());
    for name in ["t.tar.gz", "t.tar.zst", "t.zip"] {
        let path = dir.path().join(name);
        bundle::create(src.path(), &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let area = Area::new();
        assert!(
            area.open(&path, &Limits::default()).is_err(),
            "{name}: truncated archive accepted"
        );
        area.assert_contained();
    }
}
