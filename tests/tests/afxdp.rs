//! `--capture afxdp --mirror` and `--mirror`: a veth pair stands for a
//! mirror port; frames the test builds arrive on it and must be counted
//! exactly, flow by flow, while the host's stack never sees them.
//!
//! AF_XDP on veth runs in copy mode (no zero-copy driver), one RX queue.

use std::collections::BTreeMap;
use std::time::Duration;

use flowexport_tests::frames::*;
use flowexport_tests::*;

const PACE: Duration = Duration::from_micros(200);

fn send(ns: &Netns, dev: &str, frames: Vec<Vec<u8>>, repeat: usize) -> u64 {
    send_frames(ns, dev, frames, repeat, 64, PACE).expect("send frames")
}

fn assert_flows(got: &BTreeMap<FlowId, Totals>, want: &[(FlowId, u64, u64, u64)]) {
    let want: BTreeMap<FlowId, (u64, u64, u64)> = want
        .iter()
        .map(|(id, p, b, f)| (id.clone(), (*p, *b, *f)))
        .collect();
    let got: BTreeMap<FlowId, (u64, u64, u64)> = got
        .iter()
        .map(|(id, t)| (id.clone(), (t.packets, t.bytes, t.tcp_flags)))
        .collect();
    assert_eq!(got, want, "flows (packets, bytes, tcp_flags) differ");
}

/// The frames of the kernel paths' integration cases (UDP, TCP and ICMP
/// over IPv4 and IPv6, one and two VLAN tags, IPv4 fragments, IPv6
/// extension headers, a protocol without ports, non-IP), sent into a
/// mirror port; returns the flows expected on ingress of `ifb`.
fn send_the_cases(l: &Link, ifb: u32) -> Vec<(FlowId, u64, u64, u64)> {
    let (a, dev) = (&l.a, l.a_dev.as_str());
    let (s4, d4) = (v4("10.5.0.1"), v4("10.5.0.2"));
    let (s6, d6) = (v6("2001:db8:5::1"), v6("2001:db8:5::2"));
    let udp = ipv4(
        s4,
        d4,
        &L4::Udp {
            sport: 7,
            dport: 9,
            payload: 64,
        },
    );
    assert_eq!(send(a, dev, vec![eth_ipv4(udp.clone())], 9), 9);
    let tcp6 = ipv6(
        s6,
        d6,
        &L4::Tcp {
            sport: 6000,
            dport: 443,
            flags: TCP_SYN,
            payload: 20,
        },
    );
    assert_eq!(send(a, dev, vec![eth_ipv6(tcp6.clone())], 4), 4);
    let icmp = ipv4(
        s4,
        d4,
        &L4::Icmp {
            ty: 8,
            code: 0,
            payload: 56,
        },
    );
    assert_eq!(send(a, dev, vec![eth_ipv4(icmp.clone())], 3), 3);
    let icmp6 = ipv6(
        s6,
        d6,
        &L4::Icmpv6 {
            ty: 128,
            code: 0,
            payload: 56,
        },
    );
    assert_eq!(send(a, dev, vec![eth_ipv6(icmp6.clone())], 2), 2);
    let qinq = ethernet(&[(ETH_P_8021AD, 200), (ETH_P_8021Q, 100)], ETH_P_IP, &udp);
    assert_eq!(send(a, dev, vec![qinq], 6), 6);
    let tagged6 = ethernet(&[(ETH_P_8021Q, 4094)], ETH_P_IPV6, &tcp6);
    assert_eq!(send(a, dev, vec![tagged6], 5), 5);
    // One 3000-byte UDP datagram in three fragments: the first carries the
    // ports, the other two form a port-less flow.
    let big = L4::Udp {
        sport: 3333,
        dport: 4444,
        payload: 2992,
    }
    .bytes();
    let f1 = ipv4_raw(s4, d4, 17, &big[..1480], 0, true);
    let f2 = ipv4_raw(s4, d4, 17, &big[1480..2960], 185, true);
    let f3 = ipv4_raw(s4, d4, 17, &big[2960..], 370, false);
    assert_eq!(
        send(a, dev, vec![eth_ipv4(f1), eth_ipv4(f2), eth_ipv4(f3)], 4),
        12
    );
    // Hop-by-hop, destination options and a first fragment before TCP.
    let tcp = L4::Tcp {
        sport: 6001,
        dport: 7001,
        flags: TCP_SYN,
        payload: 40,
    }
    .bytes();
    let frag0 = ipv6_frag(6, 0, true, &tcp);
    let dst = ipv6_ext(44, 1, &frag0);
    let hbh = ipv6_ext(60, 0, &dst);
    let ext = ipv6_raw(s6, d6, 0, &hbh);
    assert_eq!(send(a, dev, vec![eth_ipv6(ext.clone())], 3), 3);
    let gre = ipv4(
        s4,
        d4,
        &L4::Raw {
            proto: 47,
            payload: 30,
        },
    );
    assert_eq!(send(a, dev, vec![eth_ipv4(gre)], 2), 2);
    assert_eq!(send(a, dev, vec![arp()], 7), 7);

    let id = |src: &str, dst: &str, proto: u64, sp: u64, dp: u64, vlan: u64| {
        FlowId::new(0, ifb, src, dst, proto, sp, dp, vlan)
    };
    let mut icmp_id = id("10.5.0.1", "10.5.0.2", 1, 0, 0, 0);
    icmp_id.icmp_type = 8;
    let mut icmp6_id = id("2001:db8:5::1", "2001:db8:5::2", 58, 0, 0, 0);
    icmp6_id.icmp_type = 128;
    let syn = u64::from(TCP_SYN);
    vec![
        (id("10.5.0.1", "10.5.0.2", 17, 7, 9, 0), 9, 9 * 92, 0),
        (
            id("2001:db8:5::1", "2001:db8:5::2", 6, 6000, 443, 0),
            4,
            4 * tcp6.len() as u64,
            syn,
        ),
        (icmp_id, 3, 3 * icmp.len() as u64, 0),
        (icmp6_id, 2, 2 * icmp6.len() as u64, 0),
        (id("10.5.0.1", "10.5.0.2", 17, 7, 9, 200), 6, 6 * 92, 0),
        (
            id("2001:db8:5::1", "2001:db8:5::2", 6, 6000, 443, 4094),
            5,
            5 * tcp6.len() as u64,
            syn,
        ),
        (
            id("10.5.0.1", "10.5.0.2", 17, 3333, 4444, 0),
            4,
            4 * 1500,
            0,
        ),
        (
            id("10.5.0.1", "10.5.0.2", 17, 0, 0, 0),
            8,
            4 * (1500 + 60),
            0,
        ),
        (
            id("2001:db8:5::1", "2001:db8:5::2", 6, 6001, 7001, 0),
            3,
            3 * ext.len() as u64,
            syn,
        ),
        (id("10.5.0.1", "10.5.0.2", 47, 0, 0, 0), 2, 2 * 50, 0),
    ]
}

