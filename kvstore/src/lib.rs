//! kvstore: the only code in sllm that talks to Redis.
//!
//! Every fact one sllm service needs from another passes through here: typed records of
//! deployments, workers and instances; state transitions, each one Lua script in `lua/` that
//! checks its precondition and updates the record, its indexes and the event stream together;
//! the event stream itself (Redis Streams, gap-detected); per-worker command streams; and leases.
//!
//! What it must never do: build a key from input that [`names`] has not validated, run `SCAN` or
//! `KEYS` on a per-request, per-heartbeat or per-tick path, delete state when it starts, or let a
//! malformed record reach a caller as anything but [`Error::Malformed`].

pub mod batch;
pub mod commands;
pub mod config;
mod conn;
pub mod demand;
pub mod deployment;
pub mod error;
pub mod events;
pub mod instance;
pub mod invariants;
pub mod keys;
pub mod leader;
pub mod names;
pub mod ratelimit;
pub mod record;
mod scripts;
pub use scripts::PRELUDE;
pub mod worker;

use std::sync::Arc;

pub use batch::{LeaderWrite, MAX_ITEMS_PER_CALL, Written};
pub use commands::{CommandEntry, CommandReader, NotifyReader};
pub use config::StoreConfig;
pub use demand::Demand;
pub use deployment::{AutoScaling, DeploymentRecord, DeploymentSpec, DeploymentStatus};
pub use error::{Error, ErrorKind, Refusal, Result};
pub use events::{Event, EventBatch, EventReader, Position};
pub use instance::{Actor, InstanceRecord, InstanceStatus, Placement};
pub use keys::Keys;
pub use leader::{Acquired, LeaderLease};
pub use worker::{
    Bandwidth, Checkpoint, ExpiredLease, GpuInfo, Inventory, LostMode, Registration,
    RunningInstance, Tier, WorkerRecord, WorkerStatus,
};

/// A handle on the shared state. Cheap to clone: clones share one pool and one set of
/// connections.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    keys: Keys,
    conns: conn::Connections,
    scripts: scripts::Scripts,
    config: StoreConfig,
    /// The lineage (id of the Redis state) this store last saw, for telling a Redis that
    /// lost its state from one that never had any.
    lineage: std::sync::Mutex<String>,
}

impl Store {
    /// Builds the pool and checks that Redis answers. Writes nothing.
    pub async fn connect(config: StoreConfig) -> Result<Store> {
        let keys = Keys::new(&config.namespace)?;
        let conns = conn::Connections::new(&config)?;
        let store = Store {
            inner: Arc::new(Inner {
                keys,
                conns,
                scripts: scripts::Scripts::new(),
                config,
                lineage: std::sync::Mutex::new(String::new()),
            }),
        };
        store.ping().await?;
        Ok(store)
    }

    /// The key builder of this store's namespace.
    pub fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    /// The configuration the store was built with.
    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }

    /// Names the Redis state if it has none yet, and remembers the name: a later registration
    /// through this store that finds the name gone knows Redis lost its state, and opens the
    /// recovery window in which workers' reports rebuild instance records
    /// (`lua/lineage_ensure.lua`). The worker registry calls it at start. Returns the name.
    pub async fn ensure_lineage(&self) -> Result<String> {
        let known = self.known_lineage();
        let args = [
            scripts::Arg::Owned(uuid::Uuid::now_v7().to_string()),
            scripts::Arg::Str(&known),
            scripts::Arg::Owned(self.recovery_window_ms()),
        ];
        let reply = self.run_ok("lineage_ensure", &self.scripts().lineage_ensure, &args).await?;
        let lineage = reply.values.first().cloned().unwrap_or_default();
        self.saw_lineage(&lineage);
        Ok(lineage)
    }

    /// Whether the store is rebuilding lost state from workers' reports right now.
    pub async fn recovering(&self) -> Result<bool> {
        let mut cmd = redis::cmd("EXISTS");
        cmd.arg(self.inner.keys.recovering());
        let n: u64 = self.read(&cmd).await?;
        Ok(n == 1)
    }

    pub(crate) fn known_lineage(&self) -> String {
        self.inner.lineage.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub(crate) fn saw_lineage(&self, lineage: &str) {
        if lineage.is_empty() {
            return;
        }
        if let Ok(mut l) = self.inner.lineage.lock() {
            lineage.clone_into(&mut l);
        }
    }

    pub(crate) fn recovery_window_ms(&self) -> String {
        self.inner.config.recovery_window.as_millis().max(1).to_string()
    }

    /// One round trip: is Redis there?
    pub async fn ping(&self) -> Result<()> {
        self.read::<String>(&redis::cmd("PING")).await?;
        Ok(())
    }

    /// A raw `INCR` of a scratch key: the baseline round trip that benchmarks compare
    /// transitions against.
    pub async fn raw_incr(&self, counter: &str) -> Result<i64> {
        names::validate_token("counter", counter)?;
        let key = self.inner.keys.scratch(counter);
        let mut conn = self.inner.conns.shared().await?;
        let r = redis::cmd("INCR").arg(key).query_async(&mut conn.conn).await;
        conn.check(r)
    }

    /// Runs a script that does nothing (`lua/empty.lua`) through the same runner as every
    /// transition: the fixed cost of a script call, which benchmarks set beside the raw `INCR`
    /// round trip and the transitions.
    pub async fn empty_script(&self) -> Result<()> {
        self.run_ok("empty", &self.scripts().empty, &[]).await?;
        Ok(())
    }
}
