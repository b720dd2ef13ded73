//! `cargo xtask bench kafka`: the Kafka path's speed, measured side by side
//! in one run.
//!
//! 1. Encoder alone: prost encoding of goflow2 FlowMessages, ns/record on
//!    one core.
//! 2. End to end into a local Tansu broker (SQLite storage, started here on a
//!    free loopback port): flowexport's Kafka sink with its default settings,
//!    beside a bare rdkafka producer sending the same pre-encoded messages
//!    (same sizes, same keys, same producer settings) to the same topic.
//!    Each side sends N records and waits until the broker acknowledged all
//!    of them; rounds alternate, and the best of each side is reported.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use flowexport::codec::protobuf;
use flowexport::record::FlowRecord;
use flowexport::sink::kafka::{
    protobuf_message, KafkaConfig, KafkaFormat, KafkaSink, DEFAULT_BUFFER_BYTES,
    DEFAULT_BUFFER_RECORDS,
};
use flowexport::sink::Sink;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};

use flowexport_benches::util::{base_flow, send_waiting};

const ENCODE_ITERS: usize = 5_000_000;
/// Below the sink's default buffer bound, so neither side drops anything.
const E2E_RECORDS: usize = 90_000;
const ROUNDS: usize = 2;

fn records(n: usize) -> Vec<FlowRecord> {
    (0..n)
        .map(|i| FlowRecord {
            time_received_ns: 1_763_800_000_000_000_000 + i as u64,
            sampler_address: Some("192.0.2.1".parse().unwrap()),
            time_flow_start_ns: 1_763_799_990_000_000_000 + i as u64 * 1000,
            time_flow_end_ns: 1_763_799_999_000_000_000 + i as u64 * 1000,
            bytes: 1_000 + (i as u64 * 7919) % 1_000_000,
            packets: 1 + (i as u64 * 31) % 1000,
            tcp_flags: if i % 4 == 0 { 0x1b } else { 0 },
            ..base_flow(i)
        })
        .collect()
}

fn bench_encoder() -> (f64, usize) {
    let recs = records(4096);
    let mut buf = Vec::with_capacity(256);
    let mut total = 0usize;
    let mut enc = protobuf::Encoder::default();
    // Warm up.
    for r in &recs {
        buf.clear();
        enc.encode(r, false, &mut buf);
    }
    let t = Instant::now();
    for i in 0..ENCODE_ITERS {
        buf.clear();
        enc.encode(&recs[i % recs.len()], false, &mut buf);
        total += buf.len();
    }
    let ns = t.elapsed().as_nanos() as f64 / ENCODE_ITERS as f64;
    (ns, total / ENCODE_ITERS)
}

fn sink_config(brokers: &str) -> KafkaConfig {
    KafkaConfig {
        brokers: brokers.to_string(),
        topic: "bench".into(),
        format: KafkaFormat::Protobuf,
        length_prefix: false,
        properties: Vec::new(),
        buffer_records: DEFAULT_BUFFER_RECORDS,
        buffer_bytes: DEFAULT_BUFFER_BYTES,
        flush_timeout: Duration::from_secs(120),
    }
}

/// flowexport's sink: batches of 1000 records, as drains hand them over.
fn run_sink(brokers: &str, recs: &[FlowRecord]) -> Result<f64> {
    let registry = prometheus::Registry::new();
    let mut sink = KafkaSink::new(sink_config(brokers), &registry)?;
    let t = Instant::now();
    for chunk in recs.chunks(1000) {
        sink.send(chunk)?;
    }
    sink.flush()?;
    let secs = t.elapsed().as_secs_f64();
    let get = |name: &str| {
        registry
            .gather()
            .iter()
            .find(|m| m.name() == name)
            .map_or(0.0, |m| m.get_metric()[0].get_counter().get_value())
    };
    let delivered = get("flowexport_kafka_records_delivered_total");
    if delivered as usize != recs.len() {
        bail!(
            "sink delivered {delivered} of {} (dropped {}, failed {})",
            recs.len(),
            get("flowexport_kafka_records_dropped_total"),
            get("flowexport_kafka_records_failed_total")
        );
    }
    Ok(recs.len() as f64 / secs)
}

/// A bare producer with the same settings, sending pre-encoded messages.
fn run_bare(brokers: &str, msgs: &[(Vec<u8>, Vec<u8>)]) -> Result<f64> {
    let p: ThreadedProducer<_> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .set("message.timeout.ms", "0")
        .set(
            "queue.buffering.max.messages",
            DEFAULT_BUFFER_RECORDS.to_string(),
        )
        .set(
            "queue.buffering.max.kbytes",
            (DEFAULT_BUFFER_BYTES / 1024).to_string(),
        )
        .create()?;
    let t = Instant::now();
    for (k, v) in msgs {
        send_waiting(&p, BaseRecord::to("bench").key(&k[..]).payload(&v[..]));
    }
    p.flush(Duration::from_secs(120))?;
    Ok(msgs.len() as f64 / t.elapsed().as_secs_f64())
}

fn main() -> Result<()> {
    let (ns, size) = bench_encoder();
    println!("## Kafka benchmark\n");
    println!("| stage | result |");
    println!("| --- | --- |");
    println!(
        "| encoder (prost FlowMessage, {size}-byte messages, 1 core) | {ns:.1} ns/record = {:.2} M records/s |",
        1e3 / ns
    );
    let tansu = flowexport_benches::tansu("bench")?;
    let brokers = tansu.addr();
    let recs = records(E2E_RECORDS);
    let msgs: Vec<(Vec<u8>, Vec<u8>)> = recs.iter().map(protobuf_message).collect();
    // A first small round warms the broker's storage.
    run_bare(&brokers, &msgs[..5000])?;
    let (mut bare, mut ours) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        bare.push(run_bare(&brokers, &msgs)?);
        ours.push(run_sink(&brokers, &recs)?);
    }
    let best = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    println!(
        "| bare rdkafka producer, pre-encoded, {E2E_RECORDS} records x {ROUNDS} (records/s, each round) | {} |",
        bare.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(", ")
    );
    println!(
        "| flowexport Kafka sink, default settings, {E2E_RECORDS} records x {ROUNDS} (records/s, each round) | {} |",
        ours.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(", ")
    );
    println!(
        "| end to end: sink / bare (best of each) | {:.0}% |",
        100.0 * best(&ours) / best(&bare)
    );
    Ok(())
}
