//! `shoal ui`: the fleet dashboard, served on the operator's own machine.
//!
//! A local web server (`--listen`, default `127.0.0.1:7480`) with the page's assets
//! embedded in the binary (no CDN, nothing fetched). The browser talks only to it; it talks
//! to the agent at `--peer` with the operator identity, through the same operator API the
//! CLI uses. So agents get no new network surface, and the dashboard can do what the
//! operator's identity can: read hosts, groups and deployments, stop a deployment (signed
//! here, as `deploy stop` signs it), and roll a group back (as `deploy rollback` does).
//!
//! The listener is the operator's credentials in a browser, so it defends itself against
//! other users of the machine and other pages the browser has open:
//! - it listens on a loopback address only;
//! - nothing is served without the key: a random value made at start and printed in the
//!   dashboard's URL (`/?key=...`), which the first visit trades for an `HttpOnly`,
//!   `SameSite=Strict` cookie. Another user of the machine, who can reach the port but not
//!   read the operator's terminal, gets nothing;
//! - the `Host` header must name the listen address (a DNS-rebinding page names its own);
//! - every change is a POST carrying the key in `X-Shoal-Token` too (written only into the
//!   page itself, which another origin cannot read), with an `Origin`, when the browser
//!   sends one, of the dashboard itself;
//! - the page forbids framing and loads scripts from itself only.
//!
//! It asks the agent at most [`MAX_ASKS`] things at once, and the page polls only after
//! its previous poll ended, so the dashboard stays within the agent's handshake limits.
//!
//! Bounded like the agent's servers: at most [`MAX_CONNECTIONS`] requests at once, a head
//! of at most `http::server::MAX_HEAD` bytes read in 5 s, no request body.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::api::{self, Answer, Request};
use crate::fleet::wire::{OperatorAnswer, OperatorRequest};

const INDEX: &str = include_str!("index.html");
const SCRIPT: &str = include_str!("app.js");
const STYLE: &str = include_str!("style.css");

/// Requests served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// Requests to the agent at once (each is a connection of its own).
pub const MAX_ASKS: usize = 2;
/// The cookie the key is kept in.
const COOKIE: &str = "shoal_ui_key";
/// The longest a request to the agent may take.
const ASK_WITHIN: Duration = Duration::from_secs(30);

#[derive(Args, Debug)]
pub struct UiArgs {
    /// Where to serve the dashboard (keep it on loopback: it acts with your identity).
    #[arg(long, default_value = "127.0.0.1:7480")]
    pub listen: SocketAddr,
}

/// What every request needs: the agent, the identity, the token and the names the
/// dashboard answers to.
struct Ui {
    peer: String,
    identity: PathBuf,
    token: String,
    hosts: Vec<String>,
    asks: Semaphore,
    /// Actions are told as JSON lines.
    json: bool,
}

impl Ui {
    /// Tells the operator who runs the dashboard what it did (stdout: the audit trail).
    fn tell(&self, action: &str, what: &str) {
        let at = crate::fleet::now_unix();
        if self.json {
            println!(
                "{}",
                serde_json::json!({ "at": at, "action": action, "what": what })
            );
        } else {
            println!("{at}: {what}, from the dashboard");
        }
    }
}

pub async fn run(args: UiArgs, peer: &str, identity: Option<&Path>, json: bool) -> Result<bool> {
    let identity = identity
        .ok_or_else(|| {
            anyhow::anyhow!(
                "`shoal ui` needs an operator identity: pass --identity DIR or set SHOAL_IDENTITY"
            )
        })?
        .to_path_buf();
    // The identity must be an operator's before anything is served.
    let operator = crate::identity::Identity::load(&identity)?;
    if operator.role != crate::identity::Role::Operator {
        anyhow::bail!(
            "{} holds an agent identity: the dashboard needs an operator's (`shoal ca issue --operator`)",
            identity.display()
        );
    }
    if !args.listen.ip().is_loopback() {
        anyhow::bail!(
            "--listen {}: the dashboard acts with your operator identity, so it listens on a \
             loopback address only (reach it from elsewhere through an SSH tunnel)",
            args.listen
        );
    }
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("--listen {}: cannot listen there", args.listen))?;
    let addr = listener.local_addr()?;
    let mut token = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut token)
        .map_err(|_| anyhow::anyhow!("no randomness for the dashboard's token"))?;
    let mut hosts = vec![addr.to_string()];
    if addr.ip().is_loopback() {
        hosts.push(format!("localhost:{}", addr.port()));
    }
    let ui = Arc::new(Ui {
        peer: peer.to_owned(),
        identity,
        token: hex::encode(token),
        hosts,
        asks: Semaphore::new(MAX_ASKS),
        json,
    });
    let url = format!("http://{addr}/?key={}", ui.token);
    if json {
        super::print_json(&serde_json::json!({ "url": url, "peer": peer }))?;
    } else {
        println!(
            "the fleet dashboard is at {url} (asking {peer}); the key in the link is the only \
             way in: keep it to yourself. Ctrl-C stops it"
        );
    }
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(true),
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::debug!("ui: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let ui = ui.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = serve(stream, &ui).await {
                tracing::debug!("ui: {e:#}");
            }
        });
    }
}

