//! A model's waiting room and the places on its instances.
//!
//! Every request of a model takes a [`Slot`]: one place on one ready instance, reserved until
//! the slot drops. An instance has at most [`ModelRoute::limit`] places. A request that finds
//! none free — or finds others already waiting, who go first — takes a [`Ticket`] instead: a
//! place in the model's queue, which is first in, first out, and holds at most
//! `DispatchConfig::max_queue` requests (checked and taken under one lock, so a burst of
//! concurrent requests admits exactly that many). Whenever a place may have become free — an
//! instance ready, a worker attached, a request ended, capacity that will not come — the queue
//! is pumped: waiting requests are handed slots in arrival order, each on the least loaded
//! instance, until no instance has a free place. The queue's state changes only under its
//! lock, in this module.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::oneshot;

use crate::error::DispatchError;
use crate::table::{ModelRoute, Routable, Table, WorkerLink};

/// A model's queue of requests waiting for a place.
#[derive(Default)]
pub(crate) struct Room {
    queue: VecDeque<Waiter>,
    next_id: u64,
}

struct Waiter {
    id: u64,
    /// Instances that failed this request already (avoided while another has room).
    exclude: HashSet<String>,
    tx: oneshot::Sender<Slot>,
}

/// One place on one instance; given back when dropped.
pub(crate) struct Slot {
    pub(crate) instance: Arc<Routable>,
    pub(crate) link: Arc<WorkerLink>,
    route: Arc<ModelRoute>,
    table: Arc<Table>,
}

impl Slot {
    fn new(
        table: &Arc<Table>,
        route: &Arc<ModelRoute>,
        (instance, link): (Arc<Routable>, Arc<WorkerLink>),
    ) -> Slot {
        route.in_flight.fetch_add(1, Ordering::Relaxed);
        route.metrics.in_flight.inc();
        Slot { instance, link, route: route.clone(), table: table.clone() }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.instance.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.route.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.route.metrics.in_flight.dec();
        if self.route.waiting.load(Ordering::Acquire) > 0 {
            self.table.pump(&self.route);
        }
    }
}

/// A request's place in the queue. Dropping it leaves the queue (and gives back a slot that
/// was handed over but not taken).
pub(crate) struct Ticket {
    id: u64,
    rx: oneshot::Receiver<Slot>,
    route: Arc<ModelRoute>,
}

/// Why a ticket ended without a slot.
pub(crate) enum Refused {
    /// The model was removed.
    Removed,
    /// No worker of the fleet can take the model.
    Unplaceable(String),
}

impl Ticket {
    /// Waits for a slot. Cancel-safe: dropping the future keeps the ticket in the queue.
    pub(crate) async fn slot(&mut self) -> Result<Slot, Refused> {
        match (&mut self.rx).await {
            Ok(slot) => Ok(slot),
            Err(_) => Err(match self.route.unplaceable() {
                Some(why) if !self.route.removed.load(Ordering::Relaxed) => {
                    Refused::Unplaceable(why)
                }
                _ => Refused::Removed,
            }),
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut room = self.route.room.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = room.queue.iter().position(|w| w.id == self.id) {
            room.queue.remove(at);
            self.route.waiting.store(room.queue.len() as u64, Ordering::Release);
            return;
        }
        drop(room);
        // Handed a slot that nobody will use: give it back (its drop pumps the queue).
        if let Ok(slot) = self.rx.try_recv() {
            drop(slot);
        }
    }
}

impl Table {
    /// A place for a request that arrived now, if one is free and nobody is waiting before it.
    pub(crate) fn try_slot(
        self: &Arc<Self>,
        route: &Arc<ModelRoute>,
        adapter: Option<&str>,
    ) -> Option<Slot> {
        if route.waiting.load(Ordering::Acquire) > 0 {
            return None;
        }
        let limit = route.limit(self.instance_limit);
        self.reserve_for(route, &HashSet::new(), limit, adapter).map(|r| Slot::new(self, route, r))
    }

    /// Joins the queue: at its end, or (a request that was sent and failed, admitted long ago)
    /// at its front. `cap`: refuse when this many wait already.
    pub(crate) fn enter(
        self: &Arc<Self>,
        route: &Arc<ModelRoute>,
        exclude: HashSet<String>,
        front: bool,
        cap: Option<usize>,
    ) -> Result<Ticket, DispatchError> {
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut room = route.room.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(cap) = cap
                && room.queue.len() >= cap
            {
                return Err(DispatchError::QueueFull {
                    model: route.name.clone(),
                    queued: room.queue.len(),
                    retry_after: std::time::Duration::ZERO,
                });
            }
            room.next_id += 1;
            let id = room.next_id;
            let waiter = Waiter { id, exclude, tx };
            if front {
                room.queue.push_front(waiter);
            } else {
                room.queue.push_back(waiter);
            }
            route.waiting.store(room.queue.len() as u64, Ordering::Release);
            id
        };
        self.pump(route);
        Ok(Ticket { id, rx, route: route.clone() })
    }

    /// Hands free places to waiting requests, first come first served. A model removed, or
    /// one that no worker can take while it has no ready instance, sends every waiting request
    /// away.
    pub(crate) fn pump(self: &Arc<Self>, route: &Arc<ModelRoute>) {
        // Slots handed to requests that had just left: given back once the lock is released
        // (their drop pumps again).
        let mut unclaimed = Vec::new();
        {
            let mut room = route.room.lock().unwrap_or_else(|e| e.into_inner());
            if route.removed.load(Ordering::Relaxed)
                || (route.unplaceable().is_some() && route.ready_count() == 0)
            {
                room.queue.clear();
            }
            let limit = route.limit(self.instance_limit);
            let coming = route.starting.lock().map(|s| !s.is_empty()).unwrap_or(false);
            let none = HashSet::new();
            while let Some(head) = room.queue.front() {
                if head.tx.is_closed() {
                    room.queue.pop_front();
                    continue;
                }
                // Another instance than the ones that failed this request if one has room, or
                // one is on its way; else the same again (it may have been a passing fault;
                // its breaker judges).
                let got = self.reserve(route, &head.exclude, limit).or_else(|| {
                    if head.exclude.is_empty() || coming {
                        None
                    } else {
                        self.reserve(route, &none, limit)
                    }
                });
                let Some(got) = got else { break };
                let slot = Slot::new(self, route, got);
                if let Some(w) = room.queue.pop_front()
                    && let Err(slot) = w.tx.send(slot)
                {
                    unclaimed.push(slot);
                }
            }
            route.waiting.store(room.queue.len() as u64, Ordering::Release);
        }
        drop(unclaimed);
    }
}
