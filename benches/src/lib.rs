//! What the benchmark binaries (`src/bin/`, run by `cargo xtask bench`)
//! share: a Tansu broker on loopback, a process's CPU time, and sending to
//! Kafka while the producer's queue is full. The scale benchmarks
//! (`src/main.rs`: churn, peers) run on the integration tests' harness.
pub mod tansu;
pub mod util;
