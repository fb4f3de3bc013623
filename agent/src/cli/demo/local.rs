//! `shoal demo --local`: the single-host tour. Everything it uses is embedded in the
//! binary and written to a temporary directory; it shows one host:
//!
//! 1. deployments with `deploy local`'s machinery: the example inference app at v1, then
//!    v2, then v3-broken, whose model answers wrong, fails ValidateService and is rolled
//!    back to v2, which keeps serving;
//! 2. the hook sandbox: a model verified and a corrupted one caught, a plain WASI command
//!    in both WASI versions, and hooks that read `/etc/passwd`, loop forever and allocate
//!    forever, each stopped.
//!
//! Every step states what should happen; the demo exits 0 when everything did.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};
use shoal_examples::{Artifact, MODEL_CHECKSUM, PLAIN_COMMAND, PLAIN_COMMAND_P1, SANDBOX_PROBE};

use crate::hooks::{DirGrant, HookContext, HookRuntime, HookStatus, LifecycleEvent, Sandbox};
use crate::lifecycle::run::DEFAULT_KEEP_RELEASES;
use crate::lifecycle::state::AppDir;
use crate::lifecycle::{DeployRequest, LocalHost};

/// What a step should end as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
enum Expect {
    Succeeded,
    Failed,
}

#[derive(Serialize)]
struct StepReport {
    step: &'static str,
    hook: &'static str,
    expected: Expect,
    outcome: crate::hooks::HookOutcome,
    as_expected: bool,
}

struct Step {
    title: &'static str,
    hook: Artifact,
    event: LifecycleEvent,
    params: &'static [(&'static str, &'static str)],
    timeout: Duration,
    memory_mib: usize,
    before: fn(&Path) -> Result<()>,
    expect: Expect,
}

const STEPS: &[Step] = &[
    Step {
        title: "verify the model against SHA256SUMS",
        hook: MODEL_CHECKSUM,
        event: LifecycleEvent::AfterInstall,
        params: &[],
        timeout: Duration::from_secs(30),
        memory_mib: 256,
        before: |_| Ok(()),
        expect: Expect::Succeeded,
    },
    Step {
        title: "the same check after one byte of the model flipped",
        hook: MODEL_CHECKSUM,
        event: LifecycleEvent::AfterInstall,
        params: &[],
        timeout: Duration::from_secs(30),
        memory_mib: 256,
        before: |rev| {
            let path = rev.join("model/weights.json");
            let mut model = std::fs::read(&path)?;
            model[2] ^= 0x01;
            Ok(std::fs::write(path, model)?)
        },
        expect: Expect::Failed,
    },
    Step {
        title: "a plain WASI command (preview 2) using CodeDeploy's variables",
        hook: PLAIN_COMMAND,
        event: LifecycleEvent::BeforeInstall,
        params: &[],
        timeout: Duration::from_secs(30),
        memory_mib: 256,
        before: |_| Ok(()),
        expect: Expect::Succeeded,
    },
    Step {
        title: "the same command built as a WASI preview-1 module",
        hook: PLAIN_COMMAND_P1,
        event: LifecycleEvent::BeforeInstall,
        params: &[],
        timeout: Duration::from_secs(30),
        memory_mib: 256,
        before: |_| Ok(()),
        expect: Expect::Succeeded,
    },
    Step {
        title: "a hook trying to read /etc/passwd",
        hook: SANDBOX_PROBE,
        event: LifecycleEvent::BeforeInstall,
        params: &[("probe", "read"), ("path", "/etc/passwd")],
        timeout: Duration::from_secs(30),
        memory_mib: 256,
        before: |_| Ok(()),
        expect: Expect::Failed,
    },
    Step {
        title: "a hook looping forever, with a 1 s deadline",
        hook: SANDBOX_PROBE,
        event: LifecycleEvent::ValidateService,
        params: &[("probe", "loop")],
        timeout: Duration::from_secs(1),
        memory_mib: 256,
        before: |_| Ok(()),
        expect: Expect::Failed,
    },
    Step {
        title: "a hook allocating forever, with a 64 MiB cap",
        hook: SANDBOX_PROBE,
        event: LifecycleEvent::ValidateService,
        params: &[("probe", "alloc")],
        timeout: Duration::from_secs(30),
        memory_mib: 64,
        before: |_| Ok(()),
        expect: Expect::Failed,
    },
];

/// Writes the demo revision: a model and the SHA256SUMS that vouches for it.
fn write_revision(rev: &Path) -> Result<()> {
    std::fs::create_dir_all(rev.join("model"))?;
    let model = br#"{"weights": [[0.5, -1.25, 2.0]], "bias": [0.1]}"#;
    std::fs::write(rev.join("model/weights.json"), model)?;
    let sum = hex::encode(Sha256::digest(model));
    std::fs::write(
        rev.join("SHA256SUMS"),
        format!("{sum}  model/weights.json\n"),
    )?;
    Ok(())
}

#[derive(Serialize)]
struct DeployReport {
    step: String,
    expected: Expect,
    status: crate::lifecycle::status::DeploymentStatus,
    message: String,
    /// The model the service answered with afterwards.
    serving: Option<String>,
    expected_serving: &'static str,
    as_expected: bool,
}

/// The model the example app on `port` answers with.
pub(super) fn serving(port: u16) -> Option<String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(2)))
        .build()
        .into();
    let body = agent
        .get(&format!("http://127.0.0.1:{port}/health"))
        .call()
        .ok()?
        .into_body()
        .read_to_string()
        .ok()?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["model"].as_str().map(String::from)
}

