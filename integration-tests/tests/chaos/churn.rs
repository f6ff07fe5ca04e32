//! Churn: workers that join and leave with fresh node ids and models that are deployed and
//! deleted leave nothing behind, neither in Redis nor in the services' memory.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::StreamExt;
use kvstore::{Store, StoreConfig};
use sllm_api::v1 as pb;
use sllm_api::v1::registry_message::Body as Down;
use sllm_api::v1::worker_message::Body as Up;
use sllm_integration_tests::{JOIN_SECRET, Proc, RedisServer, eventually};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

/// Workers and models per round.
const CHURN: usize = 1000;
/// Sessions or deploy/delete pairs in flight at once.
const PARALLEL: usize = 32;
/// Lost workers are removed this long after they were lost.
const RETENTION_S: &str = "0.5";

struct Cluster {
    redis: RedisServer,
    store: Store,
    procs: BTreeMap<&'static str, Proc>,
    endpoints: BTreeMap<&'static str, String>,
}

impl Cluster {
    fn start(redis: RedisServer, store: Store) -> Cluster {
        let mut c = Cluster { redis, store, procs: BTreeMap::new(), endpoints: BTreeMap::new() };
        c.serve(
            "worker-registry",
            &["--lost-worker-retention-s", RETENTION_S, "--metrics-addr", "off"],
        );
        c.serve("model-registry", &["--metrics-addr", "off"]);
        c.serve("scaler", &["--scaler-tick-ms", "200", "--metrics-addr", "127.0.0.1:0"]);
        c.serve("dispatch", &["--openai-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0"]);
        c
    }

    fn serve(&mut self, service: &'static str, extra: &[&str]) {
        let url = self.redis.url();
        let mut args = vec![
            "serve",
            service,
            "--redis-url",
            &url,
            "--grpc-addr",
            "127.0.0.1:0",
            "--replica-id",
            service,
        ];
        args.extend_from_slice(extra);
        let (proc, line) =
            Proc::sllm(&args, &[("SLLM_JOIN_SECRET", JOIN_SECRET)], "serving gRPC on").unwrap();
        let addr = line.rsplit(' ').next().unwrap().trim().to_string();
        self.endpoints.insert(service, format!("http://{addr}"));
        self.procs.insert(service, proc);
    }

