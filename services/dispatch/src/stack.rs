//! The request path's cross-cutting behaviour, in one place and in the order a request meets it.
//!
//! ```text
//!  gRPC Generate ─┐                                              ┌─ 5 waiting room ─ 6 attempt ─┐
//!                 ├─ 1 auth ─ 2 deadline ─ 3 rate limit ─ 4 validate                            ├─ 7 outcome
//!  OpenAI HTTP ───┘        (the Edge tower layer)                └──── retry policy ◀── failed ─┘
//! ```
//!
//! | stage | where | refusal |
//! |---|---|---|
//! | 1 auth | HTTP: [`Edge`]; gRPC: `service::auth::AuthLayer`, the shared server's layer. Both call `ApiKeys::check_header` | 401/403, UNAUTHENTICATED / PERMISSION_DENIED |
//! | 2 deadline | [`Edge`] parses `grpc-timeout`; `Job::deadline` merges the body's `timeout_ms`; the waiting room is bounded by `--max-hold-s` whatever the client says | a malformed header: INVALID_ARGUMENT naming it; passing it: DEADLINE_EXCEEDED / 504 |
//! | 3 rate limit | [`Edge`]: a token from the caller's local bucket, never a Redis call (`ratelimit`) | RESOURCE_EXHAUSTED / 429 with `retry-after` |
//! | 4 validation | `request::validate`: every field, named when refused | INVALID_ARGUMENT / 400 |
//! | 5 admission and shedding | `room`: a free place on an instance, else a place in the model's FIFO queue, else refused | RESOURCE_EXHAUSTED / 429 with `retry-after`; FAILED_PRECONDITION / 503 when no worker can hold the model |
//! | 6 retry | [`Retry`]: which failures move to another instance, how often, with which pause | UNAVAILABLE / 503 once they are spent |
//! | 7 outcome | [`record`]: the `model, outcome` counter and duration histogram, once per request | — |
//!
//! Stages 1–3 read only headers, so they are one tower layer in front of both surfaces' handlers;
//! 4–7 need the decoded request and run in `request`, which calls the pieces defined here.

use std::future::{Ready, ready};
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::Either;

use crate::Inner;
use crate::error::DispatchError;

/// What the edge learned from a request's headers, for its handler (a request extension).
#[derive(Clone, Copy, Debug, Default)]
pub struct Entry {
    /// The client's own deadline from its headers (`grpc-timeout`), if it sent one.
    pub(crate) deadline: Option<Instant>,
}

/// How one client protocol names its requests and writes a refusal.
pub trait Surface: Send + Sync + 'static {
    /// The protocol's response body.
    type Body: Send + 'static;
    /// What a request on `method path` needs: an API key's scope, and whether it is an
    /// inference request (rate-limited).
    fn classify(method: &http::Method, path: &str) -> (service::auth::Needed, bool);
    /// Whether the edge checks API keys itself (else a server-wide layer already did).
    const CHECKS_KEYS: bool;
    /// The client's deadline from its headers.
    fn deadline(headers: &http::HeaderMap) -> Result<Option<Instant>, DispatchError>;
    /// The caller's address.
    fn peer<B>(req: &http::Request<B>) -> Option<std::net::IpAddr>;
    /// The refusal `e` in the protocol's own shape.
    fn refuse(e: &DispatchError) -> http::Response<Self::Body>;
    /// An API key's refusal in the protocol's own shape.
    fn refuse_key(r: service::auth::Refused) -> http::Response<Self::Body>;
}

/// Stages 1–3 as a tower layer over one surface's service.
pub(crate) struct EdgeLayer<S> {
    inner: Arc<Inner>,
    surface: PhantomData<fn() -> S>,
}

impl<S> EdgeLayer<S> {
    pub(crate) fn new(inner: Arc<Inner>) -> EdgeLayer<S> {
        EdgeLayer { inner, surface: PhantomData }
    }
}

impl<S> Clone for EdgeLayer<S> {
    fn clone(&self) -> Self {
        EdgeLayer::new(self.inner.clone())
    }
}

impl<S, T> tower::Layer<T> for EdgeLayer<S> {
    type Service = Edge<S, T>;
    fn layer(&self, service: T) -> Edge<S, T> {
        Edge { inner: self.inner.clone(), service, surface: PhantomData }
    }
}

/// The service [`EdgeLayer`] makes.
pub struct Edge<S, T> {
    inner: Arc<Inner>,
    service: T,
    surface: PhantomData<fn() -> S>,
}

impl<S, T: Clone> Clone for Edge<S, T> {
    fn clone(&self) -> Self {
        Edge { inner: self.inner.clone(), service: self.service.clone(), surface: PhantomData }
    }
}

impl<S: Surface, T: tonic::server::NamedService> tonic::server::NamedService for Edge<S, T> {
    const NAME: &'static str = T::NAME;
}

impl<S, T, B> tower::Service<http::Request<B>> for Edge<S, T>
where
    S: Surface,
    T: tower::Service<http::Request<B>, Response = http::Response<S::Body>>,
{
    type Response = http::Response<S::Body>;
    type Error = T::Error;
    type Future = Either<Ready<Result<Self::Response, T::Error>>, T::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.service.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let (needed, inference) = S::classify(req.method(), req.uri().path());
        let headers = req.headers();
        // 1. Auth.
        if S::CHECKS_KEYS
            && let Err(r) =
                self.inner.config.api_keys.check_header(headers.get("authorization"), needed)
        {
            return Either::Left(ready(Ok(S::refuse_key(r))));
        }
        if inference {
            // 2. The client's deadline: a malformed one is refused before it costs a token.
            let deadline = match S::deadline(headers) {
                Ok(d) => d,
                Err(e) => return Either::Left(ready(Ok(S::refuse(&e)))),
            };
            // 3. The caller's rate limit.
            let authorization = headers.get("authorization").and_then(|v| v.to_str().ok());
            let peer = S::peer(&req);
            if let Err(e) = self.inner.take_token(authorization, peer) {
                return Either::Left(ready(Ok(S::refuse(&e))));
            }
            req.extensions_mut().insert(Entry { deadline });
        }
        Either::Right(self.service.call(req))
    }
}

