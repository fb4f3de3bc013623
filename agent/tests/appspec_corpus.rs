//! The AppSpec parser against 40 real AppSpec files from public repositories
//! (`agent/tests/data/appspec-corpus`, listed in its SOURCES.tsv): every well-formed one is read,
//! each of its script hooks is named, with its line, as needing to become Wasm; the
//! malformed ones are refused with the line of the fault.

use std::path::PathBuf;

use shoal_agent::appspec::{self, ObjectType, Os, Severity};
use shoal_agent::hooks::LifecycleEvent;

fn corpus() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/appspec-corpus");
    assert!(
        dir.join("SOURCES.tsv").exists(),
        "the AppSpec corpus is expected at {}",
        dir.display()
    );
    dir
}

struct Entry {
    file: String,
    os: String,
    features: Vec<String>,
}

fn entries() -> Vec<Entry> {
    let tsv = std::fs::read_to_string(corpus().join("SOURCES.tsv")).unwrap();
    tsv.lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let cols: Vec<&str> = l.split('\t').collect();
            Entry {
                file: cols[0].into(),
                os: cols[4].into(),
                features: cols[5].split(',').map(String::from).collect(),
            }
        })
        .collect()
}

fn read(file: &str) -> String {
    String::from_utf8(std::fs::read(corpus().join(file)).unwrap()).unwrap()
}

#[test]
fn every_well_formed_file_is_read_and_every_script_hook_is_named_with_its_line() {
    let entries = entries();
    assert_eq!(entries.len(), 40);
    let mut script_hooks = 0;
    for e in entries
        .iter()
        .filter(|e| !e.features.contains(&"malformed".to_string()))
    {
        let text = read(&e.file);
        let spec = appspec::parse(&text).unwrap_or_else(|err| panic!("{}: {err}", e.file));
        assert_eq!(
            spec.os,
            if e.os == "windows" {
                Os::Windows
            } else {
                Os::Linux
            },
            "{}",
            e.file
        );
        if e.os == "windows" {
            assert!(
                spec.errors().any(|p| p.key == "os"),
                "{}: windows not flagged",
                e.file
            );
        }
        let lines: Vec<&str> = text.lines().collect();
        for hooks in spec.hooks.values() {
            for hook in hooks {
                script_hooks += 1;
                let problem = spec
                    .errors()
                    .find(|p| p.line == Some(hook.line) && p.key.ends_with(".location"))
                    .unwrap_or_else(|| {
                        panic!(
                            "{}: script hook {} at line {} not flagged",
                            e.file, hook.location, hook.line
                        )
                    });
                assert!(
                    problem
                        .message
                        .contains("Shoal runs hooks as sandboxed WebAssembly"),
                    "{problem}"
                );
                assert!(
                    problem
                        .to_string()
                        .starts_with(&format!("appspec.yml line {}: error: hooks.", hook.line))
                );
                // The line named really holds that location.
                let at = lines[hook.line as usize - 1];
                assert!(
                    at.contains(hook.location.as_str()),
                    "{}: line {} is `{at}`, not {}",
                    e.file,
                    hook.line,
                    hook.location
                );
            }
        }
        assert!(
            spec.deployable().is_err() || spec.hooks.is_empty(),
            "{}: script hooks must block a deployment",
            e.file
        );
    }
    assert!(script_hooks > 100, "only {script_hooks} hooks seen");
}

#[test]
fn malformed_files_are_refused_with_the_line_of_the_fault() {
    let malformed: Vec<Entry> = entries()
        .into_iter()
        .filter(|e| e.features.contains(&"malformed".to_string()))
        .collect();
    assert_eq!(malformed.len(), 2);
    for e in malformed {
        let err = appspec::parse(&read(&e.file)).expect_err(&e.file);
        let (line, words) = match e.file.as_str() {
            f if f.starts_with("025-") => (14, "duplicate mapping key: permissions"),
            f if f.starts_with("035-") => (18, "did not find expected key"),
            other => panic!("unexpected malformed file {other}"),
        };
        assert_eq!(err.line, Some(line), "{}: {err}", e.file);
        assert!(
            err.to_string()
                .starts_with(&format!("appspec.yml line {line}: ")),
            "{err}"
        );
        assert!(err.message.contains(words), "{}: {err}", e.file);
    }
}

#[test]
fn quirks_of_real_files_are_understood() {
    // An octal mode written `0644` (YAML would read it as a number), and one quoted.
    let spec = appspec::parse(&read("030-bimlendu__caddy-hugo.yml")).unwrap();
    assert_eq!(spec.permissions[0].mode, Some(0o644));
    assert_eq!(spec.permissions[0].types, vec![ObjectType::File]);
    let spec = appspec::parse(&read("022-Abdelali12-codes__aws-codedeploy-sample.yml")).unwrap();
    assert_eq!(spec.permissions[0].mode, Some(0o755));
    assert_eq!(
        spec.files[1].file_exists_behavior,
        Some(appspec::FileExistsBehavior::Retain)
    );
    assert_eq!(
        spec.hooks_for(LifecycleEvent::ApplicationStop)[0]
            .timeout
            .as_secs(),
        30
    );

    // A custom event: read, and warned about.
    let spec = appspec::parse(&read("010-aws__aws-codedeploy-agent.yml")).unwrap();
    let w = spec
        .warnings()
        .find(|p| p.key == "hooks.CustomEvent")
        .expect("custom event warning");
    assert!(w.message.contains("never run"));

    // A stray backslash turned a hook event into an unknown top-level key, in a CRLF file.
    let spec = appspec::parse(&read("017-0x-x0__code_deploy_example.yml")).unwrap();
    assert!(
        spec.warnings()
            .any(|p| p.key.contains("AfterInstall") && p.message.contains("not an AppSpec key")),
        "{:?}",
        spec.problems
    );
    assert_eq!(spec.hooks_for(LifecycleEvent::BeforeInstall).len(), 2);
    assert_eq!(spec.files[0].destination, "/var/www/html");

    // The documentation template: placeholders are errors naming their lines.
    let text = read("014-aws-samples__aws-codedeploy-appspec-assistant.yml");
    let spec = appspec::parse(&text).unwrap();
    let timeout = spec
        .errors()
        .find(|p| p.key == "hooks.ApplicationStop[1].timeout")
        .expect("timeout placeholder");
    assert!(
        timeout
            .message
            .contains("`timeout-in-seconds` is not a whole number of seconds")
    );
    assert!(
        text.lines()
            .nth(timeout.line.unwrap() as usize - 1)
            .unwrap()
            .contains("timeout-in-seconds")
    );
    assert!(spec.errors().any(|p| p.key == "permissions[0].mode"));
    assert!(spec.errors().any(|p| p.key == "files[0].destination"));
    assert!(
        spec.problems
            .iter()
            .all(|p| p.severity == Severity::Warning || p.line.is_some()),
        "{:?}",
        spec.problems
    );
}
