//! Data records: the information elements a template's records hold, read
//! into a [`FlowRecord`] through the template's [`Layout`] (decided once per
//! template), then the times, sampling and ICMP fix-ups every record gets.

use super::*;

/// Unsigned big-endian integer of 1..=8 bytes (reduced-size encoding);
/// longer values keep their low 8 bytes.
pub(super) fn uint(b: &[u8]) -> u64 {
    let b = if b.len() > 8 { &b[b.len() - 8..] } else { b };
    b.iter().fold(0u64, |acc, x| (acc << 8) | *x as u64)
}

pub(super) fn mac(b: &[u8]) -> u64 {
    uint(&b[..b.len().min(6)])
}

pub(super) fn v4(b: &[u8]) -> Option<IpAddr> {
    (b.len() == 4).then(|| IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])))
}

pub(super) fn v6(b: &[u8]) -> Option<IpAddr> {
    let a: [u8; 16] = b.try_into().ok()?;
    Some(IpAddr::V6(Ipv6Addr::from(a)))
}
/// Declares [`Slot`] and the IANA elements of each slot, in one table.
macro_rules! slots {
    ($($(#[$doc:meta])* $slot:ident: $($id:ident)|+;)*) => {
        /// What a record takes from a template field: one slot per record
        /// member (or decoding time) the decoder sets. Element ids that set
        /// the same member the same way share a slot (IPv4 and IPv6
        /// addresses, VLAN ids, the ICMP elements of both families); within
        /// a slot the template's last such field counts.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(u8)]
        pub(super) enum Slot {
            $($(#[$doc])* $slot,)*
        }

        /// How many slots there are.
        const SLOTS: usize = [$(Slot::$slot),*].len();

        impl Slot {
            /// The slot of an IANA element (`pen` 0), if the decoder uses
            /// it; enterprise elements are skipped.
            pub(super) fn of(id: u16, pen: u32) -> Option<Slot> {
                match id {
                    $($(ie::$id)|+ if pen == 0 => Some(Slot::$slot),)*
                    _ => None,
                }
            }
        }
    };
}

slots! {
    BytesDelta: OCTET_DELTA_COUNT;
    BytesTotal: OCTET_TOTAL_COUNT;
    PacketsDelta: PACKET_DELTA_COUNT;
    PacketsTotal: PACKET_TOTAL_COUNT;
    Proto: PROTOCOL_IDENTIFIER;
    Tos: IP_CLASS_OF_SERVICE;
    TcpFlags: TCP_CONTROL_BITS;
    SrcPort: SOURCE_TRANSPORT_PORT;
    DstPort: DESTINATION_TRANSPORT_PORT;
    SrcAddr: SOURCE_IPV4_ADDRESS | SOURCE_IPV6_ADDRESS;
    DstAddr: DESTINATION_IPV4_ADDRESS | DESTINATION_IPV6_ADDRESS;
    InIf: INGRESS_INTERFACE;
    OutIf: EGRESS_INTERFACE;
    SrcAs: BGP_SOURCE_AS_NUMBER;
    DstAs: BGP_DESTINATION_AS_NUMBER;
    IcmpTypeCode: ICMP_TYPE_CODE_IPV4 | ICMP_TYPE_CODE_IPV6;
    IcmpType: ICMP_TYPE_IPV4 | ICMP_TYPE_IPV6;
    IcmpCode: ICMP_CODE_IPV4 | ICMP_CODE_IPV6;
    SrcMac: SOURCE_MAC_ADDRESS;
    DstMac: DESTINATION_MAC_ADDRESS;
    PostDstMac: POST_DESTINATION_MAC_ADDRESS;
    Vlan: VLAN_ID | DOT1Q_VLAN_ID;
    Segment: LAYER2_SEGMENT_ID;
    Direction: FLOW_DIRECTION;
    IpVersion: IP_VERSION;
    Sampling: SAMPLING_INTERVAL | SAMPLER_RANDOM_INTERVAL;
    PacketInterval: SAMPLING_PACKET_INTERVAL;
    PacketSpace: SAMPLING_PACKET_SPACE;
    SamplingSize: SAMPLING_SIZE;
    SamplingPopulation: SAMPLING_POPULATION;
    SamplingProbability: SAMPLING_PROBABILITY;
    StartUptime: FLOW_START_SYS_UP_TIME;
    EndUptime: FLOW_END_SYS_UP_TIME;
    /// flowStartSeconds or flowStartMilliseconds (the field's id tells).
    StartMs: FLOW_START_SECONDS | FLOW_START_MILLISECONDS;
    EndMs: FLOW_END_SECONDS | FLOW_END_MILLISECONDS;
    /// flowStartMicroseconds or flowStartNanoseconds (NTP format).
    StartNtp: FLOW_START_MICROSECONDS | FLOW_START_NANOSECONDS;
    EndNtp: FLOW_END_MICROSECONDS | FLOW_END_NANOSECONDS;
    StartDeltaUs: FLOW_START_DELTA_MICROSECONDS;
    EndDeltaUs: FLOW_END_DELTA_MICROSECONDS;
    SysInit: SYSTEM_INIT_TIME_MILLISECONDS;
}

/// Where a slot's field lies in one record: its offset (`ABSENT` when the
/// template has no such field), length and element id.
#[derive(Clone, Copy, Debug)]
pub(super) struct Place {
    off: u32,
    len: u16,
    id: u16,
}

const ABSENT: u32 = u32::MAX;

/// Every slot's [`Place`] in one record.
#[derive(Clone, Copy, Debug)]
pub(super) struct Places([Place; SLOTS]);

impl Default for Places {
    fn default() -> Self {
        Places(
            [Place {
                off: ABSENT,
                len: 0,
                id: 0,
            }; SLOTS],
        )
    }
}

impl Places {
    /// Notes a field at `off`: the last field of a slot counts.
    fn set(&mut self, slot: Option<Slot>, off: usize, len: usize, id: u16) {
        if let Some(s) = slot {
            self.0[s as usize] = Place {
                // Records are parts of one datagram (< 64 KiB).
                off: off as u32,
                len: len as u16,
                id,
            };
        }
    }
}

/// How records of one template are read, decided when the template is
/// learned: the template's fields, each with its slot, and for a template
/// without variable-length fields (the usual kind) the record's length and
/// every slot's place. A record is then one pass over the slots, without a
/// dispatch on each field's element id (a data-dependent jump per field,
/// which cost more than reading the fields).
#[derive(Debug)]
pub(super) struct Layout {
    fields: Vec<(Field, Option<Slot>)>,
    fixed: Option<(usize, Places)>,
}

impl Layout {
    pub(super) fn new(fields: Vec<Field>) -> Layout {
        let fields: Vec<(Field, Option<Slot>)> = fields
            .into_iter()
            .map(|f| (f, Slot::of(f.id, f.pen)))
            .collect();
        let fixed = (!fields.iter().any(|(f, _)| f.len == VARLEN)).then(|| {
            let mut places = Places::default();
            let mut off = 0;
            for (f, slot) in &fields {
                places.set(*slot, off, f.len.into(), f.id);
                off += usize::from(f.len);
            }
            (off, places)
        });
        Layout { fields, fixed }
    }

    /// The next record's bytes and its places (`scratch` holds them for a
    /// template with variable-length fields).
    pub(super) fn next<'a, 'p>(
        &'p self,
        r: &mut Reader<'a>,
        scratch: &'p mut Places,
    ) -> Result<(&'a [u8], &'p Places)> {
        if let Some((len, places)) = &self.fixed {
            return Ok((r.take(*len, "data record")?, places));
        }
        // Variable-length fields: the places of this record.
        let start = *r;
        let places = scratch;
        *places = Places::default();
        let mut off = 0;
        for (f, slot) in &self.fields {
            let (prefix, len) = if f.len == VARLEN {
                let l = r.u8("variable-length field")?;
                if l == 255 {
                    (3, usize::from(r.u16("variable-length field")?))
                } else {
                    (1, usize::from(l))
                }
            } else {
                (0, usize::from(f.len))
            };
            r.take(len, "data record")?;
            places.set(*slot, off + prefix, len, f.id);
            off += prefix + len;
        }
        let mut whole = start;
        Ok((whole.take(off, "data record")?, places))
    }
}

/// Reads one record's fields into `r` and `t`.
pub(super) fn read(rec: &[u8], at: &Places, r: &mut FlowRecord, t: &mut RecordTimes) {
    let field = |s: Slot| -> Option<(&[u8], u16)> {
        let p = at.0[s as usize];
        if p.off == ABSENT {
            return None;
        }
        let off = p.off as usize;
        Some((rec.get(off..off + usize::from(p.len))?, p.id))
    };
    let bytes = |s: Slot| field(s).map(|(v, _)| v);
    let n = |s: Slot| bytes(s).map(uint);
    // Delta counts over total counts, whatever their order.
    if let Some(v) = n(Slot::BytesDelta).or_else(|| n(Slot::BytesTotal)) {
        r.bytes = v;
    }
    if let Some(v) = n(Slot::PacketsDelta).or_else(|| n(Slot::PacketsTotal)) {
        r.packets = v;
    }
    // Plain integers: slot => member, truncated to the member's width.
    macro_rules! ints {
        ($($slot:ident => $member:ident as $t:ty),* $(,)?) => {
            $(if let Some(v) = n(Slot::$slot) {
                r.$member = v as $t;
            })*
        };
    }
    ints! {
        Proto => proto as u8,
        Tos => ip_tos as u8,
        TcpFlags => tcp_flags as u8,
        SrcPort => src_port as u16,
        DstPort => dst_port as u16,
        InIf => in_if as u32,
        OutIf => out_if as u32,
        SrcAs => src_as as u32,
        DstAs => dst_as as u32,
        Direction => flow_direction as u8,
    }
    if let Some(a) = bytes(Slot::SrcAddr).and_then(|v| v4(v).or_else(|| v6(v))) {
        r.src_addr = a;
    }
    if let Some(a) = bytes(Slot::DstAddr).and_then(|v| v4(v).or_else(|| v6(v))) {
        r.dst_addr = a;
    }
    // icmpTypeCode, then separate type and code elements over it.
    if let Some(v) = n(Slot::IcmpTypeCode) {
        r.icmp_type = (v >> 8) as u8;
        r.icmp_code = v as u8;
        t.icmp_explicit = true;
    }
    if let Some(v) = n(Slot::IcmpType) {
        r.icmp_type = v as u8;
        t.icmp_explicit = true;
    }
    if let Some(v) = n(Slot::IcmpCode) {
        r.icmp_code = v as u8;
        t.icmp_explicit = true;
    }
    if let Some(v) = bytes(Slot::SrcMac) {
        r.src_mac = mac(v);
    }
    if let Some(v) = bytes(Slot::DstMac) {
        r.dst_mac = mac(v);
    }
    // The post-NAT destination MAC where the record has no other.
    if let Some(v) = bytes(Slot::PostDstMac).filter(|_| r.dst_mac == 0) {
        r.dst_mac = mac(v);
    }
    if let Some(v) = n(Slot::Vlan) {
        r.vlan_id = v as u16 & 0x0fff;
    }
    // RFC 7133: the encapsulation in the top octet.
    if let Some(v) = n(Slot::Segment) {
        (r.tunnel_type, r.tunnel_id) = segment_tunnel(v);
    }
    if let Some(v) = n(Slot::IpVersion) {
        r.etype = if v == 6 { ETYPE_IPV6 } else { ETYPE_IPV4 };
    }
    t.sampling = n(Slot::Sampling);
    t.packet_interval = n(Slot::PacketInterval);
    t.packet_space = n(Slot::PacketSpace);
    t.sampling_size = n(Slot::SamplingSize);
    t.sampling_population = n(Slot::SamplingPopulation);
    t.sampling_probability = bytes(Slot::SamplingProbability)
        .filter(|v| v.len() == 8)
        .map(|v| f64::from_bits(uint(v)));
    t.start_uptime = n(Slot::StartUptime);
    t.end_uptime = n(Slot::EndUptime);
    let ms = |s: Slot, seconds: u16| {
        field(s).map(|(v, id)| {
            if id == seconds {
                uint(v).saturating_mul(1000)
            } else {
                uint(v)
            }
        })
    };
    t.start_ms = ms(Slot::StartMs, ie::FLOW_START_SECONDS);
    t.end_ms = ms(Slot::EndMs, ie::FLOW_END_SECONDS);
    t.start_ns = n(Slot::StartNtp).map(ntp_to_unix_ns);
    t.end_ns = n(Slot::EndNtp).map(ntp_to_unix_ns);
    t.start_delta_us = n(Slot::StartDeltaUs);
    t.end_delta_us = n(Slot::EndDeltaUs);
    t.sys_init_ms = n(Slot::SysInit);
}

/// ICMP flows: NetFlow exporters often put `type << 8 | code` in the
/// destination port. Records carry ICMP in icmp_type/icmp_code, ports 0, as
/// the agent's records do.
pub(super) fn icmp_from_port(r: &mut FlowRecord, explicit: bool) {
    let icmp = (r.proto == 1 && r.etype != ETYPE_IPV6) || (r.proto == 58 && r.etype == ETYPE_IPV6);
    if !icmp {
        return;
    }
    if !explicit {
        r.icmp_type = (r.dst_port >> 8) as u8;
        r.icmp_code = r.dst_port as u8;
    }
    r.src_port = 0;
    r.dst_port = 0;
}

impl NetflowDecoder {
    pub(super) fn data_set(
        &mut self,
        h: &Header,
        id: u16,
        body: &[u8],
        out: &mut Vec<FlowRecord>,
    ) -> Result<(), NetflowError> {
        let Some(t) = self.templates.get(&Self::key(h, id)).cloned() else {
            self.hold(h, id, body);
            return Ok(());
        };
        // Every template has a field and every field takes at least one
        // byte, so each pass consumes input: the loop ends.
        debug_assert!(t.min_len > 0);
        // What options records told about this exporter and domain, looked
        // up once per set (a set holds options records or data records, and
        // only options records change these).
        let known = Known {
            sys_init_ms: self.sys_init_ms.get(&(h.exporter, h.domain)).copied(),
            sampling: self
                .sampling
                .get(&(h.exporter, h.version, h.domain))
                .copied(),
        };
        let mut r = Reader::new(body);
        let mut scratch = Places::default();
        while r.left() >= t.min_len.max(1) {
            let mut rec = FlowRecord {
                flow_type: if h.version == 9 {
                    FlowType::NetFlowV9
                } else {
                    FlowType::Ipfix
                },
                time_received_ns: h.time_received_ns,
                sequence_num: h.sequence,
                sampler_address: Some(h.exporter),
                observation_domain_id: h.domain,
                ..FlowRecord::default()
            };
            let mut times = RecordTimes::default();
            let (bytes, places) = t.layout.next(&mut r, &mut scratch)?;
            read(bytes, places, &mut rec, &mut times);
            if t.options {
                self.counters.options_records += 1;
                if let Some(s) = times.sampling_rate() {
                    self.sampling.insert((h.exporter, h.version, h.domain), s);
                }
                if let Some(i) = times.sys_init_ms {
                    self.sys_init_ms.insert((h.exporter, h.domain), i);
                }
                continue;
            }
            finish(h, known, &mut rec, &times);
            out.push(rec);
        }
        Ok(())
    }
}

/// An exporter's (and domain's) values from earlier options records.
#[derive(Clone, Copy)]
struct Known {
    sys_init_ms: Option<u64>,
    sampling: Option<u64>,
}

/// Resolves times, sampling, address family and ICMP for one record.
fn finish(h: &Header, known: Known, rec: &mut FlowRecord, t: &RecordTimes) {
    // Saturating: times are 64-bit wire values; nonsense stays nonsense
    // but never overflows.
    let ms = |v: u64| v.saturating_mul(1_000_000);
    let init = t.sys_init_ms.or(known.sys_init_ms);
    // v9: relative to the header's sysUptime; IPFIX (flowStartSysUpTime):
    // ms since systemInitTimeMilliseconds.
    let from_uptime = |u: u64| -> Option<u64> {
        if h.version == 9 {
            Some(uptime_to_wall_ms(h.export_ms, h.uptime_ms, u as u32))
        } else {
            init.map(|b| sysuptime_to_wall_ms(h.export_ms, b, u))
        }
    };
    let export_us = h.export_ms.saturating_mul(1000);
    // One end of the flow from the most precise field the record has:
    // ns, ms, uptime, then a delta back from the export time.
    let wall_ns =
        |ns: Option<u64>, millis: Option<u64>, uptime: Option<u64>, delta_us: Option<u64>| {
            ns.or(millis.map(ms))
                .or(uptime.and_then(from_uptime).map(ms))
                .or(delta_us.map(|d| export_us.saturating_sub(d).saturating_mul(1000)))
        };
    rec.time_flow_start_ns = wall_ns(t.start_ns, t.start_ms, t.start_uptime, t.start_delta_us)
        .unwrap_or(ms(h.export_ms));
    rec.time_flow_end_ns =
        wall_ns(t.end_ns, t.end_ms, t.end_uptime, t.end_delta_us).unwrap_or(rec.time_flow_start_ns);
    rec.sampling_rate = t.sampling_rate().or(known.sampling).unwrap_or(0);
    if rec.etype == 0 {
        rec.etype = if rec.src_addr.is_ipv6() {
            ETYPE_IPV6
        } else {
            ETYPE_IPV4
        };
    }
    icmp_from_port(rec, t.icmp_explicit);
}
