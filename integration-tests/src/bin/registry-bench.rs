//! WorkerRegistry benchmark: ramps simulated workers heartbeating at 1 Hz against one registry
//! replica (an `sllm serve worker-registry` process) and prints, per step: workers held and
//! their connections, heartbeats per second handled, the CPU of the registry, of Redis and of
//! the simulated workers (all on the same cores), Redis round trips and commands per heartbeat
//! (from INFO commandstats), and heartbeat round-trip latency p50 / p99 as the workers see it.
//!
//! Each simulated worker has its own TCP connection and HTTP/2 connection to the registry, as
//! real workers (one per GPU host) do; `--per-connection N` shares one among N sessions
//! instead. Each figure is the median of `--runs` fresh runs (3) with the lowest and highest.
//!
//! Target: 10,000 workers at 1 Hz within one core of the registry, exactly one Redis round trip
//! per heartbeat.
//!
//!     cargo run --release -p sllm-integration-tests --bin registry-bench \
//!         [-- --max 10000 --window 10 --per-connection 1 --runs 3]
//!
//! 10,000 connections need that many open files in this process and in the registry's
//! (`ulimit -n`; `scripts/bench` raises the soft limit to the hard one).

// The allocator the `sllm` binary runs with.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sllm_api::v1 as pb;
use sllm_api::v1::registry_message::Body as Down;
use sllm_api::v1::worker_message::Body as Up;
use sllm_integration_tests::bench::{self, Spread};
use sllm_integration_tests::{JOIN_SECRET, Proc, RedisServer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

fn main() -> Result<()> {
    let max = bench::size("--max", 10_000, 500)? as usize;
    let window = Duration::from_secs(bench::size("--window", 10, 3)?);
    let per_connection = bench::arg("--per-connection", 1)?.max(1) as usize;
    let runs = bench::runs()?;
    let needed = (max.div_ceil(per_connection) + 256) as u64;
    if let Some(limit) = bench::open_files_limit()
        && limit < needed
    {
        bail!(
            "{max} workers on {} connections need about {needed} open files; this process may \
             open {limit}: raise it (ulimit -n {needed}) or share connections (--per-connection)",
            max.div_ceil(per_connection)
        );
    }
    let conditions = bench::conditions(runs);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut all: Vec<Vec<Step>> = Vec::new();
    for run in 0..runs {
        eprintln!("run {}/{runs} ...", run + 1);
        all.push(rt.block_on(one_run(max, window, per_connection))?);
    }
    print_table(&all, window, per_connection, &conditions);
    Ok(())
}

#[derive(Clone)]
struct Step {
    workers: usize,
    connections: usize,
    heartbeats_per_s: f64,
    registry_cpu: f64,
    redis_cpu: f64,
    workers_cpu: f64,
    round_trips: f64,
    commands: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Registrations refused and tried again, from the start of the run to this step.
    retried: usize,
    /// Sessions the registry ended (the worker registered again), likewise.
    ended: usize,
}

async fn one_run(max: usize, window: Duration, per_connection: usize) -> Result<Vec<Step>> {
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
    // INFO on a Redis busy with 10,000 workers can take longer than a default response timeout.
    let mut raw = redis::Client::open(redis.url())?
        .get_multiplexed_async_connection_with_config(
            &redis::AsyncConnectionConfig::new()
                .set_response_timeout(Some(Duration::from_secs(30))),
        )
        .await?;
    let secret = service::JoinSecret::new(JOIN_SECRET).map_err(anyhow::Error::msg)?;
    let latencies: Arc<Mutex<Vec<u32>>> = Arc::new(Mutex::new(Vec::new()));
    let registered = Arc::new(AtomicUsize::new(0));
    let retries = Arc::new(AtomicUsize::new(0));
    let ended = Arc::new(AtomicUsize::new(0));
    let mut channels: Vec<Channel> = Vec::new();
    let mut tasks = Vec::new();
    let mut started = 0usize;
    let mut steps = Vec::new();
    let targets: Vec<usize> = [1_000, 2_500, 5_000, 10_000, 20_000]
        .into_iter()
        .filter(|n| *n < max)
        .chain([max])
        .collect();
    for target in targets {
        while started < target {
            if started.is_multiple_of(per_connection) {
                channels.push(
                    Endpoint::from_shared(endpoint.clone())?.tcp_nodelay(true).connect_lazy(),
                );
            }
            let ch = channels[started / per_connection].clone();
            let node = format!("bench-{started}");
            let token = secret.token_for(&node);
            tasks.push(tokio::spawn(worker(
                ch,
                node,
                token,
                latencies.clone(),
                registered.clone(),
                retries.clone(),
                ended.clone(),
            )));
            started += 1;
            if started.is_multiple_of(100) {
                // Registrations come in at 500 a second rather than as one thundering herd
                // (a worker refused meanwhile tries again, as the agent does).
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        // Settled: every worker registered and none refused or ended for 3 s, so the window
        // sees the steady 1 Hz rhythm.
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let churn = retries.load(Ordering::Relaxed) + ended.load(Ordering::Relaxed);
            tokio::time::sleep(Duration::from_secs(3)).await;
            let now = retries.load(Ordering::Relaxed) + ended.load(Ordering::Relaxed);
            if registered.load(Ordering::Relaxed) >= target && now == churn {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{} of {target} workers registered, and still churning, after 180 s",
                    registered.load(Ordering::Relaxed)
                );
            }
        }
        if let Ok(mut l) = latencies.lock() {
            l.clear();
        }
        let cpu0 = (
            bench::cpu_seconds(registry.pid())?,
            bench::cpu_seconds(redis.pid())?,
            bench::own_cpu_seconds()?,
        );
        let stats0 = sllm_integration_tests::commandstats(&mut raw).await?;
        let t0 = Instant::now();
        tokio::time::sleep(window).await;
        let elapsed = t0.elapsed().as_secs_f64();
        let cpu1 = (
            bench::cpu_seconds(registry.pid())?,
            bench::cpu_seconds(redis.pid())?,
            bench::own_cpu_seconds()?,
        );
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
            connections: channels.len(),
            heartbeats_per_s: heartbeats / elapsed,
            registry_cpu: (cpu1.0 - cpu0.0) / elapsed,
            redis_cpu: (cpu1.1 - cpu0.1) / elapsed,
            workers_cpu: (cpu1.2 - cpu0.2) / elapsed,
            round_trips: delta("evalsha") / heartbeats,
            commands: inner / heartbeats,
            p50_ms: pct(0.5),
            p99_ms: pct(0.99),
            retried: retries.load(Ordering::Relaxed),
            ended: ended.load(Ordering::Relaxed),
        });
        eprintln!(
            "  measured {target} workers on {} connections ({} registrations refused, {} \
             sessions ended so far; {} registered now)",
            channels.len(),
            retries.load(Ordering::Relaxed),
            ended.load(Ordering::Relaxed),
            registered.load(Ordering::Relaxed),
        );
    }
    for t in &tasks {
        t.abort();
    }
    drop(channels);
    drop(registry);
    Ok(steps)
}

