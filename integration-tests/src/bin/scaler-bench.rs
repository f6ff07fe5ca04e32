//! Scaler benchmark, two figures in one run:
//!
//! 1. Cold start to command: from a demand event (what Dispatch raises for a request with no
//!    ready instance) to the start command arriving at a simulated worker over its Session
//!    stream, through a real Scaler and WorkerRegistry. Target p50 <= 5 ms.
//! 2. One safety-net tick over 10,000 deployments and 1,000 workers: a full read and a decision
//!    for every model, with the Redis commands it costs. Target <= 50 ms.
//!
//!     cargo run --release -p sllm-integration-tests --bin scaler-bench [-- --events 300]

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kvstore::{AutoScaling, DeploymentSpec, GpuInfo, Inventory};
use sllm_api::v1 as pb;
use sllm_api::v1::registry_message::Body as Down;
use sllm_api::v1::worker_message::Body as Up;
use sllm_integration_tests::{JOIN_SECRET, RedisServer, RegistryReplica};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

fn arg(name: &str, default: u64) -> Result<u64> {
    match std::env::args().skip_while(|a| a != name).nth(1) {
        Some(v) => v.parse().with_context(|| format!("{name} takes a number")),
        None => Ok(default),
    }
}

fn main() -> Result<()> {
    let events = arg("--events", 300)? as usize;
    let deployments = arg("--deployments", 10_000)? as usize;
    let workers = arg("--workers", 1_000)? as usize;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let (p50, p99) = rt.block_on(cold_start(events))?;
    let passes = rt.block_on(tick(deployments, workers))?;
    let scale = format!("{deployments} deployments, {workers} workers");
    println!();
    println!("{:<58} {:>10} {:>10} {:>12}", "measure", "p50", "p99", "target");
    println!(
        "{:<58} {:>8.2}ms {:>8.2}ms {:>12}",
        "demand event -> start command at the worker", p50, p99, "p50 <= 5ms"
    );
    println!(
        "{:<58} {:>8.1}ms {:>10} {:>12}",
        format!("one tick ({scale})"),
        passes.tick_ms,
        "",
        "<= 50ms"
    );
    println!(
        "{:<58} {:>10.0}",
        "  Redis commands in that tick (incl. inside scripts)", passes.tick_commands
    );
    println!(
        "{:<58} {:>8.1}ms {:>10} {:>12}",
        format!("one full resync ({scale})"),
        passes.resync_ms,
        "",
        "every 30 s"
    );
    println!("{:<58} {:>10.0}", "  Redis commands in that resync", passes.resync_commands);
    println!();
    println!(
        "cold start to command: p50 {p50:.2} ms — {} the target (<= 5 ms)",
        if p50 <= 5.0 { "meets" } else { "MISSES" }
    );
    println!(
        "tick: {:.1} ms — {} the target (<= 50 ms)",
        passes.tick_ms,
        if passes.tick_ms <= 50.0 { "meets" } else { "MISSES" }
    );
    Ok(())
}

fn spec(model: &str) -> DeploymentSpec {
    DeploymentSpec {
        model: model.into(),
        backend: "sim".into(),
        num_gpus: 1,
        autoscaling: AutoScaling { max_instances: 1, keep_alive_s: 3600, ..AutoScaling::default() },
        backend_config: String::new(),
    }
}

