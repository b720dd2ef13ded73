//! Integration tests of `flowexport agent`: the real kernel programs attached
//! to veth pairs in namespaces created here, known frames injected with
//! AF_PACKET, and the JSON records the agent prints checked exactly.
//!
//! Needs root (CI runs as root). Every namespace is removed on drop, also
//! when an assertion fails.

use std::time::Duration;

use flowexport_tests::frames::*;
use flowexport_tests::*;

/// A case run once per way of counting ingress: the XDP program (the
/// default) and the TC program (`--capture tc`); `$case` takes the extra
/// agent flags.
macro_rules! in_each_capture {
    ($case:ident: $xdp:ident, $tc:ident) => {
        #[test]
        fn $xdp() {
            $case(&[]);
        }

        #[test]
        fn $tc() {
            $case(&["--capture", "tc"]);
        }
    };
}

in_each_capture!(both_directions_exact: ipv4_ipv6_udp_tcp_icmp_both_directions_exact, ipv4_ipv6_udp_tcp_icmp_both_directions_exact_tc_capture);

fn both_directions_exact(capture: &[&str]) {
    // A --(a0/b0)--> B <--(b1/c0)-- C ; agent in B on b0 and b1.
    let ab = Link::new().unwrap();
    let c = Netns::new().unwrap();
    let (b1, c0) = veth_between(&ab.b, &c).unwrap();
    let _ = c0;
    let b0 = ab.b_dev.clone();
    let if_b0 = ab.b.ifindex(&b0).unwrap();
    let if_b1 = ab.b.ifindex(&b1).unwrap();
    let agent = Agent::start(&ab.b, &agent_args(&[&b0, &b1], capture)).unwrap();

    let (a4, b4) = (v4("10.1.0.1"), v4("10.1.0.2"));
    let (a6, b6) = (v6("2001:db8:1::1"), v6("2001:db8:1::2"));
    // Ingress on b0, sent from A.
    let ingress = |frame, n| send_one(&ab.a, &ab.a_dev, frame, n);
    ingress(eth_ipv4(ipv4(a4, b4, &L4::udp(40000, 53, 100))), 100);
    ingress(eth_ipv4(ipv4(a4, b4, &L4::icmp(8, 0, 56))), 7);
    ingress(eth_ipv6(ipv6(a6, b6, &L4::udp(40001, 443, 300))), 50);
    ingress(eth_ipv6(ipv6(a6, b6, &L4::icmpv6(128, 0, 56))), 3);
    ingress(eth_ipv4(ipv4(a4, b4, &L4::tcp(50000, 80, TCP_SYN, 0))), 1);
    let data = L4::tcp(50000, 80, TCP_ACK | TCP_PSH, 1000);
    ingress(eth_ipv4(ipv4(a4, b4, &data)), 20);
    ingress(
        eth_ipv4(ipv4(a4, b4, &L4::tcp(50000, 80, TCP_FIN | TCP_ACK, 0))),
        1,
    );
    ingress(
        eth_ipv6(ipv6(a6, b6, &L4::tcp(50001, 22, TCP_ACK, 500))),
        11,
    );
    // Egress on b1, injected in B (towards C).
    let out4 = eth4("10.2.0.2", "10.2.0.3", &L4::udp(1234, 5678, 200));
    let out6 = eth6(
        "2001:db8:2::2",
        "2001:db8:2::3",
        &L4::tcp(2345, 443, TCP_SYN | TCP_ACK, 0),
    );
    send_one(&ab.b, &b1, out4, 25);
    send_one(&ab.b, &b1, out6, 4);

    let out = agent.stop().unwrap();
    assert!(out.status.success(), "agent failed: {}", out.stderr);
    let got = totals(&out.records);
    let (a4, b4, a6, b6) = ("10.1.0.1", "10.1.0.2", "2001:db8:1::1", "2001:db8:1::2");
    let on_b0 =
        |src: &str, dst: &str, proto, sp, dp| FlowId::new(0, if_b0, src, dst, proto, sp, dp, 0);
    let on_b1 =
        |src: &str, dst: &str, proto, sp, dp| FlowId::new(1, if_b1, src, dst, proto, sp, dp, 0);
    let (syn, ack) = (TCP_SYN as u64, TCP_ACK as u64);
    assert_flows(
        &got,
        &[
            (on_b0(a4, b4, 17, 40000, 53), 100, 100 * 128, 0),
            (on_b0(a4, b4, 1, 0, 0).icmp(8, 0), 7, 7 * 84, 0),
            (on_b0(a6, b6, 17, 40001, 443), 50, 50 * 348, 0),
            (on_b0(a6, b6, 58, 0, 0).icmp(128, 0), 3, 3 * 104, 0),
            (
                on_b0(a4, b4, 6, 50000, 80),
                22,
                40 + 20 * 1040 + 40,
                (TCP_SYN | TCP_ACK | TCP_PSH | TCP_FIN) as u64,
            ),
            (on_b0(a6, b6, 6, 50001, 22), 11, 11 * 560, ack),
            (
                on_b1("10.2.0.2", "10.2.0.3", 17, 1234, 5678),
                25,
                25 * 228,
                0,
            ),
            (
                on_b1("2001:db8:2::2", "2001:db8:2::3", 6, 2345, 443),
                4,
                4 * 60,
                syn | ack,
            ),
        ],
    );
    // Long timeouts: every flow is exported once, at shutdown.
    assert!(got.values().all(|t| t.records == 1), "{got:?}");
    // Record fields beyond the key.
    let r = &out.records[0];
    assert_eq!(r["type"], "EBPF");
    assert_eq!(r["sampler_address"], "192.0.2.10");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    for rec in &out.records {
        let start = rec["time_flow_start_ns"].as_u64().unwrap();
        let end = rec["time_flow_end_ns"].as_u64().unwrap();
        let recv = rec["time_received_ns"].as_u64().unwrap();
        assert!(0 < start && start <= end && end <= recv, "{rec}");
        assert!(
            now - start < 120_000_000_000,
            "start is not wall-clock time: {rec}"
        );
    }
    for rec in &out.records {
        let want = if rec["src_addr"].as_str().unwrap().contains(':') {
            0x86dd
        } else {
            0x800
        };
        assert_eq!(rec["etype"], want);
    }
}

