//! Dispatch: the request path. It accepts inference requests (gRPC `Generate` and the
//! OpenAI-compatible HTTP API), routes each to a ready instance from an in-memory table (least
//! in-flight of two random choices; no Redis round trip), holds a cold model's requests in a
//! bounded queue while raising a demand event, streams tokens back, and retries elsewhere when a
//! worker fails before the first token. Workers attach to every replica over `Attach` streams.
//!
//! It must never call another service; what it learns of deployments and instances comes from
//! kvstore's event stream, and what it reports (demand, its own address) goes back there.

mod admin;
mod attach;
mod error;
mod grpc;
pub mod openai;
mod ratelimit;
mod request;
mod room;
mod sse;
pub mod stack;
mod sync;
mod table;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use kvstore::Store;
use service::JoinSecrets;
use sllm_api::v1::dispatch_server::DispatchServer;
use tokio_util::sync::CancellationToken;

pub use error::{AttachRefused, DispatchError};
pub use grpc::parse_grpc_timeout;
pub use request::{Event, Events, Input, Job};

/// One entry of `/v1/models`: a deployment or one of its LoRA adapters.
#[derive(Debug, Clone, PartialEq)]
pub struct Listed {
    /// What requests name it by: the deployment's name, or `base:adapter`.
    pub id: String,
    /// When the deployment was created, seconds since the Unix epoch.
    pub created: u64,
    /// The deployment's name, or the adapter's path.
    pub root: String,
    /// For an adapter, its base deployment.
    pub parent: Option<String>,
    /// For an adapter, its name.
    pub adapter: Option<String>,
    /// The context length its engine is started with, where the deployment sets one.
    pub max_model_len: Option<u64>,
}

/// Settings of a Dispatch replica.
#[derive(Debug, Clone)]
pub struct DispatchConfig {
    /// This replica's id.
    pub replica_id: String,
    /// The gRPC endpoint workers attach to (http://host:port); empty: the bound address.
    pub advertise: String,
    /// Secrets worker join tokens are checked against on Attach (several while one is being
    /// rotated).
    pub join_secrets: JoinSecrets,
    /// Longest wait for an Attach stream's `hello` (then DEADLINE_EXCEEDED): a stream that
    /// proves nothing is not kept open.
    pub hello_timeout: Duration,
    /// Most requests held per model while no instance has room.
    pub max_queue: usize,
    /// Longest a request waits for an instance (a client's shorter deadline wins).
    pub max_hold: Duration,
    /// Most requests one instance serves at once (while more instances are starting, no more
    /// than the deployment's `target`).
    pub instance_limit: u32,
    /// Flow-control window: chunks a worker may send for a request ahead of what its client
    /// has read.
    pub window: u32,
    /// Retry hint given with a full queue.
    pub retry_after: Duration,
    /// Attempts per request (a worker failing before the first token costs one).
    pub max_attempts: u32,
    /// Times a stream may move to another instance after output was sent (its instance lost
    /// or draining): the new instance continues after the text already sent. 0: never; the
    /// stream ends with UNAVAILABLE instead.
    pub max_migrations: u32,
    /// max_tokens when a request leaves it 0.
    pub default_max_tokens: u32,
    /// Largest max_tokens accepted.
    pub max_tokens_limit: u32,
    /// Largest prompt (or sum of chat contents) accepted, in bytes.
    pub max_prompt_bytes: usize,
    /// How often demand is reported to kvstore for the Scaler.
    pub report_interval: Duration,
    /// API keys the OpenAI API checks (the gRPC server checks its own).
    pub api_keys: service::auth::ApiKeys,
    /// Failures in a row after which a worker is skipped...
    pub breaker_threshold: u32,
    /// ...for this long.
    pub breaker_cooldown: Duration,
    /// Requests each caller (API key, or IP address without one) may make across all
    /// replicas; each replica decides locally on its share (see docs/operations.md for how
    /// far over the fleet can go); None: unlimited.
    pub rate_limit: Option<kvstore::ratelimit::RateLimit>,
    /// How often this replica refreshes its rate-limit shares in the background.
    pub rate_limit_refresh: Duration,
    /// Most callers a replica keeps rate-limit state for (past it, new callers share one
    /// bucket until idle ones are forgotten).
    pub rate_limit_callers: usize,
}

