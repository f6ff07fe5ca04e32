//! Connections. A deadpool-redis pool opens and bounds them; ordinary operations share a few
//! long-lived multiplexed connections ("lanes") taken from it once, so no operation pays the
//! pool's per-checkout health check (a PING round trip). A lane whose connection broke is put
//! back empty and refilled from the pool on next use. Blocking reads get a connection of their
//! own, since a blocked connection would stall everything multiplexed on it.
//!
//! A lane can also die while idle (Redis restarted). A write that fails on a broken connection
//! cannot be retried blindly (it may have run), so a lane idle for longer than
//! [`IDLE_CHECK`] is checked with a PING before it is lent: after a restart the first write
//! gets a live connection, and busy lanes pay nothing.
//!
//! A call that outlasts the response timeout does not break its connection: Redis is slow (a
//! fork, a slow disk, a starved CPU) and the answer, when it comes, is dropped. Replacing the
//! lanes then would only add connections and handshakes to a Redis that is already behind. A
//! lane is replaced on a timeout only when it has had no answer at all for
//! [`STUCK_AFTER_TIMEOUTS`] response timeouts: a connection whose peer vanished without a
//! reset (a half-open TCP connection) shows as nothing but timeouts.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// A lane unused for this long is checked before use.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// A lane that times out after no answer for this many response timeouts is replaced.
const STUCK_AFTER_TIMEOUTS: u32 = 5;

use deadpool_redis::{Pool, PoolConfig, Runtime, Timeouts};
use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;

use crate::config::StoreConfig;
use crate::error::{Error, Result};

pub(crate) struct Connections {
    backend: Backend,
}

enum Backend {
    /// One server (or a proxy): a deadpool pool and lanes taken from it.
    Pooled(Pooled),
    /// A Redis Cluster: one cluster connection shared by all ordinary operations (it is
    /// multiplexed, follows MOVED/ASK and reconnects by itself), one more per blocking reader.
    Cluster(Box<Clustered>),
}

struct Clustered {
    client: redis::cluster::ClusterClient,
    shared: tokio::sync::Mutex<Option<ClusterConnection>>,
}

struct Pooled {
    pool: Pool,
    lanes: Vec<Mutex<Option<deadpool_redis::Connection>>>,
    /// When each lane was last lent, in ms since `epoch`.
    last_used: Vec<AtomicU64>,
    /// When each lane last had an answer (or was filled), in ms since `epoch`.
    last_answer: Vec<AtomicU64>,
    /// How long a lane may go without an answer before a timeout on it replaces it (ms).
    stuck_after_ms: u64,
    epoch: Instant,
    next: AtomicUsize,
}

