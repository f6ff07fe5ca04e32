//! The OpenAI-compatible HTTP API on its own port: `GET /v1/models`, `POST /v1/completions`,
//! `POST /v1/chat/completions`, with and without `stream: true` (server-sent events ending in
//! `data: [DONE]`), `POST /v1/responses` (OpenAI's Responses API: relayed to an engine that
//! serves it, or written here over a backend that answers with text; typed events,
//! `event: <type>`, no `[DONE]`), `POST /v1/embeddings`, `POST /v1/rerank` (also `/rerank`), the
//! engines' own `POST /tokenize` and `POST /detokenize`, and errors in
//! OpenAI's JSON shape with the matching HTTP status, so the official `openai` clients work
//! unchanged.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use sllm_api::v1 as pb;
use tokio_util::sync::CancellationToken;

use crate::error::DispatchError;
use crate::request::{Event, Events, Input, Job};
use crate::{Dispatch, stack};
use service::auth::Needed;

/// Serves the API on `listener` until `shutdown`.
pub(crate) async fn serve(
    dispatch: Dispatch,
    listener: service::Listener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    service::serve::serve_http(listener, router(dispatch), shutdown).await
}

/// The API's routes.
pub fn router(dispatch: Dispatch) -> axum::Router {
    axum::Router::new()
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model))
        .route("/register", post(crate::admin::register))
        .route("/update", post(crate::admin::update))
        .route("/delete", post(crate::admin::delete))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/responses", post(responses))
        .route("/v1/embeddings", post(embeddings))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/v1/rerank", post(rerank))
        .route("/rerank", post(rerank))
        .route("/health", get(|| async { "ok" }))
        .fallback(|| async {
            error_response(&DispatchError::invalid(
                "path",
                "no such endpoint; see /v1/models, /v1/completions, /v1/chat/completions, \
                 /v1/responses, /v1/embeddings, /v1/rerank, /tokenize, /detokenize",
            ))
            .with_status(404)
        })
        .layer(stack::EdgeLayer::<Http>::new(dispatch.inner.clone()))
        .with_state(dispatch)
}

fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

trait WithStatus {
    fn with_status(self, code: u16) -> Response;
}

impl WithStatus for Response {
    fn with_status(mut self, code: u16) -> Response {
        *self.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST);
        self
    }
}

fn error_json(e: &DispatchError) -> Value {
    let (_, kind, code) = e.http();
    let param = match e {
        DispatchError::Invalid { field, .. } => Value::String(field.clone()),
        DispatchError::NotFound(_)
        | DispatchError::NoAdapter { .. }
        | DispatchError::Missing(..)
        | DispatchError::Deleting(_) => Value::String("model".into()),
        _ => Value::Null,
    };
    json!({ "error": { "message": e.to_string(), "type": kind, "param": param, "code": code } })
}

/// The OpenAI surface: API keys checked at the edge, refusals in OpenAI's error shape.
pub enum Http {}

impl stack::Surface for Http {
    type Body = axum::body::Body;
    const CHECKS_KEYS: bool = true;

    fn classify(method: &axum::http::Method, path: &str) -> (Needed, bool) {
        match path {
            "/v1/completions"
            | "/v1/chat/completions"
            | "/v1/responses"
            | "/v1/embeddings"
            | "/v1/rerank"
            | "/rerank"
            | "/tokenize"
            | "/detokenize" => (Needed::Inference, method == axum::http::Method::POST),
            "/v1/models" => (Needed::Read, false),
            p if p.starts_with("/v1/models/") => (Needed::Read, false),
            // ServerlessLLM's admin API.
            "/register" | "/update" | "/delete" => (Needed::Admin, false),
            _ => (Needed::Nothing, false),
        }
    }

    fn deadline(_: &HeaderMap) -> Result<Option<Instant>, DispatchError> {
        // OpenAI's API has no deadline header (the `openai` package's `x-stainless-read-timeout`
        // bounds the wait for each byte, not the request): `--max-hold-s` bounds the hold.
        Ok(None)
    }

    fn peer<B>(req: &axum::http::Request<B>) -> Option<std::net::IpAddr> {
        req.extensions().get::<ConnectInfo<SocketAddr>>().map(|ConnectInfo(a)| a.ip())
    }

    fn refuse(e: &DispatchError) -> Response {
        error_response(e)
    }

    fn refuse_key(r: service::auth::Refused) -> Response {
        let (status, kind, message) = match r {
            service::auth::Refused::Unauthenticated(m) => {
                (StatusCode::UNAUTHORIZED, "invalid_api_key", m)
            }
            service::auth::Refused::PermissionDenied(m) => {
                (StatusCode::FORBIDDEN, "permission_denied", m)
            }
        };
        let body = json!({ "error": { "message": message, "type": "invalid_request_error", "param": null, "code": kind } });
        (status, Json(body)).into_response()
    }
}

fn error_response(e: &DispatchError) -> Response {
    let (status, _, _) = e.http();
    // An engine's own OpenAI error, with the engine's status, as the engine wrote it.
    if let DispatchError::Engine { body, .. } = e
        && serde_json::from_str::<Value>(body)
            .is_ok_and(|v| v.get("error").is_some_and(Value::is_object))
    {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
        return (status, json_body(body.clone())).into_response();
    }
    let mut resp =
        (StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST), Json(error_json(e)))
            .into_response();
    if let Some(retry_after) = e.retry_after() {
        let secs = retry_after.as_secs().max(1).to_string();
        if let Ok(v) = HeaderValue::from_str(&secs) {
            resp.headers_mut().insert("retry-after", v);
        }
        if let Ok(v) = HeaderValue::from_str(&retry_after.as_millis().to_string()) {
            resp.headers_mut().insert("retry-after-ms", v);
        }
    }
    resp
}

/// Every deployment and each of its LoRA adapters (`base:adapter`, with `parent` the base), in
/// OpenAI's shape (`data`) and under `models`, where ServerlessLLM's CLI reads them.
async fn models(State(d): State<Dispatch>) -> Response {
    let data: Vec<Value> = d.listing().iter().map(model_card).collect();
    Json(json!({ "object": "list", "data": data, "models": data })).into_response()
}

/// One model card: a deployment, or an adapter with `parent` its base model and `root` its path;
/// with `max_model_len`, as vLLM's and SGLang's cards have it, where the deployment sets it.
fn model_card(m: &crate::Listed) -> Value {
    let mut card = json!({
        "id": m.id,
        "object": "model",
        "created": m.created,
        "owned_by": "sllm",
        "root": m.root,
        "parent": m.parent,
    });
    if let Some(len) = m.max_model_len {
        card["max_model_len"] = json!(len);
    }
    card
}

