use std::time::Duration;

use kvstore::{Actor, InstanceStatus};
use prost::Message;
use sllm_api::v1 as pb;
use sllm_integration_tests::{SimWorker, eventually};

use crate::*;

#[tokio::test]
async fn a_placed_instance_loads_serves_drains_and_stops() {
    let (_redis, store, replica) = cluster().await;
    let mut w = SimWorker::start(vec![replica.endpoint()], "w1", fast_sim()).unwrap();
    w.ready(0).await.unwrap();
    deploy(&store, "m").await;
    let lease = lead(&store).await;
    place(&store, &lease, "i1", "m", "w1", &[2]).await;
    eventually(Duration::from_secs(5), "instance ready", || async {
        (instance_status(&store, "i1").await? == InstanceStatus::Ready).then_some(())
    })
    .await
    .unwrap();
    let rec = store.get_worker("w1").await.unwrap().unwrap();
    assert_eq!(rec.free_gpus, [0, 1, 3]);
    // Loading moved the checkpoint into GPU memory, and the worker said so.
    eventually(Duration::from_secs(5), "checkpoint reported in GPU", || async {
        let w = store.get_worker("w1").await.unwrap()?;
        w.inventory
            .checkpoints
            .iter()
            .any(|c| c.model == "m" && c.tier == kvstore::Tier::Gpu)
            .then_some(())
    })
    .await
    .unwrap();
    // The start command was acknowledged: nothing is left to deliver.
    let cursor = store.command_cursor("w1").await.unwrap();
    assert!(store.read_commands("w1", &cursor, 10).await.unwrap().is_empty());

    let drain = pb::Command {
        command_id: "drain-i1".into(),
        action: Some(pb::command::Action::Drain(pb::DrainInstance {
            instance_id: "i1".into(),
            grace_ms: 1000,
        })),
    };
    store
        .transition_instance(
            "i1",
            InstanceStatus::Draining,
            Actor::Leader(&lease),
            "scale 1->0",
            Some(("drain-i1", &drain.encode_to_vec())),
        )
        .await
        .unwrap();
    eventually(Duration::from_secs(5), "instance stopped", || async {
        let rec = store.get_instance("i1").await.unwrap()?;
        (rec.status == InstanceStatus::Stopped).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(store.get_worker("w1").await.unwrap().unwrap().free_gpus, [0, 1, 2, 3]);
    assert!(w.backend.inventory_running().is_empty());
}

#[tokio::test]
async fn a_failed_load_is_reported_with_its_reason() {
    let (_redis, store, replica) = cluster().await;
    let mut sim = fast_sim();
    sim.fail_load.insert("broken".into());
    let mut w = SimWorker::start(vec![replica.endpoint()], "w1", sim).unwrap();
    w.ready(0).await.unwrap();
    deploy(&store, "broken").await;
    let lease = lead(&store).await;
    place(&store, &lease, "i1", "broken", "w1", &[0]).await;
    let rec = eventually(Duration::from_secs(5), "instance failed", || async {
        let rec = store.get_instance("i1").await.unwrap()?;
        (rec.status == InstanceStatus::Failed).then_some(rec)
    })
    .await
    .unwrap();
    assert!(rec.reason.contains("loading broken failed"), "{}", rec.reason);
}

#[tokio::test]
async fn a_start_the_worker_cannot_honour_fails_the_instance_at_once() {
    let (_redis, store, replica) = cluster().await;
    let mut sim = fast_sim();
    sim.refuse_start.insert("exotic".into());
    let mut w = SimWorker::start(vec![replica.endpoint()], "w1", sim).unwrap();
    w.ready(0).await.unwrap();
    deploy(&store, "exotic").await;
    let lease = lead(&store).await;
    place(&store, &lease, "i1", "exotic", "w1", &[3]).await;
    let rec = eventually(Duration::from_secs(5), "instance failed", || async {
        let rec = store.get_instance("i1").await.unwrap()?;
        (rec.status == InstanceStatus::Failed).then_some(rec)
    })
    .await
    .unwrap();
    assert!(rec.reason.contains("unsupported"), "{}", rec.reason);
    assert_eq!(store.get_worker("w1").await.unwrap().unwrap().free_gpus, [0, 1, 2, 3]);
}

#[tokio::test]
async fn an_instance_the_control_plane_never_placed_is_stopped() {
    let (_redis, store, replica) = cluster().await;
    let mut w = SimWorker::start(vec![replica.endpoint()], "w1", fast_sim()).unwrap();
    w.ready(0).await.unwrap();
    use worker::Backend;
    w.backend
        .start(worker::StartSpec {
            instance_id: "stray".into(),
            model: "x".into(),
            backend: "sim".into(),
            gpus: vec![3],
            backend_config: None,
            traceparent: String::new(),
        })
        .unwrap();
    eventually(Duration::from_secs(5), "stray instance stopped", || async {
        w.backend.inventory_running().is_empty().then_some(())
    })
    .await
    .unwrap();
    assert!(store.get_instance("stray").await.unwrap().is_none(), "nothing was recorded for it");
}
