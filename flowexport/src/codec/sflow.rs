//! sFlow v5 decoding (sFlow.org "sFlow Version 5", July 2004): flow samples
//! and expanded flow samples become one [`FlowRecord`] each (the sampled
//! packet's header parsed to the same fields as the agent's records, with the
//! sample's sampling rate); counter samples are counted and skipped.
//! Pure: no I/O.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::reader::{Reader, Truncated};
use crate::record::{FlowRecord, FlowType, ETYPE_IPV4, ETYPE_IPV6};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SflowError {
    #[error("datagram too short for {0}")]
    Truncated(&'static str),
    #[error("unsupported sFlow version {0}")]
    Version(u32),
    #[error("bad agent address type {0}")]
    AddressType(u32),
    #[error("inconsistent length: {0}")]
    Length(&'static str),
}

impl SflowError {
    pub fn reason(&self) -> &'static str {
        match self {
            SflowError::Truncated(_) => "truncated",
            SflowError::Version(_) => "version",
            SflowError::AddressType(_) => "address",
            SflowError::Length(_) => "length",
        }
    }
}

impl From<Truncated> for SflowError {
    fn from(t: Truncated) -> Self {
        SflowError::Truncated(t.0)
    }
}

/// XDR (RFC 4506) on the shared reader: opaque data padded to 4 bytes,
/// sFlow's tagged addresses.
trait Xdr<'a> {
    /// An XDR opaque of `n` bytes, padded to a multiple of 4.
    fn opaque(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], SflowError>;
    /// An address with its type: 1 IPv4, 2 IPv6.
    fn address(&mut self) -> Result<IpAddr, SflowError>;
}

impl<'a> Xdr<'a> for Reader<'a> {
    fn opaque(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], SflowError> {
        let s = self.take(n, what)?;
        self.take((4 - n % 4) % 4, what)?;
        Ok(s)
    }
    fn address(&mut self) -> Result<IpAddr, SflowError> {
        match self.u32("address type")? {
            1 => {
                let b = self.take(4, "IPv4 address")?;
                Ok(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])))
            }
            2 => {
                let b: [u8; 16] = self.take(16, "IPv6 address")?.try_into().expect("16");
                Ok(IpAddr::V6(Ipv6Addr::from(b)))
            }
            t => Err(SflowError::AddressType(t)),
        }
    }
}

/// Parses a sampled packet header (Ethernet, up to two VLAN tags, IPv4/IPv6
/// with extension headers, L4) into `r`. Returns false if it is not IP.
pub fn parse_ethernet(h: &[u8], r: &mut FlowRecord) -> bool {
    let be16 = |i: usize| -> Option<u16> { Some(u16::from_be_bytes([*h.get(i)?, *h.get(i + 1)?])) };
    if h.len() < 14 {
        return false;
    }
    r.dst_mac = h[0..6].iter().fold(0, |a, x| (a << 8) | *x as u64);
    r.src_mac = h[6..12].iter().fold(0, |a, x| (a << 8) | *x as u64);
    let mut etype = be16(12).unwrap_or(0);
    let mut off = 14;
    let mut tagged = false;
    for _ in 0..2 {
        if !matches!(etype, 0x8100 | 0x88a8 | 0x9100) {
            break;
        }
        let (Some(tci), Some(inner)) = (be16(off), be16(off + 2)) else {
            return false;
        };
        if !tagged {
            r.vlan_id = tci & 0x0fff;
            tagged = true;
        }
        etype = inner;
        off += 4;
    }
    parse_ip(&h[off.min(h.len())..], etype, r)
}

