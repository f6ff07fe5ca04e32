//! The engine backend through `--engine custom` pointing at `sllm sim-engine`: the same process
//! supervision and OpenAI HTTP path a vLLM server would get, end to end through Dispatch.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use kvstore::{InstanceStatus, Store};
use sllm_api::v1 as pb;
use sllm_integration_tests::{
    DispatchReplica, JOIN_SECRET, Proc, RedisServer, RegistryReplica, Served, eventually, sllm_bin,
};
use tonic::Code;
use worker::engine::{EngineBackend, EngineConfig, EngineKind};

mod llamacpp;
mod passthrough;

struct Cluster {
    _redis: RedisServer,
    store: Store,
    registry: RegistryReplica,
    _scaler: Served,
    dispatch: DispatchReplica,
}

async fn cluster() -> Cluster {
    let redis = RedisServer::start().unwrap();
    let store = redis.store_with(|c| c.namespace = "sllm".into()).await.unwrap();
    let registry = RegistryReplica::start(
        store.clone(),
        Duration::from_millis(1500),
        Duration::from_millis(300),
    )
    .await
    .unwrap();
    let mut sc = scaler::ScalerConfig::new("s1");
    sc.tick = Duration::from_millis(100);
    sc.drain_grace = Duration::from_secs(2);
    let scaler = Served::scaler(store.clone(), sc).await.unwrap();
    let dispatch = DispatchReplica::start(store.clone(), "d1", |_| {}).await.unwrap();
    Cluster { _redis: redis, store, registry, _scaler: scaler, dispatch }
}

fn engine_command(extra: &str) -> String {
    format!(
        "{} sim-engine --port {{port}} --model {{model}} --load-ms 100 --decode-ms 2 {extra}",
        sllm_bin().unwrap().display()
    )
}

struct EngineWorker {
    backend: EngineBackend,
    _agent: worker::Agent,
    shutdown: tokio_util::sync::CancellationToken,
}

impl Drop for EngineWorker {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn engine_worker(c: &Cluster, extra: &str, ready_timeout: Duration) -> EngineWorker {
    engine_worker_with(c, extra, |ec| ec.ready_timeout = ready_timeout).await
}

async fn engine_worker_with(
    c: &Cluster,
    extra: &str,
    adjust: impl FnOnce(&mut EngineConfig),
) -> EngineWorker {
    let mut ec = EngineConfig::new(EngineKind::Custom);
    ec.command = engine_command(extra);
    ec.gpus = 2;
    ec.stop_grace = Duration::from_secs(2);
    adjust(&mut ec);
    let (backend, events) = EngineBackend::new(ec);
    let secret = service::JoinSecret::new(JOIN_SECRET).unwrap();
    let mut config = worker::AgentConfig::new(
        vec![c.registry.endpoint()],
        "gpu-host",
        secret.token_for("gpu-host"),
    );
    config.address = "10.0.0.9".into();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut agent =
        worker::Agent::spawn(config, Arc::new(backend.clone()), events, None, shutdown.clone());
    agent.wait_ready(0, Duration::from_secs(10)).await.unwrap();
    EngineWorker { backend, _agent: agent, shutdown }
}

async fn deploy(store: &Store, model: &str) {
    store
        .create_deployment(&kvstore::DeploymentSpec {
            model: model.into(),
            backend: "custom".into(),
            num_gpus: 1,
            autoscaling: kvstore::AutoScaling {
                min_instances: 1,
                max_instances: 1,
                keep_alive_s: 60,
                ..Default::default()
            },
            backend_config: r#"{"max_model_len": 2048}"#.into(),
        })
        .await
        .unwrap();
}

async fn instance(c: &Cluster, model: &str, status: InstanceStatus) -> kvstore::InstanceRecord {
    eventually(Duration::from_secs(15), &format!("an instance {status}"), || async {
        c.store.model_instances(model).await.unwrap().into_iter().find(|i| i.status == status)
    })
    .await
    .unwrap()
}

fn request(model: &str, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        model: model.into(),
        input: Some(pb::generate_request::Input::Prompt("hello engine".into())),
        params: Some(pb::SamplingParams { max_tokens, seed: Some(7), ..Default::default() }),
        progress: false,
        timeout_ms: 20_000,
    }
}

