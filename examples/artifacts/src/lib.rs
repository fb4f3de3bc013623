//! The example hooks and the test guests, compiled to Wasm by this crate's build script.
//! Tests use the paths; `shoal demo` embeds the bytes so it runs anywhere.

/// One compiled guest.
#[derive(Clone, Copy, Debug)]
pub struct Artifact {
    /// The file stem, e.g. `model_checksum`.
    pub name: &'static str,
    /// Where the build left the `.wasm` file.
    pub path: &'static str,
    /// The `.wasm` file itself.
    pub bytes: &'static [u8],
}

include!(concat!(env!("OUT_DIR"), "/artifacts.rs"));

/// The example revisions' committed files, embedded: (revision, path, contents).
const REVISION_FILES: &[(&str, &str, &[u8])] = &[
    (
        "v1",
        "appspec.yml",
        include_bytes!("../../revisions/v1/appspec.yml"),
    ),
    (
        "v1",
        "model/model.json",
        include_bytes!("../../revisions/v1/model/model.json"),
    ),
    (
        "v1",
        "golden.json",
        include_bytes!("../../revisions/v1/golden.json"),
    ),
    (
        "v1",
        "SHA256SUMS",
        include_bytes!("../../revisions/v1/SHA256SUMS"),
    ),
    (
        "v2",
        "appspec.yml",
        include_bytes!("../../revisions/v2/appspec.yml"),
    ),
    (
        "v2",
        "model/model.json",
        include_bytes!("../../revisions/v2/model/model.json"),
    ),
    (
        "v2",
        "golden.json",
        include_bytes!("../../revisions/v2/golden.json"),
    ),
    (
        "v2",
        "SHA256SUMS",
        include_bytes!("../../revisions/v2/SHA256SUMS"),
    ),
    (
        "v3-broken",
        "appspec.yml",
        include_bytes!("../../revisions/v3-broken/appspec.yml"),
    ),
    (
        "v3-broken",
        "model/model.json",
        include_bytes!("../../revisions/v3-broken/model/model.json"),
    ),
    (
        "v3-broken",
        "golden.json",
        include_bytes!("../../revisions/v3-broken/golden.json"),
    ),
    (
        "v3-broken",
        "SHA256SUMS",
        include_bytes!("../../revisions/v3-broken/SHA256SUMS"),
    ),
];

/// The example revisions, in the order they are deployed.
pub const REVISIONS: [&str; 3] = ["v1", "v2", "v3-broken"];

/// Writes the example revision `name` (`v1`, `v2` or `v3-broken`) into `dest`, complete:
/// its committed files, `bin/inference-app` and the two example hooks under `hooks/`.
pub fn write_revision(name: &str, dest: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if !REVISIONS.contains(&name) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no example revision `{name}`"),
        ));
    }
    let built: [(&str, &[u8], u32); 3] = [
        ("bin/inference-app", INFERENCE_APP.bytes, 0o755),
        ("hooks/model_checksum.wasm", MODEL_CHECKSUM.bytes, 0o644),
        (
            "hooks/validate_inference.wasm",
            VALIDATE_INFERENCE.bytes,
            0o644,
        ),
    ];
    let committed = REVISION_FILES
        .iter()
        .filter(|(r, _, _)| *r == name)
        .map(|(_, p, b)| (*p, *b, 0o644));
    for (path, bytes, mode) in committed.chain(built) {
        let target = dest.join(path);
        std::fs::create_dir_all(target.parent().expect("a file has a parent"))?;
        std::fs::write(&target, bytes)?;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_committed_revision_file_is_embedded() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../revisions");
        for name in super::REVISIONS {
            let mut on_disk: Vec<String> = walk(&root.join(name));
            on_disk.sort();
            let mut embedded: Vec<String> = super::REVISION_FILES
                .iter()
                .filter(|(r, _, _)| *r == name)
                .map(|(_, p, _)| p.to_string())
                .collect();
            embedded.sort();
            assert_eq!(on_disk, embedded, "{name}: REVISION_FILES is out of date");
        }
    }

    fn walk(dir: &std::path::Path) -> Vec<String> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(
                    walk(&p)
                        .into_iter()
                        .map(|s| format!("{}/{s}", p.file_name().unwrap().to_string_lossy())),
                );
            } else {
                out.push(p.file_name().unwrap().to_string_lossy().into_owned());
            }
        }
        out
    }
}
