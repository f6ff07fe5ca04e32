//! Flow control and cancels on the Attach stream: a client that stops reading stops its
//! worker (and nobody else), cancels always arrive, and a worker the registry declares lost
//! loses its requests that had no output yet at once.

use std::time::{Duration, Instant};

use sllm_api::v1 as pb;

use crate::*;

/// A client that stops reading a 300,000-token answer pauses its generation on the worker,
/// while another request on the same worker (the same Attach stream) runs to its end; once
/// the client reads again, it gets the whole answer.
#[tokio::test]
async fn a_client_that_stops_reading_pauses_its_worker_and_no_one_else() {
    const N: u32 = 300_000;
    let c = Cluster::start_with(|d| d.max_tokens_limit = N).await;
    let mut sim = fast_sim();
    // As fast as it can: unread, the whole answer would be generated within a second.
    sim.decode_per_token = Duration::ZERO;
    let w = c.worker("w1", sim).await;
    c.deploy("m", 1, 1).await;
    c.ready("m", 1).await;
    // HTTP/2's own windows at their protocol default (hyper's client takes 2 MiB a stream):
    // past those 64 KiB, what the client does not read stays wherever sllm keeps it.
    let channel = tonic::transport::Endpoint::from_shared(c.dispatch.endpoint())
        .unwrap()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .unwrap();
    let mut client = pb::dispatch_client::DispatchClient::new(channel);
    let mut slow = client.generate(prompt("m", "slow reader", N)).await.unwrap().into_inner();
    let first = slow.message().await.unwrap().unwrap();
    assert!(matches!(first.event, Some(pb::generate_event::Event::Chunk(_))), "{first:?}");

    // Meanwhile another request on the same worker is served in full.
    let t = Instant::now();
    let other = generate(&c, prompt("m", "other", 200)).await.unwrap();
    assert!(other.error.is_none(), "{:?}", other.error);
    assert_eq!(other.text, expected_text(7, "other", 200));
    assert!(t.elapsed() < Duration::from_secs(2), "not stalled: {:?}", t.elapsed());

    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(w.backend.requests_running(), 1, "the unread request is paused, not finished");

    let mut rest = drain(slow).await;
    assert!(rest.error.is_none(), "{:?}", rest.error);
    let mut text = match first.event {
        Some(pb::generate_event::Event::Chunk(c)) => c.text,
        _ => unreachable!(),
    };
    text.push_str(&rest.text);
    rest.text = text;
    assert_eq!(rest.text, expected_text(7, "slow reader", N));
    assert_eq!(rest.finished.unwrap().usage.unwrap().completion_tokens, N);
}

/// Hundreds of long requests abandoned at once all stop on the worker.
#[tokio::test]
async fn every_abandoned_request_stops_at_the_worker() {
    let c = Cluster::start().await;
    let mut sim = fast_sim();
    sim.decode_per_token = Duration::from_secs(1); // 10 ms a token: 2,000 tokens take 20 s
    let w = c.worker("w1", sim).await;
    c.deploy("m", 1, 1).await;
    c.ready("m", 1).await;
    let client = c.dispatch.client().await.unwrap();
    let mut streams = Vec::new();
    for i in 0..200 {
        let mut client = client.clone();
        streams.push(client.generate(prompt("m", &format!("p{i}"), 2000)).await.unwrap());
    }
    sllm_integration_tests::eventually(Duration::from_secs(5), "all running", || async {
        (w.backend.requests_running() == 200).then_some(())
    })
    .await
    .unwrap();
    drop(streams);
    sllm_integration_tests::eventually(Duration::from_secs(2), "all stopped", || async {
        (w.backend.requests_running() == 0).then_some(())
    })
    .await
    .unwrap();
}

/// When the registry declares a worker lost, a request on it that had no output yet goes to
/// another instance at once instead of waiting for the dead stream to time out.
#[tokio::test]
async fn a_request_on_a_worker_declared_lost_completes_elsewhere_at_once() {
    let c = Cluster::start().await;
    let mut slow = fast_sim();
    // 50 s of prefill for this prompt: the request would sit on w1 for ages.
    slow.prefill_per_token = Duration::from_secs(25);
    // Its one GPU stays taken by the instance it still runs: the replacement goes to w2.
    slow.gpus = 1;
    let w1 = c.worker("w1", slow).await;
    c.deploy("m", 1, 1).await;
    c.ready("m", 1).await;
    let _w2 = c.worker("w2", fast_sim()).await;
    let mut client = c.dispatch.client().await.unwrap();
    let stream = client.generate(prompt("m", "two words", 5)).await.unwrap().into_inner();
    let out = tokio::spawn(drain(stream));
    sllm_integration_tests::eventually(Duration::from_secs(3), "running on w1", || async {
        (w1.backend.requests_running() == 1).then_some(())
    })
    .await
    .unwrap();
    let epoch = c.store.get_worker("w1").await.unwrap().unwrap().epoch;
    let t = Instant::now();
    c.store
        .worker_lost("w1", epoch, kvstore::LostMode::Dropped, "lease expired (test)")
        .await
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(5), out).await.unwrap().unwrap();
    assert!(out.error.is_none(), "{:?}", out.error);
    assert_eq!(out.text, expected_text(7, "two words", 5));
    let usage = out.finished.unwrap().usage.unwrap();
    let instance = c.store.get_instance(&usage.instance_id).await.unwrap().unwrap();
    assert_eq!(instance.worker_id, "w2", "served on the survivor");
    assert!(t.elapsed() < Duration::from_secs(3), "failed over in {:?}", t.elapsed());
    drop(w1);
}
