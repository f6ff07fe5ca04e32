//! sllm's span pipeline: request-path spans recorded directly ([`Span`]), other `tracing` spans
//! turned into the same records by a small layer ([`SpanLayer`]), and both exported over
//! OTLP/gRPC in batches by one background thread.
//!
//! It does what a general OpenTelemetry SDK does for sllm, at a fraction of the cost per span,
//! which is what lets every request be traced at full load: a span's record is one buffer its
//! attributes and events are written into as OTLP protobuf when they are set; the thread that
//! ends the span appends it, encoded, to that thread's own part of the export queue, whose lock
//! only the exporter also takes, once per batch; nothing wakes the exporter until a batch is
//! full or the schedule delay has passed, and the exporter only wraps and sends what it takes.
//! There is no per-span sampler call, no context object, no timing at enter and exit. Sampling
//! is decided once per request, before any span exists ([`Span::request`]).
//!
//! Which spans are recorded: a span whose parent is recorded, a span made the child of a sampled
//! remote context ([`set_remote_parent`]), and a span with no parent at all (callers decide
//! whether to create those). A span under an unrecorded parent is not recorded.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::trace::v1 as otlp;
use tracing::field::{Field, Visit};
use tracing::span;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

use crate::otlp as encode;

/// A span's identity in its trace, as W3C trace context carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpanContext {
    /// The trace's id (never 0).
    pub trace_id: u128,
    /// The span's id (never 0).
    pub span_id: u64,
}

impl SpanContext {
    /// The `traceparent` header value naming this span as a sampled parent.
    pub fn traceparent(&self) -> String {
        let mut b = *b"00-00000000000000000000000000000000-0000000000000000-01";
        put_hex(&mut b[3..19], (self.trace_id >> 64) as u64);
        put_hex(&mut b[19..35], self.trace_id as u64);
        put_hex(&mut b[36..52], self.span_id);
        // Only ASCII hex digits and dashes were written.
        String::from_utf8(b.to_vec()).unwrap_or_default()
    }

    /// Parses a W3C `traceparent` (version 00, or a later version read as 00): the context and
    /// its sampled flag; None when malformed or when an id is all zeros.
    pub fn parse(traceparent: &str) -> Option<(SpanContext, bool)> {
        // Fixed layout: vv-<32 hex>-<16 hex>-ff, then more fields only after version 00.
        let b = traceparent.trim().as_bytes();
        if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let version = hex(&b[0..2])?;
        if version == 0xff || (version == 0 && b.len() != 55) || (b.len() > 55 && b[55] != b'-') {
            return None;
        }
        let trace_id = (u128::from(hex(&b[3..19])?) << 64) | u128::from(hex(&b[19..35])?);
        let span_id = hex(&b[36..52])?;
        let flags = hex(&b[53..55])?;
        (trace_id != 0 && span_id != 0)
            .then_some((SpanContext { trace_id, span_id }, flags & 1 == 1))
    }
}

/// Each byte's value as a hex digit; 0xff when it is not one.
const HEX_VALUE: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        t[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

/// Hex digits (at most 16) as a number; None when any is not one.
fn hex(digits: &[u8]) -> Option<u64> {
    let mut acc = 0u64;
    let mut bad = 0u8;
    for &d in digits {
        let v = HEX_VALUE[usize::from(d)];
        bad |= v;
        acc = (acc << 4) | u64::from(v & 0xf);
    }
    // A non-digit is 0xff, whose high bit no digit has.
    (bad & 0x80 == 0).then_some(acc)
}

/// Writes `v` as lower-case hex digits filling `out` (16 of them for a whole u64).
fn put_hex(out: &mut [u8], mut v: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for d in out.iter_mut().rev() {
        *d = DIGITS[(v & 0xf) as usize];
        v >>= 4;
    }
}

thread_local! {
    /// Span and trace ids: a fast generator per thread, seeded from the thread's CSPRNG (ids
    /// must be unique and unguessable enough to be sampled on, not secret).
    static ID_RNG: std::cell::RefCell<rand::rngs::SmallRng> =
        std::cell::RefCell::new(rand::SeedableRng::from_rng(&mut rand::rng()));
}

/// A random id that is not 0 (0 means "no id" in trace context).
fn random_id<T: PartialEq + Default>() -> T
where
    rand::distr::StandardUniform: rand::distr::Distribution<T>,
{
    use rand::Rng;
    loop {
        let id = ID_RNG.try_with(|r| r.borrow_mut().random()).unwrap_or_else(|_| rand::random());
        if id != T::default() {
            return id;
        }
    }
}

fn new_trace_id() -> u128 {
    random_id()
}

fn new_span_id() -> u64 {
    random_id()
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// An attribute's value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value<'a> {
    /// Text.
    Str(&'a str),
    /// A whole number.
    Int(i64),
    /// A floating-point number.
    Float(f64),
    /// A flag.
    Bool(bool),
}

impl<'a> From<&'a str> for Value<'a> {
    fn from(v: &'a str) -> Self {
        Value::Str(v)
    }
}
impl<'a> From<&'a String> for Value<'a> {
    fn from(v: &'a String) -> Self {
        Value::Str(v)
    }
}
impl From<i64> for Value<'_> {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<u64> for Value<'_> {
    fn from(v: u64) -> Self {
        Value::Int(v.min(i64::MAX as u64) as i64)
    }
}
impl From<u32> for Value<'_> {
    fn from(v: u32) -> Self {
        Value::Int(i64::from(v))
    }
}
impl From<usize> for Value<'_> {
    fn from(v: usize) -> Self {
        Value::from(v as u64)
    }
}
impl From<f64> for Value<'_> {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}
impl From<bool> for Value<'_> {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}

