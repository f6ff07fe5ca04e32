use std::time::Duration;

use kvstore::WorkerStatus;
use sllm_api::v1 as pb;
use sllm_api::v1::worker_message::Body as Up;
use sllm_integration_tests::{SimWorker, eventually};
use tonic::Code;

use crate::*;

#[tokio::test]
async fn a_worker_joins_reports_its_inventory_and_becomes_ready() {
    let (_redis, store, replica) = cluster().await;
    let mut sim = fast_sim();
    sim.checkpoints
        .insert("facebook/opt-1.3b".into(), (2_600_000_000, pb::CheckpointTier::HostMemory));
    let mut w = SimWorker::start(vec![replica.endpoint()], "gpu-1", sim).unwrap();
    assert_eq!(w.ready(0).await.unwrap(), 1);

    let mut client = replica.client().await.unwrap();
    let workers =
        client.list_workers(pb::ListWorkersRequest {}).await.unwrap().into_inner().workers;
    assert_eq!(workers.len(), 1);
    let got = &workers[0];
    assert_eq!(got.worker_id, "gpu-1");
    assert_eq!(got.state, pb::WorkerState::Ready as i32);
    assert_eq!(got.free_gpus, [0, 1, 2, 3]);
    assert_eq!(got.address, "sim-gpu-1");
    assert_eq!(got.checkpoints.len(), 1);
    assert_eq!(got.checkpoints[0].tier, pb::CheckpointTier::HostMemory as i32);
    assert!(got.lease_deadline_unix_ms > 0);

    let err =
        client.get_worker(pb::GetWorkerRequest { worker_id: "nobody".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err =
        client.get_worker(pb::GetWorkerRequest { worker_id: "a:b".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("worker_id"), "{}", err.message());

    // Heartbeats keep it alive well past its lease.
    tokio::time::sleep(LEASE * 2).await;
    let rec = store.get_worker("gpu-1").await.unwrap().unwrap();
    assert_eq!((rec.status, rec.epoch), (WorkerStatus::Ready, 1));
}

#[tokio::test]
async fn a_worker_stays_unplaceable_until_it_says_ready() {
    let (_redis, store, replica) = cluster().await;
    let s =
        RawSession::register(&replica.endpoint(), "w1", &token("w1"), "10.0.0.1").await.unwrap();
    let rec = store.get_worker("w1").await.unwrap().unwrap();
    assert_eq!(rec.status, WorkerStatus::Initializing);
    s.send(Up::Ready(pb::WorkerReady {})).await;
    eventually(Duration::from_secs(5), "worker ready", || async {
        (store.get_worker("w1").await.unwrap()?.status == WorkerStatus::Ready).then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_wrong_or_missing_token_is_refused_and_nothing_is_stored() {
    let (redis, store, replica) = cluster().await;
    let before = {
        let mut raw = redis.raw().await.unwrap();
        redis::cmd("DBSIZE").query_async::<i64>(&mut raw).await.unwrap()
    };
    for bad in [token("someone-else"), String::new(), "zz".repeat(32), "not hex at all".into()] {
        let err =
            RawSession::register(&replica.endpoint(), "w1", &bad, "10.0.0.1").await.err().unwrap();
        assert_eq!(err.code(), Code::Unauthenticated, "{}", err.message());
        assert!(err.message().contains("join token"), "{}", err.message());
    }
    assert!(store.list_workers().await.unwrap().is_empty());
    let mut raw = redis.raw().await.unwrap();
    assert_eq!(redis::cmd("DBSIZE").query_async::<i64>(&mut raw).await.unwrap(), before);
}

#[tokio::test]
async fn protocol_violations_are_refused_with_the_field_named() {
    let (_redis, store, replica) = cluster().await;
    let ep = replica.endpoint();
    let hb = pb::WorkerMessage { epoch: 0, body: Some(Up::Heartbeat(pb::Heartbeat { seq: 1 })) };
    let err = RawSession::open(&ep, hb).await.err().unwrap();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("first message"), "{}", err.message());

    let err =
        RawSession::register(&ep, "bad:id", &token("bad:id"), "10.0.0.1").await.err().unwrap();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("register.node_id"), "{}", err.message());

    let mut bad_tier = register("w2", &token("w2"), "10.0.0.2");
    if let Some(Up::Register(r)) = &mut bad_tier.body {
        r.inventory.as_mut().unwrap().checkpoints.push(pb::CachedCheckpoint {
            model: "m".into(),
            size_bytes: 1,
            tier: 0,
        });
    }
    let err = RawSession::open(&ep, bad_tier).await.err().unwrap();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("inventory.checkpoints[0].tier"), "{}", err.message());

    // A message stamped with another epoch ends the session.
    let mut s = RawSession::register(&ep, "w3", &token("w3"), "10.0.0.3").await.unwrap();
    s.send_epoch(s.epoch + 7, Up::Heartbeat(pb::Heartbeat { seq: 1 })).await;
    let err = s.next().await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("epoch"), "{}", err.message());

    // A report in a state a worker cannot report.
    let mut s = RawSession::register(&ep, "w4", &token("w4"), "10.0.0.4").await.unwrap();
    s.send(Up::InstanceReport(pb::InstanceReport {
        instance_id: "i1".into(),
        state: pb::InstanceState::Pending as i32,
        ..Default::default()
    }))
    .await;
    let err = s.next().await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("instance_report.state"), "{}", err.message());
    assert!(store.list_workers().await.unwrap().iter().all(|w| w.worker_id != "w2"));
}

#[tokio::test]
async fn a_duplicate_node_id_fences_the_older_session_on_any_replica() {
    let (_redis, store, replica) = cluster().await;
    let other = RegistryReplica::start(store.clone(), LEASE, HEARTBEAT).await.unwrap();
    let mut a =
        RawSession::register(&replica.endpoint(), "w1", &token("w1"), "10.0.0.1").await.unwrap();
    let b = RawSession::register(&other.endpoint(), "w1", &token("w1"), "10.0.0.1").await.unwrap();
    assert_eq!((a.epoch, b.epoch), (1, 2));
    a.send(Up::Heartbeat(pb::Heartbeat { seq: 1 })).await;
    let err = a.next().await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("stale"), "{}", err.message());
    let rec = store.get_worker("w1").await.unwrap().unwrap();
    assert_eq!(
        (rec.epoch, rec.status),
        (2, WorkerStatus::Initializing),
        "the newer session is untouched"
    );

    // On the same replica the older session is closed at once.
    let mut c =
        RawSession::register(&other.endpoint(), "w9", &token("w9"), "10.0.0.9").await.unwrap();
    let _d = RawSession::register(&other.endpoint(), "w9", &token("w9"), "10.0.0.9").await.unwrap();
    let err = c.next().await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(store.get_worker("w9").await.unwrap().unwrap().epoch, 2);
}

#[tokio::test]
async fn an_address_held_by_a_live_node_is_refused_naming_it() {
    let (_redis, store, replica) = cluster().await;
    let _a =
        RawSession::register(&replica.endpoint(), "w1", &token("w1"), "10.9.9.9").await.unwrap();
    let err = RawSession::register(&replica.endpoint(), "w2", &token("w2"), "10.9.9.9")
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("w1"), "{}", err.message());
    assert!(store.get_worker("w2").await.unwrap().is_none());
}
