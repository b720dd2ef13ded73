//! `flowexport dashboard`: flows from Kafka into Prometheus counters, and a
//! drop-in for neptune-networks/flow-exporter.
//!
//! Pipeline: message bytes → [`decode`] (our protobuf, our JSON, or
//! pmacct's JSON) → [`DashFlow`] → [`Dashboard::add`] (counters). Decoding
//! and aggregation are pure over their inputs; the Kafka loop is [`run`].
//!
//! Cardinality is bounded by construction: `proto` and `app` come from
//! fixed tables (everything else is `other`), `direction` and `ip_version`
//! have three values each, and `cid` and `host` take at most
//! `--max-customers` / `--max-hosts` distinct values (later ones are
//! counted under `other`). The flow-exporter series are per AS pair and
//! host, as in flow-exporter, capped by `--max-as-pairs`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use prometheus::{IntCounter, IntCounterVec, Registry};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use serde::Deserialize;

use crate::enrich::files::{self, FileError};
use crate::record::{FlowRecord, ETYPE_IPV4, ETYPE_IPV6};
use crate::sink::kafka::{parse_property, topic_partitions, RateLimitedLog};

/// Message format on the topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum InputFormat {
    /// goflow2 FlowMessage (proto/flow.proto), as collect/agent/enrich write.
    Protobuf,
    /// flowexport's JSON records (`--kafka-format json`).
    Json,
    /// pmacct's JSON (print/kafka plugins): `label`, `as_src`, `as_dst`,
    /// `bytes`, and when present `packets`, `ip_src`, `ip_dst`, `ip_proto`,
    /// `port_src`, `port_dst`, `sampling_rate`.
    PmacctJson,
}

/// Where reading starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DashStart {
    /// The oldest message of every partition.
    Earliest,
    /// Only new messages (flow-exporter's behaviour).
    Latest,
    /// The consumer group's committed offsets (latest when none); offsets
    /// are committed as messages are counted.
    Committed,
}

/// `host:port` or `:port` (all addresses), as flow-exporter listens.
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let full = if s.starts_with(':') {
        format!("0.0.0.0{s}")
    } else {
        s.to_string()
    };
    full.parse()
        .map_err(|_| format!("{s:?} is not ADDR:PORT or :PORT"))
}

#[derive(Args, Debug, Clone)]
pub struct DashboardArgs {
    /// Kafka bootstrap brokers (`--broker` as in flow-exporter).
    #[arg(long, alias = "broker", value_name = "HOST:PORT[,HOST:PORT]")]
    pub kafka_brokers: String,
    /// Topic to read flows from.
    #[arg(long, value_name = "TOPIC")]
    pub topic: String,
    /// Message format. [default: pmacct-json with --asn, else protobuf]
    #[arg(long, value_enum)]
    pub format: Option<InputFormat>,
    /// The AS being monitored (flow-exporter): flows with as_src == ASN count
    /// in flow_transmit_bytes_total, as_dst == ASN in flow_receive_bytes_total.
    #[arg(long, value_name = "ASN")]
    pub asn: Option<u32>,
    /// AS names as in CIDR-Report's asn.txt (`ASN<whitespace>NAME, CC` per
    /// line), for the *_as_name labels. Read at start; no network look-up.
    #[arg(long, value_name = "FILE")]
    pub asn_names: Option<PathBuf>,
    /// AS names from an ASN database, as enrich's --asn-db takes it: a
    /// MaxMind-format ASN database (.mmdb) or a `prefix,asn,name` CSV.
    #[arg(long, alias = "asn-csv", value_name = "FILE")]
    pub asn_db: Option<PathBuf>,
    /// Where reading starts.
    #[arg(long, value_enum, default_value = "latest")]
    pub start_offset: DashStart,
    /// Partitions to read: `all` or comma-separated numbers (flow-exporter's
    /// flag). With --start-offset committed only `all`.
    #[arg(long, value_name = "all|N,N", default_value = "all")]
    pub partitions: String,
    /// Consumer group (used by --start-offset committed).
    #[arg(long, value_name = "GROUP", default_value = "flowexport-dashboard")]
    pub group_id: String,
    /// Prometheus endpoint (serves /metrics); `:PORT` listens on all
    /// addresses, as flow-exporter does.
    #[arg(long, value_name = "ADDR:PORT", default_value = ":9590", value_parser = parse_listen)]
    pub metrics_addr: SocketAddr,
    /// Distinct customer ids labelled; more are counted as cid="other".
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub max_customers: usize,
    /// Distinct hosts (exporters) labelled; more are counted as host="other".
    #[arg(long, value_name = "N", default_value_t = 1_000)]
    pub max_hosts: usize,
    /// Distinct (source AS, destination AS, host) series of the
    /// flow-exporter metrics; more are counted with AS "other".
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    pub max_as_pairs: usize,
    /// A librdkafka consumer property (repeatable).
    #[arg(short = 'X', value_name = "KEY=VALUE", value_parser = parse_property)]
    pub kafka_property: Vec<(String, String)>,
}

