//! Runs hooks: one shared wasmtime [`Engine`], compiled code cached in memory and on disk,
//! and for every run a fresh [`Store`] holding only what the [`Sandbox`] grants.
//!
//! Three kinds of Wasm are hooks: a component of the `shoal:hooks/hook` world (typed context
//! in, typed result out), a `wasi:cli/command` component, and a WASI preview-1 core module
//! with `_start`. Commands get CodeDeploy's environment variables and succeed on exit 0.
//!
//! Limits: the deadline is a tokio timeout around the whole run, which can fire because
//! guest code yields to the executor at every epoch tick (so a busy loop stops within a
//! tick of the deadline) and host calls are async (so a sleeping or blocked guest stops
//! too). Memory is capped by a resource limiter that remembers what it refused, so an
//! allocation failure is reported as such rather than as the trap it turns into.
//!
//! Loading is bounded too ([`HookLimits`], docs/decisions/0016-hook-cache-and-bounds.md):
//! a module over the size cap is refused before it is read whole; compiling happens on
//! blocking threads, at most `compile_threads` at once, and a caller stops waiting after
//! `compile_budget` (wasmtime cannot interrupt a compile: it runs on, holding its place in
//! the pool, and its result is thrown away); the compiled hooks kept in memory are bounded
//! by count and code size, least recently used dropped first. A run waits for one of the
//! [`MAX_CONCURRENT_HOOKS`] instance slots the pooling allocator has, for at most
//! `instance_wait`, instead of failing when they are all taken.

use std::collections::HashMap;
use std::io::Read as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use serde::Serialize;
use tokio::sync::Semaphore;
use wasmtime::component::{HasSelf, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store,
    UpdateDeadline,
};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::cache::{self, CacheRefusal, CacheStatus, CompileCache, Compiled, WasmKind, sha256_hex};
use super::context::HookContext;
use super::http::{self, HttpPolicy};
use super::output::{CapturedLog, LogSink};
use super::sandbox::Sandbox;

/// How often the engine's epoch advances: the granularity of deadlines.
const EPOCH_TICK: Duration = Duration::from_millis(50);

mod bindings {
    wasmtime::component::bindgen!({
        path: "../hooks-sdk/wit",
        world: "hook",
        imports: { "shoal:hooks/http.send": async, default: tracing },
        exports: { default: async },
    });
}
use bindings::shoal::hooks::{http as wit_http, log as wit_log, types as wit};

/// What kind of Wasm a hook is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HookKind {
    /// A component of the `shoal:hooks/hook` world.
    ShoalHook,
    /// A `wasi:cli/command` component.
    WasiCommand,
    /// A WASI preview-1 core module.
    WasiP1Command,
}

/// Why a hook failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum HookFailure {
    /// The hook returned an error.
    #[error("the hook failed: {reason}")]
    Returned { reason: String },
    /// A command exited with a non-zero status.
    #[error("the hook exited with status {code}")]
    Exit { code: i32 },
    /// The deadline passed; the hook was stopped.
    #[error("the hook timed out after {:.1}s and was stopped", *timeout_ms as f64 / 1000.0)]
    Timeout { timeout_ms: u64 },
    /// The hook tried to grow its memory past the cap.
    #[error("the hook exceeded its memory limit of {limit_mib} MiB and was stopped")]
    MemoryLimit { limit_mib: usize },
    /// The hook panicked (a Rust guest's panic, reported from its output).
    #[error("the hook panicked: {message}")]
    Panic { message: String },
    /// The hook trapped.
    #[error("the hook trapped: {message}")]
    Trap { message: String },
    /// The hook could not be started (a granted directory is missing, ...).
    #[error("the hook could not start: {message}")]
    Start { message: String },
    /// All instance slots stayed taken for as long as the run may wait for one.
    #[error("the hook did not start: all {slots} hook slots stayed busy for {:.1}s", *waited_ms as f64 / 1000.0)]
    Busy { slots: u32, waited_ms: u64 },
}

/// Why a hook could not be loaded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    /// The file could not be opened or read.
    #[error("reading {}: {message}", path.display())]
    Read { path: PathBuf, message: String },
    /// The path names something other than a regular file.
    #[error("{} is not a regular file", path.display())]
    NotAFile { path: PathBuf },
    /// The module is larger than [`HookLimits::max_module_bytes`]; nothing past the limit
    /// was read.
    #[error("the hook module is {size} bytes, over the limit of {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
    /// Not WebAssembly, or a version of it this agent does not run.
    #[error("{message}")]
    NotWasm { message: String },
    /// Every place in the compile pool stayed taken for the whole budget.
    #[error("no compile slot came free within {:.1}s ({slots} compiles running)", budget.as_secs_f64())]
    CompilePoolBusy { slots: usize, budget: Duration },
    /// The compile did not finish within the budget; its result will be thrown away.
    #[error("compiling the hook took longer than its budget of {:.1}s", budget.as_secs_f64())]
    CompileTimeout { budget: Duration },
    /// wasmtime refused to compile it.
    #[error("compiling the hook: {message}")]
    Compile { message: String },
    /// It compiled but is not a hook this agent can run (imports, exports, no `_start`).
    #[error("{message}")]
    Link { message: String },
    /// The agent's own failure: the engine could not be made.
    #[error("the Wasm engine: {message}")]
    Engine { message: String },
}

