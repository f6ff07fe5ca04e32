//! The worker streams as a trust boundary: an Attach is taken only at exactly the epoch the
//! registry issued (a join token alone is not enough to push the real worker aside), streams
//! that never authenticate end within their first-message deadline without costing Redis
//! anything, and a client's `traceparent` cannot force tracing on the operator.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use sllm_api::v1 as pb;
use sllm_api::v1::attach_down::Msg as Down;
use sllm_api::v1::attach_up::Msg as Up;
use sllm_integration_tests::{
    DispatchReplica, JOIN_SECRET, OtlpReceiver, Proc, RedisServer, RegistryReplica, Served,
    SimWorker, commandstats, eventually,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Streaming};

/// The first-message deadline of Attach and Session (their defaults).
const DEADLINE: Duration = Duration::from_secs(5);

struct Mesh {
    redis: RedisServer,
    store: kvstore::Store,
    _registry: RegistryReplica,
    _scaler: Served,
    dispatch: DispatchReplica,
    worker: SimWorker,
}

/// Redis, a registry, a Scaler, a Dispatch replica and one simulated worker `w1` serving a
/// ready instance of model `m`, attached and answering.
async fn mesh() -> Mesh {
    let redis = RedisServer::start().unwrap();
    let store = redis.store().await.unwrap();
    let registry = RegistryReplica::start(
        store.clone(),
        Duration::from_millis(1500),
        Duration::from_millis(300),
    )
    .await
    .unwrap();
    let mut sc = scaler::ScalerConfig::new("s1");
    sc.tick = Duration::from_millis(100);
    let scaler = Served::scaler(store.clone(), sc).await.unwrap();
    let dispatch = DispatchReplica::start(store.clone(), "d1", |_| {}).await.unwrap();
    let sim = worker::SimConfig {
        time_scale: 0.01,
        decode_per_token: Duration::from_millis(100),
        ..worker::SimConfig::default()
    };
    let mut worker = SimWorker::start(vec![registry.endpoint()], "w1", sim).unwrap();
    worker.ready(0).await.unwrap();
    store.create_deployment(&sllm_integration_tests::sim_deployment("m", 1, 1)).await.unwrap();
    let m = Mesh { redis, store, _registry: registry, _scaler: scaler, dispatch, worker };
    eventually(Duration::from_secs(15), "a request served by w1", || async {
        generate(&m.dispatch).await.ok()
    })
    .await
    .unwrap();
    m
}

/// One short request for `m`; its text, or why it failed.
async fn generate(dispatch: &DispatchReplica) -> Result<String, tonic::Status> {
    let mut client =
        dispatch.client().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let req = pb::GenerateRequest {
        model: "m".into(),
        input: Some(pb::generate_request::Input::Prompt("fenced".into())),
        params: Some(pb::SamplingParams { max_tokens: 4, seed: Some(7), ..Default::default() }),
        progress: false,
        timeout_ms: 10_000,
    };
    let mut s = client.generate(req).await?.into_inner();
    let mut text = String::new();
    while let Some(e) = s.message().await? {
        match e.event {
            Some(pb::generate_event::Event::Chunk(c)) => text.push_str(&c.text),
            Some(pb::generate_event::Event::Finished(_)) => return Ok(text),
            _ => {}
        }
    }
    Err(tonic::Status::internal("stream ended without finishing"))
}

/// A raw Attach from `worker` claiming `epoch`, with `token`; the stream's sender (kept open)
/// and inbound side once Dispatch accepted it, or its refusal.
async fn attach(
    channel: Channel,
    worker: &str,
    epoch: u64,
    token: &str,
) -> Result<(mpsc::Sender<pb::AttachUp>, Streaming<pb::AttachDown>), tonic::Status> {
    let (tx, rx) = mpsc::channel(4);
    let hello = pb::AttachHello {
        worker_id: worker.into(),
        epoch,
        join_token: token.into(),
        run_id: "rogue".into(),
    };
    tx.send(pb::AttachUp { msg: Some(Up::Hello(hello)) }).await.unwrap();
    let mut client = pb::dispatch_client::DispatchClient::new(channel);
    let inbound = client.attach(ReceiverStream::new(rx)).await?.into_inner();
    Ok((tx, inbound))
}

