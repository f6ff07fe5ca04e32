//! The one builder of Redis keys. Every key is `{<namespace>}:<family>...`: the braces make the
//! namespace the hash tag, so every key of one namespace lands in one Redis Cluster slot and
//! every script runs unchanged on a cluster. The Lua prelude (`lua/_prelude.lua`) builds the same
//! keys from the same root; a test checks the two agree.
//!
//! Callers pass only validated names (see [`crate::names`]); the builder does not re-check.

use crate::error::Result;
use crate::names;

/// Builds the keys of one namespace.
#[derive(Debug, Clone)]
pub struct Keys {
    root: String,
}

impl Keys {
    /// Keys under `namespace` (1..=64 characters from `[A-Za-z0-9_-]`).
    pub fn new(namespace: &str) -> Result<Keys> {
        names::validate_token("namespace", namespace)?;
        Ok(Keys { root: format!("{{{namespace}}}:") })
    }

    /// The prefix shared by every key, e.g. `{sllm}:`; scripts receive it as ARGV[1].
    pub fn root(&self) -> &str {
        &self.root
    }

    fn k(&self, family: &str, id: &str) -> String {
        let mut s = String::with_capacity(self.root.len() + family.len() + id.len());
        s.push_str(&self.root);
        s.push_str(family);
        s.push_str(id);
        s
    }

    /// The event stream.
    pub fn events(&self) -> String {
        self.k("events", "")
    }
    /// Counter behind the events' gap-free sequence numbers.
    pub fn events_seq(&self) -> String {
        self.k("events:seq", "")
    }
    /// Set of every deployment name.
    pub fn deployments(&self) -> String {
        self.k("deployments", "")
    }
    /// Sorted set: worker id -> lease deadline (ms since the Unix epoch, Redis clock).
    pub fn lease_deadlines(&self) -> String {
        self.k("lease_deadlines", "")
    }
    /// Sorted set: id of a lost worker -> when it was lost (ms, Redis clock); the order in
    /// which lost workers are removed once their retention has passed.
    pub fn lost_workers(&self) -> String {
        self.k("lost_workers", "")
    }
    /// Set of every worker id.
    pub fn workers(&self) -> String {
        self.k("workers", "")
    }
    /// Stream that wakes registry replicas when any worker's command stream grows.
    pub fn commands_notify(&self) -> String {
        self.k("commands_notify", "")
    }
    /// Hash of one deployment.
    pub fn deployment(&self, name: &str) -> String {
        self.k("deployment:", name)
    }
    /// Set of deployments in one status.
    pub fn deployments_status(&self, status: &str) -> String {
        self.k("deployments:status:", status)
    }
    /// Set of a model's live instances.
    pub fn model_instances(&self, model: &str) -> String {
        self.k("instances:model:", model)
    }
    /// Hash of one worker.
    pub fn worker(&self, id: &str) -> String {
        self.k("worker:", id)
    }
    /// Set of workers in one status.
    pub fn workers_status(&self, status: &str) -> String {
        self.k("workers:status:", status)
    }
    /// Set of a worker's live instances.
    pub fn worker_instances(&self, id: &str) -> String {
        self.k("instances:worker:", id)
    }
    /// Set of a worker's unassigned GPU indexes.
    pub fn free_gpus(&self, id: &str) -> String {
        self.k("free_gpus:", id)
    }
    /// Worker id holding an address.
    pub fn address(&self, address: &str) -> String {
        self.k("address:", address)
    }
    /// Hash of one instance.
    pub fn instance(&self, id: &str) -> String {
        self.k("instance:", id)
    }
    /// Set of instances in one status.
    pub fn instances_status(&self, status: &str) -> String {
        self.k("instances:status:", status)
    }
    /// A worker's command stream.
    pub fn commands(&self, worker: &str) -> String {
        self.k("commands:", worker)
    }
    /// The id of a worker's last acknowledged command.
    pub fn commands_acked(&self, worker: &str) -> String {
        self.k("commands_acked:", worker)
    }
    /// The leader lease of a role.
    pub fn leader(&self, role: &str) -> String {
        self.k("leader:", role)
    }
    /// Counter behind a role's fencing tokens.
    pub fn leader_token(&self, role: &str) -> String {
        self.k("leader_token:", role)
    }
    /// Sorted set: Dispatch replica id -> expiry of its demand report.
    pub fn demand_reporters(&self) -> String {
        self.k("demand_reporters", "")
    }
    /// One Dispatch replica's demand report (model -> "queued:in_flight").
    pub fn demand(&self, reporter: &str) -> String {
        self.k("demand:", reporter)
    }
    /// Sorted set: Dispatch replica id -> expiry of its registration.
    pub fn dispatchers(&self) -> String {
        self.k("dispatchers", "")
    }
    /// Hash: Dispatch replica id -> its endpoint.
    pub fn dispatcher_endpoints(&self) -> String {
        self.k("dispatcher_endpoints", "")
    }
    /// Hash: model -> why the Scaler cannot place it on any live worker.
    pub fn unplaceable(&self) -> String {
        self.k("unplaceable", "")
    }
    /// A caller's rate-limit token bucket.
    pub fn ratelimit(&self, bucket: &str) -> String {
        self.k("ratelimit:", bucket)
    }
    /// Sorted set: Dispatch replica id -> expiry of its rate-limit leases (the live replicas
    /// sharing rate limits).
    pub fn rate_replicas(&self) -> String {
        self.k("rate_replicas", "")
    }
    /// Hash: replica id -> "demand grant lease_until_ms", one caller's shares of its rate.
    pub fn rate_share(&self, caller: &str) -> String {
        self.k("rate_share:", caller)
    }
    /// The id of this Redis state (set once; a registry that knew another id, or finds none,
    /// knows the state was lost).
    pub fn lineage(&self) -> String {
        self.k("lineage", "")
    }
    /// Present (with a TTL) while the registry rebuilds lost state from the workers' reports:
    /// only then is a reported instance with no record adopted.
    pub fn recovering(&self) -> String {
        self.k("recovering", "")
    }
    /// A scratch counter (benchmarks only).
    pub fn scratch(&self, name: &str) -> String {
        self.k("scratch:", name)
    }
}
