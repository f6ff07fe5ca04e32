//! A steady load of streamed generations, and the ledger of what became of each request.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sllm_api::v1 as pb;
use tokio_util::sync::CancellationToken;

/// What one attempt of one request came to (the texts are read through `Debug`, in the
/// messages of failed assertions).
#[derive(Debug, Clone)]
#[allow(dead_code)]
pub enum Attempt {
    /// The whole answer, exactly the text the simulator generates for the prompt.
    Completed,
    /// Ended with a status after `tokens` tokens.
    Failed { code: tonic::Code, message: String, tokens: u32 },
    /// Ended without a final event or a status, or hung past the deadline: lost.
    Lost(String),
    /// Finished, but the text differs from what was generated (a token lost or doubled).
    Corrupt(String),
}

/// One attempt, with where it ran and in which phase it ended.
#[derive(Debug, Clone)]
pub struct Entry {
    pub request: u64,
    pub phase: String,
    pub dispatch: String,
    pub attempt: Attempt,
}

#[derive(Default)]
pub struct Ledger {
    pub entries: Vec<Entry>,
    pub requests: u64,
}

impl Ledger {
    /// Requests whose last attempt completed, and how many of those needed a client retry.
    fn completed(&self) -> (u64, u64) {
        let mut last: BTreeMap<u64, (&Attempt, usize)> = BTreeMap::new();
        for e in &self.entries {
            let n = last.get(&e.request).map_or(0, |(_, n)| *n);
            last.insert(e.request, (&e.attempt, n + 1));
        }
        let done: Vec<_> = last.values().filter(|(a, _)| matches!(a, Attempt::Completed)).collect();
        (done.len() as u64, done.iter().filter(|(_, n)| *n > 1).count() as u64)
    }

    pub fn lost(&self) -> Vec<&Entry> {
        self.entries.iter().filter(|e| matches!(e.attempt, Attempt::Lost(_))).collect()
    }

    pub fn corrupt(&self) -> Vec<&Entry> {
        self.entries.iter().filter(|e| matches!(e.attempt, Attempt::Corrupt(_))).collect()
    }

    /// Failed attempts in `phase` (any phase if None) against `dispatch` (any if None).
    pub fn failures(&self, phase: Option<&str>, dispatch: Option<&str>) -> Vec<&Entry> {
        self.entries
            .iter()
            .filter(|e| matches!(e.attempt, Attempt::Failed { .. }))
            .filter(|e| phase.is_none_or(|p| e.phase == p))
            .filter(|e| dispatch.is_none_or(|d| e.dispatch == d))
            .collect()
    }

    /// Completed attempts in `phase`.
    pub fn completed_in(&self, phase: &str) -> usize {
        self.entries
            .iter()
            .filter(|e| e.phase == phase && matches!(e.attempt, Attempt::Completed))
            .count()
    }

    /// Requests that never completed (every attempt failed).
    pub fn given_up(&self) -> u64 {
        self.requests - self.completed().0
    }

    /// The attempts of requests that never completed.
    pub fn given_up_attempts(&self) -> Vec<&Entry> {
        let done: std::collections::HashSet<u64> = self
            .entries
            .iter()
            .filter(|e| matches!(e.attempt, Attempt::Completed))
            .map(|e| e.request)
            .collect();
        self.entries.iter().filter(|e| !done.contains(&e.request)).collect()
    }

    /// The ledger as a table.
    pub fn render(&self, title: &str, dispatch_retries: u64) -> String {
        let (completed, after_retry) = self.completed();
        let mut by_status: BTreeMap<String, u64> = BTreeMap::new();
        for e in &self.entries {
            if let Attempt::Failed { code, .. } = &e.attempt {
                *by_status.entry(format!("{code:?}")).or_default() += 1;
            }
        }
        let mut out = format!("\n== ledger: {title} ==\n");
        out += &format!("{:<44}{:>8}\n", "requests sent", self.requests);
        out += &format!("{:<44}{:>8}\n", "completed", completed);
        out += &format!("{:<44}{:>8}\n", "  of which after a client retry", after_retry);
        out +=
            &format!("{:<44}{:>8}\n", "retried inside Dispatch (live replicas)", dispatch_retries);
        for (code, n) in &by_status {
            out += &format!("{:<44}{:>8}\n", format!("attempts failed: {code}"), n);
        }
        out += &format!("{:<44}{:>8}\n", "given up after every retry", self.given_up());
        out += &format!("{:<44}{:>8}\n", "corrupt (text differs)", self.corrupt().len());
        out += &format!("{:<44}{:>8}\n", "lost", self.lost().len());
        let mut phases: Vec<&str> = Vec::new();
        for e in &self.entries {
            if !phases.contains(&e.phase.as_str()) {
                phases.push(&e.phase);
            }
        }
        let mut dispatches: Vec<&str> = self.entries.iter().map(|e| e.dispatch.as_str()).collect();
        dispatches.sort();
        dispatches.dedup();
        for p in phases {
            out += &format!("  phase {:<30}{:>6} done", p, self.completed_in(p));
            for d in &dispatches {
                out += &format!(", {} failed on {d}", self.failures(Some(p), Some(d)).len());
            }
            out += "\n";
        }
        out
    }
}

