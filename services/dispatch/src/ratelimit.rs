//! Per-caller rate limits, decided locally: a request never waits on Redis.
//!
//! Each replica keeps a token bucket per caller (API key, or address without keys) and fills it
//! at this replica's *share* of the caller's rate. A background task refreshes the shares every
//! `refresh` interval: it reports each caller's demand here (requests per second arriving, an
//! average over about a second that follows increases at once) and leases a share back from
//! `kvstore` (`rate_share.lua`), which never lets the unexpired leases of one caller sum above
//! the configured rate. A caller that uses one replica gets the whole rate there; one spread
//! over replicas gets it split by demand.
//!
//! With Redis away, leases lapse (after five refresh intervals) and each replica falls back to
//! an equal part, rate / live replicas as last seen; limiting goes on, locally.
//!
//! How far over the rate the fleet can go is written in docs/operations.md ("Rate limits");
//! the terms come from three places: buckets round up to one whole request ([`Shared::cap`]),
//! a caller new to a replica starts with a full bucket until its first lease, one round trip
//! later ([`Shared::take`] wakes the refresher), and a share is applied up to one refresh late.
//!
//! The caller map is bounded: callers idle for [`IDLE`] with a full bucket are dropped at the
//! next refresh, and past `max_callers` new callers share one overflow bucket.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use kvstore::Store;
use kvstore::ratelimit::{RATE_SHARE_BATCH, RateLimit};
use tokio::sync::Notify;

/// A caller idle this long with a full bucket is forgotten.
pub(crate) const IDLE: Duration = Duration::from_secs(30);
/// Time constant of the demand average.
const DEMAND_TAU: Duration = Duration::from_secs(1);
/// Leases last this many refresh intervals.
const LEASE_REFRESHES: u32 = 5;
/// The bucket new callers share once the map is full.
const OVERFLOW: &str = "overflow";
/// Least time between two refreshes (a burst of new callers wakes the task only so often).
const MIN_GAP: Duration = Duration::from_millis(10);

/// The local rate limiter of one Dispatch replica. Cheap to share; its refresher task stops
/// when the limiter is dropped.
pub(crate) struct Limiter {
    shared: Arc<Shared>,
    store: Store,
    replica: String,
    started: std::sync::Once,
}

struct Shared {
    limit: RateLimit,
    refresh: Duration,
    lease: Duration,
    max_callers: usize,
    state: Mutex<State>,
    wake: Notify,
}

struct State {
    callers: HashMap<String, Caller>,
    fleet: Fleet,
    /// When a full map was last swept for idle callers (at most once a second: a flood of
    /// new callers must not make every request walk the whole map).
    swept: Option<Instant>,
}

/// What the last refreshes said about the fleet.
#[derive(Clone, Copy)]
struct Fleet {
    /// Live replicas as last seen (1 until the first refresh).
    replicas: u64,
    /// Until when a refresh is known to work: a caller new here may use the whole rate until
    /// its first lease arrives, but only while Redis answers.
    healthy_until: Option<Instant>,
}

struct Caller {
    tokens: f64,
    at: Instant,
    last_seen: Instant,
    /// Requests since the last report.
    arrivals: u64,
    reported_at: Instant,
    /// Smoothed demand, requests per second.
    average: f64,
    /// The leased rate and until when it holds.
    lease: Option<(f64, Instant)>,
    /// Admitted before the first lease arrived (taken off the first leased bucket).
    spent_unleased: f64,
}

impl Shared {
    /// The rate `c` is filled at now.
    fn rate(&self, fleet: Fleet, c: &Caller, now: Instant) -> f64 {
        match c.lease {
            Some((grant, until)) if now < until => grant,
            None if fleet.healthy_until.is_some_and(|h| now < h) => self.limit.per_second,
            _ => self.limit.per_second / fleet.replicas.max(1) as f64,
        }
    }

