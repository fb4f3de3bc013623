//! Fleet deployments with real `shoal agent` processes on 127.80.x.y, asked of one agent and
//! watched from another: AllAtOnce, HalfAtATime and OneAtATime over six hosts chosen by
//! tags run the batches `--dry-run` printed, never leave fewer hosts in service than the
//! minimum (as the hosts' own disks show it, sampled every few milliseconds), and put the
//! revision on every host; a host whose ValidateService fails fails
//! the deployment by the minimum-healthy rule and no batch starts after it; `deploy stop`
//! halts a deployment between batches. The revision's ValidateService hook is a real
//! compiled Wasm guest (`tests/guests/sandbox-probe`), which fails or sleeps as the
//! host's tags say.

#[path = "support/fleet.rs"]
mod fleet;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet::{
    Agent, Ca, agents, create, hosts, installed, json, revision, shoal, status, tag, wait_for,
};

const LONG: Duration = Duration::from_secs(90);

/// The batches a deployment ran, from its status: hosts grouped by the entry that started
/// them, in log order.
fn batches_run(view: &serde_json::Value) -> Vec<Vec<String>> {
    let mut by_fence: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for h in view["hosts"].as_array().unwrap() {
        if let Some(key) = h["batch"].as_u64() {
            by_fence
                .entry(key)
                .or_default()
                .push(h["name"].as_str().unwrap().to_string());
        }
    }
    by_fence.into_values().collect()
}

