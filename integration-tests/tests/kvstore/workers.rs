use std::time::Duration;

use kvstore::worker::LostMode;
use kvstore::{Actor, ErrorKind, InstanceStatus, Refusal, RunningInstance, WorkerStatus};

use crate::*;

#[tokio::test]
async fn a_refused_token_stores_nothing() {
    let (redis, store) = setup().await;
    let before = dbsize(&redis, &store).await;
    let err = store
        .register_worker("w1", false, "10.0.0.1", LEASE, &inventory(1), "test")
        .await
        .unwrap_err();
    assert_eq!(err.refusal(), Some(&Refusal::Unauthenticated));
    assert_eq!(err.kind(), ErrorKind::Unauthenticated);
    assert_eq!(dbsize(&redis, &store).await, before);
    assert!(store.get_worker("w1").await.unwrap().is_none());
}

#[tokio::test]
async fn register_then_ready_then_heartbeat() {
    let (_redis, store) = setup().await;
    let reg =
        store.register_worker("w1", true, "10.0.0.1", LEASE, &inventory(4), "1.2.3").await.unwrap();
    assert_eq!(reg.epoch, 1);
    let w = store.get_worker("w1").await.unwrap().unwrap();
    assert_eq!(w.status, WorkerStatus::Initializing);
    assert_eq!(w.free_gpus, [0, 1, 2, 3]);
    assert_eq!(w.inventory, inventory(4));
    assert_eq!(w.agent_version, "1.2.3");
    assert_eq!(w.lease_deadline_ms, Some(reg.lease_deadline_ms));

    // Nothing may be placed before Ready.
    store.create_deployment(&spec("m")).await.unwrap();
    let lease = lead(&store, "s").await;
    let err = store.create_instance(&lease, &placement("i1", "m", "w1", &[0])).await.unwrap_err();
    assert_eq!(err.refusal(), Some(&Refusal::WorkerNotReady { state: "initializing".into() }));

    assert!(store.worker_ready("w1", reg.epoch, &[]).await.unwrap().is_empty());
    assert_eq!(store.get_worker("w1").await.unwrap().unwrap().status, WorkerStatus::Ready);
    // Again at the same epoch (a retry after a call that timed out but ran): the same answer,
    // nothing changed.
    let version = store.get_worker("w1").await.unwrap().unwrap().version;
    assert!(store.worker_ready("w1", reg.epoch, &[]).await.unwrap().is_empty());
    assert_eq!(store.get_worker("w1").await.unwrap().unwrap().version, version);

    let deadline = store.heartbeat("w1", reg.epoch, Duration::from_secs(30)).await.unwrap();
    assert!(deadline >= reg.lease_deadline_ms + 20_000);
    assert_eq!(store.get_worker("w1").await.unwrap().unwrap().lease_deadline_ms, Some(deadline));
    let err = store.heartbeat("nobody", 1, LEASE).await.unwrap_err();
    assert_eq!(err.refusal(), Some(&Refusal::NotFound));
    assert_consistent(&store).await;
}

#[tokio::test]
async fn a_registration_run_twice_answers_once_and_bumps_the_epoch_once() {
    let (_redis, store) = setup().await;
    let register = |registration: &'static str| {
        let store = store.clone();
        async move {
            store
                .register_worker_as(registration, "w1", true, "10.0.0.1", LEASE, &inventory(2), "t")
                .await
                .unwrap()
        }
    };
    let first = register("r1").await;
    store.worker_ready("w1", first.epoch, &[]).await.unwrap();
    // The same registration again (a retry of a call that timed out, or the first call
    // arriving late): the same epoch, and the worker stays ready.
    let again = register("r1").await;
    assert_eq!(again.epoch, first.epoch);
    let w = store.get_worker("w1").await.unwrap().unwrap();
    assert_eq!((w.status, w.epoch), (WorkerStatus::Ready, first.epoch));
    // Another attempt to join is a new session.
    let next = register("r2").await;
    assert_eq!(next.epoch, first.epoch + 1);
    // Once the worker is lost, even a repeat registers it anew.
    store.worker_lost("w1", next.epoch, LostMode::Dropped, "stream closed").await.unwrap();
    let after = register("r2").await;
    assert_eq!(after.epoch, next.epoch + 1);
    assert_eq!(store.get_worker("w1").await.unwrap().unwrap().status, WorkerStatus::Initializing);
    assert_consistent(&store).await;
}

