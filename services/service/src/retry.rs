//! The one retry and backoff policy of the registry and the worker agent: tokio-retry's
//! exponential backoff with full jitter, so replicas and agents that failed together do not
//! retry together.

use std::future::Future;
use std::time::Duration;

use tokio_retry::strategy::{ExponentialBackoff, jitter};

/// Delays that start at about `base`, double on each step up to `max`, and are jittered
/// (each a random fraction of its step). Endless: take as many as a caller needs.
pub fn backoff(base: Duration, max: Duration) -> impl Iterator<Item = Duration> + Clone + use<> {
    let base_ms = base.as_millis().clamp(1, u64::MAX as u128) as u64;
    // tokio-retry raises the base to the attempt number and multiplies by the factor:
    // 2^n * base/2 gives base, 2 base, 4 base ...
    ExponentialBackoff::from_millis(2).factor((base_ms / 2).max(1)).max_delay(max).map(jitter)
}

/// A bounded retry: `attempts` calls in all, [`backoff`] from `base` up to `max` between them.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Calls in all, the first included (at least 1).
    pub attempts: usize,
    /// First delay.
    pub base: Duration,
    /// Longest delay.
    pub max: Duration,
}

impl Policy {
    /// For one Redis call on a request or report path: 3 calls, about 50 then 100 ms apart,
    /// so a blip is ridden out and an outage is reported within a fraction of a second.
    pub const REDIS_BLIP: Policy =
        Policy { attempts: 3, base: Duration::from_millis(50), max: Duration::from_millis(200) };

    /// The delays between this policy's calls.
    pub fn delays(&self) -> impl Iterator<Item = Duration> + Clone + use<> {
        backoff(self.base, self.max).take(self.attempts.max(1) - 1)
    }
}

/// Calls `op` until it succeeds, fails with an error `retryable` rejects, or `policy` runs out
/// of attempts; returns the last result.
pub async fn retry_if<T, E, F, Fut>(
    policy: Policy,
    op: F,
    retryable: impl FnMut(&E) -> bool,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    tokio_retry::RetryIf::start(policy.delays(), op, retryable).await
}

/// Calls `op` until it succeeds, fails with an error `retryable` rejects, or `within` has
/// passed since the first call began; [`backoff`] from `base` up to `max` between calls.
/// Returns the last result. For calls whose worth is bounded by time rather than by a count
/// (a session's Redis writes are worth retrying for as long as the worker's lease lasts).
pub async fn retry_for<T, E, F, Fut>(
    within: Duration,
    base: Duration,
    max: Duration,
    op: F,
    retryable: impl FnMut(&E) -> bool,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = tokio::time::Instant::now() + within;
    // tokio-retry asks for the next delay only after a failed call: a delay that would end
    // past the deadline ends the retries instead.
    let delays =
        backoff(base, max).take_while(move |d| tokio::time::Instant::now() + *d < deadline);
    tokio_retry::RetryIf::start(delays, op, retryable).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_and_never_exceeds_a_step() {
        let base = Duration::from_millis(50);
        let max = Duration::from_millis(400);
        for _ in 0..20 {
            let d: Vec<Duration> = backoff(base, max).take(6).collect();
            let caps = [50, 100, 200, 400, 400, 400].map(Duration::from_millis);
            for (d, cap) in d.iter().zip(caps) {
                assert!(*d <= cap, "{d:?} over its step {cap:?}");
            }
        }
    }

    #[test]
    fn a_policy_makes_attempts_minus_one_delays() {
        assert_eq!(Policy::REDIS_BLIP.delays().count(), 2);
        let one = Policy { attempts: 1, ..Policy::REDIS_BLIP };
        assert_eq!(one.delays().count(), 0);
        let zero = Policy { attempts: 0, ..Policy::REDIS_BLIP };
        assert_eq!(zero.delays().count(), 0);
    }

    #[tokio::test]
    async fn retry_for_retries_until_its_time_is_up_or_the_error_is_permanent() {
        let (base, max) = (Duration::from_millis(10), Duration::from_millis(40));
        let start = tokio::time::Instant::now();
        let mut calls = 0;
        let r: Result<(), &str> = retry_for(
            Duration::from_millis(500),
            base,
            max,
            || {
                calls += 1;
                async {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Err("timed out")
                }
            },
            |_| true,
        )
        .await;
        assert_eq!(r, Err("timed out"));
        // Calls of 50 ms, at most 40 ms apart, for half a second: no call starts after it.
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(400), "gave up after {took:?}");
        assert!(took < Duration::from_millis(500) + Duration::from_millis(300), "{took:?}");
        assert!((5..=10).contains(&calls), "{calls} calls");
        let mut calls = 0;
        let r: Result<u32, &str> = retry_for(
            Duration::from_secs(1),
            base,
            max,
            || {
                calls += 1;
                let n = calls;
                async move { if n < 3 { Err("blip") } else { Ok(n) } }
            },
            |_| true,
        )
        .await;
        assert_eq!(r, Ok(3));
        let mut calls = 0;
        let r: Result<(), &str> = retry_for(
            Duration::from_secs(1),
            base,
            max,
            || {
                calls += 1;
                async { Err("bad input") }
            },
            |e| *e != "bad input",
        )
        .await;
        assert_eq!((r, calls), (Err("bad input"), 1));
    }

    #[tokio::test]
    async fn retry_if_stops_at_a_permanent_error_and_after_its_attempts() {
        let fast =
            Policy { attempts: 3, base: Duration::from_millis(1), max: Duration::from_millis(2) };
        let mut calls = 0;
        let r: Result<(), &str> = retry_if(
            fast,
            || {
                calls += 1;
                async { Err("blip") }
            },
            |_| true,
        )
        .await;
        assert_eq!((r, calls), (Err("blip"), 3));
        let mut calls = 0;
        let r: Result<(), &str> = retry_if(
            fast,
            || {
                calls += 1;
                async { Err("bad input") }
            },
            |e| *e != "bad input",
        )
        .await;
        assert_eq!((r, calls), (Err("bad input"), 1));
    }
}
