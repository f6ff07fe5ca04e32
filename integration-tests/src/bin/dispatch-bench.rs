//! Dispatch benchmark, one run, one table:
//!
//! 1. Added latency: the same zero-delay simulated worker called directly (a gRPC server that
//!    runs the simulator in place of Dispatch) vs. through Dispatch and the worker's Attach
//!    stream; p50 / p99 at a fixed 1,000 requests/s. Target: added p50 <= 150 µs, p99 <= 1 ms.
//! 2. Most requests/s through one Dispatch replica with one-token completions. Target >= 20,000.
//! 3. Tokens/s forwarded with long completions. Target >= 500,000.
//! 4. Cold start overhead: first-token time minus the simulated load time. Target <= 20 ms.
//!
//! It runs three times, as child processes: with OpenTelemetry trace export off, and on for
//! every request and for 10% of them (to an OTLP sink in the parent that accepts and discards,
//! standing in for a collector on another host), and prints the figures side by side. Target:
//! export on costs at most 10% throughput.
//!
//!     cargo run --release -p sllm-integration-tests --bin dispatch-bench

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sllm_api::v1 as pb;
use sllm_api::v1::dispatch_client::DispatchClient;
use sllm_integration_tests::{
    DispatchReplica, RedisServer, RegistryReplica, Served, SimWorker, eventually,
};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::{Channel, Endpoint};
use worker::{Backend, Job, Output};

fn main() -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() == Some("--child") {
        return rt.block_on(async {
            let _telemetry = telemetry::init("sllm-bench", "warn");
            let r = run().await?;
            println!("RESULT {}", r.iter().map(f64::to_string).collect::<Vec<_>>().join(" "));
            Ok(())
        });
    }
    rt.block_on(parent())
}

