//! Instances: one model loaded on one worker's GPUs. Created by the Scaler leader (with the
//! start command, atomically); moved through loading and ready by their worker's reports;
//! drained, stopped or failed by either, as `lua/instance_transition.lua` allows.

use crate::Store;
use crate::error::{Error, Result};
use crate::leader::LeaderLease;
use crate::names;
use crate::record::{Fields, status_words};
use crate::scripts::{Arg, gpu_csv};

/// The life of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InstanceStatus {
    /// Placed; start command on its way.
    Pending,
    /// Loading its checkpoint.
    Loading,
    /// Routable.
    Ready,
    /// Finishing in-flight requests; receives nothing new.
    Draining,
    /// Stopped (terminal).
    Stopped,
    /// Failed (terminal).
    Failed,
    /// On a worker whose lease expired; not routable.
    Lost,
}
status_words!(InstanceStatus {
    Pending => "pending",
    Loading => "loading",
    Ready => "ready",
    Draining => "draining",
    Stopped => "stopped",
    Failed => "failed",
    Lost => "lost",
});

impl InstanceStatus {
    /// Stopped and failed instances are gone for good.
    pub fn is_terminal(self) -> bool {
        matches!(self, InstanceStatus::Stopped | InstanceStatus::Failed)
    }
}

/// Who asks for a transition, with their proof.
#[derive(Debug, Clone, Copy)]
pub enum Actor<'a> {
    /// The instance's worker, with its current epoch.
    Worker {
        /// Worker id.
        worker_id: &'a str,
        /// Its epoch.
        epoch: u64,
    },
    /// The leader of a role, with its lease.
    Leader(&'a LeaderLease),
}

/// A new instance, as the Scaler places it.
#[derive(Debug, Clone)]
pub struct Placement {
    /// New instance id.
    pub instance_id: String,
    /// Deployment it serves.
    pub model: String,
    /// Worker chosen.
    pub worker_id: String,
    /// GPU indexes reserved on it.
    pub gpus: Vec<u32>,
    /// Id of the start command.
    pub command_id: String,
    /// The encoded start command.
    pub command: Vec<u8>,
}

/// A stored instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRecord {
    /// Its id.
    pub instance_id: String,
    /// Deployment it serves.
    pub model: String,
    /// Worker it runs on.
    pub worker_id: String,
    /// State.
    pub status: InstanceStatus,
    /// GPUs it holds.
    pub gpus: Vec<u32>,
    /// Why it stopped or failed.
    pub reason: String,
    /// Record version.
    pub version: u64,
    /// Creation time (ms).
    pub created_ms: u64,
    /// Last change (ms).
    pub updated_ms: u64,
}

impl InstanceRecord {
    /// Reads a record from its hash.
    pub fn from_fields(f: &Fields) -> Result<InstanceRecord> {
        Ok(InstanceRecord {
            instance_id: f.text("instance_id")?,
            model: f.text("model")?,
            worker_id: f.text("worker_id")?,
            status: f.parse("status")?,
            gpus: f.csv_u32("gpus")?,
            reason: f.parse_or("reason", String::new())?,
            version: f.parse("version")?,
            created_ms: f.parse("created_ms")?,
            updated_ms: f.parse("updated_ms")?,
        })
    }
}

/// Result of a transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transitioned {
    /// The record's version afterwards.
    pub version: u64,
    /// False if the instance was already in the target state (a repeated report).
    pub changed: bool,
}

impl Store {
    /// Places a new instance (pending), reserving its GPUs and sending the start command in the
    /// same step. Fenced by the leader lease. Returns the version (1).
    pub async fn create_instance(&self, lease: &LeaderLease, p: &Placement) -> Result<u64> {
        names::validate_id("instance_id", &p.instance_id)?;
        names::validate_model_name("model", &p.model)?;
        names::validate_id("worker_id", &p.worker_id)?;
        names::validate_id("command_id", &p.command_id)?;
        let gpus = gpu_csv("gpus", &p.gpus)?;
        let reply = self
            .run_ok(
                "instance_create",
                &self.scripts().instance_create,
                &[
                    Arg::Str(&p.instance_id),
                    Arg::Str(&p.model),
                    Arg::Str(&p.worker_id),
                    Arg::Str(&lease.role),
                    Arg::Owned(lease.token.to_string()),
                    Arg::Str(&gpus),
                    Arg::Str(&p.command_id),
                    Arg::Bytes(&p.command),
                ],
            )
            .await?;
        reply.u64(0)
    }

