//! One request's life: validated, routed (or held until an instance is ready), sent down the
//! chosen worker's Attach stream, streamed back; retried elsewhere if the worker fails before
//! the first token; cancelled on the worker when the client goes away.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use sllm_api::v1 as pb;
use telemetry::trace::{Kind, Span};
use tokio::sync::mpsc;

use crate::error::DispatchError;
use crate::room::{Refused, Slot, Ticket};
use crate::stack::{self, Fault, Retry, Verdict};
use crate::table::{FromWorker, Inbox, ModelRoute, Routable, WorkerLink};
use crate::{Dispatch, Inner};

/// Every outcome label a request can end with (the `model, outcome` metric series).
pub(crate) const OUTCOMES: &[&str] = &[
    "ok",
    "cancelled",
    "deadline",
    "invalid",
    "not_found",
    "deleting",
    "unplaceable",
    "queue_full",
    "rate_limited",
    "unavailable",
    "engine_stalled",
    "engine_error",
];

/// What to generate from.
#[derive(Debug, Clone)]
pub enum Input {
    /// A completion prompt.
    Prompt(String),
    /// A chat conversation.
    Chat(pb::ChatMessages),
}

/// An inference request as both client protocols hand it over.
#[derive(Debug, Clone)]
pub struct Job {
    /// The request's id, shown to its client (the OpenAI `id`; the gRPC `x-request-id`
    /// response header) and recorded on its span and in its log lines. A UUIDv7: ids sort by
    /// arrival.
    pub id: String,
    /// Deployment name (`name:backend` accepted).
    pub model: String,
    /// Input.
    pub input: Input,
    /// Sampling and limits.
    pub params: pb::SamplingParams,
    /// Stream progress events while held.
    pub progress: bool,
    /// When the client gives up (its own deadline), if it said. Waiting for an instance is
    /// also bounded by `DispatchConfig::max_hold`, whichever comes first.
    pub deadline: Option<Instant>,
    /// The caller's W3C trace context (gRPC metadata or HTTP header); the request's spans join
    /// its trace.
    pub traceparent: String,
    /// The caller's W3C baggage, passed on to an engine with the trace context ('' if none).
    pub baggage: String,
    /// Name of the entry point, for the request's span (e.g. `sllm.v1.Dispatch/Generate`).
    pub entry: &'static str,
    /// The client's OpenAI request, which an engine gets as it is (HTTP API requests only).
    pub openai: Option<pb::OpenAiRequest>,
    /// A LoRA adapter named apart from `model` (ServerlessLLM's `lora_adapter_name`).
    pub adapter_name: Option<String>,
    /// The LoRA adapter the request resolved to (set by `submit`).
    pub adapter: Option<pb::LoraAdapter>,
    /// Sequences the engine generates for it, each up to max_tokens: an OpenAI request's `n`
    /// times its prompts (a batch); 1 otherwise.
    pub choices: u32,
}

/// What the client receives.
#[derive(Debug, Clone)]
pub enum Event {
    /// Cold-start progress.
    Progress(pb::Progress),
    /// An engine accepted the request: an OpenAI stream's head may go to the client, as a
    /// gateway in front of the engine would send it. At most once, before any chunk; gRPC
    /// clients are not told.
    Started,
    /// Output text.
    Chunk {
        /// Text.
        text: String,
        /// Tokens in it.
        tokens: u32,
        /// The engine's own OpenAI events for it, to relay as they are (empty when the
        /// backend has none: the OpenAI shape is then written from `text`).
        events: Vec<String>,
        /// Log-probabilities of its tokens (gRPC requests that asked).
        logprobs: Vec<pb::TokenLogprob>,
        /// Times the stream moved to another instance before this text: the OpenAI API says
        /// so on its last events.
        migrations: u32,
    },
    /// The end.
    Finished {
        /// Why.
        reason: pb::FinishReason,
        /// Counts and timings.
        usage: pb::Usage,
    },
}

/// The stream of a submitted request.
///
/// The request's driver runs inside it, polled by whoever reads the events: one task fewer per
/// request, and no wake-up of another task per event. A reader that goes away before the end
/// leaves the driver to finish in a task of its own, where it sees the reader gone and cancels
/// the request on its worker, as it always has.
pub struct Events {
    rx: mpsc::Receiver<Result<Event, DispatchError>>,
    driver: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl Events {
    /// The next event; `None` once the request has ended and every event was read.
    pub async fn recv(&mut self) -> Option<Result<Event, DispatchError>> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Event, DispatchError>>> {
        if let Some(driver) = &mut self.driver
            && driver.as_mut().poll(cx).is_ready()
        {
            self.driver = None;
        }
        self.rx.poll_recv(cx)
    }
}

impl futures::Stream for Events {
    type Item = Result<Event, DispatchError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_recv(cx)
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        // Outside a runtime (the process is ending) the driver ends here, unrun.
        if let Some(driver) = self.driver.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(driver);
        }
    }
}

enum Attempt {
    Done,
    ClientGone,
    Deadline,
    /// It failed; [`Fault`] says whose fault, and so whether it is retried.
    Failed(Fault),
}

