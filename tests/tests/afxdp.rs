//! `--capture afxdp --mirror` and `--mirror`: a veth pair stands for a
//! mirror port; frames the test builds arrive on it and must be counted
//! exactly, flow by flow, while the host's stack never sees them.
//!
//! AF_XDP on veth runs in copy mode (no zero-copy driver), one RX queue.

use std::collections::BTreeMap;
use std::time::Duration;

use flowexport_tests::frames::*;
use flowexport_tests::*;

/// `flowexport agent` flags: AF_XDP capture on the mirror port `dev`, then
/// `extra`.
fn afxdp_args<'a>(dev: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    [&["--iface", dev, "--capture", "afxdp", "--mirror"], extra].concat()
}

/// `flowexport_afxdp_dropped_packets_total` of queue 0 of `dev` for
/// `reason` (0 when absent).
fn afxdp_dropped(m: &str, dev: &str, reason: &str) -> f64 {
    let name = format!(
        "flowexport_afxdp_dropped_packets_total{{iface=\"{dev}\",queue=\"0\",reason=\"{reason}\"}}"
    );
    metric(m, &name).unwrap_or(0.0)
}

/// The frames of the kernel paths' integration cases (UDP, TCP and ICMP
/// over IPv4 and IPv6, one and two VLAN tags, IPv4 fragments, IPv6
/// extension headers, a protocol without ports, non-IP), sent into a
/// mirror port; returns the flows expected on ingress of `ifb`.
/// A flow expected in the records: id, packets, bytes, OR of TCP flags.
type Want = (FlowId, u64, u64, u64);

fn send_the_cases(l: &Link, ifb: u32) -> Vec<Want> {
    let (s4, d4) = (v4("10.5.0.1"), v4("10.5.0.2"));
    let (s6, d6) = (v6("2001:db8:5::1"), v6("2001:db8:5::2"));
    let (a4, b4, a6, b6) = ("10.5.0.1", "10.5.0.2", "2001:db8:5::1", "2001:db8:5::2");
    let udp = ipv4(s4, d4, &L4::udp(7, 9, 64));
    let tcp6 = ipv6(s6, d6, &L4::tcp(6000, 443, TCP_SYN, 20));
    let icmp = ipv4(s4, d4, &L4::icmp(8, 0, 56));
    let icmp6 = ipv6(s6, d6, &L4::icmpv6(128, 0, 56));
    let gre = ipv4(s4, d4, &L4::raw(47, 30));
    // One 3000-byte UDP datagram in three fragments: the first carries the
    // ports, the other two form a port-less flow.
    let frags = udp_in_three_fragments(s4, d4);
    // Hop-by-hop, destination options and a first fragment before TCP.
    let tcp = L4::tcp(6001, 7001, TCP_SYN, 40).bytes();
    let ext = ipv6_raw(
        s6,
        d6,
        0,
        &ipv6_ext(60, 0, &ipv6_ext(44, 1, &ipv6_frag(6, 0, true, &tcp))),
    );
    let id = |src: &str, dst: &str, proto: u64, sp: u64, dp: u64, vlan: u64| {
        FlowId::new(0, ifb, src, dst, proto, sp, dp, vlan)
    };
    let icmp_id = |src, dst, proto, ty| FlowId {
        icmp_type: ty,
        ..id(src, dst, proto, 0, 0, 0)
    };
    let syn = u64::from(TCP_SYN);
    let len = |p: &[u8]| p.len() as u64;
    // (frames, times each, the flows they make)
    let cases: Vec<(Vec<Vec<u8>>, usize, Vec<Want>)> = vec![
        (
            vec![eth_ipv4(udp.clone())],
            9,
            vec![(id(a4, b4, 17, 7, 9, 0), 9, 9 * 92, 0)],
        ),
        (
            vec![eth_ipv6(tcp6.clone())],
            4,
            vec![(id(a6, b6, 6, 6000, 443, 0), 4, 4 * len(&tcp6), syn)],
        ),
        (
            vec![eth_ipv4(icmp.clone())],
            3,
            vec![(icmp_id(a4, b4, 1, 8), 3, 3 * len(&icmp), 0)],
        ),
        (
            vec![eth_ipv6(icmp6.clone())],
            2,
            vec![(icmp_id(a6, b6, 58, 128), 2, 2 * len(&icmp6), 0)],
        ),
        (
            vec![ethernet(
                &[(ETH_P_8021AD, 200), (ETH_P_8021Q, 100)],
                ETH_P_IP,
                &udp,
            )],
            6,
            vec![(id(a4, b4, 17, 7, 9, 200), 6, 6 * 92, 0)],
        ),
        (
            vec![ethernet(&[(ETH_P_8021Q, 4094)], ETH_P_IPV6, &tcp6)],
            5,
            vec![(id(a6, b6, 6, 6000, 443, 4094), 5, 5 * len(&tcp6), syn)],
        ),
        (
            frags,
            4,
            vec![
                (id(a4, b4, 17, 3333, 4444, 0), 4, 4 * 1500, 0),
                (id(a4, b4, 17, 0, 0, 0), 8, 4 * (1500 + 60), 0),
            ],
        ),
        (
            vec![eth_ipv6(ext.clone())],
            3,
            vec![(id(a6, b6, 6, 6001, 7001, 0), 3, 3 * len(&ext), syn)],
        ),
        (
            vec![eth_ipv4(gre)],
            2,
            vec![(id(a4, b4, 47, 0, 0, 0), 2, 2 * 50, 0)],
        ),
        (vec![arp()], 7, vec![]),
    ];
    let mut want = Vec::new();
    for (frames, times, flows) in cases {
        let n = frames.len() * times;
        assert_eq!(send(&l.a, &l.a_dev, frames, times), n as u64);
        want.extend(flows);
    }
    want
}

