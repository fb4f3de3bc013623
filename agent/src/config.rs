//! The agent's configuration: a TOML file (`shoal agent --config FILE`). Every key is
//! documented in `docs/config.md`; an unknown key is an error naming it, so a typo never
//! silently falls back to a default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Deserialize;

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This host's name in the fleet.
    pub name: String,
    /// Releases, state, logs and the hook cache.
    pub data_dir: PathBuf,
    /// AppSpec destinations are rooted here.
    #[serde(default = "default_install_root")]
    pub install_root: PathBuf,
    /// Tags deployments select hosts by, e.g. `role = "inference"`.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Successful releases kept per application besides the active one.
    #[serde(default = "default_keep_releases")]
    pub keep_releases: usize,
}

fn default_install_root() -> PathBuf {
    PathBuf::from("/")
}

fn default_keep_releases() -> usize {
    crate::lifecycle::run::DEFAULT_KEEP_RELEASES
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("{}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self> {
        let config: AgentConfig =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim()))?;
        if config.name.trim().is_empty() {
            anyhow::bail!("`name` is empty");
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_config_gets_its_defaults() {
        let c = AgentConfig::parse(
            "name = \"edge-1\"\ndata_dir = \"/var/lib/shoal\"\n[tags]\nrole = \"inference\"\n",
        )
        .unwrap();
        assert_eq!(c.install_root, PathBuf::from("/"));
        assert_eq!(c.keep_releases, 5);
        assert_eq!(c.tags["role"], "inference");
    }

    #[test]
    fn unknown_keys_and_missing_ones_are_named() {
        let err = AgentConfig::parse("name = \"a\"\ndata_dir = \"/d\"\ninstal_root = \"/r\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("instal_root") && err.contains("line 3"),
            "{err}"
        );
        let err = AgentConfig::parse("data_dir = \"/d\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing field `name`"), "{err}");
    }
}
