//! The hook runtime and its sandbox, exercised with real wasmtime on real compiled guests
//! (`tests/guests/sandbox-probe` and the example hooks, built by `shoal-examples`).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_agent::hooks::{
    CacheRefusal, CacheStatus, DirGrant, HookContext, HookFailure, HookKind, HookLimits,
    HookOutcome, HookRuntime, HookStatus, LifecycleEvent, LoadError, MAX_CONCURRENT_HOOKS, Sandbox,
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
    let hook = rt.load(guest.bytes).await.expect("load");
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

/// CPU time this thread has used.
fn thread_cpu_time() -> Duration {
    use nix::libc;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write into.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Runs the probe with `params` on a thread and a single-threaded executor of its own, so
/// that the guest runs on that thread alone; returns its outcome and the CPU time the run
/// took on that thread (compiling is done before, on the compile pool). Fails if the run is
/// not over within `never_longer`: a deadline that does not hold shows as a failure, not
/// as a hung test.
fn run_measured(
    params: &'static [(&'static str, &'static str)],
    sandbox: Sandbox,
    never_longer: Duration,
) -> (HookOutcome, Duration) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let executor = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let cache = tempfile::tempdir().unwrap();
        let rt = runtime(cache.path());
        let hook = executor.block_on(rt.load(SANDBOX_PROBE.bytes)).unwrap();
        let ctx = probe_ctx(params);
        let before = thread_cpu_time();
        let outcome = executor.block_on(rt.run(&hook, &ctx, &sandbox));
        let _ = tx.send((outcome, thread_cpu_time() - before));
    });
    rx.recv_timeout(never_longer)
        .expect("the run was not stopped by its deadline")
}

#[test]
fn a_looping_hook_is_stopped_at_its_deadline() {
    let sandbox = Sandbox {
        timeout: Duration::from_millis(500),
        ..Sandbox::default()
    };
    let (o, cpu) = run_measured(&[("probe", "loop")], sandbox, Duration::from_secs(120));
    assert_eq!(failure(&o), &HookFailure::Timeout { timeout_ms: 500 });
    assert!(failure(&o).to_string().contains("timed out after 0.5s"));
    assert!(
        o.elapsed_ms >= 500,
        "stopped early, after {} ms",
        o.elapsed_ms
    );
    // The run's own cost, not the machine's clock: the guest spins on this thread, so the
    // CPU time it got is at most the deadline plus a few epoch ticks, however busy the
    // machine is (a busy machine gives it less CPU, never more). A deadline enforced late
    // shows as more.
    assert!(
        cpu < Duration::from_millis(1500),
        "the looping guest used {cpu:?} of CPU before it was stopped"
    );
}

#[test]
fn a_hook_blocked_in_a_host_call_is_stopped_at_its_deadline() {
    let sandbox = Sandbox {
        timeout: Duration::from_millis(500),
        ..Sandbox::default()
    };
    // It asks to sleep an hour: ending within two minutes is ending at the deadline, on
    // any machine.
    let (o, cpu) = run_measured(
        &[("probe", "sleep"), ("secs", "3600")],
        sandbox,
        Duration::from_secs(120),
    );
    assert_eq!(failure(&o), &HookFailure::Timeout { timeout_ms: 500 });
    assert!(
        o.elapsed_ms >= 500,
        "stopped early, after {} ms",
        o.elapsed_ms
    );
    assert!(
        cpu < Duration::from_millis(1500),
        "a sleeping guest used {cpu:?}"
    );
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
    // The agent's own environment (read, never changed: other tests run on other threads)
    // has variables a leak would show.
    let ambient: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
    assert!(ambient.iter().any(|k| k == "PATH"), "{ambient:?}");
    let sandbox = Sandbox {
        env: vec![("EXTRA".into(), "1".into())],
        ..Sandbox::default()
    };
    let o = probe(&[("probe", "env")], &sandbox).await;
    let env = o.summary();
    let mut seen: Vec<(&str, &str)> = env
        .split(' ')
        .map(|kv| kv.split_once('=').expect("NAME=value"))
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("APPLICATION_NAME", "inference"),
            ("DEPLOYMENT_GROUP_ID", "inference/local"),
            ("DEPLOYMENT_GROUP_NAME", "local"),
            ("DEPLOYMENT_ID", "d-42"),
            ("EXTRA", "1"),
            ("LIFECYCLE_EVENT", "ValidateService"),
        ],
        "exactly CodeDeploy's variables and the granted one"
    );
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
        first.load(SANDBOX_PROBE.bytes).await.unwrap().cache,
        CacheStatus::Compiled
    );
    assert_eq!(
        first.load(SANDBOX_PROBE.bytes).await.unwrap().cache,
        CacheStatus::Memory
    );
    drop(first);

    // A new process (a new runtime) loads the compiled code from disk.
    let second = runtime(cache.path());
    let started = Instant::now();
    let hook = second.load(SANDBOX_PROBE.bytes).await.unwrap();
    let load_time = started.elapsed();
    assert_eq!(hook.cache, CacheStatus::Disk);
    let o = second
        .run(&hook, &probe_ctx(&[("probe", "ok")]), &Sandbox::default())
        .await;
    assert!(o.succeeded());
    assert_eq!(o.cache, CacheStatus::Disk);
    assert_eq!(
        entries(cache.path()).len(),
        1,
        "one cache entry per module and engine"
    );
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
    let Err(LoadError::NotWasm { message }) = rt.load(b"#!/bin/sh\nexit 0\n").await else {
        panic!("a script is not Wasm")
    };
    assert!(message.contains("not a WebAssembly file"), "{message}");
    let Err(LoadError::Link { message }) = rt.load(&wat::parse_str("(module)").unwrap()).await
    else {
        panic!("a module without _start is not a hook")
    };
    assert!(message.contains("no `_start` export"), "{message}");
    let Err(LoadError::Link { message }) = rt.load(&wat::parse_str("(component)").unwrap()).await
    else {
        panic!("an empty component is not a hook")
    };
    assert!(message.contains("exports neither `run`"), "{message}");
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

