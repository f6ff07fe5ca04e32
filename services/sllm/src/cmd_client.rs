//! The client commands: deploy, update, delete, models, workers, status, generate. Each talks to
//! one endpoint (every service of an `sllm serve` or `sllm up` answers there), prints a table or
//! JSON, and exits non-zero with the server's message on failure.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use serde_json::json;
use sllm_api::v1 as pb;
use tonic::transport::Channel;

use service::deploy_config;

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Human-readable columns.
    Table,
    /// One JSON document.
    Json,
}

/// Where to reach sllm and how to print.
#[derive(clap::Args, Debug, Clone)]
pub struct Conn {
    /// sllm's gRPC endpoint.
    #[arg(long, env = "SLLM_ENDPOINT", default_value = "http://127.0.0.1:50051")]
    pub endpoint: String,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub output: Output,
    /// API key, if the cluster checks them.
    #[arg(long, env = "SLLM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// PEM CA bundle an https:// endpoint's certificate must chain to (default: the bundled
    /// web roots).
    #[arg(long, env = "SLLM_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// PEM client certificate, for a cluster that verifies clients (mutual TLS).
    #[arg(long, env = "SLLM_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM key of --tls-cert.
    #[arg(long, env = "SLLM_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
}

impl Conn {
    /// A request carrying the API key, if any.
    fn req<T>(&self, message: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(message);
        if let Some(key) = &self.api_key
            && let Ok(v) = format!("Bearer {key}").parse()
        {
            r.metadata_mut().insert("authorization", v);
        }
        r
    }

    async fn channel(&self) -> Result<Channel> {
        let endpoint = if self.endpoint.contains("://") {
            self.endpoint.clone()
        } else {
            format!("http://{}", self.endpoint)
        };
        let ep = tonic::transport::Endpoint::from_shared(endpoint.clone())
            .with_context(|| format!("bad endpoint {endpoint:?}"))?
            .connect_timeout(Duration::from_secs(3))
            .tcp_nodelay(true);
        let tls = service::tls::ClientTls {
            ca: self.tls_ca.clone(),
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
        };
        tls.apply(ep)
            .map_err(anyhow::Error::msg)?
            .connect()
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach sllm at {endpoint}: {e} (is `sllm up` running? set --endpoint or SLLM_ENDPOINT)"))
    }
}

/// A server refusal, as the user sees it.
fn server(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", e.code(), e.message())
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn state_word(s: i32) -> &'static str {
    match pb::DeploymentState::try_from(s).unwrap_or(pb::DeploymentState::Unspecified) {
        pb::DeploymentState::Active => "active",
        pb::DeploymentState::Deleting => "deleting",
        pb::DeploymentState::Missing => "MISSING",
        pb::DeploymentState::Unspecified => "-",
    }
}

fn deployment_json(d: &pb::Deployment) -> serde_json::Value {
    let spec = d.spec.clone().unwrap_or_default();
    let a = spec.auto_scaling_config.clone().unwrap_or_default();
    let c = d.instances.unwrap_or_default();
    json!({
        "model": spec.model,
        "backend": spec.backend,
        "num_gpus": spec.num_gpus,
        "state": state_word(d.state),
        "version": d.version,
        "desired": d.desired_instances,
        "instances": { "pending": c.pending, "loading": c.loading, "ready": c.ready, "draining": c.draining, "lost": c.lost },
        "auto_scaling_config": { "metric": a.metric, "target": a.target, "min_instances": a.min_instances, "max_instances": a.max_instances, "keep_alive": a.keep_alive },
        "backend_config": spec.backend_config.as_ref().map(service::convert::struct_to_json),
        "last_error": d.last_error,
    })
}

// ---------------------------------------------------------------------------------------------

