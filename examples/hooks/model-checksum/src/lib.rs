//! Verifies a revision's files, model weights above all, against the SHA-256 sums the
//! revision ships in `SHA256SUMS` (the `sha256sum` format: `<hex>  <path>` per line). Run it
//! at BeforeInstall or AfterInstall: a model corrupted in transit or on disk fails here,
//! before any traffic reaches it.
//!
//! Parameters: `revision_dir` (default `/revision`, where the agent mounts the revision),
//! `checksums` (default `SHA256SUMS`, relative to the revision).

use std::io::Read;

use sha2::{Digest, Sha256};
use shoal_hooks::{Context, Result, ResultExt, bail, info};

fn sha256_file(path: &str) -> Result<String> {
    let mut file = std::fs::File::open(path).context(format!("opening {path}"))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf).context(format!("reading {path}"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Parses `sha256sum` output: `<64 hex>  <path>` (or `<hex> *<path>`) per line.
fn parse_sums(text: &str) -> Result<Vec<(String, String)>> {
    let mut sums = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((sum, path)) = line.split_once(char::is_whitespace) else {
            bail!(
                "line {}: expected `<sha256>  <path>`, found `{line}`",
                n + 1
            );
        };
        let path = path.trim_start().trim_start_matches('*');
        if sum.len() != 64 || !sum.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("line {}: `{sum}` is not a SHA-256 in hex", n + 1);
        }
        if path.is_empty() || path.starts_with('/') || path.split('/').any(|c| c == "..") {
            bail!("line {}: `{path}` is not a path inside the revision", n + 1);
        }
        sums.push((sum.to_ascii_lowercase(), path.to_string()));
    }
    if sums.is_empty() {
        bail!("no checksums listed");
    }
    Ok(sums)
}

pub fn run(ctx: &Context) -> Result<String> {
    let root = ctx.param("revision_dir").unwrap_or("/revision");
    let list = ctx.param("checksums").unwrap_or("SHA256SUMS");
    let list_path = format!("{root}/{list}");
    let text = std::fs::read_to_string(&list_path).context(format!("reading {list_path}"))?;
    let sums = parse_sums(&text).context(list_path)?;
    for (expected, path) in &sums {
        let actual = sha256_file(&format!("{root}/{path}"))?;
        if &actual != expected {
            bail!("{path}: SHA-256 is {actual}, but {list} expects {expected}");
        }
        info!("{path}: {actual} ok");
    }
    Ok(format!("{} file(s) match {list}", sums.len()))
}

shoal_hooks::hook!(run);

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_hooks::Event;
    use shoal_hooks::testing::TestHost;

    fn ctx_for(dir: &std::path::Path) -> Context {
        Context::new(Event::AfterInstall).with_param("revision_dir", dir.to_str().unwrap())
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("model-checksum-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("model")).unwrap();
        dir
    }

    #[test]
    fn accepts_matching_model_and_rejects_a_flipped_byte() {
        let dir = scratch("flip");
        std::fs::write(dir.join("model/weights.json"), b"[1.0, 2.0]").unwrap();
        let sum = hex::encode(Sha256::digest(b"[1.0, 2.0]"));
        std::fs::write(
            dir.join("SHA256SUMS"),
            format!("{sum}  model/weights.json\n"),
        )
        .unwrap();

        let ok = TestHost::new().run(&ctx_for(&dir), run);
        assert_eq!(ok.result.unwrap(), "1 file(s) match SHA256SUMS");
        assert!(ok.logs[0].1.starts_with("model/weights.json: "));

        std::fs::write(dir.join("model/weights.json"), b"[1.0, 2.5]").unwrap();
        let bad = TestHost::new().run(&ctx_for(&dir), run);
        let reason = bad.result.unwrap_err().to_string();
        assert!(
            reason.contains("model/weights.json: SHA-256 is"),
            "{reason}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn refuses_paths_leaving_the_revision_and_garbage_lines() {
        let zero = "0".repeat(64);
        assert!(parse_sums(&format!("{zero}  ../etc/passwd")).is_err());
        assert!(parse_sums(&format!("{zero}  /etc/passwd")).is_err());
        let err = parse_sums("not a checksum line").unwrap_err().to_string();
        assert!(err.starts_with("line 1:"), "{err}");
        assert!(parse_sums("# only a comment\n").is_err());
    }
}
