//! `sllm`: one binary for every part of the system. `sllm up` runs a whole local cluster;
//! `sllm serve <service>…` runs control-plane services; `sllm worker` runs a worker agent (or a
//! fleet of simulated ones); `deploy`, `update`, `delete`, `models`, `workers`, `status` and
//! `generate` are the client commands; `sllm join-token` prints a node's join token.

// mimalloc instead of the system allocator: a request allocates from one thread and frees
// from another, which glibc's arenas serialize on a lock; Dispatch's peak requests/s nearly
// doubled with it (dispatch-bench).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod cmd_client;
mod cmd_serve;
mod cmd_sim_engine;
mod cmd_up;
mod cmd_worker;
mod secrets;

use clap::{Parser, Subcommand};

/// sllm: a serverless LLM serving control plane.
#[derive(Parser)]
#[command(name = "sllm", version, about, long_about = None, propagate_version = true)]
struct Cli {
    /// Threads of the async runtime. Default: 1 for one `sllm worker` (a relay: on one thread
    /// a request never wakes a second one, and the host's cores stay with its engines) and for
    /// `sllm serve` on a host of two cores or fewer; the number of cores otherwise. With 1,
    /// everything runs on one thread.
    #[arg(long, global = true, env = "SLLM_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a whole local cluster: Redis, all services, simulated GPU workers and a demo model.
    Up(cmd_up::UpArgs),
    /// Run one or more control-plane services in this process.
    Serve(cmd_serve::ServeArgs),
    /// Run a worker agent on this host (or a fleet of simulated ones).
    Worker(cmd_worker::WorkerArgs),
    /// Deploy a model (flags, or a ServerlessLLM deploy JSON with --config).
    Deploy(cmd_client::DeployArgs),
    /// Change a model's scaling policy without disturbing its running instances.
    Update(cmd_client::UpdateArgs),
    /// Delete models (their instances drain, then they are removed), or only LoRA adapters.
    Delete(cmd_client::DeleteArgs),
    /// List deployed models with their instances.
    Models(cmd_client::ListArgs),
    /// List GPU workers.
    Workers(cmd_client::ListArgs),
    /// List models (as ServerlessLLM does); with a model name or --detail, desired vs. actual
    /// instances and the Scaler's last decision.
    Status(cmd_client::StatusArgs),
    /// Generate text, streaming tokens as they come.
    Generate(cmd_client::GenerateArgs),
    /// Print a join token that proves a node id under the cluster's join secret until it expires.
    JoinToken(JoinTokenArgs),
    /// Serve the GPU simulator as an OpenAI-compatible HTTP engine (for the engine backend).
    SimEngine(cmd_sim_engine::SimEngineArgs),
}

#[derive(clap::Args)]
struct JoinTokenArgs {
    /// The node id the token is for.
    #[arg(long)]
    node_id: String,
    /// File of the cluster's join secrets, one per line; the first one signs (the same file
    /// `sllm serve --join-secret-file` reads).
    #[arg(long, env = "SLLM_JOIN_SECRET_FILE")]
    join_secret_file: Option<std::path::PathBuf>,
    /// The cluster's join secret (at least 16 bytes), for development; prefer
    /// --join-secret-file or SLLM_JOIN_SECRET: a command line is visible to every user.
    #[arg(long, env = "SLLM_JOIN_SECRET", hide_env_values = true)]
    join_secret: Option<String>,
    /// How long the token is valid: 30d, 12h, 90m, 3600s.
    #[arg(long, default_value = "30d", value_parser = secrets::parse_ttl)]
    ttl: std::time::Duration,
}

/// `sllm join-token`: the token on stdout (for `$(…)` and files), its expiry on stderr.
fn join_token(a: JoinTokenArgs) -> anyhow::Result<()> {
    let secrets = secrets::join_secrets(a.join_secret.as_deref(), a.join_secret_file.as_deref())?
        .ok_or_else(|| {
        anyhow::anyhow!("--join-secret-file (or SLLM_JOIN_SECRET, --join-secret) is required")
    })?;
    kvstore::names::validate_id("--node-id", &a.node_id)?;
    let expiry = service::join_token::now_unix_s().saturating_add(a.ttl.as_secs());
    println!("{}", secrets.minting().token_expiring_at(&a.node_id, expiry));
    eprintln!("sllm: token for {} expires at {}", a.node_id, service::join_token::utc(expiry));
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = cli.threads.unwrap_or(match cli.command {
        Command::Worker(ref w) if w.count == 1 => 1,
        // On two cores or fewer a second runtime thread has no core of its own to run on: it
        // only adds wakeups (dispatch CPU per request fell by a sixth to a quarter with one).
        Command::Serve(_) if cores <= 2 => 1,
        _ => 0,
    });
    let mut builder = match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            if n > 1 {
                b.worker_threads(usize::from(n));
            }
            b
        }
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sllm: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        // Client commands print results, not logs; services log at info (`sllm up` prints its
        // own story, so only warnings unless RUST_LOG asks), and export traces when
        // OTEL_EXPORTER_OTLP_ENDPOINT is set. The guard flushes pending spans at exit.
        let telemetry_guard = match &cli.command {
            Command::Up(_) => Some(telemetry::init("sllm", "warn")),
            Command::Serve(_) => Some(telemetry::init("sllm-control-plane", "info")),
            Command::Worker(_) => Some(telemetry::init("sllm-worker", "info")),
            _ => None,
        };
        let result = match cli.command {
            Command::Up(a) => cmd_up::run(a).await,
            Command::Serve(a) => cmd_serve::run(a).await,
            Command::Worker(a) => cmd_worker::run(a).await,
            Command::Deploy(a) => cmd_client::deploy(a).await,
            Command::Update(a) => cmd_client::update(a).await,
            Command::Delete(a) => cmd_client::delete(a).await,
            Command::Models(a) => cmd_client::models(a).await,
            Command::Workers(a) => cmd_client::workers(a).await,
            Command::Status(a) => cmd_client::status(a).await,
            Command::Generate(a) => cmd_client::generate(a).await,
            Command::SimEngine(a) => cmd_sim_engine::run(a).await,
            Command::JoinToken(a) => join_token(a),
        };
        // Flush pending spans while the runtime still runs the exporter's connection.
        drop(telemetry_guard);
        result
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sllm: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
