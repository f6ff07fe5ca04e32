//! The Scaler leader's writes of one pass — placements with their start commands, drains and
//! stops, desired counts, unplaceable marks — sent many to a script call
//! (`lua/leader_batch.lua`) instead of one round trip each. Every item is checked and applied
//! exactly as its own transition applies it ([`Store::create_instance`],
//! [`Store::transition_instance`] as the leader, [`Store::set_desired`],
//! [`Store::set_unplaceable`]) and is refused on its own without stopping the others. The
//! fencing token is checked once per call, before any item: a deposed leader's call writes
//! nothing. Calls are kept small, so none holds Redis for long.

use crate::error::{Error, Refusal, Result};
use crate::instance::{InstanceStatus, Placement, Transitioned};
use crate::leader::LeaderLease;
use crate::scripts::{Arg, Reply, gpu_csv};
use crate::{Store, names};

/// Most items sent in one script call. Measured with INFO commandstats on a shared 2-core
/// machine, calls of 128 placements, drains and desired counts kept Redis busy 3.6 ms each;
/// at 64 a call holds it about 2 ms, and another client waits at most that long behind it.
pub const MAX_ITEMS_PER_CALL: usize = 64;

/// Most argument bytes in one script call (large start commands make calls of fewer items).
const MAX_BYTES_PER_CALL: usize = 256 << 10;

/// One write of the Scaler leader.
#[derive(Debug, Clone)]
pub enum LeaderWrite {
    /// Places a new instance, reserving its GPUs, and sends its start command
    /// ([`Store::create_instance`]).
    Place(Placement),
    /// Moves an instance to draining, stopped or failed, optionally sending its worker a
    /// command (id, body) in the same step ([`Store::transition_instance`] as the leader).
    Move {
        /// The instance.
        instance_id: String,
        /// Where it goes.
        to: InstanceStatus,
        /// Why.
        reason: String,
        /// A command for its worker: id and encoded body.
        command: Option<(String, Vec<u8>)>,
    },
    /// Records a model's desired count, the decision and the error that stopped it starting
    /// ([`Store::set_desired`]).
    Desired {
        /// The model.
        model: String,
        /// Its desired count.
        desired: u32,
        /// The decision behind it (JSON).
        decision: String,
        /// What stopped it starting ('' for nothing).
        last_error: String,
    },
    /// Marks a model unplaceable, or ('' reason) placeable again ([`Store::set_unplaceable`]).
    Unplaceable {
        /// The model.
        model: String,
        /// Why it cannot be placed ('' = it can).
        reason: String,
    },
}

/// What one applied [`LeaderWrite`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// The instance was placed; its version (1).
    Placed {
        /// The record's version.
        version: u64,
    },
    /// The instance moved (or already was there).
    Moved(Transitioned),
    /// The desired count was recorded; the one before it.
    Desired {
        /// The desired count it replaced.
        previous: u32,
    },
    /// The unplaceable mark was recorded; whether it changed.
    Unplaceable {
        /// False if the mark was already so.
        changed: bool,
    },
}

/// One write as the script's arguments, once validated.
struct Item<'a> {
    /// Its position in the caller's list.
    at: usize,
    /// The transition it is (names its refusals).
    transition: &'static str,
    args: Vec<Arg<'a>>,
    bytes: usize,
}

impl LeaderWrite {
    /// Validates the write as its own transition does and turns it into script arguments.
    fn item(&self, at: usize) -> Result<Item<'_>> {
        let (transition, args) = match self {
            LeaderWrite::Place(p) => {
                names::validate_id("instance_id", &p.instance_id)?;
                names::validate_model_name("model", &p.model)?;
                names::validate_id("worker_id", &p.worker_id)?;
                names::validate_id("command_id", &p.command_id)?;
                let gpus = gpu_csv("gpus", &p.gpus)?;
                let args = vec![
                    Arg::Str("place"),
                    Arg::Str(&p.instance_id),
                    Arg::Str(&p.model),
                    Arg::Str(&p.worker_id),
                    Arg::Owned(gpus),
                    Arg::Str(&p.command_id),
                    Arg::Bytes(&p.command),
                ];
                ("instance_create", args)
            }
            LeaderWrite::Move { instance_id, to, reason, command } => {
                crate::instance::check_move(instance_id, *to, reason)?;
                let (cid, body) = match command {
                    Some((cid, body)) => {
                        names::validate_id("command_id", cid)?;
                        (cid.as_str(), body.as_slice())
                    }
                    None => ("", &[][..]),
                };
                let args = vec![
                    Arg::Str("move"),
                    Arg::Str(instance_id),
                    Arg::Str(to.as_str()),
                    Arg::Str(reason),
                    Arg::Str(cid),
                    Arg::Bytes(body),
                ];
                ("instance_transition", args)
            }
            LeaderWrite::Desired { model, desired, decision, last_error } => {
                names::validate_model_name("model", model)?;
                let args = vec![
                    Arg::Str("desired"),
                    Arg::Str(model),
                    Arg::Owned(desired.to_string()),
                    Arg::Str(decision),
                    Arg::Str(last_error),
                ];
                ("deployment_set_desired", args)
            }
            LeaderWrite::Unplaceable { model, reason } => {
                names::validate_model_name("model", model)?;
                if reason.len() > 1024 {
                    return Err(Error::invalid("reason", "is longer than 1024 bytes"));
                }
                let args = vec![Arg::Str("unplaceable"), Arg::Str(model), Arg::Str(reason)];
                ("deployment_set_unplaceable", args)
            }
        };
        let bytes = args.iter().map(Arg::len).sum();
        Ok(Item { at, transition, args, bytes })
    }

    /// Reads the item's reply as its own transition's caller does.
    fn outcome(&self, reply: Reply) -> Result<Written> {
        if !reply.is_ok() {
            return Err(reply.refused());
        }
        Ok(match self {
            LeaderWrite::Place(_) => Written::Placed { version: reply.u64(0)? },
            LeaderWrite::Move { .. } => {
                Written::Moved(Transitioned { version: reply.u64(0)?, changed: reply.code == "ok" })
            }
            LeaderWrite::Desired { .. } => Written::Desired { previous: reply.u64(0)? as u32 },
            LeaderWrite::Unplaceable { .. } => {
                Written::Unplaceable { changed: reply.str(0)? == "1" }
            }
        })
    }
}

