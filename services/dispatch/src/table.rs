//! The routing table: for each model, its ready instances with their in-flight counts, the
//! instances still starting, and its waiting room; for each attached worker, the link its
//! requests go down. Loaded from kvstore at start and kept current from the event stream; the
//! request path reads it without touching Redis.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use sllm_api::v1 as pb;
use tokio::sync::{broadcast, mpsc};

use crate::room::Room;

/// A message from a worker about one request.
#[derive(Debug)]
pub(crate) enum FromWorker {
    /// The engine accepted the request (see `AttachUp.started`).
    Started,
    Chunk(pb::WorkerChunk),
    Finished(pb::WorkerFinished),
    Error(pb::WorkerError),
    /// The registry declared the worker lost: an attempt with no output yet goes elsewhere.
    Lost,
}

/// Where a worker's messages for one request go: a bounded queue (the request's flow-control
/// window and room for its end), and a mark set when the worker overran it.
pub(crate) struct Inbox {
    pub(crate) tx: mpsc::Sender<FromWorker>,
    pub(crate) overrun: Arc<AtomicBool>,
}

/// A ready instance.
pub(crate) struct Routable {
    pub(crate) instance_id: String,
    pub(crate) worker_id: String,
    pub(crate) in_flight: AtomicU32,
    /// LoRA adapters this replica has sent it requests for: it holds them loaded.
    pub(crate) adapters: Mutex<HashSet<String>>,
    /// Cancelled when the instance leaves routing (draining, stopped, failed, lost): streams
    /// on it move to another instance when one is ready.
    pub(crate) leaving: tokio_util::sync::CancellationToken,
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

    /// Drops every series of a model that is gone, so deleted models do not stay in /metrics.
    fn remove(&self, model: &str) {
        let m = &*telemetry::metrics::DISPATCH;
        let l = &[model];
        let _ = m.in_flight.remove_label_values(l);
        let _ = m.ttft.remove_label_values(l);
        let _ = m.tokens.remove_label_values(l);
        let _ = m.queue_depth.remove_label_values(l);
        let _ = m.queue_wait.remove_label_values(l);
        let _ = m.retries.remove_label_values(l);
        for outcome in crate::request::OUTCOMES {
            let _ = m.requests.remove_label_values(&[model, outcome]);
            let _ = m.duration.remove_label_values(&[model, outcome]);
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
    /// Instances placed but not ready yet (pending or loading): capacity on its way.
    pub(crate) starting: Mutex<HashSet<String>>,
    /// The deployment's `target` (demand one instance absorbs), rounded up: while capacity is
    /// on its way, an instance takes no more than this many requests.
    pub(crate) target: AtomicU32,
    /// Why no worker of the fleet can take an instance of the model, when the Scaler says so.
    pub(crate) unplaceable: RwLock<Option<String>>,
    /// Requests held for an instance, in arrival order.
    pub(crate) room: Mutex<Room>,
    /// Requests held (the room's length, readable without its lock).
    pub(crate) waiting: AtomicU64,
    /// Requests being served.
    pub(crate) in_flight: AtomicU64,
    /// Cold-start progress of this model, for held requests that asked for it.
    pub(crate) progress: broadcast::Sender<pb::Progress>,
    /// When this replica last raised a demand event for the model.
    pub(crate) last_demand_event: Mutex<Option<Instant>>,
    /// What `/v1/models` shows of the deployment besides its name.
    pub(crate) info: RwLock<RouteInfo>,
}

/// A deployment's listing: when it was created and the LoRA adapters it serves.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct RouteInfo {
    /// Creation time, seconds since the Unix epoch.
    pub(crate) created_s: u64,
    /// Its LoRA adapters, in the deployment's order.
    pub(crate) adapters: Vec<sllm_api::backend_config::Adapter>,
    /// The context length its engine is started with, where the deployment sets one.
    pub(crate) max_model_len: Option<u64>,
}

impl RouteInfo {
    /// The listing of a stored deployment.
    pub(crate) fn of(d: &kvstore::DeploymentRecord) -> RouteInfo {
        let config = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(
            &d.spec.backend_config,
        )
        .unwrap_or_default();
        let adapters = sllm_api::backend_config::lora_adapters(&config).unwrap_or_default();
        let max_model_len = sllm_api::backend_config::max_model_len(&config);
        RouteInfo { created_s: d.created_ms / 1000, adapters, max_model_len }
    }
}

impl ModelRoute {
    fn new(name: &str) -> ModelRoute {
        ModelRoute {
            metrics: RouteMetrics::new(name),
            name: name.to_string(),
            deleting: AtomicBool::new(false),
            removed: AtomicBool::new(false),
            instances: RwLock::new(Vec::new()),
            starting: Mutex::new(HashSet::new()),
            target: AtomicU32::new(1),
            unplaceable: RwLock::new(None),
            room: Mutex::new(Room::default()),
            waiting: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            progress: broadcast::channel(16).0,
            last_demand_event: Mutex::new(None),
            info: RwLock::new(RouteInfo::default()),
        }
    }

