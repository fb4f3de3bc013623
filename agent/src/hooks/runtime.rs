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

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use serde::Serialize;
use wasmtime::component::{HasSelf, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store,
    UpdateDeadline,
};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::cache::{CacheStatus, CompileCache, Compiled, sha256_hex};
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
    cache_dir: PathBuf,
    wasm: OnceLock<Wasm>,
    making: Mutex<()>,
    loaded: Mutex<HashMap<String, Arc<Prepared>>>,
}

/// The engine and what is tied to it.
struct Wasm {
    engine: Engine,
    cache: CompileCache,
    components: wasmtime::component::Linker<State<P2>>,
    modules: wasmtime::Linker<State<WasiP1Ctx>>,
    ticker: Arc<EpochTicker>,
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
            cache: CompileCache::open(cache_dir, &engine)?,
            ticker: Arc::new(EpochTicker::start(&engine)?),
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
    /// A runtime whose compiled code is cached under `cache_dir` (created now, so a cache
    /// that cannot be is reported at once; the engine waits for the first hook).
    pub fn new(cache_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(cache_dir).with_context(|| {
            format!("creating the hook cache directory {}", cache_dir.display())
        })?;
        Ok(HookRuntime {
            cache_dir: cache_dir.to_path_buf(),
            wasm: OnceLock::new(),
            making: Mutex::new(()),
            loaded: Mutex::new(HashMap::new()),
        })
    }

    /// Makes the engine now if it is not made yet: an error here is the agent's (its
    /// memory or threads), not a hook's.
    pub fn ready(&self) -> Result<()> {
        self.wasm().map(|_| ())
    }

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

    /// Reads, compiles (or loads from cache) and links a hook file.
    pub fn load_file(&self, path: &Path) -> Result<LoadedHook> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        self.load(&bytes)
            .with_context(|| format!("loading the hook {}", path.display()))
    }

    /// Compiles (or loads from cache) and links a hook.
    pub fn load(&self, bytes: &[u8]) -> Result<LoadedHook> {
        let sha256 = sha256_hex(bytes);
        if let Some(prepared) = self.loaded.lock().unwrap().get(&sha256) {
            return Ok(LoadedHook {
                prepared: prepared.clone(),
                cache: CacheStatus::Memory,
            });
        }
        let wasm = self.wasm()?;
        let (compiled, cache) = wasm.cache.load(&wasm.engine, bytes, &sha256)?;
        let pre = match compiled {
            Compiled::Component(c) => wasm.link_component(&c)?,
            Compiled::Module(m) => {
                if m.get_export("_start").is_none() {
                    anyhow::bail!(
                        "this core module has no `_start` export: a preview-1 module must be a WASI command"
                    );
                }
                Pre::Module(
                    wt(wasm.modules.instantiate_pre(&m))
                        .context("linking the WASI preview-1 module")?,
                )
            }
        };
        let prepared = Arc::new(Prepared {
            sha256: sha256.clone(),
            engine: wasm.engine.clone(),
            ticker: wasm.ticker.clone(),
            pre,
        });
        self.loaded.lock().unwrap().insert(sha256, prepared.clone());
        Ok(LoadedHook { prepared, cache })
    }

    /// Runs a loaded hook in a fresh sandbox. Never panics and never fails: whatever the
    /// hook does is reported in the outcome.
    pub async fn run(
        &self,
        hook: &LoadedHook,
        ctx: &HookContext,
        sandbox: &Sandbox,
    ) -> HookOutcome {
        let started = Instant::now();
        let log = LogSink::new(sandbox.output_limit);
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

    #[test]
    fn the_engine_is_made_at_the_first_hook_and_ticks_only_while_one_runs() {
        let dir = tempfile::tempdir().unwrap();
        let rt = HookRuntime::new(dir.path()).unwrap();
        assert!(rt.wasm.get().is_none(), "no engine before a hook");
        // The smallest WASI command: a core module whose `_start` returns.
        let hook = rt
            .load(b"\0asm\x01\0\0\0\x01\x04\x01\x60\0\0\x03\x02\x01\0\x07\x0a\x01\x06_start\0\0\x0a\x04\x01\x02\0\x0b")
            .unwrap();
        let ticker = rt
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
