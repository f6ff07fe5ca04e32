//! W3C trace context across processes: a span's `traceparent` to send along, and a span made a
//! child of a received one. Without an exporter both are no-ops that cost a lookup.

use crate::trace::{self, SpanContext};

/// The `traceparent` of `span` (empty when it is not recorded or no exporter is set up).
pub fn traceparent(span: &tracing::Span) -> String {
    trace::context(span).map(|cx| cx.traceparent()).unwrap_or_default()
}

/// Makes `span` a child of the remote span `traceparent` (ignored when empty or malformed; a
/// context the caller did not sample stops `span` from being recorded).
pub fn set_parent(span: &tracing::Span, traceparent: &str) {
    if traceparent.is_empty() || span.is_disabled() {
        return;
    }
    if let Some((cx, sampled)) = SpanContext::parse(traceparent) {
        trace::set_remote_parent(span, cx, sampled);
    }
}