/// Every case with AF_XDP: the same exact flows as the kernel paths count,
/// non-IP frames in their metric, nothing reaching the host's stack.
#[test]
fn afxdp_mirror_counts_every_case_exactly() {
    let l = Link::new().unwrap();
    let ifb = l.b.ifindex(&l.b_dev).unwrap();
    let stack_before = l.b.snmp("Ip", "InReceives").unwrap();
    let agent = Agent::start(
        &l.b,
        &[
            "--iface",
            &l.b_dev,
            "--capture",
            "afxdp",
            "--mirror",
            "--sampler-address",
            "192.0.2.10",
        ],
    )
    .unwrap();
    let want = send_the_cases(&l, ifb);
    // Read before the metrics are fetched (over this namespace's loopback,
    // which the counter also counts).
    let stack_after = l.b.snmp("Ip", "InReceives").unwrap();
    let mut m = String::new();
    let seen = wait_until(Duration::from_secs(10), || {
        m = agent.metrics(9590).unwrap_or_default();
        metric(&m, "flowexport_non_ip_packets_total{direction=\"ingress\"}") == Some(7.0)
    });
    assert!(seen, "non-IP frames not counted:\n{m}");
    let dropped = format!(
        "flowexport_afxdp_dropped_packets_total{{iface=\"{}\",queue=\"0\",reason=\"rx_dropped\"}}",
        l.b_dev
    );
    assert_eq!(metric(&m, &dropped).unwrap_or(0.0), 0.0, "{m}");
    let out = agent.stop().unwrap();
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out.stderr.contains("copy mode"), "{}", out.stderr);
    assert_flows(&totals(&out.records), &want);
    assert_eq!(
        stack_after, stack_before,
        "mirrored frames reached the host's stack"
    );
}

