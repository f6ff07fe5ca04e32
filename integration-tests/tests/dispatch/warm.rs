use std::time::Duration;

use sllm_api::v1 as pb;
use tonic::Code;

use crate::*;

#[tokio::test]
async fn a_warm_request_streams_tokens_and_usage() {
    let c = Cluster::start().await;
    let _w = c.worker("w1", fast_sim()).await;
    c.deploy("m", 1, 1).await;
    c.ready("m", 1).await;
    // Wait for the worker's Attach stream to this Dispatch.
    let out =
        sllm_integration_tests::eventually(Duration::from_secs(10), "a served request", || async {
            let out = generate(&c, prompt("m", "hello there", 12)).await.ok()?;
            out.finished.is_some().then_some(out)
        })
        .await
        .unwrap();
    assert_eq!(out.text, expected_text(7, "hello there", 12));
    assert_eq!(out.tokens, 12);
    let f = out.finished.unwrap();
    assert_eq!(f.reason, pb::FinishReason::Length as i32);
    let usage = f.usage.unwrap();
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (2, 12));
    assert!(usage.time_to_first_token_us > 0);
    assert!(!usage.instance_id.is_empty());
    assert!(out.error.is_none());

    // Chat input and ServerlessLLM's name:backend form.
    let mut req = prompt("m:sim", "", 3);
    req.input = Some(pb::generate_request::Input::Chat(pb::ChatMessages {
        messages: vec![pb::ChatMessage { role: "user".into(), content: "hi".into() }],
    }));
    let out = generate(&c, req).await.unwrap();
    assert_eq!(out.tokens, 3);

    // A stop string ends generation early with reason STOP.
    let full = expected_text(7, "hello there", 12);
    let third_word = full.split_whitespace().nth(2).unwrap().to_string();
    let mut req = prompt("m", "hello there", 12);
    req.params.as_mut().unwrap().stop = vec![third_word];
    let out = generate(&c, req).await.unwrap();
    assert!(out.tokens < 12, "{out:?}");
    assert_eq!(out.finished.unwrap().reason, pb::FinishReason::Stop as i32);
}

#[tokio::test]
async fn bad_requests_are_refused_naming_the_field() {
    let c = Cluster::start().await;
    c.deploy("m", 0, 1).await;
    let err = generate(&c, prompt("nope", "x", 5)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("nope"), "{}", err.message());

    let cases: Vec<(pb::GenerateRequest, &str)> = vec![
        (
            {
                let mut r = prompt("m", "x", 5);
                r.input = None;
                r
            },
            "input",
        ),
        (prompt("m", "x", 1_000_000), "max_tokens"),
        (
            {
                let mut r = prompt("m", "x", 5);
                r.params.as_mut().unwrap().temperature = Some(7.0);
                r
            },
            "temperature",
        ),
        (
            {
                let mut r = prompt("m", "x", 5);
                r.params.as_mut().unwrap().top_p = Some(0.0);
                r
            },
            "top_p",
        ),
        (
            {
                let mut r = prompt("m", "x", 5);
                r.params.as_mut().unwrap().stop = vec!["a".into(); 5];
                r
            },
            "stop",
        ),
        (prompt("bad name!", "x", 5), "model"),
        (prompt("m", &"x".repeat(2 << 20), 5), "prompt"),
        (
            {
                let mut r = prompt("m", "", 5);
                r.input = Some(pb::generate_request::Input::Chat(pb::ChatMessages {
                    messages: vec![pb::ChatMessage { role: "wizard".into(), content: "x".into() }],
                }));
                r
            },
            "messages[0].role",
        ),
    ];
    for (req, field) in cases {
        let err = generate(&c, req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {}", err.message());
        assert!(err.message().contains(field), "{field} not named in {:?}", err.message());
    }
}

#[tokio::test]
async fn two_dispatch_replicas_serve_the_same_models() {
    let c = Cluster::start().await;
    let second = sllm_integration_tests::DispatchReplica::start(c.store.clone(), "d2", |_| {})
        .await
        .unwrap();
    let _w = c.worker("w1", fast_sim()).await;
    c.deploy("m", 1, 1).await;
    c.ready("m", 1).await;
    for endpoint in [c.dispatch.endpoint(), second.endpoint()] {
        let out = sllm_integration_tests::eventually(
            Duration::from_secs(10),
            "served via each replica",
            || async {
                let mut client =
                    pb::dispatch_client::DispatchClient::connect(endpoint.clone()).await.ok()?;
                let s = client.generate(prompt("m", "both", 4)).await.ok()?.into_inner();
                let out = drain(s).await;
                out.finished.is_some().then_some(out)
            },
        )
        .await
        .unwrap();
        assert_eq!(out.text, expected_text(7, "both", 4));
    }
}

/// The simulator refuses what it cannot honour, naming the field; nothing is retried and the
/// worker stays in service.
#[tokio::test]
async fn the_simulator_refuses_sampling_it_cannot_honour() {
    let c = Cluster::start().await;
    let _w = c.worker("w1", fast_sim()).await;
    c.deploy("m", 1, 1).await;
    c.ready("m", 1).await;
    sllm_integration_tests::eventually(Duration::from_secs(10), "a served request", || async {
        generate(&c, prompt("m", "hi", 2)).await.ok()?.finished
    })
    .await
    .unwrap();
    let mut r = prompt("m", "hi", 4);
    r.params.as_mut().unwrap().top_k = Some(5);
    let out = generate(&c, r).await.unwrap();
    let err = out.error.expect("refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("top_k"), "{}", err.message());
    for _ in 0..5 {
        let mut r = prompt("m", "hi", 4);
        r.params.as_mut().unwrap().logprobs = true;
        assert!(generate(&c, r).await.unwrap().error.is_some());
    }
    let ok = generate(&c, prompt("m", "hi", 4)).await.unwrap();
    assert!(ok.finished.is_some(), "the worker still serves: {:?}", ok.error);
}