/// Bounds on loading and running hooks. [`Default`] gives the agent's.
#[derive(Clone, Debug)]
pub struct HookLimits {
    /// The largest hook module accepted, checked before the file is read whole: 32 MiB.
    pub max_module_bytes: u64,
    /// How long a load waits for a compile slot, and then for the compile: 120 s each.
    pub compile_budget: Duration,
    /// Compiles at once (each a blocking thread, and wasmtime compiles a module's
    /// functions in parallel too): 2.
    pub compile_threads: usize,
    /// Compiled hooks kept in memory: at most this many (64)...
    pub max_loaded: usize,
    /// ... holding at most this much compiled code (256 MiB).
    pub max_loaded_bytes: usize,
    /// How long a run waits for one of the [`MAX_CONCURRENT_HOOKS`] instance slots: 600 s.
    pub instance_wait: Duration,
}

impl Default for HookLimits {
    fn default() -> Self {
        HookLimits {
            max_module_bytes: 32 << 20,
            compile_budget: Duration::from_secs(120),
            compile_threads: 2,
            max_loaded: 64,
            max_loaded_bytes: 256 << 20,
            instance_wait: Duration::from_secs(600),
        }
    }
}

/// How a hook run ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "PascalCase")]
pub enum HookStatus {
    Succeeded { message: String },
    Failed { failure: HookFailure },
}

/// Everything about one hook run.
#[derive(Clone, Debug, Serialize)]
pub struct HookOutcome {
    #[serde(flatten)]
    pub status: HookStatus,
    pub kind: HookKind,
    /// Hex SHA-256 of the hook's Wasm.
    pub sha256: String,
    pub cache: CacheStatus,
    /// How long the run took, from when it had an instance slot.
    pub elapsed_ms: u64,
    pub log: CapturedLog,
}

impl HookOutcome {
    pub fn succeeded(&self) -> bool {
        matches!(self.status, HookStatus::Succeeded { .. })
    }

    /// One line: the success message or the failure.
    pub fn summary(&self) -> String {
        match &self.status {
            HookStatus::Succeeded { message } => message.clone(),
            HookStatus::Failed { failure } => failure.to_string(),
        }
    }
}

/// A hook compiled, linked and ready to instantiate.
pub struct LoadedHook {
    prepared: Arc<Prepared>,
    /// Where its compiled code came from for this load.
    pub cache: CacheStatus,
    /// The on-disk entry refused for this load (and removed), if one was.
    pub refused: Option<CacheRefusal>,
}

impl LoadedHook {
    pub fn kind(&self) -> HookKind {
        match self.prepared.pre {
            Pre::Hook(_) => HookKind::ShoalHook,
            Pre::Command(_) => HookKind::WasiCommand,
            Pre::Module(_) => HookKind::WasiP1Command,
        }
    }

    pub fn sha256(&self) -> &str {
        &self.prepared.sha256
    }
}

struct Prepared {
    sha256: String,
    /// The engine it was compiled for, which its stores must use, and its epoch ticker
    /// (kept alive by every hook loaded, so a hook outliving its runtime still times out).
    engine: Engine,
    ticker: Arc<EpochTicker>,
    /// The engine's instance slots: one per run.
    slots: Arc<Semaphore>,
    /// The size of its compiled code, what it costs the in-memory map.
    code_bytes: usize,
    pre: Pre,
}

enum Pre {
    Hook(bindings::HookPre<State<P2>>),
    Command(CommandPre<State<P2>>),
    Module(wasmtime::InstancePre<State<WasiP1Ctx>>),
}

/// Runs hooks. Create one per agent and share it: it owns the engine, the epoch ticker
/// and the caches. The engine is made when the first hook is loaded, not before: an
/// agent that runs no hook pays neither the engine's memory (the code it touches, its
/// linkers) nor the epoch thread's wake-ups.
pub struct HookRuntime {
    inner: Arc<Inner>,
}

/// What the runtime shares with its compile threads.
struct Inner {
    cache_dir: PathBuf,
    limits: HookLimits,
    wasm: OnceLock<Wasm>,
    making: Mutex<()>,
    loaded: Mutex<Remembered>,
    compiles: Arc<Semaphore>,
}

/// The compiled hooks kept in memory, bounded by count and code size; the least recently
/// used goes first.
struct Remembered {
    hooks: HashMap<String, (Arc<Prepared>, u64)>,
    clock: u64,
    bytes: usize,
    max: usize,
    max_bytes: usize,
}

impl Remembered {
    fn get(&mut self, sha256: &str) -> Option<Arc<Prepared>> {
        self.clock += 1;
        let (prepared, used) = self.hooks.get_mut(sha256)?;
        *used = self.clock;
        Some(prepared.clone())
    }

