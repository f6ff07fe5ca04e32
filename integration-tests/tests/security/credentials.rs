//! Credentials an operator manages: join tokens that expire and are checked under several
//! secrets at once (rotation), refused before any Redis call; API-key scopes per RPC; reflection
//! and `/metrics` behind an admin key on request; and every secret read from a file by the real
//! binary, never from its command line.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use service::{JoinSecret, JoinSecrets};
use sllm_api::v1 as pb;
use sllm_api::v1::registry_message::Body as Down;
use sllm_api::v1::worker_message::Body as Up;
use sllm_integration_tests::{Proc, RedisServer, SimWorker, commandstats, eventually};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::{Code, Status};

use crate::{ADMIN, INFER, run, with_key};

const OLD: &str = "old-join-secret-0123456789";
const NEW: &str = "new-join-secret-0123456789";

fn secret(s: &str) -> JoinSecret {
    JoinSecret::new(s).unwrap()
}

/// A WorkerRegistry serving `secrets`. `background: false` serves the gRPC service alone, so
/// every Redis command while it runs is one a session caused.
async fn registry(
    store: kvstore::Store,
    secrets: JoinSecrets,
    background: bool,
) -> (String, DropGuard) {
    let registry =
        worker_registry::Registry::new(store, worker_registry::RegistryConfig::new(secrets));
    let listener = service::Listener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr());
    let shutdown = CancellationToken::new();
    let s = shutdown.clone();
    tokio::spawn(async move {
        if background {
            registry.serve(listener, s).await.unwrap();
        } else {
            tonic::transport::Server::builder()
                .add_service(registry.service())
                .serve_with_incoming_shutdown(listener.incoming(), s.cancelled_owned())
                .await
                .unwrap();
        }
    });
    (endpoint, shutdown.drop_guard())
}

/// Opens a session as `node` with `token`; the sender keeps it open.
async fn register(
    endpoint: &str,
    node: &str,
    token: &str,
) -> Result<(mpsc::Sender<pb::WorkerMessage>, pb::Registered), Status> {
    let mut client =
        pb::worker_registry_client::WorkerRegistryClient::connect(endpoint.to_string())
            .await
            .unwrap();
    let (tx, rx) = mpsc::channel(4);
    let register = pb::Register {
        node_id: node.into(),
        join_token: token.into(),
        // One address per node: two live nodes may not share one.
        address: format!("sim-{node}"),
        inventory: Some(pb::Inventory {
            gpus: vec![pb::Gpu { index: 0, name: "sim".into(), memory_bytes: 1 << 30 }],
            ..Default::default()
        }),
        agent_version: "test".into(),
    };
    tx.send(pb::WorkerMessage { epoch: 0, body: Some(Up::Register(register)) }).await.unwrap();
    let mut inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
    match inbound.message().await? {
        Some(pb::RegistryMessage { body: Some(Down::Registered(r)) }) => Ok((tx, r)),
        other => panic!("expected Registered, got {other:?}"),
    }
}

/// The status an Attach with `token` ends with.
async fn attach(endpoint: &str, worker: &str, token: &str) -> Status {
    use sllm_api::v1::attach_up::Msg;
    let mut client =
        pb::dispatch_client::DispatchClient::connect(endpoint.to_string()).await.unwrap();
    let (tx, rx) = mpsc::channel(4);
    let hello = pb::AttachHello {
        worker_id: worker.into(),
        epoch: 1,
        join_token: token.into(),
        run_id: "test".into(),
    };
    tx.send(pb::AttachUp { msg: Some(Msg::Hello(hello)) }).await.unwrap();
    let mut inbound = match client.attach(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(s) => return s,
    };
    loop {
        match inbound.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the attach stream ended without a status"),
            Err(s) => return s,
        }
    }
}

/// Redis commands run so far, except the ones this test itself sends to count them.
async fn commands(raw: &mut redis::aio::MultiplexedConnection) -> u64 {
    commandstats(raw)
        .await
        .unwrap()
        .into_iter()
        .filter(|(name, _)| name != "info" && name != "dbsize")
        .map(|(_, calls)| calls)
        .sum()
}

async fn dbsize(raw: &mut redis::aio::MultiplexedConnection) -> i64 {
    redis::cmd("DBSIZE").query_async(raw).await.unwrap()
}

