//! kvstore benchmark: what a state transition costs next to the cheapest possible Redis round
//! trip (`INCR`) on the same pool, against a private redis-server, in one run.
//!
//! Prints, per operation: ops/s with many in flight, p50 / p99 latency with one in flight, the
//! ratio of its p50 to INCR's, and how many round trips and server-side commands one call costs.
//! Target: a transition's p50 at most 2x a raw INCR round trip.
//!
//!     cargo run --release -p sllm-integration-tests --bin kvstore-bench [-- --ops 20000]

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::future::join_all;
use kvstore::{
    Acquired, Actor, AutoScaling, DeploymentSpec, GpuInfo, InstanceStatus, Inventory, Placement,
};
use sllm_integration_tests::RedisServer;

const LEASE: Duration = Duration::from_secs(60);
const GPUS_PER_WORKER: u32 = 64;
const CONCURRENCY: usize = 64;

struct Row {
    name: &'static str,
    ops_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    round_trips: f64,
    commands: f64,
}

fn main() -> Result<()> {
    let ops: usize = match std::env::args().skip_while(|a| a != "--ops").nth(1) {
        Some(n) => n.parse().context("--ops takes a number")?,
        None => 20_000,
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(run(ops))
}

async fn run(ops: usize) -> Result<()> {
    let redis = RedisServer::start()?;
    let store = redis.store().await?;
    let mut raw = redis.raw().await?;

    // Fixture: one deployment, enough workers and GPUs for one pending instance per measured
    // transition, a leader.
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
    let instances = 2 * ops;
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
    let mut created = Vec::with_capacity(instances);
    for i in 0..instances {
        let w = i / GPUS_PER_WORKER as usize;
        let p = Placement {
            instance_id: format!("i{i}"),
            model: "bench".into(),
            worker_id: format!("w{w}"),
            gpus: vec![(i % GPUS_PER_WORKER as usize) as u32],
            command_id: format!("c{i}"),
            command: b"start".to_vec(),
        };
        store.create_instance(&lease, &p).await?;
        created.push((p.instance_id, p.worker_id, epochs[w]));
    }
    let (seq_half, par_half) = created.split_at(ops);

    let mut rows = Vec::new();
    rows.push(
        measure(&mut raw, "raw INCR round trip", ops, |i| {
            let store = store.clone();
            async move { store.raw_incr(if i % 2 == 0 { "a" } else { "b" }).await.map(|_| ()) }
        })
        .await?,
    );
    rows.push(
        measure(&mut raw, "heartbeat (renew lease)", ops, |i| {
            let store = store.clone();
            let w = i % workers;
            let epoch = epochs[w];
            async move { store.heartbeat(&format!("w{w}"), epoch, LEASE).await.map(|_| ()) }
        })
        .await?,
    );
    rows.push(
        measure_split(
            &mut raw,
            "instance transition (pending->loading)",
            seq_half,
            par_half,
            |(id, w, epoch)| {
                let store = store.clone();
                async move {
                    let actor = Actor::Worker { worker_id: &w, epoch };
                    store
                        .transition_instance(&id, InstanceStatus::Loading, actor, "", None)
                        .await
                        .map(|_| ())
                }
            },
        )
        .await?,
    );

    let bad = store.check_invariants().await?;
    if !bad.is_empty() {
        bail!("state inconsistent after the benchmark: {bad:?}");
    }
    print_table(&rows);
    Ok(())
}

/// Runs `op(i)` `n` times one at a time (latency), then `n` times with CONCURRENCY in flight
/// (throughput).
async fn measure<F, Fut>(
    raw: &mut redis::aio::MultiplexedConnection,
    name: &'static str,
    n: usize,
    op: F,
) -> Result<Row>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = kvstore::Result<()>>,
{
    let ids: Vec<usize> = (0..2 * n).collect();
    let (a, b) = ids.split_at(n);
    measure_split(raw, name, a, b, &op).await
}

async fn measure_split<T: Clone, F, Fut>(
    raw: &mut redis::aio::MultiplexedConnection,
    name: &'static str,
    sequential: &[T],
    parallel: &[T],
    op: F,
) -> Result<Row>
where
    F: Fn(T) -> Fut,
    Fut: Future<Output = kvstore::Result<()>>,
{
    // Warm up (loads the script, fills the connection lanes).
    for item in sequential.iter().take(100) {
        let _ = op(item.clone()).await;
    }
    let before = sllm_integration_tests::commandstats(raw).await?;
    let mut lat = Vec::with_capacity(sequential.len());
    for item in sequential.iter().skip(100) {
        let t = Instant::now();
        op(item.clone()).await?;
        lat.push(t.elapsed().as_nanos() as u64);
    }
    let after = sllm_integration_tests::commandstats(raw).await?;
    let calls = lat.len() as f64;
    let (round_trips, commands) = diff(&before, &after, name.starts_with("raw INCR"));

    let start = Instant::now();
    for chunk in parallel.chunks(CONCURRENCY) {
        for r in join_all(chunk.iter().cloned().map(&op)).await {
            r?;
        }
    }
    let ops_per_s = parallel.len() as f64 / start.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
    Ok(Row {
        name,
        ops_per_s,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        round_trips: round_trips / calls,
        commands: commands / calls,
    })
}

/// (round trips, commands run) between two snapshots: EVALSHA/EVAL and plain commands are round
/// trips; commands run inside scripts are not; the INFO calls themselves are left out.
fn diff(before: &HashMap<String, u64>, after: &HashMap<String, u64>, raw_incr: bool) -> (f64, f64) {
    let mut round_trips = 0;
    let mut commands = 0;
    for (name, calls) in after {
        let d = calls - before.get(name).copied().unwrap_or(0);
        match name.as_str() {
            "info" => {}
            "evalsha" | "eval" => round_trips += d,
            // Only the baseline row sends INCR itself; everywhere else INCR runs inside a script.
            "incr" if raw_incr => {
                round_trips += d;
                commands += d;
            }
            _ => commands += d,
        }
    }
    (round_trips as f64, commands as f64)
}

fn print_table(rows: &[Row]) {
    let base = rows[0].p50_us;
    println!();
    println!(
        "{:<40} {:>10} {:>9} {:>9} {:>9} {:>12} {:>10}",
        "operation", "ops/s", "p50 µs", "p99 µs", "p50/INCR", "round trips", "commands"
    );
    for r in rows {
        println!(
            "{:<40} {:>10.0} {:>9.1} {:>9.1} {:>9.2} {:>12.2} {:>10.2}",
            r.name,
            r.ops_per_s,
            r.p50_us,
            r.p99_us,
            r.p50_us / base,
            r.round_trips,
            r.commands
        );
    }
    println!();
    for r in &rows[1..] {
        let ratio = r.p50_us / base;
        let verdict = if ratio <= 2.0 { "meets" } else { "MISSES" };
        println!(
            "{}: p50 {:.2}x a raw INCR round trip — {verdict} the target (<= 2x)",
            r.name, ratio
        );
    }
}