    fn insert(&mut self, prepared: Arc<Prepared>) {
        self.clock += 1;
        self.bytes += prepared.code_bytes;
        if let Some((old, _)) = self
            .hooks
            .insert(prepared.sha256.clone(), (prepared.clone(), self.clock))
        {
            self.bytes -= old.code_bytes;
        }
        while self.hooks.len() > 1 && (self.hooks.len() > self.max || self.bytes > self.max_bytes) {
            let oldest = self
                .hooks
                .iter()
                .filter(|(sha, _)| **sha != prepared.sha256)
                .min_by_key(|(_, (_, used))| *used)
                .map(|(sha, _)| sha.clone())
                .expect("another hook is kept");
            if let Some((gone, _)) = self.hooks.remove(&oldest) {
                self.bytes -= gone.code_bytes;
            }
        }
    }
}

/// The engine and what is tied to it.
struct Wasm {
    engine: Engine,
    cache: CompileCache,
    components: wasmtime::component::Linker<State<P2>>,
    modules: wasmtime::Linker<State<WasiP1Ctx>>,
    ticker: Arc<EpochTicker>,
    slots: Arc<Semaphore>,
}

impl Wasm {
    fn new(cache_dir: &Path) -> Result<Self> {
        let mut config = Config::new();
        config
            .epoch_interruption(true)
            .wasm_component_model(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pooling_config()));
        let engine = wt(Engine::new(&config)).context("creating the Wasm engine")?;

        let mut components = wasmtime::component::Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut components)?;
        bindings::Hook::add_to_linker::<_, HasSelf<_>>(&mut components, |s| s)?;
        let mut modules = wasmtime::Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut modules, |s: &mut State<WasiP1Ctx>| {
            &mut s.wasi
        })?;

        Ok(Wasm {
            cache: CompileCache::open(cache_dir, &engine),
            ticker: Arc::new(EpochTicker::start(&engine)?),
            slots: Arc::new(Semaphore::new(MAX_CONCURRENT_HOOKS as usize)),
            engine,
            components,
            modules,
        })
    }

    fn link_component(&self, component: &wasmtime::component::Component) -> Result<Pre> {
        let ty = component.component_type();
        let exports: Vec<String> = ty
            .exports(&self.engine)
            .map(|(name, _)| name.to_string())
            .collect();
        let pre = wt(self.components.instantiate_pre(component))
            .context("linking the component (it may import something hooks are not given)")?;
        if exports.iter().any(|e| e == "run") {
            Ok(Pre::Hook(wt(bindings::HookPre::new(pre)).context(
                "the component's `run` does not match the shoal:hooks/hook world",
            )?))
        } else if exports.iter().any(|e| e.starts_with("wasi:cli/run@")) {
            Ok(Pre::Command(wt(CommandPre::new(pre)).context(
                "the component's `wasi:cli/run` is not one this agent supports",
            )?))
        } else {
            anyhow::bail!(
                "the component exports neither `run` (a Shoal hook) nor `wasi:cli/run` (a WASI command); it exports: {}",
                if exports.is_empty() {
                    "nothing".to_string()
                } else {
                    exports.join(", ")
                }
            )
        }
    }
}

impl HookRuntime {
    /// A runtime with the agent's [`HookLimits`] whose compiled code is cached under
    /// `cache_dir` (created when the engine is, at the first hook).
    pub fn new(cache_dir: &Path) -> Result<Self> {
        Self::with_limits(cache_dir, HookLimits::default())
    }

    /// A runtime with the given limits.
    pub fn with_limits(cache_dir: &Path, limits: HookLimits) -> Result<Self> {
        anyhow::ensure!(
            limits.compile_threads > 0 && limits.max_loaded > 0,
            "hook limits: at least one compile thread and one loaded hook"
        );
        Ok(HookRuntime {
            inner: Arc::new(Inner {
                cache_dir: cache_dir.to_path_buf(),
                compiles: Arc::new(Semaphore::new(limits.compile_threads)),
                loaded: Mutex::new(Remembered {
                    hooks: HashMap::new(),
                    clock: 0,
                    bytes: 0,
                    max: limits.max_loaded,
                    max_bytes: limits.max_loaded_bytes,
                }),
                limits,
                wasm: OnceLock::new(),
                making: Mutex::new(()),
            }),
        })
    }

    /// Makes the engine now if it is not made yet: an error here is the agent's (its
    /// memory or threads), not a hook's.
    pub fn ready(&self) -> Result<()> {
        self.inner.wasm().map(|_| ())
    }

    /// How many compiled hooks are kept in memory now.
    pub fn in_memory(&self) -> usize {
        self.inner.remembered().hooks.len()
    }

    /// Reads (at most [`HookLimits::max_module_bytes`]), compiles (or loads from cache) and
    /// links a hook file.
    pub async fn load_file(&self, path: &Path) -> Result<LoadedHook, LoadError> {
        let (path, limit) = (path.to_path_buf(), self.inner.limits.max_module_bytes);
        let bytes = tokio::task::spawn_blocking(move || read_module(&path, limit))
            .await
            .map_err(|e| LoadError::Engine {
                message: format!("the reading task failed: {e}"),
            })??;
        self.load(&bytes).await
    }

