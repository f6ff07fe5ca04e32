//! Engine benchmark: what sllm adds on the way to a real inference engine, one run, one table.
//!
//! The engine is llama.cpp's `llama-server` (CPU, `-np 1 -t 1 -c 2048`) on a tiny random-weight
//! GGUF model written by `scripts/tiny-gguf.py`. sllm runs as it does in production: a private
//! redis-server, `sllm serve all` (ModelRegistry, WorkerRegistry, Scaler and Dispatch with its
//! OpenAI HTTP API, one process) and `sllm worker --backend engine --engine llamacpp` (another
//! process), with the model deployed through `sllm deploy` (backend `llamacpp`, one instance);
//! the worker starts the llama-server. Two paths to that one engine process take turns:
//!
//! - direct: HTTP to the llama-server's own `/v1/completions` and `/v1/chat/completions` (its
//!   port read from the command line the worker started it with, so both paths use one engine
//!   with one configuration);
//! - through sllm: the same body to Dispatch's endpoint of the same name, over the worker's
//!   Attach stream, to the same llama-server.
//!
//! Figures:
//!
//! 1. One-token completions (`max_tokens: 1`, not streamed): latency p50 / p99 per path and the
//!    latency sllm adds.
//! 2. 64-token streams (`stream: true`, `max_tokens: 64`, `ignore_eos: true`): time to the first
//!    body byte and to the end of the stream, p50 / p99, and what sllm adds; as completions,
//!    then as chats (one user message, through the model's ChatML template), where sllm asks
//!    for the tokens' ids in the chat's own form.
//! 3. CPU per request of the Dispatch process (`sllm serve all`), the agent (`sllm worker`), the
//!    engine and redis-server, from `/proc/PID/stat` (each process alone, children excluded), in
//!    both kinds of window: in the direct windows sllm's processes do only their background work.
//!
//! Load: an open loop at a fixed rate, 40% of the capacity measured first (one connection,
//! closed loop, direct), from a tokio + hyper client with keep-alive connections and
//! TCP_NODELAY; each latency counts from the request's scheduled send time (no coordinated
//! omission), and a pacing thread of its own sends on time. The paths take turns in windows
//! (A/B/A/B…); a path's p50 is the median of its windows' p50s, its p99 is over all of its
//! requests (one window holds too few for a p99), its CPU per request is its windows' CPU over
//! their requests. Every request uses `temperature: 0, seed: 1` and the same prompt.
//!
//! Inputs (environment; `scripts/bench engine` sets the first from `scripts/install-llama-server`):
//!
//! - `SLLM_LLAMA_SERVER`: the llama-server binary (default
//!   `${SLLM_CACHE_DIR:-~/.cache/sllm}/llama-cpp-0.3.36/bin/llama-server`);
//! - `SLLM_LLAMA_VOCAB`: the vocabulary GGUF for tiny-gguf.py (default
//!   `<binary>/../../models/ggml-vocab-llama-spm.gguf`), with llama.cpp's `gguf-py` next to
//!   `models/` (as the install script leaves them);
//! - `SLLM_PYTHON`: a Python with numpy and PyYAML (default: the repo's `.venv`, else python3);
//! - `ENGINE_BENCH_ROUNDS` (3), `ENGINE_BENCH_WINDOW_S` (5; the stream row's windows are twice
//!   as long), `ENGINE_BENCH_LOAD` (0.4 of capacity): the run's length and load.
//!
//! Run it with `scripts/bench engine`, or by hand:
//!
//! ```text
//! cargo build --release -p sllm -p sllm-integration-tests --bin sllm --bin engine-bench
//! SLLM_LLAMA_SERVER=$(scripts/install-llama-server | tail -n1) target/release/engine-bench
//! ```

// The allocator the `sllm` binary runs with.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use sllm_integration_tests::bench::{
    Http, LoggedChild as Child, after, cache_dir, cmdline, cpu_secs, descendant, env_or,
    http_client, median, percentile, print_table, redis_pid, repo_root,
};
use sllm_integration_tests::{JOIN_SECRET, RedisServer, sllm_bin};