/// The compiled-code entries (`*.cwasm`) in a cache directory.
fn entries(cache: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect();
    found.sort();
    found
}

/// The entry compiled from `bytes`.
fn entry_of(cache: &Path, bytes: &[u8]) -> PathBuf {
    use sha2::{Digest, Sha256};
    let sha = hex::encode(Sha256::digest(bytes));
    let found: Vec<PathBuf> = entries(cache)
        .into_iter()
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with(&sha))
        .collect();
    assert_eq!(found.len(), 1, "{found:?}");
    found.into_iter().next().unwrap()
}

#[tokio::test]
async fn a_planted_cache_entry_is_refused_and_the_hook_compiled_again() {
    let cache = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    {
        let rt = runtime(cache.path());
        for guest in [SANDBOX_PROBE, MODEL_CHECKSUM] {
            assert_eq!(
                rt.load(guest.bytes).await.unwrap().cache,
                CacheStatus::Compiled
            );
        }
    }
    let entry = entry_of(cache.path(), SANDBOX_PROBE.bytes);
    let genuine = std::fs::read(&entry).unwrap();
    let other = std::fs::read(entry_of(cache.path(), MODEL_CHECKSUM.bytes)).unwrap();
    // wasmtime's serialization of the other module, under a header with a made-up tag.
    let mut forged = other[..8].to_vec();
    forged.extend_from_slice(&[0u8; 32]);
    forged.extend_from_slice(&other[40..]);
    let copy = elsewhere.path().join("copy.cwasm");
    std::fs::write(&copy, &genuine).unwrap();

    type Plant<'a> = Box<dyn Fn(&Path) + 'a>;
    let write = |bytes: Vec<u8>| -> Plant<'static> {
        Box::new(move |p: &Path| std::fs::write(p, &bytes).unwrap())
    };
    let cases: Vec<(&str, Plant<'_>, CacheRefusal)> = vec![
        (
            "garbage",
            write(b"garbage".to_vec()),
            CacheRefusal::NotAnEntry,
        ),
        (
            "another module's genuine entry",
            write(other.clone()),
            CacheRefusal::BadTag,
        ),
        (
            "another module's code with a forged tag",
            write(forged),
            CacheRefusal::BadTag,
        ),
        (
            "the genuine entry owned by nobody",
            Box::new(|p: &Path| {
                std::fs::write(p, &genuine).unwrap();
                std::os::unix::fs::chown(p, Some(65534), Some(65534)).unwrap();
            }),
            CacheRefusal::Owner {
                uid: 65534,
                agent: nix::unistd::geteuid().as_raw(),
            },
        ),
        (
            "the genuine entry, world-writable",
            Box::new(|p: &Path| {
                std::fs::write(p, &genuine).unwrap();
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o666)).unwrap();
            }),
            CacheRefusal::Mode {
                mode: 0o666,
                what: "write",
            },
        ),
        (
            "a link to a copy of the genuine entry",
            Box::new(|p: &Path| std::os::unix::fs::symlink(&copy, p).unwrap()),
            CacheRefusal::Symlink,
        ),
        (
            "a hard link to a copy of the genuine entry",
            Box::new(|p: &Path| std::fs::hard_link(&copy, p).unwrap()),
            CacheRefusal::HardLinks { links: 2 },
        ),
        (
            "a FIFO",
            Box::new(|p: &Path| {
                nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap()
            }),
            CacheRefusal::NotAFile,
        ),
    ];
    for (what, plant, refusal) in cases {
        std::fs::remove_file(&entry).unwrap();
        plant(&entry);
        // A new runtime is a new process: nothing in memory.
        let rt = runtime(cache.path());
        let hook = rt.load(SANDBOX_PROBE.bytes).await.unwrap();
        assert_eq!(hook.cache, CacheStatus::Compiled, "{what}");
        assert_eq!(hook.refused.as_ref(), Some(&refusal), "{what}");
        let o = rt
            .run(&hook, &probe_ctx(&[("probe", "ok")]), &Sandbox::default())
            .await;
        assert_eq!(
            o.status,
            HookStatus::Succeeded {
                message: "ok: ValidateService inference d-42".into()
            },
            "{what}: the hook that runs is the probe itself"
        );
        // What was planted is gone; a genuine entry took its place, and the next process
        // uses it.
        let meta = std::fs::symlink_metadata(&entry).unwrap();
        assert!(meta.is_file(), "{what}");
        assert_eq!(
            (meta.uid(), meta.mode() & 0o777, meta.nlink()),
            (nix::unistd::geteuid().as_raw(), 0o600, 1),
            "{what}"
        );
        let hook = runtime(cache.path())
            .load(SANDBOX_PROBE.bytes)
            .await
            .unwrap();
        assert_eq!(
            (hook.cache, hook.refused),
            (CacheStatus::Disk, None),
            "{what}"
        );
    }
    assert_eq!(
        std::fs::read(&copy).unwrap(),
        genuine,
        "what a link pointed to is untouched"
    );
}