#[tokio::test]
async fn re_registering_fences_the_older_session_everywhere() {
    let (_redis, store) = setup().await;
    store.create_deployment(&spec("m")).await.unwrap();
    let old = ready_worker(&store, "w1", 2).await;
    let lease = lead(&store, "s").await;
    store.create_instance(&lease, &placement("i1", "m", "w1", &[0])).await.unwrap();
    let reg =
        store.register_worker("w1", true, "10.0.0.2-w1", LEASE, &inventory(2), "t").await.unwrap();
    assert_eq!(reg.epoch, old + 1);

    let stale = |e: kvstore::Error| {
        assert_eq!(e.refusal(), Some(&Refusal::StaleEpoch { current: reg.epoch }))
    };
    stale(store.heartbeat("w1", old, LEASE).await.unwrap_err());
    stale(store.worker_ready("w1", old, &[]).await.unwrap_err());
    stale(store.worker_lost("w1", old, LostMode::Dropped, "old stream closed").await.unwrap_err());
    stale(
        store
            .transition_instance(
                "i1",
                InstanceStatus::Loading,
                Actor::Worker { worker_id: "w1", epoch: old },
                "",
                None,
            )
            .await
            .unwrap_err(),
    );
    // The current session is unaffected by the old one's refused messages.
    assert_eq!(store.get_worker("w1").await.unwrap().unwrap().status, WorkerStatus::Initializing);
    store.heartbeat("w1", reg.epoch, LEASE).await.unwrap();
    assert_consistent(&store).await;
}

#[tokio::test]
async fn an_address_held_by_a_live_node_is_refused_until_its_lease_ends() {
    let (redis, store) = setup().await;
    let short = Duration::from_millis(200);
    store.register_worker("w1", true, "10.1.1.1", short, &inventory(1), "t").await.unwrap();
    let before = dbsize(&redis, &store).await;
    let err =
        store.register_worker("w2", true, "10.1.1.1", LEASE, &inventory(1), "t").await.unwrap_err();
    assert_eq!(err.refusal(), Some(&Refusal::AddressInUse { holder: "w1".into() }));
    assert_eq!(dbsize(&redis, &store).await, before, "a refused registration writes nothing");
    assert!(store.get_worker("w2").await.unwrap().is_none());

    tokio::time::sleep(Duration::from_millis(300)).await;
    store.register_worker("w2", true, "10.1.1.1", LEASE, &inventory(1), "t").await.unwrap();
    // The same node may always re-register from its own address.
    store.register_worker("w2", true, "10.1.1.1", LEASE, &inventory(1), "t").await.unwrap();
}

#[tokio::test]
async fn a_dropped_session_makes_the_worker_and_its_instances_lost() {
    let (_redis, store) = setup().await;
    store.create_deployment(&spec("m")).await.unwrap();
    let epoch = ready_worker(&store, "w1", 2).await;
    let lease = lead(&store, "s").await;
    store.create_instance(&lease, &placement("i1", "m", "w1", &[0])).await.unwrap();
    store.create_instance(&lease, &placement("i2", "m", "w1", &[1])).await.unwrap();
    let me = Actor::Worker { worker_id: "w1", epoch };
    store.transition_instance("i1", InstanceStatus::Ready, me, "", None).await.unwrap();

    assert_eq!(
        store.worker_lost("w1", epoch, LostMode::Dropped, "stream closed").await.unwrap(),
        2
    );
    let w = store.get_worker("w1").await.unwrap().unwrap();
    assert_eq!(w.status, WorkerStatus::Lost);
    assert_eq!(w.lease_deadline_ms, None);
    for i in ["i1", "i2"] {
        assert_eq!(store.get_instance(i).await.unwrap().unwrap().status, InstanceStatus::Lost);
    }
    assert!(
        store.instances_in(InstanceStatus::Ready).await.unwrap().is_empty(),
        "nothing routable"
    );
    let err = store.worker_lost("w1", epoch, LostMode::Dropped, "again").await.unwrap_err();
    assert_eq!(err.refusal(), Some(&Refusal::WrongState { current: "lost".into() }));
    let err = store.heartbeat("w1", epoch, LEASE).await.unwrap_err();
    assert_eq!(err.refusal(), Some(&Refusal::WorkerLost));
    let err =
        store.transition_instance("i1", InstanceStatus::Stopped, me, "", None).await.unwrap_err();
    assert_eq!(err.refusal(), Some(&Refusal::WorkerLost));
    assert_consistent(&store).await;
}