in_each_capture!(vlan_tags_and_non_ip: vlan_tags_and_non_ip_frames, vlan_tags_and_non_ip_frames_tc_capture);

fn vlan_tags_and_non_ip(capture: &[&str]) {
    let l = Link::new().unwrap();
    let ifb = l.b.ifindex(&l.b_dev).unwrap();
    let agent = Agent::start(&l.b, &agent_args(&[&l.b_dev], capture)).unwrap();
    let ip = ipv4(v4("10.3.0.1"), v4("10.3.0.2"), &L4::udp(7, 9, 64));
    let one_tag = ethernet(&[(ETH_P_8021Q, 100)], ETH_P_IP, &ip);
    let qinq = ethernet(&[(ETH_P_8021AD, 200), (ETH_P_8021Q, 100)], ETH_P_IP, &ip);
    let ip6 = ipv6(v6("2001:db8:3::1"), v6("2001:db8:3::2"), &L4::udp(7, 9, 64));
    let tagged6 = ethernet(&[(ETH_P_8021Q, 4094)], ETH_P_IPV6, &ip6);
    send_one(&l.a, &l.a_dev, one_tag, 9);
    send_one(&l.a, &l.a_dev, qinq, 6);
    send_one(&l.a, &l.a_dev, tagged6, 5);
    send_one(&l.a, &l.a_dev, arp(), 13);
    // Egress with a tag in the frame.
    let tagged_out = ethernet(&[(ETH_P_8021Q, 42)], ETH_P_IP, &ip);
    send_one(&l.b, &l.b_dev, tagged_out, 4);
    send_one(&l.b, &l.b_dev, arp(), 2);

    // Non-IP frames show up in the metrics (after a drain), never as flows.
    let (seen, m) = agent.wait_metrics(9590, Duration::from_secs(10), |m| {
        metric(m, "flowexport_non_ip_packets_total{direction=\"ingress\"}") == Some(13.0)
            && metric(m, "flowexport_non_ip_packets_total{direction=\"egress\"}") == Some(2.0)
    });
    assert!(seen, "non-IP counters wrong:\n{m}");
    let out = agent.stop_ok();
    let udp = |dir, src: &str, dst: &str, vlan| FlowId::new(dir, ifb, src, dst, 17, 7, 9, vlan);
    assert_flows(
        &totals(&out.records),
        &[
            (udp(0, "10.3.0.1", "10.3.0.2", 100), 9, 9 * 92, 0),
            (udp(0, "10.3.0.1", "10.3.0.2", 200), 6, 6 * 92, 0),
            (
                udp(0, "2001:db8:3::1", "2001:db8:3::2", 4094),
                5,
                5 * 112,
                0,
            ),
            (udp(1, "10.3.0.1", "10.3.0.2", 42), 4, 4 * 92, 0),
        ],
    );
}

in_each_capture!(fragments_and_extension_headers: ipv4_fragments_and_ipv6_extension_headers, ipv4_fragments_and_ipv6_extension_headers_tc_capture);

