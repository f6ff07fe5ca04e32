//! Every Prometheus metric of sllm, by name, in one place.
//!
//! Naming rules: `sllm_<part>_<what>_<unit>`; units in the name (`_seconds`, `_bytes`,
//! `_total` for counters); labels are bounded sets (model names are, by deployment; worker ids
//! are not used as labels). Each binary serves them as Prometheus text on `/metrics`.

use std::sync::LazyLock;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

// Dispatch.
/// Requests finished, by model and outcome (ok, cancelled, not_found, invalid, queue_full,
/// deadline, unavailable).
pub const DISPATCH_REQUESTS_TOTAL: &str = "sllm_dispatch_requests_total";
/// Request duration from arrival to the last byte, by model and outcome.
pub const DISPATCH_REQUEST_DURATION_SECONDS: &str = "sllm_dispatch_request_duration_seconds";
/// Time from arrival to the first token, by model.
pub const DISPATCH_TIME_TO_FIRST_TOKEN_SECONDS: &str = "sllm_dispatch_time_to_first_token_seconds";
/// Requests held for a cold model right now, by model.
pub const DISPATCH_QUEUE_DEPTH: &str = "sllm_dispatch_queue_depth";
/// How long requests were held before an instance took them, by model.
pub const DISPATCH_QUEUE_WAIT_SECONDS: &str = "sllm_dispatch_queue_wait_seconds";
/// Requests being served right now, by model.
pub const DISPATCH_IN_FLIGHT: &str = "sllm_dispatch_in_flight";
/// Attempts that failed before the first token and were retried, by model.
pub const DISPATCH_RETRIES_TOTAL: &str = "sllm_dispatch_retries_total";
/// Streams moved to another instance after output was sent, by model and reason (failure:
/// the instance was lost; drain: it was being taken away).
pub const DISPATCH_MIGRATIONS_TOTAL: &str = "sllm_dispatch_migrations_total";
/// Tokens streamed to clients, by model.
pub const DISPATCH_TOKENS_TOTAL: &str = "sllm_dispatch_tokens_total";
/// Requests refused by a caller's rate limit.
pub const DISPATCH_RATE_LIMITED_TOTAL: &str = "sllm_dispatch_rate_limited_total";
/// Workers attached to this replica.
pub const DISPATCH_ATTACHED_WORKERS: &str = "sllm_dispatch_attached_workers";

// Scaler.
/// Instances the Scaler wants, by model.
pub const SCALER_DESIRED_INSTANCES: &str = "sllm_scaler_desired_instances";
/// Instances that exist, by model and state.
pub const SCALER_INSTANCES: &str = "sllm_scaler_instances";
/// Workers, by state (as the leader sees them).
pub const SCALER_WORKERS: &str = "sllm_scaler_workers";
/// Scaling decisions, by direction (up, down, replace) and reason (demand_event, demand,
/// min_instances, keep_alive, deleting).
pub const SCALER_DECISIONS_TOTAL: &str = "sllm_scaler_decisions_total";
/// 1 while this replica leads.
pub const SCALER_LEADER: &str = "sllm_scaler_leader";
/// Times this replica lost the leader lease while leading (a renewal refused or overdue).
pub const SCALER_LEASE_LOST_TOTAL: &str = "sllm_scaler_lease_lost_total";
/// Instances placed to start (each one a checkpoint to load and an engine to start), by model
/// and the tier its checkpoint loads from (gpu, host_memory, disk, remote).
pub const SCALER_COLD_STARTS_TOTAL: &str = "sllm_scaler_cold_starts_total";
/// How long each stage of a cold start took, by model and stage: `placing` (a request's demand
/// event until its instance is placed), `pending` (placed until the worker reports loading) and
/// `loading` (loading until ready: the checkpoint load and the engine start). Timed by the
/// Redis clock that stamps the events.
pub const SCALER_COLD_START_STAGE_SECONDS: &str = "sllm_scaler_cold_start_stage_seconds";

// WorkerRegistry.
/// Sessions held by this replica.
pub const REGISTRY_SESSIONS: &str = "sllm_registry_sessions";
/// Heartbeats handled.
pub const REGISTRY_HEARTBEATS_TOTAL: &str = "sllm_registry_heartbeats_total";
/// Time between a session's consecutive heartbeats (lag shows as values above the interval).
pub const REGISTRY_HEARTBEAT_GAP_SECONDS: &str = "sllm_registry_heartbeat_gap_seconds";
/// Workers declared lost, by reason (dropped, expired).
pub const REGISTRY_WORKERS_LOST_TOTAL: &str = "sllm_registry_workers_lost_total";

// Worker agent.
/// Requests run on this host's instances, by outcome (done, error, cancelled).
pub const WORKER_REQUESTS_TOTAL: &str = "sllm_worker_requests_total";
/// Tokens generated on this host.
pub const WORKER_TOKENS_TOTAL: &str = "sllm_worker_tokens_total";
/// Registry sessions this agent opened (more than one means it reconnected).
pub const WORKER_SESSIONS_TOTAL: &str = "sllm_worker_sessions_total";