/// A request, as far as the dashboard reads it.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    method: String,
    path: String,
    /// `key=` of the query string.
    key: Option<String>,
    host: Option<String>,
    origin: Option<String>,
    token: Option<String>,
    /// The dashboard's cookie.
    cookie: Option<String>,
}

/// Parses a request head. Pure, for tests.
fn parse(head: &[u8]) -> Option<Head> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, target) = (first.next()?.to_owned(), first.next()?);
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let key = query
        .split('&')
        .find_map(|p| p.strip_prefix("key="))
        .map(String::from);
    let mut head = Head {
        method,
        path: path.to_owned(),
        key,
        host: None,
        origin: None,
        token: None,
        cookie: None,
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = Some(value.trim().to_owned());
        match name.trim().to_ascii_lowercase().as_str() {
            "host" => head.host = value,
            "origin" => head.origin = value,
            "x-shoal-token" => head.token = value,
            "cookie" => {
                head.cookie = value.as_deref().and_then(|v| {
                    v.split(';')
                        .find_map(|c| c.trim().strip_prefix(&format!("{COOKIE}=")))
                        .map(String::from)
                })
            }
            _ => {}
        }
    }
    Some(head)
}

/// What a request is, once checked.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    /// The key in the link: set the cookie and go to the page.
    Enter,
    Asset(&'static str),
    Hosts,
    Groups,
    Deployments,
    Deployment(String),
    Stop {
        id: String,
        rollback: bool,
    },
    Rollback(String),
    /// Refused: status and why.
    Refuse(&'static str, &'static str),
}

/// Checks a request against the dashboard's rules and routes it. Pure, for tests.
fn route(head: &Head, hosts: &[String], token: &str) -> Route {
    if !head.host.as_ref().is_some_and(|h| hosts.contains(h)) {
        return Route::Refuse(
            "403 Forbidden",
            "this dashboard answers only to its own address",
        );
    }
    if head.method == "GET" && head.key.as_deref() == Some(token) {
        return Route::Enter;
    }
    if head.cookie.as_deref() != Some(token) {
        return Route::Refuse(
            "403 Forbidden",
            "open the dashboard with the link `shoal ui` printed: it holds its key",
        );
    }
    let segments: Vec<&str> = head.path.trim_start_matches('/').split('/').collect();
    match (head.method.as_str(), segments.as_slice()) {
        ("GET", [""]) | ("GET", ["index.html"]) => Route::Asset("index.html"),
        ("GET", ["app.js"]) => Route::Asset("app.js"),
        ("GET", ["style.css"]) => Route::Asset("style.css"),
        ("GET", ["api", "hosts"]) => Route::Hosts,
        ("GET", ["api", "groups"]) => Route::Groups,
        ("GET", ["api", "deployments"]) => Route::Deployments,
        ("GET", ["api", "deployments", id]) if valid_name(id) => Route::Deployment(id.to_string()),
        ("POST", rest) => {
            let origin_ok = head.origin.as_ref().is_none_or(|o| {
                o.strip_prefix("http://")
                    .is_some_and(|h| hosts.iter().any(|x| x == h))
            });
            if head.token.as_deref() != Some(token) || !origin_ok {
                return Route::Refuse(
                    "403 Forbidden",
                    "a change needs the dashboard's own token, from its own page",
                );
            }
            match rest {
                ["api", "deployments", id, "stop"] if valid_name(id) => Route::Stop {
                    id: id.to_string(),
                    rollback: false,
                },
                ["api", "deployments", id, "stop-and-roll-back"] if valid_name(id) => Route::Stop {
                    id: id.to_string(),
                    rollback: true,
                },
                ["api", "groups", name, "roll-back"] if valid_name(name) => {
                    Route::Rollback(name.to_string())
                }
                _ => Route::Refuse("404 Not Found", "no such action"),
            }
        }
        ("GET", _) => Route::Refuse("404 Not Found", "no such page"),
        _ => Route::Refuse("405 Method Not Allowed", "GET or POST only"),
    }
}

