//! Fleet deployment benchmarks with real `shoal agent` processes on 127.82.1.x (release
//! build), every host's revision a no-op (one file, no hooks):
//! - trigger to all Succeeded: the wall time of `shoal deploy create --wait` with
//!   AllAtOnce on all N agents, beside the same revision's `shoal deploy local` into a
//!   scratch data dir, N times in the same run (the slowest of them is what one host alone
//!   costs), and the time the verdict was committed, from the coordinator's log;
//! - per-batch overhead: OneAtATime over the N agents, the wall time of `create --wait`
//!   over the number of batches (there are no hooks to subtract), and the batch cycle taken
//!   from the coordinator's log (host command to result, result to the next batch);
//! - coordinator failover: during a OneAtATime deployment over every agent but the
//!   leader (at most 32), `kill -9` of the leader as soon as its log shows the first host's
//!   result; the time from the kill to the next batch starting, as `deploy status` asked
//!   every 50 ms (of the surviving agents in turn) shows it (a host the dead coordinator
//!   never started leaves Pending), and as the new coordinator's log has it; then every
//!   host must have run the lifecycle exactly once (its deployment records counted on
//!   disk). The killed agent is started again before the next round.
//!
//! `cargo bench -p shoal-agent --bench fleet_deploy`; `SHOAL_BENCH_AGENTS` (default 20)
//! and `SHOAL_BENCH_FAILOVERS` (default 5) pick the sizes; `SHOAL_BENCH_LOG` is the agents'
//! log filter and `SHOAL_BENCH_KEEP=1` keeps their files. Results are printed as markdown,
//! for docs/benchmarks.md.

#[path = "../../tests/support/fleet.rs"]
mod fleet;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use fleet::{Agent, Ca, agents, hosts, shoal, wait_for};