fn parse_ip(p: &[u8], etype: u16, r: &mut FlowRecord) -> bool {
    let be16 = |i: usize| -> Option<u16> { Some(u16::from_be_bytes([*p.get(i)?, *p.get(i + 1)?])) };
    let (proto, l4, ports) = match etype {
        0x0800 => {
            if p.len() < 20 || p[0] >> 4 != 4 {
                return false;
            }
            let ihl = ((p[0] & 0x0f) as usize) * 4;
            r.etype = ETYPE_IPV4;
            r.ip_tos = p[1];
            r.bytes = be16(2).unwrap_or(0) as u64;
            r.src_addr = IpAddr::V4(Ipv4Addr::new(p[12], p[13], p[14], p[15]));
            r.dst_addr = IpAddr::V4(Ipv4Addr::new(p[16], p[17], p[18], p[19]));
            let first_fragment = be16(6).unwrap_or(0) & 0x1fff == 0;
            (p[9], ihl, first_fragment)
        }
        0x86dd => {
            if p.len() < 40 || p[0] >> 4 != 6 {
                return false;
            }
            r.etype = ETYPE_IPV6;
            r.ip_tos = ((u16::from_be_bytes([p[0], p[1]]) >> 4) & 0xff) as u8;
            r.bytes = be16(4).unwrap_or(0) as u64 + 40;
            let s: [u8; 16] = p[8..24].try_into().expect("16");
            let d: [u8; 16] = p[24..40].try_into().expect("16");
            r.src_addr = IpAddr::V6(Ipv6Addr::from(s));
            r.dst_addr = IpAddr::V6(Ipv6Addr::from(d));
            let mut next = p[6];
            let mut off = 40;
            let mut ports = true;
            for _ in 0..6 {
                match next {
                    0 | 43 | 60 | 51 => {
                        let (Some(n), Some(len)) = (p.get(off), p.get(off + 1)) else {
                            ports = false;
                            break;
                        };
                        off += if next == 51 {
                            (*len as usize + 2) * 4
                        } else {
                            (*len as usize + 1) * 8
                        };
                        next = *n;
                    }
                    44 => {
                        let (Some(n), Some(fo)) = (p.get(off), be16(off + 2)) else {
                            ports = false;
                            break;
                        };
                        if fo & 0xfff8 != 0 {
                            ports = false;
                        }
                        next = *n;
                        off += 8;
                    }
                    _ => break,
                }
            }
            (next, off, ports)
        }
        _ => return false,
    };
    r.proto = proto;
    if !ports {
        return true;
    }
    match proto {
        6 => {
            if let (Some(sp), Some(dp)) = (be16(l4), be16(l4 + 2)) {
                r.src_port = sp;
                r.dst_port = dp;
                r.tcp_flags = p.get(l4 + 13).copied().unwrap_or(0);
            }
        }
        17 | 132 | 136 => {
            if let (Some(sp), Some(dp)) = (be16(l4), be16(l4 + 2)) {
                r.src_port = sp;
                r.dst_port = dp;
            }
        }
        1 | 58 => {
            if let (Some(t), Some(c)) = (p.get(l4), p.get(l4 + 1)) {
                r.icmp_type = *t;
                r.icmp_code = *c;
            }
        }
        _ => {}
    }
    true
}

/// Decodes one sFlow v5 datagram, appending a record per flow sample to
/// `out`; returns the number of counter samples seen. On error, records
/// decoded before the fault stay in `out`.
pub fn decode(
    _from: IpAddr,
    datagram: &[u8],
    now_ns: u64,
    out: &mut Vec<FlowRecord>,
) -> Result<u64, SflowError> {
    let mut x = Reader::new(datagram);
    let version = x.u32("header")?;
    if version != 5 {
        return Err(SflowError::Version(version));
    }
    let agent = x.address()?;
    let _sub_agent = x.u32("header")?;
    let sequence = x.u32("header")?;
    let _uptime = x.u32("header")?;
    let samples = x.u32("header")?;
    let mut counters = 0;
    for _ in 0..samples {
        let format = x.u32("sample header")?;
        let len = x.u32("sample header")? as usize;
        let body = x.take(len, "sample")?;
        let mut s = Reader::new(body);
        let base = FlowRecord {
            flow_type: FlowType::SFlow5,
            time_received_ns: now_ns,
            time_flow_start_ns: now_ns,
            time_flow_end_ns: now_ns,
            sequence_num: sequence,
            sampler_address: Some(agent),
            packets: 1,
            ..FlowRecord::default()
        };
        match format {
            // flow_sample / flow_sample_expanded
            1 | 3 => {
                let mut r = base;
                s.u32("flow sample")?; // sample sequence
                if format == 1 {
                    s.u32("flow sample")?; // source id
                } else {
                    s.take(8, "flow sample")?; // source id type, index
                }
                r.sampling_rate = s.u32("flow sample")? as u64;
                s.take(8, "flow sample")?; // sample pool, drops
                if format == 1 {
                    r.in_if = s.u32("flow sample")? & 0x3fff_ffff;
                    r.out_if = s.u32("flow sample")? & 0x3fff_ffff;
                } else {
                    s.u32("flow sample")?;
                    r.in_if = s.u32("flow sample")?;
                    s.u32("flow sample")?;
                    r.out_if = s.u32("flow sample")?;
                }
                let records = s.u32("flow sample")?;
                let mut frame_len = 0u64;
                for _ in 0..records {
                    let rf = s.u32("flow record")?;
                    let rlen = s.u32("flow record")? as usize;
                    let data = s.take(rlen, "flow record")?;
                    let mut d = Reader::new(data);
                    match rf {
                        // raw packet header
                        1 => {
                            let proto = d.u32("raw header")?;
                            frame_len = d.u32("raw header")? as u64;
                            let _stripped = d.u32("raw header")?;
                            let hlen = d.u32("raw header")? as usize;
                            let h = d.opaque(hlen, "raw header")?;
                            match proto {
                                1 => {
                                    parse_ethernet(h, &mut r);
                                }
                                11 => {
                                    parse_ip(h, 0x0800, &mut r);
                                }
                                12 => {
                                    parse_ip(h, 0x86dd, &mut r);
                                }
                                _ => {}
                            }
                        }
                        // extended switch
                        1001 => {
                            let vlan = d.u32("extended switch")?;
                            if r.vlan_id == 0 {
                                r.vlan_id = vlan as u16 & 0x0fff;
                            }
                        }
                        // extended gateway: AS numbers
                        1003 => {
                            if let Ok((src_as, dst_as)) = gateway(&mut d) {
                                r.src_as = src_as;
                                r.dst_as = dst_as;
                            }
                        }
                        _ => {}
                    }
                }
                if r.bytes == 0 {
                    r.bytes = frame_len;
                }
                out.push(r);
            }
            // counters_sample / counters_sample_expanded
            2 | 4 => counters += 1,
            _ => {}
        }
    }
    if x.left() != 0 {
        return Err(SflowError::Length("bytes after the last sample"));
    }
    Ok(counters)
}

