//! The hook runtime and its sandbox, exercised with real wasmtime on real compiled guests
//! (`tests/guests/sandbox-probe` and the example hooks, built by `shoal-examples`).

use std::path::Path;
use std::time::{Duration, Instant};

use shoal_agent::hooks::{
    CacheStatus, DirGrant, HookContext, HookFailure, HookKind, HookOutcome, HookRuntime,
    HookStatus, LifecycleEvent, Sandbox,
};
use shoal_examples::{Artifact, MODEL_CHECKSUM, PLAIN_COMMAND, PLAIN_COMMAND_P1, SANDBOX_PROBE};

fn runtime(cache: &Path) -> HookRuntime {
    HookRuntime::new(cache).expect("hook runtime")
}

fn probe_ctx(params: &[(&str, &str)]) -> HookContext {
    let mut ctx = HookContext::adhoc(LifecycleEvent::ValidateService);
    ctx.deployment_id = "d-42".into();
    ctx.application = "inference".into();
    ctx.params = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    ctx
}

async fn run(
    rt: &HookRuntime,
    guest: Artifact,
    ctx: &HookContext,
    sandbox: &Sandbox,
) -> HookOutcome {
    let hook = rt.load(guest.bytes).expect("load");
    rt.run(&hook, ctx, sandbox).await
}

async fn probe(params: &[(&str, &str)], sandbox: &Sandbox) -> HookOutcome {
    let cache = tempfile::tempdir().unwrap();
    run(
        &runtime(cache.path()),
        SANDBOX_PROBE,
        &probe_ctx(params),
        sandbox,
    )
    .await
}

fn failure(o: &HookOutcome) -> &HookFailure {
    match &o.status {
        HookStatus::Failed { failure } => failure,
        HookStatus::Succeeded { message } => panic!(
            "expected a failure, the hook succeeded: {message}\n{}",
            o.log.text
        ),
    }
}

fn grant(dir: &Path, guest: &str, writable: bool) -> DirGrant {
    DirGrant {
        host: dir.to_path_buf(),
        guest: guest.into(),
        writable,
    }
}

#[tokio::test]
async fn a_hook_gets_its_typed_context_and_returns_a_typed_success() {
    let o = probe(&[("probe", "ok")], &Sandbox::default()).await;
    assert_eq!(
        o.status,
        HookStatus::Succeeded {
            message: "ok: ValidateService inference d-42".into()
        }
    );
    assert_eq!(o.kind, HookKind::ShoalHook);
    assert!(
        o.log
            .text
            .contains("[info] probe ok at ValidateService on "),
        "{}",
        o.log.text
    );
}

#[tokio::test]
async fn a_returned_error_is_a_typed_failure() {
    let o = probe(&[("probe", "fail")], &Sandbox::default()).await;
    assert_eq!(
        failure(&o),
        &HookFailure::Returned {
            reason: "asked to fail".into()
        }
    );
    let o = probe(&[("probe", "nonsense")], &Sandbox::default()).await;
    assert_eq!(
        failure(&o),
        &HookFailure::Returned {
            reason: "unknown probe `nonsense`".into()
        }
    );
}

#[tokio::test]
async fn a_looping_hook_is_stopped_at_its_deadline() {
    let sandbox = Sandbox {
        timeout: Duration::from_millis(500),
        ..Sandbox::default()
    };
    let o = probe(&[("probe", "loop")], &sandbox).await;
    assert_eq!(failure(&o), &HookFailure::Timeout { timeout_ms: 500 });
    assert!(failure(&o).to_string().contains("timed out after 0.5s"));
    // `elapsed_ms` is the run alone (compiling is part of `load`): it ends within a second of the deadline.
    assert!(o.elapsed_ms < 1500, "stopped after {} ms", o.elapsed_ms);
}

#[tokio::test]
async fn a_hook_blocked_in_a_host_call_is_stopped_at_its_deadline() {
    let sandbox = Sandbox {
        timeout: Duration::from_millis(500),
        ..Sandbox::default()
    };
    let o = probe(&[("probe", "sleep"), ("secs", "3600")], &sandbox).await;
    assert_eq!(failure(&o), &HookFailure::Timeout { timeout_ms: 500 });
    // `elapsed_ms` is the run alone: compiling the hook (part of `load`) is not under the deadline.
    assert!(o.elapsed_ms < 1500, "stopped after {} ms", o.elapsed_ms);
}

#[tokio::test]
async fn a_memory_bomb_hits_the_cap_and_says_so() {
    let sandbox = Sandbox {
        memory_limit: 64 << 20,
        ..Sandbox::default()
    };
    let o = probe(&[("probe", "alloc")], &sandbox).await;
    assert_eq!(failure(&o), &HookFailure::MemoryLimit { limit_mib: 64 });
    assert!(
        failure(&o)
            .to_string()
            .contains("exceeded its memory limit of 64 MiB")
    );
}

