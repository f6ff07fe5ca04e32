//! A simulated GPU host. It has GPUs and memory, a cache of checkpoints on tiers (GPU, host
//! memory, disk, remote) with a bandwidth each, so a load takes size / bandwidth of the best
//! tier; prefill and per-token decode times that grow with the number of concurrent requests
//! (a batch-size effect); deterministic token text; and faults on demand: a model that fails to
//! load, one whose load never ends (a hung engine), an instance that crashes after N tokens. Thousands fit in one process.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sllm_api::v1 as pb;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::backend::{
    Backend, BackendError, Failure, Finish, Generation, Input, InstanceEvent, Job, Output,
    StartSpec,
};

/// Storage tiers, fastest first (the API's numbering).
pub type Tier = pb::CheckpointTier;

/// How a simulated host looks and behaves.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Number of GPUs.
    pub gpus: u32,
    /// Memory per GPU, bytes.
    pub gpu_memory_bytes: u64,
    /// Host memory, bytes.
    pub host_memory_bytes: u64,
    /// Cached checkpoints: model -> (size, tier).
    pub checkpoints: HashMap<String, (u64, Tier)>,
    /// Size assumed for a model with no cached checkpoint (loaded from remote).
    pub default_checkpoint_bytes: u64,
    /// Load bandwidth per tier, bytes/s.
    pub bandwidths: HashMap<Tier, u64>,
    /// Bandwidths reported in the inventory instead of `bandwidths`, for a host that claims
    /// to be faster than it is (empty: it reports what it does).
    pub claimed_bandwidths: HashMap<Tier, u64>,
    /// Deployment backends it reports it can start (empty: any).
    pub backends: Vec<String>,
    /// Prefill time per prompt token.
    pub prefill_per_token: Duration,
    /// Decode time per generated token with one request running.
    pub decode_per_token: Duration,
    /// Extra decode time per token for each additional concurrent request, as a fraction of
    /// `decode_per_token` (0.05: 10 concurrent requests decode 1.45x slower each).
    pub batch_slowdown: f64,
    /// Every simulated duration is multiplied by this (tests use small values).
    pub time_scale: f64,
    /// Models whose load fails.
    pub fail_load: HashSet<String>,
    /// Models whose load never ends: the instance stays loading until it is stopped, as with
    /// an engine that hangs while loading.
    pub hang_load: HashSet<String>,
    /// Models whose start is refused at once (as an engine that does not support them would).
    pub refuse_start: HashSet<String>,
    /// An instance crashes after producing this many tokens (across its requests).
    pub crash_after_tokens: Option<u64>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            gpus: 4,
            gpu_memory_bytes: 80 << 30,
            host_memory_bytes: 512 << 30,
            checkpoints: HashMap::new(),
            default_checkpoint_bytes: 4 << 30,
            bandwidths: HashMap::from([
                (Tier::Gpu, 1 << 40),
                (Tier::HostMemory, 24 << 30),
                (Tier::Disk, 3 << 30),
                (Tier::Remote, 1 << 30),
            ]),
            claimed_bandwidths: HashMap::new(),
            backends: Vec::new(),
            prefill_per_token: Duration::from_micros(50),
            decode_per_token: Duration::from_millis(10),
            batch_slowdown: 0.05,
            time_scale: 1.0,
            fail_load: HashSet::new(),
            hang_load: HashSet::new(),
            refuse_start: HashSet::new(),
            crash_after_tokens: None,
        }
    }
}

impl SimConfig {
    /// The simulated time to load `model`: size / bandwidth of the best tier holding it.
    pub fn load_time(&self, model: &str) -> Duration {
        let (size, tier) = self
            .checkpoints
            .get(model)
            .copied()
            .unwrap_or((self.default_checkpoint_bytes, Tier::Remote));
        let bw = self.bandwidths.get(&tier).copied().unwrap_or(1 << 30).max(1);
        self.scaled(Duration::from_secs_f64(size as f64 / bw as f64))
    }

    fn scaled(&self, d: Duration) -> Duration {
        d.mul_f64(self.time_scale.max(0.0))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Loading,
    Ready,
    Draining,
}

struct SimInstance {
    model: String,
    gpus: Vec<u32>,
    phase: Phase,
    in_flight: usize,
    tokens: u64,
    cancel: CancellationToken,
    /// The deployment's `max_model_len`: a prompt and its max_tokens above it are refused, as
    /// vLLM refuses them.
    max_model_len: Option<u64>,
}

struct State {
    instances: HashMap<String, SimInstance>,
    busy_gpus: HashSet<u32>,
    checkpoints: HashMap<String, (u64, Tier)>,
    running_requests: usize,
}

/// The simulated backend. Cheap to clone.
#[derive(Clone)]
pub struct SimBackend {
    config: Arc<SimConfig>,
    state: Arc<Mutex<State>>,
    events: mpsc::UnboundedSender<InstanceEvent>,
}

/// The simulator's words: every token it generates is one of them, after a space.
pub(crate) const WORDS: &[&str] = &[
    "the",
    "model",
    "serves",
    "tokens",
    "quickly",
    "while",
    "idle",
    "instances",
    "cost",
    "nothing",
    "and",
    "scale",
    "out",
    "under",
    "load",
    "back",
    "to",
    "zero",
    "when",
    "quiet",
];

/// The simulator's language model: each token is a function of the seed and the whole text
/// before it (prompt and tokens so far), as in a real autoregressive model. So a generation
/// continued from its prompt plus the text it had produced goes on exactly as it would have.
/// The state is FNV-1a over that text: stable across runs and platforms, one pass over it.
#[derive(Debug, Clone)]
pub struct TextModel {
    h: u64,
}

impl TextModel {
    /// A model about to continue `context` (the prompt, then any text already generated).
    pub fn new(seed: u64, context: &str) -> TextModel {
        let mut m = TextModel { h: 0xcbf2_9ce4_8422_2325 };
        m.feed(&seed.to_le_bytes());
        m.feed(context.as_bytes());
        m
    }

    fn feed(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.h ^= u64::from(*b);
            self.h = self.h.wrapping_mul(0x0100_0000_01b3);
        }
    }