/// An agent with `flags` on a mirror port: every case is counted exactly
/// and none reaches the host's stack; `during` runs while the agent does.
/// Returns the agent's log.
fn every_case_on_a_mirror_port(flags: &[&str], during: impl FnOnce(&Link, &Agent)) -> String {
    let l = Link::new().unwrap();
    let ifb = l.b.ifindex(&l.b_dev).unwrap();
    let stack_before = l.b.snmp("Ip", "InReceives").unwrap();
    let mut args = vec!["--iface", &l.b_dev, "--sampler-address", "192.0.2.10"];
    args.extend_from_slice(flags);
    let agent = Agent::start(&l.b, &args).unwrap();
    let want = send_the_cases(&l, ifb);
    // Read before any metrics are fetched (over this namespace's loopback,
    // which the counter also counts).
    let stack_after = l.b.snmp("Ip", "InReceives").unwrap();
    during(&l, &agent);
    let out = agent.stop_ok();
    assert_flows(&totals(&out.records), &want);
    assert_eq!(
        stack_after, stack_before,
        "mirrored frames reached the host's stack"
    );
    out.stderr
}

/// Every case with AF_XDP: the same exact flows as the kernel paths count,
/// non-IP frames in their metric, no drop.
#[test]
fn afxdp_mirror_counts_every_case_exactly() {
    let log = every_case_on_a_mirror_port(&["--capture", "afxdp", "--mirror"], |l, agent| {
        let (seen, m) = agent.wait_metrics(9590, Duration::from_secs(10), |m| {
            metric(m, "flowexport_non_ip_packets_total{direction=\"ingress\"}") == Some(7.0)
        });
        assert!(seen, "non-IP frames not counted:\n{m}");
        assert_eq!(afxdp_dropped(&m, &l.b_dev, "rx_dropped"), 0.0, "{m}");
    });
    assert!(log.contains("copy mode"), "{log}");
}

/// `--mirror` with the XDP program: the copies are counted and dropped, no
/// egress program is attached (the host's own frames out of the port are
/// not counted).
#[test]
fn xdp_mirror_counts_and_drops_the_copies() {
    let log = every_case_on_a_mirror_port(&["--mirror", "--xdp-mode", "native"], |l, _| {
        let out_frame = eth4("10.5.0.2", "10.5.0.1", &L4::udp(9, 7, 10));
        send_one(&l.b, &l.b_dev, out_frame, 5);
    });
    assert!(log.contains("mirror (copies dropped, no egress)"), "{log}");
}

