//! How long the leader has seen instances lost or draining: the clocks behind writing off an
//! instance whose worker never came back and stopping a drain that overran. A clock lives only
//! as long as its instance stays in that state in the view; [`Clocks::forget_gone`] drops the
//! rest, so the leader's bookkeeping never outgrows the instances it tracks.

use std::collections::HashMap;
use std::time::Instant;

use kvstore::InstanceStatus;

use crate::view::View;

/// When each tracked instance was first seen lost or draining.
#[derive(Default)]
pub(crate) struct Clocks {
    lost: HashMap<String, Instant>,
    draining: HashMap<String, Instant>,
}

impl Clocks {
    /// Since when `id` has been lost (starting now if it was not tracked).
    pub(crate) fn lost_since(&mut self, id: &str, now: Instant) -> Instant {
        *self.lost.entry(id.to_string()).or_insert(now)
    }

    /// Since when `id` has been draining (starting now if it was not tracked).
    pub(crate) fn draining_since(&mut self, id: &str, now: Instant) -> Instant {
        *self.draining.entry(id.to_string()).or_insert(now)
    }

    /// Starts `id`'s drain clock at `now`.
    pub(crate) fn start_draining(&mut self, id: &str, now: Instant) {
        self.draining.insert(id.to_string(), now);
    }

    /// Stops tracking `id`.
    pub(crate) fn forget(&mut self, id: &str) {
        self.lost.remove(id);
        self.draining.remove(id);
    }

    /// Drops every clock whose instance is gone from `view` or left the state it times.
    pub(crate) fn forget_gone(&mut self, view: &View) {
        let still = |id: &String, status: InstanceStatus| {
            view.instance(id).is_some_and(|i| i.status == status)
        };
        self.lost.retain(|id, _| still(id, InstanceStatus::Lost));
        self.draining.retain(|id, _| still(id, InstanceStatus::Draining));
    }

    /// How many instances are tracked.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lost.len() + self.draining.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvstore::InstanceRecord;

    fn instance(id: &str, status: InstanceStatus) -> InstanceRecord {
        InstanceRecord {
            instance_id: id.into(),
            model: "m".into(),
            worker_id: "w1".into(),
            status,
            gpus: vec![0],
            reason: String::new(),
            version: 1,
            created_ms: 0,
            updated_ms: 0,
        }
    }

    #[test]
    fn clocks_go_with_what_they_track() {
        let mut view = View::default();
        let mut clocks = Clocks::default();
        let now = Instant::now();
        // Many scale-downs and lost workers over time: each instance drains or is lost, then
        // stops, fails or comes back.
        for round in 0..1000 {
            let drained = format!("d{round}");
            let lost = format!("l{round}");
            view.insert(instance(&drained, InstanceStatus::Draining));
            view.insert(instance(&lost, InstanceStatus::Lost));
            clocks.start_draining(&drained, now);
            clocks.lost_since(&lost, now);
            assert_eq!(clocks.len(), 2);
            view.insert(instance(&drained, InstanceStatus::Stopped));
            // The worker came back: the instance is ready again, no longer lost.
            view.insert(instance(&lost, InstanceStatus::Ready));
            clocks.forget_gone(&view);
            assert_eq!(clocks.len(), 0, "round {round}");
            view.remove(&lost);
        }
        // A clock whose instance is still in that state is kept.
        view.insert(instance("x", InstanceStatus::Draining));
        clocks.draining_since("x", now);
        clocks.forget_gone(&view);
        assert_eq!(clocks.draining_since("x", now + std::time::Duration::from_secs(5)), now);
    }
}
