use std::time::{Duration, Instant};

use sllm_api::v1 as pb;
use tonic::Code;

use crate::*;

#[tokio::test]
async fn a_cold_request_waits_for_the_instance_and_shows_progress() {
    let c = Cluster::start().await;
    let mut sim = fast_sim();
    // 24 GiB from disk at 3 GiB/s = 8 s, scaled by 0.01: an 80 ms load.
    sim.checkpoints.insert("m".into(), (24 << 30, pb::CheckpointTier::Disk));
    let _w = c.worker("w1", sim).await;
    c.deploy("m", 0, 1).await;
    // Let the worker attach to the Dispatch replica (it learns of it from the registry).
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(c.store.model_instances("m").await.unwrap().is_empty(), "scaled to zero");

    let mut req = prompt("m", "wake up", 5);
    req.progress = true;
    let t = Instant::now();
    let out = generate(&c, req).await.unwrap();
    let took = t.elapsed();
    assert!(out.error.is_none(), "{:?}", out.error);
    assert_eq!(out.text, expected_text(7, "wake up", 5));
    let stages: Vec<i32> = out.progress.iter().map(|p| p.stage).collect();
    use pb::progress::Stage;
    assert_eq!(stages.first(), Some(&(Stage::Queued as i32)), "{:?}", out.progress);
    assert!(stages.contains(&(Stage::Starting as i32)), "{:?}", out.progress);
    assert!(stages.contains(&(Stage::Loading as i32)), "{:?}", out.progress);
    assert_eq!(stages.last(), Some(&(Stage::Routed as i32)), "{:?}", out.progress);
    let starting = out.progress.iter().find(|p| p.stage == Stage::Starting as i32).unwrap();
    assert_eq!(starting.worker_id, "w1");
    let usage = out.finished.unwrap().usage.unwrap();
    assert!(usage.queue_us >= 80_000, "held while loading: {usage:?}");
    assert!(took >= Duration::from_millis(80));
}

#[tokio::test]
async fn a_full_queue_is_refused_with_a_retry_hint() {
    let c = Cluster::start_with(|d| d.max_queue = 2).await;
    c.deploy("m", 0, 1).await; // no worker: nothing can start
    let mut client = c.dispatch.client().await.unwrap();
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut r = prompt("m", "x", 1);
        r.progress = true;
        let mut s = client.generate(r).await.unwrap().into_inner();
        // The first event says it is queued.
        assert!(s.message().await.unwrap().is_some());
        held.push(s);
    }
    let err = client.generate(prompt("m", "x", 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("retry"), "{}", err.message());
    let hint =
        err.metadata().get("retry-after-ms").unwrap().to_str().unwrap().parse::<u64>().unwrap();
    assert!(hint > 0);
    drop(held);
    // Once the held requests are gone, there is room again.
    sllm_integration_tests::eventually(Duration::from_secs(5), "room in the queue", || async {
        let mut r = prompt("m", "x", 1);
        r.timeout_ms = 50;
        match client.clone().generate(r).await {
            Ok(s) => Some(drain(s.into_inner()).await),
            Err(_) => None,
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_deadline_that_passes_while_held_ends_the_request() {
    let c = Cluster::start().await;
    c.deploy("m", 0, 1).await;
    let mut r = prompt("m", "x", 1);
    r.timeout_ms = 300;
    let t = Instant::now();
    let out = generate(&c, r).await.unwrap();
    let err = out.error.expect("deadline error");
    assert_eq!(err.code(), Code::DeadlineExceeded);
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert!(t.elapsed() < Duration::from_secs(3));
    // The gRPC deadline works the same way.
    let mut client = c.dispatch.client().await.unwrap();
    let mut req = tonic::Request::new(prompt("m", "x", 1));
    req.set_timeout(Duration::from_millis(200));
    match client.generate(req).await {
        Ok(s) => {
            let out = drain(s.into_inner()).await;
            assert_eq!(out.error.map(|e| e.code()), Some(Code::DeadlineExceeded));
        }
        Err(e) => assert_eq!(e.code(), Code::DeadlineExceeded),
    }
}
