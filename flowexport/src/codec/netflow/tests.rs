//! Decoder tests: our own exporter round-trips, captures of real
//! exporters, hand-built edge cases.

use super::*;
use crate::codec::netflow::encode::{ExportProtocol, ExportStream};

const NOW: u64 = 1_763_800_000_000_000_000;

fn exporter() -> IpAddr {
    "192.0.2.99".parse().unwrap()
}

/// A record of our exporter's kind: ICMP for every third `i`, UDP
/// otherwise (the encoder's tests make it TCP).
pub(super) fn sample(i: u32, v6: bool) -> FlowRecord {
    let icmp = i.is_multiple_of(3);
    FlowRecord {
        flow_type: FlowType::Ebpf,
        time_flow_start_ns: 1_763_799_990_123_000_000,
        time_flow_end_ns: 1_763_799_995_456_000_000,
        bytes: 10_000 + i as u64,
        packets: 10 + i as u64,
        src_addr: if v6 {
            "2001:db8::a".parse().unwrap()
        } else {
            "10.1.2.3".parse().unwrap()
        },
        dst_addr: if v6 {
            "2001:db8::b".parse().unwrap()
        } else {
            "10.4.5.6".parse().unwrap()
        },
        etype: if v6 { ETYPE_IPV6 } else { ETYPE_IPV4 },
        proto: if icmp { 1 } else { 17 },
        src_port: if icmp { 0 } else { 1000 + i as u16 },
        dst_port: if icmp { 0 } else { 53 },
        icmp_type: if icmp { 8 } else { 0 },
        in_if: 4,
        out_if: 0,
        vlan_id: 12,
        tcp_flags: 0,
        flow_direction: 0,
        ..FlowRecord::default()
    }
}

/// What decoding gives back for a record our exporter sent.
fn expected(r: &FlowRecord, ty: FlowType, seq: u32) -> FlowRecord {
    FlowRecord {
        flow_type: ty,
        time_received_ns: NOW,
        sequence_num: seq,
        sampler_address: Some(exporter()),
        observation_domain_id: 7,
        ..r.clone()
    }
}

/// With sampling, our exporter's options template and data give the
/// decoder the rate (IPFIX: from samplingInterval; also from
/// samplingSize/samplingPopulation or samplingProbability alone; v9:
/// SAMPLING_INTERVAL), and
/// IPFIX sequence numbers count the options record.
#[test]
fn sampling_options_from_our_exporter_give_the_rate() {
    for proto in [ExportProtocol::Ipfix, ExportProtocol::NetflowV9] {
        let mut s = ExportStream::new(proto, 7, 600, 60_000, 100, 1_763_799_000_000)
            .unwrap()
            .with_sampling(10)
            .unwrap();
        let recs: Vec<_> = (0..12).map(|i| sample(i, i % 2 == 1)).collect();
        let pkts = s.encode(&recs, 1_763_800_000_000);
        assert!(pkts.len() > 1);
        let mut d = NetflowDecoder::default();
        let mut out = Vec::new();
        let mut first_packet = 0;
        for (i, p) in pkts.iter().enumerate() {
            d.decode(exporter(), p, NOW, &mut out).unwrap();
            if i == 0 {
                first_packet = out.len() as u32;
            }
        }
        assert_eq!(out.len(), 12, "{proto:?}");
        assert!(out.iter().all(|r| r.sampling_rate == 10), "{proto:?}");
        if proto == ExportProtocol::Ipfix {
            let seq = u32::from_be_bytes(pkts[1][8..12].try_into().unwrap());
            assert_eq!(
                seq,
                first_packet + 1,
                "data records plus the options record"
            );
        }
    }
}

