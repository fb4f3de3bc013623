//! Zero-downtime switching under load (release build): three agents on 127.92.x.1-3, each
//! with the example inference app (the test's revisions: a `record` hook at every event,
//! the golden check after AllowTraffic), and the load client of the switch tests sending
//! `POST /predict` to the three public ports, one new connection per request, no pause.
//!
//! For each mode, switched with the kernel rule (`shoal.service.switch`, the default
//! `forward: kernel`), switched through the proxy alone (`forward: proxy`) and in place:
//! - the latency through the switch against straight to the service, in the same run:
//!   requests alternate between the public port and the serving revision's own port
//!   (`service.json`), on every host, with no deployment running (switched modes only);
//! - rolling updates (OneAtATime, v1 -> v2 -> v1 ...) under load until at least
//!   `SHOAL_BENCH_REQUESTS` (default 20000) requests were sent while one ran: requests,
//!   failed requests, p50/p99 latency during the updates, and the time without service
//!   (per host, from a failed request to the next answered one, summed).
//!
//! `cargo bench -p shoal-agent --bench switch_load`; results as markdown for
//! docs/benchmarks.md. `SHOAL_BENCH_ROUNDS` (default 3000) sets the latency rounds per
//! host; `SHOAL_BENCH_LATENCY_ONLY=1` measures only the latency.

#[path = "../../tests/support/fleet.rs"]
mod fleet;
#[path = "../../tests/support/load.rs"]
mod load;
#[path = "../../tests/support/ports.rs"]
mod ports;
#[path = "../../tests/support/switch.rs"]
mod switch;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use load::{Load, Sample, quantile};
use switch::{Three, revision_with, three};

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let number = |name: &str, default: usize| -> usize {
        std::env::var(name)
            .ok()
            .map(|v| v.parse().unwrap_or_else(|_| panic!("{name} is a number")))
            .unwrap_or(default)
    };
    let target = number("SHOAL_BENCH_REQUESTS", 20_000);
    let rounds = number("SHOAL_BENCH_ROUNDS", 3000);
    // Only the latency through the switch against direct (no updates, no in-place mode).
    let latency_only = std::env::var_os("SHOAL_BENCH_LATENCY_ONLY").is_some();
    println!(
        "| mode | updates | requests during updates | failed | p50 / p99 during updates (µs) | time without service per host (ms) |"
    );
    println!("|---|---|---|---|---|---|");
    let mut direct_rows = Vec::new();
    let modes = [
        ("switched, kernel rule", Some(60), None),
        ("switched, proxy only", Some(60), Some("proxy")),
        ("in place", None, None),
    ];
    for (n, (mode, keep, forward)) in modes.into_iter().enumerate() {
        if latency_only && keep.is_none() {
            continue;
        }
        let f = three([127, 92, n as u8 + 1], [None, None, None]);
        let revs = [
            revision_with(f.tmp.path(), "v1", keep, forward),
            revision_with(f.tmp.path(), "v2", keep, forward),
        ];
        f.succeeds(&revs[0], "AllAtOnce");
        if keep.is_some() {
            let kernel = forward.is_none();
            if !f.kernel_rules_follow(kernel) && kernel {
                println!("(no connect redirect here: the kernel rule mode measures the proxy)");
            }
            direct_rows.push(format!("{mode}:\n\n{}", through_and_direct(&f, rounds)));
        }
        if latency_only {
            continue;
        }
        let load = Load::start(&f.public(), Duration::ZERO, usize::MAX);
        let mut updates = 0;
        while load.count_in(1) < target {
            load.phase(1);
            let id = f.create(&revs[(updates + 1) % 2], "OneAtATime");
            let view = f.ended(&id);
            load.phase(0);
            assert_eq!(view["status"], "Succeeded", "{view}");
            updates += 1;
        }
        let samples = load.finish();
        let during: Vec<&Sample> = samples.iter().filter(|s| s.phase == 1).collect();
        let failed = during.iter().filter(|s| s.answer.is_err()).count();
        let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
        for s in &during {
            if let Err(e) = &s.answer {
                let kind = e.split(':').next().unwrap_or(e).to_string();
                *kinds.entry(kind).or_default() += 1;
            }
        }
        let dark: Vec<String> = (0..3)
            .map(|host| format!("{}", without_service(&samples, host).as_millis()))
            .collect();
        println!(
            "| {mode} | {updates} | {} | {failed}{} | {} / {} | {} |",
            during.len(),
            if kinds.is_empty() {
                String::new()
            } else {
                format!(" ({kinds:?})")
            },
            quantile(&during, 0.5),
            quantile(&during, 0.99),
            dark.join(" · ")
        );
    }
    for rows in direct_rows {
        println!("\n{rows}");
    }
}

/// Requests alternating between each host's public port and its serving service's own
/// port, `rounds` times per host: the latency table, through the switch and direct.
fn through_and_direct(f: &Three, rounds: usize) -> String {
    let mut through: Vec<Sample> = Vec::new();
    let mut direct: Vec<Sample> = Vec::new();
    let publics = f.public();
    let owns: Vec<SocketAddr> = (0..3)
        .map(|i| {
            let port = f.service_json(i, "service.json").unwrap()["port"]
                .as_u64()
                .unwrap() as u16;
            SocketAddr::from(([127, 0, 0, 1], port))
        })
        .collect();
    let one = |target: usize, addr: SocketAddr| {
        let began = Instant::now();
        let answer = load::predict(addr);
        Sample {
            target,
            phase: 0,
            started: began,
            latency: began.elapsed(),
            answer,
        }
    };
    for r in 0..rounds {
        for i in 0..3 {
            // Which goes first alternates too, so neither always follows the other.
            if r % 2 == 0 {
                through.push(one(i, publics[i]));
                direct.push(one(i, owns[i]));
            } else {
                direct.push(one(i, owns[i]));
                through.push(one(i, publics[i]));
            }
        }
    }
    let failed = |v: &[Sample]| v.iter().filter(|s| s.answer.is_err()).count();
    let t: Vec<&Sample> = through.iter().collect();
    let d: Vec<&Sample> = direct.iter().collect();
    let (tp50, tp99, dp50, dp99) = (
        quantile(&t, 0.5),
        quantile(&t, 0.99),
        quantile(&d, 0.5),
        quantile(&d, 0.99),
    );
    format!(
        "| path | requests | failed | p50 (µs) | p99 (µs) |\n|---|---|---|---|---|\n\
         | through the switch | {} | {} | {tp50} | {tp99} |\n\
         | direct to the service | {} | {} | {dp50} | {dp99} |\n\
         | ratio | | | {:.2} | {:.2} |",
        t.len(),
        failed(&through),
        d.len(),
        failed(&direct),
        tp50 as f64 / dp50.max(1) as f64,
        tp99 as f64 / dp99.max(1) as f64,
    )
}

/// How long `host` was without service: from each failed request (after an answered one)
/// to the next answered request, summed.
fn without_service(samples: &[Sample], host: usize) -> Duration {
    let mut mine: Vec<&Sample> = samples.iter().filter(|s| s.target == host).collect();
    mine.sort_by_key(|s| s.started);
    let mut dark = Duration::ZERO;
    let mut since: Option<Instant> = None;
    for s in mine {
        match (&s.answer, since) {
            (Err(_), None) => since = Some(s.started),
            (Ok(_), Some(from)) => {
                dark += s.started - from;
                since = None;
            }
            _ => {}
        }
    }
    dark
}
