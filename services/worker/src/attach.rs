//! The agent's Attach streams: one to every live Dispatch replica, over which requests for this
//! worker's instances arrive and their output goes back, multiplexed by request id. They run
//! beside the registry session and survive its interruptions, so warm requests keep flowing
//! while the registry (or Redis) is away.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sllm_api::v1 as pb;
use sllm_api::v1::attach_down::Msg as Down;
use sllm_api::v1::attach_up::Msg as Up;
use sllm_api::v1::dispatch_client::DispatchClient;
use telemetry::trace::{Kind, Span};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;

use crate::backend::{Backend, Finish, Generation, Input, Job, Output};

/// Longest a retired stream (one of an older epoch) stays open for the requests it carries.
const RETIRE_GRACE: Duration = Duration::from_secs(300);

/// The set of Attach streams, one per Dispatch endpoint, for the current epoch.
pub(crate) struct Attachments {
    node: String,
    token: Arc<crate::agent::TokenSource>,
    backend: Arc<dyn Backend>,
    tls: Option<tonic::transport::ClientTlsConfig>,
    epoch: u64,
    /// Random id of this agent run, sent in every hello.
    run_id: String,
    live: HashMap<String, LinkHandle>,
    /// Streams of older epochs finishing the requests they carry; cancelled on drop.
    retired: Vec<LinkHandle>,
}

struct LinkHandle {
    cancel: CancellationToken,
    retire: CancellationToken,
    /// The endpoint left the Dispatch list: keep the stream while it lives, do not redial.
    orphan: Arc<AtomicBool>,
    /// The link's task has ended.
    done: Arc<AtomicBool>,
}

impl Attachments {
    pub(crate) fn new(
        node: String,
        token: Arc<crate::agent::TokenSource>,
        backend: Arc<dyn Backend>,
        tls: Option<tonic::transport::ClientTlsConfig>,
    ) -> Attachments {
        Attachments {
            node,
            token,
            backend,
            tls,
            epoch: 0,
            run_id: uuid::Uuid::now_v7().to_string(),
            live: HashMap::new(),
            retired: Vec::new(),
        }
    }

    /// Attaches to `endpoints` with `epoch`. A new epoch (the session moved or was renewed)
    /// attaches everywhere again; the older streams stop taking part once Dispatch has the new
    /// one, but finish the requests they carry, so a client never notices. An endpoint that
    /// left the list keeps its stream while the stream lives (the list says where to dial, not
    /// what to cut: a replica whose registration lapsed during a Redis outage is still serving)
    /// and is not dialled again once it ends.
    pub(crate) fn update(&mut self, endpoints: &[String], epoch: u64) {
        if epoch != self.epoch {
            self.retired.retain(|h| !h.done.load(Ordering::Relaxed));
            for (_, h) in self.live.drain() {
                h.retire.cancel();
                self.retired.push(h);
            }
            self.epoch = epoch;
        }
        self.live.retain(|ep, h| {
            let listed = endpoints.contains(ep);
            h.orphan.store(!listed, Ordering::Relaxed);
            !h.done.load(Ordering::Relaxed)
        });
        for ep in endpoints {
            if self.live.contains_key(ep) {
                continue;
            }
            let handle = LinkHandle {
                cancel: CancellationToken::new(),
                retire: CancellationToken::new(),
                orphan: Arc::new(AtomicBool::new(false)),
                done: Arc::new(AtomicBool::new(false)),
            };
            let link = Link {
                endpoint: ep.clone(),
                node: self.node.clone(),
                token: self.token.clone(),
                epoch,
                run_id: self.run_id.clone(),
                backend: self.backend.clone(),
                tls: self.tls.clone(),
            };
            let (cancel, retire, orphan, done) = (
                handle.cancel.clone(),
                handle.retire.clone(),
                handle.orphan.clone(),
                handle.done.clone(),
            );
            tokio::spawn(async move {
                link.run(cancel, retire, orphan).await;
                done.store(true, Ordering::Relaxed);
            });
            self.live.insert(ep.clone(), handle);
        }
    }