impl Dispatch {
    /// Validates and admits a request. Errors that need no waiting (bad input, unknown model,
    /// full queue) come back here, before any output; the rest arrive on the stream.
    pub async fn submit(&self, job: Job) -> Result<Events, DispatchError> {
        // The GenAI conventions' names: a Responses API request is a chat.
        let operation = match job.entry {
            "POST /v1/embeddings" | "sllm.v1.Dispatch/Embed" => "embeddings",
            crate::openai::TOKENIZE_ENTRY => "tokenize",
            crate::openai::DETOKENIZE_ENTRY => "detokenize",
            crate::openai::RERANK_ENTRY | crate::openai::GRPC_RERANK_ENTRY => "rerank",
            crate::openai::RESPONSES_ENTRY => "chat",
            _ if matches!(job.input, Input::Chat(_)) => "chat",
            _ => "text_completion",
        };
        // Sampled out (or no exporter): no span at all, and none below it. The request path's
        // spans are recorded directly, not through `tracing`: a fifth of the cost.
        let mut span = Span::request(job.entry, Kind::Server, &job.traceparent);
        if span.is_recording() {
            span.set("rpc.system", if job.entry.starts_with("sllm.") { "grpc" } else { "http" });
            span.set("gen_ai.operation.name", operation);
            span.set("gen_ai.request.model", &job.model);
            span.set("sllm.request_id", &job.id);
            span.set("gen_ai.request.max_tokens", job.params.max_tokens);
        }
        let model = job.model.clone();
        // Counted from here until its driver ends, so that a drain waits for it.
        let accepted = crate::Accepted::new(&self.inner.requests);
        // On success the request's driver takes the span; on error it is still here.
        let result = self.admit(job, &mut span, accepted).await;
        if let Err(e) = &result {
            let outcome = outcome_of(e);
            span.set("sllm.outcome", outcome);
            let label = if matches!(
                e,
                DispatchError::NotFound(_)
                    | DispatchError::NoAdapter { .. }
                    | DispatchError::Missing(..)
                    | DispatchError::Invalid { .. }
            ) {
                "-"
            } else {
                model.as_str()
            };
            stack::record(label, outcome, None);
        }
        result
    }

    async fn admit(
        &self,
        mut job: Job,
        span: &mut Span,
        accepted: crate::Accepted,
    ) -> Result<Events, DispatchError> {
        let inner = &self.inner;
        self.resolve_adapter(&mut job).await?;
        validate(&mut job, &inner.config)?;
        let route = match inner.table.model(&job.model) {
            Some(r) => r,
            None => self.confirm_deployed(&job.model).await?,
        };
        if route.deleting.load(Ordering::Relaxed) {
            return Err(DispatchError::Deleting(job.model.clone()));
        }
        let start = Instant::now();
        let adapter = job.adapter.as_ref().map(|a| a.name.clone());
        let first = match inner.table.try_slot(&route, adapter.as_deref()) {
            Some(slot) => Next::Slot(slot),
            None => {
                if let Some(reason) = route.unplaceable()
                    && route.ready_count() == 0
                {
                    return Err(DispatchError::Unplaceable { model: job.model.clone(), reason });
                }
                // The place in the queue is taken here, before the request is accepted: the
                // cap holds however many handlers run at once.
                let ticket = inner
                    .table
                    .enter(&route, HashSet::new(), false, Some(inner.config.max_queue))
                    .map_err(|e| match e {
                        DispatchError::QueueFull { model, queued, .. } => {
                            DispatchError::QueueFull {
                                model,
                                queued,
                                retry_after: inner.config.retry_after,
                            }
                        }
                        e => e,
                    })?;
                Next::Ticket(ticket)
            }
        };
        let hold_deadline = match start.checked_add(inner.config.max_hold) {
            Some(cap) => Some(job.deadline.map_or(cap, |d| d.min(cap))),
            None => job.deadline,
        };
        // Small: the worker's window keeps output coming; this only smooths the writer.
        let (tx, rx) = mpsc::channel(8);
        // The request's spans are parents by hand, not entered at every poll: entering and
        // leaving a span costs more than the rest of a warm request's tracing together.
        let span = std::mem::take(span);
        let driver = Driver {
            inner: inner.clone(),
            route,
            movable: std::sync::OnceLock::new(),
            job,
            tx,
            start,
            hold_deadline,
            span,
            _accepted: accepted,
            attempts: 0,
            migrations: 0,
        };
        Ok(Events { rx, driver: Some(Box::pin(driver.run(first))) })
    }
}

/// How a request's next attempt gets its instance.
enum Next {
    /// A place was free.
    Slot(Slot),
    /// It waits in the queue.
    Ticket(Ticket),
}

/// Backends ServerlessLLM's `name:backend` form names.
const BACKEND_WORDS: &[&str] = &["vllm", "sglang", "llamacpp", "transformers", "sim"];