    /// Moves an instance to `to` (loading, ready, draining, stopped or failed) on behalf of
    /// `actor`, optionally sending its worker `command` (id, body) in the same step.
    pub async fn transition_instance(
        &self,
        instance_id: &str,
        to: InstanceStatus,
        actor: Actor<'_>,
        reason: &str,
        command: Option<(&str, &[u8])>,
    ) -> Result<Transitioned> {
        check_move(instance_id, to, reason)?;
        let (actor_kind, who, proof) = match actor {
            Actor::Worker { worker_id, epoch } => {
                names::validate_id("worker_id", worker_id)?;
                ("worker", worker_id, epoch.to_string())
            }
            Actor::Leader(lease) => ("leader", lease.role.as_str(), lease.token.to_string()),
        };
        let (cid, body) = match command {
            Some((cid, body)) => {
                names::validate_id("command_id", cid)?;
                (cid, body)
            }
            None => ("", &[][..]),
        };
        let reply = self
            .run_ok(
                "instance_transition",
                &self.scripts().instance_transition,
                &[
                    Arg::Str(instance_id),
                    Arg::Str(to.as_str()),
                    Arg::Str(actor_kind),
                    Arg::Str(who),
                    Arg::Owned(proof),
                    Arg::Str(reason),
                    Arg::Str(cid),
                    Arg::Bytes(body),
                ],
            )
            .await?;
        Ok(Transitioned { version: reply.u64(0)?, changed: reply.code == "ok" })
    }

    /// One instance, or None (also once a terminal record has expired).
    pub async fn get_instance(&self, instance_id: &str) -> Result<Option<InstanceRecord>> {
        names::validate_id("instance_id", instance_id)?;
        let f = self.hgetall(self.keys().instance(instance_id)).await?;
        if f.is_empty() { Ok(None) } else { InstanceRecord::from_fields(&f).map(Some) }
    }

    /// A model's live instances, sorted by id.
    pub async fn model_instances(&self, model: &str) -> Result<Vec<InstanceRecord>> {
        names::validate_model_name("model", model)?;
        self.read_instances(self.keys().model_instances(model)).await
    }

    /// Instances in one (non-terminal) status, sorted by id.
    pub async fn instances_in(&self, status: InstanceStatus) -> Result<Vec<InstanceRecord>> {
        self.read_instances(self.keys().instances_status(status.as_str())).await
    }

    /// Every live (not stopped or failed) instance, sorted by id: one SMEMBERS per status and
    /// one pipelined read of the records.
    pub async fn live_instances(&self) -> Result<Vec<InstanceRecord>> {
        let mut pipe = redis::pipe();
        for s in InstanceStatus::ALL.iter().filter(|s| !s.is_terminal()) {
            pipe.cmd("SMEMBERS").arg(self.keys().instances_status(s.as_str()));
        }
        let sets: Vec<Vec<String>> = self.read_pipe(&pipe).await?;
        let mut ids: Vec<String> = sets.into_iter().flatten().collect();
        ids.sort();
        ids.dedup();
        let keys = ids.iter().map(|i| self.keys().instance(i)).collect();
        let mut out = Vec::with_capacity(ids.len());
        for f in self.hgetall_many(keys).await? {
            if !f.is_empty() {
                out.push(InstanceRecord::from_fields(&f)?);
            }
        }
        Ok(out)
    }

    async fn read_instances(&self, index: String) -> Result<Vec<InstanceRecord>> {
        let mut ids = self.smembers(index).await?;
        ids.sort();
        let keys = ids.iter().map(|i| self.keys().instance(i)).collect();
        let mut out = Vec::with_capacity(ids.len());
        for f in self.hgetall_many(keys).await? {
            if !f.is_empty() {
                out.push(InstanceRecord::from_fields(&f)?);
            }
        }
        Ok(out)
    }
}

/// What a transition's caller must get right before it reaches Redis: a valid instance id, a
/// state an instance can be moved to, and a reason of at most 4 KiB.
pub(crate) fn check_move(instance_id: &str, to: InstanceStatus, reason: &str) -> Result<()> {
    names::validate_id("instance_id", instance_id)?;
    if matches!(to, InstanceStatus::Pending | InstanceStatus::Lost) {
        return Err(Error::invalid("state", format!("{to} is not a target of this transition")));
    }
    if reason.len() > 4096 {
        return Err(Error::invalid("reason", "must be at most 4096 bytes"));
    }
    Ok(())
}