fn fragments_and_extension_headers(capture: &[&str]) {
    let l = Link::new().unwrap();
    let ifb = l.b.ifindex(&l.b_dev).unwrap();
    let agent = Agent::start(&l.b, &agent_args(&[&l.b_dev], capture)).unwrap();
    let (s4, d4) = (v4("10.4.0.1"), v4("10.4.0.2"));
    // One 3000-byte UDP datagram in three fragments: only the first carries
    // the UDP header, so the other two form a port-less flow.
    let frames = udp_in_three_fragments(s4, d4);
    assert_eq!(send(&l.a, &l.a_dev, frames, 4), 12);

    // IPv6: hop-by-hop + destination options + routing + fragment (first
    // fragment, offset 0) before TCP; and a later fragment with no L4 header.
    let (s6, d6) = (v6("2001:db8:4::1"), v6("2001:db8:4::2"));
    let tcp = L4::tcp(6000, 7000, TCP_SYN, 40).bytes();
    let frag0 = ipv6_frag(6, 0, true, &tcp);
    let routing = {
        // Type 4 (SRH-like), segments left 0: parsers must skip it by length.
        let mut r = ipv6_ext(44, 2, &frag0);
        r[2] = 4;
        r[3] = 0;
        r
    };
    let dst = ipv6_ext(43, 1, &routing);
    let hbh = ipv6_ext(60, 0, &dst);
    let p1 = ipv6_raw(s6, d6, 0, &hbh);
    let later = ipv6_frag(6, 100, false, &[0u8; 64]);
    let p2 = ipv6_raw(s6, d6, 44, &later);
    assert_eq!(
        send(
            &l.a,
            &l.a_dev,
            vec![eth_ipv6(p1.clone()), eth_ipv6(p2.clone())],
            3
        ),
        6
    );
    // A protocol with no ports (GRE, 47), by number.
    send_one(&l.a, &l.a_dev, eth_ipv4(ipv4(s4, d4, &L4::raw(47, 30))), 2);

    let out = agent.stop_ok();
    let id = |src: &str, dst: &str, proto, sp, dp| FlowId::new(0, ifb, src, dst, proto, sp, dp, 0);
    let (a6, b6) = ("2001:db8:4::1", "2001:db8:4::2");
    assert_flows(
        &totals(&out.records),
        &[
            (id("10.4.0.1", "10.4.0.2", 17, 3333, 4444), 4, 4 * 1500, 0),
            (id("10.4.0.1", "10.4.0.2", 17, 0, 0), 8, 4 * (1500 + 60), 0),
            (
                id(a6, b6, 6, 6000, 7000),
                3,
                3 * p1.len() as u64,
                TCP_SYN as u64,
            ),
            (id(a6, b6, 6, 0, 0), 3, 3 * p2.len() as u64, 0),
            (id("10.4.0.1", "10.4.0.2", 47, 0, 0), 2, 2 * 50, 0),
        ],
    );
}

// Frames of a page or more leave AF_PACKET with only their Ethernet header
// in the skb's head (the rest in paged data): the TC programs find the IP
// and L4 headers beyond the linear part and read them with
// bpf_skb_load_bytes (other packets: straight from the linear data). The
// XDP program is multi-buffer aware, so it attaches natively although the
// MTU needs more than one buffer per frame (veth refuses a single-buffer
// program then). Both directions, IPv4 and IPv6, UDP and TCP, counted
// exactly.
in_each_capture!(jumbo_frames: jumbo_frames_with_headers_in_paged_data, jumbo_frames_with_headers_in_paged_data_tc_capture);

fn jumbo_frames(capture: &[&str]) {
    let l = Link::new().unwrap();
    for (ns, dev) in [(&l.a, &l.a_dev), (&l.b, &l.b_dev)] {
        ns.exec(&["ip", "link", "set", dev, "mtu", "9000"]).unwrap();
    }
    let ifb = l.b.ifindex(&l.b_dev).unwrap();
    let agent = Agent::start(&l.b, &agent_args(&[&l.b_dev], capture)).unwrap();
    let (a4, b4, a6, b6) = ("10.5.0.1", "10.5.0.2", "2001:db8:5::1", "2001:db8:5::2");
    // 8,000 bytes of payload: frames of 8,042 and 8,074 bytes.
    send_one(&l.a, &l.a_dev, eth4(a4, b4, &L4::udp(1111, 2222, 8000)), 7);
    let tcp6 = L4::tcp(3333, 4444, TCP_ACK | TCP_PSH, 8000);
    send_one(&l.a, &l.a_dev, eth6(a6, b6, &tcp6), 5);
    // The TC programs read an IPv4 header and the L4 bytes after it in one
    // call: TCP's ports and flags come from there too.
    let tcp4 = L4::tcp(5555, 6666, TCP_ACK | TCP_PSH, 8000);
    send_one(&l.a, &l.a_dev, eth4(a4, b4, &tcp4), 2);
    send_one(&l.b, &l.b_dev, eth4(b4, a4, &L4::udp(2222, 1111, 8000)), 3);
    let out = agent.stop_ok();
    let flow = |dir, src: &str, dst: &str, proto, sp, dp| {
        FlowId::new(dir, ifb, src, dst, proto, sp, dp, 0)
    };
    assert_flows(
        &totals(&out.records),
        &[
            (flow(0, a4, b4, 17, 1111, 2222), 7, 7 * 8028, 0),
            (
                flow(0, a6, b6, 6, 3333, 4444),
                5,
                5 * 8060,
                (TCP_ACK | TCP_PSH) as u64,
            ),
            (
                flow(0, a4, b4, 6, 5555, 6666),
                2,
                2 * 8040,
                (TCP_ACK | TCP_PSH) as u64,
            ),
            (flow(1, b4, a4, 17, 2222, 1111), 3, 3 * 8028, 0),
        ],
    );
}

