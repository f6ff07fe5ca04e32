//! The same kvstore suite as `tests/kvstore`, against a three-primary Redis Cluster created
//! with `redis-cli --cluster create` (shared by the run's test processes; each test has its own
//! namespace, so its own hash tag and slot).

#![allow(clippy::unwrap_used)]

/// The Redis this suite runs against.
pub type Redis = sllm_integration_tests::RedisCluster;

#[path = "../kvstore/common.rs"]
mod common;
pub use common::*;

#[path = "../kvstore/bad_input.rs"]
mod bad_input;
#[path = "../kvstore/demand.rs"]
mod demand;
#[path = "../kvstore/deployments.rs"]
mod deployments;
#[path = "../kvstore/instances.rs"]
mod instances;
#[path = "../kvstore/leader.rs"]
mod leader;
#[path = "../kvstore/model.rs"]
mod model;
#[path = "../kvstore/races.rs"]
mod races;
#[path = "../kvstore/ratelimit.rs"]
mod ratelimit;
#[path = "../kvstore/streams.rs"]
mod streams;
#[path = "../kvstore/workers.rs"]
mod workers;