    /// Compiles (or loads from cache) and links a hook. The work happens on a blocking
    /// thread from the compile pool; this waits for it within the compile budget.
    /// Loads the hook file `rel` of the revision (or release) at `root`, read through
    /// [`crate::bundle::read_in_revision`]: never by a link that leaves the revision, and
    /// no more than [`HookLimits::max_module_bytes`] of it.
    pub async fn load_in_revision(&self, root: &Path, rel: &Path) -> Result<LoadedHook, LoadError> {
        let (root, rel) = (root.to_path_buf(), rel.to_path_buf());
        let limit = self.inner.limits.max_module_bytes;
        let path = root.join(&rel);
        let bytes = tokio::task::spawn_blocking(move || {
            crate::bundle::read_in_revision(&root, &rel, limit)
        })
        .await
        .map_err(|e| LoadError::Engine {
            message: format!("the reading task failed: {e}"),
        })?
        .map_err(|e| LoadError::Read {
            path,
            message: e.to_string(),
        })?;
        self.load(&bytes).await
    }

    pub async fn load(&self, bytes: &[u8]) -> Result<LoadedHook, LoadError> {
        let limits = &self.inner.limits;
        if bytes.len() as u64 > limits.max_module_bytes {
            return Err(LoadError::TooLarge {
                size: bytes.len() as u64,
                limit: limits.max_module_bytes,
            });
        }
        let kind = WasmKind::detect(bytes).map_err(|e| LoadError::NotWasm {
            message: e.to_string(),
        })?;
        let sha256 = sha256_hex(bytes);
        if let Some(prepared) = self.inner.remembered().get(&sha256) {
            return Ok(LoadedHook {
                prepared,
                cache: CacheStatus::Memory,
                refused: None,
            });
        }
        if self.inner.wasm.get().is_none() {
            let inner = self.inner.clone();
            tokio::task::spawn_blocking(move || inner.wasm().map(|_| ()))
                .await
                .map_err(|e| anyhow::anyhow!("the engine task failed: {e}"))
                .and_then(|made| made)
                .map_err(|e| LoadError::Engine {
                    message: format!("{e:#}"),
                })?;
        }

        let budget = limits.compile_budget;
        let permit = tokio::time::timeout(budget, self.inner.compiles.clone().acquire_owned())
            .await
            .map_err(|_| LoadError::CompilePoolBusy {
                slots: limits.compile_threads,
                budget,
            })?
            .expect("the compile pool is never closed");
        let abandoned = Arc::new(AtomicBool::new(false));
        let job = {
            let (inner, abandoned, bytes) = (self.inner.clone(), abandoned.clone(), bytes.to_vec());
            tokio::task::spawn_blocking(move || {
                // The place in the pool is held until the compile ends, even one the caller
                // stopped waiting for: runaway compiles cannot pile up.
                let _permit = permit;
                inner.prepare(kind, &bytes, sha256, &abandoned)
            })
        };
        match tokio::time::timeout(budget, job).await {
            Ok(Ok(loaded)) => loaded,
            Ok(Err(e)) => Err(LoadError::Compile {
                message: format!("the compile task failed: {e}"),
            }),
            Err(_) => {
                abandoned.store(true, Ordering::Relaxed);
                tracing::warn!(
                    budget_s = budget.as_secs_f64(),
                    "a hook's compile ran past its budget; it runs on in the compile pool and its result will be discarded"
                );
                Err(LoadError::CompileTimeout { budget })
            }
        }
    }

    /// Runs a loaded hook in a fresh sandbox. Never panics and never fails: whatever the
    /// hook does is reported in the outcome.
    pub async fn run(
        &self,
        hook: &LoadedHook,
        ctx: &HookContext,
        sandbox: &Sandbox,
    ) -> HookOutcome {
        let log = LogSink::new(sandbox.output_limit);
        let wait = self.inner.limits.instance_wait;
        let queued = Instant::now();
        let Ok(Ok(_slot)) =
            tokio::time::timeout(wait, hook.prepared.slots.clone().acquire_owned()).await
        else {
            return HookOutcome {
                status: HookStatus::Failed {
                    failure: HookFailure::Busy {
                        slots: MAX_CONCURRENT_HOOKS,
                        waited_ms: queued.elapsed().as_millis() as u64,
                    },
                },
                kind: hook.kind(),
                sha256: hook.sha256().to_string(),
                cache: hook.cache,
                elapsed_ms: 0,
                log: log.captured(),
            };
        };
        // The run is timed from here: waiting for a slot is not running.
        let started = Instant::now();
        let denied = Arc::new(AtomicUsize::new(0));
        let _ticks = hook.prepared.ticker.ticks();
        let run = self.run_inner(hook, ctx, sandbox, &log, &denied);
        let ended = match tokio::time::timeout(sandbox.timeout, run).await {
            Ok(ended) => ended,
            Err(_) => Ended::TimedOut,
        };
        let status = classify(ended, sandbox, &log, denied.load(Ordering::Relaxed));
        let outcome = HookOutcome {
            status,
            kind: hook.kind(),
            sha256: hook.sha256().to_string(),
            cache: hook.cache,
            elapsed_ms: started.elapsed().as_millis() as u64,
            log: log.captured(),
        };
        tracing::debug!(event = %ctx.event, sha256 = %outcome.sha256, ok = outcome.succeeded(), "hook ran: {}", outcome.summary());
        outcome
    }

