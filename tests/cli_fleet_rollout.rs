//! Progressive rollouts with real `shoal agent` processes on 127.84.x.y: a canary on a
//! quarter of the hosts shows `Baking` with exactly those hosts on the new revision (as
//! their own disks say), then completes; a stop while baking ends the deployment there,
//! with the other hosts Skipped and still on the old revision.

#[path = "support/fleet.rs"]
mod fleet;

use std::collections::BTreeMap;
use std::time::Duration;

use fleet::{
    Agent, Ca, agents, create, hosts, installed, json, revision, shoal, status, tag, wait_for,
};

const LONG: Duration = Duration::from_secs(90);

/// The hosts of a deployment view by status.
fn by_status(view: &serde_json::Value) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for h in view["hosts"].as_array().unwrap() {
        out.entry(h["status"].as_str().unwrap().to_string())
            .or_default()
            .push(h["name"].as_str().unwrap().to_string());
    }
    out
}

/// Four agents tagged `role=web` (and `extra` tags on the one at `extra_on`), started and
/// all seen alive. Dropped: the services they started, then the agents, then the files.
struct Four {
    _services: Services,
    agents: Vec<Agent>,
    ca: Ca,
    tmp: tempfile::TempDir,
}

fn four(prefix: [u8; 3], extra_on: usize, extra: &[(&str, &str)]) -> Four {
    four_with(prefix, |i| {
        if i == extra_on {
            extra.to_vec()
        } else {
            Vec::new()
        }
    })
}

/// Four agents tagged `role=web` and `tags_of(i)` each.
fn four_with<'a>(prefix: [u8; 3], tags_of: impl Fn(usize) -> Vec<(&'a str, &'a str)>) -> Four {
    four_armed(prefix, tags_of, None)
}

/// Four agents tagged `role=web` and `tags_of(i)` each, each with the crash point
/// `fault` armed, if given.
fn four_armed<'a>(
    prefix: [u8; 3],
    tags_of: impl Fn(usize) -> Vec<(&'a str, &'a str)>,
    fault: Option<&str>,
) -> Four {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new(tmp.path(), "fleet");
    let mut agents = agents(tmp.path(), &ca, prefix, 4);
    let services = Services(agents.iter().map(|a| a.data_dir.clone()).collect());
    for (i, a) in agents.iter_mut().enumerate() {
        let mut tags = vec![("role", "web")];
        tags.extend(tags_of(i));
        tag(a, &tags);
        if let Some(point) = fault {
            a.env = vec![("SHOAL_FAULT_POINT".into(), point.into())];
        }
        a.start();
    }
    wait_for("agent-1 to see all four alive", LONG, || {
        hosts(agents[0].addr, &ca.operator)
            .is_ok_and(|l| l.len() == 4 && l.iter().all(|h| h["state"] == "alive"))
    });
    Four {
        _services: services,
        agents,
        ca,
        tmp,
    }
}

impl Four {
    /// Deploys `revision` to all four at once and waits: it must succeed. Its revision id.
    fn first(&self, revision: &std::path::Path) -> String {
        let o = create(
            &self.agents[0],
            &self.ca.operator,
            revision,
            &["--targets", "role=web", "--config", "AllAtOnce", "--wait"],
        );
        let view = json(&o, "the first deployment");
        assert_eq!(view["status"], "Succeeded", "{view}");
        view["revision"].as_str().unwrap().to_string()
    }

    /// Asks agent `peer` for deployment `id` until it is Baking; that view.
    fn baking(&self, peer: usize, id: &str) -> serde_json::Value {
        let mut view = serde_json::Value::Null;
        wait_for("the deployment to bake", LONG, || {
            status(&self.agents[peer], &self.ca.operator, id).is_ok_and(|v| {
                let is = v["status"] == "Baking";
                view = v;
                is
            })
        });
        view
    }

    /// Waits until agent `peer` hears `count` hosts run `revision` of `tiny`.
    fn hears_on(&self, peer: usize, revision: &str, count: usize) {
        wait_for(
            &format!("agent-{} to hear {count} hosts on {revision}", peer + 1),
            LONG,
            || {
                hosts(self.agents[peer].addr, &self.ca.operator).is_ok_and(|l| {
                    l.iter().filter(|h| h["apps"]["tiny"] == revision).count() == count
                })
            },
        );
    }

    /// Asks agent `peer` for deployment `id` until its rollback Succeeded; its last view.
    fn rolled_back(&self, peer: usize, id: &str) -> serde_json::Value {
        let mut view = serde_json::Value::Null;
        wait_for("the rollback to succeed", LONG, || {
            status(&self.agents[peer], &self.ca.operator, id).is_ok_and(|v| {
                let done = v["rollback"]["status"] == "Succeeded";
                view = v;
                done
            })
        });
        view
    }
}