/// The deployment's name (llama-server's `--alias`).
const MODEL: &str = "tiny";
/// The model file under the worker's model directory.
const MODEL_FILE: &str = "tiny.gguf";
const PROMPT: &str = "The capital of France is";
/// Tokens of each streamed answer.
const STREAM_TOKENS: u32 = 64;

fn main() -> Result<()> {
    // One runtime thread for the client: the two cores are for the processes being measured.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    rt.block_on(run())
}

// ---------------------------------------------------------------------------------------------
// Processes

/// The processes whose CPU is read in every window.
#[derive(Clone, Copy)]
struct Pids {
    dispatch: u32,
    worker: u32,
    engine: u32,
    redis: Option<u32>,
}

impl Pids {
    /// CPU seconds so far: Dispatch, worker, engine, redis.
    fn cpu(&self) -> [f64; 4] {
        [
            cpu_secs(self.dispatch),
            cpu_secs(self.worker),
            cpu_secs(self.engine),
            self.redis.map_or(f64::NAN, cpu_secs),
        ]
    }
}

// ---------------------------------------------------------------------------------------------
// Load

/// One request's figures.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// From the scheduled send to the first byte of the body, µs.
    first_us: f64,
    /// From the scheduled send to the end of the body, µs.
    total_us: f64,
    /// Token events in a streamed answer; completion tokens in an answer that is not.
    tokens: u32,
}

/// Sends one request and reads the whole answer; times count from `since`.
async fn one(
    client: &Http,
    uri: &hyper::Uri,
    body: &Bytes,
    stream: bool,
    since: Instant,
) -> Result<Sample, String> {
    let req = || {
        hyper::Request::post(uri.clone())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body.clone()))
            .map_err(|e| e.to_string())
    };
    // A pooled connection the server closed as it was reused (llama.cpp closes idle ones)
    // carried nothing: the request goes again, once, on a new connection.
    let resp = match client.request(req()?).await {
        Err(e) if e.is_connect() || format!("{e:?}").contains("IncompleteMessage") => {
            client.request(req()?).await
        }
        other => other,
    }
    .map_err(|e| format!("request failed: {e:?}"))?;
    let status = resp.status();
    let mut body = resp.into_body();
    let mut first = None;
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("answer broke: {e}"))?;
        if let Ok(data) = frame.into_data()
            && !data.is_empty()
        {
            first.get_or_insert_with(|| since.elapsed());
            buf.extend_from_slice(&data);
        }
    }
    let total = since.elapsed();
    let text = String::from_utf8_lossy(&buf);
    if !status.is_success() {
        return Err(format!("HTTP {status}: {}", text.chars().take(300).collect::<String>()));
    }
    let tokens = if stream {
        let mut tokens = 0;
        let mut done = false;
        for event in text.split("\n\n").filter_map(|b| b.trim().strip_prefix("data: ")) {
            if event == "[DONE]" {
                done = true;
            } else if event.contains("\"error\"") {
                return Err(format!("error event: {event}"));
            } else {
                let v: Value = serde_json::from_str(event).map_err(|e| format!("{e}: {event}"))?;
                let c = &v["choices"][0];
                let piece = c["text"].as_str().or_else(|| c["delta"]["content"].as_str());
                tokens += u32::from(piece.is_some_and(|t| !t.is_empty()));
            }
        }
        if !done {
            return Err(format!("stream without [DONE]: …{}", tail(&text, 200)));
        }
        tokens
    } else {
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
        if v["choices"][0]["text"].as_str().is_none() {
            return Err(format!("no choices[0].text: {text}"));
        }
        v["usage"]["completion_tokens"].as_u64().unwrap_or(0) as u32
    };
    let first = first.unwrap_or(total);
    Ok(Sample { first_us: first.as_secs_f64() * 1e6, total_us: total.as_secs_f64() * 1e6, tokens })
}

fn tail(s: &str, n: usize) -> String {
    let chars: Vec<char> = s.chars().collect();
    chars[chars.len().saturating_sub(n)..].iter().collect()
}

