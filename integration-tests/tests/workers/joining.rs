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
    let s = raw_register(&replica.endpoint(), "w1", &token("w1"), "10.0.0.1").await.unwrap();
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
    // The replica names the store's state at start (the lineage key); count after that.
    store.ensure_lineage().await.unwrap();
    let before = {
        let mut raw = redis.raw().await.unwrap();
        redis::cmd("DBSIZE").query_async::<i64>(&mut raw).await.unwrap()
    };
    for bad in [token("someone-else"), String::new(), "zz".repeat(32), "not hex at all".into()] {
        let err = raw_register(&replica.endpoint(), "w1", &bad, "10.0.0.1").await.err().unwrap();
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

    let err = raw_register(&ep, "bad:id", &token("bad:id"), "10.0.0.1").await.err().unwrap();
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
    let mut s = raw_register(&ep, "w3", &token("w3"), "10.0.0.3").await.unwrap();
    s.send_epoch(s.epoch + 7, Up::Heartbeat(pb::Heartbeat { seq: 1 })).await;
    let err = s.next().await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("epoch"), "{}", err.message());

    // A report in a state a worker cannot report.
    let mut s = raw_register(&ep, "w4", &token("w4"), "10.0.0.4").await.unwrap();
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
    let mut a = raw_register(&replica.endpoint(), "w1", &token("w1"), "10.0.0.1").await.unwrap();
    let b = raw_register(&other.endpoint(), "w1", &token("w1"), "10.0.0.1").await.unwrap();
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
    let mut c = raw_register(&other.endpoint(), "w9", &token("w9"), "10.0.0.9").await.unwrap();
    let _d = raw_register(&other.endpoint(), "w9", &token("w9"), "10.0.0.9").await.unwrap();
    let err = c.next().await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(store.get_worker("w9").await.unwrap().unwrap().epoch, 2);
}

#[tokio::test]
async fn an_address_held_by_a_live_node_is_refused_naming_it() {
    let (_redis, store, replica) = cluster().await;
    let _a = raw_register(&replica.endpoint(), "w1", &token("w1"), "10.9.9.9").await.unwrap();
    let err =
        raw_register(&replica.endpoint(), "w2", &token("w2"), "10.9.9.9").await.err().unwrap();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("w1"), "{}", err.message());
    assert!(store.get_worker("w2").await.unwrap().is_none());
}

#[tokio::test]
async fn health_and_reflection_answer_for_the_registry() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;

    let (_redis, _store, replica) = cluster().await;
    let channel = tonic::transport::Endpoint::from_shared(replica.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    let status = health
        .check(HealthCheckRequest { service: "sllm.v1.WorkerRegistry".into() })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);
    let err =
        health.check(HealthCheckRequest { service: "sllm.v1.Nope".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // v1alpha is what grpcurl 1.8 speaks.
    let mut reflection = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp =
        reflection.server_reflection_info(tokio_stream::iter([req])).await.unwrap().into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        resp.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "sllm.v1.WorkerRegistry",
        "sllm.v1.ModelRegistry",
        "sllm.v1.Dispatch",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing from {names:?}");
    }
}

#[tokio::test]
async fn a_worker_whose_session_drops_rejoins_and_keeps_its_instances() {
    let (_redis, store, replica) = cluster().await;
    let mut w = SimWorker::start_with(vec![replica.endpoint()], "w1", fast_sim(), None, |c| {
        c.drop_session_after = Some(Duration::from_millis(400));
    })
    .unwrap();
    w.ready(0).await.unwrap();
    deploy(&store, "m").await;
    let lease = lead(&store).await;
    place(&store, &lease, "i1", "m", "w1", &[0]).await;
    eventually(Duration::from_secs(5), "instance ready", || async {
        (instance_status(&store, "i1").await? == kvstore::InstanceStatus::Ready).then_some(())
    })
    .await
    .unwrap();
    // The session drops (fault injection) and the worker comes back with a new epoch; what it
    // reports running wins, so the instance is ready again and never restarted.
    let epoch = w.ready(1).await.unwrap();
    assert!(epoch >= 2);
    eventually(Duration::from_secs(5), "instance ready again", || async {
        let w = store.get_worker("w1").await.unwrap()?;
        let ready = instance_status(&store, "i1").await? == kvstore::InstanceStatus::Ready;
        (ready && w.status == WorkerStatus::Ready && w.epoch >= 2).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(w.backend.inventory_running().len(), 1);
    assert_eq!(store.get_instance("i1").await.unwrap().unwrap().gpus, [0]);
}
