//! The engines' `/tokenize`, `/detokenize` and `/v1/rerank` through `sllm up` (the simulator
//! backend), with curl: the first call starts the model from zero.

use serde_json::json;

use crate::*;

#[tokio::test]
async fn tokenize_starts_the_model_and_detokenize_gives_the_text_back() {
    let up = Up::start(&["--no-demo", "--workers", "1"]);
    let o = sllm(&["deploy", "tiny/chat", "--endpoint", &up.endpoint()]).await;
    assert!(o.status.success(), "{}", text(&o).1);

    let prompt = "hello world, once upon a time";
    let body = json!({"model": "tiny/chat", "prompt": prompt, "return_token_strs": true});
    let (status, id, tokens) = post_json(&up, "/tokenize", &body).await;
    assert_eq!(status, 200, "{tokens}");
    assert!(id.starts_with("tokn-"), "{id:?}");
    let ids = tokens["tokens"].as_array().unwrap().clone();
    assert_eq!(tokens["count"], ids.len(), "{tokens}");
    let pieces: String =
        tokens["token_strs"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    assert_eq!(pieces, prompt, "{tokens}");

    let (status, id, text) =
        post_json(&up, "/detokenize", &json!({"model": "tiny/chat", "tokens": ids})).await;
    assert_eq!(status, 200, "{text}");
    assert!(id.starts_with("dtok-"), "{id:?}");
    assert_eq!(text["prompt"], prompt);

    // A chat counts its template's tokens too.
    let chat = json!({"model": "tiny/chat", "messages": [{"role": "user", "content": prompt}]});
    let (status, _, in_chat) = post_json(&up, "/tokenize", &chat).await;
    assert_eq!(status, 200, "{in_chat}");
    assert!(in_chat["count"].as_u64() > tokens["count"].as_u64(), "{in_chat}");

    // What the simulator cannot honour is refused by name (llama.cpp's `content` is for a
    // llama.cpp engine); an unknown model is a 404; an error has its request id too.
    let both = json!({"model": "tiny/chat", "prompt": "a", "content": "a"});
    let (status, id, err) = post_json(&up, "/tokenize", &both).await;
    assert_eq!(status, 400, "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("content"), "{err}");
    assert!(id.starts_with("tokn-"), "{id:?}");
    let (status, _, err) =
        post_json(&up, "/detokenize", &json!({"model": "no/such", "tokens": [1]})).await;
    assert_eq!(status, 404, "{err}");
    assert_eq!(err["error"]["param"], "model", "{err}");
}

#[tokio::test]
async fn rerank_starts_the_model_and_ranks_what_holds_the_query_first() {
    let up = Up::start(&["--no-demo", "--workers", "1"]);
    let o = sllm(&["deploy", "tiny/ranker", "--endpoint", &up.endpoint()]).await;
    assert!(o.status.success(), "{}", text(&o).1);
    let body = json!({
        "model": "tiny/ranker",
        "query": "Where do foxes live?",
        "documents": ["Paris is a city", "Foxes live in dens", "hello"],
    });
    for path in ["/v1/rerank", "/rerank"] {
        let (status, id, ranked) = post_json(&up, path, &body).await;
        assert_eq!(status, 200, "{ranked}");
        assert!(id.starts_with("rerank-"), "{id:?}");
        assert_eq!(ranked["id"], id, "the simulator's answer carries the request's id");
        assert_eq!(ranked["model"], "tiny/ranker");
        let order: Vec<u64> = ranked["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["index"].as_u64().unwrap())
            .collect();
        assert_eq!(order, [1, 0, 2], "{ranked}");
        assert_eq!(ranked["results"][0]["document"]["text"], "Foxes live in dens");
    }
    let (status, _, err) = post_json(
        &up,
        "/v1/rerank",
        &json!({"model": "tiny/ranker", "query": "q", "documents": "a"}),
    )
    .await;
    assert_eq!(status, 400, "{err}");
    assert_eq!(err["error"]["param"], "documents", "{err}");
}
