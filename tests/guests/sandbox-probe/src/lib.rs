//! A test guest that tries, on request, everything a hook must not be able to do (or must
//! be stopped doing), so the agent's sandbox tests exercise real compiled Wasm. The
//! parameter `probe` picks the behaviour; `path`, `url`, `bytes`, `secs` qualify it.
//!
//! Without a `probe` parameter (as an AppSpec hook, which has none) it acts on the host's
//! tags, so fleet tests can make one host differ: it fails at the event named by the tag
//! `probe-fail` (`probe-fail = "ValidateService"`), and first sleeps `probe-sleep` seconds.
//! It also fails, at any event, once the app's work directory holds a file `probe-fail`
//! (`/work/probe-fail`): a test makes a monitor start failing that way. With the tag
//! `probe-spam` (a number of bytes) it first prints that many bytes of numbered lines, so a
//! test can check a large hook log comes back whole.

use std::hint::black_box;

use shoal_hooks::{Context, Result, ResultExt, bail, http, info};

pub fn run(ctx: &Context) -> Result<String> {
    let Some(probe) = ctx.param("probe") else {
        return by_tags(ctx);
    };
    match probe {
        "ok" => {
            info!("probe ok at {} on {}", ctx.event, ctx.host.name);
            Ok(format!(
                "ok: {} {} {}",
                ctx.event, ctx.application, ctx.deployment_id
            ))
        }
        "fail" => bail!("asked to fail"),
        "loop" => {
            let mut n: u64 = 0;
            loop {
                n = black_box(n.wrapping_add(1));
            }
        }
        "alloc" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(black_box(vec![1u8; 1 << 20]));
            }
        }
        "panic" => panic!("the probe panicked on purpose"),
        "trap" => {
            #[cfg(target_arch = "wasm32")]
            core::arch::wasm32::unreachable();
            #[cfg(not(target_arch = "wasm32"))]
            bail!("trap is wasm-only")
        }
        "sleep" => {
            let secs: u64 = ctx.require_param("secs")?.parse().context("secs")?;
            std::thread::sleep(std::time::Duration::from_secs(secs));
            Ok("woke up".into())
        }
        "read" => {
            let path = ctx.require_param("path")?;
            let text = std::fs::read(path).context(format!("reading {path}"))?;
            Ok(format!("read {} bytes from {path}", text.len()))
        }
        "write" => {
            let path = ctx.require_param("path")?;
            std::fs::write(path, b"written by sandbox-probe").context(format!("writing {path}"))?;
            Ok(format!("wrote {path}"))
        }
        "http" => {
            let url = ctx.require_param("url")?;
            let answer = http::get(url).send()?;
            Ok(format!(
                "HTTP {}: {}",
                answer.status,
                answer.text().unwrap_or("")
            ))
        }
        "tcp" => {
            let addr = ctx.require_param("addr")?;
            std::net::TcpStream::connect(addr).context(format!("connecting to {addr}"))?;
            Ok(format!("connected to {addr}"))
        }
        "spam" => {
            let bytes: usize = ctx.require_param("bytes")?.parse().context("bytes")?;
            Ok(format!("printed {} bytes", spam(bytes)))
        }
        "env" => {
            let vars: Vec<String> = std::env::vars().map(|(k, v)| format!("{k}={v}")).collect();
            Ok(vars.join(" "))
        }
        other => bail!("unknown probe `{other}`"),
    }
}

/// Prints numbered lines until `bytes` are printed, then `END OF SPAM`; what it printed.
fn spam(bytes: usize) -> usize {
    let line = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-=+\n";
    let mut written = 0;
    let mut n = 0u64;
    while written < bytes {
        let l = format!("{n:08} {line}");
        print!("{l}");
        written += l.len();
        n += 1;
    }
    println!("END OF SPAM");
    written
}

/// The behaviour the host's tags ask for (see the crate's documentation).
fn by_tags(ctx: &Context) -> Result<String> {
    if let Some(bytes) = ctx.host.tags.get("probe-spam") {
        spam(bytes.parse().context("the tag probe-spam")?);
    }
    if let Some(secs) = ctx.host.tags.get("probe-sleep") {
        let secs: u64 = secs.parse().context("the tag probe-sleep")?;
        std::thread::sleep(std::time::Duration::from_secs(secs));
    }
    let event = ctx.event.to_string();
    if std::path::Path::new("/work/probe-fail").exists() {
        bail!("{} finds /work/probe-fail at {event}", ctx.host.name);
    }
    if ctx.host.tags.get("probe-fail") == Some(&event) {
        bail!("{} is tagged to fail at {event}", ctx.host.name);
    }
    info!("probe by tags: {event} on {} passed", ctx.host.name);
    Ok(format!("{event} passed"))
}

shoal_hooks::hook!(run);
