//! Zero-downtime switching with real `shoal agent` processes on 127.91.x.y, the example
//! inference app behind each host's switch (`shoal.service.switch`), and a load client
//! that sends requests to the three public ports all the time and counts every one:
//! - v1 -> v2 -> v3-broken (it fails after the switch and is switched back): not one
//!   request fails, and every answer comes from a revision that was active then;
//!   the switch back reuses v2's process (same pid, no restart); the traffic events'
//!   hooks ran in the documented order, as their own log on the host says.
//! - the same while agents are killed with -9 in the middle of a switch and restarted:
//!   each comes back on the revision it came from, switched back without a failure.
//! - `deploy local` killed at every crash point of a switch, then recovered, under load.
//! - the supervisor starts a dead switch or service again; a service's port taken by
//!   another process while it is down gets no traffic, and the service another port.

#[path = "support/fleet.rs"]
mod fleet;
#[path = "support/load.rs"]
mod load;
#[path = "support/ports.rs"]
mod ports;
#[path = "support/switch.rs"]
mod switch;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use fleet::wait_for;
use load::{Load, Sample};
use switch::{APP, LONG, switched_revision, three};

/// Every request of `samples`: none failed, and each phase's answers came only from the
/// models `allowed[phase]`.
fn check(samples: &[Sample], allowed: &[&[&str]]) {
    let failed: Vec<&Sample> = samples.iter().filter(|s| s.answer.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed, the first: {:?}",
        failed.len(),
        samples.len(),
        &failed[..failed.len().min(5)]
    );
    for (phase, models) in allowed.iter().enumerate() {
        let seen: BTreeSet<&str> = samples
            .iter()
            .filter(|s| s.phase == phase)
            .map(|s| s.answer.as_deref().unwrap())
            .collect();
        assert!(!seen.is_empty(), "phase {phase} saw no request at all");
        let foreign: Vec<&&str> = seen.iter().filter(|m| !models.contains(m)).collect();
        assert!(
            foreign.is_empty(),
            "phase {phase} was answered by {foreign:?}, not only by {models:?}"
        );
    }
}

