//! The agent's Attach streams: one to every live Dispatch replica, over which requests for this
//! worker's instances arrive and their output goes back, multiplexed by request id. They run
//! beside the registry session and survive its interruptions, so warm requests keep flowing
//! while the registry (or Redis) is away.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sllm_api::v1 as pb;
use sllm_api::v1::attach_down::Msg as Down;
use sllm_api::v1::attach_up::Msg as Up;
use sllm_api::v1::dispatch_client::DispatchClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;

use crate::backend::{Backend, Finish, Job, Output};

/// The set of Attach streams, one per Dispatch endpoint, for the current epoch.
pub(crate) struct Attachments {
    node: String,
    token: String,
    backend: Arc<dyn Backend>,
    epoch: u64,
    live: HashMap<String, CancellationToken>,
}

impl Attachments {
    pub(crate) fn new(node: String, token: String, backend: Arc<dyn Backend>) -> Attachments {
        Attachments { node, token, backend, epoch: 0, live: HashMap::new() }
    }

    /// Attaches to exactly `endpoints` with `epoch` (a new epoch re-attaches everywhere).
    pub(crate) fn update(&mut self, endpoints: &[String], epoch: u64) {
        if epoch != self.epoch {
            self.close_all();
            self.epoch = epoch;
        }
        self.live.retain(|ep, cancel| {
            let keep = endpoints.contains(ep);
            if !keep {
                cancel.cancel();
            }
            keep
        });
        for ep in endpoints {
            if self.live.contains_key(ep) {
                continue;
            }
            let cancel = CancellationToken::new();
            self.live.insert(ep.clone(), cancel.clone());
            let link = Link {
                endpoint: ep.clone(),
                node: self.node.clone(),
                token: self.token.clone(),
                epoch,
                backend: self.backend.clone(),
            };
            tokio::spawn(link.run(cancel));
        }
    }

    fn close_all(&mut self) {
        for (_, c) in self.live.drain() {
            c.cancel();
        }
    }
}

impl Drop for Attachments {
    fn drop(&mut self) {
        self.close_all();
    }
}

struct Link {
    endpoint: String,
    node: String,
    token: String,
    epoch: u64,
    backend: Arc<dyn Backend>,
}

