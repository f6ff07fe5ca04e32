//! Test support for sllm: a private `redis-server` per test or suite (unix socket, no
//! persistence, gone when dropped) and helpers to get a kvstore [`Store`] on it.
//!
//! Nothing here mocks Redis; it starts the real server from Debian's `redis-server` package.
//! What the benchmark programs share (flags, spreads, conditions, processes) is in [`bench`].

pub mod bench;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kvstore::{Store, StoreConfig};

/// A private redis-server, killed (and its directory removed) on drop.
pub struct RedisServer {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts `redis-server` listening only on a unix socket in a fresh temporary directory.
    pub fn start() -> Result<RedisServer> {
        Self::start_with(&[])
    }

    /// Like [`RedisServer::start`], with extra `--name value` arguments.
    pub fn start_with(extra: &[&str]) -> Result<RedisServer> {
        let dir = tempfile::Builder::new().prefix("sllm-redis-").tempdir()?;
        let socket = dir.path().join("r.sock");
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let child = Self::spawn(dir.path(), &socket, &extra)?;
        let server = RedisServer { child, dir, socket, extra };
        server.wait_ready(Duration::from_secs(10))?;
        Ok(server)
    }

    /// A server that writes every change to its append-only file before answering
    /// (`appendfsync always`), so a crash loses nothing it acknowledged.
    pub fn start_persistent() -> Result<RedisServer> {
        Self::start_with(&["--appendonly", "yes", "--appendfsync", "always"])
    }

    fn spawn(dir: &Path, socket: &Path, extra: &[String]) -> Result<Child> {
        Command::new("redis-server")
            .arg("--port")
            .arg("0")
            .arg("--unixsocket")
            .arg(socket)
            .arg("--unixsocketperm")
            .arg("700")
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("no")
            .arg("--dir")
            .arg(dir)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server (install it: apt-get install redis-server)")
    }

    /// Kills the server (SIGKILL: a crash, nothing flushed that was not already) and leaves it
    /// down until [`RedisServer::start_again`].
    pub fn crash(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }

    /// Starts the server again after [`RedisServer::crash`], same socket, directory and
    /// options: with an append-only file it reloads it; without one it starts empty.
    pub fn start_again(&mut self) -> Result<()> {
        self.child = Self::spawn(self.dir.path(), &self.socket, &self.extra)?;
        self.wait_ready(Duration::from_secs(10))
    }

    fn wait_ready(&self, within: Duration) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < within {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        bail!("redis-server did not listen on {} within {within:?}", self.socket.display())
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing answers — an outage.
    pub fn pause(&self) {
        let _ = Command::new("kill").arg("-STOP").arg(self.child.id().to_string()).status();
    }

    /// Ends a [`RedisServer::pause`].
    pub fn resume(&self) {
        let _ = Command::new("kill").arg("-CONT").arg(self.child.id().to_string()).status();
    }

    /// `unix://…` URL of the server.
    pub fn url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The server's directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A store on this server under a namespace no other store of this process uses.
    pub async fn store(&self) -> Result<Store> {
        self.store_with(|_| {}).await
    }

    /// Like [`RedisServer::store`], after `adjust` changed the configuration.
    pub async fn store_with(&self, adjust: impl FnOnce(&mut StoreConfig)) -> Result<Store> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let ns = format!("t{}", NEXT.fetch_add(1, Ordering::Relaxed));
        let mut config = StoreConfig::new(self.url()).with_namespace(ns);
        adjust(&mut config);
        Ok(Store::connect(config).await?)
    }

    /// A plain redis connection, for tests that inspect or damage state by hand.
    pub async fn raw(&self) -> Result<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(self.url())?;
        Ok(client.get_multiplexed_async_connection().await?)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The join secret every test cluster uses.
pub const JOIN_SECRET: &str = "test-join-secret-0123456789";

/// A WorkerRegistry replica served in this process on an ephemeral port.
pub struct RegistryReplica {
    addr: std::net::SocketAddr,
    shutdown: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl RegistryReplica {
    /// Starts a replica over `store` with `lease` and `heartbeat` timing.
    pub async fn start(
        store: Store,
        lease: Duration,
        heartbeat: Duration,
    ) -> Result<RegistryReplica> {
        let secret = service::JoinSecret::new(JOIN_SECRET).map_err(anyhow::Error::msg)?;
        let mut config = worker_registry::RegistryConfig::new(secret);
        config.lease = lease;
        config.heartbeat_interval = heartbeat;
        config.reap_interval = (lease / 4).max(Duration::from_millis(20));
        let registry = worker_registry::Registry::new(store, config);
        let listener = service::Listener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = registry.serve(listener, token).await {
                eprintln!("registry replica failed: {e}");
            }
        });
        Ok(RegistryReplica { addr, shutdown, task })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A gRPC client of this replica.
    pub async fn client(
        &self,
    ) -> Result<sllm_api::v1::worker_registry_client::WorkerRegistryClient<tonic::transport::Channel>>
    {
        Ok(sllm_api::v1::worker_registry_client::WorkerRegistryClient::connect(self.endpoint())
            .await?)
    }

