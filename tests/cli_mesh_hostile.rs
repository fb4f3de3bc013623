//! The mesh against the people it must keep out, with real `shoal agent` processes on
//! 127.77.x addresses: a certificate revoked while the fleet runs is cut off everywhere
//! within seconds and cannot come back; a revoked operator can ask nothing.

#[path = "support/fleet.rs"]
mod fleet;

use std::path::Path;
use std::time::{Duration, Instant};

use fleet::{Ca, agents, hosts, shoal, state_of, wait_for};

const LONG: Duration = Duration::from_secs(30);

fn run(cmd: &mut std::process::Command) -> std::process::Output {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// Revokes `name` with the fleet CA and publishes the list through `peer`.
fn revoke_and_publish(ca: &Ca, name: &str, peer: std::net::SocketAddr) -> Instant {
    run(shoal()
        .args(["ca", "revoke", "--name", name, "--dir"])
        .arg(&ca.dir));
    let published = Instant::now();
    let o = run(shoal()
        .args([
            "ca",
            "publish-revocations",
            "--json",
            "--peer",
            &peer.to_string(),
        ])
        .arg(ca.dir.join("revocations.crl"))
        .arg("--identity")
        .arg(&ca.operator));
    let answer: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(answer["number"].as_u64().unwrap() >= 1, "{answer}");
    published
}

fn state_at(peer: std::net::SocketAddr, operator: &Path, name: &str) -> Option<String> {
    hosts(peer, operator)
        .ok()
        .and_then(|list| state_of(&list, name))
}

#[test]
fn a_revoked_agent_is_cut_off_everywhere_and_a_revoked_operator_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new(tmp.path(), "fleet");
    let mut fleet = agents(tmp.path(), &ca, [127, 77, 3], 4);
    for a in fleet.iter_mut() {
        a.start();
    }
    wait_for("four agents to see each other alive", LONG, || {
        fleet.iter().all(|a| {
            hosts(a.addr, &ca.operator)
                .is_ok_and(|l| l.len() == 4 && l.iter().all(|h| h["state"] == "alive"))
        })
    });

    // agent-4's certificate is revoked; the list goes to agent-1 alone.
    let victim = fleet[3].name.clone();
    let published = revoke_and_publish(&ca, &victim, fleet[0].addr);
    let cut_off = wait_for("every member to cut the revoked agent off", LONG, || {
        fleet[..3]
            .iter()
            .all(|a| state_at(a.addr, &ca.operator, &victim).as_deref() == Some("dead"))
    });
    let took = published.elapsed();
    eprintln!(
        "the revoked agent was dead to every member {took:?} after publishing ({cut_off:?} of polling)"
    );
    assert!(took <= Duration::from_secs(5), "cut off after {took:?}");
    for a in &fleet[..3] {
        assert!(
            a.log_text().contains("a new revocation list is in force"),
            "{} enforces the list:\n{}",
            a.name,
            a.log_text()
        );
    }

    // Restarted, it still cannot rejoin: every handshake it tries is refused.
    fleet[3].kill();
    let log_before = fleet[3].log_text().len();
    fleet[3].start();
    wait_for("the restarted agent to be refused", LONG, || {
        fleet[3].log_text()[log_before..].contains("refused to join a peer")
    });
    for a in &fleet[..3] {
        assert_eq!(
            state_at(a.addr, &ca.operator, &victim).as_deref(),
            Some("dead"),
            "{} keeps it out",
            a.name
        );
    }
    // The list survives a restart of a member.
    fleet[1].kill();
    fleet[1].start();
    wait_for("the restarted member to come back", LONG, || {
        state_at(fleet[0].addr, &ca.operator, &fleet[1].name).as_deref() == Some("alive")
    });
    assert_eq!(
        state_at(fleet[1].addr, &ca.operator, &victim).as_deref(),
        Some("dead")
    );

    // A second operator is revoked: its questions are refused, with the reason.
    let mallory = tmp.path().join("mallory");
    run(shoal()
        .args(["ca", "issue", "--operator", "--name", "mallory", "--dir"])
        .arg(&ca.dir)
        .arg("--out")
        .arg(&mallory));
    assert!(hosts(fleet[2].addr, &mallory).is_ok(), "before revocation");
    revoke_and_publish(&ca, "mallory", fleet[1].addr);
    wait_for("the revoked operator to be refused", LONG, || {
        hosts(fleet[2].addr, &mallory).is_err_and(|e| e.contains("revoked"))
    });
    let err = hosts(fleet[0].addr, &mallory).unwrap_err();
    assert!(err.contains("has been revoked by the fleet CA"), "{err}");

    // A list not signed by the fleet CA is refused.
    let other = Ca::new(tmp.path(), "other");
    run(shoal()
        .args(["ca", "issue", "--name", "x", "--dir"])
        .arg(&other.dir)
        .arg("--out")
        .arg(tmp.path().join("x")));
    run(shoal()
        .args(["ca", "revoke", "--name", "x", "--dir"])
        .arg(&other.dir));
    let o = shoal()
        .args([
            "ca",
            "publish-revocations",
            "--peer",
            &fleet[0].addr.to_string(),
        ])
        .arg(other.dir.join("revocations.crl"))
        .arg("--identity")
        .arg(&ca.operator)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not signed by this fleet's CA"), "{err}");
}
