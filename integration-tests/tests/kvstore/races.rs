use std::time::Duration;

use futures::future::join_all;
use kvstore::worker::LostMode;
use kvstore::{Acquired, Actor, InstanceStatus, Refusal};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::*;

#[tokio::test]
async fn many_creators_of_one_deployment_exactly_one_wins() {
    let (_redis, store) = setup().await;
    let results = join_all((0..32).map(|_| {
        let store = store.clone();
        async move { store.create_deployment(&spec("hot")).await }
    }))
    .await;
    let wins = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(wins, 1);
    for r in results.into_iter().filter_map(Result::err) {
        assert_eq!(r.refusal(), Some(&Refusal::AlreadyExists));
    }
    assert_consistent(&store).await;
}

#[tokio::test]
async fn many_placements_on_one_gpu_exactly_one_wins() {
    let (_redis, store) = setup().await;
    store.create_deployment(&spec("m")).await.unwrap();
    ready_worker(&store, "w1", 1).await;
    let lease = lead(&store, "s").await;
    let results =
        join_all((0..32).map(|i| {
            let (store, lease) = (store.clone(), lease.clone());
            async move {
                store.create_instance(&lease, &placement(&format!("i{i}"), "m", "w1", &[0])).await
            }
        }))
        .await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
    for r in results.into_iter().filter_map(Result::err) {
        assert_eq!(r.refusal(), Some(&Refusal::GpuBusy { gpu: 0 }));
    }
    assert_eq!(store.read_commands("w1", "0-0", 100).await.unwrap().len(), 1, "one start command");
    assert_consistent(&store).await;
}

#[tokio::test]
async fn many_candidates_one_leader() {
    let (_redis, store) = setup().await;
    let results = join_all((0..16).map(|i| {
        let store = store.clone();
        async move {
            store.acquire_leader("scaler", &format!("s{i}"), Duration::from_secs(5)).await.unwrap()
        }
    }))
    .await;
    let leaders: Vec<_> = results
        .iter()
        .filter_map(|r| match r {
            Acquired::Leader(l) => Some(l.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(leaders.len(), 1);
    for r in &results {
        if let Acquired::Follower { holder, token, .. } = r {
            assert_eq!((holder, *token), (&leaders[0].holder, leaders[0].token));
        }
    }
}

#[tokio::test]
async fn concurrent_deletes_and_one_instances_racing_reports() {
    let (_redis, store) = setup().await;
    store.create_deployment(&spec("m")).await.unwrap();
    let deletes = join_all((0..16).map(|_| {
        let store = store.clone();
        async move { store.mark_deployment_deleting("m").await }
    }))
    .await;
    assert_eq!(deletes.iter().filter(|r| r.is_ok()).count(), 1);

    store.create_deployment(&spec("n")).await.unwrap();
    let epoch = ready_worker(&store, "w1", 1).await;
    let lease = lead(&store, "s").await;
    store.create_instance(&lease, &placement("i1", "n", "w1", &[0])).await.unwrap();
    let targets = [
        InstanceStatus::Ready,
        InstanceStatus::Failed,
        InstanceStatus::Stopped,
        InstanceStatus::Loading,
    ];
    let results = join_all((0..32).map(|i| {
        let store = store.clone();
        let to = targets[i % targets.len()];
        async move {
            store
                .transition_instance(
                    "i1",
                    to,
                    Actor::Worker { worker_id: "w1", epoch },
                    "race",
                    None,
                )
                .await
        }
    }))
    .await;
    // Whatever the order, it ended in exactly one terminal state, reached exactly once.
    let terminal_wins = results
        .iter()
        .zip((0..32).map(|i| targets[i % targets.len()]))
        .filter(|(r, to)| to.is_terminal() && matches!(r, Ok(t) if t.changed))
        .count();
    assert_eq!(terminal_wins, 1);
    assert!(store.get_instance("i1").await.unwrap().unwrap().status.is_terminal());
    assert_consistent(&store).await;
}

/// Random operations from many tasks against a few workers, models and GPUs; afterwards every
/// record agrees with every index and no GPU is promised twice.
#[tokio::test]
async fn a_storm_of_random_transitions_leaves_state_consistent() {
    let (_redis, store) = setup().await;
    for m in ["m0", "m1"] {
        store.create_deployment(&spec(m)).await.unwrap();
    }
    for w in ["w0", "w1", "w2"] {
        ready_worker(&store, w, 2).await;
    }
    let lease = lead(&store, "s").await;
    let tasks = (0..8u64).map(|t| {
        let (store, lease) = (store.clone(), lease.clone());
        tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(t);
            for step in 0..60 {
                let w = format!("w{}", rng.random_range(0..3));
                let i = format!("i{}", rng.random_range(0..12));
                let epoch = store.get_worker(&w).await.unwrap().map(|r| r.epoch).unwrap_or(1);
                let me = Actor::Worker { worker_id: &w, epoch };
                let result = match rng.random_range(0..10) {
                    0..=2 => {
                        let m = format!("m{}", rng.random_range(0..2));
                        let g = rng.random_range(0..2);
                        store
                            .create_instance(&lease, &placement(&i, &m, &w, &[g]))
                            .await
                            .map(|_| ())
                    }
                    3 => store
                        .transition_instance(&i, InstanceStatus::Loading, me, "", None)
                        .await
                        .map(|_| ()),
                    4 => store
                        .transition_instance(&i, InstanceStatus::Ready, me, "", None)
                        .await
                        .map(|_| ()),
                    5 => store
                        .transition_instance(
                            &i,
                            InstanceStatus::Draining,
                            Actor::Leader(&lease),
                            "",
                            None,
                        )
                        .await
                        .map(|_| ()),
                    6 => store
                        .transition_instance(&i, InstanceStatus::Stopped, me, "", None)
                        .await
                        .map(|_| ()),
                    7 => store.worker_lost(&w, epoch, LostMode::Dropped, "storm").await.map(|_| ()),
                    8 => {
                        let address = format!("10.9.{t}.{step}");
                        match store
                            .register_worker(&w, true, &address, LEASE, &inventory(2), "t")
                            .await
                        {
                            Ok(r) => store.worker_ready(&w, r.epoch, &[]).await.map(|_| ()),
                            Err(e) => Err(e),
                        }
                    }
                    _ => store.heartbeat(&w, epoch, LEASE).await.map(|_| ()),
                };
                if let Err(e) = result {
                    assert!(e.refusal().is_some(), "only refusals are expected, got {e}");
                }
            }
        })
    });
    for t in join_all(tasks).await {
        t.unwrap();
    }
    assert_consistent(&store).await;
}