/// A connection of any backend.
pub(crate) enum Conn {
    Shared(MultiplexedConnection),
    Pooled(deadpool_redis::Connection),
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Shared(c) => c.req_packed_command(cmd),
            Conn::Pooled(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Shared(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Pooled(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Shared(c) => c.get_db(),
            Conn::Pooled(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// A connection lent for one operation, with a way to report that it broke.
pub(crate) struct Lent<'a> {
    pub(crate) conn: Conn,
    owner: &'a Connections,
    /// The lane it came from (none for a cluster connection).
    lane: Option<usize>,
}

impl Lent<'_> {
    /// Passes a result through. A broken connection empties every lane: when one breaks the
    /// usual cause (Redis restarted, a failover, the network) has broken the others too, and
    /// each would otherwise fail one more caller before being replaced. A timeout replaces
    /// only its own lane, and only when that lane has answered nothing for a long while.
    pub(crate) fn check<T>(&self, r: redis::RedisResult<T>) -> Result<T> {
        let (Backend::Pooled(p), Some(lane)) = (&self.owner.backend, self.lane) else {
            return r.map_err(Error::Redis);
        };
        match r {
            Ok(v) => {
                p.last_answer[lane].store(p.now_ms(), Ordering::Relaxed);
                Ok(v)
            }
            Err(e) => {
                // A reply Redis sent (an error reply, a script error) is an answer too.
                if !is_broken(&e) && !e.is_timeout() {
                    p.last_answer[lane].store(p.now_ms(), Ordering::Relaxed);
                } else if is_broken(&e) {
                    self.owner.reset_lanes();
                } else if p.now_ms().saturating_sub(p.last_answer[lane].load(Ordering::Relaxed))
                    > p.stuck_after_ms
                    && p.reset_lane(lane)
                {
                    tracing::warn!(
                        lane,
                        "a Redis connection answered nothing for {} ms; replacing it",
                        p.stuck_after_ms
                    );
                }
                Err(Error::Redis(e))
            }
        }
    }
}

/// Whether an error means the connection itself is unusable. A timeout does not: the
/// connection is fine, Redis is slow (see the module's comment).
pub(crate) fn is_broken(e: &redis::RedisError) -> bool {
    !e.is_timeout() && (e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error())
}

impl Connections {
    pub(crate) fn new(config: &StoreConfig) -> Result<Connections> {
        let url = normalise_url(&config.url)?;
        if url.starts_with("rediss") {
            // rustls needs one process-wide crypto provider; an error means one is set already.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let certs = tls_certificates(config)?;
        if certs.is_some() && !url.starts_with("rediss") {
            return Err(Error::invalid(
                "redis_url",
                "TLS files were given, so the URL must be rediss:// (or rediss+cluster://)",
            ));
        }
        if let Some(nodes) = cluster_nodes(&url) {
            let mut builder = redis::cluster::ClusterClientBuilder::new(nodes)
                .connection_timeout(config.connect_timeout)
                .response_timeout(config.response_timeout);
            if let Some(certs) = certs {
                builder = builder.certs(certs);
            }
            let client = builder.build().map_err(|e| Error::invalid("redis_url", e.to_string()))?;
            return Ok(Connections {
                backend: Backend::Cluster(Box::new(Clustered {
                    client,
                    shared: tokio::sync::Mutex::new(None),
                })),
            });
        }
        let connection_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.response_timeout));
        let manager = match certs {
            Some(certs) => {
                let client = redis::Client::build_with_tls(url, certs)
                    .map_err(|e| Error::invalid("redis_url", e.to_string()))?;
                deadpool_redis::Manager::new_with_config(
                    client.get_connection_info().clone(),
                    connection_config,
                )
            }
            None => deadpool_redis::Manager::new_with_config(url, connection_config),
        }
        .map_err(|e| Error::invalid("redis_url", e.to_string()))?;
        let mut pool_config = PoolConfig::new(config.pool_size.max(config.lanes + 1));
        pool_config.timeouts = Timeouts {
            wait: Some(config.wait_timeout),
            create: Some(config.connect_timeout),
            recycle: Some(config.response_timeout),
        };
        let pool = Pool::builder(manager)
            .config(pool_config)
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| Error::Pool(e.to_string()))?;
        let lanes = (0..config.lanes.max(1)).map(|_| Mutex::new(None)).collect();
        let last_used = (0..config.lanes.max(1)).map(|_| AtomicU64::new(0)).collect();
        let last_answer = (0..config.lanes.max(1)).map(|_| AtomicU64::new(0)).collect();
        Ok(Connections {
            backend: Backend::Pooled(Pooled {
                pool,
                lanes,
                last_used,
                last_answer,
                stuck_after_ms: (config.response_timeout * STUCK_AFTER_TIMEOUTS).as_millis() as u64,
                epoch: Instant::now(),
                next: AtomicUsize::new(0),
            }),
        })
    }

    /// A shared multiplexed connection for one non-blocking operation.
    pub(crate) async fn shared(&self) -> Result<Lent<'_>> {
        let p = match &self.backend {
            Backend::Pooled(p) => p,
            Backend::Cluster(c) => {
                let mut slot = c.shared.lock().await;
                if let Some(c) = slot.as_ref() {
                    return Ok(Lent { conn: Conn::Cluster(c.clone()), owner: self, lane: None });
                }
                let conn = c.client.get_async_connection().await.map_err(Error::Redis)?;
                *slot = Some(conn.clone());
                return Ok(Lent { conn: Conn::Cluster(conn), owner: self, lane: None });
            }
        };
        let i = p.next.fetch_add(1, Ordering::Relaxed) % p.lanes.len();
        let lane = &p.lanes[i];
        let now = p.now_ms();
        let idle = now.saturating_sub(p.last_used[i].swap(now, Ordering::Relaxed));
        let lent = |conn| Lent { conn: Conn::Shared(conn), owner: self, lane: Some(i) };
        if let Some(mut conn) =
            lane.lock().ok().and_then(|slot| slot.as_ref().map(|c| (**c).clone()))
        {
            if idle < IDLE_CHECK.as_millis() as u64 {
                return Ok(lent(conn));
            }
            let pong: redis::RedisResult<()> = redis::cmd("PING").query_async(&mut conn).await;
            match pong {
                Ok(()) => {
                    p.last_answer[i].store(p.now_ms(), Ordering::Relaxed);
                    return Ok(lent(conn));
                }
                Err(e) if is_broken(&e) => self.reset_lanes(),
                Err(_) => return Ok(lent(conn)),
            }
        }
        let fresh = p.pool.get().await.map_err(|e| Error::Pool(e.to_string()))?;
        p.report_pool();
        let conn = (*fresh).clone();
        if let Ok(mut slot) = lane.lock()
            && slot.is_none()
        {
            *slot = Some(fresh);
            p.last_answer[i].store(p.now_ms(), Ordering::Relaxed);
        }
        Ok(lent(conn))
    }

    fn reset_lanes(&self) {
        match &self.backend {
            Backend::Pooled(p) => {
                for i in 0..p.lanes.len() {
                    p.reset_lane(i);
                }
            }
            // The cluster connection reconnects to the nodes itself.
            Backend::Cluster(_) => {}
        }
    }

    /// A connection of its own, for blocking reads; a pooled one goes back when dropped.
    pub(crate) async fn dedicated(&self) -> Result<Conn> {
        match &self.backend {
            Backend::Pooled(p) => {
                let conn = p.pool.get().await.map_err(|e| Error::Pool(e.to_string()));
                p.report_pool();
                conn.map(Conn::Pooled)
            }
            Backend::Cluster(c) => {
                c.client.get_async_connection().await.map(Conn::Cluster).map_err(Error::Redis)
            }
        }
    }
}

