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

/// The real `sllm serve all` with a worker as fast as it can be, and 64 clients that read
/// nothing of 32,768-token answers: the control plane's memory stays flat (nothing on the
/// path buffers what the clients do not read), and each client still gets its whole answer
/// once it reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_answers_leave_the_control_planes_memory_flat() {
    use sllm_integration_tests::{JOIN_SECRET, Proc};
    const STREAMS: usize = 64;
    const TOKENS: u32 = 32_768;
    let redis = sllm_integration_tests::RedisServer::start().unwrap();
    let store = redis.store_with(|c| c.namespace = "sllm".into()).await.unwrap();
    let (serve, grpc, _) = sllm_integration_tests::serve_all(&redis.url()).unwrap();
    let grpc = format!("http://{grpc}");
    let _worker = Proc::sllm(
        &[
            "worker",
            "--backend",
            "sim",
            "--registry",
            &grpc,
            "--node-id",
            "w1",
            "--address",
            "10.0.0.1",
            "--time-scale",
            "0.01",
            "--decode-ms",
            "0",
        ],
        &[("SLLM_JOIN_SECRET", JOIN_SECRET)],
        "worker(s) started",
    )
    .unwrap();
    store.create_deployment(&sllm_integration_tests::sim_deployment("m", 1, 1)).await.unwrap();
    sllm_integration_tests::eventually(Duration::from_secs(20), "instance ready", || async {
        let all = store.model_instances("m").await.unwrap();
        all.iter().any(|i| i.status == kvstore::InstanceStatus::Ready).then_some(())
    })
    .await
    .unwrap();

    // One connection, each stream at HTTP/2's default window (what a stream leaves unread
    // holds its share of the connection's window, which has room for them all).
    let channel = tonic::transport::Endpoint::from_shared(grpc)
        .unwrap()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(16 << 20)
        .connect()
        .await
        .unwrap();
    let client = pb::dispatch_client::DispatchClient::new(channel);
    // The baseline: as many answers at once, read as fast as they come.
    let read = (0..STREAMS).map(|i| {
        let mut c = client.clone();
        async move {
            let s = c.generate(prompt("m", &format!("w{i}"), TOKENS)).await.unwrap();
            let out = drain(s.into_inner()).await;
            assert!(out.error.is_none(), "{:?}", out.error);
        }
    });
    futures::future::join_all(read).await;
    let before = serve.rss_kib().unwrap();

    let mut unread = Vec::new();
    for i in 0..STREAMS {
        let mut c = client.clone();
        let mut s = c.generate(prompt("m", &format!("p{i}"), TOKENS)).await.unwrap().into_inner();
        // Started: its first chunk is here; the rest is left unread.
        let first = s.message().await.unwrap().unwrap();
        unread.push((first, s));
    }

    // Unread and unpaused, the worker would finish every answer in well under this.
    let mut peak = before;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(serve.rss_kib().unwrap());
    }
    let payload_kib: u64 =
        (0..STREAMS).map(|i| expected_text(7, &format!("p{i}"), TOKENS).len() as u64).sum::<u64>()
            / 1024;
    let grown = peak.saturating_sub(before);
    eprintln!(
        "control plane RSS {before} KiB, peak {peak} KiB with {STREAMS} unread answers of \
         {payload_kib} KiB in all"
    );
    assert!(
        // Measured here: 0.5-2 MiB (a loaded machine adds some); with a window of 4,096
        // chunks, 7.6 MiB; with no flow control at all, more than the whole payload.
        grown < 5 * 1024 && grown < payload_kib / 2,
        "RSS grew {grown} KiB while {payload_kib} KiB of answers went unread"
    );

    // Reading again, every client gets its whole answer.
    let reads = unread.into_iter().enumerate().map(|(i, (first, s))| async move {
        let mut rest = drain(s).await;
        assert!(rest.error.is_none(), "{:?}", rest.error);
        let Some(pb::generate_event::Event::Chunk(c)) = first.event else { panic!("{first:?}") };
        rest.text.insert_str(0, &c.text);
        assert_eq!(rest.text, expected_text(7, &format!("p{i}"), TOKENS));
    });
    futures::future::join_all(reads).await;
}
