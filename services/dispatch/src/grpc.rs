//! The gRPC surface: `Generate` for clients, `Attach` for workers.

use std::pin::Pin;
use std::time::{Duration, Instant};

use service::batched::Batched;
use sllm_api::v1 as pb;
use sllm_api::v1::dispatch_server;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::request::{Event, Input, Job};
use crate::stack::Entry;
use crate::{Dispatch, attach};

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateEvent, Status>> + Send>>;

/// Largest `grpc-timeout` value: the gRPC spec allows at most 8 digits (which also keeps the
/// arithmetic below far from overflow).
const GRPC_TIMEOUT_DIGITS: usize = 8;

/// Parses a `grpc-timeout` header value (`<1 to 8 digits><unit>`, unit one of H M S m u n, as
/// the gRPC over HTTP/2 spec writes it). Anything else is refused with the reason, so the
/// caller can answer INVALID_ARGUMENT naming the header instead of silently dropping the
/// client's deadline.
pub fn parse_grpc_timeout(raw: &[u8]) -> Result<Duration, &'static str> {
    let Some((&unit, digits)) = raw.split_last() else {
        return Err("is empty");
    };
    if digits.is_empty() || digits.len() > GRPC_TIMEOUT_DIGITS {
        return Err("must be 1 to 8 digits followed by a unit (H, M, S, m, u, n)");
    }
    if !digits.iter().all(u8::is_ascii_digit) {
        return Err("must be 1 to 8 digits followed by a unit (H, M, S, m, u, n)");
    }
    // At most 99,999,999: every product below fits in a u64.
    let n = digits.iter().fold(0u64, |acc, d| acc * 10 + u64::from(d - b'0'));
    match unit {
        b'H' => Ok(Duration::from_secs(n * 3600)),
        b'M' => Ok(Duration::from_secs(n * 60)),
        b'S' => Ok(Duration::from_secs(n)),
        b'm' => Ok(Duration::from_millis(n)),
        b'u' => Ok(Duration::from_micros(n)),
        b'n' => Ok(Duration::from_nanos(n)),
        _ => Err("has an unknown unit (H, M, S, m, u, n)"),
    }
}

/// `now + d`, or None (no deadline) when it would not fit in an `Instant`: a timeout of
/// centuries is no deadline at all.
fn deadline_after(d: Duration) -> Option<Instant> {
    Instant::now().checked_add(d)
}

/// The gRPC event for `event`; None for what a gRPC client is not told (an engine's
/// acceptance: its response head went out when the call was answered).
fn to_pb(event: Event) -> Option<pb::GenerateEvent> {
    let event = match event {
        Event::Started => return None,
        Event::Progress(p) => pb::generate_event::Event::Progress(p),
        Event::Chunk { text, tokens, logprobs, .. } => {
            pb::generate_event::Event::Chunk(pb::Chunk { text, tokens, logprobs })
        }
        Event::Finished { reason, usage } => pb::generate_event::Event::Finished(pb::Finished {
            reason: reason as i32,
            usage: Some(usage),
        }),
    };
    Some(pb::GenerateEvent { event: Some(event) })
}

