//! W3C trace context across processes: a span's `traceparent` to send along, and a span made a
//! child of a received one. Without an exporter both are no-ops that cost a few lookups.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The `traceparent` of `span` (empty when it is not sampled or no exporter is set up).
pub fn traceparent(span: &tracing::Span) -> String {
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove("traceparent").unwrap_or_default()
}

/// Makes `span` a child of the remote span `traceparent` (ignored when empty or malformed).
pub fn set_parent(span: &tracing::Span, traceparent: &str) {
    if traceparent.is_empty() {
        return;
    }
    let carrier: HashMap<String, String> =
        HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(cx);
}

/// The sampled flag of a well-formed `traceparent`, if it is one.
pub fn sampled_flag(traceparent: &str) -> Option<bool> {
    let parts: Vec<&str> = traceparent.split('-').collect();
    match parts.as_slice() {
        [_, id, span, flags] if id.len() == 32 && span.len() == 16 && flags.len() == 2 => {
            u8::from_str_radix(flags, 16).ok().map(|f| f & 1 == 1)
        }
        _ => None,
    }
}

/// The trace id in a `traceparent` (for logs), if it is well formed.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (_version, id) = (parts.next()?, parts.next()?);
    (id.len() == 32).then_some(id)
}
