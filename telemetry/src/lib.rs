//! Telemetry for every sllm binary: structured logs (filtered by `RUST_LOG`), OpenTelemetry
//! traces exported over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (and nothing at all when
//! it is not), W3C `traceparent` propagation across processes, and the Prometheus metrics, whose
//! names are all constants in [`metrics`].
//!
//! It must never block a request on exporting: spans go to a batch processor on its own thread.

pub mod metrics;
mod otlp;
pub mod propagation;
pub mod trace;

use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

static EXPORTING: AtomicBool = AtomicBool::new(false);

/// The share of new traces to record, as `f64` bits: from `OTEL_TRACES_SAMPLER` /
/// `OTEL_TRACES_SAMPLER_ARG` at start-up (`always_on`/unset: all, `always_off`: none,
/// `traceidratio` or `parentbased_traceidratio`: the ratio), changed by [`set_sampling_ratio`].
static RATIO: LazyLock<AtomicU64> = LazyLock::new(|| {
    let arg = std::env::var("OTEL_TRACES_SAMPLER_ARG").ok().and_then(|a| a.parse::<f64>().ok());
    let ratio = match std::env::var("OTEL_TRACES_SAMPLER").as_deref() {
        Ok("always_off" | "parentbased_always_off") => 0.0,
        Ok("traceidratio" | "parentbased_traceidratio") => arg.unwrap_or(1.0).clamp(0.0, 1.0),
        _ => 1.0,
    };
    AtomicU64::new(f64::to_bits(ratio))
});

/// Changes the share of new traces recorded from now on (clamped to 0..=1). Requests that
/// arrive with a trace context still follow their caller's decision.
pub fn set_sampling_ratio(ratio: f64) {
    let r = if ratio.is_nan() { 0.0 } else { ratio.clamp(0.0, 1.0) };
    RATIO.store(r.to_bits(), Ordering::Relaxed);
}

/// Whether a request should be traced, given the sampled flag of the trace context it arrived
/// with (None: no valid context): never when no exporter is set up; as its caller decided when
/// it carries a context; otherwise for the configured share of requests. Deciding before any
/// span exists keeps untraced requests free of tracing cost.
fn sample(caller_sampled: Option<bool>) -> bool {
    if !EXPORTING.load(Ordering::Relaxed) {
        return false;
    }
    match caller_sampled {
        Some(sampled) => sampled,
        None => {
            let ratio = f64::from_bits(RATIO.load(Ordering::Relaxed));
            ratio >= 1.0 || (ratio > 0.0 && rand::random::<f64>() < ratio)
        }
    }
}

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Keeps the trace exporter alive; exports pending spans when dropped.
pub struct Guard {
    exporter: Option<trace::Exporter>,
}

impl Guard {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.exporter.is_some()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut e) = self.exporter.take() {
            EXPORTING.store(false, Ordering::Relaxed);
            e.shutdown();
        }
    }
}

/// Sets up logs (`RUST_LOG`, default `default_filter`) and, when `OTEL_EXPORTER_OTLP_ENDPOINT`
/// (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, OTLP trace export for `service`
/// (`OTEL_SERVICE_NAME` wins; the other standard `OTEL_*` variables apply, see
/// docs/observability.md). Safe to call more than once: only the first call installs.
pub fn init(service: &str, default_filter: &str) -> Guard {
    let logs = tracing_subscriber::fmt::layer().with_target(false).with_filter(
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter)),
    );
    let (config, warnings) = trace::ExportConfig::from_env(service);
    let started = config.map(trace::Exporter::start);
    let (exporter, layer, failed) = match started {
        None => (None, None, None),
        Some(Ok((exporter, layer))) => (Some(exporter), Some(layer), None),
        Some(Err(e)) => (None, None, Some(e)),
    };
    // Spans of sllm's own crates, kvstore's per-command spans included; `SLLM_TRACE_FILTER`
    // overrides.
    let trace_filter =
        std::env::var("SLLM_TRACE_FILTER").unwrap_or_else(|_| "info,kvstore=debug".into());
    let traces = layer.map(|l| l.with_filter(EnvFilter::new(trace_filter)));
    let installed = tracing_subscriber::registry().with(logs).with(traces).try_init().is_ok();
    for w in warnings {
        tracing::warn!("{w}");
    }
    if let Some(e) = failed {
        tracing::warn!(error = %e, "cannot set up OTLP trace export; traces are off");
    }
    // A second call does not replace the first one's subscriber: its exporter would get no
    // spans, so it is not kept.
    let exporter = exporter.filter(|_| installed);
    if exporter.is_some() {
        EXPORTING.store(true, Ordering::Relaxed);
    }
    Guard { exporter }
}
