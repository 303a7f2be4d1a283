//! A token bucket shared by every connection of a session, for upload and download limits.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Limits a byte stream to `bytes_per_sec`, allowing bursts of one second's worth.
#[derive(Debug)]
pub struct RateLimiter {
    bytes_per_sec: f64,
    bucket: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    /// A limiter for `bytes_per_sec` (at least 1).
    pub fn new(bytes_per_sec: u64) -> RateLimiter {
        let rate = bytes_per_sec.max(1) as f64;
        RateLimiter {
            bytes_per_sec: rate,
            bucket: Mutex::new((rate, Instant::now())),
        }
    }

    /// Waits until `bytes` may pass. Debt is allowed, so a request larger than the bucket
    /// still passes, just later.
    pub async fn acquire(&self, bytes: u64) {
        let wait = {
            let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let (tokens, last) = &mut *bucket;
            *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.bytes_per_sec)
                .min(self.bytes_per_sec);
            *last = now;
            *tokens -= bytes as f64;
            if *tokens >= 0.0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(-*tokens / self.bytes_per_sec)
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn debt_is_paid_in_time() {
        let limiter = RateLimiter::new(1000);
        let start = tokio::time::Instant::now();
        limiter.acquire(1000).await; // the initial burst
        assert_eq!(start.elapsed(), Duration::ZERO);
        limiter.acquire(2000).await;
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(1990) && waited <= Duration::from_millis(2100),
            "{waited:?}"
        );
    }
}