impl Dispatch {
    /// Resolves what a request names into its deployment (`job.model`) and LoRA adapter
    /// (`job.adapter`): `base`, `base:adapter` (or ServerlessLLM's `name:backend`), an
    /// adapter's name alone when one deployment has it, and `lora_adapter_name` beside any of
    /// them. Demand, limits and routing are then the base model's.
    async fn resolve_adapter(&self, job: &mut Job) -> Result<(), DispatchError> {
        let table = &self.inner.table;
        let mut named = job.adapter_name.take().filter(|n| !n.is_empty());
        let conflict = |named: &Option<String>, other: &str| -> Result<(), DispatchError> {
            match named {
                Some(n) if n != other => Err(DispatchError::invalid(
                    "lora_adapter_name",
                    format!("names adapter {n:?}, but model names {other:?}"),
                )),
                _ => Ok(()),
            }
        };
        if table.model(&job.model).is_none() {
            if let Some((base, suffix)) = job.model.split_once(':') {
                let (base, suffix) = (base.to_string(), suffix.to_string());
                let route = match table.model(&base) {
                    Some(r) => r,
                    None => self.confirm_deployed(&base).await?,
                };
                if route.info().adapters.iter().any(|a| a.name == suffix) {
                    conflict(&named, &suffix)?;
                    named = Some(suffix);
                } else if !BACKEND_WORDS.contains(&suffix.as_str()) {
                    named = Some(suffix);
                }
                job.model = base;
            } else {
                let owners: Vec<String> = table
                    .models()
                    .iter()
                    .filter(|r| !r.deleting.load(Ordering::Relaxed))
                    .filter(|r| r.info().adapters.iter().any(|a| a.name == job.model))
                    .map(|r| r.name.clone())
                    .collect();
                match owners.as_slice() {
                    [] => {}
                    [base] => {
                        conflict(&named, &job.model)?;
                        named = Some(std::mem::replace(&mut job.model, base.clone()));
                    }
                    many => {
                        return Err(DispatchError::invalid(
                            "model",
                            format!(
                                "LoRA adapter {:?} belongs to several models ({}): name it as \
                                 base:adapter",
                                job.model,
                                many.join(", ")
                            ),
                        ));
                    }
                }
            }
        }
        let Some(name) = named else { return Ok(()) };
        let route = match table.model(&job.model) {
            Some(r) => r,
            None => self.confirm_deployed(&job.model).await?,
        };
        let info = route.info();
        match info.adapters.iter().find(|a| a.name == name) {
            Some(a) => {
                job.adapter = Some(pb::LoraAdapter { name: a.name.clone(), path: a.path.clone() });
                Ok(())
            }
            None => Err(DispatchError::NoAdapter {
                model: job.model.clone(),
                adapter: name,
                have: if info.adapters.is_empty() {
                    "none".into()
                } else {
                    info.adapters.iter().map(|a| a.name.as_str()).collect::<Vec<_>>().join(", ")
                },
            }),
        }
    }

    /// A model missing from the table may have been deployed a moment ago (its event not yet
    /// read): one kvstore read settles it before answering NOT_FOUND. Only this miss path reads.
    async fn confirm_deployed(&self, model: &str) -> Result<Arc<ModelRoute>, DispatchError> {
        // A name found unknown a moment ago is not read again (a client retrying a typo must
        // not cost Redis a read per request); its deployment event clears the mark.
        if self.inner.known_unknown(model) {
            return Err(DispatchError::NotFound(model.to_string()));
        }
        match self.inner.store.get_deployment(model).await {
            Ok(Some(d)) => {
                let deleting = d.status == kvstore::DeploymentStatus::Deleting;
                self.inner.table.upsert_model(model, deleting);
                self.inner.table.set_target(model, d.spec.autoscaling.target);
                self.inner.table.set_info(model, crate::table::RouteInfo::of(&d));
                self.inner
                    .table
                    .model(model)
                    .ok_or_else(|| DispatchError::NotFound(model.to_string()))
            }
            Ok(None) => match self.inner.store.model_instances(model).await {
                Ok(running) if !running.is_empty() => {
                    Err(DispatchError::Missing(model.to_string(), running.len()))
                }
                _ => {
                    self.inner.remember_unknown(model);
                    Err(DispatchError::NotFound(model.to_string()))
                }
            },
            Err(e) => {
                tracing::warn!(%model, error = %e, "cannot confirm an unknown model");
                Err(DispatchError::NotFound(model.to_string()))
            }
        }
    }
}

/// The outcome label of a failed request.
fn outcome_of(e: &DispatchError) -> &'static str {
    match e {
        DispatchError::Invalid { .. } => "invalid",
        DispatchError::NotFound(_)
        | DispatchError::NoAdapter { .. }
        | DispatchError::Missing(..) => "not_found",
        DispatchError::Deleting(_) => "deleting",
        DispatchError::Unplaceable { .. } => "unplaceable",
        DispatchError::QueueFull { .. } => "queue_full",
        DispatchError::RateLimited { .. } => "rate_limited",
        DispatchError::Deadline(_) => "deadline",
        DispatchError::Unavailable(_) => "unavailable",
        DispatchError::Engine { code, .. } => match code {
            tonic::Code::InvalidArgument => "invalid",
            tonic::Code::DeadlineExceeded => "engine_stalled",
            _ => "engine_error",
        },
    }
}