/// `GET /v1/models/{id}`: a deployment by name, or an adapter by `base:adapter` or by its
/// name alone when one deployment has it.
async fn model(
    State(d): State<Dispatch>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let listing = d.listing();
    if let Some(m) = listing.iter().find(|m| m.id == id) {
        return Json(model_card(m)).into_response();
    }
    let named: Vec<&crate::Listed> = listing
        .iter()
        .filter(|m| m.parent.is_some() && m.adapter.as_deref() == Some(&id))
        .collect();
    match named.as_slice() {
        [one] => Json(model_card(one)).into_response(),
        [] => error_response(&DispatchError::NotFound(id)).with_status(404),
        many => error_response(&DispatchError::invalid(
            "model",
            format!(
                "adapter {id:?} belongs to several models ({}): name it as base:adapter",
                many.iter().filter_map(|m| m.parent.as_deref()).collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}

/// Most choices one request may ask for (`n`, times the prompts of a batch), as OpenAI's API
/// allows: each is a sequence the engine generates in full.
const MAX_CHOICES: u32 = 128;

/// A string or a list of strings (OpenAI accepts both for `stop` and `prompt`).
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct CommonBody {
    model: Option<String>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    stop: Option<OneOrMany>,
    seed: Option<u64>,
    n: Option<u32>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<Value>,
    /// ServerlessLLM's way to name a LoRA adapter of `model`.
    lora_adapter_name: Option<String>,
}

impl CommonBody {
    /// Whether a streamed answer ends with a usage chunk (`stream_options.include_usage`).
    fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    content: Option<Value>,
}

/// What every answer to one request carries: its `id` and `created`.
#[derive(Clone)]
struct Answer {
    id: String,
    created: i64,
}

impl Answer {
    fn new(prefix: &str) -> Answer {
        // A UUIDv7 in the hex form vLLM's ids use: ids sort by arrival.
        let id = format!("{prefix}-{}", uuid::Uuid::now_v7().simple());
        Answer { id, created: now_s() as i64 }
    }
}

/// Reads the fields both endpoints share, naming the offending one on error. Every other field
/// goes to the engine as the client wrote it.
fn common(
    body: &Value,
    raw: &str,
    traceparent: String,
    endpoint: pb::OpenAiEndpoint,
    answer: &Answer,
) -> Result<(CommonBody, Job), DispatchError> {
    let c: CommonBody = read_naming(body)?;
    let model = c
        .model
        .clone()
        .filter(|m| !m.is_empty())
        .ok_or_else(|| DispatchError::invalid("model", "is required"))?;
    if c.n.is_some_and(|n| !(1..=MAX_CHOICES).contains(&n)) {
        return Err(DispatchError::invalid(
            "n",
            format!("must be between 1 and {MAX_CHOICES} choices"),
        ));
    }
    let max = c.max_completion_tokens.or(c.max_tokens).unwrap_or(0);
    let max_tokens = u32::try_from(max)
        .map_err(|_| DispatchError::invalid("max_tokens", format!("{max} is not a token count")))?;
    let params = pb::SamplingParams {
        max_tokens,
        temperature: c.temperature,
        top_p: c.top_p,
        stop: c
            .stop
            .as_ref()
            .map(|s| match s {
                OneOrMany::One(s) => vec![s.clone()],
                OneOrMany::Many(v) => v.clone(),
            })
            .unwrap_or_default(),
        seed: c.seed,
        ..Default::default()
    };
    let entry = match endpoint {
        pb::OpenAiEndpoint::ChatCompletions => "POST /v1/chat/completions",
        _ => "POST /v1/completions",
    };
    let mut job = relayed_job(raw, traceparent, endpoint, entry, answer, model, params);
    job.adapter_name = c.lora_adapter_name.clone();
    job.choices = c.n.unwrap_or(1);
    Ok((c, job))
}

/// Reads `T` from a body, naming the field that is wrong: the first that fails on its own.
fn read_naming<T: serde::de::DeserializeOwned>(body: &Value) -> Result<T, DispatchError> {
    T::deserialize(body).map_err(|e| {
        let field = body.as_object().and_then(|o| {
            o.iter().find_map(|(k, v)| {
                let alone = Value::Object([(k.clone(), v.clone())].into_iter().collect());
                serde_json::from_value::<T>(alone).is_err().then(|| k.clone())
            })
        });
        DispatchError::invalid(field.as_deref().unwrap_or("body"), e.to_string())
    })
}

/// The job for a client's OpenAI body, which the engine gets as it was sent (its input, here
/// only for its size, is set by the caller; so are the adapter and the choices).
fn relayed_job(
    raw: &str,
    traceparent: String,
    endpoint: pb::OpenAiEndpoint,
    entry: &'static str,
    answer: &Answer,
    model: String,
    params: pb::SamplingParams,
) -> Job {
    let openai = pb::OpenAiRequest {
        endpoint: endpoint as i32,
        body: raw.to_string(),
        response_id: answer.id.clone(),
        created: answer.created,
        model: model.clone(),
    };
    Job {
        id: answer.id.clone(),
        model,
        input: Input::Prompt(String::new()),
        params,
        progress: false,
        deadline: None,
        traceparent,
        baggage: String::new(),
        entry,
        openai: Some(openai),
        adapter_name: None,
        adapter: None,
        choices: 1,
    }
}

/// A `/v1/completions` body as a job.
fn parse_completion(
    raw: &str,
    traceparent: String,
    answer: &Answer,
) -> Result<(CommonBody, Job), DispatchError> {
    let body = body_json(raw)?;
    let (c, mut job) = common(&body, raw, traceparent, pb::OpenAiEndpoint::Completions, answer)?;
    let shapes = "must be a string, a list of strings, a list of token ids, or a list of lists \
                  of token ids";
    // A prompt of token ids: the engine reads it; its size counts four bytes a token.
    let ids_size = |ids: &[Value]| ids.iter().all(|t| t.as_u64().is_some()).then(|| ids.len() * 4);
    let prompt = match body.get("prompt") {
        Some(Value::String(p)) => p.clone(),
        Some(Value::Array(items)) if items.is_empty() => {
            return Err(DispatchError::invalid("prompt", "must not be empty"));
        }
        Some(Value::Array(items)) => match ids_size(items) {
            Some(size) => " ".repeat(size),
            // Several prompts (a batch, as OpenAI's API and vLLM take): the engine answers
            // each, `n` times; their sizes add up.
            None => {
                let mut all = String::new();
                for (i, item) in items.iter().enumerate() {
                    match item {
                        Value::String(p) => all.push_str(p),
                        Value::Array(ids) if !ids.is_empty() => match ids_size(ids) {
                            Some(size) => all.push_str(&" ".repeat(size)),
                            None => {
                                return Err(DispatchError::invalid(
                                    &format!("prompt[{i}]"),
                                    "is not a list of token ids",
                                ));
                            }
                        },
                        Value::Array(_) => {
                            return Err(DispatchError::invalid(
                                &format!("prompt[{i}]"),
                                "must not be empty",
                            ));
                        }
                        _ => {
                            return Err(DispatchError::invalid(
                                &format!("prompt[{i}]"),
                                "must be a string or a list of token ids",
                            ));
                        }
                    }
                }
                all
            }
        },
        Some(_) => return Err(DispatchError::invalid("prompt", shapes)),
        None => return Err(DispatchError::invalid("prompt", "is required")),
    };
    let prompts = match body.get("prompt") {
        Some(Value::Array(items)) if ids_size(items).is_none() => items.len(),
        _ => 1,
    };
    let choices = prompts.saturating_mul(c.n.unwrap_or(1) as usize);
    if choices > MAX_CHOICES as usize {
        return Err(DispatchError::invalid(
            "prompt",
            format!(
                "{prompts} prompts of n = {} each ask for {choices} choices; at most {MAX_CHOICES} are answered in one request",
                c.n.unwrap_or(1)
            ),
        ));
    }
    job.input = Input::Prompt(prompt);
    job.choices = choices as u32;
    Ok((c, job))
}

/// A `/v1/chat/completions` body as a job.
fn parse_chat(
    raw: &str,
    traceparent: String,
    answer: &Answer,
) -> Result<(CommonBody, Job), DispatchError> {
    let body = body_json(raw)?;
    let (c, mut job) =
        common(&body, raw, traceparent, pb::OpenAiEndpoint::ChatCompletions, answer)?;
    let messages: Vec<ChatMessage> = match body.get("messages") {
        Some(m) => Vec::<ChatMessage>::deserialize(m).map_err(|e| {
            DispatchError::invalid("messages", format!("must be a list of {{role, content}}: {e}"))
        })?,
        None => return Err(DispatchError::invalid("messages", "is required")),
    };
    let mut chat = pb::ChatMessages::default();
    for (i, m) in messages.into_iter().enumerate() {
        let content = match m.content {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s,
            // The parts form: [{"type": "text", "text": "..."}, {"type": "image_url", …}]: the
            // engine gets every part; the text parts count towards the prompt limit.
            Some(Value::Array(parts)) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(""),
            Some(_) => {
                return Err(DispatchError::invalid(
                    &format!("messages[{i}].content"),
                    "must be a string or a list of text parts",
                ));
            }
        };
        chat.messages.push(pb::ChatMessage { role: m.role, content });
    }
    job.input = Input::Chat(chat);
    Ok((c, job))
}

/// The entry point of a Responses API request, for its span and for the names of the fields
/// its limits refuse (`max_output_tokens`, `input`).
pub(crate) const RESPONSES_ENTRY: &str = "POST /v1/responses";

/// What Dispatch reads of a Responses API body: the model, the limits, `stream`; everything
/// else (instructions, tools, reasoning, `previous_response_id`) is the engine's to read.
#[derive(Deserialize)]
struct ResponsesBody {
    model: Option<String>,
    max_output_tokens: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    #[serde(default)]
    stream: bool,
    input: Option<Value>,
    /// ServerlessLLM's way to name a LoRA adapter of `model`.
    lora_adapter_name: Option<String>,
}

/// A `/v1/responses` body as a job: an engine serves it as it is (its `input` is a text or a
/// list of items; its size counts against the prompt limit as the JSON it is written in).
fn parse_responses(
    raw: &str,
    traceparent: String,
    answer: &Answer,
) -> Result<(CommonBody, Job), DispatchError> {
    let body = body_json(raw)?;
    let r: ResponsesBody = read_naming(&body)?;
    let model = r
        .model
        .clone()
        .filter(|m| !m.is_empty())
        .ok_or_else(|| DispatchError::invalid("model", "is required"))?;
    let size = match &r.input {
        Some(Value::String(t)) if !t.is_empty() => t.len(),
        Some(Value::Array(items)) if !items.is_empty() => {
            body.get("input").map(|i| i.to_string().len()).unwrap_or_default()
        }
        Some(Value::String(_) | Value::Array(_)) => {
            return Err(DispatchError::invalid("input", "must not be empty"));
        }
        Some(_) => {
            return Err(DispatchError::invalid("input", "must be a string or a list of items"));
        }
        None => return Err(DispatchError::invalid("input", "is required")),
    };
    let max = r.max_output_tokens.unwrap_or(0);
    let max_tokens = u32::try_from(max).map_err(|_| {
        DispatchError::invalid("max_output_tokens", format!("{max} is not a token count"))
    })?;
    let params = pb::SamplingParams {
        max_tokens,
        temperature: r.temperature,
        top_p: r.top_p,
        ..Default::default()
    };
    let responses = pb::OpenAiEndpoint::Responses;
    let mut job =
        relayed_job(raw, traceparent, responses, RESPONSES_ENTRY, answer, model.clone(), params);
    job.input = Input::Prompt(" ".repeat(size));
    job.adapter_name = r.lora_adapter_name.clone();
    let c = CommonBody {
        model: Some(model),
        max_tokens: None,
        max_completion_tokens: None,
        temperature: r.temperature,
        top_p: r.top_p,
        stop: None,
        seed: None,
        n: None,
        stream: r.stream,
        stream_options: None,
        lora_adapter_name: r.lora_adapter_name,
    };
    Ok((c, job))
}

/// Checks a `/v1/responses` body as the API would under `config`'s limits, without serving
/// it: for property tests and fuzzing. A refusal names the offending field.
pub fn check_responses_body(
    raw: &str,
    config: &crate::DispatchConfig,
) -> Result<(), DispatchError> {
    let (_, mut job) = parse_responses(raw, String::new(), &Answer::new("resp"))?;
    crate::request::validate(&mut job, config)
}

/// Checks an OpenAI request body as the API would (`chat`: a chat completion, else a
/// completion) under `config`'s limits, without serving it: for property tests and fuzzing.
/// A refusal names the offending field.
pub fn check_body(
    chat: bool,
    raw: &str,
    config: &crate::DispatchConfig,
) -> Result<(), DispatchError> {
    let answer = Answer::new("check");
    let (_, mut job) = if chat {
        parse_chat(raw, String::new(), &answer)?
    } else {
        parse_completion(raw, String::new(), &answer)?
    };
    crate::request::validate(&mut job, config)
}

/// Checks an embeddings body as `/v1/embeddings` would under `config`'s limits, without
/// serving it: for property tests and fuzzing. A refusal names the offending field.
pub fn check_embeddings_body(
    raw: &str,
    config: &crate::DispatchConfig,
) -> Result<(), DispatchError> {
    let mut job = parse_embeddings(raw, String::new(), "check".into(), "POST /v1/embeddings")?;
    crate::request::validate(&mut job, config)
}

/// Checks a `/v1/rerank` body as Dispatch would under `config`'s limits, without serving it:
/// for property tests and fuzzing. A refusal names the offending field.
pub fn check_rerank_body(raw: &str, config: &crate::DispatchConfig) -> Result<(), DispatchError> {
    let mut job = parse_rerank(raw, String::new(), "check".into(), RERANK_ENTRY)?;
    crate::request::validate(&mut job, config)
}

/// Checks a `/tokenize` body (or, with `detokenize`, a `/detokenize` one) as Dispatch would
/// under `config`'s limits, without serving it: for property tests and fuzzing. A refusal
/// names the offending field.
pub fn check_tokenize_body(
    raw: &str,
    detokenize: bool,
    config: &crate::DispatchConfig,
) -> Result<(), DispatchError> {
    let entry = if detokenize { DETOKENIZE_ENTRY } else { TOKENIZE_ENTRY };
    let mut job = parse_tokenize(raw, String::new(), "check".into(), entry)?;
    crate::request::validate(&mut job, config)
}

fn traceparent(headers: &HeaderMap) -> String {
    headers.get("traceparent").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
}

fn body_json(raw: &str) -> Result<Value, DispatchError> {
    let v: Value = serde_json::from_str(raw)
        .map_err(|e| DispatchError::invalid("body", format!("not JSON: {e}")))?;
    if !v.is_object() {
        return Err(DispatchError::invalid("body", "must be a JSON object"));
    }
    Ok(v)
}

/// A request body's parser: [`parse_completion`] or [`parse_chat`].
type ParseBody = fn(&str, String, &Answer) -> Result<(CommonBody, Job), DispatchError>;

/// What both generation endpoints do after the edge (`stack`: the API key and the caller's
/// rate limit): the body (parsed by `parse`) and the submission. Err: the response to send
/// instead.
async fn accept(
    d: &Dispatch,
    headers: &HeaderMap,
    raw: &str,
    parse: ParseBody,
    answer: &Answer,
) -> Result<(CommonBody, String, Events), Response> {
    let result = async {
        let (c, mut job) = parse(raw, traceparent(headers), answer)?;
        job.baggage = telemetry::propagation::baggage(
            headers.get("baggage").and_then(|v| v.to_str().ok()).unwrap_or_default(),
        );
        let model = job.model.clone();
        let events = d.submit(job).await?;
        Ok((c, model, events))
    };
    result.await.map_err(|e| error_response(&e))
}

async fn completions(State(d): State<Dispatch>, headers: HeaderMap, raw: String) -> Response {
    let answer = Answer::new("cmpl");
    let id = answer.id.clone();
    with_request_id(complete(d, headers, raw, answer).await, &id)
}

/// `POST /v1/completions` for `answer`.
async fn complete(d: Dispatch, headers: HeaderMap, raw: String, answer: Answer) -> Response {
    match accept(&d, &headers, &raw, parse_completion, &answer).await {
        Err(r) => r,
        Ok((c, model, events)) => {
            if c.stream {
                let include_usage = c.include_usage();
                let mut relayed = false;
                sse(events, move |item| {
                    completion_chunk(&answer, &model, item, include_usage, &mut relayed)
                })
                .await
            } else {
                match collect(events).await {
                    Ok(Collected::Relayed(body)) => json_body(body),
                    Ok(Collected::Text(text, reason, usage)) => Json(json!({
                        "id": answer.id,
                        "object": "text_completion",
                        "created": answer.created,
                        "model": model,
                        "choices": [{ "text": text, "index": 0, "logprobs": null, "finish_reason": finish_word(reason) }],
                        "usage": usage_json(&usage),
                    }))
                    .into_response(),
                    Err(e) => error_response(&e),
                }
            }
        }
    }
}

async fn chat_completions(State(d): State<Dispatch>, headers: HeaderMap, raw: String) -> Response {
    let answer = Answer::new("chatcmpl");
    let id = answer.id.clone();
    with_request_id(chat_complete(d, headers, raw, answer).await, &id)
}

/// `POST /v1/chat/completions` for `answer`.
async fn chat_complete(d: Dispatch, headers: HeaderMap, raw: String, answer: Answer) -> Response {
    match accept(&d, &headers, &raw, parse_chat, &answer).await {
        Err(r) => r,
        Ok((c, model, events)) => {
            if c.stream {
                let include_usage = c.include_usage();
                let mut first = true;
                let mut relayed = false;
                sse(events, move |item| {
                    let progress = matches!(item, Ok(Event::Progress(_) | Event::Started));
                    let out = chat_chunk(&answer, &model, item, first, include_usage, &mut relayed);
                    first &= progress;
                    out
                })
                .await
            } else {
                match collect(events).await {
                    Ok(Collected::Relayed(body)) => json_body(body),
                    Ok(Collected::Text(text, reason, usage)) => Json(json!({
                        "id": answer.id,
                        "object": "chat.completion",
                        "created": answer.created,
                        "model": model,
                        "choices": [{
                            "index": 0,
                            "message": { "role": "assistant", "content": text },
                            "logprobs": null,
                            "finish_reason": finish_word(reason),
                        }],
                        "usage": usage_json(&usage),
                    }))
                    .into_response(),
                    Err(e) => error_response(&e),
                }
            }
        }
    }
}

/// `POST /v1/responses`: OpenAI's Responses API, for engines that serve it (vLLM, SGLang,
/// llama.cpp's server). The engine's answer comes back as it wrote it, with the client's
/// `model`: a JSON body, or its typed events, each named by its `type` (`event:
/// response.output_text.delta`), ending with the engine's last event (no `[DONE]`).
async fn responses(State(d): State<Dispatch>, headers: HeaderMap, raw: String) -> Response {
    // OpenAI's form of a response id.
    let answer =
        Answer { id: format!("resp_{}", uuid::Uuid::now_v7().simple()), created: now_s() as i64 };
    let id = answer.id.clone();
    with_request_id(respond(d, headers, raw, answer).await, &id)
}

/// `POST /v1/responses` for `answer`.
async fn respond(d: Dispatch, headers: HeaderMap, raw: String, answer: Answer) -> Response {
    match accept(&d, &headers, &raw, parse_responses, &answer).await {
        Err(r) => r,
        Ok((c, model, events)) if c.stream => {
            let mut written = WrittenResponse::new(answer, model);
            sse_named(events, move |item| written.events(item)).await
        }
        Ok((_, model, events)) => match collect(events).await {
            Ok(Collected::Relayed(body)) => json_body(body),
            Ok(Collected::Text(text, reason, usage)) => {
                let written = WrittenResponse::new(answer, model);
                Json(written.response(&text, Some((reason, &usage)))).into_response()
            }
            Err(e) => error_response(&e),
        },
    }
}

/// A Responses API answer: an engine's events, relayed as they are, or — from a backend that
/// answers with text (the simulator) — written by Dispatch in the API's shape: one message
/// item of one output text, the events OpenAI's API sends for it, each with its
/// `sequence_number`, and the usage in the last.
struct WrittenResponse {
    answer: Answer,
    model: String,
    /// The message item's id.
    item: String,
    /// The next event's `sequence_number`.
    seq: u64,
    /// The text so far.
    text: String,
    /// The opening events (created, in progress, the item and its part) went out.
    opened: bool,
    /// The engine's own events came: nothing is written.
    relayed: bool,
}

impl WrittenResponse {
    fn new(answer: Answer, model: String) -> WrittenResponse {
        let item = format!("msg_{}", uuid::Uuid::now_v7().simple());
        WrittenResponse {
            answer,
            model,
            item,
            seq: 0,
            text: String::new(),
            opened: false,
            relayed: false,
        }
    }

    /// The message item: in progress and empty until the text is whole.
    fn message(&self, text: Option<&str>) -> Value {
        let (status, content) = match text {
            Some(t) => {
                ("completed", json!([{ "type": "output_text", "text": t, "annotations": [] }]))
            }
            None => ("in_progress", json!([])),
        };
        json!({ "type": "message", "id": self.item, "status": status, "role": "assistant", "content": content })
    }

    /// The response object; `end`: how it ended and its usage, once it did.
    fn response(&self, text: &str, end: Option<(pb::FinishReason, &pb::Usage)>) -> Value {
        let (status, output, usage, incomplete) = match end {
            None => ("in_progress", json!([]), Value::Null, Value::Null),
            Some((reason, u)) => {
                let usage = json!({
                    "input_tokens": u.prompt_tokens,
                    "output_tokens": u.completion_tokens,
                    "total_tokens": u.prompt_tokens + u.completion_tokens,
                });
                let output = json!([self.message(Some(text))]);
                match reason {
                    pb::FinishReason::Length => {
                        let why = json!({ "reason": "max_output_tokens" });
                        ("incomplete", output, usage, why)
                    }
                    _ => ("completed", output, usage, Value::Null),
                }
            }
        };
        json!({
            "id": self.answer.id,
            "object": "response",
            "created_at": self.answer.created,
            "status": status,
            "error": null,
            "incomplete_details": incomplete,
            "model": self.model,
            "output": output,
            "usage": usage,
        })
    }

    /// One event: its `type`, its `sequence_number`, then `fields`.
    fn event(&mut self, kind: &str, fields: Value) -> String {
        let mut v = json!({ "type": kind, "sequence_number": self.seq });
        self.seq += 1;
        if let (Some(m), Value::Object(f)) = (v.as_object_mut(), fields) {
            m.extend(f);
        }
        v.to_string()
    }

    /// The events that open a written response, once.
    fn open(&mut self, out: &mut Vec<String>) {
        if std::mem::replace(&mut self.opened, true) {
            return;
        }
        let response = self.response("", None);
        out.push(self.event("response.created", json!({ "response": response })));
        out.push(self.event("response.in_progress", json!({ "response": response })));
        let item = self.message(None);
        out.push(
            self.event("response.output_item.added", json!({ "output_index": 0, "item": item })),
        );
        let part = json!({ "type": "output_text", "text": "", "annotations": [] });
        let added =
            json!({ "item_id": self.item, "output_index": 0, "content_index": 0, "part": part });
        out.push(self.event("response.content_part.added", added));
    }

    /// The stream's events for one item: an engine's own, as they are; text written as the
    /// API's events; an error as the API's `error` event (the engine's, when it sent one).
    fn events(&mut self, item: Result<Event, DispatchError>) -> Vec<String> {
        let mut out = Vec::new();
        match item {
            Ok(Event::Chunk { events, .. }) if !events.is_empty() => {
                self.relayed = true;
                return events;
            }
            Ok(Event::Chunk { text, .. }) => {
                self.open(&mut out);
                self.text.push_str(&text);
                let delta = json!({ "item_id": self.item, "output_index": 0, "content_index": 0, "delta": text });
                out.push(self.event("response.output_text.delta", delta));
            }
            Ok(Event::Finished { .. }) if self.relayed => {}
            Ok(Event::Finished { reason, usage }) => {
                self.open(&mut out);
                let text = std::mem::take(&mut self.text);
                let at = json!({ "item_id": self.item, "output_index": 0, "content_index": 0 });
                let mut done = at.clone();
                done["text"] = json!(text);
                out.push(self.event("response.output_text.done", done));
                let mut part = at;
                part["part"] = json!({ "type": "output_text", "text": text, "annotations": [] });
                out.push(self.event("response.content_part.done", part));
                let item = self.message(Some(&text));
                out.push(self.event(
                    "response.output_item.done",
                    json!({ "output_index": 0, "item": item }),
                ));
                let response = self.response(&text, Some((reason, &usage)));
                let kind = if response["status"] == "incomplete" {
                    "response.incomplete"
                } else {
                    "response.completed"
                };
                out.push(self.event(kind, json!({ "response": response })));
            }
            Ok(Event::Progress(_) | Event::Started) => {}
            Err(e) => {
                if let DispatchError::Engine { body, .. } = &e
                    && serde_json::from_str::<Value>(body)
                        .is_ok_and(|v| v.get("type").and_then(Value::as_str) == Some("error"))
                {
                    return vec![body.clone()];
                }
                // OpenAI's error event: its `type` is `error`; the kind of error is its `code`.
                let mut error = error_json(&e)["error"].clone();
                if let Some(m) = error.as_object_mut() {
                    m.remove("type");
                }
                if self.relayed {
                    // The engine numbered its events (or not): no number of sllm's follows.
                    error["type"] = json!("error");
                    return vec![error.to_string()];
                }
                out.push(self.event("error", error));
            }
        }
        out
    }
}

/// The texts of an embeddings `input`, for the prompt limit (token ids count four bytes each):
/// a string, a list of strings, a list of token ids, or a list of such lists; never empty.
fn embedding_input_size(input: Option<&Value>) -> Result<usize, DispatchError> {
    let what = "must be a non-empty string, a list of strings, a list of token ids, or a list \
                of such lists";
    let ids = |items: &[Value]| -> Option<usize> {
        (!items.is_empty() && items.iter().all(|t| t.as_u64().is_some())).then(|| items.len() * 4)
    };
    match input {
        None | Some(Value::Null) => Err(DispatchError::invalid("input", "is required")),
        Some(Value::String(s)) if !s.is_empty() => Ok(s.len()),
        Some(Value::Array(items)) if !items.is_empty() => {
            if let Some(n) = ids(items) {
                return Ok(n);
            }
            let mut size = 0;
            for (i, item) in items.iter().enumerate() {
                size += match item {
                    Value::String(s) if !s.is_empty() => s.len(),
                    Value::Array(a) => ids(a).ok_or_else(|| {
                        DispatchError::invalid(
                            &format!("input[{i}]"),
                            "must be a list of token ids",
                        )
                    })?,
                    _ => {
                        return Err(DispatchError::invalid(
                            &format!("input[{i}]"),
                            "must be a non-empty string or a list of token ids",
                        ));
                    }
                };
            }
            Ok(size)
        }
        Some(_) => Err(DispatchError::invalid("input", what)),
    }
}

/// An embeddings body (`/v1/embeddings`, or gRPC Embed's) as a job: `model` and `input`
/// checked, `encoding_format` and `dimensions` checked for what they may be; every field goes
/// to the engine as sent.
pub(crate) fn parse_embeddings(
    raw: &str,
    traceparent: String,
    response_id: String,
    entry: &'static str,
) -> Result<Job, DispatchError> {
    let body = body_json(raw)?;
    let model = model_field(&body)?;
    let size = embedding_input_size(body.get("input"))?;
    match body.get("encoding_format") {
        None | Some(Value::Null) => {}
        Some(Value::String(f)) if f == "float" || f == "base64" => {}
        Some(v) => {
            return Err(DispatchError::invalid(
                "encoding_format",
                format!("must be \"float\" or \"base64\", got {v}"),
            ));
        }
    }
    optional_whole(&body, "dimensions", 1..=65_536)?;
    let endpoint = pb::OpenAiEndpoint::Embeddings;
    whole_answer_job(raw, &body, (model, size), endpoint, traceparent, response_id, entry)
}

/// Checks `body`'s `field`, a whole number within `range` where it is set.
fn optional_whole(
    body: &Value,
    field: &str,
    range: std::ops::RangeInclusive<u64>,
) -> Result<(), DispatchError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(()),
        Some(v) if v.as_u64().is_some_and(|n| range.contains(&n)) => Ok(()),
        Some(v) if *range.end() == u64::MAX => {
            Err(DispatchError::invalid(field, format!("must be a whole number, got {v}")))
        }
        Some(v) => Err(DispatchError::invalid(
            field,
            format!("must be a whole number from {} to {}, got {v}", range.start(), range.end()),
        )),
    }
}

/// A body's `model`: required, a non-empty string.
fn model_field(body: &Value) -> Result<String, DispatchError> {
    match body.get("model") {
        Some(Value::String(m)) if !m.is_empty() => Ok(m.clone()),
        None | Some(Value::Null) => Err(DispatchError::invalid("model", "is required")),
        Some(v) => Err(DispatchError::invalid("model", format!("must be a string, got {v}"))),
    }
}

/// The job of a request whose answer is one JSON body the engine writes whole (embeddings,
/// rerank, tokenize, detokenize): `size` bytes of input count against the prompt limit; the
/// engine reads `raw`, with only `model` rewritten.
fn whole_answer_job(
    raw: &str,
    body: &Value,
    (model, size): (String, usize),
    endpoint: pb::OpenAiEndpoint,
    traceparent: String,
    response_id: String,
    entry: &'static str,
) -> Result<Job, DispatchError> {
    let params = pb::SamplingParams { max_tokens: 1, ..Default::default() };
    let answer = Answer { id: response_id, created: now_s() as i64 };
    let mut job = relayed_job(raw, traceparent, endpoint, entry, &answer, model, params);
    // Only its size matters here (the prompt limit); the engine reads the body.
    job.input = Input::Prompt(" ".repeat(size));
    job.adapter_name = match body.get("lora_adapter_name") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(v) => {
            return Err(DispatchError::invalid(
                "lora_adapter_name",
                format!("must be a string, got {v}"),
            ));
        }
    };
    Ok(job)
}

pub(crate) const TOKENIZE_ENTRY: &str = "POST /tokenize";
pub(crate) const DETOKENIZE_ENTRY: &str = "POST /detokenize";

/// A `/tokenize` or `/detokenize` body as a job. The engines' own endpoints (vLLM, SGLang
/// and llama.cpp serve both), whose bodies differ by engine, so only what routes and bounds
/// the request is read: `model`; to tokenize, text in `prompt` (vLLM, SGLang: a text or a
/// list of texts), `messages` (vLLM: a chat, through the engine's template) or `content`
/// (llama.cpp); to detokenize, `tokens`, a list of token ids. Every field goes to the engine
/// as sent.
pub(crate) fn parse_tokenize(
    raw: &str,
    traceparent: String,
    response_id: String,
    entry: &'static str,
) -> Result<Job, DispatchError> {
    let body = body_json(raw)?;
    let model = model_field(&body)?;
    let (size, endpoint) = if entry == DETOKENIZE_ENTRY {
        (token_list_size(body.get("tokens"))?, pb::OpenAiEndpoint::Detokenize)
    } else {
        (tokenize_input_size(&body)?, pb::OpenAiEndpoint::Tokenize)
    };
    whole_answer_job(raw, &body, (model, size), endpoint, traceparent, response_id, entry)
}

/// The size of what `/tokenize` is asked to tokenize (its texts' bytes; a chat's JSON).
fn tokenize_input_size(body: &Value) -> Result<usize, DispatchError> {
    let mut size = 0;
    let mut given = false;
    for field in ["prompt", "content"] {
        match body.get(field) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => {
                given = true;
                size += s.len();
            }
            Some(Value::Array(items)) => {
                given = true;
                for (i, item) in items.iter().enumerate() {
                    size += match item {
                        Value::String(s) => s.len(),
                        _ => {
                            return Err(DispatchError::invalid(
                                &format!("{field}[{i}]"),
                                format!("must be a text, got {item}"),
                            ));
                        }
                    };
                }
            }
            Some(v) => {
                return Err(DispatchError::invalid(
                    field,
                    format!("must be a text or a list of texts, got {v}"),
                ));
            }
        }
    }
    match body.get("messages") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) if !items.is_empty() => {
            given = true;
            for (i, m) in items.iter().enumerate() {
                if !m.is_object() {
                    return Err(DispatchError::invalid(
                        &format!("messages[{i}]"),
                        "must be an object with a role and content",
                    ));
                }
                size += m.to_string().len();
            }
        }
        Some(_) => {
            return Err(DispatchError::invalid("messages", "must be a non-empty list of messages"));
        }
    }
    if !given {
        return Err(DispatchError::invalid(
            "prompt",
            "is required: the text to tokenize (or `messages`, a chat; or `content`, as \
             llama.cpp's server names it)",
        ));
    }
    Ok(size)
}

