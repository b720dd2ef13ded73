//! `flowexport dashboard`: flows from Kafka into Prometheus counters, and a
//! drop-in for neptune-networks/flow-exporter. The flags and the Kafka loop;
//! decoding and counting are [`crate::dashboard`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use prometheus::Registry;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};

use crate::dashboard::{decode, Dashboard, InputFormat};
use crate::enrich::files::{self, parse_asn_names};
use crate::rate_limited_log::RateLimitedLog;
use crate::sink::kafka::{parse_property, topic_partitions};

/// Where reading starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DashStart {
    /// The oldest message of every partition.
    Earliest,
    /// Only new messages (flow-exporter's behaviour).
    Latest,
    /// The consumer group's committed offsets (latest when none); offsets
    /// are committed as messages are counted.
    Committed,
}

/// `host:port` or `:port` (all addresses), as flow-exporter listens.
pub(crate) fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let full = if s.starts_with(':') {
        format!("0.0.0.0{s}")
    } else {
        s.to_string()
    };
    full.parse()
        .map_err(|_| format!("{s:?} is not ADDR:PORT or :PORT"))
}

#[derive(Args, Debug, Clone)]
pub struct DashboardArgs {
    /// Kafka bootstrap brokers (`--broker` as in flow-exporter).
    #[arg(long, alias = "broker", value_name = "HOST:PORT[,HOST:PORT]")]
    pub kafka_brokers: String,
    /// Topic to read flows from.
    #[arg(long, value_name = "TOPIC")]
    pub topic: String,
    /// Message format. [default: pmacct-json with --asn, else protobuf]
    #[arg(long, value_enum)]
    pub format: Option<InputFormat>,
    /// The AS being monitored (flow-exporter): flows with as_src == ASN count
    /// in flow_transmit_bytes_total, as_dst == ASN in flow_receive_bytes_total.
    #[arg(long, value_name = "ASN")]
    pub asn: Option<u32>,
    /// AS names as in CIDR-Report's asn.txt (`ASN<whitespace>NAME, CC` per
    /// line), for the *_as_name labels. Read at start; no network look-up.
    #[arg(long, value_name = "FILE")]
    pub asn_names: Option<PathBuf>,
    /// AS names from an ASN database, as enrich's --asn-db takes it: a
    /// MaxMind-format ASN database (.mmdb) or a `prefix,asn,name` CSV.
    #[arg(long, alias = "asn-csv", value_name = "FILE")]
    pub asn_db: Option<PathBuf>,
    /// Where reading starts.
    #[arg(long, value_enum, default_value = "latest")]
    pub start_offset: DashStart,
    /// Partitions to read: `all` or comma-separated numbers (flow-exporter's
    /// flag). With --start-offset committed only `all`.
    #[arg(long, value_name = "all|N,N", default_value = "all")]
    pub partitions: String,
    /// Consumer group (used by --start-offset committed).
    #[arg(long, value_name = "GROUP", default_value = "flowexport-dashboard")]
    pub group_id: String,
    /// Prometheus endpoint (serves /metrics); `:PORT` listens on all
    /// addresses, as flow-exporter does.
    #[arg(long, value_name = "ADDR:PORT", default_value = ":9590", value_parser = parse_listen)]
    pub metrics_addr: SocketAddr,
    /// Distinct customer ids labelled; more are counted as cid="other".
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub max_customers: usize,
    /// Distinct hosts (exporters) labelled; more are counted as host="other".
    #[arg(long, value_name = "N", default_value_t = 1_000)]
    pub max_hosts: usize,
    /// Distinct (source AS, destination AS, host) series of the
    /// flow-exporter metrics; more are counted with AS "other".
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    pub max_as_pairs: usize,
    /// A librdkafka consumer property (repeatable).
    #[arg(short = 'X', value_name = "KEY=VALUE", value_parser = parse_property)]
    pub kafka_property: Vec<(String, String)>,
}