/// Flags of `sllm deploy`: sllm's short form (`sllm deploy NAME --max 4`) and ServerlessLLM's
/// (`sllm deploy --model NAME --config FILE --max-instances 4 --lora-adapters a=/p`).
#[derive(clap::Args, Debug)]
pub struct DeployArgs {
    /// Model (deployment) name, e.g. facebook/opt-1.3b. Alone: a simulated model with sllm's
    /// defaults; with --config it renames the file's model.
    #[arg(conflicts_with = "model_flag")]
    model: Option<String>,
    /// ServerlessLLM's form: the model's name and checkpoint
    /// (backend_config.pretrained_model_name_or_path), over ServerlessLLM's defaults
    /// (backend vllm, 1 GPU, 0..10 instances).
    #[arg(long = "model", id = "model_flag", value_name = "MODEL")]
    model_flag: Option<String>,
    /// A ServerlessLLM deploy JSON file, merged over ServerlessLLM's defaults as its CLI merges
    /// it; flags given as well override its values.
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// Refuse unknown fields in the config file instead of warning.
    #[arg(long)]
    strict: bool,
    /// Backend that runs it (vllm, sglang, llamacpp, transformers, sim).
    #[arg(long)]
    backend: Option<String>,
    /// GPUs per instance.
    #[arg(long)]
    num_gpus: Option<i32>,
    /// Instances kept with no demand (0: scale to zero).
    #[arg(long = "min", visible_alias = "min-instances")]
    min_instances: Option<i32>,
    /// Most instances.
    #[arg(long = "max", visible_alias = "max-instances")]
    max_instances: Option<i32>,
    /// Requests (queued + in flight) one instance absorbs.
    #[arg(long)]
    target: Option<f64>,
    /// Seconds below demand before scaling down.
    #[arg(long)]
    keep_alive: Option<i32>,
    /// Backend settings as a JSON object, merged over the file's.
    #[arg(long)]
    backend_config: Option<String>,
    /// Switch LoRA on for the model (backend_config.enable_lora), for adapters added later.
    #[arg(long)]
    enable_lora: bool,
    /// LoRA adapters, each NAME=PATH (several per value may be separated by commas or spaces).
    #[arg(long, num_args = 1.., value_name = "NAME=PATH")]
    lora_adapters: Vec<String>,
    /// Model precision for quantization (backend_config.precision; e.g. int8, nf4).
    #[arg(long)]
    precision: Option<String>,
    /// Wait until min_instances instances are ready (with a spinner).
    #[arg(long)]
    wait: bool,
    /// Longest wait with --wait, in seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    #[command(flatten)]
    conn: Conn,
}

/// `--lora-adapters` values as ServerlessLLM's CLI reads them: items split on commas and
/// spaces.
fn adapter_items(values: &[String]) -> Vec<String> {
    values
        .iter()
        .flat_map(|v| {
            v.replace(',', " ").split_whitespace().map(str::to_string).collect::<Vec<_>>()
        })
        .collect()
}

/// `--lora-adapters NAME=PATH…` as a backend_config object.
fn adapters_object(values: &[String]) -> Result<serde_json::Value> {
    let mut out = serde_json::Map::new();
    for item in adapter_items(values) {
        let Some((name, path)) = item.split_once('=') else {
            bail!("--lora-adapters: {item:?} is not NAME=PATH");
        };
        out.insert(name.to_string(), json!(path));
    }
    Ok(serde_json::Value::Object(out))
}

