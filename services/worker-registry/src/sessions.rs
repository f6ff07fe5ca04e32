//! The sessions this replica holds, by worker id: how to wake one when its command stream grows,
//! and how to close one that a newer session of the same worker replaced.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// One local session's handles.
#[derive(Clone)]
pub(crate) struct SessionHandle {
    pub(crate) epoch: u64,
    /// Wakes the session to read its command stream.
    pub(crate) poke: Arc<Notify>,
    /// Ends the session.
    pub(crate) close: CancellationToken,
}

#[derive(Default)]
pub(crate) struct Sessions {
    map: Mutex<HashMap<String, SessionHandle>>,
}

impl Sessions {
    /// Records a new session of `worker`, closing the older one this replica held, if any.
    pub(crate) fn insert(&self, worker: &str, handle: SessionHandle) {
        let old = self.map.lock().ok().and_then(|mut m| {
            let old = m.insert(worker.to_string(), handle);
            telemetry::metrics::WORKER_REGISTRY
                .sessions
                .with_label_values(&[] as &[&str])
                .set(m.len() as i64);
            old
        });
        if let Some(old) = old {
            old.close.cancel();
        }
    }

    /// Forgets `worker`'s session if it is still the one of `epoch`.
    pub(crate) fn remove(&self, worker: &str, epoch: u64) {
        if let Ok(mut m) = self.map.lock()
            && m.get(worker).is_some_and(|h| h.epoch == epoch)
        {
            m.remove(worker);
            telemetry::metrics::WORKER_REGISTRY
                .sessions
                .with_label_values(&[] as &[&str])
                .set(m.len() as i64);
        }
    }

    /// Wakes `worker`'s session if this replica holds it.
    pub(crate) fn poke(&self, worker: &str) {
        if let Some(h) = self.map.lock().ok().and_then(|m| m.get(worker).cloned()) {
            h.poke.notify_one();
        }
    }

    /// Wakes every session (after missed notifications).
    pub(crate) fn poke_all(&self) {
        let handles: Vec<SessionHandle> =
            self.map.lock().map(|m| m.values().cloned().collect()).unwrap_or_default();
        for h in handles {
            h.poke.notify_one();
        }
    }

    pub(crate) fn close_all(&self) {
        let handles: Vec<SessionHandle> =
            self.map.lock().map(|m| m.values().cloned().collect()).unwrap_or_default();
        for h in handles {
            h.close.cancel();
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }
}
