//! JSON lines of [`FlowRecord`]s: goflow2's field names, addresses as text.
//!
//! The bytes are exactly those of `serde_json` over `FlowRecord`'s `Serialize`
//! (field order, `sampler_address` "" when absent, customer ids and AS names
//! left out when 0/empty), which `FlowRecord::from_json` reads back; a unit
//! test holds the two together over a corpus. Written by hand because it is
//! the hot path of every JSON output (the agent's stdout, `collect` printing
//! millions of flows per second, `--kafka-format json`): field names are
//! constant byte strings, integers go through `itoa`, IPv4 addresses are
//! formatted without `core::fmt`. About 4-5x faster than `serde_json` here
//! (`cargo xtask bench collect` prints both).

use std::net::{IpAddr, Ipv4Addr};

use crate::record::FlowRecord;

/// Appends `r` as one JSON object (no newline) to `out`.
pub fn write_record(out: &mut Vec<u8>, r: &FlowRecord) {
    let mut n = itoa::Buffer::new();
    let mut int = |out: &mut Vec<u8>, key: &[u8], v: u64| {
        out.extend_from_slice(key);
        out.extend_from_slice(n.format(v).as_bytes());
    };
    out.extend_from_slice(b"{\"type\":\"");
    out.extend_from_slice(r.flow_type.as_str().as_bytes());
    out.push(b'"');
    int(out, b",\"time_received_ns\":", r.time_received_ns);
    int(out, b",\"sequence_num\":", r.sequence_num.into());
    int(out, b",\"sampling_rate\":", r.sampling_rate);
    out.extend_from_slice(b",\"sampler_address\":\"");
    if let Some(a) = r.sampler_address {
        write_addr(out, a);
    }
    out.push(b'"');
    int(out, b",\"time_flow_start_ns\":", r.time_flow_start_ns);
    int(out, b",\"time_flow_end_ns\":", r.time_flow_end_ns);
    int(out, b",\"bytes\":", r.bytes);
    int(out, b",\"packets\":", r.packets);
    out.extend_from_slice(b",\"src_addr\":\"");
    write_addr(out, r.src_addr);
    out.extend_from_slice(b"\",\"dst_addr\":\"");
    write_addr(out, r.dst_addr);
    out.push(b'"');
    int(out, b",\"etype\":", r.etype.into());
    int(out, b",\"proto\":", r.proto.into());
    int(out, b",\"src_port\":", r.src_port.into());
    int(out, b",\"dst_port\":", r.dst_port.into());
    int(out, b",\"in_if\":", r.in_if.into());
    int(out, b",\"out_if\":", r.out_if.into());
    int(out, b",\"vlan_id\":", r.vlan_id.into());
    int(out, b",\"tcp_flags\":", r.tcp_flags.into());
    int(out, b",\"icmp_type\":", r.icmp_type.into());
    int(out, b",\"icmp_code\":", r.icmp_code.into());
    int(out, b",\"flow_direction\":", r.flow_direction.into());
    int(out, b",\"ip_tos\":", r.ip_tos.into());
    int(out, b",\"src_as\":", r.src_as.into());
    int(out, b",\"dst_as\":", r.dst_as.into());
    int(out, b",\"src_mac\":", r.src_mac);
    int(out, b",\"dst_mac\":", r.dst_mac);
    int(
        out,
        b",\"observation_domain_id\":",
        r.observation_domain_id.into(),
    );
    for (key, v) in [
        (&b",\"src_cid\":"[..], r.src_cid),
        (b",\"dst_cid\":", r.dst_cid),
        (b",\"cid\":", r.cid),
    ] {
        if v != 0 {
            int(out, key, v.into());
        }
    }
    for (key, name) in [
        (&b",\"src_as_name\":"[..], &r.src_as_name),
        (b",\"dst_as_name\":", &r.dst_as_name),
    ] {
        if !name.is_empty() {
            out.extend_from_slice(key);
            // Names come from a database: let serde_json escape them.
            serde_json::to_writer(&mut *out, name).expect("a string serializes");
        }
    }
    out.push(b'}');
}

/// Appends the records as JSON lines (one object and a newline each).
pub fn write_lines(out: &mut Vec<u8>, records: &[FlowRecord]) {
    for r in records {
        write_record(out, r);
        out.push(b'\n');
    }
}

/// An address as `Display` writes it (IPv6 through `core::fmt`: rarer, and
/// its compression rules are std's).
fn write_addr(out: &mut Vec<u8>, a: IpAddr) {
    match a {
        IpAddr::V4(v4) => write_v4(out, v4),
        IpAddr::V6(v6) => {
            use std::io::Write;
            write!(out, "{v6}").expect("writing to a Vec");
        }
    }
}

