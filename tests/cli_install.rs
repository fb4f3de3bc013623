//! Installing Shoal on hosts: `shoal init` (an identity issued from the CA or copied from
//! `shoal ca issue`'s output; an operator's identity, another host's, an existing config
//! and an address nobody can reach are refused, with nothing written), the written config
//! loading with the agent's own loader; `packaging/install.sh` into a scratch root, twice,
//! without calling systemctl; the systemd unit through `systemd-analyze verify`; and
//! docs/install.md followed step by step: three hosts from nothing (scratch roots standing
//! in for them, real agents on 127.86.1.1-3) form a fleet an operator lists and deploys to.

#[path = "support/fleet.rs"]
mod fleet;

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use fleet::{Ca, hosts, shoal, state_of, wait_for};
use shoal_agent::config::AgentConfig;
use shoal_agent::identity::{Identity, Role};

/// The repository's root.
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok_json(o: &Output, what: &str) -> serde_json::Value {
    assert!(o.status.success(), "{what} failed: {}", stderr(o));
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{what}: {e}: {}", String::from_utf8_lossy(&o.stdout)))
}

/// `shoal init` for a host laid out under `home` (`etc/agent.toml`, `data`, `root`), with
/// `args` besides.
fn init(home: &Path, args: &[&OsStr]) -> Output {
    init_cmd(home, args).output().unwrap()
}

fn init_cmd(home: &Path, args: &[&OsStr]) -> Command {
    let mut cmd = shoal();
    cmd.args(["init", "--json", "--config"])
        .arg(home.join("etc/agent.toml"))
        .arg("--data-dir")
        .arg(home.join("data"))
        .arg("--install-root")
        .arg(home.join("root"))
        .args(args);
    cmd
}

