//! `sllm serve`: control-plane services in one process, all on one gRPC listener (so one
//! endpoint reaches them all), sharing one kvstore pool; Dispatch adds the OpenAI HTTP API.

use std::time::Duration;

use anyhow::{Context, Result};
use clap::ValueEnum;
use kvstore::{Store, StoreConfig};
use service::{JoinSecrets, Listener};
use tokio_util::sync::CancellationToken;

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
    /// All four.
    All,
}

/// Flags of `sllm serve`.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Services to run in this process.
    #[arg(required = true, value_enum)]
    pub services: Vec<ServiceName>,
    /// Redis URL: redis://host:port/db, rediss://… (TLS) or unix:///path/to/redis.sock. It
    /// may hold a password: `--help` does not print the environment's value.
    #[arg(
        long,
        env = "SLLM_REDIS_URL",
        hide_env_values = true,
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,
    /// Namespace of every Redis key (several clusters can share one Redis).
    #[arg(long, env = "SLLM_NAMESPACE", default_value = "sllm")]
    pub namespace: String,
    /// Redis connections this process may open.
    #[arg(long, env = "SLLM_REDIS_POOL_SIZE", default_value_t = 64)]
    pub redis_pool_size: usize,
    /// Address every gRPC service of this process listens on (port 0 picks a free one).
    #[arg(long, env = "SLLM_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    pub grpc_addr: String,
    /// Address Dispatch's OpenAI-compatible HTTP API listens on.
    #[arg(long, env = "SLLM_OPENAI_ADDR", default_value = "127.0.0.1:8000")]
    pub openai_addr: String,
    /// Address Prometheus scrapes `/metrics` on ("off" for none).
    #[arg(long, env = "SLLM_METRICS_ADDR", default_value = "127.0.0.1:9464")]
    pub metrics_addr: String,
    /// Address of a plain-text gRPC listener that serves only `grpc.health.v1` ("off" for
    /// none): for probes that cannot speak TLS or present a client certificate (the kubelet's
    /// gRPC probes), and that must keep answering while the process drains.
    #[arg(long, env = "SLLM_HEALTH_ADDR", default_value = "off")]
    pub health_addr: String,
    /// On SIGTERM or SIGINT: the longest wait, in seconds, for Dispatch's accepted requests to
    /// finish. Listeners close and health turns NOT_SERVING at once, the Scaler leader hands
    /// over its lease and the WorkerRegistry sends its workers to another replica; then the
    /// process exits (0) as soon as no request is left.
    #[arg(long, env = "SLLM_DRAIN_GRACE_S", default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub drain_grace_s: u64,
    /// Endpoint workers use to attach to this Dispatch (default: http://<grpc address>).
    #[arg(long, env = "SLLM_DISPATCH_ADVERTISE")]
    pub dispatch_advertise: Option<String>,
    /// Largest gRPC message accepted, in bytes (larger ones get RESOURCE_EXHAUSTED).
    #[arg(long, env = "SLLM_MAX_MESSAGE_BYTES", default_value_t = 4 << 20)]
    pub max_message_bytes: usize,
    /// Most requests held per model while no instance has room (more get 429 /
    /// RESOURCE_EXHAUSTED with a retry hint).
    #[arg(long, env = "SLLM_MAX_QUEUE", default_value_t = 256)]
    pub max_queue: usize,
    /// Longest a request waits for an instance, in seconds (then 504 / DEADLINE_EXCEEDED); a
    /// client's shorter deadline wins.
    #[arg(long, env = "SLLM_MAX_HOLD_S", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub max_hold_s: u64,
    /// Most requests one instance serves at once (while more instances of its model are
    /// starting, no more than the deployment's `target`).
    #[arg(long, env = "SLLM_INSTANCE_LIMIT", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub instance_limit: u32,
    /// Chunks a worker may send for a request ahead of what the client has read.
    #[arg(long, env = "SLLM_STREAM_WINDOW", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub stream_window: u32,
    /// Times a stream may move to another instance of its model after output was sent, when
    /// its instance is lost or drained: the new instance continues after the text already
    /// sent, so the client sees one stream. 0: the stream ends with UNAVAILABLE instead.
    #[arg(long, env = "SLLM_MAX_MIGRATIONS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub max_migrations: u32,
    /// Inference requests per second allowed to each caller (API key, or IP address without
    /// one) across all Dispatch replicas, each deciding locally on a share it leases in the
    /// background (docs/operations.md states the bound); 0: unlimited.
    #[arg(long, env = "SLLM_RATE_LIMIT", default_value_t = 0.0)]
    pub rate_limit: f64,
    /// Requests a caller may make at once before --rate-limit applies (default: one second's
    /// worth, at least 1).
    #[arg(long, env = "SLLM_RATE_LIMIT_BURST")]
    pub rate_limit_burst: Option<u32>,
    /// API keys clients must send (`authorization: Bearer <key>`), as `key:scope,...` with
    /// scope `inference` or `admin`; unset (and no --api-keys-file): no keys are checked.
    /// Prefer --api-keys-file: a command line is visible to every user of the host.
    #[arg(long, env = "SLLM_API_KEYS", hide_env_values = true, default_value = "")]
    pub api_keys: String,
    /// File of API keys, one `key:scope` per line (`#` comments); added to --api-keys.
    #[arg(long, env = "SLLM_API_KEYS_FILE")]
    pub api_keys_file: Option<std::path::PathBuf>,
    /// Secret that worker join tokens are checked against (at least 16 bytes). Prefer
    /// --join-secret-file or SLLM_JOIN_SECRET: a command line is visible to every user.
    #[arg(long, env = "SLLM_JOIN_SECRET", hide_env_values = true)]
    pub join_secret: Option<String>,
    /// File of join secrets, one per line (`#` comments): tokens under any of them are
    /// accepted, so a secret is rotated by adding the new one, re-issuing tokens, then
    /// removing the old one; the first line is the one this process would mint with.
    #[arg(long, env = "SLLM_JOIN_SECRET_FILE")]
    pub join_secret_file: Option<std::path::PathBuf>,
    /// Also accept join tokens of the legacy format (a bare HMAC of the node id, which never
    /// expires), while an old fleet migrates.
    #[arg(long, env = "SLLM_ACCEPT_LEGACY_JOIN_TOKENS", value_parser = clap::builder::BoolishValueParser::new())]
    pub accept_legacy_join_tokens: bool,
    /// With API keys configured, make gRPC reflection and `/metrics` need an admin key too
    /// (off by default, so `grpcurl list` and a local Prometheus work without one).
    #[arg(long, env = "SLLM_PROTECT_INTROSPECTION", value_parser = clap::builder::BoolishValueParser::new())]
    pub protect_introspection: bool,
    /// Worker lease in milliseconds: a worker silent for longer is lost.
    #[arg(long, env = "SLLM_LEASE_MS", default_value_t = 3000)]
    pub lease_ms: u64,
    /// Heartbeat interval told to workers, in milliseconds.
    #[arg(long, env = "SLLM_HEARTBEAT_MS", default_value_t = 1000)]
    pub heartbeat_ms: u64,
    /// How long a lost worker's record is kept, in seconds, before it and every Redis key of
    /// the worker are removed (default: one hour).
    #[arg(long, env = "SLLM_LOST_WORKER_RETENTION_S", default_value_t = 3600.0)]
    pub lost_worker_retention_s: f64,
    /// This replica's id (leader election, logs); default: host name and process id.
    #[arg(long, env = "SLLM_REPLICA_ID")]
    pub replica_id: Option<String>,
    /// Scaler safety-net tick, in milliseconds.
    #[arg(long, env = "SLLM_SCALER_TICK_MS", default_value_t = 1000)]
    pub scaler_tick_ms: u64,
    /// Scaler leader lease, in milliseconds.
    #[arg(long, env = "SLLM_SCALER_LEASE_MS", default_value_t = 3000)]
    pub scaler_lease_ms: u64,
    /// Seconds an instance may stay pending or loading, from its placement, before the Scaler
    /// fails it, stops it and starts a replacement (sized for large checkpoints and slow engine
    /// starts; lower it for small models to replace hung engines sooner).
    #[arg(long, env = "SLLM_SCALER_START_TIMEOUT_S", default_value_t = 900.0)]
    pub scaler_start_timeout_s: f64,
    /// Let the sampled flag of a client's `traceparent` decide whether its request is traced
    /// (default: the operator's sampler, OTEL_TRACES_SAMPLER, decides for every request; a
    /// traced request continues the client's trace id either way). See docs/observability.md.
    #[arg(long, env = "SLLM_TRUST_CLIENT_SAMPLING", value_parser = clap::builder::BoolishValueParser::new())]
    pub trust_client_sampling: bool,
    /// PEM certificate chain: serve gRPC, the OpenAI API and /metrics over TLS (with --tls-key).
    #[arg(long, env = "SLLM_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "SLLM_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// PEM CA bundle: require client certificates that chain to it (mutual TLS).
    #[arg(long, env = "SLLM_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<std::path::PathBuf>,
    /// PEM CA bundle the Redis server's certificate must chain to (with rediss://).
    #[arg(long, env = "SLLM_REDIS_CA")]
    pub redis_ca: Option<std::path::PathBuf>,
    /// PEM client certificate for Redis (with rediss://, when Redis verifies clients).
    #[arg(long, env = "SLLM_REDIS_CERT", requires = "redis_key")]
    pub redis_cert: Option<std::path::PathBuf>,
    /// PEM key of --redis-cert.
    #[arg(long, env = "SLLM_REDIS_KEY", requires = "redis_cert")]
    pub redis_key: Option<std::path::PathBuf>,
}