const LONG: Duration = Duration::from_secs(180);
/// How often `deploy status` is asked while a failover is watched.
const POLL_EVERY: Duration = Duration::from_millis(50);
/// How long one of those asks may take before it is abandoned (an agent asked just after
/// the coordinator died may wait on the dead one).
const ASK_WITHIN: Duration = Duration::from_secs(2);
/// Asks in flight at once while a failover is watched.
const IN_FLIGHT: usize = 6;
/// Repetitions of the trigger measurement.
const TRIGGERS: usize = 5;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // cargo test --benches asks for a listing: nothing to list
    }
    let n: usize = std::env::var("SHOAL_BENCH_AGENTS")
        .ok()
        .map(|v| v.parse().expect("SHOAL_BENCH_AGENTS is a number"))
        .unwrap_or(20);
    let failovers: usize = std::env::var("SHOAL_BENCH_FAILOVERS")
        .ok()
        .map(|v| v.parse().expect("SHOAL_BENCH_FAILOVERS is a number"))
        .unwrap_or(5);
    assert!((6..=250).contains(&n), "6 to 250 agents");
    let mut bench = Bench::start(n);
    let trigger = bench.trigger();
    let batches = bench.per_batch();
    let failover = bench.failovers(failovers);

    println!();
    println!("| {n} agents | result | target |");
    println!("|---|---|---|");
    println!(
        "| trigger → all Succeeded, AllAtOnce on {n} (`deploy create --wait`), median of {TRIGGERS} | {:.0} ms ({}) | ≤ 1 s |",
        median(&trigger.wall),
        list_ms(&trigger.wall)
    );
    println!(
        "| ... trigger → verdict committed (coordinator's log) | {:.0} ms ({}) | |",
        median(&trigger.verdict),
        list_ms(&trigger.verdict)
    );
    if !trigger.phases.is_empty() {
        let phase = |k: usize| median(&trigger.phases.iter().map(|p| p[k]).collect::<Vec<_>>());
        println!(
            "| ... CLI start → created (pack, upload, sign, forward, commit) / → batch started / → last host's result committed / → verdict committed / → CLI exit (medians) | {:.0} / {:.0} / {:.0} / {:.0} / {:.0} ms | |",
            phase(0),
            phase(1),
            phase(2),
            phase(3),
            phase(4)
        );
    }
    println!(
        "| one host alone: `deploy local` of the same revision, slowest / median of {} | {:.0} / {:.0} ms | |",
        trigger.local.len(),
        max(&trigger.local),
        median(&trigger.local)
    );
    println!(
        "| fleet / slowest single host | {:.1} | |",
        median(&trigger.wall) / max(&trigger.local)
    );
    println!(
        "| per-batch overhead, OneAtATime over {n} (wall / batches, no hooks) | {:.0} ms ({:.2} s for {} batches) | ≤ 50 ms |",
        batches.wall_ms / batches.batches as f64,
        batches.wall_ms / 1000.0,
        batches.batches
    );
    println!(
        "| ... batch cycle from the coordinator's log: start to next start / host command to result / result to next start (median) | {:.0} / {:.0} / {:.0} ms | |",
        batches.cycle_ms, batches.host_ms, batches.log_ms
    );
    for why in &failover.skipped {
        println!("| failover round skipped | {why} | |");
    }
    if failover.rounds.is_empty() {
        println!("| coordinator failover | not run | |");
    } else {
        let seen: Vec<f64> = failover.rounds.iter().map(|r| r.status_ms).collect();
        let logged: Vec<f64> = failover.rounds.iter().map(|r| r.batch_log_ms).collect();
        let first: Vec<f64> = failover.rounds.iter().map(|r| r.command_log_ms).collect();
        let ended: Vec<f64> = failover.rounds.iter().map(|r| r.ended_ms).collect();
        println!(
            "| failover: kill -9 → next batch, `deploy status` every 50 ms (min / median / max of {}) | {} | |",
            seen.len(),
            mmm(&seen)
        );
        println!(
            "| ... kill → next batch started, new coordinator's log | {} | |",
            mmm(&logged)
        );
        println!(
            "| ... kill → new coordinator's first command (re-commanding the host in flight, if any) | {} | |",
            mmm(&first)
        );
        println!(
            "| ... kill → deployment Succeeded, seen by `deploy status` | {} | |",
            mmm(&ended)
        );
        println!(
            "| ... rounds where every host ran exactly once / deployment Succeeded | {} / {} of {} | all |",
            failover.rounds.iter().filter(|r| r.exactly_once).count(),
            failover.rounds.iter().filter(|r| r.succeeded).count(),
            failover.rounds.len()
        );
        println!(
            "| ... restarted coordinator seen alive again (min / median / max) | {} | |",
            mmm(&failover.rejoin_ms)
        );
    }
    println!(
        "| trigger and per-batch deployments: every host ran exactly once | {} | yes |",
        if bench.once { "yes" } else { "NO" }
    );
    if !failover.rounds.is_empty() {
        println!();
        println!(
            "| failover | killed | new coordinator | next batch: status / log (ms) | first command (ms) | Succeeded (ms) | exactly once |"
        );
        println!("|---|---|---|---|---|---|---|");
        for (k, r) in failover.rounds.iter().enumerate() {
            println!(
                "| {} | {} | {} | {:.0} / {:.0} | {:.0} | {:.0} | {} |",
                k + 1,
                r.victim,
                r.coordinator,
                r.status_ms,
                r.batch_log_ms,
                r.command_log_ms,
                r.ended_ms,
                if r.exactly_once { "yes" } else { "NO" }
            );
        }
    }
    print_failures(&bench.failures);
}

/// Prints the host failures seen, if any.
fn print_failures(failures: &[String]) {
    if failures.is_empty() {
        return;
    }
    println!();
    println!("Host failures seen ({}):", failures.len());
    for f in failures {
        println!("- {f}");
    }
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::MIN, f64::max)
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::MAX, f64::min)
}

fn mmm(v: &[f64]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    format!("{:.0} / {:.0} / {:.0} ms", min(v), median(v), max(v))
}