/// The size of `/detokenize`'s `tokens` (four bytes an id): a list of token ids.
fn token_list_size(tokens: Option<&Value>) -> Result<usize, DispatchError> {
    let items = match tokens {
        None | Some(Value::Null) => return Err(DispatchError::invalid("tokens", "is required")),
        Some(Value::Array(items)) => items,
        Some(v) => {
            return Err(DispatchError::invalid(
                "tokens",
                format!("must be a list of token ids, got {v}"),
            ));
        }
    };
    for (i, t) in items.iter().enumerate() {
        if t.as_u64().and_then(|id| u32::try_from(id).ok()).is_none() {
            return Err(DispatchError::invalid(
                &format!("tokens[{i}]"),
                format!("must be a token id (a whole number from 0), got {t}"),
            ));
        }
    }
    Ok(items.len() * 4)
}

pub(crate) const RERANK_ENTRY: &str = "POST /v1/rerank";
pub(crate) const GRPC_RERANK_ENTRY: &str = "sllm.v1.Dispatch/Rerank";

/// A rerank body (`/v1/rerank`, as vLLM, SGLang and llama.cpp serve it, and as Cohere's and
/// Jina's APIs shape it) as a job: `model`; `query`, a text; `documents`, texts (or objects
/// with a `text`, as vLLM and Cohere take them), whose sizes count against the prompt limit;
/// `top_n`, if set, a whole number. Every field goes to the engine as sent.
pub(crate) fn parse_rerank(
    raw: &str,
    traceparent: String,
    response_id: String,
    entry: &'static str,
) -> Result<Job, DispatchError> {
    let body = body_json(raw)?;
    let model = model_field(&body)?;
    let mut size = match body.get("query") {
        Some(Value::String(q)) if !q.is_empty() => q.len(),
        None | Some(Value::Null) => return Err(DispatchError::invalid("query", "is required")),
        Some(v) => {
            return Err(DispatchError::invalid(
                "query",
                format!("must be a non-empty text, got {v}"),
            ));
        }
    };
    let documents = match body.get("documents") {
        Some(Value::Array(items)) if !items.is_empty() => items,
        None | Some(Value::Null) => {
            return Err(DispatchError::invalid("documents", "is required"));
        }
        Some(_) => {
            return Err(DispatchError::invalid("documents", "must be a non-empty list of texts"));
        }
    };
    for (i, d) in documents.iter().enumerate() {
        size += match d {
            Value::String(t) => t.len(),
            Value::Object(o) if o.get("text").is_some_and(Value::is_string) => d.to_string().len(),
            _ => {
                return Err(DispatchError::invalid(
                    &format!("documents[{i}]"),
                    format!("must be a text or an object with a text, got {d}"),
                ));
            }
        };
    }
    optional_whole(&body, "top_n", 0..=u64::MAX)?;
    let endpoint = pb::OpenAiEndpoint::Rerank;
    whole_answer_job(raw, &body, (model, size), endpoint, traceparent, response_id, entry)
}

