//! The Scaler: sizes every model from its demand and places instances where they start fastest.
//!
//! Any number of replicas run; one leads, by a Redis lease with a fencing token, and only the
//! leader writes desired counts and sends commands (a deposed leader's writes are refused by the
//! scripts). Demand per model is what Dispatch replicas report (queued + in flight); desired is
//! clamp(ceil(demand / target), min, max), raised at once and lowered only after `keep_alive`.
//! A demand event from a cold request starts a model within milliseconds; demand is read again
//! every 200 ms, so a model scales down within a fraction of a second of its keep_alive; a
//! periodic tick is the safety net. New instances go where they start fastest, spread over
//! workers (see [`policy`]); starts that hang are failed and replaced; a model no worker can
//! hold is marked unplaceable for Dispatch. It must never call another service.

mod actor;
mod bandwidth;
mod clocks;
mod coldstart;
mod grpc;
pub mod policy;
mod view;

use std::time::Duration;

use kvstore::{Acquired, Store};
use sllm_api::v1::scaler_server::ScalerServer;
use tokio_util::sync::CancellationToken;

/// The leader lease's role name.
pub const ROLE: &str = "scaler";

/// Settings of a Scaler replica.
#[derive(Debug, Clone)]
pub struct ScalerConfig {
    /// This replica's id (shown as the lease holder).
    pub replica_id: String,
    /// Leader lease length; a new leader takes over at most this long after the old one died.
    pub lease: Duration,
    /// Safety-net tick: fresh demand and a decision for every model.
    pub tick: Duration,
    /// Full re-read of the cluster state (besides on taking the lead and after the event
    /// stream was trimmed past the leader).
    pub resync: Duration,
    /// Failed starts of a model in a row before the Scaler gives up and shows the error.
    pub max_load_failures: u32,
    /// How long a drained instance may take to finish its requests.
    pub drain_grace: Duration,
    /// How long an instance on a lost worker waits for it before being written off.
    pub lost_grace: Duration,
    /// Checkpoint size assumed for a model no worker reports.
    pub default_checkpoint_bytes: u64,
    /// Longest an instance may stay pending or loading, from its placement, before it is
    /// failed, stopped and replaced (an engine that hangs while loading).
    pub start_timeout: Duration,
    /// How often the leader reads demand between ticks, to act on a change (and on a
    /// keep_alive running out) within this long.
    pub demand_poll: Duration,
}

impl ScalerConfig {
    /// Defaults for replica `replica_id`.
    pub fn new(replica_id: impl Into<String>) -> ScalerConfig {
        ScalerConfig {
            replica_id: replica_id.into(),
            lease: Duration::from_secs(3),
            tick: Duration::from_secs(1),
            resync: Duration::from_secs(30),
            max_load_failures: 3,
            drain_grace: Duration::from_secs(30),
            lost_grace: Duration::from_secs(30),
            default_checkpoint_bytes: 4 << 30,
            // A 400 GB checkpoint from remote storage at 1 GB/s loads in under 7 minutes; an
            // engine's own start (compilation, CUDA graphs) can take as long again.
            start_timeout: Duration::from_secs(15 * 60),
            demand_poll: Duration::from_millis(200),
        }
    }
}

/// A Scaler replica. Cheap to clone.
#[derive(Clone)]
pub struct Scaler {
    store: Store,
    config: ScalerConfig,
}

impl Scaler {
    /// A replica over `store`.
    pub fn new(store: Store, config: ScalerConfig) -> Scaler {
        Scaler { store, config }
    }

