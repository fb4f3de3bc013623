//! Hook call overhead: a precompiled hook instantiated, run and dropped, against spawning
//! `sh -c true` (what a CodeDeploy script hook costs at the least), in the same run.
//!
//! Run: `bash bench/hook-overhead.sh` (or `cargo bench -p shoal-agent --bench hook_overhead`).
//! Prints medians of `SHOAL_BENCH_RUNS` (default 300) runs each and their ratio.

use std::time::{Duration, Instant};

use shoal_agent::hooks::{DirGrant, HookContext, HookRuntime, LifecycleEvent, Sandbox};
use shoal_examples::{PLAIN_COMMAND, SANDBOX_PROBE};

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn main() {
    let runs: usize = std::env::var("SHOAL_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let cache = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let hooks = HookRuntime::new(cache.path()).unwrap();
    let mut ctx = HookContext::adhoc(LifecycleEvent::ValidateService);
    ctx.params.insert("probe".into(), "ok".into());
    // The plain command appends to /work/deployments.log, so it gets a work dir.
    let work = tempfile::tempdir().unwrap();
    let sandbox = Sandbox {
        dirs: vec![DirGrant {
            host: work.path().to_path_buf(),
            guest: "/work".into(),
            writable: true,
        }],
        ..Sandbox::default()
    };

    let measure_hook = |bytes: &[u8], sandbox: &Sandbox| {
        let hook = rt.block_on(hooks.load(bytes)).unwrap(); // compiled once, before timing
        for _ in 0..20 {
            assert!(rt.block_on(hooks.run(&hook, &ctx, sandbox)).succeeded());
        }
        let samples: Vec<Duration> = (0..runs)
            .map(|_| {
                let t = Instant::now();
                let outcome = rt.block_on(hooks.run(&hook, &ctx, sandbox));
                let took = t.elapsed();
                assert!(outcome.succeeded());
                took
            })
            .collect();
        median(samples)
    };
    let shoal_hook = measure_hook(SANDBOX_PROBE.bytes, &Sandbox::default());
    let shoal_hook_dir = measure_hook(SANDBOX_PROBE.bytes, &sandbox);
    let wasi_command = measure_hook(PLAIN_COMMAND.bytes, &sandbox);

    let spawn = || {
        let t = Instant::now();
        let status = std::process::Command::new("sh")
            .args(["-c", "true"])
            .status()
            .unwrap();
        let took = t.elapsed();
        assert!(status.success());
        took
    };
    for _ in 0..20 {
        spawn();
    }
    let shell = median((0..runs).map(|_| spawn()).collect());

    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!("hook call overhead, median of {runs} runs each");
    println!("| what | median (µs) | ratio to `sh -c true` |");
    println!("|---|---:|---:|");
    println!(
        "| Shoal hook component: instantiate + run + drop | {:.0} | {:.3} |",
        us(shoal_hook),
        us(shoal_hook) / us(shell)
    );
    println!(
        "| WASI command component: instantiate + run + drop | {:.0} | {:.3} |",
        us(wasi_command),
        us(wasi_command) / us(shell)
    );
    println!(
        "| Shoal hook, with a read-write /work granted | {:.0} | {:.3} |",
        us(shoal_hook_dir),
        us(shoal_hook_dir) / us(shell)
    );
    println!("| spawn `sh -c true` and wait | {:.0} | 1.000 |", us(shell));
    let target = 0.1;
    let ratio = us(shoal_hook) / us(shell);
    println!(
        "target: Shoal hook at most {target} of the shell spawn: {}",
        if ratio <= target { "met" } else { "NOT met" }
    );
}
