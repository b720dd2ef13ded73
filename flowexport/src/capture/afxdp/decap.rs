//! One level of decapsulation for `--decap inner`: a frame whose IP packet
//! carries a tunnel gives the inner frame and the tunnel's identity. Pure
//! over bytes, no allocation but the caller's scratch buffer.
//!
//! Recognised (the outer packet: Ethernet with up to two VLAN tags, IPv4
//! not fragmented, or IPv6 with the tunnel as its first next header):
//! - VXLAN, UDP destination port 4789: 8-byte header, VNI, inner Ethernet.
//! - GENEVE, UDP destination port 6081: 8 bytes plus options, VNI, inner
//!   Ethernet (protocol 0x6558) or IP.
//! - GRE (version 0, with or without checksum, key and sequence): inner
//!   Ethernet (0x6558) or IP (0x0800, 0x86DD); the id is the key.
//! - ERSPAN in GRE: type II (0x88BE with a sequence number, 8-byte header),
//!   type I (0x88BE without), type III (0x22EB, 12-byte header and the
//!   optional 8-byte platform sub-header); the id is the session id.
//! - IPv4 or IPv6 in IP (protocol 4 / 41).
//!
//! Anything else (and a tunnel header cut short) is not decapsulated: the
//! outer packet is the flow.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use flowexport_common::parse::{
    ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, ETH_P_QINQ1, IPPROTO_UDP, MAX_VLAN_TAGS,
};

use crate::record::TunnelType;

const ETH_P_TEB: u16 = 0x6558;
const ETH_P_ERSPAN2: u16 = 0x88BE;
const ETH_P_ERSPAN3: u16 = 0x22EB;
const VXLAN_PORT: u16 = 4789;
const GENEVE_PORT: u16 = 6081;

/// The tunnel a frame came in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tunnel {
    pub kind: TunnelType,
    /// VNI, GRE key or ERSPAN session id (0 when the tunnel has none).
    pub id: u32,
    pub outer_src: IpAddr,
    pub outer_dst: IpAddr,
}

fn be16(b: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(i..i + 2)?.try_into().ok()?))
}

fn be32(b: &[u8], i: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(i..i + 4)?.try_into().ok()?))
}

/// The outer IP packet: protocol, addresses, and its payload.
fn outer_ip(frame: &[u8]) -> Option<(u8, IpAddr, IpAddr, &[u8])> {
    let mut etype = be16(frame, 12)?;
    let mut off = 14;
    for _ in 0..MAX_VLAN_TAGS {
        if !matches!(etype, ETH_P_8021Q | ETH_P_8021AD | ETH_P_QINQ1) {
            break;
        }
        etype = be16(frame, off + 2)?;
        off += 4;
    }
    let ip = frame.get(off..)?;
    match etype {
        ETH_P_IP => {
            let ihl = usize::from(*ip.first()? & 0x0f) * 4;
            let total = usize::from(be16(ip, 2)?);
            // Fragments (more fragments, or an offset) are not decapsulated.
            if ip[0] >> 4 != 4 || ihl < 20 || be16(ip, 6)? & 0x3fff != 0 || total < ihl {
                return None;
            }
            let src: [u8; 4] = ip.get(12..16)?.try_into().ok()?;
            let dst: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
            let payload = ip.get(ihl..total.min(ip.len()))?;
            Some((
                ip[9],
                IpAddr::V4(Ipv4Addr::from(src)),
                IpAddr::V4(Ipv4Addr::from(dst)),
                payload,
            ))
        }
        ETH_P_IPV6 => {
            if *ip.first()? >> 4 != 6 {
                return None;
            }
            let len = usize::from(be16(ip, 4)?);
            let src: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            let payload = ip.get(40..(40 + len).min(ip.len()))?;
            Some((
                ip[6],
                IpAddr::V6(Ipv6Addr::from(src)),
                IpAddr::V6(Ipv6Addr::from(dst)),
                payload,
            ))
        }
        _ => None,
    }
}

/// The inner frame: Ethernet as it is in the packet, or an IP packet the
/// parser needs an Ethernet header in front of (written to `scratch`).
fn inner<'a>(proto: u16, payload: &'a [u8], scratch: &'a mut Vec<u8>) -> Option<&'a [u8]> {
    match proto {
        ETH_P_TEB => Some(payload),
        ETH_P_IP | ETH_P_IPV6 => Some(with_ethernet(proto, payload, scratch)),
        _ => None,
    }
}