/// A request kind: its body, whether it streams, and the OpenAI endpoint it goes to.
#[derive(Clone)]
struct Kind {
    body: Bytes,
    stream: bool,
    path: &'static str,
}

fn one_token() -> Kind {
    let body = json!({
        "model": MODEL, "prompt": PROMPT, "max_tokens": 1, "temperature": 0, "seed": 1,
    });
    Kind { body: Bytes::from(body.to_string()), stream: false, path: "/v1/completions" }
}

fn streamed() -> Kind {
    let body = json!({
        "model": MODEL, "prompt": PROMPT, "max_tokens": STREAM_TOKENS, "temperature": 0,
        "seed": 1, "stream": true, "ignore_eos": true,
    });
    Kind { body: Bytes::from(body.to_string()), stream: true, path: "/v1/completions" }
}

fn chat_streamed() -> Kind {
    let body = json!({
        "model": MODEL, "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": STREAM_TOKENS, "temperature": 0, "seed": 1, "stream": true,
        "ignore_eos": true,
    });
    Kind { body: Bytes::from(body.to_string()), stream: true, path: "/v1/chat/completions" }
}

/// What one window measured.
struct Window {
    samples: Vec<Sample>,
    errors: Vec<String>,
    /// CPU seconds of Dispatch, worker, engine, redis during the window.
    cpu: [f64; 4],
}

/// Requests at `rate` per second for `dur`, each sent at its scheduled time by a pacing
/// thread whatever the earlier ones are doing (an open loop).
async fn open_loop(uri: &hyper::Uri, kind: &Kind, rate: f64, dur: Duration, pids: Pids) -> Window {
    let client = http_client();
    // Connections up before the window: a few, in parallel, not measured.
    let warm: Vec<_> = (0..3)
        .map(|_| {
            let (c, u, k) = (client.clone(), uri.clone(), kind.clone());
            tokio::spawn(async move { one(&c, &u, &k.body, k.stream, Instant::now()).await })
        })
        .collect();
    for w in warm {
        let _ = w.await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;

    let n = ((rate * dur.as_secs_f64()).round() as usize).max(1);
    let period = Duration::from_secs_f64(1.0 / rate);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let handle = tokio::runtime::Handle::current();
    let cpu0 = pids.cpu();
    let start = Instant::now() + Duration::from_millis(2);
    let (u, k) = (uri.clone(), kind.clone());
    let pacer = std::thread::spawn(move || {
        for i in 0..n {
            let at = start + period.mul_f64(i as f64);
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            let (c, u, k, tx) = (client.clone(), u.clone(), k.clone(), tx.clone());
            handle.spawn(async move {
                let _ = tx.send(one(&c, &u, &k.body, k.stream, at).await);
            });
        }
    });
    let mut samples = Vec::with_capacity(n);
    let mut errors = Vec::new();
    while let Some(r) = rx.recv().await {
        match r {
            Ok(s) => samples.push(s),
            Err(e) => errors.push(e),
        }
    }
    let _ = pacer.join();
    let cpu1 = pids.cpu();
    let cpu = std::array::from_fn(|i| cpu1[i] - cpu0[i]);
    Window { samples, errors, cpu }
}

/// Requests per second one connection gets with one request at a time.
async fn capacity(uri: &hyper::Uri, kind: &Kind, dur: Duration) -> Result<f64> {
    let client = http_client();
    let start = Instant::now();
    let mut n = 0u32;
    while start.elapsed() < dur {
        one(&client, uri, &kind.body, kind.stream, Instant::now())
            .await
            .map_err(anyhow::Error::msg)?;
        n += 1;
    }
    Ok(f64::from(n) / start.elapsed().as_secs_f64())
}

/// A path's figures over its windows.
struct PathFigures {
    first_p50: f64,
    first_p99: f64,
    total_p50: f64,
    total_p99: f64,
    /// µs of CPU per completed request: Dispatch, worker, engine, redis.
    cpu_us: [f64; 4],
    requests: usize,
    errors: Vec<String>,
    tokens_min: u32,
    tokens_max: u32,
}

fn figures(windows: &[Window]) -> PathFigures {
    let per_window = |f: fn(&Sample) -> f64| -> f64 {
        median(
            windows
                .iter()
                .map(|w| percentile(&mut w.samples.iter().map(f).collect::<Vec<_>>(), 0.5))
                .collect(),
        )
    };
    let pooled = |f: fn(&Sample) -> f64| -> f64 {
        percentile(
            &mut windows.iter().flat_map(|w| w.samples.iter().map(f)).collect::<Vec<_>>(),
            0.99,
        )
    };
    let requests: usize = windows.iter().map(|w| w.samples.len()).sum();
    let mut cpu_us = [0.0; 4];
    for (i, c) in cpu_us.iter_mut().enumerate() {
        *c = windows.iter().map(|w| w.cpu[i]).sum::<f64>() / requests.max(1) as f64 * 1e6;
    }
    let tokens = windows.iter().flat_map(|w| w.samples.iter().map(|s| s.tokens));
    PathFigures {
        first_p50: per_window(|s: &Sample| s.first_us),
        first_p99: pooled(|s: &Sample| s.first_us),
        total_p50: per_window(|s: &Sample| s.total_us),
        total_p99: pooled(|s: &Sample| s.total_us),
        cpu_us,
        requests,
        errors: windows.iter().flat_map(|w| w.errors.iter().cloned()).collect(),
        tokens_min: tokens.clone().min().unwrap_or(0),
        tokens_max: tokens.max().unwrap_or(0),
    }
}

/// Runs `rounds` rounds of a direct window and then an sllm window (the order alternating from
/// round to round, so neither path always follows the other).
async fn interleaved(
    direct: &hyper::Uri,
    via: &hyper::Uri,
    kind: &Kind,
    rate: f64,
    dur: Duration,
    rounds: usize,
    pids: Pids,
) -> (PathFigures, PathFigures) {
    let (mut d, mut v) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        for which in [r % 2, 1 - r % 2] {
            let w = if which == 0 {
                open_loop(direct, kind, rate, dur, pids).await
            } else {
                open_loop(via, kind, rate, dur, pids).await
            };
            eprintln!(
                "    round {}/{rounds} {:<6}: {} requests, {} errors, p50 {:.0} µs",
                r + 1,
                if which == 0 { "direct" } else { "sllm" },
                w.samples.len(),
                w.errors.len(),
                percentile(&mut w.samples.iter().map(|s| s.total_us).collect::<Vec<_>>(), 0.5)
            );
            if which == 0 { d.push(w) } else { v.push(w) }
        }
    }
    (figures(&d), figures(&v))
}