    /// Stops it abruptly: its connections break as if the process died.
    pub fn kill(self) {
        self.task.abort();
    }

    /// Stops it cleanly: sessions are closed and workers told to reconnect.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

/// A simulated worker agent running in this process.
pub struct SimWorker {
    /// The agent's handle.
    pub agent: worker::Agent,
    /// Its backend (to inspect instances or generate).
    pub backend: worker::SimBackend,
    shutdown: tokio_util::sync::CancellationToken,
}

impl SimWorker {
    /// Starts an agent for `node` against `registries`, with a token from [`JOIN_SECRET`].
    pub fn start(registries: Vec<String>, node: &str, sim: worker::SimConfig) -> Result<SimWorker> {
        Self::start_with(registries, node, sim, None, |_| {})
    }

    /// Like [`SimWorker::start`], on a shared channel and with the agent config adjusted.
    pub fn start_with(
        registries: Vec<String>,
        node: &str,
        sim: worker::SimConfig,
        channel: Option<tonic::transport::Channel>,
        adjust: impl FnOnce(&mut worker::AgentConfig),
    ) -> Result<SimWorker> {
        let secret = service::JoinSecret::new(JOIN_SECRET).map_err(anyhow::Error::msg)?;
        let mut config = worker::AgentConfig::new(registries, node, secret.token_for(node));
        config.address = format!("sim-{node}");
        config.backoff_base = Duration::from_millis(20);
        config.backoff_max = Duration::from_millis(500);
        adjust(&mut config);
        let (backend, events) = worker::SimBackend::new(sim);
        let shutdown = tokio_util::sync::CancellationToken::new();
        let agent = worker::Agent::spawn(
            config,
            std::sync::Arc::new(backend.clone()),
            events,
            channel,
            shutdown.clone(),
        );
        Ok(SimWorker { agent, backend, shutdown })
    }

    /// Waits until it is ready with an epoch other than `not_epoch` (0: any).
    pub async fn ready(&mut self, not_epoch: u64) -> Result<u64> {
        self.agent
            .wait_ready(not_epoch, Duration::from_secs(10))
            .await
            .with_context(|| format!("worker not ready: {:?}", self.agent.state()))
    }
}

impl Drop for SimWorker {
    /// Dropping a simulated worker is its host dying: agent and instances go at once.
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.backend.crash();
    }
}

/// A worker's `Session` driven by hand, message by message: for tests of what the registry
/// believes, refuses and commands, with nothing of the agent in between.
pub struct RawSession {
    /// What the test sends up.
    pub tx: tokio::sync::mpsc::Sender<sllm_api::v1::WorkerMessage>,
    /// What the registry sends down.
    pub inbound: tonic::Streaming<sllm_api::v1::RegistryMessage>,
    /// The epoch of `Registered`.
    pub epoch: u64,
}

impl RawSession {
    /// Opens a session and sends `first` (normally a `Register`); the registry's refusal, or
    /// its `Registered` as the session.
    pub async fn open(
        endpoint: &str,
        first: sllm_api::v1::WorkerMessage,
    ) -> Result<RawSession, tonic::Status> {
        use sllm_api::v1::registry_message::Body as Down;
        let mut client = sllm_api::v1::worker_registry_client::WorkerRegistryClient::connect(
            endpoint.to_string(),
        )
        .await
        .map_err(|e| tonic::Status::unavailable(format!("cannot connect: {e}")))?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        // The receiver is alive: it was just made and is handed over below.
        let _ = tx.send(first).await;
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut inbound = client.session(stream).await?.into_inner();
        match inbound.message().await? {
            Some(sllm_api::v1::RegistryMessage { body: Some(Down::Registered(r)) }) => {
                Ok(RawSession { tx, inbound, epoch: r.epoch })
            }
            other => Err(tonic::Status::internal(format!("expected Registered, got {other:?}"))),
        }
    }

    /// Sends `body` at the session's epoch.
    pub async fn send(&self, body: sllm_api::v1::worker_message::Body) {
        self.send_epoch(self.epoch, body).await;
    }

