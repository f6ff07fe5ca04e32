use std::time::Duration;

use kvstore::{EventBatch, Position, Store};

use crate::*;

const NO_WAIT: Duration = Duration::ZERO;

async fn events(reader: &mut kvstore::EventReader, block: Duration) -> Vec<kvstore::Event> {
    match reader.next_batch(block, 1000).await.unwrap() {
        EventBatch::Events(e) => e,
        other => panic!("expected events, got {other:?}"),
    }
}

#[tokio::test]
async fn every_transition_emits_its_event_in_order() {
    let (_redis, store) = setup().await;
    let mut reader = store.event_reader(store.event_position().await.unwrap());
    store.create_deployment(&spec("m")).await.unwrap();
    let epoch = ready_worker(&store, "w1", 1).await;
    let lease = lead(&store, "s").await;
    store.create_instance(&lease, &placement("i1", "m", "w1", &[0])).await.unwrap();
    let me = kvstore::Actor::Worker { worker_id: "w1", epoch };
    store.transition_instance("i1", kvstore::InstanceStatus::Ready, me, "", None).await.unwrap();
    store.heartbeat("w1", epoch, LEASE).await.unwrap();

    let got = events(&mut reader, NO_WAIT).await;
    let kinds: Vec<(&str, &str)> =
        got.iter().map(|e| (e.kind.as_str(), e.entity.as_str())).collect();
    assert_eq!(
        kinds,
        [
            ("deployment.created", "m"),
            ("worker.registered", "w1"),
            ("worker.ready", "w1"),
            ("leader.acquired", "scaler"),
            ("instance.pending", "i1"),
            ("instance.ready", "i1"),
        ],
        "heartbeats emit nothing"
    );
    let seqs: Vec<u64> = got.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=6).collect::<Vec<_>>());
    assert_eq!(got[5].field("model"), Some("m"));
    assert_eq!(got[5].field("worker"), Some("w1"));
    assert_eq!(reader.position(), &store.event_position().await.unwrap());
}

#[tokio::test]
async fn a_reader_that_resumes_misses_nothing_and_repeats_nothing() {
    let (_redis, store) = setup().await;
    let mut first = store.event_reader(Position::start());
    for i in 0..3 {
        store.create_deployment(&spec(&format!("m{i}"))).await.unwrap();
    }
    assert_eq!(events(&mut first, NO_WAIT).await.len(), 3);
    let saved = first.position().clone();
    drop(first);
    for i in 3..7 {
        store.create_deployment(&spec(&format!("m{i}"))).await.unwrap();
    }
    let mut second = store.event_reader(saved);
    let got: Vec<String> =
        events(&mut second, NO_WAIT).await.into_iter().map(|e| e.entity).collect();
    assert_eq!(got, ["m3", "m4", "m5", "m6"]);
    assert!(events(&mut second, NO_WAIT).await.is_empty());
}

#[tokio::test]
async fn a_blocked_reader_wakes_on_the_next_event_and_survives_a_dropped_connection() {
    let (redis, store) = setup().await;
    let mut reader = store.event_reader(store.event_position().await.unwrap());
    let writer = store.clone();
    let task = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        writer.create_deployment(&spec("late")).await.unwrap();
    });
    let got = events(&mut reader, Duration::from_secs(1)).await;
    assert_eq!(got.iter().map(|e| e.entity.as_str()).collect::<Vec<_>>(), ["late"]);
    task.await.unwrap();

    // Kill every client connection. Each caller sees at most a retryable error, the reader
    // reconnects, and it sees exactly the events of the writes that succeeded.
    let mut raw = redis.raw().await.unwrap();
    let _: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("SKIPME")
        .arg("yes")
        .query_async(&mut raw)
        .await
        .unwrap();
    let mut created = Vec::new();
    for i in 0..6 {
        let name = format!("after-kill-{i}");
        match store.create_deployment(&spec(&name)).await {
            Ok(_) => created.push(name),
            Err(e) => assert!(e.is_retryable(), "{e}"),
        }
    }
    assert!(created.len() >= 5, "only the first write on a dead connection may fail: {created:?}");
    let mut seen = Vec::new();
    for _ in 0..4 {
        match reader.next_batch(NO_WAIT, 100).await {
            Ok(EventBatch::Events(e)) => seen.extend(e.into_iter().map(|e| e.entity)),
            Ok(other) => panic!("{other:?}"),
            Err(e) => assert!(e.is_retryable(), "{e}"),
        }
    }
    assert_eq!(seen, created);
    // Reads retry once on a fresh connection by themselves.
    let _: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("SKIPME")
        .arg("yes")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(store.list_deployments().await.unwrap().len(), 1 + created.len());
}