#[test]
fn three_hosts_serve_every_request_through_v1_v2_and_a_switch_back_from_v3_broken() {
    let f = three([127, 91, 1], [None, None, None]);
    let revs: Vec<PathBuf> = ["v1", "v2", "v3-broken"]
        .iter()
        .map(|n| switched_revision(f.tmp.path(), n))
        .collect();
    f.succeeds(&revs[0], "AllAtOnce");
    assert_eq!(f.serving(), ["v1", "v1", "v1"]);
    let kernel = f.kernel_rules_follow(true);

    let load = Load::start(&f.public(), Duration::from_millis(5), 1_000_000);
    let enough = |what: &str, n: usize| {
        let target = load.count() + n;
        wait_for(what, LONG, || load.count() >= target);
    };
    enough("requests on v1", 60);

    // v1 -> v2, one host at a time.
    load.phase(1);
    let lines_before: Vec<usize> = (0..3).map(|i| f.recorded(i, 0).len()).collect();
    f.succeeds(&revs[1], "OneAtATime");
    load.phase(2);
    enough("requests on v2", 60);
    if kernel {
        // The kernel rule moved with the switch, and carries the load: with no update
        // running, the proxies take none of it.
        f.kernel_rules_follow(true);
        let before = f.proxy_accepted();
        enough("requests by the kernel rule", 60);
        assert_eq!(
            f.proxy_accepted(),
            before,
            "the proxies took connections the kernel rule should carry"
        );
    }
    // The documented order, as the hooks themselves recorded it.
    for (i, before) in lines_before.iter().enumerate() {
        assert_eq!(f.recorded(i, *before), switch::HOOKED, "host {i}");
        // v1 is kept warm beside v2, for a switch back.
        let standby = f.service_json(i, "standby.json").expect("v1 kept warm");
        assert!(standby["warm_until_ms"].as_u64().is_some(), "{standby}");
    }
    let v2_pids: Vec<serde_json::Value> = (0..3)
        .map(|i| f.service_json(i, "service.json").unwrap()["pid"].clone())
        .collect();

    // v3-broken fails its golden check after the switch, on the first host: switched back
    // to v2's process, never restarted; the deployment fails there.
    load.phase(3);
    let v3 = f.create(&revs[2], "OneAtATime");
    let view = f.ended(&v3);
    assert_eq!(view["status"], "Failed", "{view}");
    load.phase(4);
    enough("requests after v3-broken", 90);
    let samples = load.finish();
    check(
        &samples,
        &[
            &["v1"],
            &["v1", "v2"],
            &["v2"],
            &["v2", "v3-broken"],
            &["v2"],
        ],
    );
    let hosts_on_v3: usize = samples
        .iter()
        .filter(|s| s.answer.as_deref() == Ok("v3-broken"))
        .map(|s| s.target)
        .collect::<BTreeSet<_>>()
        .len();
    assert!(hosts_on_v3 <= 1, "v3-broken served on {hosts_on_v3} hosts");
    // One request in flight per host, each on a new connection: once a host answered from
    // the new revision, every later request there did too (v1 -> v2 once; v2 -> v3-broken
    // -> v2 at most), so no answer came from a revision switched away from.
    for (phase, changes) in [(1, 1), (3, 2)] {
        for host in 0..3 {
            let mut mine: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.phase == phase && s.target == host)
                .collect();
            mine.sort_by_key(|s| s.started);
            let models: Vec<&str> = mine.iter().map(|s| s.answer.as_deref().unwrap()).collect();
            let changed = models.windows(2).filter(|w| w[0] != w[1]).count();
            assert!(
                changed <= changes,
                "host {host} changed revision {changed} times in phase {phase}"
            );
        }
    }
    assert_eq!(f.serving(), ["v2", "v2", "v2"]);
    if kernel {
        // Switched back: the rule follows v2's process again.
        f.kernel_rules_follow(true);
    }
    // The host that tried v3-broken switched back to v2's process, kept warm, and the
    // fleet's rollback kept it: every host serves from the very process it had before.
    for (i, pid) in v2_pids.iter().enumerate() {
        let served = f.service_json(i, "service.json").unwrap();
        assert_eq!(&served["pid"], pid, "host {i}: {served}");
        assert_eq!(served["restarts"], 0, "host {i}: {served}");
    }
    println!(
        "{} requests, none failed; p50 {} us, p99 {} us",
        samples.len(),
        load::quantile(&samples.iter().collect::<Vec<_>>(), 0.5),
        load::quantile(&samples.iter().collect::<Vec<_>>(), 0.99)
    );
}