    /// Resident memory of each service process, in KiB: the least of five readings 300 ms
    /// apart, so that pages an allocator holds for a moment are not counted as kept.
    async fn rss(&self) -> BTreeMap<&'static str, u64> {
        let mut least: BTreeMap<&'static str, u64> = BTreeMap::new();
        for _ in 0..5 {
            for (name, p) in &self.procs {
                let kib = p.rss_kib().unwrap();
                least.entry(*name).and_modify(|l| *l = (*l).min(kib)).or_insert(kib);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        least
    }

    /// Lines of `service`'s /metrics that name a model of the churn (all of them deleted).
    async fn deleted_model_series(&self, service: &str) -> usize {
        let out = self.procs[service].output();
        let Some(url) = out.lines().find_map(|l| l.strip_prefix("sllm: metrics on ")) else {
            return 0;
        };
        let o =
            tokio::process::Command::new("curl").args(["-s", url.trim()]).output().await.unwrap();
        String::from_utf8_lossy(&o.stdout).lines().filter(|l| l.contains("model=\"churn-")).count()
    }

    /// The names of the keys Redis holds.
    async fn keys(&self) -> BTreeSet<String> {
        let mut raw = self.redis.raw().await.unwrap();
        redis::cmd("KEYS").arg("*").query_async(&mut raw).await.unwrap()
    }

    /// Waits until Redis holds exactly the keys of `expected` (keys with a short TTL, such as
    /// demand reports, may outlive a round by a moment), and says which differ if it never does.
    async fn keys_return_to(&self, expected: &BTreeSet<String>, after: &str) {
        let settled = eventually(Duration::from_secs(20), "Redis keys as at the start", || async {
            (self.keys().await == *expected).then_some(())
        })
        .await;
        if settled.is_err() {
            let now = self.keys().await;
            panic!(
                "Redis keys after {after}: left behind {:?}, gone {:?}",
                now.difference(expected).collect::<Vec<_>>(),
                expected.difference(&now).collect::<Vec<_>>()
            );
        }
    }

    /// `n` workers join (register, ready, placeable) and leave (their stream ends), `PARALLEL`
    /// at a time, while `n` models are deployed and deleted through the ModelRegistry.
    async fn churn(&self, round: usize, n: usize) {
        let registry = Endpoint::from_shared(self.endpoints["worker-registry"].clone())
            .unwrap()
            .tcp_nodelay(true)
            .connect()
            .await
            .unwrap();
        let models = pb::model_registry_client::ModelRegistryClient::connect(
            self.endpoints["model-registry"].clone(),
        )
        .await
        .unwrap();
        let workers = futures::stream::iter(0..n)
            .map(|i| join_and_leave(registry.clone(), format!("churn-{round}-{i}")))
            .buffer_unordered(PARALLEL)
            .collect::<Vec<()>>();
        let deployments = futures::stream::iter(0..n)
            .map(|i| deploy_and_delete(models.clone(), format!("churn-{round}-{i}")))
            .buffer_unordered(PARALLEL)
            .collect::<Vec<()>>();
        tokio::join!(workers, deployments);
        let store = self.store.clone();
        eventually(Duration::from_secs(60), "deleted models removed, lost workers removed", || {
            let store = store.clone();
            async move {
                let d = store.list_deployments().await.ok()?;
                let w = store.list_workers().await.ok()?;
                (d.is_empty() && w.is_empty()).then_some(())
            }
        })
        .await
        .unwrap();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("SLLM_CHAOS_LOGS").is_some() {
            for (name, p) in &self.procs {
                for line in p.output().lines() {
                    eprintln!("[{name}] {line}");
                }
            }
        }
    }
}

/// One worker's whole life over the real protocol: register, ready, placeable, then its stream
/// ends (the worker is lost at once) and the registry closes its side.
async fn join_and_leave(channel: Channel, node: String) {
    let token = service::JoinSecret::new(JOIN_SECRET).unwrap().token_for(&node);
    let mut client = pb::worker_registry_client::WorkerRegistryClient::new(channel);
    let (tx, rx) = mpsc::channel(4);
    let register = pb::Register {
        node_id: node.clone(),
        join_token: token,
        address: format!("addr-{node}"),
        inventory: Some(pb::Inventory {
            gpus: vec![pb::Gpu { index: 0, name: "sim".into(), memory_bytes: 1 << 30 }],
            ..Default::default()
        }),
        agent_version: "churn".into(),
    };
    tx.send(pb::WorkerMessage { epoch: 0, body: Some(Up::Register(register)) }).await.unwrap();
    let mut inbound = client.session(ReceiverStream::new(rx)).await.unwrap().into_inner();
    let epoch = match inbound.message().await.unwrap() {
        Some(pb::RegistryMessage { body: Some(Down::Registered(r)) }) => r.epoch,
        other => panic!("{node}: expected Registered, got {other:?}"),
    };
    tx.send(pb::WorkerMessage { epoch, body: Some(Up::Ready(pb::WorkerReady {})) }).await.unwrap();
    loop {
        match inbound.message().await.unwrap() {
            Some(pb::RegistryMessage { body: Some(Down::Placeable(_)) }) => break,
            Some(_) => {}
            None => panic!("{node}: session ended before the worker was placeable"),
        }
    }
    drop(tx);
    // The registry ends its side once it has recorded the loss.
    while let Ok(Some(_)) = inbound.message().await {}
}

async fn deploy_and_delete(
    mut models: pb::model_registry_client::ModelRegistryClient<Channel>,
    model: String,
) {
    models
        .deploy(pb::DeployRequest {
            spec: Some(pb::DeploymentSpec {
                model: model.clone(),
                backend: "sim".into(),
                num_gpus: 1,
                auto_scaling_config: Some(pb::AutoScalingConfig {
                    metric: "concurrency".into(),
                    target: 1.0,
                    min_instances: 0,
                    max_instances: 1,
                    keep_alive: 0,
                }),
                ..Default::default()
            }),
        })
        .await
        .unwrap_or_else(|s| panic!("deploy {model}: {s}"));
    models
        .delete(pb::DeleteRequest { model: model.clone(), ..Default::default() })
        .await
        .unwrap_or_else(|s| panic!("delete {model}: {s}"));
}

/// 1,000 workers join and leave with fresh node ids and 1,000 models are deployed and deleted,
/// four times, after two warm-up rounds of the same size (in which the services reach their working
/// size): Redis holds the same keys as at the start, and no service's resident memory ends more
/// than `max(6 MiB, 10 %)` above the higher of its levels after the warm-up rounds. (Debug
/// builds under mimalloc move a few MiB between measurements on their own, and on a loaded
/// machine the working size can grow in the second round: each deploy reads every worker's
/// record to warn about specs no worker can hold, 32 deploys at a time. A leak of 2 KiB per
/// worker or model, 8 MiB over the four rounds, exceeds the bound.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_and_models_that_come_and_go_leave_nothing_behind() {
    let redis = RedisServer::start().unwrap();
    let store = Store::connect(StoreConfig::new(redis.url()).with_namespace("sllm")).await.unwrap();
    let cluster = Cluster::start(redis, store);
    // The Scaler holds the lead and Dispatch has registered and reported before anything is
    // counted: the same keys a second apart, among them the Scaler's lease.
    let mut keys_at_start = cluster.keys().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = cluster.keys().await;
        if now == keys_at_start && now.contains("{sllm}:leader:scaler") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the services' keys never settled: {now:?}");
        keys_at_start = now;
    }

    let mut warm: BTreeMap<&'static str, u64> = BTreeMap::new();
    for round in 0..2 {
        cluster.churn(round, CHURN).await;
        cluster.keys_return_to(&keys_at_start, "a warm-up round").await;
        // Allocators hand freed pages back after a short delay.
        tokio::time::sleep(Duration::from_secs(1)).await;
        for (name, kib) in cluster.rss().await {
            warm.entry(name).and_modify(|w| *w = (*w).max(kib)).or_insert(kib);
        }
    }

    for round in 2..6 {
        cluster.churn(round, CHURN).await;
    }
    cluster
        .keys_return_to(&keys_at_start, &format!("{} workers and models came and went", 4 * CHURN))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = cluster.rss().await;

    println!("Redis keys at the start, after the warm-up and after churn: {keys_at_start:?}");
    println!("{:<16} {:>12} {:>12} {:>10}", "service", "warm KiB", "after KiB", "growth");
    for (name, w) in &warm {
        let a = after[name];
        println!("{name:<16} {w:>12} {a:>12} {:>10}", a as i64 - *w as i64);
    }
    let grew = |name: &str| {
        let (w, a) = (warm[name], after[name]);
        let allowed = (w / 10).max(6 * 1024);
        (a > w + allowed).then(|| format!("{name}: {w} KiB -> {a} KiB (allowed +{allowed} KiB)"))
    };
    for name in ["worker-registry", "model-registry"] {
        if let Some(e) = grew(name) {
            panic!("memory grew with churn: {e}");
        }
    }
    // Dispatch and the Scaler are held to the same bound. Where they exceed it, the message
    // counts the metric series they still hold for deleted models (removing those, and the
    // Scaler's per-model bookkeeping, is part of the same issue as this test).
    let mut failures = Vec::new();
    for name in ["dispatch", "scaler"] {
        let series = cluster.deleted_model_series(name).await;
        println!("{name}: {series} metric lines name deleted models");
        if let Some(e) = grew(name) {
            failures.push(format!("{e}; {series} metric lines still name deleted models"));
        }
    }
    assert!(failures.is_empty(), "memory grew with churn: {failures:#?}");
}
