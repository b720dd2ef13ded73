//! Frames built byte by byte, so a test knows exactly what crossed the link.
//! Checksums are left zero: the programs under test only count, and the
//! receiving stack (which has no addresses) drops the packets anyway.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// An L4 header and payload.
#[derive(Clone, Debug)]
pub enum L4 {
    Udp {
        sport: u16,
        dport: u16,
        payload: usize,
    },
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        payload: usize,
    },
    Icmp {
        ty: u8,
        code: u8,
        payload: usize,
    },
    Icmpv6 {
        ty: u8,
        code: u8,
        payload: usize,
    },
    Raw {
        proto: u8,
        payload: usize,
    },
}

impl L4 {
    pub fn udp(sport: u16, dport: u16, payload: usize) -> L4 {
        L4::Udp {
            sport,
            dport,
            payload,
        }
    }

    pub fn tcp(sport: u16, dport: u16, flags: u8, payload: usize) -> L4 {
        L4::Tcp {
            sport,
            dport,
            flags,
            payload,
        }
    }

    pub fn icmp(ty: u8, code: u8, payload: usize) -> L4 {
        L4::Icmp { ty, code, payload }
    }

    pub fn icmpv6(ty: u8, code: u8, payload: usize) -> L4 {
        L4::Icmpv6 { ty, code, payload }
    }

    pub fn raw(proto: u8, payload: usize) -> L4 {
        L4::Raw { proto, payload }
    }

    pub fn proto(&self) -> u8 {
        match self {
            L4::Udp { .. } => 17,
            L4::Tcp { .. } => 6,
            L4::Icmp { .. } => 1,
            L4::Icmpv6 { .. } => 58,
            L4::Raw { proto, .. } => *proto,
        }
    }

    /// The source and destination ports of UDP and TCP.
    fn ports(&self) -> Option<(u16, u16)> {
        match *self {
            L4::Udp { sport, dport, .. } | L4::Tcp { sport, dport, .. } => Some((sport, dport)),
            _ => None,
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        if let Some((sport, dport)) = self.ports() {
            b.extend_from_slice(&sport.to_be_bytes());
            b.extend_from_slice(&dport.to_be_bytes());
        }
        match *self {
            L4::Udp { payload, .. } => {
                b.extend_from_slice(&((8 + payload) as u16).to_be_bytes());
                b.extend_from_slice(&[0, 0]);
                b.resize(8 + payload, 0x55);
            }
            L4::Tcp { flags, payload, .. } => {
                b.extend_from_slice(&1u32.to_be_bytes()); // seq
                b.extend_from_slice(&0u32.to_be_bytes()); // ack
                b.push(5 << 4); // data offset: 20 bytes
                b.push(flags);
                b.extend_from_slice(&65535u16.to_be_bytes());
                b.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
                b.resize(20 + payload, 0x66);
            }
            L4::Icmp { ty, code, payload } | L4::Icmpv6 { ty, code, payload } => {
                b.extend_from_slice(&[ty, code, 0, 0, 0, 1, 0, 1]); // id 1, seq 1
                b.resize(8 + payload, 0x77);
            }
            L4::Raw { payload, .. } => b.resize(payload, 0x88),
        }
        b
    }
}

/// An IPv4 packet. `frag_off` in 8-byte units; `more` sets MF.
pub fn ipv4_raw(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    payload: &[u8],
    frag_off: u16,
    more: bool,
) -> Vec<u8> {
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    h.extend_from_slice(&0x1234u16.to_be_bytes()); // identification
    let flags = frag_off | if more { 0x2000 } else { 0 };
    h.extend_from_slice(&flags.to_be_bytes());
    h.push(64);
    h.push(proto);
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(payload);
    h
}

/// `frame` (an untagged Ethernet frame of an IPv4 packet without options)
/// with its IP header checksum filled in, so that the receiving stack
/// accepts the packet (the other builders leave it 0: only the agent reads
/// their frames).
pub fn with_ipv4_checksum(mut frame: Vec<u8>) -> Vec<u8> {
    let h = &mut frame[14..34];
    h[10..12].fill(0);
    let sum = h
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>();
    let folded = (sum & 0xffff) + (sum >> 16);
    let folded = (folded & 0xffff) + (folded >> 16);
    h[10..12].copy_from_slice(&(!(folded as u16)).to_be_bytes());
    frame
}

pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, l4: &L4) -> Vec<u8> {
    ipv4_raw(src, dst, l4.proto(), &l4.bytes(), 0, false)
}

/// `n` frames, one for each of `n` UDP flows from `src` to `dst`:`dport`
/// (source ports `first_sport` up), with `payload` bytes.
pub fn udp_flows(
    src: &str,
    dst: &str,
    first_sport: u16,
    n: u16,
    dport: u16,
    payload: usize,
) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| eth4(src, dst, &L4::udp(first_sport + i, dport, payload)))
        .collect()
}

/// One 3000-byte UDP datagram (3333 -> 4444) in three Ethernet frames of
/// IPv4 fragments: only the first carries the UDP header, so the other two
/// form a port-less flow. IP bytes: 1500, then 1500 + 60 port-less.
pub fn udp_in_three_fragments(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<Vec<u8>> {
    let udp = L4::udp(3333, 4444, 2992).bytes();
    assert_eq!(udp.len(), 3000);
    vec![
        eth_ipv4(ipv4_raw(src, dst, 17, &udp[..1480], 0, true)),
        eth_ipv4(ipv4_raw(src, dst, 17, &udp[1480..2960], 185, true)),
        eth_ipv4(ipv4_raw(src, dst, 17, &udp[2960..], 370, false)),
    ]
}

/// An IPv6 packet whose payload starts with header `next`.
pub fn ipv6_raw(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    h.push(next);
    h.push(64);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(payload);
    h
}

pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, l4: &L4) -> Vec<u8> {
    ipv6_raw(src, dst, l4.proto(), &l4.bytes())
}