fn os<'a>(args: &'a [&'a str]) -> Vec<&'a OsStr> {
    args.iter().map(OsStr::new).collect()
}

/// `shoal init` refused: exit 1, an error that says `why`, and nothing under `home`.
fn refused(o: &Output, home: &Path, why: &[&str]) {
    assert!(!o.status.success(), "should have been refused");
    let err = stderr(o);
    for w in why {
        assert!(err.contains(w), "the error should say {w:?}: {err}");
    }
    assert!(
        !home.exists(),
        "a refused init wrote {}: {err}",
        home.display()
    );
}

#[test]
fn init_writes_a_host_that_loads_and_refuses_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new(tmp.path(), "fleet");

    // --ca-dir: the identity issued here, from the CA.
    let h1 = tmp.path().join("h1");
    let mut args = vec![
        OsStr::new("--name"),
        OsStr::new("edge-1"),
        "--ca-dir".as_ref(),
    ];
    args.push(ca.dir.as_os_str());
    args.extend(os(&[
        "--listen",
        "127.86.2.1:7400",
        "--seed",
        "127.86.2.2",
        "--tag",
        "role=web",
        "--tag",
        "az=a",
    ]));
    // An operator's SHOAL_IDENTITY in the environment is not taken for this host's.
    let o = init_cmd(&h1, &args)
        .env("SHOAL_IDENTITY", &ca.operator)
        .output()
        .unwrap();
    let v = ok_json(&o, "init --ca-dir");
    let config = h1.join("etc/agent.toml");
    assert_eq!(v["config"], config.to_str().unwrap());
    assert_eq!(v["identity"], h1.join("etc/identity").to_str().unwrap());
    assert_eq!(v["data_dir"], h1.join("data").to_str().unwrap());
    assert_eq!(v["name"], "edge-1");
    assert_eq!(v["listen"], "127.86.2.1:7400");
    assert_eq!(v["seeds"], serde_json::json!(["127.86.2.2:7400"]));
    assert_eq!(v["tags"], serde_json::json!({"role": "web", "az": "a"}));
    // The agent's own loader reads what was asked for.
    let c = AgentConfig::load(&config).unwrap();
    assert_eq!(c.name, "edge-1");
    assert_eq!(c.listen, "127.86.2.1:7400".parse().unwrap());
    assert_eq!(c.advertised_addr().unwrap(), c.listen);
    assert_eq!(c.seeds, vec!["127.86.2.2:7400".parse().unwrap()]);
    assert_eq!(
        (c.tags["role"].as_str(), c.tags["az"].as_str()),
        ("web", "a")
    );
    assert_eq!(c.data_dir, h1.join("data"));
    assert_eq!(c.install_root, h1.join("root"));
    assert_eq!(
        c.identity.as_deref(),
        Some(h1.join("etc/identity").as_path())
    );
    let id = Identity::load(&h1.join("etc/identity")).unwrap();
    assert_eq!((id.name.as_str(), id.role), ("edge-1", Role::Agent));
    for (path, m) in [
        ("etc", 0o700),
        ("etc/identity", 0o700),
        ("etc/identity/key.pem", 0o600),
        ("etc/agent.toml", 0o600),
        ("data", 0o700),
    ] {
        assert_eq!(mode(&h1.join(path)), m, "{path}");
    }
    assert!(h1.join("root").is_dir());
    let names: Vec<_> = std::fs::read_dir(h1.join("etc"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "no staging left behind: {names:?}");

    // --identity: one `shoal ca issue` wrote, checked and copied.
    let edge2 = tmp.path().join("edge-2-identity");
    ca.issue("edge-2", &edge2);

    // A config directory others may write to: the root agent would trust what they put
    // there. Refused, and no identity written into it.
    let open = tmp.path().join("open");
    std::fs::create_dir_all(open.join("etc")).unwrap();
    std::fs::set_permissions(open.join("etc"), std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut args = os(&[
        "--name",
        "edge-2",
        "--advertise",
        "127.86.2.2",
        "--identity",
    ]);
    args.push(edge2.as_os_str());
    let o = init(&open, &args);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("others may write to it"),
        "{}",
        stderr(&o)
    );
    assert!(!open.join("etc/identity").exists() && !open.join("etc/agent.toml").exists());
    let h2 = tmp.path().join("h2");
    let mut args = os(&[
        "--name",
        "edge-2",
        "--advertise",
        "127.86.2.2",
        "--identity",
    ]);
    args.push(edge2.as_os_str());
    let v = ok_json(&init(&h2, &args), "init --identity");
    assert_eq!(v["identity"], h2.join("etc/identity").to_str().unwrap());
    for f in ["ca.pem", "cert.pem", "key.pem"] {
        assert_eq!(
            std::fs::read(h2.join("etc/identity").join(f)).unwrap(),
            std::fs::read(edge2.join(f)).unwrap(),
            "{f} is copied"
        );
    }
    assert_eq!(mode(&h2.join("etc/identity")), 0o700);
    assert_eq!(mode(&h2.join("etc/identity/key.pem")), 0o600);
    let c = AgentConfig::load(&h2.join("etc/agent.toml")).unwrap();
    assert_eq!(
        c.advertised_addr().unwrap(),
        "127.86.2.2:7400".parse().unwrap()
    );

    // An operator's identity is refused, and nothing is written.
    let h3 = tmp.path().join("h3");
    let mut args = os(&[
        "--name",
        "operator",
        "--advertise",
        "127.86.2.3",
        "--identity",
    ]);
    args.push(ca.operator.as_os_str());
    refused(
        &init(&h3, &args),
        &h3,
        &["operator identity", "not an agent's"],
    );

    // Another host's identity: the name is not the certificate's.
    let mut args = os(&[
        "--name",
        "edge-3",
        "--advertise",
        "127.86.2.3",
        "--identity",
    ]);
    args.push(edge2.as_os_str());
    refused(
        &init(&h3, &args),
        &h3,
        &["is the identity of `edge-2`, not of `edge-3`"],
    );

    // A key that is not the certificate's.
    let mixed = tmp.path().join("mixed");
    std::fs::create_dir(&mixed).unwrap();
    std::fs::copy(edge2.join("ca.pem"), mixed.join("ca.pem")).unwrap();
    std::fs::copy(edge2.join("cert.pem"), mixed.join("cert.pem")).unwrap();
    std::fs::copy(h1.join("etc/identity/key.pem"), mixed.join("key.pem")).unwrap();
    let mut args = os(&[
        "--name",
        "edge-2",
        "--advertise",
        "127.86.2.3",
        "--identity",
    ]);
    args.push(mixed.as_os_str());
    refused(
        &init(&h3, &args),
        &h3,
        &["key.pem is not the key of cert.pem"],
    );

    // Listening on 0.0.0.0 with no way to know the address peers should use.
    let mut args = os(&["--name", "edge-3", "--ca-dir"]);
    args.push(ca.dir.as_os_str());
    refused(&init(&h3, &args), &h3, &["--advertise"]);
    // Tags and seeds that cannot work.
    for (extra, why) in [
        (&["--tag", "role"][..], "KEY=VALUE"),
        (&["--tag", "role=a,b"], "cannot be targeted"),
        (&["--seed", "seed.internal:7400"], "no host names"),
    ] {
        let mut a = args.clone();
        a.extend(os(&["--advertise", "127.86.2.3"]));
        a.extend(os(extra));
        refused(&init(&h3, &a), &h3, &[why]);
    }

    // An existing configuration is left alone without --force: file and identity.
    let before = std::fs::read(&config).unwrap();
    let cert_before = std::fs::read(h1.join("etc/identity/cert.pem")).unwrap();
    let mut args = os(&[
        "--name",
        "edge-1",
        "--listen",
        "127.86.2.1:7400",
        "--ca-dir",
    ]);
    args.push(ca.dir.as_os_str());
    let o = init(&h1, &args);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("already exists; pass --force"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read(&config).unwrap(), before, "config unchanged");
    assert_eq!(
        std::fs::read(h1.join("etc/identity/cert.pem")).unwrap(),
        cert_before,
        "identity unchanged"
    );
    // With --force it is replaced: a new identity, a config that loads (tags now none).
    args.push("--force".as_ref());
    ok_json(&init(&h1, &args), "init --force");
    assert_ne!(
        std::fs::read(h1.join("etc/identity/cert.pem")).unwrap(),
        cert_before
    );
    let c = AgentConfig::load(&config).unwrap();
    assert!(c.tags.is_empty() && c.seeds.is_empty());
    // An identity already in place (put there by cloud-init, say) is checked and kept.
    let in_place = h1.join("etc/identity");
    let mut args = os(&["--name", "edge-1", "--listen", "127.86.2.1", "--force"]);
    args.extend([OsStr::new("--identity"), in_place.as_os_str()]);
    let kept = std::fs::read(h1.join("etc/identity/cert.pem")).unwrap();
    ok_json(&init(&h1, &args), "init with the identity in place");
    assert_eq!(
        std::fs::read(h1.join("etc/identity/cert.pem")).unwrap(),
        kept
    );
    AgentConfig::load(&config).unwrap();
}

/// Every path under `root`, relative, with its mode.
fn listing(root: &Path) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_str().unwrap().to_string();
            out.push((rel, mode(&p)));
            if p.is_dir() && !p.is_symlink() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn install_sh_installs_into_a_scratch_root_again_and_again() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("scratch");
    std::fs::create_dir(&root).unwrap();
    // A systemctl first on PATH that records being called: it never must be.
    let fake = tmp.path().join("fakebin");
    std::fs::create_dir(&fake).unwrap();
    let called = tmp.path().join("systemctl-called");
    std::fs::write(
        fake.join("systemctl"),
        format!("#!/bin/sh\necho \"$@\" >> '{}'\n", called.display()),
    )
    .unwrap();
    std::fs::set_permissions(
        fake.join("systemctl"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let path = format!("{}:{}", fake.display(), std::env::var("PATH").unwrap());
    let install = |args: &[&OsStr]| {
        Command::new("sh")
            .arg(repo().join("packaging/install.sh"))
            .args(args)
            .env("PATH", &path)
            .output()
            .unwrap()
    };
    let binary = Path::new(env!("CARGO_BIN_EXE_shoal"));
    let args = [
        OsStr::new("--root"),
        root.as_os_str(),
        "--binary".as_ref(),
        binary.as_os_str(),
    ];
    let expected: Vec<(String, u32)> = [
        ("etc", 0o755),
        ("etc/shoal", 0o700),
        ("etc/shoal/agent.toml", 0o600),
        ("etc/systemd", 0o755),
        ("etc/systemd/system", 0o755),
        ("etc/systemd/system/shoal-agent.service", 0o644),
        ("usr", 0o755),
        ("usr/local", 0o755),
        ("usr/local/bin", 0o755),
        ("usr/local/bin/shoal", 0o755),
        ("var", 0o755),
        ("var/lib", 0o755),
        ("var/lib/shoal", 0o700),
    ]
    .iter()
    .map(|(p, m)| (p.to_string(), *m))
    .collect();
    for run in 1..=2 {
        let o = install(&args);
        assert!(o.status.success(), "run {run}: {}", stderr(&o));
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains("systemctl was not called"), "run {run}: {out}");
        if run == 1 {
            // What `shoal init` would write, and a mode someone loosened: a second run
            // keeps the one and tightens the other.
            std::fs::write(root.join("etc/shoal/agent.toml"), "name = \"x\"\n").unwrap();
            std::fs::set_permissions(
                root.join("etc/shoal/agent.toml"),
                std::fs::Permissions::from_mode(0o600),
            )
            .unwrap();
            std::fs::set_permissions(
                root.join("etc/shoal"),
                std::fs::Permissions::from_mode(0o755),
            )
            .unwrap();
            continue;
        }
        assert_eq!(listing(&root), expected, "exactly these files, these modes");
        assert_eq!(
            std::fs::read_to_string(root.join("etc/shoal/agent.toml")).unwrap(),
            "name = \"x\"\n"
        );
    }
    assert_eq!(
        std::fs::read(root.join("etc/systemd/system/shoal-agent.service")).unwrap(),
        std::fs::read(repo().join("packaging/shoal-agent.service")).unwrap()
    );
    let installed = root.join("usr/local/bin/shoal");
    assert_eq!(
        std::fs::metadata(&installed).unwrap().len(),
        std::fs::metadata(binary).unwrap().len()
    );
    let o = Command::new(&installed).arg("--version").output().unwrap();
    assert!(o.status.success(), "the installed binary runs");
    assert!(!called.exists(), "systemctl was called under --root");

    // Refusals name what is wrong, and change nothing.
    let before = listing(&root);
    for (args, why) in [
        (
            vec![OsStr::new("--root"), root.as_os_str()],
            "--binary PATH",
        ),
        (
            vec![
                "--root".as_ref(),
                root.as_os_str(),
                "--binary".as_ref(),
                "/nonexistent/shoal".as_ref(),
            ],
            "no such file",
        ),
        (
            vec![
                "--root".as_ref(),
                "/nonexistent-root".as_ref(),
                "--binary".as_ref(),
                binary.as_os_str(),
            ],
            "no such directory",
        ),
        (vec!["--frobnicate".as_ref()], "unknown argument"),
    ] {
        let o = install(&args);
        assert!(!o.status.success(), "{args:?}");
        assert!(stderr(&o).contains(why), "{args:?}: {}", stderr(&o));
    }
    assert_eq!(listing(&root), before);

    // An image whose etc/shoal leads out of the root (to another directory here, standing
    // for the host's /etc): refused before anything is written, there or in the root.
    let image = tmp.path().join("image");
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(image.join("etc")).unwrap();
    std::fs::create_dir(&outside).unwrap();
    std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink(&outside, image.join("etc/shoal")).unwrap();
    let o = install(&[
        "--root".as_ref(),
        image.as_os_str(),
        "--binary".as_ref(),
        binary.as_os_str(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("is a symbolic link"), "{}", stderr(&o));
    assert!(!image.join("usr").exists(), "nothing written in the image");
    assert_eq!(
        std::fs::metadata(&outside).unwrap().permissions().mode() & 0o777,
        0o755,
        "the directory outside is untouched"
    );
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(repo().join("packaging/shoal-agent.service")).unwrap();
    let lines: Vec<&str> = unit.lines().map(str::trim).collect();
    for must in [
        "ExecStart=/usr/local/bin/shoal agent --config /etc/shoal/agent.toml",
        "KillMode=process",
        "Delegate=yes",
        "Restart=always",
        "WantedBy=multi-user.target",
    ] {
        assert!(lines.contains(&must), "the unit must say {must}");
    }
    // What would break deployments or the services they start (decision 0020).
    for never in [
        "NoNewPrivileges=",
        "ProtectSystem=",
        "ProtectControlGroups=",
        "PrivateTmp=",
        "PrivateDevices=",
        "MemoryDenyWriteExecute=",
        "CapabilityBoundingSet=",
    ] {
        assert!(
            !lines.iter().any(|l| l.starts_with(never)),
            "the unit must not set {never}"
        );
    }

    if Command::new("systemd-analyze")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        assert!(
            std::env::var_os("SHOAL_CI").is_none(),
            "SHOAL_CI is set, and systemd-analyze is not installed"
        );
        eprintln!(
            "SKIPPED: systemd-analyze is not installed (Debian's `systemd` package has it; \
             .ci/run installs it), so the unit was not verified"
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // verify checks that ExecStart's binary exists: point it at the one just built.
    let verify = |text: &str| {
        let copy = tmp.path().join("shoal-agent.service");
        std::fs::write(
            &copy,
            text.replace("/usr/local/bin/shoal", env!("CARGO_BIN_EXE_shoal")),
        )
        .unwrap();
        let o = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&copy)
            .output()
            .unwrap();
        let complaints: Vec<String> = stderr(&o)
            .lines()
            .filter(|l| l.contains("shoal-agent.service"))
            .map(String::from)
            .collect();
        (o.status.success(), complaints)
    };
    let (ok, complaints) = verify(&unit);
    assert!(
        ok && complaints.is_empty(),
        "systemd-analyze verify: {complaints:#?}"
    );
    eprintln!("systemd-analyze verify: packaging/shoal-agent.service is clean");
    // The check sees mistakes (it reports a bad value without failing, hence the stderr).
    let (_, complaints) = verify(&unit.replace("KillMode=process", "KillMode=sometimes"));
    assert!(
        complaints.iter().any(|l| l.contains("kill mode")),
        "{complaints:#?}"
    );
}

/// A host's agent, started as the docs say (`shoal agent --config`), by the binary
/// `install.sh` put in the host's root; killed on drop.
struct HostAgent {
    child: Child,
    log: PathBuf,
}

impl Drop for HostAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn docs_install_md_step_by_step_makes_a_three_host_fleet() {
    // The steps this test takes are the page's.
    let doc = std::fs::read_to_string(repo().join("docs/install.md")).unwrap();
    for step in [
        "shoal ca init --dir ca",
        "shoal ca issue --dir ca --name alice --operator --out alice",
        "shoal ca issue --dir ca --name web-1 --out web-1",
        "sh install.sh --binary ./shoal",
        "shoal init --name web-1 --identity /root/web-1 --seed 10.0.0.1:7400 --tag role=web",
        "systemctl enable --now shoal-agent",
        "`shoal agent --config /etc/shoal/agent.toml` runs the agent",
        "shoal hosts --peer 10.0.0.1:7400 --identity alice",
        "shoal deploy create --app hello --bundle hello --targets role=web --wait",
    ] {
        assert!(
            doc.contains(step),
            "docs/install.md no longer says {step:?}"
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    let at = |p: &str| tmp.path().join(p);
    let run = |cmd: &mut Command, what: &str| -> Output {
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{what}: {}", stderr(&o));
        o
    };

    // 2. The fleet CA and the operator's identity; 3. one identity per host.
    run(
        shoal().args(["ca", "init", "--dir"]).arg(at("ca")),
        "ca init",
    );
    run(
        shoal()
            .args(["ca", "issue", "--dir"])
            .arg(at("ca"))
            .args(["--name", "alice", "--operator", "--out"])
            .arg(at("alice")),
        "issue alice",
    );
    let addr = |n: u8| format!("127.86.1.{n}:7400");
    let mut agents = Vec::new();
    for n in 1..=3u8 {
        let name = format!("web-{n}");
        run(
            shoal()
                .args(["ca", "issue", "--dir"])
                .arg(at("ca"))
                .args(["--name", &name, "--out"])
                .arg(at(&name)),
            "issue a host's identity",
        );
        // 4. On the host (a scratch root here): install.sh, shoal init, start the agent.
        let root = at(&format!("host-{n}"));
        std::fs::create_dir(&root).unwrap();
        run(
            Command::new("sh")
                .arg(repo().join("packaging/install.sh"))
                .arg("--root")
                .arg(&root)
                .arg("--binary")
                .arg(env!("CARGO_BIN_EXE_shoal")),
            "install.sh",
        );
        let shoal_here = root.join("usr/local/bin/shoal");
        let config = root.join("etc/shoal/agent.toml");
        run(
            Command::new(&shoal_here)
                .args(["init", "--name", &name, "--identity"])
                .arg(at(&name))
                .args(["--seed", &addr(1), "--tag", "role=web"])
                // Three hosts on one machine: each listens on its own address, and
                // keeps its files in its own root.
                .args(["--listen", &addr(n)])
                .arg("--config")
                .arg(&config)
                .arg("--data-dir")
                .arg(root.join("var/lib/shoal"))
                .arg("--install-root")
                .arg(&root),
            "shoal init",
        );
        std::fs::remove_dir_all(at(&name)).unwrap();
        let log = root.join("agent.log");
        let child = Command::new(&shoal_here)
            .args(["agent", "--config"])
            .arg(&config)
            .env("SHOAL_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        agents.push(HostAgent { child, log });
    }
    let logs = |agents: &[HostAgent]| {
        agents
            .iter()
            .map(|a| std::fs::read_to_string(&a.log).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n----\n")
    };

    // 5. Check the fleet: every host alive, from any agent, and its tags known (they come
    // with its host state, which may arrive after membership says it is alive).
    let peer = addr(2).parse().unwrap();
    let mut last = Err(String::new());
    let all_alive = |list: &Result<Vec<serde_json::Value>, String>| {
        list.as_ref().is_ok_and(|l| {
            l.len() == 3
                && (1..=3).all(|n| state_of(l, &format!("web-{n}")).as_deref() == Some("alive"))
                && l.iter().all(|h| h["tags"]["role"] == "web")
        })
    };
    let limit = Duration::from_secs(60);
    let start = std::time::Instant::now();
    while !all_alive(&last) {
        assert!(
            start.elapsed() < limit,
            "three alive hosts within {limit:?}; last answer {last:?}\nlogs:\n{}",
            logs(&agents)
        );
        std::thread::sleep(Duration::from_millis(100));
        last = hosts(peer, &at("alice"));
    }
    let list = last.unwrap();
    for (n, h) in (1..=3).zip(&list) {
        assert_eq!(h["addr"], addr(n), "{h}");
        assert_eq!(h["tags"]["role"], "web", "{h}");
    }
    eprintln!(
        "three hosts alive {:?} after the first start",
        start.elapsed()
    );

    // 6. A first deployment.
    let hello = at("hello");
    std::fs::create_dir(&hello).unwrap();
    std::fs::write(hello.join("index.html"), "hello from shoal\n").unwrap();
    std::fs::write(
        hello.join("appspec.yml"),
        "version: 0.0\nos: linux\nfiles:\n  - source: index.html\n    destination: /srv/hello\n",
    )
    .unwrap();
    let o = shoal()
        .args(["deploy", "create", "--app", "hello", "--bundle"])
        .arg(&hello)
        .args([
            "--targets",
            "role=web",
            "--wait",
            "--json",
            "--peer",
            &addr(1),
        ])
        .arg("--identity")
        .arg(at("alice"))
        .output()
        .unwrap();
    let view = ok_json(&o, "deploy create --wait");
    assert_eq!(
        view["status"],
        "Succeeded",
        "{view}\nlogs:\n{}",
        logs(&agents)
    );
    for n in 1..=3 {
        let page = at(&format!("host-{n}/srv/hello/index.html"));
        assert_eq!(
            std::fs::read_to_string(&page).ok().as_deref(),
            Some("hello from shoal\n"),
            "{}",
            page.display()
        );
    }
    wait_for("every host to gossip its new revision", limit, || {
        hosts(peer, &at("alice")).is_ok_and(|l| {
            l.iter()
                .all(|h| h["apps"]["hello"] == view["revision"].as_str().unwrap())
        })
    });
}
