//! `shoal init`: one host made ready for `shoal agent` in one command. It writes the
//! agent's configuration (`/etc/shoal/agent.toml` by default), puts the host's agent
//! identity beside it (`<config dir>/identity`, 0700, its key 0600) and makes the data
//! directory (0700).
//!
//! The identity is either issued here from the fleet CA (`--ca-dir`, on a machine that
//! holds the CA key) or one `shoal ca issue` wrote elsewhere (`--identity`), which must be
//! an *agent* certificate named `--name`, chained to its `ca.pem`, valid now, with the key
//! that matches it. Everything is checked before anything is written: the names, tags,
//! addresses (the address peers will use must be known, as the agent would work it out),
//! the identity, the CA, and that no configuration or identity is already there (unless
//! `--force`). The identity is assembled in a staging directory and renamed into place,
//! the configuration written whole, and the result loaded again with the agent's own
//! loader ([`AgentConfig::load`]) before the command says it is done.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::Serialize;

use crate::config::{AgentConfig, DEFAULT_PORT};
use crate::identity::sign::{CertVerifier, SignError, Signer};
use crate::identity::{self, Identity, Role};
use crate::mesh::hoststate::{MAX_TAG_KEY, MAX_TAGS};

#[derive(Args, Debug)]
pub struct InitArgs {
    /// This host's name in the fleet: its certificate's name.
    #[arg(long)]
    pub name: String,
    /// The UDP address the agent listens on (IP or IP:PORT).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:7400")]
    pub listen: String,
    /// The address peers reach this host at (IP or IP:PORT); needed when --listen is
    /// 0.0.0.0 and there is no --seed to find it by.
    #[arg(long, value_name = "ADDR")]
    pub advertise: Option<String>,
    #[command(flatten)]
    pub source: IdentitySource,
    /// An agent to join the mesh through (IP or IP:PORT); repeatable.
    #[arg(long = "seed", value_name = "ADDR")]
    pub seeds: Vec<String>,
    /// A tag deployments select this host by; repeatable.
    #[arg(long = "tag", value_name = "K=V")]
    pub tags: Vec<String>,
    /// Releases, state, logs and the hook cache.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/shoal")]
    pub data_dir: PathBuf,
    /// AppSpec destinations are rooted here.
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub install_root: PathBuf,
    /// The configuration file to write; the identity goes beside it.
    #[arg(long, value_name = "FILE", default_value = "/etc/shoal/agent.toml")]
    pub config: PathBuf,
    /// Replace an existing configuration and identity.
    #[arg(long)]
    pub force: bool,
}

/// Where this host's agent identity comes from: exactly one of the two.
#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
pub struct IdentitySource {
    /// Issue this host's agent identity here, from the fleet CA in DIR (needs its ca.key).
    #[arg(long, value_name = "DIR")]
    pub ca_dir: Option<PathBuf>,
    /// Use the agent identity in DIR (ca.pem, cert.pem, key.pem from `shoal ca issue`):
    /// it is checked and copied. (This is not the global operator --identity.)
    #[arg(long, value_name = "DIR")]
    pub identity: Option<PathBuf>,
}

/// Where the identity comes from.
enum Source {
    /// Issued here by the fleet CA in this directory.
    Ca(PathBuf),
    /// Copied from this directory (or left in place when it is the destination).
    Copy(PathBuf),
}

/// What `--json` prints.
#[derive(Serialize)]
struct Summary {
    config: PathBuf,
    identity: PathBuf,
    data_dir: PathBuf,
    install_root: PathBuf,
    name: String,
    listen: SocketAddr,
    advertise: SocketAddr,
    seeds: Vec<SocketAddr>,
    tags: std::collections::BTreeMap<String, String>,
    /// `issued` (from --ca-dir) or `copied` (from --identity).
    identity_source: &'static str,
}

pub fn run(args: InitArgs, json: bool) -> Result<bool> {
    let plan = Plan::check(args)?;
    plan.write()?;
    let summary = plan.verify()?;
    if json {
        super::print_json(&summary)?;
    } else {
        print_summary(&summary);
    }
    Ok(true)
}

