//! The typed context a hook receives: which lifecycle event, which deployment, which host.

use std::collections::BTreeMap;

use crate::bindings::shoal::hooks::types as wit;
use crate::error::{HookError, Result};

/// A lifecycle event, named as CodeDeploy names it (`BeforeInstall`, `ValidateService`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Event {
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

impl Event {
    /// CodeDeploy's name for the event, as in `appspec.yml` and `LIFECYCLE_EVENT`.
    pub fn as_str(self) -> &'static str {
        match self {
            Event::ApplicationStop => "ApplicationStop",
            Event::DownloadBundle => "DownloadBundle",
            Event::BeforeInstall => "BeforeInstall",
            Event::Install => "Install",
            Event::AfterInstall => "AfterInstall",
            Event::ApplicationStart => "ApplicationStart",
            Event::ValidateService => "ValidateService",
            Event::BeforeBlockTraffic => "BeforeBlockTraffic",
            Event::BlockTraffic => "BlockTraffic",
            Event::AfterBlockTraffic => "AfterBlockTraffic",
            Event::BeforeAllowTraffic => "BeforeAllowTraffic",
            Event::AllowTraffic => "AllowTraffic",
            Event::AfterAllowTraffic => "AfterAllowTraffic",
        }
    }
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<wit::LifecycleEvent> for Event {
    fn from(e: wit::LifecycleEvent) -> Self {
        use wit::LifecycleEvent as L;
        match e {
            L::ApplicationStop => Event::ApplicationStop,
            L::DownloadBundle => Event::DownloadBundle,
            L::BeforeInstall => Event::BeforeInstall,
            L::Install => Event::Install,
            L::AfterInstall => Event::AfterInstall,
            L::ApplicationStart => Event::ApplicationStart,
            L::ValidateService => Event::ValidateService,
            L::BeforeBlockTraffic => Event::BeforeBlockTraffic,
            L::BlockTraffic => Event::BlockTraffic,
            L::AfterBlockTraffic => Event::AfterBlockTraffic,
            L::BeforeAllowTraffic => Event::BeforeAllowTraffic,
            L::AllowTraffic => Event::AllowTraffic,
            L::AfterAllowTraffic => Event::AfterAllowTraffic,
        }
    }
}

/// The host a hook runs on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Host {
    pub name: String,
    pub tags: BTreeMap<String, String>,
}

/// Everything a hook knows about the deployment it runs in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Context {
    pub event: Event,
    pub deployment_id: String,
    pub application: String,
    pub deployment_group: String,
    /// The revision being installed: the hex SHA-256 of the bundle's content.
    pub revision: String,
    pub host: Host,
    /// The deployment's key/value parameters.
    pub params: BTreeMap<String, String>,
}

impl Context {
    /// A context for tests: the given event, application `app`, everything else empty.
    pub fn new(event: Event) -> Self {
        Context {
            event,
            deployment_id: "d-test".into(),
            application: "app".into(),
            deployment_group: "default".into(),
            revision: String::new(),
            host: Host {
                name: "localhost".into(),
                tags: BTreeMap::new(),
            },
            params: BTreeMap::new(),
        }
    }

    /// Sets a parameter (builder style, for tests).
    pub fn with_param(mut self, key: &str, value: &str) -> Self {
        self.params.insert(key.into(), value.into());
        self
    }

    /// A deployment parameter, if set.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.params.get(key).map(String::as_str)
    }

    /// A deployment parameter that the hook cannot do without.
    pub fn require_param(&self, key: &str) -> Result<&str> {
        self.param(key)
            .ok_or_else(|| HookError::new(format!("the deployment parameter `{key}` is not set")))
    }
}

impl From<wit::Context> for Context {
    fn from(c: wit::Context) -> Self {
        Context {
            event: c.event.into(),
            deployment_id: c.deployment_id,
            application: c.application,
            deployment_group: c.deployment_group,
            revision: c.revision,
            host: Host {
                name: c.host.name,
                tags: c.host.tags.into_iter().collect(),
            },
            params: c.params.into_iter().collect(),
        }
    }
}
