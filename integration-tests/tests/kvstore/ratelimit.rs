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

/// The leased shares of one caller never sum above its rate: a lone replica gets all of it,
/// replicas with demand split it, and a lapsed lease gives its share back.
#[tokio::test]
async fn leased_shares_never_sum_above_the_rate() {
    let (_redis, store) = setup().await;
    let limit = RateLimit { per_second: 100.0, burst: 100 };
    let lease = Duration::from_millis(300);
    let one = |s: &kvstore::ratelimit::RateShares| s.grants[0];

    // Alone: the whole rate, whatever the demand.
    let a = store.refresh_rate_shares("d1", limit, lease, &[("c", 5.0)]).await.unwrap();
    assert_eq!((a.replicas, one(&a)), (1, 100.0));

    // A second replica arrives: room is left for it only as the first gives some back.
    let b = store.refresh_rate_shares("d2", limit, lease, &[("c", 5.0)]).await.unwrap();
    assert_eq!(b.replicas, 2);
    assert_eq!(one(&b), 0.0, "d1 still holds the whole rate");
    let a = store.refresh_rate_shares("d1", limit, lease, &[("c", 5.0)]).await.unwrap();
    let b = store.refresh_rate_shares("d2", limit, lease, &[("c", 5.0)]).await.unwrap();
    assert_eq!((one(&a), one(&b)), (50.0, 50.0), "demand within the rate: an equal part each");

    // Demand above the rate: split by demand, and never more than the rate in all.
    let a = store.refresh_rate_shares("d1", limit, lease, &[("c", 300.0)]).await.unwrap();
    let b = store.refresh_rate_shares("d2", limit, lease, &[("c", 100.0)]).await.unwrap();
    assert!(one(&a) + 50.0 <= 100.0 + 1e-9, "{a:?}");
    let a = store.refresh_rate_shares("d1", limit, lease, &[("c", 300.0)]).await.unwrap();
    assert!((one(&a) + one(&b) - 100.0).abs() < 1e-9 && one(&a) > one(&b), "{a:?} {b:?}");
    assert!((one(&a) - 75.0).abs() < 1e-9, "{a:?}");

    // d2 stops refreshing: once its lease lapses, d1 may take the whole rate again.
    tokio::time::sleep(lease + Duration::from_millis(50)).await;
    let a = store.refresh_rate_shares("d1", limit, lease, &[("c", 300.0)]).await.unwrap();
    assert_eq!((a.replicas, one(&a)), (1, 100.0));

    // Several callers in one call, each with its own shares.
    let s = store.refresh_rate_shares("d1", limit, lease, &[("x", 1.0), ("y", 2.0)]).await.unwrap();
    assert_eq!(s.grants, vec![100.0, 100.0]);
}

#[tokio::test]
async fn bad_share_refreshes_are_refused_naming_the_field() {
    let (redis, store) = setup().await;
    let before = dbsize(&redis, &store).await;
    let limit = RateLimit { per_second: 1.0, burst: 1 };
    let lease = Duration::from_secs(1);
    for (replica, limit, lease, demand, field) in [
        ("a b", limit, lease, vec![("c", 1.0)], "replica"),
        ("d", RateLimit { per_second: -1.0, burst: 1 }, lease, vec![], "rate_limit.per_second"),
        ("d", limit, Duration::ZERO, vec![], "lease"),
        ("d", limit, lease, vec![("c:1", 1.0)], "caller"),
        ("d", limit, lease, vec![("c", f64::NAN)], "demand"),
        ("d", limit, lease, vec![("c", -1.0)], "demand"),
    ] {
        let e = store.refresh_rate_shares(replica, limit, lease, &demand).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
        assert!(e.to_string().contains(field), "{field}: {e}");
    }
    assert_eq!(dbsize(&redis, &store).await, before);
}
