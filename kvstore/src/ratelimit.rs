//! Per-caller rate limits: a token bucket in Redis, taken by one script per request, so all
//! Dispatch replicas share one bucket per caller.

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

impl Store {
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