#[tokio::test]
async fn a_panic_and_a_trap_are_reported_as_such() {
    let o = probe(&[("probe", "panic")], &Sandbox::default()).await;
    let HookFailure::Panic { message } = failure(&o) else {
        panic!("{:?}", o.status)
    };
    assert!(
        message.starts_with("the probe panicked on purpose (at "),
        "{message}"
    );

    let o = probe(&[("probe", "trap")], &Sandbox::default()).await;
    let HookFailure::Trap { message } = failure(&o) else {
        panic!("{:?}", o.status)
    };
    assert!(message.contains("unreachable"), "{message}");
}

#[tokio::test]
async fn the_runtime_survives_every_failure_and_runs_the_next_hook() {
    let cache = tempfile::tempdir().unwrap();
    let rt = runtime(cache.path());
    let short = Sandbox {
        timeout: Duration::from_millis(300),
        memory_limit: 32 << 20,
        ..Sandbox::default()
    };
    for p in ["loop", "alloc", "panic", "trap", "fail"] {
        let o = run(&rt, SANDBOX_PROBE, &probe_ctx(&[("probe", p)]), &short).await;
        assert!(!o.succeeded(), "{p} succeeded");
    }
    let o = run(
        &rt,
        SANDBOX_PROBE,
        &probe_ctx(&[("probe", "ok")]),
        &Sandbox::default(),
    )
    .await;
    assert!(o.succeeded(), "{:?}", o.status);
}

#[tokio::test]
async fn no_ambient_filesystem() {
    for path in ["/etc/passwd", "/proc/self/environ", "passwd"] {
        let o = probe(&[("probe", "read"), ("path", path)], &Sandbox::default()).await;
        let HookFailure::Returned { reason } = failure(&o) else {
            panic!("{:?}", o.status)
        };
        assert!(reason.starts_with(&format!("reading {path}: ")), "{reason}");
    }
}

#[tokio::test]
async fn granted_directories_are_readable_and_nothing_outside_them() {
    let root = tempfile::tempdir().unwrap();
    let (rev, work, outside) = (
        root.path().join("rev"),
        root.path().join("work"),
        root.path().join("outside"),
    );
    for d in [&rev, &work, &outside] {
        std::fs::create_dir(d).unwrap();
    }
    std::fs::write(rev.join("model.bin"), b"weights").unwrap();
    std::fs::write(outside.join("secret"), b"secret").unwrap();
    let sandbox = Sandbox {
        dirs: vec![grant(&rev, "/revision", false), grant(&work, "/work", true)],
        ..Sandbox::default()
    };

    let o = probe(
        &[("probe", "read"), ("path", "/revision/model.bin")],
        &sandbox,
    )
    .await;
    assert_eq!(o.summary(), "read 7 bytes from /revision/model.bin");

    // Read-write grant: writable.
    let o = probe(&[("probe", "write"), ("path", "/work/state")], &sandbox).await;
    assert!(o.succeeded(), "{:?}", o.status);
    assert_eq!(
        std::fs::read(work.join("state")).unwrap(),
        b"written by sandbox-probe"
    );

    // Read-only grant, paths outside every grant, and `..` escapes: all denied, nothing written.
    for path in [
        "/revision/evil",
        "/evil",
        "/work/../outside/secret",
        "/revision/../../outside/secret",
        "/tmp/evil",
    ] {
        let o = probe(&[("probe", "write"), ("path", path)], &sandbox).await;
        let HookFailure::Returned { reason } = failure(&o) else {
            panic!("{path}: {:?}", o.status)
        };
        assert!(reason.starts_with(&format!("writing {path}: ")), "{reason}");
    }
    assert_eq!(std::fs::read(outside.join("secret")).unwrap(), b"secret");
    assert!(!rev.join("evil").exists());
    let o = probe(
        &[("probe", "read"), ("path", "/work/../outside/secret")],
        &sandbox,
    )
    .await;
    assert!(!o.succeeded(), "read through `..`: {:?}", o.status);
}

#[tokio::test]
async fn no_ambient_environment_only_codedeploy_variables_and_grants() {
    // SAFETY: set before any hook runs; the test reads it only to prove it is not passed.
    unsafe { std::env::set_var("SHOAL_TEST_SECRET", "hunter2") };
    let sandbox = Sandbox {
        env: vec![("EXTRA".into(), "1".into())],
        ..Sandbox::default()
    };
    let o = probe(&[("probe", "env")], &sandbox).await;
    let env = o.summary();
    assert!(!env.contains("hunter2") && !env.contains("PATH="), "{env}");
    for expected in [
        "LIFECYCLE_EVENT=ValidateService",
        "DEPLOYMENT_ID=d-42",
        "APPLICATION_NAME=inference",
        "EXTRA=1",
    ] {
        assert!(env.contains(expected), "{expected} missing from {env}");
    }
}

