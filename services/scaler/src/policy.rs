//! The Scaler's pure decisions, with no I/O: how many instances a model should have, which
//! worker should start a new one, and whether the fleet can hold the model at all.
//!
//! # Placement: fast starts, spread replicas
//!
//! Every ready worker with enough free GPUs is a candidate. Its *estimate* is the time to load
//! the checkpoint from the best tier the worker holds it on (size ÷ that tier's bandwidth;
//! remote storage when it holds none) plus the loads already in progress there. A copy in GPU
//! memory that the model's own instances occupy counts as host memory: a new replica needs GPUs
//! of its own and loads through the host, so a running instance is no near-free start for the
//! next one.
//!
//! The *score* is the estimate plus [`SPREAD_PENALTY_S`] (30 s) for every instance of the model
//! the worker already has (pending, loading or ready); the lowest score wins, and scores within
//! a millisecond go to the worker with fewer replicas, then to the lower worker id. So, at first
//! placement, on scale-out and on replacement alike, a model's instances go to different
//! workers whenever one has room, and losing one host never takes all of a model's capacity.
//! Locality still wins when the difference is large: a worker that already runs the model gets
//! another replica only if it would start it more than 30 s sooner than any worker without one
//! (e.g. the only host holding a 70 GB checkpoint in memory, ~3 s, against remote storage at
//! 1 GB/s, ~70 s). A model that needs the fleet's last free GPUs still gets them: the penalty
//! orders candidates, it never refuses one.
//!
//! # Unplaceable models
//!
//! [`unplaceable`] says when a model can never be placed on the live (ready) fleet as it is —
//! it needs more GPUs than the largest worker has — judged against the workers' whole capacity,
//! not their free GPUs: a model waiting for GPUs to free up is not unplaceable. With no ready
//! worker at all it says nothing (workers may be starting), and a verdict given earlier is
//! withdrawn.

use std::borrow::Cow;
use std::time::{Duration, Instant};

use kvstore::{AutoScaling, Tier, WorkerRecord};

/// Instances wanted for `demand` under `policy`: clamp(ceil(demand / target), min, max).
pub fn wanted(demand: u64, policy: &AutoScaling) -> u32 {
    let raw = if demand == 0 { 0.0 } else { (demand as f64 / policy.target).ceil() };
    let raw = if raw.is_finite() { raw.min(u32::MAX as f64) as u32 } else { policy.max_instances };
    raw.clamp(policy.min_instances, policy.max_instances)
}

/// The committed desired count after a new computation: up at once; down only once the wanted
/// count has stayed below the committed one for `keep_alive`. `below_since` tracks that.
pub fn commit(
    committed: u32,
    wanted: u32,
    keep_alive: Duration,
    below_since: &mut Option<Instant>,
    now: Instant,
) -> u32 {
    if wanted >= committed {
        *below_since = None;
        return wanted;
    }
    let since = *below_since.get_or_insert(now);
    if now.duration_since(since) >= keep_alive {
        *below_since = None;
        wanted
    } else {
        committed
    }
}

/// Default load bandwidth of a tier when a worker did not report one (bytes/s).
fn default_bandwidth(tier: Tier) -> u64 {
    match tier {
        Tier::Gpu => 1 << 40,
        Tier::HostMemory => 16 << 30,
        Tier::Disk => 2 << 30,
        Tier::Remote => 500 << 20,
    }
}

/// Human word for a tier.
pub fn tier_words(tier: Tier) -> &'static str {
    match tier {
        Tier::Gpu => "checkpoint already in GPU memory",
        Tier::HostMemory => "checkpoint in host memory",
        Tier::Disk => "checkpoint on local disk",
        Tier::Remote => "checkpoint fetched from remote storage",
    }
}

/// Estimated seconds to load `model` on `w`: its size over the bandwidth of the best tier holding
/// it there (remote if the worker does not hold it).
pub fn load_estimate(w: &WorkerRecord, model: &str, fallback_size: u64) -> (f64, Tier) {
    estimate_from(w, model, fallback_size, false)
}