pub(crate) fn validate(job: &mut Job, config: &crate::DispatchConfig) -> Result<(), DispatchError> {
    kvstore::names::validate_model_name("model", &job.model).map_err(|e| {
        DispatchError::invalid(
            "model",
            e.to_string().trim_start_matches("invalid model: ").to_string(),
        )
    })?;
    let size = match &job.input {
        Input::Prompt(p) => p.len(),
        Input::Chat(c) => {
            if c.messages.is_empty() {
                return Err(DispatchError::invalid("messages", "must hold at least one message"));
            }
            for (i, m) in c.messages.iter().enumerate() {
                if !matches!(
                    m.role.as_str(),
                    "system" | "user" | "assistant" | "tool" | "developer"
                ) {
                    return Err(DispatchError::invalid(
                        &format!("messages[{i}].role"),
                        format!("{:?} is not one of system, user, assistant, tool", m.role),
                    ));
                }
            }
            c.messages.iter().map(|m| m.content.len()).sum()
        }
    };
    // The Responses API names its prompt and its limit its own way.
    let responses = job.entry == crate::openai::RESPONSES_ENTRY;
    if size > config.max_prompt_bytes {
        return Err(DispatchError::invalid(
            if responses { "input" } else { "prompt" },
            format!("{size} bytes is more than the limit of {}", config.max_prompt_bytes),
        ));
    }
    let p = &mut job.params;
    if p.max_tokens == 0 {
        p.max_tokens = config.default_max_tokens;
    }
    if p.max_tokens > config.max_tokens_limit {
        return Err(DispatchError::invalid(
            if responses { "max_output_tokens" } else { "max_tokens" },
            format!("{} is more than the limit of {}", p.max_tokens, config.max_tokens_limit),
        ));
    }
    if let Some(t) = p.temperature
        && !(0.0..=2.0).contains(&t)
    {
        return Err(DispatchError::invalid("temperature", format!("{t} is not between 0 and 2")));
    }
    if let Some(t) = p.top_p
        && !(t > 0.0 && t <= 1.0)
    {
        return Err(DispatchError::invalid("top_p", format!("{t} is not in (0, 1]")));
    }
    if let Some(x) = p.min_p
        && !(0.0..=1.0).contains(&x)
    {
        return Err(DispatchError::invalid("min_p", format!("{x} is not between 0 and 1")));
    }
    for (field, value) in
        [("presence_penalty", p.presence_penalty), ("frequency_penalty", p.frequency_penalty)]
    {
        if let Some(x) = value
            && !(-2.0..=2.0).contains(&x)
        {
            return Err(DispatchError::invalid(field, format!("{x} is not between -2 and 2")));
        }
    }
    if let Some(x) = p.repetition_penalty
        && !(x > 0.0 && x.is_finite())
    {
        return Err(DispatchError::invalid("repetition_penalty", format!("{x} is not above 0")));
    }
    if let Some(k) = p.top_k
        && k < -1
    {
        return Err(DispatchError::invalid("top_k", format!("{k} is not -1 (no limit) or above")));
    }
    if p.top_logprobs > 20 {
        return Err(DispatchError::invalid(
            "top_logprobs",
            format!("{} is more than 20", p.top_logprobs),
        ));
    }
    if p.top_logprobs > 0 && !p.logprobs {
        return Err(DispatchError::invalid("top_logprobs", "needs logprobs"));
    }
    if !p.json_schema.is_empty()
        && serde_json::from_str::<serde_json::Value>(&p.json_schema).is_err()
    {
        return Err(DispatchError::invalid("json_schema", "is not JSON"));
    }
    if !p.json_schema.is_empty() && !p.regex.is_empty() {
        return Err(DispatchError::invalid("regex", "set json_schema or regex, not both"));
    }
    if p.stop.len() > 4 {
        return Err(DispatchError::invalid(
            "stop",
            format!("at most 4 stop strings, got {}", p.stop.len()),
        ));
    }
    Ok(())
}

struct Driver {
    inner: Arc<Inner>,
    route: Arc<ModelRoute>,
    job: Job,
    tx: mpsc::Sender<Result<Event, DispatchError>>,
    start: Instant,
    /// When waiting for an instance ends: the client's deadline or the longest hold.
    hold_deadline: Option<Instant>,
    /// The request's span (not recording when the request is not traced).
    span: Span,
    /// Counts the request as in flight until the driver ends.
    _accepted: crate::Accepted,
    /// Whether its stream may move to another instance mid-way ([`movable`]), worked out when
    /// first needed: a stream with no trouble never needs to know.
    movable: std::sync::OnceLock<bool>,
    /// Attempts begun and moves made so far, for the request's span once it ends (the SDK keeps
    /// every value an attribute is given, so each is set once).
    attempts: u32,
    migrations: u32,
}

impl Driver {
    async fn run(mut self, first: Next) {
        let outcome = self.serve(first).await;
        // Only a retried or moved request says how many: the usual answer is one, and none.
        if self.attempts > 1 {
            self.span.set("sllm.attempts", self.attempts);
        }
        if self.migrations > 0 {
            self.span.set("sllm.migrations", self.migrations);
        }
        self.span.set("sllm.outcome", outcome);
        stack::record(&self.route.name, outcome, Some(self.start));
    }

