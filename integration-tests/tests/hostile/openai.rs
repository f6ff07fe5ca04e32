use dispatch::{DispatchConfig, DispatchError};
use proptest::prelude::*;
use serde_json::{Value, json};

use crate::object_with;

const FIELDS: &[&str] = &[
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "n",
    "stream",
    "stream_options",
    "user",
];

fn config() -> DispatchConfig {
    DispatchConfig::new("d", service::JoinSecret::new("secret-0123456789abcdef").unwrap())
}

/// Fields a refusal may name: the body itself, or one of the request's fields.
fn named_field(e: &DispatchError) -> Option<String> {
    match e {
        DispatchError::Invalid { field, .. } => Some(field.clone()),
        _ => None,
    }
}

fn known(field: &str) -> bool {
    field == "body"
        || field == "input"
        || FIELDS.contains(&field)
        || field.starts_with("messages[")
        || field.starts_with("prompt[")
}

const EMBEDDING_FIELDS: &[&str] = &["model", "input", "encoding_format", "dimensions", "user"];

const RESPONSES_FIELDS: &[&str] = &[
    "model",
    "input",
    "instructions",
    "max_output_tokens",
    "temperature",
    "top_p",
    "stream",
    "tools",
    "previous_response_id",
];

/// Fields of the engines' `/tokenize` and `/detokenize` bodies (vLLM's, SGLang's, llama.cpp's).
const TOKENIZE_FIELDS: &[&str] =
    &["model", "prompt", "messages", "content", "tokens", "add_special_tokens", "with_pieces"];

/// Fields of a rerank body (vLLM's, SGLang's, llama.cpp's, Cohere's).
const RERANK_FIELDS: &[&str] = &["model", "query", "documents", "top_n", "return_documents"];

