//! One trace per request across the mesh, exported over OTLP by real `sllm` processes to a
//! receiver in the test; and Prometheus text on every `/metrics` that moves with traffic.

#![allow(clippy::unwrap_used)]

mod dashboard;

use std::collections::HashMap;
use std::time::Duration;

use sllm_api::v1 as pb;
use sllm_integration_tests::{
    JOIN_SECRET, OtlpReceiver, Proc, ReceivedSpan, RedisServer, eventually,
};

struct Mesh {
    _redis: RedisServer,
    _control: Proc,
    _worker: Proc,
    grpc: String,
    control_metrics: String,
    worker_metrics: String,
}

/// A control plane and a simulated worker exporting traces to `otlp` over `protocol` (`grpc` or
/// `http/protobuf`).
async fn mesh(otlp: &OtlpReceiver, protocol: &str) -> Mesh {
    let sim = [
        "--backend",
        "sim",
        "--time-scale",
        "0.02",
        "--decode-ms",
        "2",
        "--checkpoint",
        "m=12GB@disk",
    ];
    mesh_with(otlp, protocol, &sim).await
}

/// A control plane and a worker started with `backend` (its backend's arguments), exporting
/// traces to `otlp` over `protocol`.
async fn mesh_with(otlp: &OtlpReceiver, protocol: &str, backend: &[&str]) -> Mesh {
    let redis = RedisServer::start().unwrap();
    let url = redis.url();
    let endpoint = if protocol == "grpc" { &otlp.endpoint } else { &otlp.http_endpoint };
    let env = [
        ("SLLM_JOIN_SECRET", JOIN_SECRET),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let (control, _) = Proc::sllm(
        &[
            "serve",
            "all",
            "--redis-url",
            &url,
            "--grpc-addr",
            "127.0.0.1:0",
            "--openai-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ],
        &env,
        "metrics on",
    )
    .unwrap();
    let out = control.output();
    let find = |prefix: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|| panic!("{prefix} in {out}"))
    };
    let grpc = find("sllm: serving gRPC on");
    let control_metrics = find("sllm: metrics on");
    let registry = format!("http://{grpc}");
    let mut args = vec!["worker", "--registry", &registry, "--node-id", "w1", "--address"];
    args.extend(["10.0.0.1", "--metrics-addr", "127.0.0.1:0"]);
    args.extend(backend);
    let (worker, _) = Proc::sllm(&args, &env, "metrics on").unwrap();
    let worker_metrics = worker
        .output()
        .lines()
        .find_map(|l| l.strip_prefix("sllm: metrics on"))
        .unwrap()
        .trim()
        .to_string();
    Mesh {
        _redis: redis,
        _control: control,
        _worker: worker,
        grpc,
        control_metrics,
        worker_metrics,
    }
}

/// Deploys `m` (simulated, at most one instance, none until asked for) through the
/// ModelRegistry at `grpc`.
async fn deploy_cold(grpc: &str) {
    deploy(grpc, "sim", 0, 1).await;
}

/// Deploys `m` on `backend` with `min`..=`max` instances through the ModelRegistry at `grpc`;
/// returns the registry's client.
async fn deploy(
    grpc: &str,
    backend: &str,
    min: i32,
    max: i32,
) -> pb::model_registry_client::ModelRegistryClient<tonic::transport::Channel> {
    let mut models =
        pb::model_registry_client::ModelRegistryClient::connect(format!("http://{grpc}"))
            .await
            .unwrap();
    let spec = pb::DeploymentSpec {
        model: "m".into(),
        backend: backend.into(),
        num_gpus: 1,
        auto_scaling_config: Some(pb::AutoScalingConfig {
            target: 1.0,
            min_instances: min,
            max_instances: max,
            keep_alive: 60,
            ..Default::default()
        }),
        backend_config: None,
    };
    models.deploy(pb::DeployRequest { spec: Some(spec) }).await.unwrap();
    models
}

/// A traced Generate of four tokens: its usage, and the request id the client was shown.
async fn generate(grpc: &str, traceparent: &str) -> (pb::Usage, String) {
    generate_tokens(grpc, traceparent, 4).await
}

