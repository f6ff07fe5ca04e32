//! The worker agent: one task per host that keeps a `Session` with any WorkerRegistry replica,
//! reconnecting with jittered exponential backoff, and turns commands into backend calls and
//! backend events into instance reports.
//!
//! No state change is lost across a re-registration. Events that happened before a session's
//! `register` are superseded by the inventory it carries, except terminal ones (stopped,
//! failed), which the inventory cannot express: those are kept, with every terminal report the
//! registry has not confirmed yet, and sent again first in the next session. Events after the
//! inventory was taken are reported once the worker is ready. A loading or ready event is
//! reported as the instance's state at the time of sending, so a late event never moves an
//! instance backwards. Every report is idempotent at the registry; sending one twice is harmless.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sllm_api::v1 as pb;
use sllm_api::v1::registry_message::Body as Down;
use sllm_api::v1::worker_message::Body as Up;
use sllm_api::v1::worker_registry_client::WorkerRegistryClient;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::backend::{Backend, InstanceEvent, StartSpec};

/// How an agent joins.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// WorkerRegistry endpoints (`http://host:port`); tried in turn.
    pub registries: Vec<String>,
    /// This host's node id.
    pub node_id: String,
    /// Its join token (used while `join_token_file` is unset or cannot be read).
    pub join_token: String,
    /// A file holding the join token, read again before every registration and attach, so a
    /// re-issued token (a rotated join secret, an expiring token) is picked up without a
    /// restart.
    pub join_token_file: Option<std::path::PathBuf>,
    /// The address it registers (empty: the registry uses the connection's source IP).
    pub address: String,
    /// First reconnect delay; doubles (with jitter) up to `backoff_max`.
    pub backoff_base: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// Longest wait to connect to a registry.
    pub connect_timeout: Duration,
    /// Fault injection: end each session after this long (the agent then reconnects).
    pub drop_session_after: Option<Duration>,
    /// TLS for `https://` registries and Dispatch replicas.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    /// On shutdown: how long the instances' in-flight requests may take to finish before the
    /// instances stop. The agent leaves its session first (the worker is lost at once, so
    /// Dispatch routes nothing new here and moves requests that had no output yet), keeps its
    /// Attach streams while the backend drains, then stops. Zero: stop at once, streams and all.
    pub drain_grace: Duration,
}

/// `endpoint` with `tls` applied when its scheme is `https`.
pub(crate) fn secure(
    endpoint: Endpoint,
    tls: &Option<tonic::transport::ClientTlsConfig>,
) -> Result<Endpoint, String> {
    if endpoint.uri().scheme_str() != Some("https") {
        return Ok(endpoint);
    }
    let tls =
        tls.clone().unwrap_or_else(|| tonic::transport::ClientTlsConfig::new().with_webpki_roots());
    endpoint.tls_config(tls).map_err(|e| format!("TLS: {e}"))
}

impl AgentConfig {
    /// Defaults for `node_id` joining `registries` with `join_token`.
    pub fn new(
        registries: Vec<String>,
        node_id: impl Into<String>,
        join_token: impl Into<String>,
    ) -> Self {
        AgentConfig {
            registries,
            node_id: node_id.into(),
            join_token: join_token.into(),
            join_token_file: None,
            address: String::new(),
            backoff_base: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            drop_session_after: None,
            tls: None,
            drain_grace: Duration::ZERO,
        }
    }
}

/// Where the agent stands, for callers who wait on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentState {
    /// Not (yet) in a session.
    Disconnected {
        /// Why the last session ended or the last attempt failed.
        last_error: String,
    },
    /// Registered and ready, with this epoch.
    Ready {
        /// The session's epoch.
        epoch: u64,
        /// The registry it is connected to.
        registry: String,
    },
}

/// A running agent's handle.
pub struct Agent {
    state: watch::Receiver<AgentState>,
}