impl DispatchConfig {
    /// Defaults for replica `replica_id`.
    pub fn new(
        replica_id: impl Into<String>,
        join_secrets: impl Into<JoinSecrets>,
    ) -> DispatchConfig {
        DispatchConfig {
            replica_id: replica_id.into(),
            advertise: String::new(),
            join_secrets: join_secrets.into(),
            // An agent sends its hello as the stream's first frame; seconds cover a slow link.
            hello_timeout: Duration::from_secs(5),
            max_queue: 256,
            // ServerlessLLM's: long enough to load a large checkpoint from cold.
            max_hold: Duration::from_secs(300),
            // vLLM's default max_num_seqs: what one engine batches at once.
            instance_limit: 256,
            window: 32,
            retry_after: Duration::from_secs(1),
            max_attempts: 3,
            max_migrations: 3,
            default_max_tokens: 256,
            max_tokens_limit: 32_768,
            max_prompt_bytes: 1 << 20,
            report_interval: Duration::from_millis(250),
            breaker_threshold: 3,
            breaker_cooldown: Duration::from_secs(5),
            api_keys: service::auth::ApiKeys::default(),
            rate_limit: None,
            rate_limit_refresh: Duration::from_millis(200),
            rate_limit_callers: 65_536,
        }
    }
}

/// The gRPC Dispatch service behind its edge (stages 1–3 of [`stack`]).
pub type GrpcService = stack::Edge<stack::Grpc, DispatchServer<Dispatch>>;

/// A Dispatch replica. Cheap to clone.
#[derive(Clone)]
pub struct Dispatch {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) store: Store,
    pub(crate) config: DispatchConfig,
    pub(crate) table: Arc<table::Table>,
    request_ids: AtomicU64,
    /// Model names found not deployed, and when: not read again for a moment.
    unknown: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
    limiter: Option<ratelimit::Limiter>,
    /// Client requests accepted and not yet ended (what a drain waits for).
    pub(crate) requests: Arc<AtomicUsize>,
    /// Cancelled when the replica starts draining: it stops registering for new Attach streams.
    pub(crate) draining: CancellationToken,
    /// Cancelled when the replica closes: its Attach streams end.
    pub(crate) closed: CancellationToken,
}

/// One client request from its submission until its driver ends; counted in
/// `Inner::requests` so that a drain knows when the last one is over.
pub(crate) struct Accepted(Arc<AtomicUsize>);

impl Accepted {
    fn new(count: &Arc<AtomicUsize>) -> Accepted {
        count.fetch_add(1, Ordering::Relaxed);
        Accepted(count.clone())
    }
}

impl Drop for Accepted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How long a name found not deployed is answered from memory.
const UNKNOWN_TTL: Duration = Duration::from_secs(1);

impl Inner {
    /// Takes a token from the caller's local bucket when a rate limit is set; never waits on
    /// Redis (shares are refreshed in the background).
    pub(crate) fn take_token(
        &self,
        authorization: Option<&str>,
        peer: Option<std::net::IpAddr>,
    ) -> Result<(), error::DispatchError> {
        let (Some(limit), Some(limiter)) = (self.config.rate_limit, &self.limiter) else {
            return Ok(());
        };
        // Unchecked keys prove nothing (a caller could send a new one each time): without API
        // keys, callers are told apart by address.
        let authorization = authorization.filter(|_| self.config.api_keys.enabled());
        let caller = service::auth::caller_id(authorization, peer);
        limiter.take(&caller).map_err(|retry_after| {
            telemetry::metrics::DISPATCH.rate_limited.inc();
            error::DispatchError::RateLimited { retry_after, limit }
        })
    }

    /// Whether `model` was found not deployed less than [`UNKNOWN_TTL`] ago.
    pub(crate) fn known_unknown(&self, model: &str) -> bool {
        let Ok(unknown) = self.unknown.lock() else { return false };
        unknown.get(model).is_some_and(|t| t.elapsed() < UNKNOWN_TTL)
    }