/// A traced Generate of `max_tokens`: its usage, and the request id the client was shown.
async fn generate_tokens(grpc: &str, traceparent: &str, max_tokens: u32) -> (pb::Usage, String) {
    let mut client =
        pb::dispatch_client::DispatchClient::connect(format!("http://{grpc}")).await.unwrap();
    let mut req = tonic::Request::new(pb::GenerateRequest {
        model: "m".into(),
        input: Some(pb::generate_request::Input::Prompt("trace me".into())),
        params: Some(pb::SamplingParams { max_tokens, ..Default::default() }),
        progress: true,
        timeout_ms: 20_000,
    });
    req.metadata_mut().insert("traceparent", traceparent.parse().unwrap());
    let response = client.generate(req).await.unwrap();
    let id = response.metadata().get("x-request-id").expect("x-request-id").to_str().unwrap();
    let id = id.to_string();
    let mut s = response.into_inner();
    while let Some(e) = s.message().await.unwrap() {
        if let Some(pb::generate_event::Event::Finished(f)) = e.event {
            return (f.usage.unwrap(), id);
        }
    }
    panic!("no finish");
}

/// Three engines that each crash after 20 tokens: a 50-token stream moves twice, and its
/// request span says so once, with the final counts (the SDK keeps every value an attribute is
/// given, so counts set along the way would show side by side in a trace viewer).
#[tokio::test]
async fn a_stream_that_moves_twice_says_so_once_on_its_request_span() {
    let otlp = OtlpReceiver::start().await.unwrap();
    let engine = format!(
        "{} sim-engine --port {{port}} --model {{model}} --load-ms 0 --decode-ms 5 \
         --crash-after-tokens 20",
        sllm_integration_tests::sllm_bin().unwrap().display()
    );
    let backend = ["--backend", "engine", "--engine", "custom", "--engine-command", &engine];
    let m = mesh_with(&otlp, "grpc", &[&backend[..], &["--gpus", "3"]].concat()).await;
    let models = deploy(&m.grpc, "custom", 3, 3).await;
    eventually(Duration::from_secs(30), "three ready instances", || {
        let mut models = models.clone();
        async move {
            let d = models.get(pb::GetRequest { model: "m".into() }).await.ok()?.into_inner();
            (d.instances.is_some_and(|i| i.ready == 3)).then_some(())
        }
    })
    .await
    .unwrap();
    // Let Dispatch see all three before the request.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let trace = "5bf92f3577b34da6a3ce929d0e0e4736";
    let (usage, _) = generate_tokens(&m.grpc, &format!("00-{trace}-00f067aa0ba902b7-01"), 50).await;
    assert_eq!((usage.completion_tokens, usage.migrations), (50, 2), "{usage:?}");

    let spans: Vec<ReceivedSpan> =
        eventually(Duration::from_secs(10), "the moved request's spans", || async {
            let spans: Vec<ReceivedSpan> =
                otlp.spans().into_iter().filter(|s| s.trace_id == trace).collect();
            (by_name(&spans, "generate on an instance").len() == 3
                && !by_name(&spans, "sllm.v1.Dispatch/Generate").is_empty())
            .then_some(spans)
        })
        .await
        .unwrap();
    let request = one(&spans, "sllm.v1.Dispatch/Generate");
    for (key, value) in [("sllm.attempts", "3"), ("sllm.migrations", "2"), ("sllm.outcome", "ok")] {
        let times = request.keys.iter().filter(|k| *k == key).count();
        assert_eq!(times, 1, "{key} once on the request span: {:?}", request.keys);
        assert_eq!(request.attributes.get(key).map(String::as_str), Some(value), "{key}");
    }
}

fn by_name<'a>(spans: &'a [ReceivedSpan], name: &str) -> Vec<&'a ReceivedSpan> {
    spans.iter().filter(|s| s.name == name).collect()
}

fn one<'a>(spans: &'a [ReceivedSpan], name: &str) -> &'a ReceivedSpan {
    let found = by_name(spans, name);
    assert!(
        !found.is_empty(),
        "no span {name:?} among {:?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    found[0]
}

/// Parses Prometheus text: (name with labels) -> value. Fails on any malformed line.
fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (series, value) =
            line.rsplit_once(' ').unwrap_or_else(|| panic!("malformed line {line:?}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad name in {line:?}"
        );
        if series.contains('{') {
            assert!(series.ends_with('}'), "bad labels in {line:?}");
        }
        out.insert(series.to_string(), value);
    }
    out
}

async fn scrape(addr: &str) -> HashMap<String, f64> {
    let body = tokio::process::Command::new("curl").arg("-sf").arg(addr).output().await.unwrap();
    assert!(body.status.success(), "scrape of {addr} failed");
    parse_prometheus(&String::from_utf8(body.stdout).unwrap())
}

