//! The fleet dashboard (`shoal ui`) driven in headless Chromium through ChromeDriver, with
//! real agents on 127.88.1.x: the hosts of the fleet appear, a deployment started from the
//! CLI shows its progress live to Succeeded, the Stop button (after its confirmation)
//! stops a baking deployment, and a screenshot is saved as a test artefact
//! (`dashboard.png` in the test's temporary target directory), a tag with markup in it is
//! shown as text, and the Roll back button rolls the group back. Without the key in the
//! link `shoal ui` prints, nothing is served. Chromium and ChromeDriver come from the
//! distribution's packages, installed here when missing (as root, with apt-get); where they
//! cannot be, the test says so and skips, unless `SHOAL_CI` is set (as
//! `.ci/run` sets it), where it fails.

#[path = "support/fleet.rs"]
mod fleet;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fleet::{Ca, agents, create, hosts, json, revision, shoal, status, wait_for};

const LONG: Duration = Duration::from_secs(90);
const UI: &str = "127.88.1.100:7480";

/// Kills the child when dropped.
struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Chromium and ChromeDriver, installed from the distribution's packages if missing.
fn browser() -> Option<(&'static str, &'static str)> {
    let (chromium, driver) = ("/usr/bin/chromium", "/usr/bin/chromedriver");
    let present = || Path::new(chromium).exists() && Path::new(driver).exists();
    if !present() && Path::new("/usr/bin/apt-get").exists() {
        let _ = Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "chromium",
                "chromium-driver",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status();
    }
    present().then_some((chromium, driver))
}

/// A raw request to the dashboard: (status line, body).
fn raw(request: &str) -> Result<(String, String), String> {
    let addr: SocketAddr = UI.parse().unwrap();
    let mut s = std::net::TcpStream::connect_timeout(&addr, LONG).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(LONG)).unwrap();
    s.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no head")?;
    Ok((
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    ))
}

/// A ChromeDriver session (W3C WebDriver over HTTP).
struct Browser {
    base: String,
    session: String,
    agent: ureq::Agent,
}

impl Browser {
    fn start(port: u16, chromium: &str, profile: &Path) -> Browser {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(LONG))
            .http_status_as_error(false)
            .build()
            .into();
        let base = format!("http://127.0.0.1:{port}");
        let caps = serde_json::json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--disable-quic",
                "--window-size=1400,1000",
                format!("--user-data-dir={}", profile.display()),
            ]}
        }}});
        let v = call(&agent, "POST", &format!("{base}/session"), Some(caps));
        let session = v["sessionId"].as_str().expect("a session").to_string();
        Browser {
            base,
            session,
            agent,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/session/{}{path}", self.base, self.session)
    }

    fn go(&self, url: &str) {
        call(
            &self.agent,
            "POST",
            &self.url("/url"),
            Some(serde_json::json!({ "url": url })),
        );
    }

    fn script(&self, script: &str) -> serde_json::Value {
        call(
            &self.agent,
            "POST",
            &self.url("/execute/sync"),
            Some(serde_json::json!({ "script": script, "args": [] })),
        )
    }

    fn text(&self, css: &str) -> String {
        let script = format!(
            "const e = document.querySelector({}); return e ? e.innerText : '';",
            serde_json::to_string(css).unwrap()
        );
        self.script(&script).as_str().unwrap_or("").to_string()
    }

    /// Clicks the element `css` finds. The page redraws as news comes: an element found
    /// just before a redraw is stale by the click, so it is found again (a few times).
    fn click(&self, css: &str) {
        for attempt in 1.. {
            let found = call(
                &self.agent,
                "POST",
                &self.url("/element"),
                Some(serde_json::json!({ "using": "css selector", "value": css })),
            );
            let element = found
                .as_object()
                .and_then(|o| o.values().next())
                .and_then(|v| v.as_str())
                .unwrap_or_else(|| panic!("no element {css}: {found}"))
                .to_string();
            match try_call(
                &self.agent,
                "POST",
                &self.url(&format!("/element/{element}/click")),
                Some(serde_json::json!({})),
            ) {
                Ok(_) => return,
                Err(e) if attempt < 5 && e.code == "stale element reference" => {}
                Err(e) => panic!("{}", e.message),
            }
        }
    }

    fn accept_alert(&self) -> String {
        let text = call(&self.agent, "GET", &self.url("/alert/text"), None);
        call(
            &self.agent,
            "POST",
            &self.url("/alert/accept"),
            Some(serde_json::json!({})),
        );
        text.as_str().unwrap_or("").to_string()
    }

    fn screenshot(&self) -> Vec<u8> {
        let v = call(&self.agent, "GET", &self.url("/screenshot"), None);
        base64_decode(v.as_str().expect("a screenshot"))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self
            .agent
            .delete(&format!("{}/session/{}", self.base, self.session))
            .call();
    }
}

