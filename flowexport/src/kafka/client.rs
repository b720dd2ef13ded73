//! librdkafka client configuration, built one way for every Kafka client
//! (the Kafka sink's producer; the bridge's consumer, producer and admin
//! client; the dashboard's consumer): the bootstrap brokers, flowexport's
//! defaults for that client, the operator's `-X` properties (which win over
//! the defaults), then the settings the client's guarantees rest on (which
//! `-X` cannot change: e.g. the bridge commits offsets itself, after
//! delivery); and how every client logs librdkafka's lines and errors
//! ([`KafkaLogs`]).

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::KafkaError;

use crate::rate_limited_log::RateLimitedLog;

/// The configuration of one client, in that order.
pub(crate) fn client_config(
    brokers: &str,
    defaults: &[(&str, String)],
    properties: &[(String, String)],
    fixed: &[(&str, String)],
) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", brokers);
    for (k, v) in defaults {
        cc.set(*k, v);
    }
    for (k, v) in properties {
        cc.set(k, v);
    }
    for (k, v) in fixed {
        cc.set(*k, v);
    }
    cc
}

/// librdkafka's log lines (by facility), global errors and consumers' poll
/// errors (by error code), each kind at most once per 10 s with the count of those held back: while
/// a broker is unreachable, librdkafka repeats them several times a second
/// (about 500,000 lines a day). Lines below warning pass as they come. The
/// client context of every Kafka client here (or its own context's
/// `ClientContext` methods) logs through one; target `librdkafka`.
pub(crate) struct KafkaLogs {
    lines: RateLimitedLog<String>,
    errors: RateLimitedLog<Option<i32>>,
    /// A consumer's poll errors: while the brokers are down, every poll
    /// returns one (about 20 a second).
    poll_errors: RateLimitedLog<Option<i32>>,
}

impl Default for KafkaLogs {
    fn default() -> Self {
        KafkaLogs {
            lines: RateLimitedLog::with_target("librdkafka"),
            errors: RateLimitedLog::with_target("librdkafka"),
            poll_errors: RateLimitedLog::with_target("flowexport::kafka::group"),
        }
    }
}

/// The key errors are limited by: their librdkafka error code.
fn error_kind(e: &KafkaError) -> Option<i32> {
    e.rdkafka_error_code().map(|c| c as i32)
}

impl KafkaLogs {
    /// An error a consumer's poll returned (a warning, limited by kind).
    pub(crate) fn poll_error(&self, e: &KafkaError) {
        self.poll_errors
            .log_for(error_kind(e), log::Level::Warn, || {
                format!("Kafka consumer: {e}")
            });
    }
}

impl ClientContext for KafkaLogs {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        let level = match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => log::Level::Error,
            RDKafkaLogLevel::Warning => log::Level::Warn,
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => log::Level::Info,
            RDKafkaLogLevel::Debug => log::Level::Debug,
        };
        if level > log::Level::Warn {
            log::log!(target: "librdkafka", level, "librdkafka: {fac} {log_message}");
            return;
        }
        self.lines.log_for(fac.to_string(), level, || {
            format!("librdkafka: {fac} {log_message}")
        });
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.errors
            .log_for(error_kind(&error), log::Level::Error, || {
                format!("librdkafka: {error}: {reason}")
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn librdkafka_repeats_are_held_back_by_kind() {
        use rdkafka::error::RDKafkaErrorCode;
        let logs = KafkaLogs::default();
        let down = || KafkaError::Global(RDKafkaErrorCode::AllBrokersDown);
        for _ in 0..5 {
            logs.error(down(), "1/1 brokers are down");
        }
        logs.error(
            KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure),
            "refused",
        );
        let code = |c: RDKafkaErrorCode| Some(c as i32);
        assert_eq!(
            logs.errors.held(&code(RDKafkaErrorCode::AllBrokersDown)),
            Some(4)
        );
        assert_eq!(
            logs.errors
                .held(&code(RDKafkaErrorCode::BrokerTransportFailure)),
            Some(0)
        );
        for _ in 0..3 {
            logs.log(RDKafkaLogLevel::Error, "FAIL", "connect refused");
        }
        // Below warning: not limited (nor kept).
        logs.log(RDKafkaLogLevel::Info, "CONF", "x");
        assert_eq!(logs.lines.held(&"FAIL".to_string()), Some(2));
        assert_eq!(logs.lines.held(&"CONF".to_string()), None);
    }

    #[test]
    fn properties_win_over_defaults_not_over_fixed_settings() {
        let props = vec![
            ("acks".to_string(), "1".to_string()),
            ("enable.auto.commit".to_string(), "true".to_string()),
            ("compression.type".to_string(), "lz4".to_string()),
        ];
        let cc = client_config(
            "k1:9092",
            &[("acks", "all".into()), ("linger.ms", "5".into())],
            &props,
            &[("enable.auto.commit", "false".into())],
        );
        assert_eq!(cc.get("bootstrap.servers"), Some("k1:9092"));
        assert_eq!(cc.get("acks"), Some("1"));
        assert_eq!(cc.get("linger.ms"), Some("5"));
        assert_eq!(cc.get("compression.type"), Some("lz4"));
        assert_eq!(cc.get("enable.auto.commit"), Some("false"));
    }
}
