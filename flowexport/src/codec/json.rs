//! JSON lines of [`FlowRecord`]s: goflow2's field names, addresses as text.
//!
//! The bytes are exactly those of `serde_json` over `FlowRecord`'s `Serialize`
//! (field order, `sampler_address` "" when absent, customer ids and AS names
//! left out when 0/empty), which `FlowRecord::from_json` reads back; a unit
//! test holds the two together over a corpus. Written by hand because it is
//! the hot path of every JSON output (the agent's stdout, `collect` printing
//! millions of flows per second, `--kafka-format json`): a record is built
//! in place from constant-length keys, integers up to eight digits at a
//! time (built in a register), IPv4 addresses without `core::fmt`.
//! `cargo xtask bench collect` prints its rate beside serde_json's.

use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr};

use crate::record::FlowRecord;

/// Longest object without AS names: the keys and punctuation (~420 bytes),
/// 27 integers of at most 20 digits, three addresses of at most 45
/// characters, the longest type name (~1,110 bytes in all), and the 7
/// bytes an integer's last 8-byte store may write past its digits.
const MAX_FIXED: usize = 1280;

/// One record's bytes, written straight into the output's spare capacity
/// (reserved for [`MAX_FIXED`] bytes up front: nothing is zeroed or copied
/// twice). Every write is a bounds-checked sub-slice of that capacity; keys
/// are copies of a constant length (inlined moves, not `memcpy` calls),
/// integers are written up to eight digits at a time.
struct Line<'a> {
    spare: &'a mut [MaybeUninit<u8>],
    len: usize,
}

/// Each octet's decimal text followed by a dot, padded to 4 bytes, and the
/// text's length without the dot: an IPv4 address is four 4-byte copies.
const OCTETS: [([u8; 4], u8); 256] = {
    let mut t = [([0u8; 4], 0u8); 256];
    let mut i = 0;
    while i < 256 {
        let (h, te, o) = ((i / 100) as u8, ((i / 10) % 10) as u8, (i % 10) as u8);
        t[i] = if i >= 100 {
            ([b'0' + h, b'0' + te, b'0' + o, b'.'], 3)
        } else if i >= 10 {
            ([b'0' + te, b'0' + o, b'.', 0], 2)
        } else {
            ([b'0' + o, b'.', 0, 0], 1)
        };
        i += 1;
    }
    t
};

impl Line<'_> {
    /// Writes `bytes` at `at` (a checked range of the spare capacity).
    #[inline(always)]
    fn put_at(&mut self, at: usize, bytes: &[u8]) {
        let dst = &mut self.spare[at..at + bytes.len()];
        // SAFETY: `dst` is a checked sub-slice of `bytes.len()` writable
        // bytes; `MaybeUninit<u8>` has `u8`'s layout, and `bytes` cannot
        // overlap memory borrowed mutably here.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                dst.as_mut_ptr().cast::<u8>(),
                bytes.len(),
            );
        };
    }

    #[inline(always)]
    fn put<const N: usize>(&mut self, bytes: &[u8; N]) {
        self.put_at(self.len, bytes);
        self.len += N;
    }

    #[inline(always)]
    fn put_slice(&mut self, bytes: &[u8]) {
        self.put_at(self.len, bytes);
        self.len += bytes.len();
    }

    #[inline(always)]
    fn int<const N: usize>(&mut self, key: &[u8; N], v: u64) {
        self.put(key);
        self.digits(v);
    }

    #[inline(always)]
    fn digits(&mut self, v: u64) {
        if v < 10 {
            self.put(&[b'0' + v as u8]);
            return;
        }
        // In parts of at most eight digits, each built in a register and
        // stored with one 8-byte write (no digit table, no scratch array
        // to copy out of).
        const E8: u64 = 100_000_000;
        let n = decimal_len(v);
        if n <= 8 {
            self.digit_part(v as u32, n);
        } else if n <= 16 {
            self.digit_part((v / E8) as u32, n - 8);
            self.digit_part((v % E8) as u32, 8);
        } else {
            // Timestamps in ns have 19 digits.
            let (top, rest) = (v / (E8 * E8), v % (E8 * E8));
            self.digit_part(top as u32, n - 16);
            self.digit_part((rest / E8) as u32, 8);
            self.digit_part((rest % E8) as u32, 8);
        }
    }

    /// `v` (< 10^n) as exactly `n` (1..=8) digits: one 8-byte store, of
    /// which `len` moves past the first `n` (the next write overwrites the
    /// rest; every byte `len` moves past is written, what `with_line`
    /// relies on).
    #[inline(always)]
    fn digit_part(&mut self, v: u32, n: usize) {
        let text = eight_digits(v) >> (8 * (8 - n));
        self.put_at(self.len, &text.to_le_bytes());
        self.len += n;
    }

    fn addr(&mut self, a: IpAddr) {
        match a {
            IpAddr::V4(v4) => self.v4(v4),
            IpAddr::V6(v6) => {
                // Rarer, and the compression rules are std's: its Display.
                use std::io::Write;
                let mut text = [0u8; 64];
                let mut cursor = std::io::Cursor::new(&mut text[..]);
                write!(cursor, "{v6}").expect("an IPv6 address fits in 64 bytes");
                let n = cursor.position() as usize;
                self.put_slice(&text[..n]);
            }
        }
    }

    #[inline(always)]
    fn v4(&mut self, a: Ipv4Addr) {
        let [a, b, c, d] = a.octets();
        for o in [a, b, c] {
            let (text, n) = &OCTETS[o as usize];
            self.put_at(self.len, text);
            self.len += *n as usize + 1;
        }
        let (text, n) = &OCTETS[d as usize];
        self.put_at(self.len, text);
        self.len += *n as usize;
    }
}

