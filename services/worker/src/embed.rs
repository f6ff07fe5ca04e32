//! Embeddings as the simulator answers them: one unit vector per text, the same for the same
//! text on every run and platform, in OpenAI's `/v1/embeddings` shape (`float` or `base64`,
//! `dimensions` up to [`SIM_DIMENSIONS`]). Texts that differ get vectors that differ, so tests
//! can tell answers apart; nothing about meaning is simulated.

use serde_json::{Value, json};

use crate::backend::Failure;

/// Length of the simulator's vectors (a MiniLM-sized model).
pub const SIM_DIMENSIONS: usize = 384;

/// Fields of an embeddings body the simulator honours (`user` only labels the caller).
const FIELDS: &[&str] = &["model", "input", "encoding_format", "dimensions", "user"];

/// The unit vector of `text`, `dims` long: pseudo-random components from a hash of the text,
/// scaled to length 1.
pub fn vector(text: &str, dims: usize) -> Vec<f32> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let mut v: Vec<f32> = (0..dims)
        .map(|i| {
            // splitmix64 of (hash, index): well spread, cheap, stable.
            let mut z = h.wrapping_add((i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            (z >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0
        })
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        for x in &mut v {
            *x /= norm;
        }
    }
    v
}

/// The texts of an `input` field: a string, a list of strings, a list of token ids, or a list
/// of such lists (token ids are read as their decimal text).
fn texts(input: &Value) -> Result<Vec<String>, Failure> {
    let bad = || {
        Failure::unsupported(
            "input",
            "must be a string, a list of strings, a list of token ids, or a list of such lists",
        )
    };
    let ids = |items: &[Value]| -> Option<String> {
        items
            .iter()
            .map(|t| t.as_u64().map(|n| n.to_string()))
            .collect::<Option<Vec<_>>>()
            .map(|v| v.join(" "))
    };
    match input {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_string) => {
            Ok(items.iter().filter_map(Value::as_str).map(str::to_string).collect())
        }
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_u64) => {
            ids(items).map(|t| vec![t]).ok_or_else(bad)
        }
        Value::Array(items) if !items.is_empty() => {
            items.iter().map(|i| i.as_array().and_then(|a| ids(a)).ok_or_else(bad)).collect()
        }
        _ => Err(bad()),
    }
}

/// Standard base64 (with padding) of `bytes`.
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Answers an OpenAI embeddings `body` for `model`: the response body and the prompt tokens
/// it counted (a token a word). A field the simulator cannot honour is refused by name.
pub fn answer(body: &str, model: &str) -> Result<(String, u32), Failure> {
    let map = &crate::sim::honoured(body, FIELDS)?;
    let texts = texts(map.get("input").unwrap_or(&Value::Null))?;
    let dims = match map.get("dimensions") {
        None | Some(Value::Null) => SIM_DIMENSIONS,
        Some(d) => match d.as_u64() {
            Some(n) if n >= 1 && n as usize <= SIM_DIMENSIONS => n as usize,
            _ => {
                return Err(Failure::unsupported(
                    "dimensions",
                    format!("must be between 1 and {SIM_DIMENSIONS} for this model, got {d}"),
                ));
            }
        },
    };
    let base64_format = match map.get("encoding_format").and_then(Value::as_str) {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(Failure::unsupported(
                "encoding_format",
                format!("must be \"float\" or \"base64\", got {other:?}"),
            ));
        }
    };
    let tokens: u32 = texts.iter().map(|t| t.split_whitespace().count().max(1) as u32).sum();
    let data: Vec<Value> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let v = vector(t, dims);
            let embedding = if base64_format {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64(&bytes))
            } else {
                json!(v)
            };
            json!({ "object": "embedding", "index": i, "embedding": embedding })
        })
        .collect();
    let out = json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": { "prompt_tokens": tokens, "total_tokens": tokens },
    });
    Ok((out.to_string(), tokens))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn vectors_are_deterministic_unit_vectors_that_tell_texts_apart() {
        let a = vector("hello", SIM_DIMENSIONS);
        assert_eq!(a, vector("hello", SIM_DIMENSIONS));
        assert_ne!(a, vector("hello!", SIM_DIMENSIONS));
        let norm: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{norm}");
        assert_eq!(vector("x", 8).len(), 8);
    }

    #[test]
    fn answers_in_openais_shape_and_names_what_it_cannot_do() {
        let (body, tokens) =
            answer(r#"{"model": "m", "input": ["a b", "c"], "dimensions": 4}"#, "m").unwrap();
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(tokens, 3);
        assert_eq!(v["data"][1]["index"], 1);
        assert_eq!(v["data"][0]["embedding"].as_array().unwrap().len(), 4);
        let (body, _) = answer(r#"{"input": "a", "encoding_format": "base64"}"#, "m").unwrap();
        let v: Value = serde_json::from_str(&body).unwrap();
        // 384 floats of 4 bytes.
        assert_eq!(v["data"][0]["embedding"].as_str().unwrap().len(), 2048);
        assert_eq!(base64(b"any carnal pleas"), "YW55IGNhcm5hbCBwbGVhcw==");
        for (body, field) in [
            (r#"{"input": "a", "dimensions": 0}"#, "dimensions"),
            (r#"{"input": "a", "dimensions": 9999}"#, "dimensions"),
            (r#"{"input": "a", "encoding_format": "int8"}"#, "encoding_format"),
            (r#"{"input": []}"#, "input"),
            (r#"{"input": [1, "a"]}"#, "input"),
            (r#"{"input": "a", "truncate": true}"#, "truncate"),
        ] {
            let f = answer(body, "m").unwrap_err();
            assert!(f.message.contains(field), "{body}: {}", f.message);
        }
    }
}
