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

/// Counts the bytes allocated on each thread, so a test can assert the peak a piece of work
/// needed: a bundle that makes the reader allocate what its header claims shows here.
mod counting {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    pub struct Counting;

    thread_local! {
        static LIVE: Cell<isize> = const { Cell::new(0) };
        static PEAK: Cell<isize> = const { Cell::new(0) };
    }

    fn note(delta: isize) {
        let _ = LIVE.try_with(|live| {
            let now = live.get() + delta;
            live.set(now);
            let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
        });
    }

    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let p = unsafe { System.alloc(layout) };
            if !p.is_null() {
                note(layout.size() as isize);
            }
            p
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            let p = unsafe { System.alloc_zeroed(layout) };
            if !p.is_null() {
                note(layout.size() as isize);
            }
            p
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            unsafe { System.dealloc(ptr, layout) };
            note(-(layout.size() as isize));
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
            let p = unsafe { System.realloc(ptr, layout, new) };
            if !p.is_null() {
                note(new as isize - layout.size() as isize);
            }
            p
        }
    }

    /// Runs `f` and returns its result with the most bytes it held allocated at once on
    /// this thread, beyond what was allocated before it started.
    pub fn peak<T>(f: impl FnOnce() -> T) -> (T, usize) {
        let base = LIVE.with(Cell::get);
        PEAK.with(|p| p.set(base));
        let out = f();
        let peak = PEAK.with(Cell::get);
        (out, (peak - base).max(0) as usize)
    }
}

#[global_allocator]
static COUNTING: counting::Counting = counting::Counting;

/// A tar written header by header, so that hostile names, types and sizes survive.
struct RawTar(Vec<u8>);

impl RawTar {
    fn new() -> Self {
        let mut t = RawTar(Vec::new());
        t.file("appspec.yml", APPSPEC.as_bytes());
        t
    }

    /// A header claiming `size` bytes, followed by `data` (which may be shorter).
    fn header(
        &mut self,
        name: &[u8],
        kind: tar::EntryType,
        link: &[u8],
        size: u64,
        data: &[u8],
    ) -> &mut Self {
        let mut h = tar::Header::new_old();
        let raw = h.as_old_mut();
        raw.name[..name.len()].copy_from_slice(name);
        raw.linkname[..link.len()].copy_from_slice(link);
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_size(size);
        h.set_cksum();
        self.0.extend_from_slice(h.as_bytes());
        self.0.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.0.extend(std::iter::repeat_n(0u8, pad));
        self
    }

    fn entry(
        &mut self,
        name: &str,
        kind: tar::EntryType,
        link: Option<&str>,
        data: &[u8],
    ) -> &mut Self {
        let link = link.unwrap_or("").as_bytes();
        self.header(name.as_bytes(), kind, link, data.len() as u64, data)
    }

    fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        self.entry(name, tar::EntryType::Regular, None, data)
    }

    fn link(&mut self, name: &str, target: &str) -> &mut Self {
        self.entry(name, tar::EntryType::Symlink, Some(target), b"")
    }

    fn dir(&mut self, name: &str) -> &mut Self {
        self.entry(name, tar::EntryType::Directory, None, b"")
    }

    /// A PAX extended header holding `records` (key, value), for the entry after it.
    fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        let mut body = Vec::new();
        for (key, value) in records {
            // "<len> <key>=<value>\n", where len counts itself.
            let rest = key.len() + value.len() + 3;
            let mut len = rest + 1;
            while len.to_string().len() + rest != len {
                len += 1;
            }
            body.extend_from_slice(format!("{len} {key}=").as_bytes());
            body.extend_from_slice(value);
            body.push(b'\n');
        }
        self.header(
            b"pax",
            tar::EntryType::XHeader,
            b"",
            body.len() as u64,
            &body,
        )
    }

    /// A GNU long name (`L`) or long link (`K`) for the entry after it.
    fn gnu_long(&mut self, kind: u8, value: &[u8]) -> &mut Self {
        let mut data = value.to_vec();
        data.push(0);
        self.header(
            b"././@LongLink",
            tar::EntryType::new(kind),
            b"",
            data.len() as u64,
            &data,
        )
    }

    fn bytes(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.0);
        out.extend(std::iter::repeat_n(0u8, 1024));
        out
    }

    fn write(&mut self, dir: &Path) -> PathBuf {
        write_new(dir, "bundle.tar", &self.bytes())
    }
}

