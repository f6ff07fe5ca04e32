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

/// Whether a client's sampled flag decides whether its request is traced. Off unless the
/// operator opts in: `SLLM_TRUST_CLIENT_SAMPLING` (true/1/yes/on, or false/0/no/off, which wins
/// over the sampler), else an `OTEL_TRACES_SAMPLER` of `parentbased_*` (the standard name for
/// "follow the parent's decision"). Unset, unlike OpenTelemetry's `parentbased_always_on`
/// default, it is off: anyone who can reach Dispatch controls the flag, and honouring it lets
/// them make the operator trace (and pay to export) every request they send at any ratio.
/// Changed by [`set_trust_client_sampling`].
static TRUST_CALLER: LazyLock<AtomicBool> = LazyLock::new(|| {
    let explicit = std::env::var("SLLM_TRUST_CLIENT_SAMPLING").ok().and_then(|v| {
        match v.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Some(true),
            "0" | "false" | "no" | "off" | "" => Some(false),
            _ => None,
        }
    });
    let parent_based = std::env::var("OTEL_TRACES_SAMPLER")
        .is_ok_and(|s| s.trim().to_ascii_lowercase().starts_with("parentbased_"));
    AtomicBool::new(explicit.unwrap_or(parent_based))
});

/// Changes the share of new traces recorded from now on (clamped to 0..=1). Requests that
/// arrive with a trace context follow it too, unless [`set_trust_client_sampling`] says
/// their caller's decision wins.
pub fn set_sampling_ratio(ratio: f64) {
    let r = if ratio.is_nan() { 0.0 } else { ratio.clamp(0.0, 1.0) };
    RATIO.store(r.to_bits(), Ordering::Relaxed);
}

/// Whether the sampled flag of a client's `traceparent` decides whether its request is traced
/// (true), or the configured ratio decides for every request (false, the default). Either way
/// a request continues the client's trace id when it is traced.
pub fn set_trust_client_sampling(trust: bool) {
    TRUST_CALLER.store(trust, Ordering::Relaxed);
}

/// Whether a request should be traced, given the sampled flag of the trace context it arrived
/// with (None: no valid context): never when no exporter is set up; as its caller decided when
/// it carries a context and the operator trusts callers' decisions; otherwise for the
/// configured share of requests. Deciding before any span exists keeps untraced requests free
/// of tracing cost.
fn sample(caller_sampled: Option<bool>) -> bool {
    if !EXPORTING.load(Ordering::Relaxed) {
        return false;
    }
    match caller_sampled {
        Some(sampled) if TRUST_CALLER.load(Ordering::Relaxed) => sampled,
        _ => {
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