#[tokio::test]
async fn a_cache_directory_others_control_is_never_read() {
    let root = tempfile::tempdir().unwrap();
    let cache = root.path().join("hooks");
    std::fs::create_dir(&cache).unwrap();
    std::os::unix::fs::chown(&cache, Some(65534), Some(65534)).unwrap();
    let first = runtime(&cache).load(SANDBOX_PROBE.bytes).await.unwrap();
    assert_eq!(first.cache, CacheStatus::Compiled);
    assert!(
        std::fs::read_dir(&cache).unwrap().next().is_none(),
        "nothing written into a directory another user owns"
    );
    // Whatever is planted there is not loaded: every process compiles.
    let second = runtime(&cache).load(SANDBOX_PROBE.bytes).await.unwrap();
    assert_eq!(second.cache, CacheStatus::Compiled);
}

#[tokio::test]
async fn an_oversize_module_is_refused_before_it_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let limit = 1 << 20;
    let rt = HookRuntime::with_limits(
        dir.path(),
        HookLimits {
            max_module_bytes: limit,
            ..HookLimits::default()
        },
    )
    .unwrap();
    // 64 GiB, sparse: reading it whole would exhaust the machine.
    let huge = dir.path().join("huge.wasm");
    let f = std::fs::File::create(&huge).unwrap();
    f.set_len(64 << 30).unwrap();
    assert_eq!(
        rt.load_file(&huge).await.err(),
        Some(LoadError::TooLarge {
            size: 64 << 30,
            limit
        })
    );
    let bytes = vec![0u8; limit as usize + 1];
    assert_eq!(
        rt.load(&bytes).await.err(),
        Some(LoadError::TooLarge {
            size: limit + 1,
            limit
        })
    );
    // A FIFO is not read at all (it would block the reader).
    let fifo = dir.path().join("fifo.wasm");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    assert_eq!(
        rt.load_file(&fifo).await.err(),
        Some(LoadError::NotAFile { path: fifo })
    );
    // Under the limit, a module loads.
    let ok = dir.path().join("probe.wasm");
    std::fs::write(&ok, SANDBOX_PROBE.bytes).unwrap();
    assert!((SANDBOX_PROBE.bytes.len() as u64) < limit);
    assert_eq!(rt.load_file(&ok).await.unwrap().kind(), HookKind::ShoalHook);
}