    /// Sends `body` at `epoch`.
    pub async fn send_epoch(&self, epoch: u64, body: sllm_api::v1::worker_message::Body) {
        // The registry may already have closed the stream; the next read says why.
        let _ = self.tx.send(sllm_api::v1::WorkerMessage { epoch, body: Some(body) }).await;
    }

    /// The next message that is not a heartbeat ack, or the status the stream ended with
    /// (DEADLINE_EXCEEDED when the registry says nothing for 10 s).
    pub async fn next(&mut self) -> Result<Option<sllm_api::v1::RegistryMessage>, tonic::Status> {
        use sllm_api::v1::registry_message::Body as Down;
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), self.inbound.message())
                .await
                .map_err(|_| {
                tonic::Status::deadline_exceeded("the registry said nothing for 10 s")
            })??;
            if !matches!(
                m,
                Some(sllm_api::v1::RegistryMessage { body: Some(Down::HeartbeatAck(_)) })
            ) {
                return Ok(m);
            }
        }
    }
}

/// A deployment of the simulator's backend, one GPU an instance, `min`..=`max` instances and a
/// keep-alive of a minute: what most tests deploy.
pub fn sim_deployment(model: &str, min: u32, max: u32) -> kvstore::DeploymentSpec {
    kvstore::DeploymentSpec {
        model: model.into(),
        backend: "sim".into(),
        num_gpus: 1,
        autoscaling: kvstore::AutoScaling {
            min_instances: min,
            max_instances: max,
            keep_alive_s: 60,
            ..Default::default()
        },
        backend_config: String::new(),
    }
}

/// What [`curl_post`] got back.
pub struct Posted {
    pub status: u16,
    /// The response's header lines, as curl printed them.
    pub head: String,
    pub body: String,
}

impl Posted {
    /// A header's value (the first of that name), or "".
    pub fn header(&self, name: &str) -> &str {
        self.head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim())
            })
            .unwrap_or_default()
    }
}

/// POSTs JSON `body` to `url` with curl, as a user would (unbuffered, so a stream arrives
/// whole), within a minute.
pub async fn curl_post(url: &str, body: &serde_json::Value) -> Posted {
    let o = tokio::process::Command::new("curl")
        .args(["-s", "-N", "--max-time", "60", "-D", "-", "-w", "\n%{http_code}"])
        .args(["-H", "Content-Type: application/json", "-d", &body.to_string()])
        .arg(url)
        .output()
        .await
        .unwrap_or_else(|e| panic!("curl: {e}"));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let (head, rest) = out.split_once("\r\n\r\n").unwrap_or(("", out.as_str()));
    let (body, status) = rest.rsplit_once('\n').unwrap_or((rest, ""));
    Posted {
        status: status.trim().parse().unwrap_or(0),
        head: head.to_string(),
        body: body.to_string(),
    }
}

/// Polls `f` every 10 ms until it returns Some, or fails after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if start.elapsed() > within {
            bail!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The `sllm` binary built next to the test executable (`cargo nextest run --workspace` and
/// `cargo test --workspace` build it).
pub fn sllm_bin() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // A test runs from target/<profile>/deps/, a benchmark binary from target/<profile>/.
    let dir = exe.parent().context("no target directory")?;
    let candidates = [dir.join("sllm"), dir.parent().map(|d| d.join("sllm")).unwrap_or_default()];
    candidates.into_iter().find(|p| p.is_file()).with_context(|| {
        format!("no sllm binary next to {}: build it with `cargo build -p sllm`", exe.display())
    })
}

/// A child process, killed (SIGKILL) when dropped.
pub struct Proc {
    child: Child,
    /// Its stdout lines so far, collected in the background.
    pub lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

/// `sllm serve all` on `redis_url` with every listener on a free port (metrics off), started:
/// the process, its gRPC address and its OpenAI API address (`host:port` each).
pub fn serve_all(redis_url: &str) -> Result<(Proc, String, String)> {
    let (serve, _) = Proc::sllm(
        &["serve", "all", "--redis-url", redis_url, "--grpc-addr", "127.0.0.1:0"],
        &[
            ("SLLM_JOIN_SECRET", JOIN_SECRET),
            ("SLLM_OPENAI_ADDR", "127.0.0.1:0"),
            ("SLLM_METRICS_ADDR", "off"),
        ],
        "openai api listening on",
    )?;
    let out = serve.output();
    let line = |prefix: &str| {
        out.lines()
            .find_map(|l| l.split_once(prefix))
            .map(|(_, r)| r.trim().to_string())
            .with_context(|| format!("no {prefix:?} in {out}"))
    };
    let (grpc, openai) = (line("serving gRPC on")?, line("openai api listening on")?);
    Ok((serve, grpc, openai))
}

impl Proc {
    /// Starts `sllm args…` with `env`, and waits (up to 20 s) for a stdout line containing
    /// `ready_marker`; returns the process and that line.
    pub fn sllm(args: &[&str], env: &[(&str, &str)], ready_marker: &str) -> Result<(Proc, String)> {
        let mut cmd = Command::new(sllm_bin()?);
        cmd.args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let proc = Proc::spawn(&mut cmd, ready_marker, Duration::from_secs(20))?;
        let line = proc
            .lines
            .lock()
            .ok()
            .and_then(|l| l.iter().find(|l| l.contains(ready_marker)).cloned())
            .unwrap_or_default();
        Ok((proc, line))
    }

