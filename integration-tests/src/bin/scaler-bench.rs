//! Scaler benchmark, two figures, each over `--runs` fresh clusters (3):
//!
//! 1. Cold start to command: from a demand event (what Dispatch raises for a request with no
//!    ready instance) to the start command arriving at a simulated worker over its Session
//!    stream, through a real Scaler and WorkerRegistry. Target p50 <= 5 ms.
//! 2. A tick over 10,000 deployments and 1,000 workers (8 GPUs each) in which demand changed
//!    on a share of the models since the last decision (`--share-pct`, 5): half of that share
//!    rises from 0 to 1 (the model scales 0 -> 1: a placement and its start command are written,
//!    and the desired count), the other half falls to 0 (1 -> 0, keep_alive 0: a drain command
//!    and the desired count), as a Dispatch replica reports it. A live leader also reads demand
//!    every 200 ms between ticks and would make the same decisions there; the work is the same
//!    whichever pass sees the change first. Between timed ticks, and outside the timing, the
//!    simulated workers load what was placed and stop what was drained, and a full resync
//!    brings the leader's view up to date, as the event stream keeps it in a live leader. Also
//!    timed: that resync, and a tick with nothing to decide. Target for the tick: <= 50 ms.
//!
//! Flags (defaults): `--events 300 --deployments 10000 --workers 1000 --share-pct 5 --ticks 5
//! --runs 3`; `--quick` for one small run.
//!
//!     cargo run --release -p sllm-integration-tests --bin scaler-bench

// The allocator the `sllm` binary runs with.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use kvstore::{Actor, AutoScaling, Demand, DeploymentSpec, GpuInfo, InstanceStatus, Inventory};
use sllm_api::v1 as pb;
use sllm_api::v1::registry_message::Body as Down;
use sllm_api::v1::worker_message::Body as Up;
use sllm_integration_tests::bench::{self, Spread};
use sllm_integration_tests::{JOIN_SECRET, RedisServer, RegistryReplica};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const GPUS_PER_WORKER: u32 = 8;
/// The Dispatch replica whose demand reports drive the ticks.
const REPORTER: &str = "dispatch-bench";

