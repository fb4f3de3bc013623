//! A lifecycle hook written as a plain WASI command, without the Shoal SDK: the way a hook
//! in any language that compiles to WASI looks. It reads CodeDeploy's environment variables,
//! prints to stdout (its log), appends a line to `/work/deployments.log` and exits 0. Exit
//! status 1 fails the hook; here that happens when no writable `/work` was granted.
//!
//! Built for both `wasm32-wasip2` (a `wasi:cli/command` component) and `wasm32-wasip1` (a
//! preview-1 core module); the agent runs either.

use std::io::Write;

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| "(unset)".to_string())
}

fn main() {
    let event = var("LIFECYCLE_EVENT");
    let line = format!(
        "{event} deployment={} application={} group={} group_id={}",
        var("DEPLOYMENT_ID"),
        var("APPLICATION_NAME"),
        var("DEPLOYMENT_GROUP_NAME"),
        var("DEPLOYMENT_GROUP_ID"),
    );
    println!("{line}");

    let appended = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open("/work/deployments.log")
        .and_then(|mut f| writeln!(f, "{line}"));
    if let Err(e) = appended {
        eprintln!("cannot record the deployment in /work/deployments.log: {e}");
        std::process::exit(1);
    }
    println!("recorded {event} in /work/deployments.log");
}