/// extended_gateway: (src_as, dst_as = last AS of the destination path).
fn gateway(d: &mut Reader<'_>) -> Result<(u32, u32), SflowError> {
    d.address()?; // next hop
    let router_as = d.u32("gateway")?;
    let src_as = d.u32("gateway")?;
    d.u32("gateway")?; // src peer as
    let segments = d.u32("gateway")?;
    let mut dst_as = router_as;
    for _ in 0..segments.min(64) {
        d.u32("gateway")?; // segment type
        let n = d.u32("gateway")?;
        for _ in 0..n.min(256) {
            dst_as = d.u32("gateway")?;
        }
    }
    Ok((src_as, dst_as))
}

#[cfg(test)]
mod tests {
    //! sFlow datagrams assembled by hand, field by field, following the
    //! sFlow v5 specification's XDR structures (no sFlow agent is packaged
    //! in Debian 12 to produce real ones).
    use super::*;

    fn u32s(v: &[u32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_be_bytes()).collect()
    }

    fn datagram(samples: &[(u32, Vec<u8>)]) -> Vec<u8> {
        // version 5, agent IPv4 192.0.2.5, sub-agent 0, sequence 77, uptime
        let mut d = u32s(&[5, 1]);
        d.extend([192, 0, 2, 5]);
        d.extend(u32s(&[0, 77, 123_456, samples.len() as u32]));
        for (fmt, body) in samples {
            d.extend(u32s(&[*fmt, body.len() as u32]));
            d.extend(body);
        }
        d
    }

    fn record(fmt: u32, body: Vec<u8>) -> Vec<u8> {
        let mut r = u32s(&[fmt, body.len() as u32]);
        r.extend(body);
        r
    }

    /// An Ethernet + 802.1Q + IPv4 + TCP header as a switch would sample it.
    fn sampled_header() -> Vec<u8> {
        let mut h = vec![
            0x02, 0, 0, 0, 0, 0xbb, 0x02, 0, 0, 0, 0, 0xaa, 0x81, 0x00, 0x00, 0x64, 0x08, 0x00,
        ];
        h.extend([
            0x45, 0xb8, 0x05, 0xdc, 0, 0, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ]);
        h.extend([
            0x01, 0xbb, 0xc3, 0x50, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0,
        ]);
        h
    }

    fn raw_header_record(h: &[u8]) -> Vec<u8> {
        // header_protocol 1 (Ethernet), frame_length 1518, stripped 4, header
        let mut b = u32s(&[1, 1518, 4, h.len() as u32]);
        b.extend(h);
        while !b.len().is_multiple_of(4) {
            b.push(0);
        }
        record(1, b)
    }

