//! The example revisions do what examples/revisions/README.md says, with real parts: the
//! real inference app serving each revision's model, and the real example hooks checking it
//! through the sandbox.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use shoal_agent::appspec;
use shoal_agent::hooks::{DirGrant, HookContext, HookRuntime, LifecycleEvent, Sandbox};

/// The inference app, killed when dropped.
struct App(Child);

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[path = "../../tests/support/ports.rs"]
mod ports;

fn get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

fn start_app(revision: &Path, port: u16) -> App {
    let spec =
        appspec::parse(&std::fs::read_to_string(revision.join("appspec.yml")).unwrap()).unwrap();
    let service = spec.service.expect("the example declares its service");
    let child = Command::new(revision.join(&service.command))
        .args(&service.args)
        .arg("--port")
        .arg(port.to_string())
        .current_dir(revision)
        .spawn()
        .expect("starting the inference app");
    let app = App(child);
    let until = Instant::now() + Duration::from_secs(60);
    while Instant::now() < until {
        if get(port, "/health").is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
            return app;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the inference app did not come up on port {port}");
}

#[tokio::test]
async fn v1_and_v2_validate_and_v3_broken_fails_only_its_golden_predictions() {
    let cache = tempfile::tempdir().unwrap();
    let hooks = HookRuntime::new(cache.path()).unwrap();
    for name in shoal_examples::REVISIONS {
        let dir = tempfile::tempdir().unwrap();
        shoal_examples::write_revision(name, dir.path()).unwrap();
        let spec =
            appspec::parse(&std::fs::read_to_string(dir.path().join("appspec.yml")).unwrap())
                .unwrap();
        assert_eq!(spec.deployable(), Ok(()), "{name}");

        let lease = ports::lease();
        let port = lease.port();
        let _app = start_app(dir.path(), port);
        let health = get(port, "/health").unwrap();
        assert!(
            health.contains(&format!("\"model\":\"{name}\"")),
            "{name}: {health}"
        );

        let sandbox = Sandbox {
            dirs: vec![DirGrant {
                host: dir.path().to_path_buf(),
                guest: "/revision".into(),
                writable: false,
            }],
            http_allow: vec![format!("127.0.0.1:{port}").parse().unwrap()],
            ..Sandbox::default()
        };
        let mut results = Vec::new();
        for event in [
            LifecycleEvent::AfterInstall,
            LifecycleEvent::ValidateService,
        ] {
            for hook_spec in spec.hooks_for(event) {
                let hook = hooks
                    .load_file(&dir.path().join(&hook_spec.location))
                    .await
                    .unwrap();
                let mut ctx = HookContext::adhoc(event);
                ctx.params.insert("port".into(), port.to_string());
                let outcome = hooks.run(&hook, &ctx, &sandbox).await;
                results.push((event, outcome.succeeded(), outcome.summary()));
            }
        }
        assert_eq!(results.len(), 2);
        assert!(results[0].1, "{name}: model checksum: {}", results[0].2);
        if name == "v3-broken" {
            assert!(!results[1].1, "v3-broken must fail ValidateService");
            assert!(
                results[1].2.contains("case 0: predicted [-1.7125]"),
                "{}",
                results[1].2
            );
        } else {
            assert!(results[1].1, "{name}: {}", results[1].2);
            assert_eq!(results[1].2, "3 golden prediction(s) match");
        }
    }
}
