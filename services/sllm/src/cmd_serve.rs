//! `sllm serve`: control-plane services, each on its own listener, sharing one kvstore pool.

use std::time::Duration;

use anyhow::{Context, Result};
use clap::ValueEnum;
use kvstore::{Store, StoreConfig};
use service::{JoinSecret, Listener};
use tokio_util::sync::CancellationToken;
use worker_registry::{Registry, RegistryConfig};

/// Services `sllm serve` can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ServiceName {
    /// Deploys, updates, deletes and lists models.
    ModelRegistry,
    /// Holds workers' Session streams (registration, heartbeats, commands).
    WorkerRegistry,
    /// Sizes models from demand and places instances (one leader among replicas).
    Scaler,
    /// Routes inference requests (gRPC Generate and the OpenAI HTTP API); workers attach to it.
    Dispatch,
}

/// Flags of `sllm serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Services to run in this process.
    #[arg(required = true, value_enum)]
    services: Vec<ServiceName>,
    /// Redis URL: redis://host:port/db, rediss://… (TLS) or unix:///path/to/redis.sock.
    #[arg(long, env = "SLLM_REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// Namespace of every Redis key (several clusters can share one Redis).
    #[arg(long, env = "SLLM_NAMESPACE", default_value = "sllm")]
    namespace: String,
    /// Redis connections this process may open.
    #[arg(long, env = "SLLM_REDIS_POOL_SIZE", default_value_t = 32)]
    redis_pool_size: usize,
    /// Address the ModelRegistry listens on (port 0 picks a free one).
    #[arg(long, env = "SLLM_MODEL_REGISTRY_ADDR", default_value = "127.0.0.1:50051")]
    model_registry_addr: String,
    /// Address the Scaler's status API listens on (port 0 picks a free one).
    #[arg(long, env = "SLLM_SCALER_ADDR", default_value = "127.0.0.1:50053")]
    scaler_addr: String,
    /// This replica's id (leader election, logs); default: host name and process id.
    #[arg(long, env = "SLLM_REPLICA_ID")]
    replica_id: Option<String>,
    /// Scaler safety-net tick, in milliseconds.
    #[arg(long, env = "SLLM_SCALER_TICK_MS", default_value_t = 1000)]
    scaler_tick_ms: u64,
    /// Scaler leader lease, in milliseconds.
    #[arg(long, env = "SLLM_SCALER_LEASE_MS", default_value_t = 3000)]
    scaler_lease_ms: u64,
    /// Address Dispatch's gRPC API (clients' Generate, workers' Attach) listens on.
    #[arg(long, env = "SLLM_DISPATCH_ADDR", default_value = "127.0.0.1:50054")]
    dispatch_addr: String,
    /// Address the OpenAI-compatible HTTP API listens on.
    #[arg(long, env = "SLLM_OPENAI_ADDR", default_value = "127.0.0.1:8000")]
    openai_addr: String,
    /// Endpoint workers use to attach to this Dispatch (default: http://<dispatch address>).
    #[arg(long, env = "SLLM_DISPATCH_ADVERTISE")]
    dispatch_advertise: Option<String>,
    /// Most requests held per model while it has no ready instance.
    #[arg(long, env = "SLLM_MAX_QUEUE", default_value_t = 256)]
    max_queue: usize,
    /// Address the WorkerRegistry listens on (port 0 picks a free one).
    #[arg(long, env = "SLLM_WORKER_REGISTRY_ADDR", default_value = "127.0.0.1:50052")]
    worker_registry_addr: String,
    /// Secret that worker join tokens are checked against (at least 16 bytes).
    #[arg(long, env = "SLLM_JOIN_SECRET", hide_env_values = true)]
    join_secret: Option<String>,
    /// Worker lease in milliseconds: a worker silent for longer is lost.
    #[arg(long, env = "SLLM_LEASE_MS", default_value_t = 3000)]
    lease_ms: u64,
    /// Heartbeat interval told to workers, in milliseconds.
    #[arg(long, env = "SLLM_HEARTBEAT_MS", default_value_t = 1000)]
    heartbeat_ms: u64,
}

