//! Talking to an engine's OpenAI-compatible HTTP API: the request a job becomes (the client's
//! own body with only `model` rewritten, or, for a gRPC request, a body built from its sampling
//! parameters), and the engine's answer read back — server-sent events through a maintained
//! parser (UTF-8 and CRLF safe), or one JSON body — into outputs. The engine's events go up
//! unchanged but for `id`, `model` and `created`, which sllm sets so that every answer of a
//! request agrees with itself across retries.
//!
//! It never invents sampling fields: what the client did not send, the engine decides, with one
//! exception written down in docs/engines.md — a request without `max_tokens` gets the limit
//! Dispatch enforces, so that no engine runs to its context length on a default.

use std::time::Duration;

use eventsource_stream::Eventsource;
use futures::{Stream, StreamExt};
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
    /// Whether to read the generated tokens' ids (a llama.cpp completion stream, whose
    /// log-probabilities carry them), and whether sllm asked for those log-probabilities itself
    /// (so the client, who did not, never sees them).
    pub ids: Option<IdsFrom>,
}

/// How a [`Call`] learns its tokens' ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdsFrom {
    /// From log-probabilities the client asked for too.
    ClientLogprobs,
    /// From log-probabilities sllm added to the request: removed before the client sees them.
    AddedLogprobs,
}

/// Asks a llama.cpp completion stream for its tokens' ids (carried by its log-probabilities), so
/// that a stream that moves continues from them exactly.
pub fn ask_for_token_ids(dialect: Dialect, call: &mut Call) {
    let Some(body) = call.body.as_object_mut() else { return };
    let completion =
        call.path == "/v1/completions" && body.get("prompt").is_some_and(Value::is_string);
    if dialect != Dialect::Llamacpp || !call.stream || !completion {
        return;
    }
    let asked = body.get("logprobs").is_some_and(|l| l.as_u64().is_some_and(|n| n > 0));
    if asked {
        call.ids = Some(IdsFrom::ClientLogprobs);
    } else {
        body.insert("logprobs".into(), json!(1));
        call.ids = Some(IdsFrom::AddedLogprobs);
    }
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
}

fn invalid(field: &str, why: impl std::fmt::Display) -> Failure {
    Failure::unsupported(field, why)
}

/// The request `job` becomes for an engine that serves the model as `served`.
pub fn call(dialect: Dialect, served: &str, job: &Job) -> Result<Call, Failure> {
    let mut call = match &job.openai {
        Some(o) => relayed(served, job, o)?,
        None => built(dialect, served, job)?,
    };
    if let Some(c) = &job.continuation {
        // Ids only when they cover the whole text.
        let ids = if c.token_ids.len() == c.tokens as usize { &c.token_ids[..] } else { &[] };
        continue_after(dialect, &mut call, &c.text, ids, job.params.max_tokens)?;
        call.continued = c.tokens;
    }
    Ok(call)
}