    /// Competes for the lead and, while leading, scales; until `shutdown`. On shutdown a leader
    /// releases its lease so a successor takes over at once.
    pub async fn run(&self, shutdown: CancellationToken) {
        // Followers poll at a fixed pace; failed attempts (Redis away) back off.
        let mut errors = actor::backoff();
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let mut pause = self.config.lease / 6;
            match self.store.acquire_leader(ROLE, &self.config.replica_id, self.config.lease).await
            {
                Ok(Acquired::Leader(lease)) => {
                    errors = actor::backoff();
                    let outcome = actor::Leader::lead(
                        self.store.clone(),
                        self.config.clone(),
                        lease,
                        shutdown.clone(),
                    )
                    .await;
                    match outcome {
                        actor::StepDown::Shutdown => return,
                        actor::StepDown::LostLease => {
                            telemetry::metrics::SCALER.lease_lost.inc();
                            tracing::warn!(replica = %self.config.replica_id, "lost the lead");
                        }
                    }
                }
                Ok(Acquired::Follower { .. }) => errors = actor::backoff(),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot compete for the lead");
                    pause = errors.next().unwrap_or(pause).max(pause);
                }
            }
            // Followers retry often enough to take over soon after the lease expires.
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Takes the lead (waiting for the lease if another replica holds it) for a leader driven
    /// by hand, one pass at a time, with no event stream and no timers: for benchmarks and
    /// diagnostics that time the passes the leader runs.
    pub async fn lead_by_hand(&self) -> Result<HandDriven, String> {
        let lease = loop {
            match self.store.acquire_leader(ROLE, &self.config.replica_id, self.config.lease).await
            {
                Ok(Acquired::Leader(lease)) => break lease,
                Ok(Acquired::Follower { .. }) => tokio::time::sleep(self.config.lease / 6).await,
                Err(e) => return Err(e.to_string()),
            }
        };
        Ok(HandDriven {
            store: self.store.clone(),
            config: self.config.clone(),
            leader: actor::Leader::new(self.store.clone(), self.config.clone(), lease),
        })
    }

    /// The status API as a gRPC service, to mount on a shared server (run [`Scaler::run`]
    /// beside it).
    pub fn service(&self) -> ScalerServer<Scaler> {
        ScalerServer::new(self.clone())
    }

    /// Serves the Scaler's status API (with health and reflection) on `listener` and competes
    /// for the lead, until `shutdown`.
    pub async fn serve(
        self,
        listener: service::Listener,
        shutdown: CancellationToken,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter.set_serving::<ScalerServer<Scaler>>().await;
        // Both run in this task, so aborting it (a crash, in tests) stops the leader too.
        let leader = self.clone();
        let server = tonic::transport::Server::builder()
            .max_concurrent_streams(Some(service::MAX_CONCURRENT_STREAMS))
            .add_service(health)
            .add_service(service::reflection_v1()?)
            .add_service(service::reflection_v1alpha()?)
            .add_service(ScalerServer::new(self))
            .serve_with_incoming_shutdown(listener.incoming(), shutdown.clone().cancelled_owned());
        let (result, ()) = tokio::join!(server, leader.run(shutdown));
        Ok(result?)
    }
}

/// A leader driven by hand ([`Scaler::lead_by_hand`]): each call runs one pass exactly as the
/// leader's loop runs it. Nothing else runs meanwhile (no event stream, no renewal timer), so
/// the passes see only what the caller changed in Redis, and the caller renews the lease.
pub struct HandDriven {
    store: Store,
    config: ScalerConfig,
    leader: actor::Leader,
}

impl HandDriven {
    /// A full resync: re-reads the cluster and decides for every model.
    pub async fn resync(&mut self) -> Result<(), String> {
        self.leader.full_pass("resync").await.map_err(lost)
    }

    /// A tick: fresh demand, and a decision for every model from the leader's view.
    pub async fn tick(&mut self) -> Result<(), String> {
        self.leader.tick().await.map_err(lost)
    }

    /// Renews the lease for another lease length.
    pub async fn renew(&mut self) -> Result<(), String> {
        self.store
            .renew_leader(self.leader.lease_mut(), self.config.lease)
            .await
            .map_err(|e| e.to_string())
    }

    /// Gives the lead back.
    pub async fn release(self) {
        let _ = self.store.release_leader(self.leader.lease()).await;
    }
}

fn lost(_: actor::StepDown) -> String {
    "lost the lead during the pass".to_string()
}
