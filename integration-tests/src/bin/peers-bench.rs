//! Peers benchmark: sllm beside the Rust gateways users choose between, in front of one fast
//! fake engine, in one run, one table.
//!
//! The peers are the routers published on PyPI that route OpenAI HTTP to engine URLs: SMG
//! (`smg`), `sglang-router` and `vllm-router`, each started with `--worker-urls <engine>
//! --policy round_robin`, `--log-level warn` (at their default, info, they write a line or two
//! per request; sllm writes none at its default) and its metrics listener on a free port, and
//! otherwise their defaults. sllm runs as it does in production: a private redis-server, `sllm
//! serve all` (one process) and `sllm worker --backend engine --engine custom` (another), with
//! the model deployed through `sllm deploy` with one instance kept warm (`--min 1`). The worker
//! starts the engine, `sllm sim-engine --decode-ms 0 --load-ms 0` (one SSE event per token, and
//! SGLang's `/model_info` and `/server_info`, which the peers read when they register it); the
//! peers and the direct path are pointed at that same engine process (its port read from the
//! command line the worker started it with). Paths:
//!
//! - direct: POST to the engine's own `/v1/completions`;
//! - each peer: POST to the router's `/v1/completions`;
//! - sllm: POST to Dispatch's `/v1/completions`, over the worker's Attach stream, to the engine.
//!
//! Load: `oha` for every path and every figure, with keep-alive connections: an open loop at a
//! fixed rate (`-q RATE --latency-correction -c 32`: each latency counts from the request's
//! scheduled send, so a stalled router cannot hide its queue) and a closed loop (`-c 64`), with
//! one-token completions and with 64-token streams (`ignore_eos`); time to first byte is oha's,
//! from streams at a light 100 per second. The windows take turns: each repetition runs every
//! measurement on direct, then each peer, then sllm. A figure is the median over the
//! repetitions, with the lowest and highest beside it. "Added" latency is a path's p50 (p99)
//! minus direct's in the same repetition.
//!
//! CPU per request: user + system time from `/proc/PID/stat` of the router's processes (for
//! sllm: `serve all` and the agent, background work included) over a window, divided by the
//! requests it completed; the engine's and oha's CPU are read the same way, and each router's
//! CPU with no requests once before the load. Memory: VmRSS of those processes after the last
//! window. Streams: before the load, 20 streams one at a time on every path have their events
//! counted and their first byte and first token timed; tokens/s is oha's completed streams per
//! second times those token events per response (oha counts bytes, not events; its bytes per
//! response under load are compared with the count's).
//!
//! The whole run belongs in a loopback-only network namespace (`scripts/bench peers` starts it
//! under `unshare --net`): sglang-router and SMG look for the model's tokenizer on Hugging Face,
//! and there they fail at once instead of downloading; every path is measured in the same
//! namespace.
//!
//! Inputs (environment; `scripts/bench peers` installs them and sets the first two):
//!
//! - `SLLM_PEERS_VENV`: a virtualenv with `smg`, `sglang-router` and `vllm-router` (default
//!   `${SLLM_CACHE_DIR:-~/.cache/sllm}/peers-venv`);
//! - `SLLM_OHA`: the `oha` binary (default: `oha` on PATH, else `~/.cargo/bin/oha`);
//! - `SLLM_PEERS_SECONDS` (10), `SLLM_PEERS_REPS` (3): each window's length and the number of
//!   repetitions.
//!
//! ```text
//! scripts/bench peers
//! SLLM_PEERS_SECONDS=2 SLLM_PEERS_REPS=1 scripts/bench peers   # a quick look
//! ```

// The allocator the `sllm` binary runs with.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use sllm_integration_tests::bench::{
    Http, LoggedChild, after, alive, cache_dir, cmdline, cpu_secs, descendants, env_or, free_port,
    http_client, median, print_table, redis_pid, rss_kib, strip_ansi,
};
use sllm_integration_tests::{JOIN_SECRET, RedisServer, sllm_bin};

/// The deployment's name, which every path's requests carry and the engine serves.
const MODEL: &str = "sim";
const PROMPT: &str = "The capital of France is";
/// Tokens of each streamed answer.
const STREAM_TOKENS: u32 = 64;
/// Connections of the open-loop windows (enough that none waits for a free one at 2,000/s).
const OPEN_CONNECTIONS: usize = 32;
/// Connections of the closed-loop windows.
const CLOSED_CONNECTIONS: usize = 64;
/// Streams per second of the time-to-first-byte windows: a light load, well under every path's
/// capacity, so the figure is the path's own latency rather than its queue.
const STREAM_RATE: f64 = 100.0;
/// Streams each path is asked for, one at a time, to count their events.
const PROBE_STREAMS: usize = 20;

/// The peers, as published on PyPI; `scripts/bench peers` installs these versions.
const PEERS: [Peer; 3] = [
    Peer { name: "SMG", package: "smg", version: "1.13.0" },
    Peer { name: "sglang-router", package: "sglang-router", version: "0.3.2" },
    Peer { name: "vllm-router", package: "vllm-router", version: "0.1.17" },
];

struct Peer {
    name: &'static str,
    package: &'static str,
    version: &'static str,
}

fn main() -> Result<()> {
    // One runtime thread: oha does the load; this process only starts, probes and reads /proc.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    rt.block_on(run())
}

// ---------------------------------------------------------------------------------------------
// Paths

/// One way to the engine: its base URL and the processes that count as its router.
struct Route {
    name: String,
    base: String,
    /// The router's processes (for sllm: Dispatch and the agent); none for direct.
    pids: Vec<u32>,
}

impl Route {
    fn url(&self) -> String {
        format!("{}/v1/completions", self.base)
    }

    fn cpu(&self) -> f64 {
        self.pids.iter().map(|p| cpu_secs(*p)).sum()
    }

    fn rss_kib(&self) -> Option<u64> {
        if self.pids.is_empty() {
            return None;
        }
        self.pids.iter().map(|p| rss_kib(*p)).sum()
    }

    fn is_peer(&self) -> bool {
        !self.pids.is_empty() && self.name != "sllm"
    }
}

/// CPU seconds this process's waited-for children used (`cutime + cstime`): oha's, as each
/// oha is the only child waited for during its window.
fn children_cpu_secs() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return f64::NAN };
    let fields: Vec<&str> =
        stat.rsplit(')').next().map(|r| r.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(f64::NAN);
    (ticks(13) + ticks(14)) / 100.0
}

