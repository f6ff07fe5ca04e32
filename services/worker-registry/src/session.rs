//! One worker's session on this replica: a task that owns the session's state (worker id,
//! epoch, commands delivered but not yet acknowledged) and reacts to the worker's messages, to
//! pokes when its command stream grows, and to being closed.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kvstore::{Actor, Error, InstanceStatus, LostMode, Refusal};
use prost::Message;
use service::convert;
use sllm_api::v1 as pb;
use sllm_api::v1::registry_message::Body as Down;
use sllm_api::v1::worker_message::Body as Up;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

use crate::Registry;
use crate::sessions::SessionHandle;

type Out = mpsc::Sender<Result<pb::RegistryMessage, Status>>;

/// Why a session ended.
enum End {
    /// The worker's stream ended or broke: the worker is lost at once.
    Dropped(String),
    /// The worker must register again (a newer epoch exists, or its lease expired).
    Fenced(Status),
    /// The worker broke the protocol.
    Protocol(Status),
    /// This replica closed it (a newer session here, or shutdown).
    Closed,
    /// Redis could not record what the worker said, even after retries.
    Unavailable(Status),
}

struct Session {
    registry: Registry,
    worker: String,
    epoch: u64,
    out: Out,
    poke: Arc<Notify>,
    close: CancellationToken,
    ready: bool,
    running: Vec<pb::RunningInstance>,
    /// Commands sent and not yet acknowledged: (command id, stream id), in stream order.
    delivered: VecDeque<(String, String)>,
    /// Stream id of the last command sent.
    after: String,
    /// Live Dispatch replicas.
    dispatchers: tokio::sync::watch::Receiver<Vec<String>>,
    /// When the last heartbeat arrived.
    last_heartbeat: std::time::Instant,
}

pub(crate) async fn run(
    registry: Registry,
    mut inbound: Streaming<pb::WorkerMessage>,
    out: Out,
    peer: Option<SocketAddr>,
) {
    let mut session = match open(registry, &mut inbound, out.clone(), peer).await {
        Ok(s) => s,
        Err(status) => {
            tracing::info!(code = ?status.code(), message = status.message(), "registration refused");
            let _ = out.send(Err(status)).await;
            return;
        }
    };
    let end = session.serve(&mut inbound).await;
    session.finish(end).await;
}

async fn open(
    registry: Registry,
    inbound: &mut Streaming<pb::WorkerMessage>,
    out: Out,
    peer: Option<SocketAddr>,
) -> Result<Session, Status> {
    let config = &registry.inner.config;
    let first = tokio::time::timeout(config.register_timeout, inbound.message())
        .await
        .map_err(|_| {
            Status::deadline_exceeded("no register message within the registration timeout")
        })?
        .map_err(|s| {
            Status::cancelled(format!("session ended before registering: {}", s.message()))
        })?;
    let Some(pb::WorkerMessage { body: Some(Up::Register(register)), .. }) = first else {
        return Err(Status::invalid_argument("the first message of a session must be `register`"));
    };
    let address = if register.address.is_empty() {
        peer.map(|p| p.ip().to_string()).unwrap_or_default()
    } else {
        register.address.clone()
    };
    let inventory = register.inventory.clone().unwrap_or_default();
    let kv_inventory = convert::inventory_from_pb(&inventory)?;
    let running = inventory.running.clone();
    convert::running_from_pb(&running)?;
    // The node id's shape, then its token, before any Redis call: a stranger's session costs
    // this replica a hash, never a script run.
    kvstore::names::validate_id("node_id", &register.node_id)
        .map_err(|e| service::to_status(e, "register"))?;
    config.join_secrets.verify(&register.node_id, &register.join_token)?;
    // Named, so that a call that timed out (and may have run) can be made again without
    // bumping the epoch twice: a worker whose Redis was slow is answered late, not refused.
    let attempt = uuid::Uuid::now_v7().to_string();
    let store = &registry.inner.store;
    let registration = retry(&registry, "register", || {
        store.register_worker_as(
            &attempt,
            &register.node_id,
            true,
            &address,
            config.lease,
            &kv_inventory,
            &register.agent_version,
        )
    })
    .await
    .map_err(|e| unavailable_or(e, "register", "retry with backoff"))?;
    let worker = register.node_id;
    let poke = Arc::new(Notify::new());
    let close = CancellationToken::new();
    registry.inner.sessions.insert(
        &worker,
        SessionHandle { epoch: registration.epoch, poke: poke.clone(), close: close.clone() },
    );
    tracing::info!(worker = %worker, epoch = registration.epoch, %address, "worker registered");
    let mut dispatchers = registry.inner.dispatchers.subscribe();
    let registered = pb::Registered {
        worker_id: worker.clone(),
        epoch: registration.epoch,
        lease_ms: config.lease.as_millis() as u64,
        heartbeat_interval_ms: config.heartbeat_interval.as_millis() as u64,
        dispatch_endpoints: dispatchers.borrow_and_update().clone(),
    };
    let session = Session {
        registry: registry.clone(),
        worker,
        epoch: registration.epoch,
        out,
        poke,
        close,
        ready: false,
        running,
        delivered: VecDeque::new(),
        after: String::new(),
        dispatchers,
        last_heartbeat: std::time::Instant::now(),
    };
    session.send(Down::Registered(registered)).await;
    Ok(session)
}

