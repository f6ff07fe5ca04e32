//! The gRPC surface: `Generate` for clients, `Attach` for workers.

use std::pin::Pin;
use std::time::{Duration, Instant};

use sllm_api::v1 as pb;
use sllm_api::v1::dispatch_server;
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use crate::request::{Event, Input, Job};
use crate::{Dispatch, attach};

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateEvent, Status>> + Send>>;

/// The deadline a gRPC client set (the `grpc-timeout` header), if any.
fn grpc_deadline<T>(request: &Request<T>) -> Option<Instant> {
    let raw = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (num, unit) = raw.split_at(raw.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    let d = match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    Some(Instant::now() + d)
}

fn to_pb(event: Event) -> pb::GenerateEvent {
    let event = match event {
        Event::Progress(p) => pb::generate_event::Event::Progress(p),
        Event::Chunk { text, tokens, logprobs, .. } => {
            pb::generate_event::Event::Chunk(pb::Chunk { text, tokens, logprobs })
        }
        Event::Finished { reason, usage } => pb::generate_event::Event::Finished(pb::Finished {
            reason: reason as i32,
            usage: Some(usage),
        }),
    };
    pb::GenerateEvent { event: Some(event) }
}

#[tonic::async_trait]
impl dispatch_server::Dispatch for Dispatch {
    type GenerateStream = EventStream;
    type AttachStream = attach::Down;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let authorization = request.metadata().get("authorization").and_then(|v| v.to_str().ok());
        self.inner
            .admit(authorization, request.remote_addr().map(|a| a.ip()))
            .await
            .map_err(|e| e.to_status())?;
        let header_deadline = grpc_deadline(&request);
        let traceparent = request
            .metadata()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let req = request.into_inner();
        let input = match req.input {
            Some(pb::generate_request::Input::Prompt(p)) => Input::Prompt(p),
            Some(pb::generate_request::Input::Chat(c)) => Input::Chat(c),
            None => return Err(service::field_status("input", "set `prompt` or `chat`")),
        };
        let field_deadline =
            (req.timeout_ms > 0).then(|| Instant::now() + Duration::from_millis(req.timeout_ms));
        let deadline = match (header_deadline, field_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let job = Job {
            model: req.model,
            input,
            params: req.params.unwrap_or_default(),
            progress: req.progress,
            deadline,
            traceparent,
            entry: "sllm.v1.Dispatch/Generate",
            openai: None,
        };
        let events = self.submit(job).await.map_err(|e| e.to_status())?;
        let stream = ReceiverStream::new(events).map(|r| r.map(to_pb).map_err(|e| e.to_status()));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn attach(
        &self,
        request: Request<Streaming<pb::AttachUp>>,
    ) -> Result<Response<attach::Down>, Status> {
        let peer = request.remote_addr();
        let down = attach::open(self.inner.clone(), request.into_inner(), peer).await?;
        Ok(Response::new(down))
    }
}
