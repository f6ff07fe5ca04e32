//! The OpenAI path to an engine, against `sllm sim-engine` (which records what it receives):
//! the client's body reaches the engine intact, the engine's events come back as they are, and
//! the engine's failures are sorted — a refusal is the client's 400 and never retried, an error
//! event ends the stream with an error, a stalled engine meets the idle limit.

use std::time::Duration;

use serde_json::{Value, json};
use sllm_api::v1 as pb;
use tonic::Code;

use super::*;

/// POSTs `body` to Dispatch's `path`; the status and the raw response body.
async fn post(c: &Cluster, path: &str, body: &Value) -> (u16, String) {
    post_to(c.dispatch.openai_base().trim_end_matches("/v1"), path, body).await
}

/// The JSON payloads of a server-sent event stream.
fn events(sse: &str) -> Vec<String> {
    sse.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
}

async fn ready_engine(c: &Cluster, w: &EngineWorker) -> String {
    let inst = instance(c, "m", InstanceStatus::Ready).await;
    let endpoint = w.backend.endpoint(&inst.instance_id).unwrap();
    // Dispatch routes once the ready event has reached it.
    eventually(Duration::from_secs(10), "routable", || async {
        let (status, _) = post(
            c,
            "/v1/completions",
            &json!({"model": "m", "prompt": "warm up", "max_tokens": 1}),
        )
        .await;
        (status == 200).then_some(())
    })
    .await
    .unwrap();
    endpoint
}

async fn engine_json(endpoint: &str, path: &str) -> Value {
    serde_json::from_str(&curl(&format!("{endpoint}{path}")).await.unwrap()).unwrap()
}

/// The gateways `scripts/bench peers` measures read these when they register an engine.
#[tokio::test]
async fn the_simulated_engine_answers_sglangs_metadata_endpoints() {
    let c = cluster().await;
    let w = engine_worker(&c, "", Duration::from_secs(20)).await;
    deploy(&c.store, "m").await;
    let endpoint = ready_engine(&c, &w).await;
    for path in ["/model_info", "/get_model_info"] {
        let v = engine_json(&endpoint, path).await;
        assert_eq!(v["model_path"], "m", "{path}: {v}");
        assert_eq!(v["is_generation"], true, "{path}: {v}");
    }
    for path in ["/server_info", "/get_server_info"] {
        let v = engine_json(&endpoint, path).await;
        assert_eq!(v["served_model_name"], "m", "{path}: {v}");
        assert_eq!((v["tp_size"].as_u64(), v["dp_size"].as_u64()), (Some(1), Some(1)), "{v}");
    }
}

