//! The waiting room under a cold burst: 1,000 requests onto a model at zero, whose four
//! instances (one per simulated worker) become ready 0.3 s, 0.6 s, 0.9 s and 1.2 s after they
//! are placed. Measured: the time until the last request is served, and how the requests
//! spread over the instances. Baseline, in the same run: the same burst once all four
//! instances are ready (what the burst costs warm). Target: the cold burst ends within the
//! last instance's load time plus the warm burst's time plus 20%, and every instance serves
//! 20–30% of it. Each figure is the median of `--runs` fresh clusters (3) with the lowest and
//! highest.
//!
//!     cargo run --release -p sllm-integration-tests --bin room-bench [-- --runs 3]

// The allocator the `sllm` binary runs with.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sllm_api::v1 as pb;
use sllm_api::v1::dispatch_client::DispatchClient;
use sllm_integration_tests::bench::{self, Spread};
use sllm_integration_tests::{DispatchReplica, RedisServer, RegistryReplica, Served, SimWorker};
use tonic::transport::Channel;

const BURST: usize = 1000;
// Long enough that the first instance ready is still busy with its share when the last is ready.
const TOKENS: u32 = 100;

fn main() -> Result<()> {
    let runs = bench::runs()?;
    let conditions = bench::conditions(runs);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut all = Vec::new();
    for run in 0..runs {
        eprintln!("run {}/{runs} ...", run + 1);
        all.push(rt.block_on(one_run())?);
    }
    print_table(&all, &conditions);
    Ok(())
}

/// One run: the cold and the warm burst's time, and each one's shares per instance (%, largest
/// first).
struct Run {
    cold: Duration,
    warm: Duration,
    cold_share: Vec<f64>,
    warm_share: Vec<f64>,
}

fn sim(k: u64) -> worker::SimConfig {
    worker::SimConfig {
        gpus: 1,
        time_scale: 0.01,
        // 1 ms a token alone; 250 requests at once decode 13x slower each (batching).
        decode_per_token: Duration::from_millis(100),
        prefill_per_token: Duration::ZERO,
        // From disk at 3 GiB/s, scaled by 0.01: 0.3 s for w1, 0.6 s for w2, ...
        checkpoints: HashMap::from([("m".to_string(), ((90 << 30) * k, pb::CheckpointTier::Disk))]),
        ..worker::SimConfig::default()
    }
}

/// Sends the burst at once; returns when the last is served, and each request's instance.
async fn burst(client: &DispatchClient<Channel>) -> Result<(Duration, HashMap<String, usize>)> {
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(BURST);
    for i in 0..BURST {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            let req = pb::GenerateRequest {
                model: "m".into(),
                input: Some(pb::generate_request::Input::Prompt(format!("p{i}"))),
                params: Some(pb::SamplingParams { max_tokens: TOKENS, ..Default::default() }),
                ..Default::default()
            };
            let mut s = client.generate(req).await?.into_inner();
            let mut instance = String::new();
            while let Some(e) = s.message().await? {
                if let Some(pb::generate_event::Event::Finished(f)) = e.event {
                    instance = f.usage.map(|u| u.instance_id).unwrap_or_default();
                }
            }
            anyhow::Ok(instance)
        }));
    }
    let mut spread: HashMap<String, usize> = HashMap::new();
    for t in tasks {
        let instance = t.await??;
        *spread.entry(instance).or_default() += 1;
    }
    Ok((start.elapsed(), spread))
}