fn print_table(all: &[Vec<Step>], window: Duration, per_connection: usize, conditions: &str) {
    let sharing = if per_connection == 1 {
        "each worker its own TCP and HTTP/2 connection".to_string()
    } else {
        format!("{per_connection} workers' sessions share each TCP and HTTP/2 connection")
    };
    println!();
    println!(
        "worker registry: one `sllm serve worker-registry` process, simulated workers in this \
         process heartbeating at 1 Hz (random phase), {sharing}; private redis-server on a unix \
         socket; workers join at 500 a second; each step measured over {} s once every worker \
         has registered and none was refused or dropped for 3 s",
        window.as_secs()
    );
    println!("conditions: {conditions}");
    println!(
        "(registry, Redis and the simulated workers share the machine's cores; CPU is % of one \
         core)"
    );
    println!();
    println!(
        "{:>8} {:>8} {:>18} {:>18} {:>18} {:>18} {:>14} {:>12} {:>18} {:>18}",
        "workers",
        "conns",
        "heartbeats/s",
        "registry CPU %",
        "Redis CPU %",
        "workers' CPU %",
        "trips/hb",
        "commands/hb",
        "p50 ms",
        "p99 ms"
    );
    let steps = all.first().map(Vec::len).unwrap_or(0);
    for i in 0..steps {
        let runs: Vec<&Step> = all.iter().filter_map(|r| r.get(i)).collect();
        let s = |f: fn(&Step) -> f64| Spread::of(&runs.iter().map(|x| f(x)).collect::<Vec<_>>());
        let first = runs[0];
        println!(
            "{:>8} {:>8} {:>18} {:>18} {:>18} {:>18} {:>14} {:>12.2} {:>18} {:>18}",
            first.workers,
            first.connections,
            s(|x| x.heartbeats_per_s).show(0),
            s(|x| x.registry_cpu * 100.0).show(0),
            s(|x| x.redis_cpu * 100.0).show(0),
            s(|x| x.workers_cpu * 100.0).show(0),
            s(|x| x.round_trips).show(2),
            s(|x| x.commands).median,
            s(|x| x.p50_ms).show(2),
            s(|x| x.p99_ms).show(1),
        );
    }
    println!();
    let top: Vec<&Step> = all.iter().filter_map(|r| r.last()).collect();
    if let Some(first) = top.first() {
        let cpu = Spread::of(&top.iter().map(|x| x.registry_cpu * 100.0).collect::<Vec<_>>());
        let trips = Spread::of(&top.iter().map(|x| x.round_trips).collect::<Vec<_>>());
        let cores = if cpu.median <= 100.0 { "meets" } else { "MISSES" };
        let one = if (trips.median - 1.0).abs() < 0.05 { "meets" } else { "MISSES" };
        println!(
            "{} workers at 1 Hz on {} connections: registry uses {} of one core — {cores} the \
             target (<= 100%)",
            first.workers,
            first.connections,
            cpu.show_unit(0, "%")
        );
        println!(
            "Redis round trips per heartbeat: {} — {one} the target (exactly 1)",
            trips.show(2)
        );
        let retried = Spread::of(&top.iter().map(|x| x.retried as f64).collect::<Vec<_>>());
        let ended = Spread::of(&top.iter().map(|x| x.ended as f64).collect::<Vec<_>>());
        println!(
            "over the whole run (workers joining at 500 a second): registrations refused \
             {}, sessions ended by the registry {} (each worker then registers again)",
            retried.show(0),
            ended.show(0)
        );
    }
}

