//! The kvstore against a real private redis-server: every transition's success path and every
//! refusal, races, streams, and bad input.

#![allow(clippy::unwrap_used)]

/// The Redis this suite runs against.
pub type Redis = sllm_integration_tests::RedisServer;

mod common;
pub use common::*;

mod bad_input;
mod batch;
mod demand;
mod deployments;
mod instances;
mod leader;
mod model;
mod races;
mod ratelimit;
mod streams;
mod workers;