impl Pooled {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Empties lane `i`; the next operation on it takes a fresh connection from the pool.
    /// Whether it held one. Its clock of answers starts again, so the calls still waiting on
    /// the old connection do not replace the new one as they time out.
    fn reset_lane(&self, i: usize) -> bool {
        if let Some(t) = self.last_answer.get(i) {
            t.store(self.now_ms(), Ordering::Relaxed);
        }
        match self.lanes.get(i).map(|lane| lane.lock()) {
            Some(Ok(mut slot)) => slot.take().is_some(),
            _ => false,
        }
    }

    /// Publishes the pool's use as a metric (when connections are taken, not per call).
    fn report_pool(&self) {
        let s = self.pool.status();
        let pool = &telemetry::metrics::REDIS.pool;
        pool.with_label_values(&["in_use"]).set((s.size - s.available) as i64);
        pool.with_label_values(&["idle"]).set(s.available as i64);
    }
}

/// The CA and client identity for `rediss://`, read from the configured PEM files.
fn tls_certificates(config: &StoreConfig) -> Result<Option<redis::TlsCertificates>> {
    let read = |field: &'static str, p: &std::path::Path| {
        std::fs::read(p).map_err(|e| Error::invalid(field, format!("{}: {e}", p.display())))
    };
    let root_cert = match &config.tls_ca {
        Some(p) => Some(read("redis_tls_ca", p)?),
        None => None,
    };
    let client_tls = match &config.tls_client {
        Some((c, k)) => Some(redis::ClientTlsConfig {
            client_cert: read("redis_tls_cert", c)?,
            client_key: read("redis_tls_key", k)?,
        }),
        None => None,
    };
    if root_cert.is_none() && client_tls.is_none() {
        return Ok(None);
    }
    Ok(Some(redis::TlsCertificates { client_tls, root_cert }))
}

/// The node URLs of a `redis+cluster://a:1,b:2` (or `rediss+cluster://`) URL; None for any
/// other form. Credentials given once apply to every node.
fn cluster_nodes(url: &str) -> Option<Vec<String>> {
    let (scheme, rest) = if let Some(r) = url.strip_prefix("redis+cluster://") {
        ("redis", r)
    } else {
        ("rediss", url.strip_prefix("rediss+cluster://")?)
    };
    let (auth, hosts) = match rest.rsplit_once('@') {
        Some((a, h)) => (format!("{a}@"), h),
        None => (String::new(), rest),
    };
    let hosts = hosts.trim_end_matches('/');
    Some(
        hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| format!("{scheme}://{auth}{h}"))
            .collect(),
    )
}

/// Accepts `unix:///path` as well as the redis crate's own URL forms.
fn normalise_url(url: &str) -> Result<String> {
    if url.is_empty() {
        return Err(Error::invalid("redis_url", "must not be empty"));
    }
    let ok = [
        "redis://",
        "rediss://",
        "unix://",
        "redis+unix://",
        "redis+cluster://",
        "rediss+cluster://",
    ]
    .iter()
    .any(|p| url.starts_with(p));
    if !ok {
        return Err(Error::invalid(
            "redis_url",
            format!(
                "{url:?} must start with redis://, rediss://, unix://, or redis+cluster:// \
                 (rediss+cluster://) for a Redis Cluster"
            ),
        ));
    }
    if cluster_nodes(url).is_some_and(|n| n.is_empty()) {
        return Err(Error::invalid("redis_url", "a cluster URL must name at least one node"));
    }
    Ok(url.to_string())
}

impl crate::Store {
    /// Runs a read-only command. A read is idempotent, so one that hit a broken connection, or
    /// timed out, is tried once more before the error reaches the caller.
    pub(crate) async fn read<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T> {
        let _timer = telemetry::metrics::REDIS.duration.with_label_values(&["read"]).start_timer();
        let mut last = None;
        for _ in 0..2 {
            let mut conn = self.inner.conns.shared().await?;
            let r = cmd.query_async(&mut conn.conn).await;
            match conn.check(r) {
                Err(Error::Redis(e)) if is_broken(&e) || e.is_timeout() => last = Some(e),
                other => return other,
            }
        }
        Err(last.map(Error::Redis).unwrap_or_else(|| Error::Pool("no connection".into())))
    }

    /// Like [`crate::Store::read`], for a pipeline of read-only commands.
    pub(crate) async fn read_pipe<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T> {
        let _timer =
            telemetry::metrics::REDIS.duration.with_label_values(&["read_pipeline"]).start_timer();
        let mut last = None;
        for _ in 0..2 {
            let mut conn = self.inner.conns.shared().await?;
            let r = pipe.query_async(&mut conn.conn).await;
            match conn.check(r) {
                Err(Error::Redis(e)) if is_broken(&e) || e.is_timeout() => last = Some(e),
                other => return other,
            }
        }
        Err(last.map(Error::Redis).unwrap_or_else(|| Error::Pool("no connection".into())))
    }
}
