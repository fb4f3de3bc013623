//! What an operator's Prometheus and log pipeline see, with real agents on 127.87.1.x:
//! `/metrics` parsed by a real Prometheus text parser moves by exactly what one fleet
//! deployment did (a hook run, a deployment and the bundle's bytes on each host), the log
//! says who leads, the mesh's traffic is counted, and `SHOAL_LOG_FORMAT=json` gives one
//! JSON object per line carrying the deployment's spans.

#[path = "support/fleet.rs"]
mod fleet;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use fleet::{Agent, Ca, agents, create, hosts, json, revision, shoal, wait_for};

const LONG: Duration = Duration::from_secs(60);

/// The agent's metrics address: its own IP, port 9464.
fn metrics_addr(agent: &Agent) -> SocketAddr {
    SocketAddr::new(agent.addr.ip(), 9464)
}

/// Adds `metrics = ADDR` to the agent's config (a top-level key: before `[tags]`).
fn with_metrics(agent: &Agent) {
    let text = std::fs::read_to_string(&agent.config).unwrap();
    let text = text.replacen(
        "[tags]",
        &format!("metrics = \"{}\"\n[tags]", metrics_addr(agent)),
        1,
    );
    std::fs::write(&agent.config, text).unwrap();
}

/// `GET path` of the agent's metrics listener: (status line, body).
fn get(agent: &Agent, path: &str) -> Result<(String, String), String> {
    let mut stream = std::net::TcpStream::connect_timeout(&metrics_addr(agent), LONG)
        .map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(LONG)).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: shoal\r\n\r\n").map_err(|e| e.to_string())?;
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no head")?;
    Ok((
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    ))
}

/// The agent's metrics, parsed: sample name and labels (sorted `k=v`, comma-joined) →
/// value.
fn scrape(agent: &Agent) -> BTreeMap<String, f64> {
    let (status, body) = get(agent, "/metrics").unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK");
    let lines = body.lines().map(|l| Ok(l.to_string()));
    let parsed = prometheus_parse::Scrape::parse(lines).expect("Prometheus text");
    parsed
        .samples
        .into_iter()
        .filter_map(|s| {
            let value = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => return None,
            };
            let mut labels: Vec<String> =
                s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            labels.sort();
            Some((format!("{}{{{}}}", s.metric, labels.join(",")), value))
        })
        .collect()
}

fn at(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    m.get(key).copied().unwrap_or(0.0)
}

