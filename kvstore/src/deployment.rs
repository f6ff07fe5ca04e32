//! Deployments: what users deployed, in the shape of ServerlessLLM's deploy JSON.

use std::collections::HashMap;

use crate::Store;
use crate::error::{Error, Result};
use crate::leader::LeaderLease;
use crate::names;
use crate::record::{Fields, status_words};
use crate::scripts::Arg;

/// How a deployment scales (ServerlessLLM's `auto_scaling_config`).
#[derive(Debug, Clone, PartialEq)]
pub struct AutoScaling {
    /// Demand metric; only `concurrency` is known.
    pub metric: String,
    /// Demand one instance absorbs; > 0.
    pub target: f64,
    /// Instances kept with no demand.
    pub min_instances: u32,
    /// Most instances; >= min and >= 1.
    pub max_instances: u32,
    /// Seconds demand must stay lower before scaling down.
    pub keep_alive_s: u32,
}

impl Default for AutoScaling {
    fn default() -> Self {
        AutoScaling {
            metric: "concurrency".into(),
            target: 1.0,
            min_instances: 0,
            max_instances: 1,
            keep_alive_s: 0,
        }
    }
}

/// Metrics the Scaler understands.
pub const METRICS: &[&str] = &["concurrency"];

impl AutoScaling {
    /// Checks the policy, naming the offending field under `auto_scaling_config.`.
    pub fn validate(&self) -> Result<()> {
        if !METRICS.contains(&self.metric.as_str()) {
            return Err(Error::invalid(
                "auto_scaling_config.metric",
                format!("unknown metric {:?} (known: {})", self.metric, METRICS.join(", ")),
            ));
        }
        if !self.target.is_finite() || self.target <= 0.0 {
            return Err(Error::invalid(
                "auto_scaling_config.target",
                format!("must be a number > 0, got {}", self.target),
            ));
        }
        if self.max_instances == 0 {
            return Err(Error::invalid("auto_scaling_config.max_instances", "must be at least 1"));
        }
        if self.min_instances > self.max_instances {
            return Err(Error::invalid(
                "auto_scaling_config.min_instances",
                format!(
                    "min_instances ({}) is larger than max_instances ({})",
                    self.min_instances, self.max_instances
                ),
            ));
        }
        Ok(())
    }

    fn fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("metric", self.metric.clone()),
            ("target", self.target.to_string()),
            ("min_instances", self.min_instances.to_string()),
            ("max_instances", self.max_instances.to_string()),
            ("keep_alive", self.keep_alive_s.to_string()),
        ]
    }
}

/// A deployment as a user asks for it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeploymentSpec {
    /// The deployment's name.
    pub model: String,
    /// Backend that runs it.
    pub backend: String,
    /// GPUs per instance; >= 1.
    pub num_gpus: u32,
    /// Scaling policy.
    pub autoscaling: AutoScaling,
    /// Backend settings, a JSON object as text.
    pub backend_config: String,
}

impl DeploymentSpec {
    /// Checks everything that does not depend on the fleet, naming the offending field.
    pub fn validate(&self) -> Result<()> {
        names::validate_model_name("model", &self.model)?;
        names::validate_token("backend", &self.backend)?;
        if self.num_gpus == 0 {
            return Err(Error::invalid("num_gpus", "must be at least 1"));
        }
        self.autoscaling.validate()?;
        if !self.backend_config.is_empty() {
            match serde_json::from_str::<serde_json::Value>(&self.backend_config) {
                Ok(serde_json::Value::Object(_)) => {}
                Ok(_) => return Err(Error::invalid("backend_config", "must be a JSON object")),
                Err(e) => return Err(Error::invalid("backend_config", e.to_string())),
            }
        }
        Ok(())
    }

    fn fields(&self) -> Vec<(&'static str, String)> {
        let mut f = vec![
            ("model", self.model.clone()),
            ("backend", self.backend.clone()),
            ("num_gpus", self.num_gpus.to_string()),
            ("backend_config", self.backend_config.clone()),
        ];
        f.extend(self.autoscaling.fields());
        f
    }
}

/// Where a deployment is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeploymentStatus {
    /// Serving; scaled between min and max.
    Active,
    /// Being deleted: instances drain, then the record goes.
    Deleting,
}
status_words!(DeploymentStatus { Active => "active", Deleting => "deleting" });

/// A stored deployment.
#[derive(Debug, Clone, PartialEq)]
pub struct DeploymentRecord {
    /// What was deployed.
    pub spec: DeploymentSpec,
    /// Lifecycle state.
    pub status: DeploymentStatus,
    /// Bumped by every user-visible change.
    pub version: u64,
    /// Creation time, ms since the Unix epoch (Redis clock).
    pub created_ms: u64,
    /// Last change, ms since the Unix epoch.
    pub updated_ms: u64,
    /// Instances the Scaler wants.
    pub desired: u32,
    /// The Scaler's last decision (JSON written by the Scaler), empty if none.
    pub last_decision: String,
    /// Why the Scaler gave up starting the model, empty if it did not.
    pub last_error: String,
}

