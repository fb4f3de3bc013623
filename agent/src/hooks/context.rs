//! What the agent tells a hook: the lifecycle event and the deployment it belongs to. This
//! is the host-side mirror of `context` in `hooks-sdk/wit/hook.wit`, and also what becomes
//! CodeDeploy's environment variables for plain WASI command hooks.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// CodeDeploy's lifecycle events, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum LifecycleEvent {
    ApplicationStop,
    DownloadBundle,
    BeforeInstall,
    Install,
    AfterInstall,
    ApplicationStart,
    ValidateService,
    BeforeBlockTraffic,
    BlockTraffic,
    AfterBlockTraffic,
    BeforeAllowTraffic,
    AllowTraffic,
    AfterAllowTraffic,
}

impl LifecycleEvent {
    pub const ALL: [LifecycleEvent; 13] = [
        LifecycleEvent::ApplicationStop,
        LifecycleEvent::DownloadBundle,
        LifecycleEvent::BeforeInstall,
        LifecycleEvent::Install,
        LifecycleEvent::AfterInstall,
        LifecycleEvent::ApplicationStart,
        LifecycleEvent::ValidateService,
        LifecycleEvent::BeforeBlockTraffic,
        LifecycleEvent::BlockTraffic,
        LifecycleEvent::AfterBlockTraffic,
        LifecycleEvent::BeforeAllowTraffic,
        LifecycleEvent::AllowTraffic,
        LifecycleEvent::AfterAllowTraffic,
    ];

    /// CodeDeploy's name, as in `appspec.yml` and `LIFECYCLE_EVENT`.
    pub fn as_str(self) -> &'static str {
        match self {
            LifecycleEvent::ApplicationStop => "ApplicationStop",
            LifecycleEvent::DownloadBundle => "DownloadBundle",
            LifecycleEvent::BeforeInstall => "BeforeInstall",
            LifecycleEvent::Install => "Install",
            LifecycleEvent::AfterInstall => "AfterInstall",
            LifecycleEvent::ApplicationStart => "ApplicationStart",
            LifecycleEvent::ValidateService => "ValidateService",
            LifecycleEvent::BeforeBlockTraffic => "BeforeBlockTraffic",
            LifecycleEvent::BlockTraffic => "BlockTraffic",
            LifecycleEvent::AfterBlockTraffic => "AfterBlockTraffic",
            LifecycleEvent::BeforeAllowTraffic => "BeforeAllowTraffic",
            LifecycleEvent::AllowTraffic => "AllowTraffic",
            LifecycleEvent::AfterAllowTraffic => "AfterAllowTraffic",
        }
    }
}

impl fmt::Display for LifecycleEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LifecycleEvent {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        LifecycleEvent::ALL
            .into_iter()
            .find(|e| e.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                let names: Vec<&str> = LifecycleEvent::ALL.iter().map(|e| e.as_str()).collect();
                format!(
                    "unknown lifecycle event `{s}` (expected one of {})",
                    names.join(", ")
                )
            })
    }
}

/// Everything a hook is told about the deployment it runs in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookContext {
    pub event: LifecycleEvent,
    pub deployment_id: String,
    pub application: String,
    pub deployment_group: String,
    /// The revision id: hex SHA-256 of the bundle's content.
    pub revision: String,
    pub host_name: String,
    pub host_tags: BTreeMap<String, String>,
    pub params: BTreeMap<String, String>,
}

impl HookContext {
    /// A context for running one hook by hand (`shoal hook run`).
    pub fn adhoc(event: LifecycleEvent) -> Self {
        HookContext {
            event,
            deployment_id: "d-local".into(),
            application: "local".into(),
            deployment_group: "local".into(),
            revision: String::new(),
            host_name: hostname(),
            host_tags: BTreeMap::new(),
            params: BTreeMap::new(),
        }
    }

    /// CodeDeploy's environment variables for this context, as a WASI command sees them.
    pub fn codedeploy_env(&self) -> Vec<(String, String)> {
        vec![
            ("LIFECYCLE_EVENT".into(), self.event.to_string()),
            ("DEPLOYMENT_ID".into(), self.deployment_id.clone()),
            ("APPLICATION_NAME".into(), self.application.clone()),
            (
                "DEPLOYMENT_GROUP_NAME".into(),
                self.deployment_group.clone(),
            ),
            (
                "DEPLOYMENT_GROUP_ID".into(),
                format!("{}/{}", self.application, self.deployment_group),
            ),
        ]
    }
}

/// This machine's host name, for hooks' context when no agent name is configured.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_names_round_trip_and_unknown_names_are_listed() {
        for e in LifecycleEvent::ALL {
            assert_eq!(e.as_str().parse::<LifecycleEvent>().unwrap(), e);
        }
        assert_eq!(
            "validateservice".parse::<LifecycleEvent>().unwrap(),
            LifecycleEvent::ValidateService
        );
        let err = "Deploy".parse::<LifecycleEvent>().unwrap_err();
        assert!(
            err.contains("unknown lifecycle event `Deploy`") && err.contains("ValidateService"),
            "{err}"
        );
    }
}
