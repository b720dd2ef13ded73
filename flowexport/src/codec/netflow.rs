//! Decoding NetFlow v5, NetFlow v9 (RFC 3954) and IPFIX (RFC 7011) into
//! [`FlowRecord`]s. Pure: the caller passes the exporter's address, the bytes
//! and the clock; no I/O here.
//!
//! Templates (and options templates) are kept per exporter address, per
//! observation domain / source id, per protocol version. Data that arrives
//! before its template is held (bounded in count and age) and decoded when
//! the template arrives. Sampling intervals come from the v5 header, from
//! options data (samplingInterval 34, samplerRandomInterval 50,
//! samplingPacketInterval 305 with samplingPacketSpace 306) or from the data
//! record itself.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use super::ie;
use crate::record::{FlowRecord, FlowType, ETYPE_IPV4, ETYPE_IPV6};

/// Why a packet (or the rest of it) could not be decoded. `reason()` is the
/// metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetflowError {
    #[error("packet too short for {0}")]
    Truncated(&'static str),
    #[error("unsupported NetFlow/IPFIX version {0}")]
    Version(u16),
    #[error("inconsistent length: {0}")]
    Length(&'static str),
    #[error("malformed template: {0}")]
    Template(&'static str),
}

impl NetflowError {
    pub fn reason(&self) -> &'static str {
        match self {
            NetflowError::Truncated(_) => "truncated",
            NetflowError::Version(_) => "version",
            NetflowError::Length(_) => "length",
            NetflowError::Template(_) => "template",
        }
    }
}

/// Variable-length field marker in templates (RFC 7011 §7).
const VARLEN: u16 = 65535;
/// NTP era offset: seconds from 1900-01-01 to 1970-01-01.
const NTP_UNIX_OFFSET: u64 = 2_208_988_800;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct TemplateKey {
    exporter: IpAddr,
    version: u16,
    domain: u32,
    id: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Field {
    id: u16,
    /// Private enterprise number; 0 for IANA elements. Enterprise fields are
    /// skipped (their length is still honoured).
    pen: u32,
    len: u16,
}

#[derive(Debug)]
struct Template {
    fields: Vec<Field>,
    /// Options templates carry exporter settings (sampling), not flows.
    options: bool,
    /// Smallest record: fixed lengths plus one byte per variable field.
    min_len: usize,
}

/// What the packet header tells every record in it.
#[derive(Clone, Copy, Debug)]
struct Header {
    version: u16,
    exporter: IpAddr,
    domain: u32,
    sequence: u32,
    export_ms: u64,
    /// NetFlow v9: the header's sysUptime (ms), which FIRST/LAST_SWITCHED
    /// are relative to.
    uptime_ms: u32,
    time_received_ns: u64,
}

/// Wall-clock ms of a sysUptime-relative timestamp `t`, given the export
/// time and the sysUptime in the same header. The age `uptime - t` is taken
/// modulo 2^32 as a signed value, so a flow that started before sysUptime
/// wrapped (every 49.7 days), or that an exporter stamped a little after its
/// header's uptime, still lands next to the export time instead of 49.7
/// days away.
fn uptime_to_wall_ms(export_ms: u64, uptime: u32, t: u32) -> u64 {
    let age = uptime.wrapping_sub(t) as i32 as i64;
    (export_ms as i64 - age).max(0) as u64
}

/// IPFIX flowStart/EndSysUpTime (`t`, ms since systemInitTimeMilliseconds
/// `init`) as wall-clock ms. The counter is 32 bits, so of `init + t` and
/// its neighbours 2^32 ms away, the one nearest the export time is taken:
/// right after the counter wraps, and for softflowd reading a pcap file,
/// whose flows predate its own init time.
fn sysuptime_to_wall_ms(export_ms: u64, init: u64, t: u64) -> u64 {
    // i128: both inputs are arbitrary 64-bit field values from the wire.
    let a = init as i128 + t as i128;
    let e = export_ms as i128;
    [a - (1 << 32), a, a + (1 << 32)]
        .into_iter()
        .min_by_key(|x| (x - e).abs())
        .expect("three candidates")
        .clamp(0, u64::MAX as i128) as u64
}

struct Pending {
    key: TemplateKey,
    header: Header,
    data: Vec<u8>,
    since_ns: u64,
}

/// Counters the decoder keeps (the collector exports them as metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecoderCounters {
    /// Data sets held because their template was not known yet.
    pub pending_held: u64,
    /// Held data sets decoded once their template arrived.
    pub pending_decoded: u64,
    /// Held data sets dropped because no template came in time (or the
    /// holding area was full).
    pub pending_expired: u64,
    /// Options data records read (sampling and exporter settings).
    pub options_records: u64,
}

/// Per-exporter decoding state: templates, sampling, data awaiting templates.
pub struct NetflowDecoder {
    templates: HashMap<TemplateKey, Arc<Template>>,
    sampling: HashMap<(IpAddr, u16, u32), u64>,
    sys_init_ms: HashMap<(IpAddr, u32), u64>,
    pending: VecDeque<Pending>,
    pending_bytes: usize,
    /// Flows of held data decoded when their template arrived, handed out
    /// by the `decode` call that brought the template.
    replayed: Vec<FlowRecord>,
    /// How long data may wait for its template.
    pub pending_ttl_ns: u64,
    /// Bound on bytes of data waiting for templates.
    pub pending_max_bytes: usize,
    pub counters: DecoderCounters,
}

impl Default for NetflowDecoder {
    fn default() -> Self {
        NetflowDecoder::new(60_000_000_000, 4 << 20)
    }
}

struct Reader<'a> {
    b: &'a [u8],
    off: usize,
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8]) -> Self {
        Reader { b, off: 0 }
    }
    fn left(&self) -> usize {
        self.b.len() - self.off
    }
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], NetflowError> {
        if self.left() < n {
            return Err(NetflowError::Truncated(what));
        }
        let s = &self.b[self.off..self.off + n];
        self.off += n;
        Ok(s)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, NetflowError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, NetflowError> {
        let s = self.take(2, what)?;
        Ok(u16::from_be_bytes([s[0], s[1]]))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, NetflowError> {
        let s = self.take(4, what)?;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }
}

/// Unsigned big-endian integer of 1..=8 bytes (reduced-size encoding);
/// longer values keep their low 8 bytes.
fn uint(b: &[u8]) -> u64 {
    let b = if b.len() > 8 { &b[b.len() - 8..] } else { b };
    b.iter().fold(0u64, |acc, x| (acc << 8) | *x as u64)
}

fn ntp_to_unix_ns(v: u64) -> u64 {
    let secs = (v >> 32).saturating_sub(NTP_UNIX_OFFSET);
    let frac = ((v & 0xffff_ffff) * 1_000_000_000) >> 32;
    secs * 1_000_000_000 + frac
}

/// Times found in one data record, resolved after all fields are read.
#[derive(Default)]
struct RecordTimes {
    start_ms: Option<u64>,
    end_ms: Option<u64>,
    start_ns: Option<u64>,
    end_ns: Option<u64>,
    start_uptime: Option<u64>,
    end_uptime: Option<u64>,
    start_delta_us: Option<u64>,
    end_delta_us: Option<u64>,
    sys_init_ms: Option<u64>,
    icmp_explicit: bool,
    octets_delta: bool,
    packets_delta: bool,
    sampling: Option<u64>,
    /// samplingPacketInterval (305) and samplingPacketSpace (306): sample
    /// `interval` consecutive packets, skip `space` (RFC 5477).
    packet_interval: Option<u64>,
    packet_space: Option<u64>,
    /// samplingSize (309) and samplingPopulation (310): n out of N.
    sampling_size: Option<u64>,
    sampling_population: Option<u64>,
    /// samplingProbability (311): 1 in 1/p.
    sampling_probability: Option<f64>,
}

impl RecordTimes {
    /// The sampling rate (1 in N) this record states, if any. 305 and 306
    /// together give (interval + space) / interval (softflowd's `-s 4`
    /// sends interval 1, space 3); 305 alone is taken as the rate, as
    /// goflow2 does.
    fn sampling_rate(&self) -> Option<u64> {
        match (self.packet_interval, self.packet_space) {
            (Some(i), Some(s)) if i > 0 => Some(i.saturating_add(s) / i),
            (Some(i), None) => Some(i),
            _ => match (self.sampling_size, self.sampling_population) {
                _ if self.sampling.is_some() => self.sampling,
                (Some(n), Some(p)) if n > 0 => Some(p / n),
                _ => self
                    .sampling_probability
                    .filter(|p| *p > 0.0 && *p <= 1.0)
                    .map(|p| (1.0 / p).round() as u64),
            },
        }
    }
}

fn mac(b: &[u8]) -> u64 {
    uint(&b[..b.len().min(6)])
}

fn v4(b: &[u8]) -> Option<IpAddr> {
    (b.len() == 4).then(|| IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])))
}