#[test]
fn ipfix_and_v9_round_trip_with_our_exporter() {
    for (proto, ty) in [
        (ExportProtocol::Ipfix, FlowType::Ipfix),
        (ExportProtocol::NetflowV9, FlowType::NetFlowV9),
    ] {
        let boot = 1_763_799_000_000;
        let mut s = ExportStream::new(proto, 7, 600, 60_000, 100, boot).unwrap();
        let recs: Vec<_> = (0..12).map(|i| sample(i, i % 2 == 1)).collect();
        let pkts = s.encode(&recs, 1_763_800_000_000);
        assert!(pkts.len() > 1);
        let mut d = NetflowDecoder::default();
        let mut out = Vec::new();
        let mut seqs = Vec::new();
        for p in &pkts {
            let before = out.len();
            d.decode(exporter(), p, NOW, &mut out).unwrap();
            seqs.extend(std::iter::repeat_n(
                u32::from_be_bytes(
                    p[if proto == ExportProtocol::Ipfix {
                        8
                    } else {
                        12
                    }..][..4]
                        .try_into()
                        .unwrap(),
                ),
                out.len() - before,
            ));
        }
        assert_eq!(out.len(), 12, "{proto:?}");
        for (i, (got, want)) in out.iter().zip(&recs).enumerate() {
            assert_eq!(got, &expected(want, ty, seqs[i]), "{proto:?} record {i}");
        }
        assert_eq!(d.templates_known(), 2);
    }
}

#[test]
fn layer2_segment_ids_of_decapsulated_flows() {
    let recs: Vec<FlowRecord> = [
        (
            Some(TunnelType::Vxlan),
            5001u32,
            Some(TunnelType::Vxlan),
            5001u32,
        ),
        (Some(TunnelType::Geneve), 77, Some(TunnelType::Vxlan), 77),
        (
            Some(TunnelType::Gre),
            0xdead_beef,
            Some(TunnelType::Gre),
            0xdead_beef,
        ),
        (Some(TunnelType::Erspan), 300, None, 0),
        (None, 0, None, 0),
    ]
    .iter()
    .enumerate()
    .map(|(i, (t, id, ..))| FlowRecord {
        tunnel_type: *t,
        tunnel_id: *id,
        ..sample(i as u32, i % 2 == 1)
    })
    .collect();
    let want = [
        (Some(TunnelType::Vxlan), 5001u32),
        (Some(TunnelType::Vxlan), 77),
        (Some(TunnelType::Gre), 0xdead_beef),
        (None, 0),
        (None, 0),
    ];
    let mut s = ExportStream::new(ExportProtocol::Ipfix, 7, 1400, 60_000, 100, 0)
        .unwrap()
        .with_segment_ids()
        .unwrap();
    let mut d = NetflowDecoder::default();
    let mut out = Vec::new();
    for p in s.encode(&recs, 1_763_800_000_000) {
        d.decode(exporter(), &p, NOW, &mut out).unwrap();
    }
    let got: Vec<_> = out.iter().map(|r| (r.tunnel_type, r.tunnel_id)).collect();
    assert_eq!(got, want);
    // Without them (v9, or an agent without tunnels) the records are as
    // before: no segment id.
    for proto in [ExportProtocol::NetflowV9, ExportProtocol::Ipfix] {
        let mut s = ExportStream::new(proto, 7, 1400, 60_000, 100, 0).unwrap();
        if proto == ExportProtocol::NetflowV9 {
            s = s.with_segment_ids().unwrap();
        }
        let mut out = Vec::new();
        for p in s.encode(&recs, 1_763_800_000_000) {
            NetflowDecoder::default()
                .decode(exporter(), &p, NOW, &mut out)
                .unwrap();
        }
        assert!(out
            .iter()
            .all(|r| r.tunnel_type.is_none() && r.tunnel_id == 0));
    }
}

/// Two IPFIX packets of one record each from our exporter: the first with
/// the template, the second without.
fn template_then_data() -> (Vec<u8>, Vec<u8>) {
    let mut s = ExportStream::new(ExportProtocol::Ipfix, 7, 1400, 60_000, 100, 0).unwrap();
    let first = s.encode(&[sample(1, false)], 1_763_800_000_000).remove(0);
    let second = s.encode(&[sample(2, false)], 1_763_800_000_000).remove(0);
    (first, second)
}

