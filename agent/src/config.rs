//! The agent's configuration: a TOML file (`shoal agent --config FILE`). Every key is
//! documented in `docs/config.md`; an unknown key is an error naming it, so a typo never
//! silently falls back to a default.

use std::collections::BTreeMap;
use std::net::SocketAddr;
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
    /// The UDP address of the agent's QUIC endpoint.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The address peers reach this agent at, when `listen` is an unspecified address
    /// (`0.0.0.0`). Defaults to `listen`, or else the local address routed toward the
    /// first seed.
    #[serde(default)]
    pub advertise: Option<SocketAddr>,
    /// The agent's identity directory (`ca.pem`, `cert.pem`, `key.pem`, as `shoal ca issue`
    /// writes them). Without one the agent runs alone, outside any mesh.
    #[serde(default)]
    pub identity: Option<PathBuf>,
    /// Agents to join the mesh through. Any one that answers is enough.
    #[serde(default)]
    pub seeds: Vec<SocketAddr>,
    /// How long a dead member stays listed before it is forgotten, record and all:
    /// a number with a unit, `90s`, `30m`, `24h` or `7d`.
    #[serde(default = "default_forget_dead_after")]
    pub forget_dead_after: String,
    /// Application → the port this host serves it on instead of its AppSpec's `port`:
    /// for a host where that port is taken, or several agents on one machine (`shoal
    /// demo`). The service gets it as `$PORT`, its hooks as the parameter `port`.
    #[serde(default)]
    pub ports: BTreeMap<String, u16>,
    /// Where this agent, when it coordinates, sends deployment notifications
    /// (`[[webhooks]]`, CodeDeploy's triggers; `fleet::notify`).
    #[serde(default)]
    pub webhooks: Vec<Webhook>,
    /// Where to serve Prometheus metrics (`GET /metrics`), e.g. `127.0.0.1:9464`; none
    /// when absent. Plain HTTP with no authentication: keep it on loopback or a private
    /// network.
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
    /// How revisions move between agents (`[transfer]`; `blobs::chunked`).
    #[serde(default)]
    pub transfer: Transfer,
}

/// How this agent fetches and serves revisions (`[transfer]`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Transfer {
    /// Fetch chunks from every peer that holds or fetches the revision (`true`), or from
    /// the uploader only (`false`: for comparison, or a fleet whose hosts must not talk
    /// bulk to each other).
    #[serde(default = "yes")]
    pub from_peers: bool,
    /// Chunk requests this agent answers at once; more are answered "busy".
    #[serde(default = "default_max_uploads")]
    pub max_uploads: usize,
    /// Bytes per second this agent sends of chunks, all peers together, as `50MiB` or
    /// `800KiB`; unlimited when absent.
    #[serde(default)]
    pub upload_rate: Option<String>,
    /// Bytes per second this agent receives of chunks; unlimited when absent.
    #[serde(default)]
    pub download_rate: Option<String>,
    /// The most bytes the chunk store keeps once a deployment is over, as `20GiB`: the
    /// active revisions' chunks always, then other kept revisions', newest first, while
    /// they fit. Unbounded when absent (kept releases and bundles bound it).
    #[serde(default)]
    pub store_limit: Option<String>,
}

impl Transfer {
    /// Chunk requests answered at once: `max_uploads`, fewer under a low `upload_rate`,
    /// so that each request still gets a chunk out every second (a fetcher gives a peer 5 s
    /// per answer).
    pub fn uploads_at_once(&self) -> usize {
        let rate = self.upload_rate.as_deref().and_then(|r| parse_size(r).ok());
        match rate {
            Some(rate) => {
                let fits = (rate / u64::from(crate::chunks::MAX_CHUNK)).max(1) as usize;
                self.max_uploads.min(fits)
            }
            None => self.max_uploads,
        }
    }

    /// The swarm's tuning for this agent: under a `download_rate`, no more batches in
    /// flight than the rate moves in 4 s, so no batch misses its deadline waiting on this
    /// host's own limit.
    pub fn swarm_config(&self) -> crate::blobs::swarm::Config {
        let mut config = crate::blobs::swarm::Config::default();
        if let Some(rate) = self
            .download_rate
            .as_deref()
            .and_then(|r| parse_size(r).ok())
        {
            let batch = config.batch as u64 * u64::from(crate::chunks::AVG_CHUNK);
            config.max_in_flight = ((rate * 4 / batch).max(1) as usize).min(config.max_in_flight);
        }
        config
    }
}