    /// Remembers that `model` is not deployed (bounded: old marks go first).
    pub(crate) fn remember_unknown(&self, model: &str) {
        let Ok(mut unknown) = self.unknown.lock() else { return };
        if unknown.len() >= 4096 {
            unknown.retain(|_, t| t.elapsed() < UNKNOWN_TTL);
            if unknown.len() >= 4096 {
                unknown.clear();
            }
        }
        unknown.insert(model.to_string(), std::time::Instant::now());
    }

    /// Forgets that `model` was not deployed (its deployment event arrived).
    pub(crate) fn forget_unknown(&self, model: &str) {
        if let Ok(mut unknown) = self.unknown.lock() {
            unknown.remove(model);
        }
    }

    pub(crate) fn next_request_id(&self) -> u64 {
        self.request_ids.fetch_add(1, Ordering::Relaxed)
    }

    /// Raises a demand event for a model with no ready instance here (at most twice a second
    /// per model unless `first`; never waits on Redis).
    pub(crate) fn raise_demand(&self, route: &table::ModelRoute, first: bool, traceparent: &str) {
        let every = if first { Duration::from_millis(100) } else { Duration::from_millis(500) };
        if !route.demand_due(every) {
            return;
        }
        let store = self.store.clone();
        let reporter = self.config.replica_id.clone();
        let model = route.name.clone();
        let queued = route.waiting.load(Ordering::Relaxed).max(1);
        let traceparent = traceparent.to_string();
        // In the caller's span (a held request's `queue wait`), so the Redis call is in its
        // trace.
        tokio::spawn(tracing::Instrument::in_current_span(async move {
            if let Err(e) =
                store.publish_demand_traced(&reporter, &model, queued, &traceparent).await
            {
                tracing::warn!(%model, error = %e, "cannot raise a demand event");
            }
        }));
    }
}

impl Dispatch {
    /// A replica over `store`. Call [`Dispatch::serve`] to load its table and serve.
    pub fn new(store: Store, config: DispatchConfig) -> Dispatch {
        let limiter = config.rate_limit.map(|limit| {
            ratelimit::Limiter::new(
                store.clone(),
                config.replica_id.clone(),
                limit,
                config.rate_limit_refresh,
                config.rate_limit_callers,
            )
        });
        Dispatch {
            inner: Arc::new(Inner {
                limiter,
                store,
                table: Arc::new(table::Table::new(config.instance_limit)),
                config,
                request_ids: AtomicU64::new(1),
                unknown: std::sync::Mutex::default(),
                requests: Arc::new(AtomicUsize::new(0)),
                draining: CancellationToken::new(),
                closed: CancellationToken::new(),
            }),
        }
    }

    /// Serves gRPC (Dispatch with health and reflection) on `grpc` and the OpenAI API on
    /// `http`, after loading the routing table; keeps the table current, reports demand and
    /// registers the replica, until `shutdown`.
    pub async fn serve(
        self,
        grpc: service::Listener,
        http: service::Listener,
        shutdown: CancellationToken,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let advertise = if self.inner.config.advertise.is_empty() {
            format!("http://{}", grpc.local_addr())
        } else {
            self.inner.config.advertise.clone()
        };
        let position = sync::load(&self.inner, &shutdown).await;
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter.set_serving::<DispatchServer<Dispatch>>().await;
        let grpc_server = tonic::transport::Server::builder()
            .max_concurrent_streams(Some(service::MAX_CONCURRENT_STREAMS))
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .add_service(health)
            .add_service(service::reflection_v1()?)
            .add_service(service::reflection_v1alpha()?)
            .add_service(self.service(4 << 20))
            .serve_with_incoming_shutdown(grpc.incoming(), shutdown.clone().cancelled_owned());
        let http_server = openai::serve(self.clone(), http, shutdown.clone());
        // The Attach streams end with the replica, or the server would wait for them forever.
        let close = async {
            shutdown.cancelled().await;
            self.close();
        };
        let (g, h, (), ()) = tokio::join!(
            grpc_server,
            http_server,
            sync::run(self.inner.clone(), position, advertise, shutdown.clone()),
            close
        );
        g?;
        h?;
        Ok(())
    }