impl Session {
    async fn send(&self, body: Down) {
        // A closed receiver means the worker is gone; the inbound side notices that too.
        let _ = self.out.send(Ok(pb::RegistryMessage { body: Some(body) })).await;
    }

    async fn serve(&mut self, inbound: &mut Streaming<pb::WorkerMessage>) -> End {
        loop {
            tokio::select! {
                biased;
                _ = self.close.cancelled() => return End::Closed,
                msg = inbound.message() => match msg {
                    Ok(Some(m)) => {
                        if let Some(end) = self.handle(m).await {
                            return end;
                        }
                    }
                    Ok(None) => return End::Dropped("session closed by the worker".into()),
                    Err(s) => return End::Dropped(format!("session broken: {}", s.message())),
                },
                Ok(()) = self.dispatchers.changed() => {
                    let endpoints = self.dispatchers.borrow_and_update().clone();
                    self.send(Down::Dispatchers(pb::Dispatchers { endpoints })).await;
                }
                _ = self.poke.notified(), if self.ready => {
                    if let Some(end) = self.deliver().await {
                        return end;
                    }
                }
            }
        }
    }

    async fn handle(&mut self, m: pb::WorkerMessage) -> Option<End> {
        if m.epoch != self.epoch {
            return Some(End::Fenced(Status::failed_precondition(format!(
                "message carries epoch {} but this session's epoch is {}",
                m.epoch, self.epoch
            ))));
        }
        let store = self.registry.inner.store.clone();
        match m.body {
            None => Some(End::Protocol(Status::invalid_argument("message has no body"))),
            Some(Up::Register(_)) => Some(End::Protocol(Status::invalid_argument(
                "register is only allowed as the first message of a session",
            ))),
            Some(Up::Heartbeat(hb)) => {
                let m = &*telemetry::metrics::WORKER_REGISTRY;
                m.heartbeats.with_label_values(&[] as &[&str]).inc();
                m.heartbeat_gap
                    .with_label_values(&[] as &[&str])
                    .observe(self.last_heartbeat.elapsed().as_secs_f64());
                self.last_heartbeat = std::time::Instant::now();
                match store
                    .heartbeat(&self.worker, self.epoch, self.registry.inner.config.lease)
                    .await
                {
                    Ok(deadline) => {
                        self.send(Down::HeartbeatAck(pb::HeartbeatAck {
                            seq: hb.seq,
                            lease_deadline_unix_ms: deadline,
                        }))
                        .await;
                        None
                    }
                    // The lease, not one call, decides whether the worker is alive.
                    Err(e) => self.store_error(e, "heartbeat", true),
                }
            }
            Some(Up::Inventory(inv)) => {
                let kv = match convert::inventory_from_pb(&inv) {
                    Ok(kv) => kv,
                    Err(s) => return Some(End::Protocol(s)),
                };
                if let Err(s) = convert::running_from_pb(&inv.running) {
                    return Some(End::Protocol(s));
                }
                if !self.ready {
                    self.running = inv.running;
                }
                let r = retry(&self.registry, "inventory", || {
                    store.update_inventory(&self.worker, self.epoch, &kv)
                })
                .await;
                r.err().and_then(|e| self.store_error(e, "inventory", false))
            }
            Some(Up::Ready(_)) => self.ready().await,
            Some(Up::InstanceReport(report)) => self.report(report).await,
            Some(Up::CommandAck(ack)) => self.ack(ack).await,
        }
    }