#[tokio::test]
async fn an_openai_body_reaches_the_engine_intact_and_its_events_come_back() {
    let c = cluster().await;
    let w = engine_worker(&c, "", Duration::from_secs(20)).await;
    deploy(&c.store, "m").await;
    let endpoint = ready_engine(&c, &w).await;

    // Every field the client sends reaches the engine as it was sent, engine extras included.
    let body = json!({
        "model": "m",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
        ],
        "max_tokens": 4,
        "seed": 7,
        "temperature": 0.5,
        "top_k": 40,
        "min_p": 0.05,
        "logit_bias": {"50256": -100},
        "logprobs": true,
        "top_logprobs": 2,
        "response_format": {"type": "json_object"},
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "tool_choice": "auto",
        "guided_json": {"type": "object"},
        "user": "u-1",
    });
    let (status, answer) = post(&c, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(engine_json(&endpoint, "/debug/last-request").await, body);
    // A client's W3C baggage reaches the engine, as the SDK's propagator writes it.
    let o = tokio::process::Command::new("curl")
        .args(["-s", "-H", "Content-Type: application/json", "-H", "baggage: tenant=acme"])
        .args(["-d", r#"{"model": "m", "prompt": "hi", "max_tokens": 1}"#])
        .arg(format!("{}/completions", c.dispatch.openai_base()))
        .output()
        .await
        .unwrap();
    assert!(o.status.success());
    let headers = engine_json(&endpoint, "/debug/last-headers").await;
    assert_eq!(headers["baggage"], "tenant=acme", "{headers}");
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["model"], "m");
    // The id is Dispatch's, not the engine's: a UUIDv7 in vLLM's hex form.
    let id = answer["id"].as_str().unwrap().strip_prefix("chatcmpl-").expect("chatcmpl- id");
    assert_eq!(uuid::Uuid::parse_str(id).map(|u| u.get_version_num()).ok(), Some(7), "{answer}");
    assert_eq!(answer["usage"]["completion_tokens"], 4);
    let text = answer["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(text.split_whitespace().count(), 4, "{text}");

    // A stream: the engine is asked for usage (sllm counts tokens from it), the client gets
    // it only if it asked; every event carries one id.
    let mut body =
        json!({"model": "m", "prompt": "hello engine", "max_tokens": 5, "seed": 7, "stream": true});
    let (status, sse) = post(&c, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{sse}");
    body["stream_options"] = json!({"include_usage": true});
    assert_eq!(engine_json(&endpoint, "/debug/last-request").await, body);
    let payloads = events(&sse);
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> =
        payloads[..payloads.len() - 1].iter().map(|p| serde_json::from_str(p).unwrap()).collect();
    assert!(chunks.iter().all(|ch| ch.get("usage").is_none()), "no usage unasked: {sse}");
    let ids: std::collections::HashSet<&str> =
        chunks.iter().map(|ch| ch["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 1, "one id: {sse}");
    let text: String = chunks.iter().filter_map(|ch| ch["choices"][0]["text"].as_str()).collect();
    let expected = worker::sim::text(7, "hello engine", 5);
    assert_eq!(text, expected);
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "length");

    // Asked for: the engine's usage event, last before [DONE].
    let (_, sse) = post(&c, "/v1/completions", &body).await;
    let payloads = events(&sse);
    let usage: Value = serde_json::from_str(&payloads[payloads.len() - 2]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 5);

    // A chat stream: the engine's role event first, its content, its finish.
    let (_, sse) = post(
        &c,
        "/v1/chat/completions",
        &json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": true}),
    )
    .await;
    let chunks: Vec<Value> = events(&sse)
        .iter()
        .filter(|p| *p != "[DONE]")
        .map(|p| serde_json::from_str(p).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant", "{sse}");
    assert_eq!(chunks.iter().filter(|ch| ch["choices"][0]["delta"]["role"].is_string()).count(), 1);
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "length");
}

/// `sllm serve all` and an `sllm worker` whose engine is `python/uvicorn_engine.py` (a Starlette
/// app on uvicorn, the server of vLLM and SGLang), with model "m" deployed and answering.
struct UvicornBehindSllm {
    _redis: RedisServer,
    _serve: Proc,
    _worker: Proc,
    /// Dispatch's OpenAI API, `http://host:port`.
    base: String,
}

impl UvicornBehindSllm {
    /// `extra`: more arguments for the engine.
    async fn start(extra: &str) -> UvicornBehindSllm {
        let redis = RedisServer::start().unwrap();
        let store = redis.store_with(|c| c.namespace = "sllm".into()).await.unwrap();
        let (serve, grpc, openai) = sllm_integration_tests::serve_all(&redis.url()).unwrap();
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/uvicorn_engine.py");
        let engine = format!(
            "{} {} --port {{port}} --model {{model}} {extra}",
            sllm_integration_tests::python().unwrap().display(),
            script.display(),
        );
        let registry = format!("http://{grpc}");
        let (worker, _) = Proc::sllm(
            &["worker", "--backend", "engine", "--engine", "custom", "--engine-command", &engine],
            &[
                ("SLLM_JOIN_SECRET", JOIN_SECRET),
                ("SLLM_REGISTRY", &registry),
                ("SLLM_NODE_ID", "w1"),
                ("SLLM_WORKER_ADDRESS", "10.0.0.1"),
            ],
            "worker(s) started",
        )
        .unwrap();
        deploy(&store, "m").await;
        let base = format!("http://{openai}");
        let body = json!({"model": "m", "prompt": "x", "max_tokens": 1});
        eventually(Duration::from_secs(30), "the engine answers through sllm", || async {
            (post_to(&base, "/v1/completions", &body).await.0 == 200).then_some(())
        })
        .await
        .unwrap();
        UvicornBehindSllm { _redis: redis, _serve: serve, _worker: worker, base }
    }
}

/// The Responses API relayed from an engine framed as vLLM frames it, on uvicorn: its typed
/// events come back named as it named them and end with its last event, no `[DONE]`; a
/// stream the engine cut short ends with an `error` event; a body comes back whole, with the
/// engine's id. Real processes.
#[tokio::test]
async fn a_responses_stream_comes_back_as_the_engine_wrote_it() {
    let u = UvicornBehindSllm::start("").await;
    let body = json!({"model": "m", "input": "hi", "max_output_tokens": 3, "stream": true});
    let (status, sse) = post_to(&u.base, "/v1/responses", &body).await;
    assert_eq!(status, 200, "{sse}");
    let names: Vec<&str> = sse.lines().filter_map(|l| l.strip_prefix("event: ")).collect();
    let delta = "response.output_text.delta";
    assert_eq!(names, ["response.created", delta, delta, delta, "response.completed"], "{sse}");
    let data: Vec<Value> =
        events(&sse).iter().map(|e| serde_json::from_str(e).expect("JSON, no [DONE]")).collect();
    let types: Vec<&str> = data.iter().map(|v| v["type"].as_str().unwrap()).collect();
    assert_eq!(types, names, "each event named by its type");
    let text: String = data.iter().filter_map(|v| v["delta"].as_str()).collect();
    assert_eq!(text, " w0 w1 w2");
    let numbers: Vec<u64> = data.iter().map(|v| v["sequence_number"].as_u64().unwrap()).collect();
    assert_eq!(numbers, [0, 1, 2, 3, 4], "the engine's numbers, untouched");
    let last = &data[4]["response"];
    assert_eq!((last["model"].as_str(), &last["usage"]["output_tokens"]), (Some("m"), &json!(3)));

    // Cut short by the engine: what came, then an error event, never a completion.
    let cut = json!({"model": "m", "input": "break", "max_output_tokens": 5, "stream": true});
    let (status, sse) = post_to(&u.base, "/v1/responses", &cut).await;
    assert_eq!(status, 200, "{sse}");
    let names: Vec<&str> = sse.lines().filter_map(|l| l.strip_prefix("event: ")).collect();
    assert_eq!(names, ["response.created", delta, delta, "error"], "{sse}");
    let error: Value = serde_json::from_str(events(&sse).last().unwrap()).unwrap();
    assert!(error["message"].as_str().unwrap().contains("without finishing"), "{error}");

    // Not streamed: the engine's body, its own id.
    let whole = json!({"model": "m", "input": "hi", "max_output_tokens": 3});
    let (status, answer) = post_to(&u.base, "/v1/responses", &whole).await;
    assert_eq!(status, 200, "{answer}");
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["id"], "resp_uvicorn");
    assert_eq!(answer["output"][0]["content"][0]["text"], " w0 w1 w2");
}

/// uvicorn, the server of vLLM and SGLang, writes a chunked body's last chunk on its own after
/// `[DONE]`. The agent reads it before it lets the answer go, so that every request to the
/// engine goes over one kept-alive connection instead of opening a new one. Real processes:
/// `sllm serve all`, `sllm worker` and a Starlette app on uvicorn (in-process, the agent often
/// finds the last chunk already read and the difference does not show).
#[tokio::test]
async fn streams_to_a_uvicorn_engine_keep_one_connection() {
    let ports_file = std::env::temp_dir().join(format!("sllm-uvicorn-{}", std::process::id()));
    let _ = std::fs::remove_file(&ports_file);
    let u = UvicornBehindSllm::start(&format!("--ports-file {}", ports_file.display())).await;
    let stream = || {
        let body = json!({"model": "m", "prompt": "x", "max_tokens": 3, "stream": true});
        let base = u.base.clone();
        async move { post_to(&base, "/v1/completions", &body).await }
    };
    let before = std::fs::read_to_string(&ports_file).unwrap_or_default().lines().count();

    for _ in 0..20 {
        let (status, sse) = stream().await;
        assert_eq!(status, 200, "{sse}");
        assert_eq!(streamed_text(&sse), " w0 w1 w2", "{sse}");
        assert_eq!(events(&sse).last().map(String::as_str), Some("[DONE]"), "{sse}");
    }
    let ports = std::fs::read_to_string(&ports_file).unwrap();
    let _ = std::fs::remove_file(&ports_file);
    let streamed: std::collections::HashSet<&str> = ports.lines().skip(before).collect();
    assert_eq!(ports.lines().count() - before, 20, "{ports}");
    assert_eq!(streamed.len(), 1, "20 streams came over {} connections", streamed.len());
}

#[tokio::test]
async fn an_engine_refusal_is_the_clients_error_and_is_not_retried() {
    let c = cluster().await;
    let w = engine_worker(&c, "--max-model-len 50", Duration::from_secs(20)).await;
    deploy(&c.store, "m").await;
    let endpoint = ready_engine(&c, &w).await;
    let before: u64 = curl(&format!("{endpoint}/debug/requests")).await.unwrap().parse().unwrap();

    let long = json!({"model": "m", "prompt": "hello", "max_tokens": 100, "stream": true});
    let (status, answer) = post(&c, "/v1/completions", &long).await;
    assert_eq!(status, 400, "{answer}");
    let answer: Value = serde_json::from_str(&answer).unwrap();
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(message.contains("maximum context length is 50"), "the engine's words: {message}");
    let after: u64 = curl(&format!("{endpoint}/debug/requests")).await.unwrap().parse().unwrap();
    assert_eq!(after - before, 1, "a refused request is not retried");

    // Over gRPC: INVALID_ARGUMENT with the engine's message.
    let mut client = c.dispatch.client().await.unwrap();
    let err = client.generate(request("m", 100)).await.unwrap().into_inner().message().await;
    let err = err.expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("maximum context length"), "{}", err.message());

    // Refusals say nothing about the worker: its requests keep being served at once.
    for _ in 0..5 {
        let _ = post(&c, "/v1/completions", &long).await;
    }
    let (status, _) =
        post(&c, "/v1/completions", &json!({"model": "m", "prompt": "hi", "max_tokens": 3})).await;
    assert_eq!(status, 200);
}

/// A stream's head reaches the client when the engine accepts the request, as it would from
/// the engine itself or a gateway in front of it, not only with the first token: a client
/// (and its proxies) can tell an accepted request from a queued one while the prompt is read.
#[tokio::test]
async fn an_accepted_streams_head_comes_before_its_first_token() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let c = cluster().await;
    // Each token takes 400 ms: the first comes long after the engine's head.
    let w = engine_worker_with(&c, "", |ec| {
        ec.command = format!(
            "{} sim-engine --port {{port}} --model {{model}} --load-ms 100 --decode-ms 400",
            sllm_bin().unwrap().display()
        );
        ec.ready_timeout = Duration::from_secs(20);
    })
    .await;
    deploy(&c.store, "m").await;
    ready_engine(&c, &w).await;

    let base = c.dispatch.openai_base();
    let addr = base.trim_start_matches("http://").trim_end_matches("/v1");
    let body =
        json!({"model": "m", "prompt": "hello", "max_tokens": 1, "stream": true}).to_string();
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let sent = std::time::Instant::now();
    conn.write_all(request.as_bytes()).await.unwrap();
    let (mut got, mut head_at, mut data_at) = (Vec::new(), None, None);
    let mut buf = [0u8; 4096];
    loop {
        let n = conn.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if head_at.is_none() && text.contains("\r\n\r\n") {
            head_at = Some(sent.elapsed());
        }
        if data_at.is_none() && text.contains("data: ") {
            data_at = Some(sent.elapsed());
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("text/event-stream"), "{text}");
    assert!(text.contains("[DONE]"), "{text}");
    let (head, data) = (head_at.unwrap(), data_at.unwrap());
    assert!(
        data >= head + Duration::from_millis(250),
        "the head came at {head:?}, only with the first token at {data:?}"
    );
}

/// A 10-token gRPC request for `m` that must end in an error: the tokens before it, and it.
async fn until_error(c: &Cluster) -> (u32, tonic::Status) {
    let mut s = eventually(Duration::from_secs(10), "routed", || async {
        let mut client = c.dispatch.client().await.ok()?;
        client.generate(request("m", 10)).await.ok().map(|r| r.into_inner())
    })
    .await
    .unwrap();
    let mut tokens = 0;
    loop {
        match s.message().await {
            Ok(Some(pb::GenerateEvent { event: Some(pb::generate_event::Event::Chunk(ch)) })) => {
                tokens += ch.tokens
            }
            Ok(Some(pb::GenerateEvent { event: Some(pb::generate_event::Event::Finished(f)) })) => {
                panic!("a normal finish where an error was due: {f:?}")
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("the stream ended without an error"),
            Err(e) => return (tokens, e),
        }
    }
}

#[tokio::test]
async fn an_error_event_inside_a_stream_ends_it_with_an_error() {
    let c = cluster().await;
    let _w = engine_worker(&c, "--error-after-tokens 3", Duration::from_secs(20)).await;
    deploy(&c.store, "m").await;
    instance(&c, "m", InstanceStatus::Ready).await;
    let (tokens, err) = until_error(&c).await;
    assert_eq!(tokens, 3);
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert!(err.message().contains("simulated failure during generation"), "{}", err.message());

    // Over HTTP: the engine's error event, and no finish_reason.
    let (status, sse) = post(
        &c,
        "/v1/completions",
        &json!({"model": "m", "prompt": "p", "max_tokens": 10, "stream": true}),
    )
    .await;
    assert_eq!(status, 200);
    let payloads = events(&sse);
    let error = payloads.iter().find(|p| p.contains("\"error\"")).expect("an error event");
    assert!(error.contains("simulated failure during generation"), "{sse}");
    assert!(!sse.contains("\"finish_reason\":\"length\""), "{sse}");
}

#[tokio::test]
async fn a_stalled_engine_meets_the_idle_limit_with_a_clear_error() {
    let c = cluster().await;
    let _w = engine_worker_with(&c, "--stall-after-tokens 2", |ec| {
        ec.ready_timeout = Duration::from_secs(20);
        ec.idle_timeout = Duration::from_millis(700);
    })
    .await;
    deploy(&c.store, "m").await;
    instance(&c, "m", InstanceStatus::Ready).await;
    let t0 = std::time::Instant::now();
    let (_, err) = until_error(&c).await;
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("within 700 ms"), "{}", err.message());
    assert!(t0.elapsed() < Duration::from_secs(5), "the limit, not a hang");
    // The engine still answers its health check: the instance stays.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ready = c.store.model_instances("m").await.unwrap();
    assert!(ready.iter().any(|i| i.status == InstanceStatus::Ready), "{ready:?}");
}

#[tokio::test]
async fn grpc_sampling_parameters_reach_the_engine_and_logprobs_come_back() {
    let c = cluster().await;
    let w = engine_worker(&c, "", Duration::from_secs(20)).await;
    deploy(&c.store, "m").await;
    let endpoint = ready_engine(&c, &w).await;
    let mut client = c.dispatch.client().await.unwrap();
    let req = pb::GenerateRequest {
        model: "m".into(),
        input: Some(pb::generate_request::Input::Chat(pb::ChatMessages {
            messages: vec![pb::ChatMessage { role: "user".into(), content: "hi".into() }],
        })),
        params: Some(pb::SamplingParams {
            max_tokens: 3,
            temperature: Some(0.5),
            top_p: Some(0.9),
            top_k: Some(20),
            min_p: Some(0.05),
            presence_penalty: Some(0.5),
            frequency_penalty: Some(0.25),
            repetition_penalty: Some(1.5),
            stop: vec!["END".into()],
            seed: Some(11),
            logprobs: true,
            top_logprobs: 2,
            json_schema: r#"{"type": "object"}"#.into(),
            regex: String::new(),
        }),
        progress: false,
        timeout_ms: 10_000,
    };
    let mut s = client.generate(req).await.unwrap().into_inner();
    while let Some(e) = s.message().await.unwrap() {
        if let Some(pb::generate_event::Event::Finished(_)) = e.event {
            break;
        }
    }
    let got = engine_json(&endpoint, "/debug/last-request").await;
    let want = json!({
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 20,
        "min_p": 0.05,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
        "repetition_penalty": 1.5,
        "stop": ["END"],
        "seed": 11,
        "logprobs": true,
        "top_logprobs": 2,
        "response_format": {"type": "json_schema", "json_schema": {"name": "output", "schema": {"type": "object"}}},
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    // Floats travel as f32: compare them as such.
    for (k, v) in want.as_object().unwrap() {
        match v.as_f64() {
            Some(x) if v.is_f64() => {
                assert!((got[k].as_f64().unwrap() - x).abs() < 1e-6, "{k}: {}", got[k])
            }
            _ => assert_eq!(&got[k], v, "{k}"),
        }
    }
    assert_eq!(got.as_object().unwrap().len(), want.as_object().unwrap().len(), "{got}");

    // A bad constraint is refused before it reaches anything.
    let mut bad = request("m", 3);
    bad.params.as_mut().unwrap().json_schema = "{not json".into();
    let err = client.generate(bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("json_schema"), "{}", err.message());
}

/// The text of an OpenAI stream's events: completions' `text`, chat's `delta.content`.
fn streamed_text(sse: &str) -> String {
    events(sse)
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| {
            let c = &v["choices"][0];
            c["text"].as_str().or(c["delta"]["content"].as_str()).map(str::to_string)
        })
        .collect()
}

/// The usage event of an OpenAI stream.
fn streamed_usage(sse: &str) -> Value {
    events(sse)
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .find(|v| v["usage"].is_object())
        .map(|v| v["usage"].clone())
        .unwrap_or(Value::Null)
}

/// Two engine processes serve the model; each crashes after 60 tokens in all. A stream of 80
/// tokens therefore loses its engine midway whichever it starts on, and continues on the other:
/// the OpenAI client gets one stream whose text is exactly the uninterrupted generation's, and
/// whose usage counts every token it received once. For chat, the continuation is the engine's
/// own `continue_final_message`.
#[tokio::test]
async fn an_openai_stream_whose_engine_crashes_continues_on_another_engine() {
    let c = cluster().await;
    let _w = engine_worker(&c, "--crash-after-tokens 60", Duration::from_secs(20)).await;
    c.store
        .create_deployment(&kvstore::DeploymentSpec {
            model: "m".into(),
            backend: "custom".into(),
            num_gpus: 1,
            autoscaling: kvstore::AutoScaling {
                min_instances: 2,
                max_instances: 2,
                keep_alive_s: 60,
                ..Default::default()
            },
            backend_config: String::new(),
        })
        .await
        .unwrap();
    eventually(Duration::from_secs(15), "two engines ready", || async {
        let all = c.store.model_instances("m").await.unwrap();
        (all.iter().filter(|i| i.status == InstanceStatus::Ready).count() == 2).then_some(())
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;

    let completion = json!({
        "model": "m", "prompt": "hello engine", "max_tokens": 80, "seed": 7,
        "stream": true, "stream_options": {"include_usage": true},
    });
    let (status, sse) = post(&c, "/v1/completions", &completion).await;
    assert_eq!(status, 200, "{sse}");
    assert_eq!(streamed_text(&sse), worker::sim::text(7, "hello engine", 80), "{sse}");
    let usage = streamed_usage(&sse);
    assert_eq!(usage["completion_tokens"], 80, "{sse}");
    assert_eq!(usage["prompt_tokens"], 2, "the continued text is not counted as prompt: {sse}");
    assert!(!sse.contains("\"error\""), "{sse}");
    // The stream's last events say it moved; no other does.
    let marked: Vec<Value> = events(&sse)
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter(|v| v.get("migrations").is_some())
        .collect();
    assert_eq!(marked.len(), 2, "the finish and the usage events: {sse}");
    assert_eq!(marked[0]["choices"][0]["finish_reason"], "length");
    assert!(marked[1]["usage"].is_object());
    assert!(marked.iter().all(|v| v["migrations"] == 1), "{marked:?}");

    // The crashed engine is replaced; the chat stream then loses its engine too.
    eventually(Duration::from_secs(15), "two engines ready again", || async {
        let all = c.store.model_instances("m").await.unwrap();
        (all.iter().filter(|i| i.status == InstanceStatus::Ready).count() == 2).then_some(())
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let chat = json!({
        "model": "m", "max_tokens": 80, "seed": 7, "stream": true,
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a story"}],
    });
    let (status, sse) = post(&c, "/v1/chat/completions", &chat).await;
    assert_eq!(status, 200, "{sse}");
    let expected = worker::sim::text(7, "system: be brief\nuser: a story\nassistant:", 80);
    assert_eq!(streamed_text(&sse), expected, "{sse}");
    assert!(!sse.contains("\"error\""), "{sse}");
    let ids: std::collections::BTreeSet<String> = events(&sse)
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| v["id"].as_str().map(str::to_string))
        .collect();
    assert_eq!(ids.len(), 1, "one id across the move: {ids:?}");
    let roles = events(&sse)
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter(|v| v["choices"][0]["delta"]["role"].is_string())
        .count();
    assert_eq!(roles, 1, "the continuation's own role chunk is not sent again: {sse}");
}

/// The choices of an OpenAI stream: each choice's text and finish reason, by its `index`.
fn streamed_choices(sse: &str) -> std::collections::BTreeMap<u64, (String, String)> {
    let mut out = std::collections::BTreeMap::<u64, (String, String)>::new();
    for v in events(sse).iter().filter_map(|e| serde_json::from_str::<Value>(e).ok()) {
        for c in v["choices"].as_array().into_iter().flatten() {
            let Some(i) = c["index"].as_u64() else { continue };
            let choice = out.entry(i).or_default();
            if let Some(t) = c["text"].as_str().or(c["delta"]["content"].as_str()) {
                choice.0.push_str(t);
            }
            if let Some(f) = c["finish_reason"].as_str() {
                choice.1 = f.to_string();
            }
        }
    }
    out
}

/// Several choices (`n`) and batches of prompts, as vLLM takes them: the body reaches the
/// engine as sent, and every choice comes back as the engine wrote it, numbered as it numbered
/// them, streamed or not, with the engine's usage of them all. Sampled with a seed, so the
/// choices differ from each other and the engine alone gives the same answer.
#[tokio::test]
async fn several_choices_and_batched_prompts_come_back_as_the_engine_answers_them() {
    let c = cluster().await;
    let w = engine_worker(&c, "", Duration::from_secs(20)).await;
    deploy(&c.store, "m").await;
    let endpoint = ready_engine(&c, &w).await;

    // Two prompts of text and one of token ids, two choices each.
    let body = json!({
        "model": "m", "prompt": ["hello engine", "a story", [5, 6, 7]], "n": 2,
        "max_tokens": 4, "temperature": 0.8, "seed": 7,
    });
    let (status, via) = post(&c, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{via}");
    assert_eq!(engine_json(&endpoint, "/debug/last-request").await, body);
    let (status, alone) = post_to(&endpoint, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{alone}");
    let (via, alone): (Value, Value) =
        (serde_json::from_str(&via).unwrap(), serde_json::from_str(&alone).unwrap());
    assert_eq!(via["choices"], alone["choices"]);
    assert_eq!(via["usage"], alone["usage"]);
    let indexes: Vec<u64> =
        via["choices"].as_array().unwrap().iter().map(|c| c["index"].as_u64().unwrap()).collect();
    assert_eq!(indexes, [0, 1, 2, 3, 4, 5], "{via}");
    assert_eq!(via["usage"]["completion_tokens"], 24, "{via}");
    assert_ne!(via["choices"][0]["text"], via["choices"][1]["text"], "two samples: {via}");

    // Streamed: 24 tokens where max_tokens is 4 are six choices' worth, not an overrun.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let (status, via) = post(&c, "/v1/completions", &streamed).await;
    assert_eq!(status, 200, "{via}");
    let (_, alone) = post_to(&endpoint, "/v1/completions", &streamed).await;
    assert!(!via.contains("\"error\""), "{via}");
    let choices = streamed_choices(&via);
    assert_eq!(choices.len(), 6, "{via}");
    assert_eq!(choices, streamed_choices(&alone));
    assert!(choices.values().all(|(_, finish)| finish == "length"), "{via}");
    assert_eq!(streamed_usage(&via), streamed_usage(&alone));

    // A chat of three choices: one role chunk for each, then each choice's text.
    let chat = json!({
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 3,
        "max_tokens": 5, "temperature": 0.8, "seed": 3, "stream": true,
    });
    let (status, via) = post(&c, "/v1/chat/completions", &chat).await;
    assert_eq!(status, 200, "{via}");
    let (_, alone) = post_to(&endpoint, "/v1/chat/completions", &chat).await;
    let choices = streamed_choices(&via);
    assert_eq!(choices.len(), 3, "{via}");
    assert_eq!(choices, streamed_choices(&alone));
    let roles = events(&via)
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter(|v| v["choices"][0]["delta"]["role"].is_string())
        .count();
    assert_eq!(roles, 3, "{via}");

    // Beyond 128 choices in all: refused before the engine sees it.
    let before = engine_json(&endpoint, "/debug/requests").await;
    let (status, err) = post(
        &c,
        "/v1/completions",
        &json!({"model": "m", "prompt": ["a", "b", "c"], "n": 43, "max_tokens": 1}),
    )
    .await;
    assert_eq!(status, 400, "{err}");
    let err: Value = serde_json::from_str(&err).unwrap();
    assert_eq!(err["error"]["param"], "prompt", "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("129 choices"), "{err}");
    assert_eq!(engine_json(&endpoint, "/debug/requests").await, before);
}

/// The engines' own `/tokenize` and `/detokenize` (vLLM's shape, from `sllm sim-engine
/// --merges`): through sllm the body reaches the engine as sent, and the answer comes back as
/// the engine alone gives it; what sllm cannot route is refused by name before the engine sees
/// it, and the engine's own refusal comes back as it wrote it.
#[tokio::test]
async fn tokenize_and_detokenize_come_back_as_the_engine_answers_them() {
    let c = cluster().await;
    let w = engine_worker(&c, "--merges --max-model-len 4096", Duration::from_secs(20)).await;
    deploy(&c.store, "m").await;
    let endpoint = ready_engine(&c, &w).await;

    let prompt = "Once upon a time the quick brown fox";
    let body = json!({"model": "m", "prompt": prompt, "return_token_strs": true});
    let (status, via) = post(&c, "/tokenize", &body).await;
    assert_eq!(status, 200, "{via}");
    assert_eq!(engine_json(&endpoint, "/debug/last-request").await, body);
    let (status, alone) = post_to(&endpoint, "/tokenize", &body).await;
    assert_eq!(status, 200, "{alone}");
    assert_eq!(via, alone, "the engine's body, unchanged");
    let tokens: Value = serde_json::from_str(&via).unwrap();
    let ids = tokens["tokens"].as_array().unwrap().clone();
    assert_eq!(tokens["count"], ids.len(), "{tokens}");
    assert!(ids.len() < prompt.len(), "words are tokens, not bytes: {tokens}");
    assert_eq!(tokens["max_model_len"], 4096, "{tokens}");

    // A chat, through the engine's template.
    let chat = json!({"model": "m", "messages": [{"role": "user", "content": "hello"}]});
    let (status, via) = post(&c, "/tokenize", &chat).await;
    assert_eq!(status, 200, "{via}");
    assert_eq!(via, post_to(&endpoint, "/tokenize", &chat).await.1);

    // And back.
    let back = json!({"model": "m", "tokens": ids});
    let (status, text) = post(&c, "/detokenize", &back).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["prompt"], prompt);

    // Refused before the engine sees it, naming the field.
    let seen = engine_json(&endpoint, "/debug/last-request").await;
    for (path, body, field) in [
        ("/tokenize", json!({"prompt": "x"}), "model"),
        ("/tokenize", json!({"model": "m"}), "prompt"),
        ("/tokenize", json!({"model": "m", "prompt": 7}), "prompt"),
        ("/detokenize", json!({"model": "m", "tokens": [1, "a"]}), "tokens[1]"),
        ("/detokenize", json!({"model": "m"}), "tokens"),
    ] {
        let (status, err) = post(&c, path, &body).await;
        assert_eq!(status, 400, "{path} {body}: {err}");
        let err: Value = serde_json::from_str(&err).unwrap();
        assert_eq!(err["error"]["param"], field, "{err}");
    }
    assert_eq!(engine_json(&endpoint, "/debug/last-request").await, seen);
    let (status, err) = post(&c, "/tokenize", &json!({"model": "nope", "prompt": "x"})).await;
    assert_eq!(status, 404, "{err}");

    // The engine's own refusal: an id beyond its vocabulary.
    let (status, err) =
        post(&c, "/detokenize", &json!({"model": "m", "tokens": [4_000_000_000u64]})).await;
    assert_eq!(status, 400, "{err}");
    assert!(err.contains("not in the vocabulary"), "{err}");
}

/// Rerank (vLLM's `/v1/rerank` shape, from `sllm sim-engine`): the body reaches the engine as
/// sent, the ranking comes back as the engine gives it alone, with its own id and the client's
/// model; at `/rerank` too. What sllm cannot route is refused by name before the engine sees it;
/// the engine's own refusal comes back as it wrote it.
#[tokio::test]
async fn a_rerank_comes_back_as_the_engine_ranks() {
    let c = cluster().await;
    let w = engine_worker(&c, "", Duration::from_secs(20)).await;
    deploy(&c.store, "m").await;
    let endpoint = ready_engine(&c, &w).await;

    let body = json!({
        "model": "m", "query": "What is a fox?", "top_n": 2,
        "documents": ["Paris is a city", "A fox is an animal", {"text": "hello"}],
    });
    for path in ["/v1/rerank", "/rerank"] {
        let (status, via) = post(&c, path, &body).await;
        assert_eq!(status, 200, "{via}");
        assert_eq!(engine_json(&endpoint, "/debug/last-request").await, body);
        let (status, alone) = post_to(&endpoint, "/v1/rerank", &body).await;
        assert_eq!(status, 200, "{alone}");
        let (via, alone): (Value, Value) =
            (serde_json::from_str(&via).unwrap(), serde_json::from_str(&alone).unwrap());
        assert_eq!(via["results"], alone["results"]);
        assert_eq!(via["usage"], alone["usage"]);
        assert_eq!(via["model"], "m");
        assert!(via["id"].as_str().unwrap().starts_with("rerank-"), "the engine's id: {via}");
        assert!(via.get("created").is_none(), "nothing the engine did not write: {via}");
        let order: Vec<u64> = via["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["index"].as_u64().unwrap())
            .collect();
        assert_eq!(order, [1, 0], "{via}");
    }

    let seen = engine_json(&endpoint, "/debug/last-request").await;
    for (body, field) in [
        (json!({"query": "q", "documents": ["a"]}), "model"),
        (json!({"model": "m", "documents": ["a"]}), "query"),
        (json!({"model": "m", "query": "q", "documents": []}), "documents"),
        (json!({"model": "m", "query": "q", "documents": ["a", 3]}), "documents[1]"),
        (json!({"model": "m", "query": "q", "documents": ["a"], "top_n": "all"}), "top_n"),
    ] {
        let (status, err) = post(&c, "/v1/rerank", &body).await;
        assert_eq!(status, 400, "{body}: {err}");
        let err: Value = serde_json::from_str(&err).unwrap();
        assert_eq!(err["error"]["param"], field, "{err}");
    }
    assert_eq!(engine_json(&endpoint, "/debug/last-request").await, seen);
    let odd = json!({"model": "m", "query": "q", "documents": ["a"], "max_chunks_per_doc": 2});
    let (status, err) = post(&c, "/v1/rerank", &odd).await;
    assert_eq!(status, 400, "{err}");
    assert!(err.contains("max_chunks_per_doc"), "the engine's refusal: {err}");
}

/// A stream of several choices cannot move to another engine: a continuation carries one
/// text on from where it stopped, and each choice stopped at its own point. When its engine
/// crashes after output, it ends with an error event rather than going on wrong.
#[tokio::test]
async fn a_stream_of_several_choices_whose_engine_crashes_ends_with_an_error() {
    let c = cluster().await;
    let w = engine_worker(&c, "--crash-after-tokens 30", Duration::from_secs(20)).await;
    deploy(&c.store, "m").await;
    ready_engine(&c, &w).await;
    let body = json!({
        "model": "m", "prompt": "hello engine", "n": 2, "max_tokens": 40, "seed": 7,
        "stream": true, "stream_options": {"include_usage": true},
    });
    let (status, sse) = post(&c, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{sse}");
    let choices = streamed_choices(&sse);
    assert_eq!(choices.len(), 2, "both choices had output: {sse}");
    let words: usize = choices.values().map(|(t, _)| t.split_whitespace().count()).sum();
    assert!(words > 0 && words < 80, "{sse}");
    assert!(choices.values().all(|(_, finish)| finish.is_empty()), "none finished: {sse}");
    let last: Value =
        events(&sse).iter().rev().find_map(|e| serde_json::from_str::<Value>(e).ok()).unwrap();
    assert!(last["error"]["message"].is_string(), "it ends with an error event: {sse}");
    assert!(!sse.contains("\"migrations\""), "it did not move: {sse}");
}

/// What the official `openai` client saw of a stream (`python/migration_check.py`).
async fn openai_client_reads(c: &Cluster, kind: &str) -> Value {
    let out = tokio::process::Command::new(sllm_integration_tests::python().unwrap())
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/migration_check.py"))
        .args([c.dispatch.openai_base().as_str(), "m", kind])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap()
}

/// Waits until `n` instances of `m` are ready, their engines answer, and Dispatch routes to
/// them. (An engine that has just crashed stays ready in the store until its agent reports it.)
async fn ready_instances(c: &Cluster, w: &EngineWorker, n: usize) {
    eventually(Duration::from_secs(15), "instances ready", || async {
        let all = c.store.model_instances("m").await.unwrap();
        let mut answering = 0;
        for i in all.iter().filter(|i| i.status == InstanceStatus::Ready) {
            let e = w.backend.endpoint(&i.instance_id)?;
            curl(&format!("{e}/health")).await?;
            answering += 1;
        }
        (answering == n).then_some(())
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
}

/// The body of the continuation among the engines' last requests: the one whose prompt is a
/// list of token ids. Every instance of `m` the store knows now is asked, including one started
/// while the stream ran.
async fn continuation_request(c: &Cluster, w: &EngineWorker) -> Value {
    for i in c.store.model_instances("m").await.unwrap() {
        // The crashed engine answers nothing.
        let Some(e) = w.backend.endpoint(&i.instance_id) else { continue };
        let Some(last) = curl(&format!("{e}/debug/last-request")).await else { continue };
        let last: Value = serde_json::from_str(&last).unwrap();
        if last["prompt"].as_array().is_some_and(|p| p.iter().all(Value::is_u64)) {
            return last;
        }
    }
    panic!("no engine received a prompt of token ids");
}

/// vLLM engines (`sllm sim-engine --merges`: text tokenised with merged pairs, as by BPE, and
/// generated from token ids), each crashing after 60 tokens in all: a completion and a chat of
/// 80 tokens lose their engine midway and continue on the other from the token ids vLLM
/// reported (`return_token_ids`, asked for on the client's behalf and never shown to it): the
/// official client reads the uninterrupted text byte for byte, in one stream whose last chunks
/// say `migrations: 1`. Continued from its text instead (vLLM's `continue_final_message`, a
/// prompt with the text appended), the tokenised text would hold merged pairs the generation
/// never produced, and the answer would go another way.
#[tokio::test]
async fn a_vllm_stream_whose_engine_crashes_continues_from_its_token_ids() {
    use worker::vocab::{encode, ids_text};
    let c = cluster().await;
    let w = engine_worker_with(&c, "--crash-after-tokens 60 --merges", |ec| {
        ec.kind = worker::engine::EngineKind::Vllm;
        ec.ready_timeout = Duration::from_secs(20);
    })
    .await;
    c.store
        .create_deployment(&kvstore::DeploymentSpec {
            model: "m".into(),
            backend: "vllm".into(),
            num_gpus: 1,
            autoscaling: kvstore::AutoScaling {
                min_instances: 2,
                max_instances: 2,
                keep_alive_s: 60,
                ..Default::default()
            },
            backend_config: String::new(),
        })
        .await
        .unwrap();
    // The text an uninterrupted generation gives, and what a continuation from the text after
    // `k` tokens would give instead.
    let whole = |prompt: &str| ids_text(7, &encode(prompt, true), 80);
    let from_text = |prompt: &str, k: u32| {
        let head = ids_text(7, &encode(prompt, true), k);
        format!("{head}{}", ids_text(7, &encode(&format!("{prompt}{head}"), true), 80 - k))
    };

    ready_instances(&c, &w, 2).await;
    let seen = openai_client_reads(&c, "completion").await;
    assert_eq!(seen["text"], whole("hello engine"), "{seen}");
    assert_eq!(
        (seen["finish"].clone(), seen["ids"].clone()),
        (json!("length"), json!(1)),
        "{seen}"
    );
    assert_eq!(seen["finish_migrations"], 1, "the finish chunk says the stream moved: {seen}");
    assert_eq!(seen["usage_migrations"], 1, "so does the usage chunk: {seen}");
    let prompt_tokens = encode("hello engine", true).len();
    assert_eq!(seen["usage"]["prompt_tokens"], prompt_tokens, "{seen}");
    assert_eq!(seen["usage"]["completion_tokens"], 80, "{seen}");
    assert_eq!(seen["unasked_ids"], false, "no token ids the client did not ask for: {seen}");
    let cont = continuation_request(&c, &w).await;
    let k = 80 - cont["max_tokens"].as_u64().unwrap() as u32;
    let mut ids = encode("hello engine", true);
    let mut m = worker::vocab::TokenModel::new(7, &ids);
    ids.extend((0..k).map(|_| m.next_token().0));
    assert_eq!(cont["prompt"], json!(ids), "the prompt's ids, then the {k} generated");
    assert_ne!(from_text("hello engine", k), whole("hello engine"), "text would not do");

    // The crashed engine is replaced; the chat stream then loses its engine too, and goes on
    // as a completion of its templated prompt's ids and its own, read as chat chunks.
    ready_instances(&c, &w, 2).await;
    let seen = openai_client_reads(&c, "chat").await;
    let template = "system: be brief\nuser: a story\nassistant:";
    assert_eq!(seen["text"], whole(template), "{seen}");
    assert_eq!((seen["roles"].clone(), seen["ids"].clone()), (json!(1), json!(1)), "{seen}");
    assert_eq!(
        (seen["finish_migrations"].clone(), seen["usage_migrations"].clone()),
        (json!(1), json!(1)),
        "{seen}"
    );
    assert_eq!(seen["usage"]["completion_tokens"], 80, "{seen}");
    assert_eq!(seen["usage"]["prompt_tokens"], encode(template, true).len(), "{seen}");
    assert_eq!(seen["unasked_ids"], false, "{seen}");
    let cont = continuation_request(&c, &w).await;
    let k = 80 - cont["max_tokens"].as_u64().unwrap() as u32;
    assert!(cont.get("messages").is_none(), "a completion: {cont}");
    assert_eq!(cont["prompt"].as_array().unwrap().len(), encode(template, true).len() + k as usize);
    assert_ne!(from_text(template, k), whole(template), "text would not do");
}