impl Store {
    /// Applies the leader's `writes` in order, in as few script calls as
    /// [`MAX_ITEMS_PER_CALL`] allows, and returns one outcome per write, in the same order:
    /// what it did, or why it was refused (as its own transition refuses it). Invalid writes are
    /// refused before any call. Once a call finds the lease lost, it and every later write are
    /// refused with [`Refusal::NotLeader`] and nothing of them is written. When a call fails
    /// (Redis away), its writes and every later one get that error: the failed call's writes
    /// may or may not have applied, as with any single transition.
    pub async fn write_as_leader(
        &self,
        lease: &LeaderLease,
        writes: &[LeaderWrite],
    ) -> Vec<Result<Written>> {
        let mut out: Vec<Option<Result<Written>>> = writes.iter().map(|_| None).collect();
        let mut items = Vec::with_capacity(writes.len());
        for (at, w) in writes.iter().enumerate() {
            match w.item(at) {
                Ok(item) => items.push(item),
                Err(e) => out[at] = Some(Err(e)),
            }
        }
        let token = lease.token.to_string();
        // Set once a call failed (Redis away) or found the token stale (which stays stale):
        // what the later writes get without being sent.
        let mut failed: Option<Error> = None;
        let mut rest = items.as_slice();
        while !rest.is_empty() {
            let mut n = 0;
            let mut bytes = 0;
            while n < rest.len() && n < MAX_ITEMS_PER_CALL {
                if n > 0 && bytes + rest[n].bytes > MAX_BYTES_PER_CALL {
                    break;
                }
                bytes += rest[n].bytes;
                n += 1;
            }
            let (chunk, later) = rest.split_at(n);
            rest = later;
            if let Some(e) = &failed {
                for item in chunk {
                    out[item.at] = Some(Err(e.clone()));
                }
                continue;
            }
            match self.write_chunk(lease, &token, writes, chunk).await {
                Ok(results) => {
                    for (item, r) in chunk.iter().zip(results) {
                        if r.as_ref().is_err_and(|e| {
                            matches!(e, Error::Refused { transition: "leader_batch", .. })
                        }) {
                            failed = Some(Error::Refused {
                                transition: "leader_batch",
                                refusal: Refusal::NotLeader,
                            });
                        }
                        out[item.at] = Some(r);
                    }
                }
                Err(e) => {
                    for item in chunk {
                        out[item.at] = Some(Err(e.clone()));
                    }
                    failed = Some(e);
                }
            }
        }
        out.into_iter()
            .map(|o| {
                o.unwrap_or_else(|| {
                    Err(Error::Protocol { script: "leader_batch", detail: "write not sent".into() })
                })
            })
            .collect()
    }

    /// One script call for `chunk` (of `writes`).
    async fn write_chunk(
        &self,
        lease: &LeaderLease,
        token: &str,
        writes: &[LeaderWrite],
        chunk: &[Item<'_>],
    ) -> Result<Vec<Result<Written>>> {
        const SCRIPT: &str = "leader_batch";
        let mut args = Vec::with_capacity(2 + chunk.iter().map(|i| i.args.len()).sum::<usize>());
        args.push(Arg::Str(&lease.role));
        args.push(Arg::Str(token));
        for item in chunk {
            args.extend(item.args.iter().map(Arg::borrow));
        }
        let value = self.run_value(SCRIPT, &self.scripts().leader_batch, &args).await?;
        let mut replies = match value {
            redis::Value::Array(v) => v.into_iter(),
            other => {
                return Err(Error::Protocol {
                    script: SCRIPT,
                    detail: format!("not an array: {other:?}"),
                });
            }
        };
        let code = replies.next().map(|c| Reply::parse(SCRIPT, redis::Value::Array(vec![c])));
        match code.transpose()?.map(|r| r.code) {
            Some(c) if c == "ok" => {}
            Some(c) if c == "not_leader" => {
                return Ok(chunk
                    .iter()
                    .map(|_| {
                        Err(Error::Refused { transition: SCRIPT, refusal: Refusal::NotLeader })
                    })
                    .collect());
            }
            other => {
                return Err(Error::Protocol { script: SCRIPT, detail: format!("code {other:?}") });
            }
        }
        if replies.len() != chunk.len() {
            return Err(Error::Protocol {
                script: SCRIPT,
                detail: format!("{} replies for {} items", replies.len(), chunk.len()),
            });
        }
        Ok(chunk
            .iter()
            .zip(replies)
            .map(|(item, v)| {
                let reply = Reply::parse(item.transition, v)?;
                writes[item.at].outcome(reply)
            })
            .collect())
    }
}
