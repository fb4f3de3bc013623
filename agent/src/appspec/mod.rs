//! CodeDeploy's `appspec.yml` for EC2/on-prem (version 0.0), read exactly enough that a
//! CodeDeploy user's file works with only its hook locations changed.
//!
//! Reading has two outcomes. [`parse`] fails only when the file is not an AppSpec at all:
//! broken YAML, a duplicate key, a list where a mapping belongs. It names the line. A file
//! that parses becomes an [`AppSpec`] plus a list of [`Problem`]s, each naming its line and
//! key: errors (a hook that is a shell script, a timeout that is not a number, `os:
//! windows` on a Linux agent, ...) stop a deployment; warnings (a key CodeDeploy does not
//! know, a custom event that never runs) are reported. Shoal's own keys live under one
//! top-level `shoal:` key. The reference is `docs/appspec.md`.

mod model;
mod raw;

pub use model::{
    AppSpec, FileExistsBehavior, FileMapping, Forward, HookSpec, MAX_MONITORS, MonitorSpec,
    ObjectType, Os, Permission, Problem, ServiceSpec, Severity, SwitchSpec, health_path,
};

use std::fmt;

/// Why a file is not an AppSpec at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ParseError {
    /// 1-based line, where the YAML parser could say.
    pub line: Option<u64>,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "appspec.yml line {line}: {}", self.message),
            None => write!(f, "appspec.yml: {}", self.message),
        }
    }
}

/// The largest AppSpec we read; real ones are a few KiB.
pub const MAX_APPSPEC_BYTES: usize = 1 << 20;

/// Reads an AppSpec from its text.
pub fn parse(text: &str) -> Result<AppSpec, ParseError> {
    if text.len() > MAX_APPSPEC_BYTES {
        return Err(ParseError {
            line: None,
            message: format!("larger than {MAX_APPSPEC_BYTES} bytes"),
        });
    }
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut ignored = Vec::new();
    let raw: Option<raw::RawAppSpec> = serde_saphyr::with_deserializer_from_str(text, |de| {
        serde_ignored::deserialize(de, |path| ignored.push(path.to_string()))
    })
    .map_err(yaml_error)?;
    let raw = raw.unwrap_or_default();
    let ignored = ignored.iter().filter_map(|p| key_path(p)).collect();
    Ok(model::interpret(raw, ignored))
}