#[tokio::test]
async fn expired_removed_and_legacy_tokens_are_refused_before_any_redis_call() {
    let redis = RedisServer::start().unwrap();
    let store = redis.store().await.unwrap();
    let (old, new) = (secret(OLD), secret(NEW));
    // The old secret has been removed: only the new one is configured.
    let only_new = JoinSecrets::new(vec![new.clone()]).unwrap();
    let (endpoint, _registry) = registry(store.clone(), only_new.clone(), false).await;
    let mut raw = redis.raw().await.unwrap();
    let (keys_before, commands_before) = (dbsize(&mut raw).await, commands(&mut raw).await);

    let now = service::join_token::now_unix_s();
    let expired_at = now - 60;
    let cases = [
        (new.token_expiring_at("w1", expired_at), "expired at"),
        (old.token_for("w1"), "any configured join secret"),
        (new.legacy_token_for("w1"), "--accept-legacy-join-tokens"),
        (new.token_for("w2"), "for node \"w2\""),
        (format!("sllm1.w1.{}.zz", now + 60), "malformed"),
        (String::new(), "malformed"),
    ];
    for (token, why) in &cases {
        let err = register(&endpoint, "w1", token).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{why}: {}", err.message());
        assert!(err.message().contains("join token"), "{}", err.message());
        assert!(err.message().contains(why), "{why}: {}", err.message());
    }
    // The expiry is named as a time an operator can read, not only as a number.
    let err = register(&endpoint, "w1", &cases[0].0).await.unwrap_err();
    let when = service::join_token::utc(expired_at);
    assert!(err.message().contains(&when), "{when} in {}", err.message());

    assert_eq!(commands(&mut raw).await, commands_before, "a refused token cost Redis a command");
    assert_eq!(dbsize(&mut raw).await, keys_before, "a refused token wrote to Redis");
    assert!(store.get_worker("w1").await.unwrap().is_none());

    // The same registry takes a current token, so the refusals above were the tokens' doing.
    let (_session, registered) = register(&endpoint, "w1", &new.token_for("w1")).await.unwrap();
    assert_eq!(registered.worker_id, "w1");
    assert!(store.get_worker("w1").await.unwrap().is_some());

    // Dispatch's Attach checks tokens the same way.
    let dispatch = sllm_integration_tests::DispatchReplica::start(store.clone(), "d", |c| {
        c.join_secrets = only_new.clone();
    })
    .await
    .unwrap();
    let err = attach(&dispatch.endpoint(), "w1", &new.token_expiring_at("w1", expired_at)).await;
    assert_eq!(err.code(), Code::Unauthenticated, "{}", err.message());
    assert!(err.message().contains("expired at"), "{}", err.message());
    let err = attach(&dispatch.endpoint(), "w1", &old.token_for("w1")).await;
    assert_eq!(err.code(), Code::Unauthenticated, "{}", err.message());
    assert!(err.message().contains("any configured join secret"), "{}", err.message());
    let err = attach(&dispatch.endpoint(), "w1", &new.legacy_token_for("w1")).await;
    assert_eq!(err.code(), Code::Unauthenticated, "{}", err.message());
}

