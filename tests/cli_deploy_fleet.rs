//! Fleet deployments with real `shoal agent` processes on 127.0.0.x. For now the plan:
//! `shoal deploy create --dry-run`, asked of one agent, picks six hosts' targets by tag
//! groups and prints CodeDeploy's batches in CodeDeploy's order (a host already on the
//! revision last), for each predefined configuration, and changes nothing; targets that
//! match no host and a bundle that cannot deploy are refused with a reason.

#[path = "support/fleet.rs"]
mod fleet;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use fleet::{Agent, Ca, agents, deploy_tiny, hosts, shoal, tag, wait_for};

const LONG: Duration = Duration::from_secs(60);

fn create(peer: &Agent, operator: &Path, bundle: &Path, extra: &[&str]) -> Output {
    shoal()
        .args(["deploy", "create", "--app", "tiny", "--dry-run", "--peer"])
        .arg(peer.addr.to_string())
        .arg("--identity")
        .arg(operator)
        .arg("--bundle")
        .arg(bundle)
        .args(extra)
        .output()
        .unwrap()
}

fn plan(o: &Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "deploy create --dry-run failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

fn batches(plan: &serde_json::Value) -> Vec<Vec<String>> {
    serde_json::from_value(plan["batches"].clone()).unwrap()
}

#[test]
fn a_dry_run_plans_codedeploy_batches_over_hosts_chosen_by_tags() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new(tmp.path(), "fleet");
    let mut fleet = agents(tmp.path(), &ca, [127, 79, 1], 8);
    // Six web hosts (four in prod, two in staging) and two databases.
    let tags: [&[(&str, &str)]; 8] = [
        &[("role", "web"), ("env", "prod")],
        &[("role", "web"), ("env", "prod")],
        &[("role", "web"), ("env", "prod")],
        &[("role", "web"), ("env", "prod")],
        &[("role", "api"), ("env", "staging")],
        &[("role", "web"), ("env", "staging")],
        &[("role", "db"), ("env", "prod")],
        &[("role", "db"), ("env", "staging")],
    ];
    for (a, t) in fleet.iter_mut().zip(tags) {
        tag(a, t);
        a.start();
    }
    // The revision to deploy is already on agent-2 (it goes last), an older one on agent-3.
    let bundle = {
        let rev = deploy_tiny(&fleet[1], "tiny", "v2");
        deploy_tiny(&fleet[2], "tiny", "v1");
        let dir = fleet[1].data_dir.with_file_name("rev-tiny-v2");
        (dir, rev)
    };
    wait_for("agent-8 to see all eight, and both revisions", LONG, || {
        hosts(fleet[7].addr, &ca.operator).is_ok_and(|l| {
            l.len() == 8
                && l.iter().all(|h| h["state"] == "alive")
                && l[1]["apps"]["tiny"] == bundle.1.as_str()
                && l[2]["apps"]["tiny"].is_string()
        })
    });
    let before: Vec<serde_json::Value> = hosts(fleet[7].addr, &ca.operator).unwrap();

    // Asked of agent-8 (a database host): web or api hosts, in prod or staging: six.
    let web = [
        "--targets",
        "role=web,role=api;env=prod,env=staging",
        "--json",
    ];
    let all_at_once = plan(&create(
        &fleet[7],
        &ca.operator,
        &bundle.0,
        &[&web[..], &["--config", "AllAtOnce"]].concat(),
    ));
    assert_eq!(all_at_once["revision"], bundle.1.as_str());
    assert_eq!(all_at_once["hosts"].as_array().unwrap().len(), 6);
    assert_eq!(batches(&all_at_once).len(), 1);

    // One at a time: unknown revision first (by name), then the old one, then the current.
    let one = plan(&create(
        &fleet[7],
        &ca.operator,
        &bundle.0,
        &[&web[..], &["--config", "OneAtATime"]].concat(),
    ));
    assert_eq!(
        batches(&one),
        [
            "agent-1", "agent-4", "agent-5", "agent-6", "agent-3", "agent-2"
        ]
        .map(|n| vec![n.to_string()])
    );
    // Half at a time: three, then three.
    let half = plan(&create(
        &fleet[7],
        &ca.operator,
        &bundle.0,
        &[&web[..], &["--config", "HalfAtATime"]].concat(),
    ));
    assert_eq!(
        batches(&half),
        vec![
            vec!["agent-1", "agent-4", "agent-5"],
            vec!["agent-6", "agent-3", "agent-2"]
        ]
    );
    // A minimum of 4 healthy of 6 (67 %, rounded up to 5 if given as a percentage).
    let min4 = plan(&create(
        &fleet[7],
        &ca.operator,
        &bundle.0,
        &[&web[..], &["--min-healthy", "4"]].concat(),
    ));
    assert_eq!(batches(&min4).len(), 3);
    let pct = plan(&create(
        &fleet[7],
        &ca.operator,
        &bundle.0,
        &[&web[..], &["--min-healthy", "67%"]].concat(),
    ));
    assert_eq!(pct["rules"]["minimum"], 5);
    assert_eq!(batches(&pct).len(), 6);
    // Only prod web hosts (the tag groups are ANDed), as text.
    let o = create(
        &fleet[0],
        &ca.operator,
        &bundle.0,
        &["--targets", "role=web;env=prod", "--config", "HalfAtATime"],
    );
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        text.contains("batch 1: agent-1 (no revision), agent-4 (no revision)"),
        "{text}"
    );
    assert!(text.contains("batch 2: agent-3"), "{text}");
    assert!(text.contains("nothing was changed"), "{text}");

    // Refused, with a reason: targets that match nothing, a minimum that cannot hold, a
    // malformed target, and a bundle that cannot deploy.
    let refused = |extra: &[&str], bundle: &Path, why: &str| {
        let o = create(&fleet[7], &ca.operator, bundle, extra);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{extra:?} was accepted");
        assert!(err.contains(why), "{extra:?}: {err}");
    };
    refused(&["--targets", "role=cache"], &bundle.0, "no host");
    refused(
        &["--targets", "role=web", "--min-healthy", "6"],
        &bundle.0,
        "minimum of 6",
    );
    refused(&["--targets", "role"], &bundle.0, "role");
    let broken = tmp.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(
        broken.join("appspec.yml"),
        "version: 0.0\nos: linux\nfiles: [\n",
    )
    .unwrap();
    refused(&["--targets", "role=web"], &broken, "appspec.yml");
    std::fs::write(
        broken.join("appspec.yml"),
        "version: 0.0\nos: linux\nhooks:\n  ValidateService:\n    - location: hooks/gone.wasm\n",
    )
    .unwrap();
    refused(
        &["--targets", "role=web"],
        &broken,
        "line 5: hook hooks/gone.wasm is not a file",
    );

    // A dry run changes nothing.
    let after = hosts(fleet[7].addr, &ca.operator).unwrap();
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(b["apps"], a["apps"], "{}", b["name"]);
    }
}
