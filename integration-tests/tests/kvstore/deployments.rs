use kvstore::{AutoScaling, DeploymentStatus, ErrorKind, Refusal};

use crate::*;

#[tokio::test]
async fn create_get_list_and_duplicate() {
    let (_redis, store) = setup().await;
    let rec = store.create_deployment(&spec("facebook/opt-1.3b")).await.unwrap();
    assert_eq!(rec.version, 1);
    assert_eq!(rec.status, DeploymentStatus::Active);
    let got = store.get_deployment("facebook/opt-1.3b").await.unwrap().unwrap();
    assert_eq!(got.spec, spec("facebook/opt-1.3b"));
    assert_eq!(got.created_ms, rec.created_ms);
    store.create_deployment(&spec("a-model")).await.unwrap();
    let names: Vec<_> =
        store.list_deployments().await.unwrap().into_iter().map(|d| d.spec.model).collect();
    assert_eq!(names, ["a-model", "facebook/opt-1.3b"]);

    let err = store.create_deployment(&spec("a-model")).await.unwrap_err();
    assert_eq!(err.refusal(), Some(&Refusal::AlreadyExists));
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
    assert!(store.get_deployment("missing").await.unwrap().is_none());
    assert_consistent(&store).await;
}

#[tokio::test]
async fn update_checks_state_and_version() {
    let (_redis, store) = setup().await;
    store.create_deployment(&spec("m")).await.unwrap();
    let policy =
        AutoScaling { min_instances: 1, max_instances: 8, target: 4.0, ..AutoScaling::default() };
    let v = store.update_autoscaling("m", &policy, 1).await.unwrap();
    assert_eq!(v, 2);
    assert_eq!(store.get_deployment("m").await.unwrap().unwrap().spec.autoscaling, policy);

    let err = store.update_autoscaling("m", &policy, 1).await.unwrap_err();
    assert_eq!(err.refusal(), Some(&Refusal::StaleVersion { current: 2 }));
    assert_eq!(err.kind(), ErrorKind::Aborted);
    // Version 0 means "whatever the version".
    assert_eq!(store.update_autoscaling("m", &policy, 0).await.unwrap(), 3);

    let err = store.update_autoscaling("nope", &policy, 0).await.unwrap_err();
    assert_eq!(err.refusal(), Some(&Refusal::NotFound));

    store.mark_deployment_deleting("m").await.unwrap();
    let err = store.update_autoscaling("m", &policy, 0).await.unwrap_err();
    assert_eq!(err.refusal(), Some(&Refusal::WrongState { current: "deleting".into() }));
}

#[tokio::test]
async fn delete_waits_for_instances_then_removes() {
    let (_redis, store) = setup().await;
    store.create_deployment(&spec("m")).await.unwrap();
    let epoch = ready_worker(&store, "w1", 2).await;
    let lease = lead(&store, "scaler-a").await;
    store.create_instance(&lease, &placement("i1", "m", "w1", &[0])).await.unwrap();

    let err = store.remove_deployment("m").await.unwrap_err();
    assert_eq!(err.refusal(), Some(&Refusal::WrongState { current: "active".into() }));

    store.mark_deployment_deleting("m").await.unwrap();
    let err = store.mark_deployment_deleting("m").await.unwrap_err();
    assert_eq!(err.refusal(), Some(&Refusal::WrongState { current: "deleting".into() }));
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    // No new instance for a deleting deployment.
    let err = store.create_instance(&lease, &placement("i2", "m", "w1", &[1])).await.unwrap_err();
    assert_eq!(err.refusal(), Some(&Refusal::WrongState { current: "deleting".into() }));

    let err = store.remove_deployment("m").await.unwrap_err();
    assert_eq!(err.refusal(), Some(&Refusal::HasInstances { count: 1 }));
    store
        .transition_instance(
            "i1",
            kvstore::InstanceStatus::Stopped,
            kvstore::Actor::Worker { worker_id: "w1", epoch },
            "drained",
            None,
        )
        .await
        .unwrap();
    store.remove_deployment("m").await.unwrap();
    assert!(store.get_deployment("m").await.unwrap().is_none());
    assert!(store.list_deployments().await.unwrap().is_empty());
    let err = store.remove_deployment("m").await.unwrap_err();
    assert_eq!(err.refusal(), Some(&Refusal::NotFound));
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert_consistent(&store).await;
}

