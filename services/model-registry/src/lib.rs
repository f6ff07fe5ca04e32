//! ModelRegistry: deploy, update, delete, get and list model deployments. It validates a
//! deployment field by field (ServerlessLLM's deploy fields), stores it through kvstore, and
//! answers with what is stored. Scaling and placement are the Scaler's; deletion here only
//! marks a deployment deleting, and the Scaler drains its instances and removes it.
//!
//! It must never call another service.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use kvstore::{InstanceRecord, Store};
use service::convert;
use sllm_api::v1 as pb;
use sllm_api::v1::model_registry_server::{ModelRegistry, ModelRegistryServer};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// What a deploy's warnings need of the fleet: how many workers are registered, and the most
/// GPUs any one of them has.
#[derive(Clone, Copy)]
struct Fleet {
    workers: usize,
    most_gpus: usize,
}

type FleetRead = Shared<BoxFuture<'static, Result<Fleet, Arc<kvstore::Error>>>>;

/// The ModelRegistry service. Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    store: Store,
    /// The read of the fleet in flight, if any: deploys that arrive while it runs share it
    /// instead of each reading every worker's record.
    fleet_read: Arc<Mutex<Option<FleetRead>>>,
}

impl Registry {
    /// A registry over `store`.
    pub fn new(store: Store) -> Registry {
        Registry { store, fleet_read: Arc::default() }
    }

    /// The fleet as read by the read in flight, or by a new one if none is.
    async fn fleet(&self) -> Result<Fleet, Arc<kvstore::Error>> {
        let read = {
            // A poisoned lock only means a panic while swapping an Option: the value is whole.
            let mut slot = self.fleet_read.lock().unwrap_or_else(|e| e.into_inner());
            match &*slot {
                Some(read) if read.peek().is_none() => read.clone(),
                _ => {
                    let store = self.store.clone();
                    let read = async move {
                        let workers = store.list_workers().await.map_err(Arc::new)?;
                        Ok(Fleet {
                            workers: workers.len(),
                            most_gpus: workers
                                .iter()
                                .map(|w| w.inventory.gpus.len())
                                .max()
                                .unwrap_or(0),
                        })
                    }
                    .boxed()
                    .shared();
                    *slot = Some(read.clone());
                    read
                }
            }
        };
        read.await
    }

    /// The gRPC service, to mount on a shared server.
    pub fn service(&self) -> ModelRegistryServer<Registry> {
        ModelRegistryServer::new(self.clone())
    }

    /// Serves it with gRPC health and reflection on `listener` until `shutdown`.
    pub async fn serve(
        self,
        listener: service::Listener,
        shutdown: CancellationToken,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter.set_serving::<ModelRegistryServer<Registry>>().await;
        tonic::transport::Server::builder()
            .max_concurrent_streams(Some(service::MAX_CONCURRENT_STREAMS))
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .add_service(health)
            .add_service(service::reflection_v1()?)
            .add_service(service::reflection_v1alpha()?)
            .add_service(ModelRegistryServer::new(self))
            .serve_with_incoming_shutdown(listener.incoming(), shutdown.cancelled_owned())
            .await?;
        Ok(())
    }

