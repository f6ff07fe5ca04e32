//! WorkerRegistry benchmark: ramps simulated workers heartbeating at 1 Hz against one registry
//! replica (an `sllm serve worker-registry` process) and prints, per step: workers held,
//! heartbeats per second handled, the registry's CPU use, Redis round trips and commands per
//! heartbeat (from INFO commandstats), and heartbeat round-trip latency p50 / p99 as the workers
//! see it.
//!
//! Target: 10,000 workers at 1 Hz within one core of the registry, exactly one Redis round trip
//! per heartbeat.
//!
//!     cargo run --release -p sllm-integration-tests --bin registry-bench [-- --max 10000 --window 10]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sllm_api::v1 as pb;
use sllm_api::v1::registry_message::Body as Down;
use sllm_api::v1::worker_message::Body as Up;
use sllm_integration_tests::{JOIN_SECRET, Proc, RedisServer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

const SESSIONS_PER_CONNECTION: usize = 200;

fn arg(name: &str, default: u64) -> Result<u64> {
    match std::env::args().skip_while(|a| a != name).nth(1) {
        Some(v) => v.parse().with_context(|| format!("{name} takes a number")),
        None => Ok(default),
    }
}

fn main() -> Result<()> {
    let max = arg("--max", 10_000)? as usize;
    let window = Duration::from_secs(arg("--window", 10)?);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(run(max, window))
}

struct Step {
    workers: usize,
    heartbeats_per_s: f64,
    cpu: f64,
    round_trips: f64,
    commands: f64,
    p50_ms: f64,
    p99_ms: f64,
}

async fn run(max: usize, window: Duration) -> Result<()> {
    let redis = RedisServer::start_with(&["--maxclients", "20000"])?;
    let url = redis.url();
    let (registry, line) = Proc::sllm(
        &[
            "serve",
            "worker-registry",
            "--redis-url",
            &url,
            "--metrics-addr",
            "off",
            "--grpc-addr",
            "127.0.0.1:0",
            "--lease-ms",
            "3000",
            "--heartbeat-ms",
            "1000",
        ],
        &[("SLLM_JOIN_SECRET", JOIN_SECRET), ("RUST_LOG", "warn")],
        "serving gRPC on",
    )?;
    let endpoint = format!("http://{}", line.rsplit(' ').next().context("no address")?);
    let mut raw = redis.raw().await?;
    let secret = service::JoinSecret::new(JOIN_SECRET).map_err(anyhow::Error::msg)?;
    let latencies: Arc<Mutex<Vec<u32>>> = Arc::new(Mutex::new(Vec::new()));
    let mut channels: Vec<Channel> = Vec::new();
    let mut started = 0usize;
    let mut steps = Vec::new();
    let targets: Vec<usize> = [1_000, 2_500, 5_000, 10_000, 20_000]
        .into_iter()
        .filter(|n| *n <= max)
        .chain([max])
        .collect();
    let mut seen = std::collections::HashSet::new();
    for target in targets.into_iter().filter(|t| seen.insert(*t)) {
        while started < target {
            if started.is_multiple_of(SESSIONS_PER_CONNECTION) {
                channels.push(
                    Endpoint::from_shared(endpoint.clone())?.tcp_nodelay(true).connect_lazy(),
                );
            }
            let ch = channels[started / SESSIONS_PER_CONNECTION].clone();
            let node = format!("bench-{started}");
            let token = secret.token_for(&node);
            tokio::spawn(worker(ch, node, token, latencies.clone()));
            started += 1;
            if started.is_multiple_of(500) {
                // Let registrations through in waves rather than one thundering herd.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        // Settle: everyone registered and into the 1 Hz rhythm.
        tokio::time::sleep(Duration::from_secs(3)).await;
        if let Ok(mut l) = latencies.lock() {
            l.clear();
        }
        let cpu0 = cpu_seconds(registry.pid())?;
        let stats0 = sllm_integration_tests::commandstats(&mut raw).await?;
        let t0 = Instant::now();
        tokio::time::sleep(window).await;
        let elapsed = t0.elapsed().as_secs_f64();
        let cpu = (cpu_seconds(registry.pid())? - cpu0) / elapsed;
        let stats1 = sllm_integration_tests::commandstats(&mut raw).await?;
        let mut lat = latencies.lock().map(|l| l.clone()).unwrap_or_default();
        lat.sort_unstable();
        let heartbeats = lat.len() as f64;
        if heartbeats == 0.0 {
            bail!("no heartbeat was acknowledged at {target} workers");
        }
        let delta = |name: &str| {
            (stats1.get(name).copied().unwrap_or(0) - stats0.get(name).copied().unwrap_or(0)) as f64
        };
        let inner: f64 = ["hmget", "time", "zadd"].iter().map(|n| delta(n)).sum();
        let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
        steps.push(Step {
            workers: target,
            heartbeats_per_s: heartbeats / elapsed,
            cpu,
            round_trips: delta("evalsha") / heartbeats,
            commands: inner / heartbeats,
            p50_ms: pct(0.5),
            p99_ms: pct(0.99),
        });
        let s = steps.last().map(|s| s.workers).unwrap_or_default();
        eprintln!("measured {s} workers");
    }
    println!();
    println!(
        "{:>8} {:>12} {:>14} {:>14} {:>14} {:>10} {:>10}",
        "workers",
        "heartbeats/s",
        "registry CPU",
        "round trips/hb",
        "commands/hb",
        "p50 ms",
        "p99 ms"
    );
    for s in &steps {
        println!(
            "{:>8} {:>12.0} {:>13.0}% {:>14.2} {:>14.2} {:>10.2} {:>10.2}",
            s.workers,
            s.heartbeats_per_s,
            s.cpu * 100.0,
            s.round_trips,
            s.commands,
            s.p50_ms,
            s.p99_ms
        );
    }
    println!();
    if let Some(top) = steps.last() {
        let cores = if top.cpu <= 1.0 { "meets" } else { "MISSES" };
        let trips = if (top.round_trips - 1.0).abs() < 0.05 { "meets" } else { "MISSES" };
        println!(
            "{} workers at 1 Hz: registry uses {:.0}% of one core — {cores} the target (<= 100%)",
            top.workers,
            top.cpu * 100.0
        );
        println!(
            "Redis round trips per heartbeat: {:.2} — {trips} the target (exactly 1)",
            top.round_trips
        );
    }
    drop(registry);
    Ok(())
}

/// One simulated worker: register, ready, then a heartbeat every second (random phase), timing
/// each until its ack.
async fn worker(channel: Channel, node: String, token: String, latencies: Arc<Mutex<Vec<u32>>>) {
    let mut client = pb::worker_registry_client::WorkerRegistryClient::new(channel);
    let (tx, rx) = mpsc::channel(4);
    let register = pb::Register {
        node_id: node.clone(),
        join_token: token,
        address: format!("sim-{node}"),
        inventory: Some(pb::Inventory {
            gpus: (0..8)
                .map(|i| pb::Gpu { index: i, name: "sim".into(), memory_bytes: 80 << 30 })
                .collect(),
            ..Default::default()
        }),
        agent_version: "bench".into(),
    };
    if tx.send(pb::WorkerMessage { epoch: 0, body: Some(Up::Register(register)) }).await.is_err() {
        return;
    }
    let Ok(resp) = client.session(ReceiverStream::new(rx)).await else { return };
    let mut inbound = resp.into_inner();
    let epoch = match inbound.message().await {
        Ok(Some(pb::RegistryMessage { body: Some(Down::Registered(r)) })) => r.epoch,
        other => {
            eprintln!("{node}: registration failed: {other:?}");
            return;
        }
    };
    if tx
        .send(pb::WorkerMessage { epoch, body: Some(Up::Ready(pb::WorkerReady {})) })
        .await
        .is_err()
    {
        return;
    }
    let phase = Duration::from_millis(rand::random::<u64>() % 1000);
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + phase, Duration::from_secs(1));
    let mut seq = 0;
    loop {
        tick.tick().await;
        seq += 1;
        let t = Instant::now();
        if tx
            .send(pb::WorkerMessage { epoch, body: Some(Up::Heartbeat(pb::Heartbeat { seq })) })
            .await
            .is_err()
        {
            return;
        }
        loop {
            match inbound.message().await {
                Ok(Some(pb::RegistryMessage { body: Some(Down::HeartbeatAck(a)) }))
                    if a.seq == seq =>
                {
                    if let Ok(mut l) = latencies.lock() {
                        l.push(t.elapsed().as_micros() as u32);
                    }
                    break;
                }
                Ok(Some(_)) => {}
                _ => return,
            }
        }
    }
}

/// CPU seconds (user + system) a process has used, from /proc.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("odd /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    Ok(ticks / 100.0)
}
