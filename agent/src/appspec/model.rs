//! What an AppSpec means: the raw text interpreted, checked, and every complaint recorded as
//! a [`Problem`] with its line and key.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Serialize;

use super::raw::{RawAppSpec, RawHook, RawPermission, Text};
use crate::hooks::LifecycleEvent;

/// CodeDeploy's limit, and its default, for one hook.
pub const MAX_HOOK_TIMEOUT: Duration = Duration::from_secs(3600);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Os {
    Linux,
    Windows,
}

/// What Install does when a destination file already exists and the previous revision did
/// not install it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum FileExistsBehavior {
    /// Fail the deployment, naming the file (CodeDeploy's default).
    #[default]
    Disallow,
    /// Replace the file.
    Overwrite,
    /// Keep the file that is there.
    Retain,
}

/// `files`: copy `source` (relative to the revision; empty for all of it) to `destination`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FileMapping {
    pub source: String,
    pub destination: String,
    pub file_exists_behavior: Option<FileExistsBehavior>,
    pub line: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ObjectType {
    File,
    Directory,
}

/// `permissions`: applied to installed files under `object` matching `pattern`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Permission {
    pub object: String,
    /// A glob relative to `object`; `**` (everything) when absent.
    pub pattern: String,
    pub except: Vec<String>,
    pub owner: Option<String>,
    pub group: Option<String>,
    pub mode: Option<u32>,
    /// Empty means both files and directories.
    pub types: Vec<ObjectType>,
    pub line: u64,
}

/// One hook: a Wasm file in the revision, run at an event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HookSpec {
    /// Relative to the revision root.
    pub location: String,
    pub timeout: Duration,
    pub runas: Option<String>,
    pub line: u64,
}

/// A hook the agent runs every `interval` while the revision is active (`shoal.monitor`):
/// a golden-prediction check, say. It runs as a ValidateService hook does (same sandbox,
/// same event, the parameter `shoal.monitor` set to its run number), so one check can
/// serve both. More than `failures_allowed` failures in a row is the application's
/// problem, which the host gossips and a rollout's health gate acts on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MonitorSpec {
    pub hook: HookSpec,
    pub interval: Duration,
    pub failures_allowed: u32,
}

/// The most monitors one AppSpec may declare.
pub const MAX_MONITORS: usize = 8;

/// The application process the agent supervises (`shoal.service`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceSpec {
    /// Relative to the installed revision (or absolute).
    pub command: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// The port the application serves on; hooks may reach `127.0.0.1:port`.
    pub port: Option<u16>,
    /// An HTTP path that answers 2xx once the application is up: always a path (it starts
    /// with `/` and names no host), asked of `127.0.0.1:$PORT` and nothing else.
    pub health_path: Option<String>,
    pub start_timeout: Duration,
    /// The user the service runs as (its uid, gid and groups); root when not given.
    pub user: Option<String>,
    /// Zero-downtime switching (`shoal.service.switch`): a proxy holds `port` and the
    /// service listens on an internal `$PORT` of its own.
    pub switch: Option<SwitchSpec>,
    pub line: u64,
}

/// `shoal.service.switch`: how the public port is held and traffic moved between revisions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SwitchSpec {
    /// The address the public port is bound on (default `0.0.0.0`).
    pub address: std::net::IpAddr,
    /// How long connections open on the old revision have to finish after the switch
    /// before its service is stopped (default 30 s, at most 3600).
    pub drain_timeout: Duration,
    /// How long the previous revision's process is kept running after the switch (and its
    /// drain), so that a rollback switches back without a restart (default 0, at most 3600).
    pub keep_previous: Duration,
    /// Each connection to the service starts with a PROXY protocol v2 header that gives
    /// the client's address (default false): for applications that read it.
    pub proxy_protocol: bool,
    /// How new connections made on this host reach the serving revision (default
    /// [`Forward::Kernel`]).
    pub forward: Forward,
}

/// `shoal.service.switch.forward`: who carries a connection to the serving revision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Forward {
    /// A kernel rule (an eBPF program on `connect()`) sends the host's own new connections
    /// to the serving revision's port, with no process in between, where the host allows
    /// it (`crate::switch::kernel`);
    /// the proxy carries the rest. The default.
    #[default]
    Kernel,
    /// The proxy carries every connection.
    Proxy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Shoal will not deploy this AppSpec.
    Error,
    /// Worth knowing; ignored otherwise.
    Warning,
}

