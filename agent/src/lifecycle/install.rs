//! Install: the revision's files and directories copied to their destinations per the
//! AppSpec's `files`, `file_exists_behavior` honoured, what the previous revision installed
//! and this one does not removed, and `permissions` applied.
//!
//! Every conflict is found before anything is written, so a DISALLOW refusal leaves the
//! host untouched. The agent runs as root and the application's user may own the
//! destinations, so every step goes through [`crate::beneath`] directory handles: a
//! destination, a parent or a permission object that is (or passes through) a symbolic
//! link is refused with [`InstallError::Link`], never followed. Each file is replaced
//! atomically (an unpredictable temporary name, fsynced, renamed, the directory fsynced),
//! so a crash leaves every file either old or new; the journal (see `run.rs`) then brings
//! the whole host back to one revision. A file of the host's own that OVERWRITE replaces is
//! first kept in the app's `replaced/` directory and put back when no revision installs
//! that path any more (a rollback included). Directories of the revision, empty ones too,
//! are created, and removed again (if empty) when no revision has them. Destinations are
//! rooted under the agent's `install_root` (`/` in production), so several agents on one
//! machine do not trample each other.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::appspec::{AppSpec, FileExistsBehavior, ObjectType, Permission};
use crate::beneath::{self, Dir, Kind};

/// Why Install failed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(
        "file_exists_behavior DISALLOW: {path} already exists and was not installed by the previous revision (set OVERWRITE or RETAIN, or remove it)"
    )]
    Conflict { path: PathBuf },
    #[error("appspec.yml line {line}: files source `{source_path}` is not in the revision")]
    MissingSource { source_path: String, line: u64 },
    #[error("appspec.yml line {line}: {message}")]
    Permission { line: u64, message: String },
    #[error(
        "{path} is, or passes through, a symbolic link (or a file where a directory belongs): refused, the agent never follows a link it did not make; replace it with a real directory"
    )]
    Link { path: PathBuf },
    #[error(
        "file_exists_behavior OVERWRITE: {path} is the host's own file of {size} bytes; with the host's other files this deployment replaces, more than the {limit} bytes the agent keeps to put back on rollback; move it away or remove it, then deploy again"
    )]
    TooLargeToKeep {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("appspec.yml line {line}: `{destination}` leaves the install root")]
    Destination { destination: String, line: u64 },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Maps an I/O error at `path`, telling a refused link apart.
