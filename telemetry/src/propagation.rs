//! W3C trace context across processes, by the SDK's TraceContext propagator: a span's
//! `traceparent` to send along, and a span made a child of a received one. Without an exporter
//! both are no-ops. (The process-wide propagator [`crate::init`] installs, for code that uses
//! OpenTelemetry's global one, is TraceContext with Baggage.)

use std::collections::HashMap;

use opentelemetry::Context;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// What `propagator` reads in a carrier holding only `key: value` (a `traceparent` as the mesh
/// carries it in a proto or Redis field; a `baggage` header).
fn read(propagator: &impl TextMapPropagator, key: &str, value: &str) -> Context {
    propagator.extract(&HashMap::from([(key.to_string(), value.to_string())]))
}

/// `key` as `propagator` writes it for `cx` ('' when it writes nothing).
fn write(propagator: &impl TextMapPropagator, cx: &Context, key: &str) -> String {
    let mut carrier = HashMap::new();
    propagator.inject_context(cx, &mut carrier);
    carrier.remove(key).unwrap_or_default()
}

/// The context a `traceparent` names (an empty one when it is malformed).
pub(crate) fn extract(traceparent: &str) -> Context {
    read(&TraceContextPropagator::new(), "traceparent", traceparent)
}

/// The `traceparent` naming the span of `cx` ('' when it has none).
pub(crate) fn inject(cx: &Context) -> String {
    write(&TraceContextPropagator::new(), cx, "traceparent")
}

/// W3C baggage as the SDK's Baggage propagator reads it, written back in its canonical form
/// ('' when empty or malformed): what sllm passes on to an engine with the trace context.
pub fn baggage(header: &str) -> String {
    if header.is_empty() {
        return String::new();
    }
    let propagator = BaggagePropagator::new();
    write(&propagator, &read(&propagator, "baggage", header), "baggage")
}

/// The `traceparent` the propagator reads in `traceparent`, written back in its canonical form
/// (None when it names no valid span): what sllm continues when a client sends it.
pub fn parse(traceparent: &str) -> Option<String> {
    let cx = extract(traceparent);
    cx.span().span_context().is_valid().then(|| inject(&cx))
}

/// The `traceparent` of `span` (empty when it is not recorded or no exporter is set up).
pub fn traceparent(span: &tracing::Span) -> String {
    if span.is_none() {
        return String::new();
    }
    inject(&span.context())
}

/// Makes `span` a child of the remote span `traceparent`, sent by another sllm process (ignored
/// when empty or malformed; a context that was not sampled stops `span` from being recorded).
/// Call it before `span` has children.
pub fn set_parent(span: &tracing::Span, traceparent: &str) {
    if traceparent.is_empty() || span.is_none() {
        return;
    }
    let _ = span.set_parent(extract(traceparent));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_traceparent_reads_back_as_itself_and_a_bad_one_as_nothing() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        assert_eq!(parse(tp).as_deref(), Some(tp));
        assert_eq!(parse("00-zz-b7ad6b7169203331-01"), None);
        assert_eq!(parse(""), None);
    }

    #[test]
    fn baggage_is_read_by_the_sdk_and_written_back_whole() {
        let b = baggage("tenant=acme,region=eu%2Dwest");
        let mut entries: Vec<&str> = b.split(',').collect();
        entries.sort();
        assert_eq!(entries, ["region=eu-west", "tenant=acme"], "{b}");
        assert_eq!(baggage(""), "");
    }
}