#[test]
fn data_before_template_is_held_then_decoded() {
    let (first, second) = template_then_data();
    let mut d = NetflowDecoder::default();
    let mut out = Vec::new();
    // The second packet has no template: held.
    d.decode(exporter(), &second, NOW, &mut out).unwrap();
    assert!(out.is_empty());
    assert_eq!(d.pending_sets(), 1);
    // The first brings the template: both records come out.
    d.decode(exporter(), &first, NOW, &mut out).unwrap();
    assert_eq!(out.len(), 2);
    assert_eq!(d.counters.pending_decoded, 1);
    assert_eq!(d.pending_sets(), 0);
    // Held data expires after the TTL.
    let mut d = NetflowDecoder::new(1_000, 1 << 20);
    d.decode(exporter(), &second, NOW, &mut out).unwrap();
    d.decode(
        exporter(),
        &[0, 10, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7],
        NOW + 2_000,
        &mut out,
    )
    .unwrap();
    assert_eq!((d.pending_sets(), d.counters.pending_expired), (0, 1));
}

#[test]
fn templates_are_per_exporter_and_domain() {
    let (first, second) = template_then_data();
    let mut d = NetflowDecoder::default();
    let mut out = Vec::new();
    d.decode(exporter(), &first, NOW, &mut out).unwrap();
    // Same data from another exporter: unknown template there.
    d.decode("192.0.2.100".parse().unwrap(), &second, NOW, &mut out)
        .unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(d.pending_sets(), 1);
}

fn be(v: &[u32], widths: &[usize]) -> Vec<u8> {
    let mut b = Vec::new();
    for (x, w) in v.iter().zip(widths) {
        b.extend_from_slice(&x.to_be_bytes()[4 - w..]);
    }
    b
}

fn ipfix_msg(domain: u32, sets: &[Vec<u8>]) -> Vec<u8> {
    let body: Vec<u8> = sets.concat();
    let mut m = be(
        &[10, 16 + body.len() as u32, 1_763_800_000, 0, domain],
        &[2, 2, 4, 4, 4],
    );
    m.extend_from_slice(&body);
    m
}

fn set(id: u16, body: &[u8]) -> Vec<u8> {
    let mut s = be(&[id as u32, 4 + body.len() as u32], &[2, 2]);
    s.extend_from_slice(body);
    s
}

#[test]
fn ipfix_options_sampling_varlen_enterprise_and_withdrawal() {
    let mut d = NetflowDecoder::default();
    let mut out = Vec::new();
    // Options template 300: scope observationDomainId(149,4), samplingInterval(34,4).
    let opt_t = set(3, &be(&[300, 2, 1, 149, 4, 34, 4], &[2, 2, 2, 2, 2, 2, 2]));
    let opt_d = set(300, &be(&[5, 100], &[4, 4]));
    // Template 400: src v4 (8), enterprise field (pen 9, id 1, varlen),
    // octetDeltaCount (1, 4 bytes: reduced size), packetDeltaCount (2, 2),
    // applicationName (96, varlen), flowStartSeconds (150, 4).
    let mut t = be(&[400, 6, 8, 4], &[2, 2, 2, 2]);
    t.extend(be(&[0x8001, 0xffff, 9], &[2, 2, 4]));
    t.extend(be(
        &[1, 4, 2, 2, 96, 0xffff, 150, 4],
        &[2, 2, 2, 2, 2, 2, 2, 2],
    ));
    let tmpl = set(2, &t);
    // One record: 10.0.0.9, enterprise value of 3 bytes, 5000 bytes, 7
    // packets, app name of 300 bytes (3-byte length form), start time.
    let mut rec = vec![10, 0, 0, 9, 3, 0xaa, 0xbb, 0xcc];
    rec.extend(be(&[5000, 7], &[4, 2]));
    rec.extend([255, 0x01, 0x2c]);
    rec.extend(vec![b'x'; 300]);
    rec.extend(be(&[1_763_799_900], &[4]));
    let data = set(400, &rec);
    d.decode(
        exporter(),
        &ipfix_msg(5, &[opt_t, opt_d, tmpl, data]),
        NOW,
        &mut out,
    )
    .unwrap();
    assert_eq!(out.len(), 1);
    let f = &out[0];
    assert_eq!(f.src_addr.to_string(), "10.0.0.9");
    assert_eq!((f.bytes, f.packets), (5000, 7));
    assert_eq!(f.sampling_rate, 100, "from the options data");
    assert_eq!(f.time_flow_start_ns, 1_763_799_900_000_000_000);
    assert_eq!(f.observation_domain_id, 5);
    assert_eq!(d.templates_known(), 2);
    // Withdraw template 400; its data is then held, not decoded.
    d.decode(
        exporter(),
        &ipfix_msg(5, &[set(2, &be(&[400, 0], &[2, 2]))]),
        NOW,
        &mut out,
    )
    .unwrap();
    assert_eq!(d.templates_known(), 1);
    d.decode(exporter(), &ipfix_msg(5, &[set(400, &rec)]), NOW, &mut out)
        .unwrap();
    assert_eq!((out.len(), d.pending_sets()), (1, 1));
    // Withdraw all options templates.
    d.decode(
        exporter(),
        &ipfix_msg(5, &[set(3, &be(&[3, 0], &[2, 2]))]),
        NOW,
        &mut out,
    )
    .unwrap();
    assert_eq!(d.templates_known(), 0);
}

