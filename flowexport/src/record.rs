//! `FlowRecord`: the one flow record every stage of flowexport passes along,
//! from the agent's drain and the collector's decoders to every sink.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use flowexport_common::{FlowKey, DIR_EGRESS};

/// Where a record came from, as goflow2's `FlowMessage.type` names it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FlowType {
    #[default]
    Unknown,
    SFlow5,
    NetFlowV5,
    NetFlowV9,
    Ipfix,
    Ebpf,
}

impl FlowType {
    pub fn as_str(self) -> &'static str {
        match self {
            FlowType::Unknown => "FLOWUNKNOWN",
            FlowType::SFlow5 => "SFLOW_5",
            FlowType::NetFlowV5 => "NETFLOW_V5",
            FlowType::NetFlowV9 => "NETFLOW_V9",
            FlowType::Ipfix => "IPFIX",
            FlowType::Ebpf => "EBPF",
        }
    }
}

impl Serialize for FlowType {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for FlowType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(match s.as_str() {
            "SFLOW_5" => FlowType::SFlow5,
            "NETFLOW_V5" => FlowType::NetFlowV5,
            "NETFLOW_V9" => FlowType::NetFlowV9,
            "IPFIX" => FlowType::Ipfix,
            "EBPF" => FlowType::Ebpf,
            _ => FlowType::Unknown,
        })
    }
}

/// Ethertypes as goflow2 reports them in `etype`.
pub const ETYPE_IPV4: u16 = 0x0800;
pub const ETYPE_IPV6: u16 = 0x86dd;

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;

/// One flow (or one active-timeout slice of a long flow). Field names are
/// goflow2's JSON names; times are wall-clock nanoseconds since the epoch.
/// Reads back from that JSON ([`from_json`]): `src_addr`, `dst_addr`,
/// `bytes` and `packets` are required (a record without them is malformed,
/// not a zero flow); any other missing field is 0/empty, unknown fields are
/// ignored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    #[serde(default, rename = "type")]
    pub flow_type: FlowType,
    #[serde(default)]
    pub time_received_ns: u64,
    #[serde(default)]
    pub sequence_num: u32,
    #[serde(default)]
    pub sampling_rate: u64,
    #[serde(
        default,
        serialize_with = "addr_or_empty",
        deserialize_with = "addr_from_text"
    )]
    pub sampler_address: Option<IpAddr>,
    #[serde(default)]
    pub time_flow_start_ns: u64,
    #[serde(default)]
    pub time_flow_end_ns: u64,
    pub bytes: u64,
    pub packets: u64,
    pub src_addr: IpAddr,
    pub dst_addr: IpAddr,
    #[serde(default)]
    pub etype: u16,
    #[serde(default)]
    pub proto: u8,
    #[serde(default)]
    pub src_port: u16,
    #[serde(default)]
    pub dst_port: u16,
    #[serde(default)]
    pub in_if: u32,
    #[serde(default)]
    pub out_if: u32,
    #[serde(default)]
    pub vlan_id: u16,
    #[serde(default)]
    pub tcp_flags: u8,
    #[serde(default)]
    pub icmp_type: u8,
    #[serde(default)]
    pub icmp_code: u8,
    /// 0 = ingress, 1 = egress (as goflow2's `flow_direction`).
    #[serde(default)]
    pub flow_direction: u8,
    #[serde(default)]
    pub ip_tos: u8,
    #[serde(default)]
    pub src_as: u32,
    #[serde(default)]
    pub dst_as: u32,
    /// MAC addresses in the low 48 bits, as goflow2 carries them.
    #[serde(default)]
    pub src_mac: u64,
    #[serde(default)]
    pub dst_mac: u64,
    /// IPFIX observation domain / NetFlow v9 source id of the exporter.
    #[serde(default)]
    pub observation_domain_id: u32,
    /// Customer ids set by `flowexport enrich` (0 = none): of the source,
    /// the destination, and the local side. Left out of JSON when 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub src_cid: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dst_cid: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cid: u32,
    /// AS names from enrich's ASN database. Left out of JSON when empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub src_as_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub dst_as_name: String,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

