//! kvstore benchmark: what a state transition costs next to the cheapest possible Redis round
//! trip (`INCR`), against a private redis-server.
//!
//! Every row goes through the same store, the same pool and the same shared connection lanes,
//! one call at a time, each a single round trip; the rows take turns in blocks of 100 calls so
//! that a machine getting busier or quieter weighs on all of them alike. The rows:
//!
//! - `INCR` of a scratch key: a plain command, the baseline.
//! - an empty script through the script runner every transition uses: what calling a script
//!   costs (Redis's own cost of running one, our prelude, the runner's bookkeeping).
//! - a heartbeat and an instance transition: real transitions.
//!
//! Measured over a unix socket (the cheapest transport there is, so Redis's time inside a
//! script weighs most) and over TCP on loopback. Printed per row: p50 / p99 latency, p50 over
//! INCR's, Redis's own time per call (`INFO commandstats`), ops/s with 64 in flight, round
//! trips and commands per call. Each figure is the median of `--runs` runs (3) with the lowest
//! and highest. Target: a transition's p50 at most 2x a raw INCR round trip.
//!
//!     cargo run --release -p sllm-integration-tests --bin kvstore-bench [-- --ops 20000 --runs 3]

// The allocator the `sllm` binary runs with.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use futures::future::join_all;
use kvstore::{
    Acquired, Actor, AutoScaling, DeploymentSpec, GpuInfo, InstanceStatus, Inventory, Placement,
    Store, StoreConfig,
};
use sllm_integration_tests::RedisServer;
use sllm_integration_tests::bench::{self, Spread};

const LEASE: Duration = Duration::from_secs(60);
const GPUS_PER_WORKER: u32 = 64;
const CONCURRENCY: usize = 64;
/// Calls of one row before the next row's turn.
const BLOCK: usize = 100;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Op {
    Incr,
    Empty,
    Heartbeat,
    Transition,
}

const OPS: [Op; 4] = [Op::Incr, Op::Empty, Op::Heartbeat, Op::Transition];

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Incr => "raw INCR round trip (baseline)",
            Op::Empty => "empty script (the cost of a script call)",
            Op::Heartbeat => "heartbeat (renew lease)",
            Op::Transition => "instance transition (pending->loading)",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Transport {
    Unix,
    Tcp,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Unix => "unix socket",
            Transport::Tcp => "TCP loopback",
        }
    }
}

/// One row of one run.
#[derive(Default, Clone)]
struct Figures {
    p50_us: f64,
    p99_us: f64,
    ratio: f64,
    server_us: f64,
    redis_cpu_us: f64,
    client_cpu_us: f64,
    ops_per_s: f64,
    round_trips: f64,
    commands: f64,
}

fn main() -> Result<()> {
    let ops = bench::size("--ops", 20_000, 2_000)? as usize;
    let runs = bench::runs()?;
    let conditions = bench::conditions(runs);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut all: HashMap<(Transport, Op), Vec<Figures>> = HashMap::new();
    let mut version = String::new();
    for run in 0..runs {
        for transport in [Transport::Unix, Transport::Tcp] {
            eprintln!("run {}/{runs}, {} ...", run + 1, transport.name());
            let (figures, v) = rt.block_on(one_run(transport, ops))?;
            version = v;
            for (op, f) in figures {
                all.entry((transport, op)).or_default().push(f);
            }
        }
    }
    print_table(&all, ops, &version, &conditions);
    Ok(())
}

/// A fresh redis-server on `transport` and a store on it.
async fn server(transport: Transport) -> Result<(RedisServer, Store)> {
    match transport {
        Transport::Unix => {
            let redis = RedisServer::start()?;
            let store = redis.store().await?;
            Ok((redis, store))
        }
        Transport::Tcp => {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let redis =
                RedisServer::start_with(&["--port", &port.to_string(), "--bind", "127.0.0.1"])?;
            let url = format!("redis://127.0.0.1:{port}");
            let store = Store::connect(StoreConfig::new(url).with_namespace("bench")).await?;
            Ok((redis, store))
        }
    }
}

