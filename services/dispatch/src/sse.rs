//! Server-sent events for the OpenAI streams: each message from the request's driver (one
//! token, or several already waiting) goes out as one body frame holding all its events, and a
//! comment line after a quiet spell keeps proxies from closing an idle stream.
//!
//! One frame per message, not per event: hyper writes a frame's chunk header and trailer around
//! it, so a message of eight events costs one chunk instead of eight. The events themselves stay
//! one per token; the client sees the same `data:` lines either way.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use futures::Stream;
use http_body_util::StreamBody;
use hyper::body::Frame;
use tokio::time::{Instant, Sleep};

/// What a quiet stream sends: an SSE comment, which clients skip.
const KEEP_ALIVE: &[u8] = b":\n\n";

/// The end of an OpenAI stream.
pub(crate) const DONE: &str = "[DONE]";

/// Appends `payload` as one event: a `data:` line per line of it (SSE cannot carry a line
/// break inside a field), then the blank line that ends the event.
pub(crate) fn push_event(out: &mut BytesMut, payload: &str) {
    out.reserve(payload.len() + 8);
    // Serialized JSON has no raw line breaks: one line, found with one SIMD scan (splitting on
    // a set of chars walks the text a char at a time, a sixteenth of Dispatch's streaming CPU).
    if memchr::memchr2(b'\n', b'\r', payload.as_bytes()).is_none() {
        out.put_slice(b"data: ");
        out.put_slice(payload.as_bytes());
        out.put_slice(b"\n\n");
        return;
    }
    for line in payload.split(['\n', '\r']) {
        out.put_slice(b"data: ");
        out.put_slice(line.as_bytes());
        out.put_u8(b'\n');
    }
    out.put_u8(b'\n');
}

/// Appends `payload`, a JSON object, as one event named by its `type` field (`event: <type>`,
/// as the Responses API's typed events are sent); one without a `type` goes unnamed.
pub(crate) fn push_named_event(out: &mut BytesMut, payload: &str) {
    #[derive(serde::Deserialize)]
    struct Typed<'a> {
        #[serde(borrow, rename = "type")]
        kind: Option<std::borrow::Cow<'a, str>>,
    }
    let kind = serde_json::from_str::<Typed<'_>>(payload).ok().and_then(|t| t.kind);
    // A name holds no line break (SSE could not carry it).
    if let Some(kind) = kind.filter(|k| memchr::memchr2(b'\n', b'\r', k.as_bytes()).is_none()) {
        out.put_slice(b"event: ");
        out.put_slice(kind.as_bytes());
        out.put_u8(b'\n');
    }
    push_event(out, payload);
}

/// A response streaming `frames` (each already framed by [`push_event`]) as `text/event-stream`,
/// with a keep-alive comment after every `keep_alive` without a frame.
pub(crate) fn response<S>(frames: S, keep_alive: Duration) -> Response
where
    S: Stream<Item = Bytes> + Send + Unpin + 'static,
{
    let body = KeepAlive {
        frames,
        every: keep_alive,
        last: Instant::now(),
        timer: Box::pin(tokio::time::sleep(keep_alive)),
        ended: false,
    };
    let body =
        StreamBody::new(futures::StreamExt::map(body, |b| Ok::<_, Infallible>(Frame::data(b))));
    (
        [(header::CONTENT_TYPE, "text/event-stream"), (header::CACHE_CONTROL, "no-cache")],
        Body::new(body),
    )
        .into_response()
}

/// Frames, with a comment whenever none came for `every`. The timer is not reset per frame
/// (that is a timer-wheel update per token): when it fires early it is moved to `every` after
/// the last frame instead.
struct KeepAlive<S> {
    frames: S,
    every: Duration,
    last: Instant,
    timer: Pin<Box<Sleep>>,
    ended: bool,
}

impl<S: Stream<Item = Bytes> + Unpin> Stream for KeepAlive<S> {
    type Item = Bytes;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.frames).poll_next(cx) {
            Poll::Ready(Some(b)) => {
                self.last = Instant::now();
                return Poll::Ready(Some(b));
            }
            Poll::Ready(None) => {
                self.ended = true;
                return Poll::Ready(None);
            }
            Poll::Pending => {}
        }
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let due = self.last + self.every;
            let now = Instant::now();
            if due > now {
                // A frame came since the timer was set: wait out the rest from that frame.
                self.timer.as_mut().reset(due);
                continue;
            }
            let every = self.every;
            self.last = now;
            self.timer.as_mut().reset(now + every);
            return Poll::Ready(Some(Bytes::from_static(KEEP_ALIVE)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[test]
    fn a_payload_with_line_breaks_becomes_one_event_of_several_data_lines() {
        let mut out = BytesMut::new();
        push_event(&mut out, "{\"a\":1}");
        push_event(&mut out, "one\ntwo\r\nthree");
        assert_eq!(
            &out[..],
            b"data: {\"a\":1}\n\ndata: one\ndata: two\ndata: \ndata: three\n\n".as_slice()
        );
    }

    #[test]
    fn a_typed_payload_is_named_by_its_type() {
        let mut out = BytesMut::new();
        push_named_event(&mut out, r#"{"type":"response.output_text.delta","delta":"hi"}"#);
        push_named_event(&mut out, r#"{"delta":"untyped"}"#);
        push_named_event(&mut out, r#"{"type":"a\nb"}"#);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"hi\"}\n\n\
             data: {\"delta\":\"untyped\"}\n\n\
             data: {\"type\":\"a\\nb\"}\n\n"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_stream_gets_a_comment_and_a_busy_one_does_not() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        let response =
            response(tokio_stream::wrappers::ReceiverStream::new(rx), Duration::from_secs(15));
        assert_eq!(response.headers()[header::CONTENT_TYPE], "text/event-stream");
        let mut body = response.into_body().into_data_stream();
        // Events every 10 s: never 15 s of silence, so no comment in between.
        for i in 0..3 {
            tokio::time::sleep(Duration::from_secs(10)).await;
            tx.send(Bytes::from(format!("data: {i}\n\n"))).await.unwrap();
            assert_eq!(body.next().await.unwrap().unwrap(), format!("data: {i}\n\n"));
        }
        // Then silence: a comment 15 s after the last event, and again 15 s later.
        let quiet = Instant::now();
        assert_eq!(&body.next().await.unwrap().unwrap()[..], KEEP_ALIVE);
        assert_eq!(quiet.elapsed(), Duration::from_secs(15));
        assert_eq!(&body.next().await.unwrap().unwrap()[..], KEEP_ALIVE);
        assert_eq!(quiet.elapsed(), Duration::from_secs(30));
        drop(tx);
        assert!(body.next().await.is_none());
    }
}