impl DeploymentRecord {
    /// Reads a record from its hash.
    pub fn from_fields(f: &Fields) -> Result<DeploymentRecord> {
        Ok(DeploymentRecord {
            spec: DeploymentSpec {
                model: f.text("name")?,
                backend: f.text("backend")?,
                num_gpus: f.parse("num_gpus")?,
                autoscaling: AutoScaling {
                    metric: f.text("metric")?,
                    target: f.parse("target")?,
                    min_instances: f.parse("min_instances")?,
                    max_instances: f.parse("max_instances")?,
                    keep_alive_s: f.parse("keep_alive")?,
                },
                backend_config: f.parse_or("backend_config", String::new())?,
            },
            status: f.parse("status")?,
            version: f.parse("version")?,
            created_ms: f.parse("created_ms")?,
            updated_ms: f.parse("updated_ms")?,
            desired: f.parse_or("desired", 0)?,
            last_decision: f.parse_or("last_decision", String::new())?,
            last_error: f.parse_or("last_error", String::new())?,
        })
    }
}

fn pairs<'a>(fields: &'a [(&'static str, String)]) -> impl Iterator<Item = Arg<'a>> {
    fields.iter().flat_map(|(k, v)| [Arg::Str(k), Arg::Str(v.as_str())])
}

impl Store {
    /// Stores a new deployment (status active, version 1). Refused with AlreadyExists if the
    /// name is taken.
    pub async fn create_deployment(&self, spec: &DeploymentSpec) -> Result<DeploymentRecord> {
        spec.validate()?;
        let fields = spec.fields();
        let mut args = vec![Arg::Str(&spec.model)];
        args.extend(pairs(&fields));
        let reply =
            self.run_ok("deployment_create", &self.scripts().deployment_create, &args).await?;
        let now = reply.u64(1)?;
        Ok(DeploymentRecord {
            spec: spec.clone(),
            status: DeploymentStatus::Active,
            version: reply.u64(0)?,
            created_ms: now,
            updated_ms: now,
            desired: 0,
            last_decision: String::new(),
            last_error: String::new(),
        })
    }

    /// Replaces a deployment's scaling policy. `expected_version` 0 applies it whatever the
    /// version; otherwise a concurrent change is refused with StaleVersion. Returns the new
    /// version.
    pub async fn update_autoscaling(
        &self,
        model: &str,
        autoscaling: &AutoScaling,
        expected_version: u64,
    ) -> Result<u64> {
        names::validate_model_name("model", model)?;
        autoscaling.validate()?;
        let fields = autoscaling.fields();
        let expected = expected_version.to_string();
        let mut args = vec![Arg::Str(model), Arg::Str(&expected)];
        args.extend(pairs(&fields));
        let reply =
            self.run_ok("deployment_update", &self.scripts().deployment_update, &args).await?;
        reply.u64(0)
    }

    /// Replaces a deployment's backend_config (a JSON object as text), as `update_autoscaling`
    /// replaces its policy: only while active, and only at `expected_version` unless that is 0.
    /// Returns the new version.
    pub async fn update_backend_config(
        &self,
        model: &str,
        backend_config: &str,
        expected_version: u64,
    ) -> Result<u64> {
        names::validate_model_name("model", model)?;
        match serde_json::from_str::<serde_json::Value>(backend_config) {
            Ok(serde_json::Value::Object(_)) => {}
            _ => return Err(Error::invalid("backend_config", "must be a JSON object")),
        }
        let expected = expected_version.to_string();
        let args = [
            Arg::Str(model),
            Arg::Str(&expected),
            Arg::Str("backend_config"),
            Arg::Str(backend_config),
        ];
        let reply =
            self.run_ok("deployment_update", &self.scripts().deployment_update, &args).await?;
        reply.u64(0)
    }

    /// Marks an active deployment deleting. Returns the new version.
    pub async fn mark_deployment_deleting(&self, model: &str) -> Result<u64> {
        names::validate_model_name("model", model)?;
        let reply = self
            .run_ok(
                "deployment_mark_deleting",
                &self.scripts().deployment_mark_deleting,
                &[Arg::Str(model)],
            )
            .await?;
        reply.u64(0)
    }

    /// Deletes a deployment that is deleting and has no instances left.
    pub async fn remove_deployment(&self, model: &str) -> Result<()> {
        names::validate_model_name("model", model)?;
        self.run_ok("deployment_remove", &self.scripts().deployment_remove, &[Arg::Str(model)])
            .await?;
        Ok(())
    }

    /// Records the Scaler's desired count for a model, fenced by the leader lease. Returns the
    /// previous desired count.
    pub async fn set_desired(
        &self,
        lease: &LeaderLease,
        model: &str,
        desired: u32,
        decision: &str,
        last_error: &str,
    ) -> Result<u32> {
        names::validate_model_name("model", model)?;
        let token = lease.token.to_string();
        let desired = desired.to_string();
        let reply = self
            .run_ok(
                "deployment_set_desired",
                &self.scripts().deployment_set_desired,
                &[
                    Arg::Str(model),
                    Arg::Str(&lease.role),
                    Arg::Str(&token),
                    Arg::Str(&desired),
                    Arg::Str(decision),
                    Arg::Str(last_error),
                ],
            )
            .await?;
        Ok(reply.u64(0)? as u32)
    }

    /// Records, fenced by the leader lease, that `model` cannot be placed on any live worker
    /// and why; an empty `reason` records that it can be placed again. The `unplaceable` hash
    /// and a `deployment.unplaceable {reason}` event change together, and only when the verdict
    /// changes. Returns whether it changed. Marking a model that is not deployed is refused
    /// with NotFound; clearing one is always allowed.
    pub async fn set_unplaceable(
        &self,
        lease: &LeaderLease,
        model: &str,
        reason: &str,
    ) -> Result<bool> {
        names::validate_model_name("model", model)?;
        if reason.len() > 1024 {
            return Err(Error::invalid("reason", "is longer than 1024 bytes"));
        }
        let token = lease.token.to_string();
        let reply = self
            .run_ok(
                "deployment_set_unplaceable",
                &self.scripts().deployment_set_unplaceable,
                &[Arg::Str(model), Arg::Str(&lease.role), Arg::Str(&token), Arg::Str(reason)],
            )
            .await?;
        Ok(reply.str(0)? == "1")
    }

    /// Every model the Scaler cannot place on any live worker, with why (model -> reason).
    /// Read on start by a service that then follows `deployment.unplaceable` events.
    pub async fn unplaceable_models(&self) -> Result<HashMap<String, String>> {
        self.read(redis::cmd("HGETALL").arg(self.keys().unplaceable())).await
    }

    /// One deployment, or None.
    pub async fn get_deployment(&self, model: &str) -> Result<Option<DeploymentRecord>> {
        names::validate_model_name("model", model)?;
        let key = self.keys().deployment(model);
        let f = self.hgetall(key).await?;
        if f.is_empty() { Ok(None) } else { DeploymentRecord::from_fields(&f).map(Some) }
    }

    /// Every deployment, sorted by name: one SMEMBERS and one pipelined HGETALL per name.
    pub async fn list_deployments(&self) -> Result<Vec<DeploymentRecord>> {
        let names = self.smembers(self.keys().deployments()).await?;
        let keys: Vec<String> = names.iter().map(|n| self.keys().deployment(n)).collect();
        let mut out = Vec::with_capacity(keys.len());
        for f in self.hgetall_many(keys).await? {
            // A name in the index whose hash is gone was removed between the two reads.
            if !f.is_empty() {
                out.push(DeploymentRecord::from_fields(&f)?);
            }
        }
        out.sort_by(|a, b| a.spec.model.cmp(&b.spec.model));
        Ok(out)
    }

    // Plain reads shared by the record modules.

    pub(crate) async fn hgetall(&self, key: String) -> Result<Fields> {
        let map: HashMap<String, String> = self.read(redis::cmd("HGETALL").arg(&key)).await?;
        Ok(Fields::new(key, map))
    }

    /// HGETALL of many keys, pipelined in chunks spread over the connection lanes (one huge
    /// reply parses far slower than several moderate ones read in parallel).
    pub(crate) async fn hgetall_many(&self, keys: Vec<String>) -> Result<Vec<Fields>> {
        const CHUNK: usize = 512;
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let pipes: Vec<redis::Pipeline> = keys
            .chunks(CHUNK)
            .map(|chunk| {
                let mut pipe = redis::pipe();
                for k in chunk {
                    pipe.cmd("HGETALL").arg(k);
                }
                pipe
            })
            .collect();
        let reads = pipes.iter().map(|pipe| self.read_pipe::<Vec<HashMap<String, String>>>(pipe));
        let results = futures::future::try_join_all(reads).await?;
        let mut out = Vec::with_capacity(keys.len());
        let mut keys = keys.into_iter();
        for maps in results {
            for m in maps {
                if let Some(k) = keys.next() {
                    out.push(Fields::new(k, m));
                }
            }
        }
        Ok(out)
    }

    pub(crate) async fn smembers(&self, key: String) -> Result<Vec<String>> {
        self.read(redis::cmd("SMEMBERS").arg(&key)).await
    }
}