/// The deploy document the flags describe, before the server checks it.
fn deploy_document(a: &DeployArgs) -> Result<serde_json::Value> {
    let mut doc = if a.config.is_some() || a.model_flag.is_some() {
        let file = match &a.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                Some(
                    serde_json::from_str::<serde_json::Value>(&text)
                        .map_err(|e| anyhow::anyhow!("{}: not valid JSON: {e}", path.display()))?,
                )
            }
            None => None,
        };
        deploy_config::merge_over_defaults(file.as_ref(), a.model_flag.as_deref())
    } else {
        json!({
            "backend": "sim",
            "num_gpus": 1,
            "auto_scaling_config": {"metric": "concurrency", "target": 1, "min_instances": 0, "max_instances": 1, "keep_alive": 0},
        })
    };
    let Some(obj) = doc.as_object_mut() else {
        // from_json refuses it with the file's words.
        return Ok(doc);
    };
    if let Some(m) = &a.model {
        obj.insert("model".into(), json!(m));
    }
    if let Some(b) = &a.backend {
        obj.insert("backend".into(), json!(b));
    }
    if let Some(n) = a.num_gpus {
        obj.insert("num_gpus".into(), json!(n));
    }
    let scaling = [
        ("target", a.target.map(|t| json!(t))),
        ("min_instances", a.min_instances.map(|n| json!(n))),
        ("max_instances", a.max_instances.map(|n| json!(n))),
        ("keep_alive", a.keep_alive.map(|n| json!(n))),
    ];
    if scaling.iter().any(|(_, v)| v.is_some()) {
        let s = obj.entry("auto_scaling_config").or_insert_with(|| json!({}));
        if let Some(s) = s.as_object_mut() {
            for (k, v) in scaling {
                if let Some(v) = v {
                    s.insert(k.into(), v);
                }
            }
        }
    }
    let mut bc_updates = serde_json::Map::new();
    if let Some(text) = &a.backend_config {
        let v: serde_json::Value =
            serde_json::from_str(text).context("--backend-config is not JSON")?;
        let serde_json::Value::Object(m) = v else {
            bail!("--backend-config must be a JSON object")
        };
        bc_updates.extend(m);
    }
    if !a.lora_adapters.is_empty() {
        bc_updates.insert("lora_adapters".into(), adapters_object(&a.lora_adapters)?);
    }
    if a.enable_lora {
        bc_updates.insert("enable_lora".into(), json!(true));
    }
    if let Some(p) = &a.precision {
        bc_updates.insert("precision".into(), json!(p));
    }
    if !bc_updates.is_empty() {
        let bc = obj.entry("backend_config").or_insert_with(|| json!({}));
        if bc.is_object() {
            // lora_adapters replaces the file's whole, as ServerlessLLM's CLI does.
            if let Some(m) = bc.as_object_mut()
                && bc_updates.contains_key("lora_adapters")
            {
                m.remove("lora_adapters");
            }
            deploy_config::deep_update(bc, &serde_json::Value::Object(bc_updates));
        }
    }
    Ok(doc)
}

pub async fn deploy(a: DeployArgs) -> Result<()> {
    let doc = deploy_document(&a)?;
    let parsed = deploy_config::from_json(&doc, a.strict).map_err(|e| match &a.config {
        Some(path) => anyhow::anyhow!("{}: {e}", path.display()),
        None => anyhow::anyhow!("{e}"),
    })?;
    for w in &parsed.warnings {
        match &a.config {
            Some(path) => eprintln!("warning: {}: {w}", path.display()),
            None => eprintln!("warning: {w}"),
        }
    }
    let spec = parsed.spec;
    if spec.model.is_empty() {
        bail!(
            "no model name: give it as an argument, with --model, or in the config file's \"model\""
        );
    }
    let scaling = spec.auto_scaling_config.clone().unwrap_or_default();
    let channel = a.conn.channel().await?;
    let mut client = pb::model_registry_client::ModelRegistryClient::new(channel);
    let resp = client
        .deploy(a.conn.req(pb::DeployRequest { spec: Some(spec.clone()) }))
        .await
        .map_err(server)?
        .into_inner();
    for w in &resp.warnings {
        eprintln!("warning: {w}");
    }
    let d = resp.deployment.unwrap_or_default();
    if a.wait && scaling.min_instances > 0 {
        wait_ready(
            &mut client,
            &a.conn,
            &spec.model,
            scaling.min_instances as u32,
            Duration::from_secs(a.timeout),
        )
        .await?;
    }
    match a.conn.output {
        Output::Json => print_json(&deployment_json(&d)),
        Output::Table => {
            println!(
                "deployed {} (backend {}, {} GPU per instance, {}..{} instances)",
                spec.model,
                spec.backend,
                spec.num_gpus,
                scaling.min_instances,
                scaling.max_instances
            );
            if scaling.min_instances == 0 {
                println!("scaled to zero: the first request starts an instance");
            }
        }
    }
    Ok(())
}