/// Everything checked, nothing written yet.
struct Plan {
    name: String,
    source: Source,
    config_path: PathBuf,
    config_dir: PathBuf,
    identity_dir: PathBuf,
    data_dir: PathBuf,
    install_root: PathBuf,
    /// The configuration file's text, already parsed back by the agent's parser.
    text: String,
    /// What the agent will read from it.
    expected: AgentConfig,
    advertise: SocketAddr,
    force: bool,
}

impl Plan {
    fn check(args: InitArgs) -> Result<Plan> {
        identity::check_name(&args.name).context("--name")?;
        let listen = parse_addr(&args.listen, DEFAULT_PORT).context("--listen")?;
        let advertise = args
            .advertise
            .as_deref()
            .map(|a| parse_addr(a, listen.port()).context("--advertise"))
            .transpose()?;
        if let Some(a) = advertise
            && a.ip().is_unspecified()
        {
            bail!(
                "--advertise {a}: peers cannot reach an unspecified address; give this host's own"
            );
        }
        let mut seeds = Vec::new();
        for s in &args.seeds {
            let seed = parse_addr(s, DEFAULT_PORT).with_context(|| format!("--seed {s}"))?;
            if seed.ip().is_unspecified() {
                bail!("--seed {s}: give the address of an agent, not an unspecified one");
            }
            if !seeds.contains(&seed) {
                seeds.push(seed);
            }
        }
        let tags = parse_tags(&args.tags)?;

        let absolute = |p: &Path, what: &str| {
            std::path::absolute(p).with_context(|| format!("{what} {}", p.display()))
        };
        let config_path = absolute(&args.config, "--config")?;
        let config_dir = config_path
            .parent()
            .ok_or_else(|| anyhow!("--config {}: not a file path", config_path.display()))?
            .to_path_buf();
        if config_path.file_name().is_none() || config_path.is_dir() {
            bail!("--config {}: not a file path", config_path.display());
        }
        let identity_dir = config_dir.join("identity");
        let data_dir = absolute(&args.data_dir, "--data-dir")?;
        let install_root = absolute(&args.install_root, "--install-root")?;
        for (what, dir) in [("--data-dir", &data_dir), ("--install-root", &install_root)] {
            if dir.exists() && !dir.is_dir() {
                bail!("{what} {}: exists and is not a directory", dir.display());
            }
        }
        if config_dir.exists() && !config_dir.is_dir() {
            bail!("{}: exists and is not a directory", config_dir.display());
        }

        // clap refuses both options on the command line; `identity` may still hold the
        // global operator --identity (SHOAL_IDENTITY, or given before `init`), which clap
        // fills in when `init --identity` is absent: --ca-dir then is what was asked.
        let source = match (args.source.ca_dir, args.source.identity) {
            (Some(ca), _) => {
                check_ca(&ca)?;
                Source::Ca(ca)
            }
            (None, Some(dir)) => {
                check_agent_identity(&dir, &args.name)?;
                Source::Copy(dir)
            }
            (None, None) => bail!("give one of --ca-dir DIR and --identity DIR"),
        };

        if !args.force {
            if config_path.exists() {
                bail!(
                    "{} already exists; pass --force to replace it (and the identity beside it)",
                    config_path.display()
                );
            }
            let in_place = matches!(&source, Source::Copy(d) if same_dir(d, &identity_dir));
            if identity_dir.exists() && !in_place {
                bail!(
                    "{} already holds an identity; pass --force to replace it",
                    identity_dir.display()
                );
            }
        }

        let text = config_text(
            &args.name,
            listen,
            advertise,
            &data_dir,
            &install_root,
            &identity_dir,
            &seeds,
            &tags,
        )?;
        // The agent's own parser has the last word on what the file says.
        let expected = AgentConfig::parse(&text)
            .map_err(|e| anyhow!("the configuration shoal init made does not parse: {e:#}"))?;
        let advertise = expected.advertised_addr().map_err(|_| {
            anyhow!(
                "--listen {listen} does not say which address peers should use: pass \
                 --advertise ADDR (this host's address), a --seed to find it by, or a \
                 --listen address that is not 0.0.0.0"
            )
        })?;
        Ok(Plan {
            name: args.name,
            source,
            config_path,
            config_dir,
            identity_dir,
            data_dir,
            install_root,
            text,
            expected,
            advertise,
            force: args.force,
        })
    }

