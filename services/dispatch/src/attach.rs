//! The server side of a worker's Attach stream: the worker proves who it is (join token, and
//! exactly the epoch the registry issued to its current session), then requests go down and
//! their output comes up, multiplexed by request id.
//!
//! The hello must come within [`crate::DispatchConfig::hello_timeout`], and the token is checked
//! before Redis is read, so a stream that proves nothing costs a timer and no Redis command.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use sllm_api::v1 as pb;
use sllm_api::v1::attach_up::Msg as Up;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Status, Streaming};

use crate::Inner;
use crate::error::AttachRefused;
use crate::table::{FromWorker, WorkerLink};

/// What goes down to a worker: control messages (cancels, credit grants) before requests, so a
/// cancel is never stuck behind a queue of requests nor dropped for lack of room. Ends when the
/// request queue closes, or when the replica closes (the end of a graceful stop).
pub struct Down {
    control: mpsc::UnboundedReceiver<pb::AttachDown>,
    requests: mpsc::Receiver<Result<pb::AttachDown, Status>>,
    closed: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl Stream for Down {
    type Item = Result<pb::AttachDown, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.closed.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        if let Poll::Ready(Some(m)) = self.control.poll_recv(cx) {
            return Poll::Ready(Some(Ok(m)));
        }
        self.requests.poll_recv(cx)
    }
}

/// Pauses before each re-read of a worker's record when its hello carries an epoch newer than
/// the record's. The registry writes the epoch before it tells the agent, so one read normally
/// suffices; these cover a read served just before that write became visible, without ever
/// taking a claimed epoch on trust.
const EPOCH_REREADS: [Duration; 2] = [Duration::from_millis(100), Duration::from_millis(400)];

pub(crate) async fn open(
    inner: Arc<Inner>,
    mut inbound: Streaming<pb::AttachUp>,
    peer: Option<SocketAddr>,
) -> Result<Down, Status> {
    let hello = read_hello(&inner, &mut inbound).await.map_err(|e| refused(e, peer))?;
    check_epoch(&inner, &hello).await.map_err(|e| refused(e, peer))?;
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
    if let Err(attached) = inner.table.attach(link.clone()) {
        let e = AttachRefused::Superseded {
            worker: hello.worker_id.clone(),
            claimed: hello.epoch,
            attached,
        };
        return Err(refused(e, peer));
    }
    tracing::info!(worker = %hello.worker_id, epoch = hello.epoch, ?peer, "worker attached");
    let closed = inner.closed.clone();
    let down = Down { control, requests: rx, closed: Box::pin(closed.clone().cancelled_owned()) };
    tokio::spawn(async move {
        loop {
            let msg = tokio::select! {
                m = inbound.message() => m,
                _ = tx.closed() => break,
                _ = closed.cancelled() => break,
            };
            match msg {
                Ok(Some(pb::AttachUp { msg: Some(m) })) => match m {
                    Up::Started(s) => link.deliver(s.request_id, FromWorker::Started, false),
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
    Ok(down)
}

/// Logs a refusal and turns it into the status the worker sees. Streams that proved nothing
/// are logged at debug only: anyone can open them, by the thousand.
fn refused(e: AttachRefused, peer: Option<SocketAddr>) -> Status {
    match e {
        AttachRefused::NoHello(_)
        | AttachRefused::Broken(_)
        | AttachRefused::NotHello
        | AttachRefused::Invalid { .. }
        | AttachRefused::Token { .. } => tracing::debug!(?peer, error = %e, "attach refused"),
        _ => tracing::info!(?peer, error = %e, "attach refused"),
    }
    e.to_status()
}

/// The stream's first message, which must be a hello with a well-formed worker id and a join
/// token that proves it, within the hello timeout. Reads nothing from Redis.
async fn read_hello(
    inner: &Inner,
    inbound: &mut Streaming<pb::AttachUp>,
) -> Result<pb::AttachHello, AttachRefused> {
    let timeout = inner.config.hello_timeout;
    let first = tokio::time::timeout(timeout, inbound.message())
        .await
        .map_err(|_| AttachRefused::NoHello(timeout))?
        .map_err(|s| AttachRefused::Broken(s.message().to_string()))?;
    let hello = match first {
        Some(pb::AttachUp { msg: Some(Up::Hello(h)) }) => h,
        Some(_) => return Err(AttachRefused::NotHello),
        None => return Err(AttachRefused::Broken("closed by the worker".into())),
    };
    kvstore::names::validate_id("hello.worker_id", &hello.worker_id)
        .map_err(|e| AttachRefused::Invalid { field: "hello.worker_id", reason: e.to_string() })?;
    if let Err(e) = inner.config.join_secrets.verify(&hello.worker_id, &hello.join_token) {
        return Err(AttachRefused::Token { worker: hello.worker_id, reason: e.to_string() });
    }
    Ok(hello)
}

/// Accepts the hello's epoch only if it is exactly the worker's epoch in Redis; while Redis
/// cannot be read, only if it is exactly the epoch this replica last learnt from Redis for the
/// worker. A token holder claiming a newer epoch would otherwise replace the real worker's
/// stream and take its requests.
async fn check_epoch(inner: &Inner, hello: &pb::AttachHello) -> Result<(), AttachRefused> {
    let worker = &hello.worker_id;
    let claimed = hello.epoch;
    let mut rereads = EPOCH_REREADS.iter();
    loop {
        let current = match inner.store.get_worker(worker).await {
            Ok(record) => record.map(|w| w.epoch),
            Err(e) => {
                return if inner.table.known_epoch(worker) == Some(claimed) {
                    tracing::warn!(error = %e, %worker, epoch = claimed, "cannot read the worker's epoch; accepting the epoch this replica knows");
                    Ok(())
                } else {
                    Err(AttachRefused::Unverifiable {
                        worker: worker.clone(),
                        claimed,
                        reason: e.to_string(),
                    })
                };
            }
        };
        match current {
            Some(c) if c == claimed => {
                inner.table.set_epoch(worker, c);
                return Ok(());
            }
            Some(c) if c > claimed => {
                inner.table.set_epoch(worker, c);
                return Err(AttachRefused::StaleEpoch {
                    worker: worker.clone(),
                    claimed,
                    current: c,
                });
            }
            // Newer than Redis's, or not registered: read again a little later, in case the
            // registration that issued it is not visible yet; never accept it unread.
            _ => match rereads.next() {
                Some(pause) => tokio::time::sleep(*pause).await,
                None => {
                    return Err(AttachRefused::UnissuedEpoch {
                        worker: worker.clone(),
                        claimed,
                        current,
                    });
                }
            },
        }
    }
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
        let closed = tokio_util::sync::CancellationToken::new();
        let mut down = Down { control, requests: rx, closed: Box::pin(closed.cancelled_owned()) };
        let mut order = Vec::new();
        for _ in 0..5 {
            match down.next().await.unwrap().unwrap().msg.unwrap() {
                pb::attach_down::Msg::Cancel(c) => order.push(format!("cancel {}", c.request_id)),
                pb::attach_down::Msg::Credit(c) => order.push(format!("credit {}", c.request_id)),
                pb::attach_down::Msg::Request(r) => order.push(format!("request {}", r.request_id)),
                pb::attach_down::Msg::Welcome(_) => order.push("welcome".into()),
                pb::attach_down::Msg::UnloadAdapter(u) => order.push(format!("unload {}", u.name)),
            }
        }
        assert_eq!(order, ["cancel 1", "cancel 2", "credit 2", "request 1", "request 2"]);
    }
}
