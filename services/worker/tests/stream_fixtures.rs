//! The engine stream reader against the streams and errors of real engines (vLLM, SGLang,
//! llama.cpp; `fixtures/README.md` says where each came from), cut into HTTP frames at every
//! byte: the text, the finish, the usage and the relayed events must come out the same wherever
//! a frame ends — inside a multi-byte character or between CR and LF included.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use sllm_api::v1 as pb;
use tokio::sync::mpsc;
use worker::openai::{self, Dialect, Reader, StreamLimits};
use worker::{Failure, FailureKind, Input, Job, Output};

fn fixtures() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut out = Vec::new();
    for engine in std::fs::read_dir(&dir).unwrap().flatten() {
        if !engine.path().is_dir() {
            continue;
        }
        for f in std::fs::read_dir(engine.path()).unwrap().flatten() {
            out.push(f.path());
        }
    }
    out.sort();
    out
}

/// What a stream says, read plainly line by line (not with the code under test).
#[derive(Debug, Default, PartialEq)]
struct Expected {
    text: String,
    events: usize,
    completion_tokens: Option<u32>,
    error: bool,
    logprobs: usize,
}

fn expected(raw: &str) -> Expected {
    let mut e = Expected::default();
    for line in raw.lines() {
        let Some(data) = line.strip_prefix("data:") else { continue };
        let data = data.trim();
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        if v.get("error").is_some() {
            e.error = true;
            break;
        }
        e.events += 1;
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            e.completion_tokens = Some(n as u32);
        }
        let c = &v["choices"][0];
        if let Some(t) = c["text"].as_str().or(c["delta"]["content"].as_str()) {
            e.text.push_str(t);
        }
        e.logprobs += c["logprobs"]["content"].as_array().map_or(0, Vec::len);
        e.logprobs += c["logprobs"]["tokens"].as_array().map_or(0, Vec::len);
    }
    e
}

fn job(relay: bool, chat: bool) -> Job {
    let endpoint =
        if chat { pb::OpenAiEndpoint::ChatCompletions } else { pb::OpenAiEndpoint::Completions };
    let openai = relay.then(|| pb::OpenAiRequest {
        endpoint: endpoint as i32,
        body: json!({"model": "m", "prompt": "p", "stream": true, "stream_options": {"include_usage": true}})
            .to_string(),
        response_id: "sllm-id".into(),
        created: 7,
        model: "m".into(),
    });
    let input = if chat {
        Input::Chat(vec![pb::ChatMessage { role: "user".into(), content: "hi".into() }])
    } else {
        Input::Prompt("p".into())
    };
    let params = pb::SamplingParams {
        max_tokens: 64,
        logprobs: !relay,
        top_logprobs: if relay { 0 } else { 2 },
        ..Default::default()
    };
    Job {
        instance_id: "i".into(),
        input,
        params,
        openai,
        traceparent: String::new(),
        adapter: None,
        baggage: String::new(),
        continuation: None,
    }
}

#[derive(Debug, Default)]
struct Got {
    text: String,
    events: Vec<String>,
    logprobs: usize,
    done: Option<Output>,
    result: Option<Result<(), Failure>>,
}

/// Five seconds for every event: the streams here come at once.
fn limits() -> StreamLimits {
    StreamLimits {
        first_event: Duration::from_secs(5),
        first_event_limit: Duration::from_secs(5),
        idle: Duration::from_secs(5),
    }
}

async fn read(frames: Vec<Vec<u8>>, relay: bool, chat: bool) -> Got {
    let call = openai::call(Dialect::Vllm, "m", &job(relay, chat)).unwrap();
    let reader = Reader::new(call);
    let (tx, mut rx) = mpsc::channel(4096);
    let limits = limits();
    let stream = futures::stream::iter(frames.into_iter().map(Ok::<_, std::convert::Infallible>));
    let result = openai::relay_stream(stream, reader, limits, &tx).await;
    drop(tx);
    let mut got = Got { result: Some(result), ..Default::default() };
    while let Some(o) = rx.recv().await {
        match o {
            Output::Text { text, events, logprobs, .. } => {
                got.text.push_str(&text);
                got.events.extend(events);
                got.logprobs += logprobs.len();
            }
            Output::Started => panic!("a relayed stream never says it started: its caller does"),
            done @ Output::Done { .. } => got.done = Some(done),
            Output::Error(f) => panic!("errors come back as the result: {f:?}"),
        }
    }
    got
}

