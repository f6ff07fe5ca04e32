//! A rogue worker with a valid join token tries to take instances that are not its own: it
//! reports another worker's instance and one it made up, of a model it was never given. The
//! registry believes neither: both are stopped, and Redis keeps what it had.

use std::time::Duration;

use sllm_api::v1 as pb;
use sllm_api::v1::registry_message::Body as Down;
use sllm_api::v1::worker_message::Body as Up;
use sllm_integration_tests::{
    JOIN_SECRET, RawSession, RedisServer, RegistryReplica, Served, SimWorker, eventually,
};

#[tokio::test]
async fn a_rogue_worker_cannot_adopt_instances_that_are_not_its_own() {
    let redis = RedisServer::start().unwrap();
    let store = redis.store().await.unwrap();
    let registry =
        RegistryReplica::start(store.clone(), Duration::from_secs(3), Duration::from_millis(300))
            .await
            .unwrap();
    let mut config = scaler::ScalerConfig::new("s1");
    config.tick = Duration::from_millis(100);
    let _scaler = Served::scaler(store.clone(), config).await.unwrap();
    let sim = worker::SimConfig { time_scale: 0.01, ..worker::SimConfig::default() };
    let mut real = SimWorker::start(vec![registry.endpoint()], "w-real", sim).unwrap();
    real.ready(0).await.unwrap();
    store.create_deployment(&sllm_integration_tests::sim_deployment("m", 1, 1)).await.unwrap();
    let victim = eventually(Duration::from_secs(10), "m ready on w-real", || async {
        let all = store.model_instances("m").await.unwrap();
        all.into_iter().find(|i| i.status == kvstore::InstanceStatus::Ready)
    })
    .await
    .unwrap();
    let before = store.get_instance(&victim.instance_id).await.unwrap().unwrap();

    // The rogue joins with a valid token and claims both.
    let token = service::JoinSecret::new(JOIN_SECRET).unwrap().token_for("w-rogue");
    let running = |id: &str, model: &str| pb::RunningInstance {
        instance_id: id.into(),
        model: model.into(),
        state: pb::InstanceState::Ready as i32,
        gpus: vec![0],
    };
    let register = pb::Register {
        node_id: "w-rogue".into(),
        join_token: token,
        address: "10.6.6.6".into(),
        inventory: Some(pb::Inventory {
            gpus: vec![pb::Gpu { index: 0, name: "sim".into(), memory_bytes: 80 << 30 }],
            running: vec![running(&victim.instance_id, "m"), running("made-up-1", "other")],
            ..Default::default()
        }),
        agent_version: "rogue".into(),
    };
    let first = pb::WorkerMessage { epoch: 0, body: Some(Up::Register(register)) };
    let mut rogue = RawSession::open(&registry.endpoint(), first).await.unwrap();
    rogue.send(Up::Ready(pb::WorkerReady {})).await;
    let mut unknown = Vec::new();
    let mut stops = Vec::new();
    while stops.len() < 2 {
        match rogue.next().await.unwrap().and_then(|m| m.body) {
            Some(Down::Placeable(p)) => unknown = p.unknown_instances,
            Some(Down::Command(pb::Command {
                action: Some(pb::command::Action::Stop(s)), ..
            })) => stops.push(s.instance_id),
            Some(_) => {}
            None => panic!("the session ended"),
        }
    }
    unknown.sort();
    stops.sort();
    let mut want = vec![victim.instance_id.clone(), "made-up-1".to_string()];
    want.sort();
    assert_eq!(unknown, want, "both reported back as not placed on it");
    assert_eq!(stops, want, "and both told to stop");

    // Redis is as it was: the victim is still the real worker's, ready; nothing was made up.
    let after = store.get_instance(&victim.instance_id).await.unwrap().unwrap();
    assert_eq!(after, before);
    assert!(store.get_instance("made-up-1").await.unwrap().is_none());
    assert!(store.model_instances("other").await.unwrap().is_empty());
    let record = store.get_worker("w-rogue").await.unwrap().unwrap();
    assert!(record.instance_ids.is_empty(), "{record:?}");
    assert_eq!(record.free_gpus, [0]);

    // A report about the victim from the rogue is refused, and changes nothing.
    let report = pb::InstanceReport {
        instance_id: victim.instance_id.clone(),
        state: pb::InstanceState::Failed as i32,
        reason: "rogue says so".into(),
        ..Default::default()
    };
    rogue.send(Up::InstanceReport(report)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(store.get_instance(&victim.instance_id).await.unwrap().unwrap(), after);
}

/// A rogue worker with a valid token claims a GPU-resident copy of every model, to win every
/// placement: the claim cannot fit in the GPU memory it reports, so it is refused naming the
/// field, and nothing of it reaches Redis.
#[tokio::test]
async fn a_worker_claiming_more_in_gpu_memory_than_it_has_is_refused() {
    let redis = RedisServer::start().unwrap();
    let store = redis.store().await.unwrap();
    let registry =
        RegistryReplica::start(store.clone(), Duration::from_secs(3), Duration::from_millis(300))
            .await
            .unwrap();
    store.ensure_lineage().await.unwrap();
    let keys = || async {
        let mut raw = redis.raw().await.unwrap();
        redis::cmd("DBSIZE").query_async::<i64>(&mut raw).await.unwrap()
    };
    let before = keys().await;
    let token = service::JoinSecret::new(JOIN_SECRET).unwrap().token_for("w-rogue");
    let register = pb::Register {
        node_id: "w-rogue".into(),
        join_token: token,
        address: "10.6.6.7".into(),
        inventory: Some(pb::Inventory {
            gpus: vec![pb::Gpu { index: 0, name: "sim".into(), memory_bytes: 80 << 30 }],
            checkpoints: (0..100)
                .map(|i| pb::CachedCheckpoint {
                    model: format!("model-{i}"),
                    size_bytes: 40 << 30,
                    tier: pb::CheckpointTier::Gpu as i32,
                })
                .collect(),
            ..Default::default()
        }),
        agent_version: "rogue".into(),
    };
    let first = pb::WorkerMessage { epoch: 0, body: Some(Up::Register(register)) };
    let err = RawSession::open(&registry.endpoint(), first).await.err().expect("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("inventory.checkpoints.tier"), "{}", err.message());
    assert!(store.get_worker("w-rogue").await.unwrap().is_none());
    assert_eq!(keys().await, before, "nothing reached Redis");
}
