//! One request's life: validated, routed (or held until an instance is ready), sent down the
//! chosen worker's Attach stream, streamed back; retried elsewhere if the worker fails before
//! the first token; cancelled on the worker when the client goes away.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sllm_api::v1 as pb;
use telemetry::trace::{Kind, Span};
use tokio::sync::mpsc;

use crate::error::DispatchError;
use crate::table::{FromWorker, ModelRoute, Routable, WorkerLink};
use crate::{Dispatch, Inner};

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
    /// Deployment name (`name:backend` accepted).
    pub model: String,
    /// Input.
    pub input: Input,
    /// Sampling and limits.
    pub params: pb::SamplingParams,
    /// Stream progress events while held.
    pub progress: bool,
    /// When to give up.
    pub deadline: Option<Instant>,
    /// The caller's W3C trace context (gRPC metadata or HTTP header); the request's spans join
    /// its trace.
    pub traceparent: String,
    /// Name of the entry point, for the request's span (e.g. `sllm.v1.Dispatch/Generate`).
    pub entry: &'static str,
    /// The client's OpenAI request, which an engine gets as it is (HTTP API requests only).
    pub openai: Option<pb::OpenAiRequest>,
}

/// What the client receives.
#[derive(Debug, Clone)]
pub enum Event {
    /// Cold-start progress.
    Progress(pb::Progress),
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
pub type Events = mpsc::Receiver<Result<Event, DispatchError>>;

enum Attempt {
    Done,
    ClientGone,
    Deadline,
    /// The instance failed: retried elsewhere while nothing was sent.
    Failed(String),
    /// The request failed for a reason another instance would not change (the engine refused
    /// it, stalled, or reported an error mid-stream): the client gets this error.
    Ended(DispatchError),
}

impl Dispatch {
    /// Validates and admits a request. Errors that need no waiting (bad input, unknown model,
    /// full queue) come back here, before any output; the rest arrive on the stream.
    pub async fn submit(&self, mut job: Job) -> Result<Events, DispatchError> {
        if let Some((name, _backend)) = job.model.split_once(':') {
            job.model = name.to_string();
        }
        let operation =
            if matches!(job.input, Input::Chat(_)) { "chat" } else { "text_completion" };
        // Sampled out (or no exporter): no span at all, and none below it. The request path's
        // spans are recorded directly, not through `tracing`: a fifth of the cost.
        let mut span = Span::request(job.entry, Kind::Server, &job.traceparent);
        if span.is_recording() {
            span.set("rpc.system", if job.entry.starts_with("sllm.") { "grpc" } else { "http" });
            span.set("gen_ai.operation.name", operation);
            span.set("gen_ai.request.model", &job.model);
            span.set("gen_ai.request.max_tokens", job.params.max_tokens);
        }
        let model = job.model.clone();
        // On success the request's driver takes the span; on error it is still here.
        let result = self.admit(job, &mut span).await;
        if let Err(e) = &result {
            let outcome = outcome_of(e);
            span.set("sllm.outcome", outcome);
            let label = if matches!(
                e,
                DispatchError::NotFound(_)
                    | DispatchError::Missing(..)
                    | DispatchError::Invalid { .. }
            ) {
                "-"
            } else {
                model.as_str()
            };
            telemetry::metrics::DISPATCH.requests.with_label_values(&[label, outcome]).inc();
        }
        result
    }