/// One WebDriver call; its `value`. Panics on a WebDriver error.
fn call(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    body: Option<serde_json::Value>,
) -> serde_json::Value {
    try_call(agent, method, url, body).unwrap_or_else(|e| panic!("{}", e.message))
}

/// A WebDriver error: its W3C error code (`value.error`, such as "stale element
/// reference"), and the whole call and answer for a message.
struct WebDriverError {
    code: String,
    message: String,
}

/// One WebDriver call; its `value`, or the WebDriver's error.
fn try_call(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value, WebDriverError> {
    let response = match (method, body) {
        ("POST", Some(b)) => agent
            .post(url)
            .header("Content-Type", "application/json")
            .send(serde_json::to_vec(&b).unwrap()),
        _ => agent.get(url).call(),
    }
    .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = response.status();
    let text = response.into_body().read_to_string().unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    if !status.is_success() {
        return Err(WebDriverError {
            code: v["value"]["error"].as_str().unwrap_or_default().to_string(),
            message: format!("{method} {url}: {status} {v}"),
        });
    }
    Ok(v["value"].clone())
}

fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let bytes: Vec<u8> = text
        .bytes()
        .filter(|c| *c != b'=' && !c.is_ascii_whitespace())
        .collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, c)| n | (value(*c) as u32) << (18 - 6 * i));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn the_dashboard_shows_the_fleet_and_a_deployment_live_and_its_stop_button_stops_one() {
    let Some((chromium, driver)) = browser() else {
        assert!(
            std::env::var_os("SHOAL_CI").is_none(),
            "SHOAL_CI is set, and Chromium and ChromeDriver could not be installed"
        );
        eprintln!(
            "SKIPPED: /usr/bin/chromium and /usr/bin/chromedriver are not installed and could \
             not be (apt-get install chromium chromium-driver)"
        );
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new(tmp.path(), "fleet");
    let mut fleet = agents(tmp.path(), &ca, [127, 88, 1], 2);
    // Markup where a page might put it: a tag value, which the page must show as text.
    fleet::tag(
        &fleet[1],
        &[
            ("role", "inference"),
            ("host", "agent-2"),
            ("note", "<img src=x onerror=document.title=1>"),
        ],
    );
    for a in fleet.iter_mut() {
        a.start();
    }
    wait_for("both agents alive", LONG, || {
        hosts(fleet[0].addr, &ca.operator)
            .is_ok_and(|l| l.len() == 2 && l.iter().all(|h| h["state"] == "alive"))
    });
    // Not on an address others can reach.
    let o = shoal()
        .args(["ui", "--listen", "0.0.0.0:7481", "--peer"])
        .arg(fleet[0].addr.to_string())
        .arg("--identity")
        .arg(&ca.operator)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("loopback address only"));
    let mut ui = Killed(
        shoal()
            .args(["ui", "--json", "--listen", UI, "--peer"])
            .arg(fleet[0].addr.to_string())
            .arg("--identity")
            .arg(&ca.operator)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // The document it prints first: where it is, key included (its last line is `}`).
    let mut printed = String::new();
    let mut out = std::io::BufReader::new(ui.0.stdout.take().unwrap());
    while !printed.ends_with("}\n") {
        let n = std::io::BufRead::read_line(&mut out, &mut printed).unwrap();
        assert!(n > 0, "shoal ui ended: {printed}");
    }
    let url = serde_json::from_str::<serde_json::Value>(&printed).unwrap()["url"]
        .as_str()
        .unwrap()
        .to_string();
    let key = url.split_once("?key=").unwrap().1.to_string();
    let host = format!("Host: {UI}\r\n");
    let cookie = format!("Cookie: shoal_ui_key={key}\r\n");
    wait_for("the dashboard to answer", LONG, || {
        raw(&format!("GET / HTTP/1.1\r\n{host}{cookie}\r\n"))
            .is_ok_and(|(s, _)| s.ends_with("200 OK"))
    });
    // Another user of the machine (no key), another site (no token), or a DNS rebinding
    // (another host name): refused.
    for request in [
        format!("GET /api/hosts HTTP/1.1\r\n{host}\r\n"),
        format!("GET / HTTP/1.1\r\n{host}\r\n"),
        format!("POST /api/deployments/x/stop HTTP/1.1\r\n{host}{cookie}\r\n"),
        format!("GET /api/hosts HTTP/1.1\r\nHost: evil.example:7480\r\n{cookie}\r\n"),
    ] {
        let (s, _) = raw(&request).unwrap();
        assert!(s.ends_with("403 Forbidden"), "{s}: {request}");
    }
    let (s, body) = raw(&format!("GET /api/hosts HTTP/1.1\r\n{host}{cookie}\r\n")).unwrap();
    assert!(s.ends_with("200 OK") && body.contains("agent-2"), "{s}");

    let port = free_port();
    let _driver = Killed(
        Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("ChromeDriver to answer", LONG, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let browser = Browser::start(port, chromium, &tmp.path().join("chromium-profile"));
    browser.go(&url);
    wait_for("the page to list both hosts, alive", LONG, || {
        let summary = browser.text("#summary");
        let hosts = browser.text("#hosts");
        summary.starts_with("2 of 2 hosts alive")
            && hosts.contains("agent-1")
            && hosts.contains("agent-2")
    });
    // The markup is text, and ran nowhere.
    assert!(browser.text("#hosts").contains("note=<img src=x onerror="));
    assert_eq!(
        browser.script("return [document.querySelectorAll('#hosts img').length, document.title]"),
        serde_json::json!([0, "Shoal fleet"])
    );

    // A deployment from the CLI, with a canary and a bake: the page follows it live.
    let accepted = json(
        &create(
            &fleet[1],
            &ca.operator,
            &revision(tmp.path(), "v1"),
            &["--targets", "role=inference", "--canary", "50%:4s"],
        ),
        "v1",
    );
    let id = accepted["id"].as_str().unwrap().to_string();
    let row = format!("[data-deployment=\"{id}\"]");
    wait_for("the deployment's row", LONG, || {
        !browser.text(&row).is_empty()
    });
    browser.click(&row);
    let mut seen = Vec::<String>::new();
    wait_for("the page to show it Succeeded", LONG, || {
        let now = browser.text("#d-status");
        if !now.is_empty() && seen.last() != Some(&now) {
            seen.push(now.clone());
        }
        now == "Succeeded"
    });
    assert!(
        seen.iter().any(|s| s == "Baking" || s == "InProgress"),
        "no progress seen before the end: {seen:?}"
    );
    let hosts_now = browser.text("#d-hosts");
    assert!(
        hosts_now.contains("ValidateService Succeeded"),
        "{hosts_now}"
    );
    // Each host's own row and log tail.
    assert!(
        hosts_now.contains("agent-1") && hosts_now.contains("agent-2"),
        "{hosts_now}"
    );
    assert!(hosts_now.contains("ValidateService passed"), "{hosts_now}");
    let png = browser.screenshot();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let artefact = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    std::fs::write(&artefact, &png).unwrap();
    eprintln!("screenshot: {}", artefact.display());

    // A long bake, stopped from the page after its confirmation.
    let accepted = json(
        &create(
            &fleet[0],
            &ca.operator,
            &revision(tmp.path(), "v2"),
            &["--targets", "role=inference", "--canary", "50%:300s"],
        ),
        "v2",
    );
    let id = accepted["id"].as_str().unwrap().to_string();
    let row = format!("[data-deployment=\"{id}\"]");
    wait_for("the second deployment's row", LONG, || {
        !browser.text(&row).is_empty()
    });
    browser.click(&row);
    wait_for("it to bake, with its Stop button", LONG, || {
        browser.text("#d-status") == "Baking" && !browser.text("#d-stop").is_empty()
    });
    browser.click("#d-stop");
    let asked = browser.accept_alert();
    assert!(asked.contains(&id), "{asked}");
    wait_for("the log to say Stopped", LONG, || {
        status(&fleet[1], &ca.operator, &id).is_ok_and(|v| v["status"] == "Stopped")
    });
    wait_for("the page to say Stopped", LONG, || {
        browser.text("#d-status") == "Stopped"
    });

    // The group's Roll back button, after its confirmation: the last success (v1) goes back
    // to the canary that took v2.
    browser.click("[data-group=\"tiny\"] button");
    let asked = browser.accept_alert();
    assert!(asked.contains("Roll group tiny back"), "{asked}");
    let mut rollback = String::new();
    wait_for("the rollback to succeed", LONG, || {
        let o = shoal()
            .args(["deploy", "list", "--json", "--peer"])
            .arg(fleet[0].addr.to_string())
            .arg("--identity")
            .arg(&ca.operator)
            .output()
            .unwrap();
        let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        list.as_array().is_some_and(|l| {
            l.len() == 3 && {
                rollback = l[0]["id"].as_str().unwrap_or("").to_string();
                l[0]["status"] == "Succeeded" && l[0]["revision"] == l[2]["revision"]
            }
        })
    });
    assert_ne!(rollback, id);
}