/// `--mirror` with the XDP program: the copies are counted and dropped, no
/// egress program is attached.
#[test]
fn xdp_mirror_counts_and_drops_the_copies() {
    let l = Link::new().unwrap();
    let ifb = l.b.ifindex(&l.b_dev).unwrap();
    let stack_before = l.b.snmp("Ip", "InReceives").unwrap();
    let agent = Agent::start(
        &l.b,
        &[
            "--iface",
            &l.b_dev,
            "--mirror",
            "--xdp-mode",
            "native",
            "--sampler-address",
            "192.0.2.10",
        ],
    )
    .unwrap();
    let want = send_the_cases(&l, ifb);
    // The host's own frame out of the mirror port is not counted.
    let out_frame = eth_ipv4(ipv4(
        v4("10.5.0.2"),
        v4("10.5.0.1"),
        &L4::Udp {
            sport: 9,
            dport: 7,
            payload: 10,
        },
    ));
    assert_eq!(send(&l.b, &l.b_dev, vec![out_frame], 5), 5);
    let out = agent.stop().unwrap();
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        out.stderr.contains("mirror (copies dropped, no egress)"),
        "{}",
        out.stderr
    );
    assert_flows(&totals(&out.records), &want);
    assert_eq!(
        l.b.snmp("Ip", "InReceives").unwrap(),
        stack_before,
        "mirrored frames reached the host's stack"
    );
}

/// A burst into a deliberately tiny ring: every frame is either exported or
/// counted as dropped by its reason.
#[test]
fn afxdp_tiny_ring_accounts_for_every_frame() {
    let l = Link::new().unwrap();
    let agent = Agent::start(
        &l.b,
        &[
            "--iface",
            &l.b_dev,
            "--capture",
            "afxdp",
            "--mirror",
            "--afxdp-frames",
            "64",
        ],
    )
    .unwrap();
    let frame = eth_ipv4(ipv4(
        v4("10.6.0.1"),
        v4("10.6.0.2"),
        &L4::Udp {
            sport: 1,
            dport: 2,
            payload: 18,
        },
    ));
    // 20,000 frames in bursts of 200: less than the veth's own ring (256),
    // which would otherwise drop before any program sees the frames, and
    // far more than the socket's 64 frames.
    let sent = send_frames(&l.a, &l.a_dev, vec![frame], 20_000, 200, PACE).unwrap();
    assert_eq!(sent, 20_000);
    let mut m = String::new();
    let settled = wait_until(Duration::from_secs(10), || {
        m = agent.metrics(9590).unwrap_or_default();
        let counted = metric(&m, "flowexport_packets_total{direction=\"ingress\"}").unwrap_or(0.0);
        let dropped: f64 = ["rx_dropped", "rx_ring_full", "rx_invalid_descs"]
            .iter()
            .map(|r| {
                metric(
                    &m,
                    &format!(
                        "flowexport_afxdp_dropped_packets_total{{iface=\"{}\",queue=\"0\",reason=\"{r}\"}}",
                        l.b_dev
                    ),
                )
                .unwrap_or(0.0)
            })
            .sum();
        let no_socket = metric(&m, "flowexport_afxdp_no_socket_packets_total").unwrap_or(0.0);
        counted + dropped + no_socket == 20_000.0
    });
    let out = agent.stop().unwrap();
    assert!(out.status.success(), "{}", out.stderr);
    let exported: u64 = totals(&out.records).values().map(|t| t.packets).sum();
    assert!(settled, "counted + dropped != 20000 sent:\n{m}");
    let counted = metric(&m, "flowexport_packets_total{direction=\"ingress\"}").unwrap_or(0.0);
    assert_eq!(exported as f64, counted, "exported != counted:\n{m}");
    eprintln!(
        "tiny ring: {exported} exported, {} dropped",
        20_000 - exported
    );
}

#[test]
fn afxdp_needs_mirror_and_names_what_does_not_fit() {
    let l = Link::new().unwrap();
    Agent::refused(
        &l.b,
        &["--iface", &l.b_dev, "--capture", "afxdp"],
        &[
            "takes every packet of the interface away from the host",
            "--mirror",
        ],
    );
    Agent::refused(
        &l.b,
        &["--iface", "veth*", "--capture", "afxdp", "--mirror"],
        &["not globs"],
    );
    Agent::refused(
        &l.b,
        &[
            "--iface",
            &l.b_dev,
            "--capture",
            "afxdp",
            "--mirror",
            "--afxdp-frames",
            "100",
        ],
        &["--afxdp-frames 100 must be a power of two"],
    );
    Agent::refused(
        &l.b,
        &["--iface", &l.b_dev, "--afxdp-frames", "64"],
        &["apply to --capture afxdp"],
    );
    Agent::refused(
        &l.b,
        &[
            "--iface",
            &l.b_dev,
            "--capture",
            "afxdp",
            "--mirror",
            "--afxdp-queues",
            "3",
        ],
        &["has no RX queue 3"],
    );
}