/// One flow as the dashboard counts it: counters already scaled by the
/// sampling rate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DashFlow {
    /// The exporter: sampler_address, or pmacct's `label`.
    pub host: Host,
    pub src_as: u32,
    pub dst_as: u32,
    pub bytes: u64,
    pub packets: u64,
    /// Flows this record stands for (1; the sampling rate does not apply).
    pub flows: u64,
    pub proto: Option<u8>,
    pub src_port: u16,
    pub dst_port: u16,
    pub ip_version: Option<u8>,
    /// 0 ingress, 1 egress; None when the source does not say.
    pub direction: Option<u8>,
    pub cid: u32,
    /// AS names the record carries (enrich sets them); used when the
    /// dashboard's own name files do not know the AS.
    pub src_as_name: String,
    pub dst_as_name: String,
}

/// An exporter as the dashboard labels it; an address is turned into text
/// only when its series is created, not per record.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    Addr(Option<IpAddr>),
    Label(String),
}

impl Default for Host {
    fn default() -> Host {
        Host::Addr(None)
    }
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Host::Addr(Some(a)) => write!(f, "{a}"),
            Host::Addr(None) => Ok(()),
            Host::Label(l) => f.write_str(l),
        }
    }
}

impl From<&str> for Host {
    fn from(s: &str) -> Host {
        Host::Label(s.to_string())
    }
}

impl DashFlow {
    pub fn from_record(r: &FlowRecord) -> DashFlow {
        let scale = r.sampling_rate.max(1);
        DashFlow {
            host: Host::Addr(r.sampler_address),
            src_as: r.src_as,
            dst_as: r.dst_as,
            bytes: r.bytes.saturating_mul(scale),
            packets: r.packets.saturating_mul(scale),
            flows: 1,
            proto: Some(r.proto),
            src_port: r.src_port,
            dst_port: r.dst_port,
            ip_version: Some(ip_version(r.etype, r.src_addr)),
            direction: Some(r.flow_direction),
            cid: r.cid,
            src_as_name: r.src_as_name.clone(),
            dst_as_name: r.dst_as_name.clone(),
        }
    }
}

/// Why a message could not be counted (the `reason` label).
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a FlowMessage: {0}")]
    Protobuf(String),
    #[error("not JSON of the expected shape: {0}")]
    Json(String),
}

impl DecodeError {
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Protobuf(_) => "protobuf",
            DecodeError::Json(_) => "json",
        }
    }
}

/// pmacct's JSON object; `bytes` is required, the rest optional.
#[derive(Deserialize)]
struct PmacctFlow {
    #[serde(default)]
    label: String,
    #[serde(default)]
    as_src: u32,
    #[serde(default)]
    as_dst: u32,
    bytes: u64,
    packets: Option<u64>,
    ip_src: Option<String>,
    ip_dst: Option<String>,
    ip_proto: Option<serde_json::Value>,
    #[serde(default)]
    port_src: u16,
    #[serde(default)]
    port_dst: u16,
    sampling_rate: Option<u64>,
}

/// Decodes one message.
pub fn decode(format: InputFormat, bytes: &[u8]) -> Result<DashFlow, DecodeError> {
    match format {
        InputFormat::Protobuf => {
            scan_flow_message(bytes).map_err(|e| DecodeError::Protobuf(e.into()))
        }
        InputFormat::Json => {
            // The same reader (and the same required fields) as enrich and
            // split use for `--in-format json`.
            let r =
                crate::record::from_json(bytes).map_err(|e| DecodeError::Json(e.to_string()))?;
            Ok(DashFlow::from_record(&r))
        }
        InputFormat::PmacctJson => {
            let p: PmacctFlow =
                serde_json::from_slice(bytes).map_err(|e| DecodeError::Json(e.to_string()))?;
            let scale = p.sampling_rate.unwrap_or(1).max(1);
            let addr = p
                .ip_src
                .as_deref()
                .or(p.ip_dst.as_deref())
                .and_then(|a| a.parse::<IpAddr>().ok());
            let proto = match &p.ip_proto {
                Some(serde_json::Value::String(s)) => {
                    crate::record::ip_proto_number(s).or(s.parse().ok())
                }
                Some(serde_json::Value::Number(n)) => n.as_u64().and_then(|n| u8::try_from(n).ok()),
                _ => None,
            };
            Ok(DashFlow {
                host: Host::Label(p.label),
                src_as: p.as_src,
                dst_as: p.as_dst,
                bytes: p.bytes.saturating_mul(scale),
                packets: p.packets.unwrap_or(0).saturating_mul(scale),
                flows: 1,
                proto,
                src_port: p.port_src,
                dst_port: p.port_dst,
                ip_version: addr.map(|a| ip_version(0, a)),
                direction: None,
                cid: 0,
                src_as_name: String::new(),
                dst_as_name: String::new(),
            })
        }
    }
}

