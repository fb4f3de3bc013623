//! A byte rate shared by every transfer of one direction (`transfer.upload_rate`,
//! `transfer.download_rate`): a token bucket holding at most one second's worth, so an
//! edge link shared with production traffic is never filled by Shoal for longer than that.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A bucket of `rate` bytes per second; `None` is unlimited.
#[derive(Debug)]
pub struct Rate {
    bucket: Option<Mutex<Bucket>>,
}

#[derive(Debug)]
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Rate {
    pub fn new(rate: Option<u64>) -> Rate {
        Rate {
            bucket: rate.map(|rate| {
                Mutex::new(Bucket {
                    rate: rate as f64,
                    tokens: rate as f64,
                    at: Instant::now(),
                })
            }),
        }
    }

    /// Takes `n` bytes' worth, sleeping as long as the rate asks (the debt is taken at
    /// once, so concurrent takers queue behind each other fairly).
    pub async fn take(&self, n: u64) {
        let Some(bucket) = &self.bucket else { return };
        let wait = bucket.lock().expect("rate lock").take(Instant::now(), n);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

impl Bucket {
    /// Refills for the time since the last take, takes `n`, and says how long to wait
    /// before the bytes may go.
    fn take(&mut self, now: Instant, n: u64) -> Duration {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_lets_one_second_through_then_paces_to_its_rate() {
        let t0 = Instant::now();
        let mut b = Bucket {
            rate: 1000.0,
            tokens: 1000.0,
            at: t0,
        };
        assert_eq!(b.take(t0, 1000), Duration::ZERO, "a second's worth at once");
        assert_eq!(b.take(t0, 500), Duration::from_millis(500));
        // Half a second later the debt is paid; another 500 waits half a second again.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(b.take(t1, 500), Duration::from_millis(500));
        // Long idle refills to one second's worth, not more.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!(b.take(t2, 1000), Duration::ZERO);
        assert!(b.take(t2, 1) > Duration::ZERO);
    }
}
