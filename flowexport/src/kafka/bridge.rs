//! Kafka → transform → Kafka, at least once: the loop shared by `enrich`
//! and `split`.
//!
//! Input is read by a consumer group member with automatic commits off. The
//! loop takes a batch (up to `--batch-records` messages, or what arrived
//! within `--batch-wait`), decodes each message, lets the transform change
//! and route it, and produces the results; the input position after the
//! batch is noted. A batch's position is committed only once the broker
//! acknowledged every output record of it (`acks=all`; errors that may pass
//! are produced again). Two batches are in flight: while batch k is read
//! and produced, the acknowledgements of batch k-1 arrive, and its position
//! is committed before batch k+1 starts, so reading never waits for a full
//! round trip. A crash (even `kill -9`) therefore loses nothing: what was
//! not committed is read again on restart. The price is duplicates: at most
//! the two uncommitted batches, i.e. 2 x `--batch-records` input messages
//! per process.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use prometheus::{IntCounter, Registry};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};

use crate::kafka::client::KafkaLogs;
use crate::kafka::group::{default_assignment, next_message, GroupContext, GroupMetrics};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

use crate::cmd::flags::parse_duration;
use crate::codec::protobuf;
use crate::kafka::delivery::{Accounting, Deliveries};
use crate::rate_limited_log::RateLimitedLog;
use crate::record::FlowRecord;
use crate::sink::kafka::{message_key, parse_property, topic_partitions, KafkaFormat};

/// How long a stop waits for the broker to acknowledge the last batch.
const SHUTDOWN_ACK_WAIT: Duration = Duration::from_secs(10);

/// Where a consumer group with no committed offset starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StartOffset {
    Earliest,
    Latest,
}

/// Flags every Kafka → Kafka command shares.
#[derive(Args, Debug, Clone)]
pub struct BridgeArgs {
    /// Kafka bootstrap brokers.
    #[arg(long, value_name = "HOST:PORT[,HOST:PORT]")]
    pub kafka_brokers: String,
    /// Topic to read flows from.
    #[arg(long, value_name = "TOPIC")]
    pub in_topic: String,
    /// Consumer group; run several processes with the same group to share
    /// the input's partitions. [default: the command's name]
    #[arg(long, value_name = "GROUP")]
    pub group_id: Option<String>,
    /// Where a group without committed offsets starts reading.
    #[arg(long, value_enum, default_value = "earliest")]
    pub start_offset: StartOffset,
    /// Format of the input messages: protobuf (goflow2 FlowMessage, as the
    /// agent and collect write by default) or json (`--kafka-format json`).
    #[arg(long, value_name = "FORMAT", default_value = "protobuf")]
    pub in_format: KafkaFormat,
    /// Format of the output messages: protobuf (goflow2 FlowMessage,
    /// proto/flow.proto) or json.
    #[arg(long, value_name = "FORMAT", default_value = "protobuf")]
    pub out_format: KafkaFormat,
    /// Input messages per batch. Offsets are committed once a batch is
    /// acknowledged and two batches are in flight, so after a crash at most
    /// 2 x N input messages are delivered twice.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub batch_records: usize,
    /// Longest wait for a batch to fill.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "200ms")]
    pub batch_wait: Duration,
    /// A librdkafka property for both the consumer and the producer (e.g.
    /// -X security.protocol=SASL_SSL); repeatable.
    #[arg(short = 'X', value_name = "KEY=VALUE", value_parser = parse_property)]
    pub kafka_property: Vec<(String, String)>,
}

/// What a transform decides for one record.
pub(crate) enum Route<'a> {
    /// Produce the (changed) record to this topic.
    To(&'a str),
    /// Drop it (counted by the transform's own metric).
    Drop,
}