    /// The next token, which becomes part of the context.
    pub fn next_token(&mut self) -> String {
        self.next_with_id().1
    }

    /// The next token's id in the simulator's vocabulary ([`crate::vocab`]) and its text.
    pub fn next_with_id(&mut self) -> (u32, String) {
        let k = pick(self.h);
        let token = format!(" {}", WORDS[k]);
        self.feed(token.as_bytes());
        (crate::vocab::word_id(k), token)
    }
}

/// The word a model state picks. One more mixing step, so that neighbouring states do not pick
/// neighbouring words.
pub(crate) fn pick(h: u64) -> usize {
    let mut x = h ^ (h >> 29);
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    ((x ^ (x >> 32)) % WORDS.len() as u64) as usize
}

/// The first `n` tokens the simulator generates for `seed` and `prompt`, as one text.
pub fn text(seed: u64, prompt: &str, n: u32) -> String {
    let mut m = TextModel::new(seed, prompt);
    (0..n).map(|_| m.next_token()).collect()
}

/// The `i`-th token the simulator generates for `seed` and `prompt`.
pub fn token_text(seed: u64, prompt: &str, i: u32) -> String {
    let mut m = TextModel::new(seed, prompt);
    for _ in 0..i {
        m.next_token();
    }
    m.next_token()
}

/// A LoRA adapter's mark on the simulator's text (FNV-1a of its name).
pub fn adapter_seed(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// What the simulator generates for one request: its prompt text, limits and seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimRequest {
    /// The prompt (a chat conversation as `role: content` lines).
    pub prompt: String,
    /// Text already generated elsewhere that this generation continues (the request moved
    /// here from a lost or draining instance), and its tokens.
    pub continued: Option<(String, u32)>,
    /// Most tokens to generate.
    pub max_tokens: u32,
    /// Generation stops at any of these.
    pub stop: Vec<String>,
    /// The text's seed.
    pub seed: u64,
    /// Set when the request runs on token ids (`sllm sim-engine --merges`): the model over ids
    /// ([`crate::vocab::TokenModel`]) continues these, the whole context, instead of the
    /// prompt's text.
    pub prompt_ids: Option<Vec<u32>>,
    /// Whether each token's output carries its id in the simulator's vocabulary
    /// (`sllm sim-engine` reports them as vLLM does); Dispatch then keeps them too.
    pub with_ids: bool,
}

/// Fields of an OpenAI body the simulator honours (or that carry no meaning for it: `user`
/// only labels the caller). Anything else is refused rather than ignored.
const SIM_OPENAI_FIELDS: &[&str] = &[
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "seed",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
    "user",
    // ServerlessLLM's adapter field; Dispatch resolved it into the job's adapter.
    "lora_adapter_name",
];

/// Fields of a Responses API body the simulator honours (`store` and `metadata` only label the
/// response, which it does not keep).
const SIM_RESPONSES_FIELDS: &[&str] = &[
    "model",
    "input",
    "instructions",
    "max_output_tokens",
    "temperature",
    "top_p",
    "stream",
    "user",
    "store",
    "metadata",
    "lora_adapter_name",
];

/// An OpenAI body as the simulator reads it: a JSON object whose every field set (not null) is
/// one of `fields`; any other is refused by name, since the simulator cannot honour it.
pub fn honoured(
    body: &str,
    fields: &[&str],
) -> Result<serde_json::Map<String, serde_json::Value>, Failure> {
    let map = match serde_json::from_str(body) {
        Ok(serde_json::Value::Object(map)) => map,
        Ok(_) => return Err(Failure::unsupported("body", "must be a JSON object")),
        Err(e) => return Err(Failure::unsupported("body", format!("not JSON: {e}"))),
    };
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    if let Some(k) = keys.into_iter().find(|k| !fields.contains(&k.as_str()) && !map[*k].is_null())
    {
        return Err(Failure::unsupported(k, "the simulator backend does not support it"));
    }
    Ok(map)
}

/// A Responses API body's conversation: its `instructions` as a system message, then its
/// `input` — a text (the user's message) or a list of messages whose content is a text or a
/// list of text parts. Anything else is refused, naming where it is.
fn responses_conversation(body: &str) -> Result<Vec<pb::ChatMessage>, Failure> {
    let v: serde_json::Value = serde_json::from_str(body)
        .map_err(|e| Failure::unsupported("body", format!("not JSON: {e}")))?;
    let mut out = Vec::new();
    if let Some(i) = v.get("instructions").and_then(|i| i.as_str()) {
        out.push(pb::ChatMessage { role: "system".into(), content: i.into() });
    }
    let text = |role: &str, content: String| pb::ChatMessage { role: role.into(), content };
    match v.get("input") {
        Some(serde_json::Value::String(t)) => out.push(text("user", t.clone())),
        Some(serde_json::Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let role = item.get("role").and_then(|r| r.as_str());
                let content = item
                    .get("content")
                    .and_then(|c| text_content(c, &["input_text", "output_text"]));
                match (role, content) {
                    (Some(role), Some(content)) => out.push(text(role, content)),
                    _ => {
                        return Err(Failure::unsupported(
                            &format!("input[{i}]"),
                            "the simulator backend takes messages of text only",
                        ));
                    }
                }
            }
        }
        _ => return Err(Failure::unsupported("input", "must be a text or a list of messages")),
    }
    Ok(out)
}

