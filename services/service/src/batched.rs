//! A stream adapter that lets a runtime's waiting tasks add to a batch before it goes out.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio_stream::Stream;

/// Most turns of the runtime one batch waits through.
const MAX_TURNS: u8 = 8;
/// Most items one batch holds.
const MAX_ITEMS: usize = 256;

/// Items of `S`, handed on in batches: an item that arrives after a quiet spell is held back
/// while the runtime's other waiting tasks keep adding to it.
///
/// Holding back means waking itself and yielding, so every task already waiting to run goes
/// first. When that turn added items, it yields again, up to [`MAX_TURNS`] turns or
/// [`MAX_ITEMS`] items; when a turn adds nothing, the batch goes out. The consumer (an HTTP/2
/// body) takes the whole batch in one poll and writes it in one system call.
///
/// Used on both directions of an Attach stream, each of which carries every request between one
/// agent and one Dispatch replica. Up, the output: an engine's response is read one chunk per
/// turn (hyper hands a body over a chunk at a time), so without this each write carried about
/// one event of each busy request, and Dispatch in turn wrote each client once per event or
/// two. Down, the requests, cancels and credit grants of many streams. On an idle runtime
/// nothing else is waiting: a lone message is late by one yield.
pub struct Batched<S: Stream> {
    inner: S,
    held: VecDeque<S::Item>,
    turns: u8,
    releasing: bool,
    ended: bool,
}

impl<S: Stream> Batched<S> {
    pub fn new(inner: S) -> Batched<S> {
        Batched { inner, held: VecDeque::new(), turns: 0, releasing: false, ended: false }
    }
}

impl<S: Stream + Unpin> Stream for Batched<S>
where
    S::Item: Unpin,
{
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let this = &mut *self;
        if this.releasing {
            if let Some(item) = this.held.pop_front() {
                return Poll::Ready(Some(item));
            }
            this.releasing = false;
        }
        let mut grew = false;
        while !this.ended && this.held.len() < MAX_ITEMS {
            match Pin::new(&mut this.inner).poll_next(cx) {
                Poll::Ready(Some(item)) => {
                    this.held.push_back(item);
                    grew = true;
                }
                Poll::Ready(None) => this.ended = true,
                Poll::Pending => break,
            }
        }
        if this.held.is_empty() {
            return if this.ended { Poll::Ready(None) } else { Poll::Pending };
        }
        if grew && !this.ended && this.turns < MAX_TURNS && this.held.len() < MAX_ITEMS {
            // Let the waiting tasks run, then come back for what they added.
            this.turns += 1;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.turns = 0;
        this.releasing = true;
        Poll::Ready(this.held.pop_front())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    #[tokio::test(flavor = "current_thread")]
    async fn what_waiting_tasks_send_goes_out_in_the_same_batch() {
        let (tx, rx) = tokio::sync::mpsc::channel::<u32>(1024);
        let mut batched = Batched::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        // Three producers, each sending one item per turn of the runtime, like requests reading
        // their engine's response a chunk at a time.
        for p in 0..3u32 {
            let tx = tx.clone();
            tokio::spawn(async move {
                for i in 0..4u32 {
                    tx.send(p * 10 + i).await.unwrap();
                    tokio::task::yield_now().await;
                }
            });
        }
        drop(tx);
        // The first poll sees the first item and yields until the producers stop adding: the
        // whole batch is then ready without waiting, one item after another.
        let first = batched.next().await.unwrap();
        let mut batch = vec![first];
        while let Some(Some(item)) = futures::FutureExt::now_or_never(batched.next()) {
            batch.push(item);
        }
        assert!(batch.len() >= 6, "one batch held only {batch:?}");
        let mut rest: Vec<u32> = batched.collect().await;
        rest.extend(batch);
        rest.sort_unstable();
        let all: Vec<u32> = (0..3).flat_map(|p| (0..4).map(move |i| p * 10 + i)).collect();
        assert_eq!(rest, all, "every item arrives exactly once");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_lone_item_goes_out_after_one_turn() {
        let (tx, rx) = tokio::sync::mpsc::channel::<u32>(4);
        let mut batched = Batched::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        tx.send(7).await.unwrap();
        assert_eq!(futures::FutureExt::now_or_never(batched.next()), None, "held for a turn");
        assert_eq!(batched.next().await, Some(7));
        drop(tx);
        assert_eq!(batched.next().await, None);
    }
}
