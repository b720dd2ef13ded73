//! What the commands' settings are made of: each command declares its
//! settings once, as one struct that carries both its flags (clap) and its
//! config-file keys (serde, the flag names without `--`), and
//! `layered!` gives it `over`: the command line over the file. Also the
//! value types whose config-file text is their flag's (durations and the
//! keyword enums: no serde attribute on their fields), the parsers more
//! than one command shares and the Kafka producer settings.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Deserialize;

use crate::capture::afxdp::{Decap, Queues, ZeroCopy};
use crate::capture::loader::{Capture, XdpModeChoice};
use crate::sink::kafka::{
    parse_property, KafkaConfig, KafkaFormat, DEFAULT_BUFFER_BYTES, DEFAULT_BUFFER_RECORDS,
    DEFAULT_FLUSH_TIMEOUT, DEFAULT_TOPIC,
};

/// A value from the command line over one from a config file.
pub trait Layer {
    /// `self` (flags) over `lower` (the file).
    fn over(self, lower: Self) -> Self;
}

/// A set flag wins.
impl<T> Layer for Option<T> {
    fn over(self, lower: Self) -> Self {
        self.or(lower)
    }
}

/// Repeated flags replace the file's list.
impl<T> Layer for Vec<T> {
    fn over(self, lower: Self) -> Self {
        if self.is_empty() {
            lower
        } else {
            self
        }
    }
}

/// A switch is on when either turns it on.
impl Layer for bool {
    fn over(self, lower: Self) -> Self {
        self || lower
    }
}

/// A table only the file sets (e.g. `[kafka-properties]`).
impl<K: Ord, V> Layer for BTreeMap<K, V> {
    fn over(self, lower: Self) -> Self {
        if self.is_empty() {
            lower
        } else {
            self
        }
    }
}

/// Declares a settings struct once, with its clap and serde attributes on
/// each field, and implements [`Layer`] for it field by field: a new
/// setting is one field, its flag and its config key together.
macro_rules! layered {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$fmeta:meta])* pub $field:ident : $ty:ty ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty ),*
        }

        impl $crate::cmd::flags::Layer for $name {
            fn over(self, lower: Self) -> Self {
                $name {
                    $( $field: $crate::cmd::flags::Layer::over(self.$field, lower.$field) ),*
                }
            }
        }
    };
}
pub(crate) use layered;

/// Reads a config file for settings split over several structs (a
/// command's own and flattened ones such as [`KafkaArgs`]): each part reads
/// the keys it knows, with the line of a bad value in its error; a key no
/// part knows is an error.
pub struct ConfigFile {
    path: std::path::PathBuf,
    text: String,
    /// Top-level keys each part read so far left unread.
    unread: Option<BTreeSet<String>>,
}

impl ConfigFile {
    pub fn read(path: &Path) -> Result<ConfigFile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Ok(ConfigFile {
            path: path.to_path_buf(),
            text,
            unread: None,
        })
    }

    /// One part's settings from the file.
    pub fn part<T: serde::de::DeserializeOwned>(&mut self) -> Result<T> {
        let mut unread = BTreeSet::new();
        let t = serde_ignored::deserialize(toml::Deserializer::new(&self.text), |key| {
            unread.insert(key.to_string());
        })
        .with_context(|| format!("invalid config file {}", self.path.display()))?;
        self.unread = Some(match self.unread.take() {
            Some(before) => before.intersection(&unread).cloned().collect(),
            None => unread,
        });
        Ok(t)
    }

    /// Fails on a key that no part read.
    pub fn finish(self) -> Result<()> {
        if let Some(key) = self.unread.unwrap_or_default().into_iter().next() {
            bail!(
                "invalid config file {}: unknown field `{key}` (keys are the flags' names \
                 without --, as `flowexport agent --help` lists them)",
                self.path.display()
            );
        }
        Ok(())
    }
}

/// serde readers for config values given as text, with the flags' parsers
/// and messages.
pub mod de {
    use std::fmt::Display;
    use std::str::FromStr;

    use serde::de::{Error, Visitor};
    use serde::{Deserialize, Deserializer};

    /// A value as its flag's text: a string, or a number written as one
    /// (`idle-timeout = 15` is `--idle-timeout 15`, `afxdp-queues = 0` is
    /// `--afxdp-queues 0`).
    fn text<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        struct Text;
        impl Visitor<'_> for Text {
            type Value = String;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string or a number")
            }
            fn visit_str<E: Error>(self, v: &str) -> Result<String, E> {
                Ok(v.to_string())
            }
            fn visit_i64<E: Error>(self, v: i64) -> Result<String, E> {
                Ok(v.to_string())
            }
            fn visit_u64<E: Error>(self, v: u64) -> Result<String, E> {
                Ok(v.to_string())
            }
            fn visit_f64<E: Error>(self, v: f64) -> Result<String, E> {
                Ok(v.to_string())
            }
        }
        d.deserialize_any(Text)
    }

    /// Any value whose flag is parsed with `FromStr` (see
    /// `deserialize_from_str!`).
    pub(crate) fn parsed<'de, D, T>(d: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: FromStr,
        T::Err: Display,
    {
        text(d)?.parse().map_err(D::Error::custom)
    }

    /// `ADDR:PORT`.
    pub(crate) fn socket_addr<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<std::net::SocketAddr>, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map(Some)
            .map_err(|_| D::Error::custom(format!("{s:?}: expected ADDR:PORT")))
    }
}

