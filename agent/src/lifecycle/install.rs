//! Install: the revision's files copied to their destinations per the AppSpec's `files`,
//! `file_exists_behavior` honoured, files the previous revision installed and this one does
//! not removed, and `permissions` applied.
//!
//! Every conflict is found before anything is written, so a DISALLOW refusal leaves the
//! host untouched. Each file is replaced atomically (written beside its destination, then
//! renamed), so a crash leaves every file either old or new; the journal (see `run.rs`)
//! then brings the whole host back to one revision. Destinations are rooted under the
//! agent's `install_root` (`/` in production), so several agents on one machine do not
//! trample each other.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::appspec::{AppSpec, FileExistsBehavior, ObjectType, Permission};

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
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `destination` (absolute, from the AppSpec) under `root`.
pub fn rooted(root: &Path, destination: &str) -> PathBuf {
    root.join(destination.trim_start_matches('/'))
}

/// One file (or symbolic link) to put in place.
struct Copy {
    from: PathBuf,
    to: PathBuf,
    behavior: FileExistsBehavior,
}

/// What Install will write, worked out before writing anything.
pub struct InstallPlan {
    copies: Vec<Copy>,
}

impl InstallPlan {
    /// Refuses the install if a destination exists, is not `ours`, and the behavior is
    /// DISALLOW. Call before journaling, so a refused file never counts as ours.
    pub fn check_conflicts(&self, ours: &BTreeSet<PathBuf>) -> Result<(), InstallError> {
        for c in &self.copies {
            if self.foreign(c, ours) && c.behavior == FileExistsBehavior::Disallow {
                return Err(InstallError::Conflict { path: c.to.clone() });
            }
        }
        Ok(())
    }

    /// Every path this install will write given what is `ours`: the journal records them.
    /// A foreign file kept by RETAIN is not among them.
    pub fn writes(&self, ours: &BTreeSet<PathBuf>) -> BTreeSet<PathBuf> {
        self.copies
            .iter()
            .filter(|c| !(self.foreign(c, ours) && c.behavior == FileExistsBehavior::Retain))
            .map(|c| c.to.clone())
            .collect()
    }

    fn foreign(&self, c: &Copy, ours: &BTreeSet<PathBuf>) -> bool {
        std::fs::symlink_metadata(&c.to).is_ok() && !ours.contains(&c.to)
    }
}

/// Works out the copies for a revision rooted at `revision`.
pub fn plan(revision: &Path, spec: &AppSpec, root: &Path) -> Result<InstallPlan, InstallError> {
    // Later mappings win for the same destination, as in CodeDeploy.
    let mut copies: BTreeMap<PathBuf, Copy> = BTreeMap::new();
    for mapping in &spec.files {
        let behavior = mapping
            .file_exists_behavior
            .unwrap_or(spec.file_exists_behavior);
        let source = revision.join(&mapping.source);
        let meta = std::fs::symlink_metadata(&source).map_err(|_| InstallError::MissingSource {
            source_path: mapping.source.clone(),
            line: mapping.line,
        })?;
        let dest = rooted(root, &mapping.destination);
        if meta.is_dir() {
            for entry in walkdir::WalkDir::new(&source)
                .follow_links(false)
                .sort_by_file_name()
                .min_depth(1)
            {
                let entry = entry.map_err(|e| InstallError::Io {
                    path: source.clone(),
                    source: e.into(),
                })?;
                if entry.file_type().is_dir() {
                    continue;
                }
                let rel = entry.path().strip_prefix(&source).expect("under source");
                let to = dest.join(rel);
                copies.insert(
                    to.clone(),
                    Copy {
                        from: entry.path().to_path_buf(),
                        to,
                        behavior,
                    },
                );
            }
        } else {
            let to = dest.join(source.file_name().expect("a file has a name"));
            copies.insert(
                to.clone(),
                Copy {
                    from: source,
                    to,
                    behavior,
                },
            );
        }
    }
    Ok(InstallPlan {
        copies: copies.into_values().collect(),
    })
}

/// A plan that installs nothing: carried out, it removes every file that is ours.
pub fn plan_nothing() -> InstallPlan {
    InstallPlan { copies: Vec::new() }
}

/// Fault injection for crash tests: `SHOAL_FAULT_SLOW_INSTALL_MS` pauses after every file
/// copied, so a test can kill the process in the middle of Install. Unset in production.
fn fault_delay() -> Option<std::time::Duration> {
    let ms = std::env::var("SHOAL_FAULT_SLOW_INSTALL_MS")
        .ok()?
        .parse()
        .ok()?;
    Some(std::time::Duration::from_millis(ms))
}

