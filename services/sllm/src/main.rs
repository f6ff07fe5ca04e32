//! `sllm`: one binary for every part of the system. `sllm serve <service>…` runs control-plane
//! services, `sllm worker` runs a worker agent (or a fleet of simulated ones), `sllm join-token`
//! prints the token that lets a node join.

mod cmd_serve;
mod cmd_worker;

use clap::{Parser, Subcommand};

/// sllm: a serverless LLM serving control plane.
#[derive(Parser)]
#[command(name = "sllm", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one or more control-plane services in this process.
    Serve(cmd_serve::ServeArgs),
    /// Run a worker agent on this host (or a fleet of simulated ones).
    Worker(cmd_worker::WorkerArgs),
    /// Print the join token that proves a node id under the cluster's join secret.
    JoinToken(JoinTokenArgs),
}

#[derive(clap::Args)]
struct JoinTokenArgs {
    /// The node id the token is for.
    #[arg(long)]
    node_id: String,
    /// The cluster's join secret (at least 16 bytes).
    #[arg(long, env = "SLLM_JOIN_SECRET", hide_env_values = true)]
    join_secret: String,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    service::init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sllm: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => cmd_serve::run(args).await,
            Command::Worker(args) => cmd_worker::run(args).await,
            Command::JoinToken(args) => {
                let secret =
                    service::JoinSecret::new(args.join_secret).map_err(anyhow::Error::msg)?;
                println!("{}", secret.token_for(&args.node_id));
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sllm: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
