//! The order of a deployment on one host, as a sans-IO state machine: it says which action
//! to take next ([`Machine::next_action`]), is told how the action went ([`Machine::done`]), and
//! keeps every lifecycle event's status. It performs no IO, so every path through it, the
//! rollbacks included, is tested deterministically below; `run.rs` drives it.
//!
//! Forward, in CodeDeploy's order: ApplicationStop (the previous revision's hooks, then its
//! service stopped), DownloadBundle, BeforeInstall, Install, AfterInstall, ApplicationStart
//! (the new service started, then hooks), ValidateService, then the new revision is
//! committed. When an action fails and there is a previous revision to return to (and
//! rollback is on), the host is rolled back: the new service stopped, the previous
//! revision's files installed again, its service started, and its ApplicationStart and
//! ValidateService hooks run again.
//!
//! A **switched** service ([`Machine::switched`], `shoal.service.switch`) keeps its public
//! port on a proxy while revisions change, so the old service stops last, not first:
//! DownloadBundle, BeforeInstall, Install, AfterInstall, ApplicationStart (the new service
//! started beside the old one, on a port of its own), ValidateService, then CodeDeploy's
//! traffic events around the switch: BeforeBlockTraffic (the previous revision's hooks),
//! BlockTraffic (the proxy holds new connections), AfterBlockTraffic (previous),
//! BeforeAllowTraffic (new), AllowTraffic (new connections go to the new service),
//! AfterAllowTraffic (new); and only then ApplicationStop (the previous revision's hooks,
//! then its service drained and stopped, or kept warm). Its rollback is a switch back: the
//! previous service (still running, or started again), its ApplicationStart and
//! ValidateService hooks, AllowTraffic back to it, the new service drained and stopped,
//! and the previous revision's files installed again.

use serde::{Deserialize, Serialize};

use crate::hooks::LifecycleEvent;

/// Which revision an action is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// The revision being deployed.
    New,
    /// The last successful revision on this host.
    Previous,
}

/// What the driver must do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    RunHooks {
        event: LifecycleEvent,
        side: Side,
    },
    StopService {
        side: Side,
    },
    /// DownloadBundle: unpack the bundle into its release directory.
    Unpack,
    Install {
        side: Side,
    },
    StartService {
        side: Side,
    },
    /// Switched services only: the proxy stops handing out new connections (they wait).
    BlockTraffic,
    /// Switched services only: new connections (and held ones) go to `side`'s service.
    AllowTraffic {
        side: Side,
    },
    /// Record the new revision as the host's active and last successful one.
    Commit,
    /// Nothing more to do.
    Finished,
}

pub use super::status::EventStatus;

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EventRecord {
    pub name: LifecycleEvent,
    pub status: EventStatus,
}

/// How a deployment on this host ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "status")]
pub enum Outcome {
    Succeeded,
    Failed {
        event: LifecycleEvent,
        reason: String,
        /// Whether the previous revision was restored and validated.
        rolled_back: bool,
        /// Why the rollback failed, if it was tried and failed.
        rollback_error: Option<String>,
    },
}

/// One step of a sequence: the event it belongs to (for statuses) and the action.
type Step = (LifecycleEvent, Action);

/// The lifecycle of one deployment on one host.
#[derive(Debug)]
pub struct Machine {
    forward: Vec<Step>,
    rollback_steps: Vec<Step>,
    /// Index of the current step in `forward`, or in `rollback_steps` once rolling back.
    at: usize,
    rolling_back: bool,
    rollback_enabled: bool,
    pub events: Vec<EventRecord>,
    pub rollback_events: Vec<EventRecord>,
    failure: Option<(LifecycleEvent, String)>,
    outcome: Option<Outcome>,
    /// CodeDeploy's `--ignore-application-stop-failures`: a failing ApplicationStop hook of
    /// the previous revision is recorded Failed, and the deployment goes on.
    ignore_stop_failures: bool,
    /// The previous revision's ApplicationStop hooks failed and that was ignored.
    stop_hooks_failed: bool,
}

/// The events of a switched deployment, in the order they happen.
const SWITCHED_ORDER: [LifecycleEvent; 13] = {
    use LifecycleEvent as E;
    [
        E::DownloadBundle,
        E::BeforeInstall,
        E::Install,
        E::AfterInstall,
        E::ApplicationStart,
        E::ValidateService,
        E::BeforeBlockTraffic,
        E::BlockTraffic,
        E::AfterBlockTraffic,
        E::BeforeAllowTraffic,
        E::AllowTraffic,
        E::AfterAllowTraffic,
        E::ApplicationStop,
    ]
};

