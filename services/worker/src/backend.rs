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

/// What a request generates from.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A completion prompt.
    Prompt(String),
    /// A chat conversation, oldest message first.
    Chat(Vec<pb::ChatMessage>),
}

/// One inference request for an instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// Instance to run on.
    pub instance_id: String,
    /// The input, as Dispatch read it.
    pub input: Input,
    /// Sampling and limits, as Dispatch read them (`max_tokens` is always set).
    pub params: pb::SamplingParams,
    /// The client's OpenAI request, for backends that pass it on to an engine as it is.
    pub openai: Option<pb::OpenAiRequest>,
    /// W3C trace context of the worker's span when the request is traced ('' if not): an
    /// engine backend passes it on, so an engine that traces (vLLM, SGLang) joins the trace.
    pub traceparent: String,
    /// The LoRA adapter the request names, if any: the instance answers with it.
    pub adapter: Option<pb::LoraAdapter>,
    /// The client's W3C baggage, which an engine backend passes on with `traceparent`.
    pub baggage: String,
    /// Set when the request moved here mid-stream: the text to continue after, and its
    /// tokens (counted as generated in the usage the backend reports).
    pub continuation: Option<pb::Continuation>,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// A stop string or end of sequence.
    Stop,
    /// max_tokens reached.
    Length,
}

/// How a request failed, which decides what Dispatch does with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The instance is gone, unreachable, or answered 5xx: retried elsewhere if nothing was
    /// sent yet.
    Unavailable,
    /// The request itself was refused (an engine 4xx, or a field the backend cannot honour):
    /// the client's error, never retried.
    Invalid,
    /// The engine sent nothing within its first-byte or idle limit.
    Stalled,
    /// The engine reported an error inside its stream.
    Engine,
}

impl FailureKind {
    /// The gRPC code that carries this kind to Dispatch.
    pub fn code(self) -> tonic::Code {
        match self {
            FailureKind::Unavailable => tonic::Code::Unavailable,
            FailureKind::Invalid => tonic::Code::InvalidArgument,
            FailureKind::Stalled => tonic::Code::DeadlineExceeded,
            FailureKind::Engine => tonic::Code::Internal,
        }
    }
}

/// A failed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What kind of failure.
    pub kind: FailureKind,
    /// What went wrong, in the engine's words where it gave some.
    pub message: String,
    /// The engine's HTTP status, when it answered with an error (else 0).
    pub http_status: u16,
    /// The engine's error body, unchanged, when it answered with an error (else empty).
    pub body: String,
}

impl Failure {
    /// A failure with a message only.
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Failure {
        Failure { kind, message: message.into(), http_status: 0, body: String::new() }
    }

    /// The instance cannot serve the request.
    pub fn unavailable(message: impl Into<String>) -> Failure {
        Failure::new(FailureKind::Unavailable, message)
    }

    /// The backend cannot honour `field`.
    pub fn unsupported(field: &str, why: impl std::fmt::Display) -> Failure {
        Failure::new(FailureKind::Invalid, format!("invalid {field}: {why}"))
    }
}

/// One output of a generation.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// The engine accepted a streamed OpenAI request: its answer's head came back with a
    /// success status, before any text. Optional; at most once, first.
    Started,
    /// Text of one or more tokens.
    Text {
        /// The text.
        text: String,
        /// How many tokens it holds.
        tokens: u32,
        /// The engine's own OpenAI events for it (see `WorkerChunk.events`), if any.
        events: Vec<String>,
        /// Log-probabilities of its tokens, when asked for over gRPC.
        logprobs: Vec<pb::TokenLogprob>,
        /// The ids of its tokens, when the engine reports them (see `WorkerChunk.token_ids`).
        token_ids: Vec<u32>,
        /// The prompt's token ids, on the first output of an engine that reports them (see
        /// `WorkerChunk.prompt_token_ids`).
        prompt_token_ids: Vec<u32>,
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
    /// The request failed.
    Error(Failure),
}

impl Output {
    /// Plain text with no engine events.
    pub fn text(text: impl Into<String>, tokens: u32) -> Output {
        Output::Text {
            text: text.into(),
            tokens,
            events: Vec::new(),
            logprobs: Vec::new(),
            token_ids: Vec::new(),
            prompt_token_ids: Vec::new(),
        }
    }

    /// Text and one engine event to relay as it is, with no log-probabilities or ids.
    pub fn relayed(text: impl Into<String>, tokens: u32, event: String) -> Output {
        Output::Text {
            text: text.into(),
            tokens,
            events: vec![event],
            logprobs: Vec::new(),
            token_ids: Vec::new(),
            prompt_token_ids: Vec::new(),
        }
    }
}

/// One request as a backend sets it up: the work that runs it and the output it streams.
///
/// The work is a future for the reader of the output to poll beside its reading, in its own
/// task: each output then reaches the reader without waking another task (a task per request
/// and a wake-up per token fewer on the agent's path). Dropping the work cancels the request.
pub struct Generation {
    /// The request's work; it ends when the request does.
    pub run: futures::future::BoxFuture<'static, ()>,
    /// Its output, in order.
    pub output: tokio::sync::mpsc::Receiver<Output>,
}

impl Generation {
    /// Runs the work in a task of its own and returns the output; dropping the output cancels
    /// the request.
    pub fn spawn(self) -> tokio::sync::mpsc::Receiver<Output> {
        tokio::spawn(self.run);
        self.output
    }
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
    /// Sets up one request: its work and the output it streams (see [`Generation`]).
    fn generate(&self, job: Job) -> Generation;
    /// Unloads a LoRA adapter removed from its deployment, where the engine can (returns at
    /// once; nothing to do by default).
    fn unload_adapter(&self, _instance_id: &str, _name: &str) {}
}