/// The machine's (idle, total) CPU ticks so far, from the first line of /proc/stat.
fn machine_ticks() -> (f64, f64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<f64> = text
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    (idle, v.iter().sum())
}

// ---------------------------------------------------------------------------------------------
// Measurements

/// A kind of window: its requests and its load.
struct Measure {
    label: &'static str,
    stream: bool,
    /// Requests per second of an open loop; None: a closed loop.
    rate: Option<f64>,
    connections: usize,
}

const MEASURES: [Measure; 5] = [
    Measure { label: "500 req/s", stream: false, rate: Some(500.0), connections: OPEN_CONNECTIONS },
    Measure {
        label: "2,000 req/s",
        stream: false,
        rate: Some(2000.0),
        connections: OPEN_CONNECTIONS,
    },
    Measure {
        label: "closed loop, 64 connections",
        stream: false,
        rate: None,
        connections: CLOSED_CONNECTIONS,
    },
    Measure {
        label: "64-token streams, closed loop, 64 connections",
        stream: true,
        rate: None,
        connections: CLOSED_CONNECTIONS,
    },
    Measure {
        label: "64-token streams, 100 streams/s",
        stream: true,
        rate: Some(STREAM_RATE),
        connections: OPEN_CONNECTIONS,
    },
];
const M500: usize = 0;
const M2000: usize = 1;
const MCLOSED: usize = 2;
const MSTREAMS: usize = 3;
const MTTFB: usize = 4;

fn body(stream: bool) -> String {
    if stream {
        json!({
            "model": MODEL, "prompt": PROMPT, "max_tokens": STREAM_TOKENS, "temperature": 0,
            "stream": true, "ignore_eos": true,
        })
        .to_string()
    } else {
        json!({"model": MODEL, "prompt": PROMPT, "max_tokens": 1, "temperature": 0}).to_string()
    }
}

/// What one window measured (times in seconds).
#[derive(Clone, Debug)]
struct Window {
    /// Answers with status 200.
    ok: f64,
    /// Answers with another status, and requests that got none.
    errors: u64,
    first_error: Option<String>,
    /// The window's length as oha reports it.
    secs: f64,
    p50: f64,
    p99: f64,
    first_byte_p50: f64,
    bytes_per_answer: f64,
    /// CPU seconds during the window: the router's processes, the engine, redis-server, oha.
    router_cpu: f64,
    engine_cpu: f64,
    redis_cpu: f64,
    oha_cpu: f64,
    /// Share of the machine's CPU time that was idle.
    idle: f64,
}

impl Window {
    fn per_ok(&self, cpu: f64) -> f64 {
        if self.ok > 0.0 { cpu / self.ok } else { f64::NAN }
    }

    fn rate(&self) -> f64 {
        self.ok / self.secs
    }
}

/// Runs oha once against `route` and reads the processes' CPU around it.
async fn window(
    oha: &Path,
    route: &Route,
    m: &Measure,
    secs: f64,
    engine: u32,
    redis: Option<u32>,
) -> Result<Window> {
    let mut cmd = tokio::process::Command::new(oha);
    // A request that takes 30 s has met a broken path; it counts as an error.
    cmd.args(["--no-tui", "--output-format", "json", "-w", "-t", "30s"])
        .arg("-z")
        .arg(format!("{}ms", (secs * 1000.0).round() as u64))
        .arg("-c")
        .arg(m.connections.to_string());
    if let Some(rate) = m.rate {
        cmd.arg("-q").arg(rate.to_string()).arg("--latency-correction");
    }
    cmd.args(["-m", "POST", "-H", "content-type: application/json", "-d", &body(m.stream)])
        .arg(route.url())
        .env("NO_COLOR", "1")
        .kill_on_drop(true);
    let (r0, e0, d0, o0, m0) = (
        route.cpu(),
        cpu_secs(engine),
        redis.map_or(f64::NAN, cpu_secs),
        children_cpu_secs(),
        machine_ticks(),
    );
    let out = cmd.output().await.with_context(|| format!("running {}", oha.display()))?;
    let (r1, e1, d1, o1, m1) = (
        route.cpu(),
        cpu_secs(engine),
        redis.map_or(f64::NAN, cpu_secs),
        children_cpu_secs(),
        machine_ticks(),
    );
    if !out.status.success() {
        bail!("oha failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    let v: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "oha's JSON: {}",
            String::from_utf8_lossy(&out.stdout).chars().take(300).collect::<String>()
        )
    })?;
    let num = |p: &str| v.pointer(p).and_then(Value::as_f64).unwrap_or(f64::NAN);
    let codes = v["statusCodeDistribution"].as_object().cloned().unwrap_or_default();
    let count = |x: &Value| x.as_u64().unwrap_or(0);
    let ok = codes.get("200").map_or(0, count) as f64;
    let other: u64 = codes.iter().filter(|(k, _)| *k != "200").map(|(_, x)| count(x)).sum();
    let failures = v["errorDistribution"].as_object().cloned().unwrap_or_default();
    let failed: u64 = failures.values().map(count).sum();
    let first_error = failures
        .iter()
        .map(|(k, n)| format!("{k} ({n})"))
        .chain(codes.iter().filter(|(k, _)| *k != "200").map(|(k, n)| format!("HTTP {k} ({n})")))
        .next();
    Ok(Window {
        ok,
        errors: other + failed,
        first_error,
        secs: num("/summary/total"),
        p50: num("/latencyPercentiles/p50"),
        p99: num("/latencyPercentiles/p99"),
        first_byte_p50: num("/firstBytePercentiles/p50"),
        bytes_per_answer: num("/summary/sizePerRequest"),
        router_cpu: r1 - r0,
        engine_cpu: e1 - e0,
        redis_cpu: d1 - d0,
        oha_cpu: o1 - o0,
        idle: (m1.0 - m0.0) / (m1.1 - m0.1).max(1.0),
    })
}

/// What a path's streams look like, counted one stream at a time before the load.
#[derive(Clone, Debug, Default)]
struct StreamShape {
    /// `data:` events per response, `[DONE]` included.
    events: f64,
    /// Events with text (tokens) per response.
    tokens: f64,
    bytes: f64,
    /// Seconds from sending to the first body byte, and to the first event with text.
    first_byte: f64,
    first_token: f64,
}

