//! `sllm sim-engine`: the GPU simulator served as an OpenAI-compatible HTTP engine (`/health`,
//! `/v1/models`, `/v1/completions`, `/v1/chat/completions`, SSE), so the engine backend is
//! tested through the same process supervision and HTTP path a vLLM server would use.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Result;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use worker::{Backend, Job, Output, SimBackend, SimConfig};

/// Flags of `sllm sim-engine`.
#[derive(clap::Args, Debug)]
pub struct SimEngineArgs {
    /// Port to listen on (127.0.0.1).
    #[arg(long)]
    port: u16,
    /// Model name it serves (any path or name given by the engine template).
    #[arg(long, default_value = "model")]
    model: String,
    /// Simulated load time before /health answers 200, in milliseconds.
    #[arg(long, default_value_t = 200)]
    load_ms: u64,
    /// Simulated decode time per token, in milliseconds.
    #[arg(long, default_value_t = 5.0)]
    decode_ms: f64,
    /// Never become healthy (tests the start timeout).
    #[arg(long)]
    never_healthy: bool,
    /// Exit (as a crashing engine does) after producing this many tokens in all.
    #[arg(long)]
    crash_after_tokens: Option<u64>,
}

#[derive(Clone)]
struct Engine {
    sim: SimBackend,
    model: String,
    ready: Arc<AtomicBool>,
    produced: Arc<AtomicU64>,
    crash_after: Option<u64>,
}

pub async fn run(a: SimEngineArgs) -> Result<()> {
    let mut config = SimConfig {
        gpus: 1,
        time_scale: 1.0,
        prefill_per_token: Duration::ZERO,
        decode_per_token: Duration::from_secs_f64(a.decode_ms.max(0.0) / 1000.0),
        ..SimConfig::default()
    };
    // Load time = size / bandwidth: 1 MB at 1 GB/s per millisecond.
    config.bandwidths.insert(sllm_api::v1::CheckpointTier::Disk, 1_000_000_000);
    config
        .checkpoints
        .insert(a.model.clone(), (a.load_ms * 1_000_000, sllm_api::v1::CheckpointTier::Disk));
    let (sim, mut events) = SimBackend::new(config);
    sim.start(worker::StartSpec {
        instance_id: "engine".into(),
        model: a.model.clone(),
        backend: "sim".into(),
        gpus: vec![0],
        backend_config: None,
        traceparent: String::new(),
    })?;
    let ready = Arc::new(AtomicBool::new(false));
    let flag = ready.clone();
    let never = a.never_healthy;
    tokio::spawn(async move {
        while let Some(e) = events.recv().await {
            if matches!(e, worker::InstanceEvent::Ready { .. }) && !never {
                flag.store(true, Ordering::Relaxed);
            }
        }
    });
    let engine = Engine {
        sim,
        model: a.model.clone(),
        ready,
        produced: Arc::new(AtomicU64::new(0)),
        crash_after: a.crash_after_tokens,
    };
    let app = axum::Router::new()
        .route("/health", axum::routing::get(health))
        .route("/v1/models", axum::routing::get(models))
        .route("/v1/completions", axum::routing::post(completions))
        .route("/v1/chat/completions", axum::routing::post(chat))
        .route(
            "/debug/running",
            axum::routing::get(|State(e): State<Engine>| async move {
                e.sim.requests_running().to_string()
            }),
        )
        .with_state(engine);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", a.port)).await?;
    eprintln!("sim-engine: serving {} on 127.0.0.1:{}", a.model, a.port);
    axum::serve(listener, app).with_graceful_shutdown(service::shutdown_signal()).await?;
    Ok(())
}

async fn health(State(e): State<Engine>) -> StatusCode {
    if e.ready.load(Ordering::Relaxed) { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }
}

async fn models(State(e): State<Engine>) -> Json<Value> {
    Json(
        json!({ "object": "list", "data": [{ "id": e.model, "object": "model", "owned_by": "sim" }] }),
    )
}

fn job(body: &Value, prompt: String) -> Job {
    Job {
        instance_id: "engine".into(),
        prompt,
        max_tokens: body["max_tokens"].as_u64().unwrap_or(16) as u32,
        stop: body["stop"]
            .as_array()
            .map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect())
            .unwrap_or_default(),
        seed: body["seed"].as_u64().unwrap_or(0),
    }
}

async fn completions(State(e): State<Engine>, Json(body): Json<Value>) -> Response {
    let prompt = body["prompt"].as_str().unwrap_or_default().to_string();
    serve(e, &body, prompt, false).await
}

async fn chat(State(e): State<Engine>, Json(body): Json<Value>) -> Response {
    let mut prompt = String::new();
    for m in body["messages"].as_array().into_iter().flatten() {
        prompt.push_str(&format!(
            "{}: {}\n",
            m["role"].as_str().unwrap_or(""),
            m["content"].as_str().unwrap_or("")
        ));
    }
    serve(e, &body, prompt, true).await
}

async fn serve(e: Engine, body: &Value, prompt: String, chat: bool) -> Response {
    if !e.ready.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "loading").into_response();
    }
    let mut out = e.sim.generate(job(body, prompt));
    let object = if chat { "chat.completion.chunk" } else { "text_completion" };
    let piece = move |text: &str, finish: Option<&str>| {
        let choice = if chat {
            json!({ "index": 0, "delta": { "content": text }, "finish_reason": finish })
        } else {
            json!({ "index": 0, "text": text, "finish_reason": finish })
        };
        json!({ "object": object, "choices": [choice] })
    };
    if body["stream"].as_bool().unwrap_or(false) {
        let (tx, rx) = tokio::sync::mpsc::channel::<Value>(64);
        tokio::spawn(async move {
            while let Some(o) = out.recv().await {
                let v = match o {
                    Output::Text { text, tokens } => {
                        let n = e.produced.fetch_add(u64::from(tokens), Ordering::Relaxed)
                            + u64::from(tokens);
                        if e.crash_after.is_some_and(|c| n >= c) {
                            eprintln!("fatal: simulated engine crash after {n} tokens");
                            std::process::exit(3);
                        }
                        piece(&text, None)
                    }
                    Output::Done { finish, prompt_tokens, completion_tokens } => {
                        let mut v = piece(
                            "",
                            Some(if finish == worker::Finish::Stop { "stop" } else { "length" }),
                        );
                        v["usage"] = json!({ "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens });
                        v
                    }
                    Output::Error(msg) => json!({ "error": { "message": msg } }),
                };
                if tx.send(v).await.is_err() {
                    return; // client gone: dropping `out` cancels the generation
                }
            }
        });
        let stream = futures::StreamExt::chain(
            futures::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), |v| {
                Ok::<_, std::convert::Infallible>(Event::default().data(v.to_string()))
            }),
            futures::stream::once(async { Ok(Event::default().data("[DONE]")) }),
        );
        return Sse::new(stream).into_response();
    }
    let mut text = String::new();
    while let Some(o) = out.recv().await {
        match o {
            Output::Text { text: t, .. } => text.push_str(&t),
            Output::Done { completion_tokens, prompt_tokens, .. } => {
                return Json(json!({
                    "object": if chat { "chat.completion" } else { "text_completion" },
                    "choices": [ if chat { json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}) }
                                 else { json!({"index": 0, "text": text, "finish_reason": "length"}) } ],
                    "usage": { "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens },
                }))
                .into_response();
            }
            Output::Error(m) => return (StatusCode::INTERNAL_SERVER_ERROR, m).into_response(),
        }
    }
    (StatusCode::INTERNAL_SERVER_ERROR, "no answer").into_response()
}