/// Client loops sending streamed generations until stopped.
pub struct Load {
    pub ledger: Arc<Mutex<Ledger>>,
    phase: Arc<Mutex<String>>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

const MAX_TOKENS: u32 = 12;
const SEED: u64 = 7;

impl Load {
    /// `clients` loops per entry of `targets` (name, endpoint): each sends to its own target
    /// first and, when an attempt fails, retries on the next target (up to 3 attempts).
    pub fn start(targets: Vec<(String, String)>, clients: usize, models: Vec<String>) -> Load {
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let phase = Arc::new(Mutex::new("warm".to_string()));
        let stop = CancellationToken::new();
        let channels: Vec<(String, tonic::transport::Channel)> = targets
            .iter()
            .map(|(name, ep)| {
                let ch = tonic::transport::Endpoint::from_shared(ep.clone())
                    .unwrap()
                    .tcp_nodelay(true)
                    .connect_timeout(Duration::from_secs(1))
                    .connect_lazy();
                (name.clone(), ch)
            })
            .collect();
        let mut tasks = Vec::new();
        for t in 0..targets.len() {
            for c in 0..clients {
                let (ledger, phase, stop) = (ledger.clone(), phase.clone(), stop.clone());
                let models = models.clone();
                let mut order = channels.clone();
                order.rotate_left(t);
                tasks.push(tokio::spawn(async move {
                    let mut n = 0u64;
                    while !stop.is_cancelled() {
                        n += 1;
                        let model = &models[(n as usize + c) % models.len()];
                        let prompt = format!("client {t}.{c} request {n}");
                        let request = {
                            let mut l = ledger.lock().unwrap();
                            l.requests += 1;
                            l.requests
                        };
                        for attempt in 0..3 {
                            let (name, ch) = &order[attempt % order.len()];
                            let a = one(ch.clone(), model, &prompt).await;
                            let done = matches!(a, Attempt::Completed);
                            ledger.lock().unwrap().entries.push(Entry {
                                request,
                                phase: phase.lock().unwrap().clone(),
                                dispatch: name.clone(),
                                attempt: a,
                            });
                            if done {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }));
            }
        }
        Load { ledger, phase, stop, tasks }
    }

    /// Labels the requests started from now on.
    pub fn phase(&self, name: &str) {
        *self.phase.lock().unwrap() = name.to_string();
    }

    /// Stops sending and waits for every request in flight to end.
    pub async fn stop(self) -> Arc<Mutex<Ledger>> {
        self.stop.cancel();
        for t in self.tasks {
            t.await.unwrap();
        }
        self.ledger
    }
}

async fn one(ch: tonic::transport::Channel, model: &str, prompt: &str) -> Attempt {
    generate(ch, model, prompt, MAX_TOKENS, None).await
}

/// One streamed generation of `max_tokens` tokens, checked against the text the simulator
/// generates for `prompt`; `first` hears of its first chunk.
pub async fn generate(
    ch: tonic::transport::Channel,
    model: &str,
    prompt: &str,
    max_tokens: u32,
    mut first: Option<tokio::sync::oneshot::Sender<()>>,
) -> Attempt {
    let mut client = pb::dispatch_client::DispatchClient::new(ch);
    let req = pb::GenerateRequest {
        model: model.into(),
        input: Some(pb::generate_request::Input::Prompt(prompt.into())),
        params: Some(pb::SamplingParams { max_tokens, seed: Some(SEED), ..Default::default() }),
        progress: false,
        timeout_ms: 15_000,
    };
    let run = async {
        let mut stream = match client.generate(req).await {
            Ok(s) => s.into_inner(),
            Err(s) => {
                return Attempt::Failed { code: s.code(), message: s.message().into(), tokens: 0 };
            }
        };
        let (mut text, mut tokens, mut finished) = (String::new(), 0u32, false);
        loop {
            match stream.message().await {
                Ok(Some(pb::GenerateEvent { event: Some(e) })) => match e {
                    pb::generate_event::Event::Chunk(c) => {
                        text.push_str(&c.text);
                        tokens += c.tokens;
                        if let Some(first) = first.take() {
                            let _ = first.send(());
                        }
                    }
                    pb::generate_event::Event::Finished(_) => finished = true,
                    pb::generate_event::Event::Progress(_) => {}
                },
                Ok(Some(_)) => {}
                Ok(None) if finished => {
                    let want: String = worker::sim::text(SEED, prompt, max_tokens);
                    return if text == want {
                        Attempt::Completed
                    } else {
                        Attempt::Corrupt(format!("got {text:?}, want {want:?}"))
                    };
                }
                Ok(None) => {
                    return Attempt::Lost(format!("stream ended after {tokens} tokens, no end"));
                }
                Err(s) => {
                    return Attempt::Failed { code: s.code(), message: s.message().into(), tokens };
                }
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(30), run).await {
        Ok(a) => a,
        Err(_) => Attempt::Lost("no end within 30 s".into()),
    }
}