/// Jumbo frames on a mirror port with a 9,000-byte MTU: the XDP program is
/// multi-buffer aware (native XDP on a veth takes it at this MTU) and the
/// socket is bound with XDP_USE_SG, so each frame arrives in several UMEM
/// frames and is counted once, exactly, from its first; none is dropped.
#[test]
fn afxdp_counts_jumbo_frames_exactly() {
    let l = Link::new().unwrap();
    for (ns, dev) in [(&l.a, &l.a_dev), (&l.b, &l.b_dev)] {
        ns.exec(&["ip", "link", "set", dev, "mtu", "9000"]).unwrap();
    }
    let ifb = l.b.ifindex(&l.b_dev).unwrap();
    let agent = Agent::start(&l.b, &afxdp_args(&l.b_dev, &["--xdp-mode", "native"])).unwrap();
    let (a4, b4, a6, b6) = ("10.7.0.1", "10.7.0.2", "2001:db8:7::1", "2001:db8:7::2");
    // 8,000 bytes of payload: frames of 8,042 and 8,074 bytes (three UMEM
    // frames each); a small frame between them.
    send_one(&l.a, &l.a_dev, eth4(a4, b4, &L4::udp(1111, 2222, 8000)), 7);
    send_one(&l.a, &l.a_dev, eth4(a4, b4, &L4::udp(1111, 2223, 10)), 2);
    let tcp6 = L4::tcp(3333, 4444, TCP_ACK | TCP_PSH, 8000);
    send_one(&l.a, &l.a_dev, eth6(a6, b6, &tcp6), 5);
    let (seen, m) = agent.wait_metrics(9590, Duration::from_secs(10), |m| {
        metric(m, "flowexport_packets_total{direction=\"ingress\"}") == Some(14.0)
    });
    assert!(seen, "not every frame counted:\n{m}");
    assert_eq!(afxdp_dropped(&m, &l.b_dev, "rx_dropped"), 0.0, "{m}");
    // The later pieces of a frame are not parsed as frames of their own.
    for other in ["non_ip", "malformed"] {
        let name = format!("flowexport_{other}_packets_total{{direction=\"ingress\"}}");
        assert_eq!(metric(&m, &name).unwrap_or(0.0), 0.0, "{m}");
    }
    let out = agent.stop_ok();
    assert!(
        out.stderr.contains("longer frames in several"),
        "{}",
        out.stderr
    );
    let flow =
        |src: &str, dst: &str, proto, sp, dp| FlowId::new(0, ifb, src, dst, proto, sp, dp, 0);
    assert_flows(
        &totals(&out.records),
        &[
            (flow(a4, b4, 17, 1111, 2222), 7, 7 * 8028, 0),
            (flow(a4, b4, 17, 1111, 2223), 2, 2 * 38, 0),
            (
                flow(a6, b6, 6, 3333, 4444),
                5,
                5 * 8060,
                (TCP_ACK | TCP_PSH) as u64,
            ),
        ],
    );
}

