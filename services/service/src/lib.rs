//! What every sllm gRPC service shares: binding a listener (with TCP_NODELAY on every accepted
//! connection), gRPC health and reflection (v1 and v1alpha), the one mapping from kvstore errors
//! to gRPC statuses, join tokens, logging setup and shutdown on signals.
//!
//! It holds no service logic and must never call another service.

pub mod convert;
pub mod join_token;
pub mod serve;
pub mod status;

pub use join_token::JoinSecret;
pub use serve::{Listener, reflection_v1, reflection_v1alpha, serve_metrics, shutdown_signal};
pub use status::{field_status, to_status};

/// Sets up structured logs filtered by `RUST_LOG` (default `info`). Safe to call more than once.
pub fn init_logging() {
    init_logging_with("info");
}

/// Like [`init_logging`], with another default filter when `RUST_LOG` is unset.
pub fn init_logging_with(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_target(false).try_init();
}
