//! The Scaler's read-only status API. Any replica answers, from Redis.

use std::collections::HashMap;

use service::convert;
use sllm_api::v1 as pb;
use sllm_api::v1::scaler_server;
use tonic::{Request, Response, Status};

use crate::{ROLE, Scaler};

fn status_of(
    d: &kvstore::DeploymentRecord,
    instances: &[&kvstore::InstanceRecord],
    demand: Option<&kvstore::Demand>,
) -> pb::ScaleStatus {
    let counts = convert::deployment_to_pb(d, instances).instances;
    let last_decision = serde_json::from_str::<serde_json::Value>(&d.last_decision).ok().map(|v| {
        pb::ScalingDecision {
            from: v["from"].as_u64().unwrap_or(0) as u32,
            to: v["to"].as_u64().unwrap_or(0) as u32,
            reason: v["reason"].as_str().unwrap_or_default().to_string(),
            at_unix_ms: v["at_ms"].as_u64().unwrap_or(0),
        }
    });
    let mut list: Vec<pb::Instance> =
        instances.iter().map(|i| convert::instance_to_pb(i)).collect();
    list.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
    pb::ScaleStatus {
        model: d.spec.model.clone(),
        desired: d.desired,
        actual: counts,
        demand: demand.map(|x| x.total() as u32).unwrap_or(0),
        last_decision,
        instances: list,
        last_error: d.last_error.clone(),
    }
}

#[tonic::async_trait]
impl scaler_server::Scaler for Scaler {
    async fn get_scale_status(
        &self,
        request: Request<pb::GetScaleStatusRequest>,
    ) -> Result<Response<pb::ScaleStatus>, Status> {
        let model = request.into_inner().model;
        let model = model.split_once(':').map(|(n, _)| n.to_string()).unwrap_or(model);
        let d = self
            .store
            .get_deployment(&model)
            .await
            .map_err(|e| service::to_status(e, ""))?
            .ok_or_else(|| Status::not_found(format!("model {model:?} is not deployed")))?;
        let instances =
            self.store.model_instances(&model).await.map_err(|e| service::to_status(e, ""))?;
        let demand = self.store.read_demand().await.map_err(|e| service::to_status(e, ""))?;
        Ok(Response::new(status_of(&d, &instances.iter().collect::<Vec<_>>(), demand.get(&model))))
    }

    async fn list_scale_status(
        &self,
        _request: Request<pb::ListScaleStatusRequest>,
    ) -> Result<Response<pb::ListScaleStatusResponse>, Status> {
        let deployments =
            self.store.list_deployments().await.map_err(|e| service::to_status(e, ""))?;
        let instances = self.store.live_instances().await.map_err(|e| service::to_status(e, ""))?;
        let demand = self.store.read_demand().await.map_err(|e| service::to_status(e, ""))?;
        let mut by_model: HashMap<&str, Vec<&kvstore::InstanceRecord>> = HashMap::new();
        for i in &instances {
            by_model.entry(i.model.as_str()).or_default().push(i);
        }
        let models = deployments
            .iter()
            .map(|d| {
                let name = d.spec.model.as_str();
                status_of(d, by_model.get(name).map(Vec::as_slice).unwrap_or(&[]), demand.get(name))
            })
            .collect();
        Ok(Response::new(pb::ListScaleStatusResponse { models }))
    }

    async fn get_leader(
        &self,
        _request: Request<pb::GetLeaderRequest>,
    ) -> Result<Response<pb::Leader>, Status> {
        let lease = self.store.current_leader(ROLE).await.map_err(|e| service::to_status(e, ""))?;
        Ok(Response::new(match lease {
            Some(l) => pb::Leader {
                holder: l.holder,
                fencing_token: l.token,
                lease_deadline_unix_ms: l.deadline_ms,
            },
            None => pb::Leader::default(),
        }))
    }
}
