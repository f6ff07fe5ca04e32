//! Talking to an engine's OpenAI-compatible HTTP API: the request a job becomes (the client's
//! own body with only `model` rewritten, or, for a gRPC request, a body built from its sampling
//! parameters), and the engine's answer read back — server-sent events through a maintained
//! parser (UTF-8 and CRLF safe), or one JSON body — into outputs. The engine's events go up
//! unchanged but for `id`, `model` and `created`, which sllm sets so that every answer of a
//! request agrees with itself across retries, and for the token ids sllm asked for on the
//! client's behalf, which it removes. Those ids let a stream that moved here from another
//! instance continue exactly ([`call_with_template`]); a chat continued as a completion of its
//! templated prompt's ids has its events written back as the chat's chunks.
//!
//! It never invents sampling fields: what the client did not send, the engine decides, with one
//! exception written down in docs/engines.md — a request without `max_tokens` gets the limit
//! Dispatch enforces, so that no engine runs to its context length on a default.

use std::time::Duration;

use eventsource_stream::Eventsource;
use futures::{Stream, StreamExt};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use sllm_api::v1 as pb;
use tokio::sync::mpsc;

use crate::backend::{Failure, FailureKind, Finish, Input, Job, Output};

/// Which engine family, for the few request fields that differ between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// vLLM: regex constraints as `structured_outputs.regex`.
    Vllm,
    /// SGLang: regex constraints as `regex`.
    Sglang,
    /// llama.cpp server: no regex constraint.
    Llamacpp,
    /// Any other OpenAI server: regex constraints as `regex`.
    Other,
}

/// One HTTP request to an engine, and how to read its answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    /// `/v1/completions` or `/v1/chat/completions`.
    pub path: &'static str,
    /// The JSON body.
    pub body: Value,
    /// Whether the answer is a stream of events.
    pub stream: bool,
    /// Set for an OpenAI client: what its events must say, and whether it asked for usage.
    pub relay: Option<Relay>,
    /// Whether to read log-probabilities out of the answer (gRPC requests that asked).
    pub logprobs: bool,
    /// Most tokens the engine may generate.
    pub max_tokens: u32,
    /// Tokens of the text this answer continues (a request moved here mid-stream): the usage
    /// passed on counts them as generated, not as prompt.
    pub continued: u32,
    /// Where the generated tokens' ids are read from, when the engine is asked for them (so
    /// that a stream that moves continues from them exactly).
    pub ids: Option<Ids>,
    /// Set for a chat continued through the completions endpoint from its token ids: the
    /// engine's completion events reach the client as the chat's chunks.
    pub as_chat: bool,
    /// The engine family, for how it writes the fields sllm removes.
    pub dialect: Dialect,
}

/// How a [`Call`] learns its generated tokens' ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ids {
    /// Where the engine writes them.
    pub from: IdsIn,
    /// Whether sllm asked for them itself: the client, who did not, never sees them.
    pub added: bool,
}

/// Where an engine writes its tokens' ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdsIn {
    /// Each choice's `token_ids`, and the prompt's as `prompt_token_ids` on the first event
    /// (vLLM's and SGLang's `return_token_ids`).
    TokenIds,
    /// The `id` of each log-probability (llama.cpp), whose `bytes` say what text each is.
    Logprobs,
}

/// Fields of a chat body that make the engine's answer more than the plain text of its tokens
/// (tool calls, constrained output): such a chat continues from its text, never from ids
/// through the completions endpoint, so that the engine's own parsing of the answer is kept.
const CHAT_SHAPING: &[&str] = &[
    "tools",
    "functions",
    "response_format",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "json_schema",
    "grammar",
    "regex",
    "ebnf",
    "structural_tag",
];

/// Whether a chat delta carries output other than content (a tool call, reasoning).
fn is_shaped(delta: &Value) -> bool {
    ["tool_calls", "function_call", "reasoning_content", "reasoning"]
        .iter()
        .any(|k| delta.get(*k).is_some_and(|x| !x.is_null()))
}

/// Fields of a chat body that a completion request has no use for: the conversation and what
/// shaped its template (already in the templated prompt's ids), and chat's own output options.
const CHAT_ONLY: &[&str] = &[
    "messages",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "functions",
    "function_call",
    "response_format",
    "add_generation_prompt",
    "continue_final_message",
    "chat_template",
    "chat_template_kwargs",
    "documents",
    "mm_processor_kwargs",
    "media_io_kwargs",
    "reasoning_effort",
    "reasoning_format",
    "include_reasoning",
    "thinking_token_budget",
    "add_special_tokens",
    "return_prompt_text",
    "echo",
    "modalities",
    "audio",
    "prediction",
    "web_search_options",
    "logprobs",
    "top_logprobs",
    "max_completion_tokens",
];

/// Whether a field is set to something (not absent, null, false, an empty string or list, or
/// `{"type": "text"}`, the plain-text response format).
fn is_set(body: &Map<String, Value>, key: &str) -> bool {
    match body.get(key) {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => a.iter().any(|x| !x.is_null() && x.as_str() != Some("")),
        Some(v) => v.get("type").and_then(Value::as_str) != Some("text"),
    }
}

/// Whether a chat can continue from its token ids through the completions endpoint (see
/// [`CHAT_SHAPING`]): text messages only, one choice, no echo, nothing that shapes the answer.
fn chat_continues_from_ids(body: &Map<String, Value>) -> bool {
    let text_only = body.get("messages").and_then(Value::as_array).is_some_and(|messages| {
        messages.iter().all(|m| match m.get("content") {
            None | Some(Value::Null) | Some(Value::String(_)) => true,
            Some(Value::Array(parts)) => {
                parts.iter().all(|p| p.get("type").and_then(Value::as_str) == Some("text"))
            }
            Some(_) => false,
        })
    });
    text_only
        && !CHAT_SHAPING.iter().any(|k| is_set(body, k))
        && !is_set(body, "echo")
        && body.get("n").and_then(Value::as_u64).is_none_or(|n| n <= 1)
}

/// The text of a completion prompt given as text (a string, or a list of one string).
fn text_prompt(body: &Map<String, Value>) -> Option<&str> {
    match body.get("prompt")? {
        Value::String(p) => Some(p),
        Value::Array(items) => match items.as_slice() {
            [Value::String(p)] => Some(p),
            _ => None,
        },
        _ => None,
    }
}

/// Asks the engine for the generated tokens' ids where it can give them and a moved stream
/// could use them (one prompt, one choice): vLLM (`return_token_ids`) for completions and for
/// chats a completion can continue ([`chat_continues_from_ids`]), SGLang for completions,
/// llama.cpp (one log-probability a token, which carries its id) for both. Not for answers that are not
/// streamed (never moved), nor — on vLLM and SGLang — with stop strings or echo: their text
/// then lags behind or runs ahead of their ids.
///
/// The log-probabilities sllm adds on llama.cpp are the sampler's own (`post_sampling_probs`):
/// the same ids, but read from the few candidates sampling left, where the default ranks and
/// normalizes every logit of the vocabulary again for each token. That default made a 64-token
/// stream of a 32k-vocabulary model cost the server 45% more CPU (the client never sees these
/// log-probabilities, so their kind does not matter).
fn ask_for_token_ids(dialect: Dialect, call: &mut Call) {
    let Some(body) = call.body.as_object_mut() else { return };
    let chat = body.contains_key("messages");
    if !call.stream || (chat && !chat_continues_from_ids(body)) {
        return;
    }
    if !chat && text_prompt(body).is_none() {
        return;
    }
    // Several choices: a move could not continue each from its own point (Dispatch does not
    // move them), and the ids read are the first choice's only.
    if body.get("n").and_then(Value::as_u64).is_some_and(|n| n > 1) {
        return;
    }
    call.ids = match dialect {
        Dialect::Llamacpp if chat => match body.get("logprobs") {
            // `top_logprobs` without `logprobs` is the client's error to get.
            None | Some(Value::Null) | Some(Value::Bool(false)) if is_set(body, "top_logprobs") => {
                None
            }
            None | Some(Value::Null) | Some(Value::Bool(false)) => {
                body.insert("logprobs".into(), Value::Bool(true));
                body.insert("top_logprobs".into(), json!(1));
                body.insert("post_sampling_probs".into(), Value::Bool(true));
                Some(Ids { from: IdsIn::Logprobs, added: true })
            }
            // Zero top log-probabilities: llama.cpp then sends none, so no ids either.
            Some(_) if body.get("top_logprobs").and_then(Value::as_u64) == Some(0) => None,
            Some(_) => Some(Ids { from: IdsIn::Logprobs, added: false }),
        },
        Dialect::Llamacpp => {
            if body.get("logprobs").and_then(Value::as_u64).is_some_and(|n| n > 0) {
                Some(Ids { from: IdsIn::Logprobs, added: false })
            } else {
                body.insert("logprobs".into(), json!(1));
                body.insert("post_sampling_probs".into(), Value::Bool(true));
                Some(Ids { from: IdsIn::Logprobs, added: true })
            }
        }
        Dialect::Vllm | Dialect::Sglang => {
            // A chat's log-probabilities are shaped differently from a completion's, which
            // would continue it; SGLang's chats are not known to give ids.
            let chat_logprobs = chat && is_set(body, "logprobs");
            if is_set(body, "stop") || is_set(body, "echo") || chat_logprobs {
                return;
            }
            if chat && dialect == Dialect::Sglang {
                return;
            }
            let asked = body.get("return_token_ids") == Some(&Value::Bool(true));
            if !asked {
                body.insert("return_token_ids".into(), Value::Bool(true));
            }
            Some(Ids { from: IdsIn::TokenIds, added: !asked })
        }
        Dialect::Other => None,
    };
}

/// What an OpenAI client's answer must carry.
#[derive(Debug, Clone, PartialEq)]
pub struct Relay {
    /// `id` of every event.
    pub id: String,
    /// `created` of every event.
    pub created: i64,
    /// `model` of every event (the name the client used).
    pub model: String,
    /// The client asked for a usage event (`stream_options.include_usage`).
    pub include_usage: bool,
    /// What the engine's answer is, and so what of it is sllm's to set.
    pub shape: Shape,
}

/// The kinds of answer an engine relays to an OpenAI client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Chat, completions and embeddings: events or a body that get sllm's `id`, `created` and
    /// `model` (an embeddings list only `model`).
    Stamped,
    /// An answer of the Responses API: typed events ended by the engine's last
    /// (`response.completed`, `.incomplete` or `.failed`), or one body, with `model` set in its
    /// response object; its ids and `created_at` stay the engine's.
    Responses,
    /// The engine's own endpoints (`/tokenize`, `/detokenize`): one body, relayed unchanged.
    AsWritten,
    /// Rerank answers: one body whose `id` stays the engine's; only `model` is sllm's.
    ModelOnly,
}

fn invalid(field: &str, why: impl std::fmt::Display) -> Failure {
    Failure::unsupported(field, why)
}

/// The request `job` becomes for an engine that serves the model as `served`: its body (the
/// client's, or one built from a gRPC request's parameters), asking for token ids where they
/// help ([`ask_for_token_ids`]), continued where the job moved here mid-stream.
pub fn call(dialect: Dialect, served: &str, job: &Job) -> Result<Call, Failure> {
    call_with_template(dialect, served, job, None)
}

/// [`call`], with `template`: the chat's prompt after the engine's chat template
/// (llama.cpp's `POST /apply-template`, asked for when [`template_body`] says so), with which
/// a moved chat continues exactly from its token ids.
pub fn call_with_template(
    dialect: Dialect,
    served: &str,
    job: &Job,
    template: Option<&str>,
) -> Result<Call, Failure> {
    let mut call = base(dialect, served, job)?;
    ask_for_token_ids(dialect, &mut call);
    if let Some(c) = &job.continuation {
        continue_after(&mut call, c, template, job.params.max_tokens)?;
        call.continued = c.tokens;
    }
    Ok(call)
}

fn base(dialect: Dialect, served: &str, job: &Job) -> Result<Call, Failure> {
    match &job.openai {
        Some(o) => relayed(dialect, served, job, o),
        None => built(dialect, served, job),
    }
}

/// The ids a continuation may start from: all of its tokens' ids, or none when the engine
/// did not report every one.
fn covering_ids(c: &pb::Continuation) -> &[u32] {
    if c.tokens > 0 && c.token_ids.len() == c.tokens as usize { &c.token_ids } else { &[] }
}

/// For a llama.cpp chat that moved here and can continue from its token ids: the body to send
/// to the engine's `POST /apply-template`, whose `prompt` is the conversation as its chat
/// template writes it (see [`call_with_template`]). None for anything else.
pub fn template_body(dialect: Dialect, served: &str, job: &Job) -> Result<Option<Value>, Failure> {
    let Some(c) = &job.continuation else { return Ok(None) };
    if dialect != Dialect::Llamacpp || covering_ids(c).is_empty() {
        return Ok(None);
    }
    let call = base(dialect, served, job)?;
    let exact = call.stream
        && call
            .body
            .as_object()
            .is_some_and(|b| b.contains_key("messages") && chat_continues_from_ids(b));
    Ok(exact.then_some(call.body))
}

