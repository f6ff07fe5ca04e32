//! `sllm worker`: a worker agent running real engines, or the simulated backend (a fleet of
//! simulated workers in one process with --count).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use sllm_api::v1::CheckpointTier as Tier;
use tokio_util::sync::CancellationToken;
use worker::{Agent, AgentConfig, SimBackend, SimConfig};

/// Backends a worker can run instances with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// The built-in GPU simulator.
    Sim,
    /// Real inference engines (one process per instance; see --engine).
    Engine,
}

/// Engines the engine backend can start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EngineName {
    /// vLLM (`vllm serve`).
    Vllm,
    /// SGLang (`python3 -m sglang.launch_server`).
    Sglang,
    /// llama.cpp server (`llama-server`).
    Llamacpp,
    /// The command given with --engine-command.
    Custom,
}

/// Flags of `sllm worker`.
#[derive(clap::Args, Debug)]
pub struct WorkerArgs {
    /// WorkerRegistry endpoint(s), e.g. http://10.0.0.5:50052; tried in turn on reconnect.
    #[arg(long = "registry", env = "SLLM_REGISTRY", value_delimiter = ',', required = true)]
    registries: Vec<String>,
    /// This host's node id (with --count N, the prefix of N ids: ID-0 … ID-(N-1)).
    #[arg(long, env = "SLLM_NODE_ID")]
    node_id: String,
    /// Join token proving the node id (see `sllm join-token`). Prefer --join-token-file: a
    /// command line is visible to every user of the host.
    #[arg(
        long,
        env = "SLLM_JOIN_TOKEN",
        hide_env_values = true,
        conflicts_with = "join_token_file"
    )]
    join_token: Option<String>,
    /// File holding the join token (see `sllm join-token`); read again before every
    /// registration and attach, so a re-issued token is used without restarting the worker.
    #[arg(long, env = "SLLM_JOIN_TOKEN_FILE")]
    join_token_file: Option<std::path::PathBuf>,
    /// Join secret to compute tokens from: a development convenience for simulated fleets. A
    /// GPU host gets a token (--join-token-file) and never holds the fleet's secret.
    #[arg(long, env = "SLLM_JOIN_SECRET", hide_env_values = true)]
    join_secret: Option<String>,
    /// Address to register (default: the source address the registry sees).
    #[arg(long, env = "SLLM_WORKER_ADDRESS", default_value = "")]
    address: String,
    /// Backend that runs instances: `engine` on a GPU host (with --engine), `sim` for the
    /// simulator. Required: a GPU host must never fall back to simulated answers.
    #[arg(long, value_enum, env = "SLLM_BACKEND")]
    backend: BackendKind,
    /// With --backend engine: which engine.
    #[arg(long, value_enum, env = "SLLM_ENGINE", required_if_eq("backend", "engine"))]
    engine: Option<EngineName>,
    /// The launch command; {model}, {name}, {port}, {num_gpus} and {args} are filled in (e.g.
    /// "my-server --model {model} --port {port} {args}"). Required with --engine custom; with
    /// vllm, sglang or llamacpp it replaces the built-in command (a wrapper script, another
    /// install), while that engine's flag checks and request fields still apply.
    #[arg(long, default_value = "")]
    engine_command: String,
    /// Directory of model checkpoints (reported to the Scaler with their sizes).
    #[arg(long)]
    model_dir: Option<std::path::PathBuf>,
    /// Longest wait for an engine's health endpoint, in seconds.
    #[arg(long, default_value_t = 600)]
    ready_timeout_s: u64,
    /// Seconds between SIGTERM and SIGKILL when stopping an engine.
    #[arg(long, default_value_t = 10)]
    stop_grace_s: u64,
    /// On SIGTERM or SIGINT: the longest wait, in seconds, for the instances' in-flight
    /// requests to finish. The worker leaves its session at once (Dispatch sends it nothing
    /// new and moves requests that had no output yet), keeps its Attach streams while its
    /// instances drain, stops them, then exits (0).
    #[arg(long, env = "SLLM_DRAIN_GRACE_S", default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    drain_grace_s: u64,
    /// Longest wait for a streamed answer's first event from an engine, in seconds (a loaded
    /// GPU queues and prefills before it); past it the request fails and the engine's health
    /// is checked again.
    #[arg(long, default_value_t = 120.0)]
    engine_first_byte_timeout_s: f64,
    /// Longest gap between two events of an engine's streamed answer, in seconds.
    #[arg(long, default_value_t = 30.0)]
    engine_idle_timeout_s: f64,
    /// Longest wait for an engine's answer that is not streamed, in seconds.
    #[arg(long, default_value_t = 600.0)]
    engine_request_timeout_s: f64,
    /// Simulated GPUs per worker (with --backend engine: the host's GPUs).
    #[arg(long, default_value_t = 4)]
    gpus: u32,
    /// Simulated cached checkpoint, MODEL=SIZE@TIER (SIZE like 13GB or 2.5GiB; TIER one of
    /// gpu, host_memory, disk, remote). Repeatable.
    #[arg(long = "checkpoint")]
    checkpoints: Vec<String>,
    /// Multiply every simulated duration by this (0.01 makes a 10 s load take 100 ms).
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Simulated per-token decode time in milliseconds.
    #[arg(long, default_value_t = 10.0)]
    decode_ms: f64,
    /// Simulated per-prompt-token prefill time in milliseconds (before the first token).
    #[arg(long)]
    prefill_ms: Option<f64>,
    /// Address Prometheus scrapes `/metrics` on (none by default).
    #[arg(long, env = "SLLM_METRICS_ADDR")]
    metrics_addr: Option<String>,
    /// Run this many simulated workers in this process.
    #[arg(long, default_value_t = 1)]
    pub count: usize,
    /// PEM CA bundle that https:// registries' and Dispatch replicas' certificates must chain
    /// to (default: the bundled web roots).
    #[arg(long, env = "SLLM_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,
    /// PEM client certificate, for a control plane that verifies workers (mutual TLS).
    #[arg(long, env = "SLLM_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// PEM key of --tls-cert.
    #[arg(long, env = "SLLM_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
}