// ---------------------------------------------------------------------------------------------
// Set-up

struct Inputs {
    llama_server: PathBuf,
    vocab: PathBuf,
    gguf_py: PathBuf,
    python: PathBuf,
}

fn inputs() -> Result<Inputs> {
    let cache = cache_dir();
    let llama_server = std::env::var_os("SLLM_LLAMA_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache.join("llama-cpp-0.3.36/bin/llama-server"));
    if !llama_server.is_file() {
        bail!(
            "no llama-server at {} (run scripts/install-llama-server and set SLLM_LLAMA_SERVER \
             to the path it prints)",
            llama_server.display()
        );
    }
    let llama_server = std::fs::canonicalize(&llama_server)?;
    let install = llama_server.parent().and_then(Path::parent).context("llama-server path")?;
    let vocab = std::env::var_os("SLLM_LLAMA_VOCAB")
        .map(PathBuf::from)
        .unwrap_or_else(|| install.join("models/ggml-vocab-llama-spm.gguf"));
    if !vocab.is_file() {
        bail!("no vocabulary at {} (set SLLM_LLAMA_VOCAB)", vocab.display());
    }
    let gguf_py =
        vocab.parent().and_then(Path::parent).map(|d| d.join("gguf-py")).unwrap_or_default();
    let venv = repo_root().join(".venv/bin/python");
    let python = std::env::var_os("SLLM_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| if venv.is_file() { venv } else { PathBuf::from("python3") });
    Ok(Inputs { llama_server, vocab, gguf_py, python })
}

/// `llama-server --version`'s lines, e.g. "version: 1 (abcdef0)".
fn llama_version(bin: &Path) -> String {
    match Command::new(bin).arg("--version").output() {
        Ok(o) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("version") || l.starts_with("built with"))
                .collect();
            if lines.is_empty() { "unknown".into() } else { lines.join(", ") }
        }
        Err(e) => format!("unknown ({e})"),
    }
}