async fn one_run() -> Result<Run> {
    let redis = RedisServer::start()?;
    let store = redis.store().await?;
    let registry =
        RegistryReplica::start(store.clone(), Duration::from_secs(10), Duration::from_secs(3))
            .await?;
    let mut sc = scaler::ScalerConfig::new("bench");
    sc.tick = Duration::from_millis(100);
    let _scaler = Served::scaler(store.clone(), sc).await?;
    let dispatch = DispatchReplica::start(store.clone(), "bench", |c| c.max_queue = BURST).await?;
    let mut workers = Vec::new();
    for k in 1..=4 {
        let mut w = SimWorker::start(vec![registry.endpoint()], &format!("w{k}"), sim(k))?;
        w.ready(0).await?;
        workers.push(w);
    }
    store
        .create_deployment(&kvstore::DeploymentSpec {
            model: "m".into(),
            backend: "sim".into(),
            num_gpus: 1,
            autoscaling: kvstore::AutoScaling {
                target: (BURST / 4) as f64,
                min_instances: 0,
                max_instances: 4,
                keep_alive_s: 600,
                ..Default::default()
            },
            backend_config: String::new(),
        })
        .await?;
    // Workers attach to Dispatch once the registry lists it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let client = DispatchClient::new(
        tonic::transport::Endpoint::from_shared(dispatch.endpoint())?
            .tcp_nodelay(true)
            .connect()
            .await?,
    );
    eprintln!("cold burst of {BURST} ...");
    let (cold, cold_spread) = burst(&client).await.context("cold burst")?;
    eprintln!("warm burst of {BURST} ...");
    let (warm, warm_spread) = burst(&client).await.context("warm burst")?;

    drop(workers);
    Ok(Run { cold, warm, cold_share: share(&cold_spread), warm_share: share(&warm_spread) })
}

/// Shares of the burst per instance, %, largest first.
fn share(s: &HashMap<String, usize>) -> Vec<f64> {
    let mut v: Vec<f64> = s.values().map(|n| *n as f64 * 100.0 / BURST as f64).collect();
    v.sort_by(|a, b| b.total_cmp(a));
    v
}

fn print_table(all: &[Run], conditions: &str) {
    let last_load = sim(4).load_time("m");
    let ms = |f: fn(&Run) -> Duration| {
        Spread::of(&all.iter().map(|r| f(r).as_secs_f64() * 1e3).collect::<Vec<_>>())
    };
    let (cold, warm) = (ms(|r| r.cold), ms(|r| r.warm));
    let target = last_load.as_secs_f64() * 1e3 + warm.median * 1.2;
    let fmt = |v: &[f64]| v.iter().map(|x| format!("{x:.0}%")).collect::<Vec<_>>().join(" / ");
    // Per instance rank (largest share first), the median share over the runs.
    let shares = |f: fn(&Run) -> &Vec<f64>| -> Vec<f64> {
        (0..4)
            .map(|i| {
                Spread::of(&all.iter().filter_map(|r| f(r).get(i).copied()).collect::<Vec<_>>())
            })
            .filter(|s| s.runs > 0)
            .map(|s| s.median)
            .collect()
    };
    println!();
    println!(
        "waiting room: a burst of {BURST} requests of {TOKENS} tokens onto a model at zero \
         whose four instances (one per simulated worker) load in 0.3, 0.6, 0.9 and 1.2 s; one \
         Dispatch replica, Scaler, registry and workers in one process; private redis-server"
    );
    println!("conditions: {conditions}");
    println!();
    println!("{:<44} {:>24} {:>24} {:>14}", "measure", "warm (baseline)", "cold", "target");
    println!(
        "{:<44} {:>24} {:>24} {:>14}",
        format!("time until the last of {BURST} is served"),
        warm.show_unit(0, "ms"),
        cold.show_unit(0, "ms"),
        format!("<= {target:.0}ms")
    );
    println!(
        "{:<44} {:>24} {:>24} {:>14}",
        "requests per instance (median per rank)",
        fmt(&shares(|r| &r.warm_share)),
        fmt(&shares(|r| &r.cold_share)),
        "each 20-30%"
    );
    println!("(the last instance takes {:.0} ms to load)", last_load.as_secs_f64() * 1e3);
    let spread_ok = all
        .iter()
        .all(|r| r.cold_share.len() == 4 && r.cold_share.iter().all(|x| (20.0..=30.0).contains(x)));
    let verdict = |ok: bool| if ok { "meets" } else { "MISSES" };
    println!(
        "cold burst: {} — {}; spread {} in every run — {}",
        cold.show_unit(0, " ms"),
        verdict(cold.median <= target),
        fmt(&shares(|r| &r.cold_share)),
        verdict(spread_ok)
    );
}
