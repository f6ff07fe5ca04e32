//! The leader: one task that owns the view and every model's scaling state, reacts to events
//! (a demand event starts a model within milliseconds), and ticks as a safety net that also
//! reconciles desired against actual. Every write it makes is fenced by its lease; the first
//! refusal for a stale token makes it step down.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use kvstore::{
    EventBatch, InstanceRecord, InstanceStatus, LeaderLease, LeaderWrite, Placement, Refusal,
    Store, WorkerStatus, Written,
};
use prost::Message;
use sllm_api::v1 as pb;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::ScalerConfig;
use crate::clocks::Clocks;
use crate::coldstart::ColdStarts;
use crate::policy;
use crate::view::View;

/// The Scaler's one retry policy (reads after a Redis error, starts after a failed load):
/// exponential from 100 ms, doubling up to 5 s, with full jitter so replicas and models that
/// failed together do not retry together.
pub(crate) fn backoff() -> impl Iterator<Item = Duration> {
    // The workspace's one policy (`service::retry`): 100 ms, then 200, 400 ... ms, at most 5 s.
    service::retry::backoff(Duration::from_millis(100), Duration::from_secs(5))
}

/// Why the leader stopped leading.
pub(crate) enum StepDown {
    /// Its lease was lost (a write was refused, or renewal failed past the deadline).
    LostLease,
    /// Shutting down.
    Shutdown,
}

/// What the Scaler remembers of one model between decisions (not stored: a new leader starts
/// from the desired count in Redis and a clean slate).
#[derive(Default)]
struct ModelState {
    below_since: Option<Instant>,
    /// Demand announced by demand events: (queued, when), counted for a few seconds until the
    /// batched reports catch up.
    event_demand: Option<(u64, Instant)>,
    failures: u32,
    retry_at: Option<Instant>,
    avoid: HashMap<String, Instant>,
    gave_up: Option<String>,
    /// The last failure of one of its instances, told in the decision that replaces it.
    last_failure: Option<String>,
    last_version: u64,
}

/// How long an announced demand counts without a report confirming it. Dispatch reports every
/// 250 ms; once an instance of the model is ready the announcement is dropped at once, so a
/// short cold request does not hold the model up beyond its keep_alive.
const EVENT_DEMAND_TTL: Duration = Duration::from_secs(3);

pub(crate) struct Leader {
    store: Store,
    config: ScalerConfig,
    lease: LeaderLease,
    view: View,
    models: HashMap<String, ModelState>,
    clocks: Clocks,
    /// The stages of cold starts being timed.
    cold: ColdStarts,
    /// Load bandwidths measured from this leader's own placements.
    measured: crate::bandwidth::Measured,
    /// While a pass plans: the loads in progress (seconds) on each worker that has any, kept
    /// as the pass places and drains, so a placement does not walk every worker's instances.
    queues: Option<BTreeMap<String, f64>>,
    /// The gauges last published, so a tick sets only those that changed.
    published: Published,
}

/// What [`Leader::publish_gauges`] last set.
#[derive(Default)]
struct Published {
    desired: HashMap<String, u32>,
    instances: HashMap<(String, &'static str), i64>,
    workers: HashMap<&'static str, i64>,
}

enum Input {
    Events(Vec<kvstore::Event>),
    Resync,
}

impl Leader {
    pub(crate) fn new(store: Store, config: ScalerConfig, lease: LeaderLease) -> Leader {
        Leader {
            store,
            config,
            lease,
            view: View::default(),
            models: HashMap::new(),
            clocks: Clocks::default(),
            cold: ColdStarts::default(),
            measured: crate::bandwidth::Measured::default(),
            queues: None,
            published: Published::default(),
        }
    }

    /// The lease this leader holds.
    pub(crate) fn lease(&self) -> &LeaderLease {
        &self.lease
    }

    /// The lease, to renew it.
    pub(crate) fn lease_mut(&mut self) -> &mut LeaderLease {
        &mut self.lease
    }

    pub(crate) async fn lead(
        store: Store,
        config: ScalerConfig,
        lease: LeaderLease,
        shutdown: CancellationToken,
    ) -> StepDown {
        tracing::info!(holder = %lease.holder, token = lease.token, "leading");
        let mut leader = Leader::new(store.clone(), config, lease);
        // Take the stream position before the full read: events after it are applied on top.
        let read_position = tokio_retry::Retry::start(backoff(), || async {
            let p = store.event_position().await;
            if let Err(e) = &p {
                tracing::warn!(error = %e, "cannot read the event position");
            }
            p
        });
        let position = tokio::select! {
            _ = shutdown.cancelled() => return StepDown::Shutdown,
            p = read_position => match p {
                Ok(p) => p,
                // The policy never gives up; should it, competing again is the safe answer.
                Err(_) => return StepDown::LostLease,
            },
        };
        let (tx, mut rx) = mpsc::channel(64);
        let reader_stop = CancellationToken::new();
        tokio::spawn(read_events(store.event_reader(position), tx, reader_stop.clone()));
        let _stop_reader = reader_stop.drop_guard();

        let leading = telemetry::metrics::SCALER.leader.with_label_values(&[] as &[&str]);
        leading.set(1);
        let outcome = leader.run(&mut rx, &shutdown).await;
        leading.set(0);
        // A follower publishes nothing: summed over replicas, the gauges are the leader's alone.
        let m = &*telemetry::metrics::SCALER;
        m.instances.reset();
        m.desired.reset();
        m.workers.reset();
        if matches!(outcome, StepDown::Shutdown) {
            let _ = leader.store.release_leader(&leader.lease).await;
        }
        outcome
    }

    async fn run(
        &mut self,
        rx: &mut mpsc::Receiver<Input>,
        shutdown: &CancellationToken,
    ) -> StepDown {
        let mut renew = tokio::time::interval(self.config.lease / 3);
        let mut tick = tokio::time::interval(self.config.tick);
        let mut resync = tokio::time::interval(self.config.resync);
        let mut demand = tokio::time::interval(self.config.demand_poll);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        demand.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first resync fires at once: it is the full read every leader starts with.
        loop {
            let result = tokio::select! {
                _ = shutdown.cancelled() => return StepDown::Shutdown,
                _ = renew.tick() => self.renew().await,
                _ = resync.tick() => self.full_pass("resync").await,
                _ = tick.tick() => self.tick().await,
                _ = demand.tick() => self.poll_demand().await,
                input = rx.recv() => match input {
                    Some(Input::Events(events)) => self.apply(events).await,
                    Some(Input::Resync) | None => self.full_pass("resync").await,
                },
            };
            if let Err(step) = result {
                return step;
            }
        }
    }