    /// Writes the layout: the identity (staged, checked, renamed into place), the data
    /// directory, the install root if missing, then the configuration.
    fn write(&self) -> Result<()> {
        make_dir(&self.config_dir, 0o700)?;
        // The root agent trusts what is here: nobody else may be able to change it.
        check_private(&self.config_dir)?;
        let in_place = matches!(&self.source, Source::Copy(d) if same_dir(d, &self.identity_dir));
        if in_place {
            // Already where it belongs (put there by cloud-init, say): only the modes, on
            // the real files (a link is refused, never followed).
            check_private(&self.identity_dir)?;
            let key = self.identity_dir.join("key.pem");
            if std::fs::symlink_metadata(&key).is_ok_and(|m| m.file_type().is_symlink()) {
                bail!(
                    "{} is a symbolic link: put the key itself there",
                    key.display()
                );
            }
            set_mode(&self.identity_dir, 0o700)?;
            set_mode(&key, 0o600)?;
        } else {
            let staging = Staging::new(&self.config_dir)?;
            match &self.source {
                Source::Ca(ca) => identity::issue(ca, &self.name, Role::Agent, &staging.0)?,
                Source::Copy(from) => copy_identity(from, &staging.0)?,
            }
            set_mode(&staging.0.join("key.pem"), 0o600)?;
            for f in ["ca.pem", "cert.pem"] {
                set_mode(&staging.0.join(f), 0o644)?;
            }
            check_agent_identity(&staging.0, &self.name)?;
            // On disk before it takes the identity's place: a power cut never leaves an
            // identity with an empty file.
            for f in ["ca.pem", "cert.pem", "key.pem"] {
                let path = staging.0.join(f);
                std::fs::File::open(&path)
                    .and_then(|f| f.sync_all())
                    .with_context(|| format!("syncing {}", path.display()))?;
            }
            std::fs::File::open(&staging.0)
                .and_then(|d| d.sync_all())
                .with_context(|| format!("syncing {}", staging.0.display()))?;
            staging.replace(&self.identity_dir, self.force)?;
        }
        make_dir(&self.data_dir, 0o700)?;
        make_dir(&self.install_root, 0o755)?;
        crate::durable::write_whole(&self.config_path, self.text.as_bytes())
    }

    /// Loads what was written as the agent will, and checks it says what was asked.
    fn verify(&self) -> Result<Summary> {
        let loaded = AgentConfig::load(&self.config_path).with_context(|| {
            format!(
                "the written configuration {} does not load",
                self.config_path.display()
            )
        })?;
        let identity = loaded
            .identity
            .clone()
            .ok_or_else(|| anyhow!("the written configuration names no identity"))?;
        check_agent_identity(&identity, &loaded.name)?;
        if loaded != self.expected || loaded.advertised_addr()? != self.advertise {
            bail!(
                "{} does not read back as written: {loaded:?}",
                self.config_path.display()
            );
        }
        Ok(Summary {
            config: self.config_path.clone(),
            identity,
            data_dir: loaded.data_dir,
            install_root: loaded.install_root,
            name: loaded.name,
            listen: loaded.listen,
            advertise: self.advertise,
            seeds: loaded.seeds,
            tags: loaded.tags,
            identity_source: match self.source {
                Source::Ca(_) => "issued",
                Source::Copy(_) => "copied",
            },
        })
    }
}

