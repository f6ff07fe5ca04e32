//! What every sllm gRPC service shares: binding a listener (with TCP_NODELAY on every accepted
//! connection), gRPC health and reflection (v1 and v1alpha), the one mapping from kvstore errors
//! to gRPC statuses, join tokens, the retry policy, the `/metrics` endpoint and shutdown on signals.
//!
//! It holds no service logic and must never call another service.

pub mod auth;
pub mod batched;
pub mod convert;
pub mod deploy_config;
pub mod join_token;
pub mod retry;
pub mod serve;
pub mod status;
pub mod tls;

pub use join_token::{JoinSecret, JoinSecrets, TokenError};
pub use serve::{
    Listener, MAX_CONCURRENT_STREAMS, reflection_v1, reflection_v1alpha, serve_http, serve_metrics,
    serve_metrics_guarded, shutdown_signal,
};
pub use status::{field_status, to_status, to_status_quiet};