fn io(path: &Path) -> impl Fn(std::io::Error) -> InstallError + '_ {
    move |source| {
        if beneath::is_link_refusal(&source) {
            InstallError::Link {
                path: path.to_path_buf(),
            }
        } else {
            InstallError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

/// `destination` (absolute, from the AppSpec) under `root`.
pub fn rooted(root: &Path, destination: &str) -> PathBuf {
    root.join(destination.trim_start_matches('/'))
}

/// What a source entry of the revision is.
#[derive(Clone, Debug)]
enum Source {
    File,
    Link(PathBuf),
    Dir,
}

/// One file, link or directory to put in place.
struct Copy {
    /// Relative to the revision.
    from: PathBuf,
    /// Absolute, under the install root.
    to: PathBuf,
    source: Source,
    behavior: FileExistsBehavior,
}

/// What Install will write, worked out before writing anything.
pub struct InstallPlan {
    root: PathBuf,
    revision: PathBuf,
    copies: Vec<Copy>,
}

/// The install root as a handle, and `path` (under it) split into its parent (relative to
/// the root) and its name.
fn split<'a>(root: &Path, path: &'a Path) -> Option<(PathBuf, &'a OsStr)> {
    let rel = beneath::relative(path.strip_prefix(root).ok()?)?;
    let name = path.file_name()?;
    Some((rel.parent()?.to_path_buf(), name))
}

/// The most bytes of the host's own files that one Install's OVERWRITE keeps (to put back
/// on rollback), all files together: more is refused before anything is written, so the
/// app's user cannot fill the agent's disk with copies of huge (or sparse) files planted at
/// destinations.
pub const MAX_KEPT_BYTES: u64 = 1 << 30;

/// The size of the file at `path` (0 if it is not a file).
fn size_of(root: &Dir, path: &Path) -> u64 {
    split(root.path(), path)
        .and_then(|(parent, name)| root.open_dir(&parent).ok()?.stat(name).ok().flatten())
        .filter(|(k, _)| *k == Kind::File)
        .map_or(0, |(_, st)| st.st_size.max(0) as u64)
}

/// What is at `path` now, read through handles; `None` if absent or unreachable.
fn what_is(root: &Dir, path: &Path) -> Option<Kind> {
    let (parent, name) = split(root.path(), path)?;
    let dir = root.open_dir(&parent).ok()?;
    dir.stat(name).ok().flatten().map(|(k, _)| k)
}

impl InstallPlan {
    fn root_dir(&self) -> Result<Dir, InstallError> {
        std::fs::create_dir_all(&self.root).map_err(io(&self.root))?;
        Dir::open_trusted(&self.root).map_err(io(&self.root))
    }

    /// Refuses the install if a destination file exists, is not `ours`, and the behavior
    /// is DISALLOW. Call before journaling, so a refused file never counts as ours.
    pub fn check_conflicts(&self, ours: &BTreeSet<PathBuf>) -> Result<(), InstallError> {
        let root = self.root_dir()?;
        let mut keeping = 0u64;
        for c in &self.copies {
            if matches!(c.source, Source::Dir) {
                continue; // directories merge
            }
            if !self.foreign(&root, c, ours) {
                continue;
            }
            match c.behavior {
                FileExistsBehavior::Disallow => {
                    return Err(InstallError::Conflict { path: c.to.clone() });
                }
                FileExistsBehavior::Overwrite => {
                    let size = size_of(&root, &c.to);
                    keeping = keeping.saturating_add(size);
                    if keeping > MAX_KEPT_BYTES {
                        return Err(InstallError::TooLargeToKeep {
                            path: c.to.clone(),
                            size,
                            limit: MAX_KEPT_BYTES,
                        });
                    }
                }
                FileExistsBehavior::Retain => {}
            }
        }
        Ok(())
    }

    /// Every path this install will write given what is `ours`: the journal records them.
    /// A foreign file kept by RETAIN, and a directory that was there before, are not; the
    /// parents Install will create above a destination are.
    pub fn writes(&self, ours: &BTreeSet<PathBuf>) -> Result<BTreeSet<PathBuf>, InstallError> {
        let root = self.root_dir()?;
        let mut writes = BTreeSet::new();
        let mut present = BTreeSet::new();
        for c in &self.copies {
            let writes_it = match c.source {
                Source::Dir => ours.contains(&c.to) || what_is(&root, &c.to).is_none(),
                _ => !(self.foreign(&root, c, ours) && c.behavior == FileExistsBehavior::Retain),
            };
            if !writes_it {
                continue;
            }
            writes.insert(c.to.clone());
            for parent in c.to.ancestors().skip(1) {
                if parent == self.root
                    || !parent.starts_with(&self.root)
                    || writes.contains(parent)
                    || present.contains(parent)
                {
                    break;
                }
                if what_is(&root, parent).is_some() {
                    present.insert(parent.to_path_buf());
                    break;
                }
                writes.insert(parent.to_path_buf());
            }
        }
        Ok(writes)
    }

    /// The host's own files this install will replace: OVERWRITE over a file that exists
    /// and is not `ours`. The journal records them apart from [`Self::writes`], so that a
    /// crash before one is kept in `replaced/` never takes it for ours (see
    /// [`interrupted`]).
    pub fn replacing(&self, ours: &BTreeSet<PathBuf>) -> Result<BTreeSet<PathBuf>, InstallError> {
        let root = self.root_dir()?;
        Ok(self
            .copies
            .iter()
            .filter(|c| {
                !matches!(c.source, Source::Dir)
                    && c.behavior == FileExistsBehavior::Overwrite
                    && self.foreign(&root, c, ours)
            })
            .map(|c| c.to.clone())
            .collect())
    }

    fn foreign(&self, root: &Dir, c: &Copy, ours: &BTreeSet<PathBuf>) -> bool {
        !ours.contains(&c.to) && what_is(root, &c.to).is_some()
    }
}

/// Works out the copies for a revision rooted at `revision`.
pub fn plan(revision: &Path, spec: &AppSpec, root: &Path) -> Result<InstallPlan, InstallError> {
    let rev = Dir::open_trusted(revision).map_err(io(revision))?;
    // Later mappings win for the same destination, as in CodeDeploy.
    let mut copies: BTreeMap<PathBuf, Copy> = BTreeMap::new();
    for mapping in &spec.files {
        let behavior = mapping
            .file_exists_behavior
            .unwrap_or(spec.file_exists_behavior);
        let missing = || InstallError::MissingSource {
            source_path: mapping.source.clone(),
            line: mapping.line,
        };
        let dest_rel = beneath::relative(Path::new(mapping.destination.trim_start_matches('/')))
            .ok_or_else(|| InstallError::Destination {
                destination: mapping.destination.clone(),
                line: mapping.line,
            })?;
        let dest = root.join(dest_rel);
        let from = beneath::relative(Path::new(&mapping.source)).ok_or_else(missing)?;
        let kind = match (from.parent(), from.file_name()) {
            (Some(parent), Some(name)) => rev
                .open_dir(parent)
                .ok()
                .and_then(|d| d.stat(name).ok().flatten())
                .map(|(k, _)| k),
            _ => Some(Kind::Dir), // the whole revision
        };
        let mut add = |from: PathBuf, to: PathBuf, source: Source| {
            copies.insert(
                to.clone(),
                Copy {
                    from,
                    to,
                    source,
                    behavior,
                },
            );
        };
        match kind.ok_or_else(missing)? {
            Kind::Dir => {
                let top = rev.open_dir(&from).map_err(io(&revision.join(&from)))?;
                walk(&top, &from, &dest, &mut add).map_err(io(&revision.join(&from)))?;
            }
            Kind::File => {
                let to = dest.join(from.file_name().expect("a file has a name"));
                add(from, to, Source::File);
            }
            Kind::Link => {
                let target = rev
                    .open_dir(from.parent().unwrap_or(Path::new("")))
                    .and_then(|d| d.read_link(from.file_name().expect("a link has a name")))
                    .map_err(io(&revision.join(&from)))?;
                let to = dest.join(from.file_name().expect("a link has a name"));
                add(from, to, Source::Link(target));
            }
            Kind::Other => return Err(missing()),
        }
    }
    Ok(InstallPlan {
        root: root.to_path_buf(),
        revision: revision.to_path_buf(),
        copies: copies.into_values().collect(),
    })
}

/// How deep a directory tree Install walks (a revision's, or a permission object's that the
/// app's user may have filled): deeper is refused, so no tree can exhaust the stack or the
/// descriptors of the agent.
const MAX_DEPTH: usize = 128;

/// Adds every entry below `dir` (the revision's `from`) as copies to `to`.
fn walk(
    dir: &Dir,
    from: &Path,
    to: &Path,
    add: &mut dyn FnMut(PathBuf, PathBuf, Source),
) -> io::Result<()> {
    if from.components().count() > MAX_DEPTH {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("more than {MAX_DEPTH} directories deep"),
        ));
    }
    for (name, kind) in dir.entries()? {
        let (f, t) = (from.join(&name), to.join(&name));
        match kind {
            Kind::Dir => {
                add(f.clone(), t.clone(), Source::Dir);
                walk(&dir.open_dir(Path::new(&name))?, &f, &t, add)?;
            }
            Kind::File => add(f, t, Source::File),
            Kind::Link => add(f, t, Source::Link(dir.read_link(&name)?)),
            Kind::Other => {} // unpacking never makes one
        }
    }
    Ok(())
}