// "Neither program ever changes or drops a packet" (README): datagrams
// whose headers lie in paged data (jumbo frames from AF_PACKET, as above)
// reach a UDP socket in the receiving namespace whole, from the right
// source, through either ingress program, and the agent counts them
// exactly.
in_each_capture!(paged_datagrams_delivered: paged_datagrams_reach_the_socket_whole, paged_datagrams_reach_the_socket_whole_tc_capture);

fn paged_datagrams_delivered(capture: &[&str]) {
    let l = Link::new().unwrap();
    for (ns, dev) in [(&l.a, &l.a_dev), (&l.b, &l.b_dev)] {
        ns.exec(&["ip", "link", "set", dev, "mtu", "9000"]).unwrap();
    }
    // The frames' destination MAC (see `ethernet`) and address are b's.
    let (b, dev) = (&l.b, l.b_dev.as_str());
    b.exec(&["ip", "link", "set", dev, "address", "02:00:00:00:00:bb"])
        .unwrap();
    b.exec(&["ip", "addr", "add", "10.5.0.2/24", "dev", dev])
        .unwrap();
    let sock = b
        .run(|| std::net::UdpSocket::bind("10.5.0.2:2222"))
        .unwrap()
        .unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let ifb = b.ifindex(dev).unwrap();
    let agent = Agent::start(b, &agent_args(&[dev], capture)).unwrap();
    let frame = eth4("10.5.0.1", "10.5.0.2", &L4::udp(1111, 2222, 8000));
    send_one(&l.a, &l.a_dev, with_ipv4_checksum(frame), 7);
    let mut buf = vec![0u8; 9000];
    for i in 0..7 {
        let (n, from) = sock
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("datagram {i} of 7 did not reach the socket: {e}"));
        assert_eq!((n, from), (8000, "10.5.0.1:1111".parse().unwrap()));
        assert!(
            buf[..n].iter().all(|&x| x == 0x55),
            "payload of datagram {i}"
        );
    }
    let out = agent.stop_ok();
    assert_flows(
        &totals(&out.records),
        &[(
            FlowId::new(0, ifb, "10.5.0.1", "10.5.0.2", 17, 1111, 2222, 0),
            7,
            7 * 8028,
            0,
        )],
    );
}

#[test]
fn exact_under_concurrent_load_with_active_timeout() {
    let l = Link::new().unwrap();
    let ifb = l.b.ifindex(&l.b_dev).unwrap();
    let flags = timeouts("300ms", "5s", "50ms");
    let agent = Agent::start(&l.b, &agent_args(&[&l.b_dev], &flags)).unwrap();
    let drops = l.drops();
    // 64 flows, 2000 rounds: 128000 packets over a few seconds, while the
    // agent drains every 50 ms and exports active slices every 300 ms.
    let frames = udp_flows("10.5.0.1", "10.5.0.2", 10000, 64, 80, 18);
    let sent = send_frames(&l.a, &l.a_dev, frames, 2000, 32, Duration::from_micros(300)).unwrap();
    assert_eq!(sent, 128_000);
    let m = agent.metrics(9590).unwrap();
    let drains = metric(&m, "flowexport_drains_total").unwrap();
    let out = agent.stop_ok();
    // The link itself dropped nothing, so every sent frame reached XDP.
    assert_eq!(l.drops(), drops);
    let got = totals(&out.records);
    assert_eq!(got.len(), 64);
    let mut slices = 0;
    for i in 0..64u16 {
        let t = got[&FlowId::new(0, ifb, "10.5.0.1", "10.5.0.2", 17, 10000 + i as u64, 80, 0)];
        assert_eq!((t.packets, t.bytes), (2000, 2000 * 46), "flow {i}");
        slices += t.records;
    }
    let total: u64 = got.values().map(|t| t.packets).sum();
    assert_eq!(total, sent);
    // The traffic really was split by drains and active timeouts.
    assert!(drains >= 10.0, "only {drains} drains during the load");
    assert!(
        slices >= 64 * 3,
        "only {slices} records: active timeout not exercised"
    );
}

