//! Worker lifecycle against real services: WorkerRegistry replicas (in this process and as
//! `sllm serve` processes), simulated workers speaking the real protocol, a private redis-server.

#![allow(clippy::unwrap_used)]

mod commands;
mod failures;
mod fleet;
mod joining;
mod reports;

use std::time::Duration;

use kvstore::{Acquired, AutoScaling, DeploymentSpec, LeaderLease, Placement, Store};
use prost::Message;
use sllm_api::v1 as pb;
use sllm_api::v1::registry_message::Body as Down;
use sllm_api::v1::worker_message::Body as Up;
use sllm_integration_tests::{JOIN_SECRET, RedisServer, RegistryReplica};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

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

/// A session driven by hand, message by message.
pub struct RawSession {
    pub tx: mpsc::Sender<pb::WorkerMessage>,
    pub inbound: Streaming<pb::RegistryMessage>,
    pub epoch: u64,
}

impl RawSession {
    /// Opens a session and sends `first`; returns the registry's first answer.
    pub async fn open(endpoint: &str, first: pb::WorkerMessage) -> Result<RawSession, Status> {
        let mut client =
            pb::worker_registry_client::WorkerRegistryClient::connect(endpoint.to_string())
                .await
                .unwrap();
        let (tx, rx) = mpsc::channel(16);
        tx.send(first).await.unwrap();
        let mut inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
        match inbound.message().await? {
            Some(pb::RegistryMessage { body: Some(Down::Registered(r)) }) => {
                Ok(RawSession { tx, inbound, epoch: r.epoch })
            }
            other => panic!("expected Registered, got {other:?}"),
        }
    }

    pub async fn register(
        endpoint: &str,
        node: &str,
        token: &str,
        address: &str,
    ) -> Result<RawSession, Status> {
        Self::open(endpoint, register(node, token, address)).await
    }

    pub async fn send(&self, body: Up) {
        self.send_epoch(self.epoch, body).await;
    }

    pub async fn send_epoch(&self, epoch: u64, body: Up) {
        // The registry may already have closed the stream; the next read says why.
        let _ = self.tx.send(pb::WorkerMessage { epoch, body: Some(body) }).await;
    }

    /// The next message that is not a heartbeat ack, or the status the stream ended with.
    pub async fn next(&mut self) -> Result<Option<pb::RegistryMessage>, Status> {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), self.inbound.message())
                .await
                .expect("registry answers within 10 s")?;
            if !matches!(m, Some(pb::RegistryMessage { body: Some(Down::HeartbeatAck(_)) })) {
                return Ok(m);
            }
        }
    }
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