fn write_v4(out: &mut Vec<u8>, a: Ipv4Addr) {
    for (i, octet) in a.octets().into_iter().enumerate() {
        if i > 0 {
            out.push(b'.');
        }
        if octet >= 100 {
            out.push(b'0' + octet / 100);
        }
        if octet >= 10 {
            out.push(b'0' + octet / 10 % 10);
        }
        out.push(b'0' + octet % 10);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::FlowType;
    use std::net::Ipv6Addr;

    fn serde(r: &FlowRecord) -> String {
        serde_json::to_string(r).unwrap()
    }

    fn ours(r: &FlowRecord) -> String {
        let mut v = Vec::new();
        write_record(&mut v, r);
        String::from_utf8(v).unwrap()
    }

    fn corpus() -> Vec<FlowRecord> {
        let max = FlowRecord {
            flow_type: FlowType::Ipfix,
            time_received_ns: u64::MAX,
            sequence_num: u32::MAX,
            sampling_rate: u64::MAX,
            sampler_address: Some(IpAddr::V4(Ipv4Addr::BROADCAST)),
            time_flow_start_ns: u64::MAX,
            time_flow_end_ns: u64::MAX,
            bytes: u64::MAX,
            packets: u64::MAX,
            src_addr: IpAddr::V6(Ipv6Addr::from(u128::MAX)),
            dst_addr: IpAddr::V4(Ipv4Addr::new(255, 255, 255, 255)),
            etype: u16::MAX,
            proto: u8::MAX,
            src_port: u16::MAX,
            dst_port: u16::MAX,
            in_if: u32::MAX,
            out_if: u32::MAX,
            vlan_id: u16::MAX,
            tcp_flags: u8::MAX,
            icmp_type: u8::MAX,
            icmp_code: u8::MAX,
            flow_direction: u8::MAX,
            ip_tos: u8::MAX,
            src_as: u32::MAX,
            dst_as: u32::MAX,
            src_mac: u64::MAX,
            dst_mac: u64::MAX,
            observation_domain_id: u32::MAX,
            src_cid: u32::MAX,
            dst_cid: u32::MAX,
            cid: u32::MAX,
            src_as_name: "AS \"quoted\" \\ back\u{1}slash, ünïcode, \u{2028}".into(),
            dst_as_name: "EXAMPLE-NET".into(),
        };
        let mut v = vec![FlowRecord::default(), max];
        for (i, t) in [
            FlowType::Unknown,
            FlowType::SFlow5,
            FlowType::NetFlowV5,
            FlowType::NetFlowV9,
            FlowType::Ipfix,
            FlowType::Ebpf,
        ]
        .into_iter()
        .enumerate()
        {
            v.push(FlowRecord {
                flow_type: t,
                src_addr: IpAddr::V4(Ipv4Addr::new(10, 0, i as u8, 9)),
                dst_addr: "2001:db8::1".parse().unwrap(),
                sampler_address: Some("::ffff:192.0.2.1".parse().unwrap()),
                cid: i as u32,
                ..FlowRecord::default()
            });
        }
        for a in [
            "::",
            "::1",
            "fe80::1:2",
            "2001:db8:0:0:1:0:0:1",
            "1:2:3:4:5:6:7:8",
        ] {
            v.push(FlowRecord {
                src_addr: a.parse().unwrap(),
                dst_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                ..FlowRecord::default()
            });
        }
        // Every IPv4 octet value, and integers of every length.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for i in 0..=255u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let digits = 10u64.saturating_pow(i % 20);
            v.push(FlowRecord {
                flow_type: FlowType::NetFlowV9,
                time_received_ns: x,
                bytes: digits,
                packets: digits - 1,
                src_addr: IpAddr::V4(Ipv4Addr::from(x as u32)),
                dst_addr: IpAddr::V4(Ipv4Addr::new(i as u8, 0, 99, 100)),
                src_port: x as u16,
                in_if: (x >> 32) as u32,
                src_mac: x >> 16,
                src_cid: (i % 2) * 7,
                src_as_name: if i % 3 == 0 {
                    format!("AS{i}")
                } else {
                    String::new()
                },
                ..FlowRecord::default()
            });
        }
        v
    }

    #[test]
    fn same_bytes_as_serde_json() {
        for r in corpus() {
            assert_eq!(ours(&r), serde(&r), "{r:?}");
        }
    }

    #[test]
    fn lines_read_back() {
        let records = corpus();
        let mut out = Vec::new();
        write_lines(&mut out, &records);
        let back: Vec<FlowRecord> = out
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| crate::record::from_json(l).unwrap())
            .collect();
        assert_eq!(back, records);
    }
}