/// A burst into a deliberately tiny ring: every frame is either exported or
/// counted as dropped by its reason.
#[test]
fn afxdp_tiny_ring_accounts_for_every_frame() {
    let l = Link::new().unwrap();
    let agent = Agent::start(&l.b, &afxdp_args(&l.b_dev, &["--afxdp-frames", "64"])).unwrap();
    let frame = eth4("10.6.0.1", "10.6.0.2", &L4::udp(1, 2, 18));
    // 20,000 frames in bursts of 200: less than the veth's own ring (256),
    // which would otherwise drop before any program sees the frames, and
    // far more than the socket's 64 frames.
    let sent = send_frames(&l.a, &l.a_dev, vec![frame], 20_000, 200, PACE).unwrap();
    assert_eq!(sent, 20_000);
    let (settled, m) = agent.wait_metrics(9590, Duration::from_secs(10), |m| {
        let counted = metric(m, "flowexport_packets_total{direction=\"ingress\"}").unwrap_or(0.0);
        let dropped: f64 = ["rx_dropped", "rx_ring_full", "rx_invalid_descs"]
            .iter()
            .map(|r| afxdp_dropped(m, &l.b_dev, r))
            .sum();
        let no_socket = metric(m, "flowexport_afxdp_no_socket_packets_total").unwrap_or(0.0);
        counted + dropped + no_socket == 20_000.0
    });
    let out = agent.stop_ok();
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
    let dev = l.b_dev.as_str();
    for (args, says) in [
        (
            vec!["--iface", dev, "--capture", "afxdp"],
            &[
                "takes every packet of the interface away from the host",
                "--mirror",
            ][..],
        ),
        (afxdp_args("veth*", &[]), &["not globs"]),
        (
            afxdp_args(dev, &["--afxdp-frames", "100"]),
            &["--afxdp-frames 100 must be a power of two"],
        ),
        (
            vec!["--iface", dev, "--afxdp-frames", "64"],
            &["apply to --capture afxdp"],
        ),
        (
            afxdp_args(dev, &["--afxdp-queues", "3"]),
            &["has no RX queue 3"],
        ),
        // veth has no zero-copy AF_XDP: `on` refuses, naming the way out.
        (
            afxdp_args(dev, &["--afxdp-zero-copy", "on"]),
            &[
                "cannot open an AF_XDP socket",
                "--afxdp-zero-copy auto or off",
            ],
        ),
    ] {
        Agent::refused(&l.b, &args, says);
    }
}

