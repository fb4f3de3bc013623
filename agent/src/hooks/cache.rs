//! Compiled hooks cached on disk, so a hook is compiled once per host and engine, not once
//! per run. An entry's file name is the SHA-256 of the Wasm it was compiled from and a hash
//! of the engine's compatibility key (wasmtime version, target, settings): a new agent
//! version or a changed setting never loads stale machine code, it compiles afresh.
//! Entries are written to a temporary file and renamed into place, so a crash mid-write
//! leaves no half entry; an entry that fails to load is compiled again and replaced.

use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
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

/// The on-disk cache of compiled hooks.
pub struct CompileCache {
    dir: PathBuf,
    engine_key: String,
}

impl CompileCache {
    pub fn open(dir: &Path, engine: &Engine) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the hook cache directory {}", dir.display()))?;
        Ok(CompileCache {
            dir: dir.to_path_buf(),
            engine_key: engine_key(engine),
        })
    }

    fn entry(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}-{}.cwasm", self.engine_key))
    }

    /// Loads the compiled form of `bytes` (whose SHA-256 is `sha256`), compiling and
    /// storing it if the cache has no usable entry.
    pub fn load(
        &self,
        engine: &Engine,
        bytes: &[u8],
        sha256: &str,
    ) -> Result<(Compiled, CacheStatus)> {
        let kind = WasmKind::detect(bytes)?;
        let path = self.entry(sha256);
        if path.exists() {
            // SAFETY: the entry was written by `store` below from code this engine compiled,
            // into a directory only the agent writes; its name binds it to the source's hash
            // and the engine's compatibility key, and wasmtime checks the header again.
            let loaded = unsafe { deserialize(engine, kind, Serialized::File(&path)) };
            match loaded {
                Ok(compiled) => return Ok((compiled, CacheStatus::Disk)),
                Err(e) => {
                    tracing::warn!(entry = %path.display(), "compiled hook unusable, compiling again: {e:#}")
                }
            }
        }
        let serialized = match kind {
            WasmKind::Component => engine.precompile_component(bytes),
            WasmKind::CoreModule => engine.precompile_module(bytes),
        }
        .map_err(anyhow::Error::from)
        .context("compiling the hook")?;
        if let Err(e) = self.store(&path, &serialized) {
            tracing::warn!(entry = %path.display(), "cannot cache the compiled hook: {e:#}");
        }
        // SAFETY: `serialized` was produced by this engine a moment ago.
        let compiled = unsafe { deserialize(engine, kind, Serialized::Bytes(&serialized)) }?;
        Ok((compiled, CacheStatus::Compiled))
    }

    fn store(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
        tmp.write_all(bytes)?;
        tmp.as_file().sync_all()?;
        tmp.persist(path)?;
        Ok(())
    }
}

/// Where compiled code is read from.
enum Serialized<'a> {
    File(&'a Path),
    Bytes(&'a [u8]),
}

/// Loads compiled code of the given kind.
///
/// # Safety
/// The code must have been produced by `engine` (see [`wasmtime::Module::deserialize`]).
unsafe fn deserialize(
    engine: &Engine,
    kind: WasmKind,
    from: Serialized<'_>,
) -> wasmtime::Result<Compiled> {
    // SAFETY: passed on from the caller.
    unsafe {
        Ok(match (kind, from) {
            (WasmKind::Component, Serialized::File(p)) => {
                Compiled::Component(Component::deserialize_file(engine, p)?)
            }
            (WasmKind::Component, Serialized::Bytes(b)) => {
                Compiled::Component(Component::deserialize(engine, b)?)
            }
            (WasmKind::CoreModule, Serialized::File(p)) => {
                Compiled::Module(wasmtime::Module::deserialize_file(engine, p)?)
            }
            (WasmKind::CoreModule, Serialized::Bytes(b)) => {
                Compiled::Module(wasmtime::Module::deserialize(engine, b)?)
            }
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

    #[test]
    fn a_corrupt_entry_is_compiled_again() {
        let engine = Engine::default();
        let dir = tempfile::tempdir().unwrap();
        let cache = CompileCache::open(dir.path(), &engine).unwrap();
        let wasm = wat::parse_str("(module (func (export \"_start\")))").unwrap();
        let sha = sha256_hex(&wasm);
        assert_eq!(
            cache.load(&engine, &wasm, &sha).unwrap().1,
            CacheStatus::Compiled
        );
        assert_eq!(
            cache.load(&engine, &wasm, &sha).unwrap().1,
            CacheStatus::Disk
        );
        std::fs::write(cache.entry(&sha), b"garbage").unwrap();
        assert_eq!(
            cache.load(&engine, &wasm, &sha).unwrap().1,
            CacheStatus::Compiled
        );
        assert_eq!(
            cache.load(&engine, &wasm, &sha).unwrap().1,
            CacheStatus::Disk
        );
    }
}
