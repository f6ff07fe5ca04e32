//! A backend that runs real inference engines: one engine process per instance (vLLM, SGLang,
//! llama.cpp server, or any command), started from a template with the model, a free port and
//! `CUDA_VISIBLE_DEVICES`, watched until its health endpoint answers, and driven through its
//! OpenAI-compatible HTTP API with server-sent events.
//!
//! Every engine runs in a process group of its own under a small shell watchdog: stop and drain
//! end the whole group (SIGTERM, then SIGKILL after a grace period), and if the agent itself dies
//! the watchdog ends the group, so no engine outlives its agent.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use telemetry::trace::{Kind, Span};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sllm_api::backend_config::{Engine, EngineArgs, engine_args};
use sllm_api::v1 as pb;
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

use crate::backend::{
    Backend, BackendError, Failure, FailureKind, Generation, InstanceEvent, Job, Output, StartSpec,
};
use crate::openai;

/// Known engines and their launch templates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// `vllm serve`.
    Vllm,
    /// `python -m sglang.launch_server`.
    Sglang,
    /// llama.cpp's `llama-server`.
    Llamacpp,
    /// A command given in the configuration.
    Custom,
}

impl EngineKind {
    /// The launch template. Placeholders: `{model}` (the checkpoint: a path under the model
    /// directory, or a name), `{name}` (the deployment's name, which the engine must serve
    /// requests under), `{port}`, `{num_gpus}`, `{args}` (the deployment's backend_config as
    /// flags).
    pub fn template(self) -> &'static str {
        match self {
            EngineKind::Vllm => {
                "vllm serve {model} --served-model-name {name} --host 127.0.0.1 --port {port} --tensor-parallel-size {num_gpus} {args}"
            }
            EngineKind::Sglang => {
                "python3 -m sglang.launch_server --model-path {model} --served-model-name {name} --host 127.0.0.1 --port {port} --tp {num_gpus} {args}"
            }
            EngineKind::Llamacpp => {
                "llama-server -m {model} --alias {name} --host 127.0.0.1 --port {port} {args}"
            }
            EngineKind::Custom => "",
        }
    }

    /// The engine's flag table, for the ones sllm knows.
    pub fn engine(self) -> Option<Engine> {
        match self {
            EngineKind::Vllm => Some(Engine::Vllm),
            EngineKind::Sglang => Some(Engine::Sglang),
            EngineKind::Llamacpp => Some(Engine::Llamacpp),
            EngineKind::Custom => None,
        }
    }

    /// The request dialect of this engine.
    pub fn dialect(self) -> openai::Dialect {
        match self {
            EngineKind::Vllm => openai::Dialect::Vllm,
            EngineKind::Sglang => openai::Dialect::Sglang,
            EngineKind::Llamacpp => openai::Dialect::Llamacpp,
            EngineKind::Custom => openai::Dialect::Other,
        }
    }
}

/// How the engine backend runs engines.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Which engine.
    pub kind: EngineKind,
    /// The launch command (same placeholders as the templates): required for `Custom`; for a
    /// known engine it replaces the built-in template, while the engine's flag table and
    /// request dialect still apply.
    pub command: String,
    /// GPUs on this host.
    pub gpus: u32,
    /// Where checkpoints live (one directory or file per model, named like the model with `/`
    /// kept as subdirectories); reported as cached checkpoints with their sizes.
    pub model_dir: Option<PathBuf>,
    /// Longest wait for an engine's health endpoint.
    pub ready_timeout: Duration,
    /// Between SIGTERM and SIGKILL when stopping an engine.
    pub stop_grace: Duration,
    /// Health path polled until it answers 200.
    pub health_path: String,
    /// Longest wait for a streamed answer's first event.
    pub first_byte_timeout: Duration,
    /// Longest gap between two events of a streamed answer.
    pub idle_timeout: Duration,
    /// Longest wait for an answer that is not streamed.
    pub request_timeout: Duration,
}