fn main() -> Result<()> {
    let events = bench::size("--events", 300, 30)? as usize;
    let deployments = bench::size("--deployments", 10_000, 1_000)? as usize;
    let workers = bench::size("--workers", 1_000, 100)? as usize;
    let share_pct = bench::arg("--share-pct", 5)?.clamp(1, 100) as usize;
    let ticks = bench::size("--ticks", 5, 2)?.max(1) as usize;
    let runs = bench::runs()?;
    let conditions = bench::conditions(runs);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut cold = Vec::new();
    let mut passes = Vec::new();
    for run in 0..runs {
        eprintln!("run {}/{runs}: cold starts ...", run + 1);
        cold.push(rt.block_on(cold_start(events))?);
        eprintln!("run {}/{runs}: ticks ...", run + 1);
        passes.push(rt.block_on(tick_run(deployments, workers, share_pct, ticks))?);
    }
    let half = half_share(deployments, share_pct);
    let s = |f: &dyn Fn(&Passes) -> f64| Spread::of(&passes.iter().map(f).collect::<Vec<_>>());
    let tick = s(&|p| p.tick_ms);
    println!();
    println!(
        "scaler: each figure over {runs} fresh cluster(s) (private redis-server, unix socket); \
         cold starts: {events} models started one after another by a demand event each; ticks \
         and resyncs: {deployments} deployments (scale to zero, at most 1 instance, keep_alive \
         0), {workers} workers of {GPUS_PER_WORKER} GPUs, {ticks} timed per run, each figure a \
         run's median"
    );
    println!("conditions: {conditions}");
    println!();
    println!("{:<72} {:>24} {:>12}", "measure", "median (lowest–highest)", "target");
    let row = |name: &str, value: String, target: &str| {
        println!("{name:<72} {value:>24} {target:>12}");
    };
    let cold50 = Spread::of(&cold.iter().map(|c| c.0).collect::<Vec<_>>());
    row(
        "demand event -> start command at the worker, p50",
        cold50.show_unit(2, "ms"),
        "p50 <= 5ms",
    );
    row("  p99", Spread::of(&cold.iter().map(|c| c.1).collect::<Vec<_>>()).show_unit(2, "ms"), "");
    row(
        &format!("one tick: demand changed on {share_pct}% of the models since the last decision"),
        tick.show_unit(1, "ms"),
        "<= 50ms",
    );
    row(
        &format!("  decisions written in it: scaled 0->1 and placed (of {half})"),
        s(&|p| p.placed).show(0),
        "",
    );
    row(&format!("  scaled 1->0 and drained (of {half})"), s(&|p| p.drained).show(0), "");
    row("  Redis round trips in it", s(&|p| p.tick_trips).show(0), "");
    row("  Redis commands in it (incl. inside scripts)", s(&|p| p.tick_commands).show(0), "");
    row(
        "one tick with nothing to decide (demand as at the last decision)",
        s(&|p| p.idle_ms).show_unit(1, "ms"),
        "",
    );
    row(
        "  Redis round trips / commands in it",
        format!("{:.0} / {:.0}", s(&|p| p.idle_trips).median, s(&|p| p.idle_commands).median),
        "",
    );
    row(
        &format!("one full resync ({} live instances)", 2 * half),
        s(&|p| p.resync_ms).show_unit(1, "ms"),
        "every 30 s",
    );
    row(
        "  Redis round trips / commands in it",
        format!("{:.0} / {:.0}", s(&|p| p.resync_trips).median, s(&|p| p.resync_commands).median),
        "",
    );
    println!();
    println!(
        "cold start to command: p50 {} — {} the target (<= 5 ms)",
        cold50.show_unit(2, " ms"),
        if cold50.median <= 5.0 { "meets" } else { "MISSES" }
    );
    println!(
        "tick with decisions for {share_pct}% of the models: {} — {} the target (<= 50 ms)",
        tick.show_unit(1, " ms"),
        if tick.median <= 50.0 { "meets" } else { "MISSES" }
    );
    Ok(())
}

/// Models that rise (and as many that fall) per tick.
fn half_share(deployments: usize, share_pct: usize) -> usize {
    (deployments * share_pct / 200).max(1)
}

fn cold_spec(model: &str) -> DeploymentSpec {
    DeploymentSpec {
        model: model.into(),
        backend: "sim".into(),
        num_gpus: 1,
        autoscaling: AutoScaling { max_instances: 1, keep_alive_s: 3600, ..AutoScaling::default() },
        backend_config: String::new(),
    }
}

