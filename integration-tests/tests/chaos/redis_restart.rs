//! Redis stops for five seconds under load and starts again: with an append-only file nothing
//! is lost; without persistence the state is rebuilt from the workers' reports and the
//! deployments whose records were lost are reported missing, not silently dropped.

use std::collections::BTreeMap;
use std::time::Duration;

use kvstore::{InstanceStatus, WorkerStatus};
use sllm_api::v1 as pb;
use sllm_integration_tests::{RedisServer, eventually};

use crate::load::Load;
use crate::mesh::Mesh;

const MODELS: [&str; 2] = ["m0", "m1"];
const OUTAGE: Duration = Duration::from_secs(5);

/// A comparable picture of the store: deployments (spec), workers, live instances.
async fn picture(store: &kvstore::Store) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for d in store.list_deployments().await.unwrap() {
        out.insert(format!("deployment {}", d.spec.model), format!("{:?}", d.spec));
    }
    for w in store.list_workers().await.unwrap() {
        out.insert(format!("worker {}", w.worker_id), w.address.clone());
    }
    for i in store.live_instances().await.unwrap() {
        out.insert(
            format!("instance {}", i.instance_id),
            format!("{} on {}", i.model, i.worker_id),
        );
    }
    out
}

async fn start_under_load(redis: RedisServer) -> (Mesh, Load) {
    let mesh = Mesh::start(redis, 3).await;
    for m in MODELS {
        mesh.deploy(m, 1, 2).await;
    }
    mesh.ready(&MODELS, 1, Duration::from_secs(30)).await;
    let targets = ["dispatch-a", "dispatch-b"]
        .iter()
        .map(|d| (d.to_string(), mesh.endpoints[*d].clone()))
        .collect();
    let load = Load::start(targets, 3, MODELS.iter().map(|m| m.to_string()).collect());
    tokio::time::sleep(Duration::from_secs(1)).await;
    (mesh, load)
}

/// Waits until every running worker is ready again with a lease that moves.
async fn workers_back(mesh: &Mesh) {
    let store = mesh.store.clone();
    let n = mesh.live_workers().len();
    eventually(Duration::from_secs(15), "workers ready after the outage", || async {
        let ws = store.list_workers().await.ok()?;
        (ws.iter().filter(|w| w.status == WorkerStatus::Ready).count() == n).then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_with_aof_loses_nothing_and_warm_requests_flow() {
    let (mut mesh, load) = start_under_load(RedisServer::start_persistent().unwrap()).await;
    let before = picture(&mesh.store).await;

    load.phase("redis down");
    mesh.redis.crash();
    tokio::time::sleep(OUTAGE).await;
    load.phase("redis back");
    mesh.redis.start_again().unwrap();
    workers_back(&mesh).await;
    let after = picture(&mesh.store).await;
    assert_eq!(before, after, "records changed across a restart with AOF");

    // The control plane works again: a new model deployed now cold-starts.
    mesh.deploy("m2", 1, 1).await;
    mesh.ready(&["m2"], 1, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ledger = load.stop().await;
    let ledger = ledger.lock().unwrap();
    println!("{}", ledger.render("Redis down 5 s, restarted with its append-only file", 0));
    assert!(ledger.lost().is_empty(), "lost: {:?}", ledger.lost());
    assert!(ledger.corrupt().is_empty(), "corrupt: {:?}", ledger.corrupt());
    let failed = ledger.failures(None, None);
    assert!(failed.is_empty(), "warm requests failed around the outage: {failed:?}");
    assert!(ledger.completed_in("redis down") > 10, "warm requests did not flow during the outage");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_without_persistence_rebuilds_from_workers() {
    let (mut mesh, load) = start_under_load(RedisServer::start().unwrap()).await;
    let running: BTreeMap<String, String> = mesh
        .store
        .live_instances()
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.status == InstanceStatus::Ready)
        .map(|i| (i.instance_id, i.model))
        .collect();

    load.phase("redis down");
    mesh.redis.crash();
    tokio::time::sleep(OUTAGE).await;
    load.phase("redis back empty");
    mesh.redis.start_again().unwrap();
    workers_back(&mesh).await;

    // What the workers run is known again, from their reports, and nothing was stopped.
    let store = mesh.store.clone();
    let want = running.clone();
    eventually(Duration::from_secs(10), "instances rebuilt from worker reports", || {
        let (store, want) = (store.clone(), want.clone());
        async move {
            let now: BTreeMap<String, String> = store
                .live_instances()
                .await
                .ok()?
                .into_iter()
                .filter(|i| i.status == InstanceStatus::Ready)
                .map(|i| (i.instance_id, i.model))
                .collect();
            (now == want).then_some(())
        }
    })
    .await
    .unwrap();

    // The deployments are reported missing, with what to do about it.
    let mut models =
        pb::model_registry_client::ModelRegistryClient::connect(mesh.endpoints["models"].clone())
            .await
            .unwrap();
    let list = models.list(pb::ListRequest {}).await.unwrap().into_inner();
    for m in MODELS {
        let d = list
            .deployments
            .iter()
            .find(|d| d.spec.as_ref().is_some_and(|s| s.model == m))
            .unwrap_or_else(|| panic!("{m} not listed after the state was lost: {list:?}"));
        assert_eq!(d.state(), pb::DeploymentState::Missing, "{d:?}");
        assert!(d.last_error.contains("deploy it again"), "{}", d.last_error);
    }
    let err = models.get(pb::GetRequest { model: "m0".into() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(
        err.message().contains("instance") && err.message().contains("deploy it again"),
        "{}",
        err.message()
    );
    let client = pb::dispatch_client::DispatchClient::connect(mesh.endpoints["dispatch-a"].clone())
        .await
        .unwrap();
    // Dispatch finds the loss when it next reads the event stream (on a loaded machine, a
    // moment after the registry does).
    let err = sllm_integration_tests::eventually(Duration::from_secs(10), "NOT_FOUND", || {
        let mut client = client.clone();
        async move {
            let r = client
                .generate(pb::GenerateRequest {
                    model: "m0".into(),
                    input: Some(pb::generate_request::Input::Prompt("hi".into())),
                    timeout_ms: 200,
                    ..Default::default()
                })
                .await;
            r.err().filter(|e| e.code() == tonic::Code::NotFound)
        }
    })
    .await
    .unwrap();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(err.message().contains("deploy it again"), "{}", err.message());

    // Deploying again adopts the running instances: they serve at once, nothing reloads.
    load.phase("redeployed");
    for m in MODELS {
        mesh.deploy(m, 1, 2).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ledger = load.stop().await;
    let now: BTreeMap<String, String> = mesh
        .store
        .live_instances()
        .await
        .unwrap()
        .into_iter()
        .map(|i| (i.instance_id, i.model))
        .collect();
    let ledger = ledger.lock().unwrap();
    println!("{}", ledger.render("Redis down 5 s, restarted empty", 0));
    assert_eq!(now, running, "instances adopted, none started or stopped");
    assert!(ledger.lost().is_empty(), "lost: {:?}", ledger.lost());
    assert!(ledger.corrupt().is_empty(), "corrupt: {:?}", ledger.corrupt());
    assert!(ledger.completed_in("redeployed") > 10, "requests did not flow after redeploying");
    assert!(ledger.failures(Some("redis down"), None).is_empty());
}
