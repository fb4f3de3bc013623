//! `shoal bundle create` and `shoal bundle check`, end to end with the real binary.

use std::path::Path;
use std::process::{Command, Output};

fn shoal(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(args)
        .env_remove("SHOAL_LOG")
        .output()
        .expect("running shoal")
}

fn revision(dir: &Path, hook: &str) {
    std::fs::create_dir_all(dir.join("hooks")).unwrap();
    std::fs::write(
        dir.join("appspec.yml"),
        format!("version: 0.0\nos: linux\nfiles:\n  - source: /\n    destination: /srv/app\nhooks:\n  ValidateService:\n    - location: {hook}\n"),
    )
    .unwrap();
    std::fs::write(dir.join("hooks/check.wasm"), b"\0asm\x0d\0\x01\0").unwrap();
}

#[test]
fn create_prints_the_revision_id_and_check_agrees() {
    let (src, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    revision(src.path(), "hooks/check.wasm");
    let archive = out.path().join("rev.tar.zst");
    let archive = archive.to_str().unwrap();

    let created = shoal(&[
        "bundle",
        "create",
        src.path().to_str().unwrap(),
        "-o",
        archive,
    ]);
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let id = String::from_utf8(created.stdout)
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(id.len(), 64, "{id}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));

    for target in [archive, src.path().to_str().unwrap()] {
        let checked = shoal(&["bundle", "check", target, "--json"]);
        assert!(
            checked.status.success(),
            "{}",
            String::from_utf8_lossy(&checked.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&checked.stdout).unwrap();
        assert_eq!(v["id"], id.as_str(), "the same id packed or not");
        assert_eq!(v["deployable"], true);
        assert_eq!(
            v["appspec"]["hooks"]["ValidateService"][0]["location"],
            "hooks/check.wasm"
        );
    }
}

#[test]
fn check_names_each_problem_and_fails_for_a_script_hook() {
    let src = tempfile::tempdir().unwrap();
    revision(src.path(), "scripts/validate.sh");
    let o = shoal(&["bundle", "check", src.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("appspec.yml line 8: error: hooks.ValidateService[0].location: `scripts/validate.sh` is a shell script"), "{stdout}");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        stderr.trim(),
        "error: the AppSpec has 1 error(s): Shoal will not deploy this bundle"
    );
}

#[test]
fn create_refuses_bad_input_with_one_line() {
    let src = tempfile::tempdir().unwrap();
    let good = src.path().join("x.tar.gz");
    let o = shoal(&[
        "bundle",
        "create",
        src.path().to_str().unwrap(),
        "-o",
        good.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no appspec.yml"), "{err}");
    assert!(!good.exists());
    revision(src.path(), "hooks/check.wasm");
    let out = src.path().join("x.rar");
    let o = shoal(&[
        "bundle",
        "create",
        src.path().to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("must end in .tar, .tar.gz"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}