impl Default for Transfer {
    fn default() -> Self {
        Transfer {
            from_peers: true,
            max_uploads: default_max_uploads(),
            upload_rate: None,
            download_rate: None,
            store_limit: None,
        }
    }
}

fn yes() -> bool {
    true
}

fn default_max_uploads() -> usize {
    8
}

/// `50MiB`, `800KiB`, `1GiB`, `4096` (bytes): a size as the configuration writes it.
pub fn parse_size(text: &str) -> anyhow::Result<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let bad = || anyhow::anyhow!("`{text}` is not a size like 4096, 800KiB, 50MiB or 1GiB");
    let n: u64 = number.parse().map_err(|_| bad())?;
    let unit: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err(bad()),
    };
    let size = n.checked_mul(unit).ok_or_else(bad)?;
    if size == 0 {
        anyhow::bail!("`{text}`: a size of zero would stop every transfer");
    }
    Ok(size)
}

/// The most webhooks one agent sends to.
pub const MAX_WEBHOOKS: usize = 16;

/// One webhook: `url` (http), the `events` it wants (all when empty) and the secret its
/// deliveries are signed with (`secret`, or `secret_file` holding it).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    pub url: String,
    #[serde(default)]
    pub events: Vec<String>,
    #[serde(default)]
    pub secret: Option<String>,
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// The HMAC key: the secret, or the file's contents (trimmed), once loaded.
    #[serde(skip)]
    pub key: Vec<u8>,
}

impl Webhook {
    /// Whether it wants to be told of `kind`.
    pub fn wants(&self, kind: crate::fleet::notify::NoticeKind) -> bool {
        self.events.is_empty() || self.events.iter().any(|e| e == kind.name())
    }

    /// Checks what the file says, and reads the secret file (relative to `base`).
    fn resolve(&mut self, n: usize, base: &Path) -> Result<()> {
        let what = || format!("webhook {} ({})", n + 1, self.url);
        let url = url::Url::parse(&self.url).with_context(what)?;
        if url.scheme() != "http" || url.host().is_none() {
            anyhow::bail!("{}: only http://HOST[:PORT]/PATH URLs are sent to", what());
        }
        if let Some(bad) = self
            .events
            .iter()
            .find(|e| crate::fleet::notify::NoticeKind::parse(e).is_none())
        {
            anyhow::bail!(
                "{}: unknown event {bad:?}; the events are {}",
                what(),
                crate::fleet::notify::NoticeKind::ALL
                    .map(|k| k.name())
                    .join(", ")
            );
        }
        self.key = match (&self.secret, &self.secret_file) {
            (Some(secret), None) => secret.as_bytes().to_vec(),
            (None, Some(file)) => {
                let file = base.join(file);
                std::fs::read_to_string(&file)
                    .with_context(|| format!("{}: reading {}", what(), file.display()))?
                    .trim()
                    .as_bytes()
                    .to_vec()
            }
            _ => anyhow::bail!(
                "{}: give exactly one of `secret` and `secret_file` (deliveries are signed)",
                what()
            ),
        };
        if self.key.len() < 16 {
            anyhow::bail!("{}: the secret is shorter than 16 bytes", what());
        }
        Ok(())
    }
}

fn default_forget_dead_after() -> String {
    "24h".into()
}

/// `90s`, `30m`, `24h`, `7d`: a duration as the configuration writes it.
pub fn parse_duration(text: &str) -> anyhow::Result<std::time::Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| anyhow::anyhow!("`{text}` is not a duration like 90s, 30m, 24h or 7d"))?;
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => anyhow::bail!("`{text}` is not a duration like 90s, 30m, 24h or 7d"),
    };
    let secs = n.saturating_mul(unit_secs);
    if secs > 366 * 86400 {
        anyhow::bail!("`{text}` is longer than a year");
    }
    Ok(std::time::Duration::from_secs(secs))
}

