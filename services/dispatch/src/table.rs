//! The routing table: for each model, its ready instances with their in-flight counts; for each
//! attached worker, the link its requests go down. Loaded from kvstore at start and kept current
//! from the event stream; the request path reads it without touching Redis.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use sllm_api::v1 as pb;
use tokio::sync::{Notify, broadcast, mpsc};

/// A message from a worker about one request.
#[derive(Debug)]
pub(crate) enum FromWorker {
    Chunk(pb::WorkerChunk),
    Finished(pb::WorkerFinished),
    Error(pb::WorkerError),
}

/// A ready instance.
pub(crate) struct Routable {
    pub(crate) instance_id: String,
    pub(crate) worker_id: String,
    pub(crate) in_flight: AtomicU32,
}

/// A model's metric series, looked up once when the model is added, so the request path never
/// pays a label lookup (a hash and a lock) per request or per chunk.
pub(crate) struct RouteMetrics {
    pub(crate) in_flight: prometheus::IntGauge,
    pub(crate) ttft: prometheus::Histogram,
    pub(crate) tokens: prometheus::IntCounter,
    pub(crate) queue_depth: prometheus::IntGauge,
    pub(crate) queue_wait: prometheus::Histogram,
    pub(crate) retries: prometheus::IntCounter,
}

impl RouteMetrics {
    fn new(model: &str) -> RouteMetrics {
        let m = &*telemetry::metrics::DISPATCH;
        let l = &[model];
        RouteMetrics {
            in_flight: m.in_flight.with_label_values(l),
            ttft: m.ttft.with_label_values(l),
            tokens: m.tokens.with_label_values(l),
            queue_depth: m.queue_depth.with_label_values(l),
            queue_wait: m.queue_wait.with_label_values(l),
            retries: m.retries.with_label_values(l),
        }
    }
}

/// One model's routes and waiting room.
pub(crate) struct ModelRoute {
    pub(crate) metrics: RouteMetrics,
    pub(crate) name: String,
    pub(crate) deleting: AtomicBool,
    pub(crate) removed: AtomicBool,
    pub(crate) instances: RwLock<Vec<Arc<Routable>>>,
    /// Requests held for an instance.
    pub(crate) waiting: AtomicU64,
    /// Requests being served.
    pub(crate) in_flight: AtomicU64,
    /// Woken when a route may have appeared (instance ready, worker attached) or the model went.
    pub(crate) changed: Notify,
    /// Cold-start progress of this model, for held requests that asked for it.
    pub(crate) progress: broadcast::Sender<pb::Progress>,
    /// When this replica last raised a demand event for the model.
    pub(crate) last_demand_event: Mutex<Option<Instant>>,
}

impl ModelRoute {
    fn new(name: &str) -> ModelRoute {
        ModelRoute {
            metrics: RouteMetrics::new(name),
            name: name.to_string(),
            deleting: AtomicBool::new(false),
            removed: AtomicBool::new(false),
            instances: RwLock::new(Vec::new()),
            waiting: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            changed: Notify::new(),
            progress: broadcast::channel(16).0,
            last_demand_event: Mutex::new(None),
        }
    }

    /// Whether a demand event should be raised now (at most one per `every`).
    pub(crate) fn demand_due(&self, every: Duration) -> bool {
        let Ok(mut last) = self.last_demand_event.lock() else { return true };
        let now = Instant::now();
        match *last {
            Some(t) if now.duration_since(t) < every => false,
            _ => {
                *last = Some(now);
                true
            }
        }
    }
}

/// A worker's failure record: after `threshold` failures in a row it is skipped for a while.
pub(crate) struct Breaker {
    failures: AtomicU32,
    open_until_ms: AtomicU64,
}

impl Breaker {
    fn new() -> Breaker {
        Breaker { failures: AtomicU32::new(0), open_until_ms: AtomicU64::new(0) }
    }

    pub(crate) fn allows(&self, now_ms: u64) -> bool {
        self.open_until_ms.load(Ordering::Relaxed) <= now_ms
    }

    pub(crate) fn success(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }

    /// Records a failure; returns true if that opened the breaker.
    pub(crate) fn failure(&self, threshold: u32, cooldown: Duration) -> bool {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= threshold {
            self.failures.store(0, Ordering::Relaxed);
            self.open_until_ms.store(clock_ms() + cooldown.as_millis() as u64, Ordering::Relaxed);
            true
        } else {
            false
        }
    }
}

