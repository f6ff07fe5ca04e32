use kvstore::{Actor, ErrorKind, InstanceStatus, Refusal};

use crate::*;

#[tokio::test]
async fn the_life_of_an_instance() {
    let (_redis, store) = setup().await;
    store.create_deployment(&spec("m")).await.unwrap();
    let epoch = ready_worker(&store, "w1", 2).await;
    let lease = lead(&store, "s").await;
    assert_eq!(store.create_instance(&lease, &placement("i1", "m", "w1", &[1])).await.unwrap(), 1);
    let rec = store.get_instance("i1").await.unwrap().unwrap();
    assert_eq!(
        (rec.status, rec.gpus.as_slice(), rec.worker_id.as_str()),
        (InstanceStatus::Pending, &[1][..], "w1")
    );
    assert_eq!(store.get_worker("w1").await.unwrap().unwrap().free_gpus, [0]);
    // The start command went to the worker in the same step.
    let cmds = store.read_commands("w1", "0-0", 10).await.unwrap();
    assert_eq!(cmds.len(), 1);
    assert_eq!(
        (cmds[0].command_id.as_str(), cmds[0].body.as_slice()),
        ("start-i1", &b"start i1"[..])
    );

    let me = Actor::Worker { worker_id: "w1", epoch };
    let t = store.transition_instance("i1", InstanceStatus::Loading, me, "", None).await.unwrap();
    assert!(t.changed);
    store.transition_instance("i1", InstanceStatus::Ready, me, "", None).await.unwrap();
    // A repeated report (a command delivered twice) changes nothing.
    let t = store.transition_instance("i1", InstanceStatus::Ready, me, "", None).await.unwrap();
    assert!(!t.changed);
    assert_eq!(t.version, 3);
    assert_eq!(store.model_instances("m").await.unwrap().len(), 1);
    assert_eq!(store.instances_in(InstanceStatus::Ready).await.unwrap()[0].instance_id, "i1");

    // Draining is the leader's decision and carries the drain command.
    let err =
        store.transition_instance("i1", InstanceStatus::Draining, me, "", None).await.unwrap_err();
    assert_eq!(err.refusal(), Some(&Refusal::NotAllowed));
    store
        .transition_instance(
            "i1",
            InstanceStatus::Draining,
            Actor::Leader(&lease),
            "scale 1->0",
            Some(("drain-i1", b"drain")),
        )
        .await
        .unwrap();
    let cmds = store.read_commands("w1", &cmds[0].stream_id, 10).await.unwrap();
    assert_eq!(cmds.iter().map(|c| c.command_id.as_str()).collect::<Vec<_>>(), ["drain-i1"]);

    store.transition_instance("i1", InstanceStatus::Stopped, me, "drained", None).await.unwrap();
    let rec = store.get_instance("i1").await.unwrap().unwrap();
    assert_eq!((rec.status, rec.reason.as_str()), (InstanceStatus::Stopped, "drained"));
    assert!(store.model_instances("m").await.unwrap().is_empty());
    assert_eq!(store.get_worker("w1").await.unwrap().unwrap().free_gpus, [0, 1], "GPU given back");
    let err =
        store.transition_instance("i1", InstanceStatus::Ready, me, "", None).await.unwrap_err();
    assert_eq!(err.refusal(), Some(&Refusal::WrongState { current: "stopped".into() }));
    assert_consistent(&store).await;
}

