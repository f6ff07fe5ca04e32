//! Worker lifecycle against real services: WorkerRegistry replicas (in this process and as
//! `sllm serve` processes), simulated workers speaking the real protocol, a private redis-server.

#![allow(clippy::unwrap_used)]

mod commands;
mod failures;
mod fleet;
mod joining;
mod reports;
mod stall;

use std::time::Duration;

use kvstore::{Acquired, AutoScaling, DeploymentSpec, LeaderLease, Placement, Store};
use prost::Message;
use sllm_api::v1 as pb;
use sllm_api::v1::worker_message::Body as Up;
use sllm_integration_tests::{JOIN_SECRET, RedisServer, RegistryReplica};

pub const LEASE: Duration = Duration::from_millis(1500);
pub const HEARTBEAT: Duration = Duration::from_millis(300);

pub async fn cluster() -> (RedisServer, Store, RegistryReplica) {
    let redis = RedisServer::start().unwrap();
    let store = redis.store().await.unwrap();
    let replica = RegistryReplica::start(store.clone(), LEASE, HEARTBEAT).await.unwrap();
    (redis, store, replica)
}

pub fn token(node: &str) -> String {
    service::JoinSecret::new(JOIN_SECRET).unwrap().token_for(node)
}

pub use sllm_integration_tests::RawSession;

/// Opens a session that registers `node` with two GPUs (see [`register`]).
pub async fn raw_register(
    endpoint: &str,
    node: &str,
    token: &str,
    address: &str,
) -> Result<RawSession, tonic::Status> {
    RawSession::open(endpoint, register(node, token, address)).await
}

pub fn register(node: &str, token: &str, address: &str) -> pb::WorkerMessage {
    pb::WorkerMessage {
        epoch: 0,
        body: Some(Up::Register(pb::Register {
            node_id: node.into(),
            join_token: token.into(),
            address: address.into(),
            inventory: Some(pb::Inventory {
                gpus: (0..2)
                    .map(|i| pb::Gpu { index: i, name: "sim".into(), memory_bytes: 1 << 30 })
                    .collect(),
                ..Default::default()
            }),
            agent_version: "raw".into(),
        })),
    }
}

pub async fn deploy(store: &Store, model: &str) {
    store
        .create_deployment(&DeploymentSpec {
            model: model.into(),
            backend: "sim".into(),
            num_gpus: 1,
            autoscaling: AutoScaling { max_instances: 8, ..AutoScaling::default() },
            backend_config: String::new(),
        })
        .await
        .unwrap();
}

pub async fn lead(store: &Store) -> LeaderLease {
    match store.acquire_leader("scaler", "test", Duration::from_secs(60)).await.unwrap() {
        Acquired::Leader(l) => l,
        other => panic!("{other:?}"),
    }
}

/// Places an instance the way the Scaler does: record and start command in one step.
pub async fn place(
    store: &Store,
    lease: &LeaderLease,
    instance: &str,
    model: &str,
    worker: &str,
    gpus: &[u32],
) {
    let command_id = format!("start-{instance}");
    let command = pb::Command {
        command_id: command_id.clone(),
        action: Some(pb::command::Action::Start(pb::StartInstance {
            instance_id: instance.into(),
            model: model.into(),
            backend: "sim".into(),
            gpus: gpus.to_vec(),
            backend_config: None,
            traceparent: String::new(),
        })),
    };
    store
        .create_instance(
            lease,
            &Placement {
                instance_id: instance.into(),
                model: model.into(),
                worker_id: worker.into(),
                gpus: gpus.to_vec(),
                command_id,
                command: command.encode_to_vec(),
            },
        )
        .await
        .unwrap();
}

pub fn fast_sim() -> worker::SimConfig {
    worker::SimConfig { time_scale: 0.01, ..worker::SimConfig::default() }
}

pub async fn instance_status(store: &Store, id: &str) -> Option<kvstore::InstanceStatus> {
    store.get_instance(id).await.unwrap().map(|r| r.status)
}