pub async fn run(args: WorkerArgs) -> Result<()> {
    if args.count == 0 {
        bail!("--count must be at least 1");
    }
    let mut checkpoints = HashMap::new();
    for c in &args.checkpoints {
        let (model, size, tier) =
            parse_checkpoint(c).with_context(|| format!("--checkpoint {c:?}"))?;
        checkpoints.insert(model, (size, tier));
    }
    let secret = match &args.join_secret {
        Some(s) => Some(service::JoinSecret::new(s.clone()).map_err(anyhow::Error::msg)?),
        None => None,
    };
    // Read once now, so a missing or empty file stops the start with its flag named.
    let file_token = match &args.join_token_file {
        Some(path) => Some(crate::secrets::join_token(path)?),
        None => None,
    };
    let given = file_token.as_ref().or(args.join_token.as_ref());
    let token_for = |node: &str| -> Result<String> {
        match (given, &secret) {
            (Some(t), _) if args.count == 1 => Ok(t.clone()),
            (_, Some(s)) => Ok(s.token_for(node)),
            (Some(_), None) => {
                bail!("--count > 1 needs --join-secret: one token proves one node id")
            }
            (None, None) => bail!("--join-token-file (or --join-token) is required"),
        }
    };
    let tls = service::tls::ClientTls {
        ca: args.tls_ca.clone(),
        cert: args.tls_cert.clone(),
        key: args.tls_key.clone(),
    }
    .tonic()
    .map_err(anyhow::Error::msg)?;
    let shutdown = CancellationToken::new();
    if let Some(addr) = &args.metrics_addr {
        let l = service::Listener::bind(addr).await?;
        println!("sllm: metrics on http://{}/metrics", l.local_addr());
        tokio::spawn(service::serve_metrics(l, shutdown.clone()));
    }
    let mut agents = Vec::with_capacity(args.count);
    for i in 0..args.count {
        let node =
            if args.count == 1 { args.node_id.clone() } else { format!("{}-{i}", args.node_id) };
        let mut config = AgentConfig::new(args.registries.clone(), node.clone(), token_for(&node)?);
        if args.count == 1 {
            config.join_token_file = args.join_token_file.clone();
        }
        config.address = if args.count == 1 { args.address.clone() } else { format!("sim-{node}") };
        config.tls = Some(tls.clone());
        config.drain_grace = Duration::from_secs(args.drain_grace_s);
        let (backend, events): (Arc<dyn worker::Backend>, _) = match args.backend {
            BackendKind::Sim => {
                let defaults = SimConfig::default();
                let ms = |ms: f64| Duration::from_secs_f64(ms.max(0.0) / 1000.0);
                let sim = SimConfig {
                    gpus: args.gpus,
                    checkpoints: checkpoints.clone(),
                    time_scale: args.time_scale,
                    decode_per_token: ms(args.decode_ms),
                    prefill_per_token: args.prefill_ms.map_or(defaults.prefill_per_token, ms),
                    ..defaults
                };
                let (backend, events) = SimBackend::new(sim);
                (Arc::new(backend), events)
            }
            BackendKind::Engine => {
                let kind = match args.engine {
                    Some(EngineName::Vllm) => worker::engine::EngineKind::Vllm,
                    Some(EngineName::Sglang) => worker::engine::EngineKind::Sglang,
                    Some(EngineName::Llamacpp) => worker::engine::EngineKind::Llamacpp,
                    Some(EngineName::Custom) => worker::engine::EngineKind::Custom,
                    None => bail!("--backend engine needs --engine vllm|sglang|llamacpp|custom"),
                };
                if kind == worker::engine::EngineKind::Custom && args.engine_command.is_empty() {
                    bail!("--engine custom needs --engine-command");
                }
                let mut ec = worker::engine::EngineConfig::new(kind);
                ec.command = args.engine_command.clone();
                ec.gpus = args.gpus;
                ec.model_dir = args.model_dir.clone();
                ec.ready_timeout = Duration::from_secs(args.ready_timeout_s.max(1));
                ec.stop_grace = Duration::from_secs(args.stop_grace_s);
                let secs = |s: f64, flag: &str| {
                    Duration::try_from_secs_f64(s)
                        .ok()
                        .filter(|d| !d.is_zero())
                        .with_context(|| format!("{flag} must be a positive number of seconds"))
                };
                ec.first_byte_timeout =
                    secs(args.engine_first_byte_timeout_s, "--engine-first-byte-timeout-s")?;
                ec.idle_timeout = secs(args.engine_idle_timeout_s, "--engine-idle-timeout-s")?;
                ec.request_timeout =
                    secs(args.engine_request_timeout_s, "--engine-request-timeout-s")?;
                let (backend, events) = worker::engine::EngineBackend::new(ec);
                (Arc::new(backend), events)
            }
        };
        agents.push(Agent::spawn(config, backend, events, None, shutdown.clone()));
    }
    println!("sllm: {} worker(s) started", agents.len());
    service::shutdown_signal().await;
    tracing::info!(grace_s = args.drain_grace_s, "shutting down: draining");
    shutdown.cancel();
    // Each agent leaves its session (the registry marks the worker lost at once), drains its
    // instances and stops them; then the process exits.
    for agent in &mut agents {
        agent.stopped().await;
    }
    // Let the last frames leave.
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(())
}