    #[test]
    fn flow_sample_with_raw_header_switch_and_gateway() {
        let mut recs = raw_header_record(&sampled_header());
        recs.extend(record(1001, u32s(&[100, 0, 200, 0])));
        // gateway: next hop IPv4, router AS, src AS, src peer AS, one
        // AS_SEQUENCE segment of 2 ASNs, no communities, localpref
        let mut gw = u32s(&[1]);
        gw.extend([192, 0, 2, 254]);
        gw.extend(u32s(&[64500, 64501, 64502, 1, 2, 2, 64510, 64511, 0, 100]));
        recs.extend(record(1003, gw));
        // flow_sample: seq, source id, rate 512, pool, drops, in 3, out 7, 3 records
        let mut fs = u32s(&[1, 3, 512, 5120, 0, 3, 7, 3]);
        fs.extend(recs);
        // plus one counters sample
        let d = datagram(&[(1, fs), (2, u32s(&[1, 3, 0]))]);
        let mut out = Vec::new();
        let counters = decode("198.51.100.1".parse().unwrap(), &d, 42, &mut out).unwrap();
        assert_eq!(counters, 1);
        assert_eq!(out.len(), 1);
        let r = &out[0];
        assert_eq!(r.flow_type, FlowType::SFlow5);
        assert_eq!(
            r.sampler_address,
            Some("192.0.2.5".parse().unwrap()),
            "the agent address"
        );
        assert_eq!((r.sequence_num, r.sampling_rate, r.packets), (77, 512, 1));
        assert_eq!((r.in_if, r.out_if), (3, 7));
        assert_eq!(r.bytes, 1500, "IP total length of the sampled packet");
        assert_eq!(
            (r.src_addr.to_string(), r.dst_addr.to_string()),
            ("10.0.0.1".into(), "10.0.0.2".into())
        );
        assert_eq!(
            (r.proto, r.src_port, r.dst_port, r.tcp_flags, r.ip_tos),
            (6, 443, 50000, 0x18, 0xb8)
        );
        assert_eq!(r.vlan_id, 100, "from the frame's tag");
        assert_eq!((r.src_mac, r.dst_mac), (0x0200_0000_00aa, 0x0200_0000_00bb));
        assert_eq!((r.src_as, r.dst_as), (64501, 64511));
        assert_eq!(r.time_flow_start_ns, 42);
    }

    #[test]
    fn expanded_flow_sample_ipv6_icmp() {
        let mut h = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x86, 0xdd];
        let mut ip6 = vec![0x60, 0, 0, 0, 0, 16, 58, 64];
        ip6.extend("2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        ip6.extend("2001:db8::2".parse::<Ipv6Addr>().unwrap().octets());
        ip6.extend([128, 0, 0, 0, 0, 1, 0, 1]);
        h.extend(ip6);
        let mut fs = u32s(&[9, 0, 5, 1000, 10_000, 0, 0, 11, 0, 12, 1]);
        fs.extend(raw_header_record(&h));
        let d = datagram(&[(3, fs)]);
        let mut out = Vec::new();
        decode("198.51.100.1".parse().unwrap(), &d, 1, &mut out).unwrap();
        let r = &out[0];
        assert_eq!((r.in_if, r.out_if, r.sampling_rate), (11, 12, 1000));
        assert_eq!(
            (r.etype, r.proto, r.icmp_type, r.icmp_code),
            (ETYPE_IPV6, 58, 128, 0)
        );
        assert_eq!(r.bytes, 56);
        assert_eq!(r.src_addr.to_string(), "2001:db8::1");
    }

    #[test]
    fn malformed_datagrams() {
        let mut out = Vec::new();
        let from: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!(
            decode(from, &u32s(&[4]), 0, &mut out).unwrap_err().reason(),
            "version"
        );
        assert_eq!(
            decode(from, &u32s(&[5, 3, 0]), 0, &mut out)
                .unwrap_err()
                .reason(),
            "address"
        );
        assert_eq!(
            decode(from, &u32s(&[5, 1]), 0, &mut out)
                .unwrap_err()
                .reason(),
            "truncated"
        );
        let mut d = datagram(&[(1, u32s(&[1, 2]))]);
        assert_eq!(
            decode(from, &d, 0, &mut out).unwrap_err().reason(),
            "truncated"
        );
        d = datagram(&[]);
        d.extend([0, 0]);
        assert_eq!(
            decode(from, &d, 0, &mut out).unwrap_err().reason(),
            "length"
        );
        // A sample length beyond the datagram.
        let mut d = datagram(&[]);
        let n = d.len();
        d[n - 4..].copy_from_slice(&1u32.to_be_bytes());
        d.extend(u32s(&[1, 1000]));
        assert_eq!(
            decode(from, &d, 0, &mut out).unwrap_err().reason(),
            "truncated"
        );
        assert!(out.is_empty());
    }
}
