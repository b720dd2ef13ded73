//! Flag types and parsers more than one command shares: durations, and the
//! Kafka producer flags (with their config-file keys).

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;

use crate::sink::kafka::{
    parse_property, KafkaConfig, KafkaFormat, DEFAULT_BUFFER_BYTES, DEFAULT_BUFFER_RECORDS,
    DEFAULT_FLUSH_TIMEOUT, DEFAULT_TOPIC,
};

/// Parses "15s", "500ms", "2m", "1h" or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 15s, 500ms, 2m"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1e3,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        other => {
            return Err(format!(
                "invalid duration unit {other:?} in {s:?}: use ms, s, m or h"
            ))
        }
    };
    if !secs.is_finite() || secs <= 0.0 {
        return Err(format!("duration {s:?} must be greater than zero"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A duration from a config file: its key named in the error.
pub fn file_duration(path: &Path, key: &str, v: Option<String>) -> Result<Option<Duration>> {
    v.map(|s| parse_duration(&s))
        .transpose()
        .map_err(|e| anyhow::anyhow!("{}: {key}: {e}", path.display()))
}

/// Kafka producer flags, shared by every command that writes to Kafka.
#[derive(Args, Debug, Default, Clone)]
pub struct KafkaArgs {
    /// Kafka bootstrap brokers; enables the Kafka sink.
    #[arg(long, value_name = "HOST:PORT[,HOST:PORT]")]
    pub kafka_brokers: Option<String>,
    /// Topic to write flows to. [default: flows]
    #[arg(long, value_name = "TOPIC")]
    pub kafka_topic: Option<String>,
    /// Message format: protobuf (goflow2 FlowMessage, proto/flow.proto) or
    /// json (the stdout JSON object). [default: protobuf]
    #[arg(long, value_name = "FORMAT")]
    pub kafka_format: Option<KafkaFormat>,
    /// Prefix each protobuf message with its varint length (goflow2's
    /// fixed-length framing) for tools that expect it.
    #[arg(long)]
    pub kafka_length_prefix: bool,
    /// A librdkafka property, e.g. -X compression.type=lz4 -X
    /// security.protocol=SASL_SSL (repeatable; applied after flowexport's
    /// defaults acks=all and message.timeout.ms=0).
    #[arg(short = 'X', value_name = "KEY=VALUE", value_parser = parse_property)]
    pub kafka_property: Vec<(String, String)>,
    /// Bound of records held while the broker does not acknowledge them;
    /// past it new records are dropped and counted. [default: 100000]
    #[arg(long, value_name = "N")]
    pub kafka_buffer_records: Option<usize>,
    /// Bound of bytes held the same way. [default: 268435456]
    #[arg(long, value_name = "BYTES")]
    pub kafka_buffer_bytes: Option<u64>,
    /// How long shutdown waits for the broker to acknowledge what is
    /// buffered. [default: 10s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub kafka_flush_timeout: Option<Duration>,
}

/// The Kafka keys of a config file (same names as the flags; `-X`
/// properties go in a `[kafka-properties]` table).
#[derive(Debug, Default)]
pub struct FileKafka {
    pub kafka_brokers: Option<String>,
    pub kafka_topic: Option<String>,
    pub kafka_format: Option<String>,
    pub kafka_length_prefix: Option<bool>,
    pub kafka_properties: Option<std::collections::BTreeMap<String, String>>,
    pub kafka_buffer_records: Option<usize>,
    pub kafka_buffer_bytes: Option<u64>,
    pub kafka_flush_timeout: Option<String>,
}

impl KafkaArgs {
    /// Flags over file over defaults; None when no brokers are configured.
    pub fn resolve(self, path: &Path, f: FileKafka) -> Result<Option<KafkaConfig>> {
        let Some(brokers) = self.kafka_brokers.or(f.kafka_brokers) else {
            return Ok(None);
        };
        if brokers.trim().is_empty() {
            bail!("--kafka-brokers is empty: give HOST:PORT[,HOST:PORT]");
        }
        let format = match (self.kafka_format, f.kafka_format) {
            (Some(x), _) => x,
            (None, Some(s)) => s
                .parse()
                .map_err(|e| anyhow::anyhow!("{}: kafka-format: {e}", path.display()))?,
            (None, None) => KafkaFormat::Protobuf,
        };
        let mut properties: Vec<(String, String)> =
            f.kafka_properties.unwrap_or_default().into_iter().collect();
        properties.extend(self.kafka_property);
        let buffer_records = self
            .kafka_buffer_records
            .or(f.kafka_buffer_records)
            .unwrap_or(DEFAULT_BUFFER_RECORDS);
        if buffer_records == 0 || buffer_records > 10_000_000 {
            bail!("--kafka-buffer-records must be between 1 and 10000000 (librdkafka's limit)");
        }
        let buffer_bytes = self
            .kafka_buffer_bytes
            .or(f.kafka_buffer_bytes)
            .unwrap_or(DEFAULT_BUFFER_BYTES);
        if buffer_bytes < 1024 {
            bail!("--kafka-buffer-bytes must be at least 1024");
        }
        Ok(Some(KafkaConfig {
            brokers,
            topic: self
                .kafka_topic
                .or(f.kafka_topic)
                .unwrap_or_else(|| DEFAULT_TOPIC.to_string()),
            format,
            length_prefix: self.kafka_length_prefix || f.kafka_length_prefix.unwrap_or(false),
            properties,
            buffer_records,
            buffer_bytes,
            flush_timeout: self
                .kafka_flush_timeout
                .or(file_duration(
                    path,
                    "kafka-flush-timeout",
                    f.kafka_flush_timeout,
                )?)
                .unwrap_or(DEFAULT_FLUSH_TIMEOUT),
        }))
    }
}