#[tokio::test]
async fn an_expired_lease_is_found_without_scan_and_refused_while_alive() {
    let (_redis, store) = setup().await;
    let short = Duration::from_millis(150);
    let a = store.register_worker("wa", true, "10.0.0.1", short, &inventory(1), "t").await.unwrap();
    let b = store.register_worker("wb", true, "10.0.0.2", LEASE, &inventory(1), "t").await.unwrap();
    assert!(store.expired_leases(10).await.unwrap().is_empty());
    let err = store.worker_lost("wa", a.epoch, LostMode::Expired, "lease").await.unwrap_err();
    assert!(matches!(err.refusal(), Some(Refusal::LeaseAlive { .. })), "{err}");

    tokio::time::sleep(Duration::from_millis(250)).await;
    let expired = store.expired_leases(10).await.unwrap();
    assert_eq!(expired, [kvstore::ExpiredLease { worker_id: "wa".into(), epoch: a.epoch }]);
    store.worker_lost("wa", a.epoch, LostMode::Expired, "lease expired").await.unwrap();
    assert!(store.expired_leases(10).await.unwrap().is_empty());
    assert_eq!(store.get_worker("wb").await.unwrap().unwrap().epoch, b.epoch);
    assert_consistent(&store).await;
}

#[tokio::test]
async fn a_returning_workers_report_wins_over_redis() {
    let (_redis, store) = setup().await;
    store.create_deployment(&spec("m")).await.unwrap();
    let epoch = ready_worker(&store, "w1", 4).await;
    let lease = lead(&store, "s").await;
    for (i, g) in [("i1", 0), ("i2", 1), ("i3", 2)] {
        store.create_instance(&lease, &placement(i, "m", "w1", &[g])).await.unwrap();
    }
    let me = Actor::Worker { worker_id: "w1", epoch };
    store.transition_instance("i1", InstanceStatus::Ready, me, "", None).await.unwrap();
    store.transition_instance("i2", InstanceStatus::Loading, me, "", None).await.unwrap();
    store.worker_lost("w1", epoch, LostMode::Dropped, "network").await.unwrap();

    // Another worker runs i4.
    let other = ready_worker(&store, "w2", 1).await;
    store.create_instance(&lease, &placement("i4", "m", "w2", &[0])).await.unwrap();
    let _ = other;

    // It comes back running i1 (ready) and i4, which the control plane placed elsewhere; i2 is
    // gone; i3's start command was never delivered (it is lost too, and not reported).
    let reg =
        store.register_worker("w1", true, "10.0.0.2-w1", LEASE, &inventory(4), "t").await.unwrap();
    let run = |id: &str, g: u32| RunningInstance {
        instance_id: id.into(),
        model: "m".into(),
        status: InstanceStatus::Ready,
        gpus: vec![g],
    };
    let running = [run("i1", 0), run("i4", 3)];
    let unknown = store.worker_ready("w1", reg.epoch, &running).await.unwrap();
    assert_eq!(unknown, ["i4"]);
    let status = |i: &'static str| {
        let store = store.clone();
        async move { store.get_instance(i).await.unwrap().unwrap().status }
    };
    assert_eq!(status("i1").await, InstanceStatus::Ready);
    assert_eq!(status("i2").await, InstanceStatus::Stopped);
    assert_eq!(status("i3").await, InstanceStatus::Stopped);
    let w = store.get_worker("w1").await.unwrap().unwrap();
    assert_eq!(w.free_gpus, [1, 2, 3]);
    assert_eq!(w.instance_ids, ["i1"]);
    assert_consistent(&store).await;
}

/// Deletes every key of `store`'s namespace, as a Redis restarted without persistence would
/// (not FLUSHALL: the cluster variant of this suite shares its Redis between tests).
async fn lose_everything(redis: &Redis, store: &kvstore::Store) {
    let mut raw = redis.raw().await.unwrap();
    for key in key_names(redis, store).await {
        let _: () = redis::cmd("DEL").arg(key).query_async(&mut raw).await.unwrap();
    }
}

