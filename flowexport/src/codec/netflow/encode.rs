//! Encoding flow records as IPFIX (RFC 7011) and NetFlow v9 (RFC 3954) export
//! packets. Pure: the caller supplies the clock and sends the bytes.
//!
//! Two data templates per exporter: one for IPv4 flows (id 256) and one for
//! IPv6 flows (id 257). Templates go out in the first packet and again every
//! `template_interval_ms` and every `template_packets` packets, since UDP
//! collectors may start (or lose state) at any time.
//!
//! With sampling (`--sampling N`), an options template (id 258) and one
//! options data record stating the rate go out with the data templates:
//! IPFIX (RFC 7011 options template, scope observationDomainId) carries
//! samplingInterval (34) and samplingAlgorithm (35) as RFC 7270 keeps them
//! for NetFlow v9 collectors, and selectorId (302), selectorAlgorithm (304)
//! = 4 (uniform probabilistic: the kernel keeps each packet independently
//! with probability 1/N) and samplingProbability (311) = 1/N as RFC 5477
//! defines them; NetFlow v9 (scope System) carries
//! SAMPLING_INTERVAL (34) and SAMPLING_ALGORITHM (35) = 2 (random), as
//! softflowd does.
//!
//! Sequence numbers follow each RFC: IPFIX counts data records (options
//! data included) sent before the message, per observation domain; NetFlow
//! v9 counts export packets.

use std::net::IpAddr;

use super::ie;
use super::layer2_segment_id;
use crate::record::{FlowRecord, ETYPE_IPV6};

/// Which export protocol a stream speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportProtocol {
    Ipfix,
    NetflowV9,
}

pub const TEMPLATE_ID_V4: u16 = 256;
pub const TEMPLATE_ID_V6: u16 = 257;
/// The sampling options template (only with sampling).
pub const TEMPLATE_ID_SAMPLING: u16 = 258;

const IPFIX_HEADER_LEN: usize = 16;
const V9_HEADER_LEN: usize = 20;
const SET_HEADER_LEN: usize = 4;

/// The sampling options template's fields: the scope first.
fn sampling_fields(proto: ExportProtocol) -> Vec<Field> {
    match proto {
        ExportProtocol::Ipfix => vec![
            (ie::OBSERVATION_DOMAIN_ID, 4),
            (ie::SAMPLING_INTERVAL, 4),
            (ie::SAMPLING_ALGORITHM, 1),
            (ie::SELECTOR_ID, 8),
            (ie::SELECTOR_ALGORITHM, 2),
            (ie::SAMPLING_PROBABILITY, 8),
        ],
        ExportProtocol::NetflowV9 => vec![
            (ie::V9_SCOPE_SYSTEM, 4),
            (ie::SAMPLING_INTERVAL, 4),
            (ie::SAMPLING_ALGORITHM, 1),
        ],
    }
}