    /// The bucket size at `rate`: its share of the burst, at least one whole request.
    fn cap(&self, rate: f64) -> f64 {
        (f64::from(self.limit.burst) * rate / self.limit.per_second).max(1.0)
    }

    /// Brings `c`'s tokens up to `now` at the rate in force.
    fn settle(&self, fleet: Fleet, c: &mut Caller, now: Instant) -> (f64, f64) {
        let rate = self.rate(fleet, c, now);
        let cap = self.cap(rate);
        let dt = now.saturating_duration_since(c.at).as_secs_f64();
        c.tokens = (c.tokens + rate * dt).min(cap);
        c.at = now;
        (rate, cap)
    }
}

impl Limiter {
    /// A limiter for `limit`, refreshing its shares through `store` every `refresh` as
    /// `replica`, remembering at most `max_callers` callers.
    pub(crate) fn new(
        store: Store,
        replica: String,
        limit: RateLimit,
        refresh: Duration,
        max_callers: usize,
    ) -> Limiter {
        let refresh = refresh.max(MIN_GAP);
        let shared = Arc::new(Shared {
            limit,
            refresh,
            lease: refresh * LEASE_REFRESHES,
            max_callers: max_callers.max(1),
            state: Mutex::new(State {
                callers: HashMap::new(),
                fleet: Fleet { replicas: 1, healthy_until: None },
                swept: None,
            }),
            wake: Notify::new(),
        });
        let limiter = Limiter { shared, store, replica, started: std::sync::Once::new() };
        if tokio::runtime::Handle::try_current().is_ok() {
            limiter.start();
        }
        limiter
    }

    /// Starts the refresher (once; needs a tokio runtime).
    fn start(&self) {
        self.started.call_once(|| {
            tokio::spawn(refresher(
                Arc::downgrade(&self.shared),
                self.store.clone(),
                self.replica.clone(),
            ));
        });
    }

    /// Takes one request from `caller`'s bucket; Err: refused, try again after this long.
    pub(crate) fn take(&self, caller: &str) -> Result<(), Duration> {
        self.start();
        self.shared.take(caller, Instant::now())
    }
}

impl Shared {
    /// Takes one request from `caller`'s bucket at `now`.
    fn take(&self, caller: &str, now: Instant) -> Result<(), Duration> {
        // A poisoned lock only means another request panicked mid-update; the numbers are
        // still numbers.
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut key = caller;
        if !st.callers.contains_key(key) {
            if st.callers.len() >= self.max_callers
                && st
                    .swept
                    .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1))
            {
                st.swept = Some(now);
                evict_idle(self, &mut st, now);
            }
            if st.callers.len() >= self.max_callers {
                key = OVERFLOW;
            }
            if !st.callers.contains_key(key) {
                let fresh = Caller {
                    tokens: f64::INFINITY,
                    at: now,
                    last_seen: now,
                    arrivals: 0,
                    reported_at: now,
                    average: 0.0,
                    lease: None,
                    spent_unleased: 0.0,
                };
                st.callers.insert(key.to_string(), fresh);
                // Its first lease at once, not at the next tick: that bounds how long it may
                // use more than its share.
                self.wake.notify_one();
            }
        }
        let fleet = st.fleet;
        let Some(c) = st.callers.get_mut(key) else {
            // Inserted just above under the same lock.
            return Ok(());
        };
        let (rate, _) = self.settle(fleet, c, now);
        c.arrivals += 1;
        c.last_seen = now;
        let outcome = if c.tokens >= 1.0 {
            c.tokens -= 1.0;
            if c.lease.is_none() {
                c.spent_unleased += 1.0;
            }
            Ok(())
        } else if rate > 0.0 {
            Err(Duration::from_secs_f64(((1.0 - c.tokens) / rate).min(3600.0)))
        } else {
            // Every share is held elsewhere for now; the next refreshes move some here.
            Err(self.refresh * 2)
        };
        outcome.map_err(|d| d.max(Duration::from_millis(1)))
    }
}

