//! The engines' `/tokenize` and `/detokenize` as the simulator answers them, over its own
//! vocabulary ([`crate::vocab`]) and in vLLM's shape: `{"count", "max_model_len", "tokens",
//! "token_strs"}` for a `prompt`, or for `messages` through the simulator's chat template
//! ([`crate::sim::render_chat`]); `{"prompt"}` for a list of `tokens`. The simulator's
//! vocabulary has no special tokens, so `add_special_tokens` changes nothing. A field it cannot
//! honour is refused by name.

use serde_json::{Map, Value, json};
use sllm_api::v1 as pb;

use crate::backend::Failure;

/// Fields of a `/tokenize` body the simulator honours.
const TOKENIZE_FIELDS: &[&str] = &[
    "model",
    "prompt",
    "messages",
    "add_special_tokens",
    "add_generation_prompt",
    "return_token_strs",
];

/// Fields of a `/detokenize` body the simulator honours.
const DETOKENIZE_FIELDS: &[&str] = &["model", "tokens"];

/// Which of the two endpoints a body was sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Tokenize,
    Detokenize,
}

/// Answers `body` sent to `endpoint`, tokenising as `sllm sim-engine --merges` does when
/// `merges`; `max_model_len` is the context length to report (null where there is none).
pub fn answer(
    endpoint: Endpoint,
    body: &str,
    merges: bool,
    max_model_len: Option<u64>,
) -> Result<String, Failure> {
    let fields = match endpoint {
        Endpoint::Tokenize => TOKENIZE_FIELDS,
        Endpoint::Detokenize => DETOKENIZE_FIELDS,
    };
    let map = &crate::sim::honoured(body, fields)?;
    match endpoint {
        Endpoint::Tokenize => tokenize(map, merges, max_model_len),
        Endpoint::Detokenize => detokenize(map),
    }
}

fn flag(map: &Map<String, Value>, field: &str, default: bool) -> Result<bool, Failure> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(Failure::unsupported(field, format!("must be true or false, got {v}"))),
    }
}

fn tokenize(
    map: &Map<String, Value>,
    merges: bool,
    max_model_len: Option<u64>,
) -> Result<String, Failure> {
    let given = |field: &str| map.get(field).filter(|v| !v.is_null());
    let text = match (given("prompt"), given("messages")) {
        (Some(Value::String(p)), None) => p.clone(),
        (None, Some(Value::Array(items))) => {
            let rendered = crate::sim::render_chat(&chat_messages(items)?);
            if flag(map, "add_generation_prompt", true)? {
                rendered
            } else {
                rendered.strip_suffix(crate::sim::GENERATION_PROMPT).unwrap_or(&rendered).into()
            }
        }
        (Some(v), None) => {
            return Err(Failure::unsupported("prompt", format!("must be a text, got {v}")));
        }
        (None, Some(_)) => {
            return Err(Failure::unsupported("messages", "must be a list of messages"));
        }
        (None, None) => return Err(Failure::unsupported("prompt", "is required (or messages)")),
        (Some(_), Some(_)) => {
            return Err(Failure::unsupported("messages", "give prompt or messages, not both"));
        }
    };
    flag(map, "add_special_tokens", true)?;
    let ids = crate::vocab::encode(&text, merges);
    let strs = if flag(map, "return_token_strs", false)? {
        let pieces: Vec<String> = ids
            .iter()
            .map(|id| crate::vocab::decode(std::slice::from_ref(id)).unwrap_or_default())
            .collect();
        json!(pieces)
    } else {
        Value::Null
    };
    Ok(json!({
        "count": ids.len(),
        "max_model_len": max_model_len,
        "tokens": ids,
        "token_strs": strs,
    })
    .to_string())
}

/// A chat's messages: each a role and content that is a text or a list of text parts.
fn chat_messages(items: &[Value]) -> Result<Vec<pb::ChatMessage>, Failure> {
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m.get("role").and_then(Value::as_str);
            let content = m.get("content").and_then(|c| crate::sim::text_content(c, &["text"]));
            match (role, content) {
                (Some(role), Some(content)) => Ok(pb::ChatMessage { role: role.into(), content }),
                _ => Err(Failure::unsupported(
                    &format!("messages[{i}]"),
                    "the simulator backend takes messages of text only",
                )),
            }
        })
        .collect()
}

