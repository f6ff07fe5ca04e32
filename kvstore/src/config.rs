//! How to reach Redis and how the store behaves.

use std::time::Duration;

/// Settings of a [`crate::Store`]. The defaults work against a local Redis.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// `redis://host:port/db`, `rediss://…` (TLS) or `unix:///path/to/redis.sock`.
    pub url: String,
    /// Namespace of every key (the hash tag), so several clusters can share one Redis.
    pub namespace: String,
    /// Most connections the pool opens (shared lanes plus dedicated blocking readers).
    pub pool_size: usize,
    /// Multiplexed connections shared by all ordinary operations, round-robin.
    pub lanes: usize,
    /// Longest wait for a TCP / TLS / unix connection.
    pub connect_timeout: Duration,
    /// Longest wait for an answer to one command; a blocking read waits at most this long
    /// less half a second.
    pub response_timeout: Duration,
    /// Longest wait for a free connection from the pool.
    pub wait_timeout: Duration,
    /// Approximate length the event stream is trimmed to.
    pub events_maxlen: u64,
    /// How long a stopped or failed instance's record stays readable.
    pub terminal_ttl: Duration,
    /// After Redis lost its state (restarted empty while registries ran), how long workers'
    /// reports of instances with no record are adopted; outside it they are stopped.
    pub recovery_window: Duration,
    /// For `rediss://`: PEM CA bundle the server's certificate must chain to (none: the
    /// bundled web roots).
    pub tls_ca: Option<std::path::PathBuf>,
    /// For `rediss://`: PEM client certificate and key, for servers that verify clients
    /// (Redis does by default: `tls-auth-clients yes`).
    pub tls_client: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            url: "redis://127.0.0.1:6379".into(),
            namespace: "sllm".into(),
            pool_size: 32,
            lanes: 4,
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(2),
            wait_timeout: Duration::from_secs(2),
            events_maxlen: 100_000,
            terminal_ttl: Duration::from_secs(3600),
            recovery_window: Duration::from_secs(120),
            tls_ca: None,
            tls_client: None,
        }
    }
}

impl StoreConfig {
    /// The defaults, against `url`.
    pub fn new(url: impl Into<String>) -> Self {
        StoreConfig { url: url.into(), ..Default::default() }
    }

    /// The same settings under another namespace.
    pub fn with_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }
}
