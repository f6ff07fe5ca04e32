//! A real engine: llama.cpp's `llama-server` (built by `scripts/install-llama-server`) with a
//! tiny generated GGUF model (`scripts/tiny-gguf.py`: random weights, a real 32k SentencePiece
//! tokenizer, a ChatML chat template), behind the real `sllm worker --backend engine --engine
//! llamacpp`, driven with the official `openai` client and compared with the same llama-server
//! called directly; then the engine killed mid-stream (a completion, then a chat), and hung.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

use super::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The llama-server binary: `SLLM_LLAMA_SERVER`, else whatever `scripts/install-llama-server`
/// prints (it builds the binary once and keeps it in a cache outside the clone).
fn llama_server() -> PathBuf {
    if let Ok(p) = std::env::var("SLLM_LLAMA_SERVER") {
        return PathBuf::from(p);
    }
    let o = std::process::Command::new(repo().join("scripts/install-llama-server"))
        .stderr(Stdio::inherit())
        .output()
        .expect("scripts/install-llama-server runs");
    assert!(o.status.success(), "scripts/install-llama-server failed");
    let out = String::from_utf8_lossy(&o.stdout);
    PathBuf::from(out.lines().last().expect("it prints the binary's path").trim())
}

/// `llama-server` on its own, on a free port, with `flags` (the comparison for sllm's answers).
fn llama_alone(server: &Path, model: &Path, flags: &str) -> (Proc, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let line = format!(
        "exec {} -m {} --host 127.0.0.1 --port {port} {flags} 2>&1",
        server.display(),
        model.display()
    );
    let direct = Proc::spawn(
        std::process::Command::new("sh").arg("-c").arg(line),
        "listening on http",
        Duration::from_secs(20),
    )
    .unwrap();
    (direct, port)
}

/// An `sllm worker` running llama.cpp engines from `models`, as `node`, with one GPU.
fn llama_worker(c: &Cluster, server: &Path, models: &Path, node: &str) -> Proc {
    let path = format!(
        "{}:{}",
        server.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let (agent, _) = Proc::sllm(
        &[
            "worker",
            "--backend",
            "engine",
            "--engine",
            "llamacpp",
            "--registry",
            &c.registry.endpoint(),
            "--node-id",
            node,
            "--gpus",
            "1",
            "--model-dir",
            &models.display().to_string(),
            "--stop-grace-s",
            "1",
        ],
        &[("SLLM_JOIN_SECRET", JOIN_SECRET), ("PATH", &path)],
        "started",
    )
    .unwrap();
    agent
}

/// Writes the tiny model as `dir/tiny.gguf`.
fn tiny_model(server: &Path, dir: &Path) -> PathBuf {
    let cache = server.parent().unwrap().parent().unwrap();
    let out = dir.join("tiny.gguf");
    let status = std::process::Command::new(sllm_integration_tests::python().unwrap())
        .arg(repo().join("scripts/tiny-gguf.py"))
        .arg("--vocab")
        .arg(cache.join("models/ggml-vocab-llama-spm.gguf"))
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "tiny-gguf.py failed");
    out
}

/// pids of llama-server processes serving `models`' tiny model, but `except`.
async fn engine_pids(models: &Path, except: u32) -> Vec<u32> {
    let o =
        tokio::process::Command::new("pgrep").args(["-x", "llama-server"]).output().await.unwrap();
    let model = models.join("tiny.gguf").display().to_string();
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.trim().parse::<u32>().ok())
        .filter(|p| *p != except)
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&model))
        })
        .collect()
}

async fn deploy_tiny(registry: &Served) -> Result<(), tonic::Status> {
    deploy_llama(registry, "tiny", serde_json::json!({})).await
}