/// Something wrong with an AppSpec, and where.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub severity: Severity,
    /// 1-based line, when known.
    pub line: Option<u64>,
    /// Where in the document, e.g. `hooks.BeforeInstall[0].location`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        match self.line {
            Some(line) => write!(
                f,
                "appspec.yml line {line}: {sev}: {}: {}",
                self.key, self.message
            ),
            None => write!(f, "appspec.yml: {sev}: {}: {}", self.key, self.message),
        }
    }
}

/// An AppSpec as Shoal understands it.
#[derive(Clone, Debug, Serialize)]
pub struct AppSpec {
    pub os: Os,
    pub files: Vec<FileMapping>,
    pub file_exists_behavior: FileExistsBehavior,
    pub permissions: Vec<Permission>,
    /// In lifecycle order; events without hooks are absent.
    pub hooks: BTreeMap<LifecycleEvent, Vec<HookSpec>>,
    pub service: Option<ServiceSpec>,
    /// `shoal.monitor`, in order.
    pub monitors: Vec<MonitorSpec>,
    pub problems: Vec<Problem>,
}

impl AppSpec {
    /// The problems that stop a deployment.
    pub fn errors(&self) -> impl Iterator<Item = &Problem> {
        self.problems
            .iter()
            .filter(|p| p.severity == Severity::Error)
    }

    pub fn warnings(&self) -> impl Iterator<Item = &Problem> {
        self.problems
            .iter()
            .filter(|p| p.severity == Severity::Warning)
    }

    /// Ok when Shoal can deploy this AppSpec; otherwise every error, one per line.
    pub fn deployable(&self) -> Result<(), String> {
        let errors: Vec<String> = self.errors().map(|p| p.to_string()).collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("\n"))
        }
    }

    pub fn hooks_for(&self, event: LifecycleEvent) -> &[HookSpec] {
        self.hooks.get(&event).map(Vec::as_slice).unwrap_or(&[])
    }
}

/// Collects problems while the raw document is interpreted.
struct Checker {
    problems: Vec<Problem>,
}

/// Why `path` is not a health-check path: it must be an absolute path of printable ASCII
/// with no `@`, `\\`, `#` or `//` at its start, so that nothing in it can name another host.
pub fn health_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("`{path}` must start with `/`"));
    }
    if path.starts_with("//") {
        return Err(format!(
            "`{path}` starts with `//`, which would name a host"
        ));
    }
    if path.len() > 1024 {
        return Err("longer than 1024 bytes".into());
    }
    if let Some(bad) = path
        .chars()
        .find(|ch| !ch.is_ascii_graphic() || matches!(ch, '@' | '\\' | '#'))
    {
        return Err(format!("`{}` may not hold {bad:?}", path.escape_default()));
    }
    Ok(())
}

fn line_of(t: &Text) -> u64 {
    t.referenced.line()
}

impl Checker {
    fn error(&mut self, line: Option<u64>, key: impl Into<String>, message: impl Into<String>) {
        self.push(Severity::Error, line, key, message);
    }

    fn warn(&mut self, line: Option<u64>, key: impl Into<String>, message: impl Into<String>) {
        self.push(Severity::Warning, line, key, message);
    }

    fn push(
        &mut self,
        severity: Severity,
        line: Option<u64>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) {
        self.problems.push(Problem {
            severity,
            line: line.filter(|l| *l > 0),
            key: key.into(),
            message: message.into(),
        });
    }
}

