//! TLS everywhere: a Redis that speaks only TLS and verifies clients, `sllm serve` with TLS and
//! client-certificate verification on gRPC, the OpenAI API and /metrics, a worker that joins and
//! attaches over TLS, and the CLI and curl as clients, with and without certificates.

use sllm_integration_tests::{JOIN_SECRET, Proc, RedisServer, TestPki};

use crate::run;

#[tokio::test]
async fn tls_on_every_listener_from_workers_and_to_redis() {
    let pki = TestPki::generate().unwrap();
    let (ca, cert, key) = (pki.path("ca.pem"), pki.path("client.pem"), pki.path("client.key"));
    let redis_port =
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let _redis = RedisServer::start_with(&[
        "--tls-port",
        &redis_port.to_string(),
        "--tls-cert-file",
        &pki.path("server.pem"),
        "--tls-key-file",
        &pki.path("server.key"),
        "--tls-ca-cert-file",
        &ca,
    ])
    .unwrap();
    let redis_url = format!("rediss://127.0.0.1:{redis_port}");

    // Without a client certificate, Redis (tls-auth-clients yes) turns the control plane away.
    let refused = Proc::sllm(
        &["serve", "model-registry", "--redis-url", &redis_url, "--redis-ca", &ca],
        &[("SLLM_GRPC_ADDR", "127.0.0.1:0"), ("SLLM_METRICS_ADDR", "off")],
        "serving gRPC on",
    );
    assert!(refused.is_err(), "served without a Redis client certificate");

    let (serve, _) = Proc::sllm(
        &[
            "serve",
            "all",
            "--redis-url",
            &redis_url,
            "--redis-ca",
            &ca,
            "--redis-cert",
            &cert,
            "--redis-key",
            &key,
            "--tls-cert",
            &pki.path("server.pem"),
            "--tls-key",
            &pki.path("server.key"),
            "--tls-client-ca",
            &ca,
            "--grpc-addr",
            "127.0.0.1:0",
            "--openai-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ],
        &[("SLLM_JOIN_SECRET", JOIN_SECRET)],
        "metrics on",
    )
    .unwrap();
    let out = serve.output();
    let find = |p: &str| out.lines().find_map(|l| l.strip_prefix(p)).unwrap().trim().to_string();
    let grpc = find("sllm: serving gRPC on");
    let http = find("sllm: openai api listening on");
    let metrics = find("sllm: metrics on").replace("http://", "https://");
    let endpoint = format!("https://{grpc}");

    let registry = endpoint.clone();
    let _worker = Proc::sllm(
        &[
            "worker",
            "--backend",
            "sim",
            "--registry",
            &registry,
            "--node-id",
            "w1",
            "--address",
            "sim-w1",
            "--time-scale",
            "0.01",
            "--tls-ca",
            &ca,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ],
        &[("SLLM_JOIN_SECRET", JOIN_SECRET)],
        "worker(s) started",
    )
    .unwrap();

    let sllm = sllm_integration_tests::sllm_bin().unwrap();
    let sllm = sllm.to_str().unwrap();
    let tls = ["--endpoint", &endpoint, "--tls-ca", &ca, "--tls-cert", &cert, "--tls-key", &key];
    let with = |args: &[&'static str]| -> Vec<String> {
        args.iter().map(|s| s.to_string()).chain(tls.iter().map(|s| s.to_string())).collect()
    };
    let call = |args: Vec<String>| async move {
        run(sllm, &args.iter().map(String::as_str).collect::<Vec<_>>()).await
    };
    let (ok, out, err) =
        call(with(&["deploy", "m", "--backend", "sim", "--min", "1", "--wait", "--timeout", "30"]))
            .await;
    assert!(ok, "deploy over TLS: {out}{err}");
    let (ok, out, err) = call(with(&["generate", "m", "hello", "--max-tokens", "8"])).await;
    assert!(ok && out.split_whitespace().count() >= 8, "generate over TLS: {out}{err}");

    // The Python SDK over mutual TLS.
    let script = format!(
        "import sllm\n\
         c = sllm.Client('{endpoint}', tls_ca='{ca}', tls_cert='{cert}', tls_key='{key}')\n\
         print(c.complete('m', 'hello', max_tokens=4))\n"
    );
    let o = sllm_integration_tests::python_sdk(&script).await.unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && out.split_whitespace().count() >= 4,
        "SDK over TLS: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // No client certificate, or no TLS at all: refused.
    let (ok, _, err) = run(sllm, &["models", "--endpoint", &endpoint, "--tls-ca", &ca]).await;
    assert!(!ok, "served a client without a certificate: {err}");
    let (ok, _, _) = run(sllm, &["models", "--endpoint", &format!("http://{grpc}")]).await;
    assert!(!ok, "served plain text on a TLS port");

    // The OpenAI API and /metrics: HTTPS, client certificate required.
    let models = format!("https://{http}/v1/models");
    let (ok, body, err) =
        run("curl", &["-sS", "--cacert", &ca, "--cert", &cert, "--key", &key, &models]).await;
    assert!(ok && body.contains("\"m\""), "{body}{err}");
    let (ok, _, _) = run("curl", &["-sS", "--cacert", &ca, &models]).await;
    assert!(!ok, "the OpenAI API served a client without a certificate");
    let (ok, _, _) = run("curl", &["-sS", &format!("http://{http}/v1/models")]).await;
    assert!(!ok, "the OpenAI API answered plain HTTP on its TLS port");
    let (ok, body, err) =
        run("curl", &["-sS", "--cacert", &ca, "--cert", &cert, "--key", &key, &metrics]).await;
    assert!(ok && body.contains("sllm_dispatch_requests_total"), "{body}{err}");
}
