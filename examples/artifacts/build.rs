//! Compiles the guest crates (the example hooks and the test guests) to Wasm, and the example
//! inference app for this host, with a nested
//! `cargo build` into a target directory of their own, the way wasmtime's test-programs do,
//! and writes `artifacts.rs` naming each output. `cargo build` and `cargo test` therefore
//! need no manual step; a missing Wasm target is installed through rustup.

use std::path::{Path, PathBuf};
use std::process::Command;

/// (constant name, package, binary file stem, target)
const GUESTS: &[(&str, &str, &str, &str)] = &[
    (
        "MODEL_CHECKSUM",
        "model-checksum",
        "model_checksum",
        "wasm32-wasip2",
    ),
    (
        "VALIDATE_INFERENCE",
        "validate-inference",
        "validate_inference",
        "wasm32-wasip2",
    ),
    (
        "PLAIN_COMMAND",
        "plain-command",
        "plain-command",
        "wasm32-wasip2",
    ),
    (
        "PLAIN_COMMAND_P1",
        "plain-command",
        "plain-command",
        "wasm32-wasip1",
    ),
    (
        "SANDBOX_PROBE",
        "sandbox-probe",
        "sandbox_probe",
        "wasm32-wasip2",
    ),
];

const WATCHED: &[&str] = &[
    "examples/hooks",
    "examples/inference-app",
    "tests/guests",
    "hooks-sdk/src",
    "hooks-sdk/wit",
    "hooks-sdk/Cargo.toml",
    "examples/revisions",
    "Cargo.lock",
];

/// Says `rerun-if-changed` for `path` and, for a directory, everything below it (but no
/// `target` directory).
fn watch(path: &std::path::Path) {
    println!("cargo:rerun-if-changed={}", path.display());
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            let p = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                if entry.file_name() != "target" {
                    watch(&p);
                }
            } else {
                println!("cargo:rerun-if-changed={}", p.display());
            }
        }
    }
}

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir
        .ancestors()
        .nth(2)
        .expect("workspace root")
        .to_path_buf();
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    // Share one guest target dir between profiles: target/<profile>/build/<pkg>/out -> target.
    let target_dir = out_dir
        .ancestors()
        .nth(4)
        .unwrap_or(&out_dir)
        .join("shoal-examples");
    println!("cargo:rerun-if-env-changed=SHOAL_GUESTS_PINNED");
    // Every file, not just the directories: cargo compares a directory's own mtime, which
    // an edit to a file below it does not change.
    for path in WATCHED {
        watch(&root.join(path));
    }

    let mut targets: Vec<&str> = GUESTS.iter().map(|g| g.3).collect();
    targets.sort();
    targets.dedup();
    for target in &targets {
        ensure_target_installed(target);
        let packages = GUESTS
            .iter()
            .filter(|g| g.3 == *target)
            .flat_map(|g| ["-p", g.1]);
        build(&root, &target_dir, Some(target), packages.collect());
    }

    // The example application, for this host.
    build(&root, &target_dir, None, vec!["-p", "inference-app"]);
    let app = target_dir.join("release").join("inference-app");
    assert!(app.exists(), "{} was not built", app.display());

    let mut code = format!(
        "/// The example inference app, built for this host.\npub const INFERENCE_APP: Artifact = Artifact {{ name: \"inference-app\", path: {p:?}, bytes: include_bytes!({p:?}) }};\n",
        p = app.display().to_string(),
    );
    for (name, _, stem, target) in GUESTS {
        let path = target_dir
            .join(target)
            .join("release")
            .join(format!("{stem}.wasm"));
        assert!(path.exists(), "{} was not built", path.display());
        code.push_str(&format!(
            "/// `{stem}.wasm`, built for `{target}`.\npub const {name}: Artifact = Artifact {{ name: {stem:?}, path: {path:?}, bytes: include_bytes!({path:?}) }};\n",
            path = path.display().to_string(),
        ));
    }
    std::fs::write(out_dir.join("artifacts.rs"), code).unwrap();
}

/// With `SHOAL_GUESTS_PINNED` set (fuzz/run.sh sets it), the guests are built with the
/// toolchain rust-toolchain.toml pins, through rustup's proxies, rather than with the outer
/// build's: the nightly `cargo fuzz` needs may lack the Wasm targets.
fn pinned() -> bool {
    std::env::var_os("SHOAL_GUESTS_PINNED").is_some()
}

/// A command for `tool` (cargo or rustc) of the toolchain the guests are built with.
fn tool(tool: &str, outer: &str) -> Command {
    if pinned() {
        let mut cmd = Command::new(tool);
        cmd.env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("RUSTC")
            .env_remove("RUSTDOC")
            .env_remove("CARGO");
        cmd
    } else {
        Command::new(std::env::var(outer).unwrap_or_else(|_| tool.into()))
    }
}

fn build(root: &Path, target_dir: &Path, target: Option<&str>, packages: Vec<&str>) {
    let mut cmd = tool("cargo", "CARGO");
    cmd.current_dir(root).args(["build", "--release"]);
    if let Some(target) = target {
        cmd.args(["--target", target]);
    }
    cmd.args(&packages)
        .arg("--target-dir")
        .arg(target_dir)
        // Small, debug-free guests: they compile faster in wasmtime and embed cheaply.
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_STRIP", "true")
        // The outer build's flags (coverage, sanitizers, targets) are not the examples'.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("RUSTC_WORKSPACE_WRAPPER");
    let status = cmd.status().expect("running cargo to build the examples");
    assert!(
        status.success(),
        "building {packages:?} for {target:?} failed: {status}"
    );
}

/// Installs a Wasm target through rustup when the toolchain lacks it. rust-toolchain.toml
/// lists the targets, but rustup adds them only when it installs the toolchain itself.
fn ensure_target_installed(target: &str) {
    let sysroot = tool("rustc", "RUSTC")
        .args(["--print", "sysroot"])
        .output()
        .expect("rustc --print sysroot");
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if sysroot.join("lib/rustlib").join(target).exists() {
        return;
    }
    println!("cargo:warning=installing the {target} target with rustup");
    let mut rustup = Command::new("rustup");
    if pinned() {
        rustup.env_remove("RUSTUP_TOOLCHAIN");
    }
    let status = rustup.args(["target", "add", target]).status();
    match status {
        Ok(s) if s.success() => {}
        other => panic!(
            "the {target} target is missing and `rustup target add {target}` failed: {other:?}"
        ),
    }
}
