use std::time::Duration;

use sllm_api::v1 as pb;
use tonic::Code;

use crate::*;

#[tokio::test]
async fn a_worker_failing_before_the_first_token_is_retried_invisibly() {
    let c = Cluster::start().await;
    let mut bad = fast_sim();
    bad.crash_after_tokens = Some(1); // dies producing its first token
    // The only instance is on the bad worker; the good one joins afterwards.
    let _bad = c.worker("w-bad", bad).await;
    c.deploy("m", 1, 1).await;
    c.ready("m", 1).await;
    let _good = c.worker("w-good", fast_sim()).await;
    tokio::time::sleep(Duration::from_millis(800)).await; // both attached
    let out = generate(&c, prompt("m", "retry me", 6)).await.unwrap();
    assert!(out.error.is_none(), "the client sees a normal answer: {:?}", out.error);
    assert_eq!(out.text, expected_text(7, "retry me", 6));
    let usage = out.finished.unwrap().usage.unwrap();
    let served_by = c.store.get_instance(&usage.instance_id).await.unwrap().unwrap();
    assert_eq!(served_by.worker_id, "w-good", "served by the replacement on the good worker");
}

/// With moves off (`max_migrations` 0), a stream whose worker fails after tokens ends with
/// UNAVAILABLE naming what was delivered ([`crate::migration`] has the default).
#[tokio::test]
async fn a_worker_failing_mid_stream_ends_the_stream_with_unavailable() {
    let c = Cluster::start_with(|d| d.max_migrations = 0).await;
    let mut sim = fast_sim();
    sim.crash_after_tokens = Some(5);
    let _w = c.worker("w1", sim).await;
    c.deploy("m", 1, 1).await;
    c.ready("m", 1).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let out = generate(&c, prompt("m", "crash", 20)).await.unwrap();
    assert_eq!(out.tokens, 4);
    let err = out.error.expect("an error after the tokens");
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("4 tokens"), "{}", err.message());
}

#[tokio::test]
async fn a_cancelled_request_stops_generating_on_the_worker() {
    let c = Cluster::start().await;
    let mut sim = fast_sim();
    sim.decode_per_token = Duration::from_secs(2); // 20 ms per token after scaling
    let w = c.worker("w1", sim).await;
    c.deploy("m", 1, 1).await;
    c.ready("m", 1).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut client = c.dispatch.client().await.unwrap();
    let mut s = client.generate(prompt("m", "long", 10_000)).await.unwrap().into_inner();
    for _ in 0..2 {
        assert!(matches!(
            s.message().await.unwrap(),
            Some(pb::GenerateEvent { event: Some(pb::generate_event::Event::Chunk(_)) })
        ));
    }
    assert_eq!(w.backend.requests_running(), 1);
    drop(s);
    drop(client);
    sllm_integration_tests::eventually(
        Duration::from_secs(3),
        "generation stopped on the worker",
        || async { (w.backend.requests_running() == 0).then_some(()) },
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_worker_killed_before_the_first_token_is_retried_elsewhere() {
    let c = Cluster::start().await;
    let mut slow = fast_sim();
    slow.prefill_per_token = Duration::from_secs(10); // 100 ms per prompt token after scaling
    let doomed = c.worker("w-doomed", slow).await;
    c.deploy("m", 1, 1).await;
    c.ready("m", 1).await;
    let _spare = c.worker("w-spare", fast_sim()).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut client = c.dispatch.client().await.unwrap();
    let stream =
        client.generate(prompt("m", "one two three four five", 4)).await.unwrap().into_inner();
    // The request is in prefill on the doomed worker when its agent dies.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(doomed.backend.requests_running(), 1, "the request went to the doomed worker");
    drop(doomed);
    let out = drain(stream).await;
    assert!(out.error.is_none(), "the client sees a normal answer: {:?}", out.error);
    assert_eq!(out.text, expected_text(7, "one two three four five", 4));
    let usage = out.finished.unwrap().usage.unwrap();
    assert_eq!(
        c.store.get_instance(&usage.instance_id).await.unwrap().unwrap().worker_id,
        "w-spare"
    );
}

#[tokio::test]
async fn a_worker_killed_mid_stream_ends_the_stream_with_unavailable() {
    let c = Cluster::start_with(|d| d.max_migrations = 0).await;
    let mut sim = fast_sim();
    sim.decode_per_token = Duration::from_secs(2); // 20 ms per token after scaling
    let w = c.worker("w1", sim).await;
    c.deploy("m", 1, 1).await;
    c.ready("m", 1).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut client = c.dispatch.client().await.unwrap();
    let mut s = client.generate(prompt("m", "long", 1000)).await.unwrap().into_inner();
    let mut got = 0;
    while got < 3 {
        if let Some(pb::GenerateEvent { event: Some(pb::generate_event::Event::Chunk(ch)) }) =
            s.message().await.unwrap()
        {
            got += ch.tokens;
        }
    }
    drop(w);
    let rest = drain(s).await;
    let err = rest.error.expect("the stream ends with an error");
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("tokens were delivered"), "{}", err.message());
}

/// Redis goes away for three seconds: warm requests keep flowing from Dispatch's memory, the
/// worker is not declared lost when it returns, and the control plane works again after.
#[tokio::test]
async fn warm_requests_flow_through_a_redis_outage_and_nothing_is_lost() {
    let c = Cluster::start().await;
    let _w = c.worker("w1", fast_sim()).await;
    c.deploy("m", 1, 1).await;
    c.ready("m", 1).await;
    sllm_integration_tests::eventually(Duration::from_secs(10), "served", || async {
        generate(&c, prompt("m", "before", 2)).await.ok().filter(|o| o.finished.is_some())
    })
    .await
    .unwrap();

    c.redis.pause();
    let start = std::time::Instant::now();
    let mut served = 0;
    while start.elapsed() < Duration::from_secs(3) {
        let out = generate(&c, prompt("m", "during", 3)).await.unwrap();
        assert!(out.error.is_none(), "a warm request failed during the outage: {:?}", out.error);
        assert_eq!(out.tokens, 3);
        served += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.redis.resume();
    assert!(served >= 10, "{served}");

    // Two leases later the worker is still the same ready worker (not lost and re-joined).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let w = c.store.get_worker("w1").await.unwrap().unwrap();
    assert_eq!(
        (w.status, w.epoch),
        (kvstore::WorkerStatus::Ready, 1),
        "the outage cost the worker nothing"
    );
    // And the control plane acts again: a new model scales from zero.
    c.deploy("after", 0, 1).await;
    let out = generate(&c, prompt("after", "x", 2)).await.unwrap();
    assert!(out.error.is_none() && out.tokens == 2, "{out:?}");
}