/// A one-shot HTTP server on 127.0.0.1 that answers `body` and reports whether it was hit.
fn http_server(body: &'static str) -> (u16, std::thread::JoinHandle<bool>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        let until = Instant::now() + Duration::from_secs(120);
        while Instant::now() < until {
            if let Ok((mut s, _)) = listener.accept() {
                s.set_nonblocking(false).unwrap();
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                s.write_all(reply.as_bytes()).unwrap();
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    });
    (port, handle)
}

#[tokio::test]
async fn http_reaches_only_the_allow_list() {
    let (port, server) = http_server("pong");
    let url = format!("http://127.0.0.1:{port}/ping");

    // Not allowed: denied before any connection is made, so the server is never hit.
    let o = probe(&[("probe", "http"), ("url", &url)], &Sandbox::default()).await;
    let HookFailure::Returned { reason } = failure(&o) else {
        panic!("{:?}", o.status)
    };
    assert!(
        reason.contains(&format!(
            "HTTP request denied: 127.0.0.1:{port} is not allowed"
        )),
        "{reason}"
    );
    let other = Sandbox {
        http_allow: vec!["127.0.0.1:1".parse().unwrap()],
        ..Sandbox::default()
    };
    let o = probe(&[("probe", "http"), ("url", &url)], &other).await;
    assert!(
        failure(&o).to_string().contains("allowed: 127.0.0.1:1"),
        "{:?}",
        o.status
    );

    // Allowed: answered.
    let allowed = Sandbox {
        http_allow: vec![format!("127.0.0.1:{port}").parse().unwrap()],
        ..Sandbox::default()
    };
    let o = probe(&[("probe", "http"), ("url", &url)], &allowed).await;
    assert_eq!(o.summary(), "HTTP 200: pong");
    assert!(server.join().unwrap());
}

#[tokio::test]
async fn raw_wasi_sockets_are_denied() {
    // The SDK's client is the only way out: a guest that opens a WASI TCP socket itself, even to
    // an address on the HTTP allow-list, is refused and the listener never sees a connection.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let sandbox = Sandbox {
        http_allow: vec![addr.parse().unwrap()],
        ..Sandbox::default()
    };
    let o = probe(&[("probe", "tcp"), ("addr", &addr)], &sandbox).await;
    let HookFailure::Returned { reason } = failure(&o) else {
        panic!("{:?}", o.status)
    };
    assert!(
        reason.starts_with(&format!("connecting to {addr}: ")),
        "{reason}"
    );
    assert!(listener.accept().is_err(), "the guest reached the listener");
}

#[tokio::test]
async fn the_second_run_compiles_nothing() {
    let cache = tempfile::tempdir().unwrap();
    let first = runtime(cache.path());
    assert_eq!(
        first.load(SANDBOX_PROBE.bytes).unwrap().cache,
        CacheStatus::Compiled
    );
    assert_eq!(
        first.load(SANDBOX_PROBE.bytes).unwrap().cache,
        CacheStatus::Memory
    );
    drop(first);

    // A new process (a new runtime) loads the compiled code from disk.
    let second = runtime(cache.path());
    let started = Instant::now();
    let hook = second.load(SANDBOX_PROBE.bytes).unwrap();
    let load_time = started.elapsed();
    assert_eq!(hook.cache, CacheStatus::Disk);
    let o = second
        .run(&hook, &probe_ctx(&[("probe", "ok")]), &Sandbox::default())
        .await;
    assert!(o.succeeded());
    assert_eq!(o.cache, CacheStatus::Disk);
    let entries: Vec<_> = std::fs::read_dir(cache.path()).unwrap().collect();
    assert_eq!(entries.len(), 1, "one cache entry per module and engine");
    eprintln!("load from disk cache took {load_time:?}");
}

