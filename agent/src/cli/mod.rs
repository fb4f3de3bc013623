//! The `shoal` command line: argument parsing and everything the user sees. Other modules
//! log through `tracing` (to stderr, filtered by `SHOAL_LOG`); only this layer prints
//! results, as text or, with `--json`, as one JSON document on stdout. Every command exits
//! 0 exactly when the thing asked for happened, and otherwise prints a one-line reason on
//! stderr.

mod agent;
mod bundle;
mod ca;
mod demo;
mod deploy;
mod deploy_create;
mod deploy_rollback;
mod fleet;
mod hook;
mod hosts;
mod init;
mod logs;
mod ui;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Shoal: deploy applications across a fleet, batch by batch, with sandboxed Wasm hooks.
#[derive(Parser, Debug)]
#[command(name = "shoal", version, about)]
pub struct Cli {
    /// The agent to talk to.
    #[arg(
        long,
        global = true,
        env = "SHOAL_PEER",
        default_value = "127.0.0.1:7400"
    )]
    pub peer: String,
    /// An operator identity directory (ca.pem, cert.pem, key.pem).
    #[arg(long, global = true, env = "SHOAL_IDENTITY")]
    pub identity: Option<PathBuf>,
    /// Print machine-readable JSON on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Manage the fleet CA and identities.
    #[command(subcommand)]
    Ca(ca::CaCommand),
    /// Run the agent in the foreground.
    Agent(agent::AgentArgs),
    /// Make this host ready for the agent: its config, identity and directories.
    Init(init::InitArgs),
    /// Work with lifecycle hooks.
    #[command(subcommand)]
    Hook(hook::HookCommand),
    /// Pack and check bundles (revisions).
    #[command(subcommand)]
    Bundle(bundle::BundleCommand),
    /// Deploy revisions.
    #[command(subcommand)]
    Deploy(deploy::DeployCommand),
    /// Deployment groups (their targets, config and last successful revision).
    #[command(subcommand)]
    Group(fleet::GroupCommand),
    /// List every member of the mesh: name, address, state, tags, applications.
    Hosts,
    /// A fleet deployment's whole hook logs, from whichever hosts ran them.
    Logs(logs::LogsArgs),
    /// Run the built-in demonstration and exit 0 when it went as planned.
    Demo(demo::DemoArgs),
    /// The fleet dashboard in your browser, served here, through the agent at --peer.
    Ui(ui::UiArgs),
    /// A switched service's proxy (started by the agent, not by hand; decision 0022).
    #[command(hide = true)]
    SwitchProxy(SwitchProxyArgs),
}

#[derive(clap::Args, Debug)]
pub struct SwitchProxyArgs {
    /// The application's directory (its control socket is made there).
    #[arg(long)]
    pub dir: PathBuf,
    /// The public address to hold.
    #[arg(long)]
    pub listen: std::net::SocketAddr,
}

