//! The one place a kvstore error becomes a gRPC status. The message keeps the field, key or
//! state the error names, so a client sees exactly what was wrong.

use kvstore::{Error, ErrorKind};
use tonic::{Code, Status};

/// Maps a kvstore error to a status. `context` prefixes field names of invalid input (e.g.
/// `register` turns `node_id` into `register.node_id`); pass "" for none.
pub fn to_status(err: Error, context: &str) -> Status {
    let status = to_status_quiet(&err, context);
    if matches!(status.code(), Code::Internal | Code::Unavailable) {
        tracing::warn!(error = %err, "request failed");
    }
    status
}

/// Like [`to_status`], without its WARN, for callers that report Redis trouble themselves
/// (once for many calls, rather than once per call).
pub fn to_status_quiet(err: &Error, context: &str) -> Status {
    let code = match err.kind() {
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::Aborted => Code::Aborted,
        ErrorKind::Unauthenticated => Code::Unauthenticated,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::Internal => Code::Internal,
    };
    let message = match (err, context) {
        (Error::Invalid { field, reason }, ctx) if !ctx.is_empty() => {
            format!("invalid {ctx}.{field}: {reason}")
        }
        _ => err.to_string(),
    };
    Status::new(code, message)
}

/// INVALID_ARGUMENT naming `field`.
pub fn field_status(field: &str, reason: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("invalid {field}: {reason}"))
}
