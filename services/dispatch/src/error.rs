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
            DispatchError::NotFound(_) | DispatchError::Missing(..) => Code::NotFound,
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
            DispatchError::NotFound(_) | DispatchError::Missing(..) => {
                (404, "invalid_request_error", Some("model_not_found"))
            }
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