/// Drops callers idle for [`IDLE`] whose bucket is full again (forgetting them gives nothing
/// away: a new bucket starts full too).
fn evict_idle(sh: &Shared, st: &mut State, now: Instant) {
    let fleet = st.fleet;
    st.callers.retain(|_, c| {
        if now.saturating_duration_since(c.last_seen) < IDLE {
            return true;
        }
        let (_, cap) = sh.settle(fleet, c, now);
        c.tokens < cap
    });
}

/// The demand to report for each caller now (and the report clock reset).
fn demand(sh: &Shared, st: &mut State, now: Instant) -> Vec<(String, f64)> {
    evict_idle(sh, st, now);
    st.callers
        .iter_mut()
        .map(|(name, c)| {
            let dt = now.saturating_duration_since(c.reported_at);
            // A first report after a few milliseconds is not a burst of thousands per second.
            let instant = c.arrivals as f64 / dt.max(sh.refresh).as_secs_f64();
            let alpha = 1.0 - (-dt.as_secs_f64() / DEMAND_TAU.as_secs_f64()).exp();
            c.average += alpha * (instant - c.average);
            c.arrivals = 0;
            c.reported_at = now;
            (name.clone(), instant.max(c.average))
        })
        .collect()
}

/// Applies leases got from a refresh sent at `sent`.
fn apply(sh: &Shared, st: &mut State, sent: Instant, callers: &[(String, f64)], grants: &[f64]) {
    let now = Instant::now();
    let until = sent + sh.lease;
    let fleet = st.fleet;
    for ((name, _), &grant) in callers.iter().zip(grants) {
        let Some(c) = st.callers.get_mut(name) else { continue };
        sh.settle(fleet, c, now);
        let first = c.lease.is_none();
        c.lease = Some((grant, until));
        let cap = sh.cap(grant);
        c.tokens = if first { (cap - c.spent_unleased).max(0.0) } else { c.tokens.min(cap) };
        c.spent_unleased = 0.0;
    }
}