/// A plan that installs nothing under `root`: carried out, it removes every path that is
/// ours (and puts back what OVERWRITE replaced).
pub fn plan_nothing(root: &Path) -> InstallPlan {
    InstallPlan {
        root: root.to_path_buf(),
        revision: root.to_path_buf(),
        copies: Vec::new(),
    }
}

/// What an interrupted install may have written, from its journal: every path in
/// `targets`, except the host's own files it was about to replace (`replacing`) that it had
/// not kept in `replaced` yet. Those were never touched (a file is kept before it is
/// replaced) and are still the host's: taking them for ours would delete them.
pub fn interrupted(
    targets: &BTreeSet<PathBuf>,
    replacing: &BTreeSet<PathBuf>,
    replaced: &Path,
) -> Result<BTreeSet<PathBuf>, InstallError> {
    let kept = match Dir::open_trusted(replaced) {
        Ok(dir) => Some(dir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io(replaced)(e)),
    };
    let mut ours = BTreeSet::new();
    for path in targets {
        if replacing.contains(path) {
            let Some(kept) = &kept else { continue };
            if kept
                .stat(OsStr::new(&kept_name(path)))
                .map_err(io(replaced))?
                .is_none()
            {
                continue;
            }
        }
        ours.insert(path.clone());
    }
    Ok(ours)
}

/// The name a replaced file of `path` is kept under in `replaced/`.
fn kept_name(path: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(path.as_os_str().as_bytes()))
}

/// Carries out `plan`. `ours` are the paths this host's deployments installed (the
/// previous revision's, and any an interrupted install wrote): they may be replaced or
/// removed freely. `replaced` is the app's directory for files OVERWRITE replaced. Returns
/// the paths now installed.
pub fn install(
    plan: &InstallPlan,
    ours: &BTreeSet<PathBuf>,
    replaced: &Path,
) -> Result<BTreeSet<PathBuf>, InstallError> {
    // 1. Conflicts, before any write.
    plan.check_conflicts(ours)?;
    let root = plan.root_dir()?;
    let kept = open_kept(replaced)?;
    let rev = Dir::open_trusted(&plan.revision).map_err(io(&plan.revision))?;
    // 2. Copies, parents before children.
    let mut installed = BTreeSet::new();
    let mut cleaned = BTreeSet::new();
    for c in &plan.copies {
        let (parent, name) =
            split(&plan.root, &c.to).ok_or_else(|| InstallError::Link { path: c.to.clone() })?;
        let at = plan.root.join(&parent);
        let (dir, created) = root.create_dirs(&parent).map_err(io(&at))?;
        installed.extend(created.into_iter().map(|d| plan.root.join(d)));
        if cleaned.insert(parent.clone()) {
            dir.clean_temporaries().map_err(io(&at))?;
        }
        let now = dir.stat(name).map_err(io(&c.to))?.map(|(k, _)| k);
        let foreign = now.is_some() && !ours.contains(&c.to);
        match (&c.source, now) {
            (Source::Dir, None) => {
                root.create_dirs(&parent.join(name)).map_err(io(&c.to))?;
                installed.insert(c.to.clone());
            }
            (Source::Dir, Some(Kind::Dir)) => {
                if !foreign {
                    installed.insert(c.to.clone());
                }
            }
            (Source::Dir, Some(_)) if !foreign => {
                // Ours, a file in the previous revision and a directory in this one.
                dir.remove_file(name).map_err(io(&c.to))?;
                root.create_dirs(&parent.join(name)).map_err(io(&c.to))?;
                installed.insert(c.to.clone());
            }
            (Source::Dir, Some(Kind::Link)) => {
                return Err(InstallError::Link { path: c.to.clone() });
            }
            (Source::Dir, Some(_)) => return Err(InstallError::Conflict { path: c.to.clone() }),
            (_, _) if foreign && c.behavior == FileExistsBehavior::Retain => continue,
            (_, Some(Kind::Dir | Kind::Other)) => {
                return Err(InstallError::Conflict { path: c.to.clone() });
            }
            (source, _) => {
                if foreign {
                    keep(&dir, name, &kept, &kept_name(&c.to)).map_err(io(&c.to))?;
                    crate::faults::point("install.kept");
                }
                match source {
                    Source::File => {
                        let mut src = rev
                            .open_file(&c.from)
                            .map_err(io(&plan.revision.join(&c.from)))?;
                        let mode = {
                            use std::os::unix::fs::PermissionsExt;
                            src.metadata()
                                .map_err(io(&plan.revision.join(&c.from)))?
                                .permissions()
                                .mode()
                                & 0o777
                        };
                        dir.write_atomic(name, &mut src, mode, None)
                            .map_err(io(&c.to))?;
                    }
                    Source::Link(target) => {
                        dir.symlink_atomic(name, target).map_err(io(&c.to))?;
                    }
                    Source::Dir => unreachable!("matched above"),
                }
                installed.insert(c.to.clone());
            }
        }
        crate::faults::point("install.file");
    }
    // Directories of ours that still hold what is installed stay ours.
    for p in ours {
        if !installed.contains(p)
            && installed
                .range(p.clone()..)
                .next()
                .is_some_and(|i| i != p && i.starts_with(p))
        {
            installed.insert(p.clone());
        }
    }
    // 3. What the previous revision installed and this one does not, deepest first.
    let stale: Vec<&PathBuf> = ours.difference(&installed).collect();
    for stale in stale.into_iter().rev() {
        remove(&root, &kept, stale)?;
    }
    Ok(installed)
}