    async fn ready(&mut self) -> Option<End> {
        if self.ready {
            return None;
        }
        let running = match convert::running_from_pb(&self.running) {
            Ok(r) => r,
            Err(s) => return Some(End::Protocol(s)),
        };
        let store = self.registry.inner.store.clone();
        let r = retry(&self.registry, "ready", || {
            store.worker_ready(&self.worker, self.epoch, &running)
        })
        .await;
        let unknown = match r {
            Ok(u) => u,
            Err(e) => return self.store_error(e, "ready", false),
        };
        self.ready = true;
        tracing::info!(worker = %self.worker, epoch = self.epoch, "worker ready");
        self.send(Down::Placeable(pb::Placeable { unknown_instances: unknown.clone() })).await;
        for instance in unknown {
            // It runs something the control plane never placed on it: stop it.
            self.stop_directly(&instance, "not placed on this worker").await;
        }
        self.after = match store.command_cursor(&self.worker).await {
            Ok(c) => c,
            Err(e) => return self.store_error(e, "command cursor", false),
        };
        self.deliver().await
    }

    async fn report(&mut self, report: pb::InstanceReport) -> Option<End> {
        let status = match convert::instance_state_from_pb(report.state) {
            Some(
                s @ (InstanceStatus::Loading
                | InstanceStatus::Ready
                | InstanceStatus::Stopped
                | InstanceStatus::Failed),
            ) => s,
            _ => {
                return Some(End::Protocol(service::field_status(
                    "instance_report.state",
                    "must be LOADING, READY, STOPPED or FAILED",
                )));
            }
        };
        let store = self.registry.inner.store.clone();
        let actor = Actor::Worker { worker_id: &self.worker, epoch: self.epoch };
        let r = retry(&self.registry, "instance report", || {
            store.transition_instance(&report.instance_id, status, actor, &report.reason, None)
        })
        .await;
        match r {
            Ok(t) => {
                if t.changed {
                    tracing::info!(worker = %self.worker, instance = %report.instance_id, state = %status, reason = %report.reason, "instance report");
                }
                None
            }
            Err(Error::Invalid { field, reason }) => Some(End::Protocol(service::field_status(
                &format!("instance_report.{field}"),
                reason,
            ))),
            Err(e) => match e.refusal() {
                Some(
                    Refusal::NotFound | Refusal::WrongWorker { .. } | Refusal::WrongState { .. },
                ) if matches!(status, InstanceStatus::Loading | InstanceStatus::Ready) => {
                    // The worker runs an instance the control plane has let go of.
                    tracing::warn!(worker = %self.worker, instance = %report.instance_id, error = %e, "report refused; stopping the instance");
                    self.stop_directly(&report.instance_id, &e.to_string()).await;
                    None
                }
                Some(Refusal::StaleEpoch { .. } | Refusal::WorkerLost) => {
                    self.store_error(e, "instance report", false)
                }
                Some(_) => {
                    tracing::info!(worker = %self.worker, instance = %report.instance_id, error = %e, "report refused");
                    None
                }
                None => self.store_error(e, "instance report", false),
            },
        }
    }

    async fn ack(&mut self, ack: pb::CommandAck) -> Option<End> {
        if !ack.ok {
            tracing::warn!(worker = %self.worker, command = %ack.command_id, error = %ack.error, "worker refused a command");
        }
        let Some(pos) = self.delivered.iter().position(|(cid, _)| *cid == ack.command_id) else {
            // A direct command (not from the stream), or a repeat: nothing to advance.
            return None;
        };
        let stream_id = self.delivered[pos].1.clone();
        let store = self.registry.inner.store.clone();
        match retry(&self.registry, "command ack", || store.ack_command(&self.worker, &stream_id))
            .await
        {
            Ok(_) => {
                self.delivered.drain(..=pos);
                None
            }
            Err(e) => self.store_error(e, "command ack", false),
        }
    }

    /// Sends every command of the worker's stream after the last one sent.
    async fn deliver(&mut self) -> Option<End> {
        let store = self.registry.inner.store.clone();
        loop {
            let batch = match store.read_commands(&self.worker, &self.after, 64).await {
                Ok(b) => b,
                Err(e) => return self.store_error(e, "read commands", true),
            };
            let full = batch.len() == 64;
            for entry in batch {
                self.after = entry.stream_id.clone();
                match pb::Command::decode(entry.body.as_slice()) {
                    Ok(mut command) => {
                        command.command_id = entry.command_id.clone();
                        self.delivered.push_back((entry.command_id, entry.stream_id));
                        self.send(Down::Command(command)).await;
                    }
                    Err(e) => {
                        // Unreadable: skip it rather than block every later command behind it.
                        tracing::error!(worker = %self.worker, command = %entry.command_id, error = %e, "undecodable command skipped");
                        if let Err(e) = store.ack_command(&self.worker, &entry.stream_id).await {
                            return self.store_error(e, "command ack", false);
                        }
                    }
                }
            }
            if !full {
                return None;
            }
        }
    }