/// Deploys `model`: the tiny GGUF on llama.cpp, one slot and thread, scaled 0..=1, with
/// `extra` added to its backend_config.
async fn deploy_llama(
    registry: &Served,
    model: &str,
    extra: serde_json::Value,
) -> Result<(), tonic::Status> {
    let mut client =
        pb::model_registry_client::ModelRegistryClient::new(registry.channel().await.unwrap());
    let mut config = serde_json::json!({
        "pretrained_model_name_or_path": "tiny.gguf",
        "parallel": 1,
        "threads": 1,
        "ctx_size": 1024,
    });
    if let (Some(c), Some(e)) = (config.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    client
        .deploy(pb::DeployRequest {
            spec: Some(pb::DeploymentSpec {
                model: model.into(),
                backend: "llamacpp".into(),
                num_gpus: 1,
                auto_scaling_config: Some(pb::AutoScalingConfig {
                    metric: "concurrency".into(),
                    target: 1.0,
                    min_instances: 0,
                    max_instances: 1,
                    keep_alive: 300,
                }),
                backend_config: Some(sllm_api::json::json_to_struct(&config)),
            }),
        })
        .await
        .map(|_| ())
}

#[tokio::test]
async fn a_real_llama_cpp_server_behind_sllm_answers_as_it_does_alone() {
    let server = llama_server();
    let models = tempfile::tempdir().unwrap();
    let model = tiny_model(&server, models.path());
    let c = cluster().await;
    let registry = Served::model_registry(c.store.clone()).await.unwrap();

    // backend_config is checked against llama.cpp's own flags at deploy time.
    let mut client =
        pb::model_registry_client::ModelRegistryClient::new(registry.channel().await.unwrap());
    let bad = serde_json::json!({"ctx_size": 1024, "torch_dtype": "float16"});
    let err = client
        .deploy(pb::DeployRequest {
            spec: Some(pb::DeploymentSpec {
                model: "bad".into(),
                backend: "llamacpp".into(),
                num_gpus: 1,
                auto_scaling_config: None,
                backend_config: Some(sllm_api::json::json_to_struct(&bad)),
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("spec.backend_config.torch_dtype"), "{}", err.message());
    deploy_tiny(&registry).await.unwrap();

    // The same server, called directly, for comparison.
    let (mut direct, port) =
        llama_alone(&server, &model, "--alias tiny --parallel 1 --threads 1 --ctx-size 1024");
    let direct_pid = direct.pid();

    // The real agent, with llama-server on its PATH.
    let path = format!(
        "{}:{}",
        server.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let (agent, _) = Proc::sllm(
        &[
            "worker",
            "--backend",
            "engine",
            "--engine",
            "llamacpp",
            "--registry",
            &c.registry.endpoint(),
            "--node-id",
            "llama-host",
            "--address",
            "10.0.0.7",
            "--gpus",
            "1",
            "--model-dir",
            &models.path().display().to_string(),
            "--engine-first-byte-timeout-s",
            "3",
            "--engine-idle-timeout-s",
            "2",
            "--stop-grace-s",
            "1",
        ],
        &[("SLLM_JOIN_SECRET", JOIN_SECRET), ("PATH", &path), ("RUST_LOG", "info")],
        "started",
    )
    .unwrap();

    // The official client, through sllm and directly.
    let out = tokio::process::Command::new(sllm_integration_tests::python().unwrap())
        .arg(repo().join("integration-tests/python/llamacpp_check.py"))
        .arg(c.dispatch.openai_base())
        .arg(format!("http://127.0.0.1:{port}/v1"))
        .arg("tiny")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("all llama.cpp checks passed"),
        "{stdout}\n{}\nthe agent said:\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.output()
    );
    // The over-long prompts were refused once each, never retried.
    let metrics = telemetry::metrics::gather();
    let retried = metrics.lines().any(|l| {
        l.starts_with("sllm_dispatch_retries_total{")
            && l.contains("\"tiny\"")
            && !l.ends_with(" 0")
    });
    assert!(!retried, "no request to the engine was retried:\n{metrics}");

    // The engine killed mid-stream: the Scaler puts a new engine in its place, and the
    // client's stream moves there and continues after what it had (live migration), from the
    // token ids generated so far: it ends with a normal finish, not an error, under one id, and
    // a greedy answer is token for token the server's own, uninterrupted.
    let killed = engine_pids(models.path(), direct_pid).await;
    assert_eq!(killed.len(), 1, "one engine runs for sllm: {killed:?}");
    let greedy = serde_json::json!({"model": "tiny", "prompt": "hello engine", "max_tokens": 300, "temperature": 0, "ignore_eos": true});
    let alone = tokio::process::Command::new("curl")
        .args(["-s", "--max-time", "30", "-H", "Content-Type: application/json", "-d"])
        .arg(greedy.to_string())
        .arg(format!("http://127.0.0.1:{port}/v1/completions"))
        .output()
        .await
        .unwrap();
    let alone: serde_json::Value = serde_json::from_slice(&alone.stdout).unwrap();
    let alone = alone["choices"][0]["text"].as_str().unwrap().to_string();
    let mut body = greedy.clone();
    body["stream"] = serde_json::json!(true);
    let mut curl = tokio::process::Command::new("curl")
        .args(["-sN", "--max-time", "30", "-H", "Content-Type: application/json", "-d"])
        .arg(body.to_string())
        .arg(format!("{}/completions", c.dispatch.openai_base()))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(curl.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    // Cut well into the answer: re-tokenising this much of the tiny model's text would not
    // give back its tokens, so only a continuation from the ids matches.
    let mut events = 0;
    while let Some(l) = lines.next_line().await.unwrap() {
        events += usize::from(l.starts_with("data: {"));
        seen.push(l);
        if events == 40 {
            break;
        }
    }
    assert_eq!(events, 40, "the stream started");
    let _ =
        tokio::process::Command::new("kill").args(["-KILL", &killed[0].to_string()]).status().await;
    while let Some(l) = lines.next_line().await.unwrap() {
        seen.push(l);
    }
    let tail = seen.join("\n");
    assert!(!tail.contains("\"error\""), "the stream ends without an error:\n{tail:.2000}");
    assert!(tail.contains("\"finish_reason\":\"length\""), "a normal finish:\n{tail:.2000}");
    assert!(tail.trim_end().ends_with("data: [DONE]"), "the stream is complete:\n{tail:.2000}");
    let ids: std::collections::BTreeSet<&str> = seen
        .iter()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| d.split("\"id\":\"").nth(1))
        .filter_map(|rest| rest.split('"').next())
        .collect();
    assert_eq!(ids.len(), 1, "one id across the move: {ids:?}");
    let streamed: String = seen
        .iter()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .filter_map(|v| v["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    let moved =
        telemetry::metrics::DISPATCH.migrations.with_label_values(&["tiny", "failure"]).get();
    assert_eq!(moved, 1, "the stream moved once");
    assert_eq!(streamed, alone, "the moved greedy stream is the uninterrupted answer");
    assert!(!tail.contains("\"logprobs\":{"), "no log-probabilities the client did not ask for");
    let replaced = eventually(Duration::from_secs(20), "a new engine", || async {
        let pids = engine_pids(models.path(), direct_pid).await;
        (pids.len() == 1 && pids[0] != killed[0]).then(|| pids[0])
    })
    .await
    .unwrap();
    let answered = |max_tokens: u32| {
        let c = &c;
        async move {
            let mut client = c.dispatch.client().await.ok()?;
            let req = pb::GenerateRequest {
                model: "tiny".into(),
                input: Some(pb::generate_request::Input::Prompt("Hello".into())),
                params: Some(pb::SamplingParams { max_tokens, ..Default::default() }),
                progress: false,
                timeout_ms: 20_000,
            };
            let mut s = client.generate(req).await.ok()?.into_inner();
            loop {
                match s.message().await {
                    Ok(Some(pb::GenerateEvent {
                        event: Some(pb::generate_event::Event::Finished(_)),
                    })) => {
                        return Some(Ok(()));
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => return None,
                    Err(e) => return Some(Err(e)),
                }
            }
        }
    };
    eventually(Duration::from_secs(20), "the new engine serves", || async {
        answered(4).await.and_then(Result::ok)
    })
    .await
    .unwrap();

    // A chat killed mid-stream the same way: it continues as a completion of the conversation
    // as the server's chat template writes it (its /apply-template) followed by the ids
    // generated, and a greedy answer is token for token the server's own chat answer.
    let messages = serde_json::json!([
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a story"},
    ]);
    let greedy = serde_json::json!({"model": "tiny", "messages": messages, "max_tokens": 400, "temperature": 0, "ignore_eos": true});
    let alone = tokio::process::Command::new("curl")
        .args(["-s", "--max-time", "30", "-H", "Content-Type: application/json", "-d"])
        .arg(greedy.to_string())
        .arg(format!("http://127.0.0.1:{port}/v1/chat/completions"))
        .output()
        .await
        .unwrap();
    let alone: serde_json::Value = serde_json::from_slice(&alone.stdout).unwrap();
    let alone = alone["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let mut body = greedy.clone();
    body["stream"] = serde_json::json!(true);
    let mut curl = tokio::process::Command::new("curl")
        .args(["-sN", "--max-time", "30", "-H", "Content-Type: application/json", "-d"])
        .arg(body.to_string())
        .arg(format!("{}/chat/completions", c.dispatch.openai_base()))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(curl.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let mut events = 0;
    while let Some(l) = lines.next_line().await.unwrap() {
        events += usize::from(l.starts_with("data: {"));
        seen.push(l);
        if events == 40 {
            break;
        }
    }
    assert_eq!(events, 40, "the chat stream started");
    let _ =
        tokio::process::Command::new("kill").args(["-KILL", &replaced.to_string()]).status().await;
    while let Some(l) = lines.next_line().await.unwrap() {
        seen.push(l);
    }
    let tail = seen.join("\n");
    assert!(!tail.contains("\"error\""), "the chat ends without an error:\n{tail:.2000}");
    assert!(tail.trim_end().ends_with("data: [DONE]"), "the chat is complete:\n{tail:.2000}");
    let chunks: Vec<serde_json::Value> = seen
        .iter()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .collect();
    let ids: std::collections::BTreeSet<&str> =
        chunks.iter().filter_map(|v| v["id"].as_str()).collect();
    assert_eq!(ids.len(), 1, "one id across the move: {ids:?}");
    assert!(chunks.iter().all(|v| v["object"] == "chat.completion.chunk"), "chat chunks only");
    let roles = chunks.iter().filter(|v| v["choices"][0]["delta"]["role"].is_string()).count();
    assert_eq!(roles, 1, "one role chunk");
    let last = chunks.iter().rev().find(|v| !v["choices"][0]["finish_reason"].is_null()).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert_eq!(last["migrations"], 1, "the last chunk says the stream moved: {last}");
    let streamed: String =
        chunks.iter().filter_map(|v| v["choices"][0]["delta"]["content"].as_str()).collect();
    let moved =
        telemetry::metrics::DISPATCH.migrations.with_label_values(&["tiny", "failure"]).get();
    assert_eq!(moved, 2, "the chat moved once");
    assert_eq!(streamed, alone, "the moved greedy chat is the server's own chat answer");
    assert!(!tail.contains("\"logprobs\":{"), "no log-probabilities the client did not ask for");
    let replaced = eventually(Duration::from_secs(20), "another new engine", || async {
        let pids = engine_pids(models.path(), direct_pid).await;
        (pids.len() == 1 && pids[0] != replaced).then(|| pids[0])
    })
    .await
    .unwrap();
    eventually(Duration::from_secs(20), "the new engine serves", || async {
        answered(4).await.and_then(Result::ok)
    })
    .await
    .unwrap();

    // A hung engine: the request meets the first-byte limit with a clear error, the engine then
    // fails its health check and is replaced.
    let _ =
        tokio::process::Command::new("kill").args(["-STOP", &replaced.to_string()]).status().await;
    let t0 = std::time::Instant::now();
    let err = answered(4).await.expect("an answer").expect_err("a hung engine cannot finish");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("within 3000 ms"), "{}", err.message());
    assert!(t0.elapsed() < Duration::from_secs(10), "the limit, not a hang: {:?}", t0.elapsed());
    eventually(Duration::from_secs(30), "the hung engine replaced and serving", || async {
        let pids = engine_pids(models.path(), direct_pid).await;
        if pids.contains(&replaced) {
            return None;
        }
        answered(4).await.and_then(Result::ok)
    })
    .await
    .unwrap();
    let _ =
        tokio::process::Command::new("kill").args(["-KILL", &replaced.to_string()]).status().await;
    direct.kill();
}

/// Embeddings from a real llama-server run with `--embeddings --pooling mean` (set in the
/// deployment's backend_config), through sllm over HTTP (the official client) and gRPC
/// `Embed`, compared with the same server called directly.
#[tokio::test]
async fn llama_cpp_embeddings_through_sllm_match_the_server_alone() {
    let server = llama_server();
    let models = tempfile::tempdir().unwrap();
    let model = tiny_model(&server, models.path());
    let c = cluster().await;
    let registry = Served::model_registry(c.store.clone()).await.unwrap();
    deploy_llama(
        &registry,
        "tiny-embed",
        serde_json::json!({
        "embeddings": true,
        "pooling": "mean"
        }),
    )
    .await
    .unwrap();

    let (mut direct, port) = llama_alone(
        &server,
        &model,
        "--alias tiny-embed --embeddings --pooling mean --parallel 1 --threads 1 --ctx-size 1024",
    );
    let _agent = llama_worker(&c, &server, models.path(), "llama-embed-host");

    // gRPC first (it starts the engine), then the official client over HTTP.
    let mut dispatch = c.dispatch.client().await.unwrap();
    let r = dispatch
        .embed(pb::EmbedRequest {
            model: "tiny-embed".into(),
            input: vec!["Hello there".into(), "Something else".into()],
            dimensions: None,
            timeout_ms: 60_000,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.embeddings.len(), 2);
    assert!(!r.embeddings[0].values.is_empty());
    assert_ne!(r.embeddings[0].values, r.embeddings[1].values);
    assert!(r.prompt_tokens > 0);

    let out = tokio::process::Command::new(sllm_integration_tests::python().unwrap())
        .arg(repo().join("integration-tests/python/llamacpp_embeddings_check.py"))
        .arg(c.dispatch.openai_base())
        .arg(format!("http://127.0.0.1:{port}/v1"))
        .arg("tiny-embed")
        .arg(serde_json::to_string(&r.embeddings[0].values).unwrap())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("all llama.cpp embeddings checks passed"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    direct.kill();
}

/// Rerank on a real llama-server run with `--reranking` (set in the deployment's
/// backend_config): through sllm, at `/v1/rerank` and `/rerank`, the same ranking and scores as
/// the server alone, with the client's model; the first call starts the engine.
#[tokio::test]
async fn llama_cpp_rerank_through_sllm_matches_the_server_alone() {
    let server = llama_server();
    let models = tempfile::tempdir().unwrap();
    let model = tiny_model(&server, models.path());
    let c = cluster().await;
    let registry = Served::model_registry(c.store.clone()).await.unwrap();
    deploy_llama(&registry, "tiny-rerank", serde_json::json!({"reranking": true})).await.unwrap();
    let (mut direct, port) = llama_alone(
        &server,
        &model,
        "--alias tiny-rerank --reranking --parallel 1 --threads 1 --ctx-size 1024",
    );
    let _agent = llama_worker(&c, &server, models.path(), "llama-rerank-host");

    let body = serde_json::json!({
        "model": "tiny-rerank",
        "query": "What is a fox?",
        "documents": ["A fox is an animal", "Paris is a city", "hello", "foxes live in dens"],
        "top_n": 3,
    });
    let sllm_base = c.dispatch.openai_base();
    let sllm_root = sllm_base.trim_end_matches("/v1");
    let direct_root = format!("http://127.0.0.1:{port}");
    let (status, alone) = post_to(&direct_root, "/v1/rerank", &body).await;
    assert_eq!(status, 200, "{alone}");
    let alone: serde_json::Value = serde_json::from_str(&alone).unwrap();
    for path in ["/v1/rerank", "/rerank"] {
        let (status, via) = post_to(sllm_root, path, &body).await;
        assert_eq!(status, 200, "{path}: {via}");
        let via: serde_json::Value = serde_json::from_str(&via).unwrap();
        assert_eq!(via["model"], "tiny-rerank", "{via}");
        assert_eq!(via["usage"], alone["usage"], "{via}");
        let ranked = |v: &serde_json::Value| -> Vec<(u64, f64)> {
            v["results"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| (r["index"].as_u64().unwrap(), r["relevance_score"].as_f64().unwrap()))
                .collect()
        };
        let (a, b) = (ranked(&via), ranked(&alone));
        assert_eq!(a.len(), 3, "top_n: {via}");
        assert_eq!(
            a.iter().map(|r| r.0).collect::<Vec<_>>(),
            b.iter().map(|r| r.0).collect::<Vec<_>>()
        );
        assert!(a.iter().zip(&b).all(|(x, y)| (x.1 - y.1).abs() < 1e-4), "{a:?} against {b:?}");
    }
    // gRPC Rerank: the same ranking.
    let mut dispatch = c.dispatch.client().await.unwrap();
    let r = dispatch
        .rerank(pb::RerankRequest {
            model: "tiny-rerank".into(),
            query: "What is a fox?".into(),
            documents: body["documents"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_str().unwrap().to_string())
                .collect(),
            top_n: Some(3),
            timeout_ms: 60_000,
        })
        .await
        .unwrap()
        .into_inner();
    let grpc: Vec<(u64, f64)> =
        r.results.iter().map(|d| (u64::from(d.index), d.relevance_score)).collect();
    let want: Vec<(u64, f64)> = alone["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["index"].as_u64().unwrap(), r["relevance_score"].as_f64().unwrap()))
        .collect();
    assert_eq!(grpc.len(), want.len());
    assert!(
        grpc.iter().zip(&want).all(|(a, b)| a.0 == b.0 && (a.1 - b.1).abs() < 1e-4),
        "{grpc:?}"
    );
    assert_eq!(r.model, "tiny-rerank");
    assert_eq!(u64::from(r.prompt_tokens), alone["usage"]["prompt_tokens"].as_u64().unwrap());

    // Documents as objects, which vLLM takes: llama.cpp refuses them itself, and its 400 and
    // message come back.
    let objects = serde_json::json!({
        "model": "tiny-rerank", "query": "q", "documents": [{"text": "a fox"}],
    });
    let (status, err) = post_to(sllm_root, "/v1/rerank", &objects).await;
    assert_eq!(status, 400, "{err}");
    assert!(err.contains("must be a non-empty string array"), "{err}");
    direct.kill();
}

/// LoRA on a real llama-server: a deployment's adapter (`scripts/tiny-gguf.py --lora`) is
/// given to the engine at start, and each request picks it or not, through sllm, with the
/// same text as the server alone with the adapter at scale 1 or 0.
#[tokio::test]
async fn llama_cpp_lora_adapters_answer_as_the_server_alone() {
    let server = llama_server();
    let models = tempfile::tempdir().unwrap();
    let model = tiny_model(&server, models.path());
    let cache = server.parent().unwrap().parent().unwrap();
    let lora = models.path().join("shout.gguf");
    let status = std::process::Command::new(sllm_integration_tests::python().unwrap())
        .arg(repo().join("scripts/tiny-gguf.py"))
        .arg("--vocab")
        .arg(cache.join("models/ggml-vocab-llama-spm.gguf"))
        .arg("--out")
        .arg(&lora)
        .arg("--lora")
        .status()
        .unwrap();
    assert!(status.success(), "tiny-gguf.py --lora failed");

    let c = cluster().await;
    let registry = Served::model_registry(c.store.clone()).await.unwrap();
    deploy_llama(
        &registry,
        "tiny-lora",
        serde_json::json!({
        "lora_adapters": {"shout": lora.display().to_string()}
        }),
    )
    .await
    .unwrap();

    let (mut direct, port) = llama_alone(
        &server,
        &model,
        &format!(
            "--alias tiny-lora --lora {lora} --parallel 1 --threads 1 --ctx-size 1024",
            lora = lora.display()
        ),
    );
    let _agent = llama_worker(&c, &server, models.path(), "llama-lora-host");

    let complete = |base: String, body: serde_json::Value| async move {
        let o = tokio::process::Command::new("curl")
            .args(["-s", "--max-time", "60", "-H", "Content-Type: application/json", "-d"])
            .arg(body.to_string())
            .arg(format!("{base}/completions"))
            .output()
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&o.stdout)));
        v["choices"][0]["text"].as_str().unwrap_or_else(|| panic!("{v}")).to_string()
    };
    let ask = |model: &str| serde_json::json!({"model": model, "prompt": "Hello", "max_tokens": 8, "temperature": 0});
    let sllm_base = c.dispatch.openai_base();
    let direct_base = format!("http://127.0.0.1:{port}/v1");
    let with_scale = |scale: f64| {
        let mut b = ask("tiny-lora");
        b["lora"] = serde_json::json!([{"id": 0, "scale": scale}]);
        b
    };
    // Dispatch learns a deployment's adapters from its event stream, a moment after the deploy.
    eventually(Duration::from_secs(10), "the adapter listed", || async {
        let o = tokio::process::Command::new("curl")
            .args(["-s", "--max-time", "5"])
            .arg(format!("{sllm_base}/models"))
            .output()
            .await
            .ok()?;
        String::from_utf8_lossy(&o.stdout).contains("tiny-lora:shout").then_some(())
    })
    .await
    .unwrap();
    let shout = complete(sllm_base.clone(), ask("tiny-lora:shout")).await;
    let plain = complete(sllm_base.clone(), ask("tiny-lora")).await;
    assert_ne!(shout, plain, "the adapter changes the text");
    assert_eq!(shout, complete(direct_base.clone(), with_scale(1.0)).await);
    assert_eq!(plain, complete(direct_base.clone(), with_scale(0.0)).await);
    assert_eq!(shout, complete(sllm_base.clone(), ask("shout")).await, "by its name alone");
    direct.kill();
}