    /// The gRPC service (Generate, Attach), to mount on a shared server after
    /// [`Dispatch::load`], with [`Dispatch::run_background`] and [`Dispatch::serve_openai`]
    /// beside it.
    pub fn service(&self, max_message_bytes: usize) -> GrpcService {
        let server = DispatchServer::new(self.clone()).max_decoding_message_size(max_message_bytes);
        tower::Layer::layer(&stack::EdgeLayer::new(self.inner.clone()), server)
    }

    /// Loads the routing table (retrying until Redis answers); returns the event position to
    /// keep it current from.
    pub async fn load(&self, shutdown: &CancellationToken) -> kvstore::Position {
        sync::load(&self.inner, shutdown).await
    }

    /// Keeps the table current, reports demand and keeps the replica registered under
    /// `advertise` (the endpoint workers attach to), until `shutdown`.
    pub async fn run_background(
        &self,
        position: kvstore::Position,
        advertise: String,
        shutdown: CancellationToken,
    ) {
        sync::run(self.inner.clone(), position, advertise, shutdown).await
    }

    /// Serves the OpenAI-compatible HTTP API on `listener` until `shutdown`.
    pub async fn serve_openai(
        &self,
        listener: service::Listener,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        openai::serve(self.clone(), listener, shutdown).await
    }

    /// Starts a graceful stop: the replica stops registering itself for new Attach streams (its
    /// listeners are the caller's to close), then waits until every client request it accepted
    /// has ended, or `grace` has passed. Returns how many requests were still going. Routing,
    /// demand reports and the Attach streams carry on meanwhile, so held requests still start
    /// and streams still finish; [`Dispatch::close`] ends the Attach streams afterwards.
    pub async fn drain(&self, grace: Duration) -> usize {
        self.inner.draining.cancel();
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let left = self.in_flight();
            if left == 0 || tokio::time::Instant::now() >= deadline {
                return left;
            }
            // Polled, not signalled: the request path pays one atomic add and one subtract.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Client requests accepted and not yet ended.
    pub fn in_flight(&self) -> usize {
        self.inner.requests.load(Ordering::Relaxed)
    }

    /// Ends every Attach stream (the workers keep their other replicas' streams), so a gRPC
    /// server shutting down gracefully is not held open by them.
    pub fn close(&self) {
        self.inner.draining.cancel();
        self.inner.closed.cancel();
    }

    /// The deployments this replica routes (not being deleted) and their LoRA adapters, sorted
    /// by name, each adapter after its base model.
    pub fn listing(&self) -> Vec<Listed> {
        let mut routes: Vec<_> = self
            .inner
            .table
            .models()
            .into_iter()
            .filter(|m| !m.deleting.load(Ordering::Relaxed))
            .collect();
        routes.sort_by(|a, b| a.name.cmp(&b.name));
        let mut out = Vec::new();
        for route in routes {
            let mut info = route.info();
            info.adapters.sort_by(|a, b| a.name.cmp(&b.name));
            out.push(Listed {
                id: route.name.clone(),
                created: info.created_s,
                root: route.name.clone(),
                parent: None,
                adapter: None,
                max_model_len: info.max_model_len,
            });
            for a in info.adapters {
                out.push(Listed {
                    id: format!("{}:{}", route.name, a.name),
                    created: info.created_s,
                    root: a.path,
                    parent: Some(route.name.clone()),
                    adapter: Some(a.name),
                    max_model_len: info.max_model_len,
                });
            }
        }
        out
    }

    /// Names of the deployments this replica routes (not being deleted), sorted.
    pub fn models(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .inner
            .table
            .models()
            .into_iter()
            .filter(|m| !m.deleting.load(Ordering::Relaxed))
            .map(|m| m.name.clone())
            .collect();
        names.sort();
        names
    }
}
