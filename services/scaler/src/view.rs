//! The leader's picture of the cluster: deployments, live instances (indexed by model and by
//! worker), workers and demand. Read in full on taking the lead, after the event stream was
//! trimmed past the leader, and every resync interval; kept current in between from the event
//! stream, so neither a decision nor a tick needs more than the demand from Redis.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use kvstore::{Demand, DeploymentRecord, InstanceRecord, InstanceStatus, Store, WorkerRecord};

#[derive(Default)]
pub(crate) struct View {
    pub(crate) deployments: BTreeMap<String, DeploymentRecord>,
    pub(crate) workers: BTreeMap<String, WorkerRecord>,
    pub(crate) demand: BTreeMap<String, Demand>,
    /// Models marked as impossible to place, with why (as recorded in Redis).
    pub(crate) unplaceable: HashMap<String, String>,
    /// GPUs of the largest ready worker (None: no ready worker), kept by [`View::set_worker`].
    largest_ready: Option<usize>,
    /// GPUs of the largest ready worker that runs only named backends, per backend (a worker
    /// that runs any backend counts in `largest_any`), kept with `largest_ready`.
    largest_by_backend: HashMap<String, usize>,
    largest_any: Option<usize>,
    instances: HashMap<String, InstanceRecord>,
    by_model: HashMap<String, BTreeSet<String>>,
    by_worker: HashMap<String, BTreeSet<String>>,
}

impl View {
    /// Reads everything.
    pub(crate) async fn load(store: &Store) -> kvstore::Result<View> {
        let (deployments, instances, workers, demand, unplaceable) = tokio::try_join!(
            store.list_deployments(),
            store.live_instances(),
            store.list_workers(),
            store.read_demand(),
            store.unplaceable_models(),
        )?;
        let mut view = View {
            deployments: deployments.into_iter().map(|d| (d.spec.model.clone(), d)).collect(),
            workers: workers.into_iter().map(|w| (w.worker_id.clone(), w)).collect(),
            demand,
            unplaceable,
            ..View::default()
        };
        for i in instances {
            view.insert(i);
        }
        view.recount_fleet();
        Ok(view)
    }

    /// Replaces (or, with None, forgets) one worker.
    pub(crate) fn set_worker(&mut self, id: &str, rec: Option<WorkerRecord>) {
        match rec {
            Some(w) => self.workers.insert(id.to_string(), w),
            None => self.workers.remove(id),
        };
        self.recount_fleet();
    }

    /// GPUs of the largest ready worker, or None if no worker is ready.
    pub(crate) fn largest_ready_worker(&self) -> Option<usize> {
        self.largest_ready
    }

    /// GPUs of the largest ready worker that can start `backend` (None: none can).
    pub(crate) fn largest_ready_for(&self, backend: &str) -> Option<usize> {
        self.largest_any.max(self.largest_by_backend.get(backend).copied())
    }

    fn recount_fleet(&mut self) {
        let ready = || self.workers.values().filter(|w| w.status == kvstore::WorkerStatus::Ready);
        self.largest_ready = crate::policy::largest_worker(ready());
        self.largest_any =
            crate::policy::largest_worker(ready().filter(|w| w.inventory.backends.is_empty()));
        let mut by_backend: HashMap<String, usize> = HashMap::new();
        for w in ready() {
            for b in &w.inventory.backends {
                let n = by_backend.entry(b.clone()).or_default();
                *n = (*n).max(w.inventory.gpus.len());
            }
        }
        self.largest_by_backend = by_backend;
    }

    /// One live instance.
    pub(crate) fn instance(&self, id: &str) -> Option<&InstanceRecord> {
        self.instances.get(id)
    }

    /// Every live instance.
    pub(crate) fn instances(&self) -> impl Iterator<Item = &InstanceRecord> {
        self.instances.values()
    }

    /// Seconds of loads in progress on `w` (its pending and loading instances), each estimated
    /// as [`crate::policy::load_estimate`] with `default_size` for an unknown checkpoint.
    pub(crate) fn queue_on(&self, w: &WorkerRecord, default_size: u64) -> f64 {
        self.instances_on(&w.worker_id)
            .filter(|i| matches!(i.status, InstanceStatus::Pending | InstanceStatus::Loading))
            .map(|i| crate::policy::load_estimate(w, &i.model, default_size).0)
            .sum()
    }

    /// [`View::queue_on`] for every known worker with a load in progress; the others have
    /// none.
    pub(crate) fn queues(&self, default_size: u64) -> BTreeMap<String, f64> {
        let starting: BTreeSet<&str> = self
            .instances
            .values()
            .filter(|i| matches!(i.status, InstanceStatus::Pending | InstanceStatus::Loading))
            .map(|i| i.worker_id.as_str())
            .collect();
        starting
            .into_iter()
            .filter_map(|id| {
                let w = self.workers.get(id)?;
                Some((id.to_string(), self.queue_on(w, default_size)))
            })
            .collect()
    }

    /// Whether `model` has any live instance.
    pub(crate) fn has_instances(&self, model: &str) -> bool {
        self.by_model.contains_key(model)
    }

    /// Live instances of `model`.
    pub(crate) fn instances_of<'a>(
        &'a self,
        model: &str,
    ) -> impl Iterator<Item = &'a InstanceRecord> + 'a {
        self.by_model.get(model).into_iter().flatten().filter_map(|id| self.instances.get(id))
    }

    /// Live instances on `worker`.
    pub(crate) fn instances_on<'a>(
        &'a self,
        worker: &str,
    ) -> impl Iterator<Item = &'a InstanceRecord> + 'a {
        self.by_worker.get(worker).into_iter().flatten().filter_map(|id| self.instances.get(id))
    }

    /// Instances that count as capacity: pending, loading or ready.
    pub(crate) fn actual(&self, model: &str) -> u32 {
        self.instances_of(model)
            .filter(|i| {
                matches!(
                    i.status,
                    InstanceStatus::Pending | InstanceStatus::Loading | InstanceStatus::Ready
                )
            })
            .count() as u32
    }

    /// Adds or replaces a live instance.
    pub(crate) fn insert(&mut self, rec: InstanceRecord) {
        if rec.status.is_terminal() {
            self.remove(&rec.instance_id);
            return;
        }
        let id = rec.instance_id.clone();
        self.by_model.entry(rec.model.clone()).or_default().insert(id.clone());
        self.by_worker.entry(rec.worker_id.clone()).or_default().insert(id.clone());
        self.instances.insert(id, rec);
    }

    /// Forgets an instance.
    pub(crate) fn remove(&mut self, id: &str) {
        if let Some(rec) = self.instances.remove(id) {
            if let Some(set) = self.by_model.get_mut(&rec.model) {
                set.remove(id);
                if set.is_empty() {
                    self.by_model.remove(&rec.model);
                }
            }
            if let Some(set) = self.by_worker.get_mut(&rec.worker_id) {
                set.remove(id);
                if set.is_empty() {
                    self.by_worker.remove(&rec.worker_id);
                }
            }
        }
    }

    /// Replaces (or, with None or a terminal record, removes) one instance.
    pub(crate) fn set_instance(&mut self, id: &str, rec: Option<InstanceRecord>) {
        match rec {
            Some(r) => self.insert(r),
            None => self.remove(id),
        }
    }

    /// Changes the status of a live instance in place.
    pub(crate) fn set_status(&mut self, id: &str, status: InstanceStatus) {
        if let Some(i) = self.instances.get_mut(id) {
            i.status = status;
        }
    }
}