fn host_status(view: &serde_json::Value, name: &str) -> String {
    view["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == name)
        .map(|h| h["status"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

/// Samples the hosts themselves until `stop`: a host is out of service while its lifecycle
/// journal exists (from the first lifecycle event to the last). Returns the fewest hosts
/// seen in service at once, and how many samples were taken. Independent of the log and
/// of gossip: what the hosts' disks say.
fn observe(
    data_dirs: Vec<PathBuf>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(usize, usize, usize)> {
    std::thread::spawn(move || {
        let (mut fewest, mut most_out, mut samples) = (usize::MAX, 0, 0);
        while !stop.load(Ordering::SeqCst) {
            let out = data_dirs
                .iter()
                .filter(|d| d.join("apps/tiny/journal.json").exists())
                .count();
            fewest = fewest.min(data_dirs.len() - out);
            most_out = most_out.max(out);
            samples += 1;
            std::thread::sleep(Duration::from_millis(2));
        }
        (fewest, most_out, samples)
    })
}

#[test]
fn six_hosts_by_tags_take_each_configs_batches_watched_from_another_peer() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new(tmp.path(), "fleet");
    let mut fleet = agents(tmp.path(), &ca, [127, 80, 1], 7);
    for (i, a) in fleet.iter_mut().enumerate() {
        if i < 6 {
            tag(
                a,
                &[
                    ("role", "web"),
                    ("zone", if i % 2 == 0 { "a" } else { "b" }),
                    // ValidateService lasts a second: batches overlap what is sampled.
                    ("probe-sleep", "1"),
                ],
            );
        } else {
            tag(a, &[("role", "db")]);
        }
        a.start();
    }
    wait_for("agent-7 to see all seven alive", LONG, || {
        hosts(fleet[6].addr, &ca.operator)
            .is_ok_and(|l| l.len() == 7 && l.iter().all(|h| h["state"] == "alive"))
    });
    let mut previous: Option<String> = None;
    for (n, config) in ["AllAtOnce", "HalfAtATime", "OneAtATime"]
        .iter()
        .enumerate()
    {
        // The dry run and the deployment plan from what agent-7 hears: wait until it hears
        // that every host runs the previous revision, so both see the same fleet.
        if let Some(previous) = &previous {
            wait_for(
                "agent-7 to hear every host runs the last revision",
                LONG,
                || {
                    hosts(fleet[6].addr, &ca.operator).is_ok_and(|l| {
                        l.iter().filter(|h| h["tags"]["role"] == "web").all(|h| {
                            h["apps"]["tiny"] == previous.as_str()
                                && h["details"]["tiny"]["health"] != "deploying"
                        })
                    })
                },
            );
        }
        let bundle = revision(tmp.path(), &format!("v{}", n + 1));
        let args = ["--targets", "zone=a,zone=b;role=web", "--config", config];
        let plan = json(
            &create(
                &fleet[6],
                &ca.operator,
                &bundle,
                &[&args[..], &["--dry-run"]].concat(),
            ),
            "the dry run",
        );
        let planned: Vec<Vec<String>> = serde_json::from_value(plan["batches"].clone()).unwrap();
        let minimum = plan["rules"]["minimum"].as_u64().unwrap() as usize;

        // Created on agent-7 (not a target), watched from agent-1 (a target); the hosts'
        // disks are watched from before the creation.
        let stop = Arc::new(AtomicBool::new(false));
        let observer = observe(
            fleet[..6].iter().map(|a| a.data_dir.clone()).collect(),
            stop.clone(),
        );
        let o = create(&fleet[6], &ca.operator, &bundle, &args);
        let accepted = json(&o, "deploy create");
        let id = accepted["id"].as_str().unwrap().to_string();
        previous = Some(accepted["revision"].as_str().unwrap().to_string());
        assert_eq!(accepted["hosts"].as_array().unwrap().len(), 6, "{accepted}");
        assert!(accepted["coordinator"].is_string(), "{accepted}");
        let watched = shoal()
            .args(["deploy", "status", &id, "--watch", "--json", "--peer"])
            .arg(fleet[0].addr.to_string())
            .arg("--identity")
            .arg(&ca.operator)
            .output()
            .unwrap();
        stop.store(true, Ordering::SeqCst);
        let (fewest, most_out, samples) = observer.join().unwrap();
        let view = json(&watched, "deploy status --watch");
        assert_eq!(view["status"], "Succeeded", "{config}: {view}");
        assert_eq!(
            batches_run(&view),
            planned,
            "{config}: the batches run are the plan's"
        );
        assert!(
            samples > 100,
            "{config}: the observer sampled {samples} times"
        );
        assert!(
            fewest >= minimum,
            "{config}: {fewest} healthy hosts seen, below the minimum of {minimum}"
        );
        // The observer saw deployments happen: at most a batch at once, and at least one.
        let largest = planned.iter().map(Vec::len).max().unwrap();
        assert!(
            (1..=largest).contains(&most_out),
            "{config}: {most_out} hosts out of service at once; batches of at most {largest}"
        );
        for h in view["hosts"].as_array().unwrap() {
            let events: Vec<&str> = h["events"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["status"] == "Succeeded")
                .map(|e| e["name"].as_str().unwrap())
                .collect();
            assert!(
                events.contains(&"DownloadBundle") && events.contains(&"ValidateService"),
                "{config}: {h}"
            );
        }
        for a in &fleet[..6] {
            assert_eq!(
                installed(a).as_deref(),
                Some(format!("v{}", n + 1).as_str())
            );
        }
        assert_eq!(installed(&fleet[6]), None, "agent-7 is not a target");
    }
    // The group remembers its targets, config and last successful revision, from any peer.
    let groups = json(
        &shoal()
            .args(["group", "list", "--json", "--peer"])
            .arg(fleet[2].addr.to_string())
            .arg("--identity")
            .arg(&ca.operator)
            .output()
            .unwrap(),
        "group list",
    );
    assert_eq!(groups[0]["name"], "tiny", "{groups}");
    assert_eq!(groups[0]["config"], "OneAtATime", "{groups}");
    assert_eq!(groups[0]["deployments"], 3, "{groups}");
    let list = json(
        &shoal()
            .args(["deploy", "list", "--json", "--app", "tiny", "--peer"])
            .arg(fleet[4].addr.to_string())
            .arg("--identity")
            .arg(&ca.operator)
            .output()
            .unwrap(),
        "deploy list",
    );
    assert_eq!(list.as_array().unwrap().len(), 3, "{list}");
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .all(|d| d["status"] == "Succeeded")
    );
}

#[test]
fn a_failing_host_fails_the_deployment_and_a_stop_halts_between_batches() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new(tmp.path(), "fleet");
    let mut fleet = agents(tmp.path(), &ca, [127, 80, 2], 6);
    for (i, a) in fleet.iter_mut().enumerate() {
        let name = format!("agent-{}", i + 1);
        let mut tags = vec![
            ("role", "web"),
            ("host", name.as_str()),
            ("probe-sleep", "1"),
        ];
        if i == 1 {
            tags.push(("probe-fail", "ValidateService"));
        }
        tag(a, &tags);
        // What each agent sends of bundles is logged: the test counts the uploader's bytes.
        a.log_filter = "info,shoal_agent::blobs=debug".into();
        a.start();
    }
    wait_for("agent-6 to see all six alive", LONG, || {
        hosts(fleet[5].addr, &ca.operator)
            .is_ok_and(|l| l.len() == 6 && l.iter().all(|h| h["state"] == "alive"))
    });

    // OneAtATime keeps 5 of 6 healthy: agent-2 failing leaves no room for another batch.
    let bundle = revision(tmp.path(), "v1");
    let o = create(
        &fleet[5],
        &ca.operator,
        &bundle,
        &["--targets", "role=web", "--config", "OneAtATime", "--wait"],
    );
    assert!(!o.status.success(), "a failed deployment exits non-zero");
    let view: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(view["status"], "Failed", "{view}");
    assert!(
        view["reason"].as_str().unwrap().contains("minimum of 5"),
        "{view}"
    );
    assert_eq!(host_status(&view, "agent-1"), "Succeeded", "{view}");
    assert_eq!(host_status(&view, "agent-2"), "Failed", "{view}");
    let failed = view["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == "agent-2")
        .unwrap();
    assert!(
        failed["log_tail"].as_array().unwrap().iter().any(|l| l
            .as_str()
            .unwrap()
            .contains("tagged to fail at ValidateService")),
        "the hook's own words reach the operator: {failed}"
    );
    for name in ["agent-3", "agent-4", "agent-5", "agent-6"] {
        assert_eq!(host_status(&view, name), "Skipped", "{name}: {view}");
    }
    assert!(String::from_utf8_lossy(&o.stderr).contains("Failed"));
    // agent-2 rolled back to nothing; the skipped hosts were never touched.
    for a in &fleet[2..] {
        assert_eq!(installed(a), None, "{} was skipped", a.name);
    }
    assert_eq!(installed(&fleet[0]).as_deref(), Some("v1"));

    // A stop between batches: hosts other than agent-2, one at a time, a second each.
    let before: Vec<Option<String>> = fleet.iter().map(installed).collect();
    let bundle = revision(tmp.path(), "v2");
    let accepted = json(
        &create(
            &fleet[0],
            &ca.operator,
            &bundle,
            &[
                "--targets",
                "host=agent-1,host=agent-3,host=agent-4,host=agent-5,host=agent-6",
                "--group",
                "healthy",
                "--config",
                "OneAtATime",
            ],
        ),
        "deploy create",
    );
    let id = accepted["id"].as_str().unwrap().to_string();
    let started = Mutex::new(0);
    let mut live = None;
    wait_for("the first host to succeed", LONG, || {
        status(&fleet[3], &ca.operator, &id).is_ok_and(|v| {
            // Live progress: the event a running host is in.
            for h in v["hosts"].as_array().unwrap() {
                if h["status"] == "InProgress"
                    && let Some(e) = h["events"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|e| e["status"] == "InProgress")
                {
                    live = Some(format!("{} {}", h["name"], e["name"]));
                }
            }
            let done = v["hosts"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|h| h["status"] == "Succeeded")
                .count();
            *started.lock().unwrap() = done;
            done >= 1
        })
    });
    assert!(
        live.as_deref()
            .is_some_and(|l| l.contains("ValidateService")),
        "a running host's current event was shown: {live:?}"
    );
    let o = shoal()
        .args(["deploy", "stop", &id, "--json", "--peer"])
        .arg(fleet[4].addr.to_string())
        .arg("--identity")
        .arg(&ca.operator)
        .output()
        .unwrap();
    let stopped = json(&o, "deploy stop");
    assert_eq!(stopped["status"], "Stopped", "{stopped}");
    let mut last = serde_json::Value::Null;
    wait_for("no host in flight any more", LONG, || {
        status(&fleet[2], &ca.operator, &id).is_ok_and(|v| {
            let busy = v["hosts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|h| h["status"] == "InProgress");
            last = v;
            !busy
        })
    });
    assert_eq!(last["status"], "Stopped", "{last}");
    let skipped: Vec<&str> = last["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["status"] == "Skipped")
        .map(|h| h["name"].as_str().unwrap())
        .collect();
    assert!(
        !skipped.is_empty(),
        "the stop came before the last batch: {last}"
    );
    for (a, before) in fleet.iter().zip(&before) {
        if skipped.contains(&a.name.as_str()) {
            assert_eq!(installed(a), *before, "{} was skipped but changed", a.name);
        }
    }
    // A bundle of 1 MiB of noise, uploaded to agent-6, one host at a time (a second each,
    // the probe's sleep, time enough for gossip to say who holds it): the uploader is asked
    // only for chunks no other host holds, so it sends the revision about once in all.
    let noise = revision(tmp.path(), "noise");
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let bytes: Vec<u8> = (0..1u32 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    std::fs::write(noise.join("payload.txt"), &bytes).unwrap();
    let packed = tmp.path().join("noise.tar.zst");
    let o = shoal()
        .args(["bundle", "create"])
        .arg(&noise)
        .arg("-o")
        .arg(&packed)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let size = std::fs::metadata(&packed).unwrap().len();
    assert!(size > 512 * 1024, "the noise does not compress: {size}");
    let o = create(
        &fleet[5],
        &ca.operator,
        &packed,
        &[
            "--targets",
            "host=agent-1,host=agent-3,host=agent-4,host=agent-5",
            "--group",
            "noise",
            "--config",
            "OneAtATime",
            "--wait",
        ],
    );
    let view = json(&o, "the noise deployment");
    assert_eq!(view["status"], "Succeeded", "{view}");
    // Each host says, in its log, how many bytes of chunks it fetched from which peer:
    // `from={"agent-6": 1049000, ...}`.
    let revision_id = view["revision"].as_str().unwrap().to_string();
    let from_of = |a: &Agent| -> BTreeMap<String, u64> {
        let log = std::fs::read_to_string(&a.log).unwrap();
        let Some(line) = log
            .lines()
            .find(|l| l.contains("fetched a revision as chunks") && l.contains(&revision_id))
        else {
            return BTreeMap::new();
        };
        let map = line
            .split("from={")
            .nth(1)
            .unwrap_or("")
            .split('}')
            .next()
            .unwrap_or("");
        map.split(", ")
            .filter_map(|kv| {
                let (k, v) = kv.split_once(": ")?;
                Some((k.trim_matches('"').to_string(), v.parse().ok()?))
            })
            .collect()
    };
    let targets = ["agent-1", "agent-3", "agent-4", "agent-5"];
    let fetched: Vec<(String, BTreeMap<String, u64>)> = fleet
        .iter()
        .filter(|a| targets.contains(&a.name.as_str()))
        .map(|a| (a.name.clone(), from_of(a)))
        .collect();
    assert!(
        fetched.iter().all(|(_, from)| !from.is_empty()),
        "each of the four hosts fetched it: {fetched:?}"
    );
    let revision_bytes = view["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|h| h["transfer"]["fetched_bytes"].as_u64())
        .max()
        .unwrap();
    assert!(revision_bytes >= 1 << 20, "{revision_bytes}");
    let uploader: u64 = fetched
        .iter()
        .filter_map(|(_, from)| from.get("agent-6"))
        .sum();
    assert!(
        uploader <= revision_bytes,
        "the uploader sent {uploader} bytes for four hosts of a revision of {revision_bytes}: \
         {fetched:?}"
    );
    let peers: std::collections::BTreeSet<&String> =
        fetched.iter().flat_map(|(_, from)| from.keys()).collect();
    assert!(
        peers.len() > 1,
        "more than one peer served the revision: {fetched:?}"
    );

    // An agent's identity cannot stop a deployment: the CLI refuses to sign with it.
    let agent_identity = tmp.path().join("agent-1").join("identity");
    let o = shoal()
        .args(["deploy", "stop", &id, "--peer"])
        .arg(fleet[0].addr.to_string())
        .arg("--identity")
        .arg(&agent_identity)
        .output()
        .unwrap();
    assert!(!o.status.success());
}