async fn run() -> Result<()> {
    let t_start = Instant::now();
    let rounds: usize = env_or("ENGINE_BENCH_ROUNDS", 3usize).max(1);
    let window = Duration::from_secs_f64(env_or("ENGINE_BENCH_WINDOW_S", 5.0f64).max(0.5));
    let load: f64 = env_or("ENGINE_BENCH_LOAD", 0.4f64).clamp(0.01, 0.95);
    let inputs = inputs()?;
    let version = llama_version(&inputs.llama_server);
    eprintln!("engine-bench: {} ({version})", inputs.llama_server.display());

    let tmp = tempfile::Builder::new().prefix("sllm-engine-bench-").tempdir()?;
    let models = tmp.path().join("models");
    std::fs::create_dir_all(&models)?;
    let model_path = models.join(MODEL_FILE);
    let out = Command::new(&inputs.python)
        .arg(repo_root().join("scripts/tiny-gguf.py"))
        .arg("--vocab")
        .arg(&inputs.vocab)
        .arg("--out")
        .arg(&model_path)
        .arg("--seed")
        .arg("1")
        .env("PYTHONPATH", &inputs.gguf_py)
        .output()
        .with_context(|| format!("running {} scripts/tiny-gguf.py", inputs.python.display()))?;
    if !out.status.success() {
        bail!("tiny-gguf.py failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    // The control plane: redis, `sllm serve all`, `sllm worker`.
    let redis = RedisServer::start()?;
    let sllm = sllm_bin()?;
    let quiet = |c: &mut Command| {
        c.env("NO_COLOR", "1").env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
    };
    let mut cmd = Command::new(&sllm);
    cmd.args(["serve", "all", "--redis-url", &redis.url(), "--namespace", "bench"])
        .args(["--grpc-addr", "127.0.0.1:0", "--openai-addr", "127.0.0.1:0"])
        .args(["--metrics-addr", "off", "--join-secret", JOIN_SECRET]);
    quiet(&mut cmd);
    let serve = Child::spawn(
        "sllm serve all",
        &mut cmd,
        tmp.path().join("serve.log"),
        "openai api listening on",
        Duration::from_secs(20),
    )?;
    let grpc = after(serve.line("serving gRPC on"), "serving gRPC on")?;
    let openai = after(serve.line("openai api listening on"), "openai api listening on")?;

    let engine_dir = inputs.llama_server.parent().context("the llama-server's directory")?;
    let path = format!("{}:{}", engine_dir.display(), std::env::var("PATH").unwrap_or_default());
    let mut cmd = Command::new(&sllm);
    cmd.args(["worker", "--backend", "engine", "--engine", "llamacpp"])
        .arg("--model-dir")
        .arg(&models)
        .args(["--gpus", "1", "--registry", &format!("http://{grpc}")])
        .args(["--node-id", "bench-node", "--address", "10.0.0.1", "--join-secret", JOIN_SECRET])
        .env("PATH", &path);
    quiet(&mut cmd);
    let worker = Child::spawn(
        "sllm worker",
        &mut cmd,
        tmp.path().join("worker.log"),
        "started",
        Duration::from_secs(20),
    )?;

    // Deploy: backend_config is checked against llama.cpp's flags and becomes its command line.
    let bc = json!({
        "pretrained_model_name_or_path": MODEL_FILE,
        "parallel": 1,
        "threads": 1,
        "ctx_size": 2048,
    })
    .to_string();
    let out = Command::new(&sllm)
        .args(["deploy", MODEL, "--backend", "llamacpp", "--num-gpus", "1"])
        .args(["--min", "1", "--max", "1", "--backend-config", &bc])
        .args(["--wait", "--timeout", "180", "--endpoint", &format!("http://{grpc}")])
        .env("NO_COLOR", "1")
        .output()?;
    if !out.status.success() {
        bail!(
            "sllm deploy failed: {}\n--- worker log (tail):\n{}\n--- serve log (tail):\n{}",
            String::from_utf8_lossy(&out.stderr).trim(),
            worker.log_tail(30),
            serve.log_tail(30)
        );
    }
    eprintln!("engine-bench: deployed {MODEL} with backend_config {bc}");

    // The engine the worker started, its port, and the processes to read CPU from.
    let engine = {
        let start = Instant::now();
        loop {
            if let Some(pid) = descendant(worker.pid(), "llama-server") {
                break pid;
            }
            if start.elapsed() > Duration::from_secs(10) {
                bail!("no llama-server under the worker (pid {})", worker.pid());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let engine_cmd = cmdline(engine);
    let port = engine_cmd
        .iter()
        .position(|a| a == "--port")
        .and_then(|i| engine_cmd.get(i + 1))
        .context("no --port on the engine's command line")?
        .clone();
    let shown: Vec<String> = engine_cmd
        .iter()
        .map(|a| {
            if a.ends_with(MODEL_FILE) {
                MODEL_FILE.to_string()
            } else if a.ends_with("/llama-server") {
                "llama-server".to_string()
            } else {
                a.clone()
            }
        })
        .collect();
    let engine_line = shown.join(" ");
    eprintln!("engine-bench: engine pid {engine}: {}", engine_cmd.join(" "));
    let pids = Pids {
        dispatch: serve.pid(),
        worker: worker.pid(),
        engine,
        redis: redis_pid(redis.socket()),
    };

    // Each path's URI for a kind of request.
    let (direct_at, via_at) = (format!("http://127.0.0.1:{port}"), format!("http://{openai}"));
    let at = |base: &str, kind: &Kind| -> Result<hyper::Uri> {
        Ok(format!("{base}{}", kind.path).parse()?)
    };
    let (direct, via) = (at(&direct_at, &one_token())?, at(&via_at, &one_token())?);
    let (direct_chat, via_chat) =
        (at(&direct_at, &chat_streamed())?, at(&via_at, &chat_streamed())?);

    // Routable through sllm (the ready event reaches Dispatch a moment after the registry).
    let client = http_client();
    let t = Instant::now();
    let first_via = loop {
        match one(&client, &via, &one_token().body, false, Instant::now()).await {
            Ok(s) => break s,
            Err(e) if t.elapsed() > Duration::from_secs(30) => {
                bail!(
                    "no answer through sllm within 30 s: {e}\n--- worker log (tail):\n{}\n--- \
                     serve log (tail):\n{}",
                    worker.log_tail(30),
                    serve.log_tail(30)
                )
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    eprintln!("engine-bench: served through sllm ({:.1} ms)", first_via.total_us / 1000.0);

    // Both paths answer the same: same text, same token counts.
    let text_of = |b: &Bytes, uri: &hyper::Uri| {
        let (client, b, uri) = (client.clone(), b.clone(), uri.clone());
        async move {
            let req = hyper::Request::post(uri)
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(Full::new(b))?;
            let resp = client.request(req).await?;
            let body = resp.into_body().collect().await?.to_bytes();
            anyhow::Ok(String::from_utf8_lossy(&body).into_owned())
        }
    };
    let probe = Bytes::from(
        json!({"model": MODEL, "prompt": PROMPT, "max_tokens": 16, "temperature": 0, "seed": 1})
            .to_string(),
    );
    let (a, b) = (text_of(&probe, &direct).await?, text_of(&probe, &via).await?);
    let text = |s: &str| -> String {
        serde_json::from_str::<Value>(s)
            .ok()
            .and_then(|v| v["choices"][0]["text"].as_str().map(str::to_string))
            .unwrap_or_else(|| format!("<no text: {s}>"))
    };
    let same_text = text(&a) == text(&b);
    if !same_text {
        eprintln!("engine-bench: DIFFERENT answers\n  direct: {a}\n  sllm:   {b}");
    }
    for kind in [one_token(), streamed(), chat_streamed()] {
        for base in [&direct_at, &via_at] {
            let uri = &at(base, &kind)?;
            for _ in 0..20 {
                one(&client, uri, &kind.body, kind.stream, Instant::now())
                    .await
                    .map_err(anyhow::Error::msg)
                    .with_context(|| format!("warm-up request to {uri}"))?;
            }
        }
    }

    // Capacity, direct, one request at a time; the rates are a fraction of it.
    eprintln!("engine-bench: capacity ...");
    let cap1 = capacity(&direct, &one_token(), Duration::from_secs(3)).await?;
    let cap2 = capacity(&direct, &streamed(), Duration::from_secs(4)).await?;
    let cap3 = capacity(&direct_chat, &chat_streamed(), Duration::from_secs(4)).await?;
    let rate1 = (cap1 * load).round().max(1.0);
    let rate2 = ((cap2 * load) * 10.0).round().max(1.0) / 10.0;
    let rate3 = ((cap3 * load) * 10.0).round().max(1.0) / 10.0;
    eprintln!(
        "engine-bench: capacity {cap1:.0} req/s (1 token), {cap2:.1} streams/s (64 tokens), \
         {cap3:.1} chat streams/s; open loop at {rate1:.0} req/s, {rate2:.1} and {rate3:.1} \
         streams/s"
    );

    eprintln!("engine-bench: 1/3 one-token completions at {rate1:.0} req/s ...");
    let (d1, v1) = interleaved(&direct, &via, &one_token(), rate1, window, rounds, pids).await;
    eprintln!("engine-bench: 2/3 64-token streams at {rate2:.1} streams/s ...");
    let streams = at(&direct_at, &streamed())?;
    let via_streams = at(&via_at, &streamed())?;
    let (d2, v2) =
        interleaved(&streams, &via_streams, &streamed(), rate2, window * 2, rounds, pids).await;
    eprintln!("engine-bench: 3/3 64-token chat streams at {rate3:.1} streams/s ...");
    let chats = chat_streamed();
    let (d3, v3) =
        interleaved(&direct_chat, &via_chat, &chats, rate3, window * 2, rounds, pids).await;

    // ---- the table
    let us = |x: f64| {
        if !x.is_finite() {
            "-".to_string()
        } else if x.abs() >= 10_000.0 {
            format!("{:.2} ms", x / 1000.0)
        } else {
            format!("{x:.0} µs")
        }
    };
    let plus = |x: f64| if x >= 0.0 { format!("+{}", us(x)) } else { us(x) };
    let cpu = |x: f64| if x.is_finite() { format!("{x:.1} µs") } else { "-".to_string() };
    let cpu_plus = |x: f64| {
        if !x.is_finite() {
            "-".to_string()
        } else if x >= 0.0 {
            format!("+{x:.1} µs")
        } else {
            format!("{x:.1} µs")
        }
    };
    let mut rows: Vec<[String; 4]> = Vec::new();
    let mut lat = |name: String, d: f64, v: f64| rows.push([name, us(d), us(v), plus(v - d)]);
    let r1 = format!("{rate1:.0} req/s");
    lat(format!("1-token completion, {r1}: latency p50"), d1.total_p50, v1.total_p50);
    lat("  latency p99".into(), d1.total_p99, v1.total_p99);
    let r2 = format!("{rate2:.1} streams/s");
    lat(format!("64-token stream, {r2}: first byte p50"), d2.first_p50, v2.first_p50);
    lat("  first byte p99".into(), d2.first_p99, v2.first_p99);
    lat("  whole stream p50".into(), d2.total_p50, v2.total_p50);
    lat("  whole stream p99".into(), d2.total_p99, v2.total_p99);
    let r3 = format!("{rate3:.1} streams/s");
    lat(format!("64-token chat stream, {r3}: first byte p50"), d3.first_p50, v3.first_p50);
    lat("  first byte p99".into(), d3.first_p99, v3.first_p99);
    lat("  whole stream p50".into(), d3.total_p50, v3.total_p50);
    lat("  whole stream p99".into(), d3.total_p99, v3.total_p99);
    let kinds = [("1-token", &d1, &v1), ("64-token stream", &d2, &v2), ("chat stream", &d3, &v3)];
    for (label, d, v) in kinds {
        let names = [
            "Dispatch (`sllm serve all`)",
            "agent (`sllm worker`)",
            "engine (llama-server)",
            "redis-server",
        ];
        for (i, n) in names.iter().enumerate() {
            rows.push([
                format!("CPU per request, {label}: {n}"),
                cpu(d.cpu_us[i]),
                cpu(v.cpu_us[i]),
                cpu_plus(v.cpu_us[i] - d.cpu_us[i]),
            ]);
        }
    }
    for (label, d, v) in kinds {
        rows.push([
            format!("requests / errors, {label}"),
            format!("{} / {}", d.requests, d.errors.len()),
            format!("{} / {}", v.requests, v.errors.len()),
            String::new(),
        ]);
        rows.push([
            format!("  tokens per answer (min..max), {label}"),
            format!("{}..{}", d.tokens_min, d.tokens_max),
            format!("{}..{}", v.tokens_min, v.tokens_max),
            String::new(),
        ]);
    }

    println!();
    println!("engine-bench: sllm's added latency and CPU in front of a real llama.cpp server");
    println!();
    println!("- engine: llama-server {version}");
    println!("- engine command (started by `sllm worker`): `{engine_line}`");
    println!(
        "- model: scripts/tiny-gguf.py --seed 1 (random weights, 2 layers, width 64, 32k vocab); \
         prompt {PROMPT:?}, temperature 0, seed 1"
    );
    println!(
        "- direct: POST /v1/completions (/v1/chat/completions for the chat streams, one user \
         message) to that llama-server; through sllm: the same to `sllm serve all`'s OpenAI API \
         → Attach stream → `sllm worker` → the same llama-server"
    );
    println!(
        "- load: open loop at {:.0}% of one connection's closed-loop capacity ({cap1:.0} req/s \
         1-token, {cap2:.1} streams/s 64-token, {cap3:.1} chat streams/s); keep-alive + TCP_NODELAY; latency from the \
         scheduled send; {rounds} rounds of interleaved direct/sllm windows ({:.0} s, {:.0} s); \
         p50 = median of the windows' p50, p99 over all of a path's requests; CPU from \
         /proc/PID/stat over the windows / requests (direct windows: sllm's idle background)",
        load * 100.0,
        window.as_secs_f64(),
        window.as_secs_f64() * 2.0
    );
    println!(
        "- same answer both ways (16 tokens, temperature 0): {}",
        if same_text { "yes" } else { "NO" }
    );
    println!();
    let headers = ["measure", "direct", "through sllm", "added by sllm"].map(String::from);
    let rows: Vec<Vec<String>> = rows.iter().map(|r| r.to_vec()).collect();
    print_table(&headers, &rows);
    println!();
    let all = [("direct", &d1), ("sllm", &v1), ("direct", &d2), ("sllm", &v2)];
    for (label, f) in all.into_iter().chain([("direct", &d3), ("sllm", &v3)]) {
        for e in f.errors.iter().take(3) {
            println!("error ({label}): {e}");
        }
    }
    let warnings: Vec<(&str, String)> = [&serve, &worker]
        .iter()
        .flat_map(|c| c.warnings().into_iter().map(move |w| (c.name(), w)))
        .collect();
    if warnings.is_empty() {
        println!("sllm logged no warnings or errors during the run");
    } else {
        println!("sllm logged {} warnings/errors during the run; the first:", warnings.len());
        for (name, w) in warnings.iter().take(5) {
            println!("  {name}: {w}");
        }
    }
    println!("run took {:.0} s", t_start.elapsed().as_secs_f64());

    // Worker first (it ends its engine), then Dispatch, then redis.
    drop(worker);
    drop(serve);
    drop(redis);
    Ok(())
}