/// The app's `replaced/` directory (made 0700: kept copies may be files the host protected
/// by their directory), cleaned of temporaries a crash left there.
fn open_kept(replaced: &Path) -> Result<Dir, InstallError> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o700).create(replaced) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(replaced)(e)),
    }
    let kept = Dir::open_trusted(replaced).map_err(io(replaced))?;
    kept.clean_temporaries().map_err(io(replaced))?;
    Ok(kept)
}

/// Forgets the kept copies of paths no longer `installed`: called once the state that
/// says so is on disk. Until then a copy put back stays kept, so a crash between putting
/// it back and writing the state puts it back again rather than taking the host's file
/// for ours and deleting it.
pub fn prune_kept(replaced: &Path, installed: &BTreeSet<PathBuf>) -> Result<(), InstallError> {
    if !replaced.exists() {
        return Ok(());
    }
    let kept = open_kept(replaced)?;
    let wanted: BTreeSet<String> = installed.iter().map(|p| kept_name(p)).collect();
    for (name, kind) in kept.entries().map_err(io(replaced))? {
        let keep = name.to_str().is_some_and(|n| wanted.contains(n));
        if !keep && matches!(kind, Kind::File | Kind::Link) {
            kept.remove_file(&name).map_err(io(replaced))?;
        }
    }
    Ok(())
}

/// Keeps the host's own `name` (in `dir`), which OVERWRITE is about to replace, as `kept`
/// in `replaced/`: its bytes, mode and owner, or its link.
fn keep(dir: &Dir, name: &OsStr, replaced: &Dir, kept: &str) -> io::Result<()> {
    match dir.stat(name)? {
        Some((Kind::File, st)) => {
            // Bounded again: the file may have grown since the conflicts were checked.
            let f = dir.open_file(Path::new(name))?;
            let too_large = || {
                io::Error::new(
                    io::ErrorKind::FileTooLarge,
                    format!("larger than the {MAX_KEPT_BYTES} bytes kept for a rollback"),
                )
            };
            if f.metadata()?.len() > MAX_KEPT_BYTES {
                return Err(too_large());
            }
            // A file that grows past the bound while it is copied fails the copy (a
            // truncated copy would be put back on rollback).
            let mut bounded = Bounded {
                inner: f,
                left: MAX_KEPT_BYTES,
            };
            replaced.write_atomic(
                OsStr::new(kept),
                &mut bounded,
                st.st_mode & 0o7777,
                Some((st.st_uid, st.st_gid)),
            )
        }
        Some((Kind::Link, _)) => replaced.symlink_atomic(OsStr::new(kept), &dir.read_link(name)?),
        _ => Ok(()),
    }
}

/// A reader that fails, rather than stops, past `left` bytes.
struct Bounded<R> {
    inner: R,
    left: u64,
}

impl<R: io::Read> io::Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.left = self.left.checked_sub(n as u64).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::FileTooLarge,
                format!("grew past the {MAX_KEPT_BYTES} bytes kept for a rollback while kept"),
            )
        })?;
        Ok(n)
    }
}

/// Removes the installed `path`, or puts back what OVERWRITE replaced there (the kept
/// copy stays until [`prune_kept`]). A directory goes only if empty. A parent that became
/// a link is left alone: nothing is followed.
fn remove(root: &Dir, replaced: &Dir, path: &Path) -> Result<(), InstallError> {
    let Some((parent, name)) = split(root.path(), path) else {
        return Ok(());
    };
    let dir = match root.open_dir(&parent) {
        Ok(dir) => dir,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) if beneath::is_link_refusal(&e) => {
            tracing::warn!(path = %path.display(), "not removed: a parent is now a symbolic link");
            return Ok(());
        }
        Err(e) => return Err(io(path)(e)),
    };
    let kept = kept_name(path);
    match dir.stat(name).map_err(io(path))? {
        Some((Kind::Dir, _)) => {
            dir.remove_empty_dir(name).map_err(io(path))?;
            return Ok(());
        }
        Some((Kind::Other, _)) => return Ok(()),
        _ => {}
    }
    match replaced.stat(OsStr::new(&kept)).map_err(io(path))? {
        Some((Kind::File, st)) => {
            let mut f = replaced.open_file(Path::new(&kept)).map_err(io(path))?;
            dir.write_atomic(
                name,
                &mut f,
                st.st_mode & 0o7777,
                Some((st.st_uid, st.st_gid)),
            )
            .map_err(io(path))?;
        }
        Some((Kind::Link, _)) => {
            let target = replaced.read_link(OsStr::new(&kept)).map_err(io(path))?;
            dir.symlink_atomic(name, &target).map_err(io(path))?;
        }
        _ => dir.remove_file(name).map_err(io(path))?,
    }
    Ok(())
}

/// Applies the AppSpec's `permissions` to what is installed under `root`.
pub fn apply_permissions(spec: &AppSpec, root: &Path) -> Result<(), InstallError> {
    let root_dir = Dir::open_trusted(root).map_err(io(root))?;
    for rule in &spec.permissions {
        apply_rule(rule, &root_dir)?;
    }
    Ok(())
}

/// What one permission rule sets.
struct Rule<'a> {
    rule: &'a Permission,
    pattern: globset::GlobMatcher,
    except: Vec<globset::GlobMatcher>,
    uid: Option<nix::unistd::Uid>,
    gid: Option<nix::unistd::Gid>,
}