/// Ids and group names: letters, digits, `-`, `_`, `.`, at most 64 bytes.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

async fn serve(mut stream: TcpStream, ui: &Ui) -> Result<()> {
    let head = tokio::time::timeout(
        Duration::from_secs(5),
        crate::http::server::read_head(&mut stream),
    )
    .await
    .context("no request head in time")??;
    let head = parse(&head).context("a malformed request head")?;
    let mut extra = String::new();
    let (status, kind, body) = match route(&head, &ui.hosts, &ui.token) {
        Route::Enter => {
            extra = format!(
                "Set-Cookie: {COOKIE}={}; HttpOnly; SameSite=Strict; Path=/\r\nLocation: /\r\n",
                ui.token
            );
            ("303 See Other", "text/plain", Vec::new())
        }
        Route::Asset("index.html") => (
            "200 OK",
            "text/html; charset=utf-8",
            INDEX.replace("{{TOKEN}}", &ui.token).into_bytes(),
        ),
        Route::Asset("app.js") => ("200 OK", "text/javascript", SCRIPT.as_bytes().to_vec()),
        Route::Asset(_) => ("200 OK", "text/css", STYLE.as_bytes().to_vec()),
        Route::Refuse(status, why) => (status, "text/plain", why.as_bytes().to_vec()),
        route => match tokio::time::timeout(ASK_WITHIN, act(route, ui)).await {
            Ok(Ok(json)) => ("200 OK", "application/json", json),
            Ok(Err(e)) => (
                "502 Bad Gateway",
                "text/plain",
                format!("{e:#}").into_bytes(),
            ),
            Err(_) => (
                "504 Gateway Timeout",
                "text/plain",
                b"the agent did not answer in time".to_vec(),
            ),
        },
    };
    let headers = format!(
        "{extra}Cache-Control: no-store\r\nX-Frame-Options: DENY\r\n\
         X-Content-Type-Options: nosniff\r\n\
         Content-Security-Policy: default-src 'self'; frame-ancestors 'none'\r\n"
    );
    crate::http::server::respond(&mut stream, status, kind, &headers, &body).await?;
    Ok(())
}