    /// Warnings about a spec that is allowed but probably wrong.
    async fn warnings(&self, spec: &kvstore::DeploymentSpec) -> Vec<String> {
        let mut out = Vec::new();
        match self.fleet().await {
            Ok(Fleet { workers, most_gpus: most }) => {
                if workers == 0 {
                    out.push(
                        "no worker has registered yet: the model starts once one joins".to_string(),
                    );
                } else if spec.num_gpus as usize > most {
                    out.push(format!(
                        "num_gpus is {} but no registered worker has more than {most} GPUs: the model \
                         cannot start until such a worker joins",
                        spec.num_gpus
                    ));
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot check workers for deploy warnings"),
        }
        out
    }

    /// Adds (`add`: name, path) and removes (`remove`: names) LoRA adapters of `model` in its
    /// backend_config, checked as a deploy checks them. With `expected_version` 0 a concurrent
    /// change is retried over; otherwise it is refused. Returns the new version.
    async fn change_adapters(
        &self,
        model: &str,
        add: &[(String, String)],
        remove: &[String],
        expected_version: u64,
    ) -> Result<u64, Status> {
        for attempt in 0..6 {
            let record = self
                .store
                .get_deployment(model)
                .await
                .map_err(|e| service::to_status(e, ""))?
                .ok_or_else(|| not_found(model))?;
            if expected_version != 0 && record.version != expected_version {
                return Err(Status::aborted(format!(
                    "model {model:?} changed meanwhile: expected version {expected_version}, it \
                     is at {}",
                    record.version
                )));
            }
            let mut config: serde_json::Map<String, serde_json::Value> =
                if record.spec.backend_config.is_empty() {
                    serde_json::Map::new()
                } else {
                    serde_json::from_str(&record.spec.backend_config).map_err(|e| {
                        Status::internal(format!("stored backend_config is not an object: {e}"))
                    })?
                };
            let mut adapters = match config.remove("lora_adapters") {
                Some(serde_json::Value::Object(m)) => m,
                _ => serde_json::Map::new(),
            };
            for name in remove {
                if adapters.remove(name).is_none() {
                    let have: Vec<&str> = adapters.keys().map(String::as_str).collect();
                    return Err(Status::not_found(format!(
                        "model {model:?} has no LoRA adapter {name:?} (it has: {})",
                        if have.is_empty() { "none".to_string() } else { have.join(", ") }
                    )));
                }
            }
            for (name, path) in add {
                adapters.insert(name.clone(), serde_json::Value::String(path.clone()));
            }
            config.insert("lora_adapters".into(), serde_json::Value::Object(adapters));
            sllm_api::backend_config::check(&record.spec.backend, &config).map_err(|e| {
                service::field_status(&format!("backend_config.{}", e.key), e.reason)
            })?;
            let text = serde_json::Value::Object(config).to_string();
            match self.store.update_backend_config(model, &text, record.version).await {
                Ok(v) => {
                    tracing::info!(%model, added = add.len(), removed = remove.len(), "LoRA adapters changed");
                    return Ok(v);
                }
                Err(e)
                    if expected_version == 0
                        && attempt < 5
                        && matches!(e.refusal(), Some(kvstore::Refusal::StaleVersion { .. })) => {}
                Err(e) => return Err(update_refusal(e, model, expected_version)),
            }
        }
        Err(Status::aborted(format!("model {model:?} kept changing; try again")))
    }

    async fn deployment(&self, model: &str) -> Result<pb::Deployment, Status> {
        let d = self.store.get_deployment(model).await.map_err(|e| service::to_status(e, ""))?;
        let instances =
            self.store.model_instances(model).await.map_err(|e| service::to_status(e, ""))?;
        match d {
            Some(d) => Ok(convert::deployment_to_pb(&d, &instances.iter().collect::<Vec<_>>())),
            None if !instances.is_empty() => {
                Err(Status::not_found(convert::missing_deployment_words(model, instances.len())))
            }
            None => Err(not_found(model)),
        }
    }

    /// Deletes a model whose record was lost but whose instances still run: a record in the
    /// deleting state is written for it, and the Scaler drains and stops them as for any delete.
    async fn delete_missing(&self, model: &str) -> Result<bool, Status> {
        let instances =
            self.store.model_instances(model).await.map_err(|e| service::to_status(e, ""))?;
        if instances.is_empty() {
            return Ok(false);
        }
        let spec = kvstore::DeploymentSpec {
            model: model.to_string(),
            backend: "unknown".into(),
            num_gpus: instances.iter().map(|i| i.gpus.len() as u32).max().unwrap_or(1).max(1),
            autoscaling: kvstore::AutoScaling::default(),
            backend_config: String::new(),
        };
        match self.store.create_deployment(&spec).await {
            Ok(_) => {}
            Err(e) if matches!(e.refusal(), Some(kvstore::Refusal::AlreadyExists)) => {}
            Err(e) => return Err(service::to_status(e, "")),
        }
        self.store.mark_deployment_deleting(model).await.map_err(|e| service::to_status(e, ""))?;
        tracing::warn!(%model, instances = instances.len(), "deleting a model whose deployment record was lost");
        Ok(true)
    }
}

/// A refused update of `model`, as the user sees it.
fn update_refusal(e: kvstore::Error, model: &str, expected_version: u64) -> Status {
    match e.refusal() {
        Some(kvstore::Refusal::NotFound) => not_found(model),
        Some(kvstore::Refusal::StaleVersion { current }) => Status::aborted(format!(
            "model {model:?} changed meanwhile: expected version {expected_version}, it is at {current}"
        )),
        Some(kvstore::Refusal::WrongState { current }) => Status::failed_precondition(format!(
            "model {model:?} is {current}; it cannot be updated"
        )),
        _ => service::to_status(e, ""),
    }
}

fn not_found(model: &str) -> Status {
    Status::not_found(format!("model {model:?} is not deployed"))
}

/// Accepts ServerlessLLM's `name:backend` form and returns the name.
fn model_name(name: &str) -> &str {
    name.split_once(':').map(|(n, _)| n).unwrap_or(name)
}

#[tonic::async_trait]
impl ModelRegistry for Registry {
    async fn deploy(
        &self,
        request: Request<pb::DeployRequest>,
    ) -> Result<Response<pb::DeployResponse>, Status> {
        let spec = convert::spec_from_pb(request.get_ref().spec.as_ref())?;
        let record = self.store.create_deployment(&spec).await.map_err(|e| match e.refusal() {
            Some(kvstore::Refusal::AlreadyExists) => Status::already_exists(format!(
                "model {:?} is already deployed; use Update to change its scaling, or Delete it first",
                spec.model
            )),
            _ => service::to_status(e, "spec"),
        })?;
        let warnings = self.warnings(&spec).await;
        tracing::info!(model = %spec.model, backend = %spec.backend, num_gpus = spec.num_gpus, "deployed");
        Ok(Response::new(pb::DeployResponse {
            deployment: Some(convert::deployment_to_pb(&record, &[])),
            warnings,
        }))
    }

    async fn update(
        &self,
        request: Request<pb::UpdateRequest>,
    ) -> Result<Response<pb::UpdateResponse>, Status> {
        let req = request.into_inner();
        let model = model_name(&req.model);
        let adapters_change =
            !req.add_lora_adapters.is_empty() || !req.remove_lora_adapters.is_empty();
        let autoscaling = match req.auto_scaling_config.as_ref() {
            Some(config) => {
                Some(convert::autoscaling_from_pb(Some(config), "auto_scaling_config")?)
            }
            None if adapters_change => None,
            None => {
                return Err(service::field_status(
                    "auto_scaling_config",
                    "is required (unless the update adds or removes LoRA adapters)",
                ));
            }
        };
        if let Some(a) = &autoscaling {
            a.validate().map_err(|e| service::to_status(e, ""))?;
        }
        let mut expected = req.expected_version;
        if adapters_change {
            let mut add: Vec<(String, String)> =
                req.add_lora_adapters.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            add.sort();
            expected =
                self.change_adapters(model, &add, &req.remove_lora_adapters, expected).await?;
        }
        if let Some(autoscaling) = autoscaling {
            self.store
                .update_autoscaling(model, &autoscaling, expected)
                .await
                .map_err(|e| update_refusal(e, model, req.expected_version))?;
            tracing::info!(%model, ?autoscaling, "updated");
        }
        Ok(Response::new(pb::UpdateResponse {
            deployment: Some(self.deployment(model).await?),
            warnings: vec![],
        }))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let req = request.into_inner();
        let model = model_name(&req.model);
        if !req.lora_adapters.is_empty() {
            self.change_adapters(model, &[], &req.lora_adapters, 0).await?;
            return Ok(Response::new(pb::DeleteResponse {
                deployment: Some(self.deployment(model).await?),
            }));
        }
        // Read first: with nothing to drain, the Scaler may remove the record as soon as it is
        // marked, and the answer must still describe what was deleted.
        let before = self.deployment(model).await.ok();
        match self.store.mark_deployment_deleting(model).await {
            Ok(_) => {}
            Err(e) => match e.refusal() {
                Some(kvstore::Refusal::NotFound) => {
                    if !self.delete_missing(model).await? {
                        return Err(not_found(model));
                    }
                }
                Some(kvstore::Refusal::WrongState { .. }) => {
                    return Err(Status::failed_precondition(format!(
                        "model {model:?} is already being deleted"
                    )));
                }
                _ => return Err(service::to_status(e, "")),
            },
        }
        tracing::info!(%model, "deleting");
        let deployment = match self.deployment(model).await {
            Ok(d) => d,
            Err(s) if s.code() == tonic::Code::NotFound => {
                // Already removed: the delete is complete.
                let mut d = before.ok_or(s)?;
                d.state = pb::DeploymentState::Deleting as i32;
                d
            }
            Err(s) => return Err(s),
        };
        Ok(Response::new(pb::DeleteResponse { deployment: Some(deployment) }))
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::Deployment>, Status> {
        let name = request.into_inner().model;
        Ok(Response::new(self.deployment(model_name(&name)).await?))
    }

    async fn list(
        &self,
        _request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let deployments =
            self.store.list_deployments().await.map_err(|e| service::to_status(e, ""))?;
        let instances = self.store.live_instances().await.map_err(|e| service::to_status(e, ""))?;
        let mut by_model: HashMap<&str, Vec<&InstanceRecord>> = HashMap::new();
        for i in &instances {
            by_model.entry(i.model.as_str()).or_default().push(i);
        }
        let mut out: Vec<pb::Deployment> = deployments
            .iter()
            .map(|d| {
                convert::deployment_to_pb(
                    d,
                    by_model.get(d.spec.model.as_str()).map(Vec::as_slice).unwrap_or(&[]),
                )
            })
            .collect();
        // Models that run without a record: the store lost it. Listed, never left out.
        let mut missing: Vec<(&str, &Vec<&InstanceRecord>)> = by_model
            .iter()
            .filter(|(m, _)| !deployments.iter().any(|d| d.spec.model == **m))
            .map(|(m, i)| (*m, i))
            .collect();
        missing.sort_by_key(|(m, _)| *m);
        for (model, instances) in missing {
            out.push(convert::missing_deployment_to_pb(model, instances));
        }
        Ok(Response::new(pb::ListResponse { deployments: out }))
    }
}
