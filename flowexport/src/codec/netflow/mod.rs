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
use super::reader::{Reader, Truncated};
use fields::{icmp_from_port, uint, v4};
use time::{ntp_to_unix_ns, sysuptime_to_wall_ms, uptime_to_wall_ms};

use crate::record::{FlowRecord, FlowType, TunnelType, ETYPE_IPV4, ETYPE_IPV6};

pub mod encode;
mod fields;
mod ipfix;
mod templates;
#[cfg(test)]
mod tests;
mod time;
mod v5;
mod v9;

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

impl From<Truncated> for NetflowError {
    fn from(t: Truncated) -> Self {
        NetflowError::Truncated(t.0)
    }
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

impl Field {
    /// One field specifier of a template: its id and length, and in IPFIX
    /// (`enterprise`) the enterprise number that follows when the id's top
    /// bit is set.
    fn read(r: &mut Reader<'_>, what: &'static str, enterprise: bool) -> Result<Field> {
        let raw = r.u16(what)?;
        let len = r.u16(what)?;
        Ok(if enterprise && raw & 0x8000 != 0 {
            Field {
                id: raw & 0x7fff,
                pen: r.u32("enterprise number")?,
                len,
            }
        } else {
            Field {
                id: raw,
                pen: 0,
                len,
            }
        })
    }
}

#[derive(Debug)]
struct Template {
    /// Options templates carry exporter settings (sampling), not flows.
    options: bool,
    /// Smallest record: fixed lengths plus one byte per variable field.
    min_len: usize,
    /// The fields, and where records of this template hold what the
    /// decoder reads.
    layout: fields::Layout,
}

/// A decapsulated flow's layer2SegmentId (RFC 7133; the exporter writes
/// it): VXLAN and GENEVE VNIs as type 0x01 (VXLAN; GENEVE's VNI has the
/// same form), GRE keys as 0x02 (NVGRE's); 0 for flows without a segment
/// (no tunnel, ERSPAN, IP-in-IP).
pub(crate) fn layer2_segment_id(r: &FlowRecord) -> u64 {
    match r.tunnel_type {
        Some(TunnelType::Vxlan | TunnelType::Geneve) => {
            1 << 56 | u64::from(r.tunnel_id & 0xff_ffff)
        }
        Some(TunnelType::Gre) => 2 << 56 | u64::from(r.tunnel_id),
        _ => 0,
    }
}

/// What a layer2SegmentId says (the decoder reads it): the encapsulation
/// in the top octet, the id below.
fn segment_tunnel(v: u64) -> (Option<TunnelType>, u32) {
    match v >> 56 {
        1 => (Some(TunnelType::Vxlan), (v & 0xff_ffff) as u32),
        2 => (Some(TunnelType::Gre), v as u32),
        _ => (None, 0),
    }
}

/// What the version decoders return.
type Result<T, E = NetflowError> = std::result::Result<T, E>;

/// One packet as it arrived: from whom, its bytes (from the version field
/// on), when (wall clock).
#[derive(Clone, Copy)]
struct Datagram<'a> {
    exporter: IpAddr,
    bytes: &'a [u8],
    now_ns: u64,
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

impl Header {
    /// Reads what v9 and IPFIX headers end with, in this order: the export
    /// time (s), the sequence number and the source id / observation domain.
    fn read_tail(
        r: &mut Reader<'_>,
        what: &'static str,
        version: u16,
        exporter: IpAddr,
        uptime_ms: u32,
        now_ns: u64,
    ) -> Result<Header, NetflowError> {
        let secs = u64::from(r.u32(what)?);
        let sequence = r.u32(what)?;
        let domain = r.u32(what)?;
        Ok(Header {
            version,
            exporter,
            domain,
            sequence,
            export_ms: secs * 1000,
            uptime_ms,
            time_received_ns: now_ns,
        })
    }
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

/// What a set is called in a version's errors.
struct SetNames {
    header: &'static str,
    short: &'static str,
    body: &'static str,
}

const V9_FLOWSET: SetNames = SetNames {
    header: "flowset header",
    short: "flowset shorter than its header",
    body: "flowset",
};

const IPFIX_SET: SetNames = SetNames {
    header: "set header",
    short: "set shorter than its header",
    body: "set",
};

/// The next NetFlow v9 FlowSet or IPFIX Set (the same 4-byte header: id,
/// length including the header): its id and its body.
fn next_set<'a>(r: &mut Reader<'a>, names: &SetNames) -> Result<(u16, &'a [u8])> {
    let id = r.u16(names.header)?;
    let len = r.u16(names.header)? as usize;
    if len < 4 {
        return Err(NetflowError::Length(names.short));
    }
    Ok((id, r.take(len - 4, names.body)?))
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
        let d = Datagram {
            exporter,
            bytes: packet,
            now_ns,
        };
        let result = match Reader::new(packet).u16("version")? {
            5 => self.decode_v5(d, out),
            9 => self.decode_v9(d, out),
            10 => self.decode_ipfix(d, out),
            v => Err(NetflowError::Version(v)),
        };
        out.append(&mut self.replayed);
        result
    }
}
