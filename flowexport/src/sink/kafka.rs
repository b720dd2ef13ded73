//! Kafka sink: one message per flow record (goflow2 protobuf or JSON), keyed
//! so that both directions of a conversation land on the same partition.
//!
//! Delivery is at-least-once: a record counts as delivered only when the
//! broker acknowledged it (`acks=all` by default). librdkafka keeps records
//! in its queue and retries them until they are delivered
//! (`message.timeout.ms=0`, i.e. no give-up time, by default), so a broker
//! outage costs nothing as long as the queue bound (`--kafka-buffer-records`,
//! `--kafka-buffer-bytes`) holds; past the bound, new records are dropped and
//! counted. When a request fails with an error that may pass (a broker error
//! code librdkafka does not retry by itself, say), the record is produced
//! again from the next batch on. A record that fails for good (a message too
//! large, an authorization error) is counted and logged. At shutdown the
//! producer is flushed, bounded by `--kafka-flush-timeout`.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntGauge, Registry};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};

use super::{Sink, SinkError};
use crate::codec::protobuf;
use crate::kafka::delivery::{Accounting, Deliveries};
use crate::rate_limited_log::RateLimitedLog;
use crate::record::FlowRecord;

/// Message encoding on the topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KafkaFormat {
    /// goflow2's FlowMessage (proto/flow.proto).
    Protobuf,
    /// The same JSON object as the stdout sink.
    Json,
}

from_keywords!(KafkaFormat, "Kafka format", { "protobuf" | "pb" => Protobuf, "json" => Json });

pub const DEFAULT_TOPIC: &str = "flows";
pub const DEFAULT_BUFFER_RECORDS: usize = 100_000;
pub const DEFAULT_BUFFER_BYTES: u64 = 256 << 20;
pub const DEFAULT_FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// Resolved settings of the Kafka sink.
#[derive(Clone, Debug)]
pub struct KafkaConfig {
    pub brokers: String,
    pub topic: String,
    pub format: KafkaFormat,
    pub length_prefix: bool,
    /// librdkafka properties (`-X key=value`), applied after our defaults.
    pub properties: Vec<(String, String)>,
    pub buffer_records: usize,
    pub buffer_bytes: u64,
    pub flush_timeout: Duration,
}

/// Parses `key=value` (as `-X` takes it).
pub(crate) fn parse_property(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!(
            "invalid -X {s:?}: expected KEY=VALUE (a librdkafka property)"
        )),
    }
}

/// The message key: the two addresses in ascending order, so both directions
/// of a conversation hash to the same partition (and so keep their order
/// relative to each other). 8 bytes for IPv4, 32 for IPv6.
pub(crate) fn message_key(r: &FlowRecord, out: &mut Vec<u8>) {
    fn push(a: &IpAddr, out: &mut Vec<u8>) {
        match a {
            IpAddr::V4(v4) => out.extend_from_slice(&v4.octets()),
            IpAddr::V6(v6) => out.extend_from_slice(&v6.octets()),
        }
    }
    out.clear();
    let (lo, hi) = if r.src_addr <= r.dst_addr {
        (&r.src_addr, &r.dst_addr)
    } else {
        (&r.dst_addr, &r.src_addr)
    };
    push(lo, out);
    push(hi, out);
}

/// One record as the Kafka sink writes it with `--kafka-format protobuf`
/// and no length prefix: (key, payload). For callers that want owned
/// messages (tests, benchmarks); the sink itself reuses its buffers.
pub fn protobuf_message(r: &FlowRecord) -> (Vec<u8>, Vec<u8>) {
    let (mut key, mut payload) = (Vec::new(), Vec::new());
    message_key(r, &mut key);
    protobuf::encode(r, false, &mut payload);
    (key, payload)
}

/// Kafka sink metrics (registered in the agent's registry).
#[derive(Clone)]
pub struct KafkaMetrics {
    pub produced: IntCounter,
    pub delivered: IntCounter,
    pub failed: IntCounter,
    pub dropped: IntCounter,
    pub retried: IntCounter,
    pub buffered: IntGauge,
    pub queue_length: IntGauge,
}

impl KafkaMetrics {
    pub fn new(r: &Registry) -> KafkaMetrics {
        let c = |name: &str, help: &str| crate::metrics::counter(r, name, help);
        let g = |name: &str, help: &str| crate::metrics::gauge(r, name, help);
        KafkaMetrics {
            produced: c(
                "flowexport_kafka_records_produced_total",
                "Records handed to the Kafka producer.",
            ),
            delivered: c(
                "flowexport_kafka_records_delivered_total",
                "Records the broker acknowledged.",
            ),
            failed: c(
                "flowexport_kafka_records_failed_total",
                "Records that failed for good (after librdkafka's retries), or were still undelivered at shutdown.",
            ),
            dropped: c(
                "flowexport_kafka_records_dropped_total",
                "Records dropped because the producer buffer was at its bound (--kafka-buffer-records/-bytes).",
            ),
            retried: c(
                "flowexport_kafka_records_retried_total",
                "Records produced again after a delivery error that may pass.",
            ),
            buffered: g(
                "flowexport_kafka_records_buffered",
                "Records produced but not yet acknowledged or failed.",
            ),
            queue_length: g(
                "flowexport_kafka_producer_queue_length",
                "Messages and requests in librdkafka's queues (rd_kafka_outq_len).",
            ),
        }
    }
}