/// Makes `call` continue a generation that produced `c.text` elsewhere (the request moved here
/// from a lost or draining instance), with `left` tokens to go:
///
/// - where the engine reported every token's id, from the ids, exactly: a completion's prompt
///   becomes its ids followed by the generated ones (vLLM, SGLang), or its text followed by
///   them (llama.cpp's mixed prompts); a chat becomes a completion of its templated prompt's
///   ids (vLLM reports them; llama.cpp's `template`, as text) followed by the generated ones,
///   whose events reach the client as the chat's chunks;
/// - otherwise from the text: a completion's prompt gets it appended; a chat gets it as a final
///   assistant message that the engine continues (vLLM's and SGLang's
///   `continue_final_message`; llama.cpp's server continues a final assistant message by
///   itself).
fn continue_after(
    call: &mut Call,
    c: &pb::Continuation,
    template: Option<&str>,
    left: u32,
) -> Result<(), Failure> {
    let dialect = call.dialect;
    let ids = covering_ids(c);
    let ids_json = || ids.iter().map(|i| json!(i));
    let Some(body) = call.body.as_object_mut() else {
        return Err(invalid("body", "must be a JSON object"));
    };
    let cannot = |field: &str| {
        invalid(field, "a prompt of token ids cannot be continued on another instance")
    };
    // The client has had the prompt echoed once.
    body.remove("echo");
    let mut key = if body.contains_key("max_completion_tokens") {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    if body.contains_key("messages") {
        let prompt: Option<Vec<Value>> = match (dialect, template) {
            _ if ids.is_empty() || !chat_continues_from_ids(body) => None,
            (Dialect::Vllm, _) if !c.prompt_token_ids.is_empty() => {
                Some(c.prompt_token_ids.iter().map(|i| json!(i)).chain(ids_json()).collect())
            }
            (Dialect::Llamacpp, Some(t)) => {
                Some(std::iter::once(json!(t)).chain(ids_json()).collect())
            }
            _ => None,
        };
        match prompt {
            Some(prompt) => {
                // llama.cpp's completions take the count of log-probabilities that carry the
                // ids; vLLM's ids come with `return_token_ids`, which stays.
                let logprobs = (call.ids.is_some_and(|i| i.from == IdsIn::Logprobs)).then(|| {
                    match body.get("top_logprobs").and_then(Value::as_u64) {
                        Some(n) => n.max(1),
                        None if call.ids.is_some_and(|i| i.added) => 1,
                        None => 20,
                    }
                });
                for k in CHAT_ONLY {
                    body.remove(*k);
                }
                if let Some(n) = logprobs {
                    body.insert("logprobs".into(), json!(n));
                }
                body.insert("prompt".into(), Value::Array(prompt));
                call.path = "/v1/completions";
                call.as_chat = call.relay.is_some();
                key = "max_tokens";
            }
            None => {
                let messages = body.get_mut("messages").and_then(Value::as_array_mut);
                if let Some(messages) = messages {
                    messages.push(json!({ "role": "assistant", "content": c.text }));
                }
                if dialect != Dialect::Llamacpp {
                    body.insert("continue_final_message".into(), Value::Bool(true));
                    body.insert("add_generation_prompt".into(), Value::Bool(false));
                }
            }
        }
    } else {
        let Some(p) = text_prompt(body).map(str::to_string) else { return Err(cannot("prompt")) };
        let prompt = match dialect {
            // The engine takes a prompt of text then ids (llama.cpp's mixed prompts): the
            // continuation starts from exactly the tokens generated.
            Dialect::Llamacpp if !ids.is_empty() => {
                Value::Array(std::iter::once(json!(p)).chain(ids_json()).collect())
            }
            Dialect::Vllm | Dialect::Sglang
                if !ids.is_empty() && !c.prompt_token_ids.is_empty() =>
            {
                Value::Array(
                    c.prompt_token_ids.iter().map(|i| json!(i)).chain(ids_json()).collect(),
                )
            }
            _ => Value::String(p + &c.text),
        };
        body.insert("prompt".into(), prompt);
    }
    body.insert(key.into(), json!(left));
    call.max_tokens = left;
    Ok(())
}

/// An OpenAI client's body, passed on with `model` rewritten.
fn relayed(
    dialect: Dialect,
    served: &str,
    job: &Job,
    o: &pb::OpenAiRequest,
) -> Result<Call, Failure> {
    let mut body: Map<String, Value> = match serde_json::from_str(&o.body) {
        Ok(Value::Object(m)) => m,
        Ok(_) => return Err(invalid("body", "must be a JSON object")),
        Err(e) => return Err(invalid("body", format!("not JSON: {e}"))),
    };
    body.insert("model".into(), Value::String(served.to_string()));
    // ServerlessLLM's adapter field is sllm's to read (it became the job's adapter); no engine
    // knows it.
    body.remove("lora_adapter_name");
    let endpoint = pb::OpenAiEndpoint::try_from(o.endpoint).ok();
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    // (path, streamed, the client asked for usage, the answer's shape)
    let (path, stream, include_usage, shape) = match endpoint {
        // One JSON answer, no tokens to bound.
        Some(pb::OpenAiEndpoint::Embeddings) => ("/v1/embeddings", false, false, Shape::Stamped),
        Some(pb::OpenAiEndpoint::Tokenize) => ("/tokenize", false, false, Shape::AsWritten),
        Some(pb::OpenAiEndpoint::Detokenize) => ("/detokenize", false, false, Shape::AsWritten),
        Some(pb::OpenAiEndpoint::Rerank) => ("/v1/rerank", false, false, Shape::ModelOnly),
        // Usage always comes in the engine's last event; no ids are asked for (a Responses
        // stream never moves).
        Some(pb::OpenAiEndpoint::Responses) => {
            body.entry("max_output_tokens").or_insert_with(|| json!(job.params.max_tokens));
            ("/v1/responses", stream, true, Shape::Responses)
        }
        _ => {
            if !body.contains_key("max_tokens") && !body.contains_key("max_completion_tokens") {
                body.insert("max_tokens".into(), json!(job.params.max_tokens));
            }
            let mut include_usage = false;
            if stream {
                // The engine always reports usage (sllm counts tokens from it); the client sees
                // the usage event only if it asked for one.
                let options = body.entry("stream_options").or_insert_with(|| json!({}));
                if let Some(options) = options.as_object_mut() {
                    include_usage =
                        options.get("include_usage").and_then(Value::as_bool).unwrap_or(false);
                    options.insert("include_usage".into(), Value::Bool(true));
                }
            }
            let chat = endpoint == Some(pb::OpenAiEndpoint::ChatCompletions);
            (
                if chat { "/v1/chat/completions" } else { "/v1/completions" },
                stream,
                include_usage,
                Shape::Stamped,
            )
        }
    };
    Ok(Call {
        path,
        body: Value::Object(body),
        stream,
        relay: Some(Relay {
            id: o.response_id.clone(),
            created: o.created,
            model: o.model.clone(),
            include_usage,
            shape,
        }),
        logprobs: false,
        max_tokens: job.params.max_tokens,
        continued: 0,
        ids: None,
        as_chat: false,
        dialect,
    })
}

/// A gRPC request's input and parameters as an OpenAI body.
fn built(dialect: Dialect, served: &str, job: &Job) -> Result<Call, Failure> {
    let p = &job.params;
    let chat = matches!(job.input, Input::Chat(_));
    let mut body = Map::new();
    body.insert("model".into(), json!(served));
    match &job.input {
        Input::Prompt(text) => {
            body.insert("prompt".into(), json!(text));
        }
        Input::Chat(messages) => {
            let messages: Vec<Value> =
                messages.iter().map(|m| json!({ "role": m.role, "content": m.content })).collect();
            body.insert("messages".into(), Value::Array(messages));
        }
    }
    body.insert("max_tokens".into(), json!(p.max_tokens));
    let mut put = |k: &str, v: Value| {
        body.insert(k.to_string(), v);
    };
    if let Some(t) = p.temperature {
        put("temperature", json!(t));
    }
    if let Some(t) = p.top_p {
        put("top_p", json!(t));
    }
    if let Some(k) = p.top_k {
        put("top_k", json!(k));
    }
    if let Some(m) = p.min_p {
        put("min_p", json!(m));
    }
    if let Some(x) = p.presence_penalty {
        put("presence_penalty", json!(x));
    }
    if let Some(x) = p.frequency_penalty {
        put("frequency_penalty", json!(x));
    }
    if let Some(x) = p.repetition_penalty {
        put("repetition_penalty", json!(x));
    }
    if !p.stop.is_empty() {
        put("stop", json!(p.stop));
    }
    if let Some(s) = p.seed {
        put("seed", json!(s));
    }
    if p.logprobs {
        if chat {
            put("logprobs", json!(true));
            put("top_logprobs", json!(p.top_logprobs));
        } else {
            put("logprobs", json!(p.top_logprobs));
        }
    } else if p.top_logprobs > 0 {
        return Err(invalid("top_logprobs", "needs logprobs"));
    }
    if !p.json_schema.is_empty() {
        let schema: Value = serde_json::from_str(&p.json_schema)
            .map_err(|e| invalid("json_schema", format!("not JSON: {e}")))?;
        put(
            "response_format",
            json!({ "type": "json_schema", "json_schema": { "name": "output", "schema": schema } }),
        );
    }
    if !p.regex.is_empty() {
        match dialect {
            Dialect::Vllm => put("structured_outputs", json!({ "regex": p.regex })),
            Dialect::Sglang | Dialect::Other => put("regex", json!(p.regex)),
            Dialect::Llamacpp => {
                return Err(invalid(
                    "regex",
                    "llama.cpp has no regular-expression constraint (use json_schema)",
                ));
            }
        }
    }
    put("stream", json!(true));
    put("stream_options", json!({ "include_usage": true }));
    Ok(Call {
        path: if chat { "/v1/chat/completions" } else { "/v1/completions" },
        body: Value::Object(body),
        stream: true,
        relay: None,
        logprobs: p.logprobs,
        max_tokens: p.max_tokens,
        continued: 0,
        ids: None,
        as_chat: false,
        dialect,
    })
}

/// The message of an engine's error body: OpenAI's `{"error": {"message"}}`, vLLM's older
/// `{"object": "error", "message"}`, FastAPI's `{"detail"}`, or the text itself.
pub fn error_message(body: &str) -> String {
    let text = || body.trim().chars().take(2000).collect::<String>();
    let Ok(v) = serde_json::from_str::<Value>(body) else { return text() };
    let found = v
        .get("error")
        .and_then(|e| e.get("message").and_then(Value::as_str).or_else(|| e.as_str()))
        .or_else(|| v.get("message").and_then(Value::as_str))
        .map(str::to_string)
        .or_else(|| {
            v.get("detail").map(|d| d.as_str().map_or_else(|| d.to_string(), String::from))
        });
    found.unwrap_or_else(text)
}

/// A Responses API event's text and tokens: a delta with content (of text, reasoning, a
/// function call's arguments) is one token; only an output text delta is the answer's text.
fn delta_of(kind: &str, delta: Option<&str>) -> (String, u32) {
    let delta = delta.filter(|d| !d.is_empty());
    let text = match (kind, delta) {
        ("response.output_text.delta", Some(d)) => d.to_string(),
        _ => String::new(),
    };
    (text, u32::from(kind.ends_with(".delta") && delta.is_some()))
}

/// An event that is not JSON: the engine's fault.
fn not_json(e: &serde_json::Error, data: &str) -> Step {
    Step::Failed(Failure::new(
        FailureKind::Engine,
        format!("the engine sent an event that is not JSON ({e}): {data:.200}"),
    ))
}

/// The engine's own error report inside a stream, passed on as it wrote it.
fn reported(data: &str) -> Step {
    Step::Failed(reported_failure(data))
}

/// The engine's own error report (an event, or a body sent with a success status), passed on
/// as it wrote it.
fn reported_failure(data: &str) -> Failure {
    Failure {
        kind: FailureKind::Engine,
        message: format!("the engine reported an error: {}", error_message(data)),
        http_status: 0,
        body: data.to_string(),
    }
}

/// A whole answer that is not JSON.
fn body_not_json(e: serde_json::Error) -> Failure {
    Failure::new(FailureKind::Engine, format!("the engine's answer is not JSON: {e}"))
}

/// Whether an event or body is an error report rather than an answer.
fn is_error(v: &Value) -> bool {
    v.get("error").is_some_and(|e| !e.is_null())
        || v.get("object").and_then(Value::as_str) == Some("error")
}

/// The failure an engine's HTTP error status means: a 4xx is the request's fault (never
/// retried); anything else is the instance's.
pub fn http_failure(status: u16, body: String) -> Failure {
    let message = error_message(&body);
    let kind = if (400..500).contains(&status) && status != 408 && status != 429 {
        FailureKind::Invalid
    } else {
        FailureKind::Unavailable
    };
    Failure {
        kind,
        message: format!("the engine answered {status}: {message}"),
        http_status: status,
        body,
    }
}

fn finish_of(word: &str) -> Finish {
    if word == "length" { Finish::Length } else { Finish::Stop }
}

/// Reads an engine's answer, event by event (or the one body), into outputs.
#[derive(Debug)]
pub struct Reader {
    call: Call,
    prompt_tokens: u32,
    completion_tokens: Option<u32>,
    /// Usage the engine reported for single choices, by index: (index, prompt, completion).
    choice_usage: Vec<(u64, u32, Option<u32>)>,
    counted: u32,
    finish: Option<Finish>,
    ids: IdsRead,
    /// `id`, `model` and `created` of a relayed answer, as JSON values, written once.
    stamps: (String, String, String),
    /// A Responses API stream's last event was read: its end is the end of the stream.
    ended: bool,
}

/// What the reader knows of the generated tokens' ids so far.
#[derive(Debug, Default)]
struct IdsRead {
    /// Ids read whose tokens' text the engine has not sent yet (held back as a possible stop
    /// string or an incomplete character): they go up with the text when it comes, so that a
    /// stream cut in between continues from tokens whose text the client has.
    held: Vec<u32>,
    /// The text the held ids stand for, from their log-probabilities' bytes, to check against
    /// the text when it comes (None: not known).
    held_bytes: Option<Vec<u8>>,
    /// The ids stopped matching the text (a token the engine reported no id for, or text the
    /// engine rewrote: tool calls, reasoning): none go up any more, and a moved stream
    /// continues from its text.
    lost: bool,
    /// The prompt's ids were read.
    prompt_seen: bool,
    /// The prompt's ids, read from an event that had nothing else to pass on (a chat's first
    /// chunk, for a gRPC request): they go up with the first output.
    prompt_pending: Vec<u32>,
}

/// A choice's token ids as an event carries them (None: one of them unreadable), and the
/// bytes of their pieces (None: not known), to check against its text.
type FoundIds = (Option<Vec<u32>>, Option<Vec<u8>>);

/// What one event amounted to.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// Output to pass on (possibly nothing, for an event the client must not see).
    Output(Option<Output>),
    /// The stream is over (`[DONE]`); the final output follows.
    Done(Output),
    /// The engine reported an error.
    Failed(Failure),
}

