//! Live migration: a stream whose instance is lost or drained after tokens reached the client
//! continues on another instance, and the client sees one stream, byte for byte the text the
//! uninterrupted generation gives.

use std::time::{Duration, Instant};

use rand::Rng;
use sllm_api::v1 as pb;

use crate::*;

/// Two workers with one GPU each, and `model` with an instance on each.
async fn two_instances(c: &Cluster, decode: Duration) -> (SimWorker, SimWorker) {
    let sim = || worker::SimConfig { gpus: 1, decode_per_token: decode, ..fast_sim() };
    let w1 = c.worker("w1", sim()).await;
    let w2 = c.worker("w2", sim()).await;
    c.deploy("m", 2, 2).await;
    c.ready("m", 2).await;
    tokio::time::sleep(Duration::from_millis(800)).await; // both attached to Dispatch
    (w1, w2)
}

/// Reads `s` until `tokens` tokens arrived; returns the worker it was routed to and what came.
async fn read_until(s: &mut tonic::Streaming<pb::GenerateEvent>, tokens: u32) -> (String, Outcome) {
    let mut out = Outcome::default();
    let mut worker = String::new();
    while out.tokens < tokens {
        match s.message().await.unwrap().and_then(|e| e.event) {
            Some(pb::generate_event::Event::Progress(p)) => {
                if p.stage == pb::progress::Stage::Routed as i32 {
                    worker = p.worker_id.clone();
                }
                out.progress.push(p);
            }
            Some(pb::generate_event::Event::Chunk(c)) => {
                out.text.push_str(&c.text);
                out.tokens += c.tokens;
            }
            other => panic!("the stream ended early: {other:?}"),
        }
    }
    (worker, out)
}

fn chat(model: &str, text: &str, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        input: Some(pb::generate_request::Input::Chat(pb::ChatMessages {
            messages: vec![
                pb::ChatMessage { role: "system".into(), content: "be brief".into() },
                pb::ChatMessage { role: "user".into(), content: text.into() },
            ],
        })),
        ..prompt(model, "", max_tokens)
    }
}

/// The host serving a stream dies at a random token: the stream goes on on the other
/// instance, and the text is exactly the uninterrupted generation's, counted once.
async fn dies_at_a_random_token(req: pb::GenerateRequest) {
    let c = Cluster::start().await;
    let (w1, w2) = two_instances(&c, Duration::from_millis(200)).await; // 2 ms a token
    // The uninterrupted answer, for comparison.
    let whole = generate(&c, req.clone()).await.unwrap();
    assert!(whole.error.is_none(), "{:?}", whole.error);
    assert_eq!(whole.tokens, 300);

    let cut = rand::rng().random_range(5..250);
    let mut client = c.dispatch.client().await.unwrap();
    let mut s =
        client.generate(pb::GenerateRequest { progress: true, ..req }).await.unwrap().into_inner();
    let (_, before) = read_until(&mut s, cut).await;
    let worker = match (w1.backend.requests_running(), w2.backend.requests_running()) {
        (1, 0) => "w1",
        (0, 1) => "w2",
        other => panic!("running on each worker: {other:?}"),
    };
    let (survivor, _alive) = match worker {
        "w1" => {
            drop(w1);
            ("w2", w2)
        }
        "w2" => {
            drop(w2);
            ("w1", w1)
        }
        other => panic!("routed to {other:?}"),
    };
    // The cost of a move: from the cut to the first token of the continuation.
    let cut_at = Instant::now();
    let (_, resumed) = read_until(&mut s, 1).await;
    let gap = cut_at.elapsed();
    println!("moved after {cut} tokens: first resumed token {gap:?} after the cut");
    assert!(gap < Duration::from_secs(2), "resumed after {gap:?}");
    let mut after = drain(s).await;
    after.text.insert_str(0, &resumed.text);
    after.tokens += resumed.tokens;
    after.progress.splice(0..0, resumed.progress);
    assert!(after.error.is_none(), "cut at {cut}: {:?}", after.error);
    let text = format!("{}{}", before.text, after.text);
    assert_eq!(text, whole.text, "cut at {cut}: the text differs from the uninterrupted one");
    assert_eq!(before.tokens + after.tokens, 300, "tokens delivered");
    let moved =
        after.progress.iter().filter(|p| p.stage == pb::progress::Stage::Migrated as i32).count();
    assert_eq!(moved, 1, "one MIGRATED event: {:?}", after.progress);
    let usage = after.finished.unwrap().usage.unwrap();
    assert_eq!(usage.migrations, 1);
    assert_eq!(usage.completion_tokens, 300, "usage counts what the client received");
    let whole_usage = whole.finished.unwrap().usage.unwrap();
    assert_eq!(usage.prompt_tokens, whole_usage.prompt_tokens);
    let served = c.store.get_instance(&usage.instance_id).await.unwrap().unwrap();
    assert_eq!(served.worker_id, survivor, "finished on the survivor");
}

#[tokio::test]
async fn a_prompt_whose_worker_dies_at_a_random_token_continues_byte_for_byte() {
    dies_at_a_random_token(prompt("m", "tell me a story", 300)).await;
}

#[tokio::test]
async fn a_chat_whose_worker_dies_at_a_random_token_continues_byte_for_byte() {
    dies_at_a_random_token(chat("m", "a story", 300)).await;
}

