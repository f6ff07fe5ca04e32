//! Reranking as the simulator answers it, in vLLM's `/v1/rerank` shape: each document scored by
//! how many of the query's words it holds (its share of them, 0 to 1), the best first, `top_n`
//! of them. Nothing about meaning is simulated, but a document that repeats the query ranks
//! above one that does not, so tests can tell an answer from a shuffled one. A field the
//! simulator cannot honour is refused by name.

use std::collections::HashSet;

use serde_json::{Value, json};

use crate::backend::Failure;

/// Fields of a rerank body the simulator honours.
const FIELDS: &[&str] = &["model", "query", "documents", "top_n", "return_documents", "user"];

fn words(text: &str) -> HashSet<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// Answers a rerank `body` for `model` with the answer's `id`: the response body and the
/// tokens it read (a token a word, as the simulator counts prompts).
pub fn answer(body: &str, model: &str, id: &str) -> Result<(String, u32), Failure> {
    let map = &crate::sim::honoured(body, FIELDS)?;
    let query = map
        .get("query")
        .and_then(Value::as_str)
        .ok_or_else(|| Failure::unsupported("query", "must be a text"))?;
    let items = map
        .get("documents")
        .and_then(Value::as_array)
        .ok_or_else(|| Failure::unsupported("documents", "must be a list of texts"))?;
    let mut documents = Vec::with_capacity(items.len());
    for (i, d) in items.iter().enumerate() {
        let text =
            d.as_str().or_else(|| d.get("text").and_then(Value::as_str)).ok_or_else(|| {
                Failure::unsupported(&format!("documents[{i}]"), "must be a text or {\"text\": …}")
            })?;
        documents.push(text);
    }
    let top_n = match map.get("top_n") {
        None | Some(Value::Null) => 0,
        Some(n) => n.as_u64().ok_or_else(|| {
            Failure::unsupported("top_n", format!("must be a whole number, got {n}"))
        })?,
    };
    let with_documents = match map.get("return_documents") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            return Err(Failure::unsupported(
                "return_documents",
                format!("must be true or false, got {v}"),
            ));
        }
    };
    let asked = words(query);
    let mut scored: Vec<(usize, f64)> = documents
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let held = words(d).intersection(&asked).count();
            (i, held as f64 / asked.len().max(1) as f64)
        })
        .collect();
    // The best first; equal scores in the documents' order.
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if top_n > 0 {
        scored.truncate(top_n as usize);
    }
    let results: Vec<Value> = scored
        .iter()
        .map(|&(i, score)| {
            let document =
                if with_documents { json!({ "text": documents[i] }) } else { Value::Null };
            json!({ "index": i, "document": document, "relevance_score": score })
        })
        .collect();
    let tokens = documents.iter().map(|d| d.split_whitespace().count()).sum::<usize>()
        + query.split_whitespace().count();
    let body = json!({
        "id": id,
        "model": model,
        "usage": { "prompt_tokens": tokens, "total_tokens": tokens },
        "results": results,
    });
    Ok((body.to_string(), tokens as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranked(body: Value) -> Value {
        serde_json::from_str(&answer(&body.to_string(), "m", "rerank-1").unwrap().0).unwrap()
    }

    #[test]
    fn the_documents_holding_the_query_rank_first() {
        let v = ranked(json!({
            "model": "m",
            "query": "What is a fox?",
            "documents": ["Paris is a city", "A fox is an animal", {"text": "hello"}],
        }));
        let order: Vec<u64> =
            v["results"].as_array().unwrap().iter().map(|r| r["index"].as_u64().unwrap()).collect();
        assert_eq!(order, [1, 0, 2], "{v}");
        assert_eq!(v["results"][0]["document"]["text"], "A fox is an animal");
        assert_eq!(v["results"][0]["relevance_score"], 0.75, "3 of the query's 4 words");
        assert_eq!(v["results"][1]["relevance_score"], 0.5);
        assert_eq!(v["results"][2]["relevance_score"], 0.0);
        assert_eq!((v["id"].as_str(), v["model"].as_str()), (Some("rerank-1"), Some("m")));
        assert_eq!(v["usage"]["total_tokens"], 4 + 4 + 5 + 1);
        assert_eq!(v["usage"]["prompt_tokens"], v["usage"]["total_tokens"]);
        let v = ranked(json!({
            "query": "fox",
            "documents": ["a", "fox", "b"],
            "top_n": 1,
            "return_documents": false,
        }));
        assert_eq!(v["results"].as_array().unwrap().len(), 1);
        assert_eq!(v["results"][0]["index"], 1);
        assert!(v["results"][0]["document"].is_null(), "{v}");
    }

    #[test]
    fn what_it_cannot_do_is_refused_by_name() {
        for (body, field) in [
            (
                json!({"query": "q", "documents": ["a"], "max_chunks_per_doc": 2}),
                "max_chunks_per_doc",
            ),
            (json!({"documents": ["a"]}), "query"),
            (json!({"query": "q", "documents": "a"}), "documents"),
            (json!({"query": "q", "documents": ["a", 7]}), "documents[1]"),
            (json!({"query": "q", "documents": ["a"], "top_n": -1}), "top_n"),
            (
                json!({"query": "q", "documents": ["a"], "return_documents": "yes"}),
                "return_documents",
            ),
        ] {
            let e = answer(&body.to_string(), "m", "r").unwrap_err();
            assert!(e.message.starts_with(&format!("invalid {field}:")), "{field}: {}", e.message);
        }
    }
}