/// Instances a worker reports that were never placed on it are not adopted: the worker is told
/// to stop them, and nothing about them is written.
#[tokio::test]
async fn instances_with_no_record_are_not_adopted_outside_recovery() {
    let (redis, store) = setup().await;
    store.ensure_lineage().await.unwrap();
    let reg =
        store.register_worker("w1", true, "10.0.0.2-w1", LEASE, &inventory(4), "t").await.unwrap();
    store.create_deployment(&spec("m")).await.unwrap();
    let before = dbsize(&redis, &store).await;
    let running = [RunningInstance {
        instance_id: "m-made-up".into(),
        model: "m".into(),
        status: InstanceStatus::Ready,
        gpus: vec![0],
    }];
    let unknown = store.worker_ready("w1", reg.epoch, &running).await.unwrap();
    assert_eq!(unknown, ["m-made-up"], "the worker is told to stop it");
    assert!(store.get_instance("m-made-up").await.unwrap().is_none());
    assert!(store.model_instances("m").await.unwrap().is_empty());
    assert_eq!(store.get_worker("w1").await.unwrap().unwrap().free_gpus, [0, 1, 2, 3]);
    // Only the worker's own record and the event stream changed.
    assert_eq!(dbsize(&redis, &store).await, before);
    assert!(!store.recovering().await.unwrap());
    assert_consistent(&store).await;
}

/// When Redis comes back empty under a running registry, what the workers run is rebuilt from
/// their reports, for a while.
#[tokio::test]
async fn instances_the_store_lost_are_rebuilt_from_the_workers_report() {
    let (redis, store) = setup().await;
    let first = store.ensure_lineage().await.unwrap();
    store.register_worker("w1", true, "10.0.0.2-w1", LEASE, &inventory(4), "t").await.unwrap();
    // Redis loses everything (restarted without persistence).
    lose_everything(&redis, &store).await;
    let reg =
        store.register_worker("w1", true, "10.0.0.2-w1", LEASE, &inventory(4), "t").await.unwrap();
    assert!(store.recovering().await.unwrap(), "the loss is noticed at the first registration");
    assert_ne!(store.ensure_lineage().await.unwrap(), first, "the new state has a new name");
    let running = [
        RunningInstance {
            instance_id: "m-1".into(),
            model: "m".into(),
            status: InstanceStatus::Ready,
            gpus: vec![1],
        },
        RunningInstance {
            instance_id: "n-1".into(),
            model: "n".into(),
            status: InstanceStatus::Loading,
            gpus: vec![2, 3],
        },
    ];
    assert!(store.worker_ready("w1", reg.epoch, &running).await.unwrap().is_empty());
    let m = store.get_instance("m-1").await.unwrap().unwrap();
    assert_eq!(
        (m.model.as_str(), m.worker_id.as_str(), m.status),
        ("m", "w1", InstanceStatus::Ready)
    );
    assert_eq!(m.gpus, [1]);
    assert!(m.reason.contains("rebuilt"), "{}", m.reason);
    assert_eq!(store.get_instance("n-1").await.unwrap().unwrap().status, InstanceStatus::Loading);
    let w = store.get_worker("w1").await.unwrap().unwrap();
    assert_eq!(w.free_gpus, [0]);
    assert_eq!(store.model_instances("m").await.unwrap().len(), 1);

    // A store that never knew a lineage (a fresh cluster, or a replica started after the loss)
    // opens no window: an empty Redis is not taken for a lost one.
    lose_everything(&redis, &store).await;
    let fresh = redis.store_with(|c| c.namespace = store.config().namespace.clone()).await.unwrap();
    fresh.register_worker("w1", true, "10.0.0.2-w1", LEASE, &inventory(4), "t").await.unwrap();
    assert!(!fresh.recovering().await.unwrap());

    // A bad report is refused whole, naming the field.
    let reg =
        store.register_worker("w1", true, "10.0.0.2-w1", LEASE, &inventory(4), "t").await.unwrap();
    let bad = [RunningInstance {
        instance_id: "x".into(),
        model: "no spaces allowed".into(),
        status: InstanceStatus::Ready,
        gpus: vec![0],
    }];
    let err = store.worker_ready("w1", reg.epoch, &bad).await.unwrap_err();
    assert!(err.to_string().contains("running.model"), "{err}");
}

