//! Per-caller rate limits. Dispatch decides them locally and only refreshes its share of each
//! caller's rate here in the background ([`Store::refresh_rate_shares`]); [`Store::take_token`]
//! is the exact shared bucket (one script per request) for callers that can afford a round trip.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::scripts::Arg;
use crate::{Store, names};

/// A bucket's refill rate and size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Tokens added per second (requests per second sustained).
    pub per_second: f64,
    /// Most tokens held (requests allowed in one burst).
    pub burst: u32,
}

impl RateLimit {
    /// Checks the numbers, naming the field.
    pub fn validate(&self) -> Result<()> {
        if !(self.per_second.is_finite() && self.per_second > 0.0) {
            return Err(Error::invalid("rate_limit.per_second", "must be a number above 0"));
        }
        if self.burst == 0 {
            return Err(Error::invalid("rate_limit.burst", "must be at least 1"));
        }
        Ok(())
    }
}

/// What the bucket said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// Allowed; this many whole tokens are left.
    Allowed {
        /// Whole tokens left.
        left: u64,
    },
    /// Refused; a token will be there after this long.
    Limited {
        /// When to try again.
        retry_after: Duration,
    },
}

/// What a refresh of rate-limit shares gave one replica.
#[derive(Debug, Clone, PartialEq)]
pub struct RateShares {
    /// Replicas holding live rate-limit leases, this one included.
    pub replicas: u64,
    /// The rate (requests per second) leased for each reported caller, in the order reported.
    pub grants: Vec<f64>,
}

/// Most callers reported in one script call (a refresh with more makes several calls).
pub const RATE_SHARE_BATCH: usize = 512;

impl Store {
    /// Reports `replica`'s demand (requests per second) for each caller and leases its share
    /// of `limit.per_second` for each until `lease` from now (Redis clock). The grants of
    /// unexpired leases of one caller never sum above the rate. At most
    /// [`RATE_SHARE_BATCH`] callers per call.
    pub async fn refresh_rate_shares(
        &self,
        replica: &str,
        limit: RateLimit,
        lease: Duration,
        demand: &[(&str, f64)],
    ) -> Result<RateShares> {
        names::validate_id("replica", replica)?;
        limit.validate()?;
        if lease.is_zero() {
            return Err(Error::invalid("lease", "must be above 0"));
        }
        if demand.len() > RATE_SHARE_BATCH {
            return Err(Error::invalid("demand", format!("at most {RATE_SHARE_BATCH} callers")));
        }
        let mut args = Vec::with_capacity(3 + 2 * demand.len());
        args.push(Arg::Str(replica));
        args.push(Arg::Owned(limit.per_second.to_string()));
        args.push(Arg::Owned(lease.as_millis().max(1).to_string()));
        for (caller, d) in demand {
            names::validate_id("caller", caller)?;
            if !(d.is_finite() && *d >= 0.0) {
                return Err(Error::invalid("demand", "must be a number of at least 0"));
            }
            args.push(Arg::Str(caller));
            args.push(Arg::Owned(d.to_string()));
        }
        let reply = self.run("rate_share", &self.scripts().rate_share, &args).await?;
        if reply.code != "ok" {
            return Err(reply.refused());
        }
        let replicas = reply.u64(0)?;
        let grants = (1..=demand.len())
            .map(|i| {
                let s = reply.str(i)?;
                s.parse::<f64>()
                    .ok()
                    .filter(|g| g.is_finite() && *g >= 0.0)
                    .ok_or_else(|| reply.protocol(format!("grant {s:?} is not a rate")))
            })
            .collect::<Result<Vec<f64>>>()?;
        Ok(RateShares { replicas, grants })
    }

    /// Takes one token from `bucket`'s bucket under `limit`.
    pub async fn take_token(&self, bucket: &str, limit: RateLimit) -> Result<Taken> {
        names::validate_id("bucket", bucket)?;
        limit.validate()?;
        let reply = self
            .run(
                "rate_limit",
                &self.scripts().rate_limit,
                &[
                    Arg::Str(bucket),
                    Arg::Owned(limit.per_second.to_string()),
                    Arg::Owned(limit.burst.to_string()),
                ],
            )
            .await?;
        match reply.code.as_str() {
            "ok" => Ok(Taken::Allowed { left: reply.u64(0)? }),
            "limited" => {
                Ok(Taken::Limited { retry_after: Duration::from_millis(reply.u64(0)?.max(1)) })
            }
            _ => Err(reply.refused()),
        }
    }
}