/// Writes `bytes` to a new file named after `name` in `dir` (made unique).
fn write_new(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!("{n:02}-{name}"));
    std::fs::write(&path, bytes).unwrap();
    path
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

/// A tar whose only content after the AppSpec is an extension header of `kind` carrying
/// `len` real bytes (zeros after a valid start), gzip-compressed: small on disk, large if
/// read whole.
fn gz_extension_bomb(dir: &Path, kind: u8, len: usize) -> PathBuf {
    let mut t = RawTar::new();
    let mut data = vec![0u8; len];
    if kind == b'x' {
        data[..12].copy_from_slice(b"9999999 a=b\n");
    } else {
        data[..4].copy_from_slice(b"name");
    }
    t.header(
        b"././@LongLink",
        tar::EntryType::new(kind),
        b"",
        len as u64,
        &data,
    )
    .file("after", b"x");
    let bytes = gzip(&t.bytes());
    assert!(bytes.len() < len / 100, "the bomb should be small");
    write_new(dir, "bomb.tar.gz", &bytes)
}

fn zip_with(dir: &Path, build: impl FnOnce(&mut zip::ZipWriter<std::fs::File>)) -> PathBuf {
    use zip::write::SimpleFileOptions;
    let path = write_new(dir, "bundle.zip", b"");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    zip.start_file("appspec.yml", SimpleFileOptions::default())
        .unwrap();
    zip.write_all(APPSPEC.as_bytes()).unwrap();
    build(&mut zip);
    zip.finish().unwrap();
    path
}

fn dir_with(dir: &Path, build: impl FnOnce(&Path)) -> PathBuf {
    let root = write_new(dir, "tree", b"");
    std::fs::remove_file(&root).unwrap();
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("appspec.yml"), APPSPEC).unwrap();
    build(&root);
    root
}

/// One hostile bundle: what it is, where, the limits it is opened with, and what the
/// refusal must say (the entry named).
struct Case {
    what: &'static str,
    bundle: PathBuf,
    limits: Limits,
    expected: String,
}

/// The largest peak allocation any hostile bundle may cause while being refused. Every
/// header bomb in the catalogue would need at least four times this if read whole.
const MEMORY_BOUND: usize = 8 << 20;

