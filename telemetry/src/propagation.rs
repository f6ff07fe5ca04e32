//! W3C trace context across processes, by the SDK's TraceContext propagator: a span's
//! `traceparent` to send along, and a span made a child of a received one. Without an exporter
//! both are no-ops. (The process-wide propagator [`crate::init`] installs, for code that uses
//! OpenTelemetry's global one, is TraceContext with Baggage.)

use std::collections::HashMap;

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// A lone `traceparent`, as the mesh carries it (a proto field, a Redis event field).
struct Traceparent<'a>(&'a str);

impl Extractor for Traceparent<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

struct Fields(HashMap<String, String>);

impl Injector for Fields {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_string(), value);
    }
}

/// The context a `traceparent` names (an empty one when it is malformed).
pub(crate) fn extract(traceparent: &str) -> Context {
    TraceContextPropagator::new().extract(&Traceparent(traceparent))
}

fn inject(cx: &Context) -> String {
    let mut fields = Fields(HashMap::new());
    TraceContextPropagator::new().inject_context(cx, &mut fields);
    fields.0.remove("traceparent").unwrap_or_default()
}

/// W3C baggage as the SDK's Baggage propagator reads it, written back in its canonical form
/// ('' when empty or malformed): what sllm passes on to an engine with the trace context.
pub fn baggage(header: &str) -> String {
    if header.is_empty() {
        return String::new();
    }
    struct Header<'a>(&'a str);
    impl Extractor for Header<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            (key == "baggage").then_some(self.0)
        }
        fn keys(&self) -> Vec<&str> {
            vec!["baggage"]
        }
    }
    let propagator = opentelemetry_sdk::propagation::BaggagePropagator::new();
    let cx = propagator.extract(&Header(header));
    let mut fields = Fields(HashMap::new());
    propagator.inject_context(&cx, &mut fields);
    fields.0.remove("baggage").unwrap_or_default()
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
