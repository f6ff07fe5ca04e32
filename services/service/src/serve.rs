//! Serving a tonic router: a listener bound by us (so tests can use port 0 and learn the port),
//! TCP_NODELAY on every accepted connection (tonic's `serve_with_incoming` ignores the builder's
//! setting, and without it small gRPC messages wait for Nagle: 10-100x the latency), gRPC
//! reflection in both protocol versions (grpcurl 1.8 only speaks v1alpha), and shutdown on
//! SIGINT / SIGTERM.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio_stream::Stream;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;

/// Most concurrent streams one HTTP/2 connection may hold open on an sllm gRPC server (the
/// SETTINGS_MAX_CONCURRENT_STREAMS every server advertises; a client past it waits for a
/// stream to end, it is not refused).
///
/// Large enough for the request path: a gateway or SDK channel multiplexes many Generate
/// streams on one connection (one instance alone takes up to 256 at once, and a cold model
/// holds up to 256 more per replica), and a host of simulated agents shares one connection
/// for hundreds of Session and Attach streams; 4,096 lets one connection drive sixteen busy
/// instances. Small enough that one connection cannot open streams without bound: each costs
/// a task and buffers, and a stream that never authenticates holds them until its first-message
/// deadline (5 s) passes, so one connection pins at most this many at a time.
pub const MAX_CONCURRENT_STREAMS: u32 = 4096;

/// A bound TCP listener, with TLS for the HTTP servers on it if configured.
pub struct Listener {
    inner: TcpListener,
    addr: SocketAddr,
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
}

impl Listener {
    /// Binds `addr` (port 0 picks a free port).
    pub async fn bind(addr: &str) -> std::io::Result<Listener> {
        let inner = TcpListener::bind(addr)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
        let addr = inner.local_addr()?;
        Ok(Listener { inner, addr, tls: None })
    }

    /// HTTP served with [`serve_http`] on this listener speaks TLS. (gRPC servers take their
    /// TLS from tonic's `Server::tls_config`.)
    pub fn with_tls(mut self, config: std::sync::Arc<rustls::ServerConfig>) -> Listener {
        self.tls = Some(config);
        self
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The tokio listener itself (for HTTP servers that accept on their own; set TCP_NODELAY
    /// on what they accept).
    pub fn into_tokio(self) -> TcpListener {
        self.inner
    }

    /// Accepted connections, each with TCP_NODELAY set.
    pub fn incoming(self) -> impl Stream<Item = std::io::Result<TcpStream>> {
        TcpListenerStream::new(self.inner).map(|conn| {
            let conn = conn?;
            conn.set_nodelay(true)?;
            Ok(conn)
        })
    }
}

/// Serves `app` over HTTP/1.1 and HTTP/2 on `listener` until `shutdown`: TCP_NODELAY on every
/// connection (small SSE chunks must not wait for Nagle), TLS if the listener has it. Handlers
/// find the peer's address as `ConnectInfo<SocketAddr>`.
pub async fn serve_http(
    listener: Listener,
    app: axum::Router,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    match listener.tls {
        None => {
            let l = listener.inner.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            axum::serve(l, app.into_make_service_with_connect_info::<SocketAddr>())
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await
        }
        Some(config) => {
            // Wrapped (with nothing to do) so axum hands handlers the peer address.
            let l = TlsListener::new(listener.inner, listener.addr, config).tap_io(|_| {});
            axum::serve(l, app.into_make_service_with_connect_info::<SocketAddr>())
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await
        }
    }
}

/// Accepts TCP connections and completes TLS handshakes in tasks of their own (a slow or
/// hostile client cannot hold up the others), handing over the finished ones.
struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(tokio_rustls::server::TlsStream<TcpStream>, SocketAddr)>,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    fn new(
        inner: TcpListener,
        addr: SocketAddr,
        config: std::sync::Arc<rustls::ServerConfig>,
    ) -> TlsListener {
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let task = tokio::spawn(async move {
            loop {
                let (tcp, peer) = match inner.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let handshake = tokio::time::timeout(
                        std::time::Duration::from_secs(10),
                        acceptor.accept(tcp),
                    );
                    match handshake.await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        TlsListener { ready, addr, task }
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept task ended (only when dropped): nothing will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

/// The reflection service (v1) over every sllm proto.
pub fn reflection_v1() -> Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::Error,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sllm_api::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
}

/// The reflection service (v1alpha, for grpcurl 1.8) over every sllm proto.
pub fn reflection_v1alpha() -> Result<
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
    tonic_reflection::server::Error,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sllm_api::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// Serves Prometheus text (every metric of this process) on `GET /metrics` until `shutdown`.
pub async fn serve_metrics(
    listener: Listener,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    serve_metrics_guarded(listener, crate::auth::ApiKeys::default(), shutdown).await
}

/// Like [`serve_metrics`], but a scrape must send `authorization: Bearer <admin key>` when
/// `keys` holds any (401 without a valid key, 403 with an inference key).
pub async fn serve_metrics_guarded(
    listener: Listener,
    keys: crate::auth::ApiKeys,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    use axum::http::{StatusCode, header};
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move |headers: axum::http::HeaderMap| async move {
            let checked =
                keys.check_header(headers.get(header::AUTHORIZATION), crate::auth::Needed::Admin);
            let (status, body) = match checked {
                Ok(()) => (StatusCode::OK, telemetry::metrics::gather()),
                Err(crate::auth::Refused::Unauthenticated(m)) => (StatusCode::UNAUTHORIZED, m),
                Err(crate::auth::Refused::PermissionDenied(m)) => (StatusCode::FORBIDDEN, m),
            };
            let content_type =
                if status == StatusCode::OK { "text/plain; version=0.0.4" } else { "text/plain" };
            (status, [(header::CONTENT_TYPE, content_type)], body)
        }),
    );
    serve_http(listener, app, shutdown).await
}
