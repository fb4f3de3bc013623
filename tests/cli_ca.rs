//! `shoal ca init` and `shoal ca issue` with the real binary.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn shoal(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn init_then_issue_an_agent_and_an_operator() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca");
    let ca = ca.to_str().unwrap();
    let o = shoal(&["ca", "init", "--dir", ca]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&tmp.path().join("ca/ca.key")), 0o600);

    for (name, extra) in [("edge-1", None), ("alice", Some("--operator"))] {
        let out = tmp.path().join(name);
        let mut args = vec![
            "ca",
            "issue",
            "--dir",
            ca,
            "--name",
            name,
            "--out",
            out.to_str().unwrap(),
            "--json",
        ];
        args.extend(extra);
        let o = shoal(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(
            v["role"],
            if extra.is_some() { "operator" } else { "agent" }
        );
        for f in ["ca.pem", "cert.pem", "key.pem"] {
            assert!(out.join(f).is_file(), "{f}");
        }
        assert_eq!(mode(&out.join("key.pem")), 0o600);
    }

    let o = shoal(&["ca", "init", "--dir", ca]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already holds a fleet CA"));
    let o = shoal(&[
        "ca",
        "issue",
        "--dir",
        "/nonexistent",
        "--name",
        "x",
        "--out",
        tmp.path().join("x").to_str().unwrap(),
    ]);
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("reading the fleet CA certificate /nonexistent/ca.pem")
    );
}
