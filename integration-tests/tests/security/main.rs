//! API keys on every gRPC and HTTP surface, and TLS on every listener, from workers and to
//! Redis, with the real binary, CLI and curl; fenced and cheaply refused worker streams, and
//! the operator's sampler deciding over a client's `traceparent`.

#![allow(clippy::unwrap_used)]

mod credentials;
mod headers;
mod rogue;
mod streams;
mod tls;

use sllm_api::v1 as pb;
use sllm_integration_tests::{JOIN_SECRET, Proc, RedisServer};
use tonic::Code;

pub const ADMIN: &str = "admin-key-0123456789";
pub const INFER: &str = "infer-key-0123456789";

pub fn with_key<T>(msg: T, key: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(k) = key {
        r.metadata_mut().insert("authorization", format!("Bearer {k}").parse().unwrap());
    }
    r
}

pub async fn run(cmd: &str, args: &[&str]) -> (bool, String, String) {
    let o = tokio::process::Command::new(cmd).args(args).output().await.unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[tokio::test]
async fn api_keys_guard_grpc_http_and_the_cli_by_scope() {
    let redis = RedisServer::start().unwrap();
    let url = redis.url();
    let keys = format!("{ADMIN}:admin,{INFER}:inference");
    let (proc, _) = Proc::sllm(
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
            "off",
        ],
        &[("SLLM_JOIN_SECRET", JOIN_SECRET), ("SLLM_API_KEYS", &keys)],
        "openai api listening on",
    )
    .unwrap();
    let out = proc.output();
    let find = |p: &str| out.lines().find_map(|l| l.strip_prefix(p)).unwrap().trim().to_string();
    let grpc = format!("http://{}", find("sllm: serving gRPC on"));
    let http = format!("http://{}", find("sllm: openai api listening on"));

    let mut models =
        pb::model_registry_client::ModelRegistryClient::connect(grpc.clone()).await.unwrap();
    let err = models.list(with_key(pb::ListRequest {}, None)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("authorization: Bearer"), "{}", err.message());
    let err =
        models.list(with_key(pb::ListRequest {}, Some("not-a-key-at-all-000"))).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(!err.message().contains("not-a-key"), "the key is not echoed");
    models.list(with_key(pb::ListRequest {}, Some(INFER))).await.unwrap();

    let spec = pb::DeploymentSpec {
        model: "m".into(),
        backend: "sim".into(),
        num_gpus: 1,
        ..Default::default()
    };
    let err = models
        .deploy(with_key(pb::DeployRequest { spec: Some(spec.clone()) }, Some(INFER)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("admin"), "{}", err.message());
    models.deploy(with_key(pb::DeployRequest { spec: Some(spec) }, Some(ADMIN))).await.unwrap();

    // Health answers without a key (load balancers probe it).
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        tonic::transport::Endpoint::from_shared(grpc.clone()).unwrap().connect().await.unwrap(),
    );
    health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();

    // The CLI sends --api-key (or SLLM_API_KEY).
    let sllm = sllm_integration_tests::sllm_bin().unwrap();
    let sllm = sllm.to_str().unwrap();
    let (ok, _, err) = run(sllm, &["models", "--endpoint", &grpc]).await;
    assert!(!ok && err.contains("Unauthenticated"), "{err}");
    let (ok, out, err) = run(sllm, &["models", "--endpoint", &grpc, "--api-key", INFER]).await;
    assert!(ok && out.contains("m "), "{out}{err}");
    let (ok, _, err) = run(sllm, &["deploy", "n", "--endpoint", &grpc, "--api-key", INFER]).await;
    assert!(!ok && err.contains("PermissionDenied"), "{err}");
    // Worker addresses and inventory, and the Scaler's state, are for operators (admin).
    for cmd in [&["workers"][..], &["status", "--detail"], &["status", "m"]] {
        let args = |key| [cmd, &["--endpoint", &grpc, "--api-key", key]].concat();
        let (ok, _, err) = run(sllm, &args(INFER)).await;
        assert!(!ok && err.contains("PermissionDenied"), "{cmd:?}: {err}");
        let (ok, out, err) = run(sllm, &args(ADMIN)).await;
        assert!(ok, "{cmd:?}: {out}{err}");
    }
    // The model list ServerlessLLM's `sllm status` prints is what /v1/models shows anyone.
    let (ok, out, err) = run(sllm, &["status", "--endpoint", &grpc, "--api-key", INFER]).await;
    assert!(ok && out.contains("- m"), "{out}{err}");

    // The Python SDK sends api_key.
    let script = format!(
        "import grpc, sllm\n\
         print(len(sllm.Client('{grpc}', api_key='{INFER}').models()))\n\
         try:\n    sllm.Client('{grpc}').models()\nexcept sllm.SllmError as e:\n    print(e.code.name)\n"
    );
    let o = sllm_integration_tests::python_sdk(&script).await.unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(out.trim(), "1\nUNAUTHENTICATED", "{out}{}", String::from_utf8_lossy(&o.stderr));

    // The OpenAI API: 401 without a valid key, in OpenAI's error shape.
    let (_, body, _) =
        run("curl", &["-s", "-w", "\n%{http_code}", &format!("{http}/v1/models")]).await;
    assert!(body.ends_with("401") && body.contains("invalid_api_key"), "{body}");
    let (_, body, _) = run(
        "curl",
        &[
            "-s",
            "-w",
            "\n%{http_code}",
            "-H",
            &format!("Authorization: Bearer {INFER}"),
            &format!("{http}/v1/models"),
        ],
    )
    .await;
    assert!(body.ends_with("200") && body.contains("\"m\""), "{body}");
    let (_, body, _) = run(
        "curl",
        &[
            "-s",
            "-w",
            "\n%{http_code}",
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"{"model":"m","prompt":"x"}"#,
            &format!("{http}/v1/completions"),
        ],
    )
    .await;
    assert!(body.ends_with("401"), "{body}");

    // ServerlessLLM's admin API on the same port needs the admin scope; embeddings and one
    // model's card need inference.
    let post = |path: &'static str, key: Option<&'static str>, body: &'static str| {
        let http = http.clone();
        async move {
            let mut args =
                vec!["-s", "-w", "\n%{http_code}", "-H", "Content-Type: application/json"];
            let auth = key.map(|k| format!("Authorization: Bearer {k}"));
            if let Some(a) = &auth {
                args.extend(["-H", a.as_str()]);
            }
            let url = format!("{http}{path}");
            args.extend(["-d", body, url.as_str()]);
            run("curl", &args).await.1
        }
    };
    let register = r#"{"model": "r", "backend": "sim"}"#;
    assert!(post("/register", None, register).await.ends_with("401"));
    let body = post("/register", Some(INFER), register).await;
    assert!(body.ends_with("403") && body.contains("admin"), "{body}");
    for path in ["/update", "/delete"] {
        let body = post(path, Some(INFER), r#"{"model": "m"}"#).await;
        assert!(body.ends_with("403"), "{path}: {body}");
    }
    let body = post("/register", Some(ADMIN), register).await;
    assert!(body.ends_with("200") && body.contains("\"ok\""), "{body}");
    assert!(post("/v1/embeddings", None, r#"{"model": "r", "input": "x"}"#).await.ends_with("401"));
    assert!(post("/v1/responses", None, r#"{"model": "r", "input": "x"}"#).await.ends_with("401"));
    assert!(post("/tokenize", None, r#"{"model": "r", "prompt": "x"}"#).await.ends_with("401"));
    assert!(post("/detokenize", None, r#"{"model": "r", "tokens": [1]}"#).await.ends_with("401"));
    let rerank = r#"{"model": "r", "query": "q", "documents": ["a"]}"#;
    assert!(post("/v1/rerank", None, rerank).await.ends_with("401"));
    assert!(post("/rerank", None, rerank).await.ends_with("401"));
    let (_, body, _) = run(
        "curl",
        &[
            "-s",
            "-w",
            "\n%{http_code}",
            "-H",
            &format!("Authorization: Bearer {INFER}"),
            &format!("{http}/v1/models/m"),
        ],
    )
    .await;
    assert!(body.ends_with("200") && body.contains("\"id\":\"m\""), "{body}");
    drop(proc);
}