/// Frames the test encapsulates in VXLAN, GENEVE, GRE with a key, ERSPAN
/// II and III and IPv4-in-IPv4: each counts as its inner flow, exactly,
/// with the tunnel's type, id and outer addresses; with `--decap none` as
/// the outer packets.
#[test]
fn afxdp_decapsulates_tunnels_into_inner_flows() {
    let (outer_s, outer_d) = (v4("198.51.100.1"), v4("198.51.100.2"));
    let inner_ip = |n: u8| {
        let (src, dst) = (format!("172.16.{n}.1"), format!("172.16.{n}.2"));
        ipv4(v4(&src), v4(&dst), &L4::udp(5000, 6000, 40))
    };
    let inner_eth = |n: u8| eth_ipv4(inner_ip(n));
    // (outer frame, times, inner net, tunnel type, tunnel id)
    let cases: Vec<(Vec<u8>, usize, u8, &str, u64)> = vec![
        (
            eth_ipv4(ipv4_raw(
                outer_s,
                outer_d,
                17,
                &udp_with(40000, 4789, &vxlan(5001, &inner_eth(1))),
                0,
                false,
            )),
            3,
            1,
            "vxlan",
            5001,
        ),
        (
            eth_ipv4(ipv4_raw(
                outer_s,
                outer_d,
                17,
                &udp_with(40000, 6081, &geneve(77, &inner_eth(2))),
                0,
                false,
            )),
            4,
            2,
            "geneve",
            77,
        ),
        (
            eth_ipv4(ipv4_raw(
                outer_s,
                outer_d,
                47,
                &gre(0x6558, Some(1234), None, &inner_eth(3)),
                0,
                false,
            )),
            5,
            3,
            "gre",
            1234,
        ),
        (
            eth_ipv4(ipv4_raw(
                outer_s,
                outer_d,
                47,
                &gre(0x88be, None, Some(1), &erspan2(300, &inner_eth(4))),
                0,
                false,
            )),
            6,
            4,
            "erspan",
            300,
        ),
        (
            eth_ipv4(ipv4_raw(
                outer_s,
                outer_d,
                47,
                &gre(0x22eb, None, Some(1), &erspan3(512, &inner_eth(5))),
                0,
                false,
            )),
            2,
            5,
            "erspan",
            512,
        ),
        (
            eth_ipv4(ipv4_raw(outer_s, outer_d, 4, &inner_ip(6), 0, false)),
            7,
            6,
            "ipip",
            0,
        ),
    ];
    for decap in ["inner", "none"] {
        let l = Link::new().unwrap();
        let ifb = l.b.ifindex(&l.b_dev).unwrap();
        // An IPFIX collector on the namespace's loopback: our decoder reads
        // the exports back.
        let collector =
            l.b.run(|| {
                let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                s
            })
            .unwrap();
        let ipfix = collector.local_addr().unwrap().to_string();
        let flags = ["--decap", decap, "--stdout", "--ipfix", &ipfix];
        let agent = Agent::start(&l.b, &afxdp_args(&l.b_dev, &flags)).unwrap();
        for (frame, times, ..) in &cases {
            send_one(&l.a, &l.a_dev, frame.clone(), *times);
        }
        let out = agent.stop_ok();
        let got = totals(&out.records);
        if decap == "none" {
            // The outer packets: UDP 40000 -> 4789 / 6081, GRE, IP-in-IP.
            let outer = |proto, dport, n: u64, bytes: u64| {
                (
                    FlowId::new(
                        0,
                        ifb,
                        "198.51.100.1",
                        "198.51.100.2",
                        proto,
                        if proto == 17 { 40000 } else { 0 },
                        dport,
                        0,
                    ),
                    n,
                    bytes,
                    0,
                )
            };
            let len = |f: &Vec<u8>| f.len() as u64 - 14;
            assert_flows(
                &got,
                &[
                    outer(17, 4789, 3, 3 * len(&cases[0].0)),
                    outer(17, 6081, 4, 4 * len(&cases[1].0)),
                    outer(
                        47,
                        0,
                        13,
                        5 * len(&cases[2].0) + 6 * len(&cases[3].0) + 2 * len(&cases[4].0),
                    ),
                    outer(4, 0, 7, 7 * len(&cases[5].0)),
                ],
            );
            assert!(out.records.iter().all(|r| r.get("tunnel_type").is_none()));
            continue;
        }
        let want: Vec<_> = cases
            .iter()
            .map(|(_, times, n, ..)| {
                let id = FlowId::new(
                    0,
                    ifb,
                    &format!("172.16.{n}.1"),
                    &format!("172.16.{n}.2"),
                    17,
                    5000,
                    6000,
                    0,
                );
                (id, *times as u64, *times as u64 * 68, 0)
            })
            .collect();
        assert_flows(&got, &want);
        // IPFIX carries the inner flows, with the VNI (VXLAN, GENEVE) or
        // GRE key as layer2SegmentId; ERSPAN and IP-in-IP have none.
        let mut decoder = flowexport::codec::netflow::NetflowDecoder::default();
        let mut exported = Vec::new();
        let mut buf = [0u8; 65536];
        while let Ok(n) = collector.recv(&mut buf) {
            decoder
                .decode("127.0.0.1".parse().unwrap(), &buf[..n], 0, &mut exported)
                .unwrap();
        }
        let segments: BTreeMap<String, (Option<&str>, u32, u64)> = exported
            .iter()
            .map(|r| {
                (
                    r.src_addr.to_string(),
                    (
                        r.tunnel_type.map(flowexport::record::TunnelType::as_str),
                        r.tunnel_id,
                        r.packets,
                    ),
                )
            })
            .collect();
        assert_eq!(
            segments,
            BTreeMap::from([
                ("172.16.1.1".to_string(), (Some("vxlan"), 5001, 3)),
                ("172.16.2.1".to_string(), (Some("vxlan"), 77, 4)),
                ("172.16.3.1".to_string(), (Some("gre"), 1234, 5)),
                ("172.16.4.1".to_string(), (None, 0, 6)),
                ("172.16.5.1".to_string(), (None, 0, 2)),
                ("172.16.6.1".to_string(), (None, 0, 7)),
            ])
        );
        for (_, _, n, kind, id) in &cases {
            let src = format!("172.16.{n}.1");
            for r in out.records.iter().filter(|r| r["src_addr"] == src.as_str()) {
                assert_eq!(r["tunnel_type"], *kind, "{r}");
                assert_eq!(r["tunnel_id"].as_u64().unwrap_or(0), *id, "{r}");
                assert_eq!(r["outer_src_addr"], "198.51.100.1", "{r}");
                assert_eq!(r["outer_dst_addr"], "198.51.100.2", "{r}");
            }
        }
    }
}