/// `POST /v1/rerank` (also `/rerank`): to the engine's `/v1/rerank`, routed and held as
/// generation is; its answer comes back as the engine wrote it, with the client's `model`.
async fn rerank(State(d): State<Dispatch>, headers: HeaderMap, raw: String) -> Response {
    let id = format!("rerank-{}", uuid::Uuid::now_v7().simple());
    let job = parse_rerank(&raw, traceparent(&headers), id.clone(), RERANK_ENTRY);
    whole_answer(d, job, &id, "rankings").await
}

/// `POST /v1/embeddings`: routed, held and limited as generation is; the engine's answer comes
/// back as it wrote it (with sllm's `model`).
async fn embeddings(State(d): State<Dispatch>, headers: HeaderMap, raw: String) -> Response {
    let id = format!("embd-{}", uuid::Uuid::now_v7().simple());
    let job = parse_embeddings(&raw, traceparent(&headers), id.clone(), "POST /v1/embeddings");
    whole_answer(d, job, &id, "embeddings").await
}

/// `POST /tokenize`: to the engine's own, routed and held as generation is (a model scaled to
/// zero starts); its answer comes back as the engine wrote it.
async fn tokenize(State(d): State<Dispatch>, headers: HeaderMap, raw: String) -> Response {
    let id = format!("tokn-{}", uuid::Uuid::now_v7().simple());
    let job = parse_tokenize(&raw, traceparent(&headers), id.clone(), TOKENIZE_ENTRY);
    whole_answer(d, job, &id, "tokens").await
}

