//! Write Shoal lifecycle hooks in Rust.
//!
//! A hook is a WebAssembly component that the Shoal agent runs at a lifecycle event
//! (BeforeInstall, ValidateService, ...). It gets a typed [`Context`], may [`log`](info) and
//! call allow-listed local HTTP endpoints through [`http`], and answers with a typed result:
//! `Ok(message)` or `Err(HookError)`. It cannot spawn processes, and it sees only the
//! directories the agent grants it: the revision (read-only, at `/revision`) and the
//! application's work directory (read-write, at `/work`).
//!
//! A complete hook:
//!
//! ```
//! use shoal_hooks::{Context, Result, bail, info};
//!
//! fn run(ctx: &Context) -> Result<String> {
//!     let port = ctx.param("port").unwrap_or("8080");
//!     info!("checking {} on port {port}", ctx.application);
//!     let health = shoal_hooks::http::get(&format!("http://127.0.0.1:{port}/health")).send()?;
//!     if health.status != 200 {
//!         bail!("health check answered {}", health.status);
//!     }
//!     Ok(format!("{} is healthy", ctx.application))
//! }
//!
//! shoal_hooks::hook!(run);
//! # fn main() {}
//! ```
//!
//! Build it with `cargo build --target wasm32-wasip2 --release` (crate type `cdylib`) and try
//! it with `shoal hook run target/wasm32-wasip2/release/my_hook.wasm --event ValidateService`.
//!
//! The same function is unit-tested natively with [`testing::TestHost`], with no Wasm
//! involved: it supplies the context, answers HTTP requests and records the log.

// The generated bindings name this crate by its public path, from inside it too.
extern crate self as shoal_hooks;

mod context;
mod error;
pub mod http;
mod log;
pub mod testing;

pub use context::{Context, Event, Host};
pub use error::{HookError, Result, ResultExt};
pub use log::{Level, log};

/// The bindings generated from `wit/hook.wit`. Hook authors use [`hook!`] instead.
#[allow(clippy::too_many_arguments)]
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "hook",
        pub_export_macro: true,
        export_macro_name: "__export_hook_world",
        default_bindings_module: "shoal_hooks::bindings",
        runtime_path: "shoal_hooks::__private::wit_bindgen::rt",
    });
}

/// Exports a function `fn(&Context) -> Result<M>` (where `M: Into<String>`) as this
/// component's hook. Use it once per crate.
#[macro_export]
macro_rules! hook {
    ($run:path) => {
        #[doc(hidden)]
        struct __ShoalHook;

        impl $crate::bindings::Guest for __ShoalHook {
            fn run(
                ctx: $crate::bindings::shoal::hooks::types::Context,
            ) -> ::core::result::Result<::std::string::String, ::std::string::String> {
                $crate::__private::dispatch(ctx, $run)
            }
        }

        $crate::bindings::__export_hook_world!(__ShoalHook with_types_in $crate::bindings);
    };
}

#[doc(hidden)]
pub mod __private {
    pub use wit_bindgen;

    use crate::bindings::shoal::hooks::types as wit;
    use crate::{Context, Result};

    /// Converts the ABI's context, runs the hook, converts its result back.
    pub fn dispatch<M: Into<String>>(
        ctx: wit::Context,
        run: impl FnOnce(&Context) -> Result<M>,
    ) -> core::result::Result<String, String> {
        let ctx = Context::from(ctx);
        run(&ctx).map(Into::into).map_err(|e| e.to_string())
    }
}
