//! `sllm sim-engine`: the GPU simulator served as an OpenAI-compatible HTTP engine (`/health`,
//! `/v1/models`, `/v1/completions`, `/v1/chat/completions`, SSE, `/v1/rerank`, `/tokenize` and
//! `/detokenize` in vLLM's shape, and vLLM's LoRA surface:
//! `--lora-modules`, `/v1/load_lora_adapter`, `/v1/unload_lora_adapter`, an adapter served as a
//! model of its own name), so the engine backend is tested through the same process supervision
//! and HTTP path a vLLM server would use. Like vLLM it takes a completion's prompt as token ids
//! and answers `return_token_ids` with the prompt's ids (`prompt_token_ids`, on the first
//! event) and each event's (`token_ids`), in the simulator's vocabulary ([`worker::vocab`]);
//! with `--merges` it tokenises text as a BPE vocabulary does and generates from the ids, so
//! that a continuation from re-tokenised text goes another way than one from the ids.
//! It also answers SGLang's metadata endpoints
//! (`/model_info`, `/server_info` and their older `/get_` names), which gateways such as SMG and
//! sglang-router read when they register an engine (`scripts/bench peers` puts them in front of
//! it).

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
    /// Context length in words: a prompt plus max_tokens above it is refused with 400, as
    /// vLLM refuses a prompt over its max_model_len.
    #[arg(long)]
    max_model_len: Option<u64>,
    /// In a stream, after this many tokens of one request: an error event (as vLLM sends one
    /// when generation fails), then `[DONE]`.
    #[arg(long)]
    error_after_tokens: Option<u32>,
    /// In a stream, after this many tokens of one request: nothing more, the connection held
    /// open (a hung engine).
    #[arg(long)]
    stall_after_tokens: Option<u32>,
    /// The name it serves requests under, as vLLM's `--served-model-name` (default: --model).
    #[arg(long)]
    served_model_name: Option<String>,
    /// LoRA adapters served from the start, each NAME=PATH (as vLLM's `--lora-modules`).
    #[arg(long, num_args = 1.., value_name = "NAME=PATH")]
    lora_modules: Vec<String>,
    /// Tokenise text with merged pairs of words, as a BPE vocabulary does, and generate from
    /// token ids: generated text tokenised again is not the ids generated, so a generation
    /// continued from its text goes another way than one continued from its ids.
    #[arg(long)]
    merges: bool,
}

