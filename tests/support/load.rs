//! A bounded load client for the switch tests and benchmark: one thread per target sends
//! `POST /predict` to the inference app in a loop, one new connection per request (the
//! app closes each), and records every request: when it started, which phase the test was
//! in, how long it took, and the model that answered or why it failed. Bounded: one
//! request in flight per target, a timeout each, at most `max` requests per target, and
//! it stops when told (or dropped).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One request's whole time, connect to last byte.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// One request as the client saw it.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Index of the target in the list given to [`Load::start`].
    pub target: usize,
    pub phase: usize,
    pub started: Instant,
    pub latency: Duration,
    /// The model that answered, or the failure.
    pub answer: Result<String, String>,
}

pub struct Load {
    stop: Arc<AtomicBool>,
    phase: Arc<AtomicUsize>,
    samples: Arc<Mutex<Vec<Sample>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    /// Starts one loop per target, pausing `pause` between two requests of a loop.
    pub fn start(targets: &[SocketAddr], pause: Duration, max: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let phase = Arc::new(AtomicUsize::new(0));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let threads = targets
            .iter()
            .enumerate()
            .map(|(target, &addr)| {
                let (stop, phase, samples) = (stop.clone(), phase.clone(), samples.clone());
                std::thread::spawn(move || {
                    for _ in 0..max {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let at = phase.load(Ordering::SeqCst);
                        let began = Instant::now();
                        let answer = predict(addr);
                        let sample = Sample {
                            target,
                            phase: at,
                            started: began,
                            latency: began.elapsed(),
                            answer,
                        };
                        samples.lock().unwrap().push(sample);
                        if !pause.is_zero() {
                            std::thread::sleep(pause);
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            phase,
            samples,
            threads,
        }
    }

    /// Requests started from now on count under phase `n`.
    pub fn phase(&self, n: usize) {
        self.phase.store(n, Ordering::SeqCst);
    }

    /// How many requests have been answered or failed so far.
    pub fn count(&self) -> usize {
        self.samples.lock().unwrap().len()
    }

    /// How many requests of phase `n` have been answered or failed so far.
    pub fn count_in(&self, n: usize) -> usize {
        self.samples
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.phase == n)
            .count()
    }

    /// Stops every loop, waits for them, and returns every request.
    pub fn finish(mut self) -> Vec<Sample> {
        self.halt();
        std::mem::take(&mut *self.samples.lock().unwrap())
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

/// One prediction over a new connection: the model that answered, or the failure.
pub fn predict(addr: SocketAddr) -> Result<String, String> {
    predict_within(addr, TIMEOUT)
}

/// [`predict`], with `timeout` for the connect and for each read and write.
pub fn predict_within(addr: SocketAddr, timeout: Duration) -> Result<String, String> {
    let body = r#"{"input": [1.0, 2.0, 3.0]}"#;
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    write!(
        stream,
        "POST /predict HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| format!("send: {e}"))?;
    let mut answer = Vec::new();
    stream
        .take(64 << 10)
        .read_to_end(&mut answer)
        .map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no answer ({} bytes)", answer.len()))?;
    let status = head.split(' ').nth(1).unwrap_or("");
    if status != "200" {
        return Err(format!("status {status}"));
    }
    let v: serde_json::Value =
        serde_json::from_str(body).map_err(|_| "answer is not JSON".to_string())?;
    v["model"]
        .as_str()
        .map(String::from)
        .ok_or_else(|| "answer names no model".to_string())
}

/// The `q`-quantile (0..=1) of the latencies of `samples`, in microseconds.
pub fn quantile(samples: &[&Sample], q: f64) -> u128 {
    let mut l: Vec<u128> = samples.iter().map(|s| s.latency.as_micros()).collect();
    if l.is_empty() {
        return 0;
    }
    l.sort_unstable();
    l[((l.len() - 1) as f64 * q).round() as usize]
}
