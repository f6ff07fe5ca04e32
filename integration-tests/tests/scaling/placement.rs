//! Where instances go: spread over workers so one host's loss never takes a model's whole
//! capacity, and models the fleet can never hold reported as such.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use kvstore::{EventBatch, InstanceStatus};
use sllm_api::v1 as pb;
use sllm_integration_tests::{JOIN_SECRET, Proc, eventually};

use crate::*;

/// A simulated worker as its own `sllm worker` process with its own address.
fn worker_process(registry: &str, node: &str, address: &str) -> Proc {
    let args = [
        "worker",
        "--backend",
        "sim",
        "--registry",
        registry,
        "--node-id",
        node,
        "--address",
        address,
        "--time-scale",
        "0.01",
    ];
    Proc::sllm(&args, &[("SLLM_JOIN_SECRET", JOIN_SECRET)], "worker(s) started").unwrap().0
}

/// Workers holding a ready instance of `model`, when it has exactly `n` ready.
async fn ready_on(c: &Cluster, model: &str, n: usize) -> Option<Vec<String>> {
    let ready: Vec<String> = c
        .instances(model)
        .await
        .into_iter()
        .filter(|i| i.status == InstanceStatus::Ready)
        .map(|i| i.worker_id)
        .collect();
    (ready.len() == n).then_some(ready)
}

#[tokio::test]
async fn replicas_spread_over_workers_and_survive_the_loss_of_one() {
    let c = Cluster::start().await;
    let registry = c.registry.endpoint();
    let mut hosts: HashMap<String, Proc> = ["w1", "w2", "w3"]
        .iter()
        .enumerate()
        .map(|(n, id)| {
            (id.to_string(), worker_process(&registry, id, &format!("10.0.0.{}", n + 1)))
        })
        .collect();
    eventually(Duration::from_secs(15), "three ready workers", || async {
        let ready = c.store.list_workers().await.unwrap();
        (ready.iter().filter(|w| w.status == kvstore::WorkerStatus::Ready).count() == 3)
            .then_some(())
    })
    .await
    .unwrap();
    let _s = c.scaler("s1").await;

    // Two instances at once (min 2): two workers.
    c.deploy("m", 2, 3, 1.0, 60).await;
    let first =
        eventually(Duration::from_secs(15), "two ready", || ready_on(&c, "m", 2)).await.unwrap();
    assert_eq!(first.iter().collect::<BTreeSet<_>>().len(), 2, "{first:?}");
    // Under load, the third replica goes to the third worker, not next to a running one
    // (whose GPU copy of the checkpoint once made it look like a free start).
    c.demand("m", 0, 3).await;
    let all =
        eventually(Duration::from_secs(15), "three ready", || ready_on(&c, "m", 3)).await.unwrap();
    let spread: BTreeSet<&str> = all.iter().map(String::as_str).collect();
    assert_eq!(spread, BTreeSet::from(["w1", "w2", "w3"]), "one replica per worker");

    // One host dies: its replica is replaced on a survivor, and the model keeps replicas on
    // both survivors rather than all on one.
    let victim = first[0].clone();
    drop(hosts.remove(&victim));
    let after = eventually(Duration::from_secs(15), "replaced on the survivors", || async {
        ready_on(&c, "m", 3).await.filter(|on| !on.contains(&victim))
    })
    .await
    .unwrap();
    let survivors: BTreeSet<&str> = hosts.keys().map(String::as_str).collect();
    let used: BTreeSet<&str> = after.iter().map(String::as_str).collect();
    assert_eq!(used, survivors, "replicas sit on both survivors: {after:?}");
}

/// The `deployment.unplaceable` events from `reader`'s position on, as (model, reason).
async fn verdicts(reader: &mut kvstore::EventReader) -> Vec<(String, String)> {
    let mut out = Vec::new();
    loop {
        match reader.next_batch(Duration::ZERO, 10_000).await.unwrap() {
            EventBatch::Events(e) if e.is_empty() => return out,
            EventBatch::Events(e) => out.extend(
                e.into_iter()
                    .filter(|e| e.kind == "deployment.unplaceable")
                    .map(|e| (e.entity.clone(), e.field("reason").unwrap_or("<none>").to_string())),
            ),
            EventBatch::FellBehind { .. } => panic!("trimmed"),
        }
    }
}