#[tokio::test]
async fn placement_refusals() {
    let (redis, store) = setup().await;
    store.create_deployment(&spec("m")).await.unwrap();
    ready_worker(&store, "w1", 2).await;
    let lease = lead(&store, "s").await;
    store.create_instance(&lease, &placement("i1", "m", "w1", &[0])).await.unwrap();
    let before = dbsize(&redis, &store).await;

    let cases: Vec<(kvstore::Placement, Refusal)> = vec![
        (placement("i1", "m", "w1", &[1]), Refusal::AlreadyExists),
        (placement("i2", "m", "w1", &[0]), Refusal::GpuBusy { gpu: 0 }),
        (placement("i2", "m", "w1", &[1, 0]), Refusal::GpuBusy { gpu: 0 }),
        (placement("i2", "m", "w1", &[7]), Refusal::GpuBusy { gpu: 7 }),
        (placement("i2", "nope", "w1", &[1]), Refusal::NotFound),
        (placement("i2", "m", "w9", &[1]), Refusal::WorkerNotFound),
    ];
    for (p, refusal) in cases {
        let err = store.create_instance(&lease, &p).await.unwrap_err();
        assert_eq!(err.refusal(), Some(&refusal), "{p:?}");
    }
    let mut stale = lease.clone();
    stale.token += 1;
    let err = store.create_instance(&stale, &placement("i2", "m", "w1", &[1])).await.unwrap_err();
    assert_eq!(err.refusal(), Some(&Refusal::NotLeader));
    let err = store.create_instance(&lease, &placement("i2", "m", "w1", &[])).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    let err =
        store.create_instance(&lease, &placement("i2", "m", "w1", &[1, 1])).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert_eq!(dbsize(&redis, &store).await, before, "refusals write nothing");
    assert_eq!(store.read_commands("w1", "0-0", 10).await.unwrap().len(), 1, "no command sent");
    assert_consistent(&store).await;
}

#[tokio::test]
async fn workers_report_only_on_their_own_instances_and_in_order() {
    let (_redis, store) = setup().await;
    store.create_deployment(&spec("m")).await.unwrap();
    let e1 = ready_worker(&store, "w1", 1).await;
    let e2 = ready_worker(&store, "w2", 1).await;
    let lease = lead(&store, "s").await;
    store.create_instance(&lease, &placement("i1", "m", "w1", &[0])).await.unwrap();
    let other = Actor::Worker { worker_id: "w2", epoch: e2 };
    let err =
        store.transition_instance("i1", InstanceStatus::Ready, other, "", None).await.unwrap_err();
    assert_eq!(err.refusal(), Some(&Refusal::WrongWorker { owner: "w1".into() }));

    let me = Actor::Worker { worker_id: "w1", epoch: e1 };
    store.transition_instance("i1", InstanceStatus::Ready, me, "", None).await.unwrap();
    let err =
        store.transition_instance("i1", InstanceStatus::Loading, me, "", None).await.unwrap_err();
    assert_eq!(err.refusal(), Some(&Refusal::WrongState { current: "ready".into() }));
    let err =
        store.transition_instance("nope", InstanceStatus::Ready, me, "", None).await.unwrap_err();
    assert_eq!(err.refusal(), Some(&Refusal::NotFound));
    let err =
        store.transition_instance("i1", InstanceStatus::Lost, me, "", None).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);

    // A failure keeps its reason and frees the GPU.
    store
        .transition_instance("i1", InstanceStatus::Failed, me, "CUDA out of memory", None)
        .await
        .unwrap();
    let rec = store.get_instance("i1").await.unwrap().unwrap();
    assert_eq!((rec.status, rec.reason.as_str()), (InstanceStatus::Failed, "CUDA out of memory"));
    assert_eq!(store.get_worker("w1").await.unwrap().unwrap().free_gpus, [0]);
    assert_consistent(&store).await;
}

#[tokio::test]
async fn the_leader_can_fail_an_instance_that_never_loaded() {
    let (_redis, store) = setup().await;
    store.create_deployment(&spec("m")).await.unwrap();
    ready_worker(&store, "w1", 1).await;
    let lease = lead(&store, "s").await;
    store.create_instance(&lease, &placement("i1", "m", "w1", &[0])).await.unwrap();
    store
        .transition_instance(
            "i1",
            InstanceStatus::Failed,
            Actor::Leader(&lease),
            "load timed out after 120 s",
            None,
        )
        .await
        .unwrap();
    assert_eq!(store.get_instance("i1").await.unwrap().unwrap().status, InstanceStatus::Failed);
    assert_consistent(&store).await;
}