impl Agent {
    /// Starts the agent on the current runtime. It runs until `shutdown` is cancelled.
    /// `channel`, if given, is used instead of dialling `config.registries` (many simulated
    /// agents can then share one HTTP/2 connection).
    pub fn spawn(
        config: AgentConfig,
        backend: Arc<dyn Backend>,
        events: mpsc::UnboundedReceiver<InstanceEvent>,
        channel: Option<Channel>,
        shutdown: CancellationToken,
    ) -> Agent {
        let (tx, rx) = watch::channel(AgentState::Disconnected { last_error: "starting".into() });
        let token =
            Arc::new(TokenSource::new(config.join_token.clone(), config.join_token_file.clone()));
        let attachments = crate::attach::Attachments::new(
            config.node_id.clone(),
            token.clone(),
            backend.clone(),
            config.tls.clone(),
        );
        let runner = Runner {
            config,
            attachments,
            token,
            backend,
            events,
            channel,
            state: tx,
            seen_commands: VecDeque::new(),
            seen_set: HashSet::new(),
            unconfirmed: Vec::new(),
        };
        tokio::spawn(runner.run(shutdown));
        Agent { state: rx }
    }

    /// Waits until the agent has stopped: after `shutdown`, once its instances drained (see
    /// [`AgentConfig::drain_grace`]).
    pub async fn stopped(&mut self) {
        // The runner owns the sender: the channel closes when it returns.
        while self.state.changed().await.is_ok() {}
    }

    /// The current state.
    pub fn state(&self) -> AgentState {
        self.state.borrow().clone()
    }

    /// Waits until the agent is ready with an epoch other than `not_epoch` (0: any), or
    /// `within` passes.
    pub async fn wait_ready(&mut self, not_epoch: u64, within: Duration) -> Option<u64> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let AgentState::Ready { epoch, .. } = &*self.state.borrow_and_update()
                && *epoch != not_epoch
            {
                return Some(*epoch);
            }
            if tokio::time::timeout_at(deadline, self.state.changed()).await.ok()?.is_err() {
                return None;
            }
        }
    }
}

/// How many recent command ids are remembered to recognise a repeated delivery.
const SEEN_COMMANDS: usize = 4096;

/// Past the drain grace, how long the agent still waits for its instances to stop (an engine
/// gets SIGTERM, then SIGKILL after its stop grace: `sllm worker --stop-grace-s`, 10 s).
const DRAIN_STOP_ALLOWANCE: Duration = Duration::from_secs(30);

/// Where the agent's join token comes from: its file when there is one, read at each use (a
/// rare event: a registration or an attach), else the token it was given.
#[derive(Debug)]
pub(crate) struct TokenSource {
    /// The token given, then the last one read from the file: used while the file cannot be
    /// read, so a file being rewritten does not cost a reconnect.
    last: std::sync::Mutex<String>,
    file: Option<std::path::PathBuf>,
}

impl TokenSource {
    fn new(token: String, file: Option<std::path::PathBuf>) -> TokenSource {
        TokenSource { last: std::sync::Mutex::new(token), file }
    }

    fn last(&self) -> String {
        // A poisoned lock still holds a whole String (it is only ever replaced whole).
        self.last.lock().map(|t| t.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }

    /// The token to present now.
    pub(crate) fn current(&self) -> String {
        let Some(path) = &self.file else { return self.last() };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot read the join token file; using the last token read");
                return self.last();
            }
        };
        let line = text.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#'));
        let Some(token) = line else {
            tracing::warn!(file = %path.display(), "the join token file holds no token; using the last token read");
            return self.last();
        };
        if let Ok(mut last) = self.last.lock() {
            token.clone_into(&mut last);
        }
        token.to_string()
    }
}

struct Runner {
    config: AgentConfig,
    attachments: crate::attach::Attachments,
    token: Arc<TokenSource>,
    backend: Arc<dyn Backend>,
    events: mpsc::UnboundedReceiver<InstanceEvent>,
    channel: Option<Channel>,
    state: watch::Sender<AgentState>,
    seen_commands: VecDeque<String>,
    seen_set: HashSet<String>,
    /// Terminal reports the registry has not confirmed, each with the first heartbeat sequence
    /// number whose ack confirms it (the registry handles a session's messages in order).
    unconfirmed: Vec<(u64, pb::InstanceReport)>,
}

enum SessionEnd {
    Shutdown,
    /// The session ended after having been ready: reconnect at once.
    Lost(String),
    /// It never got ready: back off.
    Failed(String),
}

