//! `sllm up`: a whole local cluster in one command. A private redis-server (or `--redis-url`),
//! all four services on one gRPC port plus the OpenAI API, simulated GPU workers with a
//! realistic mix of cached checkpoints, a demo deployment scaled to zero, and one request that
//! shows the cold start and the streamed answer. Ctrl-C stops everything and removes what it
//! started.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sllm_api::v1 as pb;
use sllm_api::v1::CheckpointTier as Tier;
use tokio_util::sync::CancellationToken;
use worker::{Agent, AgentConfig, SimBackend, SimConfig};

use crate::cmd_serve::{self, ServeArgs, ServiceName};

/// Flags of `sllm up`.
#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// Use this Redis instead of starting a private redis-server.
    #[arg(long, env = "SLLM_REDIS_URL")]
    redis_url: Option<String>,
    /// Address of the gRPC port every service answers on.
    #[arg(long, default_value = "127.0.0.1:50051")]
    grpc_addr: String,
    /// Address of the OpenAI-compatible HTTP API.
    #[arg(long, default_value = "127.0.0.1:8000")]
    openai_addr: String,
    /// Address Prometheus scrapes `/metrics` on.
    #[arg(long, default_value = "127.0.0.1:9464")]
    metrics_addr: String,
    /// Simulated GPU workers to start.
    #[arg(long, default_value_t = 3)]
    workers: usize,
    /// The demo deployment.
    #[arg(long, default_value = "facebook/opt-1.3b")]
    demo_model: String,
    /// Skip the demo deployment and request.
    #[arg(long)]
    no_demo: bool,
    /// Multiply simulated load and decode times by this.
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
}

/// A private redis-server, stopped (and its directory removed) when dropped. It runs under a
/// small shell watchdog that stops it if `sllm up` dies without cleaning up (SIGKILL, a crash),
/// so no redis-server outlives it.
struct PrivateRedis {
    child: Child,
    dir: PathBuf,
    url: String,
}

