//! Conversions between kvstore records and the v1 API's messages, shared by every service.

use kvstore::{Checkpoint, GpuInfo, InstanceStatus, Tier, WorkerRecord, WorkerStatus};
use sllm_api::v1 as pb;

/// The API's tier for a kvstore tier.
pub fn tier_to_pb(t: Tier) -> pb::CheckpointTier {
    match t {
        Tier::Gpu => pb::CheckpointTier::Gpu,
        Tier::HostMemory => pb::CheckpointTier::HostMemory,
        Tier::Disk => pb::CheckpointTier::Disk,
        Tier::Remote => pb::CheckpointTier::Remote,
    }
}

/// The kvstore tier for an API tier number; None for unspecified or unknown values.
pub fn tier_from_pb(t: i32) -> Option<Tier> {
    match pb::CheckpointTier::try_from(t).ok()? {
        pb::CheckpointTier::Gpu => Some(Tier::Gpu),
        pb::CheckpointTier::HostMemory => Some(Tier::HostMemory),
        pb::CheckpointTier::Disk => Some(Tier::Disk),
        pb::CheckpointTier::Remote => Some(Tier::Remote),
        pb::CheckpointTier::Unspecified => None,
    }
}

/// The API's instance state for a kvstore status.
pub fn instance_state_to_pb(s: InstanceStatus) -> pb::InstanceState {
    match s {
        InstanceStatus::Pending => pb::InstanceState::Pending,
        InstanceStatus::Loading => pb::InstanceState::Loading,
        InstanceStatus::Ready => pb::InstanceState::Ready,
        InstanceStatus::Draining => pb::InstanceState::Draining,
        InstanceStatus::Stopped => pb::InstanceState::Stopped,
        InstanceStatus::Failed => pb::InstanceState::Failed,
        InstanceStatus::Lost => pb::InstanceState::Lost,
    }
}

/// The kvstore status for an API instance state number; None for unspecified or unknown.
pub fn instance_state_from_pb(s: i32) -> Option<InstanceStatus> {
    match pb::InstanceState::try_from(s).ok()? {
        pb::InstanceState::Pending => Some(InstanceStatus::Pending),
        pb::InstanceState::Loading => Some(InstanceStatus::Loading),
        pb::InstanceState::Ready => Some(InstanceStatus::Ready),
        pb::InstanceState::Draining => Some(InstanceStatus::Draining),
        pb::InstanceState::Stopped => Some(InstanceStatus::Stopped),
        pb::InstanceState::Failed => Some(InstanceStatus::Failed),
        pb::InstanceState::Lost => Some(InstanceStatus::Lost),
        pb::InstanceState::Unspecified => None,
    }
}

/// The API's worker state for a kvstore status.
pub fn worker_state_to_pb(s: WorkerStatus) -> pb::WorkerState {
    match s {
        WorkerStatus::Initializing => pb::WorkerState::Initializing,
        WorkerStatus::Ready => pb::WorkerState::Ready,
        WorkerStatus::Lost => pb::WorkerState::Lost,
    }
}

/// A worker record as the API shows it.
pub fn worker_to_pb(w: WorkerRecord) -> pb::Worker {
    pb::Worker {
        worker_id: w.worker_id,
        epoch: w.epoch,
        state: worker_state_to_pb(w.status) as i32,
        address: w.address,
        gpus: w
            .inventory
            .gpus
            .into_iter()
            .map(|g| pb::Gpu { index: g.index, name: g.name, memory_bytes: g.memory_bytes })
            .collect(),
        host_memory_bytes: w.inventory.host_memory_bytes,
        checkpoints: w
            .inventory
            .checkpoints
            .into_iter()
            .map(|c| pb::CachedCheckpoint {
                model: c.model,
                size_bytes: c.size_bytes,
                tier: tier_to_pb(c.tier) as i32,
            })
            .collect(),
        bandwidths: w
            .inventory
            .bandwidths
            .into_iter()
            .map(|b| pb::TierBandwidth {
                tier: tier_to_pb(b.tier) as i32,
                bytes_per_second: b.bytes_per_second,
            })
            .collect(),
        free_gpus: w.free_gpus,
        instance_ids: w.instance_ids,
        lease_deadline_unix_ms: w.lease_deadline_ms.unwrap_or(0),
        version: w.version,
    }
}

/// A reported inventory as kvstore stores it; the error names the offending field.
pub fn inventory_from_pb(inv: &pb::Inventory) -> Result<kvstore::Inventory, tonic::Status> {
    let mut checkpoints = Vec::with_capacity(inv.checkpoints.len());
    for (i, c) in inv.checkpoints.iter().enumerate() {
        let tier = tier_from_pb(c.tier).ok_or_else(|| {
            crate::field_status(&format!("inventory.checkpoints[{i}].tier"), "must be set")
        })?;
        checkpoints.push(Checkpoint { model: c.model.clone(), size_bytes: c.size_bytes, tier });
    }
    let mut bandwidths = Vec::with_capacity(inv.bandwidths.len());
    for (i, b) in inv.bandwidths.iter().enumerate() {
        let tier = tier_from_pb(b.tier).ok_or_else(|| {
            crate::field_status(&format!("inventory.bandwidths[{i}].tier"), "must be set")
        })?;
        bandwidths.push(kvstore::Bandwidth { tier, bytes_per_second: b.bytes_per_second });
    }
    Ok(kvstore::Inventory {
        gpus: inv
            .gpus
            .iter()
            .map(|g| GpuInfo { index: g.index, name: g.name.clone(), memory_bytes: g.memory_bytes })
            .collect(),
        host_memory_bytes: inv.host_memory_bytes,
        checkpoints,
        bandwidths,
    })
}

/// The instances a worker reports running, as kvstore takes them.
pub fn running_from_pb(
    running: &[pb::RunningInstance],
) -> Result<Vec<kvstore::RunningInstance>, tonic::Status> {
    running
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let status = instance_state_from_pb(r.state)
                .filter(|s| {
                    matches!(
                        s,
                        InstanceStatus::Loading | InstanceStatus::Ready | InstanceStatus::Draining
                    )
                })
                .ok_or_else(|| {
                    crate::field_status(
                        &format!("inventory.running[{i}].state"),
                        "must be LOADING, READY or DRAINING",
                    )
                })?;
            Ok(kvstore::RunningInstance {
                instance_id: r.instance_id.clone(),
                status,
                gpus: r.gpus.clone(),
            })
        })
        .collect()
}