// kvstore.
/// Redis call latency, by operation (script or command name).
pub const REDIS_COMMAND_DURATION_SECONDS: &str = "sllm_redis_command_duration_seconds";
/// Redis calls that failed (connection, timeout), by operation.
pub const REDIS_ERRORS_TOTAL: &str = "sllm_redis_errors_total";
/// Pooled Redis connections, by state (in_use, idle).
pub const REDIS_POOL_CONNECTIONS: &str = "sllm_redis_pool_connections";

// Trace export (every binary).
/// Spans delivered to the OTLP endpoint.
pub const TRACE_SPANS_EXPORTED_TOTAL: &str = "sllm_trace_spans_exported_total";
/// Spans lost because the endpoint refused them or did not answer (the SDK's batch processor
/// logs the spans it drops from a full queue itself).
pub const TRACE_SPANS_DROPPED_TOTAL: &str = "sllm_trace_spans_dropped_total";
/// Export calls that failed.
pub const TRACE_EXPORT_FAILURES_TOTAL: &str = "sllm_trace_export_failures_total";

/// The process's metrics registry.
pub static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::new);

fn register<T: prometheus::core::Collector + Clone + 'static>(m: T) -> T {
    // A second registration of the same name can only come from a programming error caught by
    // the tests; the metric still works, it is just not exported twice.
    let _ = REGISTRY.register(Box::new(m.clone()));
    m
}

// The names, help texts and labels passed here are the constants of this module: valid
// Prometheus identifiers, so building a metric from them cannot fail (the tests gather every
// metric once to prove it).
const VALID: &str = "metric definitions in this module are valid constants";

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(IntCounterVec::new(Opts::new(name, help), labels).expect(VALID))
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(IntGaugeVec::new(Opts::new(name, help), labels).expect(VALID))
}

fn histogram(name: &str, help: &str, labels: &[&str], buckets: Vec<f64>) -> HistogramVec {
    register(
        HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels).expect(VALID),
    )
}

const LATENCY: [f64; 14] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];
fn long() -> Vec<f64> {
    vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]
}

/// Dispatch's metrics.
pub struct Dispatch {
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    pub ttft: HistogramVec,
    pub queue_depth: IntGaugeVec,
    pub queue_wait: HistogramVec,
    pub in_flight: IntGaugeVec,
    pub retries: IntCounterVec,
    pub migrations: IntCounterVec,
    pub tokens: IntCounterVec,
    pub attached: IntGauge,
    pub rate_limited: IntCounter,
}

/// The Scaler's metrics.
pub struct Scaler {
    pub desired: IntGaugeVec,
    pub instances: IntGaugeVec,
    pub workers: IntGaugeVec,
    pub decisions: IntCounterVec,
    pub leader: IntGaugeVec,
    pub lease_lost: IntCounter,
    pub cold_starts: IntCounterVec,
    pub cold_start_stage: HistogramVec,
}

/// The WorkerRegistry's metrics.
pub struct WorkerRegistry {
    pub sessions: IntGaugeVec,
    pub heartbeats: IntCounterVec,
    pub heartbeat_gap: HistogramVec,
    pub lost: IntCounterVec,
}

/// The worker agent's metrics.
pub struct Worker {
    pub requests: IntCounterVec,
    pub tokens: IntCounterVec,
    pub sessions: IntCounterVec,
}

/// kvstore's metrics.
pub struct Redis {
    pub duration: HistogramVec,
    pub errors: IntCounterVec,
    pub pool: IntGaugeVec,
}

/// Trace export's metrics.
pub struct Traces {
    pub exported: IntCounter,
    pub dropped: IntCounter,
    pub export_failures: IntCounter,
}

/// Trace export's metrics, registered on first use.
pub static TRACES: LazyLock<Traces> = LazyLock::new(|| Traces {
    exported: counter(TRACE_SPANS_EXPORTED_TOTAL, "Spans delivered to the OTLP endpoint.", &[])
        .with_label_values(&[] as &[&str]),
    dropped: counter(TRACE_SPANS_DROPPED_TOTAL, "Spans lost to a failed export.", &[])
        .with_label_values(&[] as &[&str]),
    export_failures: counter(TRACE_EXPORT_FAILURES_TOTAL, "Trace export calls that failed.", &[])
        .with_label_values(&[] as &[&str]),
});