/// Refreshes the shares every interval (or at once for a new caller) until the limiter goes.
async fn refresher(shared: Weak<Shared>, store: Store, replica: String) {
    let mut failing = false;
    loop {
        let Some(sh) = shared.upgrade() else { return };
        let (refresh, lease, limit) = (sh.refresh, sh.lease, sh.limit);
        let wait = tokio::time::sleep(refresh);
        tokio::select! {
            () = wait => {}
            () = sh.wake.notified() => {}
        }
        let sent = Instant::now();
        let report = {
            let mut st = sh.state.lock().unwrap_or_else(|p| p.into_inner());
            demand(&sh, &mut st, sent)
        };
        let mut ok = true;
        // An empty report still renews this replica's place in the count of live replicas.
        let mut chunks: Vec<&[(String, f64)]> = report.chunks(RATE_SHARE_BATCH).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        for chunk in chunks {
            let pairs: Vec<(&str, f64)> = chunk.iter().map(|(n, d)| (n.as_str(), *d)).collect();
            let call = store.refresh_rate_shares(&replica, limit, lease, &pairs);
            match tokio::time::timeout(lease, call).await {
                Ok(Ok(shares)) => {
                    let mut st = sh.state.lock().unwrap_or_else(|p| p.into_inner());
                    st.fleet = Fleet {
                        replicas: shares.replicas.max(1),
                        healthy_until: Some(sent + lease),
                    };
                    apply(&sh, &mut st, sent, chunk, &shares.grants);
                }
                Ok(Err(e)) => {
                    if !failing {
                        tracing::warn!(error = %e, "cannot refresh rate-limit shares; deciding on the last ones");
                    }
                    ok = false;
                    break;
                }
                Err(_) => {
                    if !failing {
                        tracing::warn!(
                            "rate-limit share refresh timed out; deciding on the last ones"
                        );
                    }
                    ok = false;
                    break;
                }
            }
        }
        if ok && failing {
            tracing::info!("rate-limit shares refreshed again");
        }
        failing = !ok;
        drop(sh);
        tokio::time::sleep(MIN_GAP).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(per_second: f64, burst: u32) -> Shared {
        Shared {
            limit: RateLimit { per_second, burst },
            refresh: Duration::from_millis(200),
            lease: Duration::from_secs(1),
            max_callers: 4,
            state: Mutex::new(State {
                callers: HashMap::new(),
                fleet: Fleet { replicas: 1, healthy_until: None },
                swept: None,
            }),
            wake: Notify::new(),
        }
    }

    fn caller(now: Instant) -> Caller {
        Caller {
            tokens: 0.0,
            at: now,
            last_seen: now,
            arrivals: 0,
            reported_at: now,
            average: 0.0,
            lease: None,
            spent_unleased: 0.0,
        }
    }

    #[test]
    fn the_rate_follows_the_lease_then_falls_back_to_an_equal_part() {
        let sh = shared(10.0, 10);
        let now = Instant::now();
        let mut fleet = Fleet { replicas: 4, healthy_until: Some(now + sh.lease) };
        let mut c = caller(now);
        assert_eq!(sh.rate(fleet, &c, now), 10.0, "new caller, Redis answering: the whole rate");
        fleet.healthy_until = None;
        assert_eq!(sh.rate(fleet, &c, now), 2.5, "new caller, Redis away: an equal part");
        c.lease = Some((7.0, now + Duration::from_secs(1)));
        assert_eq!(sh.rate(fleet, &c, now), 7.0);
        assert_eq!(sh.rate(fleet, &c, now + Duration::from_secs(2)), 2.5, "a lapsed lease");
        assert_eq!(sh.cap(7.0), 7.0);
        assert_eq!(sh.cap(0.0), 1.0, "a bucket always holds one whole request");
    }

    #[test]
    fn demand_is_a_rate_that_rises_at_once_and_decays() {
        let sh = shared(10.0, 10);
        let t0 = Instant::now();
        let mut st = State {
            callers: HashMap::new(),
            fleet: Fleet { replicas: 1, healthy_until: None },
            swept: None,
        };
        let mut c = caller(t0);
        c.arrivals = 4;
        c.last_seen = t0 + Duration::from_millis(200);
        st.callers.insert("a".into(), c);
        let d = demand(&sh, &mut st, t0 + Duration::from_millis(200));
        assert!((d[0].1 - 20.0).abs() < 1e-9, "4 requests in 200 ms: {d:?}");
        let d = demand(&sh, &mut st, t0 + Duration::from_millis(1200));
        assert!(d[0].1 > 0.0 && d[0].1 < 20.0, "then it decays: {d:?}");
    }

    #[test]
    fn the_caller_map_stays_bounded() {
        let sh = shared(1.0, 1);
        let t0 = Instant::now();
        for i in 0..100 {
            let _ = sh.take(&format!("c{i}"), t0);
        }
        let len = |sh: &Shared| sh.state.lock().map(|s| s.callers.len()).unwrap_or(0);
        assert_eq!(len(&sh), 5, "four callers and the overflow bucket");
        assert!(sh.take("c0", t0).is_err(), "c0 spent its one-request burst");
        // Idle callers with full buckets make room again.
        assert!(sh.take("late", t0 + IDLE + Duration::from_secs(2)).is_ok());
        assert_eq!(len(&sh), 1, "the idle ones were dropped for it");
    }

    #[test]
    fn a_refusal_says_when_a_token_is_back() {
        let sh = shared(2.0, 1);
        let t0 = Instant::now();
        assert!(sh.take("a", t0).is_ok());
        let wait = sh.take("a", t0).unwrap_err();
        assert!(
            wait > Duration::from_millis(400) && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        assert!(sh.take("a", t0 + wait).is_ok());
    }
}
