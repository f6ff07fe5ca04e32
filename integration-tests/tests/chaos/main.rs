//! Chaos: a mesh of real `sllm` processes (two of each service, six simulated workers) under a
//! steady load of streamed generations, while the test SIGKILLs workers and services and crashes
//! Redis, or stops them with SIGTERM the way Kubernetes does (`graceful`). Each test prints a
//! ledger; a request that never reached an end is lost, and lost must be 0.

#![allow(clippy::unwrap_used)]

mod churn;
mod graceful;
mod load;
mod mesh;
mod processes;
mod redis_restart;