fn v6(b: &[u8]) -> Option<IpAddr> {
    let a: [u8; 16] = b.try_into().ok()?;
    Some(IpAddr::V6(Ipv6Addr::from(a)))
}

/// Applies one IANA information element to a record.
fn apply(r: &mut FlowRecord, t: &mut RecordTimes, id: u16, v: &[u8]) {
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
            t.start_ns = Some(ntp_to_unix_ns(n()))
        }
        ie::FLOW_END_MICROSECONDS | ie::FLOW_END_NANOSECONDS => {
            t.end_ns = Some(ntp_to_unix_ns(n()))
        }
        ie::FLOW_START_DELTA_MICROSECONDS => t.start_delta_us = Some(n()),
        ie::FLOW_END_DELTA_MICROSECONDS => t.end_delta_us = Some(n()),
        ie::SYSTEM_INIT_TIME_MILLISECONDS => t.sys_init_ms = Some(n()),
        _ => {}
    }
}

impl NetflowDecoder {
    pub fn new(pending_ttl_ns: u64, pending_max_bytes: usize) -> NetflowDecoder {
        NetflowDecoder {
            templates: HashMap::new(),
            sampling: HashMap::new(),
            sys_init_ms: HashMap::new(),
            pending: VecDeque::new(),
            pending_bytes: 0,
            replayed: Vec::new(),
            pending_ttl_ns,
            pending_max_bytes,
            counters: DecoderCounters::default(),
        }
    }

    /// Number of templates (data and options) currently known.
    pub fn templates_known(&self) -> usize {
        self.templates.len()
    }

    /// Data sets waiting for their template.
    pub fn pending_sets(&self) -> usize {
        self.pending.len()
    }