impl PrivateRedis {
    fn start() -> Result<PrivateRedis> {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join("redis-server").is_file()))
            .unwrap_or(false);
        if !found {
            bail!(
                "redis-server is not installed. Install it with `sudo apt-get install redis-server` \
                 (scripts/install-deps does this), or use a running Redis with --redis-url"
            );
        }
        let dir = std::env::temp_dir().join(format!("sllm-up-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let socket = dir.join("redis.sock");
        let quote =
            |p: &std::path::Path| format!("'{}'", p.display().to_string().replace('\'', "'\\''"));
        let script = format!(
            "redis-server --port 0 --unixsocket {socket} --unixsocketperm 700 --save '' \
             --appendonly no --dir {dir} &\n\
             r=$!\n\
             trap 'kill -TERM $r 2>/dev/null; wait $r; exit 0' TERM INT\n\
             while kill -0 $r 2>/dev/null; do\n\
             \x20 if ! kill -0 {parent} 2>/dev/null; then kill -TERM $r; wait $r; rm -rf {dir}; exit 0; fi\n\
             \x20 sleep 0.2\n\
             done\n\
             wait $r",
            socket = quote(&socket),
            dir = quote(&dir),
            parent = std::process::id(),
        );
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start redis-server")?;
        let mut redis = PrivateRedis { child, dir, url: format!("unix://{}", socket.display()) };
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if let Ok(Some(status)) = redis.child.try_wait() {
                bail!("redis-server exited at start ({status})");
            }
            if start.elapsed() > Duration::from_secs(10) {
                bail!("redis-server did not start within 10 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        redis.child.try_wait()?;
        Ok(redis)
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Checks a port is free before anything starts, with a message that says what to do.
fn check_free(addr: &str, flag: &str) -> Result<()> {
    match std::net::TcpListener::bind(addr) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => bail!(
            "{addr} is already in use: is another `sllm up` running? Stop it (Ctrl-C), or choose \
             another address with {flag}"
        ),
        Err(e) => bail!("cannot listen on {addr} ({flag}): {e}"),
    }
}

/// The checkpoints each simulated worker holds: a mix of tiers, so placement has a choice.
fn fleet(n: usize, demo: &str, time_scale: f64) -> Vec<(String, SimConfig)> {
    let gb = 1_000_000_000u64;
    (0..n)
        .map(|i| {
            let mut c = SimConfig {
                gpus: if i % 3 == 2 { 8 } else { 4 },
                time_scale,
                decode_per_token: Duration::from_millis(15),
                ..SimConfig::default()
            };
            let mix: &[(&str, u64, Tier)] = match i % 3 {
                0 => &[
                    (demo, 26 * gb / 10, Tier::HostMemory),
                    ("meta-llama/Llama-3.1-8B-Instruct", 16 * gb, Tier::Disk),
                ],
                1 => &[
                    (demo, 26 * gb / 10, Tier::Disk),
                    ("meta-llama/Llama-3.1-8B-Instruct", 16 * gb, Tier::HostMemory),
                ],
                _ => &[("Qwen/Qwen2.5-7B-Instruct", 15 * gb, Tier::HostMemory)],
            };
            for (m, size, tier) in mix {
                c.checkpoints.insert((*m).to_string(), (*size, *tier));
            }
            (format!("gpu-{i}"), c)
        })
        .collect()
}

pub async fn run(args: UpArgs) -> Result<()> {
    check_free(&args.grpc_addr, "--grpc-addr")?;
    check_free(&args.openai_addr, "--openai-addr")?;
    check_free(&args.metrics_addr, "--metrics-addr")?;
    let redis = match &args.redis_url {
        Some(_) => None,
        None => Some(PrivateRedis::start()?),
    };
    let redis_url = match (&args.redis_url, &redis) {
        (Some(u), _) => u.clone(),
        (None, Some(r)) => r.url.clone(),
        (None, None) => bail!("no Redis"),
    };
    let secret: String = (0..32).map(|_| format!("{:02x}", rand::random::<u8>())).collect();
    let shutdown = CancellationToken::new();
    let serve = ServeArgs {
        services: vec![ServiceName::All],
        redis_url: redis_url.clone(),
        namespace: "sllm".into(),
        redis_pool_size: 64,
        grpc_addr: args.grpc_addr.clone(),
        openai_addr: args.openai_addr.clone(),
        metrics_addr: args.metrics_addr.clone(),
        health_addr: "off".into(),
        // Ctrl-C on a local demo: requests in flight get a few seconds.
        drain_grace_s: 5,
        dispatch_advertise: None,
        max_queue: 256,
        max_hold_s: 300,
        instance_limit: 256,
        stream_window: 32,
        max_migrations: 3,
        rate_limit: 0.0,
        rate_limit_burst: None,
        max_message_bytes: 4 << 20,
        api_keys: String::new(),
        join_secret: Some(secret.clone()),
        join_secret_file: None,
        accept_legacy_join_tokens: false,
        api_keys_file: None,
        // A local demo cluster: grpcurl and Prometheus work without keys.
        protect_introspection: false,
        lease_ms: 3000,
        heartbeat_ms: 1000,
        lost_worker_retention_s: 3600.0,
        replica_id: Some("up".into()),
        scaler_tick_ms: 1000,
        scaler_lease_ms: 3000,
        scaler_start_timeout_s: 900.0,
        // SLLM_TRUST_CLIENT_SAMPLING, read by telemetry, still applies.
        trust_client_sampling: false,
        // A local demo cluster on loopback: plain text.
        tls_cert: None,
        tls_key: None,
        tls_client_ca: None,
        redis_ca: None,
        redis_cert: None,
        redis_key: None,
    };
    let (bound, services) = cmd_serve::start(serve, shutdown.clone()).await?;
    let services = tokio::spawn(services);
    let grpc = format!("http://{}", bound.grpc);
    let openai = bound.openai.map(|a| format!("http://{a}/v1")).unwrap_or_default();

    let join = service::JoinSecret::new(secret).map_err(anyhow::Error::msg)?;
    let mut agents = Vec::new();
    for (node, sim) in fleet(args.workers, &args.demo_model, args.time_scale) {
        let mut config = AgentConfig::new(vec![grpc.clone()], node.clone(), join.token_for(&node));
        config.address = format!("sim-{node}");
        let (backend, events) = SimBackend::new(sim);
        agents.push(Agent::spawn(config, Arc::new(backend), events, None, shutdown.clone()));
    }
    for a in &mut agents {
        a.wait_ready(0, Duration::from_secs(15))
            .await
            .context("a simulated worker did not join")?;
    }
    println!("sllm: {} simulated GPU workers joined", agents.len());

    let result = async {
        if !args.no_demo {
            demo(&grpc, &args.demo_model).await?;
        }
        println!();
        println!("sllm is up.");
        println!("  gRPC (every service):  {}", bound.grpc);
        println!("  OpenAI API:            {openai}");
        println!("  Redis:                 {redis_url}");
        if let Some(m) = bound.metrics {
            println!("  Prometheus metrics:    http://{m}/metrics");
        }
        println!();
        println!("Try:");
        let m = &args.demo_model;
        println!(
            "  grpcurl -plaintext -d '{{\"model\":\"{m}\",\"prompt\":\"Hello\",\"params\":{{\"max_tokens\":16}}}}' {} sllm.v1.Dispatch/Generate",
            bound.grpc
        );
        println!("  sllm generate {m} \"Hello\" --endpoint {grpc}");
        println!(
            "  curl -N {openai}/chat/completions -H 'Content-Type: application/json' -d '{{\"model\":\"{m}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}],\"stream\":true}}'"
        );
        println!(
            "  curl -N {openai}/responses -H 'Content-Type: application/json' -d '{{\"model\":\"{m}\",\"input\":\"Hello\",\"max_output_tokens\":16,\"stream\":true}}'"
        );
        println!();
        println!("Press Ctrl-C to stop.");
        let _ = std::io::stdout().flush();
        Ok::<(), anyhow::Error>(())
    }
    .await;
    if result.is_ok() {
        service::shutdown_signal().await;
        println!("sllm: stopping");
    }
    shutdown.cancel();
    drop(agents);
    let _ = tokio::time::timeout(Duration::from_secs(5), services).await;
    drop(redis);
    println!("sllm: stopped");
    result
}

/// Deploys the demo model scaled to zero and sends it one request, showing the cold start.
async fn demo(grpc: &str, model: &str) -> Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(grpc.to_string())?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let mut registry = pb::model_registry_client::ModelRegistryClient::new(channel.clone());
    let spec = pb::DeploymentSpec {
        model: model.to_string(),
        backend: "sim".into(),
        num_gpus: 1,
        auto_scaling_config: Some(pb::AutoScalingConfig {
            metric: "concurrency".into(),
            target: 1.0,
            min_instances: 0,
            max_instances: 2,
            keep_alive: 30,
        }),
        backend_config: Some(service::convert::json_to_struct(
            &serde_json::json!({ "torch_dtype": "float16" }),
        )),
    };
    match registry.deploy(pb::DeployRequest { spec: Some(spec) }).await {
        Ok(_) => println!("sllm: deployed {model} (scaled to zero)"),
        Err(s) if s.code() == tonic::Code::AlreadyExists => {
            println!("sllm: {model} is already deployed")
        }
        Err(s) => bail!("cannot deploy the demo model: {}", s.message()),
    }
    let mut dispatch = pb::dispatch_client::DispatchClient::new(channel);
    let prompt = "Explain serverless inference in one sentence.";
    println!("sllm: asking {model}: {prompt:?}");
    let t = Instant::now();
    let req = pb::GenerateRequest {
        model: model.to_string(),
        input: Some(pb::generate_request::Input::Prompt(prompt.into())),
        params: Some(pb::SamplingParams { max_tokens: 32, seed: Some(42), ..Default::default() }),
        progress: true,
        timeout_ms: 60_000,
    };
    let mut stream =
        dispatch.generate(req).await.map_err(|s| anyhow::anyhow!("{}", s.message()))?.into_inner();
    let mut out = std::io::stdout();
    while let Some(e) = stream.message().await.map_err(|s| anyhow::anyhow!("{}", s.message()))? {
        match e.event {
            Some(pb::generate_event::Event::Progress(p)) => {
                println!("  [{:>5.2}s] {}", t.elapsed().as_secs_f64(), p.message);
            }
            Some(pb::generate_event::Event::Chunk(c)) => {
                print!("{}", c.text);
                let _ = out.flush();
            }
            Some(pb::generate_event::Event::Finished(f)) => {
                let u = f.usage.unwrap_or_default();
                println!();
                println!(
                    "  [{:>5.2}s] done: {} tokens; first token after {:.0} ms, {:.0} ms of it starting the model",
                    t.elapsed().as_secs_f64(),
                    u.completion_tokens,
                    u.time_to_first_token_us as f64 / 1000.0,
                    u.queue_us as f64 / 1000.0
                );
            }
            None => {}
        }
    }
    Ok(())
}