fn list_ms(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Bench {
    n: usize,
    _tmp: tempfile::TempDir,
    root: PathBuf,
    ca: Ca,
    fleet: Vec<Agent>,
    /// Lifecycle runs each host should have had so far.
    /// The revisions each host should have run, one lifecycle run each (it Succeeded).
    expected: BTreeMap<String, Vec<String>>,
    /// Revisions a host may have run once or not at all (it Failed: refused before the
    /// lifecycle, or failed in it).
    maybe: BTreeMap<String, Vec<String>>,
    revisions: usize,
    /// The last deployment created.
    last: Option<String>,
    /// Hosts that failed, in any deployment: deployment, host, reason.
    failures: Vec<String>,
    /// Whether every exactly-once check outside the failovers held.
    once: bool,
}

struct Trigger {
    wall: Vec<f64>,
    verdict: Vec<f64>,
    local: Vec<f64>,
    /// Per run: CLI start to created (pack, upload, sign, forward, commit), created to the
    /// batch started, batch started to the last host's result committed, that to the
    /// verdict committed, the verdict to the CLI's exit (its polling).
    phases: Vec<[f64; 5]>,
}

struct Batches {
    batches: usize,
    wall_ms: f64,
    cycle_ms: f64,
    host_ms: f64,
    log_ms: f64,
}

#[derive(Debug)]
struct Round {
    victim: String,
    coordinator: String,
    status_ms: f64,
    batch_log_ms: f64,
    command_log_ms: f64,
    ended_ms: f64,
    succeeded: bool,
    exactly_once: bool,
}

struct Failovers {
    rounds: Vec<Round>,
    rejoin_ms: Vec<f64>,
    /// Rounds not measured, and why.
    skipped: Vec<String>,
}

/// The lines a log file gained since the last look.
struct LogTail {
    path: PathBuf,
    offset: u64,
    partial: String,
}

impl LogTail {
    /// From the end of the file as it is now.
    fn new(path: &Path) -> LogTail {
        let offset = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        LogTail {
            path: path.to_path_buf(),
            offset,
            partial: String::new(),
        }
    }

    /// Whether a line written since the last look contains every needle.
    fn grep(&mut self, needles: &[&str]) -> bool {
        use std::io::{Read, Seek, SeekFrom};
        let Ok(mut file) = std::fs::File::open(&self.path) else {
            return false;
        };
        if file.seek(SeekFrom::Start(self.offset)).is_err() {
            return false;
        }
        let mut fresh = String::new();
        let Ok(read) = file.read_to_string(&mut fresh) else {
            return false;
        };
        self.offset += read as u64;
        self.partial.push_str(&fresh);
        let complete = match self.partial.rfind('\n') {
            Some(end) => {
                let lines: String = self.partial.drain(..=end).collect();
                lines
            }
            None => return false,
        };
        complete
            .lines()
            .any(|l| needles.iter().all(|n| l.contains(n)))
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        for a in self.fleet.iter_mut() {
            a.kill();
        }
        if std::env::var_os("SHOAL_BENCH_KEEP").is_some() {
            let tmp = std::mem::replace(&mut self._tmp, tempfile::tempdir().unwrap());
            let _ = tmp.keep();
        }
    }
}

impl Bench {
    /// Starts the agents, founds the log with a first deployment on all of them and waits
    /// for five voters.
    fn start(n: usize) -> Bench {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        if std::env::var_os("SHOAL_BENCH_KEEP").is_some() {
            eprintln!("keeping the agents' files in {}", root.display());
        }
        let ca = Ca::new(&root, "fleet");
        let mut fleet = agents(&root, &ca, [127, 82, 1], n);
        for a in fleet.iter_mut() {
            let text = std::fs::read_to_string(&a.config).unwrap();
            let head = text.split("[tags]").next().unwrap().to_string();
            std::fs::write(
                &a.config,
                format!("{head}[tags]\nbench = \"yes\"\nhost = \"{}\"\n", a.name),
            )
            .unwrap();
            // What `shoal agent` logs by default, or SHOAL_BENCH_LOG.
            a.log_filter =
                std::env::var("SHOAL_BENCH_LOG").unwrap_or_else(|_| "info,openraft=error".into());
            a.start();
        }
        let took = wait_for("the fleet to converge", LONG, || {
            all_alive(&fleet[n - 1], &ca, n)
        });
        eprintln!("{n} agents converged {took:?} after start");
        let expected: BTreeMap<String, Vec<String>> =
            fleet.iter().map(|a| (a.name.clone(), Vec::new())).collect();
        let mut bench = Bench {
            n,
            _tmp: tmp,
            root,
            ca,
            fleet,
            maybe: expected.clone(),
            expected,
            revisions: 0,
            last: None,
            failures: Vec::new(),
            once: true,
        };
        // The first deployment founds the log (at agent-1) and warms every host up.
        let (o, _) = bench.create(0, "bench=yes", "AllAtOnce", true);
        let view = json(&o, "the founding deployment");
        bench.note_failures("the founding deployment", &view);
        bench.ran(&view);
        let took = wait_for("five voters", LONG, || {
            hosts(bench.fleet[n - 1].addr, &bench.ca.operator).is_ok_and(|l| voters_alive(&l) == 5)
        });
        eprintln!("five voters {took:?} after the founding deployment");
        bench
    }

    /// A new no-op revision: one file, no hooks.
    fn revision(&mut self) -> PathBuf {
        self.revisions += 1;
        let dir = self.root.join(format!("rev-{}", self.revisions));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("appspec.yml"),
            "version: 0.0\nos: linux\nfiles:\n  - source: payload.txt\n    destination: /srv/tiny\n",
        )
        .unwrap();
        std::fs::write(dir.join("payload.txt"), format!("v{}", self.revisions)).unwrap();
        dir
    }

    /// `deploy create` of a new revision, asked of agent `via`; its output and the
    /// revision's directory.
    fn create(&mut self, via: usize, targets: &str, config: &str, wait: bool) -> (Output, PathBuf) {
        let bundle = self.revision();
        let mut cmd = shoal();
        cmd.args(["deploy", "create", "--app", "tiny", "--json", "--peer"])
            .arg(self.fleet[via].addr.to_string())
            .arg("--identity")
            .arg(&self.ca.operator)
            .arg("--bundle")
            .arg(&bundle)
            .args(["--targets", targets, "--config", config]);
        if wait {
            cmd.arg("--wait");
        }
        (cmd.output().unwrap(), bundle)
    }

    /// Counts the hosts of a deployment view as having run once more.
    /// Keeps the hosts of a deployment that ended that Failed, with their reasons.
    fn note_failures(&mut self, what: &str, view: &serde_json::Value) {
        if view["status"] != "Succeeded" {
            self.failures.push(format!(
                "{what}: the deployment {} {}: {}",
                view["id"], view["status"], view["reason"]
            ));
        }
        for h in view["hosts"].as_array().into_iter().flatten() {
            if h["status"] == "Failed" {
                self.failures.push(format!(
                    "{what}: {} failed: {}",
                    h["name"].as_str().unwrap_or("?"),
                    h["reason"]
                ));
            }
        }
    }

    /// Takes note of what a deployment that ended asked of each host: a host that
    /// Succeeded ran the lifecycle once, a Skipped one never, a Failed one at most once.
    fn ran(&mut self, view: &serde_json::Value) {
        let revision = view["revision"].as_str().unwrap().to_string();
        for (host, status) in statuses(view) {
            match status.as_str() {
                "Succeeded" => self.expected.get_mut(&host).unwrap().push(revision.clone()),
                "Failed" => self.maybe.get_mut(&host).unwrap().push(revision.clone()),
                _ => {}
            }
        }
    }

    /// Whether every host ran the lifecycle exactly once for each revision it Succeeded
    /// with, at most once for each it Failed with, and for nothing else; says which do not.
    fn exactly_once(&self) -> bool {
        let mut ok = true;
        for a in &self.fleet {
            let got = runs(a);
            let (want, maybe) = (&self.expected[&a.name], &self.maybe[&a.name]);
            let times = |r: &String| got.iter().filter(|g| *g == r).count();
            let missing: Vec<&String> = want.iter().filter(|r| times(r) == 0).collect();
            let twice: BTreeSet<&String> = got.iter().filter(|r| times(r) > 1).collect();
            let unasked: BTreeSet<&String> = got
                .iter()
                .filter(|r| !want.contains(r) && !maybe.contains(r))
                .collect();
            if !(missing.is_empty() && twice.is_empty() && unasked.is_empty()) {
                eprintln!(
                    "{}: {} lifecycle runs; never ran {missing:?}; ran more than once {twice:?}; \
                     ran unasked {unasked:?}",
                    a.name,
                    got.len()
                );
                ok = false;
            }
        }
        ok
    }

    /// The agent that leads the log now, as an answer about `id` names it.
    fn leader(&self, id: &str) -> String {
        let mut name = String::new();
        wait_for("an answer naming the coordinator", LONG, || {
            self.fleet
                .iter()
                .rev()
                .filter(|a| a.child.is_some())
                .find_map(|a| status_within(a, &self.ca.operator, id, ASK_WITHIN).ok())
                .and_then(|v| v["coordinator"].as_str().map(String::from))
                .map(|c| name = c)
                .is_some()
        });
        name
    }

    fn trigger(&mut self) -> Trigger {
        let n = self.n;
        let mut t = Trigger {
            wall: Vec::new(),
            verdict: Vec::new(),
            local: Vec::new(),
            phases: Vec::new(),
        };
        for _ in 0..TRIGGERS {
            let sent = SystemTime::now();
            let began = Instant::now();
            let (o, bundle) = self.create(n - 1, "bench=yes", "AllAtOnce", true);
            let wall = began.elapsed();
            let view = json(&o, "deploy create --wait (AllAtOnce)");
            self.note_failures("AllAtOnce", &view);
            self.ran(&view);
            let id = view["id"].as_str().unwrap();
            t.wall.push(ms(wall));
            // Where the time went, from the coordinator's log.
            let coordinator = view["coordinator"].as_str().unwrap();
            let log = self
                .fleet
                .iter()
                .find(|a| a.name == coordinator)
                .unwrap()
                .log_text();
            let at = |what: &str| log_time(&log, &[what, id]);
            let reports = log_times(&log, &["host reported", id]);
            if let (Some(created), Some(started), Some(reported), Some(ended)) = (
                at("deployment created"),
                at("batch started"),
                reports.last().copied(),
                at("deployment ended"),
            ) {
                t.verdict.push(since(sent, ended));
                t.phases.push([
                    since(sent, created),
                    since(created, started),
                    since(started, reported),
                    since(reported, ended),
                    ms(wall) - since(sent, ended),
                ]);
            }
            eprintln!("AllAtOnce on {n}: {wall:?}");
            // The same revision on one host alone, n times (one per host of the fleet).
            if t.local.is_empty() {
                for i in 0..n {
                    let scratch = self.root.join(format!("local-{i}"));
                    let began = Instant::now();
                    let o = shoal()
                        .args(["deploy", "local", "--json", "--app", "tiny", "--bundle"])
                        .arg(&bundle)
                        .arg("--data-dir")
                        .arg(scratch.join("data"))
                        .arg("--install-root")
                        .arg(scratch.join("root"))
                        .output()
                        .unwrap();
                    let took = began.elapsed();
                    let record = json(&o, "deploy local");
                    assert_eq!(record["status"], "Succeeded", "{record}");
                    t.local.push(ms(took));
                }
            }
        }
        self.once &= self.exactly_once();
        t
    }

    fn per_batch(&mut self) -> Batches {
        let n = self.n;
        let began = Instant::now();
        let (o, _) = self.create(n - 1, "bench=yes", "OneAtATime", true);
        let wall = began.elapsed();
        let view = json(&o, "deploy create --wait (OneAtATime)");
        self.note_failures("OneAtATime", &view);
        self.ran(&view);
        let batches = batches_run(&view);

        let id = view["id"].as_str().unwrap().to_string();
        self.last = Some(id.clone());
        let coordinator = view["coordinator"].as_str().unwrap().to_string();
        let log = self
            .fleet
            .iter()
            .find(|a| a.name == coordinator)
            .unwrap()
            .log_text();
        let starts = log_times(&log, &["batch started", &id]);
        let reports = log_times(&log, &["host reported", &id]);
        let mut cycle = Vec::new();
        let mut host = Vec::new();
        let mut gap = Vec::new();
        for k in 0..starts.len().min(reports.len()) {
            host.push(since(starts[k], reports[k]));
            if k + 1 < starts.len() {
                cycle.push(since(starts[k], starts[k + 1]));
                gap.push(since(reports[k], starts[k + 1]));
            }
        }
        eprintln!("OneAtATime over {n}: {wall:?}; cycles (ms) {cycle:?}");
        self.once &= self.exactly_once();
        Batches {
            batches,
            wall_ms: ms(wall),
            cycle_ms: if cycle.is_empty() {
                0.0
            } else {
                median(&cycle)
            },
            host_ms: if host.is_empty() { 0.0 } else { median(&host) },
            log_ms: if gap.is_empty() { 0.0 } else { median(&gap) },
        }
    }

    fn failovers(&mut self, rounds: usize) -> Failovers {
        let mut f = Failovers {
            rounds: Vec::new(),
            rejoin_ms: Vec::new(),
            skipped: Vec::new(),
        };
        let mut last_id = self.last.clone().expect("a deployment ran");
        for round in 0..rounds {
            // Every agent alive and five voters alive, so the kill leaves a majority.
            let n = self.n;
            wait_for("all agents alive and five voters", LONG, || {
                hosts(self.fleet[n - 1].addr, &self.ca.operator).is_ok_and(|l| {
                    l.len() == n && l.iter().all(|h| h["state"] == "alive") && voters_alive(&l) == 5
                })
            });
            let leader = self.leader(&last_id);
            let leader_at = self.fleet.iter().position(|a| a.name == leader).unwrap();
            // Every agent but the leader (at most 32: one tag group's filters).
            let targets: Vec<String> = self
                .fleet
                .iter()
                .filter(|a| a.name != leader)
                .take(32)
                .map(|a| a.name.clone())
                .collect();
            let filter = targets
                .iter()
                .map(|t| format!("host={t}"))
                .collect::<Vec<_>>()
                .join(",");
            let watcher = (0..n).rev().find(|&i| i != leader_at).unwrap();
            let mut victim_log = LogTail::new(&self.fleet[leader_at].log);
            let (o, _) = self.create(watcher, &filter, "OneAtATime", false);
            let accepted = json(&o, "deploy create (OneAtATime, failover)");
            let id = accepted["id"].as_str().unwrap().to_string();
            let operator = self.ca.operator.clone();
            let victim = accepted["coordinator"].as_str().unwrap().to_string();
            if victim != leader {
                // The leadership moved between the question and the creation: the
                // coordinator is a target, and killing it would kill a host's run.
                f.skipped.push(format!(
                    "round {}: {leader} led when asked, {victim} when created",
                    round + 1
                ));
                let mut last = serde_json::Value::Null;
                wait_for("the deployment to end", LONG, || {
                    status_within(&self.fleet[watcher], &operator, &id, ASK_WITHIN).is_ok_and(|v| {
                        let ended = !matches!(v["status"].as_str(), Some("InProgress" | "Created"));
                        last = v;
                        ended
                    })
                });
                self.note_failures("failover (not measured)", &last);
                self.ran(&last);
                last_id = id;
                continue;
            }
            let victim_at = leader_at;

            // As soon as its first host has reported (by its own log), the coordinator dies.
            let needle = [id.as_str(), "host reported"];
            let until = Instant::now() + LONG;
            while !victim_log.grep(&needle) {
                assert!(Instant::now() < until, "no host reported to {victim}");
                std::thread::sleep(Duration::from_millis(2));
            }
            let killed_at = SystemTime::now();
            let killed = Instant::now();
            self.fleet[victim_at].kill();
            // What the dead coordinator had started, from its own log.
            let victim_log = self.fleet[victim_at].log_text();
            let started: BTreeSet<String> = victim_log
                .lines()
                .filter(|l| l.contains("batch started") && l.contains(id.as_str()))
                .flat_map(hosts_of_line)
                .collect();

            // The first answer in which a host it never started has left Pending.
            let moved = |v: &serde_json::Value| {
                statuses(v)
                    .iter()
                    .any(|(h, s)| s != "Pending" && !started.contains(h))
            };
            let survivors: Vec<String> = self
                .fleet
                .iter()
                .filter(|a| a.name != victim)
                .map(|a| a.addr.to_string())
                .collect();
            let polled = poll(&survivors, &operator, &id, &moved, Duration::from_secs(60));
            let status_ms = polled
                .map(|at| ms(at.duration_since(killed)))
                .unwrap_or(f64::NAN);

            // Until it ends.
            let mut last = serde_json::Value::Null;
            wait_for("the deployment to end", LONG, || {
                status_within(&self.fleet[watcher], &operator, &id, ASK_WITHIN).is_ok_and(|v| {
                    let ended = !matches!(v["status"].as_str(), Some("InProgress" | "Created"));
                    last = v;
                    ended
                })
            });
            let ended_ms = ms(killed.elapsed());
            self.note_failures(&format!("failover {}", round + 1), &last);
            self.ran(&last);
            let succeeded = last["status"] == "Succeeded";
            let coordinator = last["coordinator"].as_str().unwrap_or("?").to_string();

            // From the survivors' logs: the first command of a new coordinator, and the
            // first batch with a host the dead one never started.
            let mut first_command = None::<SystemTime>;
            let mut next_batch = None::<SystemTime>;
            for a in self.fleet.iter().filter(|a| a.name != victim) {
                for line in a.log_text().lines() {
                    if !(line.contains("batch started") && line.contains(id.as_str())) {
                        continue;
                    }
                    let t = parse_time(line);
                    if t < killed_at {
                        continue;
                    }
                    first_command = Some(first_command.map_or(t, |f| f.min(t)));
                    if hosts_of_line(line).iter().any(|h| !started.contains(h)) {
                        next_batch = Some(next_batch.map_or(t, |f| f.min(t)));
                    }
                }
            }
            let after = |t: Option<SystemTime>| {
                t.map(|t| ms(t.duration_since(killed_at).unwrap_or_default()))
                    .unwrap_or(f64::NAN)
            };
            let exactly_once = self.exactly_once();
            let r = Round {
                victim: victim.clone(),
                coordinator,
                status_ms,
                batch_log_ms: after(next_batch),
                command_log_ms: after(first_command),
                ended_ms,
                succeeded,
                exactly_once,
            };
            eprintln!("failover {}: {r:?}", round + 1);
            f.rounds.push(r);
            last_id = id;

            // The dead agent comes back.
            self.fleet[victim_at].start();
            let back = Instant::now();
            wait_for("the restarted agent to be alive", LONG, || {
                hosts(self.fleet[watcher].addr, &self.ca.operator).is_ok_and(|l| {
                    l.iter()
                        .any(|h| h["name"] == victim.as_str() && h["state"] == "alive")
                })
            });
            f.rejoin_ms.push(ms(back.elapsed()));
        }
        f
    }
}