/// Implements `Deserialize` for the value types of flags through their
/// `FromStr`: a config-file key reads the same text as its flag (a TOML
/// string, or a number written as one), with the same error, and a field
/// of one of these types needs no serde attribute.
macro_rules! deserialize_from_str {
    ($($ty:ty),+ $(,)?) => {
        $(impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                de::parsed(d)
            }
        })+
    };
}

deserialize_from_str!(
    Capture,
    XdpModeChoice,
    Queues,
    ZeroCopy,
    Decap,
    KafkaFormat,
    HumanDuration
);

/// A duration flag's value, as `parse_duration` reads it: "15s",
/// "500ms", "2m", "1h" or a bare number of seconds, on the command line and
/// in the config file alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_duration(s).map(HumanDuration)
    }
}

impl From<HumanDuration> for Duration {
    fn from(d: HumanDuration) -> Duration {
        d.0
    }
}

/// Parses "15s", "500ms", "2m", "1h" or a bare number of seconds.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
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

layered! {
/// Kafka producer settings, shared by every command that writes to Kafka
/// (flags; in the agent's config file the same names, and `-X` properties
/// in a `[kafka-properties]` table).
#[derive(Args, Deserialize, Debug, Default, Clone)]
#[serde(default, rename_all = "kebab-case")]
pub struct KafkaArgs {
    /// Kafka bootstrap brokers; enables the Kafka sink (the other Kafka
    /// settings without it are an error).
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
    #[serde(skip)]
    pub kafka_property: Vec<(String, String)>,
    /// The config file's `[kafka-properties]` table (applied before -X).
    #[arg(skip)]
    pub kafka_properties: BTreeMap<String, String>,
    /// Bound of records held while the broker does not acknowledge them;
    /// past it new records are dropped and counted. [default: 100000]
    #[arg(long, value_name = "N")]
    pub kafka_buffer_records: Option<usize>,
    /// Bound of bytes held the same way. [default: 268435456]
    #[arg(long, value_name = "BYTES")]
    pub kafka_buffer_bytes: Option<u64>,
    /// How long shutdown waits for the broker to acknowledge what is
    /// buffered. [default: 10s]
    #[arg(long, value_name = "DURATION")]
    pub kafka_flush_timeout: Option<HumanDuration>,
}
}

impl KafkaArgs {
    /// Defaults and validation; None when no brokers are configured.
    pub fn resolve(self) -> Result<Option<KafkaConfig>> {
        let Some(brokers) = self.kafka_brokers else {
            // A Kafka setting without brokers would be ignored: records
            // would go elsewhere (stdout) while the operator expects Kafka.
            let given = [
                ("--kafka-topic", self.kafka_topic.is_some()),
                ("--kafka-format", self.kafka_format.is_some()),
                ("--kafka-length-prefix", self.kafka_length_prefix),
                (
                    "-X",
                    !self.kafka_property.is_empty() || !self.kafka_properties.is_empty(),
                ),
                (
                    "--kafka-buffer-records",
                    self.kafka_buffer_records.is_some(),
                ),
                ("--kafka-buffer-bytes", self.kafka_buffer_bytes.is_some()),
                ("--kafka-flush-timeout", self.kafka_flush_timeout.is_some()),
            ];
            if let Some((flag, _)) = given.iter().find(|(_, set)| *set) {
                bail!(
                    "{flag} is set but --kafka-brokers is not, so nothing would go to Kafka: \
                     give --kafka-brokers HOST:PORT[,HOST:PORT], or leave the Kafka settings out"
                );
            }
            return Ok(None);
        };
        if brokers.trim().is_empty() {
            bail!("--kafka-brokers is empty: give HOST:PORT[,HOST:PORT]");
        }
        let mut properties: Vec<(String, String)> = self.kafka_properties.into_iter().collect();
        properties.extend(self.kafka_property);
        let buffer_records = self.kafka_buffer_records.unwrap_or(DEFAULT_BUFFER_RECORDS);
        if buffer_records == 0 || buffer_records > 10_000_000 {
            bail!("--kafka-buffer-records must be between 1 and 10000000 (librdkafka's limit)");
        }
        let buffer_bytes = self.kafka_buffer_bytes.unwrap_or(DEFAULT_BUFFER_BYTES);
        if buffer_bytes < 1024 {
            bail!("--kafka-buffer-bytes must be at least 1024");
        }
        Ok(Some(KafkaConfig {
            brokers,
            topic: self
                .kafka_topic
                .unwrap_or_else(|| DEFAULT_TOPIC.to_string()),
            format: self.kafka_format.unwrap_or(KafkaFormat::Protobuf),
            length_prefix: self.kafka_length_prefix,
            properties,
            buffer_records,
            buffer_bytes,
            flush_timeout: self
                .kafka_flush_timeout
                .map_or(DEFAULT_FLUSH_TIMEOUT, Duration::from),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("15s").unwrap(), Duration::from_secs(15));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("fast").is_err());
        assert_eq!(
            "500ms".parse::<HumanDuration>(),
            Ok(HumanDuration(Duration::from_millis(500)))
        );
    }
}