#[tokio::test]
async fn desired_count_is_fenced_by_the_leader_lease() {
    let (_redis, store) = setup().await;
    store.create_deployment(&spec("m")).await.unwrap();
    let old = lead(&store, "scaler-a").await;
    assert_eq!(store.set_desired(&old, "m", 2, "scale 0->2", "").await.unwrap(), 0);
    store.release_leader(&old).await.unwrap();
    let new = lead(&store, "scaler-b").await;
    assert!(new.token > old.token);
    let err = store.set_desired(&old, "m", 5, "stale", "").await.unwrap_err();
    assert_eq!(err.refusal(), Some(&Refusal::NotLeader));
    assert_eq!(store.set_desired(&new, "m", 1, "scale 2->1", "").await.unwrap(), 2);
    let d = store.get_deployment("m").await.unwrap().unwrap();
    assert_eq!((d.desired, d.last_decision.as_str()), (1, "scale 2->1"));
    // The Scaler's own fields do not bump the user-visible version.
    assert_eq!(d.version, 1);
    let err = store.set_desired(&new, "gone", 1, "", "").await.unwrap_err();
    assert_eq!(err.refusal(), Some(&Refusal::NotFound));
}

/// The `deployment.unplaceable` events since `reader`'s position, as (model, reason).
async fn unplaceable_events(reader: &mut kvstore::EventReader) -> Vec<(String, String)> {
    let mut out = Vec::new();
    loop {
        match reader.next_batch(std::time::Duration::ZERO, 1000).await.unwrap() {
            kvstore::EventBatch::Events(e) if e.is_empty() => return out,
            kvstore::EventBatch::Events(e) => {
                out.extend(e.into_iter().filter(|e| e.kind == "deployment.unplaceable").map(|e| {
                    let reason = e.field("reason").unwrap_or("<no reason field>").to_string();
                    (e.entity, reason)
                }))
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn unplaceable_marks_are_fenced_published_on_change_and_go_with_the_deployment() {
    let (_redis, store) = setup().await;
    store.create_deployment(&spec("big")).await.unwrap();
    store.create_deployment(&spec("small")).await.unwrap();
    let lease = lead(&store, "scaler-a").await;
    let mut reader = store.event_reader(store.event_position().await.unwrap());
    let why = "needs 64 GPUs; the largest worker has 4";

    assert!(store.set_unplaceable(&lease, "big", why).await.unwrap());
    // The same verdict again is no change: no second event.
    assert!(!store.set_unplaceable(&lease, "big", why).await.unwrap());
    // Clearing a model that was never marked is no change either.
    assert!(!store.set_unplaceable(&lease, "small", "").await.unwrap());
    assert_eq!(unplaceable_events(&mut reader).await, [("big".to_string(), why.to_string())]);
    let marks = store.unplaceable_models().await.unwrap();
    assert_eq!(marks.len(), 1);
    assert_eq!(marks["big"], why);

    // Only the leader writes; a model that is not deployed cannot be marked.
    store.release_leader(&lease).await.unwrap();
    let new = lead(&store, "scaler-b").await;
    let err = store.set_unplaceable(&lease, "big", "").await.unwrap_err();
    assert_eq!(err.refusal(), Some(&Refusal::NotLeader));
    let err = store.set_unplaceable(&new, "nope", why).await.unwrap_err();
    assert_eq!(err.refusal(), Some(&Refusal::NotFound));
    let err = store.set_unplaceable(&new, "bad name!", why).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);

    // Placeable again: the mark goes and an event with an empty reason says so.
    assert!(store.set_unplaceable(&new, "big", "").await.unwrap());
    assert!(store.unplaceable_models().await.unwrap().is_empty());
    assert_eq!(unplaceable_events(&mut reader).await, [("big".to_string(), String::new())]);

    // Removing a marked deployment clears its mark, with the clearing event.
    assert!(store.set_unplaceable(&new, "small", "no worker has 1 free GPU").await.unwrap());
    store.mark_deployment_deleting("small").await.unwrap();
    store.remove_deployment("small").await.unwrap();
    assert!(store.unplaceable_models().await.unwrap().is_empty());
    assert_eq!(
        unplaceable_events(&mut reader).await,
        [
            ("small".to_string(), "no worker has 1 free GPU".to_string()),
            ("small".to_string(), String::new())
        ]
    );
    assert!(store.check_invariants().await.unwrap().is_empty());
}