#[tokio::test]
async fn legacy_tokens_join_only_with_the_flag() {
    let redis = RedisServer::start().unwrap();
    let store = redis.store().await.unwrap();
    let s = secret(NEW);
    let lenient = JoinSecrets::from(s.clone()).accept_legacy(true);
    let (endpoint, _registry) = registry(store.clone(), lenient, false).await;
    register(&endpoint, "w1", &s.legacy_token_for("w1")).await.unwrap();
    let err = register(&endpoint, "w2", &s.legacy_token_for("w1")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{}", err.message());
}

#[tokio::test]
async fn a_rotated_secret_joins_and_a_worker_takes_its_reissued_token_without_a_restart() {
    let redis = RedisServer::start().unwrap();
    let store = redis.store().await.unwrap();
    let (old, new) = (secret(OLD), secret(NEW));
    // Mid-rotation: the new secret is added (first: it mints), the old one still accepted.
    let both = JoinSecrets::new(vec![new.clone(), old.clone()]).unwrap();
    let (during, during_guard) = registry(store.clone(), both, true).await;
    // After rotation: the old secret removed.
    let only_new = JoinSecrets::new(vec![new.clone()]).unwrap();
    let (after, _after_guard) = registry(store.clone(), only_new, true).await;

    // A node given a token under the new secret joins.
    register(&during, "fresh", &new.token_for("fresh")).await.unwrap();
    register(&after, "fresh2", &new.token_for("fresh2")).await.unwrap();

    // A worker that joined with a token under the old secret, read from its token file.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, format!("{}\n", old.token_for("w1"))).unwrap();
    let mut w = SimWorker::start_with(
        vec![during.clone(), after.clone()],
        "w1",
        worker::SimConfig::default(),
        None,
        |c| c.join_token_file = Some(file.clone()),
    )
    .unwrap();
    let first = w.ready(0).await.unwrap();
    assert!(matches!(
        w.agent.state(),
        worker::AgentState::Ready { registry, .. } if registry == during
    ));
    let err = register(&after, "w9", &old.token_for("w9")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{}", err.message());

    // Its token is re-issued under the new secret, then the old secret goes away with the
    // replica that still held it: the worker moves on with the new token, never restarted.
    std::fs::write(&file, format!("{}\n", new.token_for("w1"))).unwrap();
    drop(during_guard);
    let second = w.ready(first).await.unwrap();
    assert!(second > first);
    assert!(matches!(
        w.agent.state(),
        worker::AgentState::Ready { registry, .. } if registry == after
    ));
}

fn private_file(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[tokio::test]
async fn keys_and_secrets_from_files_scopes_per_rpc_and_protected_introspection() {
    let redis = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("api-keys");
    private_file(
        &keys,
        &format!("# operators\n{ADMIN}:admin\n\n# applications\n{INFER}:inference\n"),
    );
    let secrets = dir.path().join("join-secrets");
    private_file(&secrets, &format!("# rotated in\n{NEW}\n{OLD}\n"));
    let (keys, secrets) = (keys.to_str().unwrap(), secrets.to_str().unwrap());
    let (serve, _) = Proc::sllm(
        &[
            "serve",
            "all",
            "--redis-url",
            &redis.url(),
            "--grpc-addr",
            "127.0.0.1:0",
            "--openai-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--api-keys-file",
            keys,
            "--join-secret-file",
            secrets,
            "--protect-introspection",
        ],
        &[],
        "metrics on",
    )
    .unwrap();
    let out = serve.output();
    let find = |p: &str| out.lines().find_map(|l| l.strip_prefix(p)).unwrap().trim().to_string();
    let grpc = format!("http://{}", find("sllm: serving gRPC on"));
    let metrics = find("sllm: metrics on");

    // The CLI mints a token from the same file; the worker needs only that token, in a file.
    let sllm = sllm_integration_tests::sllm_bin().unwrap();
    let sllm = sllm.to_str().unwrap();
    let (ok, token, err) =
        run(sllm, &["join-token", "--node-id", "w1", "--join-secret-file", secrets, "--ttl", "1h"])
            .await;
    assert!(ok, "{err}");
    assert!(token.starts_with("sllm1.w1."), "{token}");
    assert!(err.contains("expires at"), "{err}");
    // The file's first secret signed it.
    assert_eq!(JoinSecrets::from(secret(NEW)).verify("w1", token.trim()), Ok(()));
    let token_file = dir.path().join("token");
    private_file(&token_file, &token);
    let _worker = Proc::sllm(
        &[
            "worker",
            "--backend",
            "sim",
            "--registry",
            &grpc,
            "--node-id",
            "w1",
            "--join-token-file",
            token_file.to_str().unwrap(),
            "--time-scale",
            "0.01",
        ],
        &[],
        "worker(s) started",
    )
    .unwrap();

    let channel =
        tonic::transport::Endpoint::from_shared(grpc.clone()).unwrap().connect().await.unwrap();
    let mut models = pb::model_registry_client::ModelRegistryClient::new(channel.clone());
    let mut workers = pb::worker_registry_client::WorkerRegistryClient::new(channel.clone());
    let mut scaler = pb::scaler_client::ScalerClient::new(channel.clone());
    eventually(Duration::from_secs(10), "worker w1 joins", || {
        let mut workers = workers.clone();
        async move {
            let list = workers
                .list_workers(with_key(pb::ListWorkersRequest {}, Some(ADMIN)))
                .await
                .ok()?
                .into_inner();
            list.workers.iter().any(|w| w.worker_id == "w1").then_some(())
        }
    })
    .await
    .unwrap();

    let spec = pb::DeploymentSpec {
        model: "m".into(),
        backend: "sim".into(),
        num_gpus: 1,
        ..Default::default()
    };
    let deploy = |key| with_key(pb::DeployRequest { spec: Some(spec.clone()) }, key);
    let err = models.deploy(deploy(Some(INFER))).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    models.deploy(deploy(Some(ADMIN))).await.unwrap();

    // The inference scope: list and get models (what OpenAI's /v1/models shows), generate.
    models.list(with_key(pb::ListRequest {}, Some(INFER))).await.unwrap();
    models.get(with_key(pb::GetRequest { model: "m".into() }, Some(INFER))).await.unwrap();

    // Everything else needs admin: denied to the inference key, allowed to the admin key.
    let policy = pb::AutoScalingConfig {
        metric: "concurrency".into(),
        target: 1.0,
        min_instances: 0,
        max_instances: 2,
        keep_alive: 10,
    };
    let update = || pb::UpdateRequest {
        model: "m".into(),
        auto_scaling_config: Some(policy.clone()),
        expected_version: 0,
        ..Default::default()
    };
    // Each call: PERMISSION_DENIED with the inference key (naming admin), UNAUTHENTICATED
    // with none, and through with the admin key.
    macro_rules! admin_only {
        ($client:ident . $method:ident ( $req:expr )) => {{
            let what = stringify!($method);
            let err = $client.$method(with_key($req, Some(INFER))).await.unwrap_err();
            assert_eq!(err.code(), Code::PermissionDenied, "{what}: {}", err.message());
            assert!(err.message().contains("admin"), "{what}: {}", err.message());
            let err = $client.$method(with_key($req, None)).await.unwrap_err();
            assert_eq!(err.code(), Code::Unauthenticated, "{what}: {}", err.message());
            if let Err(e) = $client.$method(with_key($req, Some(ADMIN))).await {
                panic!("{what} with the admin key: {e:?}");
            }
        }};
    }
    admin_only!(models.update(update()));
    admin_only!(workers.list_workers(pb::ListWorkersRequest {}));
    admin_only!(workers.get_worker(pb::GetWorkerRequest { worker_id: "w1".into() }));
    admin_only!(scaler.get_scale_status(pb::GetScaleStatusRequest { model: "m".into() }));
    admin_only!(scaler.list_scale_status(pb::ListScaleStatusRequest {}));
    admin_only!(scaler.get_leader(pb::GetLeaderRequest {}));
    admin_only!(models.delete(pb::DeleteRequest { model: "m".into(), ..Default::default() }));

    // Reflection, protected: an admin key is needed to read the schema.
    {
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        let list = |key: Option<&str>| {
            let req = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let mut r = tonic::Request::new(tokio_stream::iter([req]));
            if let Some(k) = key {
                r.metadata_mut().insert("authorization", format!("Bearer {k}").parse().unwrap());
            }
            let mut client = ServerReflectionClient::new(channel.clone());
            async move {
                let mut stream = client.server_reflection_info(r).await?.into_inner();
                match stream.message().await?.and_then(|m| m.message_response) {
                    Some(MessageResponse::ListServicesResponse(l)) => {
                        Ok::<_, Status>(l.service.into_iter().map(|s| s.name).collect::<Vec<_>>())
                    }
                    other => panic!("expected a service list, got {other:?}"),
                }
            }
        };
        assert_eq!(list(None).await.unwrap_err().code(), Code::Unauthenticated);
        assert_eq!(list(Some(INFER)).await.unwrap_err().code(), Code::PermissionDenied);
        let names = list(Some(ADMIN)).await.unwrap();
        assert!(names.iter().any(|n| n == "sllm.v1.ModelRegistry"), "{names:?}");
    }

    // /metrics, protected: 401 without a key, 403 with an inference key, 200 with admin.
    let status = |key: Option<&str>| {
        let mut args = vec![
            "-s".to_string(),
            "-o".into(),
            "/dev/null".into(),
            "-w".into(),
            "%{http_code}".into(),
        ];
        if let Some(k) = key {
            args.extend(["-H".to_string(), format!("Authorization: Bearer {k}")]);
        }
        args.push(metrics.clone());
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run("curl", &args).await.1
        }
    };
    assert_eq!(status(None).await, "401");
    assert_eq!(status(Some(INFER)).await, "403");
    assert_eq!(status(Some(ADMIN)).await, "200");
    drop(serve);
}

#[tokio::test]
async fn unreadable_or_empty_credential_files_stop_the_start_with_the_flag_named() {
    let dir = tempfile::tempdir().unwrap();
    let sllm = sllm_integration_tests::sllm_bin().unwrap();
    let sllm = sllm.to_str().unwrap();
    let missing = dir.path().join("missing");
    let missing = missing.to_str().unwrap();
    let empty = dir.path().join("empty");
    private_file(&empty, "# nothing yet\n");
    let empty = empty.to_str().unwrap();
    for (args, flag) in [
        (
            vec!["join-token", "--node-id", "w1", "--join-secret-file", missing],
            "--join-secret-file",
        ),
        (vec!["join-token", "--node-id", "w1", "--join-secret-file", empty], "--join-secret-file"),
        (
            vec!["serve", "all", "--redis-url", "redis://127.0.0.1:1", "--api-keys-file", missing],
            "--api-keys-file",
        ),
        (
            vec![
                "worker",
                "--backend",
                "sim",
                "--registry",
                "http://127.0.0.1:1",
                "--node-id",
                "w1",
                "--join-token-file",
                empty,
            ],
            "--join-token-file",
        ),
    ] {
        let (ok, _, err) = run(sllm, &args).await;
        assert!(!ok, "{args:?} started");
        assert!(err.contains(flag), "{args:?}: {err}");
    }
}
