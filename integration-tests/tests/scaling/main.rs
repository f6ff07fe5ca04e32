//! Models and scaling against real services: ModelRegistry, Scaler replicas, a WorkerRegistry,
//! simulated workers and a private redis-server. Demand is reported the way Dispatch reports it.

#![allow(clippy::unwrap_used)]

mod models;
mod passes;
mod placement;
mod scaling;

use std::time::Duration;

use kvstore::{Demand, InstanceRecord, InstanceStatus, Store};
use sllm_api::v1 as pb;
use sllm_integration_tests::{RedisServer, RegistryReplica, Served, SimWorker, eventually};

pub struct Cluster {
    pub redis: RedisServer,
    pub store: Store,
    pub registry: RegistryReplica,
    pub models: Served,
}

impl Cluster {
    pub async fn start() -> Cluster {
        let redis = RedisServer::start().unwrap();
        let store = redis.store().await.unwrap();
        let registry = RegistryReplica::start(
            store.clone(),
            Duration::from_millis(1500),
            Duration::from_millis(300),
        )
        .await
        .unwrap();
        let models = Served::model_registry(store.clone()).await.unwrap();
        Cluster { redis, store, registry, models }
    }

    pub async fn client(
        &self,
    ) -> pb::model_registry_client::ModelRegistryClient<tonic::transport::Channel> {
        pb::model_registry_client::ModelRegistryClient::new(self.models.channel().await.unwrap())
    }

    pub async fn scaler(&self, id: &str) -> Served {
        Served::scaler(self.store.clone(), scaler_config(id)).await.unwrap()
    }

    pub async fn worker(&self, id: &str, sim: worker::SimConfig) -> SimWorker {
        let mut w = SimWorker::start(vec![self.registry.endpoint()], id, sim).unwrap();
        w.ready(0).await.unwrap();
        w
    }

    pub async fn deploy(&self, model: &str, min: i32, max: i32, target: f64, keep_alive: i32) {
        self.client()
            .await
            .deploy(pb::DeployRequest { spec: Some(spec(model, min, max, target, keep_alive)) })
            .await
            .unwrap();
    }

    pub async fn demand(&self, model: &str, queued: u64, in_flight: u64) {
        self.store
            .report_demand(
                "dispatch-test",
                &[(model.to_string(), Demand { queued, in_flight })],
                Duration::from_secs(30),
            )
            .await
            .unwrap();
    }

    pub async fn instances(&self, model: &str) -> Vec<InstanceRecord> {
        self.store.model_instances(model).await.unwrap()
    }

    /// Waits until `model` has exactly `n` ready instances and nothing else live.
    pub async fn settled(&self, model: &str, n: usize, within: Duration) -> Vec<InstanceRecord> {
        eventually(within, &format!("{model} settled at {n} ready"), || async {
            let all = self.instances(model).await;
            (all.len() == n && all.iter().all(|i| i.status == InstanceStatus::Ready)).then_some(all)
        })
        .await
        .unwrap()
    }
}

pub fn scaler_config(id: &str) -> ::scaler::ScalerConfig {
    let mut c = ::scaler::ScalerConfig::new(id);
    c.tick = Duration::from_millis(100);
    c.lease = Duration::from_millis(900);
    c.drain_grace = Duration::from_secs(2);
    c
}

pub fn spec(model: &str, min: i32, max: i32, target: f64, keep_alive: i32) -> pb::DeploymentSpec {
    pb::DeploymentSpec {
        model: model.into(),
        backend: "sim".into(),
        num_gpus: 1,
        auto_scaling_config: Some(pb::AutoScalingConfig {
            metric: "concurrency".into(),
            target,
            min_instances: min,
            max_instances: max,
            keep_alive,
        }),
        backend_config: None,
    }
}

pub fn fast_sim() -> worker::SimConfig {
    worker::SimConfig { time_scale: 0.01, ..worker::SimConfig::default() }
}