/// p50 and p99 (ms) from a demand event to the start command at the worker.
async fn cold_start(n: usize) -> Result<(f64, f64)> {
    let redis = RedisServer::start()?;
    let store = redis.store().await?;
    let registry =
        RegistryReplica::start(store.clone(), Duration::from_secs(10), Duration::from_secs(3))
            .await?;
    for i in 0..n {
        store.create_deployment(&cold_spec(&format!("cold-{i}"))).await?;
    }
    let mut config = scaler::ScalerConfig::new("bench");
    config.tick = Duration::from_secs(3600); // only events drive it here
    let scaler = scaler::Scaler::new(store.clone(), config);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let leader = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { scaler.run(shutdown).await }
    });

    // Workers with a GPU per measured start between them (a worker holds at most
    // kvstore::worker::MAX_GPUS), driven by hand so the command's arrival is timed exactly.
    let secret = service::JoinSecret::new(JOIN_SECRET).map_err(anyhow::Error::msg)?;
    let per_worker = kvstore::worker::MAX_GPUS;
    let (inbox, mut commands) = mpsc::channel::<(usize, pb::Command)>(1024);
    let mut senders = Vec::new();
    let mut epochs = Vec::new();
    for w in 0..n.div_ceil(per_worker) {
        let node = format!("w{w}");
        let mut client =
            pb::worker_registry_client::WorkerRegistryClient::connect(registry.endpoint()).await?;
        let (tx, rx) = mpsc::channel(1024);
        let register = pb::Register {
            node_id: node.clone(),
            join_token: secret.token_for(&node),
            address: format!("sim-{node}"),
            inventory: Some(pb::Inventory {
                gpus: (0..per_worker as u32)
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
        let inbox = inbox.clone();
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                if let Some(Down::Command(c)) = m.body
                    && inbox.send((w, c)).await.is_err()
                {
                    return;
                }
            }
        });
        senders.push(tx);
        epochs.push(epoch);
    }
    // Let the Scaler take the lead and read the cluster.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let model = format!("cold-{i}");
        let t = Instant::now();
        store.publish_demand("bench", &model, 1).await?;
        loop {
            match tokio::time::timeout(Duration::from_secs(5), commands.recv()).await {
                Ok(Some((w, c))) => {
                    let is_ours = matches!(&c.action, Some(pb::command::Action::Start(s)) if s.model == model);
                    let ack =
                        pb::CommandAck { command_id: c.command_id, ok: true, error: String::new() };
                    let epoch = epochs[w];
                    senders[w]
                        .send(pb::WorkerMessage { epoch, body: Some(Up::CommandAck(ack)) })
                        .await?;
                    if is_ours {
                        lat.push(t.elapsed().as_secs_f64() * 1000.0);
                        break;
                    }
                }
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

/// One run's tick figures, each the median over its timed ticks.
struct Passes {
    tick_ms: f64,
    tick_trips: f64,
    tick_commands: f64,
    placed: f64,
    drained: f64,
    idle_ms: f64,
    idle_trips: f64,
    idle_commands: f64,
    resync_ms: f64,
    resync_trips: f64,
    resync_commands: f64,
}

/// Time, kvstore round trips and Redis commands of one pass.
struct Cost {
    ms: f64,
    trips: f64,
    commands: f64,
}

async fn timed<F: std::future::Future<Output = Result<(), String>>>(
    raw: &mut redis::aio::MultiplexedConnection,
    pass: F,
) -> Result<Cost> {
    let c0 = bench::total_commands(raw).await?;
    let r0 = bench::kvstore_round_trips();
    let t = Instant::now();
    pass.await.map_err(anyhow::Error::msg)?;
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    let trips = bench::kvstore_round_trips().saturating_sub(r0) as f64;
    let commands = bench::total_commands(raw).await?.saturating_sub(c0) as f64;
    Ok(Cost { ms, trips, commands })
}

async fn tick_run(
    deployments: usize,
    workers: usize,
    share_pct: usize,
    ticks: usize,
) -> Result<Passes> {
    let redis = RedisServer::start()?;
    let store = redis.store().await?;
    let mut raw = redis.raw().await?;
    eprintln!("  creating {deployments} deployments and {workers} workers ...");
    let model = |i: usize| format!("model-{}", i % deployments);
    for chunk in (0..deployments).collect::<Vec<_>>().chunks(256) {
        let futs = chunk.iter().map(|&i| {
            let store = store.clone();
            let spec = DeploymentSpec {
                model: model(i),
                backend: "sim".into(),
                num_gpus: 1,
                // Scale to zero: 0 -> 1 on demand, back to 0 as soon as demand is gone.
                autoscaling: AutoScaling {
                    target: 1.0,
                    min_instances: 0,
                    max_instances: 1,
                    keep_alive_s: 0,
                    ..AutoScaling::default()
                },
                backend_config: String::new(),
            };
            async move { store.create_deployment(&spec).await }
        });
        for r in futures::future::join_all(futs).await {
            r?;
        }
    }
    let inventory = Inventory {
        gpus: (0..GPUS_PER_WORKER)
            .map(|index| GpuInfo { index, name: "sim".into(), memory_bytes: 80 << 30 })
            .collect(),
        ..Inventory::default()
    };
    let mut epochs: HashMap<String, u64> = HashMap::new();
    for w in 0..workers {
        let id = format!("w{w}");
        let reg = store
            .register_worker(
                &id,
                true,
                &format!("sim-{id}"),
                Duration::from_secs(3600),
                &inventory,
                "bench",
            )
            .await?;
        store.worker_ready(&id, reg.epoch, &[]).await?;
        epochs.insert(id, reg.epoch);
    }

    let scaler = scaler::Scaler::new(store.clone(), scaler::ScalerConfig::new("bench"));
    let mut leader = scaler.lead_by_hand().await.map_err(anyhow::Error::msg)?;
    leader.resync().await.map_err(anyhow::Error::msg)?;
    let half = half_share(deployments, share_pct);
    let mut active = Vec::new();
    let mut idle = Vec::new();
    let mut resync = Vec::new();
    let mut placed = Vec::new();
    let mut drained = Vec::new();
    // Tick 0 brings the first models up (not timed); each later tick moves the window of
    // models with demand on by `half`: `half` models rise, `half` fall.
    for t in 0..=ticks {
        let report: Vec<(String, Demand)> = (t * half..t * half + 2 * half)
            .map(|i| (model(i), Demand { queued: 0, in_flight: 1 }))
            .collect();
        store.report_demand(REPORTER, &report, Duration::from_secs(3600)).await?;
        leader.renew().await.map_err(anyhow::Error::msg)?;
        let cost = timed(&mut raw, leader.tick()).await?;

        // What the tick wrote: new placements (pending) and drains.
        let live = store.live_instances().await?;
        let pending: Vec<_> = live.iter().filter(|i| i.status == InstanceStatus::Pending).collect();
        let draining: Vec<_> =
            live.iter().filter(|i| i.status == InstanceStatus::Draining).collect();
        if t > 0 {
            if pending.len() != half || draining.len() != half {
                bail!(
                    "tick {t} placed {} and drained {}, not {half} each",
                    pending.len(),
                    draining.len()
                );
            }
            active.push(cost);
            placed.push(pending.len() as f64);
            drained.push(draining.len() as f64);
        }

        // The workers act on the commands: what was placed loads and serves, what was drained
        // stops.
        let mut moves = Vec::new();
        for i in &pending {
            moves.push((i.instance_id.clone(), i.worker_id.clone(), InstanceStatus::Loading));
            moves.push((i.instance_id.clone(), i.worker_id.clone(), InstanceStatus::Ready));
        }
        for i in &draining {
            moves.push((i.instance_id.clone(), i.worker_id.clone(), InstanceStatus::Stopped));
        }
        for (id, worker, to) in moves {
            let epoch = epochs.get(&worker).copied().unwrap_or(0);
            let actor = Actor::Worker { worker_id: &worker, epoch };
            store.transition_instance(&id, to, actor, "bench", None).await?;
        }
        leader.renew().await.map_err(anyhow::Error::msg)?;
        let cost = timed(&mut raw, leader.resync()).await?;
        if t > 0 {
            resync.push(cost);
        }
        leader.renew().await.map_err(anyhow::Error::msg)?;
        let cost = timed(&mut raw, leader.tick()).await?;
        if t > 0 {
            idle.push(cost);
        }
    }
    leader.release().await;
    let bad = store.check_invariants().await?;
    if !bad.is_empty() {
        bail!("state inconsistent after the ticks: {bad:?}");
    }
    let med = |v: Vec<f64>| Spread::of(&v).median;
    let of = |c: &[Cost], f: fn(&Cost) -> f64| med(c.iter().map(f).collect());
    Ok(Passes {
        tick_ms: of(&active, |c| c.ms),
        tick_trips: of(&active, |c| c.trips),
        tick_commands: of(&active, |c| c.commands),
        placed: med(placed),
        drained: med(drained),
        idle_ms: of(&idle, |c| c.ms),
        idle_trips: of(&idle, |c| c.trips),
        idle_commands: of(&idle, |c| c.commands),
        resync_ms: of(&resync, |c| c.ms),
        resync_trips: of(&resync, |c| c.trips),
        resync_commands: of(&resync, |c| c.commands),
    })
}