impl SimRequest {
    /// Reads `job` as the simulator can honour it: max_tokens, stop, seed, temperature
    /// (0 gives the same text for the same prompt whatever the seed; without a seed other
    /// temperatures give new text each time). Anything else set is refused, naming the field.
    pub fn from_job(job: &Job) -> Result<SimRequest, Failure> {
        let p = &job.params;
        // A Responses API request: its conversation, read from its body.
        let mut conversation = None;
        if let Some(body) = &job.openai {
            if body.endpoint == pb::OpenAiEndpoint::Responses as i32 {
                conversation = Some(responses_conversation(&body.body)?);
            }
            let known =
                if conversation.is_some() { SIM_RESPONSES_FIELDS } else { SIM_OPENAI_FIELDS };
            let map = &honoured(&body.body, known)?;
            // One sequence a request: several choices, or a batch of prompts, are beyond
            // the simulator backend (`sllm sim-engine` answers them, as vLLM does).
            if map.get("n").and_then(|n| n.as_u64()).is_some_and(|n| n > 1) {
                return Err(Failure::unsupported(
                    "n",
                    "the simulator backend answers one choice a request",
                ));
            }
            let batch = map.get("prompt").and_then(|p| p.as_array()).is_some_and(|items| {
                items.len() > 1 && items.iter().any(|i| i.is_string() || i.is_array())
            });
            if batch {
                return Err(Failure::unsupported(
                    "prompt",
                    "the simulator backend answers one prompt a request",
                ));
            }
            // Content parts other than text (images, audio) are beyond the simulator.
            let messages = map.get("messages").and_then(|m| m.as_array());
            for (i, m) in messages.into_iter().flatten().enumerate() {
                let parts = m.get("content").and_then(|c| c.as_array());
                for (j, part) in parts.into_iter().flatten().enumerate() {
                    if part.get("type").and_then(|t| t.as_str()) != Some("text") {
                        return Err(Failure::unsupported(
                            &format!("messages[{i}].content[{j}].type"),
                            "the simulator backend takes text parts only",
                        ));
                    }
                }
            }
        }
        let unsupported = [
            ("top_k", p.top_k.is_some_and(|k| k != -1)),
            ("min_p", p.min_p.is_some_and(|m| m != 0.0)),
            ("presence_penalty", p.presence_penalty.is_some_and(|x| x != 0.0)),
            ("frequency_penalty", p.frequency_penalty.is_some_and(|x| x != 0.0)),
            ("repetition_penalty", p.repetition_penalty.is_some_and(|x| x != 1.0)),
            ("logprobs", p.logprobs),
            ("json_schema", !p.json_schema.is_empty()),
            ("regex", !p.regex.is_empty()),
            ("top_p", p.top_p.is_some_and(|t| t != 1.0)),
        ];
        if let Some((field, _)) = unsupported.iter().find(|(_, set)| *set) {
            return Err(Failure::unsupported(field, "the simulator backend does not support it"));
        }
        let prompt = match (&conversation, &job.input) {
            (Some(messages), _) | (None, Input::Chat(messages)) => render_chat(messages),
            (None, Input::Prompt(p)) => p.clone(),
        };
        let mut seed = match (p.temperature, p.seed) {
            (Some(0.0), _) => 0,
            (_, Some(seed)) => seed,
            _ => rand::random(),
        };
        // Each LoRA adapter writes its own text, so a test can tell which one answered.
        if let Some(a) = &job.adapter {
            seed ^= adapter_seed(&a.name);
        }
        let continued = job.continuation.as_ref().map(|c| (c.text.clone(), c.tokens));
        Ok(SimRequest {
            prompt,
            continued,
            max_tokens: p.max_tokens,
            stop: p.stop.clone(),
            seed,
            prompt_ids: None,
            with_ids: false,
        })
    }
}

/// A message's content as text: a text, or a list of parts that are all texts of one of the
/// `kinds` (`{"type": kind, "text": …}`), joined; None for anything else (images, audio).
pub fn text_content(content: &serde_json::Value, kinds: &[&str]) -> Option<String> {
    match content {
        serde_json::Value::String(t) => Some(t.clone()),
        serde_json::Value::Array(parts) => parts
            .iter()
            .map(|p| {
                let kind = p.get("type").and_then(|t| t.as_str());
                kind.is_some_and(|k| kinds.contains(&k))
                    .then(|| p.get("text").and_then(|t| t.as_str()))
                    .flatten()
            })
            .collect::<Option<Vec<&str>>>()
            .map(|texts| texts.concat()),
        _ => None,
    }
}

/// What the simulator's chat template ends a conversation with, for the answer to follow.
pub const GENERATION_PROMPT: &str = "assistant:";

/// A chat conversation as the simulator's prompt text (its chat template): `role: content`
/// lines, then [`GENERATION_PROMPT`].
pub fn render_chat(messages: &[pb::ChatMessage]) -> String {
    let mut out = String::new();
    for m in messages {
        out.push_str(&m.role);
        out.push_str(": ");
        out.push_str(&m.content);
        out.push('\n');
    }
    out.push_str(GENERATION_PROMPT);
    out
}

impl SimBackend {
    /// A simulated host and the channel its instance events arrive on.
    pub fn new(config: SimConfig) -> (SimBackend, mpsc::UnboundedReceiver<InstanceEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let state = State {
            instances: HashMap::new(),
            busy_gpus: HashSet::new(),
            checkpoints: config.checkpoints.clone(),
            running_requests: 0,
        };
        (
            SimBackend { config: Arc::new(config), state: Arc::new(Mutex::new(state)), events: tx },
            rx,
        )
    }

    /// Simulates the host dying: every instance vanishes at once, with no event and no
    /// goodbye (their requests end, their GPUs are free).
    pub fn crash(&self) {
        self.with_state(|s| {
            for (_, inst) in s.instances.drain() {
                inst.cancel.cancel();
            }
            s.busy_gpus.clear();
        });
    }

    /// Requests being generated right now, over all instances.
    pub fn requests_running(&self) -> usize {
        self.with_state(|s| s.running_requests)
    }

    /// Instances it runs now (loading, ready or draining).
    pub fn inventory_running(&self) -> Vec<pb::RunningInstance> {
        self.inventory().running
    }

    /// The configuration.
    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    fn emit(&self, e: InstanceEvent) {
        // No receiver means the agent is gone; there is nobody left to tell.
        let _ = self.events.send(e);
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut guard = match self.state.lock() {
            Ok(g) => g,
            // A panic elsewhere while holding the lock leaves consistent-enough data for a
            // simulator; keep going rather than cascade the panic.
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut guard)
    }

