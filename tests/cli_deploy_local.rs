//! `shoal deploy local`, end to end: the real binary deploying the example revisions (the
//! real inference app, the real example hooks) into a temporary data dir and install root.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

#[path = "support/ports.rs"]
mod ports;

/// A host: data dir, install root, service port. Stops the service it started when dropped.
struct Host {
    tmp: tempfile::TempDir,
    port: u16,
    _port: ports::PortLease,
}

impl Host {
    fn new() -> Self {
        let lease = ports::lease();
        Host {
            tmp: tempfile::tempdir().unwrap(),
            port: lease.port(),
            _port: lease,
        }
    }

    fn data(&self) -> PathBuf {
        self.tmp.path().join("data")
    }

    fn root(&self) -> PathBuf {
        self.tmp.path().join("root")
    }

    /// Example revision `name`, deployed in place: its `switch` is taken out, so these
    /// tests keep to the in-place lifecycle (tests/cli_switch.rs has the switched one).
    fn revision(&self, name: &str) -> PathBuf {
        let dir = self.tmp.path().join("revisions").join(name);
        if !dir.exists() {
            shoal_examples::write_revision(name, &dir).unwrap();
            let spec = std::fs::read_to_string(dir.join("appspec.yml")).unwrap();
            let in_place = spec.split("    switch:").next().unwrap().to_string();
            assert_ne!(in_place, spec, "the example declares a switch");
            std::fs::write(dir.join("appspec.yml"), in_place).unwrap();
        }
        dir
    }

    fn shoal(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let (data, root, port) = (self.data(), self.root(), self.port.to_string());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_shoal"));
        cmd.args(args)
            .args([
                "--app",
                "inference",
                "--data-dir",
                data.to_str().unwrap(),
                "--install-root",
                root.to_str().unwrap(),
            ])
            .env_remove("SHOAL_LOG");
        if args.get(1) == Some(&"local") {
            cmd.args(["--port", &port]);
        }
        cmd.envs(env.iter().copied()).output().unwrap()
    }