impl Default for FlowRecord {
    fn default() -> Self {
        FlowRecord {
            flow_type: FlowType::Unknown,
            time_received_ns: 0,
            sequence_num: 0,
            sampling_rate: 0,
            sampler_address: None,
            time_flow_start_ns: 0,
            time_flow_end_ns: 0,
            bytes: 0,
            packets: 0,
            src_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            dst_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            etype: 0,
            proto: 0,
            src_port: 0,
            dst_port: 0,
            in_if: 0,
            out_if: 0,
            vlan_id: 0,
            tcp_flags: 0,
            icmp_type: 0,
            icmp_code: 0,
            flow_direction: 0,
            ip_tos: 0,
            src_as: 0,
            dst_as: 0,
            src_mac: 0,
            dst_mac: 0,
            observation_domain_id: 0,
            src_cid: 0,
            dst_cid: 0,
            cid: 0,
            src_as_name: String::new(),
            dst_as_name: String::new(),
        }
    }
}

fn addr_from_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<IpAddr>, D::Error> {
    let s = String::deserialize(d)?;
    if s.is_empty() {
        return Ok(None);
    }
    s.parse().map(Some).map_err(serde::de::Error::custom)
}

/// A record from its JSON line (the stdout sink's and `--kafka-format
/// json`'s object).
pub fn from_json(bytes: &[u8]) -> Result<FlowRecord, serde_json::Error> {
    serde_json::from_slice(bytes)
}

fn addr_or_empty<S: Serializer>(a: &Option<IpAddr>, s: S) -> Result<S::Ok, S::Error> {
    match a {
        Some(a) => s.collect_str(a),
        None => s.serialize_str(""),
    }
}

/// Counters of one flow, summed over CPUs, with kernel (CLOCK_MONOTONIC) times.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCounters {
    pub packets: u64,
    pub bytes: u64,
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    pub tcp_flags: u8,
}

impl FlowCounters {
    /// Adds `other` into `self`: counts add, times widen, flags OR.
    pub fn merge(&mut self, other: &FlowCounters) {
        if self.packets == 0 {
            *self = *other;
            return;
        }
        if other.packets == 0 {
            return;
        }
        self.packets += other.packets;
        self.bytes += other.bytes;
        // 0 means "not known" (never a real CLOCK_MONOTONIC reading).
        self.first_seen_ns = match (self.first_seen_ns, other.first_seen_ns) {
            (0, b) => b,
            (a, 0) => a,
            (a, b) => a.min(b),
        };
        self.last_seen_ns = self.last_seen_ns.max(other.last_seen_ns);
        self.tcp_flags |= other.tcp_flags;
    }
}

/// Context shared by every record of one drain.
#[derive(Clone, Copy, Debug)]
pub struct ExportContext {
    pub sampler_address: Option<IpAddr>,
    /// The records' `sampling_rate`: N of `--sampling` when the kernel
    /// samples 1 in N, 0 (not sampled) when it counts every packet.
    pub sampling_rate: u64,
    pub clock: crate::timeconv::ClockOffset,
    pub time_received_ns: u64,
}

/// The address in a key as an `IpAddr` (IPv4 sits in the first 4 bytes).
pub fn key_addr(bytes: &[u8; 16], ip_version: u8) -> IpAddr {
    if ip_version == 6 {
        IpAddr::V6(Ipv6Addr::from(*bytes))
    } else {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    }
}

/// IP protocol numbers by name (pmacct's `ip_proto` names, `--filter
/// proto=`), case-insensitive.
pub fn ip_proto_number(name: &str) -> Option<u8> {
    Some(match name.to_ascii_lowercase().as_str() {
        "icmp" => 1,
        "igmp" => 2,
        "tcp" => 6,
        "udp" => 17,
        "ipv6" => 41,
        "gre" => 47,
        "esp" => 50,
        "ah" => 51,
        "ipv6-icmp" | "icmpv6" => 58,
        "ospf" => 89,
        "pim" => 103,
        "sctp" => 132,
        "udplite" | "udp-lite" => 136,
        _ => return None,
    })
}

