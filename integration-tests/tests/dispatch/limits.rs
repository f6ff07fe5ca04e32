use std::time::Duration;

use kvstore::ratelimit::RateLimit;
use sllm_integration_tests::DispatchReplica;

use crate::*;

const ALPHA: &str = "alpha-key-0123456789";
const BETA: &str = "beta-key-0123456789";

fn limited(d: &mut dispatch::DispatchConfig) {
    d.rate_limit = Some(RateLimit { per_second: 0.5, burst: 3 });
    d.api_keys =
        service::auth::ApiKeys::parse(&format!("{ALPHA}:inference,{BETA}:inference")).unwrap();
}

async fn call(d: &DispatchReplica, key: &str) -> Result<Outcome, tonic::Status> {
    let mut client = d.client().await.unwrap();
    let mut req = tonic::Request::new(prompt("m", "hi", 4));
    req.metadata_mut().insert("authorization", format!("Bearer {key}").parse().unwrap());
    Ok(drain(client.generate(req).await?.into_inner()).await)
}

/// Each API key has one bucket, shared by every Dispatch replica; past it, gRPC callers get
/// RESOURCE_EXHAUSTED with a retry hint and HTTP callers 429 with Retry-After.
#[tokio::test]
async fn a_callers_rate_limit_is_shared_by_replicas_and_refused_with_a_retry_hint() {
    let c = Cluster::start_with(limited).await;
    let _w = c.worker("w1", fast_sim()).await;
    c.deploy("m", 1, 1).await;
    c.ready("m", 1).await;
    let d2 = DispatchReplica::start(c.store.clone(), "d2", limited).await.unwrap();

    for d in [&c.dispatch, &c.dispatch, &d2] {
        let out = call(d, ALPHA).await.unwrap();
        assert!(out.finished.is_some() && out.error.is_none(), "{out:?}");
    }
    let err = call(&d2, ALPHA).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("rate limit"), "{}", err.message());
    let hint: u64 =
        err.metadata().get("retry-after-ms").unwrap().to_str().unwrap().parse().unwrap();
    assert!(hint > 0 && hint <= 5000, "retry-after-ms {hint}");
    assert!(call(&c.dispatch, ALPHA).await.is_err(), "the other replica shares the bucket");
    // Another key has a bucket of its own.
    assert!(call(&c.dispatch, BETA).await.unwrap().finished.is_some());

    // The OpenAI API: 429 with Retry-After, in OpenAI's error shape.
    let o = tokio::process::Command::new("curl")
        .args(["-s", "-i", "-H", &format!("Authorization: Bearer {ALPHA}")])
        .args(["-H", "Content-Type: application/json", "-d", r#"{"model":"m","prompt":"hi"}"#])
        .arg(format!("{}/completions", c.dispatch.openai_base()))
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_lowercase();
    assert!(text.starts_with("http/1.1 429"), "{text}");
    assert!(text.contains("retry-after:") && text.contains("rate_limit_exceeded"), "{text}");

    // Tokens come back with time.
    tokio::time::sleep(Duration::from_millis(hint + 100)).await;
    assert!(call(&d2, ALPHA).await.unwrap().finished.is_some());
}