/// Parses MODEL=SIZE@TIER.
pub fn parse_checkpoint(s: &str) -> Result<(String, u64, Tier)> {
    let (model, rest) = s.split_once('=').context("expected MODEL=SIZE@TIER")?;
    let (size, tier) = rest.split_once('@').context("expected SIZE@TIER after '='")?;
    let tier = match tier {
        "gpu" => Tier::Gpu,
        "host_memory" | "host" | "memory" => Tier::HostMemory,
        "disk" => Tier::Disk,
        "remote" => Tier::Remote,
        other => bail!("unknown tier {other:?} (gpu, host_memory, disk, remote)"),
    };
    Ok((model.to_string(), parse_size(size)?, tier))
}

/// Parses sizes like 4096, 13GB, 2.5GiB, 800MB.
pub fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().with_context(|| format!("{s:?} is not a size"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" | "k" => 1024.0,
        "mib" | "m" => 1024.0 * 1024.0,
        "gib" | "g" => 1024.0 * 1024.0 * 1024.0,
        "tib" | "t" => 1024.0_f64.powi(4),
        other => bail!("unknown size unit {other:?}"),
    };
    if !n.is_finite() || n < 0.0 {
        bail!("{s:?} is not a size");
    }
    Ok((n * mult) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_flags() {
        let (m, size, tier) =
            parse_checkpoint("facebook/opt-1.3b=2.6GB@host_memory").expect("parses");
        assert_eq!(
            (m.as_str(), size, tier),
            ("facebook/opt-1.3b", 2_600_000_000, Tier::HostMemory)
        );
        assert_eq!(parse_size("2GiB").expect("parses"), 2 << 30);
        assert!(parse_checkpoint("m=1GB@tape").is_err());
        assert!(parse_checkpoint("m@disk").is_err());
        assert!(parse_size("-1GB").is_err());
        assert!(parse_size("lots").is_err());
    }
}
