use std::time::Duration;

use kvstore::{EventBatch, WorkerStatus};
use sllm_integration_tests::{RedisServer, RegistryReplica, SimWorker, eventually};
use tonic::transport::Endpoint;

/// 1,000 simulated workers join one replica and heartbeat at 1 Hz for 30 s; none is ever
/// declared lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_workers_heartbeat_for_30s_and_none_is_falsely_lost() {
    const WORKERS: usize = 1000;
    let redis = RedisServer::start().unwrap();
    let store = redis.store().await.unwrap();
    let replica =
        RegistryReplica::start(store.clone(), Duration::from_secs(3), Duration::from_secs(1))
            .await
            .unwrap();
    let start = store.event_position().await.unwrap();
    // Simulated hosts share a few HTTP/2 connections, as one agent process would.
    let channels: Vec<_> = (0..10)
        .map(|_| {
            Endpoint::from_shared(replica.endpoint()).unwrap().tcp_nodelay(true).connect_lazy()
        })
        .collect();
    let mut workers = Vec::with_capacity(WORKERS);
    for i in 0..WORKERS {
        let ch = channels[i % channels.len()].clone();
        workers.push(
            SimWorker::start_with(
                vec![replica.endpoint()],
                &format!("sim-{i}"),
                worker::SimConfig::default(),
                Some(ch),
                |_| {},
            )
            .unwrap(),
        );
    }
    eventually(Duration::from_secs(30), "all workers ready", || async {
        let ready = store
            .list_workers()
            .await
            .unwrap()
            .iter()
            .filter(|w| w.status == WorkerStatus::Ready)
            .count();
        (ready == WORKERS).then_some(())
    })
    .await
    .unwrap();

    tokio::time::sleep(Duration::from_secs(30)).await;

    let all = store.list_workers().await.unwrap();
    assert_eq!(all.len(), WORKERS);
    for w in &all {
        assert_eq!((w.status, w.epoch), (WorkerStatus::Ready, 1), "{} was disturbed", w.worker_id);
    }
    let mut reader = store.event_reader(start);
    let mut lost = Vec::new();
    loop {
        match reader.next_batch(Duration::ZERO, 10_000).await.unwrap() {
            EventBatch::Events(e) if e.is_empty() => break,
            EventBatch::Events(e) => lost.extend(e.into_iter().filter(|e| e.kind == "worker.lost")),
            EventBatch::FellBehind { .. } => panic!("event stream trimmed during the test"),
        }
    }
    assert!(lost.is_empty(), "workers falsely lost: {lost:?}");
    drop(workers);
}