/// Pads a set begun at `start` to 4 bytes and writes its length.
fn close_set(pkt: &mut Vec<u8>, start: usize) {
    while !(pkt.len() - start).is_multiple_of(4) {
        pkt.push(0);
    }
    let len = (pkt.len() - start) as u16;
    pkt[start + 2..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// One field of a template: (element id, length in bytes).
type Field = (u16, u16);

/// The data template for one address family and protocol.
pub fn template_fields(proto: ExportProtocol, ipv6: bool) -> Vec<Field> {
    let mut f: Vec<Field> = if ipv6 {
        vec![
            (ie::SOURCE_IPV6_ADDRESS, 16),
            (ie::DESTINATION_IPV6_ADDRESS, 16),
        ]
    } else {
        vec![
            (ie::SOURCE_IPV4_ADDRESS, 4),
            (ie::DESTINATION_IPV4_ADDRESS, 4),
        ]
    };
    f.extend_from_slice(&[
        (ie::SOURCE_TRANSPORT_PORT, 2),
        (ie::DESTINATION_TRANSPORT_PORT, 2),
        (ie::PROTOCOL_IDENTIFIER, 1),
        // IPFIX's tcpControlBits is 2 bytes (RFC 7125); v9's TCP_FLAGS is 1.
        (
            ie::TCP_CONTROL_BITS,
            if proto == ExportProtocol::Ipfix { 2 } else { 1 },
        ),
        (
            // NetFlow v9 has one ICMP_TYPE (32) for both families.
            if ipv6 && proto == ExportProtocol::Ipfix {
                ie::ICMP_TYPE_CODE_IPV6
            } else {
                ie::ICMP_TYPE_CODE_IPV4
            },
            2,
        ),
        (ie::VLAN_ID, 2),
        (ie::INGRESS_INTERFACE, 4),
        (ie::EGRESS_INTERFACE, 4),
        (ie::FLOW_DIRECTION, 1),
        (ie::OCTET_DELTA_COUNT, 8),
        (ie::PACKET_DELTA_COUNT, 8),
    ]);
    match proto {
        ExportProtocol::Ipfix => f.extend_from_slice(&[
            (ie::FLOW_START_MILLISECONDS, 8),
            (ie::FLOW_END_MILLISECONDS, 8),
        ]),
        ExportProtocol::NetflowV9 => f.extend_from_slice(&[
            (ie::FLOW_START_SYS_UP_TIME, 4),
            (ie::FLOW_END_SYS_UP_TIME, 4),
        ]),
    }
    f
}

fn record_len(fields: &[Field]) -> usize {
    fields.iter().map(|(_, l)| *l as usize).sum()
}

/// Per-collector stream state.
#[derive(Clone, Debug)]
pub struct ExportStream {
    pub protocol: ExportProtocol,
    /// IPFIX observation domain id / NetFlow v9 source id.
    pub observation_domain: u32,
    /// Largest export packet (UDP payload), bytes.
    pub max_packet: usize,
    pub template_interval_ms: u64,
    pub template_packets: u32,
    /// Wall-clock ms when the exporter started: NetFlow v9's sysUptime zero.
    pub boot_ms: u64,
    /// IPFIX: data records sent; v9: packets sent.
    sequence: u32,
    packets_since_templates: u32,
    last_templates_ms: Option<u64>,
    v4: Vec<Field>,
    v6: Vec<Field>,
    /// 1-in-N sampling of the flows' packets (1: none; no options sent).
    sampling: u32,
    /// IPFIX records carry layer2SegmentId (decapsulated flows' tunnel).
    segment_ids: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExportError {
    #[error("export packet size {0} is too small for one record with templates (minimum {1})")]
    PacketTooSmall(usize, usize),
}

impl ExportStream {
    pub fn new(
        protocol: ExportProtocol,
        observation_domain: u32,
        max_packet: usize,
        template_interval_ms: u64,
        template_packets: u32,
        boot_ms: u64,
    ) -> Result<ExportStream, ExportError> {
        let s = ExportStream {
            protocol,
            observation_domain,
            max_packet,
            template_interval_ms,
            template_packets,
            boot_ms,
            sequence: 0,
            packets_since_templates: 0,
            last_templates_ms: None,
            v4: template_fields(protocol, false),
            v6: template_fields(protocol, true),
            sampling: 1,
            segment_ids: false,
        };
        s.check_size()?;
        Ok(s)
    }

    /// States 1-in-`n` packet sampling: with `n` > 1 the sampling options
    /// template and its data go out with the data templates.
    pub fn with_sampling(mut self, n: u32) -> Result<ExportStream, ExportError> {
        self.sampling = n.max(1);
        self.check_size()?;
        Ok(self)
    }

    /// IPFIX: data templates and records carry layer2SegmentId (for an
    /// agent whose flows may come out of tunnels). NetFlow v9 has no such
    /// field: unchanged.
    pub fn with_segment_ids(mut self) -> Result<ExportStream, ExportError> {
        if self.protocol == ExportProtocol::Ipfix && !self.segment_ids {
            self.segment_ids = true;
            self.v4.push((ie::LAYER2_SEGMENT_ID, 8));
            self.v6.push((ie::LAYER2_SEGMENT_ID, 8));
        }
        self.check_size()?;
        Ok(self)
    }

    fn check_size(&self) -> Result<(), ExportError> {
        let min =
            self.header_len() + self.templates_len() + SET_HEADER_LEN + record_len(&self.v6) + 3;
        if self.max_packet < min {
            return Err(ExportError::PacketTooSmall(self.max_packet, min));
        }
        Ok(())
    }

    fn header_len(&self) -> usize {
        match self.protocol {
            ExportProtocol::Ipfix => IPFIX_HEADER_LEN,
            ExportProtocol::NetflowV9 => V9_HEADER_LEN,
        }
    }

    /// Size of the template set carrying both templates, and of the
    /// sampling options template and data sets (with their padding).
    fn templates_len(&self) -> usize {
        let data = SET_HEADER_LEN + 4 * 2 + 4 * (self.v4.len() + self.v6.len());
        if self.sampling <= 1 {
            return data;
        }
        let f = sampling_fields(self.protocol);
        let pad4 = |n: usize| n.div_ceil(4) * 4;
        data + pad4(SET_HEADER_LEN + 6 + 4 * f.len()) + pad4(SET_HEADER_LEN + record_len(&f))
    }

    fn templates_due(&self, now_ms: u64) -> bool {
        match self.last_templates_ms {
            None => true,
            Some(t) => {
                now_ms.saturating_sub(t) >= self.template_interval_ms
                    || self.packets_since_templates >= self.template_packets
            }
        }
    }

    /// Encodes `records` into as many packets as needed, each at most
    /// `max_packet` bytes. `now_ms` is wall-clock time in ms.
    pub fn encode(&mut self, records: &[FlowRecord], now_ms: u64) -> Vec<Vec<u8>> {
        let mut packets = Vec::new();
        let mut i = 0;
        while i < records.len() {
            let mut pkt = Vec::with_capacity(self.max_packet);
            pkt.resize(self.header_len(), 0);
            let mut count = 0u16; // v9: records in the packet
            let mut data_records = 0u32;
            if self.templates_due(now_ms) {
                self.write_templates(&mut pkt);
                count += 2;
                if self.sampling > 1 {
                    self.write_sampling_options(&mut pkt);
                    count += 2;
                    data_records += 1;
                }
                self.last_templates_ms = Some(now_ms);
                self.packets_since_templates = 0;
            }
            // Data sets: consecutive records of one family share a set.
            while i < records.len() {
                let ipv6 = records[i].etype == ETYPE_IPV6;
                let fields = if ipv6 { &self.v6 } else { &self.v4 };
                let rlen = record_len(fields);
                if pkt.len() + SET_HEADER_LEN + rlen + 3 > self.max_packet {
                    break;
                }
                let set_start = pkt.len();
                let id = if ipv6 { TEMPLATE_ID_V6 } else { TEMPLATE_ID_V4 };
                pkt.extend_from_slice(&id.to_be_bytes());
                pkt.extend_from_slice(&[0, 0]);
                while i < records.len()
                    && (records[i].etype == ETYPE_IPV6) == ipv6
                    && pkt.len() + rlen + 3 <= self.max_packet
                {
                    self.write_record(&mut pkt, &records[i], ipv6);
                    i += 1;
                    count += 1;
                    data_records += 1;
                }
                // Padded to a 4-byte boundary (shorter than any record).
                close_set(&mut pkt, set_start);
            }
            self.write_header(&mut pkt, count, data_records, now_ms);
            self.packets_since_templates += 1;
            packets.push(pkt);
        }
        packets
    }

    fn write_templates(&self, pkt: &mut Vec<u8>) {
        let start = pkt.len();
        let set_id: u16 = match self.protocol {
            ExportProtocol::Ipfix => 2,
            ExportProtocol::NetflowV9 => 0,
        };
        pkt.extend_from_slice(&set_id.to_be_bytes());
        pkt.extend_from_slice(&[0, 0]);
        for (id, fields) in [(TEMPLATE_ID_V4, &self.v4), (TEMPLATE_ID_V6, &self.v6)] {
            pkt.extend_from_slice(&id.to_be_bytes());
            pkt.extend_from_slice(&(fields.len() as u16).to_be_bytes());
            for (ie, len) in fields {
                pkt.extend_from_slice(&ie.to_be_bytes());
                pkt.extend_from_slice(&len.to_be_bytes());
            }
        }
        close_set(pkt, start);
    }

    /// The sampling options template set and its one data record.
    fn write_sampling_options(&self, pkt: &mut Vec<u8>) {
        let fields = sampling_fields(self.protocol);
        let start = pkt.len();
        match self.protocol {
            ExportProtocol::Ipfix => {
                // Set 3: template id, field count, scope field count.
                pkt.extend_from_slice(&3u16.to_be_bytes());
                pkt.extend_from_slice(&[0, 0]);
                pkt.extend_from_slice(&TEMPLATE_ID_SAMPLING.to_be_bytes());
                pkt.extend_from_slice(&(fields.len() as u16).to_be_bytes());
                pkt.extend_from_slice(&1u16.to_be_bytes());
            }
            ExportProtocol::NetflowV9 => {
                // Flowset 1: template id, scope bytes, option field bytes.
                pkt.extend_from_slice(&1u16.to_be_bytes());
                pkt.extend_from_slice(&[0, 0]);
                pkt.extend_from_slice(&TEMPLATE_ID_SAMPLING.to_be_bytes());
                pkt.extend_from_slice(&4u16.to_be_bytes());
                pkt.extend_from_slice(&(4 * (fields.len() as u16 - 1)).to_be_bytes());
            }
        }
        for (ie, len) in &fields {
            pkt.extend_from_slice(&ie.to_be_bytes());
            pkt.extend_from_slice(&len.to_be_bytes());
        }
        close_set(pkt, start);
        let start = pkt.len();
        pkt.extend_from_slice(&TEMPLATE_ID_SAMPLING.to_be_bytes());
        pkt.extend_from_slice(&[0, 0]);
        let n = self.sampling;
        pkt.extend_from_slice(&self.observation_domain.to_be_bytes());
        pkt.extend_from_slice(&n.to_be_bytes());
        match self.protocol {
            ExportProtocol::Ipfix => {
                pkt.push(2); // samplingAlgorithm: random (RFC 7270)
                pkt.extend_from_slice(&1u64.to_be_bytes()); // selectorId
                                                            // Uniform probabilistic, probability 1/N (float64).
                pkt.extend_from_slice(&4u16.to_be_bytes());
                pkt.extend_from_slice(&(1.0 / f64::from(n)).to_bits().to_be_bytes());
            }
            ExportProtocol::NetflowV9 => pkt.push(2), // SAMPLING_ALGORITHM: random
        }
        close_set(pkt, start);
    }

    fn write_record(&self, pkt: &mut Vec<u8>, r: &FlowRecord, ipv6: bool) {
        fn addr(pkt: &mut Vec<u8>, a: &IpAddr, ipv6: bool) {
            match (a, ipv6) {
                (IpAddr::V6(v6), true) => pkt.extend_from_slice(&v6.octets()),
                (IpAddr::V4(v4), false) => pkt.extend_from_slice(&v4.octets()),
                // Family mismatch cannot come from the agent; zeros keep the
                // record well-formed.
                (_, true) => pkt.extend_from_slice(&[0; 16]),
                (_, false) => pkt.extend_from_slice(&[0; 4]),
            }
        }
        addr(pkt, &r.src_addr, ipv6);
        addr(pkt, &r.dst_addr, ipv6);
        pkt.extend_from_slice(&r.src_port.to_be_bytes());
        pkt.extend_from_slice(&r.dst_port.to_be_bytes());
        pkt.push(r.proto);
        match self.protocol {
            ExportProtocol::Ipfix => pkt.extend_from_slice(&(r.tcp_flags as u16).to_be_bytes()),
            ExportProtocol::NetflowV9 => pkt.push(r.tcp_flags),
        }
        pkt.extend_from_slice(&(((r.icmp_type as u16) << 8) | r.icmp_code as u16).to_be_bytes());
        pkt.extend_from_slice(&r.vlan_id.to_be_bytes());
        pkt.extend_from_slice(&r.in_if.to_be_bytes());
        pkt.extend_from_slice(&r.out_if.to_be_bytes());
        pkt.push(r.flow_direction);
        pkt.extend_from_slice(&r.bytes.to_be_bytes());
        pkt.extend_from_slice(&r.packets.to_be_bytes());
        let (start_ms, end_ms) = (
            r.time_flow_start_ns / 1_000_000,
            r.time_flow_end_ns / 1_000_000,
        );
        match self.protocol {
            ExportProtocol::Ipfix => {
                pkt.extend_from_slice(&start_ms.to_be_bytes());
                pkt.extend_from_slice(&end_ms.to_be_bytes());
            }
            ExportProtocol::NetflowV9 => {
                pkt.extend_from_slice(&(self.uptime_ms(start_ms)).to_be_bytes());
                pkt.extend_from_slice(&(self.uptime_ms(end_ms)).to_be_bytes());
            }
        }
        if self.segment_ids {
            pkt.extend_from_slice(&layer2_segment_id(r).to_be_bytes());
        }
    }

    /// Milliseconds since `boot_ms`, as NetFlow v9's 32-bit sysUptime wraps.
    fn uptime_ms(&self, wall_ms: u64) -> u32 {
        wall_ms.saturating_sub(self.boot_ms) as u32
    }

    fn write_header(&mut self, pkt: &mut [u8], count: u16, data_records: u32, now_ms: u64) {
        let secs = (now_ms / 1000) as u32;
        match self.protocol {
            ExportProtocol::Ipfix => {
                let len = pkt.len() as u16;
                pkt[0..2].copy_from_slice(&10u16.to_be_bytes());
                pkt[2..4].copy_from_slice(&len.to_be_bytes());
                pkt[4..8].copy_from_slice(&secs.to_be_bytes());
                pkt[8..12].copy_from_slice(&self.sequence.to_be_bytes());
                pkt[12..16].copy_from_slice(&self.observation_domain.to_be_bytes());
                self.sequence = self.sequence.wrapping_add(data_records);
            }
            ExportProtocol::NetflowV9 => {
                // The header carries whole seconds only; uptime is taken at
                // that same whole second, so a collector's
                // unix_secs * 1000 - sysUptime is exactly `boot_ms`, and
                // FIRST/LAST_SWITCHED convert back to exact wall times.
                let uptime = self.uptime_ms(secs as u64 * 1000);
                pkt[0..2].copy_from_slice(&9u16.to_be_bytes());
                pkt[2..4].copy_from_slice(&count.to_be_bytes());
                pkt[4..8].copy_from_slice(&uptime.to_be_bytes());
                pkt[8..12].copy_from_slice(&secs.to_be_bytes());
                pkt[12..16].copy_from_slice(&self.sequence.to_be_bytes());
                pkt[16..20].copy_from_slice(&self.observation_domain.to_be_bytes());
                self.sequence = self.sequence.wrapping_add(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::netflow::tests::sample;

    /// The decoder tests' IPv4 record, as a TCP flow with flags.
    fn tcp(i: u32) -> FlowRecord {
        FlowRecord {
            proto: 6,
            src_port: 1000 + i as u16,
            dst_port: 443,
            icmp_type: 0,
            tcp_flags: 0x1b,
            ..sample(i, false)
        }
    }

    fn be16(b: &[u8], i: usize) -> u16 {
        u16::from_be_bytes([b[i], b[i + 1]])
    }
    fn be32(b: &[u8], i: usize) -> u32 {
        u32::from_be_bytes(b[i..i + 4].try_into().unwrap())
    }

    /// (set id, set length) of every set in a packet, checking the lengths
    /// add up exactly.
    fn sets(pkt: &[u8], header: usize) -> Vec<(u16, usize)> {
        let mut out = Vec::new();
        let mut off = header;
        while off < pkt.len() {
            let (id, len) = (be16(pkt, off), be16(pkt, off + 2) as usize);
            assert!(
                len >= 4 && off + len <= pkt.len(),
                "set overruns the packet"
            );
            out.push((id, len));
            off += len;
        }
        assert_eq!(off, pkt.len());
        out
    }

    #[test]
    fn ipfix_headers_sets_and_sequence() {
        let mut s = ExportStream::new(ExportProtocol::Ipfix, 42, 1400, 60_000, 20, 0).unwrap();
        let recs: Vec<_> = (0..50).map(|i| sample(i, i % 5 == 0)).collect();
        let pkts = s.encode(&recs, 1_700_000_010_000);
        assert!(pkts.len() >= 2);
        let mut seq = 0;
        let mut data = 0;
        for (n, p) in pkts.iter().enumerate() {
            assert!(p.len() <= 1400);
            assert_eq!(be16(p, 0), 10);
            assert_eq!(be16(p, 2) as usize, p.len());
            assert_eq!(be32(p, 4), 1_700_000_010);
            assert_eq!(
                be32(p, 8),
                seq,
                "sequence = data records before this message"
            );
            assert_eq!(be32(p, 12), 42);
            let ss = sets(p, 16);
            assert_eq!(ss[0].0 == 2, n == 0, "templates only in the first packet");
            for (id, len) in ss {
                let per = match id {
                    TEMPLATE_ID_V4 => 4 + 4 + 2 + 2 + 1 + 2 + 2 + 2 + 4 + 4 + 1 + 8 + 8 + 8 + 8,
                    TEMPLATE_ID_V6 => 16 + 16 + 2 + 2 + 1 + 2 + 2 + 2 + 4 + 4 + 1 + 8 + 8 + 8 + 8,
                    _ => continue,
                };
                let n = (len - 4) / per;
                assert!((len - 4) - n * per < 4, "only padding after the records");
                seq += n as u32;
                data += n;
            }
        }
        assert_eq!(data, 50);
    }

    #[test]
    fn ipfix_record_bytes() {
        let mut s = ExportStream::new(ExportProtocol::Ipfix, 1, 1400, 60_000, 20, 0).unwrap();
        let p = &s.encode(&[tcp(1)], 1_763_800_000_000)[0];
        let tmpl_len = be16(p, 18) as usize;
        let d = 16 + tmpl_len;
        assert_eq!(be16(p, d), TEMPLATE_ID_V4);
        let r = &p[d + 4..];
        assert_eq!(&r[0..8], &[10, 1, 2, 3, 10, 4, 5, 6]);
        assert_eq!((be16(r, 8), be16(r, 10), r[12]), (1001, 443, 6));
        assert_eq!(be16(r, 13), 0x1b);
        assert_eq!(be16(r, 17), 12); // vlan
        assert_eq!((be32(r, 19), be32(r, 23), r[27]), (4, 0, 0));
        assert_eq!(u64::from_be_bytes(r[28..36].try_into().unwrap()), 10_001);
        assert_eq!(u64::from_be_bytes(r[36..44].try_into().unwrap()), 11);
        assert_eq!(
            u64::from_be_bytes(r[44..52].try_into().unwrap()),
            1_763_799_990_123
        );
        assert_eq!(
            u64::from_be_bytes(r[52..60].try_into().unwrap()),
            1_763_799_995_456
        );
    }

    #[test]
    fn v9_counts_packets_and_uses_uptime() {
        // The sample's flows start 1.123 s and end 6.456 s after boot.
        let boot = 1_763_799_989_000;
        let mut s = ExportStream::new(ExportProtocol::NetflowV9, 9, 1400, 60_000, 3, boot).unwrap();
        let recs: Vec<_> = (0..3).map(tcp).collect();
        let mut templates = 0;
        for n in 0..8u32 {
            let pkts = s.encode(&recs, boot + 10_000 + 999);
            assert_eq!(pkts.len(), 1);
            let p = &pkts[0];
            assert_eq!(be16(p, 0), 9);
            assert_eq!(be32(p, 4), 10_000, "sysUptime at the header's whole second");
            assert_eq!(be32(p, 8) as u64 * 1000 - be32(p, 4) as u64, boot);
            assert_eq!(be32(p, 12), n, "sequence counts packets");
            assert_eq!(be32(p, 16), 9);
            let ss = sets(p, 20);
            let has_t = ss[0].0 == 0;
            templates += has_t as u32;
            assert_eq!(be16(p, 2), 3 + if has_t { 2 } else { 0 }, "count = records");
            let d = ss.iter().find(|(id, _)| *id == TEMPLATE_ID_V4).unwrap();
            // v9 IPv4 records are 51 bytes (1-byte TCP flags), padded per set.
            assert_eq!(d.1, 4 + 3 * 51 + 3);
        }
        // Every 3 packets: packets 0, 3, 6.
        assert_eq!(templates, 3);
        // FIRST_SWITCHED / LAST_SWITCHED of a lone record (51 bytes + 1 pad).
        let p = &s.encode(&recs[..1], boot + 10_000)[0];
        let r = &p[p.len() - 52..];
        assert_eq!(be32(r, 43), 1_123);
        assert_eq!(be32(r, 47), 6_456);
        assert_eq!(r[51], 0, "padding");
    }

    #[test]
    fn template_interval_and_small_packets() {
        let mut s = ExportStream::new(ExportProtocol::Ipfix, 1, 1400, 1_000, 1000, 0).unwrap();
        let has_templates = |p: &Vec<u8>| be16(p, 16) == 2;
        assert!(has_templates(&s.encode(&[tcp(0)], 5_000)[0]));
        assert!(!has_templates(&s.encode(&[tcp(0)], 5_999)[0]));
        assert!(has_templates(&s.encode(&[tcp(0)], 6_000)[0]));
        assert!(s.encode(&[], 9_000).is_empty());
        assert!(matches!(
            ExportStream::new(ExportProtocol::Ipfix, 1, 100, 1, 1, 0),
            Err(ExportError::PacketTooSmall(100, _))
        ));
        // The smallest allowed size still fits templates plus one record.
        let Err(ExportError::PacketTooSmall(_, min)) =
            ExportStream::new(ExportProtocol::Ipfix, 1, 100, 1, 1, 0)
        else {
            unreachable!()
        };
        let mut s = ExportStream::new(ExportProtocol::Ipfix, 1, min, 1, 1, 0).unwrap();
        let recs: Vec<_> = (0..4).map(|i| sample(i, true)).collect();
        let pkts = s.encode(&recs, 0);
        assert!(pkts.iter().all(|p| p.len() <= min));
        assert_eq!(pkts.len(), 4);
    }
}