impl Reader {
    /// A reader for the answer to `call`.
    pub fn new(call: Call) -> Reader {
        let stamps = match &call.relay {
            Some(r) => (
                Value::String(r.id.clone()).to_string(),
                Value::String(r.model.clone()).to_string(),
                r.created.to_string(),
            ),
            None => Default::default(),
        };
        let ids = IdsRead { held_bytes: Some(Vec::new()), ..IdsRead::default() };
        Reader {
            call,
            prompt_tokens: 0,
            completion_tokens: None,
            choice_usage: Vec::new(),
            counted: 0,
            finish: None,
            ids,
            stamps,
            ended: false,
        }
    }

    /// The end of a stream that ends without `[DONE]` — a Responses API stream, once its last
    /// event was read — when the engine closes it; None if it is not over.
    pub fn finished(&self) -> Option<Output> {
        self.ended.then(|| self.done())
    }

    /// Tokens passed on so far.
    pub fn tokens(&self) -> u32 {
        self.counted
    }

    /// The end of a stream (or of a body): how it finished and what it counted.
    fn done(&self) -> Output {
        // Counted as the client sees them: a continued answer's earlier text included.
        let c = self.call.continued;
        let completion_tokens = self.completion_tokens.unwrap_or(self.counted + c);
        let here = completion_tokens.saturating_sub(c);
        let finish = self.finish.unwrap_or(if here >= self.call.max_tokens {
            Finish::Length
        } else {
            Finish::Stop
        });
        Output::Done { finish, prompt_tokens: self.prompt_tokens, completion_tokens }
    }