/// Like [`load_estimate`], for one more instance of a model that already has `replicas` on `w`:
/// their GPU copy is theirs, so it counts as host memory.
pub fn replica_estimate(
    w: &WorkerRecord,
    model: &str,
    fallback_size: u64,
    replicas: usize,
) -> (f64, Tier) {
    estimate_from(w, model, fallback_size, replicas > 0)
}

fn estimate_from(
    w: &WorkerRecord,
    model: &str,
    fallback_size: u64,
    gpu_copy_taken: bool,
) -> (f64, Tier) {
    let (size, tier) = w
        .inventory
        .checkpoints
        .iter()
        .filter(|c| c.model == model)
        .map(|c| {
            let tier =
                if gpu_copy_taken && c.tier == Tier::Gpu { Tier::HostMemory } else { c.tier };
            (c.size_bytes, tier)
        })
        .min_by_key(|(_, t)| *t)
        .unwrap_or((fallback_size, Tier::Remote));
    let bw = w
        .inventory
        .bandwidths
        .iter()
        .find(|b| b.tier == tier)
        .map(|b| b.bytes_per_second)
        .unwrap_or_else(|| default_bandwidth(tier))
        .max(1);
    (size as f64 / bw as f64, tier)
}

/// Seconds of estimated start time that one more replica of a model on the same worker costs in
/// the placement score (see the module documentation).
pub const SPREAD_PENALTY_S: f64 = 30.0;

/// A candidate worker for a new instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate<'a> {
    /// The worker.
    pub worker: &'a WorkerRecord,
    /// GPUs it would get.
    pub gpus: Vec<u32>,
    /// Estimated seconds until it is ready: its own load plus the worker's loads in progress.
    pub estimate: f64,
    /// Where its checkpoint comes from.
    pub tier: Tier,
    /// Instances of the model the worker already has.
    pub replicas: usize,
}

/// Picks the worker for a new instance of `model` needing `num_gpus` GPUs: the lowest
/// estimate plus [`SPREAD_PENALTY_S`] per replica already there (see the module
/// documentation). `free(w)` gives the GPUs still free on `w`, `queue(w)` its loads in progress
/// (seconds) and `replicas(w)` how many instances of the model it already has. The same choice
/// as [`choose`] over the offers these make.
pub fn place<'a>(
    workers: impl Iterator<Item = &'a WorkerRecord>,
    model: &str,
    num_gpus: u32,
    fallback_size: u64,
    free: impl Fn(&WorkerRecord) -> Vec<u32>,
    queue: impl Fn(&WorkerRecord) -> f64,
    replicas: impl Fn(&WorkerRecord) -> usize,
) -> Option<Candidate<'a>> {
    let offers = workers.map(|w| Offer {
        worker: w,
        free: Cow::Owned(free(w)),
        queue: queue(w),
        replicas: replicas(w),
    });
    choose(offers, model, num_gpus, fallback_size)
}

/// One worker offered to [`choose`], with what the choice needs of it besides its record.
#[derive(Debug, Clone)]
pub struct Offer<'a> {
    /// The worker.
    pub worker: &'a WorkerRecord,
    /// The GPUs still free on it.
    pub free: Cow<'a, [u32]>,
    /// Its loads in progress (seconds).
    pub queue: f64,
    /// Instances of the model it already has.
    pub replicas: usize,
}