    fn deploy(&self, bundle: &Path) -> (Output, serde_json::Value) {
        let o = self.shoal(
            &[
                "deploy",
                "local",
                "--bundle",
                bundle.to_str().unwrap(),
                "--json",
            ],
            &[],
        );
        let v = serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null);
        (o, v)
    }

    fn get(&self, path: &str) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    }

    /// The model the service answers with.
    fn serving(&self) -> Option<String> {
        let health = self.get("/health")?;
        let body = health.split("\r\n\r\n").nth(1)?;
        let v: serde_json::Value = serde_json::from_str(body).ok()?;
        v["model"].as_str().map(String::from)
    }

    fn installed_model(&self) -> String {
        std::fs::read_to_string(self.root().join("srv/inference/model/model.json")).unwrap()
    }

    fn active(&self) -> Option<String> {
        let state = std::fs::read(self.data().join("apps/inference/state.json")).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&state).ok()?;
        v["active"].as_str().map(String::from)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let record = self.data().join("apps/inference/service.json");
        let pid = std::fs::read(record)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
            .and_then(|v| v["pid"].as_i64());
        if let Some(pid) = pid {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn v1_then_v2_then_a_broken_model_rolls_back_to_v2() {
    let host = Host::new();
    let (o, v1) = host.deploy(&host.revision("v1"));
    assert!(o.status.success(), "v1: {}{}", stderr(&o), v1);
    assert_eq!(v1["status"], "Succeeded");
    assert_eq!(
        v1["hosts"][0]["events"][0],
        serde_json::json!({"name": "ApplicationStop", "status": "Skipped"})
    );
    assert_eq!(
        host.serving().as_deref(),
        Some("v1"),
        "the service outlives the CLI"
    );

    let (o, v2) = host.deploy(&host.revision("v2"));
    assert!(o.status.success(), "v2: {}", stderr(&o));
    assert_eq!(host.serving().as_deref(), Some("v2"));
    let v2_id = v2["revision"].as_str().unwrap().to_string();
    assert_eq!(host.active().as_deref(), Some(v2_id.as_str()));
    let v2_model = host.installed_model();
    assert!(v2_model.contains("\"v2\""));

    let (o, v3) = host.deploy(&host.revision("v3-broken"));
    assert_eq!(o.status.code(), Some(1), "v3-broken must fail: {v3}");
    assert_eq!(v3["status"], "Failed");
    let message = v3["message"].as_str().unwrap();
    assert!(
        message.starts_with(
            "Failed at ValidateService: ValidateService hook hooks/validate_inference.wasm"
        ),
        "{message}"
    );
    assert!(
        message.ends_with(&format!("rolled back to {v2_id}")),
        "{message}"
    );
    let events = v3["hosts"][0]["events"].as_array().unwrap();
    assert_eq!(
        events.last().unwrap(),
        &serde_json::json!({"name": "ValidateService", "status": "Failed"})
    );
    assert_eq!(v3["rollback"]["status"], "Succeeded");
    assert_eq!(v3["rollback"]["revision"], v2_id.as_str());
    assert!(stderr(&o).contains("rolled back to"), "{}", stderr(&o));

    // Wholly back on v2: files, state, and the service answering with v2's model.
    assert_eq!(host.serving().as_deref(), Some("v2"));
    assert_eq!(host.installed_model(), v2_model);
    assert_eq!(host.active().as_deref(), Some(v2_id.as_str()));
    // Releases: the two successful ones are kept, the failed one is not.
    let mut releases: Vec<String> = std::fs::read_dir(host.data().join("apps/inference/releases"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    releases.sort();
    let mut expected = vec![v1["revision"].as_str().unwrap().to_string(), v2_id.clone()];
    expected.sort();
    assert_eq!(releases, expected);

    // The failing hook's whole log was kept.
    let failed = v3["hooks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["succeeded"] == false)
        .unwrap();
    let log = PathBuf::from(failed["log"].as_str().unwrap());
    assert!(log.is_file(), "{}", log.display());
    let deployment_dir = host
        .data()
        .join("apps/inference/deployments")
        .join(v3["id"].as_str().unwrap());
    assert!(
        log.starts_with(&deployment_dir),
        "{} is not under {}",
        log.display(),
        deployment_dir.display()
    );
    assert!(
        failed["summary"]
            .as_str()
            .unwrap()
            .contains("case 0: predicted [-1.7125]"),
        "{failed}"
    );
}

#[test]
fn refused_bundles_leave_the_running_revision_untouched() {
    let host = Host::new();
    let (o, v2) = host.deploy(&host.revision("v2"));
    assert!(o.status.success(), "{}", stderr(&o));
    let v2_id = v2["revision"].as_str().unwrap().to_string();
    let model = host.installed_model();
    let service_before = std::fs::read(host.data().join("apps/inference/service.json")).unwrap();

    let bad = host.tmp.path().join("bad");
    type Case = (&'static str, Box<dyn Fn(&Path)>, &'static str);
    let cases: Vec<Case> = vec![
        (
            "script hook",
            Box::new(|d: &Path| {
                let spec = std::fs::read_to_string(d.join("appspec.yml")).unwrap();
                std::fs::write(
                    d.join("appspec.yml"),
                    spec.replace("hooks/validate_inference.wasm", "scripts/validate.sh"),
                )
                .unwrap();
            }),
            "`scripts/validate.sh` is a shell script",
        ),
        (
            "malformed appspec",
            Box::new(|d: &Path| {
                std::fs::write(
                    d.join("appspec.yml"),
                    "version: 0.0\nos: linux\nos: linux\n",
                )
                .unwrap();
            }),
            "appspec.yml line 3: duplicate mapping key: os",
        ),
        (
            "escaping symlink",
            Box::new(|d: &Path| {
                std::os::unix::fs::symlink("/etc/passwd", d.join("passwd")).unwrap();
            }),
            "entry `passwd`: symbolic link to `/etc/passwd`",
        ),
        (
            "garbage hook",
            Box::new(|d: &Path| {
                std::fs::write(d.join("hooks/validate_inference.wasm"), b"not wasm").unwrap();
            }),
            "hook hooks/validate_inference.wasm",
        ),
    ];
    for (what, spoil, expected) in cases {
        let _ = std::fs::remove_dir_all(&bad);
        shoal_examples::write_revision("v1", &bad).unwrap();
        spoil(&bad);
        let (o, _) = host.deploy(&bad);
        assert_eq!(o.status.code(), Some(1), "{what}");
        assert!(stderr(&o).contains(expected), "{what}: {}", stderr(&o));
        assert_eq!(host.installed_model(), model, "{what}: files changed");
        assert_eq!(
            host.active().as_deref(),
            Some(v2_id.as_str()),
            "{what}: state changed"
        );
        assert_eq!(
            std::fs::read(host.data().join("apps/inference/service.json")).unwrap(),
            service_before,
            "{what}: service restarted"
        );
        assert_eq!(host.serving().as_deref(), Some("v2"), "{what}");
    }
    // An archive bomb is refused the same way (a 64 MiB file of zeros past a small limit is
    // covered in bundle_safety; here a hostile tar entry in an archive).
    let tar_path = host.tmp.path().join("evil.tar");
    let mut t = tar::Builder::new(std::fs::File::create(&tar_path).unwrap());
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..8].copy_from_slice(b"../evil\0");
    h.set_size(1);
    h.set_cksum();
    t.append(&h, &b"x"[..]).unwrap();
    t.finish().unwrap();
    let (o, _) = host.deploy(&tar_path);
    assert!(
        stderr(&o).contains("entry `../evil`: the path contains `..`"),
        "{}",
        stderr(&o)
    );
    assert!(!host.tmp.path().join("data/apps/inference/evil").exists());
    assert_eq!(host.serving().as_deref(), Some("v2"));
}

#[test]
fn disallow_reports_the_conflicting_file() {
    let host = Host::new();
    let v1 = host.revision("v1");
    let spec = std::fs::read_to_string(v1.join("appspec.yml")).unwrap();
    std::fs::write(
        v1.join("appspec.yml"),
        spec.replace("file_exists_behavior: OVERWRITE\n", ""),
    )
    .unwrap();
    let foreign = host.root().join("srv/inference/golden.json");
    std::fs::create_dir_all(foreign.parent().unwrap()).unwrap();
    std::fs::write(&foreign, "hand-made").unwrap();
    let (o, v) = host.deploy(&v1);
    assert_eq!(o.status.code(), Some(1));
    let message = v["message"].as_str().unwrap();
    assert!(
        message.contains(&format!(
            "file_exists_behavior DISALLOW: {} already exists",
            foreign.display()
        )),
        "{message}"
    );
    assert_eq!(std::fs::read_to_string(&foreign).unwrap(), "hand-made");
    assert!(
        !host.root().join("srv/inference/model/model.json").exists(),
        "nothing installed"
    );

    // On an upgrade, a conflict fails Install and rolls back, and the rollback must not take
    // the foreign file for one of ours.
    std::fs::remove_file(&foreign).unwrap();
    let (o, _) = host.deploy(&v1);
    assert!(o.status.success(), "{}", stderr(&o));
    let v2 = host.revision("v2");
    let spec = std::fs::read_to_string(v2.join("appspec.yml")).unwrap();
    std::fs::write(
        v2.join("appspec.yml"),
        spec.replace("file_exists_behavior: OVERWRITE\n", ""),
    )
    .unwrap();
    std::fs::write(v2.join("model/extra.bin"), "v2's").unwrap();
    let hand_made = host.root().join("srv/inference/model/extra.bin");
    std::fs::write(&hand_made, "hand-made").unwrap();
    let (o, v) = host.deploy(&v2);
    assert_eq!(o.status.code(), Some(1));
    let message = v["message"].as_str().unwrap();
    assert!(
        message.starts_with("Failed at Install: file_exists_behavior DISALLOW"),
        "{message}"
    );
    assert!(message.contains("rolled back to"), "{message}");
    assert_eq!(
        std::fs::read_to_string(&hand_made).unwrap(),
        "hand-made",
        "the rollback removed a file that was not ours"
    );
    assert_eq!(host.serving().as_deref(), Some("v1"));
}

/// OVERWRITE over a file of the host's own, then a failed upgrade: the rollback puts the
/// host's file back byte for byte, with its mode and owner; and so does a later revision
/// that no longer carries the file.
#[test]
fn overwrite_then_rollback_restores_the_hosts_own_file_byte_for_byte() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let host = Host::new();
    let (o, _) = host.deploy(&host.revision("v1"));
    assert!(o.status.success(), "{}", stderr(&o));
    let own = host.root().join("srv/inference/model/extra.bin");
    let original: Vec<u8> = (0..70_000u32).map(|i| (i * 7919 % 251) as u8).collect();
    std::fs::write(&own, &original).unwrap();
    std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(&own, Some(4321), Some(4322)).unwrap();
    let unchanged = |what: &str| {
        assert_eq!(std::fs::read(&own).unwrap(), original, "{what}: bytes");
        let meta = std::fs::metadata(&own).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o640, "{what}: mode");
        assert_eq!((meta.uid(), meta.gid()), (4321, 4322), "{what}: owner");
    };
    let kept = host.data().join("apps/inference/replaced");
    let kept_count = || std::fs::read_dir(&kept).map_or(0, |d| d.count());

    // v3-broken carries the file too: it replaces the host's, fails ValidateService, and
    // rolls back to v1, which does not carry it.
    let broken = host.revision("v3-broken");
    std::fs::write(broken.join("model/extra.bin"), "v3-broken's").unwrap();
    let (o, v) = host.deploy(&broken);
    assert_eq!(o.status.code(), Some(1), "v3-broken must fail: {v}");
    assert!(
        v["message"].as_str().unwrap().contains("rolled back to"),
        "{v}"
    );
    unchanged("after the rollback");
    assert_eq!(kept_count(), 0, "the kept copy was not put back");
    assert_eq!(host.serving().as_deref(), Some("v1"));

    // v2 carries it and succeeds: the file is v2's, the host's is kept aside.
    let v2 = host.revision("v2");
    std::fs::write(v2.join("model/extra.bin"), "v2's").unwrap();
    let (o, _) = host.deploy(&v2);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(&own).unwrap(), b"v2's");
    assert_eq!(kept_count(), 1);
    // Back to v1, which does not carry it: the host's file returns.
    let (o, _) = host.deploy(&host.revision("v1"));
    assert!(o.status.success(), "{}", stderr(&o));
    unchanged("after v1 again");
    assert_eq!(kept_count(), 0);
}