    /// Reads the engine's usage, if `v` carries it; for a continued answer, rewrites it as
    /// the client sees it (the continued text's tokens as generated, not prompt).
    fn take_usage(&mut self, v: &mut Value) {
        let c = u64::from(self.call.continued);
        if c > 0
            && let Some(u) = v.get_mut("usage").and_then(Value::as_object_mut)
        {
            let prompt = u.get("prompt_tokens").and_then(Value::as_u64);
            let completion = u.get("completion_tokens").and_then(Value::as_u64);
            if let (Some(p), Some(g)) = (prompt, completion) {
                u.insert("prompt_tokens".into(), json!(p.saturating_sub(c)));
                u.insert("completion_tokens".into(), json!(g + c));
            }
        }
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            let only = match v.get("choices").and_then(Value::as_array).map(Vec::as_slice) {
                Some([c]) => Some(c.get("index").and_then(Value::as_u64).unwrap_or(0)),
                _ => None,
            };
            self.read_usage(u, only);
        }
    }

    /// Takes the counts of a `usage` object (the chat and completions APIs' names, or the
    /// Responses API's `input_tokens`, `output_tokens`), reported with the one choice `only`
    /// or for the whole answer.
    fn read_usage(&mut self, u: &Value, only: Option<u64>) {
        let count = |a: &str, b: &str| u.get(a).or_else(|| u.get(b)).and_then(Value::as_u64);
        let prompt = count("prompt_tokens", "input_tokens");
        self.note_usage(only, prompt, count("completion_tokens", "output_tokens"));
    }

    /// Takes usage the engine reported. With an event of one choice, `only`, it is that
    /// choice's: llama.cpp reports each prompt's of a batch so, as vLLM reports each choice's
    /// as it goes with `continuous_usage_stats`; the answer's is the sum over the choices. Else
    /// it is the whole answer's (vLLM's and SGLang's last event, with no choices; a body).
    fn note_usage(&mut self, only: Option<u64>, prompt: Option<u64>, completion: Option<u64>) {
        let Some(index) = only else {
            if let Some(n) = prompt {
                self.prompt_tokens = n as u32;
            }
            if let Some(n) = completion {
                self.completion_tokens = Some(n as u32);
            }
            return;
        };
        let at = match self.choice_usage.iter().position(|u| u.0 == index) {
            Some(at) => at,
            None => {
                self.choice_usage.push((index, 0, None));
                self.choice_usage.len() - 1
            }
        };
        let slot = &mut self.choice_usage[at];
        if let Some(n) = prompt {
            slot.1 = n as u32;
        }
        if let Some(n) = completion {
            slot.2 = Some(n as u32);
        }
        self.prompt_tokens = self.choice_usage.iter().map(|u| u.1).sum();
        self.completion_tokens = self.choice_usage.iter().filter_map(|u| u.2).reduce(|a, b| a + b);
    }

    /// Sets sllm's `id`, `model` and `created` on an answer for an OpenAI client (an
    /// embeddings list has no `id` or `created`, and a Responses API or rerank answer keeps
    /// its own: only its `model`).
    fn stamp(relay: &Relay, v: &mut Value) {
        if let Some(m) = v.as_object_mut() {
            let own_ids = relay.shape == Shape::ModelOnly
                || matches!(m.get("object").and_then(Value::as_str), Some("list" | "response"));
            if !own_ids {
                m.insert("id".into(), json!(relay.id));
                m.insert("created".into(), json!(relay.created));
            }
            m.insert("model".into(), json!(relay.model));
        }
    }

    /// Reads one server-sent event's data.
    pub fn event(&mut self, data: &str) -> Step {
        let data = data.trim();
        if data == "[DONE]" {
            return Step::Done(self.done());
        }
        if data.is_empty() {
            return Step::Output(None);
        }
        if self.call.relay.as_ref().is_some_and(|r| r.shape == Shape::Responses) {
            return self.responses_event(data);
        }
        match self.relay_event(data) {
            Some(step) => step,
            None => self.tree_event(data),
        }
    }

    /// Reads one event of a Responses API stream: passed on as the engine wrote it, with the
    /// client's `model` in its response object where it has one. Each delta with content (of
    /// text, reasoning, a function call's arguments) counts as a token; the last event
    /// (`response.completed`, `.incomplete`, `.failed`) carries the usage and ends the stream.
    fn responses_event(&mut self, data: &str) -> Step {
        // Most events (the deltas) are read borrowed and passed on as written; those with a
        // response object (the first and the last) or an error go by way of a tree.
        let borrowed = serde_json::from_str::<fast::Typed<'_>>(data).ok().filter(|t| {
            t.response.is_none()
                && t.error.is_none()
                && t.kind.as_deref().is_some_and(|k| k != "error")
        });
        let (text, tokens, event) = match borrowed {
            Some(t) => {
                let (text, tokens) =
                    delta_of(t.kind.as_deref().unwrap_or_default(), t.delta.as_deref());
                (text, tokens, data.to_string())
            }
            None => {
                let mut v: Value = match serde_json::from_str(data) {
                    Ok(v) => v,
                    Err(e) => return not_json(&e, data),
                };
                let kind = v.get("type").and_then(Value::as_str).unwrap_or_default();
                if kind == "error" || is_error(&v) {
                    return reported(data);
                }
                let (text, tokens) = delta_of(kind, v.get("delta").and_then(Value::as_str));
                if matches!(kind, "response.completed" | "response.incomplete" | "response.failed")
                {
                    self.ended = true;
                    // Incomplete: it ran into max_output_tokens (or the context).
                    let incomplete = kind == "response.incomplete";
                    self.finish = Some(if incomplete { Finish::Length } else { Finish::Stop });
                    if let Some(u) = v.get("response").and_then(|r| r.get("usage")).cloned() {
                        self.read_usage(&u, None);
                    }
                }
                // Written again only where its response object names another model; otherwise
                // the engine's own text goes on.
                let model = v.get_mut("response").and_then(|r| r.get_mut("model"));
                let event = match (&self.call.relay, model) {
                    (Some(relay), Some(model)) if model.as_str() != Some(relay.model.as_str()) => {
                        *model = json!(relay.model);
                        v.to_string()
                    }
                    _ => data.to_string(),
                };
                (text, tokens, event)
            }
        };
        self.counted += tokens;
        Step::Output(Some(Output::relayed(text, tokens, event)))
    }

    /// Reads an event by way of a JSON tree: any event [`Reader::relay_event`] does not.
    fn tree_event(&mut self, data: &str) -> Step {
        let mut v: Value = match serde_json::from_str(data) {
            Ok(v) => v,
            Err(e) => return not_json(&e, data),
        };
        if is_error(&v) {
            return reported(data);
        }
        self.take_usage(&mut v);
        let choice = v.get("choices").and_then(|c| c.get(0));
        let mut text = String::new();
        let mut content = false;
        // Content that is not the tokens' plain text.
        let mut shaped = false;
        let mut logprobs = Vec::new();
        if let Some(c) = choice {
            let delta = c.get("delta");
            let piece = c
                .get("text")
                .and_then(Value::as_str)
                .or_else(|| delta.and_then(|d| d.get("content")).and_then(Value::as_str));
            if let Some(t) = piece {
                text.push_str(t);
            }
            shaped = delta.is_some_and(is_shaped);
            content = !text.is_empty() || shaped;
            if let Some(f) = c.get("finish_reason").and_then(Value::as_str) {
                self.finish = Some(finish_of(f));
            }
            if self.call.logprobs {
                logprobs = token_logprobs(c.get("logprobs"));
            }
        }
        let (token_ids, mut prompt_token_ids) = self.read_ids(&v, &text, shaped);
        // A chat continued here opens with the engine's role chunk, which its client had at
        // the start: it is not sent twice.
        if self.call.continued > 0 && !content && token_ids.is_empty() && is_role_chunk(&v) {
            return Step::Output(None);
        }
        // Where ids are read, each is a token; otherwise each choice with content is one
        // (with several choices, `n` or a batch of prompts, an event may carry any of them).
        let tokens = if self.call.ids.is_some() && !self.ids.lost {
            token_ids.len() as u32
        } else {
            let choices = v.get("choices").and_then(Value::as_array);
            let others = choices.into_iter().flatten().skip(1).filter(|c| {
                let delta = c.get("delta");
                let piece = c
                    .get("text")
                    .or_else(|| delta.and_then(|d| d.get("content")))
                    .and_then(Value::as_str);
                piece.is_some_and(|t| !t.is_empty()) || delta.is_some_and(is_shaped)
            });
            u32::from(content) + others.count() as u32
        };
        self.counted += tokens;
        let mut events = Vec::new();
        if let Some(relay) = &self.call.relay {
            let empty = v.get("choices").and_then(Value::as_array).is_none_or(|c| c.is_empty());
            if !relay.include_usage {
                if empty && v.get("usage").is_some() {
                    // The usage event sllm asked for on the client's behalf.
                    return Step::Output(None);
                }
                if let Some(m) = v.as_object_mut() {
                    m.remove("usage");
                }
            }
            self.strip_ids(&mut v);
            if self.call.as_chat {
                as_chat_chunk(&mut v);
            }
            Self::stamp(relay, &mut v);
            events.push(v.to_string());
        } else if text.is_empty() && logprobs.is_empty() && token_ids.is_empty() {
            self.ids.prompt_pending.append(&mut prompt_token_ids);
            return Step::Output(None);
        }
        if !self.ids.prompt_pending.is_empty() {
            prompt_token_ids = std::mem::take(&mut self.ids.prompt_pending);
        }
        Step::Output(Some(Output::Text {
            text,
            tokens,
            events,
            logprobs,
            token_ids,
            prompt_token_ids,
        }))
    }

    /// Reads an event's token ids (see [`IdsRead`]): those to pass on with its text, and the
    /// prompt's (on the first event of a request's first call: a continued call's prompt holds
    /// the tokens it continues). `shaped`: the event carries more than its tokens' text.
    fn read_ids(&mut self, v: &Value, text: &str, shaped: bool) -> (Vec<u32>, Vec<u32>) {
        let Some(ids) = self.call.ids else { return (Vec::new(), Vec::new()) };
        let choice = v.get("choices").and_then(|c| c.get(0));
        let mut prompt = None;
        if self.wants_prompt_ids(ids) {
            // A completion's choice carries them; a chat's first chunk, at its top level.
            let found = choice
                .and_then(|c| c.get("prompt_token_ids"))
                .filter(|p| p.is_array())
                .or_else(|| v.get("prompt_token_ids").filter(|p| p.is_array()));
            prompt = found.map(|p| u32s(p).unwrap_or_default());
        }
        self.take_ids(prompt, text, shaped, || {
            let c = choice?;
            Some(match ids.from {
                IdsIn::TokenIds => match c.get("token_ids") {
                    None | Some(Value::Null) => (Some(Vec::new()), None),
                    Some(t) => (u32s(t), None),
                },
                IdsIn::Logprobs => logprob_ids(c.get("logprobs")),
            })
        })
    }

    /// Whether the prompt's ids are still to be read: on a request's first call, until read.
    fn wants_prompt_ids(&self, ids: Ids) -> bool {
        ids.from == IdsIn::TokenIds && self.call.continued == 0 && !self.ids.prompt_seen
    }

    /// [`Reader::read_ids`]'s bookkeeping, for ids found either way (a tree or borrowed):
    /// `prompt`, the prompt's ids if the event carries them and they are wanted; `here`, the
    /// event's first choice's ids and their pieces' bytes (None: no choice; None for the ids:
    /// one of them unreadable), asked for only while the ids still match the text.
    fn take_ids(
        &mut self,
        prompt: Option<Vec<u32>>,
        text: &str,
        shaped: bool,
        here: impl FnOnce() -> Option<FoundIds>,
    ) -> (Vec<u32>, Vec<u32>) {
        if prompt.is_some() {
            self.ids.prompt_seen = true;
        }
        let prompt = prompt.unwrap_or_default();
        if self.ids.lost {
            return (Vec::new(), prompt);
        }
        if shaped {
            self.ids.lost = true;
            return (Vec::new(), prompt);
        }
        let Some((here, bytes)) = here() else { return (Vec::new(), prompt) };
        let Some(here) = here else {
            self.ids.lost = true;
            return (Vec::new(), prompt);
        };
        self.ids.held.extend(here);
        match (&mut self.ids.held_bytes, bytes) {
            (Some(held), Some(b)) => held.extend(b),
            (held, _) => *held = None,
        }
        if text.is_empty() {
            return (Vec::new(), prompt);
        }
        let matches = self.ids.held_bytes.as_deref().is_none_or(|b| b == text.as_bytes());
        if self.ids.held.is_empty() || !matches {
            self.ids.lost = true;
            return (Vec::new(), prompt);
        }
        self.ids.held_bytes = Some(Vec::new());
        (std::mem::take(&mut self.ids.held), prompt)
    }

    /// Removes from an event for the client the ids it did not ask for: the log-probabilities
    /// sllm added, or the `token_ids` and `prompt_token_ids` (vLLM writes them as null when
    /// not asked for; SGLang leaves them out). A continued call's prompt ids are never the
    /// client's prompt: they go too.
    fn strip_ids(&self, v: &mut Value) {
        let Some(ids) = self.call.ids else { return };
        let vllm = self.call.dialect == Dialect::Vllm;
        let strip = |m: &mut Map<String, Value>, key: &str| {
            if vllm {
                if let Some(x) = m.get_mut(key) {
                    *x = Value::Null;
                }
            } else {
                m.remove(key);
            }
        };
        let prompt = ids.added || self.call.continued > 0;
        if ids.from == IdsIn::TokenIds
            && prompt
            && let Some(m) = v.as_object_mut()
        {
            strip(m, "prompt_token_ids");
        }
        let choices = v.get_mut("choices").and_then(Value::as_array_mut);
        for c in choices.into_iter().flatten().filter_map(Value::as_object_mut) {
            match ids.from {
                IdsIn::Logprobs if ids.added => {
                    c.insert("logprobs".into(), Value::Null);
                }
                IdsIn::Logprobs => {}
                IdsIn::TokenIds => {
                    if prompt {
                        strip(c, "prompt_token_ids");
                    }
                    if ids.added {
                        strip(c, "token_ids");
                    }
                }
            }
        }
    }

    /// Reads one event of an OpenAI client's stream without building a JSON tree: the event's
    /// top-level fields are kept as the engine wrote them (only `id`, `model` and `created` are
    /// set, and `usage` dropped when the client did not ask for it), and the few fields sllm
    /// reads are borrowed from it. This is the request path's per-token work, so it allocates
    /// only the event it passes on.
    ///
    /// The token ids sllm asked for are read the same way (vLLM's and SGLang's `token_ids`,
    /// llama.cpp's log-probabilities), and left out of what the client gets by rewriting only
    /// the fields that hold them: on vLLM and llama.cpp streams, every event comes this way.
    ///
    /// None: an event it does not read this way (an error report, a continued answer, a chat
    /// continued as a completion, log-probabilities for a gRPC client, JSON it cannot borrow
    /// from), which [`Reader::tree_event`] reads in full instead.
    fn relay_event(&mut self, data: &str) -> Option<Step> {
        let include_usage = self.call.relay.as_ref()?.include_usage;
        if self.call.continued > 0 || self.call.as_chat || self.call.logprobs {
            return None;
        }
        let top: fast::Top<'_> = serde_json::from_str(data).ok()?;
        let (parsed, usage, list) = self.read_top(&top)?;
        let first = parsed.first();
        // Everything that could send the event to the tree is read before anything changes.
        let ids = match self.call.ids {
            Some(ids) => {
                Some((self.borrowed_ids(ids, &top, first)?, self.client_choices(ids, &top)?))
            }
            None => None,
        };
        let mut text = String::new();
        let mut shaped = false;
        if let Some(c) = first {
            let piece = c.text.as_deref().or_else(|| c.delta.as_ref()?.content.as_deref());
            if let Some(t) = piece {
                text.push_str(t);
            }
            shaped = c.delta.as_ref().is_some_and(fast::Delta::has_output);
            if let Some(f) = c.finish_reason.as_deref() {
                self.finish = Some(finish_of(f));
            }
        }
        // With several choices (`n`, a batch of prompts), an event may carry any of them.
        let with_content = parsed
            .iter()
            .filter(|c| {
                let piece = c.text.as_deref().or_else(|| c.delta.as_ref()?.content.as_deref());
                piece.is_some_and(|t| !t.is_empty())
                    || c.delta.as_ref().is_some_and(fast::Delta::has_output)
            })
            .count() as u32;
        let (token_ids, prompt_token_ids, choices) = match ids {
            Some(((prompt, here), choices)) => {
                let (token_ids, prompt) = self.take_ids(prompt, &text, shaped, || here);
                (token_ids, prompt, choices)
            }
            None => (Vec::new(), Vec::new(), None),
        };
        // Where ids are read, each is a token; otherwise each choice with content is one.
        let tokens = if self.call.ids.is_some() && !self.ids.lost {
            token_ids.len() as u32
        } else {
            with_content
        };
        self.counted += tokens;
        if !include_usage && usage.is_some() && parsed.is_empty() {
            // The usage event sllm asked for on the client's behalf.
            return Some(Step::Output(None));
        }
        // The event as the client gets it, its fields in the engine's order, without the ids
        // sllm asked for (see `strip_ids`).
        let strip_prompt_ids = self.call.ids.is_some_and(|i| i.added && i.from == IdsIn::TokenIds);
        let vllm = self.call.dialect == Dialect::Vllm;
        let fields = top.raw().filter_map(|(k, v)| match (k, &choices) {
            ("choices", Some(c)) => Some((k, c.as_str())),
            // vLLM writes them as null when not asked for; SGLang leaves them out.
            ("prompt_token_ids", _) if strip_prompt_ids && vllm => Some((k, "null")),
            ("prompt_token_ids", _) if strip_prompt_ids => None,
            _ => Some((k, v)),
        });
        let out = self.restamped(fields, list, data.len(), !include_usage);
        Some(Step::Output(Some(Output::Text {
            text,
            tokens,
            events: vec![out],
            logprobs: Vec::new(),
            token_ids,
            prompt_token_ids,
        })))
    }

    /// [`Reader::read_ids`]'s reading of an event's ids without a tree: the prompt's, where
    /// they are wanted and the event carries them, and its first choice's (`first`). None:
    /// ids written in a way only the tree reads.
    fn borrowed_ids(
        &self,
        ids: Ids,
        top: &fast::Top<'_>,
        first: Option<&fast::Choice<'_>>,
    ) -> Option<(Option<Vec<u32>>, Option<FoundIds>)> {
        let array = |p: &&RawValue| p.get().starts_with('[');
        let mut prompt = None;
        if self.wants_prompt_ids(ids) {
            let found = first
                .and_then(|c| c.prompt_token_ids)
                .filter(array)
                .or_else(|| top.get("prompt_token_ids").filter(array));
            prompt = found.map(|p| serde_json::from_str::<Vec<u32>>(p.get()).unwrap_or_default());
        }
        let here = match first {
            None => None,
            Some(c) => Some(match ids.from {
                IdsIn::TokenIds => match c.token_ids {
                    None => (Some(Vec::new()), None),
                    Some(t) => (serde_json::from_str::<Vec<u32>>(t.get()).ok(), None),
                },
                IdsIn::Logprobs => borrowed_logprob_ids(c.logprobs)?,
            }),
        };
        Some((prompt, here))
    }

    /// The event's `choices` as the client gets them (see [`Reader::strip_ids`]), for an event
    /// of a call sllm asked ids of: Some(None) when they pass as written, None when only the
    /// tree can write them.
    fn client_choices(&self, ids: Ids, top: &fast::Top<'_>) -> Option<Option<String>> {
        let Some(raw) = top.get("choices").filter(|_| ids.added) else { return Some(None) };
        let choices: Vec<fast::Top<'_>> = serde_json::from_str(raw.get()).ok()?;
        let vllm = self.call.dialect == Dialect::Vllm;
        let mut out = String::with_capacity(raw.get().len());
        out.push('[');
        for (i, c) in choices.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let start = out.len();
            let mut logprobs = false;
            for (k, v) in c.raw() {
                let v = match (ids.from, k) {
                    (IdsIn::Logprobs, "logprobs") => {
                        logprobs = true;
                        "null"
                    }
                    (IdsIn::TokenIds, "prompt_token_ids" | "token_ids") if vllm => "null",
                    (IdsIn::TokenIds, "prompt_token_ids" | "token_ids") => continue,
                    _ => v,
                };
                let after_first = out.len() > start;
                push_field(&mut out, after_first, k, v);
            }
            if ids.from == IdsIn::Logprobs && !logprobs {
                let after_first = out.len() > start;
                push_field(&mut out, after_first, "logprobs", "null");
            }
            if out.len() == start {
                out.push('{');
            }
            out.push('}');
        }
        out.push(']');
        Some(Some(out))
    }

    /// What sllm reads of an answer's or an event's top level, borrowed: its choices, its usage
    /// (whose counts it takes) and whether it is a `list`. None: an error report, or fields it
    /// cannot borrow.
    fn read_top<'a>(
        &mut self,
        top: &fast::Top<'a>,
    ) -> Option<(Vec<fast::Choice<'a>>, Option<fast::Usage>, bool)> {
        let mut choices = None;
        let mut usage = None;
        // Whether the answer keeps its own `id` and `created`.
        let mut list = self.call.relay.as_ref().is_some_and(|r| r.shape == Shape::ModelOnly);
        for (k, v) in &top.0 {
            match *k {
                "error" if v.get() != "null" => return None,
                "object" => match v.get() {
                    "\"error\"" => return None,
                    // An embeddings list, or a Responses API answer (which keeps its own id).
                    "\"list\"" | "\"response\"" => list = true,
                    _ => {}
                },
                "choices" => choices = Some(*v),
                "usage" if v.get() != "null" => usage = Some(*v),
                _ => {}
            }
        }
        let parsed: Vec<fast::Choice<'a>> = match choices {
            Some(c) => serde_json::from_str(c.get()).ok()?,
            None => Vec::new(),
        };
        let usage: Option<fast::Usage> = match usage {
            Some(u) => Some(serde_json::from_str(u.get()).ok()?),
            None => None,
        };
        if let Some(u) = &usage {
            let only = match parsed.as_slice() {
                [c] => Some(c.index.unwrap_or(0)),
                _ => None,
            };
            self.note_usage(only, u.prompt_tokens, u.completion_tokens);
        }
        Some((parsed, usage, list))
    }

    /// `fields` (an answer's or an event's top level, as the engine wrote them) with sllm's
    /// `id`, `created` (neither for a `list`) and `model`, in the engine's order; `usage`
    /// left out when `drop_usage`. `len` is the engine's text's length, to size the result.
    fn restamped<'f>(
        &self,
        fields: impl IntoIterator<Item = (&'f str, &'f str)>,
        list: bool,
        len: usize,
        drop_usage: bool,
    ) -> String {
        let (id, model, created) = &self.stamps;
        let mut out = String::with_capacity(len + id.len() + model.len());
        let field = |out: &mut String, k: &str, v: &str| push_field(out, !out.is_empty(), k, v);
        let (mut has_id, mut has_created, mut has_model) = (list, list, false);
        for (k, v) in fields {
            match k {
                "id" if !list => {
                    has_id = true;
                    field(&mut out, k, id);
                }
                "created" if !list => {
                    has_created = true;
                    field(&mut out, k, created);
                }
                "model" => {
                    has_model = true;
                    field(&mut out, k, model);
                }
                "usage" if drop_usage => {}
                _ => field(&mut out, k, v),
            }
        }
        if !has_id {
            field(&mut out, "id", id);
        }
        if !has_created {
            field(&mut out, "created", created);
        }
        if !has_model {
            field(&mut out, "model", model);
        }
        if out.is_empty() {
            out.push('{');
        }
        out.push('}');
        out
    }

    /// Reads a whole answer for an OpenAI client as [`Reader::relay_event`] reads an event:
    /// without building a JSON tree, its top-level fields passed on as the engine wrote them
    /// with sllm's `id`, `model` and `created`.
    ///
    /// None: an answer it does not read this way (an error report, log-probabilities to read,
    /// a continued answer, JSON it cannot borrow from), which [`Reader::body`] reads in full.
    fn relay_body(&mut self, body: &str) -> Option<(Output, Output)> {
        self.call.relay.as_ref()?;
        if self.call.continued > 0 || self.call.ids.is_some() || self.call.logprobs {
            return None;
        }
        let top: fast::Top<'_> = serde_json::from_str(body).ok()?;
        let (parsed, _, list) = self.read_top(&top)?;
        let mut text = String::new();
        if let Some(c) = parsed.first() {
            let piece = c.text.as_deref().or_else(|| c.message.as_ref()?.content.as_deref());
            if let Some(t) = piece {
                text.push_str(t);
            }
            if let Some(f) = c.finish_reason.as_deref() {
                self.finish = Some(finish_of(f));
            }
        }
        let tokens = self.completion_tokens.unwrap_or(u32::from(!text.is_empty()));
        self.counted = tokens;
        let event = self.restamped(top.raw(), list, body.len(), false);
        Some((Output::relayed(text, tokens, event), self.done()))
    }

    /// Reads a whole (not streamed) answer: its output, then its end.
    pub fn body(&mut self, body: &str) -> Result<(Output, Output), Failure> {
        if self.call.relay.as_ref().is_some_and(|r| r.shape == Shape::AsWritten) {
            return self.as_written(body);
        }
        match self.relay_body(body) {
            Some(read) => Ok(read),
            None => self.tree_body(body),
        }
    }

    /// Reads a whole answer that goes to the client unchanged (the engine's own endpoints):
    /// an error the engine reported in a successful reply is still its error.
    fn as_written(&mut self, body: &str) -> Result<(Output, Output), Failure> {
        let v: Value = serde_json::from_str(body).map_err(body_not_json)?;
        if is_error(&v) {
            return Err(reported_failure(body));
        }
        Ok((Output::relayed(String::new(), 0, body.to_string()), self.done()))
    }

    /// Reads a whole answer by way of a JSON tree: any answer [`Reader::relay_body`] does not.
    fn tree_body(&mut self, body: &str) -> Result<(Output, Output), Failure> {
        let mut v: Value = serde_json::from_str(body).map_err(body_not_json)?;
        if is_error(&v) {
            return Err(reported_failure(body));
        }
        self.take_usage(&mut v);
        let choice = v.get("choices").and_then(|c| c.get(0)).cloned().unwrap_or(Value::Null);
        let text = choice
            .get("text")
            .and_then(Value::as_str)
            .or_else(|| {
                choice.get("message").and_then(|m| m.get("content")).and_then(Value::as_str)
            })
            .unwrap_or_default()
            .to_string();
        if let Some(f) = choice.get("finish_reason").and_then(Value::as_str) {
            self.finish = Some(finish_of(f));
        }
        let tokens = self.completion_tokens.unwrap_or(u32::from(!text.is_empty()));
        self.counted = tokens;
        let mut events = Vec::new();
        if let Some(relay) = &self.call.relay {
            Self::stamp(relay, &mut v);
            events.push(v.to_string());
        }
        let logprobs =
            if self.call.logprobs { token_logprobs(choice.get("logprobs")) } else { Vec::new() };
        let out = Output::Text {
            text,
            tokens,
            events,
            logprobs,
            token_ids: Vec::new(),
            prompt_token_ids: Vec::new(),
        };
        Ok((out, self.done()))
    }
}