#[tokio::test]
async fn a_compile_past_its_budget_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let rt = HookRuntime::with_limits(
        dir.path(),
        HookLimits {
            // No time at all: the caller stops waiting at once, however fast the machine.
            compile_budget: Duration::ZERO,
            compile_threads: 1,
            ..HookLimits::default()
        },
    )
    .unwrap();
    assert_eq!(
        rt.load(SANDBOX_PROBE.bytes).await.err(),
        Some(LoadError::CompileTimeout {
            budget: Duration::ZERO
        })
    );
    assert_eq!(rt.in_memory(), 0, "an abandoned compile is not remembered");
}

#[tokio::test]
async fn the_map_of_loaded_hooks_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let rt = HookRuntime::with_limits(
        dir.path(),
        HookLimits {
            max_loaded: 2,
            ..HookLimits::default()
        },
    )
    .unwrap();
    let module = |n: u32| {
        wat::parse_str(format!(
            "(module (func (export \"_start\") i32.const {n} drop))"
        ))
        .unwrap()
    };
    let (m0, m1, m2) = (module(0), module(1), module(2));
    for m in [&m0, &m1, &m2] {
        assert_eq!(rt.load(m).await.unwrap().cache, CacheStatus::Compiled);
        assert!(rt.in_memory() <= 2);
    }
    assert_eq!(rt.in_memory(), 2);
    // The least recently used (m0) was dropped: it comes from disk again; m2 is kept.
    assert_eq!(rt.load(&m2).await.unwrap().cache, CacheStatus::Memory);
    assert_eq!(rt.load(&m0).await.unwrap().cache, CacheStatus::Disk);
    assert_eq!(rt.in_memory(), 2);
    // Now m1 is the least recently used.
    assert_eq!(rt.load(&m2).await.unwrap().cache, CacheStatus::Memory);
    assert_eq!(rt.load(&m1).await.unwrap().cache, CacheStatus::Disk);

    // A bound on code size holds too: with room for none, only the newest is kept.
    let small = HookRuntime::with_limits(
        dir.path(),
        HookLimits {
            max_loaded_bytes: 1,
            ..HookLimits::default()
        },
    )
    .unwrap();
    for m in [&m0, &m1, &m2] {
        small.load(m).await.unwrap();
        assert_eq!(small.in_memory(), 1);
    }
}

/// Runs `n` probes that each sleep `secs` at once; returns their outcomes.
async fn concurrent_sleepers(rt: Arc<HookRuntime>, n: usize, secs: &str) -> Vec<HookOutcome> {
    let hook = Arc::new(rt.load(SANDBOX_PROBE.bytes).await.unwrap());
    let mut runs = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (rt, hook, secs) = (rt.clone(), hook.clone(), secs.to_string());
        runs.spawn(async move {
            let ctx = probe_ctx(&[("probe", "sleep"), ("secs", &secs)]);
            rt.run(&hook, &ctx, &Sandbox::default()).await
        });
    }
    runs.join_all().await
}

#[tokio::test]
async fn more_runs_than_instance_slots_wait_for_one_and_all_complete() {
    let cache = tempfile::tempdir().unwrap();
    let n = MAX_CONCURRENT_HOOKS as usize + 8;
    let outcomes = concurrent_sleepers(Arc::new(runtime(cache.path())), n, "1").await;
    assert_eq!(outcomes.len(), n);
    for o in &outcomes {
        assert_eq!(
            o.status,
            HookStatus::Succeeded {
                message: "woke up".into()
            },
            "{}",
            o.log.text
        );
    }
}

#[tokio::test]
async fn a_run_that_waits_too_long_for_a_slot_says_so() {
    let cache = tempfile::tempdir().unwrap();
    let rt = HookRuntime::with_limits(
        cache.path(),
        HookLimits {
            instance_wait: Duration::from_millis(200),
            ..HookLimits::default()
        },
    )
    .unwrap();
    // 33 runs at once, each holding its slot for 2 s: one of them cannot get a slot within
    // its 200 ms.
    let outcomes = concurrent_sleepers(Arc::new(rt), MAX_CONCURRENT_HOOKS as usize + 1, "2").await;
    let busy: Vec<&HookFailure> = outcomes
        .iter()
        .filter_map(|o| match &o.status {
            HookStatus::Failed { failure } => Some(failure),
            HookStatus::Succeeded { .. } => None,
        })
        .collect();
    assert_eq!(busy.len(), 1, "{busy:?}");
    let HookFailure::Busy { slots, waited_ms } = busy[0] else {
        panic!("{busy:?}")
    };
    assert_eq!(*slots, MAX_CONCURRENT_HOOKS);
    assert!(*waited_ms >= 200, "{waited_ms}");
    assert!(
        busy[0]
            .to_string()
            .contains("all 32 hook slots stayed busy"),
        "{}",
        busy[0]
    );
}
