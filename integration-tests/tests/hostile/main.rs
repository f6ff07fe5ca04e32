//! Hostile input: property tests (proptest) on every parser and validator that user input
//! reaches — names that become Redis keys, ServerlessLLM deploy JSON, OpenAI request bodies,
//! protobuf fields, the `grpc-timeout`, `traceparent` and `authorization` headers — checking
//! that nothing panics, that every refusal names its field, and that what is accepted is what
//! the rules allow. The fuzz targets in `fuzz/` drive the same
//! functions with coverage guidance.

#![allow(clippy::unwrap_used)]

mod corpus;
mod deploy_json;
mod headers;
mod names;
mod openai;
mod proto;

use proptest::prelude::*;
use serde_json::Value;

/// Any JSON value, nested a few levels, with the awkward numbers and strings included.
pub fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        any::<String>().prop_map(Value::String),
        "[a-z_]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{0,12}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A JSON object whose keys are drawn mostly from `fields`, with values of any type.
pub fn object_with(fields: &'static [&'static str]) -> impl Strategy<Value = Value> {
    let key = prop_oneof![4 => prop::sample::select(fields).prop_map(str::to_string), 1 => "[a-z_]{1,10}"];
    prop::collection::btree_map(key, json(), 0..8)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
}
