//! Lifecycle hooks as sandboxed WebAssembly: the runtime that compiles, caches and runs
//! them, the sandbox they run in, and what they are told.
//!
//! The ABI is `hooks-sdk/wit/hook.wit`; this module is its host. A caller builds a
//! [`HookContext`] and a [`Sandbox`], loads a hook with [`HookRuntime::load_file`] and runs
//! it with [`HookRuntime::run`], which always returns a [`HookOutcome`]: the hook cannot
//! harm the agent, whatever it does.

mod cache;
mod context;
mod http;
mod output;
mod runtime;
mod sandbox;

pub use cache::{CacheRefusal, CacheStatus};
pub use context::{HookContext, LifecycleEvent, hostname};
pub use output::CapturedLog;
pub use runtime::{
    HookFailure, HookKind, HookLimits, HookOutcome, HookRuntime, HookStatus, LoadError, LoadedHook,
    MAX_CONCURRENT_HOOKS,
};
pub use sandbox::{DirGrant, HttpAllow, Sandbox};