/// Turns a path reported by `serde_ignored` (`?.files.?.0.owner`) into our key notation
/// (`files[0].owner`). Paths inside serde-saphyr's location wrapper are its machinery, not
/// keys of the document, and are dropped.
fn key_path(path: &str) -> Option<String> {
    if path.contains("__serde_saphyr_private") {
        return None;
    }
    let mut out = String::new();
    let mut previous = "";
    for segment in path.split('.').filter(|s| *s != "?") {
        // `hooks` is wrapped in a location, whose field is `value`.
        if segment == "value" && previous == "hooks" {
            continue;
        }
        if segment.parse::<usize>().is_ok() {
            out.push_str(&format!("[{segment}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(segment);
        }
        previous = segment;
    }
    Some(out)
}

fn yaml_error(e: serde_saphyr::Error) -> ParseError {
    let line = e.location().map(|l| l.line()).filter(|l| *l > 0);
    let text = e.without_snippet().to_string();
    let first = text.lines().next().unwrap_or("").trim();
    // serde-saphyr writes "error: line L column C: message"; we put the line in front ourselves.
    let message = first
        .strip_prefix("error: ")
        .unwrap_or(first)
        .split_once(": ")
        .filter(|(at, _)| at.starts_with("line "))
        .map(|(_, m)| m)
        .unwrap_or(first)
        .to_string();
    ParseError { line, message }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hooks::LifecycleEvent;

    const SHOAL_APPSPEC: &str = "\
version: 0.0
os: linux
files:
  - source: /
    destination: /srv/inference
file_exists_behavior: OVERWRITE
permissions:
  - object: /srv/inference
    pattern: \"bin/*\"
    except: [bin/README]
    mode: 0755
    type: [file]
hooks:
  AfterInstall:
    - location: hooks/model_checksum.wasm
      timeout: 120
  ValidateService:
    - location: /hooks/validate_inference.wasm
shoal:
  service:
    command: bin/inference-app
    args: [--model, model/weights.json]
    env: {RUST_LOG: info}
    port: 8080
    health_path: /health
";

    #[test]
    fn a_shoal_appspec_is_deployable() {
        let spec = parse(SHOAL_APPSPEC).unwrap();
        assert_eq!(spec.deployable(), Ok(()));
        assert!(spec.problems.is_empty(), "{:?}", spec.problems);
        assert_eq!(spec.file_exists_behavior, FileExistsBehavior::Overwrite);
        assert_eq!(spec.files[0].source, "");
        let after = spec.hooks_for(LifecycleEvent::AfterInstall);
        assert_eq!(
            (
                after[0].location.as_str(),
                after[0].timeout.as_secs(),
                after[0].line
            ),
            ("hooks/model_checksum.wasm", 120, 15)
        );
        let validate = &spec.hooks_for(LifecycleEvent::ValidateService)[0];
        assert_eq!(
            (validate.location.as_str(), validate.timeout.as_secs()),
            ("hooks/validate_inference.wasm", 3600)
        );
        let perm = &spec.permissions[0];
        assert_eq!(
            (perm.mode, perm.pattern.as_str(), perm.except.as_slice()),
            (Some(0o755), "bin/*", &["bin/README".to_string()][..])
        );
        let svc = spec.service.unwrap();
        assert_eq!(
            (svc.command.as_str(), svc.port, svc.health_path.as_deref()),
            ("bin/inference-app", Some(8080), Some("/health"))
        );
        assert_eq!(svc.args, ["--model", "model/weights.json"]);
    }

    #[test]
    fn shape_errors_name_the_line() {
        let err = parse("version: 0.0\nos: linux\nhooks:\n  - location: a.wasm\n").unwrap_err();
        assert_eq!(err.line, Some(4), "{err}");
        let err = parse("version: 0.0\nos: linux\nfiles: [\n").unwrap_err();
        assert!(err.line.is_some(), "{err}");
        let err = parse("version: 0.0\nfiles:\n  - destination: /srv\n").unwrap_err();
        assert!(err.to_string().contains("source"), "{err}");
        assert!(parse("[1, 2]").is_err());
    }

    #[test]
    fn a_switch_is_read_with_its_defaults_and_its_problems_named() {
        let service = |extra: &str| {
            parse(&format!(
                "version: 0.0\nos: linux\nshoal:\n  service:\n    command: bin/app\n{extra}"
            ))
            .unwrap()
        };
        let spec = service("    port: 8080\n    switch: {}\n");
        assert!(spec.problems.is_empty(), "{:?}", spec.problems);
        let switch = spec.service.unwrap().switch.unwrap();
        assert_eq!(switch.address.to_string(), "0.0.0.0");
        assert_eq!(switch.drain_timeout.as_secs(), 30);
        assert!(switch.keep_previous.is_zero());
        assert!(!switch.proxy_protocol);
        assert_eq!(switch.forward, Forward::Kernel);
        let spec = service(
            "    port: 8080\n    switch:\n      address: ::1\n      drain_timeout: 5\n      keep_previous: 600\n      proxy_protocol: true\n      forward: proxy\n",
        );
        let switch = spec.service.unwrap().switch.unwrap();
        assert!(switch.proxy_protocol);
        assert_eq!(switch.forward, Forward::Proxy);
        assert_eq!(switch.address.to_string(), "::1");
        assert_eq!(switch.drain_timeout.as_secs(), 5);
        assert_eq!(switch.keep_previous.as_secs(), 600);

        let shown = |spec: AppSpec| -> Vec<String> {
            spec.problems.iter().map(|p| p.to_string()).collect()
        };
        let problems = shown(service("    switch: {}\n"));
        assert!(
            problems[0].contains(
                "line 5: error: shoal.service.switch: a switched service needs `shoal.service.port`"
            ),
            "{problems:?}"
        );
        let problems = shown(service(
            "    port: 80\n    switch:\n      address: example.com\n      keep_previous: 4000\n      proxy_protocol: v2\n      forward: ebpf\n",
        ));
        assert!(
            problems[3].contains(
                "line 11: error: shoal.service.switch.forward: `ebpf` is not `kernel` or `proxy`"
            ),
            "{problems:?}"
        );
        assert!(
            problems[2].contains(
                "line 10: error: shoal.service.switch.proxy_protocol: `v2` is not `true` or `false`"
            ),
            "{problems:?}"
        );
        assert!(
            problems[0].contains(
                "line 8: error: shoal.service.switch.address: `example.com` is not an IP address"
            ),
            "{problems:?}"
        );
        assert!(
            problems[1].contains("line 9: error: shoal.service.switch.keep_previous: 4000 seconds"),
            "{problems:?}"
        );
        // The agent does BlockTraffic and AllowTraffic; their Before and After are hooks'.
        let spec = parse(
            "version: 0.0\nos: linux\nhooks:\n  BeforeBlockTraffic:\n    - location: a.wasm\n  BlockTraffic:\n    - location: b.wasm\n",
        )
        .unwrap();
        let problems = shown(spec);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("error: hooks.BlockTraffic"),
            "{problems:?}"
        );
    }

    #[test]
    fn problems_name_key_and_line() {
        let spec = parse(
            "version: 1.0\nos: linux\nhook:\n  X: 1\nhooks:\n  Install:\n    - location: i.wasm\n  BeforeInstall:\n    - location: scripts/a.sh\n      timeout: 7200\n",
        )
        .unwrap();
        let shown: Vec<String> = spec.problems.iter().map(|p| p.to_string()).collect();
        let has = |s: &str| shown.iter().any(|p| p.contains(s));
        assert!(
            has("appspec.yml line 1: error: version: `1.0` is not supported"),
            "{shown:#?}"
        );
        assert!(
            has(
                "hooks.Install: the agent itself runs DownloadBundle, Install, BlockTraffic and AllowTraffic"
            ),
            "{shown:#?}"
        );
        assert!(
            has(
                "appspec.yml line 9: error: hooks.BeforeInstall[0].location: `scripts/a.sh` is a shell script"
            ),
            "{shown:#?}"
        );
        assert!(
            has(
                "appspec.yml line 10: error: hooks.BeforeInstall[0].timeout: 7200 seconds is outside 1..=3600"
            ),
            "{shown:#?}"
        );
        assert!(
            has("warning: hook: not an AppSpec key: ignored"),
            "{shown:#?}"
        );
        assert_eq!(spec.warnings().count(), 1, "{shown:#?}");
        let refused = spec.deployable().unwrap_err();
        assert_eq!(refused.lines().count(), 4, "{refused}");
    }

    #[test]
    fn a_health_path_that_could_name_another_host_is_refused_with_its_line() {
        for bad in [
            "@169.254.169.254/latest/meta-data",
            "health",
            "//evil.example/x",
            "/x@169.254.169.254",
            "/a b",
            "/a#b",
            "/a\\\\b",
        ] {
            let text = format!(
                "version: 0.0\nos: linux\nshoal:\n  service:\n    command: bin/app\n    port: 8080\n    health_path: \"{bad}\"\n"
            );
            let spec = parse(&text).unwrap();
            let p: Vec<String> = spec.errors().map(|p| p.to_string()).collect();
            assert!(
                p.iter()
                    .any(|p| p.starts_with("appspec.yml line 7: error: shoal.service.health_path")),
                "{bad}: {p:?}"
            );
            assert_eq!(spec.service.unwrap().health_path, None, "{bad}");
        }
        let spec = parse(
            "version: 0.0\nos: linux\nshoal:\n  service:\n    command: bin/app\n    user: \"-x\"\n",
        )
        .unwrap();
        assert!(
            spec.errors()
                .any(|p| p.key == "shoal.service.user" && p.line == Some(6)),
            "{:?}",
            spec.problems
        );
        let spec = parse("version: 0.0\nos: linux\nshoal:\n  service:\n    command: bin/app\n    user: www-data\n    health_path: /health?deep=1\n").unwrap();
        assert_eq!(spec.deployable(), Ok(()));
        let svc = spec.service.unwrap();
        assert_eq!(svc.user.as_deref(), Some("www-data"));
        assert_eq!(svc.health_path.as_deref(), Some("/health?deep=1"));
    }

    #[test]
    fn unknown_keys_are_named_by_their_path() {
        assert_eq!(
            key_path("?.files.?.0.owner").as_deref(),
            Some("files[0].owner")
        );
        assert_eq!(
            key_path("?.hooks.?.?.value.AfterInstall.?.0.user").as_deref(),
            Some("hooks.AfterInstall[0].user")
        );
        assert_eq!(key_path("?.os.?.?.__serde_saphyr_private_spanned"), None);
        let spec = parse("version: 0.0\nos: linux\nfiles:\n  - source: /\n    destination: /srv\n    owner: root\n").unwrap();
        let w: Vec<String> = spec.warnings().map(|p| p.key.clone()).collect();
        assert_eq!(w, ["files[0].owner"]);
    }

    #[test]
    fn empty_and_hostile_documents() {
        let spec = parse("").unwrap();
        assert!(spec.errors().any(|p| p.key == "version"));
        let err = parse(&"x".repeat(MAX_APPSPEC_BYTES + 1)).unwrap_err();
        assert!(err.message.contains("larger than"));
        // A billion-laughs document is cut off by the parser's budget, not expanded.
        let mut bomb = String::from("version: 0.0\na0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..12 {
            let prev = format!("*a{}", i - 1);
            bomb.push_str(&format!("a{i}: &a{i} [{}]\n", vec![prev; 10].join(", ")));
        }
        assert!(parse(&bomb).is_err());
    }
}