/// Over the OpenAI API, a chat stream whose worker dies midway goes on, and its last chunks
/// (the finish, the usage) say `"migrations": 1`, a field OpenAI clients keep; no other chunk
/// carries it.
#[tokio::test]
async fn an_openai_stream_says_on_its_last_chunks_that_it_moved() {
    use tokio::io::AsyncBufReadExt;
    let c = Cluster::start().await;
    let (w1, w2) = two_instances(&c, Duration::from_millis(200)).await; // 2 ms a token
    let body = serde_json::json!({
        "model": "m", "max_tokens": 300, "seed": 7, "stream": true,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a story"}],
    });
    let mut curl = tokio::process::Command::new("curl")
        .args(["-sN", "--max-time", "30", "-H", "Content-Type: application/json", "-d"])
        .arg(body.to_string())
        .arg(format!("{}/chat/completions", c.dispatch.openai_base()))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(curl.stdout.take().unwrap()).lines();
    let mut events = Vec::new();
    while events.len() < 20 {
        let line = lines.next_line().await.unwrap().expect("the stream goes on");
        if let Some(data) = line.strip_prefix("data: ") {
            events.push(data.to_string());
        }
    }
    let _alive = match (w1.backend.requests_running(), w2.backend.requests_running()) {
        (1, 0) => {
            drop(w1);
            w2
        }
        (0, 1) => {
            drop(w2);
            w1
        }
        other => panic!("running on each worker: {other:?}"),
    };
    while let Some(line) = lines.next_line().await.unwrap() {
        if let Some(data) = line.strip_prefix("data: ") {
            events.push(data.to_string());
        }
    }
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<serde_json::Value> =
        events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let text: String =
        chunks.iter().filter_map(|ch| ch["choices"][0]["delta"]["content"].as_str()).collect();
    let whole = expected_text(7, "system: be brief\nuser: a story\nassistant:", 300);
    assert_eq!(text, whole, "the moved stream is the uninterrupted one");
    let marked: Vec<&serde_json::Value> =
        chunks.iter().filter(|ch| ch.get("migrations").is_some()).collect();
    assert_eq!(marked.len(), 2, "{marked:?}");
    assert_eq!(marked[0]["choices"][0]["finish_reason"], "length");
    assert_eq!(marked[1]["usage"]["completion_tokens"], 300);
    assert!(marked.iter().all(|ch| ch["migrations"] == 1), "{marked:?}");
    assert_eq!(chunks.iter().filter(|ch| ch["choices"][0]["delta"]["role"].is_string()).count(), 1);
}

/// Scale-down drains an instance with streams on it: they move to the other instance at once,
/// so the instance stops within seconds instead of after its streams, and no stream breaks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_moves_its_streams_and_the_instance_stops_at_once() {
    // A drain may wait a minute for its streams: only moving them stops it sooner.
    let c = Cluster::start_configured(
        |d| d.instance_limit = 2000,
        |s| s.drain_grace = Duration::from_secs(60),
    )
    .await;
    // 10 ms a token: 2,000 tokens take 20 s, far past the test's bound.
    let (_w1, _w2) = two_instances(&c, Duration::from_secs(1)).await;
    const STREAMS: usize = 1000;
    let mut tasks = Vec::new();
    for i in 0..STREAMS {
        let mut client = c.dispatch.client().await.unwrap();
        let req = prompt("m", &format!("stream {i}"), 2000);
        tasks.push(tokio::spawn(async move {
            let mut s = client.generate(req).await.unwrap().into_inner();
            let (_, before) = read_until(&mut s, 1).await;
            (before, s)
        }));
    }
    let mut streams = Vec::new();
    for t in tasks {
        streams.push(t.await.unwrap());
    }
    // Every stream has output; scale to one instance: the Scaler drains one of the two.
    let instances = c.store.model_instances("m").await.unwrap();
    let mut one = sllm_integration_tests::sim_deployment("m", 1, 1).autoscaling;
    one.keep_alive_s = 0;
    c.store.update_autoscaling("m", &one, 0).await.unwrap();
    let drained = sllm_integration_tests::eventually(
        Duration::from_secs(10),
        "an instance draining",
        || async {
            let now = c.store.model_instances("m").await.unwrap();
            now.into_iter()
                .find(|i| i.status == kvstore::InstanceStatus::Draining)
                .map(|i| i.instance_id)
        },
    )
    .await
    .unwrap();
    let t = Instant::now();
    sllm_integration_tests::eventually(
        Duration::from_secs(10),
        "the drained instance stopped",
        || async {
            let now = c.store.model_instances("m").await.unwrap();
            (!now
                .iter()
                .any(|i| i.instance_id == drained && i.status == kvstore::InstanceStatus::Draining))
            .then_some(())
        },
    )
    .await
    .unwrap();
    let stopped_in = t.elapsed();
    assert!(instances.len() == 2);
    // Cancel the rest: nothing broke, and the moved ones continued.
    let mut moved = 0;
    for (before, mut s) in streams {
        assert!(before.tokens >= 1);
        // Each stream still delivers: read a few more tokens, then let it go.
        let mut more = 0;
        while more < 3 {
            match s.message().await {
                Ok(Some(pb::GenerateEvent {
                    event: Some(pb::generate_event::Event::Chunk(ch)),
                })) => more += ch.tokens,
                Ok(Some(_)) => {}
                other => panic!("a stream broke: {other:?}"),
            }
        }
        moved += 1;
    }
    assert_eq!(moved, STREAMS);
    assert!(
        stopped_in < Duration::from_secs(2),
        "the drained instance stopped after {stopped_in:?}"
    );
}