/// The partition ids of `topic` in fetched metadata; None when the topic is
/// missing, carries an error, or has no partitions.
pub(crate) fn topic_partitions(md: &rdkafka::metadata::Metadata, topic: &str) -> Option<Vec<i32>> {
    let t = md.topics().iter().find(|t| t.name() == topic)?;
    (t.error().is_none() && !t.partitions().is_empty()).then(|| {
        t.partitions()
            .iter()
            .map(rdkafka::metadata::MetadataPartition::id)
            .collect()
    })
}

/// The Kafka sink's accounting of deliveries: buffered records leave the
/// buffer when delivered or failed for good; a retry stays buffered.
pub struct SinkAccounting {
    metrics: KafkaMetrics,
}

impl Accounting for SinkAccounting {
    fn delivered(&self, _: usize) {
        self.metrics.buffered.dec();
        self.metrics.delivered.inc();
    }

    fn failed(&self, _: usize) {
        self.metrics.buffered.dec();
        self.metrics.failed.inc();
    }

    fn retrying(&self, _: usize) {}
}

/// The Kafka sink. [`KafkaSink::handle`] gives more senders over the same
/// producer (one per collector worker: no lock between them); each has its
/// own encoding buffers.
pub struct KafkaSink {
    producer: Arc<ThreadedProducer<Deliveries<SinkAccounting>>>,
    cfg: Arc<KafkaConfig>,
    metrics: KafkaMetrics,
    encoder: protobuf::Encoder,
    payload: Vec<u8>,
    key: Vec<u8>,
    drop_log: Arc<RateLimitedLog>,
}

#[derive(Debug, thiserror::Error)]
pub enum KafkaSinkError {
    #[error("invalid Kafka producer configuration (check -X properties): {0}")]
    Config(KafkaError),
}

impl KafkaSink {
    /// Creates the producer. Bad properties are an error; unreachable brokers
    /// or a missing topic are only logged (records wait in the buffer).
    pub fn new(cfg: KafkaConfig, registry: &Registry) -> Result<KafkaSink, KafkaSinkError> {
        let metrics = KafkaMetrics::new(registry);
        let cc = crate::kafka::client::client_config(
            &cfg.brokers,
            &[
                ("acks", "all".into()),
                ("message.timeout.ms", "0".into()),
                (
                    "queue.buffering.max.messages",
                    cfg.buffer_records.to_string(),
                ),
                (
                    "queue.buffering.max.kbytes",
                    (cfg.buffer_bytes / 1024).max(1).to_string(),
                ),
            ],
            &cfg.properties,
            &[],
        );
        let producer: ThreadedProducer<Deliveries<SinkAccounting>> = cc
            .create_with_context(Deliveries::new(SinkAccounting {
                metrics: metrics.clone(),
            }))
            .map_err(KafkaSinkError::Config)?;
        let sink = KafkaSink {
            producer: Arc::new(producer),
            cfg: Arc::new(cfg),
            metrics,
            encoder: protobuf::Encoder::default(),
            payload: Vec::with_capacity(512),
            key: Vec::with_capacity(32),
            drop_log: Arc::new(RateLimitedLog::with_target(module_path!())),
        };
        sink.check_reachable();
        Ok(sink)
    }

    /// Another sender over the same producer, buffer and metrics.
    pub fn handle(&self) -> KafkaSink {
        KafkaSink {
            producer: self.producer.clone(),
            cfg: self.cfg.clone(),
            metrics: self.metrics.clone(),
            encoder: protobuf::Encoder::default(),
            payload: Vec::with_capacity(512),
            key: Vec::with_capacity(32),
            drop_log: self.drop_log.clone(),
        }
    }

    /// Logs, once at start, whether the brokers answer and the topic exists.
    fn check_reachable(&self) {
        let topic = self.cfg.topic.as_str();
        match self
            .producer
            .client()
            .fetch_metadata(Some(topic), Duration::from_secs(5))
        {
            Err(e) => log::warn!(
                "cannot reach Kafka brokers {} ({e}); flowexport keeps running and buffers up to \
                 {} records / {} bytes for topic {topic} until they answer",
                self.cfg.brokers,
                self.cfg.buffer_records,
                self.cfg.buffer_bytes
            ),
            Ok(md) => match topic_partitions(&md, topic) {
                Some(p) => log::info!(
                    "Kafka sink: topic {topic} on {} ({} partitions)",
                    self.cfg.brokers,
                    p.len()
                ),
                None => log::warn!(
                    "Kafka topic {topic} does not exist on {} (or has no partitions); create it, \
                     records are buffered meanwhile",
                    self.cfg.brokers
                ),
            },
        }
    }
}