impl Runner {
    async fn run(mut self, shutdown: CancellationToken) {
        let mut next_registry = 0usize;
        let mut backoff = self.backoff();
        loop {
            let endpoint = if self.config.registries.is_empty() {
                String::new()
            } else {
                self.config.registries[next_registry % self.config.registries.len()].clone()
            };
            next_registry += 1;
            // Shutdown drops the session at once: the registry sees the stream end and marks
            // the worker lost, which is what stops new requests coming here.
            let end = tokio::select! {
                _ = shutdown.cancelled() => SessionEnd::Shutdown,
                end = self.session(&endpoint) => end,
            };
            let delay = match end {
                SessionEnd::Shutdown => break,
                SessionEnd::Lost(why) => {
                    tracing::warn!(node = %self.config.node_id, %endpoint, %why, "session lost; reconnecting");
                    self.state.send_replace(AgentState::Disconnected { last_error: why });
                    backoff = self.backoff();
                    Duration::ZERO
                }
                SessionEnd::Failed(why) => {
                    tracing::debug!(node = %self.config.node_id, %endpoint, %why, "cannot join");
                    self.state.send_replace(AgentState::Disconnected { last_error: why });
                    backoff.next().unwrap_or(self.config.backoff_max)
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        self.drain().await;
    }

    /// Lets every instance finish its in-flight requests (at most `drain_grace`) and stop, while
    /// the Attach streams (owned by `self`) carry their output. The backend refuses new requests
    /// for a draining instance; Dispatch retries those elsewhere, as it does the requests that
    /// had no output when the worker was lost.
    async fn drain(&self) {
        let grace = self.config.drain_grace;
        let running = self.backend.inventory().running;
        if grace.is_zero() || running.is_empty() {
            return;
        }
        tracing::info!(node = %self.config.node_id, instances = running.len(), grace_s = grace.as_secs_f64(), "draining: in-flight requests finish, then the instances stop");
        for r in &running {
            self.backend.drain(&r.instance_id, grace);
        }
        // The backend stops each instance once its requests are done or the grace has passed;
        // stopping an engine takes its own stop grace on top, which this bound leaves room for.
        let deadline = Instant::now() + grace + DRAIN_STOP_ALLOWANCE;
        while Instant::now() < deadline {
            if self.backend.inventory().running.is_empty() {
                tracing::info!(node = %self.config.node_id, "drained: every instance stopped");
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::warn!(node = %self.config.node_id, "instances still running after the drain grace; leaving them");
    }

    fn backoff(&self) -> impl Iterator<Item = Duration> + use<> {
        service::retry::backoff(self.config.backoff_base, self.config.backoff_max)
    }

    /// Takes the events that queued up before a new session's inventory is read: the inventory
    /// supersedes loading and ready ones; terminal ones join the reports to send again.
    fn take_queued_events(&mut self) {
        while let Ok(event) = self.events.try_recv() {
            if let Some(report) = terminal_report(&event) {
                self.unconfirmed.push((0, report));
            }
        }
    }

    /// The report to send for `event`, given the backend's `running` instances now: a terminal
    /// event as it is; a loading or ready one as the instance's current state (none if it is
    /// draining or gone: the drain's owner, or the terminal event that follows, reports it).
    fn report_now(
        event: InstanceEvent,
        running: &[pb::RunningInstance],
    ) -> Option<pb::InstanceReport> {
        if let Some(report) = terminal_report(&event) {
            return Some(report);
        }
        let (id, load_ms) = match event {
            InstanceEvent::Loading { instance_id } => (instance_id, 0),
            InstanceEvent::Ready { instance_id, load_ms } => (instance_id, load_ms),
            InstanceEvent::Stopped { .. } | InstanceEvent::Failed { .. } => return None,
        };
        let now = running.iter().find(|r| r.instance_id == id)?;
        let state = match pb::InstanceState::try_from(now.state) {
            Ok(s @ (pb::InstanceState::Loading | pb::InstanceState::Ready)) => s,
            _ => return None,
        };
        let load_ms = if state == pb::InstanceState::Ready { load_ms } else { 0 };
        Some(pb::InstanceReport {
            instance_id: id,
            state: state as i32,
            reason: String::new(),
            load_ms,
        })
    }

    async fn connect(&self, endpoint: &str) -> Result<Channel, String> {
        if let Some(ch) = &self.channel {
            return Ok(ch.clone());
        }
        let ep = Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| format!("bad registry endpoint {endpoint:?}: {e}"))?
            .connect_timeout(self.config.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        let ep = secure(ep, &self.config.tls)?;
        ep.connect().await.map_err(|e| format!("cannot connect to {endpoint}: {e}"))
    }

    async fn session(&mut self, endpoint: &str) -> SessionEnd {
        let channel = match self.connect(endpoint).await {
            Ok(c) => c,
            Err(e) => return SessionEnd::Failed(e),
        };
        let mut client = WorkerRegistryClient::new(channel);
        let (tx, rx) = mpsc::channel::<pb::WorkerMessage>(256);
        // Before the inventory is read: whatever queued until now is in it, or kept to resend.
        self.take_queued_events();
        let register = pb::Register {
            node_id: self.config.node_id.clone(),
            join_token: self.token.current(),
            address: self.config.address.clone(),
            inventory: Some(self.backend.inventory()),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
        };
        // The channel has room: this is its first message.
        let _ = tx.send(pb::WorkerMessage { epoch: 0, body: Some(Up::Register(register)) }).await;
        let mut inbound = match client.session(ReceiverStream::new(rx)).await {
            Ok(r) => r.into_inner(),
            Err(s) => return SessionEnd::Failed(format!("{:?}: {}", s.code(), s.message())),
        };
        let registered = match inbound.message().await {
            Ok(Some(pb::RegistryMessage { body: Some(Down::Registered(r)) })) => r,
            Ok(other) => return SessionEnd::Failed(format!("expected Registered, got {other:?}")),
            Err(s) => return SessionEnd::Failed(format!("{:?}: {}", s.code(), s.message())),
        };
        let epoch = registered.epoch;
        telemetry::metrics::WORKER.sessions.with_label_values(&[] as &[&str]).inc();
        self.attachments.update(&registered.dispatch_endpoints, epoch);
        let send = |body: Up| {
            let tx = tx.clone();
            async move { tx.send(pb::WorkerMessage { epoch, body: Some(body) }).await.is_ok() }
        };
        // Terminal reports first: an instance that ended is absent from the inventory, and once
        // it is terminal in Redis the readiness reconciliation leaves it alone. Each is confirmed
        // by the ack of heartbeat 1 or later.
        for (confirm_at, report) in &mut self.unconfirmed {
            *confirm_at = 1;
            if !send(Up::InstanceReport(report.clone())).await {
                return SessionEnd::Failed("session closed before ready".into());
            }
        }
        if !send(Up::Ready(pb::WorkerReady {})).await {
            return SessionEnd::Failed("session closed before ready".into());
        }

        let interval = Duration::from_millis(registered.heartbeat_interval_ms.max(10));
        let mut heartbeat =
            tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = 0u64;
        let drop_at = self.config.drop_session_after.map(|d| Instant::now() + d);
        loop {
            let drop_in = drop_at.map(|t| t.saturating_duration_since(Instant::now()));
            tokio::select! {
                _ = heartbeat.tick() => {
                    seq += 1;
                    if !send(Up::Heartbeat(pb::Heartbeat { seq })).await {
                        return SessionEnd::Lost("session closed".into());
                    }
                }
                msg = inbound.message() => match msg {
                    Ok(Some(pb::RegistryMessage { body: Some(Down::Command(cmd)) })) => {
                        let (ack, failure) = self.command(cmd);
                        if let Some(report) = failure
                            && !send(Up::InstanceReport(report)).await
                        {
                            return SessionEnd::Lost("session closed".into());
                        }
                        if !send(Up::CommandAck(ack)).await {
                            return SessionEnd::Lost("session closed".into());
                        }
                    }
                    Ok(Some(pb::RegistryMessage { body: Some(Down::Placeable(_)) })) => {
                        self.state.send_replace(AgentState::Ready { epoch, registry: endpoint.to_string() });
                        tracing::info!(node = %self.config.node_id, epoch, %endpoint, "joined");
                    }
                    Ok(Some(pb::RegistryMessage { body: Some(Down::Dispatchers(d)) })) => {
                        self.attachments.update(&d.endpoints, epoch);
                    }
                    Ok(Some(pb::RegistryMessage { body: Some(Down::HeartbeatAck(ack)) })) => {
                        self.unconfirmed.retain(|(confirm_at, _)| *confirm_at > ack.seq);
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => return SessionEnd::Lost("registry closed the session".into()),
                    Err(s) => return SessionEnd::Lost(format!("{:?}: {}", s.code(), s.message())),
                },
                Some(event) = self.events.recv() => {
                    let inventory = self.backend.inventory();
                    if let Some(report) = Self::report_now(event, &inventory.running) {
                        if report.state != pb::InstanceState::Loading as i32
                            && report.state != pb::InstanceState::Ready as i32
                        {
                            // Kept until a heartbeat ack shows the registry handled it.
                            self.unconfirmed.push((seq + 1, report.clone()));
                        }
                        if !send(Up::InstanceReport(report)).await {
                            return SessionEnd::Lost("session closed".into());
                        }
                    }
                    // Loads move checkpoints between tiers: tell the placement what is where.
                    if !send(Up::Inventory(inventory)).await {
                        return SessionEnd::Lost("session closed".into());
                    }
                }
                _ = sleep_opt(drop_in) => return SessionEnd::Lost("session dropped (fault injection)".into()),
            }
        }
    }

    /// Carries out a command (once per command id) and returns its acknowledgement, plus a
    /// FAILED report when a start was refused (so the control plane places it elsewhere now).
    fn command(&mut self, cmd: pb::Command) -> (pb::CommandAck, Option<pb::InstanceReport>) {
        let id = cmd.command_id.clone();
        if self.seen_set.contains(&id) {
            return (pb::CommandAck { command_id: id, ok: true, error: String::new() }, None);
        }
        self.seen_set.insert(id.clone());
        self.seen_commands.push_back(id.clone());
        if self.seen_commands.len() > SEEN_COMMANDS
            && let Some(old) = self.seen_commands.pop_front()
        {
            self.seen_set.remove(&old);
        }
        let result = match cmd.action {
            Some(pb::command::Action::Start(s)) => {
                let instance_id = s.instance_id.clone();
                let spec = StartSpec {
                    instance_id: s.instance_id,
                    model: s.model,
                    backend: s.backend,
                    gpus: s.gpus,
                    backend_config: s.backend_config,
                    traceparent: s.traceparent,
                };
                self.backend.start(spec).map_err(|e| (instance_id, e.to_string()))
            }
            Some(pb::command::Action::Stop(s)) => {
                self.backend.stop(&s.instance_id);
                Ok(())
            }
            Some(pb::command::Action::Drain(d)) => {
                self.backend.drain(&d.instance_id, Duration::from_millis(d.grace_ms.max(1)));
                Ok(())
            }
            None => Err((String::new(), "command has no action".to_string())),
        };
        match result {
            Ok(()) => (pb::CommandAck { command_id: id, ok: true, error: String::new() }, None),
            Err((instance, error)) => {
                tracing::warn!(node = %self.config.node_id, command = %id, %error, "command refused");
                let report = (!instance.is_empty()).then(|| pb::InstanceReport {
                    instance_id: instance,
                    state: pb::InstanceState::Failed as i32,
                    reason: error.clone(),
                    load_ms: 0,
                });
                (pb::CommandAck { command_id: id, ok: false, error }, report)
            }
        }
    }
}

/// The report of a stopped or failed instance; None for loading and ready.
fn terminal_report(event: &InstanceEvent) -> Option<pb::InstanceReport> {
    let (instance_id, state, reason) = match event {
        InstanceEvent::Stopped { instance_id, reason } => {
            (instance_id, pb::InstanceState::Stopped, reason)
        }
        InstanceEvent::Failed { instance_id, reason } => {
            (instance_id, pb::InstanceState::Failed, reason)
        }
        InstanceEvent::Loading { .. } | InstanceEvent::Ready { .. } => return None,
    };
    Some(pb::InstanceReport {
        instance_id: instance_id.clone(),
        state: state as i32,
        reason: reason.clone(),
        load_ms: 0,
    })
}

async fn sleep_opt(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}