/// Makes `call` continue a generation that produced `text` elsewhere (the request moved here
/// from a lost or draining instance), with `left` tokens to go: a completion's prompt gets the
/// text appended; a chat gets it as a final assistant message that the engine continues
/// (vLLM's and SGLang's `continue_final_message`; llama.cpp's server continues a final
/// assistant message by itself).
fn continue_after(
    dialect: Dialect,
    call: &mut Call,
    text: &str,
    ids: &[u32],
    left: u32,
) -> Result<(), Failure> {
    let Some(body) = call.body.as_object_mut() else {
        return Err(invalid("body", "must be a JSON object"));
    };
    let cannot = |field: &str| {
        invalid(field, "a prompt of token ids cannot be continued on another instance")
    };
    if let Some(messages) = body.get_mut("messages").and_then(Value::as_array_mut) {
        messages.push(json!({ "role": "assistant", "content": text }));
        if dialect != Dialect::Llamacpp {
            body.insert("continue_final_message".into(), Value::Bool(true));
            body.insert("add_generation_prompt".into(), Value::Bool(false));
        }
    } else {
        match body.get_mut("prompt") {
            // The engine takes a prompt of text then ids (llama.cpp's mixed prompts): the
            // continuation starts from exactly the tokens generated.
            Some(Value::String(p)) if !ids.is_empty() && dialect == Dialect::Llamacpp => {
                let mut mixed = vec![Value::String(std::mem::take(p))];
                mixed.extend(ids.iter().map(|i| json!(i)));
                body.insert("prompt".into(), Value::Array(mixed));
            }
            Some(Value::String(p)) => p.push_str(text),
            Some(Value::Array(items)) => match items.as_mut_slice() {
                [Value::String(p)] => p.push_str(text),
                _ => return Err(cannot("prompt")),
            },
            _ => return Err(cannot("prompt")),
        }
    }
    let key = if body.contains_key("max_completion_tokens") {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    body.insert(key.into(), json!(left));
    call.max_tokens = left;
    Ok(())
}

/// An OpenAI client's body, passed on with `model` rewritten.
fn relayed(served: &str, job: &Job, o: &pb::OpenAiRequest) -> Result<Call, Failure> {
    let mut body: Map<String, Value> = match serde_json::from_str(&o.body) {
        Ok(Value::Object(m)) => m,
        Ok(_) => return Err(invalid("body", "must be a JSON object")),
        Err(e) => return Err(invalid("body", format!("not JSON: {e}"))),
    };
    body.insert("model".into(), Value::String(served.to_string()));
    // ServerlessLLM's adapter field is sllm's to read (it became the job's adapter); no engine
    // knows it.
    body.remove("lora_adapter_name");
    if o.endpoint == pb::OpenAiEndpoint::Embeddings as i32 {
        // One JSON answer, no tokens to bound.
        return Ok(Call {
            path: "/v1/embeddings",
            body: Value::Object(body),
            stream: false,
            relay: Some(Relay {
                id: o.response_id.clone(),
                created: o.created,
                model: o.model.clone(),
                include_usage: false,
            }),
            logprobs: false,
            max_tokens: job.params.max_tokens,
            continued: 0,
            ids: None,
        });
    }
    if !body.contains_key("max_tokens") && !body.contains_key("max_completion_tokens") {
        body.insert("max_tokens".into(), json!(job.params.max_tokens));
    }
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let mut include_usage = false;
    if stream {
        // The engine always reports usage (sllm counts tokens from it); the client sees the
        // usage event only if it asked for one.
        let options = body.entry("stream_options").or_insert_with(|| json!({}));
        if let Some(options) = options.as_object_mut() {
            include_usage = options.get("include_usage").and_then(Value::as_bool).unwrap_or(false);
            options.insert("include_usage".into(), Value::Bool(true));
        }
    }
    let path = match pb::OpenAiEndpoint::try_from(o.endpoint) {
        Ok(pb::OpenAiEndpoint::ChatCompletions) => "/v1/chat/completions",
        _ => "/v1/completions",
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
        }),
        logprobs: false,
        max_tokens: job.params.max_tokens,
        continued: 0,
        ids: None,
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
    counted: u32,
    finish: Option<Finish>,
    /// `id`, `model` and `created` of a relayed answer, as JSON values, written once.
    stamps: (String, String, String),
}

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
        Reader { call, prompt_tokens: 0, completion_tokens: None, counted: 0, finish: None, stamps }
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
            if let Some(n) = u.get("prompt_tokens").and_then(Value::as_u64) {
                self.prompt_tokens = n as u32;
            }
            if let Some(n) = u.get("completion_tokens").and_then(Value::as_u64) {
                self.completion_tokens = Some(n as u32);
            }
        }
    }

    /// Sets sllm's `id`, `model` and `created` on an answer for an OpenAI client (an
    /// embeddings list has no `id` or `created`: only its `model`).
    fn stamp(relay: &Relay, v: &mut Value) {
        if let Some(m) = v.as_object_mut() {
            if m.get("object").and_then(Value::as_str) != Some("list") {
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
        if let Some(step) = self.relay_event(data) {
            return step;
        }
        let mut v: Value = match serde_json::from_str(data) {
            Ok(v) => v,
            Err(e) => {
                return Step::Failed(Failure::new(
                    FailureKind::Engine,
                    format!("the engine sent an event that is not JSON ({e}): {data:.200}"),
                ));
            }
        };
        if is_error(&v) {
            let message = error_message(data);
            return Step::Failed(Failure {
                kind: FailureKind::Engine,
                message: format!("the engine reported an error: {message}"),
                http_status: 0,
                body: data.to_string(),
            });
        }
        self.take_usage(&mut v);
        let choice = v.get("choices").and_then(|c| c.get(0));
        let mut text = String::new();
        let mut content = false;
        let mut logprobs = Vec::new();
        let mut token_ids = Vec::new();
        if let Some(c) = choice {
            if self.call.ids.is_some() {
                token_ids = c
                    .get("logprobs")
                    .and_then(|l| l.get("content"))
                    .and_then(Value::as_array)
                    .map(|items| {
                        items
                            .iter()
                            .filter_map(|t| t.get("id")?.as_u64())
                            .map(|i| i as u32)
                            .collect()
                    })
                    .unwrap_or_default();
            }
            let delta = c.get("delta");
            let piece = c
                .get("text")
                .and_then(Value::as_str)
                .or_else(|| delta.and_then(|d| d.get("content")).and_then(Value::as_str));
            if let Some(t) = piece {
                text.push_str(t);
            }
            content = !text.is_empty()
                || delta.is_some_and(|d| {
                    ["tool_calls", "reasoning_content", "reasoning"]
                        .iter()
                        .any(|k| d.get(*k).is_some_and(|x| !x.is_null()))
                });
            if let Some(f) = c.get("finish_reason").and_then(Value::as_str) {
                self.finish = Some(finish_of(f));
            }
            if self.call.logprobs {
                logprobs = token_logprobs(c.get("logprobs"));
            }
        }
        let tokens = u32::from(content);
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
            if self.call.ids == Some(IdsFrom::AddedLogprobs)
                && let Some(c) = v.get_mut("choices").and_then(|c| c.get_mut(0))
                && let Some(c) = c.as_object_mut()
            {
                c.insert("logprobs".into(), Value::Null);
            }
            Self::stamp(relay, &mut v);
            events.push(v.to_string());
        } else if text.is_empty() && logprobs.is_empty() {
            return Step::Output(None);
        }
        Step::Output(Some(Output::Text { text, tokens, events, logprobs, token_ids }))
    }

    /// Reads one event of an OpenAI client's stream without building a JSON tree: the event's
    /// top-level fields are kept as the engine wrote them (only `id`, `model` and `created` are
    /// set, `usage` dropped when the client did not ask for it, and log-probabilities sllm asked
    /// for itself set to null), and the few fields sllm reads are borrowed from it. This is the
    /// request path's per-token work, so it allocates only the event it passes on.
    ///
    /// None: an event it does not read this way (an error report, a continued answer whose usage
    /// is rewritten, JSON it cannot borrow from), which [`Reader::event`] reads in full instead.
    fn relay_event(&mut self, data: &str) -> Option<Step> {
        let relay = self.call.relay.as_ref()?;
        if self.call.continued > 0 {
            return None;
        }
        let top: fast::Top<'_> = serde_json::from_str(data).ok()?;
        let mut choices = None;
        let mut usage = None;
        let mut list = false;
        for (k, v) in &top.0 {
            match *k {
                "error" if v.get() != "null" => return None,
                "object" => match v.get() {
                    "\"error\"" => return None,
                    "\"list\"" => list = true,
                    _ => {}
                },
                "choices" => choices = Some(*v),
                "usage" if v.get() != "null" => usage = Some(*v),
                _ => {}
            }
        }
        let parsed: Vec<fast::Choice<'_>> = match choices {
            Some(c) => serde_json::from_str(c.get()).ok()?,
            None => Vec::new(),
        };
        let usage: Option<fast::Usage> = match usage {
            Some(u) => Some(serde_json::from_str(u.get()).ok()?),
            None => None,
        };
        if let Some(u) = &usage {
            if let Some(n) = u.prompt_tokens {
                self.prompt_tokens = n as u32;
            }
            if let Some(n) = u.completion_tokens {
                self.completion_tokens = Some(n as u32);
            }
        }
        let mut token_ids = Vec::new();
        let mut text = String::new();
        let mut content = false;
        if let Some(c) = parsed.first() {
            if self.call.ids.is_some() {
                let lp: Option<fast::Logprobs> = match c.logprobs {
                    Some(l) => serde_json::from_str(l.get()).ok()?,
                    None => None,
                };
                token_ids = lp
                    .and_then(|l| l.content)
                    .map(|items| items.iter().filter_map(|t| t.id).map(|i| i as u32).collect())
                    .unwrap_or_default();
            }
            let piece = c.text.as_deref().or_else(|| c.delta.as_ref()?.content.as_deref());
            if let Some(t) = piece {
                text.push_str(t);
            }
            content = !text.is_empty() || c.delta.as_ref().is_some_and(fast::Delta::has_output);
            if let Some(f) = c.finish_reason.as_deref() {
                self.finish = Some(finish_of(f));
            }
        }
        let tokens = u32::from(content);
        self.counted += tokens;
        if !relay.include_usage && usage.is_some() && parsed.is_empty() {
            // The usage event sllm asked for on the client's behalf.
            return Some(Step::Output(None));
        }
        // The event as the client gets it, its fields in the engine's order.
        let mut out = String::with_capacity(data.len() + relay.id.len() + relay.model.len());
        let field = |out: &mut String, k: &str, v: &str| {
            out.push(if out.is_empty() { '{' } else { ',' });
            out.push('"');
            out.push_str(k);
            out.push_str("\":");
            out.push_str(v);
        };
        let (id, model, created) = &self.stamps;
        let (mut has_id, mut has_created, mut has_model) = (list, list, false);
        for (k, v) in &top.0 {
            match *k {
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
                "usage" if !relay.include_usage => {}
                "choices" if self.call.ids == Some(IdsFrom::AddedLogprobs) => {
                    field(&mut out, k, &fast::null_first_logprobs(v.get(), &parsed));
                }
                _ => field(&mut out, k, v.get()),
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
        Some(Step::Output(Some(Output::Text {
            text,
            tokens,
            events: vec![out],
            logprobs: Vec::new(),
            token_ids,
        })))
    }

    /// Reads a whole (not streamed) answer: its output, then its end.
    pub fn body(&mut self, body: &str) -> Result<(Output, Output), Failure> {
        let mut v: Value = serde_json::from_str(body).map_err(|e| {
            Failure::new(FailureKind::Engine, format!("the engine's answer is not JSON: {e}"))
        })?;
        if is_error(&v) {
            return Err(Failure {
                kind: FailureKind::Engine,
                message: format!("the engine reported an error: {}", error_message(body)),
                http_status: 0,
                body: body.to_string(),
            });
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
        let token_ids = Vec::new();
        Ok((Output::Text { text, tokens, events, logprobs, token_ids }, self.done()))
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

    /// An event's top-level fields in the engine's order, each value as written.
    pub(super) struct Top<'a>(pub(super) Vec<(&'a str, &'a RawValue)>);

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
        #[serde(borrow)]
        pub(super) text: Option<Cow<'a, str>>,
        #[serde(borrow)]
        pub(super) delta: Option<Delta<'a>>,
        #[serde(borrow)]
        pub(super) finish_reason: Option<Cow<'a, str>>,
        #[serde(borrow)]
        pub(super) logprobs: Option<&'a RawValue>,
    }

    #[derive(Deserialize)]
    pub(super) struct Delta<'a> {
        #[serde(borrow)]
        pub(super) content: Option<Cow<'a, str>>,
        #[serde(borrow)]
        tool_calls: Option<&'a RawValue>,
        #[serde(borrow)]
        reasoning_content: Option<&'a RawValue>,
        #[serde(borrow)]
        reasoning: Option<&'a RawValue>,
    }

    impl Delta<'_> {
        /// Whether the delta carries output other than content (a tool call, reasoning).
        pub(super) fn has_output(&self) -> bool {
            self.tool_calls.is_some() || self.reasoning_content.is_some() || self.reasoning.is_some()
        }
    }

    #[derive(Deserialize)]
    pub(super) struct Usage {
        pub(super) prompt_tokens: Option<u64>,
        pub(super) completion_tokens: Option<u64>,
    }

    #[derive(Deserialize)]
    pub(super) struct Logprobs {
        pub(super) content: Option<Vec<TokenId>>,
    }

    #[derive(Deserialize)]
    pub(super) struct TokenId {
        pub(super) id: Option<u64>,
    }

    /// `choices` (as written) with the first choice's `logprobs` replaced by null: the span of
    /// that value is found by its place in the text it was borrowed from.
    pub(super) fn null_first_logprobs(choices: &str, parsed: &[Choice<'_>]) -> String {
        let Some(lp) = parsed.first().and_then(|c| c.logprobs) else {
            return choices.to_string();
        };
        let Some(start) = (lp.get().as_ptr() as usize).checked_sub(choices.as_ptr() as usize) else {
            return choices.to_string();
        };
        let end = start + lp.get().len();
        match (choices.get(..start), choices.get(end..)) {
            (Some(before), Some(after)) => format!("{before}null{after}"),
            _ => choices.to_string(),
        }
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
}