fn print_summary(s: &Summary) {
    let seeds: Vec<String> = s.seeds.iter().map(|a| a.to_string()).collect();
    let tags: Vec<String> = s.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let none = |v: &[String]| {
        if v.is_empty() {
            "(none)".to_string()
        } else {
            v.join(" ")
        }
    };
    println!("{} is ready to run the agent", s.name);
    println!("  config        {}", s.config.display());
    println!(
        "  identity      {} ({} agent certificate for {})",
        s.identity.display(),
        s.identity_source,
        s.name
    );
    println!("  data dir      {}", s.data_dir.display());
    println!("  install root  {}", s.install_root.display());
    println!("  listen        {} (peers use {})", s.listen, s.advertise);
    println!("  seeds         {}", none(&seeds));
    println!("  tags          {}", none(&tags));
    println!(
        "next: systemctl enable --now shoal-agent, or run `shoal agent --config {}`",
        s.config.display()
    );
}

/// `IP:PORT`, or an `IP` that gets `port`. Host names are refused: the configuration
/// holds addresses.
fn parse_addr(text: &str, port: u16) -> Result<SocketAddr> {
    let text = text.trim();
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    bail!(
        "`{text}` is not an address like 10.0.0.4 or 10.0.0.4:7400 (IP addresses only, no host names)"
    )
}

/// `k=v` tags, each one the fleet can target (`fleet::targets`' rules: no `,`, `;` or
/// control character, nothing empty), within the host record's caps, no key twice.
fn parse_tags(tags: &[String]) -> Result<std::collections::BTreeMap<String, String>> {
    use crate::fleet::targets::MAX_VALUE;
    let mut out = std::collections::BTreeMap::new();
    if tags.len() > MAX_TAGS {
        bail!(
            "{} tags, more than a host may carry ({MAX_TAGS})",
            tags.len()
        );
    }
    for tag in tags {
        let Some((key, value)) = tag.split_once('=') else {
            bail!("--tag {tag:?}: write it as KEY=VALUE");
        };
        let (key, value) = (key.trim(), value.trim());
        let why = if key.is_empty() {
            Some("the key is empty".to_string())
        } else if value.is_empty() {
            Some("the value is empty".to_string())
        } else if tag.contains([',', ';']) || tag.chars().any(char::is_control) {
            Some("`,`, `;` and control characters cannot be targeted".to_string())
        } else if key.len() > MAX_TAG_KEY {
            Some(format!("the key is longer than {MAX_TAG_KEY} bytes"))
        } else if value.len() > MAX_VALUE {
            Some(format!("the value is longer than {MAX_VALUE} bytes"))
        } else {
            None
        };
        if let Some(why) = why {
            bail!("--tag {tag:?}: {why}");
        }
        if out.insert(key.to_string(), value.to_string()).is_some() {
            bail!("--tag {key}=...: the key is given twice");
        }
    }
    Ok(out)
}

/// A TOML string.
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn toml_path(p: &Path) -> Result<String> {
    let s = p
        .to_str()
        .ok_or_else(|| anyhow!("{}: the configuration needs UTF-8 paths", p.display()))?;
    Ok(toml_string(s))
}

/// A TOML key: bare when it can be, quoted otherwise.
fn toml_key(k: &str) -> String {
    if !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        k.to_string()
    } else {
        toml_string(k)
    }
}

#[allow(clippy::too_many_arguments)]
fn config_text(
    name: &str,
    listen: SocketAddr,
    advertise: Option<SocketAddr>,
    data_dir: &Path,
    install_root: &Path,
    identity_dir: &Path,
    seeds: &[SocketAddr],
    tags: &std::collections::BTreeMap<String, String>,
) -> Result<String> {
    let mut t = String::from(
        "# Written by `shoal init`. Every key is described in docs/config.md.\n\
         # After a change, restart the agent (a change of [tags] only: SIGHUP reloads them).\n",
    );
    t += &format!("name = {}\n", toml_string(name));
    t += &format!("listen = {}\n", toml_string(&listen.to_string()));
    if let Some(a) = advertise {
        t += &format!("advertise = {}\n", toml_string(&a.to_string()));
    }
    t += &format!("data_dir = {}\n", toml_path(data_dir)?);
    t += &format!("install_root = {}\n", toml_path(install_root)?);
    t += &format!("identity = {}\n", toml_path(identity_dir)?);
    let seeds: Vec<String> = seeds.iter().map(|s| toml_string(&s.to_string())).collect();
    t += &format!("seeds = [{}]\n", seeds.join(", "));
    t += "\n[tags]\n";
    for (k, v) in tags {
        t += &format!("{} = {}\n", toml_key(k), toml_string(v));
    }
    Ok(t)
}