pub(super) fn interpret(raw: RawAppSpec, ignored: Vec<String>) -> AppSpec {
    let mut c = Checker {
        problems: Vec::new(),
    };

    match &raw.version {
        None => c.error(
            Some(1),
            "version",
            "missing: an AppSpec starts with `version: 0.0`",
        ),
        Some(v) if v.value.trim() == "0.0" => {}
        Some(v) => c.error(
            Some(line_of(v)),
            "version",
            format!(
                "`{}` is not supported: the only AppSpec version is 0.0",
                v.value
            ),
        ),
    }
    let os = match raw
        .os
        .as_ref()
        .map(|o| (o.value.trim().to_ascii_lowercase(), line_of(o)))
    {
        Some((os, _)) if os == "linux" => Os::Linux,
        Some((os, line)) if os == "windows" => {
            c.error(
                Some(line),
                "os",
                "windows: this agent deploys to Linux hosts",
            );
            Os::Windows
        }
        Some((os, line)) => {
            c.error(
                Some(line),
                "os",
                format!("`{os}` is not an operating system AppSpec knows (linux or windows)"),
            );
            Os::Linux
        }
        None => {
            c.error(None, "os", "missing: add `os: linux`");
            Os::Linux
        }
    };

    let file_exists_behavior = raw
        .file_exists_behavior
        .as_ref()
        .and_then(|t| behavior(&mut c, t, "file_exists_behavior"))
        .unwrap_or_default();
    let files = raw
        .files
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, f)| {
            let key = format!("files[{i}]");
            let source = f
                .source
                .value
                .trim()
                .trim_start_matches(['/', '\\'])
                .trim_start_matches("./")
                .to_string();
            if source.split(['/', '\\']).any(|part| part == "..") {
                c.error(
                    Some(line_of(&f.source)),
                    format!("{key}.source"),
                    format!("`{}` leaves the revision", f.source.value),
                );
            }
            let destination = f.destination.value.trim().to_string();
            if os == Os::Linux && !destination.starts_with('/') {
                c.error(
                    Some(line_of(&f.destination)),
                    format!("{key}.destination"),
                    format!("`{destination}` is not an absolute path"),
                );
            }
            if destination.split(['/', '\\']).any(|part| part == "..") {
                c.error(
                    Some(line_of(&f.destination)),
                    format!("{key}.destination"),
                    format!("`{destination}` climbs with `..`: name the directory itself"),
                );
            }
            let feb = f
                .file_exists_behavior
                .as_ref()
                .and_then(|t| behavior(&mut c, t, &format!("{key}.file_exists_behavior")));
            FileMapping {
                source,
                destination,
                file_exists_behavior: feb,
                line: line_of(&f.source),
            }
        })
        .collect();

    let permissions = raw
        .permissions
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, p)| permission(&mut c, i, p))
        .collect();

    let mut hooks: BTreeMap<LifecycleEvent, Vec<HookSpec>> = BTreeMap::new();
    if let Some(raw_hooks) = raw.hooks {
        let hooks_line = raw_hooks.referenced.line();
        for (name, entries) in raw_hooks.value {
            let entries = entries.unwrap_or_default();
            let line = entries
                .first()
                .map(|h| line_of(&h.location).saturating_sub(1))
                .unwrap_or(hooks_line);
            let event = match name.parse::<LifecycleEvent>() {
                Ok(
                    LifecycleEvent::DownloadBundle
                    | LifecycleEvent::Install
                    | LifecycleEvent::BlockTraffic
                    | LifecycleEvent::AllowTraffic,
                ) if !entries.is_empty() => {
                    c.error(Some(line), format!("hooks.{name}"), "the agent itself runs DownloadBundle, Install, BlockTraffic and AllowTraffic; hooks cannot be attached to them");
                    continue;
                }
                Ok(e) => e,
                Err(_) => {
                    c.warn(
                        Some(line),
                        format!("hooks.{name}"),
                        "not a lifecycle event Shoal runs: these hooks will never run",
                    );
                    continue;
                }
            };
            let specs: Vec<HookSpec> = entries
                .into_iter()
                .enumerate()
                .map(|(i, h)| hook(&mut c, &format!("hooks.{name}[{i}]"), h))
                .collect();
            if !specs.is_empty() {
                hooks.entry(event).or_default().extend(specs);
            }
        }
    }

    let (raw_service, raw_monitors) = raw
        .shoal
        .map(|s| (s.service, s.monitor.unwrap_or_default()))
        .unwrap_or_default();
    if raw_monitors.len() > MAX_MONITORS {
        c.error(
            raw_monitors.get(MAX_MONITORS).map(|m| line_of(&m.location)),
            "shoal.monitor",
            format!("more than {MAX_MONITORS} monitors"),
        );
    }
    let monitors = raw_monitors
        .into_iter()
        .take(MAX_MONITORS)
        .enumerate()
        .map(|(i, m)| {
            let key = format!("shoal.monitor[{i}]");
            let interval = m
                .interval
                .as_ref()
                .map(|t| seconds(&mut c, t, &format!("{key}.interval"), 3600))
                .unwrap_or(Duration::from_secs(30));
            let failures_allowed =
                m.failures_allowed
                    .as_ref()
                    .map_or(0, |t| match t.value.trim().parse::<u32>() {
                        Ok(n) if n <= 100 => n,
                        _ => {
                            c.error(
                                Some(line_of(t)),
                                format!("{key}.failures_allowed"),
                                format!("`{}` is not a count from 0 to 100", t.value),
                            );
                            0
                        }
                    });
            let mut hook = hook(
                &mut c,
                &key,
                RawHook {
                    location: m.location,
                    timeout: None,
                    runas: None,
                },
            );
            // A run never outlasts its interval (default: the interval, at most 300 s).
            hook.timeout = m
                .timeout
                .as_ref()
                .map(|t| seconds(&mut c, t, &format!("{key}.timeout"), 300))
                .unwrap_or(interval.min(Duration::from_secs(300)))
                .min(interval);
            MonitorSpec {
                hook,
                interval,
                failures_allowed,
            }
        })
        .collect();
    let service = raw_service.map(|s| {
        let line = line_of(&s.command);
        let port = s
            .port
            .as_ref()
            .and_then(|p| match p.value.trim().parse::<u16>() {
                Ok(port) if port > 0 => Some(port),
                _ => {
                    c.error(
                        Some(line_of(p)),
                        "shoal.service.port",
                        format!("`{}` is not a port number", p.value),
                    );
                    None
                }
            });
        let start_timeout = s
            .start_timeout
            .as_ref()
            .map(|t| seconds(&mut c, t, "shoal.service.start_timeout", 600))
            .unwrap_or(Duration::from_secs(60));
        if s.command.value.trim().is_empty() {
            c.error(Some(line), "shoal.service.command", "empty");
        }
        let health_path = s.health_path.and_then(|h| match health_path(&h.value) {
            Ok(()) => Some(h.value),
            Err(why) => {
                c.error(Some(line_of(&h)), "shoal.service.health_path", why);
                None
            }
        });
        let user = s.user.and_then(|u| {
            let name = u.value.trim();
            let valid = !name.is_empty()
                && name.len() <= 32
                && !name.starts_with('-')
                && name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch));
            if valid {
                Some(name.to_string())
            } else {
                c.error(
                    Some(line_of(&u)),
                    "shoal.service.user",
                    format!("`{}` is not a user name", u.value),
                );
                None
            }
        });
        let switch = s.switch.map(|w| {
            if port.is_none() {
                c.error(
                    Some(line),
                    "shoal.service.switch",
                    "a switched service needs `shoal.service.port`: the public port the switch holds",
                );
            }
            let address = w
                .address
                .and_then(|a| match a.value.trim().parse() {
                    Ok(ip) => Some(ip),
                    Err(_) => {
                        c.error(
                            Some(line_of(&a)),
                            "shoal.service.switch.address",
                            format!("`{}` is not an IP address", a.value),
                        );
                        None
                    }
                })
                .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
            let drain_timeout = w
                .drain_timeout
                .as_ref()
                .map(|t| seconds(&mut c, t, "shoal.service.switch.drain_timeout", 3600))
                .unwrap_or(Duration::from_secs(30));
            let keep_previous = w
                .keep_previous
                .as_ref()
                .map(|t| {
                    if t.value.trim() == "0" {
                        Duration::ZERO
                    } else {
                        seconds(&mut c, t, "shoal.service.switch.keep_previous", 3600)
                    }
                })
                .unwrap_or(Duration::ZERO);
            let proxy_protocol = match w.proxy_protocol.as_ref().map(|t| (t, t.value.trim())) {
                None | Some((_, "false")) => false,
                Some((_, "true")) => true,
                Some((t, other)) => {
                    c.error(
                        Some(line_of(t)),
                        "shoal.service.switch.proxy_protocol",
                        format!("`{other}` is not `true` or `false`"),
                    );
                    false
                }
            };
            let forward = match w.forward.as_ref().map(|t| (t, t.value.trim())) {
                None | Some((_, "kernel")) => Forward::Kernel,
                Some((_, "proxy")) => Forward::Proxy,
                Some((t, other)) => {
                    c.error(
                        Some(line_of(t)),
                        "shoal.service.switch.forward",
                        format!("`{other}` is not `kernel` or `proxy`"),
                    );
                    Forward::Kernel
                }
            };
            SwitchSpec {
                address,
                drain_timeout,
                keep_previous,
                proxy_protocol,
                forward,
            }
        });
        ServiceSpec {
            command: s.command.value.trim().to_string(),
            args: s.args,
            env: s.env,
            port,
            health_path,
            start_timeout,
            user,
            switch,
            line,
        }
    });

    for path in ignored {
        c.warn(None, path, "not an AppSpec key: ignored");
    }
    c.problems.sort_by_key(|p| p.line.unwrap_or(u64::MAX));
    AppSpec {
        os,
        files,
        file_exists_behavior,
        permissions,
        hooks,
        service,
        monitors,
        problems: c.problems,
    }
}

