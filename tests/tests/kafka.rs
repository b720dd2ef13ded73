//! The agent's Kafka sink against a real Kafka-protocol broker (Tansu with
//! SQLite storage) running in the test's namespace: protobuf and JSON records
//! checked exactly, a broker outage with nothing lost, and start-up errors.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use flowexport::codec::protobuf;
use flowexport_tests::frames::*;
use flowexport_tests::kafka::{Broker, Consumed};
use flowexport_tests::*;
use serde_json::Value;

fn kafka_agent<'a>(dev: &'a str, brokers: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    kafka_agent_args(dev, brokers, "flows", extra)
}

/// A link, a broker in its `b` side with topic `flows` of `partitions`, the
/// ifindex of `b_dev`, and an agent there exporting to the broker with
/// `extra` flags.
fn with_broker(partitions: u32, extra: &[&str]) -> (Link, Broker, u32, Agent) {
    let l = Link::new().unwrap();
    let broker = Broker::start_with(&l.b, &[("flows", partitions)]).unwrap();
    let ifb = l.b.ifindex(&l.b_dev).unwrap();
    let agent = Agent::start(&l.b, &kafka_agent(&l.b_dev, &broker.addr(), extra)).unwrap();
    (l, broker, ifb, agent)
}

/// Decodes protobuf messages into the JSON form `totals` reads.
fn decode_pb(msgs: &[Consumed]) -> Vec<Value> {
    msgs.iter()
        .map(|m| {
            let r = protobuf::decode(&m.payload, false).expect("valid FlowMessage");
            serde_json::to_value(&r).unwrap()
        })
        .collect()
}

/// Waits until the agent has exported `flows` records and the broker has
/// acknowledged every one it was given; returns the last scrape.
fn wait_delivered(agent: &Agent, flows: f64) -> String {
    let mut m = String::new();
    let ok = wait_until(Duration::from_secs(60), || {
        m = agent.metrics(9590).unwrap_or_default();
        let exported = metric(&m, "flowexport_flows_exported_total").unwrap_or(0.0);
        let produced = metric(&m, "flowexport_kafka_records_produced_total").unwrap_or(-1.0);
        let delivered = metric(&m, "flowexport_kafka_records_delivered_total").unwrap_or(-2.0);
        exported >= flows && produced == exported && delivered == produced
    });
    assert!(
        ok,
        "records not delivered:\n{m}\nagent log:\n{}",
        agent.stderr()
    );
    m
}

#[test]
fn protobuf_records_reach_the_broker_exactly() {
    let (l, broker, ifb, agent) = with_broker(3, &["--idle-timeout", "1s"]);
    // Three conversations, each seen in both directions (A->B ingress, B->A
    // egress), plus an IPv6 one.
    let mut flows = Vec::new();
    for i in 0..3u8 {
        let (a, b) = (
            format!("10.40.0.{}", 10 + i),
            format!("10.40.1.{}", 200 - i),
        );
        let port = 5000 + i as u16;
        send_one(
            &l.a,
            &l.a_dev,
            eth4(&a, &b, &L4::udp(port, 53, 100)),
            10 + i as usize,
        );
        send_one(&l.b, &l.b_dev, eth4(&b, &a, &L4::udp(53, port, 300)), 5);
        flows.push((
            FlowId::new(0, ifb, &a, &b, 17, 5000 + i as u64, 53, 0),
            10 + i as u64,
            (10 + i as u64) * 128,
            0,
        ));
        flows.push((
            FlowId::new(1, ifb, &b, &a, 17, 53, 5000 + i as u64, 0),
            5,
            5 * 328,
            0,
        ));
    }
    let v6fwd = eth6(
        "2001:db8:40::1",
        "2001:db8:40::2",
        &L4::tcp(4000, 443, TCP_SYN, 0),
    );
    send_one(&l.a, &l.a_dev, v6fwd, 2);
    flows.push((
        FlowId::new(0, ifb, "2001:db8:40::1", "2001:db8:40::2", 6, 4000, 443, 0),
        2,
        2 * 60,
        TCP_SYN as u64,
    ));

    let m = wait_delivered(&agent, flows.len() as f64);
    assert_metric(&m, "flowexport_kafka_records_failed_total", 0.0);
    assert_metric(&m, "flowexport_kafka_records_dropped_total", 0.0);
    assert_metric(&m, "flowexport_kafka_records_buffered", 0.0);
    let out = agent.stop_ok();
    assert!(
        out.records.is_empty(),
        "stdout is off when Kafka is the sink"
    );

    let msgs = broker.consume_all("flows").unwrap();
    let records = decode_pb(&msgs);
    assert_flows(&totals(&records), &flows);
    assert_eq!(
        msgs.len(),
        flows.len(),
        "one message per flow, no duplicates here"
    );
    for r in &records {
        assert_eq!(r["type"], "EBPF");
        assert_eq!(r["sampler_address"], "192.0.2.20");
    }
    // The key is the sorted address pair, so both directions of each
    // conversation share a key and therefore a partition.
    let mut partition_of_key: BTreeMap<Vec<u8>, HashSet<i32>> = BTreeMap::new();
    for (m, r) in msgs.iter().zip(&records) {
        let mut pair = [
            r["src_addr"].as_str().unwrap(),
            r["dst_addr"].as_str().unwrap(),
        ]
        .map(|a| a.parse::<std::net::IpAddr>().unwrap());
        pair.sort();
        let mut want_key = Vec::new();
        for a in pair {
            match a {
                std::net::IpAddr::V4(v) => want_key.extend_from_slice(&v.octets()),
                std::net::IpAddr::V6(v) => want_key.extend_from_slice(&v.octets()),
            }
        }
        assert_eq!(m.key, want_key);
        partition_of_key
            .entry(m.key.clone())
            .or_default()
            .insert(m.partition);
    }
    assert_eq!(partition_of_key.len(), 4);
    assert!(
        partition_of_key.values().all(|p| p.len() == 1),
        "{partition_of_key:?}"
    );
}