#[test]
fn metrics_move_by_exactly_one_deployment_and_json_logs_carry_its_spans() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new(tmp.path(), "fleet");
    let mut fleet = agents(tmp.path(), &ca, [127, 87, 1], 2);
    for a in fleet.iter_mut() {
        with_metrics(a);
        a.env = vec![("SHOAL_LOG_FORMAT".into(), "json".into())];
        a.start();
    }
    wait_for("both agents alive, and their metrics served", LONG, || {
        hosts(fleet[0].addr, &ca.operator)
            .is_ok_and(|l| l.len() == 2 && l.iter().all(|h| h["state"] == "alive"))
            && fleet.iter().all(|a| get(a, "/metrics").is_ok())
    });
    // Only GET /metrics.
    assert_eq!(get(&fleet[0], "/").unwrap().0, "HTTP/1.1 404 Not Found");
    let before: Vec<_> = fleet.iter().map(scrape).collect();

    // One deployment of a revision with one ValidateService hook, to both, uploaded to
    // agent-1: agent-2 fetches it from agent-1.
    let o = create(
        &fleet[0],
        &ca.operator,
        &revision(tmp.path(), "v1"),
        &[
            "--targets",
            "role=inference",
            "--config",
            "AllAtOnce",
            "--wait",
        ],
    );
    let view = json(&o, "the deployment");
    assert_eq!(view["status"], "Succeeded", "{view}");
    let id = view["id"].as_str().unwrap().to_string();

    let hook = "shoal_hook_duration_seconds_count{event=ValidateService,outcome=succeeded}";
    let deployed = "shoal_host_deployments_total{outcome=succeeded}";
    let mut after = Vec::new();
    wait_for("both to count the deployment's log entry", LONG, || {
        after = fleet.iter().map(scrape).collect();
        after
            .iter()
            .map(|m| at(m, "shoal_deployments{status=Succeeded}"))
            .sum::<f64>()
            >= 1.0
    });
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        assert_eq!(at(a, hook) - at(b, hook), 1.0, "agent-{}: {a:?}", i + 1);
        assert_eq!(at(a, deployed) - at(b, deployed), 1.0, "agent-{}", i + 1);
        // Its one hook, loaded once on each (compiled, or found compiled already).
        let loads = |m: &BTreeMap<String, f64>| -> f64 {
            m.iter()
                .filter(|(k, _)| k.starts_with("shoal_hook_loads_total{"))
                .map(|(_, v)| v)
                .sum()
        };
        assert_eq!(loads(a) - loads(b), 1.0, "agent-{}: {a:?}", i + 1);
        assert_eq!(
            at(a, "shoal_mesh_members{state=alive}"),
            2.0,
            "agent-{}",
            i + 1
        );
        // Two members talk: membership packets and gossip both ways.
        for key in [
            "shoal_swim_packets_total{direction=received}",
            "shoal_swim_packets_total{direction=sent}",
            "shoal_gossip_messages_total{direction=received}",
            "shoal_gossip_messages_total{direction=sent}",
        ] {
            assert!(at(a, key) > 0.0, "agent-{}: {key}", i + 1);
        }
        assert!(at(a, "shoal_mesh_connections{}") >= 1.0, "agent-{}", i + 1);
    }
    let received = at(&after[1], "shoal_bundle_bytes_total{direction=received}")
        - at(&before[1], "shoal_bundle_bytes_total{direction=received}");
    let sent = at(&after[0], "shoal_bundle_bytes_total{direction=sent}")
        - at(&before[0], "shoal_bundle_bytes_total{direction=sent}");
    assert!(received > 0.0, "{:?}", after[1]);
    assert_eq!(received, sent, "what agent-1 sent is what agent-2 received");
    // One leader; it holds the deployment, Succeeded, and nothing else.
    let leaders: Vec<usize> = (0..2)
        .filter(|&i| at(&after[i], "shoal_raft_leader{}") == 1.0)
        .collect();
    assert_eq!(leaders.len(), 1, "{after:?}");
    let leader = &after[leaders[0]];
    assert_eq!(at(leader, "shoal_deployments{status=Succeeded}"), 1.0);
    assert_eq!(at(leader, "shoal_deployments{status=Failed}"), 0.0);
    assert!(leader.contains_key("shoal_deployments{status=Failed}"));
    assert!(at(leader, "shoal_raft_term{}") >= 1.0);
    assert_eq!(at(leader, "shoal_raft_voter{}"), 1.0);

    // The agent's log: JSON lines, the deployment's id in the spans of its hook's lines.
    let log = fleet[1].log_text();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .all(|l| l["level"].is_string() && l["fields"].is_object())
    );
    assert!(
        lines
            .iter()
            .any(|l| l["spans"].as_array().is_some_and(|spans| {
                spans.iter().any(|s| s["deployment"] == id.as_str())
                    && spans
                        .iter()
                        .any(|s| s["name"] == "deploy" && s["app"] == "tiny")
            })),
        "no line in the span of deployment {id}:\n{log}"
    );

    // A second agent cannot take a metrics address that is in use: it says so, and stops.
    let mut third = fleet::Agent::new(
        tmp.path(),
        &ca,
        "agent-3",
        "127.87.1.3:7400".parse().unwrap(),
        &[fleet[0].addr],
    );
    third.addr = fleet[0].addr;
    with_metrics(&third);
    let o = shoal()
        .args(["agent", "--config"])
        .arg(&third.config)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("cannot listen there"), "{stderr}");
}
