//! WorkerRegistry: holds each GPU worker's `Session` stream. Registration (join token checked,
//! epoch bumped), inventory and readiness, heartbeats that renew the lease, instance reports up,
//! commands from the worker's command stream down.
//!
//! Any number of replicas may run; they share nothing but Redis. A worker may hold its session
//! with any of them and move at any time: commands are delivered from the acknowledged cursor in
//! Redis, so none is lost when a replica dies. It must never call another service.

mod background;
mod grpc;
mod session;
mod sessions;
mod trouble;

use std::sync::Arc;
use std::time::Duration;

use kvstore::Store;
use service::JoinSecrets;
use sllm_api::v1::worker_registry_server::WorkerRegistryServer;
use tokio_util::sync::CancellationToken;

/// How long a lost worker is kept by default: long enough to see what happened to it.
pub const DEFAULT_LOST_RETENTION: Duration = Duration::from_secs(3600);

/// Settings of a registry replica.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Lease length: a worker silent for longer is lost.
    pub lease: Duration,
    /// Heartbeat interval told to workers.
    pub heartbeat_interval: Duration,
    /// How often this replica looks for expired leases.
    pub reap_interval: Duration,
    /// Secrets that join tokens are checked against (several while one is being rotated).
    pub join_secrets: JoinSecrets,
    /// Longest wait for a new session's `register` message.
    pub register_timeout: Duration,
    /// How long a lost worker's record is kept (for `sllm workers` and post-mortems) before it
    /// and every key of the worker are removed from Redis.
    pub lost_retention: Duration,
}

impl RegistryConfig {
    /// Defaults (1 s heartbeats, 3 s lease, lost workers kept 1 h) with the given secret(s).
    pub fn new(join_secrets: impl Into<JoinSecrets>) -> RegistryConfig {
        RegistryConfig {
            lease: Duration::from_secs(3),
            heartbeat_interval: Duration::from_secs(1),
            reap_interval: Duration::from_millis(500),
            join_secrets: join_secrets.into(),
            // An agent sends `register` as the stream's first frame; a stream that has not
            // within seconds proves nothing, and is not kept open.
            register_timeout: Duration::from_secs(5),
            lost_retention: DEFAULT_LOST_RETENTION,
        }
    }
}

/// A registry replica. Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    config: RegistryConfig,
    sessions: sessions::Sessions,
    /// Endpoints of the live Dispatch replicas, pushed to every session when they change.
    dispatchers: tokio::sync::watch::Sender<Vec<String>>,
    /// Redis calls that timed out or failed, as this replica saw them.
    trouble: trouble::Trouble,
}

impl Registry {
    /// A replica over `store`.
    pub fn new(store: Store, config: RegistryConfig) -> Registry {
        // No sessions and no losses are readings too: the series exist from the start, so a
        // dashboard shows 0 rather than no data.
        let m = &*telemetry::metrics::WORKER_REGISTRY;
        m.sessions.with_label_values(&[] as &[&str]);
        for reason in ["dropped", "expired"] {
            m.lost.with_label_values(&[reason]);
        }
        let (dispatchers, _) = tokio::sync::watch::channel(Vec::new());
        Registry {
            inner: Arc::new(Inner {
                store,
                config,
                sessions: sessions::Sessions::default(),
                dispatchers,
                trouble: trouble::Trouble::default(),
            }),
        }
    }

    /// The gRPC service.
    pub fn service(&self) -> WorkerRegistryServer<Registry> {
        WorkerRegistryServer::new(self.clone())
    }

    /// Runs the replica's background work (command notifications to local sessions, expired
    /// leases) until `shutdown` is cancelled.
    pub async fn run_background(&self, shutdown: CancellationToken) {
        background::run(self.clone(), shutdown).await
    }

    /// Ends every session this replica holds (for a clean shutdown: workers reconnect to
    /// another replica at once instead of waiting for a broken connection).
    pub fn close_all_sessions(&self) {
        self.inner.sessions.close_all();
    }

    /// Serves the registry (with gRPC health and reflection) on `listener`, and runs its
    /// background work, until `shutdown` is cancelled; then closes every session so workers
    /// move to another replica at once.
    pub async fn serve(
        self,
        listener: service::Listener,
        shutdown: CancellationToken,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter.set_serving::<WorkerRegistryServer<Registry>>().await;
        let router = tonic::transport::Server::builder()
            .max_concurrent_streams(Some(service::MAX_CONCURRENT_STREAMS))
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .add_service(health)
            .add_service(service::reflection_v1()?)
            .add_service(service::reflection_v1alpha()?)
            .add_service(self.service());
        // Both run in this task, so aborting it (a crash, in tests) stops the background too.
        let registry = self.clone();
        let server = router.serve_with_incoming_shutdown(listener.incoming(), {
            let shutdown = shutdown.clone();
            async move {
                shutdown.cancelled().await;
                registry.close_all_sessions();
            }
        });
        let (result, ()) = tokio::join!(server, self.run_background(shutdown));
        Ok(result?)
    }

    /// How many sessions this replica holds.
    pub fn session_count(&self) -> usize {
        self.inner.sessions.len()
    }
}