async fn wait_ready(
    client: &mut pb::model_registry_client::ModelRegistryClient<Channel>,
    conn: &Conn,
    model: &str,
    want: u32,
    timeout: Duration,
) -> Result<()> {
    let frames = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
    let tty = std::io::stderr().is_terminal();
    let start = Instant::now();
    let mut i = 0;
    loop {
        let d = client
            .get(conn.req(pb::GetRequest { model: model.to_string() }))
            .await
            .map_err(server)?
            .into_inner();
        let c = d.instances.unwrap_or_default();
        if c.ready >= want {
            if tty {
                eprint!("\r\x1b[2K");
            }
            eprintln!("{model}: {} ready", c.ready);
            return Ok(());
        }
        if !d.last_error.is_empty() {
            bail!("{model} cannot start: {}", d.last_error);
        }
        if start.elapsed() > timeout {
            bail!(
                "{model}: {} of {want} ready after {} s (pending {}, loading {})",
                c.ready,
                timeout.as_secs(),
                c.pending,
                c.loading
            );
        }
        if tty {
            eprint!(
                "\r\x1b[2K{} {model}: ready {}/{want}, loading {}, pending {} ({:.0} s)",
                frames[i % frames.len()],
                c.ready,
                c.loading,
                c.pending,
                start.elapsed().as_secs_f64()
            );
            let _ = std::io::stderr().flush();
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Flags of `sllm update`.
#[derive(clap::Args, Debug)]
pub struct UpdateArgs {
    /// Model name.
    model: String,
    /// New min_instances.
    #[arg(long = "min", visible_alias = "min-instances")]
    min_instances: Option<i32>,
    /// New max_instances.
    #[arg(long = "max", visible_alias = "max-instances")]
    max_instances: Option<i32>,
    /// New target.
    #[arg(long)]
    target: Option<f64>,
    /// New keep_alive (seconds).
    #[arg(long)]
    keep_alive: Option<i32>,
    /// LoRA adapters to add, each NAME=PATH; running instances load one when a request first
    /// names it.
    #[arg(long, num_args = 1.., value_name = "NAME=PATH")]
    lora_adapters: Vec<String>,
    /// LoRA adapters to remove, by name.
    #[arg(long, num_args = 1.., value_name = "NAME")]
    remove_lora_adapters: Vec<String>,
    #[command(flatten)]
    conn: Conn,
}

pub async fn update(a: UpdateArgs) -> Result<()> {
    let mut client = pb::model_registry_client::ModelRegistryClient::new(a.conn.channel().await?);
    let current = client
        .get(a.conn.req(pb::GetRequest { model: a.model.clone() }))
        .await
        .map_err(server)?
        .into_inner();
    let mut s = current.spec.unwrap_or_default().auto_scaling_config.unwrap_or_default();
    s.min_instances = a.min_instances.unwrap_or(s.min_instances);
    s.max_instances = a.max_instances.unwrap_or(s.max_instances);
    s.target = a.target.unwrap_or(s.target);
    s.keep_alive = a.keep_alive.unwrap_or(s.keep_alive);
    let resp = client
        .update(
            a.conn.req(pb::UpdateRequest {
                model: a.model.clone(),
                auto_scaling_config: Some(s),
                expected_version: current.version,
                add_lora_adapters: match adapters_object(&a.lora_adapters)? {
                    serde_json::Value::Object(m) => m
                        .into_iter()
                        .map(|(k, v)| (k, v.as_str().unwrap_or_default().to_string()))
                        .collect(),
                    _ => Default::default(),
                },
                remove_lora_adapters: adapter_items(&a.remove_lora_adapters),
            }),
        )
        .await
        .map_err(server)?
        .into_inner();
    let d = resp.deployment.unwrap_or_default();
    match a.conn.output {
        Output::Json => print_json(&deployment_json(&d)),
        Output::Table => println!("updated {} (version {})", a.model, d.version),
    }
    Ok(())
}

/// Flags of `sllm delete`.
#[derive(clap::Args, Debug)]
pub struct DeleteArgs {
    /// Model names: each is deleted (its instances drain, then it is removed).
    #[arg(required = true, num_args = 1..)]
    models: Vec<String>,
    /// Remove only these LoRA adapters of the (one) model, by name (NAME=PATH is read as
    /// NAME, as ServerlessLLM's CLI reads it).
    #[arg(long, num_args = 1.., value_name = "NAME")]
    lora_adapters: Vec<String>,
    #[command(flatten)]
    conn: Conn,
}

pub async fn delete(a: DeleteArgs) -> Result<()> {
    let mut client = pb::model_registry_client::ModelRegistryClient::new(a.conn.channel().await?);
    let adapters: Vec<String> = adapter_items(&a.lora_adapters)
        .into_iter()
        .map(|i| i.split_once('=').map(|(n, _)| n.to_string()).unwrap_or(i))
        .collect();
    if !a.lora_adapters.is_empty() && a.models.len() != 1 {
        bail!("--lora-adapters removes adapters of one model; {} were named", a.models.len());
    }
    let mut done = Vec::new();
    let mut failed = Vec::new();
    for model in &a.models {
        let req = pb::DeleteRequest { model: model.clone(), lora_adapters: adapters.clone() };
        match client.delete(a.conn.req(req)).await {
            Ok(d) => {
                let d = d.into_inner().deployment.unwrap_or_default();
                if a.conn.output == Output::Table {
                    if adapters.is_empty() {
                        println!("deleting {model}: its instances drain, then it is removed");
                    } else {
                        println!("removed LoRA adapter(s) {} from {model}", adapters.join(", "));
                    }
                }
                done.push(deployment_json(&d));
            }
            Err(e) => {
                eprintln!("sllm: {model}: {:?}: {}", e.code(), e.message());
                failed.push(format!("{model} ({:?}: {})", e.code(), e.message()));
            }
        }
    }
    if a.conn.output == Output::Json {
        print_json(&json!(done));
    }
    if !failed.is_empty() {
        bail!("{} of {} not deleted: {}", failed.len(), a.models.len(), failed.join("; "));
    }
    Ok(())
}

/// Flags of `sllm models`.
#[derive(clap::Args, Debug)]
pub struct ListArgs {
    #[command(flatten)]
    conn: Conn,
}

pub async fn models(a: ListArgs) -> Result<()> {
    let mut client = pb::model_registry_client::ModelRegistryClient::new(a.conn.channel().await?);
    let list =
        client.list(a.conn.req(pb::ListRequest {})).await.map_err(server)?.into_inner().deployments;
    match a.conn.output {
        Output::Json => print_json(&json!(list.iter().map(deployment_json).collect::<Vec<_>>())),
        Output::Table => {
            println!(
                "{:<40} {:<9} {:<8} {:>7} {:>5} {:>7} {:>7} {:>7}  LAST ERROR",
                "MODEL", "STATE", "BACKEND", "DESIRED", "READY", "LOADING", "PENDING", "VERSION"
            );
            for d in &list {
                let spec = d.spec.clone().unwrap_or_default();
                let c = d.instances.unwrap_or_default();
                println!(
                    "{:<40} {:<9} {:<8} {:>7} {:>5} {:>7} {:>7} {:>7}  {}",
                    spec.model,
                    state_word(d.state),
                    spec.backend,
                    d.desired_instances,
                    c.ready,
                    c.loading,
                    c.pending,
                    d.version,
                    d.last_error
                );
            }
        }
    }
    Ok(())
}

pub async fn workers(a: ListArgs) -> Result<()> {
    let mut client = pb::worker_registry_client::WorkerRegistryClient::new(a.conn.channel().await?);
    let list = client
        .list_workers(a.conn.req(pb::ListWorkersRequest {}))
        .await
        .map_err(server)?
        .into_inner()
        .workers;
    let state = |s: i32| match pb::WorkerState::try_from(s).unwrap_or(pb::WorkerState::Unspecified)
    {
        pb::WorkerState::Initializing => "initializing",
        pb::WorkerState::Ready => "ready",
        pb::WorkerState::Lost => "lost",
        pb::WorkerState::Unspecified => "-",
    };
    match a.conn.output {
        Output::Json => print_json(&json!(list
            .iter()
            .map(|w| json!({
                "worker_id": w.worker_id, "state": state(w.state), "epoch": w.epoch, "address": w.address,
                "gpus": w.gpus.len(), "free_gpus": w.free_gpus, "instances": w.instance_ids,
                "checkpoints": w.checkpoints.iter().map(|c| json!({"model": c.model, "size_bytes": c.size_bytes, "tier": pb::CheckpointTier::try_from(c.tier).map(|t| t.as_str_name()).unwrap_or("?")})).collect::<Vec<_>>(),
            }))
            .collect::<Vec<_>>())),
        Output::Table => {
            println!("{:<20} {:<13} {:>5} {:>5} {:>9} {:>6}  ADDRESS", "WORKER", "STATE", "GPUS", "FREE", "INSTANCES", "EPOCH");
            for w in &list {
                println!("{:<20} {:<13} {:>5} {:>5} {:>9} {:>6}  {}", w.worker_id, state(w.state), w.gpus.len(), w.free_gpus.len(), w.instance_ids.len(), w.epoch, w.address);
            }
        }
    }
    Ok(())
}

/// Flags of `sllm status`.
#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// One model, in detail (default: every model, listed as ServerlessLLM lists them).
    model: Option<String>,
    /// Every model in detail: desired vs. actual instances and the Scaler's last decision.
    #[arg(long)]
    detail: bool,
    #[command(flatten)]
    conn: Conn,
}

pub async fn status(a: StatusArgs) -> Result<()> {
    if a.model.is_none() && !a.detail && a.conn.output == Output::Table {
        return status_list(&a.conn).await;
    }
    let channel = a.conn.channel().await?;
    let mut client = pb::scaler_client::ScalerClient::new(channel);
    let list = match &a.model {
        Some(m) => vec![
            client
                .get_scale_status(a.conn.req(pb::GetScaleStatusRequest { model: m.clone() }))
                .await
                .map_err(server)?
                .into_inner(),
        ],
        None => {
            client
                .list_scale_status(a.conn.req(pb::ListScaleStatusRequest {}))
                .await
                .map_err(server)?
                .into_inner()
                .models
        }
    };
    let leader =
        client.get_leader(a.conn.req(pb::GetLeaderRequest {})).await.map_err(server)?.into_inner();
    match a.conn.output {
        Output::Json => print_json(&json!({
            "leader": { "holder": leader.holder, "fencing_token": leader.fencing_token },
            "models": list.iter().map(|s| {
                let c = s.actual.unwrap_or_default();
                json!({
                    "model": s.model, "desired": s.desired, "demand": s.demand,
                    "actual": { "pending": c.pending, "loading": c.loading, "ready": c.ready, "draining": c.draining, "lost": c.lost },
                    "last_decision": s.last_decision.as_ref().map(|d| json!({"from": d.from, "to": d.to, "reason": d.reason, "at_unix_ms": d.at_unix_ms})),
                    "last_error": s.last_error,
                    "instances": s.instances.iter().map(|i| json!({"instance_id": i.instance_id, "worker_id": i.worker_id, "state": pb::InstanceState::try_from(i.state).map(|x| x.as_str_name()).unwrap_or("?"), "gpus": i.gpus})).collect::<Vec<_>>(),
                })
            }).collect::<Vec<_>>(),
        })),
        Output::Table => {
            println!(
                "scaler leader: {} (token {})",
                if leader.holder.is_empty() { "none" } else { &leader.holder },
                leader.fencing_token
            );
            for s in &list {
                let c = s.actual.unwrap_or_default();
                println!();
                println!(
                    "{}: desired {}, demand {}; ready {}, loading {}, pending {}, draining {}, lost {}",
                    s.model, s.desired, s.demand, c.ready, c.loading, c.pending, c.draining, c.lost
                );
                if !s.last_error.is_empty() {
                    println!("  cannot start: {}", s.last_error);
                }
                if let Some(d) = &s.last_decision {
                    println!("  last decision: {}", d.reason);
                }
                for i in &s.instances {
                    let st = pb::InstanceState::try_from(i.state)
                        .map(|x| {
                            x.as_str_name().trim_start_matches("INSTANCE_STATE_").to_lowercase()
                        })
                        .unwrap_or_default();
                    println!(
                        "  {:<36} {:<9} on {} (GPUs {:?})",
                        i.instance_id, st, i.worker_id, i.gpus
                    );
                }
            }
        }
    }
    Ok(())
}

/// `sllm status` as ServerlessLLM's prints it: one `- name` line per model.
async fn status_list(conn: &Conn) -> Result<()> {
    let mut client = pb::model_registry_client::ModelRegistryClient::new(conn.channel().await?);
    let list = client.list(conn.req(pb::ListRequest {})).await.map_err(server)?.into_inner();
    if list.deployments.is_empty() {
        println!("No models currently deployed.");
        return Ok(());
    }
    println!("Model status retrieved successfully:");
    for d in &list.deployments {
        let name = d.spec.as_ref().map(|s| s.model.as_str()).unwrap_or_default();
        match pb::DeploymentState::try_from(d.state) {
            Ok(pb::DeploymentState::Active) => println!("- {name}"),
            _ => println!("- {name} ({})", state_word(d.state)),
        }
    }
    Ok(())
}

/// Flags of `sllm generate`.
#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// Model name.
    model: String,
    /// The prompt.
    prompt: String,
    /// Send the prompt as a chat user message instead of a plain completion.
    #[arg(long)]
    chat: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    /// Sampling temperature.
    #[arg(long)]
    temperature: Option<f32>,
    /// Seed for reproducible output.
    #[arg(long)]
    seed: Option<u64>,
    /// Show cold-start progress (queued, starting, loading) on stderr.
    #[arg(long)]
    progress: bool,
    /// Give up after this many seconds.
    #[arg(long)]
    timeout: Option<u64>,
    #[command(flatten)]
    conn: Conn,
}

pub async fn generate(a: GenerateArgs) -> Result<()> {
    let mut client = pb::dispatch_client::DispatchClient::new(a.conn.channel().await?);
    let input = if a.chat {
        pb::generate_request::Input::Chat(pb::ChatMessages {
            messages: vec![pb::ChatMessage { role: "user".into(), content: a.prompt.clone() }],
        })
    } else {
        pb::generate_request::Input::Prompt(a.prompt.clone())
    };
    let req = pb::GenerateRequest {
        model: a.model.clone(),
        input: Some(input),
        params: Some(pb::SamplingParams {
            max_tokens: a.max_tokens,
            temperature: a.temperature,
            seed: a.seed,
            ..Default::default()
        }),
        progress: a.progress,
        timeout_ms: a.timeout.map(|t| t * 1000).unwrap_or(0),
    };
    let mut stream = client.generate(a.conn.req(req)).await.map_err(server)?.into_inner();
    let mut text = String::new();
    let mut out = std::io::stdout();
    let start = Instant::now();
    loop {
        match stream.message().await {
            Ok(Some(pb::GenerateEvent { event: Some(e) })) => match e {
                pb::generate_event::Event::Progress(p) => {
                    if a.conn.output == Output::Table {
                        eprintln!(
                            "[{:>6.2}s] {}",
                            start.elapsed().as_secs_f64(),
                            if p.message.is_empty() {
                                format!("stage {}", p.stage)
                            } else {
                                p.message
                            }
                        );
                    }
                }
                pb::generate_event::Event::Chunk(c) => {
                    text.push_str(&c.text);
                    if a.conn.output == Output::Table {
                        print!("{}", c.text);
                        let _ = out.flush();
                    }
                }
                pb::generate_event::Event::Finished(f) => {
                    let u = f.usage.unwrap_or_default();
                    match a.conn.output {
                        Output::Table => {
                            println!();
                            eprintln!(
                                "[{} prompt + {} generated tokens; first token after {:.0} ms{}]",
                                u.prompt_tokens,
                                u.completion_tokens,
                                u.time_to_first_token_us as f64 / 1000.0,
                                if u.queue_us > 0 {
                                    format!(
                                        ", {:.0} ms of it starting the model",
                                        u.queue_us as f64 / 1000.0
                                    )
                                } else {
                                    String::new()
                                }
                            );
                        }
                        Output::Json => print_json(&json!({
                            "model": a.model, "text": text,
                            "finish_reason": pb::FinishReason::try_from(f.reason).map(|r| r.as_str_name()).unwrap_or("?"),
                            "usage": { "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "time_to_first_token_us": u.time_to_first_token_us, "queue_us": u.queue_us, "instance_id": u.instance_id },
                        })),
                    }
                    return Ok(());
                }
            },
            Ok(Some(_)) => {}
            Ok(None) => bail!("the stream ended without an answer"),
            Err(e) => {
                if !text.is_empty() && a.conn.output == Output::Table {
                    println!();
                }
                return Err(server(e));
            }
        }
    }
}