#[tonic::async_trait]
impl dispatch_server::Dispatch for Dispatch {
    type GenerateStream = EventStream;
    type AttachStream = Batched<attach::Down>;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<EventStream>, Status> {
        // Auth, the `grpc-timeout` header and the rate limit were the edge's (`stack`).
        let header_deadline = request.extensions().get::<Entry>().and_then(|e| e.deadline);
        let traceparent = request
            .metadata()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let baggage = telemetry::propagation::baggage(
            request.metadata().get("baggage").and_then(|v| v.to_str().ok()).unwrap_or_default(),
        );
        let req = request.into_inner();
        let input = match req.input {
            Some(pb::generate_request::Input::Prompt(p)) => Input::Prompt(p),
            Some(pb::generate_request::Input::Chat(c)) => Input::Chat(c),
            None => return Err(service::field_status("input", "set `prompt` or `chat`")),
        };
        let field_deadline = (req.timeout_ms > 0)
            .then(|| deadline_after(Duration::from_millis(req.timeout_ms)))
            .flatten();
        let deadline = match (header_deadline, field_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let id = uuid::Uuid::now_v7().to_string();
        let job = Job {
            id: id.clone(),
            model: req.model,
            input,
            params: req.params.unwrap_or_default(),
            progress: req.progress,
            deadline,
            traceparent,
            baggage,
            entry: "sllm.v1.Dispatch/Generate",
            openai: None,
            adapter_name: None,
            adapter: None,
            choices: 1,
        };
        let events = self.submit(job).await.map_err(|e| e.to_status())?;
        let stream = events.filter_map(|r| r.map(to_pb).map_err(|e| e.to_status()).transpose());
        let mut response = Response::new(Box::pin(stream) as EventStream);
        if let Ok(v) = id.parse() {
            response.metadata_mut().insert("x-request-id", v);
        }
        Ok(response)
    }

    async fn embed(
        &self,
        request: Request<pb::EmbedRequest>,
    ) -> Result<Response<pb::EmbedResponse>, Status> {
        let (header_deadline, traceparent) = entry_of(&request);
        let req = request.into_inner();
        if req.input.is_empty() {
            return Err(service::field_status("input", "must hold at least one text"));
        }
        if let Some(i) = req.input.iter().position(String::is_empty) {
            return Err(service::field_status(&format!("input[{i}]"), "must not be empty"));
        }
        let mut body = serde_json::json!({
            "model": req.model,
            "input": req.input,
            "encoding_format": "float",
        });
        if let Some(d) = req.dimensions {
            body["dimensions"] = serde_json::json!(d);
        }
        let id = format!("embd-{}", uuid::Uuid::now_v7().simple());
        let mut job = crate::openai::parse_embeddings(
            &body.to_string(),
            traceparent,
            id,
            "sllm.v1.Dispatch/Embed",
        )
        .map_err(|e| e.to_status())?;
        job.deadline = deadline_of(header_deadline, req.timeout_ms);
        let answer = self.whole_answer(job, "embeddings").await?;
        embed_response(&answer).map(Response::new)
    }

    async fn rerank(
        &self,
        request: Request<pb::RerankRequest>,
    ) -> Result<Response<pb::RerankResponse>, Status> {
        let (header_deadline, traceparent) = entry_of(&request);
        let req = request.into_inner();
        if let Some(i) = req.documents.iter().position(String::is_empty) {
            return Err(service::field_status(&format!("documents[{i}]"), "must not be empty"));
        }
        let mut body = serde_json::json!({
            "model": req.model,
            "query": req.query,
            "documents": req.documents,
        });
        if let Some(n) = req.top_n {
            body["top_n"] = serde_json::json!(n);
        }
        let id = format!("rerank-{}", uuid::Uuid::now_v7().simple());
        let mut job = crate::openai::parse_rerank(
            &body.to_string(),
            traceparent,
            id,
            crate::openai::GRPC_RERANK_ENTRY,
        )
        .map_err(|e| e.to_status())?;
        job.deadline = deadline_of(header_deadline, req.timeout_ms);
        let answer = self.whole_answer(job, "a ranking").await?;
        rerank_response(&answer).map(Response::new)
    }

    async fn attach(
        &self,
        request: Request<Streaming<pb::AttachUp>>,
    ) -> Result<Response<Batched<attach::Down>>, Status> {
        let peer = request.remote_addr();
        let down = attach::open(self.inner.clone(), request.into_inner(), peer).await?;
        // Requests, credit grants and cancels for many streams share this one: batched, the
        // grants a turn of the runtime makes go down in one write.
        Ok(Response::new(Batched::new(down)))
    }
}

/// A unary request's deadline (its `grpc-timeout`, read at the edge) and trace context.
fn entry_of<T>(request: &Request<T>) -> (Option<Instant>, String) {
    let deadline = request.extensions().get::<Entry>().and_then(|e| e.deadline);
    let traceparent = request
        .metadata()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    (deadline, traceparent)
}

/// The sooner of a request's header deadline and its `timeout_ms` field (0: none).
fn deadline_of(header: Option<Instant>, timeout_ms: u64) -> Option<Instant> {
    let field =
        (timeout_ms > 0).then(|| deadline_after(Duration::from_millis(timeout_ms))).flatten();
    match (header, field) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl Dispatch {
    /// Submits `job` and waits for the one JSON body its engine answers with (`what` it should
    /// hold, for the error when a backend answers with generated text instead).
    async fn whole_answer(&self, job: crate::request::Job, what: &str) -> Result<String, Status> {
        let events = self.submit(job).await.map_err(|e| e.to_status())?;
        match crate::openai::collect(events).await.map_err(|e| e.to_status())? {
            crate::openai::Collected::Relayed(body) => Ok(body),
            crate::openai::Collected::Text(..) => Err(Status::unavailable(format!(
                "the backend answered with generated text, not {what}"
            ))),
        }
    }
}

/// An engine's rerank answer (vLLM's, SGLang's or llama.cpp's: `results` of `index` and
/// `relevance_score`) as a RerankResponse, in the engine's order.
fn rerank_response(body: &str) -> Result<pb::RerankResponse, Status> {
    let bad = |why: &str| Status::internal(format!("the engine's rerank answer {why}"));
    let v: serde_json::Value = serde_json::from_str(body).map_err(|_| bad("is not JSON"))?;
    let results = v
        .get("results")
        .and_then(serde_json::Value::as_array)
        .ok_or_else(|| bad("has no results"))?
        .iter()
        .map(|r| {
            let index = r.get("index").and_then(serde_json::Value::as_u64)?;
            let relevance_score = r.get("relevance_score").and_then(serde_json::Value::as_f64)?;
            Some(pb::RankedDocument { index: u32::try_from(index).ok()?, relevance_score })
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| bad("has a result without an index and a score"))?;
    let usage = |k: &str| v.get("usage").and_then(|u| u.get(k)).and_then(serde_json::Value::as_u64);
    Ok(pb::RerankResponse {
        results,
        prompt_tokens: usage("prompt_tokens").or_else(|| usage("total_tokens")).unwrap_or(0) as u32,
        model: v.get("model").and_then(serde_json::Value::as_str).unwrap_or_default().to_string(),
    })
}

/// An engine's OpenAI embeddings answer as an EmbedResponse.
fn embed_response(body: &str) -> Result<pb::EmbedResponse, Status> {
    let bad = |why: &str| Status::internal(format!("the engine's embeddings answer {why}"));
    let v: serde_json::Value = serde_json::from_str(body).map_err(|_| bad("is not JSON"))?;
    let data =
        v.get("data").and_then(serde_json::Value::as_array).ok_or_else(|| bad("has no data"))?;
    let mut embeddings = Vec::with_capacity(data.len());
    for (i, d) in data.iter().enumerate() {
        let values = d
            .get("embedding")
            .and_then(serde_json::Value::as_array)
            .ok_or_else(|| bad("has an item without a float vector"))?
            .iter()
            .map(|x| x.as_f64().map(|f| f as f32))
            .collect::<Option<Vec<f32>>>()
            .ok_or_else(|| bad("has a vector with a value that is not a number"))?;
        let index = d.get("index").and_then(serde_json::Value::as_u64).unwrap_or(i as u64);
        embeddings.push(pb::Embedding { index: index as u32, values });
    }
    embeddings.sort_by_key(|e| e.index);
    Ok(pb::EmbedResponse {
        embeddings,
        prompt_tokens: v
            .pointer("/usage/prompt_tokens")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0) as u32,
        model: v.get("model").and_then(serde_json::Value::as_str).unwrap_or_default().to_string(),
    })
}
