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

fn send(ns: &Netns, dev: &str, frame: Vec<u8>, repeat: usize) {
    let n = send_frames(ns, dev, vec![frame], repeat, 64, Duration::from_micros(200))
        .expect("send frames");
    assert_eq!(n, repeat as u64);
}

fn udp4(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<u8> {
    eth_ipv4(ipv4(
        v4(src),
        v4(dst),
        &L4::Udp {
            sport,
            dport,
            payload: 100,
        },
    ))
}

fn tcp4(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<u8> {
    eth_ipv4(ipv4(
        v4(src),
        v4(dst),
        &L4::Tcp {
            sport,
            dport,
            flags: TCP_ACK,
            payload: 200,
        },
    ))
}

fn udp6(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<u8> {
    eth_ipv6(ipv6(
        v6(src),
        v6(dst),
        &L4::Udp {
            sport,
            dport,
            payload: 100,
        },
    ))
}

fn icmp4(src: &str, dst: &str) -> Vec<u8> {
    eth_ipv4(ipv4(
        v4(src),
        v4(dst),
        &L4::Icmp {
            ty: 8,
            code: 0,
            payload: 56,
        },
    ))
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
    let mut got = (0, 0);
    wait_until(Duration::from_secs(10), || {
        let text = agent.metrics(9590).unwrap_or_default();
        got = (read(&text, "ingress"), read(&text, "egress"));
        got == (ingress, egress)
    });
    got
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
    /// Starts the agent in B on both links with `capture` flags and `rules`.
    fn agent(&self, capture: &[&str], rules: &[&str]) -> Agent {
        let mut args = vec!["--iface", &self.ab.b_dev, "--iface", &self.b1];
        args.extend_from_slice(capture);
        for r in rules {
            args.extend_from_slice(&["--filter", r]);
        }
        Agent::start(&self.ab.b, &args).unwrap()
    }
}

fn topology() -> Topology {
    let ab = Link::new().unwrap();
    let c = Netns::new().unwrap();
    let (b1, _c0) = veth_between(&ab.b, &c).unwrap();
    let if_b0 = ab.b.ifindex(&ab.b_dev).unwrap();
    let if_b1 = ab.b.ifindex(&b1).unwrap();
    Topology {
        ab,
        _c: c,
        b1,
        if_b0,
        if_b1,
    }
}

#[test]
fn reject_rules_leave_out_exactly_the_matching_packets() {
    let t = topology();
    let (a, a_dev, b) = (&t.ab.a, &t.ab.a_dev, &t.ab.b);
    let agent = t.agent(
        &["--xdp-mode", "native"],
        &[
            "action=reject,cidr=10.99.0.0/16",
            "action=reject,proto=tcp,port=22",
            "action=reject,direction=egress,proto=udp,dst-port=9999",
            "action=reject,src-cidr=2001:db8:bad::/48",
        ],
    );
    // Ingress (XDP on b0).
    send(a, a_dev, udp4("10.1.0.1", "10.1.0.2", 40000, 53), 100);
    send(a, a_dev, udp4("10.99.1.1", "10.1.0.2", 40000, 53), 30); // cidr (source)
    send(a, a_dev, tcp4("10.1.0.1", "10.99.0.5", 50000, 80), 10); // cidr (destination)
    send(a, a_dev, tcp4("10.1.0.1", "10.1.0.2", 40000, 22), 12); // tcp port 22
    send(a, a_dev, tcp4("10.1.0.1", "10.1.0.2", 22, 40001), 5); // either port
    send(a, a_dev, udp4("10.1.0.1", "10.1.0.2", 40002, 22), 6); // udp: counted
    send(a, a_dev, icmp4("10.1.0.1", "10.1.0.2"), 7);
    send(
        a,
        a_dev,
        udp6("2001:db8:bad::1", "2001:db8:1::2", 40003, 443),
        9,
    ); // src-cidr
    send(
        a,
        a_dev,
        udp6("2001:db8:1::1", "2001:db8:bad::2", 40004, 443),
        4,
    ); // dst: counted
    send(a, a_dev, udp4("10.1.0.1", "10.1.0.2", 40005, 9999), 6); // egress rule only
                                                                  // Egress (TC on b1).
    send(b, &t.b1, udp4("10.2.0.2", "10.2.0.3", 1234, 9999), 8); // egress dst-port
    send(b, &t.b1, udp4("10.2.0.2", "10.2.0.3", 1234, 5678), 25);

    assert_eq!(filtered(&agent, 30 + 10 + 12 + 5 + 9, 8), (66, 8));
    let out = agent.stop().unwrap();
    assert!(out.status.success(), "agent failed: {}", out.stderr);
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

/// With an accept rule, what no rule matches is left out; the first
/// matching rule wins (a reject before an accept). Ingress through TC here.
#[test]
fn accept_rules_count_only_what_they_accept() {
    let t = topology();
    let (a, a_dev, b) = (&t.ab.a, &t.ab.a_dev, &t.ab.b);
    let agent = t.agent(
        &["--capture", "tc"],
        &[
            "action=reject,dst-port=53",
            "action=accept,proto=udp,dst-cidr=10.1.0.0/24",
            "action=accept,proto=icmp,direction=ingress",
        ],
    );
    send(a, a_dev, udp4("10.1.0.1", "10.1.0.2", 40000, 53), 20); // first rule
    send(a, a_dev, udp4("10.1.0.1", "10.1.0.2", 40000, 9999), 15); // accepted
    send(a, a_dev, icmp4("10.1.0.1", "10.1.0.2"), 7); // accepted
    send(a, a_dev, tcp4("10.1.0.1", "10.1.0.2", 50000, 80), 11); // no rule
    send(a, a_dev, udp6("2001:db8:1::1", "2001:db8:1::2", 1, 2), 4); // no rule
    send(b, &t.b1, udp4("10.2.0.2", "10.2.0.3", 1234, 5678), 25); // no rule
    send(b, &t.b1, icmp4("10.2.0.2", "10.2.0.3"), 3); // icmp, but egress

    assert_eq!(filtered(&agent, 20 + 11 + 4, 25 + 3), (35, 28));
    let out = agent.stop().unwrap();
    assert!(out.status.success(), "agent failed: {}", out.stderr);
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