/// [`place`] over offers the caller keeps at hand (a scan of a whole fleet then costs a few
/// loads per worker): the offers, in worker id order, each scored as [`place`] documents.
pub fn choose<'a>(
    offers: impl Iterator<Item = Offer<'a>>,
    model: &str,
    num_gpus: u32,
    fallback_size: u64,
) -> Option<Candidate<'a>> {
    let mut best: Option<(Offer<'a>, f64, f64, Tier)> = None;
    for o in offers {
        if o.free.len() < num_gpus as usize {
            continue;
        }
        let w = o.worker;
        let spread = o.replicas;
        let (load, tier) = replica_estimate(w, model, fallback_size, spread);
        let estimate = load + o.queue;
        let score = estimate + SPREAD_PENALTY_S * spread as f64;
        let better = match &best {
            None => true,
            Some((b, b_score, _, _)) => {
                // Scores within a millisecond count as a tie: then spread, then the id.
                if (score - b_score).abs() > 1e-3 {
                    score < *b_score
                } else if spread != b.replicas {
                    spread < b.replicas
                } else {
                    w.worker_id < b.worker.worker_id
                }
            }
        };
        if better {
            best = Some((o, score, estimate, tier));
        }
    }
    best.map(|(o, _, estimate, tier)| {
        // The lowest free GPUs: only the chosen worker's are sorted.
        let mut gpus = o.free.into_owned();
        gpus.sort_unstable();
        gpus.truncate(num_gpus as usize);
        Candidate { worker: o.worker, gpus, estimate, tier, replicas: o.replicas }
    })
}

/// The GPU count of the largest of `workers` (the live fleet), or None if there are none.
pub fn largest_worker<'a>(workers: impl Iterator<Item = &'a WorkerRecord>) -> Option<usize> {
    workers.map(|w| w.inventory.gpus.len()).max()
}

