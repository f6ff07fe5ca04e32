//! The OTLP/gRPC trace export call, with the request's protobuf written straight from span
//! records: building the generated message types first (a few allocations per attribute, then
//! an encoding pass, then freeing it all) cost more CPU than recording the spans. A test decodes
//! the bytes with the generated types and compares them with the same spans built that way.

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
fn any_len(v: &Value) -> usize {
    match v {
        Value::Str(s) => len_field(1, s.len()),
        Value::Bool(_) => key_len(2) + 1,
        Value::Int(i) => key_len(3) + varint_len(*i as u64),
        Value::Float(_) => key_len(4) + 8,
    }
}

fn put_any(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Str(s) => put_bytes(out, 1, s.as_bytes()),
        Value::Bool(b) => {
            key(out, 2, VARINT);
            out.push(u8::from(*b));
        }
        Value::Int(i) => {
            key(out, 3, VARINT);
            put_varint(out, *i as u64);
        }
        Value::Float(f) => {
            key(out, 4, I64);
            out.extend_from_slice(&f.to_le_bytes());
        }
    }
}

fn kv_len(k: &str, v: &Value) -> usize {
    str_len(1, k) + len_field(2, any_len(v))
}

fn put_kv(out: &mut Vec<u8>, tag: u32, k: &str, v: &Value) {
    put_len(out, tag, kv_len(k, v));
    put_str(out, 1, k);
    put_len(out, 2, any_len(v));
    put_any(out, v);
}

