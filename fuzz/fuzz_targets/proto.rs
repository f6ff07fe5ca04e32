//! cargo-fuzz target: see `targets::proto`.
#![no_main]

// Each target uses one of the shared functions.
#[allow(dead_code)]
#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| targets::proto(bytes));