fn check(path: &Path, raw: &[u8], got: &Got, relay: bool, cut: &str) {
    let text = String::from_utf8(raw.to_vec()).unwrap();
    let want = expected(&text);
    let name = format!("{} ({cut}, relay {relay})", path.display());
    assert_eq!(got.text, want.text, "{name}");
    if want.error {
        let f = got.result.clone().unwrap().expect_err(&name);
        assert_eq!(f.kind, FailureKind::Engine, "{name}");
        assert!(got.done.is_none(), "{name}: no normal finish after an error");
        return;
    }
    assert_eq!(got.result, Some(Ok(())), "{name}");
    let Some(Output::Done { completion_tokens, .. }) = &got.done else {
        panic!("{name}: no finish")
    };
    if let Some(n) = want.completion_tokens {
        assert_eq!(*completion_tokens, n, "{name}: the engine's usage");
    }
    if relay {
        assert_eq!(got.events.len(), want.events, "{name}: every event relayed");
        for e in &got.events {
            let v: Value = serde_json::from_str(e).unwrap();
            assert_eq!(
                (v["id"].as_str(), v["created"].as_i64()),
                (Some("sllm-id"), Some(7)),
                "{name}"
            );
        }
    } else {
        assert_eq!(got.logprobs, want.logprobs, "{name}: logprobs");
    }
}

#[tokio::test]
async fn every_recorded_stream_reads_the_same_wherever_its_frames_are_cut() {
    let mut streams = 0;
    for path in fixtures().into_iter().filter(|p| p.extension().is_some_and(|e| e == "sse")) {
        let raw = std::fs::read(&path).unwrap();
        let chat = String::from_utf8_lossy(&raw).contains("chat.completion.chunk");
        for relay in [true, false] {
            let whole = read(vec![raw.clone()], relay, chat).await;
            check(&path, &raw, &whole, relay, "whole");
            let bytes = read(raw.iter().map(|b| vec![*b]).collect(), relay, chat).await;
            check(&path, &raw, &bytes, relay, "byte by byte");
            // Every cut that can split something (inside a multi-byte character, between CR
            // and LF, around a line end), and a stride through the rest.
            let tricky = |at: usize| {
                let near =
                    |i: usize| raw.get(i).is_some_and(|b| *b >= 0x80 || *b == b'\r' || *b == b'\n');
                near(at) || near(at - 1) || at.is_multiple_of(13)
            };
            for at in (1..raw.len()).filter(|at| tricky(*at)) {
                let got = read(vec![raw[..at].to_vec(), raw[at..].to_vec()], relay, chat).await;
                check(&path, &raw, &got, relay, &format!("cut at {at}"));
            }
        }
        streams += 1;
    }
    assert!(streams >= 10, "the fixtures are there ({streams} streams)");
}

#[test]
fn recorded_http_errors_are_the_clients_with_the_engines_message() {
    let mut errors = 0;
    for path in fixtures().into_iter().filter(|p| p.extension().is_some_and(|e| e == "json")) {
        let Ok(status) = std::fs::read_to_string(path.with_extension("status")) else { continue };
        let status: u16 = status.trim().parse().unwrap();
        let body = std::fs::read_to_string(&path).unwrap();
        let f = openai::http_failure(status, body.clone());
        assert_eq!(f.kind, FailureKind::Invalid, "{}", path.display());
        assert_eq!(f.http_status, status);
        assert_eq!(f.body, body, "the engine's body, unchanged");
        let v: Value = serde_json::from_str(&body).unwrap();
        let message = v["error"]["message"].as_str().or(v["message"].as_str()).unwrap();
        assert!(f.message.contains(message), "{}: {}", path.display(), f.message);
        errors += 1;
    }
    assert!(errors >= 2, "the fixtures are there ({errors} errors)");
}