/// Part 1: v1, v2, then v3-broken rolled back, on a scratch host.
async fn deployments(
    scratch: &Path,
    hooks: std::sync::Arc<HookRuntime>,
    json: bool,
) -> Result<Vec<DeployReport>> {
    let port = super::fleet::free_ports(1)?[0];
    let host = LocalHost {
        data_dir: scratch.join("data"),
        install_root: scratch.join("root"),
        host_name: "demo-host".into(),
        tags: Default::default(),
        keep_releases: DEFAULT_KEEP_RELEASES,
        hooks,
    };
    let plan = [
        (
            "v1",
            "deploy v1 (a linear model), the first install",
            Expect::Succeeded,
            "v1",
        ),
        ("v2", "deploy v2 (an MLP)", Expect::Succeeded, "v2"),
        (
            "v3-broken",
            "deploy v3-broken (a model that answers wrong)",
            Expect::Failed,
            "v2",
        ),
    ];
    let mut reports = Vec::new();
    for (name, title, expect, expected_serving) in plan {
        let bundle = scratch.join("revisions").join(name);
        shoal_examples::write_revision(name, &bundle)?;
        let progress = crate::cli::spinner(title);
        let request = DeployRequest {
            id: None,
            app: "inference".into(),
            bundle,
            deployment_group: "demo".into(),
            rollback: true,
            ignore_stop_failures: false,
            port: Some(port),
            progress: None,
        };
        let record = host.deploy(&request).await;
        progress.finish_and_clear();
        let record = record?;
        let got = if record.succeeded() {
            Expect::Succeeded
        } else {
            Expect::Failed
        };
        let now_serving = serving(port);
        let as_expected = got == expect && now_serving.as_deref() == Some(expected_serving);
        if !json {
            let mark = if as_expected { "ok  " } else { "FAIL" };
            println!("{mark} {title}");
            println!("       {}", record.message);
            println!(
                "       the service on 127.0.0.1:{port} answers with model {}",
                now_serving.as_deref().unwrap_or("(none)")
            );
        }
        reports.push(DeployReport {
            step: title.into(),
            expected: expect,
            status: record.status,
            message: record.message,
            serving: now_serving,
            expected_serving,
            as_expected,
        });
    }
    crate::lifecycle::switched::stop_all(&AppDir::new(&host.data_dir, "inference"))?;
    Ok(reports)
}

pub async fn run(json: bool) -> Result<bool> {
    let scratch = tempfile::tempdir().context("creating the demo's scratch directory")?;
    let runtime = std::sync::Arc::new(HookRuntime::new(&crate::cli::default_cache_dir())?);
    if !json {
        println!("Part 1: deployments on one host (deploy local), the example inference app\n");
    }
    let deployed = deployments(scratch.path(), runtime.clone(), json).await?;
    if !json {
        println!("\nPart 2: the hook sandbox\n");
    }
    let (rev, work) = (scratch.path().join("revision"), scratch.path().join("work"));
    write_revision(&rev)?;
    std::fs::create_dir_all(&work)?;

    let mut reports = Vec::new();
    for (n, step) in STEPS.iter().enumerate() {
        (step.before)(&rev).with_context(|| format!("preparing step {}", n + 1))?;
        let progress = crate::cli::spinner(step.title);
        let hook = runtime
            .load(step.hook.bytes)
            .await
            .with_context(|| format!("loading {}", step.hook.name))?;
        let mut ctx = HookContext::adhoc(step.event);
        ctx.application = "inference".into();
        ctx.deployment_id = "d-demo".into();
        ctx.params = step
            .params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let sandbox = Sandbox {
            dirs: vec![
                DirGrant {
                    host: rev.clone(),
                    guest: "/revision".into(),
                    writable: false,
                },
                DirGrant {
                    host: work.clone(),
                    guest: "/work".into(),
                    writable: true,
                },
            ],
            timeout: step.timeout,
            memory_limit: step.memory_mib << 20,
            ..Sandbox::default()
        };
        let outcome = runtime.run(&hook, &ctx, &sandbox).await;
        progress.finish_and_clear();
        let got = match outcome.status {
            HookStatus::Succeeded { .. } => Expect::Succeeded,
            HookStatus::Failed { .. } => Expect::Failed,
        };
        let as_expected = got == step.expect;
        if !json {
            let mark = if as_expected { "ok  " } else { "FAIL" };
            println!("{mark} {}. {} [{}]", n + 1, step.title, step.hook.name);
            println!(
                "       {:?}: {} ({} ms, compiled code: {:?})",
                got,
                outcome.summary(),
                outcome.elapsed_ms,
                outcome.cache
            );
        }
        reports.push(StepReport {
            step: step.title,
            hook: step.hook.name,
            expected: step.expect,
            outcome,
            as_expected,
        });
    }

    let all = reports.iter().all(|r| r.as_expected) && deployed.iter().all(|d| d.as_expected);
    if json {
        crate::cli::print_json(
            &serde_json::json!({ "deployments": deployed, "steps": reports, "as_planned": all }),
        )?;
    } else if all {
        println!(
            "\nEvery step went as planned: good revisions deploy, a bad model rolls back by itself, and the sandbox holds."
        );
    }
    if !all {
        eprintln!("error: the demo did not go as planned (see the steps marked FAIL)");
    }
    Ok(all)
}
