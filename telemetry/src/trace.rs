//! Spans on the request path, and who decides which requests are traced.
//!
//! Spans are `tracing` spans, turned into OpenTelemetry spans by `tracing-opentelemetry` and
//! exported by the SDK's batch span processor. Whether a request is traced is decided once, where
//! it enters sllm ([`Span::request`]): by the operator's sampler (`OTEL_TRACES_SAMPLER`, read by
//! the SDK), or by the caller's sampled flag when the operator trusts it. A request that is not
//! traced gets [`Span::none`]: no `tracing` span, no SDK span, and none below it. Everything
//! after the entry follows its parent's decision, across processes too: a worker or the Scaler
//! continues a context only Dispatch could have sent.

use std::cell::Cell;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use opentelemetry::trace::{
    SpanContext, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{Sampler, SamplingDecision, SamplingResult, ShouldSample};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Whether spans are exported at all (an exporter is installed).
pub(crate) static EXPORTING: AtomicBool = AtomicBool::new(false);

/// The operator's sampler, as the SDK reads it from `OTEL_TRACES_SAMPLER` and
/// `OTEL_TRACES_SAMPLER_ARG` (its default is `parentbased_always_on`).
static CONFIGURED: OnceLock<Box<dyn ShouldSample>> = OnceLock::new();

/// A ratio set by [`crate::set_sampling_ratio`], replacing the configured sampler (as `f64` bits;
/// NaN: none set).
static RATIO: AtomicU64 = AtomicU64::new(0x7ff8_0000_0000_0000);

/// Whether a client's sampled flag decides whether its request is traced; see
/// [`crate::set_trust_client_sampling`].
pub(crate) static TRUST_CALLER: OnceLock<AtomicBool> = OnceLock::new();

thread_local! {
    /// Set while [`Span::request`] starts a span it has already decided to trace.
    static DECIDED: Cell<bool> = const { Cell::new(false) };
}

fn configured() -> &'static dyn ShouldSample {
    CONFIGURED.get_or_init(|| opentelemetry_sdk::trace::Config::default().sampler).as_ref()
}

pub(crate) fn set_ratio(ratio: f64) {
    RATIO.store(ratio.to_bits(), Ordering::Relaxed);
}

pub(crate) fn trust_caller() -> &'static AtomicBool {
    TRUST_CALLER.get_or_init(|| AtomicBool::new(crate::trust_from_env()))
}

/// The operator's decision for a new trace (`parent`: a caller's context it trusts).
fn operator_samples(parent: Option<&Context>, trace_id: TraceId, name: &str) -> bool {
    let ratio = f64::from_bits(RATIO.load(Ordering::Relaxed));
    let result = if ratio.is_nan() {
        configured().should_sample(parent, trace_id, name, &SpanKind::Server, &[], &[])
    } else {
        Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio))).should_sample(
            parent,
            trace_id,
            name,
            &SpanKind::Server,
            &[],
            &[],
        )
    };
    result.decision == SamplingDecision::RecordAndSample
}

/// The sampler the SDK runs for every span: a span with a parent follows the parent's decision
/// (made at the request's entry, here or in the process that sent the context); a span
/// [`Span::request`] starts was decided there; any other root (the Scaler's own decisions, say)
/// gets the operator's sampler.
#[derive(Debug, Clone)]
pub(crate) struct FollowTheEntry;

impl ShouldSample for FollowTheEntry {
    fn should_sample(
        &self,
        parent: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        _kind: &SpanKind,
        _attributes: &[KeyValue],
        _links: &[opentelemetry::trace::Link],
    ) -> SamplingResult {
        let parent =
            parent.filter(|cx| cx.has_active_span()).map(|cx| cx.span().span_context().clone());
        let (sample, trace_state) = match parent {
            Some(p) if p.is_valid() => (p.is_sampled(), p.trace_state().clone()),
            _ => (DECIDED.get() || operator_samples(None, trace_id, name), TraceState::default()),
        };
        SamplingResult {
            decision: if sample {
                SamplingDecision::RecordAndSample
            } else {
                SamplingDecision::Drop
            },
            attributes: Vec::new(),
            trace_state,
        }
    }
}

/// How a [`Span`] relates to the other side of a call (OpenTelemetry's span kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Work inside one process.
    Internal,
    /// Handling a call from a client.
    Server,
    /// A call to a server.
    Client,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Internal => "internal",
            Kind::Server => "server",
            Kind::Client => "client",
        }
    }
}

/// An attribute value: strings, integers, floats and booleans.
pub trait Attr {
    /// The OpenTelemetry value.
    fn value(self) -> opentelemetry::Value;
}

impl Attr for &str {
    fn value(self) -> opentelemetry::Value {
        opentelemetry::Value::String(self.to_string().into())
    }
}
impl Attr for &String {
    fn value(self) -> opentelemetry::Value {
        self.as_str().value()
    }
}
impl Attr for String {
    fn value(self) -> opentelemetry::Value {
        opentelemetry::Value::String(self.into())
    }
}
impl Attr for bool {
    fn value(self) -> opentelemetry::Value {
        opentelemetry::Value::Bool(self)
    }
}
impl Attr for f64 {
    fn value(self) -> opentelemetry::Value {
        opentelemetry::Value::F64(self)
    }
}
impl Attr for i64 {
    fn value(self) -> opentelemetry::Value {
        opentelemetry::Value::I64(self)
    }
}
impl Attr for u32 {
    fn value(self) -> opentelemetry::Value {
        opentelemetry::Value::I64(i64::from(self))
    }
}
impl Attr for u64 {
    fn value(self) -> opentelemetry::Value {
        opentelemetry::Value::I64(i64::try_from(self).unwrap_or(i64::MAX))
    }
}
impl Attr for usize {
    fn value(self) -> opentelemetry::Value {
        opentelemetry::Value::I64(i64::try_from(self).unwrap_or(i64::MAX))
    }
}

