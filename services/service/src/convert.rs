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
        backends: inv.backends.clone(),
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
                model: r.model.clone(),
                status,
                gpus: r.gpus.clone(),
            })
        })
        .collect()
}

pub use sllm_api::json::{json_to_struct, struct_to_json};

/// A scaling policy from the API, with ServerlessLLM's defaults for what is left out; fields
/// are named under `prefix` in errors (e.g. `spec.auto_scaling_config`).
pub fn autoscaling_from_pb(
    a: Option<&pb::AutoScalingConfig>,
    prefix: &str,
) -> Result<kvstore::AutoScaling, tonic::Status> {
    let Some(a) = a else { return Ok(kvstore::AutoScaling::default()) };
    let non_negative = |name: &str, v: i32| -> Result<u32, tonic::Status> {
        u32::try_from(v).map_err(|_| {
            crate::field_status(
                &format!("{prefix}.{name}"),
                format!("must not be negative, got {v}"),
            )
        })
    };
    Ok(kvstore::AutoScaling {
        metric: if a.metric.is_empty() { "concurrency".into() } else { a.metric.clone() },
        target: a.target,
        min_instances: non_negative("min_instances", a.min_instances)?,
        max_instances: non_negative("max_instances", a.max_instances)?,
        keep_alive_s: non_negative("keep_alive", a.keep_alive)?,
    })
}

/// A deployment spec from the API, checked field by field (errors name `spec.<field>`).
pub fn spec_from_pb(
    spec: Option<&pb::DeploymentSpec>,
) -> Result<kvstore::DeploymentSpec, tonic::Status> {
    let spec = spec.ok_or_else(|| crate::field_status("spec", "is required"))?;
    if spec.backend.is_empty() {
        return Err(crate::field_status(
            "spec.backend",
            "must not be empty (e.g. \"vllm\", \"sim\")",
        ));
    }
    let num_gpus = u32::try_from(spec.num_gpus).map_err(|_| {
        crate::field_status("spec.num_gpus", format!("must not be negative, got {}", spec.num_gpus))
    })?;
    if let Some(config) = &spec.backend_config
        && let serde_json::Value::Object(map) = struct_to_json(config)
    {
        // Refused here, naming the key, rather than when an instance starts on a GPU host.
        sllm_api::backend_config::check(&spec.backend, &map).map_err(|e| {
            crate::field_status(&format!("spec.backend_config.{}", e.key), e.reason)
        })?;
    }
    let out = kvstore::DeploymentSpec {
        model: spec.model.clone(),
        backend: spec.backend.clone(),
        num_gpus,
        autoscaling: autoscaling_from_pb(
            spec.auto_scaling_config.as_ref(),
            "spec.auto_scaling_config",
        )?,
        backend_config: match &spec.backend_config {
            Some(s) => struct_to_json(s).to_string(),
            None => String::new(),
        },
    };
    out.validate().map_err(|e| crate::to_status(e, "spec"))?;
    Ok(out)
}

/// The API's scaling policy.
pub fn autoscaling_to_pb(a: &kvstore::AutoScaling) -> pb::AutoScalingConfig {
    pb::AutoScalingConfig {
        metric: a.metric.clone(),
        target: a.target,
        min_instances: a.min_instances as i32,
        max_instances: a.max_instances as i32,
        keep_alive: a.keep_alive_s as i32,
    }
}

/// What to tell a user about a model whose deployment record is gone while `instances` of it
/// still run on workers.
pub fn missing_deployment_words(model: &str, instances: usize) -> String {
    format!(
        "model {model:?} has no deployment record, but {instances} instance(s) of it run on \
         workers: the store lost its state (e.g. Redis restarted without persistence); deploy \
         it again to adopt them, or delete it to stop them"
    )
}

/// A model with live instances and no deployment record, as the API lists it.
pub fn missing_deployment_to_pb(
    model: &str,
    instances: &[&kvstore::InstanceRecord],
) -> pb::Deployment {
    pb::Deployment {
        spec: Some(pb::DeploymentSpec { model: model.to_string(), ..Default::default() }),
        state: pb::DeploymentState::Missing as i32,
        instances: Some(instance_counts(instances)),
        last_error: missing_deployment_words(model, instances.len()),
        ..Default::default()
    }
}

fn instance_counts(instances: &[&kvstore::InstanceRecord]) -> pb::InstanceCounts {
    let mut counts = pb::InstanceCounts::default();
    for i in instances {
        match i.status {
            InstanceStatus::Pending => counts.pending += 1,
            InstanceStatus::Loading => counts.loading += 1,
            InstanceStatus::Ready => counts.ready += 1,
            InstanceStatus::Draining => counts.draining += 1,
            InstanceStatus::Lost => counts.lost += 1,
            InstanceStatus::Stopped | InstanceStatus::Failed => {}
        }
    }
    counts
}

/// A stored deployment as the API shows it, with its instances counted by state.
pub fn deployment_to_pb(
    d: &kvstore::DeploymentRecord,
    instances: &[&kvstore::InstanceRecord],
) -> pb::Deployment {
    let counts = instance_counts(instances);
    let backend_config = if d.spec.backend_config.is_empty() {
        None
    } else {
        serde_json::from_str::<serde_json::Value>(&d.spec.backend_config)
            .ok()
            .map(|v| json_to_struct(&v))
    };
    pb::Deployment {
        spec: Some(pb::DeploymentSpec {
            model: d.spec.model.clone(),
            backend: d.spec.backend.clone(),
            num_gpus: d.spec.num_gpus as i32,
            auto_scaling_config: Some(autoscaling_to_pb(&d.spec.autoscaling)),
            backend_config,
        }),
        state: match d.status {
            kvstore::DeploymentStatus::Active => pb::DeploymentState::Active,
            kvstore::DeploymentStatus::Deleting => pb::DeploymentState::Deleting,
        } as i32,
        version: d.version,
        created_unix_ms: d.created_ms,
        updated_unix_ms: d.updated_ms,
        desired_instances: d.desired,
        instances: Some(counts),
        last_error: d.last_error.clone(),
    }
}

/// An instance record as the API shows it.
pub fn instance_to_pb(i: &kvstore::InstanceRecord) -> pb::Instance {
    pb::Instance {
        instance_id: i.instance_id.clone(),
        model: i.model.clone(),
        worker_id: i.worker_id.clone(),
        state: instance_state_to_pb(i.status) as i32,
        gpus: i.gpus.clone(),
        reason: i.reason.clone(),
        version: i.version,
        updated_unix_ms: i.updated_ms,
    }
}
