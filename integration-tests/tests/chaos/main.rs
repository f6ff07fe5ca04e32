//! Chaos: a mesh of real `sllm` processes (two of each service, six simulated workers) under a
//! steady load of streamed generations, while the test SIGKILLs workers and services and crashes
//! Redis. Each test prints a ledger; a request that never reached an end is lost, and lost must
//! be 0.

#![allow(clippy::unwrap_used)]

mod churn;
mod load;
mod mesh;
mod processes;
mod redis_restart;