/// The dashboard's fields of a FlowMessage, read straight off the wire:
/// the fields it needs are picked up, all others are skipped by wire type,
/// and nothing is allocated except the AS names. Faster than decoding the
/// whole message; every message `protobuf::decode` accepts is read to the
/// same values (checked by the `protobuf` fuzz target), and a message with
/// a truncated or mistyped field is rejected as it would be. Fields it does
/// not read are not validated.
pub fn scan_flow_message(mut b: &[u8]) -> Result<DashFlow, &'static str> {
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
    let mut f = DashFlow {
        flows: 1,
        ..DashFlow::default()
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

/// 4 or 6: from the ethertype, else from the source address's family.
fn ip_version(etype: u16, src: IpAddr) -> u8 {
    match etype {
        ETYPE_IPV4 => 4,
        ETYPE_IPV6 => 6,
        _ if src.is_ipv4() => 4,
        _ => 6,
    }
}

/// Protocol label values: a fixed set.
fn proto_label(p: Option<u8>) -> &'static str {
    match p {
        None => "unknown",
        Some(1) => "icmp",
        Some(2) => "igmp",
        Some(6) => "tcp",
        Some(17) => "udp",
        Some(41) => "ipv6",
        Some(47) => "gre",
        Some(50) => "esp",
        Some(51) => "ah",
        Some(58) => "icmpv6",
        Some(89) => "ospf",
        Some(103) => "pim",
        Some(132) => "sctp",
        Some(_) => "other",
    }
}

/// Well-known application ports (IANA service names): the `app` label.
const APPS: &[(u16, &str)] = &[
    (20, "ftp-data"),
    (21, "ftp"),
    (22, "ssh"),
    (23, "telnet"),
    (25, "smtp"),
    (53, "dns"),
    (67, "dhcp"),
    (68, "dhcp"),
    (80, "http"),
    (110, "pop3"),
    (123, "ntp"),
    (143, "imap"),
    (161, "snmp"),
    (162, "snmp"),
    (179, "bgp"),
    (389, "ldap"),
    (443, "https"),
    (465, "smtps"),
    (514, "syslog"),
    (587, "submission"),
    (636, "ldaps"),
    (853, "domain-s"),
    (993, "imaps"),
    (995, "pop3s"),
    (1194, "openvpn"),
    (2055, "netflow"),
    (3306, "mysql"),
    (3389, "rdp"),
    (4739, "ipfix"),
    (5060, "sip"),
    (5432, "postgresql"),
    (6343, "sflow"),
    (6379, "redis"),
    (8080, "http-alt"),
    (8443, "https-alt"),
    (9092, "kafka"),
];

const APP_OTHER: u8 = 254;
const APP_NONE: u8 = 255;

/// The application of a flow, as an index into [`APPS`]: of its two ports
/// that are in the table, the lower (the server side is usually the
/// well-known one); [`APP_OTHER`] when neither is; [`APP_NONE`] for
/// protocols without ports.
fn app_index(f: &DashFlow) -> u8 {
    if !matches!(f.proto, Some(6 | 17 | 132) | None) {
        return APP_NONE;
    }
    let find = |p: u16| APPS.binary_search_by_key(&p, |(port, _)| *port).ok();
    match (find(f.src_port), find(f.dst_port)) {
        (Some(a), Some(b)) => a.min(b) as u8,
        (Some(a), None) | (None, Some(a)) => a as u8,
        (None, None) => APP_OTHER,
    }
}

fn app_name(i: u8) -> &'static str {
    match i {
        APP_OTHER => "other",
        APP_NONE => "none",
        i => APPS[i as usize].1,
    }
}

fn direction_label(d: Option<u8>) -> &'static str {
    match d {
        Some(0) => "ingress",
        Some(1) => "egress",
        _ => "unknown",
    }
}

