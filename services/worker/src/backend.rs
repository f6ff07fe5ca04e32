//! The seam between the agent and whatever runs model instances: the simulator here, a real
//! engine process (vLLM, SGLang, llama.cpp server) elsewhere.

use std::time::Duration;

use sllm_api::v1 as pb;

/// What to start.
#[derive(Debug, Clone, PartialEq)]
pub struct StartSpec {
    /// The new instance's id.
    pub instance_id: String,
    /// The model it serves.
    pub model: String,
    /// The backend named by the deployment.
    pub backend: String,
    /// GPU indexes to use.
    pub gpus: Vec<u32>,
    /// The deployment's backend_config.
    pub backend_config: Option<prost_types::Struct>,
    /// W3C trace context of the decision that started it ('' if none).
    pub traceparent: String,
}

/// Something that happened to an instance, reported up by the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceEvent {
    /// Loading its checkpoint.
    Loading {
        /// Which instance.
        instance_id: String,
    },
    /// Serving.
    Ready {
        /// Which instance.
        instance_id: String,
        /// How long the load took.
        load_ms: u64,
    },
    /// Stopped (after stop or drain).
    Stopped {
        /// Which instance.
        instance_id: String,
        /// Why.
        reason: String,
    },
    /// Failed to load, or crashed.
    Failed {
        /// Which instance.
        instance_id: String,
        /// Why.
        reason: String,
    },
}

/// A command the backend refused at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// A requested GPU does not exist or is in use.
    #[error("GPU {0} is not available")]
    GpuUnavailable(u32),
    /// The backend cannot run this model or backend kind.
    #[error("unsupported: {0}")]
    Unsupported(String),
}

/// One inference request for an instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// Instance to run on.
    pub instance_id: String,
    /// The prompt (a chat conversation is given as its rendered text).
    pub prompt: String,
    /// Most tokens to generate.
    pub max_tokens: u32,
    /// Generation stops before any of these strings.
    pub stop: Vec<String>,
    /// Seed of the sampling.
    pub seed: u64,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// A stop string or end of sequence.
    Stop,
    /// max_tokens reached.
    Length,
}

/// One output of a generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Text of one or more tokens.
    Text {
        /// The text.
        text: String,
        /// How many tokens it holds.
        tokens: u32,
    },
    /// The request ended.
    Done {
        /// Why.
        finish: Finish,
        /// Prompt tokens.
        prompt_tokens: u32,
        /// Generated tokens.
        completion_tokens: u32,
    },
    /// The request failed (the instance crashed or is not serving).
    Error(String),
}

/// Runs model instances on one host. Methods return at once; progress arrives as
/// [`InstanceEvent`]s on the channel the backend was created with.
pub trait Backend: Send + Sync + 'static {
    /// What the host has and runs right now.
    fn inventory(&self) -> pb::Inventory;
    /// Starts loading an instance. Starting one that exists already does nothing.
    fn start(&self, spec: StartSpec) -> Result<(), BackendError>;
    /// Stops an instance now. Stopping an unknown one reports it stopped.
    fn stop(&self, instance_id: &str);
    /// Lets in-flight requests finish (at most `grace`), accepts no new ones, then stops.
    fn drain(&self, instance_id: &str, grace: Duration);
    /// Runs one request, streaming its output. Dropping the receiver cancels it.
    fn generate(&self, job: Job) -> tokio::sync::mpsc::Receiver<Output>;
}