/// Every hostile bundle the agent knows of. Written to `$SHOAL_BUNDLE_SEEDS`, when set, as
/// seeds for the fuzz targets (fuzz/run.sh).
fn catalogue(dir: &Path) -> Vec<Case> {
    use tar::EntryType as T;
    let mut cases = Vec::new();
    let mut add = |what: &'static str, bundle: PathBuf, limits: Limits, expected: &str| {
        cases.push(Case {
            what,
            bundle,
            limits,
            expected: expected.to_string(),
        })
    };
    let d = Limits::default;
    let tar = |build: &dyn Fn(&mut RawTar)| {
        let mut t = RawTar::new();
        build(&mut t);
        t.write(dir)
    };

    // Paths.
    add(
        "traversal",
        tar(&|t| {
            t.file("../evil", b"x");
        }),
        d(),
        "entry `../evil`: the path contains `..`",
    );
    add(
        "deep traversal",
        tar(&|t| {
            t.file("a/../../evil", b"x");
        }),
        d(),
        "entry `a/../../evil`: the path contains `..`",
    );
    add(
        "absolute path",
        tar(&|t| {
            t.file("/tmp/shoal-evil", b"x");
        }),
        d(),
        "entry `/tmp/shoal-evil`: absolute path",
    );
    add(
        "backslash",
        tar(&|t| {
            t.file("a\\..\\evil", b"x");
        }),
        d(),
        "entry `a\\..\\evil`: the name contains a backslash",
    );
    add(
        "non-UTF-8 name",
        {
            let mut t = RawTar::new();
            t.header(b"caf\xe9", T::Regular, b"", 1, b"x");
            t.write(dir)
        },
        d(),
        "the name is not UTF-8",
    );
    add(
        "duplicate file",
        tar(&|t| {
            t.file("appspec.yml", b"version: 0.0");
        }),
        d(),
        "entry `appspec.yml`: duplicate entry",
    );
    add(
        "file under a file",
        tar(&|t| {
            t.file("f", b"x").file("f/x", b"y");
        }),
        d(),
        "entry `f/x`: its parent `f` is not a directory",
    );
    // Entry types.
    add(
        "character device",
        tar(&|t| {
            t.entry("dev/sda", T::Char, None, b"");
        }),
        d(),
        "entry `dev/sda`: a device file",
    );
    add(
        "block device",
        tar(&|t| {
            t.entry("disk", T::Block, None, b"");
        }),
        d(),
        "entry `disk`: a device file",
    );
    add(
        "fifo",
        tar(&|t| {
            t.entry("pipe", T::Fifo, None, b"");
        }),
        d(),
        "entry `pipe`: a FIFO",
    );
    add(
        "hard link",
        tar(&|t| {
            t.entry("hl", T::Link, Some("/etc/shadow"), b"");
        }),
        d(),
        "entry `hl`: a hard link",
    );
    // Links.
    add(
        "escaping symlink",
        tar(&|t| {
            t.link("etc", "../../../etc");
        }),
        d(),
        "entry `etc`: symbolic link to `../../../etc`, outside the revision",
    );
    add(
        "absolute symlink",
        tar(&|t| {
            t.link("passwd", "/etc/passwd");
        }),
        d(),
        "entry `passwd`: symbolic link to `/etc/passwd`, outside the revision",
    );
    add(
        "deep escaping symlink",
        tar(&|t| {
            t.link("a/b/c", "../../../x");
        }),
        d(),
        "entry `a/b/c`: symbolic link to `../../../x`, outside the revision",
    );
    add(
        "empty link target",
        tar(&|t| {
            t.link("nothing", "");
        }),
        d(),
        "entry `nothing`: symbolic link with an empty target",
    );
    add(
        "write through a symlink",
        tar(&|t| {
            t.dir("sub").link("link", "sub").file("link/x", b"x");
        }),
        d(),
        "entry `link/x`: it would be written through the symbolic link `link`",
    );
    add(
        "write through a link to the root",
        tar(&|t| {
            t.link("d", ".").file("d/appspec.yml", b"x");
        }),
        d(),
        "entry `d/appspec.yml`: it would be written through the symbolic link `d`",
    );
    add(
        "link chain d -> . then esc -> d/d/../..",
        tar(&|t| {
            t.link("d", ".").link("esc", "d/d/../..");
        }),
        d(),
        "entry `esc`: symbolic link to `d/d/../..` passes through the symbolic link `d`",
    );
    add(
        "link chain through a nested link",
        tar(&|t| {
            t.link("sub/up", "..").link("esc", "sub/up/../..");
        }),
        d(),
        "entry `esc`: symbolic link to `sub/up/../..` passes through the symbolic link `sub/up`",
    );
    add(
        "link chain, the link planted after",
        tar(&|t| {
            // `esc -> d/..` is the root while `d` is a directory, but once `d -> .` the
            // kernel would resolve it to the root's parent.
            t.link("esc", "d/..").link("d", ".");
        }),
        d(),
        "entry `d`: a symbolic link where an earlier link's target passes",
    );
    add(
        "link targets deep enough to make the link checks quadratic",
        tar(&|t| {
            for i in 0..64 {
                let target = format!("{i}/{}x", "a/".repeat(2000));
                t.gnu_long(b'K', target.as_bytes())
                    .link(&format!("l{i}"), "x");
            }
        }),
        d(),
        "entry `l0`: the link target has more than 256 components",
    );
    add(
        "link through itself",
        tar(&|t| {
            t.link("self", "self/../..");
        }),
        d(),
        "entry `self`: symbolic link to `self/../..` passes through the symbolic link `self`",
    );
    add(
        "directory over a link",
        tar(&|t| {
            t.dir("sub").link("l", "sub").dir("l");
        }),
        d(),
        "entry `l`: a directory where another entry already is",
    );
    add(
        "link over a directory",
        tar(&|t| {
            t.dir("sub").link("sub", ".");
        }),
        d(),
        "entry `sub`: duplicate entry",
    );
    // Extended headers: names and links from PAX and GNU headers get the same rules.
    add(
        "PAX path with ..",
        tar(&|t| {
            t.pax(&[("path", b"../evil")]).file("innocent", b"x");
        }),
        d(),
        "entry `../evil`: the path contains `..`",
    );
    add(
        "PAX path with a NUL",
        tar(&|t| {
            t.pax(&[("path", b"a\0b")]).file("innocent", b"x");
        }),
        d(),
        "the name contains a NUL byte",
    );
    add(
        "PAX linkpath outside",
        tar(&|t| {
            t.pax(&[("linkpath", b"/etc/shadow")])
                .link("innocent", "ok");
        }),
        d(),
        "entry `innocent`: symbolic link to `/etc/shadow`, outside the revision",
    );
    add(
        "PAX size that differs",
        tar(&|t| {
            t.pax(&[("size", b"999")]).file("sized", b"x");
        }),
        d(),
        "entry `sized`: its PAX size differs from its header's",
    );
    add(
        "GNU long name with ..",
        tar(&|t| {
            t.gnu_long(
                b'L',
                format!("{}/../../../evil", "a".repeat(120)).as_bytes(),
            )
            .file("innocent", b"x");
        }),
        d(),
        "/../../../evil`: the path contains `..`",
    );
    add(
        "GNU long link outside",
        tar(&|t| {
            t.gnu_long(
                b'K',
                format!("{}/../../../../etc", "../".repeat(40)).as_bytes(),
            )
            .link("innocent", "ok");
        }),
        d(),
        "entry `innocent`: symbolic link to `../../../",
    );
    add(
        "extension header with no entry",
        tar(&|t| {
            t.gnu_long(b'L', b"dangling");
        }),
        d(),
        "entry `the end, after `appspec.yml``: an extended header with no entry after it",
    );
    // Header bombs: sizes claimed, and sizes real behind gzip.
    for (what, kind, cap) in [
        ("GNU long name claiming 1 GiB", b'L', 4096),
        ("GNU long link claiming 1 GiB", b'K', 4096),
        ("PAX header claiming 1 GiB", b'x', 65536),
        ("PAX global header claiming 1 GiB", b'g', 65536),
    ] {
        let mut t = RawTar::new();
        t.header(
            b"././@LongLink",
            tar::EntryType::new(kind),
            b"",
            1 << 30,
            b"x",
        );
        add(
            what,
            t.write(dir),
            d(),
            &format!("an extended header of 1073741824 bytes, over the cap of {cap}"),
        );
    }
    add(
        "gzip bomb: a 32 MiB GNU long name",
        gz_extension_bomb(dir, b'L', 32 << 20),
        d(),
        "entry `a GNU long name after `appspec.yml``: an extended header of 33554432 bytes, over the cap of 4096",
    );
    add(
        "gzip bomb: a 32 MiB PAX header",
        gz_extension_bomb(dir, b'x', 32 << 20),
        d(),
        "entry `a PAX header after `appspec.yml``: an extended header of 33554432 bytes, over the cap of 65536",
    );
    add(
        "many long names past the byte limit",
        tar(&|t| {
            for i in 0..64 {
                // 4000 bytes in components of 200 (a file name is at most 255 bytes).
                let long = format!("{i}/{}", vec!["n".repeat(199); 20].join("/"));
                t.gnu_long(b'L', long.as_bytes())
                    .file(&format!("f{i}"), b"");
            }
        }),
        Limits {
            max_bytes: 128 << 10,
            ..d()
        },
        "a GNU long name after `",
    );
    add(
        "gzip bomb: 32 MiB of zeros in one file",
        {
            let mut t = RawTar::new();
            t.file("model/zeros.bin", &vec![0u8; 32 << 20]);
            write_new(dir, "zeros.tar.gz", &gzip(&t.bytes()))
        },
        Limits {
            max_bytes: 4 << 20,
            ..d()
        },
        "entry `model/zeros.bin`: the bundle expands past the limit of 4194304 bytes",
    );
    add(
        "too many entries",
        tar(&|t| {
            for i in 0..20 {
                t.file(&format!("f{i}"), b"");
            }
        }),
        Limits {
            max_entries: 10,
            ..d()
        },
        "more than 10 entries",
    );
    // Zip.
    use zip::write::SimpleFileOptions as O;
    add(
        "zip traversal",
        zip_with(dir, |z| {
            z.start_file("../evil", O::default()).unwrap();
            z.write_all(b"x").unwrap();
        }),
        d(),
        "entry `../evil`: the path contains `..`",
    );
    add(
        "zip absolute path",
        zip_with(dir, |z| {
            z.start_file("/abs", O::default()).unwrap();
            z.write_all(b"x").unwrap();
        }),
        d(),
        "entry `/abs`: absolute path",
    );
    add(
        "zip escaping symlink",
        zip_with(dir, |z| {
            z.add_symlink("etc", "../etc", O::default()).unwrap();
        }),
        d(),
        "entry `etc`: symbolic link to `../etc`, outside the revision",
    );
    add(
        "zip link chain d -> . then esc -> d/d/../..",
        zip_with(dir, |z| {
            z.add_symlink("d", ".", O::default()).unwrap();
            z.add_symlink("esc", "d/d/../..", O::default()).unwrap();
        }),
        d(),
        "entry `esc`: symbolic link to `d/d/../..` passes through the symbolic link `d`",
    );
    add(
        "zip bomb: a 32 MiB link target",
        zip_with(dir, |z| {
            z.add_symlink(
                "long",
                "a".repeat(32 << 20),
                O::default().compression_method(zip::CompressionMethod::Deflated),
            )
            .unwrap();
        }),
        d(),
        "entry `long`: the link target is too long",
    );
    // Directory bundles.
    add(
        "directory: absolute symlink",
        dir_with(dir, |r| {
            std::os::unix::fs::symlink("/etc/passwd", r.join("passwd")).unwrap()
        }),
        d(),
        "entry `passwd`: symbolic link to `/etc/passwd`, outside the revision",
    );
    add(
        "directory: link chain d -> . then esc -> d/d/../..",
        dir_with(dir, |r| {
            std::os::unix::fs::symlink(".", r.join("d")).unwrap();
            std::os::unix::fs::symlink("d/d/../..", r.join("esc")).unwrap();
        }),
        d(),
        "entry `esc`: symbolic link to `d/d/../..` passes through the symbolic link `d`",
    );
    add(
        "directory: FIFO",
        dir_with(dir, |r| {
            nix::unistd::mkfifo(
                &r.join("pipe"),
                nix::sys::stat::Mode::from_bits_truncate(0o644),
            )
            .unwrap()
        }),
        d(),
        "entry `pipe`: a special file",
    );
    cases
}