fn with_ethernet<'a>(etype: u16, ip: &[u8], scratch: &'a mut Vec<u8>) -> &'a [u8] {
    scratch.clear();
    scratch.extend_from_slice(&[0; 12]);
    scratch.extend_from_slice(&etype.to_be_bytes());
    scratch.extend_from_slice(ip);
    scratch
}

/// The inner frame of a tunnelled frame and its tunnel, or None when the
/// frame is not a tunnel flowexport decapsulates.
pub fn decap<'a>(frame: &'a [u8], scratch: &'a mut Vec<u8>) -> Option<(Tunnel, &'a [u8])> {
    let (proto, outer_src, outer_dst, p) = outer_ip(frame)?;
    let tunnel = |kind, id| Tunnel {
        kind,
        id,
        outer_src,
        outer_dst,
    };
    match proto {
        // UDP: VXLAN or GENEVE by destination port.
        IPPROTO_UDP => {
            let dport = be16(p, 2)?;
            let t = p.get(8..)?;
            match dport {
                VXLAN_PORT => {
                    // The I flag: the VNI is valid.
                    if t.first()? & 0x08 == 0 {
                        return None;
                    }
                    let vni = be32(t, 4)? >> 8;
                    Some((tunnel(TunnelType::Vxlan, vni), t.get(8..)?))
                }
                GENEVE_PORT => {
                    if t.first()? >> 6 != 0 {
                        return None;
                    }
                    let opts = usize::from(t[0] & 0x3f) * 4;
                    let vni = be32(t, 4)? >> 8;
                    let inner = inner(be16(t, 2)?, t.get(8 + opts..)?, scratch)?;
                    Some((tunnel(TunnelType::Geneve, vni), inner))
                }
                _ => None,
            }
        }
        // GRE, and ERSPAN inside it.
        47 => {
            let flags = be16(p, 0)?;
            if flags & 0x0007 != 0 {
                return None; // version 1 (PPTP) and others
            }
            let (csum, key, seq) = (
                flags & 0x8000 != 0,
                flags & 0x2000 != 0,
                flags & 0x1000 != 0,
            );
            let ptype = be16(p, 2)?;
            let mut off = 4 + if csum { 4 } else { 0 };
            let key_value = if key { be32(p, off)? } else { 0 };
            off += if key { 4 } else { 0 } + if seq { 4 } else { 0 };
            let body = p.get(off..)?;
            match ptype {
                ETH_P_ERSPAN2 if !seq => {
                    // Type I: no ERSPAN header, no session id.
                    Some((tunnel(TunnelType::Erspan, 0), body))
                }
                ETH_P_ERSPAN2 => {
                    if body.first()? >> 4 != 1 {
                        return None;
                    }
                    let session = u32::from(be16(body, 2)? & 0x03ff);
                    Some((tunnel(TunnelType::Erspan, session), body.get(8..)?))
                }
                ETH_P_ERSPAN3 => {
                    if body.first()? >> 4 != 2 {
                        return None;
                    }
                    let session = u32::from(be16(body, 2)? & 0x03ff);
                    // The O flag: an 8-byte platform-specific sub-header.
                    let sub = if body.get(11)? & 0x01 != 0 { 8 } else { 0 };
                    Some((tunnel(TunnelType::Erspan, session), body.get(12 + sub..)?))
                }
                _ => {
                    let inner = inner(ptype, body, scratch)?;
                    Some((tunnel(TunnelType::Gre, key_value), inner))
                }
            }
        }
        4 => Some((
            tunnel(TunnelType::Ipip, 0),
            with_ethernet(ETH_P_IP, p, scratch),
        )),
        41 => Some((
            tunnel(TunnelType::Ipip, 0),
            with_ethernet(ETH_P_IPV6, p, scratch),
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eth(etype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend(etype.to_be_bytes());
        f.extend(payload);
        f
    }

    fn ipv4(proto: u8, payload: &[u8]) -> Vec<u8> {
        let mut h = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, proto, 0, 0, 192, 0, 2, 1, 192, 0, 2, 2,
        ];
        h[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
        h.extend(payload);
        h
    }

    fn udp(dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut u = vec![0x30, 0x39];
        u.extend(dport.to_be_bytes());
        u.extend(((8 + payload.len()) as u16).to_be_bytes());
        u.extend([0, 0]);
        u.extend(payload);
        u
    }

    const INNER: &[u8] = b"inner-ethernet-frame";

    /// `payload` behind `head`.
    fn after(head: &[u8], payload: &[u8]) -> Vec<u8> {
        [head, payload].concat()
    }

    #[test]
    fn vxlan_geneve_gre_erspan_ipip() {
        let inner_ip = ipv4(6, &[0; 20]);
        let inner_ip_frame = eth(ETH_P_IP, &inner_ip);
        let mut inner_ip6 = vec![0u8; 40];
        inner_ip6[0] = 0x60; // version 6
        inner_ip6[6] = 59; // no next header
        let inner_ip6_frame = eth(ETH_P_IPV6, &inner_ip6);
        /// The outer IPv4 protocol and payload; the tunnel, its id and the
        /// inner frame.
        type Case<'a> = (u8, Vec<u8>, TunnelType, u32, &'a [u8]);
        let cases: [Case<'_>; 8] = [
            // VXLAN, VNI 0x123456.
            (
                17,
                udp(4789, &after(&[0x08, 0, 0, 0, 0x12, 0x34, 0x56, 0], INNER)),
                TunnelType::Vxlan,
                0x123456,
                INNER,
            ),
            // GENEVE with 4 bytes of options, VNI 42.
            (
                17,
                udp(
                    6081,
                    &after(&[0x01, 0, 0x65, 0x58, 0, 0, 0x2a, 0, 1, 2, 3, 4], INNER),
                ),
                TunnelType::Geneve,
                42,
                INNER,
            ),
            // GRE with checksum, key and sequence.
            (
                47,
                after(
                    &[
                        0xb0, 0, 0x65, 0x58, 0, 0, 0, 0, 0, 0, 0x03, 0xe8, 0, 0, 0, 9,
                    ],
                    INNER,
                ),
                TunnelType::Gre,
                1000,
                INNER,
            ),
            // GRE carrying IPv4 directly: an Ethernet header is put in front.
            (
                47,
                after(&[0, 0, 0x08, 0], &inner_ip),
                TunnelType::Gre,
                0,
                &inner_ip_frame,
            ),
            // ERSPAN II: GRE with a sequence number, session 0x155.
            (
                47,
                after(
                    &[
                        0x10, 0, 0x88, 0xbe, 0, 0, 0, 1, 0x10, 0x64, 0x01, 0x55, 0, 0, 0, 0,
                    ],
                    INNER,
                ),
                TunnelType::Erspan,
                0x155,
                INNER,
            ),
            // ERSPAN III with the platform sub-header (O flag), session 7.
            (
                47,
                [
                    &[0x10, 0, 0x22, 0xeb, 0, 0, 0, 1][..],
                    &[0x20, 0, 0x00, 0x07, 0, 0, 0, 0, 0, 0, 0, 0x01],
                    &[0xaa; 8],
                    INNER,
                ]
                .concat(),
                TunnelType::Erspan,
                7,
                INNER,
            ),
            // IPv4 in IPv4.
            (4, inner_ip.clone(), TunnelType::Ipip, 0, &inner_ip_frame),
            // IPv6 in IPv4.
            (41, inner_ip6.clone(), TunnelType::Ipip, 0, &inner_ip6_frame),
        ];
        let mut scratch = Vec::new();
        for (proto, payload, kind, id, inner_is) in &cases {
            let frame = eth(ETH_P_IP, &ipv4(*proto, payload));
            let (t, inner) = decap(&frame, &mut scratch).expect("a tunnel");
            assert_eq!((t.kind, t.id), (*kind, *id), "{kind:?}");
            assert_eq!(t.outer_src.to_string(), "192.0.2.1");
            assert_eq!(inner, *inner_is, "{kind:?} {id}");
        }
    }

    #[test]
    fn not_tunnels() {
        let mut scratch = Vec::new();
        // Plain UDP, a VXLAN header without its I flag, a fragment, a
        // header cut short, GRE version 1, non-IP.
        for f in [
            eth(ETH_P_IP, &ipv4(17, &udp(53, INNER))),
            eth(ETH_P_IP, &ipv4(17, &udp(4789, &[0u8; 16]))),
            {
                let mut ip = ipv4(4, &ipv4(6, &[0; 20]));
                ip[6] = 0x20; // more fragments
                eth(ETH_P_IP, &ip)
            },
            eth(ETH_P_IP, &ipv4(17, &udp(4789, &[0x08, 0, 0]))),
            eth(ETH_P_IP, &ipv4(47, &[0x30, 0x01, 0x88, 0x0b, 0, 0, 0, 0])),
            eth(0x0806, &[0; 28]),
        ] {
            assert!(decap(&f, &mut scratch).is_none(), "{f:?}");
        }
    }
}