#[tokio::test]
async fn a_reader_behind_the_trim_is_told_to_resync() {
    let redis = Redis::start_with(&["--stream-node-max-entries", "2"]).unwrap();
    let store: Store = redis.store_with(|c| c.events_maxlen = 4).await.unwrap();
    store.create_deployment(&spec("m0")).await.unwrap();
    let mut reader = store.event_reader(store.event_position().await.unwrap());
    for i in 1..40 {
        store.create_deployment(&spec(&format!("m{i}"))).await.unwrap();
    }
    let resume = match reader.next_batch(NO_WAIT, 1000).await.unwrap() {
        EventBatch::FellBehind { resume } => resume,
        other => panic!("expected FellBehind, got {other:?}"),
    };
    assert_eq!(resume, store.event_position().await.unwrap());
    assert_eq!(resume.seq, 40);
    // After the resync the reader goes on from the end, gap-free.
    store.create_deployment(&spec("next")).await.unwrap();
    let got = events(&mut reader, NO_WAIT).await;
    assert_eq!((got.len(), got[0].entity.as_str(), got[0].seq), (1, "next", 41));
}

#[tokio::test]
async fn commands_survive_a_session_moving_to_another_replica() {
    let (_redis, store) = setup().await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            store
                .send_command("w1", &format!("c{i}"), format!("body{i}").as_bytes())
                .await
                .unwrap(),
        );
    }
    // Replica A delivers all three; the worker acknowledges the first two, then A dies.
    let mut a = store.command_reader("w1").await.unwrap();
    let got = a.next(Duration::ZERO, 10).await.unwrap();
    assert_eq!(got.iter().map(|c| c.command_id.as_str()).collect::<Vec<_>>(), ["c0", "c1", "c2"]);
    assert_eq!(got[2].body, b"body2");
    assert!(store.ack_command("w1", &ids[1]).await.unwrap());
    drop(a);

    // Replica B picks the session up: the unacknowledged command comes again, nothing else.
    let mut b = store.command_reader("w1").await.unwrap();
    let again = b.next(Duration::ZERO, 10).await.unwrap();
    assert_eq!(again.iter().map(|c| c.command_id.as_str()).collect::<Vec<_>>(), ["c2"]);
    assert!(store.ack_command("w1", &ids[2]).await.unwrap());
    assert!(!store.ack_command("w1", &ids[0]).await.unwrap(), "the cursor never moves back");
    assert_eq!(store.command_cursor("w1").await.unwrap(), ids[2]);
    assert!(
        store.read_commands("w1", "0-0", 10).await.unwrap().is_empty(),
        "acknowledged ones are trimmed"
    );

    // A blocked reader wakes when a command arrives.
    let sender = store.clone();
    let task = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        sender.send_command("w1", "c3", b"body3").await.unwrap();
    });
    let got = b.next(Duration::from_secs(1), 10).await.unwrap();
    assert_eq!(got.iter().map(|c| c.command_id.as_str()).collect::<Vec<_>>(), ["c3"]);
    task.await.unwrap();
}

#[tokio::test]
async fn scripts_reload_after_the_script_cache_is_flushed() {
    let (redis, store) = setup().await;
    store.create_deployment(&spec("m1")).await.unwrap();
    let mut raw = redis.raw().await.unwrap();
    let _: () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut raw).await.unwrap();
    store.create_deployment(&spec("m2")).await.unwrap();
    assert_eq!(store.list_deployments().await.unwrap().len(), 2);
}