pub async fn run(args: ServeArgs) -> Result<()> {
    let mut config = StoreConfig::new(&args.redis_url).with_namespace(&args.namespace);
    config.pool_size = args.redis_pool_size;
    let store = Store::connect(config)
        .await
        .with_context(|| format!("cannot use Redis at {}", args.redis_url))?;
    let shutdown = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();

    let replica_id = args.replica_id.clone().unwrap_or_else(default_replica_id);
    for name in &args.services {
        match name {
            ServiceName::ModelRegistry => {
                let registry = model_registry::Registry::new(store.clone());
                let listener = Listener::bind(&args.model_registry_addr).await?;
                println!("sllm: model-registry listening on {}", listener.local_addr());
                let shutdown = shutdown.clone();
                tasks.spawn(async move {
                    registry
                        .serve(listener, shutdown)
                        .await
                        .map_err(|e| anyhow::anyhow!("model-registry failed: {e}"))
                });
            }
            ServiceName::Dispatch => {
                let secret = args
                    .join_secret
                    .clone()
                    .context("--join-secret (or SLLM_JOIN_SECRET) is required by dispatch (workers attach with it)")?;
                let secret = JoinSecret::new(secret).map_err(anyhow::Error::msg)?;
                let mut config = dispatch::DispatchConfig::new(replica_id.clone(), secret);
                config.max_queue = args.max_queue;
                config.advertise = args.dispatch_advertise.clone().unwrap_or_default();
                let grpc = Listener::bind(&args.dispatch_addr).await?;
                let http = Listener::bind(&args.openai_addr).await?;
                println!("sllm: dispatch listening on {}", grpc.local_addr());
                println!("sllm: openai api listening on {}", http.local_addr());
                let d = dispatch::Dispatch::new(store.clone(), config);
                let shutdown = shutdown.clone();
                tasks.spawn(async move {
                    d.serve(grpc, http, shutdown)
                        .await
                        .map_err(|e| anyhow::anyhow!("dispatch failed: {e}"))
                });
            }
            ServiceName::Scaler => {
                let mut config = scaler::ScalerConfig::new(replica_id.clone());
                config.tick = Duration::from_millis(args.scaler_tick_ms.max(10));
                config.lease = Duration::from_millis(args.scaler_lease_ms.max(100));
                let scaler = scaler::Scaler::new(store.clone(), config);
                let listener = Listener::bind(&args.scaler_addr).await?;
                println!("sllm: scaler listening on {}", listener.local_addr());
                let shutdown = shutdown.clone();
                tasks.spawn(async move {
                    scaler
                        .serve(listener, shutdown)
                        .await
                        .map_err(|e| anyhow::anyhow!("scaler failed: {e}"))
                });
            }
            ServiceName::WorkerRegistry => {
                let registry = Registry::new(store.clone(), registry_config(&args)?);
                let listener = Listener::bind(&args.worker_registry_addr).await?;
                println!("sllm: worker-registry listening on {}", listener.local_addr());
                let shutdown = shutdown.clone();
                tasks.spawn(async move {
                    registry
                        .serve(listener, shutdown)
                        .await
                        .map_err(|e| anyhow::anyhow!("worker-registry failed: {e}"))
                });
            }
        }
    }

    tokio::select! {
        _ = service::shutdown_signal() => tracing::info!("shutting down"),
        Some(r) = tasks.join_next() => {
            shutdown.cancel();
            r.context("a service task panicked")??;
        }
    }
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(r) = tasks.join_next().await {
            if let Ok(Err(e)) = r {
                tracing::warn!(error = %e, "service ended with an error");
            }
        }
    })
    .await;
    Ok(())
}

/// `<host>-<pid>`: unique enough among replicas, and readable in logs.
fn default_replica_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String =
        host.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
    let host = if host.is_empty() { "sllm".to_string() } else { host };
    format!("{host}-{}", std::process::id())
}

fn registry_config(args: &ServeArgs) -> Result<RegistryConfig> {
    let secret = args
        .join_secret
        .clone()
        .context("--join-secret (or SLLM_JOIN_SECRET) is required by worker-registry")?;
    let secret = JoinSecret::new(secret).map_err(anyhow::Error::msg)?;
    if args.heartbeat_ms == 0 || args.lease_ms <= args.heartbeat_ms {
        anyhow::bail!(
            "--lease-ms ({}) must be larger than --heartbeat-ms ({})",
            args.lease_ms,
            args.heartbeat_ms
        );
    }
    let mut rc = RegistryConfig::new(secret);
    rc.lease = Duration::from_millis(args.lease_ms);
    rc.heartbeat_interval = Duration::from_millis(args.heartbeat_ms);
    rc.reap_interval = (rc.lease / 4).max(Duration::from_millis(20));
    Ok(rc)
}