/// The fleet CA in `dir` can issue: its certificate and key are there and readable.
fn check_ca(dir: &Path) -> Result<()> {
    let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let pem = std::fs::read(&cert).with_context(|| {
        format!(
            "--ca-dir: reading the fleet CA certificate {}",
            cert.display()
        )
    })?;
    CertificateDer::from_pem_slice(&pem)
        .map_err(|e| anyhow!("--ca-dir: {} is not a PEM certificate: {e}", cert.display()))?;
    let key_pem = std::fs::read_to_string(&key).with_context(|| {
        format!(
            "--ca-dir: reading the fleet CA key {} (issue identities where the CA key is; \
             on a host, use --identity)",
            key.display()
        )
    })?;
    rcgen::KeyPair::from_pem(&key_pem)
        .map_err(|e| anyhow!("--ca-dir: {} is not a PEM private key: {e}", key.display()))?;
    Ok(())
}

/// `dir` holds an agent identity for `name` that an agent can run with: ca.pem, cert.pem,
/// key.pem; the certificate an agent's, issued to `name`, chained to ca.pem, valid now;
/// the key the certificate's.
fn check_agent_identity(dir: &Path, name: &str) -> Result<Identity> {
    let identity = Identity::load(dir).with_context(|| {
        format!(
            "{} is not an identity as `shoal ca issue` writes it",
            dir.display()
        )
    })?;
    if identity.role != Role::Agent {
        bail!(
            "{} holds an operator identity (`{}`), not an agent's: issue one for this host \
             with `shoal ca issue --dir CA --name {name} --out DIR` (without --operator)",
            dir.display(),
            identity.name
        );
    }
    if identity.name != name {
        bail!(
            "{} is the identity of `{}`, not of `{name}`: pass --name {} or issue one for \
             `{name}`",
            dir.display(),
            identity.name,
            identity.name
        );
    }
    let msg = b"shoal init: the key matches the certificate";
    let verified = Signer::new(&identity)
        .and_then(|signer| signer.sign(msg))
        .and_then(|sig| {
            CertVerifier::new(identity.ca.clone()).verify(
                &identity.cert,
                name,
                msg,
                &sig,
                crate::fleet::now_ms(),
            )
        });
    match verified {
        Ok(()) => Ok(identity),
        Err(SignError::BadSignature) => {
            bail!("{}: key.pem is not the key of cert.pem", dir.display())
        }
        Err(SignError::Untrusted(why)) => bail!(
            "{}: cert.pem was not issued by the CA in ca.pem ({why})",
            dir.display()
        ),
        Err(SignError::NotValidNow) => bail!(
            "{}: cert.pem is not valid now (expired, or the clock is wrong)",
            dir.display()
        ),
        Err(e) => bail!("{}: {e}", dir.display()),
    }
}

/// Whether `a` and `b` are the same existing directory.
fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Makes `dir` (and its missing parents) with `mode`; an existing one is left as it is.
fn make_dir(dir: &Path, mode: u32) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