/// Which field counts where several set the same member: delta counts over
/// total counts in either order, the last of a repeated element, the
/// post-NAT destination MAC only where the record has none, enterprise
/// elements never; the same with a variable-length field in the template
/// (the record's places found per record rather than once).
#[test]
fn fields_that_set_the_same_member() {
    // The template's fields and their lengths; the enterprise field (top
    // bit set) is followed by its enterprise number.
    let ids = [
        ie::OCTET_DELTA_COUNT,
        ie::OCTET_TOTAL_COUNT,
        ie::PACKET_TOTAL_COUNT,
        ie::PACKET_DELTA_COUNT,
        ie::SOURCE_TRANSPORT_PORT,
        ie::SOURCE_TRANSPORT_PORT,
        0x8000 | ie::DESTINATION_TRANSPORT_PORT,
        ie::DESTINATION_MAC_ADDRESS,
        ie::POST_DESTINATION_MAC_ADDRESS,
    ];
    let lens = [4, 4, 4, 4, 2, 2, 2, 6, 6];
    let t = |id: u32, extra: &[u32]| {
        let mut t = be(&[id, ids.len() as u32 + extra.len() as u32 / 2], &[2, 2]);
        for (id, len) in ids.into_iter().zip(lens) {
            t.extend(be(&[id.into(), len], &[2, 2]));
            if id & 0x8000 != 0 {
                t.extend(be(&[9], &[4]));
            }
        }
        t.extend(be(extra, &[2, 2]));
        set(2, &t)
    };
    let mut rec = be(&[100, 999, 50, 5, 1, 2, 3], &[4, 4, 4, 4, 2, 2, 2]);
    rec.extend([0; 6]);
    rec.extend([2, 0, 0, 0, 0, 7]);
    let mut varlen_rec = rec.clone();
    varlen_rec.extend([3, b'a', b'b', b'c']);
    let mut d = NetflowDecoder::default();
    let mut out = Vec::new();
    let msg = ipfix_msg(
        1,
        &[
            t(400, &[]),
            t(401, &[96, 0xffff]), // applicationName, variable length
            set(400, &rec),
            set(401, &varlen_rec),
        ],
    );
    d.decode(exporter(), &msg, NOW, &mut out).unwrap();
    assert_eq!(out.len(), 2);
    for f in &out {
        assert_eq!((f.bytes, f.packets), (100, 5), "delta counts win");
        assert_eq!(f.src_port, 2, "the last of a repeated element");
        assert_eq!(f.dst_port, 0, "an enterprise element is not IANA's");
        assert_eq!(f.dst_mac, 0x0200_0000_0007, "post-NAT MAC where none");
    }
}