/// Whether `text` holds a whole event with a token in it.
fn has_token(text: &str) -> bool {
    let whole = text.rfind("\n\n").map_or("", |i| &text[..i]);
    whole.split("\n\n").any(|block| {
        block
            .lines()
            .find_map(|l| l.strip_prefix("data:"))
            .and_then(|d| serde_json::from_str::<Value>(d.trim()).ok())
            .is_some_and(|v| v["choices"][0]["text"].as_str().is_some_and(|t| !t.is_empty()))
    })
}

/// Sends `PROBE_STREAMS` 64-token streams to `uri` one after another, times their first byte
/// and first token and counts their events; fails on any answer that is not a whole,
/// well-formed stream.
async fn probe(client: &Http, uri: &str) -> Result<StreamShape> {
    let uri: hyper::Uri = uri.parse()?;
    let (mut events, mut tokens, mut bytes) = (Vec::new(), Vec::new(), Vec::new());
    let (mut first_bytes, mut first_tokens) = (Vec::new(), Vec::new());
    for _ in 0..PROBE_STREAMS {
        let req = hyper::Request::post(uri.clone())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body(true))))?;
        let since = Instant::now();
        let resp = client.request(req).await?;
        let status = resp.status();
        let mut stream = resp.into_body();
        let mut raw = Vec::new();
        let (mut first_byte, mut first_token) = (None, None);
        while let Some(frame) = stream.frame().await {
            if let Ok(data) = frame?.into_data()
                && !data.is_empty()
            {
                first_byte.get_or_insert_with(|| since.elapsed());
                raw.extend_from_slice(&data);
                if first_token.is_none() && has_token(&String::from_utf8_lossy(&raw)) {
                    first_token = Some(since.elapsed());
                }
            }
        }
        let text = String::from_utf8_lossy(&raw);
        if !status.is_success() {
            bail!("HTTP {status}: {}", text.chars().take(300).collect::<String>());
        }
        let (mut n, mut t, mut done) = (0u32, 0u32, false);
        for block in text.split("\n\n").map(str::trim).filter(|b| !b.is_empty()) {
            let Some(data) = block.lines().find_map(|l| l.strip_prefix("data:")) else {
                continue;
            };
            let data = data.trim();
            n += 1;
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let v: Value = serde_json::from_str(data).with_context(|| format!("event {data}"))?;
            if v.get("error").is_some() {
                bail!("error event: {data}");
            }
            t += u32::from(v["choices"][0]["text"].as_str().is_some_and(|s| !s.is_empty()));
        }
        if !done {
            bail!("a stream without [DONE]");
        }
        events.push(f64::from(n));
        tokens.push(f64::from(t));
        bytes.push(raw.len() as f64);
        first_bytes.push(first_byte.map_or(f64::NAN, |d| d.as_secs_f64()));
        first_tokens.push(first_token.map_or(f64::NAN, |d| d.as_secs_f64()));
    }
    Ok(StreamShape {
        events: median(events),
        tokens: median(tokens),
        bytes: median(bytes),
        first_byte: median(first_bytes),
        first_token: median(first_tokens),
    })
}

/// Waits until `route` answers a one-token completion with 200 and a text.
async fn until_serving(
    client: &Http,
    route: &Route,
    child: Option<&mut LoggedChild>,
) -> Result<()> {
    let uri: hyper::Uri = route.url().parse()?;
    let start = Instant::now();
    let mut child = child;
    let mut last = String::new();
    while start.elapsed() < Duration::from_secs(120) {
        if let Some(c) = child.as_deref_mut()
            && c.exited()
        {
            bail!("{} exited; its log:\n{}", route.name, c.log_tail(30));
        }
        let req = hyper::Request::post(uri.clone())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body(false))))?;
        match client.request(req).await {
            Ok(resp) => {
                let status = resp.status();
                let raw =
                    resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                let v: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
                if status.is_success() && v["choices"][0]["text"].is_string() {
                    return Ok(());
                }
                last = format!("HTTP {status}: {}", String::from_utf8_lossy(&raw));
            }
            Err(e) => last = format!("{e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = child.map(|c| c.log_tail(30)).unwrap_or_default();
    bail!("{} did not serve within 120 s (last: {last}); its log:\n{log}", route.name)
}

// ---------------------------------------------------------------------------------------------
// Set-up

fn venv() -> PathBuf {
    std::env::var_os("SLLM_PEERS_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("peers-venv"))
}

fn oha_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SLLM_OHA") {
        return Ok(PathBuf::from(p));
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("oha")).collect::<Vec<_>>())
        .unwrap_or_default();
    let home = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/oha"));
    on_path.into_iter().chain(home).find(|p| p.is_file()).context(
        "no oha (install it with `cargo install oha --locked`, or run `scripts/bench peers`)",
    )
}

/// The command line of a peer router on `port`, routing to `engine`.
fn peer_command(venv: &Path, peer: &Peer, port: u16, metrics: u16, engine: &str) -> Command {
    let py = venv.join("bin/python");
    let mut cmd = match peer.package {
        // Both wheels install a `smg` script (sglang-router's wins); the modules are distinct.
        "smg" => {
            let mut c = Command::new(&py);
            c.args(["-m", "smg", "launch"]);
            c
        }
        "sglang-router" => {
            let mut c = Command::new(&py);
            c.args(["-m", "sglang_router", "launch"]);
            c
        }
        _ => Command::new(venv.join("bin/vllm-router")),
    };
    let log_level = if peer.package == "vllm-router" { "warning" } else { "warn" };
    cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--worker-urls", engine, "--policy", "round_robin"])
        .args(["--prometheus-host", "127.0.0.1", "--prometheus-port", &metrics.to_string()])
        .args(["--log-level", log_level])
        .env("NO_COLOR", "1")
        .env("PYTHONUNBUFFERED", "1")
        .env_remove("RUST_LOG");
    cmd
}