impl FlowRecord {
    /// Builds the record for one kernel flow key and its counters.
    pub fn from_kernel(key: &FlowKey, c: &FlowCounters, ctx: &ExportContext) -> FlowRecord {
        let (etype, src_addr, dst_addr) = match key.ip_version {
            6 => (
                ETYPE_IPV6,
                key_addr(&key.src_addr, 6),
                key_addr(&key.dst_addr, 6),
            ),
            4 => (
                ETYPE_IPV4,
                key_addr(&key.src_addr, 4),
                key_addr(&key.dst_addr, 4),
            ),
            // Overflow records (see capture::drain) carry no address family.
            _ => (
                0,
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            ),
        };
        let is_icmp = matches!(
            (key.ip_version, key.proto),
            (4, IPPROTO_ICMP) | (6, IPPROTO_ICMPV6)
        );
        let (src_port, dst_port, icmp_type, icmp_code) = if is_icmp {
            (0, 0, (key.dst_port >> 8) as u8, key.dst_port as u8)
        } else {
            (key.src_port, key.dst_port, 0, 0)
        };
        let egress = key.direction == DIR_EGRESS;
        FlowRecord {
            flow_type: FlowType::Ebpf,
            time_received_ns: ctx.time_received_ns,
            sequence_num: 0,
            sampling_rate: ctx.sampling_rate,
            sampler_address: ctx.sampler_address,
            time_flow_start_ns: ctx.clock.to_wall_ns(c.first_seen_ns),
            time_flow_end_ns: ctx.clock.to_wall_ns(c.last_seen_ns),
            bytes: c.bytes,
            packets: c.packets,
            src_addr,
            dst_addr,
            etype,
            proto: key.proto,
            src_port,
            dst_port,
            in_if: if egress { 0 } else { key.ifindex },
            out_if: if egress { key.ifindex } else { 0 },
            vlan_id: key.vlan_id,
            tcp_flags: c.tcp_flags,
            icmp_type,
            icmp_code,
            flow_direction: key.direction,
            ..FlowRecord::default()
        }
    }

