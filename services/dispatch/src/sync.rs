//! Keeping the routing table current and telling the rest of the mesh about this replica:
//! the event stream (deployments, instances, workers, cold-start progress), batched demand
//! reports, and the replica's registration that workers attach by.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use kvstore::{Demand, EventBatch, InstanceStatus, Position};
use sllm_api::v1 as pb;
use tokio_util::sync::CancellationToken;

use crate::Inner;
use crate::table::Loaded;

/// Reads deployments, ready instances and workers' epochs into the table; retries until Redis
/// answers.
/// Returns the event position the table is current as of.
pub(crate) async fn load(inner: &Arc<Inner>, shutdown: &CancellationToken) -> Position {
    let attempt = || async {
        try_load(inner).await.inspect_err(|e| {
            tracing::warn!(error = %e, "cannot load the routing table; retrying");
        })
    };
    tokio::select! {
        _ = shutdown.cancelled() => Position::start(),
        // Retried until Redis answers (the iterator never ends).
        r = tokio_retry::Retry::start(backoff(), attempt) => r.unwrap_or_else(|_| Position::start()),
    }
}

/// Pauses between tries against Redis: from 50 ms, doubling, at most 2 s, with jitter (the
/// workspace's one policy, `service::retry`).
fn backoff() -> impl Iterator<Item = Duration> {
    service::retry::backoff(Duration::from_millis(50), Duration::from_secs(2))
}

async fn try_load(inner: &Arc<Inner>) -> kvstore::Result<Position> {
    let position = inner.store.event_position().await?;
    let deployments = inner.store.list_deployments().await?;
    let ready = inner.store.instances_in(InstanceStatus::Ready).await?;
    let mut starting = inner.store.instances_in(InstanceStatus::Pending).await?;
    starting.extend(inner.store.instances_in(InstanceStatus::Loading).await?);
    let mut unplaceable = inner.store.unplaceable_models().await?;
    // The workers' epochs, so that a worker already registered can re-attach here at exactly
    // its epoch even if Redis becomes unreachable before its first Attach.
    let workers = inner.store.list_workers().await?;
    let deployments: Vec<Loaded> = deployments
        .into_iter()
        .map(|d| Loaded {
            info: crate::table::RouteInfo::of(&d),
            deleting: d.status == kvstore::DeploymentStatus::Deleting,
            target: d.spec.autoscaling.target,
            unplaceable: unplaceable.remove(&d.spec.model).filter(|r| !r.is_empty()),
            name: d.spec.model,
        })
        .collect();
    let ready: Vec<(String, String, String)> =
        ready.into_iter().map(|i| (i.model, i.instance_id, i.worker_id)).collect();
    let starting: Vec<(String, String)> =
        starting.into_iter().map(|i| (i.model, i.instance_id)).collect();
    inner.table.reload(&deployments, &ready, &starting);
    for w in &workers {
        inner.table.set_epoch(&w.worker_id, w.epoch);
    }
    tracing::info!(models = deployments.len(), ready = ready.len(), "routing table loaded");
    Ok(position)
}

pub(crate) async fn run(
    inner: Arc<Inner>,
    position: Position,
    advertise: String,
    shutdown: CancellationToken,
) {
    tokio::join!(
        events(inner.clone(), position, shutdown.clone()),
        report_demand(inner.clone(), shutdown.clone()),
        register(inner, advertise, shutdown),
    );
}