    /// Removes an instance, frees its GPUs and leaves its checkpoint cached in host memory.
    fn remove(&self, instance_id: &str) -> Option<SimInstance> {
        self.with_state(|s| {
            let inst = s.instances.remove(instance_id)?;
            for g in &inst.gpus {
                s.busy_gpus.remove(g);
            }
            if let Some(entry) = s.checkpoints.get_mut(&inst.model)
                && entry.1 == Tier::Gpu
            {
                entry.1 = Tier::HostMemory;
            }
            inst.cancel.cancel();
            Some(inst)
        })
    }

    /// Takes a request onto `instance_id` if it is serving (its cancel token); otherwise tells
    /// the requester so on `tx`.
    async fn admit(
        &self,
        instance_id: &str,
        tx: &mpsc::Sender<Output>,
    ) -> Option<(CancellationToken, Admitted)> {
        let admitted = self.with_state(|s| {
            let inst = s.instances.get_mut(instance_id)?;
            if inst.phase != Phase::Ready {
                return None;
            }
            inst.in_flight += 1;
            s.running_requests += 1;
            Some((inst.cancel.clone(), inst.max_model_len))
        });
        if admitted.is_none() {
            let why = format!("instance {instance_id} is not serving");
            let _ = tx.send(Output::Error(Failure::unavailable(why))).await;
        }
        admitted.map(|(cancel, max_model_len)| {
            let instance_id = instance_id.to_string();
            (cancel, Admitted { backend: self.clone(), instance_id, max_model_len })
        })
    }

    /// Ends a request [`SimBackend::admit`] took.
    fn release(&self, instance_id: &str) {
        self.with_state(|s| {
            s.running_requests = s.running_requests.saturating_sub(1);
            if let Some(inst) = s.instances.get_mut(instance_id) {
                inst.in_flight = inst.in_flight.saturating_sub(1);
            }
        });
    }

    /// Answers a request of the pooling kind (embeddings, rerank) with `answered`, the body and
    /// the prompt tokens it read: one prefill's time, then the body as one event.
    async fn run_pooling(
        &self,
        job: Job,
        answered: Result<(String, u32), Failure>,
        tx: mpsc::Sender<Output>,
    ) {
        let instance_id = job.instance_id.clone();
        let (answer, prompt_tokens) = match answered {
            Ok(a) => a,
            Err(f) => {
                let _ = tx.send(Output::Error(f)).await;
                return;
            }
        };
        let Some((cancel, admitted)) = self.admit(&instance_id, &tx).await else { return };
        let prefill = self.config.scaled(self.config.prefill_per_token * prompt_tokens);
        let outcome = sleep_or_cancel(prefill, &cancel).await;
        drop(admitted);
        match outcome {
            Ok(()) => {
                let text = Output::relayed("", 0, answer);
                if tx.send(text).await.is_ok() {
                    let done =
                        Output::Done { finish: Finish::Stop, prompt_tokens, completion_tokens: 0 };
                    let _ = tx.send(done).await;
                }
            }
            Err(reason) => {
                let _ = tx.send(Output::Error(Failure::unavailable(reason))).await;
            }
        }
    }

    /// Answers `/tokenize` or `/detokenize` on a serving instance, at once (no GPU work).
    async fn run_tokenizer(
        &self,
        job: Job,
        endpoint: crate::tokenize::Endpoint,
        body: &str,
        tx: mpsc::Sender<Output>,
    ) {
        let answer = match crate::tokenize::answer(endpoint, body, false, None) {
            Ok(a) => a,
            Err(f) => {
                let _ = tx.send(Output::Error(f)).await;
                return;
            }
        };
        let Some((_, admitted)) = self.admit(&job.instance_id, &tx).await else { return };
        drop(admitted);
        if tx.send(Output::relayed("", 0, answer)).await.is_ok() {
            let done =
                Output::Done { finish: Finish::Stop, prompt_tokens: 0, completion_tokens: 0 };
            let _ = tx.send(done).await;
        }
    }

    async fn run_request(&self, job: Job, tx: mpsc::Sender<Output>) {
        if let Some(body) = job.openai.clone() {
            let tokenizer = match pb::OpenAiEndpoint::try_from(body.endpoint) {
                Ok(pb::OpenAiEndpoint::Embeddings) => {
                    let answered = crate::embed::answer(&body.body, &body.model);
                    return self.run_pooling(job, answered, tx).await;
                }
                Ok(pb::OpenAiEndpoint::Rerank) => {
                    let answered =
                        crate::rerank::answer(&body.body, &body.model, &body.response_id);
                    return self.run_pooling(job, answered, tx).await;
                }
                Ok(pb::OpenAiEndpoint::Tokenize) => Some(crate::tokenize::Endpoint::Tokenize),
                Ok(pb::OpenAiEndpoint::Detokenize) => Some(crate::tokenize::Endpoint::Detokenize),
                _ => None,
            };
            if let Some(endpoint) = tokenizer {
                return self.run_tokenizer(job, endpoint, &body.body, tx).await;
            }
        }
        match SimRequest::from_job(&job) {
            Ok(req) => self.run(job.instance_id, req, tx).await,
            Err(f) => {
                let _ = tx.send(Output::Error(f)).await;
            }
        }
    }

    /// Generates `req` on `instance_id`: what [`Backend::generate`] does once it has read the
    /// job, for a caller that builds the request itself (`sllm sim-engine`).
    pub fn generate_request(&self, instance_id: &str, req: SimRequest) -> mpsc::Receiver<Output> {
        let (tx, rx) = mpsc::channel(64);
        let this = self.clone();
        let instance_id = instance_id.to_string();
        tokio::spawn(async move { this.run(instance_id, req, tx).await });
        rx
    }

