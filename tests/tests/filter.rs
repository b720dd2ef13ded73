//! `--filter`: rules evaluated by the kernel programs. Known frames on veth
//! pairs in namespaces created here, some matching reject or accept rules
//! by CIDR (either address, source, destination; IPv4 and IPv6), protocol,
//! port and direction: the agent's records hold exactly the accepted
//! packets, and `flowexport_filtered_packets_total` exactly the others.
//!
//! Needs root (CI runs as root). Namespaces are removed on drop.

use std::collections::BTreeMap;
use std::time::Duration;

use flowexport_tests::frames::*;
use flowexport_tests::*;

fn udp4(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<u8> {
    eth4(src, dst, &L4::udp(sport, dport, 100))
}

fn tcp4(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<u8> {
    eth4(src, dst, &L4::tcp(sport, dport, TCP_ACK, 200))
}

fn udp6(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<u8> {
    eth6(src, dst, &L4::udp(sport, dport, 100))
}

fn icmp4(src: &str, dst: &str) -> Vec<u8> {
    eth4(src, dst, &L4::icmp(8, 0, 56))
}

/// Flow -> packets, from the agent's records.
fn packets(records: &[serde_json::Value]) -> BTreeMap<FlowId, u64> {
    totals(records)
        .into_iter()
        .map(|(id, t)| (id, t.packets))
        .collect()
}

/// Waits until the agent's filtered-packets metric shows `ingress` and
/// `egress` (it is updated at each drain), then returns both.
fn filtered(agent: &Agent, ingress: u64, egress: u64) -> (u64, u64) {
    let read = |text: &str, dir: &str| {
        metric(
            text,
            &format!("flowexport_filtered_packets_total{{direction=\"{dir}\"}}"),
        )
        .unwrap_or(-1.0) as u64
    };
    let (_, text) = agent.wait_metrics(9590, Duration::from_secs(10), |text| {
        (read(text, "ingress"), read(text, "egress")) == (ingress, egress)
    });
    (read(&text, "ingress"), read(&text, "egress"))
}

/// Two links: A -> B (ingress on b0) and B -> C (egress on b1); the agent
/// runs in B on both.
struct Topology {
    ab: Link,
    _c: Netns,
    b1: String,
    if_b0: u32,
    if_b1: u32,
}

impl Topology {
    /// Sends `frame` `n` times from A: ingress on b0.
    fn ingress(&self, frame: Vec<u8>, n: usize) {
        send_one(&self.ab.a, &self.ab.a_dev, frame, n);
    }

    /// Sends `frame` `n` times from B out of b1: egress.
    fn egress(&self, frame: Vec<u8>, n: usize) {
        send_one(&self.ab.b, &self.b1, frame, n);
    }
}

/// The topology, and the agent started in B on both links with `capture`
/// flags and `rules`.
fn topology(capture: &[&str], rules: &[&str]) -> (Topology, Agent) {
    let ab = Link::new().unwrap();
    let c = Netns::new().unwrap();
    let (b1, _c0) = veth_between(&ab.b, &c).unwrap();
    let if_b0 = ab.b.ifindex(&ab.b_dev).unwrap();
    let if_b1 = ab.b.ifindex(&b1).unwrap();
    let mut args = vec!["--iface", &ab.b_dev, "--iface", &b1];
    args.extend_from_slice(capture);
    for r in rules {
        args.extend_from_slice(&["--filter", r]);
    }
    let agent = Agent::start(&ab.b, &args).unwrap();
    let t = Topology {
        ab,
        _c: c,
        b1,
        if_b0,
        if_b1,
    };
    (t, agent)
}

/// The rules of [`reject_rules_leave_out_exactly_the_matching_packets`].
const REJECT_RULES: [&str; 4] = [
    "action=reject,cidr=10.99.0.0/16",
    "action=reject,proto=tcp,port=22",
    "action=reject,direction=egress,proto=udp,dst-port=9999",
    "action=reject,src-cidr=2001:db8:bad::/48",
];

#[test]
fn reject_rules_leave_out_exactly_the_matching_packets() {
    let (t, agent) = topology(&["--xdp-mode", "native"], &REJECT_RULES);
    // Ingress (XDP on b0).
    t.ingress(udp4("10.1.0.1", "10.1.0.2", 40000, 53), 100);
    t.ingress(udp4("10.99.1.1", "10.1.0.2", 40000, 53), 30); // cidr (source)
    t.ingress(tcp4("10.1.0.1", "10.99.0.5", 50000, 80), 10); // cidr (destination)
    t.ingress(tcp4("10.1.0.1", "10.1.0.2", 40000, 22), 12); // tcp port 22
    t.ingress(tcp4("10.1.0.1", "10.1.0.2", 22, 40001), 5); // either port
    t.ingress(udp4("10.1.0.1", "10.1.0.2", 40002, 22), 6); // udp: counted
    t.ingress(icmp4("10.1.0.1", "10.1.0.2"), 7);
    let (good6, bad6) = ("2001:db8:1::1", "2001:db8:bad::1");
    t.ingress(udp6(bad6, "2001:db8:1::2", 40003, 443), 9); // src-cidr
    t.ingress(udp6(good6, "2001:db8:bad::2", 40004, 443), 4); // dst: counted
    t.ingress(udp4("10.1.0.1", "10.1.0.2", 40005, 9999), 6); // egress rule only

    // Egress (TC on b1).
    t.egress(udp4("10.2.0.2", "10.2.0.3", 1234, 9999), 8); // egress dst-port
    t.egress(udp4("10.2.0.2", "10.2.0.3", 1234, 5678), 25);

    assert_eq!(filtered(&agent, 30 + 10 + 12 + 5 + 9, 8), (66, 8));
    let out = agent.stop_ok();
    let (i, e) = (t.if_b0, t.if_b1);
    let want: BTreeMap<FlowId, u64> = [
        (
            FlowId::new(0, i, "10.1.0.1", "10.1.0.2", 17, 40000, 53, 0),
            100,
        ),
        (
            FlowId::new(0, i, "10.1.0.1", "10.1.0.2", 17, 40002, 22, 0),
            6,
        ),
        (
            FlowId::new(0, i, "10.1.0.1", "10.1.0.2", 1, 0, 0, 0).icmp(8, 0),
            7,
        ),
        (
            FlowId::new(0, i, "2001:db8:1::1", "2001:db8:bad::2", 17, 40004, 443, 0),
            4,
        ),
        (
            FlowId::new(0, i, "10.1.0.1", "10.1.0.2", 17, 40005, 9999, 0),
            6,
        ),
        (
            FlowId::new(1, e, "10.2.0.2", "10.2.0.3", 17, 1234, 5678, 0),
            25,
        ),
    ]
    .into_iter()
    .collect();
    assert_eq!(packets(&out.records), want);
}

/// The rules of [`accept_rules_count_only_what_they_accept`].
const ACCEPT_RULES: [&str; 3] = [
    "action=reject,dst-port=53",
    "action=accept,proto=udp,dst-cidr=10.1.0.0/24",
    "action=accept,proto=icmp,direction=ingress",
];

/// With an accept rule, what no rule matches is left out; the first
/// matching rule wins (a reject before an accept). Ingress through TC here.
#[test]
fn accept_rules_count_only_what_they_accept() {
    let (t, agent) = topology(&["--capture", "tc"], &ACCEPT_RULES);
    t.ingress(udp4("10.1.0.1", "10.1.0.2", 40000, 53), 20); // first rule
    t.ingress(udp4("10.1.0.1", "10.1.0.2", 40000, 9999), 15); // accepted
    t.ingress(icmp4("10.1.0.1", "10.1.0.2"), 7); // accepted
    t.ingress(tcp4("10.1.0.1", "10.1.0.2", 50000, 80), 11); // no rule
    t.ingress(udp6("2001:db8:1::1", "2001:db8:1::2", 1, 2), 4); // no rule
    t.egress(udp4("10.2.0.2", "10.2.0.3", 1234, 5678), 25); // no rule
    t.egress(icmp4("10.2.0.2", "10.2.0.3"), 3); // icmp, but egress

    assert_eq!(filtered(&agent, 20 + 11 + 4, 25 + 3), (35, 28));
    let out = agent.stop_ok();
    let i = t.if_b0;
    let want: BTreeMap<FlowId, u64> = [
        (
            FlowId::new(0, i, "10.1.0.1", "10.1.0.2", 17, 40000, 9999, 0),
            15,
        ),
        (
            FlowId::new(0, i, "10.1.0.1", "10.1.0.2", 1, 0, 0, 0).icmp(8, 0),
            7,
        ),
    ]
    .into_iter()
    .collect();
    assert_eq!(packets(&out.records), want);
}

#[test]
fn bad_rules_are_refused_with_the_rule_named() {
    let l = Link::new().unwrap();
    for (rule, says) in [
        ("action=reject,proto=tcp,port=99999", "key port"),
        ("proto=tcp", "key action is missing"),
        (
            "action=reject,cidr=10.0.0.1/8",
            "host bits set; write 10.0.0.0/8",
        ),
        ("action=reject,colour=red", "key colour: unknown key"),
        ("action=reject,proto=icmp,dst-port=8", "key dst-port"),
    ] {
        let named = format!("filter rule {rule:?}");
        Agent::refused(
            &l.b,
            &["--iface", &l.b_dev, "--filter", rule],
            &[&named, says],
        );
    }
}