async fn events(inner: Arc<Inner>, position: Position, shutdown: CancellationToken) {
    let mut reader = inner.store.event_reader(position);
    let mut delays = backoff();
    loop {
        let batch = tokio::select! {
            _ = shutdown.cancelled() => return,
            b = reader.next_batch(Duration::from_secs(1), 512) => b,
        };
        match batch {
            Ok(EventBatch::Events(events)) => {
                delays = backoff();
                for e in events {
                    apply(&inner, &e);
                    if e.kind == "deployment.created" {
                        adopt_ready(&inner, &e.entity).await;
                    }
                    if e.kind == "deployment.created" || e.kind == "deployment.updated" {
                        read_deployment(&inner, &e.entity).await;
                    }
                }
            }
            Ok(EventBatch::FellBehind { resume }) => {
                tracing::warn!(
                    "event stream trimmed past this replica; reloading the routing table"
                );
                if try_load(&inner).await.is_err() {
                    continue;
                }
                reader = inner.store.event_reader(resume);
            }
            Err(e) => {
                // Redis is away: keep routing from memory; resume from the same position.
                tracing::warn!(error = %e, "event stream interrupted; serving from memory");
                let delay = delays.next().unwrap_or(Duration::from_secs(2));
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// A model deployed again after its record was lost may already have ready instances (rebuilt
/// from the workers' reports, their events read while the model had no route): route to them.
async fn adopt_ready(inner: &Inner, model: &str) {
    match inner.store.model_instances(model).await {
        Ok(instances) => {
            for i in instances.iter().filter(|i| i.status == InstanceStatus::Ready) {
                inner.table.add_instance(model, &i.instance_id, &i.worker_id);
            }
        }
        Err(e) => tracing::warn!(%model, error = %e, "cannot read the instances of a new model"),
    }
}

/// The deployment's `target`, which sizes how many requests an instance takes while more
/// are starting, and its listing (creation time, LoRA adapters).
async fn read_deployment(inner: &Inner, model: &str) {
    match inner.store.get_deployment(model).await {
        Ok(Some(d)) => {
            inner.table.set_target(model, d.spec.autoscaling.target);
            inner.table.set_info(model, crate::table::RouteInfo::of(&d));
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(%model, error = %e, "cannot read a deployment's target"),
    }
}

fn apply(inner: &Inner, e: &kvstore::Event) {
    let table = &inner.table;
    let model = e.field("model").unwrap_or_default();
    let worker = e.field("worker").unwrap_or_default();
    match e.kind.as_str() {
        "deployment.created" => {
            inner.forget_unknown(&e.entity);
            table.upsert_model(&e.entity, false);
        }
        "deployment.deleting" => {
            table.upsert_model(&e.entity, true);
        }
        "deployment.removed" => table.remove_model(&e.entity),
        "deployment.unplaceable" => {
            let reason = e.field("reason").filter(|r| !r.is_empty()).map(str::to_string);
            table.set_unplaceable(&e.entity, reason);
        }
        "instance.ready" => table.add_instance(model, &e.entity, worker),
        "instance.draining" | "instance.stopped" | "instance.failed" | "instance.lost" => {
            table.remove_instance(model, &e.entity)
        }
        "instance.pending" | "instance.loading" => {
            table.starting_instance(model, &e.entity);
            if let Some(route) = table.model(model) {
                let (stage, message) = if e.kind == "instance.pending" {
                    (pb::progress::Stage::Starting, format!("starting on worker {worker}"))
                } else {
                    (pb::progress::Stage::Loading, format!("loading on worker {worker}"))
                };
                // No subscriber (nobody held) is fine.
                let _ = route.progress.send(pb::Progress {
                    stage: stage as i32,
                    worker_id: worker.to_string(),
                    instance_id: e.entity.clone(),
                    message,
                });
            }
        }
        "worker.lost" => table.worker_lost(&e.entity),
        "worker.registered" | "worker.ready" => {
            if let Some(epoch) = e.field("epoch").and_then(|v| v.parse().ok()) {
                table.saw_epoch(&e.entity, epoch);
            }
        }
        "worker.removed" => table.forget_epoch(&e.entity),
        _ => {}
    }
}

/// Reports queued and in-flight requests per model, a few times a second.
async fn report_demand(inner: Arc<Inner>, shutdown: CancellationToken) {
    let every = inner.config.report_interval;
    let ttl = (every * 8).max(Duration::from_secs(2));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let entries: Vec<(String, Demand)> = inner
            .table
            .models()
            .iter()
            .map(|m| {
                let d = Demand {
                    queued: m.waiting.load(Ordering::Relaxed),
                    in_flight: m.in_flight.load(Ordering::Relaxed),
                };
                (m.name.clone(), d)
            })
            .filter(|(_, d)| d.total() > 0)
            .collect();
        if let Err(e) = inner.store.report_demand(&inner.config.replica_id, &entries, ttl).await {
            tracing::debug!(error = %e, "cannot report demand");
        }
    }
}

/// Keeps this replica listed so workers attach to it; stops once it drains (the listing then
/// lapses within its TTL, and workers keep the streams they have but dial no new one).
async fn register(inner: Arc<Inner>, advertise: String, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = inner.draining.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = inner
            .store
            .register_dispatcher(&inner.config.replica_id, &advertise, Duration::from_secs(5))
            .await
        {
            tracing::warn!(error = %e, "cannot register this Dispatch replica");
        }
    }
}
