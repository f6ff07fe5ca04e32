//! Telemetry for every sllm binary: structured logs (filtered by `RUST_LOG`), OpenTelemetry
//! traces, and the Prometheus metrics, whose names are all constants in [`metrics`].
//!
//! Traces are OpenTelemetry's own: `tracing` spans become SDK spans through
//! `tracing-opentelemetry`, the SDK's batch span processor exports them from its own thread with
//! `opentelemetry-otlp` (gRPC or HTTP/protobuf), and the SDK reads the standard `OTEL_*`
//! variables (endpoint, protocol, headers, timeout, compression, service name, resource
//! attributes, sampler and its argument, batch sizes). Propagation is the SDK's W3C
//! TraceContext and Baggage propagators. Nothing is exported, and nothing traced, unless an
//! endpoint is set. Which requests are traced is decided where they enter: see [`trace`].

pub mod metrics;
pub mod propagation;
pub mod trace;

mod export;

use std::sync::atomic::Ordering;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::FilterExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Changes the share of new traces recorded from now on (clamped to 0..=1), replacing the
/// configured sampler: requests that arrive with a trace context follow it too, unless
/// [`set_trust_client_sampling`] says their caller's decision wins.
pub fn set_sampling_ratio(ratio: f64) {
    let r = if ratio.is_nan() { 0.0 } else { ratio.clamp(0.0, 1.0) };
    trace::set_ratio(r);
}

/// Whether the sampled flag of a client's `traceparent` decides whether its request is traced
/// (true), or the operator's sampler decides for every request (false, the default). Either
/// way a traced request continues the client's trace.
pub fn set_trust_client_sampling(trust: bool) {
    trace::trust_caller().store(trust, Ordering::Relaxed);
}

/// The trust in callers' sampled flags the environment asks for: `SLLM_TRUST_CLIENT_SAMPLING`
/// (true/1/yes/on, or false/0/no/off, which wins over the sampler), else an
/// `OTEL_TRACES_SAMPLER` of `parentbased_*` (the standard name for "follow the parent's
/// decision"). Unset, unlike OpenTelemetry's `parentbased_always_on` default, it is off:
/// anyone who can reach Dispatch controls the flag, and honouring it lets them make the
/// operator trace (and pay to export) every request they send at any ratio.
pub(crate) fn trust_from_env() -> bool {
    let explicit = std::env::var("SLLM_TRUST_CLIENT_SAMPLING").ok().and_then(|v| {
        match v.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Some(true),
            "0" | "false" | "no" | "off" | "" => Some(false),
            _ => None,
        }
    });
    let parent_based = std::env::var("OTEL_TRACES_SAMPLER")
        .is_ok_and(|s| s.trim().to_ascii_lowercase().starts_with("parentbased_"));
    explicit.unwrap_or(parent_based)
}

/// Keeps the tracer provider alive; exports pending spans when dropped.
pub struct Guard {
    provider: Option<SdkTracerProvider>,
}

impl Guard {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            trace::EXPORTING.store(false, Ordering::Relaxed);
            if let Err(e) = p.shutdown() {
                tracing::warn!(error = %e, "pending spans were not all exported");
            }
        }
    }
}

/// The resource every span carries: the SDK's own attributes, `service.name` = `service` and a
/// `service.instance.id` unless `OTEL_RESOURCE_ATTRIBUTES` or `OTEL_SERVICE_NAME` say otherwise
/// (the SDK's detectors read both).
fn resource(service: &str) -> opentelemetry_sdk::Resource {
    use opentelemetry_sdk::resource::{
        EnvResourceDetector, SdkProvidedResourceDetector, TelemetryResourceDetector,
    };
    let mut builder = opentelemetry_sdk::Resource::builder_empty()
        .with_detector(Box::new(TelemetryResourceDetector))
        .with_service_name(service.to_string())
        .with_attribute(opentelemetry::KeyValue::new(
            "service.instance.id",
            uuid::Uuid::new_v4().to_string(),
        ))
        .with_detector(Box::new(EnvResourceDetector::new()));
    if std::env::var("OTEL_SERVICE_NAME").is_ok_and(|s| !s.trim().is_empty()) {
        builder = builder.with_detector(Box::new(SdkProvidedResourceDetector));
    }
    builder.build()
}

/// Sets up logs (`RUST_LOG`, default `default_filter`) and, when `OTEL_EXPORTER_OTLP_ENDPOINT`
/// (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, OTLP trace export for `service`. Call it
/// inside the Tokio runtime (the gRPC exporter's connection runs on it). Safe to call more than
/// once: only the first call installs.
pub fn init(service: &str, default_filter: &str) -> Guard {
    // The request path's spans are for traces: they name no request and carry their
    // attributes in the SDK span, so a log line would gain only a `sllm{otel.name=..}` prefix,
    // for formatting their fields at every traced request.
    let not_request_spans =
        tracing_subscriber::filter::filter_fn(|m| !(m.is_span() && m.target() == "sllm"));
    let logs = tracing_subscriber::fmt::layer().with_target(false).with_filter(
        EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| EnvFilter::new(default_filter))
            .and(not_request_spans),
    );
    let (provider, failed, protocol) = if export::wanted() {
        match export::build() {
            Ok((exporter, protocol)) => {
                let provider = SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_sampler(trace::FollowTheEntry)
                    .with_resource(resource(service))
                    .build();
                (Some(provider), None, protocol)
            }
            Err(e) => (None, Some(e), ""),
        }
    } else {
        (None, None, "")
    };
    // Spans of sllm's own crates, kvstore's per-command spans included; `SLLM_TRACE_FILTER`
    // overrides.
    let trace_filter =
        std::env::var("SLLM_TRACE_FILTER").unwrap_or_else(|_| "info,kvstore=debug".into());
    let traces = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("sllm"))
            // Each of these costs on every span or every poll of an instrumented future;
            // none of them says anything a trace of sllm needs.
            .with_location(false)
            .with_threads(false)
            // A `target` attribute on every span: `sllm` on all of the request path's, a
            // module path on the rest, whose names already say what they are.
            .with_target(false)
            .with_tracked_inactivity(false)
            .with_context_activation(false)
            .with_filter(EnvFilter::new(trace_filter))
    });
    let installed = tracing_subscriber::registry().with(logs).with(traces).try_init().is_ok();
    if let Some(e) = failed {
        tracing::warn!(error = %e, "cannot set up OTLP trace export; traces are off");
    }
    // A second call does not replace the first one's subscriber: its provider would get no
    // spans, so it is not kept.
    let provider = provider.filter(|_| installed);
    if provider.is_some() {
        opentelemetry::global::set_text_map_propagator(
            opentelemetry::propagation::TextMapCompositePropagator::new(vec![
                Box::new(TraceContextPropagator::new()),
                Box::new(BaggagePropagator::new()),
            ]),
        );
        trace::EXPORTING.store(true, Ordering::Relaxed);
        tracing::info!(protocol, "exporting traces over OTLP");
    }
    Guard { provider }
}
