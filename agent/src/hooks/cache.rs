//! Compiled hooks cached on disk, so a hook is compiled once per host and engine, not once
//! per run. An entry's file name is the SHA-256 of the Wasm it was compiled from and a hash
//! of the engine's compatibility key (wasmtime version, target, settings): a new agent
//! version or a changed setting never loads stale machine code, it compiles afresh.
//!
//! An entry is native code the agent will execute, so nothing in it is believed until it is
//! checked (docs/decisions/0016-hook-cache-and-bounds.md):
//! - The directory is opened once, without following a link, and must belong to the agent's
//!   user and not be writable by group or others; otherwise the disk cache is not used at
//!   all (every load compiles).
//! - Every entry is opened through that handle with `O_NOFOLLOW | O_NONBLOCK` and must be a
//!   regular file with one link, owned by the agent's user, not writable by group or others
//!   and no larger than [`MAX_ENTRY_BYTES`]. It is read whole into memory (so it cannot
//!   change after the check) and carries an HMAC-SHA256 tag over its name and content, made
//!   with a 32-byte key (`hmac.key`, 0600) that the agent creates in the directory on first
//!   use. Only an entry whose tag verifies is handed to wasmtime's `deserialize`.
//! - An entry that fails any check is refused with a [`CacheRefusal`] (logged), removed, and
//!   the hook is compiled again.
//! - Entries are written to a temporary file with a random name (`O_CREAT | O_EXCL |
//!   O_NOFOLLOW`, 0600), fsynced, renamed into place and the directory fsynced: a crash
//!   leaves no half entry, and a leftover temporary file is removed by a later open.

use std::fs::File;
use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::Result;
use nix::errno::Errno;
use nix::fcntl::{OFlag, RenameFlags};
use nix::sys::stat::Mode;
use nix::unistd::UnlinkatFlags;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use serde::Serialize;
use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// What a Wasm file holds, from its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WasmKind {
    Component,
    CoreModule,
}

impl WasmKind {
    pub fn detect(bytes: &[u8]) -> Result<WasmKind> {
        if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
            anyhow::bail!("not a WebAssembly file (it does not start with the `\\0asm` header)");
        }
        match bytes[4..8] {
            [1, 0, 0, 0] => Ok(WasmKind::CoreModule),
            [0x0d, 0, 1, 0] => Ok(WasmKind::Component),
            _ => anyhow::bail!(
                "unsupported WebAssembly binary version {:02x?}",
                &bytes[4..8]
            ),
        }
    }
}

/// Code ready to instantiate.
pub enum Compiled {
    Component(Component),
    Module(wasmtime::Module),
}

/// Where a hook's compiled code came from on this run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CacheStatus {
    /// Compiled now (and stored for next time).
    Compiled,
    /// Loaded from the on-disk cache: nothing compiled.
    Disk,
    /// Already loaded in this process: nothing compiled or read.
    Memory,
}

impl CacheStatus {
    /// Its name, as `--json` and `/metrics` show it.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Compiled => "compiled",
            CacheStatus::Disk => "disk",
            CacheStatus::Memory => "memory",
        }
    }
}

/// Why the cache refused its directory or one of its files.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CacheRefusal {
    #[error("it is a symbolic link, which the cache never follows")]
    Symlink,
    #[error("it is not a regular file")]
    NotAFile,
    #[error("it is not a directory")]
    NotADirectory,
    #[error("it is owned by uid {uid}, not by this agent's uid {agent}")]
    Owner { uid: u32, agent: u32 },
    #[error("its mode {mode:04o} lets someone other than its owner {what} it")]
    Mode { mode: u32, what: &'static str },
    #[error("it has {links} hard links; a cache file has one")]
    HardLinks { links: u64 },
    #[error("it is {size} bytes, over the limit of {limit}")]
    TooLarge { size: u64, limit: u64 },
    #[error("it is not a Shoal cache entry (no header)")]
    NotAnEntry,
    #[error("its authentication tag does not verify: this agent did not write it for this module")]
    BadTag,
    #[error("wasmtime cannot use it: {message}")]
    Unusable { message: String },
    #[error("{message}")]
    Io { message: String },
}