/// The installed versions of the peers' packages, from the venv's metadata.
fn installed_versions(venv: &Path) -> Result<Vec<String>> {
    let names: Vec<&str> = PEERS.iter().map(|p| p.package).collect();
    let script =
        format!("import importlib.metadata as m\nfor n in {names:?}:\n    print(m.version(n))");
    let out =
        Command::new(venv.join("bin/python")).arg("-c").arg(script).output().with_context(
            || format!("no Python in {} (run scripts/bench peers)", venv.display()),
        )?;
    if !out.status.success() {
        bail!(
            "the peers are not installed in {}: {} (run scripts/bench peers)",
            venv.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect())
}

fn command_text(cmd: &Command) -> String {
    let mut parts: Vec<OsString> = vec![cmd.get_program().to_os_string()];
    parts.extend(cmd.get_args().map(|a| a.to_os_string()));
    parts.iter().map(|p| p.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ")
}

/// The network interfaces of this process's network namespace (`lo` alone inside `unshare
/// --net`), from /proc/self/net/dev (/sys/class/net shows the namespace /sys was mounted in).
fn interfaces() -> Vec<String> {
    std::fs::read_to_string("/proc/self/net/dev")
        .unwrap_or_default()
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next().map(|n| n.trim().to_string()))
        .filter(|n| !n.is_empty())
        .collect()
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn output_of(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// The run

async fn run() -> Result<()> {
    let t_start = Instant::now();
    let secs = env_or("SLLM_PEERS_SECONDS", 10.0f64).max(1.0);
    let reps = env_or("SLLM_PEERS_REPS", 3usize).max(1);
    let load_before = loadavg();
    let oha = oha_bin()?;
    let oha_version = output_of(&oha.display().to_string(), &["--version"]);
    let venv = venv();
    let versions = installed_versions(&venv)?;
    for (p, v) in PEERS.iter().zip(&versions) {
        if v != p.version {
            eprintln!("peers-bench: {} {v} installed, {} expected", p.package, p.version);
        }
    }
    let ifaces = interfaces();
    let isolated = ifaces.iter().all(|i| i == "lo");
    if !isolated {
        eprintln!(
            "peers-bench: not in a loopback-only network namespace ({}); the peers may try to \
             reach a model hub (scripts/bench peers runs this under unshare --net)",
            ifaces.join(", ")
        );
    }

    let tmp = tempfile::Builder::new().prefix("sllm-peers-bench-").tempdir()?;
    let client = http_client();

    // sllm: redis, `sllm serve all`, `sllm worker` starting the engine.
    let redis = RedisServer::start()?;
    // sllm's processes run under a name of the run's own (a link to the binary, and the engine
    // command in a script), so that on a shared machine someone else's `pkill -f 'sllm worker'`
    // or `pkill -f sim-engine` cleaning up their own does not end this run's.
    let sllm = tmp.path().join("sllm-peers-bench");
    std::os::unix::fs::symlink(sllm_bin()?, &sllm)?;
    let engine_script = tmp.path().join("fake-engine");
    std::fs::write(
        &engine_script,
        format!(
            "#!/bin/sh\nexec {} sim-engine --port \"$1\" --model \"$2\" --load-ms 0 --decode-ms 0\n",
            sllm.display()
        ),
    )?;
    std::fs::set_permissions(&engine_script, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let quiet = |c: &mut Command| {
        c.env("NO_COLOR", "1").env_remove("OTEL_EXPORTER_OTLP_ENDPOINT").env_remove("RUST_LOG");
    };
    let mut cmd = Command::new(&sllm);
    cmd.args(["serve", "all", "--redis-url", &redis.url(), "--namespace", "bench"])
        .args(["--grpc-addr", "127.0.0.1:0", "--openai-addr", "127.0.0.1:0"])
        .args(["--metrics-addr", "off", "--join-secret", JOIN_SECRET]);
    quiet(&mut cmd);
    let serve = LoggedChild::spawn(
        "sllm serve all",
        &mut cmd,
        tmp.path().join("serve.log"),
        "openai api listening on",
        Duration::from_secs(20),
    )?;
    let grpc = after(serve.line("serving gRPC on"), "serving gRPC on")?;
    let openai = after(serve.line("openai api listening on"), "openai api listening on")?;
    let engine_command = format!("{} {{port}} {{model}}", engine_script.display());
    let mut cmd = Command::new(&sllm);
    cmd.args(["worker", "--backend", "engine", "--engine", "custom"])
        .args(["--engine-command", &engine_command])
        .args(["--gpus", "1", "--registry", &format!("http://{grpc}")])
        .args(["--node-id", "bench-node", "--address", "10.0.0.1", "--join-secret", JOIN_SECRET]);
    quiet(&mut cmd);
    let worker = LoggedChild::spawn(
        "sllm worker",
        &mut cmd,
        tmp.path().join("worker.log"),
        "started",
        Duration::from_secs(20),
    )?;
    let out = Command::new(&sllm)
        .args(["deploy", MODEL, "--backend", "custom", "--num-gpus", "1"])
        .args(["--min", "1", "--max", "1", "--wait", "--timeout", "60"])
        .args(["--endpoint", &format!("http://{grpc}")])
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

    // The engine the worker started, and its port.
    let engine = {
        let start = Instant::now();
        loop {
            let found = descendants(worker.pid())
                .into_iter()
                .find(|p| cmdline(*p).iter().any(|a| a == "sim-engine"));
            if let Some(pid) = found {
                break pid;
            }
            if start.elapsed() > Duration::from_secs(10) {
                bail!("no sim-engine under the worker (pid {})", worker.pid());
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
    let engine_base = format!("http://127.0.0.1:{port}");
    let engine_line = engine_cmd
        .iter()
        .map(|a| if a.ends_with("/sllm-peers-bench") { "sllm".to_string() } else { a.clone() })
        .collect::<Vec<_>>()
        .join(" ");
    eprintln!("peers-bench: engine pid {engine}: {engine_line}");

    let mut routes =
        vec![Route { name: "direct".into(), base: engine_base.clone(), pids: Vec::new() }];
    until_serving(&client, &routes[0], None).await?;

    // The peers, each on its own ports.
    let mut peer_children = Vec::new();
    let mut peer_lines = Vec::new();
    for peer in &PEERS {
        let port = free_port()?;
        let mut cmd = peer_command(&venv, peer, port, free_port()?, &engine_base);
        peer_lines.push(command_text(&cmd).replace(&venv.display().to_string(), "$VENV"));
        let log = tmp.path().join(format!("{}.log", peer.package));
        let mut child = LoggedChild::start_only(peer.name, &mut cmd, log)?;
        let mut route = Route {
            name: peer.name.into(),
            base: format!("http://127.0.0.1:{port}"),
            pids: Vec::new(),
        };
        until_serving(&client, &route, Some(&mut child)).await?;
        route.pids = std::iter::once(child.pid()).chain(descendants(child.pid())).collect();
        eprintln!("peers-bench: {} serving on port {port} (processes {:?})", peer.name, route.pids);
        routes.push(route);
        peer_children.push(child);
    }
    let sllm_route = Route {
        name: "sllm".into(),
        base: format!("http://{openai}"),
        pids: vec![serve.pid(), worker.pid()],
    };
    until_serving(&client, &sllm_route, None).await?;
    routes.push(sllm_route);
    let redis_pid = redis_pid(redis.socket());

    // Every path's streams, counted.
    let mut shapes = Vec::new();
    for r in &routes {
        let s =
            probe(&client, &r.url()).await.with_context(|| format!("streams from {}", r.name))?;
        eprintln!(
            "peers-bench: {}: {} events per 64-token stream, {} with a token, {} bytes; first \
             byte {}, first token {}",
            r.name,
            s.events,
            s.tokens,
            s.bytes,
            dur(s.first_byte),
            dur(s.first_token)
        );
        shapes.push(s);
    }

    // Each router's background work with no requests (sllm: leases, heartbeats, scaler ticks).
    let idle_secs = 5.0;
    let before: Vec<f64> = routes.iter().map(Route::cpu).collect();
    tokio::time::sleep(Duration::from_secs_f64(idle_secs)).await;
    let idle: Vec<f64> =
        routes.iter().zip(before).map(|(r, c)| (r.cpu() - c) / idle_secs).collect();

    // Warm-up: every path, both kinds of request, not measured.
    for r in &routes {
        for m in [&MEASURES[MCLOSED], &MEASURES[MSTREAMS]] {
            window(&oha, r, m, 1.0, engine, redis_pid).await?;
        }
    }

    // The windows: [measure][route] -> one Window per repetition.
    let mut w: Vec<Vec<Vec<Window>>> =
        MEASURES.iter().map(|_| routes.iter().map(|_| Vec::new()).collect()).collect();
    // Every process a window depends on: a run on a shared machine can lose one to someone
    // else's `pkill`, and then its figures would be a dead path's.
    let mut watched: Vec<(String, u32)> = vec![
        ("the engine".into(), engine),
        ("sllm serve all".into(), serve.pid()),
        ("sllm worker".into(), worker.pid()),
    ];
    watched.extend(redis_pid.map(|p| ("redis-server".to_string(), p)));
    watched.extend(peer_children.iter().map(|c| (c.name().to_string(), c.pid())));
    for rep in 0..reps {
        for (mi, m) in MEASURES.iter().enumerate() {
            for (ri, r) in routes.iter().enumerate() {
                if let Some((name, pid)) = watched.iter().find(|(_, p)| !alive(*p)) {
                    bail!(
                        "{name} (pid {pid}) is gone before {} / {}: the run cannot go on \
                         (stopped from outside?)\n--- sllm worker log (tail):\n{}",
                        m.label,
                        r.name,
                        worker.log_tail(20)
                    );
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
                let x = window(&oha, r, m, secs, engine, redis_pid).await?;
                eprintln!(
                    "  rep {}/{reps} {:<46} {:<14} {:>8.0}/s p50 {:>9} first byte {:>9} errors {}",
                    rep + 1,
                    m.label,
                    r.name,
                    x.rate(),
                    dur(x.p50),
                    dur(x.first_byte_p50),
                    x.errors
                );
                w[mi][ri].push(x);
            }
        }
    }
    let rss: Vec<Option<u64>> = routes.iter().map(Route::rss_kib).collect();
    let engine_rss = rss_kib(engine);
    let redis_rss = redis_pid.and_then(rss_kib);
    let load_after = loadavg();

    report(Report {
        routes: &routes,
        w: &w,
        shapes: &shapes,
        rss: &rss,
        idle: &idle,
        engine_rss,
        redis_rss,
        secs,
        reps,
        oha_version: &oha_version,
        versions: &versions,
        peer_lines: &peer_lines,
        engine_line: &engine_line,
        isolated,
        load_before: &load_before,
        load_after: &load_after,
    });

    let warnings: Vec<(String, String)> = [&serve, &worker]
        .iter()
        .flat_map(|c| c.warnings().into_iter().map(move |l| (c.name().to_string(), l)))
        .collect();
    if warnings.is_empty() {
        println!("sllm logged no warnings or errors during the run");
    } else {
        println!("sllm logged {} warnings/errors during the run; the first:", warnings.len());
        for (name, l) in warnings.iter().take(5) {
            println!("  {name}: {l}");
        }
    }
    for c in &peer_children {
        let bad: Vec<String> = c
            .log_tail(usize::MAX)
            .lines()
            .map(strip_ansi)
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .collect();
        if !bad.is_empty() {
            println!("{} logged {} warnings/errors:", c.name(), bad.len());
            for l in bad.iter().take(3) {
                println!("  {}", l.chars().take(240).collect::<String>());
            }
        }
    }
    println!("run took {:.0} s", t_start.elapsed().as_secs_f64());

    drop(peer_children);
    drop(worker);
    drop(serve);
    drop(redis);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The tables

struct Report<'a> {
    routes: &'a [Route],
    w: &'a [Vec<Vec<Window>>],
    shapes: &'a [StreamShape],
    rss: &'a [Option<u64>],
    /// CPU seconds per second of each router with no requests.
    idle: &'a [f64],
    engine_rss: Option<u64>,
    redis_rss: Option<u64>,
    secs: f64,
    reps: usize,
    oha_version: &'a str,
    versions: &'a [String],
    peer_lines: &'a [String],
    engine_line: &'a str,
    isolated: bool,
    load_before: &'a str,
    load_after: &'a str,
}

/// A duration in seconds, as µs or ms.
fn dur(s: f64) -> String {
    if !s.is_finite() {
        "-".into()
    } else if s.abs() >= 0.01 {
        format!("{:.1} ms", s * 1e3)
    } else if s.abs() >= 0.001 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{:.0} µs", s * 1e6)
    }
}

fn plus_dur(s: f64) -> String {
    if s.is_finite() && s >= 0.0 { format!("+{}", dur(s)) } else { dur(s) }
}

/// CPU seconds per request, as µs.
fn cpu_us(s: f64) -> String {
    if s.is_finite() { format!("{:.0} µs", s * 1e6) } else { "-".into() }
}

fn count(x: f64) -> String {
    if !x.is_finite() {
        return "-".into();
    }
    let n = x.round() as i64;
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

fn mib(kib: f64) -> String {
    if kib.is_finite() { format!("{:.0} MiB", kib / 1024.0) } else { "-".into() }
}

/// Median, lowest, highest of the finite values.
fn spread(v: &[f64]) -> (f64, f64, f64) {
    let v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (median(v), lo, hi)
}

/// Whether a smaller figure is the better one.
#[derive(Clone, Copy, PartialEq)]
enum Better {
    Lower,
    Higher,
}

/// A figure computed for every route from its windows of one measure.
struct Figure {
    label: String,
    measure: usize,
    /// The figure of one window, given direct's window of the same repetition.
    f: fn(&Window, &Window) -> f64,
    fmt: fn(f64) -> String,
    better: Better,
    /// Not defined for direct (router CPU, added latency).
    routers_only: bool,
}

impl Figure {
    fn values(&self, r: &Report, route: usize) -> Vec<f64> {
        if self.routers_only && r.routes[route].pids.is_empty() {
            return Vec::new();
        }
        let direct = &r.w[self.measure][0];
        r.w[self.measure][route].iter().zip(direct).map(|(x, d)| (self.f)(x, d)).collect()
    }

    fn median(&self, r: &Report, route: usize) -> f64 {
        spread(&self.values(r, route)).0
    }

    fn cell(&self, r: &Report, route: usize) -> String {
        let (m, lo, hi) = spread(&self.values(r, route));
        if !m.is_finite() {
            return "-".into();
        }
        if r.reps == 1 {
            return (self.fmt)(m);
        }
        format!("{} ({}–{})", (self.fmt)(m), (self.fmt)(lo), (self.fmt)(hi))
    }
}

fn fig(
    label: &str,
    measure: usize,
    f: fn(&Window, &Window) -> f64,
    fmt: fn(f64) -> String,
    better: Better,
    routers_only: bool,
) -> Figure {
    Figure { label: label.into(), measure, f, fmt, better, routers_only }
}

fn figures() -> Vec<Figure> {
    use Better::*;
    let mut v = Vec::new();
    for (m, name) in [(M500, "500 req/s"), (M2000, "2,000 req/s")] {
        v.push(fig(&format!("{name}: latency p50"), m, |x, _| x.p50, dur, Lower, false));
        v.push(fig(&format!("{name}: latency p99"), m, |x, _| x.p99, dur, Lower, false));
        v.push(fig(&format!("{name}: added p50"), m, |x, d| x.p50 - d.p50, plus_dur, Lower, true));
        v.push(fig(&format!("{name}: added p99"), m, |x, d| x.p99 - d.p99, plus_dur, Lower, true));
        v.push(fig(
            &format!("{name}: router CPU per request"),
            m,
            |x, _| x.per_ok(x.router_cpu),
            cpu_us,
            Lower,
            true,
        ));
        v.push(fig(
            &format!("{name}: engine CPU per request"),
            m,
            |x, _| x.per_ok(x.engine_cpu),
            cpu_us,
            Lower,
            false,
        ));
        v.push(fig(
            &format!("{name}: requests/s completed"),
            m,
            |x, _| x.rate(),
            count,
            Higher,
            false,
        ));
    }
    let c = "closed loop, 64 conn.";
    v.push(fig(&format!("{c}: requests/s"), MCLOSED, |x, _| x.rate(), count, Higher, false));
    v.push(fig(&format!("{c}: latency p50"), MCLOSED, |x, _| x.p50, dur, Lower, false));
    v.push(fig(
        &format!("{c}: router CPU per request"),
        MCLOSED,
        |x, _| x.per_ok(x.router_cpu),
        cpu_us,
        Lower,
        true,
    ));
    v.push(fig(
        &format!("{c}: engine CPU per request"),
        MCLOSED,
        |x, _| x.per_ok(x.engine_cpu),
        cpu_us,
        Lower,
        false,
    ));
    v.push(fig(&format!("{c}: machine idle"), MCLOSED, |x, _| x.idle, pct, Lower, false));
    let s = "streams, closed loop, 64 conn.";
    v.push(fig(&format!("{s}: streams/s"), MSTREAMS, |x, _| x.rate(), count, Higher, false));
    v.push(fig(
        &format!("{s}: first byte p50"),
        MSTREAMS,
        |x, _| x.first_byte_p50,
        dur,
        Lower,
        false,
    ));
    v.push(fig(&format!("{s}: whole stream p50"), MSTREAMS, |x, _| x.p50, dur, Lower, false));
    v.push(fig(
        &format!("{s}: router CPU per stream"),
        MSTREAMS,
        |x, _| x.per_ok(x.router_cpu),
        cpu_us,
        Lower,
        true,
    ));
    v.push(fig(
        &format!("{s}: engine CPU per stream"),
        MSTREAMS,
        |x, _| x.per_ok(x.engine_cpu),
        cpu_us,
        Lower,
        false,
    ));
    v.push(fig(
        &format!("{s}: bytes per stream"),
        MSTREAMS,
        |x, _| x.bytes_per_answer,
        count,
        Lower,
        false,
    ));
    v.push(fig(&format!("{s}: machine idle"), MSTREAMS, |x, _| x.idle, pct, Lower, false));
    let t = "streams, 100/s";
    v.push(fig(&format!("{t}: first byte p50"), MTTFB, |x, _| x.first_byte_p50, dur, Lower, false));
    v.push(fig(
        &format!("{t}: added first byte p50"),
        MTTFB,
        |x, d| x.first_byte_p50 - d.first_byte_p50,
        plus_dur,
        Lower,
        true,
    ));
    v.push(fig(&format!("{t}: whole stream p50"), MTTFB, |x, _| x.p50, dur, Lower, false));
    v.push(fig(
        &format!("{t}: router CPU per stream"),
        MTTFB,
        |x, _| x.per_ok(x.router_cpu),
        cpu_us,
        Lower,
        true,
    ));
    v
}

fn pct(x: f64) -> String {
    if x.is_finite() { format!("{:.0}%", x * 100.0) } else { "-".into() }
}

fn report(r: Report) {
    let routes = r.routes;
    let sllm = routes.len() - 1;
    let peers: Vec<usize> = (0..routes.len()).filter(|i| routes[*i].is_peer()).collect();
    let figs = figures();

    println!();
    println!(
        "peers-bench: sllm beside SMG, sglang-router and vllm-router, in front of one fake engine"
    );
    println!();
    println!(
        "- machine: {} cores ({}), load average before / after: {} / {}; {}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        cpu_model(),
        r.load_before,
        r.load_after,
        output_of("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
    );
    println!(
        "- network: {}",
        if r.isolated {
            "a loopback-only namespace (unshare --net); every path in it"
        } else {
            "NOT isolated (the peers could reach a model hub)"
        }
    );
    println!("- engine (started by `sllm worker`): `{}`", r.engine_line);
    for ((p, v), line) in PEERS.iter().zip(r.versions).zip(r.peer_lines) {
        println!("- {} {v}: `{line}`", p.name);
    }
    println!(
        "- sllm: `sllm serve all` + `sllm worker --backend engine --engine custom`, the model \
         deployed with `--min 1 --max 1`; redis-server on a unix socket"
    );
    println!(
        "- load: {}; open loop `-q RATE --latency-correction -c {OPEN_CONNECTIONS}`, closed loop \
         `-c {CLOSED_CONNECTIONS}`; {} repetitions of {:.0} s windows, paths in turn; medians \
         (lowest–highest); prompt {PROMPT:?}, max_tokens 1 or 64 (`stream`, `ignore_eos`)",
        r.oha_version, r.reps, r.secs
    );
    println!(
        "- CPU from /proc/PID/stat over each window ÷ requests completed: router = the peer's \
         process, or sllm's `serve all` (Dispatch and the other three services) + agent, \
         background work included; RSS after the last window"
    );

    // ---- the full table
    println!();
    let mut headers = vec!["measure".to_string()];
    headers.extend(routes.iter().map(|x| x.name.clone()));
    let mut rows: Vec<Vec<String>> = Vec::new();
    for f in &figs {
        let mut row = vec![f.label.clone()];
        row.extend((0..routes.len()).map(|i| f.cell(&r, i)));
        rows.push(row);
    }
    // oha's CPU per request in the closed loop, for every path (the load generator's share).
    let mut row = vec!["closed loop, 64 conn.: oha CPU per request".to_string()];
    row.extend((0..routes.len()).map(|i| {
        let v: Vec<f64> = r.w[MCLOSED][i].iter().map(|x| x.per_ok(x.oha_cpu)).collect();
        let (m, lo, hi) = spread(&v);
        if r.reps == 1 {
            cpu_us(m)
        } else {
            format!("{} ({}–{})", cpu_us(m), cpu_us(lo), cpu_us(hi))
        }
    }));
    rows.push(row);
    let mut row = vec!["one stream at a time: first byte / first token p50".to_string()];
    row.extend(r.shapes.iter().map(|s| format!("{} / {}", dur(s.first_byte), dur(s.first_token))));
    rows.push(row);
    let mut row = vec!["events / tokens per 64-token stream".to_string()];
    row.extend(r.shapes.iter().map(|s| format!("{} / {}", s.events, s.tokens)));
    rows.push(row);
    let mut row = vec!["tokens/s (streams, closed loop)".to_string()];
    row.extend((0..routes.len()).map(|i| {
        let v: Vec<f64> = r.w[MSTREAMS][i].iter().map(|x| x.rate() * r.shapes[i].tokens).collect();
        let (m, lo, hi) = spread(&v);
        if r.reps == 1 { count(m) } else { format!("{} ({}–{})", count(m), count(lo), count(hi)) }
    }));
    rows.push(row);
    let mut row = vec!["RSS after load".to_string()];
    row.extend(r.rss.iter().map(|k| k.map_or("-".into(), |k| mib(k as f64))));
    rows.push(row);
    let mut row = vec!["CPU with no requests (share of a core)".to_string()];
    row.extend((0..routes.len()).map(|i| {
        if routes[i].pids.is_empty() { "-".into() } else { format!("{:.1}%", r.idle[i] * 100.0) }
    }));
    rows.push(row);
    let mut row = vec!["errors (all windows)".to_string()];
    row.extend((0..routes.len()).map(|i| {
        let n: u64 = r.w.iter().flat_map(|m| m[i].iter().map(|x| x.errors)).sum();
        count(n as f64)
    }));
    rows.push(row);
    print_table(&headers, &rows);
    println!();
    println!(
        "engine RSS {}; sllm's redis-server RSS {}, CPU per request at 500 req/s through sllm {} \
         (not in sllm's column: the warm path does not touch Redis)",
        r.engine_rss.map_or("-".into(), |k| mib(k as f64)),
        r.redis_rss.map_or("-".into(), |k| mib(k as f64)),
        cpu_us(
            spread(&r.w[M500][sllm].iter().map(|x| x.per_ok(x.redis_cpu)).collect::<Vec<_>>()).0
        )
    );
    for (i, route) in routes.iter().enumerate() {
        for (m, windows) in MEASURES.iter().zip(r.w) {
            if let Some(e) = windows[i].iter().find_map(|x| x.first_error.clone()) {
                println!("errors, {} / {}: {e}", route.name, m.label);
            }
        }
    }

    // ---- the summary with ratios
    let find = |label: &str| figs.iter().find(|f| f.label == label);
    let best = |f: &Figure| -> Option<(usize, f64)> {
        let vals = peers.iter().map(|&i| (i, f.median(&r, i))).filter(|(_, v)| v.is_finite());
        match f.better {
            Better::Lower => vals.min_by(|a, b| a.1.total_cmp(&b.1)),
            Better::Higher => vals.max_by(|a, b| a.1.total_cmp(&b.1)),
        }
    };
    let ratio = |s: f64, b: f64, better: Better| -> String {
        if !(s.is_finite() && b.is_finite()) || s <= 0.0 || b <= 0.0 {
            return "-".into();
        }
        let x = s / b;
        let good = match better {
            Better::Lower => x < 1.0,
            Better::Higher => x > 1.0,
        };
        format!("{x:.2}x ({})", if good { "sllm better" } else { "sllm worse" })
    };
    // One row: several figures, each with its own best peer.
    let summary_row = |label: &str, names: &[&str]| -> Vec<String> {
        let mut b_cells = Vec::new();
        let mut s_cells = Vec::new();
        let mut r_cells = Vec::new();
        for n in names {
            let Some(f) = find(n) else { continue };
            let s = f.median(&r, sllm);
            match best(f) {
                Some((i, v)) => {
                    b_cells.push(format!("{} {}", (f.fmt)(v), routes[i].name));
                    r_cells.push(ratio(s, v, f.better));
                }
                None => {
                    b_cells.push("-".into());
                    r_cells.push("-".into());
                }
            }
            s_cells.push((f.fmt)(s));
        }
        vec![label.to_string(), b_cells.join(" / "), s_cells.join(" / "), r_cells.join(" / ")]
    };
    let mut rows = vec![
        summary_row(
            "500 req/s, max_tokens=1: p50 / p99 added over direct",
            &["500 req/s: added p50", "500 req/s: added p99"],
        ),
        summary_row(
            "500 req/s: CPU per request (sllm: Dispatch + agent; a peer: its router process)",
            &["500 req/s: router CPU per request"],
        ),
        summary_row(
            "2,000 req/s: p50 added / CPU per request",
            &["2,000 req/s: added p50", "2,000 req/s: router CPU per request"],
        ),
        summary_row(
            "closed loop, 64 connections: requests/s",
            &["closed loop, 64 conn.: requests/s"],
        ),
    ];
    // Tokens/s: streams/s times each path's tokens per stream.
    {
        let tps = |i: usize| {
            spread(
                &r.w[MSTREAMS][i].iter().map(|x| x.rate() * r.shapes[i].tokens).collect::<Vec<_>>(),
            )
            .0
        };
        let b = peers.iter().map(|&i| (i, tps(i))).max_by(|a, b| a.1.total_cmp(&b.1));
        let s = tps(sllm);
        rows.push(vec![
            "64-token streams: tokens/s".into(),
            b.map_or("-".into(), |(i, v)| format!("{} {}", count(v), routes[i].name)),
            count(s),
            b.map_or("-".into(), |(_, v)| ratio(s, v, Better::Higher)),
        ]);
    }
    rows.push(summary_row(
        "64-token streams: time to first byte p50 (100 streams/s)",
        &["streams, 100/s: first byte p50"],
    ));
    {
        let peer_events: Vec<String> =
            peers.iter().map(|&i| format!("{}", r.shapes[i].events)).collect();
        let same = peer_events.windows(2).all(|p| p[0] == p[1]);
        let b = if same {
            format!("{} (every peer)", peer_events.first().cloned().unwrap_or_default())
        } else {
            peers
                .iter()
                .map(|&i| format!("{} {}", r.shapes[i].events, routes[i].name))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let first = peers.first().map_or(f64::NAN, |&i| r.shapes[i].events);
        rows.push(vec![
            "64-token streams: events per response".into(),
            b,
            format!("{}", r.shapes[sllm].events),
            if same && first > 0.0 {
                format!("{:.2}x", r.shapes[sllm].events / first)
            } else {
                "-".into()
            },
        ]);
    }
    {
        let b = peers
            .iter()
            .filter_map(|&i| r.rss[i].map(|k| (i, k as f64)))
            .min_by(|a, b| a.1.total_cmp(&b.1));
        let s = r.rss[sllm].map_or(f64::NAN, |k| k as f64);
        rows.push(vec![
            "RSS after load".into(),
            b.map_or("-".into(), |(i, v)| format!("{} {}", mib(v), routes[i].name)),
            mib(s),
            b.map_or("-".into(), |(_, v)| ratio(s, v, Better::Lower)),
        ]);
    }
    println!();
    println!("summary (medians; best peer per figure; ratio = sllm ÷ best peer):");
    println!();
    print_table(&["row".into(), "best peer".into(), "sllm".into(), "sllm vs best".into()], &rows);

    // ---- is the engine (or the load generator) the limit?
    println!();
    for (mi, what, per) in [
        (MCLOSED, "closed loop, 1-token", "request"),
        (MSTREAMS, "closed loop, 64-token streams", "stream"),
    ] {
        let direct = spread(&r.w[mi][0].iter().map(Window::rate).collect::<Vec<_>>()).0;
        let engine =
            spread(&r.w[mi][0].iter().map(|x| x.per_ok(x.engine_cpu)).collect::<Vec<_>>()).0;
        let oha_cost =
            spread(&r.w[mi][0].iter().map(|x| x.per_ok(x.oha_cpu)).collect::<Vec<_>>()).0;
        let shares: Vec<String> = (1..routes.len())
            .map(|i| {
                let v = spread(&r.w[mi][i].iter().map(Window::rate).collect::<Vec<_>>()).0;
                format!("{} {:.0}%", routes[i].name, 100.0 * v / direct)
            })
            .collect();
        println!(
            "{what}: direct (engine + oha alone on the 2 cores) {} /s, engine {} and oha {} CPU per \
             {per}; each path's share of that: {}",
            count(direct),
            cpu_us(engine),
            cpu_us(oha_cost),
            shares.join(", ")
        );
    }
    let bound: Vec<String> = (1..routes.len())
        .filter_map(|i| {
            let d = spread(&r.w[MCLOSED][0].iter().map(Window::rate).collect::<Vec<_>>()).0;
            let v = spread(&r.w[MCLOSED][i].iter().map(Window::rate).collect::<Vec<_>>()).0;
            (v >= 0.8 * d).then(|| routes[i].name.clone())
        })
        .collect();
    if bound.is_empty() {
        println!(
            "no path came within 80% of direct's closed-loop rate: the routers, not the engine, \
             set the closed-loop figures"
        );
    } else {
        println!(
            "{} came within 80% of direct's closed-loop rate: there the engine and oha, not the \
             router, set the limit",
            bound.join(", ")
        );
    }
    for (i, s) in r.shapes.iter().enumerate() {
        let oha_bytes =
            spread(&r.w[MSTREAMS][i].iter().map(|x| x.bytes_per_answer).collect::<Vec<_>>()).0;
        if (oha_bytes - s.bytes).abs() > 0.02 * s.bytes {
            println!(
                "note: {}'s streams under load averaged {} bytes, {} when counted one at a time",
                routes[i].name,
                count(oha_bytes),
                count(s.bytes)
            );
        }
        if (s.tokens - f64::from(STREAM_TOKENS)).abs() > 0.5 {
            println!(
                "note: {} sent {} token events for max_tokens {STREAM_TOKENS}",
                routes[i].name, s.tokens
            );
        }
    }
    println!();
}