    async fn run_inner(
        &self,
        hook: &LoadedHook,
        ctx: &HookContext,
        sandbox: &Sandbox,
        log: &LogSink,
        denied: &Arc<AtomicUsize>,
    ) -> Ended {
        let mut builder = match wasi_builder(ctx, sandbox, log) {
            Ok(b) => b,
            Err(e) => return Ended::NotStarted(e),
        };
        let limits = MemoryLimits {
            limit: sandbox.memory_limit,
            used: 0,
            denied: denied.clone(),
        };
        let http = HttpPolicy {
            allow: sandbox.http_allow.clone(),
            deadline: Instant::now() + sandbox.timeout,
        };
        match &hook.prepared.pre {
            Pre::Hook(pre) => {
                let mut store = store(
                    &hook.prepared.engine,
                    State::p2(builder, limits, log.clone(), http),
                );
                let result = async {
                    let instance = pre.instantiate_async(&mut store).await?;
                    instance.call_run(&mut store, &to_wit(ctx)).await
                };
                match result.await {
                    Ok(returned) => Ended::Returned(returned),
                    Err(e) => Ended::Error(e),
                }
            }
            Pre::Command(pre) => {
                let mut store = store(
                    &hook.prepared.engine,
                    State::p2(builder, limits, log.clone(), http),
                );
                let result = async {
                    let command = pre.instantiate_async(&mut store).await?;
                    command.wasi_cli_run().call_run(&mut store).await
                };
                match result.await {
                    Ok(Ok(())) => Ended::Exited(0),
                    Ok(Err(())) => Ended::Exited(1),
                    Err(e) => Ended::Error(e),
                }
            }
            Pre::Module(pre) => {
                let state = State {
                    wasi: builder.build_p1(),
                    limits,
                    log: log.clone(),
                    http,
                };
                let mut store = store(&hook.prepared.engine, state);
                let result = async {
                    let instance = pre.instantiate_async(&mut store).await?;
                    let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
                    start.call_async(&mut store, ()).await
                };
                match result.await {
                    Ok(()) => Ended::Exited(0),
                    Err(e) => Ended::Error(e),
                }
            }
        }
    }
}

impl Inner {
    /// The engine, made on first use.
    fn wasm(&self) -> Result<&Wasm> {
        if let Some(w) = self.wasm.get() {
            return Ok(w);
        }
        // A failed attempt leaves nothing half made: the lock's data is `()`.
        let _one_at_a_time = self.making.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(w) = self.wasm.get() {
            return Ok(w);
        }
        let w = Wasm::new(&self.cache_dir)?;
        Ok(self.wasm.get_or_init(|| w))
    }

    fn remembered(&self) -> std::sync::MutexGuard<'_, Remembered> {
        self.loaded.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Fetches or compiles, then links, a module (on a compile thread). A result the caller
    /// stopped waiting for (`abandoned`) is neither stored nor remembered.
    fn prepare(
        &self,
        kind: WasmKind,
        bytes: &[u8],
        sha256: String,
        abandoned: &AtomicBool,
    ) -> Result<LoadedHook, LoadError> {
        let wasm = self.wasm().map_err(|e| LoadError::Engine {
            message: format!("{e:#}"),
        })?;
        let (fetched, refused) = match wasm.cache.fetch(&wasm.engine, kind, &sha256) {
            Ok(fetched) => (fetched, None),
            Err(refusal) => (None, Some(refusal)),
        };
        let (compiled, code_bytes, cache) = match fetched {
            Some((compiled, size)) => (compiled, size, CacheStatus::Disk),
            None => {
                let code =
                    cache::compile(&wasm.engine, kind, bytes).map_err(|e| LoadError::Compile {
                        message: format!("{e:#}"),
                    })?;
                if abandoned.load(Ordering::Relaxed) {
                    return Err(LoadError::CompileTimeout {
                        budget: self.limits.compile_budget,
                    });
                }
                if let Err(e) = wasm.cache.store(&sha256, &code) {
                    tracing::warn!(sha256 = %sha256, "cannot cache the compiled hook: {e}");
                }
                // SAFETY: `code` was produced by this engine a moment ago.
                let compiled =
                    unsafe { cache::deserialize(&wasm.engine, kind, &code) }.map_err(|e| {
                        LoadError::Compile {
                            message: format!("{e:#}"),
                        }
                    })?;
                (compiled, code.len(), CacheStatus::Compiled)
            }
        };
        let link = |e: anyhow::Error| LoadError::Link {
            message: format!("{e:#}"),
        };
        let pre = match compiled {
            Compiled::Component(c) => wasm.link_component(&c).map_err(link)?,
            Compiled::Module(m) => {
                if m.get_export("_start").is_none() {
                    return Err(link(anyhow::anyhow!(
                        "this core module has no `_start` export: a preview-1 module must be a WASI command"
                    )));
                }
                Pre::Module(
                    wt(wasm.modules.instantiate_pre(&m))
                        .context("linking the WASI preview-1 module")
                        .map_err(link)?,
                )
            }
        };
        let prepared = Arc::new(Prepared {
            sha256,
            engine: wasm.engine.clone(),
            ticker: wasm.ticker.clone(),
            slots: wasm.slots.clone(),
            code_bytes,
            pre,
        });
        if !abandoned.load(Ordering::Relaxed) {
            self.remembered().insert(prepared.clone());
        }
        Ok(LoadedHook {
            prepared,
            cache,
            refused,
        })
    }
}

