//! Leader leases. A lease is a Redis hash with a TTL; each new holder gets a larger fencing
//! token, and every write a leader makes through a script presents that token, so a leader that
//! lost its lease (paused, partitioned) cannot write after its successor took over.

use std::time::Duration;

use crate::Store;
use crate::error::{Error, Refusal, Result};
use crate::names;
use crate::scripts::Arg;

/// A held lease: the proof a leader presents with each write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderLease {
    /// The role led (e.g. `scaler`).
    pub role: String,
    /// Who holds it.
    pub holder: String,
    /// The fencing token.
    pub token: u64,
    /// When it expires unless renewed, ms since the Unix epoch (Redis clock).
    pub deadline_ms: u64,
}

/// The outcome of an attempt to take a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquired {
    /// The caller leads.
    Leader(LeaderLease),
    /// Someone else does.
    Follower {
        /// The current holder.
        holder: String,
        /// Its token.
        token: u64,
        /// When its lease ends unless renewed.
        deadline_ms: u64,
    },
}

impl Store {
    /// Takes the lease of `role` for `ttl` if it is free (or already the caller's).
    pub async fn acquire_leader(
        &self,
        role: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Acquired> {
        names::validate_token("role", role)?;
        names::validate_id("holder", holder)?;
        let ttl_ms = ttl_ms(ttl)?;
        let reply = self
            .run(
                "leader_acquire",
                &self.scripts().leader_acquire,
                &[Arg::Str(role), Arg::Str(holder), Arg::Owned(ttl_ms)],
            )
            .await?;
        match reply.code.as_str() {
            "ok" => Ok(Acquired::Leader(LeaderLease {
                role: role.to_string(),
                holder: holder.to_string(),
                token: reply.u64(0)?,
                deadline_ms: reply.u64(1)?,
            })),
            "held" => Ok(Acquired::Follower {
                holder: reply.str(0)?.to_string(),
                token: reply.u64(1)?,
                deadline_ms: reply.u64(2)?,
            }),
            _ => Err(reply.refused()),
        }
    }

    /// Extends a held lease. Refused with NotLeader once the lease was lost.
    pub async fn renew_leader(&self, lease: &mut LeaderLease, ttl: Duration) -> Result<()> {
        let reply = self
            .run_ok(
                "leader_renew",
                &self.scripts().leader_renew,
                &[
                    Arg::Str(&lease.role),
                    Arg::Owned(lease.token.to_string()),
                    Arg::Owned(ttl_ms(ttl)?),
                ],
            )
            .await?;
        lease.deadline_ms = reply.u64(0)?;
        Ok(())
    }

    /// Gives the lease up so a successor need not wait for it to expire.
    pub async fn release_leader(&self, lease: &LeaderLease) -> Result<()> {
        self.run_ok(
            "leader_release",
            &self.scripts().leader_release,
            &[Arg::Str(&lease.role), Arg::Owned(lease.token.to_string())],
        )
        .await?;
        Ok(())
    }

    /// The current holder of `role`'s lease, if any.
    pub async fn current_leader(&self, role: &str) -> Result<Option<LeaderLease>> {
        names::validate_token("role", role)?;
        let key = self.keys().leader(role);
        let mut pipe = redis::pipe();
        pipe.cmd("HGET").arg(&key).arg("holder");
        pipe.cmd("HGET").arg(&key).arg("token");
        pipe.cmd("PTTL").arg(&key);
        pipe.cmd("TIME");
        let (holder, token, pttl, time): (Option<String>, Option<String>, i64, Vec<String>) =
            self.read_pipe(&pipe).await?;
        let (Some(holder), Some(token)) = (holder, token) else {
            return Ok(None);
        };
        let token = token.parse().map_err(|_| Error::Malformed {
            key: key.clone(),
            field: "token".into(),
            reason: format!("{token:?} is not a number"),
        })?;
        let now_ms =
            time.first().and_then(|s| s.parse::<u64>().ok()).map(|s| s * 1000).unwrap_or_default();
        Ok(Some(LeaderLease {
            role: role.to_string(),
            holder,
            token,
            deadline_ms: now_ms + pttl.max(0) as u64,
        }))
    }
}

fn ttl_ms(ttl: Duration) -> Result<String> {
    let ms = ttl.as_millis();
    if ms == 0 || ms > 86_400_000 {
        return Err(Error::invalid("lease_ttl", "must be between 1 ms and 24 h"));
    }
    Ok(ms.to_string())
}

impl Refusal {
    /// Whether this refusal says the caller is no longer the leader.
    pub fn is_not_leader(&self) -> bool {
        matches!(self, Refusal::NotLeader)
    }
}
