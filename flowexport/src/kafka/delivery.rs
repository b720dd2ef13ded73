//! One delivery callback for every producer (the Kafka sink, the bridge):
//! librdkafka reports each record's outcome on its polling thread; a
//! record whose error may pass is queued to be produced again (the caller
//! takes the queue), one that cannot succeed is counted as failed, both
//! logged at most every 10 s. What each producer counts is its
//! [`Accounting`].

use std::sync::Mutex;

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::producer::{DeliveryResult, ProducerContext};
use rdkafka::ClientContext;

use crate::kafka::client::KafkaLogs;
use crate::rate_limited_log::RateLimitedLog;

/// A record to produce again.
pub(crate) struct Retry {
    /// The delivery opaque it was produced with (the bridge's batch slot).
    pub(crate) opaque: usize,
    pub(crate) topic: String,
    pub(crate) key: Vec<u8>,
    pub(crate) payload: Vec<u8>,
}

/// What a producer counts for each outcome (called on librdkafka's thread).
pub(crate) trait Accounting: Send + Sync + 'static {
    /// Acknowledged by the broker.
    fn delivered(&self, opaque: usize);
    /// Failed for good (see [`permanent`]).
    fn failed(&self, opaque: usize);
    /// Failed for now; called after the record is queued for another
    /// attempt, so a caller that sees nothing outstanding finds every retry
    /// in the queue.
    fn retrying(&self, opaque: usize);
}

/// The producer context: the shared handling, then the producer's own
/// [`Accounting`].
pub(crate) struct Deliveries<A> {
    pub(crate) accounting: A,
    retry: Mutex<Vec<Retry>>,
    log: RateLimitedLog,
    kafka_logs: KafkaLogs,
}

impl<A> Deliveries<A> {
    pub(crate) fn new(accounting: A) -> Self {
        Deliveries {
            accounting,
            retry: Mutex::new(Vec::new()),
            log: RateLimitedLog::with_target(module_path!()),
            kafka_logs: KafkaLogs::default(),
        }
    }

    /// Takes every record queued for another attempt.
    pub(crate) fn take_retries(&self) -> Vec<Retry> {
        std::mem::take(&mut *self.retry.lock().expect("retry lock"))
    }

    /// Takes the queued records produced with `opaque`, leaving the others.
    pub(crate) fn take_retries_of(&self, opaque: usize) -> Vec<Retry> {
        let mut all = self.retry.lock().expect("retry lock");
        let (mine, rest) = std::mem::take(&mut *all)
            .into_iter()
            .partition(|r| r.opaque == opaque);
        *all = rest;
        mine
    }

    /// Records queued for another attempt.
    pub(crate) fn retries_waiting(&self) -> usize {
        self.retry.lock().expect("retry lock").len()
    }
}

impl<A: Accounting> ClientContext for Deliveries<A> {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.kafka_logs.log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.kafka_logs.error(error, reason);
    }
}

impl<A: Accounting> ProducerContext for Deliveries<A> {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        match result {
            Ok(_) => self.accounting.delivered(opaque),
            Err((e, msg)) if permanent(e) => {
                self.accounting.failed(opaque);
                let topic = msg.topic().to_string();
                self.log
                    .error(|| format!("Kafka delivery to topic {topic} failed for good: {e}"));
            }
            Err((e, msg)) => {
                let topic = msg.topic().to_string();
                self.retry.lock().expect("retry lock").push(Retry {
                    opaque,
                    topic: topic.clone(),
                    key: msg.key().unwrap_or_default().to_vec(),
                    payload: msg.payload().unwrap_or_default().to_vec(),
                });
                self.accounting.retrying(opaque);
                self.log
                    .error(|| format!("Kafka delivery to topic {topic} failed ({e}); retrying"));
            }
        }
    }
}

/// Errors that retrying cannot fix: the record itself or our rights are at
/// fault. Everything else (broker errors, transport trouble) may pass.
pub(crate) fn permanent(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::MessageSizeTooLarge
                | C::InvalidMessageSize
                | C::InvalidMessage
                | C::MessageBatchTooLarge
                | C::InvalidRecord
                | C::InvalidRequiredAcks
                | C::TopicAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::InvalidTopic
                | C::BadMessage
                | C::InvalidArgument
        )
    )
}