/// Reads a hook module, refusing one over `limit` bytes before reading it whole (and one
/// that grows past it while read). Opened non-blocking, so a FIFO cannot stall the agent.
fn read_module(path: &Path, limit: u64) -> Result<Vec<u8>, LoadError> {
    let read_error = |e: std::io::Error| LoadError::Read {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)
        .map_err(read_error)?;
    let meta = file.metadata().map_err(read_error)?;
    if !meta.is_file() {
        return Err(LoadError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    if meta.len() > limit {
        return Err(LoadError::TooLarge {
            size: meta.len(),
            limit,
        });
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > limit {
        return Err(LoadError::TooLarge {
            size: bytes.len() as u64,
            limit,
        });
    }
    Ok(bytes)
}

/// How many hooks may run at once on one agent.
pub const MAX_CONCURRENT_HOOKS: u32 = 32;

/// Instances come from a pool of pre-reserved slots: instantiating a hook is then a few
/// page-table operations instead of fresh mappings. Slots reserve address space only; each
/// memory slot admits wasm32's 4 GiB so that the sandbox's own cap, enforced by
/// [`MemoryLimits`], is always the one a hook meets.
fn pooling_config() -> PoolingAllocationConfig {
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(MAX_CONCURRENT_HOOKS)
        .total_core_instances(MAX_CONCURRENT_HOOKS * 8)
        .total_memories(MAX_CONCURRENT_HOOKS * 2)
        .total_tables(MAX_CONCURRENT_HOOKS * 8)
        .total_stacks(MAX_CONCURRENT_HOOKS)
        .max_memory_size(4 << 30)
        // Reset a slot's first pages with memset rather than handing them back to the
        // kernel: a Rust guest's stack and early heap live there, and re-faulting them on
        // every run costs more than the copy.
        .linear_memory_keep_resident(2 << 20)
        .table_keep_resident(64 << 10);
    pool
}

/// wasmtime's own error type, as an `anyhow::Error` for context and reporting.
fn wt<T>(r: wasmtime::Result<T>) -> Result<T> {
    r.map_err(anyhow::Error::from)
}

/// How a run ended, before it is judged.
enum Ended {
    Returned(Result<String, String>),
    Exited(i32),
    Error(wasmtime::Error),
    NotStarted(anyhow::Error),
    TimedOut,
}

fn classify(ended: Ended, sandbox: &Sandbox, log: &LogSink, denied_bytes: usize) -> HookStatus {
    let failed = |failure| HookStatus::Failed { failure };
    match ended {
        Ended::Returned(Ok(message)) => HookStatus::Succeeded { message },
        Ended::Returned(Err(reason)) => failed(HookFailure::Returned { reason }),
        Ended::Exited(0) => HookStatus::Succeeded {
            message: "exited with status 0".into(),
        },
        Ended::Exited(code) => failed(HookFailure::Exit { code }),
        Ended::TimedOut => failed(HookFailure::Timeout {
            timeout_ms: sandbox.timeout.as_millis() as u64,
        }),
        Ended::NotStarted(e) => failed(HookFailure::Start {
            message: format!("{e:#}"),
        }),
        Ended::Error(e) => {
            if let Some(exit) = e.downcast_ref::<I32Exit>() {
                return classify(Ended::Exited(exit.0), sandbox, log, denied_bytes);
            }
            if denied_bytes > 0 {
                return failed(HookFailure::MemoryLimit {
                    limit_mib: sandbox.memory_limit >> 20,
                });
            }
            if let Some(trap) = e.downcast_ref::<wasmtime::Trap>() {
                if let Some(message) = panic_message(&log.captured().text) {
                    return failed(HookFailure::Panic { message });
                }
                return failed(HookFailure::Trap {
                    message: trap.to_string(),
                });
            }
            failed(HookFailure::Trap {
                message: format!("{e:#}"),
            })
        }
    }
}

/// A Rust guest prints `thread '…' panicked at FILE:LINE:COL:` and then the message.
fn panic_message(log: &str) -> Option<String> {
    let mut lines = log.lines();
    let at = lines.find(|l| l.contains("panicked at"))?;
    let location = at
        .split("panicked at ")
        .nth(1)
        .unwrap_or("")
        .trim_end_matches(':');
    let message = lines.next().unwrap_or("").trim();
    Some(format!("{message} (at {location})"))
}

fn wasi_builder(ctx: &HookContext, sandbox: &Sandbox, log: &LogSink) -> Result<WasiCtxBuilder> {
    let mut b = WasiCtxBuilder::new();
    b.stdout(log.clone())
        .stderr(log.clone())
        .args(&["hook"])
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false);
    for (k, v) in ctx.codedeploy_env().iter().chain(&sandbox.env) {
        b.env(k, v);
    }
    for dir in &sandbox.dirs {
        let perms = if dir.writable {
            FsPerms::ReadWrite
        } else {
            FsPerms::ReadOnly
        };
        wt(b.preopened_dir(&dir.host, &dir.guest, perms).map(|_| ()))
            .with_context(|| format!("granting {} as {}", dir.host.display(), dir.guest))?;
    }
    Ok(b)
}

fn to_wit(ctx: &HookContext) -> wit::Context {
    use crate::hooks::LifecycleEvent as E;
    use wit::LifecycleEvent as W;
    let event = match ctx.event {
        E::ApplicationStop => W::ApplicationStop,
        E::DownloadBundle => W::DownloadBundle,
        E::BeforeInstall => W::BeforeInstall,
        E::Install => W::Install,
        E::AfterInstall => W::AfterInstall,
        E::ApplicationStart => W::ApplicationStart,
        E::ValidateService => W::ValidateService,
        E::BeforeBlockTraffic => W::BeforeBlockTraffic,
        E::BlockTraffic => W::BlockTraffic,
        E::AfterBlockTraffic => W::AfterBlockTraffic,
        E::BeforeAllowTraffic => W::BeforeAllowTraffic,
        E::AllowTraffic => W::AllowTraffic,
        E::AfterAllowTraffic => W::AfterAllowTraffic,
    };
    let pairs = |m: &std::collections::BTreeMap<String, String>| {
        m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    };
    wit::Context {
        event,
        deployment_id: ctx.deployment_id.clone(),
        application: ctx.application.clone(),
        deployment_group: ctx.deployment_group.clone(),
        revision: ctx.revision.clone(),
        host: wit::HostInfo {
            name: ctx.host_name.clone(),
            tags: pairs(&ctx.host_tags),
        },
        params: pairs(&ctx.params),
    }
}

/// A store's data: the WASI context (`W`) and what the hook imports need.
struct State<W> {
    wasi: W,
    limits: MemoryLimits,
    log: LogSink,
    http: HttpPolicy,
}

/// WASI preview 2's context and resource table.
struct P2 {
    ctx: WasiCtx,
    table: ResourceTable,
}

impl State<P2> {
    fn p2(
        mut builder: WasiCtxBuilder,
        limits: MemoryLimits,
        log: LogSink,
        http: HttpPolicy,
    ) -> Self {
        State {
            wasi: P2 {
                ctx: builder.build(),
                table: ResourceTable::new(),
            },
            limits,
            log,
            http,
        }
    }
}

impl WasiView for State<P2> {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi.ctx,
            table: &mut self.wasi.table,
        }
    }
}

