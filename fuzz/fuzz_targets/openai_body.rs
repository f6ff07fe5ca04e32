//! cargo-fuzz target: see `targets::openai_body`.
#![no_main]

// Each target uses one of the shared functions.
#[allow(dead_code)]
#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|s: &str| targets::openai_body(s));