fn ip_version_label(v: Option<u8>) -> &'static str {
    match v {
        Some(4) => "4",
        Some(6) => "6",
        _ => "unknown",
    }
}

/// A hasher for keys that are already well-spread integers (one
/// multiply instead of SipHash): the per-record series look-ups.
#[derive(Default)]
struct MixHasher(u64);

impl std::hash::Hasher for MixHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(*b as u64);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0 ^ v)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(29);
    }
}

type Mix = std::hash::BuildHasherDefault<MixHasher>;

/// The traffic series of a flow, packed: cid (bit 32 set: over the cap,
/// `other`), direction, IP version, protocol number (256: unknown) and
/// application index.
fn traffic_key(cid: Option<u32>, f: &DashFlow, app: u8) -> u64 {
    let cid = cid.map_or(1 << 32, |c| c as u64);
    let dir = f.direction.map_or(3, |d| d.min(2) as u64);
    let ipv = match f.ip_version {
        Some(4) => 1,
        Some(6) => 2,
        _ => 0,
    };
    let proto = f.proto.map_or(256, |p| p as u64);
    cid | dir << 33 | ipv << 35 | proto << 37 | (app as u64) << 46
}

/// The counters and their per-series handles (looked up once per series,
/// then incremented directly).
pub struct Dashboard {
    bytes: IntCounterVec,
    packets: IntCounterVec,
    flows: IntCounterVec,
    host_bytes: IntCounterVec,
    host_packets: IntCounterVec,
    host_flows: IntCounterVec,
    transmit: IntCounterVec,
    receive: IntCounterVec,
    asn: Option<u32>,
    names: HashMap<u32, String>,
    traffic: HashMap<u64, [IntCounter; 3], Mix>,
    hosts: HashMap<Host, [IntCounter; 3]>,
    as_series: HashMap<(bool, u32, u32, Host), IntCounter>,
    /// Customer ids with their own label (at most max_customers).
    cids: std::collections::HashSet<u32>,
    max_customers: usize,
    max_hosts: usize,
    max_as_pairs: usize,
}

impl Dashboard {
    pub fn new(
        r: &Registry,
        asn: Option<u32>,
        names: HashMap<u32, String>,
        max_customers: usize,
        max_hosts: usize,
        max_as_pairs: usize,
    ) -> Dashboard {
        let vec = |name: &str, help: &str, labels: &[&str]| {
            crate::metrics::counter_vec(r, name, help, labels)
        };
        let t = &["cid", "direction", "ip_version", "proto", "app"];
        let as_labels = &[
            "source_as",
            "source_as_name",
            "destination_as",
            "destination_as_name",
            "hostname",
        ];
        Dashboard {
            bytes: vec(
                "flowexport_dashboard_bytes_total",
                "Bytes of the flows read, scaled by their sampling rate.",
                t,
            ),
            packets: vec(
                "flowexport_dashboard_packets_total",
                "Packets of the flows read, scaled by their sampling rate.",
                t,
            ),
            flows: vec("flowexport_dashboard_flows_total", "Flow records read.", t),
            host_bytes: vec(
                "flowexport_dashboard_host_bytes_total",
                "Bytes by exporter (sampler_address, or pmacct's label), scaled by sampling rate.",
                &["host"],
            ),
            host_packets: vec(
                "flowexport_dashboard_host_packets_total",
                "Packets by exporter, scaled by sampling rate.",
                &["host"],
            ),
            host_flows: vec(
                "flowexport_dashboard_host_flows_total",
                "Flow records by exporter.",
                &["host"],
            ),
            transmit: vec("flow_transmit_bytes_total", "Bytes transferred.", as_labels),
            receive: vec("flow_receive_bytes_total", "Bytes received.", as_labels),
            asn,
            names,
            traffic: HashMap::default(),
            hosts: HashMap::new(),
            as_series: HashMap::new(),
            cids: std::collections::HashSet::new(),
            max_customers,
            max_hosts,
            max_as_pairs,
        }
    }

