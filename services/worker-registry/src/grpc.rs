//! The gRPC surface of the registry.

use sllm_api::v1 as pb;
use sllm_api::v1::worker_registry_server::WorkerRegistry;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::{Registry, session};

#[tonic::async_trait]
impl WorkerRegistry for Registry {
    type SessionStream = ReceiverStream<Result<pb::RegistryMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<pb::WorkerMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let peer = request.remote_addr();
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(session::run(self.clone(), inbound, tx, peer));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn list_workers(
        &self,
        _request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let workers =
            self.inner.store.list_workers().await.map_err(|e| service::to_status(e, ""))?;
        Ok(Response::new(pb::ListWorkersResponse {
            workers: workers.into_iter().map(service::convert::worker_to_pb).collect(),
        }))
    }

    async fn get_worker(
        &self,
        request: Request<pb::GetWorkerRequest>,
    ) -> Result<Response<pb::Worker>, Status> {
        let id = request.into_inner().worker_id;
        match self.inner.store.get_worker(&id).await.map_err(|e| service::to_status(e, ""))? {
            Some(w) => Ok(Response::new(service::convert::worker_to_pb(w))),
            None => Err(Status::not_found(format!("worker {id:?} is not registered"))),
        }
    }
}