    async fn stop_directly(&self, instance: &str, why: &str) {
        tracing::info!(worker = %self.worker, %instance, why, "stopping an instance the control plane does not place here");
        let command = pb::Command {
            command_id: format!("reconcile-{instance}-{}", self.epoch),
            action: Some(pb::command::Action::Stop(pb::StopInstance {
                instance_id: instance.to_string(),
            })),
        };
        self.send(Down::Command(command)).await;
    }

    /// What a kvstore error on `what` means for the session. `tolerate` keeps the session on a
    /// Redis outage (a heartbeat may fail; the lease decides); other calls come here after
    /// [`retry`] gave up on Redis, a whole lease later.
    fn store_error(&self, e: Error, what: &str, tolerate: bool) -> Option<End> {
        match e.refusal() {
            Some(Refusal::StaleEpoch { current }) => {
                Some(End::Fenced(Status::failed_precondition(format!(
                    "{what}: epoch {} is stale (current epoch is {current}); register again",
                    self.epoch
                ))))
            }
            Some(Refusal::WorkerLost) => Some(End::Fenced(Status::failed_precondition(format!(
                "{what}: the worker's lease expired; register again"
            )))),
            Some(Refusal::NotFound) => Some(End::Fenced(Status::failed_precondition(format!(
                "{what}: the worker is not registered; register again"
            )))),
            Some(_) => {
                tracing::info!(worker = %self.worker, error = %e, "{what} refused");
                None
            }
            None if tolerate && e.is_retryable() => {
                self.registry.inner.trouble.note(what, &e);
                None
            }
            None => Some(End::Unavailable(unavailable_or(e, what, "register again"))),
        }
    }

    async fn finish(self, end: End) {
        self.registry.inner.sessions.remove(&self.worker, self.epoch);
        let store = &self.registry.inner.store;
        let status = match end {
            End::Dropped(reason) => {
                match store.worker_lost(&self.worker, self.epoch, LostMode::Dropped, &reason).await
                {
                    Ok(n) => {
                        telemetry::metrics::WORKER_REGISTRY
                            .lost
                            .with_label_values(&["dropped"])
                            .inc();
                        tracing::warn!(worker = %self.worker, epoch = self.epoch, instances = n, %reason, "worker lost")
                    }
                    Err(e) if e.refusal().is_some() => {}
                    Err(e) => {
                        tracing::warn!(worker = %self.worker, error = %e, "cannot mark worker lost; its lease will expire")
                    }
                }
                return;
            }
            End::Fenced(s) | End::Unavailable(s) => s,
            End::Protocol(s) => {
                let _ = store
                    .worker_lost(&self.worker, self.epoch, LostMode::Dropped, s.message())
                    .await;
                s
            }
            End::Closed => Status::unavailable("session closed by the registry; reconnect"),
        };
        tracing::info!(worker = %self.worker, epoch = self.epoch, code = ?status.code(), message = status.message(), "session ended");
        let _ = self.out.send(Err(status)).await;
    }
}

/// Retries a store call that Redis did not answer (it timed out, or Redis is unreachable) for
/// up to one lease, with jittered backoff: a worker is alive until its lease says otherwise,
/// so what its session says is worth recording for that long, and a worker refused sooner
/// would come back to join again, adding load to a Redis that is already behind. Every call
/// retried here is safe to run twice, as a timed-out one may have run: each is fenced by the
/// session's epoch and answers a repeat as it did the first call (register and ready by
/// design, an instance report or command ack by being a no-op the second time).
async fn retry<T, F, Fut>(registry: &Registry, what: &str, f: F) -> kvstore::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = kvstore::Result<T>>,
{
    let again = |e: &Error| {
        let retryable = e.is_retryable();
        if retryable {
            registry.inner.trouble.note(what, e);
        }
        retryable
    };
    let (base, max) = (Duration::from_millis(50), Duration::from_millis(500));
    service::retry::retry_for(registry.inner.config.lease, base, max, f, again).await
}

/// The status for a kvstore error on `what`: for Redis trouble (already reported, once for
/// many calls, by [`crate::trouble`]) an UNAVAILABLE that says so and what to do (`then`).
fn unavailable_or(e: Error, what: &str, then: &str) -> Status {
    if !e.is_retryable() {
        return service::to_status(e, what);
    }
    Status::unavailable(format!(
        "{what}: Redis did not answer in time ({}); {then}",
        service::to_status_quiet(&e, what).message()
    ))
}
