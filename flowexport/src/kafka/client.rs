//! librdkafka client configuration, built one way for every Kafka client
//! (the Kafka sink's producer; the bridge's consumer, producer and admin
//! client; the dashboard's consumer): the bootstrap brokers, flowexport's
//! defaults for that client, the operator's `-X` properties (which win over
//! the defaults), then the settings the client's guarantees rest on (which
//! `-X` cannot change: e.g. the bridge commits offsets itself, after
//! delivery).

use rdkafka::config::ClientConfig;

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

#[cfg(test)]
mod tests {
    use super::*;

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
