//! OTLP protobuf written by hand: a span's attributes and events as they are set, the span
//! when it ends, the export request around a batch, and the gRPC call that sends it. Building
//! the generated message types instead (a few allocations per attribute, then an encoding pass,
//! then freeing it all) cost more CPU than recording the spans. Tests decode the bytes with the
//! generated types and compare them with the same spans built that way.

use bytes::{Buf, BufMut};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use crate::trace::{Record, Value};

const VARINT: u32 = 0;
const I64: u32 = 1;
const LEN: u32 = 2;
const I32: u32 = 5;

fn varint_len(v: u64) -> usize {
    ((64 - (v | 1).leading_zeros()) as usize).div_ceil(7)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(out: &mut Vec<u8>, tag: u32, wire: u32) {
    put_varint(out, u64::from((tag << 3) | wire));
}

fn key_len(tag: u32) -> usize {
    varint_len(u64::from(tag << 3))
}

/// Length of a length-delimited field whose body is `n` bytes.
fn len_field(tag: u32, n: usize) -> usize {
    key_len(tag) + varint_len(n as u64) + n
}

fn put_len(out: &mut Vec<u8>, tag: u32, n: usize) {
    key(out, tag, LEN);
    put_varint(out, n as u64);
}

fn put_bytes(out: &mut Vec<u8>, tag: u32, b: &[u8]) {
    put_len(out, tag, b.len());
    out.extend_from_slice(b);
}

/// Proto3 leaves out empty strings.
fn str_len(tag: u32, s: &str) -> usize {
    if s.is_empty() { 0 } else { len_field(tag, s.len()) }
}

fn put_str(out: &mut Vec<u8>, tag: u32, s: &str) {
    if !s.is_empty() {
        put_bytes(out, tag, s.as_bytes());
    }
}

fn fixed64_len(tag: u32, v: u64) -> usize {
    if v == 0 { 0 } else { key_len(tag) + 8 }
}

fn put_fixed64(out: &mut Vec<u8>, tag: u32, v: u64) {
    if v != 0 {
        key(out, tag, I64);
        out.extend_from_slice(&v.to_le_bytes());
    }
}

// AnyValue: a oneof, so written even when zero.
fn any_len(v: Value<'_>) -> usize {
    match v {
        Value::Str(s) => len_field(1, s.len()),
        Value::Bool(_) => key_len(2) + 1,
        Value::Int(i) => key_len(3) + varint_len(i as u64),
        Value::Float(_) => key_len(4) + 8,
    }
}

fn put_any(out: &mut Vec<u8>, v: Value<'_>) {
    match v {
        Value::Str(s) => put_bytes(out, 1, s.as_bytes()),
        Value::Bool(b) => {
            key(out, 2, VARINT);
            out.push(u8::from(b));
        }
        Value::Int(i) => {
            key(out, 3, VARINT);
            put_varint(out, i as u64);
        }
        Value::Float(f) => {
            key(out, 4, I64);
            out.extend_from_slice(&f.to_le_bytes());
        }
    }
}

/// `Span.attributes`.
const SPAN_ATTRIBUTE: u32 = 9;
/// `Span.events`.
const SPAN_EVENT: u32 = 11;
/// `Span.Event.attributes`.
pub(crate) const EVENT_ATTRIBUTE: u32 = 3;

/// A `KeyValue` as field `tag` of its message.
pub(crate) fn put_kv(out: &mut Vec<u8>, tag: u32, k: &str, v: Value<'_>) {
    let any = any_len(v);
    put_len(out, tag, str_len(1, k) + len_field(2, any));
    put_str(out, 1, k);
    put_len(out, 2, any);
    put_any(out, v);
}

/// A span attribute, appended to a record's encoded fields.
pub(crate) fn put_attr(fields: &mut Vec<u8>, k: &str, v: Value<'_>) {
    put_kv(fields, SPAN_ATTRIBUTE, k, v);
}

/// A span event (its attributes already encoded in `attrs`), appended to a record's fields.
pub(crate) fn put_event(fields: &mut Vec<u8>, time: u64, name: &str, attrs: &[u8]) {
    put_len(fields, SPAN_EVENT, fixed64_len(1, time) + str_len(2, name) + attrs.len());
    put_fixed64(fields, 1, time);
    put_str(fields, 2, name);
    fields.extend_from_slice(attrs);
}

fn get_varint(b: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*at)?;
        *at += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Some(v);
        }
    }
    None
}

