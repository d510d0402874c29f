//! A token bucket for loops the guest drives (its OOM reports, its DNS queries): however fast
//! the guest sends, the host does that work at most at the bucket's rate.

use std::time::Duration;

/// A token bucket: `take` returns at once while tokens last, then waits for the next one.
pub struct RateLimit {
    per_second: u32,
    tokens: u32,
    refilled: tokio::time::Instant,
}

impl RateLimit {
    pub fn new(per_second: u32) -> Self {
        Self {
            per_second,
            tokens: per_second,
            refilled: tokio::time::Instant::now(),
        }
    }

    /// Takes a token, waiting for one if none is left; true if it had to wait.
    pub async fn take(&mut self) -> bool {
        let mut waited = false;
        loop {
            let earned =
                self.refilled.elapsed().as_millis() as u64 * u64::from(self.per_second) / 1000;
            if earned > 0 {
                self.tokens =
                    (u64::from(self.tokens) + earned).min(u64::from(self.per_second)) as u32;
                self.refilled = tokio::time::Instant::now();
            }
            if self.tokens > 0 {
                self.tokens -= 1;
                return waited;
            }
            waited = true;
            tokio::time::sleep(Duration::from_millis(
                1000 / u64::from(self.per_second.max(1)),
            ))
            .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn guest_driven_loops_take_at_most_their_rate() {
        let mut bucket = RateLimit::new(10);
        let started = tokio::time::Instant::now();
        let mut waited = 0;
        for _ in 0..100 {
            waited += usize::from(bucket.take().await);
        }
        // The first second's worth is taken at once; the rest waits.
        assert_eq!(waited, 90);
        // 10 at once, then 10 a second: 90 more take 9 seconds of (paused, virtual) time.
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(8) && took <= Duration::from_secs(10),
            "{took:?}"
        );
    }
}