/// 16 table entries for 400 flows: most packets take the fallback ring,
/// with `cache_slots` slots of flow cache in front of the table ("0": every
/// packet goes to the table; "8": nearly every packet evicts another flow's
/// counters into the full table).
fn full_table_falls_back_without_loss(cache_slots: &str) {
    let l = Link::new().unwrap();
    let ifb = l.b.ifindex(&l.b_dev).unwrap();
    let flags = ["--max-flows", "16", "--cache-slots", cache_slots];
    let agent = Agent::start(&l.b, &agent_args(&[&l.b_dev], &flags)).unwrap();
    let frames = udp_flows("10.6.0.1", "10.6.1.1", 20000, 400, 53, 30);
    assert_eq!(send(&l.a, &l.a_dev, frames, 3), 1200);
    let (counted, m) = agent.wait_metrics(9590, Duration::from_secs(5), |m| {
        metric(m, "flowexport_packets_total{direction=\"ingress\"}") == Some(1200.0)
    });
    assert!(counted, "the 1200 packets were not counted:\n{m}");
    // A drain updates the packet counters before the fallback counter, so
    // that scrape may have fallen between the two: read the metrics again
    // once a later drain has started (the previous one's update is done).
    let drains = metric(&m, "flowexport_drains_total").unwrap();
    let (settled, m) = agent.wait_metrics(9590, Duration::from_secs(5), |m| {
        metric(m, "flowexport_drains_total").is_some_and(|d| d > drains)
    });
    assert!(settled, "no drain after the count:\n{m}");
    let out = agent.stop_ok();
    let fallback = metric(&m, "flowexport_table_full_fallback_packets_total").unwrap();
    assert!(
        fallback >= 1000.0,
        "fallback used for only {fallback} packets:\n{m}"
    );
    assert_metric(&m, "flowexport_flow_table_capacity", 16.0);
    // The table's 64 slots (its minimum), and its kernel memory, in the
    // metrics and in the log line that names the flag to raise.
    assert_metric(&m, "flowexport_flow_table_slots", 64.0);
    assert_metric(
        &m,
        "flowexport_kernel_memory_bytes{map=\"table\"}",
        64.0 * 96.0,
    );
    assert!(
        out.stderr.contains("flow table full")
            && out.stderr.contains("raise --max-flows")
            && out
                .stderr
                .contains("--max-flows 16 concurrent flows (64 slots"),
        "{}",
        out.stderr
    );
    let got = totals(&out.records);
    assert_eq!(got.len(), 400);
    for i in 0..400u16 {
        let t = got[&FlowId::new(0, ifb, "10.6.0.1", "10.6.1.1", 17, 20000 + i as u64, 53, 0)];
        assert_eq!((t.packets, t.bytes), (3, 3 * 58), "flow {i}");
    }
}

#[test]
fn full_table_falls_back_without_loss_no_cache() {
    full_table_falls_back_without_loss("0");
}

#[test]
fn full_table_falls_back_without_loss_evicting_cache() {
    full_table_falls_back_without_loss("8");
}

#[test]
fn full_table_and_full_ring_still_account_every_packet() {
    let l = Link::new().unwrap();
    // One-page ring (46 events of 88 bytes) and 8 table entries for 600 flows:
    // the rest can only go to the overflow counters.
    let flags = [&TINY_TABLE[..], &["--drain-interval", "1s"]].concat();
    let agent = Agent::start(&l.b, &agent_args(&[&l.b_dev], &flags)).unwrap();
    let frames = udp_flows("10.7.0.1", "10.7.1.1", 30000, 600, 53, 30);
    // 600 frames take a few ms: most land within one drain interval.
    assert_eq!(send(&l.a, &l.a_dev, frames, 1), 600);
    let out = agent.stop_ok();
    let got = totals(&out.records);
    let packets: u64 = got.values().map(|t| t.packets).sum();
    let bytes: u64 = got.values().map(|t| t.bytes).sum();
    assert_eq!((packets, bytes), (600, 600 * 58));
    let overflow: Vec<_> = got.iter().filter(|(id, _)| id.proto == 0).collect();
    assert_eq!(
        overflow.len(),
        1,
        "one overflow record for ingress: {got:?}"
    );
    assert!(overflow[0].1.packets > 0);
    assert_eq!(overflow[0].0.src, "0.0.0.0");
}

#[test]
fn start_up_errors_are_clear() {
    let l = Link::new().unwrap();
    // Missing interface.
    Agent::refused(
        &l.b,
        &["--iface", "nosuch0"],
        &["interface \"nosuch0\" does not exist"],
    );
    // Missing object file.
    Agent::refused(
        &l.b,
        &[
            "--iface",
            &l.b_dev,
            "--bpf-object",
            "/nonexistent/flowexport.o",
        ],
        &["cannot read the eBPF object /nonexistent/flowexport.o"],
    );
    // Bad flag value.
    Agent::refused(
        &l.b,
        &["--iface", &l.b_dev, "--idle-timeout", "soon"],
        &["invalid duration"],
    );
    // An interface that already carries another XDP program is refused, and
    // the program already there keeps running.
    let first = Agent::start(&l.b, &agent_args(&[&l.b_dev], &[])).unwrap();
    Agent::refused(
        &l.b,
        &[
            "--iface",
            &l.b_dev,
            "--capture",
            "xdp",
            "--metrics-addr",
            "127.0.0.1:9591",
        ],
        &["already has an XDP program attached"],
    );
    send_one(
        &l.a,
        &l.a_dev,
        eth4("10.8.0.1", "10.8.0.2", &L4::udp(1, 2, 10)),
        5,
    );
    let out = first.stop().unwrap();
    assert!(out.status.success());
    assert_eq!(
        totals(&out.records)
            .values()
            .map(|t| t.packets)
            .sum::<u64>(),
        5
    );
}