/// Removes attribute `k` from a record's encoded fields, if it is there. The fields were all
/// written by this module: length-delimited entries whose attributes start with their key.
pub(crate) fn remove_attr(fields: &mut Vec<u8>, k: &str) {
    let mut at = 0;
    while at < fields.len() {
        let start = at;
        let (Some(tag), Some(len)) = (get_varint(fields, &mut at), get_varint(fields, &mut at))
        else {
            return;
        };
        let body = at;
        let end = body + len as usize;
        if tag == u64::from((SPAN_ATTRIBUTE << 3) | LEN) {
            let mut kat = body;
            // Proto3 leaves an empty key out: the value comes first.
            let same = if k.is_empty() {
                fields.get(kat) == Some(&((2 << 3) | LEN as u8))
            } else {
                fields.get(kat) == Some(&((1 << 3) | LEN as u8))
                    && {
                        kat += 1;
                        get_varint(fields, &mut kat) == Some(k.len() as u64)
                    }
                    && fields.get(kat..kat + k.len()) == Some(k.as_bytes())
            };
            if same {
                fields.drain(start..end.min(fields.len()));
                return;
            }
        }
        at = end;
    }
}

const STATUS_ERROR: u64 = 2;

fn status_len(r: &Record) -> usize {
    match &r.error {
        Some(m) => str_len(2, m) + key_len(3) + varint_len(STATUS_ERROR),
        None => 0,
    }
}

fn span_len(r: &Record) -> usize {
    len_field(1, 16)
        + len_field(2, 8)
        + if r.parent == 0 { 0 } else { len_field(4, 8) }
        + key_len(16)
        + 4
        + str_len(5, &r.name)
        + key_len(6)
        + varint_len(r.kind as u64)
        + fixed64_len(7, r.start)
        + fixed64_len(8, r.end)
        + r.fields.len()
        + len_field(15, status_len(r))
}

/// Appends `r` as a `ScopeSpans.spans` entry.
pub(crate) fn put_span(out: &mut Vec<u8>, r: &Record) {
    put_len(out, 2, span_len(r));
    put_bytes(out, 1, &r.cx.trace_id.to_be_bytes());
    put_bytes(out, 2, &r.cx.span_id.to_be_bytes());
    if r.parent != 0 {
        put_bytes(out, 4, &r.parent.to_be_bytes());
    }
    // W3C trace flags: sampled.
    key(out, 16, I32);
    out.extend_from_slice(&1u32.to_le_bytes());
    put_str(out, 5, &r.name);
    key(out, 6, VARINT);
    put_varint(out, r.kind as u64);
    put_fixed64(out, 7, r.start);
    put_fixed64(out, 8, r.end);
    out.extend_from_slice(&r.fields);
    put_len(out, 15, status_len(r));
    if let Some(m) = &r.error {
        put_str(out, 2, m);
        key(out, 3, VARINT);
        put_varint(out, STATUS_ERROR);
    }
}

/// The parts of every export request that do not change: the process's resource and sllm's
/// instrumentation scope, encoded once.
pub(crate) struct Preamble {
    resource: Vec<u8>,
    scope: Vec<u8>,
}

impl Preamble {
    pub fn new(resource: &[(String, String)]) -> Preamble {
        let mut r = Vec::new();
        for (k, v) in resource {
            put_kv(&mut r, 1, k, Value::Str(v));
        }
        let mut scope = Vec::new();
        put_str(&mut scope, 1, "sllm");
        put_str(&mut scope, 2, env!("CARGO_PKG_VERSION"));
        Preamble { resource: r, scope }
    }

