//! Redis trouble as this replica sees it: calls that timed out or could not reach Redis.
//!
//! It decides two things. The lease reaper holds off while this replica's calls fail: a lease
//! that lapsed because Redis did not record the worker's heartbeats says nothing about the
//! worker, and reaping it would end a live session and send the worker back to re-join, adding
//! load to a Redis that is already behind. And operators get one WARN every few seconds that
//! names Redis, not one per worker per heartbeat.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Longest quiet between two warnings while the trouble lasts.
const WARN_EVERY: Duration = Duration::from_secs(5);

pub(crate) struct Trouble {
    start: Instant,
    /// When trouble was last seen, in ms since `start`, plus one (0: never).
    last: AtomicU64,
    /// Failed calls not yet counted in a warning.
    unreported: AtomicU64,
    /// When the last warning was logged.
    warned: Mutex<Option<Instant>>,
}

impl Default for Trouble {
    fn default() -> Self {
        Trouble {
            start: Instant::now(),
            last: AtomicU64::new(0),
            unreported: AtomicU64::new(0),
            warned: Mutex::new(None),
        }
    }
}

impl Trouble {
    /// Records that `what` failed with `err`, a retryable (Redis) error.
    pub(crate) fn note(&self, what: &str, err: &kvstore::Error) {
        let now = self.start.elapsed().as_millis() as u64 + 1;
        self.last.fetch_max(now, Ordering::Relaxed);
        self.unreported.fetch_add(1, Ordering::Relaxed);
        let Ok(mut warned) = self.warned.lock() else { return };
        if warned.is_some_and(|t| t.elapsed() < WARN_EVERY) {
            return;
        }
        *warned = Some(Instant::now());
        let failed = self.unreported.swap(0, Ordering::Relaxed);
        let cause = if err.is_timeout() {
            "Redis did not answer within its response timeout (slow or stalled)"
        } else {
            "Redis is unreachable"
        };
        tracing::warn!(
            failed_calls = failed,
            last = what,
            error = %err,
            "{cause}; sessions are kept, and no lease is reaped until Redis has answered for a full lease"
        );
    }

    /// Whether trouble was seen within the last `window`.
    pub(crate) fn within(&self, window: Duration) -> bool {
        match self.last.load(Ordering::Relaxed) {
            0 => false,
            last => {
                let now = self.start.elapsed().as_millis() as u64 + 1;
                now.saturating_sub(last) < window.as_millis() as u64
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trouble_is_remembered_for_its_window() {
        let t = Trouble::default();
        assert!(!t.within(Duration::from_secs(60)));
        let err = kvstore::Error::Pool("timed out waiting for a connection".into());
        for _ in 0..1000 {
            t.note("heartbeat", &err);
        }
        assert!(t.within(Duration::from_secs(60)));
        assert!(!t.within(Duration::ZERO));
        // One warning for the burst; the rest wait for the next one.
        assert_eq!(t.unreported.load(Ordering::Relaxed), 999);
    }
}
