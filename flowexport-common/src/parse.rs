//! The packet parser, one for every capture path: the kernel programs (XDP
//! with direct packet access; TC the same on the skb's linear data, with
//! `bpf_skb_load_bytes` for a header beyond it) and userspace
//! (AF_XDP frames) read packets with exactly the same rules, because they
//! run this code. It is written for the BPF verifier: bounded loops, one
//! bounds check per header read, no indexing past what was loaded.
//!
//! Ethernet with up to two VLAN tags, IPv4 (options, fragments: only the
//! first carries ports) and IPv6 (up to six extension headers), TCP, UDP,
//! UDP-Lite and SCTP ports, ICMP/ICMPv6 type and code (as `type << 8 |
//! code` in `dst_port`), any other protocol by number.

use crate::FlowKey;

pub const ETH_HDR_LEN: usize = 14;
/// An IPv4 header without options: what [`parse`] reads first (the TC
/// programs' reader recognises that read by its size; see `SkbPacket`).
pub const IPV4_HDR_LEN: usize = 20;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88A8;
pub const ETH_P_QINQ1: u16 = 0x9100;

pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ROUTING: u8 = 43;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_AH: u8 = 51;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_DSTOPTS: u8 = 60;
pub const IPPROTO_SCTP: u8 = 132;
pub const IPPROTO_UDPLITE: u8 = 136;

/// Verifier bound: at most two VLAN tags (802.1ad outer + 802.1Q inner) are
/// parsed; a third tag leaves the frame classified by that tag's ethertype
/// (non-IP).
pub const MAX_VLAN_TAGS: usize = 2;
/// Verifier bound: at most this many IPv6 extension headers are walked. Each
/// is at most 2048 bytes ((255 + 1) × 8), so the L4 offset stays below
/// 14 + 8 + 40 + 6 × 2048 = 12350, well inside the verifier's 64 KiB packet
/// offset limit. A chain longer than this is counted with the next-header
/// value where the walk stopped and no ports.
pub const MAX_IPV6_EXT_HDRS: usize = 6;

/// Reads a header at a byte offset of the packet, or None past its end.
///
/// Each header is read as one byte array with one bounds check: besides being
/// cheaper, this keeps LLVM from turning a 1-byte check `p + 1 > end` into
/// `p >= end`, a form the verifier does not learn a packet range from.
pub trait Packet {
    /// The `N` bytes at `off`, or None when they are not all there.
    fn load<const N: usize>(&self, off: usize) -> Option<Hdr<N>>;
}

/// `N` bytes of a header, 8-aligned: the kernel programs fill it from the
/// packet with 8-byte loads (the BPF backend would otherwise read a header
/// at an unknown alignment one byte at a time: an IPv6 address took
/// sixteen loads, shifts and ors), and the parser's fields (addresses at
/// offsets 8, 12, 16 and 24 of an IP header) are then aligned words of it.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct Hdr<const N: usize>(pub [u8; N]);

/// A frame in memory (userspace: an AF_XDP frame, a test's bytes).
pub struct Frame<'a>(pub &'a [u8]);

impl Packet for Frame<'_> {
    #[inline(always)]
    fn load<const N: usize>(&self, off: usize) -> Option<Hdr<N>> {
        let bytes = self.0.get(off..off.checked_add(N)?)?;
        Some(Hdr(bytes.try_into().ok()?))
    }
}