/// The largest entry read back; a larger file is refused before it is read.
pub const MAX_ENTRY_BYTES: u64 = 1 << 30;
/// Entries begin with this, then the tag, then wasmtime's serialized code.
const MAGIC: &[u8; 8] = b"SHOALHC1";
const TAG_LEN: usize = 32;
/// The HMAC key's file in the cache directory, and its length.
const KEY_FILE: &str = "hmac.key";
const KEY_LEN: usize = 32;
/// Temporary files (entries and keys being written) start with this.
const TMP_PREFIX: &str = ".tmp-";
/// A temporary file older than this is a crashed writer's, and is removed at open.
const TMP_STALE: Duration = Duration::from_secs(3600);

/// The on-disk cache of compiled hooks.
pub struct CompileCache {
    /// `None`: the directory could not be trusted; nothing is read or written.
    store: Option<Store>,
    engine_key: String,
}

/// The cache directory, checked, and its key.
struct Store {
    dir: File,
    key: hmac::Key,
}

impl CompileCache {
    /// Opens (creating if need be) the cache in `dir`. A directory that cannot be trusted
    /// (a link, not the agent's, writable by others) or used is reported once and the cache
    /// is then off: every load compiles, nothing is read from or written to it.
    pub fn open(dir: &Path, engine: &Engine) -> Self {
        let store = match Store::open(dir) {
            Ok(store) => Some(store),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), "the compiled-hook cache is off (every hook is compiled when loaded): {e}");
                None
            }
        };
        CompileCache {
            store,
            engine_key: engine_key(engine),
        }
    }

    /// Whether entries are read and written.
    #[cfg(test)]
    fn enabled(&self) -> bool {
        self.store.is_some()
    }

    /// An entry's file name.
    pub fn entry_name(&self, sha256: &str) -> String {
        format!("{sha256}-{}.cwasm", self.engine_key)
    }

    /// The stored compiled form of the module whose SHA-256 is `sha256`: `Ok(None)` when
    /// there is none (or the cache is off), `Err` when there was one and it was refused, in
    /// which case it has been removed.
    pub fn fetch(
        &self,
        engine: &Engine,
        kind: WasmKind,
        sha256: &str,
    ) -> Result<Option<(Compiled, usize)>, CacheRefusal> {
        let Some(store) = &self.store else {
            return Ok(None);
        };
        let name = self.entry_name(sha256);
        let result = store.fetch(engine, kind, &name);
        if let Err(refusal) = &result {
            tracing::warn!(entry = %name, "refused a compiled-hook cache entry, compiling the hook again: {refusal}");
            if let Err(e) =
                nix::unistd::unlinkat(&store.dir, name.as_str(), UnlinkatFlags::NoRemoveDir)
                && e != Errno::ENOENT
            {
                tracing::warn!(entry = %name, "cannot remove the refused cache entry: {e}");
            }
        }
        result
    }

    /// Stores compiled code for the module whose SHA-256 is `sha256` (nothing when the cache
    /// is off).
    pub fn store(&self, sha256: &str, serialized: &[u8]) -> std::io::Result<()> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        if (MAGIC.len() + TAG_LEN + serialized.len()) as u64 > MAX_ENTRY_BYTES {
            return Err(std::io::Error::other(format!(
                "the compiled code ({} bytes) is larger than an entry may be",
                serialized.len()
            )));
        }
        let name = self.entry_name(sha256);
        let tag = store.tag(&name, serialized);
        store.write_new(&name, |f| {
            f.write_all(MAGIC)?;
            f.write_all(tag.as_ref())?;
            f.write_all(serialized)
        })
    }
}

