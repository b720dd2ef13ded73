//! The dashboard's fields of a FlowMessage, read straight off the wire
//! into a [`FlowSummary`], beside the full decoder ([`super::decode`]).

use std::net::IpAddr;

use crate::record::{ip_version, FlowSummary, Host};

/// The dashboard's fields of a FlowMessage, read straight off the wire:
/// the fields it needs are picked up, all others are skipped by wire type,
/// and nothing is allocated except the AS names. Faster than decoding the
/// whole message; every message `protobuf::decode` accepts is read to the
/// same values (checked by the `protobuf` fuzz target), and a message with
/// a truncated or mistyped field is rejected as it would be. Fields it does
/// not read are not validated.
pub fn scan(mut b: &[u8]) -> Result<FlowSummary, &'static str> {
    fn varint(b: &mut &[u8]) -> Result<u64, &'static str> {
        let mut v = 0u64;
        for i in 0..10 {
            let (&byte, rest) = b.split_first().ok_or("truncated varint")?;
            *b = rest;
            v |= ((byte & 0x7f) as u64) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint longer than 10 bytes")
    }
    fn bytes<'a>(b: &mut &'a [u8]) -> Result<&'a [u8], &'static str> {
        let len = varint(b)?;
        if len > b.len() as u64 {
            return Err("length past the end of the message");
        }
        let (v, rest) = b.split_at(len as usize);
        *b = rest;
        Ok(v)
    }
    /// Skips a (deprecated) group of unknown fields up to its end tag, as
    /// prost does, nested at most 100 deep.
    fn skip_group(b: &mut &[u8], field: u64, depth: u32) -> Result<(), &'static str> {
        if depth > 100 {
            return Err("groups nested too deep");
        }
        loop {
            let tag = varint(b)?;
            let (f, wire) = (tag >> 3, tag & 7);
            match wire {
                0 => {
                    varint(b)?;
                }
                1 | 5 => {
                    let n = if wire == 1 { 8 } else { 4 };
                    if b.len() < n {
                        return Err("truncated fixed-size field");
                    }
                    *b = &b[n..];
                }
                2 => {
                    bytes(b)?;
                }
                3 => skip_group(b, f, depth + 1)?,
                4 if f == field => return Ok(()),
                _ => return Err("unexpected end of group or wire type"),
            }
        }
    }
    fn narrow<T: TryFrom<u32>>(v: u32, what: &'static str) -> Result<T, &'static str> {
        T::try_from(v).map_err(|_| what)
    }
    fn addr(v: &[u8]) -> Option<IpAddr> {
        match v.len() {
            4 => Some(IpAddr::from(<[u8; 4]>::try_from(v).ok()?)),
            16 => Some(IpAddr::from(<[u8; 16]>::try_from(v).ok()?)),
            _ => None,
        }
    }
    let mut f = FlowSummary {
        flows: 1,
        ..FlowSummary::default()
    };
    let mut rate = 0u64;
    let (mut etype, mut proto, mut direction, mut src_port, mut dst_port) = (0u32, 0, 0, 0, 0);
    // Address fields: the last occurrence counts (as in prost), checked at
    // the end.
    let (mut src, mut dst, mut sampler): (Option<&[u8]>, Option<&[u8]>, &[u8]) = (None, None, &[]);
    while !b.is_empty() {
        let tag = varint(&mut b)?;
        let (field, wire) = (tag >> 3, tag & 7);
        // Fields read here must have their type's wire type.
        let want = match field {
            3 | 9 | 10 | 14 | 15 | 20 | 21 | 22 | 30 | 1000 | 1003 => Some(0),
            6 | 7 | 11 | 1004 | 1005 => Some(2),
            _ => None,
        };
        if want.is_some_and(|w| w != wire) {
            return Err("field with the wrong wire type");
        }
        match wire {
            0 => {
                let v = varint(&mut b)?;
                match field {
                    3 => rate = v,
                    9 => f.bytes = v,
                    10 => f.packets = v,
                    // uint32 fields: a longer varint is cut to 32 bits, as
                    // prost reads it, then narrowed as from_message does.
                    14 => f.src_as = v as u32,
                    15 => f.dst_as = v as u32,
                    20 => proto = v as u32,
                    21 => src_port = v as u32,
                    22 => dst_port = v as u32,
                    30 => etype = v as u32,
                    1000 => direction = v as u32,
                    1003 => f.cid = v as u32,
                    _ => {}
                }
            }
            2 => {
                let v = bytes(&mut b)?;
                match field {
                    6 => src = Some(v),
                    7 => dst = Some(v),
                    11 => sampler = v,
                    1004 | 1005 => {
                        let name = std::str::from_utf8(v).map_err(|_| "AS name is not UTF-8")?;
                        if field == 1004 {
                            f.src_as_name = name.to_string();
                        } else {
                            f.dst_as_name = name.to_string();
                        }
                    }
                    _ => {}
                }
            }
            1 => {
                if b.len() < 8 {
                    return Err("truncated fixed64");
                }
                b = &b[8..];
            }
            5 => {
                if b.len() < 4 {
                    return Err("truncated fixed32");
                }
                b = &b[4..];
            }
            3 => skip_group(&mut b, field, 1)?,
            _ => return Err("unsupported wire type"),
        }
    }
    let src = src.and_then(addr).ok_or("src_addr is not 4 or 16 bytes")?;
    dst.and_then(addr).ok_or("dst_addr is not 4 or 16 bytes")?;
    let sampler = if sampler.is_empty() {
        None
    } else {
        Some(addr(sampler).ok_or("sampler_address is not 4 or 16 bytes")?)
    };
    // The same ranges protobuf::from_message enforces.
    let proto: u8 = narrow(proto, "proto out of range")?;
    let etype: u16 = narrow(etype, "etype out of range")?;
    let direction: u8 = narrow(direction, "flow_direction out of range")?;
    f.src_port = narrow(src_port, "src_port out of range")?;
    f.dst_port = narrow(dst_port, "dst_port out of range")?;
    let scale = rate.max(1);
    f.bytes = f.bytes.saturating_mul(scale);
    f.packets = f.packets.saturating_mul(scale);
    f.host = Host::Addr(sampler);
    f.proto = Some(proto);
    f.direction = Some(direction);
    f.ip_version = Some(ip_version(etype, src));
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::protobuf;
    use crate::record::{FlowRecord, ETYPE_IPV6};

    #[test]
    fn wire_scan_reads_what_the_full_decoder_reads() {
        let mut r = FlowRecord {
            sampler_address: Some("192.0.2.1".parse().unwrap()),
            src_addr: "2001:db8::1".parse().unwrap(),
            dst_addr: "2001:db8::2".parse().unwrap(),
            etype: ETYPE_IPV6,
            proto: 6,
            src_port: 443,
            dst_port: 50000,
            bytes: 1500,
            packets: 3,
            sampling_rate: 10,
            flow_direction: 1,
            cid: 17,
            src_as: 64500,
            dst_as: 64501,
            src_as_name: "EXAMPLE".into(),
            in_if: 4,
            time_flow_start_ns: 1_763_799_999_000_000_000,
            ..FlowRecord::default()
        };
        for variant in 0..3 {
            if variant == 1 {
                (r.src_addr, r.dst_addr, r.etype) =
                    ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap(), 0);
                r.sampler_address = None;
                r.src_as_name.clear();
            }
            if variant == 2 {
                (r.proto, r.src_port, r.dst_port, r.sampling_rate) = (1, 0, 0x0800, 0);
            }
            let mut buf = Vec::new();
            protobuf::encode(&r, false, &mut buf);
            let full = FlowSummary::from_record(&protobuf::decode(&buf, false).unwrap());
            assert_eq!(scan(&buf).unwrap(), full, "variant {variant}");
        }
        // Found by the protobuf fuzz target: a field given twice (the last
        // counts, even after a bad one), and an unknown field as a group
        // (skipped to its end tag, nested).
        let mut buf = vec![0x32, 0x01, 0x05];
        protobuf::encode(&r, false, &mut buf);
        // group 500 { 2: 1, group 501 {} }
        buf.extend([0xa3, 0x1f, 0x10, 0x01, 0xab, 0x1f, 0xac, 0x1f, 0xa4, 0x1f]);
        let full = FlowSummary::from_record(&protobuf::decode(&buf, false).unwrap());
        assert_eq!(scan(&buf).unwrap(), full);
        for bad in [
            &b""[..],
            b"\x08",
            b"\x32\x05ab",
            b"\x48\x80",
            b"\x4a\x01\x01",
        ] {
            assert!(scan(bad).is_err(), "{bad:?}");
            assert!(protobuf::decode(bad, false).is_err(), "{bad:?}");
        }
    }
}