    async fn run(&self, instance_id: String, req: SimRequest, tx: mpsc::Sender<Output>) {
        let Some((cancel, admitted)) = self.admit(&instance_id, &tx).await else { return };
        let prompt_tokens = match &req.prompt_ids {
            Some(ids) => ids.len().max(1),
            None => req.prompt.split_whitespace().count().max(1),
        } as u32;
        let asked = u64::from(prompt_tokens) + u64::from(req.max_tokens);
        if let Some(len) = admitted.max_model_len.filter(|len| asked > *len) {
            let why = format!(
                "This model's maximum context length is {len} tokens. However, you requested \
                 {asked} tokens ({prompt_tokens} in the messages, {} in the completion). Please \
                 reduce the length of the messages or completion.",
                req.max_tokens
            );
            let _ = tx.send(Output::Error(Failure::unsupported("max_tokens", why))).await;
            return;
        }
        let prefill = self.config.scaled(self.config.prefill_per_token * prompt_tokens);
        let mut produced = 0u32;
        let (before, before_tokens) = req.continued.clone().unwrap_or_default();
        let mut model = match &req.prompt_ids {
            Some(ids) => Model::Ids(crate::vocab::TokenModel::new(req.seed, ids)),
            None => Model::Text(TextModel::new(req.seed, &format!("{}{before}", req.prompt))),
        };
        let mut text = before;
        let outcome: Result<Finish, String> = async {
            sleep_or_cancel(prefill, &cancel).await?;
            while produced < req.max_tokens {
                let running = self.with_state(|s| s.running_requests).max(1);
                let factor = 1.0 + self.config.batch_slowdown * (running - 1) as f64;
                sleep_or_cancel(
                    self.config.scaled(self.config.decode_per_token.mul_f64(factor)),
                    &cancel,
                )
                .await?;
                let crashed = self.with_state(|s| {
                    let inst = s.instances.get_mut(&instance_id)?;
                    inst.tokens += 1;
                    Some(self.config.crash_after_tokens.is_some_and(|n| inst.tokens >= n))
                });
                match crashed {
                    None => return Err("instance stopped".to_string()),
                    Some(true) => return Err("simulated crash".to_string()),
                    Some(false) => {}
                }
                let (id, token) = match &mut model {
                    Model::Text(m) => m.next_with_id(),
                    Model::Ids(m) => m.next_token(),
                };
                text.push_str(&token);
                if req.stop.iter().any(|s| !s.is_empty() && text.contains(s.as_str())) {
                    return Ok(Finish::Stop);
                }
                let out = Output::Text {
                    text: token,
                    tokens: 1,
                    events: Vec::new(),
                    logprobs: Vec::new(),
                    token_ids: if req.with_ids { vec![id] } else { Vec::new() },
                    prompt_token_ids: Vec::new(),
                };
                if tx.send(out).await.is_err() {
                    return Err("cancelled".to_string());
                }
                produced += 1;
            }
            Ok(Finish::Length)
        }
        .await;
        drop(admitted);
        match outcome {
            Ok(finish) => {
                let _ = tx
                    .send(Output::Done {
                        finish,
                        prompt_tokens,
                        completion_tokens: produced + before_tokens,
                    })
                    .await;
            }
            Err(reason) => {
                if reason == "simulated crash" && self.remove(&instance_id).is_some() {
                    self.emit(InstanceEvent::Failed {
                        instance_id: instance_id.clone(),
                        reason: format!("crashed after {produced} tokens (simulated)"),
                    });
                }
                let _ = tx.send(Output::Error(Failure::unavailable(reason))).await;
            }
        }
    }
}

/// A request [`SimBackend::admit`] took, ended when this drops: also when the request's work
/// is dropped midway (its reader gone).
struct Admitted {
    backend: SimBackend,
    instance_id: String,
    /// Its instance's context length (the deployment's `max_model_len`).
    max_model_len: Option<u64>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.backend.release(&self.instance_id);
    }
}

/// The language model a request runs: over its text, or over its token ids.
enum Model {
    Text(TextModel),
    Ids(crate::vocab::TokenModel),
}

async fn sleep_or_cancel(d: Duration, cancel: &CancellationToken) -> Result<(), String> {
    if d.is_zero() {
        // A zero-delay simulator must not pay the timer wheel's millisecond per token.
        return if cancel.is_cancelled() { Err("instance stopped".to_string()) } else { Ok(()) };
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => Ok(()),
        _ = cancel.cancelled() => Err("instance stopped".to_string()),
    }
}

impl Backend for SimBackend {
    fn inventory(&self) -> pb::Inventory {
        self.with_state(|s| pb::Inventory {
            backends: self.config.backends.clone(),
            gpus: (0..self.config.gpus)
                .map(|index| pb::Gpu {
                    index,
                    name: "sim".into(),
                    memory_bytes: self.config.gpu_memory_bytes,
                })
                .collect(),
            host_memory_bytes: self.config.host_memory_bytes,
            checkpoints: {
                let mut c: Vec<pb::CachedCheckpoint> = s
                    .checkpoints
                    .iter()
                    .map(|(model, (size, tier))| pb::CachedCheckpoint {
                        model: model.clone(),
                        size_bytes: *size,
                        tier: *tier as i32,
                    })
                    .collect();
                c.sort_by(|a, b| a.model.cmp(&b.model));
                c
            },
            bandwidths: {
                let reported = if self.config.claimed_bandwidths.is_empty() {
                    &self.config.bandwidths
                } else {
                    &self.config.claimed_bandwidths
                };
                let mut b: Vec<pb::TierBandwidth> = reported
                    .iter()
                    .map(|(tier, bps)| pb::TierBandwidth {
                        tier: *tier as i32,
                        bytes_per_second: *bps,
                    })
                    .collect();
                b.sort_by_key(|b| b.tier);
                b
            },
            running: {
                let mut r: Vec<pb::RunningInstance> = s
                    .instances
                    .iter()
                    .map(|(id, inst)| pb::RunningInstance {
                        instance_id: id.clone(),
                        model: inst.model.clone(),
                        state: match inst.phase {
                            Phase::Loading => pb::InstanceState::Loading,
                            Phase::Ready => pb::InstanceState::Ready,
                            Phase::Draining => pb::InstanceState::Draining,
                        } as i32,
                        gpus: inst.gpus.clone(),
                    })
                    .collect();
                r.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
                r
            },
        })
    }