    fn close_all(&mut self) {
        for (_, h) in self.live.drain() {
            h.cancel.cancel();
        }
        for h in self.retired.drain(..) {
            h.cancel.cancel();
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
    token: Arc<crate::agent::TokenSource>,
    epoch: u64,
    run_id: String,
    backend: Arc<dyn Backend>,
    tls: Option<tonic::transport::ClientTlsConfig>,
}

impl Link {
    async fn run(
        self,
        cancel: CancellationToken,
        retire: CancellationToken,
        orphan: Arc<AtomicBool>,
    ) {
        // Redials follow the workspace's one policy (`service::retry`): jittered, doubling
        // from 20 ms to 2 s, and from the start again after a stream that was up.
        let redial = || service::retry::backoff(Duration::from_millis(20), Duration::from_secs(2));
        let mut delays = redial();
        loop {
            if retire.is_cancelled() || orphan.load(Ordering::Relaxed) {
                return;
            }
            let result = tokio::select! {
                _ = cancel.cancelled() => return,
                r = self.attach(&cancel, &retire) => r,
            };
            match result {
                Ok(()) => delays = redial(),
                Err(e) => {
                    tracing::debug!(node = %self.node, endpoint = %self.endpoint, error = %e, "attach failed")
                }
            }
            let delay = delays.next().unwrap_or(Duration::from_secs(2));
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn attach(
        &self,
        cancel: &CancellationToken,
        retire: &CancellationToken,
    ) -> Result<(), String> {
        let endpoint = Endpoint::from_shared(self.endpoint.clone())
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        let channel = crate::agent::secure(endpoint, &self.tls)?
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::channel::<pb::AttachUp>(1024);
        let hello = pb::AttachHello {
            worker_id: self.node.clone(),
            epoch: self.epoch,
            join_token: self.token.current(),
            run_id: self.run_id.clone(),
        };
        tx.send(pb::AttachUp { msg: Some(Up::Hello(hello)) }).await.map_err(|e| e.to_string())?;
        let mut inbound = DispatchClient::new(channel)
            .attach(service::batched::Batched::new(ReceiverStream::new(rx)))
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
        // Once retired: the requests in flight finish, then the stream closes.
        let mut retiring = false;
        let grace = tokio::time::sleep(RETIRE_GRACE);
        tokio::pin!(grace);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = retire.cancelled(), if !retiring => {
                    retiring = true;
                    grace.as_mut().reset(tokio::time::Instant::now() + RETIRE_GRACE);
                    if running.0.is_empty() {
                        break;
                    }
                }
                _ = &mut grace, if retiring => {
                    tracing::warn!(node = %self.node, left = running.0.len(), "retired attach stream closed with requests in flight");
                    break;
                }
                Some(id) = done_rx.recv() => {
                    running.0.remove(&id);
                    if retiring && running.0.is_empty() {
                        break;
                    }
                }
                msg = inbound.message() => match msg {
                    Ok(Some(pb::AttachDown { msg: Some(Down::Request(r)) })) => {
                        let id = r.request_id;
                        // Traced only as part of a traced request (Dispatch sends a context);
                        // recorded directly, not through `tracing`: the request path's cost.
                        let span = Span::remote_child("worker generate", Kind::Server, &r.traceparent);
                        if span.is_recording() {
                            span.set("sllm.worker", &self.node);
                            span.set("sllm.instance", &r.instance_id);
                        }
                        // Flow control: chunks may go up only as Dispatch's client reads them.
                        let credit = (r.window > 0)
                            .then(|| Arc::new(Semaphore::new(r.window as usize)));
                        let fut = serve_request(self.backend.clone(), r, tx.clone(), done_tx.clone(), credit.clone(), span);
                        let task = tokio::spawn(fut);
                        running.0.insert(id, (task.abort_handle(), credit));
                    }
                    Ok(Some(pb::AttachDown { msg: Some(Down::Credit(c)) })) => {
                        if let Some((_, Some(credit))) = running.0.get(&c.request_id) {
                            credit.add_permits((c.chunks as usize).min(Semaphore::MAX_PERMITS / 2));
                        }
                    }
                    Ok(Some(pb::AttachDown { msg: Some(Down::UnloadAdapter(u)) })) => {
                        self.backend.unload_adapter(&u.instance_id, &u.name);
                    }
                    Ok(Some(pb::AttachDown { msg: Some(Down::Cancel(c)) })) => {
                        if let Some((task, _)) = running.0.remove(&c.request_id) {
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
        // Retired: close our half so everything sent so far is read, and let Dispatch end
        // the stream (dropping it here would reset it and could discard the last messages).
        drop(running);
        drop(tx);
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while let Ok(Some(_)) = inbound.message().await {}
        })
        .await;
        Ok(())
    }
}

/// Requests in progress: each one's task, and the chunks it may still send (None: no limit).
#[derive(Default)]
struct Running(HashMap<u64, (tokio::task::AbortHandle, Option<Arc<Semaphore>>)>);

impl Drop for Running {
    fn drop(&mut self) {
        for (_, (task, _)) in self.0.drain() {
            task.abort();
        }
    }
}

async fn serve_request(
    backend: Arc<dyn Backend>,
    r: pb::InferenceRequest,
    tx: mpsc::Sender<pb::AttachUp>,
    done: mpsc::UnboundedSender<u64>,
    credit: Option<Arc<Semaphore>>,
    span: Span,
) {
    let id = r.request_id;
    let input = match r.input {
        Some(pb::inference_request::Input::Chat(c)) => Input::Chat(c.messages),
        Some(pb::inference_request::Input::Prompt(p)) => Input::Prompt(p),
        None => Input::Prompt(String::new()),
    };
    let job = Job {
        instance_id: r.instance_id,
        input,
        params: r.params.unwrap_or_default(),
        openai: r.openai,
        traceparent: span.traceparent(),
        adapter: r.adapter,
        baggage: r.baggage,
        continuation: r.continuation,
    };
    let Generation { run, output } = backend.generate(job);
    // The backend's work runs in this task, beside the relay of its output. Once it ends it
    // waits here while the relay reads what it left; a relay that ends first cancels it.
    let run = async move {
        run.await;
        std::future::pending::<()>().await
    };
    tokio::select! {
        () = relay(id, output, tx, credit, &span) => {}
        () = run => {}
    }
    let _ = done.send(id);
}

/// Sends a request's output up the Attach stream as it comes, each text chunk once `credit`
/// allows, until the output ends or Dispatch stops listening.
async fn relay(
    id: u64,
    mut out: mpsc::Receiver<Output>,
    tx: mpsc::Sender<pb::AttachUp>,
    credit: Option<Arc<Semaphore>>,
    span: &Span,
) {
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
        // A chunk waits for credit; while it waits the backend is not read, so generation
        // pauses too (an engine's stream stops being read). What piled up meanwhile goes up as
        // one chunk.
        if let (Output::Text { .. }, Some(credit)) = (&o, &credit) {
            match credit.acquire().await {
                Ok(permit) => permit.forget(),
                Err(_) => break,
            }
        }
        let msg = match o {
            Output::Started => Up::Started(pb::WorkerStarted { request_id: id }),
            Output::Text {
                mut text,
                mut tokens,
                mut events,
                mut logprobs,
                mut token_ids,
                mut prompt_token_ids,
            } => {
                // Text already waiting goes up in one message: under load the stream carries
                // fewer, larger chunks instead of falling behind. Engine events stay one each.
                while text.len() < 16 * 1024 {
                    match out.try_recv() {
                        Ok(Output::Text {
                            text: t,
                            tokens: n,
                            events: e,
                            logprobs: l,
                            token_ids: i,
                            prompt_token_ids: p,
                        }) => {
                            text.push_str(&t);
                            tokens += n;
                            events.extend(e);
                            logprobs.extend(l);
                            token_ids.extend(i);
                            prompt_token_ids.extend(p);
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
                Up::Chunk(pb::WorkerChunk {
                    request_id: id,
                    text,
                    tokens,
                    events,
                    logprobs,
                    token_ids,
                    prompt_token_ids,
                })
            }
            Output::Done { finish, prompt_tokens, completion_tokens } => {
                span.set("gen_ai.usage.output_tokens", completion_tokens);
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
            Output::Error(f) => {
                telemetry::metrics::WORKER.requests.with_label_values(&["error"]).inc();
                span.set("error.type", "backend_error");
                span.fail(f.message.as_str());
                Up::Error(pb::WorkerError {
                    request_id: id,
                    code: f.kind.code() as i32,
                    message: f.message,
                    http_status: u32::from(f.http_status),
                    body: f.body,
                })
            }
        };
        if tx.send(pb::AttachUp { msg: Some(msg) }).await.is_err() {
            break;
        }
    }
}
