//! What the benchmark binaries (`src/bin/`, run by `cargo xtask bench`)
//! share: a Tansu broker on loopback, a process's CPU time, and sending to
//! Kafka while the producer's queue is full. The scale benchmarks
//! (`src/main.rs`: churn, peers) run on the integration tests' harness.
pub mod util;

/// The kernel object built with the benchmark-only programs (feature
/// `bench`), which `cargo xtask bench xdp|peers` builds: `bench xdp`'s
/// programs and the floor programs of `bench peers`' baselines.
pub const BENCH_OBJECT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../target/ebpf-bench/bpfel-unknown-none/release/flowexport"
);

/// A Tansu broker on the host's loopback with `topic` (1 partition): the
/// tests' broker (`flowexport_tests::kafka::Broker`), outside a namespace.
pub fn tansu(topic: &str) -> anyhow::Result<flowexport_tests::kafka::Broker> {
    let b = flowexport_tests::kafka::Broker::start_host()?;
    b.create_topic(topic, 1)?;
    Ok(b)
}
