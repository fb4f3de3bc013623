//! `shoal hook run` and `shoal demo`, end to end: the real binary, real compiled example
//! hooks, real files and a real local HTTP endpoint.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use shoal_examples::{MODEL_CHECKSUM, PLAIN_COMMAND, PLAIN_COMMAND_P1, VALIDATE_INFERENCE};

fn shoal(cache: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(args)
        .env("SHOAL_CACHE_DIR", cache)
        .env_remove("SHOAL_LOG")
        .output()
        .expect("running shoal")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn revision_with_model(dir: &Path) {
    use sha2::{Digest, Sha256};
    std::fs::create_dir_all(dir.join("model")).unwrap();
    let model = b"{\"weights\": [[2.0, 1.0]], \"bias\": [0.5]}";
    std::fs::write(dir.join("model/weights.json"), model).unwrap();
    let sum = hex::encode(Sha256::digest(model));
    std::fs::write(
        dir.join("SHA256SUMS"),
        format!("{sum}  model/weights.json\n"),
    )
    .unwrap();
    std::fs::write(
        dir.join("golden.json"),
        r#"{"cases": [{"input": [1.0, 2.0], "expected": [4.5]}], "tolerance": 0.001}"#,
    )
    .unwrap();
}

#[test]
fn model_checksum_passes_and_a_corrupt_model_fails_with_a_reason() {
    let (tmp, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    revision_with_model(tmp.path());
    let grant = format!("{}:/revision", tmp.path().display());
    let args = [
        "hook",
        "run",
        MODEL_CHECKSUM.path,
        "--event",
        "AfterInstall",
        "--dir",
        &grant,
    ];

    let ok = shoal(cache.path(), &args);
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert!(
        stdout(&ok).contains("[info] model/weights.json: "),
        "{}",
        stdout(&ok)
    );
    assert!(
        stdout(&ok).contains("AfterInstall Succeeded: 1 file(s) match SHA256SUMS"),
        "{}",
        stdout(&ok)
    );

    std::fs::write(tmp.path().join("model/weights.json"), b"tampered").unwrap();
    let bad = shoal(cache.path(), &args);
    assert_eq!(bad.status.code(), Some(1));
    let err = stderr(&bad);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.starts_with(
            "error: AfterInstall hook failed: the hook failed: model/weights.json: SHA-256 is"
        ),
        "{err}"
    );
}

/// A model endpoint on 127.0.0.1 answering every `/predict` with `output`, for `requests` requests.
/// It listens for at most `window`.
fn model_endpoint(
    output: &'static str,
    requests: usize,
    window: Duration,
) -> (u16, std::thread::JoinHandle<usize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let mut served = 0;
        let until = Instant::now() + window;
        while served < requests && Instant::now() < until {
            let Ok((mut s, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            s.set_nonblocking(false).unwrap();
            let mut buf = vec![0u8; 8192];
            let n = s.read(&mut buf).unwrap();
            let request = String::from_utf8_lossy(&buf[..n]);
            assert!(request.starts_with("POST /predict HTTP/1.1"), "{request}");
            let body = format!("{{\"output\": {output}}}");
            write!(s, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())
                .unwrap();
            served += 1;
        }
        served
    });
    (port, server)
}

#[test]
fn validate_inference_checks_predictions_against_the_golden_file() {
    let (tmp, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    revision_with_model(tmp.path());
    let grant = format!("{}:/revision", tmp.path().display());

    for (output, should_pass) in [("[4.5]", true), ("[9.9]", false)] {
        let (port, server) = model_endpoint(output, 1, Duration::from_secs(120));
        let (allow, param) = (format!("127.0.0.1:{port}"), format!("port={port}"));
        let o = shoal(
            cache.path(),
            &[
                "hook",
                "run",
                VALIDATE_INFERENCE.path,
                "--dir",
                &grant,
                "--allow-http",
                &allow,
                "--param",
                &param,
            ],
        );
        assert_eq!(
            o.status.success(),
            should_pass,
            "{output}: {}{}",
            stdout(&o),
            stderr(&o)
        );
        assert_eq!(server.join().unwrap(), 1);
        if !should_pass {
            assert!(
                stderr(&o).contains("case 0: predicted [9.9] for input [1.0, 2.0], expected [4.5]"),
                "{}",
                stderr(&o)
            );
        }
    }

    // Without --allow-http the same hook may not reach the endpoint at all.
    // The denial happens before any connection, so a short window cannot change the outcome.
    let (port, server) = model_endpoint("[4.5]", 1, Duration::from_secs(10));
    let param = format!("port={port}");
    let o = shoal(
        cache.path(),
        &[
            "hook",
            "run",
            VALIDATE_INFERENCE.path,
            "--dir",
            &grant,
            "--param",
            &param,
        ],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("HTTP request denied"), "{}", stderr(&o));
    assert_eq!(server.join().unwrap(), 0, "the endpoint was reached");
}

#[test]
fn plain_commands_run_in_both_wasi_versions_and_json_reports_the_cache() {
    let (work, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let grant = format!("{}:/work:rw", work.path().display());
    for (hook, kind) in [
        (PLAIN_COMMAND.path, "wasi-command"),
        (PLAIN_COMMAND_P1.path, "wasi-p1-command"),
    ] {
        let mut caches = Vec::new();
        for _ in 0..2 {
            let o = shoal(
                cache.path(),
                &[
                    "hook",
                    "run",
                    hook,
                    "--event",
                    "BeforeInstall",
                    "--dir",
                    &grant,
                    "--json",
                ],
            );
            assert!(o.status.success(), "{}", stderr(&o));
            let v: serde_json::Value =
                serde_json::from_slice(&o.stdout).expect("--json prints JSON");
            assert_eq!(v["status"], "Succeeded");
            assert_eq!(v["kind"], kind);
            assert!(
                v["log"]["text"]
                    .as_str()
                    .unwrap()
                    .starts_with("BeforeInstall deployment=d-local")
            );
            caches.push(v["cache"].as_str().unwrap().to_string());
        }
        assert_eq!(
            caches,
            ["compiled", "disk"],
            "the second run compiles nothing"
        );
    }
    assert_eq!(
        std::fs::read_to_string(work.path().join("deployments.log"))
            .unwrap()
            .lines()
            .count(),
        4
    );

    let o = shoal(cache.path(), &["hook", "run", PLAIN_COMMAND.path, "--json"]);
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (
            v["status"].as_str(),
            v["failure"]["kind"].as_str(),
            v["failure"]["code"].as_i64()
        ),
        (Some("Failed"), Some("exit"), Some(1))
    );
}

#[test]
fn bad_input_gets_a_clear_one_line_error() {
    let (tmp, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let script = tmp.path().join("validate.sh");
    std::fs::write(&script, "#!/bin/sh\ncurl localhost\n").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["hook".into(), "run".into(), "/nonexistent/hook.wasm".into()],
            "reading /nonexistent/hook.wasm",
        ),
        (
            vec!["hook".into(), "run".into(), script.display().to_string()],
            "not a WebAssembly file",
        ),
        (
            vec![
                "hook".into(),
                "run".into(),
                PLAIN_COMMAND.path.into(),
                "--event".into(),
                "Deploy".into(),
            ],
            "unknown lifecycle event `Deploy`",
        ),
        (
            vec![
                "hook".into(),
                "run".into(),
                PLAIN_COMMAND.path.into(),
                "--dir".into(),
                "/tmp:relative".into(),
            ],
            "must be absolute",
        ),
        (
            vec![
                "hook".into(),
                "run".into(),
                PLAIN_COMMAND.path.into(),
                "--allow-http".into(),
                "nowhere".into(),
            ],
            "expected HOST:PORT",
        ),
        (
            vec![
                "hook".into(),
                "run".into(),
                PLAIN_COMMAND.path.into(),
                "--timeout".into(),
                "0".into(),
            ],
            "--timeout must be a positive",
        ),
    ];
    for (args, expected) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = shoal(cache.path(), &args);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(stderr(&o).contains(expected), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn the_local_demo_goes_as_planned() {
    let cache = tempfile::tempdir().unwrap();
    let o = shoal(cache.path(), &["demo", "--local", "--json"]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["as_planned"], true);
    let steps = v["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 7);
    assert!(steps.iter().all(|s| s["as_expected"] == true));
    assert_eq!(steps[5]["outcome"]["failure"]["kind"], "timeout");
    assert_eq!(steps[6]["outcome"]["failure"]["kind"], "memory-limit");
    let deployed = v["deployments"].as_array().unwrap();
    let summary: Vec<(&str, &str)> = deployed
        .iter()
        .map(|d| {
            (
                d["status"].as_str().unwrap(),
                d["serving"].as_str().unwrap_or("-"),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [("Succeeded", "v1"), ("Succeeded", "v2"), ("Failed", "v2")]
    );
    assert!(
        deployed[2]["message"]
            .as_str()
            .unwrap()
            .contains("rolled back to")
    );
}

#[test]
fn a_planted_cache_entry_is_refused_and_the_hook_compiled_again() {
    let (work, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let grant = format!("{}:/work:rw", work.path().display());
    let run = |hook: &str| {
        let o = shoal(
            cache.path(),
            &["hook", "run", hook, "--dir", &grant, "--json"],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        (v, stderr(&o))
    };
    // Two modules compiled into the cache, each its own entry.
    assert_eq!(run(PLAIN_COMMAND.path).0["cache"], "compiled");
    assert_eq!(run(PLAIN_COMMAND_P1.path).0["cache"], "compiled");
    let entry_of = |bytes: &[u8]| {
        use sha2::{Digest, Sha256};
        let sha = hex::encode(Sha256::digest(bytes));
        std::fs::read_dir(cache.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                let name = p.file_name().unwrap().to_str().unwrap();
                name.starts_with(&sha) && name.ends_with(".cwasm")
            })
            .expect("an entry")
    };
    let (entry, other) = (
        entry_of(PLAIN_COMMAND.bytes),
        entry_of(PLAIN_COMMAND_P1.bytes),
    );

    // The other module's genuine entry, planted under this module's name.
    std::fs::copy(&other, &entry).unwrap();
    let (v, err) = run(PLAIN_COMMAND.path);
    assert_eq!(v["cache"], "compiled", "the planted entry was used");
    assert_eq!(
        v["kind"], "wasi-command",
        "the hook that ran is the right one"
    );
    assert_eq!(v["status"], "Succeeded");
    assert!(
        err.contains("refused a compiled-hook cache entry")
            && err.contains("authentication tag does not verify"),
        "the refusal is logged: {err}"
    );
    assert_eq!(
        run(PLAIN_COMMAND.path).0["cache"],
        "disk",
        "a genuine entry replaced it"
    );

    // A link in its place, to the genuine entry copied elsewhere: not followed.
    let copy = work.path().join("copy.cwasm");
    std::fs::copy(&entry, &copy).unwrap();
    std::fs::remove_file(&entry).unwrap();
    std::os::unix::fs::symlink(&copy, &entry).unwrap();
    let (v, err) = run(PLAIN_COMMAND.path);
    assert_eq!(v["cache"], "compiled");
    assert!(err.contains("symbolic link"), "{err}");
    assert!(!std::fs::symlink_metadata(&entry).unwrap().is_symlink());
    assert_eq!(run(PLAIN_COMMAND.path).0["cache"], "disk");
}
