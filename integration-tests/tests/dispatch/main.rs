//! The request path against real services: Dispatch replicas, a Scaler, a WorkerRegistry,
//! simulated workers attached over real Attach streams, a private redis-server.

#![allow(clippy::unwrap_used)]

mod cold;
mod failures;
mod flow;
mod limits;
mod migration;
mod openai;
mod room;
mod warm;

use std::time::Duration;

use kvstore::{InstanceStatus, Store};
use sllm_api::v1 as pb;
use sllm_integration_tests::{
    DispatchReplica, RedisServer, RegistryReplica, Served, SimWorker, eventually,
};
use tonic::Streaming;

pub struct Cluster {
    pub redis: RedisServer,
    pub store: Store,
    pub registry: RegistryReplica,
    pub scaler: Served,
    pub dispatch: DispatchReplica,
}

impl Cluster {
    pub async fn start() -> Cluster {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut dispatch::DispatchConfig)) -> Cluster {
        Self::start_configured(adjust, |_| {}).await
    }

    pub async fn start_configured(
        adjust: impl FnOnce(&mut dispatch::DispatchConfig),
        adjust_scaler: impl FnOnce(&mut scaler::ScalerConfig),
    ) -> Cluster {
        let redis = RedisServer::start().unwrap();
        let store = redis.store().await.unwrap();
        let registry = RegistryReplica::start(
            store.clone(),
            Duration::from_millis(1500),
            Duration::from_millis(300),
        )
        .await
        .unwrap();
        let mut sc = scaler::ScalerConfig::new("s1");
        sc.tick = Duration::from_millis(100);
        sc.drain_grace = Duration::from_secs(2);
        adjust_scaler(&mut sc);
        let scaler = Served::scaler(store.clone(), sc).await.unwrap();
        let dispatch = DispatchReplica::start(store.clone(), "d1", adjust).await.unwrap();
        Cluster { redis, store, registry, scaler, dispatch }
    }

    pub async fn worker(&self, id: &str, sim: worker::SimConfig) -> SimWorker {
        let mut w = SimWorker::start(vec![self.registry.endpoint()], id, sim).unwrap();
        w.ready(0).await.unwrap();
        w
    }

    pub async fn deploy(&self, model: &str, min: u32, max: u32) {
        self.store
            .create_deployment(&sllm_integration_tests::sim_deployment(model, min, max))
            .await
            .unwrap();
    }

    /// Waits until `model` has `n` ready instances.
    pub async fn ready(&self, model: &str, n: usize) {
        eventually(Duration::from_secs(10), "instances ready", || async {
            let all = self.store.model_instances(model).await.unwrap();
            (all.iter().filter(|i| i.status == InstanceStatus::Ready).count() == n).then_some(())
        })
        .await
        .unwrap();
    }
}

pub fn fast_sim() -> worker::SimConfig {
    worker::SimConfig {
        time_scale: 0.01,
        decode_per_token: Duration::from_millis(100), // 1 ms per token after scaling
        ..worker::SimConfig::default()
    }
}

pub fn prompt(model: &str, text: &str, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        model: model.into(),
        input: Some(pb::generate_request::Input::Prompt(text.into())),
        params: Some(pb::SamplingParams { max_tokens, seed: Some(7), ..Default::default() }),
        progress: false,
        timeout_ms: 0,
    }
}

/// Everything a Generate stream delivered.
#[derive(Debug, Default)]
pub struct Outcome {
    pub progress: Vec<pb::Progress>,
    pub text: String,
    pub tokens: u32,
    pub finished: Option<pb::Finished>,
    pub error: Option<tonic::Status>,
}

pub async fn drain(mut s: Streaming<pb::GenerateEvent>) -> Outcome {
    let mut out = Outcome::default();
    loop {
        match s.message().await {
            Ok(Some(pb::GenerateEvent { event: Some(e) })) => match e {
                pb::generate_event::Event::Progress(p) => out.progress.push(p),
                pb::generate_event::Event::Chunk(c) => {
                    out.text.push_str(&c.text);
                    out.tokens += c.tokens;
                }
                pb::generate_event::Event::Finished(f) => out.finished = Some(f),
            },
            Ok(Some(_)) => {}
            Ok(None) => return out,
            Err(status) => {
                out.error = Some(status);
                return out;
            }
        }
    }
}

pub async fn generate(c: &Cluster, req: pb::GenerateRequest) -> Result<Outcome, tonic::Status> {
    let mut client = c.dispatch.client().await.unwrap();
    let stream = client.generate(req).await?.into_inner();
    Ok(drain(stream).await)
}

/// The deterministic text the simulator produces.
pub fn expected_text(seed: u64, prompt: &str, n: u32) -> String {
    worker::sim::text(seed, prompt, n)
}
