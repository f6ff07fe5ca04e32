use std::time::Duration;

use kvstore::{Demand, EventBatch};

use crate::*;

#[tokio::test]
async fn demand_is_summed_over_live_reporters_and_expires_with_them() {
    let (_redis, store) = setup().await;
    let d = |queued, in_flight| Demand { queued, in_flight };
    store
        .report_demand(
            "dispatch-a",
            &[("m1".into(), d(2, 3)), ("m2".into(), d(0, 1))],
            Duration::from_millis(300),
        )
        .await
        .unwrap();
    store
        .report_demand("dispatch-b", &[("m1".into(), d(1, 0))], Duration::from_secs(10))
        .await
        .unwrap();
    let all = store.read_demand().await.unwrap();
    assert_eq!(all.get("m1"), Some(&d(3, 3)));
    assert_eq!(all.get("m2"), Some(&d(0, 1)));
    assert_eq!(all["m1"].total(), 6);

    // A replacement report replaces, it does not add.
    store
        .report_demand("dispatch-b", &[("m1".into(), d(0, 4))], Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(store.read_demand().await.unwrap()["m1"], d(2, 7));

    // dispatch-a dies: its report stops counting once its TTL passes.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let all = store.read_demand().await.unwrap();
    assert_eq!(all.get("m1"), Some(&d(0, 4)));
    assert_eq!(all.get("m2"), None);
    // An empty report clears the reporter's demand.
    store.report_demand("dispatch-b", &[], Duration::from_secs(10)).await.unwrap();
    assert!(store.read_demand().await.unwrap().is_empty());

    let err = store
        .report_demand("dispatch-b", &[("bad:name".into(), d(1, 0))], Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), kvstore::ErrorKind::InvalidArgument);
}

#[tokio::test]
async fn a_cold_request_raises_a_demand_event_at_once() {
    let (_redis, store) = setup().await;
    let mut reader = store.event_reader(store.event_position().await.unwrap());
    store.publish_demand("dispatch-a", "m1", 2).await.unwrap();
    let EventBatch::Events(events) = reader.next_batch(Duration::ZERO, 10).await.unwrap() else {
        panic!()
    };
    assert_eq!(events.len(), 1);
    assert_eq!((events[0].kind.as_str(), events[0].entity.as_str()), ("demand", "m1"));
    assert_eq!(events[0].field("queued"), Some("2"));
    assert_eq!(events[0].field("reporter"), Some("dispatch-a"));
}

#[tokio::test]
async fn dispatch_replicas_are_listed_while_they_keep_registering() {
    let (_redis, store) = setup().await;
    let mut reader = store.event_reader(store.event_position().await.unwrap());
    store
        .register_dispatcher("d1", "http://10.0.0.1:50054", Duration::from_millis(300))
        .await
        .unwrap();
    store
        .register_dispatcher("d2", "http://10.0.0.2:50054", Duration::from_secs(10))
        .await
        .unwrap();
    store
        .register_dispatcher("d2", "http://10.0.0.2:50054", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        store.list_dispatchers().await.unwrap(),
        [
            ("d1".to_string(), "http://10.0.0.1:50054".to_string()),
            ("d2".into(), "http://10.0.0.2:50054".into())
        ]
    );
    let EventBatch::Events(events) = reader.next_batch(Duration::ZERO, 10).await.unwrap() else {
        panic!()
    };
    let joined: Vec<&str> =
        events.iter().filter(|e| e.kind == "dispatch.joined").map(|e| e.entity.as_str()).collect();
    assert_eq!(joined, ["d1", "d2"], "a renewal is not a join");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(store.list_dispatchers().await.unwrap().len(), 1, "d1 lapsed");
    let err = store
        .register_dispatcher("d3", "http://bad host", Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), kvstore::ErrorKind::InvalidArgument);
}
