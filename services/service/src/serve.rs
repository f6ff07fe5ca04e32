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

/// A bound TCP listener.
pub struct Listener {
    inner: TcpListener,
    addr: SocketAddr,
}

impl Listener {
    /// Binds `addr` (port 0 picks a free port).
    pub async fn bind(addr: &str) -> std::io::Result<Listener> {
        let inner = TcpListener::bind(addr)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
        let addr = inner.local_addr()?;
        Ok(Listener { inner, addr })
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
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async {
            (
                [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                telemetry::metrics::gather(),
            )
        }),
    );
    axum::serve(listener.into_tokio(), app).with_graceful_shutdown(shutdown.cancelled_owned()).await
}