impl KafkaSink {
    /// Produces the records queued for another attempt; returns how many
    /// were dropped because the buffer is full.
    fn produce_retries(&mut self) -> u64 {
        let retries = self.producer.context().take_retries();
        let mut dropped = 0;
        for r in retries {
            let rec = BaseRecord::with_opaque_to(&self.cfg.topic, 0)
                .key(&r.key[..])
                .payload(&r.payload[..]);
            match self.producer.send(rec) {
                Ok(()) => self.metrics.retried.inc(),
                Err(_) => {
                    self.metrics.buffered.dec();
                    dropped += 1;
                }
            }
        }
        dropped
    }
}

impl Sink for KafkaSink {
    fn name(&self) -> &'static str {
        "kafka"
    }

    fn send(&mut self, records: &[FlowRecord]) -> Result<(), SinkError> {
        let mut dropped = self.produce_retries();
        for r in records {
            self.payload.clear();
            match self.cfg.format {
                KafkaFormat::Protobuf => {
                    self.encoder
                        .encode(r, self.cfg.length_prefix, &mut self.payload);
                }
                KafkaFormat::Json => crate::codec::json::write_record(&mut self.payload, r),
            }
            message_key(r, &mut self.key);
            let rec = BaseRecord::with_opaque_to(&self.cfg.topic, 0)
                .key(&self.key[..])
                .payload(&self.payload[..]);
            match self.producer.send(rec) {
                Ok(()) => {
                    self.metrics.produced.inc();
                    self.metrics.buffered.inc();
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    dropped += 1;
                }
                Err((e, _)) => {
                    self.metrics.failed.inc();
                    self.drop_log
                        .error(|| format!("Kafka producer refused a record: {e}"));
                }
            }
        }
        self.metrics
            .queue_length
            .set(self.producer.in_flight_count() as i64);
        if dropped > 0 {
            self.metrics.dropped.inc_by(dropped);
            self.drop_log.error(|| {
                format!(
                    "Kafka buffer full ({} records / {} bytes): dropped {dropped} records; \
                     is the broker down?",
                    self.cfg.buffer_records, self.cfg.buffer_bytes
                )
            });
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        let t = self.cfg.flush_timeout;
        let deadline = Instant::now() + t;
        let mut flushed = false;
        while Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            flushed = self
                .producer
                .flush(left.min(Duration::from_millis(500)))
                .is_ok();
            let retries = self.producer.context().retries_waiting();
            if flushed && retries == 0 {
                break;
            }
            let dropped = self.produce_retries();
            self.metrics.dropped.inc_by(dropped);
            flushed = false;
        }
        if !flushed {
            let left = self.metrics.buffered.get().max(0) as u64;
            self.metrics.failed.inc_by(left);
            log::error!(
                "Kafka: {left} records not acknowledged within --kafka-flush-timeout ({t:?}); \
                 they are lost"
            );
        } else {
            log::info!(
                "Kafka: flushed; {} records delivered in total",
                self.metrics.delivered.get()
            );
        }
        self.metrics
            .queue_length
            .set(self.producer.in_flight_count() as i64);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::FlowType;

    fn rec(src: &str, dst: &str) -> FlowRecord {
        FlowRecord {
            flow_type: FlowType::Ebpf,
            time_received_ns: 1,
            sequence_num: 0,
            sampling_rate: 0,
            sampler_address: None,
            time_flow_start_ns: 1,
            time_flow_end_ns: 1,
            bytes: 100,
            packets: 1,
            src_addr: src.parse().unwrap(),
            dst_addr: dst.parse().unwrap(),
            etype: 0x800,
            proto: 17,
            src_port: 1,
            dst_port: 2,
            in_if: 1,
            out_if: 0,
            vlan_id: 0,
            tcp_flags: 0,
            flow_direction: 0,
            ..FlowRecord::default()
        }
    }

    #[test]
    fn both_directions_share_a_key() {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        message_key(&rec("10.0.0.9", "10.0.0.1"), &mut a);
        message_key(&rec("10.0.0.1", "10.0.0.9"), &mut b);
        assert_eq!(a, b);
        assert_eq!(a, vec![10, 0, 0, 1, 10, 0, 0, 9]);
        message_key(&rec("2001:db8::2", "2001:db8::1"), &mut a);
        assert_eq!(a.len(), 32);
        assert_eq!(a[15], 1);
    }

    #[test]
    fn properties_parse() {
        assert_eq!(
            parse_property("compression.type=lz4").unwrap(),
            ("compression.type".into(), "lz4".into())
        );
        assert_eq!(
            parse_property("sasl.password=a=b").unwrap(),
            ("sasl.password".into(), "a=b".into())
        );
        assert!(parse_property("novalue").is_err());
        assert!(parse_property("=x").is_err());
    }

    #[test]
    fn bad_property_is_a_clear_error() {
        let cfg = KafkaConfig {
            brokers: "127.0.0.1:1".into(),
            topic: "t".into(),
            format: KafkaFormat::Protobuf,
            length_prefix: false,
            properties: vec![("no.such.property".into(), "1".into())],
            buffer_records: 10,
            buffer_bytes: 1 << 20,
            flush_timeout: Duration::from_secs(1),
        };
        let err = KafkaSink::new(cfg, &Registry::new())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("no.such.property"), "{err}");
        assert!(err.contains("-X"), "{err}");
    }
}