    /// The deployment's listing.
    pub(crate) fn info(&self) -> RouteInfo {
        self.info.read().map(|i| i.clone()).unwrap_or_default()
    }

    /// Whether the Scaler reported that no worker can take the model, and why.
    pub(crate) fn unplaceable(&self) -> Option<String> {
        self.unplaceable.read().ok().and_then(|u| u.clone())
    }

    /// Ready instances (any load).
    pub(crate) fn ready_count(&self) -> usize {
        self.instances.read().map(|l| l.len()).unwrap_or(0)
    }

    /// Most requests one instance may hold now: the hard per-instance limit; while more
    /// instances are on their way, no more than the deployment's `target`, so the backlog they
    /// were started for is left to them instead of piling onto the first one ready.
    pub(crate) fn limit(&self, hard: u32) -> u32 {
        let coming = self.starting.lock().map(|s| !s.is_empty()).unwrap_or(false);
        if coming { hard.min(self.target.load(Ordering::Relaxed).max(1)) } else { hard }
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
    /// Requests, in order; bounded (a full queue makes senders wait).
    pub(crate) tx: mpsc::Sender<Result<pb::AttachDown, tonic::Status>>,
    /// Cancels and credit grants: sent before any waiting request and never dropped (each
    /// request sends at most one cancel and, flow control holding, a few grants at a time).
    control: mpsc::UnboundedSender<pb::AttachDown>,
    pub(crate) pending: Mutex<HashMap<u64, Inbox>>,
    pub(crate) breaker: Breaker,
}

impl WorkerLink {
    pub(crate) fn new(
        worker_id: String,
        epoch: u64,
        run_id: String,
        tx: mpsc::Sender<Result<pb::AttachDown, tonic::Status>>,
        control: mpsc::UnboundedSender<pb::AttachDown>,
    ) -> WorkerLink {
        WorkerLink {
            worker_id,
            epoch,
            run_id,
            tx,
            control,
            pending: Mutex::new(HashMap::new()),
            breaker: Breaker::new(),
        }
    }

    /// Routes a worker's message to the request it belongs to. A worker that sends more than
    /// the request's window loses the request: its inbox is closed and marked overrun, and
    /// the request ends with an error once it has read what came before.
    pub(crate) fn deliver(&self, request_id: u64, msg: FromWorker, last: bool) {
        let Ok(mut pending) = self.pending.lock() else { return };
        let Some(inbox) = pending.get(&request_id) else {
            // The request ended meanwhile; nobody needs the message.
            return;
        };
        match inbox.tx.try_send(msg) {
            Ok(()) if !last => {}
            Ok(()) => {
                pending.remove(&request_id);
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                inbox.overrun.store(true, Ordering::Relaxed);
                pending.remove(&request_id);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                pending.remove(&request_id);
            }
        }
    }