async fn deploy_gpus(c: &Cluster, model: &str, num_gpus: i32, min: i32) {
    let spec = pb::DeploymentSpec { num_gpus, ..spec(model, min, 1, 1.0, 60) };
    c.client().await.deploy(pb::DeployRequest { spec: Some(spec) }).await.unwrap();
}

#[tokio::test]
async fn a_model_no_worker_can_hold_is_reported_until_one_can() {
    let c = Cluster::start().await;
    let s = c.scaler("s1").await;
    let mut reader = c.store.event_reader(c.store.event_position().await.unwrap());
    deploy_gpus(&c, "big", 64, 0).await;
    c.demand("big", 1, 0).await;
    // No worker at all: workers may be starting, so nothing is said yet.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(c.store.unplaceable_models().await.unwrap().is_empty());

    let _w1 = c.worker("w1", fast_sim()).await;
    let why = "needs 64 GPUs; the largest worker has 4";
    eventually(Duration::from_secs(5), "big marked unplaceable", || async {
        c.store.unplaceable_models().await.unwrap().get("big").filter(|r| *r == why).map(|_| ())
    })
    .await
    .unwrap();
    // Users see why it does not start.
    let got = c.client().await.get(pb::GetRequest { model: "big".into() }).await.unwrap();
    assert_eq!(got.into_inner().last_error, why);
    let mut status = pb::scaler_client::ScalerClient::new(s.channel().await.unwrap());
    let st = status.get_scale_status(pb::GetScaleStatusRequest { model: "big".into() }).await;
    assert_eq!(st.unwrap().into_inner().last_error, why, "sllm status shows it too");

    // A model waiting for GPUs to free up is not unplaceable: w1's four GPUs are all taken.
    deploy_gpus(&c, "fill", 4, 1).await;
    c.settled("fill", 1, Duration::from_secs(10)).await;
    deploy_gpus(&c, "wait", 2, 1).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(c.instances("wait").await.is_empty(), "no room for it yet");
    let marks = c.store.unplaceable_models().await.unwrap();
    assert_eq!(marks.keys().collect::<Vec<_>>(), ["big"], "{marks:?}");

    // A worker big enough joins: the mark goes, with an empty-reason event, and big starts.
    let _w2 = c.worker("w2", worker::SimConfig { gpus: 64, ..fast_sim() }).await;
    let ready = c.settled("big", 1, Duration::from_secs(10)).await;
    assert_eq!(ready[0].worker_id, "w2");
    assert!(c.store.unplaceable_models().await.unwrap().is_empty());
    let got = c.client().await.get(pb::GetRequest { model: "big".into() }).await.unwrap();
    assert_eq!(got.into_inner().last_error, "");
    // Published once per change, not once per tick; never for the model that only waited.
    assert_eq!(
        verdicts(&mut reader).await,
        [("big".to_string(), why.to_string()), ("big".to_string(), String::new())]
    );
    assert!(c.store.check_invariants().await.unwrap().is_empty());
}

/// A worker that claims to load from host memory far faster than it does wins its first
/// placement on the claim, and loses the next one on what the Scaler measured.
#[tokio::test]
async fn placement_believes_measured_starts_over_claimed_bandwidths() {
    let c = Cluster::start().await;
    let gib = 1u64 << 30;
    let mut liar = worker::SimConfig::default();
    // Claims 256 GiB/s from host memory; really loads at 1 GiB/s (2 s for 2 GiB).
    liar.bandwidths.insert(pb::CheckpointTier::HostMemory, gib);
    liar.claimed_bandwidths = liar.bandwidths.clone();
    liar.claimed_bandwidths.insert(pb::CheckpointTier::HostMemory, 256 * gib);
    for m in ["m1", "m2"] {
        liar.checkpoints.insert(m.into(), (2 * gib, pb::CheckpointTier::HostMemory));
    }
    // Honest: the same checkpoints on a disk that really reads 8 GiB/s (0.25 s).
    let mut honest = worker::SimConfig::default();
    honest.bandwidths.insert(pb::CheckpointTier::Disk, 8 * gib);
    for m in ["m1", "m2"] {
        honest.checkpoints.insert(m.into(), (2 * gib, pb::CheckpointTier::Disk));
    }
    let _liar = c.worker("w-liar", liar).await;
    let _honest = c.worker("w-honest", honest).await;
    let _s = c.scaler("s1").await;

    // On the claim alone (0.008 s against 0.25 s), the first start goes to the liar...
    c.deploy("m1", 1, 1, 1.0, 60).await;
    let first = c.settled("m1", 1, Duration::from_secs(15)).await;
    assert_eq!(first[0].worker_id, "w-liar");
    // ...which took 2 s: measured at 1 GiB/s, it now loses to the honest disk.
    c.deploy("m2", 1, 1, 1.0, 60).await;
    let second = c.settled("m2", 1, Duration::from_secs(15)).await;
    assert_eq!(second[0].worker_id, "w-honest", "placed on the measured speed, not the claim");
}