#[derive(Clone)]
struct Engine {
    sim: SimBackend,
    model: String,
    ready: Arc<AtomicBool>,
    produced: Arc<AtomicU64>,
    crash_after: Option<u64>,
    max_model_len: Option<u64>,
    /// The body of the last request, as it arrived (for tests: what reached the engine).
    last_request: Arc<std::sync::Mutex<Value>>,
    /// The trace-context headers of the last request (`traceparent`, `baggage`).
    last_headers: Arc<std::sync::Mutex<Value>>,
    /// Generation requests received.
    requests: Arc<AtomicU64>,
    error_after: Option<u32>,
    stall_after: Option<u32>,
    /// LoRA adapters it serves, name -> path.
    adapters: Arc<std::sync::Mutex<std::collections::BTreeMap<String, String>>>,
    /// `--merges`.
    merges: bool,
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
        model: a.served_model_name.clone().unwrap_or_else(|| a.model.clone()),
        ready,
        produced: Arc::new(AtomicU64::new(0)),
        crash_after: a.crash_after_tokens,
        max_model_len: a.max_model_len,
        last_request: Arc::new(std::sync::Mutex::new(Value::Null)),
        last_headers: Arc::new(std::sync::Mutex::new(Value::Null)),
        requests: Arc::new(AtomicU64::new(0)),
        error_after: a.error_after_tokens,
        stall_after: a.stall_after_tokens,
        adapters: Arc::new(std::sync::Mutex::new(
            a.lora_modules
                .iter()
                .filter_map(|m| m.split_once('='))
                .map(|(n, p)| (n.to_string(), p.to_string()))
                .collect(),
        )),
        merges: a.merges,
    };
    let app = axum::Router::new()
        .route("/health", axum::routing::get(health))
        .route("/v1/models", axum::routing::get(models))
        .route("/v1/completions", axum::routing::post(completions))
        .route("/v1/chat/completions", axum::routing::post(chat))
        .route("/v1/rerank", axum::routing::post(rerank))
        .route("/rerank", axum::routing::post(rerank))
        .route(
            "/tokenize",
            axum::routing::post(|e: State<Engine>, body: String| {
                tokenizer(e, worker::tokenize::Endpoint::Tokenize, body)
            }),
        )
        .route(
            "/detokenize",
            axum::routing::post(|e: State<Engine>, body: String| {
                tokenizer(e, worker::tokenize::Endpoint::Detokenize, body)
            }),
        )
        .route("/model_info", axum::routing::get(model_info))
        .route("/get_model_info", axum::routing::get(model_info))
        .route("/server_info", axum::routing::get(server_info))
        .route("/get_server_info", axum::routing::get(server_info))
        .route("/v1/load_lora_adapter", axum::routing::post(load_lora))
        .route("/v1/unload_lora_adapter", axum::routing::post(unload_lora))
        .route(
            "/debug/last-headers",
            axum::routing::get(|State(e): State<Engine>| async move {
                Json(e.last_headers.lock().map(|v| v.clone()).unwrap_or(Value::Null))
            }),
        )
        .route(
            "/debug/last-request",
            axum::routing::get(|State(e): State<Engine>| async move {
                Json(e.last_request.lock().map(|v| v.clone()).unwrap_or(Value::Null))
            }),
        )
        .route(
            "/debug/requests",
            axum::routing::get(|State(e): State<Engine>| async move {
                e.requests.load(Ordering::Relaxed).to_string()
            }),
        )
        .route(
            "/debug/running",
            axum::routing::get(|State(e): State<Engine>| async move {
                e.sim.requests_running().to_string()
            }),
        )
        .with_state(engine);
    // TCP_NODELAY, as the servers it stands in for set it (vLLM's and SGLang's uvicorn): an SSE
    // event written after the headers must not wait behind Nagle for the client's delayed ACK.
    let listener = axum::serve::ListenerExt::tap_io(
        tokio::net::TcpListener::bind(("127.0.0.1", a.port)).await?,
        |tcp| {
            let _ = tcp.set_nodelay(true);
        },
    );
    eprintln!("sim-engine: serving {} on 127.0.0.1:{}", a.model, a.port);
    axum::serve(listener, app).with_graceful_shutdown(service::shutdown_signal()).await?;
    Ok(())
}

async fn health(State(e): State<Engine>) -> StatusCode {
    if e.ready.load(Ordering::Relaxed) { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }
}

async fn models(State(e): State<Engine>) -> Json<Value> {
    let mut data = vec![json!({ "id": e.model, "object": "model", "owned_by": "sim" })];
    if let Ok(adapters) = e.adapters.lock() {
        for (name, path) in adapters.iter() {
            data.push(json!({ "id": name, "object": "model", "owned_by": "sim", "root": path, "parent": e.model }));
        }
    }
    Json(json!({ "object": "list", "data": data }))
}

/// SGLang's `GET /model_info`: the model it serves, and that it generates text.
async fn model_info(State(e): State<Engine>) -> Json<Value> {
    Json(json!({
        "model_path": e.model,
        "tokenizer_path": e.model,
        "is_generation": true,
        "preferred_sampling_params": null,
        "weight_version": "default",
        "has_image_understanding": false,
        "has_audio_understanding": false,
    }))
}

/// SGLang's `GET /server_info`, reduced to the fields that describe one engine on one GPU (a
/// real server adds every launch argument and its scheduler's state).
async fn server_info(State(e): State<Engine>) -> Json<Value> {
    let mut info = json!({
        "model_path": e.model,
        "tokenizer_path": e.model,
        "served_model_name": e.model,
        "tp_size": 1,
        "dp_size": 1,
        "internal_states": [],
        "version": env!("CARGO_PKG_VERSION"),
    });
    if let Some(len) = e.max_model_len {
        info["context_length"] = json!(len);
    }
    Json(info)
}

/// vLLM's `POST /v1/load_lora_adapter {lora_name, lora_path}`.
async fn load_lora(State(e): State<Engine>, Json(body): Json<Value>) -> Response {
    let (Some(name), Some(path)) = (body["lora_name"].as_str(), body["lora_path"].as_str()) else {
        return engine_error(StatusCode::BAD_REQUEST, "lora_name and lora_path are required");
    };
    let Ok(mut adapters) = e.adapters.lock() else {
        return engine_error(StatusCode::INTERNAL_SERVER_ERROR, "adapters unavailable");
    };
    if adapters.contains_key(name) {
        let m = format!("The lora adapter '{name}' has already been loaded.");
        return engine_error(StatusCode::BAD_REQUEST, &m);
    }
    adapters.insert(name.to_string(), path.to_string());
    format!("Success: LoRA adapter '{name}' added successfully.").into_response()
}