/// A recorded span: in a [`Span`], or in a `tracing` span's registry extensions, until it ends.
///
/// Attributes and events are written as OTLP protobuf the moment they are set, into one buffer
/// the exporter copies as it is: a span costs one allocation however many attributes it has,
/// and nothing is encoded twice.
pub(crate) struct Record {
    pub cx: SpanContext,
    /// The parent's span id; 0 for a root.
    pub parent: u64,
    pub name: Cow<'static, str>,
    pub kind: otlp::span::SpanKind,
    pub start: u64,
    pub end: u64,
    /// The span's attributes and events, as the OTLP `Span` fields that carry them.
    pub fields: Vec<u8>,
    /// One bit per attribute key set so far, from a hash of the key: most keys are set once,
    /// and a clear bit says so without scanning `fields` for an earlier value.
    keys: u64,
    /// Set when the span failed: its status is then an error with this message.
    pub error: Option<String>,
}

impl Record {
    pub(crate) fn new(
        name: &'static str,
        kind: otlp::span::SpanKind,
        cx: SpanContext,
        parent: u64,
    ) -> Record {
        Record {
            cx,
            parent,
            name: Cow::Borrowed(name),
            kind,
            start: now_ns(),
            end: 0,
            fields: Vec::with_capacity(256),
            keys: 0,
            error: None,
        }
    }

    /// Sets attribute `key`, replacing an earlier value.
    pub(crate) fn set(&mut self, key: &str, value: Value<'_>) {
        // Length and last byte tell apart the keys a span usually carries.
        let hash = key.len().wrapping_mul(31) ^ usize::from(key.bytes().last().unwrap_or(0));
        let bit = 1u64 << (hash % 64);
        if self.keys & bit != 0 {
            encode::remove_attr(&mut self.fields, key);
        }
        self.keys |= bit;
        encode::put_attr(&mut self.fields, key, value);
    }

    pub(crate) fn fail(&mut self, message: &str) {
        self.error = Some(message.to_string());
    }