impl Store {
    fn open(path: &Path) -> Result<Store, CacheRefusal> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| CacheRefusal::Io {
                message: format!("creating {}: {e}", parent.display()),
            })?;
        }
        match std::fs::DirBuilder::new().mode(0o700).create(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(CacheRefusal::Io {
                    message: format!("creating {}: {e}", path.display()),
                });
            }
        }
        let dir = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::ELOOP => CacheRefusal::Symlink,
            // With `O_DIRECTORY`, a link is reported as "not a directory"; which it was is
            // looked up for the message only (nothing is opened by it).
            Errno::ENOTDIR if std::fs::symlink_metadata(path).is_ok_and(|m| m.is_symlink()) => {
                CacheRefusal::Symlink
            }
            Errno::ENOTDIR => CacheRefusal::NotADirectory,
            e => CacheRefusal::Io {
                message: format!("opening {}: {e}", path.display()),
            },
        })?;
        let dir = File::from(dir);
        let meta = dir.metadata().map_err(io_refusal)?;
        check_owner_and_mode(&meta, 0o022, "write")?;
        let mut store = Store {
            key: hmac::Key::new(hmac::HMAC_SHA256, &[0; KEY_LEN]),
            dir,
        };
        store.key = store.load_or_make_key()?;
        store.remove_stale_temporaries();
        Ok(store)
    }

    /// The directory's key: read if it is there and sound, otherwise made (replacing an
    /// unsound one, after which every entry made with it is refused and compiled again).
    fn load_or_make_key(&self) -> Result<hmac::Key, CacheRefusal> {
        for _ in 0..3 {
            match self.open_checked(KEY_FILE, KEY_LEN as u64, 0o077, "read or write") {
                Ok(Some(f)) => {
                    let mut key = Vec::with_capacity(KEY_LEN);
                    f.take(KEY_LEN as u64)
                        .read_to_end(&mut key)
                        .map_err(io_refusal)?;
                    if key.len() == KEY_LEN {
                        return Ok(hmac::Key::new(hmac::HMAC_SHA256, &key));
                    }
                    tracing::warn!(
                        "the hook cache's key is {} bytes, not {KEY_LEN}: replacing it",
                        key.len()
                    );
                    self.remove(KEY_FILE);
                }
                Ok(None) => {
                    let mut key = [0u8; KEY_LEN];
                    SystemRandom::new()
                        .fill(&mut key)
                        .map_err(|_| CacheRefusal::Io {
                            message: "no randomness for the cache key".into(),
                        })?;
                    match self.write_new_exclusive(KEY_FILE, |f| f.write_all(&key)) {
                        Ok(()) => return Ok(hmac::Key::new(hmac::HMAC_SHA256, &key)),
                        // Another process made one first: use theirs.
                        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                        Err(e) => return Err(io_refusal(e)),
                    }
                }
                Err(CacheRefusal::Io { message }) => return Err(CacheRefusal::Io { message }),
                Err(refusal) => {
                    tracing::warn!(
                        "the hook cache's key file is refused, making a new key: {refusal}"
                    );
                    self.remove(KEY_FILE);
                }
            }
        }
        Err(CacheRefusal::Io {
            message: "the cache key kept changing while it was read".into(),
        })
    }

    /// Opens `name` in the directory for reading, without following a link or blocking on
    /// a FIFO, and checks it: a regular file with one link, the agent's, at most `limit`
    /// bytes, with none of `forbidden` mode bits. `Ok(None)`: no such file.
    fn open_checked(
        &self,
        name: &str,
        limit: u64,
        forbidden: u32,
        what: &'static str,
    ) -> Result<Option<File>, CacheRefusal> {
        let fd = match nix::fcntl::openat(
            &self.dir,
            name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(None),
            Err(Errno::ELOOP) => return Err(CacheRefusal::Symlink),
            Err(e) => {
                return Err(CacheRefusal::Io {
                    message: format!("opening {name}: {e}"),
                });
            }
        };
        let f = File::from(fd);
        let meta = f.metadata().map_err(io_refusal)?;
        if !meta.file_type().is_file() {
            return Err(CacheRefusal::NotAFile);
        }
        check_owner_and_mode(&meta, forbidden, what)?;
        if meta.nlink() != 1 {
            return Err(CacheRefusal::HardLinks {
                links: meta.nlink(),
            });
        }
        if meta.len() > limit {
            return Err(CacheRefusal::TooLarge {
                size: meta.len(),
                limit,
            });
        }
        Ok(Some(f))
    }

    fn fetch(
        &self,
        engine: &Engine,
        kind: WasmKind,
        name: &str,
    ) -> Result<Option<(Compiled, usize)>, CacheRefusal> {
        let Some(f) = self.open_checked(name, MAX_ENTRY_BYTES, 0o022, "write")? else {
            return Ok(None);
        };
        let mut bytes = Vec::new();
        f.take(MAX_ENTRY_BYTES)
            .read_to_end(&mut bytes)
            .map_err(io_refusal)?;
        let Some(rest) = bytes.strip_prefix(MAGIC) else {
            return Err(CacheRefusal::NotAnEntry);
        };
        if rest.len() < TAG_LEN {
            return Err(CacheRefusal::NotAnEntry);
        }
        let (tag, code) = rest.split_at(TAG_LEN);
        hmac::verify(&self.entry_key(name), code, tag).map_err(|_| CacheRefusal::BadTag)?;
        // SAFETY: `code` is in memory, so it cannot change after this check: its tag verifies
        // under the key only this agent's user can read, over this entry's name, which binds
        // it to the module's SHA-256 and this engine's compatibility key. So this agent wrote
        // it, from what this engine compiled for this very module. wasmtime checks its
        // header again.
        let compiled =
            unsafe { deserialize(engine, kind, code) }.map_err(|e| CacheRefusal::Unusable {
                message: format!("{e:#}"),
            })?;
        Ok(Some((compiled, code.len())))
    }

    /// An entry's own key, derived from the directory's key and the entry's name, so an
    /// entry renamed to another module's name does not verify.
    fn entry_key(&self, name: &str) -> hmac::Key {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(b"shoal hook cache entry\0");
        ctx.update(name.as_bytes());
        hmac::Key::new(hmac::HMAC_SHA256, ctx.sign().as_ref())
    }

    fn tag(&self, name: &str, code: &[u8]) -> hmac::Tag {
        hmac::sign(&self.entry_key(name), code)
    }

    /// Writes `name` through a fresh temporary file, replacing what was there.
    fn write_new(
        &self,
        name: &str,
        write: impl FnOnce(&mut File) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        self.write_via_temporary(name, write, RenameFlags::empty())
    }

    /// Writes `name` through a fresh temporary file, failing with `AlreadyExists` if it
    /// appeared meanwhile.
    fn write_new_exclusive(
        &self,
        name: &str,
        write: impl FnOnce(&mut File) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        self.write_via_temporary(name, write, RenameFlags::RENAME_NOREPLACE)
    }

    fn write_via_temporary(
        &self,
        name: &str,
        write: impl FnOnce(&mut File) -> std::io::Result<()>,
        flags: RenameFlags,
    ) -> std::io::Result<()> {
        let mut random = [0u8; 12];
        SystemRandom::new()
            .fill(&mut random)
            .map_err(|_| std::io::Error::other("no randomness for a temporary name"))?;
        let tmp = format!("{TMP_PREFIX}{}", hex::encode(random));
        let fd = nix::fcntl::openat(
            &self.dir,
            tmp.as_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )?;
        let mut f = File::from(fd);
        let written = write(&mut f).and_then(|()| f.sync_all()).and_then(|()| {
            nix::fcntl::renameat2(&self.dir, tmp.as_str(), &self.dir, name, flags)
                .map_err(std::io::Error::from)
        });
        if let Err(e) = written {
            self.remove(&tmp);
            return Err(e);
        }
        nix::unistd::fsync(self.dir.as_fd()).map_err(std::io::Error::from)
    }

    /// Removes `name` from the directory (a link itself, never what it points to).
    fn remove(&self, name: &str) {
        if let Err(e) = nix::unistd::unlinkat(&self.dir, name, UnlinkatFlags::NoRemoveDir)
            && e != Errno::ENOENT
        {
            tracing::warn!(file = name, "cannot remove from the hook cache: {e}");
        }
    }

    /// Removes temporary files a crashed writer left (those older than [`TMP_STALE`]; a
    /// younger one may be another process's write in progress).
    fn remove_stale_temporaries(&self) {
        use std::os::fd::AsRawFd;
        // The directory's own listing, through its handle.
        let listing = format!("/proc/self/fd/{}", self.dir.as_raw_fd());
        let Ok(entries) = std::fs::read_dir(listing) else {
            return;
        };
        let now = SystemTime::now();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str().filter(|n| n.starts_with(TMP_PREFIX)) else {
                continue;
            };
            let Ok(stat) =
                nix::sys::stat::fstatat(&self.dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
            else {
                continue;
            };
            let modified =
                SystemTime::UNIX_EPOCH + Duration::from_secs(stat.st_mtime.max(0) as u64);
            if now.duration_since(modified).unwrap_or_default() > TMP_STALE {
                self.remove(name);
            }
        }
    }
}