#[tokio::test]
async fn a_lost_worker_leaves_every_key_after_its_retention() {
    let (redis, store) = setup().await;
    store.create_deployment(&spec("m")).await.unwrap();
    let lease = lead(&store, "s").await;
    let gone = ready_worker(&store, "gone-7", 2).await;
    let back = ready_worker(&store, "back-8", 1).await;
    ready_worker(&store, "live-9", 1).await;
    // Everything a worker can own: instances, a command stream with an acknowledged cursor and
    // a command still pending, free GPUs, an address.
    store.create_instance(&lease, &placement("i1", "m", "gone-7", &[0])).await.unwrap();
    store.create_instance(&lease, &placement("i2", "m", "gone-7", &[1])).await.unwrap();
    let first = store.read_commands("gone-7", "0-0", 1).await.unwrap();
    store.ack_command("gone-7", &first[0].stream_id).await.unwrap();
    let actor = Actor::Worker { worker_id: "gone-7", epoch: gone };
    store.transition_instance("i1", InstanceStatus::Ready, actor, "", None).await.unwrap();
    store.worker_lost("gone-7", gone, LostMode::Dropped, "stream ended").await.unwrap();
    store.worker_lost("back-8", back, LostMode::Dropped, "stream ended").await.unwrap();
    assert_consistent(&store).await;

    // Within the retention nothing goes.
    assert!(store.forget_lost_workers(Duration::from_secs(3600), 10).await.unwrap().is_empty());
    assert!(store.get_worker("gone-7").await.unwrap().is_some());

    // A worker that came back is no longer due.
    store
        .register_worker("back-8", true, "10.0.0.6-back-8", LEASE, &inventory(1), "test")
        .await
        .unwrap();
    let removed = store.forget_lost_workers(Duration::ZERO, 10).await.unwrap();
    assert_eq!(removed, ["gone-7"]);
    assert!(store.get_worker("gone-7").await.unwrap().is_none());
    let ids: Vec<String> =
        store.list_workers().await.unwrap().into_iter().map(|w| w.worker_id).collect();
    assert_eq!(ids, ["back-8", "live-9"]);
    let left: Vec<String> =
        key_names(&redis, &store).await.into_iter().filter(|k| k.contains("gone-7")).collect();
    assert!(left.is_empty(), "keys of a removed worker remain: {left:?}");
    // Its instances ended with it (their records expire like any ended instance's).
    for i in ["i1", "i2"] {
        let rec = store.get_instance(i).await.unwrap().unwrap();
        assert_eq!(rec.status, InstanceStatus::Failed, "{i}");
        assert!(rec.reason.starts_with("worker lost"), "{i}: {}", rec.reason);
    }
    assert!(store.model_instances("m").await.unwrap().is_empty(), "nothing live is left on it");
    assert!(store.forget_lost_workers(Duration::ZERO, 10).await.unwrap().is_empty());
    assert_consistent(&store).await;
}

#[tokio::test]
async fn workers_lost_before_the_index_existed_are_indexed_and_removed() {
    let (redis, store) = setup().await;
    let epoch = ready_worker(&store, "old-1", 1).await;
    store.worker_lost("old-1", epoch, LostMode::Dropped, "stream ended").await.unwrap();
    // As a store written by an older version left it: lost, but not in the index.
    let mut raw = redis.raw().await.unwrap();
    let _: i64 = redis::cmd("ZREM")
        .arg(store.keys().lost_workers())
        .arg("old-1")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(store.forget_lost_workers(Duration::ZERO, 10).await.unwrap().is_empty());
    assert_eq!(store.index_lost_workers().await.unwrap(), 1);
    assert_eq!(store.index_lost_workers().await.unwrap(), 0, "indexing twice adds nothing");
    assert_eq!(store.forget_lost_workers(Duration::ZERO, 10).await.unwrap(), ["old-1"]);
    assert!(store.list_workers().await.unwrap().is_empty());
    assert_consistent(&store).await;
}