/// `POST /detokenize`: as [`tokenize`].
async fn detokenize(State(d): State<Dispatch>, headers: HeaderMap, raw: String) -> Response {
    let id = format!("dtok-{}", uuid::Uuid::now_v7().simple());
    let job = parse_tokenize(&raw, traceparent(&headers), id.clone(), DETOKENIZE_ENTRY);
    whole_answer(d, job, &id, "text").await
}

/// Submits `job` and answers with the one JSON body its engine wrote (`what` it should hold,
/// for the error when a backend answers with generated text instead).
async fn whole_answer(
    d: Dispatch,
    job: Result<Job, DispatchError>,
    id: &str,
    what: &str,
) -> Response {
    let result = async { collect(d.submit(job?).await?).await };
    let response = match result.await {
        Ok(Collected::Relayed(body)) => json_body(body),
        Ok(Collected::Text(..)) => error_response(&DispatchError::Unavailable(format!(
            "the backend answered with generated text, not {what}"
        ))),
        Err(e) => error_response(&e),
    };
    with_request_id(response, id)
}

/// `response` with the request's id in its `x-request-id` header, as OpenAI's API sends it
/// (the `openai` package's `request_id`): on an error, too, whose body has no id, so that its
/// trace and log lines (`sllm.request_id`) can be found.
fn with_request_id(mut response: Response, id: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(id) {
        response.headers_mut().insert("x-request-id", v);
    }
    response
}