    /// Serves the request; returns its outcome label.
    async fn serve(&mut self, first: Next) -> &'static str {
        let config = &self.inner.config;
        let mut retry = Retry::new(config.max_attempts);
        let mut exclude = HashSet::new();
        let mut tokens_sent = 0u32;
        // What the client has received, kept while the stream may still move to another
        // instance (how often it moved is `self.migrations`).
        let mut delivered = String::new();
        let mut delivered_ids = Vec::new();
        let mut prompt_ids = Vec::new();
        // Tokens delivered when the stream last moved, failed continuations since, and their
        // pauses.
        let mut sent_at_move = 0u32;
        let mut stalled_tries = 0u32;
        let mut pauses =
            service::retry::backoff(Duration::from_millis(10), Duration::from_millis(200));
        let mut ttft: Option<Duration> = None;
        let mut started = false;
        let mut queued = Duration::ZERO;
        let mut next = Some(first);
        loop {
            let ticket = match next.take() {
                Some(Next::Slot(slot)) => Ok(slot),
                Some(Next::Ticket(ticket)) => Err(ticket),
                // A retry goes to the front of the queue: it was admitted before the others.
                None => match self.inner.table.enter(&self.route, exclude.clone(), true, None) {
                    Ok(ticket) => Err(ticket),
                    Err(e) => {
                        let outcome = outcome_of(&e);
                        let _ = self.tx.send(Err(e)).await;
                        return outcome;
                    }
                },
            };
            let slot = match ticket {
                Ok(slot) => slot,
                Err(ticket) => {
                    let t = Instant::now();
                    let got = self.hold(ticket).await;
                    queued += t.elapsed();
                    match got {
                        Ok(slot) => slot,
                        Err(Some(e)) => {
                            let outcome = outcome_of(&e);
                            let _ = self.tx.send(Err(e)).await;
                            return outcome;
                        }
                        Err(None) => return "cancelled",
                    }
                }
            };
            let attempt = retry.begin();
            self.attempts = attempt;
            let (instance, link) = (slot.instance.clone(), slot.link.clone());
            let mut span = self.span.child("generate on an instance", Kind::Internal);
            if span.is_recording() {
                span.set("sllm.attempt", attempt);
                span.set("sllm.instance", &instance.instance_id);
                span.set("sllm.worker", &link.worker_id);
            }
            let mut progress = Progress {
                tokens_sent: &mut tokens_sent,
                delivered: &mut delivered,
                delivered_ids: &mut delivered_ids,
                prompt_ids: &mut prompt_ids,
                ttft: &mut ttft,
                started: &mut started,
                migrations: self.migrations,
                queued,
            };
            let outcome = self.attempt(&instance, &link, &mut progress, &mut span).await;
            // The place goes back before the client hears the end: the next request may use it.
            drop(slot);
            match outcome {
                Attempt::Done => {
                    link.breaker.success();
                    return "ok";
                }
                Attempt::ClientGone => return "cancelled",
                Attempt::Deadline => {
                    let _ = self.tx.send(Err(DispatchError::Deadline(self.deadline_words()))).await;
                    return "deadline";
                }
                Attempt::Failed(Fault::Request(e)) => {
                    span.fail(e.to_string().as_str());
                    // A refused request says nothing about the worker's health: the breaker
                    // neither trips nor resets.
                    let outcome = outcome_of(&e);
                    let _ = self.tx.send(Err(e)).await;
                    return outcome;
                }
                Attempt::Failed(Fault::Instance(why)) => {
                    span.fail(why.as_str());
                    // An instance drained away says nothing about its worker's health.
                    if why != MOVED_OFF
                        && link.breaker.failure(config.breaker_threshold, config.breaker_cooldown)
                    {
                        tracing::warn!(worker = %link.worker_id, "worker skipped for a while after repeated failures");
                    }
                    // The log line names the trace; the trace records the failure on the attempt.
                    let trace_id = span.trace_id();
                    tracing::info!(request = %self.job.id, model = %self.route.name, instance = %instance.instance_id, worker = %link.worker_id, attempt, tokens_sent, %why, trace_id = trace_id.as_deref().unwrap_or("-"), "attempt failed");
                    span.event("attempt failed", &[("tokens_sent", tokens_sent)]);
                    // Once the client has had any event (a chat role, say), a retry would repeat
                    // it: the generation moves instead, continuing after what was sent.
                    let sent = (tokens_sent > 0 || ttft.is_some()).then_some(tokens_sent);
                    // A continuation that failed before adding anything (its new instance was
                    // dead too, and nothing else had room yet) tries again after a pause, within
                    // the attempt budget, instead of using up the moves.
                    let stalled = self.migrations > 0 && tokens_sent == sent_at_move;
                    if sent.is_some() && stalled && self.movable() {
                        stalled_tries += 1;
                        if stalled_tries < config.max_attempts {
                            exclude.clear();
                            exclude.insert(instance.instance_id.clone());
                            tokio::time::sleep(pauses.next().unwrap_or(Duration::from_millis(200)))
                                .await;
                            continue;
                        }
                    } else if sent.is_some()
                        && self.migrations < config.max_migrations
                        && self.movable()
                    {
                        self.migrations += 1;
                        sent_at_move = tokens_sent;
                        stalled_tries = 0;
                        let reason = if why == MOVED_OFF { "drain" } else { "failure" };
                        telemetry::metrics::DISPATCH
                            .migrations
                            .with_label_values(&[self.route.name.as_str(), reason])
                            .inc();
                        span.event("moved", &[("tokens_sent", tokens_sent)]);
                        tracing::info!(request = %self.job.id, model = %self.route.name, instance = %instance.instance_id, tokens_sent, %why, "the stream moves to another instance");
                        let ok = self
                            .send_progress(
                                pb::progress::Stage::Migrated,
                                pb::Progress {
                                    worker_id: link.worker_id.clone(),
                                    instance_id: instance.instance_id.clone(),
                                    message: format!("moving after {tokens_sent} tokens: {why}"),
                                    ..Default::default()
                                },
                            )
                            .await;
                        if !ok {
                            return "cancelled";
                        }
                        // Only the instance just left: the others it passed through may serve
                        // again (a worker declared lost that came back), and a stream must never
                        // wait for an instance it has ruled out.
                        exclude.clear();
                        exclude.insert(instance.instance_id.clone());
                        continue;
                    }
                    match retry.after(&why, sent) {
                        Verdict::GiveUp(e) => {
                            let _ = self.tx.send(Err(e)).await;
                            return "unavailable";
                        }
                        Verdict::Again(pause) => {
                            self.route.metrics.retries.inc();
                            exclude.insert(instance.instance_id.clone());
                            tokio::time::sleep(pause).await;
                        }
                    }
                }
            }
        }
    }

    fn deadline_words(&self) -> String {
        format!("after {} ms", self.start.elapsed().as_millis())
    }

    async fn send_progress(&self, stage: pb::progress::Stage, p: pb::Progress) -> bool {
        if !self.job.progress {
            return true;
        }
        let p = pb::Progress { stage: stage as i32, ..p };
        self.tx.send(Ok(Event::Progress(p))).await.is_ok()
    }

    /// Waits in the queue, in a `queue wait` span. Err(None): the client went away.
    async fn hold(&self, ticket: Ticket) -> Result<Slot, Option<DispatchError>> {
        // A `tracing` span, so that what runs while held (kvstore calls) nests under it; cold
        // requests are few, its cost does not matter.
        let span = if self.span.is_recording() {
            tracing::info_span!(parent: self.span.tracing(), "queue wait", gen_ai.request.model = %self.route.name)
        } else {
            tracing::Span::none()
        };
        let depth = &self.route.metrics.queue_depth;
        depth.inc();
        let start = Instant::now();
        let result = tracing::Instrument::instrument(self.hold_inner(ticket), span).await;
        depth.dec();
        if result.is_ok() {
            self.route.metrics.queue_wait.observe(start.elapsed().as_secs_f64());
        }
        result
    }

    async fn hold_inner(&self, mut ticket: Ticket) -> Result<Slot, Option<DispatchError>> {
        let route = &self.route;
        let mut progress = route.progress.subscribe();
        let traceparent = telemetry::propagation::traceparent(&tracing::Span::current());
        self.inner.raise_demand(route, true, &traceparent);
        if !self
            .send_progress(
                pb::progress::Stage::Queued,
                pb::Progress {
                    message: format!("waiting for an instance of {}", route.name),
                    ..Default::default()
                },
            )
            .await
        {
            return Err(None);
        }
        let mut reannounce = tokio::time::interval(Duration::from_secs(1));
        reannounce.tick().await;
        let slot = loop {
            tokio::select! {
                got = ticket.slot() => match got {
                    Ok(slot) => break slot,
                    Err(Refused::Removed) => {
                        return Err(Some(DispatchError::NotFound(route.name.clone())));
                    }
                    Err(Refused::Unplaceable(reason)) => {
                        return Err(Some(DispatchError::Unplaceable { model: route.name.clone(), reason }));
                    }
                },
                p = progress.recv() => {
                    if let Ok(p) = p {
                        let stage = pb::progress::Stage::try_from(p.stage).unwrap_or(pb::progress::Stage::Unspecified);
                        if !self.send_progress(stage, p).await {
                            return Err(None);
                        }
                    }
                }
                _ = reannounce.tick() => {
                    self.inner.raise_demand(route, false, &traceparent);
                    // A worker skipped after failures becomes usable again with time alone.
                    self.inner.table.pump(route);
                }
                _ = sleep_until(self.hold_deadline) => {
                    let longest = self.inner.config.max_hold;
                    let why = if self.job.deadline.is_some_and(|d| Some(d) <= self.hold_deadline) {
                        "the client's deadline".to_string()
                    } else {
                        format!("the longest a request is held, {} s", longest.as_secs())
                    };
                    return Err(Some(DispatchError::Deadline(format!(
                        "{} waiting for an instance of {} ({why})",
                        self.deadline_words(),
                        route.name
                    ))));
                }
                _ = self.tx.closed() => return Err(None),
            }
        };
        let ok = self
            .send_progress(
                pb::progress::Stage::Routed,
                pb::Progress {
                    worker_id: slot.instance.worker_id.clone(),
                    instance_id: slot.instance.instance_id.clone(),
                    message: "sent to a ready instance".into(),
                    ..Default::default()
                },
            )
            .await;
        if ok { Ok(slot) } else { Err(None) }
    }

    fn movable(&self) -> bool {
        *self.movable.get_or_init(|| movable(&self.job, &self.inner.config))
    }

    async fn attempt(
        &self,
        instance: &Routable,
        link: &WorkerLink,
        progress: &mut Progress<'_>,
        span: &mut Span,
    ) -> Attempt {
        let (tokens_sent, ttft, queued) =
            (&mut *progress.tokens_sent, &mut *progress.ttft, progress.queued);
        let keep = self.inner.config.max_migrations > progress.migrations;
        let request_id = self.inner.next_request_id();
        let window = self.inner.config.window;
        // The worker sends at most `window` chunks ahead of what the client has read; the
        // room beyond it is for the engine's acceptance, the end and a lost-worker notice.
        let (wtx, mut wrx) = mpsc::channel(window as usize + 5);
        let overrun = Arc::new(AtomicBool::new(false));
        if let Ok(mut pending) = link.pending.lock() {
            pending.insert(request_id, Inbox { tx: wtx, overrun: overrun.clone() });
        }
        let _cleanup = PendingGuard { link, request_id };
        let input = match &self.job.input {
            Input::Prompt(p) => pb::inference_request::Input::Prompt(p.clone()),
            Input::Chat(c) => pb::inference_request::Input::Chat(c.clone()),
        };
        // A moved stream continues after what its client has: only the rest of max_tokens.
        let continuation =
            (*tokens_sent > 0 || !progress.delivered.is_empty()).then(|| pb::Continuation {
                text: progress.delivered.clone(),
                tokens: *tokens_sent,
                token_ids: progress.delivered_ids.clone(),
                prompt_token_ids: progress.prompt_ids.clone(),
            });
        let max_tokens = self.job.params.max_tokens.saturating_sub(*tokens_sent);
        let request = pb::InferenceRequest {
            request_id,
            instance_id: instance.instance_id.clone(),
            model: self.route.name.clone(),
            input: Some(input),
            params: Some(pb::SamplingParams { max_tokens, ..self.job.params.clone() }),
            traceparent: span.traceparent(),
            openai: self.job.openai.clone(),
            window,
            adapter: self.job.adapter.clone(),
            continuation,
            baggage: self.job.baggage.clone(),
        };
        if let Some(a) = &self.job.adapter
            && let Ok(mut held) = instance.adapters.lock()
        {
            // The instance loads it for this request: later ones for it prefer this instance.
            held.insert(a.name.clone());
        }
        let down = pb::AttachDown { msg: Some(pb::attach_down::Msg::Request(request)) };
        if link.tx.send(Ok(down)).await.is_err() {
            return Attempt::Failed(Fault::Instance("the worker's attach stream is closed".into()));
        }
        // Chunks read since the last grant, and this attempt's tokens.
        let mut unacknowledged = 0u32;
        let mut attempt_tokens = 0u32;
        // A message taken while merging chunks that must be handled next.
        let mut held: Option<FromWorker> = None;
        // Whether the instance leaving routing (draining, stopped, lost) moves this stream.
        let mut watch_leaving = keep;
        loop {
            let m = match held.take() {
                Some(m) => Some(m),
                None => tokio::select! {
                    m = wrx.recv() => m,
                    _ = self.tx.closed() => {
                        link.cancel(request_id);
                        return Attempt::ClientGone;
                    }
                    _ = sleep_until(self.job.deadline) => {
                        link.cancel(request_id);
                        return Attempt::Deadline;
                    }
                    // Drain by migration: a stream leaves an instance being taken away at once
                    // when another instance can take it over; with none, it finishes here.
                    _ = instance.leaving.cancelled(), if watch_leaving => {
                        if self.route.ready_count() > 0 && self.movable() {
                            link.cancel(request_id);
                            return Attempt::Failed(Fault::Instance(MOVED_OFF.into()));
                        }
                        watch_leaving = false;
                        continue;
                    }
                },
            };
            match m {
                // The client hears it once, from whichever attempt is first accepted.
                Some(FromWorker::Started) => {
                    if self.job.openai.is_some()
                        && !std::mem::replace(progress.started, true)
                        && self.tx.send(Ok(Event::Started)).await.is_err()
                    {
                        link.cancel(request_id);
                        return Attempt::ClientGone;
                    }
                }
                Some(FromWorker::Chunk(mut c)) => {
                    let mut messages = 1;
                    // Chunks already waiting go to the client as one: under load it gets fewer,
                    // larger messages instead of a growing backlog. Engine events stay one each.
                    while c.text.len() < 16 * 1024 {
                        match wrx.try_recv() {
                            Ok(FromWorker::Chunk(more)) => {
                                messages += 1;
                                c.text.push_str(&more.text);
                                c.tokens += more.tokens;
                                c.events.extend(more.events);
                                c.logprobs.extend(more.logprobs);
                                c.token_ids.extend(more.token_ids);
                                c.prompt_token_ids.extend(more.prompt_token_ids);
                            }
                            Ok(other) => {
                                held = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    attempt_tokens = attempt_tokens.saturating_add(c.tokens);
                    let choices = self.job.choices.max(1);
                    if attempt_tokens > max_tokens.saturating_mul(choices) {
                        link.cancel(request_id);
                        let each = if choices > 1 {
                            format!(" for each of {choices} choices")
                        } else {
                            String::new()
                        };
                        return overran(
                            span,
                            format!(
                                "the worker sent {attempt_tokens} tokens, more than max_tokens ({max_tokens}){each}"
                            ),
                        );
                    }
                    if ttft.is_none() {
                        let first = self.start.elapsed();
                        *ttft = Some(first);
                        span.set("sllm.ttft_ms", first.as_secs_f64() * 1000.0);
                        self.route.metrics.ttft.observe(first.as_secs_f64());
                    }
                    let tokens = c.tokens;
                    *tokens_sent += tokens;
                    if keep {
                        progress.delivered.push_str(&c.text);
                        progress.delivered_ids.extend_from_slice(&c.token_ids);
                        // The first instance's prompt, as its engine read it.
                        if progress.prompt_ids.is_empty() {
                            *progress.prompt_ids = c.prompt_token_ids;
                        }
                    }
                    self.route.metrics.tokens.inc_by(u64::from(tokens));
                    let event = Event::Chunk {
                        text: c.text,
                        tokens,
                        events: c.events,
                        logprobs: c.logprobs,
                        migrations: progress.migrations,
                    };
                    if self.tx.send(Ok(event)).await.is_err() {
                        link.cancel(request_id);
                        return Attempt::ClientGone;
                    }
                    // The client took it: the worker may send as much again. Grants go in
                    // halves of the window, so the worker rarely waits for one.
                    unacknowledged += messages;
                    if window > 0 && unacknowledged >= window.div_ceil(2) {
                        link.grant(request_id, unacknowledged);
                        unacknowledged = 0;
                    }
                }
                Some(FromWorker::Finished(f)) => {
                    let reason =
                        pb::FinishReason::try_from(f.reason).unwrap_or(pb::FinishReason::Stop);
                    let usage = pb::Usage {
                        prompt_tokens: f.prompt_tokens,
                        completion_tokens: f.completion_tokens,
                        time_to_first_token_us: ttft
                            .unwrap_or_else(|| self.start.elapsed())
                            .as_micros() as u64,
                        queue_us: queued.as_micros() as u64,
                        instance_id: instance.instance_id.clone(),
                        migrations: progress.migrations,
                    };
                    span.set("gen_ai.usage.output_tokens", usage.completion_tokens);
                    let _ = self.tx.send(Ok(Event::Finished { reason, usage })).await;
                    return Attempt::Done;
                }
                Some(FromWorker::Error(e)) => {
                    span.set("error.type", "worker_error");
                    return Attempt::Failed(Fault::of_worker_error(e));
                }
                // Output already went to the client: the stream moves when it may; otherwise
                // the stream decides (it ends if the worker is really gone).
                Some(FromWorker::Lost) if ttft.is_some() && !(keep && self.movable()) => {}
                Some(FromWorker::Lost) => {
                    link.cancel(request_id);
                    return Attempt::Failed(Fault::Instance(
                        "the registry declared the worker lost".into(),
                    ));
                }
                None if overrun.load(Ordering::Relaxed) => {
                    link.cancel(request_id);
                    return overran(
                        span,
                        format!(
                            "the worker sent more than the {window} chunks its flow-control window allows"
                        ),
                    );
                }
                None => {
                    return Attempt::Failed(Fault::Instance(
                        "the worker's attach stream ended".into(),
                    ));
                }
            }
        }
    }
}

/// Whether a request's stream may move to another instance mid-way: moves are allowed, and
/// the input is one text an instance can continue (not a prompt of token ids, nor several
/// choices: `n` above 1 or a batch of prompts, whose sequences a continuation could not carry
/// on each from its own point). An OpenAI request that is not streamed gets the engine's body
/// as it is, which a second engine's body cannot extend: it is retried whole instead, as
/// before anything reached the client.
fn movable(job: &Job, config: &crate::DispatchConfig) -> bool {
    if config.max_migrations == 0 {
        return false;
    }
    match &job.openai {
        // A Responses API stream's typed events describe one response from its start.
        Some(o) if o.endpoint == pb::OpenAiEndpoint::Responses as i32 => false,
        Some(o) => serde_json::from_str::<serde_json::Value>(&o.body).is_ok_and(|b| {
            let streamed = b.get("stream").and_then(|s| s.as_bool()).unwrap_or(false);
            let one_text = match b.get("prompt") {
                Some(serde_json::Value::Array(items)) => {
                    matches!(items.as_slice(), [serde_json::Value::String(_)])
                }
                _ => true,
            };
            let one_choice = b.get("n").and_then(|n| n.as_u64()).is_none_or(|n| n <= 1);
            streamed && one_text && one_choice
        }),
        None => true,
    }
}

/// Why an attempt ended when its instance left routing and the stream moved on.
const MOVED_OFF: &str = "its instance is leaving (draining, stopped or lost)";

/// What one request has done so far, across its attempts.
struct Progress<'a> {
    /// Tokens the client has received.
    tokens_sent: &'a mut u32,
    /// Their text, kept while the stream may move.
    delivered: &'a mut String,
    /// Their ids, as far as the engine reported them.
    delivered_ids: &'a mut Vec<u32>,
    /// The prompt's ids, when the first instance's engine reported them.
    prompt_ids: &'a mut Vec<u32>,
    /// When the first output reached the client.
    ttft: &'a mut Option<Duration>,
    /// Whether the client was told an engine accepted the request.
    started: &'a mut bool,
    /// Times the stream moved so far.
    migrations: u32,
    /// Time held for a cold start.
    queued: Duration,
}

struct PendingGuard<'a> {
    link: &'a WorkerLink,
    request_id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut pending) = self.link.pending.lock() {
            pending.remove(&self.request_id);
        }
    }
}

/// A worker that broke the limits it was given (max_tokens, its flow-control window): the
/// request ends with INTERNAL and is not retried.
fn overran(span: &mut Span, what: String) -> Attempt {
    span.set("error.type", "worker_overran");
    Attempt::Failed(Fault::Request(DispatchError::Engine {
        code: tonic::Code::Internal,
        http_status: 0,
        message: format!("{what}; the request was stopped"),
        body: String::new(),
    }))
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}