/// Runs `write` on a [`Line`] over `out`'s spare capacity (at least
/// `MAX_FIXED` bytes), then keeps the bytes it wrote.
#[inline(always)]
fn with_line(out: &mut Vec<u8>, write: impl FnOnce(&mut Line<'_>)) {
    out.reserve(MAX_FIXED);
    let mut l = Line {
        spare: out.spare_capacity_mut(),
        len: 0,
    };
    write(&mut l);
    let n = l.len;
    // SAFETY: `Line` only moves `len` past bytes it wrote: the first `n`
    // spare bytes are initialized, and within the capacity (checked slices).
    unsafe { out.set_len(out.len() + n) };
}

/// `v` (< 10^8) as eight ASCII digits in a u64, the first digit in the
/// lowest byte (little-endian memory order), leading zeros included. SWAR:
/// both halves of four digits in 32-bit lanes, split into pairs in 16-bit
/// lanes, then into digits in bytes; each division is a multiplication
/// by a reciprocal that is exact for the lane's range (x / 100 as
/// x * 10486 >> 20 for x < 10^4; x / 10 as x * 103 >> 10 for x < 100),
/// and no lane's product reaches the next lane.
#[inline(always)]
fn eight_digits(v: u32) -> u64 {
    let v = u64::from(v);
    let halves = (v / 10_000) | ((v % 10_000) << 32);
    let high_pairs = ((halves * 10_486) >> 20) & 0x0000_007f_0000_007f;
    let pairs = ((halves - 100 * high_pairs) << 16) | high_pairs;
    let tens = ((pairs * 103) >> 10) & 0x000f_000f_000f_000f;
    let digits = ((pairs - 10 * tens) << 8) | tens;
    digits | 0x3030_3030_3030_3030
}

/// Decimal digits of `v` (>= 10), without a loop: from its bit length,
/// then one comparison.
#[inline(always)]
fn decimal_len(v: u64) -> usize {
    const POW10: [u64; 20] = {
        let mut p = [1u64; 20];
        let mut i = 1;
        while i < 20 {
            p[i] = p[i - 1] * 10;
            i += 1;
        }
        p
    };
    let bits = 64 - v.leading_zeros() as usize;
    // floor(bits * log10(2)): the digits of 2^(bits-1), one short at most.
    let n = (bits * 1233) >> 12;
    if n < 20 && v >= POW10[n] {
        n + 1
    } else {
        n
    }
}

/// Appends `r` as one JSON object (no newline) to `out`.
pub fn write_record(out: &mut Vec<u8>, r: &FlowRecord) {
    with_line(out, |l| fixed_fields(l, r));
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
    if r.tunnel_type.is_some()
        || r.tunnel_id != 0
        || r.outer_src_addr.is_some()
        || r.outer_dst_addr.is_some()
    {
        with_line(out, |l| tunnel_fields(l, r));
    }
    out.push(b'}');
}

/// The fields every record has, in serde's order (up to `cid`).
#[inline(always)]
fn fixed_fields(l: &mut Line<'_>, r: &FlowRecord) {
    l.put(b"{\"type\":\"");
    l.put_slice(r.flow_type.as_str().as_bytes());
    l.put(b"\"");
    l.int(b",\"time_received_ns\":", r.time_received_ns);
    l.int(b",\"sequence_num\":", r.sequence_num.into());
    l.int(b",\"sampling_rate\":", r.sampling_rate);
    l.put(b",\"sampler_address\":\"");
    if let Some(a) = r.sampler_address {
        l.addr(a);
    }
    l.put(b"\"");
    l.int(b",\"time_flow_start_ns\":", r.time_flow_start_ns);
    l.int(b",\"time_flow_end_ns\":", r.time_flow_end_ns);
    l.int(b",\"bytes\":", r.bytes);
    l.int(b",\"packets\":", r.packets);
    l.put(b",\"src_addr\":\"");
    l.addr(r.src_addr);
    l.put(b"\",\"dst_addr\":\"");
    l.addr(r.dst_addr);
    l.put(b"\"");
    l.int(b",\"etype\":", r.etype.into());
    l.int(b",\"proto\":", r.proto.into());
    l.int(b",\"src_port\":", r.src_port.into());
    l.int(b",\"dst_port\":", r.dst_port.into());
    l.int(b",\"in_if\":", r.in_if.into());
    l.int(b",\"out_if\":", r.out_if.into());
    l.int(b",\"vlan_id\":", r.vlan_id.into());
    l.int(b",\"tcp_flags\":", r.tcp_flags.into());
    l.int(b",\"icmp_type\":", r.icmp_type.into());
    l.int(b",\"icmp_code\":", r.icmp_code.into());
    l.int(b",\"flow_direction\":", r.flow_direction.into());
    l.int(b",\"ip_tos\":", r.ip_tos.into());
    l.int(b",\"src_as\":", r.src_as.into());
    l.int(b",\"dst_as\":", r.dst_as.into());
    l.int(b",\"src_mac\":", r.src_mac);
    l.int(b",\"dst_mac\":", r.dst_mac);
    l.int(
        b",\"observation_domain_id\":",
        r.observation_domain_id.into(),
    );
    if r.src_cid != 0 {
        l.int(b",\"src_cid\":", r.src_cid.into());
    }
    if r.dst_cid != 0 {
        l.int(b",\"dst_cid\":", r.dst_cid.into());
    }
    if r.cid != 0 {
        l.int(b",\"cid\":", r.cid.into());
    }
}

/// The tunnel fields that are set.
fn tunnel_fields(l: &mut Line<'_>, r: &FlowRecord) {
    if let Some(t) = r.tunnel_type {
        l.put(b",\"tunnel_type\":\"");
        l.put_slice(t.as_str().as_bytes());
        l.put(b"\"");
    }
    if r.tunnel_id != 0 {
        l.int(b",\"tunnel_id\":", r.tunnel_id.into());
    }
    for (key, addr) in [
        (&b",\"outer_src_addr\":\""[..], r.outer_src_addr),
        (b",\"outer_dst_addr\":\"", r.outer_dst_addr),
    ] {
        if let Some(a) = addr {
            l.put_slice(key);
            l.addr(a);
            l.put(b"\"");
        }
    }
}

/// Appends the records as JSON lines (one object and a newline each).
pub fn write_lines(out: &mut Vec<u8>, records: &[FlowRecord]) {
    for r in records {
        write_record(out, r);
        out.push(b'\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{FlowType, TunnelType};
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
            tunnel_type: Some(TunnelType::Erspan),
            tunnel_id: u32::MAX,
            outer_src_addr: Some(IpAddr::V6(Ipv6Addr::from(u128::MAX))),
            outer_dst_addr: Some(IpAddr::V4(Ipv4Addr::BROADCAST)),
        };
        let mut v = vec![FlowRecord::default(), max];
        // Each tunnel field alone, every tunnel type.
        for (i, t) in TunnelType::ALL.into_iter().enumerate() {
            v.push(FlowRecord {
                tunnel_type: Some(t),
                ..FlowRecord::default()
            });
            v.push(FlowRecord {
                tunnel_id: i as u32 + 1,
                outer_src_addr: Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, i as u8))),
                ..FlowRecord::default()
            });
            v.push(FlowRecord {
                outer_dst_addr: Some("2001:db8::7".parse().unwrap()),
                ..FlowRecord::default()
            });
        }
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
                sampler_address: Some(IpAddr::V4(Ipv4Addr::new(9, 10, 255, i as u8))),
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
    fn decimal_lengths() {
        for v in [
            10u64,
            99,
            100,
            999,
            1000,
            u32::MAX as u64,
            u64::MAX - 1,
            u64::MAX,
        ] {
            assert_eq!(decimal_len(v), v.to_string().len(), "{v}");
        }
        let mut p = 10u64;
        while let Some(next) = p.checked_mul(10) {
            for v in [p - 1, p, p + 1] {
                assert_eq!(decimal_len(v), v.to_string().len(), "{v}");
            }
            p = next;
        }
    }

    #[test]
    fn eight_digit_parts() {
        let check = |v: u32| {
            assert_eq!(
                eight_digits(v).to_le_bytes(),
                *format!("{v:08}").as_bytes(),
                "{v}"
            );
        };
        (0..20_000).for_each(check);
        (0..100_000_000).step_by(9_973).for_each(check);
        (99_990_000..100_000_000).for_each(check);
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