#[test]
fn unprivileged_user_gets_a_permission_error() {
    let l = Link::new().unwrap();
    let bin = flowexport_bin();
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &l.b.name,
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ])
        .arg(&bin)
        .args(["agent", "--iface", &l.b_dev])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("not permitted to load BPF programs"),
        "{stderr}"
    );
}

/// `setpriv` arguments: user nobody with exactly these capabilities
/// (ambient, inheritable and bounding set), as the systemd unit runs it.
fn as_nobody_with(caps: &str) -> Vec<String> {
    vec![
        "setpriv".into(),
        "--reuid=65534".into(),
        "--regid=65534".into(),
        "--clear-groups".into(),
        format!("--inh-caps=-all,{caps}"),
        format!("--ambient-caps=-all,{caps}"),
        format!("--bounding-set=-all,{caps}"),
    ]
}

#[test]
fn unprivileged_user_with_three_capabilities_counts_exactly() {
    let l = Link::new().unwrap();
    let ifb = l.b.ifindex(&l.b_dev).unwrap();
    let wrapper = as_nobody_with("+bpf,+net_admin,+perfmon");
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let agent = Agent::start_wrapped(&l.b, &wrapper, &agent_args(&[&l.b_dev], &[])).unwrap();
    let frame = eth4("10.40.0.1", "10.40.0.2", &L4::udp(4000, 53, 72));
    send_one(&l.a, &l.a_dev, frame, 25);
    let out = agent.stop_ok();
    assert_flows(
        &totals(&out.records),
        &[(
            FlowId::new(0, ifb, "10.40.0.1", "10.40.0.2", 17, 4000, 53, 0),
            25,
            25 * 100,
            0,
        )],
    );

    // Without CAP_BPF: a clear error naming it, before anything is loaded.
    let wrapper = as_nobody_with("+net_admin,+perfmon");
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let out = Agent::spawn_wrapped(&l.b, &wrapper, "agent", &agent_args(&[&l.b_dev], &[]))
        .unwrap()
        .wait_exit(Duration::from_secs(30))
        .unwrap();
    assert!(!out.status.success());
    // Exactly the one missing, then what to do.
    assert!(
        out.stderr
            .contains("missing CAP_BPF (create BPF maps and load programs). Run as root"),
        "{}",
        out.stderr
    );
}

#[test]
fn config_file_sets_flags_and_flags_win() {
    let l = Link::new().unwrap();
    let dir = std::env::temp_dir().join(unique("fecfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "iface = [\"{}\"]\nxdp-mode = \"native\"\nmax-flows = 4096\nsampler-address = \"198.51.100.1\"\n\
             metrics-addr = \"127.0.0.1:9700\"\n",
            l.b_dev
        ),
    )
    .unwrap();
    let agent = Agent::start(
        &l.b,
        &["--config", cfg.to_str().unwrap(), "--max-flows", "512"],
    )
    .unwrap();
    let m = agent.metrics(9700).unwrap();
    send_one(
        &l.a,
        &l.a_dev,
        eth4("10.9.0.1", "10.9.0.2", &L4::udp(1, 2, 10)),
        3,
    );
    let out = agent.stop().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(
        metric(&m, "flowexport_flow_table_capacity"),
        Some(512.0),
        "flag wins"
    );
    assert_eq!(out.records.len(), 1);
    assert_eq!(out.records[0]["sampler_address"], "198.51.100.1");
    assert_eq!(out.records[0]["packets"], 3);
}

/// Segments and payload bytes one TCP socket sent, retransmissions included,
/// from the kernel's `struct tcp_info` (linux/tcp.h): `tcpi_segs_out` at
/// byte 136, `tcpi_bytes_sent` at byte 200 (kernel 4.19+).
fn tcp_sent(s: &std::net::TcpStream) -> std::io::Result<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let mut buf = [0u8; 256];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: buf outlives the call and len is its size.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if (len as usize) < 208 {
        return Err(std::io::Error::other(format!("tcp_info of {len} bytes")));
    }
    let segs_out = u32::from_ne_bytes(buf[136..140].try_into().unwrap());
    let bytes_sent = u64::from_ne_bytes(buf[200..208].try_into().unwrap());
    Ok((segs_out as u64, bytes_sent))
}