    fn start(&self, spec: StartSpec) -> Result<(), BackendError> {
        if self.config.refuse_start.contains(&spec.model) {
            return Err(BackendError::Unsupported(format!("model {} (simulated)", spec.model)));
        }
        let cancel = CancellationToken::new();
        let max_model_len = spec.backend_config.as_ref().and_then(|c| {
            sllm_api::json::struct_to_json(c)
                .as_object()
                .and_then(sllm_api::backend_config::max_model_len)
        });
        let started = self.with_state(|s| {
            if s.instances.contains_key(&spec.instance_id) {
                return Ok(false);
            }
            for g in &spec.gpus {
                if *g >= self.config.gpus || s.busy_gpus.contains(g) {
                    return Err(BackendError::GpuUnavailable(*g));
                }
            }
            s.busy_gpus.extend(spec.gpus.iter().copied());
            s.instances.insert(
                spec.instance_id.clone(),
                SimInstance {
                    model: spec.model.clone(),
                    gpus: spec.gpus.clone(),
                    phase: Phase::Loading,
                    in_flight: 0,
                    tokens: 0,
                    cancel: cancel.clone(),
                    max_model_len,
                },
            );
            Ok(true)
        })?;
        if !started {
            return Ok(());
        }
        self.emit(InstanceEvent::Loading { instance_id: spec.instance_id.clone() });
        let load = self.config.load_time(&spec.model);
        let this = self.clone();
        // Part of the trace of the decision that started it, when that one is traced.
        let span = telemetry::trace::Span::remote_child(
            "load instance",
            telemetry::trace::Kind::Internal,
            &spec.traceparent,
        );
        span.set("sllm.instance", &spec.instance_id);
        span.set("gen_ai.request.model", &spec.model);
        span.set("sllm.load_ms", load.as_millis() as u64);
        let span = span.tracing().clone();
        let task = async move {
            let t0 = Instant::now();
            if this.config.hang_load.contains(&spec.model) {
                // Hung: only a stop (which cancels the instance) ends it.
                cancel.cancelled().await;
                return;
            }
            if sleep_or_cancel(load, &cancel).await.is_err() {
                return;
            }
            if this.config.fail_load.contains(&spec.model) {
                if this.remove(&spec.instance_id).is_some() {
                    this.emit(InstanceEvent::Failed {
                        instance_id: spec.instance_id,
                        reason: format!("loading {} failed (simulated)", spec.model),
                    });
                }
                return;
            }
            let became_ready = this.with_state(|s| {
                let inst = s.instances.get_mut(&spec.instance_id)?;
                inst.phase = Phase::Ready;
                let size = s
                    .checkpoints
                    .get(&spec.model)
                    .map(|c| c.0)
                    .unwrap_or(this.config.default_checkpoint_bytes);
                s.checkpoints.insert(spec.model.clone(), (size, Tier::Gpu));
                Some(())
            });
            if became_ready.is_some() {
                this.emit(InstanceEvent::Ready {
                    instance_id: spec.instance_id,
                    load_ms: t0.elapsed().as_millis() as u64,
                });
            }
        };
        tokio::spawn(tracing::Instrument::instrument(task, span));
        Ok(())
    }

    fn stop(&self, instance_id: &str) {
        self.remove(instance_id);
        self.emit(InstanceEvent::Stopped {
            instance_id: instance_id.to_string(),
            reason: "stopped".into(),
        });
    }

    fn generate(&self, job: Job) -> Generation {
        let (tx, output) = mpsc::channel(64);
        let this = self.clone();
        Generation { run: Box::pin(async move { this.run_request(job, tx).await }), output }
    }

