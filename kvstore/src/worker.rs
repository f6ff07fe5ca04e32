//! Workers: registration with an epoch (fencing token), readiness after the inventory, the
//! heartbeat that renews the lease, and loss when the session drops or the lease expires.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Store;
use crate::error::{Error, Result};
use crate::instance::InstanceStatus;
use crate::names;
use crate::record::{Fields, status_words};
use crate::scripts::{Arg, gpu_csv, worker_id};

/// One GPU of a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct GpuInfo {
    /// Device index.
    pub index: u32,
    /// Product name.
    pub name: String,
    /// Device memory in bytes.
    pub memory_bytes: u64,
}

/// Storage tiers a checkpoint can be loaded from, fastest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// Resident in GPU memory.
    Gpu,
    /// Pinned in host memory.
    HostMemory,
    /// On local disk.
    Disk,
    /// Fetched from remote storage.
    Remote,
}

/// A checkpoint a worker holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The model it belongs to.
    pub model: String,
    /// Its size in bytes.
    pub size_bytes: u64,
    /// The fastest tier holding it.
    pub tier: Tier,
}

/// Measured load bandwidth of a tier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bandwidth {
    /// The tier.
    pub tier: Tier,
    /// Bytes per second into GPU memory.
    pub bytes_per_second: u64,
}

/// An instance a worker says it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningInstance {
    /// Its id.
    pub instance_id: String,
    /// The model it serves (rebuilds its record if the store lost it).
    pub model: String,
    /// Loading, Ready or Draining.
    pub status: InstanceStatus,
    /// The GPUs it holds.
    pub gpus: Vec<u32>,
}

/// What a worker has.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Inventory {
    /// Its GPUs.
    pub gpus: Vec<GpuInfo>,
    /// Host memory in bytes.
    pub host_memory_bytes: u64,
    /// Checkpoints it holds.
    pub checkpoints: Vec<Checkpoint>,
    /// Bandwidth per tier.
    pub bandwidths: Vec<Bandwidth>,
    /// Deployment backends it can start; empty: any.
    pub backends: Vec<String>,
}

impl Inventory {
    /// Whether instances of a deployment with `backend` may be placed here.
    pub fn runs(&self, backend: &str) -> bool {
        self.backends.is_empty() || self.backends.iter().any(|b| b == backend)
    }
}

/// Most GPUs one worker may report (the largest hosts today carry 16).
pub const MAX_GPUS: usize = 64;
/// Most checkpoints one inventory may list.
pub const MAX_CHECKPOINTS: usize = 4096;
/// Most instances one worker may report running.
pub const MAX_RUNNING: usize = 1024;
/// Largest checkpoint size believed (1 PiB).
pub const MAX_CHECKPOINT_BYTES: u64 = 1 << 50;
/// Largest memory of one GPU believed (4 TiB).
pub const MAX_GPU_MEMORY_BYTES: u64 = 4 << 40;
/// Largest host memory believed (256 TiB).
pub const MAX_HOST_MEMORY_BYTES: u64 = 256 << 40;

impl Tier {
    /// The tier's word, as in JSON (and in metric labels).
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Gpu => "gpu",
            Tier::HostMemory => "host_memory",
            Tier::Disk => "disk",
            Tier::Remote => "remote",
        }
    }

    /// The fastest load bandwidth a worker may claim for this tier (bytes/s): a few times what
    /// today's fastest hardware does (HBM, PCIe 5 x16, NVMe RAID, 400 Gb/s networks), so that
    /// no claim can make a worker look faster than any real one.
    pub fn max_claimed_bandwidth(self) -> u64 {
        match self {
            Tier::Gpu => 16 << 40,
            Tier::HostMemory => 256 << 30,
            Tier::Disk => 128 << 30,
            Tier::Remote => 64 << 30,
        }
    }
}