fn behavior(c: &mut Checker, t: &Text, key: &str) -> Option<FileExistsBehavior> {
    match t.value.trim().to_ascii_uppercase().as_str() {
        "DISALLOW" => Some(FileExistsBehavior::Disallow),
        "OVERWRITE" => Some(FileExistsBehavior::Overwrite),
        "RETAIN" => Some(FileExistsBehavior::Retain),
        _ => {
            c.error(
                Some(line_of(t)),
                key,
                format!("`{}` is not DISALLOW, OVERWRITE or RETAIN", t.value),
            );
            None
        }
    }
}

/// Whole seconds from 1 to `max`.
fn seconds(c: &mut Checker, t: &Text, key: &str, max: u64) -> Duration {
    match t.value.trim().parse::<u64>() {
        Ok(s) if (1..=max).contains(&s) => Duration::from_secs(s),
        Ok(s) => {
            c.error(
                Some(line_of(t)),
                key,
                format!("{s} seconds is outside 1..={max}"),
            );
            Duration::from_secs(s.clamp(1, max))
        }
        Err(_) => {
            c.error(
                Some(line_of(t)),
                key,
                format!("`{}` is not a whole number of seconds", t.value),
            );
            Duration::from_secs(max)
        }
    }
}

fn hook(c: &mut Checker, key: &str, h: RawHook) -> HookSpec {
    let line = line_of(&h.location);
    let location = h.location.value.trim().trim_start_matches('/').to_string();
    let lower = location.to_ascii_lowercase();
    if !lower.ends_with(".wasm") {
        let what = match lower.rsplit_once('.').map(|(_, ext)| ext) {
            Some("sh" | "bash" | "zsh") => "a shell script",
            Some("bat" | "cmd" | "ps1") => "a Windows script",
            Some("py" | "rb" | "pl" | "js") => "a script",
            _ => "not a .wasm file",
        };
        c.error(
            Some(line),
            format!("{key}.location"),
            format!(
                "`{location}` is {what}: Shoal runs hooks as sandboxed WebAssembly. Rebuild it as a WASI command \
                 (any language) or with the shoal-hooks SDK, and point `location` at the .wasm (see docs/hooks.md)"
            ),
        );
    }
    if location.split('/').any(|p| p == "..") {
        c.error(
            Some(line),
            format!("{key}.location"),
            format!("`{location}` leaves the revision"),
        );
    }
    let timeout = h
        .timeout
        .as_ref()
        .map(|t| seconds(c, t, &format!("{key}.timeout"), MAX_HOOK_TIMEOUT.as_secs()))
        .unwrap_or(MAX_HOOK_TIMEOUT);
    HookSpec {
        location,
        timeout,
        runas: h.runas.map(|r| r.value.trim().to_string()),
        line,
    }
}