    /// Counts one flow.
    pub fn add(&mut self, f: &DashFlow) {
        let cid = if f.cid == 0 || self.cids.contains(&f.cid) {
            Some(f.cid)
        } else if self.cids.len() < self.max_customers {
            self.cids.insert(f.cid);
            Some(f.cid)
        } else {
            None
        };
        let app = app_index(f);
        let key = traffic_key(cid, f, app);
        let counters = match self.traffic.get(&key) {
            Some(c) => c,
            None => {
                let cid = match cid {
                    Some(0) => "none".to_string(),
                    Some(c) => c.to_string(),
                    None => "other".to_string(),
                };
                let l = [
                    cid.as_str(),
                    direction_label(f.direction),
                    ip_version_label(f.ip_version),
                    proto_label(f.proto),
                    app_name(app),
                ];
                let c = [
                    self.bytes.with_label_values(&l),
                    self.packets.with_label_values(&l),
                    self.flows.with_label_values(&l),
                ];
                self.traffic.entry(key).or_insert(c)
            }
        };
        counters[0].inc_by(f.bytes);
        counters[1].inc_by(f.packets);
        counters[2].inc_by(f.flows);

        // Hosts past the cap share the `other` entry (the map holds at
        // most max_hosts + 1 keys).
        let h = match self.hosts.get(&f.host) {
            Some(h) => h,
            None => {
                let host = if self.hosts.len() < self.max_hosts {
                    f.host.clone()
                } else {
                    Host::Label("other".into())
                };
                let text = host.to_string();
                let l = [text.as_str()];
                let c = [
                    self.host_bytes.with_label_values(&l),
                    self.host_packets.with_label_values(&l),
                    self.host_flows.with_label_values(&l),
                ];
                self.hosts.entry(host).or_insert(c)
            }
        };
        h[0].inc_by(f.bytes);
        h[1].inc_by(f.packets);
        h[2].inc_by(f.flows);

        // flow-exporter: transmit when the monitored AS is the source,
        // else receive when it is the destination.
        if let Some(asn) = self.asn {
            let tx = if f.src_as == asn {
                true
            } else if f.dst_as == asn {
                false
            } else {
                return;
            };
            let k = (tx, f.src_as, f.dst_as, f.host.clone());
            if let Some(c) = self.as_series.get(&k) {
                c.inc_by(f.bytes);
                return;
            }
            let full = self.as_series.len() >= self.max_as_pairs;
            let name = |a: u32, carried: &'_ str| -> String {
                self.names
                    .get(&a)
                    .cloned()
                    .unwrap_or_else(|| carried.to_string())
            };
            let (sn, dn) = (
                name(f.src_as, &f.src_as_name),
                name(f.dst_as, &f.dst_as_name),
            );
            let (sa, da) = (f.src_as.to_string(), f.dst_as.to_string());
            let host = f.host.to_string();
            let l: [&str; 5] = if full {
                // Keep the monitored side, lump the other.
                if tx {
                    [&sa, &sn, "other", "", &host]
                } else {
                    ["other", "", &da, &dn, &host]
                }
            } else {
                [&sa, &sn, &da, &dn, &host]
            };
            let c = if tx {
                self.transmit.with_label_values(&l)
            } else {
                self.receive.with_label_values(&l)
            };
            c.inc_by(f.bytes);
            if !full {
                self.as_series.insert(k, c);
            }
        }
    }
}

/// Reads CIDR-Report's asn.txt: `ASN<whitespace>NAME, CC` per line. The
/// name is the text before the trailing `, CC` (as flow-exporter takes it),
/// or the whole rest of the line when there is no country code.
pub fn parse_asn_names(path: &Path, text: &str) -> Result<HashMap<u32, String>, FileError> {
    let mut names = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let (asn, rest) = l.split_once(char::is_whitespace).unwrap_or((l, ""));
        let asn = asn.strip_prefix("AS").unwrap_or(asn);
        let Ok(asn) = asn.parse::<u32>() else {
            return Err(FileError::Line {
                path: path.display().to_string(),
                line: i + 1,
                reason: format!("{asn:?} is not an AS number; expected `ASN NAME, CC`"),
            });
        };
        let rest = rest.trim();
        let name = match rest.rsplit_once(", ") {
            Some((n, cc)) if cc.len() == 2 && cc.chars().all(|c| c.is_ascii_alphabetic()) => n,
            _ => rest,
        };
        names.insert(asn, name.to_string());
    }
    Ok(names)
}

