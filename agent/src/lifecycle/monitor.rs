//! Checks of an active revision, run again and again from the application's supervisor
//! task (`supervise.rs`): the AppSpec's `shoal.monitor` hooks, each every `interval`, and
//! the service's health endpoint (`health_path`), every [`HEALTH_EVERY`].
//!
//! [`Schedule`] is the sans-IO part: which check is due, and how many times in a row each
//! one failed. The supervisor runs the due check (a hook through `LocalHost::monitor`, the
//! endpoint through `service::healthy`; one at a time, on a task of its own so a slow check
//! never delays a service restart) and reports the application's problem
//! ([`super::supervise::Source::Monitor`]) while some check has failed more often in a row
//! than it allows. The host gossips that problem, and a rollout's health gate acts on it
//! while baking.

use std::time::{Duration, Instant};

use crate::appspec::MonitorSpec;
use crate::bundle::RevisionId;

/// How often the service's health endpoint is asked.
pub const HEALTH_EVERY: Duration = Duration::from_secs(5);
/// Failures in a row of the health endpoint that are not yet a problem.
pub const HEALTH_FAILURES_ALLOWED: u32 = 2;

/// One check of an active revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// A `shoal.monitor` hook.
    Hook(MonitorSpec),
    /// `GET path` of the service on `127.0.0.1:port`, counted only if the service's own
    /// processes hold the port (as at its start).
    Health { port: u16, path: String },
}

impl Check {
    fn interval(&self) -> Duration {
        match self {
            Check::Hook(m) => m.interval,
            Check::Health { .. } => HEALTH_EVERY,
        }
    }

    fn failures_allowed(&self) -> u32 {
        match self {
            Check::Hook(m) => m.failures_allowed,
            Check::Health { .. } => HEALTH_FAILURES_ALLOWED,
        }
    }

    /// What the problem calls it.
    pub fn label(&self) -> String {
        match self {
            Check::Hook(m) => format!("monitor {}", m.hook.location),
            Check::Health { port, path } => format!("health check GET {path} on port {port}"),
        }
    }
}

/// The checks of one active revision, and how they went.
#[derive(Debug)]
pub struct Schedule {
    revision: RevisionId,
    checks: Vec<Check>,
    /// The port of the revision's service (hooks may reach it).
    port: Option<u16>,
    /// When each monitor runs next.
    next: Vec<Instant>,
    /// Each monitor's failures in a row, and its last summary.
    failures: Vec<(u32, String)>,
    runs: u64,
}

impl Schedule {
    /// The checks of `revision`, each first due one interval after `now` (the deployment
    /// that made it active has just validated it).
    pub fn new(
        revision: RevisionId,
        checks: Vec<Check>,
        port: Option<u16>,
        now: Instant,
    ) -> Schedule {
        Schedule {
            next: checks.iter().map(|c| now + c.interval()).collect(),
            failures: vec![(0, String::new()); checks.len()],
            revision,
            checks,
            port,
            runs: 0,
        }
    }

    pub fn revision(&self) -> &RevisionId {
        &self.revision
    }

    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// The check to run now, if one is due (the most overdue first).
    pub fn due(&self, now: Instant) -> Option<usize> {
        self.next
            .iter()
            .enumerate()
            .filter(|(_, at)| **at <= now)
            .min_by_key(|(_, at)| **at)
            .map(|(i, _)| i)
    }

    /// Check `i` starts at `now`: it is next due one interval later. Returns it and the
    /// run's number (from 1, over all checks).
    pub fn start(&mut self, i: usize, now: Instant) -> (Check, u64) {
        self.next[i] = now + self.checks[i].interval();
        self.runs += 1;
        (self.checks[i].clone(), self.runs)
    }

    /// How check `i`'s run went.
    pub fn done(&mut self, i: usize, succeeded: bool, summary: &str) {
        let (count, last) = &mut self.failures[i];
        if succeeded {
            *count = 0;
        } else {
            *count = count.saturating_add(1);
        }
        summary.clone_into(last);
    }

    /// The problem to report: the first check that failed more often in a row than it
    /// allows, with its last summary.
    pub fn problem(&self) -> Option<String> {
        self.checks
            .iter()
            .zip(&self.failures)
            .find(|(c, (count, _))| *count > c.failures_allowed())
            .map(|(c, (count, last))| {
                format!("{} failed {count} time(s) in a row: {last}", c.label())
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn monitor(location: &str, secs: u64, failures_allowed: u32) -> Check {
        Check::Hook(MonitorSpec {
            hook: crate::appspec::HookSpec {
                location: location.into(),
                timeout: Duration::from_secs(secs),
                runas: None,
                line: 1,
            },
            interval: Duration::from_secs(secs),
            failures_allowed,
        })
    }

    #[test]
    fn monitors_run_every_interval_and_a_problem_needs_more_failures_in_a_row_than_allowed() {
        let t0 = Instant::now();
        let mut s = Schedule::new(
            RevisionId("r".into()),
            vec![monitor("fast.wasm", 10, 1), monitor("slow.wasm", 30, 0)],
            Some(8080),
            t0,
        );
        assert_eq!(s.due(t0), None, "not before one interval");
        let at = |secs| t0 + Duration::from_secs(secs);
        assert_eq!(s.due(at(10)), Some(0));
        let (check, run) = s.start(0, at(10));
        assert_eq!((check.label().as_str(), run), ("monitor fast.wasm", 1));
        s.done(0, false, "wrong prediction");
        assert_eq!(s.problem(), None, "one failure is allowed");
        assert_eq!(s.due(at(15)), None);
        s.start(0, at(20));
        s.done(0, false, "wrong again");
        assert_eq!(
            s.problem().unwrap(),
            "monitor fast.wasm failed 2 time(s) in a row: wrong again"
        );
        s.start(0, at(30));
        s.done(0, true, "ok");
        assert_eq!(s.problem(), None, "a success forgives");
        // Both due: the most overdue first.
        assert_eq!(s.due(at(45)), Some(1));
        s.start(1, at(45));
        s.done(1, false, "down");
        assert!(
            s.problem()
                .unwrap()
                .starts_with("monitor slow.wasm failed 1")
        );
        assert_eq!(s.due(at(45)), Some(0));
    }

    #[test]
    fn the_health_endpoint_is_a_problem_after_three_failures_in_a_row() {
        let t0 = Instant::now();
        let health = Check::Health {
            port: 8080,
            path: "/health".into(),
        };
        let mut s = Schedule::new(RevisionId("r".into()), vec![health], Some(8080), t0);
        for k in 1..=3u32 {
            let at = t0 + HEALTH_EVERY * k;
            assert_eq!(s.due(at), Some(0));
            s.start(0, at);
            assert_eq!(s.problem(), None, "not before it failed");
            s.done(0, false, "no answer");
        }
        assert_eq!(
            s.problem().unwrap(),
            "health check GET /health on port 8080 failed 3 time(s) in a row: no answer"
        );
    }
}