    pub(crate) fn event(&mut self, time: u64, name: &str, attrs: &[(&str, Value<'_>)]) {
        let mut body = Vec::new();
        for (k, v) in attrs {
            encode::put_kv(&mut body, encode::EVENT_ATTRIBUTE, k, *v);
        }
        encode::put_event(&mut self.fields, time, name, &body);
    }

    /// Records a field of a `tracing` span. `otel.name`, `otel.kind`, `otel.status_message`
    /// and `otel.status_code` set the span's name, kind and error status instead of becoming
    /// attributes; `error.type` is kept as an attribute and marks the span failed.
    fn field(&mut self, key: &str, value: Value<'_>) {
        match (key, value) {
            ("otel.name", Value::Str(s)) => self.name = Cow::Owned(s.to_string()),
            ("otel.kind", Value::Str(s)) => self.kind = kind(s),
            ("otel.status_message", Value::Str(s)) => self.error = Some(s.to_string()),
            ("otel.status_code", Value::Str(s)) => {
                if s.eq_ignore_ascii_case("error") && self.error.is_none() {
                    self.error = Some(String::new());
                }
            }
            _ => {
                if let ("error.type", Value::Str(s)) = (key, value)
                    && self.error.is_none()
                {
                    self.error = Some(s.to_string());
                }
                self.set(key, value);
            }
        }
    }
}

/// Hands the fields of a `tracing` span or event to `f` as values.
struct Fields<F: FnMut(&str, Value<'_>)>(F);

impl<F: FnMut(&str, Value<'_>)> Visit for Fields<F> {
    fn record_str(&mut self, field: &Field, value: &str) {
        (self.0)(field.name(), Value::Str(value));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        (self.0)(field.name(), Value::Str(&format!("{value:?}")));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        (self.0)(field.name(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        (self.0)(field.name(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        (self.0)(field.name(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        (self.0)(field.name(), value.into());
    }
}

fn kind(s: &str) -> otlp::span::SpanKind {
    use otlp::span::SpanKind as K;
    match s {
        "server" => K::Server,
        "client" => K::Client,
        "producer" => K::Producer,
        "consumer" => K::Consumer,
        _ => K::Internal,
    }
}

/// Records spans (see the module's words on which) and queues them for export when they close.
pub(crate) struct SpanLayer {
    queue: Arc<Queue>,
}

impl<S> tracing_subscriber::Layer<S> for SpanLayer
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let (trace_id, parent) = match span.parent() {
            Some(p) => match p.extensions().get::<Record>() {
                Some(r) => (r.cx.trace_id, r.cx.span_id),
                None => return,
            },
            None => (new_trace_id(), 0),
        };
        let cx = SpanContext { trace_id, span_id: new_span_id() };
        let mut record =
            Record::new(attrs.metadata().name(), otlp::span::SpanKind::Internal, cx, parent);
        attrs.record(&mut Fields(|k, v| record.field(k, v)));
        span.extensions_mut().insert(record);
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        if let Some(r) = span.extensions_mut().get_mut::<Record>() {
            values.record(&mut Fields(|k, v| r.field(k, v)));
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.event_span(event) else { return };
        let mut ext = span.extensions_mut();
        let Some(r) = ext.get_mut::<Record>() else { return };
        let (mut message, mut body) = (None, Vec::new());
        event.record(&mut Fields(|k, v| match (k, v) {
            ("message", Value::Str(m)) => message = Some(m.to_string()),
            _ => encode::put_kv(&mut body, encode::EVENT_ATTRIBUTE, k, v),
        }));
        let level = *event.metadata().level();
        encode::put_kv(&mut body, encode::EVENT_ATTRIBUTE, "level", level.as_str().into());
        let name = message.unwrap_or_else(|| event.metadata().name().to_string());
        encode::put_event(&mut r.fields, now_ns(), &name, &body);
        if level == tracing::Level::ERROR && r.error.is_none() {
            r.error = Some(name);
        }
    }

    fn on_close(&self, id: span::Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let record = span.extensions_mut().remove::<Record>();
        if let Some(r) = record {
            self.queue.end(r);
        }
    }
}

/// Runs `f` on the registry extensions of `span` (None when it has none: disabled, or not in
/// sllm's subscriber).
fn with_extensions<T>(
    span: &tracing::Span,
    f: impl FnOnce(&mut tracing_subscriber::registry::ExtensionsMut<'_>) -> Option<T>,
) -> Option<T> {
    span.with_subscriber(|(id, dispatch)| {
        let registry = dispatch.downcast_ref::<tracing_subscriber::Registry>()?;
        f(&mut registry.span(id)?.extensions_mut())
    })
    .flatten()
}

fn with_record<T>(span: &tracing::Span, f: impl FnOnce(&mut Record) -> T) -> Option<T> {
    with_extensions(span, |ext| ext.get_mut::<Record>().map(f))
}

/// The context of `span` if it is recorded.
pub fn context(span: &tracing::Span) -> Option<SpanContext> {
    with_record(span, |r| r.cx)
}

/// Makes recorded `span` the child of the remote span `cx`, in its trace; when the remote side
/// did not sample its trace, `span` is no longer recorded. Call it before `span` has children.
pub fn set_remote_parent(span: &tracing::Span, cx: SpanContext, sampled: bool) {
    if sampled {
        with_record(span, |r| {
            r.cx.trace_id = cx.trace_id;
            r.parent = cx.span_id;
        });
    } else {
        with_extensions(span, |ext| ext.remove::<Record>());
    }
}

/// The running exporter's queue, for spans recorded without `tracing`.
static QUEUE: std::sync::OnceLock<Arc<Queue>> = std::sync::OnceLock::new();

/// How a [`Span`] relates to the other side of a call (OpenTelemetry's span kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Work inside one process.
    Internal,
    /// Handling a call from a client.
    Server,
    /// A call to a server.
    Client,
}

impl Kind {
    fn proto(self) -> otlp::span::SpanKind {
        match self {
            Kind::Internal => otlp::span::SpanKind::Internal,
            Kind::Server => otlp::span::SpanKind::Server,
            Kind::Client => otlp::span::SpanKind::Client,
        }
    }
}

/// A span recorded directly, without `tracing`: for the request path, where the bookkeeping of
/// a `tracing` span (registry slot, extensions, per-layer filters, field visitors) costs more
/// than the rest of a warm request's tracing. Its owner changes it (no lock); it ends when
/// dropped. A span that is not recording ([`Span::none`], or anything started while no
/// exporter runs or the trace is not sampled) costs nothing and ignores everything.
#[derive(Default)]
pub struct Span(Option<Record>);

impl Span {
    /// A span that records nothing.
    pub fn none() -> Span {
        Span(None)
    }

    /// The span of a request arriving with `traceparent` (may be empty): recording when an
    /// exporter runs and, for the configured share of requests (`OTEL_TRACES_SAMPLER`), or as
    /// the caller's sampled flag says when the operator trusts it
    /// ([`crate::set_trust_client_sampling`]); the child of the caller's span when the caller
    /// sent a valid context (so a sampled request joins the caller's trace either way), else
    /// the root of a new trace.
    pub fn request(name: &'static str, kind: Kind, traceparent: &str) -> Span {
        let caller = SpanContext::parse(traceparent);
        if !crate::sample(caller.map(|(_, sampled)| sampled)) {
            return Span::none();
        }
        match caller {
            Some((cx, _)) => Span::start(name, kind, cx.trace_id, cx.span_id),
            None => Span::start(name, kind, new_trace_id(), 0),
        }
    }

    /// A span that continues the sampled remote context `traceparent`; not recording when the
    /// context is missing, malformed or not sampled, or no exporter runs.
    pub fn remote_child(name: &'static str, kind: Kind, traceparent: &str) -> Span {
        if !crate::EXPORTING.load(Ordering::Relaxed) {
            return Span::none();
        }
        match SpanContext::parse(traceparent) {
            Some((cx, true)) => Span::start(name, kind, cx.trace_id, cx.span_id),
            _ => Span::none(),
        }
    }

    /// A child of this span (not recording when this one is not).
    pub fn child(&self, name: &'static str, kind: Kind) -> Span {
        match self.context() {
            Some(cx) => Span::start(name, kind, cx.trace_id, cx.span_id),
            None => Span::none(),
        }
    }

    fn start(name: &'static str, kind: Kind, trace_id: u128, parent: u64) -> Span {
        let cx = SpanContext { trace_id, span_id: new_span_id() };
        Span(Some(Record::new(name, kind.proto(), cx, parent)))
    }

    /// Whether this span records anything.
    pub fn is_recording(&self) -> bool {
        self.0.is_some()
    }

    /// This span's context, when it is recording.
    pub fn context(&self) -> Option<SpanContext> {
        self.0.as_ref().map(|r| r.cx)
    }

    /// The `traceparent` naming this span (empty when it is not recording).
    pub fn traceparent(&self) -> String {
        self.context().map(|cx| cx.traceparent()).unwrap_or_default()
    }

    /// Sets attribute `key` (replacing an earlier value).
    pub fn set<'a>(&mut self, key: &str, value: impl Into<Value<'a>>) {
        if let Some(r) = &mut self.0 {
            r.set(key, value.into());
        }
    }

    /// Marks the span failed, with why.
    pub fn fail(&mut self, message: &str) {
        if let Some(r) = &mut self.0 {
            r.fail(message);
        }
    }

    /// Adds a timestamped event, e.g. what a log line says.
    pub fn event(&mut self, name: &str, attrs: &[(&str, Value<'_>)]) {
        if let Some(r) = &mut self.0 {
            r.event(now_ns(), name, attrs);
        }
    }

    /// Makes `span` (a `tracing` span) a child of this one, so that what runs inside it joins
    /// this trace. Call it before `span` has children.
    pub fn adopt(&self, span: &tracing::Span) {
        if let Some(cx) = self.context() {
            set_remote_parent(span, cx, true);
        }
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        if let (Some(r), Some(q)) = (self.0.take(), QUEUE.get()) {
            q.end(r);
        }
    }
}

impl std::fmt::Debug for Span {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.context() {
            Some(cx) => write!(f, "Span({})", cx.traceparent()),
            None => f.write_str("Span(none)"),
        }
    }
}

/// Finished spans waiting for the exporter, already encoded. Each thread that ends spans
/// writes them (a few hundred bytes each) into a shard of its own, under a lock no other thread
/// takes except the exporter when it collects; so threads ending spans at the same time do not
/// contend or pass cache lines between cores, the exporter never reads another thread's
/// records, and no record is freed across threads.
pub(crate) struct Queue {
    /// Tells a thread's shard of this queue from that of another (tests run several).
    id: u64,
    /// Every thread's shard, in the order they first ended a span, after `shared`.
    shards: Mutex<Vec<Arc<Shard>>>,
    /// Where spans ended by a thread that is being torn down go.
    shared: Arc<Shard>,
    /// Set when a shard holds a full batch, or at shutdown.
    signal: Mutex<Signal>,
    wake: Condvar,
    /// Spans one shard holds at most; beyond, spans are dropped.
    max_queue: usize,
    batch: usize,
    dropped: AtomicU64,
}

#[derive(Default)]
struct Signal {
    batch_ready: bool,
    shutdown: bool,
}

/// One thread's spans.
#[derive(Default)]
struct Shard(Mutex<Spans>);

/// Encoded spans.
#[derive(Default)]
pub(crate) struct Spans {
    /// The spans, each an encoded `ScopeSpans.spans` entry.
    pub bytes: Vec<u8>,
    /// Where each span ends in `bytes`.
    pub ends: Vec<usize>,
}

impl Shard {
    fn lock(&self) -> MutexGuard<'_, Spans> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

thread_local! {
    /// This thread's shard of each queue it has ended spans in, by queue id.
    static SHARDS: std::cell::RefCell<Vec<(u64, Arc<Shard>)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

impl Queue {
    pub(crate) fn new(max_queue: usize, batch: usize) -> Queue {
        static IDS: AtomicU64 = AtomicU64::new(0);
        let shared = Arc::new(Shard::default());
        Queue {
            id: IDS.fetch_add(1, Ordering::Relaxed),
            shards: Mutex::new(vec![shared.clone()]),
            shared,
            signal: Mutex::default(),
            wake: Condvar::new(),
            max_queue,
            batch,
            dropped: AtomicU64::new(0),
        }
    }

    fn signal(&self) -> MutexGuard<'_, Signal> {
        self.signal.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_shards(&self) -> MutexGuard<'_, Vec<Arc<Shard>>> {
        self.shards.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on this thread's shard, made and registered on first use; on the shared one
    /// while the thread is being torn down.
    fn with_shard<R>(&self, mut f: impl FnMut(&Shard) -> R) -> R {
        SHARDS
            .try_with(|shards| {
                let mut shards = shards.borrow_mut();
                if let Some((_, shard)) = shards.iter().find(|(id, _)| *id == self.id) {
                    return f(shard);
                }
                let shard = Arc::new(Shard::default());
                self.lock_shards().push(shard.clone());
                let r = f(&shard);
                shards.push((self.id, shard));
                r
            })
            .unwrap_or_else(|_| f(&self.shared))
    }

    /// Ends `record` now and queues it.
    fn end(&self, mut record: Record) {
        record.end = now_ns();
        let full = self.with_shard(|shard| {
            let mut s = shard.lock();
            if s.ends.len() >= self.max_queue {
                return None;
            }
            encode::put_span(&mut s.bytes, &record);
            let end = s.bytes.len();
            s.ends.push(end);
            Some(s.ends.len() == self.batch)
        });
        match full {
            None => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                crate::metrics::TRACES.dropped.inc();
            }
            // One wake-up per batch, not per span.
            Some(true) => {
                self.signal().batch_ready = true;
                self.wake.notify_one();
            }
            Some(false) => {}
        }
    }

    /// Waits until a shard holds a full batch, shutdown, or `delay` has passed; then moves
    /// every shard's spans into `taken` (one entry per shard, reused), dropping the shards of
    /// threads that have ended. Returns whether the queue is shutting down.
    fn take(&self, delay: Duration, taken: &mut Vec<Spans>) -> bool {
        let stop = {
            let deadline = Instant::now() + delay;
            let mut s = self.signal();
            while !s.batch_ready && !s.shutdown {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                s = self.wake.wait_timeout(s, left).unwrap_or_else(PoisonError::into_inner).0;
            }
            s.batch_ready = false;
            s.shutdown
        };
        let mut shards = self.lock_shards();
        taken.resize_with(shards.len(), Spans::default);
        for (shard, out) in shards.iter().zip(taken.iter_mut()) {
            let mut s = shard.lock();
            std::mem::swap(&mut s.bytes, &mut out.bytes);
            std::mem::swap(&mut s.ends, &mut out.ends);
        }
        // A shard only this list holds belongs to a thread that has ended; what it held is in
        // `taken` now.
        shards.retain(|shard| Arc::strong_count(shard) > 1);
        stop
    }

    fn shutdown(&self) {
        self.signal().shutdown = true;
        self.wake.notify_one();
    }
}

/// Where and how spans are exported: the standard `OTEL_*` variables.
#[derive(Debug, Clone)]
pub(crate) struct ExportConfig {
    pub endpoint: String,
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
    pub gzip: bool,
    pub ca: Option<String>,
    pub client_cert: Option<(String, String)>,
    pub schedule_delay: Duration,
    pub max_queue: usize,
    pub batch: usize,
    pub resource: Vec<(String, String)>,
}

fn var(specific: &str, general: &str) -> Option<String> {
    std::env::var(specific)
        .ok()
        .or_else(|| std::env::var(general).ok())
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

fn millis(name: &str, default: u64) -> Duration {
    Duration::from_millis(
        std::env::var(name).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(default),
    )
}

fn count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|n: &usize| *n > 0)
        .unwrap_or(default)
}

/// `k=v,k2=v2` with percent-encoded values (the OTel list format).
fn pairs(list: &str) -> Vec<(String, String)> {
    list.split(',')
        .filter_map(|p| {
            let (k, v) = p.split_once('=')?;
            let (k, v) = (k.trim(), v.trim());
            (!k.is_empty()).then(|| (k.to_string(), percent_decode(v)))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl ExportConfig {
    /// The configuration from the environment, for `service`; None when traces are not to be
    /// exported (no endpoint, `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`); the
    /// warnings to log once logging is up.
    pub fn from_env(service: &str) -> (Option<ExportConfig>, Vec<String>) {
        let mut warnings = Vec::new();
        let disabled = std::env::var("OTEL_SDK_DISABLED")
            .map(|v| v.trim().eq_ignore_ascii_case("true"))
            .unwrap_or(false);
        let exporter = std::env::var("OTEL_TRACES_EXPORTER").unwrap_or_default();
        let exporter = exporter.trim();
        if disabled || exporter == "none" {
            return (None, warnings);
        }
        if !exporter.is_empty() && exporter != "otlp" {
            warnings.push(format!("OTEL_TRACES_EXPORTER={exporter} is not supported; using otlp"));
        }
        let Some(endpoint) =
            var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
        else {
            return (None, warnings);
        };
        if let Some(p) = var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
            && p != "grpc"
        {
            warnings.push(format!(
                "OTLP protocol {p} is not supported; exporting over grpc (Jaeger and the \
                 OpenTelemetry Collector take it on port 4317)"
            ));
        }
        let headers = var("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS")
            .map(|h| pairs(&h))
            .unwrap_or_default();
        let timeout = var("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT")
            .and_then(|t| t.parse().ok())
            .map(Duration::from_millis)
            .unwrap_or(Duration::from_secs(10))
            .min(millis("OTEL_BSP_EXPORT_TIMEOUT", 30_000));
        let gzip =
            match var("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "OTEL_EXPORTER_OTLP_COMPRESSION")
                .as_deref()
            {
                Some("gzip") => true,
                None | Some("none") => false,
                Some(other) => {
                    warnings
                        .push(format!("OTLP compression {other} is not supported; sending plain"));
                    false
                }
            };
        let ca = var("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", "OTEL_EXPORTER_OTLP_CERTIFICATE");
        let client_cert = match (
            var(
                "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
                "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
            ),
            var("OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", "OTEL_EXPORTER_OTLP_CLIENT_KEY"),
        ) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => {
                warnings.push(
                    "OTLP client certificate and key must be given together; sending neither"
                        .into(),
                );
                None
            }
        };
        let max_queue = count("OTEL_BSP_MAX_QUEUE_SIZE", 2048);
        let batch = count("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512).min(max_queue);
        let mut resource =
            std::env::var("OTEL_RESOURCE_ATTRIBUTES").map(|r| pairs(&r)).unwrap_or_default();
        let name = std::env::var("OTEL_SERVICE_NAME")
            .ok()
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .or_else(|| resource.iter().find(|(k, _)| k == "service.name").map(|(_, v)| v.clone()))
            .unwrap_or_else(|| service.to_string());
        resource.retain(|(k, _)| k != "service.name");
        resource.push(("service.name".into(), name));
        if !resource.iter().any(|(k, _)| k == "service.version") {
            resource.push(("service.version".into(), env!("CARGO_PKG_VERSION").into()));
        }
        resource.push(("telemetry.sdk.name".into(), "sllm".into()));
        resource.push(("telemetry.sdk.language".into(), "rust".into()));
        resource.push(("telemetry.sdk.version".into(), env!("CARGO_PKG_VERSION").into()));
        let config = ExportConfig {
            endpoint,
            headers,
            timeout,
            gzip,
            ca,
            client_cert,
            schedule_delay: millis("OTEL_BSP_SCHEDULE_DELAY", 5_000),
            max_queue,
            batch,
            resource,
        };
        (Some(config), warnings)
    }

    fn channel(&self) -> Result<tonic::transport::Channel, String> {
        use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
        let mut endpoint = Endpoint::from_shared(self.endpoint.clone())
            .map_err(|e| format!("OTLP endpoint {}: {e}", self.endpoint))?
            .tcp_nodelay(true)
            .timeout(self.timeout)
            .connect_timeout(self.timeout);
        if self.endpoint.starts_with("https://") {
            let read =
                |path: &str| std::fs::read(path).map_err(|e| format!("OTLP TLS file {path}: {e}"));
            let mut tls = ClientTlsConfig::new();
            tls = match &self.ca {
                Some(ca) => tls.ca_certificate(Certificate::from_pem(read(ca)?)),
                None => tls.with_webpki_roots(),
            };
            if let Some((cert, key)) = &self.client_cert {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            endpoint = endpoint.tls_config(tls).map_err(|e| format!("OTLP TLS: {e}"))?;
        }
        Ok(endpoint.connect_lazy())
    }
}

/// The running exporter: its queue and thread.
pub(crate) struct Exporter {
    queue: Arc<Queue>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Exporter {
    /// Starts the export thread; the layer that feeds it.
    pub fn start(config: ExportConfig) -> Result<(Exporter, SpanLayer), String> {
        let queue = Arc::new(Queue::new(config.max_queue, config.batch));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("OTLP export runtime: {e}"))?;
        let channel = {
            let _in_rt = rt.enter();
            config.channel()?
        };
        let q = queue.clone();
        // One exporter per process: the first one started takes spans recorded directly.
        let _ = QUEUE.set(queue.clone());
        let thread = std::thread::Builder::new()
            .name("sllm-otlp-export".into())
            .spawn(move || export_loop(&q, &config, &rt, channel))
            .map_err(|e| format!("OTLP export thread: {e}"))?;
        Ok((Exporter { queue: queue.clone(), thread: Some(thread) }, SpanLayer { queue }))
    }

    /// Exports what is queued and stops the thread (bounded by the export timeout).
    pub fn shutdown(&mut self) {
        self.queue.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Export requests of at most `batch` spans each, with how many spans each carries, from the
/// spans taken from every shard.
fn batches<'a>(
    taken: &'a [Spans],
    batch: usize,
    preamble: &'a crate::otlp::Preamble,
) -> impl Iterator<Item = (Vec<u8>, usize)> + 'a {
    // Each shard's spans in runs of at most `batch`, as (bytes, spans).
    let mut runs = taken.iter().flat_map(move |t| {
        let mut from = 0;
        t.ends.chunks(batch).map(move |ends| {
            let to = ends.last().copied().unwrap_or(from);
            let run = (&t.bytes[from..to], ends.len());
            from = to;
            run
        })
    });
    let mut next = runs.next();
    std::iter::from_fn(move || {
        let mut parts = Vec::new();
        let mut spans = 0;
        while let Some((bytes, n)) = next {
            if spans > 0 && spans + n > batch {
                break;
            }
            parts.push(bytes);
            spans += n;
            next = runs.next();
        }
        (spans > 0).then(|| (preamble.encode(&parts), spans))
    })
}

fn export_loop(
    queue: &Queue,
    config: &ExportConfig,
    rt: &tokio::runtime::Runtime,
    channel: tonic::transport::Channel,
) {
    let mut grpc = tonic::client::Grpc::new(channel);
    if config.gzip {
        grpc = grpc.send_compressed(tonic::codec::CompressionEncoding::Gzip);
    }
    let preamble = crate::otlp::Preamble::new(&config.resource);
    let headers: Vec<(tonic::metadata::AsciiMetadataKey, tonic::metadata::AsciiMetadataValue)> =
        config
            .headers
            .iter()
            .filter_map(|(k, v)| Some((k.to_ascii_lowercase().parse().ok()?, v.parse().ok()?)))
            .collect();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(crate::otlp::EXPORT_PATH);
    let metrics = &*crate::metrics::TRACES;
    let mut taken = Vec::new();
    let mut failing = false;
    loop {
        let stop = queue.take(config.schedule_delay, &mut taken);
        for (body, spans) in batches(&taken, config.batch, &preamble) {
            let mut request = tonic::Request::new(bytes::Bytes::from(body));
            request.set_timeout(config.timeout);
            for (k, v) in &headers {
                request.metadata_mut().insert(k.clone(), v.clone());
            }
            let call = async {
                grpc.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                grpc.unary(request, path.clone(), crate::otlp::RawCodec).await
            };
            let result = rt.block_on(async { tokio::time::timeout(config.timeout, call).await });
            match result {
                Ok(Ok(_)) => {
                    metrics.exported.inc_by(spans as u64);
                    if std::mem::take(&mut failing) {
                        tracing::info!(endpoint = %config.endpoint, "trace export works again");
                    }
                }
                failed => {
                    metrics.export_failures.inc();
                    metrics.dropped.inc_by(spans as u64);
                    let why = match failed {
                        Ok(Err(status)) => format!("{:?}: {}", status.code(), status.message()),
                        _ => format!("no answer within {:?}", config.timeout),
                    };
                    // Once per outage, not once per batch.
                    if !failing {
                        failing = true;
                        tracing::warn!(endpoint = %config.endpoint, error = %why, "trace export failed; spans are dropped until it works");
                    }
                }
            }
        }
        for t in &mut taken {
            t.bytes.clear();
            t.ends.clear();
        }
        if stop {
            let dropped = queue.dropped.load(Ordering::Relaxed);
            if dropped > 0 {
                tracing::info!(dropped, "spans dropped because the export queue was full");
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_rejects_malformed_values() {
        let cx = SpanContext {
            trace_id: 0x0af7651916cd43dd8448eb211c80319c,
            span_id: 0xb7ad6b7169203331,
        };
        assert_eq!(cx.traceparent(), "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        assert_eq!(SpanContext::parse(&cx.traceparent()), Some((cx, true)));
        assert_eq!(
            SpanContext::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"),
            Some((cx, false))
        );
        for bad in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "00-0af7651916cd43dd8448eb211c8031zz-b7ad6b7169203331-01",
            "00-+af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ] {
            assert_eq!(SpanContext::parse(bad), None, "{bad:?}");
        }
        // A later version may add fields; its first four are read as version 00's.
        assert_eq!(
            SpanContext::parse("01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-later"),
            Some((cx, true))
        );
    }

    #[test]
    fn tracing_spans_become_records_with_their_fields_events_and_status() {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use opentelemetry_proto::tonic::common::v1::any_value::Value as V;
        use prost::Message;
        use tracing_subscriber::layer::SubscriberExt;

        let queue = Arc::new(Queue::new(100, 100));
        let subscriber = tracing_subscriber::registry().with(SpanLayer { queue: queue.clone() });
        tracing::subscriber::with_default(subscriber, || {
            let outer = tracing::info_span!(
                "outer",
                otel.name = "EVALSHA demand_event",
                otel.kind = "client",
                db.system = "redis",
                sllm.rows = 3u64,
                later = tracing::field::Empty,
            );
            outer.record("later", 1.5);
            outer.record("later", 2.5);
            outer.in_scope(|| {
                let inner = tracing::info_span!("inner", error.type = "timeout");
                inner.in_scope(|| tracing::error!(attempt = 2, "gave up on {}", "redis"));
            });
        });
        let mut taken = Vec::new();
        queue.take(Duration::ZERO, &mut taken);
        let parts: Vec<&[u8]> = taken.iter().map(|t| t.bytes.as_slice()).collect();
        let bytes = crate::otlp::Preamble::new(&[]).encode(&parts);
        let decoded = ExportTraceServiceRequest::decode(bytes.as_slice()).expect("valid protobuf");
        let spans = &decoded.resource_spans[0].scope_spans[0].spans;
        let attrs = |i: usize| -> Vec<(String, Option<V>)> {
            spans[i]
                .attributes
                .iter()
                .map(|kv| (kv.key.clone(), kv.value.clone().and_then(|v| v.value)))
                .collect()
        };
        // Closed innermost first.
        let (inner, outer) = (&spans[0], &spans[1]);
        assert_eq!(outer.name, "EVALSHA demand_event");
        assert_eq!(outer.kind, otlp::span::SpanKind::Client as i32);
        assert_eq!(
            attrs(1),
            vec![
                ("db.system".into(), Some(V::StringValue("redis".into()))),
                ("sllm.rows".into(), Some(V::IntValue(3))),
                ("later".into(), Some(V::DoubleValue(2.5))),
            ],
            "otel.* fields are not attributes; a field recorded again keeps its last value"
        );
        assert_eq!(inner.name, "inner");
        assert_eq!(inner.parent_span_id, outer.span_id);
        assert_eq!(inner.trace_id, outer.trace_id);
        assert_eq!(attrs(0), vec![("error.type".into(), Some(V::StringValue("timeout".into())))]);
        let status = inner.status.as_ref().expect("a status");
        assert_eq!(status.code, otlp::status::StatusCode::Error as i32);
        assert_eq!(status.message, "timeout", "error.type marks the span failed");
        let [event] = inner.events.as_slice() else { panic!("one event") };
        assert_eq!(event.name, "gave up on redis");
        let event_attrs: Vec<(&str, Option<&V>)> = event
            .attributes
            .iter()
            .map(|kv| (kv.key.as_str(), kv.value.as_ref().and_then(|v| v.value.as_ref())))
            .collect();
        assert_eq!(
            event_attrs,
            vec![
                ("attempt", Some(&V::IntValue(2))),
                ("level", Some(&V::StringValue("ERROR".into())))
            ]
        );
        assert_eq!(outer.status.as_ref().map(|s| s.code), Some(0), "the outer span did not fail");
    }

    fn record(trace_id: u128, span_id: u64) -> Record {
        Record::new("s", otlp::span::SpanKind::Internal, SpanContext { trace_id, span_id }, 0)
    }

    #[test]
    fn spans_ended_on_many_threads_are_each_exported_once_in_bounded_batches() {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use prost::Message;

        let queue = Arc::new(Queue::new(1000, 64));
        let threads: Vec<_> = (1..=4u128)
            .map(|t| {
                let q = queue.clone();
                std::thread::spawn(move || (1..=100).for_each(|i| q.end(record(t, i))))
            })
            .collect();
        for t in threads {
            t.join().expect("thread ends its spans");
        }
        (1..=10).for_each(|i| queue.end(record(5, i)));

        let mut taken = Vec::new();
        queue.take(Duration::ZERO, &mut taken);
        let preamble = crate::otlp::Preamble::new(&[]);
        let mut seen = std::collections::HashSet::new();
        let mut requests = 0;
        for (body, n) in batches(&taken, 64, &preamble) {
            let decoded = ExportTraceServiceRequest::decode(body.as_slice()).expect("protobuf");
            let spans = &decoded.resource_spans[0].scope_spans[0].spans;
            assert_eq!(spans.len(), n, "the count sent with each request is its span count");
            assert!(n <= 64, "a request of {n} spans exceeds the batch size");
            for s in spans {
                assert!(seen.insert((s.trace_id.clone(), s.span_id.clone())), "sent twice");
            }
            requests += 1;
        }
        assert_eq!(seen.len(), 410, "every span ended on any thread is sent");
        assert!(requests <= 9, "runs of spans share requests: {requests}");
        assert_eq!(
            queue.lock_shards().len(),
            2,
            "the shards of threads that ended are let go; this thread's and the shared one stay"
        );
        queue.take(Duration::ZERO, &mut taken);
        assert_eq!(batches(&taken, 64, &preamble).count(), 0, "nothing is taken twice");
    }

    #[test]
    fn a_full_shard_drops_and_counts_what_does_not_fit() {
        let queue = Queue::new(5, 5);
        (1..=8).for_each(|i| queue.end(record(1, i)));
        let mut taken = Vec::new();
        queue.take(Duration::ZERO, &mut taken);
        assert_eq!(taken.iter().map(|t| t.ends.len()).sum::<usize>(), 5);
        assert_eq!(queue.dropped.load(Ordering::Relaxed), 3);
        (1..=2).for_each(|i| queue.end(record(2, i)));
        queue.take(Duration::ZERO, &mut taken);
        assert_eq!(taken.iter().map(|t| t.ends.len()).sum::<usize>(), 2, "room again once taken");
    }

    #[test]
    fn otel_lists_are_split_and_percent_decoded() {
        assert_eq!(
            pairs("api-key=a%20b, x = y ,=novalue,broken"),
            vec![("api-key".to_string(), "a b".to_string()), ("x".into(), "y".into())]
        );
        assert_eq!(percent_decode("100%"), "100%");
    }
}