#[tokio::test]
async fn a_wasi_command_gets_codedeploy_variables_and_its_exit_status_decides() {
    let root = tempfile::tempdir().unwrap();
    let ctx = probe_ctx(&[]);
    let granted = Sandbox {
        dirs: vec![grant(root.path(), "/work", true)],
        ..Sandbox::default()
    };
    for (guest, kind) in [
        (PLAIN_COMMAND, HookKind::WasiCommand),
        (PLAIN_COMMAND_P1, HookKind::WasiP1Command),
    ] {
        let cache = tempfile::tempdir().unwrap();
        let rt = runtime(cache.path());
        let o = run(&rt, guest, &ctx, &granted).await;
        assert_eq!(o.kind, kind);
        assert!(o.succeeded(), "{kind:?}: {:?}\n{}", o.status, o.log.text);
        assert!(
            o.log
                .text
                .contains("ValidateService deployment=d-42 application=inference group=local"),
            "{}",
            o.log.text
        );

        // Without a writable /work the command exits 1, and that fails the hook.
        let o = run(&rt, guest, &ctx, &Sandbox::default()).await;
        assert_eq!(
            failure(&o),
            &HookFailure::Exit { code: 1 },
            "{kind:?}: {}",
            o.log.text
        );
        assert!(
            o.log.text.contains("cannot record the deployment"),
            "{}",
            o.log.text
        );
    }
    let log = std::fs::read_to_string(root.path().join("deployments.log")).unwrap();
    assert_eq!(
        log.lines().count(),
        2,
        "both the p2 and the p1 command appended: {log}"
    );
}

#[tokio::test]
async fn output_is_kept_whole_up_to_the_bound_and_its_tail_beyond() {
    let small = Sandbox {
        output_limit: 64 << 10,
        ..Sandbox::default()
    };
    let o = probe(&[("probe", "spam"), ("bytes", "10000")], &small).await;
    assert!(
        !o.log.truncated
            && o.log.text.starts_with("00000000 ")
            && o.log.text.contains("END OF SPAM")
    );

    let o = probe(&[("probe", "spam"), ("bytes", "2000000")], &small).await;
    assert!(o.succeeded());
    assert!(o.log.truncated && o.log.total_bytes > 2_000_000);
    assert!(o.log.text.starts_with("00000000 "), "the head is kept");
    assert!(
        o.log.text.trim_end().ends_with("END OF SPAM"),
        "the tail is kept"
    );
    assert!(o.log.text.contains("bytes of output omitted"));
    assert!(o.log.text.len() < (64 << 10) + 100);
}

#[tokio::test]
async fn a_missing_grant_and_garbage_wasm_are_clear_errors() {
    let missing = Sandbox {
        dirs: vec![grant(Path::new("/nonexistent/shoal"), "/revision", false)],
        ..Sandbox::default()
    };
    let o = probe(&[("probe", "ok")], &missing).await;
    let HookFailure::Start { message } = failure(&o) else {
        panic!("{:?}", o.status)
    };
    assert!(
        message.contains("granting /nonexistent/shoal as /revision"),
        "{message}"
    );

    let cache = tempfile::tempdir().unwrap();
    let rt = runtime(cache.path());
    let err = format!("{:#}", rt.load(b"#!/bin/sh\nexit 0\n").err().unwrap());
    assert!(err.contains("not a WebAssembly file"), "{err}");
    let err = format!(
        "{:#}",
        rt.load(&wat::parse_str("(module)").unwrap()).err().unwrap()
    );
    assert!(err.contains("no `_start` export"), "{err}");
    let err = format!(
        "{:#}",
        rt.load(&wat::parse_str("(component)").unwrap())
            .err()
            .unwrap()
    );
    assert!(err.contains("exports neither `run`"), "{err}");
}

#[tokio::test]
async fn the_model_checksum_example_verifies_a_revision() {
    use sha2::{Digest, Sha256};
    let rev = tempfile::tempdir().unwrap();
    std::fs::create_dir(rev.path().join("model")).unwrap();
    std::fs::write(rev.path().join("model/weights.json"), b"[0.5, 1.5]").unwrap();
    let sum = hex::encode(Sha256::digest(b"[0.5, 1.5]"));
    std::fs::write(
        rev.path().join("SHA256SUMS"),
        format!("{sum}  model/weights.json\n"),
    )
    .unwrap();
    let sandbox = Sandbox {
        dirs: vec![grant(rev.path(), "/revision", false)],
        ..Sandbox::default()
    };
    let cache = tempfile::tempdir().unwrap();
    let rt = runtime(cache.path());
    let ctx = HookContext::adhoc(LifecycleEvent::AfterInstall);

    let o = run(&rt, MODEL_CHECKSUM, &ctx, &sandbox).await;
    assert_eq!(o.summary(), "1 file(s) match SHA256SUMS");

    std::fs::write(rev.path().join("model/weights.json"), b"[0.5, 9.5]").unwrap();
    let o = run(&rt, MODEL_CHECKSUM, &ctx, &sandbox).await;
    let HookFailure::Returned { reason } = failure(&o) else {
        panic!("{:?}", o.status)
    };
    assert!(
        reason.starts_with("model/weights.json: SHA-256 is"),
        "{reason}"
    );
}