/// The per-command part of the loop.
pub(crate) trait Transform {
    /// Changes `r` in place and says where it goes.
    fn apply(&mut self, r: &mut FlowRecord) -> Route<'_>;
    /// SIGHUP: re-read whatever files the transform uses. An error keeps
    /// the old state (the caller logs it).
    fn reload(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Bridge metrics (`flowexport_bridge_*`).
#[derive(Clone)]
pub(crate) struct BridgeMetrics {
    pub consumed: IntCounter,
    pub undecodable: IntCounter,
    pub produced: IntCounter,
    pub delivered: IntCounter,
    pub failed: IntCounter,
    pub retried: IntCounter,
    pub dropped: IntCounter,
    pub batches: IntCounter,
    /// Partitions owned, rebalances (`flowexport_bridge_partitions_owned`,
    /// `flowexport_bridge_rebalances_total`).
    pub group: GroupMetrics,
}

impl BridgeMetrics {
    pub(crate) fn new(r: &Registry) -> BridgeMetrics {
        let c = |name: &str, help: &str| crate::metrics::counter(r, name, help);
        BridgeMetrics {
            consumed: c("flowexport_bridge_consumed_total", "Input messages read."),
            undecodable: c(
                "flowexport_bridge_undecodable_total",
                "Input messages that could not be decoded as --in-format (counted and skipped).",
            ),
            produced: c(
                "flowexport_bridge_produced_total",
                "Output records produced.",
            ),
            delivered: c(
                "flowexport_bridge_delivered_total",
                "Output records the broker acknowledged.",
            ),
            failed: c(
                "flowexport_bridge_failed_total",
                "Output records that failed for good (too large, not authorized); logged.",
            ),
            retried: c(
                "flowexport_bridge_retried_total",
                "Output records produced again after an error that may pass.",
            ),
            dropped: c(
                "flowexport_bridge_dropped_total",
                "Input records the command dropped by rule (e.g. enrich --drop-unmatched).",
            ),
            batches: c(
                "flowexport_bridge_batches_committed_total",
                "Batches whose input offsets were committed after every output was acknowledged.",
            ),
            group: GroupMetrics::new(r, "flowexport_bridge"),
        }
    }
}

/// The bridge's accounting of deliveries: records produced and not yet
/// acknowledged (or failed, or queued again), per batch slot (the delivery
/// opaque: 0 or 1, alternating).
struct SlotAccounting {
    metrics: BridgeMetrics,
    outstanding: [AtomicU64; 2],
}

impl Accounting for SlotAccounting {
    fn delivered(&self, slot: usize) {
        self.metrics.delivered.inc();
        self.outstanding[slot & 1].fetch_sub(1, Ordering::AcqRel);
    }

    fn failed(&self, slot: usize) {
        self.metrics.failed.inc();
        self.outstanding[slot & 1].fetch_sub(1, Ordering::AcqRel);
    }

    fn retrying(&self, slot: usize) {
        // Queued first, then the count lowered: see await_acks.
        self.outstanding[slot & 1].fetch_sub(1, Ordering::AcqRel);
    }
}

/// The running loop's clients and state.
pub(crate) struct Bridge {
    args: BridgeArgs,
    consumer: BaseConsumer<GroupContext>,
    producer: ThreadedProducer<Deliveries<SlotAccounting>>,
    admin: AdminClient<KafkaLogs>,
    metrics: BridgeMetrics,
    /// Output topics known to exist (created when missing, once each).
    topics: HashSet<String>,
    /// Whether to create missing output topics, and with how many
    /// partitions (split); None: they must exist.
    create_topics: Option<i32>,
    encoder: protobuf::Encoder,
    decoder: protobuf::Decoder,
    payload: Vec<u8>,
    key: Vec<u8>,
    decode_log: RateLimitedLog,
    /// Slot of the batch being read now.
    slot: usize,
    /// The previous batch, produced but not yet committed: its slot and
    /// the input position after it.
    pending: Option<(usize, TopicPartitionList)>,
}

impl Bridge {
    /// Creates the clients and subscribes. Bad `-X` properties are errors.
    pub(crate) fn new(
        args: BridgeArgs,
        default_group: &str,
        create_topics: Option<i32>,
        registry: &Registry,
    ) -> Result<Bridge> {
        if args.batch_records == 0 {
            bail!("--batch-records must be at least 1");
        }
        let metrics = BridgeMetrics::new(registry);
        let client = |fixed: &[(&str, String)]| {
            crate::kafka::client::client_config(
                &args.kafka_brokers,
                &[],
                &args.kafka_property,
                fixed,
            )
        };
        // Offsets are committed by the loop, after delivery.
        let mut consumer_cfg = client(&[
            (
                "group.id",
                args.group_id.as_deref().unwrap_or(default_group).into(),
            ),
            ("enable.auto.commit", "false".into()),
            (
                "auto.offset.reset",
                match args.start_offset {
                    StartOffset::Earliest => "earliest",
                    StartOffset::Latest => "latest",
                }
                .into(),
            ),
        ]);
        default_assignment(&mut consumer_cfg, &args.kafka_property);
        let consumer: BaseConsumer<GroupContext> = consumer_cfg
            .create_with_context(GroupContext::new(metrics.group.clone()))
            .context("invalid Kafka consumer configuration (check -X properties)")?;
        consumer
            .subscribe(&[args.in_topic.as_str()])
            .with_context(|| format!("subscribing to topic {}", args.in_topic))?;
        // Every record acknowledged by all replicas, never given up.
        let producer_cfg = client(&[("acks", "all".into()), ("message.timeout.ms", "0".into())]);
        let producer: ThreadedProducer<Deliveries<SlotAccounting>> = producer_cfg
            .create_with_context(Deliveries::new(SlotAccounting {
                metrics: metrics.clone(),
                outstanding: [AtomicU64::new(0), AtomicU64::new(0)],
            }))
            .context("invalid Kafka producer configuration (check -X properties)")?;
        let admin: AdminClient<KafkaLogs> =
            client(&[])
                .create_with_context(KafkaLogs::default())
                .context("invalid Kafka admin configuration (check -X properties)")?;
        Ok(Bridge {
            args,
            consumer,
            producer,
            admin,
            metrics,
            topics: HashSet::new(),
            create_topics,
            encoder: protobuf::Encoder::default(),
            decoder: protobuf::Decoder::default(),
            payload: Vec::with_capacity(512),
            key: Vec::with_capacity(40),
            decode_log: RateLimitedLog::with_target(module_path!()),
            slot: 0,
            pending: None,
        })
    }

    /// Runs batches until `stop` is set, then finishes the batch at hand
    /// (delivered and committed) and returns. `reload` (SIGHUP) makes the
    /// transform re-read its files between batches.
    pub(crate) fn run(
        &mut self,
        t: &mut dyn Transform,
        stop: &AtomicBool,
        reload: &AtomicBool,
    ) -> Result<()> {
        let mut records = 0u64;
        while !stop.load(Ordering::Relaxed) {
            if reload.swap(false, Ordering::Relaxed) {
                match t.reload() {
                    Ok(()) => log::info!("SIGHUP: files reloaded"),
                    Err(e) => log::error!("SIGHUP: reload failed, keeping the old tables: {e:#}"),
                }
            }
            let n = self.batch(t, stop)?;
            records += n as u64;
        }
        self.commit_pending(stop)?;
        log::info!("stopped after {records} input messages; offsets committed");
        Ok(())
    }

    /// One batch: read, transform and produce it; then wait for the
    /// previous batch's acks and commit its position (or, when nothing
    /// arrived, the pending batch's). Returns the number of input messages.
    fn batch(&mut self, t: &mut dyn Transform, stop: &AtomicBool) -> Result<usize> {
        let deadline = Instant::now() + self.args.batch_wait;
        let mut n = 0;
        while n < self.args.batch_records {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || stop.load(Ordering::Relaxed) {
                break;
            }
            let Some(m) = next_message(&self.consumer, left.min(Duration::from_millis(100))) else {
                continue;
            };
            n += 1;
            self.metrics.consumed.inc();
            let payload = m.payload().unwrap_or_default();
            let decoded = match self.args.in_format {
                KafkaFormat::Protobuf => self.decoder.decode(payload).map_err(|e| e.to_string()),
                KafkaFormat::Json => crate::record::from_json(payload).map_err(|e| e.to_string()),
            };
            let mut r = match decoded {
                Ok(r) => r,
                Err(e) => {
                    self.metrics.undecodable.inc();
                    self.decode_log.warn(|| {
                        format!(
                            "skipping undecodable message at {} partition {} offset {}: {e}",
                            m.topic(),
                            m.partition(),
                            m.offset()
                        )
                    });
                    continue;
                }
            };
            let topic = match t.apply(&mut r) {
                Route::Drop => {
                    self.metrics.dropped.inc();
                    continue;
                }
                Route::To(topic) => topic,
            };
            self.ensure_topic(topic);
            self.payload.clear();
            match self.args.out_format {
                KafkaFormat::Protobuf => self.encoder.encode(&r, false, &mut self.payload),
                KafkaFormat::Json => crate::codec::json::write_record(&mut self.payload, &r),
            }
            self.key.clear();
            message_key(&r, &mut self.key);
            self.produce(self.slot, topic, &self.key, &self.payload, stop)?;
            self.metrics.produced.inc();
        }
        if n == 0 {
            // Idle: settle the pending batch now rather than after the next.
            self.commit_pending(stop)?;
            return Ok(0);
        }
        let position = self
            .consumer
            .position()
            .context("reading the consumer's position")?;
        self.commit_pending(stop)?;
        self.pending = Some((self.slot, position));
        self.slot ^= 1;
        Ok(n)
    }

    /// Waits for the pending batch's acks, then commits its position.
    fn commit_pending(&mut self, stop: &AtomicBool) -> Result<()> {
        let Some((slot, position)) = self.pending.take() else {
            return Ok(());
        };
        self.await_acks(slot, stop)?;
        // Only partitions this consumer has read from carry an offset.
        let mut tpl = TopicPartitionList::new();
        for e in position.elements() {
            if let Offset::Offset(o) = e.offset() {
                tpl.add_partition_offset(e.topic(), e.partition(), Offset::Offset(o))?;
            }
        }
        if tpl.count() == 0 {
            return Ok(());
        }
        match self.consumer.commit(&tpl, CommitMode::Sync) {
            Ok(()) => self.metrics.batches.inc(),
            // After a rebalance the partitions may be someone else's: they
            // read the batch again (duplicates, never losses).
            Err(e) => {
                log::warn!("committing input offsets failed ({e}); the batch may be read again");
            }
        }
        Ok(())
    }

    /// Produces one message, waiting while librdkafka's queue is full.
    fn produce(
        &self,
        slot: usize,
        topic: &str,
        key: &[u8],
        payload: &[u8],
        stop: &AtomicBool,
    ) -> Result<()> {
        let d = &self.producer.context().accounting;
        d.outstanding[slot].fetch_add(1, Ordering::AcqRel);
        let mut rec = BaseRecord::with_opaque_to(topic, slot)
            .key(key)
            .payload(payload);
        loop {
            match self.producer.send(rec) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    if stop.load(Ordering::Relaxed) {
                        d.outstanding[slot].fetch_sub(1, Ordering::AcqRel);
                        bail!(
                            "shutting down while the producer queue is full (is the broker \
                             down?); this batch's input offsets stay uncommitted and it is \
                             read again on restart"
                        );
                    }
                    rec = r;
                    // A full queue drains as the broker acknowledges.
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => {
                    d.outstanding[slot].fetch_sub(1, Ordering::AcqRel);
                    self.metrics.failed.inc();
                    log::error!("producing to topic {topic} failed: {e}");
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Waits until every record of the batch in `slot` is acknowledged (or
    /// failed for good), producing again what failed with errors that may
    /// pass.
    fn await_acks(&mut self, slot: usize, stop: &AtomicBool) -> Result<()> {
        let d = self.producer.context().clone();
        let mut waited = Instant::now();
        let mut stopping: Option<Instant> = None;
        loop {
            // The delivery callback queues a retry before it lowers the
            // count, so once the count is 0 every retry is in the list.
            let idle = d.accounting.outstanding[slot].load(Ordering::Acquire) == 0;
            let retry = d.take_retries_of(slot);
            if idle && retry.is_empty() {
                return Ok(());
            }
            for r in &retry {
                self.metrics.retried.inc();
                self.produce(r.opaque, &r.topic, &r.key, &r.payload, stop)?;
            }
            if retry.is_empty() {
                // ThreadedProducer serves delivery reports on its own
                // thread; just wait for them.
                std::thread::sleep(Duration::from_millis(1));
            }
            if stop.load(Ordering::Relaxed) {
                let since = *stopping.get_or_insert_with(Instant::now);
                if since.elapsed() >= SHUTDOWN_ACK_WAIT {
                    bail!(
                        "{} records unacknowledged {}s after the stop signal; their input \
                         offsets stay uncommitted and they are read again on restart",
                        d.accounting.outstanding[slot].load(Ordering::Acquire),
                        SHUTDOWN_ACK_WAIT.as_secs()
                    );
                }
            }
            if waited.elapsed() >= Duration::from_secs(30) {
                log::warn!(
                    "{} records still unacknowledged after 30s; waiting for the broker (offsets stay uncommitted)",
                    d.accounting.outstanding[slot].load(Ordering::Acquire)
                );
                waited = Instant::now();
            }
        }
    }

    /// Checks (once per topic) that `topic` exists; creates it when it is
    /// missing and topic creation is on, else logs what to do. Records for
    /// a missing topic wait in the producer meanwhile.
    fn ensure_topic(&mut self, topic: &str) {
        if self.topics.contains(topic) {
            return;
        }
        self.topics.insert(topic.to_string());
        let exists = self
            .producer
            .client()
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .is_ok_and(|md| topic_partitions(&md, topic).is_some());
        if exists {
            return;
        }
        let Some(partitions) = self.create_topics else {
            log::warn!(
                "output topic {topic} does not exist on {} (or the brokers do not answer); \
                 create it: its records wait in the producer, and the input offsets stay \
                 uncommitted, until it does",
                self.args.kafka_brokers
            );
            return;
        };
        let nt = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let res = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(self.admin.create_topics([&nt], &opts)),
            Err(e) => {
                log::error!("cannot create topic {topic}: no runtime ({e})");
                return;
            }
        };
        match res {
            Ok(rs) => match rs.into_iter().next() {
                Some(Ok(_)) => log::info!("created topic {topic} ({partitions} partitions)"),
                Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => {}
                Some(Err((_, e))) => log::error!(
                    "cannot create topic {topic} ({e}); create it by hand, its records wait meanwhile"
                ),
                None => {}
            },
            Err(e) => log::error!(
                "cannot create topic {topic} ({e}); create it by hand, its records wait meanwhile"
            ),
        }
    }
}

/// Serves metrics, runs the bridge on this thread and turns signals into
/// its stop (SIGINT/SIGTERM) and reload (SIGHUP) flags.
pub(crate) fn serve(
    bargs: BridgeArgs,
    group: &str,
    create_topics: Option<i32>,
    metrics_addr: SocketAddr,
    registry: Registry,
    t: &mut dyn Transform,
) -> Result<()> {
    let in_topic = bargs.in_topic.clone();
    let mut bridge = Bridge::new(bargs, group, create_topics, &registry)?;
    let service = crate::runtime::start(
        metrics_addr,
        &registry,
        true,
        "finishing the batch and stopping",
    )?;
    log::info!("reading topic {in_topic} (metrics on http://{metrics_addr}/metrics)");
    let res = bridge.run(t, &service.stop, &service.reload);
    service.runtime.shutdown_background();
    res
}