fn attrs_len(tag: u32, attrs: &[(&'static str, Value)]) -> usize {
    attrs.iter().map(|(k, v)| len_field(tag, kv_len(k, v))).sum()
}

fn put_attrs(out: &mut Vec<u8>, tag: u32, attrs: &[(&'static str, Value)]) {
    for (k, v) in attrs {
        put_kv(out, tag, k, v);
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
        + attrs_len(9, &r.attrs)
        + r.events.iter().map(|e| len_field(11, event_len(e))).sum::<usize>()
        + len_field(15, status_len(r))
}

fn event_len(e: &crate::trace::Event) -> usize {
    fixed64_len(1, e.time) + str_len(2, &e.name) + attrs_len(3, &e.attrs)
}

fn put_span(out: &mut Vec<u8>, r: &Record) {
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
    put_attrs(out, 9, &r.attrs);
    for e in &r.events {
        put_len(out, 11, event_len(e));
        put_fixed64(out, 1, e.time);
        put_str(out, 2, &e.name);
        put_attrs(out, 3, &e.attrs);
    }
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
            let v = Value::Str(v.clone().into());
            put_len(&mut r, 1, kv_len(k, &v));
            put_str(&mut r, 1, k);
            put_len(&mut r, 2, any_len(&v));
            put_any(&mut r, &v);
        }
        let mut scope = Vec::new();
        put_str(&mut scope, 1, "sllm");
        put_str(&mut scope, 2, env!("CARGO_PKG_VERSION"));
        Preamble { resource: r, scope }
    }

    /// An `ExportTraceServiceRequest` carrying `spans`, encoded into `out` (cleared first);
    /// `lens` is scratch space.
    pub fn encode(&self, spans: &[Record], out: &mut Vec<u8>, lens: &mut Vec<usize>) {
        out.clear();
        lens.clear();
        lens.extend(spans.iter().map(span_len));
        let spans_len: usize = lens.iter().map(|l| len_field(2, *l)).sum();
        let scope_spans = len_field(1, self.scope.len()) + spans_len;
        let resource_spans = len_field(1, self.resource.len()) + len_field(2, scope_spans);
        out.reserve(len_field(1, resource_spans));
        put_len(out, 1, resource_spans);
        put_bytes(out, 1, &self.resource);
        put_len(out, 2, scope_spans);
        put_bytes(out, 1, &self.scope);
        for (s, len) in spans.iter().zip(lens.iter()) {
            put_len(out, 2, *len);
            put_span(out, s);
        }
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
    use crate::trace::{Event, SpanContext};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1 as common;
    use opentelemetry_proto::tonic::trace::v1 as otlp;
    use prost::Message;

    fn any(v: &Value) -> common::AnyValue {
        use common::any_value::Value as V;
        common::AnyValue {
            value: Some(match v {
                Value::Str(s) => V::StringValue(s.to_string()),
                Value::Int(i) => V::IntValue(*i),
                Value::Float(f) => V::DoubleValue(*f),
                Value::Bool(b) => V::BoolValue(*b),
            }),
        }
    }

    fn kvs(attrs: &[(&'static str, Value)]) -> Vec<common::KeyValue> {
        attrs
            .iter()
            .map(|(k, v)| common::KeyValue {
                key: (*k).to_string(),
                value: Some(any(v)),
                ..Default::default()
            })
            .collect()
    }

    /// The same span built with the generated types: what the hand encoder must agree with.
    fn reference(r: &Record) -> otlp::Span {
        otlp::Span {
            trace_id: r.cx.trace_id.to_be_bytes().to_vec(),
            span_id: r.cx.span_id.to_be_bytes().to_vec(),
            parent_span_id: if r.parent == 0 { vec![] } else { r.parent.to_be_bytes().to_vec() },
            flags: 1,
            name: r.name.to_string(),
            kind: r.kind as i32,
            start_time_unix_nano: r.start,
            end_time_unix_nano: r.end,
            attributes: kvs(&r.attrs),
            events: r
                .events
                .iter()
                .map(|e| otlp::span::Event {
                    time_unix_nano: e.time,
                    name: e.name.clone(),
                    attributes: kvs(&e.attrs),
                    dropped_attributes_count: 0,
                })
                .collect(),
            status: Some(match &r.error {
                Some(m) => otlp::Status {
                    message: m.clone(),
                    code: otlp::status::StatusCode::Error as i32,
                },
                None => otlp::Status::default(),
            }),
            ..Default::default()
        }
    }

    fn record(parent: u64, error: Option<&str>, attrs: Vec<(&'static str, Value)>) -> Record {
        Record {
            cx: SpanContext { trace_id: u128::MAX - 7, span_id: 0x0102030405060708 },
            parent,
            name: "sllm.v1.Dispatch/Generate".into(),
            kind: otlp::span::SpanKind::Server,
            start: 1_700_000_000_000_000_000,
            end: 1_700_000_000_000_250_000,
            attrs,
            events: vec![Event {
                time: 1_700_000_000_000_100_000,
                name: "attempt failed".into(),
                attrs: vec![("level", Value::Str("INFO".into()))],
            }],
            error: error.map(String::from),
        }
    }

    #[test]
    fn hand_encoded_requests_decode_to_the_same_spans_as_the_generated_types() {
        let long = "x".repeat(300); // a length that takes a two-byte varint
        let spans = vec![
            record(
                0,
                None,
                vec![
                    ("gen_ai.request.model", Value::Str("m".into())),
                    ("gen_ai.request.max_tokens", Value::Int(0)),
                    ("sllm.attempts", Value::Int(-3)),
                    ("sllm.ttft_ms", Value::Float(0.25)),
                    ("sllm.retried", Value::Bool(false)),
                    ("empty", Value::Str("".into())),
                ],
            ),
            record(42, Some("worker_error"), vec![("long", Value::Str(long.into()))]),
            record(7, Some(""), vec![]),
            Record { events: vec![], name: "".into(), ..record(1, None, vec![]) },
        ];
        let resource = vec![("service.name".to_string(), "sllm-dispatch".to_string())];
        let mut bytes = Vec::new();
        Preamble::new(&resource).encode(&spans, &mut bytes, &mut Vec::new());
        let decoded = ExportTraceServiceRequest::decode(bytes.as_slice()).expect("valid protobuf");
        let [rs] = decoded.resource_spans.as_slice() else { panic!("one resource") };
        let attrs = &rs.resource.as_ref().expect("resource").attributes;
        assert_eq!(attrs.len(), 1);
        assert_eq!(attrs[0].key, "service.name");
        let [ss] = rs.scope_spans.as_slice() else { panic!("one scope") };
        assert_eq!(ss.scope.as_ref().map(|s| s.name.as_str()), Some("sllm"));
        let expected: Vec<otlp::Span> = spans.iter().map(reference).collect();
        assert_eq!(ss.spans, expected);
        // And byte for byte the length prost computes.
        assert_eq!(bytes.len(), decoded.encoded_len());
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