#[test]
fn uptime_relative_times_survive_the_32_bit_wrap() {
    let export = 1_763_800_000_000u64;
    // Ordinary: 5 s before the header's uptime.
    assert_eq!(uptime_to_wall_ms(export, 60_000, 55_000), export - 5_000);
    // The flow started before sysUptime wrapped: 3 s before the wrap,
    // the header 2 s after it.
    assert_eq!(
        uptime_to_wall_ms(export, 2_000, u32::MAX - 2_999),
        export - 5_000
    );
    // Stamped a little after the header's uptime (softflowd reading a
    // pcap file does this): just after the export time, not 49.7 days.
    assert_eq!(uptime_to_wall_ms(export, 1_000, 1_250), export + 250);
    // IPFIX, relative to systemInitTimeMilliseconds.
    let init = export - 10_000;
    assert_eq!(sysuptime_to_wall_ms(export, init, 9_000), export - 1_000);
    // Flows stamped before the init time arrive as 2^32 - d.
    assert_eq!(
        sysuptime_to_wall_ms(export, init, (1u64 << 32) - 500),
        init - 500
    );
    // After the counter wrapped (init 50 days back).
    let init = export - 50 * 86_400_000;
    let t = (50 * 86_400_000 - 1_000) % (1u64 << 32);
    assert_eq!(sysuptime_to_wall_ms(export, init, t), export - 1_000);
}

/// 64-bit time and sampling fields at their maximum (found by the
/// netflow fuzz target as an arithmetic overflow): saturate, no panic.
#[test]
fn extreme_time_and_sampling_fields_saturate() {
    let templates: [(u16, &[u16]); 3] = [
        (256, &[160, 22, 21, 305, 306]),
        (257, &[151, 158]),
        (258, &[152, 153]),
    ];
    let mut p = vec![0, 10, 0, 0];
    p.extend(1_763_800_000u32.to_be_bytes());
    p.extend([0, 0, 0, 1, 0, 0, 0, 7]);
    for (id, fields) in templates {
        p.extend(2u16.to_be_bytes());
        p.extend((8 + 4 * (2 + fields.len()) as u16).to_be_bytes());
        p.extend(id.to_be_bytes());
        p.extend((2 + fields.len() as u16).to_be_bytes());
        for f in [8u16, 12].iter().chain(fields) {
            p.extend(f.to_be_bytes());
            p.extend((if *f == 8 || *f == 12 { 4u16 } else { 8 }).to_be_bytes());
        }
    }
    for (id, fields) in templates {
        p.extend(id.to_be_bytes());
        p.extend((4 + 8 + 8 * fields.len() as u16).to_be_bytes());
        p.extend([10, 0, 0, 1, 10, 0, 0, 2]);
        p.extend(std::iter::repeat_n(0xff, 8 * fields.len()));
    }
    let len = p.len() as u16;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    let mut d = NetflowDecoder::default();
    let mut out = Vec::new();
    d.decode(exporter(), &p, NOW, &mut out).unwrap();
    let got: Vec<_> = out
        .iter()
        .map(|r| (r.time_flow_start_ns, r.time_flow_end_ns, r.sampling_rate))
        .collect();
    assert_eq!(
        got,
        [
            (u64::MAX, u64::MAX, 1),
            (0, u64::MAX, 0),
            (u64::MAX, u64::MAX, 0)
        ]
    );
}

#[test]
fn each_sampling_field_gives_the_rate() {
    let rate = |set: fn(&mut RecordTimes)| {
        let mut t = RecordTimes::default();
        set(&mut t);
        t.sampling_rate()
    };
    // softflowd -s 4 (IPFIX): packet interval 1, space 3; and 2 in 8.
    assert_eq!(
        rate(|t| (t.packet_interval, t.packet_space) = (Some(1), Some(3))),
        Some(4)
    );
    assert_eq!(
        rate(|t| (t.packet_interval, t.packet_space) = (Some(2), Some(6))),
        Some(4)
    );
    // 305 alone is the rate (goflow2's reading); 34 as before.
    assert_eq!(rate(|t| t.packet_interval = Some(100)), Some(100));
    assert_eq!(rate(|t| t.sampling = Some(512)), Some(512));
    // Selector size and population (309, 310); probability (311).
    assert_eq!(
        rate(|t| (t.sampling_size, t.sampling_population) = (Some(1), Some(64))),
        Some(64)
    );
    assert_eq!(rate(|t| t.sampling_probability = Some(0.01)), Some(100));
    assert_eq!(rate(|_| ()), None);
}