impl EngineConfig {
    /// Defaults for `kind`.
    pub fn new(kind: EngineKind) -> EngineConfig {
        EngineConfig {
            kind,
            command: String::new(),
            gpus: 1,
            model_dir: None,
            ready_timeout: Duration::from_secs(600),
            stop_grace: Duration::from_secs(10),
            health_path: "/health".into(),
            // A loaded GPU may queue a request and prefill a long prompt before its first
            // token; between tokens it is never this slow unless something is wrong.
            first_byte_timeout: Duration::from_secs(120),
            idle_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Loading,
    Ready,
    Draining,
    Stopping,
}

struct EngineInstance {
    model: String,
    /// LoRA adapters given at start, in flag order (llama.cpp selects them by position).
    start_adapters: Vec<String>,
    /// LoRA adapters loaded since, through the engine's runtime endpoint.
    loaded_adapters: HashSet<String>,
    gpus: Vec<u32>,
    port: u16,
    pgid: u32,
    phase: Phase,
    in_flight: usize,
}

struct State {
    instances: HashMap<String, EngineInstance>,
    busy_gpus: HashSet<u32>,
}

/// A request counted in its instance's `in_flight`, counted out when this drops.
struct InFlight<'a> {
    backend: &'a EngineBackend,
    instance_id: &'a str,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.backend.with_state(|s| {
            if let Some(inst) = s.instances.get_mut(self.instance_id) {
                inst.in_flight = inst.in_flight.saturating_sub(1);
            }
        });
    }
}

/// The engine backend. Cheap to clone.
#[derive(Clone)]
pub struct EngineBackend {
    config: Arc<EngineConfig>,
    state: Arc<Mutex<State>>,
    events: mpsc::UnboundedSender<InstanceEvent>,
    http: Client<HttpConnector, Full<Bytes>>,
}

