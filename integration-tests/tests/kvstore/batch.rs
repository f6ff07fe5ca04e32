//! The leader's batched writes (`Store::write_as_leader`, `lua/leader_batch.lua`): each item is
//! applied or refused exactly as its own transition would be, on its own; a deposed leader's
//! batch writes nothing; a large batch is split into calls and keeps its order.

use kvstore::{ErrorKind, InstanceStatus, LeaderWrite, Refusal, Written};

use crate::*;

fn place(id: &str, model: &str, worker: &str, gpus: &[u32]) -> LeaderWrite {
    LeaderWrite::Place(placement(id, model, worker, gpus))
}

fn drain(id: &str) -> LeaderWrite {
    LeaderWrite::Move {
        instance_id: id.into(),
        to: InstanceStatus::Draining,
        reason: "surplus".into(),
        command: Some((format!("drain-{id}"), b"drain".to_vec())),
    }
}

fn desired(model: &str, n: u32) -> LeaderWrite {
    LeaderWrite::Desired {
        model: model.into(),
        desired: n,
        decision: format!("{{\"to\":{n}}}"),
        last_error: String::new(),
    }
}

fn refusal(r: &kvstore::Result<Written>) -> Option<Refusal> {
    r.as_ref().err().and_then(|e| e.refusal().cloned())
}

#[tokio::test]
async fn each_write_is_applied_or_refused_on_its_own() {
    let (_redis, store) = setup().await;
    store.create_deployment(&spec("m")).await.unwrap();
    store.create_deployment(&spec("n")).await.unwrap();
    let epoch = ready_worker(&store, "w1", 2).await;
    let lease = lead(&store, "s").await;
    store.create_instance(&lease, &placement("i0", "m", "w1", &[0])).await.unwrap();
    let me = kvstore::Actor::Worker { worker_id: "w1", epoch };
    store.transition_instance("i0", InstanceStatus::Ready, me, "", None).await.unwrap();

    let writes = vec![
        place("i1", "m", "w1", &[1]),
        // GPU 0 is i0's: the leader's view was stale.
        place("i2", "n", "w1", &[0]),
        // GPU 1 went to i1 earlier in this very batch.
        place("i3", "n", "w1", &[1]),
        drain("i0"),
        drain("gone"),
        // Already draining: a repeated write changes nothing.
        drain("i0"),
        desired("m", 2),
        desired("nope", 1),
        LeaderWrite::Unplaceable { model: "n".into(), reason: "needs 64 GPUs".into() },
        LeaderWrite::Unplaceable { model: "n".into(), reason: "needs 64 GPUs".into() },
        // Invalid: refused before any call.
        place("i4", "m", "w1", &[]),
        LeaderWrite::Move {
            instance_id: "i1".into(),
            to: InstanceStatus::Ready,
            reason: String::new(),
            command: None,
        },
    ];
    let out = store.write_as_leader(&lease, &writes).await;
    assert_eq!(out.len(), writes.len());
    assert!(matches!(out[0], Ok(Written::Placed { version: 1 })), "{:?}", out[0]);
    assert_eq!(refusal(&out[1]), Some(Refusal::GpuBusy { gpu: 0 }));
    assert_eq!(refusal(&out[2]), Some(Refusal::GpuBusy { gpu: 1 }));
    assert!(matches!(out[3], Ok(Written::Moved(t)) if t.changed && t.version == 3), "{:?}", out[3]);
    assert_eq!(refusal(&out[4]), Some(Refusal::NotFound));
    assert!(matches!(out[5], Ok(Written::Moved(t)) if !t.changed), "{:?}", out[5]);
    assert!(matches!(out[6], Ok(Written::Desired { previous: 0 })), "{:?}", out[6]);
    assert_eq!(refusal(&out[7]), Some(Refusal::NotFound));
    assert!(matches!(out[8], Ok(Written::Unplaceable { changed: true })), "{:?}", out[8]);
    assert!(matches!(out[9], Ok(Written::Unplaceable { changed: false })), "{:?}", out[9]);
    assert_eq!(out[10].as_ref().map_err(|e| e.kind()).err(), Some(ErrorKind::InvalidArgument));
    assert_eq!(refusal(&out[11]), Some(Refusal::NotAllowed));
    // The refusals name the transition, as the single calls do.
    let single = store.create_instance(&lease, &placement("i2", "n", "w1", &[0])).await;
    assert_eq!(out[1].as_ref().err().map(ToString::to_string), single.err().map(|e| e.to_string()));

    // What was applied is there, with its commands; what was refused left nothing.
    let i1 = store.get_instance("i1").await.unwrap().unwrap();
    assert_eq!((i1.status, i1.gpus.as_slice()), (InstanceStatus::Pending, &[1][..]));
    assert_eq!(store.get_instance("i0").await.unwrap().unwrap().status, InstanceStatus::Draining);
    assert!(store.get_instance("i2").await.unwrap().is_none());
    assert!(store.get_instance("i3").await.unwrap().is_none());
    assert!(store.get_worker("w1").await.unwrap().unwrap().free_gpus.is_empty());
    let commands: Vec<String> = store
        .read_commands("w1", "0-0", 10)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.command_id)
        .collect();
    assert_eq!(commands, ["start-i0", "start-i1", "drain-i0"]);
    let m = store.get_deployment("m").await.unwrap().unwrap();
    assert_eq!((m.desired, m.last_decision.as_str()), (2, "{\"to\":2}"));
    assert_eq!(
        store.unplaceable_models().await.unwrap().get("n").map(String::as_str),
        Some("needs 64 GPUs")
    );
    assert_consistent(&store).await;
}

