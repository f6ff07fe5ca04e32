//! Redis stalls for longer than the registry's response timeout, but for less than a lease
//! (a fork, a slow disk, a CPU-starved host). The lease, not one timed-out call, decides
//! whether a worker is alive: no session ends, no worker is declared lost, and a join or a
//! `ready` that arrives during the stall is answered late rather than refused (a refusal sends
//! workers back to re-join, adding load to a Redis that is already slow).

use std::time::{Duration, Instant};

use kvstore::WorkerStatus;
use sllm_api::v1 as pb;
use sllm_api::v1::registry_message::Body as Down;
use sllm_api::v1::worker_message::Body as Up;
use sllm_integration_tests::{RedisServer, RegistryReplica, SimWorker};

use crate::*;

/// The registry's Redis response timeout in this test (the default is 2 s).
const RESPONSE_TIMEOUT: Duration = Duration::from_millis(200);
/// How long Redis stalls: many response timeouts, under a lease.
const STALL: Duration = Duration::from_millis(2200);
const STALL_LEASE: Duration = Duration::from_secs(3);
const STALL_HEARTBEAT: Duration = Duration::from_millis(300);

/// Heartbeats `tx` at `epoch` until the stream is gone, as an agent would.
fn heartbeat(tx: tokio::sync::mpsc::Sender<pb::WorkerMessage>, epoch: u64) {
    tokio::spawn(async move {
        for seq in 1.. {
            tokio::time::sleep(STALL_HEARTBEAT).await;
            let m = pb::WorkerMessage { epoch, body: Some(Up::Heartbeat(pb::Heartbeat { seq })) };
            if tx.send(m).await.is_err() {
                return;
            }
        }
    });
}

/// The next message that is not about Dispatch replicas.
async fn next_message(s: &mut RawSession) -> Result<Option<pb::RegistryMessage>, tonic::Status> {
    loop {
        match s.next().await? {
            Some(pb::RegistryMessage { body: Some(Down::Dispatchers(_)) }) => {}
            other => return Ok(other),
        }
    }
}

#[tokio::test]
async fn a_redis_stall_shorter_than_the_lease_ends_no_session_and_refuses_no_join() {
    let redis = RedisServer::start().unwrap();
    // The test's own view of Redis waits as long as it takes; the registry's gives up on a
    // call after RESPONSE_TIMEOUT.
    let store = redis
        .store_with(|c| {
            c.namespace = "stall".into();
            c.response_timeout = Duration::from_secs(10);
        })
        .await
        .unwrap();
    let registry_store = redis
        .store_with(|c| {
            c.namespace = "stall".into();
            c.response_timeout = RESPONSE_TIMEOUT;
        })
        .await
        .unwrap();
    let replica =
        RegistryReplica::start(registry_store, STALL_LEASE, STALL_HEARTBEAT).await.unwrap();
    let endpoint = replica.endpoint();

    // Four workers joined and heartbeating, and one that registered but has not said ready.
    let mut live = Vec::new();
    for i in 0..4 {
        let mut w =
            SimWorker::start(vec![endpoint.clone()], &format!("live-{i}"), fast_sim()).unwrap();
        assert_eq!(w.ready(0).await.unwrap(), 1);
        live.push(w);
    }
    let mut late_ready =
        raw_register(&endpoint, "late-ready", &token("late-ready"), "10.0.0.1").await.unwrap();
    heartbeat(late_ready.tx.clone(), late_ready.epoch);
    let late_ready_epoch = late_ready.epoch;

    // Redis stalls. Meanwhile the half-joined worker says ready, one more registers by hand
    // and two more agents start.
    redis.pause();
    let stalled_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(100)).await;
    late_ready.send(Up::Ready(pb::WorkerReady {})).await;
    let joiner = tokio::spawn({
        let endpoint = endpoint.clone();
        async move { raw_register(&endpoint, "joiner", &token("joiner"), "10.0.0.2").await }
    });
    let mut joining = Vec::new();
    for i in 0..2 {
        joining.push(
            SimWorker::start(vec![endpoint.clone()], &format!("joining-{i}"), fast_sim()).unwrap(),
        );
    }
    tokio::time::sleep(STALL.saturating_sub(stalled_at.elapsed())).await;
    redis.resume();
    let stalled = stalled_at.elapsed();
    assert!(stalled < STALL_LEASE, "Redis stalled for {stalled:?}");

    // The join made during the stall was answered, late, with a registration.
    let mut joiner = joiner.await.unwrap().unwrap_or_else(|s| {
        panic!("a join during the stall was refused: {:?} {}", s.code(), s.message())
    });
    heartbeat(joiner.tx.clone(), joiner.epoch);
    let joiner_epoch = joiner.epoch;
    joiner.send(Up::Ready(pb::WorkerReady {})).await;
    match next_message(&mut joiner).await {
        Ok(Some(pb::RegistryMessage { body: Some(Down::Placeable(_)) })) => {}
        other => panic!("joiner: expected Placeable, got {other:?}"),
    }
    // The ready sent during the stall was taken, late: the worker is placeable.
    match next_message(&mut late_ready).await {
        Ok(Some(pb::RegistryMessage { body: Some(Down::Placeable(_)) })) => {}
        other => panic!("ready sent during the stall: expected Placeable, got {other:?}"),
    }
    for w in &mut joining {
        w.ready(0).await.unwrap();
    }

    // A full lease after the stall (when any lease it let lapse would have been reaped), every
    // worker is still in the session it had, ready, and listed once.
    tokio::time::sleep(STALL_LEASE + STALL_LEASE / 2).await;
    for (i, w) in live.iter().enumerate() {
        let node = format!("live-{i}");
        let rec = store.get_worker(&node).await.unwrap().unwrap();
        assert_eq!(
            (rec.status, rec.epoch),
            (WorkerStatus::Ready, 1),
            "{node} kept its session through the stall (agent: {:?})",
            w.agent.state()
        );
        assert!(
            matches!(w.agent.state(), worker::AgentState::Ready { epoch: 1, .. }),
            "{node}: {:?}",
            w.agent.state()
        );
    }
    for (node, epoch) in [("late-ready", late_ready_epoch), ("joiner", joiner_epoch)] {
        let rec = store.get_worker(node).await.unwrap().unwrap();
        assert_eq!(
            (rec.status, rec.epoch),
            (WorkerStatus::Ready, epoch),
            "{node} is ready in the session it was answered with"
        );
    }
    for (i, w) in joining.iter().enumerate() {
        let node = format!("joining-{i}");
        let rec = store.get_worker(&node).await.unwrap().unwrap();
        let worker::AgentState::Ready { epoch, .. } = w.agent.state() else {
            panic!("{node}: {:?}", w.agent.state());
        };
        assert_eq!((rec.status, rec.epoch), (WorkerStatus::Ready, epoch), "{node}");
    }
    let workers = store.list_workers().await.unwrap();
    assert_eq!(workers.len(), 8, "{:?}", workers.iter().map(|w| &w.worker_id).collect::<Vec<_>>());
    assert!(workers.iter().all(|w| w.status == WorkerStatus::Ready));
    let bad = store.check_invariants().await.unwrap();
    assert!(bad.is_empty(), "{bad:?}");
}