    /// Starts `cmd` and waits up to `within` for a stdout line containing `ready_marker`.
    pub fn spawn(cmd: &mut Command, ready_marker: &str, within: Duration) -> Result<Proc> {
        use std::io::BufRead;
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = cmd.spawn().context("starting a process")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        let marker = ready_marker.to_string();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(mut l) = sink.lock() {
                    l.push(line.clone());
                }
                if !sent && line.contains(&marker) {
                    let _ = tx.send(line);
                    sent = true;
                }
            }
        });
        let proc = Proc { child, lines };
        rx.recv_timeout(within)
            .with_context(|| format!("no {ready_marker:?} within {within:?}"))?;
        Ok(proc)
    }

    /// The stdout lines so far, joined.
    pub fn output(&self) -> String {
        self.lines.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its resident memory (VmRSS), in KiB.
    pub fn rss_kib(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmRSS line")
    }

    /// Sends SIGKILL and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM (a clean stop) and waits up to `within` for it to exit; true if it did.
    pub fn terminate(&mut self, within: Duration) -> bool {
        self.signal("TERM", within)
    }

    /// Sends SIGINT (Ctrl-C) and waits up to `within` for it to exit; true if it did.
    pub fn interrupt(&mut self, within: Duration) -> bool {
        self.signal("INT", within)
    }

    /// Its exit status, once it has exited.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends the signal `sig` (`TERM`, `INT`, …) and returns at once.
    pub fn send_signal(&self, sig: &str) {
        let _ =
            Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status();
    }

    /// Waits, without blocking the async runtime, up to `within` for it to exit; its exit
    /// status if it did.
    pub async fn exited(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.exit_status() {
                return Some(status);
            }
            if start.elapsed() > within {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn signal(&mut self, sig: &str, within: Duration) -> bool {
        let _ =
            Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status();
        let start = Instant::now();
        while start.elapsed() < within {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A service served in this process on an ephemeral port.
pub struct Served {
    addr: std::net::SocketAddr,
    shutdown: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

type ServeResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

impl Served {
    async fn start<F, Fut>(serve: F) -> Result<Served>
    where
        F: FnOnce(service::Listener, tokio_util::sync::CancellationToken) -> Fut,
        Fut: std::future::Future<Output = ServeResult> + Send + 'static,
    {
        let listener = service::Listener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let fut = serve(listener, shutdown.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = fut.await {
                eprintln!("service failed: {e}");
            }
        });
        Ok(Served { addr, shutdown, task })
    }

    /// A ModelRegistry over `store`.
    pub async fn model_registry(store: Store) -> Result<Served> {
        Self::start(|l, s| model_registry::Registry::new(store).serve(l, s)).await
    }

    /// A Scaler replica over `store`.
    pub async fn scaler(store: Store, config: scaler::ScalerConfig) -> Result<Served> {
        Self::start(|l, s| scaler::Scaler::new(store, config).serve(l, s)).await
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A channel to it.
    pub async fn channel(&self) -> Result<tonic::transport::Channel> {
        Ok(tonic::transport::Endpoint::from_shared(self.endpoint())?.connect().await?)
    }

    /// Stops it abruptly, as if its process died: no lease released, no stream closed cleanly.
    pub fn kill(self) {
        self.task.abort();
    }

    /// Stops it cleanly.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

/// A Dispatch replica served in this process: gRPC and OpenAI HTTP on ephemeral ports.
pub struct DispatchReplica {
    /// gRPC address.
    pub grpc: std::net::SocketAddr,
    /// HTTP address.
    pub http: std::net::SocketAddr,
    shutdown: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl DispatchReplica {
    /// Starts a replica `id` over `store`, with `adjust` applied to its configuration.
    pub async fn start(
        store: Store,
        id: &str,
        adjust: impl FnOnce(&mut dispatch::DispatchConfig),
    ) -> Result<DispatchReplica> {
        let secret = service::JoinSecret::new(JOIN_SECRET).map_err(anyhow::Error::msg)?;
        let mut config = dispatch::DispatchConfig::new(id, secret);
        config.report_interval = Duration::from_millis(100);
        adjust(&mut config);
        let grpc_l = service::Listener::bind("127.0.0.1:0").await?;
        let http_l = service::Listener::bind("127.0.0.1:0").await?;
        let (grpc, http) = (grpc_l.local_addr(), http_l.local_addr());
        let shutdown = tokio_util::sync::CancellationToken::new();
        let token = shutdown.clone();
        let d = dispatch::Dispatch::new(store, config);
        let task = tokio::spawn(async move {
            if let Err(e) = d.serve(grpc_l, http_l, token).await {
                eprintln!("dispatch failed: {e}");
            }
        });
        Ok(DispatchReplica { grpc, http, shutdown, task })
    }

    /// `http://127.0.0.1:PORT` of the gRPC API.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// Base URL of the OpenAI API, e.g. `http://127.0.0.1:PORT/v1`.
    pub fn openai_base(&self) -> String {
        format!("http://{}/v1", self.http)
    }

    /// A gRPC client.
    pub async fn client(
        &self,
    ) -> Result<sllm_api::v1::dispatch_client::DispatchClient<tonic::transport::Channel>> {
        let ch = tonic::transport::Endpoint::from_shared(self.endpoint())?
            .tcp_nodelay(true)
            .connect()
            .await?;
        Ok(sllm_api::v1::dispatch_client::DispatchClient::new(ch))
    }

    /// Stops it abruptly.
    pub fn kill(self) {
        self.task.abort();
    }

    /// Stops it cleanly.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

/// The Python interpreter of the project's virtualenv (`.venv`, made by `scripts/install-deps`),
/// which has the `openai` package, grpcio and grpcurl.
pub fn python() -> Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("no workspace root")?;
    let py = root.join(".venv/bin/python");
    if !py.is_file() {
        bail!("{} is missing: run scripts/install-deps", py.display());
    }
    Ok(py)
}

/// Runs `script` with the project's Python and the SDK from `sdk/python` importable.
pub async fn python_sdk(script: &str) -> Result<std::process::Output> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("no workspace root")?;
    Ok(tokio::process::Command::new(python()?)
        .arg("-c")
        .arg(script)
        .env("PYTHONPATH", root.join("sdk/python"))
        .output()
        .await?)
}

/// A span as an OTLP receiver got it.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// Hex trace id.
    pub trace_id: String,
    /// Hex span id.
    pub span_id: String,
    /// Hex parent span id ("" for a root).
    pub parent_span_id: String,
    /// Span name.
    pub name: String,
    /// The exporting service's `service.name`.
    pub service: String,
    /// String forms of its attributes (the last value of a key given more than once).
    pub attributes: std::collections::HashMap<String, String>,
    /// Its attributes' keys as sent, in order: a key given more than once is here more than once.
    pub keys: Vec<String>,
}

/// An OTLP trace receiver (what Jaeger or a collector would be) speaking both protocols,
/// keeping every span.
pub struct OtlpReceiver {
    /// Its OTLP/gRPC endpoint, for OTEL_EXPORTER_OTLP_ENDPOINT.
    pub endpoint: String,
    /// Its OTLP/HTTP endpoint (`POST /v1/traces`, protobuf), for OTEL_EXPORTER_OTLP_ENDPOINT
    /// with OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf.
    pub http_endpoint: String,
    spans: std::sync::Arc<std::sync::Mutex<Vec<ReceivedSpan>>>,
    _task: tokio::task::JoinHandle<()>,
    _http_task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct Collector(std::sync::Arc<std::sync::Mutex<Vec<ReceivedSpan>>>);

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for Collector
{
    async fn export(
        &self,
        request: tonic::Request<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        let out = received(request.into_inner());
        if let Ok(mut spans) = self.0.lock() {
            spans.extend(out);
        }
        Ok(tonic::Response::new(Default::default()))
    }
}

/// The spans of one export, either protocol.
fn received(
    request: opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
) -> Vec<ReceivedSpan> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    let text = |v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>| match v
        .as_ref()
        .and_then(|v| v.value.as_ref())
    {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        other => format!("{other:?}"),
    };
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let mut out = Vec::new();
    for rs in request.resource_spans {
        let service = rs
            .resource
            .as_ref()
            .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
            .map(|a| text(&a.value))
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                out.push(ReceivedSpan {
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                    name: s.name.clone(),
                    service: service.clone(),
                    attributes: s
                        .attributes
                        .iter()
                        .map(|a| (a.key.clone(), text(&a.value)))
                        .collect(),
                    keys: s.attributes.iter().map(|a| a.key.clone()).collect(),
                });
            }
        }
    }
    out
}

/// Answers one OTLP/HTTP request: `POST /v1/traces` with a protobuf body.
async fn otlp_http(
    req: hyper::Request<hyper::body::Incoming>,
    spans: std::sync::Arc<std::sync::Mutex<Vec<ReceivedSpan>>>,
) -> Result<hyper::Response<http_body_util::Full<bytes::Bytes>>, std::convert::Infallible> {
    use http_body_util::BodyExt;
    use prost::Message;
    let reply = |status: u16, body: Vec<u8>| {
        let mut r = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
        *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
        r.headers_mut()
            .insert("content-type", http::HeaderValue::from_static("application/x-protobuf"));
        r
    };
    if req.method() != hyper::Method::POST || req.uri().path() != "/v1/traces" {
        return Ok(reply(404, Vec::new()));
    }
    let Ok(body) = req.into_body().collect().await.map(|b| b.to_bytes()) else {
        return Ok(reply(400, Vec::new()));
    };
    match opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest::decode(body)
    {
        Ok(request) => {
            let out = received(request);
            if let Ok(mut s) = spans.lock() {
                s.extend(out);
            }
            let answer =
                opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse::default();
            Ok(reply(200, answer.encode_to_vec()))
        }
        Err(_) => Ok(reply(400, Vec::new())),
    }
}

impl OtlpReceiver {
    /// Starts a receiver on a free port.
    pub async fn start() -> Result<OtlpReceiver> {
        let listener = service::Listener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr());
        let spans = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let svc = opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer::new(
            Collector(spans.clone()),
        );
        let task = tokio::spawn(async move {
            // Large flow-control windows, as a collector's gRPC server grows them (Go's
            // bandwidth-delay estimate): a batch goes out without waiting for window updates.
            let _ = tonic::transport::Server::builder()
                .initial_stream_window_size(4 << 20)
                .initial_connection_window_size(8 << 20)
                .add_service(svc)
                .serve_with_incoming(listener.incoming())
                .await;
        });
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let http_endpoint = format!("http://{}", http.local_addr()?);
        let kept = spans.clone();
        let http_task = tokio::spawn(async move {
            while let Ok((stream, _)) = http.accept().await {
                let kept = kept.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| otlp_http(req, kept.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(OtlpReceiver { endpoint, http_endpoint, spans, _task: task, _http_task: http_task })
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// Calls per command name since the server started, from `INFO commandstats` (benchmarks count
/// round trips and server-side commands with it).
pub async fn commandstats(
    raw: &mut redis::aio::MultiplexedConnection,
) -> Result<std::collections::HashMap<String, u64>> {
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(raw).await?;
    let mut out = std::collections::HashMap::new();
    for line in info.lines() {
        if let Some(rest) = line.strip_prefix("cmdstat_")
            && let Some((name, stats)) = rest.split_once(':')
            && let Some(calls) = stats.split(',').find_map(|kv| kv.strip_prefix("calls="))
        {
            out.insert(name.to_string(), calls.parse().unwrap_or(0));
        }
    }
    Ok(out)
}

/// A three-primary Redis Cluster on loopback ports, created with `redis-cli --cluster create`.
///
/// Creating one takes seconds (redis-cli waits for the nodes to agree), so the test processes
/// of one run share it: the first to ask starts it under a lock, the others find it ready. Each
/// node runs under a watchdog that stops it once the test runner (the parent of every test
/// process) has exited, so nothing outlives the run. Tests keep apart by namespace: each store
/// gets its own hash tag, which also spreads them over the three primaries.
pub struct RedisCluster {
    nodes: Vec<String>,
}

impl RedisCluster {
    /// The run's shared cluster, started if this is the first test to ask.
    pub fn start() -> Result<RedisCluster> {
        let runner = std::os::unix::process::parent_id();
        let run = std::env::var("NEXTEST_RUN_ID").unwrap_or_else(|_| runner.to_string());
        let dir = std::env::temp_dir().join(format!("sllm-cluster-{run}"));
        std::fs::create_dir_all(&dir)?;
        let ready = dir.join("nodes");
        let lock = dir.join("lock");
        let start = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(&ready) {
                let nodes: Vec<String> = text.lines().map(str::to_string).collect();
                return Ok(RedisCluster { nodes });
            }
            if std::fs::OpenOptions::new().write(true).create_new(true).open(&lock).is_ok() {
                let nodes = Self::create(&dir, runner)?;
                let tmp = dir.join("nodes.tmp");
                std::fs::write(&tmp, nodes.join("\n"))?;
                std::fs::rename(&tmp, &ready)?;
                return Ok(RedisCluster { nodes });
            }
            if start.elapsed() > Duration::from_secs(60) {
                bail!("the shared Redis Cluster in {} never became ready", dir.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Like [`RedisCluster::start`], then `CONFIG SET` of `--name value` pairs on every node
    /// (the cluster is shared, so only options harmless to other tests belong here).
    pub fn start_with(extra: &[&str]) -> Result<RedisCluster> {
        let cluster = Self::start()?;
        for pair in extra.chunks(2) {
            let [name, value] = pair else { bail!("options come in --name value pairs") };
            for node in &cluster.nodes {
                let (host, port) = node.rsplit_once(':').context("node address")?;
                let ok = Command::new("redis-cli")
                    .args(["-h", host, "-p", port, "CONFIG", "SET"])
                    .arg(name.trim_start_matches("--"))
                    .arg(value)
                    .stdout(Stdio::null())
                    .status()?
                    .success();
                if !ok {
                    bail!("CONFIG SET {name} {value} failed on {node}");
                }
            }
        }
        Ok(cluster)
    }

    fn create(dir: &Path, runner: u32) -> Result<Vec<String>> {
        let mut nodes = Vec::new();
        for i in 0..3 {
            // Two free ports: the client port and the cluster bus port.
            let (port, bus) = {
                let a = std::net::TcpListener::bind("127.0.0.1:0")?;
                let b = std::net::TcpListener::bind("127.0.0.1:0")?;
                (a.local_addr()?.port(), b.local_addr()?.port())
            };
            let node_dir = dir.join(format!("node{i}"));
            std::fs::create_dir_all(&node_dir)?;
            // The watchdog: the node lives as long as the test runner does.
            let script = format!(
                "redis-server --bind 127.0.0.1 --port {port} --cluster-port {bus} \
                 --cluster-enabled yes --cluster-config-file nodes.conf --save '' \
                 --appendonly no --dir {dir} >/dev/null 2>&1 & node=$!; \
                 while kill -0 {runner} 2>/dev/null && kill -0 $node 2>/dev/null; do sleep 0.5; done; \
                 kill $node 2>/dev/null; wait",
                dir = node_dir.display()
            );
            Command::new("sh")
                .arg("-c")
                .arg(script)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting redis-server for the cluster")?;
            nodes.push(format!("127.0.0.1:{port}"));
        }
        for node in &nodes {
            let start = Instant::now();
            while std::net::TcpStream::connect(node).is_err() {
                if start.elapsed() > Duration::from_secs(10) {
                    bail!("cluster node {node} did not listen");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .context("running redis-cli --cluster create")?;
        if !out.status.success() {
            bail!("redis-cli --cluster create failed: {}", String::from_utf8_lossy(&out.stdout));
        }
        // Every node must agree the cluster is up before clients use it.
        for node in &nodes {
            let (host, port) = node.rsplit_once(':').context("node address")?;
            let start = Instant::now();
            loop {
                let info = Command::new("redis-cli")
                    .args(["-h", host, "-p", port, "CLUSTER", "INFO"])
                    .output()?;
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                if start.elapsed() > Duration::from_secs(20) {
                    bail!("cluster node {node} never reported cluster_state:ok");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(nodes)
    }

    /// `redis+cluster://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3`.
    pub fn url(&self) -> String {
        format!("redis+cluster://{}", self.nodes.join(","))
    }

    /// A store on the cluster under a namespace no other store of the run uses.
    pub async fn store(&self) -> Result<Store> {
        self.store_with(|_| {}).await
    }

    /// Like [`RedisCluster::store`], after `adjust` changed the configuration.
    pub async fn store_with(&self, adjust: impl FnOnce(&mut StoreConfig)) -> Result<Store> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let ns = format!("t{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let mut config = StoreConfig::new(self.url()).with_namespace(ns);
        adjust(&mut config);
        Ok(Store::connect(config).await?)
    }

    /// A cluster connection, for tests that inspect or damage state by hand.
    pub async fn raw(&self) -> Result<redis::cluster_async::ClusterConnection> {
        let nodes: Vec<String> = self.nodes.iter().map(|n| format!("redis://{n}")).collect();
        let client = redis::cluster::ClusterClient::new(nodes)?;
        Ok(client.get_async_connection().await?)
    }
}

/// A private certificate authority and PEM files signed by it, in a temporary directory: a
/// server certificate for `localhost` and `127.0.0.1`, and a client certificate.
pub struct TestPki {
    dir: tempfile::TempDir,
}

impl TestPki {
    /// Generates the CA, the server and the client certificates.
    pub fn generate() -> Result<TestPki> {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair, KeyUsagePurpose,
        };
        let dir = tempfile::Builder::new().prefix("sllm-pki-").tempdir()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "sllm test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
        std::fs::write(dir.path().join("ca.pem"), ca.pem())?;
        for (name, purpose) in [
            ("server", ExtendedKeyUsagePurpose::ServerAuth),
            ("client", ExtendedKeyUsagePurpose::ClientAuth),
        ] {
            let mut p = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])?;
            p.distinguished_name.push(DnType::CommonName, format!("sllm test {name}"));
            p.extended_key_usages = vec![purpose];
            let key = KeyPair::generate()?;
            let cert = p.signed_by(&key, &ca)?;
            std::fs::write(dir.path().join(format!("{name}.pem")), cert.pem())?;
            std::fs::write(dir.path().join(format!("{name}.key")), key.serialize_pem())?;
        }
        Ok(TestPki { dir })
    }

    /// A file of the PKI: `ca.pem`, `server.pem`, `server.key`, `client.pem`, `client.key`.
    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

/// An OTLP/gRPC trace endpoint that accepts every export and reads nothing of it: what a
/// collector on another host costs the benchmark's two cores (nothing but the bytes arriving).
/// It speaks HTTP/2 directly, without a gRPC server's buffering and decoding, and opens its
/// flow-control windows wide as a collector's gRPC server grows them: the little it costs these
/// cores is receiving the bytes. Counts export calls and bytes.
pub struct OtlpSink {
    /// Its endpoint, for OTEL_EXPORTER_OTLP_ENDPOINT.
    pub endpoint: String,
    exports: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    _task: tokio::task::JoinHandle<()>,
}

impl OtlpSink {
    /// Starts a sink on a free port.
    pub async fn start() -> Result<OtlpSink> {
        use tokio_stream::StreamExt;
        let listener = service::Listener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr());
        let exports = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let (e, b) = (exports.clone(), bytes.clone());
        let task = tokio::spawn(async move {
            let mut incoming = std::pin::pin!(listener.incoming());
            while let Some(Ok(socket)) = incoming.next().await {
                tokio::spawn(sink_connection(socket, e.clone(), b.clone()));
            }
        });
        Ok(OtlpSink { endpoint, exports, bytes, _task: task })
    }

    /// Export calls and bytes received so far.
    pub fn received(&self) -> (u64, u64) {
        (self.exports.load(Ordering::Relaxed), self.bytes.load(Ordering::Relaxed))
    }
}

/// Serves one connection to an [`OtlpSink`]: each export's body is read, counted and let go.
async fn sink_connection<S>(socket: S, exports: Arc<AtomicU64>, bytes: Arc<AtomicU64>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let Ok(mut conn) = h2::server::Builder::new()
        .initial_window_size(4 << 20)
        .initial_connection_window_size(8 << 20)
        .handshake::<_, bytes::Bytes>(socket)
        .await
    else {
        return;
    };
    while let Some(Ok((request, respond))) = conn.accept().await {
        let (exports, bytes) = (exports.clone(), bytes.clone());
        tokio::spawn(async move {
            let mut body = request.into_body();
            let mut n = 0u64;
            while let Some(Ok(chunk)) = body.data().await {
                n += chunk.len() as u64;
                let _ = body.flow_control().release_capacity(chunk.len());
            }
            // The gRPC message's 5-byte header is not the request's bytes.
            bytes.fetch_add(n.saturating_sub(5), Ordering::Relaxed);
            exports.fetch_add(1, Ordering::Relaxed);
            let _ = answer_ok(respond);
        });
    }
}

/// Answers an export with an empty `ExportTraceServiceResponse` and gRPC status OK.
fn answer_ok(mut respond: h2::server::SendResponse<bytes::Bytes>) -> Result<()> {
    let head =
        http::Response::builder().status(200).header("content-type", "application/grpc").body(())?;
    let mut stream = respond.send_response(head, false)?;
    // One uncompressed message of length 0.
    stream.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), false)?;
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    stream.send_trailers(trailers)?;
    Ok(())
}