/// A real TCP transfer through the kernel stack. B's sends leave b0 as TSO
/// super-packets, which the TC program must count as the segments they become.
/// References: B's socket's own segment and payload counters (they include
/// any retransmission, which a busy machine can cause when veth's backlog
/// overflows) and the kernel's TCP segment counters in B; for the ACK
/// direction, A's IP output octets.
#[test]
fn real_tcp_transfer_counts_gso_segments_exactly() {
    use std::io::{Read, Write};
    let l = Link::new().unwrap();
    l.a.exec(&["ip", "addr", "add", "10.20.0.1/24", "dev", &l.a_dev])
        .unwrap();
    l.b.exec(&["ip", "addr", "add", "10.20.0.2/24", "dev", &l.b_dev])
        .unwrap();
    let ifb = l.b.ifindex(&l.b_dev).unwrap();
    let agent = Agent::start(&l.b, &agent_args(&[&l.b_dev], &[])).unwrap();
    let out0 = l.b.snmp("Tcp", "OutSegs").unwrap();
    let retrans0 = l.b.snmp("Tcp", "RetransSegs").unwrap();
    let in0 = l.b.snmp("Tcp", "InSegs").unwrap();
    let a_out_octets0 = l.a.netstat("IpExt", "OutOctets").unwrap();

    let listener =
        l.a.run(|| std::net::TcpListener::bind("10.20.0.1:5001"))
            .unwrap()
            .unwrap();
    let server =
        l.a.spawn(move || -> std::io::Result<usize> {
            let (mut s, _) = listener.accept()?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf)?;
            Ok(buf.len())
        })
        .unwrap();
    const TOTAL: usize = 2_000_000;
    let (client_port, (segs_out, bytes_sent)) =
        l.b.run(|| -> std::io::Result<(u16, (u64, u64))> {
            let mut s = std::net::TcpStream::connect("10.20.0.1:5001")?;
            let port = s.local_addr()?.port();
            s.write_all(&vec![0x5a; TOTAL])?;
            s.shutdown(std::net::Shutdown::Write)?;
            let mut rest = Vec::new();
            // Returns once A's FIN is in, which B acknowledges at once: the
            // socket has sent everything it ever will.
            s.read_to_end(&mut rest)?;
            Ok((port, tcp_sent(&s)?))
        })
        .unwrap()
        .unwrap();
    assert_eq!(server.join().unwrap().unwrap().unwrap(), TOTAL);
    // Let the connection's last segments cross the link.
    std::thread::sleep(Duration::from_millis(300));
    // Linux counts a retransmitted segment in RetransSegs, not OutSegs.
    let out_segs = l.b.snmp("Tcp", "OutSegs").unwrap() - out0
        + (l.b.snmp("Tcp", "RetransSegs").unwrap() - retrans0);
    let in_segs = l.b.snmp("Tcp", "InSegs").unwrap() - in0;
    // A sends only this connection's SYN-ACK, ACKs and FIN, never as GSO, so
    // its IP output octets are exactly what crossed into b0.
    let a_out_octets = l.a.netstat("IpExt", "OutOctets").unwrap() - a_out_octets0;
    assert!(bytes_sent >= TOTAL as u64, "{bytes_sent}");
    let out = agent.stop_ok();
    let got = totals(&out.records);
    let port = client_port as u64;
    let egress = got[&FlowId::new(1, ifb, "10.20.0.2", "10.20.0.1", 6, port, 5001, 0)];
    let ingress = got[&FlowId::new(0, ifb, "10.20.0.1", "10.20.0.2", 6, 5001, port, 0)];
    assert_eq!(
        egress.packets, out_segs,
        "egress segments vs TcpOutSegs + TcpRetransSegs"
    );
    assert_eq!(egress.packets, segs_out, "egress segments vs tcpi_segs_out");
    assert_eq!(ingress.packets, in_segs, "ingress segments vs TcpInSegs");
    // Egress bytes: every segment of B is 20 (IP) + 32 (TCP with timestamps)
    // + payload, except the SYN, whose options make the TCP header 40. B
    // receives no data, so it never sends SACK blocks. A's ACKs may carry
    // them (veth can reorder B's segments across CPUs' backlogs), so the
    // ingress reference is A's own IP output counter.
    assert_eq!(egress.bytes, bytes_sent + 60 + 52 * (egress.packets - 1));
    assert_eq!(
        ingress.bytes, a_out_octets,
        "ingress bytes vs A's IpExt OutOctets"
    );
    assert!(egress.packets > 2 * TOTAL as u64 / 65536, "{egress:?}");
    assert_eq!(got.len(), 2, "only the TCP connection's two flows: {got:?}");
}

/// `--xdp-mode auto` on a driver without native XDP (a bridge) falls back to
/// skb mode with a log line; `native` there fails with a hint. Egress on the
/// bridge still counts through TC.
#[test]
fn auto_mode_falls_back_to_skb_where_native_is_missing() {
    let ns = Netns::new().unwrap();
    let dev = unique("fed");
    ns.exec(&["ip", "link", "add", &dev, "type", "bridge"])
        .unwrap();
    ns.exec(&["ip", "link", "set", &dev, "up"]).unwrap();
    let ifd = ns.ifindex(&dev).unwrap();

    Agent::refused(
        &ns,
        &["--iface", &dev, "--xdp-mode", "native"],
        &["in native mode", "try --xdp-mode skb or auto"],
    );

    let agent = Agent::start(&ns, &["--iface", &dev, "--xdp-mode", "auto"]).unwrap();
    assert!(
        agent
            .stderr()
            .contains("falling back to skb (generic) mode"),
        "{}",
        agent.stderr()
    );
    assert!(
        agent.stderr().contains("XDP ingress (skb mode)"),
        "{}",
        agent.stderr()
    );
    send_one(
        &ns,
        &dev,
        eth4("10.11.0.1", "10.11.0.2", &L4::udp(11, 12, 100)),
        17,
    );
    let out = agent.stop_ok();
    // A new bridge's own IGMP membership report (0.0.0.0 -> 224.0.0.22) may
    // leave within the window; it is real egress, counted like any other
    // flow, but not this test's traffic.
    let mut got = totals(&out.records);
    got.retain(|id, _| !(id.proto == 2 && id.src == "0.0.0.0" && id.dst == "224.0.0.22"));
    assert_flows(
        &got,
        &[(
            FlowId::new(1, ifd, "10.11.0.1", "10.11.0.2", 17, 11, 12, 0),
            17,
            17 * 128,
            0,
        )],
    );
}