/// What a running `serve` listens on.
pub struct Bound {
    pub grpc: std::net::SocketAddr,
    pub openai: Option<std::net::SocketAddr>,
    pub metrics: Option<std::net::SocketAddr>,
    pub health: Option<std::net::SocketAddr>,
}

pub async fn run(args: ServeArgs) -> Result<()> {
    let grace = Duration::from_secs(args.drain_grace_s);
    let shutdown = CancellationToken::new();
    let (bound, task) = start(args, shutdown.clone()).await?;
    println!("sllm: serving gRPC on {}", bound.grpc);
    if let Some(http) = bound.openai {
        println!("sllm: openai api listening on {http}");
    }
    if let Some(m) = bound.metrics {
        println!("sllm: metrics on http://{m}/metrics");
    }
    if let Some(h) = bound.health {
        println!("sllm: gRPC health on {h}");
    }
    tokio::pin!(task);
    tokio::select! {
        _ = service::shutdown_signal() => {
            tracing::info!(grace_s = grace.as_secs(), "shutting down: draining");
        }
        r = &mut task => return r,
    }
    shutdown.cancel();
    // The task ends by itself once drained; past the grace (plus a moment for the last bytes
    // and connections to close) whatever is left is dropped.
    match tokio::time::timeout(grace + Duration::from_secs(5), task).await {
        Ok(r) => r,
        Err(_) => {
            tracing::warn!("still not stopped after the drain grace; exiting");
            Ok(())
        }
    }
}