proptest! {
    /// Any rerank body is refused naming one of its fields (or the body), or accepted; never a
    /// panic. A well-formed one is accepted.
    #[test]
    fn any_rerank_body_is_accepted_or_refused_naming_a_field(
        body in prop_oneof![any::<String>(), object_with(RERANK_FIELDS).prop_map(|v| v.to_string())],
        query in "[a-z ]{1,40}",
        documents in proptest::collection::vec("[a-z ]{0,40}", 1..8),
        top_n in proptest::option::of(0..10u32),
    ) {
        if let Err(e) = dispatch::openai::check_rerank_body(&body, &config()) {
            let field = named_field(&e);
            prop_assert!(
                field.as_deref().is_some_and(|f| f == "body"
                    || RERANK_FIELDS.iter().any(|k| f == *k || f.starts_with(&format!("{k}[")))),
                "{:?} from {}", e, body
            );
        }
        let good = json!({ "model": "m", "query": query, "documents": documents, "top_n": top_n });
        prop_assert!(dispatch::openai::check_rerank_body(&good.to_string(), &config()).is_ok());
    }

    /// Any `/tokenize` or `/detokenize` body is refused naming one of its fields (or the body),
    /// or accepted; never a panic. A well-formed one is accepted.
    #[test]
    fn any_tokenize_body_is_accepted_or_refused_naming_a_field(
        body in prop_oneof![any::<String>(), object_with(TOKENIZE_FIELDS).prop_map(|v| v.to_string())],
        detokenize in any::<bool>(),
        text in "[a-z ]{0,40}",
        ids in proptest::collection::vec(0..u32::MAX, 0..20),
    ) {
        if let Err(e) = dispatch::openai::check_tokenize_body(&body, detokenize, &config()) {
            let field = named_field(&e);
            prop_assert!(
                field.as_deref().is_some_and(|f| f == "body"
                    || TOKENIZE_FIELDS.iter().any(|k| f == *k || f.starts_with(&format!("{k}[")))),
                "{:?} from {}", e, body
            );
        }
        for good in [json!({ "model": "m", "prompt": text }), json!({ "model": "m", "content": text })] {
            prop_assert!(dispatch::openai::check_tokenize_body(&good.to_string(), false, &config()).is_ok());
        }
        let chat = json!({ "model": "m", "messages": [{ "role": "user", "content": text }] });
        prop_assert!(dispatch::openai::check_tokenize_body(&chat.to_string(), false, &config()).is_ok());
        let back = json!({ "model": "m", "tokens": ids });
        prop_assert!(dispatch::openai::check_tokenize_body(&back.to_string(), true, &config()).is_ok());
    }

    /// Any embeddings body is refused naming one of its fields (or the body), or accepted;
    /// never a panic.
    #[test]
    fn any_embeddings_body_is_accepted_or_refused_naming_a_field(
        body in prop_oneof![any::<String>(), object_with(EMBEDDING_FIELDS).prop_map(|v| v.to_string())],
    ) {
        if let Err(e) = dispatch::openai::check_embeddings_body(&body, &config()) {
            let field = named_field(&e);
            prop_assert!(
                field.as_deref().is_some_and(|f| f == "body" || f == "prompt"
                    || EMBEDDING_FIELDS.iter().any(|k| f == *k || f.starts_with(&format!("{k}[")))),
                "{:?} from {}", e, body
            );
        }
    }

    /// Any Responses API body is refused naming one of its fields (or the body), or accepted;
    /// never a panic. A well-formed one is accepted.
    #[test]
    fn any_responses_body_is_accepted_or_refused_naming_a_field(
        body in prop_oneof![any::<String>(), object_with(RESPONSES_FIELDS).prop_map(|v| v.to_string())],
        text in "[a-z ]{1,40}",
        max in 1..4096u32,
    ) {
        if let Err(e) = dispatch::openai::check_responses_body(&body, &config()) {
            let field = named_field(&e);
            prop_assert!(
                field.as_deref().is_some_and(|f| f == "body" || RESPONSES_FIELDS.contains(&f)),
                "{:?} from {}", e, body
            );
        }
        let good = json!({ "model": "m", "input": text, "max_output_tokens": max, "stream": true });
        prop_assert!(dispatch::openai::check_responses_body(&good.to_string(), &config()).is_ok());
        let items = json!({ "model": "m", "input": [{ "role": "user", "content": text }] });
        prop_assert!(dispatch::openai::check_responses_body(&items.to_string(), &config()).is_ok());
    }

    /// Any body — arbitrary text, or an object built from the API's fields with values of
    /// any type — is refused naming a field, or accepted; never a panic.
    #[test]
    fn any_body_is_accepted_or_refused_naming_a_field(
        body in prop_oneof![any::<String>(), object_with(FIELDS).prop_map(|v| v.to_string())],
        chat in any::<bool>(),
    ) {
        if let Err(e) = dispatch::openai::check_body(chat, &body, &config()) {
            let field = named_field(&e);
            prop_assert!(field.as_deref().is_some_and(known), "{:?} from {}", e, body);
        }
    }

    /// Well-formed requests are accepted.
    #[test]
    fn well_formed_requests_are_accepted(
        model in "[a-z][a-z0-9./-]{0,40}",
        text in any::<String>(),
        max_tokens in 1..4096u32,
        temperature in 0.0..=2.0f32,
        top_p in 0.01..=1.0f32,
        stop in prop::collection::vec("[a-z]{1,5}", 0..4),
    ) {
        let c = config();
        let common = json!({ "model": model, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "stop": stop });
        let mut completion = common.clone();
        completion["prompt"] = Value::String(text.clone());
        prop_assert!(dispatch::openai::check_body(false, &completion.to_string(), &c).is_ok());
        let mut chat = common;
        chat["messages"] = json!([{ "role": "user", "content": text }]);
        prop_assert!(dispatch::openai::check_body(true, &chat.to_string(), &c).is_ok());
    }

    /// Several choices and batches of prompts (texts, token ids, lists of token ids), as
    /// OpenAI's API and vLLM take them, are accepted up to 128 choices in all, and refused
    /// past that by name.
    #[test]
    fn choices_and_batches_are_accepted_up_to_the_limit(
        prompts in prop::collection::vec(
            prop_oneof![
                "[a-z ]{1,20}".prop_map(Value::String),
                prop::collection::vec(0..50_000u32, 1..8).prop_map(|ids| json!(ids)),
            ],
            1..12,
        ),
        n in 1..40u32,
        chat in any::<bool>(),
    ) {
        let c = config();
        let body = if chat {
            json!({ "model": "m", "messages": [{ "role": "user", "content": "hi" }], "n": n })
        } else {
            json!({ "model": "m", "prompt": prompts, "n": n })
        };
        let choices = if chat { n } else { prompts.len() as u32 * n };
        let checked = dispatch::openai::check_body(chat, &body.to_string(), &c);
        if choices <= 128 {
            prop_assert!(checked.is_ok(), "{:?} from {}", checked, body);
        } else {
            let e = checked.unwrap_err();
            let named = named_field(&e);
            prop_assert_eq!(named.as_deref(), Some("prompt"), "{:?}", e);
            prop_assert!(e.to_string().contains(&format!("{choices} choices")), "{}", e);
        }
    }

    /// Out-of-range sampling parameters are refused by name.
    #[test]
    fn out_of_range_parameters_are_named(
        (field, value) in prop_oneof![
            (Just("temperature"), prop_oneof![-100.0..-0.001f64, 2.001..100.0f64]),
            (Just("top_p"), prop_oneof![-10.0..=0.0f64, 1.001..10.0f64]),
            (Just("max_tokens"), (100_000..10_000_000u32).prop_map(f64::from)),
            (Just("max_tokens"), (-1000.0..1000.0f64).prop_filter("not whole", |f| f.fract() != 0.0)),
            (Just("seed"), -1000.0..-1.0f64),
            (Just("n"), prop_oneof![Just(0.0), 129.0..100_000.0f64, -100.0..-1.0f64]),
        ],
    ) {
        let mut body = json!({ "model": "m", "prompt": "hi" });
        // Whole numbers as JSON integers, the rest as floats.
        body[field] = if value.fract() == 0.0 { json!(value as i64) } else { json!(value) };
        let e = dispatch::openai::check_body(false, &body.to_string(), &config()).unwrap_err();
        let named = named_field(&e);
        prop_assert_eq!(named.as_deref(), Some(field), "{:?}", e);
    }
}