/// A previous revision whose ApplicationStop hook fails blocks the next deployment, unless
/// `--ignore-stop-failures`: then the failure is recorded and the deployment goes through.
#[test]
fn ignore_stop_failures_lets_a_deployment_past_a_failing_application_stop() {
    let host = Host::new();
    let v1 = host.revision("v1");
    std::fs::copy(
        shoal_examples::SANDBOX_PROBE.path,
        v1.join("hooks/probe.wasm"),
    )
    .unwrap();
    let spec = std::fs::read_to_string(v1.join("appspec.yml")).unwrap();
    std::fs::write(
        v1.join("appspec.yml"),
        spec.replace(
            "hooks:\n",
            "hooks:\n  ApplicationStop:\n    - location: hooks/probe.wasm\n",
        ),
    )
    .unwrap();
    let (o, first) = host.deploy(&v1);
    assert!(o.status.success(), "{}{first}", stderr(&o));
    // The probe fails at any event once the app's work directory holds probe-fail.
    std::fs::write(host.data().join("apps/inference/work/probe-fail"), "").unwrap();
    let v2 = host.revision("v2");
    let (o, failed) = host.deploy(&v2);
    assert_eq!(o.status.code(), Some(1), "{failed}");
    assert!(
        failed["message"]
            .as_str()
            .unwrap()
            .contains("ApplicationStop"),
        "{failed}"
    );
    assert_eq!(host.serving().as_deref(), Some("v1"));
    let o = host.shoal(
        &[
            "deploy",
            "local",
            "--bundle",
            v2.to_str().unwrap(),
            "--ignore-stop-failures",
            "--json",
        ],
        &[],
    );
    let done: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(o.status.success(), "{}{done}", stderr(&o));
    assert_eq!(
        done["hosts"][0]["events"][0],
        serde_json::json!({"name": "ApplicationStop", "status": "Failed"})
    );
    assert_eq!(host.serving().as_deref(), Some("v2"));
}