/// Carries out `plan`. `ours` are the files this host's deployments installed (the
/// previous revision's, and any an interrupted install wrote): they may be replaced or
/// removed freely. Returns the files now installed.
pub fn install(
    plan: &InstallPlan,
    ours: &BTreeSet<PathBuf>,
) -> Result<BTreeSet<PathBuf>, InstallError> {
    // 1. Conflicts, before any write.
    plan.check_conflicts(ours)?;
    // 2. Copies.
    let delay = fault_delay();
    let mut installed = BTreeSet::new();
    for c in &plan.copies {
        let exists = std::fs::symlink_metadata(&c.to).is_ok();
        if exists && !ours.contains(&c.to) && c.behavior == FileExistsBehavior::Retain {
            continue;
        }
        put(&c.from, &c.to)?;
        installed.insert(c.to.clone());
        if let Some(delay) = delay {
            std::thread::sleep(delay);
        }
    }
    // 3. What the previous revision installed and this one does not.
    for stale in ours.difference(&installed) {
        if plan.copies.iter().any(|c| &c.to == stale) {
            continue; // retained
        }
        match std::fs::remove_file(stale) {
            Ok(()) => remove_empty_parents(stale),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(InstallError::Io {
                    path: stale.clone(),
                    source: e,
                });
            }
        }
    }
    Ok(installed)
}

/// Copies one file or symbolic link into place atomically.
fn put(from: &Path, to: &Path) -> Result<(), InstallError> {
    let parent = to.parent().expect("a destination has a parent");
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let tmp = parent.join(format!(".shoal-tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let meta = std::fs::symlink_metadata(from).map_err(io(from))?;
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(from).map_err(io(from))?;
        std::os::unix::fs::symlink(&target, &tmp).map_err(io(&tmp))?;
    } else {
        std::fs::copy(from, &tmp).map_err(io(from))?;
        std::fs::set_permissions(
            &tmp,
            std::fs::Permissions::from_mode(meta.permissions().mode() & 0o777),
        )
        .map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, to).map_err(io(to))
}

fn remove_empty_parents(path: &Path) {
    let mut dir = path.parent();
    while let Some(d) = dir {
        if std::fs::remove_dir(d).is_err() {
            break; // not empty, or not ours to remove
        }
        dir = d.parent();
    }
}

/// Applies the AppSpec's `permissions` to what is installed under `root`.
pub fn apply_permissions(spec: &AppSpec, root: &Path) -> Result<(), InstallError> {
    for rule in &spec.permissions {
        apply_rule(rule, root)?;
    }
    Ok(())
}

fn apply_rule(rule: &Permission, root: &Path) -> Result<(), InstallError> {
    let err = |message: String| InstallError::Permission {
        line: rule.line,
        message,
    };
    let glob = |p: &str| {
        globset::Glob::new(p)
            .map(|g| g.compile_matcher())
            .map_err(|e| err(format!("pattern `{p}`: {e}")))
    };
    let pattern = glob(&rule.pattern)?;
    let except: Vec<globset::GlobMatcher> = rule
        .except
        .iter()
        .map(|e| glob(e))
        .collect::<Result<_, _>>()?;
    let uid = match &rule.owner {
        Some(name) => Some(
            nix::unistd::User::from_name(name)
                .ok()
                .flatten()
                .ok_or_else(|| err(format!("owner `{name}` is not a user on this host")))?
                .uid,
        ),
        None => None,
    };
    let gid = match &rule.group {
        Some(name) => Some(
            nix::unistd::Group::from_name(name)
                .ok()
                .flatten()
                .ok_or_else(|| err(format!("group `{name}` is not a group on this host")))?
                .gid,
        ),
        None => None,
    };
    let object = rooted(root, &rule.object);
    if !object.exists() {
        return Err(err(format!(
            "object `{}` does not exist after Install",
            rule.object
        )));
    }
    for entry in walkdir::WalkDir::new(&object).follow_links(false) {
        let entry = entry.map_err(|e| InstallError::Io {
            path: object.clone(),
            source: e.into(),
        })?;
        let t = entry.file_type();
        if t.is_symlink() {
            continue;
        }
        let kind = if t.is_dir() {
            ObjectType::Directory
        } else {
            ObjectType::File
        };
        if !rule.types.is_empty() && !rule.types.contains(&kind) {
            continue;
        }
        let rel = entry.path().strip_prefix(&object).expect("under object");
        if !rel.as_os_str().is_empty()
            && (!pattern.is_match(rel) || except.iter().any(|e| e.is_match(rel)))
        {
            continue;
        }
        if let Some(mode) = rule.mode {
            std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(mode))
                .map_err(io(entry.path()))?;
        }
        if uid.is_some() || gid.is_some() {
            nix::unistd::chown(entry.path(), uid, gid)
                .map_err(|e| err(format!("chown {}: {e}", entry.path().display())))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::appspec;

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
        let first = install(&plan(v1.path(), &s, root.path()).unwrap(), &BTreeSet::new()).unwrap();
        assert_eq!(first.len(), 3);
        let second = install(&plan(v2.path(), &s, root.path()).unwrap(), &first).unwrap();
        let srv = root.path().join("srv/app");
        assert_eq!(std::fs::read_to_string(srv.join("a.txt")).unwrap(), "a2");
        assert_eq!(std::fs::read_to_string(srv.join("new.txt")).unwrap(), "n");
        assert!(!srv.join("old/only-in-v1.txt").exists());
        assert!(!srv.join("old").exists(), "emptied directories go too");
        assert_eq!(second.len(), 3);
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
        let err = install(
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
                install(&plan(v1.path(), &s, root.path()).unwrap(), &BTreeSet::new()).unwrap();
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
        install(&plan(v1.path(), &s, root.path()).unwrap(), &BTreeSet::new()).unwrap();
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
}