/// The default `--capture auto` counts ingress with TC on a veth (whose
/// native XDP would copy nearly every packet first) and on a driver without native
/// XDP (a bridge), with a log line that says why; nothing on the XDP hook.
#[test]
fn default_capture_is_tc_on_veth_and_where_native_xdp_is_missing() {
    let l = Link::new().unwrap();
    let agent = Agent::start(
        &l.b,
        &["--iface", &l.b_dev, "--sampler-address", "192.0.2.10"],
    )
    .unwrap();
    assert!(
        agent.stderr().contains(&format!(
            "attached to {}: TC ingress (--capture auto: veth, whose native XDP copies nearly",
            l.b_dev
        )),
        "{}",
        agent.stderr()
    );
    let link = l.b.exec(&["ip", "link", "show", "dev", &l.b_dev]).unwrap();
    assert!(!link.contains("xdp"), "{link}");
    send_one(
        &l.a,
        &l.a_dev,
        eth4("10.12.0.1", "10.12.0.2", &L4::udp(21, 22, 100)),
        9,
    );
    let out = agent.stop_ok();
    let ifb = l.b.ifindex(&l.b_dev).unwrap();
    // The link's own IPv6 neighbour discovery is counted too, but is not
    // this test's traffic.
    let mut got = totals(&out.records);
    got.retain(|id, _| id.src.starts_with("10.12."));
    assert_flows(
        &got,
        &[(
            FlowId::new(0, ifb, "10.12.0.1", "10.12.0.2", 17, 21, 22, 0),
            9,
            9 * 128,
            0,
        )],
    );

    let ns = Netns::new().unwrap();
    let dev = unique("fed");
    ns.exec(&["ip", "link", "add", &dev, "type", "bridge"])
        .unwrap();
    ns.exec(&["ip", "link", "set", &dev, "up"]).unwrap();
    let agent = Agent::start(&ns, &["--iface", &dev]).unwrap();
    assert!(
        agent.stderr().contains(&format!(
            "attached to {dev}: TC ingress (--capture auto: native XDP refused by driver bridge"
        )),
        "{}",
        agent.stderr()
    );
    let link = ns.exec(&["ip", "link", "show", "dev", &dev]).unwrap();
    assert!(!link.contains("xdp"), "{link}");
    agent.stop_ok();
}

/// A reader of the agent's stdout that goes away (`flowexport agent … |
/// head`): the agent stops as on SIGTERM (its programs detached) and exits
/// with an error, as a pipeline's writer does, instead of draining on for
/// nobody.
#[test]
fn a_reader_that_goes_away_stops_the_agent() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};

    /// Killed on drop, also when an assertion fails.
    struct Running(std::process::Child);
    impl Drop for Running {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    let l = Link::new().unwrap();
    let mut args = agent_args(&[&l.b_dev], &timeouts("1s", "1s", "100ms"));
    args.extend_from_slice(&["--pin-dir", "none"]);
    let mut agent = Running(
        Command::new("ip")
            .args(["netns", "exec", &l.b.name])
            .arg(flowexport_bin())
            .arg("agent")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = agent.0.stdout.take().unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || fetch_metrics(&l.b, 9590)
            .is_ok()),
        "the agent did not start"
    );
    let frame = eth_ipv4(ipv4(
        v4("10.1.0.1"),
        v4("10.1.0.2"),
        &L4::udp(40000, 53, 100),
    ));
    send_one(&l.a, &l.a_dev, frame.clone(), 3);
    // The reader takes the first record, then goes away.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(20)).unwrap();
    assert!(line.contains("\"packets\":3"), "{line}");
    // More traffic: the next export meets the closed pipe.
    send_one(&l.a, &l.a_dev, frame, 2);
    let mut status = None;
    assert!(
        wait_until(Duration::from_secs(20), || {
            status = agent.0.try_wait().unwrap();
            status.is_some()
        }),
        "the agent still runs with nobody reading its stdout"
    );
    assert_eq!(status.unwrap().code(), Some(1), "{status:?}");
    // Stopped as on SIGTERM: the programs are detached.
    let link = l.b.exec(&["ip", "link", "show", "dev", &l.b_dev]).unwrap();
    assert!(!link.contains("xdp"), "{link}");
}
