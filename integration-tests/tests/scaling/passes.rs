//! A pass's decisions are written together, many to a script call: a write refused because the
//! state moved under the leader is handled as a refusal of its own (the others stand, the
//! refused one is tried again once the leader sees the change), and a deposed leader's pass
//! writes nothing. Driven by hand, one pass at a time, against a private redis-server.

use std::time::Duration;

use kvstore::{AutoScaling, Demand, DeploymentSpec, GpuInfo, InstanceStatus, Inventory, Store};
use sllm_integration_tests::RedisServer;

const LEASE: Duration = Duration::from_secs(3600);

async fn cluster(models: &[&str], workers: &[&str]) -> (RedisServer, Store) {
    let redis = RedisServer::start().unwrap();
    let store = redis.store().await.unwrap();
    for m in models {
        let spec = DeploymentSpec {
            model: m.to_string(),
            backend: "sim".into(),
            num_gpus: 1,
            autoscaling: AutoScaling {
                target: 1.0,
                min_instances: 0,
                max_instances: 1,
                keep_alive_s: 0,
                ..AutoScaling::default()
            },
            backend_config: String::new(),
        };
        store.create_deployment(&spec).await.unwrap();
    }
    for w in workers {
        register(&store, w).await;
    }
    (redis, store)
}

/// Registers (again, with a new epoch: not ready until it says so) `w`, with one GPU; returns
/// its epoch.
async fn register(store: &Store, w: &str) -> u64 {
    let inventory = Inventory {
        gpus: vec![GpuInfo { index: 0, name: "sim".into(), memory_bytes: 80 << 30 }],
        ..Inventory::default()
    };
    let reg =
        store.register_worker(w, true, &format!("sim-{w}"), LEASE, &inventory, "t").await.unwrap();
    reg.epoch
}

async fn demand(store: &Store, models: &[&str]) {
    let report: Vec<(String, Demand)> =
        models.iter().map(|m| (m.to_string(), Demand { queued: 0, in_flight: 1 })).collect();
    store.report_demand("dispatch-t", &report, LEASE).await.unwrap();
}

#[tokio::test]
async fn a_refused_placement_leaves_the_others_and_is_tried_again() {
    let (_redis, store) = cluster(&["m1", "m2", "m3"], &["w1", "w2", "w3"]).await;
    let mut epochs = Vec::new();
    for w in ["w1", "w2", "w3"] {
        let epoch = store.get_worker(w).await.unwrap().unwrap().epoch;
        store.worker_ready(w, epoch, &[]).await.unwrap();
        epochs.push(epoch);
    }
    let mut config = crate::scaler_config("s");
    // Driven by hand, nothing renews the lease: it must outlast the test.
    config.lease = Duration::from_secs(60);
    let scaler = scaler::Scaler::new(store.clone(), config);
    let mut leader = scaler.lead_by_hand().await.unwrap();
    leader.resync().await.unwrap();

    // w1 restarts behind the leader's back: its view still has it ready and free.
    let epoch = register(&store, "w1").await;
    demand(&store, &["m1", "m2", "m3"]).await;
    leader.tick().await.unwrap();

    // m1 went to w1 (the lowest id of equals) and was refused; m2 and m3 were placed
    // elsewhere, in the same pass.
    let live = store.live_instances().await.unwrap();
    let mut placed: Vec<(String, String)> =
        live.iter().map(|i| (i.model.clone(), i.worker_id.clone())).collect();
    placed.sort();
    assert_eq!(placed, [("m2".into(), "w2".into()), ("m3".into(), "w3".into())]);
    // Every desired count was written, each decision naming only what was placed.
    for m in ["m1", "m2", "m3"] {
        let d = store.get_deployment(m).await.unwrap().unwrap();
        assert_eq!(d.desired, 1, "{m}");
        assert_eq!(d.last_decision.contains("placed"), m != "m1", "{m}: {}", d.last_decision);
    }
    // The leader re-read w1: not ready, so the next pass places nothing there.
    leader.tick().await.unwrap();
    assert_eq!(store.live_instances().await.unwrap().len(), 2);

    // Once w1 is ready again and the leader sees it, m1 is placed.
    store.worker_ready("w1", epoch, &[]).await.unwrap();
    leader.resync().await.unwrap();
    let m1: Vec<_> =
        store.live_instances().await.unwrap().into_iter().filter(|i| i.model == "m1").collect();
    assert_eq!(m1.len(), 1);
    assert_eq!((m1[0].worker_id.as_str(), m1[0].status), ("w1", InstanceStatus::Pending));
    assert!(store.get_deployment("m1").await.unwrap().unwrap().last_decision.contains("placed"));
    let bad = store.check_invariants().await.unwrap();
    assert!(bad.is_empty(), "{bad:?}");
    leader.release().await;
}

#[tokio::test]
async fn a_deposed_leaders_pass_writes_nothing() {
    let models = ["m1", "m2", "m3", "m4"];
    let (redis, store) = cluster(&models, &["w1", "w2", "w3", "w4"]).await;
    for w in ["w1", "w2", "w3", "w4"] {
        let epoch = store.get_worker(w).await.unwrap().unwrap().epoch;
        store.worker_ready(w, epoch, &[]).await.unwrap();
    }
    let mut config = crate::scaler_config("old");
    config.lease = Duration::from_millis(300);
    let scaler = scaler::Scaler::new(store.clone(), config);
    let mut leader = scaler.lead_by_hand().await.unwrap();
    leader.resync().await.unwrap();

    // The old leader stalls past its lease; another replica takes over.
    tokio::time::sleep(Duration::from_millis(400)).await;
    match store.acquire_leader(scaler::ROLE, "new", LEASE).await.unwrap() {
        kvstore::Acquired::Leader(_) => {}
        other => panic!("the lease should be free: {other:?}"),
    }
    demand(&store, &models).await;
    let mut raw = redis.raw().await.unwrap();
    let before: u64 = redis::cmd("DBSIZE").query_async(&mut raw).await.unwrap();
    assert!(leader.tick().await.is_err(), "the stale leader steps down");
    let after: u64 = redis::cmd("DBSIZE").query_async(&mut raw).await.unwrap();
    assert_eq!(after, before, "nothing written");
    assert!(store.live_instances().await.unwrap().is_empty());
    for m in models {
        assert_eq!(store.get_deployment(m).await.unwrap().unwrap().desired, 0, "{m}");
    }
    for w in ["w1", "w2", "w3", "w4"] {
        assert!(store.read_commands(w, "0-0", 10).await.unwrap().is_empty(), "{w}");
    }
}
