//! A hook's captured log: stdout, stderr and `log` calls in the order they happened, kept
//! whole up to a bound and, beyond it, the first half and the last half of the bound with a
//! marker saying how much was left out in between.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use serde::Serialize;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

/// The bounded buffer behind a hook's log.
#[derive(Debug)]
struct Buffer {
    head: Vec<u8>,
    head_limit: usize,
    tail: VecDeque<u8>,
    tail_limit: usize,
    total: u64,
}

impl Buffer {
    fn write(&mut self, mut bytes: &[u8]) {
        self.total += bytes.len() as u64;
        let room = self.head_limit - self.head.len();
        let into_head = room.min(bytes.len());
        self.head.extend_from_slice(&bytes[..into_head]);
        bytes = &bytes[into_head..];
        if bytes.len() >= self.tail_limit {
            bytes = &bytes[bytes.len() - self.tail_limit..];
            self.tail.clear();
        }
        let overflow = (self.tail.len() + bytes.len()).saturating_sub(self.tail_limit);
        self.tail.drain(..overflow);
        self.tail.extend(bytes);
    }
}

/// A cloneable handle to one hook's log; stdout and stderr streams and the `log` import
/// all write through it.
#[derive(Clone, Debug)]
pub struct LogSink(Arc<Mutex<Buffer>>);

/// The log of a finished hook.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct CapturedLog {
    /// The text kept (lossy UTF-8), with an omission marker if it was cut.
    pub text: String,
    /// How many bytes the hook wrote in all.
    pub total_bytes: u64,
    /// Whether bytes were left out of `text`.
    pub truncated: bool,
}

impl LogSink {
    /// A log that keeps up to `limit` bytes whole.
    pub fn new(limit: usize) -> Self {
        let head_limit = limit / 2;
        LogSink(Arc::new(Mutex::new(Buffer {
            head: Vec::new(),
            head_limit,
            tail: VecDeque::new(),
            tail_limit: limit - head_limit,
            total: 0,
        })))
    }

    pub fn write(&self, bytes: &[u8]) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(bytes);
    }

    /// A line from the hook's `log` import.
    pub fn line(&self, level: &str, message: &str) {
        self.write(format!("[{level}] {message}\n").as_bytes());
    }

    /// What was captured so far.
    pub fn captured(&self) -> CapturedLog {
        let buf = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let kept = (buf.head.len() + buf.tail.len()) as u64;
        let mut bytes = buf.head.clone();
        if kept < buf.total {
            let omitted = buf.total - kept;
            bytes.extend_from_slice(
                format!("\n[... {omitted} bytes of output omitted ...]\n").as_bytes(),
            );
        }
        bytes.extend(buf.tail.iter());
        CapturedLog {
            text: String::from_utf8_lossy(&bytes).into_owned(),
            total_bytes: buf.total,
            truncated: kept < buf.total,
        }
    }
}

impl IsTerminal for LogSink {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogSink {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

/// Writes land in the buffer synchronously, so nothing is in flight when the hook ends.
#[wasmtime_wasi::async_trait]
impl OutputStream for LogSink {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        LogSink::write(self, &bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(64 * 1024)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LogSink {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for LogSink {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        LogSink::write(&self, buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_everything_up_to_the_bound() {
        let log = LogSink::new(10);
        log.write(b"0123456789");
        let c = log.captured();
        assert_eq!(c.text, "0123456789");
        assert!(!c.truncated);
        assert_eq!(c.total_bytes, 10);
    }

    #[test]
    fn keeps_head_and_tail_beyond_the_bound() {
        let log = LogSink::new(10);
        for chunk in [&b"abc"[..], b"defgh", b"ijklmnop", b"qrstuvwxyz"] {
            log.write(chunk);
        }
        let c = log.captured();
        assert!(c.truncated);
        assert_eq!(c.total_bytes, 26);
        assert_eq!(c.text, "abcde\n[... 16 bytes of output omitted ...]\nvwxyz");
    }

    #[test]
    fn one_huge_write_keeps_its_own_tail() {
        let log = LogSink::new(4);
        log.write(b"0123456789");
        assert_eq!(
            log.captured().text,
            "01\n[... 6 bytes of output omitted ...]\n89"
        );
    }
}