/// Why instances of a `backend` deployment needing `num_gpus` GPUs can never be placed on a
/// live fleet whose largest worker has `largest` GPUs (see [`largest_worker`]; judged by GPU
/// counts, not free GPUs) and whose largest worker able to start `backend` has
/// `largest_for_backend`, or None if it could hold one. None too with no live worker: workers
/// may still be starting.
pub fn unplaceable(
    largest: Option<usize>,
    largest_for_backend: Option<usize>,
    backend: &str,
    num_gpus: u32,
) -> Option<String> {
    largest?;
    let Some(largest) = largest_for_backend else {
        return Some(format!("no ready worker runs backend {backend:?}"));
    };
    (largest < num_gpus as usize).then(|| {
        let gpus = |n: usize| if n == 1 { "1 GPU".to_string() } else { format!("{n} GPUs") };
        format!("needs {}; the largest worker has {}", gpus(num_gpus as usize), largest)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    use kvstore::{Bandwidth, Checkpoint, GpuInfo, Inventory, WorkerStatus};

    fn policy(min: u32, max: u32, target: f64) -> AutoScaling {
        AutoScaling { min_instances: min, max_instances: max, target, ..AutoScaling::default() }
    }

    #[test]
    fn wanted_is_clamped_ceil_of_demand_over_target() {
        assert_eq!(wanted(0, &policy(0, 4, 1.0)), 0);
        assert_eq!(wanted(0, &policy(1, 4, 1.0)), 1);
        assert_eq!(wanted(1, &policy(0, 4, 1.0)), 1);
        assert_eq!(wanted(9, &policy(0, 10, 4.0)), 3);
        assert_eq!(wanted(100, &policy(0, 5, 1.0)), 5);
        assert_eq!(wanted(3, &policy(0, 5, 0.5)), 5);
    }

    #[test]
    fn scale_up_at_once_scale_down_after_keep_alive() {
        let t0 = Instant::now();
        let ka = Duration::from_secs(10);
        let mut below = None;
        assert_eq!(commit(1, 3, ka, &mut below, t0), 3);
        assert_eq!(commit(3, 1, ka, &mut below, t0), 3);
        assert_eq!(commit(3, 1, ka, &mut below, t0 + Duration::from_secs(9)), 3);
        // Demand came back: the clock restarts.
        assert_eq!(commit(3, 3, ka, &mut below, t0 + Duration::from_secs(9)), 3);
        assert_eq!(commit(3, 0, ka, &mut below, t0 + Duration::from_secs(12)), 3);
        assert_eq!(commit(3, 0, ka, &mut below, t0 + Duration::from_secs(22)), 0);
        assert_eq!(commit(2, 0, Duration::ZERO, &mut None, t0), 0);
    }

    fn worker(id: &str, gpus: u32, checkpoints: &[(&str, u64, Tier)]) -> WorkerRecord {
        WorkerRecord {
            worker_id: id.into(),
            epoch: 1,
            status: WorkerStatus::Ready,
            address: id.into(),
            inventory: Inventory {
                gpus: (0..gpus)
                    .map(|index| GpuInfo { index, name: "sim".into(), memory_bytes: 1 })
                    .collect(),
                host_memory_bytes: 0,
                checkpoints: checkpoints
                    .iter()
                    .map(|(m, s, t)| Checkpoint { model: m.to_string(), size_bytes: *s, tier: *t })
                    .collect(),
                bandwidths: vec![
                    Bandwidth { tier: Tier::HostMemory, bytes_per_second: 10 << 30 },
                    Bandwidth { tier: Tier::Disk, bytes_per_second: 1 << 30 },
                    Bandwidth { tier: Tier::Remote, bytes_per_second: 100 << 20 },
                ],
                backends: Vec::new(),
            },
            agent_version: String::new(),
            registered_ms: 0,
            version: 1,
            free_gpus: (0..gpus).collect(),
            instance_ids: vec![],
            lease_deadline_ms: Some(0),
        }
    }

    #[test]
    fn placement_prefers_the_fastest_tier_then_spreads() {
        let ws = [
            worker("w1", 4, &[("m", 10 << 30, Tier::Disk)]),
            worker("w2", 4, &[("m", 10 << 30, Tier::HostMemory)]),
            worker("w3", 4, &[]),
        ];
        let free = |w: &WorkerRecord| w.free_gpus.clone();
        let c = place(ws.iter(), "m", 1, 10 << 30, free, |_| 0.0, |_| 0).expect("a worker");
        assert_eq!((c.worker.worker_id.as_str(), c.tier), ("w2", Tier::HostMemory));
        assert!((c.estimate - 1.0).abs() < 1e-9);
        // A queue of loads on w2 makes w1 (disk, 10 s) the better choice.
        let c = place(
            ws.iter(),
            "m",
            1,
            10 << 30,
            free,
            |w| if w.worker_id == "w2" { 20.0 } else { 0.0 },
            |_| 0,
        )
        .expect("a worker");
        assert_eq!(c.worker.worker_id, "w1");
        // Equal times: the worker with fewer replicas of the model wins.
        let even = [worker("a", 2, &[]), worker("b", 2, &[])];
        let c = place(even.iter(), "m", 1, 1, free, |_| 0.0, |w| usize::from(w.worker_id == "a"))
            .expect("one");
        assert_eq!(c.worker.worker_id, "b");
    }

    #[test]
    fn replicas_spread_when_the_locality_gain_is_small() {
        // w1 runs one replica (its GPU copy came from the load); w2 and w3 hold nothing.
        let ws = [
            worker("w1", 4, &[("m", 1 << 30, Tier::Gpu)]),
            worker("w2", 4, &[]),
            worker("w3", 4, &[]),
        ];
        let free = |w: &WorkerRecord| w.free_gpus.clone();
        let mut replicas: HashMap<String, usize> = HashMap::from([("w1".to_string(), 1)]);
        // Remote storage costs 10.2 s against 0.1 s from w1's host memory: spread wins.
        let c = place(
            ws.iter(),
            "m",
            1,
            1 << 30,
            free,
            |_| 0.0,
            |w| replicas.get(&w.worker_id).copied().unwrap_or(0),
        )
        .expect("a worker");
        assert_eq!((c.worker.worker_id.as_str(), c.tier), ("w2", Tier::Remote));
        // Scale-out keeps spreading: one replica per worker before any gets a second.
        replicas.insert("w2".into(), 1);
        let c = place(
            ws.iter(),
            "m",
            1,
            1 << 30,
            free,
            |_| 0.0,
            |w| replicas.get(&w.worker_id).copied().unwrap_or(0),
        )
        .expect("a worker");
        assert_eq!(c.worker.worker_id, "w3");
        // With no replica there, a resident GPU copy is the near-free start it looks like.
        let c = place(ws.iter(), "m", 1, 1 << 30, free, |_| 0.0, |_| 0).expect("a worker");
        assert_eq!((c.worker.worker_id.as_str(), c.tier), ("w1", Tier::Gpu));
    }

    #[test]
    fn locality_wins_when_only_one_host_holds_a_large_checkpoint() {
        // 10 GiB: 1 s from w1's memory (its GPU copy is taken by the running replica) against
        // 102 s from remote storage on w2: more than the 30 s spread penalty apart.
        let ws = [worker("w1", 4, &[("m", 10 << 30, Tier::Gpu)]), worker("w2", 4, &[])];
        let replicas = |w: &WorkerRecord| usize::from(w.worker_id == "w1");
        let free = |w: &WorkerRecord| w.free_gpus.clone();
        let c = place(ws.iter(), "m", 1, 10 << 30, free, |_| 0.0, replicas).expect("a worker");
        assert_eq!((c.worker.worker_id.as_str(), c.tier, c.replicas), ("w1", Tier::HostMemory, 1));
        assert!((c.estimate - 1.0).abs() < 1e-9, "{}", c.estimate);
        // The same checkpoint on w2's disk (10 s) is within the penalty: spread wins again.
        let ws = [
            worker("w1", 4, &[("m", 10 << 30, Tier::Gpu)]),
            worker("w2", 4, &[("m", 10 << 30, Tier::Disk)]),
        ];
        let c = place(ws.iter(), "m", 1, 10 << 30, free, |_| 0.0, replicas).expect("a worker");
        assert_eq!(c.worker.worker_id, "w2");
        // A full fleet but for the worker with the replica: it still gets the next one.
        let c = place(
            ws.iter(),
            "m",
            1,
            10 << 30,
            |w| if w.worker_id == "w2" { vec![] } else { w.free_gpus.clone() },
            |_| 0.0,
            replicas,
        )
        .expect("w1 has room");
        assert_eq!(c.worker.worker_id, "w1");
    }

    #[test]
    fn unplaceable_is_judged_by_capacity_not_free_gpus() {
        let mut busy = worker("w1", 4, &[]);
        busy.free_gpus.clear();
        let ws = [busy, worker("w2", 2, &[])];
        let largest = largest_worker(ws.iter());
        assert_eq!(largest, Some(4));
        assert_eq!(
            unplaceable(largest, largest, "vllm", 64).as_deref(),
            Some("needs 64 GPUs; the largest worker has 4")
        );
        assert_eq!(
            unplaceable(largest, largest, "vllm", 5).as_deref(),
            Some("needs 5 GPUs; the largest worker has 4")
        );
        // Waiting for w1's GPUs to free up is not unplaceable.
        assert_eq!(unplaceable(largest, largest, "vllm", 4), None);
        assert_eq!(unplaceable(largest, largest, "vllm", 1), None);
        // No live worker says nothing: workers may be starting.
        assert_eq!(largest_worker([].iter()), None);
        assert_eq!(unplaceable(None, None, "vllm", 64), None);
        // Live workers, none of which runs the backend.
        assert_eq!(
            unplaceable(largest, None, "sglang", 1).as_deref(),
            Some("no ready worker runs backend \"sglang\"")
        );
        // Only the workers that run it count.
        assert_eq!(
            unplaceable(largest, Some(2), "sglang", 4).as_deref(),
            Some("needs 4 GPUs; the largest worker has 2")
        );
    }

    #[test]
    fn placement_never_overcommits_gpus() {
        let ws = [worker("w1", 2, &[]), worker("w2", 8, &[])];
        let c =
            place(ws.iter(), "m", 4, 1, |w| w.free_gpus.clone(), |_| 0.0, |_| 0).expect("w2 fits");
        assert_eq!((c.worker.worker_id.as_str(), c.gpus.as_slice()), ("w2", &[0, 1, 2, 3][..]));
        assert!(place(ws.iter(), "m", 9, 1, |w| w.free_gpus.clone(), |_| 0.0, |_| 0).is_none());
        let busy =
            |w: &WorkerRecord| if w.worker_id == "w2" { vec![5] } else { w.free_gpus.clone() };
        assert!(place(ws.iter(), "m", 4, 1, busy, |_| 0.0, |_| 0).is_none());
    }
}
