//! A full consistency check of the stored state: every record agrees with every index it
//! belongs to, and no GPU is promised twice. It reads everything (set members and hashes, never
//! SCAN), so it is for tests, the chaos suite and operators' diagnostics, not for a hot path.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::Store;
use crate::deployment::{DeploymentRecord, DeploymentStatus};
use crate::error::Result;
use crate::instance::{InstanceRecord, InstanceStatus};
use crate::record::Fields;
use crate::worker::WorkerStatus;

impl Store {
    /// Every broken invariant, described; empty when the state is consistent. A record that
    /// cannot be read is reported as a violation, not as an error.
    pub async fn check_invariants(&self) -> Result<Vec<String>> {
        let keys = self.keys().clone();
        let mut bad = Vec::new();

        // Deployments and their status index.
        let names: BTreeSet<String> =
            self.smembers(keys.deployments()).await?.into_iter().collect();
        let mut deployments: BTreeMap<String, DeploymentRecord> = BTreeMap::new();
        for f in self.hgetall_many(names.iter().map(|n| keys.deployment(n)).collect()).await? {
            if f.is_empty() {
                bad.push(format!("{} is indexed but has no record", f.key()));
                continue;
            }
            match DeploymentRecord::from_fields(&f) {
                Ok(d) => {
                    deployments.insert(d.spec.model.clone(), d);
                }
                Err(e) => bad.push(e.to_string()),
            }
        }
        for status in DeploymentStatus::ALL {
            let members: BTreeSet<String> = self
                .smembers(keys.deployments_status(status.as_str()))
                .await?
                .into_iter()
                .collect();
            for m in &members {
                match deployments.get(m) {
                    Some(d) if d.status == *status => {}
                    Some(d) => {
                        bad.push(format!("deployment {m} is {} but indexed as {status}", d.status))
                    }
                    None => {
                        bad.push(format!("deployment {m} is indexed as {status} but not listed"))
                    }
                }
            }
            for (name, d) in &deployments {
                if d.status == *status && !members.contains(name) {
                    bad.push(format!("deployment {name} is {status} but missing from that index"));
                }
            }
        }
        // An unplaceable mark never outlives its deployment.
        for model in self.unplaceable_models().await?.keys() {
            if !deployments.contains_key(model) {
                bad.push(format!("model {model} is marked unplaceable but not deployed"));
            }
        }

        // Workers, their status index and the lease index.
        let worker_ids: Vec<String> = {
            let mut v = self.smembers(keys.workers()).await?;
            v.sort();
            v
        };
        let mut workers = BTreeMap::new();
        for f in self.hgetall_many(worker_ids.iter().map(|w| keys.worker(w)).collect()).await? {
            if f.is_empty() {
                bad.push(format!("{} is indexed but has no record", f.key()));
                continue;
            }
            match (f.text("worker_id"), f.parse::<WorkerStatus>("status"), f.text("gpu_indexes")) {
                (Ok(id), Ok(status), Ok(gpus)) => {
                    workers.insert(id, (status, gpus));
                }
                (a, b, c) => {
                    for e in [a.err(), b.err(), c.err()].into_iter().flatten() {
                        bad.push(e.to_string());
                    }
                }
            }
        }
        let leased: BTreeSet<String> = self
            .read::<Vec<String>>(redis::cmd("ZRANGE").arg(keys.lease_deadlines()).arg(0).arg(-1))
            .await?
            .into_iter()
            .collect();
        for status in WorkerStatus::ALL {
            let members: BTreeSet<String> =
                self.smembers(keys.workers_status(status.as_str())).await?.into_iter().collect();
            for m in &members {
                match workers.get(m) {
                    Some((s, _)) if s == status => {}
                    Some((s, _)) => bad.push(format!("worker {m} is {s} but indexed as {status}")),
                    None => bad.push(format!("worker {m} is indexed as {status} but not listed")),
                }
            }
            for (id, (s, _)) in &workers {
                if s == status && !members.contains(id) {
                    bad.push(format!("worker {id} is {status} but missing from that index"));
                }
            }
        }
        for (id, (s, _)) in &workers {
            let has_lease = leased.contains(id);
            if (*s == WorkerStatus::Lost) == has_lease {
                bad.push(format!(
                    "worker {id} is {s} but {} a lease deadline",
                    if has_lease { "has" } else { "lacks" }
                ));
            }
        }
        for id in &leased {
            if !workers.contains_key(id) {
                bad.push(format!("lease deadline for unknown worker {id}"));
            }
        }
        let lost_indexed: BTreeSet<String> = self
            .read::<Vec<String>>(redis::cmd("ZRANGE").arg(keys.lost_workers()).arg(0).arg(-1))
            .await?
            .into_iter()
            .collect();
        for (id, (s, _)) in &workers {
            let indexed = lost_indexed.contains(id);
            if (*s == WorkerStatus::Lost) != indexed {
                bad.push(format!(
                    "worker {id} is {s} but {} the lost-worker index",
                    if indexed { "in" } else { "missing from" }
                ));
            }
        }
        for id in &lost_indexed {
            if !workers.contains_key(id) {
                bad.push(format!("lost-worker index entry for unknown worker {id}"));
            }
        }

        // Instances: each live one in exactly one status set, and in its model and worker sets.
        let mut where_indexed: HashMap<String, Vec<InstanceStatus>> = HashMap::new();
        for status in InstanceStatus::ALL {
            for id in self.smembers(keys.instances_status(status.as_str())).await? {
                if status.is_terminal() {
                    bad.push(format!("instance {id} is indexed under terminal status {status}"));
                }
                where_indexed.entry(id).or_default().push(*status);
            }
        }
        let ids: Vec<String> = where_indexed.keys().cloned().collect();
        let mut instances: HashMap<String, InstanceRecord> = HashMap::new();
        for f in self.hgetall_many(ids.iter().map(|i| keys.instance(i)).collect()).await? {
            match InstanceRecord::from_fields(&f) {
                Ok(r) => {
                    instances.insert(r.instance_id.clone(), r);
                }
                Err(_) if f.is_empty() => {
                    bad.push(format!("{} is indexed but has no record", f.key()))
                }
                Err(e) => bad.push(e.to_string()),
            }
        }
        for (id, statuses) in &where_indexed {
            if statuses.len() > 1 {
                bad.push(format!("instance {id} is indexed under several statuses {statuses:?}"));
            }
            if let Some(r) = instances.get(id)
                && !statuses.contains(&r.status)
            {
                bad.push(format!("instance {id} is {} but indexed as {statuses:?}", r.status));
            }
        }
        let mut by_model: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        let mut by_worker: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for r in instances.values() {
            by_model.entry(&r.model).or_default().insert(&r.instance_id);
            by_worker.entry(&r.worker_id).or_default().insert(&r.instance_id);
            if !deployments.contains_key(&r.model) {
                bad.push(format!(
                    "instance {} serves {} which is not deployed",
                    r.instance_id, r.model
                ));
            }
            if !workers.contains_key(&r.worker_id) {
                bad.push(format!(
                    "instance {} is on unknown worker {}",
                    r.instance_id, r.worker_id
                ));
            }
        }
        let models: BTreeSet<&str> =
            deployments.keys().map(String::as_str).chain(by_model.keys().copied()).collect();
        for m in models {
            let stored: BTreeSet<String> =
                self.smembers(keys.model_instances(m)).await?.into_iter().collect();
            let expected = by_model.get(m).cloned().unwrap_or_default();
            let stored_ref: BTreeSet<&str> = stored.iter().map(String::as_str).collect();
            if stored_ref != expected {
                bad.push(format!(
                    "model {m}: instance index {stored_ref:?} != live instances {expected:?}"
                ));
            }
        }

        // Per worker: instance index, and GPUs neither double-assigned nor both free and used.
        for (id, (_, gpu_csv)) in &workers {
            let stored: BTreeSet<String> =
                self.smembers(keys.worker_instances(id)).await?.into_iter().collect();
            let expected = by_worker.get(id.as_str()).cloned().unwrap_or_default();
            let stored_ref: BTreeSet<&str> = stored.iter().map(String::as_str).collect();
            if stored_ref != expected {
                bad.push(format!(
                    "worker {id}: instance index {stored_ref:?} != live instances {expected:?}"
                ));
            }
            let all: BTreeSet<u32> =
                Fields::new(keys.worker(id), [("g".to_string(), gpu_csv.clone())].into())
                    .csv_u32("g")
                    .unwrap_or_default()
                    .into_iter()
                    .collect();
            let mut used: BTreeMap<u32, &str> = BTreeMap::new();
            for iid in &expected {
                if let Some(r) = instances.get(*iid) {
                    for g in &r.gpus {
                        if let Some(other) = used.insert(*g, iid) {
                            bad.push(format!("worker {id}: GPU {g} assigned to {other} and {iid}"));
                        }
                    }
                }
            }
            let free: Vec<u32> = self.read(redis::cmd("SMEMBERS").arg(keys.free_gpus(id))).await?;
            for g in free {
                if let Some(iid) = used.get(&g) {
                    bad.push(format!("worker {id}: GPU {g} is free but assigned to {iid}"));
                }
                if !all.contains(&g) {
                    bad.push(format!("worker {id}: free GPU {g} does not exist"));
                }
            }
        }
        Ok(bad)
    }
}