/// A Responses API stream as llama.cpp's server (0.3.36, the tiny test model) wrote it,
/// captured with curl (`tests/responses/`): typed events, `event:` lines, no `[DONE]`. Cut into
/// frames at every byte, it comes out as the engine's events, each one as it was but for the
/// client's `model` in a response object, its deltas as text, and its end once the engine's
/// last event is read and the stream closes.
#[tokio::test]
async fn a_responses_stream_ends_with_the_engines_last_event() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/responses/llamacpp-0.3.36.sse");
    let raw = std::fs::read(&path).unwrap();
    let text = String::from_utf8(raw.clone()).unwrap();
    let data: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let deltas: String = data
        .iter()
        .filter(|v| v["type"] == "response.output_text.delta")
        .filter_map(|v| v["delta"].as_str())
        .collect();
    let usage = &data.last().unwrap()["response"]["usage"];
    assert_eq!(data.last().unwrap()["type"], "response.completed");
    let job = Job {
        instance_id: "i".into(),
        input: Input::Prompt(String::new()),
        params: pb::SamplingParams { max_tokens: 64, ..Default::default() },
        openai: Some(pb::OpenAiRequest {
            endpoint: pb::OpenAiEndpoint::Responses as i32,
            body: json!({"model": "client-name", "input": "Tell me a story", "stream": true})
                .to_string(),
            response_id: "resp-sllm".into(),
            created: 7,
            model: "client-name".into(),
        }),
        traceparent: String::new(),
        adapter: None,
        baggage: String::new(),
        continuation: None,
    };
    let c = openai::call(Dialect::Llamacpp, "tiny", &job).unwrap();
    assert_eq!(c.path, "/v1/responses");
    assert_eq!(c.body["model"], "tiny");
    assert_eq!(c.body["max_output_tokens"], 64, "Dispatch's limit, when the client set none");
    assert!(c.body.get("stream_options").is_none() && c.body.get("max_tokens").is_none());
    for cut in [1, 7, 64, raw.len()] {
        let frames: Vec<Vec<u8>> = raw.chunks(cut).map(<[u8]>::to_vec).collect();
        let (tx, mut rx) = mpsc::channel(4096);
        let limits = limits();
        let stream =
            futures::stream::iter(frames.into_iter().map(Ok::<_, std::convert::Infallible>));
        let result = openai::relay_stream(stream, Reader::new(c.clone()), limits, &tx).await;
        drop(tx);
        assert!(result.is_ok(), "cut {cut}: {result:?}");
        let (mut got, mut events, mut tokens, mut done) = (String::new(), Vec::new(), 0, None);
        while let Some(o) = rx.recv().await {
            match o {
                Output::Text { text, events: e, tokens: t, .. } => {
                    got.push_str(&text);
                    events.extend(e);
                    tokens += t;
                }
                d @ Output::Done { .. } => done = Some(d),
                other => panic!("cut {cut}: {other:?}"),
            }
        }
        assert_eq!(got, deltas, "cut {cut}");
        assert_eq!(tokens, 4, "cut {cut}: one a delta");
        assert_eq!(
            done,
            Some(Output::Done {
                finish: worker::Finish::Stop,
                prompt_tokens: usage["input_tokens"].as_u64().unwrap() as u32,
                completion_tokens: usage["output_tokens"].as_u64().unwrap() as u32,
            }),
            "cut {cut}"
        );
        let relayed: Vec<Value> = events.iter().map(|e| serde_json::from_str(e).unwrap()).collect();
        assert_eq!(relayed.len(), data.len(), "cut {cut}: every event");
        // An event whose model did not change is the engine's own text, byte for byte.
        let lines: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
        for (line, ours) in lines.iter().zip(&events) {
            if !line.contains("\"model\"") {
                assert_eq!(line, ours, "cut {cut}");
            }
        }
        for (mut engine, ours) in data.iter().cloned().zip(&relayed) {
            if let Some(m) = engine.get_mut("response").and_then(|r| r.get_mut("model")) {
                *m = json!("client-name");
            }
            assert_eq!(&engine, ours, "cut {cut}: as the engine wrote it but for its model");
        }
        assert_eq!(relayed.last().unwrap()["response"]["model"], "client-name");
    }

    // Without its last event, the stream did not finish.
    let cut = text.rfind("event: response.completed").unwrap();
    let (tx, _rx) = mpsc::channel(4096);
    let limits = limits();
    let stream = futures::stream::iter([Ok::<_, std::convert::Infallible>(raw[..cut].to_vec())]);
    let err = openai::relay_stream(stream, Reader::new(c), limits, &tx).await.unwrap_err();
    assert!(err.message.contains("without finishing"), "{err:?}");
}