/// Runs the benchmark in a child process, with trace export on (to `endpoint`, sampling
/// `ratio` of the traces) or off; returns its figures.
async fn child(tracing_on: Option<(&str, f64)>) -> Result<Vec<f64>> {
    let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
    cmd.arg("--child").stderr(std::process::Stdio::inherit());
    cmd.env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
    if let Some((endpoint, ratio)) = tracing_on {
        cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
            .env("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
            .env("OTEL_TRACES_SAMPLER_ARG", ratio.to_string());
    }
    let out = cmd.output().await?;
    if !out.status.success() {
        bail!("benchmark child failed: {}", String::from_utf8_lossy(&out.stdout));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find_map(|l| l.strip_prefix("RESULT ")).context("no RESULT line")?;
    Ok(line.split_whitespace().filter_map(|v| v.parse().ok()).collect())
}

async fn parent() -> Result<()> {
    eprintln!("== trace export off");
    let off = child(None).await?;
    eprintln!("== trace export on, every trace sampled (OTLP to a sink in this process)");
    let sink = sllm_integration_tests::OtlpSink::start().await?;
    let on = child(Some((&sink.endpoint, 1.0))).await?;
    let (exports, bytes) = sink.received();
    eprintln!("== trace export on, 10% of traces sampled");
    let sampled = child(Some((&sink.endpoint, 0.1))).await?;
    let (all_exports, all_bytes) = sink.received();
    let received = |calls: u64, bytes: u64| format!("{calls}/{:.1}MB", bytes as f64 / 1e6);
    let [d50, d99, v50, v99, direct_rps, rps, direct_tps, tps, cold_ms] = off[..] else {
        bail!("bad figures")
    };
    let [_, _, t50, t99, _, trps, _, ttps, tcold] = on[..] else { bail!("bad figures") };
    let [_, _, s50, s99, _, srps, _, stps, scold] = sampled[..] else { bail!("bad figures") };
    println!();
    println!(
        "{:<46} {:>9} {:>13} {:>13} {:>13} {:>11}",
        "measure", "direct", "via Dispatch", "traced, 100%", "traced, 10%", "target"
    );
    println!(
        "{:<46} {:>7.0}µs {:>11.0}µs {:>11.0}µs {:>11.0}µs {:>11}",
        "latency p50 at 1,000 req/s (1 token)", d50, v50, t50, s50, ""
    );
    println!(
        "{:<46} {:>7.0}µs {:>11.0}µs {:>11.0}µs {:>11.0}µs {:>11}",
        "latency p99 at 1,000 req/s", d99, v99, t99, s99, ""
    );
    println!(
        "{:<46} {:>9} {:>11.0}µs {:>11.0}µs {:>11.0}µs {:>11}",
        "  added p50",
        "",
        v50 - d50,
        t50 - d50,
        s50 - d50,
        "<= 150µs"
    );
    println!(
        "{:<46} {:>9} {:>11.0}µs {:>11.0}µs {:>11.0}µs {:>11}",
        "  added p99",
        "",
        v99 - d99,
        t99 - d99,
        s99 - d99,
        "<= 1000µs"
    );
    println!(
        "{:<46} {:>9.0} {:>13.0} {:>13.0} {:>13.0} {:>11}",
        "requests/s, 1-token completions, 64 clients", direct_rps, rps, trps, srps, ">= 20,000"
    );
    println!(
        "{:<46} {:>9.0} {:>13.0} {:>13.0} {:>13.0} {:>11}",
        "tokens/s, 2,000-token completions, 16 clients", direct_tps, tps, ttps, stps, ">= 500,000"
    );
    println!(
        "{:<46} {:>9} {:>11.1}ms {:>11.1}ms {:>11.1}ms {:>11}",
        "cold start: first token - simulated load", "", cold_ms, tcold, scold, "<= 20ms"
    );
    println!(
        "{:<46} {:>9} {:>13} {:>13} {:>13}",
        "OTLP exports / bytes received",
        "",
        "",
        received(exports, bytes),
        received(all_exports - exports, all_bytes - bytes)
    );
    println!();
    let verdict = |ok: bool| if ok { "meets" } else { "MISSES" };
    println!(
        "added latency p50 {:.0} µs — {}; p99 {:.0} µs — {}",
        v50 - d50,
        verdict(v50 - d50 <= 150.0),
        v99 - d99,
        verdict(v99 - d99 <= 1000.0)
    );
    println!("requests/s {rps:.0} — {}", verdict(rps >= 20_000.0));
    println!("tokens/s {tps:.0} — {}", verdict(tps >= 500_000.0));
    println!("cold-start overhead {cold_ms:.1} ms — {}", verdict(cold_ms <= 20.0));
    let cost = 1.0 - trps / rps;
    let sampled_cost = 1.0 - srps / rps;
    println!(
        "trace export, every trace: costs {:.1}% of requests/s — {} the target (<= 10%)",
        cost * 100.0,
        verdict(cost <= 0.10)
    );
    println!(
        "trace export, 10% sampled: costs {:.1}% of requests/s — {} the target (<= 10%)",
        sampled_cost * 100.0,
        verdict(sampled_cost <= 0.10)
    );
    println!(
        "(spans go to an OTLP sink that reads nothing, as a collector on another host would cost \
         these two cores nothing; the observability test checks what the spans say)"
    );
    Ok(())
}

fn zero_delay() -> worker::SimConfig {
    worker::SimConfig {
        prefill_per_token: Duration::ZERO,
        decode_per_token: Duration::ZERO,
        time_scale: 1.0,
        checkpoints: [("bench".to_string(), (1, pb::CheckpointTier::Gpu))].into(),
        ..worker::SimConfig::default()
    }
}

fn request(model: &str, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        model: model.into(),
        input: Some(pb::generate_request::Input::Prompt("ping".into())),
        params: Some(pb::SamplingParams { max_tokens, ..Default::default() }),
        progress: false,
        timeout_ms: 0,
    }
}

/// Runs one request to completion; returns the tokens received.
async fn one(client: &mut DispatchClient<Channel>, req: pb::GenerateRequest) -> Result<u32> {
    let mut s = client.generate(req).await?.into_inner();
    let mut tokens = 0;
    while let Some(e) = s.message().await? {
        if let Some(pb::generate_event::Event::Chunk(c)) = e.event {
            tokens += c.tokens;
        }
    }
    Ok(tokens)
}

/// The worker called directly: a Dispatch-shaped server that runs the simulator in place.
#[derive(Clone)]
struct Direct {
    sim: worker::SimBackend,
    instance: String,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateEvent, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl pb::dispatch_server::Dispatch for Direct {
    type GenerateStream = EventStream;
    type AttachStream = EventStreamAttach;

    async fn generate(
        &self,
        r: tonic::Request<pb::GenerateRequest>,
    ) -> Result<tonic::Response<EventStream>, tonic::Status> {
        let r = r.into_inner();
        let params = r.params.unwrap_or_default();
        let out = self.sim.generate(Job {
            instance_id: self.instance.clone(),
            prompt: "ping".into(),
            max_tokens: params.max_tokens,
            stop: vec![],
            seed: 1,
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(out).map(|o| {
            let event = match o {
                Output::Text { text, tokens } => {
                    pb::generate_event::Event::Chunk(pb::Chunk { text, tokens })
                }
                Output::Done { .. } => pb::generate_event::Event::Finished(pb::Finished::default()),
                Output::Error(e) => return Err(tonic::Status::unavailable(e)),
            };
            Ok(pb::GenerateEvent { event: Some(event) })
        });
        Ok(tonic::Response::new(Box::pin(stream)))
    }

    async fn attach(
        &self,
        _r: tonic::Request<tonic::Streaming<pb::AttachUp>>,
    ) -> Result<tonic::Response<EventStreamAttach>, tonic::Status> {
        Err(tonic::Status::unimplemented("direct server"))
    }
}

type EventStreamAttach = Pin<Box<dyn Stream<Item = Result<pb::AttachDown, tonic::Status>> + Send>>;

async fn connect(endpoint: String) -> Result<DispatchClient<Channel>> {
    Ok(DispatchClient::new(Endpoint::from_shared(endpoint)?.tcp_nodelay(true).connect().await?))
}

/// Latency percentiles (µs) of `n` requests issued at `rate` per second.
async fn fixed_rate(
    client: &DispatchClient<Channel>,
    model: &str,
    rate: u64,
    n: usize,
) -> Result<(f64, f64)> {
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        tick.tick().await;
        let mut c = client.clone();
        let req = request(model, 1);
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            one(&mut c, req).await.map(|_| t.elapsed().as_micros() as u64)
        }));
    }
    let mut lat = Vec::with_capacity(n);
    for t in tasks {
        lat.push(t.await??);
    }
    lat.sort_unstable();
    Ok((lat[lat.len() / 2] as f64, lat[lat.len() * 99 / 100] as f64))
}

