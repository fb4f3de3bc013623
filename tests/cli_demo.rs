//! `shoal demo --keep DIR`, the README's main command with its fleet left running: five
//! real agents, the example app's three revisions, the load generator's counts. The
//! summary must add up and agree with what the kept fleet says afterwards, and
//! `demo --stop DIR` must stop every agent and service it started.

#[path = "support/fleet.rs"]
mod fleet;

use std::path::Path;
use std::time::Duration;

use fleet::{json, shoal, wait_for};

/// The pids in `dir/agent-N/agent.pid` and the services' pids the agents recorded.
fn started(dir: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    for i in 1..=5 {
        let home = dir.join(format!("agent-{i}"));
        if let Ok(p) = std::fs::read_to_string(home.join("agent.pid")) {
            pids.push(p.trim().parse().unwrap());
        }
        // The service, the previous revision's kept warm, and the switch.
        for file in ["service.json", "standby.json", "switch.json"] {
            let pid = std::fs::read(home.join("data/apps/inference").join(file))
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v["pid"].as_i64());
            pids.extend(pid.map(|p| p as i32));
        }
    }
    pids
}

/// Running, not a zombie waiting for a parent that does not reap.
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().chars().next())
        })
        .flatten()
        .is_some_and(|state| state != 'Z' && state != 'X')
}

/// Kills what the demo left if the test fails before `--stop` did.
struct Leftovers(std::path::PathBuf);

impl Drop for Leftovers {
    fn drop(&mut self) {
        for pid in started(&self.0) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        // Their redirects outlive them on purpose: detached here.
        for home in agent_homes(&self.0) {
            let _ = redirect(&home).clear();
        }
    }
}

#[test]
fn the_fleet_demo_rolls_out_rolls_back_and_its_numbers_add_up() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("fleet");
    let _leftovers = Leftovers(dir.clone());
    let o = shoal()
        .args(["demo", "--json", "--keep"])
        .arg(&dir)
        .output()
        .unwrap();
    let summary = json(&o, "shoal demo --keep");
    assert_eq!(summary["as_planned"], true, "{summary}");
    assert_eq!(summary["kept"], true);

    // The deployments: v1 and v2 succeeded; v3-broken failed and its rollback succeeded.
    let deployments = summary["deployments"].as_array().unwrap();
    let outcomes: Vec<(&str, &str)> = deployments
        .iter()
        .map(|d| {
            (
                d["revision"].as_str().unwrap(),
                d["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        [
            ("v1", "Succeeded"),
            ("v2", "Succeeded"),
            ("v3-broken", "Failed")
        ]
    );
    assert_eq!(deployments[2]["rollback"][1], "Succeeded", "{summary}");
    assert_eq!(deployments[1]["rollout"], "canary 20%, bake 5s");

    // The load generator's counts add up, phase by phase, and say what ran when.
    let phases = summary["phases"].as_array().unwrap();
    let names: Vec<&str> = phases
        .iter()
        .map(|p| p["phase"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "steady after v1",
            "v2 rollout",
            "steady after v2",
            "v3-broken rollout",
            "steady after v3-broken"
        ]
    );
    let count = |p: &serde_json::Value, k: &str| p[k].as_u64().unwrap();
    let models = |p: &serde_json::Value| -> Vec<String> {
        p["by_model"].as_object().unwrap().keys().cloned().collect()
    };
    for p in phases {
        let sum = |k: &str| -> u64 {
            p[k].as_object()
                .unwrap()
                .values()
                .map(|v| v.as_u64().unwrap())
                .sum()
        };
        assert_eq!(
            count(p, "requests"),
            count(p, "served") + count(p, "failed"),
            "{p}"
        );
        assert_eq!(sum("by_model"), count(p, "served"), "{p}");
        assert_eq!(sum("failures"), count(p, "failed"), "{p}");
        assert!(count(p, "served") > 0, "{p}");
    }
    assert_eq!(models(&phases[0]), ["v1"]);
    assert_eq!(models(&phases[2]), ["v2"]);
    assert_eq!(models(&phases[4]), ["v2"]);
    assert!(
        models(&phases[1]).contains(&"v2".to_string()),
        "{}",
        phases[1]
    );
    // Switched revisions: not one request failed, rollouts included.
    for p in phases {
        assert_eq!(count(p, "failed"), 0, "{p}");
    }

    // The kept fleet agrees: every host on v2, and its service answers with v2.
    let hosts = summary["hosts"].as_array().unwrap();
    assert_eq!(hosts.len(), 5);
    let peer = hosts[0]["addr"].as_str().unwrap().to_string();
    let operator = dir.join("operator");
    let listed = shoal()
        .args(["hosts", "--json", "--peer", &peer, "--identity"])
        .arg(&operator)
        .output()
        .unwrap();
    let listed = json(&listed, "shoal hosts on the kept fleet");
    let v2 = listed.as_array().unwrap()[0]["apps"]["inference"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(listed.as_array().unwrap().len(), 5);
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["apps"]["inference"] == v2.as_str() && h["state"] == "alive"),
        "{listed}"
    );
    for h in hosts {
        assert_eq!(h["revision"], "v2", "{h}");
        assert_eq!(h["serving"], "v2", "{h}");
    }
    // What it kept for the user: the bundles deploy by hand, with the kept identity.
    for name in ["v1", "v2", "v3-broken"] {
        assert!(dir.join(format!("bundles/{name}.tar.zst")).is_file());
    }
    let o = shoal()
        .args(["bundle", "check", "--json"])
        .arg(dir.join("bundles/v2.tar.zst"))
        .output()
        .unwrap();
    assert_eq!(json(&o, "bundle check")["id"], v2.as_str());

    // --stop stops every agent and service the demo started.
    let pids = started(&dir);
    // Five agents, five services, five switches; and the previous revision's services
    // still kept warm after v2, on the hosts v3-broken's canary did not take.
    assert!(
        (15..=20).contains(&pids.len()),
        "five agents, services and switches, and at most five kept warm: {pids:?}"
    );
    assert!(pids.iter().all(|p| running(*p)), "{pids:?}");
    // Given as a relative path, as a user types it.
    let o = shoal()
        .current_dir(tmp.path())
        .args(["demo", "--stop", "fleet"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait_for(
        "every process of the demo to end",
        Duration::from_secs(30),
        || pids.iter().all(|p| !running(*p)),
    );
    // And no connect redirect of theirs is left attached (where it can be listed).
    for home in agent_homes(&dir) {
        match redirect(&home).attached() {
            Ok(ids) => assert!(ids.is_empty(), "{}: a redirect is left", home.display()),
            Err(e) => assert!(
                std::env::var_os("SHOAL_CI").is_none(),
                "the redirects cannot be listed ({e}), and CI can"
            ),
        }
    }
}

fn agent_homes(dir: &Path) -> Vec<std::path::PathBuf> {
    (1..=5).map(|i| dir.join(format!("agent-{i}"))).collect()
}

/// The kernel's connect redirect of the example app of the agent in `home`.
fn redirect(home: &Path) -> shoal_agent::switch::kernel::Kernel {
    let dir = shoal_agent::lifecycle::state::AppDir::new(&home.join("data"), "inference");
    shoal_agent::switch::kernel::Kernel::of(&dir)
}