/// The agent's user must own it, and no one else may do `what` (mode bits `forbidden`).
fn check_owner_and_mode(
    meta: &std::fs::Metadata,
    forbidden: u32,
    what: &'static str,
) -> Result<(), CacheRefusal> {
    let agent = nix::unistd::geteuid().as_raw();
    if meta.uid() != agent {
        return Err(CacheRefusal::Owner {
            uid: meta.uid(),
            agent,
        });
    }
    if meta.mode() & forbidden != 0 {
        return Err(CacheRefusal::Mode {
            mode: meta.mode() & 0o7777,
            what,
        });
    }
    Ok(())
}

fn io_refusal(e: std::io::Error) -> CacheRefusal {
    CacheRefusal::Io {
        message: e.to_string(),
    }
}

/// Compiles Wasm of the given kind to this engine's serialized form.
pub fn compile(engine: &Engine, kind: WasmKind, bytes: &[u8]) -> Result<Vec<u8>> {
    match kind {
        WasmKind::Component => engine.precompile_component(bytes),
        WasmKind::CoreModule => engine.precompile_module(bytes),
    }
    .map_err(anyhow::Error::from)
}

/// Loads compiled code of the given kind.
///
/// # Safety
/// The code must have been produced by `engine` (see [`wasmtime::Module::deserialize`]).
pub unsafe fn deserialize(
    engine: &Engine,
    kind: WasmKind,
    code: &[u8],
) -> wasmtime::Result<Compiled> {
    // SAFETY: passed on from the caller.
    unsafe {
        Ok(match kind {
            WasmKind::Component => Compiled::Component(Component::deserialize(engine, code)?),
            WasmKind::CoreModule => Compiled::Module(wasmtime::Module::deserialize(engine, code)?),
        })
    }
}