#[test]
fn agents_killed_in_the_middle_of_a_switch_drop_no_request() {
    // agent-2 dies just after its proxy routed to v2 (the records not yet swapped),
    // agent-3 halfway through swapping them: both on their second switch (v1 was the first).
    // These revisions say `forward: proxy`: the proxy carries every connection, with no
    // kernel rule (the other tests here have one).
    let mut f = three(
        [127, 91, 2],
        [None, Some("switch.allowed:2"), Some("switch.swap-half:2")],
    );
    let revs: Vec<PathBuf> = ["v1", "v2"]
        .iter()
        .map(|n| switch::proxied_revision(f.tmp.path(), n))
        .collect();
    f.succeeds(&revs[0], "AllAtOnce");
    let load = Load::start(&f.public(), Duration::from_millis(5), 1_000_000);
    wait_for("requests on v1", LONG, || load.count() >= 60);

    load.phase(1);
    // All at once, so that both reach their crash point whatever the other's fate.
    let v2 = f.create(&revs[1], "AllAtOnce");
    for i in [1, 2] {
        let agent = &mut f.agents[i];
        wait_for(
            &format!("agent-{} to die at its crash point", i + 1),
            LONG,
            || agent.child.as_mut().unwrap().try_wait().unwrap().is_some(),
        );
        agent.child = None;
        agent.env.clear();
        agent.start();
    }
    let view = f.ended(&v2);
    load.phase(2);
    let target = load.count() + 90;
    wait_for("requests after the deployment", LONG, || {
        load.count() >= target
    });
    let samples = load.finish();
    check(&samples, &[&["v1"], &["v1", "v2"], &["v1", "v2"]]);
    f.kernel_rules_follow(false);
    // Each host serves one revision, the one it reports, through its own switch.
    let serving = f.serving();
    for (i, model) in serving.iter().enumerate() {
        let state = f.service_json(i, "state.json").unwrap();
        let record = f.service_json(i, "service.json").unwrap();
        assert_eq!(record["revision"], state["active"], "host {i}");
        assert!(model == "v1" || model == "v2", "host {i}: {model}");
        assert!(
            !f.agents[i]
                .data_dir
                .join("apps")
                .join(APP)
                .join("swapping.json")
                .exists(),
            "host {i}: a swap left half done"
        );
    }
    // agent-1 took v2. A killed host was switched back to v1 by its recovery; then it
    // either refused the command again (an intent runs once: the host Failed, on v1) or,
    // when the command came again before its recovery was recorded, ran it whole (the
    // host Succeeded, on v2). Either way it serves what the deployment says of it.
    assert_eq!(serving[0], "v2", "{view}");
    for (i, model) in serving.iter().enumerate() {
        let host = view["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["name"] == format!("agent-{}", i + 1))
            .unwrap();
        let expected = if host["status"] == "Succeeded" {
            "v2"
        } else {
            "v1"
        };
        assert_eq!(model, expected, "host {i}: {host}");
    }
    println!(
        "{} requests, none failed; the deployment: {}",
        samples.len(),
        view["status"]
    );
}

/// One host for `deploy local`: its directories, a public port of its own, and the
/// clean-up of what outlives its deployments (dropped before the files).
struct OneHost {
    _services: switch::Services,
    _lease: ports::PortLease,
    data: PathBuf,
    root: PathBuf,
    port: u16,
    public: std::net::SocketAddr,
    tmp: tempfile::TempDir,
}

fn one_host() -> OneHost {
    let tmp = tempfile::tempdir().unwrap();
    let (data, root) = (tmp.path().join("data"), tmp.path().join("root"));
    let lease = ports::lease();
    let port = lease.port();
    OneHost {
        _services: switch::Services(vec![data.clone()]),
        _lease: lease,
        data,
        root,
        port,
        public: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        tmp,
    }
}

/// `shoal deploy local` of `bundle` for the app into `data`/`root`, public port `port`.
fn deploy_local(
    data: &std::path::Path,
    root: &std::path::Path,
    port: u16,
    bundle: &std::path::Path,
    env: &[(&str, &str)],
) -> std::process::Output {
    fleet::shoal()
        .args(["deploy", "local", "--json", "--app", APP, "--port"])
        .arg(port.to_string())
        .arg("--data-dir")
        .arg(data)
        .arg("--install-root")
        .arg(root)
        .arg("--bundle")
        .arg(bundle)
        .envs(env.iter().copied())
        .env_remove("SHOAL_LOG")
        .output()
        .unwrap()
}

/// The write points of `faults::POINTS` that a switched deployment over a previous
/// revision reaches (the in-place service stop and start are not among them).
const SWITCHED_WRITE_POINTS: [&str; 10] = [
    "release.unpacked",
    "release.renamed",
    "journal.written",
    "install.journaled",
    "install.file",
    "install.files-done",
    "install.state-written",
    "commit.state-written",
    "journal.removed",
    "record.written",
];

#[test]
fn a_deployment_killed_at_every_switch_point_is_recovered_without_a_failed_request() {
    use std::os::unix::process::ExitStatusExt;
    let points = SWITCHED_WRITE_POINTS
        .iter()
        .chain(shoal_agent::faults::SWITCH_POINTS);
    for point in points {
        let h = one_host();
        let (tmp, data, root, port, public) = (&h.tmp, &h.data, &h.root, h.port, h.public);
        let v1 = switched_revision(tmp.path(), "v1");
        let v2 = switched_revision(tmp.path(), "v2");
        let o = deploy_local(data, root, port, &v1, &[]);
        assert!(
            o.status.success(),
            "{point}: v1: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let v1_id = serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["revision"]
            .as_str()
            .unwrap()
            .to_string();

        let load = Load::start(&[public], Duration::from_millis(2), 1_000_000);
        let more = |n: usize| {
            let target = load.count() + n;
            wait_for("requests", LONG, || load.count() >= target);
        };
        more(20);
        let o = deploy_local(data, root, port, &v2, &[("SHOAL_FAULT_POINT", point)]);
        assert_eq!(
            o.status.signal(),
            Some(9),
            "{point}: never reached: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        more(20);
        let o = fleet::shoal()
            .args(["deploy", "recover", "--json", "--app", APP, "--data-dir"])
            .arg(data)
            .arg("--install-root")
            .arg(root)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{point}: recover: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let app = data.join("apps").join(APP);
        assert!(!app.join("swapping.json").exists(), "{point}");
        // Recovered to one whole revision: v1 switched back to (with v2's service gone),
        // or v2 when the kill came after its commit. It is the one that answers.
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(app.join("state.json")).unwrap()).unwrap();
        let on_v1 = state["active"] == v1_id.as_str();
        if on_v1 {
            assert!(
                !app.join("standby.json").exists(),
                "{point}: v2's service is left"
            );
        }
        let model = if on_v1 { "v1" } else { "v2" };
        assert_eq!(load::predict(public).as_deref(), Ok(model), "{point}");
        println!("{point}: recovered to {model}");
        // The kernel rule is where the recovery left traffic: the serving port.
        let serving = |app: &std::path::Path| -> Option<u16> {
            let record = std::fs::read(app.join("service.json")).unwrap();
            let record: serde_json::Value = serde_json::from_slice(&record).unwrap();
            record["port"].as_u64().map(|p| p as u16)
        };
        if let Ok(rule) = switch::kernel_rule(data) {
            assert_eq!(rule, serving(&app), "{point}: the kernel rule");
        }
        more(20);
        // And the next deployment goes through.
        let o = deploy_local(data, root, port, &v2, &[]);
        assert!(
            o.status.success(),
            "{point}: v2: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        more(20);
        let samples = load.finish();
        check(&samples, &[&["v1", "v2"]]);
        assert_eq!(load::predict(public).as_deref(), Ok("v2"), "{point}");
        if let Ok(rule) = switch::kernel_rule(data) {
            assert_eq!(rule, serving(&app), "{point}: the kernel rule");
        }
    }
}

#[test]
fn the_supervisor_restarts_a_dead_switch_or_service_and_lets_a_warm_revision_go() {
    use switch::example_revision;
    let f = three([127, 91, 3], [None, None, None]);
    // The previous revision is kept warm for 2 s only.
    let v1 = example_revision(f.tmp.path(), "v1", Some(2));
    let v2 = example_revision(f.tmp.path(), "v2", Some(2));
    for rev in [&v1, &v2] {
        f.succeeds(rev, "AllAtOnce");
    }
    let app = f.agents[0].data_dir.join("apps").join(APP);
    // v1 kept warm, then stopped by the supervisor once its time is up.
    wait_for("v1's warm process to be let go", LONG, || {
        !app.join("standby.json").exists()
    });
    let public = f.public()[0];
    let kill = |file: &str| {
        let pid = f.service_json(0, file).unwrap()["pid"].as_i64().unwrap() as i32;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        pid
    };
    // The switch dies: the supervisor starts another, routed to the serving service (the
    // kernel rule answers meanwhile, so the answer alone does not say it is routed).
    let dir = shoal_agent::lifecycle::state::AppDir::new(&f.agents[0].data_dir, APP);
    let serving_port = f.service_json(0, "service.json").unwrap()["port"]
        .as_u64()
        .map(|p| p as u16);
    let old = kill("switch.json");
    wait_for("another switch", LONG, || {
        f.service_json(0, "switch.json")
            .is_some_and(|r| r["pid"].as_i64() != Some(old as i64))
            && shoal_agent::switch::running(&dir)
                .ok()
                .flatten()
                .is_some_and(|p| p.seen().backend == serving_port)
            && load::predict(public).as_deref() == Ok("v2")
    });
    // The switch's descriptor limit fits its connection cap (two descriptors each).
    let pid = f.service_json(0, "switch.json").unwrap()["pid"]
        .as_i64()
        .unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let soft: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(
        soft >= 2 * shoal_agent::switch::proxy::MAX_CONNECTIONS as u64,
        "the switch may open {soft} descriptors"
    );
    // The service dies: started again on its own port, where the switch still routes.
    let port = f.service_json(0, "service.json").unwrap()["port"].clone();
    let old = kill("service.json");
    wait_for("the service started again", LONG, || {
        f.service_json(0, "service.json")
            .is_some_and(|r| r["pid"].as_i64() != Some(old as i64) && r["restarts"] == 1)
            && load::predict(public).as_deref() == Ok("v2")
    });
    assert_eq!(f.service_json(0, "service.json").unwrap()["port"], port);

    // The service dies and another process takes its port at once (the app's user, say):
    // new connections wait at the switch, never go to that process once the supervisor
    // has seen the death, and the service starts again on another port.
    let port = f.service_json(0, "service.json").unwrap()["port"]
        .as_u64()
        .unwrap() as u16;
    let old = kill("service.json");
    // Its socket is closed once the killed process is gone: a few milliseconds.
    let mut thief = None;
    wait_for("the dead service's port to be free", LONG, || {
        thief = std::net::TcpListener::bind(("127.0.0.1", port)).ok();
        thief.is_some()
    });
    let thief = thief.unwrap();
    thief.set_nonblocking(true).unwrap();
    let stolen = || {
        let mut n = 0;
        while thief.accept().is_ok() {
            n += 1;
        }
        n
    };
    // The supervisor's next pass unroutes the switch: a request made from then on waits
    // there (not at the thief) and is answered by v2 once the service is back.
    wait_for("the switch unrouted", LONG, || {
        shoal_agent::switch::running(&dir)
            .ok()
            .flatten()
            .is_some_and(|p| p.seen().backend.is_none())
    });
    // The kernel rule went before the proxy's route: none sends to the thief either.
    if let Ok(rule) = switch::kernel_rule(&f.agents[0].data_dir) {
        assert_eq!(
            rule, None,
            "the kernel rule still sends to the dead service's port"
        );
    }
    // Whatever reached the thief did before that pass (a quarter of a second at most).
    stolen();
    let waiting = std::thread::spawn(move || load::predict_within(public, LONG));
    wait_for("the service started again on another port", LONG, || {
        f.service_json(0, "service.json").is_some_and(|r| {
            r["pid"].as_i64() != Some(old as i64) && r["port"].as_u64() != Some(port.into())
        }) && load::predict(public).as_deref() == Ok("v2")
    });
    assert_eq!(waiting.join().unwrap().as_deref(), Ok("v2"));
    for _ in 0..20 {
        assert_eq!(load::predict(public).as_deref(), Ok("v2"));
    }
    assert_eq!(
        stolen(),
        0,
        "the switch sent connections to another process's port"
    );
}

/// In place → switched → switched with `forward: proxy` → switched → in place on one
/// host, under load: a move to or from in place runs in place (the old service stops
/// first), so the port may refuse connections for a moment; what is checked is where it
/// ends. Switched, the proxy holds the port and the kernel rule points at the service's
/// own port; with `forward: proxy` there is no rule and the proxy carries the requests;
/// back in place (the proxy killed first, with the rule set), the proxy and the rule's
/// program are gone and the service holds the public port itself. Every answer came from
/// one of the revisions.
#[test]
fn moving_between_in_place_and_switched_leaves_no_proxy_or_rule_behind() {
    let h = one_host();
    let (tmp, data, root, port, public) = (&h.tmp, &h.data, &h.root, h.port, h.public);
    let app = data.join("apps").join(APP);
    let in_place = switch::example_revision(tmp.path(), "v1", None);
    let switched = switched_revision(tmp.path(), "v2");
    let deploy = |bundle: &std::path::Path, model: &str| {
        let o = deploy_local(data, root, port, bundle, &[]);
        assert!(
            o.status.success(),
            "{model}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(load::predict(public).as_deref(), Ok(model));
    };
    deploy(&in_place, "v1");
    assert!(!app.join("switch.json").exists());
    let load = Load::start(&[public], Duration::from_millis(2), 1_000_000);

    deploy(&switched, "v2");
    assert!(
        app.join("switch.json").exists(),
        "no proxy for the switched revision"
    );
    let serving: serde_json::Value =
        serde_json::from_slice(&std::fs::read(app.join("service.json")).unwrap()).unwrap();
    let own = serving["port"].as_u64().map(|p| p as u16);
    assert!(own.is_some_and(|p| p != port), "{serving}");
    if let Ok(rule) = switch::kernel_rule(data) {
        assert_eq!(rule, own, "the kernel rule of the switched revision");
    }

    // A switched revision that says `forward: proxy`: the rule goes, the proxy carries
    // every connection.
    deploy(&switch::proxied_revision(tmp.path(), "v1"), "v1");
    if let Ok(rule) = switch::kernel_rule(data) {
        assert_eq!(
            rule, None,
            "a kernel rule is left for a `forward: proxy` revision"
        );
    }
    let accepted = || {
        let dir = shoal_agent::lifecycle::state::AppDir::new(data, APP);
        shoal_agent::switch::running(&dir)
            .unwrap()
            .expect("the proxy runs")
            .seen()
            .accepted
    };
    let before = accepted();
    assert_eq!(load::predict(public).as_deref(), Ok("v1"));
    let after = accepted();
    assert!(
        after > before,
        "the proxy did not carry a request ({before} -> {after})"
    );
    // Back to the kernel rule.
    deploy(&switched, "v2");
    let own = serde_json::from_slice::<serde_json::Value>(
        &std::fs::read(app.join("service.json")).unwrap(),
    )
    .unwrap()["port"]
        .as_u64()
        .map(|p| p as u16);
    if let Ok(rule) = switch::kernel_rule(data) {
        assert_eq!(rule, own, "the kernel rule after `forward: proxy`");
    }

    // The proxy dies before the move back: its kernel rule must go all the same.
    let pid = serde_json::from_slice::<serde_json::Value>(
        &std::fs::read(app.join("switch.json")).unwrap(),
    )
    .unwrap()["pid"]
        .as_i64()
        .unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    deploy(&in_place, "v1");
    assert!(
        !app.join("switch.json").exists(),
        "the proxy is left after the move back in place"
    );
    if let Ok(exists) = switch::kernel_program_attached(data) {
        assert!(
            !exists,
            "the kernel rule's program is left after the move back in place"
        );
    }
    let serving: serde_json::Value =
        serde_json::from_slice(&std::fs::read(app.join("service.json")).unwrap()).unwrap();
    assert_eq!(serving["port"].as_u64(), Some(port.into()), "{serving}");
    let target = load.count() + 20;
    wait_for("requests on v1 again", LONG, || load.count() >= target);
    let samples = load.finish();
    let models: BTreeSet<&str> = samples
        .iter()
        .filter_map(|s| s.answer.as_deref().ok())
        .collect();
    assert!(
        models.iter().all(|m| ["v1", "v2"].contains(m)),
        "{models:?}"
    );
    let failed = samples.iter().filter(|s| s.answer.is_err()).count();
    println!(
        "{} requests across two in-place moves, {failed} refused or failed while a move ran",
        samples.len()
    );
}