/// An attached worker's link.
pub(crate) struct WorkerLink {
    pub(crate) worker_id: String,
    pub(crate) epoch: u64,
    /// The agent process run (see `AttachHello.run_id`).
    pub(crate) run_id: String,
    pub(crate) tx: mpsc::Sender<Result<pb::AttachDown, tonic::Status>>,
    pub(crate) pending: Mutex<HashMap<u64, mpsc::UnboundedSender<FromWorker>>>,
    pub(crate) breaker: Breaker,
}

impl WorkerLink {
    pub(crate) fn new(
        worker_id: String,
        epoch: u64,
        run_id: String,
        tx: mpsc::Sender<Result<pb::AttachDown, tonic::Status>>,
    ) -> WorkerLink {
        WorkerLink {
            worker_id,
            epoch,
            run_id,
            tx,
            pending: Mutex::new(HashMap::new()),
            breaker: Breaker::new(),
        }
    }

    /// Routes a worker's message to the request it belongs to.
    pub(crate) fn deliver(&self, request_id: u64, msg: FromWorker, last: bool) {
        let Ok(mut pending) = self.pending.lock() else { return };
        let sender =
            if last { pending.remove(&request_id) } else { pending.get(&request_id).cloned() };
        if let Some(s) = sender {
            // The request may have ended meanwhile; then nobody needs the message.
            let _ = s.send(msg);
        }
    }

    /// Ends every request in flight on this link (their senders drop).
    pub(crate) fn fail_all(&self) {
        if let Ok(mut pending) = self.pending.lock() {
            pending.clear();
        }
    }
}

/// The whole table.
#[derive(Default)]
pub(crate) struct Table {
    models: RwLock<HashMap<String, Arc<ModelRoute>>>,
    workers: RwLock<HashMap<String, Arc<WorkerLink>>>,
}

