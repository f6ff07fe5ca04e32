//! Why a request was not served, and how each client protocol says so.

use std::time::Duration;

use tonic::{Code, Status};

/// A request that failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DispatchError {
    /// The request itself is wrong.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The field, as the client named it.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// No such deployment.
    #[error("model {0:?} is not deployed")]
    NotFound(String),
    /// The deployment has no LoRA adapter of that name.
    #[error("model {model:?} has no LoRA adapter {adapter:?} (it has: {have})")]
    NoAdapter {
        /// The deployment.
        model: String,
        /// The adapter asked for.
        adapter: String,
        /// The adapters it has, or "none".
        have: String,
    },
    /// No deployment record, but instances of the model run: the store lost its state.
    #[error("{}", service::convert::missing_deployment_words(.0, *.1))]
    Missing(String, usize),
    /// The deployment is being deleted.
    #[error("model {0:?} is being deleted")]
    Deleting(String),
    /// No worker of the fleet can take an instance of the model (the Scaler's words why).
    #[error("model {model:?} cannot be placed: {reason}")]
    Unplaceable {
        /// The model.
        model: String,
        /// Why.
        reason: String,
    },
    /// The model's queue is full.
    #[error("model {model:?} has {queued} requests waiting for an instance; retry in {} ms", retry_after.as_millis())]
    QueueFull {
        /// The model.
        model: String,
        /// Requests already waiting.
        queued: usize,
        /// When to try again.
        retry_after: Duration,
    },
    /// The caller used up its rate limit.
    #[error("rate limit of {} requests per second (burst {}) reached; retry in {} ms", limit.per_second, limit.burst, retry_after.as_millis())]
    RateLimited {
        /// When a request will be allowed again.
        retry_after: Duration,
        /// The limit.
        limit: kvstore::ratelimit::RateLimit,
    },
    /// The deadline passed before the request finished.
    #[error("deadline exceeded {0}")]
    Deadline(String),
    /// A retryable failure (worker lost, attempts exhausted).
    #[error("{0}")]
    Unavailable(String),
    /// The engine refused the request, stalled, or reported an error inside its stream.
    #[error("{message}")]
    Engine {
        /// INVALID_ARGUMENT (refused), DEADLINE_EXCEEDED (stalled) or INTERNAL (engine error).
        code: Code,
        /// The engine's HTTP status when it answered with one (else 0).
        http_status: u16,
        /// What went wrong, in the engine's words.
        message: String,
        /// The engine's error body, unchanged (else empty).
        body: String,
    },
}

impl DispatchError {
    pub(crate) fn invalid(field: &str, reason: impl Into<String>) -> DispatchError {
        DispatchError::Invalid { field: field.to_string(), reason: reason.into() }
    }

    /// The gRPC status, with a `retry-after-ms` trailer when the queue was full.
    pub fn to_status(&self) -> Status {
        let code = match self {
            DispatchError::Invalid { .. } => Code::InvalidArgument,
            DispatchError::NotFound(_)
            | DispatchError::NoAdapter { .. }
            | DispatchError::Missing(..) => Code::NotFound,
            DispatchError::Deleting(_) | DispatchError::Unplaceable { .. } => {
                Code::FailedPrecondition
            }
            DispatchError::QueueFull { .. } | DispatchError::RateLimited { .. } => {
                Code::ResourceExhausted
            }
            DispatchError::Deadline(_) => Code::DeadlineExceeded,
            DispatchError::Unavailable(_) => Code::Unavailable,
            DispatchError::Engine { code, .. } => *code,
        };
        let mut status = Status::new(code, self.to_string());
        if let Some(retry_after) = self.retry_after()
            && let Ok(v) = retry_after.as_millis().to_string().parse()
        {
            status.metadata_mut().insert("retry-after-ms", v);
        }
        status
    }

