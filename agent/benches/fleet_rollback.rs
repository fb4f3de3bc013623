//! Gate to rollback, with real `shoal agent` processes on 127.85.x.y (release build): a
//! canary of half the fleet (AllAtOnce within it) takes a revision whose `shoal.monitor`
//! hook fails on every host (the probe guest, failing while the app's work directory holds
//! `probe-fail`), so the health gate trips while baking and the deployment is rolled back
//! to the last good revision by itself. Measured, with `deploy status` asked every 50 ms:
//! - baking → Failed: from the bake's start to the verdict (the monitor's interval of 1 s,
//!   gossip, the gate's quarter-second look);
//! - Failed → rollback Succeeded: the rollback itself, on every host that took the bad
//!   revision;
//! - in the same run, the alternative: an operator's `deploy create --wait` of the good
//!   revision to those same hosts (AllAtOnce), the time a hand-made rollback costs once
//!   someone noticed; the ratio compares the two.
//!
//! Every host must end on the good revision (its install root is read).
//!
//! `cargo bench -p shoal-agent --bench fleet_rollback`; `SHOAL_BENCH_FLEETS` (default
//! `5,20`) are the fleet sizes, `SHOAL_BENCH_ROUNDS` (default 3) the rounds per size.
//! Results are printed as markdown, for docs/benchmarks.md.

#[path = "../../tests/support/fleet.rs"]
mod fleet;

use std::path::Path;
use std::time::{Duration, Instant};

use fleet::{Ca, agents, create, hosts, installed, json, revision, status, tag, wait_for};

const LONG: Duration = Duration::from_secs(180);
const POLL: Duration = Duration::from_millis(50);

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let fleets: Vec<usize> = std::env::var("SHOAL_BENCH_FLEETS")
        .unwrap_or_else(|_| "5,20".into())
        .split(',')
        .map(|n| {
            n.trim()
                .parse()
                .expect("SHOAL_BENCH_FLEETS: sizes, comma-separated")
        })
        .collect();
    let rounds: usize = std::env::var("SHOAL_BENCH_ROUNDS")
        .ok()
        .map(|v| v.parse().expect("SHOAL_BENCH_ROUNDS is a number"))
        .unwrap_or(3);
    println!(
        "| agents (hosts rolled back) | baking → Failed | Failed → rollback Succeeded | by hand: `deploy create --wait` of the good revision | rollback / by hand | every host on the good revision |"
    );
    println!("|---|---|---|---|---|---|");
    for (k, n) in fleets.into_iter().enumerate() {
        assert!((2..=250).contains(&n), "2 to 250 agents");
        let row = run(n, rounds, k as u8);
        println!(
            "| {n} ({}) | {} | {} | {} | {:.2} | {} of {rounds} |",
            row.rolled_back,
            mmm(&row.detect),
            mmm(&row.rollback),
            mmm(&row.by_hand),
            median(&row.rollback) / median(&row.by_hand),
            row.all_good
        );
    }
}

struct Row {
    rolled_back: usize,
    detect: Vec<f64>,
    rollback: Vec<f64>,
    by_hand: Vec<f64>,
    all_good: usize,
}

/// A revision of `tiny` with one file and, if `monitor`, the probe as a monitor every
/// second with no failure allowed.
fn tiny(root: &Path, payload: &str, monitor: bool) -> std::path::PathBuf {
    let dir = revision(root, payload);
    let mut spec = String::from(
        "version: 0.0\nos: linux\nfiles:\n  - source: payload.txt\n    destination: /srv/tiny\n",
    );
    if monitor {
        spec.push_str("shoal:\n  monitor:\n    - location: hooks/probe.wasm\n      interval: 1\n");
    }
    std::fs::write(dir.join("appspec.yml"), spec).unwrap();
    dir
}