    /// Decodes one NetFlow v5/v9 or IPFIX packet from `exporter`, appending
    /// flows to `out`. On error, flows decoded before the fault stay in `out`.
    /// `now_ns` is wall-clock time (for records and for expiring held data).
    pub fn decode(
        &mut self,
        exporter: IpAddr,
        packet: &[u8],
        now_ns: u64,
        out: &mut Vec<FlowRecord>,
    ) -> Result<(), NetflowError> {
        self.expire_pending(now_ns);
        let mut r = Reader::new(packet);
        let version = r.u16("version")?;
        let result = match version {
            5 => self.decode_v5(exporter, packet, now_ns, out),
            9 => self.decode_v9(exporter, &mut r, now_ns, out),
            10 => self.decode_ipfix(exporter, packet, now_ns, out),
            v => Err(NetflowError::Version(v)),
        };
        out.append(&mut self.replayed);
        result
    }

    fn decode_v5(
        &mut self,
        exporter: IpAddr,
        p: &[u8],
        now_ns: u64,
        out: &mut Vec<FlowRecord>,
    ) -> Result<(), NetflowError> {
        let mut r = Reader::new(p);
        r.take(2, "v5 header")?;
        let count = r.u16("v5 header")? as usize;
        let uptime = r.u32("v5 header")?;
        let secs = r.u32("v5 header")? as u64;
        let nsecs = r.u32("v5 header")? as u64;
        let sequence = r.u32("v5 header")?;
        r.take(2, "v5 header")?; // engine type, engine id
        let sampling = (r.u16("v5 header")? & 0x3fff) as u64;
        if count == 0 || count > 30 {
            return Err(NetflowError::Length("v5 record count must be 1..30"));
        }
        if r.left() < count * 48 {
            return Err(NetflowError::Truncated("v5 records"));
        }
        let export_ms = secs * 1000 + nsecs / 1_000_000;
        for _ in 0..count {
            let b = r.take(48, "v5 record")?;
            let mut f = FlowRecord {
                flow_type: FlowType::NetFlowV5,
                time_received_ns: now_ns,
                sequence_num: sequence,
                sampling_rate: sampling,
                sampler_address: Some(exporter),
                src_addr: v4(&b[0..4]).expect("4 bytes"),
                dst_addr: v4(&b[4..8]).expect("4 bytes"),
                in_if: uint(&b[12..14]) as u32,
                out_if: uint(&b[14..16]) as u32,
                packets: uint(&b[16..20]),
                bytes: uint(&b[20..24]),
                time_flow_start_ns: uptime_to_wall_ms(export_ms, uptime, uint(&b[24..28]) as u32)
                    * 1_000_000,
                time_flow_end_ns: uptime_to_wall_ms(export_ms, uptime, uint(&b[28..32]) as u32)
                    * 1_000_000,
                src_port: uint(&b[32..34]) as u16,
                dst_port: uint(&b[34..36]) as u16,
                tcp_flags: b[37],
                proto: b[38],
                ip_tos: b[39],
                src_as: uint(&b[40..42]) as u32,
                dst_as: uint(&b[42..44]) as u32,
                etype: ETYPE_IPV4,
                ..FlowRecord::default()
            };
            icmp_from_port(&mut f, false);
            out.push(f);
        }
        Ok(())
    }

    fn decode_v9(
        &mut self,
        exporter: IpAddr,
        r: &mut Reader<'_>,
        now_ns: u64,
        out: &mut Vec<FlowRecord>,
    ) -> Result<(), NetflowError> {
        let _count = r.u16("v9 header")?;
        let uptime = r.u32("v9 header")?;
        let secs = r.u32("v9 header")? as u64;
        let sequence = r.u32("v9 header")?;
        let domain = r.u32("v9 header")?;
        let h = Header {
            version: 9,
            exporter,
            domain,
            sequence,
            export_ms: secs * 1000,
            uptime_ms: uptime,
            time_received_ns: now_ns,
        };
        while r.left() >= 4 {
            let id = r.u16("flowset header")?;
            let len = r.u16("flowset header")? as usize;
            if len < 4 {
                return Err(NetflowError::Length("flowset shorter than its header"));
            }
            let body = r.take(len - 4, "flowset")?;
            match id {
                0 => self.v9_templates(&h, body)?,
                1 => self.v9_options_templates(&h, body)?,
                2..=255 => {} // reserved
                id => self.data_set(&h, id, body, out)?,
            }
        }
        Ok(())
    }

    fn decode_ipfix(
        &mut self,
        exporter: IpAddr,
        p: &[u8],
        now_ns: u64,
        out: &mut Vec<FlowRecord>,
    ) -> Result<(), NetflowError> {
        let mut r = Reader::new(p);
        r.take(2, "IPFIX header")?;
        let len = r.u16("IPFIX header")? as usize;
        if len > p.len() {
            return Err(NetflowError::Truncated("IPFIX message"));
        }
        if len < 16 {
            return Err(NetflowError::Length(
                "IPFIX message shorter than its header",
            ));
        }
        let mut r = Reader::new(&p[..len]);
        r.take(4, "IPFIX header")?;
        let secs = r.u32("IPFIX header")? as u64;
        let sequence = r.u32("IPFIX header")?;
        let domain = r.u32("IPFIX header")?;
        let h = Header {
            version: 10,
            exporter,
            domain,
            sequence,
            export_ms: secs * 1000,
            uptime_ms: 0,
            time_received_ns: now_ns,
        };
        while r.left() > 0 {
            let id = r.u16("set header")?;
            let len = r.u16("set header")? as usize;
            if len < 4 {
                return Err(NetflowError::Length("set shorter than its header"));
            }
            let body = r.take(len - 4, "set")?;
            match id {
                2 => self.ipfix_templates(&h, body, false)?,
                3 => self.ipfix_templates(&h, body, true)?,
                4..=255 => {}
                id => self.data_set(&h, id, body, out)?,
                // 0 and 1 are NetFlow v9 ids, not valid in IPFIX.
            }
        }
        Ok(())
    }