impl Link {
    async fn run(self, cancel: CancellationToken) {
        let mut delay = Duration::from_millis(20);
        loop {
            let result = tokio::select! {
                _ = cancel.cancelled() => return,
                r = self.attach(&cancel) => r,
            };
            match result {
                Ok(()) => delay = Duration::from_millis(20),
                Err(e) => {
                    tracing::debug!(node = %self.node, endpoint = %self.endpoint, error = %e, "attach failed")
                }
            }
            let jitter = Duration::from_millis(rand::random::<u64>() % 20);
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(delay + jitter) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    async fn attach(&self, cancel: &CancellationToken) -> Result<(), String> {
        let channel = Endpoint::from_shared(self.endpoint.clone())
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::channel::<pb::AttachUp>(1024);
        let hello = pb::AttachHello {
            worker_id: self.node.clone(),
            epoch: self.epoch,
            join_token: self.token.clone(),
        };
        tx.send(pb::AttachUp { msg: Some(Up::Hello(hello)) }).await.map_err(|e| e.to_string())?;
        let mut inbound = DispatchClient::new(channel)
            .attach(ReceiverStream::new(rx))
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
            .into_inner();
        match inbound.message().await {
            Ok(Some(pb::AttachDown { msg: Some(Down::Welcome(w)) })) => {
                tracing::info!(node = %self.node, dispatch = %w.dispatch_id, endpoint = %self.endpoint, "attached");
            }
            Ok(other) => return Err(format!("expected Welcome, got {other:?}")),
            Err(s) => return Err(format!("{:?}: {}", s.code(), s.message())),
        }
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<u64>();
        // Requests in progress; aborted when the stream ends, so none outlives its link.
        let mut running = Running::default();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                Some(id) = done_rx.recv() => {
                    running.0.remove(&id);
                }
                msg = inbound.message() => match msg {
                    Ok(Some(pb::AttachDown { msg: Some(Down::Request(r)) })) => {
                        let id = r.request_id;
                        // Traced only as part of a traced request (Dispatch sends a context).
                        let span = if r.traceparent.is_empty() { tracing::Span::none() } else { tracing::info_span!(
                            "worker generate",
                            otel.kind = "server",
                            sllm.worker = %self.node,
                            sllm.instance = %r.instance_id,
                            gen_ai.request.model = %r.model,
                            gen_ai.usage.output_tokens = tracing::field::Empty,
                        ) };
                        telemetry::propagation::set_parent(&span, &r.traceparent);
                        let fut = serve_request(self.backend.clone(), r, tx.clone(), done_tx.clone());
                        let task = tokio::spawn(tracing::Instrument::instrument(fut, span));
                        running.0.insert(id, task.abort_handle());
                    }
                    Ok(Some(pb::AttachDown { msg: Some(Down::Cancel(c)) })) => {
                        if let Some(task) = running.0.remove(&c.request_id) {
                            // Dropping the generation's receiver stops the backend.
                            task.abort();
                            let finished = pb::WorkerFinished {
                                request_id: c.request_id,
                                reason: pb::FinishReason::Cancelled as i32,
                                ..Default::default()
                            };
                            let _ = tx.send(pb::AttachUp { msg: Some(Up::Finished(finished)) }).await;
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => return Ok(()),
                    Err(s) => return Err(format!("{:?}: {}", s.code(), s.message())),
                },
            }
        }
    }
}

#[derive(Default)]
struct Running(HashMap<u64, tokio::task::AbortHandle>);

impl Drop for Running {
    fn drop(&mut self) {
        for (_, task) in self.0.drain() {
            task.abort();
        }
    }
}

/// Renders a chat conversation as the prompt text a completion backend takes.
fn render_chat(chat: &pb::ChatMessages) -> String {
    let mut out = String::new();
    for m in &chat.messages {
        out.push_str(&m.role);
        out.push_str(": ");
        out.push_str(&m.content);
        out.push('\n');
    }
    out.push_str("assistant:");
    out
}

async fn serve_request(
    backend: Arc<dyn Backend>,
    r: pb::InferenceRequest,
    tx: mpsc::Sender<pb::AttachUp>,
    done: mpsc::UnboundedSender<u64>,
) {
    let id = r.request_id;
    let params = r.params.unwrap_or_default();
    let prompt = match r.input {
        Some(pb::inference_request::Input::Prompt(p)) => p,
        Some(pb::inference_request::Input::Chat(c)) => render_chat(&c),
        None => String::new(),
    };
    let job = Job {
        instance_id: r.instance_id,
        prompt,
        max_tokens: params.max_tokens,
        stop: params.stop,
        seed: params.seed.unwrap_or(id),
    };
    let mut out = backend.generate(job);
    // An output taken while merging text that must be sent next.
    let mut held: Option<Output> = None;
    loop {
        let o = match held.take() {
            Some(o) => o,
            None => match out.recv().await {
                Some(o) => o,
                None => break,
            },
        };
        let msg = match o {
            Output::Text { mut text, mut tokens } => {
                // Text already waiting goes up in one message: under load the stream carries
                // fewer, larger chunks instead of falling behind.
                while text.len() < 16 * 1024 {
                    match out.try_recv() {
                        Ok(Output::Text { text: t, tokens: n }) => {
                            text.push_str(&t);
                            tokens += n;
                        }
                        Ok(other) => {
                            held = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                telemetry::metrics::WORKER
                    .tokens
                    .with_label_values(&[] as &[&str])
                    .inc_by(u64::from(tokens));
                Up::Chunk(pb::WorkerChunk { request_id: id, text, tokens })
            }
            Output::Done { finish, prompt_tokens, completion_tokens } => {
                tracing::Span::current().record("gen_ai.usage.output_tokens", completion_tokens);
                telemetry::metrics::WORKER.requests.with_label_values(&["done"]).inc();
                Up::Finished(pb::WorkerFinished {
                    request_id: id,
                    reason: match finish {
                        Finish::Stop => pb::FinishReason::Stop,
                        Finish::Length => pb::FinishReason::Length,
                    } as i32,
                    prompt_tokens,
                    completion_tokens,
                })
            }
            Output::Error(message) => {
                telemetry::metrics::WORKER.requests.with_label_values(&["error"]).inc();
                Up::Error(pb::WorkerError {
                    request_id: id,
                    code: tonic::Code::Unavailable as i32,
                    message,
                })
            }
        };
        if tx.send(pb::AttachUp { msg: Some(msg) }).await.is_err() {
            break;
        }
    }
    let _ = done.send(id);
}
