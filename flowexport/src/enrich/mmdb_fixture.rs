//! Test fixture: writes a small MaxMind DB (format 2.0) ASN database, the
//! shape of GeoLite2-ASN, by the MaxMind DB File Format Specification:
//! a binary search tree of 32-bit records (IPv6 tree, IPv4 under ::/96),
//! 16 zero bytes, a data section of maps {autonomous_system_number: uint32,
//! autonomous_system_organization: utf8_string}, and the metadata map after
//! the `\xAB\xCD\xEFMaxMind.com` marker. The files are read back by the
//! `maxminddb` crate (a real, independent reader) in the tests.

use std::net::IpAddr;

use super::prefix::Prefix;

#[derive(Clone, Copy)]
enum Rec {
    Empty,
    Node(usize),
    Data(usize),
}

fn ctrl(out: &mut Vec<u8>, ty: u8, size: usize) {
    let (first, ext) = if ty <= 7 {
        (ty << 5, None)
    } else {
        (0, Some(ty - 7))
    };
    if size < 29 {
        out.push(first | size as u8);
        out.extend(ext);
    } else {
        assert!(size < 29 + 256, "fixture strings are short");
        out.push(first | 29);
        out.extend(ext);
        out.push((size - 29) as u8);
    }
}

fn string(out: &mut Vec<u8>, s: &str) {
    ctrl(out, 2, s.len());
    out.extend_from_slice(s.as_bytes());
}

fn uint(out: &mut Vec<u8>, ty: u8, v: u64) {
    let bytes = v.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    ctrl(out, ty, 8 - skip);
    out.extend_from_slice(&bytes[skip..]);
}

/// The database for `entries` (prefix, AS number, organization).
pub(crate) fn asn_mmdb(entries: &[(&str, u32, &str)]) -> Vec<u8> {
    let mut data = Vec::new();
    let mut offsets = Vec::new();
    let mut prefixes: Vec<(u128, u8, usize)> = Vec::new();
    for (i, (p, asn, org)) in entries.iter().enumerate() {
        let p = Prefix::parse(p).expect("fixture prefix");
        let (bits, len) = match p.addr {
            IpAddr::V4(a) => (u32::from(a) as u128, 96 + p.len),
            IpAddr::V6(a) => (u128::from(a), p.len),
        };
        prefixes.push((bits, len, i));
        offsets.push(data.len());
        ctrl(&mut data, 7, 2);
        string(&mut data, "autonomous_system_number");
        uint(&mut data, 6, *asn as u64);
        string(&mut data, "autonomous_system_organization");
        string(&mut data, org);
    }
    // Shorter prefixes first, so a longer one splits the data record of
    // the shorter one it lies in.
    prefixes.sort_by_key(|p| p.1);
    let mut nodes: Vec<[Rec; 2]> = vec![[Rec::Empty; 2]];
    for (bits, len, d) in prefixes {
        let mut node = 0;
        for depth in 0..len {
            let bit = ((bits >> (127 - depth)) & 1) as usize;
            if depth + 1 == len {
                nodes[node][bit] = Rec::Data(d);
                break;
            }
            node = match nodes[node][bit] {
                Rec::Node(n) => n,
                other => {
                    // Empty, or the data of a shorter prefix: both halves
                    // of the new node inherit it.
                    nodes.push([other; 2]);
                    let n = nodes.len() - 1;
                    nodes[node][bit] = Rec::Node(n);
                    n
                }
            };
        }
    }
    let count = nodes.len();
    let mut out = Vec::new();
    for n in &nodes {
        for r in n {
            let v = match *r {
                Rec::Empty => count,
                Rec::Node(i) => i,
                Rec::Data(d) => count + 16 + offsets[d],
            };
            out.extend_from_slice(&(v as u32).to_be_bytes());
        }
    }
    out.extend_from_slice(&[0; 16]);
    out.extend_from_slice(&data);
    out.extend_from_slice(b"\xab\xcd\xefMaxMind.com");
    ctrl(&mut out, 7, 9);
    string(&mut out, "node_count");
    uint(&mut out, 6, count as u64);
    string(&mut out, "record_size");
    uint(&mut out, 5, 32);
    string(&mut out, "ip_version");
    uint(&mut out, 5, 6);
    string(&mut out, "database_type");
    string(&mut out, "GeoLite2-ASN");
    string(&mut out, "languages");
    ctrl(&mut out, 11, 0);
    string(&mut out, "binary_format_major_version");
    uint(&mut out, 5, 2);
    string(&mut out, "binary_format_minor_version");
    uint(&mut out, 5, 0);
    string(&mut out, "build_epoch");
    uint(&mut out, 9, 1_763_800_000);
    string(&mut out, "description");
    ctrl(&mut out, 7, 0);
    out
}