/// Refuses a directory that is a link, is not this user's, or others may write to (as
/// sshd's StrictModes does): the config and identity the root agent trusts live there.
fn check_private(dir: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta =
        std::fs::symlink_metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    if meta.file_type().is_symlink() || !meta.is_dir() {
        bail!("{} is not a directory (a link is refused)", dir.display());
    }
    if meta.uid() != nix::unistd::geteuid().as_raw() || meta.mode() & 0o022 != 0 {
        bail!(
            "{} belongs to another user or others may write to it (mode {:o}): the agent \
             trusts what is there, so make it yours and 0700 (or 0755)",
            dir.display(),
            meta.mode() & 0o7777
        );
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

/// Copies an identity's three files; the key is created 0600 and never passes through a
/// more open mode.
fn copy_identity(from: &Path, to: &Path) -> Result<()> {
    for (file, mode) in [("ca.pem", 0o644), ("cert.pem", 0o644), ("key.pem", 0o600)] {
        let src = from.join(file);
        let bytes = std::fs::read(&src).with_context(|| format!("reading {}", src.display()))?;
        let dst = to.join(file);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&dst)
            .with_context(|| format!("writing {}", dst.display()))?;
        std::io::Write::write_all(&mut f, &bytes)
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", dst.display()))?;
    }
    Ok(())
}

/// A directory beside the final identity where the new one is put together (and whether
/// it was renamed into place); removed on drop unless it was.
struct Staging(PathBuf, bool);

impl Staging {
    fn new(config_dir: &Path) -> Result<Staging> {
        let dir = config_dir.join(format!(".identity.new-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        Ok(Staging(dir, false))
    }

    /// Renames the staged identity to `dest`; an identity there is replaced only when
    /// `force` (moved aside first, removed once the new one is in place).
    fn replace(mut self, dest: &Path, force: bool) -> Result<()> {
        let parent = dest.parent().unwrap_or(Path::new("/"));
        let old = parent.join(format!(".identity.old-{}", std::process::id()));
        let had_one = dest.exists();
        if had_one {
            if !force {
                bail!(
                    "{} already holds an identity; pass --force to replace it",
                    dest.display()
                );
            }
            let _ = std::fs::remove_dir_all(&old);
            std::fs::rename(dest, &old)
                .with_context(|| format!("moving the old identity {} aside", dest.display()))?;
        }
        if let Err(e) = std::fs::rename(&self.0, dest) {
            if had_one {
                let _ = std::fs::rename(&old, dest);
            }
            return Err(e).with_context(|| format!("putting the identity at {}", dest.display()));
        }
        if had_one {
            std::fs::remove_dir_all(&old)
                .with_context(|| format!("removing the old identity {}", old.display()))?;
        }
        self.1 = true;
        std::fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {}", parent.display()))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.1 {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_get_the_default_port_and_names_are_refused() {
        assert_eq!(
            parse_addr("10.0.0.4", 7400).unwrap(),
            "10.0.0.4:7400".parse().unwrap()
        );
        assert_eq!(
            parse_addr("10.0.0.4:7500", 7400).unwrap(),
            "10.0.0.4:7500".parse().unwrap()
        );
        assert!(parse_addr("edge-1.internal:7400", 7400).is_err());
    }

    #[test]
    fn tags_are_targetable_and_the_text_parses_back() {
        let tags = parse_tags(&["role=web".into(), "zone name = a=b".into()]).unwrap();
        assert_eq!(tags["zone name"], "a=b");
        for bad in ["role", "=x", "role=", "a=b,c", "a=b;c", "a=1\u{7}"] {
            assert!(parse_tags(&[bad.into()]).is_err(), "{bad}");
        }
        assert!(parse_tags(&["a=1".into(), "a=2".into()]).is_err());
        let text = config_text(
            "edge-1",
            "0.0.0.0:7400".parse().unwrap(),
            Some("10.0.0.5:7400".parse().unwrap()),
            Path::new("/var/lib/shoal"),
            Path::new("/"),
            Path::new("/etc/shoal/identity"),
            &["10.0.0.4:7400".parse().unwrap()],
            &tags,
        )
        .unwrap();
        let c = AgentConfig::parse(&text).unwrap();
        assert_eq!(c.tags, tags);
        assert_eq!(c.seeds, vec!["10.0.0.4:7400".parse().unwrap()]);
        assert_eq!(c.identity, Some(PathBuf::from("/etc/shoal/identity")));
    }
}