/// The port agents listen on unless told otherwise.
pub const DEFAULT_PORT: u16 = 7400;

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT))
}

fn default_install_root() -> PathBuf {
    PathBuf::from("/")
}

fn default_keep_releases() -> usize {
    crate::lifecycle::run::DEFAULT_KEEP_RELEASES
}

impl AgentConfig {
    /// Reads a configuration file. Relative paths in it (`data_dir`, `install_root`,
    /// `identity`) are taken from the file's directory, not the working directory.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut config = Self::parse(&text).with_context(|| format!("{}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new(""));
        for (n, hook) in config.webhooks.iter_mut().enumerate() {
            hook.resolve(n, base)
                .with_context(|| format!("{}", path.display()))?;
        }
        for p in [&mut config.data_dir, &mut config.install_root]
            .into_iter()
            .chain(config.identity.as_mut())
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(config)
    }

    pub fn parse(text: &str) -> Result<Self> {
        let config: AgentConfig =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim()))?;
        if config.name.trim().is_empty() {
            anyhow::bail!("`name` is empty");
        }
        parse_duration(&config.forget_dead_after).context("`forget_dead_after`")?;
        if let Some((app, _)) = config.ports.iter().find(|(_, p)| **p == 0) {
            anyhow::bail!("`ports.{app}` is 0: give the port the service should listen on");
        }
        if config.webhooks.len() > MAX_WEBHOOKS {
            anyhow::bail!(
                "{} webhooks, more than {MAX_WEBHOOKS}",
                config.webhooks.len()
            );
        }
        if !(1..=1024).contains(&config.transfer.max_uploads) {
            anyhow::bail!(
                "`transfer.max_uploads` is {}: give 1 to 1024 chunk requests at once",
                config.transfer.max_uploads
            );
        }
        for (key, size) in [
            ("upload_rate", &config.transfer.upload_rate),
            ("download_rate", &config.transfer.download_rate),
            ("store_limit", &config.transfer.store_limit),
        ] {
            if let Some(size) = size {
                let bytes = parse_size(size).with_context(|| format!("`transfer.{key}`"))?;
                let least = u64::from(crate::chunks::MAX_CHUNK);
                if key != "store_limit" && bytes < least {
                    anyhow::bail!(
                        "`transfer.{key}` is {bytes} bytes per second, less than one chunk's \
                         most ({least}): give at least 128KiB"
                    );
                }
            }
        }
        Ok(config)
    }

    /// The address this agent is known by in the mesh.
    pub fn advertised_addr(&self) -> Result<SocketAddr> {
        if let Some(addr) = self.advertise {
            return Ok(addr);
        }
        if !self.listen.ip().is_unspecified() {
            return Ok(self.listen);
        }
        // Ask the OS which local address it would use toward a seed; connecting a UDP
        // socket sends nothing.
        if let Some(seed) = self.seeds.first() {
            let any = SocketAddr::new(self.listen.ip(), 0);
            if let Ok(ip) = std::net::UdpSocket::bind(any)
                .and_then(|s| s.connect(seed).and_then(|()| s.local_addr()))
                .map(|a| a.ip())
            {
                return Ok(SocketAddr::new(ip, self.listen.port()));
            }
        }
        anyhow::bail!(
            "`listen = \"{}\"` does not say which address peers should use: set `advertise` \
             (or `listen`) to this host's address",
            self.listen
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_are_taken_from_the_config_files_directory() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(
            &file,
            "name = \"edge-1\"\ndata_dir = \"data\"\nidentity = \"ids/edge-1\"\n\
             install_root = \"/srv\"\n",
        )
        .unwrap();
        let c = AgentConfig::load(&file).unwrap();
        assert_eq!(c.data_dir, dir.path().join("data"));
        assert_eq!(c.identity, Some(dir.path().join("ids/edge-1")));
        assert_eq!(c.install_root, PathBuf::from("/srv"));
    }

    #[test]
    fn a_minimal_config_gets_its_defaults() {
        let c = AgentConfig::parse(
            "name = \"edge-1\"\ndata_dir = \"/var/lib/shoal\"\n[tags]\nrole = \"inference\"\n",
        )
        .unwrap();
        assert_eq!(c.install_root, PathBuf::from("/"));
        assert_eq!(c.keep_releases, 5);
        assert_eq!(c.tags["role"], "inference");
        assert_eq!(c.listen, "0.0.0.0:7400".parse().unwrap());
        assert!(c.identity.is_none() && c.seeds.is_empty() && c.ports.is_empty());
    }

    #[test]
    fn webhooks_are_checked_and_their_secret_read_when_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(dir.path().join("hook.secret"), "from-a-file-0123456789\n").unwrap();
        let load = |hooks: &str| {
            std::fs::write(&file, format!("name = \"a\"\ndata_dir = \"d\"\n{hooks}")).unwrap();
            AgentConfig::load(&file)
        };
        let c = load(
            "[[webhooks]]\nurl = \"http://127.0.0.1:9000/h\"\nsecret = \"0123456789abcdef\"\n\
             [[webhooks]]\nurl = \"http://ops.internal/shoal\"\nevents = [\"failure\", \"rollback\"]\n\
             secret_file = \"hook.secret\"\n",
        )
        .unwrap();
        assert_eq!(c.webhooks[0].key, b"0123456789abcdef");
        assert_eq!(c.webhooks[1].key, b"from-a-file-0123456789");
        use crate::fleet::notify::NoticeKind;
        assert!(c.webhooks[0].wants(NoticeKind::Start));
        assert!(
            c.webhooks[1].wants(NoticeKind::Rollback) && !c.webhooks[1].wants(NoticeKind::Start)
        );
        for (bad, why) in [
            (
                "url = \"https://x/h\"\nsecret = \"0123456789abcdef\"",
                "only http://",
            ),
            (
                "url = \"not a url\"\nsecret = \"0123456789abcdef\"",
                "webhook 1",
            ),
            (
                "url = \"http://x/h\"\nevents = [\"deploy\"]\nsecret = \"0123456789abcdef\"",
                "unknown event",
            ),
            ("url = \"http://x/h\"", "exactly one of `secret`"),
            (
                "url = \"http://x/h\"\nsecret = \"short\"",
                "shorter than 16",
            ),
            ("url = \"http://x/h\"\nsecret_file = \"missing\"", "reading"),
        ] {
            let err = format!("{:#}", load(&format!("[[webhooks]]\n{bad}\n")).unwrap_err());
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn ports_override_the_appspec_per_application() {
        let base = "name = \"a\"\ndata_dir = \"/d\"\n";
        let c = AgentConfig::parse(&format!("{base}[ports]\ninference = 18081\n")).unwrap();
        assert_eq!(c.ports["inference"], 18081);
        let err = AgentConfig::parse(&format!("{base}[ports]\ninference = 0\n")).unwrap_err();
        assert!(err.to_string().contains("ports.inference"), "{err}");
        let err = AgentConfig::parse(&format!("{base}[ports]\ninference = 70000\n")).unwrap_err();
        assert!(err.to_string().contains("line 4"), "{err}");
    }

    #[test]
    fn the_advertised_address_is_told_or_found() {
        let base = "name = \"a\"\ndata_dir = \"/d\"\n";
        let c = AgentConfig::parse(&format!("{base}listen = \"127.0.0.9:7500\"\n")).unwrap();
        assert_eq!(
            c.advertised_addr().unwrap(),
            "127.0.0.9:7500".parse().unwrap()
        );
        let c = AgentConfig::parse(&format!(
            "{base}listen = \"0.0.0.0:7500\"\nadvertise = \"10.1.2.3:7500\"\n"
        ))
        .unwrap();
        assert_eq!(
            c.advertised_addr().unwrap(),
            "10.1.2.3:7500".parse().unwrap()
        );
        let c = AgentConfig::parse(&format!(
            "{base}listen = \"0.0.0.0:7500\"\nseeds = [\"127.0.0.3:7400\"]\n"
        ))
        .unwrap();
        assert_eq!(
            c.advertised_addr().unwrap(),
            "127.0.0.1:7500".parse().unwrap()
        );
        let err = AgentConfig::parse(base)
            .unwrap()
            .advertised_addr()
            .unwrap_err();
        assert!(err.to_string().contains("advertise"), "{err}");
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
