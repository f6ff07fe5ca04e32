//! The leader's picture of the cluster: deployments, live instances, workers and demand, read
//! in full on taking the lead and at every tick, and kept current in between from the event
//! stream, so a decision needs no Redis read.

use std::collections::{BTreeMap, HashMap};

use kvstore::{Demand, DeploymentRecord, InstanceRecord, InstanceStatus, Store, WorkerRecord};

#[derive(Default)]
pub(crate) struct View {
    pub(crate) deployments: BTreeMap<String, DeploymentRecord>,
    pub(crate) instances: HashMap<String, InstanceRecord>,
    pub(crate) workers: BTreeMap<String, WorkerRecord>,
    pub(crate) demand: BTreeMap<String, Demand>,
}

impl View {
    /// Reads everything.
    pub(crate) async fn load(store: &Store) -> kvstore::Result<View> {
        let (deployments, instances, workers, demand) = tokio::try_join!(
            store.list_deployments(),
            store.live_instances(),
            store.list_workers(),
            store.read_demand(),
        )?;
        Ok(View {
            deployments: deployments.into_iter().map(|d| (d.spec.model.clone(), d)).collect(),
            instances: instances.into_iter().map(|i| (i.instance_id.clone(), i)).collect(),
            workers: workers.into_iter().map(|w| (w.worker_id.clone(), w)).collect(),
            demand,
        })
    }

    /// Live instances of `model`.
    pub(crate) fn instances_of<'a>(
        &'a self,
        model: &'a str,
    ) -> impl Iterator<Item = &'a InstanceRecord> + 'a {
        self.instances.values().filter(move |i| i.model == model)
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

    /// Counts by model of the instances on each worker.
    pub(crate) fn replicas_on(&self, worker: &str, model: &str) -> usize {
        self.instances.values().filter(|i| i.worker_id == worker && i.model == model).count()
    }

    /// Replaces (or, with None, removes) one instance.
    pub(crate) fn set_instance(&mut self, id: &str, rec: Option<InstanceRecord>) {
        match rec {
            Some(r) if !r.status.is_terminal() => {
                self.instances.insert(id.to_string(), r);
            }
            _ => {
                self.instances.remove(id);
            }
        }
    }
}
