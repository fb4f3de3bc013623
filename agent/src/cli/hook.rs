//! `shoal hook run`: run one hook here, in the same sandbox the agent uses, and print its
//! log. This is how hook authors try a hook.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use crate::hooks::{DirGrant, HookContext, HookRuntime, HttpAllow, LifecycleEvent, Sandbox};

#[derive(Subcommand, Debug)]
pub enum HookCommand {
    /// Run a hook (.wasm) here and print its log; exits 0 exactly when it succeeded.
    Run(RunArgs),
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The hook: a Shoal hook component, a WASI command component or a WASI preview-1 module.
    pub hook: PathBuf,
    /// The lifecycle event to run it for.
    #[arg(long, default_value = "ValidateService")]
    pub event: LifecycleEvent,
    /// Grant a host directory: HOST_PATH[:GUEST_PATH][:ro|:rw] (read-only unless `:rw`).
    #[arg(long = "dir", value_name = "HOST_PATH[:GUEST_PATH][:ro|:rw]")]
    pub dirs: Vec<DirGrant>,
    /// An environment variable for the hook, in addition to CodeDeploy's.
    #[arg(long = "env", value_name = "K=V", value_parser = key_value)]
    pub env: Vec<(String, String)>,
    /// A deployment parameter in the hook's context.
    #[arg(long = "param", value_name = "K=V", value_parser = key_value)]
    pub params: Vec<(String, String)>,
    /// Stop the hook after this many seconds.
    #[arg(long, default_value_t = 60.0, value_name = "SECS")]
    pub timeout: f64,
    /// Let the hook's HTTP client reach HOST:PORT.
    #[arg(long = "allow-http", value_name = "HOST:PORT")]
    pub allow_http: Vec<HttpAllow>,
    /// Cap the hook's memory, in MiB.
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    pub memory: usize,
    /// The application name in the hook's context.
    #[arg(long, default_value = "local")]
    pub app: String,
    /// Where compiled hooks are cached (default: $SHOAL_CACHE_DIR or ~/.cache/shoal/hooks).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
}

fn key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("`{s}`: expected KEY=VALUE")),
    }
}

pub async fn run(cmd: HookCommand, json: bool) -> Result<bool> {
    let HookCommand::Run(args) = cmd;
    if !(args.timeout > 0.0 && args.timeout.is_finite()) {
        anyhow::bail!(
            "--timeout must be a positive number of seconds, not {}",
            args.timeout
        );
    }
    let cache_dir = args
        .cache_dir
        .clone()
        .unwrap_or_else(super::default_cache_dir);
    let runtime = HookRuntime::new(&cache_dir)?;
    let progress = super::spinner(&format!("loading {}", args.hook.display()));
    let loaded = runtime.load_file(&args.hook).await;
    progress.finish_and_clear();
    let hook = loaded?;

    let mut ctx = HookContext::adhoc(args.event);
    ctx.application = args.app;
    ctx.params = args.params.into_iter().collect();
    let sandbox = Sandbox {
        dirs: args.dirs,
        http_allow: args.allow_http,
        env: args.env,
        timeout: Duration::from_secs_f64(args.timeout),
        memory_limit: args
            .memory
            .checked_mul(1 << 20)
            .context("--memory is too large")?,
        ..Sandbox::default()
    };
    let outcome = runtime.run(&hook, &ctx, &sandbox).await;

    if json {
        super::print_json(&outcome)?;
    } else {
        print!("{}", outcome.log.text);
        if !outcome.log.text.is_empty() && !outcome.log.text.ends_with('\n') {
            println!();
        }
        if outcome.succeeded() {
            println!(
                "{} Succeeded: {} ({} ms)",
                args.event,
                outcome.summary(),
                outcome.elapsed_ms
            );
        }
    }
    if !outcome.succeeded() {
        eprintln!("error: {} hook failed: {}", args.event, outcome.summary());
    }
    Ok(outcome.succeeded())
}