    /// One JSON object, goflow2 field names, no trailing newline.
    pub fn to_json(&self) -> String {
        let mut out = Vec::with_capacity(512);
        crate::codec::json::write_record(&mut out, self);
        String::from_utf8(out).expect("JSON is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timeconv::ClockOffset;
    use flowexport_common::DIR_INGRESS;

    fn ctx() -> ExportContext {
        ExportContext {
            sampler_address: Some("192.0.2.1".parse().unwrap()),
            sampling_rate: 0,
            // wall = mono + 1_700_000_000_000_000_000
            clock: ClockOffset::from_pair(1_000, 1_700_000_000_000_001_000),
            time_received_ns: 1_700_000_000_500_000_000,
        }
    }

    fn v4_key(direction: u8, proto: u8, sp: u16, dp: u16) -> FlowKey {
        let mut k = FlowKey {
            ifindex: 7,
            direction,
            ip_version: 4,
            proto,
            src_port: sp,
            dst_port: dp,
            vlan_id: 100,
            ..Default::default()
        };
        k.src_addr[..4].copy_from_slice(&[10, 0, 0, 1]);
        k.dst_addr[..4].copy_from_slice(&[10, 0, 0, 2]);
        k
    }

    #[test]
    fn ingress_udp_record_fields() {
        let c = FlowCounters {
            packets: 3,
            bytes: 3 * 128,
            first_seen_ns: 5_000,
            last_seen_ns: 9_000,
            tcp_flags: 0,
        };
        let r = FlowRecord::from_kernel(&v4_key(DIR_INGRESS, 17, 4000, 53), &c, &ctx());
        assert_eq!(r.in_if, 7);
        assert_eq!(r.out_if, 0);
        assert_eq!(r.etype, 0x800);
        assert_eq!(r.src_addr.to_string(), "10.0.0.1");
        assert_eq!(r.time_flow_start_ns, 1_700_000_000_000_005_000);
        assert_eq!(r.time_flow_end_ns, 1_700_000_000_000_009_000);
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["type"], "EBPF");
        assert_eq!(v["sampler_address"], "192.0.2.1");
        assert_eq!(v["src_port"], 4000);
        assert_eq!(v["dst_port"], 53);
        assert_eq!(v["bytes"], 384);
        assert_eq!(v["packets"], 3);
        assert_eq!(v["flow_direction"], 0);
        assert_eq!(v["vlan_id"], 100);
        assert_eq!(v["time_received_ns"], 1_700_000_000_500_000_000u64);
    }

    #[test]
    fn json_reads_back_what_it_wrote() {
        // Every field set (the protobuf tests' sample lists them all).
        let full = crate::codec::protobuf::tests::sample();
        let mut none = full.clone();
        none.sampler_address = None;
        none.flow_type = FlowType::Unknown;
        for r in [full, none] {
            assert_eq!(from_json(r.to_json().as_bytes()).unwrap(), r);
        }
        // Optional fields missing are zero, unknown ones ignored; bad
        // addresses and wrong types are errors.
        let r =
            from_json(br#"{"src_addr":"10.1.1.1","dst_addr":"::1","bytes":5,"packets":2,"x":[1]}"#)
                .unwrap();
        assert_eq!(
            (r.bytes, r.packets, r.proto, r.sampler_address),
            (5, 2, 0, None)
        );
        assert!(
            from_json(br#"{"src_addr":"10.1.1","dst_addr":"::1","bytes":5,"packets":2}"#).is_err()
        );
        assert!(from_json(
            br#"{"src_addr":"10.1.1.1","dst_addr":"::1","bytes":"five","packets":2}"#
        )
        .is_err());
        // The addresses and counters are required: without them a record is
        // malformed, not a zero flow.
        for missing in ["src_addr", "dst_addr", "bytes", "packets"] {
            let mut v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
            v.as_object_mut().unwrap().remove(missing);
            let e = from_json(v.to_string().as_bytes()).unwrap_err().to_string();
            assert!(e.contains(&format!("missing field `{missing}`")), "{e}");
        }
        assert!(from_json(b"not json").is_err());
    }

    #[test]
    fn egress_icmp_splits_type_and_code() {
        let c = FlowCounters {
            packets: 1,
            bytes: 84,
            first_seen_ns: 1,
            last_seen_ns: 1,
            tcp_flags: 0,
        };
        let r = FlowRecord::from_kernel(&v4_key(DIR_EGRESS, 1, 0, 8 << 8 | 3), &c, &ctx());
        assert_eq!((r.icmp_type, r.icmp_code), (8, 3));
        assert_eq!((r.src_port, r.dst_port), (0, 0));
        assert_eq!((r.in_if, r.out_if), (0, 7));
        assert_eq!(r.flow_direction, 1);
    }

    #[test]
    fn ipv6_and_empty_sampler() {
        let mut k = v4_key(DIR_INGRESS, 6, 1, 2);
        k.ip_version = 6;
        k.src_addr = "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets();
        k.dst_addr = "2001:db8::2".parse::<Ipv6Addr>().unwrap().octets();
        let mut cx = ctx();
        cx.sampler_address = None;
        let r = FlowRecord::from_kernel(&k, &FlowCounters::default(), &cx);
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["etype"], 0x86dd);
        assert_eq!(v["src_addr"], "2001:db8::1");
        assert_eq!(v["sampler_address"], "");
    }

    #[test]
    fn merge_widens_times_and_ors_flags() {
        let mut a = FlowCounters {
            packets: 2,
            bytes: 100,
            first_seen_ns: 50,
            last_seen_ns: 60,
            tcp_flags: 0x02,
        };
        a.merge(&FlowCounters {
            packets: 1,
            bytes: 40,
            first_seen_ns: 40,
            last_seen_ns: 70,
            tcp_flags: 0x10,
        });
        assert_eq!(
            a,
            FlowCounters {
                packets: 3,
                bytes: 140,
                first_seen_ns: 40,
                last_seen_ns: 70,
                tcp_flags: 0x12
            }
        );
        let mut z = FlowCounters::default();
        z.merge(&a);
        assert_eq!(z, a);
        // A per-CPU slot created by another CPU may lack its first-seen time.
        z.merge(&FlowCounters {
            packets: 1,
            bytes: 1,
            first_seen_ns: 0,
            last_seen_ns: 80,
            tcp_flags: 0,
        });
        assert_eq!((z.first_seen_ns, z.last_seen_ns), (40, 80));
    }
}
