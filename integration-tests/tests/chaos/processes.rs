//! SIGKILL workers, then a Dispatch, a WorkerRegistry and the Scaler leader, under load.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use kvstore::{InstanceStatus, WorkerStatus};
use rand::seq::IndexedRandom;
use sllm_integration_tests::{RedisServer, eventually};

use crate::load::Load;
use crate::mesh::{LEASE, Mesh, SCALER_LEASE};

const MODELS: [&str; 3] = ["m0", "m1", "m2"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_workers_and_services_under_load_loses_nothing() {
    let mut mesh = Mesh::start(RedisServer::start().unwrap(), 6).await;
    for m in MODELS {
        mesh.deploy(m, 2, 4).await;
    }
    mesh.ready(&MODELS, 2, Duration::from_secs(30)).await;
    let targets = ["dispatch-a", "dispatch-b"]
        .iter()
        .map(|d| (d.to_string(), mesh.endpoints[*d].clone()))
        .collect();
    let load = Load::start(targets, 4, MODELS.iter().map(|m| m.to_string()).collect());
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Two workers that run instances die mid-stream.
    load.phase("workers killed");
    let busy: Vec<String> = mesh
        .store
        .list_workers()
        .await
        .unwrap()
        .into_iter()
        .filter(|w| !w.instance_ids.is_empty())
        .map(|w| w.worker_id)
        .collect();
    let victims: Vec<String> = busy.choose_multiple(&mut rand::rng(), 2).cloned().collect();
    for v in &victims {
        mesh.kill(v);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(LEASE).await;
    for i in mesh.store.live_instances().await.unwrap() {
        assert!(
            !(victims.contains(&i.worker_id) && i.status == InstanceStatus::Ready),
            "instance {} still routable on dead worker {} past its lease",
            i.instance_id,
            i.worker_id
        );
    }
    mesh.ready(&MODELS, 2, Duration::from_secs(20)).await;
    let retries = mesh.dispatch_retries().await;

    // A Dispatch dies: its clients fail over; the other one's clients notice nothing.
    load.phase("dispatch-b killed");
    mesh.kill("dispatch-b");
    tokio::time::sleep(Duration::from_secs(2)).await;

    // A WorkerRegistry dies: workers re-join through the other one.
    load.phase("worker-registry killed");
    let before: Vec<(String, u64)> = mesh
        .store
        .list_workers()
        .await
        .unwrap()
        .into_iter()
        .filter(|w| w.status == WorkerStatus::Ready)
        .map(|w| (w.worker_id, w.epoch))
        .collect();
    assert_eq!(before.len(), mesh.live_workers().len());
    mesh.kill("wr-a");
    let store = mesh.store.clone();
    eventually(Duration::from_secs(10), "workers re-joined through wr-b", || {
        let (store, before) = (store.clone(), before.clone());
        async move {
            let now = store.list_workers().await.ok()?;
            before
                .iter()
                .all(|(id, epoch)| {
                    now.iter().any(|w| {
                        &w.worker_id == id && w.status == WorkerStatus::Ready && w.epoch > *epoch
                    })
                })
                .then_some(())
        }
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The Scaler leader dies: the other replica takes over within a lease, starts nothing twice.
    load.phase("scaler leader killed");
    let (holder, token) = mesh.leader("scaler-a").await.expect("a leader");
    let other = if holder == "scaler-a" { "scaler-b" } else { "scaler-a" };
    let instances = |store: kvstore::Store| async move {
        let mut by_model = std::collections::BTreeMap::new();
        for i in store.live_instances().await.unwrap() {
            if i.status == InstanceStatus::Lost {
                continue; // on a dead worker: kept in case it comes back, never routed to
            }
            by_model.entry(i.model.clone()).or_insert_with(BTreeSet::new).insert(i.instance_id);
        }
        by_model
    };
    let held = instances(mesh.store.clone()).await;
    let t0 = Instant::now();
    mesh.kill(&holder);
    let new_token = {
        let mesh = &mesh;
        eventually(SCALER_LEASE * 3, "a new scaler leader", || async move {
            mesh.leader(other).await.filter(|(h, _)| h == other).map(|(_, t)| t)
        })
        .await
        .unwrap()
    };
    let takeover = t0.elapsed();
    assert!(new_token > token, "fencing token {new_token} after {token}");
    assert!(
        takeover <= SCALER_LEASE + Duration::from_millis(800),
        "new leader after {takeover:?}, lease {SCALER_LEASE:?}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = instances(mesh.store.clone()).await;
    assert_eq!(held, after, "the new leader started or stopped instances it had no reason to");
    for (model, ids) in &after {
        let d = mesh.store.get_deployment(model).await.unwrap().unwrap();
        assert_eq!(ids.len() as u32, d.desired, "{model}: live instances vs desired");
    }

    load.phase("settled");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ledger = load.stop().await;
    let ledger = ledger.lock().unwrap();
    println!(
        "{}",
        ledger.render("SIGKILL workers, dispatch, worker registry, scaler leader", retries)
    );
    println!("killed workers {victims:?}, scaler takeover {takeover:?}");

    assert!(ledger.lost().is_empty(), "lost: {:?}", ledger.lost());
    assert!(ledger.corrupt().is_empty(), "corrupt: {:?}", ledger.corrupt());
    assert_eq!(ledger.given_up(), 0, "never completed: {:#?}", ledger.given_up_attempts());
    assert!(
        ledger.failures(Some("warm"), None).is_empty(),
        "{:?}",
        ledger.failures(Some("warm"), None)
    );
    // A worker's death is invisible to clients: before the first token the request is
    // retried, after it the stream moves to another instance of its model (each has two) and
    // continues; the ledger checked every text against the uninterrupted generation.
    let broken = ledger.failures(Some("workers killed"), None);
    assert!(broken.is_empty(), "streams broken by a worker's death: {broken:?}");
    // Clients of the surviving Dispatch see no failure while services die.
    for phase in ["dispatch-b killed", "worker-registry killed", "scaler leader killed", "settled"]
    {
        let f = ledger.failures(Some(phase), Some("dispatch-a"));
        assert!(f.is_empty(), "clients of dispatch-a saw failures in {phase}: {f:?}");
        assert!(ledger.completed_in(phase) > 0, "nothing completed in {phase}");
    }
}