    fn key(h: &Header, id: u16) -> TemplateKey {
        TemplateKey {
            exporter: h.exporter,
            version: h.version,
            domain: h.domain,
            id,
        }
    }

    fn learn(&mut self, h: &Header, id: u16, fields: Vec<Field>, options: bool) {
        let min_len = fields
            .iter()
            .map(|f| if f.len == VARLEN { 1 } else { f.len as usize })
            .sum();
        let key = Self::key(h, id);
        self.templates.insert(
            key,
            Arc::new(Template {
                fields,
                options,
                min_len,
            }),
        );
    }

    fn v9_templates(&mut self, h: &Header, body: &[u8]) -> Result<(), NetflowError> {
        let mut r = Reader::new(body);
        while r.left() >= 4 {
            let id = r.u16("template")?;
            let count = r.u16("template")? as usize;
            if id < 256 {
                return Err(NetflowError::Template("template id below 256"));
            }
            let mut fields = Vec::with_capacity(count);
            for _ in 0..count {
                let fid = r.u16("template field")?;
                let len = r.u16("template field")?;
                fields.push(Field {
                    id: fid,
                    pen: 0,
                    len,
                });
            }
            if fields.is_empty() || fields.iter().any(|f| f.len == 0 || f.len == VARLEN) {
                return Err(NetflowError::Template(
                    "v9 fields need a fixed, non-zero length",
                ));
            }
            self.learn(h, id, fields, false);
            self.replay(h, id);
        }
        Ok(())
    }

    fn v9_options_templates(&mut self, h: &Header, body: &[u8]) -> Result<(), NetflowError> {
        let mut r = Reader::new(body);
        while r.left() >= 6 {
            let id = r.u16("options template")?;
            let scope_len = r.u16("options template")? as usize;
            let opt_len = r.u16("options template")? as usize;
            if id < 256 || !scope_len.is_multiple_of(4) || !opt_len.is_multiple_of(4) {
                return Err(NetflowError::Template("bad v9 options template header"));
            }
            let mut fields = Vec::new();
            for _ in 0..(scope_len + opt_len) / 4 {
                let fid = r.u16("options template field")?;
                let len = r.u16("options template field")?;
                if len == 0 {
                    return Err(NetflowError::Template("zero-length options field"));
                }
                fields.push(Field {
                    id: fid,
                    pen: 0,
                    len,
                });
            }
            if fields.is_empty() {
                return Err(NetflowError::Template("options template without fields"));
            }
            self.learn(h, id, fields, true);
            self.replay(h, id);
        }
        Ok(())
    }

    fn ipfix_templates(
        &mut self,
        h: &Header,
        body: &[u8],
        options: bool,
    ) -> Result<(), NetflowError> {
        let mut r = Reader::new(body);
        // A withdrawal is 4 bytes (id, count 0) in either set; anything
        // shorter is padding.
        while r.left() >= 4 {
            let id = r.u16("template")?;
            let count = r.u16("template")? as usize;
            if count == 0 {
                // Withdrawal: one template, or all of this kind (id 2 / 3).
                if id == 2 || id == 3 {
                    let (exp, dom) = (h.exporter, h.domain);
                    let want_options = id == 3;
                    self.templates.retain(|k, t| {
                        !(k.exporter == exp
                            && k.domain == dom
                            && k.version == 10
                            && t.options == want_options)
                    });
                } else {
                    self.templates.remove(&Self::key(h, id));
                }
                continue;
            }
            if options {
                let scope = r.u16("options template")? as usize;
                if scope == 0 || scope > count {
                    return Err(NetflowError::Template("bad scope field count"));
                }
            }
            if id < 256 {
                return Err(NetflowError::Template("template id below 256"));
            }
            let mut fields = Vec::with_capacity(count);
            for _ in 0..count {
                let raw = r.u16("template field")?;
                let len = r.u16("template field")?;
                let pen = if raw & 0x8000 != 0 {
                    r.u32("enterprise number")?
                } else {
                    0
                };
                if len == 0 {
                    return Err(NetflowError::Template("zero-length field"));
                }
                fields.push(Field {
                    id: raw & 0x7fff,
                    pen,
                    len,
                });
            }
            self.learn(h, id, fields, options);
            self.replay(h, id);
        }
        Ok(())
    }

    /// Decodes held data sets for the template just learned. Their flows go
    /// to the replay buffer, collected by the caller of `decode`.
    fn replay(&mut self, h: &Header, id: u16) {
        let key = Self::key(h, id);
        if !self.pending.iter().any(|p| p.key == key) {
            return;
        }
        let mut keep = VecDeque::with_capacity(self.pending.len());
        let mut ready = Vec::new();
        for p in self.pending.drain(..) {
            if p.key == key {
                self.pending_bytes -= p.data.len();
                ready.push(p);
            } else {
                keep.push_back(p);
            }
        }
        self.pending = keep;
        for p in ready {
            let mut flows = Vec::new();
            if self.data_set(&p.header, id, &p.data, &mut flows).is_ok() {
                self.counters.pending_decoded += 1;
            }
            self.replayed.extend(flows);
        }
    }

    fn expire_pending(&mut self, now_ns: u64) {
        while let Some(p) = self.pending.front() {
            if now_ns.saturating_sub(p.since_ns) < self.pending_ttl_ns {
                break;
            }
            self.pending_bytes -= p.data.len();
            self.pending.pop_front();
            self.counters.pending_expired += 1;
        }
    }

