use std::time::{Duration, Instant};

use kvstore::{InstanceStatus, WorkerStatus};
use sllm_api::v1 as pb;
use sllm_api::v1::worker_message::Body as Up;
use sllm_integration_tests::{JOIN_SECRET, Proc, SimWorker, eventually};

use crate::*;

#[tokio::test]
async fn a_silent_worker_is_lost_within_its_lease() {
    let (_redis, store, replica) = cluster().await;
    let s = raw_register(&replica.endpoint(), "w1", &token("w1"), "10.0.0.1").await.unwrap();
    s.send(Up::Ready(pb::WorkerReady {})).await;
    // The stream stays open but no heartbeat comes.
    let start = Instant::now();
    eventually(LEASE * 3, "silent worker lost", || async {
        (store.get_worker("w1").await.unwrap()?.status == WorkerStatus::Lost).then_some(())
    })
    .await
    .unwrap();
    let took = start.elapsed();
    assert!(took >= LEASE, "not before the lease ran out ({took:?})");
    assert!(
        took < LEASE + LEASE / 2,
        "found by the reaper soon after the lease ran out ({took:?})"
    );
    drop(s);
}

#[tokio::test]
async fn a_killed_worker_process_is_lost_and_its_instances_become_unroutable() {
    let redis = RedisServer::start().unwrap();
    let store = redis.store_with(|c| c.namespace = "sllm".into()).await.unwrap();
    let url = redis.url();
    let (_registry, line) = Proc::sllm(
        &[
            "serve",
            "worker-registry",
            "--redis-url",
            &url,
            "--metrics-addr",
            "off",
            "--grpc-addr",
            "127.0.0.1:0",
            "--lease-ms",
            "2000",
            "--heartbeat-ms",
            "200",
        ],
        &[("SLLM_JOIN_SECRET", JOIN_SECRET)],
        "serving gRPC on",
    )
    .unwrap();
    let endpoint = format!("http://{}", line.rsplit(' ').next().unwrap());
    let (mut worker, _) = Proc::sllm(
        &[
            "worker",
            "--backend",
            "sim",
            "--registry",
            &endpoint,
            "--node-id",
            "w1",
            "--address",
            "10.0.0.1",
            "--time-scale",
            "0.01",
        ],
        &[("SLLM_JOIN_SECRET", JOIN_SECRET)],
        "started",
    )
    .unwrap();
    eventually(Duration::from_secs(10), "worker ready", || async {
        (store.get_worker("w1").await.unwrap()?.status == WorkerStatus::Ready).then_some(())
    })
    .await
    .unwrap();
    deploy(&store, "m").await;
    let lease = lead(&store).await;
    place(&store, &lease, "i1", "m", "w1", &[0]).await;
    eventually(Duration::from_secs(10), "instance ready", || async {
        (instance_status(&store, "i1").await? == InstanceStatus::Ready).then_some(())
    })
    .await
    .unwrap();

    let start = Instant::now();
    worker.kill();
    eventually(Duration::from_secs(2), "worker lost", || async {
        (store.get_worker("w1").await.unwrap()?.status == WorkerStatus::Lost).then_some(())
    })
    .await
    .unwrap();
    assert!(start.elapsed() < Duration::from_secs(2), "lost within the lease");
    assert_eq!(instance_status(&store, "i1").await, Some(InstanceStatus::Lost));
    assert!(
        store.instances_in(InstanceStatus::Ready).await.unwrap().is_empty(),
        "nothing routable remains"
    );
}

#[tokio::test]
async fn a_killed_registry_replica_loses_no_command() {
    let redis = RedisServer::start().unwrap();
    let store = redis.store_with(|c| c.namespace = "sllm".into()).await.unwrap();
    let url = redis.url();
    let start_replica = || {
        Proc::sllm(
            &[
                "serve",
                "worker-registry",
                "--redis-url",
                &url,
                "--metrics-addr",
                "off",
                "--grpc-addr",
                "127.0.0.1:0",
                "--lease-ms",
                "1500",
                "--heartbeat-ms",
                "300",
            ],
            &[("SLLM_JOIN_SECRET", JOIN_SECRET)],
            "serving gRPC on",
        )
        .unwrap()
    };
    let (mut a, line_a) = start_replica();
    let (_b, line_b) = start_replica();
    let ep = |line: &str| format!("http://{}", line.rsplit(' ').next().unwrap());
    let registries = vec![ep(&line_a), ep(&line_b)];
    let nodes = ["w0", "w1", "w2", "w3"];
    let mut workers = Vec::new();
    for n in nodes {
        let mut w = SimWorker::start(registries.clone(), n, fast_sim()).unwrap();
        w.ready(0).await.unwrap();
        workers.push(w);
    }
    deploy(&store, "m").await;
    let lease = lead(&store).await;
    for n in nodes {
        place(&store, &lease, &format!("{n}-first"), "m", n, &[0]).await;
    }
    for n in nodes {
        eventually(Duration::from_secs(5), "first instances ready", || async {
            (instance_status(&store, &format!("{n}-first")).await? == InstanceStatus::Ready)
                .then_some(())
        })
        .await
        .unwrap();
    }
    // Commands land in the streams, and the replica holding every session dies at once.
    for n in nodes {
        place(&store, &lease, &format!("{n}-second"), "m", n, &[1]).await;
    }
    a.kill();

    for w in &mut workers {
        let epoch = w.ready(1).await.unwrap();
        assert!(epoch >= 2, "re-joined with a new epoch");
    }
    for n in nodes {
        for i in [format!("{n}-first"), format!("{n}-second")] {
            eventually(Duration::from_secs(10), "instance ready after the move", || async {
                (instance_status(&store, &i).await? == InstanceStatus::Ready).then_some(())
            })
            .await
            .unwrap_or_else(|e| panic!("{i}: {e}"));
        }
        let rec = store.get_worker(n).await.unwrap().unwrap();
        assert_eq!(rec.status, WorkerStatus::Ready);
        assert_eq!(rec.free_gpus, [2, 3]);
    }
    let bad = store.check_invariants().await.unwrap();
    assert!(bad.is_empty(), "{bad:?}");
}