/// Asks `deploy status` every [`POLL_EVERY`], of each of `peers` in turn (at most
/// [`IN_FLIGHT`] asks at once, each abandoned after [`ASK_WITHIN`]), until an answer
/// satisfies `done`: when that answer arrived. Turns spread the asks abandoned while the
/// agents still wait on the dead coordinator: an abandoned ask holds one of the asked
/// agent's operator connections until the connection times out.
fn poll(
    peers: &[String],
    operator: &Path,
    id: &str,
    done: &dyn Fn(&serde_json::Value) -> bool,
    limit: Duration,
) -> Option<Instant> {
    let (tx, rx) = mpsc::channel::<Option<serde_json::Value>>();
    let until = Instant::now() + limit;
    let mut in_flight = 0;
    let mut next = Instant::now();
    let mut turn = 0;
    while Instant::now() < until {
        if in_flight < IN_FLIGHT && Instant::now() >= next {
            next = Instant::now() + POLL_EVERY;
            in_flight += 1;
            let (tx, addr, operator, id) = (
                tx.clone(),
                peers[turn % peers.len()].clone(),
                operator.to_path_buf(),
                id.to_string(),
            );
            turn += 1;
            std::thread::spawn(move || {
                let _ = tx.send(ask_status(&addr, &operator, &id, ASK_WITHIN).ok());
            });
        }
        let wait = next
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(5));
        if let Ok(answer) = rx.recv_timeout(wait) {
            let at = Instant::now();
            in_flight -= 1;
            if answer.is_some_and(|v| done(&v)) {
                return Some(at);
            }
        }
    }
    None
}

