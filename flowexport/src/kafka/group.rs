//! Consumer-group membership shared by the commands that read Kafka as a
//! group (enrich, split, and the dashboard with `--start-offset committed`):
//! the partition assignor they use by default, and the metrics of a
//! member's share of the topic.
//!
//! The default is librdkafka's `cooperative-sticky` assignor: a rebalance
//! moves only the partitions that change owner (the others keep being read),
//! and on a Kafka-protocol broker that answers an eager rejoin with the old
//! assignment (Tansu 0.6.0, the test broker), a survivor still takes over a
//! dead member's partitions. `-X partition.assignment.strategy=...`
//! overrides it. rdkafka's default rebalance handler assigns and revokes
//! incrementally under the cooperative protocol.

use std::time::Duration;

use prometheus::{IntCounter, IntGauge, Registry};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;

use crate::kafka::client::KafkaLogs;

/// The assignor group members use unless `-X` names another.
pub(crate) const DEFAULT_ASSIGNMENT_STRATEGY: &str = "cooperative-sticky";
const ASSIGNMENT_PROPERTY: &str = "partition.assignment.strategy";

/// Sets the default assignor on a consumer's configuration, unless the
/// user's `-X` properties (`props`) set one.
pub(crate) fn default_assignment(cfg: &mut ClientConfig, props: &[(String, String)]) {
    if !props.iter().any(|(k, _)| k == ASSIGNMENT_PROPERTY) {
        cfg.set(ASSIGNMENT_PROPERTY, DEFAULT_ASSIGNMENT_STRATEGY);
    }
}

/// A member's share of its group: partitions it owns, rebalances it saw.
#[derive(Clone)]
pub(crate) struct GroupMetrics {
    pub partitions_owned: IntGauge,
    pub rebalances: IntCounter,
}

impl GroupMetrics {
    /// Registers `<prefix>_partitions_owned` and `<prefix>_rebalances_total`.
    pub(crate) fn new(r: &Registry, prefix: &str) -> GroupMetrics {
        let owned = crate::metrics::gauge(
            r,
            &format!("{prefix}_partitions_owned"),
            "Input partitions this process owns in its consumer group.",
        );
        let rebalances = crate::metrics::counter(
            r,
            &format!("{prefix}_rebalances_total"),
            "Consumer-group rebalances this process took part in (each assignment or \
             revocation of partitions).",
        );
        GroupMetrics {
            partitions_owned: owned,
            rebalances,
        }
    }
}

/// Consumer context that keeps [`GroupMetrics`] current and logs each
/// change of assignment.
pub(crate) struct GroupContext {
    metrics: GroupMetrics,
    kafka_logs: KafkaLogs,
}

impl GroupContext {
    pub(crate) fn new(metrics: GroupMetrics) -> GroupContext {
        GroupContext {
            metrics,
            kafka_logs: KafkaLogs::default(),
        }
    }
}

impl ClientContext for GroupContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.kafka_logs.log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.kafka_logs.error(error, reason);
    }
}

impl ConsumerContext for GroupContext {
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let (what, n) = match rebalance {
            Rebalance::Assign(tpl) => ("assigned", tpl.count()),
            Rebalance::Revoke(tpl) => ("revoked", tpl.count()),
            Rebalance::Error(e) => {
                log::warn!("consumer group rebalance failed: {e}");
                return;
            }
        };
        self.metrics.rebalances.inc();
        let owned = consumer.assignment().map_or(0, |a| a.count());
        self.metrics.partitions_owned.set(owned as i64);
        log::info!("consumer group rebalance: {n} partitions {what}; this process owns {owned}");
    }
}

/// The next message within `timeout`; a consumer error (the broker gone,
/// a rebalance in progress) is logged (once per 10 s per error code) and
/// counts as no message.
pub(crate) fn next_message(
    consumer: &BaseConsumer<GroupContext>,
    timeout: Duration,
) -> Option<BorrowedMessage<'_>> {
    match consumer.poll(timeout)? {
        Ok(m) => Some(m),
        Err(e) => {
            consumer.context().kafka_logs.poll_error(&e);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cooperative_sticky_unless_overridden() {
        let mut c = ClientConfig::new();
        default_assignment(&mut c, &[]);
        assert_eq!(c.get(ASSIGNMENT_PROPERTY), Some("cooperative-sticky"));
        let mut c = ClientConfig::new();
        let props = vec![(ASSIGNMENT_PROPERTY.to_string(), "range".to_string())];
        for (k, v) in &props {
            c.set(k, v);
        }
        default_assignment(&mut c, &props);
        assert_eq!(c.get(ASSIGNMENT_PROPERTY), Some("range"));
    }

    #[test]
    fn metrics_are_registered_under_the_prefix() {
        let r = Registry::new();
        let m = GroupMetrics::new(&r, "flowexport_bridge");
        m.partitions_owned.set(3);
        m.rebalances.inc();
        let text = crate::metrics::render_registry(&r);
        assert!(
            text.contains("flowexport_bridge_partitions_owned 3"),
            "{text}"
        );
        assert!(
            text.contains("flowexport_bridge_rebalances_total 1"),
            "{text}"
        );
    }
}