    async fn admit(&self, mut job: Job, span: &mut Span) -> Result<Events, DispatchError> {
        let inner = &self.inner;
        validate(&mut job, &inner.config)?;
        let route = match inner.table.model(&job.model) {
            Some(r) => r,
            None => self.confirm_deployed(&job.model).await?,
        };
        if route.deleting.load(Ordering::Relaxed) {
            return Err(DispatchError::Deleting(job.model.clone()));
        }
        let first = inner.table.pick(&route, &HashSet::new());
        if first.is_none() {
            let queued = route.waiting.load(Ordering::Relaxed) as usize;
            if queued >= inner.config.max_queue {
                return Err(DispatchError::QueueFull {
                    model: job.model.clone(),
                    queued,
                    retry_after: inner.config.retry_after,
                });
            }
        }
        let (tx, rx) = mpsc::channel(64);
        // The request's spans are parents by hand, not entered at every poll: entering and
        // leaving a span costs more than the rest of a warm request's tracing together.
        let span = std::mem::take(span);
        let driver = Driver { inner: inner.clone(), route, job, tx, start: Instant::now(), span };
        tokio::spawn(driver.run(first));
        Ok(rx)
    }
}

impl Dispatch {
    /// A model missing from the table may have been deployed a moment ago (its event not yet
    /// read): one kvstore read settles it before answering NOT_FOUND. Only this miss path reads.
    async fn confirm_deployed(&self, model: &str) -> Result<Arc<ModelRoute>, DispatchError> {
        match self.inner.store.get_deployment(model).await {
            Ok(Some(d)) => {
                let deleting = d.status == kvstore::DeploymentStatus::Deleting;
                self.inner.table.upsert_model(model, deleting);
                self.inner
                    .table
                    .model(model)
                    .ok_or_else(|| DispatchError::NotFound(model.to_string()))
            }
            Ok(None) => match self.inner.store.model_instances(model).await {
                Ok(running) if !running.is_empty() => {
                    Err(DispatchError::Missing(model.to_string(), running.len()))
                }
                _ => Err(DispatchError::NotFound(model.to_string())),
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
        DispatchError::NotFound(_) | DispatchError::Missing(..) => "not_found",
        DispatchError::Deleting(_) => "deleting",
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
    if size > config.max_prompt_bytes {
        return Err(DispatchError::invalid(
            "prompt",
            format!("{size} bytes is more than the limit of {}", config.max_prompt_bytes),
        ));
    }
    let p = &mut job.params;
    if p.max_tokens == 0 {
        p.max_tokens = config.default_max_tokens;
    }
    if p.max_tokens > config.max_tokens_limit {
        return Err(DispatchError::invalid(
            "max_tokens",
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
    /// The request's span (not recording when the request is not traced).
    span: Span,
}

impl Driver {
    async fn run(mut self, first: Option<(Arc<Routable>, Arc<WorkerLink>)>) {
        let metrics = &*telemetry::metrics::DISPATCH;
        let model = self.route.name.clone();
        let start = self.start;
        let outcome = self.serve(first).await;
        self.span.set("sllm.outcome", outcome);
        metrics.requests.with_label_values(&[&model, outcome]).inc();
        metrics
            .duration
            .with_label_values(&[&model, outcome])
            .observe(start.elapsed().as_secs_f64());
    }

    /// Serves the request; returns its outcome label.
    async fn serve(&mut self, first: Option<(Arc<Routable>, Arc<WorkerLink>)>) -> &'static str {
        let config = &self.inner.config;
        let mut exclude = HashSet::new();
        let mut tokens_sent = 0u32;
        let mut ttft: Option<Duration> = None;
        let mut queued = Duration::ZERO;
        let mut next = first;
        let mut attempt = 0;
        loop {
            let (instance, link) = match next.take() {
                Some(x) => x,
                None => {
                    let t = Instant::now();
                    let got = self.hold(&exclude).await;
                    queued += t.elapsed();
                    match got {
                        Ok(x) => x,
                        Err(Some(e)) => {
                            let outcome = outcome_of(&e);
                            let _ = self.tx.send(Err(e)).await;
                            return outcome;
                        }
                        Err(None) => return "cancelled",
                    }
                }
            };
            attempt += 1;
            // Only a retried request says how many attempts it took: the usual answer is one.
            if attempt > 1 {
                self.span.set("sllm.attempts", attempt);
            }
            let in_flight = &self.route.metrics.in_flight;
            instance.in_flight.fetch_add(1, Ordering::Relaxed);
            self.route.in_flight.fetch_add(1, Ordering::Relaxed);
            in_flight.inc();
            let mut span = self.span.child("generate on an instance", Kind::Internal);
            if span.is_recording() {
                span.set("sllm.attempt", attempt);
                span.set("sllm.instance", &instance.instance_id);
                span.set("sllm.worker", &link.worker_id);
            }
            let outcome = self
                .attempt(&instance, &link, &mut tokens_sent, &mut ttft, queued, &mut span)
                .await;
            in_flight.dec();
            instance.in_flight.fetch_sub(1, Ordering::Relaxed);
            self.route.in_flight.fetch_sub(1, Ordering::Relaxed);
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
                Attempt::Ended(e) => {
                    span.fail(e.to_string().as_str());
                    // A refused request says nothing about the worker's health: the breaker
                    // neither trips nor resets.
                    let outcome = outcome_of(&e);
                    let _ = self.tx.send(Err(e)).await;
                    return outcome;
                }
                Attempt::Failed(why) => {
                    span.fail(why.as_str());
                    if link.breaker.failure(config.breaker_threshold, config.breaker_cooldown) {
                        tracing::warn!(worker = %link.worker_id, "worker skipped for a while after repeated failures");
                    }
                    // The log line names the trace; the trace records the failure on the attempt.
                    let trace_id = span.context().map(|cx| format!("{:032x}", cx.trace_id));
                    tracing::info!(model = %self.route.name, instance = %instance.instance_id, worker = %link.worker_id, attempt, tokens_sent, %why, trace_id = trace_id.as_deref().unwrap_or("-"), "attempt failed");
                    span.event("attempt failed", &[("tokens_sent", tokens_sent.into())]);
                    // Once the client has had any event (a chat role, say), a retry would repeat it.
                    if tokens_sent > 0 || ttft.is_some() {
                        let _ = self
                            .tx
                            .send(Err(DispatchError::Unavailable(format!(
                                "the worker failed after {tokens_sent} tokens were delivered: {why}"
                            ))))
                            .await;
                        return "unavailable";
                    }
                    if attempt >= config.max_attempts {
                        let _ = self
                            .tx
                            .send(Err(DispatchError::Unavailable(format!(
                                "no output after {attempt} attempts; last: {why}"
                            ))))
                            .await;
                        return "unavailable";
                    }
                    self.route.metrics.retries.inc();
                    exclude.insert(instance.instance_id.clone());
                    // Jittered backoff before trying elsewhere.
                    let pause = Duration::from_millis(
                        5 * (1 << attempt.min(5)) + rand::random::<u64>() % 10,
                    );
                    tokio::time::sleep(pause).await;
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

    /// Waits for a route, in a `queue wait` span. Err(None): the client went away.
    async fn hold(
        &self,
        exclude: &HashSet<String>,
    ) -> Result<(Arc<Routable>, Arc<WorkerLink>), Option<DispatchError>> {
        // A `tracing` span, so that what runs while held (kvstore calls) nests under it; cold
        // requests are few, its cost does not matter.
        let span = if self.span.is_recording() {
            let s = tracing::info_span!("queue wait", gen_ai.request.model = %self.route.name);
            self.span.adopt(&s);
            s
        } else {
            tracing::Span::none()
        };
        let depth = &self.route.metrics.queue_depth;
        depth.inc();
        let start = Instant::now();
        let result = tracing::Instrument::instrument(self.hold_inner(exclude), span).await;
        depth.dec();
        if result.is_ok() {
            self.route.metrics.queue_wait.observe(start.elapsed().as_secs_f64());
        }
        result
    }

    async fn hold_inner(
        &self,
        exclude: &HashSet<String>,
    ) -> Result<(Arc<Routable>, Arc<WorkerLink>), Option<DispatchError>> {
        let route = &self.route;
        let table = &self.inner.table;
        route.waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = WaitGuard(route.clone());
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
        loop {
            let changed = route.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if route.removed.load(Ordering::Relaxed) {
                return Err(Some(DispatchError::NotFound(route.name.clone())));
            }
            // Another instance than the ones that failed this request if there is one; else
            // the same again (it may have been a passing fault; its breaker judges).
            let found = table.pick(route, exclude).or_else(|| {
                if exclude.is_empty() { None } else { table.pick(route, &HashSet::new()) }
            });
            if let Some(found) = found {
                let ok = self
                    .send_progress(
                        pb::progress::Stage::Routed,
                        pb::Progress {
                            worker_id: found.0.worker_id.clone(),
                            instance_id: found.0.instance_id.clone(),
                            message: "sent to a ready instance".into(),
                            ..Default::default()
                        },
                    )
                    .await;
                return if ok { Ok(found) } else { Err(None) };
            }
            let deadline = self.job.deadline;
            tokio::select! {
                _ = &mut changed => {}
                p = progress.recv() => {
                    if let Ok(p) = p {
                        let stage = pb::progress::Stage::try_from(p.stage).unwrap_or(pb::progress::Stage::Unspecified);
                        if !self.send_progress(stage, p).await {
                            return Err(None);
                        }
                    }
                }
                _ = reannounce.tick() => self.inner.raise_demand(route, false, &traceparent),
                _ = sleep_until(deadline) => {
                    return Err(Some(DispatchError::Deadline(format!("{} while waiting for an instance", self.deadline_words()))));
                }
                _ = self.tx.closed() => return Err(None),
            }
        }
    }

    async fn attempt(
        &self,
        instance: &Routable,
        link: &WorkerLink,
        tokens_sent: &mut u32,
        ttft: &mut Option<Duration>,
        queued: Duration,
        span: &mut Span,
    ) -> Attempt {
        let request_id = self.inner.next_request_id();
        let (wtx, mut wrx) = mpsc::unbounded_channel();
        if let Ok(mut pending) = link.pending.lock() {
            pending.insert(request_id, wtx);
        }
        let _cleanup = PendingGuard { link, request_id };
        let input = match &self.job.input {
            Input::Prompt(p) => pb::inference_request::Input::Prompt(p.clone()),
            Input::Chat(c) => pb::inference_request::Input::Chat(c.clone()),
        };
        let request = pb::InferenceRequest {
            request_id,
            instance_id: instance.instance_id.clone(),
            model: self.route.name.clone(),
            input: Some(input),
            params: Some(self.job.params.clone()),
            traceparent: span.traceparent(),
            openai: self.job.openai.clone(),
        };
        let down = pb::AttachDown { msg: Some(pb::attach_down::Msg::Request(request)) };
        if link.tx.send(Ok(down)).await.is_err() {
            return Attempt::Failed("the worker's attach stream is closed".into());
        }
        let cancel = || {
            let _ = link.tx.try_send(Ok(pb::AttachDown {
                msg: Some(pb::attach_down::Msg::Cancel(pb::CancelRequest { request_id })),
            }));
        };
        // A message taken while merging chunks that must be handled next.
        let mut held: Option<FromWorker> = None;
        loop {
            let m = match held.take() {
                Some(m) => Some(m),
                None => tokio::select! {
                    m = wrx.recv() => m,
                    _ = self.tx.closed() => {
                        cancel();
                        return Attempt::ClientGone;
                    }
                    _ = sleep_until(self.job.deadline) => {
                        cancel();
                        return Attempt::Deadline;
                    }
                },
            };
            match m {
                Some(FromWorker::Chunk(mut c)) => {
                    // Chunks already waiting go to the client as one: under load it gets fewer,
                    // larger messages instead of a growing backlog. Engine events stay one each.
                    while c.text.len() < 16 * 1024 {
                        match wrx.try_recv() {
                            Ok(FromWorker::Chunk(more)) => {
                                c.text.push_str(&more.text);
                                c.tokens += more.tokens;
                                c.events.extend(more.events);
                                c.logprobs.extend(more.logprobs);
                            }
                            Ok(other) => {
                                held = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    if ttft.is_none() {
                        let first = self.start.elapsed();
                        *ttft = Some(first);
                        span.set("sllm.ttft_ms", first.as_secs_f64() * 1000.0);
                        self.route.metrics.ttft.observe(first.as_secs_f64());
                    }
                    let tokens = c.tokens;
                    *tokens_sent += tokens;
                    self.route.metrics.tokens.inc_by(u64::from(tokens));
                    let event = Event::Chunk {
                        text: c.text,
                        tokens,
                        events: c.events,
                        logprobs: c.logprobs,
                    };
                    if self.tx.send(Ok(event)).await.is_err() {
                        cancel();
                        return Attempt::ClientGone;
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
                    };
                    span.set("gen_ai.usage.output_tokens", usage.completion_tokens);
                    let _ = self.tx.send(Ok(Event::Finished { reason, usage })).await;
                    return Attempt::Done;
                }
                Some(FromWorker::Error(e)) => {
                    span.set("error.type", "worker_error");
                    return match tonic::Code::from(e.code) {
                        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Ok => {
                            Attempt::Failed(e.message)
                        }
                        code => Attempt::Ended(DispatchError::Engine {
                            code,
                            http_status: u16::try_from(e.http_status).unwrap_or(0),
                            message: e.message,
                            body: e.body,
                        }),
                    };
                }
                None => return Attempt::Failed("the worker's attach stream ended".into()),
            }
        }
    }
}

struct WaitGuard(Arc<ModelRoute>);

impl Drop for WaitGuard {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
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

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}