/// `deploy status` at `addr`, abandoned after `limit`.
fn ask_status(
    addr: &str,
    operator: &Path,
    id: &str,
    limit: Duration,
) -> Result<serde_json::Value, String> {
    let mut child = shoal()
        .args(["deploy", "status", id, "--json", "--peer", addr])
        .arg("--identity")
        .arg(operator)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let until = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("no answer within {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let o = child.wait_with_output().unwrap();
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr).into_owned());
    }
    serde_json::from_slice(&o.stdout).map_err(|e| e.to_string())
}

fn status_within(
    peer: &Agent,
    operator: &Path,
    id: &str,
    limit: Duration,
) -> Result<serde_json::Value, String> {
    ask_status(&peer.addr.to_string(), operator, id, limit)
}

fn json(o: &Output, what: &str) -> serde_json::Value {
    assert!(
        o.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

fn statuses(view: &serde_json::Value) -> BTreeMap<String, String> {
    view["hosts"]
        .as_array()
        .map(|hosts| {
            hosts
                .iter()
                .map(|h| {
                    (
                        h["name"].as_str().unwrap_or_default().to_string(),
                        h["status"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The number of batches a view shows (hosts grouped by the entry that started them).
fn batches_run(view: &serde_json::Value) -> usize {
    view["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["batch"].to_string())
        .filter(|b| b != "null")
        .collect::<BTreeSet<_>>()
        .len()
}

fn all_alive(peer: &Agent, ca: &Ca, n: usize) -> bool {
    hosts(peer.addr, &ca.operator)
        .is_ok_and(|l| l.len() == n && l.iter().all(|h| h["state"] == "alive"))
}

/// Voters of the log that the list shows alive.
fn voters_alive(list: &[serde_json::Value]) -> usize {
    list.iter()
        .filter(|h| h["state"] == "alive" && h["log"]["voter"] == true)
        .count()
}

/// The revisions of the lifecycle's deployment records of `tiny` on an agent's host (one
/// `<id>.json` per run; a run's hook logs are a directory beside it).
fn runs(agent: &Agent) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(agent.data_dir.join("apps/tiny/deployments")) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .map(|e| {
            let record: serde_json::Value =
                serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap();
            record["revision"].as_str().unwrap_or("?").to_string()
        })
        .collect()
}

/// The hosts a `batch started` line names: `hosts=["agent-3", "agent-4"]`.
fn hosts_of_line(line: &str) -> Vec<String> {
    let Some(rest) = line.split("hosts=[").nth(1) else {
        return Vec::new();
    };
    let list = rest.split(']').next().unwrap_or_default();
    list.split(',')
        .map(|h| h.trim().trim_matches('"').to_string())
        .filter(|h| !h.is_empty())
        .collect()
}

/// The time of the first line containing every needle.
fn log_time(log: &str, needles: &[&str]) -> Option<SystemTime> {
    log.lines()
        .find(|l| needles.iter().all(|n| l.contains(n)))
        .map(parse_time)
}

/// The times of every line containing every needle, in order.
fn log_times(log: &str, needles: &[&str]) -> Vec<SystemTime> {
    log.lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .map(parse_time)
        .collect()
}

fn since(a: SystemTime, b: SystemTime) -> f64 {
    ms(b.duration_since(a).unwrap_or_default())
}

/// The timestamp tracing puts first on a line: `2026-11-26T23:17:19.110401Z`.
fn parse_time(line: &str) -> SystemTime {
    let stamp = line.split_whitespace().next().expect("a timestamp");
    time::OffsetDateTime::parse(stamp, &time::format_description::well_known::Rfc3339)
        .expect("an RFC 3339 timestamp")
        .into()
}