/// A crash in a rollback's Install after it put the host's file back, before the state
/// says so: recovery puts it back again (the kept copy goes only once the state is
/// written), never deletes it.
#[test]
fn a_crash_in_a_rollback_after_the_hosts_file_is_back_loses_nothing() {
    let host = Host::new();
    let (o, v1) = host.deploy(&host.revision("v1"));
    assert!(o.status.success(), "{}", stderr(&o));
    let own = host.root().join("srv/inference/model/extra.bin");
    std::fs::write(&own, "the host's own").unwrap();
    let broken = host.revision("v3-broken");
    std::fs::write(broken.join("model/extra.bin"), "v3-broken's").unwrap();
    // The second Install is the rollback's: killed once its files are done.
    let o = host.shoal(
        &["deploy", "local", "--bundle", broken.to_str().unwrap()],
        &[("SHOAL_FAULT_POINT", "install.files-done:2")],
    );
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(o.status.signal(), Some(9), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&own).unwrap(), "the host's own");
    let o = host.shoal(&["deploy", "recover"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(&own).unwrap(),
        "the host's own",
        "recovery deleted the host's file"
    );
    assert_eq!(host.active().as_deref(), v1["revision"].as_str());
    assert_eq!(host.serving().as_deref(), Some("v1"));
    let kept = host.data().join("apps/inference/replaced");
    assert_eq!(std::fs::read_dir(&kept).unwrap().count(), 0, "pruned");
}