async fn cold_start(n: usize) -> Result<(f64, f64)> {
    let redis = RedisServer::start()?;
    let store = redis.store().await?;
    let registry =
        RegistryReplica::start(store.clone(), Duration::from_secs(10), Duration::from_secs(3))
            .await?;
    for i in 0..n {
        store.create_deployment(&spec(&format!("cold-{i}"))).await?;
    }
    let mut config = scaler::ScalerConfig::new("bench");
    config.tick = Duration::from_secs(3600); // only events drive it here
    let scaler = scaler::Scaler::new(store.clone(), config);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let leader = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { scaler.run(shutdown).await }
    });

    // One worker with a GPU per measured start, driven by hand so the command's arrival is
    // timed exactly.
    let secret = service::JoinSecret::new(JOIN_SECRET).map_err(anyhow::Error::msg)?;
    let mut client =
        pb::worker_registry_client::WorkerRegistryClient::connect(registry.endpoint()).await?;
    let (tx, rx) = mpsc::channel(1024);
    let register = pb::Register {
        node_id: "w".into(),
        join_token: secret.token_for("w"),
        address: "sim-w".into(),
        inventory: Some(pb::Inventory {
            gpus: (0..n as u32)
                .map(|i| pb::Gpu { index: i, name: "sim".into(), memory_bytes: 1 << 30 })
                .collect(),
            ..Default::default()
        }),
        agent_version: "bench".into(),
    };
    tx.send(pb::WorkerMessage { epoch: 0, body: Some(Up::Register(register)) }).await?;
    let mut inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
    let epoch = match inbound.message().await? {
        Some(pb::RegistryMessage { body: Some(Down::Registered(r)) }) => r.epoch,
        other => bail!("registration failed: {other:?}"),
    };
    tx.send(pb::WorkerMessage { epoch, body: Some(Up::Ready(pb::WorkerReady {})) }).await?;
    // Let the Scaler take the lead and read the cluster.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let model = format!("cold-{i}");
        let t = Instant::now();
        store.publish_demand("bench", &model, 1).await?;
        loop {
            match tokio::time::timeout(Duration::from_secs(5), inbound.message()).await {
                Ok(Ok(Some(pb::RegistryMessage { body: Some(Down::Command(c)) }))) => {
                    let is_ours = matches!(&c.action, Some(pb::command::Action::Start(s)) if s.model == model);
                    let ack =
                        pb::CommandAck { command_id: c.command_id, ok: true, error: String::new() };
                    tx.send(pb::WorkerMessage { epoch, body: Some(Up::CommandAck(ack)) }).await?;
                    if is_ours {
                        lat.push(t.elapsed().as_secs_f64() * 1000.0);
                        break;
                    }
                }
                Ok(Ok(Some(_))) => {}
                other => bail!("no start command for {model}: {other:?}"),
            }
        }
    }
    shutdown.cancel();
    let _ = leader.await;
    registry.stop().await;
    lat.sort_by(f64::total_cmp);
    Ok((lat[lat.len() / 2], lat[(lat.len() - 1) * 99 / 100]))
}

struct Passes {
    tick_ms: f64,
    tick_commands: f64,
    resync_ms: f64,
    resync_commands: f64,
}

async fn tick(deployments: usize, workers: usize) -> Result<Passes> {
    let redis = RedisServer::start()?;
    let store = redis.store().await?;
    eprintln!("creating {deployments} deployments and {workers} workers ...");
    for chunk in (0..deployments).collect::<Vec<_>>().chunks(256) {
        let futs = chunk.iter().map(|i| {
            let store = store.clone();
            async move { store.create_deployment(&spec(&format!("model-{i}"))).await }
        });
        for r in futures::future::join_all(futs).await {
            r?;
        }
    }
    let inventory = Inventory {
        gpus: (0..8)
            .map(|index| GpuInfo { index, name: "sim".into(), memory_bytes: 80 << 30 })
            .collect(),
        ..Inventory::default()
    };
    for w in 0..workers {
        let id = format!("w{w}");
        let reg = store
            .register_worker(
                &id,
                true,
                &format!("sim-{id}"),
                Duration::from_secs(600),
                &inventory,
                "bench",
            )
            .await?;
        store.worker_ready(&id, reg.epoch, &[]).await?;
    }
    let scaler = scaler::Scaler::new(store.clone(), scaler::ScalerConfig::new("bench"));
    let raw = redis.raw().await?;
    let mut runs = Vec::new();
    for _ in 0..5 {
        let counter = async || -> u64 {
            let mut conn = raw.clone();
            total_calls(&mut conn).await.unwrap_or(0)
        };
        runs.push(scaler.time_passes(counter).await.map_err(anyhow::Error::msg)?);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok(Passes {
        tick_ms: median(runs.iter().map(|r| r.tick.as_secs_f64() * 1000.0).collect()),
        tick_commands: median(runs.iter().map(|r| r.tick_count as f64).collect()),
        resync_ms: median(runs.iter().map(|r| r.resync.as_secs_f64() * 1000.0).collect()),
        resync_commands: median(runs.iter().map(|r| r.resync_count as f64).collect()),
    })
}

/// Commands Redis has executed (all kinds, including those run inside scripts), less INFO.
async fn total_calls(raw: &mut redis::aio::MultiplexedConnection) -> Result<u64> {
    let calls = sllm_integration_tests::commandstats(raw).await?;
    Ok(calls.iter().filter(|(k, _)| k.as_str() != "info").map(|(_, v)| v).sum())
}
