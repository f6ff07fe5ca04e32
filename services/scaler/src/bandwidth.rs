//! Load bandwidths the Scaler measured itself, from the starts it placed: checkpoint size ÷
//! the time from placement to the instance's `ready` report, per worker and storage tier.
//!
//! A worker's inventory says how fast each of its tiers loads; that claim is only the prior.
//! Once a start from a tier has been seen, the measurement replaces the claim (a worker that
//! says its copy is in GPU memory but takes a minute to start is judged by the minute), and
//! later starts move it by a fixed share ([`WEIGHT`]), so one odd start does not swing it.
//! The time measured is what placement cares about: everything until the instance serves,
//! engine start included.
//!
//! Measurements live in the leader's memory: a new leader starts from the claims again (which
//! the registry bounds, `kvstore::Inventory::validate`) and measures anew.

use std::collections::HashMap;
use std::time::Instant;

use kvstore::{Bandwidth, Tier, WorkerRecord};

/// The share of the estimate that each start after the first moves.
pub(crate) const WEIGHT: f64 = 0.3;

/// A start in progress: what it loads from where, since when.
struct Start {
    worker: String,
    tier: Tier,
    bytes: u64,
    placed: Instant,
}

/// The measured bandwidths and the starts being timed.
#[derive(Default)]
pub(crate) struct Measured {
    starts: HashMap<String, Start>,
    rates: HashMap<(String, Tier), f64>,
}

impl Measured {
    /// Times the start of `instance` on `worker`, loading `bytes` from `tier`.
    pub(crate) fn placed(&mut self, instance: &str, worker: &str, tier: Tier, bytes: u64) {
        let start = Start { worker: worker.to_string(), tier, bytes, placed: Instant::now() };
        self.starts.insert(instance.to_string(), start);
    }

    /// `instance` became ready: records the observed bandwidth. Returns its worker, whose
    /// estimates changed.
    pub(crate) fn ready(&mut self, instance: &str) -> Option<String> {
        let s = self.starts.remove(instance)?;
        let secs = s.placed.elapsed().as_secs_f64().max(1e-3);
        let observed = s.bytes as f64 / secs;
        let rate = self.rates.entry((s.worker.clone(), s.tier)).or_insert(observed);
        *rate += (observed - *rate) * WEIGHT;
        tracing::debug!(worker = %s.worker, tier = ?s.tier, observed, estimate = *rate, "load bandwidth measured");
        Some(s.worker)
    }

    /// `instance` ended without becoming ready: nothing to learn from it.
    pub(crate) fn ended(&mut self, instance: &str) {
        self.starts.remove(instance);
    }

    /// Forgets a worker that is gone.
    pub(crate) fn forget_worker(&mut self, worker: &str) {
        self.rates.retain(|(w, _), _| w != worker);
        self.starts.retain(|_, s| s.worker != worker);
    }

    /// `w` as placement should see it: its claimed bandwidths replaced by measured ones.
    pub(crate) fn apply(&self, w: &mut WorkerRecord) {
        for ((worker, tier), rate) in &self.rates {
            if *worker != w.worker_id {
                continue;
            }
            let bytes_per_second = rate.clamp(1.0, u64::MAX as f64) as u64;
            match w.inventory.bandwidths.iter_mut().find(|b| b.tier == *tier) {
                Some(b) => b.bytes_per_second = bytes_per_second,
                None => w.inventory.bandwidths.push(Bandwidth { tier: *tier, bytes_per_second }),
            }
        }
    }

    /// Starts being timed (for tests of boundedness).
    #[cfg(test)]
    fn timing(&self) -> usize {
        self.starts.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(id: &str, claimed: u64) -> WorkerRecord {
        WorkerRecord {
            worker_id: id.into(),
            epoch: 1,
            status: kvstore::WorkerStatus::Ready,
            address: id.into(),
            inventory: kvstore::Inventory {
                bandwidths: vec![Bandwidth { tier: Tier::Gpu, bytes_per_second: claimed }],
                ..Default::default()
            },
            agent_version: String::new(),
            registered_ms: 0,
            version: 1,
            free_gpus: vec![],
            instance_ids: vec![],
            lease_deadline_ms: None,
        }
    }

    #[test]
    fn a_measured_start_replaces_the_claim_and_later_ones_move_it() {
        let mut m = Measured::default();
        let mut w = worker("w1", 1 << 40);
        m.apply(&mut w);
        assert_eq!(w.inventory.bandwidths[0].bytes_per_second, 1 << 40, "the claim is the prior");

        // 10 GB "already in GPU memory" that took about a second: about 10 GB/s, not 1 TB/s.
        m.placed("i1", "w1", Tier::Gpu, 10_000_000_000);
        if let Some(s) = m.starts.get_mut("i1") {
            s.placed -= std::time::Duration::from_secs(1);
        }
        assert_eq!(m.ready("i1").as_deref(), Some("w1"));
        let mut w = worker("w1", 1 << 40);
        m.apply(&mut w);
        let first = w.inventory.bandwidths[0].bytes_per_second;
        assert!((9_000_000_000..=10_100_000_000).contains(&first), "{first}");

        // A much faster start moves it by a share, not all the way.
        m.placed("i2", "w1", Tier::Gpu, 10_000_000_000);
        if let Some(s) = m.starts.get_mut("i2") {
            s.placed -= std::time::Duration::from_millis(100);
        }
        m.ready("i2");
        let mut w = worker("w1", 1 << 40);
        m.apply(&mut w);
        let second = w.inventory.bandwidths[0].bytes_per_second as f64;
        assert!(second > first as f64 * 1.5 && second < 100e9 * 0.5, "{second}");

        // Another worker's claim is untouched; a tier never measured is added, not invented.
        let mut other = worker("w2", 1 << 40);
        m.apply(&mut other);
        assert_eq!(other.inventory.bandwidths[0].bytes_per_second, 1 << 40);
    }

    #[test]
    fn starts_that_end_or_workers_that_go_are_forgotten() {
        let mut m = Measured::default();
        m.placed("i1", "w1", Tier::Disk, 1);
        m.placed("i2", "w2", Tier::Disk, 1);
        m.ended("i1");
        assert_eq!(m.ready("i1"), None);
        m.ready("i2");
        m.forget_worker("w2");
        assert_eq!(m.timing(), 0);
        assert!(m.rates.is_empty());
    }
}