/// A deployment killed mid-Install, then the app's user plants a hard link to a file
/// outside where the old revision's permissions apply: recovery refuses to change it (it
/// would change the other file) and says so; `deploy recover --force` puts the host back on
/// the old revision all the same, leaves the outside file alone, and says what it skipped.
#[test]
fn a_forced_recovery_is_not_blocked_by_a_hard_link_the_app_user_planted() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let host = Host::new();
    let rule = "permissions:\n  - object: /srv/inference/model\n    mode: 644\n    type: [file]\n";
    let v1 = host.revision("v1");
    let v2 = host.revision("v2");
    for v in [&v1, &v2] {
        let spec = std::fs::read_to_string(v.join("appspec.yml")).unwrap();
        std::fs::write(v.join("appspec.yml"), format!("{spec}{rule}")).unwrap();
    }
    let (o, v) = host.deploy(&v1);
    assert!(o.status.success(), "{}{v}", stderr(&o));
    let v1_id = v["revision"].as_str().unwrap().to_string();
    let o = host.shoal(
        &["deploy", "local", "--bundle", v2.to_str().unwrap()],
        &[("SHOAL_FAULT_POINT", "install.files-done")],
    );
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(o.status.signal(), Some(9), "{}", stderr(&o));

    let outside = host.tmp.path().join("outside-secret");
    std::fs::write(&outside, "secret").unwrap();
    std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::hard_link(&outside, host.root().join("srv/inference/model/planted")).unwrap();

    let o = host.shoal(&["deploy", "recover"], &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("hard links"), "{}", stderr(&o));
    assert!(host.data().join("apps/inference/journal.json").exists());

    let o = host.shoal(&["deploy", "recover", "--force", "--json"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let message = v["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("rolled back to {v1_id}"))
            && message.contains("permissions were not all applied")
            && message.contains("hard links"),
        "{message}"
    );
    assert!(!host.data().join("apps/inference/journal.json").exists());
    assert_eq!(host.active().as_deref(), Some(v1_id.as_str()));
    assert_eq!(host.serving().as_deref(), Some("v1"));
    assert_eq!(
        std::fs::metadata(&outside).unwrap().mode() & 0o7777,
        0o600,
        "the file outside was changed through the hard link"
    );
}

/// kill -9 at each write point of a deployment v1 → v2 (a fault-injection switch per point,
/// every one `shoal_agent::faults` lists; one never reached fails the test), then
/// recovery: every time, the host is wholly on one revision and the next deployment goes
/// through.
#[test]
fn kill_9_at_every_write_point_then_recovery_leaves_one_whole_revision() {
    for point in shoal_agent::faults::POINTS {
        // The point inside Install's loop is hit at its third pass, in the middle of it.
        match *point {
            "install.file" => kill_9_at("install.file:3"),
            point => kill_9_at(point),
        }
    }
}

fn kill_9_at(point: &str) {
    let host = Host::new();
    let (o, v1) = host.deploy(&host.revision("v1"));
    assert!(o.status.success(), "{point}: {}", stderr(&o));
    let v1_id = v1["revision"].as_str().unwrap().to_string();
    let v1_model = host.installed_model();

    // v2 with more files, so a point inside Install's loop falls in its middle.
    let v2 = host.revision("v2");
    for i in 0..12 {
        std::fs::write(
            v2.join(format!("model/shard-{i:02}.bin")),
            vec![i as u8; 4096],
        )
        .unwrap();
    }
    let v2_model = std::fs::read_to_string(v2.join("model/model.json")).unwrap();
    // A file of the host's own that v2 replaces (OVERWRITE): back to v1, it must be the
    // host's again, byte for byte.
    let own = host.root().join("srv/inference/model/shard-05.bin");
    std::fs::write(&own, "the host's own").unwrap();
    let o = host.shoal(
        &["deploy", "local", "--bundle", v2.to_str().unwrap()],
        &[("SHOAL_FAULT_POINT", point)],
    );
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        o.status.signal(),
        Some(9),
        "{point}: the deployment was not killed there (the point is never reached): {}",
        stderr(&o)
    );

    let o = host.shoal(&["deploy", "recover", "--json"], &[]);
    assert!(o.status.success(), "{point}: {}", stderr(&o));
    let data = host.data();
    assert!(
        !data.join("apps/inference/journal.json").exists(),
        "{point}: a journal is left after recovery"
    );
    let active = host.active();
    let model_dir = host.root().join("srv/inference/model");
    let mut files: Vec<String> = std::fs::read_dir(&model_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    if active.as_deref() == Some(v1_id.as_str()) {
        assert_eq!(host.installed_model(), v1_model, "{point}: v1 active");
        assert_eq!(
            files,
            ["model.json", "shard-05.bin"],
            "{point}: v2's shards left on v1, or the host's file lost"
        );
        assert_eq!(
            std::fs::read_to_string(&own).unwrap(),
            "the host's own",
            "{point}: the host's file replaced on v1"
        );
        assert_eq!(host.serving().as_deref(), Some("v1"), "{point}");
    } else {
        assert_eq!(host.installed_model(), v2_model, "{point}: v2 active");
        assert_eq!(files.len(), 13, "{point}: v2 partly installed: {files:?}");
        for i in 0..12 {
            let shard = std::fs::read(model_dir.join(format!("shard-{i:02}.bin"))).unwrap();
            assert_eq!(shard, vec![i as u8; 4096], "{point}: shard {i}");
        }
        assert_eq!(host.serving().as_deref(), Some("v2"), "{point}");
    }
    let leftovers: Vec<String> = std::fs::read_dir(data.join("apps/inference/releases"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(
        leftovers.is_empty(),
        "{point}: leftovers of the interrupted run: {leftovers:?}"
    );

    // And the next deployment goes through.
    let (o, _) = host.deploy(&v2);
    assert!(o.status.success(), "{point}: {}", stderr(&o));
    assert_eq!(host.serving().as_deref(), Some("v2"), "{point}");
}

struct Agent(std::process::Child);

impl Agent {
    fn start(host: &Host) -> Agent {
        let config = host.tmp.path().join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "name = \"test-host\"\ndata_dir = {:?}\ninstall_root = {:?}\n",
                host.data(),
                host.root()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(host.tmp.path().join("agent.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_shoal"))
            .args(["agent", "--config", config.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Agent(child)
    }

    fn signal(&mut self, sig: Signal) {
        kill(Pid::from_raw(self.0.id() as i32), sig).unwrap();
        let until = Instant::now() + Duration::from_secs(10);
        while self.0.try_wait().unwrap().is_none() {
            assert!(Instant::now() < until, "the agent did not stop on {sig:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn service_pid(host: &Host) -> Option<i64> {
    let bytes = std::fs::read(host.data().join("apps/inference/service.json")).ok()?;
    serde_json::from_slice::<serde_json::Value>(&bytes).ok()?["pid"].as_i64()
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(15);
    while !ok() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_agent_restarts_a_crashed_service_and_the_app_outlives_the_agent() {
    let host = Host::new();
    let (o, _) = host.deploy(&host.revision("v1"));
    assert!(o.status.success(), "{}", stderr(&o));
    let first = service_pid(&host).unwrap();

    // The agent adopts the running service rather than starting another.
    let mut agent = Agent::start(&host);
    let log = host.tmp.path().join("agent.log");
    wait_for("the agent to adopt the service", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("service running")
    });
    assert_eq!(service_pid(&host), Some(first), "adopted, not restarted");

    // The app crashes: the agent starts it again.
    kill(Pid::from_raw(first as i32), Signal::SIGKILL).unwrap();
    wait_for("a restarted service", || {
        service_pid(&host).is_some_and(|p| p != first) && host.serving().as_deref() == Some("v1")
    });
    let second = service_pid(&host).unwrap();

    // The agent stops (gracefully, then brutally): the app keeps serving throughout.
    agent.signal(Signal::SIGTERM);
    assert_eq!(host.serving().as_deref(), Some("v1"));
    let mut agent = Agent::start(&host);
    wait_for("the second agent to adopt the service", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("service running")
    });
    agent.signal(Signal::SIGKILL);
    assert_eq!(host.serving().as_deref(), Some("v1"));
    assert_eq!(
        service_pid(&host),
        Some(second),
        "the same process served across agent restarts"
    );

    // A new agent adopts it again, without starting another.
    let _agent = Agent::start(&host);
    wait_for("the third agent to adopt the service", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("service running")
    });
    assert_eq!(service_pid(&host), Some(second));
    assert_eq!(host.serving().as_deref(), Some("v1"));
}