/// vLLM's `POST /v1/unload_lora_adapter {lora_name}`.
async fn unload_lora(State(e): State<Engine>, Json(body): Json<Value>) -> Response {
    let name = body["lora_name"].as_str().unwrap_or_default();
    match e.adapters.lock().map(|mut a| a.remove(name)) {
        Ok(Some(_)) => {
            format!("Success: LoRA adapter '{name}' removed successfully.").into_response()
        }
        _ => engine_error(
            StatusCode::NOT_FOUND,
            &format!("The lora adapter '{name}' cannot be found."),
        ),
    }
}

/// The simulator's job for an OpenAI body: max_tokens (16 if unset, as vLLM's completions),
/// stop, seed and temperature; the other fields a real engine takes are not simulated.
fn job(body: &Value, input: worker::Input) -> Job {
    let stop = match &body["stop"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a.iter().filter_map(|s| s.as_str().map(String::from)).collect(),
        _ => Vec::new(),
    };
    let max_tokens = body["max_tokens"].as_u64().or(body["max_completion_tokens"].as_u64());
    Job {
        instance_id: "engine".into(),
        input,
        params: sllm_api::v1::SamplingParams {
            max_tokens: max_tokens.unwrap_or(16) as u32,
            stop,
            seed: body["seed"].as_u64(),
            temperature: body["temperature"].as_f64().map(|t| t as f32),
            ..Default::default()
        },
        openai: None,
        traceparent: String::new(),
        adapter: None,
        baggage: String::new(),
        continuation: None,
    }
}

/// Keeps the trace-context headers a request came with, for `/debug/last-headers`.
fn keep_headers(e: &Engine, headers: &axum::http::HeaderMap) {
    let get = |k: &str| headers.get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
    if let Ok(mut last) = e.last_headers.lock() {
        *last = json!({ "traceparent": get("traceparent"), "baggage": get("baggage") });
    }
}

async fn completions(
    State(e): State<Engine>,
    headers: axum::http::HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    keep_headers(&e, &headers);
    // As vLLM's: text or token ids, or a batch of either (a list of texts, a list of lists of
    // ids), each answered `n` times.
    let ids = |items: &[Value]| -> Option<Vec<u32>> {
        items.iter().map(|i| i.as_u64().and_then(|i| u32::try_from(i).ok())).collect()
    };
    let bad = || engine_error(StatusCode::BAD_REQUEST, "prompt: must be text or token ids");
    let prompts: Vec<(String, Option<Vec<u32>>)> = match &body["prompt"] {
        Value::String(p) => vec![(p.clone(), None)],
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_number) => {
            match ids(items) {
                Some(ids) => vec![(String::new(), Some(ids))],
                None => return engine_error(StatusCode::BAD_REQUEST, "prompt: not token ids"),
            }
        }
        Value::Array(items) if !items.is_empty() => {
            let mut prompts = Vec::with_capacity(items.len());
            for item in items {
                prompts.push(match item {
                    Value::String(p) => (p.clone(), None),
                    Value::Array(inner) => match ids(inner) {
                        Some(ids) => (String::new(), Some(ids)),
                        None => {
                            return engine_error(StatusCode::BAD_REQUEST, "prompt: not token ids");
                        }
                    },
                    _ => return bad(),
                });
            }
            prompts
        }
        _ => return bad(),
    };
    let mut inputs = Vec::with_capacity(prompts.len());
    for (prompt, prompt_ids) in prompts {
        let prompt = match &prompt_ids {
            Some(ids) => match worker::vocab::decode(ids) {
                Ok(text) => text,
                Err(id) => {
                    let m = format!("Token id {id} is out of vocabulary");
                    return engine_error(StatusCode::BAD_REQUEST, &m);
                }
            },
            None => prompt,
        };
        inputs.push((worker::Input::Prompt(prompt), prompt_ids));
    }
    serve(e, &body, inputs, false).await
}

async fn chat(
    State(e): State<Engine>,
    headers: axum::http::HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    keep_headers(&e, &headers);
    let messages = body["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| sllm_api::v1::ChatMessage {
            role: m["role"].as_str().unwrap_or_default().to_string(),
            content: m["content"].as_str().unwrap_or_default().to_string(),
        })
        .collect();
    serve(e, &body, vec![(worker::Input::Chat(messages), None)], true).await
}