/// A list of token ids; None if anything in it is not one.
/// Writes one field of a JSON object being written out by hand: `"k":v` after its `{` (the
/// first) or a `,`. `k` is a key borrowed as the engine wrote it (so it needs no escaping); `v`
/// is JSON text.
fn push_field(out: &mut String, after_first: bool, k: &str, v: &str) {
    out.push(if after_first { ',' } else { '{' });
    out.push('"');
    out.push_str(k);
    out.push_str("\":");
    out.push_str(v);
}

fn u32s(v: &Value) -> Option<Vec<u32>> {
    v.as_array()?.iter().map(|i| i.as_u64().and_then(|i| u32::try_from(i).ok())).collect()
}

/// The token ids in llama.cpp's log-probabilities (`{content: [{id, bytes, top_logprobs:
/// [{id, bytes}]}]}`, or `top_probs` for the sampler's probabilities), and the bytes of those
/// tokens' own pieces, when each is among its top candidates (an entry's own `bytes` are the
/// text sent with it, which may hold earlier tokens' text too). None for the ids when an entry
/// has no id.
fn logprob_ids(v: Option<&Value>) -> FoundIds {
    let entries = v.and_then(|l| l.get("content")).and_then(Value::as_array);
    let Some(entries) = entries else { return (Some(Vec::new()), Some(Vec::new())) };
    let mut ids = Vec::with_capacity(entries.len());
    let mut bytes = Some(Vec::new());
    for e in entries {
        let Some(id) = e.get("id").and_then(Value::as_u64).and_then(|i| u32::try_from(i).ok())
        else {
            return (None, None);
        };
        ids.push(id);
        let own = e
            .get("top_logprobs")
            .filter(|t| !t.is_null())
            .or_else(|| e.get("top_probs"))
            .and_then(Value::as_array)
            .and_then(|tops| {
                tops.iter().find(|t| t.get("id").and_then(Value::as_u64) == Some(u64::from(id)))
            })
            .and_then(|t| t.get("bytes"))
            .and_then(|b| {
                b.as_array()?
                    .iter()
                    .map(|x| x.as_u64().and_then(|x| u8::try_from(x).ok()))
                    .collect::<Option<Vec<u8>>>()
            });
        match (&mut bytes, own) {
            (Some(all), Some(b)) => all.extend(b),
            (all, _) => *all = None,
        }
    }
    (Some(ids), bytes)
}

/// [`logprob_ids`] without a tree, from the log-probabilities as written (`None` for null or
/// none). None: log-probabilities only the tree reads.
fn borrowed_logprob_ids(v: Option<&RawValue>) -> Option<FoundIds> {
    let none = || Some((Some(Vec::new()), Some(Vec::new())));
    let Some(v) = v else { return none() };
    let l: fast::Logprobs = serde_json::from_str(v.get()).ok()?;
    let Some(entries) = l.content else { return none() };
    let mut ids = Vec::with_capacity(entries.len());
    let mut bytes = Some(Vec::new());
    for e in &entries {
        let Some(id) = e.id.and_then(|i| u32::try_from(i).ok()) else {
            return Some((None, None));
        };
        ids.push(id);
        let own = e
            .top_logprobs
            .as_ref()
            .or(e.top_probs.as_ref())
            .and_then(|tops| tops.iter().find(|t| t.id == Some(u64::from(id))))
            .and_then(|t| t.bytes.as_ref())
            .and_then(|b| b.iter().map(|x| u8::try_from(*x).ok()).collect::<Option<Vec<u8>>>());
        match (&mut bytes, own) {
            (Some(all), Some(b)) => all.extend(b),
            (all, _) => *all = None,
        }
    }
    Some((Some(ids), bytes))
}

/// Whether a chat event only opens the assistant's message: a role, no content, no finish.
fn is_role_chunk(v: &Value) -> bool {
    let Some(c) = v.get("choices").and_then(|c| c.get(0)) else { return false };
    let delta = c.get("delta").and_then(Value::as_object);
    delta.is_some_and(|d| d.get("role").is_some_and(Value::is_string))
        && c.get("finish_reason").is_none_or(Value::is_null)
}

/// A completion event as the chat chunk it continues (a chat moved here continues through the
/// completions endpoint): `text` becomes the delta's `content`, the object a chunk.
fn as_chat_chunk(v: &mut Value) {
    let Some(m) = v.as_object_mut() else { return };
    if m.contains_key("object") {
        m.insert("object".into(), json!("chat.completion.chunk"));
    }
    let choices = m.get_mut("choices").and_then(Value::as_array_mut);
    for c in choices.into_iter().flatten().filter_map(Value::as_object_mut) {
        let text = c.remove("text").filter(|t| t.as_str().is_some_and(|t| !t.is_empty()));
        c.remove("prompt_token_ids");
        let delta = match text {
            Some(t) => json!({ "content": t }),
            None => json!({}),
        };
        c.insert("delta".into(), delta);
    }
}

/// Log-probabilities in either OpenAI shape: chat's `{content: [{token, logprob,
/// top_logprobs: [{token, logprob}]}]}` or completions' `{tokens, token_logprobs,
/// top_logprobs: [{token: logprob}]}`.
fn token_logprobs(v: Option<&Value>) -> Vec<pb::TokenLogprob> {
    let Some(v) = v.filter(|v| !v.is_null()) else { return Vec::new() };
    let f = |x: Option<&Value>| x.and_then(Value::as_f64).unwrap_or(f64::NEG_INFINITY) as f32;
    let s = |x: Option<&Value>| x.and_then(Value::as_str).unwrap_or_default().to_string();
    if let Some(content) = v.get("content").and_then(Value::as_array) {
        return content
            .iter()
            .map(|t| pb::TokenLogprob {
                token: s(t.get("token")),
                logprob: f(t.get("logprob")),
                top_logprobs: t
                    .get("top_logprobs")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .map(|a| pb::TopLogprob {
                        token: s(a.get("token")),
                        logprob: f(a.get("logprob")),
                    })
                    .collect(),
            })
            .collect();
    }
    let tokens = v.get("tokens").and_then(Value::as_array).cloned().unwrap_or_default();
    let lps = v.get("token_logprobs").and_then(Value::as_array).cloned().unwrap_or_default();
    let tops = v.get("top_logprobs").and_then(Value::as_array).cloned().unwrap_or_default();
    tokens
        .iter()
        .enumerate()
        .map(|(i, t)| pb::TokenLogprob {
            token: t.as_str().unwrap_or_default().to_string(),
            logprob: f(lps.get(i)),
            top_logprobs: tops
                .get(i)
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
                .map(|(k, x)| pb::TopLogprob { token: k.clone(), logprob: f(Some(x)) })
                .collect(),
        })
        .collect()
}

/// Borrowed views of an engine's stream event: the fields sllm reads, nothing copied.
mod fast {
    use std::borrow::Cow;

    use serde::Deserialize;
    use serde::de::{Deserializer, MapAccess, Visitor};
    use serde_json::value::RawValue;

    /// An event's top-level fields (or any object's) in the engine's order, each value as
    /// written.
    pub(super) struct Top<'a>(pub(super) Vec<(&'a str, &'a RawValue)>);

    impl<'a> Top<'a> {
        /// The fields, each value's text as written.
        pub(super) fn raw(&self) -> impl Iterator<Item = (&'a str, &'a str)> + '_ {
            self.0.iter().map(|(k, v)| (*k, v.get()))
        }

        /// The value of `key` (the last, as a tree would keep it).
        pub(super) fn get(&self, key: &str) -> Option<&'a RawValue> {
            self.0.iter().rev().find(|(k, _)| *k == key).map(|(_, v)| *v)
        }
    }

    impl<'de> Deserialize<'de> for Top<'de> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Fields;
            impl<'de> Visitor<'de> for Fields {
                type Value = Top<'de>;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<M: MapAccess<'de>>(self, mut m: M) -> Result<Top<'de>, M::Error> {
                    let mut fields = Vec::with_capacity(8);
                    // A key with escapes cannot be borrowed: the event is read in full instead.
                    while let Some(kv) = m.next_entry::<&'de str, &'de RawValue>()? {
                        fields.push(kv);
                    }
                    Ok(Top(fields))
                }
            }
            d.deserialize_map(Fields)
        }
    }

    #[derive(Deserialize)]
    pub(super) struct Choice<'a> {
        pub(super) index: Option<u64>,
        #[serde(borrow)]
        pub(super) text: Option<Cow<'a, str>>,
        #[serde(borrow)]
        pub(super) delta: Option<Delta<'a>>,
        /// A whole chat answer's message (its `content` as a delta's).
        #[serde(borrow)]
        pub(super) message: Option<Delta<'a>>,
        #[serde(borrow)]
        pub(super) finish_reason: Option<Cow<'a, str>>,
        /// vLLM's and SGLang's ids (`return_token_ids`).
        #[serde(borrow)]
        pub(super) token_ids: Option<&'a RawValue>,
        #[serde(borrow)]
        pub(super) prompt_token_ids: Option<&'a RawValue>,
        /// llama.cpp's log-probabilities, which carry its ids.
        #[serde(borrow)]
        pub(super) logprobs: Option<&'a RawValue>,
    }

    /// llama.cpp's log-probabilities of an event, as far as its ids go.
    #[derive(Deserialize)]
    pub(super) struct Logprobs {
        pub(super) content: Option<Vec<Entry>>,
    }

    /// One token's: its id and its top candidates (`top_probs` for the sampler's).
    #[derive(Deserialize)]
    pub(super) struct Entry {
        pub(super) id: Option<u64>,
        pub(super) top_logprobs: Option<Vec<Candidate>>,
        pub(super) top_probs: Option<Vec<Candidate>>,
    }

    #[derive(Deserialize)]
    pub(super) struct Candidate {
        pub(super) id: Option<u64>,
        pub(super) bytes: Option<Vec<u64>>,
    }

    #[derive(Deserialize)]
    pub(super) struct Delta<'a> {
        #[serde(borrow)]
        pub(super) content: Option<Cow<'a, str>>,
        #[serde(borrow)]
        tool_calls: Option<&'a RawValue>,
        #[serde(borrow)]
        function_call: Option<&'a RawValue>,
        #[serde(borrow)]
        reasoning_content: Option<&'a RawValue>,
        #[serde(borrow)]
        reasoning: Option<&'a RawValue>,
    }

    impl Delta<'_> {
        /// Whether the delta carries output other than content (a tool call, reasoning).
        pub(super) fn has_output(&self) -> bool {
            self.tool_calls.is_some()
                || self.function_call.is_some()
                || self.reasoning_content.is_some()
                || self.reasoning.is_some()
        }
    }

    /// What sllm reads of a Responses API event without a tree: its type and delta, and
    /// whether it carries a response object or an error (then it is read as a tree).
    #[derive(Deserialize)]
    pub(super) struct Typed<'a> {
        #[serde(borrow, rename = "type")]
        pub(super) kind: Option<Cow<'a, str>>,
        #[serde(borrow)]
        pub(super) delta: Option<Cow<'a, str>>,
        #[serde(borrow)]
        pub(super) response: Option<&'a RawValue>,
        #[serde(borrow)]
        pub(super) error: Option<&'a RawValue>,
    }

    #[derive(Deserialize)]
    pub(super) struct Usage {
        /// The Responses API's `input_tokens`, too.
        #[serde(alias = "input_tokens")]
        pub(super) prompt_tokens: Option<u64>,
        /// The Responses API's `output_tokens`, too.
        #[serde(alias = "output_tokens")]
        pub(super) completion_tokens: Option<u64>,
    }
}

/// Time limits on a streamed answer.
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    /// Time left for the first event.
    pub first_event: Duration,
    /// The configured first-event limit (for the error message).
    pub first_event_limit: Duration,
    /// Longest gap between two events.
    pub idle: Duration,
}

/// How long a stream's end may take to arrive after its `[DONE]` (the end is read so that the
/// engine's connection can be used again; past this the connection is closed instead). The
/// client has its answer already.
const DRAIN_AFTER_DONE: Duration = Duration::from_secs(1);