impl Rule<'_> {
    fn err(&self, message: String) -> InstallError {
        InstallError::Permission {
            line: self.rule.line,
            message,
        }
    }

    fn applies(&self, rel: &Path, kind: ObjectType) -> bool {
        (self.rule.types.is_empty() || self.rule.types.contains(&kind))
            && (rel.as_os_str().is_empty()
                || (self.pattern.is_match(rel) && !self.except.iter().any(|e| e.is_match(rel))))
    }

    /// Sets mode and owner on an open file or directory.
    fn set(&self, fd: std::os::fd::BorrowedFd<'_>, path: &Path) -> Result<(), InstallError> {
        // Owner first: a chown clears the setuid and setgid bits a mode may set.
        if self.uid.is_some() || self.gid.is_some() {
            nix::unistd::fchown(fd, self.uid, self.gid)
                .map_err(|e| self.err(format!("chown {}: {e}", path.display())))?;
        }
        if let Some(mode) = self.rule.mode {
            nix::sys::stat::fchmod(fd, nix::sys::stat::Mode::from_bits_truncate(mode))
                .map_err(|e| self.err(format!("chmod {}: {e}", path.display())))?;
        }
        Ok(())
    }

    /// Applies the rule to `dir` (at `rel` below the object) and everything below it.
    fn walk(&self, dir: &Dir, rel: &Path) -> Result<(), InstallError> {
        if rel.components().count() > MAX_DEPTH {
            return Err(self.err(format!(
                "{} is more than {MAX_DEPTH} directories deep: refused",
                dir.path().display()
            )));
        }
        if self.applies(rel, ObjectType::Directory) {
            self.set(dir.fd(), dir.path())?;
        }
        for (name, kind) in dir.entries().map_err(io(dir.path()))? {
            let (path, r) = (dir.path().join(&name), rel.join(&name));
            match kind {
                Kind::Dir => {
                    let sub = dir.open_dir(Path::new(&name)).map_err(io(&path))?;
                    self.walk(&sub, &r)?;
                }
                Kind::File if self.applies(&r, ObjectType::File) => {
                    let f = dir.open_file(Path::new(&name)).map_err(io(&path))?;
                    self.refuse_hard_link(&f, &path)?;
                    use std::os::fd::AsFd;
                    self.set(f.as_fd(), &path)?;
                }
                _ => {} // links and special files are never changed
            }
        }
        Ok(())
    }

    /// A second name for a file elsewhere (a hard link the app user made) is refused:
    /// changing it would change the other file.
    fn refuse_hard_link(&self, f: &std::fs::File, path: &Path) -> Result<(), InstallError> {
        use std::os::unix::fs::MetadataExt;
        let links = f.metadata().map_err(io(path))?.nlink();
        if links > 1 {
            return Err(self.err(format!(
                "{} has {links} hard links: refused, changing it would change another file",
                path.display()
            )));
        }
        Ok(())
    }
}