#[tokio::test]
async fn a_deposed_leaders_batch_writes_nothing() {
    let (redis, store) = setup().await;
    store.create_deployment(&spec("m")).await.unwrap();
    ready_worker(&store, "w1", 2).await;
    let lease = lead(&store, "s").await;
    store.create_instance(&lease, &placement("i0", "m", "w1", &[0])).await.unwrap();
    let before = key_names(&redis, &store).await;
    let events = store.event_position().await.unwrap();

    // A successor took over: the old token is stale.
    store.release_leader(&lease).await.unwrap();
    let successor = lead(&store, "t").await;
    assert!(successor.token > lease.token);
    let writes = vec![
        place("i1", "m", "w1", &[1]),
        drain("i0"),
        desired("m", 3),
        LeaderWrite::Unplaceable { model: "m".into(), reason: "no".into() },
    ];
    let out = store.write_as_leader(&lease, &writes).await;
    assert!(out.iter().all(|r| refusal(r) == Some(Refusal::NotLeader)), "{out:?}");
    let after = key_names(&redis, &store).await;
    assert_eq!(before.len(), after.len(), "only the lease changed hands");
    assert_eq!(store.get_instance("i0").await.unwrap().unwrap().status, InstanceStatus::Pending);
    assert!(store.get_instance("i1").await.unwrap().is_none());
    assert_eq!(store.get_deployment("m").await.unwrap().unwrap().desired, 0);
    assert_eq!(store.read_commands("w1", "0-0", 10).await.unwrap().len(), 1, "no command sent");
    let mut reader = store.event_reader(events);
    let seen = match reader.next_batch(std::time::Duration::from_millis(50), 100).await.unwrap() {
        kvstore::EventBatch::Events(e) => e,
        other => panic!("{other:?}"),
    };
    assert!(
        seen.iter().all(|e| e.kind.starts_with("leader.")),
        "only the lease's own events: {:?}",
        seen.iter().map(|e| &e.kind).collect::<Vec<_>>()
    );
    assert_consistent(&store).await;
}

#[tokio::test]
async fn a_large_batch_is_split_into_calls_in_order() {
    let (_redis, store) = setup().await;
    let n = 2 * kvstore::MAX_ITEMS_PER_CALL + 7;
    for w in 0..n.div_ceil(8) {
        ready_worker(&store, &format!("w{w}"), 8).await;
    }
    let lease = lead(&store, "s").await;
    let mut writes = Vec::new();
    for i in 0..n {
        let model = format!("m{i}");
        store.create_deployment(&spec(&model)).await.unwrap();
        writes.push(place(&format!("i{i}"), &model, &format!("w{}", i / 8), &[(i % 8) as u32]));
        writes.push(desired(&model, 1));
    }
    // The last placement takes a GPU taken earlier in the batch, two calls before.
    writes.push(place("late", "m0", "w0", &[0]));
    let events = store.event_position().await.unwrap();
    let out = store.write_as_leader(&lease, &writes).await;
    assert_eq!(out.len(), writes.len());
    assert!(out[..2 * n].iter().all(Result::is_ok), "{:?}", out.iter().find(|r| r.is_err()));
    assert_eq!(refusal(&out[2 * n]), Some(Refusal::GpuBusy { gpu: 0 }));
    // Events in the order of the writes.
    let mut reader = store.event_reader(events);
    let mut seen = Vec::new();
    while seen.len() < 2 * n {
        match reader.next_batch(std::time::Duration::from_millis(200), 1000).await.unwrap() {
            kvstore::EventBatch::Events(e) if !e.is_empty() => seen.extend(e),
            other => panic!("events stopped at {}: {other:?}", seen.len()),
        }
    }
    let expected: Vec<(String, String)> = (0..n)
        .flat_map(|i| {
            [
                ("instance.pending".to_string(), format!("i{i}")),
                ("deployment.scaled".to_string(), format!("m{i}")),
            ]
        })
        .collect();
    let got: Vec<(String, String)> = seen.into_iter().map(|e| (e.kind, e.entity)).collect();
    assert_eq!(got, expected);
    assert_consistent(&store).await;
}
