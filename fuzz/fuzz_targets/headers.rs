//! cargo-fuzz target: see `targets::headers`.
#![no_main]

// Each target uses one of the shared functions.
#[allow(dead_code)]
#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|b: &[u8]| targets::headers(b));