/// Asks the agent what `route` wants; its JSON.
async fn act(route: Route, ui: &Ui) -> Result<Vec<u8>> {
    let _ask = ui.asks.acquire().await?;
    let (peer, identity) = (ui.peer.as_str(), ui.identity.as_path());
    let fleet = |request| super::fleet::ask(peer, identity, request);
    let json = match route {
        Route::Hosts => {
            let addr = super::hosts::resolve(peer)?;
            let expect = super::hosts::named_host(peer);
            match api::ask(addr, expect, identity, None, &Request::Hosts).await? {
                Answer::Hosts(hosts) => serde_json::to_vec(&hosts)?,
                _ => anyhow::bail!("{peer} answered something other than the hosts"),
            }
        }
        Route::Groups => match fleet(OperatorRequest::Groups).await? {
            OperatorAnswer::Groups(g) => serde_json::to_vec(&g)?,
            _ => anyhow::bail!("{peer} answered something other than the groups"),
        },
        Route::Deployments => match fleet(OperatorRequest::List {
            app: None,
            group: None,
        })
        .await?
        {
            OperatorAnswer::Deployments(list) => serde_json::to_vec(&list)?,
            _ => anyhow::bail!("{peer} answered something other than the deployments"),
        },
        Route::Deployment(id) => {
            serde_json::to_vec(&super::fleet::status(peer, identity, &id).await?)?
        }
        Route::Stop { id, rollback } => {
            let operator = crate::identity::Identity::load(identity)?;
            let stop = crate::fleet::intent::sign_stop(
                &id,
                rollback,
                &operator,
                crate::fleet::now_unix(),
            )?;
            ui.tell(
                "stop",
                &format!(
                    "stopping deployment {id}{}",
                    if rollback { " and rolling it back" } else { "" }
                ),
            );
            match fleet(OperatorRequest::Stop { stop }).await? {
                OperatorAnswer::Deployment(view) => serde_json::to_vec(&view)?,
                _ => anyhow::bail!("{peer} answered something other than the deployment"),
            }
        }
        Route::Rollback(group) => {
            let args = super::deploy_rollback::RollbackArgs {
                group,
                to: None,
                config: None,
                min_healthy: None,
                all_hosts: false,
                wait: false,
            };
            let view = super::deploy_rollback::request(&args, peer, identity, |line| {
                ui.tell("rollback", &line)
            })
            .await?;
            serde_json::to_vec(&view)?
        }
        Route::Enter | Route::Asset(_) | Route::Refuse(..) => {
            unreachable!("answered without the agent")
        }
    };
    Ok(json)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Head {
        parse(text.as_bytes()).unwrap()
    }

    #[test]
    fn only_its_own_page_may_change_anything_and_only_at_its_own_address() {
        let hosts = vec!["127.0.0.1:7480".to_string(), "localhost:7480".to_string()];
        let r = |text: &str| route(&head(text), &hosts, "t0k3n");
        let refused = |text: &str| matches!(r(text), Route::Refuse("403 Forbidden", _));
        const HOST: &str = "Host: 127.0.0.1:7480\r\n";
        const KEY: &str = "Host: 127.0.0.1:7480\r\nCookie: a=b; shoal_ui_key=t0k3n\r\n";
        // The link's key sets the cookie; without the cookie nothing is served.
        assert_eq!(
            r(&format!("GET /?key=t0k3n HTTP/1.1\r\n{HOST}\r\n")),
            Route::Enter
        );
        assert!(refused(&format!("GET /?key=guess HTTP/1.1\r\n{HOST}\r\n")));
        assert!(refused(&format!("GET / HTTP/1.1\r\n{HOST}\r\n")));
        assert!(refused(&format!(
            "GET /api/hosts HTTP/1.1\r\n{HOST}Cookie: shoal_ui_key=guess\r\n\r\n"
        )));
        assert_eq!(
            r(&format!("GET / HTTP/1.1\r\n{KEY}\r\n")),
            Route::Asset("index.html")
        );
        assert_eq!(
            r(
                "GET /api/deployments/abc HTTP/1.1\r\nHost: localhost:7480\r\nCookie: shoal_ui_key=t0k3n\r\n\r\n"
            ),
            Route::Deployment("abc".into())
        );
        // DNS rebinding: the page of evil.example, resolved to 127.0.0.1, even with the key.
        assert!(refused(
            "GET /api/hosts HTTP/1.1\r\nHost: evil.example:7480\r\nCookie: shoal_ui_key=t0k3n\r\n\r\n"
        ));
        assert!(refused(
            "GET /?key=t0k3n HTTP/1.1\r\nHost: evil.example:7480\r\n\r\n"
        ));
        assert!(refused("GET /api/hosts HTTP/1.1\r\n\r\n"));
        // A change without the token, with another's, or from another origin.
        for text in [
            format!("POST /api/deployments/abc/stop HTTP/1.1\r\n{KEY}\r\n"),
            format!("POST /api/deployments/abc/stop HTTP/1.1\r\n{KEY}X-Shoal-Token: guess\r\n\r\n"),
            format!(
                "POST /api/deployments/abc/stop HTTP/1.1\r\n{KEY}X-Shoal-Token: t0k3n\r\nOrigin: http://evil.example\r\n\r\n"
            ),
            format!(
                "POST /api/deployments/abc/stop HTTP/1.1\r\n{HOST}X-Shoal-Token: t0k3n\r\n\r\n"
            ),
        ] {
            assert!(refused(&text), "{text}");
        }
        assert_eq!(
            r(&format!(
                "POST /api/deployments/abc/stop-and-roll-back HTTP/1.1\r\n{KEY}X-Shoal-Token: t0k3n\r\nOrigin: http://127.0.0.1:7480\r\n\r\n"
            )),
            Route::Stop {
                id: "abc".into(),
                rollback: true
            }
        );
        assert_eq!(
            r(&format!(
                "POST /api/groups/web/roll-back HTTP/1.1\r\n{KEY}x-shoal-token: t0k3n\r\n\r\n"
            )),
            Route::Rollback("web".into())
        );
        // Names are checked; anything else is not found, or not allowed.
        for text in [
            format!("GET /api/deployments/..%2f HTTP/1.1\r\n{KEY}\r\n"),
            format!("GET /api/deployments/.. HTTP/1.1\r\n{KEY}\r\n"),
        ] {
            assert!(
                matches!(r(&text), Route::Refuse("404 Not Found", _)),
                "{text}"
            );
        }
        assert!(matches!(
            r(&format!("DELETE / HTTP/1.1\r\n{KEY}\r\n")),
            Route::Refuse("405 Method Not Allowed", _)
        ));
    }

    #[test]
    fn the_page_has_its_token_slot_and_loads_nothing_from_elsewhere() {
        assert!(INDEX.contains("{{TOKEN}}"));
        for asset in [INDEX, SCRIPT, STYLE] {
            assert!(!asset.contains("http://") && !asset.contains("https://"));
        }
    }
}