    /// An `ExportTraceServiceRequest` carrying `spans`, one after another (encoded
    /// `ScopeSpans.spans` entries, as [`put_span`] writes them).
    pub fn encode(&self, spans: &[&[u8]]) -> Vec<u8> {
        let size: usize = spans.iter().map(|s| s.len()).sum();
        let scope_spans = len_field(1, self.scope.len()) + size;
        let resource_spans = len_field(1, self.resource.len()) + len_field(2, scope_spans);
        let mut out = Vec::with_capacity(len_field(1, resource_spans));
        put_len(&mut out, 1, resource_spans);
        put_bytes(&mut out, 1, &self.resource);
        put_len(&mut out, 2, scope_spans);
        put_bytes(&mut out, 1, &self.scope);
        for s in spans {
            out.extend_from_slice(s);
        }
        out
    }
}

/// Sends encoded requests as they are and reads the answer only for its status.
#[derive(Clone, Default)]
pub(crate) struct RawCodec;

pub(crate) struct RawEncoder;
pub(crate) struct AnswerDecoder;

impl Encoder for RawEncoder {
    type Item = bytes::Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: bytes::Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for AnswerDecoder {
    type Item = ();
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<()>, tonic::Status> {
        // A partial-success answer lists rejected spans; the collector logs those itself.
        let n = src.remaining();
        src.advance(n);
        Ok(Some(()))
    }
}

impl Codec for RawCodec {
    type Encode = bytes::Bytes;
    type Decode = ();
    type Encoder = RawEncoder;
    type Decoder = AnswerDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> AnswerDecoder {
        AnswerDecoder
    }
}

/// The collector's method.
pub(crate) const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::SpanContext;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1 as common;
    use opentelemetry_proto::tonic::trace::v1 as otlp;
    use prost::Message;

    fn any(v: Value<'_>) -> common::AnyValue {
        use common::any_value::Value as V;
        common::AnyValue {
            value: Some(match v {
                Value::Str(s) => V::StringValue(s.to_string()),
                Value::Int(i) => V::IntValue(i),
                Value::Float(f) => V::DoubleValue(f),
                Value::Bool(b) => V::BoolValue(b),
            }),
        }
    }

