use std::time::Duration;

use kvstore::ErrorKind;
use kvstore::ratelimit::{RateLimit, Taken};

use crate::*;

#[tokio::test]
async fn a_bucket_allows_its_burst_then_limits_then_refills() {
    let (_redis, store) = setup().await;
    let limit = RateLimit { per_second: 20.0, burst: 3 };
    for left in [2, 1, 0] {
        assert_eq!(store.take_token("k1", limit).await.unwrap(), Taken::Allowed { left });
    }
    let Taken::Limited { retry_after } = store.take_token("k1", limit).await.unwrap() else {
        panic!("a fourth request within the burst was allowed");
    };
    assert!(
        retry_after > Duration::ZERO && retry_after <= Duration::from_millis(50),
        "{retry_after:?}"
    );
    // Another caller has a bucket of its own.
    assert!(matches!(store.take_token("k2", limit).await.unwrap(), Taken::Allowed { .. }));
    // After the hint, one token is back (and only one).
    tokio::time::sleep(retry_after + Duration::from_millis(5)).await;
    assert!(matches!(store.take_token("k1", limit).await.unwrap(), Taken::Allowed { left: 0 }));
    assert!(matches!(store.take_token("k1", limit).await.unwrap(), Taken::Limited { .. }));
}

#[tokio::test]
async fn concurrent_takers_share_one_bucket_exactly() {
    let (_redis, store) = setup().await;
    let limit = RateLimit { per_second: 0.001, burst: 10 };
    let takes = (0..40).map(|_| {
        let store = store.clone();
        async move { store.take_token("shared", limit).await.unwrap() }
    });
    let results = futures::future::join_all(takes).await;
    let allowed = results.iter().filter(|t| matches!(t, Taken::Allowed { .. })).count();
    assert_eq!(allowed, 10, "exactly the burst gets through");
}

#[tokio::test]
async fn bad_limits_and_bucket_names_are_refused_naming_the_field() {
    let (redis, store) = setup().await;
    let before = dbsize(&redis, &store).await;
    for (limit, field) in [
        (RateLimit { per_second: 0.0, burst: 1 }, "rate_limit.per_second"),
        (RateLimit { per_second: f64::NAN, burst: 1 }, "rate_limit.per_second"),
        (RateLimit { per_second: 1.0, burst: 0 }, "rate_limit.burst"),
    ] {
        let e = store.take_token("k", limit).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(e.to_string().contains(field), "{e}");
    }
    let e = store.take_token("a b", RateLimit { per_second: 1.0, burst: 1 }).await.unwrap_err();
    assert!(e.to_string().contains("bucket"), "{e}");
    assert_eq!(dbsize(&redis, &store).await, before);
}