fn detokenize(map: &Map<String, Value>) -> Result<String, Failure> {
    let items = match map.get("tokens") {
        Some(Value::Array(items)) => items,
        _ => return Err(Failure::unsupported("tokens", "must be a list of token ids")),
    };
    let mut ids = Vec::with_capacity(items.len());
    for (i, t) in items.iter().enumerate() {
        let id = t.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| {
            Failure::unsupported(&format!("tokens[{i}]"), format!("must be a token id, got {t}"))
        })?;
        ids.push(id);
    }
    let text = crate::vocab::decode(&ids).map_err(|unknown| {
        let at = ids.iter().position(|&id| id == unknown).unwrap_or_default();
        Failure::unsupported(
            &format!("tokens[{at}]"),
            format!("{unknown} is not in the vocabulary (ids 0 to {})", crate::vocab::size() - 1),
        )
    })?;
    Ok(json!({ "prompt": text }).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_of(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn text_round_trips_and_the_count_is_the_tokens() {
        let prompt = "Once upon a time, the quick brown fox";
        let body = json!({ "model": "m", "prompt": prompt, "return_token_strs": true });
        let t = json_of(&answer(Endpoint::Tokenize, &body.to_string(), true, Some(512)).unwrap());
        let ids = t["tokens"].as_array().unwrap();
        assert_eq!(t["count"], ids.len());
        assert_eq!(t["max_model_len"], 512);
        let strs: Vec<&str> =
            t["token_strs"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
        assert_eq!(strs.concat(), prompt);
        let back = json!({ "model": "m", "tokens": ids });
        let d = json_of(&answer(Endpoint::Detokenize, &back.to_string(), true, None).unwrap());
        assert_eq!(d["prompt"], prompt);
        // Without token strings, and without a context length to report.
        let plain = json!({ "prompt": prompt, "add_special_tokens": false });
        let t2 = json_of(&answer(Endpoint::Tokenize, &plain.to_string(), true, None).unwrap());
        assert_eq!(t2["tokens"], t["tokens"]);
        assert!(t2["token_strs"].is_null() && t2["max_model_len"].is_null(), "{t2}");
    }

    #[test]
    fn a_chat_is_tokenized_through_the_template() {
        let messages = json!([
            { "role": "system", "content": "be brief" },
            { "role": "user", "content": [{ "type": "text", "text": "hello" }] },
        ]);
        let with = json!({ "messages": messages, "return_token_strs": true });
        let t = json_of(&answer(Endpoint::Tokenize, &with.to_string(), false, None).unwrap());
        let text = |t: &Value| -> String {
            t["token_strs"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect()
        };
        assert_eq!(text(&t), "system: be brief\nuser: hello\nassistant:");
        let without = json!({ "messages": messages, "add_generation_prompt": false, "return_token_strs": true });
        let t = json_of(&answer(Endpoint::Tokenize, &without.to_string(), false, None).unwrap());
        assert_eq!(text(&t), "system: be brief\nuser: hello\n");
    }

    #[test]
    fn what_it_cannot_do_is_refused_by_name() {
        let size = crate::vocab::size();
        for (endpoint, body, field) in [
            (Endpoint::Tokenize, json!({ "model": "m" }), "prompt"),
            (Endpoint::Tokenize, json!({ "prompt": ["a", "b"] }), "prompt"),
            (Endpoint::Tokenize, json!({ "prompt": "a", "messages": [] }), "messages"),
            (Endpoint::Tokenize, json!({ "messages": "hi" }), "messages"),
            (Endpoint::Tokenize, json!({ "messages": [{ "role": "user" }] }), "messages[0]"),
            (Endpoint::Tokenize, json!({ "prompt": "a", "content": "a" }), "content"),
            (
                Endpoint::Tokenize,
                json!({ "prompt": "a", "return_token_strs": 1 }),
                "return_token_strs",
            ),
            (Endpoint::Detokenize, json!({ "model": "m" }), "tokens"),
            (Endpoint::Detokenize, json!({ "tokens": [1, -2] }), "tokens[1]"),
            (Endpoint::Detokenize, json!({ "tokens": [1, 2, size] }), "tokens[2]"),
            (
                Endpoint::Detokenize,
                json!({ "tokens": [1], "skip_special_tokens": true }),
                "skip_special_tokens",
            ),
        ] {
            let e = answer(endpoint, &body.to_string(), false, None).unwrap_err();
            assert!(e.message.contains(&format!("invalid {field}:")), "{field}: {}", e.message);
        }
    }
}