/// Stage 6: which failed attempts move to another instance, how many times, and the pause
/// between them (tokio-retry's exponential backoff with full jitter: `service::retry`, the
/// workspace's one policy).
pub(crate) struct Retry {
    attempts: u32,
    max_attempts: u32,
    backoff: Box<dyn Iterator<Item = Duration> + Send>,
}

/// What a failed attempt says about the next one.
pub(crate) enum Fault {
    /// The instance failed (its stream cut, its worker lost, its engine gone, or an unknown
    /// error): another instance may well succeed.
    Instance(String),
    /// The request failed for a reason another instance would not change (the engine refused
    /// it, stalled, or broke the limits it was given): the client gets this error.
    Request(DispatchError),
}

impl Fault {
    /// Sorts a worker's error by its gRPC code: UNAVAILABLE, UNKNOWN (and a code of OK, which
    /// no error should carry) blame the instance; every other code is the engine's answer to
    /// this request.
    pub(crate) fn of_worker_error(e: sllm_api::v1::WorkerError) -> Fault {
        match tonic::Code::from(e.code) {
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Ok => {
                Fault::Instance(e.message)
            }
            code => Fault::Request(DispatchError::Engine {
                code,
                http_status: u16::try_from(e.http_status).unwrap_or(0),
                message: e.message,
                body: e.body,
            }),
        }
    }
}

/// Stage 6's verdict on an instance fault.
pub(crate) enum Verdict {
    /// Try another instance after this pause.
    Again(Duration),
    /// Tell the client.
    GiveUp(DispatchError),
}

impl Retry {
    pub(crate) fn new(max_attempts: u32) -> Retry {
        // About 10, 20, 40 ... ms, at most 200 ms: a replacement is usually already ready.
        let backoff = Box::new(service::retry::backoff(
            Duration::from_millis(10),
            Duration::from_millis(200),
        ));
        Retry { attempts: 0, max_attempts, backoff }
    }

    /// Counts an attempt about to start; returns its number (1 for the first).
    pub(crate) fn begin(&mut self) -> u32 {
        self.attempts += 1;
        self.attempts
    }

    /// After an instance fault: retry only while the client has had nothing (a retry would
    /// repeat what it has) and attempts remain.
    pub(crate) fn after(&mut self, why: &str, delivered: Option<u32>) -> Verdict {
        if let Some(tokens) = delivered {
            return Verdict::GiveUp(DispatchError::Unavailable(format!(
                "the worker failed after {tokens} tokens were delivered: {why}"
            )));
        }
        if self.attempts >= self.max_attempts {
            return Verdict::GiveUp(DispatchError::Unavailable(format!(
                "no output after {} attempts; last: {why}",
                self.attempts
            )));
        }
        Verdict::Again(self.backoff.next().unwrap_or(Duration::from_millis(200)))
    }
}

/// Stage 7: a finished request's outcome, counted once under its model.
pub(crate) fn record(model: &str, outcome: &str, start: Option<Instant>) {
    let metrics = &*telemetry::metrics::DISPATCH;
    metrics.requests.with_label_values(&[model, outcome]).inc();
    if let Some(start) = start {
        metrics
            .duration
            .with_label_values(&[model, outcome])
            .observe(start.elapsed().as_secs_f64());
    }
}

/// The gRPC surface (`sllm.v1.Dispatch`): auth is the shared server's `AuthLayer`.
pub enum Grpc {}

impl Surface for Grpc {
    type Body = tonic::body::Body;
    const CHECKS_KEYS: bool = false;

    fn classify(_: &http::Method, path: &str) -> (service::auth::Needed, bool) {
        // The key was checked by the server's `AuthLayer` (CHECKS_KEYS is false): what the call
        // needs is not looked up twice per request.
        (
            service::auth::Needed::Nothing,
            matches!(
                path,
                "/sllm.v1.Dispatch/Generate"
                    | "/sllm.v1.Dispatch/Embed"
                    | "/sllm.v1.Dispatch/Rerank"
            ),
        )
    }

    fn deadline(headers: &http::HeaderMap) -> Result<Option<Instant>, DispatchError> {
        let Some(raw) = headers.get("grpc-timeout") else { return Ok(None) };
        match crate::grpc::parse_grpc_timeout(raw.as_bytes()) {
            // A timeout of centuries is no deadline at all.
            Ok(d) => Ok(Instant::now().checked_add(d)),
            Err(why) => Err(DispatchError::invalid("grpc-timeout", why)),
        }
    }

    fn peer<B>(req: &http::Request<B>) -> Option<std::net::IpAddr> {
        use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
        let ext = req.extensions();
        ext.get::<TcpConnectInfo>()
            .and_then(TcpConnectInfo::remote_addr)
            .or_else(|| {
                ext.get::<TlsConnectInfo<TcpConnectInfo>>().and_then(|t| t.get_ref().remote_addr())
            })
            .map(|a| a.ip())
    }

    fn refuse(e: &DispatchError) -> http::Response<Self::Body> {
        e.to_status().into_http()
    }

    fn refuse_key(r: service::auth::Refused) -> http::Response<Self::Body> {
        match r {
            service::auth::Refused::Unauthenticated(m) => tonic::Status::unauthenticated(m),
            service::auth::Refused::PermissionDenied(m) => tonic::Status::permission_denied(m),
        }
        .into_http()
    }
}
