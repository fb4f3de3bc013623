//! The supervisor never gives up, with real `shoal agent` processes: while application A's
//! recovery keeps failing (its old service will not start), the agent keeps restarting
//! application B's service, `shoal hosts` shows A's problem, stray entries under `apps/`
//! are ignored and SIGHUP stops nothing; afterwards `shoal deploy recover --force` puts A
//! back on its revision where a plain recovery fails. Alone (no identity), SIGHUP does not
//! kill the agent either.

#[path = "support/fleet.rs"]
mod fleet;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use fleet::{Agent, Ca, hosts, shoal, wait_for};

const LONG: Duration = Duration::from_secs(60);

/// A revision whose service runs `script` under `/bin/sh`.
fn revision(root: &Path, app: &str, script: &str) -> PathBuf {
    let rev = root.join(format!("rev-{app}"));
    std::fs::create_dir_all(&rev).unwrap();
    std::fs::write(
        rev.join("appspec.yml"),
        format!(
            "version: 0.0\nos: linux\nshoal:\n  service:\n    command: /bin/sh\n    args: [\"-c\", {script:?}]\n    start_timeout: 5\n"
        ),
    )
    .unwrap();
    rev
}

fn deploy(agent: &Agent, app: &str, rev: &Path) -> String {
    let o = shoal()
        .args(["deploy", "local", "--json", "--app", app, "--bundle"])
        .arg(rev)
        .arg("--data-dir")
        .arg(&agent.data_dir)
        .arg("--install-root")
        .arg(&agent.install_root)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let record: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(record["status"], "Succeeded", "{record}");
    record["revision"].as_str().unwrap().to_string()
}

fn recover(agent: &Agent, app: &str, force: bool) -> Output {
    let mut cmd = shoal();
    cmd.args(["deploy", "recover", "--app", app, "--data-dir"])
        .arg(&agent.data_dir)
        .arg("--install-root")
        .arg(&agent.install_root);
    if force {
        cmd.arg("--force");
    }
    cmd.output().unwrap()
}

fn service_pid(agent: &Agent, app: &str) -> Option<i32> {
    let text =
        std::fs::read_to_string(agent.data_dir.join(format!("apps/{app}/service.json"))).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["pid"].as_i64().map(|p| p as i32)
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

/// The problem `shoal hosts` shows for `app` on `host`, if any.
fn problem(agent: &Agent, operator: &Path, app: &str) -> Option<String> {
    let list = hosts(agent.addr, operator).ok()?;
    let host = list.iter().find(|h| h["name"] == agent.name.as_str())?;
    host["details"][app]["problem"].as_str().map(String::from)
}

#[test]
fn a_failing_application_never_stops_the_others() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new(tmp.path(), "sup");
    let addr: SocketAddr = ([127, 0, 91, 1], 7400).into();
    let mut agent = Agent::new(tmp.path(), &ca, "sup-1", addr, &[]);
    let flag = tmp.path().join("a-may-start");
    std::fs::write(&flag, b"").unwrap();
    let rev_a = revision(
        tmp.path(),
        "a",
        &format!(
            "test -e {} || {{ echo a refuses; exit 3; }}; exec sleep 600",
            flag.display()
        ),
    );
    let a = deploy(&agent, "a", &rev_a);
    deploy(&agent, "b", &revision(tmp.path(), "b", "exec sleep 600"));

    // A is left mid-deployment, and its old service will not start any more.
    std::fs::remove_file(&flag).unwrap();
    let journal = agent.data_dir.join("apps/a/journal.json");
    std::fs::write(
        &journal,
        serde_json::json!({
            "deployment_id": "d-interrupted",
            "from": a,
            "to": "f".repeat(64),
            "phase": "Install",
        })
        .to_string(),
    )
    .unwrap();
    // Stray entries beside the applications.
    let apps = agent.data_dir.join("apps");
    std::fs::create_dir_all(apps.join("not an app")).unwrap();
    std::fs::create_dir_all(apps.join(".junk")).unwrap();
    std::os::unix::fs::symlink("/etc", apps.join("etc")).unwrap();

    agent.start();
    let shown = || problem(&agent, &ca.operator, "a");
    wait_for("shoal hosts to show A's problem", LONG, || {
        shown().is_some_and(|p| p.contains("recovering") && p.contains("a refuses"))
    });
    assert!(journal.exists(), "A's failed recovery keeps its journal");

    // B is supervised all along: its service, killed, is started again.
    wait_for("B's service to be adopted", LONG, || {
        agent.log_text().contains("service running") && service_pid(&agent, "b").is_some_and(alive)
    });
    for round in 0..2 {
        let before = service_pid(&agent, "b").unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(before),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        wait_for(
            &format!("B's service restarted (round {round})"),
            LONG,
            || service_pid(&agent, "b").is_some_and(|p| p != before && alive(p)),
        );
    }
    assert!(
        shown().is_some(),
        "A's problem is still shown: {:?}",
        shown()
    );
    assert!(journal.exists());
    let log = agent.log_text();
    assert!(
        log.contains("with a problem: a: recovering"),
        "the status line names A"
    );
    assert!(
        !log.contains("not an app") && !log.contains(".junk"),
        "{log}"
    );

    // SIGHUP reloads; it stops nothing.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    wait_for("the reload", LONG, || {
        agent.log_text().contains("configuration reloaded")
    });
    assert!(agent.child.as_mut().unwrap().try_wait().unwrap().is_none());
    assert!(agent.terminate().success());

    // Without the agent: a plain recovery fails and keeps the journal; --force puts A back
    // on its revision and says its service did not start.
    let plain = recover(&agent, "a", false);
    assert!(!plain.status.success());
    assert!(journal.exists());
    let forced = recover(&agent, "a", true);
    let said = String::from_utf8_lossy(&forced.stdout);
    assert!(
        forced.status.success(),
        "{}",
        String::from_utf8_lossy(&forced.stderr)
    );
    assert!(
        said.contains(&format!("rolled back to {a}")) && said.contains("did not start"),
        "{said}"
    );
    assert!(!journal.exists());
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(agent.data_dir.join("apps/a/state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["active"], a.as_str());
    // B's service outlives the agent, as ever; stop it.
    if let Some(pid) = service_pid(&agent, "b") {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

#[test]
fn sighup_does_not_kill_an_agent_without_a_mesh() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"alone\"\ndata_dir = {:?}\ninstall_root = {:?}\n",
            tmp.path().join("data"),
            tmp.path().join("root")
        ),
    )
    .unwrap();
    let log = tmp.path().join("agent.log");
    let mut child = shoal()
        .args(["agent", "--config"])
        .arg(&config)
        .env("SHOAL_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for("the agent to start", LONG, || {
        text().contains("agent started")
    });
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    wait_for("SIGHUP to be acknowledged", LONG, || {
        text().contains("nothing to reload")
    });
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP ended the agent"
    );
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    wait_for("the agent to stop", LONG, || {
        child.try_wait().unwrap().is_some()
    });
    assert!(child.wait().unwrap().success());
}