#[test]
fn v5_header_times_and_icmp() {
    let mut p = be(
        &[5, 2, 60_000, 1_763_800_000, 500_000_000, 42],
        &[2, 2, 4, 4, 4, 4],
    );
    p.extend([0, 0, 0x40, 0x0a]); // engine, sampling mode 1 interval 10
    for (proto, dport) in [(6u8, 443u16), (1, 0x0800)] {
        let mut r = vec![10, 0, 0, 1, 10, 0, 0, 2, 0, 0, 0, 0];
        r.extend(be(
            &[3, 4, 5, 700, 50_000, 59_000, 1234, dport as u32],
            &[2, 2, 4, 4, 4, 4, 2, 2],
        ));
        r.extend([0, 0x12, proto, 0x10]);
        r.extend(be(&[64512, 64513], &[2, 2]));
        r.extend([24, 16, 0, 0]);
        p.extend(r);
    }
    let mut d = NetflowDecoder::default();
    let mut out = Vec::new();
    d.decode(exporter(), &p, NOW, &mut out).unwrap();
    assert_eq!(out.len(), 2);
    let (tcp, icmp) = (&out[0], &out[1]);
    assert_eq!(tcp.flow_type, FlowType::NetFlowV5);
    assert_eq!(
        (tcp.packets, tcp.bytes, tcp.in_if, tcp.out_if),
        (5, 700, 3, 4)
    );
    assert_eq!(
        (tcp.src_port, tcp.dst_port, tcp.tcp_flags, tcp.ip_tos),
        (1234, 443, 0x12, 0x10)
    );
    assert_eq!(
        (tcp.src_as, tcp.dst_as, tcp.sampling_rate, tcp.sequence_num),
        (64512, 64513, 10, 42)
    );
    // boot = export (1_763_800_000_500 ms) - uptime 60_000 ms.
    assert_eq!(
        tcp.time_flow_start_ns,
        (1_763_800_000_500 - 60_000 + 50_000) * 1_000_000
    );
    assert_eq!(
        tcp.time_flow_end_ns,
        (1_763_800_000_500 - 60_000 + 59_000) * 1_000_000
    );
    assert_eq!(
        (icmp.icmp_type, icmp.icmp_code, icmp.src_port, icmp.dst_port),
        (8, 0, 0, 0)
    );
}

#[test]
fn malformed_packets_are_errors_with_reasons() {
    let mut d = NetflowDecoder::default();
    let mut out = Vec::new();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![], "truncated"),
        (vec![0, 7, 0, 0], "version"),
        (be(&[5, 1, 0, 0, 0, 0], &[2, 2, 4, 4, 4, 4]), "truncated"),
        (
            be(&[5, 31, 0, 0, 0, 0, 0], &[2, 2, 4, 4, 4, 4, 4]),
            "length",
        ),
        (be(&[10, 200, 0, 0, 0], &[2, 2, 4, 4, 4]), "truncated"),
        (ipfix_msg(1, &[be(&[2, 2], &[2, 2])]), "length"),
        (
            ipfix_msg(1, &[set(2, &be(&[256, 1, 8, 0], &[2, 2, 2, 2]))]),
            "template",
        ),
        (
            ipfix_msg(1, &[set(2, &be(&[12, 1, 8, 4], &[2, 2, 2, 2]))]),
            "template",
        ),
        (
            ipfix_msg(1, &[set(2, &be(&[256, 2, 8, 4], &[2, 2, 2, 2]))]),
            "truncated",
        ),
        (
            be(&[9, 1, 0, 0, 0, 0, 0, 3], &[2, 2, 4, 4, 4, 4, 2, 2]),
            "length",
        ),
    ];
    for (p, reason) in cases {
        let e = d.decode(exporter(), &p, NOW, &mut out).unwrap_err();
        assert_eq!(e.reason(), reason, "{p:?}: {e}");
    }
    assert!(out.is_empty());
}