    /// When to try again, for refusals that say.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            DispatchError::QueueFull { retry_after, .. }
            | DispatchError::RateLimited { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// The HTTP status and OpenAI error type.
    pub fn http(&self) -> (u16, &'static str, Option<&'static str>) {
        match self {
            DispatchError::Invalid { .. } => (400, "invalid_request_error", None),
            DispatchError::NotFound(_)
            | DispatchError::NoAdapter { .. }
            | DispatchError::Missing(..) => (404, "invalid_request_error", Some("model_not_found")),
            DispatchError::Deleting(_) => (409, "invalid_request_error", Some("model_deleting")),
            DispatchError::Unplaceable { .. } => (503, "server_error", Some("model_unplaceable")),
            DispatchError::QueueFull { .. } => (429, "rate_limit_error", Some("queue_full")),
            DispatchError::RateLimited { .. } => {
                (429, "rate_limit_error", Some("rate_limit_exceeded"))
            }
            DispatchError::Deadline(_) => (504, "timeout_error", Some("deadline_exceeded")),
            DispatchError::Unavailable(_) => (503, "server_error", Some("unavailable")),
            DispatchError::Engine { code: Code::InvalidArgument, http_status, .. } => {
                let status = if (400..500).contains(http_status) { *http_status } else { 400 };
                (status, "invalid_request_error", None)
            }
            DispatchError::Engine { code: Code::DeadlineExceeded, .. } => {
                (504, "timeout_error", Some("engine_stalled"))
            }
            DispatchError::Engine { .. } => (500, "server_error", Some("engine_error")),
        }
    }
}

/// Why a worker's Attach stream was refused. Only a worker that proves its id (join token) and
/// holds the session the registry issued last (its exact epoch) may take requests: a token
/// holder claiming any other epoch would otherwise push the real worker's stream aside.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AttachRefused {
    /// The first message did not arrive in time: an idle stream is ended cheaply, before
    /// anything is read from Redis.
    #[error("no `hello` within {} ms of opening the attach stream", .0.as_millis())]
    NoHello(Duration),
    /// The stream ended or broke before its hello.
    #[error("attach stream ended before its `hello`: {0}")]
    Broken(String),
    /// The first message was not a hello.
    #[error("the first message of an attach stream must be `hello`")]
    NotHello,
    /// A field of the hello is malformed.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The field, as the worker named it.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The join token does not prove the worker id.
    #[error("hello refused: hello.join_token for hello.worker_id {worker:?}: {reason}")]
    Token {
        /// The worker id the hello claims.
        worker: String,
        /// Why the token was refused (never the token itself).
        reason: String,
    },
    /// The hello's epoch is older than the registry's: a session that has since been replaced.
    /// FAILED_PRECONDITION: the worker is who it says, but must register again (as the
    /// registry tells an old session) before it attaches.
    #[error(
        "hello.epoch {claimed} of worker {worker:?} is stale: the registry's current epoch is \
         {current}; register again"
    )]
    StaleEpoch {
        /// The worker.
        worker: String,
        /// The epoch the hello carries.
        claimed: u64,
        /// The registry's epoch.
        current: u64,
    },
    /// The hello's epoch was never issued by the registry (newer than its epoch for the
    /// worker, or the worker is not registered). PERMISSION_DENIED, not FAILED_PRECONDITION:
    /// the token is valid but the caller claims a session it does not hold, and waiting or
    /// retrying will not make the claim true; only registering makes an epoch.
    #[error(
        "hello.epoch {claimed} of worker {worker:?} was not issued by the registry (its current \
         epoch is {}); attach with the epoch the registry answered `register` with",
        current.map_or_else(|| "none: the worker is not registered".to_string(), |c| c.to_string())
    )]
    UnissuedEpoch {
        /// The worker.
        worker: String,
        /// The epoch the hello carries.
        claimed: u64,
        /// The registry's epoch, if the worker is registered.
        current: Option<u64>,
    },
    /// Redis cannot be read to check the epoch, and this replica has not seen the worker at
    /// that epoch: refused for now rather than taken on the token alone.
    #[error(
        "cannot check hello.epoch {claimed} of worker {worker:?}: the store is unreachable \
         ({reason}) and this replica has not seen the worker at that epoch; retry"
    )]
    Unverifiable {
        /// The worker.
        worker: String,
        /// The epoch the hello carries.
        claimed: u64,
        /// Why the store could not be read.
        reason: String,
    },
    /// A newer session of the worker is attached here already.
    #[error(
        "hello.epoch {claimed} of worker {worker:?} is older than the attached session's {attached}"
    )]
    Superseded {
        /// The worker.
        worker: String,
        /// The epoch the hello carries.
        claimed: u64,
        /// The epoch of the attached session.
        attached: u64,
    },
}

impl AttachRefused {
    /// The gRPC status the worker sees.
    pub fn to_status(&self) -> Status {
        let code = match self {
            AttachRefused::NoHello(_) => Code::DeadlineExceeded,
            AttachRefused::Broken(_) => Code::Cancelled,
            AttachRefused::NotHello | AttachRefused::Invalid { .. } => Code::InvalidArgument,
            AttachRefused::Token { .. } => Code::Unauthenticated,
            AttachRefused::StaleEpoch { .. } | AttachRefused::Superseded { .. } => {
                Code::FailedPrecondition
            }
            AttachRefused::UnissuedEpoch { .. } => Code::PermissionDenied,
            AttachRefused::Unverifiable { .. } => Code::Unavailable,
        };
        Status::new(code, self.to_string())
    }
}