/// Parses the command line, runs the command, and turns its result into an exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    PROGRESS.store(
        !cli.json
            && std::io::IsTerminal::is_terminal(&std::io::stdout())
            && std::io::IsTerminal::is_terminal(&std::io::stderr()),
        std::sync::atomic::Ordering::Relaxed,
    );
    // The agent reports what it does (openraft only its errors: its warnings are about
    // messages of a past term, routine in a Raft); commands only warn.
    let default_level = if matches!(cli.command, Command::Agent(_) | Command::SwitchProxy(_)) {
        "info,openraft=error"
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("SHOAL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    match std::env::var("SHOAL_LOG_FORMAT").as_deref() {
        // One JSON object per line, for a log pipeline: the event's fields, and the fields
        // of the spans it happened in (deployment, app, event, host) under `spans`.
        Ok("json") => tracing_subscriber::fmt()
            .json()
            .with_current_span(false)
            .with_span_list(true)
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init(),
        other => {
            if let Ok(other) = other
                && !other.is_empty()
                && other != "text"
            {
                eprintln!("SHOAL_LOG_FORMAT={other:?} is neither `json` nor `text`: text it is");
            }
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                // Colours for a terminal only: a log file or a journal gets plain text.
                .with_ansi(
                    std::io::IsTerminal::is_terminal(&std::io::stderr())
                        && std::env::var_os("NO_COLOR").is_none(),
                )
                .init()
        }
    }
    if let Command::SwitchProxy(args) = &cli.command {
        // Its own runtime, one thread, made after it has dropped its privileges.
        return match crate::switch::proxy::main(&args.dir, args.listen) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&anyhow::anyhow!("starting the async runtime: {e}")),
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Agent(args) => agent::run(args).await,
            Command::Init(args) => init::run(args, cli.json),
            Command::Ca(cmd) => ca::run(cmd, &cli.peer, cli.identity.as_deref(), cli.json).await,
            Command::Hook(cmd) => hook::run(cmd, cli.json).await,
            Command::Bundle(cmd) => bundle::run(cmd, cli.json),
            Command::Deploy(cmd) => {
                deploy::run(cmd, &cli.peer, cli.identity.as_deref(), cli.json).await
            }
            Command::Group(cmd) => {
                fleet::run_group(cmd, &cli.peer, cli.identity.as_deref(), cli.json).await
            }
            Command::Hosts => hosts::run(&cli.peer, cli.identity.as_deref(), cli.json).await,
            Command::Logs(args) => {
                logs::run(args, &cli.peer, cli.identity.as_deref(), cli.json).await
            }
            Command::Demo(args) => demo::run(args, cli.json).await,
            Command::Ui(args) => ui::run(args, &cli.peer, cli.identity.as_deref(), cli.json).await,
            Command::SwitchProxy(_) => unreachable!("served above"),
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => fail(&e),
    }
}

fn fail(e: &anyhow::Error) -> ExitCode {
    eprintln!("error: {e:#}");
    ExitCode::FAILURE
}

/// `s` with control characters escaped (`\u{1b}` rather than a terminal escape): for
/// what other hosts gossip (names, tags, revisions) before it reaches a terminal.
fn printable(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// The first 12 characters of a revision id another host gossiped (cut by characters,
/// never bytes), printable.
fn short(revision: &str) -> String {
    printable(&revision.chars().take(12).collect::<String>())
}

/// Prints a value as pretty JSON on stdout.
fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Where compiled hooks are cached for commands run outside an agent.
fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SHOAL_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("shoal").join("hooks")
}

/// Whether progress may be drawn: not with `--json`, and only when both stdout and stderr
/// are terminals (a script that reads the output sees no progress lines). Set once by
/// [`main`].
static PROGRESS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Where progress goes: stderr, or nowhere (see [`PROGRESS`]).
fn progress_target() -> indicatif::ProgressDrawTarget {
    if PROGRESS.load(std::sync::atomic::Ordering::Relaxed) {
        indicatif::ProgressDrawTarget::stderr()
    } else {
        indicatif::ProgressDrawTarget::hidden()
    }
}

/// A spinner on stderr while something slow happens; invisible with `--json` and when
/// stdout or stderr is not a terminal.
fn spinner(message: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(None, progress_target())
        .with_style(indicatif::ProgressStyle::default_spinner());
    bar.set_message(message.to_string());
    bar.enable_steady_tick(std::time::Duration::from_millis(100));
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gossiped_text_is_cut_by_characters_and_printed_without_escapes() {
        assert_eq!(short("0123456789abcdef"), "0123456789ab");
        assert_eq!(short(&"é".repeat(20)), "é".repeat(12));
        assert_eq!(printable("a\u{1b}[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(printable("edge-1"), "edge-1");
    }

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn global_options_work_after_the_subcommand() {
        let cli = Cli::try_parse_from([
            "shoal",
            "hook",
            "run",
            "h.wasm",
            "--json",
            "--peer",
            "10.0.0.1:7400",
        ])
        .unwrap();
        assert!(cli.json);
        assert_eq!(cli.peer, "10.0.0.1:7400");
    }
}