    fn kvs(attrs: &[(&str, Value<'_>)]) -> Vec<common::KeyValue> {
        attrs
            .iter()
            .map(|(k, v)| common::KeyValue {
                key: (*k).to_string(),
                value: Some(any(*v)),
                ..Default::default()
            })
            .collect()
    }

    const EVENT: (&str, u64, &[(&str, Value<'_>)]) =
        ("attempt failed", 1_700_000_000_000_100_000, &[("level", Value::Str("INFO"))]);

    /// A record made through its methods, and the same span built with the generated types:
    /// what the hand encoder must agree with.
    fn span(
        parent: u64,
        error: Option<&str>,
        attrs: &[(&str, Value<'_>)],
        event: bool,
    ) -> (Record, otlp::Span) {
        let cx = SpanContext { trace_id: u128::MAX - 7, span_id: 0x0102030405060708 };
        let mut r =
            Record::new("sllm.v1.Dispatch/Generate", otlp::span::SpanKind::Server, cx, parent);
        r.start = 1_700_000_000_000_000_000;
        r.end = 1_700_000_000_000_250_000;
        for (k, v) in attrs {
            r.set(k, *v);
        }
        if event {
            r.event(EVENT.1, EVENT.0, EVENT.2);
        }
        if let Some(e) = error {
            r.fail(e);
        }
        let reference = otlp::Span {
            trace_id: cx.trace_id.to_be_bytes().to_vec(),
            span_id: cx.span_id.to_be_bytes().to_vec(),
            parent_span_id: if parent == 0 { vec![] } else { parent.to_be_bytes().to_vec() },
            flags: 1,
            name: "sllm.v1.Dispatch/Generate".into(),
            kind: otlp::span::SpanKind::Server as i32,
            start_time_unix_nano: r.start,
            end_time_unix_nano: r.end,
            attributes: kvs(attrs),
            events: if event {
                vec![otlp::span::Event {
                    time_unix_nano: EVENT.1,
                    name: EVENT.0.into(),
                    attributes: kvs(EVENT.2),
                    dropped_attributes_count: 0,
                }]
            } else {
                vec![]
            },
            status: Some(match error {
                Some(m) => {
                    otlp::Status { message: m.into(), code: otlp::status::StatusCode::Error as i32 }
                }
                None => otlp::Status::default(),
            }),
            ..Default::default()
        };
        (r, reference)
    }

    #[test]
    fn hand_encoded_requests_decode_to_the_same_spans_as_the_generated_types() {
        let long = "x".repeat(300); // a length that takes a two-byte varint
        let (spans, expected): (Vec<Record>, Vec<otlp::Span>) = [
            span(
                0,
                None,
                &[
                    ("gen_ai.request.model", Value::Str("m")),
                    ("gen_ai.request.max_tokens", Value::Int(0)),
                    ("sllm.attempts", Value::Int(-3)),
                    ("sllm.ttft_ms", Value::Float(0.25)),
                    ("sllm.retried", Value::Bool(false)),
                    ("empty", Value::Str("")),
                    ("", Value::Int(1)),
                ],
                true,
            ),
            span(42, Some("worker_error"), &[("long", Value::Str(&long))], true),
            span(7, Some(""), &[], false),
            span(1, None, &[], false),
        ]
        .into_iter()
        .unzip();
        let resource = vec![("service.name".to_string(), "sllm-dispatch".to_string())];
        let mut encoded = Vec::new();
        for r in &spans {
            put_span(&mut encoded, r);
        }
        let bytes = Preamble::new(&resource).encode(&[&encoded]);
        let decoded = ExportTraceServiceRequest::decode(bytes.as_slice()).expect("valid protobuf");
        let [rs] = decoded.resource_spans.as_slice() else { panic!("one resource") };
        let attrs = &rs.resource.as_ref().expect("resource").attributes;
        assert_eq!(attrs.len(), 1);
        assert_eq!(attrs[0].key, "service.name");
        let [ss] = rs.scope_spans.as_slice() else { panic!("one scope") };
        assert_eq!(ss.scope.as_ref().map(|s| s.name.as_str()), Some("sllm"));
        assert_eq!(ss.spans, expected);
        // And byte for byte the length prost computes.
        assert_eq!(bytes.len(), decoded.encoded_len());
    }

    #[test]
    fn setting_an_attribute_again_replaces_it_and_keeps_the_others() {
        let (mut r, _) = span(
            0,
            None,
            &[
                ("a", Value::Int(1)),
                ("", Value::Int(2)),
                ("ab", Value::Str("x")),
                ("b", Value::Int(3)),
            ],
            true,
        );
        r.set("ab", Value::Str("a longer value than before"));
        r.set("a", Value::Bool(true));
        r.set("", Value::Int(5));
        r.set("c", Value::Float(1.5));
        // Same length and last byte as "ab": a new key all the same.
        r.set("xb", Value::Int(6));
        let mut encoded = Vec::new();
        put_span(&mut encoded, &r);
        let bytes = Preamble::new(&[]).encode(&[&encoded]);
        let decoded = ExportTraceServiceRequest::decode(bytes.as_slice()).expect("valid protobuf");
        let got = &decoded.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(
            got.attributes,
            kvs(&[
                ("b", Value::Int(3)),
                ("ab", Value::Str("a longer value than before")),
                ("a", Value::Bool(true)),
                ("", Value::Int(5)),
                ("c", Value::Float(1.5)),
                ("xb", Value::Int(6)),
            ])
        );
        assert_eq!(got.events.len(), 1, "the event is kept");
    }

    #[test]
    fn varint_lengths_match_their_encoding() {
        for v in [0u64, 1, 127, 128, 16_383, 16_384, u32::MAX as u64, u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(out.len(), varint_len(v), "{v}");
        }
    }
}