/// A big-endian u16 at `i`.
#[inline(always)]
pub fn be16(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

/// What [`parse`] found.
pub enum Parsed {
    /// An IP packet: the key is filled. `l3_off` is where the IP header
    /// starts, `l4_hdr_end` where the L4 header ends (TC's GSO accounting).
    Flow { l3_off: usize, l4_hdr_end: usize },
    /// Not IPv4 or IPv6 (ARP, LLDP, a third VLAN tag, ...).
    NonIp,
    /// IP, but truncated or with a bad version or header length.
    Malformed,
}

/// Parses Ethernet / VLAN / IPv4 / IPv6 / L4 into `key` and `ip_len` (the
/// IP-layer length: IPv4 total length, IPv6 payload length + 40).
#[inline(always)]
pub fn parse<P: Packet>(
    p: &P,
    key: &mut FlowKey,
    ip_len: &mut u64,
    tcp_flags: &mut u8,
    mut vlan_seen: bool,
) -> Parsed {
    let Some(eth) = p.load::<ETH_HDR_LEN>(0) else {
        return Parsed::NonIp;
    };
    let mut etype = be16(&eth.0, 12);
    let mut off = ETH_HDR_LEN;
    for _ in 0..MAX_VLAN_TAGS {
        if etype != ETH_P_8021Q && etype != ETH_P_8021AD && etype != ETH_P_QINQ1 {
            break;
        }
        let Some(tag) = p.load::<4>(off) else {
            return Parsed::Malformed;
        };
        // The key keeps the outermost tag: the one on this link.
        if !vlan_seen {
            key.vlan_id = be16(&tag.0, 0) & 0x0fff;
            vlan_seen = true;
        }
        etype = be16(&tag.0, 2);
        off += 4;
    }
    let l3_off = off;
    let mut l4_off: usize;
    let mut has_ports = true;
    let proto;
    match etype {
        ETH_P_IP => {
            let Some(h) = p.load::<IPV4_HDR_LEN>(off) else {
                return Parsed::Malformed;
            };
            let ihl = ((h.0[0] & 0x0f) as usize) * 4;
            if h.0[0] >> 4 != 4 || ihl < 20 {
                return Parsed::Malformed;
            }
            key.ip_version = 4;
            key.src_addr[..4].copy_from_slice(&h.0[12..16]);
            key.dst_addr[..4].copy_from_slice(&h.0[16..20]);
            *ip_len = be16(&h.0, 2) as u64;
            // Only the first fragment (offset 0) carries the L4 header.
            if be16(&h.0, 6) & 0x1fff != 0 {
                has_ports = false;
            }
            proto = h.0[9];
            l4_off = off + ihl;
        }
        ETH_P_IPV6 => {
            let Some(h) = p.load::<40>(off) else {
                return Parsed::Malformed;
            };
            if h.0[0] >> 4 != 6 {
                return Parsed::Malformed;
            }
            key.ip_version = 6;
            key.src_addr.copy_from_slice(&h.0[8..24]);
            key.dst_addr.copy_from_slice(&h.0[24..40]);
            *ip_len = be16(&h.0, 4) as u64 + 40;
            let mut next = h.0[6];
            l4_off = off + 40;
            for _ in 0..MAX_IPV6_EXT_HDRS {
                let hdr_len = match next {
                    IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH
                    | IPPROTO_FRAGMENT => 0,
                    _ => break,
                };
                let Some(x) = p.load::<4>(l4_off) else {
                    has_ports = false;
                    break;
                };
                let hdr_len = hdr_len
                    + match next {
                        // Fixed 8 bytes; a non-zero offset means no L4 header.
                        IPPROTO_FRAGMENT => {
                            if be16(&x.0, 2) & 0xfff8 != 0 {
                                has_ports = false;
                            }
                            8
                        }
                        // AH counts 4-byte units minus 2.
                        IPPROTO_AH => (x.0[1] as usize + 2) * 4,
                        // The others count 8-byte units after the first 8.
                        _ => (x.0[1] as usize + 1) * 8,
                    };
                next = x.0[0];
                l4_off += hdr_len;
            }
            proto = next;
        }
        _ => return Parsed::NonIp,
    }
    key.proto = proto;
    let mut l4_hdr_end = l4_off;
    if has_ports {
        match proto {
            IPPROTO_TCP => {
                if let Some(t) = p.load::<14>(l4_off) {
                    key.src_port = be16(&t.0, 0);
                    key.dst_port = be16(&t.0, 2);
                    *tcp_flags = t.0[13];
                    l4_hdr_end = l4_off + ((t.0[12] >> 4) as usize) * 4;
                }
            }
            IPPROTO_UDP | IPPROTO_UDPLITE | IPPROTO_SCTP => {
                if let Some(u) = p.load::<4>(l4_off) {
                    key.src_port = be16(&u.0, 0);
                    key.dst_port = be16(&u.0, 2);
                    l4_hdr_end = l4_off + 8;
                }
            }
            IPPROTO_ICMP | IPPROTO_ICMPV6 => {
                if let Some(i) = p.load::<2>(l4_off) {
                    key.dst_port = be16(&i.0, 0);
                }
            }
            _ => {}
        }
    }
    Parsed::Flow { l3_off, l4_hdr_end }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eth(etype: u16, vlans: &[u16]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        for v in vlans {
            f.extend(ETH_P_8021Q.to_be_bytes());
            f.extend(v.to_be_bytes());
        }
        f.extend(etype.to_be_bytes());
        f
    }

    fn ipv4(proto: u8, frag_off: u16, options: usize, payload: &[u8]) -> Vec<u8> {
        let ihl = 20 + options;
        let mut h = vec![0u8; ihl];
        h[0] = 0x40 | (ihl / 4) as u8;
        h[2..4].copy_from_slice(&((ihl + payload.len()) as u16).to_be_bytes());
        h[6..8].copy_from_slice(&frag_off.to_be_bytes());
        h[9] = proto;
        h[12..16].copy_from_slice(&[10, 0, 0, 1]);
        h[16..20].copy_from_slice(&[10, 0, 0, 2]);
        h.extend(payload);
        h
    }

    fn ipv6(next: u8, payload: &[u8]) -> Vec<u8> {
        let mut h = vec![0u8; 40];
        h[0] = 0x60;
        h[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
        h[6] = next;
        h[8] = 0x20;
        h[23] = 1;
        h[24] = 0x20;
        h[39] = 2;
        h.extend(payload);
        h
    }

    fn ports(sp: u16, dp: u16, len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0..2].copy_from_slice(&sp.to_be_bytes());
        p[2..4].copy_from_slice(&dp.to_be_bytes());
        p
    }

    fn run(frame: &[u8]) -> (Parsed, FlowKey, u64, u8) {
        let mut key = FlowKey::default();
        let (mut len, mut flags) = (0, 0);
        let r = parse(&Frame(frame), &mut key, &mut len, &mut flags, false);
        (r, key, len, flags)
    }

    fn flow(frame: &[u8]) -> (FlowKey, u64, u8) {
        match run(frame) {
            (Parsed::Flow { .. }, k, len, flags) => (k, len, flags),
            _ => panic!("not a flow"),
        }
    }

    #[test]
    fn udp_over_ipv4_with_options_and_two_vlan_tags() {
        let mut f = eth(ETH_P_IP, &[100, 200]);
        f.extend(ipv4(IPPROTO_UDP, 0, 8, &ports(4000, 53, 8)));
        let (k, len, _) = flow(&f);
        assert_eq!((k.ip_version, k.proto, k.vlan_id), (4, 17, 100));
        assert_eq!((k.src_port, k.dst_port, len), (4000, 53, 36));
        assert_eq!(k.src_addr[..4], [10, 0, 0, 1]);
    }

    #[test]
    fn tcp_flags_icmp_and_fragments() {
        let mut tcp = ports(1, 2, 20);
        tcp[12] = 5 << 4;
        tcp[13] = 0x12;
        let mut f = eth(ETH_P_IP, &[]);
        f.extend(ipv4(IPPROTO_TCP, 0, 0, &tcp));
        assert_eq!(flow(&f).2, 0x12);
        let mut f = eth(ETH_P_IP, &[]);
        f.extend(ipv4(IPPROTO_ICMP, 0, 0, &[8, 3, 0, 0]));
        assert_eq!(flow(&f).0.dst_port, 8 << 8 | 3);
        // A non-first fragment: no ports, whatever its payload says.
        let mut f = eth(ETH_P_IP, &[]);
        f.extend(ipv4(IPPROTO_UDP, 185, 0, &ports(4000, 53, 8)));
        let (k, ..) = flow(&f);
        assert_eq!((k.proto, k.src_port, k.dst_port), (17, 0, 0));
    }

    #[test]
    fn ipv6_extension_headers() {
        // Hop-by-hop (8 bytes), then a first fragment, then UDP.
        let mut ext = vec![IPPROTO_FRAGMENT, 0, 0, 0, 0, 0, 0, 0];
        ext.extend([IPPROTO_UDP, 0, 0, 1, 0, 0, 0, 7]);
        ext.extend(ports(5000, 443, 8));
        let mut f = eth(ETH_P_IPV6, &[]);
        f.extend(ipv6(IPPROTO_HOPOPTS, &ext));
        let (k, len, _) = flow(&f);
        assert_eq!(
            (k.ip_version, k.proto, k.src_port, k.dst_port),
            (6, 17, 5000, 443)
        );
        assert_eq!(len, 40 + 24);
        assert_eq!(k.src_addr[0], 0x20);
        // Seven destination-options headers: the walk stops after six, at
        // next-header 60, with no ports.
        let mut ext = Vec::new();
        for _ in 0..7 {
            ext.extend([IPPROTO_DSTOPTS, 0, 0, 0, 0, 0, 0, 0]);
        }
        let mut f = eth(ETH_P_IPV6, &[]);
        f.extend(ipv6(IPPROTO_DSTOPTS, &ext));
        let (k, ..) = flow(&f);
        assert_eq!((k.proto, k.src_port), (IPPROTO_DSTOPTS, 0));
    }

    #[test]
    fn non_ip_malformed_and_truncated() {
        assert!(matches!(run(&eth(0x0806, &[])).0, Parsed::NonIp));
        assert!(matches!(run(&[0u8; 10]).0, Parsed::NonIp));
        // A third tag: classified by its ethertype (a VLAN one), not IP.
        let mut f = eth(ETH_P_IP, &[1, 2, 3]);
        f.extend(ipv4(IPPROTO_UDP, 0, 0, &ports(1, 2, 8)));
        assert!(matches!(run(&f).0, Parsed::NonIp));
        // IHL below 5, and an IPv4 header cut short.
        let mut f = eth(ETH_P_IP, &[]);
        let mut h = ipv4(IPPROTO_UDP, 0, 0, &[]);
        h[0] = 0x44;
        f.extend(&h);
        assert!(matches!(run(&f).0, Parsed::Malformed));
        let mut f = eth(ETH_P_IP, &[]);
        f.extend(&ipv4(IPPROTO_UDP, 0, 0, &[])[..12]);
        assert!(matches!(run(&f).0, Parsed::Malformed));
        // A UDP header cut short: a flow without ports.
        let mut f = eth(ETH_P_IP, &[]);
        f.extend(ipv4(IPPROTO_UDP, 0, 0, &[0, 1]));
        let (k, ..) = flow(&f);
        assert_eq!((k.proto, k.src_port, k.dst_port), (17, 0, 0));
    }
}