async fn one_run(transport: Transport, ops: usize) -> Result<(Vec<(Op, Figures)>, String)> {
    let (redis, store) = server(transport).await?;
    let mut raw = redis.raw().await?;
    let info: String = redis::cmd("INFO").arg("server").query_async(&mut raw).await?;
    let version = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap_or("?")
        .trim()
        .to_string();

    // Fixture: one deployment, enough workers and GPUs for one pending instance per measured
    // transition (warm-up, one at a time, many in flight), a leader.
    store
        .create_deployment(&DeploymentSpec {
            model: "bench".into(),
            backend: "sim".into(),
            num_gpus: 1,
            autoscaling: AutoScaling::default(),
            backend_config: String::new(),
        })
        .await?;
    let Acquired::Leader(lease) = store.acquire_leader("scaler", "bench", LEASE).await? else {
        bail!("no leader lease");
    };
    let instances = 2 * ops + BLOCK;
    let workers = instances.div_ceil(GPUS_PER_WORKER as usize);
    let inventory = Inventory {
        gpus: (0..GPUS_PER_WORKER)
            .map(|index| GpuInfo { index, name: "sim".into(), memory_bytes: 80 << 30 })
            .collect(),
        ..Inventory::default()
    };
    let mut epochs = Vec::with_capacity(workers);
    for w in 0..workers {
        let id = format!("w{w}");
        let reg = store
            .register_worker(
                &id,
                true,
                &format!("10.{}.{}.{}", w >> 16, (w >> 8) & 255, w & 255),
                LEASE,
                &inventory,
                "bench",
            )
            .await?;
        store.worker_ready(&id, reg.epoch, &[]).await?;
        epochs.push(reg.epoch);
    }
    for chunk in (0..instances).collect::<Vec<_>>().chunks(CONCURRENCY) {
        let creates = chunk.iter().map(|&i| {
            let w = i / GPUS_PER_WORKER as usize;
            let p = Placement {
                instance_id: format!("i{i}"),
                model: "bench".into(),
                worker_id: format!("w{w}"),
                gpus: vec![(i % GPUS_PER_WORKER as usize) as u32],
                command_id: format!("c{i}"),
                command: b"start".to_vec(),
            };
            let (store, lease) = (store.clone(), &lease);
            async move { store.create_instance(lease, &p).await }
        });
        for r in join_all(creates).await {
            r?;
        }
    }
    let next_instance = std::cell::Cell::new(0usize);
    let call = |op: Op, i: usize| {
        let store = store.clone();
        let epochs = &epochs;
        let instance = if op == Op::Transition {
            let n = next_instance.get();
            next_instance.set(n + 1);
            n
        } else {
            0
        };
        async move {
            match op {
                Op::Incr => {
                    store.raw_incr(if i.is_multiple_of(2) { "a" } else { "b" }).await.map(|_| ())
                }
                Op::Empty => store.empty_script().await,
                Op::Heartbeat => {
                    let w = i % workers;
                    store.heartbeat(&format!("w{w}"), epochs[w], LEASE).await.map(|_| ())
                }
                Op::Transition => {
                    let w = format!("w{}", instance / GPUS_PER_WORKER as usize);
                    let actor = Actor::Worker {
                        worker_id: &w,
                        epoch: epochs[instance / GPUS_PER_WORKER as usize],
                    };
                    store
                        .transition_instance(
                            &format!("i{instance}"),
                            InstanceStatus::Loading,
                            actor,
                            "",
                            None,
                        )
                        .await
                        .map(|_| ())
                }
            }
        }
    };

    // Warm-up: loads the scripts, fills the connection lanes.
    for op in OPS {
        for i in 0..BLOCK {
            call(op, i).await?;
        }
    }

    // One at a time, the rows taking turns in blocks; Redis's counters read around each block.
    let mut latencies: HashMap<Op, Vec<u64>> = HashMap::new();
    let mut server_usec: HashMap<Op, f64> = HashMap::new();
    let mut redis_cpu: HashMap<Op, f64> = HashMap::new();
    let mut client_cpu: HashMap<Op, f64> = HashMap::new();
    let mut trips: HashMap<Op, u64> = HashMap::new();
    let mut commands: HashMap<Op, u64> = HashMap::new();
    let mut done = 0;
    while done < ops {
        let n = BLOCK.min(ops - done);
        for op in OPS {
            let before = bench::command_times(&mut raw).await?;
            let cpu0 = (bench::cpu_seconds(redis.pid())?, bench::own_cpu_seconds()?);
            let lat = latencies.entry(op).or_default();
            for i in done..done + n {
                let t = Instant::now();
                call(op, i).await?;
                lat.push(t.elapsed().as_nanos() as u64);
            }
            let cpu1 = (bench::cpu_seconds(redis.pid())?, bench::own_cpu_seconds()?);
            *redis_cpu.entry(op).or_default() += cpu1.0 - cpu0.0;
            *client_cpu.entry(op).or_default() += cpu1.1 - cpu0.1;
            let after = bench::command_times(&mut raw).await?;
            let (t, c, us) = attribute(&before, &after, op);
            *trips.entry(op).or_default() += t;
            *commands.entry(op).or_default() += c;
            *server_usec.entry(op).or_default() += us;
        }
        done += n;
    }

    // Many in flight: throughput, each row on its own.
    let mut ops_per_s = HashMap::new();
    for op in OPS {
        let start = Instant::now();
        for chunk in (0..ops).collect::<Vec<_>>().chunks(CONCURRENCY) {
            for r in join_all(chunk.iter().map(|&i| call(op, i))).await {
                r?;
            }
        }
        ops_per_s.insert(op, ops as f64 / start.elapsed().as_secs_f64());
    }

    let bad = store.check_invariants().await?;
    if !bad.is_empty() {
        bail!("state inconsistent after the benchmark: {bad:?}");
    }
    let p50 = |op: Op| percentile(latencies.get(&op).map(Vec::as_slice).unwrap_or(&[]), 0.50);
    let base = p50(Op::Incr);
    let figures = OPS
        .iter()
        .map(|&op| {
            let lat = latencies.get(&op).map(Vec::as_slice).unwrap_or(&[]);
            let calls = lat.len().max(1) as f64;
            let f = Figures {
                p50_us: p50(op),
                p99_us: percentile(lat, 0.99),
                ratio: p50(op) / base,
                server_us: server_usec.get(&op).copied().unwrap_or(0.0) / calls,
                redis_cpu_us: redis_cpu.get(&op).copied().unwrap_or(0.0) / calls * 1e6,
                client_cpu_us: client_cpu.get(&op).copied().unwrap_or(0.0) / calls * 1e6,
                ops_per_s: ops_per_s.get(&op).copied().unwrap_or(0.0),
                round_trips: trips.get(&op).copied().unwrap_or(0) as f64 / calls,
                commands: commands.get(&op).copied().unwrap_or(0) as f64 / calls,
            };
            (op, f)
        })
        .collect();
    drop(redis);
    Ok((figures, version))
}