    fn hold(&mut self, h: &Header, id: u16, data: &[u8]) {
        while self.pending_bytes + data.len() > self.pending_max_bytes {
            match self.pending.pop_front() {
                Some(p) => {
                    self.pending_bytes -= p.data.len();
                    self.counters.pending_expired += 1;
                }
                None => {
                    // Larger than the whole holding area.
                    self.counters.pending_expired += 1;
                    return;
                }
            }
        }
        self.pending_bytes += data.len();
        self.counters.pending_held += 1;
        self.pending.push_back(Pending {
            key: Self::key(h, id),
            header: *h,
            data: data.to_vec(),
            since_ns: h.time_received_ns,
        });
    }

    fn data_set(
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
            self.finish(h, &mut rec, &times);
            out.push(rec);
        }
        Ok(())
    }

    /// Resolves times, sampling, address family and ICMP for one record.
    fn finish(&self, h: &Header, rec: &mut FlowRecord, t: &RecordTimes) {
        // Saturating: times are 64-bit wire values; nonsense stays nonsense
        // but never overflows.
        let ms = |v: u64| v.saturating_mul(1_000_000);
        let init = t
            .sys_init_ms
            .or_else(|| self.sys_init_ms.get(&(h.exporter, h.domain)).copied());
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
        rec.time_flow_start_ns = t
            .start_ns
            .or(t.start_ms.map(ms))
            .or(t.start_uptime.and_then(from_uptime).map(ms))
            .or(t
                .start_delta_us
                .map(|d| export_us.saturating_sub(d).saturating_mul(1000)))
            .unwrap_or(ms(h.export_ms));
        rec.time_flow_end_ns = t
            .end_ns
            .or(t.end_ms.map(ms))
            .or(t.end_uptime.and_then(from_uptime).map(ms))
            .or(t
                .end_delta_us
                .map(|d| export_us.saturating_sub(d).saturating_mul(1000)))
            .unwrap_or(rec.time_flow_start_ns);
        rec.sampling_rate = t
            .sampling_rate()
            .or_else(|| {
                self.sampling
                    .get(&(h.exporter, h.version, h.domain))
                    .copied()
            })
            .unwrap_or(0);
        if rec.etype == 0 {
            rec.etype = if rec.src_addr.is_ipv6() {
                ETYPE_IPV6
            } else {
                ETYPE_IPV4
            };
        }
        icmp_from_port(rec, t.icmp_explicit);
    }
}