/// Dispatch's metrics, registered on first use.
pub static DISPATCH: LazyLock<Dispatch> = LazyLock::new(|| Dispatch {
    requests: counter(
        DISPATCH_REQUESTS_TOTAL,
        "Requests finished, by model and outcome.",
        &["model", "outcome"],
    ),
    duration: histogram(
        DISPATCH_REQUEST_DURATION_SECONDS,
        "Request duration, arrival to last byte.",
        &["model", "outcome"],
        long(),
    ),
    ttft: histogram(
        DISPATCH_TIME_TO_FIRST_TOKEN_SECONDS,
        "Arrival to first token.",
        &["model"],
        long(),
    ),
    queue_depth: gauge(DISPATCH_QUEUE_DEPTH, "Requests held for a cold model now.", &["model"]),
    queue_wait: histogram(
        DISPATCH_QUEUE_WAIT_SECONDS,
        "Time held before an instance took the request.",
        &["model"],
        long(),
    ),
    in_flight: gauge(DISPATCH_IN_FLIGHT, "Requests being served now.", &["model"]),
    retries: counter(
        DISPATCH_RETRIES_TOTAL,
        "Attempts that failed before the first token.",
        &["model"],
    ),
    migrations: counter(
        DISPATCH_MIGRATIONS_TOTAL,
        "Streams moved to another instance after output was sent.",
        &["model", "reason"],
    ),
    tokens: counter(DISPATCH_TOKENS_TOTAL, "Tokens streamed to clients.", &["model"]),
    attached: gauge(DISPATCH_ATTACHED_WORKERS, "Workers attached to this replica.", &[])
        .with_label_values(&[] as &[&str]),
    rate_limited: counter(DISPATCH_RATE_LIMITED_TOTAL, "Requests refused by a rate limit.", &[])
        .with_label_values(&[] as &[&str]),
});

/// The Scaler's metrics, registered on first use.
pub static SCALER: LazyLock<Scaler> = LazyLock::new(|| Scaler {
    desired: gauge(SCALER_DESIRED_INSTANCES, "Instances the Scaler wants.", &["model"]),
    instances: gauge(SCALER_INSTANCES, "Instances that exist, by state.", &["model", "state"]),
    workers: gauge(SCALER_WORKERS, "Workers by state.", &["state"]),
    decisions: counter(SCALER_DECISIONS_TOTAL, "Scaling decisions.", &["direction", "reason"]),
    leader: gauge(SCALER_LEADER, "1 while this replica leads.", &[]),
    lease_lost: counter(SCALER_LEASE_LOST_TOTAL, "Leader leases lost while leading.", &[])
        .with_label_values(&[] as &[&str]),
    cold_starts: counter(
        SCALER_COLD_STARTS_TOTAL,
        "Instances placed to start.",
        &["model", "tier"],
    ),
    cold_start_stage: histogram(
        SCALER_COLD_START_STAGE_SECONDS,
        "Duration of each cold-start stage.",
        &["model", "stage"],
        long(),
    ),
});

/// The WorkerRegistry's metrics, registered on first use.
pub static WORKER_REGISTRY: LazyLock<WorkerRegistry> = LazyLock::new(|| WorkerRegistry {
    sessions: gauge(REGISTRY_SESSIONS, "Sessions held by this replica.", &[]),
    heartbeats: counter(REGISTRY_HEARTBEATS_TOTAL, "Heartbeats handled.", &[]),
    heartbeat_gap: histogram(
        REGISTRY_HEARTBEAT_GAP_SECONDS,
        "Time between a session's heartbeats.",
        &[],
        long(),
    ),
    lost: counter(REGISTRY_WORKERS_LOST_TOTAL, "Workers declared lost.", &["reason"]),
});

/// The worker agent's metrics, registered on first use.
pub static WORKER: LazyLock<Worker> = LazyLock::new(|| Worker {
    requests: counter(WORKER_REQUESTS_TOTAL, "Requests run on this host.", &["outcome"]),
    tokens: counter(WORKER_TOKENS_TOTAL, "Tokens generated on this host.", &[]),
    sessions: counter(WORKER_SESSIONS_TOTAL, "Registry sessions opened.", &[]),
});

/// kvstore's metrics, registered on first use.
pub static REDIS: LazyLock<Redis> = LazyLock::new(|| Redis {
    duration: histogram(
        REDIS_COMMAND_DURATION_SECONDS,
        "Redis call latency.",
        &["op"],
        LATENCY.to_vec(),
    ),
    errors: counter(REDIS_ERRORS_TOTAL, "Redis calls that failed.", &["op"]),
    pool: gauge(REDIS_POOL_CONNECTIONS, "Pooled Redis connections.", &["state"]),
});

/// Everything registered, as Prometheus text.
pub fn gather() -> String {
    let mut out = Vec::new();
    let _ = TextEncoder::new().encode(&REGISTRY.gather(), &mut out);
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_builds_and_gathers_as_prometheus_text() {
        DISPATCH.requests.with_label_values(&["m", "ok"]).inc();
        DISPATCH.attached.set(1);
        SCALER.leader.with_label_values(&[] as &[&str]).set(1);
        WORKER_REGISTRY.heartbeats.with_label_values(&[] as &[&str]).inc();
        REDIS.duration.with_label_values(&["ping"]).observe(0.001);
        TRACES.dropped.inc();
        let text = gather();
        for name in [
            DISPATCH_REQUESTS_TOTAL,
            DISPATCH_ATTACHED_WORKERS,
            SCALER_LEADER,
            REGISTRY_HEARTBEATS_TOTAL,
            REDIS_COMMAND_DURATION_SECONDS,
            TRACE_SPANS_DROPPED_TOTAL,
        ] {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
        }
        assert!(
            text.contains("sllm_dispatch_requests_total{model=\"m\",outcome=\"ok\"} 1"),
            "{text}"
        );
    }
}
