//! The engines' `/tokenize` and `/detokenize` through `sllm up` (the simulator backend), with
//! curl: the first call starts the model from zero, and text comes back from its ids.

use serde_json::{Value, json};

use crate::*;

/// POSTs `body` to `path` on the OpenAI port with curl: the status, the `x-request-id` header
/// and the body.
async fn post(up: &Up, path: &str, body: &Value) -> (u16, String, Value) {
    let base = up.openai.trim_end_matches("/v1");
    let o = tokio::process::Command::new("curl")
        .args(["-s", "--max-time", "60", "-D", "-", "-w", "\n%{http_code}"])
        .args(["-H", "Content-Type: application/json", "-d", &body.to_string()])
        .arg(format!("{base}{path}"))
        .output()
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let (head, rest) = out.split_once("\r\n\r\n").unwrap_or_else(|| panic!("{out}"));
    let (answer, status) = rest.rsplit_once('\n').unwrap();
    let id = head
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .unwrap_or_default()
        .trim()
        .to_string();
    let answer = serde_json::from_str(answer).unwrap_or_else(|e| panic!("{e}: {answer}"));
    (status.trim().parse().unwrap(), id, answer)
}

#[tokio::test]
async fn tokenize_starts_the_model_and_detokenize_gives_the_text_back() {
    let up = Up::start(&["--no-demo", "--workers", "1"]);
    let o = sllm(&["deploy", "tiny/chat", "--endpoint", &up.endpoint()]).await;
    assert!(o.status.success(), "{}", text(&o).1);

    let prompt = "hello world, once upon a time";
    let body = json!({"model": "tiny/chat", "prompt": prompt, "return_token_strs": true});
    let (status, id, tokens) = post(&up, "/tokenize", &body).await;
    assert_eq!(status, 200, "{tokens}");
    assert!(id.starts_with("tokn-"), "{id:?}");
    let ids = tokens["tokens"].as_array().unwrap().clone();
    assert_eq!(tokens["count"], ids.len(), "{tokens}");
    let pieces: String =
        tokens["token_strs"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    assert_eq!(pieces, prompt, "{tokens}");

    let (status, id, text) =
        post(&up, "/detokenize", &json!({"model": "tiny/chat", "tokens": ids})).await;
    assert_eq!(status, 200, "{text}");
    assert!(id.starts_with("dtok-"), "{id:?}");
    assert_eq!(text["prompt"], prompt);

    // A chat counts its template's tokens too.
    let chat = json!({"model": "tiny/chat", "messages": [{"role": "user", "content": prompt}]});
    let (status, _, in_chat) = post(&up, "/tokenize", &chat).await;
    assert_eq!(status, 200, "{in_chat}");
    assert!(in_chat["count"].as_u64() > tokens["count"].as_u64(), "{in_chat}");

    // What the simulator cannot honour is refused by name (llama.cpp's `content` is for a
    // llama.cpp engine); an unknown model is a 404; an error has its request id too.
    let both = json!({"model": "tiny/chat", "prompt": "a", "content": "a"});
    let (status, id, err) = post(&up, "/tokenize", &both).await;
    assert_eq!(status, 400, "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("content"), "{err}");
    assert!(id.starts_with("tokn-"), "{id:?}");
    let (status, _, err) =
        post(&up, "/detokenize", &json!({"model": "no/such", "tokens": [1]})).await;
    assert_eq!(status, 404, "{err}");
    assert_eq!(err["error"]["param"], "model", "{err}");
}