/// Inventories that cannot be true are refused at registration, naming the field.
#[tokio::test]
async fn unbelievable_inventories_are_refused_naming_the_field() {
    let c = Cluster::start().await;
    let cases: [(&str, worker::SimConfig); 3] = [
        (
            "inventory.checkpoints.tier",
            worker::SimConfig {
                gpus: 1,
                checkpoints: (0..20)
                    .map(|i| (format!("m{i}"), (40u64 << 30, pb::CheckpointTier::Gpu)))
                    .collect(),
                ..fast_sim()
            },
        ),
        (
            "inventory.bandwidths.bytes_per_second",
            worker::SimConfig {
                claimed_bandwidths: [(pb::CheckpointTier::Disk, u64::MAX)].into_iter().collect(),
                ..fast_sim()
            },
        ),
        ("inventory.gpus", worker::SimConfig { gpus: 1000, ..fast_sim() }),
    ];
    for (i, (field, sim)) in cases.into_iter().enumerate() {
        let w = sllm_integration_tests::SimWorker::start(
            vec![c.registry.endpoint()],
            &format!("w-bad-{i}"),
            sim,
        )
        .unwrap();
        let why = eventually(Duration::from_secs(5), "refused", || async {
            match w.agent.state() {
                worker::AgentState::Disconnected { last_error } if last_error.contains(field) => {
                    Some(last_error)
                }
                _ => None,
            }
        })
        .await
        .unwrap();
        assert!(why.contains(field), "{why}");
    }
    // Nothing was stored for any of them.
    assert!(c.store.list_workers().await.unwrap().is_empty());
}

/// Workers say which backends they can start: a deployment goes only to a worker that runs its
/// backend, and one that no worker runs is reported as such instead of failing its starts.
#[tokio::test]
async fn instances_go_only_to_workers_that_run_their_backend() {
    let c = Cluster::start().await;
    let runs = |b: &str| worker::SimConfig { backends: vec![b.to_string()], ..fast_sim() };
    let _vllm = c.worker("w-vllm", runs("vllm")).await;
    let _sglang = c.worker("w-sglang", runs("sglang")).await;
    let _s = c.scaler("s1").await;
    let c = &c;
    let deploy = |model: &'static str, backend: &'static str| {
        let spec = pb::DeploymentSpec { backend: backend.into(), ..spec(model, 1, 1, 1.0, 60) };
        async move {
            c.client().await.deploy(pb::DeployRequest { spec: Some(spec) }).await.unwrap();
        }
    };
    deploy("a", "sglang").await;
    deploy("b", "vllm").await;
    assert_eq!(c.settled("a", 1, Duration::from_secs(10)).await[0].worker_id, "w-sglang");
    assert_eq!(c.settled("b", 1, Duration::from_secs(10)).await[0].worker_id, "w-vllm");

    deploy("t", "transformers").await;
    let why = "no ready worker runs backend \"transformers\"";
    eventually(Duration::from_secs(5), "t marked unplaceable", || async {
        c.store.unplaceable_models().await.unwrap().get("t").filter(|r| *r == why).map(|_| ())
    })
    .await
    .unwrap();
    assert!(c.instances("t").await.is_empty(), "nothing was started for it");
    let got = c.client().await.get(pb::GetRequest { model: "t".into() }).await.unwrap();
    assert_eq!(got.into_inner().last_error, why);
}