/// (round trips, commands run, Redis µs) one row's block cost, from two `commandstats`
/// snapshots: EVALSHA and plain commands are round trips, commands inside scripts are not; the
/// INFO calls themselves are left out. Redis's time is the script's whole run for a script
/// (the commands inside are part of it), the command's own for INCR.
fn attribute(
    before: &HashMap<String, (u64, f64)>,
    after: &HashMap<String, (u64, f64)>,
    op: Op,
) -> (u64, u64, f64) {
    let mut round_trips = 0;
    let mut commands = 0;
    let mut usec = 0.0;
    for (name, (calls, us)) in after {
        let (c0, u0) = before.get(name).copied().unwrap_or((0, 0.0));
        let (d, du) = (calls - c0, us - u0);
        match name.as_str() {
            "info" => {}
            "evalsha" | "eval" => {
                round_trips += d;
                usec += du;
            }
            "incr" if op == Op::Incr => {
                round_trips += d;
                commands += d;
                usec += du;
            }
            _ => commands += d,
        }
    }
    (round_trips, commands, usec)
}

/// The `p` quantile of `lat` (ns), in µs.
fn percentile(lat: &[u64], p: f64) -> f64 {
    let mut v = lat.to_vec();
    v.sort_unstable();
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * p) as usize] as f64 / 1000.0
}

fn print_table(
    all: &HashMap<(Transport, Op), Vec<Figures>>,
    ops: usize,
    version: &str,
    conditions: &str,
) {
    println!();
    println!(
        "kvstore: {ops} calls per row and run, one at a time through one store's shared \
         connection lanes (the same pool, connections and client for every row), rows taking \
         turns in blocks of {BLOCK}; redis-server {version}, private, no persistence"
    );
    println!("conditions: {conditions}");
    println!(
        "per call: the time Redis counts inside the command (INFO commandstats; a script's whole \
         run), the CPU the redis-server process and this client process used (from /proc, \
         summed over the one-at-a-time blocks)"
    );
    for transport in [Transport::Unix, Transport::Tcp] {
        println!();
        println!("over a {}", transport.name());
        println!(
            "{:<42} {:>20} {:>22} {:>18} {:>18} {:>18} {:>18} {:>22} {:>6} {:>9}",
            "operation",
            "p50 µs",
            "p99 µs",
            "p50 / INCR's",
            "in the command µs",
            "Redis CPU µs",
            "client CPU µs",
            "ops/s, 64 in flight",
            "trips",
            "commands"
        );
        for op in OPS {
            let Some(runs) = all.get(&(transport, op)) else { continue };
            let spread = |f: fn(&Figures) -> f64| -> Spread {
                Spread::of(&runs.iter().map(f).collect::<Vec<_>>())
            };
            println!(
                "{:<42} {:>20} {:>22} {:>18} {:>18} {:>18} {:>18} {:>22} {:>6.2} {:>9.2}",
                op.name(),
                spread(|f| f.p50_us).show(1),
                spread(|f| f.p99_us).show(1),
                spread(|f| f.ratio).show(2),
                spread(|f| f.server_us).show(1),
                spread(|f| f.redis_cpu_us).show(1),
                spread(|f| f.client_cpu_us).show(1),
                spread(|f| f.ops_per_s).show(0),
                spread(|f| f.round_trips).median,
                spread(|f| f.commands).median,
            );
        }
    }
    println!();
    for transport in [Transport::Unix, Transport::Tcp] {
        for op in [Op::Heartbeat, Op::Transition] {
            let Some(runs) = all.get(&(transport, op)) else { continue };
            let ratio = Spread::of(&runs.iter().map(|f| f.ratio).collect::<Vec<_>>());
            let verdict = if ratio.median <= 2.0 { "meets" } else { "MISSES" };
            println!(
                "{}, {}: p50 {} a raw INCR round trip — {verdict} the target (<= 2x)",
                op.name(),
                transport.name(),
                ratio.show_unit(2, "x")
            );
        }
    }
}