/// Starts the consumer, the metrics endpoint and the loop; returns on
/// SIGINT/SIGTERM.
pub fn run(args: DashboardArgs) -> Result<()> {
    let format = args.format.unwrap_or(if args.asn.is_some() {
        InputFormat::PmacctJson
    } else {
        InputFormat::Protobuf
    });
    let mut names = HashMap::new();
    if let Some(p) = &args.asn_db {
        let db = crate::enrich::AsnDb::load(p).context("cannot start dashboard")?;
        names.extend(db.names());
    }
    if let Some(p) = &args.asn_names {
        names.extend(files::load(p, parse_asn_names).context("cannot start dashboard")?);
    }
    let partitions: Option<Vec<i32>> = match args.partitions.as_str() {
        "all" => None,
        list => Some(
            list.split(',')
                .map(|p| p.trim().parse::<i32>())
                .collect::<Result<_, _>>()
                .map_err(|_| {
                    anyhow::anyhow!("--partitions {list:?}: use `all` or numbers like 0,1,2")
                })?,
        ),
    };
    if partitions.is_some() && args.start_offset == DashStart::Committed {
        bail!("--partitions with a list needs --start-offset earliest or latest (committed offsets belong to the group's own assignment)");
    }

    let registry = Registry::new();
    let messages = crate::metrics::counter(
        &registry,
        "flowexport_dashboard_messages_total",
        "Messages read from the topic.",
    );
    let undecodable = crate::metrics::counter_vec(
        &registry,
        "flowexport_dashboard_undecodable_total",
        "Messages that could not be decoded (counted, skipped), by reason.",
        &["reason"],
    );
    let mut dash = Dashboard::new(
        &registry,
        args.asn,
        names,
        args.max_customers,
        args.max_hosts,
        args.max_as_pairs,
    );

    let mut cc = crate::kafka_client::client_config(
        &args.kafka_brokers,
        &[
            ("group.id", args.group_id.clone()),
            (
                "enable.auto.commit",
                if args.start_offset == DashStart::Committed {
                    "true"
                } else {
                    "false"
                }
                .into(),
            ),
            ("auto.offset.reset", "latest".into()),
        ],
        &args.kafka_property,
        &[],
    );
    crate::kafka_group::default_assignment(&mut cc, &args.kafka_property);
    let group = crate::kafka_group::GroupMetrics::new(&registry, "flowexport_dashboard");
    let consumer: BaseConsumer<crate::kafka_group::GroupContext> = cc
        .create_with_context(crate::kafka_group::GroupContext::new(group))
        .context("invalid Kafka consumer configuration (check -X properties)")?;
    if args.start_offset == DashStart::Committed {
        consumer
            .subscribe(&[args.topic.as_str()])
            .with_context(|| format!("subscribing to topic {}", args.topic))?;
    } else {
        let ids = match partitions {
            Some(p) => p,
            None => {
                let md = consumer
                    .fetch_metadata(Some(&args.topic), Duration::from_secs(10))
                    .with_context(|| {
                        format!(
                            "cannot read topic {} from {}",
                            args.topic, args.kafka_brokers
                        )
                    })?;
                match topic_partitions(&md, &args.topic) {
                    Some(ids) => ids,
                    None => bail!(
                        "topic {} does not exist on {} (create it, or check --topic)",
                        args.topic,
                        args.kafka_brokers
                    ),
                }
            }
        };
        let offset = if args.start_offset == DashStart::Earliest {
            Offset::Beginning
        } else {
            Offset::End
        };
        let mut tpl = TopicPartitionList::new();
        for p in ids {
            tpl.add_partition_offset(&args.topic, p, offset)?;
        }
        consumer.assign(&tpl)?;
    }

    let service = crate::runtime::start(args.metrics_addr, &registry, false, "stopping")?;
    let stop = &service.stop;
    log::info!(
        "dashboard reading topic {} as {format:?} (metrics on http://{}/metrics)",
        args.topic,
        args.metrics_addr
    );
    let decode_log = RateLimitedLog::new();
    while !stop.load(Ordering::Relaxed) {
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                log::warn!("Kafka consumer: {e}");
                continue;
            }
        };
        messages.inc();
        match decode(format, m.payload().unwrap_or_default()) {
            Ok(f) => dash.add(&f),
            Err(e) => {
                undecodable.with_label_values(&[e.reason()]).inc();
                decode_log.warn(|| {
                    format!(
                        "skipping message at partition {} offset {}: {e}",
                        m.partition(),
                        m.offset()
                    )
                });
            }
        }
    }
    service.runtime.shutdown_background();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::protobuf;
    use crate::metrics::render_registry;

    fn scrape(r: &Registry) -> String {
        render_registry(r)
    }

    #[test]
    fn pmacct_json_as_flow_exporter_reads_it() {
        let f = decode(
            InputFormat::PmacctJson,
            br#"{"label":"bdr1.ny1","as_src":15169,"as_dst":6939,"bytes":52,"packets":1,"ip_src":"8.8.8.8","ip_dst":"192.0.2.1","ip_proto":"udp","port_src":53,"port_dst":40000}"#,
        )
        .unwrap();
        assert_eq!(
            f,
            DashFlow {
                host: "bdr1.ny1".into(),
                src_as: 15169,
                dst_as: 6939,
                bytes: 52,
                packets: 1,
                flows: 1,
                proto: Some(17),
                src_port: 53,
                dst_port: 40000,
                ip_version: Some(4),
                direction: None,
                cid: 0,
                src_as_name: String::new(),
                dst_as_name: String::new(),
            }
        );
        // flow-exporter's minimal schema.
        let f = decode(
            InputFormat::PmacctJson,
            br#"{"label": "r", "as_src": 1, "as_dst": 2, "bytes": 7}"#,
        )
        .unwrap();
        assert_eq!(
            (f.bytes, f.packets, f.proto, f.ip_version),
            (7, 0, None, None)
        );
        for bad in [
            &b"not json"[..],
            br#"{"label":"r"}"#,
            br#"{"bytes":"many"}"#,
        ] {
            assert_eq!(
                decode(InputFormat::PmacctJson, bad).unwrap_err().reason(),
                "json"
            );
        }
    }

    #[test]
    fn our_json_records_read_as_enrich_reads_them() {
        let mut r = crate::codec::protobuf::tests::sample();
        r.sampling_rate = 10;
        let f = decode(InputFormat::Json, r.to_json().as_bytes()).unwrap();
        assert_eq!(
            (f.bytes, f.packets, f.flows, f.cid),
            (r.bytes * 10, r.packets * 10, 1, r.cid)
        );
        assert_eq!(f.host.to_string(), r.sampler_address.unwrap().to_string());
        assert_eq!((f.src_as, f.dst_as), (r.src_as, r.dst_as));
        // The required fields of record::from_json: a record without its
        // counters or addresses is counted as undecodable.
        for bad in [
            &br#"{"src_addr":"10.0.0.1","dst_addr":"10.0.0.2","packets":1}"#[..],
            br#"{"dst_addr":"10.0.0.2","bytes":1,"packets":1}"#,
            b"{}",
        ] {
            assert_eq!(decode(InputFormat::Json, bad).unwrap_err().reason(), "json");
        }
    }

    #[test]
    fn flow_exporter_metrics_by_monitored_asn() {
        let r = Registry::new();
        let names = HashMap::from([(15169, "GOOGLE".to_string()), (6939, "HURRICANE".into())]);
        let mut d = Dashboard::new(&r, Some(15169), names, 10, 10, 100);
        let flow = |s, dst, b| DashFlow {
            host: "bdr1".into(),
            src_as: s,
            dst_as: dst,
            bytes: b,
            flows: 1,
            ..DashFlow::default()
        };
        d.add(&flow(15169, 6939, 100));
        d.add(&flow(15169, 6939, 50));
        d.add(&flow(6939, 15169, 30));
        d.add(&flow(1, 2, 999)); // neither side is the monitored AS
        let s = scrape(&r);
        assert!(s.contains(
            "flow_transmit_bytes_total{destination_as=\"6939\",destination_as_name=\"HURRICANE\",hostname=\"bdr1\",source_as=\"15169\",source_as_name=\"GOOGLE\"} 150"
        ), "{s}");
        assert!(s.contains(
            "flow_receive_bytes_total{destination_as=\"15169\",destination_as_name=\"GOOGLE\",hostname=\"bdr1\",source_as=\"6939\",source_as_name=\"HURRICANE\"} 30"
        ), "{s}");
        assert_eq!(s.matches("flow_receive_bytes_total{").count(), 1);
        assert_eq!(s.matches("flow_transmit_bytes_total{").count(), 1);
    }

    #[test]
    fn traffic_labels_are_bounded_and_scaled() {
        let r = Registry::new();
        let mut d = Dashboard::new(&r, None, HashMap::new(), 2, 1, 100);
        let rec = |cid, sport, dport, proto, rate| FlowRecord {
            sampler_address: Some("192.0.2.1".parse().unwrap()),
            src_addr: "10.0.0.1".parse().unwrap(),
            dst_addr: "10.0.0.2".parse().unwrap(),
            etype: ETYPE_IPV4,
            proto,
            src_port: sport,
            dst_port: dport,
            bytes: 100,
            packets: 2,
            sampling_rate: rate,
            flow_direction: 1,
            cid,
            ..FlowRecord::default()
        };
        d.add(&DashFlow::from_record(&rec(1, 40000, 443, 6, 0)));
        d.add(&DashFlow::from_record(&rec(1, 443, 40001, 6, 10)));
        d.add(&DashFlow::from_record(&rec(2, 53, 123, 17, 1)));
        d.add(&DashFlow::from_record(&rec(3, 1, 2, 17, 1))); // third cid: other
        d.add(&DashFlow::from_record(&rec(0, 0, 0, 1, 1)));
        d.add(&DashFlow::from_record(&rec(0, 0, 0, 250, 1)));
        let mut h = rec(0, 0, 0, 1, 1);
        h.sampler_address = Some("192.0.2.2".parse().unwrap()); // second host: other
        d.add(&DashFlow::from_record(&h));
        let s = scrape(&r);
        let has = |line: &str| assert!(s.contains(line), "missing {line}\n{s}");
        has("flowexport_dashboard_bytes_total{app=\"https\",cid=\"1\",direction=\"egress\",ip_version=\"4\",proto=\"tcp\"} 1100");
        has("flowexport_dashboard_packets_total{app=\"https\",cid=\"1\",direction=\"egress\",ip_version=\"4\",proto=\"tcp\"} 22");
        has("flowexport_dashboard_flows_total{app=\"https\",cid=\"1\",direction=\"egress\",ip_version=\"4\",proto=\"tcp\"} 2");
        has("flowexport_dashboard_bytes_total{app=\"dns\",cid=\"2\",direction=\"egress\",ip_version=\"4\",proto=\"udp\"} 100");
        has("flowexport_dashboard_bytes_total{app=\"other\",cid=\"other\",direction=\"egress\",ip_version=\"4\",proto=\"udp\"} 100");
        has("flowexport_dashboard_bytes_total{app=\"none\",cid=\"none\",direction=\"egress\",ip_version=\"4\",proto=\"icmp\"} 200");
        has("flowexport_dashboard_bytes_total{app=\"none\",cid=\"none\",direction=\"egress\",ip_version=\"4\",proto=\"other\"} 100");
        has("flowexport_dashboard_host_bytes_total{host=\"192.0.2.1\"} 1500");
        has("flowexport_dashboard_host_bytes_total{host=\"other\"} 100");
        has("flowexport_dashboard_host_flows_total{host=\"192.0.2.1\"} 6");
    }

    #[test]
    fn asn_names_from_cidr_report_format() {
        let n = parse_asn_names(
            Path::new("asn.txt"),
            "0\t-Reserved AS-, ZZ\n1\tLVLT-1 - Level 3 Parent, LLC, US\n397143\tNEPTUNE-NETWORKS - Neptune Networks, US\n64500 NO-COUNTRY\n",
        )
        .unwrap();
        assert_eq!(n[&1], "LVLT-1 - Level 3 Parent, LLC");
        assert_eq!(n[&397143], "NEPTUNE-NETWORKS - Neptune Networks");
        assert_eq!(n[&0], "-Reserved AS-");
        assert_eq!(n[&64500], "NO-COUNTRY");
        assert_eq!(
            parse_asn_names(Path::new("asn.txt"), "x NAME, US\n")
                .unwrap_err()
                .to_string(),
            "asn.txt line 1: \"x\" is not an AS number; expected `ASN NAME, CC`"
        );
    }

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
            let full = DashFlow::from_record(&protobuf::decode(&buf, false).unwrap());
            assert_eq!(scan_flow_message(&buf).unwrap(), full, "variant {variant}");
        }
        // Found by the protobuf fuzz target: a field given twice (the last
        // counts, even after a bad one), and an unknown field as a group
        // (skipped to its end tag, nested).
        let mut buf = vec![0x32, 0x01, 0x05];
        protobuf::encode(&r, false, &mut buf);
        // group 500 { 2: 1, group 501 {} }
        buf.extend([0xa3, 0x1f, 0x10, 0x01, 0xab, 0x1f, 0xac, 0x1f, 0xa4, 0x1f]);
        let full = DashFlow::from_record(&protobuf::decode(&buf, false).unwrap());
        assert_eq!(scan_flow_message(&buf).unwrap(), full);
        for bad in [
            &b""[..],
            b"\x08",
            b"\x32\x05ab",
            b"\x48\x80",
            b"\x4a\x01\x01",
        ] {
            assert!(scan_flow_message(bad).is_err(), "{bad:?}");
            assert!(protobuf::decode(bad, false).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn listen_address_forms() {
        assert_eq!(
            parse_listen(":9590").unwrap(),
            "0.0.0.0:9590".parse().unwrap()
        );
        assert_eq!(
            parse_listen("127.0.0.1:1").unwrap(),
            "127.0.0.1:1".parse().unwrap()
        );
        assert!(parse_listen("9590").is_err());
    }
}