/// The LoRA adapters a starting instance is given on its command line, in order.
fn start_adapters(spec: &StartSpec) -> Vec<String> {
    match spec.backend_config.as_ref().map(sllm_api::json::struct_to_json) {
        Some(serde_json::Value::Object(m)) => sllm_api::backend_config::lora_adapters(&m)
            .map(|a| a.into_iter().map(|a| a.name).collect())
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// Quotes a word for `sh`.
fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:=@,".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn dir_size(p: &Path) -> u64 {
    match std::fs::metadata(p) {
        Ok(m) if m.is_file() => m.len(),
        Ok(m) if m.is_dir() => std::fs::read_dir(p)
            .map(|rd| rd.flatten().map(|e| dir_size(&e.path())).sum())
            .unwrap_or(0),
        _ => 0,
    }
}

impl EngineBackend {
    /// An engine backend and the channel its instance events arrive on.
    pub fn new(config: EngineConfig) -> (EngineBackend, mpsc::UnboundedReceiver<InstanceEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        // Nagle's algorithm on the engine connection costs tens of milliseconds a request; and
        // engines close idle keep-alive connections (llama.cpp after 5 s), so a connection idle
        // for 2 s is dropped here first rather than reused as the engine closes it.
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(2))
            .build(connector);
        let state = State { instances: HashMap::new(), busy_gpus: HashSet::new() };
        (
            EngineBackend {
                config: Arc::new(config),
                state: Arc::new(Mutex::new(state)),
                events: tx,
                http,
            },
            rx,
        )
    }

    /// Drops an instance and frees its GPUs.
    fn forget(&self, id: &str) {
        self.with_state(|s| {
            if let Some(inst) = s.instances.remove(id) {
                for g in &inst.gpus {
                    s.busy_gpus.remove(g);
                }
            }
        });
    }

    /// The HTTP endpoint of an instance's engine (e.g. `http://127.0.0.1:41234`), while it runs.
    pub fn endpoint(&self, instance_id: &str) -> Option<String> {
        self.with_state(|s| {
            s.instances.get(instance_id).map(|i| format!("http://127.0.0.1:{}", i.port))
        })
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut guard = match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut guard)
    }

    fn emit(&self, e: InstanceEvent) {
        let _ = self.events.send(e);
    }

    /// The shell command line that starts `spec`'s engine on `port`.
    fn command_line(&self, spec: &StartSpec, port: u16) -> Result<String, BackendError> {
        // A command given replaces a known engine's template (a wrapper, another install).
        let template = if self.config.command.is_empty() {
            self.config.kind.template()
        } else {
            self.config.command.as_str()
        };
        if template.is_empty() {
            return Err(BackendError::Unsupported(
                "no engine command configured (--engine-command)".into(),
            ));
        }
        let config = match spec.backend_config.as_ref().map(sllm_api::json::struct_to_json) {
            Some(serde_json::Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        let EngineArgs { model: model_override, args } =
            engine_args(self.config.kind.engine(), &config)
                .map_err(|e| BackendError::Unsupported(e.to_string()))?;
        // An empty `pretrained_model_name_or_path` means the model's own name.
        let name = model_override.filter(|m| !m.is_empty()).unwrap_or_else(|| spec.model.clone());
        let model = match &self.config.model_dir {
            Some(dir) if dir.join(&name).exists() => dir.join(&name).display().to_string(),
            _ => name,
        };
        Ok(template
            .replace("{model}", &shell_quote(&model))
            .replace("{name}", &shell_quote(&spec.model))
            .replace("{port}", &port.to_string())
            .replace("{num_gpus}", &spec.gpus.len().max(1).to_string())
            .replace("{args}", &args.iter().map(|a| shell_quote(a)).collect::<Vec<_>>().join(" ")))
    }

    async fn healthy(&self, port: u16) -> bool {
        let uri = format!("http://127.0.0.1:{port}{}", self.config.health_path);
        let Ok(req) = hyper::Request::get(uri).body(Full::new(Bytes::new())) else { return false };
        matches!(tokio::time::timeout(Duration::from_secs(2), self.http.request(req)).await, Ok(Ok(r)) if r.status().is_success())
    }

    /// Ends an engine's whole process group: SIGTERM, then SIGKILL after the grace period.
    async fn kill_group(&self, pgid: u32) {
        let group = format!("-{pgid}");
        let _ = tokio::process::Command::new("kill").args(["-TERM", "--", &group]).status().await;
        let deadline = Instant::now() + self.config.stop_grace;
        while Instant::now() < deadline {
            let alive = tokio::process::Command::new("kill")
                .args(["-0", "--", &group])
                .stderr(Stdio::null())
                .status()
                .await;
            if !matches!(alive, Ok(s) if s.success()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = tokio::process::Command::new("kill").args(["-KILL", "--", &group]).status().await;
    }

    async fn stop_instance(&self, id: &str, reason: &str) {
        let found = self.with_state(|s| {
            let inst = s.instances.get_mut(id)?;
            inst.phase = Phase::Stopping;
            Some(inst.pgid)
        });
        if let Some(pgid) = found {
            self.kill_group(pgid).await;
        }
        self.forget(id);
        self.emit(InstanceEvent::Stopped {
            instance_id: id.to_string(),
            reason: reason.to_string(),
        });
    }

    async fn run_request(&self, job: Job, tx: mpsc::Sender<Output>) {
        let admitted = self.with_state(|s| {
            let inst = s.instances.get_mut(&job.instance_id)?;
            if inst.phase != Phase::Ready {
                return None;
            }
            inst.in_flight += 1;
            Some((inst.port, inst.model.clone()))
        });
        let Some((port, model)) = admitted else {
            let _ = tx
                .send(Output::Error(Failure::unavailable(format!(
                    "instance {} is not serving",
                    job.instance_id
                ))))
                .await;
            return;
        };
        // Counted out when this drops: also when the request's work is dropped midway (its
        // reader gone), so a drain never waits for a request that no longer runs.
        let in_flight = InFlight { backend: self, instance_id: &job.instance_id };
        let result = self.stream_request(port, &model, &job, &tx).await;
        drop(in_flight);
        if let Err(f) = result {
            if f.kind == FailureKind::Stalled {
                self.recheck(&job.instance_id);
            }
            let _ = tx.send(Output::Error(f)).await;
        }
    }

    /// Sends `job` to the engine on `port` (serving the model as `served`) and turns its answer
    /// into outputs, within the first-byte, idle and whole-request limits.
    async fn stream_request(
        &self,
        port: u16,
        served: &str,
        job: &Job,
        tx: &mpsc::Sender<Output>,
    ) -> Result<(), Failure> {
        let dialect = self.config.kind.dialect();
        // A llama.cpp chat that moved here continues from its token ids after its templated
        // prompt, which the engine itself writes.
        let template = match openai::template_body(dialect, served, job)? {
            Some(body) => self.apply_template(port, &body).await,
            None => None,
        };
        let mut call = openai::call_with_template(dialect, served, job, template.as_deref())?;
        if self.config.kind == EngineKind::Llamacpp {
            self.select_llamacpp_adapter(&job.instance_id, job.adapter.as_ref(), &mut call)?;
        } else if let Some(adapter) = &job.adapter {
            self.use_adapter(port, &job.instance_id, adapter, &mut call).await?;
        }
        let mut req = hyper::Request::post(format!("http://127.0.0.1:{port}{}", call.path))
            .header("content-type", "application/json");
        if !job.traceparent.is_empty() {
            req = req.header("traceparent", &job.traceparent);
        }
        if !job.baggage.is_empty() {
            req = req.header("baggage", &job.baggage);
        }
        let req = req
            .body(Full::new(Bytes::from(call.body.to_string())))
            .map_err(|e| Failure::unavailable(e.to_string()))?;
        let stream = call.stream;
        let mut reader = openai::Reader::new(call);
        let limits = &self.config;
        let started = tokio::time::Instant::now();
        let first_limit = if stream { limits.first_byte_timeout } else { limits.request_timeout };
        let stalled = |what: &str, limit: Duration| {
            Failure::new(
                FailureKind::Stalled,
                format!("the engine sent {what} within {} ms", limit.as_millis()),
            )
        };
        let resp = match tokio::time::timeout(first_limit, self.http.request(req)).await {
            Err(_) => return Err(stalled("no answer", first_limit)),
            Ok(Err(e)) => return Err(Failure::unavailable(format!("engine unreachable: {e}"))),
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        if !status.is_success() || !stream {
            let left = first_limit.saturating_sub(started.elapsed());
            let body = match tokio::time::timeout(left, resp.into_body().collect()).await {
                Err(_) => return Err(stalled("no whole answer", first_limit)),
                Ok(Err(e)) => {
                    return Err(Failure::unavailable(format!("engine answer broke: {e}")));
                }
                Ok(Ok(b)) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
            };
            if !status.is_success() {
                return Err(openai::http_failure(status.as_u16(), body));
            }
            let (text, done) = reader.body(&body)?;
            if tx.send(text).await.is_ok() {
                let _ = tx.send(done).await;
            }
            return Ok(());
        }
        // The client may have its answer's head now, as it would from the engine itself.
        if job.openai.is_some() && tx.send(Output::Started).await.is_err() {
            return Ok(());
        }
        let first_left = limits.first_byte_timeout.saturating_sub(started.elapsed());
        let limits = openai::StreamLimits {
            first_event: first_left,
            idle: limits.idle_timeout,
            first_event_limit: limits.first_byte_timeout,
        };
        openai::relay_stream(resp.into_body().into_data_stream(), reader, limits, tx).await
    }

    /// The conversation in `body` as llama.cpp's chat template writes it (`POST
    /// /apply-template`: what its chat endpoint would tokenise). None when the engine cannot
    /// say; the chat then continues from its text.
    async fn apply_template(&self, port: u16, body: &serde_json::Value) -> Option<String> {
        let limit = self.config.first_byte_timeout;
        let asked = async {
            let req = hyper::Request::post(format!("http://127.0.0.1:{port}/apply-template"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.to_string())))
                .map_err(|e| e.to_string())?;
            let resp = self.http.request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            let bytes = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
            if !status.is_success() {
                return Err(format!("{status}: {}", String::from_utf8_lossy(&bytes)));
            }
            let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
            v.get("prompt")
                .and_then(serde_json::Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| "no prompt in the answer".to_string())
        };
        match tokio::time::timeout(limit, asked).await {
            Ok(Ok(prompt)) => Some(prompt),
            Ok(Err(why)) => {
                tracing::info!(%why, "the engine did not apply its chat template: the chat continues from its text");
                None
            }
            Err(_) => {
                tracing::info!(
                    "the engine did not apply its chat template in time: the chat continues from its text"
                );
                None
            }
        }
    }

    /// Sets which of a llama.cpp instance's adapters (given at start, selected by position)
    /// `call` uses: `adapter` at scale 1 and every other at 0, on every request, so the base
    /// model's requests get none whatever the server's own default scales are.
    fn select_llamacpp_adapter(
        &self,
        instance_id: &str,
        adapter: Option<&pb::LoraAdapter>,
        call: &mut openai::Call,
    ) -> Result<(), Failure> {
        let started_with =
            self.with_state(|s| s.instances.get(instance_id).map(|i| i.start_adapters.clone()));
        let started_with = started_with.unwrap_or_default();
        if let Some(a) = adapter
            && !started_with.contains(&a.name)
        {
            return Err(Failure::unsupported(
                "model",
                format!(
                    "LoRA adapter {:?} was added after this llama.cpp instance started, and \
                     llama.cpp loads adapters only at start; instances started since serve it",
                    a.name
                ),
            ));
        }
        if started_with.is_empty() {
            return Ok(());
        }
        let scales: Vec<serde_json::Value> = started_with
            .iter()
            .enumerate()
            .map(|(id, name)| {
                let on = adapter.is_some_and(|a| a.name == *name);
                serde_json::json!({ "id": id, "scale": if on { 1.0 } else { 0.0 } })
            })
            .collect();
        if let Some(body) = call.body.as_object_mut() {
            body.insert("lora".into(), serde_json::Value::Array(scales));
        }
        Ok(())
    }

    /// Points `call` at LoRA adapter `adapter` of the instance on `port`, loading it into the
    /// engine first if the instance did not start with it and has not loaded it since (vLLM's
    /// and SGLang's runtime endpoints). llama.cpp takes adapters only at start, each by its
    /// position among them.
    async fn use_adapter(
        &self,
        port: u16,
        instance_id: &str,
        adapter: &pb::LoraAdapter,
        call: &mut openai::Call,
    ) -> Result<(), Failure> {
        let loaded = self
            .with_state(|s| {
                let i = s.instances.get(instance_id)?;
                Some(
                    i.start_adapters.contains(&adapter.name)
                        || i.loaded_adapters.contains(&adapter.name),
                )
            })
            .unwrap_or(false);
        let load_path = match self.config.kind {
            EngineKind::Vllm => "/v1/load_lora_adapter",
            EngineKind::Sglang => "/load_lora_adapter",
            EngineKind::Llamacpp => {
                return self.select_llamacpp_adapter(instance_id, Some(adapter), call);
            }
            EngineKind::Custom => {
                return Err(Failure::unsupported(
                    "model",
                    "LoRA adapters need the vllm, sglang or llamacpp engine",
                ));
            }
        };
        if !loaded {
            let body = serde_json::json!({ "lora_name": adapter.name, "lora_path": adapter.path });
            let req = hyper::Request::post(format!("http://127.0.0.1:{port}{load_path}"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.to_string())))
                .map_err(|e| Failure::unavailable(e.to_string()))?;
            let resp =
                match tokio::time::timeout(self.config.request_timeout, self.http.request(req))
                    .await
                {
                    Err(_) => {
                        return Err(Failure::unavailable(
                            "the engine did not load the adapter in time",
                        ));
                    }
                    Ok(Err(e)) => {
                        return Err(Failure::unavailable(format!("engine unreachable: {e}")));
                    }
                    Ok(Ok(r)) => r,
                };
            let status = resp.status();
            let text = resp
                .into_body()
                .collect()
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                .unwrap_or_default();
            // Loaded meanwhile by another request is loaded.
            if !status.is_success() && !text.contains("already") {
                return Err(openai::http_failure(status.as_u16(), text));
            }
            tracing::info!(instance = %instance_id, adapter = %adapter.name, "LoRA adapter loaded");
            self.with_state(|s| {
                if let Some(i) = s.instances.get_mut(instance_id) {
                    i.loaded_adapters.insert(adapter.name.clone());
                }
            });
        }
        if let Some(body) = call.body.as_object_mut() {
            match self.config.kind {
                // vLLM serves each adapter as a model of its own name.
                EngineKind::Vllm => {
                    body.insert("model".into(), serde_json::json!(adapter.name));
                }
                // SGLang names the adapter beside the base model.
                _ => {
                    body.insert("lora_path".into(), serde_json::json!(adapter.name));
                }
            }
        }
        Ok(())
    }

    /// After a stall: an engine that no longer answers its health check is failed, so the
    /// Scaler replaces the instance.
    fn recheck(&self, instance_id: &str) {
        let this = self.clone();
        let id = instance_id.to_string();
        tokio::spawn(async move {
            let found = this.with_state(|s| s.instances.get(&id).map(|i| (i.port, i.pgid)));
            let Some((port, pgid)) = found else { return };
            if this.healthy(port).await {
                return;
            }
            tracing::warn!(instance = %id, "a stalled engine fails its health check: ending it");
            this.with_state(|s| {
                if let Some(i) = s.instances.get_mut(&id) {
                    i.phase = Phase::Stopping;
                }
            });
            this.kill_group(pgid).await;
            this.forget(&id);
            this.emit(InstanceEvent::Failed {
                instance_id: id,
                reason: "the engine stalled and then failed its health check".into(),
            });
        });
    }
}

impl Backend for EngineBackend {
    fn inventory(&self) -> pb::Inventory {
        let mut checkpoints = Vec::new();
        if let Some(dir) = &self.config.model_dir {
            // Models are directories (or files) under the model dir, at depth 1 or 2
            // (`org/name`). Those under /dev/shm are in host memory.
            let tier = if dir.starts_with("/dev/shm") {
                pb::CheckpointTier::HostMemory
            } else {
                pb::CheckpointTier::Disk
            };
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = e.path();
                let name = e.file_name().to_string_lossy().into_owned();
                let nested: Vec<PathBuf> = if p.is_dir() {
                    std::fs::read_dir(&p)
                        .into_iter()
                        .flatten()
                        .flatten()
                        .map(|x| x.path())
                        .filter(|x| x.is_dir())
                        .collect()
                } else {
                    Vec::new()
                };
                let has_weights = |d: &Path| {
                    std::fs::read_dir(d).into_iter().flatten().flatten().any(|f| f.path().is_file())
                };
                if p.is_dir() && !has_weights(&p) && !nested.is_empty() {
                    for n in nested {
                        let model = format!(
                            "{name}/{}",
                            n.file_name()
                                .map(|f| f.to_string_lossy().into_owned())
                                .unwrap_or_default()
                        );
                        checkpoints.push(pb::CachedCheckpoint {
                            model,
                            size_bytes: dir_size(&n),
                            tier: tier as i32,
                        });
                    }
                } else {
                    checkpoints.push(pb::CachedCheckpoint {
                        model: name,
                        size_bytes: dir_size(&p),
                        tier: tier as i32,
                    });
                }
            }
            checkpoints.sort_by(|a, b| a.model.cmp(&b.model));
        }
        self.with_state(|s| pb::Inventory {
            gpus: (0..self.config.gpus)
                .map(|index| pb::Gpu { index, name: "gpu".into(), memory_bytes: 0 })
                .collect(),
            host_memory_bytes: 0,
            checkpoints,
            bandwidths: Vec::new(),
            // A deployment of another engine's backend must not start on this one; a custom
            // command is the operator's to match.
            backends: match self.config.kind {
                EngineKind::Vllm => vec!["vllm".into()],
                EngineKind::Sglang => vec!["sglang".into()],
                EngineKind::Llamacpp => vec!["llamacpp".into()],
                EngineKind::Custom => Vec::new(),
            },
            running: s
                .instances
                .iter()
                .filter(|(_, i)| i.phase != Phase::Stopping)
                .map(|(id, i)| pb::RunningInstance {
                    instance_id: id.clone(),
                    model: i.model.clone(),
                    state: match i.phase {
                        Phase::Loading => pb::InstanceState::Loading,
                        Phase::Ready => pb::InstanceState::Ready,
                        Phase::Draining | Phase::Stopping => pb::InstanceState::Draining,
                    } as i32,
                    gpus: i.gpus.clone(),
                })
                .collect(),
        })
    }

    fn start(&self, spec: StartSpec) -> Result<(), BackendError> {
        if self.with_state(|s| s.instances.contains_key(&spec.instance_id)) {
            return Ok(());
        }
        let port =
            free_port().map_err(|e| BackendError::Unsupported(format!("no free port: {e}")))?;
        let line = self.command_line(&spec, port)?;
        // The cold start's stages on the worker, in the trace of the decision that started it
        // when that one is traced: the engine process starting, then its health wait.
        let load = Span::remote_child("load instance", Kind::Internal, &spec.traceparent);
        load.set("sllm.instance", &spec.instance_id);
        load.set("gen_ai.request.model", &spec.model);
        load.set("sllm.port", u32::from(port));
        let spawning = load.child("start engine process", Kind::Internal);
        self.with_state(|s| {
            for g in &spec.gpus {
                if *g >= self.config.gpus || s.busy_gpus.contains(g) {
                    return Err(BackendError::GpuUnavailable(*g));
                }
            }
            Ok(())
        })?;
        // The watchdog: runs the engine in this process group, ends the group if the agent
        // (our pid) disappears, and exits with the engine's status otherwise.
        let agent = std::process::id();
        let grace = self.config.stop_grace.as_secs().max(1);
        let script = format!(
            "{line} &\nchild=$!\nwhile kill -0 $child 2>/dev/null; do\n  if ! kill -0 {agent} 2>/dev/null; then kill -TERM -$$; sleep {grace}; kill -KILL -$$; fi\n  sleep 0.2\ndone\nwait $child"
        );
        let gpus: Vec<String> = spec.gpus.iter().map(u32::to_string).collect();
        let mut child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .env("CUDA_VISIBLE_DEVICES", gpus.join(","))
            // Adapters added to a live deployment are loaded through vLLM's runtime endpoint.
            .env("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| {
                let e = format!("cannot start the engine: {e}");
                load.fail(&e);
                BackendError::Unsupported(e)
            })?;
        drop(spawning);
        let waiting = load.child("wait for engine health", Kind::Internal);
        let pgid = child.id().unwrap_or(0);
        self.with_state(|s| {
            s.busy_gpus.extend(spec.gpus.iter().copied());
            s.instances.insert(
                spec.instance_id.clone(),
                EngineInstance {
                    model: spec.model.clone(),
                    start_adapters: start_adapters(&spec),
                    loaded_adapters: HashSet::new(),
                    gpus: spec.gpus.clone(),
                    port,
                    pgid,
                    phase: Phase::Loading,
                    in_flight: 0,
                },
            );
        });
        tracing::info!(instance = %spec.instance_id, %port, command = %line, "engine started");
        self.emit(InstanceEvent::Loading { instance_id: spec.instance_id.clone() });

        // Keep the last lines of the engine's stderr for the failure report.
        let tail = Arc::new(Mutex::new(VecDeque::<String>::new()));
        if let Some(err) = child.stderr.take() {
            let tail = tail.clone();
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(err).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    if let Ok(mut t) = tail.lock() {
                        if t.len() == 20 {
                            t.pop_front();
                        }
                        t.push_back(l);
                    }
                }
            });
        }
        let this = self.clone();
        let id = spec.instance_id.clone();
        tokio::spawn(async move {
            let t0 = Instant::now();
            let deadline = t0 + this.config.ready_timeout;
            let failed = loop {
                if let Ok(Some(status)) = child.try_wait() {
                    break Some(format!("the engine exited during start ({status})"));
                }
                if this.healthy(port).await {
                    break None;
                }
                if Instant::now() > deadline {
                    this.kill_group(pgid).await;
                    break Some(format!(
                        "the engine did not become healthy within {} s",
                        this.config.ready_timeout.as_secs()
                    ));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            if let Some(why) = &failed {
                waiting.fail(why);
                load.fail(why);
            }
            drop(waiting);
            drop(load);
            if let Some(why) = failed {
                let last = tail
                    .lock()
                    .map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n"))
                    .unwrap_or_default();
                this.forget(&id);
                let reason =
                    if last.is_empty() { why } else { format!("{why}; last stderr:\n{last}") };
                this.emit(InstanceEvent::Failed { instance_id: id, reason });
                return;
            }
            let ready = this.with_state(|s| match s.instances.get_mut(&id) {
                Some(inst) if inst.phase == Phase::Loading => {
                    inst.phase = Phase::Ready;
                    true
                }
                _ => false,
            });
            if ready {
                this.emit(InstanceEvent::Ready {
                    instance_id: id.clone(),
                    load_ms: t0.elapsed().as_millis() as u64,
                });
            }
            // Watch for an engine that exits on its own.
            let status = child.wait().await;
            let stopping =
                this.with_state(|s| s.instances.get(&id).map(|i| i.phase == Phase::Stopping));
            if stopping == Some(false) {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let last = tail
                    .lock()
                    .map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n"))
                    .unwrap_or_default();
                this.forget(&id);
                let code = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                this.emit(InstanceEvent::Failed {
                    instance_id: id,
                    reason: format!("the engine exited ({code}); last stderr:\n{last}"),
                });
            }
        });
        Ok(())
    }

    fn stop(&self, instance_id: &str) {
        let this = self.clone();
        let id = instance_id.to_string();
        tokio::spawn(async move { this.stop_instance(&id, "stopped").await });
    }

    fn drain(&self, instance_id: &str, grace: Duration) {
        let known = self.with_state(|s| match s.instances.get_mut(instance_id) {
            Some(i) => {
                i.phase = Phase::Draining;
                true
            }
            None => false,
        });
        let this = self.clone();
        let id = instance_id.to_string();
        tokio::spawn(async move {
            if known {
                let deadline = Instant::now() + grace;
                while Instant::now() < deadline {
                    let busy = this
                        .with_state(|s| s.instances.get(&id).map(|i| i.in_flight > 0))
                        .unwrap_or(false);
                    if !busy {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            this.stop_instance(&id, "drained").await;
        });
    }

    fn unload_adapter(&self, instance_id: &str, name: &str) {
        let path = match self.config.kind {
            EngineKind::Vllm => "/v1/unload_lora_adapter",
            EngineKind::Sglang => "/unload_lora_adapter",
            // llama.cpp cannot unload; Dispatch no longer sends requests for it.
            EngineKind::Llamacpp | EngineKind::Custom => return,
        };
        let port = self.with_state(|s| {
            let i = s.instances.get_mut(instance_id)?;
            i.loaded_adapters.remove(name);
            i.start_adapters.retain(|a| a != name);
            Some(i.port)
        });
        let Some(port) = port else { return };
        let this = self.clone();
        let (id, name) = (instance_id.to_string(), name.to_string());
        tokio::spawn(async move {
            let body = serde_json::json!({ "lora_name": name });
            let Ok(req) = hyper::Request::post(format!("http://127.0.0.1:{port}{path}"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.to_string())))
            else {
                return;
            };
            match tokio::time::timeout(Duration::from_secs(30), this.http.request(req)).await {
                Ok(Ok(r)) if r.status().is_success() => {
                    tracing::info!(instance = %id, adapter = %name, "LoRA adapter unloaded");
                }
                // Not loaded there (another replica had it unloaded, or it never was): fine.
                Ok(Ok(r)) => {
                    tracing::debug!(instance = %id, adapter = %name, status = %r.status(), "LoRA adapter not unloaded")
                }
                _ => {
                    tracing::warn!(instance = %id, adapter = %name, "the engine did not answer an unload")
                }
            }
        });
    }

    fn generate(&self, job: Job) -> Generation {
        let (tx, output) = mpsc::channel(64);
        let this = self.clone();
        Generation { run: Box::pin(async move { this.run_request(job, tx).await }), output }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_under_the_model_dir_are_reported_with_their_sizes() {
        let dir = std::env::temp_dir().join(format!("sllm-models-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("facebook/opt-1.3b")).expect("mkdir");
        std::fs::write(dir.join("facebook/opt-1.3b/model.safetensors"), vec![0u8; 3000])
            .expect("write");
        std::fs::write(dir.join("facebook/opt-1.3b/config.json"), vec![0u8; 100]).expect("write");
        std::fs::write(dir.join("tiny.gguf"), vec![0u8; 500]).expect("write");
        let mut config = EngineConfig::new(EngineKind::Llamacpp);
        config.model_dir = Some(dir.clone());
        config.gpus = 2;
        let (backend, _events) = EngineBackend::new(config);
        let inv = backend.inventory();
        let got: Vec<(String, u64, i32)> =
            inv.checkpoints.iter().map(|c| (c.model.clone(), c.size_bytes, c.tier)).collect();
        let disk = pb::CheckpointTier::Disk as i32;
        assert_eq!(
            got,
            [("facebook/opt-1.3b".to_string(), 3100, disk), ("tiny.gguf".to_string(), 500, disk)]
        );
        assert_eq!(inv.gpus.len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn shell_words_are_quoted() {
        assert_eq!(shell_quote("a b'c"), "'a b'\\''c'");
        assert_eq!(shell_quote("--max-model-len"), "--max-model-len");
    }
}