    fn drain(&self, instance_id: &str, grace: Duration) {
        let known = self.with_state(|s| match s.instances.get_mut(instance_id) {
            Some(inst) => {
                inst.phase = Phase::Draining;
                true
            }
            None => false,
        });
        if !known {
            self.stop(instance_id);
            return;
        }
        let this = self.clone();
        let id = instance_id.to_string();
        tokio::spawn(async move {
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                let busy = this.with_state(|s| s.instances.get(&id).map(|i| i.in_flight > 0));
                if busy != Some(true) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if this.remove(&id).is_some() {
                this.emit(InstanceEvent::Stopped { instance_id: id, reason: "drained".into() });
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fast() -> SimConfig {
        SimConfig {
            time_scale: 0.001,
            checkpoints: HashMap::from([
                ("hot".to_string(), (8 << 30, Tier::HostMemory)),
                ("cold".to_string(), (8 << 30, Tier::Remote)),
            ]),
            ..SimConfig::default()
        }
    }

    fn job(instance: &str, prompt: &str, max_tokens: u32, seed: u64) -> Job {
        Job {
            traceparent: String::new(),
            baggage: String::new(),
            continuation: None,
            instance_id: instance.into(),
            input: Input::Prompt(prompt.into()),
            params: pb::SamplingParams { max_tokens, seed: Some(seed), ..Default::default() },
            openai: None,
            adapter: None,
        }
    }

    #[test]
    fn the_simulator_refuses_what_it_cannot_honour() {
        let mut j = job("i", "p", 4, 1);
        j.params.top_k = Some(5);
        let f = SimRequest::from_job(&j).expect_err("top_k");
        assert_eq!(f.kind, crate::backend::FailureKind::Invalid);
        assert!(f.message.contains("top_k"), "{}", f.message);
        let mut j = job("i", "p", 4, 1);
        j.openai = Some(pb::OpenAiRequest {
            body: r#"{"model": "m", "prompt": "p", "logit_bias": {"5": 1}}"#.into(),
            ..Default::default()
        });
        let f = SimRequest::from_job(&j).expect_err("logit_bias");
        assert!(f.message.contains("logit_bias"), "{}", f.message);
        // One sequence a request: several choices and batches are named, not answered once.
        for (body, field) in [
            (r#"{"model": "m", "prompt": "p", "n": 2}"#, "invalid n:"),
            (r#"{"model": "m", "prompt": ["p", "q"]}"#, "invalid prompt:"),
            (r#"{"model": "m", "prompt": [[1, 2], [3]]}"#, "invalid prompt:"),
        ] {
            j.openai = Some(pb::OpenAiRequest { body: body.into(), ..Default::default() });
            let f = SimRequest::from_job(&j).expect_err(body);
            assert!(f.message.starts_with(field), "{body}: {}", f.message);
        }
        // A Responses API request: its instructions and input as the conversation.
        let responses = |body: &str| {
            let mut j = j.clone();
            j.openai = Some(pb::OpenAiRequest {
                endpoint: pb::OpenAiEndpoint::Responses as i32,
                body: body.into(),
                ..Default::default()
            });
            SimRequest::from_job(&j)
        };
        let r = responses(r#"{"model": "m", "input": "hi", "instructions": "be brief"}"#);
        assert_eq!(r.unwrap().prompt, "system: be brief\nuser: hi\nassistant:");
        let r = responses(
            r#"{"model": "m", "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}, {"role": "assistant", "content": "yes"}]}"#,
        );
        assert_eq!(r.unwrap().prompt, "user: hi\nassistant: yes\nassistant:");
        for (body, field) in [
            (
                r#"{"model": "m", "input": "p", "tools": [{"type": "web_search"}]}"#,
                "invalid tools:",
            ),
            (
                r#"{"model": "m", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}"#,
                "invalid input[0]:",
            ),
        ] {
            let f = responses(body).expect_err(body);
            assert!(f.message.starts_with(field), "{body}: {}", f.message);
        }
        for body in [
            r#"{"model": "m", "prompt": "p", "n": 1}"#,
            r#"{"model": "m", "prompt": ["p"]}"#,
            r#"{"model": "m", "prompt": [1, 2, 3]}"#,
        ] {
            j.openai = Some(pb::OpenAiRequest { body: body.into(), ..Default::default() });
            assert!(SimRequest::from_job(&j).is_ok(), "{body}");
        }
        // Temperature 0 is greedy: the same text whatever the seed.
        let mut a = job("i", "p", 4, 1);
        a.params.temperature = Some(0.0);
        let mut b = a.clone();
        b.params.seed = Some(2);
        assert_eq!(
            SimRequest::from_job(&a).map(|r| r.seed),
            SimRequest::from_job(&b).map(|r| r.seed)
        );
    }

    fn spec(id: &str, model: &str, gpus: &[u32]) -> StartSpec {
        StartSpec {
            instance_id: id.into(),
            model: model.into(),
            backend: "sim".into(),
            gpus: gpus.to_vec(),
            backend_config: None,
            traceparent: String::new(),
        }
    }

    #[test]
    fn load_time_follows_the_best_tier() {
        let c = SimConfig::default();
        let mut hot = c.clone();
        hot.checkpoints.insert("m".into(), (24 << 30, Tier::HostMemory));
        let mut cold = c.clone();
        cold.checkpoints.insert("m".into(), (24 << 30, Tier::Remote));
        assert_eq!(hot.load_time("m"), Duration::from_secs(1));
        assert_eq!(cold.load_time("m"), Duration::from_secs(24));
        assert!(c.load_time("never-seen") >= Duration::from_secs(4));
    }

    #[test]
    fn each_lora_adapter_writes_its_own_text() {
        let mut j = job("i", "hello", 4, 7);
        j.params.temperature = Some(0.0);
        let base = SimRequest::from_job(&j).unwrap().seed;
        let with = |name: &str| {
            let mut j = j.clone();
            j.adapter = Some(pb::LoraAdapter { name: name.into(), path: "/p".into() });
            SimRequest::from_job(&j).unwrap().seed
        };
        assert_ne!(with("a"), base);
        assert_ne!(with("a"), with("b"));
        assert_eq!(with("a"), with("a"));
    }

    #[test]
    fn a_generation_continued_from_its_own_text_goes_on_exactly() {
        let whole = text(7, "hello", 50);
        for k in [0, 1, 17, 49, 50] {
            let head = text(7, "hello", k);
            let tail = text(7, &format!("hello{head}"), 50 - k);
            assert_eq!(format!("{head}{tail}"), whole, "cut at {k}");
        }
        assert_ne!(text(7, "hello", 50), text(8, "hello", 50));
        assert_ne!(text(7, "hello", 50), text(7, "hellp", 50));
    }

    #[test]
    fn token_text_is_deterministic() {
        let a: Vec<String> = (0..8).map(|i| token_text(7, "hello", i)).collect();
        let b: Vec<String> = (0..8).map(|i| token_text(7, "hello", i)).collect();
        let c: Vec<String> = (0..8).map(|i| token_text(8, "hello", i)).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    /// A deployment's `max_model_len` holds: a prompt and its max_tokens above it are refused
    /// with vLLM's message, naming max_tokens; within it, the request is served.
    #[tokio::test]
    async fn the_context_length_of_the_deployment_is_kept() {
        let (sim, mut events) = SimBackend::new(fast());
        let mut s = spec("i1", "hot", &[0]);
        s.backend_config =
            Some(sllm_api::json::json_to_struct(&serde_json::json!({"max_model_len": 10})));
        sim.start(s).expect("starts");
        events.recv().await;
        assert!(matches!(events.recv().await, Some(InstanceEvent::Ready { .. })));
        let last = |max_tokens| {
            let mut out = sim.generate(job("i1", "say hi there", max_tokens, 1)).spawn();
            async move {
                let mut last = None;
                while let Some(o) = out.recv().await {
                    last = Some(o);
                }
                last
            }
        };
        match last(8).await {
            Some(Output::Error(f)) => {
                assert_eq!(f.kind, crate::backend::FailureKind::Invalid);
                assert!(f.message.starts_with("invalid max_tokens:"), "{}", f.message);
                assert!(f.message.contains("maximum context length is 10 tokens"), "{}", f.message);
                assert!(f.message.contains("11 tokens (3 in the messages, 8 in"), "{}", f.message);
            }
            other => panic!("{other:?}"),
        }
        let served = last(7).await;
        assert!(matches!(served, Some(Output::Done { completion_tokens: 7, .. })), "{served:?}");
    }

    #[tokio::test]
    async fn start_load_generate_stop() {
        let (sim, mut events) = SimBackend::new(fast());
        sim.start(spec("i1", "hot", &[0, 1])).expect("starts");
        assert_eq!(events.recv().await, Some(InstanceEvent::Loading { instance_id: "i1".into() }));
        assert!(matches!(events.recv().await, Some(InstanceEvent::Ready { .. })));
        assert_eq!(sim.start(spec("i2", "cold", &[1])), Err(BackendError::GpuUnavailable(1)));
        assert_eq!(sim.start(spec("i2", "cold", &[9])), Err(BackendError::GpuUnavailable(9)));
        let inv = sim.inventory();
        assert_eq!(inv.running.len(), 1);
        let hot = inv.checkpoints.iter().find(|c| c.model == "hot").expect("listed");
        assert_eq!(hot.tier, Tier::Gpu as i32, "a loaded checkpoint is resident in GPU memory");

        let req = job("i1", "say hi", 5, 1);
        let mut out = sim.generate(req.clone()).spawn();
        let mut text = String::new();
        let mut done = None;
        while let Some(o) = out.recv().await {
            match o {
                Output::Text { text: t, .. } => text.push_str(&t),
                other => done = Some(other),
            }
        }
        assert_eq!(
            done,
            Some(Output::Done { finish: Finish::Length, prompt_tokens: 2, completion_tokens: 5 })
        );
        let expected: String = (0..5).map(|i| token_text(1, "say hi", i)).collect();
        assert_eq!(text, expected);

        sim.stop("i1");
        assert_eq!(
            events.recv().await,
            Some(InstanceEvent::Stopped { instance_id: "i1".into(), reason: "stopped".into() })
        );
        assert!(sim.inventory().running.is_empty());
        let mut out = sim.generate(req).spawn();
        assert!(matches!(out.recv().await, Some(Output::Error(_))));
    }

    #[tokio::test]
    async fn injected_faults() {
        let mut config = fast();
        config.fail_load.insert("cold".into());
        config.crash_after_tokens = Some(3);
        let (sim, mut events) = SimBackend::new(config);
        sim.start(spec("bad", "cold", &[0])).expect("accepted");
        events.recv().await;
        match events.recv().await {
            Some(InstanceEvent::Failed { instance_id, reason }) => {
                assert_eq!(instance_id, "bad");
                assert!(reason.contains("simulated"), "{reason}");
            }
            other => panic!("expected a failed load, got {other:?}"),
        }
        assert!(sim.inventory().running.is_empty(), "its GPU is free again");

        sim.start(spec("i1", "hot", &[0])).expect("starts");
        events.recv().await;
        events.recv().await;
        let mut out = sim.generate(job("i1", "p", 10, 0)).spawn();
        let mut tokens = 0;
        let mut last = None;
        while let Some(o) = out.recv().await {
            match o {
                Output::Text { .. } => tokens += 1,
                other => last = Some(other),
            }
        }
        assert_eq!(tokens, 2, "the third token never arrives");
        assert_eq!(last, Some(Output::Error(Failure::unavailable("simulated crash"))));
        assert!(matches!(events.recv().await, Some(InstanceEvent::Failed { .. })));
    }

    #[tokio::test]
    async fn a_hung_load_stays_loading_until_stopped() {
        let mut config = fast();
        config.hang_load.insert("hot".into());
        let (sim, mut events) = SimBackend::new(config);
        sim.start(spec("i1", "hot", &[0])).expect("accepted");
        assert_eq!(events.recv().await, Some(InstanceEvent::Loading { instance_id: "i1".into() }));
        // Far longer than the load would take (8 GiB from host memory at time scale 0.001).
        let next = tokio::time::timeout(Duration::from_millis(300), events.recv()).await;
        assert!(next.is_err(), "a hung load reports nothing: {next:?}");
        assert_eq!(sim.inventory().running[0].state, pb::InstanceState::Loading as i32);
        sim.stop("i1");
        assert!(matches!(events.recv().await, Some(InstanceEvent::Stopped { .. })));
        assert!(sim.inventory().running.is_empty(), "its GPU is free again");
    }

    /// A simulator serving instance `i1` (model `hot`, already on its GPU) at 20 ms a token,
    /// its loading and ready events read.
    async fn serving_at_20ms_a_token() -> (SimBackend, mpsc::UnboundedReceiver<InstanceEvent>) {
        let mut config = fast();
        config.time_scale = 1.0;
        config.checkpoints.insert("hot".into(), (1, Tier::Gpu));
        config.decode_per_token = Duration::from_millis(20);
        let (sim, mut events) = SimBackend::new(config);
        sim.start(spec("i1", "hot", &[0])).expect("starts");
        events.recv().await;
        events.recv().await;
        (sim, events)
    }

    #[tokio::test]
    async fn a_request_dropped_midway_does_not_hold_up_a_drain() {
        let (sim, mut events) = serving_at_20ms_a_token().await;
        // Polled in place, as the agent runs it, and dropped after its first token: the reader
        // went away (Dispatch cancelled the request).
        let Generation { run, mut output } = sim.generate(job("i1", "p", 500, 0));
        tokio::select! {
            () = run => panic!("500 tokens at 20 ms each ended early"),
            o = output.recv() => assert!(matches!(o, Some(Output::Text { .. })), "{o:?}"),
        }
        drop(output);
        let started = std::time::Instant::now();
        sim.drain("i1", Duration::from_secs(5));
        assert_eq!(
            events.recv().await,
            Some(InstanceEvent::Stopped { instance_id: "i1".into(), reason: "drained".into() })
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the drain waited {:?} for a request that no longer runs",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn drain_waits_for_in_flight_requests() {
        let (sim, mut events) = serving_at_20ms_a_token().await;
        let mut out = sim.generate(job("i1", "p", 5, 0)).spawn();
        tokio::time::sleep(Duration::from_millis(10)).await;
        sim.drain("i1", Duration::from_secs(5));
        let mut n = 0;
        while let Some(o) = out.recv().await {
            if let Output::Text { .. } = o {
                n += 1;
            }
        }
        assert_eq!(n, 5, "the in-flight request finished");
        assert_eq!(
            events.recv().await,
            Some(InstanceEvent::Stopped { instance_id: "i1".into(), reason: "drained".into() })
        );
    }
}