fn token(worker: &str) -> String {
    service::JoinSecret::new(JOIN_SECRET).unwrap().token_for(worker)
}

async fn channel(endpoint: String) -> Channel {
    Endpoint::from_shared(endpoint).unwrap().tcp_nodelay(true).connect().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_holder_claiming_another_epoch_cannot_push_the_real_worker_aside() {
    let m = mesh().await;
    let epoch = m.store.get_worker("w1").await.unwrap().unwrap().epoch;
    let ch = channel(m.dispatch.endpoint()).await;

    // A newer epoch than the registry issued: refused, naming the epochs.
    let started = Instant::now();
    let err = attach(ch.clone(), "w1", epoch + 100, &token("w1")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains(&format!("hello.epoch {}", epoch + 100))
            && err.message().contains(&format!("current epoch is {epoch}")),
        "{}",
        err.message()
    );
    assert!(started.elapsed() < Duration::from_secs(3), "refused after {:?}", started.elapsed());
    // The largest epoch there is: the same.
    let err = attach(ch.clone(), "w1", u64::MAX, &token("w1")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // An older epoch: a replaced session, told to register again.
    let err = attach(ch.clone(), "w1", epoch - 1, &token("w1")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("stale"), "{}", err.message());
    // A valid token for a worker the registry never registered.
    let err = attach(ch.clone(), "ghost", 1, &token("ghost")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("not registered"), "{}", err.message());
    // The real worker's epoch with another worker's token.
    let err = attach(ch.clone(), "w1", epoch, &token("w2")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("hello.join_token"), "{}", err.message());

    // The real worker's stream and routes were never touched: every request is served.
    for i in 0..20 {
        let text = generate(&m.dispatch).await.unwrap_or_else(|s| panic!("request {i}: {s:?}"));
        assert!(!text.is_empty());
    }
    assert_eq!(m.store.get_worker("w1").await.unwrap().unwrap().epoch, epoch);
    drop(m.worker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_redis_is_away_only_an_epoch_this_replica_knows_may_attach() {
    let m = mesh().await;
    let epoch = m.store.get_worker("w1").await.unwrap().unwrap().epoch;
    let ch = channel(m.dispatch.endpoint()).await;

    m.redis.pause();
    // A claimed epoch nobody can check is not taken on the token alone.
    let err = attach(ch.clone(), "w1", epoch + 1, &token("w1")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("unreachable") && err.message().contains("has not seen"),
        "{}",
        err.message()
    );
    let err = attach(ch.clone(), "w7", 1, &token("w7")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    // Warm requests still flow from memory.
    generate(&m.dispatch).await.unwrap();
    // The epoch this replica saw the worker attach with is taken again (the worker's stream
    // broke and it dials back during the outage).
    let (_tx, mut inbound) = attach(ch.clone(), "w1", epoch, &token("w1")).await.unwrap();
    match inbound.message().await.unwrap() {
        Some(pb::AttachDown { msg: Some(Down::Welcome(w)) }) => assert_eq!(w.dispatch_id, "d1"),
        other => panic!("expected a welcome, got {other:?}"),
    }
    m.redis.resume();
    drop(m.worker);
}

/// Every key with its type, and the length of each stream: what a write would change.
async fn snapshot(raw: &mut redis::aio::MultiplexedConnection) -> BTreeMap<String, String> {
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(raw).await.unwrap();
    let mut out = BTreeMap::new();
    for k in keys {
        let kind: String = redis::cmd("TYPE").arg(&k).query_async(raw).await.unwrap();
        let shape = if kind == "stream" {
            let n: u64 = redis::cmd("XLEN").arg(&k).query_async(raw).await.unwrap();
            format!("stream of {n}")
        } else {
            kind
        };
        out.insert(k, shape);
    }
    out
}

/// Commands Redis ran, over all command names.
async fn commands(raw: &mut redis::aio::MultiplexedConnection) -> u64 {
    commandstats(raw).await.unwrap().values().sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_that_never_authenticate_end_at_their_deadline_and_cost_redis_nothing() {
    const SILENT_ATTACH: usize = 100;
    const SILENT_SESSION: usize = 100;
    const BAD_TOKEN: usize = 50;
    let redis = RedisServer::start().unwrap();
    let store = redis.store().await.unwrap();
    let registry = RegistryReplica::start(
        store.clone(),
        Duration::from_millis(1500),
        Duration::from_millis(300),
    )
    .await
    .unwrap();
    let dispatch = DispatchReplica::start(store.clone(), "d1", |_| {}).await.unwrap();
    let mut raw = redis.raw().await.unwrap();
    // Settled: the replica registered itself and its background reads run.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // What the services' background work costs Redis over one deadline, with no stream open.
    let before = commands(&mut raw).await;
    tokio::time::sleep(DEADLINE + Duration::from_secs(1)).await;
    let idle = commands(&mut raw).await - before;

    let keys = snapshot(&mut raw).await;
    let before = commands(&mut raw).await;
    let dispatch_channels =
        [channel(dispatch.endpoint()).await, channel(dispatch.endpoint()).await];
    let registry_channels =
        [channel(registry.endpoint()).await, channel(registry.endpoint()).await];
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    // Attach streams that never send their hello.
    for i in 0..SILENT_ATTACH {
        let ch = dispatch_channels[i % 2].clone();
        tasks.spawn(async move {
            let (tx, rx) = mpsc::channel::<pb::AttachUp>(1);
            let mut client = pb::dispatch_client::DispatchClient::new(ch);
            let r = client.attach(ReceiverStream::new(rx)).await;
            drop(tx);
            ("silent attach", r.map(|_| ()).unwrap_err(), started.elapsed())
        });
    }
    // Sessions that never send `register`.
    for i in 0..SILENT_SESSION {
        let ch = registry_channels[i % 2].clone();
        tasks.spawn(async move {
            let (tx, rx) = mpsc::channel::<pb::WorkerMessage>(1);
            let mut client = pb::worker_registry_client::WorkerRegistryClient::new(ch);
            let status = match client.session(ReceiverStream::new(rx)).await {
                Err(s) => s,
                Ok(r) => match r.into_inner().message().await {
                    Ok(Some(m)) => panic!("a session that never registered got {m:?}"),
                    Ok(None) => tonic::Status::ok("ended without a status"),
                    Err(s) => s,
                },
            };
            drop(tx);
            ("silent session", status, started.elapsed())
        });
    }
    // Attach streams whose hello carries a token that proves nothing.
    for i in 0..BAD_TOKEN {
        let ch = dispatch_channels[i % 2].clone();
        tasks.spawn(async move {
            let worker = format!("w{i}");
            let r = attach(ch, &worker, 1, "sllm1.not-a-token").await;
            ("bad token", r.map(|_| ()).unwrap_err(), started.elapsed())
        });
    }
    let mut ended = 0;
    while let Some(r) = tasks.join_next().await {
        let (what, status, after) = r.unwrap();
        match what {
            "bad token" => {
                assert_eq!(status.code(), Code::Unauthenticated, "{what}: {status:?}");
                assert!(after < DEADLINE, "{what} refused only after {after:?}");
            }
            _ => {
                assert_eq!(status.code(), Code::DeadlineExceeded, "{what}: {status:?}");
                assert!(
                    after >= DEADLINE - Duration::from_millis(200)
                        && after < DEADLINE + Duration::from_secs(3),
                    "{what} ended after {after:?}"
                );
            }
        }
        ended += 1;
    }
    assert_eq!(ended, SILENT_ATTACH + SILENT_SESSION + BAD_TOKEN);
    let busy = commands(&mut raw).await - before;

    // Nothing was written, and the streams cost no commands beyond the background's own.
    assert_eq!(snapshot(&mut raw).await, keys, "unauthenticated streams changed Redis");
    assert!(store.list_workers().await.unwrap().is_empty());
    assert!(
        busy <= idle + idle / 2 + 20,
        "{busy} Redis commands while {} unauthenticated streams were open, {idle} when idle",
        SILENT_ATTACH + SILENT_SESSION + BAD_TOKEN
    );
    // And the servers still answer.
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(dispatch_channels[0].clone());
    health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();
}

/// `sllm serve all` exporting traces to `otlp` with the operator's ratio at 0, plus `extra`
/// flags and environment; its gRPC address and the process.
fn serve_sampling_off(
    redis: &RedisServer,
    otlp: &OtlpReceiver,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (String, Proc) {
    let url = redis.url();
    let mut args = vec![
        "serve",
        "all",
        "--redis-url",
        &url,
        "--grpc-addr",
        "127.0.0.1:0",
        "--openai-addr",
        "127.0.0.1:0",
        "--metrics-addr",
        "off",
    ];
    args.extend_from_slice(extra);
    let mut vars = vec![
        ("SLLM_JOIN_SECRET", JOIN_SECRET),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("OTEL_TRACES_SAMPLER", "traceidratio"),
        ("OTEL_TRACES_SAMPLER_ARG", "0"),
    ];
    vars.extend_from_slice(env);
    let (proc, _) = Proc::sllm(&args, &vars, "openai api listening on").unwrap();
    let grpc = proc
        .output()
        .lines()
        .find_map(|l| l.strip_prefix("sllm: serving gRPC on"))
        .unwrap()
        .trim()
        .to_string();
    (format!("http://{grpc}"), proc)
}

/// A Generate (for a model nobody deployed: the request span is recorded all the same) with
/// `traceparent`.
async fn generate_traced(grpc: &str, traceparent: &str) {
    let mut client = pb::dispatch_client::DispatchClient::connect(grpc.to_string()).await.unwrap();
    let mut req = tonic::Request::new(pb::GenerateRequest {
        model: "nobody".into(),
        input: Some(pb::generate_request::Input::Prompt("trace me".into())),
        ..Default::default()
    });
    req.metadata_mut().insert("traceparent", traceparent.parse().unwrap());
    let err = client.generate(req).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_sampled_flag_does_not_override_the_operators_ratio_unless_trusted() {
    let client_span = "b7ad6b7169203331";
    let sampled = |trace: &str| format!("00-{trace}-{client_span}-01");
    let (r1, r2, r3) = (
        RedisServer::start().unwrap(),
        RedisServer::start().unwrap(),
        RedisServer::start().unwrap(),
    );
    let (o1, o2, o3) = (
        OtlpReceiver::start().await.unwrap(),
        OtlpReceiver::start().await.unwrap(),
        OtlpReceiver::start().await.unwrap(),
    );
    let (untrusting, _p1) = serve_sampling_off(&r1, &o1, &[], &[]);
    let (flagged, _p2) = serve_sampling_off(&r2, &o2, &["--trust-client-sampling"], &[]);
    // The standard way to say the same.
    let (parent_based, _p3) =
        serve_sampling_off(&r3, &o3, &[], &[("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")]);

    let ignored = "0af7651916cd43dd8448eb211c80319c";
    let honoured = "4bf92f3577b34da6a3ce929d0e0e4736";
    let standard = "5bf92f3577b34da6a3ce929d0e0e4737";
    let declined = "6bf92f3577b34da6a3ce929d0e0e4738";
    generate_traced(&untrusting, &sampled(ignored)).await;
    generate_traced(&flagged, &sampled(honoured)).await;
    generate_traced(&flagged, &format!("00-{declined}-{client_span}-00")).await;
    generate_traced(&parent_based, &sampled(standard)).await;

    // Trusted: the client's decision is followed, and the request joins its trace.
    for (otlp, trace) in [(&o2, honoured), (&o3, standard)] {
        let span = eventually(Duration::from_secs(10), "the trusted request's span", || async {
            otlp.spans()
                .into_iter()
                .find(|s| s.trace_id == trace && s.name == "sllm.v1.Dispatch/Generate")
        })
        .await
        .unwrap();
        assert_eq!(span.parent_span_id, client_span);
    }
    // Exports run every 100 ms: well past the trusted ones, the untrusting process has sent
    // nothing of the request whose client asked for it, nor the trusting one of a request
    // whose client declined.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let leaked: Vec<String> =
        o1.spans().into_iter().map(|s| format!("{} {}", s.trace_id, s.name)).collect();
    assert!(leaked.iter().all(|s| !s.starts_with(ignored)), "traced against the ratio: {leaked:?}");
    assert!(
        o2.spans().iter().all(|s| s.trace_id != declined),
        "a trusted client's unsampled request was traced"
    );
}
