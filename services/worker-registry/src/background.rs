//! A replica's background work: one blocking reader of command notifications that wakes the
//! local sessions concerned, the lease reaper that declares silent workers lost, and the sweeper
//! that removes workers lost for longer than the retention.

use std::time::Duration;

use kvstore::LostMode;
use tokio_util::sync::CancellationToken;

use crate::Registry;

pub(crate) async fn run(registry: Registry, shutdown: CancellationToken) {
    tokio::join!(
        notifications(registry.clone(), shutdown.clone()),
        reaper(registry.clone(), shutdown.clone()),
        sweeper(registry.clone(), shutdown.clone()),
        dispatchers(registry.clone(), shutdown.clone()),
        lineage(registry, shutdown),
    );
}

/// Learns the name of the Redis state at start (naming it if it has none), so that this
/// replica can tell when Redis later comes back without it and let the workers' reports
/// rebuild what was lost (`Store::ensure_lineage`). Until then no report is adopted.
async fn lineage(registry: Registry, shutdown: CancellationToken) {
    let mut delays = service::retry::backoff(Duration::from_millis(50), Duration::from_secs(2));
    loop {
        match registry.inner.store.ensure_lineage().await {
            Ok(_) => return,
            Err(e) => tracing::warn!(error = %e, "cannot read the store's lineage; retrying"),
        }
        let delay = delays.next().unwrap_or(Duration::from_secs(2));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Keeps the list of live Dispatch replicas current; sessions forward changes to workers.
async fn dispatchers(registry: Registry, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match registry.inner.store.list_dispatchers().await {
            Ok(list) => {
                let endpoints: Vec<String> = list.into_iter().map(|(_, ep)| ep).collect();
                registry.inner.dispatchers.send_if_modified(|current| {
                    if *current == endpoints {
                        false
                    } else {
                        *current = endpoints;
                        true
                    }
                });
            }
            Err(e) if e.is_retryable() => registry.inner.trouble.note("list Dispatch replicas", &e),
            Err(e) => tracing::warn!(error = %e, "cannot list Dispatch replicas"),
        }
    }
}

async fn notifications(registry: Registry, shutdown: CancellationToken) {
    let store = registry.inner.store.clone();
    let sessions = &registry.inner.sessions;
    let policy = || service::retry::backoff(Duration::from_millis(50), Duration::from_secs(2));
    let mut backoff = policy();
    'outer: loop {
        let mut reader = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = store.command_notify_reader() => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read command notifications; retrying");
                    let delay = backoff.next().unwrap_or(Duration::from_secs(2));
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    continue;
                }
            },
        };
        // Notifications appended before the reader existed were missed: every session
        // re-reads its stream from where it stands.
        sessions.poke_all();
        backoff = policy();
        loop {
            let batch = tokio::select! {
                _ = shutdown.cancelled() => return,
                b = reader.next(Duration::from_secs(1)) => b,
            };
            match batch {
                Ok(workers) => {
                    for w in workers {
                        sessions.poke(&w);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "command notifications interrupted");
                    continue 'outer;
                }
            }
        }
    }
}

async fn reaper(registry: Registry, shutdown: CancellationToken) {
    let store = &registry.inner.store;
    let trouble = &registry.inner.trouble;
    let lease = registry.inner.config.lease;
    let mut tick = tokio::time::interval(registry.inner.config.reap_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // While Redis is slow or away, heartbeats go unrecorded (a call that outlasts the response
    // timeout is given up on), so leases lapse that say nothing about their workers. Workers
    // get one full lease after the last trouble this replica saw to renew before any is
    // reaped. A worker whose stream breaks meanwhile is still lost at once (`End::Dropped`).
    let mut holding = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let expired = match store.expired_leases(256).await {
            Ok(e) => e,
            Err(e) if e.is_retryable() => {
                trouble.note("lease reaper", &e);
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read lease deadlines");
                continue;
            }
        };
        if trouble.within(lease) {
            if !holding && !expired.is_empty() {
                holding = true;
                tracing::info!(
                    expired = expired.len(),
                    "Redis had trouble within the last lease: leases get one full term to renew before any is reaped"
                );
            }
            continue;
        }
        if holding {
            holding = false;
            tracing::info!("Redis has answered for a full lease: reaping expired leases again");
        }
        for lease in expired {
            match store
                .worker_lost(&lease.worker_id, lease.epoch, LostMode::Expired, "lease expired")
                .await
            {
                Ok(n) => {
                    telemetry::metrics::WORKER_REGISTRY.lost.with_label_values(&["expired"]).inc();
                    tracing::warn!(worker = %lease.worker_id, epoch = lease.epoch, instances = n, "worker lost: lease expired")
                }
                // Another replica got there first, or the worker re-registered meanwhile.
                Err(e) if e.refusal().is_some() => {}
                Err(e) if e.is_retryable() => trouble.note("mark worker lost", &e),
                Err(e) => {
                    tracing::warn!(worker = %lease.worker_id, error = %e, "cannot mark worker lost")
                }
            }
        }
    }
}

/// Removes workers lost for longer than the retention, with every key of theirs. Every replica
/// runs it; the script is atomic and each worker goes once. It reads the lost-worker index
/// only, a bounded batch at a time.
async fn sweeper(registry: Registry, shutdown: CancellationToken) {
    const BATCH: usize = 256;
    let store = &registry.inner.store;
    let retention = registry.inner.config.lost_retention;
    // A tenth of the retention: a worker goes at most 10 % late; at most once a minute.
    let every = (retention / 10).clamp(Duration::from_millis(50), Duration::from_secs(60));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut indexed = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if !indexed {
            // Workers lost before the index existed are not in it yet.
            match store.index_lost_workers().await {
                Ok(n) => {
                    indexed = true;
                    if n > 0 {
                        tracing::info!(workers = n, "indexed lost workers for removal");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot index lost workers");
                    continue;
                }
            }
        }
        loop {
            match store.forget_lost_workers(retention, BATCH).await {
                Ok(removed) => {
                    for w in &removed {
                        tracing::info!(worker = %w, retention_s = retention.as_secs(), "lost worker removed");
                    }
                    if removed.len() < BATCH || shutdown.is_cancelled() {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot remove lost workers");
                    break;
                }
            }
        }
    }
}