impl Machine {
    /// A deployment of a switched service (`shoal.service.switch`; see the module doc).
    /// Without a previous revision there is nothing to block or stop: those events are
    /// Skipped.
    pub fn switched(has_previous: bool, rollback_enabled: bool) -> Self {
        use LifecycleEvent as E;
        let hooks = |event, side| (event, Action::RunHooks { event, side });
        let (new, prev) = (Side::New, Side::Previous);
        let mut forward = vec![
            (E::DownloadBundle, Action::Unpack),
            hooks(E::BeforeInstall, new),
            (E::Install, Action::Install { side: new }),
            hooks(E::AfterInstall, new),
            (E::ApplicationStart, Action::StartService { side: new }),
            hooks(E::ApplicationStart, new),
            hooks(E::ValidateService, new),
        ];
        if has_previous {
            forward.extend([
                hooks(E::BeforeBlockTraffic, prev),
                (E::BlockTraffic, Action::BlockTraffic),
                hooks(E::AfterBlockTraffic, prev),
            ]);
        }
        forward.extend([
            hooks(E::BeforeAllowTraffic, new),
            (E::AllowTraffic, Action::AllowTraffic { side: new }),
            hooks(E::AfterAllowTraffic, new),
        ]);
        if has_previous {
            forward.extend([
                hooks(E::ApplicationStop, prev),
                (E::ApplicationStop, Action::StopService { side: prev }),
            ]);
        }
        let rollback_steps = vec![
            (E::ApplicationStart, Action::StartService { side: prev }),
            hooks(E::ApplicationStart, prev),
            hooks(E::ValidateService, prev),
            (E::AllowTraffic, Action::AllowTraffic { side: prev }),
            (E::ApplicationStop, Action::StopService { side: new }),
            (E::Install, Action::Install { side: prev }),
        ];
        let events = SWITCHED_ORDER
            .iter()
            .map(|&name| EventRecord {
                name,
                status: if forward.iter().any(|s| s.0 == name) {
                    EventStatus::Pending
                } else {
                    EventStatus::Skipped
                },
            })
            .collect();
        Machine::from_steps(
            forward,
            rollback_steps,
            events,
            rollback_enabled && has_previous,
        )
    }

    fn from_steps(
        forward: Vec<Step>,
        rollback_steps: Vec<Step>,
        events: Vec<EventRecord>,
        rollback_enabled: bool,
    ) -> Self {
        Machine {
            forward,
            rollback_steps,
            at: 0,
            rolling_back: false,
            rollback_enabled,
            events,
            rollback_events: Vec::new(),
            failure: None,
            outcome: None,
            ignore_stop_failures: false,
            stop_hooks_failed: false,
        }
    }

    /// `has_previous`: the host has a last successful revision of this application.
    pub fn new(has_previous: bool, rollback_enabled: bool) -> Self {
        use LifecycleEvent as E;
        let mut forward = Vec::new();
        if has_previous {
            forward.push((
                E::ApplicationStop,
                Action::RunHooks {
                    event: E::ApplicationStop,
                    side: Side::Previous,
                },
            ));
            forward.push((
                E::ApplicationStop,
                Action::StopService {
                    side: Side::Previous,
                },
            ));
        }
        forward.extend([
            (E::DownloadBundle, Action::Unpack),
            (
                E::BeforeInstall,
                Action::RunHooks {
                    event: E::BeforeInstall,
                    side: Side::New,
                },
            ),
            (E::Install, Action::Install { side: Side::New }),
            (
                E::AfterInstall,
                Action::RunHooks {
                    event: E::AfterInstall,
                    side: Side::New,
                },
            ),
            (
                E::ApplicationStart,
                Action::StartService { side: Side::New },
            ),
            (
                E::ApplicationStart,
                Action::RunHooks {
                    event: E::ApplicationStart,
                    side: Side::New,
                },
            ),
            (
                E::ValidateService,
                Action::RunHooks {
                    event: E::ValidateService,
                    side: Side::New,
                },
            ),
        ]);
        let rollback_steps = vec![
            (E::ApplicationStop, Action::StopService { side: Side::New }),
            (
                E::Install,
                Action::Install {
                    side: Side::Previous,
                },
            ),
            (
                E::ApplicationStart,
                Action::StartService {
                    side: Side::Previous,
                },
            ),
            (
                E::ApplicationStart,
                Action::RunHooks {
                    event: E::ApplicationStart,
                    side: Side::Previous,
                },
            ),
            (
                E::ValidateService,
                Action::RunHooks {
                    event: E::ValidateService,
                    side: Side::Previous,
                },
            ),
        ];
        let events = records(
            &forward,
            if has_previous {
                &[]
            } else {
                &[E::ApplicationStop]
            },
        );
        Machine::from_steps(
            forward,
            rollback_steps,
            events,
            rollback_enabled && has_previous,
        )
    }

