//! Data records: information elements applied to a [`FlowRecord`], then
//! the times, sampling and ICMP fix-ups every record gets.

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
/// Applies one IANA information element to a record.
pub(super) fn apply(r: &mut FlowRecord, t: &mut RecordTimes, id: u16, v: &[u8]) {
    let n = || uint(v);
    match id {
        ie::OCTET_DELTA_COUNT => {
            r.bytes = n();
            t.octets_delta = true;
        }
        ie::PACKET_DELTA_COUNT => {
            r.packets = n();
            t.packets_delta = true;
        }
        ie::OCTET_TOTAL_COUNT if !t.octets_delta => r.bytes = n(),
        ie::PACKET_TOTAL_COUNT if !t.packets_delta => r.packets = n(),
        ie::PROTOCOL_IDENTIFIER => r.proto = n() as u8,
        ie::IP_CLASS_OF_SERVICE => r.ip_tos = n() as u8,
        ie::TCP_CONTROL_BITS => r.tcp_flags = n() as u8,
        ie::SOURCE_TRANSPORT_PORT => r.src_port = n() as u16,
        ie::DESTINATION_TRANSPORT_PORT => r.dst_port = n() as u16,
        ie::SOURCE_IPV4_ADDRESS | ie::SOURCE_IPV6_ADDRESS => {
            if let Some(a) = v4(v).or_else(|| v6(v)) {
                r.src_addr = a;
            }
        }
        ie::DESTINATION_IPV4_ADDRESS | ie::DESTINATION_IPV6_ADDRESS => {
            if let Some(a) = v4(v).or_else(|| v6(v)) {
                r.dst_addr = a;
            }
        }
        ie::INGRESS_INTERFACE => r.in_if = n() as u32,
        ie::EGRESS_INTERFACE => r.out_if = n() as u32,
        ie::BGP_SOURCE_AS_NUMBER => r.src_as = n() as u32,
        ie::BGP_DESTINATION_AS_NUMBER => r.dst_as = n() as u32,
        ie::ICMP_TYPE_CODE_IPV4 | ie::ICMP_TYPE_CODE_IPV6 => {
            let x = n();
            r.icmp_type = (x >> 8) as u8;
            r.icmp_code = x as u8;
            t.icmp_explicit = true;
        }
        ie::ICMP_TYPE_IPV4 | ie::ICMP_TYPE_IPV6 => {
            r.icmp_type = n() as u8;
            t.icmp_explicit = true;
        }
        ie::ICMP_CODE_IPV4 | ie::ICMP_CODE_IPV6 => {
            r.icmp_code = n() as u8;
            t.icmp_explicit = true;
        }
        ie::SOURCE_MAC_ADDRESS => r.src_mac = mac(v),
        ie::DESTINATION_MAC_ADDRESS => r.dst_mac = mac(v),
        ie::POST_DESTINATION_MAC_ADDRESS if r.dst_mac == 0 => r.dst_mac = mac(v),
        ie::VLAN_ID | ie::DOT1Q_VLAN_ID => r.vlan_id = n() as u16 & 0x0fff,
        // RFC 7133: the encapsulation in the top octet.
        ie::LAYER2_SEGMENT_ID => (r.tunnel_type, r.tunnel_id) = segment_tunnel(n()),
        ie::FLOW_DIRECTION => r.flow_direction = n() as u8,
        ie::IP_VERSION => {
            r.etype = match n() {
                6 => ETYPE_IPV6,
                _ => ETYPE_IPV4,
            }
        }
        ie::SAMPLING_INTERVAL | ie::SAMPLER_RANDOM_INTERVAL => t.sampling = Some(n()),
        ie::SAMPLING_PACKET_INTERVAL => t.packet_interval = Some(n()),
        ie::SAMPLING_PACKET_SPACE => t.packet_space = Some(n()),
        ie::SAMPLING_SIZE => t.sampling_size = Some(n()),
        ie::SAMPLING_POPULATION => t.sampling_population = Some(n()),
        ie::SAMPLING_PROBABILITY if v.len() == 8 => {
            t.sampling_probability = Some(f64::from_bits(n()));
        }
        ie::FLOW_END_SYS_UP_TIME => t.end_uptime = Some(n()),
        ie::FLOW_START_SYS_UP_TIME => t.start_uptime = Some(n()),
        ie::FLOW_START_SECONDS => t.start_ms = Some(n().saturating_mul(1000)),
        ie::FLOW_END_SECONDS => t.end_ms = Some(n().saturating_mul(1000)),
        ie::FLOW_START_MILLISECONDS => t.start_ms = Some(n()),
        ie::FLOW_END_MILLISECONDS => t.end_ms = Some(n()),
        ie::FLOW_START_MICROSECONDS | ie::FLOW_START_NANOSECONDS => {
            t.start_ns = Some(ntp_to_unix_ns(n()));
        }
        ie::FLOW_END_MICROSECONDS | ie::FLOW_END_NANOSECONDS => {
            t.end_ns = Some(ntp_to_unix_ns(n()));
        }
        ie::FLOW_START_DELTA_MICROSECONDS => t.start_delta_us = Some(n()),
        ie::FLOW_END_DELTA_MICROSECONDS => t.end_delta_us = Some(n()),
        ie::SYSTEM_INIT_TIME_MILLISECONDS => t.sys_init_ms = Some(n()),
        _ => {}
    }
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
            for f in &t.fields {
                let len = if f.len == VARLEN {
                    let l = r.u8("variable-length field")? as usize;
                    if l == 255 {
                        r.u16("variable-length field")? as usize
                    } else {
                        l
                    }
                } else {
                    f.len as usize
                };
                let v = r.take(len, "data record")?;
                if f.pen == 0 {
                    apply(&mut rec, &mut times, f.id, v);
                }
            }
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