/// Binds and starts the services; returns their addresses and the task that runs them until
/// `shutdown` and then stops them gracefully: health turns NOT_SERVING and the listeners close
/// at once, the Scaler leader releases its lease, the WorkerRegistry closes its sessions (the
/// workers join another replica), and Dispatch lets the requests it accepted finish (at most
/// `--drain-grace-s`) before it ends its workers' Attach streams; the task ends when the last
/// connection has closed.
pub async fn start(
    args: ServeArgs,
    shutdown: CancellationToken,
) -> Result<(Bound, impl std::future::Future<Output = Result<()>>)> {
    // The environment variable is read by telemetry itself (for every binary); the flag can
    // only switch trust on, so an explicit SLLM_TRUST_CLIENT_SAMPLING=false is kept.
    if args.trust_client_sampling {
        telemetry::set_trust_client_sampling(true);
    }
    let all = args.services.contains(&ServiceName::All);
    let wants = |s: ServiceName| all || args.services.contains(&s);
    let mut config = StoreConfig::new(&args.redis_url).with_namespace(&args.namespace);
    config.pool_size = args.redis_pool_size;
    config.tls_ca = args.redis_ca.clone();
    config.tls_client = args.redis_cert.clone().zip(args.redis_key.clone());
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(
            service::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: args.tls_client_ca.clone(),
            }
            .load()
            .map_err(anyhow::Error::msg)?,
        ),
        _ => None,
    };
    // Credentials first: a bad file stops the start before anything connects or binds.
    let secrets = crate::secrets::join_secrets(
        args.join_secret.as_deref(),
        args.join_secret_file.as_deref(),
    )?
    .map(|s| s.accept_legacy(args.accept_legacy_join_tokens));
    let secret = || -> Result<JoinSecrets> {
        secrets.clone().context(
            "--join-secret-file, SLLM_JOIN_SECRET or --join-secret is required by \
             worker-registry and dispatch",
        )
    };
    if args.accept_legacy_join_tokens
        && (wants(ServiceName::WorkerRegistry) || wants(ServiceName::Dispatch))
    {
        tracing::warn!(
            "--accept-legacy-join-tokens: join tokens without an expiry are accepted; re-issue \
             every worker's token with `sllm join-token` and drop the flag"
        );
    }
    let keys = crate::secrets::api_keys(&args.api_keys, args.api_keys_file.as_deref())?;
    let store = Store::connect(config)
        .await
        .with_context(|| format!("cannot use Redis at {}", args.redis_url))?;
    let replica_id = args.replica_id.clone().unwrap_or_else(default_replica_id);
    let grpc = Listener::bind(&args.grpc_addr).await?;
    let grpc_addr = grpc.local_addr();
    warn_if_exposed("gRPC", grpc_addr, tls.is_some(), keys.enabled());
    let (reporter, health) = tonic_health::server::health_reporter();
    // What runs until the drain is over (Dispatch's routing and Attach streams, /metrics, the
    // health listener), where everything else stops at `shutdown`.
    let stop = CancellationToken::new();
    // Services whose health turns NOT_SERVING at `shutdown` (readiness probes ask for them).
    let mut serving: Vec<&'static str> = Vec::new();
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = &tls {
        server = server.tls_config(tls.grpc.clone()).context("TLS for gRPC")?;
    }
    let mut router = server
        .layer(
            service::auth::AuthLayer::new(keys.clone())
                .protect_reflection(args.protect_introspection),
        )
        .max_concurrent_streams(Some(service::MAX_CONCURRENT_STREAMS))
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .add_service(health.clone())
        .add_service(service::reflection_v1()?)
        .add_service(service::reflection_v1alpha()?);
    let mut background: Vec<
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>>,
    > = Vec::new();
    let mut openai = None;
    let mut metrics = None;
    let mut dispatch = None;
    if args.metrics_addr != "off" {
        let mut l = Listener::bind(&args.metrics_addr).await?;
        if let Some(tls) = &tls {
            l = l.with_tls(tls.http.clone());
        }
        metrics = Some(l.local_addr());
        // Metrics are read-only and open by default (--protect-introspection closes them):
        // only clear text is worth a warning here.
        warn_if_exposed("/metrics", l.local_addr(), tls.is_some(), true);
        let guard = if args.protect_introspection { keys.clone() } else { Default::default() };
        let s = stop.clone();
        background.push(Box::pin(async move {
            service::serve_metrics_guarded(l, guard, s).await.context("the metrics endpoint failed")
        }));
    }
    let mut health_bound = None;
    if args.health_addr != "off" {
        let l = Listener::bind(&args.health_addr).await?;
        health_bound = Some(l.local_addr());
        let s = stop.clone();
        let server = tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming_shutdown(l.incoming(), s.cancelled_owned());
        background
            .push(Box::pin(async move { server.await.context("the health listener failed") }));
    }

    if wants(ServiceName::ModelRegistry) {
        let r = model_registry::Registry::new(store.clone());
        reporter.set_serving::<sllm_api::v1::model_registry_server::ModelRegistryServer<model_registry::Registry>>().await;
        serving.push(<sllm_api::v1::model_registry_server::ModelRegistryServer<model_registry::Registry> as tonic::server::NamedService>::NAME);
        router = router.add_service(r.service().max_decoding_message_size(args.max_message_bytes));
    }
    if wants(ServiceName::WorkerRegistry) {
        let r = worker_registry::Registry::new(store.clone(), registry_config(&args, secret()?)?);
        reporter.set_serving::<sllm_api::v1::worker_registry_server::WorkerRegistryServer<worker_registry::Registry>>().await;
        serving.push(<sllm_api::v1::worker_registry_server::WorkerRegistryServer<worker_registry::Registry> as tonic::server::NamedService>::NAME);
        router = router.add_service(r.service().max_decoding_message_size(args.max_message_bytes));
        let (r2, s) = (r.clone(), shutdown.clone());
        background.push(Box::pin(async move {
            r2.run_background(s.clone()).await;
            Ok(())
        }));
        let s = shutdown.clone();
        background.push(Box::pin(async move {
            s.cancelled().await;
            r.close_all_sessions();
            Ok(())
        }));
    }
    if wants(ServiceName::Scaler) {
        let mut config = scaler::ScalerConfig::new(replica_id.clone());
        config.tick = Duration::from_millis(args.scaler_tick_ms.max(10));
        config.lease = Duration::from_millis(args.scaler_lease_ms.max(100));
        config.start_timeout = Duration::try_from_secs_f64(args.scaler_start_timeout_s)
            .ok()
            .filter(|d| !d.is_zero())
            .context("--scaler-start-timeout-s must be a positive number of seconds")?;
        let sc = scaler::Scaler::new(store.clone(), config);
        reporter.set_serving::<sllm_api::v1::scaler_server::ScalerServer<scaler::Scaler>>().await;
        serving.push(<sllm_api::v1::scaler_server::ScalerServer<scaler::Scaler> as tonic::server::NamedService>::NAME);
        router = router.add_service(sc.service().max_decoding_message_size(args.max_message_bytes));
        let s = shutdown.clone();
        background.push(Box::pin(async move {
            sc.run(s).await;
            Ok(())
        }));
    }
    if wants(ServiceName::Dispatch) {
        let mut config = dispatch::DispatchConfig::new(replica_id.clone(), secret()?);
        config.max_queue = args.max_queue;
        config.max_hold = Duration::from_secs(args.max_hold_s);
        config.instance_limit = args.instance_limit;
        config.window = args.stream_window;
        config.max_migrations = args.max_migrations;
        if args.rate_limit > 0.0 {
            let limit = kvstore::ratelimit::RateLimit {
                per_second: args.rate_limit,
                burst: args.rate_limit_burst.unwrap_or(args.rate_limit.ceil() as u32).max(1),
            };
            limit.validate().map_err(|e| anyhow::anyhow!("--rate-limit: {e}"))?;
            config.rate_limit = Some(limit);
        } else if args.rate_limit < 0.0 || !args.rate_limit.is_finite() {
            anyhow::bail!("--rate-limit must be a number of requests per second, 0 for none");
        }
        config.api_keys = keys.clone();
        let d = dispatch::Dispatch::new(store.clone(), config);
        let mut http = Listener::bind(&args.openai_addr).await?;
        if let Some(tls) = &tls {
            http = http.with_tls(tls.http.clone());
        }
        openai = Some(http.local_addr());
        warn_if_exposed("the OpenAI API", http.local_addr(), tls.is_some(), keys.enabled());
        let position = d.load(&shutdown).await;
        reporter
            .set_serving::<sllm_api::v1::dispatch_server::DispatchServer<dispatch::Dispatch>>()
            .await;
        serving.push(<sllm_api::v1::dispatch_server::DispatchServer<dispatch::Dispatch> as tonic::server::NamedService>::NAME);
        router = router.add_service(d.service(args.max_message_bytes));
        let scheme = if tls.is_some() { "https" } else { "http" };
        let advertise =
            args.dispatch_advertise.clone().unwrap_or_else(|| format!("{scheme}://{grpc_addr}"));
        let (d2, s) = (d.clone(), stop.clone());
        background.push(Box::pin(async move {
            d2.run_background(position, advertise, s).await;
            Ok(())
        }));
        let (d2, s) = (d.clone(), shutdown.clone());
        background.push(Box::pin(async move {
            d2.serve_openai(http, s).await.context("the OpenAI API failed")
        }));
        dispatch = Some(d);
    }

    // The graceful stop, once `shutdown` comes.
    let grace = Duration::from_secs(args.drain_grace_s);
    let (s, st) = (shutdown.clone(), stop.clone());
    background.push(Box::pin(async move {
        s.cancelled().await;
        for name in serving {
            reporter.set_service_status(name, tonic_health::ServingStatus::NotServing).await;
        }
        if let Some(d) = dispatch {
            let accepted = d.in_flight();
            let left = d.drain(grace).await;
            if left > 0 {
                tracing::warn!(
                    left,
                    "the drain grace passed with requests still going; they end now"
                );
            } else {
                tracing::info!(accepted, "drained: every accepted request has ended");
            }
            d.close();
        }
        st.cancel();
        Ok(())
    }));

    let server_shutdown = shutdown.clone();
    let task = async move {
        let server = async move {
            router
                .serve_with_incoming_shutdown(grpc.incoming(), server_shutdown.cancelled_owned())
                .await
                .context("the gRPC server failed")
        };
        let (a, b) = tokio::join!(server, futures_all(background));
        a.and(b)
    };
    Ok((Bound { grpc: grpc_addr, openai, metrics, health: health_bound }, task))
}