impl wit::Host for State<P2> {}

impl wit_log::Host for State<P2> {
    fn log(&mut self, level: wit_log::Level, message: String) {
        let level = match level {
            wit_log::Level::Trace => "trace",
            wit_log::Level::Debug => "debug",
            wit_log::Level::Info => "info",
            wit_log::Level::Warn => "warn",
            wit_log::Level::Error => "error",
        };
        self.log.line(level, &message);
    }
}

impl wit_http::Host for State<P2> {
    async fn send(
        &mut self,
        req: wit_http::Request,
    ) -> Result<wit_http::Response, wit_http::Error> {
        let policy = self.http.clone();
        let request = http::Request {
            method: req.method,
            url: req.url,
            headers: req.headers,
            body: req.body,
            timeout: req.timeout_ms.map(|ms| Duration::from_millis(ms.into())),
        };
        let url = request.url.clone();
        let answer = tokio::task::spawn_blocking(move || policy.send(request))
            .await
            .unwrap_or_else(|e| {
                Err(http::HttpError::Transport(format!(
                    "the request task failed: {e}"
                )))
            });
        match answer {
            Ok(r) => Ok(wit_http::Response {
                status: r.status,
                headers: r.headers,
                body: r.body,
            }),
            Err(e) => {
                self.log
                    .line("shoal", &format!("HTTP request to {url} failed: {e:?}"));
                Err(match e {
                    http::HttpError::Denied(s) => wit_http::Error::Denied(s),
                    http::HttpError::InvalidUrl(s) => wit_http::Error::InvalidUrl(s),
                    http::HttpError::Transport(s) => wit_http::Error::Transport(s),
                    http::HttpError::Timeout => wit_http::Error::Timeout,
                })
            }
        }
    }
}

/// Caps the linear memory a hook's instances may hold in total, and remembers a refusal.
struct MemoryLimits {
    limit: usize,
    used: usize,
    denied: Arc<AtomicUsize>,
}