fn run(n: usize, rounds: usize, k: u8) -> Row {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new(tmp.path(), "fleet");
    let mut fleet = agents(tmp.path(), &ca, [127, 85, k + 1], n);
    for a in fleet.iter_mut() {
        let host = a.name.clone();
        tag(a, &[("role", "web"), ("host", &host)]);
        a.log_filter = "warn".into();
        a.start();
    }
    wait_for("every agent alive", LONG, || {
        hosts(fleet[0].addr, &ca.operator)
            .is_ok_and(|l| l.len() == n && l.iter().all(|h| h["state"] == "alive"))
    });
    let good = tiny(tmp.path(), "good", false);
    let all = ["--targets", "role=web", "--config", "AllAtOnce"];
    let first = json(
        &create(
            &fleet[0],
            &ca.operator,
            &good,
            &[&all[..], &["--wait"]].concat(),
        ),
        "the good revision",
    );
    assert_eq!(first["status"], "Succeeded", "{first}");
    // Every monitor of the bad revisions fails at once: the work directories say so.
    for a in &fleet {
        let work = a.data_dir.join("apps/tiny/work");
        std::fs::create_dir_all(&work).unwrap();
        std::fs::write(work.join("probe-fail"), "").unwrap();
    }
    let mut row = Row {
        rolled_back: 0,
        detect: Vec::new(),
        rollback: Vec::new(),
        by_hand: Vec::new(),
        all_good: 0,
    };
    for r in 0..rounds {
        let bad = tiny(tmp.path(), &format!("bad-{r}"), true);
        let canary = [&all[..], &["--canary", "50%:10m"]].concat();
        let accepted = json(&create(&fleet[0], &ca.operator, &bad, &canary), "a bad one");
        let id = accepted["id"].as_str().unwrap().to_string();
        let peer = &fleet[1 % n];
        let (mut baking, mut failed, mut back) = (None, None, None);
        let mut took: Vec<String> = Vec::new();
        let start = Instant::now();
        while back.is_none() {
            assert!(
                start.elapsed() < LONG,
                "round {r}: no rollback within {LONG:?}"
            );
            if let Ok(v) = status(peer, &ca.operator, &id) {
                let now = Instant::now();
                if v["status"] == "Baking" && baking.is_none() {
                    baking = Some(now);
                }
                if v["status"] == "Failed" && failed.is_none() {
                    failed = Some(now);
                    baking.get_or_insert(now);
                    took = v["hosts"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .filter(|h| h["status"] == "Succeeded")
                        .map(|h| h["name"].as_str().unwrap().to_string())
                        .collect();
                }
                if v["rollback"]["status"] == "Succeeded" {
                    back = Some(now);
                    failed.get_or_insert(now);
                    baking.get_or_insert(now);
                }
            }
            std::thread::sleep(POLL);
        }
        let ms = |a: Instant, b: Instant| b.duration_since(a).as_secs_f64() * 1000.0;
        row.detect.push(ms(baking.unwrap(), failed.unwrap()));
        row.rollback.push(ms(failed.unwrap(), back.unwrap()));
        row.rolled_back = took.len();
        if fleet
            .iter()
            .all(|a| installed(a).as_deref() == Some("good"))
        {
            row.all_good += 1;
        }
        // By hand: the good revision again, to those same hosts.
        let targets = took
            .iter()
            .map(|h| format!("host={h}"))
            .collect::<Vec<_>>()
            .join(",");
        let t = Instant::now();
        let o = create(
            &fleet[0],
            &ca.operator,
            &good,
            &[
                "--targets",
                &targets,
                "--config",
                "AllAtOnce",
                "--group",
                "by-hand",
                "--no-rollback",
                "--wait",
            ],
        );
        row.by_hand.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(json(&o, "by hand")["status"], "Succeeded");
    }
    row
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

fn mmm(v: &[f64]) -> String {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    format!(
        "{:.0} / {:.0} / {:.0} ms",
        s[0],
        s[s.len() / 2],
        s[s.len() - 1]
    )
}