/// POSTs `body` to `path` at `base` (`http://host:port`); the status and the raw response body.
pub(crate) async fn post_to(base: &str, path: &str, body: &serde_json::Value) -> (u16, String) {
    let posted = sllm_integration_tests::curl_post(&format!("{base}{path}"), body).await;
    (posted.status, posted.body)
}

async fn curl(url: &str) -> Option<String> {
    let o = tokio::process::Command::new("curl")
        .args(["-sf", "--max-time", "2", url])
        .output()
        .await
        .ok()?;
    o.status.success().then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}

#[tokio::test]
async fn an_engine_starts_serves_streams_cancels_and_drains() {
    let c = cluster().await;
    let w = engine_worker(&c, "", Duration::from_secs(20)).await;
    deploy(&c.store, "m").await;
    let inst = instance(&c, "m", InstanceStatus::Ready).await;
    let endpoint = w.backend.endpoint(&inst.instance_id).unwrap();
    assert!(curl(&format!("{endpoint}/v1/models")).await.unwrap().contains("\"m\""));

    // A generation through Dispatch, streamed from the engine's SSE.
    let out = eventually(Duration::from_secs(10), "a served request", || async {
        let mut client = c.dispatch.client().await.ok()?;
        let mut s = client.generate(request("m", 6)).await.ok()?.into_inner();
        let mut text = String::new();
        while let Some(e) = s.message().await.ok()? {
            match e.event {
                Some(pb::generate_event::Event::Chunk(ch)) => text.push_str(&ch.text),
                Some(pb::generate_event::Event::Finished(f)) => return Some((text, f)),
                _ => {}
            }
        }
        None
    })
    .await
    .unwrap();
    let expected = worker::sim::text(7, "hello engine", 6);
    assert_eq!(out.0, expected);
    assert_eq!(out.1.usage.unwrap().completion_tokens, 6);

    // Cancel: the client leaves mid-stream; the engine's request stops.
    let mut client = c.dispatch.client().await.unwrap();
    let mut s = client.generate(request("m", 5000)).await.unwrap().into_inner();
    s.message().await.unwrap();
    assert_eq!(curl(&format!("{endpoint}/debug/running")).await.as_deref(), Some("1"));
    drop(s);
    drop(client);
    eventually(Duration::from_secs(5), "the engine stopped generating", || async {
        (curl(&format!("{endpoint}/debug/running")).await.as_deref() == Some("0")).then_some(())
    })
    .await
    .unwrap();

    // The same through the OpenAI API: an HTTP client that closes its connection mid-stream.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = c.dispatch.openai_base();
        let addr = addr.trim_start_matches("http://").trim_end_matches("/v1").to_string();
        let body = r#"{"model":"m","prompt":"hello engine","max_tokens":5000,"stream":true}"#;
        let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        );
        conn.write_all(format!("{head}{body}").as_bytes()).await.unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("data: ") {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "the stream ended before its first event");
            seen.extend_from_slice(&buf[..n]);
        }
        assert_eq!(curl(&format!("{endpoint}/debug/running")).await.as_deref(), Some("1"));
        drop(conn);
    }
    eventually(
        Duration::from_secs(5),
        "the engine stopped generating for the HTTP client",
        || async {
            (curl(&format!("{endpoint}/debug/running")).await.as_deref() == Some("0")).then_some(())
        },
    )
    .await
    .unwrap();

    // Drain: the instance stops and its engine process is gone.
    c.store
        .update_autoscaling(
            "m",
            &kvstore::AutoScaling {
                min_instances: 0,
                max_instances: 1,
                keep_alive_s: 0,
                ..Default::default()
            },
            0,
        )
        .await
        .unwrap();
    eventually(Duration::from_secs(15), "drained and stopped", || async {
        c.store.model_instances("m").await.unwrap().is_empty().then_some(())
    })
    .await
    .unwrap();
    eventually(Duration::from_secs(5), "engine process gone", || async {
        curl(&format!("{endpoint}/health")).await.is_none().then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn an_engine_crashing_mid_stream_is_reported_with_its_stderr() {
    let c = cluster().await;
    let _w = engine_worker(&c, "--crash-after-tokens 5", Duration::from_secs(20)).await;
    deploy(&c.store, "m").await;
    instance(&c, "m", InstanceStatus::Ready).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut client = c.dispatch.client().await.unwrap();
    let mut s = client.generate(request("m", 50)).await.unwrap().into_inner();
    let mut tokens = 0;
    let err = loop {
        match s.message().await {
            Ok(Some(pb::GenerateEvent { event: Some(pb::generate_event::Event::Chunk(ch)) })) => {
                tokens += ch.tokens
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("the stream ended without an error"),
            Err(e) => break e,
        }
    };
    assert!(tokens >= 1, "tokens were delivered before the crash");
    assert_eq!(err.code(), Code::Unavailable);
    // The failed record keeps the engine's last stderr lines.
    let reason = eventually(Duration::from_secs(10), "the failure reason", || async {
        let events = c
            .store
            .event_reader(kvstore::Position::start())
            .next_batch(Duration::ZERO, 10_000)
            .await
            .ok()?;
        match events {
            kvstore::EventBatch::Events(e) => e
                .into_iter()
                .find(|e| e.kind == "instance.failed")
                .and_then(|e| e.field("reason").map(String::from)),
            _ => None,
        }
    })
    .await
    .unwrap();
    assert!(
        reason.contains("engine exited") && reason.contains("simulated engine crash"),
        "{reason}"
    );
}

#[tokio::test]
async fn an_engine_that_never_becomes_healthy_fails_with_the_reason() {
    let c = cluster().await;
    let _w = engine_worker(&c, "--never-healthy", Duration::from_secs(1)).await;
    deploy(&c.store, "m").await;
    let reason = eventually(Duration::from_secs(15), "the failure reason", || async {
        let events = c
            .store
            .event_reader(kvstore::Position::start())
            .next_batch(Duration::ZERO, 10_000)
            .await
            .ok()?;
        match events {
            kvstore::EventBatch::Events(e) => e
                .into_iter()
                .find(|e| e.kind == "instance.failed")
                .and_then(|e| e.field("reason").map(String::from)),
            _ => None,
        }
    })
    .await
    .unwrap();
    assert!(reason.contains("did not become healthy within 1 s"), "{reason}");
}

#[tokio::test]
async fn no_engine_outlives_a_killed_agent() {
    let c = cluster().await;
    let (mut agent, _) = Proc::sllm(
        &[
            "worker",
            "--registry",
            &c.registry.endpoint(),
            "--node-id",
            "gpu-host",
            "--address",
            "10.0.0.9",
            "--backend",
            "engine",
            "--engine",
            "custom",
            "--engine-command",
            &engine_command(""),
            "--gpus",
            "2",
            "--stop-grace-s",
            "1",
        ],
        &[("SLLM_JOIN_SECRET", JOIN_SECRET)],
        "started",
    )
    .unwrap();
    // A model name no other test uses, to count only this test's engines.
    deploy(&c.store, "orphan-check").await;
    instance(&c, "orphan-check", InstanceStatus::Ready).await;
    let engines = || async {
        let o = tokio::process::Command::new("sh")
            .arg("-c")
            .arg("pgrep -f '[s]im-engine --port .* --model orphan-check' || true")
            .output()
            .await
            .unwrap();
        String::from_utf8_lossy(&o.stdout).lines().count()
    };
    assert!(engines().await >= 1, "an engine runs");
    agent.kill();
    eventually(Duration::from_secs(10), "every engine gone", || async {
        (engines().await == 0).then_some(())
    })
    .await
    .unwrap();
}