#[test]
fn the_hostile_catalogue_is_refused_naming_each_entry_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let cases = catalogue(dir.path());
    assert!(cases.len() >= 30, "the catalogue has {} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let area = Area::new();
        let (result, peak) = counting::peak(|| area.open(&case.bundle, &case.limits));
        area.assert_contained();
        match result {
            Ok(_) => failures.push(format!("{}: accepted", case.what)),
            Err(e) if !e.to_string().contains(&case.expected) => failures.push(format!(
                "{}: refused with `{e}`, expected `{}`",
                case.what, case.expected
            )),
            Err(_) if peak > MEMORY_BOUND => failures.push(format!(
                "{}: refused, but {peak} bytes were allocated at the peak (bound {MEMORY_BOUND})",
                case.what
            )),
            Err(_) => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(!Path::new("/tmp/shoal-evil").exists());
    if let Some(seeds) = std::env::var_os("SHOAL_BUNDLE_SEEDS") {
        let seeds = Path::new(&seeds);
        std::fs::create_dir_all(seeds).unwrap();
        for case in cases.iter().filter(|c| c.bundle.is_file()) {
            let name = case.bundle.file_name().unwrap();
            std::fs::copy(&case.bundle, seeds.join(name)).unwrap();
        }
    }
}

#[test]
fn the_memory_bound_is_real() {
    // The counter sees an allocation the size a header bomb would have caused.
    let (_, peak) = counting::peak(|| vec![0u8; 4 * MEMORY_BOUND].len());
    assert!(peak >= 4 * MEMORY_BOUND, "{peak}");
}

#[test]
fn legitimate_link_chains_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = RawTar::new();
    t.file("lib/libx.so.1.2", b"elf")
        .link("lib/libx.so.1", "libx.so.1.2")
        .link("lib/libx.so", "libx.so.1")
        .link("current", "lib")
        .link("up/to/root", "../..");
    let area = Area::new();
    let opened = area.open(&t.write(dir.path()), &Limits::default()).unwrap();
    assert_eq!(
        std::fs::read(opened.root.join("lib/libx.so")).unwrap(),
        b"elf"
    );
    assert_eq!(
        std::fs::read_link(opened.root.join("current")).unwrap(),
        Path::new("lib")
    );
    area.assert_contained();
}