#[tokio::test]
async fn one_trace_per_request_across_dispatch_scaler_and_worker_over_otlp_grpc() {
    one_trace_per_request("grpc").await;
}

#[tokio::test]
async fn one_trace_per_request_across_dispatch_scaler_and_worker_over_otlp_http() {
    one_trace_per_request("http/protobuf").await;
}

async fn one_trace_per_request(protocol: &str) {
    let otlp = OtlpReceiver::start().await.unwrap();
    let m = mesh(&otlp, protocol).await;
    deploy_cold(&m.grpc).await;
    // Let the worker attach to Dispatch before the first request.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let cold_trace = "0af7651916cd43dd8448eb211c80319c";
    let client_span = "b7ad6b7169203331";
    let (usage, cold_id) = generate(&m.grpc, &format!("00-{cold_trace}-{client_span}-01")).await;
    assert!(usage.queue_us > 0, "the first request waited for the cold start");
    let warm_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let (_, warm_id) = generate(&m.grpc, &format!("00-{warm_trace}-00f067aa0ba902b7-01")).await;
    // Request ids are UUIDv7s: they sort by arrival.
    let (cold_uuid, warm_uuid) =
        (uuid::Uuid::parse_str(&cold_id).unwrap(), uuid::Uuid::parse_str(&warm_id).unwrap());
    assert_eq!(cold_uuid.get_version_num(), 7, "{cold_id}");
    assert!(cold_uuid < warm_uuid, "{cold_id} then {warm_id}");

    let cold: Vec<ReceivedSpan> =
        eventually(Duration::from_secs(10), "the cold trace's spans", || async {
            let spans: Vec<ReceivedSpan> =
                otlp.spans().into_iter().filter(|s| s.trace_id == cold_trace).collect();
            let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
            [
                "sllm.v1.Dispatch/Generate",
                "queue wait",
                "scaler decision",
                "place instance",
                "load instance",
                "generate on an instance",
                "worker generate",
            ]
            .iter()
            .all(|n| names.contains(n))
            .then_some(spans)
        })
        .await
        .unwrap();
    let request = one(&cold, "sllm.v1.Dispatch/Generate");
    assert_eq!(request.parent_span_id, client_span, "the request continues the client's trace");
    assert_eq!(request.attributes.get("gen_ai.request.model").map(String::as_str), Some("m"));
    assert_eq!(request.attributes.get("sllm.outcome").map(String::as_str), Some("ok"));
    assert_eq!(
        request.attributes.get("sllm.request_id"),
        Some(&cold_id),
        "the id the client was shown finds its trace"
    );
    let queue = one(&cold, "queue wait");
    assert_eq!(queue.parent_span_id, request.span_id);
    assert!(
        cold.iter().any(|s| s.name == "EVALSHA demand_event" && s.parent_span_id == queue.span_id),
        "the demand event's Redis call is under the held request"
    );
    let decision = one(&cold, "scaler decision");
    assert_eq!(
        decision.parent_span_id, queue.span_id,
        "the demand event carries the waiting request's context"
    );
    let place = one(&cold, "place instance");
    assert_eq!(place.parent_span_id, decision.span_id);
    assert_eq!(place.attributes.get("sllm.worker").map(String::as_str), Some("w1"));
    let load = one(&cold, "load instance");
    assert_eq!(
        load.parent_span_id, place.span_id,
        "the start command carries the decision's context"
    );
    assert_eq!(load.service, "sllm-worker");
    let instance = load.attributes.get("sllm.instance").unwrap();
    let placed = instance.strip_prefix("m-").and_then(|u| uuid::Uuid::parse_str(u).ok());
    assert_eq!(placed.map(|u| u.get_version_num()), Some(7), "instance id {instance}");
    let attempt = one(&cold, "generate on an instance");
    assert_eq!(attempt.parent_span_id, request.span_id);
    let on_worker = one(&cold, "worker generate");
    assert_eq!(
        on_worker.parent_span_id, attempt.span_id,
        "the Attach stream carries the attempt's context"
    );
    assert_eq!(on_worker.service, "sllm-worker");
    assert_eq!(
        on_worker.attributes.get("gen_ai.usage.output_tokens").map(String::as_str),
        Some("4")
    );
    assert!(
        cold.iter().any(|s| s.name.starts_with("EVALSHA")
            && s.attributes.get("db.system").map(String::as_str) == Some("redis")),
        "the kvstore calls on the way are in the trace"
    );

    let warm: Vec<ReceivedSpan> =
        eventually(Duration::from_secs(10), "the warm trace's spans", || async {
            let spans: Vec<ReceivedSpan> =
                otlp.spans().into_iter().filter(|s| s.trace_id == warm_trace).collect();
            spans.iter().any(|s| s.name == "worker generate").then_some(spans)
        })
        .await
        .unwrap();
    assert!(by_name(&warm, "queue wait").is_empty(), "a warm request is not held");
    assert!(by_name(&warm, "load instance").is_empty());

    // Each request span names its kind of operation, as GenAI's conventions do.
    let operation = |s: &ReceivedSpan| s.attributes.get("gen_ai.operation.name").cloned();
    assert_eq!(operation(request).as_deref(), Some("text_completion"));

    // Metrics: valid Prometheus text that moved with the traffic.
    let control = scrape(&m.control_metrics).await;
    assert_eq!(
        control.get("sllm_dispatch_requests_total{model=\"m\",outcome=\"ok\"}"),
        Some(&2.0),
        "{control:?}"
    );
    assert!(control["sllm_dispatch_time_to_first_token_seconds_count{model=\"m\"}"] >= 2.0);
    assert_eq!(control.get("sllm_dispatch_queue_wait_seconds_count{model=\"m\"}"), Some(&1.0));
    assert!(control["sllm_registry_heartbeats_total"] >= 1.0);
    assert!(control["sllm_dispatch_tokens_total{model=\"m\"}"] >= 8.0);
    assert_eq!(control.get("sllm_scaler_leader"), Some(&1.0));
    assert!(
        control.keys().any(|k| k
            .starts_with("sllm_scaler_decisions_total{direction=\"up\",reason=\"demand_event\"}")),
        "{control:?}"
    );
    assert!(control.keys().any(|k| k.starts_with("sllm_redis_command_duration_seconds_count")));
    assert!(
        control.get("sllm_trace_spans_exported_total").is_some_and(|n| *n >= 1.0),
        "the exports are counted: {control:?}"
    );
    let worker = scrape(&m.worker_metrics).await;
    assert!(!worker.is_empty());

    // An embeddings request's span names its operation too (after the counts above).
    let embed_trace = "5bf92f3577b34da6a3ce929d0e0e4737";
    let mut client =
        pb::dispatch_client::DispatchClient::connect(format!("http://{}", m.grpc)).await.unwrap();
    let mut req = tonic::Request::new(pb::EmbedRequest {
        model: "m".into(),
        input: vec!["trace me".into()],
        dimensions: None,
        timeout_ms: 20_000,
    });
    let traceparent = format!("00-{embed_trace}-00f067aa0ba902b7-01");
    req.metadata_mut().insert("traceparent", traceparent.parse().unwrap());
    client.embed(req).await.unwrap();
    let embed: Vec<ReceivedSpan> =
        eventually(Duration::from_secs(10), "the embeddings trace's spans", || async {
            let spans: Vec<ReceivedSpan> =
                otlp.spans().into_iter().filter(|s| s.trace_id == embed_trace).collect();
            spans.iter().any(|s| s.name == "sllm.v1.Dispatch/Embed").then_some(spans)
        })
        .await
        .unwrap();
    assert_eq!(operation(one(&embed, "sllm.v1.Dispatch/Embed")).as_deref(), Some("embeddings"));

    // So does a rerank.
    let rerank_trace = "6cf92f3577b34da6a3ce929d0e0e4738";
    let mut req = tonic::Request::new(pb::RerankRequest {
        model: "m".into(),
        query: "trace me".into(),
        documents: vec!["trace".into(), "me".into()],
        top_n: None,
        timeout_ms: 20_000,
    });
    let traceparent = format!("00-{rerank_trace}-00f067aa0ba902b7-01");
    req.metadata_mut().insert("traceparent", traceparent.parse().unwrap());
    let ranked = client.rerank(req).await.unwrap().into_inner();
    assert_eq!(ranked.results.len(), 2);
    let rerank: Vec<ReceivedSpan> =
        eventually(Duration::from_secs(10), "the rerank trace's spans", || async {
            let spans: Vec<ReceivedSpan> =
                otlp.spans().into_iter().filter(|s| s.trace_id == rerank_trace).collect();
            spans.iter().any(|s| s.name == "sllm.v1.Dispatch/Rerank").then_some(spans)
        })
        .await
        .unwrap();
    assert_eq!(operation(one(&rerank, "sllm.v1.Dispatch/Rerank")).as_deref(), Some("rerank"));
}