/// A stable hex digest of the engine's compatibility key.
fn engine_key(engine: &Engine) -> String {
    struct ShaHasher(Sha256);
    impl Hasher for ShaHasher {
        fn finish(&self) -> u64 {
            unreachable!("only the digest is read")
        }
        fn write(&mut self, bytes: &[u8]) {
            self.0.update(bytes);
        }
    }
    let mut h = ShaHasher(Sha256::new());
    engine.precompile_compatibility_hash().hash(&mut h);
    hex::encode(&h.0.finalize()[..8])
}

/// Hex SHA-256 of some bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn headers_are_told_apart() {
        assert_eq!(
            WasmKind::detect(b"\0asm\x01\0\0\0").unwrap(),
            WasmKind::CoreModule
        );
        assert_eq!(
            WasmKind::detect(b"\0asm\x0d\0\x01\0").unwrap(),
            WasmKind::Component
        );
        let err = WasmKind::detect(b"#!/bin/sh\necho hi\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a WebAssembly file"), "{err}");
        assert!(WasmKind::detect(b"\0asm").is_err());
    }

    fn stored(engine: &Engine, cache: &CompileCache, wat: &str) -> (String, Vec<u8>) {
        let wasm = wat::parse_str(wat).unwrap();
        let sha = sha256_hex(&wasm);
        let code = compile(engine, WasmKind::CoreModule, &wasm).unwrap();
        cache.store(&sha, &code).unwrap();
        (sha, code)
    }

    #[test]
    fn the_key_is_made_once_0600_and_kept() {
        let engine = Engine::default();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hooks");
        let cache = CompileCache::open(&path, &engine);
        assert!(cache.enabled());
        let meta = std::fs::symlink_metadata(path.join(KEY_FILE)).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(meta.len(), KEY_LEN as u64);
        assert_eq!(
            std::fs::metadata(&path).unwrap().mode() & 0o777,
            0o700,
            "the directory is made 0700"
        );
        let key = std::fs::read(path.join(KEY_FILE)).unwrap();
        let (sha, _) = stored(&engine, &cache, "(module (func (export \"_start\")))");

        // A second opening (another process) uses the same key: the entry verifies.
        let again = CompileCache::open(&path, &engine);
        assert_eq!(std::fs::read(path.join(KEY_FILE)).unwrap(), key);
        assert!(matches!(
            again.fetch(&engine, WasmKind::CoreModule, &sha),
            Ok(Some(_))
        ));

        // A key others may read is replaced, and what the old key signed is refused.
        std::fs::set_permissions(path.join(KEY_FILE), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        let replaced = CompileCache::open(&path, &engine);
        assert_ne!(std::fs::read(path.join(KEY_FILE)).unwrap(), key);
        assert_eq!(
            replaced.fetch(&engine, WasmKind::CoreModule, &sha).err(),
            Some(CacheRefusal::BadTag)
        );
        assert!(
            !path.join(cache.entry_name(&sha)).exists(),
            "the refused entry is removed"
        );
    }

    #[test]
    fn an_untrusted_directory_turns_the_cache_off() {
        let engine = Engine::default();
        let dir = tempfile::tempdir().unwrap();

        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(
            Store::open(&open).err(),
            Some(CacheRefusal::Mode { mode: 0o777, .. })
        ));

        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert_eq!(Store::open(&link).err(), Some(CacheRefusal::Symlink));

        let cache = CompileCache::open(&link, &engine);
        assert!(!cache.enabled());
        stored(&engine, &cache, "(module)");
        assert_eq!(
            std::fs::read_dir(&real).unwrap().count(),
            0,
            "nothing written through the link"
        );
    }

    #[test]
    fn stale_temporaries_are_removed_and_fresh_ones_kept() {
        let engine = Engine::default();
        let dir = tempfile::tempdir().unwrap();
        CompileCache::open(dir.path(), &engine);
        let (stale, fresh) = (dir.path().join(".tmp-stale"), dir.path().join(".tmp-fresh"));
        std::fs::write(&stale, b"half").unwrap();
        std::fs::write(&fresh, b"half").unwrap();
        let old = SystemTime::now() - 2 * TMP_STALE;
        File::options()
            .write(true)
            .open(&stale)
            .unwrap()
            .set_modified(old)
            .unwrap();
        CompileCache::open(dir.path(), &engine);
        assert!(!stale.exists());
        assert!(fresh.exists());
    }
}