    /// The same machine, with a failing ApplicationStop hook of the previous revision
    /// recorded Failed but not failing the deployment.
    pub fn ignoring_stop_failures(mut self, ignore: bool) -> Self {
        self.ignore_stop_failures = ignore;
        self
    }

    fn steps(&self) -> &[Step] {
        if self.rolling_back {
            &self.rollback_steps
        } else {
            &self.forward
        }
    }

    /// The action to take now. Calling it again without [`done`](Self::done) returns the same.
    pub fn next_action(&mut self) -> Action {
        if self.outcome.is_some() {
            return Action::Finished;
        }
        match self.steps().get(self.at).copied() {
            Some((event, action)) => {
                self.set_status(event, EventStatus::InProgress);
                action
            }
            None if self.rolling_back => {
                self.finish(None);
                Action::Finished
            }
            None => {
                // Past ValidateService: commit, then finish.
                if self.at == self.forward.len() {
                    Action::Commit
                } else {
                    self.outcome = Some(Outcome::Succeeded);
                    Action::Finished
                }
            }
        }
    }

    /// Reports how the action returned by [`next_action`](Self::next_action) went.
    pub fn done(&mut self, result: Result<(), String>) {
        if self.outcome.is_some() {
            return;
        }
        let Some((event, action)) = self.steps().get(self.at).copied() else {
            // The commit.
            match result {
                Ok(()) => self.outcome = Some(Outcome::Succeeded),
                Err(reason) => self.fail(LifecycleEvent::ValidateService, reason),
            }
            return;
        };
        match result {
            Ok(()) => {
                self.at += 1;
                // An event is done when its last step is.
                let next_event = self.steps().get(self.at).map(|s| s.0);
                if next_event != Some(event) {
                    let ignored = self.stop_hooks_failed
                        && !self.rolling_back
                        && event == LifecycleEvent::ApplicationStop;
                    let status = if ignored {
                        EventStatus::Failed
                    } else {
                        EventStatus::Succeeded
                    };
                    self.set_status(event, status);
                }
            }
            Err(_)
                if self.ignore_stop_failures
                    && !self.rolling_back
                    && matches!(
                        action,
                        Action::RunHooks {
                            event: LifecycleEvent::ApplicationStop,
                            side: Side::Previous
                        }
                    ) =>
            {
                // Recorded, not fatal: the previous service is still stopped next.
                self.stop_hooks_failed = true;
                self.at += 1;
            }
            Err(reason) => {
                self.set_status(event, EventStatus::Failed);
                if self.rolling_back {
                    self.finish(Some(reason));
                } else {
                    self.fail(event, reason);
                }
            }
        }
    }

    fn fail(&mut self, event: LifecycleEvent, reason: String) {
        for record in &mut self.events {
            if record.status == EventStatus::Pending {
                record.status = EventStatus::Skipped;
            }
        }
        self.failure = Some((event, reason));
        if self.rollback_enabled {
            self.rolling_back = true;
            self.at = 0;
            self.rollback_events = records(&self.rollback_steps, &[]);
        } else {
            self.finish(None);
        }
    }

    fn finish(&mut self, rollback_error: Option<String>) {
        let (event, reason) = self.failure.clone().expect("finishing a failed deployment");
        if rollback_error.is_some() {
            for record in &mut self.rollback_events {
                if record.status == EventStatus::Pending {
                    record.status = EventStatus::Skipped;
                }
            }
        }
        let rolled_back = self.rolling_back && rollback_error.is_none();
        self.outcome = Some(Outcome::Failed {
            event,
            reason,
            rolled_back,
            rollback_error,
        });
    }

    fn set_status(&mut self, event: LifecycleEvent, status: EventStatus) {
        let list = if self.rolling_back {
            &mut self.rollback_events
        } else {
            &mut self.events
        };
        if let Some(r) = list.iter_mut().find(|r| r.name == event) {
            r.status = status;
        }
    }

