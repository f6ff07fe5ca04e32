//! Cold starts as an operator reads them: how long each stage of an instance's start took,
//! timed from the event stream. Every event carries the time Redis appended it (its stream
//! entry id), so the stages are measured on one clock whichever process caused each step:
//!
//! - `placing`: the first demand event of a model with no live instance (a request is held)
//!   until an instance of it is placed;
//! - `pending`: placed until its worker reports it loading (the start command's way there);
//! - `loading`: loading until ready (the checkpoint load and the engine start).
//!
//! A start whose events this leader did not see from the beginning (it took the lead meanwhile,
//! or the stream was trimmed past it) is not timed. What is tracked lives only as long as its
//! model or instance does in the view ([`ColdStarts::forget_gone`]).

use std::collections::HashMap;

use kvstore::{InstanceStatus, Tier};

use crate::view::View;

/// Every value of the `stage` label, in order.
const STAGES: [&str; 3] = ["placing", "pending", "loading"];

/// Where a timed start is, and since when (Redis ms).
struct Start {
    model: String,
    loading: bool,
    since_ms: u64,
}

/// The demand and starts being timed.
#[derive(Default)]
pub(crate) struct ColdStarts {
    /// Models with a held request and no live instance: since the first demand event (ms).
    demand: HashMap<String, u64>,
    starts: HashMap<String, Start>,
}

fn observe(model: &str, stage: &str, from_ms: u64, to_ms: u64) {
    let secs = to_ms.saturating_sub(from_ms) as f64 / 1000.0;
    telemetry::metrics::SCALER.cold_start_stage.with_label_values(&[model, stage]).observe(secs);
}

impl ColdStarts {
    /// A demand event for `model` at `at_ms`; `live` is whether it has an instance (pending,
    /// loading or ready) already, in which case nothing waits for a placement.
    pub(crate) fn demand(&mut self, model: &str, at_ms: u64, live: bool) {
        if !live {
            self.demand.entry(model.to_string()).or_insert(at_ms);
        }
    }

    /// `instance` of `model` was placed at `at_ms`.
    pub(crate) fn placed(&mut self, model: &str, instance: &str, at_ms: u64) {
        if let Some(since) = self.demand.remove(model) {
            observe(model, "placing", since, at_ms);
        }
        let start = Start { model: model.to_string(), loading: false, since_ms: at_ms };
        self.starts.insert(instance.to_string(), start);
    }

    /// `instance` started loading at `at_ms`.
    pub(crate) fn loading(&mut self, instance: &str, at_ms: u64) {
        if let Some(s) = self.starts.get_mut(instance)
            && !s.loading
        {
            observe(&s.model, "pending", s.since_ms, at_ms);
            s.loading = true;
            s.since_ms = at_ms;
        }
    }

    /// `instance` of `model` became ready at `at_ms`: its start is over, and the model's
    /// requests are served.
    pub(crate) fn ready(&mut self, model: &str, instance: &str, at_ms: u64) {
        self.demand.remove(model);
        if let Some(s) = self.starts.remove(instance)
            && s.loading
        {
            observe(&s.model, "loading", s.since_ms, at_ms);
        }
    }

    /// `instance` ended without becoming ready.
    pub(crate) fn ended(&mut self, instance: &str) {
        self.starts.remove(instance);
    }

    /// Forgets a deleted deployment, and its metric series, so they do not stay in /metrics.
    pub(crate) fn deployment_gone(&mut self, model: &str) {
        self.demand.remove(model);
        let m = &*telemetry::metrics::SCALER;
        for stage in STAGES {
            let _ = m.cold_start_stage.remove_label_values(&[model, stage]);
        }
        for tier in [Tier::Gpu, Tier::HostMemory, Tier::Disk, Tier::Remote] {
            let _ = m.cold_starts.remove_label_values(&[model, tier.as_str()]);
        }
    }

    /// Drops what belongs to models and instances that are gone from `view`.
    pub(crate) fn forget_gone(&mut self, view: &View) {
        self.demand.retain(|m, _| view.deployments.contains_key(m));
        self.starts.retain(|id, _| {
            view.instance(id).is_some_and(|i| {
                matches!(
                    i.status,
                    InstanceStatus::Pending | InstanceStatus::Loading | InstanceStatus::Ready
                )
            })
        });
    }

    /// How many models and starts are tracked.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.demand.len() + self.starts.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(model: &str, stage: &str) -> u64 {
        telemetry::metrics::SCALER
            .cold_start_stage
            .with_label_values(&[model, stage])
            .get_sample_count()
    }

    fn sum(model: &str, stage: &str) -> f64 {
        telemetry::metrics::SCALER
            .cold_start_stage
            .with_label_values(&[model, stage])
            .get_sample_sum()
    }

    #[test]
    fn each_stage_is_timed_once_between_its_events() {
        let mut c = ColdStarts::default();
        c.demand("cs-a", 1_000, false);
        // A second held request does not restart the clock.
        c.demand("cs-a", 1_400, false);
        c.placed("cs-a", "i1", 1_500);
        c.loading("i1", 1_700);
        // A repeated report changes nothing.
        c.loading("i1", 1_800);
        c.ready("cs-a", "i1", 4_700);
        assert_eq!((count("cs-a", "placing"), sum("cs-a", "placing")), (1, 0.5));
        assert_eq!((count("cs-a", "pending"), sum("cs-a", "pending")), (1, 0.2));
        assert_eq!((count("cs-a", "loading"), sum("cs-a", "loading")), (1, 3.0));
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn demand_on_a_live_model_and_starts_not_seen_from_the_beginning_are_not_timed() {
        let mut c = ColdStarts::default();
        // An instance is loading already: the held request waits for it, not for a placement.
        c.demand("cs-b", 1_000, true);
        c.placed("cs-b", "i1", 2_000);
        assert_eq!(count("cs-b", "placing"), 0);
        // Loading and ready of an instance placed before this leader led.
        c.loading("i0", 2_100);
        c.ready("cs-b", "i0", 2_200);
        assert_eq!(count("cs-b", "pending"), 0);
        assert_eq!(count("cs-b", "loading"), 0);
        // Ready without a loading report seen: the pending stage is unknown, so is loading.
        c.ready("cs-b", "i1", 3_000);
        assert_eq!(count("cs-b", "loading"), 0);
        c.placed("cs-b", "i2", 3_000);
        c.ended("i2");
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn a_deleted_deployment_leaves_no_series() {
        let mut c = ColdStarts::default();
        c.demand("cs-c", 1_000, false);
        c.placed("cs-c", "i1", 1_100);
        telemetry::metrics::SCALER.cold_starts.with_label_values(&["cs-c", "disk"]).inc();
        c.demand("cs-c", 2_000, false);
        c.deployment_gone("cs-c");
        let text = telemetry::metrics::gather();
        assert!(!text.contains("model=\"cs-c\""), "{text}");
        c.placed("cs-c", "i2", 3_000);
        assert_eq!(count("cs-c", "placing"), 0, "the demand went with the deployment");
    }

    #[test]
    fn what_is_tracked_goes_with_the_view() {
        let mut c = ColdStarts::default();
        for round in 0..1000u64 {
            let model = format!("gone-{round}");
            c.demand(&model, round, false);
            c.placed("other", &format!("i{round}"), round);
        }
        c.forget_gone(&View::default());
        assert_eq!(c.len(), 0);
    }
}