    /// Asks the worker to stop a request. Never dropped: cancels go before any request still
    /// waiting to be sent.
    pub(crate) fn cancel(&self, request_id: u64) {
        let msg = pb::attach_down::Msg::Cancel(pb::CancelRequest { request_id });
        let _ = self.control.send(pb::AttachDown { msg: Some(msg) });
    }

    /// Tells the worker an instance may unload LoRA adapter `name`.
    pub(crate) fn unload_adapter(&self, instance_id: &str, name: String) {
        let unload = pb::UnloadAdapter { instance_id: instance_id.to_string(), name };
        let msg = pb::attach_down::Msg::UnloadAdapter(unload);
        // A stream that is gone takes the adapter with its instance.
        let _ = self.control.send(pb::AttachDown { msg: Some(msg) });
    }

    /// Lets the worker send `chunks` more messages of a request.
    pub(crate) fn grant(&self, request_id: u64, chunks: u32) {
        let msg = pb::attach_down::Msg::Credit(pb::CreditGrant { request_id, chunks });
        let _ = self.control.send(pb::AttachDown { msg: Some(msg) });
    }

    /// The registry declared the worker lost: tells every request in flight on it.
    pub(crate) fn lost(&self) {
        if let Ok(pending) = self.pending.lock() {
            for inbox in pending.values() {
                // A full inbox holds output already: that request cannot move anyway.
                let _ = inbox.tx.try_send(FromWorker::Lost);
            }
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
pub(crate) struct Table {
    models: RwLock<HashMap<String, Arc<ModelRoute>>>,
    workers: RwLock<HashMap<String, Arc<WorkerLink>>>,
    /// Each worker's epoch as this replica last learnt it from Redis (a full read, an event,
    /// or an Attach checked against its record): while Redis is unreachable, only a worker at
    /// exactly this epoch may attach. One entry per registered worker; a removed worker's goes.
    epochs: Mutex<HashMap<String, u64>>,
    /// Most requests one instance holds at a time.
    pub(crate) instance_limit: u32,
}

/// Milliseconds on a monotonic-enough wall clock (breaker deadlines only).
pub(crate) fn clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Table {
    pub(crate) fn new(instance_limit: u32) -> Table {
        Table {
            models: RwLock::default(),
            workers: RwLock::default(),
            epochs: Mutex::default(),
            instance_limit: instance_limit.max(1),
        }
    }

    /// Records that Redis holds `epoch` for `worker` as of a read made just now (replacing
    /// what was known: Redis is the authority, even when it lost state and counts again).
    pub(crate) fn set_epoch(&self, worker: &str, epoch: u64) {
        if let Ok(mut epochs) = self.epochs.lock() {
            epochs.insert(worker.to_string(), epoch);
        }
    }

    /// Records an epoch read from the event stream, which may lag behind a direct read: it
    /// only ever moves the known epoch forward.
    pub(crate) fn saw_epoch(&self, worker: &str, epoch: u64) {
        if let Ok(mut epochs) = self.epochs.lock() {
            let known = epochs.entry(worker.to_string()).or_insert(epoch);
            *known = (*known).max(epoch);
        }
    }

    /// Forgets a worker removed from Redis.
    pub(crate) fn forget_epoch(&self, worker: &str) {
        if let Ok(mut epochs) = self.epochs.lock() {
            epochs.remove(worker);
        }
    }

    /// The epoch this replica last learnt for `worker` from Redis, if any.
    pub(crate) fn known_epoch(&self, worker: &str) -> Option<u64> {
        self.epochs.lock().ok()?.get(worker).copied()
    }

    pub(crate) fn model(&self, name: &str) -> Option<Arc<ModelRoute>> {
        self.models.read().ok()?.get(name).cloned()
    }

    /// Every model (for /v1/models and demand reports).
    pub(crate) fn models(&self) -> Vec<Arc<ModelRoute>> {
        self.models.read().map(|m| m.values().cloned().collect()).unwrap_or_default()
    }

    /// Adds a deployment (or clears its deleting mark).
    pub(crate) fn upsert_model(&self, name: &str, deleting: bool) -> Arc<ModelRoute> {
        let route = {
            let mut models = self.models.write().unwrap_or_else(|e| e.into_inner());
            models
                .entry(name.to_string())
                .or_insert_with(|| Arc::new(ModelRoute::new(name)))
                .clone()
        };
        route.deleting.store(deleting, Ordering::Relaxed);
        route
    }

    /// Forgets a deployment: requests held for it fail, and its metric series go.
    pub(crate) fn remove_model(self: &Arc<Self>, name: &str) {
        let removed = self.models.write().ok().and_then(|mut m| m.remove(name));
        if let Some(route) = removed {
            route.removed.store(true, Ordering::Relaxed);
            self.pump(&route);
            route.metrics.remove(name);
        }
    }

    /// Makes an instance routable.
    pub(crate) fn add_instance(self: &Arc<Self>, model: &str, instance_id: &str, worker_id: &str) {
        let Some(route) = self.model(model) else { return };
        if let Ok(mut starting) = route.starting.lock() {
            starting.remove(instance_id);
        }
        if let Ok(mut list) = route.instances.write()
            && !list.iter().any(|i| i.instance_id == instance_id)
        {
            list.push(Arc::new(Routable {
                instance_id: instance_id.to_string(),
                worker_id: worker_id.to_string(),
                in_flight: AtomicU32::new(0),
                adapters: Mutex::new(HashSet::new()),
                leaving: Default::default(),
            }));
        }
        self.pump(&route);
    }

    /// Notes an instance placed and starting (capacity on its way).
    pub(crate) fn starting_instance(&self, model: &str, instance_id: &str) {
        if let Some(route) = self.model(model)
            && let Ok(mut starting) = route.starting.lock()
        {
            starting.insert(instance_id.to_string());
        }
    }

    /// Stops routing to an instance (draining, stopped, failed, lost). Requests in flight on
    /// it finish.
    pub(crate) fn remove_instance(self: &Arc<Self>, model: &str, instance_id: &str) {
        let routes = match self.model(model) {
            Some(r) => vec![r],
            None => self.models(),
        };
        for route in routes {
            if let Ok(mut list) = route.instances.write() {
                list.retain(|i| {
                    let keep = i.instance_id != instance_id;
                    if !keep {
                        i.leaving.cancel();
                    }
                    keep
                });
            }
            let was_starting =
                route.starting.lock().map(|mut s| s.remove(instance_id)).unwrap_or(false);
            // Capacity that will not come: held requests may now go past `target`.
            if was_starting {
                self.pump(&route);
            }
        }
    }

    /// The Scaler's word on whether the model can be placed (None: it can).
    pub(crate) fn set_unplaceable(self: &Arc<Self>, model: &str, reason: Option<String>) {
        let Some(route) = self.model(model) else { return };
        if let Ok(mut u) = route.unplaceable.write() {
            *u = reason;
        }
        self.pump(&route);
    }

    /// Sets the deployment's listing. Adapters it no longer has are unloaded from the
    /// instances this replica sent requests for them.
    pub(crate) fn set_info(&self, model: &str, info: RouteInfo) {
        let Some(route) = self.model(model) else { return };
        if let Ok(mut i) = route.info.write() {
            *i = info;
        }
        let kept: HashSet<String> = route.info().adapters.into_iter().map(|a| a.name).collect();
        let Ok(instances) = route.instances.read() else { return };
        let workers = self.workers.read().map(|w| w.clone()).unwrap_or_default();
        for i in instances.iter() {
            let gone: Vec<String> = match i.adapters.lock() {
                Ok(mut held) => {
                    let gone = held.iter().filter(|a| !kept.contains(*a)).cloned().collect();
                    held.retain(|a| kept.contains(a));
                    gone
                }
                Err(_) => continue,
            };
            let Some(link) = workers.get(&i.worker_id) else { continue };
            for name in gone {
                link.unload_adapter(&i.instance_id, name);
            }
        }
    }

    /// Sets the deployment's `target`.
    pub(crate) fn set_target(self: &Arc<Self>, model: &str, target: f64) {
        let Some(route) = self.model(model) else { return };
        let t = if target.is_finite() && target >= 1.0 { target.ceil().min(1e6) as u32 } else { 1 };
        route.target.store(t, Ordering::Relaxed);
        self.pump(&route);
    }

    /// Stops routing to every instance of a worker the registry declared lost, and moves its
    /// attempts that have no output yet elsewhere at once.
    pub(crate) fn worker_lost(&self, worker_id: &str) {
        for route in self.models() {
            if let Ok(mut list) = route.instances.write() {
                list.retain(|i| i.worker_id != worker_id);
            }
        }
        let link = self.workers.read().ok().and_then(|w| w.get(worker_id).cloned());
        if let Some(link) = link {
            link.lost();
        }
    }

    /// Replaces the whole table from a full read, keeping in-flight counts of instances that
    /// stay.
    pub(crate) fn reload(
        self: &Arc<Self>,
        deployments: &[Loaded],
        ready: &[(String, String, String)],
        starting: &[(String, String)],
    ) {
        let names: HashSet<&str> = deployments.iter().map(|d| d.name.as_str()).collect();
        let stale: Vec<String> = self
            .models
            .read()
            .map(|m| m.keys().filter(|k| !names.contains(k.as_str())).cloned().collect())
            .unwrap_or_default();
        for name in stale {
            self.remove_model(&name);
        }
        for d in deployments {
            let route = self.upsert_model(&d.name, d.deleting);
            if let Ok(mut u) = route.unplaceable.write() {
                u.clone_from(&d.unplaceable);
            }
            self.set_target(&d.name, d.target);
            self.set_info(&d.name, d.info.clone());
        }
        let mut by_model: HashMap<&str, Vec<(&str, &str)>> = HashMap::new();
        for (model, instance, worker) in ready {
            by_model.entry(model.as_str()).or_default().push((instance.as_str(), worker.as_str()));
        }
        let mut coming: HashMap<&str, HashSet<String>> = HashMap::new();
        for (model, instance) in starting {
            coming.entry(model.as_str()).or_default().insert(instance.clone());
        }
        for route in self.models() {
            let fresh = by_model.remove(route.name.as_str()).unwrap_or_default();
            if let Ok(mut list) = route.instances.write() {
                let mut old: HashMap<String, Arc<Routable>> =
                    list.drain(..).map(|r| (r.instance_id.clone(), r)).collect();
                for (instance, worker) in fresh {
                    let r = old.remove(instance).unwrap_or_else(|| {
                        Arc::new(Routable {
                            instance_id: instance.to_string(),
                            worker_id: worker.to_string(),
                            in_flight: AtomicU32::new(0),
                            adapters: Mutex::new(HashSet::new()),
                            leaving: Default::default(),
                        })
                    });
                    list.push(r);
                }
                for gone in old.values() {
                    gone.leaving.cancel();
                }
            }
            if let Ok(mut s) = route.starting.lock() {
                *s = coming.remove(route.name.as_str()).unwrap_or_default();
            }
            self.pump(&route);
        }
    }

    /// Attaches a worker (replacing an older link of an older or equal epoch). Fails with the
    /// attached epoch if a newer one is attached already. New requests go to the new link;
    /// requests in flight on the old one finish there if both come from the same agent run
    /// (the worker only moved its registry session), and fail at once (to be retried) if not.
    pub(crate) fn attach(self: &Arc<Self>, link: Arc<WorkerLink>) -> Result<(), u64> {
        let link_run_id = link.run_id.clone();
        let old = {
            // A poisoned lock means a panic while the map was changed; the map itself is
            // still whole (every change is one insert or remove), so keep serving.
            let mut workers = self.workers.write().unwrap_or_else(|e| e.into_inner());
            if let Some(existing) = workers.get(&link.worker_id)
                && existing.epoch > link.epoch
            {
                return Err(existing.epoch);
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
            self.pump(&route);
        }
        Ok(())
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

    /// Picks and reserves a route for one of `route`'s requests: the least loaded ready
    /// instance below `limit` on an attached worker whose breaker is closed, not in `exclude`
    /// (ties broken at random). The caller owns the reservation (one more in flight).
    pub(crate) fn reserve(
        &self,
        route: &ModelRoute,
        exclude: &HashSet<String>,
        limit: u32,
    ) -> Option<(Arc<Routable>, Arc<WorkerLink>)> {
        self.reserve_for(route, exclude, limit, None)
    }

    /// [`Table::reserve`] for a request naming LoRA adapter `adapter`: instances that hold it
    /// already come first (the least loaded of them), then any other.
    pub(crate) fn reserve_for(
        &self,
        route: &ModelRoute,
        exclude: &HashSet<String>,
        limit: u32,
        adapter: Option<&str>,
    ) -> Option<(Arc<Routable>, Arc<WorkerLink>)> {
        if let Some(adapter) = adapter {
            let holders: HashSet<String> = route
                .instances
                .read()
                .ok()?
                .iter()
                .filter(|i| i.adapters.lock().is_ok_and(|a| a.contains(adapter)))
                .map(|i| i.instance_id.clone())
                .collect();
            let others: HashSet<String> = route
                .instances
                .read()
                .ok()?
                .iter()
                .map(|i| i.instance_id.clone())
                .filter(|id| !holders.contains(id))
                .chain(exclude.iter().cloned())
                .collect();
            if !holders.is_empty()
                && let Some(r) = self.reserve_for(route, &others, limit, None)
            {
                return Some(r);
            }
        }
        let instances = route.instances.read().ok()?;
        let workers = self.workers.read().ok()?;
        let now = clock_ms();
        let n = instances.len();
        if n == 0 {
            return None;
        }
        let offset = if n > 1 { rand::random_range(0..n) } else { 0 };
        // Concurrent reservations may take the chosen one's last place: then the next best.
        for _ in 0..3 {
            let mut best: Option<(&Arc<Routable>, &Arc<WorkerLink>, u32)> = None;
            for k in 0..n {
                let i = &instances[(offset + k) % n];
                if exclude.contains(&i.instance_id) {
                    continue;
                }
                let load = i.in_flight.load(Ordering::Relaxed);
                if load >= limit || best.is_some_and(|b| b.2 <= load) {
                    continue;
                }
                if let Some(l) = workers.get(&i.worker_id).filter(|l| l.breaker.allows(now)) {
                    best = Some((i, l, load));
                }
            }
            let (i, l, _) = best?;
            if i.in_flight
                .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |c| (c < limit).then_some(c + 1))
                .is_ok()
            {
                return Some((i.clone(), l.clone()));
            }
        }
        None
    }
}

/// A deployment as a full read of kvstore gives it.
pub(crate) struct Loaded {
    pub(crate) name: String,
    pub(crate) deleting: bool,
    pub(crate) target: f64,
    pub(crate) unplaceable: Option<String>,
    pub(crate) info: RouteInfo,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The event stream may lag behind a direct read: it never moves a known epoch back, while
    /// a direct read (Redis's word now) always wins, even after Redis lost its state.
    #[test]
    fn events_only_move_a_known_epoch_forward_and_direct_reads_replace_it() {
        let table = Table::new(1);
        assert_eq!(table.known_epoch("w"), None);
        table.saw_epoch("w", 3);
        table.saw_epoch("w", 2);
        assert_eq!(table.known_epoch("w"), Some(3));
        table.set_epoch("w", 1);
        assert_eq!(table.known_epoch("w"), Some(1));
        table.forget_epoch("w");
        assert_eq!(table.known_epoch("w"), None);
    }
}