/// Starts the consumer, the metrics endpoint and the loop; returns on
/// SIGINT/SIGTERM.
pub fn run(args: DashboardArgs) -> Result<()> {
    let format = args.format.unwrap_or(if args.asn.is_some() {
        InputFormat::PmacctJson
    } else {
        InputFormat::Protobuf
    });
    let mut names = HashMap::new();
    if let Some(p) = &args.asn_db {
        let db = crate::enrich::AsnDb::load(p).context("cannot start dashboard")?;
        names.extend(db.names());
    }
    if let Some(p) = &args.asn_names {
        names.extend(files::load(p, parse_asn_names).context("cannot start dashboard")?);
    }
    let partitions: Option<Vec<i32>> = match args.partitions.as_str() {
        "all" => None,
        list => Some(
            list.split(',')
                .map(|p| p.trim().parse::<i32>())
                .collect::<Result<_, _>>()
                .map_err(|_| {
                    anyhow::anyhow!("--partitions {list:?}: use `all` or numbers like 0,1,2")
                })?,
        ),
    };
    if partitions.is_some() && args.start_offset == DashStart::Committed {
        bail!("--partitions with a list needs --start-offset earliest or latest (committed offsets belong to the group's own assignment)");
    }

    let registry = Registry::new();
    let messages = crate::metrics::counter(
        &registry,
        "flowexport_dashboard_messages_total",
        "Messages read from the topic.",
    );
    let undecodable = crate::metrics::counter_vec(
        &registry,
        "flowexport_dashboard_undecodable_total",
        "Messages that could not be decoded (counted, skipped), by reason.",
        &["reason"],
    );
    let mut dash = Dashboard::new(
        &registry,
        args.asn,
        names,
        args.max_customers,
        args.max_hosts,
        args.max_as_pairs,
    );

    let mut cc = crate::kafka::client::client_config(
        &args.kafka_brokers,
        &[
            ("group.id", args.group_id.clone()),
            (
                "enable.auto.commit",
                if args.start_offset == DashStart::Committed {
                    "true"
                } else {
                    "false"
                }
                .into(),
            ),
            ("auto.offset.reset", "latest".into()),
        ],
        &args.kafka_property,
        &[],
    );
    crate::kafka::group::default_assignment(&mut cc, &args.kafka_property);
    let group = crate::kafka::group::GroupMetrics::new(&registry, "flowexport_dashboard");
    let consumer: BaseConsumer<crate::kafka::group::GroupContext> = cc
        .create_with_context(crate::kafka::group::GroupContext::new(group))
        .context("invalid Kafka consumer configuration (check -X properties)")?;
    if args.start_offset == DashStart::Committed {
        consumer
            .subscribe(&[args.topic.as_str()])
            .with_context(|| format!("subscribing to topic {}", args.topic))?;
    } else {
        let ids = match partitions {
            Some(p) => p,
            None => {
                let md = consumer
                    .fetch_metadata(Some(&args.topic), Duration::from_secs(10))
                    .with_context(|| {
                        format!(
                            "cannot read topic {} from {}",
                            args.topic, args.kafka_brokers
                        )
                    })?;
                match topic_partitions(&md, &args.topic) {
                    Some(ids) => ids,
                    None => bail!(
                        "topic {} does not exist on {} (create it, or check --topic)",
                        args.topic,
                        args.kafka_brokers
                    ),
                }
            }
        };
        let offset = if args.start_offset == DashStart::Earliest {
            Offset::Beginning
        } else {
            Offset::End
        };
        let mut tpl = TopicPartitionList::new();
        for p in ids {
            tpl.add_partition_offset(&args.topic, p, offset)?;
        }
        consumer.assign(&tpl)?;
    }

    let service = crate::runtime::start(args.metrics_addr, &registry, false, "stopping")?;
    let stop = &service.stop;
    log::info!(
        "dashboard reading topic {} as {format:?} (metrics on http://{}/metrics)",
        args.topic,
        args.metrics_addr
    );
    let decode_log = RateLimitedLog::with_target(module_path!());
    while !stop.load(Ordering::Relaxed) {
        let Some(m) = crate::kafka::group::next_message(&consumer, Duration::from_millis(200))
        else {
            continue;
        };
        messages.inc();
        match decode(format, m.payload().unwrap_or_default()) {
            Ok(f) => dash.add(&f),
            Err(e) => {
                undecodable.with_label_values(&[e.reason()]).inc();
                decode_log.warn(|| {
                    format!(
                        "skipping message at partition {} offset {}: {e}",
                        m.partition(),
                        m.offset()
                    )
                });
            }
        }
    }
    service.runtime.shutdown_background();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_address_forms() {
        assert_eq!(
            parse_listen(":9590").unwrap(),
            "0.0.0.0:9590".parse().unwrap()
        );
        assert_eq!(
            parse_listen("127.0.0.1:1").unwrap(),
            "127.0.0.1:1".parse().unwrap()
        );
        assert!(parse_listen("9590").is_err());
    }
}