/// One simulated worker: register (again after a pause if refused, as the agent does), ready,
/// then a heartbeat every second (random phase), timing each until its ack.
async fn worker(
    channel: Channel,
    node: String,
    token: String,
    latencies: Arc<Mutex<Vec<u32>>>,
    registered: Arc<AtomicUsize>,
    retries: Arc<AtomicUsize>,
    ended: Arc<AtomicUsize>,
) {
    loop {
        if session(channel.clone(), &node, &token, &latencies, &registered).await {
            registered.fetch_sub(1, Ordering::Relaxed);
            ended.fetch_add(1, Ordering::Relaxed);
        } else {
            retries.fetch_add(1, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(500 + rand::random::<u64>() % 1500)).await;
    }
}

/// One session; false if it was refused before the worker was ready.
async fn session(
    channel: Channel,
    node: &str,
    token: &str,
    latencies: &Mutex<Vec<u32>>,
    registered: &AtomicUsize,
) -> bool {
    let mut client = pb::worker_registry_client::WorkerRegistryClient::new(channel);
    let (tx, rx) = mpsc::channel(4);
    let register = pb::Register {
        node_id: node.to_string(),
        join_token: token.to_string(),
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
        return false;
    }
    let Ok(resp) = client.session(ReceiverStream::new(rx)).await else { return false };
    let mut inbound = resp.into_inner();
    let epoch = match inbound.message().await {
        Ok(Some(pb::RegistryMessage { body: Some(Down::Registered(r)) })) => r.epoch,
        _ => return false,
    };
    if tx
        .send(pb::WorkerMessage { epoch, body: Some(Up::Ready(pb::WorkerReady {})) })
        .await
        .is_err()
    {
        return false;
    }
    registered.fetch_add(1, Ordering::Relaxed);
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
            return true;
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
                _ => return true,
            }
        }
    }
}