fn permission(c: &mut Checker, i: usize, p: RawPermission) -> Permission {
    let key = format!("permissions[{i}]");
    let line = line_of(&p.object);
    let object = p.object.value.trim().to_string();
    if !object.starts_with('/') {
        c.error(
            Some(line),
            format!("{key}.object"),
            format!("`{object}` is not an absolute path"),
        );
    }
    if object.split('/').any(|part| part == "..") {
        c.error(
            Some(line),
            format!("{key}.object"),
            format!("`{object}` climbs with `..`: name the directory itself"),
        );
    }
    let mode = p.mode.as_ref().and_then(|m| {
        let digits = m.value.trim().trim_start_matches("0o");
        match u32::from_str_radix(digits, 8) {
            Ok(mode) if !digits.is_empty() && digits.len() <= 4 && mode <= 0o7777 => Some(mode),
            _ => {
                c.error(
                    Some(line_of(m)),
                    format!("{key}.mode"),
                    format!("`{}` is not an octal mode like 644 or 0755", m.value),
                );
                None
            }
        }
    });
    let types = p
        .types
        .0
        .iter()
        .filter_map(|t| match t.trim().to_ascii_lowercase().as_str() {
            "file" => Some(ObjectType::File),
            "directory" => Some(ObjectType::Directory),
            other => {
                c.error(
                    Some(line),
                    format!("{key}.type"),
                    format!("`{other}` is not `file` or `directory`"),
                );
                None
            }
        })
        .collect();
    if !p.acls.0.is_empty() || p.context.is_some() {
        c.warn(
            Some(line),
            &key,
            "acls and SELinux context are not applied by Shoal yet",
        );
    }
    Permission {
        object,
        pattern: p
            .pattern
            .map(|t| t.value.trim().to_string())
            .unwrap_or_else(|| "**".into()),
        except: p.except.0,
        owner: p.owner.map(|t| t.value.trim().to_string()),
        group: p.group.map(|t| t.value.trim().to_string()),
        mode,
        types,
        line,
    }
}