    pub fn outcome(&self) -> Option<&Outcome> {
        self.outcome.as_ref()
    }

    pub fn rolling_back(&self) -> bool {
        self.rolling_back
    }
}

/// One Pending record per distinct event of `steps`, in order; `skipped` ones first, Skipped.
fn records(steps: &[Step], skipped: &[LifecycleEvent]) -> Vec<EventRecord> {
    let mut out: Vec<EventRecord> = skipped
        .iter()
        .map(|e| EventRecord {
            name: *e,
            status: EventStatus::Skipped,
        })
        .collect();
    for (event, _) in steps {
        if !out.iter().any(|r| r.name == *event) {
            out.push(EventRecord {
                name: *event,
                status: EventStatus::Pending,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use LifecycleEvent as E;

    /// Drives the machine, failing the `fail_at`-th action (0-based) and any rollback action
    /// listed in `fail_rollback_at`. Returns the actions taken.
    fn drive(
        m: &mut Machine,
        fail_at: Option<usize>,
        fail_rollback_at: Option<usize>,
    ) -> Vec<Action> {
        let mut taken = Vec::new();
        let mut rollback_n = 0;
        for n in 0..100 {
            let action = m.next_action();
            if action == Action::Finished {
                return taken;
            }
            taken.push(action);
            let fail = if m.rolling_back() {
                let f = fail_rollback_at == Some(rollback_n);
                rollback_n += 1;
                f
            } else {
                fail_at == Some(n)
            };
            m.done(if fail {
                Err(format!("step {n} failed"))
            } else {
                Ok(())
            });
        }
        panic!("the machine did not finish");
    }

    fn statuses(records: &[EventRecord]) -> Vec<(LifecycleEvent, EventStatus)> {
        records.iter().map(|r| (r.name, r.status)).collect()
    }

    #[test]
    fn a_first_install_skips_application_stop_and_commits() {
        let mut m = Machine::new(false, true);
        let taken = drive(&mut m, None, None);
        assert_eq!(
            taken,
            vec![
                Action::Unpack,
                Action::RunHooks {
                    event: E::BeforeInstall,
                    side: Side::New
                },
                Action::Install { side: Side::New },
                Action::RunHooks {
                    event: E::AfterInstall,
                    side: Side::New
                },
                Action::StartService { side: Side::New },
                Action::RunHooks {
                    event: E::ApplicationStart,
                    side: Side::New
                },
                Action::RunHooks {
                    event: E::ValidateService,
                    side: Side::New
                },
                Action::Commit,
            ]
        );
        assert_eq!(m.outcome(), Some(&Outcome::Succeeded));
        use EventStatus::*;
        assert_eq!(
            statuses(&m.events),
            vec![
                (E::ApplicationStop, Skipped),
                (E::DownloadBundle, Succeeded),
                (E::BeforeInstall, Succeeded),
                (E::Install, Succeeded),
                (E::AfterInstall, Succeeded),
                (E::ApplicationStart, Succeeded),
                (E::ValidateService, Succeeded),
            ]
        );
    }

    #[test]
    fn an_upgrade_stops_the_previous_revision_first() {
        let mut m = Machine::new(true, true);
        let taken = drive(&mut m, None, None);
        assert_eq!(
            taken[0],
            Action::RunHooks {
                event: E::ApplicationStop,
                side: Side::Previous
            }
        );
        assert_eq!(
            taken[1],
            Action::StopService {
                side: Side::Previous
            }
        );
        assert_eq!(taken.len(), 10);
        assert!(m.events.iter().all(|r| r.status == EventStatus::Succeeded));
    }

    #[test]
    fn a_failed_validation_rolls_back_to_the_previous_revision() {
        let mut m = Machine::new(true, true);
        // Action 8 is ValidateService's hooks.
        let taken = drive(&mut m, Some(8), None);
        assert_eq!(
            taken[8],
            Action::RunHooks {
                event: E::ValidateService,
                side: Side::New
            }
        );
        assert_eq!(
            taken[9..],
            [
                Action::StopService { side: Side::New },
                Action::Install {
                    side: Side::Previous
                },
                Action::StartService {
                    side: Side::Previous
                },
                Action::RunHooks {
                    event: E::ApplicationStart,
                    side: Side::Previous
                },
                Action::RunHooks {
                    event: E::ValidateService,
                    side: Side::Previous
                },
            ]
        );
        assert!(
            !taken.contains(&Action::Commit),
            "a failed deployment is never committed"
        );
        assert_eq!(
            m.outcome(),
            Some(&Outcome::Failed {
                event: E::ValidateService,
                reason: "step 8 failed".into(),
                rolled_back: true,
                rollback_error: None
            })
        );
        assert_eq!(m.events.last().unwrap().status, EventStatus::Failed);
        assert!(
            m.rollback_events
                .iter()
                .all(|r| r.status == EventStatus::Succeeded),
            "{:?}",
            m.rollback_events
        );
    }

    #[test]
    fn ignored_stop_failures_are_recorded_and_the_deployment_goes_on() {
        use EventStatus::*;
        // Step 0 is the previous revision's ApplicationStop hooks.
        let mut m = Machine::new(true, true).ignoring_stop_failures(true);
        let taken = drive(&mut m, Some(0), None);
        assert!(taken.contains(&Action::StopService {
            side: Side::Previous
        }));
        assert!(taken.contains(&Action::Commit));
        assert_eq!(m.outcome(), Some(&Outcome::Succeeded));
        assert_eq!(statuses(&m.events)[0], (E::ApplicationStop, Failed));
        assert!(
            statuses(&m.events)[1..]
                .iter()
                .all(|(_, s)| *s == Succeeded)
        );
        // Stopping the service itself (step 1) is never ignored; nor without the flag.
        let mut m = Machine::new(true, true).ignoring_stop_failures(true);
        drive(&mut m, Some(1), None);
        assert!(matches!(m.outcome(), Some(Outcome::Failed { .. })));
        let mut m = Machine::new(true, true);
        drive(&mut m, Some(0), None);
        assert!(matches!(m.outcome(), Some(Outcome::Failed { .. })));
    }

    #[test]
    fn events_after_a_failure_are_skipped() {
        let mut m = Machine::new(true, true);
        drive(&mut m, Some(3), None); // BeforeInstall
        use EventStatus::*;
        assert_eq!(
            statuses(&m.events),
            vec![
                (E::ApplicationStop, Succeeded),
                (E::DownloadBundle, Succeeded),
                (E::BeforeInstall, Failed),
                (E::Install, Skipped),
                (E::AfterInstall, Skipped),
                (E::ApplicationStart, Skipped),
                (E::ValidateService, Skipped),
            ]
        );
    }

    #[test]
    fn a_failed_rollback_is_reported_as_such() {
        let mut m = Machine::new(true, true);
        drive(&mut m, Some(8), Some(2)); // the previous service fails to start
        let Some(Outcome::Failed {
            rolled_back,
            rollback_error,
            ..
        }) = m.outcome()
        else {
            panic!()
        };
        assert!(!rolled_back);
        assert_eq!(rollback_error.as_deref(), Some("step 11 failed"));
        let rb = statuses(&m.rollback_events);
        assert_eq!(rb[2], (E::ApplicationStart, EventStatus::Failed));
        assert_eq!(rb[3], (E::ValidateService, EventStatus::Skipped));
    }

    #[test]
    fn no_rollback_without_a_previous_revision_or_when_disabled() {
        for (has_previous, enabled) in [(false, true), (true, false)] {
            let mut m = Machine::new(has_previous, enabled);
            let taken = drive(&mut m, Some(if has_previous { 8 } else { 6 }), None);
            assert!(!taken.iter().any(|a| matches!(
                a,
                Action::Install {
                    side: Side::Previous
                }
            )));
            let Some(Outcome::Failed { rolled_back, .. }) = m.outcome() else {
                panic!()
            };
            assert!(!rolled_back);
            assert!(m.rollback_events.is_empty());
        }
    }

    #[test]
    fn a_failed_commit_fails_the_deployment() {
        let mut m = Machine::new(false, true);
        drive(&mut m, Some(7), None);
        assert!(matches!(m.outcome(), Some(Outcome::Failed { .. })));
    }

    fn hooks(event: LifecycleEvent, side: Side) -> Action {
        Action::RunHooks { event, side }
    }

    #[test]
    fn a_switched_deployment_moves_traffic_before_the_old_service_stops() {
        use Side::*;
        let mut m = Machine::switched(true, true);
        let taken = drive(&mut m, None, None);
        assert_eq!(
            taken,
            vec![
                Action::Unpack,
                hooks(E::BeforeInstall, New),
                Action::Install { side: New },
                hooks(E::AfterInstall, New),
                Action::StartService { side: New },
                hooks(E::ApplicationStart, New),
                hooks(E::ValidateService, New),
                hooks(E::BeforeBlockTraffic, Previous),
                Action::BlockTraffic,
                hooks(E::AfterBlockTraffic, Previous),
                hooks(E::BeforeAllowTraffic, New),
                Action::AllowTraffic { side: New },
                hooks(E::AfterAllowTraffic, New),
                hooks(E::ApplicationStop, Previous),
                Action::StopService { side: Previous },
                Action::Commit,
            ]
        );
        assert_eq!(m.outcome(), Some(&Outcome::Succeeded));
        assert!(m.events.iter().all(|r| r.status == EventStatus::Succeeded));
        let order: Vec<_> = m.events.iter().map(|r| r.name).collect();
        assert_eq!(order, SWITCHED_ORDER.to_vec());
    }

    #[test]
    fn a_first_switched_deployment_has_nothing_to_block_or_stop() {
        use Side::*;
        let mut m = Machine::switched(false, true);
        let taken = drive(&mut m, None, None);
        assert!(!taken.contains(&Action::BlockTraffic));
        assert!(taken.contains(&Action::AllowTraffic { side: New }));
        assert!(
            !taken
                .iter()
                .any(|a| matches!(a, Action::RunHooks { side: Previous, .. }))
        );
        use EventStatus::*;
        let skipped: Vec<_> = m
            .events
            .iter()
            .filter(|r| r.status == Skipped)
            .map(|r| r.name)
            .collect();
        assert_eq!(
            skipped,
            vec![
                E::BeforeBlockTraffic,
                E::BlockTraffic,
                E::AfterBlockTraffic,
                E::ApplicationStop
            ]
        );
        // A first deployment has nothing to go back to.
        let mut m = Machine::switched(false, true);
        drive(&mut m, Some(6), None);
        assert!(matches!(
            m.outcome(),
            Some(Outcome::Failed {
                rolled_back: false,
                ..
            })
        ));
    }

    #[test]
    fn a_switched_rollback_switches_back_before_the_new_service_stops() {
        use Side::*;
        let rollback = [
            Action::StartService { side: Previous },
            hooks(E::ApplicationStart, Previous),
            hooks(E::ValidateService, Previous),
            Action::AllowTraffic { side: Previous },
            Action::StopService { side: New },
            Action::Install { side: Previous },
        ];
        // Failing ValidateService (before the switch) and AfterAllowTraffic (after it): the
        // same way back, since switching back is idempotent.
        for (fail_at, event) in [(6, E::ValidateService), (12, E::AfterAllowTraffic)] {
            let mut m = Machine::switched(true, true);
            let taken = drive(&mut m, Some(fail_at), None);
            assert_eq!(taken[fail_at + 1..], rollback[..], "failing at {event}");
            match m.outcome() {
                Some(Outcome::Failed {
                    event: e,
                    rolled_back: true,
                    rollback_error: None,
                    ..
                }) => assert_eq!(*e, event),
                other => panic!("{other:?}"),
            }
            let rolled: Vec<_> = m.rollback_events.iter().map(|r| r.name).collect();
            assert_eq!(
                rolled,
                vec![
                    E::ApplicationStart,
                    E::ValidateService,
                    E::AllowTraffic,
                    E::ApplicationStop,
                    E::Install
                ]
            );
            // What was not reached is Skipped.
            assert!(
                m.events
                    .iter()
                    .skip_while(|r| r.name != event)
                    .skip(1)
                    .all(|r| r.status == EventStatus::Skipped)
            );
        }
        // A failed switch back is reported as the rollback's error.
        let mut m = Machine::switched(true, true);
        drive(&mut m, Some(6), Some(3));
        assert!(matches!(
            m.outcome(),
            Some(Outcome::Failed {
                rolled_back: false,
                rollback_error: Some(_),
                ..
            })
        ));
    }

    #[test]
    fn an_ignored_application_stop_failure_after_a_switch_still_commits() {
        let mut m = Machine::switched(true, true).ignoring_stop_failures(true);
        // Step 13 is the previous revision's ApplicationStop hooks.
        let taken = drive(&mut m, Some(13), None);
        assert_eq!(taken.last(), Some(&Action::Commit));
        assert_eq!(m.outcome(), Some(&Outcome::Succeeded));
    }
}