    async fn renew(&mut self) -> Result<(), StepDown> {
        match self.store.renew_leader(&mut self.lease, self.config.lease).await {
            Ok(()) => Ok(()),
            Err(e) if e.refusal().is_some_and(Refusal::is_not_leader) => Err(StepDown::LostLease),
            Err(e) => {
                tracing::warn!(error = %e, "cannot renew the leader lease");
                // Without a renewal the lease ends at its deadline; stop acting before then.
                if now_ms() + 200 >= self.lease.deadline_ms {
                    Err(StepDown::LostLease)
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Re-reads everything and decides for every model.
    pub(crate) async fn full_pass(&mut self, trigger: &str) -> Result<(), StepDown> {
        match View::load(&self.store).await {
            Ok(mut v) => {
                // What was measured outlives a re-read; what is gone is forgotten.
                let gone: Vec<String> = self
                    .view
                    .workers
                    .keys()
                    .filter(|id| !v.workers.contains_key(*id))
                    .cloned()
                    .collect();
                for id in gone {
                    self.measured.forget_worker(&id);
                }
                for w in v.workers.values_mut() {
                    self.measured.apply(w);
                }
                self.view = v;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the cluster state; keeping the last view");
                return Ok(());
            }
        }
        self.decide_all(trigger).await
    }

    /// The periodic safety net: fresh demand, and a decision for every model (keep_alive
    /// expiries, retries after backoff, desired against actual) from the event-kept view.
    pub(crate) async fn tick(&mut self) -> Result<(), StepDown> {
        match self.store.read_demand().await {
            Ok(d) => self.view.demand = d,
            Err(e) => tracing::warn!(error = %e, "cannot read demand; deciding on the last known"),
        }
        self.decide_all("tick").await?;
        self.publish_gauges();
        Ok(())
    }

    /// Between ticks: fresh demand, and a decision for the models whose demand changed or whose
    /// keep_alive just ran out. This is what makes a model scale down within a fraction of a
    /// second of its keep_alive, not a tick later.
    async fn poll_demand(&mut self) -> Result<(), StepDown> {
        if self.view.deployments.is_empty() {
            return Ok(());
        }
        let fresh = match self.store.read_demand().await {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read demand");
                return Ok(());
            }
        };
        let now = Instant::now();
        let total = |d: Option<&kvstore::Demand>| d.map(|x| x.total()).unwrap_or(0);
        let mut due: BTreeSet<String> = BTreeSet::new();
        for d in self.view.deployments.values() {
            let m = &d.spec.model;
            if total(fresh.get(m)) != total(self.view.demand.get(m)) {
                due.insert(m.clone());
            }
            let keep_alive = Duration::from_secs(u64::from(d.spec.autoscaling.keep_alive_s));
            let state = self.models.get(m);
            let below = state.and_then(|s| s.below_since);
            if below.is_some_and(|since| now.duration_since(since) >= keep_alive) {
                due.insert(m.clone());
            }
            // A failed start's backoff ran out: place its replacement now, not a tick later.
            if state.and_then(|s| s.retry_at).is_some_and(|t| t <= now) {
                due.insert(m.clone());
            }
            // An announcement lapsed unconfirmed: decide on the reports now, not a tick later.
            if state
                .and_then(|s| s.event_demand)
                .is_some_and(|(_, at)| now.duration_since(at) >= EVENT_DEMAND_TTL)
            {
                due.insert(m.clone());
            }
        }
        self.view.demand = fresh;
        let due: Vec<String> = due.into_iter().collect();
        self.decide_many(&due, "demand").await?;
        Ok(())
    }

    /// Instances by model and state, desired counts and workers by state, as metrics. Only
    /// what changed since the last publication is set (a tick over ten thousand models would
    /// otherwise spend milliseconds re-creating every gauge); what is gone is removed.
    fn publish_gauges(&mut self) {
        let m = &*telemetry::metrics::SCALER;
        let published = &mut self.published;
        for d in self.view.deployments.values() {
            let model = &d.spec.model;
            if published.desired.get(model) != Some(&d.desired) {
                m.desired.with_label_values(&[model]).set(i64::from(d.desired));
                published.desired.insert(model.clone(), d.desired);
            }
        }
        // Every deployment is published now: any more entries are of deployments gone.
        if published.desired.len() > self.view.deployments.len() {
            published.desired.retain(|model, _| {
                let keep = self.view.deployments.contains_key(model);
                if !keep {
                    let _ = m.desired.remove_label_values(&[model]);
                }
                keep
            });
        }
        let mut instances: HashMap<(String, &'static str), i64> = HashMap::new();
        for i in self.view.instances() {
            if self.view.deployments.contains_key(&i.model) {
                *instances.entry((i.model.clone(), i.status.as_str())).or_default() += 1;
            }
        }
        for (key, _) in published.instances.iter().filter(|(k, _)| !instances.contains_key(*k)) {
            let _ = m.instances.remove_label_values(&[&key.0, key.1]);
        }
        for (key, n) in &instances {
            if published.instances.get(key) != Some(n) {
                m.instances.with_label_values(&[&key.0, key.1]).set(*n);
            }
        }
        published.instances = instances;
        let mut workers: HashMap<&'static str, i64> = HashMap::new();
        for w in self.view.workers.values() {
            *workers.entry(w.status.as_str()).or_default() += 1;
        }
        for (status, _) in published.workers.iter().filter(|(k, _)| !workers.contains_key(*k)) {
            let _ = m.workers.remove_label_values(&[status]);
        }
        for (status, n) in &workers {
            if published.workers.get(status) != Some(n) {
                m.workers.with_label_values(&[status]).set(*n);
            }
        }
        published.workers = workers;
    }

    async fn decide_all(&mut self, trigger: &str) -> Result<(), StepDown> {
        let models: Vec<String> = self.view.deployments.keys().cloned().collect();
        let view = &self.view;
        self.models.retain(|m, _| view.deployments.contains_key(m));
        self.decide_many(&models, trigger).await?;
        self.clocks.forget_gone(&self.view);
        self.cold.forget_gone(&self.view);
        Ok(())
    }

    /// Applies events to the view, then decides for the models they touched.
    async fn apply(&mut self, events: Vec<kvstore::Event>) -> Result<(), StepDown> {
        let mut dirty: BTreeSet<String> = BTreeSet::new();
        let mut traces: HashMap<String, String> = HashMap::new();
        let mut trigger = "event";
        let mut worker_changed = false;
        for e in events {
            match e.kind.as_str() {
                "demand" => {
                    if let Some(at) = e.time_ms() {
                        let live = self.view.instances_of(&e.entity).any(|i| {
                            matches!(
                                i.status,
                                InstanceStatus::Pending
                                    | InstanceStatus::Loading
                                    | InstanceStatus::Ready
                            )
                        });
                        self.cold.demand(&e.entity, at, live);
                    }
                    // An announcement stands for requests no instance can take yet. Once one is
                    // ready, Dispatch's reports count what waits: an announcement read after it
                    // (raised before the request got its slot) would otherwise hold the model
                    // up for EVENT_DEMAND_TTL past its last request.
                    let serving = self
                        .view
                        .instances_of(&e.entity)
                        .any(|i| i.status == InstanceStatus::Ready);
                    if !serving {
                        let queued = e.field("queued").and_then(|q| q.parse().ok()).unwrap_or(1);
                        self.models.entry(e.entity.clone()).or_default().event_demand =
                            Some((queued, Instant::now()));
                    }
                    trigger = "demand event";
                    if let Some(tp) = e.field("traceparent").filter(|t| !t.is_empty()) {
                        traces.insert(e.entity.clone(), tp.to_string());
                    }
                    dirty.insert(e.entity);
                }
                // The leader's own verdict: nothing to re-read.
                "deployment.unplaceable" => {}
                k if k.starts_with("deployment.") => {
                    match self.store.get_deployment(&e.entity).await {
                        Ok(Some(d)) => {
                            self.view.deployments.insert(e.entity.clone(), d);
                        }
                        Ok(None) => {
                            self.view.deployments.remove(&e.entity);
                            self.view.unplaceable.remove(&e.entity);
                            self.models.remove(&e.entity);
                            self.cold.deployment_gone(&e.entity);
                        }
                        Err(err) => {
                            tracing::warn!(error = %err, "cannot read deployment {}", e.entity)
                        }
                    }
                    dirty.insert(e.entity);
                }
                k if k.starts_with("worker.") => {
                    self.refresh_worker(&e.entity).await;
                    worker_changed = true;
                }
                k if k.starts_with("instance.") => {
                    let previous = self.view.instance(&e.entity).map(|i| i.status);
                    let rec = match self.store.get_instance(&e.entity).await {
                        Ok(r) => r,
                        Err(err) => {
                            tracing::warn!(error = %err, "cannot read instance {}", e.entity);
                            continue;
                        }
                    };
                    let model = e.field("model").unwrap_or_default().to_string();
                    match (e.kind.as_str(), e.time_ms()) {
                        ("instance.pending", Some(at)) => self.cold.placed(&model, &e.entity, at),
                        ("instance.loading", Some(at)) => self.cold.loading(&e.entity, at),
                        ("instance.ready", Some(at)) => self.cold.ready(&model, &e.entity, at),
                        _ => self.cold.ended(&e.entity),
                    }
                    match rec.as_ref().map(|r| r.status) {
                        Some(InstanceStatus::Ready) => {
                            self.measured.ready(&e.entity);
                        }
                        Some(InstanceStatus::Pending | InstanceStatus::Loading) => {}
                        _ => self.measured.ended(&e.entity),
                    }
                    if let Some(r) = &rec {
                        match r.status {
                            InstanceStatus::Failed => self.load_failed(&model, r, previous),
                            InstanceStatus::Ready => {
                                let state = self.models.entry(model.clone()).or_default();
                                state.failures = 0;
                                state.retry_at = None;
                                // Requests waiting for a start are served now; Dispatch's
                                // reports count them from here on.
                                state.event_demand = None;
                                if state.gave_up.take().is_some() {
                                    self.write_desired(&model, None, "").await?;
                                }
                            }
                            _ => {}
                        }
                    }
                    self.view.set_instance(&e.entity, rec);
                    if let Some(w) = e.field("worker") {
                        let w = w.to_string();
                        self.refresh_worker(&w).await;
                    }
                    dirty.insert(model);
                }
                _ => {}
            }
        }
        if worker_changed {
            self.judge_placeable_all().await?;
            // New or lost capacity matters to any model short of its desired count.
            let short: Vec<String> = self
                .view
                .deployments
                .values()
                .filter(|d| d.desired > self.view.actual(&d.spec.model))
                .map(|d| d.spec.model.clone())
                .collect();
            dirty.extend(short);
        }
        let mut rest = Vec::new();
        for m in dirty {
            if m.is_empty() {
                continue;
            }
            match traces.get(&m) {
                // A cold request's demand: the decision joins the request's trace, and goes
                // first.
                Some(tp) => {
                    let span = tracing::info_span!("scaler decision", gen_ai.request.model = %m, sllm.trigger = trigger);
                    telemetry::propagation::set_parent(&span, tp);
                    tracing::Instrument::instrument(self.decide(&m, trigger), span).await?;
                }
                None => rest.push(m),
            }
        }
        self.decide_many(&rest, trigger).await
    }

    async fn refresh_worker(&mut self, id: &str) {
        match self.store.get_worker(id).await {
            Ok(Some(mut rec)) => {
                // Placement sees the bandwidths measured here, the worker's claims only where
                // none was measured yet.
                self.measured.apply(&mut rec);
                self.view.set_worker(id, Some(rec));
            }
            Ok(None) => {
                self.measured.forget_worker(id);
                self.view.set_worker(id, None);
            }
            Err(e) => tracing::warn!(error = %e, "cannot read worker {id}"),
        }
    }

    fn load_failed(&mut self, model: &str, rec: &InstanceRecord, previous: Option<InstanceStatus>) {
        let max = self.config.max_load_failures;
        let state = self.models.entry(model.to_string()).or_default();
        // Only a failure to start counts towards giving up; a crashed serving instance is
        // replaced at once, but not on the worker it crashed on.
        if !matches!(previous, Some(InstanceStatus::Pending | InstanceStatus::Loading)) {
            if previous.is_some() && !rec.reason.starts_with("worker lost") {
                state.avoid.insert(rec.worker_id.clone(), Instant::now() + Duration::from_secs(30));
                state.last_failure = Some(format!(
                    "{} failed on {}: {}",
                    rec.instance_id, rec.worker_id, rec.reason
                ));
                tracing::warn!(%model, instance = %rec.instance_id, worker = %rec.worker_id, reason = %rec.reason, "instance failed while serving");
            }
            return;
        }
        state.failures += 1;
        state.avoid.insert(rec.worker_id.clone(), Instant::now() + Duration::from_secs(30));
        state.last_failure =
            Some(format!("{} failed on {}: {}", rec.instance_id, rec.worker_id, rec.reason));
        let delay = backoff().nth(state.failures.saturating_sub(1) as usize).unwrap_or_default();
        state.retry_at = Some(Instant::now() + delay);
        tracing::warn!(%model, instance = %rec.instance_id, worker = %rec.worker_id, failures = state.failures, reason = %rec.reason, "instance failed to start");
        if state.failures >= max && state.gave_up.is_none() {
            state.gave_up = Some(format!(
                "gave up after {} failed starts; last on {}: {}",
                state.failures, rec.worker_id, rec.reason
            ));
        }
    }

    /// Decides for one model and acts.
    async fn decide(&mut self, model: &str, trigger: &str) -> Result<(), StepDown> {
        self.decide_many(&[model.to_string()], trigger).await
    }

    /// Decides for `models` and acts. The writes of all of them go out together, a few script
    /// calls however many models moved ([`Store::write_as_leader`]), in three steps: starts that
    /// hung are failed first (the backoff and the avoided worker that follow shape the
    /// placements); then every model's placements, drains, stops and unplaceable marks, each
    /// applied to the view as it is planned, so the next placement sees the GPUs taken; then
    /// every desired count, with a decision that names only the placements that were made. A
    /// refused write is handled as a refusal of its own transition (its change to the view is
    /// undone; a stale token steps down); the others stand.
    async fn decide_many(&mut self, models: &[String], trigger: &str) -> Result<(), StepDown> {
        let now = Instant::now();
        let mut writes = Writes::new(&self.store, &self.lease);
        for m in models {
            self.plan_fail_stuck(m, &mut writes);
        }
        self.flush(writes).await?;

        let mut writes = Writes::new(&self.store, &self.lease);
        let mut drafts = Vec::new();
        let mut recorded = Vec::new();
        self.queues = None;
        for m in models {
            if let Some(d) = self.plan(m, trigger, now, &mut writes) {
                // A decision that places nothing is complete: its desired count goes with its
                // drains and stops, after them.
                if d.placed.is_empty() && self.plan_desired(&d, &[], &mut writes) {
                    recorded.push((d.model.clone(), d.committed));
                }
                drafts.push(d);
            }
        }
        self.queues = None;
        let applied = self.flush(writes).await?;

        let mut writes = Writes::new(&self.store, &self.lease);
        for d in drafts.iter().filter(|d| !d.placed.is_empty()) {
            if self.plan_desired(d, &applied, &mut writes) {
                recorded.push((d.model.clone(), d.committed));
            }
        }
        self.flush(writes).await?;
        for (model, committed) in recorded {
            if let Some(view) = self.view.deployments.get_mut(&model) {
                view.desired = committed;
            }
        }

        for d in drafts.iter().filter(|d| d.deleting) {
            let model = d.model.as_str();
            if self.view.instances_of(model).next().is_some() {
                continue;
            }
            match self.store.remove_deployment(model).await {
                Ok(()) => {
                    tracing::info!(%model, "deployment removed");
                    self.view.deployments.remove(model);
                    // The removal cleared its unplaceable mark too.
                    self.view.unplaceable.remove(model);
                    self.models.remove(model);
                }
                Err(e) if e.refusal().is_some() => {}
                Err(e) => tracing::warn!(%model, error = %e, "cannot remove deployment"),
            }
        }
        Ok(())
    }

    /// Plans one model's decision: its desired count, and the placements, drains, stops and
    /// unplaceable mark that follow from it, added to `writes`. Returns what the desired-count
    /// write needs once those writes are done.
    fn plan(
        &mut self,
        model: &str,
        trigger: &str,
        now: Instant,
        writes: &mut Writes,
    ) -> Option<Draft> {
        let d = self.view.deployments.get(model)?;
        if !self.models.contains_key(model) {
            self.models.insert(model.to_string(), ModelState::default());
        }
        let state = self.models.get_mut(model)?;
        if state.last_version != d.version {
            // A user's update gives a model that was given up on a fresh start.
            if state.last_version != 0 && state.gave_up.is_some() {
                state.gave_up = None;
                state.failures = 0;
                state.retry_at = None;
            }
            state.last_version = d.version;
        }
        state.avoid.retain(|_, until| *until > now);
        if state.retry_at.is_some_and(|t| t <= now) {
            state.retry_at = None;
        }
        let deleting = d.status == kvstore::DeploymentStatus::Deleting;
        let reported = self.view.demand.get(model).map(|x| x.total()).unwrap_or(0);
        let announced = match state.event_demand {
            Some((q, at)) if now.duration_since(at) < EVENT_DEMAND_TTL => q,
            _ => {
                state.event_demand = None;
                0
            }
        };
        let demand = reported.max(announced);
        let wanted = if deleting { 0 } else { policy::wanted(demand, &d.spec.autoscaling) };
        let keep_alive = Duration::from_secs(u64::from(d.spec.autoscaling.keep_alive_s));
        let committed = if deleting {
            state.below_since = None;
            0
        } else {
            policy::commit(d.desired, wanted, keep_alive, &mut state.below_since, now)
        };
        let gave_up = state.gave_up.clone();
        let waiting = state.retry_at.is_some_and(|t| t > now);
        let unplaceable = self.plan_verdict(d, writes);
        // Most models of a large fleet have no instance: one look-up says so.
        let has_instances = self.view.has_instances(model);
        let actual = if has_instances { self.view.actual(model) } else { 0 };
        if committed == d.desired
            && committed == actual
            && !deleting
            && gave_up.as_deref().or(unplaceable.as_deref()).unwrap_or_default() == d.last_error
            && (!has_instances
                || self.view.instances_of(model).all(|i| {
                    matches!(
                        i.status,
                        InstanceStatus::Pending | InstanceStatus::Loading | InstanceStatus::Ready
                    )
                }))
        {
            // Nothing to change, place, drain or settle: the common case of a tick, decided
            // without copying the deployment. (Settling only forgets clocks of such instances.)
            if has_instances {
                for i in self.view.instances_of(model) {
                    self.clocks.forget(&i.instance_id);
                }
            }
            return None;
        }
        let d = d.clone();

        let mut reason = String::new();
        if committed != d.desired {
            let direction = if committed > d.desired { "up" } else { "down" };
            let why = if deleting {
                "deleting"
            } else if committed < d.desired {
                "keep_alive"
            } else if trigger == "demand event" {
                "demand_event"
            } else if demand == 0 {
                "min_instances"
            } else {
                "demand"
            };
            telemetry::metrics::SCALER.decisions.with_label_values(&[direction, why]).inc();
            reason = if committed > d.desired {
                if trigger == "demand event" {
                    format!("scale {}->{committed}: demand event ({demand} waiting)", d.desired)
                } else if demand == 0 {
                    format!(
                        "scale {}->{committed}: min_instances is {}",
                        d.desired, d.spec.autoscaling.min_instances
                    )
                } else {
                    format!(
                        "scale {}->{committed}: demand {demand}, target {} per instance",
                        d.desired, d.spec.autoscaling.target
                    )
                }
            } else if deleting {
                format!("scale {}->0: deployment is being deleted", d.desired)
            } else {
                format!(
                    "scale {}->{committed}: demand {demand} stayed below for keep_alive {} s",
                    d.desired, d.spec.autoscaling.keep_alive_s
                )
            };
        }

        // Place what is missing.
        let mut placed = Vec::new();
        if committed > actual && gave_up.is_none() && !waiting {
            for _ in actual..committed {
                match self.plan_place_one(&d, writes) {
                    Some(p) => placed.push((writes.len() - 1, p)),
                    None => break,
                }
            }
            if placed.is_empty() {
                tracing::debug!(%model, need = d.spec.num_gpus, "no worker can take an instance now");
            }
        }

        // Drain what is surplus.
        if committed < actual {
            self.plan_drain_surplus(model, actual - committed, writes);
        }
        self.plan_settle_lost_and_stuck(model, writes);

        // Giving up on a model, or a fleet that cannot hold it, is what a user sees as the
        // reason it does not start.
        Some(Draft {
            model: model.to_string(),
            from: d.desired,
            committed,
            actual,
            reason,
            placed,
            error: gave_up.or(unplaceable).unwrap_or_default(),
            last_error: d.last_error,
            deleting,
        })
    }

    /// Adds the desired-count write of a planned decision, now that its placements' outcomes
    /// (`applied`, by write) are known. Returns whether there was one.
    fn plan_desired(&mut self, d: &Draft, applied: &[bool], writes: &mut Writes) -> bool {
        let placed: Vec<&str> = d
            .placed
            .iter()
            .filter(|(at, _)| applied.get(*at).copied().unwrap_or(false))
            .map(|(_, what)| what.as_str())
            .collect();
        let mut reason = d.reason.clone();
        if !placed.is_empty() {
            if reason.is_empty() {
                reason =
                    format!("replace {} of {}: {} running", placed.len(), d.committed, d.actual);
            }
            if let Some(failure) = self.models.get_mut(&d.model).and_then(|s| s.last_failure.take())
            {
                reason = format!("{reason}; {failure}");
            }
            reason = format!("{reason}; {}", placed.join("; "));
        }
        if reason.is_empty() && d.error == d.last_error {
            return false;
        }
        if !reason.is_empty() {
            tracing::info!(model = %d.model, %reason, "scaling decision");
        }
        let decision = (!reason.is_empty()).then_some((d.from, d.committed, reason));
        self.plan_write_desired(&d.model, decision, &d.error, writes);
        true
    }

    /// Records the desired count and the decision (or only the error) in Redis, alone.
    async fn write_desired(
        &mut self,
        model: &str,
        decision: Option<(u32, u32, String)>,
        error: &str,
    ) -> Result<(), StepDown> {
        let mut writes = Writes::new(&self.store, &self.lease);
        self.plan_write_desired(model, decision, error, &mut writes);
        self.flush(writes).await.map(|_| ())
    }

    /// Adds the write of the desired count and the decision (or only the error).
    fn plan_write_desired(
        &self,
        model: &str,
        decision: Option<(u32, u32, String)>,
        error: &str,
        writes: &mut Writes,
    ) {
        let Some(d) = self.view.deployments.get(model) else { return };
        let (desired, json) = match decision {
            Some((from, to, reason)) => {
                let json = serde_json::json!({ "from": from, "to": to, "reason": reason, "at_ms": now_ms() });
                (to, json.to_string())
            }
            None => (d.desired, d.last_decision.clone()),
        };
        writes.push(
            LeaderWrite::Desired {
                model: model.to_string(),
                desired,
                decision: json.clone(),
                last_error: error.to_string(),
            },
            Then::Desired {
                model: model.to_string(),
                desired,
                decision: json,
                error: error.into(),
            },
        );
    }

    /// Plans one new instance of `d` (taking its GPUs in the view at once); returns a
    /// description of where, or None if no worker can take it.
    fn plan_place_one(
        &mut self,
        d: &kvstore::DeploymentRecord,
        writes: &mut Writes,
    ) -> Option<String> {
        let model = d.spec.model.as_str();
        let now = Instant::now();
        let avoid: Vec<String> = self
            .models
            .get(model)
            .map(|s| {
                s.avoid.iter().filter(|(_, until)| **until > now).map(|(w, _)| w.clone()).collect()
            })
            .unwrap_or_default();
        let fallback = self
            .view
            .workers
            .values()
            .flat_map(|w| w.inventory.checkpoints.iter())
            .filter(|c| c.model == model)
            .map(|c| c.size_bytes)
            .max()
            .unwrap_or(self.config.default_checkpoint_bytes);
        let default_size = self.config.default_checkpoint_bytes;
        let view = &self.view;
        let queues = self.queues.get_or_insert_with(|| view.queues(default_size));
        // The model's replicas by worker: few, counted once rather than per worker.
        let mut replicas: HashMap<&str, usize> = HashMap::new();
        for i in view.instances_of(model).filter(|i| {
            matches!(
                i.status,
                InstanceStatus::Pending | InstanceStatus::Loading | InstanceStatus::Ready
            )
        }) {
            *replicas.entry(i.worker_id.as_str()).or_default() += 1;
        }
        // A worker an instance just failed on is avoided while another can take the model;
        // when none can, it gets the replacement after all (failed starts back off on their own).
        let mut candidate = None;
        for skip_avoided in [true, false] {
            if !skip_avoided && avoid.is_empty() {
                break;
            }
            // Both in worker id order: each worker's queue is found by walking the two along.
            let mut queue = queues.iter().peekable();
            let offers = view
                .workers
                .values()
                .filter(|w| {
                    w.status == WorkerStatus::Ready
                        && w.inventory.runs(&d.spec.backend)
                        && !(skip_avoided && avoid.contains(&w.worker_id))
                })
                .map(|w| {
                    while queue.next_if(|(id, _)| id.as_str() < w.worker_id.as_str()).is_some() {}
                    policy::Offer {
                        worker: w,
                        free: Cow::Borrowed(w.free_gpus.as_slice()),
                        queue: queue
                            .next_if(|(id, _)| **id == w.worker_id)
                            .map_or(0.0, |(_, q)| *q),
                        replicas: replicas.get(w.worker_id.as_str()).copied().unwrap_or(0),
                    }
                });
            candidate = policy::choose(offers, model, d.spec.num_gpus, fallback);
            if candidate.is_some() {
                break;
            }
        }
        let c = candidate?;
        let (worker, gpus, estimate, tier) =
            (c.worker.worker_id.clone(), c.gpus.clone(), c.estimate, c.tier);
        // The bytes this start loads, for measuring the worker's bandwidth from it.
        let bytes = c
            .worker
            .inventory
            .checkpoints
            .iter()
            .find(|x| x.model == model)
            .map_or(fallback, |x| x.size_bytes);
        let instance_id = new_instance_id(model);
        let span = tracing::info_span!(
            "place instance",
            gen_ai.request.model = %model,
            sllm.instance = %instance_id,
            sllm.worker = %worker,
            sllm.checkpoint_tier = ?tier,
            sllm.estimate_s = estimate,
        );
        let traceparent = telemetry::propagation::traceparent(&span);
        let command_id = format!("start-{instance_id}");
        let backend_config = if d.spec.backend_config.is_empty() {
            None
        } else {
            serde_json::from_str::<serde_json::Value>(&d.spec.backend_config)
                .ok()
                .map(|v| service::convert::json_to_struct(&v))
        };
        let command = pb::Command {
            command_id: command_id.clone(),
            action: Some(pb::command::Action::Start(pb::StartInstance {
                instance_id: instance_id.clone(),
                model: model.to_string(),
                backend: d.spec.backend.clone(),
                gpus: gpus.clone(),
                backend_config,
                traceparent,
            })),
        };
        let placement = Placement {
            instance_id: instance_id.clone(),
            model: model.to_string(),
            worker_id: worker.clone(),
            gpus: gpus.clone(),
            command_id,
            command: command.encode_to_vec(),
        };
        // Taken at once, so the next placement of this pass sees the GPUs gone; given back if
        // the write is refused.
        if let Some(w) = self.view.workers.get_mut(&worker) {
            w.free_gpus.retain(|g| !gpus.contains(g));
        }
        let now = now_ms();
        self.view.insert(InstanceRecord {
            instance_id: instance_id.clone(),
            model: model.to_string(),
            worker_id: worker.clone(),
            status: InstanceStatus::Pending,
            gpus: gpus.clone(),
            reason: String::new(),
            version: 1,
            created_ms: now,
            updated_ms: now,
        });
        self.requeue(&worker);
        let what = format!(
            "placed {instance_id} on {worker}: {}, est. {estimate:.1} s",
            policy::tier_words(tier)
        );
        writes.push(
            LeaderWrite::Place(placement),
            Then::Placed(Box::new(Placed {
                model: model.to_string(),
                instance_id,
                worker,
                gpus,
                tier,
                bytes,
                span,
            })),
        );
        Some(what)
    }

    /// Brings the planning pass's queue of loads on `worker` up to date with the view.
    fn requeue(&mut self, worker: &str) {
        let Some(queues) = self.queues.as_mut() else { return };
        match self.view.workers.get(worker) {
            Some(w) => {
                let q = self.view.queue_on(w, self.config.default_checkpoint_bytes);
                queues.insert(worker.to_string(), q);
            }
            None => {
                queues.remove(worker);
            }
        }
    }

    /// Plans draining `n` instances of `model`: those not yet serving first, then the newest.
    fn plan_drain_surplus(&mut self, model: &str, n: u32, writes: &mut Writes) {
        let mut victims: Vec<(String, String, InstanceStatus, bool, u64)> = self
            .view
            .instances_of(model)
            .filter(|i| {
                matches!(
                    i.status,
                    InstanceStatus::Pending | InstanceStatus::Loading | InstanceStatus::Ready
                )
            })
            .map(|i| {
                let ready = i.status == InstanceStatus::Ready;
                (i.instance_id.clone(), i.worker_id.clone(), i.status, ready, i.created_ms)
            })
            .collect();
        victims.sort_by_key(|v| (v.3, std::cmp::Reverse(v.4)));
        for (id, worker, previous, _, _) in victims.into_iter().take(n as usize) {
            let command = pb::Command {
                command_id: format!("drain-{id}"),
                action: Some(pb::command::Action::Drain(pb::DrainInstance {
                    instance_id: id.clone(),
                    grace_ms: self.config.drain_grace.as_millis() as u64,
                })),
            };
            let body = command.encode_to_vec();
            // Draining at once in the view; back to where it was if the write is refused.
            self.view.set_status(&id, InstanceStatus::Draining);
            if matches!(previous, InstanceStatus::Pending | InstanceStatus::Loading) {
                self.requeue(&worker);
            }
            writes.push(
                LeaderWrite::Move {
                    instance_id: id.clone(),
                    to: InstanceStatus::Draining,
                    reason: "surplus".into(),
                    command: Some((command.command_id, body)),
                },
                Then::Drained { model: model.to_string(), instance: id, worker, previous },
            );
        }
    }

    /// Plans failing instances whose worker stayed lost too long, and stopping drains that
    /// overran.
    fn plan_settle_lost_and_stuck(&mut self, model: &str, writes: &mut Writes) {
        let now = Instant::now();
        let mut to_fail = Vec::new();
        let mut to_stop = Vec::new();
        for i in self.view.instances_of(model) {
            match i.status {
                InstanceStatus::Lost => {
                    let since = self.clocks.lost_since(&i.instance_id, now);
                    if now.duration_since(since) >= self.config.lost_grace {
                        to_fail.push(i.instance_id.clone());
                    }
                }
                InstanceStatus::Draining => {
                    let since = self.clocks.draining_since(&i.instance_id, now);
                    if now.duration_since(since) >= self.config.drain_grace * 2 {
                        to_stop.push(i.instance_id.clone());
                    }
                }
                _ => self.clocks.forget(&i.instance_id),
            }
        }
        for id in to_fail {
            let reason =
                format!("worker lost for more than {} s", self.config.lost_grace.as_secs());
            writes.push(
                LeaderWrite::Move {
                    instance_id: id.clone(),
                    to: InstanceStatus::Failed,
                    reason,
                    command: None,
                },
                Then::Ended { instance: id, what: "fail lost instance" },
            );
        }
        for id in to_stop {
            let command = pb::Command {
                command_id: format!("stop-{id}"),
                action: Some(pb::command::Action::Stop(pb::StopInstance {
                    instance_id: id.clone(),
                })),
            };
            let body = command.encode_to_vec();
            writes.push(
                LeaderWrite::Move {
                    instance_id: id.clone(),
                    to: InstanceStatus::Stopped,
                    reason: "drain overran its grace".into(),
                    command: Some((command.command_id, body)),
                },
                Then::Ended { instance: id, what: "stop overrunning drain" },
            );
        }
    }

    /// Plans failing the model's instances that stayed pending or loading longer than the start
    /// timeout (an engine that hangs while loading, a start whose report was lost), stopping
    /// them on their worker, so they are replaced like any failed start. Measured from the
    /// placement.
    fn plan_fail_stuck(&mut self, model: &str, writes: &mut Writes) {
        let limit = self.config.start_timeout;
        let now = now_ms();
        let stuck = self
            .view
            .instances_of(model)
            .filter(|i| matches!(i.status, InstanceStatus::Pending | InstanceStatus::Loading))
            .filter(|i| now.saturating_sub(i.created_ms) >= limit.as_millis() as u64);
        for i in stuck {
            let reason = format!("stuck in {} for more than {}", i.status.as_str(), words(limit));
            let command = pb::Command {
                command_id: format!("stop-{}", i.instance_id),
                action: Some(pb::command::Action::Stop(pb::StopInstance {
                    instance_id: i.instance_id.clone(),
                })),
            };
            let body = command.encode_to_vec();
            let failed = InstanceRecord {
                status: InstanceStatus::Failed,
                reason: reason.clone(),
                ..i.clone()
            };
            writes.push(
                LeaderWrite::Move {
                    instance_id: i.instance_id.clone(),
                    to: InstanceStatus::Failed,
                    reason,
                    command: Some((command.command_id, body)),
                },
                Then::FailedStuck { model: model.to_string(), failed, previous: i.status },
            );
        }
    }

    /// Judges whether the live fleet can hold `d` at all and, when the verdict changed, plans
    /// recording it (the `unplaceable` mark and its event, which Dispatch fails held requests
    /// on). Returns the reason it cannot be placed, if so.
    fn plan_verdict(&self, d: &kvstore::DeploymentRecord, writes: &mut Writes) -> Option<String> {
        let model = d.spec.model.as_str();
        let verdict = if d.status == kvstore::DeploymentStatus::Deleting {
            None
        } else {
            policy::unplaceable(
                self.view.largest_ready_worker(),
                self.view.largest_ready_for(&d.spec.backend),
                &d.spec.backend,
                d.spec.num_gpus,
            )
        };
        if verdict.as_deref() != self.view.unplaceable.get(model).map(String::as_str) {
            writes.push(
                LeaderWrite::Unplaceable {
                    model: model.to_string(),
                    reason: verdict.clone().unwrap_or_default(),
                },
                Then::Verdict { model: model.to_string(), verdict: verdict.clone() },
            );
        }
        verdict
    }

    /// [`Leader::plan_verdict`] for every deployment, recorded: the fleet changed.
    async fn judge_placeable_all(&mut self) -> Result<(), StepDown> {
        let mut writes = Writes::new(&self.store, &self.lease);
        for d in self.view.deployments.values() {
            self.plan_verdict(d, &mut writes);
        }
        self.flush(writes).await.map(|_| ())
    }

    /// Applies `writes` ([`Store::write_as_leader`]) and does what follows each outcome: on
    /// success what the write means for the leader's state, on a refusal what its transition's
    /// refusal means (a change made to the view in advance is undone; a stale token steps
    /// down). Returns, per write, whether it was applied.
    async fn flush(&mut self, writes: Writes) -> Result<Vec<bool>, StepDown> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let mut writes = writes;
        let results = match writes.writer.take() {
            None => self.store.write_as_leader(&self.lease, &writes.writes).await,
            Some(writer) => {
                let rest = std::mem::take(&mut writes.writes);
                if !rest.is_empty() {
                    let _ = writer.calls.send(rest);
                }
                drop(writer.calls);
                writer.done.await.unwrap_or_default()
            }
        };
        let planned = writes.then.len();
        let mut results = results;
        // A writer that stopped short (it panicked) applied none of what it did not report.
        while results.len() < planned {
            results.push(Err(kvstore::Error::Protocol {
                script: "leader_batch",
                detail: "the pass's writer stopped before this write".into(),
            }));
        }
        if results
            .iter()
            .any(|r| r.as_ref().is_err_and(|e| e.refusal().is_some_and(Refusal::is_not_leader)))
        {
            return Err(StepDown::LostLease);
        }
        let mut applied = Vec::with_capacity(results.len());
        // Workers a refused placement or a failed start found changed: re-read once each.
        let mut reread: BTreeSet<String> = BTreeSet::new();
        for (then, result) in writes.then.into_iter().zip(results) {
            applied.push(result.is_ok());
            match then {
                Then::FailedStuck { model, failed, previous } => match result {
                    Ok(_) => {
                        // Counted as a failed start: backed off, avoided on that worker, and
                        // given up on after max_load_failures in a row.
                        self.load_failed(&model, &failed, Some(previous));
                        self.view.remove(&failed.instance_id);
                        reread.insert(failed.worker_id);
                    }
                    Err(e) => self.fenced(e, "fail stuck instance"),
                },
                Then::Verdict { model, verdict } => match result {
                    Ok(_) => match verdict {
                        Some(why) => {
                            tracing::warn!(%model, reason = %why, "cannot be placed on any worker");
                            self.view.unplaceable.insert(model, why);
                        }
                        None => {
                            tracing::info!(%model, "placeable again");
                            self.view.unplaceable.remove(&model);
                        }
                    },
                    // Not recorded (Redis away, deployment just removed): the next decision
                    // retries.
                    Err(e) => self.fenced(e, "record unplaceable"),
                },
                Then::Placed(p) => {
                    let Placed { model, instance_id, worker, gpus, tier, bytes, span } = *p;
                    match result {
                        Ok(_) => {
                            self.measured.placed(&instance_id, &worker, tier, bytes);
                            telemetry::metrics::SCALER
                                .cold_starts
                                .with_label_values(&[model.as_str(), tier.as_str()])
                                .inc();
                        }
                        Err(e) => {
                            self.view.remove(&instance_id);
                            if let Some(w) = self.view.workers.get_mut(&worker) {
                                for g in gpus {
                                    if !w.free_gpus.contains(&g) {
                                        w.free_gpus.push(g);
                                    }
                                }
                                w.free_gpus.sort_unstable();
                            }
                            span.in_scope(|| match e.refusal() {
                                // The view was stale (GPU taken, worker gone): re-read that
                                // worker; the next event or tick tries again.
                                Some(_) => {
                                    tracing::info!(%model, %worker, error = %e, "placement refused");
                                    reread.insert(worker);
                                }
                                None => {
                                    tracing::warn!(%model, error = %e, "cannot place an instance")
                                }
                            });
                        }
                    }
                }
                Then::Drained { model, instance, worker, previous } => match result {
                    Ok(_) => {
                        tracing::info!(%model, %instance, %worker, "draining");
                        self.clocks.start_draining(&instance, Instant::now());
                    }
                    Err(e) => {
                        self.view.set_status(&instance, previous);
                        self.fenced(e, "drain");
                    }
                },
                Then::Ended { instance, what } => match result {
                    Ok(_) => {
                        self.view.remove(&instance);
                        self.clocks.forget(&instance);
                    }
                    Err(e) => self.fenced(e, what),
                },
                Then::Desired { model, desired, decision, error } => match result {
                    Ok(_) => {
                        if let Some(d) = self.view.deployments.get_mut(&model) {
                            d.desired = desired;
                            d.last_decision = decision;
                            d.last_error = error;
                        }
                    }
                    Err(e) => self.fenced(e, "set desired"),
                },
            }
        }
        for id in reread {
            self.refresh_worker(&id).await;
        }
        Ok(applied)
    }

    /// A refused or failed write other than for a stale token (which [`Leader::flush`] steps
    /// down on): logged.
    fn fenced(&self, e: kvstore::Error, what: &str) {
        match e.refusal() {
            Some(_) => tracing::info!(error = %e, "{what} refused"),
            None => tracing::warn!(error = %e, "{what} failed"),
        }
    }
}

/// Writes planned in one pass, each with what follows its outcome. Once a script call's worth
/// is planned it is sent at once, while planning goes on: a task applies the calls in order
/// ([`Store::write_as_leader`]), so Redis applies one part of the pass while the leader plans
/// the next. [`Leader::flush`] sends the rest and collects every outcome.
struct Writes {
    /// Planned and not yet sent.
    writes: Vec<LeaderWrite>,
    then: Vec<Then>,
    /// How many were sent to the writer.
    sent: usize,
    writer: Option<Writer>,
    store: Store,
    lease: LeaderLease,
}

/// The task applying a pass's writes in order, a script call at a time.
struct Writer {
    calls: mpsc::UnboundedSender<Vec<LeaderWrite>>,
    done: tokio::task::JoinHandle<Vec<kvstore::Result<Written>>>,
}

impl Writes {
    fn new(store: &Store, lease: &LeaderLease) -> Writes {
        Writes {
            writes: Vec::new(),
            then: Vec::new(),
            sent: 0,
            writer: None,
            store: store.clone(),
            lease: lease.clone(),
        }
    }

    fn push(&mut self, write: LeaderWrite, then: Then) {
        self.writes.push(write);
        self.then.push(then);
        if self.writes.len() >= kvstore::MAX_ITEMS_PER_CALL {
            self.send();
        }
    }

    /// Hands the planned writes to the writer, starting it if need be.
    fn send(&mut self) {
        let writer = self.writer.get_or_insert_with(|| {
            let (calls, mut rx) = mpsc::unbounded_channel::<Vec<LeaderWrite>>();
            let (store, lease) = (self.store.clone(), self.lease.clone());
            let task = async move {
                let mut out = Vec::new();
                while let Some(call) = rx.recv().await {
                    out.extend(store.write_as_leader(&lease, &call).await);
                }
                out
            };
            let done =
                tokio::spawn(tracing::Instrument::instrument(task, tracing::Span::current()));
            Writer { calls, done }
        });
        let call = std::mem::take(&mut self.writes);
        self.sent += call.len();
        // The writer ends only once this sender is dropped; an error means it panicked, which
        // the outcomes collected in `flush` report.
        let _ = writer.calls.send(call);
    }

    /// How many writes were planned.
    fn len(&self) -> usize {
        self.then.len()
    }

    fn is_empty(&self) -> bool {
        self.then.is_empty()
    }
}

/// What follows the outcome of one planned write.
enum Then {
    /// A start that hung was failed: counted as a failed start.
    FailedStuck { model: String, failed: InstanceRecord, previous: InstanceStatus },
    /// The placeable verdict was recorded.
    Verdict { model: String, verdict: Option<String> },
    /// An instance was placed (already in the view, its GPUs taken there).
    Placed(Box<Placed>),
    /// An instance was drained (already draining in the view).
    Drained { model: String, instance: String, worker: String, previous: InstanceStatus },
    /// An instance on a lost worker was failed, or a drain that overran was stopped.
    Ended { instance: String, what: &'static str },
    /// A desired count was recorded.
    Desired { model: String, desired: u32, decision: String, error: String },
}

/// A planned placement, for what follows its outcome.
struct Placed {
    model: String,
    instance_id: String,
    worker: String,
    gpus: Vec<u32>,
    tier: kvstore::Tier,
    bytes: u64,
    /// The placement's span (its context travels in the start command).
    span: tracing::Span,
}

/// A planned decision, for its desired-count write once its placements are done.
struct Draft {
    model: String,
    /// The desired count it started from, and the one it commits.
    from: u32,
    committed: u32,
    /// Instances counting as capacity before the placements.
    actual: u32,
    /// Why the desired count changes ('' if it does not).
    reason: String,
    /// Its placements: the write's position in the batch, and where it went.
    placed: Vec<(usize, String)>,
    /// What stops the model starting ('' for nothing), and what was recorded before.
    error: String,
    last_error: String,
    deleting: bool,
}

async fn read_events(
    mut reader: kvstore::EventReader,
    tx: mpsc::Sender<Input>,
    stop: CancellationToken,
) {
    let mut errors = backoff();
    loop {
        let batch = tokio::select! {
            _ = stop.cancelled() => return,
            b = reader.next_batch(Duration::from_secs(1), 512) => b,
        };
        let input = match batch {
            Ok(EventBatch::Events(e)) if e.is_empty() => continue,
            Ok(EventBatch::Events(e)) => {
                errors = backoff();
                Input::Events(e)
            }
            Ok(EventBatch::FellBehind { .. }) => Input::Resync,
            Err(e) => {
                tracing::warn!(error = %e, "event stream interrupted");
                let pause = errors.next().unwrap_or(Duration::from_secs(5));
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
                Input::Resync
            }
        };
        if tx.send(input).await.is_err() {
            return;
        }
    }
}

/// A new instance id: the model name made id-safe (so an operator reading keys and logs sees
/// whose it is), then a UUIDv7 (so a model's instances sort by when they were placed).
fn new_instance_id(model: &str) -> String {
    let base: String = model
        .chars()
        .map(
            |c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' { c } else { '.' },
        )
        .take(kvstore::names::MAX_ID - 37)
        .collect();
    format!("{base}-{}", uuid::Uuid::now_v7())
}

/// A duration in words: "900 s", "1500 ms".
fn words(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

/// Wall-clock milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
