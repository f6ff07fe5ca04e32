//! Telemetry for every sllm binary: structured logs (filtered by `RUST_LOG`), OpenTelemetry
//! traces exported over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (and nothing at all when
//! it is not), W3C `traceparent` propagation across processes, and the Prometheus metrics, whose
//! names are all constants in [`metrics`].
//!
//! It must never block a request on exporting: spans go to a batch processor on its own thread.

pub mod metrics;
pub mod propagation;

use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, Ordering};

static EXPORTING: AtomicBool = AtomicBool::new(false);

/// The share of new traces to record, from `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`
/// (`always_on`/unset: all, `always_off`: none, `traceidratio` or `parentbased_traceidratio`:
/// the ratio).
static RATIO: LazyLock<f64> = LazyLock::new(|| {
    let arg = std::env::var("OTEL_TRACES_SAMPLER_ARG").ok().and_then(|a| a.parse::<f64>().ok());
    match std::env::var("OTEL_TRACES_SAMPLER").as_deref() {
        Ok("always_off" | "parentbased_always_off") => 0.0,
        Ok("traceidratio" | "parentbased_traceidratio") => arg.unwrap_or(1.0).clamp(0.0, 1.0),
        _ => 1.0,
    }
});

/// Whether a request arriving with `traceparent` (may be empty) should be traced: never when
/// no exporter is set up; as its caller decided when it carries a trace context; otherwise for
/// the configured share of requests. Deciding before any span exists keeps untraced requests
/// free of tracing cost.
pub fn sample(traceparent: &str) -> bool {
    if !EXPORTING.load(Ordering::Relaxed) {
        return false;
    }
    match propagation::sampled_flag(traceparent) {
        Some(sampled) => sampled,
        None => {
            let ratio = *RATIO;
            ratio >= 1.0 || (ratio > 0.0 && rand::random::<f64>() < ratio)
        }
    }
}

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Keeps the trace exporter alive; flushes pending spans when dropped.
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
            let _ = p.shutdown();
        }
    }
}

/// Sets up logs (`RUST_LOG`, default `default_filter`) and, when `OTEL_EXPORTER_OTLP_ENDPOINT`
/// is set, OTLP trace export for `service` (`OTEL_SERVICE_NAME` wins; the other standard
/// `OTEL_*` variables apply). Safe to call more than once: only the first call installs.
pub fn init(service: &str, default_filter: &str) -> Guard {
    let logs = tracing_subscriber::fmt::layer().with_target(false).with_filter(
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter)),
    );
    let endpoint_set = std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
        || std::env::var_os("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some();
    if !endpoint_set {
        let _ = tracing_subscriber::registry().with(logs).try_init();
        return Guard { provider: None };
    }
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let exporter = match opentelemetry_otlp::SpanExporter::builder().with_tonic().build() {
        Ok(e) => e,
        Err(e) => {
            let _ = tracing_subscriber::registry().with(logs).try_init();
            tracing::warn!(error = %e, "cannot set up OTLP trace export; traces are off");
            return Guard { provider: None };
        }
    };
    let name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.to_string());
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(opentelemetry_sdk::Resource::builder().with_service_name(name).build())
        .build();
    let tracer = provider.tracer("sllm");
    // Spans of sllm's own crates, kvstore's per-command spans included; `SLLM_TRACE_FILTER`
    // overrides.
    let trace_filter =
        std::env::var("SLLM_TRACE_FILTER").unwrap_or_else(|_| "info,kvstore=debug".into());
    // No busy/idle timing and no OpenTelemetry context activation: both run at every enter and
    // exit of a span, which halved the cost of entering one; sllm reads span contexts directly
    // (`propagation`), so nothing needs the active context.
    let traces = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_tracked_inactivity(false)
        .with_context_activation(false)
        .with_filter(EnvFilter::new(trace_filter));
    let _ = tracing_subscriber::registry().with(logs).with(traces).try_init();
    EXPORTING.store(true, Ordering::Relaxed);
    Guard { provider: Some(provider) }
}