/// ICMP flows: NetFlow exporters often put `type << 8 | code` in the
/// destination port. Records carry ICMP in icmp_type/icmp_code, ports 0, as
/// the agent's records do.
fn icmp_from_port(r: &mut FlowRecord, explicit: bool) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::export::{ExportProtocol, ExportStream};

    const NOW: u64 = 1_763_800_000_000_000_000;

    fn exporter() -> IpAddr {
        "192.0.2.99".parse().unwrap()
    }

    fn sample(i: u32, v6: bool) -> FlowRecord {
        let icmp = i.is_multiple_of(3);
        FlowRecord {
            flow_type: FlowType::Ebpf,
            time_flow_start_ns: 1_763_799_990_123_000_000,
            time_flow_end_ns: 1_763_799_995_456_000_000,
            bytes: 10_000 + i as u64,
            packets: 10 + i as u64,
            src_addr: if v6 {
                "2001:db8::a".parse().unwrap()
            } else {
                "10.1.2.3".parse().unwrap()
            },
            dst_addr: if v6 {
                "2001:db8::b".parse().unwrap()
            } else {
                "10.4.5.6".parse().unwrap()
            },
            etype: if v6 { ETYPE_IPV6 } else { ETYPE_IPV4 },
            proto: if icmp { 1 } else { 17 },
            src_port: if icmp { 0 } else { 1000 + i as u16 },
            dst_port: if icmp { 0 } else { 53 },
            icmp_type: if icmp { 8 } else { 0 },
            in_if: 4,
            out_if: 0,
            vlan_id: 12,
            tcp_flags: 0,
            flow_direction: 0,
            ..FlowRecord::default()
        }
    }

    /// What decoding gives back for a record our exporter sent.
    fn expected(r: &FlowRecord, ty: FlowType, seq: u32) -> FlowRecord {
        FlowRecord {
            flow_type: ty,
            time_received_ns: NOW,
            sequence_num: seq,
            sampler_address: Some(exporter()),
            observation_domain_id: 7,
            ..r.clone()
        }
    }

    /// With sampling, our exporter's options template and data give the
    /// decoder the rate (IPFIX: from samplingInterval; also from
    /// samplingSize/samplingPopulation or samplingProbability alone; v9:
    /// SAMPLING_INTERVAL), and
    /// IPFIX sequence numbers count the options record.
    #[test]
    fn sampling_options_from_our_exporter_give_the_rate() {
        for proto in [ExportProtocol::Ipfix, ExportProtocol::NetflowV9] {
            let mut s = ExportStream::new(proto, 7, 600, 60_000, 100, 1_763_799_000_000)
                .unwrap()
                .with_sampling(10)
                .unwrap();
            let recs: Vec<_> = (0..12).map(|i| sample(i, i % 2 == 1)).collect();
            let pkts = s.encode(&recs, 1_763_800_000_000);
            assert!(pkts.len() > 1);
            let mut d = NetflowDecoder::default();
            let mut out = Vec::new();
            let mut first_packet = 0;
            for (i, p) in pkts.iter().enumerate() {
                d.decode(exporter(), p, NOW, &mut out).unwrap();
                if i == 0 {
                    first_packet = out.len() as u32;
                }
            }
            assert_eq!(out.len(), 12, "{proto:?}");
            assert!(out.iter().all(|r| r.sampling_rate == 10), "{proto:?}");
            if proto == ExportProtocol::Ipfix {
                let seq = u32::from_be_bytes(pkts[1][8..12].try_into().unwrap());
                assert_eq!(
                    seq,
                    first_packet + 1,
                    "data records plus the options record"
                );
            }
        }
        let t = RecordTimes {
            sampling_size: Some(1),
            sampling_population: Some(64),
            ..Default::default()
        };
        assert_eq!(t.sampling_rate(), Some(64));
        let t = RecordTimes {
            sampling_probability: Some(0.01),
            ..Default::default()
        };
        assert_eq!(t.sampling_rate(), Some(100));
    }

    #[test]
    fn ipfix_and_v9_round_trip_with_our_exporter() {
        for (proto, ty) in [
            (ExportProtocol::Ipfix, FlowType::Ipfix),
            (ExportProtocol::NetflowV9, FlowType::NetFlowV9),
        ] {
            let boot = 1_763_799_000_000;
            let mut s = ExportStream::new(proto, 7, 600, 60_000, 100, boot).unwrap();
            let recs: Vec<_> = (0..12).map(|i| sample(i, i % 2 == 1)).collect();
            let pkts = s.encode(&recs, 1_763_800_000_000);
            assert!(pkts.len() > 1);
            let mut d = NetflowDecoder::default();
            let mut out = Vec::new();
            let mut seqs = Vec::new();
            for p in &pkts {
                let before = out.len();
                d.decode(exporter(), p, NOW, &mut out).unwrap();
                seqs.extend(std::iter::repeat_n(
                    u32::from_be_bytes(
                        p[if proto == ExportProtocol::Ipfix {
                            8
                        } else {
                            12
                        }..][..4]
                            .try_into()
                            .unwrap(),
                    ),
                    out.len() - before,
                ));
            }
            assert_eq!(out.len(), 12, "{proto:?}");
            for (i, (got, want)) in out.iter().zip(&recs).enumerate() {
                assert_eq!(got, &expected(want, ty, seqs[i]), "{proto:?} record {i}");
            }
            assert_eq!(d.templates_known(), 2);
        }
    }

    #[test]
    fn data_before_template_is_held_then_decoded() {
        let mut s = ExportStream::new(ExportProtocol::Ipfix, 7, 1400, 60_000, 100, 0).unwrap();
        let first = s.encode(&[sample(1, false)], 1_763_800_000_000).remove(0);
        let second = s.encode(&[sample(2, false)], 1_763_800_000_000).remove(0);
        let mut d = NetflowDecoder::default();
        let mut out = Vec::new();
        // The second packet has no template: held.
        d.decode(exporter(), &second, NOW, &mut out).unwrap();
        assert!(out.is_empty());
        assert_eq!(d.pending_sets(), 1);
        // The first brings the template: both records come out.
        d.decode(exporter(), &first, NOW, &mut out).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(d.counters.pending_decoded, 1);
        assert_eq!(d.pending_sets(), 0);
        // Held data expires after the TTL.
        let mut d = NetflowDecoder::new(1_000, 1 << 20);
        d.decode(exporter(), &second, NOW, &mut out).unwrap();
        d.decode(
            exporter(),
            &[0, 10, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7],
            NOW + 2_000,
            &mut out,
        )
        .unwrap();
        assert_eq!((d.pending_sets(), d.counters.pending_expired), (0, 1));
    }

    #[test]
    fn templates_are_per_exporter_and_domain() {
        let mut s = ExportStream::new(ExportProtocol::Ipfix, 7, 1400, 60_000, 100, 0).unwrap();
        let first = s.encode(&[sample(1, false)], 1_763_800_000_000).remove(0);
        let second = s.encode(&[sample(2, false)], 1_763_800_000_000).remove(0);
        let mut d = NetflowDecoder::default();
        let mut out = Vec::new();
        d.decode(exporter(), &first, NOW, &mut out).unwrap();
        // Same data from another exporter: unknown template there.
        d.decode("192.0.2.100".parse().unwrap(), &second, NOW, &mut out)
            .unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(d.pending_sets(), 1);
    }

    fn be(v: &[u32], widths: &[usize]) -> Vec<u8> {
        let mut b = Vec::new();
        for (x, w) in v.iter().zip(widths) {
            b.extend_from_slice(&x.to_be_bytes()[4 - w..]);
        }
        b
    }

    fn ipfix_msg(domain: u32, sets: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = sets.concat();
        let mut m = be(
            &[10, 16 + body.len() as u32, 1_763_800_000, 0, domain],
            &[2, 2, 4, 4, 4],
        );
        m.extend_from_slice(&body);
        m
    }

    fn set(id: u16, body: &[u8]) -> Vec<u8> {
        let mut s = be(&[id as u32, 4 + body.len() as u32], &[2, 2]);
        s.extend_from_slice(body);
        s
    }

    #[test]
    fn ipfix_options_sampling_varlen_enterprise_and_withdrawal() {
        let mut d = NetflowDecoder::default();
        let mut out = Vec::new();
        // Options template 300: scope observationDomainId(149,4), samplingInterval(34,4).
        let opt_t = set(3, &be(&[300, 2, 1, 149, 4, 34, 4], &[2, 2, 2, 2, 2, 2, 2]));
        let opt_d = set(300, &be(&[5, 100], &[4, 4]));
        // Template 400: src v4 (8), enterprise field (pen 9, id 1, varlen),
        // octetDeltaCount (1, 4 bytes: reduced size), packetDeltaCount (2, 2),
        // applicationName (96, varlen), flowStartSeconds (150, 4).
        let mut t = be(&[400, 6, 8, 4], &[2, 2, 2, 2]);
        t.extend(be(&[0x8001, 0xffff, 9], &[2, 2, 4]));
        t.extend(be(
            &[1, 4, 2, 2, 96, 0xffff, 150, 4],
            &[2, 2, 2, 2, 2, 2, 2, 2],
        ));
        let tmpl = set(2, &t);
        // One record: 10.0.0.9, enterprise value of 3 bytes, 5000 bytes, 7
        // packets, app name of 300 bytes (3-byte length form), start time.
        let mut rec = vec![10, 0, 0, 9, 3, 0xaa, 0xbb, 0xcc];
        rec.extend(be(&[5000, 7], &[4, 2]));
        rec.extend([255, 0x01, 0x2c]);
        rec.extend(vec![b'x'; 300]);
        rec.extend(be(&[1_763_799_900], &[4]));
        let data = set(400, &rec);
        d.decode(
            exporter(),
            &ipfix_msg(5, &[opt_t, opt_d, tmpl, data]),
            NOW,
            &mut out,
        )
        .unwrap();
        assert_eq!(out.len(), 1);
        let f = &out[0];
        assert_eq!(f.src_addr.to_string(), "10.0.0.9");
        assert_eq!((f.bytes, f.packets), (5000, 7));
        assert_eq!(f.sampling_rate, 100, "from the options data");
        assert_eq!(f.time_flow_start_ns, 1_763_799_900_000_000_000);
        assert_eq!(f.observation_domain_id, 5);
        assert_eq!(d.templates_known(), 2);
        // Withdraw template 400; its data is then held, not decoded.
        d.decode(
            exporter(),
            &ipfix_msg(5, &[set(2, &be(&[400, 0], &[2, 2]))]),
            NOW,
            &mut out,
        )
        .unwrap();
        assert_eq!(d.templates_known(), 1);
        d.decode(exporter(), &ipfix_msg(5, &[set(400, &rec)]), NOW, &mut out)
            .unwrap();
        assert_eq!((out.len(), d.pending_sets()), (1, 1));
        // Withdraw all options templates.
        d.decode(
            exporter(),
            &ipfix_msg(5, &[set(3, &be(&[3, 0], &[2, 2]))]),
            NOW,
            &mut out,
        )
        .unwrap();
        assert_eq!(d.templates_known(), 0);
    }

    #[test]
    fn uptime_relative_times_survive_the_32_bit_wrap() {
        let export = 1_763_800_000_000u64;
        // Ordinary: 5 s before the header's uptime.
        assert_eq!(uptime_to_wall_ms(export, 60_000, 55_000), export - 5_000);
        // The flow started before sysUptime wrapped: 3 s before the wrap,
        // the header 2 s after it.
        assert_eq!(
            uptime_to_wall_ms(export, 2_000, u32::MAX - 2_999),
            export - 5_000
        );
        // Stamped a little after the header's uptime (softflowd reading a
        // pcap file does this): just after the export time, not 49.7 days.
        assert_eq!(uptime_to_wall_ms(export, 1_000, 1_250), export + 250);
        // IPFIX, relative to systemInitTimeMilliseconds.
        let init = export - 10_000;
        assert_eq!(sysuptime_to_wall_ms(export, init, 9_000), export - 1_000);
        // Flows stamped before the init time arrive as 2^32 - d.
        assert_eq!(
            sysuptime_to_wall_ms(export, init, (1u64 << 32) - 500),
            init - 500
        );
        // After the counter wrapped (init 50 days back).
        let init = export - 50 * 86_400_000;
        let t = (50 * 86_400_000 - 1_000) % (1u64 << 32);
        assert_eq!(sysuptime_to_wall_ms(export, init, t), export - 1_000);
    }

    /// 64-bit time and sampling fields at their maximum (found by the
    /// netflow fuzz target as an arithmetic overflow): saturate, no panic.
    #[test]
    fn extreme_time_and_sampling_fields_saturate() {
        let templates: [(u16, &[u16]); 3] = [
            (256, &[160, 22, 21, 305, 306]),
            (257, &[151, 158]),
            (258, &[152, 153]),
        ];
        let mut p = vec![0, 10, 0, 0];
        p.extend(1_763_800_000u32.to_be_bytes());
        p.extend([0, 0, 0, 1, 0, 0, 0, 7]);
        for (id, fields) in templates {
            p.extend(2u16.to_be_bytes());
            p.extend((8 + 4 * (2 + fields.len()) as u16).to_be_bytes());
            p.extend(id.to_be_bytes());
            p.extend((2 + fields.len() as u16).to_be_bytes());
            for f in [8u16, 12].iter().chain(fields) {
                p.extend(f.to_be_bytes());
                p.extend((if *f == 8 || *f == 12 { 4u16 } else { 8 }).to_be_bytes());
            }
        }
        for (id, fields) in templates {
            p.extend(id.to_be_bytes());
            p.extend((4 + 8 + 8 * fields.len() as u16).to_be_bytes());
            p.extend([10, 0, 0, 1, 10, 0, 0, 2]);
            p.extend(std::iter::repeat_n(0xff, 8 * fields.len()));
        }
        let len = p.len() as u16;
        p[2..4].copy_from_slice(&len.to_be_bytes());
        let mut d = NetflowDecoder::default();
        let mut out = Vec::new();
        d.decode(exporter(), &p, NOW, &mut out).unwrap();
        let got: Vec<_> = out
            .iter()
            .map(|r| (r.time_flow_start_ns, r.time_flow_end_ns, r.sampling_rate))
            .collect();
        assert_eq!(
            got,
            [
                (u64::MAX, u64::MAX, 1),
                (0, u64::MAX, 0),
                (u64::MAX, u64::MAX, 0)
            ]
        );
    }

    #[test]
    fn packet_interval_and_space_give_the_sampling_rate() {
        // softflowd -s 4 (IPFIX): interval 1, space 3.
        let t = RecordTimes {
            packet_interval: Some(1),
            packet_space: Some(3),
            ..RecordTimes::default()
        };
        assert_eq!(t.sampling_rate(), Some(4));
        let t = RecordTimes {
            packet_interval: Some(2),
            packet_space: Some(6),
            ..RecordTimes::default()
        };
        assert_eq!(t.sampling_rate(), Some(4));
        // 305 alone is the rate (goflow2's reading); 34 as before.
        let t = RecordTimes {
            packet_interval: Some(100),
            ..RecordTimes::default()
        };
        assert_eq!(t.sampling_rate(), Some(100));
        let t = RecordTimes {
            sampling: Some(512),
            ..RecordTimes::default()
        };
        assert_eq!(t.sampling_rate(), Some(512));
        assert_eq!(RecordTimes::default().sampling_rate(), None);
    }

    #[test]
    fn v5_header_times_and_icmp() {
        let mut p = be(
            &[5, 2, 60_000, 1_763_800_000, 500_000_000, 42],
            &[2, 2, 4, 4, 4, 4],
        );
        p.extend([0, 0, 0x40, 0x0a]); // engine, sampling mode 1 interval 10
        for (proto, dport) in [(6u8, 443u16), (1, 0x0800)] {
            let mut r = vec![10, 0, 0, 1, 10, 0, 0, 2, 0, 0, 0, 0];
            r.extend(be(
                &[3, 4, 5, 700, 50_000, 59_000, 1234, dport as u32],
                &[2, 2, 4, 4, 4, 4, 2, 2],
            ));
            r.extend([0, 0x12, proto, 0x10]);
            r.extend(be(&[64512, 64513], &[2, 2]));
            r.extend([24, 16, 0, 0]);
            p.extend(r);
        }
        let mut d = NetflowDecoder::default();
        let mut out = Vec::new();
        d.decode(exporter(), &p, NOW, &mut out).unwrap();
        assert_eq!(out.len(), 2);
        let (tcp, icmp) = (&out[0], &out[1]);
        assert_eq!(tcp.flow_type, FlowType::NetFlowV5);
        assert_eq!(
            (tcp.packets, tcp.bytes, tcp.in_if, tcp.out_if),
            (5, 700, 3, 4)
        );
        assert_eq!(
            (tcp.src_port, tcp.dst_port, tcp.tcp_flags, tcp.ip_tos),
            (1234, 443, 0x12, 0x10)
        );
        assert_eq!(
            (tcp.src_as, tcp.dst_as, tcp.sampling_rate, tcp.sequence_num),
            (64512, 64513, 10, 42)
        );
        // boot = export (1_763_800_000_500 ms) - uptime 60_000 ms.
        assert_eq!(
            tcp.time_flow_start_ns,
            (1_763_800_000_500 - 60_000 + 50_000) * 1_000_000
        );
        assert_eq!(
            tcp.time_flow_end_ns,
            (1_763_800_000_500 - 60_000 + 59_000) * 1_000_000
        );
        assert_eq!(
            (icmp.icmp_type, icmp.icmp_code, icmp.src_port, icmp.dst_port),
            (8, 0, 0, 0)
        );
    }

    #[test]
    fn malformed_packets_are_errors_with_reasons() {
        let mut d = NetflowDecoder::default();
        let mut out = Vec::new();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![], "truncated"),
            (vec![0, 7, 0, 0], "version"),
            (be(&[5, 1, 0, 0, 0, 0], &[2, 2, 4, 4, 4, 4]), "truncated"),
            (
                be(&[5, 31, 0, 0, 0, 0, 0], &[2, 2, 4, 4, 4, 4, 4]),
                "length",
            ),
            (be(&[10, 200, 0, 0, 0], &[2, 2, 4, 4, 4]), "truncated"),
            (ipfix_msg(1, &[be(&[2, 2], &[2, 2])]), "length"),
            (
                ipfix_msg(1, &[set(2, &be(&[256, 1, 8, 0], &[2, 2, 2, 2]))]),
                "template",
            ),
            (
                ipfix_msg(1, &[set(2, &be(&[12, 1, 8, 4], &[2, 2, 2, 2]))]),
                "template",
            ),
            (
                ipfix_msg(1, &[set(2, &be(&[256, 2, 8, 4], &[2, 2, 2, 2]))]),
                "truncated",
            ),
            (
                be(&[9, 1, 0, 0, 0, 0, 0, 3], &[2, 2, 4, 4, 4, 4, 2, 2]),
                "length",
            ),
        ];
        for (p, reason) in cases {
            let e = d.decode(exporter(), &p, NOW, &mut out).unwrap_err();
            assert_eq!(e.reason(), reason, "{p:?}: {e}");
        }
        assert!(out.is_empty());
    }
}
