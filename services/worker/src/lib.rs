//! The sllm worker: an agent that runs on each GPU host, dials out to WorkerRegistry (it opens
//! no port), keeps its `Session` stream alive with heartbeats, carries out start / stop / drain
//! commands through a [`Backend`], and reports what its instances do. Plus [`sim`], a simulated
//! GPU backend good enough to test and benchmark the whole control plane without a GPU.
//!
//! The agent never talks to Redis and never trusts its own view over the registry's fencing:
//! every message carries the epoch the registry gave it.

pub mod agent;
mod attach;
pub mod backend;
pub mod embed;
pub mod engine;
pub mod openai;
pub mod rerank;
pub mod sim;
pub mod tokenize;
pub mod vocab;

pub use agent::{Agent, AgentConfig, AgentState};
pub use backend::{
    Backend, BackendError, Failure, FailureKind, Finish, Generation, Input, InstanceEvent, Job,
    Output, StartSpec,
};
pub use sim::{SimBackend, SimConfig};