fn apply_rule(rule: &Permission, root: &Dir) -> Result<(), InstallError> {
    let err = |message: String| InstallError::Permission {
        line: rule.line,
        message,
    };
    let glob = |p: &str| {
        globset::Glob::new(p)
            .map(|g| g.compile_matcher())
            .map_err(|e| err(format!("pattern `{p}`: {e}")))
    };
    let r = Rule {
        rule,
        pattern: glob(&rule.pattern)?,
        except: rule
            .except
            .iter()
            .map(|e| glob(e))
            .collect::<Result<_, _>>()?,
        uid: match &rule.owner {
            Some(name) => Some(
                nix::unistd::User::from_name(name)
                    .ok()
                    .flatten()
                    .ok_or_else(|| err(format!("owner `{name}` is not a user on this host")))?
                    .uid,
            ),
            None => None,
        },
        gid: match &rule.group {
            Some(name) => Some(
                nix::unistd::Group::from_name(name)
                    .ok()
                    .flatten()
                    .ok_or_else(|| err(format!("group `{name}` is not a group on this host")))?
                    .gid,
            ),
            None => None,
        },
    };
    let object = rooted(root.path(), &rule.object);
    let rel = beneath::relative(Path::new(rule.object.trim_start_matches('/')))
        .ok_or_else(|| err(format!("object `{}` leaves the install root", rule.object)))?;
    let refused = |e: io::Error| {
        if beneath::is_link_refusal(&e) {
            err(format!(
                "object `{}` is, or passes through, a symbolic link: refused, the agent never changes what a link points to",
                rule.object
            ))
        } else if e.kind() == io::ErrorKind::NotFound {
            err(format!(
                "object `{}` does not exist after Install",
                rule.object
            ))
        } else {
            io(&object)(e)
        }
    };
    let (parent, name) = match (rel.parent(), rel.file_name()) {
        (Some(p), Some(n)) => (p.to_path_buf(), n.to_os_string()),
        _ => return r.walk(root, Path::new("")),
    };
    let dir = root.open_dir(&parent).map_err(refused)?;
    match dir.stat(&name).map_err(refused)? {
        Some((Kind::Dir, _)) => {
            let top = dir.open_dir(Path::new(&name)).map_err(refused)?;
            r.walk(&top, Path::new(""))
        }
        Some((Kind::File, _)) => {
            if r.applies(Path::new(""), ObjectType::File) {
                let f = dir.open_file(Path::new(&name)).map_err(refused)?;
                r.refuse_hard_link(&f, &object)?;
                use std::os::fd::AsFd;
                r.set(f.as_fd(), &object)?;
            }
            Ok(())
        }
        Some((Kind::Link, _)) => Err(refused(io::Error::from_raw_os_error(nix::libc::ELOOP))),
        Some((Kind::Other, _)) => Ok(()),
        None => Err(refused(io::ErrorKind::NotFound.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::appspec;
    use std::os::unix::fs::PermissionsExt;

    /// Installs with the replaced files kept beside the destinations.
    fn put(
        plan: &InstallPlan,
        ours: &BTreeSet<PathBuf>,
    ) -> Result<BTreeSet<PathBuf>, InstallError> {
        let installed = install(plan, ours, &plan.root.join(".kept"))?;
        // As a deployment does once its state is written.
        prune_kept(&plan.root.join(".kept"), &installed)?;
        Ok(installed)
    }

    fn revision(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (path, text) in files {
            let p = dir.path().join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        dir
    }

    fn spec(extra: &str) -> AppSpec {
        appspec::parse(&format!(
            "version: 0.0\nos: linux\nfiles:\n  - source: /app\n    destination: /srv/app\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn installs_replaces_and_removes_what_the_previous_revision_left() {
        let root = tempfile::tempdir().unwrap();
        let v1 = revision(&[
            ("app/a.txt", "a1"),
            ("app/old/only-in-v1.txt", "x"),
            ("app/sub/b.txt", "b1"),
        ]);
        let v2 = revision(&[
            ("app/a.txt", "a2"),
            ("app/sub/b.txt", "b2"),
            ("app/new.txt", "n"),
        ]);
        let s = spec("");
        let first = put(&plan(v1.path(), &s, root.path()).unwrap(), &BTreeSet::new()).unwrap();
        let files = |set: &BTreeSet<PathBuf>| set.iter().filter(|p| p.is_file()).count();
        assert_eq!(files(&first), 3);
        assert_eq!(first.len(), 7, "and the directories made: {first:?}");
        let second = put(&plan(v2.path(), &s, root.path()).unwrap(), &first).unwrap();
        let srv = root.path().join("srv/app");
        assert_eq!(std::fs::read_to_string(srv.join("a.txt")).unwrap(), "a2");
        assert_eq!(std::fs::read_to_string(srv.join("new.txt")).unwrap(), "n");
        assert!(!srv.join("old/only-in-v1.txt").exists());
        assert!(!srv.join("old").exists(), "emptied directories go too");
        assert_eq!(files(&second), 3);
        assert!(second.contains(&root.path().join("srv")), "still ours");
        assert!(std::fs::read_dir(&srv).unwrap().all(|e| {
            !e.unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(".shoal-tmp")
        }));
    }

    #[test]
    fn disallow_names_the_conflicting_file_and_writes_nothing() {
        let root = tempfile::tempdir().unwrap();
        let srv = root.path().join("srv/app");
        std::fs::create_dir_all(&srv).unwrap();
        std::fs::write(srv.join("z-hand-made.txt"), "mine").unwrap();
        let v1 = revision(&[("app/a.txt", "a1"), ("app/z-hand-made.txt", "theirs")]);
        let err = put(
            &plan(v1.path(), &spec(""), root.path()).unwrap(),
            &BTreeSet::new(),
        )
        .unwrap_err();
        assert!(
            err.to_string().starts_with(&format!(
                "file_exists_behavior DISALLOW: {}",
                srv.join("z-hand-made.txt").display()
            )),
            "{err}"
        );
        assert!(
            !srv.join("a.txt").exists(),
            "nothing written before the conflict was found"
        );
        assert_eq!(
            std::fs::read_to_string(srv.join("z-hand-made.txt")).unwrap(),
            "mine"
        );
    }

    #[test]
    fn overwrite_and_retain() {
        for (behavior, expected) in [("OVERWRITE", "theirs"), ("RETAIN", "mine")] {
            let root = tempfile::tempdir().unwrap();
            let srv = root.path().join("srv/app");
            std::fs::create_dir_all(&srv).unwrap();
            std::fs::write(srv.join("conf"), "mine").unwrap();
            let v1 = revision(&[("app/conf", "theirs")]);
            let s = spec(&format!("file_exists_behavior: {behavior}\n"));
            let installed =
                put(&plan(v1.path(), &s, root.path()).unwrap(), &BTreeSet::new()).unwrap();
            assert_eq!(
                std::fs::read_to_string(srv.join("conf")).unwrap(),
                expected,
                "{behavior}"
            );
            assert_eq!(
                installed.contains(&srv.join("conf")),
                behavior == "OVERWRITE"
            );
        }
    }

    #[test]
    fn permissions_follow_pattern_except_and_type() {
        let root = tempfile::tempdir().unwrap();
        let v1 = revision(&[
            ("app/bin/run", "#!"),
            ("app/bin/README", "r"),
            ("app/data/x", "x"),
        ]);
        let s = spec(
            "permissions:\n  - object: /srv/app\n    pattern: \"bin/*\"\n    except: [bin/README]\n    mode: 750\n    type: [file]\n",
        );
        put(&plan(v1.path(), &s, root.path()).unwrap(), &BTreeSet::new()).unwrap();
        apply_permissions(&s, root.path()).unwrap();
        let mode = |p: &str| {
            std::fs::metadata(root.path().join("srv/app").join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("bin/run"), 0o750);
        assert_eq!(mode("bin/README"), 0o644);
        assert_eq!(mode("data/x"), 0o644);
        assert_ne!(mode("bin"), 0o750, "directories excluded by type");

        let bad = spec("permissions:\n  - object: /srv/app\n    owner: no-such-user-shoal\n");
        let err = apply_permissions(&bad, root.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("appspec.yml line 7: owner `no-such-user-shoal` is not a user"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_source_names_its_line() {
        let root = tempfile::tempdir().unwrap();
        let v1 = revision(&[("other/x", "x")]);
        let err = plan(v1.path(), &spec(""), root.path())
            .err()
            .unwrap()
            .to_string();
        assert_eq!(
            err,
            "appspec.yml line 4: files source `app` is not in the revision"
        );
    }

    /// The owner, mode and bytes of everything under `dir`, links not followed.
    fn fingerprint(dir: &Path) -> Vec<(PathBuf, u32, u32, Vec<u8>)> {
        use std::os::unix::fs::MetadataExt;
        let mut out = Vec::new();
        for e in walkdir::WalkDir::new(dir).sort_by_file_name() {
            let e = e.unwrap();
            let m = e.path().symlink_metadata().unwrap();
            let bytes = if m.is_file() {
                std::fs::read(e.path()).unwrap()
            } else {
                Vec::new()
            };
            out.push((e.path().to_path_buf(), m.mode(), m.uid(), bytes));
        }
        out
    }

    /// A tree outside the install root that nothing may change.
    fn sentinel() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(dir.path().join("etc/shadow"), "root:secret").unwrap();
        std::fs::set_permissions(
            dir.path().join("etc/shadow"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        dir
    }

    #[test]
    fn empty_directories_are_installed_and_go_with_the_revision_that_had_them() {
        let root = tempfile::tempdir().unwrap();
        let v1 = revision(&[("app/a.txt", "a")]);
        std::fs::create_dir_all(v1.path().join("app/logs")).unwrap();
        std::fs::create_dir_all(v1.path().join("app/tmp/uploads")).unwrap();
        let v2 = revision(&[("app/a.txt", "a")]);
        let s = spec("");
        let first = put(&plan(v1.path(), &s, root.path()).unwrap(), &BTreeSet::new()).unwrap();
        let srv = root.path().join("srv/app");
        assert!(srv.join("logs").is_dir() && srv.join("tmp/uploads").is_dir());
        // The app wrote a log: that directory stays, the empty ones go.
        std::fs::write(srv.join("logs/app.log"), "x").unwrap();
        put(&plan(v2.path(), &s, root.path()).unwrap(), &first).unwrap();
        assert!(
            !srv.join("tmp").exists(),
            "empty directories of v1 are removed"
        );
        assert_eq!(
            std::fs::read_to_string(srv.join("logs/app.log")).unwrap(),
            "x"
        );
    }

    #[test]
    fn overwrite_keeps_the_hosts_file_and_a_rollback_puts_it_back_byte_for_byte() {
        let root = tempfile::tempdir().unwrap();
        let srv = root.path().join("srv/app");
        std::fs::create_dir_all(&srv).unwrap();
        let original = b"user's own config\n\x00\xff".to_vec();
        std::fs::write(srv.join("conf"), &original).unwrap();
        std::fs::set_permissions(srv.join("conf"), std::fs::Permissions::from_mode(0o640)).unwrap();
        nix::unistd::chown(
            &srv.join("conf"),
            Some(nix::unistd::Uid::from_raw(4321)),
            None,
        )
        .ok();
        let before = fingerprint(&srv);
        let v1 = revision(&[("app/conf", "theirs")]);
        let s = spec("file_exists_behavior: OVERWRITE\n");
        let installed = put(&plan(v1.path(), &s, root.path()).unwrap(), &BTreeSet::new()).unwrap();
        assert_eq!(std::fs::read_to_string(srv.join("conf")).unwrap(), "theirs");
        // Rolled back to nothing (a first install that failed).
        put(&plan_nothing(root.path()), &installed).unwrap();
        let kept_left = std::fs::read_dir(root.path().join(".kept"))
            .unwrap()
            .count();
        std::fs::remove_dir(root.path().join(".kept")).unwrap();
        assert_eq!(
            fingerprint(&srv),
            before,
            "the user's file, mode and owner are back"
        );
        assert_eq!(kept_left, 0, "nothing kept once restored");
    }

    #[test]
    fn a_host_file_too_large_to_keep_is_refused_before_anything_is_written() {
        let root = tempfile::tempdir().unwrap();
        let srv = root.path().join("srv/app");
        std::fs::create_dir_all(&srv).unwrap();
        // Sparse: past the limit in size, nothing on disk.
        let huge = std::fs::File::create(srv.join("model.bin")).unwrap();
        huge.set_len(MAX_KEPT_BYTES + 1).unwrap();
        let v1 = revision(&[("app/a.txt", "a"), ("app/model.bin", "theirs")]);
        let s = spec("file_exists_behavior: OVERWRITE\n");
        let err = put(&plan(v1.path(), &s, root.path()).unwrap(), &BTreeSet::new()).unwrap_err();
        assert!(
            matches!(&err, InstallError::TooLargeToKeep { path, .. } if path == &srv.join("model.bin")),
            "{err}"
        );
        assert!(err.to_string().contains("move it away"), "{err}");
        assert!(!srv.join("a.txt").exists(), "nothing written");
        assert_eq!(
            std::fs::metadata(srv.join("model.bin")).unwrap().len(),
            MAX_KEPT_BYTES + 1
        );
    }

    #[test]
    fn a_permission_object_swapped_for_a_link_is_refused_and_nothing_outside_changes() {
        let outside = sentinel();
        let before = fingerprint(outside.path());
        let root = tempfile::tempdir().unwrap();
        let v1 = revision(&[("app/storage/x", "x")]);
        let s =
            spec("permissions:\n  - object: /srv/app/storage\n    owner: nobody\n    mode: 777\n");
        put(&plan(v1.path(), &s, root.path()).unwrap(), &BTreeSet::new()).unwrap();
        // The app user replaces storage with a link to /etc.
        let storage = root.path().join("srv/app/storage");
        std::fs::remove_dir_all(&storage).unwrap();
        std::os::unix::fs::symlink(outside.path().join("etc"), &storage).unwrap();
        let err = apply_permissions(&s, root.path()).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        // And a link one level up, then a hard link to a file outside.
        std::fs::remove_file(&storage).unwrap();
        let app = root.path().join("srv/app");
        std::fs::rename(&app, root.path().join("srv/app-real")).unwrap();
        std::os::unix::fs::symlink(outside.path(), &app).unwrap();
        let err = apply_permissions(&s, root.path()).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        std::fs::remove_file(&app).unwrap();
        std::fs::rename(root.path().join("srv/app-real"), &app).unwrap();
        std::fs::create_dir(&storage).unwrap();
        // Both temporary directories are in the same place, so on one filesystem.
        std::fs::hard_link(outside.path().join("etc/shadow"), storage.join("shadow"))
            .expect("a hard link between two temporary directories");
        let err = apply_permissions(&s, root.path()).unwrap_err().to_string();
        assert!(err.contains("hard links"), "{err}");
        assert_eq!(
            fingerprint(outside.path()),
            before,
            "nothing outside changed"
        );
    }

    #[test]
    fn planted_links_at_parents_and_temporary_names_are_never_followed() {
        let outside = sentinel();
        let before = fingerprint(outside.path());
        let root = tempfile::tempdir().unwrap();
        let v1 = revision(&[("app/conf/a.conf", "a1"), ("app/b.txt", "b1")]);
        let v2 = revision(&[("app/conf/a.conf", "a2"), ("app/b.txt", "b2")]);
        let s = spec("file_exists_behavior: OVERWRITE\n");
        let first = put(&plan(v1.path(), &s, root.path()).unwrap(), &BTreeSet::new()).unwrap();
        let srv = root.path().join("srv/app");
        // Links at every temporary name an attacker might guess, pointing outside.
        for name in [
            format!(".shoal-tmp-{}", std::process::id()),
            ".shoal-tmp-0".to_string(),
            ".shoal-tmp-".to_string(),
        ] {
            for at in [srv.join(&name), srv.join("conf").join(&name)] {
                std::os::unix::fs::symlink(outside.path().join("etc/shadow"), &at).unwrap();
                // Left by an interrupted write long ago, as far as the cleaner can tell.
                let long_ago = nix::sys::time::TimeSpec::new(1_000_000_000, 0);
                nix::sys::stat::utimensat(
                    nix::fcntl::AT_FDCWD,
                    &at,
                    &long_ago,
                    &long_ago,
                    nix::sys::stat::UtimensatFlags::NoFollowSymlink,
                )
                .unwrap();
            }
        }
        let second = put(&plan(v2.path(), &s, root.path()).unwrap(), &first).unwrap();
        assert_eq!(std::fs::read_to_string(srv.join("b.txt")).unwrap(), "b2");
        assert_eq!(
            std::fs::read_to_string(srv.join("conf/a.conf")).unwrap(),
            "a2"
        );
        assert!(
            std::fs::read_dir(&srv).unwrap().all(|e| !e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(".shoal-tmp")),
            "planted temporaries are cleaned, as links"
        );
        // A directory of ours replaced by a link between two deployments: the link is
        // removed, not followed, and a real directory made in its place.
        std::fs::remove_dir_all(srv.join("conf")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("etc"), srv.join("conf")).unwrap();
        let third = put(&plan(v1.path(), &s, root.path()).unwrap(), &second).unwrap();
        assert!(!srv.join("conf").is_symlink());
        assert_eq!(
            std::fs::read_to_string(srv.join("conf/a.conf")).unwrap(),
            "a1"
        );
        // The host's own directory (not ours) replaced by a link: refused.
        std::fs::create_dir_all(srv.join("data")).unwrap();
        let v3 = revision(&[("app/data/d.bin", "d")]);
        std::fs::remove_dir(srv.join("data")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("etc"), srv.join("data")).unwrap();
        let err = put(&plan(v3.path(), &s, root.path()).unwrap(), &third).unwrap_err();
        assert!(matches!(err, InstallError::Link { .. }), "{err}");
        assert!(err.to_string().contains("symbolic link"), "{err}");
        // A parent above a file (not a directory of the revision) made a link.
        std::fs::remove_file(srv.join("data")).unwrap();
        let v4 = revision(&[("x.conf", "x")]);
        let s4 = appspec::parse(
            "version: 0.0\nos: linux\nfiles:\n  - source: /x.conf\n    destination: /srv/app/data/deep\n",
        )
        .unwrap();
        std::os::unix::fs::symlink(outside.path().join("etc"), srv.join("data")).unwrap();
        let err = put(&plan(v4.path(), &s4, root.path()).unwrap(), &third).unwrap_err();
        assert!(matches!(err, InstallError::Link { .. }), "{err}");
        // Rolled back to nothing over the links: their targets are not touched.
        put(&plan_nothing(root.path()), &third).unwrap();
        assert_eq!(
            fingerprint(outside.path()),
            before,
            "nothing outside changed"
        );
    }

    #[test]
    fn a_permission_object_too_deep_is_refused_not_walked_to_the_end() {
        let root = tempfile::tempdir().unwrap();
        let v1 = revision(&[("app/a", "a")]);
        let s = spec("permissions:\n  - object: /srv/app\n    mode: 755\n");
        put(&plan(v1.path(), &s, root.path()).unwrap(), &BTreeSet::new()).unwrap();
        let mut deep = root.path().join("srv/app");
        for _ in 0..(MAX_DEPTH + 2) {
            deep.push("d");
        }
        std::fs::create_dir_all(&deep).unwrap();
        let err = apply_permissions(&s, root.path()).unwrap_err().to_string();
        assert!(err.contains("directories deep"), "{err}");
    }

    #[test]
    fn a_destination_that_climbs_is_refused_with_its_line() {
        let err = appspec::parse(
            "version: 0.0\nos: linux\nfiles:\n  - source: /app\n    destination: /srv/../etc\n",
        )
        .unwrap()
        .deployable()
        .unwrap_err()
        .to_string();
        assert!(err.contains("line 5") && err.contains("climbs"), "{err}");
    }
}