/// Reads a server-sent event stream of bytes (split anywhere, UTF-8 and CRLF included) into
/// outputs on `tx`, until `[DONE]`, an error event, a broken or ended stream, or a limit.
/// Ok(()) also when the receiver went away (the request was cancelled).
pub async fn relay_stream<S, B, E>(
    bytes: S,
    mut reader: Reader,
    limits: StreamLimits,
    tx: &mpsc::Sender<Output>,
) -> Result<(), Failure>
where
    S: Stream<Item = Result<B, E>> + Unpin,
    B: AsRef<[u8]>,
    E: std::fmt::Display,
{
    let mut events = bytes.eventsource();
    let stalled = |what: &str, limit: Duration| {
        Failure::new(
            FailureKind::Stalled,
            format!("the engine sent {what} within {} ms", limit.as_millis()),
        )
    };
    let mut first = true;
    loop {
        let limit = if first { limits.first_event } else { limits.idle };
        let event = match tokio::time::timeout(limit, events.next()).await {
            Err(_) if first => return Err(stalled("no first event", limits.first_event_limit)),
            Err(_) => {
                return Err(stalled(
                    &format!("nothing after {} tokens", reader.tokens()),
                    limits.idle,
                ));
            }
            Ok(None) => {
                // A stream that ends with its last event, not `[DONE]` (the Responses API's).
                if let Some(done) = reader.finished() {
                    let _ = tx.send(done).await;
                    return Ok(());
                }
                return Err(Failure::unavailable(format!(
                    "the engine ended the stream after {} tokens without finishing",
                    reader.tokens()
                )));
            }
            Ok(Some(Err(e))) => {
                return Err(Failure::unavailable(format!("engine stream broke: {e}")));
            }
            Ok(Some(Ok(event))) => event,
        };
        first = false;
        match reader.event(&event.data) {
            Step::Output(None) => {}
            Step::Output(Some(out)) => {
                if tx.send(out).await.is_err() {
                    // Cancelled: dropping the body closes the HTTP request.
                    return Ok(());
                }
            }
            Step::Done(done) => {
                let _ = tx.send(done).await;
                // An HTTP/1.1 connection goes back to the pool only once its answer is read
                // to the end, and uvicorn (vLLM's and SGLang's server) writes a chunked
                // body's last chunk on its own after `[DONE]`: without reading it, the next
                // request to the engine would open a new connection.
                let rest = async { while events.next().await.is_some() {} };
                let _ = tokio::time::timeout(DRAIN_AFTER_DONE, rest).await;
                return Ok(());
            }
            Step::Failed(f) => return Err(f),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn job(openai: Option<pb::OpenAiRequest>, input: Input, params: pb::SamplingParams) -> Job {
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

    fn relayed_job(endpoint: pb::OpenAiEndpoint, body: Value) -> Job {
        let o = pb::OpenAiRequest {
            endpoint: endpoint as i32,
            body: body.to_string(),
            response_id: "chatcmpl-1".into(),
            created: 42,
            model: "m:vllm".into(),
        };
        let params = pb::SamplingParams { max_tokens: 256, ..Default::default() };
        job(Some(o), Input::Prompt(String::new()), params)
    }

    #[test]
    fn a_client_body_goes_to_the_same_endpoint_with_only_model_rewritten() {
        let body = json!({
            "model": "m:vllm", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "tools": [{"type": "function", "function": {"name": "f"}}], "logprobs": true,
            "top_logprobs": 3, "max_tokens": 9, "guided_json": {"type": "object"},
        });
        let c = call(
            Dialect::Vllm,
            "m",
            &relayed_job(pb::OpenAiEndpoint::ChatCompletions, body.clone()),
        )
        .unwrap();
        assert_eq!(c.path, "/v1/chat/completions");
        let mut expected = body;
        expected["model"] = json!("m");
        assert_eq!(c.body, expected);
        assert!(!c.stream);
        // A stream asks for usage; the client sees it only if it asked.
        let body = json!({"model": "m", "prompt": "p", "stream": true, "stream_options": {"continuous_usage_stats": true}});
        let c = call(Dialect::Vllm, "served", &relayed_job(pb::OpenAiEndpoint::Completions, body))
            .unwrap();
        assert_eq!(c.path, "/v1/completions");
        assert_eq!(c.body["model"], "served");
        assert_eq!(
            c.body["stream_options"],
            json!({"continuous_usage_stats": true, "include_usage": true})
        );
        assert_eq!(c.body["max_tokens"], 256, "Dispatch's limit where the client set none");
        assert!(!c.relay.unwrap().include_usage);
    }

    #[test]
    fn grpc_parameters_become_each_engines_fields() {
        let params = pb::SamplingParams {
            max_tokens: 8,
            temperature: Some(0.0),
            top_k: Some(5),
            min_p: Some(0.1),
            repetition_penalty: Some(1.1),
            seed: Some(3),
            logprobs: true,
            top_logprobs: 2,
            regex: "[a-z]+".into(),
            ..Default::default()
        };
        let chat = Input::Chat(vec![pb::ChatMessage { role: "user".into(), content: "hi".into() }]);
        let c = call(Dialect::Vllm, "m", &job(None, chat.clone(), params.clone())).unwrap();
        assert_eq!(c.path, "/v1/chat/completions");
        assert_eq!(c.body["messages"], json!([{"role": "user", "content": "hi"}]));
        assert_eq!(c.body["top_k"], 5);
        assert_eq!(
            (c.body["logprobs"].clone(), c.body["top_logprobs"].clone()),
            (json!(true), json!(2))
        );
        assert_eq!(c.body["structured_outputs"], json!({"regex": "[a-z]+"}));
        let c = call(Dialect::Sglang, "m", &job(None, chat.clone(), params.clone())).unwrap();
        assert_eq!(c.body["regex"], "[a-z]+");
        let f = call(Dialect::Llamacpp, "m", &job(None, chat, params.clone())).unwrap_err();
        assert_eq!(f.kind, FailureKind::Invalid);
        assert!(f.message.contains("regex"), "{}", f.message);
        let mut p = params;
        p.regex.clear();
        p.json_schema = r#"{"type": "object"}"#.into();
        let c = call(Dialect::Llamacpp, "m", &job(None, Input::Prompt("p".into()), p)).unwrap();
        assert_eq!(c.path, "/v1/completions");
        assert_eq!(c.body["logprobs"], 2, "completions take a count");
        assert_eq!(c.body["response_format"]["json_schema"]["schema"], json!({"type": "object"}));
    }

    #[test]
    fn engine_errors_are_sorted_by_status() {
        let f = http_failure(
            400,
            r#"{"error":{"code":400,"message":"too long","type":"exceed_context_size_error"}}"#
                .into(),
        );
        assert_eq!((f.kind, f.http_status), (FailureKind::Invalid, 400));
        assert!(f.message.ends_with("too long"), "{}", f.message);
        assert_eq!(http_failure(503, "busy".into()).kind, FailureKind::Unavailable);
        assert_eq!(http_failure(429, "{}".into()).kind, FailureKind::Unavailable);
        assert_eq!(error_message(r#"{"object":"error","message":"bad","code":400}"#), "bad");
        assert_eq!(error_message(r#"{"detail":"Not Found"}"#), "Not Found");
    }

    #[test]
    fn a_response_keeps_its_own_id_and_gets_the_clients_model() {
        // llama.cpp's server's answer to a Responses API request (0.3.36).
        let answer = r#"{"completed_at":1796686803,"created_at":1796686803,"id":"resp_ErzzAxsmrq49t2gZ5QDHpNy1kWyHzG1A","model":"tiny","object":"response","output":[{"content":[{"type":"output_text","annotations":[],"logprobs":[],"text":"avelpress negoti"}],"id":"msg_gs0QfEOru5W2kKD68cm54uEcfqjrcKol","role":"assistant","status":"completed","type":"message"}],"status":"completed","usage":{"input_tokens":11,"output_tokens":3,"total_tokens":14,"input_tokens_details":{"cached_tokens":0}}}"#;
        let body = json!({"model": "m", "input": "hi", "max_output_tokens": 3});
        let c = call(Dialect::Llamacpp, "tiny", &relayed_job(pb::OpenAiEndpoint::Responses, body))
            .unwrap();
        assert_eq!((c.path, c.stream), ("/v1/responses", false));
        assert_eq!(c.body["max_output_tokens"], 3, "the client's own limit");
        let (out, done) = Reader::new(c.clone()).body(answer).unwrap();
        let Output::Text { events, tokens, .. } = out else { panic!("{out:?}") };
        let v: Value = serde_json::from_str(&events[0]).unwrap();
        let mut expected: Value = serde_json::from_str(answer).unwrap();
        expected["model"] = json!("m:vllm");
        assert_eq!(v, expected, "the engine's id, no `created`: only the model is sllm's");
        assert_eq!(tokens, 3);
        assert_eq!(
            done,
            Output::Done { finish: Finish::Stop, prompt_tokens: 11, completion_tokens: 3 }
        );
        // The same read as a tree (the way for answers the borrowed reading cannot take).
        let mut r = Reader::new(c);
        let (out, _) = r.tree_body(answer).unwrap();
        let Output::Text { events, .. } = out else { panic!("{out:?}") };
        let v: Value = serde_json::from_str(&events[0]).unwrap();
        assert_eq!(v["id"], "resp_ErzzAxsmrq49t2gZ5QDHpNy1kWyHzG1A");
        assert_eq!(v["model"], "m:vllm");
        assert!(v.get("created").is_none(), "{v}");
    }

    #[test]
    fn relayed_events_get_sllms_id_model_and_created_and_lose_unasked_usage() {
        let body = json!({"model": "m", "prompt": "p", "stream": true});
        let c =
            call(Dialect::Vllm, "m", &relayed_job(pb::OpenAiEndpoint::Completions, body)).unwrap();
        let mut r = Reader::new(c);
        let Step::Output(Some(Output::Text { text, tokens, events, .. })) = r.event(
            r#"{"id":"cmpl-x","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"text":"Hé","logprobs":null,"finish_reason":null}],"usage":null}"#,
        ) else {
            panic!("a text event")
        };
        assert_eq!((text.as_str(), tokens), ("Hé", 1));
        let v: Value = serde_json::from_str(&events[0]).unwrap();
        assert_eq!(
            (v["id"].clone(), v["model"].clone(), v["created"].clone()),
            (json!("chatcmpl-1"), json!("m:vllm"), json!(42))
        );
        assert!(v.get("usage").is_none());
        let usage = r#"{"id":"cmpl-x","object":"text_completion","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":7,"total_tokens":10}}"#;
        assert_eq!(r.event(usage), Step::Output(None), "the client did not ask for usage");
        assert_eq!(
            r.event("[DONE]"),
            Step::Done(Output::Done {
                finish: Finish::Stop,
                prompt_tokens: 3,
                completion_tokens: 7
            })
        );
        // An error event ends the request with the engine's words.
        let Step::Failed(f) =
            r.event(r#"{"error":{"message":"boom","type":"InternalServerError","code":500}}"#)
        else {
            panic!("a failure")
        };
        assert_eq!(f.kind, FailureKind::Engine);
        assert!(f.message.contains("boom"));
    }

    /// A batch of prompts streamed by llama.cpp: each prompt's usage comes with its own last
    /// event (and a `null` event between them); the answer's usage is their sum, as vLLM
    /// reports it in one event. A usage event of no choice (vLLM's, SGLang's) is the whole.
    #[test]
    fn a_batchs_usage_is_the_sum_of_each_prompts() {
        let body = json!({"model": "m", "prompt": ["Hello there", "A story about"], "stream": true,
            "stream_options": {"include_usage": true}});
        let job = relayed_job(pb::OpenAiEndpoint::Completions, body);
        for dialect in [Dialect::Llamacpp, Dialect::Vllm] {
            let mut r = Reader::new(call(dialect, "m", &job).unwrap());
            let event = |i: u32, text: &str, finish: &str, usage: &str| {
                format!(
                    r#"{{"choices":[{{"text":"{text}","index":{i},"logprobs":null,"finish_reason":{finish}}}],"created":1,"model":"m","object":"text_completion","id":"chatcmpl-x"{usage}}}"#
                )
            };
            for e in [
                event(0, " school", "null", ""),
                event(0, " claims", "null", ""),
                event(
                    0,
                    "",
                    "\"length\"",
                    r#","usage":{"completion_tokens":2,"prompt_tokens":3,"total_tokens":5}"#,
                ),
                "null".to_string(),
                event(1, " Row", "null", ""),
                event(1, " all", "null", ""),
                event(
                    1,
                    "",
                    "\"length\"",
                    r#","usage":{"completion_tokens":2,"prompt_tokens":4,"total_tokens":6}"#,
                ),
            ] {
                assert!(!matches!(r.event(&e), Step::Failed(_)), "{e}");
            }
            let Step::Done(Output::Done { prompt_tokens, completion_tokens, .. }) =
                r.event("[DONE]")
            else {
                panic!("the end")
            };
            assert_eq!((prompt_tokens, completion_tokens), (7, 4), "{dialect:?}");
        }
        // vLLM's: each choice's as it goes, then the whole in an event of no choice.
        let mut r = Reader::new(call(Dialect::Vllm, "m", &job).unwrap());
        r.event(r#"{"choices":[{"index":0,"text":"a","finish_reason":null}],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#);
        r.event(r#"{"choices":[{"index":1,"text":"b","finish_reason":null}],"usage":{"prompt_tokens":4,"completion_tokens":1}}"#);
        r.event(r#"{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":9}}"#);
        let Step::Done(Output::Done { prompt_tokens, completion_tokens, .. }) = r.event("[DONE]")
        else {
            panic!("the end")
        };
        assert_eq!((prompt_tokens, completion_tokens), (7, 9));
    }

    /// Whole answers read without a tree give what the tree reading gives: the same text,
    /// tokens and end, and the same answer for the client (sllm's id, model and created; every
    /// other field as the engine wrote it, usage kept), for completions, chat, tool calls,
    /// embeddings and answers without usage; answers the fast reading leaves (errors, a
    /// usage that is not an object) still come out as before.
    #[test]
    fn whole_answers_read_without_a_tree_match_the_tree_reading() {
        let answers = [
            (
                pb::OpenAiEndpoint::Completions,
                json!({"model": "m", "prompt": "p", "max_tokens": 5}),
                r#"{"id":"cmpl-x","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"text":"Hé \"x\"","logprobs":null,"finish_reason":"length","stop_reason":null}],"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8},"system_fingerprint":null}"#,
            ),
            (
                pb::OpenAiEndpoint::ChatCompletions,
                json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
                r#"{"choices":[{"finish_reason":"stop","index":0,"message":{"role":"assistant","content":"hello there"}}],"created":7,"model":"m","object":"chat.completion","usage":{"completion_tokens":2,"prompt_tokens":9,"total_tokens":11},"id":"chatcmpl-abc","timings":{"prompt_ms":0.25}}"#,
            ),
            (
                pb::OpenAiEndpoint::ChatCompletions,
                json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
                r#"{"id":"c","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":null,"tool_calls":[{"id":"t","type":"function","function":{"name":"f","arguments":"{}"}}]},"finish_reason":"tool_calls"}],"usage":{"prompt_tokens":4,"completion_tokens":6,"total_tokens":10}}"#,
            ),
            (
                pb::OpenAiEndpoint::Completions,
                json!({"model": "m", "prompt": "p", "max_tokens": 5}),
                r#"{"object":"text_completion","choices":[{"index":0,"text":"ab","finish_reason":"stop"}]}"#,
            ),
            (
                pb::OpenAiEndpoint::Embeddings,
                json!({"model": "m", "input": "p"}),
                r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.5,-1e-3]}],"model":"m","usage":{"prompt_tokens":2,"total_tokens":2}}"#,
            ),
            (
                pb::OpenAiEndpoint::Completions,
                json!({"model": "m", "prompt": "p", "max_tokens": 5}),
                r#"{"object":"text_completion","choices":[{"index":0,"text":"ab","finish_reason":"stop"}],"usage":"none"}"#,
            ),
        ];
        for (n, (endpoint, body, answer)) in answers.into_iter().enumerate() {
            let reader = || {
                Reader::new(call(Dialect::Vllm, "m", &relayed_job(endpoint, body.clone())).unwrap())
            };
            let tree = reader().tree_body(answer).unwrap();
            // All but the last (its usage is not an object) are read without a tree.
            assert_eq!(reader().relay_body(answer).is_some(), n < 5, "{answer}");
            let mut fast_reader = reader();
            let fast = fast_reader.body(answer).unwrap();
            let events = |o: &Output| match o {
                Output::Text { events, .. } => events
                    .iter()
                    .map(|e| serde_json::from_str::<Value>(e).unwrap())
                    .collect::<Vec<_>>(),
                other => panic!("{other:?}"),
            };
            assert_eq!(events(&fast.0), events(&tree.0), "{answer}");
            assert_eq!(fast.1, tree.1, "{answer}");
            let (Output::Text { text: a, tokens: n, .. }, Output::Text { text: b, tokens: m, .. }) =
                (&fast.0, &tree.0)
            else {
                unreachable!()
            };
            assert_eq!((a, n), (b, m), "{answer}");
            let client = &events(&fast.0)[0];
            if client["object"] != "list" {
                assert_eq!(
                    (client["id"].clone(), client["created"].clone()),
                    (json!("chatcmpl-1"), json!(42))
                );
            }
            assert_eq!(client["model"], "m:vllm");
        }
        // The engine's own words pass as written, not as a tree writes them again.
        let answer = r#"{"object":"text_completion","choices":[{"index":0,"text":"x","finish_reason":"stop"}],"timings":{"prompt_ms":1.50}}"#;
        let (Output::Text { events, .. }, _) = reader_for_completions().body(answer).unwrap()
        else {
            panic!("text")
        };
        assert!(events[0].contains(r#""timings":{"prompt_ms":1.50}"#), "{}", events[0]);
        // An error answer is still the engine's error.
        let err = reader_for_completions()
            .body(r#"{"object":"error","message":"boom","type":"BadRequestError","code":400}"#)
            .unwrap_err();
        assert!(err.message.contains("boom"), "{}", err.message);
    }

    /// Stream events read without a tree give what the tree reading gives, on the engines sllm
    /// asks for token ids: the same text, tokens, ids and end, and the same events for the
    /// client (the ids it did not ask for left out, the rest as the engine wrote it).
    #[test]
    fn stream_events_with_token_ids_read_without_a_tree_match_the_tree_reading() {
        let cmpl = pb::OpenAiEndpoint::Completions;
        let chat = pb::OpenAiEndpoint::ChatCompletions;
        let msgs = json!([{"role": "user", "content": "hi"}]);
        let stream = json!({"model": "m", "prompt": "p", "stream": true, "max_tokens": 5});
        // A llama.cpp token: its id and the bytes of its piece among the top candidates.
        let lp = |id: u32, piece: &[u8], top: &str| {
            let tops = format!("top_{top}");
            let kind = if top == "probs" { "prob" } else { "logprob" };
            json!({"content": [{"id": id, "token": "", "bytes": piece, kind: -0.5,
                tops: [{"id": id, "token": "", "bytes": piece, kind: -0.5}]}]})
        };
        let text = |t: &str, logprobs: Value| {
            json!({"choices": [{"text": t, "index": 0, "logprobs": logprobs, "finish_reason": null}],
                "created": 1, "model": "tiny", "system_fingerprint": "b1", "object": "text_completion", "id": "cmpl-x"})
        };
        let delta = |d: Value, logprobs: Value| {
            json!({"choices": [{"finish_reason": null, "index": 0, "delta": d, "logprobs": logprobs}],
                "created": 1, "id": "chatcmpl-x", "model": "tiny", "object": "chat.completion.chunk"})
        };
        let end = json!({"choices": [{"text": "", "index": 0, "logprobs": null, "finish_reason": "length"}], "id": "cmpl-x"});
        let usage = json!({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}, "id": "cmpl-x"});
        let vllm = |t: &str, ids: Value, prompt: Value| {
            json!({"id": "cmpl-v", "object": "text_completion", "created": 2, "model": "m",
                "choices": [{"index": 0, "text": t, "logprobs": null, "finish_reason": null, "stop_reason": null,
                    "prompt_token_ids": prompt, "token_ids": ids}], "usage": null})
        };
        let cases: Vec<(Dialect, pb::OpenAiEndpoint, Value, Vec<Value>)> = vec![
            // llama.cpp, the sampler's probabilities sllm adds: a character in two tokens,
            // held back, then a token whose piece is not among its candidates.
            (
                Dialect::Llamacpp,
                cmpl,
                stream.clone(),
                vec![
                    text(" a", lp(9, b" a", "probs")),
                    text("", lp(10, &[0xc3], "probs")),
                    text("é", lp(11, &[0xa9], "probs")),
                    text(
                        " b",
                        json!({"content": [{"id": 12, "bytes": [32, 98], "prob": 0.1, "top_probs": [{"id": 3, "bytes": [120], "prob": 0.9}]}]}),
                    ),
                    end.clone(),
                    usage.clone(),
                ],
            ),
            // Text the ids do not cover: the ids stop.
            (
                Dialect::Llamacpp,
                cmpl,
                stream.clone(),
                vec![
                    text(" a", lp(9, b" a", "probs")),
                    text("é b", lp(10, b" b", "probs")),
                    text(" c", lp(11, b" c", "probs")),
                    end.clone(),
                ],
            ),
            // A client that asked for log-probabilities gets them.
            (
                Dialect::Llamacpp,
                cmpl,
                json!({"model": "m", "prompt": "p", "stream": true, "logprobs": 1, "stream_options": {"include_usage": true}}),
                vec![text(" a", lp(9, b" a", "logprobs")), end.clone(), usage.clone()],
            ),
            // A chat: its role chunk, tokens, then a tool call (the ids stop).
            (
                Dialect::Llamacpp,
                chat,
                json!({"model": "m", "messages": msgs, "stream": true}),
                vec![
                    delta(json!({"role": "assistant", "content": null}), Value::Null),
                    delta(json!({"content": " a"}), lp(9, b" a", "probs")),
                    json!({"choices": [{"finish_reason": null, "index": 0, "delta": {"content": " b"}}], "id": "c"}),
                    delta(
                        json!({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}),
                        lp(10, b"{}", "probs"),
                    ),
                    delta(json!({"content": " c"}), lp(11, b" c", "probs")),
                ],
            ),
            // vLLM: the prompt's ids on the first event, then each token's.
            (
                Dialect::Vllm,
                cmpl,
                json!({"model": "m", "prompt": "p", "stream": true, "stream_options": {"include_usage": true}}),
                vec![
                    vllm(" a", json!([9]), json!([1, 2])),
                    vllm("", json!([10]), Value::Null),
                    vllm("é", json!([11]), Value::Null),
                    vllm(" b", json!("x"), Value::Null),
                    json!({"id": "cmpl-v", "object": "text_completion", "created": 2, "model": "m", "choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}}),
                ],
            ),
            // vLLM's chat: the prompt's ids at the top of the first chunk.
            (
                Dialect::Vllm,
                chat,
                json!({"model": "m", "messages": msgs, "stream": true}),
                vec![
                    json!({"id": "c", "object": "chat.completion.chunk", "created": 2, "model": "m", "prompt_token_ids": [1, 2, 3],
                    "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]}),
                    json!({"id": "c", "object": "chat.completion.chunk", "created": 2, "model": "m",
                    "choices": [{"index": 0, "delta": {"content": " a"}, "logprobs": null, "finish_reason": null, "token_ids": [9]}]}),
                ],
            ),
            // A client that asked for vLLM's ids keeps them.
            (
                Dialect::Vllm,
                cmpl,
                json!({"model": "m", "prompt": "p", "stream": true, "return_token_ids": true}),
                vec![vllm(" a", json!([9]), json!([1, 2])), vllm(" b", json!([10]), Value::Null)],
            ),
            // SGLang leaves out the ids a client did not ask for.
            (
                Dialect::Sglang,
                cmpl,
                stream.clone(),
                vec![
                    json!({"id": "s", "object": "text_completion", "created": 3, "model": "m",
                    "choices": [{"index": 0, "text": " a", "logprobs": null, "finish_reason": null, "prompt_token_ids": [1], "token_ids": [9]}]}),
                    json!({"id": "s", "object": "text_completion", "created": 3, "model": "m",
                    "choices": [{"index": 0, "text": " b", "logprobs": null, "finish_reason": "length", "token_ids": [10]}]}),
                ],
            ),
        ];
        let parsed = |step: &Step| match step {
            Step::Output(Some(Output::Text { events, .. })) => {
                events.iter().map(|e| serde_json::from_str::<Value>(e).unwrap()).collect::<Vec<_>>()
            }
            _ => Vec::new(),
        };
        let without_events = |step: Step| match step {
            Step::Output(Some(Output::Text {
                text,
                tokens,
                logprobs,
                token_ids,
                prompt_token_ids,
                ..
            })) => Step::Output(Some(Output::Text {
                text,
                tokens,
                events: Vec::new(),
                logprobs,
                token_ids,
                prompt_token_ids,
            })),
            other => other,
        };
        for (dialect, endpoint, body, events) in cases {
            let reader =
                || Reader::new(call(dialect, "m", &relayed_job(endpoint, body.clone())).unwrap());
            let (mut fast, mut tree) = (reader(), reader());
            assert!(fast.call.ids.is_some(), "{body}");
            for e in &events {
                let data = e.to_string();
                let a =
                    fast.relay_event(&data).unwrap_or_else(|| panic!("read with a tree: {data}"));
                let b = tree.tree_event(&data);
                assert_eq!(parsed(&a), parsed(&b), "{dialect:?} {data}");
                if let Some(client) = parsed(&a).first() {
                    assert_eq!(
                        (client["id"].clone(), client["model"].clone()),
                        (json!("chatcmpl-1"), json!("m:vllm"))
                    );
                }
                assert_eq!(without_events(a), without_events(b), "{dialect:?} {data}");
            }
            assert_eq!(fast.event("[DONE]"), tree.event("[DONE]"), "{body}");
        }
        // What the fast reading cannot read is read by the tree: an id that is not a number.
        let mut r = Reader::new(call(Dialect::Llamacpp, "m", &relayed_job(cmpl, stream)).unwrap());
        let odd = text(" a", json!({"content": [{"id": -1, "bytes": [32, 97]}]})).to_string();
        assert_eq!(r.relay_event(&odd), None);
        assert_eq!(read(&mut r, serde_json::from_str(&odd).unwrap()).2, Vec::<u32>::new());
    }

    fn reader_for_completions() -> Reader {
        let body = json!({"model": "m", "prompt": "p", "max_tokens": 5});
        Reader::new(
            call(Dialect::Vllm, "m", &relayed_job(pb::OpenAiEndpoint::Completions, body)).unwrap(),
        )
    }

    /// What a reader passes on for one event: its text, tokens, ids, prompt ids, and the
    /// event the client gets (if any).
    fn read(r: &mut Reader, event: Value) -> (String, u32, Vec<u32>, Vec<u32>, Option<Value>) {
        match r.event(&event.to_string()) {
            Step::Output(Some(Output::Text {
                text,
                tokens,
                events,
                token_ids,
                prompt_token_ids,
                ..
            })) => {
                let relayed = events.first().map(|e| serde_json::from_str(e).unwrap());
                (text, tokens, token_ids, prompt_token_ids, relayed)
            }
            other => panic!("{other:?}"),
        }
    }

    /// `j` moved after `tokens` tokens of `text`, whose engine reported `ids` of them.
    fn moved(mut j: Job, text: &str, tokens: u32, ids: &[u32], prompt_ids: &[u32]) -> Job {
        j.continuation = Some(pb::Continuation {
            text: text.into(),
            tokens,
            token_ids: ids.to_vec(),
            prompt_token_ids: prompt_ids.to_vec(),
        });
        j.params.max_tokens = 256 - j.continuation.as_ref().unwrap().tokens;
        j
    }

    #[test]
    fn a_vllm_completion_continues_from_its_prompts_ids_and_its_own() {
        let body = json!({"model": "m", "prompt": "hello", "stream": true, "max_tokens": 256});
        let j = relayed_job(pb::OpenAiEndpoint::Completions, body);
        let c = call(Dialect::Vllm, "m", &j).unwrap();
        assert_eq!(c.body["return_token_ids"], true, "asked for on the client's behalf");
        assert_eq!(c.ids, Some(Ids { from: IdsIn::TokenIds, added: true }));
        let mut r = Reader::new(c);
        let first = json!({"id": "x", "object": "text_completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "text": " a", "finish_reason": null, "prompt_token_ids": [5, 6], "token_ids": [9]}]});
        let (text, tokens, ids, prompt, seen) = read(&mut r, first);
        assert_eq!((text.as_str(), tokens, ids, prompt), (" a", 1, vec![9], vec![5, 6]));
        let seen = seen.unwrap();
        assert!(seen["choices"][0]["token_ids"].is_null(), "as vLLM writes them unasked: {seen}");
        assert!(seen["choices"][0]["prompt_token_ids"].is_null(), "{seen}");
        // Text the engine holds back (an incomplete character): its ids wait for it.
        let held = json!({"choices": [{"index": 0, "text": "", "finish_reason": null, "prompt_token_ids": null, "token_ids": [10]}]});
        assert_eq!(read(&mut r, held).1, 0);
        let both = json!({"choices": [{"index": 0, "text": "é", "finish_reason": null, "prompt_token_ids": null, "token_ids": [11]}]});
        let (_, tokens, ids, prompt, _) = read(&mut r, both);
        assert_eq!((tokens, ids, prompt), (2, vec![10, 11], vec![]));

        // Moved: the prompt is the ids, exactly; the client never sees the new prompt's ids.
        let c =
            call(Dialect::Vllm, "m", &moved(j.clone(), " aé", 3, &[9, 10, 11], &[5, 6])).unwrap();
        assert_eq!(c.body["prompt"], json!([5, 6, 9, 10, 11]));
        assert_eq!(c.body["max_tokens"], 253);
        // Without every id, or without the prompt's: from the text.
        let c = call(Dialect::Vllm, "m", &moved(j.clone(), " aé", 3, &[9], &[5, 6])).unwrap();
        assert_eq!(c.body["prompt"], "hello aé");
        let c = call(Dialect::Sglang, "m", &moved(j.clone(), " aé", 3, &[9, 10, 11], &[])).unwrap();
        assert_eq!(c.body["prompt"], "hello aé");
        // SGLang leaves unasked ids out rather than null.
        let c = call(Dialect::Sglang, "m", &moved(j, " aé", 3, &[9, 10, 11], &[5, 6])).unwrap();
        assert_eq!(c.body["prompt"], json!([5, 6, 9, 10, 11]));
        let mut r = Reader::new(c);
        let ev = json!({"choices": [{"index": 0, "text": " b", "finish_reason": null, "prompt_token_ids": [5, 6, 9, 10, 11], "token_ids": [12]}]});
        let (_, _, ids, prompt, seen) = read(&mut r, ev);
        assert_eq!(
            (ids, prompt),
            (vec![12], vec![]),
            "a continued call's prompt is not the client's"
        );
        let choice = seen.unwrap()["choices"][0].clone();
        assert!(choice.get("token_ids").is_none() && choice.get("prompt_token_ids").is_none());
    }

    #[test]
    fn token_ids_are_asked_for_only_where_a_continuation_can_use_them() {
        let asks = |dialect, endpoint, body: Value| {
            call(dialect, "m", &relayed_job(endpoint, body)).unwrap().ids.is_some()
        };
        let cmpl = pb::OpenAiEndpoint::Completions;
        let chat = pb::OpenAiEndpoint::ChatCompletions;
        let msgs = json!([{"role": "user", "content": "hi"}]);
        assert!(!asks(Dialect::Vllm, cmpl, json!({"prompt": "p"})), "not streamed");
        assert!(
            !asks(Dialect::Vllm, cmpl, json!({"prompt": "p", "stream": true, "stop": ["x"]})),
            "stop strings hold text back"
        );
        assert!(!asks(Dialect::Vllm, cmpl, json!({"prompt": "p", "stream": true, "echo": true})));
        assert!(!asks(Dialect::Vllm, cmpl, json!({"prompt": [1, 2], "stream": true})));
        assert!(!asks(Dialect::Other, cmpl, json!({"prompt": "p", "stream": true})));
        assert!(asks(Dialect::Vllm, cmpl, json!({"prompt": ["p"], "stream": true, "stop": []})));
        assert!(asks(Dialect::Vllm, chat, json!({"messages": msgs, "stream": true})));
        assert!(!asks(Dialect::Sglang, chat, json!({"messages": msgs, "stream": true})));
        for shaping in [
            json!({"tools": [{"type": "function", "function": {"name": "f"}}]}),
            json!({"response_format": {"type": "json_object"}}),
            json!({"logprobs": true}),
            json!({"n": 2}),
        ] {
            let mut body = json!({"messages": msgs, "stream": true});
            body.as_object_mut().unwrap().extend(shaping.as_object().unwrap().clone());
            assert!(!asks(Dialect::Vllm, chat, body.clone()), "{body}");
        }
        let image = json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]);
        assert!(!asks(Dialect::Vllm, chat, json!({"messages": image, "stream": true})));
        assert!(asks(
            Dialect::Vllm,
            chat,
            json!({"messages": msgs, "stream": true, "response_format": {"type": "text"}})
        ));
        // A client that asked keeps what it asked for: on llama.cpp, log-probabilities over
        // the whole vocabulary.
        for (endpoint, body) in [
            (cmpl, json!({"prompt": "p", "stream": true, "logprobs": 2})),
            (chat, json!({"messages": msgs, "stream": true, "logprobs": true, "top_logprobs": 2})),
        ] {
            let c = call(Dialect::Llamacpp, "m", &relayed_job(endpoint, body)).unwrap();
            assert_eq!(c.ids, Some(Ids { from: IdsIn::Logprobs, added: false }));
            assert!(c.body.get("post_sampling_probs").is_none(), "{}", c.body);
        }
        let c = call(
            Dialect::Vllm,
            "m",
            &relayed_job(cmpl, json!({"prompt": "p", "stream": true, "return_token_ids": true})),
        )
        .unwrap();
        assert_eq!(c.ids, Some(Ids { from: IdsIn::TokenIds, added: false }));
        let mut r = Reader::new(c);
        let ev = json!({"choices": [{"index": 0, "text": " a", "prompt_token_ids": [5], "token_ids": [9]}]});
        let seen = read(&mut r, ev).4.unwrap();
        assert_eq!(
            (
                seen["choices"][0]["prompt_token_ids"].clone(),
                seen["choices"][0]["token_ids"].clone()
            ),
            (json!([5]), json!([9]))
        );
    }

    #[test]
    fn a_vllm_chat_continues_as_a_completion_of_its_templated_ids_and_reads_as_a_chat() {
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true,
            "max_completion_tokens": 256, "temperature": 0, "chat_template_kwargs": {"x": 1}});
        let j = relayed_job(pb::OpenAiEndpoint::ChatCompletions, body.clone());
        let mut r = Reader::new(call(Dialect::Vllm, "m", &j).unwrap());
        let role = json!({"id": "x", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}], "prompt_token_ids": [1, 2, 3]});
        let (_, tokens, _, prompt, seen) = read(&mut r, role);
        assert_eq!((tokens, prompt), (0, vec![1, 2, 3]));
        assert!(seen.unwrap()["prompt_token_ids"].is_null());

        let c =
            call(Dialect::Vllm, "m", &moved(j.clone(), " a b", 2, &[7, 8], &[1, 2, 3])).unwrap();
        assert_eq!(c.path, "/v1/completions");
        assert!(c.as_chat);
        let b = c.body.as_object().unwrap();
        assert_eq!(b["prompt"], json!([1, 2, 3, 7, 8]));
        assert_eq!((b["max_tokens"].clone(), b["temperature"].clone()), (json!(254), json!(0)));
        assert_eq!(b["return_token_ids"], true);
        for gone in ["messages", "max_completion_tokens", "chat_template_kwargs"] {
            assert!(!b.contains_key(gone), "{gone}");
        }
        let mut r = Reader::new(c);
        let ev = json!({"id": "cmpl-y", "object": "text_completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "text": " c", "finish_reason": "length", "stop_reason": null, "prompt_token_ids": [1, 2, 3, 7, 8], "token_ids": [9]}]});
        let (text, tokens, ids, prompt, seen) = read(&mut r, ev);
        assert_eq!((text.as_str(), tokens, ids, prompt), (" c", 1, vec![9], vec![]));
        let seen = seen.unwrap();
        assert_eq!(seen["object"], "chat.completion.chunk");
        assert_eq!(seen["id"], "chatcmpl-1");
        assert_eq!(seen["choices"][0]["delta"], json!({"content": " c"}));
        assert_eq!(seen["choices"][0]["finish_reason"], "length");
        assert!(
            seen["choices"][0].get("text").is_none() && seen["choices"][0]["token_ids"].is_null()
        );

        // A gRPC chat: the prompt's ids go up with the first text.
        let chat = Input::Chat(vec![pb::ChatMessage { role: "user".into(), content: "hi".into() }]);
        let params = pb::SamplingParams { max_tokens: 8, ..Default::default() };
        let mut r = Reader::new(call(Dialect::Vllm, "m", &job(None, chat, params)).unwrap());
        let role = json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}], "prompt_token_ids": [1, 2]});
        assert_eq!(r.event(&role.to_string()), Step::Output(None), "nothing for the client");
        let ev = json!({"choices": [{"index": 0, "delta": {"content": " a"}, "token_ids": [7]}]});
        let (text, _, ids, prompt, _) = read(&mut r, ev);
        assert_eq!((text.as_str(), ids, prompt), (" a", vec![7], vec![1, 2]));

        // A chat whose answer the engine shapes (reasoning) stops giving ids; one with tools
        // never asks; both continue from their text.
        let mut r = Reader::new(call(Dialect::Vllm, "m", &j).unwrap());
        let think = json!({"choices": [{"index": 0, "delta": {"reasoning_content": "hm"}, "token_ids": [4]}]});
        let (_, tokens, ids, _, _) = read(&mut r, think);
        assert_eq!((tokens, ids), (1, vec![]), "counted, with no id: the ids no longer cover it");
        let c = call(Dialect::Vllm, "m", &moved(j, " a b", 2, &[], &[1, 2, 3])).unwrap();
        assert_eq!(c.path, "/v1/chat/completions");
        assert_eq!(c.body["continue_final_message"], true);
        assert_eq!(c.body["messages"][1], json!({"role": "assistant", "content": " a b"}));
    }

    #[test]
    fn a_llama_cpp_chat_continues_after_its_template_from_the_ids_its_log_probabilities_carry() {
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true, "max_tokens": 256});
        let j = relayed_job(pb::OpenAiEndpoint::ChatCompletions, body);
        let c = call(Dialect::Llamacpp, "m", &j).unwrap();
        assert_eq!(
            (c.body["logprobs"].clone(), c.body["top_logprobs"].clone()),
            (json!(true), json!(1))
        );
        assert_eq!(
            c.body["post_sampling_probs"], true,
            "the sampler's, not the whole vocabulary's"
        );
        let mut r = Reader::new(c);
        // The sampler's probabilities, as llama.cpp sends them with `post_sampling_probs`.
        let token = |id: u32, text: &str, piece: &str| {
            let b: Vec<u8> = text.bytes().collect();
            let p: Vec<u8> = piece.bytes().collect();
            json!({"choices": [{"index": 0, "delta": {"content": text}, "logprobs": {"content": [
                {"id": id, "token": text, "bytes": b, "prob": 0.9, "top_probs": [{"id": id, "token": piece, "bytes": p, "prob": 0.9}]}]}}]})
        };
        let (_, tokens, ids, _, seen) = read(&mut r, token(9, " a", " a"));
        assert_eq!((tokens, ids), (1, vec![9]));
        assert!(
            seen.unwrap()["choices"][0]["logprobs"].is_null(),
            "log-probabilities it did not ask for"
        );
        // A token the engine sent no event for (an incomplete character): the next event's text
        // is more than its own token's, so the ids no longer cover the text.
        let (_, tokens, ids, _, _) = read(&mut r, token(10, "é b", " b"));
        assert_eq!((tokens, ids), (1, vec![]));
        assert_eq!(template_body(Dialect::Llamacpp, "m", &j).unwrap(), None, "not moved");
        let m = moved(j, " a", 1, &[9], &[]);
        let sent = template_body(Dialect::Llamacpp, "m", &m).unwrap().unwrap();
        assert_eq!(sent["messages"], json!([{"role": "user", "content": "hi"}]));
        let c = call_with_template(Dialect::Llamacpp, "m", &m, Some("<user>hi<bot>")).unwrap();
        assert_eq!(c.path, "/v1/completions");
        assert_eq!(c.body["prompt"], json!(["<user>hi<bot>", 9]));
        assert_eq!(
            (c.body["logprobs"].clone(), c.body["post_sampling_probs"].clone()),
            (json!(1), json!(true))
        );
        assert!(c.body.get("top_logprobs").is_none() && c.body.get("messages").is_none());
        // Without the template, from the text: llama.cpp continues a final assistant message.
        let c = call(Dialect::Llamacpp, "m", &m).unwrap();
        assert_eq!(c.path, "/v1/chat/completions");
        assert_eq!(c.body["messages"][1], json!({"role": "assistant", "content": " a"}));
        assert!(c.body.get("continue_final_message").is_none());
        // The continuation's own role chunk: the client had one at the start.
        let mut r = Reader::new(c);
        let role = json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": null}, "finish_reason": null}]});
        assert_eq!(r.event(&role.to_string()), Step::Output(None));
        assert_eq!(read(&mut r, token(11, " c", " c")).0, " c");
    }
}
