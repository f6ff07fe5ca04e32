//! Errors of the kvstore. Services turn an [`Error`] into a gRPC status in one place, using
//! [`Error::kind`]; the message already names the offending field, key or state.

use std::fmt;

/// Result of every kvstore operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why an operation did not happen.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// Input that must not reach a key (or a script) was refused before any Redis call.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The field, as the caller named it (e.g. `model`, `node_id`).
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A transition's precondition did not hold; nothing was written.
    #[error("{transition} refused: {refusal}")]
    Refused {
        /// Which transition (the Lua script's name).
        transition: &'static str,
        /// The precondition that failed.
        refusal: Refusal,
    },
    /// A record in Redis could not be read into its type (hand-edited, truncated, wrong type).
    #[error("malformed record {key}: field {field}: {reason}")]
    Malformed {
        /// The Redis key of the record.
        key: String,
        /// The field that is missing or unreadable.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Redis could not be reached or answered with an error.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// No connection could be had from the pool in time.
    #[error("redis pool: {0}")]
    Pool(String),
    /// A script answered something it is not documented to answer.
    #[error("unexpected reply from {script}: {detail}")]
    Protocol {
        /// The script.
        script: &'static str,
        /// What came back.
        detail: String,
    },
}

/// A failed precondition, as reported by a script's reply code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The record does not exist.
    NotFound,
    /// A record with that name or id exists already.
    AlreadyExists,
    /// The record is in a state the transition does not start from.
    WrongState {
        /// Its current state.
        current: String,
    },
    /// The record changed since the caller read it.
    StaleVersion {
        /// Its current version.
        current: u64,
    },
    /// The message comes from an older session of the worker.
    StaleEpoch {
        /// The worker's current epoch.
        current: u64,
    },
    /// The caller no longer holds the leader lease (its fencing token is not the current one).
    NotLeader,
    /// The leader lease is held by someone else.
    Held {
        /// Who holds it.
        holder: String,
        /// Their fencing token.
        token: u64,
    },
    /// The join token did not prove the node id.
    Unauthenticated,
    /// Another node with a live lease holds the address.
    AddressInUse {
        /// The node holding it.
        holder: String,
    },
    /// The instance belongs to another worker.
    WrongWorker {
        /// The worker it belongs to.
        owner: String,
    },
    /// The worker is not known.
    WorkerNotFound,
    /// The worker cannot take instances now.
    WorkerNotReady {
        /// Its state.
        state: String,
    },
    /// The worker is lost and must register again first.
    WorkerLost,
    /// A requested GPU is already assigned.
    GpuBusy {
        /// The GPU index.
        gpu: u32,
    },
    /// The worker's lease has not expired yet.
    LeaseAlive {
        /// When it does, in ms since the Unix epoch.
        deadline_ms: u64,
    },
    /// The deployment still has instances.
    HasInstances {
        /// How many.
        count: u64,
    },
    /// This actor may not request this transition.
    NotAllowed,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NotFound => write!(f, "not found"),
            Refusal::AlreadyExists => write!(f, "already exists"),
            Refusal::WrongState { current } => write!(f, "not allowed in state {current}"),
            Refusal::StaleVersion { current } => {
                write!(f, "stale version (current version is {current})")
            }
            Refusal::StaleEpoch { current } => {
                write!(f, "stale epoch (current epoch is {current})")
            }
            Refusal::NotLeader => write!(f, "not the leader (fencing token is stale)"),
            Refusal::Held { holder, token } => {
                write!(f, "lease held by {holder} (token {token})")
            }
            Refusal::Unauthenticated => write!(f, "join token does not prove the node id"),
            Refusal::AddressInUse { holder } => {
                write!(f, "address held by node {holder}, whose lease is still live")
            }
            Refusal::WrongWorker { owner } => write!(f, "instance belongs to worker {owner}"),
            Refusal::WorkerNotFound => write!(f, "worker not found"),
            Refusal::WorkerNotReady { state } => write!(f, "worker is {state}, not ready"),
            Refusal::WorkerLost => write!(f, "worker is lost; it must register again"),
            Refusal::GpuBusy { gpu } => write!(f, "GPU {gpu} is already assigned"),
            Refusal::LeaseAlive { deadline_ms } => {
                write!(f, "lease still live until {deadline_ms} ms")
            }
            Refusal::HasInstances { count } => write!(f, "{count} instances remain"),
            Refusal::NotAllowed => write!(f, "not allowed for this caller"),
        }
    }
}

/// The broad class of an error, matching a gRPC status code, so services map errors to
/// statuses in one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad input (INVALID_ARGUMENT).
    InvalidArgument,
    /// No such record (NOT_FOUND).
    NotFound,
    /// The record exists (ALREADY_EXISTS).
    AlreadyExists,
    /// The state does not allow it (FAILED_PRECONDITION).
    FailedPrecondition,
    /// A concurrent change won (ABORTED).
    Aborted,
    /// The caller is not who it claims (UNAUTHENTICATED).
    Unauthenticated,
    /// Redis is unreachable; retry later (UNAVAILABLE).
    Unavailable,
    /// Corrupt state or a broken contract (INTERNAL).
    Internal,
}

impl Error {
    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Invalid { .. } => ErrorKind::InvalidArgument,
            Error::Refused { refusal, .. } => match refusal {
                Refusal::NotFound | Refusal::WorkerNotFound => ErrorKind::NotFound,
                Refusal::AlreadyExists => ErrorKind::AlreadyExists,
                Refusal::StaleVersion { .. } => ErrorKind::Aborted,
                Refusal::Unauthenticated => ErrorKind::Unauthenticated,
                Refusal::WrongState { .. }
                | Refusal::StaleEpoch { .. }
                | Refusal::NotLeader
                | Refusal::Held { .. }
                | Refusal::AddressInUse { .. }
                | Refusal::WrongWorker { .. }
                | Refusal::WorkerNotReady { .. }
                | Refusal::WorkerLost
                | Refusal::GpuBusy { .. }
                | Refusal::LeaseAlive { .. }
                | Refusal::HasInstances { .. }
                | Refusal::NotAllowed => ErrorKind::FailedPrecondition,
            },
            Error::Redis(_) | Error::Pool(_) => ErrorKind::Unavailable,
            Error::Malformed { .. } | Error::Protocol { .. } => ErrorKind::Internal,
        }
    }

    /// The refusal, if this error is one.
    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            Error::Refused { refusal, .. } => Some(refusal),
            _ => None,
        }
    }

    /// Whether retrying the same call later may succeed (Redis unreachable or timing out).
    pub fn is_retryable(&self) -> bool {
        self.kind() == ErrorKind::Unavailable
    }

    /// Whether Redis did not answer within the response timeout (it is slow or stalled; the
    /// call may still run there).
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Redis(e) if e.is_timeout())
    }

    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Error {
        Error::Invalid { field, reason: reason.into() }
    }
}