async fn futures_all(
    tasks: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>>>,
) -> Result<()> {
    for r in futures::future::join_all(tasks).await {
        r?;
    }
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

/// Warns when `what` listens beyond this host without TLS or without API keys: a production
/// setup would have both, a laptop needs neither.
fn warn_if_exposed(what: &str, address: std::net::SocketAddr, tls: bool, keys: bool) {
    if address.ip().is_loopback() {
        return;
    }
    if !tls {
        tracing::warn!(
            %address,
            "{what} listens on a non-loopback address without TLS: API keys, join tokens and \
             prompts cross the network in clear text (set --tls-cert and --tls-key)"
        );
    }
    if !keys {
        tracing::warn!(
            %address,
            "{what} listens on a non-loopback address without API keys: anyone who reaches it \
             may deploy, delete and call models (set --api-keys-file)"
        );
    }
}

fn registry_config(
    args: &ServeArgs,
    secret: JoinSecrets,
) -> Result<worker_registry::RegistryConfig> {
    if args.heartbeat_ms == 0 || args.lease_ms <= args.heartbeat_ms {
        anyhow::bail!(
            "--lease-ms ({}) must be larger than --heartbeat-ms ({})",
            args.lease_ms,
            args.heartbeat_ms
        );
    }
    let mut rc = worker_registry::RegistryConfig::new(secret);
    rc.lease = Duration::from_millis(args.lease_ms);
    rc.heartbeat_interval = Duration::from_millis(args.heartbeat_ms);
    rc.reap_interval = (rc.lease / 4).max(Duration::from_millis(20));
    rc.lost_retention =
        Duration::try_from_secs_f64(args.lost_worker_retention_s).map_err(|_| {
            anyhow::anyhow!(
                "--lost-worker-retention-s ({}) must be a number of seconds, 0 or more",
                args.lost_worker_retention_s
            )
        })?;
    Ok(rc)
}