#[test]
fn a_canary_bakes_on_a_quarter_of_the_hosts_then_completes_and_a_stop_ends_a_bake() {
    let f = four([127, 84, 1], usize::MAX, &[]);
    let (fleet, ca, tmp) = (&f.agents, &f.ca, &f.tmp);
    let targets = ["--targets", "role=web", "--config", "AllAtOnce"];
    let v1_id = f.first(&revision(tmp.path(), "v1"));

    // The dry run shows the waves: one host, a bake, the other three.
    let v2 = revision(tmp.path(), "v2");
    let canary = [&targets[..], &["--canary", "25%:8s"]].concat();
    let plan = json(
        &create(
            &fleet[0],
            &ca.operator,
            &v2,
            &[&canary[..], &["--dry-run"]].concat(),
        ),
        "the dry run",
    );
    let batches: Vec<Vec<String>> = serde_json::from_value(plan["batches"].clone()).unwrap();
    assert_eq!(
        batches.iter().map(Vec::len).collect::<Vec<_>>(),
        [1, 3],
        "{plan}"
    );
    assert_eq!(plan["bakes_after"], serde_json::json!([1]), "{plan}");
    assert_eq!(plan["rollout"], "canary 25%, bake 8s", "{plan}");

    let accepted = json(&create(&fleet[0], &ca.operator, &v2, &canary), "v2");
    let id = accepted["id"].as_str().unwrap().to_string();
    // Baking, watched from another peer: exactly the canary is on v2, on its own disk too.
    let baking = f.baking(2, &id);
    let hosts_now = by_status(&baking);
    assert_eq!(hosts_now["Succeeded"].len(), 1, "{baking}");
    assert_eq!(hosts_now["Pending"].len(), 3, "{baking}");
    assert!(baking["baking_until_ms"].as_u64().is_some(), "{baking}");
    let on: Vec<Option<String>> = fleet.iter().map(installed).collect();
    assert_eq!(
        on.iter().filter(|r| r.as_deref() == Some("v2")).count(),
        1,
        "while baking, only the canary runs v2: {on:?}"
    );
    let canary_host = &hosts_now["Succeeded"][0];
    let i: usize = canary_host.trim_start_matches("agent-").parse().unwrap();
    assert_eq!(installed(&fleet[i - 1]).as_deref(), Some("v2"));

    // Then the rest, as one batch after the bake.
    let watched = shoal()
        .args(["deploy", "status", &id, "--watch", "--json", "--peer"])
        .arg(fleet[1].addr.to_string())
        .arg("--identity")
        .arg(&ca.operator)
        .output()
        .unwrap();
    let done = json(&watched, "deploy status --watch");
    assert_eq!(done["status"], "Succeeded", "{done}");
    for a in fleet {
        assert_eq!(installed(a).as_deref(), Some("v2"));
    }
    let mut by_batch: BTreeMap<u64, usize> = BTreeMap::new();
    for h in done["hosts"].as_array().unwrap() {
        *by_batch.entry(h["batch"].as_u64().unwrap()).or_default() += 1;
    }
    assert_eq!(by_batch.into_values().collect::<Vec<_>>(), [1, 3], "{done}");

    // A stop while baking: the deployment ends there, the rest are Skipped on v2.
    let v3 = revision(tmp.path(), "v3");
    let long_bake = [&targets[..], &["--canary", "25%:10m"]].concat();
    wait_for("every host to gossip it is done deploying", LONG, || {
        hosts(fleet[0].addr, &ca.operator).is_ok_and(|l| {
            l.iter()
                .all(|h| h["details"]["tiny"]["health"] != "deploying")
        })
    });
    let accepted = json(&create(&fleet[0], &ca.operator, &v3, &long_bake), "v3");
    let id = accepted["id"].as_str().unwrap().to_string();
    f.baking(3, &id);
    let o = shoal()
        .args(["deploy", "stop", &id, "--json", "--peer"])
        .arg(fleet[2].addr.to_string())
        .arg("--identity")
        .arg(&ca.operator)
        .output()
        .unwrap();
    assert_eq!(json(&o, "deploy stop")["status"], "Stopped");
    let view = status(&fleet[1], &ca.operator, &id).unwrap();
    let hosts_now = by_status(&view);
    assert_eq!(hosts_now["Succeeded"].len(), 1, "{view}");
    assert_eq!(hosts_now["Skipped"].len(), 3, "{view}");
    let on: Vec<Option<String>> = fleet.iter().map(installed).collect();
    assert_eq!(
        on.iter().filter(|r| r.as_deref() == Some("v3")).count(),
        1,
        "{on:?}"
    );
    assert_eq!(
        on.iter().filter(|r| r.as_deref() == Some("v2")).count(),
        3,
        "{on:?}"
    );

    // --outdated-only: v2 again, to the one host that does not run it (the stopped
    // canary on v3); with every host on v2, it is refused. The peer asked must hear that.
    let v2_id = done["revision"].as_str().unwrap().to_string();
    f.hears_on(1, &v2_id, 3);
    let o = create(
        &fleet[1],
        &ca.operator,
        &v2,
        &[
            "--targets",
            "role=web",
            "--config",
            "AllAtOnce",
            "--outdated-only",
            "--wait",
        ],
    );
    let again = json(&o, "v2 to the outdated");
    assert_eq!(again["status"], "Succeeded", "{again}");
    assert_eq!(again["hosts"].as_array().unwrap().len(), 1, "{again}");
    for a in fleet {
        assert_eq!(installed(a).as_deref(), Some("v2"), "{}", a.name);
    }
    f.hears_on(1, &v2_id, 4);
    let o = create(
        &fleet[1],
        &ca.operator,
        &v2,
        &["--targets", "role=web", "--outdated-only"],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("every targeted host already runs"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // A stop with --rollback while baking: the canary goes back to the group's last
    // success (v2; the stopped v3 never succeeded), the rest were never touched.
    let v4 = revision(tmp.path(), "v4");
    let accepted = json(&create(&fleet[0], &ca.operator, &v4, &long_bake), "v4");
    let id = accepted["id"].as_str().unwrap().to_string();
    f.baking(3, &id);
    assert_eq!(
        fleet
            .iter()
            .filter(|a| installed(a).as_deref() == Some("v4"))
            .count(),
        1
    );
    let o = shoal()
        .args(["deploy", "stop", &id, "--rollback", "--json", "--peer"])
        .arg(fleet[1].addr.to_string())
        .arg("--identity")
        .arg(&ca.operator)
        .output()
        .unwrap();
    assert_eq!(json(&o, "deploy stop --rollback")["status"], "Stopped");
    let view = f.rolled_back(2, &id);
    assert_eq!(view["rollback"]["revision"], done["revision"], "{view}");
    for a in fleet {
        assert_eq!(installed(a).as_deref(), Some("v2"), "{}", a.name);
    }

    // A rollback by hand undoes the last deployment (that rollback, a success on v2): v1,
    // the success before it, comes back everywhere, fetched from the hosts that keep it.
    f.hears_on(1, &v2_id, 4);
    let rollback = |extra: &[&str]| {
        shoal()
            .args(["deploy", "rollback", "--group", "tiny", "--json", "--peer"])
            .arg(fleet[1].addr.to_string())
            .arg("--identity")
            .arg(&ca.operator)
            .args(extra)
            .output()
            .unwrap()
    };
    let back = json(&rollback(&["--wait"]), "deploy rollback");
    assert_eq!(back["status"], "Succeeded", "{back}");
    assert_eq!(back["revision"], v1_id.as_str(), "{back}");
    assert_eq!(back["config"], "AllAtOnce", "the group's config: {back}");
    for a in fleet {
        assert_eq!(installed(a).as_deref(), Some("v1"), "{}", a.name);
    }
    // A revision the group never deployed successfully is refused, and so is too short a
    // prefix.
    for (to, why) in [
        ("0123456789abcdef", "no successful deployment"),
        ("01", "at least 8"),
    ] {
        let o = rollback(&["--to", to]);
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(why), "--to {to}: {err}");
    }
}

/// A revision of `tiny` without hooks (it cannot fail by its tags).
fn plain_revision(root: &std::path::Path, payload: &str) -> std::path::PathBuf {
    let dir = revision(root, payload);
    std::fs::write(
        dir.join("appspec.yml"),
        "version: 0.0\nos: linux\nfiles:\n  - source: payload.txt\n    destination: /srv/tiny\n",
    )
    .unwrap();
    dir
}

#[test]
fn a_failed_deployment_is_rolled_back_on_every_host_that_took_it_and_the_two_are_linked() {
    let f = four([127, 84, 2], 2, &[("probe-fail", "ValidateService")]);
    let (fleet, ca, tmp) = (&f.agents, &f.ca, &f.tmp);
    let v1_id = f.first(&plain_revision(tmp.path(), "v1"));

    // v2's ValidateService fails on agent-3: one at a time with 3 of 4 to stay healthy,
    // agent-1 and agent-2 take v2, agent-3 fails, agent-4 is never started. The order is
    // by name only once agent-2 hears every host healthy on v1 (gossip may lag).
    wait_for(
        "agent-2 to hear every host on v1, done deploying",
        LONG,
        || {
            hosts(fleet[1].addr, &ca.operator).is_ok_and(|l| {
                l.iter().all(|h| {
                    h["apps"]["tiny"] == v1_id.as_str()
                        && h["details"]["tiny"]["health"] != "deploying"
                })
            })
        },
    );
    let v2 = revision(tmp.path(), "v2");
    let o = create(
        &fleet[1],
        &ca.operator,
        &v2,
        &["--targets", "role=web", "--min-healthy", "3", "--wait"],
    );
    assert!(!o.status.success());
    let failed: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(failed["status"], "Failed", "{failed}");
    let id = failed["id"].as_str().unwrap().to_string();
    let hosts_now = by_status(&failed);
    assert_eq!(hosts_now["Succeeded"], ["agent-1", "agent-2"], "{failed}");
    assert_eq!(hosts_now["Failed"], ["agent-3"], "{failed}");
    assert_eq!(hosts_now["Skipped"], ["agent-4"], "{failed}");

    // The rollback, found from another peer: linked both ways, v1 on the three hosts.
    let view = f.rolled_back(3, &id);
    assert_eq!(view["rollback"]["revision"], v1_id.as_str(), "{view}");
    let rollback_id = view["rollback"]["id"].as_str().unwrap().to_string();
    let rollback = status(&fleet[2], &ca.operator, &rollback_id).unwrap();
    assert_eq!(rollback["rollback_of"], id.as_str(), "{rollback}");
    assert_eq!(rollback["revision"], v1_id.as_str());
    let mut targeted: Vec<String> = rollback["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap().to_string())
        .collect();
    targeted.sort();
    assert_eq!(targeted, ["agent-1", "agent-2", "agent-3"], "{rollback}");
    for a in fleet {
        assert_eq!(installed(a).as_deref(), Some("v1"), "{}", a.name);
    }
    // The group's last success is still v1; the failed deployment did not change it.
    let groups = json(
        &shoal()
            .args(["group", "list", "--json", "--peer"])
            .arg(fleet[0].addr.to_string())
            .arg("--identity")
            .arg(&ca.operator)
            .output()
            .unwrap(),
        "group list",
    );
    assert_eq!(groups[0]["last_successful"], v1_id.as_str(), "{groups}");
}

/// Kills, when dropped (the test passed or not), the services the agents under these data
/// dirs started: they outlive their agents on purpose.
struct Services(Vec<std::path::PathBuf>);

impl Drop for Services {
    fn drop(&mut self) {
        for data in &self.0 {
            let pid = std::fs::read(data.join("apps/tiny/service.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v["pid"].as_i64());
            if let Some(pid) = pid {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// A revision of `tiny` whose service is `sh -c SCRIPT` (no hooks, no port).
fn service_revision(root: &std::path::Path, payload: &str, script: &str) -> std::path::PathBuf {
    let dir = revision(root, payload);
    std::fs::write(
        dir.join("appspec.yml"),
        format!(
            "version: 0.0\nos: linux\nfiles:\n  - source: payload.txt\n    destination: /srv/tiny\n\
             shoal:\n  service:\n    command: /bin/sh\n    args: [\"-c\", {script:?}]\n"
        ),
    )
    .unwrap();
    dir
}

#[test]
fn a_service_that_does_not_stay_up_trips_the_gate_while_baking_and_is_rolled_back() {
    let f = four([127, 84, 3], usize::MAX, &[]);
    let (fleet, ca, tmp) = (&f.agents, &f.ca, &f.tmp);
    let targets = ["--targets", "role=web", "--config", "AllAtOnce"];
    let v1_id = f.first(&service_revision(tmp.path(), "v1", "exec sleep 600"));

    // v2's service passes its start (up for a second) and ValidateService, then exits
    // after two: its supervisor restarts it, the canary's gossip says so, the gate trips.
    let v2 = service_revision(tmp.path(), "v2", "sleep 2; exit 1");
    let canary = [&targets[..], &["--canary", "25%:10m"]].concat();
    let accepted = json(&create(&fleet[0], &ca.operator, &v2, &canary), "v2");
    let id = accepted["id"].as_str().unwrap().to_string();
    let view = f.rolled_back(1, &id);
    assert_eq!(view["status"], "Failed", "{view}");
    let reason = view["reason"].as_str().unwrap();
    // Seen stopped, or seen restarted: either is a service that does not stay up.
    assert!(
        reason.contains("health gate tripped while baking")
            && (reason.contains("restarted") || reason.contains("not running")),
        "{reason}"
    );
    let hosts_now = by_status(&view);
    assert_eq!(
        hosts_now["Succeeded"].len(),
        1,
        "only the canary took it: {view}"
    );
    assert_eq!(hosts_now["Skipped"].len(), 3, "{view}");
    assert_eq!(view["rollback"]["revision"], v1_id.as_str());
    for a in fleet {
        assert_eq!(installed(a).as_deref(), Some("v1"), "{}", a.name);
    }
}

#[test]
fn a_monitor_hook_that_starts_failing_while_baking_fails_and_rolls_back_the_deployment() {
    let f = four([127, 84, 4], usize::MAX, &[]);
    let (fleet, ca, tmp) = (&f.agents, &f.ca, &f.tmp);
    let targets = ["--targets", "role=web", "--config", "AllAtOnce"];
    f.first(&service_revision(tmp.path(), "v1", "exec sleep 600"));

    // v2 runs the probe as a monitor every second, one failure allowed.
    let v2 = service_revision(tmp.path(), "v2", "exec sleep 600");
    let spec = std::fs::read_to_string(v2.join("appspec.yml")).unwrap();
    std::fs::write(
        v2.join("appspec.yml"),
        format!(
            "{spec}  monitor:\n    - location: hooks/probe.wasm\n      interval: 1\n      failures_allowed: 1\n"
        ),
    )
    .unwrap();
    let canary = [&targets[..], &["--canary", "25%:10m"]].concat();
    let accepted = json(&create(&fleet[0], &ca.operator, &v2, &canary), "v2");
    let id = accepted["id"].as_str().unwrap().to_string();
    let baking = f.baking(2, &id);
    // The canary's monitor starts failing: its work directory now holds probe-fail.
    let canary_host = by_status(&baking)["Succeeded"][0].clone();
    let agent = fleet.iter().find(|a| a.name == canary_host).unwrap();
    std::fs::write(agent.data_dir.join("apps/tiny/work/probe-fail"), "").unwrap();

    let view = f.rolled_back(1, &id);
    assert_eq!(view["status"], "Failed", "{view}");
    let reason = view["reason"].as_str().unwrap();
    assert!(
        reason.contains("health gate tripped while baking")
            && reason.contains("monitor hooks/probe.wasm failed")
            && reason.contains("finds /work/probe-fail"),
        "{reason}"
    );
    for a in fleet {
        assert_eq!(installed(a).as_deref(), Some("v1"), "{}", a.name);
    }
}

#[test]
fn zone_by_zone_never_has_two_zones_in_flight_and_holds_the_minimum_in_each() {
    // Zone a is agent-3 and agent-4, zone b agent-1 and agent-2: zones go by their names,
    // not the hosts'.
    let f = four_with([127, 84, 5], |i| {
        vec![("az", if i < 2 { "b" } else { "a" })]
    });
    let (fleet, ca, tmp) = (&f.agents, &f.ca, &f.tmp);
    let v1_id = f.first(&plain_revision(tmp.path(), "v1"));
    f.hears_on(0, &v1_id, 4);
    let zoned = [
        "--targets",
        "role=web",
        "--config",
        "HalfAtATime",
        "--zones",
        "az",
        "--zone-bake",
        "3s",
    ];
    let v2 = plain_revision(tmp.path(), "v2");
    // HalfAtATime would take two of four at a time; each zone of two keeps one healthy.
    let plan = json(
        &create(
            &fleet[0],
            &ca.operator,
            &v2,
            &[&zoned[..], &["--dry-run"]].concat(),
        ),
        "the dry run",
    );
    assert_eq!(plan["zones"], serde_json::json!(["a", "b"]), "{plan}");
    assert_eq!(
        plan["batches"],
        serde_json::json!([["agent-3"], ["agent-4"], ["agent-1"], ["agent-2"]]),
        "{plan}"
    );
    assert_eq!(plan["bakes_after"], serde_json::json!([2]), "{plan}");

    let accepted = json(&create(&fleet[0], &ca.operator, &v2, &zoned), "v2 by zone");
    let id = accepted["id"].as_str().unwrap().to_string();
    // Baking between the zones: zone a on v2, zone b untouched.
    let baking = f.baking(1, &id);
    let hosts_now = by_status(&baking);
    assert_eq!(hosts_now["Succeeded"], ["agent-3", "agent-4"], "{baking}");
    assert_eq!(hosts_now["Pending"], ["agent-1", "agent-2"], "{baking}");
    for (a, on) in fleet.iter().zip(["v1", "v1", "v2", "v2"]) {
        assert_eq!(installed(a).as_deref(), Some(on), "{}", a.name);
    }
    let done = json(
        &shoal()
            .args(["deploy", "status", &id, "--watch", "--json", "--peer"])
            .arg(fleet[2].addr.to_string())
            .arg("--identity")
            .arg(&ca.operator)
            .output()
            .unwrap(),
        "deploy status --watch",
    );
    assert_eq!(done["status"], "Succeeded", "{done}");
    // One host per batch, and every batch of zone a before every batch of zone b: batches
    // run one after the other, so two zones were never in flight together.
    let batch_of = |name: &str| -> u64 {
        done["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["name"] == name)
            .and_then(|h| h["batch"].as_u64())
            .unwrap()
    };
    let batches: Vec<u64> = ["agent-3", "agent-4", "agent-1", "agent-2"]
        .iter()
        .map(|n| batch_of(n))
        .collect();
    assert!(
        batches.windows(2).all(|w| w[0] < w[1]),
        "{batches:?}: {done}"
    );
    for a in fleet {
        assert_eq!(installed(a).as_deref(), Some("v2"), "{}", a.name);
    }

    // A target without the zone tag is refused before anything starts.
    let untagged = ["--targets", "role=web", "--zones", "rack"];
    let o = create(&fleet[0], &ca.operator, &v2, &untagged);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("has no zone"), "{err}");
}

/// `shoal logs` asked of `peer` for deployment `id`, with `extra` options.
fn logs(f: &Four, peer: usize, id: &str, extra: &[&str]) -> std::process::Output {
    shoal()
        .args(["logs", id, "--peer"])
        .arg(f.agents[peer].addr.to_string())
        .arg("--identity")
        .arg(&f.ca.operator)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn logs_come_whole_from_the_host_that_wrote_them_through_any_peer() {
    // agent-3's ValidateService hook prints 1.5 MiB: more than a frame, more than the
    // old cap of a kept log.
    const SPAM: usize = 3 << 19;
    let f = four([127, 84, 6], 2, &[("probe-spam", "1572864")]);
    let (fleet, ca, tmp) = (&f.agents, &f.ca, &f.tmp);
    let v1 = revision(tmp.path(), "v1");
    // Followed from agent-2 while it runs: the command ends when the deployment does.
    let accepted = json(
        &create(
            &fleet[0],
            &ca.operator,
            &v1,
            &["--targets", "role=web", "--config", "AllAtOnce"],
        ),
        "v1",
    );
    let id = accepted["id"].as_str().unwrap().to_string();
    let followed = json(&logs(&f, 1, &id, &["--follow", "--json"]), "logs --follow");
    let view = status(&fleet[1], &ca.operator, &id).unwrap();
    assert_eq!(
        view["status"], "Succeeded",
        "logs --follow ended before the deployment: {view}"
    );
    let files = followed["files"].as_array().unwrap();
    let mut hosts: Vec<&str> = files
        .iter()
        .filter(|f| f["event"] == "ValidateService")
        .map(|f| f["host"].as_str().unwrap())
        .collect();
    hosts.sort();
    assert_eq!(
        hosts,
        ["agent-1", "agent-2", "agent-3", "agent-4"],
        "{followed}"
    );
    assert_eq!(followed["gaps"], serde_json::json!([]));

    // One host's one event, asked of agent-4 (neither the writer nor the coordinator):
    // the whole log, every numbered line in order, in plain text.
    let o = logs(
        &f,
        3,
        &id,
        &["--host", "agent-3", "--event", "ValidateService"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8(o.stdout).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    assert!(
        header.starts_with("==> agent-3 ValidateService (") && header.ends_with(") <=="),
        "{header}"
    );
    let numbered: Vec<&str> = lines
        .clone()
        .filter(|l| l.len() > 9 && l.as_bytes()[8] == b' ')
        .collect();
    assert!(text.len() > SPAM, "{} bytes: {text}", text.len());
    for (n, line) in numbered.iter().enumerate() {
        assert!(
            line.starts_with(&format!("{n:08} ")),
            "line {n} is {line:?}"
        );
    }
    assert_eq!(numbered.len(), SPAM.div_ceil(75), "every line, none cut");
    assert!(lines.any(|l| l.contains("END OF SPAM")));

    // What is not there is said so.
    let o = logs(&f, 0, &id, &["--host", "agent-9"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("agent-9 is not a host of deployment"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = logs(&f, 0, "0123456789abcdef0123456789abcdef", &[]);
    assert!(!o.status.success());
    let o = logs(&f, 0, &id, &["--event", "Deploy"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--event"));
}

/// `shoal deploy list --group tiny --json` asked of `peer`, newest first.
fn group_history(peer: &Agent, operator: &std::path::Path) -> Vec<serde_json::Value> {
    let o = shoal()
        .args(["deploy", "list", "--group", "tiny", "--json", "--peer"])
        .arg(peer.addr.to_string())
        .arg("--identity")
        .arg(operator)
        .output()
        .unwrap();
    json(&o, "deploy list")
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Waits until `agent`'s own disk has `payload` installed, and the group's history shows
/// a catch-up of deployment `of` that Succeeded on `agent` alone; that catch-up's id.
fn caught_up(f: &Four, agent: usize, payload: &str, of: &str) -> String {
    let a = &f.agents[agent];
    wait_for(
        &format!("{} to install {payload} by itself", a.name),
        LONG,
        || installed(a).as_deref() == Some(payload),
    );
    let mut id = String::new();
    wait_for("the catch-up to succeed", LONG, || {
        group_history(&f.agents[0], &f.ca.operator)
            .iter()
            .find(|d| d["catch_up_of"] == of)
            .is_some_and(|d| {
                id = d["id"].as_str().unwrap_or_default().to_string();
                d["status"] == "Succeeded"
            })
    });
    let view = status(&f.agents[1], &f.ca.operator, &id).unwrap();
    assert_eq!(view["catch_up_of"], of, "{view}");
    assert_eq!(
        by_status(&view)["Succeeded"],
        std::slice::from_ref(&a.name),
        "{view}"
    );
    id
}

#[test]
fn a_host_started_after_a_success_or_down_during_one_reaches_the_last_good_revision_by_itself() {
    // Three agents up, the fourth not started yet.
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new(tmp.path(), "fleet");
    let mut agents = agents(tmp.path(), &ca, [127, 84, 7], 4);
    let services = Services(agents.iter().map(|a| a.data_dir.clone()).collect());
    for a in agents.iter_mut() {
        tag(a, &[("role", "web")]);
    }
    for a in agents.iter_mut().take(3) {
        a.start();
    }
    wait_for("agent-1 to see three alive", LONG, || {
        hosts(agents[0].addr, &ca.operator)
            .is_ok_and(|l| l.len() == 3 && l.iter().all(|h| h["state"] == "alive"))
    });
    let mut f = Four {
        _services: services,
        agents,
        ca,
        tmp,
    };

    // v1 to the three; then agent-4 starts, matching the group's targets: it gets v1 by
    // itself, in a deployment of the group's history.
    let v1 = create(
        &f.agents[0],
        &f.ca.operator,
        &plain_revision(f.tmp.path(), "v1"),
        &["--targets", "role=web", "--config", "AllAtOnce", "--wait"],
    );
    let v1 = json(&v1, "v1");
    assert_eq!(v1["status"], "Succeeded", "{v1}");
    assert_eq!(v1["hosts"].as_array().unwrap().len(), 3, "{v1}");
    let v1_id = v1["id"].as_str().unwrap().to_string();
    assert_eq!(installed(&f.agents[3]), None);
    f.agents[3].start();
    let first = caught_up(&f, 3, "v1", &v1_id);
    f.hears_on(0, v1["revision"].as_str().unwrap(), 4);

    // agent-3 goes down; v2 goes to the other three; agent-3 comes back and catches up.
    assert!(f.agents[2].terminate().success());
    wait_for("agent-1 to see agent-3 gone", LONG, || {
        hosts(f.agents[0].addr, &f.ca.operator).is_ok_and(|l| {
            l.iter()
                .any(|h| h["name"] == "agent-3" && h["state"] != "alive" && h["state"] != "suspect")
        })
    });
    let v2 = create(
        &f.agents[1],
        &f.ca.operator,
        &plain_revision(f.tmp.path(), "v2"),
        &["--targets", "role=web", "--config", "AllAtOnce", "--wait"],
    );
    let v2 = json(&v2, "v2");
    assert_eq!(v2["status"], "Succeeded", "{v2}");
    let mut took: Vec<String> = v2["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap().to_string())
        .collect();
    took.sort();
    assert_eq!(took, ["agent-1", "agent-2", "agent-4"], "{v2}");
    assert_eq!(installed(&f.agents[2]).as_deref(), Some("v1"));
    let v2_id = v2["id"].as_str().unwrap().to_string();
    f.agents[2].start();
    let second = caught_up(&f, 2, "v2", &v2_id);
    f.hears_on(3, v2["revision"].as_str().unwrap(), 4);

    // The group's history, newest first: each catch-up after what it caught up with, and
    // nothing else (no host was caught up twice, none that already ran the revision).
    let history: Vec<(String, String)> = group_history(&f.agents[2], &f.ca.operator)
        .iter()
        .map(|d| {
            (
                d["id"].as_str().unwrap().to_string(),
                d["catch_up_of"].as_str().unwrap_or("-").to_string(),
            )
        })
        .collect();
    assert_eq!(
        history,
        [
            (second, v2_id.clone()),
            (v2_id, "-".into()),
            (first, v1_id.clone()),
            (v1_id, "-".into()),
        ]
    );
    // Its last success is v2 and a rollback by hand undoes v2, not a catch-up.
    let o = shoal()
        .args([
            "deploy", "rollback", "--group", "tiny", "--json", "--wait", "--peer",
        ])
        .arg(f.agents[0].addr.to_string())
        .arg("--identity")
        .arg(&f.ca.operator)
        .output()
        .unwrap();
    let back = json(&o, "deploy rollback");
    assert_eq!(back["revision"], v1["revision"], "{back}");
    for a in &f.agents {
        assert_eq!(installed(a).as_deref(), Some("v1"), "{}", a.name);
    }
}

#[test]
fn a_coordinator_killed_between_a_failure_and_its_rollback_is_replaced_and_the_rollback_made() {
    // Every agent dies, as kill -9 would, right after it commits a Failed verdict as
    // coordinator: before the rollback exists.
    let mut f = four_armed(
        [127, 84, 8],
        |i| {
            if i == 2 {
                vec![("probe-fail", "ValidateService")]
            } else {
                Vec::new()
            }
        },
        Some("coordinator.failed-finished"),
    );
    let v1_id = f.first(&plain_revision(f.tmp.path(), "v1"));
    wait_for(
        "three voters, and agent-2 to hear every host on v1, done deploying",
        LONG,
        || {
            hosts(f.agents[1].addr, &f.ca.operator).is_ok_and(|l| {
                l.iter().filter(|h| h["log"]["voter"] == true).count() == 3
                    && l.iter().all(|h| {
                        h["apps"]["tiny"] == v1_id.as_str()
                            && h["details"]["tiny"]["health"] != "deploying"
                    })
            })
        },
    );
    // As in the rollback test: agent-1 and agent-2 take v2, agent-3 fails, agent-4 is
    // never started, and the deployment fails.
    let accepted = json(
        &create(
            &f.agents[1],
            &f.ca.operator,
            &revision(f.tmp.path(), "v2"),
            &["--targets", "role=web", "--min-healthy", "3"],
        ),
        "v2",
    );
    let id = accepted["id"].as_str().unwrap().to_string();
    let mut dead = None;
    wait_for("the coordinator to die at its crash point", LONG, || {
        dead = f.agents.iter_mut().position(|a| {
            a.child
                .as_mut()
                .is_some_and(|c| c.try_wait().unwrap().is_some())
        });
        dead.is_some()
    });
    let dead = dead.unwrap();
    assert!(
        f.agents[dead].log_text().contains("crash point armed"),
        "{}",
        f.agents[dead].log_text()
    );
    let peer = (dead + 1) % 4;
    wait_for("a peer to say the deployment Failed", LONG, || {
        status(&f.agents[peer], &f.ca.operator, &id).is_ok_and(|v| v["status"] == "Failed")
    });

    // It comes back, unarmed, to take its part in the rollback; the next coordinator
    // makes the rollback from the log and runs it on every host that took v2.
    f.agents[dead].kill();
    f.agents[dead].env.clear();
    f.agents[dead].start();
    let view = f.rolled_back(peer, &id);
    assert_eq!(view["rollback"]["revision"], v1_id.as_str(), "{view}");
    let rollback = status(
        &f.agents[peer],
        &f.ca.operator,
        view["rollback"]["id"].as_str().unwrap(),
    )
    .unwrap();
    assert_eq!(rollback["rollback_of"], id.as_str(), "{rollback}");
    let mut took: Vec<&str> = rollback["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap())
        .collect();
    took.sort();
    assert_eq!(took, ["agent-1", "agent-2", "agent-3"], "{rollback}");
    for a in &f.agents {
        assert_eq!(installed(a).as_deref(), Some("v1"), "{}", a.name);
    }
}
