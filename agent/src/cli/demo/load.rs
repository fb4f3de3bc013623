//! The demo's load generator: one thread per host sends `POST /predict` to the host's
//! inference service in a loop, and counts every answer under the phase the demo is in
//! when the request started: served (by which model, as the answer says) or failed (and
//! why, by kind). Bounded: one request in flight per host, a pause between requests, a
//! 2 s timeout each, and it stops when told (or dropped).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Serialize;

/// Between two requests of one host's loop: about 50 requests a second per host, which a
/// loaded 2-core machine serves without the generator starving the agents.
const PAUSE: Duration = Duration::from_millis(20);
/// One request's whole time, connect to last byte.
const TIMEOUT: Duration = Duration::from_secs(2);

/// What one phase saw.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PhaseCount {
    pub phase: String,
    pub requests: u64,
    pub served: u64,
    pub failed: u64,
    /// Served requests by the model that answered (the model's `name`: v1, v2, ...).
    pub by_model: BTreeMap<String, u64>,
    /// Failed requests by kind (`refused`, `timeout`, `status 500`, ...).
    pub failures: BTreeMap<String, u64>,
}

pub struct Load {
    stop: Arc<AtomicBool>,
    phase: Arc<AtomicUsize>,
    counts: Arc<Mutex<Vec<PhaseCount>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    /// Starts one loop per port (the services on 127.0.0.1), counting under `first`.
    pub fn start(ports: &[u16], first: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let phase = Arc::new(AtomicUsize::new(0));
        let counts = Arc::new(Mutex::new(vec![PhaseCount {
            phase: first.to_string(),
            ..PhaseCount::default()
        }]));
        let threads = ports
            .iter()
            .map(|&port| {
                let (stop, phase, counts) = (stop.clone(), phase.clone(), counts.clone());
                std::thread::spawn(move || run(port, &stop, &phase, &counts))
            })
            .collect();
        Load {
            stop,
            phase,
            counts,
            threads,
        }
    }

    /// Counts what starts from now on under `name`.
    pub fn phase(&self, name: &str) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.push(PhaseCount {
            phase: name.to_string(),
            ..PhaseCount::default()
        });
        self.phase.store(counts.len() - 1, Ordering::SeqCst);
    }

    /// Stops every loop, waits for them, and returns the counts by phase.
    pub fn finish(mut self) -> Vec<PhaseCount> {
        self.halt();
        std::mem::take(&mut *self.counts.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.halt();
    }
}

fn run(port: u16, stop: &AtomicBool, phase: &AtomicUsize, counts: &Mutex<Vec<PhaseCount>>) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .proxy(None)
        .http_status_as_error(false)
        .timeout_global(Some(TIMEOUT))
        .build()
        .into();
    let url = format!("http://127.0.0.1:{port}/predict");
    while !stop.load(Ordering::SeqCst) {
        let at = phase.load(Ordering::SeqCst);
        let answer = ask(&agent, &url);
        let mut counts = counts.lock().unwrap_or_else(|p| p.into_inner());
        let count = &mut counts[at];
        count.requests += 1;
        match answer {
            Ok(model) => {
                count.served += 1;
                *count.by_model.entry(model).or_default() += 1;
            }
            Err(kind) => {
                count.failed += 1;
                *count.failures.entry(kind).or_default() += 1;
            }
        }
        drop(counts);
        std::thread::sleep(PAUSE);
    }
}

/// One prediction: the name of the model that answered, or the kind of failure.
fn ask(agent: &ureq::Agent, url: &str) -> Result<String, String> {
    let mut response = agent
        .post(url)
        .header("content-type", "application/json")
        .send(r#"{"input": [1.0, 2.0, 3.0]}"#)
        .map_err(|e| match e {
            ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
                "refused".to_string()
            }
            ureq::Error::Timeout(_) => "timeout".to_string(),
            ureq::Error::Io(io) => format!("{:?}", io.kind()),
            other => other.to_string(),
        })?;
    if response.status() != 200 {
        return Err(format!("status {}", response.status().as_u16()));
    }
    let body = response
        .body_mut()
        .with_config()
        .limit(64 << 10)
        .read_to_string()
        .map_err(|_| "unreadable answer".to_string())?;
    let v: serde_json::Value =
        serde_json::from_str(&body).map_err(|_| "answer is not JSON".to_string())?;
    v["model"]
        .as_str()
        .map(String::from)
        .ok_or_else(|| "answer names no model".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A server that answers each connection with `model`, and drops every other one.
    fn server(model: &'static str) -> (u16, Arc<AtomicBool>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let done = Arc::new(AtomicBool::new(false));
        let quit = done.clone();
        std::thread::spawn(move || {
            for (n, stream) in listener.incoming().enumerate() {
                if quit.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut s) = stream else { continue };
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                if n % 2 == 1 {
                    let _ = s.write_all(b"HTTP/1.1 503 Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                    continue;
                }
                let body = format!(r#"{{"output":[1.0],"model":"{model}"}}"#);
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        (port, done)
    }

    #[test]
    fn answers_are_counted_by_phase_model_and_failure_kind() {
        let (port, done) = server("v7");
        let load = Load::start(&[port], "one");
        let wait = |f: &dyn Fn(&[PhaseCount]) -> bool| {
            let until = std::time::Instant::now() + Duration::from_secs(30);
            while !f(&load.counts.lock().unwrap()) {
                assert!(
                    std::time::Instant::now() < until,
                    "the load never got there"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        wait(&|c| c[0].served >= 2 && c[0].failed >= 2);
        load.phase("two");
        wait(&|c| c.len() == 2 && c[1].requests >= 4);
        let counts = load.finish();
        done.store(true, Ordering::SeqCst);
        assert_eq!(counts.len(), 2);
        for c in &counts {
            assert_eq!(c.requests, c.served + c.failed, "{c:?}");
            assert_eq!(
                c.by_model.get("v7").copied().unwrap_or(0),
                c.served,
                "{c:?}"
            );
            assert_eq!(
                c.failures.get("status 503").copied().unwrap_or(0),
                c.failed,
                "{c:?}"
            );
        }
        assert_eq!(counts[1].phase, "two");
    }

    #[test]
    fn a_port_nobody_listens_on_counts_as_refused() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let load = Load::start(&[port], "nobody");
        let until = std::time::Instant::now() + Duration::from_secs(30);
        while load.counts.lock().unwrap()[0].failed < 3 {
            assert!(std::time::Instant::now() < until);
            std::thread::sleep(Duration::from_millis(10));
        }
        let counts = load.finish();
        assert_eq!(counts[0].served, 0);
        assert!(
            counts[0].failures.get("refused").copied().unwrap_or(0) >= 3,
            "{counts:?}"
        );
    }
}
