//! The server side of a worker's Attach stream: the worker proves who it is (join token, and an
//! epoch no older than the one in kvstore), then requests go down and their output comes up,
//! multiplexed by request id.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use sllm_api::v1 as pb;
use sllm_api::v1::attach_up::Msg as Up;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Status, Streaming};

use crate::Inner;
use crate::table::{FromWorker, WorkerLink};

/// What goes down to a worker: control messages (cancels, credit grants) before requests, so a
/// cancel is never stuck behind a queue of requests nor dropped for lack of room. Ends when the
/// request queue closes.
pub struct Down {
    control: mpsc::UnboundedReceiver<pb::AttachDown>,
    requests: mpsc::Receiver<Result<pb::AttachDown, Status>>,
}

impl Stream for Down {
    type Item = Result<pb::AttachDown, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Poll::Ready(Some(m)) = self.control.poll_recv(cx) {
            return Poll::Ready(Some(Ok(m)));
        }
        self.requests.poll_recv(cx)
    }
}

pub(crate) async fn open(
    inner: Arc<Inner>,
    mut inbound: Streaming<pb::AttachUp>,
    peer: Option<SocketAddr>,
) -> Result<Down, Status> {
    let hello = match inbound.message().await? {
        Some(pb::AttachUp { msg: Some(Up::Hello(h)) }) => h,
        _ => {
            return Err(Status::invalid_argument(
                "the first message of an attach stream must be `hello`",
            ));
        }
    };
    kvstore::names::validate_id("hello.worker_id", &hello.worker_id)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    if !inner.config.join_secret.verify(&hello.worker_id, &hello.join_token) {
        return Err(Status::unauthenticated(
            "hello refused: join token does not prove the worker id",
        ));
    }
    match inner.store.get_worker(&hello.worker_id).await {
        Ok(Some(w)) if w.epoch > hello.epoch => {
            return Err(Status::failed_precondition(format!(
                "hello carries epoch {} but the worker's current epoch is {}",
                hello.epoch, w.epoch
            )));
        }
        Ok(_) => {}
        // Redis away: accept on the token alone rather than cut warm traffic.
        Err(e) => {
            tracing::warn!(error = %e, worker = %hello.worker_id, "cannot check the attach epoch")
        }
    }
    let (tx, rx) = mpsc::channel(4096);
    let (control_tx, control) = mpsc::unbounded_channel();
    let link = Arc::new(WorkerLink::new(
        hello.worker_id.clone(),
        hello.epoch,
        hello.run_id.clone(),
        tx.clone(),
        control_tx,
    ));
    // Welcome goes first: once the link is in the table, held requests are sent down it at
    // once, and the worker must not see one before it knows it is attached.
    let welcome = pb::AttachDown {
        msg: Some(pb::attach_down::Msg::Welcome(pb::AttachWelcome {
            dispatch_id: inner.config.replica_id.clone(),
        })),
    };
    let _ = tx.send(Ok(welcome)).await;
    if !inner.table.attach(link.clone()) {
        return Err(Status::failed_precondition("a newer session of this worker is attached"));
    }
    tracing::info!(worker = %hello.worker_id, epoch = hello.epoch, ?peer, "worker attached");
    tokio::spawn(async move {
        loop {
            let msg = tokio::select! {
                m = inbound.message() => m,
                _ = tx.closed() => break,
            };
            match msg {
                Ok(Some(pb::AttachUp { msg: Some(m) })) => match m {
                    Up::Chunk(c) => link.deliver(c.request_id, FromWorker::Chunk(c), false),
                    Up::Finished(f) => link.deliver(f.request_id, FromWorker::Finished(f), true),
                    Up::Error(e) => link.deliver(e.request_id, FromWorker::Error(e), true),
                    Up::Hello(_) => {}
                },
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        tracing::info!(worker = %link.worker_id, epoch = link.epoch, "worker detached");
        inner.table.detach(&link);
    });
    Ok(Down { control, requests: rx })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use tokio_stream::StreamExt;

    use super::*;

    fn request(id: u64) -> Result<pb::AttachDown, Status> {
        let r = pb::InferenceRequest { request_id: id, ..Default::default() };
        Ok(pb::AttachDown { msg: Some(pb::attach_down::Msg::Request(r)) })
    }

    /// With the request queue full, a cancel is neither dropped nor stuck behind it.
    #[tokio::test]
    async fn a_cancel_goes_down_before_a_full_queue_of_requests() {
        let (tx, rx) = mpsc::channel(2);
        let (control_tx, control) = mpsc::unbounded_channel();
        let link = WorkerLink::new("w".into(), 1, "r".into(), tx.clone(), control_tx);
        tx.try_send(request(1)).unwrap();
        tx.try_send(request(2)).unwrap();
        assert!(tx.try_send(request(3)).is_err(), "the queue is full");
        for id in [1, 2] {
            link.cancel(id);
        }
        link.grant(2, 16);
        let mut down = Down { control, requests: rx };
        let mut order = Vec::new();
        for _ in 0..5 {
            match down.next().await.unwrap().unwrap().msg.unwrap() {
                pb::attach_down::Msg::Cancel(c) => order.push(format!("cancel {}", c.request_id)),
                pb::attach_down::Msg::Credit(c) => order.push(format!("credit {}", c.request_id)),
                pb::attach_down::Msg::Request(r) => order.push(format!("request {}", r.request_id)),
                pb::attach_down::Msg::Welcome(_) => order.push("welcome".into()),
            }
        }
        assert_eq!(order, ["cancel 1", "cancel 2", "credit 2", "request 1", "request 2"]);
    }
}