/// An engine's JSON answer, relayed as it is.
fn json_body(body: String) -> Response {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn finish_word(r: pb::FinishReason) -> &'static str {
    match r {
        pb::FinishReason::Length => "length",
        _ => "stop",
    }
}

fn usage_json(u: &pb::Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

/// A whole answer: the engine's own body, or text to put in OpenAI's shape.
pub(crate) enum Collected {
    Relayed(String),
    Text(String, pb::FinishReason, pb::Usage),
}

/// Waits for the whole answer.
pub(crate) async fn collect(mut events: Events) -> Result<Collected, DispatchError> {
    let mut text = String::new();
    let mut relayed = None;
    while let Some(item) = events.recv().await {
        match item? {
            Event::Chunk { text: t, events, .. } => {
                text.push_str(&t);
                if let Some(body) = events.into_iter().last() {
                    relayed = Some(body);
                }
            }
            Event::Finished { reason, usage } => {
                return Ok(match relayed {
                    Some(body) => Collected::Relayed(body),
                    None => Collected::Text(text, reason, usage),
                });
            }
            Event::Progress(_) | Event::Started => {}
        }
    }
    Err(DispatchError::Unavailable("the request ended without an answer".into()))
}

/// Streams events as server-sent events; `render` turns each into zero or more JSON payloads,
/// which go out as one body frame (see [`crate::sse`]). The response starts with the first
/// event — the engine's acceptance, when its answer's head came back, as a gateway in front of
/// it would answer — so a request that fails before that (the engine refused it, no instance
/// came up in time) gets its error status, as from the engine itself.
async fn sse<F>(events: Events, render: F) -> Response
where
    F: FnMut(Result<Event, DispatchError>) -> Vec<String> + Send + 'static,
{
    stream_events(events, render, false).await
}

/// [`sse`] for a stream of typed events (the Responses API's): each payload goes out named by
/// its `type` (`event: <type>`), and the stream ends with its last event, not `[DONE]`.
async fn sse_named<F>(events: Events, render: F) -> Response
where
    F: FnMut(Result<Event, DispatchError>) -> Vec<String> + Send + 'static,
{
    stream_events(events, render, true).await
}

async fn stream_events<F>(mut events: Events, mut render: F, named: bool) -> Response
where
    F: FnMut(Result<Event, DispatchError>) -> Vec<String> + Send + 'static,
{
    let first = match events.recv().await {
        Some(Err(e)) => return error_response(&e),
        first => first,
    };
    let frames = futures::stream::iter(first).chain(events).filter_map(move |item| {
        let payloads = render(item);
        let frame = (!payloads.is_empty()).then(|| {
            let mut out = bytes::BytesMut::new();
            for p in &payloads {
                if named {
                    crate::sse::push_named_event(&mut out, p);
                } else {
                    crate::sse::push_event(&mut out, p);
                }
            }
            out.freeze()
        });
        std::future::ready(frame)
    });
    let done = futures::stream::iter((!named).then(|| {
        let mut out = bytes::BytesMut::new();
        crate::sse::push_event(&mut out, crate::sse::DONE);
        out.freeze()
    }));
    crate::sse::response(Box::pin(frames.chain(done)), Duration::from_secs(15))
}

/// An error inside a stream: the engine's own error event when it sent one, else OpenAI's shape.
fn stream_error(e: &DispatchError) -> String {
    if let DispatchError::Engine { body, .. } = e
        && serde_json::from_str::<Value>(body).is_ok_and(|v| v.get("error").is_some())
    {
        return body.clone();
    }
    error_json(e).to_string()
}

/// Marks a stream's last events — the one with its `finish_reason`, and its usage event —
/// with `"migrations": N` when it moved to another instance N times on the way (a field of
/// sllm's own, which OpenAI clients keep: the `openai` package's `chunk.model_extra`). Says
/// whether it marked the event.
fn moved(event: &mut Value, migrations: u32) -> bool {
    let choices = event.get("choices").and_then(Value::as_array);
    // The usage event has no choices (vLLM's continuous usage rides on every chunk).
    let usage =
        event.get("usage").is_some_and(Value::is_object) && choices.is_none_or(|c| c.is_empty());
    let finish = choices
        .is_some_and(|c| c.iter().any(|c| c.get("finish_reason").is_some_and(|f| !f.is_null())));
    let last = usage || finish;
    match event.as_object_mut() {
        Some(m) if migrations > 0 && last => {
            m.insert("migrations".into(), json!(migrations));
            true
        }
        _ => false,
    }
}

/// [`moved`] for an engine's events, as text: only a stream that moved pays for reading them,
/// and only its last events are written again.
fn say_moved(events: Vec<String>, migrations: u32) -> Vec<String> {
    if migrations == 0 {
        return events;
    }
    events
        .into_iter()
        .map(|e| match serde_json::from_str::<Value>(&e) {
            Ok(mut v) => {
                if moved(&mut v, migrations) {
                    v.to_string()
                } else {
                    e
                }
            }
            Err(_) => e,
        })
        .collect()
}

fn completion_chunk(
    answer: &Answer,
    model: &str,
    item: Result<Event, DispatchError>,
    include_usage: bool,
    relayed: &mut bool,
) -> Vec<String> {
    let base = |choices: Value| json!({ "id": answer.id, "object": "text_completion", "created": answer.created, "model": model, "choices": choices });
    match item {
        // An engine's events, relayed as they are (its finish and usage events among them).
        Ok(Event::Chunk { events, migrations, .. }) if !events.is_empty() => {
            *relayed = true;
            say_moved(events, migrations)
        }
        Ok(Event::Chunk { text, .. }) => {
            vec![
                base(
                    json!([{ "text": text, "index": 0, "logprobs": null, "finish_reason": null }]),
                )
                .to_string(),
            ]
        }
        Ok(Event::Finished { .. }) if *relayed => vec![],
        Ok(Event::Finished { reason, usage }) => {
            let mut end = base(
                json!([{ "text": "", "index": 0, "logprobs": null, "finish_reason": finish_word(reason) }]),
            );
            moved(&mut end, usage.migrations);
            let mut out = vec![end.to_string()];
            if include_usage {
                let mut u = base(json!([]));
                u["usage"] = usage_json(&usage);
                moved(&mut u, usage.migrations);
                out.push(u.to_string());
            }
            out
        }
        Ok(Event::Progress(_) | Event::Started) => vec![],
        Err(e) => vec![stream_error(&e)],
    }
}

fn chat_chunk(
    answer: &Answer,
    model: &str,
    item: Result<Event, DispatchError>,
    first: bool,
    include_usage: bool,
    relayed: &mut bool,
) -> Vec<String> {
    let base = |choices: Value| json!({ "id": answer.id, "object": "chat.completion.chunk", "created": answer.created, "model": model, "choices": choices });
    let mut out = Vec::new();
    match item {
        // An engine's events, relayed as they are (its role, finish and usage events among
        // them).
        Ok(Event::Chunk { events, migrations, .. }) if !events.is_empty() => {
            *relayed = true;
            return say_moved(events, migrations);
        }
        Ok(Event::Finished { .. }) if *relayed => return Vec::new(),
        _ => {}
    }
    if first && matches!(item, Ok(Event::Chunk { .. } | Event::Finished { .. })) {
        out.push(base(json!([{ "index": 0, "delta": { "role": "assistant", "content": "" }, "logprobs": null, "finish_reason": null }])));
    }
    match item {
        Ok(Event::Chunk { text, .. }) => {
            out.push(base(json!([{ "index": 0, "delta": { "content": text }, "logprobs": null, "finish_reason": null }])));
        }
        Ok(Event::Finished { reason, usage }) => {
            let mut end = base(
                json!([{ "index": 0, "delta": {}, "logprobs": null, "finish_reason": finish_word(reason) }]),
            );
            moved(&mut end, usage.migrations);
            out.push(end);
            if include_usage {
                let mut u = base(json!([]));
                u["usage"] = usage_json(&usage);
                moved(&mut u, usage.migrations);
                out.push(u);
            }
        }
        Ok(Event::Progress(_) | Event::Started) => {}
        Err(e) => return vec![stream_error(&e)],
    }
    out.into_iter().map(|v| v.to_string()).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn written() -> WrittenResponse {
        WrittenResponse::new(Answer { id: "resp_1".into(), created: 9 }, "m".into())
    }

    fn parsed(events: Vec<String>) -> Vec<Value> {
        events.iter().map(|e| serde_json::from_str(e).unwrap()).collect()
    }

    /// A stream that breaks after its text began ends with OpenAI's `error` event, numbered
    /// after the rest, its `code` saying what kind of error.
    #[test]
    fn a_written_response_that_fails_ends_with_an_error_event() {
        let mut w = written();
        let chunk = Event::Chunk {
            text: " hi".into(),
            tokens: 1,
            events: Vec::new(),
            logprobs: Vec::new(),
            migrations: 0,
        };
        let opened = parsed(w.events(Ok(chunk)));
        let kinds: Vec<&str> = opened.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta"
            ]
        );
        assert_eq!(opened[0]["response"]["id"], "resp_1");
        assert_eq!(opened[0]["response"]["status"], "in_progress");
        assert_eq!(opened[4]["delta"], " hi");
        let failed = parsed(w.events(Err(DispatchError::Unavailable("the worker died".into()))));
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0]["type"], "error");
        assert_eq!(failed[0]["sequence_number"], 5);
        assert!(failed[0]["message"].as_str().unwrap().contains("the worker died"), "{failed:?}");
        assert!(failed[0]["code"].is_string(), "{failed:?}");
    }

    /// An engine's own events pass as they are, and nothing is written around them.
    #[test]
    fn an_engines_events_pass_as_they_are() {
        let mut w = written();
        let engine = r#"{"type":"response.completed","response":{"id":"resp_engine"}}"#;
        let chunk = Event::Chunk {
            text: String::new(),
            tokens: 0,
            events: vec![engine.to_string()],
            logprobs: Vec::new(),
            migrations: 0,
        };
        assert_eq!(w.events(Ok(chunk)), [engine]);
        let usage = pb::Usage { prompt_tokens: 3, completion_tokens: 2, ..Default::default() };
        let end = Event::Finished { reason: pb::FinishReason::Stop, usage };
        assert!(w.events(Ok(end)).is_empty());
        // A break after them: an error event, without a number of sllm's among the engine's.
        let failed = parsed(w.events(Err(DispatchError::Unavailable("gone".into()))));
        assert_eq!(failed[0]["type"], "error");
        assert!(failed[0].get("sequence_number").is_none(), "{failed:?}");
    }
}