/// Milliseconds on a monotonic-enough wall clock (breaker deadlines only).
pub(crate) fn clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Table {
    pub(crate) fn model(&self, name: &str) -> Option<Arc<ModelRoute>> {
        self.models.read().ok()?.get(name).cloned()
    }

    /// Every model (for /v1/models and demand reports).
    pub(crate) fn models(&self) -> Vec<Arc<ModelRoute>> {
        self.models.read().map(|m| m.values().cloned().collect()).unwrap_or_default()
    }

    /// Adds a deployment (or clears its deleting mark).
    pub(crate) fn upsert_model(&self, name: &str, deleting: bool) {
        let route = {
            let Ok(mut models) = self.models.write() else { return };
            models
                .entry(name.to_string())
                .or_insert_with(|| Arc::new(ModelRoute::new(name)))
                .clone()
        };
        route.deleting.store(deleting, Ordering::Relaxed);
        route.changed.notify_waiters();
    }

    /// Forgets a deployment; requests held for it are woken to fail.
    pub(crate) fn remove_model(&self, name: &str) {
        let removed = self.models.write().ok().and_then(|mut m| m.remove(name));
        if let Some(route) = removed {
            route.removed.store(true, Ordering::Relaxed);
            route.changed.notify_waiters();
        }
    }

    /// Makes an instance routable.
    pub(crate) fn add_instance(&self, model: &str, instance_id: &str, worker_id: &str) {
        let Some(route) = self.model(model) else { return };
        if let Ok(mut list) = route.instances.write()
            && !list.iter().any(|i| i.instance_id == instance_id)
        {
            list.push(Arc::new(Routable {
                instance_id: instance_id.to_string(),
                worker_id: worker_id.to_string(),
                in_flight: AtomicU32::new(0),
            }));
        }
        route.changed.notify_waiters();
    }

    /// Stops routing to an instance (draining, stopped, failed, lost). Requests in flight on
    /// it finish.
    pub(crate) fn remove_instance(&self, model: &str, instance_id: &str) {
        let routes = match self.model(model) {
            Some(r) => vec![r],
            None => self.models(),
        };
        for route in routes {
            if let Ok(mut list) = route.instances.write() {
                list.retain(|i| i.instance_id != instance_id);
            }
        }
    }

    /// Stops routing to every instance of a worker.
    pub(crate) fn remove_worker_instances(&self, worker_id: &str) {
        for route in self.models() {
            if let Ok(mut list) = route.instances.write() {
                list.retain(|i| i.worker_id != worker_id);
            }
        }
    }

    /// Replaces the whole table from a full read, keeping in-flight counts of instances that
    /// stay.
    pub(crate) fn reload(
        &self,
        deployments: &[(String, bool)],
        ready: &[(String, String, String)],
    ) {
        let names: HashSet<&str> = deployments.iter().map(|(n, _)| n.as_str()).collect();
        let stale: Vec<String> = self
            .models
            .read()
            .map(|m| m.keys().filter(|k| !names.contains(k.as_str())).cloned().collect())
            .unwrap_or_default();
        for name in stale {
            self.remove_model(&name);
        }
        for (name, deleting) in deployments {
            self.upsert_model(name, *deleting);
        }
        let mut by_model: HashMap<&str, Vec<(&str, &str)>> = HashMap::new();
        for (model, instance, worker) in ready {
            by_model.entry(model.as_str()).or_default().push((instance.as_str(), worker.as_str()));
        }
        for route in self.models() {
            let fresh = by_model.remove(route.name.as_str()).unwrap_or_default();
            if let Ok(mut list) = route.instances.write() {
                let old: HashMap<String, Arc<Routable>> =
                    list.drain(..).map(|r| (r.instance_id.clone(), r)).collect();
                for (instance, worker) in fresh {
                    let r = old.get(instance).cloned().unwrap_or_else(|| {
                        Arc::new(Routable {
                            instance_id: instance.to_string(),
                            worker_id: worker.to_string(),
                            in_flight: AtomicU32::new(0),
                        })
                    });
                    list.push(r);
                }
            }
            route.changed.notify_waiters();
        }
    }

    /// Attaches a worker (replacing an older link of an older or equal epoch). Returns false
    /// if a newer epoch is attached already. New requests go to the new link; requests in
    /// flight on the old one finish there if both come from the same agent run (the worker
    /// only moved its registry session), and fail at once (to be retried) if not.
    pub(crate) fn attach(&self, link: Arc<WorkerLink>) -> bool {
        let link_run_id = link.run_id.clone();
        let old = {
            let Ok(mut workers) = self.workers.write() else { return false };
            if let Some(existing) = workers.get(&link.worker_id)
                && existing.epoch > link.epoch
            {
                return false;
            }
            let old = workers.insert(link.worker_id.clone(), link);
            telemetry::metrics::DISPATCH.attached.set(workers.len() as i64);
            old
        };
        if let Some(old) = old
            && (old.run_id.is_empty() || old.run_id != link_run_id)
        {
            old.fail_all();
        }
        for route in self.models() {
            route.changed.notify_waiters();
        }
        true
    }

    /// Detaches `link` if it is still the worker's current one.
    pub(crate) fn detach(&self, link: &Arc<WorkerLink>) {
        if let Ok(mut workers) = self.workers.write()
            && workers.get(&link.worker_id).is_some_and(|l| Arc::ptr_eq(l, link))
        {
            workers.remove(&link.worker_id);
            telemetry::metrics::DISPATCH.attached.set(workers.len() as i64);
        }
        link.fail_all();
    }

    /// Picks a route for `route`'s next request: the less loaded of two random ready instances
    /// on attached workers whose breaker is closed, skipping `exclude`.
    pub(crate) fn pick(
        &self,
        route: &ModelRoute,
        exclude: &HashSet<String>,
    ) -> Option<(Arc<Routable>, Arc<WorkerLink>)> {
        let instances = route.instances.read().ok()?;
        let workers = self.workers.read().ok()?;
        let now = clock_ms();
        let candidates: Vec<(&Arc<Routable>, &Arc<WorkerLink>)> = instances
            .iter()
            .filter(|i| !exclude.contains(&i.instance_id))
            .filter_map(|i| {
                workers.get(&i.worker_id).filter(|l| l.breaker.allows(now)).map(|l| (i, l))
            })
            .collect();
        let chosen = match candidates.len() {
            0 => return None,
            1 => candidates[0],
            n => {
                let a = rand::random_range(0..n);
                let mut b = rand::random_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                let (ia, ib) = (candidates[a], candidates[b]);
                if ib.0.in_flight.load(Ordering::Relaxed) < ia.0.in_flight.load(Ordering::Relaxed) {
                    ib
                } else {
                    ia
                }
            }
        };
        Some((chosen.0.clone(), chosen.1.clone()))
    }
}