/// Requests and tokens completed per second by `concurrency` closed loops for `for_`.
async fn saturate(
    endpoint: &str,
    model: &str,
    max_tokens: u32,
    concurrency: usize,
    for_: Duration,
) -> Result<(f64, f64)> {
    let channels = 4;
    let mut clients = Vec::new();
    for _ in 0..channels {
        clients.push(connect(endpoint.to_string()).await?);
    }
    let requests = Arc::new(AtomicU64::new(0));
    let tokens = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + for_;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..concurrency {
        let mut c = clients[i % channels].clone();
        let (requests, tokens, model) = (requests.clone(), tokens.clone(), model.to_string());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < stop {
                match one(&mut c, request(&model, max_tokens)).await {
                    Ok(n) => {
                        requests.fetch_add(1, Ordering::Relaxed);
                        tokens.fetch_add(u64::from(n), Ordering::Relaxed);
                    }
                    Err(e) => eprintln!("request failed: {e}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok((
        requests.load(Ordering::Relaxed) as f64 / secs,
        tokens.load(Ordering::Relaxed) as f64 / secs,
    ))
}

/// Measures everything; returns [direct p50, direct p99, via p50, via p99, direct rps, rps,
/// direct tokens/s, tokens/s, cold-start overhead ms].
async fn run() -> Result<Vec<f64>> {
    // Direct: the simulator behind a bare gRPC server.
    let (sim, mut events) = worker::SimBackend::new(zero_delay());
    sim.start(worker::StartSpec {
        instance_id: "direct".into(),
        model: "bench".into(),
        backend: "sim".into(),
        gpus: vec![0],
        backend_config: None,
        traceparent: String::new(),
    })?;
    while let Some(e) = events.recv().await {
        if matches!(e, worker::InstanceEvent::Ready { .. }) {
            break;
        }
    }
    let listener = service::Listener::bind("127.0.0.1:0").await?;
    let direct_ep = format!("http://{}", listener.local_addr());
    let direct = Direct { sim: sim.clone(), instance: "direct".into() };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::dispatch_server::DispatchServer::new(direct))
            .serve_with_incoming(listener.incoming()),
    );

    // Through Dispatch: the full mesh with the same simulator on a worker.
    let redis = RedisServer::start()?;
    let store = redis.store().await?;
    let registry =
        RegistryReplica::start(store.clone(), Duration::from_secs(10), Duration::from_secs(3))
            .await?;
    let _scaler = Served::scaler(store.clone(), scaler::ScalerConfig::new("bench")).await?;
    let dispatch =
        DispatchReplica::start(store.clone(), "bench", |c| c.max_queue = 100_000).await?;
    let mut w = SimWorker::start(vec![registry.endpoint()], "w1", zero_delay())?;
    w.ready(0).await?;
    store
        .create_deployment(&kvstore::DeploymentSpec {
            model: "bench".into(),
            backend: "sim".into(),
            num_gpus: 1,
            autoscaling: kvstore::AutoScaling {
                min_instances: 1,
                max_instances: 1,
                ..Default::default()
            },
            backend_config: String::new(),
        })
        .await?;
    let mut via = connect(dispatch.endpoint()).await?;
    eventually(Duration::from_secs(20), "the model served through Dispatch", || {
        let mut c = via.clone();
        async move { one(&mut c, request("bench", 1)).await.ok() }
    })
    .await?;
    let mut direct_client = connect(direct_ep.clone()).await?;
    for _ in 0..500 {
        one(&mut direct_client, request("bench", 1)).await?;
        one(&mut via, request("bench", 1)).await?;
    }

    eprintln!("1/4 added latency at 1,000 req/s ...");
    let (d50, d99) = fixed_rate(&direct_client, "bench", 1000, 3000).await?;
    let (v50, v99) = fixed_rate(&via, "bench", 1000, 3000).await?;
    eprintln!("2/4 requests/s ...");
    let (direct_rps, _) = saturate(&direct_ep, "bench", 1, 64, Duration::from_secs(5)).await?;
    let (rps, _) = saturate(&dispatch.endpoint(), "bench", 1, 64, Duration::from_secs(5)).await?;
    eprintln!("3/4 tokens/s ...");
    let (_, direct_tps) = saturate(&direct_ep, "bench", 2000, 16, Duration::from_secs(5)).await?;
    let (_, tps) =
        saturate(&dispatch.endpoint(), "bench", 2000, 16, Duration::from_secs(5)).await?;

    eprintln!("4/4 cold start ...");
    let mut overheads = Vec::new();
    let cold = worker::SimConfig {
        checkpoints: (0..5)
            .map(|i| (format!("cold-{i}"), (6 << 30, pb::CheckpointTier::HostMemory)))
            .collect(),
        ..zero_delay()
    };
    let mut w2 = SimWorker::start(vec![registry.endpoint()], "w2", cold.clone())?;
    w2.ready(0).await?;
    tokio::time::sleep(Duration::from_secs(1)).await; // attached
    for i in 0..5 {
        let model = format!("cold-{i}");
        store
            .create_deployment(&kvstore::DeploymentSpec {
                model: model.clone(),
                backend: "sim".into(),
                num_gpus: 1,
                autoscaling: kvstore::AutoScaling {
                    min_instances: 0,
                    max_instances: 1,
                    keep_alive_s: 600,
                    ..Default::default()
                },
                backend_config: String::new(),
            })
            .await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = Instant::now();
        let mut s = via.generate(request(&model, 1)).await?.into_inner();
        let mut first = None;
        while let Some(e) = s.message().await? {
            if first.is_none() && matches!(e.event, Some(pb::generate_event::Event::Chunk(_))) {
                first = Some(t.elapsed());
            }
        }
        let Some(first) = first else { bail!("no token from {model}") };
        // w2 holds the checkpoint in host memory; w1 does not, so the Scaler picks w2.
        let load = cold.load_time(&model);
        overheads.push(first.as_secs_f64() * 1000.0 - load.as_secs_f64() * 1000.0);
    }
    eprintln!("    cold-start overheads (ms): {overheads:.1?}");
    overheads.sort_by(f64::total_cmp);
    let cold_ms = overheads[overheads.len() / 2];

    drop((w, w2));
    Ok(vec![d50, d99, v50, v99, direct_rps, rps, direct_tps, tps, cold_ms])
}
