use std::time::Duration;

use kvstore::{Acquired, Refusal};

use crate::*;

#[tokio::test]
async fn one_holder_at_a_time_with_growing_tokens() {
    let (_redis, store) = setup().await;
    let ttl = Duration::from_millis(300);
    let Acquired::Leader(mut a) = store.acquire_leader("scaler", "a", ttl).await.unwrap() else {
        panic!("a should lead");
    };
    match store.acquire_leader("scaler", "b", ttl).await.unwrap() {
        Acquired::Follower { holder, token, .. } => {
            assert_eq!((holder.as_str(), token), ("a", a.token))
        }
        other => panic!("b must follow, got {other:?}"),
    }
    // Asking again as the holder keeps the token.
    let Acquired::Leader(again) = store.acquire_leader("scaler", "a", ttl).await.unwrap() else {
        panic!("a still leads");
    };
    assert_eq!(again.token, a.token);
    store.renew_leader(&mut a, ttl).await.unwrap();
    let current = store.current_leader("scaler").await.unwrap().unwrap();
    assert_eq!((current.holder.as_str(), current.token), ("a", a.token));

    // a stops renewing; once the TTL passes b takes over with a larger token and a is fenced.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let Acquired::Leader(b) = store.acquire_leader("scaler", "b", ttl).await.unwrap() else {
        panic!("b should lead after a's lease expired");
    };
    assert!(b.token > a.token);
    let err = store.renew_leader(&mut a, ttl).await.unwrap_err();
    assert_eq!(err.refusal(), Some(&Refusal::NotLeader));
    let err = store.release_leader(&a).await.unwrap_err();
    assert_eq!(err.refusal(), Some(&Refusal::NotLeader));

    store.release_leader(&b).await.unwrap();
    assert!(store.current_leader("scaler").await.unwrap().is_none());
    // Roles are independent.
    assert!(matches!(store.acquire_leader("other", "b", ttl).await.unwrap(), Acquired::Leader(_)));
}
