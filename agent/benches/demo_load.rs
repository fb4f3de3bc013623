//! The demo's load, phase by phase (release build): `shoal demo --json` run
//! `SHOAL_BENCH_ROUNDS` times (default 3), each a fresh fleet of five agents on loopback
//! with the load generator sending predictions to every host while v2 rolls out behind a
//! canary and v3-broken fails on its canary and is rolled back. Per phase: requests and
//! failed requests (min / median / max over the rounds) and the failures' kinds, as the
//! load generator counted them. The steady phases are the baseline (no deployment runs);
//! the rollouts' failures were the in-place restarts (none since the examples are switched).
//!
//! `cargo bench -p shoal-agent --bench demo_load`; results as markdown for
//! docs/benchmarks.md.

use std::collections::BTreeMap;
use std::process::Command;

/// One phase in one round: requests, failed requests, failures by kind.
type Round = (u64, u64, BTreeMap<String, u64>);

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rounds: usize = std::env::var("SHOAL_BENCH_ROUNDS")
        .ok()
        .map(|v| v.parse().expect("SHOAL_BENCH_ROUNDS is a number"))
        .unwrap_or(3);
    let mut phases: Vec<String> = Vec::new();
    let mut seen: BTreeMap<String, Vec<Round>> = BTreeMap::new();
    let mut planned = 0;
    for round in 0..rounds {
        let o = Command::new(env!("CARGO_BIN_EXE_shoal"))
            .args(["demo", "--json"])
            .output()
            .expect("running shoal demo");
        let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
            panic!(
                "round {round}: no summary ({e}): {}",
                String::from_utf8_lossy(&o.stderr)
            )
        });
        if summary["as_planned"] == true {
            planned += 1;
        }
        for p in summary["phases"].as_array().expect("phases") {
            let name = p["phase"].as_str().unwrap().to_string();
            if !phases.contains(&name) {
                phases.push(name.clone());
            }
            let kinds = p["failures"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
                .collect();
            seen.entry(name).or_default().push((
                p["requests"].as_u64().unwrap(),
                p["failed"].as_u64().unwrap(),
                kinds,
            ));
        }
    }
    println!(
        "| phase | requests | failed | failed / requests (median round) | failures (all rounds) |"
    );
    println!("|---|---|---|---|---|");
    for name in &phases {
        let rows = &seen[name];
        let requests: Vec<u64> = rows.iter().map(|r| r.0).collect();
        let failed: Vec<u64> = rows.iter().map(|r| r.1).collect();
        let mut kinds: BTreeMap<&str, u64> = BTreeMap::new();
        for (_, _, k) in rows {
            for (kind, n) in k {
                *kinds.entry(kind).or_default() += n;
            }
        }
        let ratio = {
            let mut r: Vec<f64> = rows
                .iter()
                .map(|r| r.1 as f64 / r.0.max(1) as f64)
                .collect();
            r.sort_by(f64::total_cmp);
            r[r.len() / 2]
        };
        println!(
            "| {name} | {} | {} | {:.2} % | {} |",
            mmm(&requests),
            mmm(&failed),
            ratio * 100.0,
            if kinds.is_empty() {
                "none".to_string()
            } else {
                kinds
                    .iter()
                    .map(|(k, n)| format!("{k}: {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        );
    }
    println!("\n{planned} of {rounds} rounds went as planned.");
}

/// `min / median / max`.
fn mmm(values: &[u64]) -> String {
    let mut v = values.to_vec();
    v.sort_unstable();
    format!("{} / {} / {}", v[0], v[v.len() / 2], v[v.len() - 1])
}
