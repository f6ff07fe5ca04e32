//! Demand: how many requests each model has queued and in flight, as Dispatch replicas report it
//! (batched, sub-second, expiring with the replica), plus the immediate `demand` event a cold
//! request raises so the Scaler need not wait for the next report.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::Store;
use crate::error::{Error, Result};
use crate::names;
use crate::scripts::Arg;

/// Demand for one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Demand {
    /// Requests waiting for an instance.
    pub queued: u64,
    /// Requests being served.
    pub in_flight: u64,
}

impl Demand {
    /// Queued plus in flight: what the Scaler sizes a model by.
    pub fn total(&self) -> u64 {
        self.queued + self.in_flight
    }
}

impl Store {
    /// Replaces `reporter`'s demand report; it counts for `ttl` unless replaced.
    pub async fn report_demand(
        &self,
        reporter: &str,
        demand: &[(String, Demand)],
        ttl: Duration,
    ) -> Result<()> {
        names::validate_id("reporter", reporter)?;
        let ttl_ms = ttl.as_millis();
        if !(1..=3_600_000).contains(&ttl_ms) {
            return Err(Error::invalid("ttl", "must be between 1 ms and 1 h"));
        }
        let mut args = vec![Arg::Str(reporter), Arg::Owned(ttl_ms.to_string())];
        for (model, d) in demand {
            names::validate_model_name("model", model)?;
            args.extend([
                Arg::Str(model),
                Arg::Owned(d.queued.to_string()),
                Arg::Owned(d.in_flight.to_string()),
            ]);
        }
        self.run_ok("demand_report", &self.scripts().demand_report, &args).await?;
        Ok(())
    }

    /// Total demand per model over every live report.
    pub async fn read_demand(&self) -> Result<BTreeMap<String, Demand>> {
        let reply = self.run_ok("demand_read", &self.scripts().demand_read, &[]).await?;
        let mut out = BTreeMap::new();
        for i in (0..reply.values.len().saturating_sub(2)).step_by(3) {
            let d = Demand { queued: reply.u64(i + 1)?, in_flight: reply.u64(i + 2)? };
            out.insert(reply.str(i)?.to_string(), d);
        }
        Ok(out)
    }

    /// Registers (or keeps registered) Dispatch replica `id`, reachable at `endpoint`, for
    /// `ttl`. Returns the expiry (ms, Redis clock).
    pub async fn register_dispatcher(
        &self,
        id: &str,
        endpoint: &str,
        ttl: Duration,
    ) -> Result<u64> {
        names::validate_id("dispatch_id", id)?;
        if endpoint.is_empty()
            || endpoint.len() > 255
            || endpoint.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(Error::invalid("endpoint", format!("{endpoint:?} is not an endpoint URL")));
        }
        let reply = self
            .run_ok(
                "dispatcher_register",
                &self.scripts().dispatcher_register,
                &[Arg::Str(id), Arg::Str(endpoint), Arg::Owned(ttl.as_millis().max(1).to_string())],
            )
            .await?;
        reply.u64(0)
    }

    /// The live Dispatch replicas as (id, endpoint), sorted by id.
    pub async fn list_dispatchers(&self) -> Result<Vec<(String, String)>> {
        let reply = self.run_ok("dispatchers_list", &self.scripts().dispatchers_list, &[]).await?;
        Ok(reply
            .values
            .chunks(2)
            .filter_map(|c| match c {
                [id, ep] => Some((id.clone(), ep.clone())),
                _ => None,
            })
            .collect())
    }

    /// Appends a `demand` event for `model` (a request found no ready instance).
    pub async fn publish_demand(&self, reporter: &str, model: &str, queued: u64) -> Result<()> {
        self.publish_demand_traced(reporter, model, queued, "").await
    }

    /// Like [`Store::publish_demand`], carrying the waiting request's W3C `traceparent`.
    pub async fn publish_demand_traced(
        &self,
        reporter: &str,
        model: &str,
        queued: u64,
        traceparent: &str,
    ) -> Result<()> {
        names::validate_id("reporter", reporter)?;
        names::validate_model_name("model", model)?;
        if traceparent.len() > 128
            || !traceparent.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
        {
            return Err(Error::invalid("traceparent", "is not a W3C traceparent"));
        }
        self.run_ok(
            "demand_event",
            &self.scripts().demand_event,
            &[
                Arg::Str(model),
                Arg::Owned(queued.to_string()),
                Arg::Str(reporter),
                Arg::Str(traceparent),
            ],
        )
        .await?;
        Ok(())
    }
}
