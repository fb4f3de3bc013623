//! CodeDeploy's status words, as types: one vocabulary for a deployment on one host
//! (`deploy local`, `recover`) and across the fleet (the planner, the deployment log).
//! They serialize as the words themselves (`"Succeeded"`), which is what `--json` shows.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A deployment's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DeploymentStatus {
    /// Accepted, no host started yet.
    Created,
    /// Hosts are being updated.
    InProgress,
    /// Waiting out a bake time between phases.
    Baking,
    /// Ended: enough hosts took the revision.
    Succeeded,
    /// Ended: it could not succeed.
    Failed,
    /// Ended: an operator stopped it.
    Stopped,
}

/// One host's status within a deployment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HostStatus {
    /// Not started yet.
    Pending,
    /// Started and not reported.
    InProgress,
    /// Took the revision, and it validated.
    Succeeded,
    /// Did not.
    Failed,
    /// Never started: the deployment stopped or failed first.
    Skipped,
    /// Cannot be told (for instance, a host started by a coordinator that died, and not
    /// reachable since).
    Unknown,
}

/// One lifecycle event's status on a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventStatus {
    Pending,
    InProgress,
    Succeeded,
    Failed,
    Skipped,
}

macro_rules! display_as_debug {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(self, f)
            }
        }
    )*};
}
display_as_debug!(DeploymentStatus, HostStatus, EventStatus);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_serialize_as_codedeploy_words() {
        assert_eq!(
            serde_json::to_string(&DeploymentStatus::Succeeded).unwrap(),
            "\"Succeeded\""
        );
        assert_eq!(
            serde_json::to_string(&HostStatus::Skipped).unwrap(),
            "\"Skipped\""
        );
        assert_eq!(
            serde_json::to_string(&EventStatus::InProgress).unwrap(),
            "\"InProgress\""
        );
        assert_eq!(HostStatus::Unknown.to_string(), "Unknown");
    }
}