/// An error in the shape vLLM's OpenAI server gives.
/// vLLM's `/v1/rerank` (and `/rerank`), the simulator's scores ([`worker::rerank`]).
async fn rerank(State(e): State<Engine>, body: String) -> Response {
    if let Ok(mut last) = e.last_request.lock() {
        *last = serde_json::from_str(&body).unwrap_or(Value::Null);
    }
    let id = format!("rerank-{}", uuid::Uuid::now_v7().simple());
    // As vLLM names the model in its answers: the name it serves.
    match worker::rerank::answer(&body, &e.model, &id) {
        Ok((answer, _)) => json_answer(answer),
        Err(f) => engine_error(StatusCode::BAD_REQUEST, &f.message),
    }
}

/// A JSON body, as it is.
fn json_answer(body: String) -> Response {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// vLLM's `/tokenize` and `/detokenize`, over the simulator's vocabulary (with `--merges`, its
/// merged pairs) and reporting `--max-model-len`.
async fn tokenizer(
    State(e): State<Engine>,
    endpoint: worker::tokenize::Endpoint,
    body: String,
) -> Response {
    if let Ok(mut last) = e.last_request.lock() {
        *last = serde_json::from_str(&body).unwrap_or(Value::Null);
    }
    match worker::tokenize::answer(endpoint, &body, e.merges, e.max_model_len) {
        Ok(answer) => json_answer(answer),
        Err(f) => engine_error(StatusCode::BAD_REQUEST, &f.message),
    }
}

fn engine_error(status: StatusCode, message: &str) -> Response {
    let body = json!({ "error": { "message": message, "type": "BadRequestError", "param": null, "code": status.as_u16() } });
    (status, Json(body)).into_response()
}

/// One sequence a request asks for: a prompt's `j`th of `n` choices.
struct Choice {
    /// Its `index` in the answer: the prompt's place times `n`, plus `j`, as vLLM numbers them.
    index: u64,
    /// Its prompt's ids, said once (on its first event, or in its body).
    prompt_ids: Option<Vec<u32>>,
    /// Tokens of a continued final assistant message, which count as prompt.
    prefilled: u32,
    /// Whether it is its prompt's first choice: only those count the prompt in the usage.
    counts_prompt: bool,
}

/// How a request's choices are set up from its body and inputs; the status and message of an
/// engine's refusal, if the body asks for what a real engine would refuse.
fn choices(
    e: &Engine,
    body: &Value,
    inputs: Vec<(worker::Input, Option<Vec<u32>>)>,
) -> Result<Vec<(Choice, worker::sim::SimRequest)>, (StatusCode, String)> {
    let n = match &body["n"] {
        Value::Null => 1,
        v => match v.as_u64().filter(|n| *n >= 1) {
            Some(n) => n,
            None => return Err((StatusCode::BAD_REQUEST, "n must be at least 1".into())),
        },
    };
    let mut out = Vec::new();
    for (i, (input, ids)) in inputs.into_iter().enumerate() {
        for j in 0..n {
            let mut job = job(body, input.clone());
            // Each choice samples on its own: a seeded request's choices differ, as vLLM's.
            job.params.seed = job.params.seed.map(|s| s.wrapping_add(j));
            // vLLM's `continue_final_message`: the last (assistant) message is continued, not
            // answered; its text counts as prompt, as an engine counts it.
            let mut prefilled = 0u32;
            if let worker::Input::Chat(messages) = &mut job.input
                && body["continue_final_message"].as_bool() == Some(true)
                && messages.last().is_some_and(|m| m.role == "assistant")
                && let Some(last) = messages.pop()
            {
                prefilled = last.content.split_whitespace().count() as u32;
                job.continuation =
                    Some(sllm_api::v1::Continuation { text: last.content, ..Default::default() });
            }
            // As vLLM: an adapter is asked for as a model of its own name.
            let asked = body["model"].as_str().unwrap_or_default();
            if asked != e.model
                && let Some(path) = e.adapters.lock().ok().and_then(|a| a.get(asked).cloned())
            {
                job.adapter = Some(sllm_api::v1::LoraAdapter { name: asked.to_string(), path });
            }
            let mut req = worker::sim::SimRequest::from_job(&job)
                .map_err(|f| (StatusCode::BAD_REQUEST, f.message))?;
            // The prompt as token ids: as given, else the text (a chat as its template writes
            // it, with what it continues) tokenised. With --merges the model runs on them.
            let prompt_ids = ids.clone().unwrap_or_else(|| {
                let continued = req.continued.as_ref().map(|(t, _)| t.as_str()).unwrap_or_default();
                worker::vocab::encode(&format!("{}{continued}", req.prompt), e.merges)
            });
            req.with_ids = true;
            if e.merges {
                req.prompt_ids = Some(prompt_ids.clone());
                prefilled = 0;
            }
            let prompt_words = match (&req.prompt_ids, &job.input) {
                (Some(ids), _) => ids.len(),
                (None, worker::Input::Prompt(p)) => p.split_whitespace().count(),
                (None, worker::Input::Chat(m)) => {
                    m.iter().map(|m| m.content.split_whitespace().count()).sum()
                }
            } as u64;
            if let Some(len) = e.max_model_len
                && prompt_words + u64::from(req.max_tokens) > len
            {
                let message = format!(
                    "This model's maximum context length is {len} tokens. However, you requested {} tokens ({prompt_words} in the messages, {} in the completion).",
                    prompt_words + u64::from(req.max_tokens),
                    req.max_tokens
                );
                return Err((StatusCode::BAD_REQUEST, message));
            }
            let choice = Choice {
                index: i as u64 * n + j,
                prompt_ids: Some(prompt_ids),
                prefilled,
                counts_prompt: j == 0,
            };
            out.push((choice, req));
        }
    }
    Ok(out)
}

async fn serve(
    e: Engine,
    body: &Value,
    inputs: Vec<(worker::Input, Option<Vec<u32>>)>,
    chat: bool,
) -> Response {
    if let Ok(mut last) = e.last_request.lock() {
        *last = body.clone();
    }
    e.requests.fetch_add(1, Ordering::Relaxed);
    if !e.ready.load(Ordering::Relaxed) {
        return engine_error(StatusCode::SERVICE_UNAVAILABLE, "the model is loading");
    }
    let set_up = match choices(&e, body, inputs) {
        Ok(c) => c,
        Err((status, message)) => return engine_error(status, &message),
    };
    let mut all = Vec::with_capacity(set_up.len());
    let mut outs = Vec::with_capacity(set_up.len());
    for (k, (choice, req)) in set_up.into_iter().enumerate() {
        let out = e.sim.generate_request("engine", req);
        outs.push(futures::StreamExt::map(
            tokio_stream::wrappers::ReceiverStream::new(out),
            move |o| (k, o),
        ));
        all.push(choice);
    }
    // Every choice's outputs as they come, each tagged with its place in `all`.
    let mut out = futures::stream::select_all(outs);
    let id =
        format!("{}-{}", if chat { "chatcmpl" } else { "cmpl" }, uuid::Uuid::new_v4().simple());
    let model = e.model.clone();
    let object = if chat { "chat.completion.chunk" } else { "text_completion" };
    let piece = move |choice: Value| json!({ "id": id, "object": object, "created": 0, "model": model, "choices": [choice] });
    let word = |f: worker::Finish| if f == worker::Finish::Stop { "stop" } else { "length" };
    let include_usage = body["stream_options"]["include_usage"].as_bool().unwrap_or(false);
    // vLLM's `return_token_ids`: the prompt's ids once (a completion's choice's first event, a
    // chat's first chunk), each event's own.
    let return_ids = body["return_token_ids"].as_bool().unwrap_or(false);
    // The usage: each prompt counted once, every choice's tokens.
    let mut usage = (0u32, 0u32);
    let mut count = move |c: &Choice, prompt_tokens: u32, completion_tokens: u32| {
        if c.counts_prompt {
            usage.0 += prompt_tokens + c.prefilled;
        }
        usage.1 += completion_tokens;
        json!({ "prompt_tokens": usage.0, "completion_tokens": usage.1, "total_tokens": usage.0 + usage.1 })
    };
    if body["stream"].as_bool().unwrap_or(false) {
        let (tx, rx) = tokio::sync::mpsc::channel::<Value>(64);
        tokio::spawn(async move {
            // A completion's choice says its prompt's ids on its first event, null after.
            let with_ids = |c: &mut Choice, mut v: Value, ids: Vec<u32>| {
                if return_ids {
                    if !chat {
                        v["prompt_token_ids"] = json!(c.prompt_ids.take());
                    }
                    v["token_ids"] = json!(ids);
                }
                v
            };
            if chat {
                for c in &mut all {
                    let role = json!({ "index": c.index, "delta": { "role": "assistant", "content": "" }, "finish_reason": null });
                    let mut first = piece(role);
                    if return_ids {
                        first["prompt_token_ids"] = json!(c.prompt_ids.take());
                    }
                    let _ = tx.send(first).await;
                }
            }
            let mut sent = vec![0u32; all.len()];
            let mut totals = Value::Null;
            while let Some((k, o)) = futures::StreamExt::next(&mut out).await {
                if e.error_after == Some(sent[k]) {
                    let error = json!({ "error": { "message": "simulated failure during generation", "type": "InternalServerError", "param": null, "code": 500 } });
                    let _ = tx.send(error).await;
                    return;
                }
                if e.stall_after == Some(sent[k]) {
                    // Hold the stream open and send nothing, until the client goes.
                    tx.closed().await;
                    return;
                }
                let c = &mut all[k];
                let v = match o {
                    // The simulated model's own head went out already.
                    Output::Started => continue,
                    Output::Text { text, tokens, token_ids, .. } => {
                        sent[k] += tokens;
                        let n = e.produced.fetch_add(u64::from(tokens), Ordering::Relaxed)
                            + u64::from(tokens);
                        if e.crash_after.is_some_and(|c| n >= c) {
                            eprintln!("fatal: simulated engine crash after {n} tokens");
                            std::process::exit(3);
                        }
                        let v = if chat {
                            json!({ "index": c.index, "delta": { "content": text }, "finish_reason": null })
                        } else {
                            json!({ "index": c.index, "text": text, "finish_reason": null })
                        };
                        piece(with_ids(c, v, token_ids))
                    }
                    Output::Done { finish, prompt_tokens, completion_tokens } => {
                        totals = count(c, prompt_tokens, completion_tokens);
                        let end = if chat {
                            json!({ "index": c.index, "delta": {}, "finish_reason": word(finish) })
                        } else {
                            json!({ "index": c.index, "text": "", "finish_reason": word(finish) })
                        };
                        piece(with_ids(c, end, Vec::new()))
                    }
                    Output::Error(f) => {
                        let error = json!({ "error": { "message": f.message, "type": "InternalServerError", "param": null, "code": 500 } });
                        let _ = tx.send(error).await;
                        return;
                    }
                };
                if tx.send(v).await.is_err() {
                    return; // client gone: dropping `out` cancels the generations
                }
            }
            if include_usage {
                let mut u = piece(Value::Null);
                u["choices"] = json!([]);
                u["usage"] = totals;
                let _ = tx.send(u).await;
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
    let mut texts = vec![(String::new(), Vec::new()); all.len()];
    let mut ends = vec![Value::Null; all.len()];
    let mut totals = Value::Null;
    while let Some((k, o)) = futures::StreamExt::next(&mut out).await {
        match o {
            Output::Started => {}
            Output::Text { text, token_ids, .. } => {
                texts[k].0.push_str(&text);
                texts[k].1.extend(token_ids);
            }
            Output::Done { finish, completion_tokens, prompt_tokens } => {
                let c = &mut all[k];
                totals = count(c, prompt_tokens, completion_tokens);
                let (text, ids) = std::mem::take(&mut texts[k]);
                let mut choice = if chat {
                    json!({"index": c.index, "message": {"role": "assistant", "content": text}, "finish_reason": word(finish)})
                } else {
                    json!({"index": c.index, "text": text, "finish_reason": word(finish)})
                };
                if return_ids {
                    choice["token_ids"] = json!(ids);
                    if !chat {
                        choice["prompt_token_ids"] = json!(c.prompt_ids.take());
                    }
                }
                ends[k] = choice;
            }
            Output::Error(f) => {
                let status = if f.kind == worker::FailureKind::Invalid {
                    StatusCode::BAD_REQUEST
                } else {
                    StatusCode::INTERNAL_SERVER_ERROR
                };
                return engine_error(status, &f.message);
            }
        }
    }
    if ends.iter().any(Value::is_null) {
        return engine_error(StatusCode::INTERNAL_SERVER_ERROR, "no answer");
    }
    let mut v = piece(Value::Null);
    v["choices"] = Value::Array(ends);
    v["object"] = json!(if chat { "chat.completion" } else { "text_completion" });
    v["usage"] = totals;
    if return_ids && chat {
        v["prompt_token_ids"] = json!(all.first_mut().and_then(|c| c.prompt_ids.take()));
    }
    Json(v).into_response()
}
