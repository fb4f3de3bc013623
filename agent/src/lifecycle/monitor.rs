//! `shoal.monitor`: the AppSpec's monitor hooks, run every `interval` while their revision
//! is active, from the application's supervisor task (`supervise.rs`).
//!
//! [`Schedule`] is the sans-IO part: which monitor is due, and how many times in a row each
//! one failed. The supervisor runs the due hook (`LocalHost::monitor`, one at a time, on a
//! task of its own so a slow hook never delays a service restart) and reports the
//! application's problem ([`super::supervise::Source::Monitor`]) while some monitor has
//! failed more often in a row than it allows. The host gossips that problem, and a
//! rollout's health gate acts on it while baking.

use std::time::Instant;

use crate::appspec::MonitorSpec;
use crate::bundle::RevisionId;

/// The monitors of one active revision, and how they went.
#[derive(Debug)]
pub struct Schedule {
    revision: RevisionId,
    monitors: Vec<MonitorSpec>,
    /// The port of the revision's service (hooks may reach it).
    port: Option<u16>,
    /// When each monitor runs next.
    next: Vec<Instant>,
    /// Each monitor's failures in a row, and its last summary.
    failures: Vec<(u32, String)>,
    runs: u64,
}

impl Schedule {
    /// The monitors of `revision`, each first due one interval after `now` (the deployment
    /// that made it active has just validated it).
    pub fn new(
        revision: RevisionId,
        monitors: Vec<MonitorSpec>,
        port: Option<u16>,
        now: Instant,
    ) -> Schedule {
        Schedule {
            next: monitors.iter().map(|m| now + m.interval).collect(),
            failures: vec![(0, String::new()); monitors.len()],
            revision,
            monitors,
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

    /// The monitor to run now, if one is due (the most overdue first).
    pub fn due(&self, now: Instant) -> Option<usize> {
        self.next
            .iter()
            .enumerate()
            .filter(|(_, at)| **at <= now)
            .min_by_key(|(_, at)| **at)
            .map(|(i, _)| i)
    }

    /// Monitor `i` starts at `now`: it is next due one interval later. Returns its spec and
    /// the run's number (from 1, over all monitors).
    pub fn start(&mut self, i: usize, now: Instant) -> (MonitorSpec, u64) {
        self.next[i] = now + self.monitors[i].interval;
        self.runs += 1;
        (self.monitors[i].clone(), self.runs)
    }

    /// How monitor `i`'s run went.
    pub fn done(&mut self, i: usize, succeeded: bool, summary: &str) {
        let (count, last) = &mut self.failures[i];
        if succeeded {
            *count = 0;
        } else {
            *count = count.saturating_add(1);
        }
        summary.clone_into(last);
    }

    /// The problem to report: the first monitor that failed more often in a row than it
    /// allows, with its last summary.
    pub fn problem(&self) -> Option<String> {
        self.monitors
            .iter()
            .zip(&self.failures)
            .find(|(m, (count, _))| *count > m.failures_allowed)
            .map(|(m, (count, last))| {
                format!(
                    "monitor {} failed {count} time(s) in a row: {last}",
                    m.hook.location
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn monitor(location: &str, secs: u64, failures_allowed: u32) -> MonitorSpec {
        MonitorSpec {
            hook: crate::appspec::HookSpec {
                location: location.into(),
                timeout: Duration::from_secs(secs),
                runas: None,
                line: 1,
            },
            interval: Duration::from_secs(secs),
            failures_allowed,
        }
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
        let (spec, run) = s.start(0, at(10));
        assert_eq!((spec.hook.location.as_str(), run), ("fast.wasm", 1));
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
}