#[test]
fn json_records_reach_the_broker_exactly() {
    // --stdout as well: both sinks get the same records.
    let (l, broker, ifb, agent) = with_broker(1, &["--kafka-format", "json", "--stdout"]);
    send_one(
        &l.a,
        &l.a_dev,
        eth4("10.41.0.1", "10.41.0.2", &L4::icmp(8, 0, 56)),
        9,
    );
    let out = agent.stop_ok();
    let msgs = broker.consume_all("flows").unwrap();
    assert_eq!(msgs.len(), 1);
    let v: Value = serde_json::from_slice(&msgs[0].payload).unwrap();
    let want = FlowId::new(0, ifb, "10.41.0.1", "10.41.0.2", 1, 0, 0, 0).icmp(8, 0);
    assert_eq!(FlowId::of(&v), want);
    assert_eq!(
        (v["packets"].as_u64(), v["bytes"].as_u64()),
        (Some(9), Some(9 * 84))
    );
    // Same object, same field names as on stdout.
    assert_eq!(out.records.len(), 1);
    assert_eq!(out.records[0], v);
}

#[test]
fn broker_outage_loses_nothing() {
    let flags = [
        &timeouts("500ms", "500ms", "100ms")[..],
        &["--kafka-flush-timeout", "60s"],
    ]
    .concat();
    let (l, mut broker, ifb, agent) = with_broker(2, &flags);
    let frames = udp_flows("10.42.0.1", "10.42.0.2", 7000, 8, 9, 50);
    let mut sent = send(&l.a, &l.a_dev, frames.clone(), 300);
    // Broker down: the agent keeps draining and exporting; records wait.
    broker.stop();
    sent += send(&l.a, &l.a_dev, frames.clone(), 300);
    let (waited, m) = agent.wait_metrics(9590, Duration::from_secs(10), |m| {
        metric(m, "flowexport_kafka_records_buffered").unwrap_or(0.0) >= 8.0
    });
    assert!(waited, "records were not buffered during the outage:\n{m}");
    broker.restart().unwrap();
    sent += send(&l.a, &l.a_dev, frames, 300);
    assert_eq!(sent, 8 * 900);
    let exported_min = 8.0;
    let m = wait_delivered(&agent, exported_min);
    assert_metric(&m, "flowexport_kafka_records_dropped_total", 0.0);
    assert_metric(&m, "flowexport_kafka_records_failed_total", 0.0);
    agent.stop_ok();

    let msgs = broker.consume_all("flows").unwrap();
    // At-least-once: a retried request may have been stored twice. Such a
    // duplicate is byte-identical (same flow, same times), so count and drop
    // them; what remains must be exactly what was sent.
    let mut seen = HashSet::new();
    let unique: Vec<Consumed> = msgs
        .iter()
        .filter(|m| seen.insert(m.payload.clone()))
        .cloned()
        .collect();
    let duplicates = msgs.len() - unique.len();
    eprintln!("{} messages, {duplicates} duplicates", msgs.len());
    let got = totals(&decode_pb(&unique));
    assert_eq!(got.len(), 8);
    for i in 0..8u16 {
        let t = got[&FlowId::new(0, ifb, "10.42.0.1", "10.42.0.2", 17, 7000 + i as u64, 9, 0)];
        assert_eq!((t.packets, t.bytes), (900, 900 * 78), "flow {i}");
        // One slice exported while the broker was down, one after.
        assert!(
            t.records >= 2,
            "each flow exported before and after the restart: {t:?}"
        );
    }
}

#[test]
fn unreachable_broker_keeps_other_sinks_and_bad_property_is_refused() {
    let l = Link::new().unwrap();
    let ifb = l.b.ifindex(&l.b_dev).unwrap();
    // Nothing listens on port 1: the agent says so and keeps counting, with
    // stdout still working.
    let agent = Agent::start(
        &l.b,
        &kafka_agent(
            &l.b_dev,
            "127.0.0.1:1",
            &["--stdout", "--kafka-flush-timeout", "1s"],
        ),
    )
    .unwrap();
    assert!(
        agent
            .stderr()
            .contains("cannot reach Kafka brokers 127.0.0.1:1"),
        "{}",
        agent.stderr()
    );
    send_one(
        &l.a,
        &l.a_dev,
        eth4("10.43.0.1", "10.43.0.2", &L4::udp(1, 2, 10)),
        4,
    );
    let out = agent.stop_ok();
    assert_flows_one(
        &out.records,
        FlowId::new(0, ifb, "10.43.0.1", "10.43.0.2", 17, 1, 2, 0),
        4,
        4 * 38,
    );
    assert!(
        out.stderr
            .contains("records not acknowledged within --kafka-flush-timeout"),
        "{}",
        out.stderr
    );

    Agent::refused(
        &l.b,
        &kafka_agent(&l.b_dev, "127.0.0.1:1", &["-X", "no.such.property=1"]),
        &["invalid Kafka producer configuration", "no.such.property"],
    );
    Agent::refused(
        &l.b,
        &kafka_agent(&l.b_dev, "127.0.0.1:1", &["-X", "oops"]),
        &["expected KEY=VALUE"],
    );
}

fn assert_flows_one(records: &[Value], id: FlowId, packets: u64, bytes: u64) {
    let got = totals(records);
    assert_eq!(got.len(), 1, "{got:?}");
    let t = got[&id];
    assert_eq!((t.packets, t.bytes), (packets, bytes));
}
