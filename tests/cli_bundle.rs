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

#[test]
fn check_and_create_report_chunks_and_what_an_earlier_revision_holds() {
    let tmp = tempfile::tempdir().unwrap();
    let (v1, v2) = (tmp.path().join("v1"), tmp.path().join("v2"));
    revision(&v1, "hooks/check.wasm");
    // A 4 MiB model of bytes that do not repeat; v2 inserts 64 KiB in its middle.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let model: Vec<u8> = (0..4 << 20)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    std::fs::write(v1.join("model.bin"), &model).unwrap();
    revision(&v2, "hooks/check.wasm");
    let mut changed = model[..2 << 20].to_vec();
    changed.extend(std::iter::repeat_n(7u8, 64 << 10));
    changed.extend_from_slice(&model[2 << 20..]);
    std::fs::write(v2.join("model.bin"), &changed).unwrap();

    let out = shoal(&[
        "bundle",
        "check",
        "--json",
        v2.to_str().unwrap(),
        "--against",
        v1.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let chunks = &v["chunks"];
    let bytes = chunks["bytes"].as_u64().unwrap();
    assert!(bytes >= (4 << 20) + (64 << 10), "{chunks}");
    assert!(chunks["count"].as_u64().unwrap() > 10, "{chunks}");
    let against = &chunks["against"];
    let fetch = against["fetch_bytes"].as_u64().unwrap();
    assert_eq!(against["reused_bytes"].as_u64().unwrap() + fetch, bytes);
    // The insertion costs about itself and a chunk on either side, not the rest.
    assert!((64 << 10..512 << 10).contains(&fetch), "{against}");

    let archive = tmp.path().join("v2.tar.zst");
    let out = shoal(&[
        "bundle",
        "create",
        v2.to_str().unwrap(),
        "-o",
        archive.to_str().unwrap(),
        "--against",
        v1.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Its stdout stays the revision id alone; the report is for people, on stderr.
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        v["id"].as_str().unwrap()
    );
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("distinct") && text.contains("held already"),
        "{text}"
    );
    // An earlier revision that is not a bundle is named.
    let out = shoal(&[
        "bundle",
        "check",
        v2.to_str().unwrap(),
        "--against",
        tmp.path().join("nowhere").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("earlier bundle"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