impl Inventory {
    /// Checks that the report is believable: bounded counts and sizes, unique GPU indexes,
    /// checkpoints and tiers, valid model names, and no more checkpoint bytes claimed in GPU
    /// memory (or host memory, when the worker reports its host memory) than it has there.
    pub fn validate(&self) -> Result<()> {
        if self.gpus.len() > MAX_GPUS {
            return Err(Error::invalid(
                "inventory.gpus",
                format!("{} GPUs; at most {MAX_GPUS} are believed", self.gpus.len()),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for g in &self.gpus {
            if !seen.insert(g.index) {
                return Err(Error::invalid(
                    "inventory.gpus",
                    format!("GPU index {} twice", g.index),
                ));
            }
            if g.memory_bytes > MAX_GPU_MEMORY_BYTES {
                return Err(Error::invalid(
                    "inventory.gpus.memory_bytes",
                    format!(
                        "GPU {} claims {} bytes; at most 4 TiB is believed",
                        g.index, g.memory_bytes
                    ),
                ));
            }
        }
        if self.host_memory_bytes > MAX_HOST_MEMORY_BYTES {
            return Err(Error::invalid(
                "inventory.host_memory_bytes",
                format!("{} bytes; at most 256 TiB is believed", self.host_memory_bytes),
            ));
        }
        if self.checkpoints.len() > MAX_CHECKPOINTS {
            return Err(Error::invalid(
                "inventory.checkpoints",
                format!(
                    "{} checkpoints; at most {MAX_CHECKPOINTS} are believed",
                    self.checkpoints.len()
                ),
            ));
        }
        let mut models = std::collections::HashSet::new();
        let (mut in_gpu, mut in_host) = (0u64, 0u64);
        for c in &self.checkpoints {
            names::validate_model_name("inventory.checkpoints.model", &c.model)?;
            if !models.insert(c.model.as_str()) {
                return Err(Error::invalid(
                    "inventory.checkpoints.model",
                    format!("{} is listed twice", c.model),
                ));
            }
            if c.size_bytes == 0 || c.size_bytes > MAX_CHECKPOINT_BYTES {
                return Err(Error::invalid(
                    "inventory.checkpoints.size_bytes",
                    format!("{}: {} bytes (1 byte to 1 PiB)", c.model, c.size_bytes),
                ));
            }
            match c.tier {
                Tier::Gpu => in_gpu = in_gpu.saturating_add(c.size_bytes),
                Tier::HostMemory => in_host = in_host.saturating_add(c.size_bytes),
                Tier::Disk | Tier::Remote => {}
            }
        }
        let gpu_memory = self.gpus.iter().map(|g| g.memory_bytes).fold(0u64, u64::saturating_add);
        if in_gpu > gpu_memory {
            return Err(Error::invalid(
                "inventory.checkpoints.tier",
                format!(
                    "{in_gpu} bytes of checkpoints claimed in GPU memory; the GPUs report \
                     {gpu_memory} bytes"
                ),
            ));
        }
        if self.host_memory_bytes > 0 && in_host > self.host_memory_bytes {
            return Err(Error::invalid(
                "inventory.checkpoints.tier",
                format!(
                    "{in_host} bytes of checkpoints claimed in host memory; the host reports \
                     {} bytes",
                    self.host_memory_bytes
                ),
            ));
        }
        if self.backends.len() > 16 {
            return Err(Error::invalid(
                "inventory.backends",
                format!("{} backends; at most 16 are believed", self.backends.len()),
            ));
        }
        for b in &self.backends {
            names::validate_token("inventory.backends", b)?;
        }
        let mut tiers = std::collections::HashSet::new();
        for b in &self.bandwidths {
            if !tiers.insert(b.tier) {
                return Err(Error::invalid(
                    "inventory.bandwidths.tier",
                    format!("{:?} is listed twice", b.tier),
                ));
            }
            let max = b.tier.max_claimed_bandwidth();
            if b.bytes_per_second == 0 || b.bytes_per_second > max {
                return Err(Error::invalid(
                    "inventory.bandwidths.bytes_per_second",
                    format!(
                        "{:?}: {} bytes/s (1 to {max} is believed)",
                        b.tier, b.bytes_per_second
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Where a worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WorkerStatus {
    /// Registered; inventory not yet complete; nothing is placed on it.
    Initializing,
    /// Placeable.
    Ready,
    /// Its session dropped or its lease expired.
    Lost,
}
status_words!(WorkerStatus { Initializing => "initializing", Ready => "ready", Lost => "lost" });

/// An accepted registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// The new epoch; every later message must carry it.
    pub epoch: u64,
    /// When the lease ends unless renewed (ms, Redis clock).
    pub lease_deadline_ms: u64,
    /// The record's version.
    pub version: u64,
}

/// Why a worker is being declared lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostMode {
    /// Its session stream ended.
    Dropped,
    /// Its lease expired (refused if it has not).
    Expired,
}

/// A worker whose lease has passed, as found in the deadline index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiredLease {
    /// The worker.
    pub worker_id: String,
    /// Its epoch when found.
    pub epoch: u64,
}

/// A stored worker.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerRecord {
    /// Its id (node id).
    pub worker_id: String,
    /// Current epoch.
    pub epoch: u64,
    /// State.
    pub status: WorkerStatus,
    /// Address it registered from.
    pub address: String,
    /// What it has.
    pub inventory: Inventory,
    /// Agent version.
    pub agent_version: String,
    /// When it last registered (ms).
    pub registered_ms: u64,
    /// Record version.
    pub version: u64,
    /// Unassigned GPUs, ascending.
    pub free_gpus: Vec<u32>,
    /// Ids of its live instances, sorted.
    pub instance_ids: Vec<String>,
    /// Lease deadline (ms), if it holds one.
    pub lease_deadline_ms: Option<u64>,
}

impl Store {
    /// Registers (or re-registers) a worker. `token_ok` is the caller's verdict on the join
    /// token; false stores nothing and is refused with Unauthenticated.
    pub async fn register_worker(
        &self,
        worker: &str,
        token_ok: bool,
        address: &str,
        lease: Duration,
        inventory: &Inventory,
        agent_version: &str,
    ) -> Result<Registration> {
        self.register_worker_as("", worker, token_ok, address, lease, inventory, agent_version)
            .await
    }

    /// Like [`Store::register_worker`], as the attempt to join named `registration` (unique per
    /// attempt, e.g. per session). Calling it again with the same `registration` is safe: once
    /// one call has run, the others change nothing but the lease and answer with the same
    /// epoch, so a call that timed out (and may have run) can be retried.
    #[allow(clippy::too_many_arguments)]
    pub async fn register_worker_as(
        &self,
        registration: &str,
        worker: &str,
        token_ok: bool,
        address: &str,
        lease: Duration,
        inventory: &Inventory,
        agent_version: &str,
    ) -> Result<Registration> {
        let worker = worker_id("node_id", worker)?;
        names::validate_address("address", address)?;
        inventory.validate()?;
        let gpus: Vec<String> = inventory.gpus.iter().map(|g| g.index.to_string()).collect();
        let mut fields = holdings(inventory);
        fields.push(("gpus", json(&inventory.gpus)));
        fields.push(("agent_version", agent_version.to_string()));
        let known = self.known_lineage();
        let mut args = vec![
            Arg::Str(worker),
            Arg::Str(if token_ok { "1" } else { "0" }),
            Arg::Str(address),
            Arg::Owned(lease_ms(lease)?),
            Arg::Owned(gpus.join(",")),
            Arg::Owned(uuid::Uuid::now_v7().to_string()),
            Arg::Str(&known),
            Arg::Owned(self.recovery_window_ms()),
            Arg::Str(registration),
        ];
        args.extend(fields.iter().flat_map(|(k, v)| [Arg::Str(k), Arg::Str(v)]));
        let reply = self.run_ok("worker_register", &self.scripts().worker_register, &args).await?;
        self.saw_lineage(reply.values.get(3).map(String::as_str).unwrap_or_default());
        Ok(Registration {
            epoch: reply.u64(0)?,
            lease_deadline_ms: reply.u64(1)?,
            version: reply.u64(2)?,
        })
    }

    /// The worker's inventory is complete: reconcile its instances with what it runs (its
    /// report wins) and make it placeable. Returns ids it reported that are not placed on it;
    /// it should stop them. A repeat at the same epoch (a retry after a timeout) changes
    /// nothing and answers the same.
    pub async fn worker_ready(
        &self,
        worker: &str,
        epoch: u64,
        running: &[RunningInstance],
    ) -> Result<Vec<String>> {
        let worker = worker_id("worker_id", worker)?;
        if running.len() > MAX_RUNNING {
            return Err(Error::invalid(
                "running",
                format!("{} instances; at most {MAX_RUNNING} are believed", running.len()),
            ));
        }
        let mut quads = Vec::with_capacity(running.len());
        for r in running {
            names::validate_id("running.instance_id", &r.instance_id)?;
            names::validate_model_name("running.model", &r.model)?;
            if !matches!(
                r.status,
                InstanceStatus::Loading | InstanceStatus::Ready | InstanceStatus::Draining
            ) {
                return Err(Error::invalid(
                    "running.state",
                    format!("{} is not a running state (loading, ready, draining)", r.status),
                ));
            }
            quads.push((
                r.instance_id.as_str(),
                r.model.as_str(),
                r.status.as_str(),
                gpu_csv("running.gpus", &r.gpus)?,
            ));
        }
        let mut args = vec![Arg::Str(worker), Arg::Owned(epoch.to_string())];
        for (id, model, state, gpus) in &quads {
            args.extend([Arg::Str(id), Arg::Str(model), Arg::Str(state), Arg::Str(gpus)]);
        }
        let reply = self.run_ok("worker_ready", &self.scripts().worker_ready, &args).await?;
        Ok(reply.values.iter().skip(1).cloned().collect())
    }

    /// Replaces what the worker holds (checkpoints, host memory, bandwidths); its GPUs are fixed
    /// per registration. Returns the record's new version.
    pub async fn update_inventory(
        &self,
        worker: &str,
        epoch: u64,
        inventory: &Inventory,
    ) -> Result<u64> {
        let worker = worker_id("worker_id", worker)?;
        inventory.validate()?;
        let fields = holdings(inventory);
        let mut args = vec![Arg::Str(worker), Arg::Owned(epoch.to_string())];
        args.extend(fields.iter().flat_map(|(k, v)| [Arg::Str(k), Arg::Str(v)]));
        let reply =
            self.run_ok("worker_inventory", &self.scripts().worker_inventory, &args).await?;
        reply.u64(0)
    }

    /// Renews a worker's lease: one round trip. Returns the new deadline (ms, Redis clock).
    pub async fn heartbeat(&self, worker: &str, epoch: u64, lease: Duration) -> Result<u64> {
        let worker = worker_id("worker_id", worker)?;
        let reply = self
            .run_ok(
                "worker_heartbeat",
                &self.scripts().worker_heartbeat,
                &[Arg::Str(worker), Arg::Owned(epoch.to_string()), Arg::Owned(lease_ms(lease)?)],
            )
            .await?;
        reply.u64(0)
    }

    /// Declares a worker's session `epoch` lost; its live instances become lost. Returns how
    /// many instances were.
    pub async fn worker_lost(
        &self,
        worker: &str,
        epoch: u64,
        mode: LostMode,
        reason: &str,
    ) -> Result<u64> {
        let worker = worker_id("worker_id", worker)?;
        let mode = match mode {
            LostMode::Dropped => "dropped",
            LostMode::Expired => "expired",
        };
        let reply = self
            .run_ok(
                "worker_lost",
                &self.scripts().worker_lost,
                &[
                    Arg::Str(worker),
                    Arg::Owned(epoch.to_string()),
                    Arg::Str(mode),
                    Arg::Str(reason),
                ],
            )
            .await?;
        reply.u64(1)
    }

    /// Workers whose lease deadline has passed, oldest first, at most `limit`. Reads the
    /// deadline index only (no SCAN).
    pub async fn expired_leases(&self, limit: usize) -> Result<Vec<ExpiredLease>> {
        let reply = self
            .run_ok(
                "leases_expired",
                &self.scripts().leases_expired,
                &[Arg::Owned(limit.max(1).to_string())],
            )
            .await?;
        let mut out = Vec::new();
        for pair in reply.values.chunks(2) {
            if let [id, epoch] = pair {
                let epoch =
                    epoch.parse().map_err(|_| reply.protocol(format!("epoch {epoch:?}")))?;
                out.push(ExpiredLease { worker_id: id.clone(), epoch });
            }
        }
        Ok(out)
    }

    /// Removes up to `limit` workers lost for longer than `retention`, oldest first, with every
    /// key of theirs (record, indexes, free GPUs, command stream and cursor, address); an
    /// instance still placed on one is failed. Reads the lost-worker index only (no SCAN).
    /// Returns the ids removed.
    pub async fn forget_lost_workers(
        &self,
        retention: Duration,
        limit: usize,
    ) -> Result<Vec<String>> {
        let retention_ms = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX);
        let reply = self
            .run_ok(
                "workers_forget",
                &self.scripts().workers_forget,
                &[Arg::Owned(retention_ms.to_string()), Arg::Owned(limit.max(1).to_string())],
            )
            .await?;
        Ok(reply.values)
    }

    /// Adds every lost worker missing from the lost-worker index (lost before the index
    /// existed) to it, so [`Store::forget_lost_workers`] removes it in time. Reads the set of
    /// lost workers: for a replica's start, not for a tick. Returns how many were added.
    pub async fn index_lost_workers(&self) -> Result<u64> {
        let reply =
            self.run_ok("workers_lost_index", &self.scripts().workers_lost_index, &[]).await?;
        reply.u64(0)
    }

    /// One worker with its free GPUs, instances and lease deadline, or None.
    pub async fn get_worker(&self, worker: &str) -> Result<Option<WorkerRecord>> {
        let worker = worker_id("worker_id", worker)?;
        let mut all = self.read_workers(&[worker.to_string()]).await?;
        Ok(all.pop().flatten())
    }

    /// Every worker, sorted by id.
    pub async fn list_workers(&self) -> Result<Vec<WorkerRecord>> {
        let mut ids = self.smembers(self.keys().workers()).await?;
        ids.sort();
        Ok(self.read_workers(&ids).await?.into_iter().flatten().collect())
    }

    async fn read_workers(&self, ids: &[String]) -> Result<Vec<Option<WorkerRecord>>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys = self.keys();
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("HGETALL").arg(keys.worker(id));
            pipe.cmd("SMEMBERS").arg(keys.free_gpus(id));
            pipe.cmd("SMEMBERS").arg(keys.worker_instances(id));
            pipe.cmd("ZSCORE").arg(keys.lease_deadlines()).arg(id);
        }
        type Row = (std::collections::HashMap<String, String>, Vec<u32>, Vec<String>, Option<f64>);
        let values: Vec<redis::Value> = self.read_pipe(&pipe).await?;
        let mut out = Vec::with_capacity(ids.len());
        for (id, chunk) in ids.iter().zip(values.chunks(4)) {
            let row: Row =
                redis::FromRedisValue::from_redis_value(redis::Value::Array(chunk.to_vec()))
                    .map_err(|e| Error::Malformed {
                        key: keys.worker(id),
                        field: "*".into(),
                        reason: e.to_string(),
                    })?;
            let (map, mut free, mut instances, deadline) = row;
            let f = Fields::new(keys.worker(id), map);
            if f.is_empty() {
                out.push(None);
                continue;
            }
            free.sort_unstable();
            instances.sort();
            out.push(Some(WorkerRecord {
                worker_id: f.text("worker_id")?,
                epoch: f.parse("epoch")?,
                status: f.parse("status")?,
                address: f.text("address")?,
                inventory: Inventory {
                    gpus: f.json("gpus")?,
                    host_memory_bytes: f.parse_or("host_memory_bytes", 0)?,
                    checkpoints: f.json("checkpoints")?,
                    bandwidths: f.json("bandwidths")?,
                    backends: f.json("backends")?,
                },
                agent_version: f.parse_or("agent_version", String::new())?,
                registered_ms: f.parse("registered_ms")?,
                version: f.parse("version")?,
                free_gpus: free,
                instance_ids: instances,
                lease_deadline_ms: deadline.map(|d| d as u64),
            }));
        }
        Ok(out)
    }
}

/// The record fields of what a worker holds (everything in the inventory but its GPUs).
fn holdings(inventory: &Inventory) -> Vec<(&'static str, String)> {
    vec![
        ("host_memory_bytes", inventory.host_memory_bytes.to_string()),
        ("checkpoints", json(&inventory.checkpoints)),
        ("bandwidths", json(&inventory.bandwidths)),
        ("backends", json(&inventory.backends)),
    ]
}

fn lease_ms(lease: Duration) -> Result<String> {
    let ms = lease.as_millis();
    if !(10..=3_600_000).contains(&ms) {
        return Err(Error::invalid("lease", "must be between 10 ms and 1 h"));
    }
    Ok(ms.to_string())
}

/// The JSON stored for an inventory list. These types hold only strings, numbers and unit
/// enums, so serialisation cannot fail; an empty string (read back as an empty list) is stored
/// if it ever did.
fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tier_s_word_is_its_json() {
        for tier in [Tier::Gpu, Tier::HostMemory, Tier::Disk, Tier::Remote] {
            assert_eq!(json(&tier), format!("\"{}\"", tier.as_str()));
        }
    }
}
