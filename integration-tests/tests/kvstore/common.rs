//! What every kvstore suite test shares, whichever Redis it runs against (`crate::Redis`).

use std::time::Duration;

use crate::Redis;
use kvstore::{
    Acquired, AutoScaling, DeploymentSpec, GpuInfo, Inventory, LeaderLease, Placement, Store,
};

pub async fn setup() -> (Redis, Store) {
    let redis = Redis::start().expect("redis starts");
    let store = redis.store().await.expect("store connects");
    (redis, store)
}

pub fn spec(model: &str) -> DeploymentSpec {
    DeploymentSpec {
        model: model.to_string(),
        backend: "sim".into(),
        num_gpus: 1,
        autoscaling: AutoScaling { max_instances: 4, ..AutoScaling::default() },
        backend_config: r#"{"torch_dtype":"float16"}"#.into(),
    }
}

pub fn inventory(gpus: u32) -> Inventory {
    Inventory {
        gpus: (0..gpus)
            .map(|index| GpuInfo { index, name: "sim".into(), memory_bytes: 80 << 30 })
            .collect(),
        host_memory_bytes: 512 << 30,
        ..Inventory::default()
    }
}

pub const LEASE: Duration = Duration::from_secs(3);

/// Registers `id` with `gpus` GPUs and makes it ready; returns its epoch.
pub async fn ready_worker(store: &Store, id: &str, gpus: u32) -> u64 {
    let address = format!("10.0.0.{}", id.len());
    let reg = store
        .register_worker(id, true, &format!("{address}-{id}"), LEASE, &inventory(gpus), "test")
        .await
        .expect("register");
    store.worker_ready(id, reg.epoch, &[]).await.expect("ready");
    reg.epoch
}

pub async fn lead(store: &Store, holder: &str) -> LeaderLease {
    match store.acquire_leader("scaler", holder, Duration::from_secs(10)).await.expect("acquire") {
        Acquired::Leader(lease) => lease,
        other => panic!("expected to lead, got {other:?}"),
    }
}

pub fn placement(id: &str, model: &str, worker: &str, gpus: &[u32]) -> Placement {
    Placement {
        instance_id: id.to_string(),
        model: model.to_string(),
        worker_id: worker.to_string(),
        gpus: gpus.to_vec(),
        command_id: format!("start-{id}"),
        command: format!("start {id}").into_bytes(),
    }
}

pub async fn assert_consistent(store: &Store) {
    let bad = store.check_invariants().await.expect("invariant check runs");
    assert!(bad.is_empty(), "invariants broken:\n{}", bad.join("\n"));
}

/// How many keys `store`'s namespace holds (to prove a refused call wrote nothing).
pub async fn dbsize(redis: &Redis, store: &Store) -> usize {
    key_names(redis, store).await.len()
}

/// Every key of `store`'s namespace, sorted.
pub async fn key_names(redis: &Redis, store: &Store) -> Vec<String> {
    let mut raw = redis.raw().await.expect("raw connection");
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*", store.keys().root()))
        .query_async(&mut raw)
        .await
        .expect("KEYS");
    keys.sort();
    keys
}