/// A span of the request path: a `tracing` span when the request is traced, nothing at all
/// otherwise (every method is then a no-op). It ends when dropped.
///
/// A recorded span is started in the SDK as soon as it is made, and keeps its OpenTelemetry
/// context beside the `tracing` span: attributes, status and events go to the SDK span through
/// it, not through a lookup of the `tracing` span in the subscriber's registry at every call.
#[derive(Debug, Clone, Default)]
pub struct Span {
    span: Option<tracing::Span>,
    cx: Context,
}

/// The caller's span context in a `traceparent` (None when empty or malformed), read by the
/// SDK's W3C propagator.
fn remote(traceparent: &str) -> Option<SpanContext> {
    if traceparent.is_empty() {
        return None;
    }
    let cx = crate::propagation::extract(traceparent);
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

fn span(name: &'static str, kind: Kind) -> tracing::Span {
    tracing::info_span!(target: "sllm", "sllm", otel.name = name, otel.kind = kind.name())
}

impl Span {
    /// A span that records nothing.
    pub fn none() -> Span {
        Span::default()
    }

    /// `span` started in the SDK, with its context kept.
    fn started(span: tracing::Span) -> Span {
        let cx = span.context();
        if cx.has_active_span() { Span { span: Some(span), cx } } else { Span::none() }
    }

    /// The span of a request arriving with `traceparent` (may be empty), where the decision to
    /// trace it is made: never while no exporter runs; as the caller's sampled flag says when it
    /// sent a valid context and the operator trusts callers ([`crate::set_trust_client_sampling`]);
    /// otherwise by the operator's sampler, on a trace id the caller did not choose. A traced
    /// request continues the caller's trace when it sent one, else starts a new one.
    pub fn request(name: &'static str, kind: Kind, traceparent: &str) -> Span {
        if !EXPORTING.load(Ordering::Relaxed) {
            return Span::none();
        }
        let caller = remote(traceparent);
        let trusted = trust_caller().load(Ordering::Relaxed);
        let sampled = match &caller {
            Some(sc) if trusted => sc.is_sampled(),
            _ => operator_samples(None, TraceId::from(rand::random::<u128>()), name),
        };
        if !sampled {
            return Span::none();
        }
        let s = span(name, kind);
        if let Some(sc) = caller {
            let sc = SpanContext::new(
                sc.trace_id(),
                sc.span_id(),
                sc.trace_flags() | TraceFlags::SAMPLED,
                true,
                sc.trace_state().clone(),
            );
            let _ = s.set_parent(Context::new().with_remote_span_context(sc));
        }
        // Start it now, while the sampler knows the decision is made.
        DECIDED.set(true);
        let started = Span::started(s);
        DECIDED.set(false);
        started
    }

    /// A span that continues the remote context `traceparent`, sent by another sllm process
    /// (the decision travels with it); nothing when the context is missing, malformed or not
    /// sampled, or no exporter runs.
    pub fn remote_child(name: &'static str, kind: Kind, traceparent: &str) -> Span {
        if !EXPORTING.load(Ordering::Relaxed) {
            return Span::none();
        }
        match remote(traceparent) {
            Some(sc) if sc.is_sampled() => {
                let s = span(name, kind);
                let _ = s.set_parent(Context::new().with_remote_span_context(sc));
                Span::started(s)
            }
            _ => Span::none(),
        }
    }

    /// A child of this span (nothing when this one records nothing).
    pub fn child(&self, name: &'static str, kind: Kind) -> Span {
        let Some(parent) = &self.span else { return Span::none() };
        Span::started(tracing::info_span!(
            target: "sllm",
            parent: parent,
            "sllm",
            otel.name = name,
            otel.kind = kind.name()
        ))
    }

    /// Whether this span records anything.
    pub fn is_recording(&self) -> bool {
        self.span.is_some()
    }

    /// The `tracing` span, for instrumenting work (a future, a `tracing` child) under this one
    /// (a disabled one when this span records nothing).
    pub fn tracing(&self) -> &tracing::Span {
        static NONE: std::sync::LazyLock<tracing::Span> =
            std::sync::LazyLock::new(tracing::Span::none);
        self.span.as_ref().unwrap_or(&NONE)
    }

    /// This span's trace id in hex, when it records.
    pub fn trace_id(&self) -> Option<String> {
        self.span.as_ref()?;
        let sc = self.cx.span().span_context().clone();
        sc.is_valid().then(|| sc.trace_id().to_string())
    }

    /// The `traceparent` naming this span (empty when it records nothing).
    pub fn traceparent(&self) -> String {
        if self.span.is_none() {
            return String::new();
        }
        crate::propagation::inject(&self.cx)
    }

    /// Sets attribute `key`. Set each key once: the SDK keeps every value it is given, and a
    /// trace viewer shows them all.
    pub fn set(&self, key: &'static str, value: impl Attr) {
        if self.span.is_some() {
            self.cx.span().set_attribute(KeyValue::new(key, value.value()));
        }
    }

    /// Marks the span failed, with why.
    pub fn fail(&self, message: &str) {
        if self.span.is_some() {
            self.cx.span().set_status(Status::error(message.to_string()));
        }
    }

    /// Adds a timestamped event, e.g. what a log line says.
    pub fn event<V: Attr + Copy>(&self, name: &'static str, attrs: &[(&'static str, V)]) {
        if self.span.is_some() {
            let attrs = attrs.iter().map(|(k, v)| KeyValue::new(*k, v.value())).collect();
            self.cx.span().add_event(name, attrs);
        }
    }
}