/// An IPv6 extension header (hop-by-hop 0, routing 43, destination options
/// 60) of `len8` 8-byte units beyond the first 8, followed by `rest`.
pub fn ipv6_ext(next: u8, len8: u8, rest: &[u8]) -> Vec<u8> {
    let mut h = vec![next, len8];
    h.resize(8 + 8 * len8 as usize, 0);
    if len8 == 0 {
        // A PadN option filling the 6 bytes keeps hop-by-hop/dst-opts valid.
        h[2] = 1;
        h[3] = 4;
    }
    h.extend_from_slice(rest);
    h
}

/// An IPv6 fragment header (offset in 8-byte units).
pub fn ipv6_frag(next: u8, offset: u16, more: bool, rest: &[u8]) -> Vec<u8> {
    let mut h = vec![next, 0];
    h.extend_from_slice(&((offset << 3) | more as u16).to_be_bytes());
    h.extend_from_slice(&0xabcdu32.to_be_bytes());
    h.extend_from_slice(rest);
    h
}

/// An Ethernet frame carrying `payload`, with VLAN tags (TPID, VID) outermost
/// first.
pub fn ethernet(vlans: &[(u16, u16)], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0xbb, 0x02, 0, 0, 0, 0, 0xaa];
    for (tpid, vid) in vlans {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&vid.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    // Minimum frame size without FCS; the padding is not part of the IP length.
    if f.len() < 60 {
        f.resize(60, 0);
    }
    f
}

pub fn eth_ipv4(ip: Vec<u8>) -> Vec<u8> {
    ethernet(&[], ETH_P_IP, &ip)
}

pub fn eth_ipv6(ip: Vec<u8>) -> Vec<u8> {
    ethernet(&[], ETH_P_IPV6, &ip)
}

/// An untagged Ethernet frame of an IPv4 packet from `src` to `dst`.
pub fn eth4(src: &str, dst: &str, l4: &L4) -> Vec<u8> {
    eth_ipv4(ipv4(crate::v4(src), crate::v4(dst), l4))
}

/// An untagged Ethernet frame of an IPv6 packet from `src` to `dst`.
pub fn eth6(src: &str, dst: &str, l4: &L4) -> Vec<u8> {
    eth_ipv6(ipv6(crate::v6(src), crate::v6(dst), l4))
}

/// An ARP request (a non-IP frame).
pub fn arp() -> Vec<u8> {
    let mut p = vec![0, 1, 8, 0, 6, 4, 0, 1];
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 0xaa, 192, 0, 2, 1]);
    p.extend_from_slice(&[0, 0, 0, 0, 0, 0, 192, 0, 2, 2]);
    ethernet(&[], ETH_P_ARP, &p)
}

/// UDP to `dport` carrying `payload` (a tunnel header and what it carries).
pub fn udp_with(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::with_capacity(8 + payload.len());
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

/// A VXLAN header (I flag, `vni`) and the inner Ethernet frame.
pub fn vxlan(vni: u32, inner: &[u8]) -> Vec<u8> {
    let mut h = vec![0x08, 0, 0, 0];
    h.extend_from_slice(&(vni << 8).to_be_bytes());
    h.extend_from_slice(inner);
    h
}

/// A GENEVE header with one 4-byte option, Ethernet payload, `vni`.
pub fn geneve(vni: u32, inner: &[u8]) -> Vec<u8> {
    let mut h = vec![0x01, 0, 0x65, 0x58];
    h.extend_from_slice(&(vni << 8).to_be_bytes());
    h.extend_from_slice(&[0x01, 0x02, 0x03, 0x04]);
    h.extend_from_slice(inner);
    h
}

/// A GRE header: protocol `ptype`, with `key` and `seq` when given.
pub fn gre(ptype: u16, key: Option<u32>, seq: Option<u32>, inner: &[u8]) -> Vec<u8> {
    let flags: u16 =
        if key.is_some() { 0x2000 } else { 0 } | if seq.is_some() { 0x1000 } else { 0 };
    let mut h = flags.to_be_bytes().to_vec();
    h.extend_from_slice(&ptype.to_be_bytes());
    if let Some(k) = key {
        h.extend_from_slice(&k.to_be_bytes());
    }
    if let Some(s) = seq {
        h.extend_from_slice(&s.to_be_bytes());
    }
    h.extend_from_slice(inner);
    h
}

/// An ERSPAN type II header (session `session`) and the mirrored frame.
pub fn erspan2(session: u16, inner: &[u8]) -> Vec<u8> {
    let mut h = vec![0x10, 0x00];
    h.extend_from_slice(&(session & 0x3ff).to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 0]);
    h.extend_from_slice(inner);
    h
}

/// An ERSPAN type III header (session `session`) with the 8-byte platform
/// sub-header, and the mirrored frame.
pub fn erspan3(session: u16, inner: &[u8]) -> Vec<u8> {
    let mut h = vec![0x20, 0x00];
    h.extend_from_slice(&(session & 0x3ff).to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0x01]);
    h.extend_from_slice(&[0u8; 8]);
    h.extend_from_slice(inner);
    h
}