#[test]
fn revision_files_are_read_beneath_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("rev");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("inside"), b"ok").unwrap();
    std::os::unix::fs::symlink("inside", root.join("alias")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", root.join("host")).unwrap();
    std::os::unix::fs::symlink("../secret", root.join("up")).unwrap();
    std::fs::write(dir.path().join("secret"), b"no").unwrap();
    let read = |rel: &str| bundle::read_in_revision(&root, Path::new(rel), 16);
    assert_eq!(read("inside").unwrap(), b"ok");
    assert_eq!(read("alias").unwrap(), b"ok");
    for escape in ["host", "up", "../secret", "/etc/hostname"] {
        let err = read(escape).expect_err(escape).to_string();
        assert!(
            err.contains(&format!("entry `{escape}`")),
            "{escape}: {err}"
        );
    }
    std::fs::write(root.join("big"), [0u8; 17]).unwrap();
    assert!(matches!(read("big"), Err(BundleError::TooLarge { .. })));
    // A revision whose appspec.yml is a link out is refused before it is read.
    std::fs::remove_file(root.join("inside")).unwrap();
    std::os::unix::fs::symlink("../secret", root.join("appspec.yml")).unwrap();
    let area = Area::new();
    assert!(area.open(&root, &Limits::default()).is_err());
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

/// The fuzz targets' bundle inputs kept in the repository (`fuzz/seeds/bundle_*`, and any
/// crash input saved in `fuzz/regressions/bundle_*`), replayed on stable the way the
/// targets run them: each is refused or accepted, never a panic, nothing outside staging.
#[test]
fn fuzz_inputs_replay_without_panic() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let limits = Limits {
        max_bytes: 1 << 20,
        max_entries: 256,
    };
    let mut replayed = 0;
    for (dir, ext) in [
        ("seeds/bundle_tar", "tar"),
        ("seeds/bundle_zip", "zip"),
        ("regressions/bundle_tar", "tar"),
        ("regressions/bundle_zip", "zip"),
    ] {
        let Ok(entries) = std::fs::read_dir(fuzz.join(dir)) else {
            continue;
        };
        for entry in entries {
            let input = entry.unwrap().path();
            let scratch = tempfile::tempdir().unwrap();
            let bundle_path = scratch.path().join(format!("in.{ext}"));
            std::fs::copy(&input, &bundle_path).unwrap();
            let area = Area::new();
            if let Ok(b) = area.open(&bundle_path, &limits) {
                assert!(b.root.starts_with(area.staging()), "{}", input.display());
            }
            area.assert_contained();
            replayed += 1;
        }
    }
    assert!(
        replayed >= 30,
        "only {replayed} fuzz inputs found under {}",
        fuzz.display()
    );
}