impl ResourceLimiter for MemoryLimits {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let after = self.used - current.min(self.used) + desired;
        if after > self.limit {
            self.denied.store(desired, Ordering::Relaxed);
            return Ok(false);
        }
        self.used = after;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

/// A fresh store for one run, with its limits and the epoch deadline that lets the run's
/// timeout fire.
fn store<W: Send + 'static>(engine: &Engine, state: State<W>) -> Store<State<W>> {
    let mut store = Store::new(engine, state);
    store.limiter(|s| &mut s.limits);
    // Yield to the executor at every tick so the run's timeout can fire.
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(|_| Ok(UpdateDeadline::Yield(1)));
    store
}

/// Advances the engine's epoch every [`EPOCH_TICK`] on a thread of its own while a hook
/// runs (an idle agent's thread sleeps, so it costs no wake-ups), until dropped.
struct EpochTicker(Arc<Ticking>);

struct Ticking {
    /// Hooks running now, and whether the ticker was dropped.
    state: Mutex<(usize, bool)>,
    wake: std::sync::Condvar,
}

/// Keeps the epoch advancing while it lives: one per hook run.
struct Ticks(Arc<Ticking>);

impl EpochTicker {
    fn start(engine: &Engine) -> Result<Self> {
        let ticking = Arc::new(Ticking {
            state: Mutex::new((0, false)),
            wake: std::sync::Condvar::new(),
        });
        let (engine, t) = (engine.clone(), ticking.clone());
        std::thread::Builder::new()
            .name("shoal-epoch".into())
            .spawn(move || {
                loop {
                    {
                        let state = t.state.lock().unwrap_or_else(PoisonError::into_inner);
                        let state = t
                            .wake
                            .wait_while(state, |(runs, stop)| *runs == 0 && !*stop)
                            .unwrap_or_else(PoisonError::into_inner);
                        if state.1 {
                            return;
                        }
                    }
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .context("starting the hooks' epoch thread")?;
        Ok(EpochTicker(ticking))
    }

    /// The epoch advances until the returned guard is dropped.
    fn ticks(&self) -> Ticks {
        self.0.lock().0 += 1;
        self.0.wake.notify_one();
        Ticks(self.0.clone())
    }
}

impl Ticking {
    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, bool)> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Ticks {
    fn drop(&mut self) {
        self.0.lock().0 -= 1;
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.0.lock().1 = true;
        self.0.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_messages_are_read_from_rust_guest_output() {
        let log = "before\nthread '<unnamed>' panicked at src/lib.rs:30:20:\nthe probe panicked on purpose\nnote: run with `RUST_BACKTRACE=1`\n";
        assert_eq!(
            panic_message(log).unwrap(),
            "the probe panicked on purpose (at src/lib.rs:30:20)"
        );
        assert_eq!(panic_message("no panic here"), None);
    }

    #[tokio::test]
    async fn the_engine_is_made_at_the_first_hook_and_ticks_only_while_one_runs() {
        let dir = tempfile::tempdir().unwrap();
        let rt = HookRuntime::new(dir.path()).unwrap();
        assert!(rt.inner.wasm.get().is_none(), "no engine before a hook");
        // The smallest WASI command: a core module whose `_start` returns.
        let hook = rt
            .load(b"\0asm\x01\0\0\0\x01\x04\x01\x60\0\0\x03\x02\x01\0\x07\x0a\x01\x06_start\0\0\x0a\x04\x01\x02\0\x0b")
            .await
            .unwrap();
        let ticker = rt
            .inner
            .wasm
            .get()
            .expect("an engine once a hook is loaded")
            .ticker
            .clone();
        assert_eq!(ticker.0.lock().0, 0, "idle: the ticker sleeps");
        {
            let _running = hook.prepared.ticker.ticks();
            assert_eq!(ticker.0.lock().0, 1);
        }
        assert_eq!(ticker.0.lock().0, 0);
    }

    #[tokio::test]
    async fn an_abandoned_compile_holds_its_pool_place_until_it_ends_and_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let rt = HookRuntime::with_limits(
            dir.path(),
            HookLimits {
                compile_budget: Duration::ZERO,
                compile_threads: 1,
                ..HookLimits::default()
            },
        )
        .unwrap();
        let probe = shoal_examples::SANDBOX_PROBE.bytes;
        assert!(matches!(
            rt.load(probe).await,
            Err(LoadError::CompileTimeout { .. })
        ));
        // The compile runs on; its place in the pool comes back when it ends.
        let until = Instant::now() + Duration::from_secs(300);
        while rt.inner.compiles.available_permits() == 0 {
            assert!(Instant::now() < until, "the compile never ended");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(rt.in_memory(), 0);
        let stored = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".cwasm")
            })
            .count();
        assert_eq!(stored, 0, "the abandoned result is not stored");
    }

    #[test]
    fn memory_limits_sum_over_memories_and_remember_refusals() {
        let denied = Arc::new(AtomicUsize::new(0));
        let mut l = MemoryLimits {
            limit: 100,
            used: 0,
            denied: denied.clone(),
        };
        assert!(l.memory_growing(0, 60, None).unwrap());
        assert!(l.memory_growing(0, 30, None).unwrap());
        assert!(!l.memory_growing(30, 50, None).unwrap());
        assert_eq!(denied.load(Ordering::Relaxed), 50);
        assert!(l.memory_growing(30, 40, None).unwrap());
    }
}
